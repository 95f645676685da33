//! The console's pages as a test reads and clicks them, by the same
//! selectors whatever cluster is behind the server.

use crate::browser::Browser;

pub fn node(name: &str) -> String {
    format!("article.node[data-node='{name}']")
}

pub fn step(name: &str, label: &str) -> String {
    format!("{} li[data-step='{label}']", node(name))
}

pub struct Console<'a> {
    pub browser: &'a Browser,
    pub url: String,
}

impl<'a> Console<'a> {
    pub fn new(browser: &'a Browser, url: &str) -> Self {
        Self {
            browser,
            url: url.trim_end_matches('/').to_string(),
        }
    }

    pub async fn open(&self, path: &str) -> anyhow::Result<()> {
        self.browser.goto(&format!("{}{path}", self.url)).await
    }

    async fn submit_token(&self, token: &str) -> anyhow::Result<()> {
        self.browser.type_into("#token", token).await?;
        self.browser.click_button("Sign in").await
    }

    /// Signs in and waits for the overview with its nodes.
    pub async fn sign_in(&self, token: &str) -> anyhow::Result<()> {
        self.submit_token(token).await?;
        self.browser.wait_for("header.top").await?;
        self.browser.wait_for("article.node").await?;
        Ok(())
    }

    /// Signs in from the keyboard alone: the token, then Enter.
    pub async fn sign_in_with_enter(&self, token: &str) -> anyhow::Result<()> {
        self.browser
            .type_into("#token", &format!("{token}\u{E007}"))
            .await?;
        self.browser.wait_for("header.top").await?;
        self.browser.wait_for("article.node").await?;
        Ok(())
    }

    /// Tries a token that must be refused; returns the message shown.
    pub async fn sign_in_refused(&self, token: &str) -> anyhow::Result<String> {
        self.submit_token(token).await?;
        let error = self.browser.wait_for("#sign-in-error").await?;
        Ok(error.text().await?)
    }

    pub async fn wait_node(&self, name: &str) -> anyhow::Result<()> {
        self.browser.wait_for(&node(name)).await.map(drop)
    }

    pub async fn wait_node_gone(&self, name: &str) -> anyhow::Result<()> {
        self.browser.wait_gone(&node(name)).await
    }

    /// Waits for a progress step of a node to reach `state` (`done`,
    /// `current`, `waiting`, `failed`).
    pub async fn wait_step(&self, name: &str, label: &str, state: &str) -> anyhow::Result<()> {
        self.browser
            .wait_attr(&step(name, label), "data-state", state)
            .await
    }

    pub async fn wait_health(&self, name: &str, health: &str) -> anyhow::Result<()> {
        self.browser
            .wait_text(&format!("{} .health", node(name)), health)
            .await
    }

    pub async fn nav(&self, text: &str) -> anyhow::Result<()> {
        let link = self
            .browser
            .client
            .find(fantoccini::Locator::LinkText(text))
            .await?;
        link.click().await?;
        Ok(())
    }

    pub async fn open_node(&self, name: &str) -> anyhow::Result<()> {
        self.browser.click(&format!("{} h3 a", node(name))).await?;
        self.browser.wait_text("#node-title", name).await
    }
}
