//! The corruption harness: builds stores of several sizes from synthetic replicas, damages
//! copies of their files from a seed (random byte flips, a flipped byte in a page header,
//! a zeroed 4 KiB page, truncation, an emptied file), then runs what users run —
//! `verify`, `history`, `show`, `cat`, `restore`, `capture`, `repair`, `restore` again — in
//! process, and counts:
//! - panics that escape the store (must be 0);
//! - false "ok": `verify` answering ok on a file whose content is damaged (must be 0);
//! - captures accepted after `verify` found damage (must be 0);
//! - frames whose objects were intact that do not restore byte-identical after `repair`
//!   (must be 0), and frames recovered.
//!
//! "Damaged" is decided without `verify`: the damaged file is read key by key (through redb,
//! on an overlay that never writes to it) and compared with the undamaged store; a file
//! whose every key and value still reads back identical is undamaged (the flip fell into
//! free space or slack), so `verify` may call it ok. A frame is intact when its record,
//! its time index entry and every object and segment its tree needs read back identical.
//!
//! A failing case prints the command that replays it alone, and keeps its undamaged and
//! damaged store files (a store's layout is not the same from run to run: segment ids and
//! frame times come from the clock).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash as _, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant as Clock;

use anyhow::{Context, Result};
use kairos_core::{Limits, ReplicaDefinition};
use kairos_store::kv::{KvBackend, scan_prefix};
use kairos_store::redb_backend::RedbBackend;
use kairos_store::store::STORE_FILE;
use kairos_store::{FrameRecord, Store, keys};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const REPLICA: &str = "svc";
const PAGE_BYTES: u64 = 4096;
/// The seed of the synthetic replicas (fixed: a case is replayed from its own seed alone).
const FIXTURE_SEED: u64 = 7;

/// A store size: how many frames of how many files.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub name: &'static str,
    pub files: usize,
    pub frames: usize,
    /// One file of about this many bytes (split into chunks by content-defined chunking).
    pub large_file_bytes: usize,
}

pub const SIZES: [Size; 3] = [
    Size {
        name: "small",
        files: 12,
        frames: 3,
        large_file_bytes: 0,
    },
    Size {
        name: "medium",
        files: 60,
        frames: 6,
        large_file_bytes: 300_000,
    },
    Size {
        name: "large",
        files: 200,
        frames: 10,
        large_file_bytes: 2_000_000,
    },
];

/// The kinds of damage applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    FlipBytes,
    FlipPageHeader,
    ZeroPage,
    Truncate,
    Empty,
}

impl DamageKind {
    fn pick(rng: &mut ChaCha8Rng) -> DamageKind {
        match rng.random_range(0..20) {
            0..=6 => DamageKind::FlipBytes,
            7..=11 => DamageKind::FlipPageHeader,
            12..=15 => DamageKind::ZeroPage,
            16..=18 => DamageKind::Truncate,
            _ => DamageKind::Empty,
        }
    }
}

/// One store built and captured, kept undamaged to copy from.
pub struct Fixture {
    pub size: Size,
    _dirs: tempfile::TempDir,
    source_root: PathBuf,
    store_bytes: Vec<u8>,
    copy_bytes: Vec<u8>,
    /// The store's pack files (name of the pack directory, then each file's name and
    /// bytes): copied intact beside every damaged store file.
    packs: Vec<(std::path::PathBuf, Vec<u8>)>,
    frames: Vec<FrameRecord>,
    /// Per frame: the restored tree's digest, and the keys its objects need.
    frame_digests: Vec<u64>,
    frame_keys: Vec<BTreeSet<Vec<u8>>>,
    /// Every key and value of the undamaged store.
    pairs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// A file path present in every frame, for `cat`.
    cat_path: Vec<u8>,
}

/// What one case found.
#[derive(Debug, Clone, Default)]
pub struct CaseOutcome {
    pub description: String,
    pub damaged: bool,
    pub verify_ok: bool,
    pub panics: u64,
    pub false_ok: bool,
    pub capture_accepted_on_damage: bool,
    pub frames: u64,
    pub frames_intact: u64,
    pub frames_recovered: u64,
    /// Intact frames that did not restore byte-identical after repair.
    pub frames_intact_not_recovered: u64,
    pub repair_failed: Option<String>,
    pub verify_after_repair_ok: bool,
}

