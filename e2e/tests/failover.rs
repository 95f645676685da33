//! PostgreSQL high availability with real processes and injected faults: a
//! cluster in `sync` mode takes writes through nginx and the webapp the
//! whole time, while the primary's postgres is killed, its Consul agent is
//! frozen (it must fence itself), the whole primary node is frozen and
//! thawed (it must rejoin as a standby, rewound), the whole primary node
//! crashes and its agent is restarted, a switchover goes there and back, and
//! a standby is added. After each: exactly one server accepts
//! writes, and every write a client saw acknowledged is there.

use anyhow::bail;
use corral_e2e::faults::{Frozen, service_pid, signal_all};
use corral_e2e::pg::{kill_postgres, sole_primary, sql, streams_from, sync_mode};
use corral_e2e::writes::{LONG, Writer, other, settled, switchover};
use corral_e2e::{Cluster, eventually};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::json;

fn node_processes(c: &Cluster, node: &str) -> Vec<u32> {
    corral_e2e::faults::node_processes(c, node).expect("the node's processes")
}

/// The local port of `node`'s WAL receiver connection (to its primary's
/// 5432), from the receiver's socket in /proc/net/tcp.
fn walreceiver_port(c: &Cluster, node: &str) -> Option<u16> {
    let receiver = node_processes(c, node).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).starts_with("postgres: walreceiver"))
    })?;
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{receiver}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(String::from)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
        (inodes.iter().any(|i| i == inode) && port(remote) == Some(5432))
            .then(|| port(local))
            .flatten()
    })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failures_fail_over_fence_rejoin_and_lose_no_acknowledged_write() {
    let c = Cluster::up(23, 1, 2).await.expect("cluster up");
    sync_mode(&c, 1, 2).await.expect("sync mode");
    let w = Writer::start(&c, "nginx1");
    let primary = settled(&c, &w, "start").await.expect("start");

    // 0. A slow HA step must not fence a healthy primary: a transaction
    // holding the view pg_stat_wal_receiver exclusively for 4 s makes the
    // step's status query (which reads it) wait, far past the 2 s fencing
    // bound, while postgres itself answers (its alive check, the webapps).
    // The lock stays confirmed apart from the step, so the primary is
    // still the primary afterwards, on the same timeline. (Stalling every
    // query, with pg_class, must fence instead: the alive check times out
    // and the leader session ends, as for a hung server.)
    let fences = || {
        std::fs::read_to_string(c.node_root(&primary).join("agent.log"))
            .unwrap_or_default()
            .matches("fencing: stopping the primary")
            .count()
    };
    let (fences_before, timeline) = (
        fences(),
        sql(
            &c,
            &primary,
            "SELECT timeline_id FROM pg_control_checkpoint()",
        )
        .await
        .expect("timeline"),
    );
    // (In `postgres`, the database the agent's queries use: catalogs and
    // their views are per database.)
    corral_e2e::pg::sql_in(
        &c,
        &primary,
        "postgres",
        "BEGIN; LOCK TABLE pg_catalog.pg_stat_wal_receiver IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT",
    )
    .await
    .expect("holding pg_stat_wal_receiver for 4 s");
    let primary = settled(&c, &w, "a 4 s stall of the primary's queries")
        .await
        .expect("after the stall");
    assert_eq!(fences(), fences_before, "the stalled primary fenced itself");
    assert_eq!(
        sql(
            &c,
            &primary,
            "SELECT timeline_id FROM pg_control_checkpoint()"
        )
        .await
        .expect("timeline"),
        timeline,
        "the primary changed"
    );

    // 0b. The primary's Consul agent dies and the corral agent starts it
    // again a second later: the cluster still sees the node alive, so the
    // primary keeps its lock (confirmed through a Consul server meanwhile)
    // and keeps serving, on the same timeline. It used to fence itself and
    // fail over on every such blip.
    let consul_pid = || service_pid(&c, &primary, "consul").ok();
    let killed = consul_pid().expect("the primary's consul pid");
    signal_all(&[killed], Signal::SIGKILL);
    eventually("the primary's Consul agent started again", LONG, || async {
        Ok(consul_pid()
            .filter(|pid| *pid != killed && std::path::Path::new(&format!("/proc/{pid}")).exists()))
    })
    .await
    .expect("consul restarted");
    let after_blip = settled(&c, &w, "the primary's Consul agent killed and restarted")
        .await
        .expect("after the consul blip");
    assert_eq!(
        after_blip, primary,
        "a Consul agent restart moved the primary"
    );
    assert_eq!(
        fences(),
        fences_before,
        "a Consul agent restart fenced the primary"
    );
    assert_eq!(
        sql(
            &c,
            &primary,
            "SELECT timeline_id FROM pg_control_checkpoint()"
        )
        .await
        .expect("timeline"),
        timeline,
        "a Consul agent restart changed the timeline"
    );

    // 1. kill -9 of the primary's postgres.
    kill_postgres(&c, &primary).await.expect("kill postgres");
    let primary = settled(&c, &w, "kill -9 of the primary's postgres")
        .await
        .expect("after kill -9");

    // 2. The primary's Consul agent frozen: it must stop taking writes by
    // itself, a standby takes over; thawed, it rejoins.
    let frozen = Frozen(vec![
        service_pid(&c, &primary, "consul").expect("consul pid"),
    ]);
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

    // 2b. The same while the primary's agent crashes: the provider restarts
    // it, and the new agent adopts a running primary whose lock it can
    // never confirm (Consul does not answer). It must fence it all the same.
    let pid = |service: &str| -> u32 {
        service_pid(&c, &primary, service)
            .unwrap_or_else(|e| panic!("{primary}'s {service}: {e:#}"))
    };
    let agent = pid("agent");
    let frozen = Frozen(vec![pid("consul")]);
    signal_all(&frozen.0, Signal::SIGSTOP);
    signal_all(&[agent], Signal::SIGKILL);
    let standby = other(&c, &primary);
    eventually(
        "a new agent adopting the unconfirmed primary to fence it",
        LONG,
        || async {
            let restarted = service_pid(&c, &primary, "agent").is_ok_and(|p| p != agent);
            let fenced = sql(&c, &primary, "SELECT pg_is_in_recovery()")
                .await
                .map_or(true, |r| r == "t");
            Ok((restarted && fenced).then_some(()))
        },
    )
    .await
    .expect("fenced after an agent restart");
    takes_over_then_rejoins(
        &c,
        &w,
        &standby,
        frozen,
        "the primary's agent restarted while its consul was frozen",
    )
    .await
    .expect("after the agent restart");
    let primary = standby;

    // 3. The whole primary node frozen (agent, consul, postgres), then
    // thawed: a failover, then the old primary rewinds and rejoins.
    let frozen_node = primary.clone();
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
    // It rejoined by pg_rewind (as `rewinder`, with the replication
    // password; a first try may meet the new primary still starting), not
    // by the fallback of a fresh clone.
    let log = std::fs::read_to_string(c.node_root(&frozen_node).join("agent.log"))
        .expect("the frozen node's agent log");
    assert!(
        log.contains("rewound with pg_rewind") && !log.contains("cloning the primary afresh"),
        "{frozen_node} did not rejoin by pg_rewind:\n{}",
        log.lines()
            .filter(|l| l.contains("rewind") || l.contains("clon"))
            .collect::<Vec<_>>()
            .join("\n")
    );
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

    // 5. Switchover and back. During the first, the target's WAL stops
    // arriving from just before the request until 4 s after the primary
    // recorded the switchover (packets between the two dropped; in sync
    // mode no commit is acknowledged meanwhile): the old primary shuts
    // down and its leader session dies with its postgres-alive check,
    // freeing the lock, but the target must not take over before it has
    // the old primary's last records. So the old primary follows it
    // cleanly, with no pg_rewind, and nothing acknowledged is lost.
    let first = primary.clone();
    let rewinds = || {
        std::fs::read_to_string(c.node_root(&first).join("agent.log"))
            .unwrap_or_default()
            .matches("pg_rewind")
            .count()
    };
    let rewinds_before = rewinds();
    for (to, what) in [
        (other(&c, &first), "switchover"),
        (first.clone(), "switchover back"),
    ] {
        // The first switchover runs beside the cut; both borrow the cluster.
        let slow = async {
            if what != "switchover" {
                return true;
            }
            let consul = format!(
                "http://{}:8500/v1/kv/service/postgres/switchover",
                c.address("adm1")
            );
            let token = c.consul_token();
            let http = reqwest::Client::new();
            // Cut before the request: the switchover shuts the primary down
            // within a fraction of a second of recording itself.
            let port = walreceiver_port(&c, &to).expect("the target's WAL receiver connection");
            let cut = corral_e2e::faults::Partition::cut_ports(&c, port, 5432)
                .await
                .expect("cutting the network");
            let deadline = std::time::Instant::now() + LONG;
            while std::time::Instant::now() < deadline {
                let recorded = http
                    .get(&consul)
                    .header("X-Consul-Token", token.as_str())
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if recorded {
                    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
                    cut.heal().await;
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            cut.heal().await;
            false
        };
        let (cut, done) = tokio::join!(slow, switchover(&c, &to));
        done.expect(what);
        assert!(cut, "the switchover record never appeared");
        eventually(
            &format!("{to} to be primary after the {what}"),
            LONG,
            || async { Ok((sole_primary(&c).await? == to).then_some(())) },
        )
        .await
        .expect(what);
        let now = settled(&c, &w, what).await.expect(what);
        assert_eq!(now, to, "{what}");
        if what == "switchover" {
            assert_eq!(
                rewinds(),
                rewinds_before,
                "{first} needed pg_rewind to follow {to}: {to} took over before it had {first}'s last WAL"
            );
        }
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
