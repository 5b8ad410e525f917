//! The catalog copy: every catalog key (replicas, frame records, timeline heads, the time
//! index, dictionaries, forks, proposals, commits, last good frames, the audit log — every
//! key that is not an object index entry, a segment or a runtime series sample) kept in a second, small file beside
//! the store, so a damaged store file never makes every frame unreachable.
//!
//! The file is a log: a header, then records, each `len (u32 LE) | payload | BLAKE3(payload)`.
//! A payload is a list of mutations (`put` or `delete` of one key). A rewrite (a compacted
//! copy: one put per live key) goes to a temporary file that is fsynced and renamed over the
//! old one; after each committed batch that touches catalog keys, its catalog mutations are
//! appended (and fsynced when the batch is durable). Reading replays the records in order;
//! a record cut short at the end (a crash while appending) ends the log quietly, a record
//! whose checksum fails is reported as damage.
//!
//! The copy is written ahead of the store: a durable batch's record (and the records of the
//! batches committed without a flush before it) is fsynced before the store commits it, so
//! a process killed at any instant leaves a copy that holds at least what the store made
//! durable. What it holds beyond — records of batches the store never made durable, with a
//! catalog sequence past the store's — is left out when the copy is read against the store,
//! and cut off when the store is next opened for writing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::keys;
use crate::kv::{KvError, Mutation};

/// First bytes of a catalog copy.
const MAGIC: &[u8; 8] = b"KCATLOG1";
/// Header: magic, then the length of the compacted part written by the last rewrite.
const HEADER_BYTES: u64 = 16;
/// Bytes of the checksum after each record.
const CHECKSUM_BYTES: usize = 32;
/// Largest payload accepted when reading (a batch is at most 10 MB of keys and values).
const RECORD_BYTES_MAX: usize = crate::kv::BATCH_BYTES_MAX + 1_000_000;
/// A rewrite packs this many bytes of keys and values per record.
const REWRITE_RECORD_BYTES: usize = 1 << 20;
/// The log is compacted once its appended part exceeds this...
const COMPACT_APPENDED_BYTES_MIN: u64 = 1 << 20;
/// ...and this many times the compacted part.
const COMPACT_RATIO: u64 = 2;

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
/// The catalog sequence after the batch (u64 big-endian): how many catalog batches the
/// store has committed, kept by the store outside its key space.
const OP_SEQUENCE: u8 = 3;

/// Whether `key` belongs to the catalog (everything but object index entries, segments
/// and the runtime series, which is observations rather than history).
pub fn is_catalog_key(key: &[u8]) -> bool {
    !key.starts_with(keys::OBJECT)
        && !key.starts_with(keys::SEGMENT)
        && !key.starts_with(keys::SERIES)
}

/// The catalog copy of the store file at `store_path`.
pub fn copy_path(store_path: &Path) -> PathBuf {
    store_path.with_extension("catalog-copy")
}

/// What reading a catalog copy found.
#[derive(Debug, Clone, Default)]
pub struct CatalogCopyRead {
    /// The catalog as the copy holds it, key by key.
    pub pairs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Records replayed.
    pub records: u64,
    /// The store's catalog sequence as of the last record replayed.
    pub sequence: u64,
    /// Damage found (a record whose checksum fails, a bad header); what follows it is lost.
    pub problem: Option<String>,
    /// The last record was cut short (an append interrupted by a crash; not damage).
    pub torn_tail: bool,
    /// Records past the sequence the copy was read up to (written ahead of a store commit
    /// a crash took back; not damage), left out.
    pub ahead: u64,
    /// Bytes of the file that hold the records replayed (the header included).
    pub valid_bytes: u64,
}

/// Reads the catalog copy at `path`; `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<CatalogCopyRead>, KvError> {
    read_through(path, None)
}

/// Reads the catalog copy at `path` up to the store's catalog sequence `through` (records
/// past it were written ahead of commits the store never made durable).
pub fn read_through(path: &Path, through: Option<u64>) -> Result<Option<CatalogCopyRead>, KvError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file
            .read_to_end(&mut bytes)
            .map_err(|error| KvError::Io(format!("{}: {error}", path.display())))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(KvError::Io(format!("{}: {error}", path.display()))),
    };
    Ok(Some(parse(&bytes, through)))
}

