//! The ordered key-value interface every backend implements, shaped after FoundationDB:
//! byte keys in order, values of at most 100 kB, atomic batches of at most 10 MB, and
//! optimistic checks that make read-modify-write safe without locks.

use std::ops::Bound;

/// Largest key accepted, in bytes (FoundationDB's limit).
pub const KEY_BYTES_MAX: usize = 10_000;
/// Largest value accepted, in bytes (FoundationDB's limit).
pub const VALUE_BYTES_MAX: usize = 100_000;
/// Largest batch accepted, in bytes of keys and values (FoundationDB's limit).
pub const BATCH_BYTES_MAX: usize = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key of {0} bytes exceeds the limit of {KEY_BYTES_MAX} bytes")]
    KeyTooLarge(usize),
    #[error("value of {0} bytes exceeds the limit of {VALUE_BYTES_MAX} bytes")]
    ValueTooLarge(usize),
    #[error("batch of {0} bytes exceeds the limit of {BATCH_BYTES_MAX} bytes")]
    BatchTooLarge(usize),
    /// A check of the batch failed: another writer changed `key` first. Retry.
    #[error("conflict on key {}: it changed since it was read", printable(.key))]
    Conflict { key: Vec<u8> },
    #[error("the store {0} is in use by another process (a running node? use --node URL)")]
    Busy(String),
    #[error("the store at {path} is corrupt or unreadable: {reason} (see `kairos repair`)")]
    Corrupt { path: String, reason: String },
    /// A check or a read found damage earlier (recorded beside the file): nothing is
    /// written until `kairos repair` has run.
    #[error(
        "the store at {path} was found damaged ({reason}); captures, commits and other writes are refused until `kairos repair` has run"
    )]
    Damaged { path: String, reason: String },
    #[error("store i/o failed: {0}")]
    Io(String),
}

pub fn printable(key: &[u8]) -> String {
    key.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// Key-value pairs as returned by scans.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// A set of mutations applied atomically, guarded by checks on the values of keys.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub(crate) mutations: Vec<Mutation>,
    pub(crate) checks: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub(crate) bytes: usize,
    /// Whether the commit must be on disk when `commit` returns. Batches that are not
    /// durable become durable with the next durable one.
    pub durable: bool,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch {
            durable: true,
            ..WriteBatch::default()
        }
    }

    /// A batch that need not reach disk until a later durable batch commits.
    pub fn deferred() -> WriteBatch {
        WriteBatch::default()
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), KvError> {
        check_key(&key)?;
        if value.len() > VALUE_BYTES_MAX {
            return Err(KvError::ValueTooLarge(value.len()));
        }
        self.grow(key.len() + value.len())?;
        self.mutations.push(Mutation::Put { key, value });
        Ok(())
    }

    pub fn delete(&mut self, key: Vec<u8>) -> Result<(), KvError> {
        check_key(&key)?;
        self.grow(key.len())?;
        self.mutations.push(Mutation::Delete { key });
        Ok(())
    }

    /// The batch commits only if `key` still holds `expected` (`None`: absent).
    pub fn check(&mut self, key: Vec<u8>, expected: Option<Vec<u8>>) -> Result<(), KvError> {
        check_key(&key)?;
        self.grow(key.len())?;
        self.checks.push((key, expected));
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty() && self.checks.is_empty()
    }

    pub fn mutations(&self) -> &[Mutation] {
        &self.mutations
    }

    pub fn checks(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.checks
    }

    fn grow(&mut self, bytes: usize) -> Result<(), KvError> {
        let total = self.bytes + bytes;
        if total > BATCH_BYTES_MAX {
            return Err(KvError::BatchTooLarge(total));
        }
        self.bytes = total;
        Ok(())
    }
}

fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.len() > KEY_BYTES_MAX {
        return Err(KvError::KeyTooLarge(key.len()));
    }
    Ok(())
}

/// A consistent read view of the store.
pub trait KvSnapshot: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(key)?.is_some())
    }

    /// The values of `keys`, in order. A remote backend sends the reads together (one
    /// round trip instead of one per key); the embedded one reads them one by one.
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// `len` bytes of the value of `key` from `offset`; `None` if the key is absent or the
    /// value is shorter.
    fn get_slice(&self, key: &[u8], offset: usize, len: usize) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.get(key)?.and_then(|value| {
            value
                .get(offset..offset.checked_add(len)?)
                .map(<[u8]>::to_vec)
        }))
    }

    /// Up to `limit` pairs (none for 0) with keys between the bounds, ascending or
    /// descending (from the end bound down).
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, KvError>;

    /// Up to `limit` keys in `[start, end)` ascending, each with its value's length in bytes,
    /// without copying the values (garbage collection and store figures list segments).
    fn scan_key_lengths(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, usize)>, KvError> {
        Ok(self
            .scan(start, end, limit, false)?
            .into_iter()
            .map(|(key, value)| (key, value.len()))
            .collect())
    }
}

