"""[[stages]] end to end: a stage prefix shared by several cells trains once and the database shows it; a grid of
staged cells killed at a random step resumes to exactly the losses of an uninterrupted run (LoRA dropout and
gradient accumulation included); gradient checkpointing changes no number; bf16 autocast runs on the CPU; and
the silent failures researchers report stop with one line and exit status 2."""
import os
import random
import time
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

ALIGN_STEPS, TUNE_STEPS = 20, 30
STAGES = f"""
[[stages]]
name = "align"
strategy = ["projector"]
train = {{ steps = {ALIGN_STEPS}, lr = 2e-3 }}

[[stages]]
name = "tune"
strategy = ["projector", {{ plugin = "lora", r = 4, alpha = 8, dropout = 0.1 }}]
train = {{ steps = {TUNE_STEPS}, grad_accum = 2, batch_size = 2 }}

[grid]
"stages.tune.train.lr" = [1e-3, 3e-3]
"""


def staged(name):
    return tiny_experiment(name, steps=999, every=5, extra=STAGES, train_size=48)


class StagesTest(TempDirTest):
    def test_shared_stage_trains_once_and_resume_is_exact(self):
        # Uninterrupted: 2 cells, 3 stage runs.
        clean_db = self.dir / "clean" / "results.db"
        toml = self.write("clean/staged.toml", staged("staged"))
        out = run([toml, "--db", clean_db])
        self.assertEqual(out.returncode, 0, out.stderr)
        runs = query(clean_db, "SELECT id, stage, stages_total, stage_name, parent_run_id, status, final_path FROM runs ORDER BY id")
        self.assertEqual(len(runs), 3, runs)
        align = [r for r in runs if r[1] == 0]
        tune = [r for r in runs if r[1] == 1]
        self.assertEqual(len(align), 1, "stage 1 is trained once")
        self.assertEqual(len(tune), 2)
        self.assertEqual({r[2] for r in runs}, {2})
        self.assertEqual({r[3] for r in align}, {"align"})
        self.assertEqual({r[4] for r in tune}, {align[0][0]}, "both stage-2 runs continue from the one stage-1 run")
        self.assertTrue(all(r[5] == "done" for r in runs))
        self.assertTrue(os.path.exists(align[0][6]), "stage 1 leaves its final weights")
        self.assertIn("reused from an earlier cell", out.stderr)
        steps = query(clean_db, "SELECT run_id, count(*) FROM steps WHERE split = 'train' GROUP BY run_id ORDER BY run_id")
        self.assertEqual([n for _, n in steps], [ALIGN_STEPS, TUNE_STEPS, TUNE_STEPS])
        # What trains differs by stage and is stored per run: LoRA only in the second stage.
        modes = query(clean_db, "SELECT run_id, group_concat(DISTINCT mode) FROM trainables GROUP BY run_id ORDER BY run_id")
        self.assertNotIn("lora", modes[0][1])
        self.assertIn("lora", modes[1][1])
        again = run([toml, "--db", clean_db])
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(len(query(clean_db, "SELECT id FROM runs")), 3, "a second invocation trains nothing")

        # The same grid, SIGKILLed twice at random steps, then completed.
        seed = int(os.environ.get("ABLATE_TEST_SEED", time.time_ns() % 100000))
        rng = random.Random(seed)
        total = ALIGN_STEPS + 2 * TUNE_STEPS
        first = rng.randint(6, ALIGN_STEPS + TUNE_STEPS - 4)
        second = rng.randint(first + 4, total - 6)
        print(f"seed {seed}: SIGKILL after {first} and {second} train rows of {total}")
        db = self.dir / "killed" / "results.db"
        toml = self.write("killed/staged.toml", staged("staged"))
        for rows in (first, second):
            self.kill_after(toml, db, rows)
            self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        done = run([toml, "--db", db])
        self.assertEqual(done.returncode, 0, done.stderr)
        sql = ("SELECT r.stage, r.cell_index, s.split, s.step, s.loss FROM steps s JOIN runs r ON r.id = s.run_id "
               "WHERE r.status = 'done' ORDER BY r.stage, r.cell_index, s.split, s.step")
        self.assertEqual(query(db, sql), query(clean_db, sql), "resumed stage runs compute what uninterrupted ones do")


