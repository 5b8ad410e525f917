//! The minimal revert of one frame: a proposal on the timeline's head that puts back, in
//! each entry the frame changed (files, config keys), the value of the frame before it —
//! a three-way revert. An entry changed again after the frame is a conflict named in the
//! answer, never overwritten; everything else that changed after the frame stays. The
//! proposal goes through the ordinary propose path (validation, audit), and then the
//! ordinary sandbox and commit flow.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use kairos_core::{Hash, Instant, TimelineSpec};
use kairos_sandbox::{Op, ProposalDocument};
use kairos_store::node::{Body, ConfigNode, DirEntry, RootNode};
use kairos_store::{FrameRecord, ObjectKind, Reader};
use serde::{Deserialize, Serialize};

use crate::bisect::{BisectError, entry_at, frame_range, same_entry};
use crate::wire::ProposalJson;
use crate::{OpsError, Result, Service};

#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error(
        "frame {0} is the first frame of its replica: there is no frame before it to revert to"
    )]
    NoParent(String),
    #[error(
        "frame {culprit} is not in the history of timeline {timeline:?} (head {head}): name the timeline it is on as TIMELINE@{culprit}"
    )]
    NotOnTimeline {
        culprit: String,
        timeline: String,
        head: String,
    },
    #[error(
        "frame {0} changed no file or config key (its files equal the frame before it): nothing to revert"
    )]
    NoChanges(String),
    #[error("reading the earlier content of {path:?}: {reason}")]
    Read { path: String, reason: String },
    #[error(
        "nothing of frame {culprit} can be reverted: every entry it changed conflicts ({conflicts})"
    )]
    AllConflict { culprit: String, conflicts: String },
}

/// An entry the revert puts back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevertedEntry {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The op that does it, described.
    pub op: String,
}

/// An entry the revert leaves alone, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevertConflict {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub reason: String,
    /// The first frame after the culprit in which the entry differs from the culprit's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_again_at: Option<Hash>,
}

/// What `revert --culprit` (and `bisect --propose-revert`) answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CulpritRevertJson {
    pub replica: String,
    pub timeline: String,
    pub culprit: Hash,
    /// The frame before the culprit: the values put back.
    pub parent: Hash,
    /// The head the proposal is based on.
    pub head: Hash,
    pub proposal: ProposalJson,
    pub reverted: Vec<RevertedEntry>,
    pub conflicts: Vec<RevertConflict>,
}

/// The three file trees of a three-way revert and the frames after the culprit.
struct Trees<'a> {
    before: Hash,
    culprit: Hash,
    head: Hash,
    /// The frames after the culprit up to the head, oldest first, with their file trees.
    after: &'a [(FrameRecord, Hash)],
}

/// The ops being built and what they revert or leave alone.
#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    reverted: Vec<RevertedEntry>,
    conflicts: Vec<RevertConflict>,
    /// Paths a delete already covers (with everything below them).
    covered: Vec<String>,
}

