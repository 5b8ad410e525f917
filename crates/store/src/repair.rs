//! `kairos repair`: recovers a damaged store (restic's `rebuild-index` is the model).
//!
//! If redb's own check and Kairos's `verify` find nothing wrong, nothing is done (and a
//! stale damage record is cleared). Otherwise a new store is built beside the old one:
//! 1. the damaged file is opened on an overlay that never writes to it — through redb's
//!    repair when it succeeds (the previous commit slot if the newest is damaged), else
//!    without it — and read key range by key range (a range redb cannot read is split,
//!    then given up); then every page of the file that reads as a b-tree leaf is scanned
//!    without redb (objects are content-addressed: stale copies are as good as live ones),
//!    and every object that passes its hash check is copied;
//! 2. the catalog comes from the catalog copy when it is intact, else from what the old
//!    file still holds, completed by what the copy holds before its damage;
//! 3. every frame is checked: a frame whose tree is not complete in the new store is lost,
//!    removed with its time index entry; timeline heads and last good frames that named a
//!    lost frame move to the newest intact frame of their timeline;
//! 4. the new file replaces the old one, which is kept beside it under another name.
//!
//! The report says exactly what was lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos_core::{Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::catalog::FrameRecord;
use crate::catalog_copy::{self, CatalogCopyRead, is_catalog_key};
use crate::keys;
use crate::kv::{KvError, KvSnapshot, Pairs, WriteBatch, prefix_end};
use crate::node::{Body, ChunkList, Content, DirNode, RootNode, RuntimeNode};
use crate::object::{self, Dictionary, ObjectKind};
use crate::pack;
use crate::redb_backend::{RedbBackend, damage_marker_path};
use crate::redb_check::{self, Recovery};
use crate::store::{Reader, Result, STORE_FILE, Store, StoreError};

/// Pairs read per scan while salvaging.
const SALVAGE_PAGE: usize = 1024;
/// A key range redb cannot read is split by the next key byte this many times before it
/// is given up (the page scan that follows finds what the split does not).
const SALVAGE_SPLIT_DEPTH: usize = 1;
/// Scans of key ranges tried through redb at most (a damaged pointer can make every scan
/// near it fail slowly).
const SALVAGE_SCANS_MAX: usize = 2048;
/// Catalog pairs written per batch into the rebuilt store.
const CATALOG_BATCH_BYTES: usize = 4 << 20;
/// The directory the rebuilt store is made in, inside the data directory.
const REBUILD_DIR: &str = "repair.tmp";

/// Where the rebuilt catalog came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogSource {
    /// The store verified but for its catalog copy: the copy was rewritten from the
    /// store, and nothing else changed.
    Store,
    /// The catalog copy was intact and is the whole catalog.
    Copy,
    /// The copy was missing or damaged: the old file's catalog, completed by the copy.
    StoreAndCopy,
}

/// How the old file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceRead {
    /// Through redb's repair: every page read had a valid checksum.
    RedbRepaired,
    /// redb's repair failed; read without it, keeping only objects whose hashes check.
    Unverified,
    /// Nothing could be read from it (empty, missing, or redb cannot open it at all).
    Unreadable,
}

/// A frame `repair` could not keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostFrame {
    pub frame: String,
    pub replica: String,
    pub timeline: String,
    pub time: Instant,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepairReport {
    /// Whether anything was wrong (false: the store verified and nothing was changed).
    pub needed: bool,
    /// What was found wrong before repairing.
    pub damage: Vec<String>,
    pub source: Option<SourceRead>,
    pub catalog_source: Option<CatalogSource>,
    /// Objects copied into the rebuilt store (each passed its hash check).
    pub objects_recovered: u64,
    /// Objects whose index entry was read but whose content did not verify.
    pub objects_damaged: u64,
    /// Key ranges of the old file redb could not read at all.
    pub ranges_unreadable: Vec<String>,
    pub frames_kept: u64,
    pub frames_lost: Vec<LostFrame>,
    /// Timeline heads and last good frames moved off lost frames.
    pub moved: Vec<String>,
    /// Where the damaged file was kept.
    pub damaged_file_kept: Option<PathBuf>,
    /// The damaged store's pack directories, kept beside its file.
    #[serde(default)]
    pub damaged_packs_kept: Vec<PathBuf>,
}

