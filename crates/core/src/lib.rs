//! Kairos core vocabulary shared by every crate: content hashes, instants, frame specs,
//! replica definitions, limits and the store backend a
//! configuration names. Plain data and pure functions only: no IO.

pub mod event;
pub mod hash;
pub mod instant;
pub mod limits;
pub mod party;
pub mod probe;
pub mod replica;
pub mod retention;
pub mod review;
pub mod spec;
pub mod status;
pub mod store_backend;

pub use hash::{Hash, HashParseError};
pub use instant::{Instant, InstantError};
pub use limits::Limits;
pub use party::{PartyRecord, Role};
pub use probe::Probe;
pub use replica::{ReplicaDefinition, ReplicaError};
pub use retention::{KeepRule, RetentionError, RetentionPolicy};
pub use review::{ReviewPolicy, Verdict};
pub use spec::{FrameSpec, SpecError, TimelineSpec};
pub use status::CommitStatus;
pub use store_backend::{FdbLocation, StoreBackend};
