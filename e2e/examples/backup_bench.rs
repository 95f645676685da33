//! Backup and restore benchmark: a cluster (1 web, 2 db) whose database
//! is filled to SIZE_MB with `pgbench -i`; then, in the same run and
//! against the same streaming standby, a plain `pg_basebackup` (tar, WAL
//! streamed) into a local directory, `corral db backup now` (the same
//! pg_basebackup, checksummed and shipped to adm1's store), and
//! `corral db restore --time T` (download, checksum, untar, recovery to T,
//! verification). Prints the times and MB/s of each.
//!
//!   cargo run --release -p corral-e2e --example backup_bench -- [SIZE_MB] [OCTET]
//!
//! (defaults: 1024 MB, cluster on 127.0.24.0/24). Run it through
//! `scripts/bench/backup.sh`, which builds what it needs.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_e2e::pg::{sole_primary, sql, streams_from};
use corral_e2e::{Cluster, bin, eventually, run};
use corral_proto::Backup;
use reqwest::Method;

const LONG: Duration = Duration::from_secs(1800);
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

async fn corral(c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let out = run(Command::new(bin("corral"))
        .args(args)
        .env("CORRAL_URL", &c.url)
        .env("CORRAL_TOKEN", &c.token))
    .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.exit.success() {
        bail!("corral {}: {text}", args.join(" "));
    }
    Ok(text)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn line(what: &str, bytes: u64, took: Duration) {
    let mb = bytes as f64 / 1e6;
    println!(
        "{what:<46} {mb:>9.1} MB {:>8.1} s {:>8.1} MB/s",
        took.as_secs_f64(),
        mb / took.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mb: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let octet: u8 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(24);

    eprintln!("==> corral up on 127.0.{octet}.0/24 (1 web, 2 db)");
    let c = Cluster::up(octet, 1, 2).await?;
    let primary = sole_primary(&c).await?;
    let standby = if primary == "pg1" { "pg2" } else { "pg1" };

    // pgbench's scale 1 is about 15 MB on disk.
    let scale = (size_mb / 15).max(1);
    eprintln!("==> pgbench -i -s {scale} on {primary}");
    let socket = c.pg_socket_dir(&primary).await?;
    let load = Instant::now();
    let out = run(Command::new(format!("{PG_BIN}/pgbench"))
        .arg("-h")
        .arg(&socket)
        .args([
            "-U",
            "postgres",
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "todomvc",
        ]))
    .await?;
    if !out.exit.success() {
        bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
    }
    let db_bytes: u64 = sql(&c, &primary, "SELECT pg_database_size('todomvc')")
        .await?
        .parse()?;
    line("loaded (pgbench -i)", db_bytes, load.elapsed());
    let target = sql(&c, &primary, "SELECT pg_current_wal_lsn()").await?;
    eventually("the standby caught up", LONG, || async {
        let replayed = sql(
            &c,
            standby,
            &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
        )
        .await?;
        Ok((replayed == "t" && streams_from(&c, standby, &primary).await?).then_some(()))
    })
    .await?;

    // The baseline: pg_basebackup from the same standby to a local dir.
    let local = tempfile::Builder::new()
        .prefix("corral-bench-basebackup-")
        .tempdir_in("/tmp")?;
    let password = std::fs::read_to_string(c.state_dir().join("replication-password"))
        .context("replication password")?;
    let start = Instant::now();
    let out = run(Command::new(format!("{PG_BIN}/pg_basebackup"))
        .args(["-h", &c.address(standby), "-p", "5432", "-U", "replicator"])
        .arg("-D")
        .arg(local.path())
        .args(["-Ft", "-X", "stream", "--checkpoint=fast", "--no-password"])
        .env("PGPASSWORD", password.trim()))
    .await?;
    if !out.exit.success() {
        bail!("pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
    }
    line(
        &format!("pg_basebackup from {standby} to a local dir"),
        dir_bytes(local.path()),
        start.elapsed(),
    );
    drop(local);

    let start = Instant::now();
    eventually("a backup taken", LONG, || async {
        match corral(&c, &["db", "backup", "now"]).await {
            Ok(_) => Ok(Some(())),
            Err(e) if e.to_string().contains("no_db_node") => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await?;
    let took = start.elapsed();
    let res = c.api(Method::GET, "/backups").await.send().await?;
    let backups: Vec<Backup> = res.json().await?;
    let backup = backups.first().context("no backup listed")?;
    line(
        &format!("corral db backup now ({}, to adm1's store)", backup.node),
        backup.size_bytes,
        took,
    );

    sql(&c, &primary, "CREATE TABLE bench_mark (at timestamptz)").await?;
    sql(&c, &primary, "INSERT INTO bench_mark VALUES (now())").await?;
    let t = chrono::Utc::now();
    // Recovery stops at the first commit after T: there must be one.
    sql(&c, &primary, "INSERT INTO bench_mark VALUES (now())").await?;
    let segment = sql(&c, &primary, "SELECT pg_walfile_name(pg_switch_wal())").await?;
    let wal = c.state_dir().join("backups/wal");
    eventually("the last segment archived", LONG, || async {
        Ok(wal.join(&segment).exists().then_some(()))
    })
    .await?;
    let start = Instant::now();
    let report = corral(
        &c,
        &["db", "restore", "--to", "bench", "--time", &t.to_rfc3339()],
    )
    .await?;
    line(
        "corral db restore --time T (download, recover, verify)",
        backup.size_bytes,
        start.elapsed(),
    );
    let rows = report
        .lines()
        .find(|l| l.starts_with("public.pgbench_accounts"))
        .unwrap_or("public.pgbench_accounts ?");
    println!(
        "restore verified: {}",
        rows.split_whitespace().collect::<Vec<_>>().join(" = ")
    );
    let _ = c.api(Method::GET, "/backups").await.send().await?;
    Ok(())
}
