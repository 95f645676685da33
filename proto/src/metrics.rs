//! Metrics: what every agent samples on its node every 10 s, the batches it
//! sends the control plane (`POST /agents/{node}/metrics`), and the series
//! the API serves back (`GET /metrics`). Names are a closed set: an unknown
//! one is a 4xx, never a new column or series.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How often an agent samples, in seconds; the raw resolution stored.
pub const SAMPLE_SECS: i64 = 10;
/// The resolution of the aggregates kept after a day, in seconds.
pub const ROLLUP_SECS: i64 = 300;
/// How long raw samples are kept, in seconds (a day).
pub const RAW_KEEP_SECS: i64 = 86_400;
/// How long 5-minute aggregates are kept, in seconds (30 days).
pub const ROLLUP_KEEP_SECS: i64 = 30 * 86_400;
/// Most samples one batch may carry (an agent that was cut off sends its
/// backlog in several).
pub const MAX_BATCH_SAMPLES: usize = 100;

macro_rules! metric_names {
    ($($variant:ident = $code:literal, $name:literal, $unit:literal, $doc:literal;)+) => {
        /// One thing an agent measures. The code is what the database
        /// stores: append only, never reuse one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum MetricName {
            $(
                #[doc = $doc]
                #[serde(rename = $name)]
                $variant,
            )+
        }

        // Written by hand: the derive does not see the `serde(rename)` this
        // macro generates and would list the Rust variant names.
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for MetricName {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(
                        "One thing an agent measures, as the API spells it.",
                    ))
                    .enum_values(Some([$($name),+]))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for MetricName {}

        impl MetricName {
            pub const ALL: &'static [MetricName] = &[$(MetricName::$variant),+];

            /// The name as the API spells it: `cpu.host`, `pg.lag_bytes`.
            pub fn as_str(self) -> &'static str {
                match self { $(MetricName::$variant => $name),+ }
            }

            /// The stored code.
            pub fn code(self) -> i16 {
                match self { $(MetricName::$variant => $code),+ }
            }

            pub fn from_code(code: i16) -> Option<Self> {
                match code { $($code => Some(MetricName::$variant),)+ _ => None }
            }

            /// What the value counts, for axis labels: `%`, `bytes`, `/s`, `ms`.
            pub fn unit(self) -> &'static str {
                match self { $(MetricName::$variant => $unit),+ }
            }
        }

        impl std::str::FromStr for MetricName {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok(MetricName::$variant),)+
                    other => Err(format!(
                        "unknown metric {other:?}; known: {}",
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

metric_names! {
    CpuHost = 1, "cpu.host", "%", "Busy share of all the host's CPUs, 0-100.";
    CpuNode = 2, "cpu.node", "%", "CPU of the node's own processes (agent and services), % of one CPU.";
    MemUsed = 3, "mem.used", "bytes", "Host memory in use (MemTotal - MemAvailable).";
    MemNode = 4, "mem.node_rss", "bytes", "Resident memory of the node's own processes.";
    DiskUsed = 5, "disk.used_pct", "%", "Used share of the file system holding the node's state directory.";
    NetRx = 6, "net.rx", "bytes/s", "Bytes received per second, over every interface.";
    NetTx = 7, "net.tx", "bytes/s", "Bytes sent per second, over every interface.";
    NginxRequests = 8, "nginx.requests", "/s", "Requests per second through the node's nginx.";
    Nginx5xx = 9, "nginx.5xx", "/s", "5xx answers per second nginx gave (from a log of 5xx answers only: stub_status has no status counts).";
    WebappRequests = 10, "webapp.requests", "/s", "Requests per second the webapp answered (not /healthz nor /metrics).";
    WebappLatency = 11, "webapp.latency_ms", "ms", "Mean webapp answer time over the interval.";
    WebappLatencyP95 = 12, "webapp.latency_p95_ms", "ms", "95th percentile webapp answer time over the interval (from histogram buckets).";
    PgCommits = 13, "pg.commits", "/s", "Transactions committed per second, every database.";
    PgConnections = 14, "pg.connections", "", "Client connections to PostgreSQL.";
    PgLagBytes = 15, "pg.lag_bytes", "bytes", "Replication lag: a standby's WAL not yet replayed; on a primary its slowest standby's.";
}

impl std::fmt::Display for MetricName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent measured at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MetricReading {
    /// When, in seconds since the Unix epoch (the server files it under the
    /// 10-second slot it falls in).
    pub at: i64,
    /// Only what the node has: a web node sends no `pg.*`.
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, f64>))]
    pub values: BTreeMap<MetricName, f64>,
}