/// Repairs the store in `data_dir` (which no process may hold open).
pub fn repair(data_dir: &Path) -> Result<RepairReport> {
    let path = data_dir.join(STORE_FILE);
    let copy_path = catalog_copy::copy_path(&path);
    let mut report = RepairReport::default();
    if !path.exists() && !copy_path.exists() {
        return Err(KvError::Io(format!("{}: no store to repair", path.display())).into());
    }
    let (damage, copy_only) = damage_found(&path)?;
    if damage.is_empty() {
        return Ok(report);
    }
    report.needed = true;
    report.damage = damage;
    if copy_only {
        // The store is intact and is the authority: only the copy is rewritten (a rebuild
        // from the copy would drop what the store holds past it).
        let store = Store::open(data_dir)?;
        store.kv().rewrite_catalog_copy()?;
        let verified = store.verify()?;
        if verified.ok {
            report.catalog_source = Some(CatalogSource::Store);
            report.frames_kept = verified.frames;
            return Ok(report);
        }
        report.damage.extend(verified.problems);
    }
    let rebuild_dir = data_dir.join(REBUILD_DIR);
    let io =
        |what: &Path, error: std::io::Error| KvError::Io(format!("{}: {error}", what.display()));
    if rebuild_dir.exists() {
        std::fs::remove_dir_all(&rebuild_dir).map_err(|e| io(&rebuild_dir, e))?;
    }
    {
        let rebuilt = Store::open(&rebuild_dir)?;
        let copy = catalog_copy::read(&copy_path).unwrap_or(None);
        let source = match RedbBackend::open_for_recovery(&path) {
            Ok((backend, recovery)) => {
                report.source = Some(match recovery {
                    Recovery::Verified => SourceRead::RedbRepaired,
                    Recovery::Unverified => SourceRead::Unverified,
                });
                Some(Store::with_backend(Arc::new(backend)))
            }
            Err(_) => {
                report.source = Some(SourceRead::Unreadable);
                None
            }
        };
        let source_catalog =
            salvage_objects(&path, source.as_ref(), copy.as_ref(), &rebuilt, &mut report)?;
        let catalog = choose_catalog(copy, source_catalog, &mut report);
        write_catalog(&rebuilt, &catalog)?;
        drop_lost_frames(&rebuilt, &catalog, &mut report)?;
        rebuilt.kv().rewrite_catalog_copy()?;
    }
    swap_in(data_dir, &path, &rebuild_dir, &mut report)?;
    Ok(report)
}

/// What is wrong with the store at `path`: redb's structure check, then (if the file opens)
/// a full `verify`. Empty when the store is intact; with whether the catalog copy is the
/// only thing wrong (the store itself verifies).
fn damage_found(path: &Path) -> Result<(Vec<String>, bool)> {
    if !path.exists() {
        return Ok((
            vec![format!("store {}: the file is missing", path.display())],
            false,
        ));
    }
    let structure = redb_check::check_structure(path, crate::redb_backend::TABLE_NAME);
    if !structure.problems.is_empty() {
        return Ok((structure.problems, false));
    }
    let data_dir = path.parent().unwrap_or(Path::new("."));
    let store = match Store::open(data_dir) {
        Ok(store) => store,
        Err(error) if error.is_corruption() => return Ok((vec![error.to_string()], false)),
        Err(error) => return Err(error),
    };
    let verified = store.verify()?;
    // The comparison with the copy adds one problem, after every other check. A copy
    // behind the store, damaged or missing is the copy's fault; a copy at the store's own
    // sequence that disagrees with it is the store's (the copy is then what is trusted).
    let copy_only = verified.problems_count == 1
        && verified.catalog_copy == crate::verify::CatalogCopyState::Differs
        && verified.problems.first().is_some_and(|problem| {
            problem.starts_with("catalog copy is behind the store")
                || problem.starts_with("catalog copy: ")
        });
    Ok((verified.problems, copy_only))
}

