//! Writes as clients make them, for fault tests and benchmarks: writers
//! that remember every write the webapp acknowledged, and the checks run
//! after each fault: exactly one server takes writes, nothing acknowledged
//! is lost, every standby streams it, commits wait for a standby again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use reqwest::Method;
use serde_json::json;

use crate::pg::{commits_wait, db_nodes, sole_primary, sql, streams_from};
use crate::{Cluster, eventually};

pub const LONG: Duration = Duration::from_secs(120);

/// Writes todos through a load balancer all along, remembering each one
/// the webapp acknowledged.
pub struct Writer {
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(c: &Cluster, lb: &str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let url = c.lb(lb, "/todos");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let n = Arc::new(AtomicU64::new(0));
        let task = {
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let title = format!("ha-{}", n.fetch_add(1, Ordering::Relaxed));
                    let ok = http
                        .post(&url)
                        .json(&json!({ "title": title }))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        acked.lock().expect("lock").push(title);
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        Writer { acked, stop, task }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits until `more` further writes are acknowledged.
    pub async fn progresses(&self, what: &str, more: usize) -> anyhow::Result<()> {
        let target = self.count() + more;
        eventually(what, LONG, || async {
            Ok((self.count() >= target).then_some(()))
        })
        .await
    }

    pub fn acked(&self) -> Vec<String> {
        self.acked.lock().expect("lock").clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// Every acknowledged write is on `node`.
pub async fn none_lost(c: &Cluster, node: &str, acked: &[String]) -> anyhow::Result<()> {
    let stored: BTreeSet<String> = sql(c, node, "SELECT title FROM todos")
        .await?
        .lines()
        .map(String::from)
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|t| !stored.contains(*t)).collect();
    if !missing.is_empty() {
        bail!(
            "{} of {} acknowledged writes are missing on {node}, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
    Ok(())
}

/// After a fault: one primary, writes flow again, nothing acknowledged is
/// lost, and every other db node streams from the primary with all of it.
pub async fn settled(c: &Cluster, w: &Writer, what: &str) -> anyhow::Result<String> {
    w.progresses(&format!("writes to resume after {what}"), 20)
        .await?;
    let primary = eventually(&format!("one primary after {what}"), LONG, || async {
        Ok(Some(sole_primary(c).await?))
    })
    .await?;
    none_lost(c, &primary, &w.acked()).await?;
    for node in db_nodes(c).into_iter().filter(|n| *n != primary) {
        eventually(
            &format!("{node} to stream from {primary} after {what}"),
            LONG,
            || async { Ok(streams_from(c, &node, &primary).await?.then_some(())) },
        )
        .await?;
        let acked = w.acked();
        eventually(
            &format!("{node} to have every acknowledged write"),
            LONG,
            || async { Ok(none_lost(c, &node, &acked).await.ok()) },
        )
        .await?;
    }
    // Commits wait for a standby again (sync mode's fallback is over), so
    // the next fault finds the cluster in its steady state.
    eventually(
        &format!("commits on {primary} to wait for a standby"),
        LONG,
        || async { Ok(commits_wait(c, &primary).await?.then_some(())) },
    )
    .await?;
    // Still exactly one.
    assert_eq!(sole_primary(c).await?, primary, "{what}: the primary moved");
    eprintln!(
        "{what}: {primary} is primary, {} writes acknowledged, none lost",
        w.count()
    );
    Ok(primary)
}

pub fn other(c: &Cluster, node: &str) -> String {
    db_nodes(c)
        .into_iter()
        .find(|n| n != node)
        .expect("a second db node")
}

/// Asks for a switchover and follows its order to the end. While the
/// control plane's view (heartbeats, every few seconds) or the primary's own
/// does not yet show `to` as a caught-up standby, the request or the order
/// is refused, and it is asked again, as an operator would.
pub async fn switchover(c: &Cluster, to: &str) -> anyhow::Result<()> {
    eventually(&format!("a switchover to {to}"), LONG, || async {
        let res = c
            .api(Method::POST, "/db/switchover")
            .await
            .json(&json!({ "to": to }))
            .send()
            .await?;
        let status = res.status();
        let body = res.text().await?;
        match status.as_u16() {
            202 => {}
            409 => bail!("409 {body}"),
            _ => panic!("switchover to {to}: {status} {body}"),
        }
        let accepted: serde_json::Value = serde_json::from_str(&body)?;
        let from = accepted["from"].as_str().unwrap_or_default().to_string();
        let seq = accepted["seq"].as_i64().unwrap_or_default();
        let result = eventually("the switchover order's result", LONG, || async {
            let orders: Vec<serde_json::Value> = c
                .api(Method::GET, &format!("/nodes/{from}/orders"))
                .await
                .send()
                .await?
                .json()
                .await?;
            Ok(orders
                .into_iter()
                .find(|o| o["seq"] == seq)
                .filter(|o| o["status"] == "applied" || o["status"] == "failed"))
        })
        .await?;
        eprintln!(
            "switchover {from} -> {to}: {} {}",
            result["status"], result["result"]
        );
        Ok((result["status"] == "applied").then_some(()))
    })
    .await
}
