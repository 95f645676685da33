//! Ships the services' new log lines to the control plane
//! (`POST /agents/{node}/logs`, at most 200 lines per call, each cut to 1000
//! characters). How far each log was shipped is kept in
//! `<state>/logs/.shipped.json`, so a restarted agent neither resends nor
//! skips; while the control plane is away the log files themselves are the
//! buffer, and the rest of a log rotated meanwhile is shipped from its
//! `.log.1` copy before the live log. On a machine of its own the node's
//! syslog (`--syslog`: `/var/log/syslog`, or the journal read with
//! `journalctl` after a cursor kept in `.journal-cursor`) goes the same way
//! as the service `syslog`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{ControlError, ControlPlane};

pub const MAX_LINES: usize = 200;
pub const MAX_LINE_CHARS: usize = 1000;
/// Batches per service per round, so one chatty log cannot hog a round.
const MAX_BATCHES: usize = 10;

/// Which file a rotated copy is: inode and change time (ns). The rotation
/// writes `.log.1` afresh, so this changes with every rotation, even one
/// after which the live log has grown past the old offset again.
type FileId = (u64, i64);
const NO_FILE: FileId = (0, 0);

/// How far one service's log was shipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Place {
    /// Bytes of `<service>.log` shipped.
    offset: u64,
    /// The `<service>.log.1` there was when `offset` was taken.
    rotated: FileId,
    /// After a rotation: bytes of `<service>.log.1` shipped; its rest goes
    /// out before the live log.
    #[serde(skip_serializing_if = "Option::is_none")]
    draining: Option<u64>,
}

/// `.shipped.json` as it is now, or as agents before rotation tracking
/// wrote it (a bare offset).
#[derive(Deserialize)]
#[serde(untagged)]
enum Saved {
    Place(Place),
    Offset(u64),
}

pub struct LogShipper {
    dir: PathBuf,
    /// The machine's syslog, shipped as the service `syslog`; none where
    /// the node shares its host (local provider).
    syslog: Option<Syslog>,
    places: BTreeMap<String, Place>,
    /// The journal's cursor of the last entry shipped.
    journal_cursor: Option<String>,
}

/// Where a machine's syslog is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Syslog {
    /// A file rsyslog writes (rotated by logrotate's rename).
    File(PathBuf),
    /// systemd's journal, read with this `journalctl`.
    Journal(PathBuf),
}

impl Syslog {
    /// `--syslog`: `auto` (`/var/log/syslog` where there is one, else the
    /// journal), `journal`, or the path of a file.
    pub fn from_setting(setting: &Path) -> Self {
        let rsyslog = Path::new("/var/log/syslog");
        match setting.to_str() {
            Some("journal") => Self::Journal("journalctl".into()),
            Some("auto") if !rsyslog.exists() => Self::Journal("journalctl".into()),
            Some("auto") => Self::File(rsyslog.into()),
            _ => Self::File(setting.into()),
        }
    }
}

/// The server understood the batch and will never take it (422, 413, 400).
fn refused_for_good(e: &ControlError) -> bool {
    e.status()
        .is_some_and(|s| matches!(s.as_u16(), 400 | 413 | 422))
}

/// How long one read of the journal may take.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The text of a journal field: a string, or bytes (non-UTF-8 messages).
fn journal_text(field: Option<&serde_json::Value>) -> String {
    match field {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(bytes)) => {
            let bytes: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => String::new(),
    }
}

