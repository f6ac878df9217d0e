"""Parity with the Python references installed on this machine: the plugins load Hugging Face folders that
transformers wrote and compute what transformers computes; folders that ablate exports load in transformers and
compute what ablate computes; the word-level tokenizer gives the `tokenizers` library's ids."""
import json
import random
import subprocess
import unittest

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM, SiglipConfig, SiglipModel, SiglipVisionConfig,
                          SiglipVisionModel)

from ablate_testing import PROBE, TempDirTest, run, tiny_experiment

TOLERANCE = 1e-4  # float32, max absolute difference


def word_level_tokenizer_json(path, vocab_size):
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    path.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None,
                                "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))


def left_padded_batch(vocab, length, pads):
    """Random ids in rows left-padded by `pads` tokens, their attention mask, and the positions ablate gives a
    left-padded batch (as transformers' generate() does): real tokens from 0."""
    ids = torch.randint(4, vocab, (len(pads), length))
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids, mask, positions


class ParityCase(TempDirTest):
    """Runs component_probe and compares with a reference."""

    def probe(self, kind, plugin, folder, inputs, options=None):
        save_file(inputs, str(self.dir / "in.safetensors"))
        args = [str(PROBE), kind, plugin, str(folder), str(self.dir / "in.safetensors"), str(self.dir / "out.safetensors")]
        if options:
            args.append(json.dumps(options))
        out = subprocess.run(args, capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        return load_file(str(self.dir / "out.safetensors"))

    def assert_close(self, ours, ref, what):
        diff = (ours - ref).abs().max().item()
        print(f"{what}: max abs difference {diff:.3g}")
        self.assertLessEqual(diff, TOLERANCE, what)

    def padded_batch(self, vocab, length=9):
        return left_padded_batch(vocab, length, pads=(0, 3, 6))

    def backbone_parity(self, name, model, folder_setup=None, length=9):
        folder = self.dir / name
        model.eval().save_pretrained(folder)
        word_level_tokenizer_json(folder / "tokenizer.json", model.config.vocab_size)
        if folder_setup:
            folder_setup(folder)
        ids, mask, positions = self.padded_batch(model.config.vocab_size, length)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = self.probe("backbone", name.split("-")[0], folder, {"input_ids": ids, "attention_mask": mask})
        valid = mask.bool()
        self.assert_close(ours["logits"][valid], ref[valid], f"{name} logits (padded batch)")

    def llama(self, **config):
        base = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
        base.update(config)
        return LlamaForCausalLM(LlamaConfig(**base))

class ClipOptParityTest(ParityCase):
    def test_clip_vision(self):
        torch.manual_seed(0)
        for act in ("quick_gelu", "gelu"):
            config = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                      image_size=32, patch_size=8, hidden_act=act)
            model = CLIPVisionModel(config).eval()
            folder = self.dir / f"clip-{act}"
            model.save_pretrained(folder)
            pixels = torch.randn(3, 3, 32, 32)
            with torch.no_grad():
                ref = model(pixel_values=pixels, output_hidden_states=True)
            ours = self.probe("encoder", "clip_vit", folder, {"pixels": pixels})["features"]
            self.assert_close(ours, ref.last_hidden_state, f"CLIP vision ({act}) last_hidden_state")
            # LLaVA's features: the penultimate layer without the CLS token.
            ours = self.probe("encoder", "clip_vit", folder, {"pixels": pixels},
                              {"feature_layer": -2, "tokens": "patches"})["features"]
            self.assert_close(ours, ref.hidden_states[-2][:, 1:], f"CLIP vision ({act}) hidden_states[-2], patches")

    def test_clip_vision_from_a_full_clip_checkpoint(self):
        torch.manual_seed(1)
        config = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=16),
                            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=99), projection_dim=16)
        model = CLIPModel(config).eval()
        model.save_pretrained(self.dir / "clip-full")
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model.vision_model(pixel_values=pixels).last_hidden_state
        ours = self.probe("encoder", "clip_vit", self.dir / "clip-full", {"pixels": pixels})["features"]
        self.assert_close(ours, ref, "CLIP vision tower of a full CLIPModel checkpoint")

    def opt_parity(self, name, **config):
        torch.manual_seed(2)
        model = OPTForCausalLM(OPTConfig(vocab_size=120, max_position_embeddings=64, **config)).eval()
        folder = self.dir / name
        model.save_pretrained(folder)
        word_level_tokenizer_json(folder / "tokenizer.json", 120)
        ids = torch.randint(4, 120, (3, 9))
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, :3] = 0  # left padding, as batched generation has it
        mask[2, :6] = 0
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = self.probe("backbone", "opt", folder, {"input_ids": ids, "attention_mask": mask})
        valid = mask.bool()
        self.assert_close(ours["logits"][valid], ref.logits[valid], f"{name} logits (padded batch)")
        return ours, ref, valid

    def test_opt_pre_layernorm_tied(self):
        self.opt_parity("opt-125m-shaped", hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4)

    def test_opt_350m_shaped(self):
        # opt-350m: post-layernorm, no final layer norm, project_in / project_out around a wider decoder.
        self.opt_parity("opt-350m-shaped", hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                        word_embed_proj_dim=32, do_layer_norm_before=False)

    def test_opt_untied_gelu(self):
        self.opt_parity("opt-untied", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=8,
                        tie_word_embeddings=False, activation_function="gelu")


