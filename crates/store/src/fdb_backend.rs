//! The FoundationDB backend (`--features foundationdb`): the store's key-value interface on
//! a FoundationDB cluster, for stores that outgrow one machine.
//!
//! How it honours FoundationDB's limits:
//! - **Keys and values.** [`WriteBatch`] already refuses keys over 10 kB, values over
//!   100 kB and batches over 10 MB of keys and values. Keys here carry the store's
//!   subspace prefix, and FoundationDB counts conflict ranges in a transaction's size, so
//!   [`transaction_bytes`] estimates the size as FoundationDB does and a batch over its
//!   10 MB is refused before it is sent, as `BatchTooLarge`, never split (a batch is
//!   atomic).
//! - **Five seconds.** A transaction may read at one read version for 5 s only. A
//!   [`KvSnapshot`] here pins one read version and renews it (a fresh transaction at the
//!   current version) when it is older than [`SNAPSHOT_RENEW_AFTER`] or when FoundationDB
//!   reports it too old; a scan that was cut continues after the last key it returned. A
//!   long-lived snapshot is therefore consistent within each 4-second window, not across
//!   them: objects are content-addressed (a key's value never changes once written) and
//!   every catalog write is guarded by optimistic checks in its own batch, so no write is
//!   ever decided on a stale view; what a reader older than 5 s can see is a newer catalog
//!   value, or an object collected meanwhile reading as missing.
//! - **Commits** are one transaction each: the checks are read inside it (so they become
//!   read conflict ranges, and a concurrent writer of a checked key makes the commit retry
//!   and the check decide again), then the mutations, then the commit. Retryable errors
//!   are retried through FoundationDB's `on_error` (with its backoff) at most
//!   [`COMMIT_ATTEMPTS_MAX`] times. A commit whose result is unknown
//!   (`commit_unknown_result`) is not applied twice: a guarded batch also writes a
//!   commit marker, and the retry first looks for it.
//! - **Reads** are batched: [`KvSnapshot::get_many`] sends every read at once (one round
//!   trip), and scans ask for whole ranges (`want_all`), not one key at a time.
//! - **Time.** Every transaction, its retries included, is cancelled
//!   [`TRANSACTION_TIMEOUT_MS`] after it began, so an unreachable cluster is reported
//!   instead of waited for. (A commit cancelled by its timeout may still have landed, as
//!   FoundationDB documents; it is reported as failed.)
//! - **Durability.** Every FoundationDB commit is durable when it returns: a batch made
//!   with [`WriteBatch::deferred`] is as durable as any other.
//!
//! Several stores can share a cluster: each lives under its own key prefix
//! (`[store] key_prefix`): `<prefix> 0x01 <key>` holds the store's keys, `<prefix> 0x02
//! <name>` the backend's own (the damage marker, commit markers).
//!
//! FoundationDB's network thread is started once per process ([`network`]) and stopped
//! when the process exits.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{StreamingMode, TransactionOption};
use foundationdb::{Database, FdbError, KeySelector, RangeOption, Transaction};
use futures::executor::block_on;
use futures::future::try_join_all;

use kairos_core::FdbLocation;
use kairos_core::store_backend::check_key_prefix;

use crate::fdb_layout::{DATA_TAG, META_TAG, TRANSACTION_BYTES_MAX, subspace, transaction_bytes};
use crate::kv::{
    KEY_BYTES_MAX, KvBackend, KvError, KvSnapshot, Mutation, Pairs, VALUE_BYTES_MAX, WriteBatch,
    printable,
};

/// Every transaction is cancelled after this long (an unreachable cluster is an error).
pub const TRANSACTION_TIMEOUT_MS: i32 = 10_000;
/// Attempts of one commit on retryable errors (conflicts on checked keys, recoveries).
pub const COMMIT_ATTEMPTS_MAX: usize = 10;
/// A snapshot takes a fresh read version once its own is this old (FoundationDB's limit
/// is 5 s).
pub const SNAPSHOT_RENEW_AFTER: Duration = Duration::from_secs(4);
/// Renewals of a snapshot's read version in one read that made no progress.
const READ_ATTEMPTS_MAX: usize = 5;
/// Reads sent together by `get_many`.
const GET_MANY_BATCH: usize = 1024;

