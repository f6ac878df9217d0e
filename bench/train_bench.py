#!/usr/bin/env python3
"""Training-step benchmark, issue 7 items 4 and 5: the same VLM trained by ablate (the runner on a generated
experiment TOML) and by a Python reference (transformers + PEFT, eager, and the same under torch.compile), on the
same machine in one run, alternating A/B/C runs.

    python bench/train_bench.py --tiny                                   # CPU, tiny model
    python bench/train_bench.py --runner .gpu/bin/runner --device cuda   # GPU: ViT-B/16 + GIT + OPT-350m shapes

What is the same on both sides
  * model: a CLIP vision tower (CLIPVisionModel; features = last_hidden_state, CLS kept, as clip_vit's
    tokens = "all"), GIT's projection (Linear + LayerNorm), an OPT backbone (OPTForCausalLM, tied head),
    random weights generated once here and saved in Hugging Face layout (safetensors), read by both sides.
    Dropout is 0 in the generated configs (otherwise the two sides draw different masks).
    The OPT position-embedding row 1 (index -1 + offset 2) is zeroed: ablate gives image tokens no position
    embedding; the reference passes position_ids = -1 for image tokens, which reads that row.
  * layout "prefix" (GIT): image tokens first, bidirectional among themselves, text causal and seeing every
    image token, text positions from 0. The reference passes this as a 4-D boolean mask to transformers' OPT
    decoder (transformers uses a 4-D mask as given), built once per batch (ablate rebuilds it per layer).
  * LoRA: both sides start from one PEFT adapter folder (PeftModel.from_pretrained / lora weights = DIR);
    the projector trains in full too (strategy = ["projector", lora]); encoder and the rest frozen.
  * data: a COCO-captions file (coco_captions plugin) over generated PNG images; empty prompt (GIT
    captioning): text = BOS + caption + EOS, loss on the caption and EOS only (loss_on = "target"); every
    caption has the same number of words, so no batch has padding. Sample order: the reference reimplements
    runner/data/batches.cpp's SampleOrder (mt19937_64 Fisher-Yates per epoch, seed * 0x9e3779b97f4a7c15 +
    epoch + 1, the experiment's seed for a one-dataset, one-stage run) - see SampleOrder below.
  * preprocessing: the encoder folder's preprocessor_config.json, read by ablate's clip_vit and by
    transformers' CLIPImageProcessorPil (PIL bicubic resize of the shortest side, centre crop).
  * loss: sum of cross-entropy over the loss tokens / their count, in float32; the head runs on the loss
    positions only (as ablate's VlmModel::loss_sum does), logits cast to float32.
  * recipe: AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), constant LR, gradient clipping at 1.0;
    GPU: bf16 autocast around the forward pass on both sides, float32 master weights.

What ablate does that the reference does not: with the encoder frozen, its features are computed once per image
before step 1 (the runner's frozen-encoder feature cache, --feature-cache, issue 7 item 2) and each step reads
them instead of running the encoder. `ablate-nocache` (in --refs by default) is the same runner with the cache
off, so both figures come from one invocation; the cache's build time is printed and is in the wall time.
On CUDA the runner replays each step's forward and backward passes as a CUDA graph by default (--train-graph
auto, train/train_steps.hpp; its log says whether each capture was accepted); `ablate-nograph` (in --refs by
default on CUDA) is the same runner with eager steps (--train-graph off). `ablate-graph` (--refs graph) forces
--train-graph on, which on the CPU pads the steps without a graph to pay for it. On CUDA the runner also runs
OPT's residual adds, LayerNorms and the casts of their outputs in one pass each way by default (--fused-norm
auto; our kernels, sdk/src/cuda/add_layer_norm.cu): `ablate-unfused` (in --refs by default on CUDA) runs with
--fused-norm off, `ablate-fused` with it on (the CPU's default is off). `ablate-relu` (in --refs by default on
CUDA) runs with --fused-relu on: OPT's fc1 writes its ReLU's mask as bits and fc2's backward product applies it
(cuBLASLt epilogues, sdk/src/cuda/relu_gemm.cpp; off by default, slower at batch 256 on an H100);
`ablate-fusedall` with both on.

Differences that favour the reference: its images are decoded and preprocessed once before timing (ablate
decodes and preprocesses every step on its data threads), and its batches are pre-built on the host.

Timing: ablate's per-step time comes from its results DB (`steps` rows with log_every = 1: step time =
batch / samples_per_s; an interval runs from the end of one step's log flush to the end of the next step's
loss read, so it includes one device sync per step, as the reference's loss.item() does). The reference
times each step with perf_counter around data transfer, forward, backward, clipping, optimizer step and
loss.item(). Medians, p10 and p90 are over the `--measure` steps after `--warmup` steps of each run; with
several rounds every run's measured steps are pooled per system.
"""
import argparse
import json
import math
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
H100_BF16_DENSE = 989e12  # H100 SXM, dense bf16 tensor-core peak

