//! Backups: taking one (a `backup` order on a streaming standby, else the
//! primary), receiving its files and the archived WAL into adm1's store,
//! recording how it went, and restoring one point-in-time into a new
//! instance (a `restore` order) on adm1 or on a new `restoreN` node made
//! for it; the restored database never joins the cluster.
//! The copy to the offsite bucket is `offsite.rs`; a restore reads back
//! from it the files the store lost.

use actix_web::web::Bytes;
use chrono::{DateTime, Utc};
use std::time::Duration;

use corral_proto::backup::{DailyAt, is_backup_file_name, is_wal_file_name, validate_restore_name};
use corral_proto::{
    Backup, BackupFile, BackupReport, BackupSpec, BackupStatus, BackupsStatus, NodeState,
    ObservedState, Order, OrderKind, Provider, RESTORE_PORT, ReplicationRole, RestoreAccepted,
    RestoreRequest, RestoreSpec, Role, WorkOrder, ports,
};
use futures_util::Stream;

use super::change::Outcome;
use super::rows::order_row;
use super::{Cluster, ClusterError};
use crate::auth::Caller;
use crate::backup_store::{BackupStore, MAX_WAL_BYTES, StoreFileError, is_sha256};
use crate::bus::OrderBatch;
use crate::reconcile::{self, DB_NAME};
use crate::store::{self, NewEvent, NewNodeRow, backup, node};
use crate::switchover::Standing;

/// A scheduled backup counts as overdue this long after it was due.
pub const OVERDUE_AFTER: Duration = Duration::from_secs(3600);
/// A scheduled backup that could not be ordered is tried again this often.
const RETRY_SCHEDULED: Duration = Duration::from_secs(300);
/// How often the schedule is looked at.
const SCHEDULE_EVERY: Duration = Duration::from_secs(15);

/// Where the schedule stands at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// When the last scheduled backup was due.
    pub due: DateTime<Utc>,
    /// No backup started since then is running or done: take one.
    pub take: bool,
    /// None finished done since, and it was due longer than the grace ago.
    pub overdue: bool,
}

/// Decides from the recent backups (any order) whether the backup due at
/// the last `at` is still to be taken and whether it is overdue.
pub fn due_state(at: DailyAt, now: DateTime<Utc>, recent: &[Backup], grace: Duration) -> Due {
    let due = at.last_due(now);
    let since = |b: &&Backup| b.started_at >= due;
    let taken = recent
        .iter()
        .filter(since)
        .any(|b| b.status != BackupStatus::Failed);
    let done = recent
        .iter()
        .any(|b| b.status == BackupStatus::Done && b.finished_at.is_some_and(|f| f >= due));
    let late = (now - due).to_std().unwrap_or_default() > grace;
    Due {
        due,
        take: !taken,
        overdue: !done && late,
    }
}

/// What the scheduler remembers between ticks.
#[derive(Default)]
struct ScheduleMemory {
    /// The due time last tried and when.
    tried: Option<(DateTime<Utc>, std::time::Instant)>,
    /// The due time already reported overdue.
    overdue_for: Option<DateTime<Utc>>,
}

/// Takes the scheduled backups and reports overdue ones, until the cluster
/// is dropped.
pub(super) async fn schedule_backups(cluster: std::sync::Weak<Cluster>) {
    let mut memory = ScheduleMemory::default();
    let mut tick = tokio::time::interval(SCHEDULE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if !cluster.is_leader() {
            // The leader keeps the schedule (servers sharing a database).
            continue;
        }
        if let Err(e) = cluster.schedule_tick(&mut memory).await {
            tracing::warn!(error = %e, "the backup schedule failed a tick");
        }
    }
}

/// The node restores run on: the control plane's own, beside the store.
pub const RESTORE_NODE: &str = "adm1";

