//! nginx in front of the passing instances of a service. Its prefix lives in
//! `<state>/nginx/`; the upstream set follows Consul through a blocking-query
//! watch on the local agent, and the config is re-rendered, checked with
//! `nginx -t` and reloaded (SIGHUP) only when the set or the order changes,
//! so a bad render never replaces a good config.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::{LbPolicy, LoadBalancerSpec, NGINX_SERVICE, ports};
use nix::sys::signal::Signal;
use tokio::sync::Notify;

use super::{DriverError, NodeContext, mkdir, write_if_changed};
use crate::host::{Account, Ensured, OneShot, ServiceSpec};

pub const SERVICE: &str = "nginx";

/// One backend of the upstream block.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Upstream {
    pub address: IpAddr,
    pub port: u16,
}

/// What the config is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Render<'a> {
    pub prefix: &'a Path,
    /// Where the public server listens: the node's address and port, and
    /// on a dual-stack node its IPv6 address too.
    pub listen: Vec<SocketAddr>,
    pub service: &'a str,
    pub policy: LbPolicy,
    pub upstreams: &'a [Upstream],
    /// Worker account when the master runs as root.
    pub user: Option<&'a str>,
    /// The node address: where `stub_status` answers (port
    /// [`ports::NGINX_STATUS`], to the node itself only) and nginx logs
    /// each 5xx it answers (`logs/5xx.log`, two bytes each), for the
    /// metrics sampler. None renders neither.
    pub status: Option<IpAddr>,
}

/// The whole nginx.conf.
pub fn render(r: &Render<'_>) -> String {
    let prefix = r.prefix.display();
    let mut out = String::new();
    out.push_str("# Written by corral-agent; re-rendered when the upstream set changes.\n");
    // The order shows in the file even while no backend passes, so a new
    // order is always a new, validated config.
    out.push_str(&format!("# service {}, policy {:?}\n", r.service, r.policy));
    // A graceful stop waits for requests in flight, but not for ever.
    out.push_str("daemon off;\nworker_processes 1;\nworker_shutdown_timeout 10s;\n");
    if let Some(user) = r.user {
        out.push_str(&format!("user {user};\n"));
    }
    out.push_str(&format!(
        "pid {prefix}/run/nginx.pid;\nerror_log stderr warn;\n"
    ));
    out.push_str("events { worker_connections 1024; }\n\nhttp {\n");
    match r.status {
        // stub_status counts requests but not their statuses: a log of
        // 5xx only, two bytes each, is the cheapest count nginx can keep.
        Some(_) => out.push_str(&format!(
            "    map $status $corral_5xx {{ ~^5 1; default 0; }}\n    \
             log_format corral_5xx '5';\n    \
             access_log {prefix}/logs/5xx.log corral_5xx if=$corral_5xx;\n"
        )),
        None => out.push_str("    access_log off;\n"),
    }
    out.push_str("    server_tokens off;\n");
    // A client connection is kept for many more requests than nginx's
    // default 1000 (a load generator or a busy page would otherwise
    // reconnect every thousand requests).
    out.push_str("    keepalive_requests 100000;\n");
    for (directive, dir) in [
        ("client_body_temp_path", "client_body"),
        ("proxy_temp_path", "proxy"),
        ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"),
        ("scgi_temp_path", "scgi"),
    ] {
        out.push_str(&format!("    {directive} {prefix}/tmp/{dir};\n"));
    }
    if let Some(address) = r.status {
        // On the node address, answering the node itself: loopback
        // connections to it come from 127.0.0.1, others from the address.
        out.push_str(&format!(
            "\n    server {{\n        listen {};\n        access_log off;\n        \
             allow {address};\n        allow 127.0.0.1;\n        deny all;\n        \
             location = /nginx_status {{ stub_status; }}\n        \
             location / {{ return 404; }}\n    }}\n",
            SocketAddr::new(address, ports::NGINX_STATUS)
        ));
    }
    let listen = r
        .listen
        .iter()
        .map(|at| format!("listen {at};"))
        .collect::<Vec<_>>()
        .join("\n        ");
    let name: String = r
        .service
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if r.upstreams.is_empty() {
        out.push_str(&format!(
            "\n    server {{\n        {listen}\n        default_type application/json;\n        \
             location / {{\n            return 503 '{{\"error\":\"no_backend\",\"message\":\"no passing {svc} instance\"}}\\n';\n        }}\n    }}\n",
            svc = name,
        ));
    } else {
        out.push_str(&format!("\n    upstream {name} {{\n"));
        match r.policy {
            LbPolicy::RoundRobin => {}
            LbPolicy::LeastConn => out.push_str("        least_conn;\n"),
            LbPolicy::UriHash => out.push_str("        hash $request_uri consistent;\n"),
        }
        for u in r.upstreams {
            out.push_str(&format!(
                "        server {} max_fails=1 fail_timeout=5s;\n",
                SocketAddr::new(u.address, u.port)
            ));
        }
        // Idle keep-alive connections to the webapps, per worker: enough for
        // a burst of concurrent requests to reuse them instead of opening a
        // TCP connection each (which costs both sides more than the request),
        // and kept for many requests.
        out.push_str("        keepalive 64;\n        keepalive_requests 100000;\n    }\n");
        // Response buffers of 16k, not nginx's one page: a whole list of
        // 100 todos (about 10 KB with headers) then arrives in one read into
        // one buffer and leaves in one write, instead of three or four
        // 4k reads chained into a writev. Measured on the 2-core machine
        // (same run, alternating, 4 rounds): nginx CPU per proxied
        // GET /todos 20.7-23.4 us against 23.1-27.5 us, throughput +2-10 %.
        // Buffers are taken per request as needed, so idle connections
        // cost nothing more.
        out.push_str(&format!(
            "\n    server {{\n        {listen}\n        location / {{\n            \
             proxy_pass http://{name};\n            proxy_http_version 1.1;\n            \
             proxy_buffer_size 16k;\n            proxy_buffers 8 16k;\n            \
             proxy_set_header Connection \"\";\n            proxy_set_header Host $http_host;\n            \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            \
             proxy_set_header X-Forwarded-Proto $scheme;\n            \
             proxy_connect_timeout 2s;\n            \
             proxy_next_upstream error timeout http_502 http_503 http_504;\n        }}\n        \
             # The webapps' own figures are for their node's agent, not the public.\n        \
             location = /metrics {{ return 404; }}\n    }}\n",
        ));
    }
    out.push_str("}\n");
    out
}

