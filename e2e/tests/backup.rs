//! Backups for real: `corral up` with one web and two db nodes, todos
//! written through nginx, a base backup taken from the streaming standby
//! with `corral db backup now`, the primary's WAL archived continuously,
//! and `corral db restore --time T` into a new instance on adm1, then into
//! a new node of its own (`--new-node`), each holding exactly the writes
//! acknowledged before T. The server also copies every
//! backup and segment to a real S3 server (s3s-fs on 127.0.33.2), and a
//! last restore, with adm1's store gone, reads everything back from it.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use corral_e2e::pg::{sole_primary, sql, streams_from};
use corral_e2e::{Cluster, bin, eventually, run};
use corral_proto::{Backup, BackupStatus};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;

const LONG: Duration = Duration::from_secs(180);
const BUCKET: &str = "corral-e2e";

async fn post_todos(c: &Cluster, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut titles = Vec::new();
    for i in 0..n {
        let title = format!("{prefix}-{i}");
        let res = c
            .http
            .post(c.lb("nginx1", "/todos"))
            .json(&json!({ "title": title }))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("POST /todos: {}", res.status());
        }
        titles.push(title);
    }
    Ok(titles)
}

/// `corral <args>` against the cluster, as an operator runs it.
async fn corral(c: &Cluster, args: &[&str]) -> anyhow::Result<(bool, String)> {
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
    Ok((out.exit.success(), text))
}

async fn backups(c: &Cluster) -> anyhow::Result<Vec<Backup>> {
    let res = c.api(Method::GET, "/backups").await.send().await?;
    if !res.status().is_success() {
        bail!("GET /backups: {}", res.status());
    }
    Ok(res.json().await?)
}

fn sha256_of(path: &std::path::Path) -> anyhow::Result<String> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&data)))
}