fn parse(bytes: &[u8], through: Option<u64>) -> CatalogCopyRead {
    let mut read = CatalogCopyRead::default();
    if bytes.len() < HEADER_BYTES as usize || &bytes[..8] != MAGIC {
        read.problem = Some("the header is damaged".into());
        return read;
    }
    let mut at = HEADER_BYTES as usize;
    while at < bytes.len() {
        let Some(len) = bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        else {
            read.torn_tail = true;
            break;
        };
        if len > RECORD_BYTES_MAX {
            read.problem = Some(format!(
                "record {} at byte {at} is damaged (length {len})",
                read.records + 1
            ));
            break;
        }
        let Some(payload) = bytes.get(at + 4..at + 4 + len) else {
            read.torn_tail = true;
            break;
        };
        let Some(checksum) = bytes.get(at + 4 + len..at + 4 + len + CHECKSUM_BYTES) else {
            read.torn_tail = true;
            break;
        };
        if blake3::hash(payload).as_bytes() != checksum {
            read.problem = Some(format!(
                "record {} at byte {at} is damaged (checksum mismatch)",
                read.records + 1
            ));
            break;
        }
        let (mutations, sequence) = match decode_payload(payload) {
            Ok(decoded) => decoded,
            Err(problem) => {
                read.problem = Some(format!(
                    "record {} at byte {at} is malformed: {problem}",
                    read.records + 1
                ));
                break;
            }
        };
        if let (Some(sequence), Some(through)) = (sequence, through)
            && sequence > through
        {
            // Written ahead of a commit the store does not hold: this and what follows.
            read.ahead = 1 + count_records(&bytes[at + 4 + len + CHECKSUM_BYTES..]);
            break;
        }
        for (key, value) in mutations {
            match value {
                Some(value) => read.pairs.insert(key, value),
                None => read.pairs.remove(&key),
            };
        }
        if let Some(sequence) = sequence {
            read.sequence = sequence;
        }
        read.records += 1;
        at += 4 + len + CHECKSUM_BYTES;
        read.valid_bytes = at as u64;
    }
    if read.records == 0 {
        read.valid_bytes = HEADER_BYTES;
    }
    read
}

/// How many whole records `bytes` holds (read no further than their lengths).
fn count_records(mut bytes: &[u8]) -> u64 {
    let mut count = 0;
    while let Some(len) = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    {
        let Some(rest) = bytes.get(4 + len + CHECKSUM_BYTES..) else {
            break;
        };
        count += 1;
        bytes = rest;
    }
    count
}

/// A mutation: a key and its new value (`None`: deleted).
type Decoded = (Vec<(Vec<u8>, Option<Vec<u8>>)>, Option<u64>);

/// A record's mutations and the catalog sequence after it, if it says.
fn decode_payload(payload: &[u8]) -> Result<Decoded, String> {
    let mut at = 0;
    let mut take = |len: usize| -> Result<&[u8], String> {
        let slice = payload
            .get(at..at + len)
            .ok_or_else(|| format!("ends inside a field at byte {at}"))?;
        at += len;
        Ok(slice)
    };
    let mut mutations = Vec::new();
    let mut new_sequence = None;
    while let Ok(op) = take(1) {
        let op = op[0];
        if op == OP_SEQUENCE {
            new_sequence = Some(u64::from_be_bytes(
                take(8)?.try_into().map_err(|_| "bad sequence")?,
            ));
            continue;
        }
        let key_len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "bad length")?);
        let key = take(key_len as usize)?.to_vec();
        match op {
            OP_PUT => {
                let value_len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "bad length")?);
                let value = take(value_len as usize)?.to_vec();
                mutations.push((key, Some(value)));
            }
            OP_DELETE => mutations.push((key, None)),
            other => return Err(format!("unknown operation {other}")),
        }
    }
    Ok((mutations, new_sequence))
}

