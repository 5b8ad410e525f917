//! The catalog as the log's state machine. Each entry is applied to the store by
//! [`Store::apply_entry`] with the entry's log id in the same batch (`R/applied`), so what
//! the store holds and the position it claims never disagree. Batches are committed without
//! a flush of their own: the log is durable, and a crash replays the entries after the
//! last flushed position. A snapshot is the replicated part of the catalog
//! ([`keys::is_replicated`]) at one applied position.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kairos_store::kv::{KvSnapshot, WriteBatch, prefix_end};
use kairos_store::{Applied, CatalogError, Store, keys};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};

use crate::{
    Entry, LogId, Node, NodeId, Placement, REQUESTS_REMEMBERED, Request, Response, SnapshotData,
    StorageError, StoredMembership, TypeConfig, io_error,
};

const APPLIED: &[u8] = b"R/applied";
/// The last part applied of a batch entry (its index and position), written with each
/// part: a crash in the middle of a batch re-applies the entry from the log at start,
/// and the parts already applied are skipped instead of applied twice.
const APPLIED_PART: &[u8] = b"R/applied-part";
const MEMBERSHIP: &[u8] = b"R/membership";
/// Set while a snapshot is being installed: the store's catalog is then neither the old
/// one nor the new one, and the install is redone from the saved snapshot on start.
const INSTALLING: &[u8] = b"R/installing";
const SNAPSHOT_MAGIC: &[u8; 8] = b"KRSNAP01";
/// Bytes of keys and values per batch when a snapshot is installed.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// A key written (`Some`) or deleted (`None`) with an entry.
type KeyChange = (Vec<u8>, Option<Vec<u8>>);
/// Request ids forgotten per entry at most: more than an entry can add (a batch holds at
/// most 512 requests), so the remembered ids stay within [`REQUESTS_REMEMBERED`] entries.
const FORGET_PER_ENTRY: usize = 1024;
/// Outcomes kept for submitters that have not collected theirs.
const OUTCOMES_KEPT: usize = 8192;

/// The outcome of each recently applied entry, by log index, for the member's own
/// submitters: the command's full result (its frame, its audit entries) or its refusal.
#[derive(Default)]
pub struct Outcomes {
    kept: Mutex<(BTreeMap<RequestAt, Outcome>, VecDeque<RequestAt>)>,
}

/// Where a request is in the log: its entry's index and its position in the entry.
type RequestAt = (u64, u32);
/// What a command did, or why the catalog refused it.
pub type Outcome = Result<Applied, CatalogError>;
/// A saved snapshot: its description and its data.
type SavedSnapshot = (SnapshotMeta<NodeId, Node>, Vec<u8>);

impl Outcomes {
    fn put(&self, at: RequestAt, outcome: Result<Applied, CatalogError>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.0.insert(at, outcome);
        kept.1.push_back(at);
        while kept.1.len() > OUTCOMES_KEPT {
            if let Some(old) = kept.1.pop_front() {
                kept.0.remove(&old);
            }
        }
    }

    /// The outcome of the request at `position` of the entry at `index` (0 for an entry
    /// that is not a batch), once: it is handed over.
    pub fn take(&self, index: u64, position: u32) -> Option<Result<Applied, CatalogError>> {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .remove(&(index, position))
    }
}

pub struct StateMachine {
    store: Store,
    outcomes: Arc<Outcomes>,
    dir: PathBuf,
    /// Held while a snapshot is saved: the builder (its own task) and an install may
    /// save at the same time.
    saving: Arc<Mutex<()>>,
}

fn storage(verb: ErrorVerb, error: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, error)
}

fn snapshot_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("snapshot.json"), dir.join("snapshot.bin"))
}

impl StateMachine {
    /// The state machine over `store`, with snapshots kept in `dir`. A snapshot install a
    /// crash interrupted is finished first.
    pub fn open(store: Store, dir: &Path) -> Result<StateMachine, String> {
        std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let machine = StateMachine {
            store,
            outcomes: Arc::default(),
            dir: dir.to_path_buf(),
            saving: Arc::default(),
        };
        if machine
            .store
            .reader()
            .and_then(|reader| reader.get(INSTALLING))
            .map_err(|e| e.to_string())?
            .is_some()
        {
            let (meta, data) = machine
                .saved_snapshot()
                .map_err(|e| e.to_string())?
                .ok_or("a snapshot install was interrupted and its snapshot file is gone")?;
            let pairs = decode(&data).map_err(|e| format!("the saved snapshot: {e}"))?;
            machine.install(&meta, pairs).map_err(|e| e.to_string())?;
        }
        Ok(machine)
    }

