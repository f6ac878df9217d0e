#!/usr/bin/env bash
# Runs the issue-7 benchmarks on a GPU machine from the prebuilt bundle (scripts/gpu_bundle.sh here, then carry
# .gpu and .deb, as scripts/gpu_test.sh does): no build there. One command per measurement:
#   bash bench/gpu_bench.sh [train] --batch 8        # training step vs transformers + PEFT eager and compiled
#   bash bench/gpu_bench.sh train --batch max         # the same at the largest batch that fits both
#   bash bench/gpu_bench.sh generate                  # greedy generation, batch 1
#   bash bench/gpu_bench.sh grid                      # the five-cell grid vs five separate reference runs
# Further arguments go to the script. Logs and JSON go to $OUT when it is set (the device tool), else to
# /tmp/ablate-bench-out.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
what=train
case "${1:-}" in train|generate|grid) what=$1; shift ;; esac
out=${OUT:-/tmp/ablate-bench-out}
mkdir -p "$out" "$root/.deb/root"
for f in "$root"/.deb/*.deb; do dpkg -x "$f" "$root/.deb/root"; done
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$root/.gpu/lib:$torch_lib:$root/.deb/root/usr/lib/x86_64-linux-gnu:$root/.deb/root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
"$root/.gpu/bin/runner" --version
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
tag=${BENCH_TAG:-$what}
extra=()
[ "$what" = train ] && extra=(--json "$out/$tag.json")
set -o pipefail
python3 "$root/bench/${what}_bench.py" --runner "$root/.gpu/bin/runner" --device cuda "${extra[@]}" "$@" 2>&1 | tee "$out/$tag.log"
