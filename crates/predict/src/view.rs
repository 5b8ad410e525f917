//! The plain input types of the predictor: a proposal as the model sees it (ops, the base
//! values of the entries it touches, the sandbox diff summary) and the outcomes that become
//! training labels. No dependency on the store, the sandbox or the node: callers convert.

use serde::{Deserialize, Serialize};

/// The kind of one op, as in `kairos_sandbox::Op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    PutFile,
    PatchFile,
    Delete,
    SetConfig,
    UnsetConfig,
    Action,
}

impl OpKind {
    pub const ALL: [OpKind; 6] = [
        OpKind::PutFile,
        OpKind::PatchFile,
        OpKind::Delete,
        OpKind::SetConfig,
        OpKind::UnsetConfig,
        OpKind::Action,
    ];

    pub fn index(self) -> usize {
        match self {
            OpKind::PutFile => 0,
            OpKind::PatchFile => 1,
            OpKind::Delete => 2,
            OpKind::SetConfig => 3,
            OpKind::UnsetConfig => 4,
            OpKind::Action => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OpKind::PutFile => "put_file",
            OpKind::PatchFile => "patch_file",
            OpKind::Delete => "delete",
            OpKind::SetConfig => "set_config",
            OpKind::UnsetConfig => "unset_config",
            OpKind::Action => "action",
        }
    }
}

/// One op of a proposal. `path` is the file the op changes (for `action`, the action's
/// name). For file ops, `lines_added`/`lines_removed` are the lines the sandbox diff shows
/// (for a new file, all its lines are added).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpView {
    pub kind: Option<OpKind>,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The new value of a `set_config`, as text (`8080`, `on`, `"a string"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines_added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines_removed: Vec<String>,
}

impl OpView {
    pub fn set_config(file: &str, key: &str, value: &str) -> OpView {
        OpView {
            kind: Some(OpKind::SetConfig),
            path: file.into(),
            key: Some(key.into()),
            value: Some(value.into()),
            ..OpView::default()
        }
    }

    pub fn patch_file(path: &str, lines_added: &[&str], lines_removed: &[&str]) -> OpView {
        OpView {
            kind: Some(OpKind::PatchFile),
            path: path.into(),
            lines_added: lines_added.iter().map(|line| line.to_string()).collect(),
            lines_removed: lines_removed.iter().map(|line| line.to_string()).collect(),
            ..OpView::default()
        }
    }

    pub fn put_file(path: &str, lines: &[&str]) -> OpView {
        OpView {
            kind: Some(OpKind::PutFile),
            path: path.into(),
            lines_added: lines.iter().map(|line| line.to_string()).collect(),
            ..OpView::default()
        }
    }
}

/// The base values of a config file the proposal touches (its keys before the change).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileView {
    pub path: String,
    pub keys: Vec<(String, String)>,
}

/// What the sandbox diff says about the proposal (zero when it was not sandboxed yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffSummary {
    pub files_changed: u64,
    pub keys_changed: u64,
    pub bytes_added: u64,
    pub bytes_removed: u64,
}

/// How the replica's resources moved over the frames before the proposal's base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceTrend {
    /// CPU use at the base minus its mean over the frames before (percent of one core).
    pub cpu_percent_change: f32,
    /// ln(RSS at the base / mean RSS over the frames before).
    pub rss_log_ratio: f32,
}

/// A proposal as the predictor sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProposalView {
    /// When the proposal was made (nanoseconds since the epoch); only outcomes that
    /// arrived strictly before it are history for it.
    pub time_ns: u64,
    pub ops: Vec<OpView>,
    #[serde(default)]
    pub base_files: Vec<FileView>,
    #[serde(default)]
    pub diff: DiffSummary,
    /// Processes that depend on a touched entry (the file is in their command line or open
    /// by them), by name.
    #[serde(default)]
    pub dependents: Vec<String>,
    /// The replica's resource trend before the base (absent when too few frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trend: Option<ResourceTrend>,
}

/// What really happened to a proposal: the label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// When the outcome arrived (nanoseconds since the epoch).
    pub time_ns: u64,
    /// A failed check, a failed probe or a rollback.
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent_delta: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes_delta: Option<f64>,
}

/// A labelled example: a proposal and its outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub proposal: ProposalView,
    pub outcome: Outcome,
}
