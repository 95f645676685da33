//! The control plane's own figures, for Prometheus at `GET /metrics`: nodes
//! by state, orders filed and delivered, long polls held, event streams
//! open, requests answered by status class, metric values stored. Counters
//! are atomics bumped where things happen; the text is rendered on scrape.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How many of something are open now; held through [`Held`].
#[derive(Debug, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Counts one until the returned guard is dropped.
    pub fn hold(&self) -> Held {
        self.0.fetch_add(1, Ordering::Relaxed);
        Held(self.0.clone())
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open thing of a [`Gauge`].
#[derive(Debug)]
pub struct Held(Arc<AtomicU64>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything counted in this server process since it started.
#[derive(Debug, Default)]
pub struct Counters {
    pub orders_filed: Counter,
    pub orders_delivered: Counter,
    pub event_streams: Gauge,
    pub metric_values: Counter,
    /// Responses by status class: 1xx .. 5xx.
    pub responses: [Counter; 5],
}

impl Counters {
    pub fn response(&self, status: u16) {
        if let Some(c) = (status / 100)
            .checked_sub(1)
            .and_then(|i| self.responses.get(i as usize))
        {
            c.add(1);
        }
    }
}

/// What a scrape shows besides the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// (state, count) of the nodes, every state present.
    pub nodes: Vec<(String, u64)>,
    pub long_polls: u64,
    pub leader: bool,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition (format 0.0.4).
pub fn render(c: &Counters, s: &Snapshot) -> String {
    let mut out = String::with_capacity(2048);
    family(
        &mut out,
        "corral_nodes",
        "gauge",
        "Nodes by lifecycle state.",
    );
    for (state, n) in &s.nodes {
        let _ = writeln!(out, "corral_nodes{{state=\"{state}\"}} {n}");
    }
    for (name, kind, help, value) in [
        (
            "corral_orders_filed_total",
            "counter",
            "Work orders this server filed.",
            c.orders_filed.get(),
        ),
        (
            "corral_orders_delivered_total",
            "counter",
            "Work orders this server handed to agents' polls.",
            c.orders_delivered.get(),
        ),
        (
            "corral_long_polls",
            "gauge",
            "Agent long polls held open now.",
            s.long_polls,
        ),
        (
            "corral_event_streams",
            "gauge",
            "Server-sent event streams open now.",
            c.event_streams.get(),
        ),
        (
            "corral_metric_values_total",
            "counter",
            "Metric values received from agents.",
            c.metric_values.get(),
        ),
        (
            "corral_leader",
            "gauge",
            "1 while this server runs the background work that must run once.",
            u64::from(s.leader),
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "corral_http_responses_total",
        "counter",
        "HTTP responses by status class.",
    );
    for (i, counter) in c.responses.iter().enumerate() {
        let _ = writeln!(
            out,
            "corral_http_responses_total{{class=\"{}xx\"}} {}",
            i + 1,
            counter.get()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_every_family_once_with_its_values() {
        let c = Counters::default();
        c.orders_filed.add(3);
        c.response(200);
        c.response(204);
        c.response(503);
        c.response(42); // not a status: ignored
        let held = c.event_streams.hold();
        let text = render(
            &c,
            &Snapshot {
                nodes: vec![("active".into(), 4), ("draining".into(), 1)],
                long_polls: 7,
                leader: true,
            },
        );
        for line in [
            "corral_nodes{state=\"active\"} 4",
            "corral_nodes{state=\"draining\"} 1",
            "corral_orders_filed_total 3",
            "corral_long_polls 7",
            "corral_event_streams 1",
            "corral_http_responses_total{class=\"2xx\"} 2",
            "corral_http_responses_total{class=\"5xx\"} 1",
            "corral_leader 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert_eq!(text.matches("# TYPE corral_nodes ").count(), 1);
        drop(held);
        assert_eq!(c.event_streams.get(), 0);
    }
}
