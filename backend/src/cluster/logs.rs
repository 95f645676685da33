//! Service logs: agents ship the lines their children print (`POST
//! /agents/{node}/logs`); the UI and `corral logs` read the newest of them
//! and follow new ones with a long poll (`GET /nodes/{node}/logs?after=&wait=`).
//!
//! The lines are in the database (`store::logs`), so every server sharing it
//! serves the same lines with the same seqs — an agent may ship to one
//! server while the UI reads from another — and they outlive a restart. A
//! node keeps the last [`KEPT_LOG_LINES`] lines of each service and at most
//! [`KEPT_LOG_BYTES_PER_NODE`] of text: a window for a person looking at a
//! node, not an archive. A follower parks on a generation counter bumped by
//! every append here and, through the peers' notifications, by every append
//! on another server; woken, it reads after its seq again.

use std::time::Duration;

use chrono::Utc;
use corral_proto::{KEPT_LOG_BYTES_PER_NODE, KEPT_LOG_LINES, LogBatch, LogLine};

use super::peers::Wake;
use super::{Cluster, ClusterError};
use crate::store::entity::log_line;
use crate::store::logs::{self as stored, LogFilter};

/// Most services one node may keep logs of, so a confused agent cannot
/// grow the database without bound.
pub const MAX_SERVICES_PER_NODE: usize = 16;

fn line_from_row(row: log_line::Model) -> LogLine {
    LogLine {
        seq: u64::try_from(row.id).unwrap_or(0),
        service: row.service,
        at: row.at,
        line: row.line,
    }
}

impl Cluster {
    /// Keeps a validated batch of `node`'s lines (404 if there is no such
    /// node; 422 for a service past the node's [`MAX_SERVICES_PER_NODE`]),
    /// and wakes the followers here and on the other servers.
    pub async fn append_logs(&self, node: &str, batch: LogBatch) -> Result<(), ClusterError> {
        let conn = self.store.conn();
        // Only nodes that exist keep logs (an admin could name any).
        self.node_row(conn, node).await?;
        let services = stored::services(conn, node).await?;
        if !services.contains(&batch.service) && services.len() >= MAX_SERVICES_PER_NODE {
            return Err(ClusterError::Invalid(format!(
                "{node} already keeps logs of {MAX_SERVICES_PER_NODE} services; \
                 {:?} would be one more",
                batch.service
            )));
        }
        let last = stored::append(
            conn,
            node,
            &batch.service,
            Utc::now(),
            batch.lines,
            KEPT_LOG_LINES as u64,
            KEPT_LOG_BYTES_PER_NODE as u64,
        )
        .await?;
        if last.is_some() {
            self.logs_appended();
            let wake = Wake {
                logs: true,
                ..Wake::default()
            };
            if let Err(e) = self.notify_peers(conn, &wake).await {
                // Kept all the same; followers on other servers see the
                // lines at their next look.
                tracing::warn!(error = %e, "telling other servers about log lines failed");
            }
        }
        Ok(())
    }

    /// Wakes this server's followers: lines were appended somewhere.
    pub(super) fn logs_appended(&self) {
        self.log_appends.send_modify(|generation| *generation += 1);
    }

