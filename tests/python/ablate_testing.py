"""Shared by the Python system and parity tests: where the build is, how to run the runner, a tiny experiment.

The tests run under CTest (see tests/CMakeLists.txt), which sets ABLATE_BUILD_DIR and ABLATE_SOURCE_DIR.
"""
import os
import pathlib
import signal
import sqlite3
import subprocess
import tempfile
import time
import unittest

BUILD = pathlib.Path(os.environ.get("ABLATE_BUILD_DIR", pathlib.Path(__file__).resolve().parents[2] / "build"))
SOURCE = pathlib.Path(os.environ.get("ABLATE_SOURCE_DIR", pathlib.Path(__file__).resolve().parents[2]))
RUNNER = BUILD / "bin" / "runner"
PROBE = BUILD / "bin" / "component_probe"
TEST_PLUGINS = BUILD / "test-plugins"


def tiny_experiment(name, steps=8, every=4, extra="", strategy='["full"]', train_size=64, seed=3):
    """The same tiny from-scratch experiment as the C++ tests' helper, as TOML text."""
    return f"""strategy = {strategy}

[experiment]
name = "{name}"
seed = {seed}

[model]
layout = "prefix"
encoder = {{ plugin = "clip_vit", config = {{ image_size = 16, patch_size = 8, hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2 }} }}
projector = {{ plugin = "git" }}
backbone = {{ plugin = "opt", config = {{ hidden_size = 16, ffn_dim = 32, num_hidden_layers = 1, num_attention_heads = 2, max_position_embeddings = 64, dropout = 0.0, tie_word_embeddings = false }} }}

[data]
train = {{ plugin = "shapes", split = "train", size = {train_size}, image_size = 16 }}
eval = {{ plugin = "shapes", split = "val", size = 12, image_size = 16 }}

[train]
steps = {steps}
batch_size = 4
lr = 1e-3
checkpoint_every = {every}
log_every = 2

[eval]
every = {every}
samples = 3
batch_size = 6
generate = {{ max_new_tokens = 4 }}
metrics = ["exact_match", "rouge_l"]
{extra}"""


def run(args, cwd=None, env=None, timeout=600, runner=RUNNER):
    """Runs the runner; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(runner), *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def query(db, sql, *params):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


class TempDirTest(unittest.TestCase):
    """A test case with a fresh temporary folder in self.dir."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="ablate-")
        self.dir = pathlib.Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()

    def assert_bad_option(self, option, value, message):
        """A run with `option value` exits 2 with the one line `message` and creates no database."""
        toml = self.write("bad.toml", tiny_experiment("bad"))
        db = self.dir / "bad" / "results.db"
        out = run([toml, "--db", db, option, value])
        self.assertEqual(out.returncode, 2)
        self.assertEqual(out.stderr.strip().splitlines(), [message])
        self.assertFalse(db.exists())

    def write(self, name, text):
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def kill_after(self, toml, db, rows):
        """Starts the runner on `toml` and SIGKILLs it once `rows` train steps are recorded; returns its stderr."""
        log = self.dir / f"kill-{rows}.log"  # a file, not a pipe: a full pipe would stall the runner
        with open(log, "w") as err:
            proc = subprocess.Popen([str(RUNNER), str(toml), "--db", str(db)], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if query(db, "SELECT count(*) FROM steps WHERE split = 'train'")[0][0] >= rows:
                    break
            except Exception:  # the database may not exist or be mid-creation
                pass
            time.sleep(0.005)
        self.assertIsNone(proc.poll(), "the runner finished before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return log.read_text()
