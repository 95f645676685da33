//! What the agent keeps on disk so it survives being killed: the node token,
//! the last applied order `seq` (with that order's result, re-reported on
//! boot in case the report was lost) and the last applied order of each
//! kind, which a restarted agent makes true again (adopting what runs).
//! Every write is atomic: temporary file, fsync, rename, fsync of the
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use corral_proto::{OrderKind, OrderOutcome, WorkOrder};
use serde::{Deserialize, Serialize};

/// Replaces `path` with `data` atomically, with the given file mode.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The result of the last applied order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub seq: i64,
    pub outcome: OrderOutcome,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The highest order seq finished (applied or failed).
    pub seq: i64,
    pub last: Option<LastResult>,
    /// Results applied but not yet acknowledged by the control plane, in
    /// seq order: an agent that dies mid-batch reports them all when it
    /// starts again (a lost switchover result would otherwise leave the
    /// order `delivered` forever and refuse every later switchover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreported: Vec<LastResult>,
}

impl Progress {
    /// What to report at start: the unreported results; from a state dir
    /// written before they were kept, the last result (reporting twice is
    /// harmless).
    pub fn pending_reports(&self) -> Vec<LastResult> {
        if self.unreported.is_empty() {
            self.last.iter().cloned().collect()
        } else {
            self.unreported.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The agent's durable state in its state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let orders = root.join("orders");
        fs::create_dir_all(&orders).map_err(|source| StateError::Io {
            path: orders.clone(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn token_path(&self) -> PathBuf {
        self.root.join("node-token")
    }

    pub fn token(&self) -> Option<String> {
        fs::read_to_string(self.token_path())
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    pub fn save_token(&self, token: &str) -> Result<(), StateError> {
        let path = self.token_path();
        write_atomic(&path, token.as_bytes(), 0o600).map_err(Self::io(&path))
    }

    fn progress_path(&self) -> PathBuf {
        self.root.join("progress.json")
    }

    pub fn progress(&self) -> Result<Progress, StateError> {
        let path = self.progress_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Progress::default()),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    pub fn save_progress(&self, progress: &Progress) -> Result<(), StateError> {
        let path = self.progress_path();
        let data = serde_json::to_vec(progress).expect("progress serializes");
        write_atomic(&path, &data, 0o600).map_err(Self::io(&path))
    }

    fn order_path(&self, kind: OrderKind) -> PathBuf {
        self.root.join("orders").join(format!("{kind}.json"))
    }

    /// The last applied order of each kind, in the order to re-apply them.
    pub fn applied_orders(&self) -> Vec<WorkOrder> {
        [
            OrderKind::Firewall,
            OrderKind::Consul,
            OrderKind::Postgres,
            OrderKind::Webapp,
            OrderKind::LoadBalancer,
            OrderKind::Drain,
        ]
        .into_iter()
        .filter_map(|kind| {
            let bytes = fs::read(self.order_path(kind)).ok()?;
            match serde_json::from_slice(&bytes) {
                Ok(order) => Some(order),
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "ignoring an unreadable applied order");
                    None
                }
            }
        })
        .collect()
    }

    /// The last applied order of `kind`.
    pub fn applied(&self, kind: OrderKind) -> Option<WorkOrder> {
        let bytes = fs::read(self.order_path(kind)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records `order` as applied (mode 0600: it holds passwords).
    pub fn save_applied(&self, order: &WorkOrder) -> Result<(), StateError> {
        let path = self.order_path(order.kind());
        let data = serde_json::to_vec_pretty(order).expect("order serializes");
        write_atomic(&path, &data, 0o600).map_err(Self::io(&path))
    }

    /// Forgets the applied orders of the given kinds (after a drain).
    pub fn forget_applied(&self, kinds: &[OrderKind]) {
        for kind in kinds {
            let _ = fs::remove_file(self.order_path(*kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_survives_a_reopen_and_starts_at_zero() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::open(dir.path()).expect("open");
        assert_eq!(state.progress().expect("read").seq, 0);
        let p = Progress {
            seq: 7,
            last: Some(LastResult {
                seq: 7,
                outcome: OrderOutcome::Failed,
                message: "boom".into(),
            }),
            unreported: Vec::new(),
        };
        state.save_progress(&p).expect("save");
        let again = StateDir::open(dir.path()).expect("reopen");
        assert_eq!(again.progress().expect("read"), p);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn token_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::open(dir.path()).expect("open");
        state.save_token("secret").expect("save");
        let mode = fs::metadata(dir.path().join("node-token"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(state.token().as_deref(), Some("secret"));
    }
}
