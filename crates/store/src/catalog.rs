//! The catalog kept beside the objects: replicas, frames, timeline heads and the time
//! index that maps (replica, timeline, time) to frames.

use std::ops::Bound;

use kairos_core::spec::{FRAME_ID_PREFIX_LEN_MIN, MAIN_TIMELINE};
use kairos_core::{FrameSpec, Hash, Instant, ReplicaDefinition, TimelineSpec};
use serde::{Deserialize, Serialize};

use crate::command::{Change, Command, FrameFields, SYSTEM_PARTY};
use crate::keys;
use crate::kv::{KvError, printable};
use crate::store::{Reader, Result, Store, StoreError, WriteStats};

/// Domain byte of frame ids.
const FRAME_DOMAIN: u8 = 0x46;
/// Frames listed by an ambiguous prefix error.
const AMBIGUOUS_SHOWN_MAX: usize = 5;

/// One stored frame: a captured state at an instant on a timeline, with its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameRecord {
    pub id: Hash,
    pub replica: String,
    pub timeline: String,
    pub time: Instant,
    pub parent: Option<Hash>,
    /// The state root object.
    pub root: Hash,
    /// Entries in the state's file tree.
    pub entries: u64,
    /// Bytes of regular files in the state.
    pub bytes: u64,
    /// Objects this frame added to the store, and their size as stored.
    pub objects_new: u64,
    pub bytes_new_stored: u64,
    /// Files that kept changing while read, and entries that could not be read.
    pub torn: u64,
    pub unreadable: u64,
    pub capture_ms: u64,
}

impl FrameRecord {
    /// The id a frame with these fields must have.
    pub fn compute_id(&self) -> Hash {
        let mut bytes = Vec::with_capacity(160);
        bytes.extend_from_slice(self.replica.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(self.timeline.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&self.time.to_sortable_bytes());
        bytes.extend_from_slice(self.parent.unwrap_or_default().as_bytes());
        bytes.extend_from_slice(self.root.as_bytes());
        Hash::of(FRAME_DOMAIN, &bytes)
    }
}

/// What a capture hands over to become a frame.
#[derive(Debug, Clone)]
pub struct FrameDraft {
    pub replica: String,
    pub timeline: String,
    pub time: Instant,
    /// The head the capture started from; the commit fails if the head moved.
    pub parent: Option<Hash>,
    pub root: Hash,
    pub entries: u64,
    pub bytes: u64,
    pub stats: WriteStats,
    pub torn: u64,
    pub unreadable: u64,
    pub capture_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("unknown replica {0:?} (see `kairos replica list`)")]
    UnknownReplica(String),
    #[error("replica {0:?} already exists")]
    ReplicaExists(String),
    #[error("replica {replica:?} has no frames on timeline {timeline:?} yet")]
    NoFrames { replica: String, timeline: String },
    #[error(
        "replica {replica:?}: no frame at or before {at} on timeline {timeline:?} (the first is at {first})"
    )]
    NothingBefore {
        replica: String,
        timeline: String,
        at: Instant,
        first: Instant,
    },
    #[error("replica {replica:?}: no frame id starts with {prefix:?}")]
    NoSuchFrame { replica: String, prefix: String },
    #[error(
        "replica {replica:?}: frame id prefix {prefix:?} matches {count} frames ({shown}); give more digits"
    )]
    Ambiguous {
        replica: String,
        prefix: String,
        count: usize,
        shown: String,
    },
    #[error(
        "replica {replica:?} timeline {timeline:?}: the head moved while capturing; capture again"
    )]
    HeadMoved { replica: String, timeline: String },
    #[error("replica {replica:?}: timeline {timeline:?} already exists")]
    TimelineExists { replica: String, timeline: String },
    #[error("replica {replica:?}: no timeline {timeline:?} (see `kairos timeline list {replica}`)")]
    UnknownTimeline { replica: String, timeline: String },
    #[error(
        "replica {replica:?}: timeline {timeline:?} follows the live replica and cannot be forked onto or deleted"
    )]
    MainTimeline { replica: String, timeline: String },
    #[error(
        "replica {replica:?} is busy: {kind} {commit} is in progress ({status}); wait for it to finish"
    )]
    Busy {
        /// `commit` or `revert`.
        kind: String,
        replica: String,
        commit: String,
        status: String,
    },
    #[error("replica {replica:?}: commit {commit} is not the commit in progress")]
    NotPending { replica: String, commit: String },
    #[error(
        "replica {replica:?}: the catalog key {key} kept changing under the command; try again"
    )]
    Contended { replica: String, key: String },
    #[error("replica {replica:?}: no proposal {proposal} (see `kairos proposals {replica}`)")]
    UnknownProposal { replica: String, proposal: String },
    #[error(
        "replica {replica:?}: proposal {proposal} is already committed (commit {commit}); a review no longer changes anything"
    )]
    ProposalCommitted {
        replica: String,
        proposal: String,
        commit: String,
    },
    #[error(
        "replica {replica:?}: proposal {proposal} was reviewed while the commit was checked against its policy; commit again"
    )]
    ReviewsChanged { replica: String, proposal: String },
    #[error("party {0:?} already exists")]
    PartyExists(String),
    #[error("no party {0:?} (see `kairos party list`)")]
    UnknownParty(String),
    #[error(
        "catalog command version {version} is not supported (this build applies version {supported})"
    )]
    Version { version: u16, supported: u16 },
    #[error("catalog command: {0}")]
    Invalid(String),
    /// A request sent again (its first answer was lost with the leader) that the log had
    /// applied already, and whose first outcome this member no longer holds.
    #[error(
        "this request was applied already (log entry {index}, request {position}); what it did is in the catalog, but its answer is no longer held: read the catalog to see it"
    )]
    AlreadyApplied { index: u64, position: u32 },
    /// The cluster cannot take the command now (no leader, no quorum, a peer unreachable).
    #[error("the cluster cannot take the command now: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<KvError> for CatalogError {
    fn from(error: KvError) -> CatalogError {
        CatalogError::Store(error.into())
    }
}

