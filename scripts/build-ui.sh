#!/usr/bin/env bash
# Builds the web UI into frontend/dist (served by `corral serve` at /) and
# prints the size of its wasm, raw and gzipped. Needs trunk, wasm-bindgen
# and wasm-opt: scripts/setup.sh installs them. Works offline.
set -euo pipefail
cd "$(dirname "$0")/../frontend"

# wasm-opt from binaryen's npm build (scripts/setup.sh), ahead of any older
# system one that cannot read today's wasm.
export PATH="${XDG_CACHE_HOME:-$HOME/.cache}/corral/binaryen/node_modules/.bin:$PATH"
if ! command -v wasm-opt >/dev/null; then
  echo "build-ui.sh: wasm-opt is missing; run scripts/setup.sh" >&2
  exit 1
fi

printf '==> %s\n' "building the web UI (trunk build --release)" >&2
trunk build --release --offline >/dev/null
wasm=$(ls dist/*.wasm)
raw=$(stat -c %s "$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)
printf '==> %s\n' "frontend/$wasm: $((raw / 1024)) KiB, $((gz / 1024)) KiB gzipped" >&2
