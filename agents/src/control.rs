//! The control plane as the agent sees it: enrollment, the long poll for
//! orders, order results, heartbeats and log lines. A 401 means the node
//! token is no longer valid (an admin minted the node a new secret, or the
//! server lost it): the client enrolls again with the node's enrollment
//! secret, read afresh, and retries once. Secrets are single-use, so that
//! works only with a newly minted one; otherwise the server's 403 says so.
//!
//! Given several servers (sharing one database), a request that cannot
//! connect or gets a 5xx goes to the next after a short random pause (the
//! agents of a server that died all move at once); the agent stays with
//! whichever answered. Its place in the orders is its own `after=seq`, so
//! nothing is skipped or repeated by moving.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral_proto::{
    EnrollRequest, EnrollResponse, Heartbeat, ObservedState, OrderOutcome, OrderResult,
};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::config::EnrollSecretSource;
use crate::durable::StateDir;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control plane unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("control plane answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("cannot save the node token: {0}")]
    State(#[from] crate::durable::StateError),
    #[error("{0}")]
    NoSecret(String),
    #[error("{0}")]
    Tls(String),
}

impl ControlError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ControlError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One order of a poll, its payload still raw: a payload this agent cannot
/// parse becomes a failed order, not a failed poll.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RawOrder {
    pub seq: i64,
    pub payload: Value,
}

#[derive(Debug, Deserialize)]
struct RawPoll {
    orders: Vec<RawOrder>,
}

pub struct ControlPlane {
    servers: Servers,
    node: String,
    secret: EnrollSecretSource,
    http: reqwest::Client,
    state: StateDir,
    /// Held across an enrollment, so concurrent callers (the order and
    /// heartbeat loops) enroll once rather than revoke each other's token.
    token: tokio::sync::Mutex<Option<String>>,
}

/// An HTTP client builder for the control plane at `server`: for an
/// `https://` one it trusts the cluster CA in `ca_pem` and nothing else, and
/// refuses to go on without it.
pub fn pinned_client(
    server: &str,
    ca_pem: Option<&[u8]>,
) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder();
    if !server.starts_with("https://") {
        return Ok(builder);
    }
    let pem = ca_pem.ok_or_else(|| {
        format!(
            "{server} speaks TLS: pass --ca-file with the cluster CA (the provider writes it \
             beside the enrollment secret; on the control plane it is <state-dir>/tls/ca.pem)"
        )
    })?;
    let ca = reqwest::Certificate::from_pem(pem)
        .map_err(|e| format!("the cluster CA is not a PEM certificate: {e}"))?;
    Ok(builder
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca))
}

/// The control-plane servers a client was given, tried in turn: requests
/// go to the current one, and on to the next ones while they cannot be
/// reached or answer 5xx. The node agent's [`ControlPlane`] and the host
/// agent share it.
#[derive(Debug)]
pub struct Servers {
    bases: Vec<String>,
    current: AtomicUsize,
}

impl Servers {
    /// At least one server; blanks around and trailing slashes are
    /// dropped (`--server "A, B"`).
    pub fn new(servers: &[String]) -> Result<Self, String> {
        let bases: Vec<String> = servers
            .iter()
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if bases.is_empty() {
            return Err("no control plane server given".into());
        }
        Ok(Self {
            bases,
            current: AtomicUsize::new(0),
        })
    }

    /// The server that decides whether the client speaks TLS: the first
    /// `https://` one, else the first.
    pub fn tls_server(&self) -> &str {
        self.bases
            .iter()
            .find(|s| s.starts_with("https://"))
            .unwrap_or(&self.bases[0])
    }

    /// The server requests go to now.
    pub fn current(&self) -> &str {
        let at = self.current.load(Ordering::Relaxed) % self.bases.len();
        &self.bases[at]
    }

    /// Sends the request `build` makes for a server's base URL to the
    /// current server, and on to the next ones while they cannot be reached
    /// or answer 5xx; the last answer or failure is the outcome, and the
    /// server that answered becomes the current one.
    pub async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let start = self.current.load(Ordering::Relaxed);
        let count = self.bases.len();
        let mut i = 0;
        loop {
            let at = (start + i) % count;
            let result = build(&self.bases[at]).send().await;
            let moves_on = match &result {
                Ok(res) => res.status().is_server_error(),
                Err(_) => true,
            };
            if !moves_on {
                self.current.store(at, Ordering::Relaxed);
                return result;
            }
            i += 1;
            if i == count {
                // Every server failed: the caller backs off; the next call
                // starts with the next server.
                self.current.store((start + 1) % count, Ordering::Relaxed);
                return result;
            }
            // Why this one is left (its answer is not the outcome).
            let why = match result {
                Ok(res) => {
                    let status = res.status();
                    format!("{status}: {}", res.text().await.unwrap_or_default())
                }
                Err(e) => e.to_string(),
            };
            let pause = Duration::from_millis(rand::random_range(50..300));
            tracing::warn!(
                from = %self.bases[at],
                to = %self.bases[(at + 1) % count],
                why = %why,
                pause_ms = pause.as_millis() as u64,
                "control plane server failed; moving to the next"
            );
            tokio::time::sleep(pause).await;
        }
    }
}

