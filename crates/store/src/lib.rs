//! Kairos store: a content-addressed, compressed, deduplicated store of service states on
//! an ordered key-value backend (redb embedded by default). Knows nothing about actors,
//! NATS or Raft.
//!
//! - [`kv`]: the backend interface (FoundationDB's limits) and [`conformance`] suite;
//! - [`object`]: object kinds and the zstd codec, validated on every read;
//! - [`node`]: the rkyv node types of a state's Merkle tree;
//! - [`tree`]: building and reading directories and chunk lists;
//! - [`catalog`]: replicas, frames, timeline heads and the time index;
//! - [`changes`]: forks, proposals, sandboxes, commits and the hash-chained audit log;
//! - [`verify`]: a full check of everything stored, the file's own structure included;
//! - [`catalog_copy`]: the checksummed copy of the catalog kept beside the store file;
//! - [`repair`]: rebuilding a damaged store from what still verifies and the catalog copy;
//! - [`guard`]: redb's panics on damaged pages caught and turned into `corrupt` errors.

pub mod catalog;
pub mod catalog_copy;
pub mod changes;
pub mod conformance;
pub mod guard;
pub mod keys;
pub mod kv;
pub mod node;
pub mod object;
pub mod pack;
pub mod redb_backend;
pub mod redb_check;
pub mod repair;
pub mod store;
pub mod tree;
pub mod verify;

pub use catalog::{CatalogError, FrameDraft, FrameRecord};
pub use changes::{AuditEntry, AuditLog, ForkRecord, TimelineError, TimelineInfo};
pub use object::ObjectKind;
pub use store::{ObjectWriter, Overlay, Reader, Store, StoreError, WriteStats};
pub use verify::VerifyReport;
