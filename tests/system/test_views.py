"""The ways researchers look at results, on a tiny grid (learning rate x seed): compare's CSV, JSON and Markdown
carry the database's numbers, filtered, sorted and summarised over seeds; curves are PNG and SVG with a line
per run; the HTML report and the `serve` pages load in headless Chromium with no console message and show every
run; a <script> planted in a sample output shows as text; serve listens on loopback only and reads the
database live; the progress has one plain line per log interval with the grid's share."""
import csv
import io
import json
import os
import re
import statistics
import subprocess
import time
import unittest
import urllib.request
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

from PIL import Image

from ablate_testing import RUNNER, TempDirTest, query, run, tiny_experiment

GRID = '[grid]\n"train.lr" = [1e-3, 3e-3]\n"experiment.seed" = [1, 2]\n'
PLANTED = '<script>document.body.setAttribute("data-pwned","1")</script><img src=x onerror="document.body.setAttribute(\'data-pwned\',\'2\')">'
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]  # the first four lines' colours
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever the environment says


def chromium(url, out_dir):
    """Loads `url` in headless Chromium; returns (DOM after load, console messages)."""
    p = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--enable-logging=stderr",
                        "--v=0", f"--user-data-dir={out_dir}", "--dump-dom", url], capture_output=True, text=True, timeout=180)
    console = [l for l in p.stderr.splitlines() if ":CONSOLE" in l]
    return p.stdout, console


class Dom(HTMLParser):
    """Text of every table cell and every attribute of the body, from Chromium's serialised DOM."""

    def __init__(self, text):
        super().__init__()
        self.cells, self.body_attrs, self._cell, self.text = [], {}, None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.body_attrs = dict(attrs)
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


