//! A provider whose machines a host agent makes (`corral-agent host`): the
//! VirtualBox provider, since the control plane runs inside adm1, a VM, and
//! cannot run `VBoxManage` on the host. Each call becomes a machine order in
//! [`Hosts`] and waits for the host agent's answer; the inventory is what the
//! host agent last reported. With no host agent connected the inventory is
//! unknown (an error, so the controller acts on nothing) and every order is
//! refused at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// Nodes whose machine failed for good (never reported its agent), with
    /// why: not asked for again until the node is removed.
    gave_up: Mutex<HashMap<String, String>>,
}

impl RemoteProvider {
    pub fn new(kind: Provider, hosts: Arc<Hosts>) -> Arc<Self> {
        Arc::new(Self {
            kind,
            hosts,
            gave_up: Mutex::new(HashMap::new()),
        })
    }

    fn gave_up(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.gave_up.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn order(&self, spec: MachineSpec) -> Result<String, ProviderError> {
        let node = spec.node().to_string();
        let (id, reply) = self
            .hosts
            .file(self.kind, spec)
            .map_err(ProviderError::Refused)?;
        let deadline = tokio::time::Instant::now() + ORDER_LIMIT;
        let mut reply = std::pin::pin!(reply);
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                answer = &mut reply => {
                    return match answer {
                        Ok(Ok(done)) => Ok(done),
                        Ok(Err(failed)) => {
                            if failed.permanent {
                                self.gave_up().insert(node, failed.message.clone());
                            }
                            Err(ProviderError::Other(failed.message))
                        }
                        Err(_) => Err(ProviderError::Other(format!(
                            "the machine order for {node} was replaced before the host agent answered"
                        ))),
                    };
                }
                _ = check.tick() => {
                    // A host agent that went away (and no other took over)
                    // answers nothing: say so rather than wait.
                    if !self.hosts.connected(self.kind) {
                        self.hosts.withdraw(self.kind, id);
                        return Err(ProviderError::Other(format!(
                            "the {} host agent went away before it answered the order for {node}",
                            self.kind
                        )));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        self.hosts.withdraw(self.kind, id);
                        return Err(ProviderError::Other(format!(
                            "the {} host agent did not answer the order for {node} within {} minutes",
                            self.kind,
                            ORDER_LIMIT.as_secs() / 60
                        )));
                    }
                }
            }
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
        if let Some(why) = self.gave_up().get(&node.name) {
            return Err(ProviderError::Refused(format!(
                "not tried again (remove the node to clear it): {why}"
            )));
        }
        self.order(MachineSpec::Ensure {
            node: node.name.clone(),
            role: node.role,
            address: node.address.clone(),
            server_url: boot.server_url.clone(),
            secret: boot.secret.clone(),
            ca: boot.ca_pem.clone(),
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
        self.gave_up().remove(name);
        self.order(MachineSpec::Destroy {
            node: name.to_string(),
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::{HostPoll, MachineResult, NodeHealth, NodeState, Role};

    fn nginx3() -> Node {
        Node {
            name: "nginx3".into(),
            role: Role::Web,
            address: "192.168.11.23".into(),
            provider: Provider::Virtualbox,
            state: NodeState::Provisioning,
            health: NodeHealth::Unknown,
            last_seq: 0,
            last_heartbeat: None,
            observed: None,
            created_at: chrono::Utc::now(),
        }
    }

    fn boot() -> BootConfig {
        BootConfig {
            server_url: "http://192.168.11.5:7000".into(),
            secret: "secret".into(),
            ca_pem: None,
        }
    }

    #[tokio::test]
    async fn a_vm_that_failed_for_good_is_not_asked_for_again_until_destroyed() {
        let hosts = Arc::new(Hosts::new([Provider::Virtualbox]));
        let provider = RemoteProvider::new(Provider::Virtualbox, hosts.clone());
        // No host agent: nothing is known, nothing is filed.
        assert!(provider.inventory().await.is_err());
        assert!(provider.ensure(&nginx3(), &boot()).await.is_err());

        hosts
            .poll(Provider::Virtualbox, HostPoll::default(), Duration::ZERO)
            .await;
        let ensuring = {
            let provider = provider.clone();
            tokio::spawn(async move { provider.ensure(&nginx3(), &boot()).await })
        };
        let order = loop {
            let got = hosts
                .poll(
                    Provider::Virtualbox,
                    HostPoll::default(),
                    Duration::from_secs(5),
                )
                .await;
            if let Some(order) = got.orders.into_iter().next() {
                break order;
            }
        };
        hosts
            .finish(
                Provider::Virtualbox,
                order.id,
                MachineResult {
                    ok: false,
                    message: "corral-nginx3 did not report its agent within 300 s".into(),
                    machines: vec![],
                    inventory_seq: 0,
                    session: 0,
                    permanent: true,
                },
            )
            .expect("waiting");
        let err = ensuring.await.expect("joined").expect_err("failed");
        assert!(err.to_string().contains("did not report"), "{err}");

        // Asked again: refused at once, with why; no order filed.
        let err = provider
            .ensure(&nginx3(), &boot())
            .await
            .expect_err("given up");
        assert!(err.to_string().contains("not tried again"), "{err}");
        let none = hosts
            .poll(Provider::Virtualbox, HostPoll::default(), Duration::ZERO)
            .await;
        assert!(none.orders.is_empty());
    }
}
