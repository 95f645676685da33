//! The VirtualBox provider end to end, without VirtualBox: `testkit/
//! fake-vboxmanage` stands first on PATH as `VBoxManage` and boots each
//! "VM" as a local corral-agent at the address its guest properties name.
//! The real `corral up` runs the seed cluster with `--providers virtualbox`;
//! the real host agent (`corral-agent host`) long-polls it for machine
//! orders and drives the fake.
//!
//! - With no host agent connected, adding a virtualbox node is refused.
//! - The host agent makes nginx3 with the exact VBoxManage calls (clone,
//!   configure, guest properties, start), nginx3 serves through both load
//!   balancers, and its enrollment secret is gone from the guest properties.
//! - Removing nginx3 powers its VM off and deletes it.
//! - A host agent killed in the middle of an ensure (right after the clone)
//!   is restarted: the next one finds the half-made VM and finishes it, with
//!   no second clone and no orphan.
//! - With two servers (`corral up --servers 2`), a host agent given the
//!   server that does not lead first moves on to the leader (the other
//!   answers 503), and a node added through the server that does not lead
//!   is accepted and made.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use corral_e2e::{Cluster, bin, eventually};
use corral_server::provider::reaper::{self, Exit, Reaper};
use nix::sys::signal::{Signal, kill};
use reqwest::Method;
use serde_json::json;

/// The subnet octet of this test's cluster: 127.0.<OCTET>.0/24.
const OCTET: u8 = 24;
const LONG: Duration = Duration::from_secs(60);

/// The fake's records, log and the PATH directory holding `VBoxManage`.
struct Fake {
    dir: PathBuf,
    path: String,
}

impl Fake {
    fn new(state: &Path) -> anyhow::Result<Fake> {
        let dir = state.join("vbox");
        let bin_dir = dir.join("bin");
        std::fs::create_dir_all(&bin_dir)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/fake-vboxmanage");
        std::os::unix::fs::symlink(script.canonicalize()?, bin_dir.join("VBoxManage"))?;
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Ok(Fake { dir, path })
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("PATH", &self.path)
            .env("FAKE_VBOX_DIR", &self.dir)
            .env("FAKE_VBOX_AGENT", bin("corral-agent"));
    }

