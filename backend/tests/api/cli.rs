use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::*;

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn corral(app: &TestApp, args: &[&str]) -> Run {
    let out = Command::new(CORRAL)
        .args(["--url", &app.url, "--token", &app.admin])
        .args(args)
        .env_remove("CORRAL_URL")
        .env_remove("CORRAL_TOKEN")
        .output()
        .await
        .expect("run corral");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[tokio::test]
async fn the_cli_adds_a_node_lists_it_and_shows_its_orders() {
    let app = spawn_app(Backend::Sqlite).await;
    let run = corral(&app, &["--output", "json", "nodes", "add", "--role", "web"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let node: Value = serde_json::from_str(&run.stdout).expect("json node");
    assert_eq!(node["name"], "nginx1");

    let run = corral(&app, &["nodes", "list"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("nginx1"))
        .expect("nginx1 row");
    assert!(
        line.contains("127.0.11.21") && line.contains("provisioning"),
        "{line}"
    );

    let run = corral(&app, &["--output", "json", "orders", "nginx1"]).await;
    let orders: Vec<Value> = serde_json::from_str(&run.stdout).expect("json orders");
    assert_eq!(orders.len(), 4);
    let run = corral(&app, &["orders", "nginx1"]).await;
    assert!(run.stdout.contains("load_balancer"), "{}", run.stdout);
    assert!(run.stdout.contains("firewall"), "{}", run.stdout);
    assert!(
        run.stdout.contains("\"password\":\"***\""),
        "secrets are masked: {}",
        run.stdout
    );
}

#[tokio::test]
async fn the_cli_sets_only_the_topology_fields_given() {
    let app = spawn_app(Backend::Sqlite).await;
    let run = corral(&app, &["topology", "set", "--seed"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("created:  pg1, pg2, nginx1, nginx2"),
        "{}",
        run.stdout
    );
    let run = corral(&app, &["topology", "set", "--lb-policy", "uri_hash"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("orders filed: 2"), "{}", run.stdout);
    let run = corral(&app, &["--output", "json", "topology", "get"]).await;
    let t: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(
        (t["web"].as_u64(), t["db"].as_u64(), t["lb_policy"].as_str()),
        (Some(2), Some(2), Some("uri_hash"))
    );
    let run = corral(&app, &["--output", "json", "events", "--limit", "3"]).await;
    assert_eq!(run.stdout.lines().count(), 3);
}

#[tokio::test]
async fn cli_errors_are_clear_and_exit_non_zero() {
    let app = spawn_app(Backend::Sqlite).await;
    let run = corral(&app, &["nodes", "show", "nginx9"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("no node named nginx9 (not_found, HTTP 404)"),
        "{}",
        run.stderr
    );
    let run = corral(
        &app,
        &["topology", "set", "--replication", "sync", "--db", "1"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("at least 2 db"), "{}", run.stderr);
    let out = Command::new(CORRAL)
        .args([
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "x",
            "nodes",
            "list",
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach corral at http://127.0.0.1:1")
    );
}

#[tokio::test]
async fn the_cli_finds_the_admin_token_in_the_state_dir() {
    let app = spawn_app(Backend::Sqlite).await;
    let out = Command::new(CORRAL)
        .args(["--url", &app.url, "--state-dir"])
        .arg(&app.state)
        .args(["nodes", "list"])
        .env_remove("CORRAL_TOKEN")
        .output()
        .await
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("adm1"));
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

struct Served {
    child: Child,
    url: String,
    stdout: tokio::task::JoinHandle<String>,
}

/// Starts `corral serve` and waits for its "serving on" line, which comes
/// after everything else it prints at start.
async fn serve(state: &std::path::Path) -> Served {
    let mut child = Child(
        Command::new(CORRAL)
            .args([
                "serve",
                "--no-machines",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn serve"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    let stdout = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut s).await;
        s
    });
    let mut stderr = BufReader::new(child.0.stderr.take().expect("stderr")).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = stderr.next_line().await {
            if let Some(url) = line.strip_prefix("serving on ") {
                return Some(url.trim().to_string());
            }
        }
        None
    })
    .await
    .expect("serve starts in time")
    .expect("serve printed its URL before exiting");
    // Keep draining stderr so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
    Served { child, url, stdout }
}

impl Served {
    /// Stops the server and returns all it printed on stdout.
    async fn stop(mut self) -> String {
        let _ = self.child.0.kill().await;
        self.stdout.await.expect("stdout reader")
    }
}

#[tokio::test]
async fn serve_prints_the_admin_token_once_and_it_works() {
    let state = tempfile::tempdir().expect("dir");
    let printed = serve(state.path()).await.stop().await;
    let token = printed.trim();
    assert!(token.starts_with("corral-admin-"), "stdout: {printed:?}");
    assert_eq!(printed.lines().count(), 1, "stdout carries only the token");

    let served = serve(state.path()).await;
    let res = reqwest::Client::new()
        .get(format!("{}/api/v1/nodes", served.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("nodes");
    assert_eq!(res.status(), 200);
    let printed_again = served.stop().await;
    assert_eq!(
        printed_again, "",
        "the token is printed only at first start"
    );
}

#[tokio::test]
async fn the_cli_switches_over_waits_for_the_outcome_and_shows_db_status() {
    use crate::db::{beat, db_heartbeat, db_pair};
    let app = spawn_app(Backend::Sqlite).await;
    let (pg1, pg2) = db_pair(&app).await;
    beat(&app, &pg1, "pg1", db_heartbeat("primary", 0, 1)).await;
    beat(&app, &pg2, "pg2", db_heartbeat("replica", 2048, 1)).await;

    let run = corral(&app, &["db", "status"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let row = |name: &str| -> Vec<String> {
        run.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} row in {}", run.stdout))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("pg1")[..4], ["pg1", "healthy", "primary", "streaming"]);
    assert_eq!(row("pg2")[4..6], ["1", "2048"]);
    assert!(!run.stdout.contains("nginx1"), "{}", run.stdout);

    // The primary's agent, simulated: it fails the first switchover and
    // applies the second.
    let agent = {
        let (url, token) = (app.url.clone(), pg1.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut after = 0;
            let outcomes = [
                (
                    "failed",
                    "pg2 did not catch up within 30s; pg1 stays primary",
                ),
                ("applied", "pg2 promoted (timeline 2); pg1 follows it"),
            ];
            for (outcome, message) in outcomes {
                let seq = loop {
                    let body: Value = http
                        .get(format!(
                            "{url}/api/v1/agents/pg1/orders?after={after}&wait=30s"
                        ))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .expect("poll")
                        .json()
                        .await
                        .expect("json");
                    let orders = body["orders"].as_array().expect("orders").clone();
                    after = body["last_seq"].as_i64().expect("last_seq");
                    if let Some(o) = orders.iter().find(|o| o["payload"]["kind"] == "switchover") {
                        break o["seq"].as_i64().expect("seq");
                    }
                };
                let res = http
                    .post(format!("{url}/api/v1/agents/pg1/orders/{seq}/result"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"outcome": outcome, "message": message}))
                    .send()
                    .await
                    .expect("result");
                assert_eq!(res.status(), 200);
            }
        })
    };

    let run = corral(&app, &["db", "switchover", "--to", "pg2"]).await;
    assert_eq!(
        run.code, 1,
        "a failed switchover exits non-zero: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("switchover pg1 -> pg2: order"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("did not catch up"), "{}", run.stderr);

    let run = corral(&app, &["db", "switchover", "--to", "pg2", "--wait"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("switchover pg1 -> pg2 applied: pg2 promoted"),
        "{}",
        run.stdout
    );
    agent.await.expect("agent");

    let run = corral(&app, &["db", "switchover", "--to", "pg1"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("pg1 is already the primary (already_primary, HTTP 409)"),
        "{}",
        run.stderr
    );
    // The heartbeats still say pg1 is primary: without --wait the CLI
    // returns once the order is filed.
    let run = corral(&app, &["db", "switchover", "--to", "pg2", "--no-wait"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("switchover pg1 -> pg2: order"),
        "{}",
        run.stdout
    );

    let run = corral(
        &app,
        &[
            "--output",
            "json",
            "db",
            "switchover",
            "--to",
            "pg9",
            "--no-wait",
        ],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("no node named pg9 (not_found, HTTP 404)"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn up_with_several_servers_refuses_what_it_cannot_run_and_makes_nothing() {
    async fn up(state: &std::path::Path, args: &[&str]) -> String {
        // A refusal comes at once; an `up` that started would run until
        // stopped, so it is killed (kill_on_drop) when the wait gives up.
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(CORRAL)
                .arg("up")
                .args(args)
                .args(["--network", "127.0.35.0/24", "--state-dir"])
                .arg(state)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("corral up {args:?} was not refused within 60 s"))
        .expect("run corral up");
        assert!(!out.status.success(), "corral up {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
    let made = |state: &std::path::Path| {
        ["statedb", "statedb-password", "admin-token", "up.pid"]
            .into_iter()
            .filter(|f| state.join(f).exists())
            .collect::<Vec<_>>()
    };

    let state = tempfile::tempdir().expect("state dir");
    let said = up(state.path(), &["--servers", "7"]).await;
    assert!(said.contains("1..=6"), "{said}");
    let said = up(
        state.path(),
        &["--servers", "2", "--provider", "virtualbox"],
    )
    .await;
    assert!(
        said.contains("runs on the local and lxc providers, not virtualbox"),
        "{said}"
    );
    assert_eq!(made(state.path()), Vec::<&str>::new());

    // A single-server cluster's state dir, and the other way round.
    std::fs::write(state.path().join("corral.db"), "").expect("corral.db");
    std::fs::create_dir(state.path().join("nodes")).expect("nodes");
    let said = up(state.path(), &["--servers", "2"]).await;
    assert!(said.contains("holds a single-server cluster"), "{said}");
    assert_eq!(made(state.path()), Vec::<&str>::new());
    let several = tempfile::tempdir().expect("state dir");
    std::fs::create_dir(several.path().join("statedb")).expect("statedb");
    let said = up(several.path(), &[]).await;
    assert!(
        said.contains("holds a cluster of several servers"),
        "{said}"
    );
    assert!(!several.path().join("corral.db").exists(), "{said}");
}

#[tokio::test]
async fn up_with_the_lxc_provider_on_a_host_without_lxc_says_what_is_missing_and_makes_nothing() {
    let state = tempfile::tempdir().expect("state dir");
    let out = Command::new(CORRAL)
        .args([
            "up",
            "--provider",
            "lxc",
            "--lxc-bridge",
            "corralnone0",
            "--state-dir",
        ])
        .arg(state.path())
        // A host without the lxc tools (and, when not root, without root).
        .env("PATH", state.path().join("no-such-bin"))
        .output()
        .await
        .expect("run corral up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the lxc provider cannot run here"),
        "{stderr}"
    );
    assert!(
        stderr.contains("lxc-copy") || stderr.contains("needs root"),
        "names what is missing: {stderr}"
    );
    for made in ["corral.db", "nodes", "lxc", "admin-token"] {
        assert!(
            !state.path().join(made).exists(),
            "{made} was made although the provider cannot run: {stderr}"
        );
    }
}

#[tokio::test]
async fn corral_logs_follow_prints_a_line_shipped_after_it_started() {
    let app = spawn_app(Backend::Sqlite).await;
    app.add_node("web").await;
    let token = app.enroll("nginx1").await;
    let ship = |line: &'static str| {
        app.as_token(&token, reqwest::Method::POST, "/api/v1/agents/nginx1/logs")
            .json(&serde_json::json!({"service": "nginx", "lines": [line]}))
            .send()
    };
    assert_eq!(ship("before it started").await.expect("ship").status(), 204);

    let mut follow = Child(
        Command::new(CORRAL)
            .args(["--url", &app.url, "--token", &app.admin])
            .args(["logs", "nginx1", "--service", "nginx", "--follow"])
            .env_remove("CORRAL_URL")
            .env_remove("CORRAL_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn corral logs"),
    );
    let mut stdout = BufReader::new(follow.0.stdout.take().expect("stdout")).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("corral logs still running")
    };
    let first = next_line().await;
    assert!(first.ends_with("nginx      before it started"), "{first}");

    assert_eq!(
        ship("shipped while following")
            .await
            .expect("ship")
            .status(),
        204
    );
    let second = next_line().await;
    assert!(second.ends_with("shipped while following"), "{second}");
    let _ = follow.0.kill().await;
}

#[tokio::test]
async fn serve_with_a_bucket_but_no_usable_credentials_refuses_to_start_and_says_how() {
    let state = tempfile::tempdir().expect("state");
    let serve = |extra: Vec<String>| {
        let state = state.path().to_path_buf();
        async move {
            let out = Command::new(CORRAL)
                .arg("--state-dir")
                .arg(&state)
                .args(["serve", "--listen", "127.0.33.9:0", "--no-machines"])
                .args([
                    "--s3-endpoint",
                    "http://127.0.33.9:9",
                    "--s3-bucket",
                    "backups",
                ])
                .args(extra)
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .env_remove("CORRAL_S3_CREDENTIALS_FILE")
                .output()
                .await
                .expect("run corral serve");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, stderr) = serve(Vec::new()).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("--s3-credentials-file"),
        "{stderr}"
    );
    let file = state.path().join("s3");
    std::fs::write(&file, "access_key_id = k\nsecret_access_key = hush\n").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let arg = file.to_string_lossy().into_owned();
    let (code, stderr) = serve(vec!["--s3-credentials-file".into(), arg]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains("hush"), "{stderr}");
    assert!(
        !state.path().join("admin-token").exists(),
        "refused before anything is made"
    );
}

#[tokio::test]
async fn db_backups_says_whether_an_s3_copy_is_configured() {
    let app = spawn_app(Backend::Sqlite).await;
    let run = corral(&app, &["db", "backups"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("S3 copy: not configured"),
        "{}",
        run.stdout
    );
}
