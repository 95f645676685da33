//! The primary fails: writes answer 503 with Retry-After (promptly, and
//! without being retried into duplicates), reads keep coming from the
//! replica, and once a replica is promoted the app writes to it without a
//! restart, and keeps doing so when the old primary comes back unfenced. A primary that freezes instead of dying gets the same answers
//! within a bounded time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use corral_testkit::Postgres;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::replicas::primary_and_replica;
use crate::support::{Session, TestApp, app_database, endpoint, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answer_503_while_no_primary_then_recover_after_promotion() -> anyhow::Result<()> {
    let (mut primary, replica) = primary_and_replica("todomvc")?;
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
    let s = app.session();
    s.add("before").await?;
    eventually("the replica has the write", long, || async {
        let r = s.get("/todos").await?;
        Ok(r.read_from() == Some("replica") && r.titles() == vec!["before"])
    })
    .await?;

    primary.kill();

    // Writes: a prompt 503 with Retry-After, never a hang.
    let mut refused = 0;
    for i in 0..3 {
        let started = Instant::now();
        let r = s
            .post_json("/todos", &json!({"title": format!("during {i}")}))
            .await?;
        assert_eq!(r.status, 503, "write with the primary dead: {}", r.text);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json["error"], "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        refused += 1;
    }
    assert_eq!(refused, 3);

    // Reads keep working from the replica, for this session and for a new one.
    let r = s.get("/todos").await?;
    assert_eq!(
        (r.status, r.read_from()),
        (200, Some("replica")),
        "{}",
        r.text
    );
    assert_eq!(r.titles(), vec!["before"]);
    let r = Session::new(&app.base).get("/todos").await?;
    assert_eq!((r.status, r.titles()), (200, vec!["before".to_string()]));
    eventually("health says read-only", long, || async {
        let h = app.health().await?;
        Ok(h.status == 200 && h.json["status"] == "read-only" && h.json["writable"] == false)
    })
    .await?;

    // The replica is promoted; the app finds it by itself.
    replica.promote()?;
    let created = AtomicU32::new(0);
    eventually("writes succeed on the promoted replica", long, || async {
        let r = s.post_json("/todos", &json!({"title": "after"})).await?;
        match r.status {
            201 => {
                created.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            503 => Ok(false),
            other => anyhow::bail!("unexpected {other}: {}", r.text),
        }
    })
    .await?;
    assert_eq!(created.load(Ordering::Relaxed), 1);
    let r = s.get("/todos").await?;
    assert_eq!(
        r.titles(),
        vec!["before", "after"],
        "no write lost, none doubled"
    );
    assert_eq!(
        replica.psql(
            "todomvc",
            "SELECT string_agg(title, ',' ORDER BY id) FROM todos"
        )?,
        "before,after"
    );
    let h = app.health().await?;
    assert_eq!((h.status, h.json["status"].as_str()), (200, Some("ok")));

    // The old primary comes back still a primary (nothing fenced it), and
    // the static list still calls it the primary; but it is on the old
    // timeline, so writes stay with the promoted server.
    primary.restart()?;
    eventually(
        "the returning old primary is seen and set aside",
        long,
        || async {
            let h = app.health().await?;
            let states: Vec<&str> = h.json["servers"]
                .as_array()
                .map(|s| s.iter().filter_map(|s| s["state"].as_str()).collect())
                .unwrap_or_default();
            Ok(states.contains(&"excluded") && states.contains(&"primary"))
        },
    )
    .await?;
    s.add("after the return").await?;
    assert_eq!(
        replica.psql(
            "todomvc",
            "SELECT string_agg(title, ',' ORDER BY id) FROM todos"
        )?,
        "before,after,after the return"
    );
    assert_eq!(
        primary.psql(
            "todomvc",
            "SELECT count(*) FROM todos WHERE title <> 'before'"
        )?,
        "0"
    );
    Ok(())
}

/// Every process of a PostgreSQL server: the postmaster and its children.
fn server_pids(pg: &Postgres) -> anyhow::Result<Vec<Pid>> {
    let pidfile = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
    let postmaster: i32 = pidfile.lines().next().unwrap_or("").trim().parse()?;
    let mut pids = vec![Pid::from_raw(postmaster)];
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(Pid::from_raw(pid));
        }
    }
    Ok(pids)
}

/// Stops every process of a server (SIGSTOP): it keeps its sockets but
/// answers nothing, like a hung machine. Continued again on drop.
struct Frozen(Vec<Pid>);

