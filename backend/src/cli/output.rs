//! How the CLI prints: aligned tables for people, JSON for scripts.

use corral_proto::{
    Backup, BackupStatus, Event, LogLine, Node, OffsiteStatus, Order, ReplicationRole,
    RestoreReport, Role, SwitchoverAccepted, Topology, TopologyChange,
};
use serde::Serialize;

use super::Format;

pub struct Output {
    format: Format,
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn replication_role(role: ReplicationRole) -> &'static str {
    match role {
        ReplicationRole::Primary => "primary",
        ReplicationRole::Replica => "replica",
        ReplicationRole::Fenced => "fenced",
    }
}

fn ago(at: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match at {
        None => "-".into(),
        Some(at) => {
            let secs = (chrono::Utc::now() - at).num_seconds().max(0);
            match secs {
                0..=119 => format!("{secs}s ago"),
                120..=7199 => format!("{}m ago", secs / 60),
                _ => format!("{}h ago", secs / 3600),
            }
        }
    }
}

impl Output {
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    pub fn message(&self, text: &str) -> anyhow::Result<()> {
        if self.format == Format::Table {
            eprintln!("{text}");
        }
        Ok(())
    }

    pub fn nodes(&self, nodes: &[Node]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(nodes);
        }
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.role.to_string(),
                    n.address.clone(),
                    n.provider.to_string(),
                    n.state.to_string(),
                    format!("{:?}", n.health).to_lowercase(),
                    n.last_seq.to_string(),
                    ago(n.last_heartbeat),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ROLE",
                "ADDRESS",
                "PROVIDER",
                "STATE",
                "HEALTH",
                "ORDERS",
                "HEARTBEAT",
            ],
            &rows,
        );
        Ok(())
    }

    pub fn node(&self, node: &Node) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(node);
        }
        self.nodes(std::slice::from_ref(node))?;
        if let Some(observed) = &node.observed {
            println!();
            for s in &observed.services {
                println!(
                    "  {:<10} {:?}{}",
                    s.name,
                    s.state,
                    s.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
            }
            if let Some(r) = &observed.replication {
                println!(
                    "  replication: {}, lag {} bytes / {} ms, timeline {}{}",
                    replication_role(r.role),
                    r.lag_bytes.map_or("?".into(), |b| b.to_string()),
                    r.lag_ms.map_or("?".into(), |ms| ms.to_string()),
                    r.timeline.map_or("?".into(), |t| t.to_string()),
                    if r.degraded {
                        "; degraded: commits do not wait for a standby"
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(())
    }

    /// The db nodes and what each reports about replication.
    pub fn db_status(&self, nodes: &[Node]) -> anyhow::Result<()> {
        let db: Vec<&Node> = nodes.iter().filter(|n| n.role == Role::Db).collect();
        if self.format == Format::Json {
            return print_json(&db);
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let rows: Vec<Vec<String>> = db
            .iter()
            .map(|n| {
                let r = n.observed.as_ref().and_then(|o| o.replication.as_ref());
                vec![
                    n.name.clone(),
                    format!("{:?}", n.health).to_lowercase(),
                    opt(r.map(|r| replication_role(r.role).into())),
                    opt(r.and_then(|r| r.state.clone())),
                    opt(r.and_then(|r| r.timeline).map(|t| t.to_string())),
                    opt(r.and_then(|r| r.lag_bytes).map(|b| b.to_string())),
                    opt(r.and_then(|r| r.lag_ms).map(|ms| ms.to_string())),
                    opt(r.and_then(|r| r.sync_standby.clone())),
                    opt(r.and_then(|r| r.leader.clone())),
                    if r.is_some_and(|r| r.degraded) {
                        "degraded: commits do not wait for a standby".into()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "HEALTH",
                "ROLE",
                "STATE",
                "TIMELINE",
                "LAG_BYTES",
                "LAG_MS",
                "SYNC_STANDBY",
                "LEADER",
                "NOTE",
            ],
            &rows,
        );
        Ok(())
    }

    /// A new enrollment secret: the secret alone on stdout (to pipe into
    /// the node's secret file), how to use it on stderr.
    pub fn enroll_secret(&self, s: &corral_proto::EnrollSecret) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(s);
        }
        println!("{}", s.secret);
        eprintln!(
            "{}'s enrollment secret: single-use, valid until {}. Put it on the node \
             (enroll-secret-file in /etc/corral/agent.conf, mode 0600); its agent enrolls \
             with it and its previous token stops working.",
            s.node,
            s.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
        Ok(())
    }

    pub fn backups(&self, backups: &[Backup]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(backups);
        }
        let now = chrono::Utc::now();
        let rows: Vec<Vec<String>> = backups
            .iter()
            .map(|b| {
                vec![
                    b.id.to_string(),
                    b.node.clone(),
                    b.status.as_str().into(),
                    b.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    b.finished_at
                        .map(|f| format!("{}s ago", (now - f).num_seconds()))
                        .unwrap_or_else(|| "-".into()),
                    format!("{:.1} MB", b.size_bytes as f64 / 1e6),
                    b.wal_start_lsn.clone().unwrap_or_else(|| "-".into()),
                    b.trigger.clone(),
                    match (b.status, b.s3_copied_at) {
                        (_, Some(_)) => "copied".into(),
                        (BackupStatus::Done, None) => "not yet".into(),
                        _ => "-".into(),
                    },
                    b.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &[
                "ID",
                "NODE",
                "STATUS",
                "STARTED",
                "FINISHED",
                "SIZE",
                "WAL_START",
                "BY",
                "S3",
                "ERROR",
            ],
            &rows,
        );
        Ok(())
    }

    /// Below the backups: where the offsite copy stands (table only; the
    /// JSON of `GET /backups/status` carries it).
    pub fn offsite(&self, s3: Option<&OffsiteStatus>) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return Ok(());
        }
        match s3 {
            None => println!("S3 copy: not configured (corral serve --s3-endpoint/--s3-bucket)"),
            Some(s) => {
                println!(
                    "S3 copy: bucket {} at {} (prefix {:?}), {} files to copy",
                    s.bucket, s.endpoint, s.prefix, s.pending_files
                );
                if let Some(e) = &s.last_error {
                    let since = s
                        .failing_since
                        .map(|t| t.format(" since %Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_default();
                    println!("S3 copy FAILING{since}: {e}");
                }
            }
        }
        Ok(())
    }

    /// A restore order's result: its verification report (JSON).
    pub fn restore_report(&self, result: &str) -> anyhow::Result<()> {
        let report: RestoreReport = match serde_json::from_str(result) {
            Ok(r) => r,
            Err(_) => {
                println!("{result}");
                return Ok(());
            }
        };
        if self.format == Format::Json {
            return print_json(&report);
        }
        println!(
            "restored backup {} into {} ({}) in {:.1}s, {} WAL files replayed{}",
            report.backup_id,
            report.name,
            report.listen,
            report.seconds,
            report.wal_segments,
            report
                .target_time
                .map(|t| format!(" up to {}", t.to_rfc3339()))
                .unwrap_or_default()
        );
        println!(
            "last replayed commit: {}",
            report.last_replayed.as_deref().unwrap_or("none")
        );
        let rows: Vec<Vec<String>> = report
            .row_counts
            .iter()
            .map(|(t, n)| vec![t.clone(), n.to_string()])
            .collect();
        table(&["TABLE", "ROWS"], &rows);
        Ok(())
    }

    pub fn switchover(&self, a: &SwitchoverAccepted) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(a);
        }
        println!(
            "switchover {} -> {}: order {} filed on {}",
            a.from, a.to, a.seq, a.from
        );
        Ok(())
    }

    pub fn switchover_done(&self, a: &SwitchoverAccepted, order: &Order) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(order);
        }
        println!(
            "switchover {} -> {} {}: {}",
            a.from,
            a.to,
            order.status,
            order.result.as_deref().unwrap_or("")
        );
        Ok(())
    }

    pub fn orders(&self, orders: &[Order]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(orders);
        }
        let rows: Vec<Vec<String>> = orders
            .iter()
            .map(|o| {
                let mut payload = serde_json::to_value(&o.payload).unwrap_or_default();
                if let Some(map) = payload.as_object_mut() {
                    map.remove("kind");
                    // Secrets stay out of terminal scrollback.
                    for secret in ["password", "replication_password", "encrypt"] {
                        if map.contains_key(secret) {
                            map.insert(secret.into(), "***".into());
                        }
                    }
                }
                vec![
                    o.seq.to_string(),
                    o.payload.kind().to_string(),
                    o.status.to_string(),
                    o.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    payload.to_string(),
                ]
            })
            .collect();
        table(&["SEQ", "KIND", "STATUS", "FILED", "SPEC"], &rows);
        Ok(())
    }

    pub fn events(&self, events: &[Event]) -> anyhow::Result<()> {
        match self.format {
            Format::Json => {
                for e in events {
                    println!("{}", serde_json::to_string(e)?);
                }
            }
            Format::Table => {
                for e in events {
                    println!(
                        "{:>6}  {}  {:<16} {:<18} {}",
                        e.id,
                        e.at.format("%Y-%m-%d %H:%M:%S"),
                        e.actor,
                        e.kind,
                        e.message
                    );
                }
            }
        }
        Ok(())
    }

    pub fn log_lines(&self, lines: &[LogLine]) -> anyhow::Result<()> {
        for l in lines {
            match self.format {
                Format::Json => println!("{}", serde_json::to_string(l)?),
                Format::Table => println!(
                    "{}  {:<10} {}",
                    l.at.format("%Y-%m-%d %H:%M:%S"),
                    l.service,
                    l.line
                ),
            }
        }
        Ok(())
    }

    pub fn topology(&self, t: &Topology) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(t);
        }
        table(
            &["WEB", "DB", "LB_POLICY", "REPLICATION", "BACKUP", "UPDATED"],
            &[vec![
                t.web.to_string(),
                t.db.to_string(),
                t.lb_policy.to_string(),
                t.replication.to_string(),
                t.backup
                    .as_ref()
                    .map(|b| format!("daily {} UTC, keep {}", b.schedule, b.keep))
                    .unwrap_or_else(|| "-".into()),
                t.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]],
        );
        Ok(())
    }

    pub fn change(&self, c: &TopologyChange) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return print_json(c);
        }
        self.topology(&c.topology)?;
        if !c.created.is_empty() {
            println!("created:  {}", c.created.join(", "));
        }
        if !c.draining.is_empty() {
            println!("draining: {}", c.draining.join(", "));
        }
        println!("orders filed: {}", c.orders_filed);
        Ok(())
    }
}
