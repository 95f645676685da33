//! The host agent's VirtualBox machines against `testkit/fake-vboxmanage`
//! (no cluster): what is refused before anything is cloned, and a VM whose
//! guest never reports its agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_agent::vbox::VBoxManage;
use corral_agent::virtualbox::{GuestBoot, VirtualBox, VirtualBoxConfig};
use corral_proto::Role;

/// A fake VirtualBox in a temporary directory: `VBoxManage` there is a
/// wrapper that runs the fake with its records beside it, and whose "VMs"
/// run `guest` instead of a corral-agent.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new(guest: &str) -> Fake {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/fake-vboxmanage");
        let wrapper = dir.path().join("VBoxManage");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nFAKE_VBOX_DIR={}/records FAKE_VBOX_AGENT={guest} exec {} \"$@\"\n",
                dir.path().display(),
                fake.display()
            ),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Fake { dir }
    }

    fn program(&self) -> PathBuf {
        self.dir.path().join("VBoxManage")
    }

    fn run(&self, args: &[&str]) {
        let out = std::process::Command::new(self.program())
            .args(args)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stdout(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(self.program())
            .args(args)
            .output()
            .expect("runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("records/calls.log")).unwrap_or_default()
    }

    /// The base VM with its snapshot and the host-only network.
    fn seeded(guest: &str) -> Fake {
        let fake = Fake::new(guest);
        fake.run(&[
            "createvm",
            "--name",
            "corral-base",
            "--groups",
            "/corral-base",
            "--register",
        ]);
        fake.run(&["snapshot", "corral-base", "take", "base"]);
        fake.run(&["hostonlyif", "create"]);
        fake
    }

    fn machines(&self, boot_timeout: Duration) -> VirtualBox {
        VirtualBox::new(VirtualBoxConfig {
            vbox: VBoxManage {
                limit: Duration::from_secs(30),
                ..VBoxManage::new(self.program())
            },
            base_vm: "corral-base".into(),
            base_snapshot: "base".into(),
            hostonly_network: "vboxnet0".into(),
            vm_prefix: "corral-".into(),
            vm_group: "/corral".into(),
            memory_mb: 1024,
            cpus: 1,
            boot_timeout,
        })
    }
}

fn boot() -> GuestBoot<'static> {
    GuestBoot {
        node: "nginx3",
        role: Role::Web,
        address: "127.0.99.23",
        server_url: "http://127.0.99.5:7000",
        secret: "s3cret",
        ca: None,
    }
}

#[tokio::test]
async fn a_missing_base_vm_snapshot_or_network_is_refused_before_cloning() {
    // No base VM at all: VirtualBox's own words.
    let fake = Fake::new("/bin/true");
    let err = fake
        .machines(Duration::from_secs(5))
        .ensure(&boot())
        .await
        .expect_err("no base VM");
    assert!(
        err.message
            .contains("Could not find a registered machine named 'corral-base'"),
        "{}",
        err.message
    );

    // A base VM without the snapshot.
    fake.run(&["createvm", "--name", "corral-base", "--register"]);
    let err = fake
        .machines(Duration::from_secs(5))
        .ensure(&boot())
        .await
        .expect_err("no snapshot");
    assert!(
        err.message.contains("has no snapshot \"base\""),
        "{}",
        err.message
    );

    // The snapshot, but no host-only network.
    fake.run(&["snapshot", "corral-base", "take", "base"]);
    let err = fake
        .machines(Duration::from_secs(5))
        .ensure(&boot())
        .await
        .expect_err("no network");
    assert!(
        err.message
            .contains("there is no host-only network vboxnet0"),
        "{}",
        err.message
    );
    assert!(!err.permanent);
    assert!(!fake.calls().contains("clonevm"), "{}", fake.calls());
}

#[tokio::test]
async fn a_vm_of_that_name_that_is_not_corrals_is_left_alone() {
    let fake = Fake::seeded("/bin/true");
    fake.run(&["createvm", "--name", "corral-nginx3", "--register"]);
    let machines = fake.machines(Duration::from_secs(5));
    let err = machines.ensure(&boot()).await.expect_err("taken");
    assert!(
        err.message.contains("exists and is not corral's"),
        "{}",
        err.message
    );
    let err = machines.destroy("nginx3").await.expect_err("not ours");
    assert!(err.message.contains("is not corral's"), "{}", err.message);
    assert!(machines.inventory().await.expect("lists").is_empty());
    let calls = fake.calls();
    assert!(
        !calls.contains("clonevm") && !calls.contains("unregistervm"),
        "{calls}"
    );
}

#[tokio::test]
async fn a_vm_whose_agent_never_reports_fails_for_good_with_its_last_state() {
    // The "guest" runs /bin/true: it boots and never enrolls.
    let fake = Fake::seeded("/bin/true");
    let machines = fake.machines(Duration::from_secs(1));
    let err = machines.ensure(&boot()).await.expect_err("never reports");
    assert!(err.permanent, "not to be retried: {}", err.message);
    assert!(
        err.message
            .contains("corral-nginx3 did not report its agent within 1 s"),
        "{}",
        err.message
    );
    assert!(err.message.contains("VMState=Running"), "{}", err.message);
    assert!(
        err.message.contains("/corral/agent=booting"),
        "{}",
        err.message
    );
    // Powered off, kept for its logs, the secret taken back.
    let info = fake.stdout(&["showvminfo", "corral-nginx3", "--machinereadable"]);
    assert!(info.contains("VMState=\"poweroff\""), "{info}");
    let secret = fake.stdout(&["guestproperty", "get", "corral-nginx3", "/corral/secret"]);
    assert_eq!(secret.trim(), "No value set!");
}
