//! One node's orders made true: dispatches each work order to its driver,
//! remembers what was applied (so a restarted agent re-applies it and adopts
//! what runs), and drains the node when told to.

use std::sync::Arc;

use corral_proto::{OrderKind, OrderOutcome, WorkOrder};
use serde_json::Value;

use crate::control::ControlPlane;
use crate::drivers::backup::BackupDriver;
use crate::drivers::consul::ConsulDriver;
use crate::drivers::firewall::FirewallDriver;
use crate::drivers::nginx::NginxDriver;
use crate::drivers::postgres::PostgresDriver;
use crate::drivers::webapp::WebappDriver;
use crate::drivers::{DriverError, NodeContext};
use crate::durable::{StateDir, StateError};

pub struct Node {
    pub ctx: Arc<NodeContext>,
    state: StateDir,
    pub consul: ConsulDriver,
    pub webapp: Arc<WebappDriver>,
    pub nginx: Arc<NginxDriver>,
    pub postgres: Arc<PostgresDriver>,
    pub firewall: FirewallDriver,
    /// Backups and restores: they talk to the control plane's store, so
    /// only an agent with a control plane has them.
    pub backups: Option<Arc<BackupDriver>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("not a work order this agent understands: {0}")]
    BadPayload(serde_json::Error),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl Node {
    pub fn new(ctx: Arc<NodeContext>, state: StateDir) -> Self {
        // The loops that start before the orders are restored already talk
        // to Consul: they need the node's token from the start.
        if let Some(WorkOrder::Consul(spec)) = state.applied(OrderKind::Consul) {
            ctx.consul.set_servers(spec.retry_join.clone());
            ctx.consul.set_token(spec.acl.map(|a| a.token));
        }
        Self {
            consul: ConsulDriver::new(ctx.clone()),
            webapp: Arc::new(WebappDriver::new(ctx.clone())),
            nginx: Arc::new(NginxDriver::new(ctx.clone())),
            postgres: Arc::new(PostgresDriver::new(ctx.clone())),
            firewall: FirewallDriver::new(ctx.clone()),
            backups: None,
            ctx,
            state,
        }
    }

    /// The port the ordered webapp listens on, if one is ordered.
    pub fn webapp_port(&self) -> Option<u16> {
        match self.state.applied(OrderKind::Webapp)? {
            WorkOrder::Webapp(spec) => Some(spec.port),
            _ => None,
        }
    }

    /// Gives the node its backup driver, which ships files to `control`.
    pub fn with_control(mut self, control: Arc<ControlPlane>) -> Self {
        self.backups = Some(Arc::new(BackupDriver::new(
            self.ctx.clone(),
            self.postgres.clone(),
            control,
        )));
        self
    }

    fn backups(&self) -> Result<&BackupDriver, DriverError> {
        self.backups.as_deref().ok_or_else(|| {
            DriverError::Refused("this agent has no control plane to ship backups to".into())
        })
    }

    /// Starts the background loops that follow Consul (registration keepers,
    /// the nginx upstream watch).
    pub fn spawn_keepers(&self) {
        tokio::spawn(self.webapp.clone().keeper());
        tokio::spawn(self.nginx.clone().watch());
        tokio::spawn(self.postgres.clone().keeper());
        if let Some(backups) = &self.backups {
            tokio::spawn(backups.clone().ship_wal());
        }
    }

    /// Whether this node has been drained (it then runs nothing).
    pub fn drained(&self) -> bool {
        self.state.applied(OrderKind::Drain).is_some()
    }

    /// Applies a raw payload: what the agent cannot parse is a failed order.
    pub async fn apply_raw(&self, payload: &Value) -> (OrderOutcome, String) {
        let result = match serde_json::from_value::<WorkOrder>(payload.clone()) {
            Ok(order) => self.apply(&order).await,
            Err(e) => Err(ApplyError::BadPayload(e)),
        };
        match result {
            Ok(message) => (OrderOutcome::Applied, message),
            Err(e) => (OrderOutcome::Failed, e.to_string()),
        }
    }

    /// Makes `order` true and records it as the current order of its kind.
    pub async fn apply(&self, order: &WorkOrder) -> Result<String, ApplyError> {
        let message = self.make_true(order).await?;
        if matches!(
            order,
            WorkOrder::Switchover(_) | WorkOrder::Backup(_) | WorkOrder::Restore(_)
        ) {
            // A one-off action, not a state to restore after a restart.
            return Ok(message);
        }
        self.state.save_applied(order)?;
        if matches!(order, WorkOrder::Drain) {
            self.state.forget_applied(&[
                OrderKind::Consul,
                OrderKind::Postgres,
                OrderKind::Webapp,
                OrderKind::LoadBalancer,
            ]);
        }
        Ok(message)
    }

    async fn make_true(&self, order: &WorkOrder) -> Result<String, ApplyError> {
        if !matches!(order, WorkOrder::Drain) && self.state.applied(OrderKind::Drain).is_some() {
            return Err(DriverError::Refused("this node was drained".into()).into());
        }
        Ok(match order {
            WorkOrder::Consul(spec) => self.consul.apply(spec).await?,
            WorkOrder::Webapp(spec) => self.webapp.apply(spec).await?,
            WorkOrder::LoadBalancer(spec) => self.nginx.apply(spec).await?,
            WorkOrder::Postgres(spec) => self.postgres.apply(spec).await?,
            WorkOrder::Drain => self.drain().await?,
            WorkOrder::Switchover(spec) => self.postgres.switchover(spec).await?,
            WorkOrder::Backup(spec) => self.backups()?.take(spec).await?,
            WorkOrder::Restore(spec) => self.backups()?.restore(spec).await?,
            WorkOrder::Firewall(spec) => self.firewall.apply(spec).await?,
        })
    }

    /// Takes the node out: traffic first (Consul registrations), then the
    /// services, then Consul itself.
    async fn drain(&self) -> Result<String, DriverError> {
        self.webapp.deregister().await;
        self.nginx.stop().await?;
        self.webapp.stop().await?;
        self.postgres.stop().await?;
        if let Some(backups) = &self.backups {
            backups.stop_restores().await?;
        }
        self.consul.leave().await?;
        Ok("drained: services deregistered and stopped, consul left".into())
    }

    /// Re-applies the orders applied before this agent started, adopting the
    /// services that still run. Failures are logged: the services that can
    /// run, run.
    pub async fn restore(&self) {
        if self.state.applied(OrderKind::Drain).is_some() {
            return;
        }
        for order in self.state.applied_orders() {
            match self.make_true(&order).await {
                Ok(what) => tracing::info!(kind = %order.kind(), %what, "restored"),
                Err(e) => tracing::error!(kind = %order.kind(), error = %e, "restoring failed"),
            }
        }
    }
}
