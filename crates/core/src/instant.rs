//! Instants: nanoseconds since the Unix epoch, shown as RFC 3339 with nanoseconds in UTC.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// A point in time, in nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Instant(pub i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstantError {
    #[error("{0:?} is not an RFC 3339 instant (for example 2026-11-25T21:30:00Z): {1}")]
    NotRfc3339(String, String),
    #[error("{0:?} is out of the supported range (years 1678 to 2261)")]
    OutOfRange(String),
}

impl Instant {
    pub fn now() -> Instant {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Instant(i64::try_from(since.as_nanos()).unwrap_or(i64::MAX))
    }

    pub fn from_system_time(time: SystemTime) -> Instant {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Instant(i64::try_from(after.as_nanos()).unwrap_or(i64::MAX)),
            Err(before) => {
                Instant(-i64::try_from(before.duration().as_nanos()).unwrap_or(i64::MAX))
            }
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_nanos(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(self.0.unsigned_abs())
        }
    }

    pub fn parse_rfc3339(text: &str) -> Result<Instant, InstantError> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|error| InstantError::NotRfc3339(text.to_string(), error.to_string()))?;
        i64::try_from(parsed.unix_timestamp_nanos())
            .map(Instant)
            .map_err(|_| InstantError::OutOfRange(text.to_string()))
    }

    pub fn saturating_sub(self, duration: Duration) -> Instant {
        let nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        Instant(self.0.saturating_sub(nanos))
    }

    /// Nanoseconds elapsed from `earlier` to `self` (zero when `earlier` is later).
    pub fn nanos_since(self, earlier: Instant) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }

    /// Big-endian bytes that sort like the instants they encode.
    pub fn to_sortable_bytes(self) -> [u8; 8] {
        ((self.0 as u64) ^ (1 << 63)).to_be_bytes()
    }

    pub fn from_sortable_bytes(bytes: [u8; 8]) -> Instant {
        Instant((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
        );
        match OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0))
            .ok()
            .and_then(|time| time.format(&format).ok())
        {
            Some(text) => f.write_str(&text),
            None => write!(f, "{}ns", self.0),
        }
    }
}

impl serde::Serialize for Instant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Instant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Instant, D::Error> {
        let text = String::deserialize(deserializer)?;
        Instant::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_nanoseconds_and_parses_back() {
        let instant = Instant(1_764_106_237_123_456_789);
        let text = instant.to_string();
        assert_eq!(text, "2025-11-25T21:30:37.123456789Z");
        assert_eq!(Instant::parse_rfc3339(&text).unwrap(), instant);
    }

    #[test]
    fn parses_offsets() {
        let utc = Instant::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let offset = Instant::parse_rfc3339("2026-01-01T01:00:00+01:00").unwrap();
        assert_eq!(utc, offset);
    }

    #[test]
    fn sortable_bytes_sort_like_instants() {
        let values = [i64::MIN, -5, 0, 7, i64::MAX];
        for pair in values.windows(2) {
            assert!(Instant(pair[0]).to_sortable_bytes() < Instant(pair[1]).to_sortable_bytes());
            assert_eq!(
                Instant::from_sortable_bytes(Instant(pair[0]).to_sortable_bytes()),
                Instant(pair[0])
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(Instant::parse_rfc3339("yesterday").is_err());
    }
}
