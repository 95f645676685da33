//! Backups of the PostgreSQL cluster: base backups taken by a db node's
//! agent (`pg_basebackup`, from a streaming standby when there is one),
//! the continuously archived WAL, both checksummed (SHA-256) and kept in
//! adm1's backup store (and, optionally, copied to an S3-compatible
//! bucket), and point-in-time restores of them into a fresh
//! PostgreSQL instance that never joins the cluster.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The work order that takes backup `id` on the node it is filed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupSpec {
    /// The backup's id in the control plane; files go up under it.
    pub id: i64,
}

/// The work order that restores backup `backup_id` (plus the archived WAL
/// up to `target_time`) into a new PostgreSQL instance `name` on the node
/// it is filed to, verifies it and reports what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreSpec {
    /// The restored instance's name: its directory on the node.
    pub name: String,
    pub backup_id: i64,
    /// Replay the WAL up to this time; `None`: all the archived WAL.
    pub target_time: Option<DateTime<Utc>>,
    /// The port the restored instance listens on (on the node's address).
    pub port: u16,
    /// The application database whose tables the verification counts.
    pub database: String,
}

/// Where a backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BackupStatus {
    /// Ordered; the agent is taking and uploading it.
    Running,
    /// Every file is in the store and its checksum verified.
    Done,
    /// The agent could not take or ship it; `error` says why.
    Failed,
}

impl BackupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupStatus::Running => "running",
            BackupStatus::Done => "done",
            BackupStatus::Failed => "failed",
        }
    }
}

/// One file of a base backup, as stored on adm1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupFile {
    #[cfg_attr(feature = "openapi", schema(example = "base.tar"))]
    pub name: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// A base backup as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Backup {
    pub id: i64,
    /// The db node it was taken on.
    pub node: String,
    pub status: BackupStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Total bytes of its files.
    pub size_bytes: u64,
    pub files: Vec<BackupFile>,
    /// Where the WAL needed to make it consistent starts.
    pub wal_start_lsn: Option<String>,
    /// Where that WAL ends: a restore reaches no time before it.
    pub wal_end_lsn: Option<String>,
    pub timeline: Option<u32>,
    pub error: Option<String>,
    /// Who asked for it: an actor (`admin`) or `schedule`.
    pub trigger: String,
    /// When its every file was copied to the offsite S3 bucket; absent
    /// while not (yet) copied or when no bucket is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_copied_at: Option<DateTime<Utc>>,
}

/// What an agent reports when a backup's files are all uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BackupReport {
    /// Empty when the backup failed.
    #[serde(default)]
    pub files: Vec<BackupFile>,
    #[serde(default)]
    pub wal_start_lsn: Option<String>,
    #[serde(default)]
    pub wal_end_lsn: Option<String>,
    #[serde(default)]
    pub timeline: Option<u32>,
    /// Set when the backup failed: why (at most 2000 characters).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 2000))]
    pub error: Option<String>,
}

/// `POST /api/v1/db/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Name of the new instance the backup is restored into (on adm1, or
    /// on the new node with `new_node`; never part of the replicated
    /// cluster): 1-32 lower-case letters, digits and '-'.
    #[cfg_attr(feature = "openapi", schema(example = "restore1", max_length = 32))]
    pub to: String,
    /// Restore to this moment (RFC 3339); absent: to the end of the
    /// archived WAL. A base backup must have finished before it.
    #[serde(default)]
    pub time: Option<DateTime<Utc>>,
    /// Port of the restored instance (1024-65535; default 5433 on adm1,
    /// 5432 on a new node).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1024, maximum = 65535))]
    pub port: Option<u16>,
    /// Restore into a new node of the cluster (`restoreN`, with its own
    /// address, agent, Consul client and firewall) instead of adm1. Its
    /// database never joins replication or failover; remove the node with
    /// `DELETE /nodes/{name}` when done.
    #[serde(default)]
    pub new_node: bool,
    /// The provider that makes the new node (default: the server's);
    /// only with `new_node`.
    #[serde(default)]
    pub provider: Option<crate::node::Provider>,
}

/// The answer to a restore request: the order filed on the restoring node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreAccepted {
    /// The node that restores: adm1, or the new `restoreN` node.
    pub node: String,
    /// Follow it in `GET /nodes/{node}/orders`; its result is the
    /// verification report.
    pub seq: i64,
    pub backup_id: i64,
    pub name: String,
    pub port: u16,
}

/// What a restore found, as the restore order's result (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub name: String,
    pub backup_id: i64,
    pub target_time: Option<DateTime<Utc>>,
    /// Where the instance listens (`address:port`).
    pub listen: String,
    /// Rows per table of the application database.
    pub row_counts: Vec<(String, i64)>,
    /// Commit time of the last transaction replayed, as PostgreSQL logged it.
    pub last_replayed: Option<String>,
    pub wal_segments: usize,
    pub seconds: f64,
}

/// `GET /api/v1/backups/status`: the schedule, the last good backup and
/// whether the one due is overdue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupsStatus {
    pub schedule: Option<crate::topology::BackupSchedule>,
    /// The newest backup that finished done.
    pub last_done: Option<Backup>,
    /// When the last scheduled backup was due.
    pub due: Option<DateTime<Utc>>,
    /// A scheduled backup was due more than an hour ago and none has
    /// finished since.
    pub overdue: bool,
    /// The offsite copy, when an S3 bucket is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<OffsiteStatus>,
}

