//! Looking at a store file without writing to it: redb's own integrity check (checksums of
//! every page of both trees, the commit slot in use, the allocator state) and its repair run on
//! an [`OverlayFile`], which reads the file and keeps every write in memory. `verify` uses it
//! to judge the file; `repair` uses it to read what redb can still recover.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Builder, Database, ReadableDatabase, StorageBackend, TableHandle};

use crate::guard::catch_panic;

/// Granularity of the in-memory copy of written bytes.
const BLOCK_BYTES: u64 = 4096;
/// Page cache of databases opened on an overlay.
const OVERLAY_CACHE_BYTES: usize = 16 << 20;
/// An overlay keeps at most this many bytes written, or its file's length if larger, and
/// grows to at most this much beyond the file: a damaged header can make redb's repair
/// size and write far more than the file holds, which must fail, not fill memory.
const OVERLAY_SLACK_BYTES: u64 = 64 << 20;

/// A file read through, written to memory: redb may run its repair on it (which commits)
/// while the file on disk is left exactly as it was.
#[derive(Debug)]
pub struct OverlayFile {
    file: File,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    /// The file's length when opened.
    file_len: u64,
    /// The length redb sees.
    len: u64,
    /// Bytes of the file at or beyond this offset read as zeros (the storage was shrunk).
    file_visible: u64,
    blocks: HashMap<u64, Box<[u8]>>,
}

impl OverlayFile {
    pub fn open(path: &Path) -> std::io::Result<OverlayFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(OverlayFile {
            file,
            state: Mutex::new(OverlayState {
                file_len: len,
                len,
                file_visible: len,
                blocks: HashMap::new(),
            }),
        })
    }

    fn read_base(&self, state: &OverlayState, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        out.fill(0);
        let end = (offset + out.len() as u64).min(state.file_visible);
        if offset < end {
            self.file
                .read_exact_at(&mut out[..(end - offset) as usize], offset)?;
        }
        Ok(())
    }
}

impl StorageBackend for OverlayFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + out.len() as u64;
        if end > state.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read of {offset}..{end} beyond the end ({})", state.len),
            ));
        }
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_BYTES;
            let within = (at % BLOCK_BYTES) as usize;
            let take = ((BLOCK_BYTES as usize - within) as u64).min(end - at) as usize;
            let target = &mut out[(at - offset) as usize..(at - offset) as usize + take];
            match state.blocks.get(&block) {
                Some(bytes) => target.copy_from_slice(&bytes[within..within + take]),
                None => self.read_base(&state, at, target)?,
            }
            at += take as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if len > state.file_len.saturating_add(OVERLAY_SLACK_BYTES) {
            return Err(overlay_limit(len));
        }
        if len < state.len {
            state.file_visible = state.file_visible.min(len);
            let first_gone = len.div_ceil(BLOCK_BYTES);
            state.blocks.retain(|block, _| *block < first_gone);
            if !len.is_multiple_of(BLOCK_BYTES)
                && let Some(bytes) = state.blocks.get_mut(&(len / BLOCK_BYTES))
            {
                bytes[(len % BLOCK_BYTES) as usize..].fill(0);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + data.len() as u64;
        let kept = state.blocks.len() as u64 * BLOCK_BYTES + data.len() as u64;
        if end > state.file_len.saturating_add(OVERLAY_SLACK_BYTES)
            || kept > state.file_len.max(OVERLAY_SLACK_BYTES)
        {
            return Err(overlay_limit(end));
        }
        if end > state.len {
            state.len = end;
        }
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_BYTES;
            let within = (at % BLOCK_BYTES) as usize;
            let take = ((BLOCK_BYTES as usize - within) as u64).min(end - at) as usize;
            if !state.blocks.contains_key(&block) {
                let mut bytes = vec![0u8; BLOCK_BYTES as usize].into_boxed_slice();
                self.read_base(&state, block * BLOCK_BYTES, &mut bytes)?;
                state.blocks.insert(block, bytes);
            }
            let source = &data[(at - offset) as usize..(at - offset) as usize + take];
            if let Some(bytes) = state.blocks.get_mut(&block) {
                bytes[within..within + take].copy_from_slice(source);
            }
            at += take as u64;
        }
        Ok(())
    }
}

