//! A throwaway PostgreSQL primary (and replicas) for the benchmark and for
//! trying the app by hand, made with the test harness: unprivileged, on
//! loopback, gone when this exits.
//!
//! Prints `PRIMARY=host:port` and `REPLICA=host:port` lines, then `READY`,
//! and runs until SIGTERM or SIGINT (or until stdin closes, with --stdin).
//!
//!     cargo run --example pg_cluster -- --replicas 1 --db todomvc --user todomvc

use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use corral_testkit::Postgres;

fn main() -> anyhow::Result<()> {
    let mut replicas = 0usize;
    let mut db = "todomvc".to_string();
    let mut user = "todomvc".to_string();
    let mut until_stdin_closes = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--replicas" => replicas = args.next().context("--replicas N")?.parse()?,
            "--db" => db = args.next().context("--db NAME")?,
            "--user" => user = args.next().context("--user NAME")?,
            "--stdin" => until_stdin_closes = true,
            other => {
                bail!("unknown argument {other:?} (--replicas N, --db NAME, --user NAME, --stdin)")
            }
        }
    }
    let ident = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ident(&db) || !ident(&user) {
        bail!("database and user names must be plain identifiers");
    }

    let primary = Postgres::start().context("starting the primary")?;
    primary.psql("postgres", &format!("CREATE ROLE {user} LOGIN"))?;
    primary.psql("postgres", &format!("CREATE DATABASE {db} OWNER {user}"))?;
    let standbys = (0..replicas)
        .map(|_| primary.start_replica())
        .collect::<Result<Vec<_>, _>>()
        .context("starting a replica")?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "PRIMARY={}:{}", primary.host(), primary.port())?;
    for r in &standbys {
        writeln!(out, "REPLICA={}:{}", r.host(), r.port())?;
    }
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);

    if until_stdin_closes {
        for line in std::io::stdin().lock().lines() {
            line?;
        }
    } else {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            anyhow::Ok(())
        })?;
    }
    // Dropping the servers stops them and deletes their directories.
    drop(standbys);
    drop(primary);
    Ok(())
}
