#!/usr/bin/env bash
# Packs, on this (CPU) machine, what a GPU machine needs to run the built runner and the GPU-labelled tests
# when it has PyTorch 2.11 (CUDA 13) but none of our Debian libraries:
#   .gpu/  the runner, the test probe, libablate_sdk.so and the plugins from the build (a few MB; the whole
#          build tree is far too large to copy);
#   .deb/  the .deb files of the Debian runtime libraries they link (Boost.Program_options, TOML++, SQLite,
#          libpng, libjpeg, SentencePiece, zlib, Cairo and its own), fetched with apt-get download.
# Both folders are git-ignored. On the GPU machine, scripts/gpu_test.sh unpacks the .debs with dpkg -x into
# .deb/root (never into /) and runs against the machine's own libtorch, which is ABI-identical to the wheel
# we build with (torch 2.11.0+cu130).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${ABLATE_BUILD:-$root/build}
test -x "$build/bin/runner" || { echo "gpu_bundle: build first (scripts/setup.sh)" >&2; exit 1; }
rm -rf "$root/.gpu"
mkdir -p "$root/.gpu/bin" "$root/.gpu/lib" "$root/.gpu/plugins" "$root/.gpu/test-plugins" "$root/.deb"
cp "$build/bin/runner" "$build/bin/component_probe" "$root/.gpu/bin/"
cp -P "$build"/lib/libablate_sdk.so* "$root/.gpu/lib/"
cp "$build"/plugins/*.so "$root/.gpu/plugins/"
if compgen -G "$build/test-plugins/*.so" >/dev/null; then cp "$build"/test-plugins/*.so "$root/.gpu/test-plugins/"; fi
# What `ldd build/bin/runner` resolves outside libtorch and the C/C++ runtimes, by package (Cairo, for the
# curves, brings fontconfig, freetype, pixman and a few X client libraries it links, though nothing is drawn
# on a screen).
packages=(libboost-program-options1.74.0 libtomlplusplus3 libsqlite3-0 libpng16-16 libjpeg62-turbo libsentencepiece0 zlib1g
          libcairo2 libfontconfig1 libfreetype6 libpixman-1-0 libbrotli1 libbsd0 libmd0 libexpat1
          libx11-6 libxau6 libxcb-render0 libxcb-shm0 libxcb1 libxdmcp6 libxext6 libxrender1)
(cd "$root/.deb" && rm -f ./*.deb && apt-get download "${packages[@]}" >/dev/null)
du -sh "$root/.gpu" "$root/.deb"
