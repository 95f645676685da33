//! The node's Consul agent: bound to the node address, data in the state
//! dir, server or client as the order says, script checks allowed locally
//! (the PostgreSQL check runs `corral-agent check-postgres`).

use std::sync::Arc;
use std::time::Duration;

use corral_proto::{ConsulSpec, ports};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::{DriverError, NodeContext, ha, mkdir, write_if_changed};
use crate::host::{Ensured, OneShot, ServiceSpec};

pub const SERVICE: &str = "consul";

/// Where service definitions that carry script checks go: Consul runs
/// script checks only from its own configuration files
/// (`enable_local_script_checks`), never from HTTP registrations.
pub const CONF_DIR: &str = "consul/conf.d";

pub struct ConsulDriver {
    ctx: Arc<NodeContext>,
}

/// How long applying a Consul order waits for the node's ACL token to exist.
const TOKEN_WAIT: Duration = Duration::from_secs(60);

/// The agent configuration for `spec` on this node (Consul 1.8 JSON).
pub fn render_config(node: &str, address: &str, data_dir: &str, spec: &ConsulSpec) -> Value {
    let mut config = json!({
        "node_name": node,
        "datacenter": spec.datacenter,
        "data_dir": data_dir,
        "bind_addr": address,
        "client_addr": address,
        "advertise_addr": address,
        "server": spec.server,
        "retry_join": spec.retry_join,
        "retry_interval": "2s",
        "ui": spec.ui,
        "encrypt": spec.encrypt,
        "ports": {
            "http": ports::CONSUL_HTTP,
            "dns": ports::CONSUL_DNS,
            "server": ports::CONSUL_SERVER,
            "serf_lan": ports::CONSUL_SERF_LAN,
            "serf_wan": ports::CONSUL_SERF_WAN,
        },
        "enable_local_script_checks": true,
        "disable_update_check": true,
        "leave_on_terminate": false,
        "log_level": "INFO",
        "performance": { "raft_multiplier": 1 },
        // Faster failure detection than Consul's defaults (which took 5.5-
        // 5.9 s to declare a frozen node failed): the primary's lock is
        // freed sooner. The fencing timeouts are derived from these
        // (`ha::FENCED_WITHIN`); change them together.
        "gossip_lan": {
            "probe_interval": format!("{}ms", ha::GOSSIP_PROBE_INTERVAL.as_millis()),
            "probe_timeout": format!("{}ms", ha::GOSSIP_PROBE_TIMEOUT.as_millis()),
            "suspicion_mult": ha::GOSSIP_SUSPICION_MULT,
        },
    });
    if let Some(v6) = &spec.ipv6 {
        // Gossip and RPC over IPv6; HTTP and DNS answer on both addresses
        // (the agents and webapps call the local agent over IPv4).
        config["bind_addr"] = json!(v6.bind.to_string());
        config["advertise_addr"] = json!(v6.bind.to_string());
        config["client_addr"] = json!(format!("{address} {}", v6.bind));
        config["retry_join"] = json!(
            v6.retry_join
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
    }
    if spec.server {
        config["bootstrap_expect"] = json!(spec.bootstrap_expect);
    }
    if let Some(acl) = &spec.acl {
        let mut tokens = json!({ "agent": acl.token });
        if let Some(management) = &acl.management {
            tokens["master"] = json!(management);
        }
        if let Some(default) = &acl.default {
            tokens["default"] = json!(default);
        }
        config["primary_datacenter"] = json!(spec.datacenter);
        config["acl"] = json!({
            "enabled": true,
            "default_policy": "deny",
            // Servers unreachable: keep using what was resolved before.
            "down_policy": "extend-cache",
            // A node's token may be used a moment before the admin node
            // has created it; a short TTL keeps that "not found" from
            // being cached for the default 30 s.
            "token_ttl": "2s",
            "tokens": tokens,
        });
    }
    config
}

impl ConsulDriver {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    fn service_spec(&self, config_file: &str) -> ServiceSpec {
        ServiceSpec {
            name: SERVICE.into(),
            program: self.ctx.bins.consul.clone(),
            args: vec![
                "agent".into(),
                format!("-config-file={config_file}"),
                format!("-config-dir={}", self.ctx.path(CONF_DIR).display()),
            ],
            env: Vec::new(),
            run_as: None,
            marker: config_file.to_string(),
            stop_signal: Signal::SIGTERM,
            restart: true,
        }
    }

    #[tracing::instrument(skip_all, fields(node = %self.ctx.node))]
    pub async fn apply(&self, spec: &ConsulSpec) -> Result<String, DriverError> {
        // Every later Consul call of this agent carries the node's token.
        self.ctx
            .consul
            .set_token(spec.acl.as_ref().map(|a| a.token.clone()));
        self.ctx.consul.set_servers(spec.retry_join.clone());
        let dir = self.ctx.path("consul");
        let data = dir.join("data");
        mkdir(&data)?;
        mkdir(&self.ctx.path(CONF_DIR))?;
        let config = render_config(
            &self.ctx.node,
            &self.ctx.address.to_string(),
            &data.to_string_lossy(),
            spec,
        );
        let file = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("json");
        let changed = write_if_changed(&file, &text, 0o600)?;
        let service = self.service_spec(&file.to_string_lossy());
        let mut ensured = self.ctx.host.ensure(&service).await?;
        if changed && matches!(ensured, Ensured::Running | Ensured::Adopted) {
            // Server/bootstrap/join settings are read only at start.
            self.ctx.host.stop(SERVICE).await?;
            ensured = self.ctx.host.ensure(&service).await?;
        }
        // The orders after this one register services with the local agent:
        // wait (briefly) until it answers, so they do not start by failing.
        let deadline = std::time::Instant::now() + self.ctx.start_wait;
        let mut answering = self.ctx.consul.alive().await;
        while !answering && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            answering = self.ctx.consul.alive().await;
        }
        // With ACLs, the orders after this one also need the node's token,
        // which the control plane creates once the servers have a leader:
        // wait for it too (a new cluster's servers start together).
        let mut note = if answering { "" } else { ", not answering yet" };
        if answering && let Some(acl) = &spec.acl {
            let deadline = std::time::Instant::now() + TOKEN_WAIT;
            let mut valid = self.ctx.consul.acl_token_valid(&acl.token).await;
            while valid.is_err() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                valid = self.ctx.consul.acl_token_valid(&acl.token).await;
            }
            if let Err(e) = valid {
                tracing::warn!(error = %e, "this node's consul token is not in place yet");
                note = ", its ACL token not in place yet";
            }
        }
        let role = if spec.server { "server" } else { "client" };
        Ok(format!("consul {role} {ensured:?} on {}{note}", self.ctx.address).to_lowercase())
    }

    /// Leaves the cluster gracefully, then makes sure the agent is gone.
    pub async fn leave(&self) -> Result<(), DriverError> {
        let mut cmd = OneShot::new(
            &self.ctx.bins.consul,
            &["leave", &format!("-http-addr={}", self.ctx.consul.url())],
        );
        if let Some(token) = self.ctx.consul.token() {
            cmd.env.push(("CONSUL_HTTP_TOKEN".into(), token));
        }
        if let Err(e) = self.ctx.host.run(&cmd).await.and_then(|o| o.check(&cmd)) {
            tracing::warn!(error = %e, "consul leave failed; stopping it anyway");
        }
        self.ctx.host.stop(SERVICE).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::ConsulAcl;

    fn spec(server: bool) -> ConsulSpec {
        ConsulSpec {
            datacenter: "dc".into(),
            bind: "127.0.11.21".into(),
            server,
            bootstrap_expect: 3,
            retry_join: vec!["127.0.11.5".into()],
            ui: false,
            encrypt: "k".into(),
            acl: Some(ConsulAcl {
                token: "node-token".into(),
                management: server.then(|| "management".into()),
                default: None,
            }),
            ipv6: None,
        }
    }

    #[test]
    fn a_dual_stack_agent_gossips_over_ipv6_and_answers_http_on_both() {
        let mut s = spec(false);
        s.ipv6 = Some(corral_proto::ConsulIpv6 {
            bind: "fd12::c0a8:b16".parse().expect("v6"),
            retry_join: vec!["fd12::c0a8:b05".parse().expect("v6")],
        });
        let config = render_config("nginx2", "192.168.11.22", "/d", &s);
        assert_eq!(config["bind_addr"], "fd12::c0a8:b16");
        assert_eq!(config["advertise_addr"], "fd12::c0a8:b16");
        assert_eq!(config["client_addr"], "192.168.11.22 fd12::c0a8:b16");
        assert_eq!(config["retry_join"], json!(["fd12::c0a8:b05"]));
    }

    #[test]
    fn servers_and_clients_gossip_with_the_timing_fencing_assumes() {
        for server in [true, false] {
            let config = render_config("pg1", "127.0.11.31", "/d", &spec(server));
            assert_eq!(
                config["gossip_lan"],
                json!({ "probe_interval": "300ms", "probe_timeout": "150ms", "suspicion_mult": 3 })
            );
        }
    }

    #[test]
    fn only_servers_expect_a_bootstrap_quorum() {
        let server = render_config("nginx1", "127.0.11.21", "/d", &spec(true));
        assert_eq!(server["bootstrap_expect"], 3);
        assert_eq!(server["bind_addr"], "127.0.11.21");
        assert_eq!(server["client_addr"], "127.0.11.21");
        assert_eq!(server["ports"]["dns"], 8600);
        assert_eq!(server["enable_local_script_checks"], true);
        let client = render_config("nginx2", "127.0.11.22", "/d", &spec(false));
        assert!(client.get("bootstrap_expect").is_none());
        assert_eq!(client["server"], false);
    }

    #[test]
    fn acls_deny_by_default_and_only_servers_hold_the_management_token() {
        let server = render_config("nginx1", "127.0.11.21", "/d", &spec(true));
        assert_eq!(server["acl"]["enabled"], true);
        assert_eq!(server["acl"]["default_policy"], "deny");
        assert_eq!(server["acl"]["tokens"]["agent"], "node-token");
        assert_eq!(server["acl"]["tokens"]["master"], "management");
        assert_eq!(server["primary_datacenter"], "dc");
        let client = render_config("nginx2", "127.0.11.22", "/d", &spec(false));
        assert_eq!(client["acl"]["tokens"]["agent"], "node-token");
        assert!(client["acl"]["tokens"].get("master").is_none());
        let mut old = spec(false);
        old.acl = None;
        assert!(
            render_config("nginx2", "127.0.11.22", "/d", &old)
                .get("acl")
                .is_none()
        );
    }
}