/// A config value as the stored key's text: numbers and booleans keep their type.
fn config_value(text: &str) -> serde_json::Value {
    match text {
        "true" => return serde_json::Value::Bool(true),
        "false" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(integer) = text.parse::<i64>()
        && integer.to_string() == text
    {
        return serde_json::Value::from(integer);
    }
    if let Ok(float) = text.parse::<f64>()
        && float.is_finite()
        && text.contains('.')
        && float.to_string() == text
    {
        return serde_json::Value::from(float);
    }
    serde_json::Value::String(text.to_string())
}

fn config_keys(reader: &Reader<'_>, entry: &DirEntry) -> Result<Option<BTreeMap<String, String>>> {
    let Body::File {
        config: Some(config),
        ..
    } = &entry.body
    else {
        return Ok(None);
    };
    let node = reader.node::<ConfigNode>(&Hash(*config), ObjectKind::Config)?;
    Ok(Some(
        node.keys
            .into_iter()
            .map(|key| (key.key, key.value))
            .collect(),
    ))
}

fn file_content(
    reader: &Reader<'_>,
    path: &str,
    entry: &DirEntry,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let Body::File { content, .. } = &entry.body else {
        return Ok(Err("it was not a regular file".into()));
    };
    let mut bytes = Vec::new();
    match kairos_replay::write_content(reader, content, &mut bytes) {
        Ok(_) => Ok(Ok(bytes)),
        Err(kairos_replay::ContentError::Omitted(reason)) => Ok(Err(format!(
            "its earlier content was not captured: {reason}"
        ))),
        Err(kairos_replay::ContentError::Replay(error)) => Err(error.into()),
        Err(kairos_replay::ContentError::Io(reason)) => Err(RevertError::Read {
            path: path.to_string(),
            reason,
        }
        .into()),
    }
}

fn put_file(path: &str, bytes: Vec<u8>, mode: u32) -> Op {
    let (content, content_base64) = match String::from_utf8(bytes) {
        Ok(text) => (Some(text), None),
        Err(error) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(error.into_bytes())),
        ),
    };
    Op::PutFile {
        path: path.to_string(),
        content,
        content_base64,
        from: None,
        mode: Some(mode & 0o7777),
    }
}

impl Plan {
    fn revert(&mut self, path: &str, key: Option<&str>, op: Op) {
        self.reverted.push(RevertedEntry {
            path: path.to_string(),
            key: key.map(str::to_string),
            op: op.describe(),
        });
        self.ops.push(op);
    }

    fn conflict(&mut self, path: &str, key: Option<&str>, reason: String, at: Option<Hash>) {
        self.conflicts.push(RevertConflict {
            path: path.to_string(),
            key: key.map(str::to_string),
            reason,
            changed_again_at: at,
        });
    }
}

impl Trees<'_> {
    /// The first frame after the culprit whose entry at `path` differs from the culprit's.
    fn changed_again_at(&self, reader: &Reader<'_>, path: &str) -> Result<Option<Hash>> {
        let culprit = entry_at(reader, &self.culprit, path)?;
        for (frame, tree) in self.after {
            if !same_entry(entry_at(reader, tree, path)?.as_ref(), culprit.as_ref()) {
                return Ok(Some(frame.id));
            }
        }
        Ok(None)
    }

    /// The first frame after the culprit in which `key` of `path` differs from the culprit's.
    fn key_changed_again_at(
        &self,
        reader: &Reader<'_>,
        path: &str,
        key: &str,
        culprit_value: Option<&String>,
    ) -> Result<Option<Hash>> {
        for (frame, tree) in self.after {
            let value = match entry_at(reader, tree, path)? {
                Some(entry) => config_keys(reader, &entry)?.and_then(|keys| keys.get(key).cloned()),
                None => None,
            };
            if value.as_ref() != culprit_value {
                return Ok(Some(frame.id));
            }
        }
        Ok(None)
    }
}

