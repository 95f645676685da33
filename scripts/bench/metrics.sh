#!/usr/bin/env bash
# Benchmark: metrics ingest from N simulated agents at the agents' real
# rate (one batch every 10 s each), against a release `corral serve`.
#
#   scripts/bench/metrics.sh [AGENTS] [SECONDS]     default 1000 agents, 120 s
#   CORRAL_BIN=/path/to/corral scripts/bench/metrics.sh   (compare two builds)
#
# Prints the control plane's CPU and RSS while the agents send, the batch
# request's latency, and the storage: bytes per stored value in SQLite
# (the metric_points table and its index, from dbstat), and from that the
# size of a day of raw 10-second points, the growth per day once they are
# downsampled to 5-minute aggregates, and the bound (a day raw + 30 days of
# aggregates) for this many nodes.
set -euo pipefail
cd "$(dirname "$0")/../.."

agents=${1:-1000}
seconds=${2:-120}
scripts/setup.sh >/dev/null
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "==> building release binaries" >&2
cargo build -q --release -p corral-server --bin corral --example metrics_bench

work=$(mktemp -d /tmp/corral-bench.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=${RUST_LOG:-info,sqlx=warn} "${CORRAL_BIN:-target/release/corral}" serve --listen "127.0.0.1:$port" \
  --state-dir "$work/state" --network 127.0.11.0/16 --no-machines --tls off \
  >"$work/token" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 300); do
  grep -q '^serving on' "$work/server.log" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
echo "==> corral serve pid $server_pid on 127.0.0.1:$port (SQLite), $agents agents for ${seconds}s, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
target/release/examples/metrics_bench --url "http://127.0.0.1:$port" --token "$(head -n1 "$work/token")" \
  --agents "$agents" --seconds "$seconds" --server-pid "$server_pid"

# A clean stop checkpoints SQLite's WAL into the database file.
kill "$server_pid" && wait "$server_pid" 2>/dev/null || true
server_pid=""
python3 - "$work/state/corral.db" "$agents" <<'PY'
import sqlite3, sys
db, agents = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
rows = c.execute("SELECT count(*) FROM metric_points").fetchone()[0]
size = c.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN "
                 "('metric_points', 'metric_points_step_at')").fetchone()[0]
nodes = c.execute("SELECT count(DISTINCT node) FROM metric_points").fetchone()[0]
if rows == 0:
    sys.exit("no metric points were stored")
per = size / rows
values = 12  # per sample of a web node
day_raw = agents * values * 8640 * per
day_rollup = agents * values * 288 * per
bound = day_raw + 30 * day_rollup
mib = lambda b: f"{b / 2**20:,.1f} MiB"
print(f"storage: {rows:,} points of {nodes} nodes in {mib(size)} (table and index): {per:.1f} bytes per point")
print(f"  a day of raw 10 s points for {agents} nodes x {values} metrics: {mib(day_raw)}")
print(f"  growth per day after downsampling (5-minute mean and max): {mib(day_rollup)}")
print(f"  bound (a day raw + 30 days of aggregates): {mib(bound)}")
PY