/// The journal entries after `cursor` (at most `MAX_LINES`, as
/// `identifier: message`, redacted and clipped) and the cursor of the last;
/// with no cursor yet, none and the cursor of the newest entry (the
/// machine's past is not shipped).
pub async fn read_journal(
    journalctl: &Path,
    cursor: Option<&str>,
) -> std::io::Result<(Vec<String>, Option<String>)> {
    use tokio::io::AsyncBufReadExt;
    let mut cmd = tokio::process::Command::new(journalctl);
    cmd.args(["--output=json", "--no-pager", "--quiet"]);
    match cursor {
        Some(c) => cmd.arg(format!("--after-cursor={c}")),
        None => cmd.arg("--lines=1"),
    };
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("journalctl without stdout"))?;
    let mut entries = tokio::io::BufReader::new(stdout).lines();
    let mut lines = Vec::new();
    let mut last = cursor.map(String::from);
    let read = async {
        while lines.len() < MAX_LINES {
            let Some(entry) = entries.next_line().await? else {
                break;
            };
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&entry) else {
                continue;
            };
            let Some(at) = entry.get("__CURSOR").and_then(|c| c.as_str()) else {
                continue;
            };
            last = Some(at.to_string());
            if cursor.is_none() {
                continue;
            }
            let line = format!(
                "{}: {}",
                journal_text(entry.get("SYSLOG_IDENTIFIER")),
                journal_text(entry.get("MESSAGE"))
            );
            let line = crate::drivers::postgres::redact_passwords(&line);
            lines.push(line.chars().take(MAX_LINE_CHARS).collect());
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(JOURNAL_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("journalctl took too long"))??;
    // The rest waits for the next round; dropping the child ends it.
    drop(child);
    Ok((lines, last))
}

/// The service name the node's syslog is shipped under.
pub const SYSLOG: &str = "syslog";

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

