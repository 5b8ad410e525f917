//! Replica settings as users give them (flags, API requests): checked and turned into a
//! [`ReplicaDefinition`].

use std::path::Path;

use kairos_core::{Probe, ReplicaDefinition};
use serde::{Deserialize, Serialize};

use crate::exclude::build_excludes;
use crate::selector::Selector;

/// A replica definition or setting that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{what} {text:?} is not a duration: {reason}")]
    Duration {
        what: &'static str,
        text: String,
        reason: String,
    },
    #[error("action {0:?} is not NAME=COMMAND")]
    Action(String),
    #[error("action {0:?} is given twice")]
    ActionTwice(String),
    #[error("{0}")]
    Probe(String),
    #[error("replica {replica:?}: root {root} is not readable: {reason}")]
    RootUnreadable {
        replica: String,
        root: String,
        reason: String,
    },
    #[error("replica {replica:?}: root {root} is not a directory")]
    RootNotDirectory { replica: String, root: String },
    #[error("replica {replica:?}: {source}")]
    Setting {
        replica: String,
        source: Box<SettingsError>,
    },
    #[error(transparent)]
    Definition(#[from] kairos_core::ReplicaError),
    #[error("replica {replica:?}: {source}")]
    Selector {
        replica: String,
        source: crate::selector::SelectorError,
    },
    #[error(transparent)]
    Exclude(#[from] crate::exclude::ExcludeError),
}

/// The change settings of a replica as given on the command line or in an API request:
/// durations as text (`10s`), actions as `NAME=COMMAND`, probes as `KIND:SPEC`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSettings {
    pub check: Option<String>,
    pub check_timeout: Option<String>,
    pub after_commit: Option<String>,
    pub watch_window: Option<String>,
    pub probe_interval: Option<String>,
    pub actions: Vec<String>,
    pub probes: Vec<String>,
    /// In a cluster, the member the replica is watched on (its id or host name).
    pub host: Option<String>,
}

fn duration_ms(what: &'static str, text: &str) -> Result<u64, SettingsError> {
    let duration = humantime::parse_duration(text).map_err(|error| SettingsError::Duration {
        what,
        text: text.to_string(),
        reason: error.to_string(),
    })?;
    Ok(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

impl ReplicaSettings {
    /// Puts these settings into `replica`, naming the first bad one.
    pub fn apply(&self, replica: &mut ReplicaDefinition) -> Result<(), SettingsError> {
        replica.check = self.check.clone();
        replica.after_commit = self.after_commit.clone();
        replica.host = self.host.clone();
        if let Some(text) = &self.check_timeout {
            replica.check_timeout_ms = duration_ms("check timeout", text)?;
        }
        if let Some(text) = &self.watch_window {
            replica.watch_window_ms = duration_ms("watch window", text)?;
        }
        if let Some(text) = &self.probe_interval {
            replica.probe_interval_ms = duration_ms("probe interval", text)?;
        }
        for action in &self.actions {
            let (name, command) = action
                .split_once('=')
                .ok_or_else(|| SettingsError::Action(action.clone()))?;
            if replica
                .actions
                .insert(name.trim().to_string(), command.trim().to_string())
                .is_some()
            {
                return Err(SettingsError::ActionTwice(name.trim().to_string()));
            }
        }
        for probe in &self.probes {
            replica
                .probes
                .push(Probe::parse_flag(probe).map_err(SettingsError::Probe)?);
        }
        Ok(())
    }
}

/// A replica definition from user input, checked: the root must be a readable directory
/// (stored as its canonical absolute path), selectors and globs must compile.
pub fn define_replica(
    name: &str,
    root: &Path,
    processes: Vec<String>,
    exclude: Vec<String>,
    capture_interval: &str,
    settings: &ReplicaSettings,
) -> Result<ReplicaDefinition, SettingsError> {
    let interval = duration_ms("capture interval", capture_interval)?;
    let metadata = std::fs::metadata(root).map_err(|error| SettingsError::RootUnreadable {
        replica: name.to_string(),
        root: root.display().to_string(),
        reason: error.to_string(),
    })?;
    if !metadata.is_dir() {
        return Err(SettingsError::RootNotDirectory {
            replica: name.to_string(),
            root: root.display().to_string(),
        });
    }
    let root = root
        .canonicalize()
        .map_err(|error| SettingsError::RootUnreadable {
            replica: name.to_string(),
            root: root.display().to_string(),
            reason: error.to_string(),
        })?;
    let mut replica = ReplicaDefinition::new(name, root);
    replica.processes = processes;
    replica.exclude = exclude;
    replica.capture_interval_ms = interval;
    settings
        .apply(&mut replica)
        .map_err(|error| SettingsError::Setting {
            replica: name.to_string(),
            source: Box::new(error),
        })?;
    replica.validate()?;
    for pattern in &replica.processes {
        Selector::new(pattern).map_err(|source| SettingsError::Selector {
            replica: name.to_string(),
            source,
        })?;
    }
    build_excludes(&replica)?;
    Ok(replica)
}
