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
#   KEEP_LOGS=1 scripts/bench/orders.sh                   keep the servers' logs
#   SERVERS=2 scripts/bench/orders.sh                     two servers on one
#       PostgreSQL (127.0.25.1 and .2; DATABASE_URL names a database to
#       make fresh ones beside, else a throwaway PostgreSQL on 127.0.25.10):
#       half the agents poll the second server while the order is filed on
#       the first; delivery p50/p99 for each half, in the same run
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

servers=${SERVERS:-1}
case "$servers" in 1|2) ;; *) echo "SERVERS must be 1 or 2" >&2; exit 2 ;; esac

work=$(mktemp -d /tmp/corral-bench.XXXXXX)
server_pid=""
peer_pid=""
pg_data=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  [ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null && wait "$peer_pid" 2>/dev/null
  [ -n "$pg_data" ] && runuser -u postgres -- pg_ctl -D "$pg_data" -m immediate stop >/dev/null 2>&1
  if [ -n "${KEEP_LOGS:-}" ]; then
    echo "==> server logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

# Two servers share one PostgreSQL database: a throwaway server unless
# DATABASE_URL names one to make fresh databases beside.
pg_base=""
if [ "$servers" = 2 ]; then
  if [ -n "${DATABASE_URL:-}" ]; then
    pg_base=${DATABASE_URL%/*}
  else
    pg_data="$work/pg"
    mkdir -p "$pg_data" && chown postgres "$work" "$pg_data"
    runuser -u postgres -- initdb -D "$pg_data" -A trust -U postgres >/dev/null
    pg_port=$(free_port 127.0.25.10)
    runuser -u postgres -- pg_ctl -D "$pg_data" -l "$work/pg.log" -w \
      -o "-h 127.0.25.10 -p $pg_port -k $pg_data -c max_connections=200 -c fsync=off" start >/dev/null
    pg_base="postgres://postgres@127.0.25.10:$pg_port"
  fi
fi

fresh_database() {
  local name="corral_bench_$$_$1"
  psql -X -q "$pg_base/postgres" -c "CREATE DATABASE $name" >/dev/null
  echo "$pg_base/$name"
}

start_server() { # listen state tls log [database]
  local database=()
  [ -n "${5:-}" ] && database=(--database-url "$5")
  RUST_LOG=${RUST_LOG:-info,sqlx=warn} "${CORRAL_BIN:-target/release/corral}" serve "${database[@]}" \
    --listen "$1" --state-dir "$2" --network 127.0.11.0/16 --no-machines --tls "$3" \
    >"$4.token" 2>"$4" &
  started_pid=$!
  for _ in $(seq 1 300); do
    grep -q '^serving on' "$4" 2>/dev/null && return 0
    kill -0 "$started_pid" 2>/dev/null || { cat "$4" >&2; exit 1; }
    sleep 0.1
  done
  echo "server on $1 did not start" >&2; exit 1
}

run_two() {
  local tls=$1 state="$work/state-$1"
  local database a_port b_port
  database=$(fresh_database "$tls")
  a_port=$(free_port 127.0.25.1)
  b_port=$(free_port 127.0.25.2)
  start_server "127.0.25.1:$a_port" "$state" "$tls" "$work/server-a-$tls.log" "$database"
  server_pid=$started_pid
  # The second server shares the first's state directory: the same
  # secrets and cluster CA.
  start_server "127.0.25.2:$b_port" "$state" "$tls" "$work/server-b-$tls.log" "$database"
  peer_pid=$started_pid
  local scheme=http ca=()
  if [ "$tls" = on ]; then scheme=https; ca=(--ca "$state/tls/ca.pem"); fi
  echo "==> TLS $tls: two servers on one PostgreSQL, pids $server_pid ($scheme://127.0.25.1:$a_port, files the order) and $peer_pid ($scheme://127.0.25.2:$b_port), $agents agents, $(nproc) cores" >&2
  target/release/examples/orders_bench \
    --url "$scheme://127.0.25.1:$a_port" \
    --peer-url "$scheme://127.0.25.2:$b_port" \
    --token "$(head -n1 "$work/server-a-$tls.log.token")" \
    "${ca[@]}" \
    --agents "$agents" \
    --server-pid "$server_pid" \
    --peer-pid "$peer_pid"
  kill "$server_pid" "$peer_pid" 2>/dev/null && wait "$server_pid" "$peer_pid" 2>/dev/null || true
  server_pid=""
  peer_pid=""
}

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

run=run_once
[ "$servers" = 2 ] && run=run_two
case "${TLS:-both}" in
  both) $run off; $run on ;;
  on|off) $run "$TLS" ;;
  *) echo "TLS must be on, off or both" >&2; exit 2 ;;
esac
