"""Training parity with the Python references: LoRA as PEFT computes it (logits, gradients of A and B, adapter
files both ways, merged export), gradient checkpointing, and AdamW with a cosine schedule as torch.optim and
transformers' scheduler run it. ablate's side is component_probe's `train` mode, which applies strategies and
steps the optimizer with the runner's own code."""
import copy
import json
import subprocess
import unittest

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM, Trainer, get_cosine_schedule_with_warmup)

from ablate_testing import PROBE, TempDirTest
from test_components import left_padded_batch, word_level_tokenizer_json

LOGITS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
PARAM_TOLERANCE = 1e-6


def peft_name(name):
    """PEFT's parameter name -> the name within the component that ablate uses."""
    return (name.removeprefix("base_model.model.").replace(".default.", ".").replace(".modules_to_save.", ".")
            .replace(".original_module.", "."))


class TrainingParityCase(TempDirTest):
    def train_probe(self, kind, plugin, folder, inputs, spec):
        save_file(inputs, str(self.dir / "in.safetensors"))
        (self.dir / "spec.json").write_text(json.dumps(spec))
        out = subprocess.run([str(PROBE), "train", kind, plugin, str(folder), str(self.dir / "in.safetensors"),
                              str(self.dir / "out.safetensors"), str(self.dir / "spec.json")], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.probe_stderr = out.stderr  # what the runner would log: which fused paths ran
        return load_file(str(self.dir / "out.safetensors"))

    def assert_close(self, ours, ref, tolerance, what):
        diff = (ours.double() - ref.double()).abs().max().item()
        print(f"{what}: max abs difference {diff:.3g}")
        self.assertLessEqual(diff, tolerance, what)

    def text_batch(self, vocab, length=10):
        ids, mask, positions = left_padded_batch(vocab, length, pads=(0, 3, 5))
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, -3] = -100  # a masked label among real tokens, as a prompt would be
        # The first real token has no label: its prediction would come from a padding position, whose logits
        # no two implementations need agree on (and no real batch trains on).
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        return ids, mask, positions, labels

    def save_base(self, name, model):
        folder = self.dir / name
        model.save_pretrained(folder)
        if hasattr(model.config, "vocab_size") and not isinstance(model, CLIPVisionModel):
            word_level_tokenizer_json(folder / "tokenizer.json", model.config.vocab_size)
        return folder


