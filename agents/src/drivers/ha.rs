//! The decisions of PostgreSQL high availability, kept free of I/O so they
//! can be tested alone. The loop that acts on them lives in
//! [`super::postgres`].
//!
//! Every db node's agent publishes a *member* record in Consul KV each tick
//! (role, WAL position, timeline); the primary holds a session lock on the
//! leader key. When the lock is free, a standby may take it only when it is
//! the best candidate: the furthest ahead of the standbys that report, and —
//! in `sync`/`strict` mode — only when every standby reports, because any one
//! of them may be the one that acknowledged the latest commits.

use std::net::IpAddr;
use std::time::Duration;

use corral_proto::ReplicationMode;
use serde::{Deserialize, Serialize};

/// How often the HA loop runs.
pub const TICK: Duration = Duration::from_millis(500);

// The timing the safety of fencing rests on (docs/ARCHITECTURE.md, "Timing
// of a failover"). Consul's LAN gossip, as corral configures every agent
// (`gossip_lan`): a node is probed every GOSSIP_PROBE_INTERVAL, a probe
// fails after GOSSIP_PROBE_TIMEOUT (then indirect probes until the end of
// the interval), and a suspected node is declared failed after at least
// GOSSIP_SUSPICION_MULT intervals (for fewer than ten nodes; longer until
// other nodes confirm the suspicion). Consul's defaults, 1 s / 500 ms / 4,
// took 5.5-5.9 s to declare a frozen node failed; these 1.6-2.2 s.

/// Consul's `gossip_lan.probe_interval`.
pub const GOSSIP_PROBE_INTERVAL: Duration = Duration::from_millis(300);
/// Consul's `gossip_lan.probe_timeout`.
pub const GOSSIP_PROBE_TIMEOUT: Duration = Duration::from_millis(150);
/// Consul's `gossip_lan.suspicion_mult`.
pub const GOSSIP_SUSPICION_MULT: u32 = 3;
/// The soonest gossip can declare a node failed after it went silent (and
/// end its sessions): the probe sent just before, failed at the end of its
/// interval, then the shortest suspicion.
pub const SERF_DETECT_MIN: Duration = Duration::from_millis(
    GOSSIP_PROBE_INTERVAL.as_millis() as u64 * (1 + GOSSIP_SUSPICION_MULT as u64),
);
/// After a leader session dies, nobody may take its lock for this long.
pub const LOCK_DELAY: Duration = Duration::from_secs(1);
/// A primary that has not confirmed its lock for this long stops itself
/// (fencing).
pub const FENCE_AFTER: Duration = Duration::from_millis(1500);
/// How often the fencing watchdog looks.
pub const WATCHDOG_EVERY: Duration = Duration::from_millis(100);
/// How long a confirmation read through a Consul server (the local agent
/// not answering: it is restarting) keeps a primary writable. The server
/// answers "held" only while the session lives, and once it dies nobody may
/// take the lock for [`LOCK_DELAY`]: a primary that goes on confirming this
/// way serves for as long as the rest of the cluster sees it alive, yet
/// fences within this (plus the watchdog's period) of its session's end.
pub const REMOTE_CONFIRM_VALID: Duration = Duration::from_millis(700);

/// The fence inequalities. A primary that went silent (its node frozen or
/// cut off) confirmed its lock last before it did, and gossip needs at
/// least [`SERF_DETECT_MIN`] to end its session, then the lock-delay: it has
/// fenced by then. A primary confirming through a server fences within
/// [`REMOTE_CONFIRM_VALID`] of its session's end, inside the lock-delay.
pub const FENCED_WITHIN: Duration =
    Duration::from_millis((FENCE_AFTER.as_millis() + WATCHDOG_EVERY.as_millis()) as u64);
const _: () = assert!(
    FENCED_WITHIN.as_millis() < SERF_DETECT_MIN.as_millis() + LOCK_DELAY.as_millis(),
    "a cut-off primary must fence before its lock can be taken"
);
const _: () = assert!(
    REMOTE_CONFIRM_VALID.as_millis() + WATCHDOG_EVERY.as_millis() < LOCK_DELAY.as_millis(),
    "a primary confirming through a server must fence within the lock-delay"
);

/// A member record older than this is not trusted as current.
pub const MEMBER_FRESH: Duration = Duration::from_secs(3);
/// A switchover record older than this is ignored (its primary gave up).
pub const SWITCHOVER_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Primary,
    Replica,
    /// PostgreSQL is not running (crashed, fenced, rejoining).
    Stopped,
}

/// What a db node publishes about itself under `<prefix>/members/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub address: IpAddr,
    pub port: u16,
    pub role: MemberRole,
    /// WAL position: received (standby) or written (primary), as a byte
    /// offset.
    pub lsn: u64,
    pub timeline: u32,
    /// When it was published, Unix milliseconds.
    pub at_ms: u64,
    /// A standby set to stream from a primary (`primary_conninfo`), or
    /// whose WAL receiver still streams: it may receive (and acknowledge)
    /// more than `lsn`.
    #[serde(default)]
    pub following: bool,
}

impl Member {
    pub fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) <= MEMBER_FRESH.as_millis() as u64
    }
}

/// A planned hand-over in progress, under `<prefix>/switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    pub from: String,
    pub to: String,
    pub at_ms: u64,
    /// Where the old primary's shutdown checkpoint starts, once it has shut
    /// down (0 until then): the target may promote only with WAL past it,
    /// whatever happens to the lock meanwhile (the old primary's session
    /// dies with its postgres-alive check during the shutdown, which frees
    /// the lock before the target has the last records).
    #[serde(default)]
    pub min_lsn: u64,
}

/// The KV keys of one cluster, derived from the leader key of the order
/// (`service/postgres/leader` -> `service/postgres/members/`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Where every key of the cluster but (perhaps) the leader key lives.
    pub prefix: String,
    pub leader: String,
    pub members: String,
    pub switchover: String,
}

