"""Decoding sweeps: grid axes under eval.generate / eval.postprocess evaluate the final checkpoint of one training
run, once per setting, without retraining; `runner replay` shows the settings' outputs side by side."""
import json
import re
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

SWEEP = """
[grid]
"eval.generate" = [
  { max_new_tokens = 4 },
  { max_new_tokens = 2 },
  { max_new_tokens = 4, do_sample = true, temperature = 0.7, top_p = 0.9 },
  { max_new_tokens = 4, do_sample = true, top_k = 3 },
]
"""


class DecodingSweepTest(TempDirTest):
    def test_sweep_over_a_finished_run_trains_nothing_and_replays_side_by_side(self):
        db = self.dir / "r.db"
        # First the experiment as it was: one training run.
        plain = self.write("exp.toml", tiny_experiment("sweep", steps=10, every=5))
        out = run([plain, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        (train_id,) = [r for (r,) in query(db, "SELECT id FROM runs")]
        train_rows = query(db, "SELECT count(*) FROM steps WHERE split = 'train'")[0][0]
        self.assertEqual(train_rows, 10)

        # Then four decoding settings: the training run is reused, four decode-only runs evaluate its checkpoint.
        sweep = self.write("exp.toml", tiny_experiment("sweep", steps=10, every=5, extra=SWEEP))
        out = run([sweep, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(f"done already (run {train_id})", out.stderr)
        self.assertEqual(query(db, "SELECT count(*) FROM steps WHERE split = 'train'")[0][0], train_rows, "nothing retrained")
        decode = query(db, "SELECT id, parent_run_id, stage_name, status FROM runs WHERE id != ? ORDER BY cell_index", train_id)
        self.assertEqual(len(decode), 4)
        self.assertTrue(all(p == train_id and n == "decode" and s == "done" for _, p, n, s in decode), decode)
        settings = set()
        for run_id, *_ in decode:
            rows = query(db, "SELECT DISTINCT step, decoding FROM samples WHERE run_id = ?", run_id)
            self.assertEqual(len(rows), 1)
            self.assertEqual(rows[0][0], 10, "evaluated at the training run's final step")
            settings.add(rows[0][1])
            self.assertGreater(query(db, "SELECT count(*) FROM metrics WHERE run_id = ?", run_id)[0][0], 0)
        self.assertEqual(len(settings), 4, "four sample sets, one per setting")
        two = [json.loads(d) for d in settings if json.loads(d)["max_new_tokens"] == 2]
        self.assertEqual(len(two), 1)
        short = query(db, "SELECT output FROM samples s JOIN runs r ON r.id = s.run_id WHERE r.cell_index = 1")
        self.assertTrue(all(len(o.split()) <= 2 for (o,) in short), short)

        # Side by side: each sample once, with four outputs under it.
        ids = [str(r) for r, *_ in decode]
        shown = run(["replay", *ids, "--db", db])
        self.assertEqual(shown.returncode, 0, shown.stderr)
        for r in ids:
            self.assertIn(f"run {r} of sweep", shown.stdout)
        blocks = [b for b in shown.stdout.split("\n\n")[1:] if b.strip()]
        self.assertEqual(len(blocks), 3, "the three stored samples")
        for b in blocks:
            self.assertEqual(len(re.findall(r"^  run \d+:", b, re.M)), 4, b)

        # Running again does nothing; compare lists the four settings.
        again = run([sweep, "--db", db])
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(len(query(db, "SELECT id FROM runs")), 5)
        table = run(["compare", "sweep", "--db", db])
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("eval.generate", table.stdout)
        self.assertEqual(table.stdout.count(" done "), 4)

    def test_postprocess_is_recorded_with_the_raw_output(self):
        db = self.dir / "r.db"
        text = tiny_experiment("post", steps=4, every=4, extra='[grid]\n"eval.postprocess" = [[], ["lowercase", "first_line"]]\n')
        out = run([self.write("p.toml", text), "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        decodings = {json.loads(d).get("postprocess", None).__repr__() for (d,) in query(db, "SELECT DISTINCT decoding FROM samples")}
        self.assertIn("['lowercase', 'first_line']", decodings)
        bad = run([self.write("b.toml", text.replace('"first_line"]', '"title_case"]')), "--db", self.dir / "b.db"])
        self.assertEqual(bad.returncode, 2)
        self.assertIn("title_case", bad.stderr)



DECODINGS = """
[grid]
"eval.generate" = [{ max_new_tokens = 9 }, { max_new_tokens = 9, do_sample = true, top_k = 3 }]
"""


class DecodeGraphTest(TempDirTest):
    """--decode-graph on decodes over a KV cache sized for the whole generation, the tensors a CUDA graph
    replays; on the CPU its steps run eagerly, and must generate what the growing cache does."""

    def generations(self, mode):
        # Every generation stored; batches of 5 of 12: an evaluation's second batch decodes over the cache of its
        # first, the third (2 rows) gets its own.
        text = tiny_experiment("graph", steps=6, every=3, extra=DECODINGS).replace("samples = 3", 'samples = "all"')
        text = text.replace("batch_size = 6", "batch_size = 5")
        toml = self.write("exp.toml", text)
        db = self.dir / f"{mode}.db"
        out = run([toml, "--db", db, "--decode-graph", mode])
        self.assertEqual(out.returncode, 0, out.stderr)
        samples = query(db, "SELECT r.cell_index, s.step, s.sample_id, s.output FROM samples s "
                            "JOIN runs r ON r.id = s.run_id ORDER BY 1, 2, 3")
        metrics = query(db, "SELECT r.cell_index, m.step, m.name, m.value FROM metrics m "
                            "JOIN runs r ON r.id = m.run_id ORDER BY 1, 2, 3")
        return out.stderr, samples, metrics

    def test_fixed_size_steps_generate_what_growing_ones_do(self):
        growing_log, growing, growing_metrics = self.generations("off")
        fixed_log, fixed, fixed_metrics = self.generations("on")
        self.assertNotIn("decode steps", growing_log)
        self.assertIn("decode steps: fixed-size KV cache", fixed_log)
        # Greedy and sampled (the same seeded draws), at every evaluation of both cells.
        self.assertEqual({c for c, *_ in growing}, {0, 1}, growing)
        self.assertGreater(len({o for *_, o in growing if len(o.split()) > 2}), 6, growing)
        self.assertEqual(fixed, growing)
        self.assertEqual(fixed_metrics, growing_metrics)

    def test_bad_mode_is_one_line_and_records_nothing(self):
        self.assert_bad_option("--decode-graph", "sometimes", "runner: --decode-graph sometimes: expected auto, on or off")


if __name__ == "__main__":
    unittest.main()
