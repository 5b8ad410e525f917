//! The embedded backend: one redb file, fsync on every durable commit. One process holds
//! the file at a time; another waits for it (up to ten seconds) before reporting it busy.
//!
//! Damage is never trusted and never written over:
//! - a new store is created only when the file does not exist; an empty or unopenable file,
//!   or one whose table is gone while its catalog copy has records, is reported corrupt;
//! - a file that was not closed cleanly is checked (redb's integrity check, on an overlay
//!   that never writes to the file) before redb's crash recovery is allowed to write to it;
//! - every call into redb is guarded ([`crate::guard`]): a panic on a damaged page becomes a
//!   `corrupt` error and poisons the handle, which is never used again and is closed
//!   without a write;
//! - corruption found by any read leaves a damage marker beside the file
//!   (`kairos.damaged`); while it exists every write is refused until `kairos repair` runs;
//! - every committed change to catalog keys is also appended to the catalog copy
//!   ([`crate::catalog_copy`]) so a damaged file never makes every frame unreachable.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::ManuallyDrop;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Durability, ReadOnlyTable, ReadableDatabase,
    ReadableTable, StorageError, TableDefinition, TableError, TransactionError,
};

use crate::catalog_copy::{self, CatalogCopyWriter, is_catalog_key};
use crate::guard::catch_panic;
use crate::keys;
use crate::kv::{
    CatalogComparison, KvBackend, KvError, KvSnapshot, Mutation, Pairs, WriteBatch, printable,
};
use crate::packfile::{self, Locator, PackRecord, PackView, Packs};
use crate::redb_check::{self, Recovery};

/// The one table of a store file.
pub const TABLE_NAME: &str = "kairos";
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new(TABLE_NAME);
/// Facts about the store kept outside its key space: the catalog sequence, the number of
/// committed batches that changed catalog keys (the catalog copy records it too, so the
/// two can be compared exactly).
/// Calls of redb's `compact` at most, per compaction.
const COMPACT_ROUNDS_MAX: usize = 64;
const META: TableDefinition<&str, u64> = TableDefinition::new("kairos-meta");
const CATALOG_SEQUENCE: &str = "catalog-sequence";
/// The id naming the store's pack directory ([`packfile::packs_dir`]).
const PACKS_ID: &str = "packs-id";
/// Segment key → locator of its bytes in a pack file ([`packfile`]). Segments written
/// before pack files existed stay in [`TABLE`] and are read from there.
const PACKED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kairos-packed");
/// Pack number → its record (live bytes, committed end).
const PACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("kairos-packs");
/// The environment variable that sets the bytes after which a new pack starts (tests;
/// default [`packfile::PACK_BYTES_TARGET`]).
pub const PACK_BYTES_ENV: &str = "KAIROS_PACK_BYTES";
/// Bytes of segments moved out of packs worth compacting per transaction.
const MOVE_CHUNK_BYTES: usize = 256 << 10;
/// Pause between those transactions (captures' commits go first) at least...
const MOVE_PAUSE: Duration = Duration::from_millis(1);
/// ...and this many times as long as the transaction took.
const MOVE_PACE: u32 = 4;
/// The page cache used unless another size is asked for.
pub const CACHE_BYTES_DEFAULT: usize = 64 << 20;
/// How long opening waits for another process that holds the file.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Page cache of the read-only open that looks at a file before it is opened for writing.
const PRECHECK_CACHE_BYTES: usize = 1 << 20;
/// Pairs read per scan while rewriting the catalog copy.
const CATALOG_SCAN_PAGE: usize = 4096;

/// The damage marker of the store file at `store_path`: present while damage found by a
/// check or a read has not been repaired.
pub fn damage_marker_path(store_path: &Path) -> PathBuf {
    store_path.with_extension("damaged")
}

/// What the last check found wrong with the store file at `store_path`, if anything.
pub fn recorded_damage(store_path: &Path) -> Option<String> {
    std::fs::read_to_string(damage_marker_path(store_path))
        .ok()
        .map(|text| text.trim().to_string())
}

/// Health of one opened file, shared with its snapshots.
#[derive(Debug)]
struct Health {
    path: PathBuf,
    /// A redb call panicked: the handle is never used again.
    poisoned: AtomicBool,
    /// Whether damage found is recorded in the marker file and a panic poisons the handle
    /// (not for read-only recovery views, which never write, keep reading after a panic and
    /// trust nothing they read that fails its hash check).
    records_damage: bool,
}

impl Health {
    fn corrupt(&self, reason: String) -> KvError {
        if self.records_damage {
            record_damage(&self.path, &reason);
        }
        KvError::Corrupt {
            path: self.path.display().to_string(),
            reason,
        }
    }

    /// Runs one redb operation: a panic poisons the handle and becomes a `corrupt` error;
    /// a `corrupt` error is recorded as damage.
    fn guard<T>(
        &self,
        what: impl FnOnce() -> String,
        operation: impl FnOnce() -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(KvError::Corrupt {
                path: self.path.display().to_string(),
                reason:
                    "an earlier read hit a damaged page; run `kairos verify`, then `kairos repair`"
                        .into(),
            });
        }
        match catch_panic(operation) {
            Ok(Err(KvError::Corrupt { path, reason })) => {
                if self.records_damage {
                    record_damage(&self.path, &reason);
                }
                Err(KvError::Corrupt { path, reason })
            }
            Ok(result) => result,
            Err(panic) => {
                if self.records_damage {
                    self.poisoned.store(true, Ordering::Release);
                }
                Err(self.corrupt(format!(
                    "{}: redb stopped on a damaged page: {panic}",
                    what()
                )))
            }
        }
    }

    fn storage(&self, error: StorageError) -> KvError {
        storage_error(&self.path, error)
    }
}

/// Writes the damage marker (best effort: the marker is a courtesy to the next command,
/// the error that reports the damage is returned either way).
fn record_damage(store_path: &Path, reason: &str) {
    let marker = damage_marker_path(store_path);
    if !marker.exists() {
        let _ = std::fs::write(marker, format!("{reason}\n"));
    }
}

pub struct RedbBackend {
    /// Closed by hand (see `Drop`): a poisoned handle must be closed without writing.
    database: ManuallyDrop<Database>,
    health: Arc<Health>,
    /// The catalog copy, behind the lock that orders catalog commits (`None`: read-only).
    catalog_copy: Option<Mutex<CatalogCopyWriter>>,
    /// Whether the last commit was not durable (see `Drop`: a handle closed after one
    /// makes one durable commit, so the next open finds a clean file, not one to repair).
    unsynced: AtomicBool,
    /// The pack files holding the store's segments.
    packs: Arc<Packs>,
}

fn is_segment_key(key: &[u8]) -> bool {
    key.starts_with(keys::SEGMENT)
}

enum Existing {
    /// The file does not exist: a new store.
    New,
    /// The file exists; whether its table must be created (a store created by a process that
    /// stopped before its first commit).
    Store { create_table: bool },
}

impl RedbBackend {
    /// Opens the store file at `path`, creating it only if it does not exist.
    pub fn open(path: &Path) -> Result<RedbBackend, KvError> {
        RedbBackend::open_with_cache(path, CACHE_BYTES_DEFAULT)
    }