/// Where a rotation leaves the rest of `live`: `<service>.log.1` for the
/// supervisor's copy-truncate, `syslog.1` for logrotate's rename.
fn rotated_copy(live: &Path) -> PathBuf {
    let mut name = live.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn file_id(path: &Path) -> FileId {
    std::fs::metadata(path).map_or(NO_FILE, |m| {
        (
            m.ino(),
            m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
        )
    })
}

/// The next batch of `path` after `offset`, and the offset after it; `None`
/// when the file is shorter than `offset` (it was truncated).
fn batch(path: &Path, offset: u64) -> std::io::Result<Option<(Vec<String>, u64)>> {
    let mut file = std::fs::File::open(path)?;
    if file.metadata()?.len() < offset {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.take(MAX_LINES as u64 * (MAX_LINE_CHARS as u64 * 4 + 1))
        .read_to_end(&mut buf)?;
    let (lines, used) = take_lines(&buf);
    Ok(Some((lines, offset + used as u64)))
}

impl LogShipper {
    pub fn new(dir: PathBuf) -> Self {
        let saved: BTreeMap<String, Saved> = std::fs::read(dir.join(".shipped.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let places = saved
            .into_iter()
            .map(|(service, saved)| {
                let place = match saved {
                    Saved::Place(place) => place,
                    // No record of a rotation since: take the one there is.
                    Saved::Offset(offset) => Place {
                        offset,
                        rotated: file_id(&rotated_copy(&dir.join(format!("{service}.log")))),
                        draining: None,
                    },
                };
                (service, place)
            })
            .collect();
        let journal_cursor = std::fs::read_to_string(dir.join(".journal-cursor"))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        Self {
            dir,
            syslog: None,
            places,
            journal_cursor,
        }
    }

    /// Ships the machine's syslog too, from its end when first seen.
    pub fn with_syslog(mut self, syslog: Option<Syslog>) -> Self {
        self.syslog = syslog;
        self
    }

    fn syslog_file(&self) -> Option<&Path> {
        match &self.syslog {
            Some(Syslog::File(path)) => Some(path),
            _ => None,
        }
    }

    fn live(&self, service: &str) -> PathBuf {
        match self.syslog_file() {
            Some(path) if service == SYSLOG => path.to_path_buf(),
            _ => self.dir.join(format!("{service}.log")),
        }
    }

    /// Ships the journal's new entries; a journal that cannot be read
    /// (no journalctl) ships nothing.
    async fn ship_journal(
        &mut self,
        control: &ControlPlane,
        journalctl: &Path,
    ) -> Result<(), ControlError> {
        for _ in 0..MAX_BATCHES {
            let (lines, cursor) =
                match read_journal(journalctl, self.journal_cursor.as_deref()).await {
                    Ok(read) => read,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the journal");
                        return Ok(());
                    }
                };
            if !lines.is_empty() {
                control.logs(SYSLOG, &lines).await?;
            }
            if cursor != self.journal_cursor
                && let Some(c) = &cursor
            {
                let path = self.dir.join(".journal-cursor");
                if let Err(e) = crate::durable::write_atomic(&path, c.as_bytes(), 0o600) {
                    tracing::warn!(error = %e, "saving the journal cursor");
                }
                self.journal_cursor = cursor;
            }
            if lines.len() < MAX_LINES {
                return Ok(());
            }
        }
        Ok(())
    }

    fn save(&self) {
        let data = serde_json::to_vec(&self.places).expect("offsets serialize");
        if let Err(e) = crate::durable::write_atomic(&self.dir.join(".shipped.json"), &data, 0o600)
        {
            tracing::warn!(error = %e, "saving log offsets");
        }
    }

    /// Where shipping of `service` stands now, noticing a rotation since the
    /// last look.
    fn place(&self, service: &str) -> Place {
        let live = self.live(service);
        let rotated = file_id(&rotated_copy(&live));
        let Some(mut place) = self.places.get(service).copied() else {
            // A service log first seen: from its start; older rotated copies
            // stay. The syslog holds the machine's past: from now on.
            let offset = if self.syslog_file().is_some() && service == SYSLOG {
                std::fs::metadata(&live).map_or(0, |m| m.len())
            } else {
                0
            };
            return Place {
                offset,
                rotated,
                draining: None,
            };
        };
        if rotated != place.rotated && rotated != NO_FILE {
            if place.draining.is_some() {
                tracing::warn!(
                    service,
                    "log rotated twice before its rotated copy was shipped; the rest of that copy is skipped"
                );
            }
            // `.1` is the live log as it was: what was not
            // shipped of it starts at the old offset.
            place.draining = Some(place.offset);
            place.offset = 0;
        }
        place.rotated = rotated;
        place
    }

    /// The next batch of `service` from `place`, moving `place` past it.
    fn next_batch(&self, service: &str, place: &mut Place) -> std::io::Result<Vec<String>> {
        let live = self.live(service);
        if let Some(drained) = place.draining {
            match batch(&rotated_copy(&live), drained) {
                Ok(Some((lines, next))) if !lines.is_empty() => {
                    place.draining = Some(next);
                    return Ok(lines);
                }
                // Done (an unfinished last line is cut by the rotation), or
                // the copy is gone: on to the live log.
                _ => place.draining = None,
            }
        }
        let (lines, next) = match batch(&live, place.offset)? {
            Some(found) => found,
            // Shrank without a rotation (truncated by hand): start over.
            None => batch(&live, 0)?.unwrap_or_default(),
        };
        place.offset = next;
        Ok(lines)
    }

    /// Ships what is new; stops at the first error (the server is down),
    /// keeping its place.
    pub async fn ship(&mut self, control: &ControlPlane) -> Result<(), ControlError> {
        let mut services: Vec<String> = std::fs::read_dir(&self.dir)
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
        if self.syslog_file().is_some() && !services.iter().any(|s| s == SYSLOG) {
            services.push(SYSLOG.to_string());
        }
        let mut moved = false;
        let mut outcome = Ok(());
        'services: for service in services {
            let mut place = self.place(&service);
            for _ in 0..MAX_BATCHES {
                let shipped = place;
                let Ok(lines) = self.next_batch(&service, &mut place) else {
                    break;
                };
                let sent = if lines.is_empty() {
                    Ok(())
                } else {
                    control.logs(&service, &lines).await
                };
                if let Err(e) = &sent
                    && refused_for_good(e)
                {
                    // Sending it again would be refused again (a file whose
                    // name is no service name, a 17th service): skip it
                    // rather than stall every log behind it.
                    tracing::warn!(service, error = %e, lines = lines.len(), "log lines refused; skipped");
                } else if let Err(e) = sent {
                    // Not sent: keep the place before this batch (a
                    // rotation noticed still counts).
                    place = shipped;
                    outcome = Err(e);
                    self.keep(&service, place, &mut moved);
                    break 'services;
                }
                let done = lines.is_empty();
                self.keep(&service, place, &mut moved);
                if done {
                    break;
                }
            }
        }
        if moved {
            self.save();
        }
        outcome?;
        if let Some(Syslog::Journal(journalctl)) = self.syslog.clone() {
            self.ship_journal(control, &journalctl).await?;
        }
        Ok(())
    }

    fn keep(&mut self, service: &str, place: Place, moved: &mut bool) {
        if self.places.get(service) != Some(&place) {
            self.places.insert(service.to_string(), place);
            *moved = true;
        }
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
    fn offsets_saved_before_rotation_tracking_still_load() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(".shipped.json"), br#"{"nginx":70}"#).expect("write");
        let shipper = LogShipper::new(dir.path().to_path_buf());
        assert_eq!(shipper.place("nginx").offset, 70);
        assert_eq!(shipper.place("nginx").draining, None);
    }

    #[test]
    fn the_syslog_is_shipped_from_its_end_and_through_a_rename_rotation() {
        let dir = tempfile::tempdir().expect("tmp");
        let syslog = dir.path().join("syslog");
        std::fs::write(&syslog, "old 1\nold 2\n").expect("write");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("mkdir");
        let shipper = LogShipper::new(logs).with_syslog(Some(Syslog::File(syslog.clone())));
        let mut place = shipper.place(SYSLOG);
        assert_eq!(place.offset, 12, "the machine's past is not shipped");
        let append = |text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&syslog)
                .expect("open");
            f.write_all(text.as_bytes()).expect("write");
        };
        append("new 1\n");
        assert_eq!(
            shipper.next_batch(SYSLOG, &mut place).expect("batch"),
            ["new 1"]
        );
        // Unshipped when logrotate renames it away and a new one starts.
        append("new 2\n");
        std::fs::rename(&syslog, rotated_copy(&syslog)).expect("rename");
        append("new 3\n");
        let shipper = LogShipper {
            places: BTreeMap::from([(SYSLOG.to_string(), place)]),
            ..shipper
        };
        let mut place = shipper.place(SYSLOG);
        assert_eq!(
            shipper.next_batch(SYSLOG, &mut place).expect("batch"),
            ["new 2"]
        );
        assert_eq!(
            shipper.next_batch(SYSLOG, &mut place).expect("batch"),
            ["new 3"]
        );
    }

    #[tokio::test]
    async fn the_journal_is_read_after_its_cursor_from_the_newest_entry_on() {
        let dir = tempfile::tempdir().expect("tmp");
        let journalctl = dir.path().join("journalctl");
        // Entries c1..c3; `--lines=1` gives the newest, `--after-cursor`
        // those after it.
        std::fs::write(
            &journalctl,
            r#"#!/bin/sh
e1='{"__CURSOR":"c1","SYSLOG_IDENTIFIER":"kernel","MESSAGE":"booted"}'
e2='{"__CURSOR":"c2","SYSLOG_IDENTIFIER":"sshd","MESSAGE":[97,99,99,101,112,116,101,100]}'
e3='{"__CURSOR":"c3","SYSLOG_IDENTIFIER":"postgres","MESSAGE":"primary_conninfo = user=replicator password=s3cr3t host=x"}'
case "$*" in
  *--lines=1*) echo "$e3" ;;
  *--after-cursor=c1*) echo "$e2"; echo "$e3" ;;
  *--after-cursor=c3*) ;;
  *) echo "$e1"; echo "$e2"; echo "$e3" ;;
esac
"#,
        )
        .expect("write");
        std::fs::set_permissions(
            &journalctl,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let (lines, cursor) = read_journal(&journalctl, None).await.expect("read");
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(cursor.as_deref(), Some("c3"));
        let (lines, cursor) = read_journal(&journalctl, Some("c1")).await.expect("read");
        assert_eq!(lines[0], "sshd: accepted");
        assert!(lines[1].starts_with("postgres: "), "{}", lines[1]);
        assert!(!lines[1].contains("s3cr3t"), "{}", lines[1]);
        assert_eq!(cursor.as_deref(), Some("c3"));
        let (lines, cursor) = read_journal(&journalctl, Some("c3")).await.expect("read");
        assert!(lines.is_empty());
        assert_eq!(
            cursor.as_deref(),
            Some("c3"),
            "nothing new keeps the cursor"
        );
    }

    #[test]
    fn at_most_two_hundred_lines_per_batch() {
        let buf = "l\n".repeat(250);
        let (lines, used) = take_lines(buf.as_bytes());
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(used, 400);
    }
}
