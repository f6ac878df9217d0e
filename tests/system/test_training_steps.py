"""--train-graph on pads every training step to one of a few fixed shapes, the tensors a CUDA graph replays; on the
CPU those steps run eagerly, and must train what the steps as collated do: the same losses, gradient norms and
evaluations. (The CUDA graphs themselves: tests/gpu/test_cuda_training.py.)"""
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment


class TrainGraphTest(TempDirTest):
    def train(self, name, text, mode, *extra):
        toml = self.write(f"{name}.toml", text)
        db = self.dir / f"{name}-{mode}.db"
        out = run([toml, "--db", db, "--train-graph", mode, *extra])
        self.assertEqual(out.returncode, 0, out.stderr)
        steps = query(db, "SELECT step, loss, grad_norm FROM steps WHERE split = 'train' ORDER BY step")
        evals = query(db, "SELECT m.step, m.name, m.value FROM metrics m ORDER BY 1, 2")
        eval_loss = query(db, "SELECT step, loss FROM steps WHERE split = 'eval' ORDER BY step")
        outputs = query(db, "SELECT step, sample_id, output FROM samples ORDER BY 1, 2")
        return out.stderr, steps, evals, eval_loss, outputs

    def assert_same_training(self, name, text, tolerance, grad_tolerance, *extra):
        eager_log, *eager = self.train(name, text, "off", *extra)
        fixed_log, *fixed = self.train(name, text, "on", *extra)
        self.assertNotIn("fixed shapes", eager_log)
        self.assertIn("training steps: padded to fixed shapes, run eagerly (CUDA graphs need a CUDA device)", fixed_log)
        (steps_e, evals_e, loss_e, out_e), (steps_f, evals_f, loss_f, out_f) = eager, fixed
        self.assertEqual(len(steps_e), 6)
        self.assertEqual([s for s, *_ in steps_f], [s for s, *_ in steps_e])
        for (step, le, ge), (_, lf, gf) in zip(steps_e, steps_f):
            self.assertAlmostEqual(lf, le, delta=tolerance * le, msg=f"loss at step {step}")
            self.assertAlmostEqual(gf, ge, delta=grad_tolerance * ge, msg=f"gradient norm at step {step}")
        for (step, le), (_, lf) in zip(loss_e, loss_f):
            self.assertAlmostEqual(lf, le, delta=tolerance * le, msg=f"eval loss at step {step}")
        self.assertEqual(out_f, out_e)
        self.assertEqual(evals_f, evals_e)
        return fixed_log

    def test_prefix_layout_full_finetuning_with_gradient_accumulation(self):
        # Two micro-batches a step, padded to one shape (the longer one's).
        text = tiny_experiment("fixed-prefix", steps=6, every=3).replace("batch_size = 4", "batch_size = 4\ngrad_accum = 2")
        self.assert_same_training("prefix", text, 1e-6, 1e-5)

    def test_inline_layout_lora_over_cached_features(self):
        # The image among the text (its placement padded too), LoRA, the frozen encoder's features from the cache.
        text = tiny_experiment("fixed-inline", steps=6, every=3, strategy='["lora"]').replace('layout = "prefix"', 'layout = "inline"')
        log = self.assert_same_training("inline", text, 1e-6, 1e-5, "--feature-cache", "on")
        self.assertIn("feature cache: data.train: 64 images", log)

    def test_prefix_lm_layout_in_bf16(self):
        text = tiny_experiment("fixed-bf16", steps=6, every=3).replace('layout = "prefix"', 'layout = "prefix_lm"')
        text = text.replace("lr = 1e-3", 'lr = 1e-3\nprecision = "bf16"')
        # bf16 products over wider, more padded tensors round a little differently (bf16 keeps 8 bits).
        self.assert_same_training("bf16", text, 1e-4, 5e-3)

    def test_bad_mode_is_one_line_and_records_nothing(self):
        self.assert_bad_option("--train-graph", "always", "runner: --train-graph always: expected auto, on or off")


if __name__ == "__main__":
    unittest.main()
