//! End to end: the real control plane in-process on a test-private /24, and
//! real `corral-agent` processes for adm1, pg1 and nginx1 running real
//! consul, PostgreSQL 15, todomvc and nginx. Every process is stopped by a
//! guard (`corral-agent stop-all`) even when the test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_server::startup::{Application, Config};
use serde_json::{Value, json};

/// The agent under test; `CORRAL_TEST_AGENT_BIN` runs another build of it
/// (e.g. target/release/corral-agent, to measure its footprint).
fn agent() -> String {
    std::env::var("CORRAL_TEST_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_corral-agent").to_string())
}

/// The todomvc binary the workspace builds, next to the test's target dir.
fn todomvc_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/debug/deps/cluster-xxxx -> target/debug/todomvc
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("todomvc"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

struct Agent {
    node: String,
    address: String,
    state: PathBuf,
    child: Option<Child>,
}

/// Stops every agent and its services, whatever happened.
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    admin: String,
    agents: Vec<Agent>,
    http: reqwest::Client,
    server: actix_web::dev::ServerHandle,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new(agent())
                .args(["stop-all", "--state-dir"])
                .arg(&a.state)
                .status();
        }
        // CORRAL_TEST_DUMP_LOGS=1 shows them on success too.
        if std::thread::panicking() || std::env::var_os("CORRAL_TEST_DUMP_LOGS").is_some() {
            self.dump_logs();
        }
    }
}

/// The control plane on `listen`, its state in `state`.
async fn serve(state: &Path, net: &str, listen: &str) -> (String, actix_web::dev::ServerHandle) {
    let mut config = Config::new(state);
    config.listen = listen.into();
    config.network = format!("{net}.0/24").parse().expect("network");
    config.workers = Some(1);
    let app = Application::build(config).await.expect("server starts");
    let url = app.url();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    (url, handle)
}

