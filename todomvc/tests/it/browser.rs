//! The TodoMVC page in a real headless Chromium, driven through
//! chromedriver: add, toggle, edit (Enter saves, Escape cancels, empty
//! deletes), filters, toggle-all, clear completed, and a reload that shows
//! the same list, which must also be what the API has stored.
//!
//! The WebDriver client is a few calls over reqwest (already a dependency)
//! rather than a WebDriver crate, whose dependency trees are large for the
//! handful of commands needed here.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use corral_testkit::free_port;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::{TestApp, eventually, shared_app_database};

pub const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
pub const ENTER: &str = "\u{E007}";
pub const ESCAPE: &str = "\u{E00C}";
pub const CONTROL: &str = "\u{E009}";
pub const RELEASE_MODIFIERS: &str = "\u{E000}";

/// chromedriver and the browsers it starts, in their own process group so
/// that all of them go on drop, even when the test fails midway.
pub struct Chromedriver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Chromedriver {
    pub async fn start() -> anyhow::Result<Chromedriver> {
        let port = free_port("127.0.0.1")?;
        // setpriv's pdeathsig: a test process killed outright takes
        // chromedriver with it (Drop handles every other ending).
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "/usr/bin/chromedriver"])
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: tempfile::tempdir()?,
        };
        let http = reqwest::Client::new();
        eventually("chromedriver is ready", Duration::from_secs(30), || async {
            let status: Value = http
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

    pub async fn session(&self) -> anyhow::Result<Browser> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let profile = self._profile.path().display().to_string();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={profile}"),
                ],
            },
        }}});
        let r: Value = http
            .post(format!("{}/session", self.url))
            .json(&caps)
            .send()
            .await?
            .json()
            .await?;
        let id = r["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no session: {r}"))?;
        Ok(Browser {
            http,
            session: format!("{}/session/{id}", self.url),
        })
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if method == reqwest::Method::POST {
            req = req.json(&body);
        }
        let r: Value = req.send().await?.json().await?;
        if let Some(error) = r["value"]["error"].as_str() {
            bail!(
                "webdriver {method} {path}: {error}: {}",
                r["value"]["message"]
            );
        }
        Ok(r["value"].clone())
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({ "url": url })).await.map(drop)
    }

    pub async fn find(&self, css: &str) -> anyhow::Result<String> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("finding {css:?}: {v}"))
    }

    /// Finds `css` and acts on it. Not retried when the element has gone
    /// stale in between: the page keeps an item's elements across server
    /// round trips, and a test that had to find them again would hide it
    /// if it did not.
    async fn on<F, Fut>(&self, css: &str, act: F) -> anyhow::Result<()>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Value>>,
    {
        let el = self.find(css).await?;
        act(el)
            .await
            .map(drop)
            .with_context(|| format!("acting on {css:?}"))
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.on(css, |el| async move {
            self.post(&format!("/element/{el}/click"), json!({})).await
        })
        .await
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        self.on(css, |el| async move {
            self.post(&format!("/element/{el}/value"), json!({ "text": text }))
                .await
        })
        .await
    }

    async fn pointer(&self, actions: Vec<Value>) -> anyhow::Result<Value> {
        self.post(
            "/actions",
            json!({"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": actions}]}),
        )
        .await
    }

    async fn hover(&self, css: &str) -> anyhow::Result<()> {
        self.on(css, |el| {
            self.pointer(vec![
                json!({"type": "pointerMove", "duration": 0, "origin": {ELEMENT: el}, "x": 0, "y": 0}),
            ])
        })
        .await
    }

    pub async fn double_click(&self, css: &str) -> anyhow::Result<()> {
        self.on(css, |el| {
            let press = [
                json!({"type": "pointerDown", "button": 0}),
                json!({"type": "pointerUp", "button": 0}),
            ];
            let mut actions = vec![
                json!({"type": "pointerMove", "duration": 0, "origin": {ELEMENT: el}, "x": 0, "y": 0}),
            ];
            actions.extend(press.iter().cloned());
            actions.extend(press.iter().cloned());
            self.pointer(actions)
        })
        .await
    }

    /// Every element matching `css`, in document order.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .with_context(|| format!("finding all {css:?}: {v}"))
    }

    /// The first element matching `css` inside the element `el`.
    pub async fn find_in(&self, el: &str, css: &str) -> anyhow::Result<String> {
        let v = self
            .post(
                &format!("/element/{el}/element"),
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("finding {css:?} in {el}: {v}"))
    }

    /// The rendered text of an element found earlier; fails with "stale
    /// element reference" if the page has replaced it since.
    pub async fn text_of(&self, el: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{el}/text"),
                Value::Null,
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .context("text is not a string")
    }

    pub async fn is_displayed(&self, el: &str) -> anyhow::Result<bool> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{el}/displayed"),
                Value::Null,
            )
            .await?;
        v.as_bool().context("displayed is not a boolean")
    }

    pub async fn click_element(&self, el: &str) -> anyhow::Result<()> {
        self.post(&format!("/element/{el}/click"), json!({}))
            .await
            .map(drop)
    }

    pub async fn keys_to(&self, el: &str, text: &str) -> anyhow::Result<()> {
        self.post(&format!("/element/{el}/value"), json!({ "text": text }))
            .await
            .map(drop)
    }

    pub async fn double_click_element(&self, el: &str) -> anyhow::Result<()> {
        let press = [
            json!({"type": "pointerDown", "button": 0}),
            json!({"type": "pointerUp", "button": 0}),
        ];
        let mut actions = vec![
            json!({"type": "pointerMove", "duration": 0, "origin": {ELEMENT: el}, "x": 0, "y": 0}),
        ];
        actions.extend(press.iter().cloned());
        actions.extend(press.iter().cloned());
        self.pointer(actions).await.map(drop)
    }

    /// Runs an asynchronous script: it ends by calling its last argument.
    pub async fn script_async(&self, script: &str) -> anyhow::Result<Value> {
        self.post("/execute/async", json!({"script": script, "args": []}))
            .await
    }

    pub async fn script(&self, script: &str) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// What the page shows: the visible items and the footer.
    pub async fn shown(&self) -> anyhow::Result<Shown> {
        let v = self
            .script(
                "const q = s => document.querySelector(s);
                 return {
                   items: [...document.querySelectorAll('.todo-list li')].map(li =>
                     [li.querySelector('label').textContent, li.classList.contains('completed')]),
                   count: q('.todo-count').textContent,
                   main: !q('.main').hidden,
                   footer: !q('.footer').hidden,
                   clear: !q('.clear-completed').hidden,
                   toggleAll: q('.toggle-all').checked,
                   editing: !!q('.todo-list li.editing'),
                   hash: location.hash,
                   selected: q('.filters a.selected') && q('.filters a.selected').textContent,
                   status: q('.sync-status').textContent,
                 };",
            )
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    pub async fn quit(&self) -> anyhow::Result<()> {
        self.call(reqwest::Method::DELETE, "", Value::Null)
            .await
            .map(drop)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shown {
    pub items: Vec<(String, bool)>,
    pub count: String,
    pub main: bool,
    pub footer: bool,
    pub clear: bool,
    pub toggle_all: bool,
    pub editing: bool,
    pub hash: String,
    pub selected: Option<String>,
    pub status: String,
}

impl Shown {
    pub fn titles(&self) -> Vec<&str> {
        self.items.iter().map(|(t, _)| t.as_str()).collect()
    }
}

/// Waits until the page shows what `want` accepts, reporting what it showed.
pub async fn until(
    b: &Browser,
    what: &str,
    want: impl Fn(&Shown) -> bool,
) -> anyhow::Result<Shown> {
    let last = std::sync::Mutex::new(None);
    let outcome = eventually(what, Duration::from_secs(15), || async {
        let shown = b.shown().await?;
        let ok = want(&shown);
        *last.lock().unwrap() = Some(shown);
        Ok(ok)
    })
    .await;
    let last = last.into_inner().unwrap();
    outcome.with_context(|| format!("the page showed {last:#?}"))?;
    last.context("nothing shown")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_adds_toggles_edits_filters_clears_and_keeps_items_over_reload() -> anyhow::Result<()>
{
    let (at, db) = shared_app_database("browser")?;
    let app = TestApp::spawn(&["--db-primary", &at, "--db-name", &db]).await?;
    app.wait_writable().await?;
    let driver = Chromedriver::start().await?;
    let b = driver.session().await?;
    let result = exercise_page(&app, &b).await;
    let quit = b.quit().await;
    result?;
    quit
}

async fn exercise_page(app: &TestApp, b: &Browser) -> anyhow::Result<()> {
    b.goto(&format!("{}/", app.base)).await?;
    let s = until(b, "the empty list loaded", |s| s.count == "0 items left").await?;
    assert!(
        !s.main && !s.footer,
        "main and footer hidden while empty: {s:?}"
    );

    // Add: Enter saves the trimmed title; blank input adds nothing.
    for title in ["buy milk", "  walk the dog  ", "call mom"] {
        b.type_into(".new-todo", &format!("{title}{ENTER}")).await?;
    }
    b.type_into(".new-todo", &format!("   {ENTER}")).await?;
    let s = until(b, "three items", |s| s.items.len() == 3).await?;
    assert_eq!(s.titles(), vec!["buy milk", "walk the dog", "call mom"]);
    assert_eq!(s.count, "3 items left");
    assert!(s.main && s.footer && !s.clear);
    let input: Value = b
        .script("return document.querySelector('.new-todo').value")
        .await?;
    assert_eq!(input, "", "the input is cleared after adding");

    // Toggle one.
    b.click(".todo-list li:nth-child(1) .toggle").await?;
    let s = until(b, "the first completed", |s| s.items[0].1).await?;
    assert_eq!(s.count, "2 items left");
    assert!(s.clear, "clear-completed shows once something is completed");

    // Edit: double-click, change, Enter saves.
    b.double_click(".todo-list li:nth-child(2) label").await?;
    until(b, "edit mode", |s| s.editing).await?;
    b.type_into(
        ".todo-list li.editing .edit",
        &format!("{CONTROL}a{RELEASE_MODIFIERS}walk the cat{ENTER}"),
    )
    .await?;
    until(b, "the new title", |s| {
        !s.editing && s.items[1].0 == "walk the cat"
    })
    .await?;

    // Escape cancels an edit.
    b.double_click(".todo-list li:nth-child(3) label").await?;
    until(b, "edit mode", |s| s.editing).await?;
    b.type_into(".todo-list li.editing .edit", &format!(" later{ESCAPE}"))
        .await?;
    let s = until(b, "edit mode left", |s| !s.editing).await?;
    assert_eq!(s.items[2].0, "call mom", "Escape keeps the old title");

    // An edit to an empty title deletes the todo.
    b.type_into(".new-todo", &format!("to be emptied{ENTER}"))
        .await?;
    until(b, "four items", |s| s.items.len() == 4).await?;
    b.double_click(".todo-list li:nth-child(4) label").await?;
    until(b, "edit mode", |s| s.editing).await?;
    b.type_into(
        ".todo-list li.editing .edit",
        &format!("{CONTROL}a{RELEASE_MODIFIERS}\u{E003}{ENTER}"),
    )
    .await?;
    until(b, "the emptied todo gone", |s| {
        s.items.len() == 3 && !s.editing
    })
    .await?;

    // Filters, routed by the URL's fragment.
    b.click(".filters a[href='#/active']").await?;
    // The link's `selected` class is set by the redraw that follows the
    // fragment change, so it says the list shown is the filtered one.
    let s = until(b, "active only", |s| {
        s.selected.as_deref() == Some("Active")
    })
    .await?;
    assert_eq!(s.titles(), vec!["walk the cat", "call mom"]);
    assert_eq!(s.hash, "#/active");
    b.click(".filters a[href='#/completed']").await?;
    let s = until(b, "completed only", |s| {
        s.selected.as_deref() == Some("Completed")
    })
    .await?;
    assert_eq!(s.titles(), vec!["buy milk"]);
    assert_eq!(s.hash, "#/completed");
    b.click(".filters a[href='#/']").await?;
    let s = until(b, "all again", |s| s.selected.as_deref() == Some("All")).await?;
    assert_eq!(s.items.len(), 3);
    assert_eq!(s.hash, "#/");

    // Toggle all, and back.
    b.click(".toggle-all + label").await?;
    let s = until(b, "all completed", |s| s.items.iter().all(|i| i.1)).await?;
    assert!(s.toggle_all);
    assert_eq!(s.count, "0 items left");
    b.click(".toggle-all + label").await?;
    let s = until(b, "none completed", |s| s.items.iter().all(|i| !i.1)).await?;
    assert_eq!(s.count, "3 items left");

    // Destroy one, complete another, clear completed.
    // The destroy button shows on hover, as for a person with a mouse.
    b.hover(".todo-list li:nth-child(3)").await?;
    b.click(".todo-list li:nth-child(3) .destroy").await?;
    until(b, "call mom destroyed", |s| {
        s.titles() == ["buy milk", "walk the cat"]
    })
    .await?;
    b.click(".todo-list li:nth-child(1) .toggle").await?;
    until(b, "buy milk completed", |s| s.items[0].1).await?;
    b.click(".clear-completed").await?;
    let s = until(b, "completed cleared", |s| s.titles() == ["walk the cat"]).await?;
    assert_eq!(s.count, "1 item left");
    assert!(!s.clear);

    // A reload shows the same list, and so does the API.
    b.type_into(".new-todo", &format!("survive a reload{ENTER}"))
        .await?;
    b.click(".todo-list li:nth-child(1) .toggle").await?;
    let before = until(b, "two items, one completed", |s| {
        s.items
            == [
                ("walk the cat".to_string(), true),
                ("survive a reload".to_string(), false),
            ]
    })
    .await?;
    b.post("/refresh", json!({})).await?;
    let after = until(b, "the list after reload", |s| s.items.len() == 2).await?;
    assert_eq!(after.items, before.items);
    assert_eq!(after.count, "1 item left");
    assert_eq!(after.status, "", "no sync errors were shown");

    let stored = app.session().get("/todos").await?;
    let stored: Vec<(String, bool)> = stored
        .json
        .as_array()
        .context("list")?
        .iter()
        .map(|t| {
            (
                t["title"].as_str().unwrap_or("").to_string(),
                t["completed"] == true,
            )
        })
        .collect();
    assert_eq!(stored, after.items);
    Ok(())
}
