//! Service logs: agents ship the lines their children print
//! (`POST /agents/{node}/logs`); the UI and `corral logs` read the newest of
//! them and follow new ones with a long poll (`GET /nodes/{node}/logs?after=&wait=`).
//! Only the last [`KEPT_LOG_LINES`] lines of each (node, service) are kept,
//! in memory: they are a window for a person looking at a node, not an
//! archive, so they do not go to the database.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use chrono::Utc;
use corral_proto::{
    ErrorBody, KEPT_LOG_BYTES_PER_NODE, KEPT_LOG_LINES, LogBatch, LogLine, MAX_LOG_GREP_CHARS,
    validate_service_name,
};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::IntoParams;

use super::Body;
use crate::auth::Caller;
use crate::cluster::{Cluster, ClusterError};
use crate::error::ApiError;

/// Most services one node may keep logs of, so a confused agent cannot
/// grow the server's memory without bound.
pub const MAX_SERVICES_PER_NODE: usize = 16;

/// The kept lines of every (node, service); one per server, shared by all
/// workers.
pub struct ServiceLogs {
    inner: Mutex<Kept>,
    /// The newest `seq` kept: a following reader parks on it and is woken
    /// by the append that passes its `after`.
    newest: watch::Sender<u64>,
}

impl Default for ServiceLogs {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            newest: watch::Sender::new(0),
        }
    }
}

/// Which kept lines a reader wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogFilter<'a> {
    pub service: Option<&'a str>,
    /// Only lines containing this text (as `grep -F`: plain, case-sensitive).
    pub grep: Option<&'a str>,
}

impl LogFilter<'_> {
    fn keeps(&self, service: &str, line: &LogLine) -> bool {
        self.service.is_none_or(|s| s == service) && self.grep.is_none_or(|g| line.line.contains(g))
    }
}

#[derive(Default)]
struct Kept {
    next_seq: u64,
    by_node: HashMap<String, NodeLogs>,
}

#[derive(Default)]
struct NodeLogs {
    /// Bytes of line text kept over all services, at most
    /// [`KEPT_LOG_BYTES_PER_NODE`].
    bytes: usize,
    services: HashMap<String, VecDeque<LogLine>>,
}

impl NodeLogs {
    /// Drops the node's oldest lines, over all its services, until its text
    /// fits the byte bound.
    fn trim_to_bound(&mut self) {
        while self.bytes > KEPT_LOG_BYTES_PER_NODE {
            let oldest = self
                .services
                .values_mut()
                .filter(|lines| !lines.is_empty())
                .min_by_key(|lines| lines.front().map_or(u64::MAX, |l| l.seq));
            let Some(line) = oldest.and_then(VecDeque::pop_front) else {
                break;
            };
            self.bytes -= line.line.len();
        }
    }
}

impl ServiceLogs {
    /// A store whose `seq`s start at the current time in microseconds, so
    /// they keep growing over a restart of the server and a follower's
    /// `after` from before it does not hide the lines after it.
    pub fn starting_now() -> Self {
        let now = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        let logs = Self::default();
        logs.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq = now;
        logs.newest.send_replace(now);
        logs
    }

    /// Appends a validated batch, dropping the oldest lines past the
    /// bounds: [`KEPT_LOG_LINES`] per service, [`KEPT_LOG_BYTES_PER_NODE`]
    /// per node.
    pub fn append(&self, node: &str, batch: LogBatch) -> Result<(), ApiError> {
        let mut kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Kept { next_seq, by_node } = &mut *kept;
        let node_logs = by_node.entry(node.to_string()).or_default();
        let services = &mut node_logs.services;
        if !services.contains_key(&batch.service) && services.len() >= MAX_SERVICES_PER_NODE {
            return Err(ApiError::Unprocessable(format!(
                "{node} already keeps logs of {MAX_SERVICES_PER_NODE} services; \
                 {:?} would be one more",
                batch.service
            )));
        }
        let at = Utc::now();
        let lines = services.entry(batch.service.clone()).or_default();
        for line in batch.lines {
            *next_seq += 1;
            node_logs.bytes += line.len();
            lines.push_back(LogLine {
                seq: *next_seq,
                service: batch.service.clone(),
                at,
                line,
            });
        }
        let excess = lines.len().saturating_sub(KEPT_LOG_LINES);
        node_logs.bytes -= lines.drain(..excess).map(|l| l.line.len()).sum::<usize>();
        node_logs.trim_to_bound();
        let newest = *next_seq;
        drop(kept);
        self.newest.send_replace(newest);
        Ok(())
    }

