//! Backups at a glance, under the PostgreSQL tier: the last backup that
//! finished and its age, the schedule, a red "overdue" badge when a
//! scheduled backup is late, where the offsite S3 copy stands (a red
//! "S3 copy failing" badge and its cause while it fails), and "Back up
//! now" (`POST /backups`). Fetched again whenever a backup or topology
//! event arrives.

use corral_proto::BackupsStatus;
use yew::prelude::*;

use super::console::use_ctx;
use crate::time::{ago, now_ms, stamp};

#[derive(Clone, PartialEq)]
enum Outcome {
    Idle,
    Running,
    Ordered(String),
    Refused(String),
}

#[component]
pub fn BackupPanel() -> Html {
    let ctx = use_ctx();
    let status = use_state(|| None::<BackupsStatus>);
    let outcome = use_state(|| Outcome::Idle);
    // The newest event that may change what is shown.
    let changes = ctx
        .state
        .events
        .iter()
        .filter(|e| e.kind.starts_with("backup.") || e.kind == "topology.updated")
        .map(|e| e.id)
        .max();
    {
        let (ctx, status) = (ctx.clone(), status.clone());
        use_effect_with(changes, move |_| {
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.backups_status().await {
                    Ok(s) => status.set(Some(s)),
                    Err(e) if e.is_unauthorized() => ctx.fail(e),
                    Err(_) => {}
                }
            });
        });
    }
    let onclick = {
        let (ctx, outcome) = (ctx.clone(), outcome.clone());
        Callback::from(move |_: MouseEvent| {
            outcome.set(Outcome::Running);
            let (ctx, outcome) = (ctx.clone(), outcome.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.backup_now().await {
                    Ok(b) => outcome.set(Outcome::Ordered(format!(
                        "Backup {} ordered on {}.",
                        b.id, b.node
                    ))),
                    Err(e) if e.is_unauthorized() => {
                        outcome.set(Outcome::Idle);
                        ctx.fail(e);
                    }
                    Err(e) => outcome.set(Outcome::Refused(e.to_string())),
                }
            });
        })
    };
    let now = now_ms();
    let running = *outcome == Outcome::Running;
    let last = status.as_ref().and_then(|s| s.last_done.clone());
    let overdue = status.as_ref().is_some_and(|s| s.overdue);
    let schedule = status.as_ref().and_then(|s| s.schedule.clone());
    let s3 = status.as_ref().and_then(|s| s.s3.clone());
    let s3_failing = s3.as_ref().is_some_and(|s| s.last_error.is_some());
    html! {
        <section class="backups" aria-labelledby="backups-title">
            <h3 id="backups-title">
                { "Backups" }
                if overdue {
                    <span class="badge overdue" role="status">{ "overdue" }</span>
                }
                if s3_failing {
                    <span class="badge s3-failing" role="status">{ "S3 copy failing" }</span>
                }
            </h3>
            <p class="last-backup" data-last-backup="">
                { match &last {
                    Some(b) => format!(
                        "Last backup: #{} from {}, {} ({:.1} MB){}",
                        b.id,
                        b.node,
                        b.finished_at.map(|f| ago(f, now)).unwrap_or_default(),
                        b.size_bytes as f64 / 1e6,
                        b.finished_at.map(|f| format!(" — {}", stamp(f))).unwrap_or_default(),
                    ),
                    None => "No backup yet.".to_string(),
                } }
            </p>
            <p class="schedule">
                { match &schedule {
                    Some(s) => format!("Daily at {} UTC, keeping {}.", s.schedule, s.keep),
                    None => "No schedule: corral topology set --backup-schedule HH:MM --backup-keep N.".to_string(),
                } }
            </p>
            <p class="offsite" data-offsite="">
                { match &s3 {
                    Some(s) => {
                        let copied = match &last {
                            Some(b) if b.s3_copied_at.is_some() => "last backup copied",
                            Some(_) => "last backup not copied yet",
                            None => "nothing to copy yet",
                        };
                        format!(
                            "Offsite: S3 bucket {} at {} — {copied}, {} files waiting.",
                            s.bucket, s.endpoint, s.pending_files
                        )
                    }
                    None => "Offsite: no S3 bucket (corral serve --s3-endpoint URL --s3-bucket B).".to_string(),
                } }
            </p>
            if let Some(error) = s3.as_ref().and_then(|s| s.last_error.clone()) {
                <p class="error" role="alert">{ format!("S3 copy failing: {error}") }</p>
            }
            <button type="button" class="primary" {onclick} disabled={running}>
                { if running { "Ordering backup…" } else { "Back up now" } }
            </button>
            if let Outcome::Ordered(text) = &*outcome {
                <p class="applied" role="status">{ text }</p>
            }
            if let Outcome::Refused(text) = &*outcome {
                <p class="error" role="alert">{ format!("Backup refused: {text}") }</p>
            }
        </section>
    }
}
