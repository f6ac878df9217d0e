"""Killing the runner with SIGKILL in the middle of a grid loses nothing: the database opens, the grid completes
on the next run with no duplicated or missing step rows, PRAGMA integrity_check says ok, and the resumed runs
computed exactly what an uninterrupted run computes."""
import os
import random
import subprocess
import time
import unittest

from ablate_testing import RUNNER, TempDirTest, query, tiny_experiment

STEPS = 60
EVERY = 10
EVAL_EVERY = 20
GRID = '[grid]\nstrategy = [["full"], ["projector", "head"], ["projector", { plugin = "lora", r = 4 }]]\n'


def experiment(name):
    text = tiny_experiment(name, steps=STEPS, every=EVERY, extra=GRID, train_size=48)
    return text.replace(f"[eval]\nevery = {EVERY}", f"[eval]\nevery = {EVAL_EVERY}")


class SigkillTest(TempDirTest):
    def test_sigkill_mid_grid_then_resume(self):
        seed = int(os.environ.get("ABLATE_TEST_SEED", time.time_ns() % 100000))
        rng = random.Random(seed)
        toml = self.write("grid.toml", experiment("killed"))
        db = self.dir / "results" / "results.db"
        total = 3 * STEPS
        # Two kills at random points, the second after some resumed progress.
        first = rng.randint(12, total // 2)
        second = rng.randint(first + 8, total - 10)
        print(f"seed {seed}: SIGKILL after {first} and {second} train rows of {total}")
        self.kill_after(toml, db, first)
        self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        self.assertIn(("running",), query(db, "SELECT status FROM runs"))
        self.kill_after(toml, db, second)
        self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        # A run killed after its first checkpoint resumes from it; one killed before starts over.
        checkpointed = query(db, "SELECT count(*) FROM checkpoints c JOIN runs r ON r.id = c.run_id "
                                 "WHERE r.status = 'running'")[0][0]

        done = subprocess.run([str(RUNNER), str(toml), "--db", str(db)], capture_output=True, text=True, timeout=600)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("1 run(s) were cut off last time", done.stderr)
        if checkpointed:
            self.assertIn("resuming from the checkpoint at step", done.stderr)

        self.assertEqual(query(db, "PRAGMA integrity_check"), [("ok",)])
        runs = query(db, "SELECT id, status FROM runs ORDER BY cell_index")
        self.assertEqual(len(runs), 3)
        for run_id, status in runs:
            self.assertEqual(status, "done")
            steps = [s for (s,) in query(db, "SELECT step FROM steps WHERE run_id = ? AND split = 'train' ORDER BY step", run_id)]
            self.assertEqual(steps, list(range(1, STEPS + 1)))
            evals = [s for (s,) in query(db, "SELECT step FROM steps WHERE run_id = ? AND split = 'eval' ORDER BY step", run_id)]
            self.assertEqual(evals, list(range(0, STEPS + 1, EVAL_EVERY)))
            metric_steps = sorted({s for (s,) in query(db, "SELECT step FROM metrics WHERE run_id = ?", run_id)})
            self.assertEqual(metric_steps, evals)
            sample_steps = sorted({s for (s,) in query(db, "SELECT step FROM samples WHERE run_id = ?", run_id)})
            self.assertEqual(sample_steps, evals)
            checkpoints = query(db, "SELECT step, path FROM checkpoints WHERE run_id = ? ORDER BY step", run_id)
            self.assertEqual([s for s, _ in checkpoints], [STEPS - EVERY, STEPS])
            for _, path in checkpoints:
                self.assertTrue(os.path.exists(os.path.join(path, "trainable.safetensors")))
        # No temporary checkpoint folder survives a completed run.
        leftovers = [p for p in (self.dir / "results" / "checkpoints").rglob("*.tmp")]
        self.assertEqual(leftovers, [])

        # Resuming is exact: the same grid without interruption records the same losses, bit for bit.
        clean_toml = self.write("clean/grid.toml", experiment("killed"))
        clean_db = self.dir / "clean" / "results.db"
        clean = subprocess.run([str(RUNNER), str(clean_toml), "--db", str(clean_db)], capture_output=True, text=True,
                               timeout=600)
        self.assertEqual(clean.returncode, 0, clean.stderr)
        sql = ("SELECT r.cell_index, s.split, s.step, s.loss FROM steps s JOIN runs r ON r.id = s.run_id "
               "ORDER BY r.cell_index, s.split, s.step")
        self.assertEqual(query(db, sql), query(clean_db, sql))


if __name__ == "__main__":
    unittest.main()