class RecipeTest(TempDirTest):
    def losses(self, db, cell):
        return query(db, "SELECT s.step, s.loss FROM steps s JOIN runs r ON r.id = s.run_id "
                         "WHERE r.cell_index = ? AND s.split = 'train' ORDER BY s.step", cell)

    def test_gradient_checkpointing_changes_no_number(self):
        """Recomputing activations in backward (with LoRA dropout, whose random draws must be replayed) gives
        the same gradients, so the same losses, bit for bit."""
        strategy = ('["projector", { plugin = "lora", r = 4, dropout = 0.2 }, '
                    '{ plugin = "lora", component = "encoder", r = 4, dropout = 0.2, target_modules = ["q_proj", "fc1"] }]')
        grid = '[grid]\n"train.gradient_checkpointing" = [false, ["encoder", "backbone"]]\n'
        toml = self.write("gc.toml", tiny_experiment("gc", steps=12, every=6, extra=grid, strategy=strategy))
        db = self.dir / "r.db"
        out = run([toml, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        plain, checkpointed = self.losses(db, 0), self.losses(db, 1)
        self.assertEqual(len(plain), 12)
        self.assertEqual(plain, checkpointed)

    def test_bf16_on_cpu(self):
        toml = self.write("bf16.toml", tiny_experiment("bf16", steps=10, every=5, extra='[grid]\n"train.precision" = ["fp32", "bf16"]\n'))
        db = self.dir / "r.db"
        out = run([toml, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        fp32, bf16 = self.losses(db, 0), self.losses(db, 1)
        self.assertEqual(len(bf16), 10)
        self.assertNotEqual(fp32, bf16, "autocast ran in bfloat16")
        for (_, a), (_, b) in zip(fp32, bf16):
            self.assertAlmostEqual(a, b, delta=0.05 * abs(a))

    def test_fp16_needs_a_gpu(self):
        toml = self.write("fp16.toml", tiny_experiment("fp16", extra='[train.schedule]\nkind = "constant"\n')
                          .replace("lr = 1e-3\n", 'lr = 1e-3\nprecision = "fp16"\n'))
        out = run([toml, "--db", self.dir / "r.db", "--device", "cpu"])
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn("fp16", out.stderr)


class FailFastTest(TempDirTest):
    def expect_exit_2(self, text, *needles):
        toml = self.write("bad.toml", text)
        out = run([toml, "--db", self.dir / "r.db"])
        self.assertEqual(out.returncode, 2, out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertIn("bad.toml", out.stderr)
        for n in needles:
            self.assertIn(n, out.stderr)
        return last

    def test_strategy_that_adds_nothing(self):
        self.expect_exit_2(tiny_experiment("x", strategy='["full", "head"]'), "head", "trains nothing")

    def test_lora_target_that_matches_nothing(self):
        self.expect_exit_2(tiny_experiment("x", strategy='[{ plugin = "lora", target_modules = ["q_proj", "vproj"] }]'),
                           "vproj", "matches no linear layer")

    def test_labels_all_cut_by_truncation(self):
        self.expect_exit_2(tiny_experiment("x").replace("lr = 1e-3\n", "lr = 1e-3\nmax_text_tokens = 3\n"),
                           "max_text_tokens", "loss token")

    def test_stage_may_not_change_the_model(self):
        self.expect_exit_2(tiny_experiment("x", extra='[[stages]]\nmodel = { layout = "prefix" }\n'), "stages")


if __name__ == "__main__":
    unittest.main()
