//! The REST client of the UI: `fetch` with the admin token, JSON in and
//! out, and every failure turned into an [`ApiError`] whose text can be
//! shown as it is. The types are corral-proto's, the server's own.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

use corral_proto::{
    Backup, BackupsStatus, CreateNode, ErrorBody, Event, LogLine, MetricName, MetricSeries, Node,
    Order, Servers as ServerList, SwitchoverAccepted, SwitchoverRequest, Topology, TopologyChange,
    TopologyUpdate,
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
#[derive(Debug, Clone)]
pub struct Client {
    token: String,
    /// Shared by every clone: a move to another server holds for all.
    servers: Rc<Servers>,
}

impl PartialEq for Client {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token && Rc::ptr_eq(&self.servers, &other.servers)
    }
}

/// The control-plane servers the UI may call: `""` (the one that served
/// the page, by relative URL) first, then the others' base URLs from
/// `GET /api/v1/servers`. Calls go to `current`; a GET that cannot reach
/// it, or gets 502/503/504, tries the next, and the one that answers
/// becomes current. The servers share one state database, so any of them
/// gives the same answer.
#[derive(Debug)]
struct Servers {
    bases: RefCell<Vec<String>>,
    current: Cell<usize>,
}

impl Servers {
    fn new() -> Self {
        Self {
            bases: RefCell::new(vec![String::new()]),
            current: Cell::new(0),
        }
    }
}

/// The page's own origin, `scheme://host:port`.
fn page_origin() -> Option<String> {
    web_sys::window()?.location().origin().ok()
}

/// Answers that say this server cannot serve now, where another may.
fn unavailable(status: u16) -> bool {
    matches!(status, 502..=504)
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
            servers: Rc::new(Servers::new()),
        }
    }

    /// Learns the other control-plane servers (`GET /api/v1/servers`), to
    /// go on with when this one stops answering. A failure leaves the list
    /// as it was: the page then has only its own server.
    pub async fn discover_servers(&self) -> Result<(), ApiError> {
        let list: ServerList = self.get("/api/v1/servers").await?;
        let own = page_origin();
        let mut bases = vec![String::new()];
        for url in list.servers {
            let url = url.trim_end_matches('/').to_string();
            if Some(&url) != own.as_ref() && !bases.contains(&url) {
                bases.push(url);
            }
        }
        let current = self.servers.current.get();
        let keep = self.servers.bases.borrow().get(current).cloned();
        let index = keep
            .and_then(|k| bases.iter().position(|b| *b == k))
            .unwrap_or(0);
        *self.servers.bases.borrow_mut() = bases;
        self.servers.current.set(index);
        Ok(())
    }

    /// The server calls go to now, when it is not the page's own.
    pub fn other_server(&self) -> Option<String> {
        let bases = self.servers.bases.borrow();
        bases
            .get(self.servers.current.get())
            .filter(|b| !b.is_empty())
            .cloned()
    }

    /// Starts a request; the response is returned whatever its status. A
    /// GET goes on to the other servers when the current one cannot be
    /// reached or answers 502/503/504; any other method is sent once (it
    /// may have been carried out), but a failure moves the next call on.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        signal: Option<&AbortSignal>,
    ) -> Result<Response, ApiError> {
        let bases = self.servers.bases.borrow().clone();
        let start = self.servers.current.get() % bases.len();
        let tries = if method == "GET" { bases.len() } else { 1 };
        let mut last = None;
        for attempt in 0..tries {
            let index = (start + attempt) % bases.len();
            let url = format!("{}{path}", bases[index]);
            let outcome = self.send_to(method, &url, body.as_deref(), signal).await;
            if signal.is_some_and(AbortSignal::aborted) {
                return outcome;
            }
            let failed = match &outcome {
                Ok(response) => unavailable(response.status()),
                Err(_) => true,
            };
            if !failed {
                self.servers.current.set(index);
                return outcome;
            }
            last = Some(outcome);
        }
        // None answered: the next call starts with the next server.
        if bases.len() > 1 && self.servers.current.get() == start {
            self.servers.current.set((start + tries) % bases.len());
        }
        last.unwrap_or_else(|| Err(ApiError::network("no server to call")))
    }

    async fn send_to(
        &self,
        method: &str,
        url: &str,
        body: Option<&str>,
        signal: Option<&AbortSignal>,
    ) -> Result<Response, ApiError> {
        let init = RequestInit::new();
        init.set_method(method);
        if let Some(body) = body {
            init.set_body(&JsValue::from_str(body));
        }
        if let Some(signal) = signal {
            init.set_signal(Some(signal));
        }
        let request = Request::new_with_str_and_init(url, &init)
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
