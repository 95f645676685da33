//! PostgreSQL write-ahead-log positions (`pg_lsn`), the currency of
//! read-your-writes: a client carries the position of its latest write (or
//! read) and a replica may answer it only once it has replayed that far.

use std::fmt;
use std::str::FromStr;

/// A WAL position, ordered like PostgreSQL orders `pg_lsn` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Beyond every real position: no replica satisfies it, so a session
    /// holding it reads from the primary. Used when a write committed but its
    /// position could not be learned.
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// Bytes from `self` back to `earlier` (0 when `earlier` is ahead).
    pub fn bytes_after(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// PostgreSQL's text form: two hexadecimal halves, `16/B374D848`.
impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WAL position (expected two hex numbers like 16/B374D848): {0:?}")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.chars().take(40).collect());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(h, 16).map_err(|_| bad())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_postgres_text_form() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/3000060"] {
            let lsn: Lsn = text.parse().expect(text);
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap().0, 0x16_B374_D848);
    }

    #[test]
    fn orders_by_position_not_by_text() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert!(a < b);
        assert!("0/9".parse::<Lsn>().unwrap() < "0/10".parse::<Lsn>().unwrap());
        assert_eq!(b.bytes_after(a), 1);
        assert_eq!(a.bytes_after(b), 0);
    }

    #[test]
    fn rejects_malformed_positions() {
        for text in [
            "",
            "/",
            "0/",
            "/0",
            "12",
            "0/1/2",
            "g/0",
            "0/+1",
            "123456789/0",
            " 0/1",
        ] {
            assert!(text.parse::<Lsn>().is_err(), "{text:?} should not parse");
        }
    }
}
