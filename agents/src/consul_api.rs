//! The local Consul agent's HTTP API, the parts the drivers use: service
//! registration, health (with blocking queries), checks, sessions and KV.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("consul unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("consul answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// A passing (or any) instance of a service, as the health API lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance {
    pub node: String,
    /// Always an IP address: an entry whose address is anything else is
    /// dropped (and logged) before it can reach nginx.conf or a connection
    /// string.
    pub address: IpAddr,
    pub port: u16,
    pub tags: Vec<String>,
}

#[derive(Clone)]
pub struct ConsulApi {
    base: String,
    http: reqwest::Client,
    /// The node's ACL token, sent with every call (`X-Consul-Token`) once
    /// the Consul order has given one. Shared by every clone.
    token: Arc<RwLock<Option<String>>>,
    /// The Consul servers' addresses (the Consul order's `retry_join`):
    /// where [`ConsulApi::kv_get_any`] asks when the local agent is down.
    servers: Arc<RwLock<Vec<String>>>,
}

impl ConsulApi {
    /// The plain-HTTP client it uses, for other calls to the node's own
    /// services (the metrics sampler's): one client, one connection pool.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn new(address: &str) -> Self {
        Self {
            base: format!("http://{address}:{}", corral_proto::ports::CONSUL_HTTP),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(90))
                .build()
                .expect("an HTTP client without TLS builds"),
            token: Arc::default(),
            servers: Arc::default(),
        }
    }

    /// The same API on the agent at `address` (same client and token).
    fn at(&self, address: &str) -> Self {
        Self {
            base: format!("http://{address}:{}", corral_proto::ports::CONSUL_HTTP),
            ..self.clone()
        }
    }

    pub fn set_servers(&self, servers: Vec<String>) {
        *self.servers.write().expect("servers lock") = servers;
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sets the token every later call carries.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().expect("token lock") = token;
    }

    pub fn token(&self) -> Option<String> {
        self.token.read().expect("token lock").clone()
    }

    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, ConsulError> {
        let token = self.token();
        self.call_as(req, timeout, token.as_deref()).await
    }

    async fn call_as(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
        token: Option<&str>,
    ) -> Result<reqwest::Response, ConsulError> {
        let req = match token {
            Some(t) => req.header("X-Consul-Token", t),
            None => req,
        };
        let res = req.timeout(timeout).send().await?;
        if res.status().is_success() {
            Ok(res)
        } else {
            let status = res.status();
            let mut body = res.text().await.unwrap_or_default();
            body.truncate(500);
            Err(ConsulError::Status { status, body })
        }
    }

    fn short() -> Duration {
        Duration::from_secs(5)
    }

    /// For the leader-election loop, which must notice a hung agent fast.
    fn fast() -> Duration {
        Duration::from_millis(1500)
    }

    /// Whether the agent answers at all.
    pub async fn alive(&self) -> bool {
        self.call(
            self.http.get(format!("{}/v1/agent/self", self.base)),
            Self::short(),
        )
        .await
        .is_ok()
    }

    /// The cluster leader's address, empty while there is none.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let res = self
            .call(
                self.http.get(format!("{}/v1/status/leader", self.base)),
                Self::short(),
            )
            .await?;
        Ok(res.json::<String>().await.unwrap_or_default())
    }

    pub async fn register_service(&self, definition: &Value) -> Result<(), ConsulError> {
        self.call(
            self.http
                .put(format!("{}/v1/agent/service/register", self.base))
                .json(definition),
            Self::short(),
        )
        .await
        .map(drop)
    }

    /// Re-reads the agent's configuration files (service definitions).
    pub async fn reload(&self) -> Result<(), ConsulError> {
        self.call(
            self.http.put(format!("{}/v1/agent/reload", self.base)),
            Self::short(),
        )
        .await
        .map(drop)
    }

    pub async fn deregister_service(&self, id: &str) -> Result<(), ConsulError> {
        self.call(
            self.http
                .put(format!("{}/v1/agent/service/deregister/{id}", self.base)),
            Self::short(),
        )
        .await
        .map(drop)
    }

    /// The tags a locally registered service has, `None` when not registered.
    pub async fn local_service_tags(&self, id: &str) -> Result<Option<Vec<String>>, ConsulError> {
        match self
            .call(
                self.http
                    .get(format!("{}/v1/agent/service/{id}", self.base)),
                Self::short(),
            )
            .await
        {
            Ok(res) => {
                let v: Value = res.json().await?;
                Ok(Some(
                    v["Tags"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|t| t.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                ))
            }
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The local agent's checks: check id -> (status, output).
    pub async fn local_checks(&self) -> Result<HashMap<String, (String, String)>, ConsulError> {
        let res = self
            .call(
                self.http.get(format!("{}/v1/agent/checks", self.base)),
                Self::short(),
            )
            .await?;
        let v: HashMap<String, Value> = res.json().await?;
        Ok(v.into_iter()
            .map(|(id, c)| {
                (
                    id,
                    (
                        c["Status"].as_str().unwrap_or("").to_string(),
                        c["Output"].as_str().unwrap_or("").to_string(),
                    ),
                )
            })
            .collect())
    }

    /// Instances of `service` (only passing ones when `passing`), optionally
    /// with `tag`; a blocking query when `index` is given. Returns the new
    /// index with the instances, sorted.
    pub async fn health(
        &self,
        service: &str,
        tag: Option<&str>,
        passing: bool,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(u64, Vec<Instance>), ConsulError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if passing {
            query.push(("passing", "1".into()));
        }
        if let Some(t) = tag {
            query.push(("tag", t.into()));
        }
        if let Some(i) = index {
            query.push(("index", i.to_string()));
            query.push(("wait", format!("{}s", wait.as_secs().max(1))));
        }
        let res = self
            .call(
                self.http
                    .get(format!("{}/v1/health/service/{service}", self.base))
                    .query(&query),
                wait + Self::short(),
            )
            .await?;
        let new_index = res
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let entries: Vec<HealthEntry> = res.json().await?;
        let mut instances: Vec<Instance> = entries
            .into_iter()
            .filter_map(|e| instance(service, e))
            .collect();
        instances.sort();
        Ok((new_index, instances))
    }

    /// The names of the nodes in the catalog (a node that left is gone; one
    /// that failed stays until Consul reaps it).
    pub async fn catalog_nodes(&self) -> Result<Vec<String>, ConsulError> {
        let res = self
            .call(
                self.http.get(format!("{}/v1/catalog/nodes", self.base)),
                Self::short(),
            )
            .await?;
        let v: Vec<Value> = res.json().await?;
        Ok(v.iter()
            .filter_map(|n| n["Node"].as_str().map(String::from))
            .collect())
    }

    /// Creates a session tied to `checks` (it dies when one goes critical).
    pub async fn create_session(
        &self,
        name: &str,
        checks: &[String],
        lock_delay: Duration,
    ) -> Result<String, ConsulError> {
        let body = serde_json::json!({
            "Name": name,
            "Checks": checks,
            "LockDelay": format!("{}s", lock_delay.as_secs()),
            "Behavior": "release",
        });
        let res = self
            .call(
                self.http
                    .put(format!("{}/v1/session/create", self.base))
                    .json(&body),
                Self::short(),
            )
            .await?;
        let v: Value = res.json().await?;
        Ok(v["ID"].as_str().unwrap_or_default().to_string())
    }

    /// Whether session `id` still exists.
    pub async fn session_alive(&self, id: &str) -> Result<bool, ConsulError> {
        let res = self
            .call(
                self.http.get(format!("{}/v1/session/info/{id}", self.base)),
                Self::short(),
            )
            .await?;
        let v: Value = res.json().await?;
        Ok(v.as_array().is_some_and(|a| !a.is_empty()))
    }

    pub async fn destroy_session(&self, id: &str) -> Result<(), ConsulError> {
        self.call(
            self.http
                .put(format!("{}/v1/session/destroy/{id}", self.base)),
            Self::short(),
        )
        .await
        .map(drop)
    }

    /// Tries to take the lock on `key` with `session`; true when held.
    pub async fn acquire(
        &self,
        key: &str,
        session: &str,
        value: &str,
    ) -> Result<bool, ConsulError> {
        let res = self
            .call(
                self.http
                    .put(format!("{}/v1/kv/{key}", self.base))
                    .query(&[("acquire", session)])
                    .body(value.to_string()),
                Self::short(),
            )
            .await?;
        Ok(res.json::<bool>().await.unwrap_or(false))
    }

    /// Releases the lock `session` holds on `key` (no lock-delay: a planned
    /// hand-over, unlike a session that dies).
    pub async fn release(&self, key: &str, session: &str) -> Result<bool, ConsulError> {
        let res = self
            .call(
                self.http
                    .put(format!("{}/v1/kv/{key}", self.base))
                    .query(&[("release", session)]),
                Self::fast(),
            )
            .await?;
        Ok(res.json::<bool>().await.unwrap_or(false))
    }

    /// The value and lock session of `key`, `None` when it does not exist.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, ConsulError> {
        Ok(self.kv_list_inner(key, false).await?.into_iter().next())
    }

    /// [`ConsulApi::kv_get`] from the local agent or, when it does not
    /// answer at all, from the first Consul server that does; says which
    /// (true: the local agent). The KV store lives on the servers: a local
    /// agent that is restarting need not look like a lost leader lock.
    pub async fn kv_get_any(&self, key: &str) -> Result<(Option<KvEntry>, bool), ConsulError> {
        let local = self.kv_get(key).await;
        if !matches!(local, Err(ConsulError::Unreachable(_))) {
            return local.map(|entry| (entry, true));
        }
        let servers = self.servers.read().expect("servers lock").clone();
        for server in servers {
            let remote = self.at(&server);
            if remote.base == self.base {
                continue;
            }
            if let Ok(entry) = remote.kv_get(key).await {
                return Ok((entry, false));
            }
        }
        local.map(|entry| (entry, true))
    }

    /// Every key under `prefix`.
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<KvEntry>, ConsulError> {
        self.kv_list_inner(prefix, true).await
    }

    async fn kv_list_inner(&self, key: &str, recurse: bool) -> Result<Vec<KvEntry>, ConsulError> {
        let mut req = self.http.get(format!("{}/v1/kv/{key}", self.base));
        if recurse {
            req = req.query(&[("recurse", "true")]);
        }
        match self.call(req, Self::fast()).await {
            Ok(res) => {
                let raw: Vec<RawKv> = res.json().await?;
                Ok(raw.into_iter().map(RawKv::decode).collect())
            }
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    pub async fn kv_put(&self, key: &str, value: &str) -> Result<(), ConsulError> {
        self.call(
            self.http
                .put(format!("{}/v1/kv/{key}", self.base))
                .body(value.to_string()),
            Self::fast(),
        )
        .await
        .map(drop)
    }

    pub async fn kv_delete(&self, key: &str) -> Result<(), ConsulError> {
        self.call(
            self.http.delete(format!("{}/v1/kv/{key}", self.base)),
            Self::fast(),
        )
        .await
        .map(drop)
    }

    /// Whether `token` is a token Consul knows (and ACLs are past their
    /// start-up legacy mode).
    pub async fn acl_token_valid(&self, token: &str) -> Result<(), ConsulError> {
        self.call_as(
            self.http.get(format!("{}/v1/acl/token/self", self.base)),
            Self::short(),
            Some(token),
        )
        .await
        .map(drop)
    }

    /// The session holding the lock on `key`, if any.
    pub async fn lock_holder(&self, key: &str) -> Result<Option<String>, ConsulError> {
        match self
            .call(
                self.http.get(format!("{}/v1/kv/{key}", self.base)),
                Self::short(),
            )
            .await
        {
            Ok(res) => {
                let v: Value = res.json().await?;
                Ok(v[0]["Session"].as_str().map(String::from))
            }
            Err(ConsulError::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// One Consul KV entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    /// The session holding a lock on it.
    pub session: Option<String>,
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
    #[serde(rename = "Session")]
    session: Option<String>,
}

impl RawKv {
    fn decode(self) -> KvEntry {
        use base64::Engine;
        let value = self
            .value
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        KvEntry {
            key: self.key,
            value,
            session: self.session,
        }
    }
}

/// The instance a health entry describes, if its address is an IP address
/// and its port not 0.
fn instance(service: &str, e: HealthEntry) -> Option<Instance> {
    let text = if e.service.address.is_empty() {
        &e.node.address
    } else {
        &e.service.address
    };
    match text.parse::<IpAddr>() {
        Ok(address) if e.service.port != 0 => Some(Instance {
            address,
            node: e.node.node,
            port: e.service.port,
            tags: e.service.tags.unwrap_or_default(),
        }),
        _ => {
            tracing::warn!(
                service,
                node = %e.node.node,
                address = %text,
                port = e.service.port,
                "ignoring an instance whose address is not an IP address and port"
            );
            None
        }
    }
}

#[derive(Deserialize)]
struct HealthEntry {
    #[serde(rename = "Node")]
    node: HealthNode,
    #[serde(rename = "Service")]
    service: HealthService,
}

#[derive(Deserialize)]
struct HealthNode {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Address")]
    address: String,
}

#[derive(Deserialize)]
struct HealthService {
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Tags")]
    tags: Option<Vec<String>>,
}

#[cfg(test)]
mod address_tests {
    use super::*;

    fn entry(node_address: &str, service_address: &str, port: u16) -> HealthEntry {
        HealthEntry {
            node: HealthNode {
                node: "web1".into(),
                address: node_address.into(),
            },
            service: HealthService {
                address: service_address.into(),
                port,
                tags: None,
            },
        }
    }

    #[test]
    fn only_ip_addresses_and_real_ports_become_instances() {
        let ok = instance("todomvc", entry("10.0.0.1", "192.168.11.21", 8080)).expect("valid");
        assert_eq!(ok.address, "192.168.11.21".parse::<IpAddr>().unwrap());
        // No service address: the node's.
        let node = instance("todomvc", entry("10.0.0.1", "", 8080)).expect("valid");
        assert_eq!(node.address, "10.0.0.1".parse::<IpAddr>().unwrap());
        let v6 = instance("todomvc", entry("10.0.0.1", "fd00::21", 8080)).expect("valid");
        assert_eq!(v6.address, "fd00::21".parse::<IpAddr>().unwrap());
        for forged in [
            "1.1.1.1:1; } server { listen 4444",
            "web1.example",
            "127.0.0.1 ",
            "127.0.0.1;",
            "",
        ] {
            assert!(
                instance("todomvc", entry("", forged, 8080)).is_none(),
                "{forged:?} was accepted"
            );
        }
        assert!(instance("todomvc", entry("10.0.0.1", "", 0)).is_none());
    }
}
