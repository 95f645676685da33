//! The offsite copy against a real S3 server (`s3s-fs`, started by the
//! test on 127.0.33.x): done backups and archived WAL land in the bucket
//! with their checksums; with the bucket down the local backup still
//! succeeds, an event says the copy fails, and the copy catches up when it
//! is back; retention deletes from the bucket too; a restore reads back
//! from the bucket what the store lost; bad settings are refused at start
//! or reported as an event.

use std::time::Duration;

use corral_server::s3::{S3Bucket, S3Config};
use corral_server::startup::{Application, Config};
use corral_testkit::s3::S3Server;
use reqwest::Method;
use serde_json::{Value, json};

use crate::backups::{sha, upload};
use crate::db::{beat, db_heartbeat, db_pair};
use crate::helpers::*;

const BUCKET: &str = "corral-backups";
const HOST: &str = "127.0.33.1";
const WAIT: Duration = Duration::from_secs(60);

fn s3_config(s3: &S3Server, bucket: &str) -> S3Config {
    S3Config {
        endpoint: s3.endpoint(),
        bucket: bucket.into(),
        region: "us-east-1".into(),
        prefix: "corral/".into(),
        access_key: s3.access_key.clone(),
        secret_key: s3.secret_key.clone(),
        ca_file: None,
    }
}

/// Takes backup of `base` through the real endpoints (pg2 streaming),
/// starting at WAL position `start`; returns its id once done.
async fn backup(app: &TestApp, pg1: &str, pg2: &str, base: &'static [u8], start: &str) -> i64 {
    beat(app, pg1, "pg1", db_heartbeat("primary", 0, 1)).await;
    beat(app, pg2, "pg2", db_heartbeat("replica", 0, 1)).await;
    let res = app.post("/api/v1/backups", json!({})).await;
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");
    let path = format!("/api/v1/agents/pg2/backups/{id}/files/base.tar");
    let res = upload(app, pg2, &path, base, Some(&sha(base))).await;
    assert_eq!(res.status(), 201);
    let report = json!({
        "files": [{"name": "base.tar", "size": base.len(), "sha256": sha(base)}],
        "wal_start_lsn": start, "wal_end_lsn": start, "timeline": 1,
    });
    let res = app
        .as_token(
            pg2,
            Method::POST,
            &format!("/api/v1/agents/pg2/backups/{id}/report"),
        )
        .json(&report)
        .send()
        .await
        .expect("report");
    assert_eq!(res.status(), 200, "the local backup succeeds");
    assert_eq!(res.json::<Value>().await.expect("json")["status"], "done");
    id
}

async fn archive(app: &TestApp, pg1: &str, segment: &str, data: &'static [u8]) {
    let path = format!("/api/v1/agents/pg1/wal/{segment}");
    assert_eq!(
        upload(app, pg1, &path, data, Some(&sha(data)))
            .await
            .status(),
        204
    );
}

/// The object's bytes as s3s-fs stored them, and the SHA-256 in its
/// metadata (read with the server's client).
async fn object(s3: &S3Server, bucket: &S3Bucket, name: &str) -> Option<(Vec<u8>, Option<String>)> {
    let bytes = std::fs::read(s3.object_path(BUCKET, &format!("corral/{name}"))).ok()?;
    let (_, sum) = bucket.head(name).await.ok()??;
    Some((bytes, sum))
}

async fn copied_at(app: &TestApp, id: i64) -> Option<String> {
    let list = app.get_json("/api/v1/backups").await;
    list.as_array()
        .expect("array")
        .iter()
        .find(|b| b["id"] == id)
        .and_then(|b| b["s3_copied_at"].as_str().map(str::to_string))
}

