//! Keeps the cluster's Consul ACL tokens in place: one per node and the
//! webapps' read-only one ([`reconcile::consul_tokens`]), each with a policy
//! of its own, written through adm1's Consul agent (on this host: adm1 is
//! always the local provider's) with the management token. Tokens and
//! policies corral made that no node needs any more (removed nodes) are
//! deleted. Runs after every change to the nodes and every minute; retries
//! quickly while Consul has no leader yet, since new nodes wait for their
//! tokens.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::reconcile::{self, ConsulToken};
use crate::store;
use corral_proto::{Role, ports};

/// Marks the tokens and policies corral keeps, so that the ones of removed
/// nodes can be found and nothing else is touched.
const KEPT_PREFIX: &str = "corral: ";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RECHECK: Duration = Duration::from_secs(60);
/// How long a pass waits after a node change for the changes that follow.
const COALESCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("consul unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("consul answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("no admin node yet")]
    NoAdminNode,
}

/// Consul's ACL API on one agent, as the management token.
pub struct AclApi {
    base: String,
    management: String,
    http: reqwest::Client,
}

impl AclApi {
    pub fn new(address: &str, management: &str) -> Self {
        Self {
            base: format!("http://{address}:{}", ports::CONSUL_HTTP),
            management: management.to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(CALL_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, AclError> {
        let res = req
            .header("X-Consul-Token", &self.management)
            .send()
            .await?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let mut body = res.text().await.unwrap_or_default();
        body.truncate(300);
        Err(AclError::Status { status, body })
    }

    /// A read, `None` when Consul says the object does not exist (1.8
    /// answers 403 "ACL not found" for a missing policy or token, which is
    /// why the management token is checked first).
    async fn read(&self, path: &str) -> Result<Option<Value>, AclError> {
        match self
            .call(self.http.get(format!("{}{path}", self.base)))
            .await
        {
            Ok(res) => Ok(Some(res.json().await?)),
            Err(AclError::Status { status, .. })
                if status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the management token works yet (the elected server creates
    /// it, after Consul's ACLs leave their start-up legacy mode).
    pub async fn ready(&self) -> Result<(), AclError> {
        self.call(self.http.get(format!("{}/v1/acl/token/self", self.base)))
            .await
            .map(drop)
    }

    /// The (id, name, description) of every policy.
    async fn policies(&self) -> Result<Vec<(String, String, String)>, AclError> {
        let list: Vec<Value> = self
            .call(self.http.get(format!("{}/v1/acl/policies", self.base)))
            .await?
            .json()
            .await?;
        Ok(list
            .iter()
            .map(|p| {
                let field = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                (field("ID"), field("Name"), field("Description"))
            })
            .collect())
    }

    /// The (accessor, description, policy names) of every token.
    async fn tokens(&self) -> Result<Vec<(String, String, Vec<String>)>, AclError> {
        let list: Vec<Value> = self
            .call(self.http.get(format!("{}/v1/acl/tokens", self.base)))
            .await?
            .json()
            .await?;
        Ok(list
            .iter()
            .map(|t| {
                let policies = t["Policies"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter_map(|p| p["Name"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    t["AccessorID"].as_str().unwrap_or_default().to_string(),
                    t["Description"].as_str().unwrap_or_default().to_string(),
                    policies,
                )
            })
            .collect())
    }

    /// Makes Consul hold exactly `want` among the tokens and policies
    /// corral made. A policy's rules are read and compared once per process
    /// (`checked`); after that, listing is enough, since a node's rules
    /// depend only on its name and role. Returns how many tokens were
    /// written or deleted.
    pub async fn sync(
        &self,
        want: &[ConsulToken],
        checked: &mut HashSet<String>,
    ) -> Result<usize, AclError> {
        let policies = self.policies().await?;
        let tokens = self.tokens().await?;
        // Looked up by name and accessor: at 10,000 nodes a linear search
        // per wanted token would be 10^8 comparisons a pass.
        let policy_ids: HashMap<&str, &str> = policies
            .iter()
            .map(|(id, name, _)| (name.as_str(), id.as_str()))
            .collect();
        let token_policies: HashMap<&str, &[String]> = tokens
            .iter()
            .map(|(accessor, _, p)| (accessor.as_str(), p.as_slice()))
            .collect();
        let mut changed = 0;
        for t in want {
            let policy = format!("corral-{}", t.name);
            let description = format!("{KEPT_PREFIX}{}", t.name);
            let body = json!({"Name": policy, "Rules": t.rules, "Description": description});
            match policy_ids.get(policy.as_str()) {
                None => {
                    self.call(
                        self.http
                            .put(format!("{}/v1/acl/policy", self.base))
                            .json(&body),
                    )
                    .await?;
                }
                Some(id) if !checked.contains(&policy) => {
                    let current = self.read(&format!("/v1/acl/policy/{id}")).await?;
                    if current.is_some_and(|p| p["Rules"].as_str() != Some(t.rules.as_str())) {
                        self.call(
                            self.http
                                .put(format!("{}/v1/acl/policy/{id}", self.base))
                                .json(&body),
                        )
                        .await?;
                    }
                }
                Some(_) => {}
            }
            checked.insert(policy.clone());
            let existing = token_policies.get(t.accessor.as_str());
            if existing.is_some_and(|p| p.len() == 1 && p[0] == policy) {
                continue;
            }
            let body = json!({
                "AccessorID": t.accessor,
                "SecretID": t.secret,
                "Description": description,
                "Policies": [{"Name": policy}],
                "Local": false,
            });
            let url = match existing {
                Some(_) => format!("{}/v1/acl/token/{}", self.base, t.accessor),
                None => format!("{}/v1/acl/token", self.base),
            };
            self.call(self.http.put(url).json(&body)).await?;
            changed += 1;
        }
        let wanted_accessors: HashSet<&str> = want.iter().map(|t| t.accessor.as_str()).collect();
        let wanted_policies: HashSet<String> =
            want.iter().map(|t| format!("corral-{}", t.name)).collect();
        for (accessor, description, _) in &tokens {
            if description.starts_with(KEPT_PREFIX) && !wanted_accessors.contains(accessor.as_str())
            {
                tracing::info!(%accessor, %description, "deleting the consul token of a node that is gone");
                self.call(
                    self.http
                        .delete(format!("{}/v1/acl/token/{accessor}", self.base)),
                )
                .await?;
                changed += 1;
            }
        }
        for (id, name, description) in &policies {
            if description.starts_with(KEPT_PREFIX) && !wanted_policies.contains(name) {
                self.call(
                    self.http
                        .delete(format!("{}/v1/acl/policy/{id}", self.base)),
                )
                .await?;
                checked.remove(name);
            }
        }
        Ok(changed)
    }
}

/// What the last successful pass put in place: for which nodes, and when.
/// A node change that leaves the names as they were (an enrollment, a
/// heartbeat's state) then costs one narrow read, not a pass over Consul.
#[derive(Default)]
struct Kept {
    nodes: Vec<(String, Role)>,
    at: Option<Instant>,
    /// Policies whose rules were read and compared in this process.
    checked: HashSet<String>,
}

/// One pass: every token in place, the others gone. Returns how many
/// tokens were written or deleted.
async fn keep_once(cluster: &Cluster, kept: &mut Kept) -> Result<usize, AclError> {
    let rows = store::node_names(cluster.store().conn())
        .await
        .map_err(|e| AclError::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: e.to_string(),
        })?;
    let nodes: Vec<(String, Role)> = rows
        .iter()
        .filter_map(|(name, _)| Role::parse_node_name(name).map(|(role, _)| (name.clone(), role)))
        .collect();
    if kept.nodes == nodes && kept.at.is_some_and(|at| at.elapsed() < RECHECK) {
        return Ok(0);
    }
    let (_, adm_address) = rows
        .iter()
        .find(|(name, _)| matches!(Role::parse_node_name(name), Some((Role::Adm, _))))
        .ok_or(AclError::NoAdminNode)?;
    let management = &cluster.config().settings.consul_management;
    let api = AclApi::new(adm_address, management);
    api.ready().await?;
    let tokens = reconcile::consul_tokens(
        management,
        nodes.iter().map(|(n, role)| (n.as_str(), *role)),
    );
    let changed = api.sync(&tokens, &mut kept.checked).await?;
    kept.nodes = nodes;
    kept.at = Some(Instant::now());
    Ok(changed)
}

/// Runs until the cluster is dropped.
pub async fn keep(cluster: Weak<Cluster>) {
    let Some(mut changes) = cluster.upgrade().map(|c| c.subscribe_node_changes()) else {
        return;
    };
    let mut kept = Kept::default();
    // Failed passes since the last success or change: every 250 ms for the
    // first 30 s (a new cluster's Consul electing its leader while new
    // nodes wait for their tokens), then every 5 s (no Consul at all).
    let mut failures = 0u32;
    loop {
        let Some(c) = cluster.upgrade() else {
            return;
        };
        // Servers sharing a database: the leader keeps the tokens, the
        // others look again in a second whether they lead.
        let pause = if !c.is_leader() {
            crate::cluster::LEADER_RETRY
        } else {
            keep_once_paced(&c, &mut kept, &mut failures).await
        };
        drop(c);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // Changes come in bursts (10,000 enrollments): one pass
                // for all that arrive meanwhile.
                tokio::time::sleep(COALESCE).await;
                changes.borrow_and_update();
                failures = 0;
            }
        }
    }
}

/// One pass, and how long to wait before the next.
async fn keep_once_paced(c: &Cluster, kept: &mut Kept, failures: &mut u32) -> Duration {
    match keep_once(c, kept).await {
        Ok(changed) => {
            if changed > 0 {
                tracing::info!(changed, "consul ACL tokens in place");
            }
            *failures = 0;
            RECHECK
        }
        Err(e) => {
            tracing::debug!(error = %e, "consul ACL tokens pending");
            *failures += 1;
            if *failures < 120 {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            }
        }
    }
}
