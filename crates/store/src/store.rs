//! The store: objects (content-addressed, compressed, validated on read), the catalog of
//! replicas and frames, and the batching writer used by captures.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use kairos_core::{FdbLocation, Hash, StoreBackend};

use crate::catalog::CatalogError;
use crate::keys;
use crate::kv::{KvBackend, KvError, KvSnapshot, WriteBatch, scan_prefix};
use crate::object::{self, CodecError, Dictionary, ObjectKind};
use crate::pack::{self, Flushed, Packer};
use crate::redb_backend::RedbBackend;

/// The file name of the embedded store inside a data directory.
pub const STORE_FILE: &str = "kairos.redb";
/// Objects written by a capture are committed in batches of about this many bytes.
pub const WRITE_BATCH_BYTES: usize = 8 << 20;
/// Batches queued between compressing threads and the committing thread.
pub const WRITE_QUEUE_BATCHES: usize = 2;
/// Objects at most this large are compressed with the replica's dictionary.
pub const DICTIONARY_OBJECT_BYTES_MAX: usize = 16 << 10;
/// Trained dictionaries are at most this large.
pub const DICTIONARY_BYTES: usize = 64 << 10;
/// Samples kept for training: at most this many bytes...
pub const DICTIONARY_SAMPLE_BYTES_MAX: usize = 1 << 20;
/// ...and a dictionary is trained once at least this many samples exist.
pub const DICTIONARY_SAMPLES_MIN: usize = 256;
/// zstd level used for small objects (dictionary-sized: configs, directories, lists).
pub const COMPRESSION_LEVEL: i32 = 3;
/// zstd level for larger objects (file content): level 1 costs 7% less CPU per first
/// capture of the benchmark tree than level 3 and stores 0.25% more (BENCHMARKS.md).
pub const BULK_COMPRESSION_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("{kind} {hash} is missing from the store")]
    MissingObject { hash: Hash, kind: &'static str },
    #[error("{kind} {hash} is not valid: {problem}")]
    BadNode {
        hash: Hash,
        kind: &'static str,
        problem: String,
    },
    #[error("{kind} of {bytes} bytes is over the object limit of {max} bytes (split it)")]
    TooLarge {
        kind: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{what} {key} is corrupt: {problem}")]
    BadRecord {
        what: &'static str,
        key: String,
        problem: String,
    },
    /// The configuration asks for a backend this build does not include.
    #[error(
        "store backend {backend:?} is not in this build of kairos: build it with `--features {feature}` (for example `cargo build --release -p kairos-cli --features {feature}`)"
    )]
    BackendNotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
}

