#!/usr/bin/env bash
# Runs the GPU-labelled tests on a GPU machine from the bundle scripts/gpu_bundle.sh made (carry .gpu and
# .deb): no build there, no install into /. Needs python3 with torch 2.11 (CUDA); extra arguments name test
# files (default: every tests/gpu/test_*.py).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$root/.deb/root"
for f in "$root"/.deb/*.deb; do dpkg -x "$f" "$root/.deb/root"; done
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$root/.gpu/lib:$torch_lib:$root/.deb/root/usr/lib/x86_64-linux-gnu:$root/.deb/root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ABLATE_BUILD_DIR="$root/.gpu" ABLATE_SOURCE_DIR="$root" PYTHONPATH="$root/tests/python" PYTHONUNBUFFERED=1
"$root/.gpu/bin/runner" --version
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=("$root"/tests/gpu/test_*.py)
status=0
for t in "${tests[@]}"; do
  echo "== $t"
  (cd "$(dirname "$t")" && python3 -m unittest -v "$(basename "$t" .py)") || status=1
done
exit $status
