//! Leader election for PostgreSQL through a Consul session lock: the primary
//! holds a lock on the order's `leader_key` with a session bound to its SQL
//! health check and to `serfHealth`, so the lock goes when the primary or its
//! node does — not when the agent merely restarts (no TTL to renew). Failover
//! (a standby taking the lock and promoting) grows here later.

use std::path::PathBuf;
use std::time::Duration;

use crate::consul_api::{ConsulApi, ConsulError};

/// Where the lock stands for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    Held,
    /// Another session holds it.
    HeldElsewhere(String),
    /// Not possible yet (the health check is not passing, no Consul leader).
    Pending(String),
}

pub struct LeaderLock {
    consul: ConsulApi,
    node: String,
    /// The session id survives agent restarts here.
    session_file: PathBuf,
}

impl LeaderLock {
    pub fn new(consul: ConsulApi, node: &str, session_file: PathBuf) -> Self {
        Self {
            consul,
            node: node.to_string(),
            session_file,
        }
    }

    fn saved_session(&self) -> Option<String> {
        std::fs::read_to_string(&self.session_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Takes or keeps the lock on `key`, tied to `check_id`.
    pub async fn hold(&self, key: &str, check_id: &str) -> Result<LockState, ConsulError> {
        let session = match self.saved_session() {
            Some(id) if self.consul.session_alive(&id).await? => id,
            _ => {
                let checks = vec!["serfHealth".to_string(), check_id.to_string()];
                let id = match self
                    .consul
                    .create_session(
                        &format!("postgres-leader-{}", self.node),
                        &checks,
                        Duration::from_secs(1),
                    )
                    .await
                {
                    Ok(id) if !id.is_empty() => id,
                    Ok(_) => return Ok(LockState::Pending("consul gave no session id".into())),
                    // Consul refuses a session whose checks are not passing.
                    Err(ConsulError::Status { body, .. }) => return Ok(LockState::Pending(body)),
                    Err(e) => return Err(e),
                };
                if let Err(e) =
                    crate::durable::write_atomic(&self.session_file, id.as_bytes(), 0o600)
                {
                    tracing::warn!(error = %e, "cannot save the leader session id");
                }
                id
            }
        };
        match self.consul.lock_holder(key).await? {
            Some(holder) if holder == session => Ok(LockState::Held),
            Some(holder) => Ok(LockState::HeldElsewhere(holder)),
            None => {
                if self.consul.acquire(key, &session, &self.node).await? {
                    tracing::info!(key, session = %session, "took the leader lock");
                    Ok(LockState::Held)
                } else {
                    // Lock-delay after a release, or a race lost.
                    Ok(LockState::Pending("lock not acquired yet".into()))
                }
            }
        }
    }

    /// Gives the lock up (drain): destroying the session releases it.
    pub async fn release(&self) {
        if let Some(id) = self.saved_session() {
            if let Err(e) = self.consul.destroy_session(&id).await {
                tracing::warn!(error = %e, "destroying the leader session");
            }
            let _ = std::fs::remove_file(&self.session_file);
        }
    }
}