impl StoreError {
    /// Whether the error means stored data is damaged (as opposed to busy or missing input).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Codec(_)
                | StoreError::MissingObject { .. }
                | StoreError::BadNode { .. }
                | StoreError::BadRecord { .. }
                | StoreError::Kv(KvError::Corrupt { .. } | KvError::Damaged { .. })
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A content-addressed store over an ordered key-value backend.
pub struct Store {
    kv: Arc<dyn KvBackend>,
    dictionaries: RwLock<HashMap<u64, Arc<Dictionary>>>,
    nodes: Mutex<NodeCache>,
    /// What garbage collection must know of this process's writers (see `gc.rs`).
    pub(crate) gate: Arc<crate::gc::Gate>,
    /// Called after every catalog command this handle commits (see [`Store::on_change`]).
    listeners: Arc<RwLock<Vec<ChangeListener>>>,
    /// Where commands go when the catalog is replicated (see [`Store::route_commands`]).
    pub(crate) command_log: Arc<RwLock<Option<Arc<dyn CommandLog>>>>,
    /// Where objects missing here are fetched from (see [`Store::fetch_missing_from`]).
    object_source: Arc<RwLock<Option<Arc<dyn ObjectSource>>>>,
}

/// The replicated log that catalog commands go through when the node is a cluster member:
/// [`Store::submit`] hands it the command, and it answers once the command is applied on
/// this node (by the log's state machine, through [`Store::apply_entry`]).
pub trait CommandLog: Send + Sync {
    fn submit(
        &self,
        command: &crate::command::Command,
    ) -> std::result::Result<crate::command::Applied, CatalogError>;
}

/// Objects this store lacks, fetched elsewhere (the cluster's peers) by hash. The source
/// returns each object's content; the store checks it against the hash and keeps a copy.
pub trait ObjectSource: Send + Sync {
    /// The objects asked for that the source has, and with `closure` the objects below
    /// them (as many as the source sends at once).
    #[allow(clippy::type_complexity)]
    fn fetch(
        &self,
        wanted: &[(Hash, ObjectKind)],
        closure: bool,
    ) -> std::result::Result<Vec<(Hash, ObjectKind, Vec<u8>)>, String>;
}

/// A function told that the catalog changed (it must return quickly: it runs on the
/// writer's thread).
pub type ChangeListener = Arc<dyn Fn() + Send + Sync>;

/// Tree nodes kept decoded and verified after a read (content-addressed, so never stale):
/// sandboxes, diffs and listings of recent frames read the same directory nodes again and
/// again. File contents (blobs, chunks) are not kept.
pub const NODE_CACHE_BYTES_MAX: usize = 8 << 20;

#[derive(Default)]
struct NodeCache {
    map: HashMap<Hash, (ObjectKind, Arc<Vec<u8>>)>,
    order: std::collections::VecDeque<Hash>,
    bytes: usize,
}

impl NodeCache {
    fn get(&self, hash: &Hash, kind: ObjectKind) -> Option<Arc<Vec<u8>>> {
        self.map
            .get(hash)
            .filter(|(cached_kind, _)| *cached_kind == kind)
            .map(|(_, raw)| raw.clone())
    }

    fn insert(&mut self, hash: Hash, kind: ObjectKind, raw: Arc<Vec<u8>>) {
        if raw.len() > NODE_CACHE_BYTES_MAX / 64 || self.map.contains_key(&hash) {
            return;
        }
        self.bytes += raw.len();
        self.map.insert(hash, (kind, raw));
        self.order.push_back(hash);
        while self.bytes > NODE_CACHE_BYTES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some((_, raw)) = self.map.remove(&oldest) {
                self.bytes -= raw.len();
            }
        }
    }
}

#[cfg(feature = "foundationdb")]
fn open_foundationdb(location: &FdbLocation) -> Result<Store> {
    let backend = crate::fdb_backend::FdbBackend::open(location)?;
    Ok(Store::with_backend(Arc::new(backend)))
}

#[cfg(not(feature = "foundationdb"))]
fn open_foundationdb(_location: &FdbLocation) -> Result<Store> {
    Err(StoreError::BackendNotBuilt {
        backend: "foundationdb",
        feature: "foundationdb",
    })
}

fn is_tree_node(kind: ObjectKind) -> bool {
    matches!(
        kind,
        ObjectKind::Dir
            | ObjectKind::Root
            | ObjectKind::Config
            | ObjectKind::ChunkList
            | ObjectKind::Runtime
    )
}

impl Store {
    /// Calls `listener` after every catalog command committed through this handle (the
    /// node wakes its event feed with it).
    pub fn on_change(&self, listener: ChangeListener) {
        self.listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn has_object_source(&self) -> bool {
        self.object_source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Tells the change listeners that the catalog changed underneath (a cluster member
    /// installed a snapshot of it).
    pub fn catalog_replaced(&self) {
        self.changed();
    }

    pub(crate) fn changed(&self) {
        for listener in self
            .listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            listener();
        }
    }

    /// Opens (creating if needed) the embedded store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Store::open_with_cache(data_dir, crate::redb_backend::CACHE_BYTES_DEFAULT)
    }

    /// Opens the embedded store with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<Store> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| KvError::Io(format!("{}: {error}", data_dir.display())))?;
        let backend = RedbBackend::open_with_cache(&data_dir.join(STORE_FILE), cache_bytes)?;
        Ok(Store::with_backend(Arc::new(backend)))
    }

    /// Opens the store the configuration names: the embedded file in `data_dir` (with a
    /// page cache of at most `cache_bytes`) or a FoundationDB cluster.
    pub fn open_configured(
        data_dir: &Path,
        backend: &StoreBackend,
        cache_bytes: usize,
    ) -> Result<Store> {
        match backend {
            StoreBackend::Redb => Store::open_with_cache(data_dir, cache_bytes),
            StoreBackend::FoundationDb(location) => open_foundationdb(location),
        }
    }

