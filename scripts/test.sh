#!/usr/bin/env bash
# Runs every check corral has, on a fresh Debian 12 machine as root:
# formatting, clippy, all tests (real PostgreSQL, consul, nginx, Chromium),
# the OpenAPI drift check and the API fuzz. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "setup"
scripts/setup.sh --fuzz

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "corral-proto builds for wasm32 (the web UI shares its types)"
cargo check -q -p corral-proto --target wasm32-unknown-unknown --locked

step "build the binaries the end-to-end tests run (corral, corral-agent, todomvc)"
cargo build --workspace --bins --locked

step "cargo test (SQLite and PostgreSQL 15, whole clusters of real processes)"
cargo test --workspace --locked

step "API fuzz against openapi.yaml (schemathesis)"
scripts/fuzz-api.sh

step "all checks passed"
