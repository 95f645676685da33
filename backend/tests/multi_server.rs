//! Several real `corral serve` processes on one real PostgreSQL: orders
//! filed on one server wake long polls parked on another, log lines shipped
//! to one are read and followed on another, agents move to
//! the surviving server when theirs is killed and miss nothing, the
//! background work moves to the surviving server with the leader lock, and
//! a server older than the database's schema refuses to start.
//!
//! Addresses: PostgreSQL on 127.0.25.10, servers on 127.0.25.1 and .2 (and
//! .3), node records in 127.0.26.0/24 (no machines are made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_testkit::{PgOptions, Postgres};
use serde_json::{Value, json};
use tokio::process::Command;

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// One `corral serve`, killed (SIGKILL) and reaped when dropped.
struct Server {
    child: Option<tokio::process::Child>,
    url: String,
    log: PathBuf,
}

impl Server {
    async fn start(state: &Path, database: &str, address: &str, extra: &[&str]) -> Server {
        Server::start_with(state, database, address, extra, false).await
    }

    /// A server that makes machines too (the local provider's agent
    /// processes) when `machines`, as `corral serve` does by default.
    async fn start_with(
        state: &Path,
        database: &str,
        address: &str,
        extra: &[&str],
        machines: bool,
    ) -> Server {
        let port = corral_testkit::free_port(address).expect("free port");
        let log = state.join(format!("serve-{address}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("setpriv")
            // Dies with this test process, even when the test is killed.
            .args(["--pdeathsig", "KILL", "--", CORRAL, "serve"])
            .args((!machines).then_some("--no-machines"))
            .args(["--listen", &format!("{address}:{port}")])
            .args(["--network", "127.0.26.0/24"])
            .args(["--database-url", database])
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn corral serve");
        let server = Server {
            child: Some(child),
            url: format!("http://{address}:{port}"),
            log,
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become healthy; its log:\n{}",
                self.url,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn health(&self) -> Option<Value> {
        let r = reqwest::get(format!("{}/healthz", self.url)).await.ok()?;
        r.json().await.ok()
    }

    /// kill -9, and reaped.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// The database and the shared state directory (the servers share their
/// secrets: admin token, gossip key, database passwords).
struct Cluster {
    pg: Postgres,
    database: String,
    state: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let pg = Postgres::start_with(PgOptions {
            host: "127.0.25.10".into(),
            dir_prefix: "corral-pg-multi-".into(),
            // A crash of PostgreSQL must not lose committed work, as in
            // production (the testkit turns this off for speed).
            settings: vec![("synchronous_commit".into(), "on".into())],
            ..PgOptions::default()
        })
        .expect("postgres");
        let database = pg.create_database("corral").expect("database");
        Cluster {
            pg,
            database,
            state: tempfile::tempdir().expect("state dir"),
        }
    }

    async fn server(&self, address: &str, extra: &[&str]) -> Server {
        Server::start(self.state.path(), &self.database, address, extra).await
    }

    fn admin(&self) -> String {
        std::fs::read_to_string(self.state.path().join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string()
    }
}

/// Admin calls, to whichever server is given.
struct Admin {
    http: reqwest::Client,
    token: String,
}

impl Admin {
    async fn call(&self, method: reqwest::Method, url: String, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("admin request");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert!(status.is_success(), "{url}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn set_policy(&self, server: &str, web: u32, policy: &str) {
        self.call(
            reqwest::Method::PUT,
            format!("{server}/api/v1/topology"),
            Some(json!({"web": web, "db": 0, "lb_policy": policy, "replication": "async"})),
        )
        .await;
    }

    async fn last_seqs(&self, server: &str) -> BTreeMap<String, i64> {
        let nodes = self
            .call(reqwest::Method::GET, format!("{server}/api/v1/nodes"), None)
            .await;
        nodes
            .as_array()
            .expect("node list")
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().expect("name").to_string(),
                    n["last_seq"].as_i64().expect("last_seq"),
                )
            })
            .collect()
    }

    async fn enroll(&self, server: &str, node: &str) -> String {
        let secret = self
            .call(
                reqwest::Method::POST,
                format!("{server}/api/v1/nodes/{node}/enroll-secret"),
                None,
            )
            .await;
        let enrolled = self
            .call(
                reqwest::Method::POST,
                format!("{server}/api/v1/agents/enroll"),
                Some(json!({"node": node, "secret": secret["secret"]})),
            )
            .await;
        enrolled["token"].as_str().expect("token").to_string()
    }
}

/// Every seq each simulated agent was handed, in the order it got them.
type Received = Arc<Mutex<BTreeMap<String, Vec<i64>>>>;

/// A simulated agent: long polls `after=seq` on its servers in turn, moving
/// to the next on a connection failure or a 5xx, with a jittered backoff.
async fn agent(node: String, token: String, servers: Vec<String>, received: Received) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(40))
        .build()
        .expect("client");
    let mut after = 0i64;
    let mut at = 0usize;
    let mut failures = 0u32;
    loop {
        let url = format!(
            "{}/api/v1/agents/{node}/orders?after={after}&wait=30s",
            servers[at % servers.len()]
        );
        let answer = http.get(&url).bearer_auth(&token).send().await;
        let body = match answer {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            Ok(r) if r.status().is_server_error() => None,
            Ok(r) => panic!("{node}: {url}: {}", r.status()),
            Err(_) => None,
        };
        let Some(body) = body else {
            at += 1;
            failures += 1;
            let jitter = rand::random_range(0..100);
            tokio::time::sleep(Duration::from_millis(
                (50u64 << failures.min(4)).min(500) + jitter,
            ))
            .await;
            continue;
        };
        failures = 0;
        let mut got = Vec::new();
        for order in body["orders"].as_array().expect("orders") {
            let seq = order["seq"].as_i64().expect("seq");
            got.push(seq);
            after = after.max(seq);
        }
        if !got.is_empty() {
            received
                .lock()
                .expect("lock")
                .entry(node.clone())
                .or_default()
                .extend(got);
        }
    }
}

/// Waits until every agent has been handed every order up to its node's
/// last seq; says which have not when `within` passes.
async fn all_delivered(
    received: &Received,
    want: &BTreeMap<String, i64>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let missing: Vec<String> = {
            let got = received.lock().expect("lock");
            want.iter()
                .filter(|(node, last)| got.get(*node).and_then(|s| s.last()) != Some(last))
                .map(|(node, last)| {
                    format!(
                        "{node} (wants {last}, has {:?})",
                        got.get(node).and_then(|s| s.last())
                    )
                })
                .collect()
        };
        if missing.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not delivered within {within:?}: {}",
            missing.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each agent got 1, 2, ... its last seq: once each, in order, none skipped.
fn exactly_once(received: &Received, want: &BTreeMap<String, i64>) {
    let got = received.lock().expect("lock");
    for (node, last) in want {
        let seqs = got.get(node).cloned().unwrap_or_default();
        let expected: Vec<i64> = (1..=*last).collect();
        assert_eq!(seqs, expected, "{node}: seqs handed out");
    }
}

async fn parked(server: &Server) -> u64 {
    server
        .health()
        .await
        .and_then(|h| h["long_polls"].as_u64())
        .unwrap_or(0)
}

async fn wait_parked(server: &Server, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while parked(server).await < count {
        assert!(
            Instant::now() < deadline,
            "{} holds {} polls, not {count}",
            server.url,
            parked(server).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const AGENTS: u32 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_keep_every_order_once_when_their_server_is_killed() {
    let cluster = Cluster::new();
    let mut a = cluster.server("127.0.25.1", &[]).await;
    let b = cluster.server("127.0.25.2", &[]).await;
    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    admin.set_policy(&a.url, AGENTS, "round_robin").await;
    let nodes: Vec<String> = admin
        .last_seqs(&b.url)
        .await
        .into_keys()
        .filter(|n| n.starts_with("nginx"))
        .collect();
    assert_eq!(nodes.len(), AGENTS as usize, "web nodes: {nodes:?}");

    // Half the agents poll A first, half B; each falls back on the other.
    let received: Received = Arc::default();
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let enroll_on = if i % 2 == 0 { &a.url } else { &b.url };
        let token = admin.enroll(enroll_on, node).await;
        let servers = if i % 2 == 0 {
            vec![a.url.clone(), b.url.clone()]
        } else {
            vec![b.url.clone(), a.url.clone()]
        };
        tasks.push(tokio::spawn(agent(
            node.clone(),
            token,
            servers,
            received.clone(),
        )));
    }
    let agents = AbortOnDrop(tasks);
    let want = nodes_only(admin.last_seqs(&a.url).await, &nodes);
    all_delivered(&received, &want, Duration::from_secs(30)).await;
    wait_parked(&a, AGENTS as u64 / 2).await;
    wait_parked(&b, AGENTS as u64 / 2).await;

    // Orders filed on A wake the polls parked on B (which wait 30 s).
    let filing = Instant::now();
    admin.set_policy(&a.url, AGENTS, "least_conn").await;
    let want = nodes_only(admin.last_seqs(&a.url).await, &nodes);
    all_delivered(&received, &want, Duration::from_secs(5)).await;
    println!(
        "filed on A, delivered to all {AGENTS} agents (half polling B) {:?} after the PUT began",
        filing.elapsed()
    );
    exactly_once(&received, &want);

    // A dies; its agents move to B and keep their place.
    wait_parked(&b, AGENTS as u64 / 2).await;
    a.kill().await;
    wait_parked(&b, AGENTS as u64).await;
    let killed = Instant::now();
    for policy in ["uri_hash", "round_robin", "least_conn"] {
        admin.set_policy(&b.url, AGENTS, policy).await;
    }
    let want = nodes_only(admin.last_seqs(&b.url).await, &nodes);
    all_delivered(&received, &want, Duration::from_secs(10)).await;
    println!(
        "after A was killed, every agent had every order through B {:?} after the kill",
        killed.elapsed()
    );
    exactly_once(&received, &want);
    drop(agents);
    assert!(!b.log().contains("panicked"), "B's log:\n{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_death_moves_stale_node_detection_to_the_other_server() {
    let cluster = Cluster::new();
    let stale = ["--heartbeat-stale-after", "2s"];
    let mut a = cluster.server("127.0.25.1", &stale).await;
    let b = cluster.server("127.0.25.2", &stale).await;
    let is_leader = |h: Option<Value>| h.and_then(|h| h["leader"].as_bool()) == Some(true);
    // A started first with the database to itself: it leads, B does not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_leader(a.health().await) {
        assert!(Instant::now() < deadline, "A never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!is_leader(b.health().await), "two leaders at once");

    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    admin.set_policy(&b.url, 1, "round_robin").await;
    let token = admin.enroll(&b.url, "nginx1").await;
    let heartbeat =
        json!({"observed": {"agent_version": "0.0.0", "applied_seq": 0, "services": []}});
    let r = admin
        .http
        .post(format!("{}/api/v1/agents/nginx1/heartbeat", b.url))
        .bearer_auth(&token)
        .json(&heartbeat)
        .send()
        .await
        .expect("heartbeat");
    assert!(r.status().is_success(), "heartbeat: {}", r.status());

    a.kill().await;
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(5);
    while !is_leader(b.health().await) {
        assert!(
            Instant::now() < deadline,
            "B did not take the lead within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("B leads {:?} after A was killed", killed.elapsed());

    // The CLI given both servers, A first, answers through B.
    let out = Command::new(CORRAL)
        .args(["--server", &a.url, "--server", &b.url, "--output", "json"])
        .args(["--token", &cluster.admin(), "nodes", "list"])
        .arg("--state-dir")
        .arg(cluster.state.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("corral nodes list");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("nginx1"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // nginx1 stops heartbeating: B, now leading, notes it stale, once.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stale_events = loop {
        let events = admin
            .call(
                reqwest::Method::GET,
                format!("{}/api/v1/events?limit=1000", b.url),
                None,
            )
            .await;
        let stale: Vec<Value> = events
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == "node.stale" && e["subject"] == "nginx1")
            .cloned()
            .collect();
        if !stale.is_empty() {
            break stale;
        }
        assert!(
            Instant::now() < deadline,
            "no node.stale for nginx1 from B; B's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stale_events.len(), 1, "{stale_events:?}");
}

/// Stand-in agents for the local provider: each start is a line in
/// `starts`, the process writes its pid file only after `SLOW_START`
/// (a real agent under load can be that slow), then lives a while. Killed
/// when dropped, whatever the test did.
struct FakeAgents {
    dir: tempfile::TempDir,
}

const SLOW_START: &str = "4";

impl FakeAgents {
    fn new() -> FakeAgents {
        let dir = tempfile::tempdir().expect("agents dir");
        // Named corral-agent: the provider knows its agents by that name.
        let bin = dir.path().join("corral-agent");
        let script = format!(
            "#!/bin/sh\n\
             node=''; state=''\n\
             while [ $# -gt 0 ]; do\n\
               case \"$1\" in --node) node=$2; shift ;; --state-dir) state=$2; shift ;; esac\n\
               shift\n\
             done\n\
             echo \"$node $$\" >> \"$(dirname \"$0\")/starts\"\n\
             sleep {SLOW_START}\n\
             mkdir -p \"$state/run\" && echo $$ > \"$state/run/agent.pid\"\n\
             sleep 120 & wait\n"
        );
        std::fs::write(&bin, script).expect("fake agent");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        FakeAgents { dir }
    }

    fn bin(&self) -> String {
        self.dir.path().join("corral-agent").display().to_string()
    }

    /// The pids started for `node`.
    fn starts(&self, node: &str) -> Vec<u32> {
        std::fs::read_to_string(self.dir.path().join("starts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(n, _)| *n == node)
            .filter_map(|(_, pid)| pid.parse().ok())
            .collect()
    }
}

impl Drop for FakeAgents {
    fn drop(&mut self) {
        let all = std::fs::read_to_string(self.dir.path().join("starts")).unwrap_or_default();
        for pid in all
            .lines()
            .filter_map(|l| l.split_once(' ')?.1.parse::<i32>().ok())
        {
            // The shell and its sleep: the whole process group (a session
            // of its own, as the provider starts agents).
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The leader dies just after starting a new node's agent, before the agent
/// has said it runs: the server that takes over must not start a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_added_as_the_leader_dies_gets_one_agent_not_two() {
    let cluster = Cluster::new();
    let agents = FakeAgents::new();
    let extra = ["--agent-bin", &agents.bin()];
    let mut a = Server::start_with(
        cluster.state.path(),
        &cluster.database,
        "127.0.25.1",
        &extra,
        true,
    )
    .await;
    let b = Server::start_with(
        cluster.state.path(),
        &cluster.database,
        "127.0.25.2",
        &extra,
        true,
    )
    .await;
    let is_leader = |h: Option<Value>| h.and_then(|h| h["leader"].as_bool()) == Some(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_leader(a.health().await) {
        assert!(Instant::now() < deadline, "A never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    admin
        .call(
            reqwest::Method::POST,
            format!("{}/api/v1/nodes", a.url),
            Some(json!({"role": "web"})),
        )
        .await;
    // A starts nginx1's agent; A dies at once, the agent still starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agents.starts("nginx1").is_empty() {
        assert!(
            Instant::now() < deadline,
            "A never started nginx1's agent; A's log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_leader(b.health().await) {
        assert!(
            Instant::now() < deadline,
            "B did not take the lead; B's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B makes the next node's machine: by then its controller has been
    // over nginx1 too, within the agent's slow start.
    admin
        .call(
            reqwest::Method::POST,
            format!("{}/api/v1/nodes", b.url),
            Some(json!({"role": "web"})),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agents.starts("nginx2").is_empty() {
        assert!(
            Instant::now() < deadline,
            "B never started nginx2's agent; B's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agents.starts("nginx1").len(),
        1,
        "nginx1's agent was started more than once; B's log:\n{}",
        b.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wake_ups_survive_a_postgres_crash_and_cut_listening_sessions() {
    let mut cluster = Cluster::new();
    let a = cluster.server("127.0.25.1", &[]).await;
    let b = cluster.server("127.0.25.2", &[]).await;
    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    admin.set_policy(&a.url, 1, "round_robin").await;
    let token = admin.enroll(&a.url, "nginx1").await;
    let received: Received = Arc::default();
    let _agent = AbortOnDrop(vec![tokio::spawn(agent(
        "nginx1".into(),
        token,
        vec![b.url.clone()],
        received.clone(),
    ))]);
    let want = nodes_only(admin.last_seqs(&a.url).await, &["nginx1".into()]);
    all_delivered(&received, &want, Duration::from_secs(10)).await;
    wait_parked(&b, 1).await;

    // PostgreSQL crashes and comes back: both servers answer again, one
    // leads, and an order filed on A still wakes the poll parked on B.
    cluster.pg.kill();
    // Its backends outlive the postmaster for a moment, holding the shared
    // memory a new postmaster refuses to share: start again until it can.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = cluster.pg.restart() {
        assert!(
            Instant::now() < deadline,
            "postgres does not start again: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = Instant::now();
    a.wait_healthy().await;
    b.wait_healthy().await;
    println!(
        "both servers healthy {:?} after PostgreSQL restarted",
        back.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut leaders = 0;
        for s in [&a, &b] {
            if s.health().await.and_then(|h| h["leader"].as_bool()) == Some(true) {
                leaders += 1;
            }
        }
        if leaders == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{leaders} leaders 10 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_parked(&b, 1).await;
    admin.set_policy(&a.url, 1, "least_conn").await;
    let want = nodes_only(admin.last_seqs(&a.url).await, &["nginx1".into()]);
    all_delivered(&received, &want, Duration::from_secs(5)).await;

    // Every listening session cut and kept from coming back while an order
    // is filed on A (its pool's open connections still work): B hears
    // nothing of it, and finds it by reading again once it listens again.
    // A's pool reopened connections lazily after the crash; requests side
    // by side leave it enough open ones for filing the order once new
    // connections are refused (else it answered 503 now and then).
    futures_util::future::join_all((0..8).map(|_| admin.last_seqs(&a.url))).await;
    cluster
        .pg
        .psql(
            "postgres",
            "ALTER DATABASE corral ALLOW_CONNECTIONS false; \
             SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .expect("cut the listeners");
    admin.set_policy(&a.url, 1, "uri_hash").await;
    let want = nodes_only(admin.last_seqs(&a.url).await, &["nginx1".into()]);
    cluster
        .pg
        .psql("postgres", "ALTER DATABASE corral ALLOW_CONNECTIONS true")
        .expect("let them back");
    all_delivered(&received, &want, Duration::from_secs(5)).await;
    exactly_once(&received, &want);
}

#[tokio::test]
async fn a_change_on_one_server_is_planned_against_the_other_servers_changes() {
    let cluster = Cluster::new();
    let a = cluster.server("127.0.25.1", &[]).await;
    let b = cluster.server("127.0.25.2", &[]).await;
    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    let seq = |seqs: BTreeMap<String, i64>| seqs["nginx1"];
    admin.set_policy(&a.url, 1, "round_robin").await;
    admin.set_policy(&b.url, 1, "least_conn").await;
    let after_b = seq(admin.last_seqs(&a.url).await);
    // A goes back; B's own last change was least_conn, but nginx1's last
    // order now says round_robin: asking B for least_conn files again.
    admin.set_policy(&a.url, 1, "round_robin").await;
    admin.set_policy(&b.url, 1, "least_conn").await;
    assert_eq!(
        seq(admin.last_seqs(&b.url).await),
        after_b + 2,
        "B planned against its own stale picture of the last orders"
    );
}

#[tokio::test]
async fn a_server_refuses_a_database_migrated_by_a_newer_one() {
    let cluster = Cluster::new();
    let mut a = cluster.server("127.0.25.3", &[]).await;
    a.kill().await;
    cluster
        .pg
        .psql(
            "corral",
            "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m20990101_000001_future', 0)",
        )
        .expect("a newer migration");
    let stderr = refused(&cluster, cluster.state.path()).await;
    assert!(
        stderr.contains("m20990101_000001_future")
            && stderr.contains("newer than this server's m20"),
        "the refusal names both versions: {stderr}"
    );
}

#[tokio::test]
async fn a_server_with_other_secrets_refuses_the_clusters_database() {
    let cluster = Cluster::new();
    let mut a = cluster.server("127.0.25.3", &[]).await;
    a.kill().await;
    let elsewhere = tempfile::tempdir().expect("another state dir");
    let stderr = refused(&cluster, elsewhere.path()).await;
    assert!(
        stderr.contains("gossip key differs") && stderr.contains("copy admin-token"),
        "the refusal says what to do: {stderr}"
    );
}

#[tokio::test]
async fn peers_are_refused_without_a_shared_database() {
    let state = tempfile::tempdir().expect("state dir");
    let out = Command::new(CORRAL)
        .args(["serve", "--no-machines", "--listen", "127.0.25.4:0"])
        .args(["--peer", "http://127.0.25.5:7000"])
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("DATABASE_URL")
        .kill_on_drop(true)
        .output()
        .await
        .expect("serve runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {stderr}");
    assert!(
        stderr.contains("--peer needs a PostgreSQL --database-url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_named_at_start() {
    let state = tempfile::tempdir().expect("state dir");
    let port = corral_testkit::free_port("127.0.25.9").expect("port");
    let out = Command::new(CORRAL)
        .args(["serve", "--no-machines", "--listen", "127.0.25.4:0"])
        .args([
            "--database-url",
            &format!("postgres://corral@127.0.25.9:{port}/corral"),
        ])
        .arg("--state-dir")
        .arg(state.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("serve gives up in time")
        .expect("serve runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {stderr}");
    let said = format!("cannot reach PostgreSQL at 127.0.25.9:{port} (database corral)");
    assert!(stderr.contains(&said), "{stderr}");
    assert_eq!(stderr.matches(&said).count(), 1, "said once: {stderr}");
}

/// Runs `corral serve` on the cluster's database with `state`, expecting it
/// to refuse to start; returns what it said.
async fn refused(cluster: &Cluster, state: &Path) -> String {
    let port = corral_testkit::free_port("127.0.25.3").expect("port");
    let out = Command::new(CORRAL)
        .args([
            "serve",
            "--no-machines",
            "--listen",
            &format!("127.0.25.3:{port}"),
        ])
        .args(["--network", "127.0.26.0/24"])
        .args(["--database-url", &cluster.database])
        .arg("--state-dir")
        .arg(state)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("serve exits")
        .expect("serve runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "serve started: {stderr}");
    stderr
}

fn nodes_only(all: BTreeMap<String, i64>, nodes: &[String]) -> BTreeMap<String, i64> {
    all.into_iter().filter(|(n, _)| nodes.contains(n)).collect()
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_shipped_to_one_server_are_read_and_followed_on_the_other() {
    let cluster = Cluster::new();
    let a = cluster.server("127.0.25.1", &[]).await;
    let mut b = cluster.server("127.0.25.2", &[]).await;
    let admin = Admin {
        http: reqwest::Client::new(),
        token: cluster.admin(),
    };
    admin.set_policy(&a.url, 1, "round_robin").await;
    let token = admin.enroll(&a.url, "nginx1").await;
    let ship = |lines: &[&str]| {
        admin
            .http
            .post(format!("{}/api/v1/agents/nginx1/logs", a.url))
            .bearer_auth(&token)
            .json(&json!({"service": "nginx", "lines": lines}))
            .send()
    };
    let shipped = ship(&["one", "two"]).await.expect("ship");
    assert_eq!(shipped.status(), 204);
    let texts = |lines: &Value| -> Vec<String> {
        lines
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| l["line"].as_str().expect("line").to_string())
            .collect()
    };
    let logs = |server: &str| format!("{server}/api/v1/nodes/nginx1/logs");
    let read = admin.call(reqwest::Method::GET, logs(&b.url), None).await;
    assert_eq!(texts(&read), ["one", "two"], "B serves what A was sent");
    let last = read[1]["seq"].as_u64().expect("seq");
    // The same seqs through either server: a follower may move.
    let on_a = admin.call(reqwest::Method::GET, logs(&a.url), None).await;
    assert_eq!(on_a, read);

    // A follower parked on B is woken by a line shipped to A.
    let follow = admin.call(
        reqwest::Method::GET,
        format!("{}?after={last}&wait=30s", logs(&b.url)),
        None,
    );
    let follower = async {
        let started = Instant::now();
        let lines = follow.await;
        (lines, started.elapsed())
    };
    let shipper = async {
        // Shipped after the follower has (almost surely) parked, so it is
        // woken rather than finding the line at its first look; were it
        // not parked yet, the test would pass without proving the wake-up,
        // never fail wrongly. Without the notification it fails (checked).
        tokio::time::sleep(Duration::from_millis(500)).await;
        ship(&["three"]).await.expect("ship").status()
    };
    let ((lines, took), status) = tokio::join!(follower, shipper);
    assert_eq!(status, 204);
    assert_eq!(texts(&lines), ["three"]);
    assert!(
        took < Duration::from_secs(10),
        "the follower waited {took:?}: not woken by the line"
    );

    // The lines outlive the server that served them.
    b.kill().await;
    let b = cluster.server("127.0.25.2", &[]).await;
    let read = admin.call(reqwest::Method::GET, logs(&b.url), None).await;
    assert_eq!(texts(&read), ["one", "two", "three"]);
}
