//! Faults that need real isolation: network partitions cut with nftables
//! (between containers of an LXC cluster, or between the loopback
//! addresses of a local one), and whole nodes hung with `lxc-freeze`.
//! Every rule lives in tables named after the cluster, removed by
//! [`Partition`]'s drop (and by the cluster's own cleanup), so a failing
//! test never leaves the host cut off.
//!
//! Containers talk to each other across the bridge (nft's `bridge` family,
//! `forward` hook); adm1 is the host itself, whose traffic with a container
//! passes the `inet` family's `input` and `output` hooks.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Cluster, Machines, run};

impl Cluster {
    /// A node's IPv6 address in a dual-stack cluster (the cluster's ULA
    /// prefix, made in the state dir, with the IPv4 address as the low 32
    /// bits); `None` when the cluster has no IPv6 prefix.
    pub fn address_v6(&self, node: &str) -> Option<std::net::Ipv6Addr> {
        let ula = std::fs::read_to_string(self.state_dir().join("ipv6-prefix")).ok()?;
        let prefix: std::net::Ipv6Addr = ula.trim().strip_suffix("/64")?.parse().ok()?;
        let v4: std::net::Ipv4Addr = self.address(node).parse().ok()?;
        Some(std::net::Ipv6Addr::from(
            u128::from(prefix) | u128::from(u32::from(v4)),
        ))
    }

    /// The nft tables' name for this cluster's fault rules.
    pub fn nft_table(&self) -> String {
        format!("corral_e2e_{}", self.net.replace('.', "_"))
    }
}

async fn nft(script: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules.nft");
    std::fs::write(&file, script)?;
    let out = run(Command::new("nft").arg("-f").arg(&file)).await?;
    if !out.exit.success() {
        bail!(
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Traffic cut between two groups of nodes, both ways, until dropped.
pub struct Partition {
    table: String,
}

impl Partition {
    /// Cuts every packet between a node of `side` and a node of `others`
    /// (names; `adm1` means the host). On a local cluster every node is a
    /// loopback address of this host, so the rules go into the `inet`
    /// family's output hook, which loopback packets pass.
    pub async fn cut(c: &Cluster, side: &[&str], others: &[&str]) -> anyhow::Result<Partition> {
        let table = c.nft_table();
        if c.machines == Machines::Local {
            let mut rules = String::new();
            for a in side {
                for b in others {
                    let (ia, ib) = (c.address(a), c.address(b));
                    rules.push_str(&format!(
                        "    ip saddr {ia} ip daddr {ib} drop\n    ip saddr {ib} ip daddr {ia} drop\n"
                    ));
                }
            }
            let script = format!(
                "table inet {table} {{\n  chain output {{\n    type filter hook output priority -10; policy accept;\n{rules}  }}\n}}\n"
            );
            heal(&table).await;
            nft(&script).await.context("cutting the network")?;
            return Ok(Partition { table });
        }
        let host = c.address("adm1");
        let mut bridge_rules = String::new();
        let mut host_rules_in = String::new();
        let mut host_rules_out = String::new();
        // Both families: a dual-stack cluster talks over IPv6.
        let pairs = |a: &str, b: &str| {
            let mut pairs = vec![("ip", c.address(a), c.address(b))];
            if let (Some(va), Some(vb)) = (c.address_v6(a), c.address_v6(b)) {
                pairs.push(("ip6", va.to_string(), vb.to_string()));
            }
            pairs
        };
        for a in side {
            for b in others {
                let on_host = c.address(a) == host || c.address(b) == host;
                for (family, ia, ib) in pairs(a, b) {
                    if on_host {
                        let other = if c.address(a) == host { ib } else { ia };
                        host_rules_in.push_str(&format!("    {family} saddr {other} drop\n"));
                        host_rules_out.push_str(&format!("    {family} daddr {other} drop\n"));
                    } else {
                        bridge_rules.push_str(&format!(
                            "    {family} saddr {ia} {family} daddr {ib} drop\n    {family} saddr {ib} {family} daddr {ia} drop\n"
                        ));
                    }
                }
            }
        }
        let script = format!(
            "table bridge {table} {{\n  chain forward {{\n    type filter hook forward priority -10; policy accept;\n{bridge_rules}  }}\n}}\n\
             table inet {table} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n{host_rules_in}  }}\n  chain output {{\n    type filter hook output priority -10; policy accept;\n{host_rules_out}  }}\n}}\n"
        );
        // Start from a clean slate: a previous partition's rules go.
        heal(&table).await;
        nft(&script).await.context("cutting the network")?;
        Ok(Partition { table })
    }

    /// Cuts one TCP connection of this host, both ways: every packet
    /// between local port `a` and local port `b` (on a local cluster,
    /// where nodes' connections between loopback addresses all leave from
    /// 127.0.0.1 and cannot be told apart by address).
    pub async fn cut_ports(c: &Cluster, a: u16, b: u16) -> anyhow::Result<Partition> {
        let table = c.nft_table();
        let script = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority -10; policy accept;\n    tcp sport {a} tcp dport {b} drop\n    tcp sport {b} tcp dport {a} drop\n  }}\n}}\n"
        );
        heal(&table).await;
        nft(&script).await.context("cutting the connection")?;
        Ok(Partition { table })
    }

    /// Restores every path.
    pub async fn heal(self) {
        heal(&self.table).await;
    }
}