    /// The local file the store keeps its data in (`None` for a remote backend).
    pub fn local_file(&self) -> Option<std::path::PathBuf> {
        self.kv.local_file()
    }

    pub fn with_backend(kv: Arc<dyn KvBackend>) -> Store {
        Store {
            kv,
            dictionaries: RwLock::new(HashMap::new()),
            nodes: Mutex::new(NodeCache::default()),
            gate: Arc::default(),
            listeners: Arc::default(),
            command_log: Arc::default(),
            object_source: Arc::default(),
        }
    }

    /// Another handle on the same store (same backend, writers' gate, listeners, command
    /// log and object source; caches of its own).
    pub fn share(&self) -> Store {
        Store {
            kv: self.kv.clone(),
            dictionaries: RwLock::new(HashMap::new()),
            nodes: Mutex::new(NodeCache::default()),
            gate: self.gate.clone(),
            listeners: self.listeners.clone(),
            command_log: self.command_log.clone(),
            object_source: self.object_source.clone(),
        }
    }

    /// From now on [`Store::submit`] hands every command to `log` (the cluster's
    /// replicated log) instead of committing it here; `None` goes back to committing here.
    pub fn route_commands(&self, log: Option<Arc<dyn CommandLog>>) {
        *self.command_log.write().unwrap_or_else(|p| p.into_inner()) = log;
    }

    /// From now on an object missing here is asked of `source` (checked against its
    /// hash and kept) before the read fails.
    pub fn fetch_missing_from(&self, source: Option<Arc<dyn ObjectSource>>) {
        *self
            .object_source
            .write()
            .unwrap_or_else(|p| p.into_inner()) = source;
    }

    /// Fetches missing objects from the object source (if any) and stores them here;
    /// returns the contents fetched (the source may send more than was asked: the
    /// objects below those asked for), each checked against its hash and kind.
    pub fn fetch_missing(
        &self,
        wanted: &[(Hash, ObjectKind)],
        closure: bool,
    ) -> Result<Vec<(Hash, ObjectKind, Vec<u8>)>> {
        let source = self
            .object_source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(source) = source else {
            return Ok(Vec::new());
        };
        let fetched = source
            .fetch(wanted, closure)
            .map_err(|problem| KvError::Io(format!("fetching objects from peers: {problem}")))?;
        let writer = self.object_writer_without_dictionary()?;
        for (hash, kind, raw) in &fetched {
            if object::object_hash(*kind, raw) != *hash {
                return Err(StoreError::BadNode {
                    hash: *hash,
                    kind: kind.name(),
                    problem: "a peer sent content that does not match its hash".into(),
                });
            }
            writer.put_hashed(*hash, *kind, raw)?;
        }
        writer.finish()?;
        Ok(fetched)
    }

    pub fn kv(&self) -> &Arc<dyn KvBackend> {
        &self.kv
    }

    pub fn size_bytes(&self) -> Result<u64> {
        Ok(self.kv.size_bytes()?)
    }

