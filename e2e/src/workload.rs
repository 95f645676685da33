//! The list-append workload of the history checker ([`crate::history`])
//! under a fault schedule. A run is a series of rounds; each round gets
//! fresh keys (`r<N>k<K>`), one fault, and is checked on its own against the
//! list read from the primary when its clients have stopped. The table is
//! emptied between rounds so every read stays one whole list.
//!
//! Clients in a round, all recorded:
//! - two sessions (keeping their `todomvc_lsn` cookie) appending and
//!   reading through the load balancers;
//! - two cookieless clients appending and reading through them;
//! - two cookieless readers;
//! - one writer straight on whichever db node is the primary (sqlx).
//!
//! Faults ([`Fault::schedule`]): postgres SIGKILLed on the primary, a
//! switchover, the primary node frozen whole for 10 s (SIGSTOP of agent,
//! Consul and postgres; `lxc-freeze` on LXC), and the whole primary node
//! SIGKILLed (local) or cut off from every other node for 10 s (LXC).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::postgres::PgConnection;

use crate::faults::{Freeze, Frozen, Partition, node_processes, signal_all};
use crate::history::{Append, History, Outcome, Read, Summary, check};
use crate::pg::{connect_primary, db_nodes, kill_postgres, sole_primary, sql, streams_from};
use crate::writes::{LONG, switchover};
use crate::{Cluster, Machines, eventually};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillPostgres,
    Switchover,
    /// The primary node hung whole for 10 s: SIGSTOP of its processes
    /// (local), `lxc-freeze` of its container (LXC).
    Freeze,
    /// Every process of the primary node SIGKILLed (local only).
    KillNode,
    /// The primary cut off from every other node for 10 s (LXC only).
    Partition,
}

impl Fault {
    /// The faults a run cycles through on these machines.
    pub fn schedule(machines: Machines) -> Vec<Fault> {
        match machines {
            Machines::Local => vec![
                Fault::KillPostgres,
                Fault::Switchover,
                Fault::Freeze,
                Fault::KillNode,
            ],
            Machines::Lxc => vec![
                Fault::KillPostgres,
                Fault::Switchover,
                Fault::Freeze,
                Fault::Partition,
            ],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPostgres => "kill postgres",
            Fault::Switchover => "switchover",
            Fault::Freeze => "freeze node 10 s",
            Fault::KillNode => "kill node",
            Fault::Partition => "partition primary 10 s",
        }
    }
}

/// What one round did and found.
#[derive(Debug)]
pub struct RoundReport {
    pub round: usize,
    pub fault: Fault,
    pub summary: Summary,
    pub anomalies: Vec<String>,
}

