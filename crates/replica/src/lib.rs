//! What a replica is, as every crate needs it: settings from flags and requests checked
//! into a definition, exclude globs, process selectors, and the config file formats whose
//! keys are part of the state (parsers are pure functions over bytes). Below capture,
//! sandbox and commit; no IO but reading a root's metadata when a replica is defined.

pub mod config;
pub mod exclude;
pub mod selector;
pub mod settings;

pub use settings::{ReplicaSettings, SettingsError, define_replica};
