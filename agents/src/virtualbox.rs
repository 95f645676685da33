//! corral nodes as VirtualBox VMs, for the host agent: each node is a linked
//! clone of a base VM's snapshot, named `<prefix><node>` and kept in a VM
//! group of corral's own (which is how a VM counts as corral's), with its
//! second NIC on a host-only network. Its boot configuration reaches the
//! guest as guest properties under `/corral/` (server URL, node name,
//! address, netmask, enrollment secret); the guest's first-boot unit reads
//! them, configures the interface, starts the agent and reports back in
//! `/corral/agent`. The secret is deleted once the agent has enrolled.
//!
//! Every operation is idempotent and starts from what VirtualBox says
//! (`list vms`, `showvminfo`): an ensure cut off half-way (the host agent was
//! killed) is finished by the next one, never made twice.

use std::time::{Duration, Instant};

use corral_proto::{HostMachine, MachineStatus, Role};

use crate::vbox::{VBoxError, VBoxManage, VmInfo, VmSettings, VmState};

/// The guest property the guest's first-boot unit reports in: `booting`,
/// `starting`, `enrolled`, or `failed: why`.
pub const AGENT_PROPERTY: &str = "/corral/agent";
/// The node's enrollment secret, until its agent has enrolled.
pub const SECRET_PROPERTY: &str = "/corral/secret";
/// The cluster CA (PEM), when the control plane speaks TLS.
pub const CA_PROPERTY: &str = "/corral/ca";

/// How the host agent makes VMs.
#[derive(Debug, Clone)]
pub struct VirtualBoxConfig {
    pub vbox: VBoxManage,
    /// The VM linked clones are made from.
    pub base_vm: String,
    /// Its snapshot the clones are linked to.
    pub base_snapshot: String,
    /// The host-only network NIC 2 sits on (the seed's 192.168.11.0/24).
    pub hostonly_network: String,
    /// VM name of a node: this prefix and the node's name.
    pub vm_prefix: String,
    /// The VM group that marks a VM as made by corral.
    pub vm_group: String,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Longest a new VM may take to report its enrolled agent.
    pub boot_timeout: Duration,
}

impl VirtualBoxConfig {
    pub fn vm_name(&self, node: &str) -> String {
        format!("{}{node}", self.vm_prefix)
    }
}

/// Why an operation failed; `permanent` when trying again cannot help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct MachineError {
    pub message: String,
    pub permanent: bool,
}

impl From<VBoxError> for MachineError {
    fn from(e: VBoxError) -> Self {
        MachineError {
            message: e.to_string(),
            permanent: false,
        }
    }
}

fn refused(message: String) -> MachineError {
    MachineError {
        message,
        permanent: false,
    }
}

/// What the guest needs to join the cluster.
#[derive(Debug, Clone)]
pub struct GuestBoot<'a> {
    pub node: &'a str,
    pub role: Role,
    pub address: &'a str,
    pub server_url: &'a str,
    pub secret: &'a str,
    /// The cluster CA (PEM) the guest's agent pins (TLS only).
    pub ca: Option<&'a str>,
}

pub struct VirtualBox {
    config: VirtualBoxConfig,
}

impl VirtualBox {
    pub fn new(config: VirtualBoxConfig) -> Self {
        Self { config }
    }

    fn vbox(&self) -> &VBoxManage {
        &self.config.vbox
    }

    fn is_ours(&self, info: &VmInfo) -> bool {
        info.groups.iter().any(|g| g == &self.config.vm_group)
    }

    /// The VM of `node` if it exists: `Err` when a VM of that name exists
    /// that corral did not make.
    async fn find(&self, node: &str) -> Result<Option<VmInfo>, MachineError> {
        let name = self.config.vm_name(node);
        let listed = self.vbox().list_vms().await?;
        if !listed.iter().any(|vm| vm.name == name) {
            return Ok(None);
        }
        let info = self.vbox().showvminfo(&name).await?;
        if !self.is_ours(&info) {
            return Err(refused(format!(
                "a VM named {name} exists and is not corral's (its groups are {:?}, not {}): rename it or choose another --vm-prefix",
                info.groups, self.config.vm_group
            )));
        }
        Ok(Some(info))
    }

