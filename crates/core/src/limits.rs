//! Explicit limits: every size the store, capture and replay accept is bounded here.

use serde::{Deserialize, Serialize};

/// Limits that capture and replay enforce. Defaults suit a service data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A file larger than this is recorded with its metadata but without content.
    pub file_bytes_max: u64,
    /// Entries (files, directories, links) in one state.
    pub state_entries_max: u64,
    /// Files parsed into config keys are at most this large.
    pub config_file_bytes_max: u64,
    /// Keys kept from one config file.
    pub config_keys_max: usize,
    /// Times a file that changes while it is read is read again before it is recorded torn.
    pub torn_file_retries: u32,
    /// Symlink hops followed when resolving a path inside a state.
    pub symlink_hops_max: u32,
    /// Bytes of a proposal document (with its file contents).
    pub proposal_bytes_max: u64,
    /// Ops in one proposal.
    pub proposal_ops_max: usize,
    /// Bytes of a check's or probe's output kept (the rest is cut, and says so).
    pub command_output_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            file_bytes_max: 16 << 30,
            state_entries_max: 2_000_000,
            config_file_bytes_max: 1 << 20,
            config_keys_max: 20_000,
            torn_file_retries: 3,
            symlink_hops_max: 40,
            proposal_bytes_max: 64 << 20,
            proposal_ops_max: 10_000,
            command_output_bytes_max: 64 << 10,
        }
    }
}