/// Copies every object that verifies into `rebuilt`, found through redb where it can
/// still walk its trees (`source`) and in every page of the file that reads as a b-tree
/// leaf; returns the catalog pairs redb could still read.
fn salvage_objects(
    path: &Path,
    source: Option<&Store>,
    copy: Option<&CatalogCopyRead>,
    rebuilt: &Store,
    report: &mut RepairReport,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut candidates = Candidates::default();
    let mut catalog = BTreeMap::new();
    let reader = match source.map(Store::reader) {
        Some(Ok(reader)) => Some(reader),
        Some(Err(error)) => {
            report
                .ranges_unreadable
                .push(format!("every key through redb: {error}"));
            None
        }
        None => None,
    };
    if let Some(reader) = reader {
        let mut salvaged = BTreeMap::new();
        let mut scans_left = SALVAGE_SCANS_MAX;
        for first in 0..=255u8 {
            salvage_range(
                reader.snapshot(),
                vec![first],
                0,
                &mut scans_left,
                &mut salvaged,
                &mut report.ranges_unreadable,
            );
        }
        for (key, value) in salvaged {
            if is_catalog_key(&key) {
                catalog.insert(key.clone(), value.clone());
            }
            candidates.add(&key, &value);
        }
    }
    // Pages redb cannot reach (a damaged branch, both commit slots gone) still hold
    // objects: every leaf-shaped page is read, and only what verifies is kept.
    // A segment's page may hold its locator in a pack file instead of its bytes: what the
    // pack directories beside the file hold there is a candidate too.
    let packs_dirs = crate::packfile::all_packs_dirs(path);
    let scanned = redb_check::scan_leaf_pages(path, |key, value| {
        // What a locator names first (an object's parts are tried with the first candidate
        // of each segment together), the value itself after.
        if key.starts_with(keys::SEGMENT)
            && let Some(locator) = crate::packfile::Locator::decode(value)
        {
            for segment in crate::packfile::read_located(&packs_dirs, &locator) {
                candidates.add(key, &segment);
            }
        }
        if key.starts_with(keys::OBJECT)
            || key.starts_with(keys::SEGMENT)
            || key.starts_with(keys::DICTIONARY)
        {
            candidates.add(key, value);
        }
    });
    if let Err(error) = scanned {
        report
            .ranges_unreadable
            .push(format!("scanning the pages of {}: {error}", path.display()));
    }
    let dictionaries = candidates.dictionaries(copy);
    let writer = rebuilt.object_writer_without_dictionary()?;
    let object_keys: Vec<Vec<u8>> = candidates
        .pairs
        .range(keys::OBJECT.to_vec()..)
        .take_while(|(key, _)| key.starts_with(keys::OBJECT))
        .map(|(key, _)| key.clone())
        .collect();
    for key in object_keys {
        let Some(hash) = Hash::from_slice(&key[keys::OBJECT.len()..]) else {
            continue;
        };
        match candidates.object(&hash, &key, &dictionaries) {
            Some((kind, raw)) => {
                writer.put_hashed(hash, kind, &raw)?;
                report.objects_recovered += 1;
            }
            None => report.objects_damaged += 1,
        }
    }
    writer.finish()?;
    Ok(catalog)
}

/// Values found for each key (several when stale or damaged copies of a page differ).
#[derive(Default)]
struct Candidates {
    pairs: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
}

/// Different values kept per key.
const CANDIDATES_PER_KEY_MAX: usize = 4;

impl Candidates {
    fn add(&mut self, key: &[u8], value: &[u8]) {
        let values = self.pairs.entry(key.to_vec()).or_default();
        if values.len() < CANDIDATES_PER_KEY_MAX && !values.iter().any(|known| known == value) {
            values.push(value.to_vec());
        }
    }

    /// Every dictionary whose bytes match its id, from the file or the catalog copy.
    fn dictionaries(&self, copy: Option<&CatalogCopyRead>) -> HashMap<u64, Dictionary> {
        let mut out = HashMap::new();
        let from_copy = copy
            .into_iter()
            .flat_map(|copy| copy.pairs.iter())
            .filter(|(key, _)| key.starts_with(keys::DICTIONARY))
            .map(|(key, value)| (key.clone(), value.clone()));
        let from_file = self
            .pairs
            .iter()
            .filter(|(key, _)| key.starts_with(keys::DICTIONARY))
            .flat_map(|(key, values)| values.iter().map(|value| (key.clone(), value.clone())));
        for (key, bytes) in from_copy.chain(from_file) {
            let Some(id) = key[keys::DICTIONARY.len()..]
                .try_into()
                .ok()
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if object::dictionary_id(&bytes) == id {
                out.entry(id).or_insert_with(|| Dictionary::new(bytes));
            }
        }
        out
    }

