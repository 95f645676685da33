#!/usr/bin/env bash
# Benchmarks the todomvc webapp on this machine: with 100 todos stored,
# GET /todos directly against the app and through a local nginx proxying to
# it, at the same concurrency and duration, then POST /todos both ways.
# GET is measured twice each way: as a client without the session cookie
# (always read from the database) and as a page's session carrying its
# todomvc_lsn cookie (may be served by the list cache). Prints req/s, p50 and
# p99 of each, the nginx/direct GET throughput (target: at least 80 %), and
# the ceiling of the same PostgreSQL for the same INSERT (pgbench, as many
# connections as the app's pool), so POST can be read against it. Beside
# each line, the CPU time the webapp and the nginx worker spent per request:
# on a machine where wrk, nginx, the app and PostgreSQL share the cores, the
# nginx/direct ratio is bounded by what the extra hop costs.
#
# --baseline BINARY runs every measurement against that todomvc binary too
# (say, a copy of the release build before a change), in the same run on the
# same database, so each figure has a same-run baseline beside it.
#
# Starts everything it measures on loopback and removes it on exit: a
# PostgreSQL 15 primary run as an unprivileged user (through the test
# harness, examples/pg_cluster.rs), the release build of todomvc, and nginx
# with the configuration corral-agent renders for a web node. Installs wrk
# if it is missing (root).
#
#   scripts/bench/todomvc.sh [--duration 10] [--connections 32] [--threads 2]
#                            [--baseline BINARY] [--repeat N]
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10      # seconds per measurement
connections=32
threads=2
baseline=
repeat=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --baseline) baseline="$(realpath "$2")"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration SECONDS] [--connections N] [--threads N] [--baseline BINARY] [--repeat N]" >&2; exit 2 ;;
  esac
done
[ -z "$baseline" ] || [ -x "$baseline" ] || { echo "bench: $baseline is not an executable" >&2; exit 2; }

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf "bench: %b\n" "$*" >&2
  local log
  for log in "${tmp:-/nonexistent}"/app-*.log; do
    [ -f "$log" ] && { echo "--- $log (last lines)" >&2; grep -v "^ *[0-9]*: \|^ *at " "$log" | tail -8 >&2; }
  done
  exit 1
}

if ! command -v wrk >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "wrk is missing and installing it needs root (apt-get install wrk)"
  say "installing wrk"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
fi
command -v nginx >/dev/null || die "nginx is missing: run scripts/setup.sh"
command -v curl >/dev/null || die "curl is missing: run scripts/setup.sh"

say "building todomvc (release)"
cargo build --release --locked -q -p todomvc --bin todomvc --example pg_cluster
cargo build --release --locked -q -p corral-agent --example nginx_conf
release="${CARGO_TARGET_DIR:-target}/release"
pgbin=/usr/lib/postgresql/15/bin

tmp=$(mktemp -d /tmp/todomvc-bench.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nothing listens on (ss is in iproute2, which setup.sh installs).
free_port() {
  local port
  while :; do
    port=$(shuf -i 20000-60999 -n 1)
    if ! ss -Htln "sport = :$port" | grep -q .; then
      echo "$port"
      return
    fi
  done
}

# Polls a command until it succeeds or the deadline (seconds) passes.
wait_for() {
  local what="$1" deadline="$2"; shift 2
  local end=$((SECONDS + deadline))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || die "timed out waiting for $what"
    sleep 0.1
  done
}

say "starting PostgreSQL"
# TMPDIR: the harness keeps its initdb template in the temp dir for the life
# of the process; under $tmp it goes with everything else.
TMPDIR="$tmp" "$release/examples/pg_cluster" --db todomvc --user todomvc \
  >"$tmp/pg.out" 2>"$tmp/pg.err" &
pids+=($!)
wait_for "PostgreSQL (see $tmp/pg.err)" 60 grep -q READY "$tmp/pg.out"
primary=$(sed -n 's/^PRIMARY=//p' "$tmp/pg.out")

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"title":"written by wrk"}'
wrk.headers["Content-Type"] = "application/json"
LUA