/// The catalog as the store holds it beside its copy (see [`KvBackend::catalog_with_copy`]).
#[derive(Debug, Clone)]
pub struct CatalogComparison {
    pub catalog: Pairs,
    /// How many committed batches changed the catalog.
    pub sequence: u64,
    /// The copy as read from its file (`None`: the file is missing).
    pub copy: Option<crate::catalog_copy::CatalogCopyRead>,
}

/// An ordered key-value store with atomic batches.
pub trait KvBackend: Send + Sync {
    fn snapshot(&self) -> Result<Box<dyn KvSnapshot>, KvError>;
    /// Applies the whole batch or nothing; fails with [`KvError::Conflict`] if a check fails.
    fn commit(&self, batch: WriteBatch) -> Result<(), KvError>;
    /// Bytes the backend occupies on disk (FoundationDB: its estimate of the store's
    /// key range).
    fn size_bytes(&self) -> Result<u64, KvError>;

    /// Makes every batch committed so far durable (those committed without a flush too).
    /// A backend whose every commit is durable (FoundationDB) has nothing to do.
    fn sync(&self) -> Result<(), KvError> {
        Ok(())
    }

    /// The local file the backend keeps its data in, if it is one (a restore refuses a
    /// target that would write over the directory holding it).
    fn local_file(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Damage the backend's own structure check finds (pages, commit slots, tables), each
    /// naming what is damaged; empty when intact or when the backend has no such check.
    fn check_structure(&self) -> Result<Vec<String>, KvError> {
        Ok(Vec::new())
    }

    /// The catalog, its sequence and the catalog copy kept outside the backend's main
    /// file, read while no catalog change commits; `None` if the backend keeps no copy.
    fn catalog_with_copy(&self) -> Result<Option<CatalogComparison>, KvError> {
        Ok(None)
    }

    /// Rewrites the catalog copy from the backend's catalog.
    fn rewrite_catalog_copy(&self) -> Result<(), KvError> {
        Ok(())
    }

    /// Damage recorded by an earlier check or read, if any (writes are refused meanwhile).
    fn damage(&self) -> Option<String> {
        None
    }

    /// Records damage found (by `verify`): writes are refused until it is cleared.
    fn record_damage(&self, _reason: &str) {}

    /// Clears recorded damage (after a check found the store intact, or a repair).
    fn clear_damage(&self) -> Result<(), KvError> {
        Ok(())
    }

    /// Gives back space held by deleted values where the backend keeps them in files it
    /// appends to (the embedded backend's pack files: live segments of mostly dead packs
    /// move, and emptied packs are unlinked). Returns the bytes moved. Runs while other
    /// writers go on.
    fn compact_files(&self) -> Result<u64, KvError> {
        Ok(0)
    }

    /// Bytes of the files the backend appends values to that no value uses any more.
    fn dead_file_bytes(&self) -> Result<u64, KvError> {
        Ok(0)
    }

    /// Whether one process holds the backend while it is open (the embedded store): then
    /// every writer of the store is in this process and garbage collection may run here.
    fn held_by_one_process(&self) -> bool {
        false
    }

    /// A number that changes with every committed batch that changes the catalog (`None`:
    /// the backend keeps none).
    fn catalog_changes(&self) -> Result<Option<u64>, KvError> {
        Ok(None)
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Every pair whose key starts with `prefix`, read in pages of `page` pairs.
pub fn scan_prefix(
    snapshot: &dyn KvSnapshot,
    prefix: &[u8],
    page: usize,
) -> Result<Pairs, KvError> {
    let end = prefix_end(prefix);
    let mut out = Vec::new();
    let mut start = prefix.to_vec();
    let mut include_start = true;
    loop {
        let start_bound = if include_start {
            Bound::Included(start.as_slice())
        } else {
            Bound::Excluded(start.as_slice())
        };
        let end_bound = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        let batch = snapshot.scan(start_bound, end_bound, page, false)?;
        let full = batch.len() == page;
        if let Some((last, _)) = batch.last() {
            start = last.clone();
            include_start = false;
        }
        out.extend(batch);
        if !full {
            return Ok(out);
        }
    }
}
