//! `verify`: checks the store file's own structure (redb's integrity check: every page's
//! checksum, both commit slots, the table), scans every key, reads every stored object
//! (hash and codec checks), checks every catalog record, walks every frame's tree (rkyv
//! validation of every node), compares the catalog with its copy, and reports what is
//! missing, damaged or orphaned. Damage found is recorded beside the store so writes are
//! refused until `kairos repair`; a store found intact clears the record.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use kairos_core::Hash;
use serde::{Deserialize, Serialize};

use crate::catalog_copy::is_catalog_key;
use crate::keys;
use crate::node::{Body, ChunkList, ConfigNode, Content, DirNode, RootNode, RuntimeNode};
use crate::object::ObjectKind;
use crate::store::{Reader, Result, Store};

/// Object values decoded per scan page.
const VERIFY_PAGE: usize = 256;
/// Problems listed in a report (the count is always complete).
const PROBLEMS_SHOWN_MAX: usize = 1000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub replicas: u64,
    pub frames: u64,
    pub objects: u64,
    pub objects_reachable: u64,
    /// Objects no frame refers to (left by an interrupted capture; harmless).
    pub objects_orphaned: u64,
    pub bytes_stored: u64,
    pub problems_count: u64,
    pub problems: Vec<String>,
    /// Keys read by the full scan of the store.
    #[serde(default)]
    pub keys_scanned: u64,
    /// The state of the catalog copy kept beside the store file.
    #[serde(default)]
    pub catalog_copy: CatalogCopyState,
}

/// What `verify` found of the catalog copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogCopyState {
    /// The backend keeps no copy.
    #[default]
    None,
    /// The copy holds exactly the store's catalog.
    Matches,
    /// The copy is damaged or disagrees with the store (listed as a problem).
    Differs,
}

impl VerifyReport {
    fn problem(&mut self, text: String) {
        self.problems_count += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(text);
        }
    }
}

