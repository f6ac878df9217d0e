#!/usr/bin/env python3
"""Greedy generation benchmark (issue 7 item 4): the model of train_bench.py (CLIP ViT-B/16 + GIT projection +
OPT-350m shapes, random weights in Hugging Face layout, made once) generating captions at batch 1, by ablate
(the runner's evaluation, which records per evaluation the mean time to the first new token and the new tokens
per second of generation: steps.gen_first_token_s / gen_tokens_per_s) and by transformers' `generate` (eager).

    python bench/generate_bench.py --tiny                                   # CPU, tiny model
    python bench/generate_bench.py --runner .gpu/bin/runner --device cuda   # GPU (bench/gpu_bench.sh sets up)

Both sides: the same weights, images and preprocessing; an empty prompt (BOS only, GIT captioning); greedy;
at most --new-tokens new tokens, stopping at EOS; bf16 autocast on the GPU, fp32 on the CPU. Timed on both
sides from the raw image tensor to the tokens on the host: vision tower, projection, prefill and decoding
(ablate's timer runs inside its generate(), which starts from the preprocessed pixels; the reference's starts
from the preprocessed pixels too). Time to first token is one new token's generation; tokens/s is new tokens
over the whole generation. Differences that do not change the work: ablate gives the image tokens no position
embedding and lets them see each other (GIT's prefix); the reference uses transformers' causal mask and
positions from 0, and its image features enter through OPT's project_in (see reference()), so the generated
tokens may differ; the table reports the mean length of each side.

ablate's figures are the means over its second evaluation (the end of a one-step run; the first, at step 0,
warms up), the reference's over the samples after --warmup warm-up samples.
"""
import argparse
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import SIZES, make_assets, model_and_data  # noqa: E402  (the same model and data)

REPO = Path(__file__).resolve().parent.parent


def ablate(work, args, system="ablate", flags=()):
    d = work / "runs" / f"generate-{system}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    toml = d / "generate.toml"
    toml.write_text(f'''strategy = ["projector"]

[experiment]
name = "generate-bench"
seed = 0

{model_and_data(work, eval_limit=args.samples)}
[train]
steps = 1
batch_size = 1
lr = 1e-9
precision = "{args.precision}"
checkpoint_every = 0

[eval]
every = 0
at_start = true
samples = "all"
batch_size = 1
generate = {{ max_new_tokens = {args.new_tokens} }}
''')
    cmd = [str(args.runner), str(toml), "--db", str(d / "results.db"), "--device", args.device, *flags]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(d / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"ablate failed (exit {rc}):\n" + (d / "log.txt").read_text()[-3000:])
    db = sqlite3.connect(d / "results.db")
    (ttft, tps), = db.execute("SELECT gen_first_token_s, gen_tokens_per_s FROM steps WHERE split = 'eval' "
                             "ORDER BY step DESC LIMIT 1").fetchall()
    outputs = [o for (o,) in db.execute("SELECT output FROM samples WHERE step = 1 ORDER BY rowid")]
    # How the decode steps ran, from the evaluation line ("decode steps: CUDA graph"); absent: a growing cache.
    steps = re.findall(r"decode steps: (.*?)(?=; decode steps: |\)$)", (d / "log.txt").read_text(), re.M)
    return {"system": system, "ttft_ms": 1e3 * ttft, "tokens_per_s": tps,
            "mean_new_tokens": statistics.mean(len(o.split()) for o in outputs) if outputs else 0.0,
            "decode_steps": " / ".join(dict.fromkeys(steps)) if steps else "growing KV cache"}