/// Where a backup is taken: the streaming standby least behind, so the
/// primary is not loaded; the primary when no standby streams. Only db
/// nodes that are active and heartbeating count.
pub fn backup_source(standings: &[Standing]) -> Option<String> {
    let live = |s: &&Standing| s.role == Role::Db && s.state == NodeState::Active && s.fresh;
    let standby = standings
        .iter()
        .filter(live)
        .filter_map(|s| s.replication.as_ref().map(|r| (s, r)))
        .filter(|(_, r)| {
            r.role == ReplicationRole::Replica && r.state.as_deref() == Some("streaming")
        })
        .min_by_key(|(s, r)| (r.lag_bytes.unwrap_or(u64::MAX), s.name.clone()))
        .map(|(s, _)| s.name.clone());
    standby.or_else(|| {
        standings
            .iter()
            .filter(live)
            .find(|s| {
                s.replication
                    .as_ref()
                    .is_some_and(|r| r.role == ReplicationRole::Primary)
            })
            .map(|s| s.name.clone())
    })
}

fn is_lsn(s: &str) -> bool {
    s.split_once('/').is_some_and(|(a, b)| {
        [a, b]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 8 && p.bytes().all(|c| c.is_ascii_hexdigit()))
    })
}

pub fn backup_from_row(row: &backup::Model) -> Result<Backup, ClusterError> {
    let files: Vec<BackupFile> = serde_json::from_str(&row.files)
        .map_err(|e| ClusterError::Internal(format!("backup {} files: {e}", row.id)))?;
    Ok(Backup {
        id: row.id,
        node: row.node.clone(),
        status: row.status.into(),
        started_at: row.started_at,
        finished_at: row.finished_at,
        size_bytes: row.size_bytes.max(0) as u64,
        files,
        wal_start_lsn: row.wal_start_lsn.clone(),
        wal_end_lsn: row.wal_end_lsn.clone(),
        timeline: row.timeline.map(|t| t.max(0) as u32),
        error: row.error.clone(),
        trigger: row.trigger.clone(),
        s3_copied_at: row.s3_copied_at,
    })
}

impl From<StoreFileError> for ClusterError {
    fn from(e: StoreFileError) -> Self {
        match e {
            StoreFileError::ChecksumMismatch { .. } => ClusterError::Refused {
                code: "checksum_mismatch",
                message: e.to_string(),
            },
            StoreFileError::Differs { .. } => ClusterError::Conflict {
                code: "already_stored",
                message: e.to_string(),
            },
            StoreFileError::TooLarge { .. } => ClusterError::Refused {
                code: "too_large",
                message: e.to_string(),
            },
            StoreFileError::Body(m) => ClusterError::Invalid(m),
            StoreFileError::Io { .. } => ClusterError::Internal(e.to_string()),
        }
    }
}

fn checksum_header(sha256: Option<&str>) -> Result<String, ClusterError> {
    match sha256 {
        Some(s) if is_sha256(s) => Ok(s.to_ascii_lowercase()),
        Some(s) => Err(ClusterError::Invalid(format!(
            "X-Content-Sha256 {s:?} is not a hex SHA-256"
        ))),
        None => Err(ClusterError::Invalid(
            "the X-Content-Sha256 header (hex SHA-256 of the body) is required".into(),
        )),
    }
}

impl Cluster {
    pub fn backup_store(&self) -> &BackupStore {
        &self.config.backups
    }

    /// The newest `limit` backups, newest first.
    pub async fn backups(&self, limit: u64, caller: &Caller) -> Result<Vec<Backup>, ClusterError> {
        caller.require_admin()?;
        store::list_backups(self.store.conn(), limit)
            .await?
            .iter()
            .map(backup_from_row)
            .collect()
    }

    /// `POST /backups`: takes a backup now.
    pub async fn backup_now(&self, caller: &Caller) -> Result<Backup, ClusterError> {
        caller.require_admin()?;
        self.take_backup(&caller.actor()).await
    }