fn plan_entry(reader: &Reader<'_>, trees: &Trees<'_>, plan: &mut Plan, path: &str) -> Result<()> {
    if plan
        .covered
        .iter()
        .any(|covered| path.starts_with(&format!("{covered}/")))
    {
        return Ok(());
    }
    let before = entry_at(reader, &trees.before, path)?;
    let culprit = entry_at(reader, &trees.culprit, path)?;
    let head = entry_at(reader, &trees.head, path)?;
    if same_entry(head.as_ref(), before.as_ref()) {
        // Already as it was before the culprit.
        return Ok(());
    }
    if !same_entry(head.as_ref(), culprit.as_ref()) {
        return plan_changed_again(reader, trees, plan, path, (&before, &culprit, &head));
    }
    match (&before, &culprit) {
        (None, _) => {
            plan.revert(path, None, Op::Delete { path: path.into() });
            plan.covered.push(path.to_string());
        }
        (Some(earlier), now) if matches!(earlier.body, Body::File { .. }) => {
            let bytes = match file_content(reader, path, earlier)? {
                Ok(bytes) => bytes,
                Err(reason) => {
                    plan.conflict(path, None, reason, None);
                    return Ok(());
                }
            };
            // put_file keeps an existing file's mode: a mode or kind change goes back
            // through a delete first.
            if let Some(now) = now
                && (!matches!(now.body, Body::File { .. })
                    || now.meta.mode & 0o7777 != earlier.meta.mode & 0o7777)
            {
                plan.revert(path, None, Op::Delete { path: path.into() });
            }
            plan.revert(path, None, put_file(path, bytes, earlier.meta.mode));
        }
        (Some(earlier), None) if matches!(earlier.body, Body::Dir { entries, .. } if entries > 0) =>
        {
            // A removed directory comes back through the files below it.
        }
        (Some(earlier), now) => {
            let what = match (&earlier.body, now.as_ref().map(|n| &n.body)) {
                (Body::Dir { .. }, Some(Body::Dir { .. })) => {
                    "a directory's mode cannot be changed by a proposal op"
                }
                (Body::Dir { .. }, None) => {
                    "an empty directory cannot be re-created by a proposal op"
                }
                (Body::Dir { .. }, Some(_)) => {
                    "a directory replaced by another kind cannot be re-created by a proposal op"
                }
                (Body::Symlink { .. }, _) => "a symlink cannot be re-created by a proposal op",
                _ => "this kind of entry cannot be re-created by a proposal op",
            };
            plan.conflict(path, None, what.to_string(), None);
        }
    }
    Ok(())
}

/// An entry the culprit changed and a later frame changed again: config keys the later
/// frames did not touch still go back; the rest is a conflict.
fn plan_changed_again(
    reader: &Reader<'_>,
    trees: &Trees<'_>,
    plan: &mut Plan,
    path: &str,
    (before, culprit, head): (&Option<DirEntry>, &Option<DirEntry>, &Option<DirEntry>),
) -> Result<()> {
    if let (Some(c), Some(h)) = (culprit, head)
        && matches!(c.body, Body::Dir { .. })
        && matches!(h.body, Body::Dir { .. })
    {
        // A directory: the entries below it are looked at one by one.
        return Ok(());
    }
    let keys = |entry: &Option<DirEntry>| -> Result<Option<BTreeMap<String, String>>> {
        match entry {
            Some(entry) => config_keys(reader, entry),
            None => Ok(None),
        }
    };
    let (b, c, h) = (keys(before)?, keys(culprit)?, keys(head)?);
    let (Some(b), Some(c), Some(h)) = (b, c, h) else {
        let at = trees.changed_again_at(reader, path)?;
        plan.conflict(
            path,
            None,
            "changed again after the culprit".to_string(),
            at,
        );
        return Ok(());
    };
    let changed: BTreeSet<&String> = b
        .keys()
        .chain(c.keys())
        .filter(|key| b.get(*key) != c.get(*key))
        .collect();
    if changed.is_empty() {
        let at = trees.changed_again_at(reader, path)?;
        plan.conflict(
            path,
            None,
            "changed again after the culprit, which changed no key of it".to_string(),
            at,
        );
        return Ok(());
    }
    for key in changed {
        let (was, culprit_value, now) = (b.get(key), c.get(key), h.get(key));
        if now == was {
            continue;
        }
        if now != culprit_value {
            let at = trees.key_changed_again_at(reader, path, key, culprit_value)?;
            plan.conflict(
                path,
                Some(key),
                "this key changed again after the culprit".to_string(),
                at,
            );
            continue;
        }
        let op = match was {
            Some(value) => Op::SetConfig {
                file: path.to_string(),
                key: key.clone(),
                value: config_value(value),
            },
            None => Op::UnsetConfig {
                file: path.to_string(),
                key: key.clone(),
            },
        };
        plan.revert(path, Some(key), op);
    }
    Ok(())
}

