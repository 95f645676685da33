//! The state database of two servers fails over: two real `corral serve`
//! processes on corral's own state database (a real PostgreSQL primary and
//! streaming standby, run by `corral_server::statedb` as `corral up
//! --servers 2` runs them), the primary killed with SIGKILL. The supervisor
//! fences it and promotes the standby; both servers must write again, and a
//! change on one must wake a long poll parked on the other, within
//! [`ANSWERS_AGAIN_WITHIN`]; meanwhile no request may get a 500. With the
//! whole state database stopped, requests get 503.
//!
//! Addresses: PostgreSQL on 127.0.35.5 (primary) and 127.0.35.6 (standby),
//! servers on 127.0.35.1 and .2, node records in 127.0.35.0/24 (no machines
//! are made).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_server::provider::reaper::{self, Reaper};
use corral_server::statedb::{StateDb, StateDbConfig};
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// The bound, from the primary's SIGKILL to a change committed through
/// either server and delivered to a poll parked on the other: the
/// supervisor sees the postmaster gone within 250 ms and promotes (0.2–0.4
/// s), the servers' pools move within 100 ms of that, a waiting request
/// sleeps out sqlx's connect backoff (writes measured at 1.6–1.75 s) and a
/// listening session reconnects (polls woken at 2.3–2.5 s); the rest is
/// headroom for a loaded machine.
const ANSWERS_AGAIN_WITHIN: Duration = Duration::from_secs(10);

/// One `corral serve`, killed with its test (pdeathsig) or when dropped.
struct Server {
    pid: u32,
    url: String,
    log: PathBuf,
}

impl Server {
    async fn start(state: &Path, database: &str, address: &str, peer: &str) -> Server {
        let port = corral_testkit::free_port(address).expect("free port");
        let log = state.join(format!("serve-{address}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--pdeathsig",
            "KILL",
            "--",
            CORRAL,
            "serve",
            "--no-machines",
        ])
        .args(["--listen", &format!("{address}:{port}")])
        .args(["--network", "127.0.35.0/24"])
        .args(["--database-url", database])
        .args(["--peer", peer])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
        let spawned = Reaper::global()
            .spawn(&mut cmd)
            .expect("spawn corral serve");
        let server = Server {
            pid: spawned.pid,
            url: format!("http://{address}:{port}"),
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", server.url)).send().await
                && r.status().is_success()
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become healthy; its log:\n{}",
                server.url,
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(reaper::pid(self.pid), Signal::SIGKILL);
    }
}

struct Api {
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<(u16, String), String> {
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(15));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.unwrap_or_default()))
    }

    async fn ok(&self, method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
        let (status, text) = self.send(method, url, body).await.expect("request");
        assert!((200..300).contains(&status), "{url}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    fn policy(web: u32, policy: &str) -> Value {
        json!({"web": web, "db": 0, "lb_policy": policy, "replication": "async"})
    }
}

