//! The REST client of the UI: `fetch` with the admin token, JSON in and
//! out, and every failure turned into an [`ApiError`] whose text can be
//! shown as it is. The types are corral-proto's, the server's own.

use std::fmt;

use corral_proto::{
    Backup, BackupsStatus, CreateNode, ErrorBody, Event, LogLine, MetricName, MetricSeries, Node,
    Order, SwitchoverAccepted, SwitchoverRequest, Topology, TopologyChange, TopologyUpdate,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, Request, RequestInit, Response};

/// What went wrong with a call, in words for the person at the screen.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status; 0 when the server could not be reached at all.
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    fn network(what: impl Into<String>) -> Self {
        Self {
            status: 0,
            code: "network".into(),
            message: what.into(),
        }
    }

    pub fn is_unauthorized(&self) -> bool {
        self.status == 401
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.status == 0 {
            write!(f, "cannot reach the corral server: {}", self.message)
        } else {
            write!(f, "{} ({} {})", self.message, self.status, self.code)
        }
    }
}

fn js_text(v: &JsValue) -> String {
    v.as_string()
        .or_else(|| {
            v.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{v:?}"))
}

/// The admin token and the calls the UI makes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    token: String,
}

/// The outcome of a removal: drained first, or gone at once.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    Draining(Box<Node>),
    Removed,
}

