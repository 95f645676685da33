//! PostgreSQL high availability with real processes and injected faults: a
//! cluster in `sync` mode takes writes through nginx and the webapp the
//! whole time, while the primary's postgres is killed, its Consul agent is
//! frozen (it must fence itself), the whole primary node is frozen and
//! thawed (it must rejoin as a standby, rewound), the whole primary node
//! crashes and its agent is restarted, a switchover goes there and back, and
//! a standby is added. After each: exactly one server accepts
//! writes, and every write a client saw acknowledged is there.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use corral_e2e::pg::{commits_wait, db_nodes, kill_postgres, sole_primary, sql, streams_from};
use corral_e2e::{Cluster, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::Method;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

/// Every process of a node: those naming its directory and their children
/// (postgres backends rename themselves).
fn node_processes(c: &Cluster, node: &str) -> Vec<u32> {
    let dir = c.state_dir().join("nodes").join(node);
    // Paths under the node's directory, or the directory itself as an
    // argument (the agent's --state-dir; arguments end in NUL).
    let mut pids = Cluster::pids_with(&format!("{}/", dir.display()));
    for pid in Cluster::pids_with(&format!("{}\0", dir.display())) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    let children = corral_e2e::children_of(&pids);
    pids.extend(children);
    for service in ["agent", "consul", "postgres"] {
        let pid: u32 = std::fs::read_to_string(dir.join("run").join(format!("{service}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("{node} has no {service} pid file"));
        assert!(
            pids.contains(&pid),
            "{node}'s {service} ({pid}) not found among {pids:?}"
        );
    }
    pids
}

fn signal_all(pids: &[u32], signal: Signal) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid as i32), signal);
    }
}

/// Thaws what a test froze, also when it fails.
struct Frozen(Vec<u32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_all(&self.0, Signal::SIGCONT);
    }
}