    /// Records a backup and files its order on the node it is taken from,
    /// in one transaction; refused while another is running or no db node
    /// can take one.
    pub async fn take_backup(&self, trigger: &str) -> Result<Backup, ClusterError> {
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        if let Some(running) = store::running_backup(&txn).await? {
            return Err(ClusterError::Conflict {
                code: "backup_in_progress",
                message: format!(
                    "backup {} on {} is still running; see GET /api/v1/backups",
                    running.id, running.node
                ),
            });
        }
        let rows = store::db_nodes_and(&txn, "").await?;
        let standings = self.standings(&rows, now);
        let source = backup_source(&standings).ok_or_else(|| ClusterError::Conflict {
            code: "no_db_node",
            message: "no db node can take a backup: none is an active, heartbeating primary or streaming standby".into(),
        })?;
        let row = rows.iter().find(|r| r.name == source).ok_or_else(|| {
            ClusterError::Internal("the backup node vanished from its list".into())
        })?;
        let record = store::insert_backup(&txn, &source, trigger, now).await?;
        let order = WorkOrder::Backup(BackupSpec { id: record.id });
        let message = format!("backup {} requested on {source}", record.id);
        self.file_one(
            txn,
            &mut desired,
            Outcome::default(),
            row,
            order,
            trigger,
            "backup.requested",
            message,
            now,
        )
        .await?;
        backup_from_row(&record)
    }

    fn standings(&self, rows: &[node::Model], now: DateTime<Utc>) -> Vec<Standing> {
        rows.iter()
            .map(|row| Standing {
                name: row.name.clone(),
                role: row.role.into(),
                state: row.state.into(),
                fresh: self.is_fresh(row.last_heartbeat, now),
                replication: row
                    .observed
                    .as_deref()
                    .and_then(|s| serde_json::from_str::<ObservedState>(s).ok())
                    .and_then(|o| o.replication),
            })
            .collect()
    }

    /// Files one order on `row` with the next seq and an event, and commits
    /// it with what `outcome` already holds of the same change.
    #[allow(clippy::too_many_arguments)]
    async fn file_one(
        &self,
        txn: sea_orm::DatabaseTransaction,
        desired: &mut super::Desired,
        mut outcome: Outcome,
        row: &node::Model,
        order: WorkOrder,
        actor: &str,
        kind: &str,
        message: String,
        now: DateTime<Utc>,
    ) -> Result<i64, ClusterError> {
        let seq = row.last_seq + 1;
        store::advance_last_seq(&txn, &[row.id], 1).await?;
        outcome.orders_filed +=
            store::insert_orders(&txn, vec![order_row(row.id, seq, &order)?], now).await?;
        outcome.events.extend(
            store::insert_events(
                &txn,
                vec![NewEvent {
                    actor: actor.to_string(),
                    kind: kind.into(),
                    subject: row.name.clone(),
                    message,
                }],
                now,
            )
            .await?,
        );
        outcome.filed.push((row.name.clone(), order.clone()));
        outcome.batches.push((
            row.id,
            OrderBatch {
                orders: vec![Order::pending(row.name.clone(), seq, order, now)],
            },
        ));
        self.commit(txn, outcome, desired).await?;
        Ok(seq)
    }

    /// The running backup `id` that `node` is taking.
    async fn running_backup_of(&self, node: &str, id: i64) -> Result<backup::Model, ClusterError> {
        let row = store::backup_by_id(self.store.conn(), id)
            .await?
            .filter(|b| b.node == node)
            .ok_or_else(|| ClusterError::NotFound(format!("{node} is taking no backup {id}")))?;
        if row.status != backup::Status::Running {
            return Err(ClusterError::Conflict {
                code: "backup_finished",
                message: format!(
                    "backup {id} is already {}",
                    BackupStatus::from(row.status).as_str()
                ),
            });
        }
        Ok(row)
    }