fn overlay_limit(bytes: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "redb asked for {bytes} bytes, far beyond the file: its header or allocator pages are damaged"
    ))
}

/// What redb's own check of a store file found.
#[derive(Debug, Clone, Default)]
pub struct StructureCheck {
    /// Damage found, each naming the file and what is wrong; empty when the file is intact.
    pub problems: Vec<String>,
    /// The newest commit slot failed its checksum and redb fell back to the previous one
    /// (damage, or a crash in the middle of a commit that was never acknowledged).
    pub slot_fallback: bool,
}

/// How a database for reading a possibly damaged file was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// redb's integrity check passed, or its repair (the previous commit slot, a rebuilt
    /// allocator) succeeded: every page of the trees it reads has a valid checksum.
    Verified,
    /// redb's check failed; the file was opened without it, and only what reads back and
    /// passes Kairos's own hash checks is used.
    Unverified,
}

/// Opens the file at `path` on an overlay, running redb's integrity check and repair in
/// memory. Returns the database and whether the newest commit slot had to be given up.
fn open_checked(path: &Path) -> Result<(Database, bool), String> {
    let overlay = OverlayFile::open(path).map_err(|error| error.to_string())?;
    let lowest_progress = Arc::new(AtomicU64::new(f64::to_bits(1.0)));
    let seen = lowest_progress.clone();
    let opened = catch_panic(move || {
        let mut builder = Builder::new();
        builder.set_cache_size(OVERLAY_CACHE_BYTES);
        builder.set_check_integrity_on_open(true);
        // redb calls back at 0.3 only when the newest commit slot failed its checksum and it
        // falls back to the previous one.
        builder.set_repair_callback(move |session| {
            let progress = session.progress();
            if (0.2..0.5).contains(&progress) {
                seen.store(f64::to_bits(progress), Ordering::Relaxed);
            }
        });
        builder.create_with_backend(overlay)
    });
    let fell_back = f64::from_bits(lowest_progress.load(Ordering::Relaxed)) < 0.5;
    match opened {
        Ok(Ok(database)) => Ok((database, fell_back)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(format!("redb panicked: {panic}")),
    }
}

/// Opens the file at `path` on an overlay without redb's integrity check.
fn open_unchecked(path: &Path) -> Result<Database, String> {
    let overlay = OverlayFile::open(path).map_err(|error| error.to_string())?;
    let opened = catch_panic(move || {
        let mut builder = Builder::new();
        builder.set_cache_size(OVERLAY_CACHE_BYTES);
        builder.create_with_backend(overlay)
    });
    match opened {
        Ok(Ok(database)) => Ok(database),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(format!("redb panicked: {panic}")),
    }
}

/// A database reading what can be read of the (possibly damaged) file at `path`, never
/// writing to it: redb's repair first, else an unchecked open.
pub fn open_for_recovery(path: &Path) -> Result<(Database, Recovery), String> {
    // redb initialises a new database in an empty file: there is nothing to recover.
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.len() == 0 => return Err("the file is empty (0 bytes)".into()),
        Ok(_) => {}
        Err(error) => return Err(error.to_string()),
    }
    match open_checked(path) {
        Ok((database, _)) => Ok((database, Recovery::Verified)),
        Err(checked) => match open_unchecked(path) {
            Ok(database) => Ok((database, Recovery::Unverified)),
            Err(unchecked) => Err(format!(
                "redb's repair failed ({checked}) and so did an open without it ({unchecked})"
            )),
        },
    }
}