fn bad_record(what: &'static str, key: &[u8], problem: impl ToString) -> StoreError {
    StoreError::BadRecord {
        what,
        key: printable(key),
        problem: problem.to_string(),
    }
}

impl Store {
    /// Registers a replica (refused if one of that name exists).
    pub fn add_replica(&self, replica: &ReplicaDefinition) -> Result<(), CatalogError> {
        self.register_replica(replica, false)
    }

    /// Stores `replica`, replacing a definition of the same name (configuration wins).
    pub fn put_replica(&self, replica: &ReplicaDefinition) -> Result<(), CatalogError> {
        self.register_replica(replica, true)
    }

    fn register_replica(
        &self,
        replica: &ReplicaDefinition,
        replace: bool,
    ) -> Result<(), CatalogError> {
        self.submit(&Command::new(
            Instant::now(),
            &replica.name,
            MAIN_TIMELINE,
            SYSTEM_PARTY,
            Change::RegisterReplica {
                definition: replica.clone(),
                replace,
            },
        ))?;
        Ok(())
    }

    pub fn replica(&self, name: &str) -> Result<ReplicaDefinition, CatalogError> {
        let reader = self.reader()?;
        let key = keys::replica(name);
        match reader.get(&key)? {
            Some(value) => Ok(parse_replica(&key, &value)?),
            None => Err(CatalogError::UnknownReplica(name.to_string())),
        }
    }

    pub fn replicas(&self) -> Result<Vec<ReplicaDefinition>> {
        let reader = self.reader()?;
        reader
            .scan_prefix(keys::REPLICA)?
            .iter()
            .map(|(key, value)| parse_replica(key, value))
            .collect()
    }

    /// Stores a frame and moves the timeline head to it, atomically and durably (an
    /// `AppendFrame` command).
    pub fn commit_frame(&self, draft: FrameDraft) -> Result<FrameRecord, CatalogError> {
        self.commit_frame_guarded(draft, None)
    }