/// Writes todos through a load balancer all along, remembering each one
/// the webapp acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(c: &Cluster, lb: &str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let url = c.lb(lb, "/todos");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let n = Arc::new(AtomicU64::new(0));
        let task = {
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let title = format!("ha-{}", n.fetch_add(1, Ordering::Relaxed));
                    let ok = http
                        .post(&url)
                        .json(&json!({ "title": title }))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        acked.lock().expect("lock").push(title);
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        Writer { acked, stop, task }
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits until `more` further writes are acknowledged.
    async fn progresses(&self, what: &str, more: usize) -> anyhow::Result<()> {
        let target = self.count() + more;
        eventually(what, LONG, || async {
            Ok((self.count() >= target).then_some(()))
        })
        .await
    }

    fn acked(&self) -> Vec<String> {
        self.acked.lock().expect("lock").clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// Every acknowledged write is on `node`.
async fn none_lost(c: &Cluster, node: &str, acked: &[String]) -> anyhow::Result<()> {
    let stored: BTreeSet<String> = sql(c, node, "SELECT title FROM todos")
        .await?
        .lines()
        .map(String::from)
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|t| !stored.contains(*t)).collect();
    if !missing.is_empty() {
        bail!(
            "{} of {} acknowledged writes are missing on {node}, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
    Ok(())
}

/// After a fault: one primary, writes flow again, nothing acknowledged is
/// lost, and every other db node streams from the primary with all of it.
async fn settled(c: &Cluster, w: &Writer, what: &str) -> anyhow::Result<String> {
    w.progresses(&format!("writes to resume after {what}"), 20)
        .await?;
    let primary = eventually(&format!("one primary after {what}"), LONG, || async {
        Ok(Some(sole_primary(c).await?))
    })
    .await?;
    none_lost(c, &primary, &w.acked()).await?;
    for node in db_nodes(c).into_iter().filter(|n| *n != primary) {
        eventually(
            &format!("{node} to stream from {primary} after {what}"),
            LONG,
            || async { Ok(streams_from(c, &node, &primary).await?.then_some(())) },
        )
        .await?;
        let acked = w.acked();
        eventually(
            &format!("{node} to have every acknowledged write"),
            LONG,
            || async { Ok(none_lost(c, &node, &acked).await.ok()) },
        )
        .await?;
    }
    // Commits wait for a standby again (sync mode's fallback is over), so
    // the next fault finds the cluster in its steady state.
    eventually(
        &format!("commits on {primary} to wait for a standby"),
        LONG,
        || async { Ok(commits_wait(c, &primary).await?.then_some(())) },
    )
    .await?;
    // Still exactly one.
    assert_eq!(sole_primary(c).await?, primary, "{what}: the primary moved");
    eprintln!(
        "{what}: {primary} is primary, {} writes acknowledged, none lost",
        w.count()
    );
    Ok(primary)
}

fn other(c: &Cluster, node: &str) -> String {
    db_nodes(c)
        .into_iter()
        .find(|n| n != node)
        .expect("a second db node")
}

/// While `frozen` stays frozen, `standby` takes over and takes writes; once
/// thawed, the old primary rejoins as its standby with nothing lost.
async fn takes_over_then_rejoins(
    c: &Cluster,
    w: &Writer,
    standby: &str,
    frozen: Frozen,
    what: &str,
) -> anyhow::Result<()> {
    eventually(
        &format!("{standby} to take over ({what})"),
        LONG,
        || async {
            Ok((sql(c, standby, "SELECT pg_is_in_recovery()").await? == "f").then_some(()))
        },
    )
    .await?;
    w.progresses(&format!("writes on {standby}"), 20).await?;
    drop(frozen);
    let primary = settled(c, w, what).await?;
    if primary != standby {
        bail!("{what}: {primary} is primary, not {standby}");
    }
    Ok(())
}

/// Asks for a switchover and follows its order to the end. While the
/// control plane's view (heartbeats, every few seconds) or the primary's own
/// does not yet show `to` as a caught-up standby, the request or the order
/// is refused, and it is asked again, as an operator would.
async fn switchover(c: &Cluster, to: &str) -> anyhow::Result<()> {
    eventually(&format!("a switchover to {to}"), LONG, || async {
        let res = c
            .api(Method::POST, "/db/switchover")
            .await
            .json(&json!({ "to": to }))
            .send()
            .await?;
        let status = res.status();
        let body = res.text().await?;
        match status.as_u16() {
            202 => {}
            409 => bail!("409 {body}"),
            _ => panic!("switchover to {to}: {status} {body}"),
        }
        let accepted: serde_json::Value = serde_json::from_str(&body)?;
        let from = accepted["from"].as_str().unwrap_or_default().to_string();
        let seq = accepted["seq"].as_i64().unwrap_or_default();
        let result = eventually("the switchover order's result", LONG, || async {
            let orders: Vec<serde_json::Value> = c
                .api(Method::GET, &format!("/nodes/{from}/orders"))
                .await
                .send()
                .await?
                .json()
                .await?;
            Ok(orders
                .into_iter()
                .find(|o| o["seq"] == seq)
                .filter(|o| o["status"] == "applied" || o["status"] == "failed"))
        })
        .await?;
        eprintln!(
            "switchover {from} -> {to}: {} {}",
            result["status"], result["result"]
        );
        Ok((result["status"] == "applied").then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failures_fail_over_fence_rejoin_and_lose_no_acknowledged_write() {
    let c = Cluster::up(23, 1, 2).await.expect("cluster up");
    let res = c
        .api(Method::PUT, "/topology")
        .await
        .json(&json!({"web": 1, "db": 2, "lb_policy": "round_robin", "replication": "sync"}))
        .send()
        .await
        .expect("PUT topology");
    assert!(res.status().is_success(), "{}", res.status());
    eventually("sync mode on the primary", LONG, || async {
        let p = sole_primary(&c).await?;
        let names = sql(&c, &p, "SHOW synchronous_standby_names").await?;
        Ok((!names.is_empty()).then_some(p))
    })
    .await
    .expect("sync mode");
    let w = Writer::start(&c, "nginx1");
    let primary = settled(&c, &w, "start").await.expect("start");

    // 1. kill -9 of the primary's postgres.
    kill_postgres(&c, &primary).expect("kill postgres");
    let primary = settled(&c, &w, "kill -9 of the primary's postgres")
        .await
        .expect("after kill -9");

    // 2. The primary's Consul agent frozen: it must stop taking writes by
    // itself, a standby takes over; thawed, it rejoins.
    let consul = std::fs::read_to_string(
        c.state_dir()
            .join("nodes")
            .join(&primary)
            .join("run/consul.pid"),
    )
    .expect("consul pid");
    let frozen = Frozen(vec![consul.trim().parse().expect("pid")]);
    signal_all(&frozen.0, Signal::SIGSTOP);
    let standby = other(&c, &primary);
    eventually("the cut-off primary to fence itself", LONG, || async {
        Ok(sql(&c, &primary, "SELECT pg_is_in_recovery()")
            .await
            .map_or(Some(()), |r| (r == "t").then_some(())))
    })
    .await
    .expect("fenced");
    takes_over_then_rejoins(
        &c,
        &w,
        &standby,
        frozen,
        "the primary's consul frozen and thawed",
    )
    .await
    .expect("after consul freeze");
    let primary = standby;

    // 3. The whole primary node frozen (agent, consul, postgres), then
    // thawed: a failover, then the old primary rewinds and rejoins.
    let frozen = Frozen(node_processes(&c, &primary));
    assert!(
        frozen.0.len() >= 3,
        "agent, consul, postgres: {:?}",
        frozen.0
    );
    signal_all(&frozen.0, Signal::SIGSTOP);
    let standby = other(&c, &primary);
    takes_over_then_rejoins(
        &c,
        &w,
        &standby,
        frozen,
        "the primary node frozen and thawed",
    )
    .await
    .expect("after node freeze");
    let primary = standby;

    // 4. The whole primary node crashes (agent, consul, every postgres
    // process killed). The provider restarts its agent, which brings consul
    // back and the crashed data dir up as a standby; whichever node then
    // wins the election (the standby, or the old primary when it is back
    // first with as much WAL), one primary takes writes and nothing
    // acknowledged is lost.
    let crashed = node_processes(&c, &primary);
    assert!(crashed.len() >= 3, "agent, consul, postgres: {crashed:?}");
    signal_all(&crashed, Signal::SIGSTOP);
    signal_all(&crashed, Signal::SIGKILL);
    let primary = settled(&c, &w, "the primary node crashed and restarted")
        .await
        .expect("after node crash");

    // 5. Switchover and back.
    let first = primary.clone();
    for (to, what) in [
        (other(&c, &first), "switchover"),
        (first.clone(), "switchover back"),
    ] {
        switchover(&c, &to).await.expect(what);
        eventually(
            &format!("{to} to be primary after the {what}"),
            LONG,
            || async { Ok((sole_primary(&c).await? == to).then_some(())) },
        )
        .await
        .expect(what);
        let now = settled(&c, &w, what).await.expect(what);
        assert_eq!(now, to, "{what}");
    }
    let primary = first;

    // 6. A standby added during writes.
    let res = c
        .api(Method::POST, "/nodes")
        .await
        .json(&json!({"role": "db"}))
        .send()
        .await
        .expect("POST /nodes");
    assert!(res.status().is_success(), "{}", res.status());
    eventually("pg3 to stream", LONG, || async {
        Ok(streams_from(&c, "pg3", &primary)
            .await
            .unwrap_or(false)
            .then_some(()))
    })
    .await
    .expect("pg3 streams");
    settled(&c, &w, "a standby added").await.expect("after add");
    let slots = sql(
        &c,
        &primary,
        "SELECT string_agg(slot_name, ',') FROM pg_replication_slots",
    )
    .await
    .expect("slots");
    assert!(slots.split(',').any(|s| s == "pg3"), "slots: {slots}");
    drop(w);
}
