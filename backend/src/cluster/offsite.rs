//! The offsite copy: every file of a done backup and every archived WAL
//! segment in this server's backup store is copied to the configured
//! S3-compatible bucket, after the store verified it, with its SHA-256 as
//! object metadata. A background task does it in passes, woken by each
//! new file; a failing pass is retried with backoff and raises one
//! `backup.s3_failed` event per failing streak, never holding up the local
//! backup. The bucket follows the same retention as the store. A restore
//! whose files are gone from the store reads them back from the bucket.
//!
//! What is copied is remembered beside each file (`<file>.s3`, holding the
//! checksum copied), so a restarted server carries on where it stopped; a
//! backup whose files are all there gets `s3_copied_at` in the database.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_proto::OffsiteStatus;
use corral_proto::backup::{is_backup_file_name, is_wal_file_name, segment_name};

use super::{Cluster, ClusterError};
use crate::backup_store::wal_older_than;
use crate::s3::{S3Bucket, S3Error};
use crate::store::{self, NewEvent, backup};

/// A pass with nothing new runs this often anyway (a file whose wake-up
/// was missed, retention done by another server).
const IDLE_PASS: Duration = Duration::from_secs(30);
/// The first retry after a failed pass; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The bucket and where the copy stands.
#[derive(Debug)]
pub struct Offsite {
    bucket: S3Bucket,
    state: Mutex<PassState>,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone)]
struct PassState {
    pending: u64,
    last_error: Option<String>,
    failing_since: Option<DateTime<Utc>>,
    last_caught_up: Option<DateTime<Utc>>,
}

