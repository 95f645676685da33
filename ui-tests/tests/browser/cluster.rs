//! The console against a real cluster from `corral up` (control plane,
//! local provider, real agents running consul, nginx, todomvc and
//! PostgreSQL on loopback addresses): sign in, the five seed nodes
//! healthy, Add webserver, nginx3 appearing and turning healthy without a
//! reload, a request through a load balancer served by nginx3, its orders
//! and shipped logs, then its removal leaving the picture.

use std::time::Duration;

use corral_e2e::Cluster;
use corral_ui_tests::browser::{Browser, Chromedriver};
use corral_ui_tests::console::{Console, node};
use corral_ui_tests::eventually;
use corral_ui_tests::server::built_ui;

/// How long a real node may take for a step (PostgreSQL, Consul, nginx).
const LONG: Duration = Duration::from_secs(240);

const SEED: [&str; 5] = ["adm1", "nginx1", "nginx2", "pg1", "pg2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_webserver_from_the_console_to_a_real_cluster() -> anyhow::Result<()> {
    // `corral up` serves frontend/dist found above its working directory.
    built_ui()?;
    let mut cluster = Cluster::up(31, 2, 2).await?;
    let driver = Chromedriver::start().await?;
    let mut browser = driver.browser(1280, 900).await?;
    browser.patience = LONG;
    let outcome = walk_through(&cluster, &browser).await;
    if outcome.is_err() {
        let _ = browser.screenshot("cluster-failure", 1280, 1400).await;
    }
    browser.close().await?;
    if let Err(e) = outcome {
        anyhow::bail!("{e:#}\n{}", cluster.tail_logs());
    }
    cluster.stop().await
}

/// Who served a request through `lb` (todomvc's `X-Served-By`).
async fn served_by(cluster: &Cluster, lb: &str) -> anyhow::Result<String> {
    let res = cluster.http.get(cluster.lb(lb, "/todos")).send().await?;
    anyhow::ensure!(res.status().is_success(), "GET via {lb}: {}", res.status());
    Ok(res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

async fn walk_through(cluster: &Cluster, browser: &Browser) -> anyhow::Result<()> {
    let console = Console::new(browser, &cluster.url);
    console.open("/").await?;
    console.sign_in(&cluster.token).await?;
    for name in SEED {
        console.wait_health(name, "healthy").await?;
    }
    browser
        .wait_text(
            &format!("{} [data-service='todomvc'] .svc-detail", node("nginx1")),
            "passing",
        )
        .await?;
    browser
        .wait_text(&format!("{} .replication-role", node("pg1")), "primary")
        .await?;
    browser
        .wait_text(&format!("{} .replication-role", node("pg2")), "replica")
        .await?;
    browser
        .screenshot("cluster-overview-1280", 1280, 1100)
        .await?;
    browser.client.set_window_size(1280, 900).await?;

    // Add webserver: nginx3 appears at once and walks through its steps
    // live, without a reload.
    browser.mark_page().await?;
    browser.click_button("Add webserver").await?;
    console.wait_node("nginx3").await?;
    for step in [
        "agent enrolled",
        "orders applied",
        "healthy",
        "in the load balancers",
    ] {
        console.wait_step("nginx3", step, "done").await?;
    }
    console.wait_health("nginx3", "healthy").await?;
    browser.assert_not_reloaded().await?;

    // The load balancers route to it.
    let address = cluster.address("nginx3");
    browser
        .wait_text(&format!("{} .address", node("nginx3")), &address)
        .await?;
    eventually("a request via nginx1 served by nginx3", LONG, || async {
        Ok(served_by(cluster, "nginx1").await.unwrap_or_default() == "nginx3")
    })
    .await?;

    // Its page: applied orders and the logs its agent shipped.
    console.open_node("nginx3").await?;
    browser.wait_for("table.orders tr.order-applied").await?;
    browser.wait_for("pre.logs .log-line").await?;
    browser
        .screenshot("cluster-node-detail-1280", 1280, 1200)
        .await?;
    browser
        .screenshot("cluster-node-detail-400", 400, 1600)
        .await?;
    browser.client.set_window_size(1280, 900).await?;

    // Remove it: drained, then gone from the picture and the routes.
    browser.click_button("Remove…").await?;
    browser.click_button("Yes, drain and remove").await?;
    browser.wait_text(".gone", "not in the cluster").await?;
    console.nav("Overview").await?;
    console.wait_node("nginx1").await?;
    console.wait_node_gone("nginx3").await?;
    for _ in 0..10 {
        let who = served_by(cluster, "nginx1").await?;
        anyhow::ensure!(who != "nginx3", "nginx3 still served a request");
    }
    Ok(())
}