    /// The object under `key`, from the first index entry and segments that verify.
    fn object(
        &self,
        hash: &Hash,
        key: &[u8],
        dictionaries: &HashMap<u64, Dictionary>,
    ) -> Option<(ObjectKind, Vec<u8>)> {
        for index in self.pairs.get(key)? {
            let Ok(parts) = pack::decode_index(index) else {
                continue;
            };
            // The first candidate of every segment, then each other candidate of one part.
            let mut choices = vec![vec![0usize; parts.len()]];
            for (part_index, part) in parts.iter().enumerate() {
                let count = self
                    .pairs
                    .get(&keys::segment(&part.segment))
                    .map_or(0, Vec::len);
                for alternative in 1..count {
                    let mut choice = vec![0usize; parts.len()];
                    choice[part_index] = alternative;
                    choices.push(choice);
                }
            }
            for choice in choices {
                if let Some(found) = self.assemble(hash, &parts, &choice, dictionaries) {
                    return Some(found);
                }
            }
        }
        None
    }

    fn assemble(
        &self,
        hash: &Hash,
        parts: &[pack::Part],
        choice: &[usize],
        dictionaries: &HashMap<u64, Dictionary>,
    ) -> Option<(ObjectKind, Vec<u8>)> {
        let mut value = Vec::new();
        for (part, pick) in parts.iter().zip(choice) {
            let segment = self.pairs.get(&keys::segment(&part.segment))?.get(*pick)?;
            let start = part.offset as usize;
            value.extend_from_slice(segment.get(start..start + part.len as usize)?);
        }
        let kind = value.get(1).copied().and_then(ObjectKind::from_byte)?;
        let dictionary = match object::needed_dictionary(&value) {
            Some(id) => Some(dictionaries.get(&id)?),
            None => None,
        };
        let raw = object::decode(*hash, kind, &value, dictionary).ok()?;
        Some((kind, raw))
    }
}

/// Reads every pair whose key starts with `prefix` into `out`; a range redb cannot read is
/// split by the next key byte up to [`SALVAGE_SPLIT_DEPTH`] times, then recorded as lost.
fn salvage_range(
    snapshot: &dyn KvSnapshot,
    prefix: Vec<u8>,
    depth: usize,
    scans_left: &mut usize,
    out: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    unreadable: &mut Vec<String>,
) {
    if *scans_left == 0 {
        unreadable.push(format!(
            "keys starting {}: not tried (too many unreadable ranges)",
            crate::kv::printable(&prefix)
        ));
        return;
    }
    *scans_left -= 1;
    match scan_all(snapshot, &prefix, out) {
        Ok(()) => {}
        // The keys list, some values do not read (a segment whose pack is missing or
        // short): every other value of the range is kept.
        Err(_) if salvage_key_by_key(snapshot, &prefix, out, unreadable).is_ok() => {}
        Err(_) if depth < SALVAGE_SPLIT_DEPTH => {
            if let Ok(Some(value)) = snapshot.get(&prefix) {
                out.insert(prefix.clone(), value);
            }
            for next in 0..=255u8 {
                let mut narrower = prefix.clone();
                narrower.push(next);
                salvage_range(snapshot, narrower, depth + 1, scans_left, out, unreadable);
            }
        }
        Err(error) => unreadable.push(format!(
            "keys starting {}: {error}",
            crate::kv::printable(&prefix)
        )),
    }
}

/// Lists the keys starting with `prefix` (without their values), then reads each value on
/// its own; a value that does not read is named in `unreadable` (at most a few, then a
/// count).
fn salvage_key_by_key(
    snapshot: &dyn KvSnapshot,
    prefix: &[u8],
    out: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    unreadable: &mut Vec<String>,
) -> Result<(), KvError> {
    const NAMED_MAX: usize = 8;
    let end = prefix_end(prefix);
    let mut keys = Vec::new();
    let mut lower = prefix.to_vec();
    let mut inclusive = true;
    loop {
        let lower_bound = if inclusive {
            std::ops::Bound::Included(lower.as_slice())
        } else {
            std::ops::Bound::Excluded(lower.as_slice())
        };
        let upper = match &end {
            Some(end) => std::ops::Bound::Excluded(end.as_slice()),
            None => std::ops::Bound::Unbounded,
        };
        let page = snapshot.scan_key_lengths(lower_bound, upper, SALVAGE_PAGE)?;
        let full = page.len() == SALVAGE_PAGE;
        if let Some((last, _)) = page.last() {
            lower = last.clone();
            inclusive = false;
        }
        keys.extend(page.into_iter().map(|(key, _)| key));
        if !full {
            break;
        }
    }
    let mut failed = 0;
    for key in keys {
        match snapshot.get(&key) {
            Ok(Some(value)) => {
                out.insert(key, value);
            }
            Ok(None) => {}
            Err(error) => {
                failed += 1;
                if failed <= NAMED_MAX {
                    unreadable.push(format!("{}: {error}", crate::kv::printable(&key)));
                }
            }
        }
    }
    if failed > NAMED_MAX {
        unreadable.push(format!(
            "{} more values under {} did not read",
            failed - NAMED_MAX,
            crate::kv::printable(prefix)
        ));
    }
    Ok(())
}

