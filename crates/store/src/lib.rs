//! Kairos store: a content-addressed, compressed, deduplicated store of service states on
//! an ordered key-value backend (redb embedded by default). Knows nothing about actors,
//! NATS or Raft.
//!
//! - [`kv`]: the backend interface (FoundationDB's limits) and [`conformance`] suite;
//! - [`redb_backend`]: the embedded backend; `fdb_backend` (`--features foundationdb`):
//!   FoundationDB, with [`fdb_layout`] (its subspaces and size estimate);
//! - [`object`]: object kinds and the zstd codec, validated on every read;
//! - [`node`]: the rkyv node types of a state's Merkle tree;
//! - [`tree`]: building and reading directories and chunk lists;
//! - [`catalog`]: replicas, frames, timeline heads and the time index;
//! - [`command`]: the one write path of the catalog: typed commands, applied as guarded batches;
//! - [`audit`]: typed audit events, hash-chained;
//! - [`changes`]: forks, proposal, sandbox and commit records, last good and pending commits;
//! - [`review`]: each proposal's reviews, interference and last check, and the commit guard;
//! - [`retention`]: what a retention policy forgets, and what is never forgotten;
//! - [`series`]: the runtime metrics sampled on every capture, downsampled with age;
//! - [`models`]: the predictor's model files of each replica, versioned;
//! - [`gc`]: garbage collection while captures go on, and the store's figures;
//! - [`forget`]: removing frame records (the primitive retention builds on);
//! - [`verify`]: a full check of everything stored, the file's own structure included;
//! - [`packfile`]: the embedded backend's segments in append-only pack files beside the store;
//! - [`catalog_copy`]: the checksummed copy of the catalog kept beside the store file;
//! - [`repair`]: rebuilding a damaged store from what still verifies and the catalog copy;
//! - [`guard`]: redb's panics on damaged pages caught and turned into `corrupt` errors.

pub mod audit;
pub mod catalog;
pub mod catalog_copy;
pub mod changes;
pub mod command;
pub mod conformance;
#[cfg(feature = "foundationdb")]
pub mod fdb_backend;
pub mod fdb_layout;
pub mod feed;
pub mod forget;
pub mod gc;
pub mod guard;
pub mod keys;
pub mod kv;
pub mod models;
pub mod node;
pub mod object;
pub mod pack;
pub mod packfile;
pub mod redb_backend;
pub mod redb_check;
pub mod repair;
pub mod retention;
pub mod review;
pub mod series;
pub mod store;
pub mod tree;
pub mod verify;

pub use audit::{AuditEntry, AuditEvent, AuditLog};
pub use catalog::{CatalogError, FrameDraft, FrameRecord};
pub use changes::{ForkRecord, TimelineInfo};
pub use command::{Applied, Change, Command, RecordBody, RecordFamily, SYSTEM_PARTY};
pub use feed::{FeedBatch, FeedCursor, FeedEvent};
pub use gc::{GcError, GcOptions, GcReport, StoreFigures};
pub use object::ObjectKind;
pub use store::{
    CommandLog, ObjectSource, ObjectWriter, Overlay, Reader, Store, StoreError, WriteStats,
};
pub use verify::VerifyReport;
