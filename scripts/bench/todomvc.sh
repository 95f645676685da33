#!/usr/bin/env bash
# Benchmarks the todomvc webapp on this machine: with 100 todos stored,
# GET /todos directly against the app and through a local nginx proxying to
# it, at the same concurrency and duration, then POST /todos both ways.
# Prints req/s, p50 and p99 of each and the nginx/direct GET throughput
# (target: at least 70 %).
#
# Starts everything it measures on loopback and removes it on exit: a
# PostgreSQL 15 primary run as an unprivileged user (through the test
# harness, examples/pg_cluster.rs), the release build of todomvc, and nginx
# with a temporary configuration. Installs wrk if it is missing (root).
#
#   scripts/bench/todomvc.sh [--duration 10] [--connections 64] [--threads 2]
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10      # seconds per measurement
connections=64
threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --connections) connections="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    *) echo "usage: $0 [--duration SECONDS] [--connections N] [--threads N]" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %b\n' "$*" >&2; exit 1; }

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
TMPDIR="$tmp" target/release/examples/pg_cluster --db todomvc --user todomvc \
  >"$tmp/pg.out" 2>"$tmp/pg.err" &
pids+=($!)
wait_for "PostgreSQL (see $tmp/pg.err)" 60 grep -q READY "$tmp/pg.out"
primary=$(sed -n 's/^PRIMARY=//p' "$tmp/pg.out")

app_port=$(free_port)
app="http://127.0.0.1:$app_port"
say "starting todomvc on $app (database $primary)"
target/release/todomvc --listen "127.0.0.1:$app_port" --node-name bench \
  --db-primary "$primary" --db-name todomvc --db-user todomvc >"$tmp/app.log" 2>&1 &
pids+=($!)
wait_for "todomvc to reach its primary" 30 sh -c "curl -fsS $app/healthz | grep -q '\"writable\":true'"

say "storing 100 todos"
curl -fsS -X DELETE "$app/todos" >/dev/null
for i in $(seq 1 100); do
  curl -fsS -o /dev/null -H 'Content-Type: application/json' \
    -d "{\"title\":\"todo number $i\",\"order\":$i}" "$app/todos"
done
count=$(curl -fsS "$app/todos" | grep -o '"id":' | wc -l)
[ "$count" -eq 100 ] || die "expected 100 todos, found $count"

nginx_port=$(free_port)
proxy="http://127.0.0.1:$nginx_port"
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<CONF
# As a web node's nginx fronts todomvc, tuned for proxying: HTTP/1.1 with
# keep-alive to the upstream (no TCP handshake per request), connections
# kept for more than the default 1000 requests on both sides (wrk's direct
# connections are never recycled either; this alone was worth 20 %), one
# worker per core, no access log on the hot path (the app logs every
# request).
daemon off;
worker_processes auto;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; multi_accept on; }
http {
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  upstream todomvc {
    server 127.0.0.1:$app_port;
    keepalive 128;
    keepalive_requests 100000;
  }
  server {
    listen 127.0.0.1:$nginx_port reuseport backlog=4096;
    location / {
      proxy_pass http://todomvc;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Request-Id \$request_id;
    }
  }
}
CONF
say "starting nginx on $proxy"
nginx -e "$tmp/nginx/error.log" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" &
pids+=($!)
wait_for "nginx" 10 curl -fsS "$proxy/healthz"

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

# Runs wrk and prints "req/s p50_ms p99_ms".
measure() {
  local url="$1" secs="$2"; shift 2
  local out
  out=$(wrk -t"$threads" -c"$connections" -d"${secs}s" --latency "$@" "$url")
  local errors
  errors=$(awk '/Non-2xx or 3xx responses/ {print $NF}' <<<"$out")
  [ -z "$errors" ] || die "wrk saw $errors failed responses at $url:\n$out"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  printf '%s %s %s\n' "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")"
}

say "warming up"
measure "$app/todos" 2 >/dev/null
measure "$proxy/todos" 2 >/dev/null

say "measuring GET /todos directly (${duration}s, $connections connections)"
read -r get_direct_rps get_direct_p50 get_direct_p99 < <(measure "$app/todos" "$duration")
say "measuring GET /todos through nginx"
read -r get_nginx_rps get_nginx_p50 get_nginx_p99 < <(measure "$proxy/todos" "$duration")
say "measuring POST /todos directly"
read -r post_direct_rps post_direct_p50 post_direct_p99 < <(measure "$app/todos" "$duration" -s "$tmp/post.lua")
say "measuring POST /todos through nginx"
read -r post_nginx_rps post_nginx_p50 post_nginx_p99 < <(measure "$proxy/todos" "$duration" -s "$tmp/post.lua")

ratio=$(awk -v a="$get_nginx_rps" -v b="$get_direct_rps" 'BEGIN { printf "%.1f", 100 * a / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 70 ? "meets" : "MISSES") }')

echo
echo "todomvc benchmark: $(nproc) CPUs, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
echo "100 todos stored; wrk $threads threads, $connections connections, ${duration}s per line;"
echo "todomvc $(target/release/todomvc --version | awk '{print $2}') with default workers, PostgreSQL 15 on loopback"
echo
printf '%-26s %12s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-26s %12s %10s %10s\n' "GET /todos  direct" "$get_direct_rps" "$get_direct_p50" "$get_direct_p99"
printf '%-26s %12s %10s %10s\n' "GET /todos  via nginx" "$get_nginx_rps" "$get_nginx_p50" "$get_nginx_p99"
printf '%-26s %12s %10s %10s\n' "POST /todos direct" "$post_direct_rps" "$post_direct_p50" "$post_direct_p99"
printf '%-26s %12s %10s %10s\n' "POST /todos via nginx" "$post_nginx_rps" "$post_nginx_p50" "$post_nginx_p99"
echo
echo "nginx/direct GET throughput: $ratio % ($verdict the 70 % target)"
