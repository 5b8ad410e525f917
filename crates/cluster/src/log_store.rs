//! The log and the vote, durable in `raft/log.redb`. An append is one write transaction
//! (all the entries openraft hands over at once: a burst of commands costs one sync), a
//! vote is written and synced before it is acknowledged.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::{Entry, LogId, NodeId, StorageError, TypeConfig, io_error};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// Makes the state machine durable up to what it applied (called before log entries it
/// applied are purged: until then, a crash replays them).
pub type FlushStateMachine = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    flush: FlushStateMachine,
}

impl LogStore {
    /// Opens (creating) the log in `path`.
    pub fn open(path: &Path, flush: FlushStateMachine) -> Result<LogStore, String> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|error| format!("{}: {error}", parent.display()))?;
        }
        let db = Database::create(path).map_err(|error| format!("{}: {error}", path.display()))?;
        let txn = db
            .begin_write()
            .map_err(|error| format!("{}: {error}", path.display()))?;
        txn.open_table(LOG)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        txn.open_table(META)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        txn.commit()
            .map_err(|error| format!("{}: {error}", path.display()))?;
        Ok(LogStore {
            db: Arc::new(db),
            flush,
        })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StorageError> {
        let read = |error: &dyn std::fmt::Display| {
            io_error(
                ErrorSubject::Store,
                ErrorVerb::Read,
                format!("{name}: {error}"),
            )
        };
        let txn = self.db.begin_read().map_err(|e| read(&e))?;
        let table = txn.open_table(META).map_err(|e| read(&e))?;
        match table.get(name).map_err(|e| read(&e))? {
            Some(value) => serde_json::from_slice(value.value())
                .map(Some)
                .map_err(|e| read(&e)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        name: &str,
        value: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let write =
            |error: &dyn std::fmt::Display| io_error(subject.clone(), ErrorVerb::Write, error);
        let bytes = serde_json::to_vec(value).map_err(|e| write(&e))?;
        let txn = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut table = txn.open_table(META).map_err(|e| write(&e))?;
            table
                .insert(name, bytes.as_slice())
                .map_err(|e| write(&e))?;
        }
        txn.commit().map_err(|e| write(&e))
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let read =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Read, error);
        let txn = self.db.begin_read().map_err(|e| read(&e))?;
        let table = txn.open_table(LOG).map_err(|e| read(&e))?;
        match table.last().map_err(|e| read(&e))? {
            Some((_, value)) => {
                let entry: Entry = serde_json::from_slice(value.value()).map_err(|e| read(&e))?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// How many entries the log holds (for the status endpoint).
    pub fn entries(&self) -> u64 {
        self.db
            .begin_read()
            .ok()
            .and_then(|txn| txn.open_table(LOG).ok())
            .and_then(|table| table.len().ok())
            .unwrap_or(0)
    }
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => Some(end),
        Bound::Excluded(&end) => end.checked_sub(1),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let read =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Read, error);
        let (start, end) = bounds(&range);
        if end.is_some_and(|end| end < start) {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(|e| read(&e))?;
        let table = txn.open_table(LOG).map_err(|e| read(&e))?;
        let iter = match end {
            Some(end) => table.range(start..=end),
            None => table.range(start..),
        }
        .map_err(|e| read(&e))?;
        let mut out = Vec::new();
        for item in iter {
            let (_, value) = item.map_err(|e| read(&e))?;
            out.push(serde_json::from_slice(value.value()).map_err(|e| read(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: a hint for the next start (it becomes durable with the
        // next append or vote), never needed for safety.
        let write =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Store, ErrorVerb::Write, error);
        let bytes = serde_json::to_vec(&committed).map_err(|e| write(&e))?;
        let mut txn = self.db.begin_write().map_err(|e| write(&e))?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| write(&e))?;
        {
            let mut table = txn.open_table(META).map_err(|e| write(&e))?;
            table
                .insert(COMMITTED, bytes.as_slice())
                .map_err(|e| write(&e))?;
        }
        txn.commit().map_err(|e| write(&e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let write =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Write, error);
        let txn = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut table = txn.open_table(LOG).map_err(|e| write(&e))?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(|e| write(&e))?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| write(&e))?;
            }
        }
        match txn.commit() {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(write(&error))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Delete, error);
        let txn = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut table = txn.open_table(LOG).map_err(|e| write(&e))?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(|e| write(&e))?;
        }
        txn.commit().map_err(|e| write(&e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write =
            |error: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Delete, error);
        // The entries go only once what they did is durable in the store.
        (self.flush)().map_err(|e| write(&e))?;
        let bytes = serde_json::to_vec(&log_id).map_err(|e| write(&e))?;
        let txn = self.db.begin_write().map_err(|e| write(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| write(&e))?;
            meta.insert(PURGED, bytes.as_slice())
                .map_err(|e| write(&e))?;
            let mut table = txn.open_table(LOG).map_err(|e| write(&e))?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(|e| write(&e))?;
        }
        txn.commit().map_err(|e| write(&e))
    }
}
