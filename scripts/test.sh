#!/usr/bin/env bash
# Runs every check corral has, on a fresh Debian 12 machine as root:
# formatting, clippy, all tests (real PostgreSQL, consul, nginx, Chromium,
# LXC containers), the OpenAPI drift check and the API fuzz. Installs what it
# needs first. The LXC test builds the containers' base image once per
# machine (about 3 minutes, cached in /var/lib/corral/images).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "setup"
scripts/setup.sh --fuzz --lxc

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the web UI: clippy for wasm32 and the trunk build the browser tests serve"
cargo clippy -q -p corral-frontend --target wasm32-unknown-unknown --locked -- -D warnings
scripts/build-ui.sh

step "build the binaries the end-to-end tests run (corral, corral-agent, todomvc)"
cargo build --workspace --bins --locked

# Of the debug binaries just built: a cold release build would cost more
# than any test here. The packages are otherwise the ones a release has.
step "Debian packages and the apt repository (scripts/package.sh --profile dev): the apt tests and the LXC nodes install them"
scripts/package.sh --profile dev >/dev/null

step "cargo test (SQLite and PostgreSQL 15, whole clusters of real processes, the UI in Chromium)"
cargo test --workspace --locked

step "API fuzz against openapi.yaml (schemathesis)"
scripts/fuzz-api.sh

step "all checks passed"