    /// A consistent reader of everything committed so far.
    pub fn reader(&self) -> Result<Reader<'_>> {
        Ok(Reader {
            store: self,
            snapshot: self.kv.snapshot()?,
            overlay: None,
        })
    }

    fn dictionary(&self, snapshot: &dyn KvSnapshot, id: u64) -> Result<Option<Arc<Dictionary>>> {
        if let Some(found) = self
            .dictionaries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
        {
            return Ok(Some(found.clone()));
        }
        let Some(bytes) = snapshot.get(&keys::dictionary(id))? else {
            return Ok(None);
        };
        if object::dictionary_id(&bytes) != id {
            return Err(StoreError::BadRecord {
                what: "dictionary",
                key: format!("{id:016x}"),
                problem: "content does not match its id".into(),
            });
        }
        let dictionary = Arc::new(Dictionary::new(bytes));
        self.dictionaries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, dictionary.clone());
        Ok(Some(dictionary))
    }

    /// The newest dictionary trained for `replica`, with its version.
    pub fn current_dictionary(&self, replica: &str) -> Result<Option<(u32, Arc<Dictionary>)>> {
        let snapshot = self.kv.snapshot()?;
        let prefix = keys::dictionary_version_prefix(replica);
        let Some(end) = crate::kv::prefix_end(&prefix) else {
            return Ok(None);
        };
        let last = snapshot.scan(
            std::ops::Bound::Included(prefix.as_slice()),
            std::ops::Bound::Excluded(end.as_slice()),
            1,
            true,
        )?;
        let Some((key, value)) = last.into_iter().next() else {
            return Ok(None);
        };
        let bad = |problem: &str| StoreError::BadRecord {
            what: "dictionary version",
            key: crate::kv::printable(&key),
            problem: problem.into(),
        };
        let version = key[prefix.len()..]
            .try_into()
            .map(u32::from_be_bytes)
            .map_err(|_| bad("key is malformed"))?;
        let id = value
            .as_slice()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| bad("value is not a dictionary id"))?;
        match self.dictionary(snapshot.as_ref(), id)? {
            Some(dictionary) => Ok(Some((version, dictionary))),
            None => Err(bad("names a dictionary that is not stored")),
        }
    }

    /// Stores the dictionary `writer` trained from its samples (if it had enough) as the
    /// next version of `replica`'s. Returns the version.
    pub fn save_dictionary(&self, replica: &str, writer: &ObjectWriter) -> Result<Option<u32>> {
        let Some(bytes) = writer.trained_dictionary() else {
            return Ok(None);
        };
        let version = self
            .current_dictionary(replica)?
            .map(|(version, _)| version + 1)
            .unwrap_or(1);
        let id = object::dictionary_id(&bytes);
        let mut batch = WriteBatch::new();
        batch.put(keys::dictionary(id), bytes)?;
        batch.check(keys::dictionary_version(replica, version), None)?;
        batch.put(
            keys::dictionary_version(replica, version),
            id.to_le_bytes().to_vec(),
        )?;
        self.kv.commit(batch)?;
        Ok(Some(version))
    }

    /// A writer of objects compressed without any dictionary (used by `repair`).
    pub fn object_writer_without_dictionary(&self) -> Result<ObjectWriter> {
        ObjectWriter::start(self.kv.clone(), None, self.gate.register())
    }

    /// A writer of objects for one capture of `replica`.
    pub fn object_writer(&self, replica: &str) -> Result<ObjectWriter> {
        let dictionary = self.current_dictionary(replica)?.map(|(_, d)| d);
        ObjectWriter::start(self.kv.clone(), dictionary, self.gate.register())
    }
}

/// Reads objects and records from one consistent snapshot, validating everything.
pub struct Reader<'s> {
    store: &'s Store,
    snapshot: Box<dyn KvSnapshot>,
    overlay: Option<Overlay>,
}

/// Objects an [`ObjectWriter`] wrote and has not committed yet, readable by a [`Reader`]
/// made [`Reader::with_overlay`]: an edit reads back what it just wrote.
pub type Overlay = Arc<Mutex<HashMap<Hash, (ObjectKind, Arc<Vec<u8>>)>>>;

/// An object put while writes are deferred: stored by `finish`.
type DeferredObject = (Hash, ObjectKind, Arc<Vec<u8>>);

impl<'s> Reader<'s> {
    /// This reader, also seeing the objects `overlay` holds.
    pub fn with_overlay(mut self, overlay: Overlay) -> Reader<'s> {
        self.overlay = Some(overlay);
        self
    }
}

