//! Pack files: the embedded backend keeps segments (the values under `s/`) in append-only
//! files beside the store file instead of in its b-tree, and a 21-byte locator per segment
//! in the tree. A capture then writes its content once, in large sequential writes, while
//! the single committing thread only inserts small locators (redb copies every value into
//! its own pages and writes each page separately, which made the committing thread the
//! limit of a first capture).
//!
//! Invariants (the embedded backend keeps them, see `redb_backend`):
//! - a locator is committed only in the transaction that wrote its bytes, and a durable
//!   commit happens only after every pack written since the last one is on disk (fdatasync,
//!   and the directory when a pack was created): no durable locator points at bytes a crash
//!   can lose;
//! - each pack's record (live bytes, end) is updated in the same transaction as its
//!   locators, so on open every byte past a pack's recorded end, and every pack without a
//!   record, belongs to no durable commit and is cut off or removed;
//! - a pack is unlinked only after a durable commit removed its last locator and its
//!   record; snapshots hold the pack's open file, so one taken before still reads it;
//! - only the newest pack is appended to; a pack whose live bytes fall under half its
//!   length has its live segments moved to the newest pack (`compact_files`), after which
//!   it holds nothing and goes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// A pack takes appends until it is this long; the next commit starts a new one.
pub const PACK_BYTES_TARGET: u64 = 128 << 20;
/// Bytes of an encoded locator.
pub const LOCATOR_BYTES: usize = 25;
const LOCATOR_VERSION: u8 = 0xa7;
const PACK_EXTENSION: &str = "pack";

/// Where a segment's bytes lie, with their checksum: damage in a pack (even in bytes no
/// object uses) and a locator damaged in the store file (it points at other bytes) are
/// both found by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
    pub fingerprint: u32,
}

/// The checksum of a segment (CRC-32 of all its bytes): `verify` reads every segment
/// against it, and moving segments between packs refuses bytes that do not match it (a
/// damaged locator points at other bytes).
pub fn fingerprint(segment: &[u8]) -> u32 {
    crc32fast::hash(segment)
}

impl Locator {
    pub fn encode(&self) -> [u8; LOCATOR_BYTES] {
        let mut out = [0; LOCATOR_BYTES];
        out[0] = LOCATOR_VERSION;
        out[1..9].copy_from_slice(&self.pack.to_le_bytes());
        out[9..17].copy_from_slice(&self.offset.to_le_bytes());
        out[17..21].copy_from_slice(&self.len.to_le_bytes());
        out[21..25].copy_from_slice(&self.fingerprint.to_le_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Option<Locator> {
        if value.len() != LOCATOR_BYTES || value[0] != LOCATOR_VERSION {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap_or([0; 8]));
        Some(Locator {
            pack: u64_at(1),
            offset: u64_at(9),
            len: u32::from_le_bytes(value[17..21].try_into().unwrap_or([0; 4])),
            fingerprint: u32::from_le_bytes(value[21..25].try_into().unwrap_or([0; 4])),
        })
    }

    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// What the store records of one pack: bytes its locators point at, and how far its
/// committed appends reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackRecord {
    pub live: u64,
    pub end: u64,
}

impl PackRecord {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.live.to_le_bytes());
        out[8..].copy_from_slice(&self.end.to_le_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Option<PackRecord> {
        if value.len() != 16 {
            return None;
        }
        Some(PackRecord {
            live: u64::from_le_bytes(value[..8].try_into().ok()?),
            end: u64::from_le_bytes(value[8..].try_into().ok()?),
        })
    }

    /// Whether a fifth of the pack or more is dead: its live segments are worth moving
    /// (copying at most four bytes per byte freed, as borg's `compact` does at 10%).
    pub fn worth_compacting(&self) -> bool {
        self.end > 0 && self.live.saturating_mul(5) <= self.end.saturating_mul(4)
    }
}

/// The pack directory of the store file at `store_path` whose pack id is `id`. Each store
/// names its own (the id is chosen when the store first writes a pack and kept in the store
/// file), so a store file and a pack directory of another store (a repair's rebuild put in
/// place, a copy) are never mixed up.
pub fn packs_dir(store_path: &Path, id: u64) -> PathBuf {
    let stem = store_path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("kairos");
    store_path.with_file_name(format!("{stem}.packs-{id:016x}"))
}

/// Every pack directory beside the store file at `store_path` (repair looks in each for the
/// segments a damaged file's locators name).
pub fn all_packs_dirs(store_path: &Path) -> Vec<PathBuf> {
    let stem = store_path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("kairos");
    let prefix = format!("{stem}.packs-");
    let parent = store_path.parent().unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_dir()
                && path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with(&prefix))
        })
        .collect();
    out.sort();
    out
}