impl Keys {
    pub fn new(leader_key: &str) -> Self {
        let parent = leader_key
            .rsplit_once('/')
            .map(|(p, _)| p)
            .unwrap_or("corral");
        Self {
            prefix: format!("{parent}/"),
            leader: leader_key.to_string(),
            members: format!("{parent}/members/"),
            switchover: format!("{parent}/switchover"),
        }
    }

    pub fn member(&self, node: &str) -> String {
        format!("{}{node}", self.members)
    }
}

/// `16/B374D848` -> byte offset.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `me`, a running standby, may take the free leader lock; the
/// error says why not (for the logs). In the synchronous modes no other
/// standby may still follow the last primary: it may be frozen rather
/// than dead, and once thawed it would have commits acknowledged by a
/// standby still connected to it, commits a promoted node lacks (found by
/// the property tests in `ha_sim.rs`). Standbys stop following when they
/// see the lock free ([`Action::Detach`]).
///
/// Besides: the
/// error says why not (for the logs). `last_leader` held the lock last: a
/// silent record of it does not block (it is the primary that failed — in
/// the synchronous modes its acknowledged commits are on a standby too — and
/// its record may still say `replica` from the tick before it promoted).
///
/// In the synchronous modes every other member that is not a fresh,
/// running standby blocks too — silent, stopped (crashed, restarting,
/// rewinding) or primary — since it may be the one standby that holds the
/// latest acknowledged commits (a stopped one publishes its last known
/// position, and may have received more after it). Only a member that
/// cannot hold them does not: one that never had WAL (position 0), or whose
/// last known timeline is older than mine (commits acknowledged on my
/// timeline were never sent to it).
pub fn may_promote(
    me: &Member,
    others: &[Member],
    mode: ReplicationMode,
    switchover: Option<&Switchover>,
    last_leader: Option<&str>,
    now_ms: u64,
) -> Result<(), String> {
    if me.role != MemberRole::Replica {
        return Err("not a running standby".into());
    }
    if let Some(s) = switchover
        && now_ms.saturating_sub(s.at_ms) <= SWITCHOVER_TTL.as_millis() as u64
    {
        // The old primary checked its target was caught up before it shut
        // down; the target takes over only with every record it wrote.
        return if s.to != me.node {
            Err(format!("a switchover to {} is in progress", s.to))
        } else if s.min_lsn == 0 {
            Err(format!(
                "waiting for {} to shut down and name its last WAL position",
                s.from
            ))
        } else if me.lsn <= s.min_lsn {
            Err(format!(
                "the switchover needs WAL past {} (the shutdown checkpoint of {}); I have {}",
                s.min_lsn, s.from, me.lsn
            ))
        } else {
            Ok(())
        };
    }
    for other in others.iter().filter(|o| o.node != me.node) {
        let running_standby = other.role == MemberRole::Replica && other.fresh(now_ms);
        if !running_standby {
            // An older timeline says so only while the record is fresh: a
            // standby cut off from Consul but not from the primary goes on
            // streaming (and acknowledging) what its last record lacks.
            let cannot_hold_newer =
                other.lsn == 0 || (other.fresh(now_ms) && other.timeline < me.timeline);
            if mode.is_synchronous()
                && last_leader != Some(other.node.as_str())
                && !cannot_hold_newer
            {
                let state = if other.fresh(now_ms) {
                    format!("is {:?}", other.role).to_lowercase()
                } else {
                    "does not report".to_string()
                };
                return Err(format!(
                    "{} {state}: in {mode} mode it may hold the latest acknowledged commits",
                    other.node
                ));
            }
            continue;
        }
        if mode.is_synchronous() && other.following {
            return Err(format!(
                "{} still follows the last primary: in {mode} mode it could acknowledge \
                 that primary's commits after my promotion (a frozen primary thawing)",
                other.node
            ));
        }
        let ahead = (other.timeline, other.lsn) > (me.timeline, me.lsn);
        let tie = (other.timeline, other.lsn) == (me.timeline, me.lsn) && other.node < me.node;
        if ahead || tie {
            return Err(format!(
                "{} is a better candidate (timeline {}, lsn {} against my {} {})",
                other.node, other.timeline, other.lsn, me.timeline, me.lsn
            ));
        }
    }
    Ok(())
}

/// The leader key as read: the node named in it (the key keeps the last
/// holder's name after its session ends) and the session locking it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub node: String,
    pub session: Option<String>,
}

/// One snapshot of the cluster in the DCS, read once per tick: every
/// decision of that tick is taken on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// `None` when the key does not exist (a new cluster).
    pub leader: Option<LeaderKey>,
    pub members: Vec<Member>,
    pub switchover: Option<Switchover>,
    /// When it was read, Unix milliseconds.
    pub now_ms: u64,
}

impl ClusterView {
    /// The node holding the lock (a live session on the key).
    pub fn holder(&self) -> Option<&str> {
        self.leader
            .as_ref()
            .filter(|l| l.session.is_some())
            .map(|l| l.node.as_str())
    }

    /// The last holder, when nobody holds the lock now.
    pub fn last_leader(&self) -> Option<&str> {
        self.leader
            .as_ref()
            .filter(|l| l.session.is_none())
            .map(|l| l.node.as_str())
    }

    pub fn member(&self, node: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }

    /// The view with `me` as this node's record (the one just published).
    pub fn with_member(mut self, me: &Member) -> Self {
        self.members.retain(|m| m.node != me.node);
        self.members.push(me.clone());
        self
    }
}

/// What one SQL round trip says about the local server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SqlStatus {
    pub in_recovery: bool,
    pub timeline: u32,
    pub lsn: u64,
    /// Standbys streaming from this primary (application names), and
    /// `slot:<name>` for each replication slot it has.
    pub streaming: Vec<String>,
    pub sync_standbys: Vec<String>,
    pub sync_names: String,
    /// A standby's walreceiver is streaming.
    pub receiving: bool,
    pub slot_name: String,
    pub conninfo: String,
    /// Replication lag in bytes: a standby's received-but-not-replayed
    /// WAL, a primary's furthest standby (for the heartbeat).
    pub lag_bytes: u64,
    /// Replication lag in milliseconds, likewise.
    pub lag_ms: u64,
    /// `running` on a primary, the walreceiver's status on a standby
    /// (`recovering` without one).
    pub state: String,
}