impl Reader<'_> {
    pub fn snapshot(&self) -> &dyn KvSnapshot {
        self.snapshot.as_ref()
    }

    pub fn has_object(&self, hash: &Hash) -> Result<bool> {
        Ok(self.snapshot.contains(&keys::object(hash))?)
    }

    /// The content of object `hash`, checked against its hash.
    pub fn object(&self, hash: &Hash, kind: ObjectKind) -> Result<Vec<u8>> {
        if let Some(overlay) = &self.overlay {
            let found = overlay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(hash)
                .cloned();
            if let Some((stored_kind, raw)) = found {
                if stored_kind != kind {
                    return Err(StoreError::BadNode {
                        hash: *hash,
                        kind: kind.name(),
                        problem: format!("was written as a {}", stored_kind.name()),
                    });
                }
                return Ok(raw.as_ref().clone());
            }
        }
        let cacheable = is_tree_node(kind);
        if cacheable {
            let cached = self
                .store
                .nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(hash, kind);
            if let Some(raw) = cached {
                return Ok(raw.as_ref().clone());
            }
        }
        let raw = match self.stored_value(hash, kind) {
            Ok(value) => self.decode(hash, kind, &value)?,
            Err(StoreError::MissingObject { .. }) if self.store.has_object_source() => {
                let fetched = self.store.fetch_missing(&[(*hash, kind)], true)?;
                match fetched
                    .into_iter()
                    .find(|(found, found_kind, _)| found == hash && *found_kind == kind)
                {
                    Some((_, _, raw)) => raw,
                    None => {
                        return Err(StoreError::MissingObject {
                            hash: *hash,
                            kind: kind.name(),
                        });
                    }
                }
            }
            Err(error) => return Err(error),
        };
        if cacheable {
            self.store
                .nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*hash, kind, Arc::new(raw.clone()));
        }
        Ok(raw)
    }

    /// The encoded value of object `hash`, gathered from its segments.
    pub fn stored_value(&self, hash: &Hash, kind: ObjectKind) -> Result<Vec<u8>> {
        let key = keys::object(hash);
        let Some(index) = self.snapshot.get(&key)? else {
            return Err(StoreError::MissingObject {
                hash: *hash,
                kind: kind.name(),
            });
        };
        self.gather(hash, kind, &index)
    }

    /// Hands the content of an object to `use_bytes` without copying it where it can: an
    /// object stored uncompressed is checked against its hash and lent from the stored
    /// value (restore writes it straight into the file). Otherwise as [`Reader::object`].
    pub fn with_object<R>(
        &self,
        hash: &Hash,
        kind: ObjectKind,
        use_bytes: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        if self.overlay.is_some() || is_tree_node(kind) {
            return Ok(use_bytes(&self.object(hash, kind)?));
        }
        let value = match self.stored_value(hash, kind) {
            Ok(value) => value,
            Err(StoreError::MissingObject { .. }) if self.store.has_object_source() => {
                return Ok(use_bytes(&self.object(hash, kind)?));
            }
            Err(error) => return Err(error),
        };
        match object::stored_raw(*hash, kind, &value)? {
            Some(raw) => Ok(use_bytes(raw)),
            None => Ok(use_bytes(&self.decode(hash, kind, &value)?)),
        }
    }

    /// The encoded value an index entry points at.
    pub fn gather(&self, hash: &Hash, kind: ObjectKind, index: &[u8]) -> Result<Vec<u8>> {
        let bad = |problem: String| StoreError::BadNode {
            hash: *hash,
            kind: kind.name(),
            problem,
        };
        let parts = pack::decode_index(index).map_err(bad)?;
        if let [part] = parts.as_slice() {
            // One part (most objects): the slice read is the value, no second copy.
            let segment = keys::segment(&part.segment);
            return self
                .snapshot
                .get_slice(&segment, part.offset as usize, part.len as usize)?
                .ok_or_else(|| {
                    bad(format!(
                        "segment {} is missing or shorter than its index says",
                        crate::kv::printable(&part.segment)
                    ))
                });
        }
        let mut value = Vec::with_capacity(parts.iter().map(|p| p.len as usize).sum());
        for part in parts {
            let segment = keys::segment(&part.segment);
            match self
                .snapshot
                .get_slice(&segment, part.offset as usize, part.len as usize)?
            {
                Some(bytes) => value.extend_from_slice(&bytes),
                None => {
                    return Err(bad(format!(
                        "segment {} is missing or shorter than its index says",
                        crate::kv::printable(&part.segment)
                    )));
                }
            }
        }
        Ok(value)
    }

    /// Decodes a stored value read elsewhere (for example, by a scan).
    pub fn decode(&self, hash: &Hash, kind: ObjectKind, value: &[u8]) -> Result<Vec<u8>> {
        let dictionary = match object::needed_dictionary(value) {
            Some(id) => self.store.dictionary(self.snapshot.as_ref(), id)?,
            None => None,
        };
        Ok(object::decode(*hash, kind, value, dictionary.as_deref())?)
    }

    /// A node, validated as an rkyv archive of `T` after its hash is checked.
    pub fn node<T>(&self, hash: &Hash, kind: ObjectKind) -> Result<T>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let bytes = self.object(hash, kind)?;
        crate::node::from_bytes(&bytes).map_err(|problem| StoreError::BadNode {
            hash: *hash,
            kind: kind.name(),
            problem,
        })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snapshot.get(key)?)
    }

    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(scan_prefix(self.snapshot.as_ref(), prefix, 1024)?)
    }
}

