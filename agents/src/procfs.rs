//! Reading the kernel's `/proc` files: one parser per file, pure over the
//! text, so the supervisor and the metrics sampler read processes, CPU,
//! memory and network the same way and tests feed them fixed text.

/// What `/proc/<pid>/stat` says of a process (fields after the command
/// name, which may itself hold spaces and parentheses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Neither a zombie nor dead.
    pub fn alive(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    // Fields 3.. of proc(5): state, ppid, pgrp, session, tty_nr, tpgid,
    // flags, minflt, cminflt, majflt, cmajflt, utime, stime, cutime,
    // cstime, priority, nice, num_threads, itrealvalue, starttime, vsize, rss.
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let utime: u64 = f.nth(8)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let rss_pages = f.nth(8)?.parse::<i64>().ok()?.max(0) as u64;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        cpu_ticks: utime + stime,
        rss_pages,
    })
}

/// Reads `/proc/<pid>/stat` into `buf` (kept by the caller, so a scan of
/// every process allocates once) and parses it.
pub fn read_stat(pid: u32, buf: &mut String) -> Option<ProcStat> {
    use std::io::Read;
    buf.clear();
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    file.read_to_string(buf).ok()?;
    parse_stat(buf)
}

/// The first line of `/proc/stat`: (busy, total) CPU time of the host in
/// ticks, all CPUs together. iowait counts as idle.
pub fn parse_cpu_totals(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let mut total = 0;
    let mut idle = 0;
    for (i, v) in line.split_whitespace().enumerate() {
        let v: u64 = v.parse().ok()?;
        // user nice system idle iowait irq softirq steal guest guest_nice:
        // guest time is already inside user and nice.
        if i >= 8 {
            break;
        }
        total += v;
        if i == 3 || i == 4 {
            idle += v;
        }
    }
    Some((total - idle, total))
}

/// `/proc/meminfo`: (total, available) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// `/proc/net/dev`: bytes received and sent over every interface.
pub fn parse_net_dev(text: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let Some((_, counters)) = line.split_once(':') else {
            continue;
        };
        let mut f = counters.split_whitespace();
        rx = rx.saturating_add(f.next().and_then(|v| v.parse().ok()).unwrap_or(0));
        tx = tx.saturating_add(f.nth(7).and_then(|v| v.parse().ok()).unwrap_or(0));
    }
    (rx, tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_stat_parses_past_a_name_with_spaces_and_parens() {
        let text = "4242 (postgres: (x) y) S 1 4200 4200 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 1 0 123 456789 1234 18446744073709551615 1 1 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4200,
                cpu_ticks: 300,
                rss_pages: 1234
            }
        );
        assert!(s.alive());
        assert!(
            !parse_stat(&text.replace(" S ", " Z "))
                .expect("zombie")
                .alive()
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn host_cpu_memory_and_network_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 7 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_cpu_totals(stat), Some((150, 1000)));
        let meminfo = "MemTotal:       2000 kB\nMemFree:  100 kB\nMemAvailable:   500 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((2_048_000, 512_000)));
        let dev = "Inter-|   Receive |  Transmit\n face |bytes packets\n    \
                   lo: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  \
                   eth0:  300  3 0 0 0 0 0 0  400  4 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev), (1300, 2400));
    }
}