async fn offsite_copy_runs_through_an_outage_and_retention(backend: Backend) {
    let mut s3 = S3Server::start(HOST, BUCKET).expect("s3s-fs starts");
    let config = s3_config(&s3, BUCKET);
    let client = S3Bucket::new(&config).expect("client");
    let app = spawn_with(backend, move |c| c.s3 = Some(config)).await;
    let (pg1, pg2) = db_pair(&app).await;

    // A backup and a segment are copied with their checksums.
    let first = backup(&app, &pg1, &pg2, b"first base", "0/3000028").await;
    archive(&app, &pg1, "000000010000000000000003", b"wal three").await;
    archive(&app, &pg1, "000000010000000000000004", b"wal four").await;
    eventually("backup 1 and its WAL in the bucket", WAIT, || async {
        copied_at(&app, first).await.is_some()
            && object(&s3, &client, "wal/000000010000000000000004")
                .await
                .is_some()
    })
    .await;
    assert_eq!(
        object(&s3, &client, &format!("base/{first}/base.tar")).await,
        Some((b"first base".to_vec(), Some(sha(b"first base"))))
    );
    assert_eq!(
        object(&s3, &client, "wal/000000010000000000000003").await,
        Some((b"wal three".to_vec(), Some(sha(b"wal three"))))
    );
    let status = app.get_json("/api/v1/backups/status").await;
    assert_eq!(status["s3"]["bucket"], BUCKET, "{status}");
    assert!(status["s3"]["last_error"].is_null(), "{status}");

    // The bucket goes away: local backups and archiving go on, an event
    // says the copy fails, and the backup shows as not copied.
    s3.stop();
    let second = backup(&app, &pg1, &pg2, b"second base", "0/5000028").await;
    archive(&app, &pg1, "000000010000000000000005", b"wal five").await;
    eventually("a backup.s3_failed event", WAIT, || async {
        app.event_kinds()
            .await
            .contains(&"backup.s3_failed backups".to_string())
    })
    .await;
    let status = app.get_json("/api/v1/backups/status").await;
    assert!(
        status["s3"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{status}"
    );
    assert!(status["s3"]["failing_since"].is_string(), "{status}");
    let events = serde_json::to_string(&app.events().await).expect("json");
    for secret in [
        "X-Amz-Signature",
        "X-Amz-Credential",
        s3.secret_key.as_str(),
    ] {
        assert!(!status.to_string().contains(secret), "{secret} in {status}");
        assert!(!events.contains(secret), "{secret} in the events");
    }
    assert_eq!(copied_at(&app, second).await, None);
    assert!(
        std::fs::read(app.state.join(format!("backups/base/{second}/base.tar"))).is_ok(),
        "the local copy is there"
    );

    // Back: the copy catches up by itself.
    s3.restart().expect("s3s-fs restarts");
    eventually("backup 2 copied after the outage", WAIT, || async {
        copied_at(&app, second).await.is_some()
            && object(&s3, &client, "wal/000000010000000000000005")
                .await
                .is_some()
    })
    .await;
    assert_eq!(
        object(&s3, &client, &format!("base/{second}/base.tar")).await,
        Some((b"second base".to_vec(), Some(sha(b"second base"))))
    );
    eventually("a backup.s3_recovered event", WAIT, || async {
        app.event_kinds()
            .await
            .contains(&"backup.s3_recovered backups".to_string())
    })
    .await;
    let status = app.get_json("/api/v1/backups/status").await;
    assert!(status["s3"]["last_error"].is_null(), "{status}");

    // The store loses everything: a restore still reads the backup and
    // the WAL, from the bucket, checked against their checksums.
    std::fs::remove_dir_all(app.state.join("backups")).expect("lose the store");
    let res = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/adm1/backups/{second}/files/base.tar"),
        )
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-content-sha256"],
        sha(b"second base").as_str()
    );
    assert_eq!(res.bytes().await.expect("bytes").as_ref(), b"second base");
    let names = app.get_json("/api/v1/agents/adm1/wal").await;
    assert_eq!(
        names,
        json!([
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005"
        ])
    );
    let res = app
        .request(
            Method::GET,
            "/api/v1/agents/adm1/wal/000000010000000000000004",
        )
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.expect("bytes").as_ref(), b"wal four");

    // Retention (keep 1): the third backup leaves only itself and its WAL,
    // in the bucket as in the store.
    let res = app
        .put(
            "/api/v1/topology",
            json!({"web": 1, "db": 2, "lb_policy": "round_robin", "replication": "async",
                   "backup": {"schedule": "03:00", "keep": 1}}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let third = backup(&app, &pg1, &pg2, b"third base", "0/5000100").await;
    eventually("retention applied to the bucket", WAIT, || async {
        let gone = |name: String| {
            let s3 = &s3;
            let client = &client;
            async move { object(s3, client, &name).await.is_none() }
        };
        copied_at(&app, third).await.is_some()
            && gone(format!("base/{first}/base.tar")).await
            && gone(format!("base/{second}/base.tar")).await
            && gone("wal/000000010000000000000003".into()).await
            && gone("wal/000000010000000000000004".into()).await
    })
    .await;
    assert!(
        object(&s3, &client, &format!("base/{third}/base.tar"))
            .await
            .is_some()
    );
    assert!(
        object(&s3, &client, "wal/000000010000000000000005")
            .await
            .is_some()
    );
}

#[tokio::test]
async fn backups_are_copied_to_s3_through_an_outage_and_pruned_with_retention_sqlite() {
    offsite_copy_runs_through_an_outage_and_retention(Backend::Sqlite).await;
}

#[tokio::test]
async fn backups_are_copied_to_s3_through_an_outage_and_pruned_with_retention_postgres() {
    offsite_copy_runs_through_an_outage_and_retention(Backend::Postgres).await;
}

#[tokio::test]
async fn with_the_store_and_the_bucket_both_gone_a_restore_read_is_unavailable_not_a_500() {
    let mut s3 = S3Server::start(HOST, BUCKET).expect("s3s-fs starts");
    let config = s3_config(&s3, BUCKET);
    let app = spawn_with(Backend::Sqlite, move |c| c.s3 = Some(config)).await;
    let (pg1, pg2) = db_pair(&app).await;
    let id = backup(&app, &pg1, &pg2, b"base", "0/3000028").await;
    s3.stop();
    std::fs::remove_dir_all(app.state.join("backups")).expect("lose the store");
    let res = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/adm1/backups/{id}/files/base.tar"),
        )
        .send()
        .await
        .expect("get");
    let body = assert_error(res, 503, "unavailable").await;
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("unreachable")),
        "{body}"
    );
}

