#!/usr/bin/env bash
# Benchmark: order delivery to N agents holding long polls.
#
#   scripts/bench/orders.sh [AGENTS]          default 10000
#   DATABASE_URL=postgres://... scripts/bench/orders.sh
#   CORRAL_BIN=/path/to/corral scripts/bench/orders.sh   (compare two builds)
#   PERF_OUT=/tmp/perf.data scripts/bench/orders.sh      (profile the fan-out)
#   TLS=on|off|both scripts/bench/orders.sh               default both: plain
#       HTTP first (the same-run baseline), then TLS (--tls on, every agent
#       a TLS connection pinning the cluster CA)
#
# Starts a release `corral serve` (SQLite in a temporary state dir unless
# DATABASE_URL is set), creates AGENTS web nodes, enrolls an agent for each,
# has every agent hold a long poll, then files one order per agent with one
# topology change and reports delivery latency p50/p99, server RSS and CPU.
# Targets: p99 < 200 ms at 10,000 agents, RSS < 500 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."

agents=${1:-10000}
scripts/setup.sh >/dev/null

# Each agent is one connection at each end, and both ends are this machine.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "==> fd limit $(ulimit -n); building release binaries" >&2
cargo build -q --release -p corral-server --bin corral --example orders_bench

work=$(mktemp -d /tmp/corral-bench.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

run_once() {
  local tls=$1 state="$work/state-$1"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # /16 so the address pool holds 10,000+ nodes.
  RUST_LOG=${RUST_LOG:-info,sqlx=warn} "${CORRAL_BIN:-target/release/corral}" serve --listen "127.0.0.1:$port" --state-dir "$state" \
    --network 127.0.11.0/16 --no-machines --tls "$tls" >"$work/token-$tls" 2>"$work/server-$tls.log" &
  server_pid=$!
  for _ in $(seq 1 300); do
    grep -q '^serving on' "$work/server-$tls.log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server-$tls.log" >&2; exit 1; }
    sleep 0.1
  done
  local scheme=http ca=()
  if [ "$tls" = on ]; then scheme=https; ca=(--ca "$state/tls/ca.pem"); fi
  echo "==> TLS $tls: corral serve pid $server_pid on $scheme://127.0.0.1:$port ($(grep -o '(sqlite)\|(postgresql)' "$work/server-$tls.log" | head -1)), $agents agents, $(nproc) cores" >&2
  target/release/examples/orders_bench \
    --url "$scheme://127.0.0.1:$port" \
    --token "$(head -n1 "$work/token-$tls")" \
    "${ca[@]}" \
    --agents "$agents" \
    --server-pid "$server_pid" \
    ${PERF_OUT:+--perf-out "$PERF_OUT"}
  kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

case "${TLS:-both}" in
  both) run_once off; run_once on ;;
  on|off) run_once "$TLS" ;;
  *) echo "TLS must be on, off or both" >&2; exit 2 ;;
esac