/// An append between this often per client, so a round's list stays well
/// under the webapp's 1,000-todo page.
const APPEND_EVERY: Duration = Duration::from_millis(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frozen or partitioned primary stays so.
const HUNG: Duration = Duration::from_secs(10);

struct Recorder {
    start: Instant,
    history: Mutex<History>,
    stop: AtomicBool,
    acked: AtomicU64,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    fn append(&self, process: usize, value: String, invoke: u64, outcome: Outcome) {
        let complete = self.now();
        if outcome == Outcome::Ok {
            self.acked.fetch_add(1, Ordering::SeqCst);
        }
        self.history.lock().expect("lock").appends.push(Append {
            process,
            value,
            invoke,
            complete,
            outcome,
        });
    }
    fn read(
        &self,
        process: usize,
        invoke: u64,
        values: Vec<String>,
        from_replica: bool,
        via: String,
    ) {
        let complete = self.now();
        self.history.lock().expect("lock").reads.push(Read {
            process,
            invoke,
            complete,
            values,
            from_replica,
            via,
        });
    }
}

/// What an HTTP append's answer says about it.
fn outcome(res: &Result<reqwest::Response, reqwest::Error>) -> Outcome {
    match res {
        Ok(r) if r.status().as_u16() == 201 => Outcome::Ok,
        Ok(r) if r.status().is_client_error() => Outcome::Failed,
        // Never sent: the connection was refused.
        Err(e) if e.is_connect() => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

/// A client through a load balancer: appends (if `appends`) and reads in
/// turn, keeping the session cookie if `session`.
async fn web_client(
    rec: Arc<Recorder>,
    process: usize,
    url: String,
    prefix: String,
    session: bool,
    appends: bool,
) {
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");
    let mut cookie: Option<String> = None;
    let mut n = 0u64;
    let mut last_append = Instant::now() - APPEND_EVERY;
    while !rec.stop.load(Ordering::SeqCst) {
        let with_cookie = |req: reqwest::RequestBuilder, cookie: &Option<String>| match cookie {
            Some(c) if session => req.header("Cookie", c),
            _ => req,
        };
        let keep = |res: &reqwest::Response, cookie: &mut Option<String>| {
            if let Some(set) = res
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                && let Some(pair) = set.split(';').next()
            {
                *cookie = Some(pair.trim().to_string());
            }
        };
        if appends && last_append.elapsed() >= APPEND_EVERY {
            last_append = Instant::now();
            let value = format!("{prefix}k{}:p{process}-{n}", n % 3);
            n += 1;
            let invoke = rec.now();
            let res = with_cookie(http.request(Method::POST, &url), &cookie)
                .json(&json!({ "title": value }))
                .send()
                .await;
            if let Ok(r) = &res {
                keep(r, &mut cookie);
            }
            rec.append(process, value, invoke, outcome(&res));
            continue;
        }
        let invoke = rec.now();
        let res = with_cookie(http.request(Method::GET, &url), &cookie)
            .send()
            .await;
        let Ok(res) = res else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        keep(&res, &mut cookie);
        let from_replica = res
            .headers()
            .get("x-read-from")
            .is_some_and(|v| v.as_bytes() == b"replica");
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string()
        };
        let via = format!("{} via {}", header("x-read-from"), header("x-served-by"));
        let ok = res.status().as_u16() == 200;
        let Ok(body) = res.json::<Value>().await else {
            continue;
        };
        if !ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let values = body
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["title"].as_str())
            .filter(|t| t.starts_with(&prefix))
            .map(String::from)
            .collect();
        rec.read(process, invoke, values, from_replica, via);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends straight on whichever db node is out of recovery, reconnecting
/// after every error.
async fn direct_writer(
    rec: Arc<Recorder>,
    process: usize,
    nodes: Vec<String>,
    password: String,
    prefix: String,
) {
    let mut conn: Option<PgConnection> = None;
    let (mut n, mut next) = (0u64, 0usize);
    while !rec.stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            let addr = &nodes[next % nodes.len()];
            next += 1;
            if let Ok(Some(c)) = connect_primary(addr, &password).await {
                conn = Some(c);
                continue;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let value = format!("{prefix}k{}:d{process}-{n}", n % 3);
        n += 1;
        let invoke = rec.now();
        let res = tokio::time::timeout(
            REQUEST_TIMEOUT,
            sqlx::query("INSERT INTO todos (title) VALUES ($1)")
                .bind(&value)
                .execute(&mut *c),
        )
        .await;
        let ok = matches!(res, Ok(Ok(_)));
        rec.append(
            process,
            value,
            invoke,
            if ok { Outcome::Ok } else { Outcome::Unknown },
        );
        if !ok {
            conn = None;
        }
        tokio::time::sleep(APPEND_EVERY).await;
    }
}

/// One primary, and every other db node streaming from it.
async fn healthy(c: &Cluster) -> anyhow::Result<String> {
    eventually("a primary with every standby streaming", LONG, || async {
        let primary = sole_primary(c).await?;
        for node in db_nodes(c).into_iter().filter(|n| *n != primary) {
            if !streams_from(c, &node, &primary).await? {
                return Ok(None);
            }
        }
        Ok(Some(primary))
    })
    .await
}

async fn inject(c: &Cluster, fault: Fault, primary: &str) -> anyhow::Result<()> {
    match fault {
        Fault::KillPostgres => kill_postgres(c, primary).await?,
        Fault::Switchover => {
            let to = db_nodes(c)
                .into_iter()
                .find(|n| n != primary)
                .ok_or_else(|| anyhow::anyhow!("a second db node"))?;
            switchover(c, &to).await?;
        }
        Fault::Freeze if c.machines == Machines::Lxc => {
            let frozen = Freeze::node(c, primary).await?;
            tokio::time::sleep(HUNG).await;
            frozen.thaw().await?;
        }
        Fault::Freeze => {
            let frozen = Frozen(node_processes(c, primary)?);
            signal_all(&frozen.0, Signal::SIGSTOP);
            tokio::time::sleep(HUNG).await;
            drop(frozen);
        }
        Fault::KillNode => {
            anyhow::ensure!(
                c.machines == Machines::Local,
                "kill node runs on the local provider"
            );
            let pids = node_processes(c, primary)?;
            signal_all(&pids, Signal::SIGSTOP);
            signal_all(&pids, Signal::SIGKILL);
        }
        Fault::Partition => {
            let others: Vec<String> = c
                .machine_names()
                .into_iter()
                .filter(|n| n != primary)
                .collect();
            let others: Vec<&str> = others.iter().map(String::as_str).collect();
            let cut = Partition::cut(c, &[primary], &others).await?;
            tokio::time::sleep(HUNG).await;
            cut.heal().await;
        }
    }
    Ok(())
}

/// Runs round `round` for about `length`: its clients against `lbs` (load
/// balancer node names) and the primary, its fault a quarter of the way
/// in; then checks its history.
pub async fn round(
    c: &Cluster,
    lbs: &[&str],
    password: &str,
    round: usize,
    length: Duration,
    fault: Fault,
) -> anyhow::Result<RoundReport> {
    let primary = healthy(c).await?;
    let prefix = format!("r{round}");
    let rec = Arc::new(Recorder {
        start: Instant::now(),
        history: Mutex::new(History::default()),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for (process, (session, appends)) in [
        (true, true),
        (true, true),
        (false, true),
        (false, true),
        (false, false),
        (false, false),
    ]
    .into_iter()
    .enumerate()
    {
        if session {
            rec.history.lock().expect("lock").sessions.insert(process);
        }
        let url = c.lb(lbs[process % lbs.len()], "/todos");
        tasks.push(tokio::spawn(web_client(
            rec.clone(),
            process,
            url,
            prefix.clone(),
            session,
            appends,
        )));
    }
    let nodes: Vec<String> = db_nodes(c).iter().map(|n| c.address(n)).collect();
    tasks.push(tokio::spawn(direct_writer(
        rec.clone(),
        6,
        nodes,
        password.to_string(),
        prefix.clone(),
    )));

    let started = Instant::now();
    tokio::time::sleep(length / 4).await;
    let injected = inject(c, fault, &primary).await;
    // Appends flow again (or the round's time is up), then the round ends.
    let after = rec.acked.load(Ordering::SeqCst);
    let resumed = eventually(
        &format!("appends to resume after {}", fault.name()),
        LONG,
        || async { Ok((rec.acked.load(Ordering::SeqCst) >= after + 10).then_some(())) },
    )
    .await;
    if let Some(rest) = length.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    rec.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    injected?;
    resumed?;

    let primary = healthy(c).await?;
    let stored = sql(
        c,
        &primary,
        "SELECT title FROM todos ORDER BY \"order\" NULLS LAST, id",
    )
    .await?;
    let final_list: Vec<String> = stored
        .lines()
        .filter(|t| t.starts_with(&prefix))
        .map(String::from)
        .collect();
    let history = std::mem::take(&mut *rec.history.lock().expect("lock"));
    let (summary, anomalies) = match check(&history, &final_list) {
        Ok(s) => (s, Vec::new()),
        Err(a) => (Summary::default(), a),
    };
    // The next round starts from an empty list.
    sql(c, &primary, "DELETE FROM todos").await?;
    Ok(RoundReport {
        round,
        fault,
        summary,
        anomalies,
    })
}
