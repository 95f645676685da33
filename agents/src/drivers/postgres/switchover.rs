//! A planned change of primary, run on the primary: checks, the switchover
//! record, a clean shutdown, the hand-over of the lock, or giving up.

use std::time::{Duration, Instant};

use corral_proto::{PostgresSpec, SwitchoverSpec};

use super::*;
use crate::drivers::DriverError;
use crate::drivers::ha::{self, Keys, Member, MemberRole};
use crate::host::OneShot;

impl PostgresDriver {
    /// The start of the last checkpoint record of the stopped server.
    pub(super) async fn checkpoint_lsn(&self) -> Result<u64, DriverError> {
        let cmd = OneShot::new(self.bin("pg_controldata"), &[])
            .arg(self.pgdata().display().to_string())
            .run_as(Self::account())
            .timeout(Duration::from_secs(30));
        let out = self.ctx.host.run(&cmd).await?.check(&cmd)?;
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
            .and_then(ha::parse_lsn)
            .ok_or_else(|| DriverError::Refused("pg_controldata shows no checkpoint".into()))
    }

    /// Whether this primary may hand over to `order.to` now: the target, or
    /// why not.
    pub(super) async fn switchover_check(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        order: &SwitchoverSpec,
    ) -> Result<Result<Member, String>, DriverError> {
        let node = &self.ctx.node;
        let to = &order.to;
        let local = match self.local(spec.port).await {
            Ok(l) => l,
            Err(e) => return Ok(Err(format!("postgres does not answer: {e}"))),
        };
        if local.in_recovery {
            return Ok(Err(format!("{node} is not the primary")));
        }
        let view = self.dcs.snapshot(keys).await?;
        let lock = view.leader.and_then(|l| l.session);
        if lock.is_none() || lock != self.dcs.session() {
            return Ok(Err(format!("{node} does not hold the leader lock")));
        }
        if to == node {
            return Ok(Err(format!("{node} is already the primary")));
        }
        let Some(t) = view.members.into_iter().find(|m| m.node == *to) else {
            return Ok(Err(format!(
                "{to} is not a member of the PostgreSQL cluster"
            )));
        };
        if t.role != MemberRole::Replica || !t.fresh(ha::now_ms()) {
            return Ok(Err(format!("{to} is not a running standby that reports")));
        }
        if !local.streaming.contains(to) {
            return Ok(Err(format!("{to} does not stream from {node}")));
        }
        let lag = local.lsn.saturating_sub(t.lsn);
        if lag > order.max_lag_bytes {
            return Ok(Err(format!(
                "{to} is {lag} bytes behind (at most {} allowed)",
                order.max_lag_bytes
            )));
        }
        Ok(Ok(t))
    }

    /// A planned change of primary, run on the primary: checks the target
    /// is caught up, shuts down cleanly (the standbys receive every WAL
    /// record first), waits until the target has the shutdown checkpoint,
    /// then hands the lock over; this node follows the target.
    pub async fn switchover(&self, order: &SwitchoverSpec) -> Result<String, DriverError> {
        let started = Instant::now();
        let spec =
            self.desired.lock().expect("lock").clone().ok_or_else(|| {
                DriverError::Refused("postgres is not set up on this node".into())
            })?;
        let node = self.ctx.node.clone();
        let to = order.to.clone();
        let keys = Keys::new(&spec.leader_key);
        // The control plane saw the target as a caught-up standby in its
        // last heartbeat; give our own view a moment to agree (a standby
        // that just restarted reports within a tick). Waiting happens
        // outside the HA mutex, so the lock stays confirmed meanwhile.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.switchover_check(&spec, &keys, order).await? {
                Ok(_) => break,
                Err(why) if Instant::now() > deadline => return Err(DriverError::Refused(why)),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        let _ha = self.ha.lock().await;
        let t = self
            .switchover_check(&spec, &keys, order)
            .await?
            .map_err(DriverError::Refused)?;
        let target = |members: &[Member]| members.iter().find(|m| m.node == to).cloned();
        let mut record = ha::Switchover {
            from: node.clone(),
            to: to.clone(),
            at_ms: ha::now_ms(),
            min_lsn: 0,
        };
        self.dcs.write_switchover(&keys, &record).await?;
        tracing::warn!(%to, "switchover: shutting down cleanly");
        self.forget_confirmed();
        self.ctx.host.stop(SERVICE).await?;
        let end = self.checkpoint_lsn().await?;
        // The target may promote only past this, even if the lock frees
        // before it has the last records (it does: our leader session dies
        // with its postgres-alive check during the shutdown).
        record.min_lsn = end;
        self.dcs.write_switchover(&keys, &record).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let members = self
                .dcs
                .snapshot(&keys)
                .await
                .map(|v| v.members)
                .unwrap_or_default();
            if target(&members).is_some_and(|t| t.lsn > end) {
                break;
            }
            if Instant::now() > deadline {
                return Err(self.give_up_switchover(&spec, &keys, &to).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conninfo = self.conninfo(&spec, t.address, t.port);
        self.set_auto_conf(&[
            ("primary_conninfo", &conninfo),
            ("primary_slot_name", &slot_name(&node)),
        ])?;
        self.write_standby_signal()?;
        self.dcs.let_go(&keys).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let view = self.dcs.snapshot(&keys).await.unwrap_or_default();
            if view.holder() == Some(to.as_str())
                && target(&view.members).is_some_and(|t| t.role == MemberRole::Primary)
            {
                break;
            }
            if Instant::now() > deadline {
                self.ctx.host.ensure(&self.service_spec(&spec)).await?;
                return Err(DriverError::Refused(format!(
                    "{node} stepped down but {to} did not take over within 30 s; the cluster elects a new primary"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ctx.host.ensure(&self.service_spec(&spec)).await?;
        *self.streamed_at.lock().expect("lock") = Some(Instant::now());
        Ok(format!(
            "switched over from {node} to {to} in {:.1} s; {node} follows it as a standby",
            started.elapsed().as_secs_f64()
        ))
    }

    /// A switchover whose target did not get the final WAL in time: this
    /// node has the newest WAL, so it comes back, but as primary only while
    /// it still holds the leader lock. Its session usually died during the
    /// shutdown (postgres-alive failed), freeing the lock: then it comes
    /// back as a standby of nothing and wins the election that follows
    /// (no one is ahead of it), rather than writing without the lock.
    pub(super) async fn give_up_switchover(
        &self,
        spec: &PostgresSpec,
        keys: &Keys,
        to: &str,
    ) -> DriverError {
        let node = &self.ctx.node;
        let held = self
            .dcs
            .confirm_lock(keys)
            .await
            .is_ok_and(|(held, _)| held);
        let _ = self.dcs.clear_switchover(keys).await;
        if held {
            if let Err(e) = self.ctx.host.ensure(&self.service_spec(spec)).await {
                return e.into();
            }
            self.set_confirmed(Instant::now());
            return DriverError::Refused(format!(
                "{to} did not receive the final WAL within 15 s; {node} stays primary"
            ));
        }
        if let Err(e) = self.write_standby_signal() {
            return e;
        }
        if let Err(e) = self.ctx.host.ensure(&self.service_spec(spec)).await {
            return e.into();
        }
        DriverError::Refused(format!(
            "{to} did not receive the final WAL within 15 s, and {node} lost the leader lock \
             while shut down: it is back as a standby and, holding the newest WAL, wins the \
             election that follows"
        ))
    }
}