impl SqlStatus {
    /// The status query's columns, in the order [`STATUS_QUERY`] selects
    /// them.
    pub fn parse(row: &str) -> Result<Self, String> {
        let cols: Vec<&str> = row.splitn(13, '|').collect();
        if cols.len() != 13 {
            return Err(format!("unexpected status row {row:?}"));
        }
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        let mut streaming = list(cols[3]);
        streaming.extend(list(cols[5]).into_iter().map(|slot| format!("slot:{slot}")));
        Ok(Self {
            in_recovery: cols[0] == "t",
            timeline: cols[1].parse().unwrap_or(0),
            lsn: cols[2].parse().unwrap_or(0),
            streaming,
            sync_standbys: list(cols[4]),
            receiving: cols[6] == "t",
            slot_name: cols[7].to_string(),
            sync_names: cols[8].to_string(),
            lag_bytes: non_negative(cols[9]),
            lag_ms: non_negative(cols[10]),
            state: cols[11].to_string(),
            // Last: the one column whose text may hold a '|'.
            conninfo: cols[12].to_string(),
        })
    }
}

/// A numeric column (lag in bytes or milliseconds, maybe fractional) as a
/// whole number, 0 when empty or negative.
fn non_negative(col: &str) -> u64 {
    col.parse::<f64>().map_or(0, |v| v.max(0.0) as u64)
}

/// Replication lag in bytes, one expression: on a standby what it received
/// and has not replayed, on a primary its slowest streaming standby's
/// replay. Shared by the status query and the metrics sampler's.
#[macro_export]
macro_rules! lag_bytes_sql {
    () => {
        "CASE WHEN pg_is_in_recovery() \
         THEN COALESCE(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0) \
         ELSE COALESCE((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) FROM pg_stat_replication), 0) END"
    };
}

/// The one status query of a tick: role, timeline, WAL position, standbys,
/// settings, replication lag (parsed by [`SqlStatus::parse`]). The
/// heartbeat reports the latest tick's answer rather than asking again.
pub const STATUS_QUERY: &str = concat!(
    "SELECT pg_is_in_recovery(), \
     COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint())), \
     CASE WHEN pg_is_in_recovery() \
     THEN COALESCE(pg_wal_lsn_diff(GREATEST(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), '0/0'), 0)::bigint \
     ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END, \
     COALESCE((SELECT string_agg(application_name, ',') FROM pg_stat_replication WHERE state = 'streaming'), ''), \
     COALESCE((SELECT string_agg(application_name, ',') FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), ''), \
     COALESCE((SELECT string_agg(slot_name, ',') FROM pg_replication_slots), ''), \
     EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'), \
     current_setting('primary_slot_name'), \
     current_setting('synchronous_standby_names'), ",
    lag_bytes_sql!(),
    ", CASE WHEN pg_is_in_recovery() \
     THEN CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
          ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0) END \
     ELSE COALESCE((SELECT max(extract(epoch FROM replay_lag)) * 1000 FROM pg_stat_replication), 0) END, \
     CASE WHEN pg_is_in_recovery() THEN COALESCE((SELECT status FROM pg_stat_wal_receiver), 'recovering') ELSE 'running' END, \
     current_setting('primary_conninfo')"
);

/// What this node is like now, from one status query and its data dir.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalStatus {
    /// A postgres process runs (it may not answer yet).
    pub running: bool,
    /// What it answered; `None` when it did not.
    pub sql: Option<SqlStatus>,
    /// The data dir exists (`PG_VERSION`).
    pub data_dir: bool,
    /// `standby.signal` is there: without it, the data dir was a primary's.
    pub standby_signal: bool,
    /// This data dir was a primary's that lost its role: it is rewound
    /// before it follows anyone.
    pub rejoin_marked: bool,
}

/// What this agent remembers between ticks, and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    pub node: String,
    pub mode: ReplicationMode,
    /// This node's leader session, as last created.
    pub session: Option<String>,
    /// As primary, this agent confirmed the lock in its life (and has not
    /// fenced or stepped down since).
    pub confirmed: bool,
    /// How long this standby has not streamed from the leader it follows.
    pub not_streaming_for: Duration,
    /// How long postgres has run without answering and without its
    /// recovery moving: the startup process on the same WAL segment and no
    /// WAL receiver streaming (see [`recovery_progress`]).
    pub stalled_for: Duration,
}

/// A standby that follows a leader but has not streamed from it for this
/// long is rewound (its history forked) and restarted.
pub const STUCK_AFTER: Duration = Duration::from_secs(15);

/// What shows a recovery moving, from the process titles of a postmaster's
/// children: the startup process names the WAL segment it replays, a WAL
/// receiver the position it streamed to. The same answer for
/// [`STUCK_AFTER`] while postgres does not answer is a stall.
pub fn recovery_progress(titles: &[String]) -> String {
    let mut moving: Vec<&str> = titles
        .iter()
        .map(|t| t.trim())
        .filter(|t| t.contains("startup") || t.contains("walreceiver"))
        .collect();
    moving.sort_unstable();
    moving.join(" | ")
}

