#!/usr/bin/env bash
# Builds the web UI into frontend/dist (served by `corral serve` at /) and
# prints the size of its wasm, raw and gzipped. What trunk did, in four
# steps and no extra tool to compile: cargo for wasm32, wasm-bindgen
# (tools/bindgen: wasm-bindgen's own library at the exact version in
# Cargo.lock, built in this workspace), wasm-opt, and content-hashed file
# names with subresource integrity in index.html. Needs what
# scripts/setup.sh --ui installs. Works offline.
#
# frontend/dist is committed, so a fresh clone serves the UI without this
# build (about two minutes of a 2-core machine's cold start). Its
# sources.sha256 names the hash of every tracked file the build reads;
# scripts/test.sh fails when that stamp does not match the sources, so the
# committed dist is always the build of its sources.
#
#   scripts/build-ui.sh           build frontend/dist
#   scripts/build-ui.sh --check   exit 0 if frontend/dist was built from the
#                                 sources as they are now, 1 (saying why) if not
set -euo pipefail
cd "$(dirname "$0")/.."

# The hash of the build's inputs: the content of every tracked file under
# these paths (the dist itself excepted), in git's order. Outside a git
# checkout there is nothing to compare with: the stamp is empty.
sources_hash() {
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 0
  git ls-files -z -- frontend proto tools/bindgen Cargo.toml Cargo.lock \
      rust-toolchain.toml scripts/build-ui.sh ':!:frontend/dist' |
    xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

if [ "${1:-}" = --check ]; then
  want=$(sources_hash)
  have=$(cat frontend/dist/sources.sha256 2>/dev/null || true)
  if [ ! -f frontend/dist/index.html ]; then
    echo "build-ui.sh: frontend/dist is not built" >&2
    exit 1
  elif [ -z "$want" ] || [ "$want" != "$have" ]; then
    echo "build-ui.sh: frontend/dist was built from other sources (sources ${want:-unknown}, dist ${have:-unstamped})" >&2
    exit 1
  fi
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: scripts/build-ui.sh [--check]" >&2
  exit 2
fi

# wasm-opt from binaryen's npm build (scripts/setup.sh), ahead of any older
# system one that cannot read today's wasm.
export PATH="${XDG_CACHE_HOME:-$HOME/.cache}/corral/binaryen/node_modules/.bin:$PATH"
for tool in wasm-opt python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "build-ui.sh: $tool is missing; run scripts/setup.sh --ui" >&2
    exit 1
  fi
done

started=$SECONDS
say() { printf '==> [%3ss] %s\n' "$((SECONDS - started))" "$*" >&2; }

# The JS glue wasm-bindgen writes and the wasm-bindgen crate the UI links
# must be the same version.
lock_version() {
  awk -v name="$1" '$0 == "name = \"" name "\"" {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock
}
crate_version=$(lock_version wasm-bindgen)
tool_version=$(lock_version wasm-bindgen-cli-support)
if [ -z "$crate_version" ] || [ "$crate_version" != "$tool_version" ]; then
  echo "build-ui.sh: Cargo.lock has wasm-bindgen $crate_version but wasm-bindgen-cli-support $tool_version;" >&2
  echo "  pin tools/bindgen/Cargo.toml to =$crate_version" >&2
  exit 1
fi

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
say "building the web UI: cargo build --profile wasm-release --target wasm32-unknown-unknown"
# The same bytes on every machine: the paths of the registry's sources and of
# this checkout, which panic locations carry into the wasm, are renamed.
cargo_home=$(realpath "${CARGO_HOME:-$HOME/.cargo}")
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="--remap-path-prefix=$cargo_home=/cargo --remap-path-prefix=$PWD=/corral"
cargo build -q --locked --profile wasm-release --target wasm32-unknown-unknown -p corral-frontend
wasm_in="$target_dir/wasm32-unknown-unknown/wasm-release/corral-frontend.wasm"
say "building wasm-bindgen $tool_version (tools/bindgen, release)"
cargo build -q --locked --release -p corral-bindgen

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "wasm-bindgen --target web"
"$target_dir/release/corral-bindgen" "$wasm_in" "$work" corral-frontend
say "wasm-opt -Oz"
wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
  --enable-mutable-globals --enable-reference-types --enable-multivalue \
  -o "$work/opt.wasm" "$work/corral-frontend_bg.wasm"
mv "$work/opt.wasm" "$work/corral-frontend_bg.wasm"

# Hashed names (cached for good by the server), integrity hashes, and the
# loader, into a fresh dist/ that replaces the old one whole.
python3 - "$work" frontend "$(sources_hash)" <<'PY'
import base64, hashlib, os, re, shutil, sys
work, frontend, sources = sys.argv[1], sys.argv[2], sys.argv[3]
def read(p):
    with open(p, "rb") as f:
        return f.read()
def digest(data):
    return hashlib.sha256(data).hexdigest()[:16]
def sri(data):
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()
js, wasm, css = read(f"{work}/corral-frontend.js"), read(f"{work}/corral-frontend_bg.wasm"), read(f"{frontend}/style.css")
app = "corral-frontend-" + digest(js + wasm)
style = "style-" + digest(css)
out = f"{work}/dist"
os.mkdir(out)
for name, data in [(f"{app}.js", js), (f"{app}_bg.wasm", wasm), (f"{style}.css", css)]:
    with open(f"{out}/{name}", "wb") as f:
        f.write(data)
assets = f"""<link rel="stylesheet" href="/{style}.css" integrity="{sri(css)}">
    <link rel="modulepreload" href="/{app}.js" crossorigin="anonymous" integrity="{sri(js)}">
    <link rel="preload" href="/{app}_bg.wasm" crossorigin="anonymous" integrity="{sri(wasm)}" as="fetch" type="application/wasm">
    <script type="module">
      import init from '/{app}.js';
      await init({{ module_or_path: '/{app}_bg.wasm' }});
    </script>"""
page = read(f"{frontend}/index.html").decode()
if "<!-- corral:assets -->" not in page:
    sys.exit("frontend/index.html has no <!-- corral:assets --> marker")
with open(f"{out}/index.html", "w") as f:
    f.write(page.replace("<!-- corral:assets -->", assets))
with open(f"{out}/sources.sha256", "w") as f:
    f.write(sources + "\n")
shutil.rmtree(f"{frontend}/dist", ignore_errors=True)
shutil.move(out, f"{frontend}/dist")
PY

wasm=$(ls frontend/dist/*.wasm)
raw=$(stat -c %s "$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)
say "$wasm: $((raw / 1024)) KiB, $((gz / 1024)) KiB gzipped"
