//! Garbage collection and the store's figures. Objects that no kept frame or record needs
//! are removed and segments that are mostly dead are repacked, while captures and commits
//! go on in the same process; `figures` counts frames, objects and bytes for `kairos stats`.
//!
//! The protocol (proved in ARCHITECTURE.md, "Garbage collection"):
//! 1. *Survey*: with the writers' registry locked, note every segment a live writer has
//!    made and take snapshot S. Every object index entry (`o/`) and segment (`s/`) of S is
//!    listed; objects written after S are never candidates.
//! 2. *Mark*: every frame record's root and every object hash any other catalog record
//!    names (proposals, sandboxes, commits, forks, heads…; not the audit log) is a root;
//!    everything reachable from a root is live. A node that cannot be read stops the run.
//! 3. *Sweep*, in bounded batches, each holding the gate exclusively: list the live
//!    writers, re-mark if the catalog changed since the last mark, then delete (guarded by
//!    a check of the entry's value) the index entries of candidates that are neither live
//!    nor in a live writer's set. Writers note an object in their set and look it up under
//!    the gate shared, so a deduplicated object is either protected or found gone.
//! 4. *Segments*: a segment none of whose entries is left is deleted; a mostly dead one is
//!    repacked (live objects, each checked against its hash, copied into new segments and
//!    their entries switched in one guarded batch) before it is deleted. A segment is
//!    deleted in a batch that checks every entry that pointed into it, and never while a
//!    writer that made it may still index into it.
//!
//! Every batch leaves a store in which every kept frame is complete: a crash at any point
//! leaves at most unreferenced objects or segments, which the next run removes.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use kairos_core::Hash;
use serde::{Deserialize, Serialize};

use crate::catalog::parse_frame;
use crate::keys;
use crate::kv::{KvError, KvSnapshot, WriteBatch, prefix_end, printable};
use crate::node::{Body, ChunkList, Content, DirNode, RootNode};
use crate::object::ObjectKind;
use crate::pack::{self, Flushed, Packer, SEGMENT_ID_BYTES, SegmentId};
use crate::store::{Reader, Store, StoreError};

/// Index entries deleted by the first sweep batch (the gate is held exclusively for one
/// batch); later batches are sized by [`BatchSizer`].
pub const SWEEP_BATCH_OBJECTS: usize = 512;
/// A segment is repacked when its live objects fill less than this share of it, in percent.
pub const REPACK_LIVE_PERCENT_MAX: u64 = 50;
/// Live bytes a run copies into new segments at most, unless told otherwise.
pub const REPACK_BYTES_DEFAULT: u64 = 1 << 30;
/// Bytes of new segments per repack batch.
const REPACK_BATCH_BYTES: usize = 6 << 20;
/// Segments deleted by the first deletion batch; later batches are sized by
/// [`BatchSizer`].
const DELETE_BATCH_SEGMENTS: usize = 64;
/// A pause after each batch, so that writers waiting for the backend's write lock or the
/// gate get it before the next batch does.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
/// How long one sweep or deletion batch should hold the backend's write lock (and, for a
/// sweep, the gate): a capture's commits wait behind it. Measured with `bench/gc`: batches
/// of 2 000 entries or 600 segments held it 3–25 ms each, and captures meanwhile took 83%
/// longer on average.
const BATCH_HOLD_TARGET: std::time::Duration = std::time::Duration::from_millis(2);

/// Sizes batches by the time the last one took: halves after one that held the lock past
/// [`BATCH_HOLD_TARGET`], grows by a quarter after one that took less than half of it.
struct BatchSizer {
    size: usize,
    max: usize,
}

impl BatchSizer {
    fn new(first: usize, max: usize) -> BatchSizer {
        BatchSizer { size: first, max }
    }

    fn size(&self) -> usize {
        self.size
    }

    fn took(&mut self, elapsed: std::time::Duration) {
        if elapsed > BATCH_HOLD_TARGET {
            self.size = (self.size / 2).max(1);
        } else if elapsed < BATCH_HOLD_TARGET / 2 {
            self.size = (self.size + self.size.div_ceil(4)).min(self.max);
        }
    }
}
/// Keys read per scan page.
const SCAN_PAGE: usize = 2048;
/// Times a batch is rebuilt after a concurrent change of one of its checked keys.
const BATCH_ATTEMPTS_MAX: usize = 4;
/// Catalog prefixes whose records name no object a reader needs: the audit log (it names
/// what existed), parties and tokens, model files (not objects), dictionaries, the runtime
/// series (metric samples), and the time index (it names the same frames as their records).
const NOT_ROOTS: [&[u8]; 9] = [
    keys::SERIES,
    keys::AUDIT,
    keys::AUDIT_HEAD,
    keys::PARTY,
    keys::PARTY_TOKEN,
    keys::MODEL_PART,
    keys::DICTIONARY,
    keys::DICTIONARY_VERSION,
    keys::TIME,
];

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a garbage collection is already running on this store")]
    AlreadyRunning,
    #[error(
        "garbage collection needs a store that one process holds (the embedded store); this backend is shared"
    )]
    SharedBackend,
    /// A record or node that roots or links live objects cannot be read: collecting would
    /// guess, so the run stops (what it removed before was unreachable all the same).
    #[error(
        "garbage collection stopped: {what} is damaged or missing ({problem}); run `kairos verify`, then `kairos repair`"
    )]
    Damaged { what: String, problem: String },
}

impl From<KvError> for GcError {
    fn from(error: KvError) -> GcError {
        GcError::Store(error.into())
    }
}

impl GcError {
    /// Whether the error means stored data is damaged.
    pub fn is_corruption(&self) -> bool {
        match self {
            GcError::Store(error) => error.is_corruption(),
            GcError::Damaged { .. } => true,
            GcError::AlreadyRunning | GcError::SharedBackend => false,
        }
    }
}

/// What a run may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcOptions {
    /// Reports what would be removed and repacked, and writes nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Live bytes copied out of mostly dead segments at most.
    #[serde(default = "default_repack_bytes")]
    pub max_repack_bytes: u64,
}

