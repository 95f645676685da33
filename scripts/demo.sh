#!/usr/bin/env bash
# Brings up the seed cluster on this machine (Debian 12, as root): adm1,
# nginx1, nginx2, pg1 and pg2 on 127.0.11.x with real Consul, nginx,
# PostgreSQL and the TodoMVC webapp, configured by corral agents.
#
#   scripts/demo.sh                   run in the foreground; Ctrl-C stops the cluster
#   scripts/demo.sh --detach          run in the background (progress in .corral/up.log)
#   scripts/demo.sh --provider lxc    the nodes as LXC containers at the seed's own
#                                     192.168.11.x (adm1 is this host, on the bridge);
#                                     builds the .deb packages they install
#   scripts/demo.sh --servers 2       two control-plane servers (adm1 127.0.11.5, adm2
#                                     127.0.11.6) on a PostgreSQL state database with a
#                                     standby (state in ./.corral-servers; with
#                                     --provider lxc, adm1 and adm2 are 192.168.11.5
#                                     and .6 on the bridge, state in ./.corral-lxc-servers)
#   scripts/demo.sh [--provider lxc] stop   stop a detached cluster (corral down)
#
# State (control-plane database, PostgreSQL data, logs; the containers'
# overlays) lives in ./.corral, or ./.corral-lxc for the LXC cluster
# (CORRAL_STATE_DIR), so running it again resumes the same cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> [%2d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

detach=0
stop=0
provider=local
servers=1
while [ $# -gt 0 ]; do
  case "$1" in
    stop) stop=1 ;;
    --detach) detach=1 ;;
    --provider) provider=${2:-}; shift ;;
    --provider=*) provider=${1#--provider=} ;;
    --servers) servers=${2:-}; shift ;;
    --servers=*) servers=${1#--servers=} ;;
    *) echo "usage: scripts/demo.sh [--detach] [--provider local|lxc] [--servers N] | stop" >&2; exit 2 ;;
  esac
  shift
done
case "$provider" in
  # Several servers keep their state in PostgreSQL, not SQLite: a cluster
  # of its own.
  local) if [ "$servers" = 1 ]; then state=${CORRAL_STATE_DIR:-$PWD/.corral}
         else state=${CORRAL_STATE_DIR:-$PWD/.corral-servers}; fi ;;
  # A cluster of its own: its nodes live at other addresses.
  lxc) if [ "$servers" = 1 ]; then state=${CORRAL_STATE_DIR:-$PWD/.corral-lxc}
       else state=${CORRAL_STATE_DIR:-$PWD/.corral-lxc-servers}; fi ;;
  *) echo "demo.sh: --provider is local or lxc, not '$provider'" >&2; exit 2 ;;
esac
if [ "$stop" = 1 ]; then
  exec target/release/corral down --state-dir "$state"
fi

# The system packages install while corral compiles: the build needs only
# Rust and a C compiler, and apt spends its time on the network and dpkg,
# the build on the two cores. Each says what it is doing as it goes.
setup_args=()
[ "$provider" = lxc ] && setup_args=(--lxc)
say "installing system packages (scripts/setup.sh ${setup_args[*]}) alongside the build"
scripts/setup.sh "${setup_args[@]}" > >(sed -u 's/^/    [setup] /' >&2) 2>&1 &
setup_pid=$!
say "building corral, corral-agent and todomvc (release; about 7 min from cold on 2 cores)"
build_quiet=(-q)
[ -t 2 ] && build_quiet=()  # cargo's own progress bar on a terminal
if ! cargo build "${build_quiet[@]}" --release --locked -p corral-server -p corral-agent -p todomvc; then
  kill "$setup_pid" 2>/dev/null || true
  wait "$setup_pid" 2>/dev/null || true
  exit 1
fi
say "built"
if ! wait "$setup_pid"; then
  echo "demo.sh: scripts/setup.sh ${setup_args[*]} failed (its output is above, marked [setup])" >&2
  exit 1
fi
# frontend/dist is committed: rebuilt only when its sources changed.
if stale=$(scripts/build-ui.sh --check 2>&1); then
  say "web UI: frontend/dist is the build of these sources (scripts/build-ui.sh rebuilds it)"
else
  echo "$stale" >&2
  scripts/setup.sh --ui
  scripts/build-ui.sh
fi
if [ "$provider" = lxc ]; then
  say "building the .deb packages the containers install"
  scripts/package.sh >/dev/null
fi

mkdir -p "$state"
# PostgreSQL runs as the unprivileged postgres user and must reach its data
# directory under the state dir.
chmod 755 "$state"

up=(target/release/corral up --state-dir "$state" --provider "$provider" --servers "$servers")
if [ "$detach" = 1 ]; then
  log="$state/up.log"
  say "starting the cluster in the background (progress in $log)"
  : >"$log"
  setsid "${up[@]}" >>"$log" 2>&1 </dev/null &
  pid=$!
  until grep -q -e '^cluster ready' -e 'not every node is ready' "$log"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log" >&2
      exit 1
    fi
    sleep 0.5
  done
  cat "$log"
  if [ "$servers" = 1 ]; then
    say "stop it with: scripts/demo.sh stop"
  else
    say "stop it with: scripts/demo.sh --servers $servers stop"
  fi
else
  exec "${up[@]}"
fi