/// What the HA loop does this tick: the one outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing this tick, and why.
    Wait(String),
    /// The lock is free, but this standby may not take it: why (a better
    /// candidate, a member that may hold newer commits, a switchover).
    Abstain(String),
    /// A session of this node from an earlier life (its id lost) holds the
    /// lock; nobody else could ever take it. End it.
    EndStaleSession(String),
    /// A running primary, the lock free and never confirmed in this
    /// agent's life (a new cluster, a restarted agent whose session ended):
    /// take the lock, then lead; fence if another node took it.
    TakeLockAsPrimary,
    /// A primary holding the lock: confirm it, register, keep the
    /// standbys' slots and the synchronous standbys right; delete a
    /// switchover record that named this node.
    Lead { clear_switchover: bool },
    /// A primary without the lock: stop at once, come back as a standby.
    Fence(String),
    /// A standby holding the lock (it took it and its promotion did not
    /// finish): promote.
    Promote,
    /// The lock is free and this standby is the best candidate: take it
    /// and promote.
    TakeLockAndPromote,
    /// A standby that cannot follow the leader as it is (marked for rejoin,
    /// or not streaming for [`STUCK_AFTER`]): stop, to be rewound.
    StopToRewind { leader: String },
    /// A standby that runs but never became consistent, its recovery
    /// stalled for [`STUCK_AFTER`] (the WAL it waits for exists nowhere,
    /// say after a rewind whose source had recycled it): stop it and clone
    /// the leader afresh. Another node leads, promoted with every
    /// acknowledged commit, so nothing acknowledged is lost.
    StopToReclone { leader: String },
    /// Stream from the leader.
    Follow(Member),
    /// Sync and strict modes: the lock is free and this standby still
    /// follows the last primary, which may be frozen rather than dead:
    /// stop following (`primary_conninfo` reset), so that once thawed it
    /// cannot have commits acknowledged that a newly promoted node lacks.
    Detach,
    /// No data dir: make it (a clone of the primary, or a new cluster on
    /// the bootstrap node when none exists).
    MakeDataDir,
    /// PostgreSQL is stopped: start it as a standby of `leader` (of nothing
    /// when there is none: it then competes like any standby).
    Start {
        /// It ran as primary (no `standby.signal`): mark it for rejoin.
        was_primary: bool,
        /// It died as primary holding the lock: let go of the lock (no
        /// lock-delay, a standby takes over within a tick) and end the
        /// session.
        let_go: bool,
        /// Rewind from the leader first.
        rewind: bool,
        leader: Option<Member>,
    },
}

/// The member record this node publishes: what its server says, or when it
/// does not answer, the last position and timeline it knew (not 0: a
/// standby that may hold acknowledged commits must keep blocking the
/// promotion of one that lacks them, see [`may_promote`]).
pub fn member_record(
    node: &str,
    address: IpAddr,
    port: u16,
    sql: Option<&SqlStatus>,
    last: Option<&Member>,
    now_ms: u64,
) -> Member {
    let (lsn, timeline) = last.map_or((0, 0), |m| (m.lsn, m.timeline));
    Member {
        node: node.to_string(),
        address,
        port,
        role: match sql {
            Some(l) if l.in_recovery => MemberRole::Replica,
            Some(_) => MemberRole::Primary,
            None => MemberRole::Stopped,
        },
        lsn: sql.map_or(lsn, |l| l.lsn),
        timeline: sql.map_or(timeline, |l| l.timeline),
        at_ms: now_ms,
        following: sql.is_some_and(|l| l.in_recovery && (!l.conninfo.is_empty() || l.receiving)),
    }
}

/// The decision of one tick, on one snapshot of the cluster (which holds
/// this node's record as just published), one status of the local server
/// and what the agent remembers. No I/O: the HA loop acts on the answer.
pub fn decide(view: &ClusterView, local: &LocalStatus, memory: &Memory) -> Action {
    let me = memory.node.as_str();
    let holder = view.holder();
    let holder_session = view.leader.as_ref().and_then(|l| l.session.as_deref());
    let i_hold = holder_session.is_some() && holder_session == memory.session.as_deref();
    if !i_hold
        && holder == Some(me)
        && let Some(stale) = holder_session
    {
        return Action::EndStaleSession(stale.to_string());
    }
    let others: Vec<&Member> = view.members.iter().filter(|m| m.node != me).collect();
    let leader_record = || {
        holder
            .filter(|h| *h != me)
            .and_then(|h| others.iter().find(|m| m.node == h))
            .map(|m| (*m).clone())
    };
    match &local.sql {
        Some(sql) if !sql.in_recovery => {
            if i_hold {
                return Action::Lead {
                    clear_switchover: view.switchover.as_ref().is_some_and(|s| s.to == me),
                };
            }
            // A newer timeline elsewhere: another node was promoted after
            // this one, whatever happened to it since.
            let superseded = others.iter().any(|m| m.timeline > sql.timeline);
            if holder.is_none() && !memory.confirmed && !superseded {
                Action::TakeLockAsPrimary
            } else {
                Action::Fence(match holder {
                    Some(h) => format!("the leader lock is held by {h}"),
                    None => "the leader lock is lost (our session ended)".into(),
                })
            }
        }
        Some(sql) => {
            if i_hold {
                return Action::Promote;
            }
            match holder {
                Some(h) if h != me => match leader_record() {
                    None => Action::Wait(format!("the leader {h} has no member record")),
                    Some(_) if local.rejoin_marked || memory.not_streaming_for > STUCK_AFTER => {
                        Action::StopToRewind {
                            leader: h.to_string(),
                        }
                    }
                    Some(leader) => Action::Follow(leader),
                },
                Some(_) => Action::Wait("this node's stale session holds the lock".into()),
                None => {
                    let target = view.switchover.as_ref().is_some_and(|s| {
                        s.to == me
                            && view.now_ms.saturating_sub(s.at_ms)
                                <= SWITCHOVER_TTL.as_millis() as u64
                    });
                    // The candidate stops following by promoting; another
                    // standby stops now, except a switchover's target, which
                    // needs the old primary's last records.
                    let detach =
                        memory.mode.is_synchronous() && !sql.conninfo.is_empty() && !target;
                    let Some(mine) = view.member(me) else {
                        return Action::Wait("this node has no member record".into());
                    };
                    let others: Vec<Member> = others.into_iter().cloned().collect();
                    match may_promote(
                        mine,
                        &others,
                        memory.mode,
                        view.switchover.as_ref(),
                        view.last_leader(),
                        view.now_ms,
                    ) {
                        Ok(()) => Action::TakeLockAndPromote,
                        Err(_) if detach => Action::Detach,
                        Err(why) => Action::Abstain(why),
                    }
                }
            }
        }
        // A standby whose recovery stalled before it could answer: what it
        // waits for will not come.
        None if local.running
            && local.standby_signal
            && memory.stalled_for > STUCK_AFTER
            && leader_record().is_some() =>
        {
            Action::StopToReclone {
                leader: holder.unwrap_or_default().to_string(),
            }
        }
        // Starting, or not answering: a hung primary is fenced by the
        // watchdog, since nothing confirms its lock.
        None if local.running => Action::Wait("postgres runs but does not answer".into()),
        None if !local.data_dir => Action::MakeDataDir,
        None => {
            let was_primary = !local.standby_signal;
            let leader = leader_record();
            Action::Start {
                was_primary,
                let_go: was_primary && i_hold,
                rewind: (local.rejoin_marked || was_primary) && leader.is_some(),
                leader,
            }
        }
    }
}