fn default_repack_bytes() -> u64 {
    REPACK_BYTES_DEFAULT
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            dry_run: false,
            max_repack_bytes: REPACK_BYTES_DEFAULT,
        }
    }
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Frame records whose trees were marked.
    pub frames: u64,
    pub objects_examined: u64,
    pub objects_live: u64,
    pub objects_deleted: u64,
    /// Unreachable objects kept because a writer in progress wrote or reused them.
    pub objects_kept_in_flight: u64,
    /// Stored bytes of the objects deleted.
    pub bytes_deleted: u64,
    pub segments_examined: u64,
    /// Bytes of the segments examined (what "per 10 GB examined" counts).
    pub bytes_examined: u64,
    pub segments_deleted: u64,
    pub segments_repacked: u64,
    /// Live bytes copied into new segments.
    pub bytes_repacked: u64,
    /// Mostly dead segments left for a later run (over `max_repack_bytes`).
    pub segments_repack_deferred: u64,
    /// Segments kept because an object in them does not match its hash (left for repair).
    pub segments_kept_damaged: u64,
    /// Times the catalog changed during the run and new roots were marked.
    pub remarks: u64,
    pub bytes_on_disk_before: u64,
    pub bytes_on_disk_after: u64,
    /// Whether the file was compacted after the run (direct mode), and how long that took
    /// (included in `duration_ms`).
    #[serde(default)]
    pub compacted: bool,
    #[serde(default)]
    pub compact_ms: u64,
    /// Live segment bytes moved out of pack files a fifth dead or more (the embedded backend), so
    /// that those files could be removed.
    #[serde(default)]
    pub bytes_moved_in_files: u64,
    pub duration_ms: u64,
}

/// The store's figures (`kairos stats`, the node's status).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreFigures {
    pub replicas: u64,
    pub frames: u64,
    pub objects: u64,
    pub objects_reachable: u64,
    /// Bytes of regular files over every frame: what full copies of every frame would take.
    pub bytes_raw: u64,
    /// Bytes of every object as stored (compressed, deduplicated).
    pub bytes_stored: u64,
    /// Bytes of the segments that hold them (what `bytes_stored` occupies in values).
    pub bytes_segments: u64,
    /// The store's size on disk (the embedded backend: its file and its pack files).
    pub bytes_on_disk: u64,
    /// `bytes_raw / bytes_stored`: what content addressing, deduplication and compression
    /// save together.
    pub dedup_ratio: f64,
    /// Bytes of segments a collection frees: segments left without live objects, and
    /// the dead part of those it repacks (live objects under half of them).
    pub bytes_reclaimable: u64,
    /// Dead bytes a collection leaves where they are: in segments still mostly live,
    /// whose repacking would copy more than it frees.
    #[serde(default)]
    pub bytes_dead_kept: u64,
    /// Bytes in the embedded backend's pack files that no segment uses (deleted segments,
    /// alignment): a collection moves the live part of each pack a fifth dead or more and
    /// removes the pack; the rest stays until its pack is.
    #[serde(default)]
    pub bytes_dead_in_files: u64,
    pub objects_reclaimable: u64,
    pub segments: u64,
    pub dictionaries: Vec<DictionaryFigures>,
    /// How long computing these figures took.
    pub computed_ms: u64,
}

/// A replica's compression dictionary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DictionaryFigures {
    pub replica: String,
    pub version: u32,
    pub bytes: u64,
}

// ---------------------------------------------------------------------------------------
// The gate: what garbage collection knows of this process's writers.

/// Shared by a store and its object writers.
#[derive(Default)]
pub struct Gate {
    /// Held shared by a writer around "note the object, look it up"; exclusively by a
    /// sweep batch around "choose what to delete, delete it".
    sweeping: RwLock<()>,
    writers: Mutex<Writers>,
    /// One collection at a time.
    collecting: Mutex<()>,
}

#[derive(Default)]
struct Writers {
    next: u64,
    live: HashMap<u64, Arc<InFlight>>,
}

/// Objects a writer stored or reused and segments it made, while it lives.
#[derive(Default)]
struct InFlight {
    objects: Mutex<HashSet<Hash>>,
    segments: Mutex<HashSet<SegmentId>>,
}

/// A writer's entry in the registry, removed when the writer is dropped.
pub struct Registration {
    gate: Arc<Gate>,
    id: u64,
    in_flight: Arc<InFlight>,
}

impl Gate {
    pub(crate) fn register(self: &Arc<Self>) -> Registration {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let id = writers.next;
        writers.next += 1;
        let in_flight = Arc::new(InFlight::default());
        writers.live.insert(id, in_flight.clone());
        Registration {
            gate: self.clone(),
            id,
            in_flight,
        }
    }

    fn live_writers(&self) -> Vec<Arc<InFlight>> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .values()
            .cloned()
            .collect()
    }

    /// How many object writers are alive now.
    pub fn writers_alive(&self) -> usize {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .len()
    }
}

impl Registration {
    /// Held around noting an object and looking it up.
    pub(crate) fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.sweeping.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an object; false if this writer had it already.
    pub(crate) fn note_object(&self, hash: Hash) -> bool {
        self.in_flight
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash)
    }

    /// Notes a segment this writer made (before the batch holding it is sent).
    pub(crate) fn note_segment(&self, id: &[u8]) {
        if let Ok(id) = <SegmentId>::try_from(id) {
            self.in_flight
                .segments
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.gate
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .remove(&self.id);
    }
}

// ---------------------------------------------------------------------------------------
// Survey and mark.

/// What one segment holds, as of snapshot S.
#[derive(Default)]
struct SegmentUse {
    /// The value's length; `None` when an index entry names a segment that is not stored.
    bytes: Option<u64>,
    objects: Vec<Hash>,
}

/// Everything stored at snapshot S.
struct Survey<'s> {
    reader: Reader<'s>,
    /// Index entries (`o/` values) by object.
    entries: HashMap<Hash, Vec<u8>>,
    segments: HashMap<SegmentId, SegmentUse>,
    /// Segments made by writers alive at S: more entries may point into them later.
    in_flight_segments: HashSet<SegmentId>,
    /// The catalog's change count read just before S.
    catalog_changes: Option<u64>,
}

fn damaged(what: impl Into<String>, problem: impl ToString) -> GcError {
    GcError::Damaged {
        what: what.into(),
        problem: problem.to_string(),
    }
}

