//! Shared by the integration tests: databases prepared the way production
//! has them (a non-superuser owning the database), the app started
//! in-process on port 0, HTTP sessions that keep the app's cookie, and
//! polling with a deadline instead of sleeping.

use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use anyhow::{Context, bail};
use clap::Parser;
use corral_testkit::Postgres;
use reqwest::header::HeaderMap;
use serde_json::Value;
use todomvc::Application;
use todomvc::config::Config;

/// The role the app logs in as: not a superuser, as in production.
pub const APP_USER: &str = "todomvc";

pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Creates the app's role (once per server) and a database it owns.
pub fn app_database(pg: &Postgres, name: &str) -> anyhow::Result<()> {
    pg.psql(
        "postgres",
        &format!(
            "DO $$ BEGIN CREATE ROLE {APP_USER} LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ),
    )?;
    pg.psql(
        "postgres",
        &format!("CREATE DATABASE \"{name}\" OWNER {APP_USER}"),
    )?;
    Ok(())
}

/// A database of its own on the test binary's shared server, owned by the
/// app's role; returns `(host:port, database name)`.
pub fn shared_app_database(prefix: &str) -> anyhow::Result<(String, String)> {
    static ROLE: OnceLock<Result<(), String>> = OnceLock::new();
    let url = corral_testkit::shared_database(prefix)?;
    let server = corral_testkit::shared_server()?;
    let psql = |sql: &str| -> anyhow::Result<()> {
        let out = std::process::Command::new(corral_testkit::pg_bin_dir().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &server.host, "-p", &server.port.to_string()])
            .args(["-U", corral_testkit::SUPERUSER, "-d", "postgres", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    ROLE.get_or_init(|| psql(&format!("CREATE ROLE {APP_USER} LOGIN")).map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let name = url.rsplit('/').next().context("database name")?.to_string();
    psql(&format!("ALTER DATABASE \"{name}\" OWNER TO {APP_USER}"))?;
    Ok((format!("{}:{}", server.host, server.port), name))
}

/// Runs SQL on the shared server.
pub fn shared_psql(db: &str, sql: &str) -> anyhow::Result<String> {
    let server = corral_testkit::shared_server()?;
    let out = std::process::Command::new(corral_testkit::pg_bin_dir().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &server.host, "-p", &server.port.to_string()])
        .args(["-U", corral_testkit::SUPERUSER, "-d", db, "-c", sql])
        .output()?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn endpoint(pg: &Postgres) -> String {
    format!("{}:{}", pg.host(), pg.port())
}

/// The app, running in this process on a free port; stopped on drop.
pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    handle: ServerHandle,
}

impl TestApp {
    /// Starts the app with these flags; unless they say otherwise, on a free
    /// port, with two workers, a quick prober, short timeouts, no list cache
    /// and the app's role.
    pub async fn spawn(args: &[&str]) -> anyhow::Result<TestApp> {
        init_logging();
        let defaults = [
            ("--listen", "127.0.0.1:0"),
            ("--workers", "2"),
            ("--node-name", "test-node"),
            ("--db-user", APP_USER),
            ("--probe-interval-ms", "100"),
            ("--db-connect-timeout-ms", "1000"),
            ("--db-statement-timeout-ms", "2000"),
            // Off unless a test turns it on, so where a read is served from
            // (primary or replica) stays what the test arranges.
            ("--list-cache-ms", "0"),
        ];
        let mut argv = vec!["todomvc"];
        for (flag, value) in defaults {
            if !args.contains(&flag) {
                argv.extend([flag, value]);
            }
        }
        argv.extend_from_slice(args);
        let mut config = Config::try_parse_from(argv)?;
        config.ignore_signals = true;
        let app = Application::build(config).await?;
        let addr = app.local_addr();
        let handle = app.handle();
        tokio::spawn(app.run());
        Ok(TestApp {
            base: format!("http://{addr}"),
            addr,
            handle,
        })
    }

    pub fn session(&self) -> Session {
        Session::new(&self.base)
    }

    pub async fn health(&self) -> anyhow::Result<Reply> {
        self.session().get("/healthz").await
    }

    /// Waits until the app has found a primary it can write to.
    pub async fn wait_writable(&self) -> anyhow::Result<()> {
        eventually(
            "the app finds a writable primary",
            Duration::from_secs(30),
            || async {
                let h = self.health().await?;
                Ok(h.json["writable"] == true)
            },
        )
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command now; the returned future only waits for it.
        drop(self.handle.stop(false));
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Titles of a todo list answer.
    pub fn titles(&self) -> Vec<String> {
        self.json
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["title"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn read_from(&self) -> Option<&str> {
        self.header("x-read-from")
    }
}

/// A client that keeps the app's session cookie, as a browser would (and
/// nothing else, so each test sees exactly what carries the position).
pub struct Session {
    http: reqwest::Client,
    base: String,
    cookie: Mutex<Option<String>>,
}

impl Session {
    pub fn new(base: &str) -> Self {
        Session {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            base: base.to_string(),
            cookie: Mutex::new(None),
        }
    }

    pub fn cookie(&self) -> Option<String> {
        self.cookie.lock().unwrap().clone()
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self.http.request(method, url);
        if let Some(c) = self.cookie() {
            req = req.header("Cookie", c);
        }
        req
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        let res = req.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        if let Some(set) = headers.get("set-cookie").and_then(|v| v.to_str().ok())
            && let Some(pair) = set.split(';').next()
        {
            *self.cookie.lock().unwrap() = Some(pair.trim().to_string());
        }
        let text = res.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            json,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.send(
            self.request(reqwest::Method::POST, path)
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn patch_json(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.send(
            self.request(reqwest::Method::PATCH, path)
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// POSTs a new todo and insists it was created.
    pub async fn add(&self, title: &str) -> anyhow::Result<Reply> {
        let r = self
            .post_json("/todos", &serde_json::json!({ "title": title }))
            .await?;
        if r.status != 201 {
            bail!("POST {title:?} answered {}: {}", r.status, r.text);
        }
        Ok(r)
    }
}

/// Polls `check` until it says yes or `deadline` passes; errors from the
/// check count as "not yet" (a server may be down on purpose), and the
/// last one is reported on timeout.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    let mut last = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting until {what}; last error: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
