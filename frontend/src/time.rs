//! Times as people read them: "12 s ago", and short UTC timestamps.

use chrono::{DateTime, Utc};

/// Milliseconds since the epoch, from the browser's clock.
pub fn now_ms() -> i64 {
    js_sys::Date::now() as i64
}

pub fn ago(at: DateTime<Utc>, now_ms: i64) -> String {
    let secs = ((now_ms - at.timestamp_millis()) / 1000).max(0);
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

pub fn stamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

pub fn clock(at: DateTime<Utc>) -> String {
    at.format("%H:%M:%S").to_string()
}