    /// [`Store::commit_frame`] refused when the proposal state a commit's policy was
    /// decided on changed since (a fork's commit).
    pub fn commit_frame_guarded(
        &self,
        draft: FrameDraft,
        reviews_seen: Option<crate::review::ReviewGuard>,
    ) -> Result<FrameRecord, CatalogError> {
        let command = Command::new(
            draft.time,
            &draft.replica,
            &draft.timeline,
            SYSTEM_PARTY,
            Change::AppendFrame {
                frame: FrameFields {
                    time: draft.time,
                    parent: draft.parent,
                    root: draft.root,
                    entries: draft.entries,
                    bytes: draft.bytes,
                    objects_new: draft.stats.objects_new,
                    bytes_new_stored: draft.stats.bytes_stored,
                    torn: draft.torn,
                    unreadable: draft.unreadable,
                    capture_ms: draft.capture_ms,
                },
            },
        )
        .with_reviews_seen(reviews_seen);
        self.submit(&command)?
            .frame
            .ok_or_else(|| CatalogError::Invalid("an appended frame was not returned".into()))
    }

    pub fn frame(&self, id: &Hash) -> Result<FrameRecord> {
        reader_frame(&self.reader()?, id)
    }

    /// The frame `id` names, or `None` when it is not stored (a forget removed it); a
    /// stored record that does not parse is an error.
    pub fn frame_if_stored(&self, id: &Hash) -> Result<Option<FrameRecord>> {
        let key = keys::frame(id);
        match self.reader()?.get(&key)? {
            Some(value) => Ok(Some(parse_frame(&key, &value)?)),
            None => Ok(None),
        }
    }

    /// The frame before `frame` along its history: its parent, or, when a forget removed
    /// the parent, the newest frame its timeline still lists before it. `None` at the
    /// start of the history.
    pub fn previous_frame(&self, frame: &FrameRecord) -> Result<Option<FrameRecord>> {
        let Some(parent) = frame.parent else {
            return Ok(None);
        };
        if let Some(record) = self.frame_if_stored(&parent)? {
            return Ok(Some(record));
        }
        let before = Instant(frame.time.0.saturating_sub(1));
        Ok(self
            .frames_before(&frame.replica, &frame.timeline, before, 1)?
            .pop())
    }

    /// The head of a timeline, if it has frames.
    pub fn head(&self, replica: &str, timeline: &str) -> Result<Option<FrameRecord>> {
        let reader = self.reader()?;
        let key = keys::head(replica, timeline);
        match reader.get(&key)? {
            None => Ok(None),
            Some(value) => {
                let id = Hash::from_slice(&value)
                    .ok_or_else(|| bad_record("timeline head", &key, "not a frame id"))?;
                Ok(Some(reader_frame(&reader, &id)?))
            }
        }
    }

    /// Every frame of a timeline, oldest first.
    pub fn history(&self, replica: &str, timeline: &str) -> Result<Vec<FrameRecord>> {
        let reader = self.reader()?;
        reader
            .scan_prefix(&keys::time_prefix(replica, timeline))?
            .iter()
            .map(|(key, _)| {
                let id = keys::id_of_time_key(key)
                    .ok_or_else(|| bad_record("time index entry", key, "has no frame id"))?;
                reader_frame(&reader, &id)
            })
            .collect()
    }

    /// Timelines of a replica that have a head.
    /// Up to `limit` frames of a timeline at or before `at`, newest first (one bounded
    /// scan of the time index).
    pub fn frames_before(
        &self,
        replica: &str,
        timeline: &str,
        at: Instant,
        limit: usize,
    ) -> Result<Vec<FrameRecord>> {
        let reader = self.reader()?;
        let prefix = keys::time_prefix(replica, timeline);
        let upper = keys::time_upper(replica, timeline, at);
        reader
            .snapshot()
            .scan(
                Bound::Included(prefix.as_slice()),
                Bound::Included(upper.as_slice()),
                limit,
                true,
            )?
            .iter()
            .map(|(key, _)| {
                let id = keys::id_of_time_key(key)
                    .ok_or_else(|| bad_record("time index entry", key, "has no frame id"))?;
                reader_frame(&reader, &id)
            })
            .collect()
    }