impl Store {
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for problem in self.kv().check_structure()? {
            report.problem(problem);
        }
        let catalog = match self.scan_everything(&mut report) {
            Ok(catalog) => catalog,
            Err(error) => {
                report.problem(format!("scanning every key: {error}"));
                self.finish_verify(&mut report);
                return Ok(report);
            }
        };
        if let Err(error) = self.verify_contents(&mut report) {
            report.problem(error.to_string());
        }
        if let Err(error) = self.check_catalog_records(&catalog, &mut report) {
            report.problem(error.to_string());
        }
        self.compare_catalog_copy(&mut report)?;
        self.finish_verify(&mut report);
        Ok(report)
    }

    /// Sets `ok` and records the outcome beside the store (damage, or none).
    fn finish_verify(&self, report: &mut VerifyReport) {
        report.ok = report.problems_count == 0;
        if report.ok {
            let _ = self.kv().clear_damage();
        } else if let Some(first) = report.problems.first() {
            self.kv().record_damage(&format!(
                "`kairos verify` found {} problems, the first: {first}",
                report.problems_count
            ));
        }
    }

    /// Reads every key and value of the store in order (redb reads every page of the tree
    /// on the way) and returns the catalog part (everything but objects and segments).
    fn scan_everything(&self, report: &mut VerifyReport) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let reader = self.reader()?;
        let mut catalog = BTreeMap::new();
        // Segments are read through the objects they hold (`verify_contents`): their keys
        // are listed here, their values are not read twice.
        let segments_end = crate::kv::prefix_end(keys::SEGMENT).unwrap_or_default();
        let mut start = keys::SEGMENT.to_vec();
        let mut inclusive = true;
        loop {
            let lower = if inclusive {
                Bound::Included(start.as_slice())
            } else {
                Bound::Excluded(start.as_slice())
            };
            let page = reader.snapshot().scan_key_lengths(
                lower,
                Bound::Excluded(segments_end.as_slice()),
                VERIFY_PAGE,
            )?;
            report.keys_scanned += page.len() as u64;
            let full = page.len() == VERIFY_PAGE;
            match page.into_iter().last() {
                Some((last, _)) if full => {
                    start = last;
                    inclusive = false;
                }
                _ => break,
            }
        }
        for (from, to) in [
            (Vec::new(), Some(keys::SEGMENT.to_vec())),
            (segments_end, None),
        ] {
            self.scan_range(&reader, from, to, report, &mut catalog)?;
        }
        Ok(catalog)
    }

    /// Reads every key and value in `[from, to)`; keeps the catalog's, checks the series'.
    fn scan_range(
        &self,
        reader: &crate::store::Reader<'_>,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        report: &mut VerifyReport,
        catalog: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<()> {
        let mut start = from;
        let mut inclusive = true;
        loop {
            let lower = if inclusive {
                Bound::Included(start.as_slice())
            } else {
                Bound::Excluded(start.as_slice())
            };
            let upper = to.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let page = reader.snapshot().scan(lower, upper, VERIFY_PAGE, false)?;
            report.keys_scanned += page.len() as u64;
            let full = page.len() == VERIFY_PAGE;
            if let Some((last, _)) = page.last() {
                start = last.clone();
                inclusive = false;
            }
            for (key, value) in page {
                if key.starts_with(keys::SERIES) {
                    if let Err(problem) = crate::series::Sample::decode(&key, &value) {
                        report.problem(format!(
                            "runtime series sample {}: {problem}",
                            crate::kv::printable(&key)
                        ));
                    }
                } else if is_catalog_key(&key) {
                    catalog.insert(key, value);
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Every catalog record parses, and every head and time index entry names a stored frame.
    fn check_catalog_records(
        &self,
        catalog: &BTreeMap<Vec<u8>, Vec<u8>>,
        report: &mut VerifyReport,
    ) -> Result<()> {
        let frames: HashSet<Vec<u8>> = catalog
            .keys()
            .filter(|key| key.starts_with(keys::FRAME))
            .cloned()
            .collect();
        for (key, value) in catalog {
            let named = if key.starts_with(keys::HEAD) {
                Some(("timeline head", Hash::from_slice(value)))
            } else if key.starts_with(keys::TIME) {
                Some(("time index entry", keys::id_of_time_key(key)))
            } else {
                None
            };
            if let Some((what, id)) = named {
                match id {
                    Some(id) if frames.contains(&keys::frame(&id)) => {}
                    Some(id) => report.problem(format!(
                        "{what} {} names frame {} which is not stored",
                        crate::kv::printable(key),
                        id.short()
                    )),
                    None => {
                        report
                            .problem(format!("{what} {} is malformed", crate::kv::printable(key)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Compares the store's catalog with the copy kept beside it (both read while no
    /// catalog change can commit).
    fn compare_catalog_copy(&self, report: &mut VerifyReport) -> Result<()> {
        let comparison = match self.kv().catalog_with_copy() {
            Ok(Some(comparison)) => comparison,
            Ok(None) => {
                report.catalog_copy = CatalogCopyState::None;
                return Ok(());
            }
            Err(error) => {
                report.catalog_copy = CatalogCopyState::Differs;
                report.problem(format!("reading the catalog and its copy: {error}"));
                return Ok(());
            }
        };
        let catalog: BTreeMap<Vec<u8>, Vec<u8>> = comparison.catalog.into_iter().collect();
        let sequence = comparison.sequence;
        let Some(copy) = comparison.copy else {
            report.catalog_copy = CatalogCopyState::Differs;
            report.problem("catalog copy: the file is missing".into());
            return Ok(());
        };
        if let Some(problem) = &copy.problem {
            report.catalog_copy = CatalogCopyState::Differs;
            report.problem(format!("catalog copy: {problem}"));
            return Ok(());
        }
        let differing = differing_keys(&catalog, &copy.pairs);
        if copy.sequence == sequence && differing.is_empty() {
            report.catalog_copy = CatalogCopyState::Matches;
            return Ok(());
        }
        // The copy is written ahead of every durable commit: no crash leaves it behind the
        // store, so a copy behind (records cut from its end) or apart is damage, named.
        let first = differing
            .first()
            .map(|key| format!(", the first {}", crate::kv::printable(key)))
            .unwrap_or_default();
        report.catalog_copy = CatalogCopyState::Differs;
        if copy.sequence < sequence && report.problems_count == 0 {
            report.problem(format!(
                "catalog copy is behind the store (its sequence {} < the store's {sequence}; {} keys differ{first}): records are missing from its end; the store itself verifies, and `kairos repair` rewrites the copy from it",
                copy.sequence,
                differing.len(),
            ));
        } else {
            report.problem(format!(
                "catalog copy (sequence {}) and store (sequence {sequence}) differ at {} keys{first}",
                copy.sequence,
                differing.len(),
            ));
        }
        Ok(())
    }

    /// Objects and frames, as `verify` always checked them.
    fn verify_contents(&self, report: &mut VerifyReport) -> Result<()> {
        let reader = self.reader()?;
        let mut valid: HashSet<Hash> = HashSet::new();
        let end = crate::kv::prefix_end(keys::OBJECT).unwrap_or_default();
        let mut start = keys::OBJECT.to_vec();
        let mut inclusive = true;
        loop {
            let lower = if inclusive {
                Bound::Included(start.as_slice())
            } else {
                Bound::Excluded(start.as_slice())
            };
            let page = match reader.snapshot().scan(
                lower,
                Bound::Excluded(end.as_slice()),
                VERIFY_PAGE,
                false,
            ) {
                Ok(page) => page,
                Err(error) => {
                    report.problem(format!("reading the objects: {error}"));
                    break;
                }
            };
            for (key, index) in &page {
                report.objects += 1;
                let Some(hash) = Hash::from_slice(&key[keys::OBJECT.len()..]) else {
                    report.problem(format!(
                        "object key {} is malformed",
                        crate::kv::printable(key)
                    ));
                    continue;
                };
                let value = match reader.gather(&hash, ObjectKind::Blob, index) {
                    Ok(value) => value,
                    Err(error) => {
                        report.problem(format!("object {hash}: {error}"));
                        continue;
                    }
                };
                report.bytes_stored += value.len() as u64;
                let Some(kind) = value.get(1).copied().and_then(ObjectKind::from_byte) else {
                    report.problem(format!("object {hash}: unknown kind"));
                    continue;
                };
                match reader.decode(&hash, kind, &value) {
                    Ok(_) => {
                        valid.insert(hash);
                    }
                    Err(error) => report.problem(error.to_string()),
                }
            }
            let full = page.len() == VERIFY_PAGE;
            match page.into_iter().last() {
                Some((key, _)) if full => {
                    start = key;
                    inclusive = false;
                }
                _ => break,
            }
        }
        // Replicas and frames from the snapshot the objects were read from: a frame
        // committed since (a capture going on meanwhile) names objects that snapshot
        // cannot hold, and would be reported missing.
        match reader.scan_prefix(keys::REPLICA) {
            Ok(replicas) => report.replicas = replicas.len() as u64,
            Err(error) => report.problem(error.to_string()),
        }
        let mut reachable: HashSet<Hash> = HashSet::new();
        let frames = match reader.scan_prefix(keys::FRAME).and_then(|records| {
            records
                .iter()
                .map(|(key, value)| crate::catalog::parse_frame(key, value))
                .collect::<Result<Vec<_>>>()
        }) {
            Ok(frames) => frames,
            Err(error) => {
                report.problem(error.to_string());
                Vec::new()
            }
        };
        for frame in &frames {
            report.frames += 1;
            let mut walk = Walk {
                reader: &reader,
                valid: &valid,
                reachable: &mut reachable,
                report: &mut *report,
                frame: frame.id.short(),
            };
            walk.root(&frame.root);
        }
        report.objects_reachable = reachable.len() as u64;
        report.objects_orphaned = valid
            .iter()
            .filter(|hash| !reachable.contains(hash))
            .count() as u64;
        Ok(())
    }
}

/// Keys whose values differ between two catalogs (present in one only, or different).
fn differing_keys(
    store: &BTreeMap<Vec<u8>, Vec<u8>>,
    copy: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = store
        .iter()
        .filter(|(key, value)| copy.get(*key) != Some(*value))
        .map(|(key, _)| key.clone())
        .collect();
    out.extend(copy.keys().filter(|key| !store.contains_key(*key)).cloned());
    out.sort();
    out
}

struct Walk<'a, 'r> {
    reader: &'a Reader<'r>,
    valid: &'a HashSet<Hash>,
    reachable: &'a mut HashSet<Hash>,
    report: &'a mut VerifyReport,
    frame: String,
}

impl Walk<'_, '_> {
    /// Marks `hash` reachable; false if it was already visited or is not valid.
    fn visit(&mut self, hash: &Hash, kind: ObjectKind, path: &str) -> bool {
        if !self.reachable.insert(*hash) {
            return false;
        }
        if !self.valid.contains(hash) {
            let problem = format!(
                "frame {}: {} {hash} at {path:?} is missing or damaged",
                self.frame,
                kind.name()
            );
            self.report.problem(problem);
            return false;
        }
        true
    }

    fn node<T>(&mut self, hash: &Hash, kind: ObjectKind, path: &str) -> Option<T>
    where
        T: rkyv::Archive,
        T::Archived: for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            > + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        if !self.visit(hash, kind, path) {
            return None;
        }
        match self.reader.node::<T>(hash, kind) {
            Ok(node) => Some(node),
            Err(error) => {
                let problem = format!("frame {}: at {path:?}: {error}", self.frame);
                self.report.problem(problem);
                None
            }
        }
    }

    fn root(&mut self, hash: &Hash) {
        let Some(root) = self.node::<RootNode>(hash, ObjectKind::Root, "/") else {
            return;
        };
        self.dir(&Hash(root.files), "/");
        self.node::<RuntimeNode>(&Hash(root.runtime), ObjectKind::Runtime, "(runtime)");
    }

    fn dir(&mut self, hash: &Hash, path: &str) {
        let Some(node) = self.node::<DirNode>(hash, ObjectKind::Dir, path) else {
            return;
        };
        match node {
            DirNode::Index { pages } => {
                for page in pages {
                    self.dir(&Hash(page.node), path);
                }
            }
            DirNode::Leaf { entries } => {
                for entry in entries {
                    let child = format!(
                        "{}{}",
                        if path.ends_with('/') {
                            path.to_string()
                        } else {
                            format!("{path}/")
                        },
                        String::from_utf8_lossy(&entry.name)
                    );
                    match entry.body {
                        Body::Dir { node, .. } => self.dir(&Hash(node), &child),
                        Body::File {
                            content, config, ..
                        } => {
                            match content {
                                Content::Blob { hash } => {
                                    self.visit(&Hash(hash), ObjectKind::Blob, &child);
                                }
                                Content::Chunks { list, .. } => {
                                    self.chunk_list(&Hash(list), &child);
                                }
                                Content::Empty | Content::Omitted { .. } => {}
                            }
                            if let Some(config) = config {
                                self.node::<ConfigNode>(&Hash(config), ObjectKind::Config, &child);
                            }
                        }
                        Body::Symlink { .. } | Body::Special { .. } | Body::Unreadable { .. } => {}
                    }
                }
            }
        }
    }

    fn chunk_list(&mut self, hash: &Hash, path: &str) {
        let Some(list) = self.node::<ChunkList>(hash, ObjectKind::ChunkList, path) else {
            return;
        };
        for item in list.items {
            if list.level == 0 {
                self.visit(&Hash(item.hash), ObjectKind::Chunk, path);
            } else {
                self.chunk_list(&Hash(item.hash), path);
            }
        }
    }
}
