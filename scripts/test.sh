#!/usr/bin/env bash
# Runs every check corral has, on a fresh Debian 12 machine as root:
# formatting, clippy, all tests (real PostgreSQL, consul, nginx, Chromium,
# LXC containers), the OpenAPI drift check and the API fuzz. Installs what it
# needs first. The LXC test builds the containers' base image once per
# machine (about 3 minutes, cached in /var/lib/corral/images).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> [%2d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

step "setup"
scripts/setup.sh --test --fuzz --s3 --lxc --vagrant

step "cargo fmt --check"
cargo fmt --all -- --check

# VirtualBox cannot run here: the provider's own config block is skipped
# (--ignore-provider), everything else Vagrant checks.
step "Vagrantfile: ruby -c and vagrant validate"
ruby -c Vagrantfile >/dev/null
vagrant validate --ignore-provider >/dev/null

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the web UI: clippy for wasm32 and the build the browser tests serve"
cargo clippy -q -p corral-frontend --target wasm32-unknown-unknown --locked -- -D warnings
# The demo serves the committed frontend/dist without building it: it must
# be the build of the sources as they are (its sources.sha256 stamp). Checked
# here, reported at the end with the rest; the browser tests then run
# against a fresh build.
ui_stale=0
scripts/build-ui.sh --check || ui_stale=1
scripts/build-ui.sh

step "build the binaries the end-to-end tests run (corral, corral-agent, todomvc)"
cargo build --workspace --bins --locked

# Of the debug binaries just built: a cold release build would cost more
# than any test here. The packages are otherwise the ones a release has.
step "Debian packages and the apt repository (scripts/package.sh --profile dev): the apt tests and the LXC nodes install them"
scripts/package.sh --profile dev >/dev/null

# --no-fail-fast: one failing test must not hide the others; the fuzz runs
# too, and the summary below names every failure.
step "cargo test (SQLite and PostgreSQL 15, whole clusters of real processes, the UI in Chromium)"
log=$(mktemp /tmp/corral-test.XXXXXX)
trap 'rm -f "$log"' EXIT
failed=0
# A hung test must not eat CI's 90 minutes in silence: the whole run is cut
# at 60 min (a cold 2-core machine needs about 20), and the tests libtest
# saw running for over 60 s are named below.
set +e
timeout --kill-after=30s 60m cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
[ "$status" = 0 ] || failed=1
hung=0
[ "$status" = 124 ] && hung=1

step "API fuzz against openapi.yaml (schemathesis)"
fuzz=0
scripts/fuzz-api.sh || fuzz=1

if [ "$failed" = 0 ] && [ "$fuzz" = 0 ] && [ "$ui_stale" = 0 ]; then
  step "all checks passed ($(( SECONDS / 60 )) min $(( SECONDS % 60 )) s)"
  exit 0
fi
step "FAILED ($(( SECONDS / 60 )) min $(( SECONDS % 60 )) s)"
if [ "$hung" = 1 ]; then
  echo "cargo test was stopped after 60 min; tests that had run for over 60 s:" >&2
  grep -E 'has been running for over 60 seconds' "$log" | sed 's/^/  /' >&2 || true
fi
if [ "$failed" = 1 ]; then
  echo "failed tests:" >&2
  # "Running <target> (target/debug/deps/<binary>-<hash>)" names the test
  # binary; libtest prints "test <name> ... FAILED" for each failure.
  awk '/^ +Running /{bin=$NF; gsub(/^\(.*\/|-[0-9a-f]+\)$/, "", bin)}
       /^test .* \.\.\. FAILED$/{print "  " bin ": " $2}' "$log" | sort -u >&2
  grep -E '^error: (test failed|[0-9]+ targets? failed)' -A20 "$log" | grep -E '^ +`' >&2 || true
fi
[ "$fuzz" = 1 ] && echo "the API fuzz failed (its output is above)" >&2
[ "$ui_stale" = 1 ] && echo "frontend/dist is not the build of its sources: run scripts/build-ui.sh and commit frontend/dist" >&2
exit 1
