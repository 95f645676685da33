//! Prints the nginx.conf corral-agent renders for a web node fronting the
//! given webapps (round robin, the default policy), so that benchmarks
//! measure the configuration the cluster runs rather than a copy of it.
//!
//!   nginx_conf PREFIX LISTEN NODE_ADDRESS BACKEND...    (BACKEND: ip:port)
//!
//! NODE_ADDRESS is where the metrics' `stub_status` listens, as on a node
//! (two of these nginx on one machine need two addresses). The config
//! expects `PREFIX/run`, `PREFIX/tmp` and `PREFIX/logs` to exist.

use std::net::IpAddr;

use std::net::SocketAddr;
use std::path::PathBuf;

use corral_agent::drivers::nginx::{Render, Upstream, render};
use corral_proto::LbPolicy;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: nginx_conf PREFIX LISTEN NODE_ADDRESS BACKEND...";
    let prefix = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let listen: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let node: IpAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let upstreams = args
        .map(|a| {
            let addr: SocketAddr = a.parse()?;
            Ok(Upstream {
                address: addr.ip(),
                port: addr.port(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!upstreams.is_empty(), usage);
    print!(
        "{}",
        render(&Render {
            prefix: &prefix,
            listen: vec![listen],
            service: "todomvc",
            policy: LbPolicy::RoundRobin,
            upstreams: &upstreams,
            user: None,
            status: Some(node),
        })
    );
    Ok(())
}
