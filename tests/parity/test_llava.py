"""End to end: clip_vit + mlp2x_gelu + llama in the `inline` layout computes what transformers'
LlavaForConditionalGeneration computes on the same tiny checkpoint (logits on a left-padded batch), and greedy
generation gives the same 20 token ids."""
import json
import subprocess
import unittest

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from ablate_testing import PROBE, TempDirTest

IMAGE = 127    # the image token's id
PATCHES = 4    # (28 / 14)^2; LLaVA's "default" strategy drops CLS


def word_level_tokenizer(folder):
    """A tokenizer with <s> and <image> and no EOS, so that neither side stops before 20 tokens."""
    vocab = {"<pad>": 0, "<s>": 1}
    vocab.update({f"w{i}": i for i in range(2, IMAGE)})
    vocab["<image>"] = IMAGE
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in [("<pad>", 0), ("<s>", 1), ("<image>", IMAGE)]]
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}}))


class LlavaParityTest(TempDirTest):
    def build(self):
        """A tiny LLaVA and its three parts written as LLaVA's checkpoints ship them; returns the model and the probe's spec."""
        torch.manual_seed(0)
        vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                         image_size=28, patch_size=14, projection_dim=16)
        text_config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=1, eos_token_id=None, pad_token_id=0)
        config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=IMAGE,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu", image_seq_length=PATCHES)
        llava = LlavaForConditionalGeneration(config).eval()

        # The three parts, as LLaVA's own checkpoints ship them: a CLIP vision tower, the LLM, the projector.
        vision = CLIPVisionModel(vision_config)
        vision.load_state_dict(llava.model.vision_tower.state_dict())
        vision.save_pretrained(self.dir / "vision")
        llm = LlamaForCausalLM(text_config)
        llm.model.load_state_dict(llava.model.language_model.state_dict())
        llm.lm_head.load_state_dict(llava.lm_head.state_dict())
        llm.save_pretrained(self.dir / "llm")
        word_level_tokenizer(self.dir / "llm")
        projector = llava.model.multi_modal_projector
        save_file({"model.mm_projector.0.weight": projector.linear_1.weight.detach().contiguous(),
                   "model.mm_projector.0.bias": projector.linear_1.bias.detach().contiguous(),
                   "model.mm_projector.2.weight": projector.linear_2.weight.detach().contiguous(),
                   "model.mm_projector.2.bias": projector.linear_2.bias.detach().contiguous()},
                  str(self.dir / "mm_projector.safetensors"))
        spec = {"encoder": {"plugin": "clip_vit", "weights": str(self.dir / "vision"), "feature_layer": -2, "tokens": "patches"},
                "projector": {"plugin": "mlp2x_gelu", "weights": str(self.dir / "mm_projector.safetensors")},
                "backbone": {"plugin": "llama", "weights": str(self.dir / "llm")},
                "layout": "inline"}
        return llava, spec

    def probe(self, spec, inputs):
        save_file(inputs, str(self.dir / "in.safetensors"))
        (self.dir / "spec.json").write_text(json.dumps(spec))
        out = subprocess.run([str(PROBE), "vlm", str(self.dir / "spec.json"), str(self.dir / "in.safetensors"),
                              str(self.dir / "out.safetensors")], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        return load_file(str(self.dir / "out.safetensors"))

    def test_inline_layout_matches_llava(self):
        llava, spec = self.build()

        # Logits on a left-padded batch of two prompts: ablate takes one <image> each; transformers takes the
        # image tokens already expanded, as LlavaProcessor makes them.
        pixels = torch.randn(2, 3, 28, 28)
        ours_ids = torch.tensor([[1, 5, 6, IMAGE, 7, 8, 9], [0, 0, 1, IMAGE, 10, 11, 12]])
        ours_mask = (torch.arange(7) >= torch.tensor([[0], [2]])).long()
        hf_ids = torch.tensor([[1, 5, 6] + [IMAGE] * PATCHES + [7, 8, 9], [0, 0, 1] + [IMAGE] * PATCHES + [10, 11, 12]])
        hf_mask = (torch.arange(10) >= torch.tensor([[0], [2]])).long()
        with torch.no_grad():
            ref = llava(input_ids=hf_ids, attention_mask=hf_mask, pixel_values=pixels).logits
        ours = self.probe(spec, {"pixels": pixels, "input_ids": ours_ids, "attention_mask": ours_mask})["logits"]
        self.assertEqual(tuple(ours.shape), tuple(ref.shape))
        valid = hf_mask.bool()
        diff = (ours[valid] - ref[valid]).abs().max().item()
        print(f"LLaVA inline logits: max abs difference {diff:.3g}")
        self.assertLessEqual(diff, 1e-4)

        # Greedy generation, 20 tokens, with a KV cache on both sides: ours with a growing cache, and with the
        # fixed-size one CUDA graphs replay (--decode-graph on; eager steps here).
        with torch.no_grad():
            ref_ids = llava.generate(input_ids=hf_ids[:1], attention_mask=hf_mask[:1], pixel_values=pixels[:1],
                                     max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = ref_ids[0, hf_ids.shape[1]:].tolist()
        for decode_graph in ("off", "on"):
            spec.update(generate=20, decode_graph=decode_graph)
            generated = self.probe(spec, {"pixels": pixels[:1].contiguous(), "input_ids": ours_ids[:1].contiguous(),
                                          "attention_mask": ours_mask[:1].contiguous()})["generated"][0].tolist()
            print(f"greedy ({decode_graph}): ours {generated}\n              ref  {expected}")
            self.assertEqual(generated, expected, decode_graph)

    def test_generation_stops_where_generate_does(self):
        # transformers' generate() stops at generation_config.json's eos_token_id when the folder has that file,
        # else at config.json's, which may be a list (Llama 3.1: three ids). The tokenizer here has no EOS, so
        # every stop below comes from the folder's configs, read as from_pretrained reads them.
        llava, spec = self.build()
        pixels = torch.randn(1, 3, 28, 28)
        inputs = {"pixels": pixels, "input_ids": torch.tensor([[1, 5, 6, IMAGE, 7, 8, 9]]),
                  "attention_mask": torch.ones(1, 7, dtype=torch.long)}
        hf_ids = torch.tensor([[1, 5, 6] + [IMAGE] * PATCHES + [7, 8, 9]])

        def generate(eos):
            with torch.no_grad():
                out = llava.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels,
                                     max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
            return out[0, hf_ids.shape[1]:].tolist()

        free = generate(None)
        first = {}
        for step, token in enumerate(free):
            first.setdefault(token, step)
        late = next(t for t, step in first.items() if step >= 4)      # config.json's stop
        early = next(t for t, step in first.items() if 1 <= step < first[late])  # generation_config.json's
        unused = next(t for t in range(2, IMAGE) if t not in first)
        folder = self.dir / "llm"
        config = json.loads((folder / "config.json").read_text())
        config["eos_token_id"] = [unused, late]
        (folder / "config.json").write_text(json.dumps(config))
        spec.update(generate=20)
        for case, generation_config, stop in (("config.json's list", None, late), ("generation_config.json", {"eos_token_id": early}, early)):
            with self.subTest(case):
                (folder / "generation_config.json").unlink(missing_ok=True)
                if generation_config:
                    (folder / "generation_config.json").write_text(json.dumps(generation_config))
                eos = LlamaForCausalLM.from_pretrained(folder).generation_config.eos_token_id
                ref = generate(eos)
                self.assertEqual(ref[-1], stop, "transformers stopped where the test expects")
                self.assertEqual(ref, free[:first[stop] + 1])
                ours = [t for t in self.probe(spec, inputs)["generated"][0].tolist() if t >= 0]
                print(f"{case}: eos {eos}; ours {ours}, generate() {ref} (its last token is the EOS, which ablate drops)")
                self.assertEqual(ours, ref[:-1])


if __name__ == "__main__":
    unittest.main()