const DAMAGE_KEY: &[u8] = b"damaged";
const COMMIT_MARKER: &[u8] = b"commit/";
/// Handles opened by this process (part of every commit marker).
static HANDLES_OPENED: AtomicU64 = AtomicU64::new(0);

// FoundationDB error codes this backend tells apart.
const TRANSACTION_TOO_OLD: i32 = 1007;
const TRANSACTION_TIMED_OUT: i32 = 1031;
const TRANSACTION_TOO_LARGE: i32 = 2101;
const KEY_TOO_LARGE: i32 = 2102;
const VALUE_TOO_LARGE: i32 = 2103;

/// The network thread, started on first use; stopped by [`stop_network_at_exit`].
static NETWORK: OnceLock<Result<(), String>> = OnceLock::new();
static NETWORK_GUARD: Mutex<Option<NetworkAutoStop>> = Mutex::new(None);

/// Starts FoundationDB's client (API version 7.3) and its network thread, once per
/// process; the thread runs until the process exits.
pub fn network() -> Result<(), KvError> {
    NETWORK
        .get_or_init(|| {
            let builder = FdbApiBuilder::default()
                .build()
                .map_err(|error| format!("selecting the FoundationDB API version: {error}"))?;
            // SAFETY: `boot` requires its guard to be dropped before the process exits; the
            // guard is kept in `NETWORK_GUARD` and dropped by `stop_network_at_exit`, which
            // is registered right below and runs when the process exits.
            let guard = unsafe { builder.boot() }
                .map_err(|error| format!("starting the FoundationDB network thread: {error}"))?;
            *NETWORK_GUARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
            // SAFETY: `stop_network_at_exit` is an `extern "C" fn()` that neither unwinds
            // (it catches panics) nor calls `exit`.
            let registered = unsafe { libc::atexit(stop_network_at_exit) };
            if registered != 0 {
                return Err("registering the FoundationDB network stop at exit failed".into());
            }
            Ok(())
        })
        .clone()
        .map_err(KvError::Io)
}

/// Stops the network thread and waits for it (FoundationDB requires this before exit).
extern "C" fn stop_network_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        // A poisoned lock still holds the guard: a panic elsewhere never stops the stop.
        let guard = NETWORK_GUARD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(guard);
    });
}

/// A store on a FoundationDB cluster.
pub struct FdbBackend {
    database: Arc<Database>,
    /// `<prefix> 0x01`: every key of the store starts with it.
    data_prefix: Vec<u8>,
    /// `<prefix> 0x02`: the backend's own keys.
    meta_prefix: Vec<u8>,
    /// Names the cluster in messages.
    cluster: String,
    /// Commit markers of this handle, distinct from every other handle's.
    marker_stem: Vec<u8>,
    markers_written: AtomicU64,
    /// Markers of committed batches, cleared by the next commit.
    markers_to_clear: Mutex<Vec<Vec<u8>>>,
}

