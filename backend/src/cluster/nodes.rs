//! Adding, listing and removing nodes. Adding or removing one changes the
//! topology by one and reconciles, as a topology change would.

use chrono::Utc;
use corral_proto::{CreateNode, MAX_NODES_PER_ROLE, Node, NodeState, Role, validate_node_name};
use sea_orm::ConnectionTrait;

use super::ClusterError;
use super::topology::save_spec;
use super::{Cluster, Removal};
use crate::auth::Caller;
use crate::store::{self, NewEvent, node};

impl Cluster {
    /// Every node, oldest first, draining ones included.
    pub async fn nodes(&self) -> Result<Vec<Node>, ClusterError> {
        let now = Utc::now();
        store::all_nodes(self.store.conn())
            .await?
            .iter()
            .map(|row| self.node_from_row(row, now))
            .collect()
    }

    /// One node by name.
    pub async fn node(&self, name: &str) -> Result<Node, ClusterError> {
        let row = self.node_row(self.store.conn(), name).await?;
        self.node_from_row(&row, Utc::now())
    }

    /// The row of the node named `name`; 404 when there is none.
    pub(super) async fn node_row<C: ConnectionTrait>(
        &self,
        c: &C,
        name: &str,
    ) -> Result<node::Model, ClusterError> {
        validate_node_name(name).map_err(ClusterError::NotFound)?;
        store::node_by_name(c, name)
            .await?
            .ok_or_else(|| ClusterError::NotFound(format!("no node named {name}")))
    }

    /// Adds a node of a role: the topology grows by one and the reconciler
    /// gives the node its name, address and orders.
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn create_node(
        &self,
        req: CreateNode,
        caller: &Caller,
    ) -> Result<Node, ClusterError> {
        caller.require_admin()?;
        let role = Role::from(req.role);
        let provider = req.provider.unwrap_or(self.config.default_provider);
        if !self.config.providers.contains(&provider) {
            return Err(ClusterError::ProviderNotConfigured {
                provider,
                configured: self.config.providers.clone(),
            });
        }
        self.require_host_agent(provider).await?;
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        let mut spec = self.spec(&txn).await?;
        let count = match role {
            Role::Web => &mut spec.web,
            _ => &mut spec.db,
        };
        if *count >= MAX_NODES_PER_ROLE {
            return Err(ClusterError::conflict(format!(
                "the topology already has the most {role} nodes allowed ({MAX_NODES_PER_ROLE})"
            )));
        }
        *count += 1;
        save_spec(&txn, &spec, now).await?;
        let outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &spec,
                provider,
                &caller.actor(),
                Vec::new(),
            )
            .await?;
        let name = outcome
            .created
            .iter()
            .find(|n| Role::parse_node_name(n).is_some_and(|(r, _)| r == role))
            .cloned()
            .ok_or_else(|| ClusterError::Internal("the plan created no node".into()))?;
        let row = self.node_row(&txn, &name).await?;
        self.commit(txn, outcome, &mut desired).await?;
        self.node_from_row(&row, now)
    }

    /// Removes a node: an enrolled one drains first, one whose agent never
    /// enrolled (or any, with `force`) goes at once.
    #[tracing::instrument(skip(self, caller), fields(actor = %caller.actor()))]
    pub async fn remove_node(
        &self,
        name: &str,
        force: bool,
        caller: &Caller,
    ) -> Result<Removal, ClusterError> {
        caller.require_admin()?;
        let mut desired = self.write.lock().await;
        let txn = self.begin_change(&mut desired).await?;
        let now = Utc::now();
        let row = self.node_row(&txn, name).await?;
        let role = Role::from(row.role);
        if role == Role::Adm {
            return Err(ClusterError::conflict(format!(
                "{name} hosts the control plane and cannot be removed"
            )));
        }
        let state = NodeState::from(row.state);
        if state == NodeState::Draining && !force {
            drop(txn);
            return Ok(Removal::Draining(Box::new(self.node_from_row(&row, now)?)));
        }
        let mut spec = self.spec(&txn).await?;
        // Restore nodes are not counted by the topology.
        if state != NodeState::Draining && role != Role::Restore {
            let count = if role == Role::Web {
                &mut spec.web
            } else {
                &mut spec.db
            };
            *count = count.saturating_sub(1);
            save_spec(&txn, &spec, now).await?;
        }
        let mut events = Vec::new();
        let removed_now = force || state == NodeState::Provisioning;
        if removed_now {
            store::delete_node(&txn, row.id).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "node.removed".into(),
                subject: name.into(),
                message: if force {
                    format!("{name} removed without draining (forced)")
                } else {
                    format!("{name} removed; its agent had never enrolled")
                },
            });
        } else {
            store::set_node_state(&txn, row.id, node::State::Draining, now).await?;
            events.push(NewEvent {
                actor: caller.actor(),
                kind: "node.draining".into(),
                subject: name.into(),
                message: format!("{name} told to drain; it is removed once it has"),
            });
        }
        let mut outcome = self
            .apply_plan(
                &txn,
                &mut desired,
                &spec,
                self.config.default_provider,
                &caller.actor(),
                events,
            )
            .await?;
        let result = if removed_now {
            outcome.removed.push((row.id, name.to_string()));
            Removal::Removed
        } else {
            outcome.draining.push(name.to_string());
            let row = self.node_row(&txn, name).await?;
            Removal::Draining(Box::new(self.node_from_row(&row, now)?))
        };
        self.commit(txn, outcome, &mut desired).await?;
        Ok(result)
    }
}