impl CaseOutcome {
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.panics > 0 {
            out.push(format!("{} panics", self.panics));
        }
        if self.false_ok {
            out.push("verify said ok on a damaged file".into());
        }
        if self.capture_accepted_on_damage {
            out.push("a capture was accepted after verify found damage".into());
        }
        if self.frames_intact_not_recovered > 0 {
            out.push(format!(
                "{} intact frames not restored byte-identical after repair",
                self.frames_intact_not_recovered
            ));
        }
        if let Some(error) = &self.repair_failed {
            out.push(format!("repair failed: {error}"));
        }
        if !self.verify_after_repair_ok {
            out.push("verify after repair is not ok".into());
        }
        out
    }
}

/// Totals over many cases.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub cases: u64,
    pub damaged: u64,
    pub undamaged: u64,
    pub verify_not_ok_on_damaged: u64,
    /// `verify` found a problem although every key read back identical (stricter than the
    /// comparison: e.g. a damaged allocator page or commit slot that no read touches).
    pub verify_not_ok_on_undamaged: u64,
    pub panics: u64,
    pub false_ok: u64,
    pub captures_accepted_on_damage: u64,
    pub frames: u64,
    pub frames_intact: u64,
    pub frames_recovered: u64,
    pub frames_intact_not_recovered: u64,
    pub repair_failures: u64,
    pub verify_after_repair_not_ok: u64,
    pub failing_cases: Vec<String>,
    pub seconds: f64,
}

impl Summary {
    pub fn add(&mut self, outcome: &CaseOutcome, replay: &str) {
        self.cases += 1;
        if outcome.damaged {
            self.damaged += 1;
            if !outcome.verify_ok {
                self.verify_not_ok_on_damaged += 1;
            }
        } else {
            self.undamaged += 1;
            if !outcome.verify_ok {
                self.verify_not_ok_on_undamaged += 1;
            }
        }
        self.panics += outcome.panics;
        self.false_ok += u64::from(outcome.false_ok);
        self.captures_accepted_on_damage += u64::from(outcome.capture_accepted_on_damage);
        self.frames += outcome.frames;
        self.frames_intact += outcome.frames_intact;
        self.frames_recovered += outcome.frames_recovered;
        self.frames_intact_not_recovered += outcome.frames_intact_not_recovered;
        self.repair_failures += u64::from(outcome.repair_failed.is_some());
        self.verify_after_repair_not_ok += u64::from(!outcome.verify_after_repair_ok);
        let failures = outcome.failures();
        if !failures.is_empty() {
            self.failing_cases.push(format!(
                "{} ({}): {}; replay: {replay}",
                outcome.description,
                if outcome.damaged {
                    "damaged"
                } else {
                    "undamaged"
                },
                failures.join(", ")
            ));
        }
    }

    pub fn passed(&self) -> bool {
        self.failing_cases.is_empty()
    }
}

fn words(rng: &mut ChaCha8Rng, count: usize) -> String {
    const WORDS: &[&str] = &[
        "listen", "port", "worker", "timeout", "cache", "upstream", "replica", "primary", "buffer",
        "limit", "ssl", "log", "level", "max", "min", "pool",
    ];
    (0..count)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_file(root: &Path, rng: &mut ChaCha8Rng, index: usize) -> Result<()> {
    let dir = root.join(["conf", "data", "logs", "lib/state"][index % 4]);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("file-{index:04}.txt"));
    let lines = rng.random_range(1..40);
    let mut text = String::new();
    for line in 0..lines {
        text.push_str(&format!("{line} = {}\n", words(rng, 6)));
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn write_large(root: &Path, rng: &mut ChaCha8Rng, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let mut data = vec![0u8; bytes];
    rng.fill(&mut data[..]);
    std::fs::create_dir_all(root.join("data"))?;
    std::fs::write(root.join("data/table.bin"), data)?;
    Ok(())
}

/// A digest of a restored tree: every path, kind, symlink target and file content.
fn tree_digest(root: &Path) -> Result<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut stack = vec![root.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let relative = path.strip_prefix(root)?.to_path_buf();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path.clone());
                entries.push((relative, 1u8, Vec::new()));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                entries.push((relative, 2, target.into_os_string().into_encoded_bytes()));
            } else {
                entries.push((relative, 3, std::fs::read(&path)?));
            }
        }
    }
    entries.sort();
    for (path, kind, bytes) in entries {
        path.hash(&mut hasher);
        kind.hash(&mut hasher);
        bytes.hash(&mut hasher);
    }
    Ok(hasher.finish())
}

fn restore_digest(store: &Store, frame: &FrameRecord, into: &Path) -> Result<u64> {
    if into.exists() {
        std::fs::remove_dir_all(into)?;
    }
    let view = kairos_replay::open_frame(store, frame.clone())?;
    kairos_replay::restore(
        store,
        &view,
        into,
        &kairos_replay::RestoreOptions {
            force: false,
            exclude: Vec::new(),
            progress: None,
            durable: false,
        },
    )?;
    tree_digest(into)
}

