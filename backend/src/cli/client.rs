//! The REST client behind the CLI: every command goes through the API, never
//! to the database. Given several servers (which share one database), a
//! request that cannot connect or gets a 5xx goes to the next one after a
//! short random pause, and the client stays with whichever answered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral_proto::{
    Backup, CreateNode, EnrollSecret, ErrorBody, Event, LogLine, Node, Order, RestoreAccepted,
    RestoreRequest, SwitchoverAccepted, SwitchoverRequest, Topology, TopologyChange,
    TopologyUpdate,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach corral at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl ClientError {
    /// The server understood and said no (4xx): asking again will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Api { status, .. } if (400..500).contains(status))
    }
}

pub struct Client {
    /// The servers, tried in turn from `current`.
    bases: Vec<String>,
    current: AtomicUsize,
    token: Option<String>,
    http: reqwest::Client,
}

/// Which of a node's log lines `corral logs` wants.
#[derive(Debug, Clone, Copy)]
pub struct LogQuery<'a> {
    pub service: Option<&'a str>,
    pub grep: Option<&'a str>,
    pub limit: u64,
}

/// The result of removing a node.
pub enum Removed {
    Draining(Box<Node>),
    Gone,
}

impl Client {
    /// A client of the servers at `bases` (at least one), trusting the
    /// cluster CA in `ca_pem` (and nothing else) when given one.
    pub fn new(bases: &[String], token: Option<String>, ca_pem: Option<&[u8]>) -> Self {
        let builder = crate::tls::client_builder(ca_pem).unwrap_or_else(|e| {
            eprintln!("warning: {e}");
            reqwest::Client::builder()
        });
        Self {
            bases: bases
                .iter()
                .map(|b| b.trim_end_matches('/').to_string())
                .collect(),
            current: AtomicUsize::new(0),
            token,
            http: builder
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    fn base(&self) -> &str {
        let at = self.current.load(Ordering::Relaxed) % self.bases.len().max(1);
        self.bases.get(at).map_or("", String::as_str)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// Sends to the current server, moving on to the next ones when it
    /// cannot be reached or answers 5xx; the last answer or failure counts.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let url = self.base().to_string();
        let req = req
            .build()
            .map_err(|source| ClientError::Unreachable { url, source })?;
        let mut path = req.url().path().to_string();
        if let Some(query) = req.url().query() {
            path.push('?');
            path.push_str(query);
        }
        let start = self.current.load(Ordering::Relaxed);
        let tries = self.bases.len().max(1);
        let mut outcome = None;
        for i in 0..tries {
            let at = (start + i) % tries;
            let base = self.bases.get(at).map_or("", String::as_str);
            if i > 0 {
                // Clients of a server that died all move at once: spread them.
                tokio::time::sleep(Duration::from_millis(rand::random_range(50..300))).await;
            }
            let Some(mut attempt) = req.try_clone() else {
                break;
            };
            match reqwest::Url::parse(&format!("{base}{path}")) {
                Ok(target) => *attempt.url_mut() = target,
                Err(_) => continue,
            }
            let result = self.http.execute(attempt).await;
            let moves_on = match &result {
                Ok(res) => res.status().is_server_error(),
                Err(_) => true,
            };
            outcome = Some((base.to_string(), result));
            if !moves_on {
                self.current.store(at, Ordering::Relaxed);
                break;
            }
        }
        let (url, result) = outcome.ok_or_else(|| ClientError::Protocol {
            url: self.base().to_string(),
            detail: "no server to send to".into(),
        })?;
        let res = result.map_err(|source| ClientError::Unreachable { url, source })?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status,
                code: body.error,
                message: body.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: "http".into(),
                message: if text.is_empty() {
                    "no details".into()
                } else {
                    text
                },
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let res = self.send(req).await?;
        let url = res.url().to_string();
        res.json().await.map_err(|e| ClientError::Protocol {
            url,
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request(Method::GET, path)).await
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(method, path).json(body)).await
    }

    pub async fn topology(&self) -> Result<Topology, ClientError> {
        self.get("/api/v1/topology").await
    }

    pub async fn set_topology(&self, spec: &TopologyUpdate) -> Result<TopologyChange, ClientError> {
        self.send_json(Method::PUT, "/api/v1/topology", spec).await
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/api/v1/nodes").await
    }

    pub async fn node(&self, name: &str) -> Result<Node, ClientError> {
        self.get(&format!("/api/v1/nodes/{name}")).await
    }

    pub async fn add_node(&self, req: &CreateNode) -> Result<Node, ClientError> {
        self.send_json(Method::POST, "/api/v1/nodes", req).await
    }

    pub async fn remove_node(&self, name: &str, force: bool) -> Result<Removed, ClientError> {
        let req = self
            .request(Method::DELETE, &format!("/api/v1/nodes/{name}"))
            .query(&[("force", force)]);
        let res = self.send(req).await?;
        if res.status() == StatusCode::NO_CONTENT {
            return Ok(Removed::Gone);
        }
        let url = res.url().to_string();
        let node = res.json().await.map_err(|e| ClientError::Protocol {
            url,
            detail: e.to_string(),
        })?;
        Ok(Removed::Draining(Box::new(node)))
    }

    pub async fn mint_enroll_secret(&self, name: &str) -> Result<EnrollSecret, ClientError> {
        self.json(self.request(Method::POST, &format!("/api/v1/nodes/{name}/enroll-secret")))
            .await
    }

    pub async fn orders(
        &self,
        node: &str,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Order>, ClientError> {
        self.json(
            self.request(Method::GET, &format!("/api/v1/nodes/{node}/orders"))
                .query(&[("after", after.to_string()), ("limit", limit.to_string())]),
        )
        .await
    }

    pub async fn switchover(&self, to: &str) -> Result<SwitchoverAccepted, ClientError> {
        let req = SwitchoverRequest { to: to.into() };
        self.send_json(Method::POST, "/api/v1/db/switchover", &req)
            .await
    }

    pub async fn backups(&self, limit: u64) -> Result<Vec<Backup>, ClientError> {
        self.json(
            self.request(Method::GET, "/api/v1/backups")
                .query(&[("limit", limit)]),
        )
        .await
    }

    pub async fn backups_status(&self) -> Result<corral_proto::BackupsStatus, ClientError> {
        self.json(self.request(Method::GET, "/api/v1/backups/status"))
            .await
    }

    pub async fn backup_now(&self) -> Result<Backup, ClientError> {
        self.json(self.request(Method::POST, "/api/v1/backups"))
            .await
    }

    pub async fn restore(&self, req: &RestoreRequest) -> Result<RestoreAccepted, ClientError> {
        self.send_json(Method::POST, "/api/v1/db/restore", req)
            .await
    }

    /// The order `seq` of `node`, if it exists.
    pub async fn order(&self, node: &str, seq: i64) -> Result<Option<Order>, ClientError> {
        let orders = self.orders(node, seq - 1, 1).await?;
        Ok(orders.into_iter().find(|o| o.seq == seq))
    }

    pub async fn events(&self, after: Option<i64>, limit: u64) -> Result<Vec<Event>, ClientError> {
        let mut req = self
            .request(Method::GET, "/api/v1/events")
            .query(&[("limit", limit)]);
        if let Some(after) = after {
            req = req.query(&[("after", after)]);
        }
        self.json(req).await
    }

    /// A node's kept log lines: the newest `query.limit`, or with `follow`
    /// those after that seq, held by the server up to 30 s until one comes.
    pub async fn logs(
        &self,
        node: &str,
        query: LogQuery<'_>,
        follow: Option<u64>,
    ) -> Result<Vec<LogLine>, ClientError> {
        let mut req = self
            .request(Method::GET, &format!("/api/v1/nodes/{node}/logs"))
            .query(&[("limit", query.limit)]);
        if let Some(service) = query.service {
            req = req.query(&[("service", service)]);
        }
        if let Some(grep) = query.grep {
            req = req.query(&[("grep", grep)]);
        }
        if let Some(after) = follow {
            req = req.query(&[("after", after.to_string().as_str()), ("wait", "30s")]);
        }
        self.json(req).await
    }

    /// Opens the live event stream after `after` (all new events if none).
    pub async fn event_stream(&self, after: Option<i64>) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .request(Method::GET, "/api/v1/events/stream")
            .header("Accept", "text/event-stream");
        if let Some(after) = after {
            req = req.header("Last-Event-ID", after.to_string());
        }
        self.send(req).await
    }
}
