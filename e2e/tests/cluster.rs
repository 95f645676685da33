//! The seed cluster for real: `corral up` brings up adm1, nginx1, nginx2,
//! pg1 and pg2 with real Consul, nginx, PostgreSQL and todomvc processes, and
//! the tests use it the way an operator would: through the load balancers,
//! the REST API and by killing processes.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use corral_e2e::{Cluster, eventually, run};
use corral_proto::Role;
use reqwest::Method;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// A process group stopped with SIGSTOP, continued when dropped, whatever
/// the test did meanwhile.
struct HungGroup(nix::unistd::Pid);

impl HungGroup {
    fn stop(leader: u32) -> HungGroup {
        let pgid = corral_server::provider::reaper::pid(leader);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGSTOP);
        HungGroup(pgid)
    }
}

impl Drop for HungGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

async fn post_todo(c: &Cluster, lb: &str, title: &str) -> anyhow::Result<Value> {
    let res = c
        .http
        .post(c.lb(lb, "/todos"))
        .json(&json!({ "title": title }))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("POST /todos via {lb}: {}", res.status());
    }
    Ok(res.json().await?)
}

async fn titles_via(c: &Cluster, lb: &str) -> anyhow::Result<Vec<String>> {
    let res = c.http.get(c.lb(lb, "/todos")).send().await?;
    if !res.status().is_success() {
        bail!("GET /todos via {lb}: {}", res.status());
    }
    let todos: Vec<Value> = res.json().await?;
    Ok(todos
        .iter()
        .filter_map(|t| t["title"].as_str().map(String::from))
        .collect())
}

