#!/usr/bin/env bash
# LXC provider benchmarks, each beside the same run's baseline:
#
#   scripts/bench/lxc.sh [UP_ROUNDS] [ADD_ROUNDS]    (default 5 10)
#       cold `corral up --provider lxc` until all five nodes serve (base
#       image already built: the first run builds it), and "Add webserver"
#       until the new node serves through both load balancers, on LXC and on
#       the local provider;
#   scripts/bench/lxc.sh failover [ROUNDS] [MODES]   (default 20 sync)
#       the primary's container frozen, then partitioned from every other
#       node: write outage and acknowledged writes lost per round.
#
# Runs its own clusters on bridges and subnets of their own (192.168.113.0/24
# and 192.168.114.0/24), deleted at the end. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/setup.sh >/dev/null
scripts/package.sh >/dev/null
echo "==> building (release)" >&2
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
cargo build -q --release --locked -p corral-e2e --example lxc_bench --example failover_bench
export CORRAL_LXC_PACKAGES=$PWD/target/debian
if [ "${1:-}" = failover ]; then
  rounds=${2:-20}
  modes=${3:-sync}
  for kind in freeze partition; do
    target/release/examples/failover_bench "$rounds" "$modes" 114 --lxc --kill "$kind"
  done
else
  exec target/release/examples/lxc_bench "$@"
fi
