"""Training on the GPU (label `gpu`: scripts/test.sh skips it; run it with `ctest -L gpu` on a machine with CUDA).
fp32 on CUDA computes what the CPU computes, to float rounding; bf16 and fp16 (with its loss scale) train to
losses near fp32's; gradient checkpointing on CUDA changes no number; TF32 trains near fp32; the frozen-encoder
feature cache lives on the device; decoding replays its steps as CUDA graphs and generates what eager steps do;
training replays its forward and backward passes as CUDA graphs and trains what eager steps do."""
import re
import unittest

from ablate_testing import TempDirTest, query, run, tiny_experiment

STEPS = 30


class CudaTrainingTest(TempDirTest):
    def losses(self, db, cell):
        return [l for (l,) in query(db, "SELECT s.loss FROM steps s JOIN runs r ON r.id = s.run_id "
                                        "WHERE r.cell_index = ? AND s.split = 'train' ORDER BY s.step", cell)]

    def grid(self, name, axis, device):
        toml = self.write(f"{name}.toml", tiny_experiment(name, steps=STEPS, every=10, extra=f"[grid]\n{axis}\n",
                                                          strategy='["projector", { plugin = "lora", r = 4 }]'))
        db = self.dir / f"{name}.db"
        out = run([toml, "--db", db, "--device", device])
        self.assertEqual(out.returncode, 0, out.stderr)
        (self.dir / f"{name}.log").write_text(out.stderr)
        self.assertEqual({s for (s,) in query(db, "SELECT status FROM runs")}, {"done"})
        return db

    def test_precisions(self):
        cpu = self.grid("cpu", '"train.precision" = ["fp32"]', "cpu")
        gpu = self.grid("gpu", '"train.precision" = ["fp32", "bf16", "fp16"]', "cuda")
        reference = self.losses(cpu, 0)
        self.assertEqual(len(reference), STEPS)
        for cell, precision, tolerance in ((0, "fp32", 1e-3), (1, "bf16", 5e-2), (2, "fp16", 2e-2)):
            losses = self.losses(gpu, cell)
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            print(f"{precision} on cuda: worst relative loss difference to the CPU's fp32 over {STEPS} steps {worst:.2e}")
            self.assertLessEqual(worst, tolerance, precision)

    def test_gradient_checkpointing_on_cuda(self):
        db = self.grid("gc", '"train.gradient_checkpointing" = [false, ["encoder", "backbone"]]', "cuda")
        plain, checkpointed = self.losses(db, 0), self.losses(db, 1)
        worst = max(abs(a - b) for a, b in zip(plain, checkpointed))
        print(f"gradient checkpointing on cuda: worst loss difference {worst:.2e}")
        self.assertLessEqual(worst, 1e-5)

    def test_tf32_and_the_feature_cache_on_cuda(self):
        import json
        db = self.grid("tf32", '"train.tf32" = [false, true]\n"train.lr" = [1e-3, 5e-4]', "cuda")
        log = (self.dir / "tf32.log").read_text()
        cell = {(a["train.tf32"], a["train.lr"]): i
                for i, a in ((i, json.loads(a)) for i, a in query(db, "SELECT cell_index, axes FROM runs"))}
        self.assertEqual(len(cell), 4)
        plain, tf32 = self.losses(db, cell[False, 1e-3]), self.losses(db, cell[True, 1e-3])
        worst = max(abs(a - b) / abs(b) for a, b in zip(plain, tf32))
        print(f"tf32 on cuda: worst relative loss difference to fp32 over {STEPS} steps {worst:.2e}")
        self.assertEqual(len(tf32), STEPS)
        self.assertLessEqual(worst, 1e-2)
        # The frozen encoder's features are kept on the device, one table per TF32 setting (TF32 changes them):
        # encoded by the first cell of each setting, reused by the second.
        encoded = re.findall(r"feature cache: data\.train: 64 images x 5 x 16 Float, [0-9.]+ MiB on cuda:0, encoded", log)
        reused = re.findall(r"feature cache: data\.train: 64 images x 5 x 16 Float, [0-9.]+ MiB on cuda:0, reused", log)
        self.assertEqual((len(encoded), len(reused)), (2, 2), log)

    def test_decode_steps_as_cuda_graphs(self):
        extra = '[grid]\n"eval.generate" = [{ max_new_tokens = 12 }, { max_new_tokens = 12, do_sample = true, top_k = 3 }]\n'
        toml = self.write("graph.toml", tiny_experiment("graph", steps=10, every=5, extra=extra))
        self.decode_with_and_without_graphs(toml, allowed_differences=1)
        # (A graph that baked in one step's attention mask would differ in most of the 12-token generations.)

    def test_decode_steps_as_cuda_graphs_in_bf16_with_lora(self):
        # Autocast (its cast cache is off during capture), frozen weights held in bf16, LoRA adapters in the step.
        text = tiny_experiment("graph-bf16", steps=10, every=5, strategy='["projector", { plugin = "lora", r = 4 }]')
        text = text.replace('log_every = 2\n', 'log_every = 2\nprecision = "bf16"\n')
        toml = self.write("graph-bf16.toml", text.replace("generate = { max_new_tokens = 4 }", "generate = { max_new_tokens = 12 }"))
        # bf16 rounds differently over the fixed-size cache's masked keys: a few greedy tokens may flip.
        self.decode_with_and_without_graphs(toml, allowed_differences=2)

    def test_training_steps_as_cuda_graphs(self):
        # fp32, full finetuning, two micro-batches a step (one graph replays both).
        text = tiny_experiment("tgraph", steps=STEPS, every=10).replace("batch_size = 4", "batch_size = 4\ngrad_accum = 2")
        on, off = self.train_with_and_without_graphs(self.write("tgraph.toml", text))
        worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
        print(f"training graphs on cuda (fp32): worst relative loss difference to eager steps over {STEPS} steps {worst:.2e}")
        self.assertLessEqual(worst, 1e-4)

    def test_training_steps_as_cuda_graphs_in_bf16_with_lora_and_dropout(self):
        # Autocast (no cast cache in capture), frozen weights in bf16, LoRA, cached features copied into the graph's
        # inputs, and dropout: the capture's check replays from the generator state the eager passes started from,
        # so a graph that drew other masks than the eager passes would be refused and this test would fail.
        text = tiny_experiment("tgraph-bf16", steps=STEPS, every=10, strategy='["projector", { plugin = "lora", r = 4 }]')
        text = text.replace("log_every = 2\n", 'log_every = 2\nprecision = "bf16"\n').replace("dropout = 0.0", "dropout = 0.1")
        on, off = self.train_with_and_without_graphs(self.write("tgraph-bf16.toml", text), "--feature-cache", "on")
        # Padding changes the shapes dropout's masks are drawn in: the two runs drop different units.
        worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
        print(f"training graphs on cuda (bf16, LoRA, dropout 0.1): worst relative loss difference {worst:.2e}")
        self.assertLessEqual(worst, 0.1)

    def test_a_step_that_cannot_be_captured_trains_eagerly_with_dropout(self, device="cuda"):
        # Dynamic NTK rope reads the longest position on the host in every forward pass, which a capture cannot
        # hold: the graph is refused and the steps go on eagerly. Their LoRA dropout draws from the CUDA generator
        # that the failed capture had put in capture mode (CudaGraph takes it out again; else this run fails).
        import json
        import re
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        llm = self.dir / "llm"
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                     rope_scaling={"rope_type": "dynamic", "factor": 2.0})).save_pretrained(llm)
        words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 64)]
        (llm / "tokenizer.json").write_text(json.dumps({
            "version": "1.0", "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None, "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                                               "normalized": False, "special": True} for i, w in enumerate(words[:4])],
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"}}))
        (llm / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                              "unk_token": "<unk>"}))
        text = tiny_experiment("refused", steps=6, every=3,
                               strategy='["projector", { plugin = "lora", r = 4, dropout = 0.1 }]')
        text = re.sub(r"backbone = \{.*\}\n", f'backbone = {{ plugin = "llama", weights = "{llm}" }}\n', text)
        db = self.dir / "refused.db"
        out = run([self.write("refused.toml", text), "--db", db, "--device", device, "--train-graph", "on"])
        self.assertEqual(out.returncode, 0, out.stderr)
        print(out.stderr)
        if device == "cuda":
            self.assertIn("training step: no CUDA graph: capture failed", out.stderr)
        self.assertEqual(len(self.losses(db, 0)), 6)
        self.assertEqual({s for (s,) in query(db, "SELECT status FROM runs")}, {"done"})

    def train_with_and_without_graphs(self, toml, *extra):
        losses = {}
        for mode in ("off", "on"):
            db = self.dir / f"{toml.stem}-{mode}.db"
            out = run([toml, "--db", db, "--device", "cuda", "--train-graph", mode, *extra])
            self.assertEqual(out.returncode, 0, out.stderr)
            if mode == "on":
                print(out.stderr)
                self.assertIn("training step as a CUDA graph", out.stderr)
                self.assertNotIn("no CUDA graph", out.stderr)
            losses[mode] = self.losses(db, 0)
            self.assertEqual(len(losses[mode]), STEPS)
        return losses["on"], losses["off"]

    def decode_with_and_without_graphs(self, toml, allowed_differences):
        # Every generation stored, in batches of 5 of 12: the second batch replays the first's graph over its own
        # prompts, the third (2 rows) is captured anew.
        text = toml.read_text().replace("samples = 3", 'samples = "all"').replace("batch_size = 6", "batch_size = 5")
        toml.write_text(text)
        generated = {}
        for mode in ("off", "auto"):
            db = self.dir / f"graph-{mode}.db"
            out = run([toml, "--db", db, "--device", "cuda", "--decode-graph", mode])
            self.assertEqual(out.returncode, 0, out.stderr)
            if mode == "auto":
                self.assertIn("decode steps: CUDA graph", out.stderr)
                self.assertNotIn("no CUDA graph", out.stderr)
            generated[mode] = query(db, "SELECT r.cell_index, s.step, s.sample_id, s.output FROM samples s "
                                        "JOIN runs r ON r.id = s.run_id ORDER BY 1, 2, 3")
        same = sum(a == b for a, b in zip(generated["off"], generated["auto"]))
        print(f"decode graphs on cuda ({toml.stem}): {same} of {len(generated['off'])} stored generations equal to "
              "the growing cache's eager steps'")
        # Only the attention kernel differs (masked over the fixed-size cache against unmasked), so a greedy token
        # flips only on a near tie.
        self.assertGreater(len({o for *_, o in generated["off"] if len(o.split()) > 2}), 3, generated["off"])
        self.assertGreaterEqual(same, len(generated["off"]) - allowed_differences)


if __name__ == "__main__":
    unittest.main()