/// A new pack directory id.
pub fn new_packs_id() -> u64 {
    let id = crate::pack::new_segment_id();
    u64::from_le_bytes(id[..8].try_into().unwrap_or([1; 8])).max(1)
}

fn pack_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}.{PACK_EXTENSION}"))
}

fn pack_number(path: &Path) -> Option<u64> {
    if path.extension()? != PACK_EXTENSION {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    (stem.len() == 16)
        .then(|| u64::from_str_radix(stem, 16).ok())
        .flatten()
}

/// The pack files present in `dir` (none if it does not exist; entries named like packs
/// that are not regular files are left out: `verify` names a pack that is not there).
fn list(dir: &Path) -> std::io::Result<BTreeMap<u64, PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(error) => return Err(error),
    };
    let mut out = BTreeMap::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(number) = pack_number(&path) {
            out.insert(number, path);
        }
    }
    Ok(out)
}

/// The open packs as a snapshot saw them (packs unlinked later stay readable through it).
pub type PackView = Arc<BTreeMap<u64, Arc<File>>>;

/// Appends are written at multiples of this, from a buffer aligned to it (direct I/O).
const BLOCK_BYTES: usize = 4096;

/// One block of the append buffer (its alignment is what direct I/O needs).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK_BYTES]);

/// The buffer appends are gathered in, kept between appends (fresh memory costs a page
/// fault per page on first touch).
#[derive(Default)]
struct AlignedBuffer {
    blocks: Vec<Block>,
}

impl AlignedBuffer {
    /// The first `len` bytes, grown as needed.
    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        let blocks = len.div_ceil(BLOCK_BYTES);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Block([0; BLOCK_BYTES]));
        }
        // SAFETY: `Block` is plain bytes without padding (`repr(C)`, one byte array), the
        // vector holds at least `len` of them contiguously, and the slice borrows the
        // vector mutably for its whole life.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// A pack open to append: with direct I/O where the file system has it (writes skip the
/// page cache: no copy into fresh cache pages, no writeback left for the sync), else
/// buffered.
struct Appending {
    number: u64,
    /// Read handle (shared with snapshots).
    file: Arc<File>,
    /// Write handle.
    write: File,
    direct: bool,
    len: u64,
}

fn open_for_append(path: &Path, create: bool) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if create {
        options.create_new(true);
    }
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok((file, true)),
        // tmpfs and some others have no direct I/O.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            Ok((options.open(path)?, false))
        }
        Err(error) => Err(error),
    }
}

struct Writer {
    /// The pack appended to (`None`: the next append creates one).
    current: Option<Appending>,
    buffer: AlignedBuffer,
    next_number: u64,
    /// Packs written since the last sync, and whether a pack was created meanwhile.
    dirty: BTreeMap<u64, Arc<File>>,
    created: bool,
    /// Bytes after which appends start a new pack.
    target: u64,
}

/// The pack files of one store.
pub struct Packs {
    dir: PathBuf,
    files: RwLock<PackView>,
    /// `None`: opened to read only.
    writer: Option<Mutex<Writer>>,
}

fn io_error(path: &Path, error: std::io::Error) -> String {
    format!("{}: {error}", path.display())
}

