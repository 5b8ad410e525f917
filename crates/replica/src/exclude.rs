//! Exclude globs: the paths (relative to a replica's root) that are never captured,
//! restored over or proposed.

use globset::{Glob, GlobSet, GlobSetBuilder};
use kairos_core::ReplicaDefinition;

#[derive(Debug, thiserror::Error)]
#[error("replica {replica:?}: exclude glob {pattern:?} is invalid: {reason}")]
pub struct ExcludeError {
    pub replica: String,
    pub pattern: String,
    pub reason: String,
}

/// The replica's exclude globs, compiled into one set.
pub fn build_excludes(replica: &ReplicaDefinition) -> Result<GlobSet, ExcludeError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in &replica.exclude {
        let glob = Glob::new(pattern).map_err(|error| ExcludeError {
            replica: replica.name.clone(),
            pattern: pattern.clone(),
            reason: error.kind().to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|error| ExcludeError {
        replica: replica.name.clone(),
        pattern: replica.exclude.join(", "),
        reason: error.to_string(),
    })
}