/// Who served a GET through `lb` (the `X-Served-By` header).
async fn served_by(c: &Cluster, lb: &str, path: &str) -> anyhow::Result<String> {
    let res = c.http.get(c.lb(lb, path)).send().await?;
    if !res.status().is_success() {
        bail!("GET {path} via {lb}: {}", res.status());
    }
    Ok(res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// The titles stored in a database node, read with psql as the app's user.
async fn titles_in_db(c: &Cluster, node: &str) -> anyhow::Result<Vec<String>> {
    let password = std::fs::read_to_string(c.state_dir().join("db-password"))?;
    let out = run(Command::new("/usr/lib/postgresql/15/bin/psql")
        .arg(format!(
            "host={} port=5432 user=todomvc dbname=todomvc connect_timeout=3",
            c.address(node)
        ))
        .env("PGPASSWORD", password.trim())
        .args(["-Atc", "SELECT title FROM todos ORDER BY id"]))
    .await?;
    if !out.exit.success() {
        bail!("psql on {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

fn pid_of(c: &Cluster, node: &str, service: &str) -> Option<u32> {
    let text = std::fs::read_to_string(
        c.state_dir()
            .join("nodes")
            .join(node)
            .join("run")
            .join(format!("{service}.pid")),
    )
    .ok()?;
    text.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_cluster_serves_replicates_routes_around_failures_and_scales_out() {
    let mut c = Cluster::up(21, 2, 2).await.expect("corral up");
    let outcome = async {
        // The five seed nodes, each with its seed address.
        let mut nodes: Vec<(String, String)> = c
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.name, n.address))
            .collect();
        nodes.sort();
        let want: Vec<(String, String)> = ["adm1", "nginx1", "nginx2", "pg1", "pg2"]
            .iter()
            .map(|n| (n.to_string(), c.address(n)))
            .collect();
        assert_eq!(nodes, want);

        // A todo written through nginx1 is read through nginx2 and is on pg2.
        post_todo(&c, "nginx1", "buy milk").await?;
        let titles = titles_via(&c, "nginx2").await?;
        assert!(titles.contains(&"buy milk".to_string()), "{titles:?}");
        let cr = &c;
        eventually("the todo to replicate to pg2", LONG, || async move {
            Ok(titles_in_db(cr, "pg2")
                .await?
                .contains(&"buy milk".to_string())
                .then_some(()))
        })
        .await?;

        // Both webapps serve behind each load balancer.
        for lb in ["nginx1", "nginx2"] {
            let seen = &std::cell::RefCell::new(std::collections::BTreeSet::new());
            eventually(&format!("both webapps behind {lb}"), LONG, || async move {
                let who = served_by(cr, lb, "/todos").await?;
                let mut seen = seen.borrow_mut();
                seen.insert(who);
                Ok((seen.len() >= 2).then_some(()))
            })
            .await?;
        }

        // The DNS load balancer: Consul's DNS on adm1 answers with the
        // nginx nodes that pass their check. nginx2 hung whole (its process
        // group stopped) drops out within seconds and is back once it runs.
        let dns: std::net::SocketAddr = format!("{}:8600", c.address("adm1")).parse()?;
        let lbs_in_dns = || async move {
            let mut got: Vec<String> = corral_e2e::dns::a_records(dns, "nginx.service.consul")
                .await?
                .iter()
                .map(ToString::to_string)
                .collect();
            got.sort();
            anyhow::Ok(got)
        };
        let both = vec![c.address("nginx1"), c.address("nginx2")];
        eventually("both load balancers in adm1's DNS", LONG, || async {
            Ok((lbs_in_dns().await? == both).then_some(()))
        })
        .await?;
        let hung = HungGroup::stop(corral_e2e::faults::service_pid(&c, "nginx2", "nginx")?);
        eventually("a hung nginx2 out of adm1's DNS", LONG, || async {
            Ok((lbs_in_dns().await? == [c.address("nginx1")]).then_some(()))
        })
        .await?;
        drop(hung);
        eventually("nginx2 back in adm1's DNS", LONG, || async {
            Ok((lbs_in_dns().await? == both).then_some(()))
        })
        .await?;

        // nginx1's webapp dies: requests through nginx1 keep succeeding,
        // served by nginx2's webapp, until the agent has restarted it.
        let victim = pid_of(&c, "nginx1", "todomvc").context("todomvc pid on nginx1")?;
        nix::sys::signal::kill(
            corral_server::provider::reaper::pid(victim),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let by_nginx2 = &std::cell::Cell::new(0);
        let failures = &std::cell::RefCell::new(Vec::new());
        eventually(
            "nginx1's webapp to be restarted and serving",
            LONG,
            || async move {
                let who = match served_by(cr, "nginx1", "/todos").await {
                    Ok(who) => who,
                    Err(e) => {
                        failures.borrow_mut().push(format!("{e:#}"));
                        return Ok(None);
                    }
                };
                if who == "nginx2" {
                    by_nginx2.set(by_nginx2.get() + 1);
                }
                let restarted = pid_of(cr, "nginx1", "todomvc").is_some_and(|p| p != victim);
                Ok((restarted && who == "nginx1").then_some(()))
            },
        )
        .await?;
        assert!(
            failures.borrow().is_empty(),
            "requests through nginx1 failed while its webapp was down: {:?}",
            failures.borrow()
        );
        let by_nginx2 = by_nginx2.get();
        assert!(by_nginx2 > 0, "no request went to nginx2's webapp");

        // Add a webserver: both load balancers route to it.
        let res = c
            .api(Method::POST, "/nodes")
            .await
            .json(&json!({"role": "web"}))
            .send()
            .await?;
        assert_eq!(res.status(), 201, "{}", res.text().await?);
        let node: corral_proto::Node = res.json().await?;
        assert_eq!(node.name, "nginx3");
        assert_eq!(node.role, Role::Web);
        for lb in ["nginx1", "nginx2", "nginx3"] {
            eventually(&format!("{lb} to route to nginx3"), LONG, || async move {
                Ok(
                    (served_by(cr, lb, "/todos").await.unwrap_or_default() == "nginx3")
                        .then_some(()),
                )
            })
            .await?;
        }

        // Remove it: it drains, leaves the upstreams and its processes stop.
        let res = c.api(Method::DELETE, "/nodes/nginx3").await.send().await?;
        assert!(res.status().is_success(), "{}", res.status());
        eventually("nginx3 to be gone", LONG, || async move {
            let gone = !cr.nodes().await?.iter().any(|n| n.name == "nginx3");
            let dir_gone = !cr.state_dir().join("nodes/nginx3").exists();
            Ok((gone && dir_gone).then_some(()))
        })
        .await?;
        let left = Cluster::pids_with(&c.state_dir().join("nodes/nginx3").to_string_lossy());
        assert!(
            left.is_empty(),
            "processes of nginx3 still run: {:?}",
            left.iter()
                .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " "))
                .collect::<Vec<_>>()
        );
        for _ in 0..20 {
            let who = served_by(&c, "nginx1", "/todos").await?;
            assert_ne!(who, "nginx3");
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", c.tail_logs());
    }
    c.stop().await.expect("corral up stops the cluster");
    assert!(c.processes().is_empty(), "processes left after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_agent_and_control_plane_loss_and_up_after_down_keeps_todos() {
    let mut c = Cluster::up(22, 2, 2).await.expect("corral up");
    let outcome = async {
        post_todo(&c, "nginx1", "write the report").await?;

        // An order is filed and nginx2's agent is killed at once: the
        // restarted agent resumes and applies it, without duplicates.
        let agent = pid_of(&c, "nginx2", "agent").context("agent pid")?;
        let topology: Value = c
            .api(Method::GET, "/topology")
            .await
            .send()
            .await?
            .json()
            .await?;
        let mut spec = json!({
            "web": topology["web"], "db": topology["db"],
            "lb_policy": "least_conn", "replication": topology["replication"],
        });
        let res = c
            .api(Method::PUT, "/topology")
            .await
            .json(&spec)
            .send()
            .await?;
        assert_eq!(res.status(), 200, "{}", res.text().await?);
        nix::sys::signal::kill(
            corral_server::provider::reaper::pid(agent),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let cr = &c;
        eventually(
            "nginx2 to apply the new policy after its agent restarted",
            LONG,
            || async move {
                let node = cr.nodes().await?.into_iter().find(|n| n.name == "nginx2");
                let Some(node) = node else {
                    bail!("nginx2 gone")
                };
                let applied = node
                    .observed
                    .as_ref()
                    .is_some_and(|o| o.applied_seq == node.last_seq);
                let restarted = pid_of(cr, "nginx2", "agent").is_some_and(|p| p != agent);
                Ok((applied && restarted).then_some(()))
            },
        )
        .await?;
        let orders: Vec<corral_proto::Order> = c
            .api(Method::GET, "/nodes/nginx2/orders")
            .await
            .send()
            .await?
            .json()
            .await?;
        for o in &orders {
            assert_eq!(o.status, corral_proto::OrderStatus::Applied, "{o:?}");
        }
        let conf =
            std::fs::read_to_string(c.state_dir().join("nodes/nginx2/nginx/conf/nginx.conf"))
                .unwrap_or_default();
        assert!(
            conf.contains("least_conn"),
            "nginx2 config lacks least_conn"
        );
        // One of each service: adoption, not duplicates.
        let node_dir = c.state_dir().join("nodes/nginx2");
        let needles = [
            ("consul", format!("{}/consul/", node_dir.display())),
            ("todomvc", format!("{}:8080", c.address("nginx2"))),
            (
                "nginx",
                format!("master process nginx -p {}/", node_dir.display()),
            ),
        ];
        for (service, needle) in needles {
            let running = Cluster::pids_with(&needle);
            assert_eq!(
                running.len(),
                1,
                "{service} processes on nginx2: {running:?}"
            );
        }
        spec["lb_policy"] = json!("round_robin");
        c.api(Method::PUT, "/topology")
            .await
            .json(&spec)
            .send()
            .await?;

        // The control plane dies: both load balancers keep serving, reads
        // and writes.
        c.kill_control_plane().await?;
        for lb in ["nginx1", "nginx2"] {
            for i in 0..10 {
                let titles = titles_via(&c, lb).await?;
                assert!(titles.contains(&"write the report".to_string()));
                if i == 0 {
                    post_todo(&c, lb, &format!("written via {lb} without a control plane")).await?;
                }
            }
        }
        // It comes back and adopts the running agents.
        c.start().await?;
        let log = std::fs::read_to_string(c.up_log())?;
        assert!(log.contains("adopted"), "no agent was adopted:\n{log}");

        // down, then up: the todos are still there.
        c.stop().await?;
        assert!(c.processes().is_empty(), "processes left after down");
        c.start().await?;
        let cr = &c;
        let titles = eventually("the todos after up", LONG, || async move {
            Ok(titles_via(cr, "nginx2").await.ok())
        })
        .await?;
        assert!(
            titles.contains(&"write the report".to_string()),
            "{titles:?}"
        );
        assert!(titles.contains(&"written via nginx1 without a control plane".to_string()));
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        panic!("{e:#}\n{}", c.tail_logs());
    }
    c.stop().await.expect("corral up stops the cluster");
}
