//! One leader among the servers sharing a PostgreSQL database, for the
//! background work that must run once: the machine controller, pruning,
//! stale-node detection. The leader is whoever holds a session-level
//! advisory lock on a connection of its own; the others try again every
//! [`LEADER_RETRY`].
//!
//! Takeover bound. A leader process that dies (kill -9, crash) closes its
//! session with it and PostgreSQL frees the lock at once: another server
//! leads within `LEADER_RETRY` plus a connection, about 1 s. A leader whose
//! machine or network goes away without closing the connection is noticed by
//! PostgreSQL's TCP keepalives, set on the session to 5 s idle, then 3 probes
//! 2 s apart: about 11 s, plus `LEADER_RETRY`. The old leader checks its
//! session every [`LEADER_CHECK`] and gives the work up after
//! [`LEADER_CHECK_TIMEOUT`] without an answer, well before PostgreSQL frees
//! the lock, so two leaders never work at once.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnection, PgPool};
use sea_orm::sqlx::{self, Connection};
use tokio::sync::watch;

use crate::store::lock_keys;

/// How often a server that does not lead tries to.
pub const LEADER_RETRY: Duration = Duration::from_secs(1);
/// How often the leader checks that its session (and so its lock) is alive.
const LEADER_CHECK: Duration = Duration::from_secs(1);
/// How long that check may take before the leader gives up leading.
const LEADER_CHECK_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Tries to lead until `gone` says the cluster is dropped; `leader` says
/// whether this server leads now.
pub(super) async fn lead(
    pool: PgPool,
    leader: Arc<watch::Sender<bool>>,
    mut gone: watch::Receiver<()>,
) {
    tokio::select! {
        () = lead_loop(&pool, &leader) => {}
        _ = gone.changed() => {}
    }
    leader.send_replace(false);
}

async fn lead_loop(pool: &PgPool, leader: &watch::Sender<bool>) {
    loop {
        let Some(mut session) = connect(pool).await else {
            tokio::time::sleep(LEADER_RETRY).await;
            continue;
        };
        // Not leading: try on the same session every LEADER_RETRY.
        loop {
            let taken: Result<(bool,), _> = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                .bind(lock_keys::LEADER)
                .fetch_one(&mut session)
                .await;
            match taken {
                Ok((true,)) => break,
                Ok((false,)) => tokio::time::sleep(LEADER_RETRY).await,
                Err(e) => {
                    tracing::debug!(error = %e, "trying for the leader lock failed");
                    break;
                }
            }
        }
        if !holds_lock(&mut session).await {
            tokio::time::sleep(LEADER_RETRY).await;
            continue;
        }
        tracing::info!(
            "this server leads: it runs the machine controller, pruning and stale-node detection"
        );
        leader.send_replace(true);
        loop {
            tokio::time::sleep(LEADER_CHECK).await;
            if !holds_lock(&mut session).await {
                break;
            }
        }
        leader.send_replace(false);
        tracing::warn!("lost the session holding the leader lock: this server no longer leads");
        // Dropping the session closes it (if it still can): PostgreSQL
        // frees the lock with it.
        drop(session);
        tokio::time::sleep(LEADER_RETRY).await;
    }
}

/// Whether the session answers, in time, that it holds the leader lock.
async fn holds_lock(session: &mut PgConnection) -> bool {
    let held = tokio::time::timeout(
        LEADER_CHECK_TIMEOUT,
        sqlx::query_as::<_, (bool,)>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted \
             AND ((classid::bigint << 32) | objid::bigint) = $1)",
        )
        .bind(lock_keys::LEADER)
        .fetch_one(session),
    )
    .await;
    matches!(held, Ok(Ok((true,))))
}

/// A session of its own for the leader lock, on the host the pool writes
/// to (the writable one, after a failover too), or none when the database
/// cannot be reached.
async fn connect(pool: &PgPool) -> Option<PgConnection> {
    let options = pool.connect_options();
    let mut session =
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot connect to try for the leader lock");
                return None;
            }
            Err(_) => return None,
        };
    // Keepalives on the server's side of this session, so a leader that
    // vanishes without closing it frees the lock within seconds rather than
    // the kernel's two hours. Over a Unix socket they do not apply.
    for setting in [
        "SET tcp_keepalives_idle = 5",
        "SET tcp_keepalives_interval = 2",
        "SET tcp_keepalives_count = 3",
    ] {
        if let Err(e) = sqlx::query(setting).execute(&mut session).await {
            tracing::debug!(error = %e, setting, "keepalive setting refused");
        }
    }
    Some(session)
}