    /// The machines corral made on this host.
    pub async fn inventory(&self) -> Result<Vec<HostMachine>, VBoxError> {
        let mut machines = Vec::new();
        for vm in self.vbox().list_vms().await? {
            let Some(node) = vm.name.strip_prefix(&self.config.vm_prefix) else {
                continue;
            };
            if corral_proto::validate_node_name(node).is_err() {
                continue;
            }
            let info = match self.vbox().showvminfo(&vm.name).await {
                Ok(info) => info,
                // Deleted between the two calls.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if !self.is_ours(&info) {
                continue;
            }
            machines.push(HostMachine {
                node: node.to_string(),
                status: if info.state.is_up() {
                    MachineStatus::Running
                } else {
                    MachineStatus::Stopped
                },
            });
        }
        Ok(machines)
    }

    /// Checks, before anything is cloned, that the base VM, its snapshot and
    /// the host-only network exist; the netmask of that network.
    async fn check_sources(&self) -> Result<String, MachineError> {
        let c = &self.config;
        let base = self.vbox().showvminfo(&c.base_vm).await.map_err(|e| {
            refused(format!(
                "the base VM {} cannot be cloned: {} (build it with scripts/vbox-base.sh)",
                c.base_vm,
                e.message()
            ))
        })?;
        if !base.snapshots.iter().any(|s| s == &c.base_snapshot) {
            return Err(refused(format!(
                "the base VM {} has no snapshot {:?} (it has: {}): take it with `VBoxManage snapshot {} take {}`",
                c.base_vm,
                c.base_snapshot,
                if base.snapshots.is_empty() {
                    "none".to_string()
                } else {
                    base.snapshots.join(", ")
                },
                c.base_vm,
                c.base_snapshot
            )));
        }
        self.netmask().await
    }

    async fn netmask(&self) -> Result<String, MachineError> {
        let c = &self.config;
        let nets = self.vbox().list_hostonlyifs().await?;
        let net = nets
            .iter()
            .find(|n| n.name == c.hostonly_network)
            .ok_or_else(|| {
                refused(format!(
                    "there is no host-only network {} (there are: {}): make it with `VBoxManage hostonlyif create` and `VBoxManage hostonlyif ipconfig {} --ip 192.168.11.1 --netmask 255.255.255.0`",
                    c.hostonly_network,
                    if nets.is_empty() {
                        "none".to_string()
                    } else {
                        nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
                    },
                    c.hostonly_network
                ))
            })?;
        Ok(net
            .netmask
            .clone()
            .unwrap_or_else(|| "255.255.255.0".to_string()))
    }