impl Client {
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
        }
    }

    /// Starts a request; the response is returned whatever its status.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        signal: Option<&AbortSignal>,
    ) -> Result<Response, ApiError> {
        let init = RequestInit::new();
        init.set_method(method);
        if let Some(body) = &body {
            init.set_body(&JsValue::from_str(body));
        }
        if let Some(signal) = signal {
            init.set_signal(Some(signal));
        }
        let request = Request::new_with_str_and_init(path, &init)
            .map_err(|e| ApiError::network(js_text(&e)))?;
        let headers = request.headers();
        let set = |name: &str, value: &str| {
            headers
                .set(name, value)
                .map_err(|e| ApiError::network(js_text(&e)))
        };
        set("Authorization", &format!("Bearer {}", self.token))?;
        set("Accept", "application/json")?;
        if body.is_some() {
            set("Content-Type", "application/json")?;
        }
        let window = web_sys::window().ok_or_else(|| ApiError::network("no window"))?;
        let response = JsFuture::from(window.fetch_with_request(&request))
            .await
            .map_err(|e| ApiError::network(js_text(&e)))?;
        response
            .dyn_into::<Response>()
            .map_err(|e| ApiError::network(js_text(&e)))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Option<T>), ApiError> {
        self.call_until(method, path, body, None).await
    }

    /// [`Self::call`] that `signal` can abandon (a long poll of a page that
    /// went away).
    async fn call_until<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        signal: Option<&AbortSignal>,
    ) -> Result<(u16, Option<T>), ApiError> {
        let response = self.send(method, path, body, signal).await?;
        let status = response.status();
        let text = match response.text() {
            Ok(promise) => JsFuture::from(promise)
                .await
                .map_err(|e| ApiError::network(js_text(&e)))?
                .as_string()
                .unwrap_or_default(),
            Err(e) => return Err(ApiError::network(js_text(&e))),
        };
        if !response.ok() {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => ApiError {
                    status,
                    code: body.error,
                    message: body.message,
                },
                Err(_) => ApiError {
                    status,
                    code: "http".into(),
                    message: format!(
                        "{} {}",
                        response.status_text(),
                        text.chars().take(200).collect::<String>()
                    ),
                },
            });
        }
        if text.is_empty() {
            return Ok((status, None));
        }
        serde_json::from_str(&text)
            .map(|v| (status, Some(v)))
            .map_err(|e| ApiError {
                status,
                code: "bad_response".into(),
                message: format!("the server's answer was not understood: {e}"),
            })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let (status, body) = self.call("GET", path, None).await?;
        body.ok_or_else(|| ApiError {
            status,
            code: "bad_response".into(),
            message: "the server answered with an empty body".into(),
        })
    }

    async fn with_body<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let json = serde_json::to_string(body).map_err(|e| ApiError::network(e.to_string()))?;
        let (status, body) = self.call(method, path, Some(json)).await?;
        body.ok_or_else(|| ApiError {
            status,
            code: "bad_response".into(),
            message: "the server answered with an empty body".into(),
        })
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ApiError> {
        self.get("/api/v1/nodes").await
    }

    pub async fn node(&self, name: &str) -> Result<Node, ApiError> {
        self.get(&format!("/api/v1/nodes/{name}")).await
    }

    pub async fn add_node(&self, spec: &CreateNode) -> Result<Node, ApiError> {
        self.with_body("POST", "/api/v1/nodes", spec).await
    }

    pub async fn remove_node(&self, name: &str) -> Result<Removal, ApiError> {
        let (_, body) = self
            .call::<Node>("DELETE", &format!("/api/v1/nodes/{name}"), None)
            .await?;
        Ok(body.map_or(Removal::Removed, |node| Removal::Draining(Box::new(node))))
    }

    pub async fn orders(&self, node: &str) -> Result<Vec<Order>, ApiError> {
        // The newest orders matter most; a node rarely has more than a few.
        self.get(&format!("/api/v1/nodes/{node}/orders?limit=1000"))
            .await
    }

    /// The orders of a node after `after`.
    pub async fn orders_after(&self, node: &str, after: i64) -> Result<Vec<Order>, ApiError> {
        self.get(&format!(
            "/api/v1/nodes/{node}/orders?after={after}&limit=1000"
        ))
        .await
    }

    pub async fn logs(&self, node: &str) -> Result<Vec<LogLine>, ApiError> {
        self.get(&format!("/api/v1/nodes/{node}/logs?limit=500"))
            .await
    }

    /// A node's log lines after `after`; the server holds the request up to
    /// 25 s until one arrives (none when the wait ended).
    pub async fn logs_after(
        &self,
        node: &str,
        after: u64,
        signal: Option<&AbortSignal>,
    ) -> Result<Vec<LogLine>, ApiError> {
        let path = format!("/api/v1/nodes/{node}/logs?after={after}&wait=25s&limit=500");
        let (_, lines) = self.call_until("GET", &path, None, signal).await?;
        Ok(lines.unwrap_or_default())
    }

    /// The last `secs` seconds of a metric: of one node, or of every node.
    pub async fn metric(
        &self,
        name: MetricName,
        node: Option<&str>,
        secs: i64,
    ) -> Result<MetricSeries, ApiError> {
        let node = node.map(|n| format!("&node={n}")).unwrap_or_default();
        let from = crate::time::now_ms() / 1000 - secs;
        self.get(&format!("/api/v1/metrics?name={name}&from={from}{node}"))
            .await
    }

    pub async fn topology(&self) -> Result<Topology, ApiError> {
        self.get("/api/v1/topology").await
    }

    pub async fn set_topology(&self, spec: &TopologyUpdate) -> Result<TopologyChange, ApiError> {
        self.with_body("PUT", "/api/v1/topology", spec).await
    }

    /// Files a switchover to `to` on the current primary.
    pub async fn switchover(&self, to: &str) -> Result<SwitchoverAccepted, ApiError> {
        let req = SwitchoverRequest { to: to.into() };
        self.with_body("POST", "/api/v1/db/switchover", &req).await
    }

    /// The backup schedule, the last good backup, whether one is overdue.
    pub async fn backups_status(&self) -> Result<BackupsStatus, ApiError> {
        self.get("/api/v1/backups/status").await
    }

    /// Orders a base backup now.
    pub async fn backup_now(&self) -> Result<Backup, ApiError> {
        let (status, body) = self.call("POST", "/api/v1/backups", None).await?;
        body.ok_or_else(|| ApiError {
            status,
            code: "bad_response".into(),
            message: "the server answered with an empty body".into(),
        })
    }

    /// The newest `limit` audit events, oldest first.
    pub async fn events(&self, limit: u32) -> Result<Vec<Event>, ApiError> {
        self.get(&format!("/api/v1/events?limit={limit}")).await
    }
}
