#!/usr/bin/env bash
# Backup and restore benchmark: a cluster (1 web, 2 db) whose database is
# filled to SIZE_MB with pgbench; then, in the same run and from the same
# streaming standby, plain pg_basebackup to a local directory (the
# baseline), `corral db backup now` (checksummed, shipped to adm1's store)
# and `corral db restore --time T` (download, checksum, recovery to T,
# verification). Prints time and MB/s of each.
#
#   scripts/bench/backup.sh [SIZE_MB] [OCTET]     (default 1024 24)
#
# Runs its own cluster on 127.0.OCTET.0/24 in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/setup.sh >/dev/null
echo "==> building (release)" >&2
cargo build -q --release --locked -p corral-server -p corral-agent -p todomvc
cargo build -q --release --locked -p corral-e2e --example backup_bench
exec target/release/examples/backup_bench "$@"
