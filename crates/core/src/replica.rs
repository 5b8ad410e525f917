//! Replica definitions: what to watch (a root directory, process selectors, excludes) and how often.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::probe::Probe;

use serde::{Deserialize, Serialize};

/// One watched service instance, as registered with `kairos replica add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Shell command that checks a materialised sandbox; `{root}` is replaced by its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// How long the check may run before it is killed, with its children.
    #[serde(default = "check_timeout_ms_default")]
    pub check_timeout_ms: u64,
    /// Shell command run after a commit or rollback writes the live root (e.g. a reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_commit: Option<String>,
    /// How long probes watch a commit on `main` before it counts as good.
    #[serde(default = "watch_window_ms_default")]
    pub watch_window_ms: u64,
    /// How often probes run during the watch window.
    #[serde(default = "probe_interval_ms_default")]
    pub probe_interval_ms: u64,
    /// Named commands a proposal may ask for with an `action` op (e.g. restart, reload).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub actions: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// Which frames `forget` keeps on this replica's timelines (none: the node's default
    /// policy, and without one nothing is forgotten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::RetentionPolicy>,
    /// Policies of single timelines, over `retention`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeline_retention: BTreeMap<String, crate::RetentionPolicy>,
    /// What a proposal needs before a commit (approvals, predicted risk); none: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_policy: Option<crate::ReviewPolicy>,
    /// Policies of single timelines, in place of `review_policy`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeline_review_policy: BTreeMap<String, crate::ReviewPolicy>,
    /// In a cluster, the member that can reach the root (its `cluster.node_id`, or the host
    /// of its `advertise` URL): the replica is watched there only, and never moved to
    /// another member. None: any member, and it moves when its member leaves or dies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

pub const CHECK_TIMEOUT_MS_DEFAULT: u64 = 60_000;
pub const WATCH_WINDOW_MS_DEFAULT: u64 = 10_000;
pub const WATCH_WINDOW_MS_MAX: u64 = 3_600_000;
pub const PROBE_INTERVAL_MS_DEFAULT: u64 = 500;
pub const COMMAND_LEN_MAX: usize = 4096;
pub const ACTIONS_MAX: usize = 64;
pub const PROBES_MAX: usize = 64;

fn check_timeout_ms_default() -> u64 {
    CHECK_TIMEOUT_MS_DEFAULT
}

fn watch_window_ms_default() -> u64 {
    WATCH_WINDOW_MS_DEFAULT
}

fn probe_interval_ms_default() -> u64 {
    PROBE_INTERVAL_MS_DEFAULT
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
        "replica {name:?}: host {host:?} is not a member's id or host name (1 to 253 letters, digits, '.', '-', '_')"
    )]
    BadHost { name: String, host: String },
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
    #[error("replica {name:?}: {problem}")]
    Invalid { name: String, problem: String },
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
    /// A definition with every optional setting at its default.
    pub fn new(name: &str, root: PathBuf) -> ReplicaDefinition {
        ReplicaDefinition {
            name: name.to_string(),
            root,
            processes: Vec::new(),
            exclude: Vec::new(),
            capture_interval_ms: CAPTURE_INTERVAL_MS_DEFAULT,
            check: None,
            check_timeout_ms: CHECK_TIMEOUT_MS_DEFAULT,
            after_commit: None,
            watch_window_ms: WATCH_WINDOW_MS_DEFAULT,
            probe_interval_ms: PROBE_INTERVAL_MS_DEFAULT,
            actions: BTreeMap::new(),
            probes: Vec::new(),
            retention: None,
            timeline_retention: BTreeMap::new(),
            review_policy: None,
            timeline_review_policy: BTreeMap::new(),
            host: None,
        }
    }

    /// The review policy of `timeline`: its own, else the replica's, else none.
    pub fn review_policy_of(&self, timeline: &str) -> Option<&crate::ReviewPolicy> {
        self.timeline_review_policy
            .get(timeline)
            .or(self.review_policy.as_ref())
    }

    /// The policy of `timeline`: its own, the replica's, or `default`.
    pub fn retention_of(
        &self,
        timeline: &str,
        default: Option<crate::RetentionPolicy>,
    ) -> Option<crate::RetentionPolicy> {
        self.timeline_retention
            .get(timeline)
            .copied()
            .or(self.retention)
            .or(default)
    }

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
        if let Some(host) = &self.host
            && (host.is_empty()
                || host.len() > 253
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
        {
            return Err(ReplicaError::BadHost {
                name: self.name.clone(),
                host: host.clone(),
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
        self.validate_change_settings()
    }

    fn validate_change_settings(&self) -> Result<(), ReplicaError> {
        let invalid = |problem: String| ReplicaError::Invalid {
            name: self.name.clone(),
            problem,
        };
        let command_ok = |what: &str, command: &str| {
            if command.trim().is_empty()
                || command.len() > COMMAND_LEN_MAX
                || command.contains('\0')
            {
                Err(invalid(format!(
                    "{what} command must be 1 to {COMMAND_LEN_MAX} characters with no NUL"
                )))
            } else {
                Ok(())
            }
        };
        if let Some(check) = &self.check {
            command_ok("check", check)?;
        }
        if let Some(after_commit) = &self.after_commit {
            command_ok("after_commit", after_commit)?;
        }
        if !(1..=3_600_000).contains(&self.check_timeout_ms) {
            return Err(invalid(format!(
                "check timeout {} ms must be 1 ms to 1 hour",
                self.check_timeout_ms
            )));
        }
        if self.watch_window_ms > WATCH_WINDOW_MS_MAX {
            return Err(invalid(format!(
                "watch window {} ms is longer than 1 hour",
                self.watch_window_ms
            )));
        }
        if let Some(policy) = &self.retention {
            policy
                .validate()
                .map_err(|error| invalid(format!("retention: {error}")))?;
        }
        for (timeline, policy) in &self.timeline_retention {
            policy
                .validate()
                .map_err(|error| invalid(format!("retention of timeline {timeline:?}: {error}")))?;
        }
        if let Some(policy) = &self.review_policy {
            policy
                .validate()
                .map_err(|error| invalid(format!("policy: {error}")))?;
        }
        for (timeline, policy) in &self.timeline_review_policy {
            policy
                .validate()
                .map_err(|error| invalid(format!("policy of timeline {timeline:?}: {error}")))?;
        }
        if !(10..=600_000).contains(&self.probe_interval_ms) {
            return Err(invalid(format!(
                "probe interval {} ms must be 10 ms to 10 minutes",
                self.probe_interval_ms
            )));
        }
        if self.actions.len() > ACTIONS_MAX {
            return Err(ReplicaError::TooMany {
                name: self.name.clone(),
                what: "actions",
                max: ACTIONS_MAX,
            });
        }
        for (action, command) in &self.actions {
            if !is_valid_replica_name(action) {
                return Err(invalid(format!(
                    "action name {action:?} is invalid: use letters, digits, '-', '_' or '.'"
                )));
            }
            command_ok(&format!("action {action:?}"), command)?;
        }
        if self.probes.len() > PROBES_MAX {
            return Err(ReplicaError::TooMany {
                name: self.name.clone(),
                what: "probes",
                max: PROBES_MAX,
            });
        }
        for probe in &self.probes {
            probe.validate().map_err(invalid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str) -> ReplicaDefinition {
        ReplicaDefinition::new(name, "/srv/web".into())
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
