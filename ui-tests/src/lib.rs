//! The harness of the web UI's browser tests: a real corral server serving
//! the built `frontend/dist` ([`server`]), node agents simulated
//! through the real agent endpoints ([`agents`]), headless Chromium through
//! chromedriver ([`browser`]) and the console's pages as a test sees them
//! ([`console`]). The cluster part is separate from the browser part so a
//! real `corral up` cluster can take the simulated agents' place.

pub mod agents;
pub mod browser;
pub mod console;
pub mod server;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `cond` until it returns `Ok(true)` or `deadline` passes; the last
/// error (or "still false") is in the failure message.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        let last = match cond().await {
            Ok(true) => return Ok(()),
            Ok(false) => "condition still false".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ui-tests sits in the workspace")
        .to_path_buf()
}