fn scan_all(
    snapshot: &dyn KvSnapshot,
    prefix: &[u8],
    out: &mut BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<(), KvError> {
    let end = prefix_end(prefix);
    let mut lower = prefix.to_vec();
    let mut inclusive = true;
    loop {
        let lower_bound = if inclusive {
            std::ops::Bound::Included(lower.as_slice())
        } else {
            std::ops::Bound::Excluded(lower.as_slice())
        };
        let upper = match &end {
            Some(end) => std::ops::Bound::Excluded(end.as_slice()),
            None => std::ops::Bound::Unbounded,
        };
        let page: Pairs = snapshot.scan(lower_bound, upper, SALVAGE_PAGE, false)?;
        let full = page.len() == SALVAGE_PAGE;
        if let Some((last, _)) = page.last() {
            lower = last.clone();
            inclusive = false;
        }
        out.extend(page);
        if !full {
            return Ok(());
        }
    }
}

/// The catalog of the rebuilt store: the copy when intact, else the old file's catalog
/// completed by what the copy holds.
fn choose_catalog(
    copy: Option<CatalogCopyRead>,
    from_store: BTreeMap<Vec<u8>, Vec<u8>>,
    report: &mut RepairReport,
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    match copy {
        Some(copy) if copy.problem.is_none() && copy.records > 0 => {
            report.catalog_source = Some(CatalogSource::Copy);
            copy.pairs
        }
        other => {
            report.catalog_source = Some(CatalogSource::StoreAndCopy);
            let mut catalog = other.map(|copy| copy.pairs).unwrap_or_default();
            catalog.extend(from_store);
            catalog
        }
    }
}

fn write_catalog(rebuilt: &Store, catalog: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<()> {
    let mut batch = WriteBatch::new();
    for (key, value) in catalog {
        if batch.bytes() + key.len() + value.len() > CATALOG_BATCH_BYTES {
            rebuilt
                .kv()
                .commit(std::mem::replace(&mut batch, WriteBatch::new()))?;
        }
        batch.put(key.clone(), value.clone())?;
    }
    if !batch.is_empty() {
        rebuilt.kv().commit(batch)?;
    }
    Ok(())
}

/// Removes frames whose trees are not complete in `rebuilt`, and moves heads and last good
/// frames off them.
fn drop_lost_frames(
    rebuilt: &Store,
    catalog: &BTreeMap<Vec<u8>, Vec<u8>>,
    report: &mut RepairReport,
) -> Result<()> {
    let reader = rebuilt.reader()?;
    let mut completeness = Completeness {
        reader: &reader,
        memo: HashMap::new(),
    };
    let mut kept: HashMap<Hash, FrameRecord> = HashMap::new();
    let mut batch = WriteBatch::new();
    for (key, value) in catalog.range(keys::FRAME.to_vec()..) {
        if !key.starts_with(keys::FRAME) {
            break;
        }
        let record: FrameRecord = match serde_json::from_slice(value) {
            Ok(record) => record,
            Err(error) => {
                report.frames_lost.push(LostFrame {
                    frame: crate::kv::printable(&key[keys::FRAME.len()..]),
                    replica: String::new(),
                    timeline: String::new(),
                    time: Instant(0),
                    reason: format!("its record is damaged: {error}"),
                });
                batch.delete(key.clone())?;
                continue;
            }
        };
        let reason = if record.compute_id() != record.id || keys::frame(&record.id) != *key {
            Some("its record does not match its id".to_string())
        } else {
            completeness.root(&record.root).err()
        };
        match reason {
            None => {
                kept.insert(record.id, record);
            }
            Some(reason) => {
                batch.delete(key.clone())?;
                batch.delete(keys::time(
                    &record.replica,
                    &record.timeline,
                    record.time,
                    &record.id,
                ))?;
                report.frames_lost.push(LostFrame {
                    frame: record.id.to_hex(),
                    replica: record.replica,
                    timeline: record.timeline,
                    time: record.time,
                    reason,
                });
            }
        }
    }
    report.frames_kept = kept.len() as u64;
    // The newest kept frame of each timeline, from the kept records.
    let mut newest: HashMap<(String, String), &FrameRecord> = HashMap::new();
    for record in kept.values() {
        let slot = newest
            .entry((record.replica.clone(), record.timeline.clone()))
            .or_insert(record);
        if record.time > slot.time {
            *slot = record;
        }
    }
    for (key, value) in catalog {
        let timeline = if key.starts_with(keys::HEAD) {
            let rest = &key[keys::HEAD.len()..];
            let mut parts = rest.splitn(2, |byte| *byte == 0);
            let replica = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            let timeline = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            (replica, timeline)
        } else if key.starts_with(keys::GOOD) {
            let replica = String::from_utf8_lossy(&key[keys::GOOD.len()..]).into_owned();
            (replica, kairos_core::spec::MAIN_TIMELINE.to_string())
        } else {
            continue;
        };
        if Hash::from_slice(value).is_some_and(|id| kept.contains_key(&id)) {
            continue;
        }
        let what = if key.starts_with(keys::HEAD) {
            format!("head of {}/{}", timeline.0, timeline.1)
        } else {
            format!("last good frame of {}", timeline.0)
        };
        match newest.get(&timeline) {
            Some(record) => {
                batch.put(key.clone(), record.id.as_bytes().to_vec())?;
                report
                    .moved
                    .push(format!("{what}: now frame {}", record.id.short()));
            }
            None => {
                batch.delete(key.clone())?;
                report
                    .moved
                    .push(format!("{what}: removed (no intact frame is left)"));
            }
        }
    }
    drop(completeness);
    drop(reader);
    if !batch.is_empty() {
        rebuilt.kv().commit(batch)?;
    }
    Ok(())
}

/// Whether trees are complete in a store, remembered per node.
struct Completeness<'a, 'r> {
    reader: &'a Reader<'r>,
    memo: HashMap<Hash, Result<(), String>>,
}

impl Completeness<'_, '_> {
    fn remembered(
        &mut self,
        hash: &Hash,
        check: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        if let Some(known) = self.memo.get(hash) {
            return known.clone();
        }
        let result = check(self);
        self.memo.insert(*hash, result.clone());
        result
    }

    fn node<T>(&self, hash: &Hash, kind: ObjectKind) -> Result<T, String>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        self.reader
            .node::<T>(hash, kind)
            .map_err(|error| error.to_string())
    }

    fn object(&self, hash: &Hash, kind: ObjectKind) -> Result<(), String> {
        match self.reader.has_object(hash) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{} {hash} is missing or damaged", kind.name())),
            Err(error) => Err(error.to_string()),
        }
    }

    fn root(&mut self, hash: &Hash) -> Result<(), String> {
        self.remembered(hash, |this| {
            let root: RootNode = this.node(hash, ObjectKind::Root)?;
            this.dir(&Hash(root.files))?;
            this.node::<RuntimeNode>(&Hash(root.runtime), ObjectKind::Runtime)
                .map(drop)
        })
    }

    fn dir(&mut self, hash: &Hash) -> Result<(), String> {
        self.remembered(hash, |this| {
            match this.node::<DirNode>(hash, ObjectKind::Dir)? {
                DirNode::Index { pages } => {
                    pages.iter().try_for_each(|page| this.dir(&Hash(page.node)))
                }
                DirNode::Leaf { entries } => {
                    entries.iter().try_for_each(|entry| match &entry.body {
                        Body::Dir { node, .. } => this.dir(&Hash(*node)),
                        Body::File {
                            content, config, ..
                        } => {
                            match content {
                                Content::Blob { hash } => {
                                    this.object(&Hash(*hash), ObjectKind::Blob)?;
                                }
                                Content::Chunks { list, .. } => this.chunk_list(&Hash(*list))?,
                                Content::Empty | Content::Omitted { .. } => {}
                            }
                            match config {
                                Some(config) => this.object(&Hash(*config), ObjectKind::Config),
                                None => Ok(()),
                            }
                        }
                        Body::Symlink { .. } | Body::Special { .. } | Body::Unreadable { .. } => {
                            Ok(())
                        }
                    })
                }
            }
        })
    }

    fn chunk_list(&mut self, hash: &Hash) -> Result<(), String> {
        self.remembered(hash, |this| {
            let list: ChunkList = this.node(hash, ObjectKind::ChunkList)?;
            list.items.iter().try_for_each(|item| {
                if list.level == 0 {
                    this.object(&Hash(item.hash), ObjectKind::Chunk)
                } else {
                    this.chunk_list(&Hash(item.hash))
                }
            })
        })
    }
}

