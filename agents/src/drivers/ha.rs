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
/// A primary that has not confirmed its lock for this long stops itself
/// (fencing): less than Consul needs to declare its node dead (serf
/// suspicion, seconds) plus the lock-delay, so the old primary is down
/// before anyone else can take the lock.
pub const FENCE_AFTER: Duration = Duration::from_secs(2);
/// After a leader session dies, nobody may take its lock for this long.
pub const LOCK_DELAY: Duration = Duration::from_secs(1);
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
            let cannot_hold_newer = other.lsn == 0 || other.timeline < me.timeline;
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
