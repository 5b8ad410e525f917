//! Kairos capture sources: the directory tree, config files, processes and resource
//! metrics of a replica, written into the store as one frame.

pub mod capture;
pub mod config;
pub mod process;

pub use capture::{CaptureError, CaptureReport, CaptureRequest, capture};

use std::path::Path;

use kairos_core::{Probe, ReplicaDefinition};
use serde::{Deserialize, Serialize};

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
}

fn duration_ms(what: &str, text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|error| format!("{what} {text:?} is not a duration: {error}"))?;
    Ok(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

impl ReplicaSettings {
    /// Puts these settings into `replica`, naming the first bad one.
    pub fn apply(&self, replica: &mut ReplicaDefinition) -> Result<(), String> {
        replica.check = self.check.clone();
        replica.after_commit = self.after_commit.clone();
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
                .ok_or_else(|| format!("action {action:?} is not NAME=COMMAND"))?;
            if replica
                .actions
                .insert(name.trim().to_string(), command.trim().to_string())
                .is_some()
            {
                return Err(format!("action {:?} is given twice", name.trim()));
            }
        }
        for probe in &self.probes {
            replica.probes.push(Probe::parse_flag(probe)?);
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
) -> Result<ReplicaDefinition, String> {
    let interval = humantime::parse_duration(capture_interval).map_err(|error| {
        format!("capture interval {capture_interval:?} is not a duration: {error}")
    })?;
    let metadata = std::fs::metadata(root).map_err(|error| {
        format!(
            "replica {name:?}: root {} is not readable: {error}",
            root.display()
        )
    })?;
    if !metadata.is_dir() {
        return Err(format!(
            "replica {name:?}: root {} is not a directory",
            root.display()
        ));
    }
    let root = root.canonicalize().map_err(|error| {
        format!(
            "replica {name:?}: resolving root {}: {error}",
            root.display()
        )
    })?;
    let mut replica = ReplicaDefinition::new(name, root);
    replica.processes = processes;
    replica.exclude = exclude;
    replica.capture_interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    settings
        .apply(&mut replica)
        .map_err(|error| format!("replica {name:?}: {error}"))?;
    replica.validate().map_err(|error| error.to_string())?;
    for pattern in &replica.processes {
        process::Selector::new(pattern).map_err(|error| format!("replica {name:?}: {error}"))?;
    }
    capture::build_excludes(&replica).map_err(|error| error.to_string())?;
    Ok(replica)
}
