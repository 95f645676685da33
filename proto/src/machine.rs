//! Machine orders: what the control plane asks of a host agent, the process
//! that makes machines on a host the server cannot drive itself (VirtualBox
//! VMs, when the server runs inside one of them). A host agent long-polls
//! `POST /api/v1/hosts/{provider}/poll`, reporting the machines it holds and
//! the orders it is still working on, and answers each order with
//! `POST /api/v1/hosts/{provider}/orders/{id}/result`.

use serde::{Deserialize, Serialize};

use crate::node::Role;

/// Longest text a host agent may report (an order's result, a machine name).
pub const MAX_MACHINE_TEXT: usize = 8192;
/// Most machines one report may list.
pub const MAX_MACHINES: usize = 1000;

/// One thing to do about one machine. Both are idempotent: a host agent that
/// died half-way gets the same order again and finishes (or undoes) the work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MachineSpec {
    /// Make the node's machine exist and run its agent.
    Ensure {
        node: String,
        role: Role,
        address: String,
        /// URL the node's agent reaches the control plane at.
        server_url: String,
        /// The node's enrollment secret, handed to the guest once.
        secret: String,
        /// The cluster CA (PEM) the guest's agent pins, when the control
        /// plane speaks TLS.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca: Option<String>,
    },
    /// Shut the node's machine down, keeping its disks (`corral down`).
    Stop { node: String },
    /// Stop the node's machine and delete it with its disks.
    Destroy { node: String },
}

impl MachineSpec {
    pub fn node(&self) -> &str {
        match self {
            MachineSpec::Ensure { node, .. }
            | MachineSpec::Stop { node }
            | MachineSpec::Destroy { node } => node,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineOrder {
    /// Unique for the life of the server process.
    pub id: u64,
    pub spec: MachineSpec,
}

/// How a machine of a host agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostMachine {
    /// The node the machine is for.
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 63, pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
    )]
    pub node: String,
    pub status: MachineStatus,
}

/// `POST /api/v1/hosts/{provider}/poll`: what the host holds, and the
/// orders it is working on (any other order it was given is given again).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostPoll {
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub machines: Vec<HostMachine>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub working: Vec<u64>,
    /// Numbers the host agent's pictures of its machines in the order it
    /// began taking them: a report older than one already seen from the
    /// same `session` (a poll sent while an order finished) is not applied.
    #[serde(default)]
    pub inventory_seq: u64,
    /// Random for each run of the host agent; its numbering starts over.
    #[serde(default)]
    pub session: u64,
}

/// The answer to a poll: new orders, possibly none (the wait ended).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostOrders {
    pub orders: Vec<MachineOrder>,
}

/// `POST /api/v1/hosts/{provider}/orders/{id}/result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MachineResult {
    pub ok: bool,
    /// What was done, or why it failed (VBoxManage's stderr included).
    #[cfg_attr(feature = "openapi", schema(max_length = 8192))]
    pub message: String,
    /// The machines the host holds now, so the control plane never acts on
    /// a picture older than the order it just saw finish.
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub machines: Vec<HostMachine>,
    /// As in [`HostPoll::inventory_seq`] and [`HostPoll::session`].
    #[serde(default)]
    pub inventory_seq: u64,
    #[serde(default)]
    pub session: u64,
    /// Trying again will not help (a VM that never reported its agent
    /// within the boot timeout): the control plane stops asking until the
    /// node is removed.
    #[serde(default)]
    pub permanent: bool,
}

fn validate_machines(machines: &[HostMachine]) -> Result<(), String> {
    if machines.len() > MAX_MACHINES {
        return Err(format!("at most {MAX_MACHINES} machines"));
    }
    for m in machines {
        crate::node::validate_node_name(&m.node)
            .map_err(|e| format!("machine {:?}: {e}", m.node))?;
    }
    Ok(())
}

impl HostPoll {
    pub fn validate(&self) -> Result<(), String> {
        validate_machines(&self.machines)?;
        if self.working.len() > MAX_MACHINES {
            return Err(format!("at most {MAX_MACHINES} orders in `working`"));
        }
        Ok(())
    }
}

impl MachineResult {
    pub fn validate(&self) -> Result<(), String> {
        if self.message.chars().count() > MAX_MACHINE_TEXT {
            return Err(format!(
                "message is longer than {MAX_MACHINE_TEXT} characters"
            ));
        }
        validate_machines(&self.machines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ensure_order_reads_as_tagged_json() {
        let order = MachineOrder {
            id: 7,
            spec: MachineSpec::Ensure {
                node: "nginx3".into(),
                role: Role::Web,
                address: "192.168.11.23".into(),
                server_url: "http://192.168.11.5:7000".into(),
                secret: "s".into(),
                ca: None,
            },
        };
        let json = serde_json::to_value(&order).expect("json");
        assert_eq!(json["spec"]["kind"], "ensure");
        assert_eq!(json["spec"]["role"], "web");
        let back: MachineOrder = serde_json::from_value(json).expect("back");
        assert_eq!(back, order);
    }

    #[test]
    fn a_report_with_a_bad_machine_name_is_refused() {
        let poll = HostPoll {
            machines: vec![HostMachine {
                node: "../etc".into(),
                status: MachineStatus::Running,
            }],
            working: vec![],
            inventory_seq: 0,
            session: 0,
        };
        assert!(poll.validate().is_err());
        assert!(HostPoll::default().validate().is_ok());
    }
}