# --------------------------------------------------------------------------------------------- model sizes

SIZES = {
    # ViT-B/16 (CLIP), OPT-350m shapes (hidden 1024, 24 layers, 16 heads, ffn 4096, word_embed_proj_dim 512).
    "full": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16, hidden_act="quick_gelu", projection_dim=512),
        opt=dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                 max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False,
                 activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2),
        images=64, image_wh=(256, 240), caption_words=24),
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=32),
        opt=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                 max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False,
                 activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2),
        images=32, image_wh=(40, 36), caption_words=12),
}
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
# What trains, by name: the runner's strategy list (TOML) and the parts the reference trains. The projector
# trains in every one; "head" is OPT's tied embedding matrix; "lora" is the adapter folder made by make_assets.
STRATEGIES = {
    "projector": ('["projector"]', {"projector"}),
    "projector+head": ('["projector", "head"]', {"projector", "head"}),
    "projector+lora": ('["projector", {{ plugin = "lora", weights = "{work}/adapter" }}]', {"projector", "lora"}),
    "projector+encoder": ('["projector", "encoder"]', {"projector", "encoder"}),
    "full": ('["full"]', {"projector", "encoder", "backbone"}),
}


# --------------------------------------------------------------------------------------------- sample order

class MT19937_64:
    """std::mt19937_64, as the C++ standard fixes it."""
    M = (1 << 64) - 1

    def __init__(self, seed):
        self.mt = [0] * 312
        self.mt[0] = seed & self.M
        for i in range(1, 312):
            prev = self.mt[i - 1]
            self.mt[i] = (6364136223846793005 * (prev ^ (prev >> 62)) + i) & self.M
        self.i = 312

    def __call__(self):
        mt = self.mt
        if self.i >= 312:
            for k in range(312):
                x = (mt[k] & 0xFFFFFFFF80000000) | (mt[(k + 1) % 312] & 0x7FFFFFFF)
                xa = x >> 1
                if x & 1:
                    xa ^= 0xB5026F5AA96619E9
                mt[k] = mt[(k + 156) % 312] ^ xa
            self.i = 0
        y = mt[self.i]
        self.i += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & self.M


class SampleOrder:
    """runner/data/batches.cpp SampleOrder: a Fisher-Yates permutation per epoch."""

    def __init__(self, count, seed):
        self.count, self.seed, self.epoch, self.perm = count, seed, None, None

    def at(self, n):
        epoch = n // self.count
        if epoch != self.epoch:
            perm = list(range(self.count))
            rng = MT19937_64((self.seed * 0x9E3779B97F4A7C15 + epoch + 1) & MT19937_64.M)
            for i in range(self.count, 1, -1):
                j = rng() % i
                perm[i - 1], perm[j] = perm[j], perm[i - 1]
            self.perm, self.epoch = perm, epoch
        return self.perm[n % self.count]


# --------------------------------------------------------------------------------------------- assets

