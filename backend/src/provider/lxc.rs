//! The LXC provider: every node of provider `lxc` is a Debian bookworm
//! container on a host bridge, at its own address (the seed's
//! 192.168.11.0/24 by default). Each container is an overlayfs snapshot clone
//! of one base image (Debian plus nginx, PostgreSQL 15 and Consul, built once
//! per host with debootstrap and cached); it boots its own systemd, installs
//! the project's `corral-agent` and `todomvc` packages, and systemd runs the
//! agent, which runs the node's services as it does anywhere.
//!
//! The host itself is adm1: the bridge carries adm1's address, so the control
//! plane (which has to run `lxc-*` here) and adm1's Consul server are at the
//! seed's adm1 address, and every container reaches them without NAT.
//!
//! Containers live in an lxcpath of the cluster's own (`<state>/lxc`), so
//! two clusters on one host, or the host's own containers, never meet; a
//! container there is only taken as a node's when its config carries the
//! marker line this provider writes.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use corral_proto::{Node, Provider};
use sha2::{Digest, Sha256};

use super::command::{self, run};
use super::{BootConfig, Machine, MachineState, Machines, ProviderError};
use crate::reconcile::addressing::Ula;

/// Bumped whenever the base image's recipe changes, so hosts build anew.
const IMAGE_RECIPE: &str = "bookworm-2";
/// The marker line in a container's config that makes it this provider's.
const MARKER: &str = "# corral-node:";
/// Where the agent keeps its state inside a container.
const AGENT_STATE_DIR: &str = "/var/lib/corral-agent";
/// The packages every container installs, by file name prefix.
const PACKAGES: [&str; 2] = ["corral-agent_", "todomvc_"];
/// Debian packages of the base image besides a minimal system.
const BASE_PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,ca-certificates,procps";
const SERVICE_PACKAGES: [&str; 5] = [
    "nginx-light",
    "postgresql-15",
    "postgresql-client-15",
    "consul",
    "nftables",
];

/// Where the provider keeps containers and how it wires them.
#[derive(Debug, Clone)]
pub struct LxcConfig {
    /// This cluster's containers (an lxcpath of their own).
    pub lxc_path: PathBuf,
    /// The base images, shared by every cluster on this host.
    pub image_path: PathBuf,
    /// The host bridge the containers sit on.
    pub bridge: String,
    /// The host's address on the bridge: adm1's, and the containers' gateway.
    pub host_address: Ipv4Addr,
    pub prefix_len: u8,
    /// The cluster's IPv6 prefix: the bridge and every container get the
    /// address of their IPv4 one in it (dual-stack). None: IPv4 only.
    pub ipv6: Option<Ula>,
    /// Directory holding the `.deb` packages the containers install
    /// (`scripts/package.sh` writes them to `target/debian`).
    pub debs_dir: PathBuf,
    /// The Debian mirror the base image is built from.
    pub mirror: String,
}

impl LxcConfig {
    /// Defaults for a cluster whose state is in `state_dir`, on
    /// `host_address/prefix_len` (adm1's address).
    pub fn new(state_dir: &Path, host_address: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            lxc_path: state_dir.join("lxc"),
            image_path: PathBuf::from("/var/lib/corral/images"),
            bridge: "corralbr0".into(),
            host_address,
            prefix_len,
            ipv6: None,
            debs_dir: default_debs_dir(),
            mirror: "http://deb.debian.org/debian".into(),
        }
    }

    fn image_name(&self) -> String {
        format!("corral-{IMAGE_RECIPE}")
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.lxc_path.join(name)
    }

    /// The overlay's upper directory: what the container wrote.
    fn delta(&self, name: &str) -> PathBuf {
        self.dir(name).join("overlay").join("delta")
    }
}

/// `target/debian` of the workspace this binary was built in when it exists,
/// else `/var/lib/corral/debs`.
pub fn default_debs_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        // target/{debug,release}/corral -> target/debian
        let target = exe.parent()?.parent()?;
        Some(target.join("debian"))
    });
    from_exe
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| PathBuf::from("/var/lib/corral/debs"))
}

/// The packages' files and what was last computed of them.
type StampCache = Option<(Vec<(PathBuf, u64, std::time::SystemTime)>, String)>;

pub struct LxcProvider {
    config: LxcConfig,
    /// Serialises base-image builds and the bridge set-up in this process.
    setup: tokio::sync::Mutex<bool>,
    /// The packages' stamp, hashed again only when a file changes.
    stamp: std::sync::Mutex<StampCache>,
    /// Serialises release-image builds in this process.
    release: tokio::sync::Mutex<()>,
}