# Converts wrk's latency (e.g. 812.00us, 1.23ms, 1.01s) to milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n = n * 1000
    printf "%.2f", n }'
}

# CPU time a process has used so far, in clock ticks (all its threads).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)

# Runs wrk and prints "req/s p50_ms p99_ms app_us nginx_us": the last two
# are the CPU time the webapp (pid $watch_app) and the nginx worker (pid
# $watch_nginx, none for direct lines) spent per request, in microseconds,
# so a throughput ratio can be read against what each hop costs.
measure() {
  local url="$1" secs="$2"; shift 2
  local out a0 n0 a1 n1
  a0=$(ticks "${watch_app:-0}"); n0=$(ticks "${watch_nginx:-0}")
  out=$(wrk -t"$threads" -c"$connections" -d"${secs}s" --latency "$@" "$url")
  a1=$(ticks "${watch_app:-0}"); n1=$(ticks "${watch_nginx:-0}")
  local errors
  errors=$(awk '/Non-2xx or 3xx responses/ {print $NF}' <<<"$out")
  [ -z "$errors" ] || die "wrk saw $errors failed responses at $url:\n$out"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  local requests per
  requests=$(awk '/ requests in / {print $1}' <<<"$out")
  per() { awk -v t="$1" -v n="$requests" -v hz="$hz" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }'; }
  printf '%s %s %s %s %s\n' "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" \
    "$(per $((a1 - a0)))" "$(if [ -n "${watch_nginx:-}" ]; then per $((n1 - n0)); else echo -; fi)"
}


# Starts one todomvc binary with nginx in front of it; sets app_<label> and
# proxy_<label> (base URLs) and cookie_<label> (a page session's cookie).
start_app() {
  local bin="$1" label="$2" node="$3"
  local app_port nginx_port app proxy cookie
  app_port=$(free_port)
  app="http://127.0.0.1:$app_port"
  say "[$label] starting $bin on $app (database $primary)"
  "$bin" --listen "127.0.0.1:$app_port" --node-name "bench-$label" \
    --db-primary "$primary" --db-name todomvc --db-user todomvc >"$tmp/app-$label.log" 2>&1 &
  pids+=($!)
  printf -v "apppid_$label" '%s' "$!"
  wait_for "todomvc to reach its primary" 60 sh -c "curl -fsS $app/healthz | grep -q '\"writable\":true'"

  nginx_port=$(free_port)
  proxy="http://127.0.0.1:$nginx_port"
  mkdir -p "$tmp/nginx-$label"
  nginx_conf "$tmp/nginx-$label" "$app_port" "$nginx_port" "$node" >"$tmp/nginx-$label/nginx.conf"
  say "[$label] starting nginx on $proxy"
  nginx -e "$tmp/nginx-$label/error.log" -p "$tmp/nginx-$label" -c "$tmp/nginx-$label/nginx.conf" \
    2>>"$tmp/nginx-$label/error.log" &
  pids+=($!)
  wait_for "nginx" 10 curl -fsS "$proxy/healthz"
  # Its one worker (worker_processes 1), which does the proxying.
  printf -v "nginxpid_$label" '%s' "$(pgrep -P "$!" | head -1)"
  printf -v "app_$label" '%s' "$app"
  printf -v "proxy_$label" '%s' "$proxy"
}

# A page's session: the cookie the app's answer to a list read set.
session_cookie() {
  local cookie
  cookie=$(curl -fsS -o /dev/null -D - "$1/todos" | sed -n 's/^[Ss]et-[Cc]ookie: \(todomvc_lsn=[^;]*\).*/\1/p')
  [ -n "$cookie" ] || die "no todomvc_lsn cookie from $1/todos"
  echo "$cookie"
}

