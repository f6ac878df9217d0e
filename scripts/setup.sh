#!/usr/bin/env bash
# Sets up everything on a fresh Debian 12 machine, and does nothing that is already done:
#   1. Debian packages (compiler, CMake, Boost, TOML++, xtensor, SQLite, Catch2, ...), via apt-get;
#   2. a Python environment outside the repository (default ~/.cache/ablate/venv) with requirements.txt:
#      torch==2.11.0 gives libtorch for the build; the rest are the references parity tests use;
#   3. a Release build in build/ (ccache under ~/.cache/ablate/ccache, precompiled headers).
# Environment: ABLATE_CACHE (default ~/.cache/ablate), ABLATE_BUILD (default <repo>/build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ABLATE_CACHE:-$HOME/.cache/ablate}
venv=$cache/venv
build=${ABLATE_BUILD:-$root/build}
log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# ---- 1. Debian packages
packages=(build-essential cmake ninja-build ccache git pkg-config python3 python3-venv
          libboost-dev libboost-program-options-dev libtomlplusplus-dev libxtensor-dev nlohmann-json3-dev
          libsqlite3-dev sqlite3 catch2 libpng-dev libjpeg-dev libsentencepiece-dev
          libcairo2-dev fonts-dejavu-core chromium)   # curves; the HTML tests load pages in headless Chromium
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. Python environment, rebuilt only when requirements.txt changes
stamp=$venv/.requirements.sha256
want=$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into $venv (torch 2.11.0 is large; a few minutes on a fresh machine)"
  mkdir -p "$cache"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt"
  echo "$want" > "$stamp"
fi

# ---- 3. Build
if [ ! -f "$build/build.ninja" ]; then
  log "configuring $build"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DABLATE_VENV="$venv" >/dev/null
fi
log "building (ccache: $cache/ccache)"
cmake --build "$build" -- -j"$(nproc)"
test -x "$build/bin/runner" || { log "the build failed"; exit 1; }
log "ready: $build/bin/runner"