/// A free port on both state database addresses.
fn port_on_both(a: &str, b: &str) -> u16 {
    loop {
        let port = corral_testkit::free_port(a).expect("port");
        if std::net::TcpListener::bind((b, port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_write_again_after_the_state_primary_fails_over() {
    Reaper::global();
    let state = tempfile::tempdir().expect("state dir");
    let port = port_on_both("127.0.35.5", "127.0.35.6");
    let db = StateDb::start(StateDbConfig::new(
        state.path(),
        vec![
            ("adm1".into(), "127.0.35.5".parse().expect("ip")),
            ("adm2".into(), "127.0.35.6".parse().expect("ip")),
        ],
        port,
    ))
    .await
    .expect("state database");
    let url = db.url();
    assert!(
        url.contains(&format!("127.0.35.5:{port},127.0.35.6:{port}")),
        "{url}"
    );

    let a = Server::start(state.path(), &url, "127.0.35.1", "http://127.0.35.2:7000").await;
    let b = Server::start(state.path(), &url, "127.0.35.2", "http://127.0.35.1:7000").await;
    let api = Api {
        http: reqwest::Client::new(),
        token: std::fs::read_to_string(state.path().join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string(),
    };
    api.ok(
        reqwest::Method::PUT,
        &format!("{}/api/v1/topology", a.url),
        Some(Api::policy(1, "round_robin")),
    )
    .await;
    let secret = api
        .ok(
            reqwest::Method::POST,
            &format!("{}/api/v1/nodes/nginx1/enroll-secret", a.url),
            None,
        )
        .await;
    let enrolled = api
        .ok(
            reqwest::Method::POST,
            &format!("{}/api/v1/agents/enroll", b.url),
            Some(json!({"node": "nginx1", "secret": secret["secret"]})),
        )
        .await;
    let agent = Api {
        http: api.http.clone(),
        token: enrolled["token"].as_str().expect("token").to_string(),
    };
    let nodes = api
        .ok(
            reqwest::Method::GET,
            &format!("{}/api/v1/nodes", b.url),
            None,
        )
        .await;
    let last_seq = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "nginx1"))
        .and_then(|n| n["last_seq"].as_i64())
        .expect("nginx1's last seq");

    // nginx1's agent parks a long poll on B for whatever comes after.
    let poll_url = format!(
        "{}/api/v1/agents/nginx1/orders?after={last_seq}&wait=60s",
        b.url
    );
    let poll = tokio::spawn(async move {
        agent
            .send(reqwest::Method::GET, &poll_url, None)
            .await
            .map(|(status, text)| (status, text, Instant::now()))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = api
            .ok(reqwest::Method::GET, &format!("{}/healthz", b.url), None)
            .await;
        if health["long_polls"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no poll parked on B: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Commits wait for the standby once it streams: what the servers were
    // told is committed is on both.
    let primary = corral_server::store::hosts::split(&url).expect("hosts")[0]
        .options
        .clone()
        .database("postgres");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        use sea_orm::sqlx::{self, Connection};
        let mut conn = sqlx::PgConnection::connect_with(&primary)
            .await
            .expect("connect to the primary");
        let states: Vec<(String,)> = sqlx::query_as("SELECT sync_state FROM pg_stat_replication")
            .fetch_all(&mut conn)
            .await
            .expect("replication state");
        if states.iter().any(|(s,)| s == "sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby is not synchronous: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The primary dies.
    let (old, pid) = db.primary();
    assert_eq!(old, "adm1");
    let mut failovers = db.failovers();
    let mut promoted = db.failovers();
    kill(reaper::pid(pid.expect("primary pid")), Signal::SIGKILL).expect("kill the primary");
    let killed = Instant::now();
    let promoted = tokio::spawn(async move {
        let _ = promoted.changed().await;
        killed.elapsed()
    });

    // Writes through A and reads through B until the write is through:
    // anything but a 500 is fine meanwhile.
    let mut seen = Vec::new();
    let written = loop {
        let write = api
            .send(
                reqwest::Method::PUT,
                &format!("{}/api/v1/topology", a.url),
                Some(Api::policy(1, "least_conn")),
            )
            .await;
        let read = api
            .send(
                reqwest::Method::GET,
                &format!("{}/api/v1/nodes", b.url),
                None,
            )
            .await;
        for (status, text) in [&write, &read].into_iter().flatten() {
            assert!(
                *status < 500 || *status == 503,
                "{status} during the failover: {text}\nA's log:\n{}\nB's log:\n{}",
                a.log(),
                b.log()
            );
            seen.push(*status);
        }
        if let Ok((200, _)) = write {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < ANSWERS_AGAIN_WITHIN,
            "no write through A {:?} after the primary died (statuses {seen:?}); A's log:\n{}",
            ANSWERS_AGAIN_WITHIN,
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(*failovers.borrow_and_update(), 1, "one failover");
    assert_eq!(db.primary().0, "adm2");
    // Nothing committed before the kill was lost: nginx1 is enrolled with
    // every order it had (and one more).
    let nodes = api
        .ok(
            reqwest::Method::GET,
            &format!("{}/api/v1/nodes", b.url),
            None,
        )
        .await;
    let nginx1 = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "nginx1"))
        .expect("nginx1 survived the failover")
        .clone();
    assert!(nginx1["last_seq"].as_i64() > Some(last_seq), "{nginx1}");
    assert_ne!(nginx1["state"], "provisioning", "{nginx1}");

    // The poll parked on B hears of the change filed on A.
    let (status, text, at) = tokio::time::timeout(
        ANSWERS_AGAIN_WITHIN.saturating_sub(killed.elapsed()) + Duration::from_millis(500),
        poll,
    )
    .await
    .expect("the poll on B answered in time")
    .expect("poll task")
    .expect("poll request");
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).expect("orders");
    let orders = answer["orders"].as_array().cloned().unwrap_or_default();
    assert!(
        orders
            .iter()
            .any(|o| o["seq"].as_i64() > Some(last_seq) && o["payload"]["kind"] == "load_balancer"),
        "the poll got no new load balancer order: {text}"
    );
    let woke = at.duration_since(killed);
    // B writes too, on the new primary.
    api.ok(
        reqwest::Method::PUT,
        &format!("{}/api/v1/topology", b.url),
        Some(Api::policy(1, "uri_hash")),
    )
    .await;
    let promoted = promoted.await.expect("promotion time");
    println!(
        "primary killed -> standby promoted {promoted:?}, write through A {written:?}, poll on B woken {woke:?}; statuses meanwhile {seen:?}"
    );

    // The old primary comes back as a standby of the new one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::exists(state.path().join("statedb/adm1/standby.signal")).unwrap_or(false) {
        assert!(Instant::now() < deadline, "adm1 was not made a standby");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With no state database at all, requests are 503, not 500.
    db.stop().await;
    let (nodes_on_a, nodes_on_b) = (
        format!("{}/api/v1/nodes", a.url),
        format!("{}/api/v1/nodes", b.url),
    );
    let (on_a, on_b) = tokio::join!(
        api.send(reqwest::Method::GET, &nodes_on_a, None),
        api.send(reqwest::Method::GET, &nodes_on_b, None),
    );
    for (status, text) in [
        on_a.expect("an answer from A"),
        on_b.expect("an answer from B"),
    ] {
        assert_eq!(status, 503, "{text}");
    }
    drop((a, b));
}