/// Checks the structure of the store file at `path` with redb's integrity check, never
/// writing to it: a missing, empty or unopenable file, a damaged page anywhere in either
/// tree, a damaged commit slot or a missing `table` are problems.
pub fn check_structure(path: &Path, table: &str) -> StructureCheck {
    let mut check = StructureCheck::default();
    let name = path.display();
    match std::fs::metadata(path) {
        Err(error) => {
            check.problems.push(format!("store {name}: {error}"));
            return check;
        }
        Ok(metadata) if metadata.len() == 0 => {
            check
                .problems
                .push(format!("store {name}: the file is empty (0 bytes)"));
            return check;
        }
        Ok(_) => {}
    }
    let database = match open_checked(path) {
        Ok((database, fell_back)) => {
            if fell_back {
                check.slot_fallback = true;
                check.problems.push(format!(
                    "store {name}: the newest commit slot is damaged; redb can fall back to the previous commit"
                ));
            }
            database
        }
        Err(error) => {
            check.problems.push(format!(
                "store {name}: redb's integrity check failed: {error}"
            ));
            return check;
        }
    };
    let listed = catch_panic(|| -> Result<bool, String> {
        let txn = database.begin_read().map_err(|error| error.to_string())?;
        let mut tables = txn.list_tables().map_err(|error| error.to_string())?;
        Ok(tables.any(|found| found.name() == table))
    });
    match listed {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => check
            .problems
            .push(format!("store {name}: table {table:?} is missing")),
        Ok(Err(error)) => check
            .problems
            .push(format!("store {name}: listing tables failed: {error}")),
        Err(panic) => check.problems.push(format!(
            "store {name}: redb panicked listing tables: {panic}"
        )),
    }
    // Dropping a database opened on an overlay writes only to the overlay; a panic while
    // closing it is contained like any other.
    let _ = catch_panic(move || drop(database));
    check
}

/// The largest leaf page looked for by [`scan_leaf_pages`] (a leaf holding a value of up to
/// [`crate::kv::VALUE_BYTES_MAX`] spans a few pages; redb rounds to a power of two).
const LEAF_SPAN_MAX: usize = 1 << 20;

/// Reads every page of the file at `path` that looks like a leaf of redb's b-trees, without
/// redb, and hands each key and value found to `each`. Used by `repair` when redb cannot
/// walk its trees: stored objects carry their own hashes, so whatever is found is checked
/// before it is trusted, and stale copies of immutable keys are as good as live ones.
///
/// The leaf layout (redb 4, tables of variable-width keys and values): byte 0 is 1, bytes
/// 2..4 the number of pairs `n` (u16 LE), then `n` u32 LE end offsets of the keys, `n` u32
/// LE end offsets of the values (from the start of the page), the keys, then the values.
/// Returns how many pages were read as leaves.
pub fn scan_leaf_pages(path: &Path, mut each: impl FnMut(&[u8], &[u8])) -> std::io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut page = vec![0u8; BLOCK_BYTES as usize];
    let mut leaves = 0;
    let mut offset = 0;
    while offset < len {
        let available = (len - offset).min(BLOCK_BYTES) as usize;
        file.read_exact_at(&mut page[..available], offset)?;
        if let Some(span) = leaf_span(&page[..available], len - offset) {
            let mut whole = vec![0u8; span];
            file.read_exact_at(&mut whole, offset)?;
            if let Some(pairs) = leaf_pairs(&whole) {
                leaves += 1;
                for (key, value) in pairs {
                    each(key, value);
                }
            }
        }
        offset += BLOCK_BYTES;
    }
    Ok(leaves)
}

/// The bytes a leaf starting with `start` spans, if its header is plausible.
fn leaf_span(start: &[u8], remaining: u64) -> Option<usize> {
    if start.len() < 4 || start[0] != 1 {
        return None;
    }
    let pairs = u16::from_le_bytes([start[2], start[3]]) as usize;
    let header = 4 + 8 * pairs;
    if pairs == 0 || header > start.len() {
        return None;
    }
    let last_value_end = u32::from_le_bytes(
        start[4 + 4 * pairs + 4 * (pairs - 1)..header]
            .try_into()
            .ok()?,
    ) as usize;
    (last_value_end >= header
        && last_value_end <= LEAF_SPAN_MAX
        && last_value_end as u64 <= remaining)
        .then_some(last_value_end)
}