fn capture(store: &Store, replica: &ReplicaDefinition) -> Result<FrameRecord> {
    let report = kairos_capture::capture(
        store,
        &kairos_capture::CaptureRequest {
            replica,
            timeline: "main",
            limits: Limits::default(),
            skip: Vec::new(),
        },
    )?;
    Ok(report.frame)
}

/// Every key and value of a store, read from one snapshot.
fn all_pairs(backend: &dyn KvBackend) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let snapshot = backend.snapshot()?;
    Ok(scan_prefix(snapshot.as_ref(), b"", 4096)?
        .into_iter()
        .collect())
}

impl Fixture {
    /// Builds a store of `size` from a synthetic replica made from `seed`.
    pub fn build(size: Size, seed: u64) -> Result<Fixture> {
        let dirs = tempfile::tempdir()?;
        let source_root = dirs.path().join("replica");
        let data_dir = dirs.path().join("store");
        std::fs::create_dir_all(&source_root)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for index in 0..size.files {
            write_file(&source_root, &mut rng, index)?;
        }
        write_large(&source_root, &mut rng, size.large_file_bytes)?;
        std::os::unix::fs::symlink("conf/file-0000.txt", source_root.join("current"))?;
        let replica = ReplicaDefinition::new(REPLICA, source_root.clone());
        let mut frames = Vec::new();
        let mut frame_digests = Vec::new();
        let mut frame_keys = Vec::new();
        let pairs;
        {
            let store = Store::open(&data_dir)?;
            store.add_replica(&replica)?;
            for frame in 0..size.frames {
                if frame > 0 {
                    for _ in 0..(size.files / 5).max(1) {
                        let index = rng.random_range(0..size.files);
                        write_file(&source_root, &mut rng, index)?;
                    }
                    if size.large_file_bytes > 0 && frame % 2 == 0 {
                        let path = source_root.join("data/table.bin");
                        let mut data = std::fs::read(&path)?;
                        let at = rng.random_range(0..data.len() - 100);
                        rng.fill(&mut data[at..at + 100]);
                        std::fs::write(&path, data)?;
                    }
                }
                frames.push(capture(&store, &replica)?);
            }
            let scratch = dirs.path().join("scratch");
            let reader = store.reader()?;
            for frame in &frames {
                frame_digests.push(restore_digest(&store, frame, &scratch)?);
                let objects = kairos_store::repair::frame_objects(&reader, &frame.root)?;
                let mut needed = BTreeSet::new();
                needed.insert(keys::frame(&frame.id));
                needed.insert(keys::time(
                    &frame.replica,
                    &frame.timeline,
                    frame.time,
                    &frame.id,
                ));
                for hash in objects {
                    let key = keys::object(&hash);
                    let index = reader
                        .get(&key)?
                        .context("an object of a frame is missing")?;
                    for part in
                        kairos_store::pack::decode_index(&index).map_err(anyhow::Error::msg)?
                    {
                        needed.insert(keys::segment(&part.segment));
                    }
                    needed.insert(key);
                }
                frame_keys.push(needed);
            }
            pairs = all_pairs(store.kv().as_ref())?;
        }
        let store_path = data_dir.join(STORE_FILE);
        Ok(Fixture {
            size,
            store_bytes: std::fs::read(&store_path)?,
            copy_bytes: std::fs::read(kairos_store::catalog_copy::copy_path(&store_path))?,
            packs: pack_files(&data_dir)?,
            _dirs: dirs,
            source_root,
            frames,
            frame_digests,
            frame_keys,
            pairs,
            cat_path: b"conf/file-0000.txt".to_vec(),
        })
    }

    /// Writes a damaged copy of the store into `data_dir`; returns what was done.
    fn damaged_copy(&self, data_dir: &Path, rng: &mut ChaCha8Rng) -> Result<String> {
        if data_dir.exists() {
            std::fs::remove_dir_all(data_dir)?;
        }
        std::fs::create_dir_all(data_dir)?;
        let store_path = data_dir.join(STORE_FILE);
        std::fs::write(
            kairos_store::catalog_copy::copy_path(&store_path),
            &self.copy_bytes,
        )?;
        self.write_packs(data_dir)?;
        // The store file or one of its pack files (content lives in the packs).
        let pack = (!self.packs.is_empty() && rng.random_bool(0.5))
            .then(|| rng.random_range(0..self.packs.len()));
        let (target, mut bytes) = match pack {
            Some(index) => (
                data_dir.join(&self.packs[index].0),
                self.packs[index].1.clone(),
            ),
            None => (store_path.clone(), self.store_bytes.clone()),
        };
        let description = damage(&mut bytes, rng);
        let description = match pack {
            Some(index) => format!("{}: {description}", self.packs[index].0.display()),
            None => description,
        };
        if pack.is_some() {
            std::fs::write(&store_path, &self.store_bytes)?;
        }
        std::fs::write(&target, bytes)?;
        Ok(description)
    }