/// The titles in a restored instance at `host:port`, read as the app's
/// user.
async fn restored_titles(c: &Cluster, host: &str, port: u16) -> anyhow::Result<Vec<String>> {
    let password = std::fs::read_to_string(c.state_dir().join("db-password"))?;
    let out = run(Command::new("/usr/lib/postgresql/15/bin/psql")
        .arg(format!(
            "host={host} port={port} user=todomvc dbname=todomvc connect_timeout=3"
        ))
        .env("PGPASSWORD", password.trim())
        .args(["-XAtc", "SELECT title FROM todos ORDER BY id"]))
    .await?;
    if !out.exit.success() {
        bail!(
            "psql on the restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

async fn restore_request(c: &Cluster, body: Value) -> anyhow::Result<(u16, Value)> {
    let res = c
        .api(Method::POST, "/db/restore")
        .await
        .json(&body)
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

async fn adm1_orders(c: &Cluster) -> anyhow::Result<usize> {
    let res = c
        .api(Method::GET, "/nodes/adm1/orders?limit=1000")
        .await
        .send()
        .await?;
    let orders: Vec<Value> = res.json().await?;
    Ok(orders.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_time_t_holds_exactly_the_writes_before_t() {
    let mut s3 = corral_testkit::s3::S3Server::start("127.0.33.2", BUCKET).expect("s3s-fs");
    // The credentials go in a 0600 file, as an operator would keep them.
    let secrets = tempfile::tempdir().expect("tmp");
    let credentials = secrets.path().join("s3-credentials");
    std::fs::write(
        &credentials,
        format!(
            "access_key_id = {}\nsecret_access_key = {}\n",
            s3.access_key, s3.secret_key
        ),
    )
    .expect("credentials");
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let endpoint = s3.endpoint();
    let credentials = credentials.to_string_lossy().into_owned();
    let c = Cluster::up_with(
        24,
        1,
        2,
        &[
            "--s3-endpoint",
            &endpoint,
            "--s3-bucket",
            BUCKET,
            "--s3-credentials-file",
            &credentials,
        ],
    )
    .await
    .expect("corral up");
    let primary = sole_primary(&c).await.expect("a primary");
    let standby = if primary == "pg1" { "pg2" } else { "pg1" };
    eventually("the standby streams", LONG, || async {
        Ok(streams_from(&c, standby, &primary).await?.then_some(()))
    })
    .await
    .expect("streaming");

    // Before any backup, a restore has nothing to start from: 422 and
    // nothing filed.
    let filed_before = adm1_orders(&c).await.expect("orders");
    let (status, body) = restore_request(&c, json!({"to": "early"}))
        .await
        .expect("restore");
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "no_backup_before", "{body}");

    let before_backup = post_todos(&c, "before-backup", 5).await.expect("writes");

    // The standby's heartbeat must say it streams before it is chosen.
    let (ok, out) = eventually("a backup taken", LONG, || async {
        let (ok, out) = corral(&c, &["db", "backup", "now"]).await?;
        if !ok && out.contains("no_db_node") {
            return Ok(None);
        }
        Ok(Some((ok, out)))
    })
    .await
    .expect("backup");
    assert!(ok, "corral db backup now: {out}");
    let all = backups(&c).await.expect("backups");
    let backup = &all[0];
    assert_eq!(backup.status, BackupStatus::Done, "{backup:?}");
    assert_eq!(backup.node, standby, "taken from the streaming standby");
    assert!(backup.wal_start_lsn.is_some(), "{backup:?}");
    // Every file is in adm1's store with the checksum the backup records.
    for f in &backup.files {
        let path = c
            .state_dir()
            .join(format!("backups/base/{}/{}", backup.id, f.name));
        assert_eq!(sha256_of(&path).expect("hash"), f.sha256, "{}", f.name);
    }
    assert!(
        backup
            .files
            .iter()
            .any(|f| f.name == "base.tar" && f.size > 0)
    );
    let (ok, listed) = corral(&c, &["db", "backups"]).await.expect("list");
    assert!(ok && listed.contains("done"), "{listed}");
    let backup_done: DateTime<Utc> = backup.finished_at.expect("finished");

    let after_backup = post_todos(&c, "after-backup", 5).await.expect("writes");
    let t = Utc::now();
    let after_t = post_todos(&c, "after-t", 5).await.expect("writes");

    // The segment holding the last writes is archived once it is full or
    // after archive_timeout; switch now rather than wait a minute.
    let segment = sql(&c, &primary, "SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .expect("switch wal");
    let wal = c.state_dir().join("backups/wal");
    eventually("the last segment archived on adm1", LONG, || async {
        Ok(wal.join(&segment).exists().then_some(()))
    })
    .await
    .expect("archived");
    // The archive is checksummed too.
    for entry in std::fs::read_dir(&wal).expect("wal dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Beside each file: its checksum, and its offsite-copy marker.
        if name.starts_with('.') || name.ends_with(".sha256") || name.ends_with(".s3") {
            continue;
        }
        let stored = std::fs::read_to_string(wal.join(format!("{name}.sha256"))).expect("sum");
        assert_eq!(
            sha256_of(&entry.path()).expect("hash"),
            stored.trim(),
            "{name}"
        );
    }
    // A shipped segment leaves the spool (deleted right after its upload).
    let spool = c.node_root(&primary).join("wal-spool");
    eventually("shipped segments gone from the spool", LONG, || async {
        let lingering = std::fs::read_dir(&spool)?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.') && wal.join(n).exists())
            .count();
        Ok((lingering == 0).then_some(()))
    })
    .await
    .expect("spool emptied");

    // Bad input changes nothing: a time before the first backup finished,
    // a time in the future, a bad name or port.
    for (body, code) in [
        (
            json!({"to": "early", "time": (backup_done - chrono::Duration::seconds(1)).to_rfc3339()}),
            "no_backup_before",
        ),
        (
            json!({"to": "late", "time": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}),
            "unprocessable_entity",
        ),
        (json!({"to": "Bad Name"}), "unprocessable_entity"),
        (json!({"to": "lowport", "port": 80}), "unprocessable_entity"),
        (
            json!({"to": "x", "time": "yesterday"}),
            "unprocessable_entity",
        ),
    ] {
        let (status, answer) = restore_request(&c, body.clone()).await.expect("restore");
        assert_eq!(status, 422, "{body} -> {answer}");
        assert_eq!(answer["error"], code, "{body} -> {answer}");
    }
    assert_eq!(adm1_orders(&c).await.expect("orders"), filed_before);

    let t_arg = t.to_rfc3339();
    let (ok, report) = corral(
        &c,
        &[
            "db", "restore", "--to", "restore1", "--time", &t_arg, "--port", "5433",
        ],
    )
    .await
    .expect("restore");
    assert!(ok, "corral db restore: {report}");
    assert!(report.contains("public.todos"), "{report}");

    let expected: Vec<String> = before_backup.iter().chain(&after_backup).cloned().collect();
    let restored = restored_titles(&c, &c.address("adm1"), 5433)
        .await
        .expect("restored rows");
    assert_eq!(
        restored,
        expected,
        "the restore to T holds the writes before T and none after ({} after T were written: {:?})",
        after_t.len(),
        after_t
    );
    let counted = report
        .lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some("public.todos")).then(|| cols.next().map(String::from))
        })
        .flatten();
    assert_eq!(
        counted,
        Some(expected.len().to_string()),
        "the report counts the rows: {report}"
    );

    // The same restore into a new node of the cluster, made for it by the
    // provider: restore1, at an address of its own, with its own agent.
    let (ok, report) = corral(
        &c,
        &[
            "db",
            "restore",
            "--to",
            "copy",
            "--time",
            &t_arg,
            "--new-node",
        ],
    )
    .await
    .expect("restore into a new node");
    assert!(ok, "corral db restore --new-node: {report}");
    let node: Value = c
        .api(Method::GET, "/nodes/restore1")
        .await
        .send()
        .await
        .expect("node")
        .json()
        .await
        .expect("json");
    assert_eq!(node["role"], "restore", "{node}");
    let restore_address = node["address"].as_str().expect("address").to_string();
    assert!(
        report.contains(&format!("{restore_address}:5432")),
        "the report names where it listens: {report}"
    );
    assert_eq!(
        restored_titles(&c, &restore_address, 5432)
            .await
            .expect("rows on restore1"),
        expected,
        "the restore on its own node holds the writes before T and none after"
    );

    // Neither restored instance is part of the cluster: the primary is
    // where it was, and Consul knows no third postgres.
    assert_eq!(sole_primary(&c).await.expect("primary"), primary);
    let consul: Vec<Value> = c
        .http
        .get(format!(
            "http://{}:8500/v1/catalog/service/postgres",
            c.address("adm1")
        ))
        .header("X-Consul-Token", c.consul_token())
        .send()
        .await
        .expect("consul")
        .json()
        .await
        .expect("json");
    assert_eq!(consul.len(), 2, "{consul:?}");

    // Removing the restore node drains it: its database stops, and the
    // topology is as it was.
    let (ok, out) = corral(&c, &["nodes", "remove", "restore1"])
        .await
        .expect("remove");
    assert!(ok, "corral nodes remove restore1: {out}");
    eventually("restore1 drained and removed", LONG, || async {
        let res = c.api(Method::GET, "/nodes/restore1").await.send().await?;
        Ok((res.status() == reqwest::StatusCode::NOT_FOUND).then_some(()))
    })
    .await
    .expect("removed");
    assert!(
        !corral_e2e::faults::reachable(&format!("{restore_address}:5432"), Duration::from_secs(1))
            .await,
        "the removed node's restored database is stopped"
    );
    let topology_now: Value = c
        .api(Method::GET, "/topology")
        .await
        .send()
        .await
        .expect("topology")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (topology_now["web"].as_u64(), topology_now["db"].as_u64()),
        (Some(1), Some(2))
    );

    // With the archived WAL out of reach (adm1's and the bucket's copy),
    // recovery cannot get to T: the restore fails with the reason, and
    // nothing half-restored is left running or on disk.
    let hidden = c.state_dir().join("backups/wal-hidden");
    std::fs::rename(&wal, &hidden).expect("hide the archive");
    s3.stop();
    let (ok, out) = corral(
        &c,
        &[
            "db", "restore", "--to", "restore2", "--time", &t_arg, "--port", "5434",
        ],
    )
    .await
    .expect("restore");
    // Segments shipped meanwhile went to a new directory: merge them back.
    if let Ok(fresh) = std::fs::read_dir(&wal) {
        for e in fresh.flatten() {
            std::fs::rename(e.path(), hidden.join(e.file_name())).expect("merge");
        }
        std::fs::remove_dir(&wal).expect("remove the new dir");
    }
    std::fs::rename(&hidden, &wal).expect("restore the archive");
    s3.restart().expect("s3s-fs back");
    assert!(!ok, "a restore that cannot reach T must fail: {out}");
    assert!(
        out.contains("archived WAL ends before the target time"),
        "{out}"
    );
    assert!(!c.node_root("adm1").join("restores/restore2").exists());
    assert!(
        !corral_e2e::faults::reachable(
            &format!("{}:5434", c.address("adm1")),
            Duration::from_secs(1)
        )
        .await,
        "the failed restore's postgres is not running"
    );

    // The schedule lives in the topology; one that does not parse is 422
    // and changes nothing.
    let topology: Value = c
        .api(Method::GET, "/topology")
        .await
        .send()
        .await
        .expect("topology")
        .json()
        .await
        .expect("json");
    let mut spec = json!({
        "web": topology["web"],
        "db": topology["db"],
        "lb_policy": topology["lb_policy"],
        "replication": topology["replication"],
        "backup": {"schedule": "25:00", "keep": 1},
    });
    let res = c
        .api(Method::PUT, "/topology")
        .await
        .json(&spec)
        .send()
        .await
        .expect("put");
    assert_eq!(res.status().as_u16(), 422);
    let body: Value = res.json().await.expect("json");
    assert!(
        body["message"].as_str().unwrap_or("").contains("HH:MM"),
        "{body}"
    );

    // Due at the first minute after the manual backup began: the scheduler
    // takes one (within its tick), and keeping 1 deletes the manual one
    // with its files and the WAL only it needed.
    let manual = backup.clone();
    let next_minute = manual.started_at + chrono::Duration::seconds(60);
    spec["backup"] = json!({"schedule": next_minute.format("%H:%M").to_string(), "keep": 1});
    let res = c
        .api(Method::PUT, "/topology")
        .await
        .json(&spec)
        .send()
        .await
        .expect("put");
    assert!(res.status().is_success(), "{}", res.status());
    let scheduled = eventually(
        "a scheduled backup done and the old one gone",
        LONG,
        || async {
            let all = backups(&c).await?;
            Ok(match all.as_slice() {
                [only] if only.trigger == "schedule" && only.status == BackupStatus::Done => {
                    Some(only.clone())
                }
                _ => None,
            })
        },
    )
    .await
    .expect("scheduled backup");
    assert!(
        !c.state_dir()
            .join(format!("backups/base/{}", manual.id))
            .exists(),
        "the backup beyond the retention is deleted from the store"
    );
    let start = corral_proto::backup::segment_name(
        scheduled.timeline.expect("timeline"),
        scheduled.wal_start_lsn.as_deref().expect("lsn"),
    )
    .expect("segment");
    let oldest = std::fs::read_dir(&wal)
        .expect("wal dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .min()
        .expect("a segment");
    assert!(
        oldest[8..] >= start[8..],
        "WAL before the oldest kept backup ({start}) is pruned; {oldest} is left"
    );
    let status: Value = c
        .api(Method::GET, "/backups/status")
        .await
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["overdue"], false, "{status}");
    assert_eq!(status["last_done"]["id"], scheduled.id, "{status}");

    // The offsite copy: the kept backup and the archive are in the bucket
    // with the bytes adm1 verified, and retention took the manual backup
    // out of the bucket too.
    let last = sql(&c, &primary, "SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .expect("switch wal");
    let object = |key: String| s3.object_path(BUCKET, &format!("corral/{key}"));
    eventually(
        "the kept backup and the last segment in S3",
        LONG,
        || async {
            let copied = backups(&c)
                .await?
                .iter()
                .any(|b| b.id == scheduled.id && b.s3_copied_at.is_some());
            Ok((copied && object(format!("wal/{last}")).exists()).then_some(()))
        },
    )
    .await
    .expect("copied offsite");
    for f in &scheduled.files {
        let key = format!("base/{}/{}", scheduled.id, f.name);
        assert_eq!(
            sha256_of(&object(key)).expect("hash"),
            f.sha256,
            "{}",
            f.name
        );
    }
    eventually("the manual backup gone from S3", LONG, || async {
        Ok((!object(format!("base/{}/base.tar", manual.id)).exists()).then_some(()))
    })
    .await
    .expect("pruned offsite");

    // adm1 loses its store: a restore reads the backup and the WAL from
    // the bucket and holds every write.
    std::fs::rename(
        c.state_dir().join("backups"),
        c.state_dir().join("backups-lost"),
    )
    .expect("lose the store");
    let (ok, report) = corral(&c, &["db", "restore", "--to", "from-s3", "--port", "5435"])
        .await
        .expect("restore");
    assert!(ok, "corral db restore from S3: {report}");
    let everything: Vec<String> = expected.iter().chain(&after_t).cloned().collect();
    assert_eq!(
        restored_titles(&c, &c.address("adm1"), 5435)
            .await
            .expect("restored rows"),
        everything,
        "the restore from S3 holds every write"
    );
}
