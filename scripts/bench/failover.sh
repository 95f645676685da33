#!/usr/bin/env bash
# Failover benchmark: eight concurrent writers (four through nginx and the
# webapp, four straight into PostgreSQL) insert unique ids while the
# primary fails, ROUNDS times per replication mode: its postgres processes
# SIGKILLed (postgres), the whole node SIGKILLed as a crashed machine (node:
# agent, Consul agent, postgres), agent and postgres with Consul left alive
# (agent+postgres), or on LXC the container frozen or partitioned. Prints, per round and per mode, the write outage (last acknowledged
# write before the kill to the first after) and the acknowledged writes that
# are missing after the failover.
#
#   scripts/bench/failover.sh [ROUNDS] [MODES] [OCTET] [--kill postgres|node|agent+postgres|freeze|partition] [--lxc]
#   (default 20 sync,async 24 --kill postgres; freeze and partition need --lxc,
#   see scripts/bench/lxc.sh failover)
#
# Runs its own cluster (1 web, 2 db) on 127.0.OCTET.0/24 in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/setup.sh >/dev/null
echo "==> building (release)" >&2
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
cargo build -q --release --locked -p corral-e2e --example failover_bench
exec target/release/examples/failover_bench "$@"
