//! A typed `VBoxManage`: one function per command the VirtualBox host agent
//! uses, each returning what it parsed from VirtualBox's machine-readable
//! output. Every call runs in a process group of its own, is killed at a time
//! limit, and fails with VBoxManage's stderr and exit status; calls that meet
//! a lock VirtualBox documents as passing (`VBOX_E_INVALID_OBJECT_STATE`, a
//! session still locked by a VM process that is ending) are tried again.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// Where and how VBoxManage is run.
#[derive(Debug, Clone)]
pub struct VBoxManage {
    pub program: PathBuf,
    /// Longest one call may take (a linked clone is quick; a full one is not
    /// asked for).
    pub limit: Duration,
    /// How often a call that met a passing lock is tried in all.
    pub attempts: u32,
    /// Wait before the first retry; doubled after each.
    pub retry_wait: Duration,
}

impl Default for VBoxManage {
    fn default() -> Self {
        Self {
            program: PathBuf::from("VBoxManage"),
            limit: Duration::from_secs(120),
            attempts: 5,
            retry_wait: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum VBoxError {
    /// VBoxManage ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` was killed after {} s", limit.as_secs())]
    TimedOut { command: String, limit: Duration },
    #[error("cannot run `{command}`: {reason}")]
    NotStarted { command: String, reason: String },
    /// It succeeded, but its output is not what VirtualBox prints.
    #[error("cannot read what `{command}` printed: {reason}")]
    Output { command: String, reason: String },
}

impl VBoxError {
    fn stderr(&self) -> &str {
        match self {
            VBoxError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }

    /// A lock VirtualBox documents as passing: the machine is locked by a
    /// session that is opening or closing.
    pub fn is_transient(&self) -> bool {
        let s = self.stderr();
        s.contains("VBOX_E_INVALID_OBJECT_STATE") && (s.contains("locked") || s.contains("session"))
            || s.contains("E_ACCESSDENIED") && s.contains("session")
    }

    /// The machine (or snapshot) named does not exist.
    pub fn is_not_found(&self) -> bool {
        let s = self.stderr();
        s.contains("VBOX_E_OBJECT_NOT_FOUND") || s.contains("Could not find a registered machine")
    }

    /// VBoxManage's own words, without its `Details:`/`Context:` lines.
    pub fn message(&self) -> String {
        match self {
            VBoxError::Failed { stderr, .. } => {
                let lines: Vec<&str> = stderr
                    .lines()
                    .map(|l| l.trim_start_matches("VBoxManage: error: ").trim())
                    .filter(|l| !l.starts_with("Details:") && !l.starts_with("Context:"))
                    .filter(|l| !l.is_empty())
                    .collect();
                if lines.is_empty() {
                    stderr.clone()
                } else {
                    lines.join("; ")
                }
            }
            other => other.to_string(),
        }
    }
}

/// A VM as `list vms` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub uuid: String,
}

/// `VMState` of `showvminfo --machinereadable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    PowerOff,
    Running,
    Paused,
    Saved,
    Aborted,
    Starting,
    Stopping,
    Other(String),
}

impl VmState {
    fn parse(s: &str) -> Self {
        match s {
            "poweroff" => VmState::PowerOff,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "saved" => VmState::Saved,
            "aborted" => VmState::Aborted,
            "starting" | "restoring" => VmState::Starting,
            "stopping" | "saving" => VmState::Stopping,
            other => VmState::Other(other.to_string()),
        }
    }

    /// A VM process runs (it holds the session lock).
    pub fn is_up(&self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
        )
    }
}

/// What `showvminfo --machinereadable` says of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    /// `groups="/corral,/other"`.
    pub groups: Vec<String>,
    pub memory_mb: Option<u32>,
    pub cpus: Option<u32>,
    /// Attachment of each NIC, by number: `nat`, `hostonly`, `none`, ...
    pub nics: BTreeMap<u32, String>,
    /// `hostonlyadapterN`, by NIC number.
    pub hostonly_adapters: BTreeMap<u32, String>,
    /// Every snapshot's name, depth first as VirtualBox lists them.
    pub snapshots: Vec<String>,
    /// Every key and value, for whatever has no field of its own.
    pub raw: BTreeMap<String, String>,
}