class ViewsTest(TempDirTest):
    @classmethod
    def setUpClass(cls):
        cls.shared = ViewsTest("run")  # a TempDirTest for the grid every test reads
        cls.shared.setUp()
        cls.dir0 = cls.shared.dir
        cls.db = cls.dir0 / "r.db"
        cls.out = run([cls.shared.write("views.toml", tiny_experiment("views", steps=10, every=5, extra=GRID)), "--db", cls.db])
        assert cls.out.returncode == 0, cls.out.stderr
        cls.runs = [r for (r,) in query(cls.db, "SELECT id FROM runs ORDER BY id")]
        import sqlite3
        con = sqlite3.connect(cls.db)
        con.execute("UPDATE samples SET output = ? WHERE run_id = ? AND sample_id = 'val-0'", (PLANTED, cls.runs[0]))
        con.commit()
        con.close()

    @classmethod
    def tearDownClass(cls):
        cls.shared.tearDown()

    def compare(self, *args):
        out = run(["compare", "views", "--db", self.db, *args])
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout

    def final(self, run_id):
        loss = query(self.db, "SELECT loss FROM steps WHERE run_id = ? AND split = 'eval' ORDER BY step DESC LIMIT 1", run_id)[0][0]
        metrics = dict(query(self.db, "SELECT name, value FROM metrics WHERE run_id = ? AND step = "
                                      "(SELECT max(step) FROM metrics WHERE run_id = ?)", run_id, run_id))
        return loss, metrics

    def test_progress_lines(self):
        lines = [l for l in self.out.stderr.splitlines() if re.search(r"\] step \d+/10 ", l)]
        # log_every = 2, and an evaluation (every 5) closes the interval it falls in.
        steps = [int(re.search(r"step (\d+)/10", l).group(1)) for l in lines]
        self.assertEqual(steps, [2, 4, 5, 6, 8, 10] * 4, "one plain line per log interval")
        self.assertTrue(all("\r" not in l and re.search(r"loss \S+ .* samples/s .* eta \S+ +\| grid \d+% eta \S+$", l) for l in lines), lines[:3])
        self.assertTrue(lines[-1].split("| grid ")[1].startswith("100%"), lines[-1])
        # Each evaluation records its generation speed, and the eval line shows it.
        speeds = query(self.db, "SELECT gen_first_token_s, gen_tokens_per_s FROM steps WHERE split = 'eval'")
        self.assertEqual(len(speeds), 4 * 3)
        self.assertTrue(all(f > 0 and t > 0 for f, t in speeds), speeds)
        self.assertRegex(self.out.stderr, r"eval step 10: .*generation [\d.]+ ms to first token, \d+ tok/s\)")

    def test_compare_csv_json_markdown_equal_the_database(self):
        rows = list(csv.DictReader(io.StringIO(self.compare("--format", "csv"))))
        self.assertEqual([int(r["run"]) for r in rows], self.runs)
        for r in rows:
            loss, metrics = self.final(int(r["run"]))
            self.assertEqual(float(r["eval_loss"]), loss)
            for name in ("exact_match", "rouge_l"):
                self.assertEqual(float(r[name]), metrics[name])
            axes = json.loads(query(self.db, "SELECT axes FROM runs WHERE id = ?", int(r["run"]))[0][0])
            self.assertEqual(float(r["train.lr"]), axes["train.lr"])
        doc = json.loads(self.compare("--format", "json"))
        for r in doc["runs"]:
            loss, metrics = self.final(r["run"])
            self.assertEqual(r["eval_loss"], loss)
            self.assertEqual(r["rouge_l"], metrics["rouge_l"])
        md = self.compare("--format", "markdown").strip().splitlines()
        self.assertTrue(md[0].startswith("| run |") and set(md[1].replace("|", "").split()) == {"---"})
        self.assertEqual(len(md), 2 + 4)

    def test_compare_filters_sort_and_summary(self):
        rows = list(csv.DictReader(io.StringIO(self.compare("--format", "csv", "--where", "train.lr=0.001"))))
        self.assertEqual(len(rows), 2)
        self.assertTrue(all(r["train.lr"] == "0.001" for r in rows))
        self.assertEqual(list(csv.DictReader(io.StringIO(self.compare("--format", "csv", "--status", "failed")))), [])
        rows = list(csv.DictReader(io.StringIO(self.compare("--format", "csv", "--sort", "eval_loss", "--desc", "--metrics", "rouge_l"))))
        losses = [float(r["eval_loss"]) for r in rows]
        self.assertEqual(losses, sorted(losses, reverse=True))
        self.assertNotIn("exact_match", rows[0])
        cells = list(csv.DictReader(io.StringIO(self.compare("--summary", "--format", "csv"))))
        self.assertEqual(len(cells), 2, "two learning rates, each over two seeds")
        for c in cells:
            ids = [int(i) for i in c["runs"].split("+")]
            self.assertEqual(len(ids), 2)
            values = [self.final(i)[0] for i in ids]
            self.assertAlmostEqual(float(c["eval_loss_mean"]), statistics.mean(values), places=12)
            self.assertAlmostEqual(float(c["eval_loss_std"]), statistics.stdev(values), places=12)
        text = self.compare("--summary")
        self.assertIn("best cell by mean:", text)
        self.assertIn("eval_loss (lowest): train.lr=", text)
        for bad in (["--where", "nope=1"], ["--status", "finished"], ["--sort", "nope"], ["--format", "xml"], ["--metrics", "bleu"]):
            with self.subTest(bad):
                out = run(["compare", "views", "--db", self.db, *bad])
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)

    def test_curves_png_and_svg_one_line_per_run(self):
        folder = self.dir / "curves"
        out = run(["curves", "views", "--db", self.db, "-o", folder])
        self.assertEqual(out.returncode, 0, out.stderr)
        for stem in ("train_loss", "eval_loss", "exact_match", "rouge_l"):
            png = Image.open(folder / f"{stem}.png").convert("RGB")
            self.assertEqual(png.size, (760, 440))
            colours = {c for _, c in png.getcolors(maxcolors=1 << 20)}
            for c in PALETTE:
                self.assertIn(c, colours, f"{stem}: a line in {c} for each of the four runs")
            self.assertNotIn((148, 103, 189), colours, f"{stem}: no fifth line")
            root = ET.parse(folder / f"{stem}.svg").getroot()
            self.assertEqual(root.tag, "{http://www.w3.org/2000/svg}svg")
        # Labelled by the axes that differ: both of them here; the legend is drawn text, so check the chart model
        # through a subset where only the seed differs: no learning rate in the labels then.
        only = run(["curves", "views", "--db", self.db, "-o", self.dir / "one", "--where", "train.lr=0.001"])
        self.assertEqual(only.returncode, 0, only.stderr)
        self.assertIn("(2 lines)", only.stdout)

    def test_report_loads_in_chromium_and_escapes(self):
        html = self.dir / "report.html"
        out = run(["report", "views", "--db", self.db, "-o", html])
        self.assertEqual(out.returncode, 0, out.stderr)
        source = html.read_text()
        self.assertNotRegex(source, r"(src|href)=\"(https?:)?//", "self-contained: nothing from a network")
        self.assertFalse("<script" in source, "no script at all: the planted one is escaped")
        dom, console = chromium(html.as_uri(), self.dir / "chrome")
        self.assertEqual(console, [])
        self.check_page(dom)

    def check_page(self, dom):
        page = Dom(dom)
        self.assertNotIn("data-pwned", page.body_attrs, "the planted script did not run")
        self.assertIn(PLANTED, page.cells, "the planted output shows as text")
        for r in self.runs:
            self.assertIn(str(r), page.cells)
        self.assertGreaterEqual(dom.count("<img"), 4 + 1, "curves and sample images")

    def test_serve_loopback_live_and_chromium(self):
        proc = subprocess.Popen([str(RUNNER), "serve", str(self.db), "--port", "0", "--refresh", "0"], stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            self.assertTrue(m, line)
            port = int(m.group(1))
            # Listening on 127.0.0.1 alone (/proc/net/tcp: local address 0100007F, state 0A = LISTEN).
            with open("/proc/net/tcp") as f:
                listening = [l.split() for l in f.read().splitlines()[1:] if l.split()[1].endswith(f":{port:04X}")]
            self.assertEqual([(l[1].split(":")[0], l[3]) for l in listening], [("0100007F", "0A")])
            base = f"http://127.0.0.1:{port}"
            index = NO_PROXY.open(base + "/").read().decode()
            self.assertIn("/experiment/views", index)
            dom, console = chromium(base + "/experiment/views", self.dir / "chrome")
            self.assertEqual(console, [])
            self.check_page(dom)
            with self.assertRaises(urllib.error.HTTPError) as e:
                NO_PROXY.open(base + "/experiment/nope")
            self.assertEqual(e.exception.code, 404)
            # Live: an experiment recorded while serve runs shows at the next request.
            toml = self.write("later.toml", tiny_experiment("later", steps=2, every=2))
            self.assertEqual(run([toml, "--db", self.db]).returncode, 0)
            self.assertIn("/experiment/later", NO_PROXY.open(base + "/").read().decode())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stdout.close()
        self.assertEqual(proc.returncode, 0)


if __name__ == "__main__":
    unittest.main()
