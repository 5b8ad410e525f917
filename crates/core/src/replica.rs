//! Replica definitions: what to watch (a root directory, process selectors, excludes) and how often.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One watched service instance, as registered with `kairos replica add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaDefinition {
    pub name: String,
    /// Absolute path of the replica's root directory.
    pub root: PathBuf,
    /// Process selectors: a plain word matches a process name exactly; a pattern with
    /// `*`, `?` or `[` is a glob matched against the whole command line.
    #[serde(default)]
    pub processes: Vec<String>,
    /// Globs of paths (relative to the root) left out of captures.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// How often the node captures this replica, in milliseconds.
    pub capture_interval_ms: u64,
}

pub const CAPTURE_INTERVAL_MS_DEFAULT: u64 = 5_000;
pub const CAPTURE_INTERVAL_MS_MIN: u64 = 100;
pub const REPLICA_NAME_LEN_MAX: usize = 64;
pub const SELECTORS_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "replica name {0:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("replica {name:?}: root {root:?} must be an absolute path")]
    RootNotAbsolute { name: String, root: PathBuf },
    #[error(
        "replica {name:?}: capture interval {interval_ms} ms is below the minimum of {min_ms} ms"
    )]
    IntervalTooShort {
        name: String,
        interval_ms: u64,
        min_ms: u64,
    },
    #[error("replica {name:?}: {what} {pattern:?} is invalid: {reason}")]
    BadPattern {
        name: String,
        what: &'static str,
        pattern: String,
        reason: String,
    },
    #[error("replica {name:?}: more than {max} {what}")]
    TooMany {
        name: String,
        what: &'static str,
        max: usize,
    },
}

pub fn is_valid_replica_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= REPLICA_NAME_LEN_MAX
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ReplicaDefinition {
    pub fn capture_interval(&self) -> Duration {
        Duration::from_millis(self.capture_interval_ms)
    }

    /// Checks everything that does not need the file system.
    pub fn validate(&self) -> Result<(), ReplicaError> {
        if !is_valid_replica_name(&self.name) {
            return Err(ReplicaError::BadName(self.name.clone()));
        }
        if !self.root.is_absolute() {
            return Err(ReplicaError::RootNotAbsolute {
                name: self.name.clone(),
                root: self.root.clone(),
            });
        }
        if self.capture_interval_ms < CAPTURE_INTERVAL_MS_MIN {
            return Err(ReplicaError::IntervalTooShort {
                name: self.name.clone(),
                interval_ms: self.capture_interval_ms,
                min_ms: CAPTURE_INTERVAL_MS_MIN,
            });
        }
        for (what, patterns) in [
            ("process selector", &self.processes),
            ("exclude glob", &self.exclude),
        ] {
            if patterns.len() > SELECTORS_MAX {
                return Err(ReplicaError::TooMany {
                    name: self.name.clone(),
                    what,
                    max: SELECTORS_MAX,
                });
            }
            for pattern in patterns {
                if pattern.trim().is_empty() || pattern.len() > 1024 || pattern.contains('\0') {
                    return Err(ReplicaError::BadPattern {
                        name: self.name.clone(),
                        what,
                        pattern: pattern.clone(),
                        reason: "it must be 1 to 1024 characters with no NUL".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str) -> ReplicaDefinition {
        ReplicaDefinition {
            name: name.into(),
            root: "/srv/web".into(),
            processes: vec![],
            exclude: vec![],
            capture_interval_ms: CAPTURE_INTERVAL_MS_DEFAULT,
        }
    }

    #[test]
    fn validates_names_and_roots() {
        assert!(replica("web-1").validate().is_ok());
        assert!(matches!(
            replica("../x").validate(),
            Err(ReplicaError::BadName(_))
        ));
        assert!(matches!(
            replica("").validate(),
            Err(ReplicaError::BadName(_))
        ));
        let mut relative = replica("web");
        relative.root = "srv".into();
        let error = relative.validate().unwrap_err().to_string();
        assert_eq!(
            error,
            "replica \"web\": root \"srv\" must be an absolute path"
        );
    }
}