/// A host-only network interface (`list hostonlyifs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOnlyIf {
    pub name: String,
    pub ip: Option<String>,
    pub netmask: Option<String>,
    pub status: Option<String>,
}

/// A guest property as `guestproperty wait` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProperty {
    pub name: String,
    pub value: String,
    pub flags: String,
}

/// The NIC settings `modifyvm` applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSettings {
    pub memory_mb: Option<u32>,
    pub cpus: Option<u32>,
    /// NIC 2 attached to this host-only network.
    pub hostonly_adapter2: Option<String>,
}

impl VBoxManage {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            ..Self::default()
        }
    }

    /// `list vms`.
    pub async fn list_vms(&self) -> Result<Vec<VmEntry>, VBoxError> {
        let out = self.call(&["list", "vms"], true).await?;
        parse_list_vms(&out).map_err(|reason| VBoxError::Output {
            command: "VBoxManage list vms".into(),
            reason,
        })
    }

    /// `list hostonlyifs`.
    pub async fn list_hostonlyifs(&self) -> Result<Vec<HostOnlyIf>, VBoxError> {
        let out = self.call(&["list", "hostonlyifs"], true).await?;
        Ok(parse_hostonlyifs(&out))
    }

    /// `showvminfo VM --machinereadable`.
    pub async fn showvminfo(&self, vm: &str) -> Result<VmInfo, VBoxError> {
        let out = self
            .call(&["showvminfo", vm, "--machinereadable"], true)
            .await?;
        parse_vminfo(&out).map_err(|reason| VBoxError::Output {
            command: format!("VBoxManage showvminfo {vm} --machinereadable"),
            reason,
        })
    }

    /// `clonevm BASE --snapshot S --options link --name N --groups G --register`:
    /// a linked clone of the base VM's snapshot, registered.
    pub async fn clonevm_linked(
        &self,
        base: &str,
        snapshot: &str,
        name: &str,
        group: &str,
    ) -> Result<(), VBoxError> {
        self.call(
            &[
                "clonevm",
                base,
                "--snapshot",
                snapshot,
                "--options",
                "link",
                "--name",
                name,
                "--groups",
                group,
                "--register",
            ],
            true,
        )
        .await
        .map(drop)
    }

    /// `modifyvm VM --memory M --cpus C --nic2 hostonly --hostonlyadapter2 IF`.
    pub async fn modifyvm(&self, vm: &str, settings: &VmSettings) -> Result<(), VBoxError> {
        let mut args: Vec<String> = vec!["modifyvm".into(), vm.into()];
        if let Some(m) = settings.memory_mb {
            args.extend(["--memory".into(), m.to_string()]);
        }
        if let Some(c) = settings.cpus {
            args.extend(["--cpus".into(), c.to_string()]);
        }
        if let Some(net) = &settings.hostonly_adapter2 {
            args.extend([
                "--nic2".into(),
                "hostonly".into(),
                "--hostonlyadapter2".into(),
                net.clone(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.call(&args, true).await.map(drop)
    }

    /// `guestproperty set VM NAME VALUE`; with no value, deletes it.
    pub async fn guestproperty_set(
        &self,
        vm: &str,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), VBoxError> {
        let mut args = vec!["guestproperty", "set", vm, name];
        args.extend(value);
        self.call(&args, true).await.map(drop)
    }

    /// `guestproperty get VM NAME`: `None` when it has no value.
    pub async fn guestproperty_get(
        &self,
        vm: &str,
        name: &str,
    ) -> Result<Option<String>, VBoxError> {
        let out = self.call(&["guestproperty", "get", vm, name], true).await?;
        Ok(parse_guestproperty_get(&out))
    }

    /// `guestproperty wait VM PATTERN --timeout MS --fail-on-timeout`: the
    /// property that changed, or `None` when the wait ended first.
    pub async fn guestproperty_wait(
        &self,
        vm: &str,
        pattern: &str,
        timeout: Duration,
    ) -> Result<Option<GuestProperty>, VBoxError> {
        let ms = timeout.as_millis().to_string();
        let args = [
            "guestproperty",
            "wait",
            vm,
            pattern,
            "--timeout",
            &ms,
            "--fail-on-timeout",
        ];
        // The call itself may take the whole wait.
        let this = VBoxManage {
            limit: self.limit + timeout,
            ..self.clone()
        };
        match this.call(&args, false).await {
            Ok(out) => Ok(parse_guestproperty_wait(&out)),
            // --fail-on-timeout: exit status 2 when the wait ended.
            Err(VBoxError::Failed { status, .. }) if status == "exit status: 2" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `startvm VM --type headless`. Not retried: a lock here means the VM
    /// already runs, which VBoxManage reports the same way.
    pub async fn startvm_headless(&self, vm: &str) -> Result<(), VBoxError> {
        self.call(&["startvm", vm, "--type", "headless"], false)
            .await
            .map(drop)
    }

    /// `controlvm VM acpipowerbutton`: asks the guest to shut down.
    pub async fn acpi_power_button(&self, vm: &str) -> Result<(), VBoxError> {
        self.call(&["controlvm", vm, "acpipowerbutton"], true)
            .await
            .map(drop)
    }

    /// `controlvm VM poweroff`: pulls the plug.
    pub async fn poweroff(&self, vm: &str) -> Result<(), VBoxError> {
        self.call(&["controlvm", vm, "poweroff"], true)
            .await
            .map(drop)
    }

    /// `unregistervm VM --delete`: the VM and its disks.
    pub async fn unregistervm_delete(&self, vm: &str) -> Result<(), VBoxError> {
        self.call(&["unregistervm", vm, "--delete"], true)
            .await
            .map(drop)
    }

    /// Runs VBoxManage with `args`, trying again on a passing lock when
    /// `retry`; its stdout.
    async fn call(&self, args: &[&str], retry: bool) -> Result<String, VBoxError> {
        let mut wait = self.retry_wait;
        let mut attempt = 1;
        loop {
            match self.call_once(args).await {
                Err(e) if retry && e.is_transient() && attempt < self.attempts => {
                    tracing::info!(error = %e, attempt, "VirtualBox lock; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn call_once(&self, args: &[&str]) -> Result<String, VBoxError> {
        let command = std::iter::once(self.program.to_string_lossy().into_owned())
            .chain(args.iter().map(|a| a.to_string()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args.iter().map(OsString::from))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| VBoxError::NotStarted {
            command: command.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id();
        match tokio::time::timeout(self.limit, child.wait_with_output()).await {
            Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
            Ok(Ok(out)) => {
                let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if stderr.is_empty() {
                    stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
                }
                Err(VBoxError::Failed {
                    command,
                    status: out.status.to_string(),
                    stderr,
                })
            }
            Ok(Err(e)) => Err(VBoxError::NotStarted {
                command,
                reason: e.to_string(),
            }),
            Err(_) => {
                // The child itself is killed on drop; its group as well.
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(VBoxError::TimedOut {
                    command,
                    limit: self.limit,
                })
            }
        }
    }
}

/// `"name" {uuid}` per line.
pub fn parse_list_vms(text: &str) -> Result<Vec<VmEntry>, String> {
    let mut vms = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, rest) = line
            .strip_prefix('"')
            .and_then(|l| l.rsplit_once("\" {"))
            .ok_or_else(|| format!("not `\"name\" {{uuid}}`: {line}"))?;
        let uuid = rest
            .strip_suffix('}')
            .ok_or_else(|| format!("no closing brace: {line}"))?;
        vms.push(VmEntry {
            name: name.to_string(),
            uuid: uuid.to_string(),
        });
    }
    Ok(vms)
}

/// `key=value` lines; keys and values may be quoted (`"SATA-0-0"="..."`),
/// quoted values may hold `\"`, `\\` and newlines.
pub fn parse_machinereadable(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key = read_token(&mut chars, '=')?;
        match chars.next() {
            Some('=') => {}
            other => return Err(format!("no `=` after {key:?} (found {other:?})")),
        }
        let value = read_token(&mut chars, '\n')?;
        map.insert(key, value);
    }
    Ok(map)
}

fn read_token(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    end: char,
) -> Result<String, String> {
    let mut out = String::new();
    if chars.peek() == Some(&'"') {
        chars.next();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some(c) => out.push(c),
                    None => return Err("a quote ends in `\\`".into()),
                },
                Some('"') => return Ok(out),
                Some(c) => out.push(c),
                None => return Err(format!("unterminated quote: {out:?}")),
            }
        }
    }
    while let Some(&c) = chars.peek() {
        if c == end || c == '\n' {
            break;
        }
        out.push(c);
        chars.next();
    }
    Ok(out.trim_end().to_string())
}

pub fn parse_vminfo(text: &str) -> Result<VmInfo, String> {
    let raw = parse_machinereadable(text)?;
    let get = |k: &str| raw.get(k).cloned();
    let name = get("name").ok_or("no `name`")?;
    let uuid = get("UUID").ok_or("no `UUID`")?;
    let state = VmState::parse(&get("VMState").ok_or("no `VMState`")?);
    let groups = get("groups")
        .map(|g| {
            g.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut nics = BTreeMap::new();
    let mut hostonly_adapters = BTreeMap::new();
    let mut snapshots = Vec::new();
    for (k, v) in &raw {
        if let Some(n) = k.strip_prefix("nic").and_then(|n| n.parse::<u32>().ok()) {
            nics.insert(n, v.clone());
        }
        if let Some(n) = k
            .strip_prefix("hostonlyadapter")
            .and_then(|n| n.parse::<u32>().ok())
        {
            hostonly_adapters.insert(n, v.clone());
        }
    }
    // SnapshotName, SnapshotName-1, SnapshotName-1-1, ...: keep VirtualBox's
    // order, which is the tree's depth-first one.
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("SnapshotName")
            && (rest.starts_with('=') || rest.starts_with('-'))
            && let Some((key, _)) = line.split_once('=')
            && let Some(v) = raw.get(key)
        {
            snapshots.push(v.clone());
        }
    }
    Ok(VmInfo {
        name,
        uuid,
        state,
        groups,
        memory_mb: get("memory").and_then(|m| m.parse().ok()),
        cpus: get("cpus").and_then(|c| c.parse().ok()),
        nics,
        hostonly_adapters,
        snapshots,
        raw,
    })
}

/// Blocks of `Key:   value` lines, one per interface, blank lines between.
pub fn parse_hostonlyifs(text: &str) -> Vec<HostOnlyIf> {
    let mut out = Vec::new();
    let mut current: Option<HostOnlyIf> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match key.trim() {
            "Name" => {
                out.extend(current.take());
                current = Some(HostOnlyIf {
                    name: value,
                    ip: None,
                    netmask: None,
                    status: None,
                });
            }
            "IPAddress" => {
                if let Some(c) = current.as_mut() {
                    c.ip = Some(value);
                }
            }
            "NetworkMask" => {
                if let Some(c) = current.as_mut() {
                    c.netmask = Some(value);
                }
            }
            "Status" => {
                if let Some(c) = current.as_mut() {
                    c.status = Some(value);
                }
            }
            _ => {}
        }
    }
    out.extend(current);
    out
}

/// `Value: x`, or `No value set!`.
pub fn parse_guestproperty_get(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("Value: ").map(|v| v.trim_end().to_string()))
}

/// `Name: /corral/agent, value: enrolled, flags: ` (VirtualBox 6 and 7).
pub fn parse_guestproperty_wait(text: &str) -> Option<GuestProperty> {
    let line = text.lines().find(|l| l.starts_with("Name: "))?;
    let rest = line.strip_prefix("Name: ")?;
    let (name, rest) = rest.split_once(", value: ")?;
    let (value, flags) = match rest.rsplit_once(", flags:") {
        Some((v, f)) => (v, f.trim()),
        None => (rest, ""),
    };
    Some(GuestProperty {
        name: name.to_string(),
        value: value.to_string(),
        flags: flags.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST_VMS: &str = "\"debian12-corral-base\" {0b1c8e52-5a1f-4c1e-9c2e-3f2d6e8a9b01}\n\
\"corral-nginx3\" {6d0e4f31-2a7b-4e55-8d1e-77c0f9a1b2c3}\n\
\"a \"quoted\" one\" {11111111-2222-3333-4444-555555555555}\n";

    // `showvminfo --machinereadable` of a linked clone, as VirtualBox 7.0
    // prints it (trimmed).
    const SHOWVMINFO: &str = r#"name="corral-nginx3"
groups="/corral"
ostype="Debian (64-bit)"
UUID="6d0e4f31-2a7b-4e55-8d1e-77c0f9a1b2c3"
CfgFile="/home/u/VirtualBox VMs/corral/corral-nginx3/corral-nginx3.vbox"
SnapFldr="/home/u/VirtualBox VMs/corral/corral-nginx3/Snapshots"
LogFldr="/home/u/VirtualBox VMs/corral/corral-nginx3/Logs"
hardwareuuid="6d0e4f31-2a7b-4e55-8d1e-77c0f9a1b2c3"
memory=1024
pagefusion="off"
vram=16
cpus=2
description="corral node nginx3
made by the host agent"
VMState="running"
VMStateChangeTime="2026-12-03T09:41:07.123000000"
"SATA-0-0"="/home/u/VirtualBox VMs/corral/corral-nginx3/Snapshots/{5e1f}.vdi"
"SATA-ImageUUID-0-0"="5e1f0000-0000-0000-0000-000000000000"
natnet1="nat"
macaddress1="080027A1B2C3"
cableconnected1="on"
nic1="nat"
nictype1="82540EM"
nicspeed1="0"
hostonlyadapter2="vboxnet0"
macaddress2="080027D4E5F6"
cableconnected2="on"
nic2="hostonly"
nic3="none"
SnapshotName="base"
SnapshotUUID="9a8b7c6d-0000-0000-0000-000000000001"
SnapshotName-1="after-update"
SnapshotUUID-1="9a8b7c6d-0000-0000-0000-000000000002"
CurrentSnapshotName="after-update"
CurrentSnapshotUUID="9a8b7c6d-0000-0000-0000-000000000002"
GuestMemoryBalloon=0
"#;

    const HOSTONLYIFS: &str = "Name:            vboxnet0
GUID:            786f6276-656e-4074-8000-0a0027000000
DHCP:            Disabled
IPAddress:       192.168.11.1
NetworkMask:     255.255.255.0
IPV6Address:     fe80::800:27ff:fe00:0
IPV6NetworkMaskPrefixLength: 64
HardwareAddress: 0a:00:27:00:00:00
MediumType:      Ethernet
Wireless:        No
Status:          Up
VBoxNetworkName: HostInterfaceNetworking-vboxnet0

Name:            vboxnet1
GUID:            786f6276-656e-4174-8000-0a0027000001
DHCP:            Disabled
IPAddress:       192.168.57.1
NetworkMask:     255.255.255.0
Status:          Down
";

    const NOT_FOUND: &str = "VBoxManage: error: Could not find a registered machine named 'corral-nginx9'
VBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap, interface IVirtualBox, callee nsISupports
VBoxManage: error: Context: \"FindMachine(Bstr(a->argv[0]).raw(), machine.asOutParam())\" at line 2621 of file VBoxManageInfo.cpp";

    const LOCKED: &str = "VBoxManage: error: The machine 'corral-nginx3' is already locked for a session (or being unlocked)
VBoxManage: error: Details: code VBOX_E_INVALID_OBJECT_STATE (0x80bb0007), component MachineWrap, interface IMachine, callee nsISupports
VBoxManage: error: Context: \"LockMachine(a->session, LockType_Write)\" at line 640 of file VBoxManageModifyVM.cpp";

    #[test]
    fn list_vms_gives_names_and_uuids() {
        let vms = parse_list_vms(LIST_VMS).expect("parses");
        assert_eq!(vms.len(), 3);
        assert_eq!(vms[1].name, "corral-nginx3");
        assert_eq!(vms[1].uuid, "6d0e4f31-2a7b-4e55-8d1e-77c0f9a1b2c3");
        assert_eq!(vms[2].name, "a \"quoted\" one");
        assert!(parse_list_vms("").expect("empty").is_empty());
        assert!(parse_list_vms("garbage\n").is_err());
    }

    #[test]
    fn showvminfo_gives_state_groups_nics_and_snapshots() {
        let info = parse_vminfo(SHOWVMINFO).expect("parses");
        assert_eq!(info.name, "corral-nginx3");
        assert_eq!(info.state, VmState::Running);
        assert!(info.state.is_up());
        assert_eq!(info.groups, vec!["/corral".to_string()]);
        assert_eq!(info.memory_mb, Some(1024));
        assert_eq!(info.cpus, Some(2));
        assert_eq!(info.nics.get(&2).map(String::as_str), Some("hostonly"));
        assert_eq!(info.nics.get(&3).map(String::as_str), Some("none"));
        assert_eq!(
            info.hostonly_adapters.get(&2).map(String::as_str),
            Some("vboxnet0")
        );
        assert_eq!(info.snapshots, vec!["base", "after-update"]);
        assert_eq!(
            info.raw.get("description").map(String::as_str),
            Some("corral node nginx3\nmade by the host agent")
        );
        assert!(info.raw.contains_key("SATA-0-0"));
    }

    #[test]
    fn showvminfo_of_a_powered_off_vm_with_no_snapshots() {
        let text = "name=\"base\"\ngroups=\"/\"\nUUID=\"u\"\nVMState=\"poweroff\"\n";
        let info = parse_vminfo(text).expect("parses");
        assert_eq!(info.state, VmState::PowerOff);
        assert!(!info.state.is_up());
        assert!(info.snapshots.is_empty());
        assert!(parse_vminfo("name=\"x\"\n").is_err(), "no UUID, no VMState");
        assert!(parse_machinereadable("name=\"unterminated\n").is_err());
    }

    #[test]
    fn hostonlyifs_are_listed_with_their_addresses() {
        let ifs = parse_hostonlyifs(HOSTONLYIFS);
        assert_eq!(ifs.len(), 2);
        assert_eq!(ifs[0].name, "vboxnet0");
        assert_eq!(ifs[0].ip.as_deref(), Some("192.168.11.1"));
        assert_eq!(ifs[0].netmask.as_deref(), Some("255.255.255.0"));
        assert_eq!(ifs[1].status.as_deref(), Some("Down"));
    }

    #[test]
    fn guest_properties_read_as_virtualbox_prints_them() {
        assert_eq!(
            parse_guestproperty_get("Value: http://192.168.11.5:7000\n").as_deref(),
            Some("http://192.168.11.5:7000")
        );
        assert_eq!(parse_guestproperty_get("No value set!\n"), None);
        let p = parse_guestproperty_wait("Name: /corral/agent, value: enrolled, flags: \n")
            .expect("a property");
        assert_eq!(p.name, "/corral/agent");
        assert_eq!(p.value, "enrolled");
        assert_eq!(p.flags, "");
        let p = parse_guestproperty_wait("Name: /corral/agent, value: a, b, flags: TRANSIENT")
            .expect("a property");
        assert_eq!(p.value, "a, b");
        assert_eq!(p.flags, "TRANSIENT");
    }

    #[test]
    fn errors_say_what_virtualbox_said_and_which_are_transient() {
        let err = |stderr: &str| VBoxError::Failed {
            command: "VBoxManage x".into(),
            status: "exit status: 1".into(),
            stderr: stderr.into(),
        };
        let missing = err(NOT_FOUND);
        assert!(missing.is_not_found());
        assert!(!missing.is_transient());
        assert_eq!(
            missing.message(),
            "Could not find a registered machine named 'corral-nginx9'"
        );
        let locked = err(LOCKED);
        assert!(locked.is_transient());
        assert!(!locked.is_not_found());
        assert!(locked.to_string().contains("exit status: 1"));
    }

    fn script(dir: &std::path::Path, body: &str) -> VBoxManage {
        let path = dir.join("VBoxManage");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        VBoxManage {
            program: path,
            limit: Duration::from_secs(10),
            attempts: 3,
            retry_wait: Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn a_passing_lock_is_tried_again_until_it_clears() {
        let dir = tempfile::tempdir().expect("dir");
        let count = dir.path().join("count");
        let vbox = script(
            dir.path(),
            &format!(
                "echo x >> {c}\n[ $(wc -l < {c}) -ge 2 ] && exit 0\ncat >&2 <<'EOF'\n{LOCKED}\nEOF\nexit 1",
                c = count.display()
            ),
        );
        vbox.modifyvm("corral-nginx3", &VmSettings::default())
            .await
            .expect("second attempt succeeds");
        let calls = std::fs::read_to_string(&count).expect("count");
        assert_eq!(calls.lines().count(), 2);
    }

    #[tokio::test]
    async fn a_lock_that_stays_fails_with_vboxmanage_stderr_after_the_last_attempt() {
        let dir = tempfile::tempdir().expect("dir");
        let count = dir.path().join("count");
        let vbox = script(
            dir.path(),
            &format!(
                "echo x >> {c}\ncat >&2 <<'EOF'\n{LOCKED}\nEOF\nexit 1",
                c = count.display()
            ),
        );
        let err = vbox
            .guestproperty_set("corral-nginx3", "/corral/node", Some("nginx3"))
            .await
            .expect_err("stays locked");
        assert!(err.to_string().contains("already locked"), "{err}");
        let calls = std::fs::read_to_string(&count).expect("count");
        assert_eq!(calls.lines().count(), 3);
        // startvm is never retried: a lock there means the VM runs.
        std::fs::write(&count, "").expect("reset");
        vbox.startvm_headless("corral-nginx3")
            .await
            .expect_err("locked");
        let calls = std::fs::read_to_string(&count).expect("count");
        assert_eq!(calls.lines().count(), 1);
    }

    #[tokio::test]
    async fn a_call_past_its_limit_is_killed() {
        let dir = tempfile::tempdir().expect("dir");
        let mut vbox = script(dir.path(), "sleep 30 & wait");
        vbox.limit = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = vbox.list_vms().await.expect_err("killed");
        assert!(matches!(err, VBoxError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_wait_that_ends_is_none_and_a_missing_vm_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let vbox = script(
            dir.path(),
            &format!(
                "case \"$2\" in wait) echo 'Time out or interruption while waiting for a notification.'; exit 2;; esac\ncat >&2 <<'EOF'\n{NOT_FOUND}\nEOF\nexit 1"
            ),
        );
        let none = vbox
            .guestproperty_wait("corral-nginx3", "/corral/agent", Duration::from_millis(10))
            .await
            .expect("a wait that ended");
        assert_eq!(none, None);
        let err = vbox.showvminfo("corral-nginx9").await.expect_err("missing");
        assert!(err.is_not_found(), "{err}");
    }
}