impl Service<'_> {
    /// Proposes, on the head of the culprit's timeline, the minimal revert of `culprit`.
    pub fn revert_culprit(
        &self,
        name: &str,
        culprit: &TimelineSpec,
        party: &str,
    ) -> Result<CulpritRevertJson> {
        self.store.replica(name)?;
        let now = Instant::now();
        let culprit_frame = self.store.resolve(name, culprit, now)?;
        let timeline = culprit.timeline.clone();
        let head = self.store.head(name, &timeline)?.ok_or_else(|| {
            kairos_store::CatalogError::NoFrames {
                replica: name.to_string(),
                timeline: timeline.clone(),
            }
        })?;
        // The frame before it that is still kept (its parent, unless a forget removed it).
        let parent = self
            .store
            .previous_frame(&culprit_frame)?
            .ok_or_else(|| RevertError::NoParent(culprit_frame.id.short()))?;
        let chain = if head.id == culprit_frame.id {
            vec![culprit_frame.clone()]
        } else {
            frame_range(self, &culprit_frame, &head).map_err(|error| match error {
                OpsError::Bisect(
                    BisectError::NotAncestor { .. } | BisectError::GoodAfterBad { .. },
                ) => RevertError::NotOnTimeline {
                    culprit: culprit_frame.id.short(),
                    timeline: timeline.clone(),
                    head: head.id.short(),
                }
                .into(),
                other => other,
            })?
        };
        let reader = self.store.reader()?;
        let tree_of = |frame: &FrameRecord| -> Result<Hash> {
            Ok(Hash(
                reader
                    .node::<RootNode>(&frame.root, ObjectKind::Root)?
                    .files,
            ))
        };
        let after: Vec<(FrameRecord, Hash)> = chain[1..]
            .iter()
            .map(|frame| Ok((frame.clone(), tree_of(frame)?)))
            .collect::<Result<_>>()?;
        let trees = Trees {
            before: tree_of(&parent)?,
            culprit: tree_of(&culprit_frame)?,
            head: tree_of(&head)?,
            after: &after,
        };
        let (files, _) = kairos_replay::diff_files(self.store, &trees.before, &trees.culprit)?;
        if files.is_empty() {
            return Err(RevertError::NoChanges(culprit_frame.id.short()).into());
        }
        let mut plan = Plan::default();
        for change in &files {
            plan_entry(&reader, &trees, &mut plan, &change.path)?;
        }
        if plan.ops.is_empty() {
            let conflicts = if plan.conflicts.is_empty() {
                "every entry is already as it was before it".to_string()
            } else {
                plan.conflicts
                    .iter()
                    .map(|c| match &c.key {
                        Some(key) => format!("{} key {key}: {}", c.path, c.reason),
                        None => format!("{}: {}", c.path, c.reason),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            return Err(RevertError::AllConflict {
                culprit: culprit_frame.id.short(),
                conflicts,
            }
            .into());
        }
        let document = ProposalDocument {
            title: format!("revert frame {}", culprit_frame.id.short()),
            author: String::new(),
            description: Some(format!(
                "minimal revert of frame {}: each entry it changed goes back to its value in frame {}",
                culprit_frame.id, parent.id
            )),
            base: Some(format!("{timeline}@{}", head.id.to_hex())),
            ops: plan.ops,
        };
        let proposal = self.propose(name, document, None, party)?;
        Ok(CulpritRevertJson {
            replica: name.to_string(),
            timeline,
            culprit: culprit_frame.id,
            parent: parent.id,
            head: head.id,
            proposal,
            reverted: plan.reverted,
            conflicts: plan.conflicts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_keep_numbers_and_booleans() {
        assert_eq!(config_value("8080"), serde_json::json!(8080));
        assert_eq!(config_value("true"), serde_json::json!(true));
        assert_eq!(config_value("1.5"), serde_json::json!(1.5));
        assert_eq!(config_value("08080"), serde_json::json!("08080"));
        assert_eq!(config_value("8MB"), serde_json::json!("8MB"));
        assert_eq!(config_value(""), serde_json::json!(""));
    }
}