impl LxcProvider {
    pub fn new(config: LxcConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            setup: tokio::sync::Mutex::new(false),
            stamp: std::sync::Mutex::new(None),
            release: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &LxcConfig {
        &self.config
    }

    fn lxc(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("-P").arg(&self.config.lxc_path);
        cmd
    }

    /// The packages to install and a stamp of their contents.
    fn packages(&self) -> Result<(Vec<PathBuf>, String), ProviderError> {
        let dir = &self.config.debs_dir;
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let mut chosen = Vec::new();
        for prefix in PACKAGES {
            let newest = entries
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
                })
                .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
                .cloned()
                .ok_or_else(|| ProviderError::Unavailable {
                    provider: Provider::Lxc,
                    reason: format!(
                        "no {prefix}*.deb in {}: build the packages with scripts/package.sh",
                        dir.display()
                    ),
                })?;
            chosen.push(newest);
        }
        let key: Vec<(PathBuf, u64, std::time::SystemTime)> = chosen
            .iter()
            .filter_map(|p| {
                let m = p.metadata().ok()?;
                Some((p.clone(), m.len(), m.modified().ok()?))
            })
            .collect();
        let mut cache = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_key, stamp)) = cache.as_ref()
            && *cached_key == key
        {
            return Ok((chosen, stamp.clone()));
        }
        let mut hasher = Sha256::new();
        for deb in &chosen {
            let bytes = std::fs::read(deb)
                .map_err(|e| ProviderError::Other(format!("cannot read {}: {e}", deb.display())))?;
            hasher.update(&bytes);
        }
        let stamp = hex::encode(&hasher.finalize()[..8]);
        *cache = Some((key, stamp.clone()));
        Ok((chosen, stamp))
    }

    /// Containers in this cluster's lxcpath that carry the marker.
    fn ours(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.lxc_path)
            .map(|d| {
                d.flatten()
                    .filter(|e| self.is_ours(&e.file_name().to_string_lossy()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn is_ours(&self, name: &str) -> bool {
        std::fs::read_to_string(self.config.dir(name).join("config"))
            .is_ok_and(|c| c.lines().any(|l| l.trim() == format!("{MARKER} {name}")))
    }

    async fn states(&self) -> Result<HashMap<String, String>, ProviderError> {
        if !self.config.lxc_path.is_dir() {
            return Ok(HashMap::new());
        }
        let out = run(
            self.lxc("lxc-ls").args(["-f", "-F", "NAME,STATE"]),
            Duration::from_secs(20),
        )
        .await?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect())
    }

    async fn state_of(&self, name: &str) -> Result<String, ProviderError> {
        let out = run(
            self.lxc("lxc-info").args(["-n", name, "-s", "-H"]),
            Duration::from_secs(20),
        )
        .await?;
        Ok(out.trim().to_string())
    }

    /// The bridge, made if missing, with the host's address and `more` of
    /// its own on it: the addresses of the further control-plane servers of
    /// `corral up --servers N` (adm2..), which the containers reach there.
    pub async fn ensure_bridge_with(&self, more: &[Ipv4Addr]) -> Result<(), ProviderError> {
        let _setup = self.setup.lock().await;
        self.ensure_bridge().await?;
        let c = &self.config;
        let addrs = run(
            Command::new("ip").args(["-o", "-4", "addr", "show", "dev", &c.bridge]),
            Duration::from_secs(10),
        )
        .await?;
        for address in more {
            let cidr = format!("{address}/{}", c.prefix_len);
            if !addrs.contains(&format!(" {cidr} ")) {
                run(
                    Command::new("ip").args(["addr", "add", &cidr, "dev", &c.bridge]),
                    Duration::from_secs(10),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// The bridge with the host's address on it, made if missing.
    async fn ensure_bridge(&self) -> Result<(), ProviderError> {
        let c = &self.config;
        let cidr = format!("{}/{}", c.host_address, c.prefix_len);
        let exists = run(
            Command::new("ip").args(["-o", "link", "show", "dev", &c.bridge]),
            Duration::from_secs(10),
        )
        .await
        .is_ok();
        if !exists {
            run(
                Command::new("ip").args(["link", "add", &c.bridge, "type", "bridge"]),
                Duration::from_secs(10),
            )
            .await?;
        }
        let addrs = run(
            Command::new("ip").args(["-o", "-4", "addr", "show", "dev", &c.bridge]),
            Duration::from_secs(10),
        )
        .await?;
        if !addrs.contains(&format!(" {cidr} ")) {
            run(
                Command::new("ip").args(["addr", "add", &cidr, "dev", &c.bridge]),
                Duration::from_secs(10),
            )
            .await?;
        }
        if let Some(ula) = c.ipv6 {
            // `nodad`: the address is the cluster's own, and a tentative
            // one could not be used for the second or so DAD takes.
            let cidr6 = format!("{}/64", ula.address(c.host_address));
            let addrs6 = run(
                Command::new("ip").args(["-o", "-6", "addr", "show", "dev", &c.bridge]),
                Duration::from_secs(10),
            )
            .await?;
            if !addrs6.contains(&format!(" {cidr6} ")) {
                run(
                    Command::new("ip")
                        .args(["-6", "addr", "add", &cidr6, "dev", &c.bridge, "nodad"]),
                    Duration::from_secs(10),
                )
                .await?;
            }
        }
        run(
            Command::new("ip").args(["link", "set", &c.bridge, "up"]),
            Duration::from_secs(10),
        )
        .await?;
        Ok(())
    }

    /// Builds the base image unless this host has it: debootstrap, then the
    /// service packages in a chroot (which uses the host's network, so no
    /// forwarding or NAT is ever needed), their own units masked.
    async fn ensure_image(&self) -> Result<(), ProviderError> {
        let c = &self.config;
        let name = c.image_name();
        let dir = c.image_path.join(&name);
        let done = dir.join("rootfs").join("etc").join("corral-image");
        if done.is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&c.image_path).map_err(|e| {
            ProviderError::Other(format!("cannot create {}: {e}", c.image_path.display()))
        })?;
        // One builder per host: other processes wait on the lock.
        let lock_path = c.image_path.join(format!("{name}.lock"));
        let lock = lock_image_build(&lock_path).await?;
        if done.is_file() {
            drop(lock);
            return Ok(());
        }
        let started = Instant::now();
        let say = |step: &str| {
            eprintln!(
                "  lxc image {name}: {step} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        };
        let work = c.image_path.join(format!("{name}.building"));
        let _ = std::fs::remove_dir_all(&work);
        let rootfs = work.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| {
            ProviderError::Other(format!("cannot create {}: {e}", rootfs.display()))
        })?;
        say("debootstrap bookworm (once per host, about 2 minutes)");
        run(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={BASE_PACKAGES}"))
                .arg("bookworm")
                .arg(&rootfs)
                .arg(&c.mirror),
            Duration::from_secs(1200),
        )
        .await?;
        say("nginx, PostgreSQL 15 and consul (bullseye) in the image");
        let write = |path: &str, text: &str| -> Result<(), ProviderError> {
            let full = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    ProviderError::Other(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            std::fs::write(&full, text)
                .map_err(|e| ProviderError::Other(format!("cannot write {}: {e}", full.display())))
        };
        write(
            "/etc/apt/sources.list.d/bullseye.sources",
            &format!(
                "Types: deb\nURIs: {}\nSuites: bullseye\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                c.mirror
            ),
        )?;
        write(
            "/etc/apt/preferences.d/bullseye",
            "Package: *\nPin: release n=bullseye\nPin-Priority: 100\n",
        )?;
        // Packages must not start daemons: the agent runs them itself.
        write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n")?;
        set_mode(&rootfs.join("usr/sbin/policy-rc.d"), 0o755)?;
        write(
            "/etc/postgresql-common/createcluster.d/corral.conf",
            "create_main_cluster = false\n",
        )?;
        let chroot = |args: &[&str]| {
            let mut cmd = Command::new("chroot");
            cmd.arg(&rootfs)
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            cmd
        };
        run(
            &mut chroot(&["apt-get", "update", "-qq"]),
            Duration::from_secs(600),
        )
        .await?;
        let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
        install.extend(SERVICE_PACKAGES);
        run(&mut chroot(&install), Duration::from_secs(1200)).await?;
        run(&mut chroot(&["apt-get", "clean"]), Duration::from_secs(120)).await?;
        // Their own units stay off: the agent supervises them.
        for unit in ["nginx.service", "postgresql.service", "consul.service"] {
            let link = rootfs.join("etc/systemd/system").join(unit);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("/dev/null", &link)
                .map_err(|e| ProviderError::Other(format!("cannot mask {unit}: {e}")))?;
        }
        // No network configuration of its own: LXC sets the address.
        let _ = std::fs::remove_file(rootfs.join("etc/network/interfaces"));
        write("/etc/hostname", "corral\n")?;
        write(
            "/etc/corral-image",
            &format!(
                "{IMAGE_RECIPE}\nbuilt {}\n",
                chrono::Utc::now().to_rfc3339()
            ),
        )?;
        move_image_into_place(&work, &dir, &name)?;
        say("ready");
        drop(lock);
        Ok(())
    }

    /// Refuses a new container whose name or address is taken.
    async fn check_free(&self, node: &Node) -> Result<(), ProviderError> {
        let dir = self.config.dir(&node.name);
        if dir.exists() && !self.is_ours(&node.name) {
            return Err(ProviderError::Refused(format!(
                "a container named {} already exists in {} and is not one of corral's",
                node.name,
                self.config.lxc_path.display()
            )));
        }
        let addresses = run(
            Command::new("ip").args(["-o", "-4", "addr", "show"]),
            Duration::from_secs(10),
        )
        .await?;
        if addresses.contains(&format!(" {}/", node.address)) {
            return Err(ProviderError::Refused(format!(
                "address {} is already taken by this host",
                node.address
            )));
        }
        for other in self.ours() {
            if other == node.name {
                continue;
            }
            let config =
                std::fs::read_to_string(self.config.dir(&other).join("config")).unwrap_or_default();
            if config.contains(&format!("= {}/", node.address)) {
                return Err(ProviderError::Refused(format!(
                    "address {} is already taken by container {other}",
                    node.address
                )));
            }
        }
        // Containers of the host's default lxcpath, running or not.
        if let Ok(out) = run(
            Command::new("lxc-ls").args(["-f", "-F", "NAME,IPV4"]),
            Duration::from_secs(20),
        )
        .await
        {
            for line in out.lines().skip(1) {
                let mut parts = line.split_whitespace();
                let name = parts.next().unwrap_or_default();
                if parts.any(|a| a.trim_end_matches(',') == node.address) {
                    return Err(ProviderError::Refused(format!(
                        "address {} is already taken by the host's container {name}",
                        node.address
                    )));
                }
            }
        }
        Ok(())
    }

    /// The container's LXC config: the clone's rootfs, our marker, the
    /// bridge and the node's static address.
    fn write_config(&self, node: &Node) -> Result<(), ProviderError> {
        let c = &self.config;
        let path = c.dir(&node.name).join("config");
        let current = std::fs::read_to_string(&path)
            .map_err(|e| ProviderError::Other(format!("cannot read {}: {e}", path.display())))?;
        let rootfs = current
            .lines()
            .find(|l| l.trim_start().starts_with("lxc.rootfs.path"))
            .ok_or_else(|| ProviderError::Other(format!("{} names no rootfs", path.display())))?;
        let text = format!(
            "{MARKER} {name}\n\
             lxc.include = /usr/share/lxc/config/common.conf\n\
             lxc.arch = linux64\n\
             lxc.apparmor.profile = unconfined\n\
             {rootfs}\n\
             lxc.uts.name = {name}\n\
             lxc.net.0.type = veth\n\
             lxc.net.0.link = {bridge}\n\
             lxc.net.0.flags = up\n\
             lxc.net.0.name = eth0\n\
             lxc.net.0.ipv4.address = {address}/{prefix}\n\
             lxc.net.0.ipv4.gateway = {gateway}\n{ipv6}{hwaddr}",
            name = node.name,
            bridge = c.bridge,
            address = node.address,
            prefix = c.prefix_len,
            gateway = c.host_address,
            ipv6 = match (c.ipv6, node.address.parse::<Ipv4Addr>()) {
                // The address is tentative for the second or so of
                // duplicate address detection after the container starts,
                // and a bind to it fails meanwhile (nginx -t of an order
                // applied that early failed, seen on a fresh web node):
                // binding to an address not (yet) usable is allowed.
                (Some(ula), Ok(v4)) => format!(
                    "lxc.net.0.ipv6.address = {}/64\nlxc.sysctl.net.ipv6.ip_nonlocal_bind = 1\n",
                    ula.address(v4)
                ),
                _ => String::new(),
            },
            hwaddr = node
                .address
                .parse()
                .map(|ip| format!("lxc.net.0.hwaddr = {}\n", mac_for(ip)))
                .unwrap_or_default(),
        );
        write_atomic(&path, text.as_bytes(), 0o644)
    }

    /// Files the container needs before it boots, written into its overlay:
    /// the agent's config (with the node's enrollment secret, 0600), name and hosts, the
    /// packages.
    fn seed_files(
        &self,
        node: &Node,
        boot: &BootConfig,
        packages: &[PathBuf],
    ) -> Result<(), ProviderError> {
        let delta = self.config.delta(&node.name);
        let mut conf = format!(
            "# written by corral's lxc provider\nserver = {}\nnode = {}\naddress = {}\nstate-dir = {AGENT_STATE_DIR}\nenroll-secret = {}\nfirewall = on\nsyslog = auto\n",
            boot.server_url, node.name, node.address, boot.secret
        );
        if let Some(ca) = &boot.ca_pem {
            write_atomic(&delta.join("etc/corral/ca.pem"), ca.as_bytes(), 0o644)?;
            conf.push_str("ca-file = /etc/corral/ca.pem\n");
        }
        write_atomic(&delta.join("etc/corral/agent.conf"), conf.as_bytes(), 0o600)?;
        write_atomic(
            &delta.join("etc/hostname"),
            format!("{}\n", node.name).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &delta.join("etc/hosts"),
            format!(
                "127.0.0.1 localhost\n{} {}\n::1 localhost ip6-localhost ip6-loopback\n",
                node.address, node.name
            )
            .as_bytes(),
            0o644,
        )?;
        let debs = delta.join("var/cache/corral/debs");
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs)
            .map_err(|e| ProviderError::Other(format!("cannot create {}: {e}", debs.display())))?;
        for deb in packages {
            let to = debs.join(deb.file_name().unwrap_or_default());
            std::fs::copy(deb, &to).map_err(|e| {
                ProviderError::Other(format!(
                    "cannot copy {} into {}: {e}",
                    deb.display(),
                    node.name
                ))
            })?;
        }
        Ok(())
    }

    /// The stamp of the packages a container has: written in its overlay
    /// when they were installed there, else that of the image it was cloned
    /// from.
    fn installed_stamp(&self, name: &str) -> Option<String> {
        let stamp = "var/lib/corral/packages";
        let read = |dir: &Path| {
            std::fs::read_to_string(dir.join(stamp))
                .ok()
                .map(|s| s.trim().to_string())
        };
        read(&self.config.delta(name)).or_else(|| {
            let config = std::fs::read_to_string(self.config.dir(name).join("config")).ok()?;
            let lower = config.lines().find_map(|l| {
                let spec = l.trim().strip_prefix("lxc.rootfs.path")?;
                let spec = spec.trim_start().strip_prefix('=')?.trim();
                let rest = spec
                    .strip_prefix("overlay:")
                    .or_else(|| spec.strip_prefix("overlayfs:"))?;
                rest.split(':').next().map(PathBuf::from)
            })?;
            read(&lower)
        })
    }

    /// The image new containers are cloned from: the base image with this
    /// build's packages installed (`dpkg -i` in a chroot) and the agent's
    /// unit enabled, made once per build of the packages. Images of older
    /// builds that no container uses any more are deleted.
    async fn ensure_release(
        &self,
        stamp: &str,
        packages: &[PathBuf],
    ) -> Result<String, ProviderError> {
        let c = &self.config;
        let base = c.image_name();
        let name = format!("{base}-{stamp}");
        let dir = c.image_path.join(&name);
        let done = dir.join("rootfs/var/lib/corral/packages");
        if done.is_file() {
            return Ok(name);
        }
        let _one = self.release.lock().await;
        let lock_path = c.image_path.join(format!("{name}.lock"));
        let lock = lock_image_build(&lock_path).await?;
        if done.is_file() {
            drop(lock);
            return Ok(name);
        }
        let started = Instant::now();
        let work = c.image_path.join(format!("{name}.building"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .map_err(|e| ProviderError::Other(format!("cannot create {}: {e}", work.display())))?;
        let rootfs = work.join("rootfs");
        run(
            Command::new("cp")
                .arg("-a")
                .arg(c.image_path.join(&base).join("rootfs"))
                .arg(&rootfs),
            Duration::from_secs(900),
        )
        .await?;
        let debs_dir = rootfs.join("var/cache/corral/debs");
        std::fs::create_dir_all(&debs_dir).map_err(|e| {
            ProviderError::Other(format!("cannot create {}: {e}", debs_dir.display()))
        })?;
        let mut args = vec![
            rootfs.to_string_lossy().into_owned(),
            "dpkg".into(),
            "-i".into(),
            "--force-confdef".into(),
            "--force-confold".into(),
        ];
        for deb in packages {
            let file = deb.file_name().unwrap_or_default();
            std::fs::copy(deb, debs_dir.join(file))
                .map_err(|e| ProviderError::Other(format!("cannot copy {}: {e}", deb.display())))?;
            args.push(format!("/var/cache/corral/debs/{}", file.to_string_lossy()));
        }
        run(
            Command::new("chroot")
                .args(&args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            Duration::from_secs(600),
        )
        .await?;
        run(
            Command::new("systemctl")
                .arg(format!("--root={}", rootfs.display()))
                .args(["enable", "corral-agent.service"]),
            Duration::from_secs(60),
        )
        .await?;
        let _ = std::fs::remove_dir_all(&debs_dir);
        write_atomic(
            &rootfs.join("var/lib/corral/packages"),
            format!("{stamp}\n").as_bytes(),
            0o644,
        )?;
        move_image_into_place(&work, &dir, &name)?;
        drop(lock);
        let _ = std::fs::remove_file(&lock_path);
        tracing::info!(image = %name, secs = started.elapsed().as_secs_f64(), "release image made");
        self.forget_old_releases(&base, &name);
        Ok(name)
    }

    /// Deletes the images of other builds that no container was cloned from
    /// (or whose clones are all gone).
    fn forget_old_releases(&self, base: &str, keep: &str) {
        let Ok(dirs) = std::fs::read_dir(&self.config.image_path) else {
            return;
        };
        for entry in dirs.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == keep
                || !name.starts_with(&format!("{base}-"))
                || name.ends_with(".building")
                || name.ends_with(".lock")
            {
                continue;
            }
            // lxc-copy lists every clone in the image's lxc_snapshots:
            // lines of lxcpath, then name.
            let clones =
                std::fs::read_to_string(entry.path().join("lxc_snapshots")).unwrap_or_default();
            let lines: Vec<&str> = clones.lines().collect();
            let used = lines.chunks(2).any(|pair| {
                pair.len() == 2 && Path::new(pair[0]).join(pair[1]).join("config").is_file()
            });
            if !used {
                tracing::info!(image = %name, "deleting an unused image of an older build");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Runs a command inside the container.
    async fn attach(
        &self,
        name: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<String, ProviderError> {
        let mut cmd = self.lxc("lxc-attach");
        cmd.args(["-n", name, "--clear-env", "--"]).args(args);
        cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        run(&mut cmd, limit).await
    }

    /// Waits until the container's systemd answers (it boots in about a
    /// second; lxc-attach fails until its bus is up).
    async fn wait_booted(&self, name: &str) -> Result<(), ProviderError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = self
                .attach(
                    name,
                    &["systemctl", "is-system-running", "--wait"],
                    Duration::from_secs(60),
                )
                .await;
            match last {
                Ok(_) => return Ok(()),
                // `degraded` still boots the agent: some unit failed.
                Err(ProviderError::Command { ref stderr, .. }) if stderr.contains("degraded") => {
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(ProviderError::Other(format!(
                        "{name} did not finish booting within 60 s: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[async_trait]
impl Machines for LxcProvider {
    fn kind(&self) -> Provider {
        Provider::Lxc
    }

    async fn preflight(&self) -> Result<(), ProviderError> {
        let unavailable = |reason: String| ProviderError::Unavailable {
            provider: Provider::Lxc,
            reason,
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(unavailable(
                "it needs root (containers, the bridge and the base image)".into(),
            ));
        }
        let missing: Vec<&str> = [
            "lxc-copy",
            "lxc-start",
            "lxc-stop",
            "lxc-attach",
            "lxc-info",
            "lxc-ls",
            "lxc-destroy",
            "lxc-wait",
            "debootstrap",
            "chroot",
            "ip",
        ]
        .into_iter()
        .filter(|tool| !command::on_path(tool))
        .collect();
        if !missing.is_empty() {
            return Err(unavailable(format!(
                "{} not found (apt-get install lxc debootstrap iproute2)",
                missing.join(", ")
            )));
        }
        self.packages()?;
        let mut ready = self.setup.lock().await;
        if !*ready {
            self.ensure_bridge().await.map_err(|e| {
                unavailable(format!(
                    "cannot set up the bridge {}: {e}",
                    self.config.bridge
                ))
            })?;
            self.ensure_image().await?;
            std::fs::create_dir_all(&self.config.lxc_path).map_err(|e| {
                unavailable(format!(
                    "cannot create {}: {e}",
                    self.config.lxc_path.display()
                ))
            })?;
            *ready = true;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Vec<Machine>, ProviderError> {
        let ours = self.ours();
        if ours.is_empty() {
            return Ok(Vec::new());
        }
        let states = self.states().await?;
        let stamp = self.packages().ok().map(|(_, s)| s);
        Ok(ours
            .into_iter()
            .map(|name| {
                let state = match states.get(&name).map(String::as_str) {
                    Some("FROZEN") | Some("FREEZING") => MachineState::Frozen,
                    // Running counts only once provisioning finished.
                    Some("RUNNING")
                        if self.installed_stamp(&name).is_some()
                            && (stamp.is_none() || self.installed_stamp(&name) == stamp) =>
                    {
                        MachineState::Running
                    }
                    _ => MachineState::Stopped,
                };
                Machine { name, state }
            })
            .collect())
    }

    async fn ensure(&self, node: &Node, boot: &BootConfig) -> Result<String, ProviderError> {
        self.preflight().await?;
        let (packages, stamp) = self.packages()?;
        let name = node.name.as_str();
        let mut steps = Steps::default();
        if !self.is_ours(name) {
            self.check_free(node).await?;
            let image = self.ensure_release(&stamp, &packages).await?;
            steps.done("image ready");
            let _ = std::fs::remove_dir_all(self.config.dir(name));
            run(
                Command::new("lxc-copy")
                    .arg("-P")
                    .arg(&self.config.image_path)
                    .args(["-n", &image])
                    .arg("-p")
                    .arg(&self.config.lxc_path)
                    .args(["-N", name, "-s", "-B", "overlayfs"]),
                Duration::from_secs(120),
            )
            .await?;
            self.write_config(node)?;
            steps.done("cloned");
        }
        let mut state = self.state_of(name).await?;
        if state == "FROZEN" {
            run(
                self.lxc("lxc-unfreeze").args(["-n", name]),
                Duration::from_secs(30),
            )
            .await?;
            state = self.state_of(name).await?;
        }
        let current = self.installed_stamp(name).as_deref() == Some(stamp.as_str());
        if state == "STOPPED" {
            self.write_config(node)?;
            self.seed_files(node, boot, if current { &[] } else { &packages })?;
            run(
                self.lxc("lxc-start").args(["-n", name]),
                Duration::from_secs(60),
            )
            .await?;
            run(
                self.lxc("lxc-wait")
                    .args(["-n", name, "-s", "RUNNING", "-t", "30"]),
                Duration::from_secs(40),
            )
            .await?;
            steps.done("started");
            if current {
                // Its image has this build's packages and the agent's unit
                // enabled: its own systemd starts the agent.
                return Ok(format!("container running: {}", steps.0.join(", ")));
            }
        }
        self.wait_booted(name).await?;
        steps.done("booted");
        if !current {
            // Made from an older build's image: upgrade in place.
            let debs: Vec<String> = packages
                .iter()
                .filter_map(|p| {
                    p.file_name()
                        .map(|n| format!("/var/cache/corral/debs/{}", n.to_string_lossy()))
                })
                .collect();
            let mut args = vec!["dpkg", "-i", "--force-confdef", "--force-confold"];
            args.extend(debs.iter().map(String::as_str));
            self.attach(name, &args, Duration::from_secs(300)).await?;
            self.attach(
                name,
                &["systemctl", "enable", "corral-agent.service"],
                Duration::from_secs(60),
            )
            .await?;
            self.attach(
                name,
                &["systemctl", "restart", "corral-agent.service"],
                Duration::from_secs(60),
            )
            .await?;
            let script =
                format!("mkdir -p /var/lib/corral && echo {stamp} > /var/lib/corral/packages");
            self.attach(name, &["sh", "-c", &script], Duration::from_secs(30))
                .await?;
            steps.done("packages installed, agent started");
        } else {
            self.attach(
                name,
                &["systemctl", "start", "corral-agent.service"],
                Duration::from_secs(60),
            )
            .await?;
            steps.done("agent running");
        }
        Ok(format!("container running: {}", steps.0.join(", ")))
    }

    async fn stop(&self, name: &str) -> Result<(), ProviderError> {
        if !self.is_ours(name) {
            return Ok(());
        }
        let state = self.state_of(name).await?;
        if state == "STOPPED" {
            return Ok(());
        }
        if state == "FROZEN" {
            run(
                self.lxc("lxc-unfreeze").args(["-n", name]),
                Duration::from_secs(30),
            )
            .await?;
        }
        // The agent stops its services in order (PostgreSQL's fast
        // shutdown); systemd's own shutdown would send every one SIGTERM.
        let stopped = self
            .attach(
                name,
                &["sh", "-c", "systemctl stop corral-agent.service; corral-agent stop-all --state-dir /var/lib/corral-agent"],
                Duration::from_secs(90),
            )
            .await;
        if let Err(e) = stopped {
            tracing::warn!(node = name, error = %e, "stopping the services in order failed");
        }
        run(
            self.lxc("lxc-stop").args(["-n", name, "-t", "30"]),
            Duration::from_secs(60),
        )
        .await?;
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<(), ProviderError> {
        if !self.is_ours(name) {
            return Ok(());
        }
        let state = self.state_of(name).await.unwrap_or_default();
        if state == "FROZEN" {
            let _ = run(
                self.lxc("lxc-unfreeze").args(["-n", name]),
                Duration::from_secs(30),
            )
            .await;
        }
        if state != "STOPPED" {
            // Its data goes with it: no clean shutdown needed.
            run(
                self.lxc("lxc-stop").args(["-n", name, "-k"]),
                Duration::from_secs(60),
            )
            .await?;
        }
        run(
            self.lxc("lxc-destroy").args(["-n", name]),
            Duration::from_secs(120),
        )
        .await?;
        Ok(())
    }
}

/// Takes the host-wide lock on one image's build: other processes wait.
async fn lock_image_build(path: &Path) -> Result<std::fs::File, ProviderError> {
    let lock = std::fs::File::create(path)
        .map_err(|e| ProviderError::Other(format!("cannot create {}: {e}", path.display())))?;
    tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .map_err(|e| ProviderError::Other(e.to_string()))?
        .map_err(|e| ProviderError::Other(format!("cannot lock the image build: {e}")))
}

/// Gives a finished image under `work` its LXC config (a plain rootfs at
/// its final place) and renames it in as `dir`.
fn move_image_into_place(work: &Path, dir: &Path, name: &str) -> Result<(), ProviderError> {
    std::fs::write(
        work.join("config"),
        format!(
            "lxc.include = /usr/share/lxc/config/common.conf\nlxc.arch = linux64\nlxc.uts.name = {name}\nlxc.rootfs.path = dir:{}\nlxc.apparmor.profile = unconfined\n",
            dir.join("rootfs").display()
        ),
    )
    .map_err(|e| ProviderError::Other(format!("cannot write the image config: {e}")))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(work, dir).map_err(|e| {
        ProviderError::Other(format!("cannot move the image into {}: {e}", dir.display()))
    })
}

/// What `ensure` did, each step with the time it took.
struct Steps(Vec<String>, Instant);

impl Default for Steps {
    fn default() -> Self {
        Steps(Vec::new(), Instant::now())
    }
}

impl Steps {
    fn done(&mut self, what: &str) {
        self.0
            .push(format!("{what} {:.1} s", self.1.elapsed().as_secs_f64()));
        self.1 = Instant::now();
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ProviderError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ProviderError::Other(format!("cannot chmod {}: {e}", path.display())))
}

/// Writes a file whole: temp file, fsync, rename.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ProviderError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err =
        |e: std::io::Error| ProviderError::Other(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("corral-tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The MAC address of the container at `ip`: locally administered, fixed
/// per address. A node made again at the same address (a web node removed
/// and added back) then keeps its MAC, so its peers' ARP caches stay right;
/// with a random one they kept sending to the gone container's MAC until
/// their neighbour entries timed out, seconds in which the new node was
/// unreachable.
pub fn mac_for(ip: std::net::Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:43:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_mac_across_machines_at_its_address() {
        assert_eq!(mac_for([192, 168, 11, 23].into()), "02:43:c0:a8:0b:17");
        assert_ne!(
            mac_for([192, 168, 11, 23].into()),
            mac_for([192, 168, 11, 24].into())
        );
    }
}
