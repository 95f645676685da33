#!/usr/bin/env bash
# Brings up the seed cluster on this machine (Debian 12, as root): adm1,
# nginx1, nginx2, pg1 and pg2 on 127.0.11.x with real Consul, nginx,
# PostgreSQL and the TodoMVC webapp, configured by corral agents.
#
#   scripts/demo.sh            run in the foreground; Ctrl-C stops the cluster
#   scripts/demo.sh --detach   run in the background (progress in .corral/up.log)
#   scripts/demo.sh stop       stop a detached cluster (corral down)
#
# State (control-plane database, PostgreSQL data, logs) lives in ./.corral
# (CORRAL_STATE_DIR), so running it again resumes the same cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${CORRAL_STATE_DIR:-$PWD/.corral}
say() { printf '==> %s\n' "$*" >&2; }

case "${1:-}" in
  stop)
    exec target/release/corral down --state-dir "$state"
    ;;
  --detach|"") ;;
  *) echo "usage: scripts/demo.sh [--detach|stop]" >&2; exit 2 ;;
esac

scripts/setup.sh
say "building corral, corral-agent and todomvc (release)"
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
if [ -x scripts/build-ui.sh ]; then
  scripts/build-ui.sh
fi

mkdir -p "$state"
# PostgreSQL runs as the unprivileged postgres user and must reach its data
# directory under the state dir.
chmod 755 "$state"

if [ "${1:-}" = "--detach" ]; then
  log="$state/up.log"
  say "starting the cluster in the background (progress in $log)"
  : >"$log"
  setsid target/release/corral up --state-dir "$state" >>"$log" 2>&1 </dev/null &
  pid=$!
  until grep -q -e '^cluster ready' -e 'not every node is ready' "$log"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log" >&2
      exit 1
    fi
    sleep 0.5
  done
  cat "$log"
  say "stop it with: scripts/demo.sh stop"
else
  exec target/release/corral up --state-dir "$state"
fi
