"""Mixed precision: under bf16 the frozen linear weights are held in bf16 (autocast would cast them at every use),
and a run's exports still carry the float32 weights it loaded: every frozen tensor of a bf16 run's merged export
equals the float32 run's bit for bit."""
import unittest

from safetensors.numpy import load_file

from ablate_testing import TempDirTest, run, tiny_experiment


class FrozenLowPrecisionTest(TempDirTest):
    def export(self, precision):
        extra = f'\n[export]\nbackbone = "export-{precision}"\n'
        text = tiny_experiment(f"p-{precision}", steps=6, every=6, strategy='["projector", { plugin = "lora", r = 4 }]',
                               extra=extra)
        text = text.replace("lr = 1e-3\n", f'lr = 1e-3\nprecision = "{precision}"\n', 1)
        self.assertIn(f'precision = "{precision}"', text)
        toml = self.write(f"{precision}.toml", text)
        done = run([toml, "--db", self.dir / precision / "results.db", "--device", "cpu"])
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stderr, load_file(str(self.dir / f"export-{precision}" / "model.safetensors"))

    def test_bf16_run_exports_the_float32_weights_it_loaded(self):
        log, low = self.export("bf16")
        self.assertRegex(log, r"frozen linear weights held in bf16: \d+ tensors \(\d+ with a float32 original kept")
        _, full = self.export("fp32")
        self.assertEqual(low.keys(), full.keys())
        changed = sorted(k for k in full if not (low[k] == full[k]).all())
        print(f"{len(full)} exported tensors; differing between the bf16 and fp32 runs: {changed}")
        for k in full:
            self.assertEqual(str(low[k].dtype), "float32", k)
        # Only the LoRA-merged projections differ (their adapters trained in different precisions).
        self.assertTrue(changed, "the adapters trained")
        self.assertTrue(all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed)


if __name__ == "__main__":
    unittest.main()
