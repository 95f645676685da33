//! A history checker, as Jepsen's list-append workload does it, for the
//! todo list: clients append unique values (todo titles `KEY:...`) and read
//! the whole list, through the webapp and straight on the primary, while
//! faults hit the database nodes. Every operation is recorded with its
//! invoke and complete times and its outcome: `Ok`, `Failed` (certainly not
//! done: refused before anything was sent, or a 4xx) or `Unknown` (a
//! timeout, a dropped connection, a 5xx: it may or may not have happened).
//!
//! [`check`] then verifies, against the final list read from the primary:
//!
//! - every acknowledged append is present exactly once, no failed one is,
//!   and nothing present was never appended;
//! - every value any read saw is still present at the end (an unknown
//!   append may go either way, but not both: seen, then gone);
//! - per key, every read lists its values in the final list's order (no
//!   reordered appends);
//! - a read by a client without the session cookie that the primary
//!   answered holds every append acknowledged before it was invoked, and
//!   every value of such reads completed before it (real-time order:
//!   linearizable reads);
//! - a session (a client keeping its `todomvc_lsn` cookie) reads its own
//!   acknowledged appends and never less than its earlier reads.
//!
//! A cookieless read answered by a replica (`X-Read-From: replica`, only
//! while no primary is known: the webapp's stated contract for clients
//! that have not written) is held to the first three rules only.

