//! Where a commit stands: the status every crate (catalog guards, committer, API) shares.

use serde::{Deserialize, Serialize};

/// Where a commit stands. `applying`, `watching` and `rolling_back` are in progress (the
/// replica's pending marker names the commit); the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitStatus {
    Applying,
    Watching,
    RollingBack,
    Committed,
    RolledBack,
    Conflict,
    Failed,
}

impl CommitStatus {
    pub fn name(self) -> &'static str {
        match self {
            CommitStatus::Applying => "applying",
            CommitStatus::Watching => "watching",
            CommitStatus::RollingBack => "rolling_back",
            CommitStatus::Committed => "committed",
            CommitStatus::RolledBack => "rolled_back",
            CommitStatus::Conflict => "conflict",
            CommitStatus::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommitStatus::Applying | CommitStatus::Watching | CommitStatus::RollingBack
        )
    }
}

impl std::fmt::Display for CommitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