    /// Keeps the undamaged and the damaged store of the case `seed` in `dir` (store layouts
    /// differ from run to run: segment ids and frame times are not seeded).
    pub fn keep_case(&self, dir: &Path, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.damaged_copy(&dir.join("damaged"), &mut rng)?;
        let undamaged = dir.join("undamaged");
        std::fs::create_dir_all(&undamaged)?;
        let store_path = undamaged.join(STORE_FILE);
        std::fs::write(&store_path, &self.store_bytes)?;
        std::fs::write(
            kairos_store::catalog_copy::copy_path(&store_path),
            &self.copy_bytes,
        )?;
        self.write_packs(&undamaged)?;
        Ok(())
    }

    /// Writes the store's pack files into `data_dir`.
    fn write_packs(&self, data_dir: &Path) -> Result<()> {
        for (relative, bytes) in &self.packs {
            let path = data_dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        Ok(())
    }

    /// Reads the damaged file key by key and compares with the undamaged store: whether
    /// anything differs, and which frames have every key they need intact.
    fn judge(&self, store_path: &Path) -> (bool, Vec<bool>) {
        let none_intact = vec![false; self.frames.len()];
        let Ok((backend, _)) = RedbBackend::open_for_recovery(store_path) else {
            return (true, none_intact);
        };
        let Ok(snapshot) = backend.snapshot() else {
            return (true, none_intact);
        };
        let mut differing: BTreeSet<&Vec<u8>> = BTreeSet::new();
        for (key, value) in &self.pairs {
            if !matches!(snapshot.get(key), Ok(Some(found)) if found == *value) {
                differing.insert(key);
            }
        }
        let extra = match scan_prefix(snapshot.as_ref(), b"", 4096) {
            Ok(found) => found.iter().any(|(key, _)| !self.pairs.contains_key(key)),
            Err(_) => true,
        };
        let intact = self
            .frame_keys
            .iter()
            .map(|needed| needed.iter().all(|key| !differing.contains(key)))
            .collect();
        (!differing.is_empty() || extra, intact)
    }

    /// Damages a copy of the store from `seed` and runs every command on it.
    pub fn run_case(&self, work: &Path, seed: u64) -> Result<CaseOutcome> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data_dir = work.join("store");
        let scratch = work.join("scratch");
        let description = self.damaged_copy(&data_dir, &mut rng)?;
        let store_path = data_dir.join(STORE_FILE);
        let mut outcome = CaseOutcome {
            description: format!("{} store, seed {seed}: {description}", self.size.name),
            frames: self.frames.len() as u64,
            ..CaseOutcome::default()
        };
        let (damaged, intact) = self.judge(&store_path);
        outcome.damaged = damaged;
        outcome.frames_intact = intact.iter().filter(|intact| **intact).count() as u64;
        let mut panics = 0;
        let mut guarded = |operation: &mut dyn FnMut()| {
            if catch_unwind(AssertUnwindSafe(operation)).is_err() {
                panics += 1;
            }
        };
        // verify
        let mut verify_ok = false;
        guarded(&mut || {
            verify_ok = match Store::open(&data_dir) {
                Ok(store) => store.verify().map(|report| report.ok).unwrap_or(false),
                Err(_) => false,
            };
        });
        outcome.verify_ok = verify_ok;
        outcome.false_ok = verify_ok && damaged;
        // history, show, cat, restore, capture
        let replica = ReplicaDefinition::new(REPLICA, self.source_root.clone());
        let mut capture_accepted = false;
        guarded(&mut || {
            let Ok(store) = Store::open(&data_dir) else {
                return;
            };
            let _ = store.history(REPLICA, "main");
            for frame in &self.frames {
                let Ok(view) = kairos_replay::open_frame(&store, frame.clone()) else {
                    continue;
                };
                let _ = kairos_replay::listing(&store, &view);
                if let Ok(reader) = store.reader() {
                    let mut sink = Vec::new();
                    let _ = view.cat(&reader, &self.cat_path, &Limits::default(), &mut sink);
                }
                let _ = restore_digest(&store, frame, &scratch);
            }
            capture_accepted = capture(&store, &replica).is_ok();
        });
        outcome.capture_accepted_on_damage = capture_accepted && !verify_ok;
        // repair, then every intact frame must restore byte-identical
        let mut repair_result = None;
        guarded(&mut || {
            repair_result = Some(kairos_store::repair::repair(&data_dir));
        });
        if let Some(Err(error)) = &repair_result {
            outcome.repair_failed = Some(error.to_string());
        }
        let mut recovered = 0;
        let mut intact_missed = 0;
        let mut verify_after = false;
        guarded(&mut || {
            let Ok(store) = Store::open(&data_dir) else {
                intact_missed = intact.iter().filter(|intact| **intact).count() as u64;
                return;
            };
            for (index, frame) in self.frames.iter().enumerate() {
                let same = matches!(restore_digest(&store, frame, &scratch),
                    Ok(digest) if digest == self.frame_digests[index]);
                if same {
                    recovered += 1;
                } else if intact[index] {
                    intact_missed += 1;
                }
            }
            verify_after = store.verify().map(|report| report.ok).unwrap_or(false);
        });
        outcome.frames_recovered = recovered;
        outcome.frames_intact_not_recovered = intact_missed;
        outcome.verify_after_repair_ok = verify_after;
        outcome.panics = panics;
        Ok(outcome)
    }
}

