"""The runner as a user meets it: bad input gets one line naming the file and the problem, exit status 2, and
the database untouched; plugin failures and divergence mark one run and the grid goes on; interrupting resumes;
one runner per database; outputs are escaped when shown."""
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import unittest

from PIL import Image

from ablate_testing import RUNNER, SOURCE, TEST_PLUGINS, TempDirTest, query, run, tiny_experiment


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


class BadInputTest(TempDirTest):
    """Each case: exit 2, a single line on stderr that names the file, and no change to the database."""

    def setUp(self):
        super().setUp()
        self.db = self.dir / "results.db"
        good = self.write("good.toml", tiny_experiment("good", steps=2, every=2))
        done = run([good, "--db", self.db])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.before = digest(self.db)

    def expect_bad(self, args, *fragments, env=None):
        out = run([*args, "--db", self.db], env=env)
        self.assertEqual(out.returncode, 2, out.stderr)
        lines = [l for l in out.stderr.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, out.stderr)
        self.assertTrue(lines[0].startswith("runner: "), lines[0])
        for f in fragments:
            self.assertIn(f, lines[0])
        self.assertEqual(digest(self.db), self.before, "the database changed")
        self.assertFalse(self.db.with_name(self.db.name + "-wal").exists())
        return lines[0]

    def experiment(self, name, before, after):
        text = tiny_experiment("bad")
        self.assertIn(before, text)
        return self.write(name, text.replace(before, after))

    def test_toml_syntax_error(self):
        f = self.experiment("syntax.toml", "[train]", "[train")
        self.expect_bad([f], "syntax.toml:")

    def test_unknown_key(self):
        f = self.experiment("key.toml", "batch_size = 4", "batch_size = 4\nbatch = 8")
        line = self.expect_bad([f], "key.toml:", "train.batch: unknown key")
        self.assertRegex(line, r"key\.toml:\d+: train\.batch")

    def test_bad_value(self):
        f = self.experiment("value.toml", "steps = 8", 'steps = "many"')
        self.expect_bad([f], "value.toml:", "train.steps: expected an integer, got a string")

    def test_unknown_plugin(self):
        f = self.experiment("plugin.toml", 'plugin = "git"', 'plugin = "gitt"')
        self.expect_bad([f], "plugin.toml:", "no projector plugin 'gitt'")

    def test_missing_experiment_file(self):
        self.expect_bad([self.dir / "nowhere.toml"], "nowhere.toml: cannot open experiment")

    def expect_bad_once_running(self, args, db, *fragments):
        """Bad input found once a run has started (a component built, samples encoded): progress lines come
        first, the error is the last line, exit 2."""
        out = run([*args, "--db", db], timeout=120)
        self.assertEqual(out.returncode, 2, out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("runner: "), last)
        for f in fragments:
            self.assertIn(f, last)
        return last

    @staticmethod
    def with_weights(text, part, folder):
        """Experiment text whose `part` (backbone: opt, encoder: clip_vit) reads its weights from `folder`."""
        plugin = {"backbone": "opt", "encoder": "clip_vit"}[part]
        return "\n".join((f'{part} = {{ plugin = "{plugin}", weights = "{folder}" }}' if l.startswith(f"{part} =") else l)
                         for l in text.splitlines())

    def weights_experiment(self, name):
        return self.write(name, self.with_weights(tiny_experiment("bad"), "backbone", "w"))

    def test_empty_weights_path(self):
        # Read as "no weights", it used to build a default-sized OPT (125m) from scratch.
        f = self.write("empty.toml", self.with_weights(tiny_experiment("bad"), "backbone", ""))
        self.expect_bad([f], "empty.toml:", "model.backbone.weights: an empty path")

    def test_malformed_config_json_in_weights(self):
        (self.dir / "w").mkdir()
        (self.dir / "w" / "config.json").write_text('{"hidden_size": ')
        self.expect_bad([self.weights_experiment("weights.toml")], "config.json: malformed JSON at byte")

    def test_corrupt_safetensors_in_weights(self):
        (self.dir / "w").mkdir()
        (self.dir / "w" / "config.json").write_text("{}")
        (self.dir / "w" / "model.safetensors").write_bytes(b"\xff" * 16)
        self.expect_bad([self.weights_experiment("st.toml")], "model.safetensors: header length")

    def test_tokenizer_ids_the_backbone_has_no_row_for(self):
        # An exported backbone (config.json, model.safetensors, tokenizer.json) whose tokenizer.json is edited: a
        # negative id is refused when read (tokenizers refuses it too: ids are u32); an id past config.json's
        # vocab_size is named with the sample and the token, where torch would stop with an indexing error.
        extra = '\n[export]\nbackbone = "export"\n'
        done = run([self.write("export.toml", tiny_experiment("export", steps=2, every=2, extra=extra)),
                    "--db", self.dir / "export.db"])
        self.assertEqual(done.returncode, 0, done.stderr)
        folder = self.dir / "export"
        vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
        original = json.loads((folder / "tokenizer.json").read_text())
        self.assertIn("</s>", original["model"]["vocab"])
        toml = self.write("weights.toml", self.with_weights(tiny_experiment("bad"), "backbone", "export"))
        for token, eos, message in (
                ("</s>", -4, 'tokenizer.json: model.vocab["</s>"]: id must be an integer from 0 to 4294967295, got -4'),
                ("</s>", vocab_size + 7, f"export: sample 'val-0': the tokenizer gives '</s>' id {vocab_size + 7}, "
                                         f"past the backbone's vocab_size {vocab_size}"),
                ("<pad>", vocab_size + 2, f"export: the padding token '<pad>' has id {vocab_size + 2}, past the "
                                          f"backbone's vocab_size {vocab_size}")):
            with self.subTest(token=token, id=eos):
                edited = json.loads(json.dumps(original))
                edited["model"]["vocab"][token] = eos
                (folder / "tokenizer.json").write_text(json.dumps(edited))
                # Found once the run has started (the backbone is built, then the samples encoded): the progress
                # lines come first, the error is the last line, and the run is kept as failed with the reason.
                db = self.dir / f"tok{token[1:-1]}{eos}.db"
                self.expect_bad_once_running([toml], db, message)
                self.assertEqual(query(db, "SELECT status FROM runs"), [("failed",)])
                self.assertIn(message, query(db, "SELECT error FROM runs")[0][0])
        # A value of the wrong type is named by its place in the file (nlohmann's JSON_DIAGNOSTICS).
        edited = json.loads(json.dumps(original))
        edited["added_tokens"][0]["special"] = "yes"
        (folder / "tokenizer.json").write_text(json.dumps(edited))
        self.expect_bad_once_running([toml], self.dir / "tok-type.db",
                                     "tokenizer.json: added_tokens/0/special: type must be boolean, but is string")
        # The inline layout's "<image>" is replaced by the image before the embedding, so its id may lie past
        # vocab_size (transformers' LLaVA zeroes such ids before embedding): an added token the vocab lacks.
        edited = json.loads(json.dumps(original))
        edited["added_tokens"].append({"id": vocab_size + 3, "content": "<image>", "special": True})
        (folder / "tokenizer.json").write_text(json.dumps(edited))
        Image.new("RGB", (20, 20), (200, 30, 30)).save(self.dir / "red.png")
        (self.dir / "llava.json").write_text(json.dumps([
            {"id": f"s{k}", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                                  {"from": "gpt", "value": "red"}]} for k in range(6)]))
        inline = tiny_experiment("inline", steps=2, every=2).replace('layout = "prefix"', 'layout = "inline"')
        llava = '{ plugin = "llava_json", file = "llava.json", image_folder = "." }'
        inline = re.sub(r"^(train|eval) = .*$", lambda m: f"{m.group(1)} = {llava}", inline, flags=re.M)
        out = run([self.write("inline.toml", self.with_weights(inline, "backbone", "export")), "--db", self.dir / "inline.db"])
        self.assertEqual(out.returncode, 0, out.stderr)
        # tokenizer_config.json's special tokens: transformers refuses other types, and adds a name the vocabulary
        # lacks as a new token whose embedding row was never trained. Both used to mean "no such token", silently.
        (folder / "tokenizer.json").write_text(json.dumps(original))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for key, value, message in (("pad_token", 0, "tokenizer_config.json: pad_token: expected a token (a string or "
                                                      '{"content": ...}) or null, got 0'),
                                    ("eos_token", "<end>", "tokenizer_config.json: eos_token: '<end>' is not a token of ")):
            with self.subTest(key):
                (folder / "tokenizer_config.json").write_text(json.dumps({**config, key: value}))
                self.expect_bad_once_running([toml], self.dir / f"tc-{key}.db", message)

    def test_preprocessor_config_values(self):
        # An exported encoder's preprocessor_config.json, edited: values transformers' image processors refuse, and
        # a wrong type, each named with the file (they used to fail the run with a JSON library message, exit 1).
        done = run([self.write("enc.toml", tiny_experiment("enc", steps=2, every=2, extra='\n[export]\nencoder = "enc"\n')),
                    "--db", self.dir / "enc.db"])
        self.assertEqual(done.returncode, 0, done.stderr)
        config_file = self.dir / "enc" / "preprocessor_config.json"
        original = json.loads(config_file.read_text())
        side = json.loads((self.dir / "enc" / "config.json").read_text())["image_size"]
        toml = self.write("pre.toml", self.with_weights(tiny_experiment("pre", steps=2, every=2), "encoder", "enc"))
        for key, value, message in (("crop_size", {"height": 0, "width": 0}, "height: expected an image side from 1 to 65536 pixels"),
                                    ("image_mean", [0.5, 0.5], "image_mean: expected three numbers (R, G, B), got [0.5,0.5]"),
                                    ("resample", 99, "resample: expected one of Pillow's filters 0 to 5, got 99"),
                                    # The value's key, from nlohmann's JSON_DIAGNOSTICS.
                                    ("rescale_factor", "1/255", "preprocessor_config.json: rescale_factor: type must be number, but is string"),
                                    # Used to give NaN pixels, then a NaN loss.
                                    ("image_std", [0.5, 0, 0.5], "image_std: a channel's deviation of 0 divides by zero"),
                                    # Used to fail at the forward pass (exit 1): the position embeddings have one row
                                    # per patch of an image_size square.
                                    ("crop_size", {"height": side + 8, "width": side + 8},
                                     f"images of {side + 8} x {side + 8} pixels, but the encoder takes {side} x {side}"),
                                    ("do_center_crop", False, "do_center_crop is false, so images would keep their aspect ratio"),
                                    # transformers takes any truthy value; a string here is a mistake, not "true".
                                    ("do_normalize", "false", 'do_normalize: expected true or false, got "false"'),
                                    ("do_resize", False, "do_resize is false, but images of every size must become the encoder's")):
            with self.subTest(key):
                config_file.write_text(json.dumps({**original, key: value}))
                self.expect_bad_once_running([toml], self.dir / f"pre-{key}.db", "preprocessor_config.json: ", message)

    def test_dataset_files_that_cannot_be_read_as_such(self):
        # A number past a double's range (nlohmann throws out_of_range, not parse_error), and an image that is a
        # link to /dev/zero (read to the end, it took all memory). Found once the run starts: the last line counts.
        Image.new("RGB", (20, 20), (30, 30, 200)).save(self.dir / "blue.png")
        os.symlink("/dev/zero", self.dir / "zero.png")
        turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]
        (self.dir / "big.json").write_text('[{"id": 1e400, "image": "blue.png", "conversations": ' + json.dumps(turns) + "}]")
        (self.dir / "zero.json").write_text(json.dumps([{"id": "z", "image": "zero.png", "conversations": turns}]))
        # A NUL in an image's name: the message used to stop at it.
        (self.dir / "nul.json").write_text(json.dumps([{"id": "n", "image": "blue\u0000.png", "conversations": turns}]))
        for name, message in (("big", "big.json: number overflow parsing '1e400'"), ("zero", "sample z: "),
                              ("nul", "nul.json:1:23: [0].image: 'blue\\0.png': an image name with a NUL character")):
            with self.subTest(name):
                text = re.sub(r"^eval = .*$", f'eval = {{ plugin = "llava_json", file = "{name}.json", image_folder = "." }}',
                              tiny_experiment(name, steps=2, every=2), flags=re.M)
                last = self.expect_bad_once_running([self.write(f"{name}.toml", text)], self.dir / f"{name}.db", message)
                if name == "zero":
                    self.assertIn("zero.png: not a regular file", last)

    def test_requires_cycle(self):
        a = self.experiment("a.toml", 'name = "bad"', 'name = "a"\nrequires = ["b.toml"]')
        self.experiment("b.toml", 'name = "bad"', 'name = "b"\nrequires = ["a.toml"]')
        self.expect_bad([a], "requires forms a cycle")

    def test_bad_device(self):
        f = self.write("ok.toml", tiny_experiment("bad"))
        self.expect_bad([f, "--device", "tpu:9"], "--device tpu:9")

    def test_bad_profile_variables(self):
        f = self.write("ok.toml", tiny_experiment("bad"))
        self.expect_bad([f], "ABLATE_OP_PROFILE=3", "expected FIRST:LAST", env={"ABLATE_OP_PROFILE": "3"})
        self.expect_bad([f], "ABLATE_KERNEL_PROFILE=2:1", env={"ABLATE_KERNEL_PROFILE": "2:1"})
        self.expect_bad([f], "ABLATE_OP_PROFILE=2:3:all", "FIRST:LAST[:detail]", env={"ABLATE_OP_PROFILE": "2:3:all"})
        self.expect_bad([f], "ABLATE_KERNEL_PROFILE=2:3:detail", env={"ABLATE_KERNEL_PROFILE": "2:3:detail"})
        self.expect_bad([f], "set one of them, not both", env={"ABLATE_OP_PROFILE": "1:2", "ABLATE_KERNEL_PROFILE": "1:2"})

    def test_bad_fused_norm(self):
        f = self.write("ok.toml", tiny_experiment("bad"))
        self.expect_bad([f, "--fused-norm", "maybe"], "--fused-norm maybe", "expected auto, on or off")

    def test_fused_norm_trains_as_torchs_ops_do(self):
        # --fused-norm on runs OPT's residual adds and LayerNorms through sdk::add_layer_norm's fused path (on the
        # CPU its loop over rows); full finetuning, so the norms' own gradients reach the optimizer too. float32
        # sums in another order: the losses agree to float32 rounding, compounded over the steps. The default
        # (auto) is off on the CPU (on for CUDA only): the very losses of off, and no line saying it is on.
        f = self.write("fn.toml", tiny_experiment("fn", steps=8, every=8))
        losses = {}
        for mode in ("off", "on", "auto"):
            out = run([f, "--db", self.dir / f"{mode}.db", "--fused-norm", mode])
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual("--fused-norm on: residual add" in out.stderr, mode == "on", out.stderr)
            con = sqlite3.connect(self.dir / f"{mode}.db")
            losses[mode] = [r[0] for r in con.execute("SELECT loss FROM steps WHERE split = 'train' ORDER BY step")]
            con.close()
        self.assertEqual(losses["auto"], losses["off"])
        self.assertEqual(len(losses["on"]), 8)
        for a, b in zip(losses["on"], losses["off"]):
            self.assertAlmostEqual(a, b, delta=1e-5 * abs(b))
        self.assertNotEqual(losses["on"][0], losses["on"][-1], "the run trained")

    def test_fused_relu(self):
        # --fused-relu on runs OPT's fc1 -> ReLU -> fc2 as one autograd node (sdk::relu_mlp). On the CPU it runs
        # torch's ops inside it, so full finetuning (fc1 and fc2 train) gives the very same losses.
        f = self.write("fr.toml", tiny_experiment("fr", steps=6, every=6))
        self.expect_bad([f, "--fused-relu", "yes"], "--fused-relu yes", "expected on or off")
        losses = {}
        for mode in ("off", "on"):
            out = run([f, "--db", self.dir / f"relu-{mode}.db", "--fused-relu", mode])
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual("--fused-relu on:" in out.stderr, mode == "on", out.stderr)
            con = sqlite3.connect(self.dir / f"relu-{mode}.db")
            losses[mode] = [r[0] for r in con.execute("SELECT loss FROM steps WHERE split = 'train' ORDER BY step")]
            con.close()
        self.assertEqual(len(losses["on"]), 6)
        self.assertEqual(losses["on"], losses["off"])
        self.assertNotEqual(losses["on"][0], losses["on"][-1], "the run trained")

    def test_sizes_that_would_divide_by_zero(self):
        # Inline configs are read before anything runs: zero heads or a zero patch used to end in SIGFPE.
        f = self.experiment("heads.toml", "num_hidden_layers = 1, num_attention_heads = 2, max_position_embeddings",
                            "num_hidden_layers = 1, num_attention_heads = 0, max_position_embeddings")
        self.expect_bad([f], "heads.toml:", "num_attention_heads: must be at least 1, got 0")
        f = self.experiment("patch.toml", "patch_size = 8", "patch_size = 0")
        self.expect_bad([f], "patch.toml:", "patch_size: must be at least 1, got 0")
        # (2^62 / 8)^2 patches wrap around to 0 in 64 bits: the table was built empty, and a checkpoint's was blamed.
        f = self.experiment("image.toml", "image_size = 16, patch_size = 8", "image_size = 4611686018427387904, patch_size = 8")
        self.expect_bad([f], "image.toml:", "image_size: image_size / patch_size = 576460752303423488 patches a side: too many to count")
        f = self.experiment("dropout.toml", "dropout = 0.0", "dropout = 2.0")
        self.expect_bad([f], "dropout.toml:", "dropout: must be a probability in [0, 1), got 2.0")

    def test_config_values_that_would_give_nan(self):
        # transformers builds these models and trains on NaN (or on a rope silently left out) without a word.
        f = self.experiment("eps.toml", "patch_size = 8", "patch_size = 8, layer_norm_eps = -1e-5")
        self.expect_bad([f], "eps.toml:", "model.encoder.config.layer_norm_eps: must be 0 or more, got -1e-05")
        # LLaMA and GPT-2 take their tokenizer from a weights folder, whose config.json is read as the run starts.
        llama = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
        gpt2 = dict(n_embd=16, n_layer=1, n_head=2, n_positions=64)
        for name, plugin, config, message in (
                ("theta", "llama", {**llama, "rope_theta": 0.0}, "config.json: rope_theta: must be above 0, got 0.0"),
                ("nested", "llama", {**llama, "rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
                 "config.json: rope_parameters: rope_theta: must be above 0, got -1.0"),
                ("scaling", "llama", {**llama, "rope_scaling": "linear"}, 'config.json: rope_scaling: expected a table, got "linear"'),
                # transformers has no rotary embedding for a rope_type of None (KeyError); it used to fail the run
                # with nlohmann's own words, naming no file.
                ("type", "llama", {**llama, "rope_parameters": {"rope_type": None, "factor": 2.0}},
                 "config.json: rope_parameters: rope_type: expected a string, got null"),
                ("factor", "llama", {**llama, "rope_parameters": {"rope_type": "linear", "factor": "2"}},
                 'config.json: rope_parameters: factor: expected a number, got "2"'),
                ("rms", "llama", {**llama, "rms_norm_eps": -1e-6}, "config.json: rms_norm_eps: must be 0 or more"),
                ("kv", "llama", {**llama, "num_key_value_heads": "2"}, "config.json: num_key_value_heads: expected an integer, got a string"),
                ("inner", "gpt2", {**gpt2, "n_inner": -4}, "config.json: n_inner: must be at least 1, got -4")):
            with self.subTest(name):
                folder = self.dir / name
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps(config))
                (folder / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # no tensors
                text = re.sub(r"^backbone = .*$", f'backbone = {{ plugin = "{plugin}", weights = "{name}" }}', tiny_experiment("bad"), flags=re.M)
                self.expect_bad_once_running([self.write(f"{name}.toml", text)], self.dir / f"{name}.db", message)

    def test_eos_token_ids_that_are_not_ids(self):
        # Generation stops at config.json's eos_token_id, or generation_config.json's when the folder has one: an
        # id, a list of ids or null. Anything else used to be taken as "none" (LLaMA) and the answers ran on.
        llama = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
        for name, config, generation, message in (
                ("word", {**llama, "eos_token_id": "</s>"}, None, 'config.json: eos_token_id: expected a token id or a list of token ids, got "</s>"'),
                ("mixed", {**llama, "eos_token_id": [2, "3"]}, None, 'config.json: eos_token_id: expected a token id or a list of token ids, got [2,"3"]'),
                ("bos", {**llama, "bos_token_id": [1]}, None, "config.json: bos_token_id: expected a token id or null, got [1]"),
                ("generation", llama, {"eos_token_id": 2.5}, "generation_config.json: eos_token_id: expected a token id or a list of token ids, got 2.5"),
                ("broken", llama, "{", "generation_config.json")):
            with self.subTest(name):
                folder = self.dir / name
                folder.mkdir()
                (folder / "config.json").write_text(json.dumps(config))
                if generation is not None:
                    (folder / "generation_config.json").write_text(generation if isinstance(generation, str) else json.dumps(generation))
                (folder / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # no tensors
                text = re.sub(r"^backbone = .*$", f'backbone = {{ plugin = "llama", weights = "{name}" }}', tiny_experiment("bad"), flags=re.M)
                self.expect_bad_once_running([self.write(f"{name}.toml", text)], self.dir / f"{name}.db", message)

    def test_training_values_out_of_range(self):
        for name, before, after, message in [
                ("steps", "steps = 8", "steps = 9223372036854775807", "train.steps: must be from 1 to 1000000000"),
                ("batch", "batch_size = 4", "batch_size = 9223372036854775807", "train.batch_size: must be from 1 to 65536"),
                ("lr", "lr = 1e-3", "lr = inf", "train.lr: must be positive and finite"),
                ("betas", "lr = 1e-3", "lr = 1e-3\nbetas = [1.5, 0.999]", "train.betas: each must be in [0, 1)"),
                ("eps", "lr = 1e-3", "lr = 1e-3\neps = -1e-8", "train.eps: must be finite and not negative"),
                ("warmup", "lr = 1e-3", 'lr = 1e-3\nschedule = { kind = "linear", warmup_steps = -3 }',
                 "train.schedule.warmup_steps: must not be negative")]:
            with self.subTest(name):
                self.expect_bad([self.experiment(f"{name}.toml", before, after)], f"{name}.toml:", message)

    def test_command_line_numbers_out_of_range(self):
        f = self.write("ok.toml", tiny_experiment("bad"))
        self.expect_bad([f, "--threads", "20000"], "--threads 20000: expected 0 to 1024")
        self.expect_bad([f, "--workers", "-3"], "--workers -3: expected 0 to 256")
        self.expect_bad([f, "--feature-cache-gib", "nan"], "--feature-cache-gib nan")
        self.expect_bad(["report", "good", "--samples", "-1"], "--samples -1: expected 0 to 100000")
        self.expect_bad(["serve", "--port", "99999"], "--port 99999: expected 0 to 65535")

    def test_no_arguments(self):
        out = run([])
        self.assertEqual(out.returncode, 2)
        self.assertEqual(out.stderr.strip().splitlines(), ["runner: name an experiment TOML file (runner --help for the "
                                                           "commands and options)"])

    def test_output_paths_that_cannot_be_written(self):
        (self.dir / "folder").mkdir()
        self.expect_bad(["report", "good", "-o", self.dir / "folder"], "folder: is a folder")
        self.assertEqual(sorted(p.name for p in (self.dir).iterdir() if p.name.startswith("folder")), ["folder"])
        a_file = self.write("a_file.txt", "x")
        self.expect_bad(["curves", "good", "-o", a_file], "a_file.txt: cannot be made a folder")
        self.expect_bad(["replay", "1", "--images", a_file], "a_file.txt: cannot be made a folder")

    def test_damaged_database(self):
        damaged = self.dir / "damaged.db"
        data = bytearray(self.db.read_bytes())
        self.assertGreater(len(data), 8192 + 16)
        data[8192:8192 + 16] = b"\xff" * 16  # inside the second page: the schema reads, a table does not
        damaged.write_bytes(bytes(data))
        for args in (["compare", "good"], [self.write("ok.toml", tiny_experiment("good", steps=2, every=2))]):
            out = run([*args, "--db", damaged])
            self.assertEqual(out.returncode, 2, out.stderr)
            lines = out.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, out.stderr)
            self.assertIn("damaged.db: damaged (database disk image is malformed)", lines[0])

    def test_unknown_option(self):
        out = run(["--frobnicate"])
        self.assertEqual(out.returncode, 2)
        self.assertEqual(len(out.stderr.strip().splitlines()), 1)

    def test_not_a_database(self):
        other = self.dir / "notes.db"
        other.write_text("not a database, just notes " * 20)
        before = digest(other)
        out = run([self.write("ok.toml", tiny_experiment("bad")), "--db", other])
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn("notes.db", out.stderr)
        self.assertEqual(digest(other), before)
        self.assertFalse((self.dir / "notes.db.lock").exists())  # the lock file the refused run made is gone

    def test_another_programs_sqlite_file_is_left_as_it_was(self):
        # Refused before its journal mode is switched to WAL (which rewrites the header).
        other = self.dir / "theirs.db"
        with sqlite3.connect(other) as c:
            c.execute("CREATE TABLE x(a)")
            c.execute("INSERT INTO x VALUES (1)")
        c.close()
        before = digest(other)
        for args in ([self.write("ok.toml", tiny_experiment("bad"))], ["compare", "good"]):
            out = run([*args, "--db", other])
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn("theirs.db: not an ablate results database", out.stderr)
            self.assertEqual(digest(other), before)
            self.assertFalse((self.dir / "theirs.db.lock").exists())
        # A lock file that was there before the run (a finished runner's) is left where it was.
        (self.dir / "theirs.db.lock").write_text("")
        out = run([self.dir / "ok.toml", "--db", other])
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertTrue((self.dir / "theirs.db.lock").exists())

    def test_compare_and_replay_of_unknown_things(self):
        self.expect_bad(["compare", "nope"], "no experiment named 'nope'", "good")
        self.expect_bad(["replay", "999"], "no run 999")


class RunOutcomesTest(TempDirTest):
    def test_the_run_records_the_cpu_kernels_it_ran(self):
        # The same seed repeats bit for bit on one machine, not across CPUs whose vector instructions differ (an
        # AVX2 machine sums in another order than an AVX-512 one): the run says which kernels it used.
        import torch
        capability = torch.backends.cpu.get_cpu_capability()  # the same libtorch the runner links
        db = self.dir / "r.db"
        out = run([self.write("ok.toml", tiny_experiment("ok", steps=2, every=2)), "--db", db, "--device", "cpu"])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(query(db, "SELECT device FROM runs"), [(f"cpu ({capability})",)])
        self.assertIn(f"key {query(db, 'SELECT substr(cell_key, 1, 12) FROM runs')[0][0]} on cpu ({capability})", out.stderr)
        # ATEN_CPU_CAPABILITY chooses lower ones, and the record follows.
        db2 = self.dir / "r2.db"
        out = run([self.dir / "ok.toml", "--db", db2, "--device", "cpu"], env={"ATEN_CPU_CAPABILITY": "default"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(query(db2, "SELECT device FROM runs"), [("cpu (DEFAULT)",)])

    def test_plugin_failure_marks_one_run_and_the_grid_goes_on(self):
        toml = self.write("explode.toml", tiny_experiment(
            "explode", steps=4, every=2,
            extra='[grid]\n"model.projector" = [{ plugin = "explode" }, { plugin = "git" }]\n'))
        db = self.dir / "r.db"
        out = run([toml, "--db", db, "--plugins", TEST_PLUGINS / "throws_forward"])
        self.assertEqual(out.returncode, 1, out.stderr)
        rows = query(db, "SELECT status, error FROM runs ORDER BY cell_index")
        self.assertEqual(rows[0][0], "failed")
        self.assertIn("projector/explode: forward: boom in forward", rows[0][1])
        self.assertEqual(rows[1][0], "done")
        self.assertIn("failed: projector/explode: forward: boom in forward", out.stderr)

    def test_a_model_too_large_for_memory_fails_its_run_and_the_grid_goes_on(self):
        # torch's CPU allocator reports failure through an "enforce" that this wheel makes fatal (abort, no line):
        # the runner turns that off, so it is an exception, and the run fails saying what it tried to allocate.
        text = tiny_experiment("huge", steps=2, every=2, extra='[grid]\n"model.backbone.config.max_position_embeddings" = [1099511627776, 64]\n')
        db = self.dir / "r.db"
        out = run([self.write("huge.toml", text), "--db", db])
        self.assertEqual(out.returncode, 1, out.stderr)
        rows = query(db, "SELECT status, error FROM runs ORDER BY cell_index")
        self.assertEqual([r[0] for r in rows], ["failed", "done"])
        self.assertIn("backbone/opt: construct: out of memory: tried to allocate 65536.0 GiB", rows[0][1])
        self.assertIn("failed: backbone/opt: construct: out of memory", out.stderr)
        # Layers small enough to allocate one by one, but too many: refused before the first is built (it used to
        # build them for minutes, past this run's time limit, until memory ran out).
        text = tiny_experiment("deep", steps=2, every=2, extra='[grid]\n"model.backbone.config.num_hidden_layers" = [10000000000, 1]\n')
        db = self.dir / "deep.db"
        out = run([self.write("deep.toml", text), "--db", db], timeout=120)
        self.assertEqual(out.returncode, 1, out.stderr)
        rows = query(db, "SELECT status, error FROM runs ORDER BY cell_index")
        self.assertEqual([r[0] for r in rows], ["failed", "done"])
        self.assertRegex(rows[0][1], r"backbone/opt: construct: num_hidden_layers = 10000000000: layers of at least 2048 "
                                     r"parameters each need 76293\.9 GiB in float32, more than this machine's [\d.]+ GiB")

    def test_repeated_sample_ids_are_stored_apart(self):
        # LLaVA's instruction mixes repeat ids; generations are stored by id, so a repeat gets a suffix.
        Image.new("RGB", (20, 20), (30, 30, 200)).save(self.dir / "blue.png")
        (self.dir / "llava.json").write_text(json.dumps([
            {"id": "same", "image": "blue.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                 {"from": "gpt", "value": answer}]}
            for answer in ("blue", "dark blue", "navy")]))
        text = tiny_experiment("repeat", steps=2, every=2)
        text = re.sub(r"^eval = .*$", 'eval = { plugin = "llava_json", file = "llava.json", image_folder = "." }', text, flags=re.M)
        db = self.dir / "r.db"
        out = run([self.write("repeat.toml", text), "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("eval: 2 repeated sample ids stored with a suffix ('same' -> 'same~2', ...)", out.stderr)
        rows = query(db, "SELECT DISTINCT sample_id FROM samples ORDER BY sample_id")
        self.assertEqual(rows, [("same",), ("same~2",), ("same~3",)])

    def test_divergence_marks_the_run_and_the_grid_goes_on(self):
        toml = self.write("div.toml", tiny_experiment(
            "div", steps=20, every=10, extra='[grid]\n"train.lr" = [1e30, 1e-3]\n'))
        db = self.dir / "r.db"
        out = run([toml, "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        rows = query(db, "SELECT status, error FROM runs ORDER BY cell_index")
        self.assertEqual(rows[0][0], "diverged")
        self.assertRegex(rows[0][1], r"loss became (nan|inf) at step \d+")
        self.assertEqual(rows[1][0], "done")
        # Steps before the divergence are kept; none is NULL.
        self.assertEqual(query(db, "SELECT count(*) FROM steps WHERE loss IS NULL"), [(0,)])
        again = run([toml, "--db", db])
        self.assertIn("diverged already", again.stderr)

    def test_sigint_interrupts_and_the_run_resumes(self):
        toml = self.write("int.toml", tiny_experiment("int", steps=400, every=20))
        db = self.dir / "r.db"
        with open(self.dir / "log", "w") as log:
            proc = subprocess.Popen([str(RUNNER), str(toml), "--db", str(db)], stderr=log, stdout=subprocess.DEVNULL)
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if query(db, "SELECT count(*) FROM checkpoints")[0][0] >= 1:
                        break
                except sqlite3.Error:
                    pass
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            self.assertEqual(proc.wait(timeout=60), 130)
        self.assertEqual(query(db, "SELECT status FROM runs"), [("interrupted",)])
        self.assertIn("resumes from its last checkpoint", (self.dir / "log").read_text())
        done = run([toml, "--db", db])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("resuming from the checkpoint", done.stderr)
        self.assertEqual(query(db, "SELECT count(*), min(step), max(step) FROM steps WHERE split = 'train'"), [(400, 1, 400)])

    def test_one_runner_per_database(self):
        toml = self.write("lock.toml", tiny_experiment("lock", steps=400, every=200))
        db = self.dir / "r.db"
        with open(self.dir / "log", "w") as log:
            first = subprocess.Popen([str(RUNNER), str(toml), "--db", str(db)], stderr=log, stdout=subprocess.DEVNULL)
            try:
                deadline = time.time() + 60
                while not db.exists() and time.time() < deadline:
                    time.sleep(0.02)
                second = run([toml, "--db", db])
                self.assertEqual(second.returncode, 2)
                self.assertIn("in use by another runner", second.stderr)
            finally:
                first.kill()
                first.wait()

    def test_profiles_print_their_tables(self):
        # The developer's aids of bench/README.md: the host's operators by self time; the device's kernels, which
        # on the CPU it says it has none of.
        f = self.write("p.toml", tiny_experiment("p", steps=4, every=4))
        out = run([f, "--db", self.dir / "p.db"], env={"ABLATE_OP_PROFILE": "2:3"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("operator profile, steps 2..3", out.stderr)
        self.assertRegex(out.stderr, r"\n  aten::\w+ +[0-9.]+ +[0-9.]+ +[0-9.]+\n")
        # detail: name [argument types] < callers, calls, self ms, total ms, MiB (a figure, or - for an operator
        # whose inner ones moved the bytes)
        out = run([f, "--db", self.dir / "d.db"], env={"ABLATE_OP_PROFILE": "2:3:detail"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertRegex(out.stderr, r"\n  aten::\w+ \[[a-z0-9*,]*\]( < [^\n]+)+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+\n")
        self.assertRegex(out.stderr, r"\n  aten::\w+ \[[a-z0-9*,]*\]( < [^\n]+)+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +-\n")
        out = run([f, "--db", self.dir / "k.db"], env={"ABLATE_KERNEL_PROFILE": "2:3"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("kernel profile, steps 2..3", out.stderr)
        self.assertIn("no device activity recorded", out.stderr)

    def test_traffic_bench_shows_the_fused_norm_moving_fewer_bytes(self):
        # bench/traffic.py at the tiny size: the detail profile's bytes, per row, both ways. The fused norm takes
        # the mixed float32 + bf16 adds (and the casts and gradient sums around them) into its own passes.
        out = subprocess.run([sys.executable, SOURCE / "bench" / "traffic.py", "--size", "tiny", "--runner", RUNNER,
                              "--work", self.dir / "bench"], capture_output=True, text=True, timeout=900)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        kib = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
               for m in re.finditer(r"^ +(\S[^\n]*?) +([0-9.]+) +([0-9.]+)$", out.stdout, re.M)}
        off, on = kib["elementwise"]
        self.assertLess(on, 0.9 * off, out.stdout)
        self.assertGreater(kib["float32 + bf16 adds (as one kernel)"][0], 0, out.stdout)
        self.assertEqual(kib["float32 + bf16 adds (as one kernel)"][1], 0, out.stdout)
        self.assertRegex(out.stdout, r"\n +[0-9.]+  ablate::add_layer_norm \[")

    def test_dry_run_prints_cells_and_records_nothing(self):
        toml = self.write("dry.toml", tiny_experiment("dry", extra='[grid]\n"train.lr" = [1e-3, 2e-3, 3e-3]\n'))
        out = run([toml, "--dry-run", "--db", self.dir / "r.db"])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("3 cells", out.stdout)
        self.assertRegex(out.stdout, r"\[3/3\] [0-9a-f]{12}  train\.lr=0\.003")
        self.assertFalse((self.dir / "r.db").exists())

    def test_replay_escapes_what_models_and_datasets_wrote(self):
        toml = self.write("esc.toml", tiny_experiment("esc", steps=2, every=2))
        db = self.dir / "r.db"
        self.assertEqual(run([toml, "--db", db]).returncode, 0)
        con = sqlite3.connect(db)
        con.execute("UPDATE samples SET output = ?, prompt = ? WHERE rowid = (SELECT min(rowid) FROM samples WHERE step = 2)",
                    ("<script>alert(1)</script>\x1b[31mred\x07", "line one\nline two"))
        con.commit()
        con.close()
        out = run(["replay", "1", "--db", db])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("\x1b", out.stdout)
        self.assertNotIn("\x07", out.stdout)
        self.assertIn("<script>alert(1)</script>\\x1b[31mred\\x07", out.stdout)
        self.assertIn("line one\\nline two", out.stdout)

    def test_plugins_lists_and_reports_bad_files(self):
        out = run(["plugins"], env={"ABLATE_PLUGIN_PATH": f"{TEST_PLUGINS / 'bad_abi'}:{TEST_PLUGINS / 'no_entry'}"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertRegex(out.stdout, r"backbone\s+opt\s+1\s+\S+libablate_backbone_opt\.so")
        self.assertIn("ABI mismatch in sdk_abi", out.stderr)
        self.assertIn("not an ablate plugin", out.stderr)


class LinkTest(unittest.TestCase):
    def test_runner_loads_no_cuda_runtime_of_its_own(self):
        """cmake/AblateTorch.cmake: libtorch_cuda finds the wheel's CUDA libraries; a libcudart NEEDED by the runner
        itself would be resolved from the toolkit's folder first and shadow the wheel's (or be missing where only
        the wheel is, as on the GPU machine)."""
        dynamic = subprocess.run(["readelf", "-d", str(RUNNER)], capture_output=True, text=True, check=True).stdout
        needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
        self.assertIn("libtorch_cpu.so", needed)
        self.assertEqual([n for n in needed if n.startswith(("libcudart", "libcublas", "libnvrtc"))], [], needed)


if __name__ == "__main__":
    unittest.main()
