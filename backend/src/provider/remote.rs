//! A provider whose machines a host agent makes (`corral-agent host`): the
//! VirtualBox provider, since the control plane runs inside adm1, a VM, and
//! cannot run `VBoxManage` on the host. Each call becomes a machine order in
//! [`Hosts`] and waits for the host agent's answer; the inventory is what the
//! host agent last reported. With no host agent connected the inventory is
//! unknown (an error, so the controller acts on nothing) and every order is
//! refused at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use corral_proto::{MachineSpec, MachineStatus, Node, Provider};

use super::{BootConfig, Machine, MachineState, Machines, ProviderError};
use crate::cluster::Hosts;
use crate::cluster::hosts::missing_host_agent;

/// Longest the server waits for a host agent's answer: a clone, a boot and
/// the agent's enrollment fit well within it (the host agent's own boot
/// timeout is shorter and reports why).
const ORDER_LIMIT: Duration = Duration::from_secs(20 * 60);

pub struct RemoteProvider {
    kind: Provider,
    hosts: Arc<Hosts>,
}

impl RemoteProvider {
    pub fn new(kind: Provider, hosts: Arc<Hosts>) -> Arc<Self> {
        Arc::new(Self { kind, hosts })
    }

    async fn order(&self, spec: MachineSpec) -> Result<String, ProviderError> {
        let node = spec.node().to_string();
        let reply = self
            .hosts
            .file(self.kind, spec)
            .map_err(ProviderError::Refused)?;
        match tokio::time::timeout(ORDER_LIMIT, reply).await {
            Ok(Ok(Ok(done))) => Ok(done),
            Ok(Ok(Err(failed))) => Err(ProviderError::Other(failed)),
            Ok(Err(_)) => Err(ProviderError::Other(format!(
                "the machine order for {node} was replaced before the host agent answered"
            ))),
            Err(_) => Err(ProviderError::Other(format!(
                "the {} host agent did not answer the order for {node} within {} minutes",
                self.kind,
                ORDER_LIMIT.as_secs() / 60
            ))),
        }
    }
}

#[async_trait]
impl Machines for RemoteProvider {
    fn kind(&self) -> Provider {
        self.kind
    }

    /// The host is another machine: its host agent checks it.
    async fn preflight(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn inventory(&self) -> Result<Vec<Machine>, ProviderError> {
        let machines =
            self.hosts
                .machines(self.kind)
                .ok_or_else(|| ProviderError::Unavailable {
                    provider: self.kind,
                    reason: missing_host_agent(self.kind),
                })?;
        Ok(machines
            .into_iter()
            .map(|m| Machine {
                name: m.node,
                state: match m.status {
                    MachineStatus::Running => MachineState::Running,
                    MachineStatus::Stopped => MachineState::Stopped,
                },
            })
            .collect())
    }

    async fn ensure(&self, node: &Node, boot: &BootConfig) -> Result<String, ProviderError> {
        self.order(MachineSpec::Ensure {
            node: node.name.clone(),
            role: node.role,
            address: node.address.clone(),
            server_url: boot.server_url.clone(),
            secret: boot.join_token.clone(),
        })
        .await
    }

    async fn stop(&self, name: &str) -> Result<(), ProviderError> {
        self.order(MachineSpec::Stop {
            node: name.to_string(),
        })
        .await
        .map(drop)
    }

    async fn destroy(&self, name: &str) -> Result<(), ProviderError> {
        self.order(MachineSpec::Destroy {
            node: name.to_string(),
        })
        .await
        .map(drop)
    }
}
