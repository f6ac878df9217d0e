"""Dataset mixtures: [data] train / eval as an array of dataset tables. Training draws each sample's dataset
at random in proportion to the weights (deterministically, so a run is reproducible); evaluation takes every
dataset in turn, with sample ids "<name>/<id>" and metadata "dataset" for group_by. Real formats mix with
synthetic data, and a missing image is skipped or fatal per dataset (on_bad_sample)."""
import json
import os
import pathlib
import random
import subprocess
import sys
import time
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "make_datasets.py"
PLAIN_TRAIN = 'train = { plugin = "shapes", split = "train", size = 64, image_size = 16 }'
PLAIN_EVAL = 'eval = { plugin = "shapes", split = "val", size = 12, image_size = 16 }'


def mixed(name, train, evaluation=PLAIN_EVAL, steps=20, extra=""):
    return (tiny_experiment(name, steps=steps, every=10, extra=extra)
            .replace(PLAIN_TRAIN, train).replace(PLAIN_EVAL, evaluation).replace("samples = 3", 'samples = "all"'))


COLOR_COUNT = """train = [
  { plugin = "shapes", split = "train", size = 64, image_size = 16, tasks = ["color"], name = "color", weight = 3 },
  { plugin = "shapes", split = "train", size = 32, image_size = 16, tasks = ["count"], name = "count", weight = 1 },
]"""
EVAL_COLOR_COUNT = """eval = [
  { plugin = "shapes", split = "val", size = 6, image_size = 16, tasks = ["color"], name = "color" },
  { plugin = "shapes", split = "val", size = 4, image_size = 16, tasks = ["count"], name = "count" },
]"""


def train_losses(db):
    return [l for (l,) in query(db, "SELECT loss FROM steps WHERE split = 'train' ORDER BY step")]