    /// Runs `VBoxManage args` (the fake, through PATH); its stdout.
    async fn vbox(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("VBoxManage");
        cmd.args(args);
        self.env(&mut cmd);
        // std looks the program up in the PATH it is given.
        let out = corral_e2e::run(&mut cmd).await?;
        anyhow::ensure!(
            out.exit.success(),
            "VBoxManage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What a user does once (scripts/vbox-base.sh and the README): a base
    /// VM with its snapshot, and the host-only network at 127.0.<octet>.1.
    async fn make_base(&self, octet: u8) -> anyhow::Result<()> {
        self.vbox(&[
            "createvm",
            "--name",
            "corral-base",
            "--groups",
            "/corral-base",
            "--register",
        ])
        .await?;
        self.vbox(&["snapshot", "corral-base", "take", "base"])
            .await?;
        self.vbox(&["hostonlyif", "create"]).await?;
        let host_ip = format!("127.0.{octet}.1");
        self.vbox(&[
            "hostonlyif",
            "ipconfig",
            "vboxnet0",
            "--ip",
            &host_ip,
            "--netmask",
            "255.255.255.0",
        ])
        .await?;
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls after the first `from` that change something, the secret
    /// replaced by `<secret>`.
    fn changes_since(&self, from: usize) -> Vec<String> {
        self.calls()
            .into_iter()
            .skip(from)
            .filter(|c| {
                !(c.starts_with("list ")
                    || c.starts_with("showvminfo ")
                    || c.starts_with("guestproperty get ")
                    || c.starts_with("guestproperty wait "))
            })
            .map(|c| match c.split_once("/corral/secret ") {
                Some((head, secret)) if !secret.is_empty() => {
                    format!("{head}/corral/secret <secret>")
                }
                _ => c,
            })
            .collect()
    }

    async fn vm_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .vbox(&["list", "vms"])
            .await?
            .lines()
            .filter_map(|l| l.split('"').nth(1).map(str::to_string))
            .collect())
    }

    fn guest_dirs(&self) -> Vec<PathBuf> {
        guest_dirs(&self.dir)
    }
}

/// The state directories of the "VMs"' agents.
fn guest_dirs(fake_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(fake_dir.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("guest"))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// A running `corral-agent host`.
struct HostAgent {
    pid: u32,
    exit: tokio::sync::oneshot::Receiver<Exit>,
}

impl HostAgent {
    fn start(c: &Cluster, fake: &Fake, hold: Option<&str>) -> anyhow::Result<HostAgent> {
        Self::start_with(c, fake, hold, &c.url)
    }

    /// A host agent given `servers` (comma-separated).
    fn start_with(
        c: &Cluster,
        fake: &Fake,
        hold: Option<&str>,
        servers: &str,
    ) -> anyhow::Result<HostAgent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(fake.dir.join("host-agent.log"))?;
        let mut cmd = Command::new(bin("corral-agent"));
        cmd.arg("host")
            .args(["--provider", "virtualbox", "--server", servers])
            .arg("--token-file")
            .arg(c.state_dir().join("admin-token"))
            .args(["--boot-timeout-secs", "90"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        fake.env(&mut cmd);
        if let Some(command) = hold {
            cmd.env("FAKE_VBOX_HOLD", command);
        }
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let spawned = Reaper::global().spawn(&mut cmd)?;
        Ok(HostAgent {
            pid: spawned.pid,
            exit: spawned.exit,
        })
    }

    async fn kill(self) {
        let _ = kill(reaper::pid(self.pid), Signal::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.exit).await;
    }
}

/// Stops what the test started besides the cluster, also when it fails:
/// the host agent first, then every "VM"'s agent and services.
struct Guard {
    host: Option<HostAgent>,
    fake_dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            let _ = kill(reaper::pid(host.pid), Signal::SIGKILL);
        }
        for guest in guest_dirs(&self.fake_dir) {
            let mut cmd = Command::new(bin("corral-agent"));
            cmd.arg("stop-all")
                .arg("--state-dir")
                .arg(&guest)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(spawned) = Reaper::global().spawn(&mut cmd) {
                let mut exit = spawned.exit;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while exit
                    .try_recv()
                    .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty)
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Who served a GET of /todos through `lb`.
async fn served_by(c: &Cluster, lb: &str) -> anyhow::Result<String> {
    let res = c.http.get(c.lb(lb, "/todos")).send().await?;
    anyhow::ensure!(res.status().is_success(), "{lb}: {}", res.status());
    Ok(res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// Adds a virtualbox web node once the host agent is connected; its name.
async fn add_vbox_web(c: &Cluster) -> anyhow::Result<String> {
    add_vbox_web_via(c, &c.url).await
}

/// [`add_vbox_web`] through the server at `server`.
async fn add_vbox_web_via(c: &Cluster, server: &str) -> anyhow::Result<String> {
    eventually("a virtualbox node to be accepted", LONG, || async move {
        let res = c
            .http
            .post(format!("{}/api/v1/nodes", server.trim_end_matches('/')))
            .bearer_auth(&c.token)
            .json(&json!({"role": "web", "provider": "virtualbox"}))
            .send()
            .await?;
        match res.status().as_u16() {
            201 => {
                let node: serde_json::Value = res.json().await?;
                Ok(node["name"].as_str().map(str::to_string))
            }
            409 => Ok(None),
            other => anyhow::bail!("POST /nodes: {other}: {}", res.text().await?),
        }
    })
    .await
}

/// Waits until the host agent has taken the enrollment secret of `vm` back,
/// its last step of an ensure (the node may serve before that).
async fn secret_taken_back(fake: &Fake, vm: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{vm}'s secret to be deleted"),
        LONG,
        || async move {
            let value = fake
                .vbox(&["guestproperty", "get", vm, "/corral/secret"])
                .await?;
            Ok((value.trim() == "No value set!").then_some(()))
        },
    )
    .await
}

/// Waits until `node` is enrolled and every load balancer in `lbs` routes
/// to its webapp.
async fn serving(c: &Cluster, node: &str, lbs: &[&str]) -> anyhow::Result<()> {
    for lb in lbs {
        eventually(&format!("{lb} to route to {node}"), LONG, || async move {
            Ok((served_by(c, lb).await.unwrap_or_default() == node).then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtualbox_nodes_are_made_by_the_host_agent_through_vboxmanage() {
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let mut c = Cluster::up_with(OCTET, 2, 1, &["--providers", "virtualbox"])
        .await
        .expect("corral up");
    let fake = Fake::new(c.state_dir()).expect("fake VBoxManage");
    let mut guard = Guard {
        host: None,
        fake_dir: fake.dir.clone(),
    };
    let outcome = async {
        fake.make_base(OCTET).await?;

        // No host agent: refused, naming what is missing; nothing is made.
        let res = c
            .api(Method::POST, "/nodes")
            .await
            .json(&json!({"role": "web", "provider": "virtualbox"}))
            .send()
            .await?;
        assert_eq!(res.status(), 409);
        let body: serde_json::Value = res.json().await?;
        assert_eq!(body["error"], "host_agent_missing");
        assert!(!c.nodes().await?.iter().any(|n| n.name == "nginx3"));

        phase("cluster up, base VM and network made; no host agent refused");
        // The host agent makes nginx3: clone, configure, properties, start.
        guard.host = Some(HostAgent::start(&c, &fake, None)?);
        let from = fake.calls().len();
        let node = add_vbox_web(&c).await?;
        assert_eq!(node, "nginx3");
        serving(&c, "nginx3", &["nginx1", "nginx2"]).await?;
        let url = c.url.clone();
        let address = c.address("nginx3");
        let expected: Vec<String> = vec![
            "clonevm corral-base --snapshot base --options link --name corral-nginx3 --groups /corral --register".to_string(),
            "modifyvm corral-nginx3 --memory 1024 --cpus 1 --nic2 hostonly --hostonlyadapter2 vboxnet0".into(),
            format!("guestproperty set corral-nginx3 /corral/server {url}"),
            "guestproperty set corral-nginx3 /corral/node nginx3".into(),
            "guestproperty set corral-nginx3 /corral/role web".into(),
            format!("guestproperty set corral-nginx3 /corral/address {address}"),
            "guestproperty set corral-nginx3 /corral/netmask 255.255.255.0".into(),
            "guestproperty set corral-nginx3 /corral/secret <secret>".into(),
            // No CA: this control plane is on loopback, plain HTTP.
            "guestproperty set corral-nginx3 /corral/ca".into(),
            "guestproperty set corral-nginx3 /corral/agent".into(),
            "startvm corral-nginx3 --type headless".into(),
            // Once enrolled, the secret is taken back.
            "guestproperty set corral-nginx3 /corral/secret".into(),
        ];
        secret_taken_back(&fake, "corral-nginx3").await?;
        assert_eq!(fake.changes_since(from), expected);
        let nginx3 = c.nodes().await?.into_iter().find(|n| n.name == "nginx3").context("nginx3")?;
        assert_eq!(nginx3.provider, corral_proto::Provider::Virtualbox);

        phase("nginx3 made by the host agent, serving through both load balancers");
        // Removal: the VM is powered off, then deleted with its disks.
        let from = fake.calls().len();
        let res = c.api(Method::DELETE, "/nodes/nginx3").await.send().await?;
        assert!(res.status().is_success(), "DELETE nginx3: {}", res.status());
        let fr = &fake;
        eventually("nginx3's VM to be deleted", LONG, || async move {
            Ok((!fr.vm_names().await?.contains(&"corral-nginx3".to_string())).then_some(()))
        })
        .await?;
        assert_eq!(
            fake.changes_since(from),
            vec![
                "controlvm corral-nginx3 poweroff".to_string(),
                "unregistervm corral-nginx3 --delete".into()
            ]
        );
        let guest = fake.dir.join("vms/corral-nginx3");
        assert!(!guest.exists(), "the VM's files are gone");
        let left = Cluster::pids_with(&guest.to_string_lossy());
        assert!(left.is_empty(), "processes of nginx3's VM still run: {left:?}");

        phase("nginx3 removed, its VM deleted");
        // The host agent is killed right after the clone of a new nginx3.
        guard.host.take().expect("host agent").kill().await;
        std::fs::write(fake.dir.join("hold"), "")?;
        guard.host = Some(HostAgent::start(&c, &fake, Some("clonevm"))?);
        let from = fake.calls().len();
        let node = add_vbox_web(&c).await?;
        assert_eq!(node, "nginx3");
        let held = fake.dir.join("held");
        eventually("the clone to be made", LONG, || async {
            Ok(held.exists().then_some(()))
        })
        .await?;
        guard.host.take().expect("host agent").kill().await;
        std::fs::remove_file(fake.dir.join("hold"))?;
        let half_made = fake.vbox(&["showvminfo", "corral-nginx3", "--machinereadable"]).await?;
        assert!(half_made.contains("VMState=\"poweroff\""), "{half_made}");

        // The next host agent finishes that VM: no second clone, no orphan.
        guard.host = Some(HostAgent::start(&c, &fake, None)?);
        serving(&c, "nginx3", &["nginx1", "nginx2"]).await?;
        secret_taken_back(&fake, "corral-nginx3").await?;
        let changes = fake.changes_since(from);
        // The very calls of an uncut ensure: one clone (before the kill),
        // then configure, properties and start (after it).
        assert_eq!(changes, expected);
        assert_eq!(fake.vm_names().await?, vec!["corral-base", "corral-nginx3"]);

        phase("nginx3 finished by the next host agent after a kill mid-ensure");
        // `corral up` stops the VM through the host agent as it ends.
        c.stop().await?;
        let info = fake.vbox(&["showvminfo", "corral-nginx3", "--machinereadable"]).await?;
        anyhow::ensure!(info.contains("VMState=\"poweroff\""), "still up after corral up stopped: {info}");
        phase("corral up stopped, the VM powered off through the host agent");
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let host_log = std::fs::read_to_string(fake.dir.join("host-agent.log")).unwrap_or_default();
        let calls = fake.calls().join("\n");
        let guests: String = fake
            .guest_dirs()
            .iter()
            .map(|g| std::fs::read_to_string(g.join("agent.log")).unwrap_or_default())
            .collect();
        panic!(
            "{e:#}\n--- host agent ---\n{host_log}\n--- VBoxManage calls ---\n{calls}\n--- guest agents ---\n{guests}\n--- cluster ---\n{}",
            c.tail_logs()
        );
    }
    // Shown with --nocapture: when each order came and went.
    eprintln!(
        "--- host agent ---\n{}",
        std::fs::read_to_string(fake.dir.join("host-agent.log")).unwrap_or_default()
    );
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_servers_the_host_agent_finds_the_leader_and_either_server_adds_vms() {
    const OCTET: u8 = 46;
    let mut c = Cluster::up_with(
        OCTET,
        1,
        1,
        &["--servers", "2", "--providers", "virtualbox"],
    )
    .await
    .expect("corral up --servers 2");
    let fake = Fake::new(c.state_dir()).expect("fake VBoxManage");
    let mut guard = Guard {
        host: None,
        fake_dir: fake.dir.clone(),
    };
    let outcome = async {
        fake.make_base(OCTET).await?;
        let mut leader = None;
        let mut other = None;
        for address in [format!("127.0.{OCTET}.5"), format!("127.0.{OCTET}.6")] {
            let url = format!("http://{address}:7000");
            let health: serde_json::Value = c
                .http
                .get(format!("{url}/healthz"))
                .send()
                .await?
                .json()
                .await?;
            if health["leader"] == true {
                leader = Some(url);
            } else {
                other = Some(url);
            }
        }
        let (leader, other) = (
            leader.context("a leader")?,
            other.context("a server that does not lead")?,
        );

        // No host agent anywhere: the server that does not lead refuses too.
        let res = c
            .http
            .post(format!("{other}/api/v1/nodes"))
            .bearer_auth(&c.token)
            .json(&json!({"role": "web", "provider": "virtualbox"}))
            .send()
            .await?;
        assert_eq!(res.status(), 409);

        // The server that does not lead first: the host agent moves on.
        guard.host = Some(HostAgent::start_with(
            &c,
            &fake,
            None,
            &format!("{other},{leader}"),
        )?);
        let node = add_vbox_web_via(&c, &other).await?;
        assert_eq!(node, "nginx2");
        serving(&c, "nginx2", &["nginx1"]).await?;
        secret_taken_back(&fake, "corral-nginx2").await?;
        let log = std::fs::read_to_string(fake.dir.join("host-agent.log")).unwrap_or_default();
        anyhow::ensure!(
            log.contains("does not lead"),
            "the host agent never heard the other server refuse:\n{log}"
        );
        c.stop().await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let host_log = std::fs::read_to_string(fake.dir.join("host-agent.log")).unwrap_or_default();
        panic!(
            "{e:#}\n--- host agent ---\n{host_log}\n--- VBoxManage calls ---\n{}\n--- cluster ---\n{}",
            fake.calls().join("\n"),
            c.tail_logs()
        );
    }
    drop(guard);
}