    pub fn outcomes(&self) -> Arc<Outcomes> {
        self.outcomes.clone()
    }

    /// The description of the saved snapshot, if any (its data left unread).
    fn saved_meta(&self) -> Result<Option<SnapshotMeta<NodeId, Node>>, StorageError> {
        let (meta_path, _) = snapshot_paths(&self.dir);
        let Ok(meta) = std::fs::read(&meta_path) else {
            return Ok(None);
        };
        serde_json::from_slice(&meta)
            .map(Some)
            .map_err(|e| storage(ErrorVerb::Read, e))
    }

    fn saved_snapshot(&self) -> Result<Option<SavedSnapshot>, StorageError> {
        let Some(meta) = self.saved_meta()? else {
            return Ok(None);
        };
        let (_, data_path) = snapshot_paths(&self.dir);
        let data = std::fs::read(&data_path).map_err(|e| storage(ErrorVerb::Read, e))?;
        Ok(Some((meta, data)))
    }

    /// Replaces the replicated catalog by `pairs` and moves the applied position to the
    /// snapshot's.
    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, Node>,
        pairs: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| storage(ErrorVerb::Write, e);
        let mut marker = WriteBatch::new();
        marker
            .put(INSTALLING.to_vec(), b"1".to_vec())
            .map_err(|e| write(&e))?;
        self.store.kv().commit(marker).map_err(|e| write(&e))?;
        let reader = self.store.reader().map_err(|e| write(&e))?;
        let mut stale = Vec::new();
        for_each_replicated(reader.snapshot(), |key, value| {
            if pairs.get(key).map(Vec::as_slice) != Some(value) {
                stale.push(key.to_vec());
            }
            Ok(())
        })
        .map_err(|e| write(&e))?;
        drop(reader);
        let mut batch = WriteBatch::deferred();
        let mut bytes = 0usize;
        let flush = |batch: &mut WriteBatch, bytes: &mut usize| -> Result<(), StorageError> {
            let full = std::mem::replace(batch, WriteBatch::deferred());
            *bytes = 0;
            self.store.kv().commit(full).map_err(|e| write(&e))
        };
        for key in stale {
            bytes += key.len();
            batch.delete(key).map_err(|e| write(&e))?;
            if bytes > INSTALL_BATCH_BYTES {
                flush(&mut batch, &mut bytes)?;
            }
        }
        for (key, value) in pairs {
            bytes += key.len() + value.len();
            batch.put(key, value).map_err(|e| write(&e))?;
            if bytes > INSTALL_BATCH_BYTES {
                flush(&mut batch, &mut bytes)?;
            }
        }
        flush(&mut batch, &mut bytes)?;
        let mut last = WriteBatch::new();
        let applied = serde_json::to_vec(&meta.last_log_id).map_err(|e| write(&e))?;
        let membership = serde_json::to_vec(&meta.last_membership).map_err(|e| write(&e))?;
        last.put(APPLIED.to_vec(), applied).map_err(|e| write(&e))?;
        last.put(MEMBERSHIP.to_vec(), membership)
            .map_err(|e| write(&e))?;
        last.delete(INSTALLING.to_vec()).map_err(|e| write(&e))?;
        self.store.kv().commit(last).map_err(|e| write(&e))?;
        self.store.catalog_replaced();
        Ok(())
    }

    /// Builds a snapshot of the replicated catalog at the applied position.
    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let read = |e: &dyn std::fmt::Display| storage(ErrorVerb::Read, e);
        let reader = self.store.reader().map_err(|e| read(&e))?;
        let view = reader.snapshot();
        let (last_log_id, last_membership) = applied_in(view)?;
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).map_err(|e| read(&e))?;
        encoder.write_all(SNAPSHOT_MAGIC).map_err(|e| read(&e))?;
        let mut count = 0u64;
        for_each_replicated(view, |key, value| {
            count += 1;
            for part in [key, value] {
                encoder
                    .write_all(&(part.len() as u32).to_le_bytes())
                    .and_then(|()| encoder.write_all(part))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .map_err(|e| read(&e))?;
        drop(reader);
        let data = encoder.finish().map_err(|e| read(&e))?;
        let snapshot_id = match &last_log_id {
            Some(id) => format!("{}-{}-{count}", id.leader_id, id.index),
            None => format!("empty-{count}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.save(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    /// Keeps a snapshot in the snapshot directory (written aside, synced, renamed).
    fn save(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| storage(ErrorVerb::Write, e);
        let (meta_path, data_path) = snapshot_paths(&self.dir);
        let meta_bytes = serde_json::to_vec(meta).map_err(|e| write(&e))?;
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        // A newer snapshot saved meanwhile stays.
        if let Ok(Some(saved)) = self.saved_meta()
            && saved.last_log_id > meta.last_log_id
        {
            return Ok(());
        }
        for (path, bytes) in [(&data_path, data), (&meta_path, meta_bytes.as_slice())] {
            let mut aside = path.clone().into_os_string();
            aside.push(".new");
            let aside = PathBuf::from(aside);
            let mut file = std::fs::File::create(&aside).map_err(|e| write(&e))?;
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| write(&e))?;
            std::fs::rename(&aside, path).map_err(|e| write(&e))?;
        }
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The applied position and membership recorded in a view of the store.
fn applied_in(view: &dyn KvSnapshot) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let read = |e: &dyn std::fmt::Display| storage(ErrorVerb::Read, e);
    let applied = match view.get(APPLIED).map_err(|e| read(&e))? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| read(&e))?,
        None => None,
    };
    let membership = match view.get(MEMBERSHIP).map_err(|e| read(&e))? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| read(&e))?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// Calls `each` with every replicated key and value of `view`, in key order, skipping the
/// object index, segments and every other local family by their prefixes.
fn for_each_replicated(
    view: &dyn KvSnapshot,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    const PAGE: usize = 1024;
    let mut start: Vec<u8> = Vec::new();
    let mut included = true;
    loop {
        let bound = if included {
            std::ops::Bound::Included(start.as_slice())
        } else {
            std::ops::Bound::Excluded(start.as_slice())
        };
        let page = view
            .scan(bound, std::ops::Bound::Unbounded, PAGE, false)
            .map_err(|e| e.to_string())?;
        let full = page.len() == PAGE;
        let mut jumped = false;
        for (key, value) in &page {
            if keys::is_replicated(key) {
                each(key, value)?;
                continue;
            }
            // A local family: go past its whole prefix (`x/`) at once.
            let prefix = &key[..key.len().min(2)];
            match prefix_end(prefix) {
                Some(end) => {
                    start = end;
                    included = true;
                    jumped = true;
                }
                None => return Ok(()),
            }
            break;
        }
        if jumped {
            continue;
        }
        match page.last() {
            Some((last, _)) if full => {
                start = last.clone();
                included = false;
            }
            _ => return Ok(()),
        }
    }
}

/// The pairs of a snapshot's data, checked whole before anything is installed.
fn decode(data: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let mut raw = Vec::new();
    zstd::Decoder::new(data)
        .and_then(|mut decoder| decoder.read_to_end(&mut raw))
        .map_err(|e| format!("not a catalog snapshot: {e}"))?;
    let Some(mut rest) = raw.strip_prefix(SNAPSHOT_MAGIC.as_slice()) else {
        return Err("not a catalog snapshot (bad magic)".into());
    };
    let mut pairs = BTreeMap::new();
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, String> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("a catalog snapshot cut short")?;
        let len = u32::from_le_bytes(*len) as usize;
        let part = tail.get(..len).ok_or("a catalog snapshot cut short")?;
        *rest = &tail[len..];
        Ok(part.to_vec())
    };
    while !rest.is_empty() {
        let key = take(&mut rest)?;
        let value = take(&mut rest)?;
        if !keys::is_replicated(&key) {
            return Err(format!(
                "a catalog snapshot holds a key that is not replicated: {}",
                kairos_store::kv::printable(&key)
            ));
        }
        pairs.insert(key, value);
    }
    Ok(pairs)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.build()
    }
}