# nginx.conf exactly as corral-agent renders it for a web node fronting this
# one webapp (agents/examples/nginx_conf.rs calls the agent's own render), so
# the nginx lines measure the proxy the cluster runs, tuning and all.
# Its metrics listener (stub_status) is on a node address of its own per app.
nginx_conf() {
  local dir="$1" app_port="$2" nginx_port="$3" node="$4"
  mkdir -p "$dir/run" "$dir/tmp" "$dir/logs"
  "$release/examples/nginx_conf" "$dir" "127.0.0.1:$nginx_port" "$node" "127.0.0.1:$app_port"
}

labels=(current)
start_app "$release/todomvc" current 127.0.18.1
if [ -n "$baseline" ]; then
  labels+=(baseline)
  start_app "$baseline" baseline 127.0.18.2
fi

# Both apps share the database, so the GETs (same 100 todos) come first and
# the POSTs (which add thousands) last, then pgbench; each line runs for
# every app back to back, so a change in the machine's load hits both alike.
# With --repeat N the whole round runs N times (the table reset to 100 todos
# each time) and the medians are printed.
pool=$((8 * $(nproc)))
pg_host=${primary%:*}
pg_port=${primary##*:}
cat >"$tmp/insert.sql" <<'SQL'
INSERT INTO todos (title, completed, "order") VALUES ('written by pgbench', false, NULL) RETURNING id, title, completed, "order";
SQL
for round in $(seq 1 "$repeat"); do
  say "round $round of $repeat: storing 100 todos"
  # TRUNCATE, not DELETE: the rows the last round's POSTs and pgbench left
  # would stay as dead tuples for the list query to skip (30x slower).
  "$pgbin/psql" -X -q -h "$pg_host" -p "$pg_port" -U todomvc -d todomvc -c "TRUNCATE todos"
  for i in $(seq 1 100); do
    curl -fsS -o /dev/null -H 'Content-Type: application/json' \
      -d "{\"title\":\"todo number $i\",\"order\":$i}" "$app_current/todos"
  done
  count=$(curl -fsS "$app_current/todos" | grep -o '"id":' | wc -l)
  [ "$count" -eq 100 ] || die "expected 100 todos, found $count"

  for label in "${labels[@]}"; do
    app="app_$label"; proxy="proxy_$label"
    printf -v "cookie_$label" '%s' "$(session_cookie "${!app}")"
    if [ "$round" -eq 1 ]; then
      say "[$label] warming up"
      measure "${!app}/todos" 2 >/dev/null
      measure "${!proxy}/todos" 2 >/dev/null
    fi
  done

  for what in get_direct get_direct_session get_nginx get_nginx_session post_direct post_nginx; do
    for label in "${labels[@]}"; do
      case "$what" in
        *_direct*) url="app_$label" ;;
        *) url="proxy_$label" ;;
      esac
      url="${!url}/todos"
      extra=()
      case "$what" in
        *_session) cookie="cookie_$label"; extra=(-H "Cookie: ${!cookie}") ;;
        post_*) extra=(-s "$tmp/post.lua") ;;
      esac
      watch_app="apppid_$label"; watch_app=${!watch_app}
      case "$what" in
        *_direct*) watch_nginx= ;;
        *) watch_nginx="nginxpid_$label"; watch_nginx=${!watch_nginx} ;;
      esac
      say "[$label] measuring $what (${duration}s, $connections connections)"
      read -r rps p50 p99 appus ngxus < <(measure "$url" "$duration" "${extra[@]}")
      for k in rps p50 p99 appus ngxus; do
        v="all_${label}_${what}_$k"
        printf -v "$v" '%s' "${!v:-} ${!k}"
      done
    done
  done

  # The database's own ceiling for the INSERT behind POST /todos: pgbench
  # with prepared statements, as many connections as the app's pool (8 per
  # worker, one worker per CPU), on the same server.
  say "measuring the INSERT ceiling with pgbench ($pool connections)"
  tps=$("$pgbin/pgbench" -n -M prepared -c "$pool" -j "$threads" -T "$duration" \
    -h "$pg_host" -p "$pg_port" -U todomvc -f "$tmp/insert.sql" todomvc 2>/dev/null \
    | awk '/^tps = / {printf "%.0f", $3}')
  [ -n "$tps" ] || die "pgbench gave no figure"
  all_pgbench="${all_pgbench:-} $tps"
