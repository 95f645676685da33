//! Logging set-up for the binary: one structured line per request is the
//! webapp's access log, so at thousands of requests a second how a line is
//! filtered and written shows in the throughput (the profile of `GET /todos`
//! had logging at a fifth of the app's CPU, with `RUST_LOG=warn` answering
//! 25 % more requests a second).
//!
//! Two things keep it cheap. Plain `target=level` directives (the default
//! and the usual `RUST_LOG`) are served by a static filter; `EnvFilter` is
//! used only for span and field directives, since it takes a shared lock on
//! every span enter and exit, and each request's span is entered on every
//! poll of its future. And lines are written to stdout in batches by a
//! flusher thread (at most [`FLUSH_EVERY`] late, at once when
//! [`BATCH_BYTES`] are waiting, and at exit), not one `write(2)` per line.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,actix_server=warn";

/// Longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Written at once, by the thread that logs, past this many bytes.
pub const BATCH_BYTES: usize = 64 * 1024;

/// Lines waiting to go to stdout; written under the lock, so batches keep
/// their order.
#[derive(Clone, Default)]
pub struct BatchedStdout {
    pending: Arc<Mutex<Vec<u8>>>,
}

impl BatchedStdout {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes out what is waiting.
    pub fn flush(&self) {
        let mut pending = self.lock();
        write_out(&mut pending);
    }
}

fn write_out(pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    // Nowhere to report a failed log write; the lines are dropped.
    let _ = stdout.write_all(pending).and_then(|()| stdout.flush());
    pending.clear();
}

/// One log line on its way into the buffer.
pub struct Line<'a> {
    to: &'a BatchedStdout,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.to.lock();
        pending.extend_from_slice(buf);
        if pending.len() >= BATCH_BYTES {
            write_out(&mut pending);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line { to: self }
    }
}

/// Flushes the log buffer when dropped (at the end of `main`).
pub struct LogGuard {
    out: BatchedStdout,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.out.flush();
    }
}

/// The filter for a `RUST_LOG`-style spec: static unless it has span or
/// field directives.
pub fn filter<S>(spec: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !spec.contains(['[', '{'])
        && let Ok(targets) = spec.parse::<Targets>()
    {
        return targets.boxed();
    }
    EnvFilter::try_new(spec)
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        .boxed()
}

/// Installs the global subscriber; keep the guard until the process ends.
pub fn init(format: LogFormat) -> LogGuard {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let out = BatchedStdout::default();
    let fmt = tracing_subscriber::fmt::layer().with_writer(out.clone());
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(filter(&spec))
        .init();
    let flusher = out.clone();
    // Detached: it sleeps most of the time and dies with the process.
    let _ = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flusher.flush();
            }
        });
    LogGuard { out }
}
