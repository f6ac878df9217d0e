"""runner ensemble: each sample's answer is the one most runs gave (compared trimmed, whitespace-collapsed and
lowercased), a tie going to the earliest run listed; scored with the first run's metrics and stored as a run
of its own that compare lists and replay shows."""
import json
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

GRID = '[grid]\n"train.lr" = [3e-3, 1e-2, 5e-3]\n'


def vote(answers):
    """The stated rule, written out: most votes; a tie to the earliest run; that run's spelling."""
    keys = [" ".join(a.split()).lower() for a in answers]
    counts = {k: keys.count(k) for k in keys}
    best = max(counts.values())
    return next(a for a, k in zip(answers, keys) if counts[k] == best)


class EnsembleTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.db = self.dir / "e.db"
        toml = self.write("ens.toml", tiny_experiment("ens", steps=60, every=60, extra=GRID).replace("samples = 3", 'samples = "all"'))
        out = run([toml, "--db", self.db])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.runs = [r for (r,) in query(self.db, "SELECT id FROM runs ORDER BY id")]
        self.assertEqual(len(self.runs), 3)

    def outputs(self, run_id):
        return dict(query(self.db, "SELECT sample_id, output FROM samples WHERE run_id = ? AND step = "
                                   "(SELECT max(step) FROM samples WHERE run_id = ?)", run_id, run_id))

    def ensemble(self, *runs):
        out = run(["ensemble", *map(str, runs), "--db", self.db])
        self.assertEqual(out.returncode, 0, out.stderr)
        (ens,) = [r for (r,) in query(self.db, "SELECT id FROM runs WHERE label = ?", "ensemble of runs " + ", ".join(map(str, runs)))]
        return ens, out.stdout

    def test_majority_vote_is_scored_and_stored(self):
        members = [self.outputs(r) for r in self.runs]
        self.assertEqual(len(members[0]), 12, "samples = \"all\" stores every eval sample")
        ens, shown = self.ensemble(*self.runs)
        self.assertIn("on the 12 samples", shown)
        stored = dict(query(self.db, "SELECT sample_id, output FROM samples WHERE run_id = ?", ens))
        expected = {i: vote([m[i] for m in members]) for i in members[0]}
        self.assertEqual(stored, expected)
        # Not a copy of one member: the vote differs from each of them somewhere, on this grid.
        self.assertTrue(all(any(stored[i] != m[i] for i in stored) for m in members), "the vote is a real mix")

        # Scored with the first run's metrics: exact_match (lowercase = true) from the voted answers.
        refs = {i: json.loads(r) for i, r in query(self.db, "SELECT sample_id, refs FROM samples WHERE run_id = ?", ens)}
        em = sum(any(stored[i].strip().lower() == r.strip().lower() for r in refs[i]) for i in stored) / len(stored)
        metrics = dict(query(self.db, "SELECT name, value FROM metrics WHERE run_id = ?", ens))
        self.assertAlmostEqual(metrics["exact_match"], em, places=12)
        self.assertIn("rouge_l", metrics)
        per_sample = [s for (s,) in query(self.db, "SELECT json_extract(scores, '$.exact_match') FROM samples WHERE run_id = ?", ens)]
        self.assertAlmostEqual(sum(per_sample) / len(per_sample), em, places=12)
        (stage, parent, status, axes) = query(self.db, "SELECT stage_name, parent_run_id, status, axes FROM runs WHERE id = ?", ens)[0]
        self.assertEqual((stage, parent, status), ("ensemble", self.runs[0], "done"))
        self.assertEqual(json.loads(axes), {"ensemble": "+".join(map(str, self.runs))})
        votes = json.loads(query(self.db, "SELECT decoding FROM samples WHERE run_id = ? LIMIT 1", ens)[0][0])
        self.assertEqual(votes["ensemble"], self.runs)
        self.assertEqual(sum(votes["votes"].values()), 3)

        # The same ensemble again is found, not stored twice; compare lists it, replay shows it beside the runs.
        _, again = self.ensemble(*self.runs)
        self.assertIn(f"already stored as run {ens}", again)
        self.assertEqual(len(query(self.db, "SELECT id FROM runs")), 4)
        table = run(["compare", "ens", "--db", self.db])
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("+".join(map(str, self.runs)), table.stdout)
        self.assertIn(f"{metrics['exact_match']:.4f}", table.stdout)
        side = run(["replay", *map(str, self.runs), str(ens), "--db", self.db])
        self.assertEqual(side.returncode, 0, side.stderr)
        self.assertIn(f"run {ens} of ens [ensemble of runs", side.stdout)

    def test_ties_go_to_the_earliest_run_listed(self):
        # Two runs: every disagreement is a tie, so the vote is the first run's answers, whichever order.
        a, b = self.runs[1], self.runs[2]
        ours, theirs = self.outputs(a), self.outputs(b)
        self.assertTrue(any(" ".join(ours[i].split()).lower() != " ".join(theirs[i].split()).lower() for i in ours),
                        "the two runs disagree somewhere, so ties happen")
        for first, second in ((a, b), (b, a)):
            ens, _ = self.ensemble(first, second)
            stored = dict(query(self.db, "SELECT sample_id, output FROM samples WHERE run_id = ?", ens))
            self.assertEqual(stored, self.outputs(first))

    def test_bad_input(self):
        for args, needle in [
            ([str(self.runs[0])], "at least two runs"),
            ([str(self.runs[0]), "99"], "no run 99"),
            ([str(self.runs[0]), str(self.runs[0])], "listed twice"),
        ]:
            with self.subTest(args):
                out = run(["ensemble", *args, "--db", self.db])
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertIn(needle, out.stderr)
                self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
        self.assertEqual(len(query(self.db, "SELECT id FROM runs")), 3, "nothing stored")
        # Runs that evaluated different data share no sample: refused.
        other = self.write("other.toml", tiny_experiment("other", steps=2, every=2).replace('split = "val", size = 12', 'split = "train", size = 5'))
        self.assertEqual(run([other, "--db", self.db]).returncode, 0)
        (other_run,) = [r for (r,) in query(self.db, "SELECT id FROM runs WHERE id > 3")]
        out = run(["ensemble", str(self.runs[0]), str(other_run), "--db", self.db])
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn("no sample in common", out.stderr)


if __name__ == "__main__":
    unittest.main()