def word_level_tokenizer(folder, vocab_size):
    """WordLevel over w4..w{V-1} with OPT's special ids (<s> 0, <pad> 1, </s> 2, <unk> 3); BOS = EOS = </s>
    added by a TemplateProcessing post-processor, as OPT's tokenizer adds it."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)]]
    post = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": post, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_assets(work, size):
    """Weights, tokenizer, adapter and dataset under `work`, once (kept while the spec is unchanged)."""
    spec = SIZES[size]
    stamp = work / "assets.json"
    want = json.dumps({"size": size, "spec": spec, "lora": LORA}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    v = spec["vision"]
    vision = CLIPVisionModel(CLIPVisionConfig(attention_dropout=0.0, **v))
    vision.save_pretrained(work / "vision")
    px = v["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px}).save_pretrained(work / "vision")
    del vision

    o = spec["opt"]
    llm = OPTForCausalLM(OPTConfig(dropout=0.0, attention_dropout=0.0, **o))
    with torch.no_grad():
        llm.model.decoder.embed_positions.weight[1].zero_()  # position -1: image tokens (see the docstring)
    llm.save_pretrained(work / "llm")
    word_level_tokenizer(work / "llm", o["vocab_size"])
    peft = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **LORA))
    peft.save_pretrained(work / "adapter")
    del peft, llm

    lin = torch.nn.Linear(v["hidden_size"], o["hidden_size"])
    ln = torch.nn.LayerNorm(o["hidden_size"], eps=1e-5)
    save_file({"visual_projection.0.weight": lin.weight.detach().contiguous(),
               "visual_projection.0.bias": lin.bias.detach().contiguous(),
               "visual_projection.1.weight": ln.weight.detach().contiguous(),
               "visual_projection.1.bias": ln.bias.detach().contiguous()}, str(work / "projector.safetensors"))

    rng = np.random.default_rng(0)
    (work / "data" / "images").mkdir(parents=True)
    w, h = spec["image_wh"]
    images, annotations = [], []
    for i in range(spec["images"]):
        x = np.linspace(0, 255, w)[None, :, None]
        y = np.linspace(0, 255, h)[:, None, None]
        mix = rng.uniform(0.2, 1.0, 3)
        base = (x * mix + y * mix[::-1]) / 1.5 + rng.normal(0, 25, (h, w, 3))
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        x0, y0 = rng.uniform(0, 0.5) * w, rng.uniform(0, 0.5) * h
        d.ellipse([x0, y0, x0 + w * 0.4, y0 + h * 0.4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f"{i:04d}.png"
        im.save(work / "data" / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        words = " ".join(f"w{int(k)}" for k in rng.integers(4, o["vocab_size"], spec["caption_words"]))
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": words})
    (work / "data" / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    stamp.write_text(want)
    print(f"assets ({size}) written to {work} in {time.time() - t0:.1f}s", flush=True)


# --------------------------------------------------------------------------------------------- ablate

def model_and_data(work, eval_limit):
    """The [model] and [data] tables of the generated assets (shared with generate_bench.py)."""
    data = f'file = "{work}/data/captions.json", image_folder = "{work}/data/images"'
    return f'''[model]
layout = "prefix"
encoder = {{ plugin = "clip_vit", weights = "{work}/vision" }}
projector = {{ plugin = "git", weights = "{work}/projector.safetensors" }}
backbone = {{ plugin = "opt", weights = "{work}/llm" }}

[data]
train = {{ plugin = "coco_captions", {data} }}
eval = {{ plugin = "coco_captions", {data}, limit = {eval_limit} }}
'''


def experiment_toml(work, args, grid=None):
    """The benchmark's experiment: projector + LoRA, or with `grid` (names of STRATEGIES) a grid over them."""
    strategy = STRATEGIES["projector+lora"][0].format(work=work)
    if grid:
        strategy = ", ".join(STRATEGIES[g][0].format(work=work) for g in grid)
        strategy = f"[{strategy}]"
    return f'''{"" if grid else f"strategy = {strategy}"}

[experiment]
name = "bench"
seed = {args.seed}

{model_and_data(work, eval_limit=1)}
[train]
steps = {args.warmup + args.measure}
batch_size = {args.batch}
lr = {args.lr}
schedule = {{ kind = "constant" }}
max_grad_norm = 1.0
weight_decay = 0.0
precision = "{args.precision}"
loss_on = "target"
max_text_tokens = 64
log_every = 1
checkpoint_every = 0

[eval]
every = 0
at_start = false
samples = 0
generate = {{ max_new_tokens = 1 }}
{f"""
[grid]
strategy = {strategy}
""" if grid else ""}'''


class GpuMemory:
    """Peak device memory in use (nvidia-smi, 100 ms) while a child runs, over the idle baseline."""

    def __init__(self, enabled):
        self.enabled, self.peak, self.base, self.proc = enabled, 0, 0, None

    def __enter__(self):
        if not self.enabled or not shutil.which("nvidia-smi"):
            self.enabled = False
            return self
        q = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        self.base = int(subprocess.run(q, capture_output=True, text=True).stdout.split()[0])
        self.proc = subprocess.Popen(q + ["-lms", "100"], stdout=subprocess.PIPE, text=True)

        def read():
            for line in self.proc.stdout:
                try:
                    self.peak = max(self.peak, int(line.strip()))
                except ValueError:
                    pass
        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def mib(self):
        return max(self.peak - self.base, 0) if self.enabled else None


CHILD_TIMEOUT = [0]


class Failed(Exception):
    pass


def run_child(cmd, log, env=None, gpu=False):
    """Runs cmd with its output in `log`; returns (status, wall seconds, peak RSS MiB, peak GPU MiB)."""
    with open(log, "w") as f, GpuMemory(gpu) as mem:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        timer = None
        if CHILD_TIMEOUT[0] > 0:
            timer = threading.Timer(CHILD_TIMEOUT[0], p.kill)
            timer.start()
        _, status, usage = os.wait4(p.pid, 0)
        if timer:
            timer.cancel()
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, wall, usage.ru_maxrss / 1024, mem.mib()


# system: (feature cache, --train-graph, --fused-norm, --fused-relu); None: the runner's default
ABLATE_SYSTEMS = {"ablate": (True, None, None, None), "nocache": (False, None, None, None),
                  "graph": (True, "on", None, None), "nograph": (True, "off", None, None),
                  "fused": (True, None, "on", None), "unfused": (True, None, "off", None),
                  "relu": (True, None, None, "on"), "fusedall": (True, None, "on", "on")}


def ablate_cached(system):
    """Whether an ablate system's steps read the frozen-encoder feature cache (its name as printed)."""
    key = "ablate" if system == "ablate" else system.removeprefix("ablate-")
    return key in ABLATE_SYSTEMS and ABLATE_SYSTEMS[key][0]