impl ControlPlane {
    /// A client of the control plane at `servers` (at least one); `https://`
    /// ones must come with the cluster CA (`ca_pem`), the only certificate
    /// it trusts.
    pub fn new(
        servers: &[String],
        node: &str,
        secret: EnrollSecretSource,
        ca_pem: Option<&[u8]>,
        state: StateDir,
    ) -> Result<Self, ControlError> {
        let servers = Servers::new(servers).map_err(ControlError::Tls)?;
        let http = pinned_client(servers.tls_server(), ca_pem)
            .map_err(ControlError::Tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(75))
            .build()
            .map_err(|e| ControlError::Tls(format!("cannot build the HTTP client: {e}")))?;
        let token = state.token();
        Ok(Self {
            servers,
            node: node.to_string(),
            secret,
            http,
            state,
            token: tokio::sync::Mutex::new(token),
        })
    }

    /// The server requests go to now.
    pub fn server(&self) -> &str {
        self.servers.current()
    }

    async fn to_a_server(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.servers.send(build).await
    }

    /// Trades the node's enrollment secret for a node token and keeps it
    /// (mode 0600).
    #[tracing::instrument(skip_all, fields(node = %self.node))]
    async fn enroll(&self, slot: &mut Option<String>) -> Result<String, ControlError> {
        let secret = self.secret.read().map_err(ControlError::NoSecret)?;
        let request = EnrollRequest {
            node: self.node.clone(),
            secret,
        };
        let res = self
            .to_a_server(|base| {
                self.http
                    .post(format!("{base}/api/v1/agents/enroll"))
                    .json(&request)
            })
            .await?;
        let res = checked(res).await?;
        let body: EnrollResponse = res.json().await?;
        self.state.save_token(&body.token)?;
        *slot = Some(body.token.clone());
        tracing::info!("enrolled");
        Ok(body.token)
    }

    /// The node token, enrolling first when there is none.
    async fn token(&self) -> Result<String, ControlError> {
        let mut slot = self.token.lock().await;
        match slot.clone() {
            Some(t) => Ok(t),
            None => self.enroll(&mut slot).await,
        }
    }

    /// Enrolls again because `refused` was refused, unless another caller
    /// already replaced it.
    async fn reenroll(&self, refused: &str) -> Result<String, ControlError> {
        let mut slot = self.token.lock().await;
        match slot.clone() {
            Some(t) if t != refused => Ok(t),
            _ => {
                tracing::warn!("node token refused; enrolling again");
                self.enroll(&mut slot).await
            }
        }
    }

    /// Sends an authenticated request, enrolling again once on a 401.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ControlError> {
        let mut token = self.token().await?;
        for attempt in 0..2 {
            let res = self
                .to_a_server(|base| {
                    let url = format!("{base}/api/v1/agents/{}{path}", self.node);
                    let req = self
                        .http
                        .request(method.clone(), url)
                        .query(query)
                        .bearer_auth(&token)
                        .timeout(timeout);
                    match body {
                        Some(b) => req.json(b),
                        None => req,
                    }
                })
                .await?;
            if res.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                token = self.reenroll(&token).await?;
                continue;
            }
            return checked(res).await;
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Long poll: the orders after `after`, waiting up to `wait` for one.
    pub async fn poll(&self, after: i64, wait: Duration) -> Result<Vec<RawOrder>, ControlError> {
        let res = self
            .send(
                Method::GET,
                "/orders",
                &[
                    ("after", after.to_string()),
                    ("wait", format!("{}ms", wait.as_millis())),
                ],
                None,
                wait + Duration::from_secs(15),
            )
            .await?;
        let poll: RawPoll = res.json().await?;
        Ok(poll.orders)
    }

    pub async fn report(
        &self,
        seq: i64,
        outcome: OrderOutcome,
        message: &str,
    ) -> Result<(), ControlError> {
        let mut message: String = message.to_string();
        if message.chars().count() > corral_proto::order::MAX_RESULT_LEN {
            message = message
                .chars()
                .take(corral_proto::order::MAX_RESULT_LEN)
                .collect();
        }
        let body = serde_json::to_value(OrderResult { outcome, message }).expect("serializes");
        match self
            .send(
                Method::POST,
                &format!("/orders/{seq}/result"),
                &[],
                Some(&body),
                Duration::from_secs(15),
            )
            .await
        {
            // The server already has another outcome (a report from before a
            // crash): nothing more to say.
            Err(e) if e.status() == Some(StatusCode::CONFLICT) => {
                tracing::warn!(seq, error = %e, "result conflicts with the recorded one");
                Ok(())
            }
            other => other.map(drop),
        }
    }