class MoreComponentsParityTest(ParityCase):
    """SigLIP, GPT-2 and LLaMA (grouped-query attention, every rope scaling kind) on padded batches."""

    def test_siglip_vision(self):
        torch.manual_seed(3)
        config = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=32, patch_size=8)
        model = SiglipVisionModel(config).eval()
        model.save_pretrained(self.dir / "siglip")
        pixels = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            ref = model(pixel_values=pixels, output_hidden_states=True)
        ours = self.probe("encoder", "siglip", self.dir / "siglip", {"pixels": pixels})["features"]
        self.assert_close(ours, ref.last_hidden_state, "SigLIP vision last_hidden_state")
        ours = self.probe("encoder", "siglip", self.dir / "siglip", {"pixels": pixels}, {"feature_layer": -2})["features"]
        self.assert_close(ours, ref.hidden_states[-2], "SigLIP vision hidden_states[-2]")

    def test_siglip_vision_from_a_full_siglip_checkpoint(self):
        torch.manual_seed(4)
        config = SiglipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 image_size=32, patch_size=16),
                              text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=99))
        model = SiglipModel(config).eval()
        model.save_pretrained(self.dir / "siglip-full")
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model.vision_model(pixel_values=pixels).last_hidden_state
        ours = self.probe("encoder", "siglip", self.dir / "siglip-full", {"pixels": pixels})["features"]
        self.assert_close(ours, ref, "SigLIP vision tower of a full SiglipModel checkpoint")

    def test_gpt2(self):
        torch.manual_seed(5)
        self.backbone_parity("gpt2", GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=120, n_positions=32)))
        torch.manual_seed(6)
        self.backbone_parity("gpt2-untied-scaled", GPT2LMHeadModel(GPT2Config(
            n_embd=64, n_layer=2, n_head=8, vocab_size=120, n_positions=32, n_inner=96, tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True)))

    def test_llama_grouped_query_attention(self):
        torch.manual_seed(7)
        self.backbone_parity("llama-gqa", self.llama())
        torch.manual_seed(8)
        self.backbone_parity("llama-tied-mha", self.llama(num_key_value_heads=4, tie_word_embeddings=True,
                                                          attention_bias=True, mlp_bias=True, head_dim=32))

    def test_llama_rope_scaling(self):
        cases = {
            "llama-linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
            "llama-llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                  "rope_theta": 10000.0}),
            "llama-yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                                "rope_theta": 10000.0}),
            # Longer than max_position_embeddings: the dynamic base grows.
            "llama-dynamic": dict(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                                "rope_theta": 10000.0}),
        }
        for i, (name, config) in enumerate(cases.items()):
            torch.manual_seed(10 + i)
            self.backbone_parity(name, self.llama(**config), length=12)

    def test_llama_legacy_rope_keys(self):
        # Checkpoints written before transformers 5 say rope_theta and rope_scaling {"type": ...}.
        def legacy(folder):
            cfg = json.loads((folder / "config.json").read_text())
            cfg.pop("rope_parameters", None)
            cfg["rope_theta"] = 500000.0
            cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
            (folder / "config.json").write_text(json.dumps(cfg))
        torch.manual_seed(20)
        self.backbone_parity("llama-legacy", self.llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 500000.0}), folder_setup=legacy)