/// The `synchronous_standby_names` a primary wants, and whether that is the
/// sync-mode fallback (no standby streams, commits do not wait).
pub fn sync_standby_names(
    mode: ReplicationMode,
    standbys: &[String],
    streaming: &[String],
) -> (String, bool) {
    let list = |names: &[String]| {
        let quoted: Vec<String> = names
            .iter()
            .map(|n| format!("\"{}\"", n.replace('"', "")))
            .collect();
        format!("ANY 1 ({})", quoted.join(", "))
    };
    match mode {
        ReplicationMode::Async => (String::new(), false),
        ReplicationMode::Strict if standbys.is_empty() => ("*".into(), false),
        ReplicationMode::Strict => (list(standbys), false),
        ReplicationMode::Sync => {
            let live: Vec<String> = standbys
                .iter()
                .filter(|s| streaming.contains(s))
                .cloned()
                .collect();
            if live.is_empty() {
                (String::new(), true)
            } else {
                (list(standbys), false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, role: MemberRole, lsn: u64, at_ms: u64) -> Member {
        Member {
            node: node.into(),
            address: [127, 0, 0, 1].into(),
            port: 5432,
            role,
            lsn,
            timeline: 1,
            at_ms,
            following: false,
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn lsns_parse_to_byte_offsets() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x300_0060));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("garbage"), None);
    }

    #[test]
    fn a_member_record_whose_address_is_no_ip_is_refused() {
        let good = serde_json::to_string(&member("pg1", MemberRole::Primary, 1, NOW)).unwrap();
        assert_eq!(serde_json::from_str::<Member>(&good).unwrap().node, "pg1");
        let forged = good.replace("127.0.0.1", "127.0.0.1 password=x host=evil");
        assert!(serde_json::from_str::<Member>(&forged).is_err());
    }

    #[test]
    fn keys_are_siblings_of_the_leader_key() {
        let k = Keys::new("service/postgres/leader");
        assert_eq!(k.members, "service/postgres/members/");
        assert_eq!(k.member("pg2"), "service/postgres/members/pg2");
        assert_eq!(k.switchover, "service/postgres/switchover");
    }

    #[test]
    fn the_furthest_standby_wins_and_ties_go_to_the_first_name() {
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        let pg3 = member("pg3", MemberRole::Replica, 200, NOW);
        let all = [pg2.clone(), pg3.clone()];
        assert!(may_promote(&pg2, &all, ReplicationMode::Async, None, None, NOW).is_err());
        assert!(may_promote(&pg3, &all, ReplicationMode::Async, None, None, NOW).is_ok());
        let pg3_tied = member("pg3", MemberRole::Replica, 100, NOW);
        let tied = [pg2.clone(), pg3_tied.clone()];
        assert!(may_promote(&pg2, &tied, ReplicationMode::Sync, None, None, NOW).is_ok());
        assert!(may_promote(&pg3_tied, &tied, ReplicationMode::Sync, None, None, NOW).is_err());
    }

    #[test]
    fn the_dead_primary_and_stopped_nodes_are_no_competition_in_async_mode() {
        let pg1 = member("pg1", MemberRole::Primary, 900, NOW - 60_000);
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        let pg3 = member("pg3", MemberRole::Stopped, 800, NOW);
        let all = [pg1, pg2.clone(), pg3];
        assert!(may_promote(&pg2, &all, ReplicationMode::Async, None, Some("pg1"), NOW).is_ok());
    }

    #[test]
    fn a_stopped_standby_blocks_promotion_in_synchronous_modes() {
        // pg3 streamed until it stopped (restarting, rewinding, its probe
        // failing): it may hold commits pg2 lacks, whatever its last known
        // position says.
        let pg1 = member("pg1", MemberRole::Primary, 900, NOW - 60_000);
        let pg2 = member("pg2", MemberRole::Replica, 800, NOW);
        for pg3_lsn in [700, 800, 900] {
            let pg3 = member("pg3", MemberRole::Stopped, pg3_lsn, NOW);
            let all = [pg1.clone(), pg2.clone(), pg3];
            for mode in [ReplicationMode::Sync, ReplicationMode::Strict] {
                let why = may_promote(&pg2, &all, mode, None, Some("pg1"), NOW).unwrap_err();
                assert!(why.contains("pg3 is stopped"), "{why}");
            }
        }
        // The same with a silent or a primary record that is not the last
        // leader's.
        for pg3 in [
            member("pg3", MemberRole::Stopped, 900, NOW - 60_000),
            member("pg3", MemberRole::Primary, 900, NOW - 60_000),
        ] {
            let all = [pg1.clone(), pg2.clone(), pg3];
            assert!(
                may_promote(&pg2, &all, ReplicationMode::Sync, None, Some("pg1"), NOW).is_err()
            );
        }
    }

    #[test]
    fn a_member_that_cannot_hold_newer_commits_does_not_block() {
        let pg2 = Member {
            timeline: 2,
            ..member("pg2", MemberRole::Replica, 800, NOW)
        };
        // A new node still cloning: it never had WAL.
        let cloning = member("pg3", MemberRole::Stopped, 0, NOW);
        // A former primary being rewound: its last timeline is older.
        let rewinding = Member {
            timeline: 1,
            ..member("pg1", MemberRole::Stopped, 5_000, NOW)
        };
        let all = [pg2.clone(), cloning, rewinding];
        assert!(may_promote(&pg2, &all, ReplicationMode::Strict, None, Some("pg4"), NOW).is_ok());
    }

    #[test]
    fn a_silent_standby_whose_last_record_had_an_older_timeline_still_blocks_in_sync_mode() {
        // pg3 lagged when it last published (the promotion's timeline not
        // yet received), then lost Consul but not the primary: it may have
        // streamed and acknowledged commits since (found by the HA
        // property tests).
        let pg2 = Member {
            timeline: 2,
            ..member("pg2", MemberRole::Replica, 800, NOW)
        };
        let silent = Member {
            timeline: 1,
            ..member("pg3", MemberRole::Replica, 700, NOW - 10_000)
        };
        let all = [pg2.clone(), silent.clone()];
        let why =
            may_promote(&pg2, &all, ReplicationMode::Sync, None, Some("pg1"), NOW).unwrap_err();
        assert!(why.contains("pg3 does not report"), "{why}");
        // While its record is fresh, the older timeline settles it.
        let fresh = Member {
            role: MemberRole::Stopped,
            at_ms: NOW,
            ..silent
        };
        let all = [pg2.clone(), fresh];
        assert!(may_promote(&pg2, &all, ReplicationMode::Sync, None, Some("pg1"), NOW).is_ok());
    }

    #[test]
    fn a_silent_standby_blocks_promotion_only_in_synchronous_modes() {
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        let silent = member("pg3", MemberRole::Replica, 50, NOW - 10_000);
        let all = [pg2.clone(), silent];
        assert!(may_promote(&pg2, &all, ReplicationMode::Async, None, None, NOW).is_ok());
        let why = may_promote(&pg2, &all, ReplicationMode::Sync, None, None, NOW).unwrap_err();
        assert!(why.contains("pg3 does not report"), "{why}");
        assert!(may_promote(&pg2, &all, ReplicationMode::Strict, None, None, NOW).is_err());
    }

    #[test]
    fn the_silent_last_leader_does_not_block_even_in_sync_mode() {
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        // pg1's last record, written the tick before it promoted.
        let pg1 = member("pg1", MemberRole::Replica, 90, NOW - 10_000);
        let all = [pg1, pg2.clone()];
        assert!(may_promote(&pg2, &all, ReplicationMode::Sync, None, None, NOW).is_err());
        assert!(may_promote(&pg2, &all, ReplicationMode::Sync, None, Some("pg1"), NOW).is_ok());
        assert!(may_promote(&pg2, &all, ReplicationMode::Strict, None, Some("pg1"), NOW).is_ok());
    }

    #[test]
    fn a_switchover_names_the_only_candidate_until_it_expires() {
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        let pg3 = member("pg3", MemberRole::Replica, 200, NOW);
        let all = [pg2.clone(), pg3.clone()];
        let s = Switchover {
            from: "pg1".into(),
            to: "pg2".into(),
            at_ms: NOW - 1000,
            min_lsn: 99,
        };
        assert!(may_promote(&pg2, &all, ReplicationMode::Async, Some(&s), None, NOW).is_ok());
        assert!(may_promote(&pg3, &all, ReplicationMode::Async, Some(&s), None, NOW).is_err());
        let old = Switchover {
            at_ms: NOW - 60_000,
            ..s
        };
        assert!(may_promote(&pg3, &all, ReplicationMode::Async, Some(&old), None, NOW).is_ok());
    }

    #[test]
    fn a_switchover_target_waits_for_the_old_primarys_last_wal_even_with_the_lock_free() {
        let pg2 = member("pg2", MemberRole::Replica, 100, NOW);
        let mut s = Switchover {
            from: "pg1".into(),
            to: "pg2".into(),
            at_ms: NOW - 1000,
            min_lsn: 0,
        };
        // pg1 has not shut down yet, or not said where its WAL ends.
        let why = may_promote(
            &pg2,
            std::slice::from_ref(&pg2),
            ReplicationMode::Sync,
            Some(&s),
            None,
            NOW,
        )
        .expect_err("no promotion before the old primary names its last position");
        assert!(why.contains("pg1"), "{why}");
        // Its shutdown checkpoint starts at 100: pg2 needs WAL past it.
        s.min_lsn = 100;
        assert!(
            may_promote(
                &pg2,
                std::slice::from_ref(&pg2),
                ReplicationMode::Sync,
                Some(&s),
                None,
                NOW
            )
            .is_err()
        );
        let caught_up = member("pg2", MemberRole::Replica, 101, NOW);
        assert!(may_promote(&caught_up, &[], ReplicationMode::Async, Some(&s), None, NOW).is_ok());
        // A record from before min_lsn existed reads as 0: it waits too.
        let old: Switchover =
            serde_json::from_str(r#"{"from":"pg1","to":"pg2","at_ms":1}"#).expect("old record");
        assert_eq!(old.min_lsn, 0);
    }

    #[test]
    fn a_primary_or_stopped_node_never_promotes() {
        let me = member("pg2", MemberRole::Stopped, 100, NOW);
        assert!(may_promote(&me, &[], ReplicationMode::Async, None, None, NOW).is_err());
    }

    fn view(leader: Option<(&str, Option<&str>)>, members: Vec<Member>) -> ClusterView {
        ClusterView {
            leader: leader.map(|(node, session)| LeaderKey {
                node: node.into(),
                session: session.map(String::from),
            }),
            members,
            switchover: None,
            now_ms: NOW,
        }
    }

    fn running(in_recovery: bool, lsn: u64) -> LocalStatus {
        LocalStatus {
            running: true,
            sql: Some(SqlStatus {
                in_recovery,
                timeline: 1,
                lsn,
                receiving: in_recovery,
                ..SqlStatus::default()
            }),
            data_dir: true,
            standby_signal: in_recovery,
            rejoin_marked: false,
        }
    }

    fn memory(node: &str, session: Option<&str>, confirmed: bool) -> Memory {
        Memory {
            node: node.into(),
            mode: ReplicationMode::Sync,
            session: session.map(String::from),
            confirmed,
            not_streaming_for: Duration::ZERO,
            stalled_for: Duration::ZERO,
        }
    }

    #[test]
    fn a_standby_whose_recovery_stalled_is_cloned_afresh_but_not_a_primary_or_a_leaderless_one() {
        let pg1 = member("pg1", MemberRole::Primary, 100, NOW);
        let pg2 = member("pg2", MemberRole::Stopped, 90, NOW);
        let v = view(Some(("pg1", Some("s1"))), vec![pg1.clone(), pg2.clone()]);
        let starting = LocalStatus {
            running: true,
            sql: None,
            data_dir: true,
            standby_signal: true,
            rejoin_marked: false,
        };
        let mut mem = memory("pg2", None, false);
        mem.stalled_for = STUCK_AFTER;
        assert!(matches!(decide(&v, &starting, &mem), Action::Wait(_)));
        mem.stalled_for = STUCK_AFTER + Duration::from_millis(1);
        assert_eq!(
            decide(&v, &starting, &mem),
            Action::StopToReclone {
                leader: "pg1".into()
            }
        );
        // A primary that does not answer is the watchdog's to fence; with
        // nobody leading there is nothing to clone.
        let primary = LocalStatus {
            standby_signal: false,
            ..starting.clone()
        };
        assert!(matches!(decide(&v, &primary, &mem), Action::Wait(_)));
        let leaderless = view(None, vec![pg1, pg2]);
        assert!(matches!(
            decide(&leaderless, &starting, &mem),
            Action::Wait(_)
        ));
    }

    #[test]
    fn recovery_progress_reads_the_startup_process_and_the_wal_receiver() {
        let titles = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let waiting = recovery_progress(&titles(&[
            "postgres: pg2: checkpointer ",
            "postgres: pg2: startup recovering 00000015000000000000000A",
            "postgres: pg2: background writer ",
        ]));
        assert_eq!(
            waiting,
            "postgres: pg2: startup recovering 00000015000000000000000A"
        );
        let streaming = recovery_progress(&titles(&[
            "postgres: pg2: walreceiver streaming 0/B0000B8",
            "postgres: pg2: startup recovering 00000015000000000000000A",
        ]));
        assert_ne!(streaming, waiting);
        assert_eq!(recovery_progress(&titles(&["postgres: pg2: logger "])), "");
    }

    #[test]
    fn a_primary_holding_the_lock_leads_and_one_that_lost_it_fences() {
        let pg1 = member("pg1", MemberRole::Primary, 100, NOW);
        let local = running(false, 100);
        let held = view(Some(("pg1", Some("s1"))), vec![pg1.clone()]);
        assert_eq!(
            decide(&held, &local, &memory("pg1", Some("s1"), true)),
            Action::Lead {
                clear_switchover: false
            }
        );
        let elsewhere = view(Some(("pg2", Some("s2"))), vec![pg1.clone()]);
        assert!(matches!(
            decide(&elsewhere, &local, &memory("pg1", Some("s1"), true)),
            Action::Fence(why) if why.contains("held by pg2")
        ));
        // The session ended: fence, unless this agent never confirmed the
        // lock (a new cluster, a restarted agent), which takes it.
        let free = view(Some(("pg1", None)), vec![pg1.clone()]);
        assert!(matches!(
            decide(&free, &local, &memory("pg1", Some("s1"), true)),
            Action::Fence(_)
        ));
        assert_eq!(
            decide(&free, &local, &memory("pg1", Some("s1"), false)),
            Action::TakeLockAsPrimary
        );
        // ... but not when another node was promoted since.
        let pg2 = Member {
            timeline: 2,
            ..member("pg2", MemberRole::Primary, 200, NOW)
        };
        let superseded = view(Some(("pg2", None)), vec![pg1, pg2]);
        assert!(matches!(
            decide(&superseded, &local, &memory("pg1", None, false)),
            Action::Fence(_)
        ));
    }

    #[test]
    fn a_session_of_this_node_it_no_longer_knows_is_ended_first() {
        let v = view(Some(("pg1", Some("old"))), vec![]);
        for local in [running(false, 1), running(true, 1), LocalStatus::default()] {
            assert_eq!(
                decide(&v, &local, &memory("pg1", Some("new"), false)),
                Action::EndStaleSession("old".into())
            );
        }
    }

    #[test]
    fn a_standby_follows_the_holder_and_rewinds_when_it_cannot() {
        let pg1 = member("pg1", MemberRole::Primary, 100, NOW);
        let pg2 = member("pg2", MemberRole::Replica, 90, NOW);
        let v = view(Some(("pg1", Some("s1"))), vec![pg1.clone(), pg2]);
        let mut local = running(true, 90);
        let mut mem = memory("pg2", None, false);
        assert_eq!(decide(&v, &local, &mem), Action::Follow(pg1.clone()));
        mem.not_streaming_for = STUCK_AFTER + Duration::from_millis(1);
        assert_eq!(
            decide(&v, &local, &mem),
            Action::StopToRewind {
                leader: "pg1".into()
            }
        );
        mem.not_streaming_for = Duration::ZERO;
        local.rejoin_marked = true;
        assert!(matches!(
            decide(&v, &local, &mem),
            Action::StopToRewind { .. }
        ));
        // The holder has no record yet: wait.
        let bare = view(Some(("pg1", Some("s1"))), vec![]);
        assert!(matches!(decide(&bare, &local, &mem), Action::Wait(_)));
        // This standby holds the lock (its promotion did not finish).
        let mine = view(Some(("pg2", Some("s2"))), vec![]);
        assert_eq!(
            decide(&mine, &local, &memory("pg2", Some("s2"), false)),
            Action::Promote
        );
    }

    #[test]
    fn a_standby_takes_the_free_lock_only_as_the_best_candidate() {
        let pg2 = member("pg2", MemberRole::Replica, 90, NOW);
        let pg3 = member("pg3", MemberRole::Replica, 95, NOW);
        let v = view(Some(("pg1", None)), vec![pg2.clone(), pg3.clone()]);
        assert!(matches!(
            decide(&v, &running(true, 90), &memory("pg2", None, false)),
            Action::Abstain(why) if why.contains("pg3 is a better candidate")
        ));
        assert_eq!(
            decide(&v, &running(true, 95), &memory("pg3", None, false)),
            Action::TakeLockAndPromote
        );
    }

    #[test]
    fn in_synchronous_modes_standbys_stop_streaming_from_a_primary_that_lost_the_lock() {
        // pg1 froze; its session ended. pg3 still streams from it: once
        // thawed, pg1 would have commits acknowledged by pg3 that pg2 lacks.
        let pg2 = member("pg2", MemberRole::Replica, 95, NOW);
        let pg3 = Member {
            following: true,
            ..member("pg3", MemberRole::Replica, 90, NOW)
        };
        let v = view(Some(("pg1", None)), vec![pg2.clone(), pg3.clone()]);
        let idle = running(true, 95);
        let mut attached = running(true, 90);
        if let Some(sql) = &mut attached.sql {
            sql.conninfo = "host=127.0.0.1".into();
        }
        assert!(matches!(
            decide(&v, &idle, &memory("pg2", None, false)),
            Action::Abstain(why) if why.contains("pg3 still follows")
        ));
        assert_eq!(
            decide(&v, &attached, &memory("pg3", None, false)),
            Action::Detach
        );
        let mut async_mode = memory("pg2", None, false);
        async_mode.mode = ReplicationMode::Async;
        assert_eq!(decide(&v, &idle, &async_mode), Action::TakeLockAndPromote);
        // Detached, pg3 no longer blocks.
        let pg3 = Member {
            following: false,
            ..pg3
        };
        let v = view(Some(("pg1", None)), vec![pg2, pg3]);
        assert_eq!(
            decide(&v, &idle, &memory("pg2", None, false)),
            Action::TakeLockAndPromote
        );
        // A switchover's target keeps streaming: it needs the last WAL.
        let mut v = v;
        v.switchover = Some(Switchover {
            from: "pg1".into(),
            to: "pg3".into(),
            at_ms: NOW - 1000,
            min_lsn: 0,
        });
        assert!(matches!(
            decide(&v, &attached, &memory("pg3", None, false)),
            Action::Abstain(_)
        ));
    }

    #[test]
    fn a_stopped_node_starts_as_a_standby_and_a_dead_primary_lets_go_of_its_lock() {
        let pg2 = member("pg2", MemberRole::Primary, 200, NOW);
        let stopped_primary = LocalStatus {
            data_dir: true,
            ..LocalStatus::default()
        };
        // It died as primary holding the lock.
        let mine = view(Some(("pg1", Some("s1"))), vec![]);
        assert_eq!(
            decide(&mine, &stopped_primary, &memory("pg1", Some("s1"), true)),
            Action::Start {
                was_primary: true,
                let_go: true,
                rewind: false,
                leader: None
            }
        );
        // Another node leads: rewind from it first.
        let other = view(Some(("pg2", Some("s2"))), vec![pg2.clone()]);
        assert_eq!(
            decide(&other, &stopped_primary, &memory("pg1", Some("s1"), false)),
            Action::Start {
                was_primary: true,
                let_go: false,
                rewind: true,
                leader: Some(pg2.clone())
            }
        );
        // A standby that stopped just starts again.
        let stopped_standby = LocalStatus {
            data_dir: true,
            standby_signal: true,
            ..LocalStatus::default()
        };
        assert_eq!(
            decide(&other, &stopped_standby, &memory("pg3", None, false)),
            Action::Start {
                was_primary: false,
                let_go: false,
                rewind: false,
                leader: Some(pg2)
            }
        );
        assert_eq!(
            decide(&other, &LocalStatus::default(), &memory("pg3", None, false)),
            Action::MakeDataDir
        );
        let starting = LocalStatus {
            running: true,
            ..stopped_standby
        };
        assert!(matches!(
            decide(&other, &starting, &memory("pg3", None, false)),
            Action::Wait(_)
        ));
    }

    #[test]
    fn the_status_row_parses_and_a_short_one_is_refused() {
        let row = "t|2|4096|pg2,pg3|pg2|pg2,pg3|t|pg1|ANY 1 (\"pg2\")|1024|12.5|streaming|host=a password=x|y";
        let s = SqlStatus::parse(row).expect("a row");
        assert!(s.in_recovery && s.receiving);
        assert_eq!((s.timeline, s.lsn), (2, 4096));
        assert_eq!(s.streaming, ["pg2", "pg3", "slot:pg2", "slot:pg3"]);
        assert_eq!(s.sync_names, "ANY 1 (\"pg2\")");
        assert_eq!((s.lag_bytes, s.lag_ms), (1024, 12));
        assert_eq!(s.state, "streaming");
        assert_eq!(s.conninfo, "host=a password=x|y");
        let clock_skewed = "f|1|0|||||||0|-3.2|running|";
        assert_eq!(SqlStatus::parse(clock_skewed).expect("a row").lag_ms, 0);
        assert!(SqlStatus::parse("t|2").is_err());
        // The row before the lag columns were added is refused, not misread.
        assert!(SqlStatus::parse("t|2|4096|pg2|pg2|pg2|t|pg1||host=a").is_err());
    }

    #[test]
    fn sync_mode_falls_back_when_no_standby_streams_and_strict_never_does() {
        let standbys = vec!["pg2".to_string(), "pg3".to_string()];
        assert_eq!(
            sync_standby_names(ReplicationMode::Async, &standbys, &standbys),
            (String::new(), false)
        );
        assert_eq!(
            sync_standby_names(ReplicationMode::Sync, &standbys, &["pg3".into()]),
            ("ANY 1 (\"pg2\", \"pg3\")".into(), false)
        );
        assert_eq!(
            sync_standby_names(ReplicationMode::Sync, &standbys, &[]),
            (String::new(), true)
        );
        assert_eq!(
            sync_standby_names(ReplicationMode::Strict, &standbys, &[]),
            ("ANY 1 (\"pg2\", \"pg3\")".into(), false)
        );
        assert_eq!(
            sync_standby_names(ReplicationMode::Strict, &[], &[]),
            ("*".into(), false)
        );
    }
}
