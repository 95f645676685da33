//! Headless Chromium through chromedriver, driven with fantoccini.
//! chromedriver runs in its own process group so that it and every
//! browser it started die with the [`Chromedriver`] guard, on success and
//! on failure alike; setpriv's pdeathsig covers a test process killed
//! outright.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;

use crate::eventually;

pub struct Chromedriver {
    child: Child,
    url: String,
    profile: tempfile::TempDir,
}

impl Chromedriver {
    pub async fn start() -> anyhow::Result<Chromedriver> {
        let port = corral_testkit::free_port("127.0.0.1")?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "/usr/bin/chromedriver"])
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (apt-get install chromium-driver)")?;
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile: tempfile::tempdir()?,
        };
        let http = reqwest::Client::new();
        eventually("chromedriver is ready", Duration::from_secs(30), || async {
            let status: serde_json::Value = http
                .get(format!("{}/status", driver.url))
                .send()
                .await?
                .json()
                .await?;
            Ok(status["value"]["ready"] == true)
        })
        .await?;
        Ok(driver)
    }

    /// A new headless browser window of the given size.
    pub async fn browser(&self, width: u32, height: u32) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir_in(self.profile.path())?;
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("a JSON object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .context("starting a browser session")?;
        client.set_window_size(width, height).await?;
        Ok(Browser {
            client,
            patience: PATIENCE,
            _profile: profile,
        })
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One browser window, with waits that poll against a deadline.
pub struct Browser {
    pub client: Client,
    /// How long a wait may take: the UI is quick, a real cluster is not.
    pub patience: Duration,
    _profile: tempfile::TempDir,
}

/// How long the UI may take to show something by default.
pub const PATIENCE: Duration = Duration::from_secs(30);

impl Browser {
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await?;
        Ok(())
    }

    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        Ok(self.client.find(Locator::Css(css)).await?)
    }

    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        Ok(self.client.find_all(Locator::Css(css)).await?)
    }

    /// Waits for an element to exist and returns it.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        eventually(&format!("an element {css}"), self.patience, || async {
            Ok(!self.find_all(css).await?.is_empty())
        })
        .await?;
        self.find(css).await
    }

    /// Waits until no element matches.
    pub async fn wait_gone(&self, css: &str) -> anyhow::Result<()> {
        eventually(&format!("no element {css}"), self.patience, || async {
            Ok(self.find_all(css).await?.is_empty())
        })
        .await
    }

    /// Waits until the first element matching `css` has text containing
    /// `needle`.
    pub async fn wait_text(&self, css: &str, needle: &str) -> anyhow::Result<()> {
        eventually(
            &format!("{css} to say {needle:?}"),
            self.patience,
            || async {
                Ok(match self.find_all(css).await?.first() {
                    Some(e) => e.text().await?.contains(needle),
                    None => false,
                })
            },
        )
        .await
    }

    /// Waits until the first element matching `css` has attribute `name`
    /// equal to `value`.
    pub async fn wait_attr(&self, css: &str, name: &str, value: &str) -> anyhow::Result<()> {
        eventually(
            &format!("{css} [{name}={value:?}]"),
            self.patience,
            || async {
                Ok(match self.find_all(css).await?.first() {
                    Some(e) => e.attr(name).await?.as_deref() == Some(value),
                    None => false,
                })
            },
        )
        .await
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.wait_for(css).await?.click().await?;
        Ok(())
    }

    /// Clicks the button whose text is `text` exactly.
    pub async fn click_button(&self, text: &str) -> anyhow::Result<()> {
        let xpath = format!("//button[normalize-space(.)='{text}']");
        eventually(
            &format!("an enabled button {text:?}"),
            self.patience,
            || async {
                Ok(
                    match self.client.find_all(Locator::XPath(&xpath)).await?.first() {
                        Some(b) => b.is_enabled().await?,
                        None => false,
                    },
                )
            },
        )
        .await?;
        self.client
            .find(Locator::XPath(&xpath))
            .await?
            .click()
            .await?;
        Ok(())
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let field = self.wait_for(css).await?;
        field.clear().await?;
        field.send_keys(text).await?;
        Ok(())
    }

    /// Marks the page, so [`Self::assert_not_reloaded`] can tell whether it
    /// was reloaded since.
    pub async fn mark_page(&self) -> anyhow::Result<()> {
        self.client
            .execute(
                "window.__corralTestMark = 'still here'; return null;",
                vec![],
            )
            .await?;
        Ok(())
    }

    /// Fails if the page was reloaded since [`Self::mark_page`].
    pub async fn assert_not_reloaded(&self) -> anyhow::Result<()> {
        let mark = self
            .client
            .execute("return window.__corralTestMark || null;", vec![])
            .await?;
        anyhow::ensure!(mark == "still here", "the page was reloaded ({mark})");
        Ok(())
    }

    pub async fn path(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await?.path().to_string())
    }

    /// Resizes the window (CSS pixels) and saves a PNG of it under
    /// `target/ui-screenshots/`.
    pub async fn screenshot(&self, name: &str, width: u32, height: u32) -> anyhow::Result<PathBuf> {
        self.client.set_window_size(width, height).await?;
        // Let the layout settle on the new width before the picture.
        self.wait_for("body").await?;
        let png = self.client.screenshot().await?;
        let dir = crate::workspace_root().join("target/ui-screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        Ok(())
    }
}