/// `POST /api/v1/agents/{node}/metrics`: samples, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MetricsBatch {
    /// At most 100.
    #[cfg_attr(feature = "openapi", schema(max_items = 100))]
    pub samples: Vec<MetricReading>,
}

impl MetricsBatch {
    /// Checks the bounds the schema states, naming the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        if self.samples.len() > MAX_BATCH_SAMPLES {
            return Err(format!(
                "{} samples sent, at most {MAX_BATCH_SAMPLES} per batch",
                self.samples.len()
            ));
        }
        for (i, s) in self.samples.iter().enumerate() {
            if let Some((name, v)) = s.values.iter().find(|(_, v)| !v.is_finite()) {
                return Err(format!("sample {i}: {name} is {v}, not a finite number"));
            }
        }
        Ok(())
    }
}

/// What became of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsAccepted {
    /// Values stored.
    pub stored: u64,
    /// Samples skipped: older than the raw retention (a day) or more than
    /// 5 minutes ahead of the server's clock.
    pub skipped: u64,
}

/// One point of a series: the mean over its step and the largest value in it
/// (equal for raw 10-second points).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricPoint {
    /// Start of the step, seconds since the Unix epoch.
    pub at: i64,
    pub value: f64,
    pub max: f64,
}

/// One node's points of a metric, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeSeries {
    pub node: String,
    pub points: Vec<MetricPoint>,
}

/// `GET /api/v1/metrics`: a metric over a time range, per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricSeries {
    pub name: MetricName,
    #[cfg_attr(feature = "openapi", schema(example = "/s"))]
    pub unit: String,
    /// Seconds between points: 10 (raw, the last day) or 300 (5-minute
    /// aggregates, kept 30 days).
    pub step: i64,
    /// The range asked for, seconds since the Unix epoch.
    pub from: i64,
    pub to: i64,
    /// Every node with points in the range (or only the node asked for).
    pub series: Vec<NodeSeries>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip_and_unknown_names_are_refused() {
        let mut codes = std::collections::HashSet::new();
        for &name in MetricName::ALL {
            assert_eq!(name.as_str().parse::<MetricName>(), Ok(name));
            assert_eq!(MetricName::from_code(name.code()), Some(name));
            assert!(codes.insert(name.code()), "code {} twice", name.code());
            let json = serde_json::to_string(&name).expect("json");
            assert_eq!(json, format!("\"{}\"", name.as_str()));
        }
        let err = "cpu.hots".parse::<MetricName>().unwrap_err();
        assert!(err.contains("cpu.host"), "{err}");
        assert!(
            serde_json::from_str::<MetricsBatch>(
                r#"{"samples": [{"at": 1, "values": {"cpu.hots": 1}}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn batches_are_bounded_and_finite() {
        let sample = |v: f64| MetricReading {
            at: 1,
            values: [(MetricName::CpuHost, v)].into(),
        };
        let mut batch = MetricsBatch {
            samples: vec![sample(1.0); MAX_BATCH_SAMPLES],
        };
        assert!(batch.validate().is_ok());
        batch.samples.push(sample(1.0));
        assert!(batch.validate().unwrap_err().contains("at most 100"));
        batch.samples = vec![sample(f64::NAN)];
        assert!(batch.validate().unwrap_err().contains("cpu.host"));
    }
}