fn encode_mutation(out: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
    out.push(if value.is_some() { OP_PUT } else { OP_DELETE });
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(value) = value {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
}

fn frame_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(blake3::hash(payload).as_bytes());
}

/// The writer of one store's catalog copy (held by the backend behind its catalog lock, so
/// records are appended in commit order).
#[derive(Debug)]
pub struct CatalogCopyWriter {
    path: PathBuf,
    file: Option<File>,
    /// Bytes of the compacted part (from the header) and of the whole file.
    compacted_bytes: u64,
    file_bytes: u64,
    /// An append failed: the copy must be rewritten before it is trusted again.
    stale: bool,
    /// Records of batches committed without a flush, written with the next durable one:
    /// the copy on disk never holds what a crash takes back from the store.
    pending: Vec<u8>,
}

impl Drop for CatalogCopyWriter {
    fn drop(&mut self) {
        // The store closing makes its last commits durable: so are their records here.
        let _ = self.flush();
    }
}

impl CatalogCopyWriter {
    /// Opens the copy at `path` for appending; `None` if it is missing or its header is
    /// unreadable (the caller then rewrites it from the store). With the store's catalog
    /// sequence `store_sequence`, what a crash left past the store's last durable commit
    /// (records written ahead of it, a record cut short) is cut off first, so that new
    /// records follow the ones the store holds. A copy with damage inside is left whole
    /// for `kairos verify` to name.
    pub fn open(path: &Path, store_sequence: Option<u64>) -> Option<CatalogCopyWriter> {
        let mut file = OpenOptions::new().read(true).append(true).open(path).ok()?;
        let mut header = [0u8; HEADER_BYTES as usize];
        file.read_exact(&mut header).ok()?;
        if &header[..8] != MAGIC {
            return None;
        }
        let compacted_bytes = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let mut file_bytes = file.metadata().ok()?.len();
        if let Some(store_sequence) = store_sequence {
            let mut bytes = Vec::new();
            let mut reading = File::open(path).ok()?;
            reading.read_to_end(&mut bytes).ok()?;
            let read = parse(&bytes, Some(store_sequence));
            if read.problem.is_none()
                && (read.ahead > 0 || read.torn_tail)
                && read.valid_bytes >= compacted_bytes
            {
                let writable = OpenOptions::new().write(true).open(path).ok()?;
                writable.set_len(read.valid_bytes).ok()?;
                writable.sync_all().ok()?;
                file_bytes = read.valid_bytes;
            }
        }
        Some(CatalogCopyWriter {
            path: path.to_path_buf(),
            file: Some(file),
            compacted_bytes,
            file_bytes,
            stale: false,
            pending: Vec::new(),
        })
    }

