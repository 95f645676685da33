//! The VirtualBox guest's first-boot script (`debian/vbox/corral-vbox-
//! firstboot`) against stand-ins for what only a VM has: `VBoxControl`
//! reading guest properties from files, and `ip`, `hostname`, `systemctl`
//! and `journalctl` that log what they are asked. The real corral-agent
//! says which key its enrollment secret goes under.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    /// A guest with these guest properties; `enrolls`: whether starting
    /// corral-agent.service gives the agent its node token.
    fn new(props: &[(&str, &str)], enrolls: bool) -> Guest {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for sub in ["bin", "props", "root/etc/corral", "state"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        for (name, value) in props {
            std::fs::write(d.join("props").join(name.replace('/', "_")), value).expect("prop");
        }
        let log = d.join("calls.log");
        let script = |name: &str, body: String| {
            let path = d.join("bin").join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        let props_dir = d.join("props");
        script(
            "VBoxControl",
            format!(
                r#"[ "$1" = --nologo ] && shift
f={props}/$(echo "$3" | tr / _)
case "$2" in
  get) if [ -f "$f" ]; then echo "Value: $(cat "$f")"; else echo "No value set!"; fi ;;
  set) echo "$4" > "$f"; echo "VBoxControl set $3 $4" >> {log} ;;
esac"#,
                props = props_dir.display(),
                log = log.display()
            ),
        );
        for tool in ["ip", "hostname", "journalctl"] {
            script(
                tool,
                format!(
                    "[ \"{tool}\" = hostname ] && [ $# = 0 ] && {{ echo localhost; exit 0; }}\necho \"{tool} $*\" >> {log}",
                    log = log.display()
                ),
            );
        }
        let token = d.join("state/node-token");
        script(
            "systemctl",
            format!(
                "echo \"systemctl $*\" >> {log}\n{enroll}",
                log = log.display(),
                enroll = if enrolls {
                    format!("echo corral-node-token > {}", token.display())
                } else {
                    String::new()
                }
            ),
        );
        // The real agent, under the name the script calls.
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_corral-agent"),
            d.join("bin/corral-agent"),
        )
        .expect("symlink");
        Guest { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn boot(&self) -> std::process::Output {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/vbox/corral-vbox-firstboot");
        Command::new("sh")
            .arg(script)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.path("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("VBOXCONTROL", self.path("bin/VBoxControl"))
            .env("CORRAL_AGENT_CONF", self.path("root/etc/corral/agent.conf"))
            .env("CORRAL_AGENT_STATE_DIR", self.path("state"))
            .env("CORRAL_ROOT", self.path("root"))
            .env("CORRAL_IFACE", "enp0s8")
            .env("CORRAL_ENROLL_TIMEOUT", "1")
            .output()
            .expect("runs")
    }

    fn prop(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path("props").join(name.replace('/', "_")))
            .ok()
            .map(|v| v.trim().to_string())
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.path("calls.log")).unwrap_or_default()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }
}

const BOOT: [(&str, &str); 6] = [
    ("/corral/server", "http://192.168.11.5:7000"),
    ("/corral/node", "nginx3"),
    ("/corral/role", "web"),
    ("/corral/address", "192.168.11.23"),
    ("/corral/netmask", "255.255.255.0"),
    ("/corral/secret", "corral-secret-123"),
];

#[test]
fn a_clone_configures_its_interface_writes_agent_conf_and_reports_enrolled() {
    let guest = Guest::new(&BOOT, true);
    let out = guest.boot();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = guest.calls();
    assert!(
        calls.contains("ip addr replace 192.168.11.23/24 dev enp0s8"),
        "{calls}"
    );
    assert!(calls.contains("hostname nginx3"), "{calls}");
    assert!(
        calls.contains("systemctl restart corral-agent.service"),
        "{calls}"
    );
    assert_eq!(guest.prop("/corral/agent").as_deref(), Some("enrolled"));
    let conf = guest.read("root/etc/corral/agent.conf");
    for line in [
        "server = http://192.168.11.5:7000",
        "node = nginx3",
        "address = 192.168.11.23",
    ] {
        assert!(conf.contains(line), "{line} in {conf}");
    }
    // Single use: once the agent enrolled, the secret left the guest's disk.
    assert!(!conf.contains("corral-secret-123"), "{conf}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(guest.path("root/etc/corral/agent.conf"))
            .expect("conf")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "agent.conf is private: {mode:o}");
    let iface = guest.read("root/etc/network/interfaces.d/corral-enp0s8");
    assert!(iface.contains("iface enp0s8 inet static"), "{iface}");
    assert!(iface.contains("address 192.168.11.23/24"), "{iface}");
    assert_eq!(guest.read("root/etc/hostname").trim(), "nginx3");
}

#[test]
fn a_tls_control_planes_ca_reaches_the_agent_conf_whole() {
    let ca = "-----BEGIN CERTIFICATE-----\nMIIBfake\nline2\n-----END CERTIFICATE-----";
    let mut props = BOOT.to_vec();
    props.push(("/corral/ca", ca));
    props[0] = ("/corral/server", "https://192.168.11.5:7000");
    let guest = Guest::new(&props, true);
    let out = guest.boot();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = guest.read("root/etc/corral/ca.pem");
    assert_eq!(pem.trim(), ca, "every line of the PEM");
    let conf = guest.read("root/etc/corral/agent.conf");
    let wanted = format!(
        "ca-file = {}",
        guest.path("root/etc/corral/ca.pem").display()
    );
    assert!(conf.contains(&wanted), "{wanted} in {conf}");
    assert!(
        conf.contains("server = https://192.168.11.5:7000"),
        "{conf}"
    );
    assert!(!conf.contains("corral-secret-123"), "{conf}");
}

#[test]
fn a_vm_without_corrals_properties_is_left_alone() {
    let guest = Guest::new(&[], true);
    let out = guest.boot();
    assert!(out.status.success());
    assert_eq!(guest.calls(), "");
    assert!(!guest.path("root/etc/corral/agent.conf").exists());
}

#[test]
fn an_agent_that_never_enrolls_is_reported_failed() {
    let guest = Guest::new(&BOOT, false);
    let out = guest.boot();
    assert!(!out.status.success());
    let state = guest.prop("/corral/agent").unwrap_or_default();
    assert!(
        state.starts_with("failed: the agent did not enroll within 1 s"),
        "{state}"
    );
}
