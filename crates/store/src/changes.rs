//! The change records beside the catalog: forks of timelines, proposals, sandboxes,
//! commits, the last good frame of each replica, and the append-only, hash-chained audit
//! log. Records are JSON whose shape the callers own; the store keeps them, orders them
//! and guards them with optimistic checks.

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogError, FrameRecord};
use crate::keys;
use crate::kv::{KvError, WriteBatch, printable};
use crate::store::{Result, Store, StoreError};

/// Domain byte of audit entry hashes.
const AUDIT_DOMAIN: u8 = 0x41;
/// Attempts to append an audit entry when another writer appends at the same time.
const AUDIT_APPEND_ATTEMPTS: u32 = 16;

/// Where a fork timeline starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRecord {
    pub replica: String,
    pub timeline: String,
    /// The frame the fork starts from (on any timeline).
    pub base: Hash,
    pub created: Instant,
}

/// A timeline and its head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineInfo {
    pub name: String,
    pub head: FrameRecord,
    /// For forks: the frame the fork started from.
    pub fork: Option<ForkRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("replica {replica:?}: timeline {timeline:?} already exists")]
    Exists { replica: String, timeline: String },
    #[error("replica {replica:?}: no timeline {timeline:?} (see `kairos timeline list {replica}`)")]
    Unknown { replica: String, timeline: String },
    #[error(
        "replica {replica:?}: timeline {timeline:?} follows the live replica and cannot be forked onto or deleted"
    )]
    Main { replica: String, timeline: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl From<StoreError> for TimelineError {
    fn from(error: StoreError) -> TimelineError {
        TimelineError::Catalog(error.into())
    }
}

impl From<KvError> for TimelineError {
    fn from(error: KvError) -> TimelineError {
        TimelineError::Catalog(error.into())
    }
}

/// One entry of a replica's audit log. `hash` covers every other field, `prev` is the
/// previous entry's hash: changing or removing an entry breaks the chain after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub time: Instant,
    pub replica: String,
    /// The party that acted (`kairos` for the system itself, e.g. an automated rollback).
    pub party: String,
    /// proposal, sandbox, commit, probe, rollback, revert, recovery, timeline.
    pub event: String,
    pub details: serde_json::Value,
    pub prev: Hash,
    pub hash: Hash,
}

impl AuditEntry {
    pub fn compute_hash(&self) -> Hash {
        let mut unhashed = self.clone();
        unhashed.hash = Hash::default();
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        Hash::of(AUDIT_DOMAIN, &bytes)
    }
}

/// The audit log of a replica, with the result of checking its chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    /// Whether every entry's hash and link is intact.
    pub intact: bool,
    /// What is wrong with the chain, naming the first entry that does not match.
    pub problem: Option<String>,
}

fn bad_record(what: &'static str, key: &[u8], problem: impl ToString) -> StoreError {
    StoreError::BadRecord {
        what,
        key: printable(key),
        problem: problem.to_string(),
    }
}