    /// Opens with a page cache of at most `cache_bytes` (memory stays bounded however
    /// large the store grows).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<RedbBackend, KvError> {
        let health = Arc::new(Health {
            path: path.to_path_buf(),
            poisoned: AtomicBool::new(false),
            records_damage: true,
        });
        let existing = precheck(&health)?;
        let database = health.guard(
            || "opening".into(),
            || {
                let started = Instant::now();
                loop {
                    let mut builder = Builder::new();
                    builder.set_concurrency_mode(ConcurrencyMode::ExclusiveWriter);
                    builder.set_cache_size(cache_bytes);
                    match builder.create(path) {
                        Ok(database) => return Ok(database),
                        Err(DatabaseError::DatabaseAlreadyOpen)
                            if started.elapsed() < OPEN_WAIT =>
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(error) => return Err(database_error(path, error)),
                    }
                }
            },
        )?;
        let backend = RedbBackend {
            database: ManuallyDrop::new(database),
            health,
            catalog_copy: None,
            unsynced: AtomicBool::new(false),
            packs: Arc::new(Packs::none()),
        };
        let copy_path = catalog_copy::copy_path(path);
        if matches!(
            existing,
            Existing::New | Existing::Store { create_table: true }
        ) {
            backend.health.guard(
                || "creating the table".into(),
                || {
                    let txn = backend.database.begin_write().map_err(|e| backend.txn(e))?;
                    txn.open_table(TABLE)
                        .map_err(|error| table_error(&backend.health, error))?;
                    txn.commit().map_err(|e| backend.commit_error(e))
                },
            )?;
        }
        let writer = match existing {
            Existing::New => CatalogCopyWriter::missing(&copy_path),
            Existing::Store { .. } => {
                // The store's sequence, unless the store is known to be damaged (its copy is
                // then what repair reads, and is left whole).
                let sequence = recorded_damage(path)
                    .is_none()
                    .then(|| backend.catalog_sequence().ok())
                    .flatten();
                CatalogCopyWriter::open(&copy_path, sequence)
                    .unwrap_or_else(|| CatalogCopyWriter::missing(&copy_path))
            }
        };
        let mut backend = backend;
        backend.catalog_copy = Some(Mutex::new(writer));
        backend.open_packs()?;
        if recorded_damage(path).is_none() {
            backend.write_copy_if_missing()?;
        }
        Ok(backend)
    }

    /// Opens the store's pack files: an intact store gets its pack directory id if it has
    /// none yet, and loses what no durable commit refers to (see [`Packs::open_writable`]);
    /// a store with recorded damage only reads them.
    fn open_packs(&mut self) -> Result<(), KvError> {
        let damaged = recorded_damage(&self.health.path).is_some();
        let mut id = self.packs_id()?;
        if id.is_none() && !damaged {
            let new = packfile::new_packs_id();
            self.health.guard(
                || "recording the pack directory".into(),
                || {
                    let txn = self.database.begin_write().map_err(|e| self.txn(e))?;
                    txn.open_table(META)
                        .map_err(|error| table_error(&self.health, error))?
                        .insert(PACKS_ID, new)
                        .map_err(|error| self.health.storage(error))?;
                    txn.commit().map_err(|e| self.commit_error(e))
                },
            )?;
            id = Some(new);
        }
        let Some(id) = id else {
            return Ok(());
        };
        let dir = packfile::packs_dir(&self.health.path, id);
        let packs = if damaged {
            Packs::open_read_only(&dir)
        } else {
            let records = self.pack_records()?;
            Packs::open_writable(&dir, &records)
        }
        .map_err(KvError::Io)?;
        // Tests make stores of many packs from little data.
        if let Some(bytes) = std::env::var(PACK_BYTES_ENV)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .filter(|bytes| *bytes > 0)
        {
            packs.set_target(bytes);
        }
        self.packs = Arc::new(packs);
        Ok(())
    }

    /// The id of the store's pack directory, if it has one.
    fn packs_id(&self) -> Result<Option<u64>, KvError> {
        self.health.guard(
            || "reading the pack directory id".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let meta = match txn.open_table(META) {
                    Ok(meta) => meta,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                Ok(meta
                    .get(PACKS_ID)
                    .map_err(|error| self.health.storage(error))?
                    .map(|value| value.value()))
            },
        )
    }

    /// Every pack's record, as last committed.
    pub fn pack_records(&self) -> Result<BTreeMap<u64, PackRecord>, KvError> {
        self.health.guard(
            || "reading the pack records".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let table = match txn.open_table(PACKS) {
                    Ok(table) => table,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                records_of(&table, &self.health)
            },
        )
    }

    /// A read-only view of what can be read of the (possibly damaged) file at `path`,
    /// without ever writing to it (see [`redb_check::open_for_recovery`]).
    pub fn open_for_recovery(path: &Path) -> Result<(RedbBackend, Recovery), KvError> {
        let (database, recovery) =
            redb_check::open_for_recovery(path).map_err(|reason| KvError::Corrupt {
                path: path.display().to_string(),
                reason,
            })?;
        let mut backend = RedbBackend {
            database: ManuallyDrop::new(database),
            health: Arc::new(Health {
                path: path.to_path_buf(),
                poisoned: AtomicBool::new(false),
                records_damage: false,
            }),
            catalog_copy: None,
            unsynced: AtomicBool::new(false),
            packs: Arc::new(Packs::none()),
        };
        // The segments in pack files, if the store's pack directory id still reads.
        if let Ok(Some(id)) = backend.packs_id()
            && let Ok(packs) = Packs::open_read_only(&packfile::packs_dir(path, id))
        {
            backend.packs = Arc::new(packs);
        }
        Ok((backend, recovery))
    }

    pub fn path(&self) -> &Path {
        &self.health.path
    }

    fn txn(&self, error: TransactionError) -> KvError {
        match error {
            TransactionError::Storage(storage) => self.health.storage(storage),
            other => KvError::Io(other.to_string()),
        }
    }

    fn commit_error(&self, error: redb::CommitError) -> KvError {
        match error {
            redb::CommitError::Storage(storage) => self.health.storage(storage),
            other => KvError::Io(other.to_string()),
        }
    }

    /// Every catalog pair of the store, read from one snapshot.
    pub fn catalog_pairs(&self) -> Result<Pairs, KvError> {
        let snapshot = self.snapshot()?;
        let mut out = Vec::new();
        // Everything between the prefixes that are not catalog (in key order).
        let series_end = crate::kv::prefix_end(crate::keys::SERIES).unwrap_or_default();
        let object_end = crate::kv::prefix_end(crate::keys::OBJECT).unwrap_or_default();
        let segment_end = crate::kv::prefix_end(crate::keys::SEGMENT).unwrap_or_default();
        debug_assert!(crate::keys::SERIES < crate::keys::OBJECT);
        let ranges: [(&[u8], Option<&[u8]>); 4] = [
            (b"", Some(crate::keys::SERIES)),
            (&series_end, Some(crate::keys::OBJECT)),
            (&object_end, Some(crate::keys::SEGMENT)),
            (&segment_end, None),
        ];
        for (start, end) in ranges {
            let mut lower = start.to_vec();
            let mut inclusive = true;
            loop {
                let lower_bound = if inclusive {
                    Bound::Included(lower.as_slice())
                } else {
                    Bound::Excluded(lower.as_slice())
                };
                let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
                let page = snapshot.scan(lower_bound, upper, CATALOG_SCAN_PAGE, false)?;
                let full = page.len() == CATALOG_SCAN_PAGE;
                if let Some((last, _)) = page.last() {
                    lower = last.clone();
                    inclusive = false;
                }
                out.extend(page);
                if !full {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Writes the catalog copy from the store when there is none (a new store, or one made
    /// before the copy existed). A copy due for compaction is left to the next catalog
    /// commit: opening never replaces a good copy with what an unchecked file holds.
    fn write_copy_if_missing(&self) -> Result<(), KvError> {
        let Some(copy) = &self.catalog_copy else {
            return Ok(());
        };
        let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        if copy.is_missing() {
            self.rewrite_copy(&mut copy)?;
        }
        Ok(())
    }

    /// Rewrites the catalog copy from the store (the caller holds the copy's lock).
    fn rewrite_copy(&self, copy: &mut CatalogCopyWriter) -> Result<(), KvError> {
        let sequence = self.catalog_sequence()?;
        let pairs = self.catalog_pairs()?;
        copy.rewrite(
            pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
            sequence,
        )
    }

    /// How many committed batches changed the catalog (0 for a store older than the count).
    pub fn catalog_sequence(&self) -> Result<u64, KvError> {
        self.health.guard(
            || "reading the catalog sequence".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let meta = match txn.open_table(META) {
                    Ok(meta) => meta,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(0),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                Ok(meta
                    .get(CATALOG_SEQUENCE)
                    .map_err(|error| self.health.storage(error))?
                    .map(|value| value.value())
                    .unwrap_or(0))
            },
        )
    }

    /// Compacts the file (redb's `compact`: live pages move to the front, the free tail is
    /// cut off), so that space freed by garbage collection returns to the file system. It
    /// needs the only handle, with no transaction open: the caller owns the backend.
    /// Returns the file size after. A crash meanwhile leaves a file redb recovers on open
    /// (its two-phase commit), never a partial state.
    pub fn compact(mut self) -> Result<u64, KvError> {
        self.refuse_writes_if_damaged()?;
        // Mostly dead packs first (ends with a durable commit: the packs are synced).
        self.compact_packs()?;
        // Compaction commits durably: the copy's pending records go first.
        if let Some(copy) = &self.catalog_copy {
            copy.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        }
        let health = self.health.clone();
        let database = &mut *self.database;
        health.guard(
            || "compacting".into(),
            || {
                // Each call moves what it can; a few calls reach the end.
                for _ in 0..COMPACT_ROUNDS_MAX {
                    match database.compact() {
                        Ok(true) => {}
                        Ok(false) => return Ok(()),
                        Err(redb::CompactionError::Storage(storage)) => {
                            return Err(health.storage(storage));
                        }
                        Err(error) => {
                            return Err(KvError::Io(format!(
                                "{}: compacting: {error}",
                                health.path.display()
                            )));
                        }
                    }
                }
                Ok(())
            },
        )?;
        // Compaction commits durably: nothing is left for `Drop` to make durable (a commit
        // there would grow the file just compacted).
        self.unsynced.store(false, Ordering::Release);
        // Measured once closed: closing records redb's allocator state in the file.
        let packs = self.packs.clone();
        let path = self.health.path.clone();
        drop(self);
        let file = std::fs::metadata(&path)
            .map(|metadata| metadata.len())
            .map_err(|error| KvError::Io(format!("{}: {error}", path.display())))?;
        Ok(file + packs.size_bytes().map_err(KvError::Io)?)
    }

    fn refuse_writes_if_damaged(&self) -> Result<(), KvError> {
        if self.catalog_copy.is_none() {
            return Err(KvError::Io(format!(
                "{}: opened read-only for recovery",
                self.health.path.display()
            )));
        }
        if let Some(reason) = recorded_damage(&self.health.path) {
            return Err(KvError::Damaged {
                path: self.health.path.display().to_string(),
                reason,
            });
        }
        Ok(())
    }

    /// Commits `batch`; with `sequence`, also advances the catalog sequence in the same
    /// transaction, calls `ahead` with its new value just before the commit (to write the
    /// catalog copy's record first), and returns it. Segment values go to the pack files
    /// (one append for the batch) and their locators to [`PACKED`].
    fn commit_guarded(
        &self,
        batch: &WriteBatch,
        sequence: bool,
        ahead: &mut dyn FnMut(u64),
    ) -> Result<Option<u64>, KvError> {
        let mut doomed = BTreeSet::new();
        let next = self.health.guard(
            || "committing a batch".into(),
            || {
                let mut txn = self.database.begin_write().map_err(|e| self.txn(e))?;
                if !batch.durable {
                    txn.set_durability(Durability::None)
                        .map_err(|error| KvError::Io(error.to_string()))?;
                }
                let mut next = None;
                let mut deltas = PackDeltas::default();
                {
                    let mut table = txn
                        .open_table(TABLE)
                        .map_err(|error| table_error(&self.health, error))?;
                    let mut packed = txn
                        .open_table(PACKED)
                        .map_err(|error| table_error(&self.health, error))?;
                    for (key, expected) in &batch.checks {
                        let current = if is_segment_key(key) {
                            match packed
                                .get(key.as_slice())
                                .map_err(|error| self.health.storage(error))?
                            {
                                Some(value) => {
                                    let locator = self.locator(key, value.value())?;
                                    Some(self.read_packed(&self.packs.view(), &locator)?)
                                }
                                None => None,
                            }
                        } else {
                            None
                        };
                        let current = match current {
                            Some(value) => Some(value),
                            None => table
                                .get(key.as_slice())
                                .map_err(|error| self.health.storage(error))?
                                .map(|value| value.value().to_vec()),
                        };
                        if current.as_deref() != expected.as_deref() {
                            return Err(KvError::Conflict { key: key.clone() });
                        }
                    }
                    // Every segment of the batch in one append, in batch order.
                    let pieces: Vec<&[u8]> = batch
                        .mutations
                        .iter()
                        .filter_map(|mutation| match mutation {
                            Mutation::Put { key, value } if is_segment_key(key) => {
                                Some(value.as_slice())
                            }
                            _ => None,
                        })
                        .collect();
                    let (pack, mut offset) = if pieces.is_empty() {
                        (0, 0)
                    } else {
                        let (pack, start) = self.packs.append(&pieces).map_err(KvError::Io)?;
                        let len: usize = pieces.iter().map(|piece| piece.len()).sum();
                        deltas.reach(pack, start + len as u64);
                        (pack, start)
                    };
                    for mutation in &batch.mutations {
                        match mutation {
                            Mutation::Put { key, value } if is_segment_key(key) => {
                                let locator = Locator {
                                    pack,
                                    offset,
                                    len: value.len() as u32,
                                    fingerprint: packfile::fingerprint(value),
                                };
                                offset += value.len() as u64;
                                deltas.add(pack, value.len() as u64);
                                let old = packed
                                    .insert(key.as_slice(), &locator.encode()[..])
                                    .map_err(|error| self.health.storage(error))?
                                    .map(|old| old.value().to_vec());
                                if let Some(old) = old {
                                    let old = self.locator(key, &old)?;
                                    deltas.remove(old.pack, u64::from(old.len));
                                }
                            }
                            Mutation::Put { key, value } => {
                                table
                                    .insert(key.as_slice(), value.as_slice())
                                    .map_err(|error| self.health.storage(error))?;
                            }
                            Mutation::Delete { key } => {
                                let old = if is_segment_key(key) {
                                    packed
                                        .remove(key.as_slice())
                                        .map_err(|error| self.health.storage(error))?
                                        .map(|old| old.value().to_vec())
                                } else {
                                    None
                                };
                                match old {
                                    Some(old) => {
                                        let old = self.locator(key, &old)?;
                                        deltas.remove(old.pack, u64::from(old.len));
                                    }
                                    None => {
                                        table
                                            .remove(key.as_slice())
                                            .map_err(|error| self.health.storage(error))?;
                                    }
                                }
                            }
                        }
                    }
                }
                self.apply_pack_deltas(&txn, &deltas, batch.durable, &mut doomed)?;
                if sequence {
                    let mut meta = txn
                        .open_table(META)
                        .map_err(|error| table_error(&self.health, error))?;
                    let current = meta
                        .get(CATALOG_SEQUENCE)
                        .map_err(|error| self.health.storage(error))?
                        .map(|value| value.value())
                        .unwrap_or(0);
                    meta.insert(CATALOG_SEQUENCE, current + 1)
                        .map_err(|error| self.health.storage(error))?;
                    next = Some(current + 1);
                }
                if batch.durable {
                    // Every pack byte a durable locator may name is on disk first.
                    self.packs.sync().map_err(KvError::Io)?;
                }
                if let Some(next) = next {
                    ahead(next);
                }
                txn.commit().map_err(|error| self.commit_error(error))?;
                self.unsynced.store(!batch.durable, Ordering::Release);
                Ok(next)
            },
        )?;
        // Packs with nothing live that a durable commit no longer records: gone (a failure
        // leaves a file the next open removes).
        let _ = self.packs.remove(&doomed);
        Ok(next)
    }

    /// The locator stored for segment `key` (damage if it does not decode).
    fn locator(&self, key: &[u8], value: &[u8]) -> Result<Locator, KvError> {
        Locator::decode(value).ok_or_else(|| {
            self.health.corrupt(format!(
                "the pack locator of segment {} is malformed",
                printable(key)
            ))
        })
    }

    /// The whole segment at `locator`.
    fn read_packed(&self, view: &PackView, locator: &Locator) -> Result<Vec<u8>, KvError> {
        read_packed(
            &self.packs,
            &self.health,
            view,
            locator,
            0,
            locator.len as usize,
        )
    }

    /// Writes the pack records `deltas` change; in a durable commit, also drops the
    /// records of packs with nothing live (except the one appended to) and adds them to
    /// `doomed`, to be unlinked once the commit is on disk.
    fn apply_pack_deltas(
        &self,
        txn: &redb::WriteTransaction,
        deltas: &PackDeltas,
        durable: bool,
        doomed: &mut BTreeSet<u64>,
    ) -> Result<(), KvError> {
        if deltas.packs.is_empty() && !durable {
            return Ok(());
        }
        let mut table = txn
            .open_table(PACKS)
            .map_err(|error| table_error(&self.health, error))?;
        for (number, delta) in &deltas.packs {
            let mut record = match table
                .get(number)
                .map_err(|error| self.health.storage(error))?
            {
                Some(value) => PackRecord::decode(value.value()).ok_or_else(|| {
                    self.health
                        .corrupt(format!("the record of pack {number} is malformed"))
                })?,
                None => PackRecord::default(),
            };
            record.live = (record.live + delta.added).saturating_sub(delta.removed);
            record.end = record.end.max(delta.end);
            table
                .insert(number, &record.encode()[..])
                .map_err(|error| self.health.storage(error))?;
        }
        if durable {
            let current = self.packs.current();
            let mut empty = Vec::new();
            for item in table.iter().map_err(|e| self.health.storage(e))? {
                let (number, value) = item.map_err(|e| self.health.storage(e))?;
                let number = number.value();
                if Some(number) != current
                    && PackRecord::decode(value.value()).is_some_and(|record| record.live == 0)
                {
                    empty.push(number);
                }
            }
            if !empty.is_empty() {
                // A pack goes only if no locator names it: its record saying nothing is
                // live is not trusted alone (a damaged record must not remove data).
                let packed = txn
                    .open_table(PACKED)
                    .map_err(|error| table_error(&self.health, error))?;
                let usage = pack_usage(&packed, &self.health)?;
                for number in empty {
                    if let Some(used) = usage.packs.get(&number) {
                        let _recorded = self.health.corrupt(format!(
                            "pack {} is recorded as holding nothing live, yet {} bytes of segments are located in it; it is kept",
                            self.packs.path_of(number).display(),
                            used.live
                        ));
                        continue;
                    }
                    table
                        .remove(number)
                        .map_err(|error| self.health.storage(error))?;
                    doomed.insert(number);
                }
            }
        }
        Ok(())
    }

    /// Removes pack files and pack tails no commit refers to ([`Packs::clean`]), holding
    /// the write transaction so that no append or record lands meanwhile. Returns what
    /// changed, one line each.
    pub fn clean_packs(&self) -> Result<Vec<String>, KvError> {
        self.health.guard(
            || "removing pack bytes no commit refers to".into(),
            || {
                let txn = self.database.begin_write().map_err(|e| self.txn(e))?;
                let records = {
                    let table = txn
                        .open_table(PACKS)
                        .map_err(|error| table_error(&self.health, error))?;
                    records_of(&table, &self.health)?
                };
                let cleaned = self.packs.clean(&records).map_err(KvError::Io);
                txn.abort()
                    .map_err(|error| KvError::Io(error.to_string()))?;
                cleaned
            },
        )
    }

    /// Every segment in a pack read against its checksum: the segments that do not read or
    /// do not match (at most a few named, then a count).
    fn check_segments(&self) -> Result<Vec<String>, KvError> {
        const NAMED_MAX: usize = 16;
        let view = self.packs.view();
        let locators: Vec<(Vec<u8>, Locator)> = self.health.guard(
            || "reading the pack locators".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let table = match txn.open_table(PACKED) {
                    Ok(table) => table,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                let mut out = Vec::new();
                for item in table.iter().map_err(|e| self.health.storage(e))? {
                    let (key, value) = item.map_err(|e| self.health.storage(e))?;
                    if let Some(locator) = Locator::decode(value.value()) {
                        out.push((key.value().to_vec(), locator));
                    }
                }
                Ok(out)
            },
        )?;
        let mut problems = Vec::new();
        let mut failed = 0;
        for (key, locator) in locators {
            let problem = match self.packs.read(&view, &locator, 0, locator.len as usize) {
                Ok(segment) if packfile::fingerprint(&segment) == locator.fingerprint => continue,
                Ok(_) => format!(
                    "segment {} in {} does not match its checksum",
                    printable(&key),
                    self.packs.path_of(locator.pack).display()
                ),
                Err(reason) => format!("segment {}: {reason}", printable(&key)),
            };
            failed += 1;
            if failed <= NAMED_MAX {
                problems.push(problem);
            }
        }
        if failed > NAMED_MAX {
            problems.push(format!(
                "{} more segments do not read or do not match their checksums",
                failed - NAMED_MAX
            ));
        }
        Ok(problems)
    }

    /// Where the locators disagree with the pack records: bytes located in a pack beyond
    /// its committed end or in a pack without a record, live bytes other than recorded,
    /// locators that do not decode.
    fn check_locators(&self, records: &BTreeMap<u64, PackRecord>) -> Result<Vec<String>, KvError> {
        let usage = self.health.guard(
            || "reading the pack locators".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                match txn.open_table(PACKED) {
                    Ok(table) => pack_usage(&table, &self.health),
                    Err(TableError::TableDoesNotExist(_)) => Ok(PackUsage::default()),
                    Err(error) => Err(table_error(&self.health, error)),
                }
            },
        )?;
        let mut problems: Vec<String> = usage
            .malformed
            .iter()
            .map(|key| {
                format!(
                    "the pack locator of segment {} is malformed",
                    printable(key)
                )
            })
            .collect();
        for (number, used) in &usage.packs {
            let path = self.packs.path_of(*number);
            match records.get(number) {
                None => problems.push(format!(
                    "{} bytes of segments are located in pack {}, which has no record",
                    used.live,
                    path.display()
                )),
                Some(record) => {
                    if used.end > record.end {
                        problems.push(format!(
                            "segments are located up to byte {} of pack {}, past its committed end {}",
                            used.end,
                            path.display(),
                            record.end
                        ));
                    }
                    if used.live != record.live {
                        problems.push(format!(
                            "pack {} is recorded with {} live bytes, its locators name {}",
                            path.display(),
                            record.live,
                            used.live
                        ));
                    }
                }
            }
        }
        for (number, record) in records {
            if record.live > 0 && !usage.packs.contains_key(number) {
                problems.push(format!(
                    "pack {} is recorded with {} live bytes, no locator names it",
                    self.packs.path_of(*number).display(),
                    record.live
                ));
            }
        }
        Ok(problems)
    }

    /// Moves the live segments of packs worth compacting (a fifth of their bytes dead) into
    /// the pack appended to, in transactions of a few MiB so that captures wait little,
    /// then makes it durable, which unlinks the emptied packs. Returns the bytes moved.
    pub fn compact_packs(&self) -> Result<u64, KvError> {
        self.refuse_writes_if_damaged()?;
        self.clean_packs()?;
        let records = self.pack_records()?;
        // The pack appended to is compacted too when worth it: appends move on first.
        if let Some(current) = self.packs.current()
            && records
                .get(&current)
                .is_some_and(PackRecord::worth_compacting)
        {
            self.packs.retire(current);
        }
        let current = self.packs.current();
        let sources: BTreeSet<u64> = records
            .iter()
            .filter(|(number, record)| Some(**number) != current && record.worth_compacting())
            .map(|(number, _)| *number)
            .collect();
        let empty_kept = records
            .iter()
            .any(|(number, record)| Some(*number) != current && record.live == 0);
        if sources.is_empty() {
            if empty_kept {
                self.commit(WriteBatch::new())?;
            }
            return Ok(0);
        }
        let mut moving: Vec<(Vec<u8>, u32)> = Vec::new();
        self.health.guard(
            || "listing the segments of packs to compact".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let table = match txn.open_table(PACKED) {
                    Ok(table) => table,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(()),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                for item in table.iter().map_err(|e| self.health.storage(e))? {
                    let (key, value) = item.map_err(|e| self.health.storage(e))?;
                    let locator = self.locator(key.value(), value.value())?;
                    if sources.contains(&locator.pack) {
                        moving.push((key.value().to_vec(), locator.len));
                    }
                }
                Ok(())
            },
        )?;
        let mut moved = 0;
        let mut start = 0;
        while start < moving.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < moving.len() && (end == start || bytes < MOVE_CHUNK_BYTES) {
                bytes += moving[end].1 as usize;
                end += 1;
            }
            self.refuse_writes_if_damaged()?;
            let started = Instant::now();
            moved += self.move_segments(&moving[start..end], &sources)?;
            start = end;
            // Moving is disk-bound: paced to a fifth of the disk's time, so that the
            // commits and syncs of captures going on meanwhile keep most of it.
            std::thread::sleep(MOVE_PAUSE.max(started.elapsed() * MOVE_PACE));
        }
        self.commit(WriteBatch::new())?;
        Ok(moved)
    }

    /// One step of [`Self::compact_packs`]: the segments of `chunk` still in a pack of
    /// `sources` are read (outside the write transaction, so that commits meanwhile wait
    /// only for the append), checked against their fingerprints, then appended to the pack
    /// appended to and their locators changed in one transaction — those whose locator
    /// changed since they were read are left for a later run.
    fn move_segments(
        &self,
        chunk: &[(Vec<u8>, u32)],
        sources: &BTreeSet<u64>,
    ) -> Result<u64, KvError> {
        let view = self.packs.view();
        let read: Vec<(&[u8], Locator, Vec<u8>)> = self.health.guard(
            || "reading segments of packs to compact".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let packed = match txn.open_table(PACKED) {
                    Ok(table) => table,
                    Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                let mut read = Vec::new();
                for (key, _) in chunk {
                    let Some(value) = packed
                        .get(key.as_slice())
                        .map_err(|error| self.health.storage(error))?
                    else {
                        continue;
                    };
                    let locator = self.locator(key, value.value())?;
                    if !sources.contains(&locator.pack) {
                        continue;
                    }
                    let segment = self.read_packed(&view, &locator)?;
                    if packfile::fingerprint(&segment) != locator.fingerprint {
                        // The locator or the bytes it names are damaged: nothing moves and
                        // the pack stays for `repair`.
                        return Err(self.health.corrupt(format!(
                            "segment {} does not match its fingerprint in {}",
                            printable(key),
                            self.packs.path_of(locator.pack).display()
                        )));
                    }
                    read.push((key.as_slice(), locator, segment));
                }
                Ok(read)
            },
        )?;
        if read.is_empty() {
            return Ok(0);
        }
        self.health.guard(
            || "moving segments out of packs to compact".into(),
            || {
                let mut txn = self.database.begin_write().map_err(|e| self.txn(e))?;
                txn.set_durability(Durability::None)
                    .map_err(|error| KvError::Io(error.to_string()))?;
                let mut deltas = PackDeltas::default();
                let mut moved = 0;
                {
                    let mut packed = txn
                        .open_table(PACKED)
                        .map_err(|error| table_error(&self.health, error))?;
                    let mut still = Vec::with_capacity(read.len());
                    for (key, locator, segment) in &read {
                        let current = packed
                            .get(*key)
                            .map_err(|error| self.health.storage(error))?
                            .and_then(|value| Locator::decode(value.value()));
                        if current == Some(*locator) {
                            still.push((*key, *locator, segment.as_slice()));
                        }
                    }
                    if still.is_empty() {
                        return Ok(0);
                    }
                    let pieces: Vec<&[u8]> = still.iter().map(|(_, _, segment)| *segment).collect();
                    let (pack, mut offset) = self.packs.append(&pieces).map_err(KvError::Io)?;
                    let len: usize = pieces.iter().map(|piece| piece.len()).sum();
                    deltas.reach(pack, offset + len as u64);
                    for (key, old, _) in still {
                        let locator = Locator {
                            pack,
                            offset,
                            ..old
                        };
                        offset += u64::from(old.len);
                        packed
                            .insert(key, &locator.encode()[..])
                            .map_err(|error| self.health.storage(error))?;
                        deltas.add(pack, u64::from(old.len));
                        deltas.remove(old.pack, u64::from(old.len));
                        moved += u64::from(old.len);
                    }
                }
                self.apply_pack_deltas(&txn, &deltas, false, &mut BTreeSet::new())?;
                txn.commit().map_err(|error| self.commit_error(error))?;
                self.unsynced.store(true, Ordering::Release);
                Ok(moved)
            },
        )
    }
}

/// What the locators say of each pack.
#[derive(Default)]
struct PackUsage {
    packs: BTreeMap<u64, PackUsed>,
    /// Locators that do not decode (their keys).
    malformed: Vec<Vec<u8>>,
}

#[derive(Default)]
struct PackUsed {
    live: u64,
    end: u64,
}

/// Every pack record of `table` (a malformed one is damage).
fn records_of(
    table: &impl ReadableTable<u64, &'static [u8]>,
    health: &Health,
) -> Result<BTreeMap<u64, PackRecord>, KvError> {
    let mut out = BTreeMap::new();
    for item in table.iter().map_err(|e| health.storage(e))? {
        let (number, value) = item.map_err(|e| health.storage(e))?;
        let record = PackRecord::decode(value.value()).ok_or_else(|| {
            health.corrupt(format!(
                "the record of pack {} is malformed",
                number.value()
            ))
        })?;
        out.insert(number.value(), record);
    }
    Ok(out)
}

/// Reads every locator of `table`.
fn pack_usage(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    health: &Health,
) -> Result<PackUsage, KvError> {
    let mut usage = PackUsage::default();
    for item in table.iter().map_err(|e| health.storage(e))? {
        let (key, value) = item.map_err(|e| health.storage(e))?;
        match Locator::decode(value.value()) {
            Some(locator) => {
                let used = usage.packs.entry(locator.pack).or_default();
                used.live += u64::from(locator.len);
                used.end = used.end.max(locator.end());
            }
            None => usage.malformed.push(key.value().to_vec()),
        }
    }
    Ok(usage)
}

/// How one transaction changes the pack records.
#[derive(Default)]
struct PackDeltas {
    packs: BTreeMap<u64, PackDelta>,
}

#[derive(Default)]
struct PackDelta {
    added: u64,
    removed: u64,
    end: u64,
}

impl PackDeltas {
    fn add(&mut self, pack: u64, bytes: u64) {
        self.packs.entry(pack).or_default().added += bytes;
    }

    fn remove(&mut self, pack: u64, bytes: u64) {
        self.packs.entry(pack).or_default().removed += bytes;
    }

    fn reach(&mut self, pack: u64, end: u64) {
        let delta = self.packs.entry(pack).or_default();
        delta.end = delta.end.max(end);
    }
}

/// `len` bytes from `offset` of the segment at `locator` (a failed read is damage: the
/// locator's commit made the bytes durable first).
fn read_packed(
    packs: &Packs,
    health: &Health,
    view: &PackView,
    locator: &Locator,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, KvError> {
    packs
        .read(view, locator, offset as u64, len)
        .map_err(|reason| health.corrupt(reason))
}

/// Looks at an existing file before redb opens it for writing (which writes to it at once,
/// and runs its crash recovery on a file that was not closed cleanly).
fn precheck(health: &Health) -> Result<Existing, KvError> {
    let path = health.path.as_path();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::New),
        Err(error) => return Err(KvError::Io(format!("{}: {error}", path.display()))),
    };
    if metadata.len() == 0 {
        return Err(health.corrupt(
            "the file is empty (0 bytes): it was truncated, a store file is never empty \
             (the catalog copy beside it keeps the frame list)"
                .into(),
        ));
    }
    let started = Instant::now();
    loop {
        let opened = health.guard(
            || "opening read-only".into(),
            || {
                let mut builder = Builder::new();
                builder.set_cache_size(PRECHECK_CACHE_BYTES);
                match builder.open_read_only(path) {
                    Ok(database) => Ok(Ok(database)),
                    Err(error) => Ok(Err(error)),
                }
            },
        )?;
        let database = match opened {
            Ok(database) => database,
            Err(DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < OPEN_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(DatabaseError::RepairAborted) => return after_unclean_shutdown(health),
            Err(error) => return Err(database_error_recorded(health, error)),
        };
        let table = health.guard(
            || "opening the table".into(),
            || {
                let txn = database.begin_read().map_err(|e| match e {
                    TransactionError::Storage(storage) => health.storage(storage),
                    other => KvError::Io(other.to_string()),
                })?;
                match txn.open_table(TABLE) {
                    Ok(table) => {
                        // Reading the first and last keys walks both edges of the tree.
                        let first = table.first().map_err(|e| health.storage(e))?.is_some();
                        let last = table.last().map_err(|e| health.storage(e))?.is_some();
                        Ok(first || last)
                    }
                    Err(TableError::TableDoesNotExist(_)) => Ok(false),
                    Err(error) => Err(table_error(health, error)),
                }
            },
        );
        // A read-only handle never writes; dropping it is guarded like any other call.
        let _ = catch_panic(move || drop(database));
        let has_pairs = table?;
        if !has_pairs {
            let table_exists = table_exists(health)?;
            if !table_exists {
                return match catalog_copy::read(&catalog_copy::copy_path(path))? {
                    Some(copy) if !copy.pairs.is_empty() => Err(health.corrupt(format!(
                        "table {TABLE_NAME:?} is missing while the catalog copy holds {} keys",
                        copy.pairs.len()
                    ))),
                    _ => Ok(Existing::Store { create_table: true }),
                };
            }
        }
        return Ok(Existing::Store {
            create_table: false,
        });
    }
}

fn table_exists(health: &Health) -> Result<bool, KvError> {
    health.guard(
        || "listing tables".into(),
        || {
            let mut builder = Builder::new();
            builder.set_cache_size(PRECHECK_CACHE_BYTES);
            let database = builder
                .open_read_only(&health.path)
                .map_err(|error| database_error(&health.path, error))?;
            let txn = database
                .begin_read()
                .map_err(|error| KvError::Io(error.to_string()))?;
            let mut tables = txn.list_tables().map_err(|e| health.storage(e))?;
            Ok(tables.any(|table| redb::TableHandle::name(&table) == TABLE_NAME))
        },
    )
}

/// The file was not closed cleanly (a crash, a kill): redb's recovery is allowed to write
/// to it only if its integrity check, run on an overlay first, finds the trees intact.
/// Falling back to the previous commit slot is what recovery from a crash in the middle
/// of a commit does, so it is accepted here.
fn after_unclean_shutdown(health: &Health) -> Result<Existing, KvError> {
    let check = redb_check::check_structure(&health.path, TABLE_NAME);
    let problems: Vec<&String> = if check.slot_fallback {
        check.problems.iter().skip(1).collect()
    } else {
        check.problems.iter().collect()
    };
    if problems.is_empty() {
        Ok(Existing::Store {
            create_table: false,
        })
    } else {
        let joined: Vec<&str> = problems.iter().map(|p| p.as_str()).collect();
        Err(health.corrupt(format!(
            "not closed cleanly, and redb's check before recovery found damage: {}",
            joined.join("; ")
        )))
    }
}

fn table_error(health: &Health, error: TableError) -> KvError {
    match error {
        TableError::Storage(storage) => health.storage(storage),
        other => KvError::Corrupt {
            path: health.path.display().to_string(),
            reason: format!("table {TABLE_NAME:?}: {other}"),
        },
    }
}

fn storage_error(path: &Path, error: StorageError) -> KvError {
    match error {
        StorageError::Io(io) if io.kind() != std::io::ErrorKind::InvalidData => {
            KvError::Io(format!("{}: {io}", path.display()))
        }
        other => KvError::Corrupt {
            path: path.display().to_string(),
            reason: other.to_string(),
        },
    }
}

fn database_error(path: &Path, error: DatabaseError) -> KvError {
    match error {
        DatabaseError::DatabaseAlreadyOpen => KvError::Busy(path.display().to_string()),
        DatabaseError::Storage(storage) => storage_error(path, storage),
        other => KvError::Corrupt {
            path: path.display().to_string(),
            reason: other.to_string(),
        },
    }
}

fn database_error_recorded(health: &Health, error: DatabaseError) -> KvError {
    match database_error(&health.path, error) {
        KvError::Corrupt { reason, .. } => health.corrupt(reason),
        other => other,
    }
}

struct RedbSnapshot {
    table: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    /// Locators of segments in pack files (`None`: the store has never written one).
    packed: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    packs: Arc<Packs>,
    /// The packs open when the snapshot was taken (taken before the read transaction, so
    /// every pack it may name is in it or created since).
    view: PackView,
    health: Arc<Health>,
}

/// A value found by a scan: in the table itself, or in a pack file.
enum Found {
    Inline(Vec<u8>),
    Packed(Locator),
    /// Only the value's length was asked for.
    Length(usize),
}

impl Found {
    fn len(&self) -> usize {
        match self {
            Found::Inline(value) => value.len(),
            Found::Packed(locator) => locator.len as usize,
            Found::Length(len) => *len,
        }
    }
}

impl RedbSnapshot {
    /// The pack locator of `key`, if it is a segment kept in a pack file.
    fn locator(&self, key: &[u8]) -> Result<Option<Locator>, KvError> {
        let Some(packed) = self.packed.as_ref().filter(|_| is_segment_key(key)) else {
            return Ok(None);
        };
        self.health.guard(
            || format!("reading the locator of {}", printable(key)),
            || {
                let Some(value) = packed.get(key).map_err(|e| self.health.storage(e))? else {
                    return Ok(None);
                };
                Locator::decode(value.value()).map(Some).ok_or_else(|| {
                    self.health.corrupt(format!(
                        "the pack locator of segment {} is malformed",
                        printable(key)
                    ))
                })
            },
        )
    }

    /// Up to `limit` keys between the bounds in `table`, in scan order, with what each
    /// holds (`packed`: values are locators).
    fn range(
        &self,
        table: &ReadOnlyTable<&'static [u8], &'static [u8]>,
        packed: bool,
        bounds: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
        reverse: bool,
        with_values: bool,
    ) -> Result<Vec<(Vec<u8>, Found)>, KvError> {
        self.health.guard(
            || {
                let from = match bounds.0 {
                    Bound::Included(key) | Bound::Excluded(key) => printable(key),
                    Bound::Unbounded => "the start".into(),
                };
                format!("scanning from {from}")
            },
            || {
                let range = table
                    .range::<&[u8]>(bounds)
                    .map_err(|e| self.health.storage(e))?;
                let mut out = Vec::new();
                let mut push = |item: Result<_, StorageError>| -> Result<bool, KvError> {
                    let (key, value): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) =
                        item.map_err(|e| self.health.storage(e))?;
                    let key = key.value();
                    let value = value.value();
                    let found = if packed {
                        Found::Packed(Locator::decode(value).ok_or_else(|| {
                            self.health.corrupt(format!(
                                "the pack locator of segment {} is malformed",
                                printable(key)
                            ))
                        })?)
                    } else if with_values {
                        Found::Inline(value.to_vec())
                    } else {
                        Found::Length(value.len())
                    };
                    out.push((key.to_vec(), found));
                    Ok(out.len() < limit)
                };
                if reverse {
                    for item in range.rev() {
                        if !push(item)? {
                            break;
                        }
                    }
                } else {
                    for item in range {
                        if !push(item)? {
                            break;
                        }
                    }
                }
                Ok(out)
            },
        )
    }

    /// Up to `limit` keys between the bounds from the table and the pack locators, merged
    /// in scan order.
    fn merged(
        &self,
        bounds: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
        reverse: bool,
        with_values: bool,
    ) -> Result<Vec<(Vec<u8>, Found)>, KvError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let inline = match &self.table {
            Some(table) => self.range(table, false, bounds, limit, reverse, with_values)?,
            None => Vec::new(),
        };
        let packed = match &self.packed {
            Some(packed) => self.range(packed, true, bounds, limit, reverse, with_values)?,
            None => Vec::new(),
        };
        if packed.is_empty() {
            return Ok(inline);
        }
        let before = |a: &[u8], b: &[u8]| if reverse { a > b } else { a < b };
        let mut out = Vec::with_capacity(limit.min(inline.len() + packed.len()));
        let mut inline = inline.into_iter().peekable();
        let mut packed = packed.into_iter().peekable();
        while out.len() < limit {
            let take_inline = match (inline.peek(), packed.peek()) {
                (Some((a, _)), Some((b, _))) => {
                    if a == b {
                        // A segment in both (never written so): the pack's is current.
                        inline.next();
                        false
                    } else {
                        before(a, b)
                    }
                }
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_inline {
                inline.next()
            } else {
                packed.next()
            };
            out.extend(next);
        }
        Ok(out)
    }
}

impl KvSnapshot for RedbSnapshot {
    fn get_slice(&self, key: &[u8], offset: usize, len: usize) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(locator) = self.locator(key)? {
            if offset
                .checked_add(len)
                .is_none_or(|end| end > locator.len as usize)
            {
                return Ok(None);
            }
            return read_packed(&self.packs, &self.health, &self.view, &locator, offset, len)
                .map(Some);
        }
        let Some(table) = &self.table else {
            return Ok(None);
        };
        self.health.guard(
            || format!("reading key {}", printable(key)),
            || {
                let Some(value) = table.get(key).map_err(|e| self.health.storage(e))? else {
                    return Ok(None);
                };
                let value = value.value();
                Ok(offset
                    .checked_add(len)
                    .and_then(|end| value.get(offset..end))
                    .map(<[u8]>::to_vec))
            },
        )
    }

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        if self.locator(key)?.is_some() {
            return Ok(true);
        }
        let Some(table) = &self.table else {
            return Ok(false);
        };
        self.health.guard(
            || format!("reading key {}", printable(key)),
            || {
                Ok(table
                    .get(key)
                    .map_err(|e| self.health.storage(e))?
                    .is_some())
            },
        )
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(locator) = self.locator(key)? {
            let len = locator.len as usize;
            return read_packed(&self.packs, &self.health, &self.view, &locator, 0, len).map(Some);
        }
        let Some(table) = &self.table else {
            return Ok(None);
        };
        self.health.guard(
            || format!("reading key {}", printable(key)),
            || {
                Ok(table
                    .get(key)
                    .map_err(|e| self.health.storage(e))?
                    .map(|value| value.value().to_vec()))
            },
        )
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, KvError> {
        self.merged((start, end), limit, reverse, true)?
            .into_iter()
            .map(|(key, found)| match found {
                Found::Inline(value) => Ok((key, value)),
                Found::Length(_) => Err(KvError::Io("a scan read lengths only".into())),
                Found::Packed(locator) => {
                    let len = locator.len as usize;
                    let value =
                        read_packed(&self.packs, &self.health, &self.view, &locator, 0, len)?;
                    Ok((key, value))
                }
            })
            .collect()
    }

    fn scan_key_lengths(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, usize)>, KvError> {
        Ok(self
            .merged((start, end), limit, false, false)?
            .into_iter()
            .map(|(key, found)| {
                let len = found.len();
                (key, len)
            })
            .collect())
    }
}