def reference(work, args):
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, OPTForCausalLM

    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = CLIPVisionModel.from_pretrained(work / "vision").to(dev).eval()
    processor = CLIPImageProcessorPil.from_pretrained(work / "vision")
    llm = OPTForCausalLM.from_pretrained(work / "llm").to(dev).eval()
    # transformers' OPT applies project_in (word_embed_proj_dim -> hidden) to every input embedding, also the ones
    # given to generate(); so here the projection produces word_embed_proj_dim features (the saved weights' first
    # rows) and OPT's project_in lifts them, one extra small matmul over the image tokens that ablate does not do
    # (it feeds the projection's hidden-size output to the decoder, as GIT does).
    p = load_file(str(work / "projector.safetensors"))
    hidden_in = p["visual_projection.0.weight"].shape[1]
    w = llm.config.word_embed_proj_dim
    proj = torch.nn.Sequential(torch.nn.Linear(hidden_in, w), torch.nn.LayerNorm(w, eps=1e-5))
    proj.load_state_dict({k.removeprefix("visual_projection."): v[:w] for k, v in p.items()})
    proj = proj.to(dev).eval()
    data = json.loads((work / "data" / "captions.json").read_text())
    images = [data["images"][i % len(data["images"])]["file_name"] for i in range(args.samples + args.warmup)]
    pixels = [processor(images=Image.open(work / "data" / "images" / f).convert("RGB"), return_tensors="pt")["pixel_values"]
              for f in images]
    bos = torch.tensor([[2]], device=dev)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def generate(px, new_tokens):
        with torch.no_grad(), autocast:
            feats = vision(pixel_values=px.to(dev)).last_hidden_state
            embeds = torch.cat([proj(feats), llm.get_input_embeddings()(bos)], 1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
            out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=2, pad_token_id=1)
        return out.shape[1]  # with inputs_embeds, generate returns the new tokens only

    ttft, tps, lengths = [], [], []
    for k, px in enumerate(pixels):
        sync()
        t0 = time.perf_counter()
        generate(px, 1)
        sync()
        t1 = time.perf_counter()
        n = generate(px, args.new_tokens)
        sync()
        t2 = time.perf_counter()
        if k >= args.warmup:
            ttft.append(t1 - t0)
            tps.append(n / (t2 - t1))
            lengths.append(n)
    total_tokens = sum(lengths)
    return {"system": "hf-generate", "ttft_ms": 1e3 * statistics.mean(ttft),
            "tokens_per_s": total_tokens / sum(l / r for l, r in zip(lengths, tps)), "mean_new_tokens": statistics.mean(lengths)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU)")
    ap.add_argument("--runner", type=Path, default=REPO / "build" / "bin" / "runner")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=16, help="images captioned (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="reference: warm-up images")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = "tiny" if args.tiny else "full"
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    work = args.work or Path(f"/tmp/ablate-bench-{size}")
    make_assets(work, size)
    # The runner as it runs by default (on CUDA: decode steps replayed as CUDA graphs), and beside it the other
    # decode path, so the graphs' share is visible (on the CPU: the fixed-size cache's cost without a graph).
    other = ("ablate-nograph", "off") if args.device.startswith("cuda") else ("ablate-fixed", "on")
    rows = [ablate(work, args), ablate(work, args, other[0], ("--decode-graph", other[1])), reference(work, args)]
    print(f"\ngreedy generation, batch 1, up to {args.new_tokens} new tokens, {args.samples} images; model {size} "
          f"({SIZES[size]['opt']['num_hidden_layers']} decoder layers); {args.device}, {args.precision}")
    print(f"{'system':<15} {'first token ms':>15} {'tokens/s':>10} {'mean new tokens':>16}  decode steps")
    for r in rows:
        print(f"{r['system']:<15} {r['ttft_ms']:>15.2f} {r['tokens_per_s']:>10.1f} {r['mean_new_tokens']:>16.1f}  "
              f"{r.get('decode_steps', '')}")
    ref = rows[-1]
    for r in rows[:-1]:
        print(f"{r['system']} vs transformers generate: tokens/s x{r['tokens_per_s'] / ref['tokens_per_s']:.2f}, "
              f"time to first token x{ref['ttft_ms'] / r['ttft_ms']:.2f} (higher is better for ablate)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
