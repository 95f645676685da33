#!/usr/bin/env bash
# Add-webserver benchmark: how long from `POST /api/v1/nodes {"role":"web"}`
# until a request through a load balancer (nginx1) is served by the new node
# (its X-Served-By header), over ROUNDS rounds; each round removes the node
# again and waits until it is gone.
#
# In the same run, the floor: the same processes started by hand on a spare
# address (a Consul client agent joining the cluster, todomvc, its service
# registration with the same health check), timed until nginx1 routes to it
# (nginx1's own upstream watch re-renders and reloads). Twice: the plain way
# (register at once; Consul's check starts critical) and the way the agent
# does it (wait for Consul's API and the webapp's /healthz, then register
# with the check initially passing).
#
#   scripts/bench/add-webserver.sh [ROUNDS]      (default 10)
#
# Runs its own cluster (2 web, 1 db) on 127.0.50.0/24 in a temp state dir.
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=${1:-10}
net=127.0.50
state=$(mktemp -d /tmp/corral-bench-add.XXXXXX)
chmod 755 "$state"
say() { printf '==> %s\n' "$*" >&2; }

scripts/setup.sh >/dev/null
say "building (release)"
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
bin=$PWD/target/release

cleanup() {
  [ -n "${hand_pids:-}" ] && kill $hand_pids 2>/dev/null || true
  "$bin/corral" down --state-dir "$state" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT

say "corral up (2 web, 1 db) on $net.0/24"
setsid "$bin/corral" up --state-dir "$state" --network "$net.0/24" --web 2 --db 1 \
  >"$state/up.log" 2>&1 </dev/null &
until grep -q -e '^cluster ready' -e 'not every node is ready' "$state/up.log"; do
  sleep 0.2
done
grep -q '^cluster ready' "$state/up.log" || { cat "$state/up.log"; exit 1; }
token=$(cat "$state/admin-token")
api="http://$net.5:7000/api/v1"
lb="http://$net.21"
now() { date +%s.%N; }

# Until a GET through nginx1 is served by $1 (or 120 s pass).
wait_served_by() {
  local deadline=$(( $(date +%s) + 120 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if curl -s -o /dev/null -D - --max-time 2 "$lb/todos" | grep -qi "^x-served-by: $1"; then
      return 0
    fi
    sleep 0.02
  done
  echo "timed out waiting for $1 behind nginx1" >&2
  return 1
}

percentiles() { # label, then seconds on stdin
  sort -n | awk -v label="$1" '{ v[NR] = $1 } END {
    # nearest rank: the smallest value with at least p of the values at or below it
    i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++;
    p50 = v[i50]; p99 = v[i99];
    printf "%-28s n=%d  p50 %.2f s  p99 %.2f s  min %.2f s  max %.2f s\n", label, NR, p50, p99, v[1], v[NR] }'
}

corral_times=()
for i in $(seq 1 "$rounds"); do
  t0=$(now)
  node=$(curl -sf -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"role":"web"}' "$api/nodes" | sed -E 's/.*"name":"([^"]+)".*/\1/')
  wait_served_by "$node"
  t1=$(now)
  dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  corral_times+=("$dt")
  printf 'round %2d: %s served through nginx1 after %.2f s\n' "$i" "$node" "$dt" >&2
  curl -sf -X DELETE -H "Authorization: Bearer $token" "$api/nodes/$node" >/dev/null
  until ! curl -sf -H "Authorization: Bearer $token" "$api/nodes/$node" >/dev/null \
        && [ ! -d "$state/nodes/$node" ]; do
    sleep 0.1
  done
done

# The floor: the same processes by hand on a spare address.
key=$(cat "$state/gossip-key")
dbpw=$(cat "$state/db-password")
# Consul denies by default: by hand, an operator uses the management token.
mgmt=$(cat "$state/consul-management-token")
by_hand() { # first address offset, initial check status (critical|passing)
  local base=$1 status=$2 i addr name dir t0 t1 dt cpid tpid
  for i in $(seq 1 "$rounds"); do
    addr="$net.$((base + i))"
    name="hand$((base + i))"
    dir="$state/hand/$name"
    mkdir -p "$dir"
    t0=$(now)
    consul agent -node "$name" -bind "$addr" -client "$addr" -advertise "$addr" \
      -data-dir "$dir/consul" -datacenter corral -encrypt "$key" \
      -retry-join "$net.5" -retry-interval 1s -hcl 'primary_datacenter = "corral"' \
      -hcl "acl { enabled = true default_policy = \"deny\" tokens { agent = \"$mgmt\" } }" \
      >"$dir/consul.log" 2>&1 &
    cpid=$!
    CONSUL_HTTP_TOKEN=$mgmt TODOMVC_DB_PASSWORD=$dbpw "$bin/todomvc" --listen "$addr:8080" --node-name "$name" \
      --consul "http://$addr:8500" >"$dir/todomvc.log" 2>&1 &
    tpid=$!
    hand_pids="$cpid $tpid"
    until curl -sf "http://$addr:8500/v1/agent/self" >/dev/null; do sleep 0.02; done
    if [ "$status" = passing ]; then
      until curl -sf --max-time 1 "http://$addr:8080/healthz" >/dev/null; do sleep 0.02; done
    fi
    curl -sf -X PUT -H "X-Consul-Token: $mgmt" "http://$addr:8500/v1/agent/service/register" -d "{
      \"ID\": \"todomvc-$name\", \"Name\": \"todomvc\", \"Address\": \"$addr\", \"Port\": 8080,
      \"Check\": {\"HTTP\": \"http://$addr:8080/healthz\", \"Interval\": \"1s\",
                  \"Timeout\": \"1s\", \"Status\": \"$status\"}}"
    wait_served_by "$name"
    t1=$(now)
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    echo "$dt"
    printf 'by hand (%s) %2d: %s served through nginx1 after %.2f s\n' "$status" "$i" "$name" "$dt" >&2
    curl -sf -X PUT -H "X-Consul-Token: $mgmt" "http://$addr:8500/v1/agent/service/deregister/todomvc-$name" || true
    CONSUL_HTTP_TOKEN=$mgmt consul leave -http-addr "http://$addr:8500" >/dev/null 2>&1 || true
    kill "$tpid" 2>/dev/null || true
    wait "$cpid" "$tpid" 2>/dev/null || true
    hand_pids=
  done
}
plain_times=$(by_hand 100 critical)
agentlike_times=$(by_hand 150 passing)

echo
echo "add-webserver, $rounds rounds, $(nproc) cores ($(date -u +%FT%TZ))"
printf '%s\n' "${corral_times[@]}" | percentiles "corral (API -> served)"
echo "$agentlike_times" | percentiles "floor: by hand, as the agent"
echo "$plain_times" | percentiles "by hand, check starts critical"
