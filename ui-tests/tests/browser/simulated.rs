//! The console against a real corral server whose agents are simulated
//! through the real agent endpoints, so each step of a new node can be
//! held and checked: sign in (and a refused token), the live overview,
//! backups and a restore into a new node shown apart from the standbys,
//! "Add webserver" progressing step by step without a reload, a failed
//! order's text, a switchover asked from a standby's card, node detail
//! with orders and a live log tail with search, a settings change with its orders (and strict
//! replication offered), the audit log with a node filter, removal with
//! confirmation, and screenshots at 1280 and 400 px.

use std::time::Duration;

use anyhow::Context;
use corral_proto::WorkOrder;
use corral_ui_tests::agents::Agents;
use corral_ui_tests::browser::{Browser, Chromedriver};
use corral_ui_tests::console::{Console, node};
use corral_ui_tests::eventually;
use corral_ui_tests::server::Server;

const SEED: [&str; 5] = ["adm1", "nginx1", "nginx2", "pg1", "pg2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_a_simulated_cluster() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let agents = Agents::new(&server);
    agents.seed().await?;
    for name in SEED {
        agents.bring_up(name).await?;
    }
    agents
        .ship_logs("nginx1", "nginx", &["nginx: started", "GET / 200 0.002"])
        .await?;
    // Half an hour of requests/s through each load balancer, a sample a
    // minute: the last ones 6 and 1.
    let wave = |base: f64| -> Vec<f64> {
        (0..30)
            .map(|i| base + (f64::from(i) / 3.0).sin() * base / 2.0)
            .chain([if base > 2.0 { 6.0 } else { 1.0 }])
            .collect()
    };
    agents
        .send_metric("nginx1", "nginx.requests", 60, &wave(8.0))
        .await?;
    agents
        .send_metric("nginx2", "nginx.requests", 60, &wave(2.0))
        .await?;
    let _alive = agents.keep_alive();

    let driver = Chromedriver::start().await?;
    let browser = driver.browser(1280, 900).await?;
    let result = walk_through(&server, &agents, &browser).await;
    if result.is_err() {
        // The state of the page when it failed, for the person debugging.
        let _ = browser.screenshot("failure", 1280, 900).await;
    }
    browser.close().await?;
    result
}

