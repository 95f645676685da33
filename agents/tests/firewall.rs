//! The firewall the agent renders, loaded by real nftables into a network
//! namespace the test makes (a node of its own, as an LXC container is),
//! and probed with real connections from two addresses of the host: one in
//! the cluster's network and one outside it.
//!
//! Needs root, `ip` and `nft` (scripts/setup.sh --lxc installs nftables).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_agent::drivers::firewall::render;
use corral_proto::FirewallSpec;

/// Runs a command to completion; panics with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with one veth link to the host, and TCP listeners
/// inside it; all removed on drop, whatever the test did.
struct Node {
    ns: String,
    host_if: String,
    listeners: Option<Child>,
    /// The node's address, the host's address in the cluster network and
    /// the host's address outside it.
    node: Ipv4Addr,
    inside: Ipv4Addr,
    outside: Ipv4Addr,
}

impl Node {
    fn new(ports: &[u16]) -> Node {
        let pid = std::process::id();
        let octet = (pid % 200) as u8 + 20;
        let mut node = Node {
            ns: format!("corralfw{pid}"),
            host_if: format!("cfw{pid}a"),
            listeners: None,
            node: Ipv4Addr::new(10, 231, octet, 2),
            inside: Ipv4Addr::new(10, 231, octet, 1),
            outside: Ipv4Addr::new(10, 231, octet, 200),
        };
        let peer = format!("cfw{pid}b");
        run("ip", &["netns", "add", &node.ns]);
        run(
            "ip",
            &[
                "link",
                "add",
                &node.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        );
        run("ip", &["link", "set", &peer, "netns", &node.ns]);
        for addr in [node.inside, node.outside] {
            run(
                "ip",
                &["addr", "add", &format!("{addr}/24"), "dev", &node.host_if],
            );
        }
        run("ip", &["link", "set", &node.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", node.ns.as_str()];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", node.node),
            "dev",
            &peer,
        ]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        // One listener per port, each answering "ok" and closing.
        let script = "import socket, sys, threading\n\
            def serve(port):\n\
            \x20   s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
            \x20   s.bind(('0.0.0.0', port)); s.listen(64)\n\
            \x20   while True:\n\
            \x20       c, _ = s.accept(); c.sendall(b'ok'); c.close()\n\
            for p in sys.argv[1:]:\n\
            \x20   threading.Thread(target=serve, args=(int(p),), daemon=True).start()\n\
            print('listening', flush=True)\n\
            sys.stdin.read()\n";
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            node.ns.clone(),
            "python3".into(),
            "-c".into(),
            script.into(),
        ];
        args.extend(ports.iter().map(u16::to_string));
        node.listeners = Some(
            Command::new("ip")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("python3 listeners"),
        );
        node
    }

    /// Loads `spec`'s ruleset into the namespace, as the agent does.
    fn load(&self, spec: &FirewallSpec, dir: &Path) {
        let file = dir.join("firewall.nft");
        std::fs::write(&file, render(spec).expect("render")).expect("write ruleset");
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "nft",
                "-f",
                file.to_str().expect("path"),
            ],
        );
    }

    fn tables(&self) -> String {
        run("ip", &["netns", "exec", &self.ns, "nft", "list", "tables"])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.listeners.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Whether a TCP connection from `from` to `to` gets the listener's "ok"
/// within a second: a dropped SYN is a refusal here.
async fn reaches(from: Ipv4Addr, to: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from.into(), 0)).expect("bind");
    let attempt = async {
        let mut stream = socket.connect(to).await.ok()?;
        let mut buf = [0u8; 2];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf == *b"ok")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits (with a deadline) until the listeners answer from inside.
async fn wait_listening(node: &Node, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reaches(node.inside, SocketAddr::new(node.node.into(), port)).await {
        assert!(Instant::now() < deadline, "the listeners never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_firewall_lets_in_only_what_the_order_names() {
    const HTTP: u16 = 80;
    const POSTGRES: u16 = 5432;
    const CONSUL: u16 = 8500;
    let node = Node::new(&[HTTP, POSTGRES, CONSUL]);
    let dir = tempfile::tempdir().expect("tempdir");
    wait_listening(&node, HTTP).await;
    let to = |port: u16| SocketAddr::new(node.node.into(), port);

    // Without a firewall, both host addresses reach every port: the probe
    // itself can tell open from closed.
    for port in [HTTP, POSTGRES, CONSUL] {
        assert!(reaches(node.outside, to(port)).await, "no firewall: {port}");
    }

    // A web node's rules: HTTP from anyone; cluster ports from the
    // cluster's network (the host's first address, in the /25) only.
    let cluster = format!("{}/25", Ipv4Addr::from(u32::from(node.inside) & !0x7f));
    let web = FirewallSpec {
        public_tcp: vec![HTTP],
        cluster_networks: vec![cluster.clone()],
        cluster_tcp: vec![CONSUL],
        cluster_udp: vec![8301],
    };
    node.load(&web, dir.path());
    assert!(reaches(node.outside, to(HTTP)).await, "HTTP from outside");
    assert!(
        reaches(node.inside, to(HTTP)).await,
        "HTTP from the cluster"
    );
    assert!(
        reaches(node.inside, to(CONSUL)).await,
        "Consul from the cluster"
    );
    assert!(
        !reaches(node.outside, to(CONSUL)).await,
        "Consul from outside the cluster"
    );
    assert!(
        !reaches(node.inside, to(POSTGRES)).await,
        "PostgreSQL on a web node, even from the cluster"
    );
    assert!(!reaches(node.outside, to(POSTGRES)).await);

    // A new order replaces the ruleset in one transaction: a db node's.
    let db = FirewallSpec {
        public_tcp: vec![],
        cluster_networks: vec![cluster],
        cluster_tcp: vec![CONSUL, POSTGRES],
        cluster_udp: vec![8301],
    };
    node.load(&db, dir.path());
    assert!(
        reaches(node.inside, to(POSTGRES)).await,
        "PostgreSQL from the cluster"
    );
    assert!(
        !reaches(node.outside, to(POSTGRES)).await,
        "PostgreSQL from outside"
    );
    assert!(
        !reaches(node.outside, to(HTTP)).await,
        "HTTP is no longer public"
    );
    let tables = node.tables();
    assert_eq!(
        tables.matches("table inet corral").count(),
        1,
        "one table after a reload: {tables}"
    );
}
