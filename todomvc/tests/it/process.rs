//! The `todomvc` binary as the corral agent runs it: flags and environment,
//! and a graceful stop on SIGTERM that lets in-flight requests finish.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corral_testkit::free_port;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use sqlx::Connection;

use crate::support::{APP_USER, Session, eventually, shared_app_database, shared_psql};

/// The binary, killed and reaped on drop if the test did not stop it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() -> anyhow::Result<()> {
    let (at, db) = shared_app_database("sigterm")?;
    let port = free_port("127.0.0.1")?;
    let mut app = Running(
        Command::new(env!("CARGO_BIN_EXE_todomvc"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--node-name",
                "web9",
            ])
            .args(["--db-name", &db, "--workers", "2", "--log-format", "json"])
            // The rest from the environment, as the agent may pass it.
            .env("TODOMVC_DB_PRIMARY", &at)
            .env("TODOMVC_DB_USER", APP_USER)
            .env("TODOMVC_PROBE_INTERVAL_MS", "100")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let s = Session::new(&base);
    let long = Duration::from_secs(30);
    eventually("the binary serves and can write", long, || async {
        let h = s.get("/healthz").await?;
        Ok(h.json["writable"] == true)
    })
    .await?;
    let r = s.add("before").await?;
    assert_eq!(r.header("x-served-by"), Some("web9"));

    // Hold a lock so the next write stays in flight.
    let server = corral_testkit::shared_server()?;
    let mut locker = sqlx::PgConnection::connect(&format!(
        "postgres://{}@{}:{}/{db}",
        corral_testkit::SUPERUSER,
        server.host,
        server.port
    ))
    .await?;
    sqlx::query("BEGIN").execute(&mut locker).await?;
    sqlx::query("LOCK TABLE todos IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await?;
    let writer = Session::new(&base);
    let in_flight = tokio::spawn(async move {
        writer
            .post_json("/todos", &json!({"title": "in flight"}))
            .await
    });
    eventually("the write waits on the lock", long, || async {
        let waiting = shared_psql(
            &db,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO todos%'",
        )?;
        Ok(waiting == "1")
    })
    .await?;

    kill(Pid::from_raw(app.0.id() as i32), Signal::SIGTERM)?;
    // Stopping: no new connections are taken...
    eventually("the listener closes", long, || async {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
    })
    .await?;
    assert!(
        app.0.try_wait()?.is_none(),
        "it must wait for the request in flight"
    );

    // ...but the one in flight completes once the lock goes.
    sqlx::query("COMMIT").execute(&mut locker).await?;
    let r = in_flight.await??;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["title"], "in flight");

    let mut status = None;
    eventually("the binary exits", long, || {
        status = app.0.try_wait().ok().flatten();
        std::future::ready(Ok(status.is_some()))
    })
    .await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert_eq!(
        shared_psql(&db, "SELECT string_agg(title, ',' ORDER BY id) FROM todos")?,
        "before,in flight"
    );
    Ok(())
}
