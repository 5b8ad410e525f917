//! Kairos nodes as one cluster. The catalog is the state machine of an openraft log: every
//! catalog command (`kairos_store::Command`) is an entry of the log, applied in order on
//! every member by the same pure function that applies it on a single node
//! (`kairos_store::command::apply`). The log and vote live in `raft/log.redb` in the
//! node's data directory; the state machine is the store itself, and its applied position
//! is written in the same batch as each entry's change. Objects stay outside the log:
//! content-addressed, written where they are captured and fetched from peers by hash.
//!
//! A single node is a cluster of one: the same log, the same state machine, no peers.

// openraft's storage traits return its `StorageError` (large, with a backtrace); the
// helpers here return what the traits do.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod objects;
pub mod state_machine;

use std::io::Cursor;

use kairos_store::Command;
use serde::{Deserialize, Serialize};

pub use log_store::LogStore;
pub use network::{Network, PeerClient};
pub use state_machine::{Outcomes, StateMachine};

/// A member's id (`[cluster] node_id`).
pub type NodeId = u64;
/// A member's address: its API's base URL (`[cluster] advertise`).
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The types of Kairos's replicated log.
    pub TypeConfig:
        D = Request,
        R = Response,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type SnapshotData = Cursor<Vec<u8>>;

/// An entry of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// A catalog command, applied as on a single node.
    Command(Box<Command>),
    /// Where a replica's watcher and snapshotter run (`None`: nowhere yet).
    Place {
        replica: String,
        node: Option<NodeId>,
        /// Why it moved (recorded with the placement).
        reason: String,
        time: kairos_core::Instant,
    },
    /// Requests that arrived together on the leader, one entry for all of them: applied
    /// in order, each as if it were an entry of its own (its outcome is kept by the
    /// entry's index and its position here). openraft 0.9 syncs its log once per client
    /// write; a batch makes a burst of commands cost one sync instead of one each.
    Batch { requests: Vec<Request> },
    /// A request its member may send more than once (a forward retried after the leader
    /// died between appending it and answering): applied the first time its `id` is seen,
    /// and answered with that first outcome after. Ids are kept for the last
    /// [`REQUESTS_REMEMBERED`] entries of the log.
    Once { id: String, request: Box<Request> },
}

/// How many entries back the log remembers the ids of the requests it applied. A member
/// sends a request again within its submit timeout, while a new leader is elected: few
/// entries are appended meanwhile.
pub const REQUESTS_REMEMBERED: u64 = 4096;

impl Request {
    /// The requests an entry carries, in order (one unless it is a batch; a batch inside a
    /// batch is not made, and is applied flat if a peer sent one).
    pub fn parts(&self) -> Vec<&Request> {
        match self {
            Request::Batch { requests } => requests.iter().flat_map(Request::parts).collect(),
            single => vec![single],
        }
    }
}

/// What applying an entry answered: the command's refusal, if the catalog refused it.
/// The full outcome stays on each member (see [`Outcomes`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A replica's placement as the catalog records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node: Option<NodeId>,
    pub reason: String,
    pub time: kairos_core::Instant,
}

/// The placements recorded in `store`, by replica.
pub fn placements(
    store: &kairos_store::Store,
) -> Result<std::collections::BTreeMap<String, Placement>, kairos_store::StoreError> {
    let mut out = std::collections::BTreeMap::new();
    let reader = store.reader()?;
    for (key, value) in reader.scan_prefix(kairos_store::keys::PLACEMENT)? {
        let replica = String::from_utf8_lossy(&key[kairos_store::keys::PLACEMENT.len()..]);
        if let Ok(placement) = serde_json::from_slice::<Placement>(&value) {
            out.insert(replica.into_owned(), placement);
        }
    }
    Ok(out)
}

fn io_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    error: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(error.to_string()))
        .into()
}
