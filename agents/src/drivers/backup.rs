//! Backups on a db node and restores on adm1: a `backup` order runs
//! `pg_basebackup` (tar format, WAL streamed alongside) as the postgres
//! account against this node's own server, checksums each file and streams
//! it to adm1's store; the WAL shipper sends what `archive_command` spooled;
//! a `restore` order downloads a base backup and the archived WAL (each
//! checked against its SHA-256), recovers them to the target time in a new
//! instance of its own — on its own port and directory, registered nowhere,
//! so it never joins the cluster — and verifies what it holds. A restore
//! that does not reach its target is stopped and removed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::backup::{BackupReport, RestoreReport};
use corral_proto::{BackupFile, BackupSpec, RestoreSpec};
use nix::sys::signal::Signal;
use serde_json::Value;
use sha2::Digest;

use super::postgres::{PostgresDriver, REPLICATION_USER};
use super::{DriverError, NodeContext, mkdir};
use crate::control::{ControlPlane, TransferError};
use crate::host::{OneShot, ServiceSpec};

/// The files of a base backup in tar format, in upload order.
const BACKUP_FILES: [&str; 3] = ["base.tar", "pg_wal.tar", "backup_manifest"];
/// A finished restore's report, in its directory: it marks it done.
const REPORT_FILE: &str = "restore.json";
/// How long a base backup or a restore's recovery may take.
const LONG: Duration = Duration::from_secs(6 * 3600);

impl From<TransferError> for DriverError {
    fn from(e: TransferError) -> Self {
        DriverError::Refused(e.to_string())
    }
}

pub struct BackupDriver {
    ctx: Arc<NodeContext>,
    postgres: Arc<PostgresDriver>,
    control: Arc<ControlPlane>,
}

/// The hex SHA-256 of a file, read in chunks off the async thread.
pub async fn sha256_file(path: &Path) -> Result<String, DriverError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|e| DriverError::Refused(format!("hashing {}: {e}", path.display())))?
    .map_err(DriverError::io(format!("hashing {}", path.display())))
}

/// The WAL range a backup needs, from its `backup_manifest`:
/// (start LSN, end LSN, timeline).
pub fn wal_range(manifest: &str) -> Option<(String, String, u32)> {
    let v: Value = serde_json::from_str(manifest).ok()?;
    let ranges = v.get("WAL-Ranges")?.as_array()?;
    let first = ranges.first()?;
    let last = ranges.last()?;
    Some((
        first.get("Start-LSN")?.as_str()?.to_string(),
        last.get("End-LSN")?.as_str()?.to_string(),
        u32::try_from(last.get("Timeline")?.as_u64()?).ok()?,
    ))
}

/// The segment number part of a WAL file name (everything but its
/// timeline), to compare positions across timelines.
fn segment_part(name: &str) -> &str {
    name.get(8..24).unwrap_or("")
}

/// Which archived files a restore from a backup starting at `start`
/// (a segment file name) needs: every timeline history, and the segments
/// from the backup's on, of any timeline (recovery picks its path with
/// `recovery_target_timeline = latest`).
pub fn wal_needed<'a>(names: &'a [String], start: &str) -> Vec<&'a String> {
    names
        .iter()
        .filter(|n| {
            n.ends_with(".history") || (n.len() == 24 && segment_part(n) >= segment_part(start))
        })
        .collect()
}

impl BackupDriver {
    pub fn new(
        ctx: Arc<NodeContext>,
        postgres: Arc<PostgresDriver>,
        control: Arc<ControlPlane>,
    ) -> Self {
        Self {
            ctx,
            postgres,
            control,
        }
    }

