//! Tokens never cross the network in cleartext. The control plane listens
//! on a non-loopback address (of a bridge this test makes and
//! removes), so it speaks TLS with a certificate from its own CA; the
//! agent's real control-plane client enrolls and polls through a relay on
//! a second such address that records every byte both ways. Neither the
//! enrollment secret nor the node token is ever in what crossed, and an
//! agent pinning another CA sends nothing of either.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_server::startup::{Application, Config, StartError};
use corral_server::tls::{TlsError, TlsMode};

mod common;
use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bridge of its own (no ports) with two addresses, deleted on drop.
struct DummyNet {
    name: String,
    server: IpAddr,
    relay: IpAddr,
}

impl DummyNet {
    fn make() -> Self {
        let id = std::process::id() % 250;
        let name = format!("ctls{id}");
        let ip = |cmd: &[&str]| {
            let out = Command::new("ip").args(cmd).output().expect("ip runs");
            assert!(
                out.status.success(),
                "ip {}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ip(&["link", "add", "name", &name, "type", "bridge"]);
        let net = Self {
            name: name.clone(),
            server: format!("10.251.{id}.1").parse().expect("ip"),
            relay: format!("10.251.{id}.2").parse().expect("ip"),
        };
        ip(&["addr", "add", &format!("{}/32", net.server), "dev", &name]);
        ip(&["addr", "add", &format!("{}/32", net.relay), "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        net
    }
}

impl Drop for DummyNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Forwards every connection on `listen` to `to`, keeping every byte.
async fn recording_relay(listen: SocketAddr, to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(listen).await.expect("relay binds");
    let addr = listener.local_addr().expect("relay addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = {
                    let record = record.clone();
                    async move {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            record.lock().expect("record").extend_from_slice(&buf[..n]);
                        }
                        let _ = sw.shutdown().await;
                    }
                };
                let down = async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        record.lock().expect("record").extend_from_slice(&buf[..n]);
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, seen)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn agent_traffic_off_loopback_is_tls_and_carries_no_secret_in_cleartext() {
    let net = DummyNet::make();
    let dir = tempfile::tempdir().expect("tmp");

    // Plain HTTP on a non-loopback address is refused outright.
    let mut plain = Config::new(dir.path().join("plain"));
    plain.listen = format!("{}:0", net.server);
    plain.tls = TlsMode::Off;
    match Application::build(plain).await {
        Err(StartError::Tls(TlsError::PlainOffLoopback(ip))) => assert_eq!(ip, net.server),
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("plain HTTP was served on {}", net.server),
    }

    let mut config = common::config(&dir.path().join("server"), &format!("{}:0", net.server));
    // The agent reaches the server through the relay's address, which the
    // certificate must therefore name too (as a second address of adm1).
    config.tls_names.push(net.relay.to_string());
    let mut server = Server::start(config).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let ca = server.ca.clone().expect("a CA");
    // Over TLS, pinning the cluster CA.
    let node = server.create_node("web").await;

    let (relay, seen) = recording_relay(SocketAddr::new(net.relay, 0), server.addr).await;
    let relay_url = format!("https://{relay}");

    // An agent pinning another cluster's CA refuses the server before any
    // request leaves it.
    let other = corral_server::tls::load_or_create(&dir.path().join("other"), &["x".into()])
        .expect("another CA");
    let secret = server.mint(&node).await;
    let (wrong, state_a) = common::agent(
        std::slice::from_ref(&relay_url),
        &node,
        &secret,
        Some(&other.ca_pem),
        &dir.path().join("agent-a"),
    );
    let err = wrong
        .poll(0, Duration::ZERO)
        .await
        .expect_err("a server with a certificate of another CA is refused");
    assert!(state_a.token().is_none());
    assert!(!err.to_string().is_empty());

    // The agent pinning the cluster's CA enrolls and polls through the relay.
    let (agent, state_b) = common::agent(
        std::slice::from_ref(&relay_url),
        &node,
        &secret,
        Some(&ca),
        &dir.path().join("agent-b"),
    );
    let orders = agent
        .poll(0, Duration::ZERO)
        .await
        .expect("enroll and poll");
    assert!(!orders.is_empty(), "the new node has orders");
    let token = state_b.token().expect("the agent kept its token");

    let seen = seen.lock().expect("record").clone();
    assert!(
        seen.len() > 1000,
        "the relay saw the exchange ({} bytes)",
        seen.len()
    );
    assert_eq!(seen[0], 0x16, "the first byte is a TLS handshake record");
    for (what, text) in [
        ("the enrollment secret", secret.as_str()),
        ("the node token", token.as_str()),
        ("an HTTP request line", "POST /api/v1/agents/enroll"),
        ("an Authorization header", "Bearer "),
        ("the order payloads' node name", "\"node\""),
    ] {
        assert!(
            !contains(&seen, text),
            "{what} crossed the network in cleartext"
        );
    }
    server.stop().await;
}
