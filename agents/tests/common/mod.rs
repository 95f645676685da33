//! What the agent's tests against a real corral server share: the server
//! itself (in this process, stopped when the test ends, passing or not),
//! a node made and its enrollment secret minted as a provider would, and
//! the agent's control-plane client for it.
//!
//! Each test binary uses part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use actix_web::dev::ServerHandle;
use corral_agent::config::EnrollSecretSource;
use corral_agent::control::ControlPlane;
use corral_agent::durable::StateDir;
use corral_server::startup::{Application, Config};
use serde_json::{Value, json};

/// A server's configuration with its state in `state`, listening on
/// `listen` (`address:port`), with one worker.
pub fn config(state: &Path, listen: &str) -> Config {
    let mut config = Config::new(state);
    config.listen = listen.into();
    config.workers = Some(1);
    config
}

/// A running corral server.
pub struct Server {
    pub url: String,
    pub admin: String,
    /// The cluster CA, when it serves HTTPS.
    pub ca: Option<String>,
    pub addr: std::net::SocketAddr,
    pub state: PathBuf,
    pub http: reqwest::Client,
    handle: Option<ServerHandle>,
}

impl Server {
    /// Builds and runs the server `config` describes.
    pub async fn start(config: Config) -> Server {
        let state = config.state_dir.clone();
        let app = Application::build(config).await.expect("server starts");
        let (url, addr, handle) = (app.url(), app.addr(), app.handle());
        let ca = app.ca_pem().map(str::to_string);
        tokio::spawn(app.run_until_stopped());
        let admin = std::fs::read_to_string(state.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        let http = corral_server::tls::client_builder(ca.as_deref().map(str::as_bytes))
            .expect("client")
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("client");
        Server {
            url,
            admin,
            ca,
            addr,
            state,
            http,
            handle: Some(handle),
        }
    }

    /// Stops it gracefully (a server started again on the same state and
    /// port is the control plane back after an outage).
    pub async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop(true).await;
        }
    }

    /// Starts it again, on the same state directory and address.
    pub async fn restart(&mut self) {
        let listen = self.addr.to_string();
        let again = Server::start(config(&self.state, &listen)).await;
        self.handle = Some(again.handle_take());
    }

    fn handle_take(mut self) -> ServerHandle {
        self.handle.take().expect("running")
    }

    /// Adds a node of `role` through the API; returns its name.
    pub async fn create_node(&self, role: &str) -> String {
        let res = self
            .http
            .post(format!("{}/api/v1/nodes", self.url))
            .bearer_auth(&self.admin)
            .json(&json!({ "role": role }))
            .send()
            .await
            .expect("create a node");
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.expect("json")["name"]
            .as_str()
            .expect("name")
            .to_string()
    }

    /// Mints `node`'s enrollment secret, as a provider does.
    pub async fn mint(&self, node: &str) -> String {
        let res = self
            .http
            .post(format!("{}/api/v1/nodes/{node}/enroll-secret", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("mint");
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.expect("json")["secret"]
            .as_str()
            .expect("secret")
            .to_string()
    }

    /// GETs an API path (`/api/v1/...`) as the admin.
    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            drop(handle.stop(false));
        }
    }
}

/// The agent's control-plane client for `node`, trying `servers` in turn,
/// enrolling with `secret`, pinning `ca`, keeping its state in `dir`.
pub fn agent(
    servers: &[String],
    node: &str,
    secret: &str,
    ca: Option<&str>,
    dir: &Path,
) -> (ControlPlane, StateDir) {
    let state = StateDir::open(dir).expect("state");
    let control = ControlPlane::new(
        servers,
        node,
        EnrollSecretSource {
            value: Some(secret.to_string()),
            file: None,
        },
        ca.map(str::as_bytes),
        state.clone(),
    )
    .expect("client");
    (control, state)
}
