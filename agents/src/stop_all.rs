//! `corral-agent stop-all`: stops a node completely — the agent (through its
//! pid file) and every service it supervises, each gracefully (PostgreSQL
//! with a fast shutdown) — and waits until all are gone. Idempotent.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::supervisor::{cmdline, group_alive, kill_group, pid_alive, read_pid};

/// How to stop a service by its pid file name, and the program name its
/// command line must contain (so a recycled pid is left alone).
fn stop_signal(service: &str) -> (Signal, &str) {
    match service {
        "agent" => (Signal::SIGTERM, "corral-agent"),
        "postgres" => (Signal::SIGINT, "postgres"),
        "nginx" => (Signal::SIGQUIT, "nginx"),
        "consul" => (Signal::SIGTERM, "consul"),
        "todomvc" => (Signal::SIGTERM, "todomvc"),
        other => (Signal::SIGTERM, other),
    }
}

/// Signals everything in `pids` and waits until each is gone with its
/// whole process group (workers, backends), killing what outlives `grace`.
fn stop_and_wait(pids: &[(String, u32)], grace: Duration, whole_group: bool) {
    for (name, pid) in pids {
        let (signal, _) = stop_signal(name);
        tracing::info!(service = %name, pid, ?signal, "stopping");
        let _ = kill(Pid::from_raw(*pid as i32), signal);
    }
    let start = Instant::now();
    let mut killed = false;
    let alive = |pid: u32| pid_alive(pid) || (whole_group && group_alive(pid));
    while pids.iter().any(|(_, pid)| alive(*pid)) {
        if !killed && start.elapsed() > grace {
            for (name, pid) in pids.iter().filter(|(_, p)| alive(*p)) {
                tracing::warn!(service = %name, pid, "did not stop in time; killing its group");
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
                if whole_group {
                    kill_group(*pid);
                }
            }
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn live(run: &Path, name: &str) -> Option<u32> {
    let pid = read_pid(&run.join(format!("{name}.pid")))?;
    let (_, program) = stop_signal(name);
    (pid_alive(pid) && cmdline(pid).is_some_and(|c| c.contains(program))).then_some(pid)
}

pub fn stop_all(state_dir: &Path) -> std::io::Result<()> {
    let run = state_dir.join("run");
    if !run.is_dir() {
        return Ok(());
    }
    // The agent first, so it does not restart what we stop.
    if let Some(pid) = live(&run, "agent") {
        // Not its group: whoever started the agent may share it.
        stop_and_wait(&[("agent".into(), pid)], Duration::from_secs(10), false);
    }
    let _ = std::fs::remove_file(run.join("agent.pid"));
    let mut services = Vec::new();
    for entry in std::fs::read_dir(&run)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".pid") else {
            continue;
        };
        if let Some(pid) = live(&run, name) {
            services.push((name.to_string(), pid));
        }
    }
    // Services lead process groups of their own.
    stop_and_wait(&services, Duration::from_secs(60), true);
    for entry in std::fs::read_dir(&run)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.ends_with(".pid") || file.ends_with(".fingerprint") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}