    /// Takes backup `spec.id` and ships it; the server hears how it went
    /// either way.
    #[tracing::instrument(skip_all, fields(node = %self.ctx.node, id = spec.id))]
    pub async fn take(&self, spec: &BackupSpec) -> Result<String, DriverError> {
        let started = Instant::now();
        let dir = self.ctx.path(format!("backups/{}", spec.id));
        let result = self.take_into(spec, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(report) => {
                let size: u64 = report.files.iter().map(|f| f.size).sum();
                let body = serde_json::to_value(&report).expect("serializes");
                self.report(spec.id, &body).await?;
                Ok(format!(
                    "backup {}: {} files, {size} bytes, WAL {} to {} on timeline {}, in {:.1}s",
                    spec.id,
                    report.files.len(),
                    report.wal_start_lsn.as_deref().unwrap_or("?"),
                    report.wal_end_lsn.as_deref().unwrap_or("?"),
                    report.timeline.unwrap_or(0),
                    started.elapsed().as_secs_f64()
                ))
            }
            Err(e) => {
                let report = BackupReport {
                    files: Vec::new(),
                    wal_start_lsn: None,
                    wal_end_lsn: None,
                    timeline: None,
                    error: Some(e.to_string().chars().take(2000).collect()),
                };
                let body = serde_json::to_value(&report).expect("serializes");
                if let Err(re) = self
                    .control
                    .post_json(&format!("/backups/{}/report", spec.id), &body)
                    .await
                {
                    tracing::warn!(error = %re, "reporting a failed backup failed");
                }
                Err(e)
            }
        }
    }

