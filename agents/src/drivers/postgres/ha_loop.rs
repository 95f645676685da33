//! The HA loop: each tick observes (one status query, one snapshot of the
//! DCS), decides ([`ha::decide`], pure) and acts; beside it the lock
//! confirmer and the fencing watchdog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::PostgresSpec;

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{
    self, FENCE_AFTER, Keys, Member, MemberRole, REMOTE_CONFIRM_VALID, WATCHDOG_EVERY,
};
use crate::drivers::leader::LockState;

/// How often a primary confirms its lock apart from the HA step.
const CONFIRM_EVERY: Duration = Duration::from_millis(250);

impl PostgresDriver {
    /// Runs forever: the HA loop, the lock confirmer and the fencing
    /// watchdog.
    pub async fn keeper(self: Arc<Self>) {
        tokio::spawn(self.clone().watchdog());
        tokio::spawn(self.clone().confirmer());
        loop {
            if let Err(e) = self.step().await {
                tracing::debug!(error = %e, "postgres HA step");
            }
            tokio::time::sleep(ha::TICK).await;
        }
    }

    /// Confirms a primary's lock on its own clock, every [`CONFIRM_EVERY`],
    /// with one Consul read, outside the HA mutex. The HA step confirms too,
    /// but one step (psql, about ten Consul calls, a reload) can take longer
    /// than [`FENCE_AFTER`] on a loaded machine, and a healthy primary
    /// fenced itself. Only a primary that confirmed its lock before is kept
    /// confirmed: this never makes a node primary, and a fence between the
    /// read and the write wins (both hold the same mutex).
    pub(super) async fn confirmer(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CONFIRM_EVERY).await;
            if self.confirmed.lock().expect("lock").is_none() {
                continue;
            }
            let Some(keys) = self
                .desired
                .lock()
                .expect("lock")
                .as_ref()
                .map(|s| Keys::new(&s.leader_key))
            else {
                continue;
            };
            if self.dcs.session().is_none() {
                continue;
            }
            let asked = Instant::now();
            let (held, local) = self.dcs.confirm_lock(&keys).await.unwrap_or((false, false));
            if held {
                // As of when we asked: a slow answer confirms no later. One
                // read through a server (the local agent away) counts as
                // older, so the watchdog fences REMOTE_CONFIRM_VALID after
                // it unless another comes: the server said "held" while the
                // session lived, and once it ends nobody may take the lock
                // for the lock-delay, which is longer (ha::FENCED_WITHIN).
                let at = if local {
                    asked
                } else {
                    asked
                        .checked_sub(FENCE_AFTER - REMOTE_CONFIRM_VALID)
                        .unwrap_or(asked)
                };
                let mut confirmed = self.confirmed.lock().expect("lock");
                if let Some(last) = *confirmed {
                    *confirmed = Some(last.max(at));
                    self.persist_confirmed(last.max(at));
                }
            }
        }
    }

    fn confirmed_file(&self) -> std::path::PathBuf {
        self.ctx.path("run/postgres-confirmed-at")
    }

    /// This primary's lock is confirmed as of `at`.
    pub(super) fn set_confirmed(&self, at: Instant) {
        let mut confirmed = self.confirmed.lock().expect("lock");
        let at = confirmed.map_or(at, |last| last.max(at));
        *confirmed = Some(at);
        self.persist_confirmed(at);
    }

    /// Keeps the last confirmation (wall-clock ms) where the next life of
    /// this agent finds it, should this one end: its fencing clock starts
    /// there. Written every confirmation, without fsync: it only has to
    /// outlive the agent process, not the machine (postgres does not
    /// either).
    fn persist_confirmed(&self, at: Instant) {
        let ms = ha::now_ms().saturating_sub(at.elapsed().as_millis() as u64);
        if let Err(e) = std::fs::write(self.confirmed_file(), ms.to_string()) {
            tracing::warn!(error = %e, "cannot keep the last lock confirmation");
        }
    }

    /// No longer a confirmed primary.
    pub(super) fn forget_confirmed(&self) {
        *self.confirmed.lock().expect("lock") = None;
        let _ = std::fs::remove_file(self.confirmed_file());
    }

    /// The last confirmation an earlier life of this agent kept.
    pub(super) fn persisted_confirmation(&self) -> Option<Instant> {
        let ms: u64 = std::fs::read_to_string(self.confirmed_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let age = Duration::from_millis(ha::now_ms().saturating_sub(ms));
        Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now))
    }

    /// Stops a primary whose lock has not been confirmed for [`FENCE_AFTER`]
    /// — also while the HA step hangs on an unresponsive Consul.
    pub(super) async fn watchdog(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCHDOG_EVERY).await;
            let confirmed = *self.confirmed.lock().expect("lock");
            let unconfirmed = *self.unconfirmed_since.lock().expect("lock");
            let stale = confirmed
                .or(unconfirmed)
                .is_some_and(|t| t.elapsed() > FENCE_AFTER);
            if stale {
                self.fence(&format!(
                    "the leader lock could not be confirmed for {FENCE_AFTER:?} (Consul unreachable?)"
                ))
                .await;
            }
        }
    }

    /// Stops PostgreSQL at once: it may no longer take writes. It comes back
    /// as a standby, rewound first.
    pub(super) async fn fence(&self, why: &str) {
        self.forget_confirmed();
        *self.unconfirmed_since.lock().expect("lock") = None;
        tracing::error!(why, "fencing: stopping the primary");
        self.mark_rejoin();
        if let Err(e) = self.ctx.host.stop(SERVICE).await {
            tracing::error!(error = %e, "fencing: stopping postgres failed");
        }
        if let Err(e) = self.write_standby_signal() {
            tracing::error!(error = %e, "fencing: cannot write standby.signal");
        }
    }

    /// One round of the HA loop: one status query, one snapshot of the
    /// cluster, one decision ([`ha::decide`]), then act on it.
    pub(super) async fn step(&self) -> Result<(), DriverError> {
        let Some(spec) = self.desired.lock().expect("lock").clone() else {
            return Ok(());
        };
        let _ha = self.ha.lock().await;
        let keys = Keys::new(&spec.leader_key);
        let local = self.local_status(&spec).await?;
        {
            // Start the fencing clock of a primary whose lock this agent has
            // not confirmed yet, before asking the DCS anything.
            let primary = local.sql.as_ref().is_some_and(|l| !l.in_recovery);
            let confirmed = self.confirmed.lock().expect("lock").is_some();
            let mut since = self.unconfirmed_since.lock().expect("lock");
            if primary && !confirmed {
                // From the last confirmation a previous life of this agent
                // kept, if any: a restart must not extend how long a
                // primary cut off before it stays writable.
                since.get_or_insert_with(|| {
                    self.persisted_confirmation().unwrap_or_else(Instant::now)
                });
            } else {
                *since = None;
            }
        }
        // The DCS unreachable: do nothing; the watchdog fences a primary.
        let view = self.dcs.snapshot(&keys).await?;
        *self.seen_leader.lock().expect("lock") = view.holder().map(String::from);
        let me = ha::member_record(
            &self.ctx.node,
            self.cluster_address(),
            spec.port,
            local.sql.as_ref(),
            view.member(&self.ctx.node),
            ha::now_ms(),
        );
        self.dcs.publish(&keys, &me).await?;
        let view = view.with_member(&me);
        let not_streaming_for = match &local.sql {
            Some(sql) if sql.in_recovery => {
                let mut at = self.streamed_at.lock().expect("lock");
                if sql.receiving || at.is_none() {
                    *at = Some(Instant::now());
                }
                at.map_or(Duration::ZERO, |t| t.elapsed())
            }
            _ => Duration::ZERO,
        };
        let memory = ha::Memory {
            node: self.ctx.node.clone(),
            mode: spec.replication,
            session: self.dcs.session(),
            confirmed: self.confirmed.lock().expect("lock").is_some(),
            not_streaming_for,
            stalled_for: self.stalled_for(&local),
        };
        let action = ha::decide(&view, &local, &memory);
        self.act(&spec, &keys, &view, &local, &me, action).await
    }

    /// Carries out the decision of a tick.
    pub(super) async fn act(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        view: &ha::ClusterView,
        local: &ha::LocalStatus,
        me: &Member,
        action: ha::Action,
    ) -> Result<(), DriverError> {
        use ha::Action;
        match &local.sql {
            Some(sql) if sql.in_recovery && !matches!(action, Action::EndStaleSession(_)) => {
                self.forget_confirmed();
                *self.degraded.lock().expect("lock") = false;
                self.register(spec.port, "replica").await?;
            }
            None if !local.running => self.forget_confirmed(),
            _ => {}
        }
        match action {
            Action::Wait(why) => {
                tracing::debug!(%why, "postgres HA: waiting");
                Ok(())
            }
            Action::Abstain(why) => {
                tracing::info!(%why, "the leader lock is free; not promoting");
                Ok(())
            }
            Action::EndStaleSession(stale) => {
                tracing::warn!(session = %stale, "ending a leader session this node no longer knows");
                self.dcs.end_stale_session(&stale).await?;
                Ok(())
            }
            Action::TakeLockAsPrimary => {
                // A new cluster, or a restarted agent whose session died:
                // the lock is free, take it.
                self.register(spec.port, "primary").await?;
                match self.dcs.take_lock(keys).await? {
                    LockState::Held => {
                        let clear = view
                            .switchover
                            .as_ref()
                            .is_some_and(|s| s.to == self.ctx.node);
                        self.lead(spec, keys, view, local, clear).await
                    }
                    LockState::Pending(why) => {
                        tracing::debug!(%why, "leader lock pending");
                        Ok(())
                    }
                    LockState::HeldElsewhere(_) => {
                        self.fence("another node took the leader lock").await;
                        Ok(())
                    }
                }
            }
            Action::Lead { clear_switchover } => {
                self.lead(spec, keys, view, local, clear_switchover).await
            }
            Action::Fence(why) => {
                self.fence(&why).await;
                Ok(())
            }
            Action::Promote => self.promote(spec).await,
            Action::TakeLockAndPromote => {
                match self.dcs.take_lock(keys).await? {
                    LockState::Held => {
                        tracing::warn!(
                            "the leader lock was free and this standby is the best candidate: promoting"
                        );
                        self.promote(spec).await?;
                        // Say so at once: a record still saying replica
                        // would count as a standby that stopped reporting.
                        let mut me = me.clone();
                        me.role = MemberRole::Primary;
                        me.at_ms = ha::now_ms();
                        self.dcs.publish(keys, &me).await?;
                    }
                    other => tracing::debug!(?other, "leader lock not taken"),
                }
                Ok(())
            }
            Action::StopToRewind { leader } => {
                // Our history may have forked from the leader's: rewind.
                tracing::warn!(%leader, "cannot follow the leader as is: stopping to rewind");
                self.mark_rejoin();
                self.ctx.host.stop(SERVICE).await?;
                *self.streamed_at.lock().expect("lock") = None;
                Ok(())
            }
            Action::StopToReclone { leader } => {
                tracing::warn!(
                    %leader,
                    progress = %ha::recovery_progress(&self.child_titles()),
                    "postgres never became consistent, its recovery stalled for {:?}: cloning the leader afresh",
                    ha::STUCK_AFTER
                );
                self.ctx.host.stop(SERVICE).await?;
                *self.stalled.lock().expect("lock") = None;
                *self.streamed_at.lock().expect("lock") = None;
                let what = self.make_data_dir(spec).await?;
                self.clear_rejoin();
                *self.rewind_failures.lock().expect("lock") = 0;
                tracing::warn!(%what, "re-cloned a stalled standby");
                Ok(())
            }
            Action::Follow(leader) => match &local.sql {
                Some(sql) => self.follow(spec, sql, &leader).await,
                None => Ok(()),
            },
            Action::Detach => {
                tracing::warn!(
                    "the leader lock is free: no longer streaming from the last primary (it may only be frozen)"
                );
                self.query(spec.port, "ALTER SYSTEM RESET primary_conninfo")
                    .await?;
                self.query(spec.port, "SELECT pg_reload_conf()").await?;
                *self.streamed_at.lock().expect("lock") = Some(Instant::now());
                // Say so at once, with the position reached (it may have
                // received more since this tick looked): the candidate waits
                // for it. A WAL receiver still stopping says `following`.
                let sql = self.local(spec.port).await?;
                let me = ha::member_record(
                    &me.node,
                    me.address,
                    me.port,
                    Some(&sql),
                    Some(me),
                    ha::now_ms(),
                );
                self.dcs.publish(keys, &me).await?;
                Ok(())
            }
            Action::MakeDataDir => {
                self.forget_confirmed();
                let what = self.make_data_dir(spec).await?;
                tracing::info!(%what, "made the data dir");
                Ok(())
            }
            Action::Start {
                was_primary,
                let_go,
                rewind,
                leader,
            } => {
                self.start_stopped(spec, keys, was_primary, let_go, rewind, leader.as_ref())
                    .await
            }
        }
    }

    /// A primary holding the lock: confirm it, register, make the roles
    /// once, clear a switchover record that named it, forget members whose
    /// node left, keep the synchronous standbys and the slots right.
    pub(super) async fn lead(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        view: &ha::ClusterView,
        local: &ha::LocalStatus,
        clear_switchover: bool,
    ) -> Result<(), DriverError> {
        let Some(local) = &local.sql else {
            return Ok(());
        };
        self.set_confirmed(Instant::now());
        self.clear_rejoin();
        self.register(spec.port, "primary").await?;
        // A primary the HA loop started or promoted (its order applied
        // while it was stopped, say) makes the roles and the app database
        // itself, once per agent life.
        if !self.roles_made.load(std::sync::atomic::Ordering::Relaxed) {
            match self.create_roles(spec).await {
                Ok(()) => self
                    .roles_made
                    .store(true, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot make the roles yet"),
            }
        }
        if clear_switchover {
            self.dcs.clear_switchover(keys).await?;
        }
        // Members whose node left Consul's catalog (drained) are forgotten,
        // in case their own agent could not delete its record.
        let catalog = self.ctx.consul.catalog_nodes().await?;
        let mut live = Vec::new();
        for m in view.members.iter().filter(|m| m.node != self.ctx.node) {
            if catalog.contains(&m.node) {
                live.push(m.clone());
            } else {
                self.dcs.forget(keys, &m.node).await?;
                tracing::info!(node = %m.node, "forgot the member record of a node that left");
            }
        }
        self.manage_sync(spec, local, &live).await?;
        self.ensure_slots(spec, local, &live).await?;
        if let Err(e) = self.drop_orphan_slots(spec.port, &catalog).await {
            tracing::debug!(error = %e, "checking replication slots");
        }
        Ok(())
    }

    /// Points a standby at `leader` when it is not already.
    pub(super) async fn follow(
        &self,
        spec: &PostgresSpec,
        local: &ha::SqlStatus,
        leader: &Member,
    ) -> Result<(), DriverError> {
        let conninfo = self.conninfo(spec, leader.address, leader.port);
        let slot = slot_name(&self.ctx.node);
        if local.conninfo != conninfo || local.slot_name != slot {
            self.query(
                spec.port,
                &format!("ALTER SYSTEM SET primary_conninfo = {}", literal(&conninfo)),
            )
            .await?;
            self.query(
                spec.port,
                &format!("ALTER SYSTEM SET primary_slot_name = {}", literal(&slot)),
            )
            .await?;
            self.query(spec.port, "SELECT pg_reload_conf()").await?;
            *self.streamed_at.lock().expect("lock") = Some(Instant::now());
            tracing::info!(leader = %leader.node, "following the primary");
        }
        Ok(())
    }

    /// Ends recovery: this standby becomes the primary.
    pub(super) async fn promote(&self, spec: &PostgresSpec) -> Result<(), DriverError> {
        let started = Instant::now();
        self.query(spec.port, "SELECT pg_promote(true, 60)").await?;
        self.set_confirmed(Instant::now());
        self.clear_rejoin();
        // pg_rewind of the old primary reads the new timeline from the
        // control file, which the checkpoint brings up to date.
        self.query(spec.port, "CHECKPOINT").await?;
        self.register(spec.port, "primary").await?;
        tracing::warn!(
            ms = started.elapsed().as_millis() as u64,
            "promoted to primary"
        );
        Ok(())
    }

    /// PostgreSQL is not running: it comes back as a standby (of the leader
    /// if there is one), rewound first if it was a primary.
    pub(super) async fn start_stopped(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        was_primary: bool,
        let_go: bool,
        rewind: bool,
        leader: Option<&Member>,
    ) -> Result<(), DriverError> {
        if was_primary {
            // It ran as primary and died (or was stopped with the node).
            if let_go {
                self.dcs.let_go(keys).await?;
                // And end the session: after a crash of the whole node it is
                // one from before (its Consul agent restarted), which Consul
                // may still end for that; a promotion that reused it was
                // fenced a second later (seen in the failover e2e). A
                // new session is made with the checks as they are now.
                self.dcs.end_session().await;
                tracing::warn!("postgres died as primary: released the leader lock for a standby");
            }
            self.mark_rejoin();
            self.write_standby_signal()?;
        }
        if rewind && let Some(leader) = leader {
            self.rejoin(spec, leader).await?;
        }
        let conninfo = leader
            .map(|l| self.conninfo(spec, l.address, l.port))
            .unwrap_or_default();
        let slot = if leader.is_some() {
            slot_name(&self.ctx.node)
        } else {
            String::new()
        };
        self.set_auto_conf(&[
            ("primary_conninfo", &conninfo),
            ("primary_slot_name", &slot),
        ])?;
        self.write_standby_signal()?;
        self.ctx.host.ensure(&self.service_spec(spec)).await?;
        *self.streamed_at.lock().expect("lock") = Some(Instant::now());
        tracing::info!(
            leader = leader.map(|l| l.node.as_str()).unwrap_or("none yet"),
            "started postgres as a standby"
        );
        Ok(())
    }
}