class WeightsFormatTest(ParityCase):
    """Sharded checkpoints (model.safetensors.index.json) and float16 / bfloat16 weights load as transformers
    loads them."""

    def test_sharded_half_precision_checkpoints(self):
        for name, dtype in [("opt-sharded-bf16", torch.bfloat16), ("llama-sharded-f16", torch.float16)]:
            torch.manual_seed(40)
            if name.startswith("opt"):
                model = OPTForCausalLM(OPTConfig(vocab_size=120, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                                 num_attention_heads=4, max_position_embeddings=64))
            else:
                model = self.llama()
            folder = self.dir / name
            model.to(dtype).save_pretrained(folder, max_shard_size="40KB")
            self.assertTrue((folder / "model.safetensors.index.json").exists())
            self.assertGreater(len(list(folder.glob("model-*.safetensors"))), 2)
            word_level_tokenizer_json(folder / "tokenizer.json", 120)
            # transformers' own float32 reading of the same half-precision files is the reference.
            reference = type(model).from_pretrained(folder, dtype=torch.float32).eval()
            ids, mask, positions = self.padded_batch(120)
            with torch.no_grad():
                ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ours = self.probe("backbone", name.split("-")[0], folder, {"input_ids": ids, "attention_mask": mask})
            valid = mask.bool()
            self.assert_close(ours["logits"][valid], ref[valid], f"{name} logits")


class GenerationParityTest(ParityCase):
    """Decoding with a KV cache gives transformers' generate() tokens: greedy, and sampled with temperature,
    top-k and top-p from the same seed."""

    def generate_parity(self, name, model):
        folder = self.dir / name
        model.eval().save_pretrained(folder)
        word_level_tokenizer_json(folder / "tokenizer.json", model.config.vocab_size)
        ids, mask, _ = self.padded_batch(model.config.vocab_size)
        save_file({"input_ids": ids, "attention_mask": mask}, str(self.dir / "in.safetensors"))
        for settings in [{"max_new_tokens": 20},
                         {"max_new_tokens": 20, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 123}]:
            out = subprocess.run([str(PROBE), "backbone", name.split("-")[0], str(folder), str(self.dir / "in.safetensors"),
                                  str(self.dir / "out.safetensors"), "{}", json.dumps(settings)], capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            ours = load_file(str(self.dir / "out.safetensors"))["generated"]
            kwargs = dict(max_new_tokens=20, eos_token_id=None, pad_token_id=0)
            if settings.get("do_sample"):
                torch.manual_seed(settings["seed"])
                kwargs.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                ref = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
            what = "sampled" if settings.get("do_sample") else "greedy"
            print(f"{name} {what}: {ours[0].tolist()[:10]}...")
            self.assertTrue(torch.equal(ours, ref), f"{name} {what}:\n ours {ours.tolist()}\n ref  {ref.tolist()}")

    def test_generation_opt(self):
        torch.manual_seed(30)
        self.generate_parity("opt-gen", OPTForCausalLM(OPTConfig(vocab_size=120, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                                 num_attention_heads=4, max_position_embeddings=64)))

    def test_generation_gpt2(self):
        torch.manual_seed(31)
        self.generate_parity("gpt2-gen", GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64)))

    def test_generation_llama(self):
        torch.manual_seed(32)
        self.generate_parity("llama-gen", self.llama(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                                      "rope_theta": 10000.0}))