    /// Reports a finished backup; the files are stored already, so a
    /// control plane that is away for a moment is waited for (a minute).
    async fn report(&self, id: i64, body: &Value) -> Result<(), DriverError> {
        let path = format!("/backups/{id}/report");
        let mut wait = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            match self.control.post_json(&path, body).await {
                Ok(_) => return Ok(()),
                // The server looked and said no: trying again changes nothing.
                Err(e) if e.status().is_some_and(|s| s.is_client_error()) || attempt >= 6 => {
                    return Err(DriverError::Refused(format!("reporting the backup: {e}")));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reporting the backup failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(15));
                    attempt += 1;
                }
            }
        }
    }

    async fn take_into(&self, spec: &BackupSpec, dir: &Path) -> Result<BackupReport, DriverError> {
        let pg = self
            .postgres
            .desired_spec()
            .ok_or_else(|| DriverError::Refused("this node runs no PostgreSQL".into()))?;
        mkdir(&self.ctx.path("backups"))?;
        let _ = std::fs::remove_dir_all(dir);
        self.postgres.private_dir(dir)?;
        // Over the node's address as the replication role (the socket's
        // trust does not cover replication connections); the password goes
        // in the environment, never on the command line.
        let cmd = OneShot::new(
            self.postgres.bin("pg_basebackup"),
            &[
                "-h",
                &self.ctx.address.to_string(),
                "-p",
                &pg.port.to_string(),
            ],
        )
        .arg("-U")
        .arg(REPLICATION_USER)
        .arg("-D")
        .arg(dir.display().to_string())
        .arg("-Ft")
        .arg("-X")
        .arg("stream")
        .arg("--checkpoint=fast")
        .arg("--no-password")
        .env("PGPASSWORD", pg.replication_password().to_string())
        .env("PGCONNECT_TIMEOUT", "10")
        .run_as(PostgresDriver::account())
        .timeout(LONG);
        self.ctx.host.run(&cmd).await?.check(&cmd)?;
        let manifest_path = dir.join("backup_manifest");
        let manifest = std::fs::read_to_string(&manifest_path).map_err(DriverError::io(
            format!("reading {}", manifest_path.display()),
        ))?;
        let (start, end, timeline) = wal_range(&manifest)
            .ok_or_else(|| DriverError::Refused("backup_manifest names no WAL range".into()))?;
        let mut files = Vec::new();
        for name in BACKUP_FILES {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let size = std::fs::metadata(&path)
                .map_err(DriverError::io(format!("stat {}", path.display())))?
                .len();
            let sha256 = sha256_file(&path).await?;
            self.control
                .upload(
                    &format!("/backups/{}/files/{name}", spec.id),
                    &path,
                    &sha256,
                    LONG,
                )
                .await?;
            files.push(BackupFile {
                name: name.into(),
                size,
                sha256,
            });
        }
        Ok(BackupReport {
            files,
            wal_start_lsn: Some(start),
            wal_end_lsn: Some(end),
            timeline: Some(timeline),
            error: None,
        })
    }

    /// Ships what `archive_command` spooled, oldest first, deleting each
    /// file once adm1's store has it; forever.
    pub async fn ship_wal(self: Arc<Self>) {
        let spool = self.postgres.spool_dir();
        let mut complained = std::collections::HashSet::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut names: Vec<String> = match std::fs::read_dir(&spool) {
                Ok(d) => d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| corral_proto::backup::is_wal_file_name(n))
                    .collect(),
                Err(_) => continue,
            };
            names.sort();
            for name in names {
                let path = spool.join(&name);
                let shipped = async {
                    let sha = sha256_file(&path).await?;
                    self.control
                        .upload(
                            &format!("/wal/{name}"),
                            &path,
                            &sha,
                            Duration::from_secs(120),
                        )
                        .await?;
                    Ok::<_, DriverError>(())
                }
                .await;
                match shipped {
                    Ok(()) => {
                        if let Err(e) = std::fs::remove_file(&path) {
                            tracing::warn!(%name, error = %e, "removing a shipped WAL file failed");
                        }
                        complained.remove(&name);
                    }
                    Err(e) => {
                        if complained.insert(name.clone()) {
                            tracing::warn!(%name, error = %e, "shipping WAL failed; will retry");
                        }
                        break;
                    }
                }
            }
        }
    }

    fn restore_service(name: &str) -> String {
        format!("restore-{name}")
    }

    /// Restores a backup into the new instance `spec.name` and verifies it.
    #[tracing::instrument(skip_all, fields(node = %self.ctx.node, name = %spec.name))]
    pub async fn restore(&self, spec: &RestoreSpec) -> Result<String, DriverError> {
        corral_proto::backup::validate_restore_name(&spec.name).map_err(DriverError::Refused)?;
        let root = self.ctx.path(format!("restores/{}", spec.name));
        if let Ok(saved) = std::fs::read_to_string(root.join(REPORT_FILE)) {
            // This very restore finished before (the order again after an
            // agent restart): its report, nothing redone.
            return match serde_json::from_str::<RestoreReport>(&saved) {
                Ok(r) if r.backup_id == spec.backup_id && r.target_time == spec.target_time => {
                    Ok(saved)
                }
                _ => Err(DriverError::Refused(format!(
                    "a restore named {} already exists on {}",
                    spec.name, self.ctx.node
                ))),
            };
        }
        if root.exists() {
            // An attempt that never finished (its agent died): stop what it
            // left running and start over.
            let _ = self.stop_restored(spec, &root).await;
            let _ = std::fs::remove_dir_all(&root);
        }
        let started = Instant::now();
        let result = self.restore_into(spec, &root, started).await;
        if result.is_err() {
            // Nothing half-restored stays: stop it, remove it.
            let _ = self.ctx.host.stop(&Self::restore_service(&spec.name)).await;
            let _ = std::fs::remove_dir_all(&root);
        }
        result
    }

    /// Stops the instance of restore `spec.name` under `root`, also when
    /// this agent did not start it (it restarted since).
    async fn stop_restored(&self, spec: &RestoreSpec, root: &Path) -> Result<(), DriverError> {
        let service = self.restore_spec(
            spec,
            &root.join("pgdata"),
            &root.join("wal"),
            &root.join("sock"),
        );
        let _ = self.ctx.host.adopt(&service).await;
        self.ctx.host.stop(&service.name).await?;
        Ok(())
    }

    /// Stops every restored instance on this node, as a drain does: what
    /// was restored stays on disk until the machine goes.
    pub async fn stop_restores(&self) -> Result<usize, DriverError> {
        let Ok(entries) = std::fs::read_dir(self.ctx.path("restores")) else {
            return Ok(0);
        };
        let mut stopped = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if corral_proto::backup::validate_restore_name(&name).is_err() {
                continue;
            }
            let spec = RestoreSpec {
                name,
                backup_id: 0,
                target_time: None,
                port: 0,
                database: String::new(),
            };
            self.stop_restored(&spec, &entry.path()).await?;
            stopped += 1;
        }
        Ok(stopped)
    }

    async fn restore_into(
        &self,
        spec: &RestoreSpec,
        root: &Path,
        started: Instant,
    ) -> Result<String, DriverError> {
        let _ = std::fs::remove_dir_all(root);
        mkdir(&self.ctx.path("restores"))?;
        let pgdata = root.join("pgdata");
        let wal = root.join("wal");
        let sock = root.join("sock");
        let download = root.join("download");
        for d in [root, &pgdata, &wal, &sock, &download] {
            self.postgres.private_dir(d)?;
        }
        // The base backup, each file checked against its checksum.
        for name in BACKUP_FILES {
            let dest = download.join(name);
            self.control
                .download(
                    &format!("/backups/{}/files/{name}", spec.backup_id),
                    &dest,
                    LONG,
                )
                .await?;
            self.postgres.give(&dest)?;
        }
        let manifest = std::fs::read_to_string(download.join("backup_manifest"))
            .map_err(DriverError::io("reading the backup's manifest"))?;
        let (start, _, timeline) = wal_range(&manifest)
            .ok_or_else(|| DriverError::Refused("backup_manifest names no WAL range".into()))?;
        let start_segment = corral_proto::backup::segment_name(timeline, &start)
            .ok_or_else(|| DriverError::Refused(format!("bad WAL start {start}")))?;
        let names: Vec<String> = serde_json::from_value(
            self.control
                .get_json("/wal")
                .await
                .map_err(|e| DriverError::Refused(format!("listing the archived WAL: {e}")))?,
        )
        .map_err(|e| DriverError::Refused(format!("the WAL list: {e}")))?;
        let needed = wal_needed(&names, &start_segment);
        for name in &needed {
            let dest = wal.join(name.as_str());
            self.control
                .download(&format!("/wal/{name}"), &dest, Duration::from_secs(300))
                .await?;
            self.postgres.give(&dest)?;
        }
        self.untar(&download.join("base.tar"), &pgdata).await?;
        self.untar(&download.join("pg_wal.tar"), &pgdata.join("pg_wal"))
            .await?;
        let _ = std::fs::remove_dir_all(&download);
        for f in ["standby.signal", "postmaster.pid"] {
            let _ = std::fs::remove_file(pgdata.join(f));
        }
        let signal = pgdata.join("recovery.signal");
        std::fs::write(&signal, "").map_err(DriverError::io("writing recovery.signal"))?;
        self.postgres.give(&signal)?;

        let service = self.restore_spec(spec, &pgdata, &wal, &sock);
        self.ctx.host.ensure(&service).await?;
        self.wait_recovered(spec, &sock).await?;
        let report = self.verify(spec, &sock, needed.len(), started).await?;
        // Promoted: recovery reads no archived WAL any more.
        let _ = std::fs::remove_dir_all(&wal);
        let text =
            serde_json::to_string(&report).map_err(|e| DriverError::Refused(e.to_string()))?;
        crate::durable::write_atomic(&root.join(REPORT_FILE), text.as_bytes(), 0o600)
            .map_err(DriverError::io("saving the restore's report"))?;
        Ok(text)
    }

    async fn untar(&self, tar: &Path, into: &Path) -> Result<(), DriverError> {
        let cmd = OneShot::new("tar", &["-x", "-f"])
            .arg(tar.display().to_string())
            .arg("-C")
            .arg(into.display().to_string())
            .run_as(PostgresDriver::account())
            .timeout(LONG);
        self.ctx.host.run(&cmd).await?.check(&cmd)?;
        Ok(())
    }

    /// The restored instance: recovery to the target, then promotion to a
    /// server of its own. Settings a standby's `postgresql.auto.conf` may
    /// carry (following a primary, waiting for standbys) are overridden.
    fn restore_spec(
        &self,
        spec: &RestoreSpec,
        pgdata: &Path,
        wal: &Path,
        sock: &Path,
    ) -> ServiceSpec {
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
        let mut settings: Vec<(&str, String)> = vec![
            ("listen_addresses", self.ctx.address.to_string()),
            ("port", spec.port.to_string()),
            ("unix_socket_directories", sock.display().to_string()),
            ("hba_file", format!("{}/pg_hba.conf", pgdata.display())),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("hot_standby", "on".into()),
            ("archive_mode", "off".into()),
            ("primary_conninfo", String::new()),
            ("primary_slot_name", String::new()),
            ("synchronous_standby_names", String::new()),
            // `'/dir'/%f`: the shell joins the quoted directory and the name.
            ("restore_command", format!("cp {}/%f %p", quote(wal))),
            ("recovery_target_timeline", "latest".into()),
            ("recovery_target_action", "promote".into()),
        ];
        if let Some(t) = spec.target_time {
            settings.push((
                "recovery_target_time",
                t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            ));
        }
        let mut args = vec!["-D".to_string(), pgdata.display().to_string()];
        for (k, v) in settings {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        ServiceSpec {
            name: Self::restore_service(&spec.name),
            program: self.postgres.bin("postgres"),
            args,
            env: Vec::new(),
            run_as: PostgresDriver::account(),
            marker: pgdata.display().to_string(),
            stop_signal: Signal::SIGINT,
            restart: false,
        }
    }

    fn psql(&self, sock: &Path, port: u16, database: &str, sql: &str) -> OneShot {
        OneShot::new(
            self.postgres.bin("psql"),
            &[
                "-X",
                "-A",
                "-t",
                "-q",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ],
        )
        .arg("-d")
        .arg(database)
        .arg("-h")
        .arg(sock.display().to_string())
        .arg("-p")
        .arg(port.to_string())
        .stdin(format!("{};\n", sql.trim_end().trim_end_matches(';')))
        .timeout(Duration::from_secs(60))
    }

    async fn sql(
        &self,
        sock: &Path,
        spec: &RestoreSpec,
        database: &str,
        sql: &str,
    ) -> Result<String, DriverError> {
        let cmd = self.psql(sock, spec.port, database, sql);
        Ok(self
            .ctx
            .host
            .run(&cmd)
            .await?
            .check(&cmd)?
            .stdout
            .trim()
            .to_string())
    }

    /// Waits until recovery has reached its target and the instance has
    /// promoted itself; an instance that exits (the target was not
    /// reached, a segment is missing) fails the restore with its log.
    async fn wait_recovered(&self, spec: &RestoreSpec, sock: &Path) -> Result<(), DriverError> {
        let service = Self::restore_service(&spec.name);
        let deadline = Instant::now() + LONG;
        loop {
            if let Ok(out) = self
                .sql(sock, spec, "postgres", "SELECT pg_is_in_recovery()")
                .await
                && out == "f"
            {
                return Ok(());
            }
            let running = self
                .ctx
                .host
                .services()
                .iter()
                .any(|s| s.name == service && s.running);
            if !running || Instant::now() > deadline {
                let log = self.log_tail(&service);
                let hint = if log.contains("before configured recovery target was reached") {
                    " The archived WAL ends before the target time: recovery stops at the \
                     first commit after it, so one must be archived (the primary ships its \
                     current segment within archive_timeout, 60 s); choose an earlier time \
                     or try again later."
                } else {
                    ""
                };
                return Err(DriverError::Refused(format!(
                    "recovery did not complete{}; the restore is removed.{hint} PostgreSQL said:\n{log}",
                    if running { " in time" } else { "" },
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn log_tail(&self, service: &str) -> String {
        let log = std::fs::read_to_string(self.ctx.path(format!("logs/{service}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn verify(
        &self,
        spec: &RestoreSpec,
        sock: &Path,
        wal_segments: usize,
        started: Instant,
    ) -> Result<RestoreReport, DriverError> {
        let counts = self
            .sql(
                sock,
                spec,
                &spec.database,
                "SELECT table_schema || '.' || table_name, \
                 (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', \
                 table_schema, table_name), false, true, '')))[1]::text \
                 FROM information_schema.tables \
                 WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema') \
                 ORDER BY 1",
            )
            .await?;
        let row_counts = counts
            .lines()
            .filter_map(|l| {
                let (t, n) = l.split_once('\t')?;
                Some((t.to_string(), n.trim().parse().ok()?))
            })
            .collect();
        let last = self
            .sql(
                sock,
                spec,
                "postgres",
                "SELECT pg_last_xact_replay_timestamp()",
            )
            .await?;
        Ok(RestoreReport {
            name: spec.name.clone(),
            backup_id: spec.backup_id,
            target_time: spec.target_time,
            listen: format!("{}:{}", self.ctx.address, spec.port),
            row_counts,
            last_replayed: (!last.is_empty()).then_some(last),
            wal_segments,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnrollSecretSource;
    use crate::durable::StateDir;
    use crate::host::Host;
    use crate::host::fake::{Call, FakeHost};

    /// A driver on adm1 whose control plane is unreachable.
    fn driver(dir: &Path) -> (BackupDriver, Arc<FakeHost>) {
        let host = Arc::new(FakeHost::default());
        let ctx = Arc::new(NodeContext::for_test(
            "adm1",
            [127, 0, 99, 5].into(),
            dir,
            host.clone(),
            false,
        ));
        let control = ControlPlane::new(
            &["http://127.0.0.1:9".to_string()],
            "adm1",
            EnrollSecretSource {
                value: Some("secret".into()),
                file: None,
            },
            None,
            StateDir::open(dir).expect("state"),
        )
        .expect("client");
        let postgres = Arc::new(PostgresDriver::new(ctx.clone()));
        (BackupDriver::new(ctx, postgres, Arc::new(control)), host)
    }

    fn spec(backup_id: i64) -> RestoreSpec {
        RestoreSpec {
            name: "r1".into(),
            backup_id,
            target_time: None,
            port: 5433,
            database: "todomvc".into(),
        }
    }

    #[tokio::test]
    async fn a_finished_restore_ordered_again_answers_its_report_and_redoes_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (driver, host) = driver(dir.path());
        let root = dir.path().join("restores/r1");
        std::fs::create_dir_all(&root).expect("mkdir");
        let report = RestoreReport {
            name: "r1".into(),
            backup_id: 3,
            target_time: None,
            listen: "127.0.99.5:5433".into(),
            row_counts: vec![("public.todos".into(), 10)],
            last_replayed: None,
            wal_segments: 2,
            seconds: 1.0,
        };
        let saved = serde_json::to_string(&report).expect("json");
        std::fs::write(root.join(REPORT_FILE), &saved).expect("write");
        assert_eq!(driver.restore(&spec(3)).await.expect("again"), saved);
        let other = driver.restore(&spec(4)).await.expect_err("another backup");
        assert!(other.to_string().contains("already exists"), "{other}");
        assert!(host.calls().is_empty(), "{:?}", host.calls());
        assert!(root.join(REPORT_FILE).exists());
    }

    #[tokio::test]
    async fn an_interrupted_restore_is_stopped_and_removed_and_a_failed_one_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (driver, host) = driver(dir.path());
        let root = dir.path().join("restores/r1");
        std::fs::create_dir_all(root.join("pgdata")).expect("mkdir");
        std::fs::write(root.join("pgdata/PG_VERSION"), "15").expect("write");
        // What the agent that died left running.
        let leftover = driver.restore_spec(
            &spec(3),
            &root.join("pgdata"),
            &root.join("wal"),
            &root.join("sock"),
        );
        host.ensure(&leftover).await.expect("running");
        let err = driver
            .restore(&spec(3))
            .await
            .expect_err("no control plane");
        assert!(
            host.calls().contains(&Call::Stop("restore-r1".into())),
            "{:?}",
            host.calls()
        );
        assert!(!root.exists(), "the failed attempt left {}", root.display());
        assert!(!err.to_string().is_empty());
    }

    #[tokio::test]
    async fn stopping_restores_stops_each_restored_instance_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tmp");
        let (driver, host) = driver(dir.path());
        assert_eq!(driver.stop_restores().await.expect("none"), 0);
        for name in ["r1", "r2"] {
            let root = dir.path().join("restores").join(name);
            std::fs::create_dir_all(root.join("pgdata")).expect("mkdir");
            let mut s = spec(3);
            s.name = name.into();
            let running = driver.restore_spec(
                &s,
                &root.join("pgdata"),
                &root.join("wal"),
                &root.join("sock"),
            );
            host.ensure(&running).await.expect("running");
        }
        // Not a restore's directory: left alone.
        std::fs::create_dir_all(dir.path().join("restores/.partial")).expect("mkdir");
        assert_eq!(driver.stop_restores().await.expect("stopped"), 2);
        let calls = host.calls();
        for name in ["restore-r1", "restore-r2"] {
            assert!(calls.contains(&Call::Stop(name.into())), "{calls:?}");
        }
        assert!(dir.path().join("restores/r1/pgdata").exists());
    }

    #[test]
    fn the_wal_range_comes_from_the_manifest() {
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{"Timeline": 2, "Start-LSN": "0/5000028", "End-LSN": "0/5000100"}]}"#;
        assert_eq!(
            wal_range(manifest),
            Some(("0/5000028".into(), "0/5000100".into(), 2))
        );
        assert_eq!(wal_range("{}"), None);
    }

    #[test]
    fn a_restore_takes_the_histories_and_the_segments_from_the_backups_on() {
        let names: Vec<String> = [
            "00000002.history",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005.00000028.backup",
            "000000020000000000000005",
            "000000010000000000000006.partial",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let needed: Vec<&str> = wal_needed(&names, "000000010000000000000004")
            .into_iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            needed,
            vec![
                "00000002.history",
                "000000010000000000000004",
                "000000020000000000000005"
            ]
        );
    }
}