    pub async fn heartbeat(&self, observed: ObservedState) -> Result<(), ControlError> {
        let body = serde_json::to_value(Heartbeat { observed }).expect("serializes");
        self.send(
            Method::POST,
            "/heartbeat",
            &[],
            Some(&body),
            Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// Sends a batch of metric samples.
    pub async fn metrics(&self, batch: &corral_proto::MetricsBatch) -> Result<(), ControlError> {
        let body = serde_json::to_value(batch).expect("serializes");
        self.send(
            Method::POST,
            "/metrics",
            &[],
            Some(&body),
            Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// Ships log lines; a server without the endpoint (404) is ignored.
    pub async fn logs(&self, service: &str, lines: &[String]) -> Result<(), ControlError> {
        let body = serde_json::json!({ "service": service, "lines": lines });
        match self
            .send(
                Method::POST,
                "/logs",
                &[],
                Some(&body),
                Duration::from_secs(10),
            )
            .await
        {
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// The header carrying a file's hex SHA-256, both ways.
pub const SHA256_HEADER: &str = "x-content-sha256";

/// A transfer of a backup or WAL file to or from adm1's store failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Checksum(String),
}

impl ControlPlane {
    /// Streams the file at `file` to `PUT /agents/{node}{path}` with its
    /// checksum; never holds it whole in memory. It goes to the server the
    /// client is with now: a stream is not replayed to another.
    pub async fn upload(
        &self,
        path: &str,
        file: &std::path::Path,
        sha256: &str,
        timeout: Duration,
    ) -> Result<reqwest::Response, TransferError> {
        let url = format!("{}/api/v1/agents/{}{path}", self.server(), self.node);
        let mut token = self.token().await?;
        for attempt in 0..2 {
            let f = tokio::fs::File::open(file)
                .await
                .map_err(|source| TransferError::Io {
                    what: format!("opening {}", file.display()),
                    source,
                })?;
            // A MiB per read: reqwest's own file body reads 4 KiB at a time,
            // each a trip to the blocking pool.
            let chunks = futures_util::stream::unfold(Some(f), |f| async move {
                use tokio::io::AsyncReadExt;
                let mut f = f?;
                let mut buf = vec![0u8; 1 << 20];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok::<_, std::io::Error>(buf), Some(f)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            });
            let res = self
                .http
                .put(&url)
                .bearer_auth(&token)
                .header(SHA256_HEADER, sha256)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .timeout(timeout)
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .map_err(ControlError::from)?;
            if res.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                token = self.reenroll(&token).await?;
                continue;
            }
            return Ok(checked(res).await?);
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Streams `GET /agents/{node}{path}` into `dest` and checks it against
    /// the checksum the server sent; returns that checksum.
    pub async fn download(
        &self,
        path: &str,
        dest: &std::path::Path,
        timeout: Duration,
    ) -> Result<String, TransferError> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let mut res = self.send(Method::GET, path, &[], None, timeout).await?;
        let expected = res
            .headers()
            .get(SHA256_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| {
                TransferError::Checksum(format!("GET {path} came without a checksum"))
            })?;
        let io = |what: String| move |source| TransferError::Io { what, source };
        let mut file = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(dest)
                .await
                .map_err(io(format!("creating {}", dest.display())))?,
        );
        let mut hasher = sha2::Sha256::new();
        while let Some(chunk) = res.chunk().await.map_err(ControlError::from)? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io(format!("writing {}", dest.display())))?;
        }
        file.flush()
            .await
            .map_err(io(format!("writing {}", dest.display())))?;
        file.get_ref()
            .sync_all()
            .await
            .map_err(io(format!("fsync {}", dest.display())))?;
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(TransferError::Checksum(format!(
                "{path}: the bytes received hash to {actual}, the store says {expected}"
            )));
        }
        Ok(actual)
    }

    /// `POST /agents/{node}{path}` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ControlError> {
        let res = self
            .send(Method::POST, path, &[], Some(body), Duration::from_secs(30))
            .await?;
        Ok(res.json().await?)
    }

    /// `GET /agents/{node}{path}`, JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, ControlError> {
        let res = self
            .send(Method::GET, path, &[], None, Duration::from_secs(30))
            .await?;
        Ok(res.json().await?)
    }
}

async fn checked(res: reqwest::Response) -> Result<reqwest::Response, ControlError> {
    let status = res.status();
    if status.is_success() {
        Ok(res)
    } else {
        let mut body = res.text().await.unwrap_or_default();
        body.truncate(1000);
        Err(ControlError::Status { status, body })
    }
}