async fn heal(table: &str) {
    for family in ["bridge", "inet"] {
        let _ = run(Command::new("nft").args(["delete", "table", family, table])).await;
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for family in ["bridge", "inet"] {
            crate::run_blocking(Command::new("nft").args(["delete", "table", family, &self.table]));
        }
    }
}

/// A container hung whole with `lxc-freeze`, thawed when dropped.
pub struct Freeze {
    lxc_path: std::path::PathBuf,
    node: String,
    thawed: bool,
}

impl Freeze {
    pub async fn node(c: &Cluster, node: &str) -> anyhow::Result<Freeze> {
        let out = run(Command::new("lxc-freeze")
            .arg("-P")
            .arg(c.lxc_path())
            .args(["-n", node]))
        .await?;
        if !out.exit.success() {
            bail!(
                "lxc-freeze {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Freeze {
            lxc_path: c.lxc_path(),
            node: node.to_string(),
            thawed: false,
        })
    }

    pub async fn thaw(mut self) -> anyhow::Result<()> {
        self.thawed = true;
        let out = run(Command::new("lxc-unfreeze")
            .arg("-P")
            .arg(&self.lxc_path)
            .args(["-n", &self.node]))
        .await?;
        if !out.exit.success() {
            bail!(
                "lxc-unfreeze {}: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if !self.thawed {
            crate::run_blocking(
                Command::new("lxc-unfreeze")
                    .arg("-P")
                    .arg(&self.lxc_path)
                    .args(["-n", &self.node]),
            );
        }
    }
}

/// How long a TCP connect to `addr` takes to fail or succeed, at most `limit`.
pub async fn reachable(addr: &str, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// An address given to this host's loopback device for a while (to take an
/// address a node is about to get), removed when dropped.
pub struct HostAddress {
    cidr: String,
    removed: bool,
}

impl HostAddress {
    pub async fn add(addr: &str) -> anyhow::Result<HostAddress> {
        let cidr = format!("{addr}/32");
        let out = run(Command::new("ip").args(["addr", "add", &cidr, "dev", "lo"])).await?;
        if !out.exit.success() {
            bail!(
                "ip addr add {cidr}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(HostAddress {
            cidr,
            removed: false,
        })
    }

    pub async fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        let out = run(Command::new("ip").args(["addr", "del", &self.cidr, "dev", "lo"])).await?;
        if !out.exit.success() {
            bail!(
                "ip addr del {}: {}",
                self.cidr,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        if !self.removed {
            crate::run_blocking(Command::new("ip").args(["addr", "del", &self.cidr, "dev", "lo"]));
        }
    }
}

/// Every process of a local cluster's `node`: those naming its directory
/// and their children (postgres backends rename themselves). Fails unless
/// its agent, Consul and postgres are among them.
pub fn node_processes(c: &Cluster, node: &str) -> anyhow::Result<Vec<u32>> {
    let dir = c.state_dir().join("nodes").join(node);
    // Paths under the node's directory, or the directory itself as an
    // argument (the agent's --state-dir; arguments end in NUL).
    let mut pids = Cluster::pids_with(&format!("{}/", dir.display()));
    for pid in Cluster::pids_with(&format!("{}\0", dir.display())) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    let children = crate::children_of(&pids);
    pids.extend(children);
    for service in ["agent", "consul", "postgres"] {
        let pid: u32 = std::fs::read_to_string(dir.join("run").join(format!("{service}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("{node} has no {service} pid file"))?;
        if !pids.contains(&pid) {
            bail!("{node}'s {service} ({pid}) not found among {pids:?}");
        }
    }
    Ok(pids)
}

/// Sends `signal` to every pid (gone ones are ignored).
pub fn signal_all(pids: &[u32], signal: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), signal);
    }
}

/// Processes the caller has stopped (SIGSTOP), continued when dropped, so
/// a failing test never leaves them hung.
pub struct Frozen(pub Vec<u32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_all(&self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The pid in `node`'s `run/<service>.pid` (local clusters).
pub fn service_pid(c: &Cluster, node: &str, service: &str) -> anyhow::Result<u32> {
    let path = c
        .state_dir()
        .join("nodes")
        .join(node)
        .join("run")
        .join(format!("{service}.pid"));
    std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", path.display()))
}
