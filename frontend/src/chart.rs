//! Line charts as SVG geometry: series of (time, value) points scaled into
//! a box, a rounded top for the value axis, a summed series, and values in
//! the units the metrics carry. Pure, so it is unit-tested without a
//! browser; `components/metric_chart.rs` draws it.

use corral_proto::{MetricPoint, NodeSeries};

/// Width and height of the drawing in SVG units: it scales with the page,
/// keeping this shape, so dots stay round.
pub const WIDTH: f64 = 600.0;
pub const HEIGHT: f64 = 220.0;

/// The top of the value axis: the smallest 1, 2 or 5 times a power of ten
/// at or above `max` (1 when there is nothing above zero).
pub fn nice_max(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|top| *top >= max)
        .unwrap_or(10.0 * magnitude)
}

/// The `points` attribute of a polyline: each point's time across
/// `from..=to`, its value up from the bottom to `top`. Points outside the
/// range are left out; values are clamped into the box.
pub fn polyline(points: &[MetricPoint], from: i64, to: i64, top: f64) -> String {
    let mut out = String::with_capacity(points.len() * 14);
    for (x, y) in points.iter().filter_map(|p| xy(p, from, to, top)) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{x:.1},{y:.1}"));
    }
    out
}

/// Where a point goes in the box, if its time is in the range.
pub fn xy(p: &MetricPoint, from: i64, to: i64, top: f64) -> Option<(f64, f64)> {
    let top = if top > 0.0 { top } else { 1.0 };
    let x = x_of(p.at, from, to)?;
    Some((x, HEIGHT - (p.value / top).clamp(0.0, 1.0) * HEIGHT))
}

/// Where a moment falls across the width, if inside the range.
pub fn x_of(at: i64, from: i64, to: i64) -> Option<f64> {
    (at >= from && at <= to).then(|| (at - from) as f64 / (to - from).max(1) as f64 * WIDTH)
}

/// The series added up point by point (same `at`), e.g. requests/s through
/// every load balancer.
pub fn sum(series: &[NodeSeries]) -> Vec<MetricPoint> {
    let mut total: std::collections::BTreeMap<i64, (f64, f64)> = Default::default();
    for s in series {
        for p in &s.points {
            let e = total.entry(p.at).or_default();
            e.0 += p.value;
            e.1 += p.max;
        }
    }
    total
        .into_iter()
        .map(|(at, (value, max))| MetricPoint { at, value, max })
        .collect()
}

/// A value with its unit, short: `12.5 %`, `3.2 MiB`, `41 /s`, `7.0 ms`.
pub fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "bytes" | "bytes/s" => {
            let suffix = if unit == "bytes/s" { "/s" } else { "" };
            let mut v = value;
            for prefix in ["B", "KiB", "MiB", "GiB"] {
                if v.abs() < 1024.0 {
                    return format!("{v:.1} {prefix}{suffix}");
                }
                v /= 1024.0;
            }
            format!("{v:.1} TiB{suffix}")
        }
        "" => format!("{value:.0}"),
        unit => format!("{value:.1} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(at: i64, value: f64) -> MetricPoint {
        MetricPoint {
            at,
            value,
            max: value,
        }
    }

    #[test]
    fn the_value_axis_tops_at_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(nice_max(0.3), 0.5);
        assert_eq!(nice_max(1.0), 1.0);
        assert_eq!(nice_max(1.5), 2.0);
        assert_eq!(nice_max(420.0), 500.0);
        assert_eq!(nice_max(600.0), 1000.0);
    }

    #[test]
    fn points_scale_into_the_box_time_across_and_value_up() {
        let line = polyline(
            &[p(0, 0.0), p(50, 5.0), p(100, 20.0), p(200, 1.0)],
            0,
            100,
            10.0,
        );
        assert_eq!(line, "0.0,220.0 300.0,110.0 600.0,0.0");
        assert_eq!(x_of(25, 0, 100), Some(150.0));
        assert_eq!(xy(&p(100, 5.0), 0, 100, 10.0), Some((600.0, 110.0)));
        assert_eq!(x_of(101, 0, 100), None);
    }

    #[test]
    fn series_add_up_at_the_same_moments() {
        let s = |node: &str, points| NodeSeries {
            node: node.into(),
            points,
        };
        let total = sum(&[
            s("nginx1", vec![p(10, 1.0), p(20, 2.0)]),
            s("nginx2", vec![p(20, 3.0), p(30, 4.0)]),
        ]);
        assert_eq!(total, [p(10, 1.0), p(20, 5.0), p(30, 4.0)]);
    }

    #[test]
    fn values_read_in_their_units() {
        assert_eq!(format_value(12.345, "%"), "12.3 %");
        assert_eq!(format_value(3.5 * 1024.0 * 1024.0, "bytes"), "3.5 MiB");
        assert_eq!(format_value(2048.0, "bytes/s"), "2.0 KiB/s");
        assert_eq!(format_value(4.0, ""), "4");
    }
}