/// Figures about what a writer stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Objects newly stored.
    pub objects_new: u64,
    /// Objects that were already stored (deduplicated).
    pub objects_reused: u64,
    /// Content bytes of new objects before compression.
    pub bytes_raw: u64,
    /// Bytes of new objects as stored.
    pub bytes_stored: u64,
}

/// Writes objects from many threads: each caller hashes and compresses, a background
/// thread commits full batches in order. Objects already stored are skipped.
pub struct ObjectWriter {
    kv: Arc<dyn KvBackend>,
    dictionary: Option<Arc<Dictionary>>,
    /// This writer's objects and segments, seen by garbage collection until the writer is
    /// dropped: keep a writer until the catalog record naming its objects is committed.
    in_flight: crate::gc::Registration,
    pending: Mutex<Pending>,
    sender: Mutex<Option<SyncSender<WriteBatch>>>,
    receiver: Mutex<Option<std::sync::mpsc::Receiver<WriteBatch>>>,
    committer: Mutex<Option<JoinHandle<Result<(), KvError>>>>,
    /// Objects whose encoding waits for `finish` (see [`ObjectWriter::defer_writes`]).
    deferred: Mutex<Option<Vec<DeferredObject>>>,
    failure: Arc<Mutex<Option<String>>>,
    samples: Mutex<Samples>,
    overlay: Mutex<Option<Overlay>>,
    objects_new: AtomicU64,
    objects_reused: AtomicU64,
    bytes_raw: AtomicU64,
    bytes_stored: AtomicU64,
}

struct Pending {
    packer: Packer,
    batch: WriteBatch,
}

#[derive(Default)]
struct Samples {
    items: Vec<Vec<u8>>,
    bytes: usize,
    /// The dictionary being trained from the samples since their budget filled up (on
    /// its own thread, while the capture goes on); no sample is added meanwhile.
    training: Option<JoinHandle<Option<Vec<u8>>>>,
}

/// Trains a dictionary from `samples`; `None` when they are too few or training fails.
fn train(samples: &[Vec<u8>]) -> Option<Vec<u8>> {
    if samples.len() < DICTIONARY_SAMPLES_MIN {
        return None;
    }
    zstd::dict::from_samples(samples, DICTIONARY_BYTES).ok()
}

impl ObjectWriter {
    fn start(
        kv: Arc<dyn KvBackend>,
        dictionary: Option<Arc<Dictionary>>,
        in_flight: crate::gc::Registration,
    ) -> Result<ObjectWriter> {
        // The committing thread starts with the first full batch: a writer that stores
        // nothing new (or only at `finish`) costs no thread.
        let (sender, receiver) = sync_channel::<WriteBatch>(WRITE_QUEUE_BATCHES);
        let failure = Arc::new(Mutex::new(None));
        Ok(ObjectWriter {
            kv,
            dictionary,
            in_flight,
            pending: Mutex::new(Pending {
                packer: Packer::new(),
                batch: WriteBatch::deferred(),
            }),
            sender: Mutex::new(Some(sender)),
            receiver: Mutex::new(Some(receiver)),
            committer: Mutex::new(None),
            deferred: Mutex::new(None),
            failure,
            samples: Mutex::new(Samples::default()),
            overlay: Mutex::new(None),
            objects_new: AtomicU64::new(0),
            objects_reused: AtomicU64::new(0),
            bytes_raw: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
        })
    }