impl Packs {
    /// Opens every pack in `dir` to read (a recovery view, or a store found damaged):
    /// nothing is cut off or removed.
    pub fn open_read_only(dir: &Path) -> Result<Packs, String> {
        let mut files = BTreeMap::new();
        for (number, path) in list(dir).map_err(|e| io_error(dir, e))? {
            let file = File::open(&path).map_err(|e| io_error(&path, e))?;
            files.insert(number, Arc::new(file));
        }
        Ok(Packs {
            dir: dir.to_path_buf(),
            files: RwLock::new(Arc::new(files)),
            writer: None,
        })
    }

    /// Opens the packs of a store whose state records `recorded`. Nothing is cut or
    /// removed here (opening, even for a read, never deletes: a store file put back from
    /// an older copy must not cost the packs their newer bytes); bytes past a pack's
    /// recorded end and packs without a record are what [`Packs::clean`] removes.
    pub fn open_writable(
        dir: &Path,
        recorded: &BTreeMap<u64, PackRecord>,
    ) -> Result<Packs, String> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let mut files = BTreeMap::new();
        let present = list(dir).map_err(|e| io_error(dir, e))?;
        let mut lens = BTreeMap::new();
        for (number, path) in &present {
            if !recorded.contains_key(number) {
                continue;
            }
            let file = File::open(path).map_err(|e| io_error(path, e))?;
            lens.insert(
                *number,
                file.metadata().map_err(|e| io_error(path, e))?.len(),
            );
            files.insert(*number, Arc::new(file));
        }
        let highest = present.keys().chain(recorded.keys()).max().copied();
        // Appends go on in the newest pack while it is short enough.
        let mut current = None;
        if let Some(number) = recorded.keys().max().copied()
            && let Some(file) = files.get(&number)
            && let Some(record) = recorded.get(&number)
            && record.end < PACK_BYTES_TARGET
        {
            let path = pack_path(dir, number);
            let (write, direct) = open_for_append(&path, false).map_err(|e| io_error(&path, e))?;
            // After whatever the file holds past the recorded end (left for `clean`).
            let len = lens.get(&number).copied().unwrap_or(0).max(record.end);
            current = Some(Appending {
                number,
                file: file.clone(),
                write,
                direct,
                len,
            });
        }
        let next_number = highest.map_or(1, |number| number + 1);
        Ok(Packs {
            dir: dir.to_path_buf(),
            files: RwLock::new(Arc::new(files)),
            writer: Some(Mutex::new(Writer {
                current,
                buffer: AlignedBuffer::default(),
                next_number,
                dirty: BTreeMap::new(),
                created: false,
                target: PACK_BYTES_TARGET,
            })),
        })
    }

    /// Removes what no commit refers to: packs without a record (a crash between writing
    /// one and committing it, a failed transaction) and, in packs no longer appended to,
    /// the bytes past the recorded end. The caller holds the store's write transaction
    /// (no append or record can land meanwhile) and `recorded` is read in it. Returns
    /// one line per change.
    pub fn clean(&self, recorded: &BTreeMap<u64, PackRecord>) -> Result<Vec<String>, String> {
        if self.dir.as_os_str().is_empty() || self.writer.is_none() {
            return Ok(Vec::new());
        }
        let current = self.current();
        let mut cleaned = Vec::new();
        let mut gone = BTreeSet::new();
        for (number, path) in list(&self.dir).map_err(|e| io_error(&self.dir, e))? {
            if Some(number) == current {
                continue;
            }
            let Some(record) = recorded.get(&number) else {
                gone.insert(number);
                cleaned.push(format!(
                    "removed {}: no commit refers to it",
                    path.display()
                ));
                continue;
            };
            let len = std::fs::metadata(&path)
                .map_err(|e| io_error(&path, e))?
                .len();
            // The zeros that fill an append's last block (direct I/O) are left; a cut that
            // a crash undoes only brings back bytes no commit refers to (no sync).
            if len > record.end.next_multiple_of(BLOCK_BYTES as u64) {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_error(&path, e))?;
                file.set_len(record.end).map_err(|e| io_error(&path, e))?;
                cleaned.push(format!(
                    "cut {} from {len} to {} bytes: the rest is in no commit",
                    path.display(),
                    record.end
                ));
            }
        }
        self.remove(&gone)?;
        Ok(cleaned)
    }

    /// No packs at all (a store that never wrote one, or read before its packs are known).
    pub fn none() -> Packs {
        Packs {
            dir: PathBuf::new(),
            files: RwLock::new(Arc::new(BTreeMap::new())),
            writer: None,
        }
    }

    /// Starts new packs after `bytes` instead of [`PACK_BYTES_TARGET`] (tests).
    pub fn set_target(&self, bytes: u64) {
        if let Some(writer) = &self.writer {
            writer.lock().unwrap_or_else(|p| p.into_inner()).target = bytes;
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The packs open now.
    pub fn view(&self) -> PackView {
        self.files.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The pack appends go to (`None` before the first append of this process, or when
    /// the next append starts a new pack).
    pub fn current(&self) -> Option<u64> {
        let writer = self.writer.as_ref()?;
        let writer = writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.current.as_ref().map(|appending| appending.number)
    }

    /// Ends appends to the current pack if it is `number` (the next append starts a new
    /// one), so that it can be compacted like the others.
    pub fn retire(&self, number: u64) {
        if let Some(writer) = &self.writer {
            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            if writer
                .current
                .as_ref()
                .is_some_and(|appending| appending.number == number)
            {
                writer.current = None;
            }
        }
    }

    /// `len` bytes from `offset` of the segment at `locator`, through `view` (falling back
    /// to the packs open now: a pack created after the view was taken).
    pub fn read(
        &self,
        view: &PackView,
        locator: &Locator,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, String> {
        let file = match view.get(&locator.pack) {
            Some(file) => file.clone(),
            None => self.view().get(&locator.pack).cloned().ok_or_else(|| {
                format!(
                    "pack {} holding a segment is missing",
                    pack_path(&self.dir, locator.pack).display()
                )
            })?,
        };
        let mut out = vec![0; len];
        file.read_exact_at(&mut out, locator.offset + offset)
            .map_err(|error| {
                format!(
                    "pack {}: reading {len} bytes at {}: {error} (the file is shorter than its index says)",
                    pack_path(&self.dir, locator.pack).display(),
                    locator.offset + offset
                )
            })?;
        Ok(out)
    }

    /// Appends `pieces`, laid end to end, to the current pack (starting a new one when it
    /// is full); returns the pack and the offset they start at. Appends start at multiples
    /// of 4 KiB (the bytes between are dead). The caller holds the store's write
    /// transaction, so appends are in commit order.
    pub fn append(&self, pieces: &[&[u8]]) -> Result<(u64, u64), String> {
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| format!("{}: opened read-only", self.dir.display()))?;
        let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
        let writer = &mut *writer;
        if writer
            .current
            .as_ref()
            .is_some_and(|appending| appending.len >= writer.target)
        {
            writer.current = None;
        }
        if writer.current.is_none() {
            let number = writer.next_number;
            let path = pack_path(&self.dir, number);
            let (write, direct) = open_for_append(&path, true).map_err(|e| io_error(&path, e))?;
            let file = Arc::new(File::open(&path).map_err(|e| io_error(&path, e))?);
            let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
            let mut next = BTreeMap::clone(&files);
            next.insert(number, file.clone());
            *files = Arc::new(next);
            writer.current = Some(Appending {
                number,
                file,
                write,
                direct,
                len: 0,
            });
            writer.next_number = number + 1;
            writer.created = true;
        }
        let Some(appending) = writer.current.as_mut() else {
            return Err("no pack to append to".into());
        };
        let start = appending.len.next_multiple_of(BLOCK_BYTES as u64);
        let len: usize = pieces.iter().map(|piece| piece.len()).sum();
        // Direct I/O writes whole blocks: the tail of the last one is zeros, overwritten
        // by the next append.
        let written = if appending.direct {
            len.next_multiple_of(BLOCK_BYTES)
        } else {
            len
        };
        let buffer = writer.buffer.bytes_mut(written);
        let mut at = 0;
        for piece in pieces {
            buffer[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        buffer[len..].fill(0);
        let number = appending.number;
        if let Err(error) = appending.write.write_all_at(buffer, start) {
            // Whatever part was written lies past the recorded end: cut off at next open.
            writer.current = None;
            return Err(io_error(&pack_path(&self.dir, number), error));
        }
        if !appending.direct {
            start_writeback(&appending.write, start, len as u64);
        }
        appending.len = start + len as u64;
        let file = appending.file.clone();
        writer.dirty.insert(number, file);
        Ok((number, start))
    }

    /// Makes every append so far durable (before a durable commit refers to it).
    pub fn sync(&self) -> Result<(), String> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
        for (number, file) in &writer.dirty {
            file.sync_data()
                .map_err(|e| io_error(&pack_path(&self.dir, *number), e))?;
        }
        writer.dirty.clear();
        if writer.created {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| io_error(&self.dir, e))?;
            writer.created = false;
        }
        Ok(())
    }

    /// Unlinks packs a durable commit no longer refers to (snapshots that hold them
    /// still read them).
    pub fn remove(&self, numbers: &BTreeSet<u64>) -> Result<(), String> {
        if numbers.is_empty() {
            return Ok(());
        }
        {
            let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
            let mut next = BTreeMap::clone(&files);
            next.retain(|number, _| !numbers.contains(number));
            *files = Arc::new(next);
        }
        if let Some(writer) = &self.writer {
            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            writer.dirty.retain(|number, _| !numbers.contains(number));
            if writer
                .current
                .as_ref()
                .is_some_and(|appending| numbers.contains(&appending.number))
            {
                writer.current = None;
            }
        }
        for number in numbers {
            let path = pack_path(&self.dir, *number);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error(&path, error)),
            }
        }
        Ok(())
    }

    /// Bytes of every pack file present.
    pub fn size_bytes(&self) -> Result<u64, String> {
        if self.dir.as_os_str().is_empty() {
            return Ok(0);
        }
        let mut total = 0;
        for path in list(&self.dir)
            .map_err(|e| io_error(&self.dir, e))?
            .values()
        {
            match std::fs::metadata(path) {
                Ok(metadata) => total += metadata.len(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error(path, error)),
            }
        }
        Ok(total)
    }

    /// What is wrong with the packs against their records: a recorded pack missing or
    /// shorter than its recorded end.
    pub fn check(&self, recorded: &BTreeMap<u64, PackRecord>) -> Vec<String> {
        let mut problems = Vec::new();
        for (number, record) in recorded {
            let path = pack_path(&self.dir, *number);
            match std::fs::metadata(&path) {
                Ok(metadata) if metadata.len() < record.end => problems.push(format!(
                    "pack {} is {} bytes, shorter than the {} bytes committed to it",
                    path.display(),
                    metadata.len(),
                    record.end
                )),
                Ok(_) => {}
                Err(error) => problems.push(format!(
                    "pack {} holding {} live bytes: {error}",
                    path.display(),
                    record.live
                )),
            }
        }
        problems
    }

    /// Where the pack `number` lives (for messages).
    pub fn path_of(&self, number: u64) -> PathBuf {
        pack_path(&self.dir, number)
    }
}

/// Starts writing `len` bytes of `file` from `offset` to disk without waiting for them, so
/// that the fdatasync before the next durable commit (the end of a capture) finds little
/// left to write. Advice only: a failure changes nothing but the wait later.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor, with no memory passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// The segments a locator found in a damaged store's pages may point at: what each pack
/// directory in `dirs` holds there (repair checks what it assembles against object hashes).
pub fn read_located(dirs: &[PathBuf], locator: &Locator) -> Vec<Vec<u8>> {
    dirs.iter()
        .filter_map(|dir| {
            let file = File::open(pack_path(dir, locator.pack)).ok()?;
            let mut out = vec![0; locator.len as usize];
            file.read_exact_at(&mut out, locator.offset).ok()?;
            Some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_and_records_round_trip_and_reject_garbage() {
        let locator = Locator {
            pack: 7,
            offset: 1 << 40,
            len: 65_000,
            fingerprint: fingerprint(b"segment"),
        };
        assert_ne!(fingerprint(b"segment"), fingerprint(b"segmenT"));
        assert_ne!(fingerprint(&[0; 100]), fingerprint(&[0; 101]));
        let mut long = vec![7u8; 60_000];
        let before = fingerprint(&long);
        long[30_000] ^= 1;
        assert_ne!(fingerprint(&long), before, "a byte in the middle counts");
        assert_eq!(Locator::decode(&locator.encode()), Some(locator));
        assert_eq!(Locator::decode(&[0; LOCATOR_BYTES]), None);
        assert_eq!(Locator::decode(&locator.encode()[..24]), None);
        let record = PackRecord { live: 3, end: 10 };
        assert_eq!(PackRecord::decode(&record.encode()), Some(record));
        assert_eq!(PackRecord::decode(&[1, 2]), None);
        assert!(record.worth_compacting());
        assert!(PackRecord { live: 8, end: 10 }.worth_compacting());
        assert!(!PackRecord { live: 9, end: 10 }.worth_compacting());
    }

    #[test]
    fn opening_keeps_everything_and_cleaning_cuts_uncommitted_tails_and_unrecorded_packs() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open_writable(dir.path(), &BTreeMap::new()).unwrap();
        let (first, at) = packs.append(&[b"committed"]).unwrap();
        assert_eq!(at, 0);
        packs.append(&[b" and not"]).unwrap();
        packs.sync().unwrap();
        let orphan = dir.path().join(format!("{:016x}.pack", first + 5));
        std::fs::write(&orphan, b"orphan").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"left alone").unwrap();
        std::fs::create_dir(dir.path().join(format!("{:016x}.pack", first + 6))).unwrap();
        drop(packs);
        let recorded = BTreeMap::from([(first, PackRecord { live: 9, end: 9 })]);
        let packs = Packs::open_writable(dir.path(), &recorded).unwrap();
        let long = std::fs::metadata(packs.path_of(first)).unwrap().len();
        assert!(long > 9 && orphan.exists(), "opening removes nothing");
        let locator = Locator {
            pack: first,
            offset: 0,
            len: 9,
            fingerprint: 0,
        };
        assert_eq!(
            packs.read(&packs.view(), &locator, 0, 9).unwrap(),
            b"committed"
        );
        // Appends go on after what the file holds.
        let (number, at) = packs.append(&[b"!"]).unwrap();
        assert_eq!(number, first);
        assert!(at >= long && at % 4096 == 0, "{at}");
        // The pack appended to is left alone; the others are cleaned.
        assert_eq!(packs.clean(&recorded).unwrap().len(), 1, "the orphan");
        assert!(!orphan.exists());
        packs.retire(first);
        let cleaned = packs.clean(&recorded).unwrap();
        assert_eq!(cleaned.len(), 1, "{cleaned:?}");
        assert_eq!(std::fs::metadata(packs.path_of(first)).unwrap().len(), 9);
        assert!(dir.path().join("notes.txt").exists());
        assert_eq!(packs.check(&recorded), Vec::<String>::new());
    }

    #[test]
    fn a_removed_pack_stays_readable_through_an_older_view() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open_writable(dir.path(), &BTreeMap::new()).unwrap();
        let (number, _) = packs.append(&[b"segment"]).unwrap();
        let view = packs.view();
        packs.remove(&BTreeSet::from([number])).unwrap();
        let locator = Locator {
            pack: number,
            offset: 0,
            len: 7,
            fingerprint: 0,
        };
        assert_eq!(packs.read(&view, &locator, 0, 7).unwrap(), b"segment");
        let error = packs.read(&packs.view(), &locator, 0, 7).unwrap_err();
        assert!(error.contains("missing"), "{error}");
        // The next append starts a new pack, never the removed number.
        assert!(packs.append(&[b"x"]).unwrap().0 > number);
    }
}