class ExportParityTest(TempDirTest):
    """A tiny model trained by ablate and exported in Hugging Face layout loads in transformers and tokenizers and
    computes what ablate computes."""

    def test_exported_folders_load_in_transformers(self):
        extra = '[export]\nencoder = "out/encoder"\nbackbone = "out/backbone"\n'
        toml = self.write("export.toml", tiny_experiment("export", steps=4, every=4, extra=extra))
        done = run([toml, "--db", self.dir / "r.db"])
        self.assertEqual(done.returncode, 0, done.stderr)

        encoder = CLIPVisionModel.from_pretrained(self.dir / "out" / "encoder").eval()
        pixels = torch.randn(2, 3, 16, 16)
        save_file({"pixels": pixels}, str(self.dir / "px.safetensors"))
        subprocess.run([str(PROBE), "encoder", "clip_vit", str(self.dir / "out" / "encoder"), str(self.dir / "px.safetensors"),
                        str(self.dir / "f.safetensors")], check=True)
        with torch.no_grad():
            diff = (load_file(str(self.dir / "f.safetensors"))["features"] - encoder(pixel_values=pixels).last_hidden_state)
        self.assertLessEqual(diff.abs().max().item(), TOLERANCE)

        backbone = OPTForCausalLM.from_pretrained(self.dir / "out" / "backbone").eval()
        tokenizer = Tokenizer.from_file(str(self.dir / "out" / "backbone" / "tokenizer.json"))
        ids = torch.tensor([tokenizer.encode("where is the red circle ?").ids, tokenizer.encode("how many shapes are there ?").ids])
        self.assertEqual(ids[0, 0].item(), 1)  # <s> from the post-processor
        mask = torch.ones_like(ids)
        save_file({"input_ids": ids, "attention_mask": mask}, str(self.dir / "ids.safetensors"))
        subprocess.run([str(PROBE), "backbone", "opt", str(self.dir / "out" / "backbone"), str(self.dir / "ids.safetensors"),
                        str(self.dir / "l.safetensors")], check=True)
        with torch.no_grad():
            diff = load_file(str(self.dir / "l.safetensors"))["logits"] - backbone(input_ids=ids, attention_mask=mask).logits
        self.assertLessEqual(diff.abs().max().item(), TOLERANCE)
        config = json.loads((self.dir / "out" / "encoder" / "preprocessor_config.json").read_text())
        self.assertEqual(config["crop_size"], {"height": 16, "width": 16})


class TokenizerParityTest(TempDirTest):
    def test_word_level_matches_tokenizers_on_2000_strings(self):
        words = ["where", "is", "the", "red", "circle", "top", "left", "a", "b", "café", "中文", "x_y", "42", "?", ".", "!?"]
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
        for w in words:
            vocab.setdefault(w, len(vocab))
        doc = {"version": "1.0", "truncation": None, "padding": None,
               "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": True} for t, i in list(vocab.items())[:4]],
               "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
               "post_processor": {"type": "TemplateProcessing",
                                  "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                           {"Sequence": {"id": "B", "type_id": 1}}],
                                  "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
               "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
        path = self.dir / "tokenizer.json"
        path.write_text(json.dumps(doc))
        reference = Tokenizer.from_file(str(path))

        rng = random.Random(7)
        pieces = words + ["WHERE", "Red", "unknown", "zzz", "</s>", "<s>", "<pad>", "??", "...", ",", "-", "'s", "Café",
                          "中文字", "x_y_z", "3.14", "a-b", "(", ")"]
        spaces = [" ", "  ", "\t", "\n", " \n ", "", "   "]
        texts = []
        for _ in range(2000):
            texts.append("".join(rng.choice(pieces) + rng.choice(spaces) for _ in range(rng.randint(0, 12))))
        (self.dir / "in.json").write_text(json.dumps(texts))
        out = subprocess.run([str(PROBE), "tokenize", str(path), str(self.dir / "in.json"), str(self.dir / "out.json")],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        ours = json.loads((self.dir / "out.json").read_text())
        mismatches = 0
        for i, text in enumerate(texts):
            ref = reference.encode(text)
            if ours["ids"][i] != ref.ids or ours["decoded"][i] != reference.decode(ref.ids, skip_special_tokens=True):
                mismatches += 1
                if mismatches <= 5:
                    print(repr(text), ours["ids"][i], ref.ids, repr(ours["decoded"][i]))
        print(f"{len(texts)} strings, {mismatches} mismatches")
        self.assertEqual(mismatches, 0)


if __name__ == "__main__":
    unittest.main()
