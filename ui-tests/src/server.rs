//! A real corral server on loopback, serving the built UI.

use std::path::PathBuf;

use anyhow::{Context, bail};
use corral_server::startup::{Application, Config};

/// The built UI; the tests need it (scripts/build-ui.sh).
pub fn built_ui() -> anyhow::Result<PathBuf> {
    let dist = crate::workspace_root().join("frontend/dist");
    if !dist.join("index.html").is_file() {
        bail!(
            "{} has no built UI: run scripts/build-ui.sh first \
             (scripts/test.sh does)",
            dist.display()
        );
    }
    Ok(dist)
}

pub struct Server {
    pub url: String,
    pub admin_token: String,
    handle: actix_web::dev::ServerHandle,
    _state: tempfile::TempDir,
}

impl Server {
    /// Starts a server over SQLite in a fresh state directory.
    pub async fn start() -> anyhow::Result<Server> {
        let state = tempfile::tempdir()?;
        let mut config = Config::new(state.path());
        config.listen = "127.0.0.1:0".into();
        config.workers = Some(2);
        config.ui_dir = Some(built_ui()?);
        let app = Application::build(config)
            .await
            .context("starting corral")?;
        let read = |name: &str| -> anyhow::Result<String> {
            Ok(std::fs::read_to_string(state.path().join(name))?
                .trim()
                .to_string())
        };
        let server = Server {
            url: app.url(),
            admin_token: read("admin-token")?,
            handle: app.handle(),
            _state: state,
        };
        tokio::spawn(app.run_until_stopped());
        Ok(server)
    }

    /// `GET` as the admin, JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let res = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .send()
            .await?;
        anyhow::ensure!(res.status().is_success(), "GET {path}: {}", res.status());
        Ok(res.json().await?)
    }

    /// `PUT` a JSON body as the admin.
    pub async fn put_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    /// `POST` a JSON body as the admin.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let res = reqwest::Client::new()
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token)
            .json(body)
            .send()
            .await?;
        anyhow::ensure!(
            res.status().is_success(),
            "{method} {path}: {} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}