    /// Marks the copy as no longer to be trusted until it is rewritten from the store (a
    /// record was written ahead of a commit that then failed).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether records of batches committed without a flush wait in memory.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A writer whose first action must be a rewrite.
    pub fn missing(path: &Path) -> CatalogCopyWriter {
        CatalogCopyWriter {
            path: path.to_path_buf(),
            file: None,
            compacted_bytes: 0,
            file_bytes: 0,
            stale: true,
            pending: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the copy is missing or unreadable (not merely due for compaction).
    pub fn is_missing(&self) -> bool {
        self.file.is_none()
    }

    /// Whether the copy must be rewritten from the store (missing, an append failed, or the
    /// appended part has grown large enough to compact).
    pub fn needs_rewrite(&self) -> bool {
        self.stale
            || self.file.is_none()
            || self.file_bytes.saturating_sub(self.compacted_bytes)
                > COMPACT_APPENDED_BYTES_MIN.max(COMPACT_RATIO * self.compacted_bytes)
    }

    /// Appends the catalog mutations of one committed batch and the store's catalog
    /// sequence after it (fsynced when `durable`). A failure leaves the copy marked stale,
    /// to be rewritten by the next catalog change.
    pub fn append(
        &mut self,
        mutations: &[&Mutation],
        sequence: u64,
        durable: bool,
    ) -> Result<(), KvError> {
        let result = self.try_append(mutations, sequence, durable);
        if result.is_err() {
            self.stale = true;
        }
        result
    }

    fn try_append(
        &mut self,
        mutations: &[&Mutation],
        sequence: u64,
        durable: bool,
    ) -> Result<(), KvError> {
        if mutations.is_empty() || self.stale || self.file.is_none() {
            return Ok(());
        }
        let mut payload = Vec::new();
        for mutation in mutations {
            match mutation {
                Mutation::Put { key, value } => encode_mutation(&mut payload, key, Some(value)),
                Mutation::Delete { key } => encode_mutation(&mut payload, key, None),
            }
        }
        payload.push(OP_SEQUENCE);
        payload.extend_from_slice(&sequence.to_be_bytes());
        let mut record = Vec::with_capacity(payload.len() + 36);
        frame_record(&mut record, &payload);
        self.pending.extend_from_slice(&record);
        if durable {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes and syncs the records of batches committed without a flush (a durable
    /// commit made them durable in the store).
    pub fn flush(&mut self) -> Result<(), KvError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            self.pending.clear();
            return Ok(());
        };
        let io = |error: std::io::Error| KvError::Io(format!("{}: {error}", self.path.display()));
        let result = file
            .write_all(&self.pending)
            .and_then(|()| file.sync_data())
            .map_err(io);
        if result.is_err() {
            self.stale = true;
        }
        self.file_bytes += self.pending.len() as u64;
        self.pending.clear();
        result
    }

    /// Replaces the copy with `pairs` (the whole catalog) at catalog sequence `sequence`:
    /// temporary file, fsync, rename, fsync of the directory.
    pub fn rewrite<'a>(
        &mut self,
        pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        sequence: u64,
    ) -> Result<(), KvError> {
        let io = |error: std::io::Error| KvError::Io(format!("{}: {error}", self.path.display()));
        self.pending.clear();
        let mut body = Vec::new();
        let mut payload = vec![OP_SEQUENCE];
        payload.extend_from_slice(&sequence.to_be_bytes());
        for (key, value) in pairs {
            encode_mutation(&mut payload, key, Some(value));
            if payload.len() >= REWRITE_RECORD_BYTES {
                frame_record(&mut body, &payload);
                payload.clear();
            }
        }
        if !payload.is_empty() {
            frame_record(&mut body, &payload);
        }
        let compacted_bytes = HEADER_BYTES + body.len() as u64;
        let temporary = self.path.with_extension("catalog-copy.tmp");
        {
            let mut file = File::create(&temporary).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            file.write_all(&compacted_bytes.to_le_bytes()).map_err(io)?;
            file.write_all(&body).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&temporary, &self.path).map_err(io)?;
        if let Some(parent) = self.path.parent()
            && let Ok(directory) = File::open(parent)
        {
            directory.sync_all().map_err(io)?;
        }
        self.file = Some(
            OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(io)?,
        );
        self.compacted_bytes = compacted_bytes;
        self.file_bytes = compacted_bytes;
        self.stale = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8], value: &[u8]) -> Mutation {
        Mutation::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn appends_replay_in_order_and_a_rewrite_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.catalog-copy");
        let mut writer = CatalogCopyWriter::missing(&path);
        assert!(writer.needs_rewrite());
        writer.rewrite([(&b"r/web"[..], &b"{}"[..])], 4).unwrap();
        let delete = Mutation::Delete {
            key: b"r/web".to_vec(),
        };
        writer
            .append(&[&put(b"f/1", b"one"), &put(b"h/web\0main", b"1")], 5, true)
            .unwrap();
        writer
            .append(&[&delete, &put(b"f/2", b"two")], 6, false)
            .unwrap();
        // A batch committed without a flush reaches the copy with the next flush (a
        // crash before it takes the batch back from the store too).
        let before = read(&path).unwrap().unwrap();
        assert_eq!((before.records, before.sequence), (2, 5));
        writer.flush().unwrap();
        let read = read(&path).unwrap().unwrap();
        assert_eq!(read.records, 3);
        assert_eq!(read.sequence, 6);
        assert!(read.problem.is_none() && !read.torn_tail);
        let keys: Vec<&[u8]> = read.pairs.keys().map(Vec::as_slice).collect();
        assert_eq!(keys, vec![&b"f/1"[..], b"f/2", b"h/web\0main"]);
        let reopened = CatalogCopyWriter::open(&path, None).unwrap();
        assert!(!reopened.needs_rewrite());
    }

    #[test]
    fn a_cut_tail_is_quiet_and_a_flipped_byte_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.catalog-copy");
        let mut writer = CatalogCopyWriter::missing(&path);
        writer.rewrite([(&b"r/web"[..], &b"{}"[..])], 1).unwrap();
        writer.append(&[&put(b"f/1", b"one")], 2, true).unwrap();
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        let cut = read(&path).unwrap().unwrap();
        assert!(cut.torn_tail && cut.problem.is_none());
        assert_eq!((cut.records, cut.sequence), (1, 1));
        let mut flipped = whole.clone();
        flipped[HEADER_BYTES as usize + 16] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let damaged = read(&path).unwrap().unwrap();
        assert!(damaged.problem.unwrap().contains("checksum"));
        assert!(!is_catalog_key(b"o/abc") && !is_catalog_key(b"s/1") && is_catalog_key(b"f/1"));
        assert!(!is_catalog_key(b"n/web\0\0abcdefgh"));
    }

