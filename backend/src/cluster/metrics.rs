//! Metrics agents send (`POST /agents/{node}/metrics`), the series the API
//! serves (`GET /metrics`), and their retention, which the leader applies
//! with the other pruning: raw 10-second points for a day, 5-minute
//! aggregates for 30 days (see `store::metrics`).

use chrono::Utc;
use corral_proto::metrics::{RAW_KEEP_SECS, ROLLUP_SECS, SAMPLE_SECS};
use corral_proto::{MetricName, MetricSeries, MetricsAccepted, MetricsBatch, NodeSeries};

use super::{Cluster, ClusterError};
use crate::store::metrics::{self as stored, RawPoint};

/// Samples stamped further ahead of the server's clock than this are
/// skipped: the node's clock is wrong, and they would crowd out real ones.
pub const MAX_AHEAD_SECS: i64 = 300;
/// A bucket is rolled up once it closed this long ago, so the samples of
/// its last slots, sent every 10 s, have arrived.
const ROLLUP_GRACE_SECS: i64 = 20;

/// A request for a series, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesQuery {
    /// One node, or every current node.
    pub node: Option<String>,
    pub name: MetricName,
    /// Seconds since the epoch, `from <= to`.
    pub from: i64,
    pub to: i64,
    /// 10 or 300; chosen from the range when absent.
    pub step: Option<i64>,
}

/// Which samples of a batch are kept: within the raw retention and not from
/// the future. Returns the points and how many samples were skipped.
pub fn points_of(batch: &MetricsBatch, now: i64) -> (Vec<RawPoint>, u64) {
    let mut points = Vec::new();
    let mut skipped = 0;
    for sample in &batch.samples {
        if sample.at < now - RAW_KEEP_SECS || sample.at > now + MAX_AHEAD_SECS {
            skipped += 1;
            continue;
        }
        points.extend(sample.values.iter().map(|(&name, &value)| RawPoint {
            name,
            at: sample.at,
            value,
        }));
    }
    (points, skipped)
}

impl Cluster {
    /// Stores a node's batch of samples.
    pub async fn record_metrics(
        &self,
        node: &str,
        batch: &MetricsBatch,
    ) -> Result<MetricsAccepted, ClusterError> {
        batch.validate().map_err(ClusterError::Invalid)?;
        // Only nodes that exist keep metrics (an admin could name any).
        self.node_row(self.store.conn(), node).await?;
        let (points, skipped) = points_of(batch, Utc::now().timestamp());
        let stored = stored::insert_raw(self.store.conn(), node, &points).await?;
        self.counters.metric_values.add(points.len() as u64);
        Ok(MetricsAccepted {
            stored: stored.min(points.len() as u64),
            skipped,
        })
    }

    /// A metric over a time range: of one node (404 if there is no such
    /// node), or of every node that has points in the range.
    pub async fn metric_series(&self, q: SeriesQuery) -> Result<MetricSeries, ClusterError> {
        if q.from > q.to {
            return Err(ClusterError::Invalid(format!(
                "from ({}) is after to ({})",
                q.from, q.to
            )));
        }
        let step = match q.step {
            None => stored::step_for(q.from, q.to, Utc::now().timestamp()),
            Some(s) if s == SAMPLE_SECS || s == ROLLUP_SECS => s,
            Some(s) => {
                return Err(ClusterError::Invalid(format!(
                    "step={s}: points are kept at {SAMPLE_SECS} or {ROLLUP_SECS} seconds"
                )));
            }
        };
        let c = self.store.conn();
        let nodes = match &q.node {
            Some(name) => vec![self.node_row(c, name).await?.name],
            None => crate::store::node_names(c)
                .await?
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
        };
        let series = stored::series(c, &nodes, q.name, step, q.from, q.to)
            .await?
            .into_iter()
            .map(|(node, points)| NodeSeries { node, points })
            .collect();
        Ok(MetricSeries {
            name: q.name,
            unit: q.name.unit().to_string(),
            step,
            from: q.from,
            to: q.to,
            series,
        })
    }

    /// Rolls closed buckets up into 5-minute points and deletes what the
    /// retention no longer keeps, as of `now` (seconds since the epoch).
    /// Returns (buckets rolled up, points deleted).
    pub async fn prune_metrics(&self, now: i64) -> Result<(u64, u64), ClusterError> {
        let c = self.store.conn();
        let rolled = stored::roll_up(c, now - ROLLUP_GRACE_SECS).await?;
        let gone = stored::prune(c, now).await?;
        if rolled + gone > 0 {
            tracing::debug!(rolled, gone, "metrics rolled up and pruned");
        }
        Ok((rolled, gone))
    }
}

#[cfg(test)]
mod tests {
    use corral_proto::MetricReading;

    use super::*;

    #[test]
    fn samples_outside_the_raw_window_are_skipped() {
        let now = 1_000_000;
        let reading = |at| MetricReading {
            at,
            values: [(MetricName::CpuHost, 1.0), (MetricName::MemUsed, 2.0)].into(),
        };
        let batch = MetricsBatch {
            samples: vec![
                reading(now - RAW_KEEP_SECS - 1),
                reading(now - 10),
                reading(now + MAX_AHEAD_SECS),
                reading(now + MAX_AHEAD_SECS + 1),
            ],
        };
        let (points, skipped) = points_of(&batch, now);
        assert_eq!(skipped, 2);
        assert_eq!(points.len(), 4);
        assert!(
            points
                .iter()
                .all(|p| p.at == now - 10 || p.at == now + MAX_AHEAD_SECS)
        );
    }
}
