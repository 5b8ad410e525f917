//! `verify`: reads every stored object (hash and codec checks), then walks every frame's
//! tree (rkyv validation of every node) and reports what is missing, damaged or orphaned.

use std::collections::HashSet;
use std::ops::Bound;

use kairos_core::Hash;
use serde::{Deserialize, Serialize};

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
            let page = reader.snapshot().scan(
                lower,
                Bound::Excluded(end.as_slice()),
                VERIFY_PAGE,
                false,
            )?;
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
        report.replicas = self.replicas()?.len() as u64;
        let mut reachable: HashSet<Hash> = HashSet::new();
        let frames = match self.all_frames() {
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
                report: &mut report,
                frame: frame.id.short(),
            };
            walk.root(&frame.root);
        }
        report.objects_reachable = reachable.len() as u64;
        report.objects_orphaned = valid
            .iter()
            .filter(|hash| !reachable.contains(hash))
            .count() as u64;
        report.ok = report.problems_count == 0;
        Ok(report)
    }
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