impl Store {
    /// Makes timeline `name` start at `base`: a pointer (three small keys), never a copy.
    pub fn fork_timeline(
        &self,
        replica: &str,
        name: &str,
        base: &FrameRecord,
        now: Instant,
    ) -> Result<ForkRecord, TimelineError> {
        if name == MAIN_TIMELINE {
            return Err(TimelineError::Main {
                replica: replica.into(),
                timeline: name.into(),
            });
        }
        let head_key = keys::head(replica, name);
        let record = ForkRecord {
            replica: replica.to_string(),
            timeline: name.to_string(),
            base: base.id,
            created: now,
        };
        let mut batch = WriteBatch::new();
        batch.check(head_key.clone(), None)?;
        batch.put(head_key, base.id.as_bytes().to_vec())?;
        batch.put(keys::time(replica, name, base.time, &base.id), Vec::new())?;
        let fork_key = keys::replica_record(keys::FORK, replica, name.as_bytes());
        batch.put(
            fork_key.clone(),
            serde_json::to_vec(&record).map_err(|e| bad_record("fork", &fork_key, e))?,
        )?;
        match self.kv().commit(batch) {
            Ok(()) => Ok(record),
            Err(KvError::Conflict { .. }) => Err(TimelineError::Exists {
                replica: replica.into(),
                timeline: name.into(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Removes a fork: its head, time index and fork record. Its frames stay readable by id.
    pub fn delete_timeline(&self, replica: &str, name: &str) -> Result<(), TimelineError> {
        if name == MAIN_TIMELINE {
            return Err(TimelineError::Main {
                replica: replica.into(),
                timeline: name.into(),
            });
        }
        let reader = self.reader()?;
        let head_key = keys::head(replica, name);
        let Some(head) = reader.get(&head_key)? else {
            return Err(TimelineError::Unknown {
                replica: replica.into(),
                timeline: name.into(),
            });
        };
        let mut batch = WriteBatch::new();
        batch.check(head_key.clone(), Some(head))?;
        batch.delete(head_key)?;
        for (key, _) in reader.scan_prefix(&keys::time_prefix(replica, name))? {
            batch.delete(key)?;
        }
        batch.delete(keys::replica_record(keys::FORK, replica, name.as_bytes()))?;
        match self.kv().commit(batch) {
            Ok(()) => Ok(()),
            Err(KvError::Conflict { .. }) => Err(TimelineError::Unknown {
                replica: replica.into(),
                timeline: name.into(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Every timeline of a replica with its head (and fork point), `main` first.
    pub fn timeline_infos(&self, replica: &str) -> Result<Vec<TimelineInfo>, CatalogError> {
        self.replica(replica)?;
        let mut infos = Vec::new();
        for name in self.timelines(replica)? {
            let Some(head) = self.head(replica, &name)? else {
                continue;
            };
            let fork = self.fork(replica, &name)?;
            infos.push(TimelineInfo { name, head, fork });
        }
        infos.sort_by_key(|info| (info.name != MAIN_TIMELINE, info.name.clone()));
        Ok(infos)
    }

    pub fn fork(&self, replica: &str, name: &str) -> Result<Option<ForkRecord>> {
        let key = keys::replica_record(keys::FORK, replica, name.as_bytes());
        match self.reader()?.get(&key)? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|e| bad_record("fork", &key, e)),
        }
    }

    /// Stores a record of a family (`keys::PROPOSAL`, `keys::COMMIT`, ...) under `id`.
    pub fn put_record<T: Serialize>(
        &self,
        family: &'static [u8],
        replica: &str,
        id: &Hash,
        record: &T,
    ) -> Result<()> {
        let key = keys::replica_record(family, replica, id.as_bytes());
        let value = serde_json::to_vec(record).map_err(|e| bad_record("record", &key, e))?;
        let mut batch = WriteBatch::new();
        batch.put(key, value)?;
        Ok(self.kv().commit(batch)?)
    }

    pub fn record<T: serde::de::DeserializeOwned>(
        &self,
        family: &'static [u8],
        replica: &str,
        id: &Hash,
    ) -> Result<Option<T>> {
        let key = keys::replica_record(family, replica, id.as_bytes());
        match self.reader()?.get(&key)? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|e| bad_record("record", &key, e)),
        }
    }

    /// Ids of a family's records of `replica` that start with the hex `prefix`.
    pub fn record_ids(
        &self,
        family: &'static [u8],
        replica: &str,
        prefix: &str,
    ) -> Result<Vec<Hash>> {
        let scan = keys::replica_prefix(family, replica);
        Ok(self
            .reader()?
            .scan_prefix(&scan)?
            .into_iter()
            .filter_map(|(key, _)| Hash::from_slice(&key[scan.len()..]))
            .filter(|id| id.to_hex().starts_with(prefix))
            .collect())
    }

    /// A small per-replica value (`keys::GOOD`: the last good frame; `keys::PENDING`: the
    /// commit in progress).
    pub fn replica_value(&self, family: &'static [u8], replica: &str) -> Result<Option<Vec<u8>>> {
        self.reader()?.get(&[family, replica.as_bytes()].concat())
    }

    pub fn set_replica_value(
        &self,
        family: &'static [u8],
        replica: &str,
        value: Option<&[u8]>,
    ) -> Result<()> {
        let key = [family, replica.as_bytes()].concat();
        let mut batch = WriteBatch::new();
        match value {
            Some(value) => batch.put(key, value.to_vec())?,
            None => batch.delete(key)?,
        }
        Ok(self.kv().commit(batch)?)
    }

    /// Appends an entry to the replica's audit log, durably, linked to the previous one.
    pub fn audit_append(
        &self,
        replica: &str,
        party: &str,
        event: &str,
        details: serde_json::Value,
        time: Instant,
    ) -> Result<AuditEntry> {
        let head_key = [keys::AUDIT_HEAD, replica.as_bytes()].concat();
        for _ in 0..AUDIT_APPEND_ATTEMPTS {
            let head = self.reader()?.get(&head_key)?;
            let (seq, prev) = match &head {
                None => (0, Hash::default()),
                Some(value) if value.len() == 40 => {
                    let seq = u64::from_be_bytes(value[..8].try_into().unwrap_or([0; 8]));
                    let prev = Hash::from_slice(&value[8..]).unwrap_or_default();
                    (seq + 1, prev)
                }
                Some(_) => return Err(bad_record("audit head", &head_key, "is not 40 bytes")),
            };
            let mut entry = AuditEntry {
                seq,
                time,
                replica: replica.to_string(),
                party: party.to_string(),
                event: event.to_string(),
                details: details.clone(),
                prev,
                hash: Hash::default(),
            };
            entry.hash = entry.compute_hash();
            let key = keys::audit(replica, seq);
            let mut batch = WriteBatch::new();
            batch.check(head_key.clone(), head)?;
            batch.check(key.clone(), None)?;
            batch.put(
                key.clone(),
                serde_json::to_vec(&entry).map_err(|e| bad_record("audit entry", &key, e))?,
            )?;
            batch.put(
                head_key.clone(),
                [&seq.to_be_bytes()[..], entry.hash.as_bytes()].concat(),
            )?;
            match self.kv().commit(batch) {
                Ok(()) => return Ok(entry),
                Err(KvError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Kv(KvError::Conflict { key: head_key }))
    }

    /// The replica's audit log, oldest first, with its chain checked.
    pub fn audit_log(&self, replica: &str) -> Result<AuditLog> {
        let reader = self.reader()?;
        let mut entries = Vec::new();
        let mut problem = None;
        let mut prev = Hash::default();
        for (index, (key, value)) in reader
            .scan_prefix(&keys::replica_prefix(keys::AUDIT, replica))?
            .into_iter()
            .enumerate()
        {
            let entry: AuditEntry = match serde_json::from_slice(&value) {
                Ok(entry) => entry,
                Err(error) => {
                    problem.get_or_insert(format!(
                        "entry {index} ({}) is not an audit entry: {error}",
                        printable(&key)
                    ));
                    continue;
                }
            };
            if problem.is_none() {
                if entry.seq != index as u64 || keys::audit(replica, entry.seq) != key {
                    problem = Some(format!(
                        "entry {index} is out of sequence (says {})",
                        entry.seq
                    ));
                } else if entry.prev != prev {
                    problem = Some(format!(
                        "entry {} does not link to the entry before it (an entry was removed or replaced)",
                        entry.seq
                    ));
                } else if entry.compute_hash() != entry.hash {
                    problem = Some(format!(
                        "entry {} does not match its hash (it was altered)",
                        entry.seq
                    ));
                }
            }
            prev = entry.hash;
            entries.push(entry);
        }
        if problem.is_none() {
            let head_key = [keys::AUDIT_HEAD, replica.as_bytes()].concat();
            let head = reader.get(&head_key)?;
            let expected = entries
                .last()
                .map(|last| [&last.seq.to_be_bytes()[..], last.hash.as_bytes()].concat());
            if head != expected {
                problem = Some("the log's head does not match its last entry (entries were removed at the end)".into());
            }
        }
        Ok(AuditLog {
            entries,
            intact: problem.is_none(),
            problem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::FrameDraft;
    use crate::store::WriteStats;
    use kairos_core::{ReplicaDefinition, TimelineSpec};

    fn store_with_frame() -> (tempfile::TempDir, Store, FrameRecord) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        let frame = store
            .commit_frame(FrameDraft {
                replica: "web".into(),
                timeline: "main".into(),
                time: Instant(100),
                parent: None,
                root: Hash([1; 32]),
                entries: 0,
                bytes: 0,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap();
        (dir, store, frame)
    }

    #[test]
    fn forks_are_pointers_listed_resolved_and_deleted() {
        let (_dir, store, frame) = store_with_frame();
        store
            .fork_timeline("web", "try", &frame, Instant(200))
            .unwrap();
        assert!(matches!(
            store.fork_timeline("web", "try", &frame, Instant(300)),
            Err(TimelineError::Exists { .. })
        ));
        assert!(matches!(
            store.fork_timeline("web", "main", &frame, Instant(300)),
            Err(TimelineError::Main { .. })
        ));
        let spec = TimelineSpec::parse("try@latest").unwrap();
        assert_eq!(store.resolve("web", &spec, Instant(1000)).unwrap(), frame);
        let infos = store.timeline_infos("web").unwrap();
        assert_eq!(
            infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["main", "try"]
        );
        assert_eq!(infos[1].fork.as_ref().unwrap().base, frame.id);
        store.delete_timeline("web", "try").unwrap();
        assert!(matches!(
            store.delete_timeline("web", "try"),
            Err(TimelineError::Unknown { .. })
        ));
        assert!(store.resolve("web", &spec, Instant(1000)).is_err());
        assert_eq!(store.frame(&frame.id).unwrap(), frame);
    }

    #[test]
    fn audit_log_is_chained_and_tampering_is_found() {
        let (_dir, store, _) = store_with_frame();
        for index in 0..3 {
            store
                .audit_append(
                    "web",
                    "ops",
                    "proposal",
                    serde_json::json!({ "n": index }),
                    Instant(index),
                )
                .unwrap();
        }
        let log = store.audit_log("web").unwrap();
        assert!(log.intact, "{:?}", log.problem);
        assert_eq!(log.entries.len(), 3);
        assert_eq!(log.entries[2].prev, log.entries[1].hash);

        let mut altered = log.entries[1].clone();
        altered.party = "mallory".into();
        let mut batch = WriteBatch::new();
        batch
            .put(keys::audit("web", 1), serde_json::to_vec(&altered).unwrap())
            .unwrap();
        store.kv().commit(batch).unwrap();
        let log = store.audit_log("web").unwrap();
        assert!(!log.intact);
        assert!(
            log.problem
                .unwrap()
                .contains("entry 1 does not match its hash")
        );

        let mut batch = WriteBatch::new();
        batch.delete(keys::audit("web", 1)).unwrap();
        store.kv().commit(batch).unwrap();
        let log = store.audit_log("web").unwrap();
        assert!(log.problem.unwrap().contains("out of sequence"));
    }
}