    /// Makes the node's VM exist, run and report its enrolled agent: clones
    /// it, or finishes a VM an earlier ensure left half made, or adopts it.
    pub async fn ensure(&self, boot: &GuestBoot<'_>) -> Result<String, MachineError> {
        let started = Instant::now();
        let name = self.config.vm_name(boot.node);
        let mut steps = Vec::new();
        let info = match self.find(boot.node).await? {
            Some(info) => {
                steps.push(format!("found {name} ({:?})", info.state));
                info
            }
            None => {
                self.check_sources().await?;
                let c = &self.config;
                self.vbox()
                    .clonevm_linked(&c.base_vm, &c.base_snapshot, &name, &c.vm_group)
                    .await?;
                steps.push(format!(
                    "cloned {name} from {}/{}",
                    c.base_vm, c.base_snapshot
                ));
                self.vbox().showvminfo(&name).await?
            }
        };
        if !info.state.is_up() {
            let netmask = self.netmask().await?;
            self.vbox()
                .modifyvm(
                    &name,
                    &VmSettings {
                        memory_mb: Some(self.config.memory_mb),
                        cpus: Some(self.config.cpus),
                        hostonly_adapter2: Some(self.config.hostonly_network.clone()),
                    },
                )
                .await?;
            for (key, value) in [
                ("/corral/server", boot.server_url),
                ("/corral/node", boot.node),
                ("/corral/role", boot.role.as_str()),
                ("/corral/address", boot.address),
                ("/corral/netmask", netmask.as_str()),
                (SECRET_PROPERTY, boot.secret),
            ] {
                self.vbox()
                    .guestproperty_set(&name, key, Some(value))
                    .await?;
            }
            // The CA the guest pins, or none for a plain-HTTP (loopback)
            // control plane.
            self.vbox()
                .guestproperty_set(&name, CA_PROPERTY, boot.ca)
                .await?;
            // What an earlier boot reported is not this boot's.
            self.vbox()
                .guestproperty_set(&name, AGENT_PROPERTY, None)
                .await?;
            self.vbox().startvm_headless(&name).await?;
            steps.push("configured and started".into());
        }
        self.wait_for_agent(&name).await?;
        // Single use: once enrolled, the node's token lives only in the guest.
        self.vbox()
            .guestproperty_set(&name, SECRET_PROPERTY, None)
            .await?;
        steps.push(format!(
            "agent enrolled ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(steps.join("; "))
    }

    /// Waits until the guest reports its agent enrolled; a VM that does not
    /// within the boot timeout is powered off and the failure is final,
    /// with what the guest last said.
    async fn wait_for_agent(&self, name: &str) -> Result<(), MachineError> {
        let deadline = Instant::now() + self.config.boot_timeout;
        loop {
            let value = self.vbox().guestproperty_get(name, AGENT_PROPERTY).await?;
            match value.as_deref() {
                Some("enrolled") => return Ok(()),
                Some(v) if v.starts_with("failed") => {
                    return Err(self.boot_failed(name, v).await);
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!(
                    "did not report its agent within {} s",
                    self.config.boot_timeout.as_secs()
                );
                return Err(self.boot_failed(name, &why).await);
            }
            // Wakes on any change of the property; at most a few seconds,
            // so a VM that died meanwhile is noticed too.
            let _ = self
                .vbox()
                .guestproperty_wait(name, AGENT_PROPERTY, left.min(Duration::from_secs(5)))
                .await?;
            let info = self.vbox().showvminfo(name).await?;
            if !info.state.is_up() {
                let why = format!("stopped ({:?}) before its agent enrolled", info.state);
                return Err(self.boot_failed(name, &why).await);
            }
        }
    }

    /// Powers the VM off (kept, for its logs) and says what the guest last
    /// reported.
    async fn boot_failed(&self, name: &str, why: &str) -> MachineError {
        let mut state = Vec::new();
        let info = self.vbox().showvminfo(name).await.ok();
        if let Some(info) = &info {
            state.push(format!("VMState={:?}", info.state));
        }
        for key in [
            AGENT_PROPERTY,
            "/VirtualBox/GuestInfo/Net/1/V4/IP",
            "/VirtualBox/GuestInfo/OS/Product",
        ] {
            let value = self
                .vbox()
                .guestproperty_get(name, key)
                .await
                .ok()
                .flatten();
            state.push(format!("{key}={}", value.as_deref().unwrap_or("(unset)")));
        }
        if info.is_some_and(|i| i.state.is_up()) {
            let _ = self.vbox().poweroff(name).await;
        }
        let _ = self
            .vbox()
            .guestproperty_set(name, SECRET_PROPERTY, None)
            .await;
        MachineError {
            message: format!(
                "{name} {why}; powered off; last state: {}",
                state.join(", ")
            ),
            permanent: true,
        }
    }

    /// Powers the node's VM off and deletes it with its disks.
    pub async fn destroy(&self, node: &str) -> Result<String, MachineError> {
        let name = self.config.vm_name(node);
        let Some(info) = self.find(node).await? else {
            return Ok(format!("no VM {name}"));
        };
        if info.state.is_up() {
            self.vbox().poweroff(&name).await?;
            self.wait_down(&name, Duration::from_secs(60)).await?;
        }
        self.vbox().unregistervm_delete(&name).await?;
        Ok(format!("{name} deleted"))
    }

    /// Shuts the node's VM down (ACPI, then the plug after a minute),
    /// keeping its disks.
    pub async fn stop(&self, node: &str) -> Result<String, MachineError> {
        let name = self.config.vm_name(node);
        let Some(info) = self.find(node).await? else {
            return Ok(format!("no VM {name}"));
        };
        if !info.state.is_up() {
            return Ok(format!("{name} is not running"));
        }
        self.vbox().acpi_power_button(&name).await?;
        if self
            .wait_down(&name, Duration::from_secs(60))
            .await
            .is_err()
        {
            self.vbox().poweroff(&name).await?;
            self.wait_down(&name, Duration::from_secs(30)).await?;
        }
        Ok(format!("{name} stopped"))
    }

    async fn wait_down(&self, name: &str, limit: Duration) -> Result<(), MachineError> {
        let deadline = Instant::now() + limit;
        loop {
            let info = self.vbox().showvminfo(name).await?;
            if !info.state.is_up() && info.state != VmState::Stopping {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(refused(format!(
                    "{name} is still {:?} after {} s",
                    info.state,
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
