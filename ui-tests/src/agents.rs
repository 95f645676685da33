//! Node agents simulated through the server's real agent endpoints:
//! enroll with a secret minted for each node, take orders, report results, send
//! heartbeats with an observed state and ship log lines. A test moves a
//! node step by step, or marks it live to have a background loop apply
//! its orders and keep its heartbeats going, as a healthy agent would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use corral_proto::{
    EnrollResponse, Heartbeat, ObservedState, OrderOutcome, OrderResult, PollResponse,
    ReplicationRole, ReplicationStatus, Role, ServiceState, ServiceStatus, TopologyUpdate,
    WorkOrder,
};
use serde_json::json;

use crate::server::Server;

#[derive(Default)]
struct Known {
    /// Agent token per enrolled node.
    tokens: HashMap<String, String>,
    roles: HashMap<String, Role>,
    applied: HashMap<String, i64>,
    /// Nodes the background loop keeps going.
    live: HashSet<String>,
}

pub struct Agents {
    http: reqwest::Client,
    url: String,
    admin: String,
    known: Mutex<Known>,
}

impl Agents {
    pub fn new(server: &Server) -> Arc<Agents> {
        Arc::new(Agents {
            http: reqwest::Client::new(),
            url: server.url.clone(),
            admin: server.admin_token.clone(),
            known: Mutex::default(),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token(&self, node: &str) -> anyhow::Result<String> {
        self.known()
            .tokens
            .get(node)
            .cloned()
            .with_context(|| format!("{node} has not enrolled"))
    }

    /// The seed topology: two web and two db nodes besides adm1.
    pub async fn seed(&self) -> anyhow::Result<()> {
        let res = self
            .http
            .put(format!("{}/api/v1/topology", self.url))
            .bearer_auth(&self.admin)
            .json(&TopologyUpdate::seed())
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("PUT /topology: {} {}", res.status(), res.text().await?);
        }
        Ok(())
    }

    pub async fn enroll(&self, node: &str) -> anyhow::Result<()> {
        let res = self
            .http
            .post(format!("{}/api/v1/nodes/{node}/enroll-secret", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!(
                "minting {node}'s secret: {} {}",
                res.status(),
                res.text().await?
            );
        }
        let minted: corral_proto::EnrollSecret = res.json().await?;
        let res = self
            .http
            .post(format!("{}/api/v1/agents/enroll", self.url))
            .json(&json!({"node": node, "secret": minted.secret}))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("enrolling {node}: {} {}", res.status(), res.text().await?);
        }
        let body: EnrollResponse = res.json().await?;
        let mut known = self.known();
        known.tokens.insert(node.into(), body.token);
        known.roles.insert(node.into(), body.role);
        Ok(())
    }

    /// Takes the node's new orders and reports each with the outcome
    /// `decide` gives it; returns how many were reported.
    pub async fn apply_orders(
        &self,
        node: &str,
        decide: impl Fn(&WorkOrder) -> Result<String, String>,
    ) -> anyhow::Result<usize> {
        let token = self.token(node)?;
        let after = self.known().applied.get(node).copied().unwrap_or(0);
        let res = self
            .http
            .get(format!(
                "{}/api/v1/agents/{node}/orders?after={after}&wait=0s",
                self.url
            ))
            .bearer_auth(&token)
            .send()
            .await?;
        if res.status() == 404 {
            return Ok(0); // removed meanwhile
        }
        if !res.status().is_success() {
            bail!("polling {node}: {} {}", res.status(), res.text().await?);
        }
        let poll: PollResponse = res.json().await?;
        let mut reported = 0;
        for order in poll.orders {
            let (outcome, message) = match decide(&order.payload) {
                Ok(m) => (OrderOutcome::Applied, m),
                Err(m) => (OrderOutcome::Failed, m),
            };
            let res = self
                .http
                .post(format!(
                    "{}/api/v1/agents/{node}/orders/{}/result",
                    self.url, order.seq
                ))
                .bearer_auth(&token)
                .json(&OrderResult { outcome, message })
                .send()
                .await?;
            // An applied drain removes the node: its token goes with it.
            if !res.status().is_success() && res.status() != 404 {
                bail!(
                    "reporting {node} order {}: {} {}",
                    order.seq,
                    res.status(),
                    res.text().await?
                );
            }
            reported += 1;
            if outcome == OrderOutcome::Applied {
                self.known().applied.insert(node.into(), order.seq);
            }
            if matches!(order.payload, WorkOrder::Drain) {
                let mut known = self.known();
                known.live.remove(node);
                known.tokens.remove(node);
                break;
            }
        }
        Ok(reported)
    }

    /// What a healthy node of `role` runs.
    fn observed(&self, node: &str, role: Role) -> ObservedState {
        let running = |name: &str, detail: &str| ServiceStatus {
            name: name.into(),
            state: ServiceState::Running,
            pid: Some(4242),
            restarts: 0,
            version: None,
            detail: (!detail.is_empty()).then(|| detail.into()),
        };
        let (services, replication) = match role {
            Role::Adm => (vec![running("consul", "server, ui on :8500")], None),
            Role::Restore => (vec![running("consul", "")], None),
            Role::Web => (
                vec![
                    running("consul", ""),
                    running("nginx", ""),
                    running("todomvc", "passing"),
                ],
                None,
            ),
            Role::Db => {
                let primary = node == "pg1";
                (
                    vec![running("consul", ""), running("postgres", "")],
                    Some(ReplicationStatus {
                        role: if primary {
                            ReplicationRole::Primary
                        } else {
                            ReplicationRole::Replica
                        },
                        lag_bytes: (!primary).then_some(0),
                        timeline: Some(1),
                        ..ReplicationStatus::new(ReplicationRole::Replica)
                    }),
                )
            }
        };
        ObservedState {
            agent_version: corral_proto::VERSION.into(),
            applied_seq: self.known().applied.get(node).copied().unwrap_or(0),
            services,
            replication,
            metrics: None,
        }
    }

    pub async fn heartbeat(&self, node: &str) -> anyhow::Result<()> {
        let token = self.token(node)?;
        let role = self.known().roles[node];
        let res = self
            .http
            .post(format!("{}/api/v1/agents/{node}/heartbeat", self.url))
            .bearer_auth(&token)
            .json(&Heartbeat {
                observed: self.observed(node, role),
            })
            .send()
            .await?;
        if !res.status().is_success() && res.status() != 404 {
            bail!("heartbeat {node}: {} {}", res.status(), res.text().await?);
        }
        Ok(())
    }

    /// Sends samples of one metric, `every` seconds apart up to now (an
    /// agent sends one every 10 s), at most 100.
    pub async fn send_metric(
        &self,
        node: &str,
        name: &str,
        every: i64,
        values: &[f64],
    ) -> anyhow::Result<()> {
        let token = self.token(node)?;
        let now = chrono::Utc::now().timestamp();
        let n = values.len() as i64;
        let samples: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"at": now - every * (n - 1 - i as i64), "values": {name: v}}))
            .collect();
        let res = self
            .http
            .post(format!("{}/api/v1/agents/{node}/metrics", self.url))
            .bearer_auth(&token)
            .json(&json!({ "samples": samples }))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("metrics {node}: {} {}", res.status(), res.text().await?);
        }
        Ok(())
    }

    pub async fn ship_logs(&self, node: &str, service: &str, lines: &[&str]) -> anyhow::Result<()> {
        let token = self.token(node)?;
        let res = self
            .http
            .post(format!("{}/api/v1/agents/{node}/logs", self.url))
            .bearer_auth(&token)
            .json(&json!({"service": service, "lines": lines}))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("logs {node}: {} {}", res.status(), res.text().await?);
        }
        Ok(())
    }

    /// Plays the db agent taking backup `id` on `node`: uploads a small
    /// base.tar with its checksum, then reports the backup done.
    pub async fn finish_backup(&self, node: &str, id: i64) -> anyhow::Result<()> {
        use sha2::Digest;
        let token = self.token(node)?;
        let data: &'static [u8] = b"a base backup";
        let sha = hex::encode(sha2::Sha256::digest(data));
        let res = self
            .http
            .put(format!(
                "{}/api/v1/agents/{node}/backups/{id}/files/base.tar",
                self.url
            ))
            .bearer_auth(&token)
            .header("x-content-sha256", &sha)
            .body(data)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("upload {node}: {} {}", res.status(), res.text().await?);
        }
        let res = self
            .http
            .post(format!(
                "{}/api/v1/agents/{node}/backups/{id}/report",
                self.url
            ))
            .bearer_auth(&token)
            .json(&json!({
                "files": [{"name": "base.tar", "size": data.len(), "sha256": sha}],
                "wal_start_lsn": "0/2000028", "wal_end_lsn": "0/2000100", "timeline": 1,
            }))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("report {node}: {} {}", res.status(), res.text().await?);
        }
        Ok(())
    }

    /// Enrolls, applies every order and reports healthy, then keeps going.
    pub async fn bring_up(&self, node: &str) -> anyhow::Result<()> {
        self.enroll(node).await?;
        self.apply_orders(node, |_| Ok("done".into())).await?;
        self.heartbeat(node).await?;
        self.known().live.insert(node.into());
        Ok(())
    }

    pub fn set_live(&self, node: &str) {
        self.known().live.insert(node.into());
    }

    /// The background loop: every live node applies its new orders (all
    /// succeed) and sends a heartbeat, every 500 ms, until dropped.
    pub fn keep_alive(self: &Arc<Self>) -> KeepAlive {
        let agents = self.clone();
        KeepAlive(tokio::spawn(async move {
            loop {
                let live: Vec<String> = agents.known().live.iter().cloned().collect();
                for node in live {
                    let step = async {
                        agents.apply_orders(&node, |_| Ok("done".into())).await?;
                        if agents.known().live.contains(&node) {
                            agents.heartbeat(&node).await?;
                        }
                        anyhow::Ok(())
                    };
                    if let Err(e) = step.await {
                        eprintln!("simulated agent {node}: {e:#}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }))
    }
}

/// Stops the background loop when dropped.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}
