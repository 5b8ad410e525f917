//! The embedded backend: one redb file, fsync on every durable commit. One process holds
//! the file at a time; another waits for it (up to ten seconds) before reporting it busy.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Durability, ReadOnlyTable, ReadableDatabase,
    ReadableTable, StorageError, TableDefinition, TransactionError,
};

use crate::kv::{KvBackend, KvError, KvSnapshot, Mutation, WriteBatch};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kairos");
/// The page cache used unless another size is asked for.
pub const CACHE_BYTES_DEFAULT: usize = 64 << 20;
/// How long opening waits for another process that holds the file.
const OPEN_WAIT: Duration = Duration::from_secs(10);

pub struct RedbBackend {
    database: Database,
    path: PathBuf,
}

impl RedbBackend {
    /// Opens the store file at `path`, creating it if absent.
    pub fn open(path: &Path) -> Result<RedbBackend, KvError> {
        RedbBackend::open_with_cache(path, CACHE_BYTES_DEFAULT)
    }

    /// Opens with a page cache of at most `cache_bytes` (memory stays bounded however
    /// large the store grows).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<RedbBackend, KvError> {
        let started = Instant::now();
        let database = loop {
            let mut builder = Builder::new();
            builder.set_concurrency_mode(ConcurrencyMode::ExclusiveWriter);
            builder.set_cache_size(cache_bytes);
            match builder.create(path) {
                Ok(database) => break database,
                Err(DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < OPEN_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => return Err(database_error(path, error)),
            }
        };
        let backend = RedbBackend {
            database,
            path: path.to_path_buf(),
        };
        let txn = backend
            .database
            .begin_write()
            .map_err(|error| backend.txn_error(error))?;
        txn.open_table(TABLE)
            .map_err(|error| backend.corrupt(error.to_string()))?;
        txn.commit()
            .map_err(|error| backend.corrupt(error.to_string()))?;
        Ok(backend)
    }

    fn corrupt(&self, reason: String) -> KvError {
        KvError::Corrupt {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn txn_error(&self, error: TransactionError) -> KvError {
        match error {
            TransactionError::Storage(storage) => storage_error(&self.path, storage),
            other => KvError::Io(other.to_string()),
        }
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

struct RedbSnapshot {
    table: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    path: PathBuf,
}

impl RedbSnapshot {
    fn error(&self, error: StorageError) -> KvError {
        storage_error(&self.path, error)
    }
}

impl KvSnapshot for RedbSnapshot {
    fn get_slice(&self, key: &[u8], offset: usize, len: usize) -> Result<Option<Vec<u8>>, KvError> {
        let Some(table) = &self.table else {
            return Ok(None);
        };
        let Some(value) = table.get(key).map_err(|error| self.error(error))? else {
            return Ok(None);
        };
        let value = value.value();
        Ok(offset
            .checked_add(len)
            .and_then(|end| value.get(offset..end))
            .map(<[u8]>::to_vec))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        let Some(table) = &self.table else {
            return Ok(false);
        };
        Ok(table.get(key).map_err(|error| self.error(error))?.is_some())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let Some(table) = &self.table else {
            return Ok(None);
        };
        Ok(table
            .get(key)
            .map_err(|error| self.error(error))?
            .map(|value| value.value().to_vec()))
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<crate::kv::Pairs, KvError> {
        let Some(table) = &self.table else {
            return Ok(Vec::new());
        };
        let range = table
            .range::<&[u8]>((start, end))
            .map_err(|error| self.error(error))?;
        let mut out = Vec::new();
        let mut push = |item: Result<_, StorageError>| -> Result<bool, KvError> {
            let (key, value): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) =
                item.map_err(|error| self.error(error))?;
            out.push((key.value().to_vec(), value.value().to_vec()));
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
    }
}

impl KvBackend for RedbBackend {
    fn snapshot(&self) -> Result<Box<dyn KvSnapshot>, KvError> {
        let txn = self
            .database
            .begin_read()
            .map_err(|error| self.txn_error(error))?;
        let table = match txn.open_table(TABLE) {
            Ok(table) => Some(table),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(error) => return Err(self.corrupt(error.to_string())),
        };
        Ok(Box::new(RedbSnapshot {
            table,
            path: self.path.clone(),
        }))
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), KvError> {
        let mut txn = self
            .database
            .begin_write()
            .map_err(|error| self.txn_error(error))?;
        if !batch.durable {
            txn.set_durability(Durability::None)
                .map_err(|error| KvError::Io(error.to_string()))?;
        }
        {
            let mut table = txn
                .open_table(TABLE)
                .map_err(|error| self.corrupt(error.to_string()))?;
            for (key, expected) in &batch.checks {
                let current = table
                    .get(key.as_slice())
                    .map_err(|error| storage_error(&self.path, error))?
                    .map(|value| value.value().to_vec());
                if current.as_deref() != expected.as_deref() {
                    return Err(KvError::Conflict { key: key.clone() });
                }
            }
            for mutation in &batch.mutations {
                match mutation {
                    Mutation::Put { key, value } => {
                        table
                            .insert(key.as_slice(), value.as_slice())
                            .map_err(|error| storage_error(&self.path, error))?;
                    }
                    Mutation::Delete { key } => {
                        table
                            .remove(key.as_slice())
                            .map_err(|error| storage_error(&self.path, error))?;
                    }
                }
            }
        }
        txn.commit().map_err(|error| match error {
            redb::CommitError::Storage(storage) => storage_error(&self.path, storage),
            other => KvError::Io(other.to_string()),
        })
    }

    fn size_bytes(&self) -> Result<u64, KvError> {
        std::fs::metadata(&self.path)
            .map(|metadata| metadata.len())
            .map_err(|error| KvError::Io(format!("{}: {error}", self.path.display())))
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
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let backend = RedbBackend::open(&path).unwrap();
            let mut batch = WriteBatch::new();
            batch.put(b"k".to_vec(), b"v".to_vec()).unwrap();
            backend.commit(batch).unwrap();
        }
        let backend = RedbBackend::open(&path).unwrap();
        let snapshot = backend.snapshot().unwrap();
        assert_eq!(snapshot.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
