//! `GET /metrics`: what the webapp answered, in Prometheus text format, for
//! the node's agent to sample every 10 s. Counted in the request middleware
//! with atomics and fixed histogram buckets, so a request costs a few
//! relaxed additions and no lock or allocation. `/healthz` (Consul asks it
//! every second) and `/metrics` itself are not counted.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::{HttpResponse, web};

use crate::AppState;

/// Upper bounds of the latency buckets, in microseconds (1 ms .. 5 s).
pub const BUCKETS_US: [u64; 12] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000,
];

#[derive(Debug, Default)]
pub struct RequestMetrics {
    /// Requests answered with a 5xx.
    server_errors: AtomicU64,
    /// Per bucket (not cumulative; summed when rendered), and one past the
    /// last bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl RequestMetrics {
    /// Counts one answered request.
    pub fn observe(&self, status: u16, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1536);
        let mut cumulative = 0;
        out.push_str(
            "# HELP todomvc_http_request_duration_seconds Time to answer a request.\n\
             # TYPE todomvc_http_request_duration_seconds histogram\n",
        );
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "todomvc_http_request_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += self.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "todomvc_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n\
             todomvc_http_request_duration_seconds_sum {}\n\
             todomvc_http_request_duration_seconds_count {cumulative}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP todomvc_http_requests_total Requests answered.\n\
             # TYPE todomvc_http_requests_total counter\n\
             todomvc_http_requests_total {cumulative}\n\
             # HELP todomvc_http_server_errors_total Requests answered with a 5xx.\n\
             # TYPE todomvc_http_server_errors_total counter\n\
             todomvc_http_server_errors_total {}",
            self.server_errors.load(Ordering::Relaxed)
        );
        out
    }
}

/// Whether a request counts: not the health check nor this endpoint.
pub fn counted(path: &str) -> bool {
    path != "/healthz" && path != "/metrics"
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_cumulative_buckets_with_sum_and_count() {
        let m = RequestMetrics::default();
        m.observe(200, Duration::from_micros(800));
        m.observe(200, Duration::from_micros(1_000));
        m.observe(503, Duration::from_millis(30));
        m.observe(200, Duration::from_secs(10));
        let text = m.render();
        for line in [
            "todomvc_http_request_duration_seconds_bucket{le=\"0.001\"} 2",
            "todomvc_http_request_duration_seconds_bucket{le=\"0.025\"} 2",
            "todomvc_http_request_duration_seconds_bucket{le=\"0.05\"} 3",
            "todomvc_http_request_duration_seconds_bucket{le=\"5\"} 3",
            "todomvc_http_request_duration_seconds_bucket{le=\"+Inf\"} 4",
            "todomvc_http_request_duration_seconds_count 4",
            "todomvc_http_request_duration_seconds_sum 10.0318",
            "todomvc_http_requests_total 4",
            "todomvc_http_server_errors_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(!counted("/healthz") && !counted("/metrics") && counted("/todos"));
    }
}