    pub fn timelines(&self, replica: &str) -> Result<Vec<String>> {
        let reader = self.reader()?;
        let prefix = keys::head_prefix(replica);
        Ok(reader
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(key, _)| String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            .collect())
    }

    /// The frame a spec names: one index lookup (or one prefix scan for ids).
    pub fn resolve(
        &self,
        replica: &str,
        spec: &TimelineSpec,
        now: Instant,
    ) -> Result<FrameRecord, CatalogError> {
        let reader = self.reader()?;
        let timeline = spec.timeline.as_str();
        let at = match &spec.frame {
            FrameSpec::IdPrefix(prefix) => return resolve_prefix(&reader, replica, prefix),
            FrameSpec::Latest => Instant(i64::MAX),
            FrameSpec::At(at) => *at,
            FrameSpec::Ago(age) => now.saturating_sub(*age),
        };
        let prefix = keys::time_prefix(replica, timeline);
        let upper = keys::time_upper(replica, timeline, at);
        let found = reader.snapshot().scan(
            Bound::Included(prefix.as_slice()),
            Bound::Included(upper.as_slice()),
            1,
            true,
        )?;
        if let Some((key, _)) = found.first() {
            let id = keys::id_of_time_key(key)
                .ok_or_else(|| bad_record("time index entry", key, "has no frame id"))?;
            return Ok(reader_frame(&reader, &id)?);
        }
        let first = reader.snapshot().scan(
            Bound::Included(prefix.as_slice()),
            Bound::Unbounded,
            1,
            false,
        )?;
        match first.first() {
            Some((key, _)) if key.starts_with(&prefix) => {
                let id = keys::id_of_time_key(key)
                    .ok_or_else(|| bad_record("time index entry", key, "has no frame id"))?;
                Err(CatalogError::NothingBefore {
                    replica: replica.to_string(),
                    timeline: timeline.to_string(),
                    at,
                    first: reader_frame(&reader, &id)?.time,
                })
            }
            _ => {
                if reader.get(&keys::replica(replica))?.is_none() {
                    return Err(CatalogError::UnknownReplica(replica.to_string()));
                }
                Err(CatalogError::NoFrames {
                    replica: replica.to_string(),
                    timeline: timeline.to_string(),
                })
            }
        }
    }

    /// Every frame id in the store, with its record.
    pub fn all_frames(&self) -> Result<Vec<FrameRecord>> {
        let reader = self.reader()?;
        reader
            .scan_prefix(keys::FRAME)?
            .iter()
            .map(|(key, value)| parse_frame(key, value))
            .collect()
    }
}

