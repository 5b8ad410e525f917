//! Retention policies (restic's `forget`, borg's `prune`): which frames of a timeline to
//! keep, by rule, and the pure function that applies them to a list of frames. Frames
//! the rules do not keep are forgotten, except those something still needs (a timeline
//! head, a proposal's base, the last good frame, an unfinished commit): the store adds
//! those protections, this module knows only times.
//!
//! The rules, as restic's: `keep_last` keeps the N newest frames; `keep_hourly`,
//! `keep_daily`, `keep_weekly` keep the newest frame of each of the last N hours, days or
//! ISO weeks (UTC) that have frames; `keep_within` keeps every frame within that duration
//! of the newest frame. A frame is kept when any rule keeps it.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Instant;

const HOUR_NS: i64 = 3_600_000_000_000;
const DAY_NS: i64 = 24 * HOUR_NS;
/// Rules count at most this many periods or frames (a limit on everything).
pub const KEEP_COUNT_MAX: u32 = 1_000_000;

/// Which frames of a timeline to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Milliseconds before the newest frame within which every frame is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "retention policy keeps nothing by rule (give at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_within)"
    )]
    Empty,
    #[error("retention rule {rule} = {value} is more than {KEEP_COUNT_MAX}")]
    TooLarge { rule: &'static str, value: u64 },
    #[error("retention rule {rule} = 0 keeps nothing; leave it out instead")]
    Zero { rule: &'static str },
}

/// Why a frame is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepRule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Within,
}

impl fmt::Display for KeepRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeepRule::Last => "keep_last",
            KeepRule::Hourly => "keep_hourly",
            KeepRule::Daily => "keep_daily",
            KeepRule::Weekly => "keep_weekly",
            KeepRule::Within => "keep_within",
        })
    }
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_within_ms.is_none()
    }

    /// A policy with `other`'s rules where it has them (flags over configuration).
    pub fn overridden_by(self, other: RetentionPolicy) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: other.keep_last.or(self.keep_last),
            keep_hourly: other.keep_hourly.or(self.keep_hourly),
            keep_daily: other.keep_daily.or(self.keep_daily),
            keep_weekly: other.keep_weekly.or(self.keep_weekly),
            keep_within_ms: other.keep_within_ms.or(self.keep_within_ms),
        }
    }

    pub fn validate(&self) -> Result<(), RetentionError> {
        if self.is_empty() {
            return Err(RetentionError::Empty);
        }
        for (rule, value) in [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
        ] {
            match value {
                Some(0) => return Err(RetentionError::Zero { rule }),
                Some(value) if value > KEEP_COUNT_MAX => {
                    return Err(RetentionError::TooLarge {
                        rule,
                        value: value.into(),
                    });
                }
                _ => {}
            }
        }
        if self.keep_within_ms == Some(0) {
            return Err(RetentionError::Zero {
                rule: "keep_within",
            });
        }
        Ok(())
    }

    /// For frame times sorted newest first, the rules that keep each frame (empty: the
    /// rules let it go).
    pub fn keep(&self, newest_first: &[Instant]) -> Vec<BTreeSet<KeepRule>> {
        debug_assert!(newest_first.windows(2).all(|w| w[0] >= w[1]));
        let mut kept = vec![BTreeSet::new(); newest_first.len()];
        if let Some(count) = self.keep_last {
            for reasons in kept.iter_mut().take(count as usize) {
                reasons.insert(KeepRule::Last);
            }
        }
        let periods: [(KeepRule, Option<u32>, Period); 3] = [
            (KeepRule::Hourly, self.keep_hourly, |at| {
                at.0.div_euclid(HOUR_NS)
            }),
            (KeepRule::Daily, self.keep_daily, |at| {
                at.0.div_euclid(DAY_NS)
            }),
            (KeepRule::Weekly, self.keep_weekly, iso_week),
        ];
        for (rule, count, period) in periods {
            let Some(count) = count else { continue };
            let mut last_period = None;
            let mut taken = 0;
            for (at, reasons) in newest_first.iter().zip(kept.iter_mut()) {
                if taken == count {
                    break;
                }
                let this = period(*at);
                if last_period != Some(this) {
                    last_period = Some(this);
                    reasons.insert(rule);
                    taken += 1;
                }
            }
        }
        if let (Some(within_ms), Some(newest)) = (self.keep_within_ms, newest_first.first()) {
            let from = newest.0.saturating_sub(
                i64::try_from(within_ms)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000),
            );
            for (at, reasons) in newest_first.iter().zip(kept.iter_mut()) {
                if at.0 < from {
                    break;
                }
                reasons.insert(KeepRule::Within);
            }
        }
        kept
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (rule, value) in [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
        ] {
            if let Some(value) = value {
                parts.push(format!("{rule}={value}"));
            }
        }
        if let Some(ms) = self.keep_within_ms {
            parts.push(format!(
                "keep_within={}",
                humantime::format_duration(std::time::Duration::from_millis(ms))
            ));
        }
        if parts.is_empty() {
            f.write_str("(no rules)")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// The period (hour, day, week) an instant falls in, as a number.
type Period = fn(Instant) -> i64;

/// The ISO week (Monday to Sunday, UTC) holding `at`, as a number of weeks since the
/// Monday before the epoch (1970-01-01 was a Thursday).
fn iso_week(at: Instant) -> i64 {
    (at.0.div_euclid(DAY_NS) + 3).div_euclid(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_start_on_monday() {
        // 1970-01-05 was a Monday, 1970-01-04 a Sunday.
        let day = |d: i64| Instant(d * DAY_NS);
        assert_eq!(iso_week(day(3)), iso_week(day(0)));
        assert_ne!(iso_week(day(4)), iso_week(day(3)));
        assert_eq!(iso_week(day(4)), iso_week(day(10)));
        assert_ne!(iso_week(day(11)), iso_week(day(10)));
    }

    #[test]
    fn policies_are_validated() {
        assert_eq!(
            RetentionPolicy::default().validate(),
            Err(RetentionError::Empty)
        );
        let zero = RetentionPolicy {
            keep_daily: Some(0),
            ..RetentionPolicy::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("keep_daily")
        );
        let flags = RetentionPolicy {
            keep_last: Some(3),
            ..RetentionPolicy::default()
        };
        let configured = RetentionPolicy {
            keep_last: Some(10),
            keep_daily: Some(7),
            ..RetentionPolicy::default()
        };
        let merged = configured.overridden_by(flags);
        assert_eq!((merged.keep_last, merged.keep_daily), (Some(3), Some(7)));
        assert_eq!(merged.to_string(), "keep_last=3 keep_daily=7");
    }
}
