#!/usr/bin/env python3
"""The bytes a training step's memory-bound passes move, per row of the batch, with the fused residual add +
LayerNorm off and on (bench/README.md, "The traffic of those passes").

The runner trains train_bench.py's model (its generated files, made once) for 4 steps at two batch sizes, on the
CPU with bf16 autocast, under ABLATE_OP_PROFILE=2:3:detail, whose MiB column gives each operator's tensors read
and written. Those bytes do not depend on the device, so they tell what a GPU step at the same shapes moves.
The difference between the two batches, divided by the difference in rows (sequence positions, read off the
bytes of fc1's ReLU backward: layers x rows x ffn x 6), gives the bytes per row, which scale to a large batch.

Left out: matrix products and attention (compute-bound), and the CPU's own passes that CUDA does not make:
addmm's copy of the bias into its output, the ReLU applied after fc1 (cuBLASLt's epilogue on CUDA), and the
cast inside a float32 + bf16 add (CUDA's add reads both types in one kernel: counted as that kernel's 10 bytes
per element instead, from the cast's bytes). These are bytes, not times: divide by a bandwidth for an estimate.

    ~/.cache/ablate/venv/bin/python bench/traffic.py [--size full] [--batches 2,4] [--at-batch 256]
"""

import argparse
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench  # noqa: E402  (the benchmark's model, data and experiment)

REPO = Path(__file__).resolve().parents[1]
KIB = 1024.0
ROW = re.compile(r"^  (.*\S)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+)$")
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::_addmm_activation", "aten::bmm"}


def kind(name):
    """What a detail row is: gemm, attention, mixed-add cast, CPU-only, or an elementwise pass."""
    op = name.split(" ")[0]
    if op in GEMMS:
        return "gemm"
    if "scaled_dot_product" in name:
        return "attention"
    if "< aten::_to_copy < aten::to < aten::add" in name:
        return "mixed-add"
    if (op == "aten::copy_" and " < aten::addmm" in name) or "< aten::relu_" in name:
        return "cpu-only"
    return "elementwise"


def profile(runner, toml, fused, log):
    """MiB per step of each detail row: {name: (calls, MiB)}."""
    env = {**os.environ, "ABLATE_OP_PROFILE": "2:3:detail"}
    db = log.with_suffix(".db")
    for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm"), Path(str(db) + ".lock")):
        p.unlink(missing_ok=True)
    cmd = [str(runner), str(toml), "--device", "cpu", "--feature-cache", "on", "--fused-norm", fused, "--db", str(db)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"traffic: {' '.join(cmd)} failed (exit {out.returncode}); see {log}")
    text = out.stderr[out.stderr.index("operator profile"):]
    rows = {}
    for line in text.splitlines()[2:]:
        m = ROW.match(line)
        if m and m.group(5) != "-":
            rows[m.group(1)] = (float(m.group(2)), float(m.group(5)))
    return rows


def positions(rows, spec):
    """Rows (sequence positions) per step, from the bytes of fc1's ReLU backward: layers x rows x ffn x 6."""
    relu = [(c, mib) for name, (c, mib) in rows.items() if name.startswith("aten::threshold_backward ")]
    if not relu:
        sys.exit("traffic: no aten::threshold_backward row (is the backbone OPT with ReLU?)")
    calls, mib = map(sum, zip(*relu))
    return mib * 2**20 / (calls * spec["ffn_dim"] * 6)


def per_kind(rows):
    """KiB per step by kind; the mixed adds counted as CUDA's one kernel (10 bytes per element, from the cast's 6)."""
    out = defaultdict(float)
    for name, (_, mib) in rows.items():
        k = kind(name)
        if k == "mixed-add":
            out["elementwise"] += mib * KIB * 10 / 6
            out["  float32 + bf16 adds (as one kernel)"] += mib * KIB * 10 / 6
        else:
            out[k] += mib * KIB
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", type=Path, default=REPO / "build" / "bin" / "runner")
    ap.add_argument("--size", default="full", choices=sorted(train_bench.SIZES))
    ap.add_argument("--work", type=Path, default=None, help="generated files (default /tmp/ablate-bench-SIZE)")
    ap.add_argument("--batches", default="2,4", help="two batch sizes, comma-separated")
    ap.add_argument("--at-batch", type=int, default=256, help="the batch the per-row bytes are scaled to")
    ap.add_argument("--bandwidth", type=float, default=2.5, help="TB/s, to turn bytes into an estimate of time")
    args = ap.parse_args()
    small, large = (int(b) for b in args.batches.split(","))
    work = args.work or Path(f"/tmp/ablate-bench-{args.size}")
    train_bench.make_assets(work, args.size)
    spec = train_bench.SIZES[args.size]["opt"]
    out_dir = work / "traffic"
    out_dir.mkdir(exist_ok=True)

    result = {}
    for fused in ("off", "on"):
        runs = []
        for batch in (small, large):
            toml = out_dir / f"b{batch}.toml"
            ns = SimpleNamespace(seed=0, warmup=2, measure=2, batch=batch, lr=1e-3, precision="bf16")
            toml.write_text(train_bench.experiment_toml(work, ns))
            rows = profile(args.runner, toml, fused, out_dir / f"b{batch}-fused-{fused}.log")
            runs.append((positions(rows, spec), rows))
            print(f"fused-norm {fused}, batch {batch}: {runs[-1][0]:.1f} rows per step", flush=True)
        (ra, a), (rb, b) = runs
        ka, kb = per_kind(a), per_kind(b)
        per_row = {k: (kb[k] - ka[k]) / (rb - ra) for k in set(ka) | set(kb)}
        ops = {}
        for name in set(a) | set(b):
            if kind(name) == "elementwise":
                ops[name] = (b.get(name, (0, 0))[1] - a.get(name, (0, 0))[1]) * KIB / (rb - ra)
        result[fused] = (per_row, ops, rb / large)

    rows_at = args.at_batch * result["on"][2]
    print(f"\nKiB per row (sequence position) of the batch, each way; at batch {args.at_batch}: {rows_at:,.0f} rows")
    print(f"  {'':44s} {'fused off':>12s} {'fused on':>12s}")
    for k in ("elementwise", "  float32 + bf16 adds (as one kernel)", "gemm", "attention", "cpu-only"):
        off, on = result["off"][0].get(k, 0.0), result["on"][0].get(k, 0.0)
        print(f"  {k:44s} {off:12.1f} {on:12.1f}")
    for fused in ("off", "on"):
        total = result[fused][0]["elementwise"]
        print(f"\nfused-norm {fused}: elementwise passes, KiB per row (those of 0.2% of the total and over)")
        for name, kib in sorted(result[fused][1].items(), key=lambda r: -r[1]):
            if kib >= 0.002 * total:
                print(f"  {kib:8.1f}  {name[:150]}")
    off, on = (result[f][0]["elementwise"] * rows_at * KIB for f in ("off", "on"))
    print(f"\nelementwise bytes at batch {args.at_batch}: fused off {off / 2**30:.1f} GiB, on {on / 2**30:.1f} GiB "
          f"({off / on:.2f}x less with it on)")
    print(f"at {args.bandwidth} TB/s: off {off / args.bandwidth / 1e9:.1f} ms, on {on / args.bandwidth / 1e9:.1f} ms "
          f"(an estimate of time from bytes, not a measurement)")


if __name__ == "__main__":
    main()