def run_ablate(work, args, k, system="ablate"):
    """One ablate run, as the runner runs by default ("ablate"), with its frozen-encoder feature cache off
    ("nocache": --feature-cache off), with --train-graph on ("graph": the CPU's default is off) or off
    ("nograph": eager steps; CUDA's default is on), with --fused-norm on ("fused": the residual add +
    LayerNorm kernels; CUDA's default) or off ("unfused": torch's ops; the CPU's default), --fused-relu on
    ("relu": cuBLASLt's ReLU-mask epilogues in OPT's MLPs; off by default) or both on ("fusedall")."""
    cache, graph, fused, relu = ABLATE_SYSTEMS[system]
    system = "ablate" if system == "ablate" else f"ablate-{system}"
    d = work / "runs" / f"{system}-{k}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "bench.toml").write_text(experiment_toml(work, args))
    cmd = [str(args.runner), str(d / "bench.toml"), "--db", str(d / "results.db"), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if not cache:
        cmd += ["--feature-cache", "off"]
    if graph:
        cmd += ["--train-graph", graph]
    if fused:
        cmd += ["--fused-norm", fused]
    if relu:
        cmd += ["--fused-relu", relu]
    rc, wall, rss, gpu = run_child(cmd, d / "log.txt", gpu=args.device.startswith("cuda"))
    if rc != 0:
        raise Failed(f"ablate run {k} failed (exit {rc}); see {d / 'log.txt'}:\n" + (d / "log.txt").read_text()[-3000:])
    db = sqlite3.connect(d / "results.db")
    rows = db.execute("SELECT step, loss, samples_per_s, tokens, loss_tokens FROM steps WHERE split = 'train' "
                      "ORDER BY step").fetchall()
    # Building the feature cache happens before the first step: not in any step time, but in the wall time.
    log = (d / "log.txt").read_text()
    cache_s = sum(float(m) for m in re.findall(r"feature cache: data\.train.*encoded in ([0-9.]+)s", log))
    return {"system": system, "paths": paths_taken(log), "losses": [r[1] for r in rows], "step_s": [args.batch / r[2] for r in rows],
            "text_tokens": [r[3] for r in rows], "loss_tokens": [r[4] for r in rows], "wall_s": wall,
            "peak_rss_mib": rss, "peak_gpu_mib": gpu, "log": str(d / "log.txt"), "cache_build_s": cache_s}


def paths_taken(log):
    """The runner's lines saying which step path ran: CUDA graphs or why not, whether --fused-norm's kernels ran
    (on CUDA by default), and whether --fused-relu's cuBLASLt epilogues ran or were refused for these sizes (the
    fallback is torch's ops, so a timing means little without them)."""
    keep = re.compile(r"^\s*(relu_mlp: .*|training steps?: .*(graph|padded).*|--fused-norm .*)$")
    return list(dict.fromkeys(m.group(1).strip() for m in map(keep.match, log.splitlines()) if m))


def run_reference(work, args, k, compiled, strategy="projector+lora"):
    """One reference process. `strategy`: what trains, one of STRATEGIES (grid_bench.py runs them all)."""
    name = "hf-compile" if compiled else "hf-eager"
    d = work / "runs" / (f"{name}-{k}" if strategy == "projector+lora" else f"{name}-{strategy}-{k}")
    d.mkdir(parents=True, exist_ok=True)
    out = d / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--work", str(work), "--out", str(out)]
    cmd += ["--size", args.size, "--device", args.device, "--batch", str(args.batch), "--warmup", str(args.warmup),
            "--measure", str(args.measure), "--lr", str(args.lr), "--precision", args.precision, "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if compiled:
        cmd.append("--compile")
    cmd += ["--strategy", strategy]
    rc, wall, rss, gpu = run_child(cmd, d / "log.txt", env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   gpu=args.device.startswith("cuda"))
    if rc != 0:
        raise Failed(f"{name} run {k} failed (exit {rc}); see {d / 'log.txt'}:\n" + (d / "log.txt").read_text()[-3000:])
    r = json.loads(out.read_text())
    r.update(system=name, wall_s=wall, peak_rss_mib=rss, peak_gpu_mib=gpu, log=str(d / "log.txt"))
    return r


# --------------------------------------------------------------------------------------------- reference

def reference_worker(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from peft import PeftModel
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, OPTForCausalLM

    work = Path(args.work)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_load = time.perf_counter()

    parts = STRATEGIES[args.strategy][1]
    vision = CLIPVisionModel.from_pretrained(work / "vision", attn_implementation="sdpa").to(dev)
    vision.requires_grad_("encoder" in parts)
    llm = OPTForCausalLM.from_pretrained(work / "llm", attn_implementation="sdpa")
    llm.requires_grad_("backbone" in parts)
    if "head" in parts:
        llm.lm_head.weight.requires_grad_(True)  # tied: the embedding matrix, as ablate's head strategy
    if "lora" in parts:
        llm = PeftModel.from_pretrained(llm, work / "adapter", is_trainable=True).to(dev)
        decoder = llm.base_model.model.model.decoder
        head = llm.base_model.model.lm_head  # tied to embed_tokens
    else:
        llm = llm.to(dev)
        decoder, head = llm.model.decoder, llm.lm_head
    hv, hd = vision.config.hidden_size, decoder.config.hidden_size
    proj = torch.nn.Sequential(torch.nn.Linear(hv, hd), torch.nn.LayerNorm(hd, eps=1e-5))
    proj.load_state_dict({k.removeprefix("visual_projection."): v
                          for k, v in load_file(str(work / "projector.safetensors")).items()})
    proj.to(dev)
    # GIT-style: image features enter the decoder at its hidden size; text embeds go through project_in first,
    # so the decoder's own project_in is taken out and applied to the text part only.
    project_in = decoder.project_in
    decoder.project_in = None

    class Vlm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision, self.proj, self.llm, self.project_in = vision, proj, llm, project_in

        def forward(self, pixels, ids, mask, positions, select, targets, n_loss):
            with torch.set_grad_enabled("encoder" in parts):  # frozen: no graph, as VlmModel::image_embeddings
                feats = self.vision(pixel_values=pixels).last_hidden_state
            image = self.proj(feats)
            text = decoder.embed_tokens(ids)
            if self.project_in is not None:
                text = self.project_in(text)
            embeds = torch.cat([image.to(text.dtype), text], 1)
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
            logits = head(hidden.flatten(0, 1).index_select(0, select))
            return F.cross_entropy(logits.float(), targets, reduction="sum") / n_loss

    model = Vlm().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=dev.type == "cuda")
    step_fn = torch.compile(model) if args.compile else model

    # Data: the same tokenisation and order as the runner; images preprocessed once.
    doc = json.loads((work / "data" / "captions.json").read_text())
    caption = {a["image_id"]: a["caption"].strip() for a in reversed(doc["annotations"])}  # first caption wins
    processor = CLIPImageProcessorPil.from_pretrained(work / "vision")
    tok = Tokenizer.from_file(str(work / "llm" / "tokenizer.json"))
    eos, pad = 2, 1
    samples = []
    for im in doc["images"]:
        pixels = processor(images=Image.open(work / "data" / "images" / im["file_name"]), return_tensors="pt")["pixel_values"][0]
        prompt = tok.encode("", add_special_tokens=True).ids
        target = tok.encode(caption[im["id"]], add_special_tokens=False).ids + [eos]
        samples.append((pixels, prompt, target))
    n_img = vision.config.image_size // vision.config.patch_size
    n_img = n_img * n_img + 1
    order = SampleOrder(len(samples), args.seed)
    steps = args.warmup + args.measure

    def batch(step):
        rows = [samples[order.at((step - 1) * args.batch + j)] for j in range(args.batch)]
        t = max(len(p) + len(g) for _, p, g in rows)
        s = n_img + t
        ids = torch.full((args.batch, t), pad, dtype=torch.long)
        valid = torch.zeros(args.batch, t, dtype=torch.bool)
        select, targets, text_tokens = [], [], 0
        for b, (_, p, g) in enumerate(rows):
            seq = (p + g)[:64]
            ids[b, :len(seq)] = torch.tensor(seq)
            valid[b, :len(seq)] = True
            text_tokens += len(seq)
            for j in range(len(p), len(seq)):
                if j == 0:
                    continue  # never: the prompt holds BOS
                select.append(b * s + n_img + j - 1)  # the hidden state before token j predicts it
                targets.append(seq[j])
        positions = torch.cat([torch.full((args.batch, n_img), -1, dtype=torch.long),
                               torch.where(valid, valid.long().cumsum(1) - 1, torch.full_like(ids, -1))], 1)
        qk = torch.arange(s)
        allowed = (qk[None, :] <= qk[:, None]) | ((qk[:, None] < n_img) & (qk[None, :] < n_img))
        key_valid = torch.cat([torch.ones(args.batch, n_img, dtype=torch.bool), valid], 1)
        mask = (allowed[None] & key_valid[:, None, :])[:, None]
        pixels = torch.stack([r[0] for r in rows])
        return (pixels, ids, mask, positions, torch.tensor(select), torch.tensor(targets), float(len(targets)),
                text_tokens)

    batches = [batch(s) for s in range(1, steps + 1)]
    if dev.type == "cuda":
        batches = [tuple(x.pin_memory() if torch.is_tensor(x) else x for x in b) for b in batches]
    print(f"loaded in {time.perf_counter() - t_load:.1f}s; {steps} steps of {args.batch}", flush=True)

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    losses, times = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    # ABLATE_OP_PROFILE=FIRST:LAST: torch.profiler over those steps, the counterpart of the runner's operator
    # profile (host time); ABLATE_KERNEL_PROFILE=FIRST:LAST: the same with the device's kernels, sorted by their
    # device time, the counterpart of the runner's kernel profile.
    kernels = bool(os.environ.get("ABLATE_KERNEL_PROFILE")) and dev.type == "cuda"
    spec = os.environ.get("ABLATE_KERNEL_PROFILE") if kernels else os.environ.get("ABLATE_OP_PROFILE")
    # FIRST:LAST:detail (operators): rows by input shapes, torch.profiler's nearest to the runner's detail table.
    parts = spec.split(":") if spec else ["0", "-1"]
    first, last = int(parts[0]), int(parts[1])
    detail = parts[2:] == ["detail"]
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if kernels else [])
    profiler = torch.profiler.profile(activities=activities, record_shapes=detail) if spec else None
    for step in range(steps):
        if profiler and step + 1 == first:
            profiler.__enter__()
        t0 = time.perf_counter()
        b = batches[step]
        pixels, ids, mask, positions, select, targets = (x.to(dev, non_blocking=True) for x in b[:6])
        with autocast:
            loss = step_fn(pixels, ids, mask, positions, select, targets, b[6])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        if profiler and step + 1 == last:
            profiler.__exit__(None, None, None)
            print(f"{'kernel' if kernels else 'operator'} profile, steps {first}..{last} (totals over {last - first + 1} steps)")
            print(profiler.key_averages(group_by_input_shape=detail).table(sort_by="self_device_time_total" if kernels else "self_cpu_time_total",
                                                row_limit=40, max_name_column_width=90))
        if step < 3 or (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f} ({times[-1] * 1e3:.1f} ms)", flush=True)
    result = {"losses": losses, "step_s": times, "text_tokens": [b[7] for b in batches],
              "loss_tokens": [int(b[6]) for b in batches], "train_s": time.perf_counter() - t_first}
    if dev.type == "cuda":
        result["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    Path(args.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------- checks

def agreement(run, base, tolerance):
    """Whether a run's first 50 losses agree with `base`'s within `tolerance` (relative) and its token counts are
    equal; and a line saying how close they are."""
    n = min(50, len(run["losses"]), len(base["losses"]))
    rel = [abs(a - b) / abs(b) for a, b in zip(run["losses"][:n], base["losses"][:n])]
    worst = max(range(n), key=lambda i: rel[i])
    same = run["text_tokens"][:n] == base["text_tokens"][:n] and run["loss_tokens"][:n] == base["loss_tokens"][:n]
    good = rel[worst] <= tolerance and same
    return good, (f"max rel diff {rel[worst]:.2e} at step {worst + 1} ({run['losses'][worst]:.5f} vs "
                  f"{base['losses'][worst]:.5f}); mean {statistics.mean(rel):.2e}; token counts "
                  f"{'equal' if same else 'DIFFER'}  {'ok' if good else 'FAIL'}")


# --------------------------------------------------------------------------------------------- options

def resolve_common(args):
    """The defaults train_bench and grid_bench share: size from --tiny, device (CUDA when there is one, CPU for
    --tiny), precision (bf16 on CUDA, else fp32), the work folder and the runner's absolute path."""
    args.size = "tiny" if args.tiny else "full"
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    args.work = (args.work or Path(f"/tmp/ablate-bench-{args.size}")).resolve()
    args.runner = args.runner.resolve()


# --------------------------------------------------------------------------------------------- largest batch

def largest_batch(args, limit=4096):
    """The largest power-of-two batch (from --max-from, 8) with which a 3-step run of ablate (and of each ablate
    variant in --refs) and of the eager reference finish: a failed run (out of memory) ends the
    search. Then, when compile is in --refs, the torch.compile reference is probed at that batch alone (its
    compilation is slow), halving it until it fits too, so that every system is timed at one batch. Probe runs go
    to runs/*probe-*."""
    import copy
    best, b = None, args.max_from
    while b <= limit:
        probe = copy.copy(args)
        probe.batch, probe.warmup, probe.measure = b, 1, 2
        print(f"largest batch: trying {b} ...", flush=True)
        try:
            for system in ["ablate"] + [r for r in args.refs.split(",") if r in ABLATE_SYSTEMS]:
                run_ablate(args.work, probe, f"probe-{b}", system)
            run_reference(args.work, probe, f"probe-{b}", compiled=False)
        except Failed as e:
            print(f"  batch {b} does not fit: {str(e).splitlines()[0]}", flush=True)
            break
        best, b = b, b * 2
    while best is not None and "compile" in args.refs:
        probe = copy.copy(args)
        probe.batch, probe.warmup, probe.measure = best, 1, 2
        print(f"largest batch: trying {best} with torch.compile ...", flush=True)
        try:
            run_reference(args.work, probe, f"probe-{best}", compiled=True)
            break
        except Failed as e:
            print(f"  batch {best} does not fit torch.compile: {str(e).splitlines()[0]}", flush=True)
            best = best // 2 if best > 8 else None
    if best is None:
        sys.exit(f"largest batch: not even batch {args.max_from} fits")
    print(f"largest batch that fits every system: {best}", flush=True)
    return best


# --------------------------------------------------------------------------------------------- FLOPs

def flops_per_step(size, batch, text_len, loss_tokens):
    """Model FLOPs of one training step (multiply-add = 2), counted honestly for what runs:
    encoder (frozen, no graph): forward only, 2*N_enc*B*n_img + patch embedding + attention 4*B*n_img^2*d*L;
    projector (trained): 6*N_proj*B*n_img;
    backbone (frozen weights, but gradients flow back through it to the projector): forward 2*N and backward
    input-gradients 2*N per token -> 4*N_bb*B*S, + LoRA adapters trained 6*N_lora*B*S, attention
    (QK^T and AV, full square as SDPA computes it with a mask) 3 * 4*B*S^2*d*L;
    head (tied embedding, frozen) on the loss tokens: forward + input-gradient 4*V*d_word*loss_tokens."""
    v, o = SIZES[size]["vision"], SIZES[size]["opt"]
    grid = (v["image_size"] // v["patch_size"]) ** 2
    n_img = grid + 1
    dv, L_v = v["hidden_size"], v["num_hidden_layers"]
    n_enc = L_v * (4 * dv * dv + 2 * dv * v["intermediate_size"])
    patch = 3 * v["patch_size"] ** 2 * dv  # the patch embedding, per patch
    enc = 2 * n_enc * batch * n_img + 2 * patch * batch * grid + 4 * batch * n_img ** 2 * dv * L_v
    d, L, w = o["hidden_size"], o["num_hidden_layers"], o["word_embed_proj_dim"]
    proj = 6 * (dv * d) * batch * n_img
    S = n_img + text_len
    n_bb = L * (4 * d * d + 2 * d * o["ffn_dim"]) + (d * w if w != d else 0)  # project_out on every position
    n_lora = L * len(LORA["target_modules"]) * LORA["r"] * (d + d)
    bb = 4 * n_bb * batch * S + (4 * d * w if w != d else 0) * batch * text_len + 6 * n_lora * batch * S
    attn = 3 * 4 * batch * S * S * d * L
    head = 4 * o["vocab_size"] * w * loss_tokens
    naive = 6 * (n_enc + dv * d + n_bb + n_lora + o["vocab_size"] * w) * batch * S
    return enc + proj + bb + attn + head, naive, n_img, enc


# --------------------------------------------------------------------------------------------- report

def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU)")
    ap.add_argument("--runner", type=Path, default=REPO / "build" / "bin" / "runner")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, cpu with --tiny)")
    ap.add_argument("--work", type=Path, default=None, help="generated files (default /tmp/ablate-bench-SIZE)")
    ap.add_argument("--batch", default="8",
                    help="samples per step, or 'max': the largest power of two from --max-from up that ablate and the "
                         "eager reference train without running out of memory (3-step probes), then the benchmark")
    ap.add_argument("--max-from", type=int, default=8,
                    help="with --batch max, the first batch tried (smaller ones are not probed): saves the probes "
                         "that are known to fit, several minutes on a GPU")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--measure", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds (each: ablate, then every reference)")
    ap.add_argument("--refs", default=None,
                    help="what runs beside ablate: eager, compile (transformers + PEFT), nocache (ablate with its "
                         "feature cache off), graph (ablate with --train-graph on: on the CPU, the padded steps "
                         "without a graph), nograph (ablate with --train-graph off: eager steps on CUDA), fused "
                         "(ablate with --fused-norm on: CUDA's default), unfused (with --fused-norm off), relu (with "
                         "--fused-relu on), fusedall (with both on); comma-separated (default: eager,compile,nocache, "
                         "and nograph,unfused,relu on CUDA)")
    ap.add_argument("--compile-rounds", type=int, default=1, help="rounds that include the torch.compile reference")
    ap.add_argument("--child-timeout", type=int, default=0, help="seconds after which a run is killed (0: none)")
    ap.add_argument("--workers", type=int, default=0, help="the runner's data threads (0: its default)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads on both sides (0: each side's default)")
    ap.add_argument("--precision", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative loss agreement over the first 50 steps")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="projector+lora", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch != "max":
        args.batch = int(args.batch)
    if args.worker:
        return reference_worker(args)

    resolve_common(args)
    if args.refs is None:
        args.refs = "eager,compile,nocache" + (",nograph,unfused,relu" if args.device.startswith("cuda") else "")
    refs = [r for r in args.refs.split(",") if r]
    if args.warmup + args.measure < 50:
        sys.exit("the loss check needs at least 50 steps (warmup + measure)")
    make_assets(args.work, args.size)

    CHILD_TIMEOUT[0] = args.child_timeout
    if args.batch == "max":
        args.batch = largest_batch(args)
    args.batch = int(args.batch)
    runs, failures = [], []
    for k in range(args.rounds):
        for system in ["ablate"] + refs:
            if system == "compile" and k >= args.compile_rounds:
                continue
            print(f"round {k + 1}: {system} ...", flush=True)
            try:
                if system in ABLATE_SYSTEMS:
                    r = run_ablate(args.work, args, k, system)
                else:
                    r = run_reference(args.work, args, k, system == "compile")
            except Failed as e:
                print(str(e), flush=True)
                failures.append(f"{system} round {k + 1}")
                continue
            print(f"  {r['system']}: {len(r['losses'])} steps, wall {r['wall_s']:.1f}s, loss {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}", flush=True)
            for line in r.get("paths", []):
                print(f"    {line}", flush=True)
            runs.append(r)
    if not runs:
        sys.exit("every run failed")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))

    # ---- correctness before speed: the first 50 losses and the token counts agree.
    base = runs[0]
    ok = True
    print(f"\nloss check: first 50 steps, relative tolerance {args.tolerance:.0%}, against {base['system']} (first run)")
    for r in runs[1:]:
        good, line = agreement(r, base, args.tolerance)
        ok = ok and good
        print(f"  {r['system']:<14} {line}")
    if not ok:
        for i in range(min(50, len(base["losses"]))):
            print(f"  step {i + 1:3d} " + "  ".join(f"{r['system']} {r['losses'][i]:.5f}" for r in runs))
        sys.exit("losses disagree: no speed reported")

    # ---- speed
    text_len = base["text_tokens"][0] // args.batch
    flops, naive, n_img, enc_flops = flops_per_step(args.size, args.batch, text_len, base["loss_tokens"][0])
    seq = n_img + text_len
    gpu = args.device.startswith("cuda")
    device_name = "cpu"
    if gpu:
        import torch
        device_name = torch.cuda.get_device_name()
    print(f"\ndevice {device_name}; model {args.size}; batch {args.batch}; sequence {n_img} image + {text_len} text = "
          f"{seq} tokens; {args.precision}; {args.warmup} warm-up + {args.measure} timed steps per run, "
          f"{args.rounds} round(s)")
    print(f"FLOPs/step {flops / 1e9:.3f} G (model FLOPs, see flops_per_step); naive 6*N*tokens {naive / 1e9:.3f} G")
    hdr = f"{'system':<14} {'median ms':>9} {'p10 ms':>8} {'p90 ms':>8} {'samples/s':>10} {'tokens/s':>10}"
    hdr += f" {'MFU':>6}" if gpu else ""
    hdr += f" {'peak mem MiB':>12} {'wall s':>7}"
    print(hdr)
    med = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        times = [t for r in mine for t in r["step_s"][args.warmup:args.warmup + args.measure]]
        m = statistics.median(times)
        med[system] = m
        line = f"{system:<14} {m * 1e3:9.2f} {pct(times, 0.1) * 1e3:8.2f} {pct(times, 0.9) * 1e3:8.2f} " \
               f"{args.batch / m:10.1f} {args.batch * seq / m:10.0f}"
        if gpu:
            # With the feature cache the encoder does not run in the step: its FLOPs are not counted for it.
            done = flops - enc_flops if ablate_cached(system) else flops
            line += f" {done / m / H100_BF16_DENSE:6.1%}"
        mem = max((r["peak_gpu_mib"] if gpu else r["peak_rss_mib"]) or 0 for r in mine)
        line += f" {mem:12.0f} {statistics.mean(r['wall_s'] for r in mine):7.1f}"
        print(line)
    print("tokens/s counts image + text positions through the backbone; peak mem: "
          + ("GPU memory in use (nvidia-smi, 100 ms) over idle, whole process" if gpu else "peak RSS of the process"))
    if gpu:
        print(f"MFU = FLOPs/step / median step time / {H100_BF16_DENSE / 1e12:.0f} TFLOP/s (H100 SXM dense bf16)")
        for r in runs:
            if "torch_max_allocated_mib" in r:
                print(f"  {r['system']}: torch max allocated {r['torch_max_allocated_mib']:.0f} MiB, "
                      f"reserved {r['torch_max_reserved_mib']:.0f} MiB")
    builds = [r["cache_build_s"] for r in runs if r["system"] == "ablate" and r.get("cache_build_s")]
    if builds:
        print(f"ablate: frozen-encoder feature cache built before step 1 in {statistics.mean(builds):.2f}s on average "
              f"({SIZES[args.size]['images']} images; in wall s, not in step times); ablate-nocache encodes every step")
    for mine in [m for m in med if m.startswith("ablate")]:
        for system in med:
            if system.startswith("hf-"):
                print(f"speed-up {mine} vs {system}: {med[system] / med[mine]:.2f}x (median step time ratio)")
    if failures:
        sys.exit("failed: " + ", ".join(failures))


if __name__ == "__main__":
    main()