/// Runs `cases` seeded cases spread over the sizes (`seed` is the first case's seed).
pub fn run(
    sizes: &[Size],
    cases: u64,
    seed: u64,
    mut on_case: impl FnMut(&CaseOutcome, &str),
) -> Result<Summary> {
    let started = Clock::now();
    let mut fixtures = HashMap::new();
    let mut summary = Summary::default();
    let work = tempfile::tempdir()?;
    for case in 0..cases {
        let size = sizes[(case % sizes.len() as u64) as usize];
        if !fixtures.contains_key(size.name) {
            fixtures.insert(size.name, Fixture::build(size, FIXTURE_SEED)?);
        }
        let fixture = &fixtures[size.name];
        let case_seed = seed + case;
        let outcome = fixture.run_case(work.path(), case_seed)?;
        let mut replay = format!(
            "cargo run -p kairos-simulations --bin kairos-corruption -- --size {} --seed {case_seed} --cases 1",
            size.name
        );
        if !outcome.failures().is_empty() {
            let kept = std::env::temp_dir()
                .join("kairos-corruption-failures")
                .join(format!("{}-seed-{case_seed}", size.name));
            fixture.keep_case(&kept, case_seed)?;
            replay.push_str(&format!(
                " (the stores of this run are kept in {})",
                kept.display()
            ));
        }
        summary.add(&outcome, &replay);
        on_case(&outcome, &replay);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Every pack file of the store in `data_dir`, by its path relative to it.
fn pack_files(data_dir: &Path) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for dir in kairos_store::packfile::all_packs_dirs(&data_dir.join(STORE_FILE)) {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let relative = path.strip_prefix(data_dir)?.to_path_buf();
            out.push((relative, std::fs::read(&path)?));
        }
    }
    Ok(out)
}

/// Damages `bytes` as one seeded kind of damage; returns what was done.
fn damage(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> String {
    let len = bytes.len() as u64;
    if len == 0 {
        return "nothing to damage (empty file)".into();
    }
    let pages = (len / PAGE_BYTES).max(1);
    let kind = DamageKind::pick(rng);
    match kind {
        DamageKind::FlipBytes => {
            let count = rng.random_range(1..=4);
            let mut at = Vec::new();
            for _ in 0..count {
                let offset = rng.random_range(0..len) as usize;
                bytes[offset] ^= rng.random_range(1..=255u8);
                at.push(offset.to_string());
            }
            format!("flip {count} bytes at {}", at.join(","))
        }
        DamageKind::FlipPageHeader => {
            let page = if rng.random_bool(0.2) {
                1
            } else {
                rng.random_range(0..pages)
            };
            let offset = (page * PAGE_BYTES + rng.random_range(0..16)).min(len - 1) as usize;
            bytes[offset] ^= rng.random_range(1..=255u8);
            format!("flip the page header byte at {offset}")
        }
        DamageKind::ZeroPage => {
            let page = rng.random_range(0..pages);
            let start = (page * PAGE_BYTES) as usize;
            let end = (start + PAGE_BYTES as usize).min(bytes.len());
            bytes[start..end].fill(0);
            format!("zero the 4 KiB page at {start}")
        }
        DamageKind::Truncate => {
            let keep = rng.random_range(1..len) as usize;
            bytes.truncate(keep);
            format!("truncate to {keep} of {len} bytes")
        }
        DamageKind::Empty => {
            bytes.clear();
            "truncate to 0 bytes".to_string()
        }
    }
}