/// The pairs of a leaf whose own offsets are in order and inside it: a damaged offset
/// loses the pairs next to it, not the page (what is found is checked by hash later).
fn leaf_pairs(page: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let pairs = u16::from_le_bytes([page[2], page[3]]) as usize;
    let header = 4 + 8 * pairs;
    let offset_at = |index: usize| -> Option<usize> {
        Some(u32::from_le_bytes(page.get(4 + 4 * index..8 + 4 * index)?.try_into().ok()?) as usize)
    };
    let first_value = offset_at(pairs - 1)?;
    if first_value < header || first_value > page.len() {
        return None;
    }
    let mut out = Vec::with_capacity(pairs);
    for index in 0..pairs {
        let key_start = if index == 0 {
            Some(header)
        } else {
            offset_at(index - 1)
        };
        let value_start = if index == 0 {
            Some(first_value)
        } else {
            offset_at(pairs + index - 1)
        };
        let (Some(key_start), Some(key_end), Some(value_start), Some(value_end)) = (
            key_start,
            offset_at(index),
            value_start,
            offset_at(pairs + index),
        ) else {
            continue;
        };
        let key_fits = header <= key_start && key_start <= key_end && key_end <= first_value;
        let value_fits =
            first_value <= value_start && value_start <= value_end && value_end <= page.len();
        if key_fits && value_fits {
            out.push((&page[key_start..key_end], &page[value_start..value_end]));
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_reads_through_and_keeps_writes_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let overlay = OverlayFile::open(&path).unwrap();
        overlay.write(4090, &[1; 20]).unwrap();
        let mut out = [0u8; 30];
        overlay.read(4080, &mut out).unwrap();
        assert_eq!(&out[..10], &[7; 10]);
        assert_eq!(&out[10..30], &[1; 20]);
        overlay.set_len(5000).unwrap();
        overlay.set_len(9000).unwrap();
        let mut tail = [9u8; 8];
        overlay.read(6000, &mut tail).unwrap();
        assert_eq!(tail, [0; 8]);
        assert!(overlay.read(8995, &mut tail).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 10_000]);
    }

    #[test]
    fn a_damaged_offset_loses_the_pairs_next_to_it_not_the_leaf() {
        // A leaf of three pairs: keys "a", "bb", "ccc", values "1", "22", "333".
        let mut page = vec![1u8, 0, 3, 0];
        let header = 4 + 8 * 3;
        for end in [header + 1, header + 3, header + 6] {
            page.extend_from_slice(&(end as u32).to_le_bytes());
        }
        for end in [header + 7, header + 9, header + 12] {
            page.extend_from_slice(&(end as u32).to_le_bytes());
        }
        page.extend_from_slice(b"abbccc122333");
        let whole = leaf_pairs(&page).unwrap();
        assert_eq!(
            whole,
            vec![(&b"a"[..], &b"1"[..]), (b"bb", b"22"), (b"ccc", b"333")]
        );
        page[4 + 4] = 0xee; // the end of key 1
        let damaged = leaf_pairs(&page).unwrap();
        assert_eq!(damaged, vec![(&b"a"[..], &b"1"[..])]);
    }

    #[test]
    fn leaf_pages_are_read_without_redb_and_the_check_sees_damage() {
        use crate::kv::{KvBackend, WriteBatch};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = |index: u32| format!("o/{index:06}").into_bytes();
        let value = |index: u32| vec![(index % 251) as u8; 700 + index as usize % 900];
        {
            let backend = crate::redb_backend::RedbBackend::open(&path).unwrap();
            let mut batch = WriteBatch::new();
            for index in 0..300 {
                batch.put(key(index), value(index)).unwrap();
            }
            backend.commit(batch).unwrap();
        }
        assert!(check_structure(&path, "kairos").problems.is_empty());
        let mut found = std::collections::BTreeMap::new();
        let leaves = scan_leaf_pages(&path, |k, v| {
            found.insert(k.to_vec(), v.to_vec());
        })
        .unwrap();
        assert!(leaves > 1);
        for index in 0..300 {
            assert_eq!(found.get(&key(index)), Some(&value(index)), "key {index}");
        }
        // A flipped byte in a stored value fails the page checksums redb keeps.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(700)
            .position(|window| window.iter().all(|byte| *byte == 7))
            .unwrap();
        bytes[at + 10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let check = check_structure(&path, "kairos");
        assert!(!check.problems.is_empty(), "{check:?}");
    }
}