    /// The newest `limit` lines of `node` that pass `filter`, oldest first;
    /// or, with `after`, the oldest `limit` after that seq, held until one
    /// arrives or `wait` ends (then: none).
    pub async fn log_lines(
        &self,
        node: &str,
        filter: LogFilter<'_>,
        after: Option<u64>,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<LogLine>, ClusterError> {
        let conn = self.store.conn();
        self.node_row(conn, node).await?;
        let Some(after) = after else {
            let rows = stored::recent(conn, node, filter, limit).await?;
            return Ok(rows.into_iter().map(line_from_row).collect());
        };
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before the first look, so an append between the look
        // and the wait still wakes this reader.
        let mut appended = self.log_appends.subscribe();
        loop {
            appended.borrow_and_update();
            let rows = stored::after(conn, node, filter, after, limit).await?;
            if !rows.is_empty() {
                return Ok(rows.into_iter().map(line_from_row).collect());
            }
            match tokio::time::timeout_at(deadline, appended.changed()).await {
                Ok(Ok(())) => continue,
                // The deadline passed (or the cluster is going away).
                _ => return Ok(Vec::new()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn batch(service: &str, lines: &[&str]) -> LogBatch {
        LogBatch {
            service: service.into(),
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn only(service: &str) -> LogFilter<'_> {
        LogFilter {
            service: Some(service),
            grep: None,
        }
    }

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::connect(&crate::store::sqlite_url(dir.path()))
            .await
            .expect("store");
        (store, dir)
    }

    async fn append(store: &Store, node: &str, batch: LogBatch) {
        stored::append(
            store.conn(),
            node,
            &batch.service,
            Utc::now(),
            batch.lines,
            KEPT_LOG_LINES as u64,
            KEPT_LOG_BYTES_PER_NODE as u64,
        )
        .await
        .expect("append");
    }

    async fn texts(store: &Store, node: &str, filter: LogFilter<'_>, limit: u64) -> Vec<String> {
        stored::recent(store.conn(), node, filter, limit)
            .await
            .expect("recent")
            .into_iter()
            .map(|l| l.line)
            .collect()
    }

    #[tokio::test]
    async fn only_the_newest_lines_are_kept_per_service() {
        let (store, _dir) = store().await;
        for i in 0..3 {
            let lines: Vec<String> = (0..200).map(|j| format!("{}", i * 200 + j)).collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            append(&store, "nginx1", batch("nginx", &lines)).await;
        }
        append(&store, "nginx1", batch("consul", &["c"])).await;
        let nginx = texts(&store, "nginx1", only("nginx"), 1000).await;
        assert_eq!(nginx.len(), KEPT_LOG_LINES);
        assert_eq!(nginx.first().map(String::as_str), Some("100"));
        assert_eq!(nginx.last().map(String::as_str), Some("599"));
        let all = texts(&store, "nginx1", LogFilter::default(), 2).await;
        assert_eq!(all, ["599", "c"], "merged in order of arrival");
        assert!(
            texts(&store, "nginx2", LogFilter::default(), 10)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_follower_gets_the_oldest_unseen_lines_that_match() {
        let (store, _dir) = store().await;
        append(
            &store,
            "nginx1",
            batch("nginx", &["GET /a", "POST /b", "GET /c"]),
        )
        .await;
        append(&store, "nginx1", batch("todomvc", &["GET /d", "get /e"])).await;
        let get = LogFilter {
            service: None,
            grep: Some("GET"),
        };
        let all = stored::recent(store.conn(), "nginx1", LogFilter::default(), 10)
            .await
            .expect("recent");
        let first = all[0].id;
        let seen: Vec<_> = stored::after(store.conn(), "nginx1", get, first, 2)
            .await
            .expect("after")
            .into_iter()
            .map(|l| (l.id - first, l.line))
            .collect();
        assert_eq!(seen, [(2, "GET /c".to_string()), (3, "GET /d".to_string())]);
        assert!(
            stored::after(store.conn(), "nginx1", get, first + 3, 10)
                .await
                .expect("after")
                .is_empty(),
            "grep is case-sensitive"
        );
        let nginx = stored::after(store.conn(), "nginx1", only("nginx"), 0, 10)
            .await
            .expect("after");
        assert_eq!(nginx.len(), 3);
    }

    #[tokio::test]
    async fn a_node_keeps_a_bounded_number_of_bytes_dropping_its_oldest_lines() {
        let (store, _dir) = store().await;
        let line = "x".repeat(1000);
        let batch_of = |service: &str| batch(service, &vec![line.as_str(); 200]);
        // 16 services × 500 lines of 1000 bytes would be 8 MB; the node keeps
        // its newest 1 MiB over all of them.
        for _round in 0..3 {
            for i in 0..MAX_SERVICES_PER_NODE {
                append(&store, "web1", batch_of(&format!("s{i}"))).await;
            }
        }
        let mut counts = Vec::new();
        for i in 0..MAX_SERVICES_PER_NODE {
            counts.push(
                texts(
                    &store,
                    "web1",
                    only(&format!("s{i}")),
                    KEPT_LOG_LINES as u64,
                )
                .await
                .len(),
            );
        }
        let all: usize = counts.iter().sum();
        assert_eq!(all, KEPT_LOG_BYTES_PER_NODE / 1000);
        // The newest lines stay, over all services: the last round's last
        // five batches and the end of the one before.
        assert_eq!(counts[15], 200);
        assert_eq!(counts[11], 200);
        assert_eq!(counts[10], KEPT_LOG_BYTES_PER_NODE / 1000 - 1000);
        assert_eq!(counts[0], 0);
    }

    #[tokio::test]
    async fn seqs_keep_growing_when_old_lines_go() {
        let (store, _dir) = store().await;
        let lines: Vec<String> = (0..KEPT_LOG_LINES + 5).map(|i| i.to_string()).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        append(&store, "web1", batch("nginx", &lines)).await;
        let kept = stored::recent(store.conn(), "web1", LogFilter::default(), 1000)
            .await
            .expect("recent");
        let last = kept.last().expect("a line").id;
        append(&store, "web1", batch("nginx", &["new"])).await;
        let new = stored::after(store.conn(), "web1", LogFilter::default(), last, 10)
            .await
            .expect("after");
        assert_eq!(new.len(), 1);
        assert!(new[0].id > last);
    }
}
