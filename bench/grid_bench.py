#!/usr/bin/env python3
"""Five-cell grid benchmark, issue 7 item 4: a "which parts to finetune" ablation (projector; projector + head;
projector + LoRA; projector + encoder; full) run by ablate as one grid in one invocation, against the reference
run as five separate transformers (+ PEFT) processes, one per cell, as a bash loop over a training script would.

    python bench/grid_bench.py --tiny                                  # CPU, tiny model
    python bench/grid_bench.py --runner .gpu/bin/runner --device cuda  # GPU: ViT-B/16 + GIT + OPT-350m shapes

Both sides train the same model, weights, adapter, data, sample order, preprocessing and loss as
bench/train_bench.py (its docstring lists every choice; this script imports its model, data and reference
worker). Each cell trains --steps steps. Before any time is printed, each cell's first 50 losses (or all, when
fewer) must agree within --tolerance and the token counts must be equal; otherwise it exits non-zero.

Timing: wall-clock of the whole runner process (loading plugins and weights, building the feature cache, five
trainings, the runs' final evaluation of one sample, writing the results database) against the sum of the five
reference processes' wall-clock (Python start, imports, loading, preprocessing, training). The per-cell table also
gives each side's median step time, and the reference's training time without its start-up.
"""
import argparse
import sqlite3
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench as tb  # noqa: E402  (the shared model, data, reference worker and process helpers)

CELLS = ["projector", "projector+head", "projector+lora", "projector+encoder", "full"]