done

# The median of the figures given; "-" (not measured) when there are none.
median() { tr ' ' '\n' <<<"$*" | grep -v '^-\?$' | sort -g | awk '{v[NR] = $1} END {print NR == 0 ? "-" : (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
for label in "${labels[@]}"; do
  for what in get_direct get_direct_session get_nginx get_nginx_session post_direct post_nginx; do
    for k in rps p50 p99 appus ngxus; do
      v="all_${label}_${what}_$k"
      printf -v "r_${label}_${what}_$k" '%s' "$(median "${!v}")"
    done
  done
done
pgbench_tps=$(median "$all_pgbench")
pg_settings=$("$pgbin/psql" -X -A -t -h "$pg_host" -p "$pg_port" -U todomvc -d todomvc \
  -c "SELECT 'fsync=' || current_setting('fsync') || ', synchronous_commit=' || current_setting('synchronous_commit')")

echo
echo "todomvc benchmark: $(nproc) CPUs, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "100 todos stored; wrk $threads threads, $connections connections, ${duration}s per line;"
echo "median of $repeat round(s), current and baseline alternating line by line"
echo "todomvc with default workers; PostgreSQL 15 on loopback ($pg_settings)"
echo "'session' lines carry a page's todomvc_lsn cookie; the others none"
for label in "${labels[@]}"; do
  echo
  case "$label" in
    current) echo "$release/todomvc $("$release/todomvc" --version | awk '{print $2}'):" ;;
    baseline) echo "baseline $baseline:" ;;
  esac
  printf '%-30s %12s %10s %10s %13s %15s\n' "" "req/s" "p50 ms" "p99 ms" "app CPU us/req" "nginx CPU us/req"
  for what in get_direct get_direct_session get_nginx get_nginx_session post_direct post_nginx; do
    rps="r_${label}_${what}_rps"; p50="r_${label}_${what}_p50"; p99="r_${label}_${what}_p99"
    appus="r_${label}_${what}_appus"; ngxus="r_${label}_${what}_ngxus"
    name=$(sed 's/_session/ (session)/; s/get_/GET \/todos  /; s/post_/POST \/todos /; s/direct/direct/; s/nginx/via nginx/' <<<"$what")
    printf '%-30s %12s %10s %10s %13s %15s\n' "$name" "${!rps}" "${!p50}" "${!p99}" "${!appus}" "${!ngxus}"
  done
  printf '%-30s %12s\n' "INSERT ceiling (pgbench)" "$pgbench_tps"
  for kind in "" _session; do
    direct="r_${label}_get_direct${kind}_rps"; nginx="r_${label}_get_nginx${kind}_rps"
    ratio=$(awk -v a="${!nginx}" -v b="${!direct}" 'BEGIN { printf "%.1f", 100 * a / b }')
    # Judged on the exact ratio: 79.96 % prints as 80.0 % but misses.
    verdict=$(awk -v a="${!nginx}" -v b="${!direct}" 'BEGIN { print (a >= 0.8 * b ? "meets" : "MISSES") }')
    echo "nginx/direct GET${kind:+ (session)} throughput: $ratio % ($verdict the 80 % target)"
  done
  post="r_${label}_post_direct_rps"
  echo "POST direct / INSERT ceiling: $(awk -v a="${!post}" -v b="$pgbench_tps" 'BEGIN { printf "%.1f", 100 * a / b }') %"
done