impl KvBackend for RedbBackend {
    fn local_file(&self) -> Option<PathBuf> {
        Some(self.health.path.clone())
    }

    fn snapshot(&self) -> Result<Box<dyn KvSnapshot>, KvError> {
        let view = self.packs.view();
        let (table, packed) = self.health.guard(
            || "opening a read transaction".into(),
            || {
                let txn = self.database.begin_read().map_err(|e| self.txn(e))?;
                let table = match txn.open_table(TABLE) {
                    Ok(table) => Some(table),
                    // A store without its table (a recovery view of a damaged file) reads as
                    // empty; a writable store always has it (see `precheck`).
                    Err(TableError::TableDoesNotExist(_)) => None,
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                let packed = match txn.open_table(PACKED) {
                    Ok(packed) => Some(packed),
                    Err(TableError::TableDoesNotExist(_)) => None,
                    Err(error) => return Err(table_error(&self.health, error)),
                };
                Ok((table, packed))
            },
        )?;
        Ok(Box::new(RedbSnapshot {
            table,
            packed,
            packs: self.packs.clone(),
            view,
            health: self.health.clone(),
        }))
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), KvError> {
        self.refuse_writes_if_damaged()?;
        let catalog_mutations: Vec<&Mutation> = batch
            .mutations
            .iter()
            .filter(|mutation| match mutation {
                Mutation::Put { key, .. } | Mutation::Delete { key } => is_catalog_key(key),
            })
            .collect();
        let Some(copy) = self
            .catalog_copy
            .as_ref()
            .filter(|_| !catalog_mutations.is_empty())
        else {
            if !batch.durable {
                self.commit_guarded(&batch, false, &mut |_| {})?;
                return Ok(());
            }
            // This commit makes earlier catalog batches committed without a flush durable
            // too: their records reach the copy first (held, so none slips in between).
            let mut copy = self
                .catalog_copy
                .as_ref()
                .map(|copy| copy.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some(copy) = copy.as_mut() {
                let _ = copy.flush();
            }
            self.commit_guarded(&batch, false, &mut |_| {})?;
            return Ok(());
        };
        // Catalog commits hold the copy's lock, so the copy records them in commit order.
        let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        let written_ahead = batch.durable;
        let committed = self.commit_guarded(&batch, true, &mut |sequence| {
            // Durable: the record (and the pending ones) is on disk before the store
            // commits, so no crash leaves the copy behind what the store made durable. A
            // failure to write leaves the copy stale, never fails the commit.
            if written_ahead {
                let _ = copy.append(&catalog_mutations, sequence, true);
            }
        });
        let sequence = match committed {
            Ok(sequence) => sequence.unwrap_or(0),
            Err(error) => {
                if written_ahead {
                    // The record of a commit that did not happen: rewritten from the store
                    // before the copy is trusted again (or cut off at the next open).
                    copy.mark_stale();
                }
                return Err(error);
            }
        };
        if !written_ahead {
            // Kept in memory, written ahead of the next durable commit.
            let _ = copy.append(&catalog_mutations, sequence, false);
        }
        if copy.needs_rewrite() {
            let _ = self.rewrite_copy(&mut copy);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), KvError> {
        if self.unsynced.load(Ordering::Acquire) {
            // An empty durable batch: the copy's pending records, then the store.
            self.commit(WriteBatch::new())?;
        }
        Ok(())
    }

    fn held_by_one_process(&self) -> bool {
        true
    }

    fn catalog_changes(&self) -> Result<Option<u64>, KvError> {
        self.catalog_sequence().map(Some)
    }

    fn size_bytes(&self) -> Result<u64, KvError> {
        let file = std::fs::metadata(&self.health.path)
            .map(|metadata| metadata.len())
            .map_err(|error| KvError::Io(format!("{}: {error}", self.health.path.display())))?;
        Ok(file + self.packs.size_bytes().map_err(KvError::Io)?)
    }

    fn compact_files(&self) -> Result<u64, KvError> {
        self.compact_packs()
    }

    fn dead_file_bytes(&self) -> Result<u64, KvError> {
        let live: u64 = self
            .pack_records()?
            .values()
            .map(|record| record.live)
            .sum();
        Ok(self
            .packs
            .size_bytes()
            .map_err(KvError::Io)?
            .saturating_sub(live))
    }

    fn check_structure(&self) -> Result<Vec<String>, KvError> {
        // Holding the catalog lock keeps catalog commits out while the file is read; object
        // batches only write pages no committed tree uses until a catalog commit.
        let _commits = self
            .catalog_copy
            .as_ref()
            .map(|copy| copy.lock().unwrap_or_else(|p| p.into_inner()));
        let mut problems = redb_check::check_structure(&self.health.path, TABLE_NAME).problems;
        if problems.is_empty() {
            let records = self.pack_records()?;
            problems.extend(self.packs.check(&records));
            problems.extend(self.check_locators(&records)?);
            problems.extend(self.check_segments()?);
        }
        Ok(problems)
    }

    fn catalog_with_copy(&self) -> Result<Option<CatalogComparison>, KvError> {
        let Some(copy) = &self.catalog_copy else {
            return Ok(None);
        };
        let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        if copy.has_pending() {
            // Catalog batches committed without a flush (a running node's) have their
            // records in memory only: write them, then make the store durable up to them,
            // so that the file compared holds what the store holds.
            copy.flush()?;
            self.commit_guarded(&WriteBatch::new(), false, &mut |_| {})?;
        }
        let sequence = self.catalog_sequence()?;
        Ok(Some(CatalogComparison {
            catalog: self.catalog_pairs()?,
            sequence,
            copy: catalog_copy::read_through(copy.path(), Some(sequence))?,
        }))
    }

    fn rewrite_catalog_copy(&self) -> Result<(), KvError> {
        let Some(copy) = &self.catalog_copy else {
            return Ok(());
        };
        let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
        self.rewrite_copy(&mut copy)
    }

    fn damage(&self) -> Option<String> {
        recorded_damage(&self.health.path)
    }

    fn record_damage(&self, reason: &str) {
        if self.health.records_damage {
            record_damage(&self.health.path, reason);
        }
    }

    fn clear_damage(&self) -> Result<(), KvError> {
        match std::fs::remove_file(damage_marker_path(&self.health.path)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(KvError::Io(format!(
                "{}: {error}",
                damage_marker_path(&self.health.path).display()
            ))),
        }
    }
}

impl Drop for RedbBackend {
    fn drop(&mut self) {
        // SAFETY: `database` is taken exactly once, here, and never used afterwards.
        let database = unsafe { ManuallyDrop::take(&mut self.database) };
        // A file found damaged (a check or a read recorded it) is not written either: redb's
        // close commits, and a commit over damaged pages can panic where no unwind is
        // allowed (the process aborts).
        // A recovery view (`records_damage` unset) writes to an overlay only: it has nothing
        // to commit at its close either.
        let damaged = !self.health.records_damage || recorded_damage(&self.health.path).is_some();
        if self.health.poisoned.load(Ordering::Acquire) || damaged {
            // A handle that panicked must not write: a normal close records the allocator
            // state and a clean-shutdown header from state the panic left untrusted. redb
            // writes neither when a handle is dropped while its thread unwinds a panic, so
            // the handle is dropped during a deliberate (caught, silent) unwind: the file
            // lock is released and nothing is committed to the damaged file.
            let _ = catch_panic(move || {
                let _dropped_while_unwinding = database;
                panic!("closing a store handle that hit a damaged page, without writing");
            });
            return;
        }
        if self.unsynced.load(Ordering::Acquire) {
            // Non-durable commits (object batches, runtime series samples) reach the disk
            // with the next durable one: make one now, empty, so that closing the handle
            // leaves a file that opens without recovery. The catalog copy's records of
            // such commits go first.
            if let Some(copy) = &self.catalog_copy {
                let _ = copy.lock().unwrap_or_else(|p| p.into_inner()).flush();
            }
            // Pack bytes the last commits named reach the disk before the commit does.
            let synced = self.packs.sync().is_ok();
            let _ = catch_panic(|| {
                if !synced {
                    return;
                }
                if let Ok(txn) = database.begin_write() {
                    let _ = txn.commit();
                }
            });
        }
        let _ = catch_panic(move || drop(database));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let mut counter = 0;
        crate::conformance::run(|| {
            counter += 1;
            Box::new(RedbBackend::open(&dir.path().join(format!("{counter}.redb"))).unwrap())
        });
    }

    #[test]
    fn garbage_file_is_reported_corrupt_not_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let error = RedbBackend::open(&path).err().unwrap().to_string();
        assert!(error.contains("corrupt"), "{error}");
        assert!(recorded_damage(&path).is_some());
    }

    #[test]
    fn an_empty_file_is_damage_not_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"").unwrap();
        let error = RedbBackend::open(&path).err().unwrap().to_string();
        assert!(error.contains("empty (0 bytes)"), "{error}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left untouched");
    }

