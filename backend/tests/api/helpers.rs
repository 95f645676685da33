//! `spawn_app`: a real server on 127.0.0.1:0 over a fresh database, SQLite
//! in a temporary state directory or a database of its own on a real
//! PostgreSQL 15 that the testkit starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_server::cluster::Cluster;
use corral_server::startup::{Application, Config};
use reqwest::{Method, Response};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub url: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub cluster: Arc<Cluster>,
    pub state: std::path::PathBuf,
    _tmp: Option<tempfile::TempDir>,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stops the workers; the future only reports when they are done.
        drop(self.handle.stop(false));
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_with(backend, |_| {}).await
}

pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let state = tempfile::tempdir().expect("state dir");
    let mut config = Config::new(state.path());
    config.listen = "127.0.0.1:0".into();
    config.workers = Some(1);
    if backend == Backend::Postgres {
        config.database_url =
            Some(corral_testkit::shared_database("corral").expect("postgres database"));
    }
    tweak(&mut config);
    start(config, Some(state)).await
}

/// Starts a server on `config.state_dir`; `tmp` (if any) is deleted with
/// the app.
pub async fn start(config: Config, tmp: Option<tempfile::TempDir>) -> TestApp {
    let state = config.state_dir.clone();
    let app = Application::build(config).await.expect("server starts");
    let admin = std::fs::read_to_string(state.join("admin-token"))
        .expect("admin token file")
        .trim()
        .to_string();
    let url = app.url();
    let cluster = app.cluster();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        url,
        admin,
        http: reqwest::Client::new(),
        cluster,
        state,
        _tmp: tmp,
        handle,
    }
}

impl TestApp {
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path).send().await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.expect("json")
    }

    pub async fn send_json(&self, method: Method, path: &str, body: Value) -> Response {
        self.request(method, path)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.send_json(Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Response {
        self.send_json(Method::PUT, path, body).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.request(Method::DELETE, path)
            .send()
            .await
            .expect("DELETE")
    }

    pub async fn set_topology(&self, web: u32, db: u32, policy: &str) -> Value {
        let res = self
            .put(
                "/api/v1/topology",
                serde_json::json!({"web": web, "db": db, "lb_policy": policy, "replication": "async"}),
            )
            .await;
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }

    pub async fn add_node(&self, role: &str) -> Value {
        let res = self
            .post("/api/v1/nodes", serde_json::json!({ "role": role }))
            .await;
        assert_eq!(res.status(), 201, "adding a {role} node");
        res.json().await.expect("json")
    }

    /// Mints `node`'s enrollment secret as the admin, as a provider does.
    pub async fn enroll_secret(&self, node: &str) -> String {
        let res = self
            .post(&format!("/api/v1/nodes/{node}/enroll-secret"), Value::Null)
            .await;
        assert_eq!(res.status(), 201, "minting {node}'s enrollment secret");
        let body: Value = res.json().await.expect("json");
        body["secret"].as_str().expect("secret").to_string()
    }

    /// Enrolls `node` with a freshly minted secret and returns its agent
    /// token.
    pub async fn enroll(&self, node: &str) -> String {
        let secret = self.enroll_secret(node).await;
        let res = self
            .http
            .post(format!("{}/api/v1/agents/enroll", self.url))
            .json(&serde_json::json!({"node": node, "secret": secret}))
            .send()
            .await
            .expect("enroll");
        assert_eq!(res.status(), 200, "enrolling {node}");
        let body: Value = res.json().await.expect("json");
        body["token"].as_str().expect("token").to_string()
    }

    /// A request with a given bearer token instead of the admin's.
    pub fn as_token(&self, token: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
    }

    pub async fn events(&self) -> Vec<Value> {
        self.get_json("/api/v1/events?limit=1000")
            .await
            .as_array()
            .expect("array")
            .clone()
    }

    pub async fn event_kinds(&self) -> Vec<String> {
        self.events()
            .await
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap_or(""),
                    e["subject"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    pub async fn node_names(&self) -> Vec<String> {
        self.get_json("/api/v1/nodes")
            .await
            .as_array()
            .expect("array")
            .iter()
            .map(|n| n["name"].as_str().expect("name").to_string())
            .collect()
    }
}

/// Polls `cond` until it holds or `deadline` passes.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the body is our error JSON with this code.
pub async fn assert_error(res: Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let body: Value = res.json().await.expect("json error body");
    assert_eq!(body["error"], code, "error body {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    body
}

/// Defines each test twice: once over SQLite, once over PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($(async fn $name:ident($app:ident) $body:block)*) => {
        $crate::both_backends! { with |_| {}; $(async fn $name($app) $body)* }
    };
    // Servers whose `Config` the closure adjusts first.
    (with $tweak:expr; $(async fn $name:ident($app:ident) $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let $app = $crate::helpers::spawn_with($crate::helpers::Backend::Sqlite, $tweak).await;
                    $body
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let $app = $crate::helpers::spawn_with($crate::helpers::Backend::Postgres, $tweak).await;
                    $body
                }
            )*
        }
    };
}
