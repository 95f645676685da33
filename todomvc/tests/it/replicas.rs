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