struct Current {
    spec: Option<LoadBalancerSpec>,
    upstreams: Vec<Upstream>,
}

pub struct NginxDriver {
    ctx: Arc<NodeContext>,
    current: Mutex<Current>,
    /// Serialises renders (order application and the watch).
    render_lock: tokio::sync::Mutex<()>,
    /// Wakes the watch when an order arrives.
    wake: Notify,
}

impl NginxDriver {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self {
            ctx,
            current: Mutex::new(Current {
                spec: None,
                upstreams: Vec::new(),
            }),
            render_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        }
    }

    fn prefix(&self) -> PathBuf {
        self.ctx.path("nginx")
    }

    fn conf(&self) -> PathBuf {
        self.prefix().join("conf/nginx.conf")
    }

    fn worker() -> Option<Account> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        Account::lookup("www-data").or_else(|| Account::lookup("nobody"))
    }

    fn service_spec(&self) -> ServiceSpec {
        let prefix = format!("{}/", self.prefix().display());
        ServiceSpec {
            name: SERVICE.into(),
            program: self.ctx.bins.nginx.clone(),
            args: vec![
                "-p".into(),
                prefix.clone(),
                "-c".into(),
                self.conf().display().to_string(),
            ],
            env: Vec::new(),
            run_as: None,
            marker: prefix,
            // Graceful: finish requests in flight.
            stop_signal: Signal::SIGQUIT,
            restart: true,
        }
    }

    fn prepare_dirs(&self, worker: Option<&Account>) -> Result<(), DriverError> {
        let prefix = self.prefix();
        for dir in ["conf", "run", "logs"] {
            mkdir(&prefix.join(dir))?;
        }
        for dir in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let path = prefix.join("tmp").join(dir);
            mkdir(&path)?;
            if let Some(w) = worker {
                nix::unistd::chown(
                    &path,
                    Some(nix::unistd::Uid::from_raw(w.uid)),
                    Some(nix::unistd::Gid::from_raw(w.gid)),
                )
                .map_err(|e| DriverError::Refused(format!("chown {}: {e}", path.display())))?;
            }
        }
        Ok(())
    }

    /// Renders, validates and installs the config; reloads a running nginx
    /// when it changed. Returns what happened, for the order result.
    async fn install(&self) -> Result<String, DriverError> {
        let _guard = self.render_lock.lock().await;
        let (spec, upstreams) = {
            let c = self.current.lock().expect("lock");
            match &c.spec {
                Some(s) => (s.clone(), c.upstreams.clone()),
                None => return Ok("no load balancer ordered".into()),
            }
        };
        let worker = Self::worker();
        self.prepare_dirs(worker.as_ref())?;
        let port = self.ctx.nginx_port.unwrap_or(spec.port);
        let prefix = self.prefix();
        let text = render(&Render {
            prefix: &prefix,
            listen: std::iter::once(self.ctx.address)
                .chain(spec.address_v6.map(IpAddr::V6))
                .map(|address| SocketAddr::new(address, port))
                .collect(),
            service: &spec.service,
            policy: spec.policy,
            upstreams: &upstreams,
            user: worker.as_ref().map(|w| w.name.as_str()),
            status: Some(self.ctx.address),
        });
        let conf = self.conf();
        let unchanged = std::fs::read_to_string(&conf).is_ok_and(|c| c == text);
        if !unchanged {
            let candidate = prefix.join("conf/nginx.conf.new");
            write_if_changed(&candidate, &text, 0o644)?;
            let test = OneShot::new(
                &self.ctx.bins.nginx,
                &["-t", "-q", "-p", &format!("{}/", prefix.display()), "-c"],
            )
            .arg(candidate.display().to_string());
            self.ctx.host.run(&test).await?.check(&test)?;
            std::fs::rename(&candidate, &conf)
                .map_err(DriverError::io(format!("installing {}", conf.display())))?;
        }
        let ensured = self.ctx.host.ensure(&self.service_spec()).await?;
        if !unchanged && matches!(ensured, Ensured::Running | Ensured::Adopted) {
            self.wait_ready().await;
            self.ctx.host.signal(SERVICE, Signal::SIGHUP)?;
            tracing::info!(upstreams = upstreams.len(), "nginx reloaded");
        }
        self.register(port).await;
        Ok(format!(
            "nginx {ensured:?} on {}:{port}, policy {:?}, {} upstream(s)",
            self.ctx.address,
            spec.policy,
            upstreams.len()
        )
        .to_lowercase())
    }

    /// Waits (briefly) until a just-started nginx has written its pid file:
    /// it installs its signal handlers before that, and a SIGHUP that
    /// arrives earlier kills it instead of reloading it.
    async fn wait_ready(&self) {
        let Some(pid) = self
            .ctx
            .host
            .services()
            .into_iter()
            .find(|s| s.name == SERVICE)
            .and_then(|s| s.pid)
        else {
            return;
        };
        let pid_file = self.prefix().join("run/nginx.pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let written = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            if written == Some(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(pid, "nginx has not written its pid file; reloading anyway");
    }

    #[tracing::instrument(skip_all, fields(node = %self.ctx.node))]
    pub async fn apply(&self, spec: &LoadBalancerSpec) -> Result<String, DriverError> {
        // A first look at the set, so the first config is already useful;
        // the watch keeps it current after.
        let known = match self
            .ctx
            .consul
            .health(&spec.service, None, true, None, Duration::ZERO)
            .await
        {
            Ok((_, instances)) => Some(to_upstreams(&instances)),
            Err(_) => None,
        };
        {
            let mut c = self.current.lock().expect("lock");
            c.spec = Some(spec.clone());
            if let Some(set) = known {
                c.upstreams = set;
            }
        }
        let result = self.install().await;
        self.wake.notify_one();
        result
    }

    /// Runs forever: follows the passing instances of the ordered service.
    pub async fn watch(self: Arc<Self>) {
        let mut index: Option<u64> = None;
        let mut watched: Option<String> = None;
        let mut backoff = Duration::from_millis(500);
        loop {
            let service = self
                .current
                .lock()
                .expect("lock")
                .spec
                .as_ref()
                .map(|s| s.service.clone());
            let Some(service) = service else {
                self.wake.notified().await;
                continue;
            };
            if watched.as_deref() != Some(service.as_str()) {
                index = None;
                watched = Some(service.clone());
            }
            let query =
                self.ctx
                    .consul
                    .health(&service, None, true, index, Duration::from_secs(30));
            let result = tokio::select! {
                r = query => r,
                _ = self.wake.notified() => continue,
            };
            match result {
                Ok((new_index, instances)) => {
                    backoff = Duration::from_millis(500);
                    // An index going backwards means Consul restarted.
                    index = Some(if index.is_some_and(|i| new_index < i) {
                        0
                    } else {
                        new_index
                    });
                    let set = to_upstreams(&instances);
                    let changed = {
                        let mut c = self.current.lock().expect("lock");
                        let changed = c.upstreams != set;
                        c.upstreams = set;
                        changed
                    };
                    if changed {
                        match self.install().await {
                            Ok(what) => tracing::info!(%what, "upstream set changed"),
                            Err(e) => tracing::error!(error = %e, "re-rendering nginx failed"),
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "consul watch failed; retrying");
                    index = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Stops routing and nginx (drain).
    pub async fn stop(&self) -> Result<(), DriverError> {
        // Under the render lock: a re-render the watch started just before
        // would otherwise start nginx again after this stop.
        let _guard = self.render_lock.lock().await;
        self.current.lock().expect("lock").spec = None;
        // Out of the DNS answers first, then stopped.
        let _ = std::fs::remove_file(self.registration_file());
        if let Err(e) = self.ctx.consul.deregister_service(&self.service_id()).await {
            tracing::debug!(error = %e, "deregistering nginx from consul");
        }
        self.ctx.host.stop(SERVICE).await?;
        Ok(())
    }

    fn service_id(&self) -> String {
        format!("{NGINX_SERVICE}-{}", self.ctx.node)
    }

    fn registration_file(&self) -> PathBuf {
        self.ctx.path(super::consul::CONF_DIR).join("nginx.json")
    }

    /// nginx as Consul service `nginx`, checked through its public port:
    /// Consul's DNS answers `nginx.service.consul` with the load balancers
    /// that pass (an nginx that hangs, or has no webapp to send to, drops
    /// out). A service definition in `conf.d`, so a restarted Consul agent
    /// has it from its start; written with the node's token (0600). A
    /// Consul that cannot be told now reads it when it starts.
    async fn register(&self, port: u16) {
        let address = self.ctx.address.to_string();
        let mut service = serde_json::json!({
            "id": self.service_id(),
            "name": NGINX_SERVICE,
            "address": address,
            "port": port,
            "tags": [self.ctx.node],
            "check": {
                "id": format!("service:{}", self.service_id()),
                "name": "nginx answers /healthz through to a webapp",
                "http": format!("http://{address}:{port}/healthz"),
                "interval": "1s",
                "timeout": "1s",
                "deregister_critical_service_after": "30m",
            },
        });
        if let Some(token) = self.ctx.consul.token() {
            service["token"] = serde_json::json!(token);
        }
        let text = serde_json::json!({ "service": service }).to_string();
        match write_if_changed(&self.registration_file(), &text, 0o600) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.ctx.consul.reload().await {
                    tracing::warn!(error = %e, "consul not told of nginx yet: it reads conf.d when it starts");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot write nginx's consul service definition"),
        }
    }
}

fn to_upstreams(instances: &[crate::consul_api::Instance]) -> Vec<Upstream> {
    let mut set: Vec<Upstream> = instances
        .iter()
        .map(|i| Upstream {
            address: i.address,
            port: i.port,
        })
        .collect();
    set.sort();
    set.dedup();
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Vec<Upstream> {
        vec![
            Upstream {
                address: [127, 0, 11, 21].into(),
                port: 8080,
            },
            Upstream {
                address: [127, 0, 11, 22].into(),
                port: 8080,
            },
        ]
    }

    fn conf(policy: LbPolicy, ups: &[Upstream]) -> String {
        render(&Render {
            prefix: Path::new("/s/nginx"),
            listen: vec!["127.0.11.21:80".parse().expect("addr")],
            service: "todomvc",
            policy,
            upstreams: ups,
            user: Some("www-data"),
            status: Some([127, 0, 11, 21].into()),
        })
    }

    #[test]
    fn stub_status_answers_the_node_itself_and_5xx_are_logged_alone() {
        let c = conf(LbPolicy::RoundRobin, &upstreams());
        assert!(c.contains("listen 127.0.11.21:8081;"), "{c}");
        assert!(c.contains("location = /metrics { return 404; }"), "{c}");
        assert!(c.contains("location = /nginx_status { stub_status; }"));
        assert!(c.contains("allow 127.0.11.21;") && c.contains("deny all;"));
        assert!(c.contains("access_log /s/nginx/logs/5xx.log corral_5xx if=$corral_5xx;"));
        assert!(!c.contains("access_log off;\n    server_tokens"));
        let plain = render(&Render {
            status: None,
            ..Render {
                prefix: Path::new("/s/nginx"),
                listen: vec!["127.0.11.21:80".parse().expect("addr")],
                service: "todomvc",
                policy: LbPolicy::RoundRobin,
                upstreams: &[],
                user: None,
                status: None,
            }
        });
        assert!(!plain.contains("stub_status") && plain.contains("access_log off;"));
    }

    #[test]
    fn a_dual_stack_node_listens_on_both_addresses() {
        let c = render(&Render {
            prefix: Path::new("/s/nginx"),
            listen: vec![
                "192.168.11.21:80".parse().expect("addr"),
                "[fd12:3456:789a::c0a8:b15]:80".parse().expect("addr"),
            ],
            service: "todomvc",
            policy: LbPolicy::RoundRobin,
            upstreams: &upstreams(),
            user: None,
            status: None,
        });
        assert!(
            c.contains("listen 192.168.11.21:80;\n        listen [fd12:3456:789a::c0a8:b15]:80;\n"),
            "{c}"
        );
    }

    #[test]
    fn ipv6_upstreams_are_bracketed() {
        let ups = [Upstream {
            address: "fd00::21".parse().unwrap(),
            port: 8080,
        }];
        assert!(conf(LbPolicy::RoundRobin, &ups).contains("server [fd00::21]:8080 max_fails"));
    }

    #[test]
    fn round_robin_is_nginx_default_balancing() {
        let c = conf(LbPolicy::RoundRobin, &upstreams());
        assert!(c.contains("upstream todomvc {"));
        assert!(c.contains("server 127.0.11.21:8080"));
        assert!(c.contains("server 127.0.11.22:8080"));
        assert!(!c.contains("least_conn"));
        assert!(!c.contains("hash "));
        assert!(c.contains("listen 127.0.11.21:80;"));
        assert!(c.contains("proxy_next_upstream error timeout http_502 http_503 http_504;"));
        assert!(c.contains("X-Forwarded-Proto $scheme"));
        assert!(c.contains("X-Forwarded-For $proxy_add_x_forwarded_for"));
        assert!(c.contains("user www-data;"));
        assert!(c.contains("daemon off;"));
    }

    #[test]
    fn least_conn_and_uri_hash_pick_their_directives() {
        assert!(conf(LbPolicy::LeastConn, &upstreams()).contains("least_conn;"));
        assert!(conf(LbPolicy::UriHash, &upstreams()).contains("hash $request_uri consistent;"));
    }

    #[test]
    fn temp_paths_live_in_the_prefix() {
        let c = conf(LbPolicy::RoundRobin, &upstreams());
        for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            assert!(c.contains(&format!("/s/nginx/tmp/{d};")), "{d}");
        }
        assert!(c.contains("pid /s/nginx/run/nginx.pid;"));
    }

    #[test]
    fn no_passing_instance_renders_a_json_503_not_an_empty_upstream() {
        let c = conf(LbPolicy::UriHash, &[]);
        assert!(!c.contains("upstream todomvc"));
        assert!(c.contains("return 503"));
        assert!(c.contains("application/json"));
    }
}
