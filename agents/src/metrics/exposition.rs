//! What the node's services expose, parsed: the Prometheus text format (the
//! webapp's `/metrics`) and nginx's `stub_status` page. Pure functions over
//! the text, so tests feed them fixed pages.

/// One sample line of the Prometheus text format: metric name, the label
/// text between the braces (empty when none) and the value. Comments, blank
/// and malformed lines are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let close = open + line[open..].find('}')?;
                ((&line[..open], &line[open + 1..close]), &line[close + 1..])
            }
            None => {
                let (name, rest) = line.split_once(char::is_whitespace)?;
                ((name, ""), rest)
            }
        };
        // An optional timestamp may follow the value.
        let value = rest.split_whitespace().next()?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some((series.0.trim(), series.1, value))
    })
}

/// The value of label `name` in a label text such as `le="0.5",code="200"`.
pub fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The webapp's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebappCounters {
    pub requests: f64,
    pub server_errors: f64,
    pub latency_sum_secs: f64,
    /// Cumulative histogram buckets: (upper bound in seconds, count), the
    /// last one `+Inf`, in the order of the page.
    pub buckets: Vec<(f64, f64)>,
}

pub const LATENCY: &str = "todomvc_http_request_duration_seconds";

/// Reads the webapp's counters from its `/metrics` page into `into`
/// (cleared first, its bucket vector reused).
pub fn webapp_counters(text: &str, into: &mut WebappCounters) {
    into.buckets.clear();
    into.requests = 0.0;
    into.server_errors = 0.0;
    into.latency_sum_secs = 0.0;
    for (name, labels, value) in samples(text) {
        match name.strip_prefix(LATENCY) {
            Some("_bucket") => {
                let le = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                into.buckets.push((le, value));
            }
            Some("_sum") => into.latency_sum_secs = value,
            _ => match name {
                "todomvc_http_requests_total" => into.requests = value,
                "todomvc_http_server_errors_total" => into.server_errors = value,
                _ => {}
            },
        }
    }
}

/// The `q` quantile (0..1) of the observations between two readings of a
/// cumulative histogram, interpolated linearly inside its bucket as
/// Prometheus's `histogram_quantile` does; `None` without observations or
/// when the buckets do not line up (the webapp restarted).
pub fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    if before.len() != after.len() || after.is_empty() {
        return None;
    }
    let delta = |i: usize| {
        let (le, now) = after[i];
        let (le0, then) = before[i];
        (le == le0 && now >= then).then_some((le, now - then))
    };
    let (_, total) = delta(after.len() - 1)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for i in 0..after.len() {
        let (le, count) = delta(i)?;
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last bound: the last bound is all we know.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let share = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    None
}

/// Requests handled so far, from nginx's `stub_status` page:
/// "Active connections: 1\nserver accepts handled requests\n 5 5 9\n...".
pub fn stub_status_requests(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    lines.find(|l| {
        l.trim_start()
            .starts_with("server accepts handled requests")
    })?;
    lines.next()?.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP todomvc_http_request_duration_seconds Time to answer a request.
# TYPE todomvc_http_request_duration_seconds histogram
todomvc_http_request_duration_seconds_bucket{le=\"0.001\"} 10
todomvc_http_request_duration_seconds_bucket{le=\"0.01\"} 90
todomvc_http_request_duration_seconds_bucket{le=\"0.1\"} 100
todomvc_http_request_duration_seconds_bucket{le=\"+Inf\"} 100
todomvc_http_request_duration_seconds_sum 0.5
todomvc_http_request_duration_seconds_count 100
todomvc_http_requests_total 100 1700000000000
todomvc_http_server_errors_total 3
garbage line without a number x
";

    #[test]
    fn the_webapp_page_parses_into_its_counters() {
        let mut c = WebappCounters::default();
        webapp_counters(PAGE, &mut c);
        assert_eq!(c.requests, 100.0, "a timestamp after the value is ignored");
        assert_eq!(c.server_errors, 3.0);
        assert_eq!(c.latency_sum_secs, 0.5);
        assert_eq!(
            c.buckets,
            [
                (0.001, 10.0),
                (0.01, 90.0),
                (0.1, 100.0),
                (f64::INFINITY, 100.0)
            ]
        );
        assert_eq!(label("le=\"0.5\", code=\"200\"", "code"), Some("200"));
        assert_eq!(samples("# only\n\nx{a=\"1\"} +Inf\n").count(), 1);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_of_the_rank() {
        let zero = [(0.001, 0.0), (0.01, 0.0), (0.1, 0.0), (f64::INFINITY, 0.0)];
        let now = [
            (0.001, 10.0),
            (0.01, 90.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        // Rank 50 of 100: 40 of the 80 in (0.001, 0.01].
        let p50 = quantile(0.5, &zero, &now).expect("p50");
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        let p95 = quantile(0.95, &zero, &now).expect("p95");
        assert!((p95 - 0.055).abs() < 1e-9, "{p95}");
        assert_eq!(quantile(0.5, &now, &now), None, "no requests in between");
        assert_eq!(
            quantile(0.5, &now, &zero),
            None,
            "a restart resets the counts"
        );
        let slow = [(0.001, 0.0), (0.01, 0.0), (0.1, 0.0), (f64::INFINITY, 5.0)];
        assert_eq!(
            quantile(0.5, &zero, &slow),
            Some(0.1),
            "past the last bound"
        );
    }

    #[test]
    fn nginx_stub_status_gives_the_request_count() {
        let page = "Active connections: 2 \nserver accepts handled requests\n 16 16 31 \n\
                    Reading: 0 Writing: 1 Waiting: 1 \n";
        assert_eq!(stub_status_requests(page), Some(31));
        assert_eq!(stub_status_requests("<html>404</html>"), None);
    }
}