class PeftParityTest(TrainingParityCase):
    """The same LoRA configuration and A/B weights give PEFT's logits and gradients; adapters travel both ways."""

    def lm_case(self, name, plugin, make_model, lora, ablate_lora, checkpointing=False, fused_norm=False, fused_relu=False):
        torch.manual_seed(0)
        base = make_model().train()
        folder = self.save_base(name, base)
        ids, mask, positions, labels = self.text_batch(base.config.vocab_size)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

        # PEFT -> ablate: random A and B (B is zero after PEFT's initialisation, which would make A's gradient
        # zero and prove nothing), and perturbed modules_to_save.
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **lora))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        peft_model.save_pretrained(self.dir / f"{name}-peft")
        out = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
        out.loss.backward()
        ref_grads = {peft_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        spec = {"strategy": [{"plugin": "lora", "weights": str(self.dir / f"{name}-peft")}], "grads": True}
        if checkpointing:
            spec["train"] = {"gradient_checkpointing": ["backbone"]}
        spec["fused_norm"] = fused_norm
        spec["fused_relu"] = fused_relu
        ours = self.train_probe("backbone", plugin, folder, batch, spec)
        valid = mask.bool()
        self.assert_close(ours["logits"][valid], out.logits.detach()[valid], LOGITS_TOLERANCE,
                          f"{name}: logits with PEFT's adapter")
        self.assert_close(ours["loss"], out.loss.detach().reshape(1), LOGITS_TOLERANCE, f"{name}: loss")
        ours_grads = {k.removeprefix("grad:"): v for k, v in ours.items() if k.startswith("grad:")}
        self.assertEqual(sorted(ours_grads), sorted(ref_grads), f"{name}: the same parameters train")
        worst = max((ours_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        print(f"{name}: {len(ref_grads)} gradients (A, B, modules_to_save), max abs difference {worst:.3g}")
        self.assertLessEqual(worst, GRAD_TOLERANCE)

        # ablate -> PEFT: a few optimizer steps so that B is no longer zero, then the adapter ablate wrote is
        # loaded by PEFT, and the merged export by transformers.
        spec = {"strategy": [{"plugin": "lora", **ablate_lora}], "steps": 3,
                "train": {"lr": 1e-2, "schedule": {"kind": "constant"}, "steps": 3},
                "save_adapter": str(self.dir / f"{name}-ours"), "export": str(self.dir / f"{name}-merged"),
                "fused_norm": fused_norm, "fused_relu": fused_relu}
        ours = self.train_probe("backbone", plugin, folder, batch, spec)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base).eval(), self.dir / f"{name}-ours")
        with torch.no_grad():
            theirs = loaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        self.assert_close(ours["logits"][valid], theirs[valid], LOGITS_TOLERANCE, f"{name}: PEFT loads ablate's adapter")
        self.assertGreater((theirs - base.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits).abs().max().item(),
                           1e-3, "the adapter changes the output")
        merged = AutoModelForCausalLM.from_pretrained(self.dir / f"{name}-merged").eval()
        with torch.no_grad():
            merged_logits = merged(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            peft_merged = loaded.merge_and_unload()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        self.assert_close(merged_logits[valid], ours["logits"][valid], LOGITS_TOLERANCE, f"{name}: merged export in transformers")
        self.assert_close(merged_logits[valid], peft_merged[valid], LOGITS_TOLERANCE, f"{name}: merged export vs PEFT's merge")

    def test_opt_lora_with_modules_to_save(self):
        make = lambda: OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                                dropout=0.0))
        self.lm_case("opt", "opt", make,
                     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["layers.1.fc2"]),
                     dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["layers.1.fc2"]))

    def test_opt_lora_fused_norm(self):
        # --fused-norm on (sdk::add_layer_norm's fused path: on the CPU its loop over rows), pre- and post-LN,
        # with a norm among modules_to_save so that its weight's and bias's gradients are checked too.
        for before in (True, False):
            with self.subTest(do_layer_norm_before=before):
                make = lambda: OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                        num_attention_heads=4, max_position_embeddings=64,
                                                        word_embed_proj_dim=32, dropout=0.0, do_layer_norm_before=before))
                saved = ["layers.1.fc2", "layers.0.self_attn_layer_norm", "layers.1.final_layer_norm"]
                self.lm_case(f"opt-fused-{'pre' if before else 'post'}", "opt", make,
                             dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=saved),
                             dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=saved), fused_norm=True)

    def test_opt_lora_fused_relu(self):
        # --fused-relu on (sdk::relu_mlp: fc1 -> ReLU -> fc2 as one node; on the CPU torch's ops inside it): frozen
        # MLPs, an fc1 and an fc2 trained whole (their weights' and biases' gradients), with gradient
        # checkpointing (the node run again in backward) and without.
        for checkpointing in (False, True):
            with self.subTest(checkpointing=checkpointing):
                make = lambda: OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                        num_attention_heads=4, max_position_embeddings=64,
                                                        word_embed_proj_dim=32, dropout=0.0))
                saved = ["layers.0.fc1", "layers.1.fc2"]
                self.lm_case(f"opt-relu{'-ckpt' if checkpointing else ''}", "opt", make,
                             dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=saved),
                             dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=saved),
                             checkpointing=checkpointing, fused_relu=True)

    def test_llama_lora_rslora_regex_targets(self):
        make = lambda: LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        pattern = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)"
        self.lm_case("llama", "llama", make, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=pattern),
                     dict(r=8, alpha=16, rslora=True, target_modules=pattern), checkpointing=True)

    def test_llama_lora_fused_norm(self):
        # --fused-norm on, layers chained (no checkpointing): each layer's last residual add runs inside the next
        # layer's input_layernorm (sdk::pre_ln_block with RMSNorms), with RMSNorms among modules_to_save so that
        # their weights' gradients are checked too.
        make = lambda: LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        saved = ["layers.0.post_attention_layernorm", "layers.1.input_layernorm"]
        targets = ["q_proj", "v_proj", "gate_proj"]
        self.lm_case("llama-fused", "llama", make, dict(r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved),
                     dict(r=4, alpha=8, target_modules=targets, modules_to_save=saved), fused_norm=True)

    def test_lora_without_target_modules_takes_peft_default(self):
        # No target_modules: PEFT picks them by the model's model_type (GPT-2's fused c_attn, OPT's and LLaMA's q_proj
        # and v_proj); ablate must adapt the same layers. For a vision tower PEFT has no default and asks for them;
        # ablate takes q_proj and v_proj there (README), checked last.
        backbones = {
            "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)),
            "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        }
        for plugin, make in backbones.items():
            with self.subTest(plugin):
                torch.manual_seed(0)
                base = make()
                folder = self.save_base(f"default-{plugin}", base)
                expected = sorted(peft_name(n) for n, p in get_peft_model(copy.deepcopy(base), LoraConfig(r=4)).named_parameters()
                                  if p.requires_grad)
                ids, mask, positions, labels = self.text_batch(base.config.vocab_size)
                ours = self.train_probe("backbone", plugin, folder, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                        {"strategy": [{"plugin": "lora", "r": 4}], "grads": True})
                trained = sorted(k.removeprefix("grad:") for k in ours if k.startswith("grad:"))
                print(f"{plugin}: PEFT's default adapts {sorted({n.split('.')[-3] for n in expected})}")
                self.assertEqual(trained, expected)
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                image_size=16, patch_size=8))
        with self.assertRaisesRegex(ValueError, "target_modules"):
            get_peft_model(copy.deepcopy(clip), LoraConfig(r=4))
        folder = self.save_base("default-clip", clip)
        ours = self.train_probe("encoder", "clip_vit", folder, {"pixels": torch.randn(2, 3, 16, 16), "probe": torch.randn(2, 5, 32)},
                                {"strategy": [{"plugin": "lora", "component": "encoder", "r": 4}], "grads": True})
        self.assertEqual({k.split(".")[-3] for k in ours if k.startswith("grad:")}, {"q_proj", "v_proj"})

    def test_gpt2_lora_on_conv1d(self):
        make = lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                                  embd_pdrop=0.0, attn_pdrop=0.0))
        # Also with --fused-norm on (each block's residual adds inside the next norm: sdk::pre_ln_block), with
        # norms among modules_to_save so that their gradients are checked too.
        for fused in (False, True):
            with self.subTest(fused_norm=fused):
                saved = ["h.0.ln_2", "h.1.ln_1"] if fused else None
                self.lm_case(f"gpt2{'-fused' if fused else ''}", "gpt2", make,
                             dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                  modules_to_save=saved),
                             dict(r=4, alpha=8, target_modules=["c_attn", "c_proj"], modules_to_save=saved or []),
                             fused_norm=fused)

    def clip_case(self, name, saved, spec):
        """PEFT's adapter (random A and B, perturbed modules_to_save) on a CLIP vision tower: ablate's features and
        gradients against PEFT's. Returns the base model, its folder, and the batch."""
        torch.manual_seed(0)
        base = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                image_size=16, patch_size=8)).train()
        folder = self.save_base(name, base)
        pixels = torch.randn(2, 3, 16, 16)
        probe = torch.randn(2, 5, 32)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj", "fc1"],
                                                                    modules_to_save=saved))
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        peft_model.save_pretrained(self.dir / f"{name}-peft")
        hidden = peft_model(pixel_values=pixels).last_hidden_state
        (hidden * probe).sum().backward()
        ref_grads = {peft_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        ours = self.train_probe("encoder", "clip_vit", folder, {"pixels": pixels, "probe": probe},
                                {"strategy": [{"plugin": "lora", "component": "encoder", "weights": str(self.dir / f"{name}-peft")}],
                                 "grads": True, **spec})
        self.assert_close(ours["features"], hidden.detach(), LOGITS_TOLERANCE, f"{name}: features with PEFT's adapter")
        ours_grads = {k.removeprefix("grad:"): v for k, v in ours.items() if k.startswith("grad:")}
        self.assertEqual(sorted(ours_grads), sorted(ref_grads))
        worst = max((ours_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
        print(f"{name}: {len(ref_grads)} gradients, max abs difference {worst:.3g}")
        self.assertLessEqual(worst, GRAD_TOLERANCE)
        return base, folder, pixels, probe

    def test_clip_vision_lora_fused_norm(self):
        # --fused-norm on, layers chained (no checkpointing): each layer's last add runs inside the next
        # layer's layer_norm1; two norms among modules_to_save so that their gradients are checked too.
        self.clip_case("clip-fused", ["pre_layrnorm", "layers.0.layer_norm2", "layers.1.layer_norm1"], {"fused_norm": True})

    def test_clip_vision_lora(self):
        base, folder, pixels, probe = self.clip_case("clip", ["pre_layrnorm"], {"train": {"gradient_checkpointing": ["encoder"]}})

        ours = self.train_probe("encoder", "clip_vit", folder, {"pixels": pixels, "probe": probe},
                                {"strategy": [{"plugin": "lora", "component": "encoder", "target_modules": ["q_proj", "v_proj"]}],
                                 "steps": 2, "train": {"lr": 1e-2, "steps": 2}, "save_adapter": str(self.dir / "clip-ours")})
        loaded = PeftModel.from_pretrained(copy.deepcopy(base).eval(), self.dir / "clip-ours")
        with torch.no_grad():
            theirs = loaded(pixel_values=pixels).last_hidden_state
        self.assert_close(ours["features"], theirs, LOGITS_TOLERANCE, "clip: PEFT loads ablate's adapter")


class OptimizerParityTest(TrainingParityCase):
    def test_adamw_cosine_ten_steps_match_torch_optim(self):
        """10 steps of AdamW (decoupled weight decay, transformers' decay/no-decay split, a second group with its own
        learning rate as LLaVA's mm_projector_lr), a cosine schedule with warm-up and gradient clipping."""
        # LLaMA rather than OPT: OPT's k_proj bias has a gradient that is zero in exact arithmetic (softmax does
        # not see a shift of every key score), so both sides' gradients there are rounding noise, which Adam's
        # normalisation turns into steps the size of the learning rate. That would compare float rounding
        # in two forward passes, not optimizers. LLaMA has no such parameter: 1e-7 relative noise in its
        # gradients moves the parameters of this test by about 1e-7.
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=False)).train()
        folder = self.save_base("llama", model)
        ids, mask, positions, labels = self.text_batch(96)
        train = {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "max_grad_norm": 0.5, "steps": 10,
                 "schedule": {"kind": "cosine", "warmup_steps": 2}}
        ours = self.train_probe("backbone", "llama", folder, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                {"strategy": ["full", {"plugin": "head", "lr": 1e-3}], "steps": 10, "train": train,
                                 "grads": True})

        decay = set(Trainer.get_decay_parameter_names(None, model))
        named = dict(model.named_parameters())
        head = {"lm_head.weight"}
        groups = [
            {"params": [p for n, p in named.items() if n in decay and n not in head], "weight_decay": 0.1},
            {"params": [p for n, p in named.items() if n not in decay and n not in head], "weight_decay": 0.0},
            {"params": [named["lm_head.weight"]], "weight_decay": 0.1, "lr": 1e-3},
        ]
        optimizer = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
        schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
        losses = []
        for _ in range(10):
            loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
            loss.backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        self.assert_close(ours["losses"], torch.tensor(losses, dtype=torch.float64), 1e-5, "losses over 10 steps")
        self.assertLess(losses[-1], losses[0] - 0.1, "the model learned")
        worst, compared = 0.0, 0
        for name, p in named.items():
            worst = max(worst, (ours["param:" + name] - p.detach()).abs().max().item())
            compared += 1
        print(f"{compared} parameters after 10 AdamW steps: max abs difference {worst:.3g}")
        self.assertEqual(compared, len([k for k in ours if k.startswith("param:")]))
        self.assertLessEqual(worst, PARAM_TOLERANCE)


if __name__ == "__main__":
    unittest.main()