class MixtureTest(TempDirTest):
    def test_weights_draws_and_per_dataset_evaluation(self):
        toml = self.write("mix.toml", mixed("mix", COLOR_COUNT, EVAL_COLOR_COUNT, extra='group_by = "dataset"\n'))
        db = self.dir / "mix.db"
        out = run([toml, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        (report,) = [json.loads(r) for (r,) in query(db, "SELECT data_report FROM runs")]
        train = report["train"]
        self.assertEqual(train["color"]["drawn"] + train["count"]["drawn"], 20 * 4, report)
        # 80 draws at 3:1: the binomial's mean is 60 and its standard deviation 3.9.
        self.assertTrue(48 <= train["color"]["drawn"] <= 72, report)
        self.assertEqual((train["color"]["samples"], train["count"]["samples"]), (64, 32))
        self.assertEqual((train["color"]["weight"], train["count"]["weight"]), (3.0, 1.0))

        # Every batch drew from both datasets in those proportions: the count questions appear in training.
        ids = [i for (i,) in query(db, "SELECT sample_id FROM samples WHERE step = 20 ORDER BY rowid")]
        self.assertEqual(ids, [f"color/val-{i}" for i in range(6)] + [f"count/val-{i}" for i in range(4)])
        metrics = dict(query(db, "SELECT name, value FROM metrics WHERE step = 20"))
        for name in ("exact_match", "exact_match[dataset=color]", "exact_match[dataset=count]"):
            self.assertIn(name, metrics)
        per_sample = dict(query(db, "SELECT sample_id, json_extract(scores, '$.exact_match') FROM samples WHERE step = 20"))
        color = [v for k, v in per_sample.items() if k.startswith("color/")]
        self.assertAlmostEqual(metrics["exact_match[dataset=color]"], sum(color) / len(color), places=12)

        # Reproducible: the same mixture in another database trains to the same losses, bit for bit.
        again = self.dir / "again.db"
        self.assertEqual(run([toml, "--db", again]).returncode, 0)
        self.assertEqual(train_losses(again), train_losses(db))

        # A mixture of one is the dataset itself: the same draws, the same losses.
        one = COLOR_COUNT.split("\n")[1].rstrip(",").replace(", weight = 3", "")
        single = self.write("one.toml", mixed("one", f"train = [\n{one}\n]"))
        table = self.write("table.toml", mixed("table", "train = " + one.strip().replace(', name = "color"', "")))
        for t, d in ((single, "one.db"), (table, "table.db")):
            self.assertEqual(run([t, "--db", self.dir / d]).returncode, 0)
        self.assertEqual(train_losses(self.dir / "one.db"), train_losses(self.dir / "table.db"))
        self.assertNotEqual(train_losses(self.dir / "one.db"), train_losses(db))

    def test_resume_after_sigkill_draws_the_same_batches(self):
        seed = int(os.environ.get("ABLATE_TEST_SEED", time.time_ns() % 100000))
        at = random.Random(seed).randint(5, 40)
        print(f"seed {seed}: SIGKILL after {at} train rows of 80")
        text = mixed("resume", COLOR_COUNT, EVAL_COLOR_COUNT, steps=80).replace("checkpoint_every = 10", "checkpoint_every = 3")
        clean, killed = self.dir / "clean.db", self.dir / "killed" / "k.db"
        self.assertEqual(run([self.write("clean.toml", text), "--db", clean]).returncode, 0)
        toml = self.write("killed/resume.toml", text)
        self.kill_after(toml, killed, at)
        done = run([toml, "--db", killed])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(train_losses(killed), train_losses(clean))

    def test_bad_mixtures_fail_with_file_and_line(self):
        cases = {
            "same name": (COLOR_COUNT.replace('name = "count"', 'name = "color"'), "names two datasets"),
            "same plugin, no names": (COLOR_COUNT.replace(', name = "color"', "").replace(', name = "count"', ""), "names two datasets"),
            "zero weight": (COLOR_COUNT.replace("weight = 3", "weight = 0"), "weight"),
            "empty": ("train = []", "empty mixture"),
            "slash in name": (COLOR_COUNT.replace('name = "color"', 'name = "a/b"'), "name"),
            "not tables": ('train = ["shapes"]', "not a table"),
        }
        for what, (train, needle) in cases.items():
            with self.subTest(what):
                toml = self.write("bad.toml", mixed("bad", train))
                out = run([toml, "--db", self.dir / "bad.db"])
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertRegex(out.stderr, r"bad\.toml:\d+:")
                self.assertIn(needle, out.stderr)
                self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
        self.assertFalse((self.dir / "bad.db").exists(), "nothing recorded")


class RealFormatsMixtureTest(TempDirTest):
    """The fixtures' COCO captions and VQA files (with missing and corrupt images) next to synthetic shapes."""

    def setUp(self):
        super().setUp()
        subprocess.run([sys.executable, str(FIXTURES), str(self.dir)], check=True, capture_output=True)
        self.cases = json.loads((self.dir / "cases.json").read_text())

    def table(self, case, name, on_bad_sample, weight=1):
        options = dict(self.cases["ok"][case]["options"], plugin=self.cases["ok"][case]["plugin"], name=name,
                       on_bad_sample=on_bad_sample, weight=weight)
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + " }"

    def experiment(self, on_bad_sample):
        shapes = '{ plugin = "shapes", split = "train", size = 64, image_size = 16, name = "shapes", weight = 2 }'
        train = f"train = [\n  {shapes},\n  {self.table('coco', 'coco', on_bad_sample)},\n  {self.table('vqa', 'vqa', on_bad_sample)},\n]"
        evaluation = f"eval = [\n  {self.table('coco', 'coco', on_bad_sample)},\n  {self.table('vqa', 'vqa', on_bad_sample)},\n]"
        return self.write(f"real-{on_bad_sample}.toml", mixed(f"real-{on_bad_sample}", train, evaluation, steps=6))

    def test_skip_reports_bad_images_and_trains_on_the_rest(self):
        db = self.dir / "skip.db"
        out = run([self.experiment("skip"), "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("skipping sample", out.stderr)
        self.assertEqual({s for (s,) in query(db, "SELECT status FROM runs")}, {"done"})
        (report,) = [json.loads(r) for (r,) in query(db, "SELECT data_report FROM runs")]
        self.assertEqual(set(report["train"]), {"shapes", "coco", "vqa"})
        self.assertEqual(sum(v["drawn"] for v in report["train"].values()), 6 * 4)
        self.assertEqual(report["train"]["vqa"]["target_3_or_more"], 6, "the vqa plugin's own report is kept")
        ids = {i for (i,) in query(db, "SELECT sample_id FROM samples")}
        self.assertTrue(any(i.startswith("coco/") for i in ids) and any(i.startswith("vqa/") for i in ids), ids)

    def test_fail_stops_naming_the_sample(self):
        out = run([self.experiment("fail"), "--db", self.dir / "fail.db"])
        self.assertNotEqual(out.returncode, 0, out.stderr)
        self.assertIn('on_bad_sample = \\"skip\\"', json.dumps(out.stderr))
        self.assertEqual(out.returncode, 2, out.stderr)
        (line,) = [l for l in out.stderr.splitlines() if l.startswith("runner:")]
        self.assertRegex(line, r"^runner: data\.(train|eval)\[\d\]: sample \S+: \S+images/missing\.jpg")


    def test_datasets_that_give_nothing_name_their_table(self):
        # Both used to name only "data.train": the message now starts at the experiment's line for the table.
        # (The shapes dataset beside the first gives the from-scratch backbone its vocabulary; it is hardly drawn.)
        (self.dir / "empty").mkdir()
        (self.dir / "none.json").write_text(json.dumps({"images": [], "annotations": []}))
        coco = dict(self.cases["ok"]["coco"]["options"], plugin="coco_captions", on_bad_sample="skip")
        shapes = '{ plugin = "shapes", split = "train", size = 8, image_size = 16, weight = 0.001 }'
        table = lambda options: "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + " }"
        for what, train, needle in (
                ("every image missing", f"train = [\n  {shapes},\n  {table(dict(coco, image_folder='empty'))},\n]",
                 r'data\.train\[1\]: no sample of the training set can be made \(each was skipped: on_bad_sample = "skip"\)$'),
                ("no samples", f"train = {table(dict(coco, file='none.json'))}", r"data\.train: the training set is empty$")):
            with self.subTest(what):
                toml = self.write("nothing.toml", mixed("nothing", train, steps=2))
                out = run([toml, "--db", self.dir / "nothing.db"])
                self.assertEqual(out.returncode, 2, out.stderr)
                (line,) = [l for l in out.stderr.splitlines() if l.startswith("runner:")]
                self.assertRegex(line, r"^runner: \S*nothing\.toml:\d+: " + needle)

if __name__ == "__main__":
    unittest.main()