/// Every object a frame's tree refers to (for checks that compare stores object by object).
pub fn frame_objects(reader: &Reader<'_>, root: &Hash) -> Result<HashSet<Hash>> {
    let mut out = HashSet::new();
    out.insert(*root);
    let root_node: RootNode = reader.node(root, ObjectKind::Root)?;
    out.insert(Hash(root_node.runtime));
    let mut dirs = vec![Hash(root_node.files)];
    let mut lists = Vec::new();
    while let Some(dir) = dirs.pop() {
        if !out.insert(dir) {
            continue;
        }
        match reader.node::<DirNode>(&dir, ObjectKind::Dir)? {
            DirNode::Index { pages } => dirs.extend(pages.iter().map(|page| Hash(page.node))),
            DirNode::Leaf { entries } => {
                for entry in entries {
                    match entry.body {
                        Body::Dir { node, .. } => dirs.push(Hash(node)),
                        Body::File {
                            content, config, ..
                        } => {
                            match content {
                                Content::Blob { hash } => {
                                    out.insert(Hash(hash));
                                }
                                Content::Chunks { list, .. } => lists.push(Hash(list)),
                                Content::Empty | Content::Omitted { .. } => {}
                            }
                            if let Some(config) = config {
                                out.insert(Hash(config));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    while let Some(list) = lists.pop() {
        if !out.insert(list) {
            continue;
        }
        let node: ChunkList = reader.node(&list, ObjectKind::ChunkList)?;
        for item in node.items {
            if node.level == 0 {
                out.insert(Hash(item.hash));
            } else {
                lists.push(Hash(item.hash));
            }
        }
    }
    Ok(out)
}

/// Puts the rebuilt store in place of the damaged one, keeping the damaged file beside it.
fn swap_in(
    data_dir: &Path,
    path: &Path,
    rebuild_dir: &Path,
    report: &mut RepairReport,
) -> Result<(), StoreError> {
    let io =
        |what: &Path, error: std::io::Error| KvError::Io(format!("{}: {error}", what.display()));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.len() == 0 {
            std::fs::remove_file(path).map_err(|e| io(path, e))?;
        } else {
            let kept = data_dir.join(format!("kairos-damaged-{stamp}.redb"));
            std::fs::rename(path, &kept).map_err(|e| io(path, e))?;
            report.damaged_file_kept = Some(kept);
        }
    }
    // The damaged store's pack files go with its file (named as its packs would be).
    for packs in crate::packfile::all_packs_dirs(path) {
        let Some(id) = packs
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.rsplit_once(".packs-"))
            .map(|(_, id)| id.to_string())
        else {
            continue;
        };
        let kept = data_dir.join(format!("kairos-damaged-{stamp}.packs-{id}"));
        std::fs::rename(&packs, &kept).map_err(|e| io(&packs, e))?;
        report.damaged_packs_kept.push(kept);
    }
    let new_file = rebuild_dir.join(STORE_FILE);
    // The rebuilt store's pack directory first (its name is its own, so it meets no other):
    // the store file that names it follows.
    for packs in crate::packfile::all_packs_dirs(&new_file) {
        if let Some(name) = packs.file_name() {
            let to = data_dir.join(name);
            std::fs::rename(&packs, &to).map_err(|e| io(&packs, e))?;
        }
    }
    std::fs::rename(&new_file, path).map_err(|e| io(&new_file, e))?;
    let new_copy = catalog_copy::copy_path(&new_file);
    let copy = catalog_copy::copy_path(path);
    std::fs::rename(&new_copy, &copy).map_err(|e| io(&new_copy, e))?;
    if let Ok(directory) = std::fs::File::open(data_dir) {
        directory.sync_all().map_err(|e| io(data_dir, e))?;
    }
    match std::fs::remove_file(damage_marker_path(path)) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(&damage_marker_path(path), error).into()),
    }
    std::fs::remove_dir_all(rebuild_dir).map_err(|e| io(rebuild_dir, e))?;
    Ok(())
}
