//! Service logs agents ship to the control plane: a batch of lines of one
//! service, and the lines as the API hands them back. The cluster keeps only
//! the newest lines of each (node, service), in its state database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most lines one batch may carry.
pub const MAX_LOG_BATCH_LINES: usize = 200;
/// Longest line, in characters.
pub const MAX_LOG_LINE_CHARS: usize = 1000;
/// Lines kept per (node, service); older ones are dropped.
pub const KEPT_LOG_LINES: usize = 500;
/// Bytes of line text kept per node over all its services; past it the
/// node's oldest lines are dropped first.
pub const KEPT_LOG_BYTES_PER_NODE: usize = 1 << 20;
/// Longest text a log search (`grep`) may look for, in characters.
pub const MAX_LOG_GREP_CHARS: usize = 200;

/// `POST /api/v1/agents/{node}/logs`: new lines of one service, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogBatch {
    /// `consul`, `nginx`, `postgres`, `todomvc`, `agent`, ...
    #[cfg_attr(
        feature = "openapi",
        schema(example = "nginx", pattern = "^[a-z][a-z0-9_-]{0,31}$")
    )]
    pub service: String,
    /// At most 200 lines of at most 1000 characters each.
    #[cfg_attr(feature = "openapi", schema(max_items = 200))]
    pub lines: Vec<String>,
}

impl LogBatch {
    /// Checks the bounds the schema states, naming the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        validate_service_name(&self.service)?;
        if self.lines.len() > MAX_LOG_BATCH_LINES {
            return Err(format!(
                "{} lines sent, at most {MAX_LOG_BATCH_LINES} per batch",
                self.lines.len()
            ));
        }
        if let Some(i) = self
            .lines
            .iter()
            .position(|l| l.chars().count() > MAX_LOG_LINE_CHARS)
        {
            return Err(format!(
                "line {i} is longer than {MAX_LOG_LINE_CHARS} characters"
            ));
        }
        Ok(())
    }
}

/// A service name as logs are filed under: a lowercase letter, then up to
/// 31 lowercase letters, digits, `_` or `-`.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid service name {name:?}: a lowercase letter, then up to 31 of a-z, 0-9, _ or -"
        ))
    }
}

/// One kept line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// Order of arrival over all services of the server, strictly
    /// increasing, also over a restart of the server (it starts at the
    /// server's start time in microseconds).
    pub seq: u64,
    #[cfg_attr(feature = "openapi", schema(example = "nginx"))]
    pub service: String,
    /// When the server received it.
    pub at: DateTime<Utc>,
    pub line: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_checked() {
        for good in ["nginx", "todomvc", "pg_basebackup", "a", "consul-1"] {
            assert!(validate_service_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Nginx", "1nginx", "ng inx", "../etc", &"a".repeat(33)] {
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn batches_are_bounded() {
        let mut batch = LogBatch {
            service: "nginx".into(),
            lines: vec!["x".repeat(MAX_LOG_LINE_CHARS); MAX_LOG_BATCH_LINES],
        };
        assert!(batch.validate().is_ok());
        batch.lines.push("one more".into());
        assert!(batch.validate().unwrap_err().contains("at most 200"));
        batch.lines = vec!["ok".into(), "é".repeat(MAX_LOG_LINE_CHARS + 1)];
        assert!(batch.validate().unwrap_err().contains("line 1"));
    }
}
