//! Process selectors: which processes of the host belong to a replica. Pure matching;
//! sampling them from /proc is `kairos-capture`'s.

use globset::{Glob, GlobMatcher};

/// Matches processes: a plain word matches a process name (comm or argv[0]'s base name)
/// exactly; a pattern with `*`, `?` or `[` is a glob over the whole command line.
pub struct Selector {
    pattern: String,
    glob: Option<GlobMatcher>,
}

#[derive(Debug, thiserror::Error)]
#[error("process selector {pattern:?} is not a valid glob: {reason}")]
pub struct SelectorError {
    pub pattern: String,
    pub reason: String,
}

impl Selector {
    pub fn new(pattern: &str) -> Result<Selector, SelectorError> {
        let glob = if pattern.contains(['*', '?', '[']) {
            Some(
                Glob::new(pattern)
                    .map_err(|error| SelectorError {
                        pattern: pattern.to_string(),
                        reason: error.kind().to_string(),
                    })?
                    .compile_matcher(),
            )
        } else {
            None
        };
        Ok(Selector {
            pattern: pattern.to_string(),
            glob,
        })
    }

    /// The pattern as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn matches(&self, name: &str, cmdline: &[String]) -> bool {
        match &self.glob {
            Some(glob) => glob.is_match(cmdline.join(" ")),
            None => {
                name == self.pattern
                    || cmdline.first().is_some_and(|argv0| {
                        argv0.rsplit('/').next().unwrap_or(argv0) == self.pattern
                    })
            }
        }
    }
}