impl StateMachine {
    /// The last part applied of the batch entry at `index`, if a crash interrupted it.
    fn applied_part(&self, index: u64) -> Result<Option<u32>, StorageError> {
        let read = |e: &dyn std::fmt::Display| storage(ErrorVerb::Read, e);
        let reader = self.store.reader().map_err(|e| read(&e))?;
        let Some(bytes) = reader.get(APPLIED_PART).map_err(|e| read(&e))? else {
            return Ok(None);
        };
        let (at, part): (u64, u32) = serde_json::from_slice(&bytes).map_err(|e| read(&e))?;
        Ok((at == index).then_some(part))
    }
}

impl StateMachine {
    /// Where the request `id` was applied, if the log still remembers it.
    fn applied_request(&self, id: &str) -> Result<Option<(u64, u32)>, String> {
        let reader = self.store.reader().map_err(|e| e.to_string())?;
        let Some(bytes) = reader.get(&keys::request(id)).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("request {id}: {e}"))
    }

    /// Deletes of the request ids applied more than [`REQUESTS_REMEMBERED`] entries
    /// before `index` (at most as many as one entry can add, and a little more, so the
    /// list never grows without bound and no entry does much of this work).
    fn requests_to_forget(&self, index: u64) -> Result<Vec<KeyChange>, String> {
        let Some(before) = index.checked_sub(REQUESTS_REMEMBERED) else {
            return Ok(Vec::new());
        };
        let reader = self.store.reader().map_err(|e| e.to_string())?;
        let start = keys::REQUEST_ORDER.to_vec();
        let end = keys::request_order(before, 0);
        let old = reader
            .snapshot()
            .scan(
                std::ops::Bound::Included(start.as_slice()),
                std::ops::Bound::Excluded(end.as_slice()),
                FORGET_PER_ENTRY,
                false,
            )
            .map_err(|e| e.to_string())?;
        let mut deletes = Vec::with_capacity(2 * old.len());
        for (order, id) in old {
            deletes.push((keys::request(&String::from_utf8_lossy(&id)), None));
            deletes.push((order, None));
        }
        Ok(deletes)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let reader = self
            .store
            .reader()
            .map_err(|e| storage(ErrorVerb::Read, e))?;
        applied_in(reader.snapshot())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let write = |e: &dyn std::fmt::Display| storage(ErrorVerb::Write, e);
        let mut responses = Vec::new();
        // One flush for all the entries handed over at once (group commit): the last
        // entry's batch is durable, and with it every batch before it. A crash before it
        // loses none of them (they are in the log and applied again at start), and
        // nothing is answered before it.
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.len().saturating_sub(1);
        for (position, entry) in entries.into_iter().enumerate() {
            let applied = serde_json::to_vec(&Some(entry.log_id)).map_err(|e| write(&e))?;
            let parts: Vec<&Request> = match &entry.payload {
                EntryPayload::Normal(request) => request.parts(),
                _ => Vec::new(),
            };
            let batch = matches!(&entry.payload, EntryPayload::Normal(Request::Batch { .. }));
            if parts.is_empty() {
                // A blank entry, a membership, or an empty batch: only its position.
                let mut extra = vec![(APPLIED.to_vec(), Some(applied))];
                if let EntryPayload::Membership(membership) = &entry.payload {
                    let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                    extra.push((
                        MEMBERSHIP.to_vec(),
                        Some(serde_json::to_vec(&stored).map_err(|e| write(&e))?),
                    ));
                }
                // Without a command there is nothing to refuse: only its write can fail.
                let _nothing_to_refuse = self
                    .store
                    .apply_entry(None, &extra, position == last)
                    .map_err(|e| write(&e))?;
                responses.push(Response::default());
                continue;
            }
            // Parts of this entry a crash interrupted after they were applied.
            let done = if batch {
                self.applied_part(entry.log_id.index)?
            } else {
                None
            };
            let index = entry.log_id.index;
            let mut refused = None;
            let count = parts.len();
            for (part, request) in parts.into_iter().enumerate() {
                if done.is_some_and(|done| part as u32 <= done) {
                    continue;
                }
                let at = (index, part as u32);
                let final_part = part + 1 == count;
                let mut extra = Vec::new();
                if final_part {
                    extra.push((APPLIED.to_vec(), Some(applied.clone())));
                    // Ids of requests too far back to be sent again are forgotten, by
                    // every member alike (the same log, the same keys).
                    extra.extend(self.requests_to_forget(index).map_err(|e| write(&e))?);
                }
                if batch {
                    extra.push((
                        APPLIED_PART.to_vec(),
                        Some(serde_json::to_vec(&at).map_err(|e| write(&e))?),
                    ));
                }
                let (id, request) = match request {
                    Request::Once { id, request } => (Some(id.as_str()), request.as_ref()),
                    request => (None, request),
                };
                if let Some(id) = id {
                    if let Some(first) = self.applied_request(id).map_err(|e| write(&e))? {
                        // Sent again: nothing is applied, and the answer is the first one.
                        let _nothing_to_refuse = self
                            .store
                            .apply_entry(None, &extra, final_part && position == last)
                            .map_err(|e| write(&e))?;
                        let outcome = self.outcomes.take(first.0, first.1).unwrap_or(Err(
                            CatalogError::AlreadyApplied {
                                index: first.0,
                                position: first.1,
                            },
                        ));
                        if refused.is_none() {
                            refused = outcome.as_ref().err().map(ToString::to_string);
                        }
                        self.outcomes.put(at, outcome);
                        continue;
                    }
                    extra.push((
                        keys::request(id),
                        Some(serde_json::to_vec(&at).map_err(|e| write(&e))?),
                    ));
                    extra.push((
                        keys::request_order(at.0, at.1),
                        Some(id.as_bytes().to_vec()),
                    ));
                }
                let mut command = None;
                match request {
                    Request::Command(c) => command = Some(c.as_ref()),
                    Request::Place {
                        replica,
                        node,
                        reason,
                        time,
                    } => {
                        let placement = Placement {
                            node: *node,
                            reason: reason.clone(),
                            time: *time,
                        };
                        extra.push((
                            keys::placement(replica),
                            Some(serde_json::to_vec(&placement).map_err(|e| write(&e))?),
                        ));
                    }
                    // Not made (a batch holds single requests, an id names one).
                    Request::Batch { .. } | Request::Once { .. } => {}
                }
                let outcome = self
                    .store
                    .apply_entry(command, &extra, final_part && position == last)
                    .map_err(|e| write(&e))?;
                if refused.is_none() {
                    refused = outcome.as_ref().err().map(ToString::to_string);
                }
                if command.is_some() || id.is_some() {
                    self.outcomes.put(at, outcome);
                }
            }
            responses.push(Response { refused });
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            store: self.store.share(),
            outcomes: self.outcomes.clone(),
            dir: self.dir.clone(),
            saving: self.saving.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let pairs = decode(&data).map_err(|e| storage(ErrorVerb::Read, e))?;
        // Saved first: a crash during the install redoes it from this copy.
        self.save(meta, &data)?;
        self.install(meta, pairs)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let saved = match self.saved_snapshot() {
            Ok(saved) => saved,
            Err(error) => {
                tracing::warn!(%error, "the saved catalog snapshot is unreadable; a new one will be built");
                return Ok(None);
            }
        };
        let Some((meta, data)) = saved else {
            return Ok(None);
        };
        // Never sent damaged: a snapshot that does not decode is built again instead.
        if let Err(problem) = decode(&data) {
            tracing::warn!(%problem, "the saved catalog snapshot is damaged; a new one will be built");
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use kairos_store::kv::WriteBatch;

    use super::*;

    fn store_with(pairs: &[(&[u8], &[u8])]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = WriteBatch::new();
        for (key, value) in pairs {
            batch.put(key.to_vec(), value.to_vec()).unwrap();
        }
        store.kv().commit(batch).unwrap();
        (dir, store)
    }

    fn replicated(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let reader = store.reader().unwrap();
        let mut out = BTreeMap::new();
        for_each_replicated(reader.snapshot(), |key, value| {
            out.insert(key.to_vec(), value.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    fn register(name: &str) -> Request {
        let definition = serde_json::from_value(serde_json::json!({
            "name": name,
            "root": format!("/srv/{name}"),
            "capture_interval_ms": 1000,
        }))
        .unwrap();
        Request::Command(Box::new(kairos_store::Command {
            version: kairos_store::command::COMMAND_VERSION,
            time: kairos_core::Instant(1),
            replica: name.into(),
            timeline: "main".into(),
            party: "ops".into(),
            change: kairos_store::Change::RegisterReplica {
                definition,
                replace: false,
            },
            audit: Vec::new(),
            reviews_seen: None,
        }))
    }

    fn entry(index: u64, request: Request) -> Entry {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(request),
        }
    }

    fn once(id: &str, request: Request) -> Request {
        Request::Once {
            id: id.into(),
            request: Box::new(request),
        }
    }

    /// A request sent again under the same id (its leader died before answering) is not
    /// applied again, alone or in a batch: the second answer is the first one, or, once
    /// that was handed over, a refusal that says the request was applied; ids are
    /// forgotten once the log is far enough past them.
    #[tokio::test]
    async fn a_request_sent_again_is_applied_once_and_answered_as_the_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let snapshots = tempfile::tempdir().unwrap();
        let mut machine = StateMachine::open(store.share(), snapshots.path()).unwrap();
        let outcomes = machine.outcomes();
        let responses = machine
            .apply(vec![entry(1, once("aa", register("a")))])
            .await
            .unwrap();
        assert_eq!(responses[0].refused, None);
        // Sent again, alone and inside a batch: without the id it would be refused as a
        // replica that exists (applied twice).
        let responses = machine
            .apply(vec![
                entry(2, once("aa", register("a"))),
                entry(
                    3,
                    Request::Batch {
                        requests: vec![once("bb", register("b")), once("aa", register("a"))],
                    },
                ),
            ])
            .await
            .unwrap();
        assert_eq!(responses[0].refused, None, "the first answer, moved");
        assert!(outcomes.take(1, 0).is_none(), "moved to the second sending");
        assert!(outcomes.take(2, 0).unwrap().is_ok());
        assert!(outcomes.take(3, 0).unwrap().is_ok());
        let again = outcomes.take(3, 1).unwrap().unwrap_err().to_string();
        assert!(
            again.contains("applied already (log entry 1, request 0)"),
            "{again}"
        );
        assert_eq!(responses[1].refused.as_deref(), Some(again.as_str()));

        // The log moves on: ids further back than it remembers are forgotten, a few per
        // entry, and then the same id is a new request.
        let mut index = 4;
        while index < REQUESTS_REMEMBERED + 6 {
            machine
                .apply(vec![entry(index, register(&format!("r{index}")))])
                .await
                .unwrap();
            index += 1;
        }
        let reader = store.reader().unwrap();
        assert_eq!(reader.get(&keys::request("aa")).unwrap(), None);
        assert_eq!(reader.get(&keys::request("bb")).unwrap(), None);
        assert_eq!(reader.get(&keys::request_order(1, 0)).unwrap(), None);
        drop(reader);
        let responses = machine
            .apply(vec![entry(index, once("aa", register("a")))])
            .await
            .unwrap();
        assert!(
            responses[0]
                .refused
                .as_deref()
                .is_some_and(|r| r.contains("already exists")),
            "{responses:?}"
        );
    }

    /// A batch applies each request as its own entry would (outcomes by position, a
    /// refusal of one part leaves the others), and a batch a crash interrupted is applied
    /// again from where it stopped: the parts already applied are not applied twice.
    #[tokio::test]
    async fn a_batch_is_applied_part_by_part_and_resumed_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let snapshots = tempfile::tempdir().unwrap();
        let mut machine = StateMachine::open(store.share(), snapshots.path()).unwrap();
        let outcomes = machine.outcomes();
        let batch = Request::Batch {
            requests: vec![register("a"), register("b"), register("a")],
        };
        let responses = machine.apply(vec![entry(1, batch)]).await.unwrap();
        assert!(outcomes.take(1, 0).unwrap().is_ok());
        assert!(outcomes.take(1, 1).unwrap().is_ok());
        let refused = outcomes.take(1, 2).unwrap().unwrap_err().to_string();
        assert_eq!(responses[0].refused.as_deref(), Some(refused.as_str()));
        let (applied, _) = machine.applied_state().await.unwrap();
        assert_eq!(applied.map(|id| id.index), Some(1));

        // A crash after the first part of entry 2: its change and its part marker are
        // stored, the entry's position is not (the log applies it again at start).
        let Request::Command(first) = register("c") else {
            unreachable!()
        };
        let mut interrupted =
            kairos_store::command::apply(store.reader().unwrap().snapshot(), &first)
                .unwrap()
                .batch;
        interrupted
            .put(
                APPLIED_PART.to_vec(),
                serde_json::to_vec(&(2u64, 0u32)).unwrap(),
            )
            .unwrap();
        store.kv().commit(interrupted).unwrap();
        let batch = Request::Batch {
            requests: vec![register("c"), register("d")],
        };
        let responses = machine.apply(vec![entry(2, batch)]).await.unwrap();
        assert_eq!(responses[0].refused, None, "c was not registered twice");
        assert!(
            outcomes.take(2, 0).is_none(),
            "the part applied before the crash is skipped"
        );
        assert!(outcomes.take(2, 1).unwrap().is_ok());
        let (applied, _) = machine.applied_state().await.unwrap();
        assert_eq!(applied.map(|id| id.index), Some(2));
        let reader = store.reader().unwrap();
        for name in ["a", "b", "c", "d"] {
            assert!(
                reader
                    .get(&kairos_store::keys::replica(name))
                    .unwrap()
                    .is_some()
            );
        }
    }

    #[test]
    fn a_snapshot_holds_the_replicated_catalog_and_installs_it_elsewhere_whole() {
        let (_a, source) = store_with(&[
            (b"r/web", b"{}"),
            (b"h/web\0main", b"head"),
            (b"o/0123", b"an object index entry"),
            (b"d/\0\0\0\0\0\0\0\x01", b"a dictionary of this node"),
            (b"y/ops", b"{\"role\":\"admin\"}"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let machine = StateMachine::open(source.share(), dir.path()).unwrap();
        let snapshot = machine.build().unwrap();
        let data = snapshot.snapshot.into_inner();
        let pairs = decode(&data).unwrap();
        let keys: Vec<&[u8]> = pairs.keys().map(Vec::as_slice).collect();
        assert_eq!(keys, vec![&b"h/web\0main"[..], b"r/web", b"y/ops"]);
        // Installed on a member whose catalog differs: the replicated keys become the
        // snapshot's, its own local keys stay.
        let (_b, target) = store_with(&[
            (b"r/old", b"{}"),
            (b"h/web\0main", b"another head"),
            (b"d/\0\0\0\0\0\0\0\x07", b"its own dictionary"),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let other = StateMachine::open(target.share(), dir.path()).unwrap();
        other.install(&snapshot.meta, pairs.clone()).unwrap();
        assert_eq!(replicated(&target), pairs);
        let reader = target.reader().unwrap();
        assert!(reader.get(b"d/\0\0\0\0\0\0\0\x07").unwrap().is_some());
        assert!(reader.get(INSTALLING).unwrap().is_none());
    }

    #[test]
    fn damaged_snapshots_are_refused_before_anything_is_installed() {
        let (_a, source) = store_with(&[(b"r/web", b"{}")]);
        let dir = tempfile::tempdir().unwrap();
        let machine = StateMachine::open(source.share(), dir.path()).unwrap();
        let data = machine.build().unwrap().snapshot.into_inner();
        assert!(
            decode(b"not zstd at all")
                .unwrap_err()
                .contains("not a catalog snapshot")
        );
        let mut flipped = data.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x55;
        assert!(decode(&flipped).is_err());
        // A snapshot naming a local key (an object index entry) is refused by name.
        let mut raw = SNAPSHOT_MAGIC.to_vec();
        for part in [&b"o/0123"[..], b"x"] {
            raw.extend_from_slice(&(part.len() as u32).to_le_bytes());
            raw.extend_from_slice(part);
        }
        let encoded = zstd::encode_all(raw.as_slice(), 1).unwrap();
        assert!(decode(&encoded).unwrap_err().contains("not replicated"));
        // Cut short.
        let mut raw = SNAPSHOT_MAGIC.to_vec();
        raw.extend_from_slice(&100u32.to_le_bytes());
        raw.extend_from_slice(b"r/");
        let encoded = zstd::encode_all(raw.as_slice(), 1).unwrap();
        assert!(decode(&encoded).unwrap_err().contains("cut short"));
    }
}
