//! The todomvc webapp: run on the node address, finding PostgreSQL through
//! the local Consul agent, and registered there as service `todomvc` with an
//! HTTP check on `/healthz`. A keeper loop re-registers it whenever the
//! local Consul agent has forgotten it (Consul restarted, data wiped).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::{WEBAPP_SERVICE, WebappSpec};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::{DriverError, NodeContext};
use crate::host::ServiceSpec;

pub const SERVICE: &str = "todomvc";

pub struct WebappDriver {
    ctx: Arc<NodeContext>,
    /// The port and address to keep registered, while the webapp should
    /// run.
    registered: Mutex<Option<(u16, IpAddr)>>,
}

/// The Consul service definition of this node's webapp.
///
/// A webapp that already answered its health check is registered passing, so
/// load balancers route to a new node without waiting for Consul's first
/// check rounds (about 1.5 s); Consul's check keeps it honest every second.
pub fn registration(node: &str, address: IpAddr, port: u16, healthy: bool) -> Value {
    json!({
        "ID": format!("{WEBAPP_SERVICE}-{node}"),
        "Name": WEBAPP_SERVICE,
        "Address": address.to_string(),
        "Port": port,
        "Tags": [node],
        "Check": {
            "CheckID": format!("service:{WEBAPP_SERVICE}-{node}"),
            "Name": "todomvc /healthz",
            "HTTP": format!("http://{}/healthz", SocketAddr::new(address, port)),
            "Interval": "1s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "30m",
            "Status": if healthy { "passing" } else { "critical" },
        },
    })
}

impl WebappDriver {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self {
            ctx,
            registered: Mutex::new(None),
        }
    }

    fn service_id(&self) -> String {
        format!("{WEBAPP_SERVICE}-{}", self.ctx.node)
    }

    pub fn service_spec(&self, spec: &WebappSpec) -> ServiceSpec {
        let listen = format!("{}:{}", self.ctx.address, spec.port);
        let mut args = vec![
            "--listen".into(),
            listen.clone(),
            "--node-name".into(),
            self.ctx.node.clone(),
            "--consul".into(),
            self.ctx.consul.url().to_string(),
        ];
        if let Some(v6) = spec.address_v6 {
            args.push("--also-listen".into());
            args.push(SocketAddr::new(v6.into(), spec.port).to_string());
        }
        ServiceSpec {
            name: SERVICE.into(),
            program: self.ctx.bins.todomvc.clone(),
            args,
            env: {
                let mut env = vec![
                    ("TODOMVC_DB_NAME".into(), spec.database.clone()),
                    ("TODOMVC_DB_USER".into(), spec.user.clone()),
                    ("TODOMVC_DB_PASSWORD".into(), spec.password.clone()),
                ];
                if let Some(token) = &spec.consul_token {
                    env.push(("CONSUL_HTTP_TOKEN".into(), token.clone()));
                }
                env
            },
            run_as: None,
            marker: format!("--listen {listen}"),
            stop_signal: Signal::SIGTERM,
            restart: true,
        }
    }

    #[tracing::instrument(skip_all, fields(node = %self.ctx.node))]
    pub async fn apply(&self, spec: &WebappSpec) -> Result<String, DriverError> {
        let ensured = self.ctx.host.ensure(&self.service_spec(spec)).await?;
        let address = spec.address_v6.map_or(self.ctx.address, IpAddr::V6);
        let previous = self
            .registered
            .lock()
            .expect("lock")
            .replace((spec.port, address));
        if previous.is_some_and(|p| p != (spec.port, address)) {
            // Port or address changed: the keeper registers the new
            // definition.
            let _ = self.ctx.consul.deregister_service(&self.service_id()).await;
        }
        // Register once it answers its health check (briefly waited for);
        // the keeper retries while Consul is not up yet.
        let deadline = std::time::Instant::now() + self.ctx.start_wait;
        while std::time::Instant::now() < deadline && !self.healthy(spec.port).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let registered = self.keep_registered().await.is_ok();
        Ok(format!(
            "todomvc {ensured:?} on {}:{}{}",
            self.ctx.address,
            spec.port,
            if registered {
                ", registered in consul"
            } else {
                ", consul registration pending"
            }
        )
        .to_lowercase())
    }

    /// Whether the webapp answers its health check right now.
    async fn healthy(&self, port: u16) -> bool {
        let url = format!("http://{}:{port}/healthz", self.ctx.address);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build();
        match client {
            Ok(c) => c
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            Err(_) => false,
        }
    }

    /// Registers the service unless the local agent already has it.
    async fn keep_registered(&self) -> Result<(), DriverError> {
        let Some((port, address)) = *self.registered.lock().expect("lock") else {
            return Ok(());
        };
        if self
            .ctx
            .consul
            .local_service_tags(&self.service_id())
            .await?
            .is_none()
        {
            self.ctx
                .consul
                .register_service(&registration(
                    &self.ctx.node,
                    address,
                    port,
                    self.healthy(port).await,
                ))
                .await?;
            tracing::info!(id = %self.service_id(), "registered in consul");
        }
        Ok(())
    }

    /// Runs forever: keeps the registration in place, retrying quickly
    /// while Consul is not answering (a new node's webapp is not routed to
    /// before it is registered).
    pub async fn keeper(self: Arc<Self>) {
        loop {
            let pause = match self.keep_registered().await {
                Ok(()) => Duration::from_secs(2),
                Err(e) => {
                    tracing::debug!(error = %e, "webapp registration pending");
                    Duration::from_millis(200)
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Deregisters and stops the webapp (drain).
    pub async fn stop(&self) -> Result<(), DriverError> {
        self.registered.lock().expect("lock").take();
        if let Err(e) = self.ctx.consul.deregister_service(&self.service_id()).await {
            tracing::warn!(error = %e, "deregistering todomvc");
        }
        self.ctx.host.stop(SERVICE).await?;
        Ok(())
    }

    /// Only deregisters (first step of a drain, before anything stops).
    pub async fn deregister(&self) {
        self.registered.lock().expect("lock").take();
        let _ = self.ctx.consul.deregister_service(&self.service_id()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_webapp_is_registered_and_checked_at_its_ipv6_address() {
        let v6: IpAddr = "fd12::c0a8:b15".parse().expect("v6");
        let r = registration("nginx1", v6, 8080, true);
        assert_eq!(r["Address"], "fd12::c0a8:b15");
        assert_eq!(r["Check"]["HTTP"], "http://[fd12::c0a8:b15]:8080/healthz");
        let v4: IpAddr = "127.0.11.21".parse().expect("v4");
        let r = registration("nginx1", v4, 8080, false);
        assert_eq!(r["Check"]["HTTP"], "http://127.0.11.21:8080/healthz");
        assert_eq!(r["Check"]["Status"], "critical");
    }
}
