//! Kairos capture sources: the directory tree, config files, processes and resource
//! metrics of a replica, written into the store as one frame.

pub mod capture;
pub mod config;
pub mod process;

pub use capture::{CaptureError, CaptureReport, CaptureRequest, capture};

use std::path::Path;

use kairos_core::ReplicaDefinition;

/// A replica definition from user input, checked: the root must be a readable directory
/// (stored as its canonical absolute path), selectors and globs must compile.
pub fn define_replica(
    name: &str,
    root: &Path,
    processes: Vec<String>,
    exclude: Vec<String>,
    capture_interval: &str,
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
    let replica = ReplicaDefinition {
        name: name.to_string(),
        root,
        processes,
        exclude,
        capture_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
    };
    replica.validate().map_err(|error| error.to_string())?;
    for pattern in &replica.processes {
        process::Selector::new(pattern).map_err(|error| format!("replica {name:?}: {error}"))?;
    }
    capture::build_excludes(&replica).map_err(|error| error.to_string())?;
    Ok(replica)
}