    /// An agent uploads one file of the backup it is taking, streamed to
    /// disk and checked against its SHA-256.
    pub async fn receive_backup_file<S, E>(
        &self,
        node: &str,
        id: i64,
        name: &str,
        sha256: Option<&str>,
        body: S,
        caller: &Caller,
    ) -> Result<BackupFile, ClusterError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        caller.require_node(node)?;
        if !is_backup_file_name(name) {
            return Err(ClusterError::Invalid(format!(
                "{name:?} is not a file of a base backup (base.tar, pg_wal.tar, backup_manifest)"
            )));
        }
        let expected = checksum_header(sha256)?;
        self.running_backup_of(node, id).await?;
        let dest = self.backup_store().base_dir(id).join(name);
        let (size, sha256) = self
            .backup_store()
            .receive(&dest, body, &expected, None, false)
            .await?;
        Ok(BackupFile {
            name: name.to_string(),
            size,
            sha256,
        })
    }

    /// An agent says how its backup went. Done only when every file it
    /// names is in the store with that size and checksum.
    pub async fn finish_backup(
        &self,
        node: &str,
        id: i64,
        report: BackupReport,
        caller: &Caller,
    ) -> Result<Backup, ClusterError> {
        caller.require_node(node)?;
        self.running_backup_of(node, id).await?;
        let now = Utc::now();
        let (status, error) = match report.error {
            Some(e) => {
                let e: String = e.chars().take(2000).collect();
                (backup::Status::Failed, Some(e))
            }
            None => {
                self.check_report(id, &report).await?;
                (backup::Status::Done, None)
            }
        };
        let size: u64 = report.files.iter().map(|f| f.size).sum();
        let files = serde_json::to_string(&report.files)
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        store::finish_backup(
            self.store.conn(),
            id,
            status,
            size as i64,
            &files,
            (
                report.wal_start_lsn.clone(),
                report.wal_end_lsn.clone(),
                report.timeline.map(|t| t as i32),
            ),
            error.clone(),
            now,
        )
        .await?;
        let (kind, message) = match &error {
            None => (
                "backup.done",
                format!(
                    "backup {id} of {node} done: {size} bytes, WAL from {}",
                    report.wal_start_lsn.as_deref().unwrap_or("?")
                ),
            ),
            Some(e) => (
                "backup.failed",
                format!("backup {id} of {node} failed: {e}"),
            ),
        };
        self.record_events(vec![NewEvent {
            actor: caller.actor(),
            kind: kind.into(),
            subject: node.into(),
            message,
        }])
        .await?;
        if error.is_none() {
            self.apply_backup_retention().await;
            self.wake_offsite();
        }
        let row = store::backup_by_id(self.store.conn(), id)
            .await?
            .ok_or_else(|| ClusterError::NotFound(format!("no backup {id}")))?;
        backup_from_row(&row)
    }

    async fn check_report(&self, id: i64, report: &BackupReport) -> Result<(), ClusterError> {
        if !report.files.iter().any(|f| f.name == "base.tar") {
            return Err(ClusterError::Invalid("a backup needs its base.tar".into()));
        }
        for lsn in [&report.wal_start_lsn, &report.wal_end_lsn] {
            match lsn {
                Some(l) if is_lsn(l) => {}
                other => {
                    return Err(ClusterError::Invalid(format!(
                        "{other:?} is not a WAL position like 0/3000028"
                    )));
                }
            }
        }
        for f in &report.files {
            if !is_backup_file_name(&f.name) {
                return Err(ClusterError::Invalid(format!(
                    "{:?} is not a backup file",
                    f.name
                )));
            }
            let path = self.backup_store().base_dir(id).join(&f.name);
            let stored = self.backup_store().checksum(&path).await;
            let size = tokio::fs::metadata(&path).await.map(|m| m.len()).ok();
            if stored.as_deref() != Some(f.sha256.as_str()) || size != Some(f.size) {
                return Err(ClusterError::Refused {
                    code: "files_missing",
                    message: format!(
                        "{} of backup {id} is not in the store with {} bytes and sha256 {}",
                        f.name, f.size, f.sha256
                    ),
                });
            }
        }
        Ok(())
    }

    /// A backup order that failed before its agent could report: the
    /// backup failed with the order's words.
    pub(super) async fn backup_order_failed(&self, payload: &str, message: &str) {
        let Ok(WorkOrder::Backup(spec)) = serde_json::from_str::<WorkOrder>(payload) else {
            return;
        };
        let error: String = message.chars().take(2000).collect();
        let done = store::finish_backup(
            self.store.conn(),
            spec.id,
            backup::Status::Failed,
            0,
            "[]",
            (None, None, None),
            Some(error.clone()),
            Utc::now(),
        )
        .await;
        if let Ok(true) = done {
            let _ = self
                .record_events(vec![NewEvent {
                    actor: "reconciler".into(),
                    kind: "backup.failed".into(),
                    subject: format!("backup {}", spec.id),
                    message: format!("backup {} failed: {error}", spec.id),
                }])
                .await;
        }
    }

    /// An agent ships one archived WAL file (its `archive_command` spooled
    /// it); repeating an upload is fine, other contents under a stored
    /// name are refused.
    pub async fn receive_wal<S, E>(
        &self,
        node: &str,
        name: &str,
        sha256: Option<&str>,
        body: S,
        caller: &Caller,
    ) -> Result<(), ClusterError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        caller.require_node(node)?;
        if !is_wal_file_name(name) {
            return Err(ClusterError::Invalid(format!(
                "{name:?} is not a WAL file name"
            )));
        }
        let expected = checksum_header(sha256)?;
        let dest = self.backup_store().wal_dir().join(name);
        self.backup_store()
            .receive(&dest, body, &expected, Some(MAX_WAL_BYTES), true)
            .await?;
        self.wake_offsite();
        Ok(())
    }

    /// Files a restore of the newest backup finished before `req.time`: on
    /// adm1, or, with `new_node`, on a new `restoreN` node made for it in
    /// the same change. No such backup, a time in the future, a bad name,
    /// port or provider: 4xx, and nothing filed or made.
    pub async fn restore(
        &self,
        req: RestoreRequest,
        caller: &Caller,
    ) -> Result<RestoreAccepted, ClusterError> {
        caller.require_admin()?;
        validate_restore_name(&req.to).map_err(ClusterError::Invalid)?;
        let port = req.port.unwrap_or(if req.new_node {
            ports::POSTGRES
        } else {
            RESTORE_PORT
        });
        if port < 1024 {
            return Err(ClusterError::Invalid(format!(
                "port {port} is below 1024; choose 1024-65535"
            )));
        }
        let provider = match (req.new_node, req.provider) {
            (false, Some(p)) => {
                return Err(ClusterError::Invalid(format!(
                    "provider {p} applies only to a restore into a new node (new_node: true)"
                )));
            }
            (false, None) => None,
            (true, p) => {
                let provider = p.unwrap_or(self.config.default_provider);
                if !self.config.providers.contains(&provider) {
                    return Err(ClusterError::ProviderNotConfigured {
                        provider,
                        configured: self.config.providers.clone(),
                    });
                }
                self.require_host_agent(provider).await?;
                Some(provider)
            }
        };
        let now = Utc::now();
        if let Some(t) = req.time
            && t > now
        {
            return Err(ClusterError::Invalid(format!(
                "restore time {} is in the future",
                t.to_rfc3339()
            )));
        }
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let at = req.time.unwrap_or(now);
        let chosen =
            store::done_backup_before(&txn, at)
                .await?
                .ok_or_else(|| ClusterError::Refused {
                    code: "no_backup_before",
                    message: match req.time {
                        Some(t) => format!(
                            "no backup finished before {}: nothing to restore to that time",
                            t.to_rfc3339()
                        ),
                        None => "there is no finished backup to restore".into(),
                    },
                })?;
        let actor = caller.actor();
        let (row, outcome) = match provider {
            None => {
                let row = self.node_row(&txn, RESTORE_NODE).await?;
                if let Some(running) =
                    store::unfinished_order(&txn, row.id, OrderKind::Restore.into()).await?
                {
                    return Err(ClusterError::Conflict {
                        code: "restore_in_progress",
                        message: format!(
                            "{RESTORE_NODE} has not finished restore order {} yet",
                            running.seq
                        ),
                    });
                }
                (row, Outcome::default())
            }
            Some(provider) => {
                let (name, outcome) = self
                    .make_restore_node(&txn, &mut desired, provider, chosen.id, &actor, now)
                    .await?;
                (self.node_row(&txn, &name).await?, outcome)
            }
        };
        let order = WorkOrder::Restore(RestoreSpec {
            name: req.to.clone(),
            backup_id: chosen.id,
            target_time: req.time,
            port,
            database: DB_NAME.into(),
        });
        let message = format!(
            "restore of backup {} into {} on {}:{port}{} requested",
            chosen.id,
            req.to,
            row.name,
            req.time
                .map(|t| format!(" to {}", t.to_rfc3339()))
                .unwrap_or_default()
        );
        let node = row.name.clone();
        let seq = self
            .file_one(
                txn,
                &mut desired,
                outcome,
                &row,
                order,
                &actor,
                "db.restore_requested",
                message,
                now,
            )
            .await?;
        Ok(RestoreAccepted {
            node,
            seq,
            backup_id: chosen.id,
            name: req.to,
            port,
        })
    }

    /// Writes a new restore node into `txn` and the orders every node has
    /// (Consul as a client, the firewall); returns its name and the change
    /// so far, for the restore order to join.
    async fn make_restore_node(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        desired: &mut super::Desired,
        provider: Provider,
        backup_id: i64,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<(String, Outcome), ClusterError> {
        let rows = store::reconcile_nodes(txn).await?;
        let views = rows
            .iter()
            .map(super::rows::node_view)
            .collect::<Result<Vec<_>, _>>()?;
        let new = reconcile::restore_node(&views, &self.config.settings, provider)
            .map_err(super::change::plan_refused)?;
        store::insert_nodes(
            txn,
            vec![NewNodeRow {
                name: &new.name,
                role: new.role.into(),
                address: new.address.to_string(),
                provider: provider.into(),
                state: node::State::Provisioning,
            }],
            now,
        )
        .await?;
        let spec = self.spec(txn).await?;
        let planned = self
            .apply_plan(
                txn,
                desired,
                &spec,
                self.config.default_provider,
                actor,
                vec![NewEvent {
                    actor: actor.into(),
                    kind: "node.created".into(),
                    subject: new.name.clone(),
                    message: format!(
                        "restore node {} at {} ({provider}) for a restore of backup {backup_id}; \
                         its database never joins the cluster",
                        new.name, new.address
                    ),
                }],
            )
            .await?;
        let mut outcome = planned;
        outcome.created.push(new.name.clone());
        Ok((new.name, outcome))
    }

    /// What a node may read from the store: the admin anything, an agent
    /// only while it has an unfinished restore order (of backup `id`, when
    /// given).
    async fn may_read_store(
        &self,
        node: &str,
        id: Option<i64>,
        caller: &Caller,
    ) -> Result<(), ClusterError> {
        caller.require_node(node)?;
        let row = self.node_row(self.store.conn(), node).await?;
        if matches!(caller, Caller::Admin) {
            return Ok(());
        }
        let restoring =
            store::unfinished_order(self.store.conn(), row.id, OrderKind::Restore.into())
                .await?
                .and_then(|o| serde_json::from_str::<WorkOrder>(&o.payload).ok());
        match restoring {
            Some(WorkOrder::Restore(spec)) if id.is_none_or(|id| id == spec.backup_id) => Ok(()),
            _ => Err(ClusterError::NotAllowed(format!(
                "{node} is restoring no such backup: backups are read only by a restore"
            ))),
        }
    }

    /// A stored file and its checksum, for a restore to download.
    pub async fn backup_file(
        &self,
        node: &str,
        id: i64,
        name: &str,
        caller: &Caller,
    ) -> Result<(tokio::fs::File, String), ClusterError> {
        self.may_read_store(node, Some(id), caller).await?;
        if !is_backup_file_name(name) {
            return Err(ClusterError::NotFound(format!(
                "backup {id} has no file {name:?}"
            )));
        }
        let path = self.backup_store().base_dir(id).join(name);
        self.open_stored_or_offsite(&format!("base/{id}/{name}"), &path)
            .await
    }

    pub async fn wal_names(
        &self,
        node: &str,
        caller: &Caller,
    ) -> Result<Vec<String>, ClusterError> {
        self.may_read_store(node, None, caller).await?;
        let mut names = self.backup_store().wal_names().await?;
        names.extend(self.offsite_wal_names().await);
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub async fn wal_file(
        &self,
        node: &str,
        name: &str,
        caller: &Caller,
    ) -> Result<(tokio::fs::File, String), ClusterError> {
        self.may_read_store(node, None, caller).await?;
        if !is_wal_file_name(name) {
            return Err(ClusterError::NotFound(format!("no WAL file {name:?}")));
        }
        let path = self.backup_store().wal_dir().join(name);
        self.open_stored_or_offsite(&format!("wal/{name}"), &path)
            .await
    }

    /// A stored file, brought back from the offsite bucket first when the
    /// store lost it.
    async fn open_stored_or_offsite(
        &self,
        key: &str,
        path: &std::path::Path,
    ) -> Result<(tokio::fs::File, String), ClusterError> {
        match self.open_stored(path).await {
            Err(ClusterError::NotFound(m)) => {
                if self.fetch_from_offsite(key, path).await? {
                    self.open_stored(path).await
                } else {
                    Err(ClusterError::NotFound(m))
                }
            }
            other => other,
        }
    }

    async fn open_stored(
        &self,
        path: &std::path::Path,
    ) -> Result<(tokio::fs::File, String), ClusterError> {
        let not_found =
            || ClusterError::NotFound(format!("{} is not in the store", path.display()));
        let sum = self
            .backup_store()
            .checksum(path)
            .await
            .ok_or_else(not_found)?;
        let file = tokio::fs::File::open(path).await.map_err(|_| not_found())?;
        Ok((file, sum))
    }

    /// How many finished backups the schedule keeps (none: all are kept).
    pub(super) async fn backup_keep(&self) -> Option<u32> {
        let spec = self.spec(self.store.conn()).await.ok()?;
        spec.backup.map(|b| b.keep)
    }

    /// The schedule, the last good backup and whether one is overdue.
    pub async fn backups_status(&self, caller: &Caller) -> Result<BackupsStatus, ClusterError> {
        caller.require_admin()?;
        let (status, _) = self.schedule_state(Utc::now()).await?;
        Ok(status)
    }

    async fn schedule_state(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(BackupsStatus, Option<Due>), ClusterError> {
        let spec = self.spec(self.store.conn()).await?;
        let rows = store::list_backups(self.store.conn(), 50).await?;
        let recent: Vec<Backup> = rows.iter().map(backup_from_row).collect::<Result<_, _>>()?;
        let last_done = recent
            .iter()
            .find(|b| b.status == BackupStatus::Done)
            .cloned();
        let due = spec
            .backup
            .as_ref()
            .and_then(|b| b.validate().ok())
            .map(|at| due_state(at, now, &recent, OVERDUE_AFTER));
        Ok((
            BackupsStatus {
                schedule: spec.backup,
                last_done,
                due: due.map(|d| d.due),
                overdue: due.is_some_and(|d| d.overdue),
                s3: self.offsite().map(|o| o.status()),
            },
            due,
        ))
    }

    /// One tick of the schedule: file the backup that is due, and note once
    /// per due time that it is overdue.
    async fn schedule_tick(&self, memory: &mut ScheduleMemory) -> Result<(), ClusterError> {
        let now = Utc::now();
        let (status, Some(due)) = self.schedule_state(now).await? else {
            return Ok(());
        };
        if due.take
            && memory
                .tried
                .is_none_or(|(at, when)| at != due.due || when.elapsed() > RETRY_SCHEDULED)
        {
            memory.tried = Some((due.due, std::time::Instant::now()));
            match self.take_backup("schedule").await {
                Ok(b) => tracing::info!(id = b.id, node = %b.node, "scheduled backup ordered"),
                Err(e) => tracing::warn!(error = %e, "the scheduled backup could not be ordered"),
            }
        }
        if due.overdue && memory.overdue_for != Some(due.due) {
            memory.overdue_for = Some(due.due);
            let last = status
                .last_done
                .and_then(|b| b.finished_at)
                .map(|f| format!("the last good one finished {}", f.to_rfc3339()))
                .unwrap_or_else(|| "there has never been a good one".into());
            self.record_events(vec![NewEvent {
                actor: "schedule".into(),
                kind: "backup.overdue".into(),
                subject: "backups".into(),
                message: format!(
                    "the backup due at {} has not completed; {last}",
                    due.due.to_rfc3339()
                ),
            }])
            .await?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` finished backups of the schedule (when one
    /// is set) and the WAL the oldest of them needs.
    async fn apply_backup_retention(&self) {
        let Some(keep) = self.backup_keep().await else {
            return;
        };
        let result: Result<(), ClusterError> = async {
            let all =
                store::list_backups(self.store.conn(), crate::cluster::MAX_LIST_LIMIT).await?;
            let done: Vec<_> = all
                .iter()
                .filter(|b| b.status == backup::Status::Done)
                .collect();
            for old in done.iter().skip(keep as usize) {
                self.backup_store().remove_base(old.id).await;
                store::delete_backup(self.store.conn(), old.id).await?;
                tracing::info!(id = old.id, "backup beyond retention deleted");
            }
            if let Some(oldest) = done.iter().take(keep as usize).next_back()
                && let (Some(lsn), Some(tli)) = (&oldest.wal_start_lsn, oldest.timeline)
                && let Some(segment) = corral_proto::backup::segment_name(tli as u32, lsn)
            {
                self.backup_store().prune_wal_before(&segment).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "applying the backup retention failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use corral_proto::ReplicationStatus;

    use super::*;

    fn db(name: &str, role: ReplicationRole, state: &str, lag: u64, fresh: bool) -> Standing {
        Standing {
            name: name.into(),
            role: Role::Db,
            state: NodeState::Active,
            fresh,
            replication: Some(ReplicationStatus {
                role,
                lag_bytes: Some(lag),
                lag_ms: None,
                timeline: Some(1),
                state: Some(state.into()),
                sync_standby: None,
                degraded: false,
                leader: None,
            }),
        }
    }

    fn backup(status: BackupStatus, started: &str, finished: Option<&str>) -> Backup {
        Backup {
            id: 1,
            node: "pg2".into(),
            status,
            started_at: started.parse().expect("time"),
            finished_at: finished.map(|f| f.parse().expect("time")),
            size_bytes: 0,
            files: Vec::new(),
            wal_start_lsn: None,
            wal_end_lsn: None,
            timeline: None,
            error: None,
            trigger: "schedule".into(),
            s3_copied_at: None,
        }
    }

    #[test]
    fn a_scheduled_backup_is_taken_once_per_day_and_is_overdue_after_the_grace() {
        let at = DailyAt { hour: 3, minute: 0 };
        let grace = Duration::from_secs(3600);
        let now: DateTime<Utc> = "2026-12-03T03:30:00Z".parse().expect("time");
        let yesterday = backup(
            BackupStatus::Done,
            "2026-12-02T03:00:05Z",
            Some("2026-12-02T03:01:00Z"),
        );
        let d = due_state(at, now, std::slice::from_ref(&yesterday), grace);
        assert!(d.take && !d.overdue, "{d:?}");
        let running = backup(BackupStatus::Running, "2026-12-03T03:00:05Z", None);
        let d = due_state(at, now, &[running.clone(), yesterday.clone()], grace);
        assert!(!d.take && !d.overdue, "{d:?}");
        // Still not done at 04:30: overdue.
        let later: DateTime<Utc> = "2026-12-03T04:30:00Z".parse().expect("time");
        let d = due_state(at, later, &[running, yesterday.clone()], grace);
        assert!(!d.take && d.overdue, "{d:?}");
        // A failed attempt is taken again and does not count as done.
        let failed = backup(
            BackupStatus::Failed,
            "2026-12-03T03:00:05Z",
            Some("2026-12-03T03:00:09Z"),
        );
        let d = due_state(at, later, &[failed, yesterday], grace);
        assert!(d.take && d.overdue, "{d:?}");
    }

    #[test]
    fn a_backup_is_taken_on_the_streaming_standby_least_behind() {
        let nodes = [
            db("pg1", ReplicationRole::Primary, "running", 0, true),
            db("pg2", ReplicationRole::Replica, "streaming", 900, true),
            db("pg3", ReplicationRole::Replica, "streaming", 10, true),
            db("pg4", ReplicationRole::Replica, "catchup", 0, true),
        ];
        assert_eq!(backup_source(&nodes).as_deref(), Some("pg3"));
    }

    #[test]
    fn without_a_streaming_standby_the_primary_takes_it_and_stale_nodes_never() {
        let nodes = [
            db("pg1", ReplicationRole::Primary, "running", 0, true),
            db("pg2", ReplicationRole::Replica, "streaming", 0, false),
        ];
        assert_eq!(backup_source(&nodes).as_deref(), Some("pg1"));
        let none = [db("pg1", ReplicationRole::Primary, "running", 0, false)];
        assert_eq!(backup_source(&none), None);
    }
}