    /// The newest `limit` lines of a node that pass `filter` (of all its
    /// services merged in order of arrival), oldest first.
    pub fn recent(&self, node: &str, filter: LogFilter<'_>, limit: usize) -> Vec<LogLine> {
        let kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(NodeLogs { services, .. }) = kept.by_node.get(node) else {
            return Vec::new();
        };
        let mut lines: Vec<LogLine> = services
            .iter()
            .flat_map(|(name, lines)| {
                lines
                    .iter()
                    .rev()
                    .filter(|l| filter.keeps(name, l))
                    .take(limit)
                    .cloned()
            })
            .collect();
        lines.sort_unstable_by_key(|l| l.seq);
        let skip = lines.len().saturating_sub(limit);
        lines.drain(..skip);
        lines
    }

    /// The oldest `limit` kept lines of a node after `after` that pass
    /// `filter`, oldest first: what a follower has not seen yet.
    pub fn after(
        &self,
        node: &str,
        filter: LogFilter<'_>,
        after: u64,
        limit: usize,
    ) -> Vec<LogLine> {
        let kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(NodeLogs { services, .. }) = kept.by_node.get(node) else {
            return Vec::new();
        };
        let mut lines: Vec<LogLine> = services
            .iter()
            .flat_map(|(name, lines)| {
                // Each service's lines are in seq order: skip the seen ones
                // without looking at them.
                let start = lines.partition_point(|l| l.seq <= after);
                lines
                    .range(start..)
                    .filter(|l| filter.keeps(name, l))
                    .take(limit)
                    .cloned()
            })
            .collect();
        lines.sort_unstable_by_key(|l| l.seq);
        lines.truncate(limit);
        lines
    }

    /// Like [`Self::after`], but when nothing is new holds on until a line
    /// that passes `filter` arrives or `wait` ends (then: none).
    pub async fn follow(
        &self,
        node: &str,
        filter: LogFilter<'_>,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> Vec<LogLine> {
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before the first look, so an append between the look
        // and the wait still wakes this reader.
        let mut newest = self.newest.subscribe();
        loop {
            newest.borrow_and_update();
            let lines = self.after(node, filter, after, limit);
            if !lines.is_empty() {
                return lines;
            }
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => continue,
                // The deadline passed (or the store is going away).
                _ => return lines,
            }
        }
    }

    /// Drops what a node left behind (it was removed).
    pub fn forget(&self, node: &str) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_node
            .remove(node);
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/agents/{name}/logs").route(web::post().to(post_logs)))
        .service(web::resource("/nodes/{name}/logs").route(web::get().to(get_logs)));
}

fn logs_of(req_logs: Option<web::Data<ServiceLogs>>) -> Result<web::Data<ServiceLogs>, ApiError> {
    req_logs.ok_or_else(|| ApiError::Internal("service log store missing from app".into()))
}

/// Ships new lines of one of the node's services. The server keeps the
/// last 500 lines of each (node, service) in memory.
#[utoipa::path(
    post,
    path = "/api/v1/agents/{name}/logs",
    tag = "agents",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$")),
    request_body = LogBatch,
    responses(
        (status = 204, description = "Kept"),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Another node's agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Unknown field, bad service name, too many or too long lines, or too many services", body = ErrorBody),
    )
)]
pub async fn post_logs(
    cluster: web::Data<Cluster>,
    logs: Option<web::Data<ServiceLogs>>,
    caller: Caller,
    name: web::Path<String>,
    body: Body<LogBatch>,
) -> Result<HttpResponse, ApiError> {
    caller.require_node(&name)?;
    let batch = body.into_inner();
    batch.validate().map_err(ApiError::Unprocessable)?;
    // Only nodes that exist keep logs (an admin could name any).
    cluster.node(&name).await?;
    logs_of(logs)?.append(&name, batch)?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Only this service's lines (default: all, merged in order of arrival).
    #[param(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    service: Option<String>,
    /// The newest this many lines (default 100); with `after`, the oldest
    /// this many after it.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// Only lines containing this text (plain, case-sensitive; at most 200
    /// characters).
    #[param(max_length = 200)]
    grep: Option<String>,
    /// Follow: only lines with a `seq` greater than this, oldest first.
    #[param(minimum = 0)]
    after: Option<u64>,
    /// With `after`, how long to hold the request when nothing is new:
    /// `30s`, `500ms`, `1m` or plain seconds; capped at the server's
    /// maximum poll wait (60 s by default). `0` (the default) answers at
    /// once, as does any wait without `after` (the newest lines).
    #[param(pattern = "^[0-9]{1,9}(ms|s|m)?$", example = "30s")]
    wait: Option<String>,
}