use std::collections::{HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

/// Times are microseconds since the history began.
#[derive(Clone, Debug)]
pub struct Append {
    pub process: usize,
    pub value: String,
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
}

/// A successful read of the whole list.
#[derive(Clone, Debug)]
pub struct Read {
    pub process: usize,
    pub invoke: u64,
    pub complete: u64,
    pub values: Vec<String>,
    /// Answered by a replica to a cookieless client (no real-time
    /// guarantee).
    pub from_replica: bool,
    /// Who answered, for the report (e.g. `primary via web1`).
    pub via: String,
}

#[derive(Clone, Debug, Default)]
pub struct History {
    /// Processes that keep the session cookie.
    pub sessions: HashSet<usize>,
    pub appends: Vec<Append>,
    pub reads: Vec<Read>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Unknown appends found in the final list.
    pub unknown_present: usize,
    pub reads: usize,
    pub replica_reads: usize,
}

fn key(value: &str) -> &str {
    value.split_once(':').map_or(value, |(k, _)| k)
}

/// Checks `h` against `final_list` (the whole list at the end, in list
/// order): the summary, or every anomaly found (at most a few of each kind).
pub fn check(h: &History, final_list: &[String]) -> Result<Summary, Vec<String>> {
    let mut anomalies = Vec::new();
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let mut report = |kind: &str, what: String| {
        let same = counts.entry(kind.to_string()).or_default();
        *same += 1;
        if *same <= 5 {
            anomalies.push(format!("{kind}: {what}"));
        }
    };

    let mut position: HashMap<&str, usize> = HashMap::new();
    for (i, v) in final_list.iter().enumerate() {
        if position.contains_key(v.as_str()) {
            report("duplicate", format!("{v} is in the final list twice"));
        } else {
            position.insert(v, i);
        }
    }
    let appended: HashMap<&str, &Append> =
        h.appends.iter().map(|a| (a.value.as_str(), a)).collect();
    for v in final_list {
        if !appended.contains_key(v.as_str()) {
            report(
                "phantom",
                format!("{v} is in the final list, never appended"),
            );
        }
    }
    let mut summary = Summary::default();
    for a in &h.appends {
        let present = position.contains_key(a.value.as_str());
        match a.outcome {
            Outcome::Ok => {
                summary.ok += 1;
                if !present {
                    report(
                        "lost",
                        format!("acknowledged append {} is missing", a.value),
                    );
                }
            }
            Outcome::Failed => {
                summary.failed += 1;
                if present {
                    report(
                        "failed-present",
                        format!("failed append {} is present", a.value),
                    );
                }
            }
            Outcome::Unknown => {
                summary.unknown += 1;
                summary.unknown_present += usize::from(present);
            }
        }
    }

    // Reads in order of invocation; what each must hold.
    let mut reads: Vec<&Read> = h.reads.iter().collect();
    reads.sort_by_key(|r| r.invoke);
    let mut acked: Vec<&Append> = h
        .appends
        .iter()
        .filter(|a| a.outcome == Outcome::Ok)
        .collect();
    acked.sort_by_key(|a| a.complete);
    // Linearizable reads, by completion, for the real-time rule.
    let mut fresh_done: Vec<&Read> = reads
        .iter()
        .copied()
        .filter(|r| !h.sessions.contains(&r.process) && !r.from_replica)
        .collect();
    fresh_done.sort_by_key(|r| r.complete);
    let mut must_hold: HashSet<&str> = HashSet::new();
    let (mut next_ack, mut next_fresh) = (0, 0);
    let mut session_floor: HashMap<usize, HashSet<&str>> = HashMap::new();

    for r in reads {
        summary.reads += 1;
        summary.replica_reads += usize::from(r.from_replica);
        let seen: HashSet<&str> = r.values.iter().map(String::as_str).collect();
        if seen.len() != r.values.len() {
            report(
                "duplicate",
                format!("a read at {} µs lists a value twice", r.invoke),
            );
        }
        let mut last: HashMap<&str, usize> = HashMap::new();
        for v in &r.values {
            match position.get(v.as_str()) {
                None => report(
                    "seen-then-lost",
                    format!("{v} was read at {} µs but is gone at the end", r.invoke),
                ),
                Some(&p) => {
                    if last.insert(key(v), p).is_some_and(|q| q > p) {
                        report(
                            "reordered",
                            format!("a read at {} µs lists {v} before an older value", r.invoke),
                        );
                    }
                }
            }
        }
        // Everything completed before this read was invoked.
        while next_ack < acked.len() && acked[next_ack].complete < r.invoke {
            next_ack += 1;
        }
        while next_fresh < fresh_done.len() && fresh_done[next_fresh].complete < r.invoke {
            must_hold.extend(fresh_done[next_fresh].values.iter().map(String::as_str));
            next_fresh += 1;
        }
        if h.sessions.contains(&r.process) {
            let floor = session_floor.entry(r.process).or_default();
            let own = acked[..next_ack]
                .iter()
                .filter(|a| a.process == r.process)
                .map(|a| a.value.as_str());
            for v in own {
                if !seen.contains(v) {
                    report(
                        "read-your-writes",
                        format!(
                            "process {} read at {} µs without its own acknowledged {v}",
                            r.process, r.invoke
                        ),
                    );
                }
            }
            if let Some(v) = floor.iter().find(|v| !seen.contains(**v)) {
                report(
                    "non-monotonic",
                    format!(
                        "process {} read at {} µs without {v}, which it read before",
                        r.process, r.invoke
                    ),
                );
            }
            floor.extend(seen.iter().copied());
        } else if !r.from_replica {
            if let Some(a) = acked[..next_ack]
                .iter()
                .find(|a| !seen.contains(a.value.as_str()))
            {
                report(
                    "stale-read",
                    format!(
                        "a read invoked at {} µs ({}, {} values, done at {} µs) misses {}, \
                         appended from {} to {} µs",
                        r.invoke,
                        r.via,
                        r.values.len(),
                        r.complete,
                        a.value,
                        a.invoke,
                        a.complete
                    ),
                );
            }
            if let Some(v) = must_hold.iter().find(|v| !seen.contains(**v)) {
                report(
                    "real-time",
                    format!(
                        "a read invoked at {} µs misses {v}, which an earlier completed read saw",
                        r.invoke
                    ),
                );
            }
        }
    }
    if anomalies.is_empty() {
        Ok(summary)
    } else {
        for (kind, n) in counts.into_iter().filter(|(_, n)| *n > 5) {
            anomalies.push(format!("{kind}: {n} in all"));
        }
        Err(anomalies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(process: usize, value: &str, invoke: u64, complete: u64, outcome: Outcome) -> Append {
        Append {
            process,
            value: value.into(),
            invoke,
            complete,
            outcome,
        }
    }

    fn read(process: usize, invoke: u64, complete: u64, values: &[&str]) -> Read {
        Read {
            process,
            invoke,
            complete,
            values: values.iter().map(|v| v.to_string()).collect(),
            from_replica: false,
            via: String::new(),
        }
    }

    fn list(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    fn kinds(r: Result<Summary, Vec<String>>) -> Vec<String> {
        let mut k: Vec<String> = r
            .expect_err("an anomaly")
            .iter()
            .map(|a| a.split(':').next().unwrap_or_default().to_string())
            .collect();
        k.dedup();
        k
    }

    fn base() -> History {
        History {
            sessions: [1].into(),
            appends: vec![
                append(0, "a:1", 0, 10, Outcome::Ok),
                append(1, "a:2", 20, 30, Outcome::Ok),
                append(0, "b:1", 40, 50, Outcome::Unknown),
            ],
            reads: vec![
                read(0, 11, 15, &["a:1"]),
                read(1, 31, 35, &["a:1", "a:2"]),
                read(2, 60, 70, &["a:1", "a:2", "b:1"]),
            ],
        }
    }

    #[test]
    fn a_valid_history_passes_and_is_counted() {
        let s = check(&base(), &list(&["a:1", "a:2", "b:1"])).expect("valid");
        assert_eq!(
            s,
            Summary {
                ok: 2,
                failed: 0,
                unknown: 1,
                unknown_present: 1,
                reads: 3,
                replica_reads: 0
            }
        );
    }

    #[test]
    fn a_lost_acknowledged_append_is_found() {
        let mut h = base();
        h.reads.truncate(2);
        assert_eq!(
            kinds(check(&h, &list(&["a:2"]))),
            ["lost", "seen-then-lost"]
        );
    }

    #[test]
    fn an_unknown_append_may_go_either_way_but_not_both() {
        let mut h = base();
        h.reads.pop();
        check(&h, &list(&["a:1", "a:2"])).expect("absent unknown is fine");
        check(&h, &list(&["a:1", "a:2", "b:1"])).expect("present unknown is fine");
        let h = base();
        assert_eq!(kinds(check(&h, &list(&["a:1", "a:2"]))), ["seen-then-lost"]);
    }

    #[test]
    fn duplicates_phantoms_and_failed_appends_are_found() {
        let mut h = base();
        h.appends.push(append(2, "c:1", 80, 90, Outcome::Failed));
        let r = check(&h, &list(&["a:1", "a:2", "b:1", "a:1", "c:1", "z:9"]));
        assert_eq!(kinds(r), ["duplicate", "phantom", "failed-present"]);
    }

    #[test]
    fn a_cookieless_read_must_hold_every_earlier_acknowledgement() {
        let mut h = base();
        // Invoked after a:2 was acknowledged (30), from the primary.
        h.reads.push(read(3, 40, 45, &["a:1"]));
        assert_eq!(
            kinds(check(&h, &list(&["a:1", "a:2", "b:1"]))),
            ["stale-read"]
        );
        // Concurrent with the append: either answer is linearizable.
        let mut h = base();
        h.reads.push(read(3, 25, 45, &["a:1"]));
        check(&h, &list(&["a:1", "a:2", "b:1"])).expect("concurrent");
        // A replica's answer to a cookieless client carries no promise.
        let mut h = base();
        let mut r = read(3, 40, 45, &["a:1"]);
        r.from_replica = true;
        h.reads.push(r);
        check(&h, &list(&["a:1", "a:2", "b:1"])).expect("replica read");
    }

    #[test]
    fn a_cookieless_read_must_extend_earlier_completed_reads() {
        let mut h = base();
        // b:1 (unknown) was seen at 70; a read invoked later lacks it.
        h.reads.push(read(4, 80, 85, &["a:1", "a:2"]));
        assert_eq!(
            kinds(check(&h, &list(&["a:1", "a:2", "b:1"]))),
            ["real-time"]
        );
    }

    #[test]
    fn a_session_reads_its_own_writes_and_never_goes_back() {
        let mut h = base();
        h.sessions.insert(5);
        h.appends.push(append(5, "d:1", 100, 110, Outcome::Ok));
        h.reads.push(read(5, 120, 130, &["a:1"]));
        assert_eq!(
            kinds(check(&h, &list(&["a:1", "a:2", "b:1", "d:1"]))),
            ["read-your-writes"]
        );
        let mut h = base();
        h.sessions.insert(5);
        h.reads.push(read(5, 100, 110, &["a:1", "a:2"]));
        h.reads.push(read(5, 120, 130, &["a:1"]));
        assert_eq!(
            kinds(check(&h, &list(&["a:1", "a:2", "b:1"]))),
            ["non-monotonic"]
        );
        // A session may lag other clients' writes (a replica read).
        let mut h = base();
        h.sessions.insert(5);
        h.reads.push(read(5, 100, 110, &["a:1"]));
        check(&h, &list(&["a:1", "a:2", "b:1"])).expect("a lagging session");
    }

    #[test]
    fn values_of_a_key_keep_their_order() {
        let mut h = base();
        h.reads.push(read(2, 80, 90, &["a:2", "a:1", "b:1"]));
        assert_eq!(
            kinds(check(&h, &list(&["a:1", "a:2", "b:1"]))),
            ["reordered"]
        );
    }
}