impl Offsite {
    pub fn new(bucket: S3Bucket) -> Self {
        Self {
            bucket,
            state: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn bucket(&self) -> &S3Bucket {
        &self.bucket
    }

    /// A new file is in the store: copy it soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn status(&self) -> OffsiteStatus {
        let state = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        OffsiteStatus {
            endpoint: self.bucket.endpoint().to_string(),
            bucket: self.bucket.name().to_string(),
            prefix: self.bucket.prefix().to_string(),
            pending_files: state.pending,
            last_error: state.last_error,
            failing_since: state.failing_since,
            last_caught_up: state.last_caught_up,
        }
    }

    /// Records how a pass went; returns whether it started or ended a
    /// failing streak (`Some(true)`: started, `Some(false)`: ended).
    fn record(&self, result: &Result<u64, S3Error>, now: DateTime<Utc>) -> Option<bool> {
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        match result {
            Ok(pending) => {
                state.pending = *pending;
                state.last_error = None;
                if *pending == 0 {
                    state.last_caught_up = Some(now);
                }
                state.failing_since.take().map(|_| false)
            }
            Err(e) => {
                state.last_error = Some(e.to_string());
                match state.failing_since {
                    Some(_) => None,
                    None => {
                        state.failing_since = Some(now);
                        Some(true)
                    }
                }
            }
        }
    }
}

/// The key of a base backup's file in the bucket.
fn base_key(id: i64, file: &str) -> String {
    format!("base/{id}/{file}")
}

fn wal_key(name: &str) -> String {
    format!("wal/{name}")
}

/// Copies the store to the bucket in passes until the cluster is dropped.
/// Every server copies its own store (backup files stay with the server
/// that received them).
pub(super) async fn copy_offsite(cluster: Weak<Cluster>, offsite: Arc<Offsite>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(c) = cluster.upgrade() else {
            return;
        };
        let now = Utc::now();
        let result = c.offsite_pass(&offsite).await;
        let streak = offsite.record(&result, now);
        let event = match (&result, streak) {
            (Err(e), Some(true)) => Some((
                "backup.s3_failed",
                format!(
                    "copying backups to bucket {} at {} failed: {e}; retrying with backoff, local backups go on",
                    offsite.bucket.name(),
                    offsite.bucket.endpoint()
                ),
            )),
            (Ok(pending), Some(false)) => Some((
                "backup.s3_recovered",
                format!(
                    "the copy to bucket {} works again ({pending} files still to copy)",
                    offsite.bucket.name()
                ),
            )),
            _ => None,
        };
        if let Some((kind, message)) = event {
            match &result {
                Err(_) => tracing::warn!(%message, "offsite copy failing"),
                Ok(_) => tracing::info!(%message, "offsite copy recovered"),
            }
            if let Err(e) = c
                .record_events(vec![NewEvent {
                    actor: "s3".into(),
                    kind: kind.into(),
                    subject: "backups".into(),
                    message,
                }])
                .await
            {
                tracing::warn!(error = %e, "recording an offsite copy event failed");
            }
        }
        drop(c);
        match result {
            Ok(_) => {
                backoff = FIRST_BACKOFF;
                let _ = tokio::time::timeout(IDLE_PASS, offsite.wake.notified()).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in = ?backoff, "offsite pass failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl Cluster {
    pub fn offsite(&self) -> Option<&Arc<Offsite>> {
        self.config.offsite.as_ref()
    }

    /// Wakes the offsite copy, if there is one.
    pub(super) fn wake_offsite(&self) {
        if let Some(o) = self.offsite() {
            o.wake();
        }
    }

    /// One pass: copy what is not in the bucket yet, then prune the
    /// bucket to the retention. Returns how many files are still to copy
    /// (files gone from the store that the bucket lacks too).
    async fn offsite_pass(&self, offsite: &Offsite) -> Result<u64, S3Error> {
        let bucket = &offsite.bucket;
        let store_err = |e: ClusterError| S3Error::Local(e.to_string());
        let rows = store::list_backups(self.store.conn(), super::MAX_LIST_LIMIT)
            .await
            .map_err(|e| store_err(e.into()))?;
        let mut pending = 0u64;
        for row in rows.iter().filter(|b| b.status == backup::Status::Done) {
            if row.s3_copied_at.is_some() {
                continue;
            }
            let backup = super::backup_from_row(row).map_err(store_err)?;
            let mut all = true;
            for file in &backup.files {
                let path = self.backup_store().base_dir(row.id).join(&file.name);
                let key = base_key(row.id, &file.name);
                if !self.copy_one(bucket, &key, &path).await? {
                    all = false;
                    pending += 1;
                }
            }
            if all {
                store::mark_backup_in_s3(self.store.conn(), row.id, Utc::now())
                    .await
                    .map_err(|e| store_err(e.into()))?;
                tracing::info!(id = row.id, bucket = %bucket.name(), "backup copied to S3");
            }
        }
        let wal = self
            .backup_store()
            .wal_names()
            .await
            .map_err(|e| store_err(e.into()))?;
        for name in wal {
            let path = self.backup_store().wal_dir().join(&name);
            if !self.copy_one(bucket, &wal_key(&name), &path).await? {
                pending += 1;
            }
        }
        self.prune_offsite(bucket, &rows).await?;
        Ok(pending)
    }

    /// Copies one stored file unless its marker says it is there already.
    /// False when the file is in neither place.
    async fn copy_one(&self, bucket: &S3Bucket, key: &str, path: &Path) -> Result<bool, S3Error> {
        let store = self.backup_store();
        if store.in_s3(path).await {
            return Ok(true);
        }
        let Some(sum) = store.checksum(path).await else {
            // Gone from the store: fine if the bucket has it.
            return Ok(bucket.head(key).await?.is_some());
        };
        bucket.put_file(key, path, &sum).await?;
        store
            .mark_in_s3(path, &sum)
            .await
            .map_err(|e| S3Error::Local(format!("{key} copied, but not marked: {e}")))?;
        Ok(true)
    }

    /// Deletes from the bucket the base backups the database no longer
    /// keeps (retention deleted them) and the WAL older than the oldest
    /// kept backup needs, by the same rule as the local store. The bucket
    /// prefix belongs to this cluster alone.
    async fn prune_offsite(
        &self,
        bucket: &S3Bucket,
        rows: &[backup::Model],
    ) -> Result<(), S3Error> {
        let kept: HashSet<i64> = rows
            .iter()
            .filter(|b| b.status != backup::Status::Failed)
            .map(|b| b.id)
            .collect();
        // `rows` is the newest MAX_LIST_LIMIT: when it is cut short, what is
        // older than its oldest is not known to be gone, so it stays.
        let complete = (rows.len() as u64) < super::MAX_LIST_LIMIT;
        let oldest_listed = rows.iter().map(|b| b.id).min();
        let gone = |id: i64| {
            !kept.contains(&id) && (complete || oldest_listed.is_some_and(|oldest| id > oldest))
        };
        for object in bucket.list("base/").await? {
            let id = object
                .name
                .strip_prefix("base/")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(id, file)| is_backup_file_name(file).then_some(id))
                .and_then(|id| id.parse::<i64>().ok());
            if let Some(id) = id
                && gone(id)
            {
                bucket.delete(&object.name).await?;
                tracing::info!(key = %object.name, "backup beyond retention deleted from S3");
            }
        }
        let Some(keep) = self.backup_keep().await else {
            return Ok(());
        };
        let done: Vec<_> = rows
            .iter()
            .filter(|b| b.status == backup::Status::Done)
            .collect();
        if let Some(oldest) = done.iter().take(keep as usize).next_back()
            && let (Some(lsn), Some(tli)) = (&oldest.wal_start_lsn, oldest.timeline)
            && let Some(segment) = segment_name(tli as u32, lsn)
        {
            for object in bucket.list("wal/").await? {
                if let Some(name) = object.name.strip_prefix("wal/")
                    && is_wal_file_name(name)
                    && wal_older_than(name, &segment)
                {
                    bucket.delete(&object.name).await?;
                }
            }
        }
        Ok(())
    }

    /// Brings a file missing from the store back from the bucket, checked
    /// against the checksum it was copied with. False when the bucket has
    /// no such object (or there is no bucket).
    pub(super) async fn fetch_from_offsite(
        &self,
        key: &str,
        dest: &Path,
    ) -> Result<bool, ClusterError> {
        let Some(offsite) = self.offsite() else {
            return Ok(false);
        };
        let unavailable = |e: S3Error| {
            ClusterError::Unavailable(format!(
                "{key} is not in adm1's store and the S3 copy cannot be read: {e}"
            ))
        };
        let Some((sum, body)) = offsite.bucket.get(key).await.map_err(unavailable)? else {
            return Ok(false);
        };
        self.backup_store()
            .receive(dest, body, &sum, None, true)
            .await?;
        self.backup_store().mark_in_s3(dest, &sum).await?;
        tracing::info!(%key, "restored a file of the store from S3");
        Ok(true)
    }

    /// The archived WAL names in the bucket (for a restore whose store
    /// lost some); empty without a bucket.
    pub(super) async fn offsite_wal_names(&self) -> Vec<String> {
        let Some(offsite) = self.offsite() else {
            return Vec::new();
        };
        match offsite.bucket.list("wal/").await {
            Ok(list) => list
                .into_iter()
                .filter_map(|o| o.name.strip_prefix("wal/").map(str::to_string))
                .filter(|n| is_wal_file_name(n))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing the WAL in S3 failed; the store's alone is offered");
                Vec::new()
            }
        }
    }
}
