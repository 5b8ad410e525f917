//! Frame specs: how users name a frame (`latest`, an id prefix, an instant, an age), with an
//! optional `TIMELINE@` prefix.

use std::fmt;
use std::time::Duration;

use crate::hash::parse_hex_prefix;
use crate::instant::Instant;

/// The shortest frame id prefix accepted, so that an id is never mistaken for a word.
pub const FRAME_ID_PREFIX_LEN_MIN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameSpec {
    /// The newest frame.
    Latest,
    /// A frame whose id starts with these (lowercase) hex digits.
    IdPrefix(String),
    /// The last frame at or before this instant.
    At(Instant),
    /// The last frame at or before `now - age`.
    Ago(Duration),
}

/// A frame spec on a named timeline (`main` when not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineSpec {
    pub timeline: String,
    pub frame: FrameSpec,
}

pub const MAIN_TIMELINE: &str = "main";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "{0:?} is not a frame spec: use latest, a frame id prefix (at least 4 hex digits), an RFC 3339 instant or an age such as -10m"
    )]
    Unrecognised(String),
    #[error("{0:?} is not an age: {1}")]
    BadAge(String, String),
    #[error("{0}")]
    BadInstant(String),
    #[error("timeline name {0:?} is invalid: use letters, digits, '-', '_' and '.'")]
    BadTimeline(String),
}

impl TimelineSpec {
    pub fn parse(text: &str) -> Result<TimelineSpec, SpecError> {
        let text = text.trim();
        let (timeline, frame) = match text.split_once('@') {
            Some((timeline, frame)) => {
                if !is_valid_timeline_name(timeline) {
                    return Err(SpecError::BadTimeline(timeline.to_string()));
                }
                (timeline.to_string(), frame)
            }
            None => (MAIN_TIMELINE.to_string(), text),
        };
        Ok(TimelineSpec {
            timeline,
            frame: FrameSpec::parse(frame)?,
        })
    }
}

pub fn is_valid_timeline_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl FrameSpec {
    pub fn parse(text: &str) -> Result<FrameSpec, SpecError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("latest") || text.eq_ignore_ascii_case("head") {
            return Ok(FrameSpec::Latest);
        }
        if let Some(age) = text.strip_prefix('-') {
            return humantime::parse_duration(age)
                .map(FrameSpec::Ago)
                .map_err(|error| SpecError::BadAge(text.to_string(), error.to_string()));
        }
        if text.len() >= FRAME_ID_PREFIX_LEN_MIN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return parse_hex_prefix(text)
                .map(FrameSpec::IdPrefix)
                .map_err(|_| SpecError::Unrecognised(text.to_string()));
        }
        if text.starts_with(|c: char| c.is_ascii_digit()) && text.contains(['T', 't', ' ']) {
            return Instant::parse_rfc3339(text)
                .map(FrameSpec::At)
                .map_err(|error| SpecError::BadInstant(error.to_string()));
        }
        Err(SpecError::Unrecognised(text.to_string()))
    }
}

impl fmt::Display for FrameSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameSpec::Latest => f.write_str("latest"),
            FrameSpec::IdPrefix(prefix) => f.write_str(prefix),
            FrameSpec::At(instant) => write!(f, "{instant}"),
            FrameSpec::Ago(age) => write!(f, "-{}", humantime::format_duration(*age)),
        }
    }
}

impl fmt::Display for TimelineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.timeline, self.frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(FrameSpec::parse("latest").unwrap(), FrameSpec::Latest);
        assert_eq!(
            FrameSpec::parse("-10m").unwrap(),
            FrameSpec::Ago(Duration::from_secs(600))
        );
        assert_eq!(
            FrameSpec::parse("ABCD12").unwrap(),
            FrameSpec::IdPrefix("abcd12".into())
        );
        assert!(matches!(
            FrameSpec::parse("2026-11-25T10:00:00Z").unwrap(),
            FrameSpec::At(_)
        ));
        let spec = TimelineSpec::parse("fix-1@latest").unwrap();
        assert_eq!(spec.timeline, "fix-1");
        assert_eq!(TimelineSpec::parse("-1h").unwrap().timeline, "main");
    }

    #[test]
    fn rejects_with_named_problem() {
        let error = FrameSpec::parse("abc").unwrap_err().to_string();
        assert!(error.contains("\"abc\" is not a frame spec"), "{error}");
        let error = FrameSpec::parse("-10 parsecs").unwrap_err().to_string();
        assert!(error.contains("is not an age"), "{error}");
        let error = FrameSpec::parse("2026-13-01T00:00:00Z")
            .unwrap_err()
            .to_string();
        assert!(error.contains("RFC 3339"), "{error}");
        assert!(TimelineSpec::parse("../x@latest").is_err());
    }
}
