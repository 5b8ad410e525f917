//! The key layout of the store, in one place. Names never contain NUL (they are validated),
//! so NUL separates the parts of a key.

use kairos_core::{Hash, Instant};

pub const OBJECT: &[u8] = b"o/";
pub const SEGMENT: &[u8] = b"s/";
pub const FRAME: &[u8] = b"f/";
pub const REPLICA: &[u8] = b"r/";
pub const TIME: &[u8] = b"t/";
pub const HEAD: &[u8] = b"h/";
pub const DICTIONARY: &[u8] = b"d/";
pub const DICTIONARY_VERSION: &[u8] = b"v/";

pub fn object(hash: &Hash) -> Vec<u8> {
    [OBJECT, hash.as_bytes()].concat()
}

pub fn segment(id: &[u8]) -> Vec<u8> {
    [SEGMENT, id].concat()
}

pub fn frame(id: &Hash) -> Vec<u8> {
    [FRAME, id.as_bytes()].concat()
}

pub fn replica(name: &str) -> Vec<u8> {
    [REPLICA, name.as_bytes()].concat()
}

/// Prefix of the time index of one timeline.
pub fn time_prefix(replica: &str, timeline: &str) -> Vec<u8> {
    [TIME, replica.as_bytes(), b"\0", timeline.as_bytes(), b"\0"].concat()
}

pub fn time(replica: &str, timeline: &str, at: Instant, id: &Hash) -> Vec<u8> {
    [
        time_prefix(replica, timeline).as_slice(),
        &at.to_sortable_bytes(),
        id.as_bytes(),
    ]
    .concat()
}

/// The largest possible time key at `at`, for "the last frame at or before".
pub fn time_upper(replica: &str, timeline: &str, at: Instant) -> Vec<u8> {
    [
        time_prefix(replica, timeline).as_slice(),
        &at.to_sortable_bytes(),
        &[0xff; 32],
    ]
    .concat()
}

/// The frame id at the end of a time key.
pub fn id_of_time_key(key: &[u8]) -> Option<Hash> {
    key.len()
        .checked_sub(32)
        .and_then(|start| Hash::from_slice(&key[start..]))
}

pub fn head(replica: &str, timeline: &str) -> Vec<u8> {
    [HEAD, replica.as_bytes(), b"\0", timeline.as_bytes()].concat()
}

pub fn head_prefix(replica: &str) -> Vec<u8> {
    [HEAD, replica.as_bytes(), b"\0"].concat()
}

pub fn dictionary(id: u64) -> Vec<u8> {
    [DICTIONARY, &id.to_be_bytes()[..]].concat()
}

pub fn dictionary_version_prefix(replica: &str) -> Vec<u8> {
    [DICTIONARY_VERSION, replica.as_bytes(), b"\0"].concat()
}

pub fn dictionary_version(replica: &str, version: u32) -> Vec<u8> {
    [
        dictionary_version_prefix(replica).as_slice(),
        &version.to_be_bytes(),
    ]
    .concat()
}

pub const FORK: &[u8] = b"k/";
pub const PROPOSAL: &[u8] = b"p/";
pub const SANDBOX: &[u8] = b"x/";
pub const COMMIT: &[u8] = b"c/";
pub const AUDIT: &[u8] = b"a/";
pub const AUDIT_HEAD: &[u8] = b"A/";
pub const GOOD: &[u8] = b"g/";
pub const PENDING: &[u8] = b"P/";
/// Predictions and outcomes of proposals (the predictor's scored record and examples).
pub const PREDICTION: &[u8] = b"q/";
pub const OUTCOME: &[u8] = b"u/";
/// A proposal's collaboration record (reviews, interference, last check) and the marker
/// of a proposal committed once (`review.rs`).
pub const PROPOSAL_STATE: &[u8] = b"w/";
pub const PROPOSAL_COMMITTED: &[u8] = b"W/";
/// The runtime series of each replica (`series.rs`): `n/<replica>\0<tier><bucket start>`.
/// Not catalog keys: observations beside the frames, not history.
pub const SERIES: &[u8] = b"n/";

/// `prefix` + replica + NUL: the keys of one replica in a record family.
pub fn replica_prefix(prefix: &[u8], replica: &str) -> Vec<u8> {
    [prefix, replica.as_bytes(), b"\0"].concat()
}

/// A record of a replica named by `name` (a timeline name, an id).
pub fn replica_record(prefix: &[u8], replica: &str, name: &[u8]) -> Vec<u8> {
    [replica_prefix(prefix, replica).as_slice(), name].concat()
}

/// Predictor models (`models.rs`): `m/<replica>\0<version u32 BE>` holds a model's record,
/// `M/<replica>\0<version u32 BE><part u32 BE>` the parts of its file.
pub const MODEL: &[u8] = b"m/";
pub const MODEL_PART: &[u8] = b"M/";

pub fn model(replica: &str, version: u32) -> Vec<u8> {
    replica_record(MODEL, replica, &version.to_be_bytes())
}

pub fn model_part(replica: &str, version: u32, part: u32) -> Vec<u8> {
    [
        replica_prefix(MODEL_PART, replica).as_slice(),
        &version.to_be_bytes(),
        &part.to_be_bytes(),
    ]
    .concat()
}

pub fn audit(replica: &str, seq: u64) -> Vec<u8> {
    replica_record(AUDIT, replica, &seq.to_be_bytes())
}

/// This store's position in the cluster's replicated log (`R/applied`, `R/membership`,
/// `R/installing`): local to each member, never replicated.
pub const RAFT: &[u8] = b"R/";
/// Where each replica's watcher runs in a cluster: `L/<replica>` holds the node id.
pub const PLACEMENT: &[u8] = b"L/";

pub fn placement(replica: &str) -> Vec<u8> {
    [PLACEMENT, replica.as_bytes()].concat()
}

/// Requests the cluster's log applied, by the id their member gave them (`i/<id>` holds
/// the entry's index and the request's position in it): a request a member sends again
/// (its leader died before answering) is not applied twice. Replicated, and pruned by
/// every member alike as the log moves on (`I/<index><position>` lists them in order).
pub const REQUEST: &[u8] = b"i/";
pub const REQUEST_ORDER: &[u8] = b"I/";

pub fn request(id: &str) -> Vec<u8> {
    [REQUEST, id.as_bytes()].concat()
}

pub fn request_order(index: u64, position: u32) -> Vec<u8> {
    [REQUEST_ORDER, &index.to_be_bytes(), &position.to_be_bytes()].concat()
}

/// Whether the cluster's log replicates `key`: every catalog key but this node's
/// dictionaries (each node encodes its objects itself), predictor models (each node
/// learns from the replicated outcomes) and its own log position.
pub fn is_replicated(key: &[u8]) -> bool {
    crate::catalog_copy::is_catalog_key(key)
        && ![DICTIONARY, DICTIONARY_VERSION, MODEL, MODEL_PART, RAFT]
            .iter()
            .any(|prefix| key.starts_with(prefix))
}

pub const PARTY: &[u8] = b"y/";
pub const PARTY_TOKEN: &[u8] = b"Y/";

pub fn party(name: &str) -> Vec<u8> {
    [PARTY, name.as_bytes()].concat()
}

pub fn party_token(hash: &Hash) -> Vec<u8> {
    [PARTY_TOKEN, hash.as_bytes()].concat()
}
