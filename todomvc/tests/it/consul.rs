//! Discovery through a real Consul agent (`consul agent -dev` on loopback
//! and free ports): the app follows the `postgres` service as servers are
//! registered, and trusts a server's own recovery status over its tag.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use corral_testkit::{Postgres, free_port};
use serde_json::json;

use crate::replicas::primary_and_replica;
use crate::support::{TestApp, eventually};

/// A Consul dev agent, killed and reaped on drop.
struct Consul {
    child: Child,
    http: String,
    _dir: tempfile::TempDir,
}

impl Consul {
    async fn start() -> anyhow::Result<Consul> {
        let port = |_| free_port("127.0.0.1");
        let [http, serf_lan, serf_wan, server] = [0, 1, 2, 3].map(port);
        let (http, serf_lan, serf_wan, server) = (http?, serf_lan?, serf_wan?, server?);
        let dir = tempfile::tempdir()?;
        // setpriv's pdeathsig: a test process killed outright takes consul
        // with it (Drop handles every other ending).
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "consul"])
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-node", "todomvc-test", "-log-level", "warn"])
            .arg(format!("-http-port={http}"))
            .arg("-dns-port=-1")
            .arg("-grpc-port=-1")
            .arg(format!("-serf-lan-port={serf_lan}"))
            .arg(format!("-serf-wan-port={serf_wan}"))
            .arg(format!("-server-port={server}"))
            .arg("-data-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting consul")?;
        let mut consul = Consul {
            child,
            http: format!("http://127.0.0.1:{http}"),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let leader = format!("{}/v1/status/leader", consul.http);
        let started = Instant::now();
        loop {
            if let Some(status) = consul.child.try_wait()? {
                anyhow::bail!("consul exited with {status}");
            }
            if let Ok(r) = client.get(&leader).send().await
                && r.text().await.is_ok_and(|t| t.contains(':'))
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "consul elected no leader in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(consul)
    }

    async fn register(&self, id: &str, pg: &Postgres, tag: &str) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .put(format!("{}/v1/agent/service/register", self.http))
            .json(&json!({
                "ID": id,
                "Name": "postgres",
                "Tags": [tag],
                "Address": pg.host(),
                "Port": pg.port(),
            }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "register {id}: {}", r.status());
        Ok(())
    }

    async fn deregister(&self, id: &str) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .put(format!("{}/v1/agent/service/deregister/{id}", self.http))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "deregister {id}: {}", r.status());
        Ok(())
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_servers_through_consul_and_follows_promotion() -> anyhow::Result<()> {
    let consul = Consul::start().await?;
    let (mut primary, replica) = primary_and_replica("todomvc")?;
    // At first Consul knows only the primary.
    consul.register("pg-a", &primary, "primary").await?;
    let app = TestApp::spawn(&["--db-name", "todomvc", "--consul", &consul.http]).await?;
    app.wait_writable().await?;
    let long = Duration::from_secs(30);
    let s = app.session();
    s.add("via consul").await?;
    assert_eq!(app.health().await?.json["discovery"]["source"], "consul");

    // A replica registered later is picked up without a restart.
    consul.register("pg-b", &replica, "replica").await?;
    eventually("reads move to the new replica", long, || async {
        Ok(s.get("/todos").await?.read_from() == Some("replica"))
    })
    .await?;

    // The primary dies; Consul is not told (its tags go stale).
    primary.kill();
    let r = s
        .post_json("/todos", &json!({"title": "no primary"}))
        .await?;
    assert_eq!(r.status, 503, "{}", r.text);

    // The replica is promoted but still tagged `replica` in Consul: its own
    // recovery status is what counts, so writes go to it.
    replica.promote()?;
    eventually("writes reach the promoted replica", long, || async {
        Ok(s.post_json("/todos", &json!({"title": "after failover"}))
            .await?
            .status
            == 201)
    })
    .await?;
    let h = app.health().await?;
    let states: Vec<(String, String)> = h.json["servers"]
        .as_array()
        .context("servers")?
        .iter()
        .map(|s| {
            (
                s["tag"].as_str().unwrap_or("").into(),
                s["state"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert!(
        states.contains(&("replica".into(), "primary".into())),
        "the promoted server is the primary despite its tag: {states:?}"
    );

    // Consul catches up; the dead server drops out of the picture.
    consul.deregister("pg-a").await?;
    consul.register("pg-b", &replica, "primary").await?;
    eventually("health lists only the new primary", long, || async {
        let h = app.health().await?;
        Ok(h.json["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 1 && s[0]["state"] == "primary"))
    })
    .await?;
    assert_eq!(
        s.get("/todos").await?.titles(),
        vec!["via consul", "after failover"]
    );
    Ok(())
}