impl FdbBackend {
    /// Connects to the cluster of `location` and checks it answers (a read of the store's
    /// damage marker, within [`TRANSACTION_TIMEOUT_MS`]).
    pub fn open(location: &FdbLocation) -> Result<FdbBackend, KvError> {
        check_key_prefix(&location.key_prefix)
            .map_err(|reason| KvError::Io(format!("foundationdb store: {reason}")))?;
        network()?;
        let cluster = match &location.cluster_file {
            Some(path) => format!("cluster file {}", path.display()),
            None => format!("cluster file {}", foundationdb::default_config_path()),
        };
        let database = match &location.cluster_file {
            Some(path) => {
                let text = path_text(path)?;
                Database::from_path(text)
            }
            None => Database::default(),
        }
        .map_err(|error| KvError::Io(format!("foundationdb {cluster}: {error}")))?;
        let data_prefix = subspace(&location.key_prefix, DATA_TAG);
        let meta_prefix = subspace(&location.key_prefix, META_TAG);
        let handle = HANDLES_OPENED.fetch_add(1, Ordering::Relaxed);
        let marker_stem = blake3::hash(
            format!(
                "{}:{handle}:{:?}",
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        )
        .as_bytes()[..16]
            .to_vec();
        let backend = FdbBackend {
            database: Arc::new(database),
            data_prefix,
            meta_prefix,
            cluster,
            marker_stem,
            markers_written: AtomicU64::new(0),
            markers_to_clear: Mutex::new(Vec::new()),
        };
        backend.read_damage()?;
        Ok(backend)
    }

    /// Removes every key of this store from the cluster (the backend's own keys too).
    pub fn remove_all(&self) -> Result<(), KvError> {
        let (begin, end) = self.whole_range();
        self.run_once("removing the store", |trx| {
            trx.clear_range(&begin, &end);
            Ok(())
        })
    }

    fn data_key(&self, key: &[u8]) -> Vec<u8> {
        [self.data_prefix.as_slice(), key].concat()
    }

    /// `[<prefix> 0x01, <prefix> 0x03)`: every key of this store and of this backend, and
    /// nothing of a store whose prefix merely starts with this one.
    fn whole_range(&self) -> (Vec<u8>, Vec<u8>) {
        let mut end = self.meta_prefix.clone();
        *end.last_mut().expect("the prefix ends with its tag") += 1;
        (self.data_prefix.clone(), end)
    }

    fn meta_key(&self, name: &[u8]) -> Vec<u8> {
        [self.meta_prefix.as_slice(), name].concat()
    }

    fn transaction(&self) -> Result<Transaction, KvError> {
        new_transaction(&self.database, &self.cluster)
    }

    fn error(&self, what: &str, error: FdbError) -> KvError {
        fdb_error(&self.cluster, what, error)
    }

    /// One transaction with retries on retryable errors (for idempotent writes only).
    fn run_once(
        &self,
        what: &str,
        write: impl Fn(&Transaction) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let mut trx = self.transaction()?;
        let mut attempt = 1;
        loop {
            write(&trx)?;
            match block_on(trx.commit()) {
                Ok(_) => return Ok(()),
                Err(error) if error.is_retryable() && attempt < COMMIT_ATTEMPTS_MAX => {
                    attempt += 1;
                    trx = block_on(error.on_error()).map_err(|e| self.error(what, e))?;
                    set_options(&trx, &self.cluster)?;
                }
                Err(error) => return Err(self.error(what, *error)),
            }
        }
    }

    fn read_damage(&self) -> Result<Option<String>, KvError> {
        let trx = self.transaction()?;
        let value = block_on(trx.get(&self.meta_key(DAMAGE_KEY), true))
            .map_err(|error| self.error("reading the damage marker", error))?;
        Ok(value.map(|value| String::from_utf8_lossy(&value).into_owned()))
    }

    /// One attempt of a commit: `Ok(Err(conflict))` when a check failed, `Err` on an
    /// error FoundationDB may let us retry.
    async fn attempt(
        &self,
        trx: &Transaction,
        batch: &WriteBatch,
        marker: Option<&[u8]>,
        maybe_committed: bool,
    ) -> Result<Result<(), KvError>, FdbError> {
        if maybe_committed && let Some(marker) = marker {
            // The previous attempt's result is unknown: its marker says whether it landed.
            if trx.get(marker, false).await?.is_some() {
                return Ok(Ok(()));
            }
        }
        let damage = trx.get(&self.meta_key(DAMAGE_KEY), true);
        // Non-snapshot reads: each checked key becomes a read conflict range.
        let checks = try_join_all(
            batch
                .checks
                .iter()
                .map(|(key, _)| trx.get(&self.data_key(key), false)),
        );
        let (damage, current) = futures::future::try_join(damage, checks).await?;
        if let Some(reason) = damage {
            return Ok(Err(KvError::Damaged {
                path: self.cluster.clone(),
                reason: String::from_utf8_lossy(&reason).into_owned(),
            }));
        }
        for ((key, expected), current) in batch.checks.iter().zip(current) {
            if current.as_deref() != expected.as_deref() {
                return Ok(Err(KvError::Conflict { key: key.clone() }));
            }
        }
        for mutation in &batch.mutations {
            match mutation {
                Mutation::Put { key, value } => trx.set(&self.data_key(key), value),
                Mutation::Delete { key } => trx.clear(&self.data_key(key)),
            }
        }
        if let Some(marker) = marker {
            trx.set(marker, b"");
        }
        Ok(Ok(()))
    }

    fn next_marker(&self) -> Vec<u8> {
        let count = self.markers_written.fetch_add(1, Ordering::Relaxed);
        let mut marker = self.meta_key(COMMIT_MARKER);
        marker.extend_from_slice(&self.marker_stem);
        marker.extend_from_slice(&count.to_be_bytes());
        marker
    }
}

fn path_text(path: &Path) -> Result<&str, KvError> {
    path.to_str()
        .filter(|text| !text.contains('\0'))
        .ok_or_else(|| {
            KvError::Io(format!(
                "foundationdb cluster file {}: the path is not valid UTF-8 without NUL bytes",
                path.display()
            ))
        })
}

fn new_transaction(database: &Database, cluster: &str) -> Result<Transaction, KvError> {
    let trx = database
        .create_trx()
        .map_err(|error| fdb_error(cluster, "starting a transaction", error))?;
    set_options(&trx, cluster)?;
    Ok(trx)
}

fn set_options(trx: &Transaction, cluster: &str) -> Result<(), KvError> {
    trx.set_option(TransactionOption::Timeout(TRANSACTION_TIMEOUT_MS))
        .map_err(|error| fdb_error(cluster, "setting the transaction timeout", error))
}

/// A FoundationDB error as the store reports it.
fn fdb_error(cluster: &str, what: &str, error: FdbError) -> KvError {
    match error.code() {
        TRANSACTION_TIMED_OUT => KvError::Io(format!(
            "foundationdb {cluster}: {what}: no answer within {} s (is the cluster reachable and its cluster file current?)",
            TRANSACTION_TIMEOUT_MS / 1000
        )),
        TRANSACTION_TOO_OLD => KvError::Io(format!(
            "foundationdb {cluster}: {what}: the read version is older than FoundationDB's 5-second transaction limit"
        )),
        code => KvError::Io(format!(
            "foundationdb {cluster}: {what}: {} (error {code})",
            error.message()
        )),
    }
}

impl KvBackend for FdbBackend {
    fn snapshot(&self) -> Result<Box<dyn KvSnapshot>, KvError> {
        Ok(Box::new(FdbSnapshot {
            database: self.database.clone(),
            data_prefix: self.data_prefix.clone(),
            cluster: self.cluster.clone(),
            view: RwLock::new(View::new(&self.database, &self.cluster)?),
        }))
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), KvError> {
        if batch.is_empty() {
            return Ok(());
        }
        let prefix_bytes = self.data_prefix.len();
        for key in batch
            .mutations
            .iter()
            .map(|mutation| match mutation {
                Mutation::Put { key, .. } | Mutation::Delete { key } => key,
            })
            .chain(batch.checks.iter().map(|(key, _)| key))
        {
            if prefix_bytes + key.len() > KEY_BYTES_MAX {
                return Err(KvError::KeyTooLarge(prefix_bytes + key.len()));
            }
        }
        let bytes = transaction_bytes(&batch, prefix_bytes);
        if bytes > TRANSACTION_BYTES_MAX {
            return Err(KvError::BatchTooLarge(bytes));
        }
        // Only a guarded batch needs a marker: an unguarded one applied twice is the same.
        let marker = (!batch.checks.is_empty()).then(|| self.next_marker());
        let clearing: Vec<Vec<u8>> = std::mem::take(
            &mut *self
                .markers_to_clear
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let outcome = self.commit_with_retries(&batch, marker.as_deref(), &clearing, bytes);
        let mut pending = self
            .markers_to_clear
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if outcome.is_err() {
            // Not cleared by this commit: the next one clears them.
            pending.extend(clearing);
        }
        if let Some(marker) = marker.filter(|_| outcome.is_ok()) {
            pending.push(marker);
        }
        outcome
    }

    fn size_bytes(&self) -> Result<u64, KvError> {
        let (begin, end) = self.whole_range();
        let trx = self.transaction()?;
        let bytes = block_on(trx.get_estimated_range_size_bytes(&begin, &end))
            .map_err(|error| self.error("estimating the store's size", error))?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    fn damage(&self) -> Option<String> {
        self.read_damage().ok().flatten()
    }

    fn record_damage(&self, reason: &str) {
        let key = self.meta_key(DAMAGE_KEY);
        let _ = self.run_once("recording damage", |trx| {
            trx.set(&key, reason.as_bytes());
            Ok(())
        });
    }

    fn clear_damage(&self) -> Result<(), KvError> {
        let key = self.meta_key(DAMAGE_KEY);
        self.run_once("clearing the damage marker", |trx| {
            trx.clear(&key);
            Ok(())
        })
    }
}

impl FdbBackend {
    /// Commits `batch` in one transaction, retrying retryable errors at most
    /// [`COMMIT_ATTEMPTS_MAX`] times; `clearing` are earlier commit markers to remove.
    fn commit_with_retries(
        &self,
        batch: &WriteBatch,
        marker: Option<&[u8]>,
        clearing: &[Vec<u8>],
        bytes: usize,
    ) -> Result<(), KvError> {
        let mut trx = self.transaction()?;
        // Once an attempt may have committed, every later one looks for its marker first.
        let mut maybe_committed = false;
        let mut attempt = 1;
        loop {
            let error = match block_on(self.attempt(&trx, batch, marker, maybe_committed)) {
                Ok(Err(refused)) => return Err(refused),
                Ok(Ok(())) => {
                    for old in clearing {
                        trx.clear(old);
                    }
                    match block_on(trx.commit()) {
                        Ok(_) => return Ok(()),
                        Err(error) => {
                            maybe_committed |= error.is_maybe_committed();
                            if attempt == COMMIT_ATTEMPTS_MAX || !error.is_retryable() {
                                return Err(self.commit_error(*error, bytes));
                            }
                            trx = block_on(error.on_error())
                                .map_err(|error| self.commit_error(error, bytes))?;
                            None
                        }
                    }
                }
                Err(error) => Some(error),
            };
            if let Some(error) = error {
                if attempt == COMMIT_ATTEMPTS_MAX || !error.is_retryable() {
                    return Err(self.commit_error(error, bytes));
                }
                trx = block_on(trx.on_error(error))
                    .map_err(|error| self.commit_error(error, bytes))?;
            }
            set_options(&trx, &self.cluster)?;
            attempt += 1;
        }
    }

    fn commit_error(&self, error: FdbError, bytes: usize) -> KvError {
        match error.code() {
            TRANSACTION_TOO_LARGE => KvError::BatchTooLarge(bytes.max(TRANSACTION_BYTES_MAX + 1)),
            KEY_TOO_LARGE => KvError::KeyTooLarge(KEY_BYTES_MAX + 1),
            VALUE_TOO_LARGE => KvError::ValueTooLarge(VALUE_BYTES_MAX + 1),
            _ => self.error("committing a batch", error),
        }
    }
}

impl Drop for FdbBackend {
    fn drop(&mut self) {
        let markers = std::mem::take(
            &mut *self
                .markers_to_clear
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if !markers.is_empty() {
            // Best effort: a marker left behind is a few bytes, never read again.
            let _ = self.run_once("clearing commit markers", |trx| {
                for marker in &markers {
                    trx.clear(marker);
                }
                Ok(())
            });
        }
    }
}

/// One read version of a snapshot.
struct View {
    trx: Arc<Transaction>,
    started: Instant,
    /// Counts renewals, so concurrent readers renew a view once.
    generation: u64,
}

impl View {
    fn new(database: &Database, cluster: &str) -> Result<View, KvError> {
        Ok(View {
            trx: Arc::new(new_transaction(database, cluster)?),
            started: Instant::now(),
            generation: 0,
        })
    }
}

/// A read view at one read version, renewed when it nears FoundationDB's 5-second limit
/// (see the module documentation).
struct FdbSnapshot {
    database: Arc<Database>,
    data_prefix: Vec<u8>,
    cluster: String,
    view: RwLock<View>,
}

impl FdbSnapshot {
    /// The current transaction, renewed first when it is near the 5-second limit.
    fn current(&self) -> Result<(Arc<Transaction>, u64), KvError> {
        {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            if view.started.elapsed() < SNAPSHOT_RENEW_AFTER {
                return Ok((view.trx.clone(), view.generation));
            }
        }
        let generation = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        self.renew(generation)
    }

    /// Replaces the view's transaction with one at a fresh read version, unless another
    /// reader already did since `generation`.
    fn renew(&self, generation: u64) -> Result<(Arc<Transaction>, u64), KvError> {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        if view.generation == generation {
            *view = View {
                generation: generation + 1,
                ..View::new(&self.database, &self.cluster)?
            };
        }
        Ok((view.trx.clone(), view.generation))
    }

    /// Runs `read` on the view, renewing it when FoundationDB says its read version is too
    /// old (or its time is up) or asks for a retry; `progress` tells whether the failed
    /// attempt got anywhere (a scan keeps what it read), which resets the attempt count.
    fn read<T>(
        &self,
        what: impl Fn() -> String,
        mut read: impl FnMut(&Transaction) -> Result<T, (FdbError, bool)>,
    ) -> Result<T, KvError> {
        let (mut trx, mut generation) = self.current()?;
        let mut attempts = 0;
        loop {
            match read(&trx) {
                Ok(value) => return Ok(value),
                Err((error, progress)) => {
                    let renewable =
                        matches!(error.code(), TRANSACTION_TOO_OLD | TRANSACTION_TIMED_OUT)
                            || error.is_retryable();
                    attempts = if progress { 1 } else { attempts + 1 };
                    if !renewable || attempts >= READ_ATTEMPTS_MAX {
                        return Err(fdb_error(&self.cluster, &what(), error));
                    }
                    if attempts > 1 {
                        std::thread::sleep(Duration::from_millis(10 << attempts));
                    }
                    (trx, generation) = self.renew(generation)?;
                }
            }
        }
    }

    fn data_key(&self, key: &[u8]) -> Vec<u8> {
        [self.data_prefix.as_slice(), key].concat()
    }

    fn strip(&self, key: &[u8]) -> Vec<u8> {
        key[self.data_prefix.len()..].to_vec()
    }
}

impl KvSnapshot for FdbSnapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let full = self.data_key(key);
        self.read(
            || format!("reading key {}", printable(key)),
            |trx| {
                block_on(trx.get(&full, true))
                    .map(|value| value.map(|value| value.to_vec()))
                    .map_err(|error| (error, false))
            },
        )
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        let mut out = Vec::with_capacity(keys.len());
        for group in keys.chunks(GET_MANY_BATCH) {
            let full: Vec<Vec<u8>> = group.iter().map(|key| self.data_key(key)).collect();
            let values = self.read(
                || format!("reading {} keys from {}", group.len(), printable(group[0])),
                |trx| {
                    block_on(try_join_all(full.iter().map(|key| trx.get(key, true))))
                        .map_err(|error| (error, false))
                },
            )?;
            out.extend(
                values
                    .into_iter()
                    .map(|value| value.map(|value| value.to_vec())),
            );
        }
        Ok(out)
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, KvError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut data_end = self.data_prefix.clone();
        *data_end.last_mut().expect("the prefix ends with its tag") += 1;
        let mut begin = match start {
            Bound::Included(key) => KeySelector::first_greater_or_equal(self.data_key(key)),
            Bound::Excluded(key) => KeySelector::first_greater_than(self.data_key(key)),
            Bound::Unbounded => KeySelector::first_greater_or_equal(self.data_prefix.clone()),
        };
        let mut finish = match end {
            Bound::Included(key) => KeySelector::first_greater_than(self.data_key(key)),
            Bound::Excluded(key) => KeySelector::first_greater_or_equal(self.data_key(key)),
            Bound::Unbounded => KeySelector::first_greater_or_equal(data_end),
        };
        let mut out: Pairs = Vec::new();
        self.read(
            || {
                let from = match start {
                    Bound::Included(key) | Bound::Excluded(key) => printable(key),
                    Bound::Unbounded => "the start".into(),
                };
                format!("scanning from {from}")
            },
            |trx| loop {
                let option = RangeOption {
                    begin: begin.clone(),
                    end: finish.clone(),
                    limit: Some(limit - out.len()),
                    mode: StreamingMode::WantAll,
                    reverse,
                    ..RangeOption::default()
                };
                let values = block_on(trx.get_range(&option, 1, true))
                    .map_err(|error| (error, !out.is_empty()))?;
                for pair in values.iter() {
                    out.push((self.strip(pair.key()), pair.value().to_vec()));
                }
                // A later call (after a renewal too) continues after the last pair.
                if let Some((last, _)) = out.last() {
                    let last = self.data_key(last);
                    if reverse {
                        finish = KeySelector::first_greater_or_equal(last);
                    } else {
                        begin = KeySelector::first_greater_than(last);
                    }
                }
                if !values.more() || out.len() >= limit {
                    return Ok(());
                }
            },
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite on a real cluster: runs when `KAIROS_FDB_CLUSTER_FILE` names
    /// a cluster file (see `deploy/foundationdb/README.md`); FoundationDB's client library
    /// cannot be installed where CI runs, so there it only type-checks.
    #[test]
    fn passes_the_conformance_suite_on_a_cluster() {
        let Some(cluster_file) = std::env::var_os("KAIROS_FDB_CLUSTER_FILE") else {
            eprintln!(
                "KAIROS_FDB_CLUSTER_FILE is not set: the FoundationDB conformance run needs a cluster (deploy/foundationdb/README.md)"
            );
            return;
        };
        let run = format!(
            "kairos-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let location = |name: &str| FdbLocation {
            cluster_file: Some(std::path::PathBuf::from(&cluster_file)),
            key_prefix: format!("{run}-{name}"),
        };
        let mut made = Vec::new();
        crate::conformance::run(|| {
            let location = location(&format!("c{}", made.len()));
            made.push(location.clone());
            Box::new(FdbBackend::open(&location).unwrap())
        });

        // Stores under different prefixes do not see each other.
        let first = FdbBackend::open(&location("isolated-a")).unwrap();
        let second = FdbBackend::open(&location("isolated-ab")).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(b"k".to_vec(), b"a".to_vec()).unwrap();
        first.commit(batch).unwrap();
        let snapshot = second.snapshot().unwrap();
        assert_eq!(snapshot.get(b"k").unwrap(), None);
        let all = snapshot
            .scan(Bound::Unbounded, Bound::Unbounded, 10, false)
            .unwrap();
        assert!(all.is_empty());

        // A snapshot older than FoundationDB's 5 s still reads (at a fresh version).
        let old = first.snapshot().unwrap();
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(old.get(b"k").unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(
            old.scan(Bound::Unbounded, Bound::Unbounded, 10, true)
                .unwrap()
                .len(),
            1
        );

        // Damage recorded refuses writes until cleared.
        first.record_damage("a test");
        assert_eq!(first.damage().as_deref(), Some("a test"));
        let mut batch = WriteBatch::new();
        batch.put(b"k".to_vec(), b"b".to_vec()).unwrap();
        assert!(matches!(
            first.commit(batch.clone()),
            Err(KvError::Damaged { .. })
        ));
        first.clear_damage().unwrap();
        first.commit(batch).unwrap();
        assert!(first.size_bytes().is_ok());

        // Removing one store leaves a store whose prefix starts with its prefix alone.
        let mut batch = WriteBatch::new();
        batch.put(b"k".to_vec(), b"second".to_vec()).unwrap();
        second.commit(batch).unwrap();
        first.remove_all().unwrap();
        assert_eq!(first.snapshot().unwrap().get(b"k").unwrap(), None);
        assert_eq!(
            second.snapshot().unwrap().get(b"k").unwrap().as_deref(),
            Some(&b"second"[..])
        );
        second.remove_all().unwrap();
        for location in made {
            FdbBackend::open(&location).unwrap().remove_all().unwrap();
        }
    }
}
