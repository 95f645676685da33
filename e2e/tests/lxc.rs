//! The LXC provider end to end, on real containers: `corral up --provider
//! lxc` brings up the seed's cluster as containers on a bridge of the test's
//! own (adm1 is the host), each installing the project's .deb packages; a
//! web node is added and serves through both load balancers; then, in sync
//! mode with writers through both load balancers all along, the faults that
//! need real isolation: a web node cut off from its load balancers, the
//! primary partitioned from every other node, the primary frozen whole, a
//! partition between primary and standby only, and the control plane
//! stopped for a minute. After each: exactly one server takes writes and
//! every acknowledged write is on it.
//!
//! Skipped, with the reason printed, where LXC cannot run (not root, no lxc
//! tools, no packages from scripts/package.sh).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corral_e2e::faults::{Freeze, HostAddress, Partition};
use corral_e2e::pg::{sole_primary, sql};
use corral_e2e::writes::{LONG, Writer, other, settled};
use corral_e2e::{Cluster, eventually, lxc_unavailable};
use reqwest::Method;
use serde_json::json;

/// The subnet octet of this test's cluster: 192.168.<OCTET>.0/24.
const OCTET: u8 = 112;

fn skip() -> bool {
    match lxc_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: the LXC end-to-end test cannot run here: {why}");
            true
        }
        None => false,
    }
}

/// Whether a TCP connection from `from` (an address of this host) to `to`
/// opens within two seconds; a firewall's dropped SYN is a no.
async fn connects(from: &str, to: &str) -> bool {
    let (Ok(from), Ok(to)) = (from.parse::<std::net::IpAddr>(), to.parse()) else {
        return false;
    };
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
        return false;
    };
    if socket.bind(std::net::SocketAddr::new(from, 0)).is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(2), socket.connect(to)).await,
        Ok(Ok(_))
    )
}

