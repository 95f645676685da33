//! Running the external programs providers drive (`lxc-*`, `nft`, `ip`):
//! through the [`Reaper`] (the one place children are waited for), each in a
//! process group of its own that is killed when it outlives its limit, and
//! with the program's stderr in the error.

use std::process::Command;
use std::time::Duration;

use super::ProviderError;
use super::reaper::Reaper;

/// Runs `cmd` to its end, at most `limit`; its stdout on success.
pub async fn run(cmd: &mut Command, limit: Duration) -> Result<String, ProviderError> {
    let shown = show(cmd);
    tracing::debug!(command = %shown, "running");
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let out = Reaper::global()
        .output_within(cmd, Some(limit))
        .await
        .map_err(|e| ProviderError::Command {
            command: shown.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if out.exit.success() && !out.timed_out {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(ProviderError::Command {
        command: shown,
        status: if out.timed_out {
            format!("killed after {:.0} s", limit.as_secs_f64())
        } else {
            out.exit.to_string()
        },
        stderr: tail(&stderr, 2000),
    })
}

/// The command as a shell line, for messages.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `max` bytes of `s` (on a char boundary), where errors say why.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// Whether `program` can be found on PATH (or is a path that exists).
pub fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("abcdef", 3), "...def");
        assert_eq!(tail("aé", 1), "...");
    }

    #[tokio::test]
    async fn a_failing_command_carries_its_stderr() {
        let err = run(
            Command::new("sh").args(["-c", "echo no such container >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .await
        .expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("no such container"), "{text}");
        assert!(text.contains("exit code 3"), "{text}");
    }

    #[tokio::test]
    async fn a_command_past_its_limit_is_killed() {
        let started = std::time::Instant::now();
        let err = run(
            Command::new("sh").args(["-c", "sleep 30 & wait"]),
            Duration::from_millis(300),
        )
        .await
        .expect_err("killed");
        assert!(err.to_string().contains("killed after"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