    #[test]
    fn data_survives_reopen_and_the_catalog_copy_follows_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let backend = RedbBackend::open(&path).unwrap();
            let mut batch = WriteBatch::new();
            batch.put(b"k".to_vec(), b"v".to_vec()).unwrap();
            batch.put(b"o/x".to_vec(), b"object".to_vec()).unwrap();
            backend.commit(batch).unwrap();
        }
        let backend = RedbBackend::open(&path).unwrap();
        let snapshot = backend.snapshot().unwrap();
        assert_eq!(snapshot.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        let comparison = backend.catalog_with_copy().unwrap().unwrap();
        let copy = comparison.copy.unwrap();
        assert_eq!((copy.sequence, comparison.sequence), (1, 1));
        let keys: Vec<&[u8]> = copy.pairs.keys().map(Vec::as_slice).collect();
        assert_eq!(keys, vec![&b"k"[..]], "objects are not part of the catalog");
    }

    fn segment(index: u32, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32 * 31 + index) as u8).collect()
    }

    #[test]
    fn segments_live_in_pack_files_and_mostly_dead_packs_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let backend = RedbBackend::open(&path).unwrap();
        let target = 1 << 20;
        backend.packs.set_target(target);
        let len = 60_000;
        let count = 400;
        for start in (0..count).step_by(10) {
            let mut batch = WriteBatch::deferred();
            for index in start..(start + 10).min(count) {
                batch
                    .put(
                        keys::segment(&(index as u32).to_be_bytes()),
                        segment(index as u32, len),
                    )
                    .unwrap();
            }
            backend.commit(batch).unwrap();
        }
        backend.sync().unwrap();
        let records = backend.pack_records().unwrap();
        assert!(records.len() >= 20, "{records:?}");
        let file_alone = std::fs::metadata(&path).unwrap().len();
        let before = backend.size_bytes().unwrap();
        assert!(before >= file_alone + (count * len) as u64);
        // Every segment but one in twenty goes.
        for start in (0..count).step_by(500) {
            let mut batch = WriteBatch::deferred();
            for index in (start..(start + 500).min(count)).filter(|index| index % 20 != 0) {
                batch
                    .delete(keys::segment(&(index as u32).to_be_bytes()))
                    .unwrap();
            }
            backend.commit(batch).unwrap();
        }
        let held = backend.snapshot().unwrap();
        let moved = backend.compact_files().unwrap();
        // Every live segment but those in the pack appended to.
        let live = (count / 20 * len) as u64;
        assert!(moved <= live && moved + target >= live, "{moved} of {live}");
        let records = backend.pack_records().unwrap();
        assert!(records.len() <= 3, "emptied packs are gone: {records:?}");
        let packs = backend.packs.size_bytes().unwrap();
        assert!(packs < 2 * moved, "{packs} bytes of packs for {moved} live");
        let snapshot = backend.snapshot().unwrap();
        for index in (0..count as u32).step_by(20) {
            let key = keys::segment(&index.to_be_bytes());
            assert_eq!(snapshot.get(&key).unwrap(), Some(segment(index, len)));
            // A snapshot taken before the move reads the unlinked packs.
            assert_eq!(held.get(&key).unwrap(), Some(segment(index, len)));
        }
        assert_eq!(
            snapshot.get(&keys::segment(&1u32.to_be_bytes())).unwrap(),
            None
        );
        assert!(backend.check_structure().unwrap().is_empty());
        drop((held, snapshot, backend));
        // Reopened: the same, and appends go on.
        let backend = RedbBackend::open(&path).unwrap();
        let snapshot = backend.snapshot().unwrap();
        let key = keys::segment(&20u32.to_be_bytes());
        assert_eq!(snapshot.get(&key).unwrap(), Some(segment(20, len)));
        let mut batch = WriteBatch::new();
        batch.put(keys::segment(b"new"), b"more".to_vec()).unwrap();
        backend.commit(batch).unwrap();
        assert_eq!(
            backend
                .snapshot()
                .unwrap()
                .get(&keys::segment(b"new"))
                .unwrap()
                .as_deref(),
            Some(&b"more"[..])
        );
    }

    /// Rewrites the locator of segment `key` in the closed store at `path`.
    fn tamper_locator(path: &Path, key: &[u8], change: impl FnOnce(&mut Locator)) {
        let database = Database::open(path).unwrap();
        let txn = database.begin_write().unwrap();
        {
            let mut table = txn.open_table(PACKED).unwrap();
            let mut locator = Locator::decode(table.get(key).unwrap().unwrap().value()).unwrap();
            change(&mut locator);
            table.insert(key, &locator.encode()[..]).unwrap();
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_damaged_locator_is_named_by_the_check_and_never_moved_or_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = |index: u32| keys::segment(&index.to_be_bytes());
        {
            let backend = RedbBackend::open(&path).unwrap();
            backend.packs.set_target(1 << 20);
            for start in (0..60u32).step_by(10) {
                let mut batch = WriteBatch::new();
                for index in start..start + 10 {
                    batch.put(key(index), segment(index, 60_000)).unwrap();
                }
                backend.commit(batch).unwrap();
            }
            // The first pack (two batches) mostly dead: all but segment 3.
            let mut batch = WriteBatch::new();
            for index in (0..20).filter(|index| *index != 3) {
                batch.delete(key(index)).unwrap();
            }
            backend.commit(batch).unwrap();
            assert!(backend.check_structure().unwrap().is_empty());
        }
        // A flipped offset: the locator names other bytes of the same pack.
        tamper_locator(&path, &key(3), |locator| locator.offset += 4096);
        let backend = RedbBackend::open(&path).unwrap();
        let packs_before = backend.pack_records().unwrap();
        let error = backend.compact_files().unwrap_err().to_string();
        assert!(error.contains("fingerprint"), "{error}");
        assert_eq!(
            backend.pack_records().unwrap(),
            packs_before,
            "nothing removed"
        );
        for number in packs_before.keys() {
            assert!(backend.packs.path_of(*number).exists());
        }
        assert!(recorded_damage(&path).is_some(), "writes wait for repair");
        drop(backend);
        // A flipped length: the check names the pack whose live bytes disagree.
        tamper_locator(&path, &key(3), |locator| {
            locator.offset -= 4096;
            locator.len -= 1;
        });
        std::fs::remove_file(damage_marker_path(&path)).unwrap();
        let backend = RedbBackend::open(&path).unwrap();
        let problems = backend.check_structure().unwrap();
        assert!(
            problems
                .iter()
                .any(|problem| problem.contains("live bytes")),
            "{problems:?}"
        );
    }

    #[test]
    fn segments_stored_in_the_table_before_pack_files_still_read_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(RedbBackend::open(&path).unwrap());
        {
            let database = Database::open(&path).unwrap();
            let txn = database.begin_write().unwrap();
            txn.open_table(TABLE)
                .unwrap()
                .insert(&keys::segment(b"old")[..], &b"inline segment"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let backend = RedbBackend::open(&path).unwrap();
        let mut batch = WriteBatch::new();
        batch
            .put(keys::segment(b"pak"), b"packed".to_vec())
            .unwrap();
        backend.commit(batch).unwrap();
        let snapshot = backend.snapshot().unwrap();
        assert_eq!(
            snapshot
                .get_slice(&keys::segment(b"old"), 7, 7)
                .unwrap()
                .as_deref(),
            Some(&b"segment"[..])
        );
        let lengths = snapshot
            .scan_key_lengths(Bound::Included(keys::SEGMENT), Bound::Unbounded, 10)
            .unwrap();
        assert_eq!(
            lengths,
            vec![(keys::segment(b"old"), 14), (keys::segment(b"pak"), 6)]
        );
        let mut batch = WriteBatch::new();
        batch.delete(keys::segment(b"old")).unwrap();
        backend.commit(batch).unwrap();
        assert_eq!(
            backend
                .snapshot()
                .unwrap()
                .get(&keys::segment(b"old"))
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_truncated_pack_is_reported_by_the_structure_check_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let backend = RedbBackend::open(&path).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(keys::segment(b"x"), vec![7; 5000]).unwrap();
        backend.commit(batch).unwrap();
        let pack = backend
            .packs
            .path_of(*backend.pack_records().unwrap().keys().next().unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(100)
            .unwrap();
        let problems = backend.check_structure().unwrap();
        assert!(
            problems.iter().any(|p| p.contains("shorter")),
            "{problems:?}"
        );
        let error = backend
            .snapshot()
            .unwrap()
            .get(&keys::segment(b"x"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("corrupt") && error.contains(".pack"),
            "{error}"
        );
        assert!(recorded_damage(&path).is_some());
    }

    #[test]
    fn writes_are_refused_while_damage_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let backend = RedbBackend::open(&path).unwrap();
        backend.record_damage("page 3 is damaged");
        let mut batch = WriteBatch::new();
        batch.put(b"k".to_vec(), b"v".to_vec()).unwrap();
        let error = backend.commit(batch.clone()).unwrap_err().to_string();
        assert!(error.contains("kairos repair"), "{error}");
        assert!(error.contains("page 3 is damaged"), "{error}");
        backend.clear_damage().unwrap();
        backend.commit(batch).unwrap();
    }
}
