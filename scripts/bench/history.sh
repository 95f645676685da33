#!/usr/bin/env bash
# The history checker (as Jepsen's list-append) for as long as asked:
# appends and reads through nginx and the webapp and straight on the
# primary, recorded with invoke/complete times, in rounds of one fault each
# (postgres killed, switchover, node frozen 10 s, node killed; on LXC the
# primary partitioned instead of killed), sync mode. Each round is checked:
# acknowledged appends present once, nothing read then lost, no reordering,
# linearizable cookieless reads, sessions reading their own writes.
# Prints a line per round and the totals; exits 1 on any anomaly.
#
#   scripts/bench/history.sh [--minutes 30] [--round-seconds 40] [--db 2] [--octet 39] [--lxc]
#
# Runs its own cluster on 127.0.OCTET.0/24 (or 192.168.OCTET.0/24 in
# containers with --lxc) in a temp dir. `scripts/test.sh` runs one round of
# each fault (e2e/tests/history.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/setup.sh >/dev/null
for a in "$@"; do
  if [ "$a" = --lxc ]; then
    scripts/setup.sh --lxc >/dev/null
    scripts/package.sh >/dev/null
    export CORRAL_LXC_PACKAGES=$PWD/target/debian
  fi
done
echo "==> building (release)" >&2
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
cargo build -q --release --locked -p corral-e2e --example history_bench
exec target/release/examples/history_bench "$@"