/// The newest kept log lines of a node, oldest first; or, with `after`,
/// those after it, held as a long poll until one arrives or `wait` ends.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{name}/logs",
    tag = "nodes",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Node name", pattern = "^[a-z][a-z0-9-]{0,62}$"),
        LogsQuery,
    ),
    responses(
        (status = 200, description = "Log lines, oldest first; empty when the wait ended", body = Vec<LogLine>),
        (status = 400, description = "Malformed query, service name, limit, grep or wait", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub async fn get_logs(
    cluster: web::Data<Cluster>,
    logs: Option<web::Data<ServiceLogs>>,
    caller: Caller,
    name: web::Path<String>,
    query: web::Query<LogsQuery>,
) -> Result<web::Json<Vec<LogLine>>, ApiError> {
    caller.require_admin()?;
    if let Some(service) = &query.service {
        validate_service_name(service).map_err(ApiError::BadRequest)?;
    }
    let limit = match query.limit {
        None => 100,
        Some(n) if (1..=KEPT_LOG_LINES as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit={n} is out of range 1..={KEPT_LOG_LINES}"
            )));
        }
    };
    if let Some(grep) = &query.grep
        && grep.chars().count() > MAX_LOG_GREP_CHARS
    {
        return Err(ApiError::BadRequest(format!(
            "grep is longer than {MAX_LOG_GREP_CHARS} characters"
        )));
    }
    // Without `after` the answer is the newest lines, at once: a wait
    // (still checked) has nothing to wait for.
    let wait = match (&query.wait, query.after) {
        (None, _) => Duration::ZERO,
        (Some(w), None) => {
            super::agents::parse_wait(w)?;
            Duration::ZERO
        }
        (Some(w), Some(_)) => super::agents::parse_wait(w)?.min(cluster.config().max_poll_wait),
    };
    let logs = logs_of(logs)?;
    if let Err(e) = cluster.node(&name).await {
        if matches!(e, ClusterError::NotFound(_)) {
            logs.forget(&name);
        }
        return Err(e.into());
    }
    let filter = LogFilter {
        service: query.service.as_deref(),
        grep: query.grep.as_deref().filter(|g| !g.is_empty()),
    };
    Ok(web::Json(match query.after {
        None => logs.recent(&name, filter, limit),
        Some(after) => logs.follow(&name, filter, after, limit, wait).await,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(service: &str, lines: &[&str]) -> LogBatch {
        LogBatch {
            service: service.into(),
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_newest_lines_are_kept_per_service() {
        let logs = ServiceLogs::default();
        for i in 0..3 {
            let lines: Vec<String> = (0..200).map(|j| format!("{}", i * 200 + j)).collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            logs.append("nginx1", batch("nginx", &lines))
                .expect("append");
        }
        logs.append("nginx1", batch("consul", &["c"]))
            .expect("append");
        let nginx = logs.recent("nginx1", only("nginx"), 1000);
        assert_eq!(nginx.len(), KEPT_LOG_LINES);
        assert_eq!(nginx.first().map(|l| l.line.as_str()), Some("100"));
        assert_eq!(nginx.last().map(|l| l.line.as_str()), Some("599"));
        let all = logs.recent("nginx1", LogFilter::default(), 2);
        let lines: Vec<_> = all.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["599", "c"], "merged in order of arrival");
        assert!(logs.recent("nginx2", LogFilter::default(), 10).is_empty());
    }

    fn only(service: &str) -> LogFilter<'_> {
        LogFilter {
            service: Some(service),
            grep: None,
        }
    }

    #[test]
    fn a_follower_gets_the_oldest_unseen_lines_that_match() {
        let logs = ServiceLogs::default();
        logs.append("nginx1", batch("nginx", &["GET /a", "POST /b", "GET /c"]))
            .expect("append");
        logs.append("nginx1", batch("todomvc", &["GET /d"]))
            .expect("append");
        let get = LogFilter {
            service: None,
            grep: Some("GET"),
        };
        let seen: Vec<_> = logs
            .after("nginx1", get, 1, 2)
            .into_iter()
            .map(|l| (l.seq, l.line))
            .collect();
        assert_eq!(seen, [(3, "GET /c".to_string()), (4, "GET /d".to_string())]);
        assert!(logs.after("nginx1", get, 4, 10).is_empty());
        assert_eq!(logs.after("nginx1", only("nginx"), 0, 10).len(), 3);
    }

    #[tokio::test]
    async fn a_follower_is_woken_by_the_append_it_waits_for() {
        let logs = std::sync::Arc::new(ServiceLogs::default());
        let follower = {
            let logs = logs.clone();
            tokio::spawn(async move {
                logs.follow("web1", only("nginx"), 0, 10, Duration::from_secs(30))
                    .await
            })
        };
        tokio::task::yield_now().await;
        // Another service's line does not end the wait; the awaited one does.
        logs.append("web1", batch("consul", &["noise"]))
            .expect("append");
        logs.append("web1", batch("nginx", &["wanted"]))
            .expect("append");
        let lines = tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("woken well before the wait ends")
            .expect("join");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].line, "wanted");
    }

    #[test]
    fn a_node_keeps_a_bounded_number_of_bytes_dropping_its_oldest_lines() {
        let logs = ServiceLogs::default();
        let line = "x".repeat(1000);
        let batch_of = |service: &str| batch(service, &vec![line.as_str(); 200]);
        // 16 services × 500 lines of 1000 bytes would be 8 MB; the node keeps
        // its newest 1 MiB over all of them.
        for round in 0..3 {
            for i in 0..MAX_SERVICES_PER_NODE {
                logs.append("web1", batch_of(&format!("s{i}")))
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
        }
        let kept = logs.recent("web1", LogFilter::default(), KEPT_LOG_LINES);
        let all: usize = (0..MAX_SERVICES_PER_NODE)
            .map(|i| {
                logs.recent("web1", only(&format!("s{i}")), KEPT_LOG_LINES)
                    .len()
            })
            .sum();
        assert_eq!(all, KEPT_LOG_BYTES_PER_NODE / 1000);
        let bytes = logs.inner.lock().expect("lock").by_node["web1"].bytes;
        assert_eq!(bytes, all * 1000);
        // The newest lines stay, over all services: the last round's last
        // five batches and the end of the one before.
        let count = |s: &str| logs.recent("web1", only(s), KEPT_LOG_LINES).len();
        assert_eq!(count("s15"), 200);
        assert_eq!(count("s11"), 200);
        assert_eq!(count("s10"), KEPT_LOG_BYTES_PER_NODE / 1000 - 1000);
        assert_eq!(count("s0"), 0);
        assert_eq!(kept.last().map(|l| l.service.as_str()), Some("s15"));
    }

    #[test]
    fn seqs_keep_growing_over_a_restart_of_the_server() {
        let before = ServiceLogs::starting_now();
        before
            .append("web1", batch("nginx", &["a", "b"]))
            .expect("append");
        let seen = before.recent("web1", LogFilter::default(), 10);
        let last = seen.last().map(|l| l.seq).expect("a line");
        // The restart comes later than the last line's number: wait for the
        // clock to pass it rather than for a fixed time.
        while u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0) <= last {
            std::hint::spin_loop();
        }
        let after = ServiceLogs::starting_now();
        after
            .append("web1", batch("nginx", &["c"]))
            .expect("append");
        let new = after.after("web1", LogFilter::default(), last, 10);
        assert_eq!(
            new.len(),
            1,
            "a follower from before the restart sees the new line"
        );
    }

    #[test]
    fn a_node_keeps_logs_of_a_bounded_number_of_services() {
        let logs = ServiceLogs::default();
        for i in 0..MAX_SERVICES_PER_NODE {
            logs.append("pg1", batch(&format!("s{i}"), &["x"]))
                .expect("append");
        }
        assert!(matches!(
            logs.append("pg1", batch("one-more", &["x"])),
            Err(ApiError::Unprocessable(_))
        ));
        logs.append("pg1", batch("s0", &["y"]))
            .expect("a known service still appends");
    }
}