/// Which webapp answered a request through `lb`, or the failure.
async fn served_by(http: &reqwest::Client, c: &Cluster, lb: &str) -> anyhow::Result<String> {
    let res = http.get(c.lb(lb, "/todos")).send().await?;
    if !res.status().is_success() {
        anyhow::bail!("{lb}: {}", res.status());
    }
    Ok(res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// Reads through both load balancers all along, counting failures and who
/// served.
struct Readers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    by: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    fn start(c: &Cluster, lbs: &[&str]) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let by = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let tasks = lbs
            .iter()
            .map(|lb| {
                let url = c.lb(lb, "/todos");
                let (stop, ok, failed, by, http) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    by.clone(),
                    http.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match http.get(&url).send().await {
                            Ok(res) if res.status().is_success() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let who = res
                                    .headers()
                                    .get("x-served-by")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string();
                                *by.lock().expect("lock").entry(who).or_default() += 1;
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Readers {
            stop,
            ok,
            failed,
            by,
            tasks,
        }
    }

    /// Counts since the last call: (ok, failed, served by).
    fn take(&self) -> (u64, u64, BTreeMap<String, u64>) {
        (
            self.ok.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
            std::mem::take(&mut *self.by.lock().expect("lock")),
        )
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Waits for a `node.provision_failed` event of `node` whose message says
/// `why`.
async fn provision_refused(
    c: &Cluster,
    node: &str,
    why: &str,
) -> anyhow::Result<serde_json::Value> {
    eventually(
        &format!("{node}'s refusal ({why}) in its events"),
        LONG,
        || async {
            let events: Vec<serde_json::Value> = c
                .api(Method::GET, "/events?limit=200")
                .await
                .send()
                .await?
                .json()
                .await?;
            Ok(events.into_iter().find(|e| {
                e["subject"] == node
                    && e["kind"] == "node.provision_failed"
                    && e["message"].as_str().is_some_and(|m| m.contains(why))
            }))
        },
    )
    .await
}

/// Whether `node`'s postgres refuses writes: down, or a standby. Read over
/// its socket, which needs no network.
async fn refuses_writes(c: &Cluster, node: &str) -> bool {
    sql(c, node, "SELECT pg_is_in_recovery()")
        .await
        .map_or(true, |r| r == "t")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lxc_cluster_serves_scales_and_survives_partitions_freezes_and_a_lost_control_plane() {
    if skip() {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::up_lxc(OCTET, 2, 2).await.expect("cluster up");
    eprintln!("lxc cluster up in {:.1} s", started.elapsed().as_secs_f64());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // The seed's addresses, in containers; adm1 is the host on the bridge.
    let nodes = c.nodes().await.expect("nodes");
    for n in &nodes {
        assert_eq!(n.address, c.address(&n.name), "{} address", n.name);
        let want = if n.name == "adm1" { "local" } else { "lxc" };
        assert_eq!(n.provider.as_str(), want, "{} provider", n.name);
    }
    for lb in ["nginx1", "nginx2"] {
        served_by(&http, &c, lb)
            .await
            .expect("the app through each load balancer");
    }
    let consul = http
        .get(format!(
            "http://{}:8500/v1/status/leader",
            c.address("adm1")
        ))
        .send()
        .await
        .expect("consul on adm1");
    assert!(consul.status().is_success());

    // Each container loads its role's firewall: from an address outside the
    // cluster's network, HTTP on a web node opens and PostgreSQL, Consul and
    // the webapp's own port do not; from the cluster's network they do.
    let outsider = format!("192.168.{}.250", OCTET + 1);
    let outside = HostAddress::add(&outsider)
        .await
        .expect("an outside address");
    let inside = c.address("adm1");
    let (pg1, nginx1) = (c.address("pg1"), c.address("nginx1"));
    eventually(
        "pg1's firewall to drop PostgreSQL from outside",
        LONG,
        || async { Ok((!connects(&outsider, &format!("{pg1}:5432")).await).then_some(())) },
    )
    .await
    .expect("pg1 firewall");
    for (node, port) in [(&nginx1, 8080), (&nginx1, 8500), (&pg1, 8500)] {
        eventually(
            &format!("{node}:{port} closed from outside"),
            LONG,
            || async { Ok((!connects(&outsider, &format!("{node}:{port}")).await).then_some(())) },
        )
        .await
        .expect("closed from outside");
    }
    assert!(
        connects(&outsider, &format!("{nginx1}:80")).await,
        "HTTP on a web node is open to anyone"
    );
    for (node, port) in [(&pg1, 5432), (&nginx1, 8080), (&nginx1, 8500)] {
        assert!(
            connects(&inside, &format!("{node}:{port}")).await,
            "{node}:{port} from the cluster's network"
        );
    }
    outside.remove().await.expect("remove the outside address");

    // Dual-stack: every container also has its address in the cluster's
    // own IPv6 prefix (a ULA made once, in the state dir), and nginx
    // answers there too. A todo written through nginx1's IPv6 address
    // reads back through nginx2's IPv4 one.
    let nginx1_v6 = c.address_v6("nginx1").expect("the cluster's IPv6 prefix");
    // Inside the cluster everything talks IPv6: Consul gossips between
    // the nodes' IPv6 addresses, nginx routes to the webapps at theirs,
    // and the standby replicates from the primary over IPv6.
    let members: Vec<serde_json::Value> = http
        .get(format!(
            "http://{}:8500/v1/agent/members",
            c.address("adm1")
        ))
        .header("X-Consul-Token", c.consul_token())
        .send()
        .await
        .expect("consul members")
        .json()
        .await
        .expect("json");
    assert!(members.len() >= 4, "{members:?}");
    for m in &members {
        let addr = m["Addr"].as_str().unwrap_or_default();
        assert!(
            addr.parse::<std::net::Ipv6Addr>().is_ok(),
            "{} gossips at {addr}",
            m["Name"]
        );
    }
    let webapps: Vec<serde_json::Value> = http
        .get(format!(
            "http://{}:8500/v1/catalog/service/todomvc",
            c.address("adm1")
        ))
        .header("X-Consul-Token", c.consul_token())
        .send()
        .await
        .expect("consul catalog")
        .json()
        .await
        .expect("json");
    assert!(!webapps.is_empty());
    for w in &webapps {
        let addr = w["ServiceAddress"].as_str().unwrap_or_default();
        assert!(
            addr.parse::<std::net::Ipv6Addr>().is_ok(),
            "webapp at {addr}"
        );
    }
    let primary = sole_primary(&c).await.expect("a primary");
    let standby_v6 = c.address_v6(&other(&c, &primary)).expect("v6").to_string();
    eventually("the standby streams over IPv6", LONG, || async {
        let from = sql(
            &c,
            &primary,
            "SELECT string_agg(host(client_addr), ',') FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .await?;
        Ok(from.split(',').any(|a| a == standby_v6).then_some(()))
    })
    .await
    .expect("replication over IPv6");
    let title = format!("written over IPv6 to [{nginx1_v6}]");
    eventually(
        "a todo written through nginx1's IPv6 address",
        LONG,
        || async {
            let res = http
                .post(format!("http://[{nginx1_v6}]/todos"))
                .json(&json!({ "title": title }))
                .send()
                .await?;
            Ok(res.status().is_success().then_some(()))
        },
    )
    .await
    .expect("the app over IPv6");
    eventually(
        "it reads back through nginx2's IPv4 address",
        LONG,
        || async {
            let list: serde_json::Value = http
                .get(c.lb("nginx2", "/todos"))
                .send()
                .await?
                .json()
                .await?;
            Ok(list
                .as_array()
                .is_some_and(|l| l.iter().any(|t| t["title"] == title.as_str()))
                .then_some(()))
        },
    )
    .await
    .expect("the IPv6 write read over IPv4");

    // A provider that is not configured here is refused, changing nothing.
    let res = c
        .api(Method::POST, "/nodes")
        .await
        .json(&json!({"role": "web", "provider": "virtualbox"}))
        .send()
        .await
        .expect("POST /nodes");
    assert_eq!(
        res.status().as_u16(),
        422,
        "{}",
        res.text().await.unwrap_or_default()
    );

    // Sync mode, then writes through both load balancers all along.
    let res = c
        .api(Method::PUT, "/topology")
        .await
        .json(&json!({"web": 2, "db": 2, "lb_policy": "round_robin", "replication": "sync"}))
        .send()
        .await
        .expect("PUT topology");
    assert!(res.status().is_success(), "{}", res.status());
    let w1 = Writer::start(&c, "nginx1");
    let w2 = Writer::start(&c, "nginx2");
    let mut primary = settled(&c, &w1, "start").await.expect("start");
    settled(&c, &w2, "start").await.expect("start");

    // Add webserver: nginx3 at .23, serving through both load balancers. A
    // container directory of that name that is not corral's is refused
    // first, then its address while this host has it; each refusal reaches
    // the node's events and nothing is made until both are free.
    let foreign = c.lxc_path().join("nginx3");
    std::fs::create_dir_all(&foreign).expect("foreign container dir");
    std::fs::write(foreign.join("config"), "lxc.uts.name = nginx3\n").expect("foreign config");
    let added = Instant::now();
    let res = c
        .api(Method::POST, "/nodes")
        .await
        .json(&json!({"role": "web", "provider": "lxc"}))
        .send()
        .await
        .expect("POST /nodes");
    assert!(res.status().is_success(), "{}", res.status());
    let node: serde_json::Value = res.json().await.expect("node");
    assert_eq!(node["name"], "nginx3");
    assert_eq!(node["address"].as_str(), Some(c.address("nginx3").as_str()));
    provision_refused(&c, "nginx3", "already exists")
        .await
        .expect("the refusal is an event");
    // Then its address, taken by this host meanwhile, is refused too.
    let taken = HostAddress::add(&c.address("nginx3"))
        .await
        .expect("take nginx3's address");
    std::fs::remove_dir_all(&foreign).expect("remove the foreign dir");
    provision_refused(&c, "nginx3", "already taken by this host")
        .await
        .expect("the address refusal is an event");
    assert!(
        !c.lxc_path().join("nginx3").exists(),
        "nothing is made while the address is taken"
    );
    taken.remove().await.expect("free nginx3's address");
    for lb in ["nginx1", "nginx2"] {
        eventually(&format!("nginx3 to serve through {lb}"), LONG, || async {
            Ok((served_by(&http, &c, lb).await? == "nginx3").then_some(()))
        })
        .await
        .expect("nginx3 serves");
    }
    eprintln!(
        "nginx3 added and serving through both load balancers in {:.1} s (after two refused tries)",
        added.elapsed().as_secs_f64()
    );

    // 1. A web node cut off from its load balancers: out of rotation, and
    // not one idempotent request fails.
    let readers = Readers::start(&c, &["nginx1", "nginx2"]);
    let cut = Partition::cut(&c, &["nginx3"], &["nginx1", "nginx2"])
        .await
        .expect("cut nginx3");
    // nginx notices on the first failed connect (2 s) and retries elsewhere.
    eventually("reads to flow while nginx3 is cut off", LONG, || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (ok, _, _) = readers.take();
        Ok((ok > 20).then_some(()))
    })
    .await
    .expect("reads");
    let (_, _, _) = readers.take();
    let window = Instant::now();
    eventually(
        "a stretch of reads with nginx3 out of rotation",
        LONG,
        || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok((window.elapsed() > Duration::from_secs(4)).then_some(()))
        },
    )
    .await
    .expect("window");
    let (ok, failed, by) = readers.take();
    cut.heal().await;
    assert_eq!(
        failed, 0,
        "reads failed while nginx3 was cut off ({ok} ok, by {by:?})"
    );
    eprintln!("nginx3 cut off from its load balancers: {ok} reads, 0 failed, served by {by:?}");
    drop(readers);

    // 2. The primary partitioned from every other node, adm1 included: it
    // stops taking writes within the fencing bound, the standby takes over,
    // and once healed the old primary rejoins as a standby.
    let standby = other(&c, &primary);
    let everyone: Vec<String> = c
        .machine_names()
        .into_iter()
        .filter(|n| *n != primary)
        .collect();
    let everyone: Vec<&str> = everyone.iter().map(String::as_str).collect();
    let cut_at = Instant::now();
    let cut = Partition::cut(&c, &[primary.as_str()], &everyone)
        .await
        .expect("partition the primary");
    let fenced_after = eventually("the partitioned primary to fence itself", LONG, || async {
        Ok(refuses_writes(&c, &primary).await.then(|| cut_at.elapsed()))
    })
    .await
    .expect("fenced");
    eprintln!(
        "partitioned primary {primary} refused writes {:.1} s after the cut",
        fenced_after.as_secs_f64()
    );
    // The watchdog fences 1.5 s after the lock was last confirmed; a tick
    // and the shutdown come on top.
    assert!(
        fenced_after < Duration::from_secs(6),
        "fenced only after {fenced_after:?}"
    );
    eventually(&format!("{standby} to take over"), LONG, || async {
        Ok((sql(&c, &standby, "SELECT pg_is_in_recovery()").await? == "f").then_some(()))
    })
    .await
    .expect("standby promoted");
    w1.progresses("writes on the new primary", 20)
        .await
        .expect("writes");
    cut.heal().await;
    let now = or_journals(
        &c,
        settled(&c, &w1, "the primary partitioned, then healed").await,
        "after the partition",
    )
    .await;
    or_journals(
        &c,
        settled(&c, &w2, "the primary partitioned, then healed").await,
        "after the partition",
    )
    .await;
    assert_eq!(now, standby, "the standby that took over stays primary");
    primary = now;

    // 3. The primary frozen whole, then thawed.
    let standby = other(&c, &primary);
    let frozen = Freeze::node(&c, &primary).await.expect("freeze");
    eventually(
        &format!("{standby} to take over from frozen {primary}"),
        LONG,
        || async {
            Ok((sql(&c, &standby, "SELECT pg_is_in_recovery()").await? == "f").then_some(()))
        },
    )
    .await
    .expect("standby promoted");
    w2.progresses("writes while the old primary is frozen", 20)
        .await
        .expect("writes");
    frozen.thaw().await.expect("thaw");
    let now = or_journals(
        &c,
        settled(&c, &w2, "the primary frozen, then thawed").await,
        "after the freeze",
    )
    .await;
    or_journals(
        &c,
        settled(&c, &w1, "the primary frozen, then thawed").await,
        "after the freeze",
    )
    .await;
    assert_eq!(now, standby);
    primary = now;

    // 4. Primary and standby cut from each other only, both still reaching
    // Consul: the primary keeps its lock, the standby must not promote.
    let standby = other(&c, &primary);
    let cut = Partition::cut(&c, &[primary.as_str()], &[standby.as_str()])
        .await
        .expect("pairwise partition");
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        assert_eq!(
            sole_primary(&c)
                .await
                .expect("one primary during the pairwise partition"),
            primary,
            "the primary moved although it still held Consul"
        );
        assert_eq!(
            sql(&c, &standby, "SELECT pg_is_in_recovery()")
                .await
                .ok()
                .as_deref(),
            Some("t"),
            "the standby took writes while cut off from the primary only"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cut.heal().await;
    let now = or_journals(
        &c,
        settled(
            &c,
            &w1,
            "primary and standby cut from each other, then healed",
        )
        .await,
        "after the pairwise partition",
    )
    .await;
    or_journals(
        &c,
        settled(
            &c,
            &w2,
            "primary and standby cut from each other, then healed",
        )
        .await,
        "after the pairwise partition",
    )
    .await;
    assert_eq!(now, primary);

    // Scale in: removing nginx3 drains it, then destroys its container.
    let res = c
        .api(Method::DELETE, "/nodes/nginx3")
        .await
        .send()
        .await
        .expect("DELETE nginx3");
    assert!(res.status().is_success(), "{}", res.status());
    eventually("nginx3's container to be destroyed", LONG, || async {
        Ok((!c.lxc_path().join("nginx3").exists()).then_some(()))
    })
    .await
    .expect("destroyed");
    // 5. The control plane gone for a minute: the data plane serves 100 %.
    let readers = Readers::start(&c, &["nginx1", "nginx2"]);
    let before = (w1.count(), w2.count());
    c.kill_control_plane().await.expect("kill corral up");
    let gone = Instant::now();
    while gone.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (ok, failed, _) = readers.take();
    assert_eq!(
        failed, 0,
        "reads failed without the control plane ({ok} ok)"
    );
    assert!(
        w1.count() > before.0 + 100 && w2.count() > before.1 + 100,
        "writes stalled without the control plane"
    );
    eprintln!(
        "control plane down 60 s: {ok} reads, 0 failed; {} writes",
        w1.count() + w2.count() - before.0 - before.1
    );
    drop(readers);
    c.start()
        .await
        .expect("corral up again adopts the running cluster");
    or_journals(
        &c,
        settled(&c, &w1, "the control plane back").await,
        "after",
    )
    .await;
    or_journals(
        &c,
        settled(&c, &w2, "the control plane back").await,
        "after",
    )
    .await;

    drop(w1);
    drop(w2);
    c.stop().await.expect("corral up stops");
}

/// The value, or a panic that shows each container's journal (the agent's
/// and postgres's own logs are there).
async fn or_journals<T>(c: &Cluster, r: anyhow::Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}\n{}", c.logs_for_failure().await),
    }
}
