//! The console when the server it was loaded from dies: two real `corral
//! serve` processes share one real PostgreSQL; the page, loaded from the
//! first, learns the second (`GET /api/v1/servers`), and after the first is
//! killed (SIGKILL) its event stream and its calls go on through the
//! second, which the header names. A node added through the second
//! server's API appears without a reload, and "Add webserver" adds exactly
//! one node.
//!
//! Addresses: PostgreSQL on 127.0.44.10, the servers on 127.0.44.1 and .2,
//! node records in 127.0.45.0/24 (no machines are made). A test binary of
//! its own: the testkit's PostgreSQL waits for its commands itself, which a
//! process-wide reaper (the e2e cluster's, in the `browser` binary) breaks.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use corral_testkit::{PgOptions, Postgres};
use corral_ui_tests::browser::{Browser, Chromedriver};
use corral_ui_tests::console::{Console, node};
use corral_ui_tests::eventually;
use corral_ui_tests::server::built_ui;
use tokio::process::{Child, Command};

/// One `corral serve --no-machines`, killed with the test.
struct Serve {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(
        state: &Path,
        database: &str,
        address: &str,
        port: u16,
        peer: &str,
    ) -> anyhow::Result<Serve> {
        let log = state.join(format!("serve-{address}.log"));
        let child = Command::new("setpriv")
            // Dies with this test process, even when the test is killed.
            .args(["--pdeathsig", "KILL", "--"])
            .arg(corral_e2e::bin("corral"))
            .args(["serve", "--no-machines"])
            .args(["--listen", &format!("{address}:{port}")])
            .args(["--network", "127.0.45.0/24"])
            .args(["--database-url", database])
            .args(["--peer", peer])
            .arg("--ui-dir")
            .arg(built_ui()?)
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("spawn corral serve")?;
        Ok(Serve {
            child,
            url: format!("http://{address}:{port}"),
            log,
        })
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        eventually(
            &format!("{} healthy", self.url),
            Duration::from_secs(60),
            || async {
                Ok(http
                    .get(format!("{}/healthz", self.url))
                    .send()
                    .await?
                    .status()
                    .is_success())
            },
        )
        .await
        .with_context(|| std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_goes_on_through_the_other_server_when_its_own_dies() -> anyhow::Result<()> {
    let pg = Postgres::start_with(PgOptions {
        host: "127.0.44.10".into(),
        dir_prefix: "corral-pg-ui-servers-".into(),
        ..PgOptions::default()
    })?;
    let database = pg.create_database("corral")?;
    let state = tempfile::tempdir()?;
    let (a_addr, b_addr) = ("127.0.44.1", "127.0.44.2");
    let a_port = corral_testkit::free_port(a_addr)?;
    let b_port = corral_testkit::free_port(b_addr)?;
    let a_url = format!("http://{a_addr}:{a_port}");
    let b_url = format!("http://{b_addr}:{b_port}");
    // One after the other: the first makes the schema and the secrets.
    let mut a = Serve::start(state.path(), &database, a_addr, a_port, &b_url)?;
    a.wait_healthy().await?;
    let b = Serve::start(state.path(), &database, b_addr, b_port, &a_url)?;
    b.wait_healthy().await?;
    let token = std::fs::read_to_string(state.path().join("admin-token"))?
        .trim()
        .to_string();

    let driver = Chromedriver::start().await?;
    let browser = driver.browser(1280, 900).await?;
    let outcome = walk_through(&browser, &mut a, &b, &token).await;
    if outcome.is_err() {
        let _ = browser.screenshot("servers-failure", 1280, 900).await;
    }
    browser.close().await?;
    outcome.with_context(|| {
        format!(
            "server a:\n{}\nserver b:\n{}",
            std::fs::read_to_string(&a.log).unwrap_or_default(),
            std::fs::read_to_string(&b.log).unwrap_or_default()
        )
    })
}

async fn walk_through(
    browser: &Browser,
    a: &mut Serve,
    b: &Serve,
    token: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let add_via_b = || async {
        let res = http
            .post(format!("{}/api/v1/nodes", b.url))
            .bearer_auth(token)
            .json(&serde_json::json!({"role": "web"}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "POST /nodes via b: {}", res.status());
        let node: serde_json::Value = res.json().await?;
        Ok::<String, anyhow::Error>(node["name"].as_str().unwrap_or_default().to_string())
    };

    let console = Console::new(browser, &a.url);
    console.open("/").await?;
    console.sign_in(token).await?;
    browser.wait_text("header .stream", "live").await?;
    browser.mark_page().await?;
    // Filed on b, streamed by a.
    let first = add_via_b().await?;
    console.wait_node(&first).await?;

    a.child.kill().await?;
    browser
        .wait_text("header .stream", &format!("live via {}", b.url))
        .await?;
    // Filed on b, streamed by b now.
    let second = add_via_b().await?;
    console.wait_node(&second).await?;

    // The page's own call goes to b too, once.
    let before = nodes(&http, b, token).await?;
    browser.click_button("Add webserver").await?;
    eventually("one node more", Duration::from_secs(30), || async {
        Ok(nodes(&http, b, token).await?.len() == before.len() + 1)
    })
    .await?;
    let after = nodes(&http, b, token).await?;
    let added = after
        .iter()
        .find(|n| !before.contains(n))
        .context("the added node")?;
    console.wait_node(added).await?;
    anyhow::ensure!(
        browser.find_all(&node(added)).await?.len() == 1,
        "{added} is shown more than once"
    );
    browser.assert_not_reloaded().await?;
    Ok(())
}

async fn nodes(http: &reqwest::Client, server: &Serve, token: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<serde_json::Value> = http
        .get(format!("{}/api/v1/nodes", server.url))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(list
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect())
}