impl Cluster {
    async fn start(net: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        // PostgreSQL runs as `postgres`: it must be able to reach its data.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let state = dir.path().join("server");
        let (url, handle) = serve(&state, net, &format!("{net}.5:0")).await;
        let admin = std::fs::read_to_string(state.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        Self {
            url,
            admin,
            agents: Vec::new(),
            http: reqwest::Client::new(),
            server: handle,
            dir,
        }
    }

    fn node_state(&self, node: &str) -> PathBuf {
        self.dir.path().join("nodes").join(node)
    }

    /// Mints the node's enrollment secret through the admin API, as a
    /// provider does when it makes a machine, into a file of its own.
    async fn enroll_secret_file(&self, node: &str) -> PathBuf {
        let res = self
            .http
            .post(format!("{}/api/v1/nodes/{node}/enroll-secret", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("mint");
        assert_eq!(res.status(), 201, "minting {node}'s secret");
        let body: serde_json::Value = res.json().await.expect("json");
        let file = self.dir.path().join(format!("{node}.enroll-secret"));
        std::fs::write(&file, body["secret"].as_str().expect("secret")).expect("write secret");
        file
    }

    async fn spawn_agent(&mut self, node: &str, address: &str) {
        let secret = self.enroll_secret_file(node).await;
        let state = self.node_state(node);
        std::fs::create_dir_all(&state).expect("node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{node}.log")))
            .expect("agent log");
        let child = Command::new(agent())
            .args([
                "run",
                "--server",
                &self.url,
                "--node",
                node,
                "--address",
                address,
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--enroll-secret-file")
            .arg(&secret)
            .arg("--todomvc-bin")
            .arg(todomvc_bin())
            .args(["--heartbeat-interval", "1s"])
            .args(["--metrics-interval", "1s"])
            .env("RUST_LOG", "info,corral_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("agent starts");
        match self.agents.iter_mut().find(|a| a.node == node) {
            Some(a) => a.child = Some(child),
            None => self.agents.push(Agent {
                node: node.into(),
                address: address.into(),
                state,
                child: Some(child),
            }),
        }
    }

    fn dump_logs(&self) {
        let mut files = vec![];
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            files.push(entry.path());
        }
        for a in &self.agents {
            for entry in std::fs::read_dir(a.state.join("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                files.push(entry.path());
            }
        }
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("===== {} (last 40 lines)", f.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.expect("json")
    }

    async fn orders(&self, node: &str) -> Vec<Value> {
        self.admin(
            reqwest::Method::GET,
            &format!("/api/v1/nodes/{node}/orders"),
            None,
        )
        .await
        .as_array()
        .expect("array")
        .clone()
    }
}

async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Processes whose command line contains `needle` (not counting threads).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if line.contains(needle) && !line.contains("corral-agent") {
                out.push(pid);
            }
        }
    }
    out
}

fn pid_of(state: &Path, service: &str) -> Option<u32> {
    std::fs::read_to_string(state.join("run").join(format!("{service}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The node's Consul ACL token, from the Consul order its agent applied.
fn consul_token(state: &Path) -> String {
    let order: Value = serde_json::from_slice(
        &std::fs::read(state.join("orders/consul.json")).expect("the node's consul order"),
    )
    .expect("json");
    order["acl"]["token"]
        .as_str()
        .expect("the node's token")
        .to_string()
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `RssAnon`, ...), in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todos_flow_through_nginx_and_a_killed_agent_adopts_its_services() {
    let net = "127.0.41";
    let mut cluster = Cluster::start(net).await;
    cluster
        .admin(
            reqwest::Method::PUT,
            "/api/v1/topology",
            Some(json!({"web": 1, "db": 1, "lb_policy": "round_robin", "replication": "async"})),
        )
        .await;
    for (node, host) in [("adm1", 5), ("pg1", 11), ("nginx1", 21)] {
        cluster.spawn_agent(node, &format!("{net}.{host}")).await;
    }

    // A todo written through nginx1:80 comes back through it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let lb = format!("http://{net}.21:80");
    let deadline = Instant::now() + Duration::from_secs(150);
    let created: Value = loop {
        if let Ok(res) = http
            .post(format!("{lb}/todos"))
            .json(&json!({"title": "ship the agent"}))
            .send()
            .await
            && res.status() == 201
        {
            break res.json().await.expect("todo json");
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a POST /todos through nginx1 to succeed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let list: Value = http
        .get(format!("{lb}/todos"))
        .send()
        .await
        .expect("GET /todos")
        .json()
        .await
        .expect("json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|t| t["title"] == "ship the agent" && t["url"] == created["url"]),
        "{list}"
    );

    // Every order of every node was applied, once.
    for node in ["adm1", "pg1", "nginx1"] {
        let orders = cluster.orders(node).await;
        assert!(!orders.is_empty());
        for o in &orders {
            assert_eq!(o["status"], "applied", "{node}: {o}");
        }
    }

    // Heartbeats carry every service, its version and Consul check, and
    // the replication picture.
    eventually(
        "nginx1 heartbeat with its three services",
        Duration::from_secs(20),
        || async {
            let node = cluster
                .admin(reqwest::Method::GET, "/api/v1/nodes/nginx1", None)
                .await;
            let services = node["observed"]["services"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            services.len() == 3
                && services
                    .iter()
                    .all(|s| s["state"] == "running" && s["version"].is_string())
                && node["observed"]["metrics"]["agent_rss_bytes"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
                && services.iter().any(|s| {
                    s["name"] == "todomvc"
                        && s["detail"].as_str().is_some_and(|d| d.contains("passing"))
                })
        },
    )
    .await;
    let pg1_node = cluster
        .admin(reqwest::Method::GET, "/api/v1/nodes/pg1", None)
        .await;
    eprintln!("pg1 observed: {}", pg1_node["observed"]);
    assert_eq!(pg1_node["observed"]["replication"]["role"], "primary");

    // Real samples arrive: host figures and the node's own processes from
    // /proc, nginx's requests from stub_status, the webapp's from its
    // /metrics, PostgreSQL's counters. Requests keep flowing meanwhile, so
    // the rates have something to count.
    let newest = |series: &Value, node: &str| -> Option<f64> {
        series["series"]
            .as_array()?
            .iter()
            .find(|s| s["node"] == node)?["points"]
            .as_array()?
            .iter()
            .map(|p| p["value"].as_f64().unwrap_or(-1.0))
            .fold(None, |max: Option<f64>, v| {
                Some(max.map_or(v, |m| m.max(v)))
            })
    };
    let wanted = [
        ("nginx1", "cpu.host", 0.0),
        ("nginx1", "mem.used", 1.0),
        ("nginx1", "mem.node_rss", 1.0),
        ("nginx1", "disk.used_pct", 0.0),
        ("nginx1", "net.rx", 0.0),
        ("nginx1", "nginx.requests", 0.5),
        ("nginx1", "nginx.5xx", 0.0),
        ("nginx1", "webapp.requests", 0.5),
        ("nginx1", "webapp.latency_ms", 0.0),
        ("nginx1", "webapp.latency_p95_ms", 0.0),
        ("pg1", "cpu.node", 0.0),
        ("pg1", "pg.commits", 0.0),
        ("pg1", "pg.connections", 1.0),
        ("pg1", "pg.lag_bytes", 0.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing = Vec::new();
    while Instant::now() < deadline {
        let _ = http.get(format!("{lb}/todos")).send().await;
        missing.clear();
        for (node, name, at_least) in wanted {
            let series = cluster
                .admin(
                    reqwest::Method::GET,
                    &format!("/api/v1/metrics?node={node}&name={name}"),
                    None,
                )
                .await;
            if newest(&series, node).is_none_or(|v| v < at_least) {
                missing.push(format!("{node} {name} >= {at_least}: {series}"));
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        missing.is_empty(),
        "metrics never arrived:\n{}",
        missing.join("\n")
    );
    // The webapp's figures are for its agent, not for the public side.
    let direct = http
        .get(format!("http://{net}.21:8080/metrics"))
        .send()
        .await
        .expect("webapp /metrics");
    assert_eq!(direct.status(), 200);
    let public = http
        .get(format!("{lb}/metrics"))
        .send()
        .await
        .expect("lb /metrics");
    assert_eq!(public.status(), 404);

    // The agents' footprint (VmRSS), as the lead wants it reported.
    let nginx1 = cluster.node_state("nginx1");
    for a in &cluster.agents {
        let pid = a.child.as_ref().expect("child").id();
        let rss = status_kb(pid, "VmRSS").expect("agent rss");
        let anon = status_kb(pid, "RssAnon").expect("agent anonymous rss");
        eprintln!(
            "agent RSS ({}): {rss} kB, of which {anon} kB its own memory (the rest mapped code and libraries)",
            a.node
        );
        // What the agent allocates (heap, stacks) is its anonymous memory,
        // 1.6-1.8 MiB here. The rest of its RSS is file-backed: the
        // binary's code pages, 14.4-14.6 MiB for this test's debug build
        // (which grows with every feature and says nothing of the
        // shipped agent), about 6 MiB for the release build.
        assert!(anon < 6 * 1024, "{} agent allocates {anon} kB", a.node);
        // The design's footprint target is for the shipped (release)
        // binary: CORRAL_TEST_AGENT_BIN=target/release/corral-agent
        // measured 7.8-8.1 MiB in all.
        if agent().contains("/release/") {
            assert!(rss < 15 * 1024, "{} agent uses {rss} kB", a.node);
        }
    }

    // Consul denies by default. Without a token, or with the webapps'
    // read-only one (taken from the running webapp's environment), nobody
    // registers a service or takes the database's leader key; a web node's
    // own token may not touch the leader key either.
    let consul = format!("http://{net}.21:{}", corral_proto::ports::CONSUL_HTTP);
    let webapp_pid = pid_of(&nginx1, "todomvc").expect("todomvc pid");
    let webapp_token = std::fs::read(format!("/proc/{webapp_pid}/environ"))
        .expect("webapp environment")
        .split(|b| *b == 0)
        .find_map(|kv| {
            kv.strip_prefix(b"CONSUL_HTTP_TOKEN=")
                .map(|t| String::from_utf8_lossy(t).to_string())
        })
        .expect("the webapp runs with a consul token");
    let nginx1_token = consul_token(&nginx1);
    let management =
        std::fs::read_to_string(cluster.dir.path().join("server/consul-management-token"))
            .expect("management token")
            .trim()
            .to_string();
    let fake = json!({"ID": "fake-pg", "Name": "postgres", "Tags": ["primary"], "Address": "127.0.41.99", "Port": 5432});
    for (who, token) in [
        ("no token", None),
        ("the webapp's token", Some(&webapp_token)),
    ] {
        let mut req = http
            .put(format!("{consul}/v1/agent/service/register"))
            .json(&fake);
        if let Some(t) = token {
            req = req.header("X-Consul-Token", t.as_str());
        }
        let res = req.send().await.expect("consul register");
        assert_eq!(
            res.status(),
            reqwest::StatusCode::FORBIDDEN,
            "a fake primary registered with {who}"
        );
    }
    for (who, token) in [
        ("no token", None),
        ("the webapp's token", Some(&webapp_token)),
        ("nginx1's token", Some(&nginx1_token)),
    ] {
        let mut req = http
            .put(format!(
                "{consul}/v1/kv/{}",
                corral_server::reconcile::LEADER_KEY
            ))
            .body("nginx1");
        if let Some(t) = token {
            req = req.header("X-Consul-Token", t.as_str());
        }
        let res = req.send().await.expect("consul kv put");
        assert_eq!(
            res.status(),
            reqwest::StatusCode::FORBIDDEN,
            "the leader key written with {who}"
        );
    }
    // The webapp's token reads what it needs: the primary.
    let primaries: Value = http
        .get(format!(
            "{consul}/v1/health/service/postgres?passing=1&tag=primary"
        ))
        .header("X-Consul-Token", webapp_token.as_str())
        .send()
        .await
        .expect("consul health")
        .json()
        .await
        .expect("json");
    assert_eq!(primaries.as_array().map(Vec::len), Some(1), "{primaries}");

    // Whoever holds a token that may register an instance of the webapp
    // (here the operator's management token) still cannot reach nginx.conf
    // with an address that carries nginx directives; a well-formed one
    // registered after it does, which shows the watcher saw both.
    let nginx_conf = nginx1.join("nginx/conf/nginx.conf");
    for (id, address) in [
        (
            "forged",
            // Valid nginx once rendered: a server of the attacker's.
            "127.0.0.1:9; } server { listen 127.0.41.21:4444; location / { return 200 pwned; } } upstream x { server 127.0.0.1",
        ),
        ("extra", "127.0.41.99"),
    ] {
        let res = http
            .put(format!("{consul}/v1/agent/service/register"))
            .header("X-Consul-Token", management.as_str())
            .json(&json!({"ID": id, "Name": corral_proto::WEBAPP_SERVICE, "Address": address, "Port": 8080}))
            .send()
            .await
            .expect("consul register");
        assert!(
            res.status().is_success(),
            "consul refused {id}: {}",
            res.status()
        );
    }
    eventually(
        "the well-formed extra instance in nginx.conf",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&nginx_conf).is_ok_and(|c| c.contains("127.0.41.99:8080"))
        },
    )
    .await;
    let conf = std::fs::read_to_string(&nginx_conf).expect("nginx.conf");
    assert!(
        !conf.contains("pwned") && !conf.contains("4444"),
        "a forged upstream reached nginx.conf:\n{conf}"
    );
    for id in ["forged", "extra"] {
        http.put(format!("{consul}/v1/agent/service/deregister/{id}"))
            .header("X-Consul-Token", management.as_str())
            .send()
            .await
            .expect("consul deregister");
    }
    eventually(
        "the extra instance gone from nginx.conf",
        Duration::from_secs(30),
        || async { std::fs::read_to_string(&nginx_conf).is_ok_and(|c| !c.contains("127.0.41.99")) },
    )
    .await;

    // kill -9 the nginx1 agent; the new one adopts instead of duplicating.
    let nginx_pid = pid_of(&nginx1, "nginx").expect("nginx pid");
    let todomvc_pid = pid_of(&nginx1, "todomvc").expect("todomvc pid");
    let consul_pid = pid_of(&nginx1, "consul").expect("consul pid");
    let applied_before = cluster.orders("nginx1").await.len();
    {
        let agent = cluster
            .agents
            .iter_mut()
            .find(|a| a.node == "nginx1")
            .expect("agent");
        let mut child = agent.child.take().expect("child");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }
    // A token the server no longer knows: the agent must enroll again.
    std::fs::write(nginx1.join("node-token"), "stale-token").expect("token");
    cluster.spawn_agent("nginx1", &format!("{net}.21")).await;
    let url = cluster.url.clone();
    let admin = cluster.admin.clone();
    // The restarted agent reports again (a fresh heartbeat after restart).
    let since = chrono_now_secs();
    eventually(
        "the restarted agent's heartbeat",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            let url = url.clone();
            let admin = admin.clone();
            async move {
                let Ok(res) = http
                    .get(format!("{url}/api/v1/nodes/nginx1"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                else {
                    return false;
                };
                let node: Value = res.json().await.unwrap_or_default();
                node["last_heartbeat"]
                    .as_str()
                    .and_then(parse_rfc3339_secs)
                    .is_some_and(|t| t > since)
            }
        },
    )
    .await;
    assert_eq!(
        pid_of(&nginx1, "nginx"),
        Some(nginx_pid),
        "nginx was restarted"
    );
    assert_eq!(
        pid_of(&nginx1, "todomvc"),
        Some(todomvc_pid),
        "todomvc was restarted"
    );
    assert_eq!(
        pid_of(&nginx1, "consul"),
        Some(consul_pid),
        "consul was restarted"
    );
    let prefix = format!("{}/", nginx1.join("nginx").display());
    let masters: Vec<u32> = processes_with(&prefix)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("master"))
        })
        .collect();
    assert_eq!(masters, vec![nginx_pid], "one nginx master");
    assert_eq!(
        processes_with(&format!("--listen {net}.21:8080")).len(),
        1,
        "one todomvc"
    );
    assert_eq!(cluster.orders("nginx1").await.len(), applied_before);
    let token = std::fs::read_to_string(nginx1.join("node-token")).expect("token");
    assert_ne!(
        token.trim(),
        "stale-token",
        "the agent enrolled again after a 401"
    );
    // Still serving.
    let res = http.get(format!("{lb}/todos")).send().await.expect("GET");
    assert_eq!(res.status(), 200);

    // SIGTERM ends an agent, never its services.
    let pg1 = cluster.node_state("pg1");
    let postgres_pid = pid_of(&pg1, "postgres").expect("postgres pid");
    {
        let agent = cluster
            .agents
            .iter_mut()
            .find(|a| a.node == "pg1")
            .expect("pg1");
        let child = agent.child.as_mut().expect("child");
        let status = Command::new("kill")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = child.wait().expect("agent exits");
        assert!(exit.success(), "agent exit on SIGTERM: {exit}");
        agent.child = None;
    }
    assert_eq!(pid_of(&pg1, "postgres"), Some(postgres_pid));
    assert!(std::fs::metadata(format!("/proc/{postgres_pid}")).is_ok());
    cluster.spawn_agent("pg1", &format!("{net}.11")).await;

    // With the control plane down the data plane keeps serving; agents
    // come back to it on their own.
    cluster.server.stop(true).await;
    let res = http.get(format!("{lb}/todos")).send().await.expect("GET");
    assert_eq!(res.status(), 200, "serving without the control plane");
    let listen = cluster.url.trim_start_matches("http://").to_string();
    let (_, handle) = serve(&cluster.dir.path().join("server"), net, &listen).await;
    cluster.server = handle;
    let since = chrono_now_secs();
    eventually(
        "heartbeats after the control plane returns",
        Duration::from_secs(60),
        || {
            let http = http.clone();
            let url = url.clone();
            let admin = admin.clone();
            async move {
                let mut fresh = 0;
                for node in ["adm1", "pg1", "nginx1"] {
                    let Ok(res) = http
                        .get(format!("{url}/api/v1/nodes/{node}"))
                        .bearer_auth(&admin)
                        .send()
                        .await
                    else {
                        return false;
                    };
                    let node: Value = res.json().await.unwrap_or_default();
                    if node["last_heartbeat"]
                        .as_str()
                        .and_then(parse_rfc3339_secs)
                        .is_some_and(|t| t > since)
                    {
                        fresh += 1;
                    }
                }
                fresh == 3
            }
        },
    )
    .await;
    assert_eq!(
        pid_of(&pg1, "postgres"),
        Some(postgres_pid),
        "postgres adopted"
    );

    // A second agent for a node refuses to run beside the first.
    let out = Command::new(agent())
        .args(["run", "--server", &url, "--node", "pg1", "--address"])
        .arg(format!("{net}.11"))
        .arg("--state-dir")
        .arg(&pg1)
        .args(["--enroll-secret", "x"])
        .output()
        .expect("second agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already runs"));

    // stop-all takes everything down and is idempotent.
    for a in &mut cluster.agents {
        let status = Command::new(agent())
            .args(["stop-all", "--state-dir"])
            .arg(&a.state)
            .status()
            .expect("stop-all");
        assert!(status.success());
        if let Some(mut c) = a.child.take() {
            let _ = c.wait();
        }
    }
    for a in &cluster.agents {
        for service in ["consul", "nginx", "todomvc", "postgres"] {
            assert_eq!(pid_of(&a.state, service), None, "{} {service}", a.node);
        }
        let status = Command::new(agent())
            .args(["stop-all", "--state-dir"])
            .arg(&a.state)
            .status()
            .expect("stop-all again");
        assert!(status.success());
        let _ = &a.address;
    }
    assert!(processes_with(&cluster.dir.path().display().to_string()).is_empty());
    // Nothing of nginx outlives its master (a worker would hold port 80).
    assert!(
        !corral_agent::supervisor::group_alive(nginx_pid),
        "nginx workers left"
    );
}

fn chrono_now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn parse_rfc3339_secs(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

/// psql as the superuser over a node's private socket, in the app's
/// database.
fn psql(state: &Path, sql: &str) -> Option<String> {
    psql_in(state, "todomvc", sql)
}

fn psql_in(state: &Path, database: &str, sql: &str) -> Option<String> {
    let out = Command::new("/usr/lib/postgresql/15/bin/psql")
        .args([
            "-X", "-A", "-t", "-q", "-U", "postgres", "-d", database, "-h",
        ])
        .arg(state.join("pgsock"))
        .args(["-c", sql])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Scans every process's command line for a secret, as fast as it can, on
/// a thread of its own until stopped.
struct CmdlineWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl CmdlineWatch {
    fn start(secrets: Vec<String>) -> Self {
        for secret in &secrets {
            assert!(secret.len() >= 16, "a real secret to look for");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut scans, mut seen) = (0u64, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    let line = String::from_utf8_lossy(&raw).replace('\0', " ");
                    for secret in &secrets {
                        if line.contains(secret.as_str()) && seen.len() < 10 {
                            seen.push(line.replace(secret.as_str(), "<a password>"));
                        }
                    }
                }
                scans += 1;
            }
            (scans, seen)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// How many full scans ran, and the command lines that held the secret.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().expect("thread").join().expect("watcher")
    }
}

impl Drop for CmdlineWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_db_node_streams_from_the_primary_and_drains_cleanly() {
    let net = "127.0.42";
    let mut cluster = Cluster::start(net).await;
    cluster
        .admin(
            reqwest::Method::PUT,
            "/api/v1/topology",
            Some(json!({"web": 1, "db": 2, "lb_policy": "uri_hash", "replication": "sync"})),
        )
        .await;
    // The database passwords must never be on a command line, where every
    // local user sees them: watch them all while db orders apply.
    let secret = |name: &str| {
        std::fs::read_to_string(cluster.dir.path().join("server").join(name))
            .expect("a password")
            .trim()
            .to_string()
    };
    let (app_password, replication_password) =
        (secret("db-password"), secret("replication-password"));
    assert_ne!(app_password, replication_password);
    let watcher = CmdlineWatch::start(vec![app_password.clone(), replication_password.clone()]);
    for (node, host) in [("adm1", 5), ("pg1", 11), ("pg2", 12), ("nginx1", 21)] {
        cluster.spawn_agent(node, &format!("{net}.{host}")).await;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = cluster.url.clone();
    let admin = cluster.admin.clone();
    let node_json = |name: &'static str| {
        let (http, url, admin) = (http.clone(), url.clone(), admin.clone());
        async move {
            let res = http
                .get(format!("{url}/api/v1/nodes/{name}"))
                .bearer_auth(&admin)
                .send()
                .await
                .ok()?;
            if !res.status().is_success() {
                return None;
            }
            res.json::<Value>().await.ok()
        }
    };
    // pg2 reports itself a replica (from its heartbeat), pg1 the primary.
    eventually(
        "pg1 primary and pg2 replica in heartbeats",
        Duration::from_secs(150),
        || async {
            let role = |n: Option<Value>| {
                n.and_then(|n| {
                    n["observed"]["replication"]["role"]
                        .as_str()
                        .map(String::from)
                })
            };
            role(node_json("pg1").await).as_deref() == Some("primary")
                && role(node_json("pg2").await).as_deref() == Some("replica")
        },
    )
    .await;

    // A todo written through nginx arrives on the standby.
    let lb = format!("http://{net}.21:80");
    eventually(
        "a POST /todos through nginx1",
        Duration::from_secs(60),
        || async {
            http.post(format!("{lb}/todos"))
                .json(&json!({"title": "replicated"}))
                .send()
                .await
                .is_ok_and(|r| r.status() == 201)
        },
    )
    .await;
    let pg2 = cluster.node_state("pg2");
    eventually("the todo on pg2", Duration::from_secs(30), || async {
        psql(
            &pg2,
            "SELECT count(*) FROM todos WHERE title = 'replicated'",
        )
        .is_some_and(|n| n != "0")
    })
    .await;
    let pg1 = cluster.node_state("pg1");
    assert_eq!(
        psql(&pg1, "SELECT slot_name FROM pg_replication_slots").as_deref(),
        Some("pg2")
    );
    // Synchronous replication: commits wait for pg2, named.
    eventually(
        "pg1's commits waiting for pg2",
        Duration::from_secs(30),
        || async {
            psql(&pg1, "SHOW synchronous_standby_names").as_deref() == Some("ANY 1 (\"pg2\")")
        },
    )
    .await;
    eventually(
        "pg2 streaming as a synchronous standby",
        Duration::from_secs(30),
        || async {
            psql(&pg1, "SELECT sync_state FROM pg_stat_replication").as_deref() == Some("quorum")
        },
    )
    .await;
    // Roles with passwords made, primary_conninfo set, a base backup taken:
    // no command line carried the password meanwhile.
    let (scans, seen) = watcher.finish();
    eprintln!("{scans} scans of every command line while the db nodes set up");
    assert!(scans > 10, "the watcher hardly ran ({scans} scans)");
    assert!(
        seen.is_empty(),
        "a database password was on command lines: {seen:#?}"
    );
    // Least privilege: the standby streams as `replicator`, which reads no
    // file; pg_rewind's `rewinder` reads files but cannot replicate; the
    // webapp's password opens neither.
    // (Function privileges are per database: pg_rewind reads through
    // `postgres`.)
    let may = |role: &str, function: &str| {
        psql_in(
            &pg1,
            "postgres",
            &format!("SELECT has_function_privilege('{role}', '{function}', 'execute')"),
        )
    };
    for f in [
        "pg_catalog.pg_read_binary_file(text)",
        "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    ] {
        assert_eq!(
            may("replicator", f).as_deref(),
            Some("f"),
            "replicator may run {f}"
        );
        assert_eq!(
            may("rewinder", f).as_deref(),
            Some("t"),
            "rewinder may not run {f}"
        );
    }
    assert_eq!(
        psql(
            &pg1,
            "SELECT rolname FROM pg_roles WHERE rolreplication AND rolname <> 'postgres' ORDER BY 1"
        )
        .as_deref(),
        Some("replicator")
    );
    assert_eq!(
        psql(&pg1, "SELECT usename FROM pg_stat_replication").as_deref(),
        Some("replicator")
    );
    let login = |user: &str, password: &str| {
        Command::new("/usr/lib/postgresql/15/bin/psql")
            .args(["-X", "-A", "-t", "-q", "-U", user, "-d", "postgres", "-h"])
            .arg(format!("{net}.11"))
            .args(["-c", "SELECT 1"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .expect("psql runs")
            .status
            .success()
    };
    assert!(
        login("rewinder", &replication_password),
        "rewinder logs in with its password"
    );
    assert!(
        !login("rewinder", &app_password),
        "the webapp's password opens rewinder"
    );

    let pg2_token = consul_token(&pg2);

    // Scaling db back to 1 drains pg2: the server removes it once applied.
    // The new policy is a reload of the same nginx, not a restart.
    let nginx1 = cluster.node_state("nginx1");
    let nginx_pid = pid_of(&nginx1, "nginx").expect("nginx pid");
    let conf = nginx1.join("nginx/conf/nginx.conf");
    assert!(
        std::fs::read_to_string(&conf)
            .expect("conf")
            .contains("hash $request_uri consistent;")
    );
    cluster
        .admin(
            reqwest::Method::PUT,
            "/api/v1/topology",
            Some(json!({"web": 1, "db": 1, "lb_policy": "least_conn", "replication": "async"})),
        )
        .await;
    eventually(
        "nginx1 re-rendered with least_conn",
        Duration::from_secs(30),
        || async { std::fs::read_to_string(&conf).is_ok_and(|c| c.contains("least_conn;")) },
    )
    .await;
    assert_eq!(pid_of(&nginx1, "nginx"), Some(nginx_pid));
    eventually(
        "pg2 removed after its drain",
        Duration::from_secs(90),
        || async {
            http.get(format!("{url}/api/v1/nodes/pg2"))
                .bearer_auth(&admin)
                .send()
                .await
                .is_ok_and(|r| r.status() == 404)
        },
    )
    .await;
    for service in ["postgres", "consul"] {
        assert_eq!(pid_of(&pg2, service), None, "pg2 {service} still runs");
    }
    // pg2's Consul token goes with it: it no longer opens the leader key.
    eventually(
        "pg2's consul token deleted",
        Duration::from_secs(60),
        || async {
            http.get(format!("http://{net}.11:8500/v1/acl/token/self"))
                .header("X-Consul-Token", pg2_token.as_str())
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::FORBIDDEN)
        },
    )
    .await;
    // The drained agent idles (no polls against a removed node) until the
    // provider runs stop-all.
    let agent_log = cluster.dir.path().join("agent-pg2.log");
    eventually(
        "pg2's agent idle after the drain",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&agent_log).is_ok_and(|l| l.contains("node drained; idle"))
        },
    )
    .await;
    // The primary lets go of the WAL it kept for pg2.
    eventually(
        "pg2's slot dropped on pg1",
        Duration::from_secs(30),
        || async {
            psql(&pg1, "SELECT count(*) FROM pg_replication_slots").as_deref() == Some("0")
        },
    )
    .await;
    // The rest of the cluster keeps serving.
    let res = http.get(format!("{lb}/todos")).send().await.expect("GET");
    assert_eq!(res.status(), 200);
}

/// A db node whose first clone fails (here the primary refuses the
/// replication login for a while) is not stranded: its agent keeps the
/// order it failed and makes the data dir again each HA tick, so once the
/// primary lets it in it streams, with no new order from the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_first_clone_failed_streams_once_the_primary_lets_it_in() {
    let net = "127.0.43";
    let mut cluster = Cluster::start(net).await;
    cluster
        .admin(
            reqwest::Method::PUT,
            "/api/v1/topology",
            Some(json!({"web": 1, "db": 1, "lb_policy": "round_robin", "replication": "async"})),
        )
        .await;
    for (node, host) in [("adm1", 5), ("pg1", 11)] {
        cluster.spawn_agent(node, &format!("{net}.{host}")).await;
    }
    let pg1 = cluster.node_state("pg1");
    eventually(
        "pg1 to run as primary",
        Duration::from_secs(120),
        || async { psql(&pg1, "SELECT pg_is_in_recovery()").as_deref() == Some("f") },
    )
    .await;
    cluster
        .admin(
            reqwest::Method::PUT,
            "/api/v1/topology",
            Some(json!({"web": 1, "db": 2, "lb_policy": "round_robin", "replication": "async"})),
        )
        .await;
    // pg1 applies its orders for the new topology first (a postgres order
    // on the primary corrects the roles, password and all).
    eventually(
        "pg1 to apply every order",
        Duration::from_secs(60),
        || async {
            let orders = cluster.orders("pg1").await;
            !orders.is_empty() && orders.iter().all(|o| o["status"] == "applied")
        },
    )
    .await;
    let password = std::fs::read_to_string(cluster.dir.path().join("server/replication-password"))
        .expect("the replication password")
        .trim()
        .to_string();
    assert!(
        psql_in(&pg1, "postgres", "ALTER ROLE replicator PASSWORD 'not-yet'").is_some(),
        "breaking the replication login"
    );

    cluster.spawn_agent("pg2", &format!("{net}.12")).await;
    eventually(
        "pg2's postgres order to fail (its clone refused)",
        Duration::from_secs(60),
        || async {
            cluster
                .orders("pg2")
                .await
                .iter()
                .any(|o| o["status"] == "failed")
        },
    )
    .await;
    let orders_before = cluster.orders("pg2").await.len();
    assert!(
        psql_in(
            &pg1,
            "postgres",
            &format!("ALTER ROLE replicator PASSWORD '{password}'")
        )
        .is_some(),
        "mending the replication login"
    );

    eventually(
        "pg2 to stream from pg1",
        Duration::from_secs(90),
        || async {
            psql_in(
                &pg1,
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg2' AND state = 'streaming'",
            )
            .as_deref()
                == Some("1")
        },
    )
    .await;
    assert_eq!(
        cluster.orders("pg2").await.len(),
        orders_before,
        "pg2 came up by a new order, not by itself"
    );
}