impl Frozen {
    fn freeze(pg: &Postgres) -> anyhow::Result<Frozen> {
        let pids = server_pids(pg)?;
        for pid in &pids {
            kill(*pid, Signal::SIGSTOP)?;
        }
        Ok(Frozen(pids))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(*pid, Signal::SIGCONT);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answer_503_in_bounded_time_when_the_primary_freezes() -> anyhow::Result<()> {
    let primary = Postgres::start()?;
    app_database(&primary, "todomvc")?;
    let app = TestApp::spawn(&[
        "--db-name",
        "todomvc",
        "--db-primary",
        &endpoint(&primary),
        "--db-connect-timeout-ms",
        "500",
        "--db-statement-timeout-ms",
        "1000",
    ])
    .await?;
    app.wait_writable().await?;
    let s = app.session();
    s.add("warm").await?;
    assert_eq!(s.get("/todos").await?.status, 200);

    let frozen = Frozen::freeze(&primary)?;
    // One operation may take connect + statement timeout + margin (2 s here).
    let bound = Duration::from_secs(4);
    let started = Instant::now();
    let r = s.post_json("/todos", &json!({"title": "frozen"})).await?;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        started.elapsed() < bound,
        "write took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let r = s.get("/todos").await?;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        started.elapsed() < bound,
        "read took {:?}",
        started.elapsed()
    );
    // Health never touches the database, so it answers at once.
    let started = Instant::now();
    app.health().await?;
    assert!(started.elapsed() < Duration::from_secs(1));
    eventually("health notices", Duration::from_secs(10), || async {
        Ok(app.health().await?.status == 503)
    })
    .await?;

    drop(frozen);
    app.wait_writable().await?;
    eventually("writes work again", Duration::from_secs(30), || async {
        Ok(s.post_json("/todos", &json!({"title": "thawed"}))
            .await?
            .status
            == 201)
    })
    .await?;
    // The frozen write's outcome was unknown and it was not retried: it may
    // have landed once (the server ran it after thawing), never twice.
    let frozen_rows: u32 = primary
        .psql(
            "todomvc",
            "SELECT count(*) FROM todos WHERE title = 'frozen'",
        )?
        .parse()?;
    assert!(frozen_rows <= 1, "{frozen_rows} copies of one write");
    assert_eq!(
        primary.psql(
            "todomvc",
            "SELECT count(*) FROM todos WHERE title = 'thawed'"
        )?,
        "1"
    );
    Ok(())
}

/// A hung primary (SIGSTOP: it keeps its sockets, answers nothing) replaced
/// by a promoted replica, as corral's HA does it: the write hung on the old
/// primary ends with a 503 once the app sees the new primary, and the next
/// write lands there, both long before the 7.5 s an operation may take
/// (connect 2 s + statement 5 s + margin) and the 5 s the hung server's
/// probe takes to time out, which the app waited for before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_hung_on_a_frozen_primary_ends_once_a_replica_is_promoted() -> anyhow::Result<()> {
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
    let s = app.session();
    s.add("before").await?;
    eventually(
        "the replica has the write",
        Duration::from_secs(30),
        || async { Ok(replica.psql("todomvc", "SELECT count(*) FROM todos")? == "1") },
    )
    .await?;

    let frozen = Frozen::freeze(&primary)?;
    let frozen_at = Instant::now();
    let hung = {
        let s = Session::new(&app.base);
        tokio::spawn(async move {
            let r = s.post_json("/todos", &json!({"title": "hung"})).await;
            (r, Instant::now())
        })
    };
    replica.promote()?;
    let (r, answered_at) = hung.await?;
    let r = r?;
    assert_eq!(r.status, 503, "{}", r.text);
    let hung_for = answered_at - frozen_at;
    assert!(
        hung_for < Duration::from_secs(3),
        "the hung write answered after {hung_for:?}"
    );
    eventually(
        "a write lands on the promoted replica",
        Duration::from_secs(30),
        || async {
            Ok(s.post_json("/todos", &json!({"title": "after"}))
                .await?
                .status
                == 201)
        },
    )
    .await?;
    let resumed = frozen_at.elapsed();
    println!("hung write answered after {hung_for:?}, writes resumed after {resumed:?}");
    assert!(
        resumed < Duration::from_secs(3),
        "writes resumed {resumed:?} after the freeze"
    );
    assert_eq!(
        replica.psql(
            "todomvc",
            "SELECT string_agg(title, ',' ORDER BY id) FROM todos"
        )?,
        "before,after"
    );
    drop(frozen);
    Ok(())
}
