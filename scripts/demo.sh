#!/usr/bin/env bash
# Brings up the corral demo on this machine (Debian 12, as root).
#
#   scripts/demo.sh            run in the foreground; Ctrl-C stops everything
#   scripts/demo.sh --detach   run in the background (logs in .corral/)
#   scripts/demo.sh stop       stop a detached demo
#
# Today this is the control plane on adm1's address (127.0.11.5:7000) with its
# state in ./.corral; the nodes' agents and the local provider come next.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${CORRAL_STATE_DIR:-$PWD/.corral}
listen=${CORRAL_LISTEN:-127.0.11.5:7000}
url="http://$listen"
pidfile="$state/demo.pid"

say() { printf '==> %s\n' "$*" >&2; }

stop() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    say "stopping corral (pid $(cat "$pidfile"))"
    kill "$(cat "$pidfile")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  stop) stop; exit 0 ;;
  --detach|"") ;;
  *) echo "usage: scripts/demo.sh [--detach|stop]" >&2; exit 2 ;;
esac

scripts/setup.sh --ui
say "building corral (release)"
cargo build -q --release -p corral-server --bin corral

mkdir -p "$state"
stop
say "starting corral serve on $listen (state in $state)"
target/release/corral serve --listen "$listen" --state-dir "$state" \
  >/dev/null 2>"$state/server.log" &
pid=$!
echo "$pid" >"$pidfile"
if [ "${1:-}" != "--detach" ]; then
  trap 'stop' EXIT INT TERM
fi
for _ in $(seq 1 300); do
  grep -q '^serving on' "$state/server.log" 2>/dev/null && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "corral serve exited:" >&2
    cat "$state/server.log" >&2
    exit 1
  fi
  sleep 0.1
done
curl -fsS "$url/healthz" >/dev/null

token=$(cat "$state/admin-token")
cat <<INFO

corral is up.

  Web UI:     $url/              (sign in with the admin token)
  API:        $url/api/v1        (Swagger UI: $url/docs/)
  admin token: $token
               (kept in $state/admin-token, mode 0600)

Try it:

  export CORRAL_URL=$url CORRAL_TOKEN=$token
  curl -s -H "Authorization: Bearer \$CORRAL_TOKEN" -H 'Content-Type: application/json' \\
       -d '{"role":"web"}' \$CORRAL_URL/api/v1/nodes
  target/release/corral nodes list
  target/release/corral orders nginx1
  target/release/corral topology set --seed
  target/release/corral events --follow

INFO

if [ "${1:-}" = "--detach" ]; then
  say "running in the background (pid $pid); stop it with: scripts/demo.sh stop"
  exit 0
fi
say "following the audit log; Ctrl-C stops the demo"
target/release/corral --url "$url" --token "$token" events --follow