    /// Records written ahead of store commits a crash took back (sequences past the
    /// store's) are left out when read against the store and cut off when it is opened for
    /// writing, as is a record cut short: what is appended next reads back whole.
    #[test]
    fn records_ahead_of_the_store_and_a_cut_tail_are_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.catalog-copy");
        let mut writer = CatalogCopyWriter::missing(&path);
        writer.rewrite([(&b"r/web"[..], &b"{}"[..])], 7).unwrap();
        writer.append(&[&put(b"f/1", b"one")], 8, true).unwrap();
        // Written ahead of commits 9 and 10, which the store never made durable.
        writer.append(&[&put(b"f/2", b"two")], 9, false).unwrap();
        writer.append(&[&put(b"f/3", b"three")], 10, true).unwrap();
        drop(writer);
        let against = read_through(&path, Some(8)).unwrap().unwrap();
        assert_eq!(
            (against.records, against.sequence, against.ahead),
            (2, 8, 2)
        );
        assert!(against.problem.is_none());
        assert!(!against.pairs.contains_key(&b"f/2"[..]));
        let everything = read(&path).unwrap().unwrap();
        assert_eq!((everything.sequence, everything.ahead), (10, 0));

        // The store holds 8: the copy is cut back to it, and commit 9 (another change)
        // follows it.
        let whole = std::fs::read(&path).unwrap();
        let mut writer = CatalogCopyWriter::open(&path, Some(8)).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < whole.len() as u64);
        writer.append(&[&put(b"f/9", b"nine")], 9, true).unwrap();
        drop(writer);
        let read_back = read_through(&path, Some(9)).unwrap().unwrap();
        assert_eq!((read_back.sequence, read_back.ahead), (9, 0));
        let keys: Vec<&[u8]> = read_back.pairs.keys().map(Vec::as_slice).collect();
        assert_eq!(keys, vec![&b"f/1"[..], b"f/9", b"r/web"]);

        // A record cut short by a crash is cut off too: an append after it reads back.
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 7]).unwrap();
        let mut writer = CatalogCopyWriter::open(&path, Some(8)).unwrap();
        writer.append(&[&put(b"f/10", b"ten")], 9, true).unwrap();
        drop(writer);
        let read_back = read_through(&path, Some(9)).unwrap().unwrap();
        assert!(read_back.problem.is_none() && !read_back.torn_tail);
        assert_eq!(read_back.records, 3);
        assert!(read_back.pairs.contains_key(&b"f/10"[..]));
        assert!(!read_back.pairs.contains_key(&b"f/9"[..]));

        // Damage inside is left whole, for verify to name.
        let mut flipped = std::fs::read(&path).unwrap();
        let length = flipped.len();
        flipped[length - 40] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let _writer = CatalogCopyWriter::open(&path, Some(8)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), flipped);
    }
}