#[tokio::test]
async fn a_missing_bucket_is_an_event_and_bad_settings_are_refused_at_start() {
    let s3 = S3Server::start(HOST, BUCKET).expect("s3s-fs starts");
    let missing = s3_config(&s3, "no-such-bucket");
    let app = spawn_with(Backend::Sqlite, move |c| c.s3 = Some(missing)).await;
    eventually(
        "a backup.s3_failed event naming the bucket",
        WAIT,
        || async {
            app.events().await.iter().any(|e| {
                e["kind"] == "backup.s3_failed"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("no-such-bucket does not exist"))
            })
        },
    )
    .await;

    let wrong_secret = S3Config {
        secret_key: "wrong".into(),
        ..s3_config(&s3, BUCKET)
    };
    let app = spawn_with(Backend::Sqlite, move |c| c.s3 = Some(wrong_secret)).await;
    eventually(
        "a backup.s3_failed event about the credentials",
        WAIT,
        || async {
            app.events().await.iter().any(|e| {
                e["kind"] == "backup.s3_failed"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("refused the credentials"))
            })
        },
    )
    .await;

    let state = tempfile::tempdir().expect("state");
    let mut config = Config::new(state.path());
    config.listen = "127.0.0.1:0".into();
    config.s3 = Some(S3Config {
        endpoint: "s3.example.com".into(),
        ..s3_config(&s3, BUCKET)
    });
    let err = Application::build(config).await.err().expect("refused");
    assert!(err.to_string().contains("--s3-endpoint"), "{err}");
    assert!(
        !state.path().join("admin-token").exists(),
        "nothing is set up before the settings are checked"
    );
}

#[tokio::test]
async fn a_file_larger_than_a_part_goes_up_in_parts_with_its_checksum() {
    use futures_util::StreamExt;
    let s3 = S3Server::start(HOST, BUCKET).expect("s3s-fs starts");
    // Parts of S3's smallest size (5 MiB), so a 12 MiB file takes three.
    let client = S3Bucket::new(&s3_config(&s3, BUCKET))
        .expect("client")
        .with_part_size(0);
    let dir = tempfile::tempdir().expect("dir");
    for (name, size, parts) in [
        ("big", (12 << 20) + 1, Some(3)),
        ("one-part", 5 << 20, None),
    ] {
        let data: Vec<u8> = (0..size).map(|i: usize| (i * 7 % 251) as u8).collect();
        let path = dir.path().join(name);
        std::fs::write(&path, &data).expect("write");
        let key = format!("base/{name}/base.tar");
        let sent = client
            .put_file(&key, &path, &sha(&data))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sent, size as u64, "{name}");
        let (stored, sum) = object(&s3, &client, &key).await.expect("stored");
        assert!(stored == data, "{name}: the stored bytes differ");
        assert_eq!(sum, Some(sha(&data)), "{name}");
        // A multipart object's ETag ends in its number of parts.
        let etag = client.etag(&key).await.expect("head").expect("etag");
        let in_parts = etag
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u32>().ok());
        assert_eq!(in_parts, parts, "{name}: ETag {etag}");
        // Read back as a restore does: the checksum, then the bytes.
        let (read_sum, mut stream) = client.get(&key).await.expect("get").expect("the object");
        assert_eq!(read_sum, sha(&data));
        let mut read = Vec::with_capacity(size);
        while let Some(chunk) = stream.next().await {
            read.extend_from_slice(&chunk.expect("chunk"));
        }
        assert!(read == data, "{name}: the bytes read back differ");
    }
}
