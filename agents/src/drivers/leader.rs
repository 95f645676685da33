//! The PostgreSQL leader lock in Consul: a KV key locked by a session that
//! is bound to the node's `serfHealth` and to a role-agnostic SQL check of
//! PostgreSQL (`postgres-alive`), so the lock goes when the node or its
//! database dies — not when the agent merely restarts (no TTL to renew).
//! After such a death nobody may take the lock for [`LOCK_DELAY`]; a planned
//! hand-over releases it without that delay.

use std::path::PathBuf;

use super::ha::LOCK_DELAY;
use crate::consul_api::{ConsulApi, ConsulError};

/// The check the leader session is bound to besides `serfHealth`.
pub const ALIVE_CHECK: &str = "postgres-alive";

/// Where the lock stands for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    Held,
    /// Another session holds it.
    HeldElsewhere(String),
    /// Not possible yet (the health check is not passing, lock-delay).
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

    /// This node's session, as last created.
    pub fn session(&self) -> Option<String> {
        std::fs::read_to_string(&self.session_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Takes the lock on `key` when it is free (creating a session first if
    /// ours died).
    pub async fn take(&self, key: &str) -> Result<LockState, ConsulError> {
        let session = match self.session() {
            Some(id) if self.consul.session_alive(&id).await? => id,
            _ => {
                let checks = vec!["serfHealth".to_string(), ALIVE_CHECK.to_string()];
                let id = match self
                    .consul
                    .create_session(
                        &format!("postgres-leader-{}", self.node),
                        &checks,
                        LOCK_DELAY,
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
                    Ok(LockState::Pending(
                        "lock not acquired (lock-delay or lost race)".into(),
                    ))
                }
            }
        }
    }

    /// Lets go of the lock (a planned hand-over or a crashed primary): no
    /// lock-delay for the next holder.
    pub async fn let_go(&self, key: &str) -> Result<(), ConsulError> {
        if let Some(id) = self.session() {
            self.consul.release(key, &id).await?;
            tracing::info!(key, "released the leader lock");
        }
        Ok(())
    }

    /// Destroys the session (drain): releases whatever it held.
    pub async fn release(&self) {
        if let Some(id) = self.session() {
            if let Err(e) = self.consul.destroy_session(&id).await {
                tracing::warn!(error = %e, "destroying the leader session");
            }
            let _ = std::fs::remove_file(&self.session_file);
        }
    }
}
