//! The node's firewall: an nftables table of its own (`inet corral`), with
//! an input chain that drops what the order does not let in. The ruleset is
//! replaced in one `nft -f` transaction, so there is never a moment with
//! half a ruleset or none; other tables on the machine are left alone.
//!
//! The ruleset is always written to `<state>/firewall.nft`. It is loaded
//! only by an agent run with `--firewall on` (a container or VM of its own):
//! local nodes share their host's network, which is not theirs to filter.

use std::sync::Arc;
use std::time::Duration;

use corral_proto::FirewallSpec;

use super::{DriverError, NodeContext};
use crate::host::OneShot;

/// The nftables table corral owns on a node.
pub const TABLE: &str = "corral";
pub const FILE: &str = "firewall.nft";

pub struct FirewallDriver {
    ctx: Arc<NodeContext>,
}

/// A port list as nftables writes a set: `{ 80, 443 }`.
fn set<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Whether `s` is an IPv4 or IPv6 network in CIDR form (or one address):
/// the only thing that may go into the ruleset from an order.
fn is_network(s: &str) -> bool {
    let (addr, len) = s.split_once('/').unwrap_or((s, ""));
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    if len.is_empty() {
        return true;
    }
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.parse::<u8>().is_ok_and(|l| l <= max)
}

/// The ruleset of `spec`, as `nft -f` reads it. The first two lines make
/// the table exist and then delete it, so loading the file replaces
/// whatever an earlier order left, in the same transaction.
pub fn render(spec: &FirewallSpec) -> Result<String, DriverError> {
    if let Some(bad) = spec.cluster_networks.iter().find(|n| !is_network(n)) {
        return Err(DriverError::Refused(format!(
            "firewall order names {bad:?} as a cluster network: not an address or CIDR network"
        )));
    }
    let (v4, v6): (Vec<&String>, Vec<&String>) =
        spec.cluster_networks.iter().partition(|n| !n.contains(':'));
    let mut rules = String::new();
    let mut line = |rule: String| {
        rules.push_str("    ");
        rules.push_str(&rule);
        rules.push('\n');
    };
    line("iif \"lo\" accept".into());
    line("ct state established,related accept".into());
    line("ct state invalid drop".into());
    // Ping, path MTU discovery and IPv6 neighbour discovery.
    line("meta l4proto { icmp, ipv6-icmp } accept".into());
    if !spec.public_tcp.is_empty() {
        line(format!("tcp dport {} accept", set(&spec.public_tcp)));
    }
    for (family, nets) in [("ip", &v4), ("ip6", &v6)] {
        if nets.is_empty() {
            continue;
        }
        if !spec.cluster_tcp.is_empty() {
            line(format!(
                "{family} saddr {} tcp dport {} accept",
                set(nets),
                set(&spec.cluster_tcp)
            ));
        }
        if !spec.cluster_udp.is_empty() {
            line(format!(
                "{family} saddr {} udp dport {} accept",
                set(nets),
                set(&spec.cluster_udp)
            ));
        }
    }
    Ok(format!(
        "# corral's firewall for this node (written by corral-agent: edits are replaced)\n\
         table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n  \
           chain input {{\n    \
             type filter hook input priority filter; policy drop;\n\
         {rules}  }}\n\
         }}\n"
    ))
}

impl FirewallDriver {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    pub async fn apply(&self, spec: &FirewallSpec) -> Result<String, DriverError> {
        let ruleset = render(spec)?;
        let path = self.ctx.path(FILE);
        crate::durable::write_atomic(&path, ruleset.as_bytes(), 0o644)
            .map_err(DriverError::io(format!("writing {}", path.display())))?;
        let summary = format!(
            "public tcp {}, cluster ({}) tcp {} udp {}",
            set(&spec.public_tcp),
            spec.cluster_networks.join(", "),
            set(&spec.cluster_tcp),
            set(&spec.cluster_udp)
        );
        if !self.ctx.firewall {
            return Ok(format!(
                "firewall written to {} and not loaded: this agent runs with --firewall off \
                 (its node shares the host's network); {summary}",
                path.display()
            ));
        }
        let cmd = OneShot::new("nft", &["-f"])
            .arg(path.display().to_string())
            .timeout(Duration::from_secs(30));
        let out = self.ctx.host.run(&cmd).await.map_err(|e| {
            DriverError::Refused(format!(
                "cannot run nft (install nftables, or run the agent with --firewall off): {e}"
            ))
        })?;
        out.check(&cmd)?;
        Ok(format!(
            "firewall loaded (nftables table inet {TABLE}): {summary}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn context(dir: &std::path::Path, host: Arc<FakeHost>, firewall: bool) -> Arc<NodeContext> {
        Arc::new(NodeContext::for_test(
            "nginx1",
            [127, 0, 99, 21].into(),
            dir,
            host,
            firewall,
        ))
    }

    fn spec() -> FirewallSpec {
        FirewallSpec {
            public_tcp: vec![80],
            cluster_networks: vec!["192.168.11.0/24".into(), "fd00::/64".into()],
            cluster_tcp: vec![8080, 8500],
            cluster_udp: vec![8301],
        }
    }

    #[test]
    fn the_ruleset_drops_all_but_what_the_order_lets_in() {
        let text = render(&spec()).expect("render");
        assert!(text.contains("policy drop;"), "{text}");
        assert!(text.contains("tcp dport { 80 } accept"), "{text}");
        assert!(
            text.contains("ip saddr { 192.168.11.0/24 } tcp dport { 8080, 8500 } accept"),
            "{text}"
        );
        assert!(
            text.contains("ip6 saddr { fd00::/64 } udp dport { 8301 } accept"),
            "{text}"
        );
        // Replaces an earlier ruleset in the same transaction.
        let delete = text.find("delete table inet corral").expect("delete");
        assert!(delete < text.find("chain input").expect("chain"));
    }

    #[test]
    fn a_network_that_is_not_one_is_refused() {
        for bad in [
            "192.168.11.0/24 } accept; tcp dport 22",
            "10.0.0.0/33",
            "adm1",
            "",
        ] {
            let mut s = spec();
            s.cluster_networks = vec![bad.into()];
            assert!(render(&s).is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn an_agent_without_the_firewall_switch_only_writes_the_ruleset() {
        let host = Arc::new(FakeHost::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = context(dir.path(), host.clone(), false);
        let message = FirewallDriver::new(ctx)
            .apply(&spec())
            .await
            .expect("apply");
        assert!(message.contains("not loaded"), "{message}");
        assert!(host.calls().is_empty(), "{:?}", host.calls());
        let written = std::fs::read_to_string(dir.path().join(FILE)).expect("written");
        assert_eq!(written, render(&spec()).expect("render"));
    }

    #[tokio::test]
    async fn an_agent_with_the_firewall_switch_loads_the_ruleset_with_nft() {
        let host = Arc::new(FakeHost::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = context(dir.path(), host.clone(), true);
        let message = FirewallDriver::new(ctx)
            .apply(&spec())
            .await
            .expect("apply");
        assert!(message.contains("loaded"), "{message}");
        let calls = format!("{:?}", host.calls());
        assert!(calls.contains("nft"), "{calls}");
        assert!(calls.contains("firewall.nft"), "{calls}");
        // nft failing fails the order, with its words.
        host.fail_when("nft", "Error: Could not process rule");
        let err = FirewallDriver::new(context(dir.path(), host.clone(), true))
            .apply(&spec())
            .await
            .expect_err("nft failed");
        assert!(err.to_string().contains("Could not process rule"), "{err}");
    }
}