/// The backup the schedule ordered: its id and node.
async fn eventually_backup(server: &Server) -> anyhow::Result<(i64, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = server.get_json("/api/v1/backups").await?;
        if let Some(b) = list.as_array().and_then(|l| l.first()) {
            let id = b["id"].as_i64().unwrap_or(0);
            let node = b["node"].as_str().unwrap_or("").to_string();
            return Ok((id, node));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the schedule ordered no backup in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn walk_through(server: &Server, agents: &Agents, browser: &Browser) -> anyhow::Result<()> {
    let console = Console::new(browser, &server.url);

    // Signing in: a wrong token is refused with a clear message.
    console.open("/").await?;
    let refused = console.sign_in_refused("corral-admin-wrong").await?;
    anyhow::ensure!(refused.contains("not accepted"), "message: {refused}");
    console.sign_in_with_enter(&server.admin_token).await?;
    for name in SEED {
        console.wait_health(name, "healthy").await?;
    }
    browser
        .wait_text(&format!("{} .address", node("nginx1")), "127.0.11.21")
        .await?;
    browser
        .wait_text(&format!("{} .replication-role", node("pg2")), "replica")
        .await?;
    browser.wait_text(".tier-db .primary", "pg1").await?;
    browser.wait_text(".stream", "live").await?;
    let consul = browser.find("ul.links li:last-child a").await?;
    anyhow::ensure!(
        consul.attr("href").await?.as_deref() == Some("http://127.0.11.5:8500/ui"),
        "Consul UI link"
    );
    // The cluster's charts, drawn as SVG by the UI: a line per load
    // balancer and their total, each through every sample sent.
    let chart = "figure.chart[data-metric='nginx.requests']";
    for line in ["nginx1", "nginx2", "total"] {
        let polyline = browser
            .wait_for(&format!("{chart} polyline[data-node='{line}']"))
            .await?;
        let points = polyline.attr("points").await?.unwrap_or_default();
        anyhow::ensure!(
            points.split(' ').filter(|p| p.contains(',')).count() == 31,
            "{line}: points {points:?}"
        );
    }
    browser
        .wait_text(&format!("{chart} .chart-legend"), "total 7.0 /s")
        .await?;
    // A longer window: the same samples, squeezed to the right end.
    let leftmost = |points: String| {
        points
            .split(' ')
            .filter_map(|p| p.split_once(',')?.0.parse::<f64>().ok())
            .fold(f64::MAX, f64::min)
    };
    let line = format!("{chart} polyline[data-node='nginx1']");
    let hour = leftmost(
        browser
            .find(&line)
            .await?
            .attr("points")
            .await?
            .unwrap_or_default(),
    );
    browser.click("button[data-window='21600']").await?;
    browser
        .wait_for(&format!("{chart} svg[aria-label*='over the last 6 hours']"))
        .await?;
    let six_hours = leftmost(
        browser
            .wait_for(&line)
            .await?
            .attr("points")
            .await?
            .unwrap_or_default(),
    );
    // The samples' span is a sixth as wide over six hours as over one
    // (600 wide, the right end now).
    let want = 600.0 - (600.0 - hour) / 6.0;
    anyhow::ensure!(
        hour < 590.0 && (six_hours - want).abs() < 3.0,
        "leftmost point: {hour} over an hour, {six_hours} over six hours (want {want:.1})"
    );
    browser.click("button[data-window='3600']").await?;
    browser
        .wait_for(&format!("{chart} svg[aria-label*='over the last hour']"))
        .await?;
    browser
        .screenshot("overview-charts-1280", 1280, 2200)
        .await?;
    browser.screenshot("overview-1280", 1280, 1000).await?;

    // A planned switchover from the standby's card: the order goes to the
    // primary, and the card says so.
    browser.click("button[data-switchover='pg2']").await?;
    browser
        .wait_text(
            &format!("{} .switchover .applied", node("pg2")),
            "Switchover pg1 → pg2 filed",
        )
        .await?;

    // Backups: a schedule due two hours ago with no backup done since is
    // overdue (red badge); the scheduled backup is ordered, and "Back up
    // now" meanwhile is refused; once the agent reports it done, the panel
    // shows it and the badge goes.
    browser
        .wait_text(".backups .last-backup", "No backup yet")
        .await?;
    let due = chrono::Utc::now() - chrono::Duration::hours(2);
    let mut topology = server.get_json("/api/v1/topology").await?;
    topology["backup"] =
        serde_json::json!({"schedule": due.format("%H:%M").to_string(), "keep": 3});
    if let Some(t) = topology.as_object_mut() {
        t.remove("updated_at");
    }
    server.put_json("/api/v1/topology", &topology).await?;
    browser.wait_for(".backups .badge.overdue").await?;
    browser.wait_text(".backups .schedule", "keeping 3").await?;
    browser
        .wait_text(".backups .offsite", "no S3 bucket")
        .await?;
    let (id, on) = eventually_backup(server).await?;
    browser.click_button("Back up now").await?;
    browser
        .wait_text(".backups .error", "backup_in_progress")
        .await?;
    agents.finish_backup(&on, id).await?;
    browser
        .wait_text(
            ".backups .last-backup",
            &format!("Last backup: #{id} from {on}"),
        )
        .await?;
    browser.wait_gone(".backups .badge.overdue").await?;
    browser.click_button("Back up now").await?;
    browser.wait_text(".backups .applied", "ordered on").await?;
    browser.screenshot("backups-1280", 1280, 1000).await?;

    // A restore into a new node: restore1 shows under PostgreSQL as a
    // restored copy, not among the standbys, and goes healthy like any
    // node once its agent is up.
    server
        .post_json(
            "/api/v1/db/restore",
            &serde_json::json!({"to": "copy", "new_node": true}),
        )
        .await?;
    console.wait_node("restore1").await?;
    browser.wait_text(".tier-db .restores", "restore1").await?;
    let standbys = browser.find(".tier-db .standbys").await?.text().await?;
    anyhow::ensure!(!standbys.contains("restore1"), "standbys: {standbys}");
    agents.bring_up("restore1").await?;
    console.wait_health("restore1", "healthy").await?;

    // Add webserver: the node appears at once and each step shows as the
    // agent gets there, without a reload.
    browser.mark_page().await?;
    browser.click_button("Add webserver").await?;
    console.wait_node("nginx3").await?;
    console.wait_step("nginx3", "created", "done").await?;
    console
        .wait_step("nginx3", "agent enrolled", "current")
        .await?;
    agents.enroll("nginx3").await?;
    console
        .wait_step("nginx3", "agent enrolled", "done")
        .await?;
    console
        .wait_step("nginx3", "orders applied", "current")
        .await?;
    let applied = agents.apply_orders("nginx3", |_| Ok("done".into())).await?;
    anyhow::ensure!(applied >= 3, "nginx3 got {applied} orders");
    console
        .wait_step("nginx3", "orders applied", "done")
        .await?;
    console.wait_step("nginx3", "healthy", "current").await?;
    agents.heartbeat("nginx3").await?;
    console.wait_step("nginx3", "healthy", "done").await?;
    console
        .wait_step("nginx3", "in the load balancers", "done")
        .await?;
    agents.set_live("nginx3");
    browser.assert_not_reloaded().await?;

    // A replica whose PostgreSQL order fails shows the agent's words.
    browser.click_button("Add database replica").await?;
    console.wait_node("pg3").await?;
    agents.enroll("pg3").await?;
    agents
        .apply_orders("pg3", |order| match order {
            WorkOrder::Postgres(_) => {
                Err("pg_basebackup: could not connect to 127.0.11.11:5432".into())
            }
            _ => Ok("done".into()),
        })
        .await?;
    console.wait_step("pg3", "orders applied", "failed").await?;
    browser
        .wait_text(
            &format!("{} li[data-step='orders applied'] .error", node("pg3")),
            "pg_basebackup: could not connect",
        )
        .await?;
    browser
        .screenshot("overview-progress-1280", 1280, 1400)
        .await?;

    // Node detail: orders with status and result, shipped log lines.
    console.open_node("nginx1").await?;
    browser.wait_for("table.orders tr.order-applied").await?;
    let rows = browser.find_all("table.orders tbody tr").await?;
    anyhow::ensure!(rows.len() >= 3, "{} order rows", rows.len());
    browser.wait_text("pre.logs", "GET / 200 0.002").await?;
    // The tail is live: a line shipped now shows without a reload, and the
    // search box narrows the tail to the lines containing its text.
    agents
        .ship_logs("nginx1", "nginx", &["POST /todos 201 0.004"])
        .await?;
    browser.wait_text("pre.logs", "POST /todos 201").await?;
    browser.type_into("input.log-search", "post /todos").await?;
    eventually(
        "the search to leave only the POST line",
        browser.patience,
        || async {
            let text = browser.find("pre.logs").await?.text().await?;
            Ok(text.contains("POST /todos 201") && !text.contains("GET / 200"))
        },
    )
    .await?;
    // Backspace it away: the whole tail again.
    browser
        .find("input.log-search")
        .await?
        .send_keys(&"\u{e003}".repeat("post /todos".len()))
        .await?;
    browser.wait_text("pre.logs", "GET / 200 0.002").await?;
    browser.screenshot("node-detail-1280", 1280, 1000).await?;
    browser.screenshot("node-detail-400", 400, 1400).await?;
    browser.client.set_window_size(1280, 900).await?;

    // Settings: a new load-balancing policy, and the orders it filed.
    console.nav("Settings").await?;
    browser
        .wait_for("#replication option[value='strict']")
        .await
        .context("strict synchronous replication is offered")?;
    let policy = browser.wait_for("#lb-policy").await?;
    policy.select_by_value("uri_hash").await?;
    browser.click_button("Apply").await?;
    browser
        .wait_text(".result .applied", "orders filed")
        .await?;
    // The simulated agents apply them; the table follows live.
    eventually(
        "the new load-balancer orders applied",
        Duration::from_secs(30),
        || async {
            let rows = browser.find_all(".result table.orders tbody tr").await?;
            let mut applied_lb = 0;
            for row in &rows {
                let text = row.text().await?;
                if text.contains("load_balancer") && text.contains("applied") {
                    applied_lb += 1;
                }
            }
            Ok(applied_lb >= 3)
        },
    )
    .await?;
    browser
        .wait_text(".settings .hint", "uri_hash")
        .await
        .context("the form shows the new policy")?;

    // Events: newest first, filterable by node.
    console.nav("Events").await?;
    browser
        .wait_for("ol.events li[data-kind='topology.updated']")
        .await?;
    browser
        .wait_for("ol.events li[data-kind='db.switchover_requested']")
        .await?;
    let first = browser.find("ol.events li").await?;
    let first_id: i64 = browser.find_all("ol.events li").await?.len().try_into()?;
    anyhow::ensure!(first_id > 5, "{first_id} events");
    anyhow::ensure!(first.attr("data-kind").await?.is_some());
    browser
        .wait_for("#event-filter")
        .await?
        .select_by_value("nginx3")
        .await?;
    eventually("only nginx3's events", Duration::from_secs(10), || async {
        let items = browser.find_all("ol.events li").await?;
        let mut all = !items.is_empty();
        for item in &items {
            all &= item.attr("data-subject").await?.as_deref() == Some("nginx3");
        }
        Ok(all)
    })
    .await?;

    // Remove nginx3: asks first, can be cancelled, then drains and goes.
    console.nav("Overview").await?;
    console.open_node("nginx3").await?;
    browser.click_button("Remove…").await?;
    browser.wait_for(".confirm").await?;
    browser.click_button("Cancel").await?;
    browser.wait_gone(".confirm").await?;
    browser.click_button("Remove…").await?;
    browser.click_button("Yes, drain and remove").await?;
    browser.wait_text(".gone", "not in the cluster").await?;
    console.nav("Overview").await?;
    console.wait_node("nginx1").await?;
    console.wait_node_gone("nginx3").await?;
    browser.screenshot("overview-400", 400, 2400).await?;
    browser.client.set_window_size(1280, 900).await?;

    // The session survives a reload; signing out ends it.
    browser.client.refresh().await?;
    console.wait_node("nginx1").await?;
    browser.click_button("Sign out").await?;
    browser.wait_for("#token").await?;
    Ok(())
}