    /// Stores `raw` as an object of `kind` (unless already stored) and returns its hash.
    pub fn put(&self, kind: ObjectKind, raw: &[u8]) -> Result<Hash> {
        let hash = object::object_hash(kind, raw);
        self.put_hashed(hash, kind, raw)?;
        Ok(hash)
    }

    /// From now on, keeps a copy of each new object in the returned overlay, so that a
    /// reader made [`Reader::with_overlay`] sees them before they are committed.
    pub fn keep_written(&self) -> Overlay {
        self.overlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Overlay::default)
            .clone()
    }

    /// Keeps every new object in the returned overlay and leaves its encoding and storing
    /// to [`ObjectWriter::finish`]: the objects are readable (through a reader made
    /// [`Reader::with_overlay`]) as soon as they are put, and cost only a hash until then.
    /// For edits that may be thrown away (a proposal's validation) or read at once (a sandbox).
    pub fn defer_writes(&self) -> Overlay {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Vec::new);
        self.keep_written()
    }

    /// Like [`ObjectWriter::put`] when the caller already computed the hash.
    pub fn put_hashed(&self, hash: Hash, kind: ObjectKind, raw: &[u8]) -> Result<()> {
        if raw.len() > object::OBJECT_RAW_BYTES_MAX {
            return Err(StoreError::TooLarge {
                kind: kind.name(),
                bytes: raw.len(),
                max: object::OBJECT_RAW_BYTES_MAX,
            });
        }
        {
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(deferred) = deferred.as_mut() {
                let raw = Arc::new(raw.to_vec());
                self.remember(hash, kind, || raw.clone());
                deferred.push((hash, kind, raw));
                return Ok(());
            }
        }
        self.store_object(hash, kind, raw)
    }

    /// Keeps an object in the overlay, when there is one.
    fn remember(&self, hash: Hash, kind: ObjectKind, raw: impl FnOnce() -> Arc<Vec<u8>>) {
        if let Some(overlay) = self
            .overlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            overlay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(hash)
                .or_insert_with(|| (kind, raw()));
        }
    }

    fn store_object(&self, hash: Hash, kind: ObjectKind, raw: &[u8]) -> Result<()> {
        self.remember(hash, kind, || Arc::new(raw.to_vec()));
        if let Some(failure) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(KvError::Io(failure).into());
        }
        {
            // Garbage collection sweeps while holding the gate exclusively: the object is
            // either in this writer's set before a sweep looks, or found absent (and written
            // again) after the sweep removed it.
            let _sweeps_wait = self.in_flight.gate_shared();
            if !self.in_flight.note_object(hash) {
                self.objects_reused.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let key = keys::object(&hash);
            // A fresh snapshot each time: holding one for a whole capture would keep the
            // backend from reusing pages freed meanwhile.
            if self.kv.snapshot()?.contains(&key)? {
                self.objects_reused.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let small = raw.len() <= DICTIONARY_OBJECT_BYTES_MAX && kind != ObjectKind::Chunk;
        let dictionary = if small {
            self.dictionary.as_deref()
        } else {
            None
        };
        let level = if small {
            COMPRESSION_LEVEL
        } else {
            BULK_COMPRESSION_LEVEL
        };
        let value = object::encode(kind, raw, level, dictionary);
        if small && self.dictionary.is_none() {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            let training = samples.training.is_some();
            if !training && samples.bytes + raw.len() <= DICTIONARY_SAMPLE_BYTES_MAX {
                samples.bytes += raw.len();
                samples.items.push(raw.to_vec());
            } else if !training && samples.items.len() >= DICTIONARY_SAMPLES_MIN {
                // The budget is full: training starts now, beside the capture, instead of
                // after it.
                let items = std::mem::take(&mut samples.items);
                samples.training = std::thread::Builder::new()
                    .name("kairos-dictionary".into())
                    .spawn(move || train(&items))
                    .ok();
            }
        }
        self.objects_new.fetch_add(1, Ordering::Relaxed);
        self.bytes_raw
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        self.bytes_stored
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut flushed = Flushed::default();
        pending
            .packer
            .append_pieces(hash, &value.parts(), &mut flushed);
        self.stage(&mut pending, flushed, false)
    }

    /// Adds packed segments and index entries to the batch; sends the batch when full
    /// (or when `last`). Segments precede the index entries that point into them.
    fn stage(&self, pending: &mut Pending, flushed: Flushed, last: bool) -> Result<()> {
        for (key, value) in flushed.puts {
            if let Some(id) = key.strip_prefix(keys::SEGMENT) {
                self.in_flight.note_segment(id);
            }
            if pending.batch.bytes() + key.len() + value.len() > crate::kv::BATCH_BYTES_MAX {
                let full = std::mem::replace(&mut pending.batch, WriteBatch::deferred());
                self.send(full)?;
            }
            pending.batch.put(key, value)?;
        }
        if pending.batch.bytes() >= WRITE_BATCH_BYTES || (last && !pending.batch.is_empty()) {
            let full = std::mem::replace(&mut pending.batch, WriteBatch::deferred());
            self.send(full)?;
        }
        Ok(())
    }

    /// Starts the committing thread if it is not running yet.
    fn ensure_committer(&self) -> Result<()> {
        let Some(receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let committing = self.kv.clone();
        let failure_seen = self.failure.clone();
        let committer = std::thread::Builder::new()
            .name("kairos-object-writer".into())
            .spawn(move || {
                for batch in receiver {
                    if let Err(error) = committing.commit(batch) {
                        *failure_seen.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(error.to_string());
                        return Err(error);
                    }
                }
                Ok(())
            })
            .map_err(|error| KvError::Io(format!("starting the object writer: {error}")))?;
        *self.committer.lock().unwrap_or_else(|p| p.into_inner()) = Some(committer);
        Ok(())
    }

    fn send(&self, batch: WriteBatch) -> Result<()> {
        self.ensure_committer()?;
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match sender {
            Some(sender) if sender.send(batch).is_ok() => Ok(()),
            _ => Err(self.committer_error()),
        }
    }

    fn committer_error(&self) -> StoreError {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        KvError::Io(failure.unwrap_or_else(|| "the object writer stopped".into())).into()
    }

    /// Commits everything written so far (not yet durably: the frame commit that follows is
    /// durable and makes these batches durable with it) and returns what was stored.
    pub fn finish(&self) -> Result<WriteStats> {
        let deferred = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for (hash, kind, raw) in deferred.into_iter().flatten() {
            self.store_object(hash, kind, &raw)?;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut flushed = Flushed::default();
            pending.packer.finish(&mut flushed);
            self.stage(&mut pending, flushed, true)?;
        }
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(
            self.receiver
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(committer) = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            match committer.join() {
                Ok(result) => result?,
                Err(_) => return Err(self.committer_error()),
            }
        }
        Ok(self.stats())
    }

    pub fn stats(&self) -> WriteStats {
        WriteStats {
            objects_new: self.objects_new.load(Ordering::Relaxed),
            objects_reused: self.objects_reused.load(Ordering::Relaxed),
            bytes_raw: self.bytes_raw.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
        }
    }

    /// A dictionary trained from the small objects this writer saw (`None`: too few, or
    /// the writer had a dictionary already). Waits for a training under way.
    pub fn trained_dictionary(&self) -> Option<Vec<u8>> {
        let (training, items) = {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            (samples.training.take(), std::mem::take(&mut samples.items))
        };
        match training {
            Some(training) => training.join().ok().flatten(),
            None => train(&items),
        }
    }

    pub fn has_dictionary(&self) -> bool {
        self.dictionary.is_some()
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        drop(
            self.receiver
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(committer) = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = committer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_backend_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_configured(dir.path(), &StoreBackend::Redb, 1 << 20).unwrap();
        drop(store);
        assert!(dir.path().join(STORE_FILE).exists());
    }

    #[cfg(not(feature = "foundationdb"))]
    #[test]
    fn foundationdb_without_the_feature_names_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        let location = FdbLocation {
            cluster_file: None,
            key_prefix: "kairos".into(),
        };
        let error = Store::open_configured(dir.path(), &StoreBackend::FoundationDb(location), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("--features foundationdb"), "{error}");
        assert!(!dir.path().join(STORE_FILE).exists());
    }
}