/// Where the copy of adm1's backup store to an S3-compatible bucket
/// stands (this server's store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OffsiteStatus {
    pub endpoint: String,
    pub bucket: String,
    /// Prepended to every object key.
    pub prefix: String,
    /// Files of done backups and archived WAL not yet in the bucket, as of
    /// the last pass.
    pub pending_files: u64,
    /// Why the last pass failed; absent when it succeeded. A failing copy
    /// is retried with backoff and never holds up a local backup.
    pub last_error: Option<String>,
    /// Since when every pass has failed.
    pub failing_since: Option<DateTime<Utc>>,
    /// When a pass last finished with nothing left to copy.
    pub last_caught_up: Option<DateTime<Utc>>,
}

/// The default port of a restored instance.
pub const RESTORE_PORT: u16 = 5433;

/// Restore names: 1-32 lower-case letters, digits and '-', starting with a
/// letter (they name a directory).
pub fn validate_restore_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid restore name {name:?}: use 1-32 lower-case letters, digits and '-', starting with a letter"
        ))
    }
}

/// Whether `name` is a file PostgreSQL archives: a WAL segment
/// (`000000010000000000000003`), a timeline history (`00000002.history`),
/// a backup history file (`…03.00000028.backup`) or a partial segment.
pub fn is_wal_file_name(name: &str) -> bool {
    if !name.is_ascii() {
        return false;
    }
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(tli) = name.strip_suffix(".history") {
        return hex(tli, 8);
    }
    let (seg, rest) = name.split_at(name.len().min(24));
    if !hex(seg, 24) {
        return false;
    }
    match rest {
        "" | ".partial" => true,
        r => r
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".backup"))
            .is_some_and(|off| hex(off, 8)),
    }
}

/// The WAL segment file holding `lsn` (`0/3000028`) on `timeline`, with
/// PostgreSQL's default 16 MiB segments.
pub fn segment_name(timeline: u32, lsn: &str) -> Option<String> {
    let (hi, lo) = lsn.split_once('/')?;
    let pos = (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
    let seg = pos / (16 << 20);
    let per_id = 0x1_0000_0000u64 / (16 << 20);
    Some(format!(
        "{timeline:08X}{:08X}{:08X}",
        seg / per_id,
        seg % per_id
    ))
}

/// Names of the files of a base backup (pg_basebackup's tar format).
pub fn is_backup_file_name(name: &str) -> bool {
    matches!(name, "base.tar" | "pg_wal.tar" | "backup_manifest")
}

/// A backup schedule: a time of day (`HH:MM`, UTC) at which a backup is
/// taken every day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyAt {
    pub hour: u32,
    pub minute: u32,
}

impl DailyAt {
    pub fn parse(s: &str) -> Result<DailyAt, String> {
        let bad =
            || format!("backup schedule {s:?} is not a time of day HH:MM (UTC), e.g. \"03:00\"");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let hour: u32 = h.parse().map_err(|_| bad())?;
        let minute: u32 = m.parse().map_err(|_| bad())?;
        if hour > 23 || minute > 59 {
            return Err(bad());
        }
        Ok(DailyAt { hour, minute })
    }

    /// The latest moment at or before `now` when a backup was due.
    pub fn last_due(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let today = now
            .date_naive()
            .and_hms_opt(self.hour, self.minute, 0)
            .map(|t| t.and_utc())
            .unwrap_or(now);
        if today <= now {
            today
        } else {
            today - chrono::Duration::days(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_file_names_are_recognised_and_nothing_else() {
        for ok in [
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000003.00000028.backup",
            "000000010000000000000003.partial",
        ] {
            assert!(is_wal_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../../etc/passwd",
            "00000001000000000000000",
            "0000000100000000000000030",
            "000000010000000000000003.backup",
            "0000000g0000000000000003",
            "x.history",
            "0\u{80}\u{80}\u{80}\u{80}\u{10000}\u{10000}\u{10000}\u{10000}",
            "À򫳑󥣜©󪱦򠁙þ·",
        ] {
            assert!(!is_wal_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn segments_are_named_as_postgres_names_them() {
        assert_eq!(
            segment_name(1, "0/3000028").as_deref(),
            Some("000000010000000000000003")
        );
        assert_eq!(
            segment_name(2, "1/FF000000").as_deref(),
            Some("0000000200000001000000FF")
        );
        assert_eq!(segment_name(1, "nonsense"), None);
    }

    #[test]
    fn schedules_parse_as_times_of_day_and_nothing_else() {
        assert_eq!(DailyAt::parse("03:00"), Ok(DailyAt { hour: 3, minute: 0 }));
        assert_eq!(
            DailyAt::parse("23:59"),
            Ok(DailyAt {
                hour: 23,
                minute: 59
            })
        );
        for bad in ["3:00", "24:00", "12:60", "noon", "", "03:00:00", "-1:00"] {
            assert!(DailyAt::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_last_due_time_is_today_once_passed_else_yesterday() {
        let at = DailyAt { hour: 3, minute: 0 };
        let now = "2026-12-03T12:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        assert_eq!(at.last_due(now).to_rfc3339(), "2026-12-03T03:00:00+00:00");
        let early = "2026-12-03T02:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        assert_eq!(at.last_due(early).to_rfc3339(), "2026-12-02T03:00:00+00:00");
    }
}