fn resolve_prefix(
    reader: &Reader<'_>,
    replica: &str,
    prefix: &str,
) -> Result<FrameRecord, CatalogError> {
    debug_assert!(prefix.len() >= FRAME_ID_PREFIX_LEN_MIN);
    let whole_bytes: Vec<u8> = prefix
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).unwrap_or("00");
            u8::from_str_radix(text, 16).unwrap_or(0)
        })
        .collect();
    let scan_key = [keys::FRAME, whole_bytes.as_slice()].concat();
    let matches: Vec<FrameRecord> = reader
        .scan_prefix(&scan_key)?
        .iter()
        .map(|(key, value)| parse_frame(key, value))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|frame| frame.replica == replica && frame.id.to_hex().starts_with(prefix))
        .collect();
    match matches.len() {
        0 => {
            if reader.get(&keys::replica(replica))?.is_none() {
                return Err(CatalogError::UnknownReplica(replica.to_string()));
            }
            Err(CatalogError::NoSuchFrame {
                replica: replica.to_string(),
                prefix: prefix.to_string(),
            })
        }
        1 => Ok(matches.into_iter().next().expect("one match")),
        count => Err(CatalogError::Ambiguous {
            replica: replica.to_string(),
            prefix: prefix.to_string(),
            count,
            shown: matches
                .iter()
                .take(AMBIGUOUS_SHOWN_MAX)
                .map(|frame| frame.id.short())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn reader_frame(reader: &Reader<'_>, id: &Hash) -> Result<FrameRecord> {
    let key = keys::frame(id);
    match reader.get(&key)? {
        Some(value) => parse_frame(&key, &value),
        None => Err(bad_record("frame", &key, "is referenced but missing")),
    }
}

pub(crate) fn parse_frame(key: &[u8], value: &[u8]) -> Result<FrameRecord> {
    let record: FrameRecord =
        serde_json::from_slice(value).map_err(|error| bad_record("frame", key, error))?;
    if keys::frame(&record.id) != key {
        return Err(bad_record("frame", key, "is stored under another id"));
    }
    if record.compute_id() != record.id {
        return Err(bad_record("frame", key, "content does not match its id"));
    }
    Ok(record)
}

fn parse_replica(key: &[u8], value: &[u8]) -> Result<ReplicaDefinition> {
    serde_json::from_slice(value).map_err(|error| bad_record("replica", key, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(store: &Store, time: i64) -> FrameDraft {
        let parent = store.head("web", "main").unwrap().map(|frame| frame.id);
        FrameDraft {
            replica: "web".into(),
            timeline: "main".into(),
            time: Instant(time),
            parent,
            root: Hash([time as u8; 32]),
            entries: 0,
            bytes: 0,
            stats: WriteStats::default(),
            torn: 0,
            unreadable: 0,
            capture_ms: 0,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        (dir, store)
    }

    #[test]
    fn resolves_instants_ids_and_latest() {
        let (_dir, store) = store();
        let frames: Vec<FrameRecord> = [100, 200, 300]
            .iter()
            .map(|&t| store.commit_frame(draft(&store, t)).unwrap())
            .collect();
        let spec = |text: &str| TimelineSpec::parse(text).unwrap();
        let now = Instant(1_000);
        assert_eq!(
            store.resolve("web", &spec("latest"), now).unwrap(),
            frames[2]
        );
        let at_250 = TimelineSpec {
            timeline: "main".into(),
            frame: FrameSpec::At(Instant(250)),
        };
        assert_eq!(store.resolve("web", &at_250, now).unwrap(), frames[1]);
        let at_200 = TimelineSpec {
            timeline: "main".into(),
            frame: FrameSpec::At(Instant(200)),
        };
        assert_eq!(store.resolve("web", &at_200, now).unwrap(), frames[1]);
        let before = TimelineSpec {
            timeline: "main".into(),
            frame: FrameSpec::At(Instant(50)),
        };
        assert!(matches!(
            store.resolve("web", &before, now),
            Err(CatalogError::NothingBefore { .. })
        ));
        let by_id = spec(&frames[0].id.to_hex()[..10]);
        assert_eq!(store.resolve("web", &by_id, now).unwrap(), frames[0]);
        assert_eq!(store.history("web", "main").unwrap(), frames);
        assert!(matches!(
            store.resolve("db", &spec("latest"), now),
            Err(CatalogError::UnknownReplica(_))
        ));
    }

    #[test]
    fn stale_parent_is_refused_and_times_increase() {
        let (_dir, store) = store();
        let first = draft(&store, 500);
        let second = draft(&store, 400);
        let committed = store.commit_frame(first).unwrap();
        assert!(matches!(
            store.commit_frame(second),
            Err(CatalogError::HeadMoved { .. })
        ));
        let earlier_clock = store.commit_frame(draft(&store, 400)).unwrap();
        assert_eq!(earlier_clock.parent, Some(committed.id));
        assert!(earlier_clock.time > committed.time);
    }
}
