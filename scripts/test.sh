#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test that needs no GPU: Catch2 unit tests, parity tests against
# the Python references (label `parity`), and system tests that drive the runner (label `system`).
# Extra arguments go to ctest, e.g. scripts/test.sh -L parity, or -R store.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
build=${ABLATE_BUILD:-$root/build}
cd "$build"
ctest --output-on-failure --timeout 1200 -LE gpu -j"$(nproc)" "$@"