def run_grid(work, args, k):
    d = work / "runs" / f"grid-ablate-{k}"
    if d.exists():
        tb.shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "grid.toml").write_text(tb.experiment_toml(work, args, grid=args.cells))
    cmd = [str(args.runner), str(d / "grid.toml"), "--db", str(d / "results.db"), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.feature_cache:
        cmd += ["--feature-cache", args.feature_cache]
    rc, wall, rss, gpu = tb.run_child(cmd, d / "log.txt", gpu=args.device.startswith("cuda"))
    if rc != 0:
        raise tb.Failed(f"ablate grid {k} failed (exit {rc}); see {d / 'log.txt'}:\n" + (d / "log.txt").read_text()[-3000:])
    db = sqlite3.connect(d / "results.db")
    cells = {}
    for run_id, index, status in db.execute("SELECT id, cell_index, status FROM runs ORDER BY cell_index"):
        if status != "done":
            raise tb.Failed(f"ablate grid {k}: run {run_id} ended {status}; see {d / 'log.txt'}")
        rows = db.execute("SELECT loss, samples_per_s, tokens, loss_tokens, elapsed_s FROM steps WHERE run_id = ? AND "
                          "split = 'train' ORDER BY step", (run_id,)).fetchall()
        cells[args.cells[index]] = {"losses": [r[0] for r in rows], "step_s": [args.batch / r[1] for r in rows],
                                    "text_tokens": [r[2] for r in rows], "loss_tokens": [r[3] for r in rows],
                                    "run_s": rows[-1][4]}
    return {"wall_s": wall, "cells": cells, "peak_rss_mib": rss, "peak_gpu_mib": gpu, "log": str(d / "log.txt")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU)")
    ap.add_argument("--runner", type=Path, default=tb.REPO / "build" / "bin" / "runner")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, cpu with --tiny)")
    ap.add_argument("--work", type=Path, default=None, help="generated files (default /tmp/ablate-bench-SIZE)")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {', '.join(tb.STRATEGIES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60, help="training steps per cell")
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds (each: the ablate grid, then the five references)")
    ap.add_argument("--workers", type=int, default=0, help="the runner's data threads (0: its default)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads on both sides (0: each side's default)")
    ap.add_argument("--feature-cache", default="", help="the runner's --feature-cache (default: its own, auto)")
    ap.add_argument("--precision", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative loss agreement over the first 50 steps")
    ap.add_argument("--child-timeout", type=int, default=0, help="seconds after which a process is killed (0: none)")
    args = ap.parse_args()
    args.cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in args.cells if c not in tb.STRATEGIES]
    if unknown:
        sys.exit(f"--cells: unknown {', '.join(unknown)} (known: {', '.join(tb.STRATEGIES)})")
    tb.resolve_common(args)
    # The train_bench reference worker runs warmup + measure steps.
    args.warmup, args.measure = min(10, args.steps // 2), args.steps - min(10, args.steps // 2)
    tb.make_assets(args.work, args.size)
    tb.CHILD_TIMEOUT[0] = args.child_timeout

    grids, refs = [], {c: [] for c in args.cells}
    for k in range(args.rounds):
        print(f"round {k + 1}: ablate, {len(args.cells)}-cell grid in one process ...", flush=True)
        g = run_grid(args.work, args, k)
        print(f"  wall {g['wall_s']:.1f}s", flush=True)
        grids.append(g)
        for cell in args.cells:
            print(f"round {k + 1}: reference, {cell} ...", flush=True)
            r = tb.run_reference(args.work, args, k, compiled=False, strategy=cell)
            print(f"  wall {r['wall_s']:.1f}s, training {r['train_s']:.1f}s", flush=True)
            refs[cell].append(r)

    # ---- correctness before speed
    ok = True
    print(f"\nloss check per cell: first 50 steps, relative tolerance {args.tolerance:.0%}, reference against ablate")
    for cell in args.cells:
        base = grids[0]["cells"][cell]
        for r in refs[cell] + [g["cells"][cell] for g in grids[1:]]:
            good, line = tb.agreement(r, base, args.tolerance)
            ok = ok and good
            print(f"  {cell:<18} {line}")
    if not ok:
        sys.exit("losses disagree: no speed reported")

    # ---- speed
    print(f"\ndevice {args.device}; model {args.size}; batch {args.batch}; {args.steps} steps per cell; {args.precision}; "
          f"{args.rounds} round(s); medians over steps {args.warmup + 1}..{args.steps} of every round")
    print(f"{'cell':<18} {'ablate step ms':>14} {'ref step ms':>11} {'ablate run s':>12} {'ref train s':>11} {'ref wall s':>10}")
    for cell in args.cells:
        a = [t for g in grids for t in g["cells"][cell]["step_s"][args.warmup:]]
        b = [t for r in refs[cell] for t in r["step_s"][args.warmup:]]
        print(f"{cell:<18} {statistics.median(a) * 1e3:14.2f} {statistics.median(b) * 1e3:11.2f} "
              f"{statistics.mean(g['cells'][cell]['run_s'] for g in grids):12.2f} "
              f"{statistics.mean(r['train_s'] for r in refs[cell]):11.2f} {statistics.mean(r['wall_s'] for r in refs[cell]):10.2f}")
    ablate_wall = statistics.mean(g["wall_s"] for g in grids)
    ref_wall = sum(statistics.mean(r["wall_s"] for r in refs[c]) for c in args.cells)
    ref_train = sum(statistics.mean(r["train_s"] for r in refs[c]) for c in args.cells)
    ablate_runs = statistics.mean(sum(c["run_s"] for c in g["cells"].values()) for g in grids)
    print(f"ablate run s: from a run's start to its last step (after loading); ref train s: the reference's training "
          f"loop alone")
    print(f"total wall-clock: ablate {ablate_wall:.1f}s (one process) vs reference {ref_wall:.1f}s "
          f"({len(args.cells)} processes)")
    print(f"training alone: ablate {ablate_runs:.1f}s vs reference {ref_train:.1f}s "
          f"({ref_train / ablate_runs:.2f}x)")
    print(f"speed-up ablate grid vs {len(args.cells)} separate reference runs: {ref_wall / ablate_wall:.2f}x "
          f"(total wall-clock ratio)")


if __name__ == "__main__":
    main()