/// Pages of `(key, value)` pairs in `[start, end)`.
fn scan_range(
    snapshot: &dyn KvSnapshot,
    start: &[u8],
    end: Option<&[u8]>,
    mut each: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), GcError>,
) -> Result<(), GcError> {
    let mut lower = start.to_vec();
    let mut inclusive = true;
    loop {
        let lower_bound = if inclusive {
            Bound::Included(lower.as_slice())
        } else {
            Bound::Excluded(lower.as_slice())
        };
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let page = snapshot.scan(lower_bound, upper, SCAN_PAGE, false)?;
        let full = page.len() == SCAN_PAGE;
        if let Some((last, _)) = page.last() {
            lower = last.clone();
            inclusive = false;
        }
        for (key, value) in page {
            each(key, value)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// The parts of an index entry, or the damage that makes it unreadable.
fn parts_of(hash: &Hash, index: &[u8]) -> Result<Vec<pack::Part>, GcError> {
    pack::decode_index(index)
        .map_err(|problem| damaged(format!("index entry of object {hash}"), problem))
}

fn stored_len(parts: &[pack::Part]) -> u64 {
    parts.iter().map(|part| u64::from(part.len)).sum()
}

impl<'s> Survey<'s> {
    fn take(store: &'s Store) -> Result<Survey<'s>, GcError> {
        let catalog_changes = store.kv().catalog_changes()?;
        // Under the registry's lock: a writer alive at S is listed with every segment it
        // had sent by then.
        let (reader, in_flight_segments) = {
            let writers = store.gate.writers.lock().unwrap_or_else(|p| p.into_inner());
            let mut segments = HashSet::new();
            for writer in writers.live.values() {
                segments.extend(
                    writer
                        .segments
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .copied(),
                );
            }
            (store.reader()?, segments)
        };
        let mut entries = HashMap::new();
        let mut segments: HashMap<SegmentId, SegmentUse> = HashMap::new();
        let object_end = prefix_end(keys::OBJECT).unwrap_or_default();
        scan_range(
            reader.snapshot(),
            keys::OBJECT,
            Some(&object_end),
            |key, index| {
                let Some(hash) = Hash::from_slice(&key[keys::OBJECT.len()..]) else {
                    return Err(damaged(
                        format!("object key {}", printable(&key)),
                        "malformed",
                    ));
                };
                for part in parts_of(&hash, &index)? {
                    let uses = segments.entry(part.segment).or_default();
                    if uses.objects.last() != Some(&hash) {
                        uses.objects.push(hash);
                    }
                }
                entries.insert(hash, index);
                Ok(())
            },
        )?;
        let segment_end = prefix_end(keys::SEGMENT).unwrap_or_default();
        let mut lower = keys::SEGMENT.to_vec();
        let mut inclusive = true;
        loop {
            let lower_bound = if inclusive {
                Bound::Included(lower.as_slice())
            } else {
                Bound::Excluded(lower.as_slice())
            };
            let page = reader.snapshot().scan_key_lengths(
                lower_bound,
                Bound::Excluded(segment_end.as_slice()),
                SCAN_PAGE,
            )?;
            let full = page.len() == SCAN_PAGE;
            if let Some((last, _)) = page.last() {
                lower = last.clone();
                inclusive = false;
            }
            for (key, len) in page {
                if let Ok(id) = SegmentId::try_from(&key[keys::SEGMENT.len()..]) {
                    segments.entry(id).or_default().bytes = Some(len as u64);
                }
            }
            if !full {
                break;
            }
        }
        Ok(Survey {
            reader,
            entries,
            segments,
            in_flight_segments,
            catalog_changes,
        })
    }

    fn stored_bytes(&self, hash: &Hash) -> u64 {
        self.entries
            .get(hash)
            .and_then(|index| pack::decode_index(index).ok())
            .map_or(0, |parts| stored_len(&parts))
    }

    /// Bytes of `segment` that objects not in `gone` occupy.
    fn live_bytes(&self, id: &SegmentId, uses: &SegmentUse, gone: &HashSet<Hash>) -> u64 {
        uses.objects
            .iter()
            .filter(|hash| !gone.contains(hash))
            .filter_map(|hash| self.entries.get(hash))
            .filter_map(|index| pack::decode_index(index).ok())
            .flat_map(|parts| parts.into_iter())
            .filter(|part| &part.segment == id)
            .map(|part| u64::from(part.len))
            .sum()
    }
}

/// The live set, grown by marking roots.
#[derive(Default)]
struct Marker {
    live: HashSet<Hash>,
    frames_walked: HashSet<Hash>,
    bytes_raw: u64,
    replicas: u64,
}

impl Marker {
    /// Marks every root the catalog of `reader` holds that is not marked yet.
    fn mark_catalog(&mut self, reader: &Reader<'_>) -> Result<(), GcError> {
        let mut stack: Vec<(Hash, Option<ObjectKind>)> = Vec::new();
        let mut candidates: Vec<Hash> = Vec::new();
        let mut replicas = 0;
        let object_end = prefix_end(keys::OBJECT).unwrap_or_default();
        let segment_end = prefix_end(keys::SEGMENT).unwrap_or_default();
        let ranges: [(&[u8], Option<&[u8]>); 3] = [
            (b"", Some(keys::OBJECT)),
            (&object_end, Some(keys::SEGMENT)),
            (&segment_end, None),
        ];
        for (start, end) in ranges {
            scan_range(reader.snapshot(), start, end, |key, value| {
                if NOT_ROOTS.iter().any(|prefix| key.starts_with(prefix)) {
                    return Ok(());
                }
                if key.starts_with(keys::REPLICA) {
                    replicas += 1;
                }
                if key.starts_with(keys::FRAME) {
                    let frame = parse_frame(&key, &value).map_err(|error| {
                        damaged(format!("frame record {}", printable(&key)), error)
                    })?;
                    if self.frames_walked.insert(frame.id) {
                        self.bytes_raw += frame.bytes;
                        stack.push((frame.root, Some(ObjectKind::Root)));
                    }
                    return Ok(());
                }
                names_in(&key, &value, &mut candidates);
                Ok(())
            })?;
        }
        self.replicas = replicas;
        for hash in candidates {
            if !self.live.contains(&hash) && reader.has_object(&hash)? {
                stack.push((hash, None));
            }
        }
        self.walk(reader, stack)
    }

    /// Marks everything reachable from `stack`.
    fn walk(
        &mut self,
        reader: &Reader<'_>,
        mut stack: Vec<(Hash, Option<ObjectKind>)>,
    ) -> Result<(), GcError> {
        while let Some((hash, kind)) = stack.pop() {
            if self.live.contains(&hash) {
                continue;
            }
            let kind = match kind {
                Some(kind) => kind,
                None => kind_of(reader, &hash)?,
            };
            let unreadable = |error: StoreError| damaged(format!("{} {hash}", kind.name()), error);
            match kind {
                ObjectKind::Root | ObjectKind::Dir | ObjectKind::ChunkList => {
                    stack.extend(reader.children(&hash, kind).map_err(unreadable)?);
                }
                ObjectKind::Blob | ObjectKind::Chunk | ObjectKind::Runtime | ObjectKind::Config => {
                    if !reader.has_object(&hash)? {
                        return Err(damaged(
                            format!("{} {hash}", kind.name()),
                            "a kept frame or record needs it and it is not stored",
                        ));
                    }
                }
            }
            self.live.insert(hash);
        }
        Ok(())
    }
}

impl Reader<'_> {
    /// The objects a tree object (a root, a directory node, a chunk list) refers to, with
    /// their kinds; none for the others.
    pub fn children(
        &self,
        hash: &Hash,
        kind: ObjectKind,
    ) -> Result<Vec<(Hash, Option<ObjectKind>)>, StoreError> {
        let mut out = Vec::new();
        match kind {
            ObjectKind::Root => {
                let root: RootNode = self.node(hash, kind)?;
                out.push((Hash(root.files), Some(ObjectKind::Dir)));
                out.push((Hash(root.runtime), Some(ObjectKind::Runtime)));
            }
            ObjectKind::Dir => match self.node::<DirNode>(hash, kind)? {
                DirNode::Index { pages } => {
                    out.extend(
                        pages
                            .iter()
                            .map(|page| (Hash(page.node), Some(ObjectKind::Dir))),
                    );
                }
                DirNode::Leaf { entries } => {
                    for entry in entries {
                        push_children(&entry.body, &mut out);
                    }
                }
            },
            ObjectKind::ChunkList => {
                let list: ChunkList = self.node(hash, kind)?;
                let child = if list.level == 0 {
                    ObjectKind::Chunk
                } else {
                    ObjectKind::ChunkList
                };
                out.extend(list.items.iter().map(|item| (Hash(item.hash), Some(child))));
            }
            ObjectKind::Blob | ObjectKind::Chunk | ObjectKind::Runtime | ObjectKind::Config => {}
        }
        Ok(out)
    }
}

fn push_children(body: &Body, stack: &mut Vec<(Hash, Option<ObjectKind>)>) {
    match body {
        Body::Dir { node, .. } => stack.push((Hash(*node), Some(ObjectKind::Dir))),
        Body::File {
            content, config, ..
        } => {
            match content {
                Content::Blob { hash } => stack.push((Hash(*hash), Some(ObjectKind::Blob))),
                Content::Chunks { list, .. } => {
                    stack.push((Hash(*list), Some(ObjectKind::ChunkList)));
                }
                Content::Empty | Content::Omitted { .. } => {}
            }
            if let Some(config) = config {
                stack.push((Hash(*config), Some(ObjectKind::Config)));
            }
        }
        Body::Symlink { .. } | Body::Special { .. } | Body::Unreadable { .. } => {}
    }
}

/// The kind of a stored object, from its header.
fn kind_of(reader: &Reader<'_>, hash: &Hash) -> Result<ObjectKind, GcError> {
    let value = reader
        .stored_value(hash, ObjectKind::Blob)
        .map_err(|error| damaged(format!("object {hash}"), error))?;
    value
        .get(1)
        .copied()
        .and_then(ObjectKind::from_byte)
        .ok_or_else(|| damaged(format!("object {hash}"), "unknown kind"))
}

/// Hashes a catalog record names: the 32 bytes that end its key, a value of 32 bytes, and
/// every string of 64 hex digits in a JSON value.
fn names_in(key: &[u8], value: &[u8], out: &mut Vec<Hash>) {
    if key.len() >= 2 + 32
        && let Some(hash) = Hash::from_slice(&key[key.len() - 32..])
    {
        out.push(hash);
    }
    if value.len() == 32 {
        out.extend(Hash::from_slice(value));
        return;
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(value) {
        hashes_in_json(&json, out);
    }
}

fn hashes_in_json(value: &serde_json::Value, out: &mut Vec<Hash>) {
    match value {
        serde_json::Value::String(text) => out.extend(parse_hash(text)),
        serde_json::Value::Array(items) => items.iter().for_each(|item| hashes_in_json(item, out)),
        serde_json::Value::Object(fields) => {
            fields.values().for_each(|item| hashes_in_json(item, out));
        }
        _ => {}
    }
}

fn parse_hash(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(Hash(bytes))
}

// ---------------------------------------------------------------------------------------
// The run.

impl Store {
    /// One garbage collection (see the module documentation).
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport, GcError> {
        let started = std::time::Instant::now();
        if !self.kv().held_by_one_process() {
            return Err(GcError::SharedBackend);
        }
        let _one_at_a_time = self
            .gate
            .collecting
            .try_lock()
            .map_err(|_| GcError::AlreadyRunning)?;
        let mut report = GcReport {
            dry_run: options.dry_run,
            bytes_on_disk_before: self.size_bytes()?,
            ..GcReport::default()
        };
        let survey = Survey::take(self)?;
        let mut marker = Marker::default();
        marker.mark_catalog(&survey.reader)?;
        report.objects_examined = survey.entries.len() as u64;
        report.segments_examined = survey.segments.len() as u64;
        report.bytes_examined = survey.segments.values().filter_map(|uses| uses.bytes).sum();
        let gone = if options.dry_run {
            self.unreachable_now(&survey, &marker, &mut report)
        } else {
            self.sweep(&survey, &mut marker, &mut report)?
        };
        report.frames = marker.frames_walked.len() as u64;
        report.objects_live = survey
            .entries
            .keys()
            .filter(|hash| !gone.contains(hash))
            .count() as u64;
        self.collect_segments(&survey, &gone, options, &mut report)?;
        if !options.dry_run {
            // The run's batches skip the disk flush (captures' commits wait less); this
            // empty durable commit flushes them all. A crash before it undoes a suffix of
            // them, which leaves a store as safe as any batch boundary does.
            self.kv().commit(WriteBatch::new())?;
            // Files the backend appends segments to give back what the run freed.
            report.bytes_moved_in_files = self.kv().compact_files()?;
        }
        report.bytes_on_disk_after = self.size_bytes()?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// What a sweep would delete now (dry run).
    fn unreachable_now(
        &self,
        survey: &Survey<'_>,
        marker: &Marker,
        report: &mut GcReport,
    ) -> HashSet<Hash> {
        let writers = self.gate.live_writers();
        let mut gone = HashSet::new();
        for hash in survey
            .entries
            .keys()
            .filter(|hash| !marker.live.contains(hash))
        {
            if in_flight(&writers, hash) {
                report.objects_kept_in_flight += 1;
            } else {
                gone.insert(*hash);
                report.objects_deleted += 1;
                report.bytes_deleted += survey.stored_bytes(hash);
            }
        }
        gone
    }

    /// Deletes the index entries of unreachable objects, in batches; returns them.
    fn sweep(
        &self,
        survey: &Survey<'_>,
        marker: &mut Marker,
        report: &mut GcReport,
    ) -> Result<HashSet<Hash>, GcError> {
        let mut candidates: Vec<Hash> = survey
            .entries
            .keys()
            .filter(|hash| !marker.live.contains(hash))
            .copied()
            .collect();
        candidates.sort_unstable_by_key(|hash| *hash.as_bytes());
        let mut catalog_marked = survey.catalog_changes;
        let mut gone = HashSet::new();
        let mut sizer = BatchSizer::new(SWEEP_BATCH_OBJECTS, 8 * SWEEP_BATCH_OBJECTS);
        let mut rest = candidates.as_slice();
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(sizer.size().min(rest.len()));
            rest = after;
            let started = std::time::Instant::now();
            let _exclusive = self
                .gate
                .sweeping
                .write()
                .unwrap_or_else(|p| p.into_inner());
            // Writers first: one that commits its record and ends after this list was
            // taken is in it; one that ended before committed before the catalog is read.
            let writers = self.gate.live_writers();
            let changes = self.kv().catalog_changes()?;
            if changes.is_none() || changes != catalog_marked {
                let reader = self.reader()?;
                marker.mark_catalog(&reader)?;
                catalog_marked = changes;
                report.remarks += 1;
            }
            let mut doomed: Vec<Hash> = Vec::with_capacity(chunk.len());
            for hash in chunk {
                if marker.live.contains(hash) {
                    continue;
                }
                if in_flight(&writers, hash) {
                    report.objects_kept_in_flight += 1;
                    continue;
                }
                doomed.push(*hash);
            }
            let deleted = self.delete_entries(survey, doomed)?;
            for hash in deleted {
                report.objects_deleted += 1;
                report.bytes_deleted += survey.stored_bytes(&hash);
                gone.insert(hash);
            }
            drop(_exclusive);
            sizer.took(started.elapsed());
            std::thread::sleep(BATCH_PAUSE);
        }
        Ok(gone)
    }

    /// Deletes the entries of `doomed` that still hold their value of S, in one batch;
    /// returns those deleted.
    fn delete_entries(
        &self,
        survey: &Survey<'_>,
        mut doomed: Vec<Hash>,
    ) -> Result<Vec<Hash>, GcError> {
        for _ in 0..BATCH_ATTEMPTS_MAX {
            if doomed.is_empty() {
                return Ok(doomed);
            }
            let mut batch = WriteBatch::deferred();
            for hash in &doomed {
                let key = keys::object(hash);
                batch.check(key.clone(), survey.entries.get(hash).cloned())?;
                batch.delete(key)?;
            }
            match self.kv().commit(batch) {
                Ok(()) => return Ok(doomed),
                Err(KvError::Conflict { .. }) => {
                    // An entry changed since S (it cannot, but the check decides): keep
                    // those that did.
                    let snapshot = self.kv().snapshot()?;
                    let mut still = Vec::with_capacity(doomed.len());
                    for hash in doomed {
                        if snapshot.get(&keys::object(&hash))? == survey.entries.get(&hash).cloned()
                        {
                            still.push(hash);
                        }
                    }
                    doomed = still;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(Vec::new())
    }

    /// Deletes segments left without objects and repacks mostly dead ones.
    fn collect_segments(
        &self,
        survey: &Survey<'_>,
        gone: &HashSet<Hash>,
        options: &GcOptions,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut empty: Vec<SegmentId> = Vec::new();
        let mut sparse: Vec<(SegmentId, u64, u64)> = Vec::new();
        for (id, uses) in &survey.segments {
            let Some(bytes) = uses.bytes else { continue };
            if survey.in_flight_segments.contains(id) {
                continue;
            }
            let live = survey.live_bytes(id, uses, gone);
            if live == 0 {
                empty.push(*id);
            } else if live * 100 < bytes * REPACK_LIVE_PERCENT_MAX {
                sparse.push((*id, live, bytes));
            }
        }
        // The emptiest first: they free the most for the bytes copied.
        sparse.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)).then(a.0.cmp(&b.0)));
        let mut budget = options.max_repack_bytes;
        let mut chosen = Vec::new();
        for (id, live, _) in sparse {
            if live <= budget {
                budget -= live;
                chosen.push(id);
            } else {
                report.segments_repack_deferred += 1;
            }
        }
        if options.dry_run {
            report.segments_deleted = (empty.len() + chosen.len()) as u64;
            report.segments_repacked = chosen.len() as u64;
            // What a run copies: each live object of the chosen segments once, whole (an
            // object may lie partly in another segment).
            let mut copied: HashSet<Hash> = HashSet::new();
            for id in &chosen {
                if let Some(uses) = survey.segments.get(id) {
                    copied.extend(uses.objects.iter().filter(|hash| !gone.contains(hash)));
                }
            }
            report.bytes_repacked = copied.iter().map(|hash| survey.stored_bytes(hash)).sum();
            return Ok(());
        }
        let repacked = self.repack(survey, gone, &chosen, report)?;
        empty.extend(repacked);
        self.delete_segments(survey, &empty, report)
    }

    /// Copies the live objects of `chosen` segments into new ones; returns the segments
    /// whose objects all moved.
    fn repack(
        &self,
        survey: &Survey<'_>,
        gone: &HashSet<Hash>,
        chosen: &[SegmentId],
        report: &mut GcReport,
    ) -> Result<Vec<SegmentId>, GcError> {
        let reader = self.reader()?;
        let mut repack = Repack::new();
        let mut moved: Vec<SegmentId> = Vec::new();
        for id in chosen {
            let Some(uses) = survey.segments.get(id) else {
                continue;
            };
            let mut intact = true;
            for hash in uses.objects.iter().filter(|hash| !gone.contains(hash)) {
                if repack.olds.contains_key(hash) {
                    continue;
                }
                let Some(current) = reader.get(&keys::object(hash))? else {
                    continue;
                };
                let Some(value) = checked_value(&reader, hash, &current) else {
                    intact = false;
                    continue;
                };
                report.bytes_repacked += value.len() as u64;
                repack.olds.insert(*hash, current);
                let mut flushed = Flushed::default();
                repack.packer.append(*hash, &value, &mut flushed);
                repack.stage(flushed)?;
                if repack.batch.bytes() >= REPACK_BATCH_BYTES {
                    repack.commit(self)?;
                }
            }
            if intact {
                moved.push(*id);
                report.segments_repacked += 1;
            } else {
                report.segments_kept_damaged += 1;
            }
        }
        repack.commit(self)?;
        Ok(moved)
    }

    /// Deletes segments no index entry points into, each in a batch that checks the
    /// entries that pointed into it at S.
    fn delete_segments(
        &self,
        survey: &Survey<'_>,
        ids: &[SegmentId],
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut pending: Vec<SegmentId> = ids.to_vec();
        let mut conflicts = 0;
        let mut sizer = BatchSizer::new(DELETE_BATCH_SEGMENTS, 16 * DELETE_BATCH_SEGMENTS);
        while !pending.is_empty() && conflicts < BATCH_ATTEMPTS_MAX {
            let snapshot = self.kv().snapshot()?;
            let mut batch = WriteBatch::deferred();
            let mut in_batch: Vec<SegmentId> = Vec::new();
            let mut later: Vec<SegmentId> = Vec::new();
            for id in pending {
                if in_batch.len() >= sizer.size() {
                    later.push(id);
                    continue;
                }
                let Some(uses) = survey.segments.get(&id) else {
                    continue;
                };
                let mut still_used = false;
                let mut checks = Vec::with_capacity(uses.objects.len());
                for hash in &uses.objects {
                    let key = keys::object(hash);
                    let current = snapshot.get(&key)?;
                    if let Some(index) = &current
                        && pack::decode_index(index)
                            .is_ok_and(|parts| parts.iter().any(|part| part.segment == id))
                    {
                        still_used = true;
                        break;
                    }
                    checks.push((key, current));
                }
                if still_used {
                    continue;
                }
                for (key, current) in checks {
                    batch.check(key, current)?;
                }
                batch.delete(keys::segment(&id))?;
                in_batch.push(id);
            }
            let started = std::time::Instant::now();
            let committed = self.kv().commit(batch);
            sizer.took(started.elapsed());
            match committed {
                Ok(()) => report.segments_deleted += in_batch.len() as u64,
                Err(KvError::Conflict { .. }) => {
                    conflicts += 1;
                    later.extend(in_batch);
                }
                Err(error) => return Err(error.into()),
            }
            std::thread::sleep(BATCH_PAUSE);
            pending = later;
        }
        Ok(())
    }

    /// The store's figures: a survey and a mark, nothing written.
    pub fn figures(&self) -> Result<StoreFigures, GcError> {
        let started = std::time::Instant::now();
        let survey = Survey::take(self)?;
        let mut marker = Marker::default();
        marker.mark_catalog(&survey.reader)?;
        let unreachable: HashSet<Hash> = survey
            .entries
            .keys()
            .filter(|hash| !marker.live.contains(hash))
            .copied()
            .collect();
        let bytes_stored: u64 = survey
            .entries
            .keys()
            .map(|hash| survey.stored_bytes(hash))
            .sum();
        let mut bytes_segments = 0;
        let mut bytes_reclaimable = 0;
        let mut bytes_dead_kept = 0;
        for (id, uses) in &survey.segments {
            let Some(bytes) = uses.bytes else { continue };
            bytes_segments += bytes;
            if survey.in_flight_segments.contains(id) {
                continue;
            }
            // As `collect_segments` decides: empty segments go, sparse ones are repacked.
            let live = survey.live_bytes(id, uses, &unreachable);
            let dead = bytes.saturating_sub(live);
            if live == 0 || live * 100 < bytes * REPACK_LIVE_PERCENT_MAX {
                bytes_reclaimable += dead;
            } else {
                bytes_dead_kept += dead;
            }
        }
        let frames = marker.frames_walked.len() as u64;
        Ok(StoreFigures {
            replicas: marker.replicas,
            frames,
            objects: survey.entries.len() as u64,
            objects_reachable: (survey.entries.len() - unreachable.len()) as u64,
            bytes_raw: marker.bytes_raw,
            bytes_stored,
            bytes_segments,
            bytes_on_disk: self.size_bytes()?,
            dedup_ratio: if bytes_stored == 0 {
                0.0
            } else {
                ((marker.bytes_raw as f64 / bytes_stored as f64) * 100.0).round() / 100.0
            },
            bytes_reclaimable,
            bytes_dead_kept,
            bytes_dead_in_files: self.kv().dead_file_bytes()?,
            objects_reclaimable: unreachable.len() as u64,
            segments: survey
                .segments
                .values()
                .filter(|uses| uses.bytes.is_some())
                .count() as u64,
            dictionaries: dictionaries(&survey.reader)?,
            computed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

fn in_flight(writers: &[Arc<InFlight>], hash: &Hash) -> bool {
    writers.iter().any(|writer| {
        writer
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(hash)
    })
}

/// An object's stored value, if it matches its hash (a damaged one is never copied).
fn checked_value(reader: &Reader<'_>, hash: &Hash, index: &[u8]) -> Option<Vec<u8>> {
    let value = reader.gather(hash, ObjectKind::Blob, index).ok()?;
    let kind = value.get(1).copied().and_then(ObjectKind::from_byte)?;
    reader.decode(hash, kind, &value).ok()?;
    Some(value)
}

/// New segments being filled by a repack, and the entries they replace.
struct Repack {
    packer: Packer,
    batch: WriteBatch,
    /// The index entry each object had before it moved.
    olds: HashMap<Hash, Vec<u8>>,
}

impl Repack {
    fn new() -> Repack {
        Repack {
            packer: Packer::new(),
            batch: WriteBatch::deferred(),
            olds: HashMap::new(),
        }
    }

    fn stage(&mut self, flushed: Flushed) -> Result<(), GcError> {
        for (key, value) in flushed.puts {
            if let Some(hash) = key.strip_prefix(keys::OBJECT).and_then(Hash::from_slice) {
                self.batch
                    .check(key.clone(), self.olds.get(&hash).cloned())?;
            }
            self.batch.put(key, value)?;
        }
        Ok(())
    }

    /// Closes the open segment and commits the batch: new segments and switched entries
    /// land together, or (an entry changed meanwhile) not at all.
    fn commit(&mut self, store: &Store) -> Result<(), GcError> {
        let mut flushed = Flushed::default();
        self.packer.finish(&mut flushed);
        self.stage(flushed)?;
        self.packer = Packer::new();
        let batch = std::mem::replace(&mut self.batch, WriteBatch::deferred());
        if batch.is_empty() {
            return Ok(());
        }
        let committed = match store.kv().commit(batch) {
            Ok(()) | Err(KvError::Conflict { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        };
        std::thread::sleep(BATCH_PAUSE);
        committed
    }
}

/// Every stored dictionary, with the replica and version that name it.
fn dictionaries(reader: &Reader<'_>) -> Result<Vec<DictionaryFigures>, GcError> {
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for (key, value) in reader.scan_prefix(keys::DICTIONARY)? {
        if let Ok(id) = <[u8; 8]>::try_from(&key[keys::DICTIONARY.len()..]) {
            sizes.insert(u64::from_be_bytes(id), value.len() as u64);
        }
    }
    let mut out = Vec::new();
    for (key, value) in reader.scan_prefix(keys::DICTIONARY_VERSION)? {
        let rest = &key[keys::DICTIONARY_VERSION.len()..];
        let Some(split) = rest.iter().position(|&byte| byte == 0) else {
            continue;
        };
        let (Ok(version), Ok(id)) = (
            <[u8; 4]>::try_from(&rest[split + 1..]),
            <[u8; 8]>::try_from(value.as_slice()),
        ) else {
            continue;
        };
        out.push(DictionaryFigures {
            replica: String::from_utf8_lossy(&rest[..split]).into_owned(),
            version: u32::from_be_bytes(version),
            bytes: sizes.get(&u64::from_le_bytes(id)).copied().unwrap_or(0),
        });
    }
    Ok(out)
}

const _: () = assert!(SEGMENT_ID_BYTES == 16);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::FrameDraft;
    use crate::node::{DirEntry, Meta, Metrics, RuntimeNode};
    use crate::store::ObjectWriter;
    use kairos_core::{Instant, ReplicaDefinition};

    type Files = Vec<(String, Vec<u8>)>;

    /// A state of small files, written by `writer` (not committed).
    fn state(writer: &ObjectWriter, files: &[(String, Vec<u8>)]) -> Hash {
        let mut entries: Vec<DirEntry> = files
            .iter()
            .map(|(name, content)| DirEntry {
                name: name.as_bytes().to_vec(),
                meta: Meta::default(),
                body: Body::File {
                    content: Content::Blob {
                        hash: writer.put(ObjectKind::Blob, content).unwrap().0,
                    },
                    config: None,
                    torn: false,
                },
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let files_node = crate::tree::write_dir(writer, entries).unwrap();
        let runtime = writer
            .put(
                ObjectKind::Runtime,
                &crate::node::to_bytes(&RuntimeNode {
                    processes: Vec::new(),
                    metrics: Metrics::default(),
                }),
            )
            .unwrap();
        writer
            .put(
                ObjectKind::Root,
                &crate::node::to_bytes(&RootNode {
                    format: crate::node::ROOT_FORMAT,
                    replica: "web".into(),
                    captured_at_ns: 0,
                    files: files_node.0,
                    files_meta: Meta::default(),
                    file_entries: files.len() as u64,
                    file_bytes: files.iter().map(|(_, c)| c.len() as u64).sum(),
                    runtime: runtime.0,
                    notes: Vec::new(),
                }),
            )
            .unwrap()
    }

    fn commit(store: &Store, writer: &ObjectWriter, root: Hash, time: i64) -> Hash {
        writer.finish().unwrap();
        let parent = store.head("web", "main").unwrap().map(|frame| frame.id);
        store
            .commit_frame(FrameDraft {
                replica: "web".into(),
                timeline: "main".into(),
                time: Instant(time),
                parent,
                root,
                entries: 0,
                bytes: 1000,
                stats: crate::store::WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap()
            .id
    }

    fn files(seed: u64, count: usize) -> Vec<(String, Vec<u8>)> {
        (0..count)
            .map(|i| {
                let mut content = Vec::new();
                for word in 0..600u64 {
                    let value = blake3::hash(&(seed, i, word).0.to_le_bytes());
                    let _ = word;
                    content.extend_from_slice(&value.as_bytes()[..8]);
                }
                content.extend_from_slice(&(seed, i).1.to_le_bytes());
                (format!("file-{i:03}"), content)
            })
            .collect()
    }

    fn capture(store: &Store, content: &[(String, Vec<u8>)], time: i64) -> Hash {
        let writer = store.object_writer("web").unwrap();
        let root = state(&writer, content);
        commit(store, &writer, root, time)
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", dir.path().to_path_buf()))
            .unwrap();
        (dir, store)
    }

    fn verify_clean(store: &Store) {
        let report = store.verify().unwrap();
        assert!(report.ok, "{:?}", report.problems);
    }

    /// Every frame's files read back as written.
    fn frames_read_back(store: &Store, expected: &HashMap<Hash, Vec<(String, Vec<u8>)>>) {
        let reader = store.reader().unwrap();
        for (id, files) in expected {
            let Ok(frame) = store.frame(id) else { continue };
            let root: RootNode = reader.node(&frame.root, ObjectKind::Root).unwrap();
            for (name, content) in files {
                let entry = reader
                    .dir_lookup(&Hash(root.files), name.as_bytes())
                    .unwrap()
                    .unwrap();
                let Body::File {
                    content: Content::Blob { hash },
                    ..
                } = entry.body
                else {
                    panic!("not a blob")
                };
                assert_eq!(
                    &reader.object(&Hash(hash), ObjectKind::Blob).unwrap(),
                    content
                );
            }
        }
    }

    #[test]
    fn forgotten_frames_are_collected_and_kept_frames_stay_whole() {
        let (_dir, store) = open();
        let mut expected = HashMap::new();
        let mut ids = Vec::new();
        for round in 0..10 {
            let content = files(round, 20);
            let id = capture(&store, &content, round as i64 + 1);
            expected.insert(id, content);
            ids.push(id);
        }
        let before = store.figures().unwrap();
        assert_eq!(before.frames, 10);
        assert_eq!(before.objects_reclaimable, 0);
        store.forget_frames(&ids[..9]).unwrap();
        let figures = store.figures().unwrap();
        assert_eq!(figures.frames, 1);
        assert!(figures.objects_reclaimable >= 9 * 20, "{figures:?}");
        assert!(figures.bytes_reclaimable > 0);
        let dry = store
            .gc(&GcOptions {
                dry_run: true,
                ..GcOptions::default()
            })
            .unwrap();
        assert_eq!(dry.objects_deleted, figures.objects_reclaimable);
        // A dry run writes nothing.
        let unchanged = store.figures().unwrap();
        assert_eq!(
            (
                unchanged.objects,
                unchanged.segments,
                unchanged.bytes_stored
            ),
            (figures.objects, figures.segments, figures.bytes_stored)
        );
        let report = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(report.objects_deleted, dry.objects_deleted, "{report:?}");
        assert!(report.segments_deleted > 0, "{report:?}");
        let after = store.figures().unwrap();
        assert_eq!(after.objects_reclaimable, 0, "{after:?}");
        assert!(
            after.bytes_segments * 5 < before.bytes_segments,
            "{before:?} {after:?}"
        );
        verify_clean(&store);
        frames_read_back(&store, &expected);
        // A second run finds nothing more.
        let again = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(
            (again.objects_deleted, again.segments_deleted),
            (0, 0),
            "{again:?}"
        );
    }

    #[test]
    fn frames_forgotten_by_retention_rules_are_collected() {
        let (_dir, store) = open();
        let mut expected = HashMap::new();
        for round in 0..8 {
            let content = files(200 + round, 5);
            expected.insert(capture(&store, &content, round as i64 + 1), content);
        }
        let rules = [crate::retention::TimelineRule {
            timeline: "main".into(),
            policy: kairos_core::RetentionPolicy {
                keep_last: Some(2),
                ..Default::default()
            },
        }];
        let forgotten = store
            .forget("web", &rules, "kairos", Instant(100), false)
            .unwrap();
        assert_eq!(forgotten.frames_removed, 6);
        let report = store.gc(&GcOptions::default()).unwrap();
        assert!(report.objects_deleted >= 6 * 5, "{report:?}");
        assert_eq!(store.figures().unwrap().objects_reclaimable, 0);
        verify_clean(&store);
        frames_read_back(&store, &expected);
    }

    #[test]
    fn one_collection_at_a_time_and_figures_meanwhile() {
        let (_dir, store) = open();
        capture(&store, &files(1, 2), 1);
        let running = store.gate.collecting.lock().unwrap();
        let error = store.gc(&GcOptions::default()).unwrap_err();
        assert!(matches!(error, GcError::AlreadyRunning), "{error}");
        assert!(!error.is_corruption());
        assert_eq!(store.figures().unwrap().frames, 1, "figures need no turn");
        drop(running);
        store.gc(&GcOptions::default()).unwrap();
    }

    #[test]
    fn an_object_a_writer_reuses_during_a_collection_is_kept() {
        let (_dir, store) = open();
        let old = files(1, 3);
        let first = capture(&store, &old, 1);
        capture(&store, &files(2, 3), 2);
        store.forget_frames(&[first]).unwrap();
        // A writer reuses the forgotten frame's content (it is still stored): dead for the
        // catalog, in flight for the writer.
        let writer = store.object_writer("web").unwrap();
        let root = state(&writer, &old);
        let report = store.gc(&GcOptions::default()).unwrap();
        assert!(report.objects_kept_in_flight >= 3, "{report:?}");
        let id = commit(&store, &writer, root, 3);
        drop(writer);
        let report = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(report.objects_kept_in_flight, 0);
        verify_clean(&store);
        frames_read_back(&store, &HashMap::from([(id, old)]));
    }

    #[test]
    fn captures_racing_collections_lose_nothing() {
        let (_dir, store) = open();
        let store = Arc::new(store);
        let expected: Arc<Mutex<HashMap<Hash, Files>>> = Arc::default();
        let capturing = {
            let (store, expected) = (store.clone(), expected.clone());
            std::thread::spawn(move || {
                for time in 1..=60 {
                    // Content cycles through a few versions: captures reuse what forgotten
                    // frames held, the case a collection must not get wrong.
                    let content = files(time as u64 % 5, 8);
                    let id = capture(&store, &content, time);
                    expected.lock().unwrap().insert(id, content);
                    let history = store.history("web", "main").unwrap();
                    let forget: Vec<Hash> =
                        history.iter().rev().skip(2).map(|frame| frame.id).collect();
                    store.forget_frames(&forget).unwrap();
                }
            })
        };
        let mut deleted = 0;
        while !capturing.is_finished() {
            let report = store.gc(&GcOptions::default()).unwrap();
            deleted += report.objects_deleted;
        }
        capturing.join().unwrap();
        assert!(deleted > 0, "collections ran while frames were forgotten");
        store.gc(&GcOptions::default()).unwrap();
        verify_clean(&store);
        frames_read_back(&store, &expected.lock().unwrap());
    }

    #[test]
    fn a_damaged_node_stops_the_collection_before_anything_is_deleted() {
        let (_dir, store) = open();
        let first = capture(&store, &files(1, 3), 1);
        let head_content = files(2, 3);
        capture(&store, &head_content, 2);
        store.forget_frames(&[first]).unwrap();
        // Damage the head's root object: rewrite its index entry to point at another
        // object's bytes.
        let head = store.head("web", "main").unwrap().unwrap();
        let reader = store.reader().unwrap();
        let other = reader
            .scan_prefix(keys::OBJECT)
            .unwrap()
            .into_iter()
            .find(|(key, _)| key != &keys::object(&head.root))
            .unwrap();
        let mut batch = WriteBatch::new();
        batch.put(keys::object(&head.root), other.1).unwrap();
        store.kv().commit(batch).unwrap();
        let objects = store
            .reader()
            .unwrap()
            .scan_prefix(keys::OBJECT)
            .unwrap()
            .len();
        let error = store.gc(&GcOptions::default()).unwrap_err();
        assert!(error.is_corruption(), "{error}");
        assert!(error.to_string().contains("kairos verify"), "{error}");
        assert_eq!(
            store
                .reader()
                .unwrap()
                .scan_prefix(keys::OBJECT)
                .unwrap()
                .len(),
            objects,
            "nothing deleted"
        );
    }

    #[test]
    fn mostly_dead_segments_are_repacked_within_the_budget() {
        let (_dir, store) = open();
        // One writer lays many small objects into shared segments; forgetting most frames
        // leaves those segments mostly dead.
        let mut ids = Vec::new();
        let mut kept = Vec::new();
        for round in 0..12 {
            let content = files(100 + round, 6);
            let id = capture(&store, &content, round as i64 + 1);
            ids.push(id);
            kept = content;
        }
        let head = *ids.last().unwrap();
        store.forget_frames(&ids[..11]).unwrap();
        let none = store
            .gc(&GcOptions {
                dry_run: false,
                max_repack_bytes: 0,
            })
            .unwrap();
        assert_eq!(none.bytes_repacked, 0);
        let figures = store.figures().unwrap();
        let dry = store
            .gc(&GcOptions {
                dry_run: true,
                ..GcOptions::default()
            })
            .unwrap();
        let report = store.gc(&GcOptions::default()).unwrap();
        assert!(report.bytes_repacked > 0, "{report:?}");
        assert_eq!(
            (dry.segments_repacked, dry.bytes_repacked),
            (report.segments_repacked, report.bytes_repacked),
            "a dry run says what the run copies"
        );
        verify_clean(&store);
        frames_read_back(&store, &HashMap::from([(head, kept)]));
        let after = store.figures().unwrap();
        assert!(after.bytes_segments <= figures.bytes_segments, "{report:?}");
        // What the figures call reclaimable is what a collection frees: nothing is left
        // of it after one; dead space it keeps is named apart.
        assert_eq!(after.bytes_reclaimable, 0, "{after:?}");
        assert!(
            after.bytes_dead_kept * 2 <= after.bytes_segments,
            "{after:?}"
        );
    }

    #[test]
    fn batches_shrink_when_they_hold_the_lock_too_long_and_grow_back_within_bounds() {
        let mut sizer = BatchSizer::new(64, 256);
        sizer.took(BATCH_HOLD_TARGET * 5);
        assert_eq!(sizer.size(), 32);
        for _ in 0..10 {
            sizer.took(BATCH_HOLD_TARGET * 5);
        }
        assert_eq!(sizer.size(), 1, "never below one");
        sizer.took(BATCH_HOLD_TARGET * 3 / 4);
        assert_eq!(sizer.size(), 1, "a batch near the target keeps its size");
        for _ in 0..40 {
            sizer.took(std::time::Duration::ZERO);
        }
        assert_eq!(sizer.size(), 256, "never above the maximum");
    }

    /// `verify` while frames are committed: each frame it checks is one of the snapshot it
    /// read the objects from, so a frame committed meanwhile is never reported missing
    /// (it was, about one verify in two, and the store was then refused writes).
    #[test]
    fn verify_during_captures_reports_no_damage() {
        let (_dir, store) = open();
        let store = std::sync::Arc::new(store);
        for round in 0..3 {
            capture(&store, &files(round, 40), round as i64 + 1);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capturing = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 3u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    capture(&store, &files(round, 40), round as i64 + 1);
                    round += 1;
                }
                round
            })
        };
        for _ in 0..25 {
            verify_clean(&store);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = capturing.join().unwrap();
        assert!(rounds > 6, "captures ran meanwhile ({rounds})");
        verify_clean(&store);
    }
}
