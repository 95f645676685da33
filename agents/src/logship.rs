//! Ships the services' new log lines to the control plane
//! (`POST /agents/{node}/logs`, at most 200 lines per call, each cut to 1000
//! characters). How far each log was shipped is kept in
//! `<state>/logs/.shipped.json`, so a restarted agent neither resends nor
//! skips.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use crate::control::{ControlError, ControlPlane};

pub const MAX_LINES: usize = 200;
pub const MAX_LINE_CHARS: usize = 1000;
/// Batches per service per round, so one chatty log cannot hog a round.
const MAX_BATCHES: usize = 10;

pub struct LogShipper {
    dir: PathBuf,
    offsets: BTreeMap<String, u64>,
}

/// Complete lines from `buf`, at most `MAX_LINES`, each clipped; and how
/// many bytes they took.
pub fn take_lines(buf: &[u8]) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut used = 0;
    while lines.len() < MAX_LINES {
        let Some(end) = buf[used..].iter().position(|b| *b == b'\n') else {
            break;
        };
        let line = String::from_utf8_lossy(&buf[used..used + end]);
        // PostgreSQL logs a changed primary_conninfo whole, replication
        // password included: no password leaves the node in a log line.
        let line = crate::drivers::postgres::redact_passwords(&line);
        lines.push(line.chars().take(MAX_LINE_CHARS).collect());
        used += end + 1;
    }
    (lines, used)
}

impl LogShipper {
    pub fn new(dir: PathBuf) -> Self {
        let offsets = std::fs::read(dir.join(".shipped.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { dir, offsets }
    }

    fn save(&self) {
        let data = serde_json::to_vec(&self.offsets).expect("offsets serialize");
        if let Err(e) = crate::durable::write_atomic(&self.dir.join(".shipped.json"), &data, 0o600)
        {
            tracing::warn!(error = %e, "saving log offsets");
        }
    }

    /// Reads the next batch of `service`'s log after `offset`.
    fn batch(&self, service: &str, offset: u64) -> std::io::Result<(Vec<String>, u64)> {
        let mut file = std::fs::File::open(self.dir.join(format!("{service}.log")))?;
        let len = file.metadata()?.len();
        // A log that shrank was rotated or truncated: start over.
        let offset = if len < offset { 0 } else { offset };
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        file.take(MAX_LINES as u64 * (MAX_LINE_CHARS as u64 * 4 + 1))
            .read_to_end(&mut buf)?;
        let (lines, used) = take_lines(&buf);
        Ok((lines, offset + used as u64))
    }

    /// Ships what is new; stops at the first error (the server is down).
    pub async fn ship(&mut self, control: &ControlPlane) -> Result<(), ControlError> {
        let services: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .strip_suffix(".log")
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut moved = false;
        for service in services {
            for _ in 0..MAX_BATCHES {
                let offset = self.offsets.get(&service).copied().unwrap_or(0);
                let Ok((lines, next)) = self.batch(&service, offset) else {
                    break;
                };
                if lines.is_empty() {
                    if next != offset {
                        self.offsets.insert(service.clone(), next);
                        moved = true;
                    }
                    break;
                }
                let result = control.logs(&service, &lines).await;
                if let Err(e) = result {
                    if moved {
                        self.save();
                    }
                    return Err(e);
                }
                self.offsets.insert(service.clone(), next);
                moved = true;
            }
        }
        if moved {
            self.save();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_lines_are_taken_and_long_ones_clipped() {
        let long = "x".repeat(1500);
        let buf = format!("a\n{long}\npartial");
        let (lines, used) = take_lines(buf.as_bytes());
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "a");
        assert_eq!(lines[1].len(), MAX_LINE_CHARS);
        assert_eq!(used, 2 + 1501);
    }

    #[test]
    fn passwords_never_leave_in_a_log_line() {
        let buf = "LOG:  parameter \"primary_conninfo\" changed to \"host=10.0.0.1 port=5432 user=replicator password='f00dcafe' application_name='pg2'\"\n";
        let (lines, _) = take_lines(buf.as_bytes());
        assert_eq!(lines.len(), 1);
        assert!(!lines[0].contains("f00dcafe"), "{}", lines[0]);
        assert!(lines[0].contains("primary_conninfo"), "{}", lines[0]);
    }

    #[test]
    fn at_most_two_hundred_lines_per_batch() {
        let buf = "l\n".repeat(250);
        let (lines, used) = take_lines(buf.as_bytes());
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(used, 400);
    }
}
