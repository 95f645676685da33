//! PostgreSQL as the tests and benchmarks see it: SQL over a node's private
//! socket, which node takes writes, who streams from whom.

use std::process::Command;

use anyhow::{Context, bail};

use crate::{Cluster, run};

/// SQL as the superuser over the node's private socket, in the app's
/// database.
pub async fn sql(c: &Cluster, node: &str, query: &str) -> anyhow::Result<String> {
    sql_in(c, node, "todomvc", query).await
}

/// SQL as the superuser over the node's private socket, in `database`.
pub async fn sql_in(
    c: &Cluster,
    node: &str,
    database: &str,
    query: &str,
) -> anyhow::Result<String> {
    let socket = c.pg_socket_dir(node).await?;
    let out = run(Command::new("/usr/lib/postgresql/15/bin/psql")
        .arg("-h")
        .arg(&socket)
        .args(["-U", "postgres", "-d", database, "-XAtq", "-c", query])
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGOPTIONS", "-c statement_timeout=5000"))
    .await?;
    if !out.exit.success() {
        bail!(
            "psql on {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The db nodes that have a state directory, by name.
pub fn db_nodes(c: &Cluster) -> Vec<String> {
    c.machine_names()
        .into_iter()
        .filter(|n| n.starts_with("pg"))
        .collect()
}

/// The one node whose postgres takes writes; fails while there are none
/// or more than one.
pub async fn sole_primary(c: &Cluster) -> anyhow::Result<String> {
    let mut primaries = Vec::new();
    for node in db_nodes(c) {
        if sql(c, &node, "SELECT pg_is_in_recovery()")
            .await
            .is_ok_and(|r| r == "f")
        {
            primaries.push(node);
        }
    }
    match primaries.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no server accepts writes"),
        many => bail!("more than one server accepts writes: {many:?}"),
    }
}

/// Whether `node` is a standby streaming from `primary`.
pub async fn streams_from(c: &Cluster, node: &str, primary: &str) -> anyhow::Result<bool> {
    if sql(c, node, "SELECT pg_is_in_recovery()").await? != "t" {
        return Ok(false);
    }
    let streaming = sql(
        c,
        primary,
        "SELECT string_agg(application_name, ',') FROM pg_stat_replication WHERE state = 'streaming'",
    )
    .await?;
    Ok(streaming.split(',').any(|n| n == node))
}

/// The postmaster pid of a node.
pub fn postmaster(c: &Cluster, node: &str) -> anyhow::Result<u32> {
    let path = c.node_root(node).join("pgdata/postmaster.pid");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().parse()?)
}

/// Whether `primary`'s commits wait for a standby right now: one streams
/// with `sync_state` sync or quorum (not the `sync` mode's fallback).
pub async fn commits_wait(c: &Cluster, primary: &str) -> anyhow::Result<bool> {
    let n = sql(
        c,
        primary,
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')",
    )
    .await?;
    Ok(n.parse::<u32>().unwrap_or(0) > 0)
}

/// Kills every postgres process of `node` with SIGKILL, as a crash would:
/// the backends first (each is a process group of its own, and left alone
/// a backend finishes the commit it is in before it notices its
/// postmaster died), then the postmaster. In a container, from inside it:
/// the pid in `postmaster.pid` is one of the container's pid namespace,
/// which names another process (or none) on this host.
pub async fn kill_postgres(c: &Cluster, node: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if c.machines == crate::Machines::Lxc && !node.starts_with("adm") {
        let script = "pm=$(head -n 1 /var/lib/corral-agent/pgdata/postmaster.pid) || exit 1; \
             kill -STOP \"$pm\" || exit 1; \
             for stat in /proc/[0-9]*/stat; do \
               set -- $(cut -d ' ' -f 1,4 \"$stat\" 2>/dev/null); \
               [ \"${2:-}\" = \"$pm\" ] && kill -KILL \"$1\" 2>/dev/null; \
             done; \
             kill -KILL \"$pm\"";
        let out = c
            .attach(
                node,
                &["sh", "-c", script],
                std::time::Duration::from_secs(20),
            )
            .await?;
        anyhow::ensure!(
            out.exit.success(),
            "killing postgres in {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(());
    }
    let postmaster = postmaster(c, node)?;
    let _ = kill(Pid::from_raw(postmaster as i32), Signal::SIGSTOP);
    for pid in crate::children_of(&[postmaster]) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    kill(Pid::from_raw(postmaster as i32), Signal::SIGKILL)?;
    Ok(())
}

/// Sets the topology to `web` web and `db` db nodes in `sync` replication
/// and waits until the primary names its synchronous standbys; returns the
/// primary.
pub async fn sync_mode(c: &Cluster, web: u32, db: u32) -> anyhow::Result<String> {
    let res = c
        .api(reqwest::Method::PUT, "/topology")
        .await
        .json(&serde_json::json!({"web": web, "db": db, "lb_policy": "round_robin", "replication": "sync"}))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("PUT /topology: {}", res.status());
    }
    crate::eventually("sync mode on the primary", crate::writes::LONG, || async {
        let p = sole_primary(c).await?;
        let names = sql(c, &p, "SHOW synchronous_standby_names").await?;
        Ok((!names.is_empty()).then_some(p))
    })
    .await
}

/// A connection as the app's user straight to the db node at `addr`, with a
/// 5 s statement timeout: `Ok(Some)` if it takes writes, `Ok(None)` if it
/// answered but is in recovery, `Err` if it could not be reached in 2 s.
pub async fn connect_primary(
    addr: &str,
    password: &str,
) -> anyhow::Result<Option<sqlx::postgres::PgConnection>> {
    use sqlx::Connection;
    let opts = sqlx::postgres::PgConnectOptions::new()
        .host(addr)
        .port(5432)
        .username("todomvc")
        .password(password)
        .database("todomvc")
        .options([("statement_timeout", "5000")]);
    let mut c = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::postgres::PgConnection::connect_with(&opts),
    )
    .await
    .context("timed out connecting")??;
    let primary: Result<(bool,), _> = sqlx::query_as("SELECT pg_is_in_recovery()")
        .fetch_one(&mut c)
        .await;
    Ok(matches!(primary, Ok((false,))).then_some(c))
}
