//! Read/write split with a real streaming replica: reads move to the
//! replica once it has what the client wrote, and a client never sees its
//! own write missing, even while the replica's replay is paused.

use std::time::Duration;

use corral_testkit::Postgres;
use serde_json::json;

use crate::support::{Session, TestApp, app_database, endpoint, eventually};

/// A primary with the app's database, and a replica of it.
pub fn primary_and_replica(db: &str) -> anyhow::Result<(Postgres, Postgres)> {
    let primary = Postgres::start()?;
    app_database(&primary, db)?;
    let replica = primary.start_replica()?;
    Ok((primary, replica))
}

async fn reads_from_replica_with(s: &Session, title: &str) -> anyhow::Result<bool> {
    let r = s.get("/todos").await?;
    Ok(
        r.status == 200
            && r.read_from() == Some("replica")
            && r.titles().iter().any(|t| t == title),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_own_writes_while_replica_replay_is_paused() -> anyhow::Result<()> {
    let (primary, replica) = primary_and_replica("todomvc")?;
    let app = TestApp::spawn(&[
        "--db-name",
        "todomvc",
        "--db-primary",
        &endpoint(&primary),
        "--db-replica",
        &endpoint(&replica),
    ])
    .await?;
    app.wait_writable().await?;
    let long = Duration::from_secs(30);

    let alice = app.session();
    let bob = app.session();
    let first = alice.add("first").await?;
    let first_url = first.json["url"].as_str().expect("url").to_string();

    // Once the replica has replayed her write, Alice's reads go there.
    eventually("alice reads from the replica", long, || {
        reads_from_replica_with(&alice, "first")
    })
    .await?;
    // Bob has not written; after his first read (from the primary) he too
    // is served by the replica.
    eventually("bob reads from the replica", long, || {
        reads_from_replica_with(&bob, "first")
    })
    .await?;

    replica.pause_replay()?;
    let second = alice.add("second").await?;
    let second_url = second.json["url"].as_str().expect("url").to_string();
    let r = alice
        .patch_json(&first_url, &json!({"title": "first, edited"}))
        .await?;
    assert_eq!(r.status, 200);

    // Alice never sees a list without her writes: the paused replica cannot
    // serve her, so the primary does.
    for _ in 0..5 {
        let r = alice.get("/todos").await?;
        assert_eq!(
            r.titles(),
            vec!["first, edited", "second"],
            "stale list for alice"
        );
        assert_eq!(r.read_from(), Some("primary"));
    }
    let r = alice.get(&second_url).await?;
    assert_eq!((r.status, r.json["title"].as_str()), (200, Some("second")));

    // Bob's position is older, so the replica may serve him, and it really
    // is behind: proof that Alice's fresh answers were not luck.
    let r = bob.get("/todos").await?;
    assert_eq!(r.read_from(), Some("replica"));
    assert_eq!(r.titles(), vec!["first"], "the paused replica lags");

    // A client without the cookie (the cross-origin spec runner) reads from
    // the primary and sees everything.
    let stranger = Session::new(&app.base);
    let r = stranger.get("/todos").await?;
    assert_eq!(r.read_from(), Some("primary"));
    assert_eq!(r.titles(), vec!["first, edited", "second"]);

    // Deleting is a write like any other.
    assert_eq!(alice.delete(&first_url).await?.status, 204);
    assert_eq!(alice.get("/todos").await?.titles(), vec!["second"]);
    assert_eq!(alice.get(&first_url).await?.status, 404);

    // Health shows the paused replica as up but lagging (once a probe has
    // run since the pause).
    eventually("health shows the replica paused", long, || async {
        let h = app.health().await?;
        let replica = h.json["servers"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["state"] == "replica"))
            .cloned()
            .unwrap_or_default();
        Ok(h.json["status"] == "ok"
            && replica["replay_paused"] == true
            && replica["caught_up"] == false
            && replica["lag_bytes"].as_u64().is_some_and(|l| l > 0))
    })
    .await?;

    // Resumed, the replica catches up and serves Alice again.
    replica.resume_replay()?;
    eventually("alice reads from the replica again", long, || {
        reads_from_replica_with(&alice, "second")
    })
    .await?;
    let r = alice.get("/todos").await?;
    assert_eq!(r.titles(), vec!["second"]);
    Ok(())
}

/// A former primary restarted as a standby before anything rewound it (an
/// agent that fenced it and saw no leader to follow) replays its own WAL,
/// writes no other server has, to a position beyond what clients of the
/// new primary carry. It is in recovery and answers SQL, but it streams
/// from no one: reading from it would show a client writes that were
/// never acknowledged and hide the ones that were. Replica reads go only
/// to servers that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_never_streamed_is_not_read_from() -> anyhow::Result<()> {
    let (mut old, mut new) = primary_and_replica("todomvc")?;
    let app = TestApp::spawn(&[
        "--db-name",
        "todomvc",
        "--db-primary",
        &endpoint(&old),
        "--db-replica",
        &endpoint(&new),
    ])
    .await?;
    app.wait_writable().await?;
    let long = Duration::from_secs(30);
    let alice = app.session();
    alice.add("before the split").await?;
    eventually("the replica has the first write", long, || async {
        Ok(new.psql("todomvc", "SELECT count(*) FROM todos")? == "1")
    })
    .await?;

    // The split: the standby stops, the old primary takes writes of its
    // own (a commit whose client never heard back), lots of WAL of them.
    new.stop();
    old.psql(
        "todomvc",
        "INSERT INTO todos (title, completed) \
         SELECT 'never acknowledged ' || i, false FROM generate_series(1, 300) i",
    )?;
    old.stop();
    // The standby is promoted without them, and Alice writes to it.
    new.restart()?;
    new.promote()?;
    eventually("alice writes to the promoted server", long, || async {
        Ok(alice.add("after the failover").await?.status == 201)
    })
    .await?;

    // The old primary comes back in recovery, following no one.
    std::fs::write(old.data_dir().join("standby.signal"), "")?;
    old.restart()?;
    assert_eq!(old.psql("postgres", "SELECT pg_is_in_recovery()")?, "t");
    let old_address = endpoint(&old);
    eventually(
        "the app has probed the old primary as a standby",
        long,
        || async {
            let h = app.health().await?;
            Ok(h.json["servers"].as_array().is_some_and(|servers| {
                servers.iter().any(|s| {
                    s["address"].as_str() == Some(old_address.as_str()) && s["state"] == "replica"
                })
            }))
        },
    )
    .await?;

    for _ in 0..10 {
        let r = alice.get("/todos").await?;
        assert_eq!(r.status, 200, "{:?}", r.json);
        let titles = r.titles();
        assert!(
            titles == ["before the split", "after the failover"],
            "alice's list, read from {:?}, has {} todos: {:?}...",
            r.read_from(),
            titles.len(),
            &titles[..titles.len().min(3)]
        );
        assert_eq!(r.read_from(), Some("primary"));
    }
    // Nor does health count it as a replica that has caught up.
    let h = app.health().await?;
    let old_report = h.json["servers"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["address"].as_str() == Some(old_address.as_str()))
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(old_report["caught_up"], false, "{old_report}");
    Ok(())
}
