"""The frozen-encoder feature cache (issue 7 item 2): with the encoder frozen, each image is encoded once and its
features serve every epoch, every evaluation and every later cell with the same encoder; training computes what it
computes with the cache off; the cache goes to disk beyond its memory budget, and for a cell that does not use it;
an encoder whose output is not a function of the image alone (dropout) is refused without disturbing the run."""
import re
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

GRID = '[grid]\nstrategy = [["full"], ["projector", "head"], ["projector", { plugin = "lora", r = 4 }]]\n'


def losses(db):
    """(run, split, step) -> loss, and (run, step, sample) -> output."""
    steps = {(r, split, s): loss for r, split, s, loss in query(db, "SELECT run_id, split, step, loss FROM steps")}
    outputs = {(r, s, i): o for r, s, i, o in query(db, "SELECT run_id, step, sample_id, output FROM samples")}
    return steps, outputs


class FeatureCacheTest(TempDirTest):
    def run_ok(self, toml, db, *extra):
        done = run([toml, "--db", db, *extra])
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stderr

    def assert_same_training(self, db_a, db_b, exact=False):
        (steps_a, out_a), (steps_b, out_b) = losses(db_a), losses(db_b)
        self.assertEqual(steps_a.keys(), steps_b.keys())
        worst = max(abs(steps_a[k] - steps_b[k]) / abs(steps_b[k]) for k in steps_a)
        print(f"{len(steps_a)} losses, max relative difference {worst:.3g}")
        self.assertLessEqual(worst, 0.0 if exact else 1e-6)  # rounding only; the same on this machine
        self.assertEqual(out_a, out_b, "generated outputs")
        return worst

    def test_grid_encodes_each_image_once_and_trains_as_without(self):
        toml = self.write("grid.toml", tiny_experiment("cached", steps=24, every=12, extra=GRID, train_size=48))
        cached, plain = self.dir / "cached" / "results.db", self.dir / "plain" / "results.db"
        log = self.run_ok(toml, cached)
        self.run_ok(toml, plain, "--feature-cache", "off")
        self.assert_same_training(cached, plain)

        # Per cell: "full" trains the encoder (no cache); the second cell encodes the training and evaluation
        # sets; the third has the same frozen encoder and data and reuses both.
        cells = re.split(r"^\[cached \d/3[^\]]*\] run ", log, flags=re.M)[1:]
        self.assertEqual(len(cells), 3)
        self.assertNotIn("feature cache", cells[0])
        self.assertRegex(cells[1], r"feature cache: data\.train: 48 images x 5 x 16 Float, [0-9.]+ MiB on cpu, encoded in")
        self.assertRegex(cells[1], r"feature cache: data\.eval: 12 images x 5 x 16 Float, .* encoded in")
        self.assertRegex(cells[2], r"feature cache: data\.train: 48 images .* reused")
        self.assertRegex(cells[2], r"feature cache: data\.eval: 12 images .* reused")
        self.assertEqual(list(self.dir.glob("cached/feature-cache-*")), [], "nothing spilled, nothing left")

    def test_a_cell_without_the_cache_moves_the_tables_to_disk_for_later_cells(self):
        # projector+head builds; "full" trains the encoder and moves the tables to disk (their memory is its
        # own); the third cell, with the first's encoder, finds them there and brings them back into memory.
        grid = '[grid]\nstrategy = [["projector", "head"], ["full"], ["projector", { plugin = "lora", r = 4 }]]\n'
        toml = self.write("order.toml", tiny_experiment("order", steps=24, every=12, extra=grid, train_size=48))
        cached, plain = self.dir / "cached" / "results.db", self.dir / "plain" / "results.db"
        log = self.run_ok(toml, cached)
        cells = re.split(r"^\[order \d/3[^\]]*\] run ", log, flags=re.M)[1:]
        self.assertEqual(len(cells), 3)
        self.assertRegex(cells[0], r"feature cache: data\.train: 48 images .* encoded in")
        self.assertIn("feature cache: 2 table(s) moved to disk for this cell, kept for later cells", cells[1])
        self.assertNotIn("encoded in", cells[1])
        self.assertRegex(cells[2], r"feature cache: data\.train: 48 images x 5 x 16 Float, [0-9.]+ MiB on cpu, reused")
        self.assertRegex(cells[2], r"feature cache: data\.eval: 12 images .* on cpu, reused")
        self.assertNotIn("encoded in", cells[2])
        self.assertEqual(list(self.dir.glob("cached/feature-cache-*/*")), [], "nothing left on disk")
        self.run_ok(toml, plain, "--feature-cache", "off")
        self.assert_same_training(cached, plain)

    def test_encoder_options_are_part_of_the_key(self):
        # The same weights, another feature layer: the second cell must encode anew, not reuse the first's table.
        grid = '[grid]\n"model.encoder.feature_layer" = [-1, -2]\n'
        toml = self.write("layers.toml", tiny_experiment("layers", steps=24, every=12, extra=grid, train_size=48,
                                                         strategy='["projector", "head"]'))
        cached, plain = self.dir / "cached" / "results.db", self.dir / "plain" / "results.db"
        log = self.run_ok(toml, cached)
        self.assertEqual(len(re.findall(r"feature cache: data\.train: 48 images .* encoded in", log)), 2, log)
        self.assertNotIn("reused", log)
        self.run_ok(toml, plain, "--feature-cache", "off")
        self.assert_same_training(cached, plain)

    def test_auto_leaves_short_runs_alone_and_on_forces(self):
        # 4 steps of 4 samples draw 16 of 64 images: encoding all 64 first would cost more than it saves.
        toml = self.write("short.toml", tiny_experiment("short", steps=4, every=4, strategy='["projector", "head"]'))
        log = self.run_ok(toml, self.dir / "auto" / "results.db")
        self.assertNotIn("feature cache: data.train", log)
        self.assertIn("feature cache: data.eval: 12 images", log)
        log = self.run_ok(toml, self.dir / "on" / "results.db", "--feature-cache", "on")
        self.assertIn("feature cache: data.train: 64 images", log)
        self.assert_same_training(self.dir / "auto" / "results.db", self.dir / "on" / "results.db")

    def test_spills_to_disk_beyond_the_budget(self):
        toml = self.write("disk.toml", tiny_experiment("disk", steps=24, every=12, strategy='["projector", "head"]',
                                                       train_size=48))
        log = self.run_ok(toml, self.dir / "disk" / "results.db", "--feature-cache-gib", "0")
        self.assertRegex(log, r"feature cache: data\.train: 48 images x 5 x 16 Float, [0-9.]+ MiB on disk")
        self.assertRegex(log, r"feature cache: data\.eval: 12 images .* on disk")
        self.run_ok(toml, self.dir / "memory" / "results.db")
        self.assert_same_training(self.dir / "disk" / "results.db", self.dir / "memory" / "results.db")
        self.assertEqual(list(self.dir.glob("disk/feature-cache-*")), [], "the spilled files are removed at exit")

    def test_encoder_with_dropout_is_not_cached_and_the_run_is_undisturbed(self):
        text = tiny_experiment("dropout", steps=24, every=12, strategy='["projector", "head"]', train_size=48)
        text = text.replace("num_attention_heads = 2 }", "num_attention_heads = 2, attention_dropout = 0.5 }", 1)
        self.assertIn("attention_dropout = 0.5", text)
        toml = self.write("dropout.toml", text)
        log = self.run_ok(toml, self.dir / "auto" / "results.db")
        self.assertIn("feature cache: not used: the encoder is not deterministic: its output differs between two "
                      "passes over the same images (dropout?)", log)
        self.assertNotIn("encoded in", log)
        self.run_ok(toml, self.dir / "off" / "results.db", "--feature-cache", "off")
        # The check drew dropout masks; the run's generators were put back, so it trains exactly as without it.
        self.assert_same_training(self.dir / "auto" / "results.db", self.dir / "off" / "results.db", exact=True)

    def test_bad_mode_is_one_line_and_records_nothing(self):
        self.assert_bad_option("--feature-cache", "maybe", "runner: --feature-cache maybe: expected auto, on or off")


if __name__ == "__main__":
    unittest.main()
