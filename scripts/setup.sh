#!/usr/bin/env bash
# Installs everything corral's demo and tests need on a fresh Debian 12
# machine, as root. Idempotent: a second run checks and does nothing.
#
#   scripts/setup.sh            what the demo cluster runs: PostgreSQL, nginx, consul
#   scripts/setup.sh --ui       also the web UI's build tools (wasm32 target, wasm-opt);
#                               frontend/dist is committed, so only a changed UI needs them
#   scripts/setup.sh --test     also what the tests need: Chromium, rustfmt, clippy and
#                               the UI's build tools (scripts/test.sh rebuilds the UI)
#   scripts/setup.sh --fuzz     also the API fuzzer (schemathesis) in .venv
#   scripts/setup.sh --s3       also an S3 server for the offsite-backup tests (s3s-fs)
#   scripts/setup.sh --bench    also load generators for the benchmarks
#   scripts/setup.sh --lxc      also LXC, debootstrap and nftables (the LXC provider)
#   scripts/setup.sh --vagrant  also Vagrant and Ruby (to check the Vagrantfile)
set -euo pipefail
cd "$(dirname "$0")/.."

want_fuzz=0
want_s3=0
want_bench=0
want_ui=0
want_test=0
want_lxc=0
want_vagrant=0
for arg in "$@"; do
  case "$arg" in
    --fuzz) want_fuzz=1 ;;
    --s3) want_s3=1 ;;
    --bench) want_bench=1 ;;
    --ui) want_ui=1 ;;
    --test) want_test=1; want_ui=1 ;;
    --lxc) want_lxc=1 ;;
    --vagrant) want_vagrant=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { printf '==> [%2d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh installs system packages and must run as root" >&2
  exit 1
fi

# Consul is not in bookworm; bullseye carries 1.8.7. The source is pinned low
# so nothing but packages missing from bookworm ever comes from it.
if [ ! -f /etc/apt/sources.list.d/corral-bullseye.sources ]; then
  say "adding the Debian bullseye source (for consul)"
  cat > /etc/apt/sources.list.d/corral-bullseye.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/corral-bullseye <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
  rm -f /var/lib/corral-apt-updated
fi

# Packages must not start their own daemons: corral supervises consul, nginx
# and postgres itself, on its own addresses. policy-rc.d says "don't start".
if [ ! -x /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
fi
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/corral.conf

packages=(postgresql-15 postgresql-client-15 nginx-light consul
          curl jq procps iproute2 util-linux ca-certificates python3)
[ "$want_ui" = 1 ] && packages+=(nodejs)
[ "$want_test" = 1 ] && packages+=(chromium chromium-driver)
[ "$want_bench" = 1 ] && packages+=(wrk)
[ "$want_lxc" = 1 ] && packages+=(lxc debootstrap nftables)
[ "$want_vagrant" = 1 ] && packages+=(vagrant ruby)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -f /var/lib/corral-apt-updated ]; then
    apt-get update -qq
    touch /var/lib/corral-apt-updated
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: the pinned toolchain (rust-toolchain.toml) with rustfmt and clippy.
if [ "$want_test" = 1 ] && { ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; }; then
  say "adding rustfmt and clippy"
  rustup component add rustfmt clippy
fi

# The web UI's build tools, only with --ui or --test: frontend/dist is
# committed (scripts/build-ui.sh --check says whether it matches its sources).
if [ "$want_ui" = 1 ]; then
  # The shared types and the web UI build for the browser.
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    say "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
  fi

  # The web UI's build tools (scripts/build-ui.sh; no trunk: compiling it
  # took minutes for what four steps of that script do). No wasm-bindgen CLI
  # either: build-ui.sh builds wasm-bindgen's library at the version in
  # Cargo.lock (tools/bindgen), without the CLI's test runner and HTTP stack.
  # wasm-opt: Debian's binaryen (108) cannot read the reference-types code
  # rustc emits by default since 1.82, so binaryen's own build from npm
  # (scripts/build-ui.sh puts it first on PATH).
  if ! command -v npm >/dev/null; then
    # Debian's nodejs comes without npm; NodeSource's includes it.
    say "installing npm"
    apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  binaryen_version=132
  binaryen_dir=${XDG_CACHE_HOME:-$HOME/.cache}/corral/binaryen
  if ! "$binaryen_dir/node_modules/.bin/wasm-opt" --version 2>/dev/null | grep -q "version $binaryen_version "; then
    say "installing binaryen $binaryen_version (wasm-opt) from npm into $binaryen_dir"
    mkdir -p "$binaryen_dir"
    npm install --prefix "$binaryen_dir" --no-audit --no-fund --silent "binaryen@$binaryen_version.0.0"
  fi
fi

# A real S3-compatible server for the offsite-backup tests
# (backend/tests/api/offsite.rs): s3s-fs, the s3s project's S3 server over a
# directory, built once into the cache (about 200 s of CPU cold; MinIO is in no
# registry this machine reaches). 0.14.1 is the newest that builds with the
# pinned toolchain; corral-testkit's S3S_FS_VERSION names the same. Only for
# the tests (--s3): the demo would spend almost 2 minutes of a cold start on it.
s3s_version=0.14.1
s3s_dir=${XDG_CACHE_HOME:-$HOME/.cache}/corral/s3s-fs-$s3s_version
if [ "$want_s3" = 1 ] && [ ! -x "$s3s_dir/bin/s3s-fs" ]; then
  say "installing s3s-fs $s3s_version into $s3s_dir"
  cargo install -q s3s-fs --version "$s3s_version" --features binary --locked --root "$s3s_dir"
fi

if [ "$want_fuzz" = 1 ]; then
  if [ ! -x .venv/bin/schemathesis ] && [ ! -x .venv/bin/st ]; then
    say "installing schemathesis into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check 'schemathesis==4.32.5'
  fi
fi

say "setup complete"
