//! Diffing two states: a Merkle walk that descends only into subtrees whose hashes differ,
//! then config keys of changed config files, processes and metrics.

use std::collections::BTreeMap;

use kairos_core::Hash;
use kairos_store::node::{Body, ConfigNode, DirEntry};
use kairos_store::{ObjectKind, Reader, Store};
use serde::{Deserialize, Serialize};

use crate::state::{
    EntryView, MetricsView, ProcessEntryView, ReplayError, StateView, display_path, join,
    kind_name, walk,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileChange {
    /// `added`, `removed` or `modified`.
    pub change: String,
    pub path: String,
    pub kind: String,
    /// What changed, for modifications: `content`, `mode`, `kind`, `target`, `owner`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_to: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigChange {
    pub file: String,
    pub key: String,
    /// Absent when the key was added.
    pub from: Option<String>,
    /// Absent when the key was removed.
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricChange {
    pub metric: String,
    pub from: f64,
    pub to: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProcessChanges {
    pub started: Vec<ProcessEntryView>,
    pub exited: Vec<ProcessEntryView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateDiff {
    pub from: kairos_store::FrameRecord,
    pub to: kairos_store::FrameRecord,
    pub files: Vec<FileChange>,
    pub config: Vec<ConfigChange>,
    pub processes: ProcessChanges,
    pub metrics: Vec<MetricChange>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
            && self.config.is_empty()
            && self.processes.started.is_empty()
            && self.processes.exited.is_empty()
            && self.metrics.is_empty()
    }
}

/// The file and config-key changes between two file trees (a Merkle walk).
pub fn diff_files(
    store: &Store,
    from: &Hash,
    to: &Hash,
) -> Result<(Vec<FileChange>, Vec<ConfigChange>), ReplayError> {
    let reader = store.reader()?;
    let mut walker = DiffWalk {
        reader: &reader,
        files: Vec::new(),
        config: Vec::new(),
    };
    walker.dir(from, to, b"")?;
    Ok((walker.files, walker.config))
}

pub fn diff(store: &Store, from: &StateView, to: &StateView) -> Result<StateDiff, ReplayError> {
    let reader = store.reader()?;
    let mut walker = DiffWalk {
        reader: &reader,
        files: Vec::new(),
        config: Vec::new(),
    };
    walker.dir(&from.files_hash(), &to.files_hash(), b"")?;
    let runtime_from = from.runtime(&reader)?;
    let runtime_to = to.runtime(&reader)?;
    let identity = |p: &kairos_store::node::ProcessEntry| (p.pid, p.start_time_ns);
    let before: BTreeMap<_, _> = runtime_from
        .processes
        .iter()
        .map(|p| (identity(p), p))
        .collect();
    let after: BTreeMap<_, _> = runtime_to
        .processes
        .iter()
        .map(|p| (identity(p), p))
        .collect();
    let processes = ProcessChanges {
        started: after
            .iter()
            .filter(|(key, _)| !before.contains_key(key))
            .map(|(_, p)| ProcessEntryView::from(*p))
            .collect(),
        exited: before
            .iter()
            .filter(|(key, _)| !after.contains_key(key))
            .map(|(_, p)| ProcessEntryView::from(*p))
            .collect(),
    };
    let metrics = MetricsView::from(&runtime_from.metrics)
        .pairs()
        .into_iter()
        .zip(MetricsView::from(&runtime_to.metrics).pairs())
        .filter(|((_, a), (_, b))| a != b)
        .map(|((metric, from), (_, to))| MetricChange {
            metric: metric.to_string(),
            from,
            to,
        })
        .collect();
    Ok(StateDiff {
        from: from.frame.clone(),
        to: to.frame.clone(),
        files: walker.files,
        config: walker.config,
        processes,
        metrics,
    })
}

struct DiffWalk<'a, 'r> {
    reader: &'a Reader<'r>,
    files: Vec<FileChange>,
    config: Vec<ConfigChange>,
}

impl DiffWalk<'_, '_> {
    fn dir(&mut self, from: &Hash, to: &Hash, prefix: &[u8]) -> Result<(), ReplayError> {
        if from == to {
            return Ok(());
        }
        let before = self.reader.dir_entries(from)?;
        let after = self.reader.dir_entries(to)?;
        let (mut i, mut j) = (0, 0);
        while i < before.len() || j < after.len() {
            let order = match (before.get(i), after.get(j)) {
                (Some(a), Some(b)) => a.name.cmp(&b.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.whole(&before[i], prefix, "removed")?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.whole(&after[j], prefix, "added")?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    self.pair(&before[i], &after[j], prefix)?;
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    }

    /// An entry present on one side only, with everything below it.
    fn whole(
        &mut self,
        entry: &DirEntry,
        prefix: &[u8],
        change: &'static str,
    ) -> Result<(), ReplayError> {
        let path = join(prefix, &entry.name);
        let mut all = vec![(path.clone(), entry.clone())];
        if let Body::Dir { node, .. } = &entry.body {
            walk(self.reader, &Hash(*node), &path, &mut all)?;
        }
        for (path, entry) in all {
            let view = EntryView::new(&path, &entry);
            let size = (view.kind == "file").then_some(view.size);
            self.files.push(FileChange {
                change: change.to_string(),
                path: view.path.clone(),
                kind: view.kind.clone(),
                what: Vec::new(),
                size_from: if change == "removed" { size } else { None },
                size_to: if change == "added" { size } else { None },
            });
            let config = match &entry.body {
                Body::File {
                    config: Some(config),
                    ..
                } => Some(Hash(*config)),
                _ => None,
            };
            if let Some(config) = config {
                let keys = self.keys(&config)?;
                for (key, value) in keys {
                    let (from, to) = if change == "added" {
                        (None, Some(value))
                    } else {
                        (Some(value), None)
                    };
                    self.config.push(ConfigChange {
                        file: view.path.clone(),
                        key,
                        from,
                        to,
                    });
                }
            }
        }
        Ok(())
    }

    fn pair(&mut self, a: &DirEntry, b: &DirEntry, prefix: &[u8]) -> Result<(), ReplayError> {
        let path = join(prefix, &a.name);
        if let (Body::Dir { node: from, .. }, Body::Dir { node: to, .. }) = (&a.body, &b.body) {
            if a.meta.mode != b.meta.mode || (a.meta.uid, a.meta.gid) != (b.meta.uid, b.meta.gid) {
                self.files.push(FileChange {
                    change: "modified".into(),
                    path: display_path(&path),
                    kind: "dir".into(),
                    what: metadata_changes(a, b)
                        .into_iter()
                        .map(String::from)
                        .collect(),
                    size_from: None,
                    size_to: None,
                });
            }
            return self.dir(&Hash(*from), &Hash(*to), &path);
        }
        let mut what = Vec::new();
        if kind_name(&a.body) != kind_name(&b.body) {
            what.push("kind");
        } else {
            match (&a.body, &b.body) {
                (Body::File { content: x, .. }, Body::File { content: y, .. }) if x != y => {
                    what.push("content");
                }
                (Body::Symlink { target: x }, Body::Symlink { target: y }) if x != y => {
                    what.push("target");
                }
                (Body::Unreadable { error: x }, Body::Unreadable { error: y }) if x != y => {
                    what.push("content");
                }
                _ => {}
            }
        }
        what.extend(metadata_changes(a, b));
        if what.is_empty() {
            return Ok(());
        }
        let file = |e: &DirEntry| matches!(e.body, Body::File { .. }).then_some(e.meta.size);
        self.files.push(FileChange {
            change: "modified".into(),
            path: display_path(&path),
            kind: kind_name(&b.body).into(),
            what: what.into_iter().map(String::from).collect(),
            size_from: file(a),
            size_to: file(b),
        });
        let config_of = |e: &DirEntry| match &e.body {
            Body::File { config, .. } => config.map(Hash),
            _ => None,
        };
        let (from, to) = (config_of(a), config_of(b));
        if from != to {
            let before = match from {
                Some(hash) => self.keys(&hash)?,
                None => Vec::new(),
            };
            let after = match to {
                Some(hash) => self.keys(&hash)?,
                None => Vec::new(),
            };
            self.key_changes(&display_path(&path), before, after);
        }
        Ok(())
    }

    fn keys(&self, hash: &Hash) -> Result<Vec<(String, String)>, ReplayError> {
        let node = self.reader.node::<ConfigNode>(hash, ObjectKind::Config)?;
        Ok(node.keys.into_iter().map(|k| (k.key, k.value)).collect())
    }

    fn key_changes(
        &mut self,
        file: &str,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
    ) {
        let old: BTreeMap<&str, &str> = before
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let new: BTreeMap<&str, &str> = after
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for (key, value) in &after {
            match old.get(key.as_str()) {
                Some(previous) if previous == value => {}
                previous => self.config.push(ConfigChange {
                    file: file.to_string(),
                    key: key.clone(),
                    from: previous.map(|v| v.to_string()),
                    to: Some(value.clone()),
                }),
            }
        }
        for (key, value) in &before {
            if !new.contains_key(key.as_str()) {
                self.config.push(ConfigChange {
                    file: file.to_string(),
                    key: key.clone(),
                    from: Some(value.clone()),
                    to: None,
                });
            }
        }
    }
}

fn metadata_changes(a: &DirEntry, b: &DirEntry) -> Vec<&'static str> {
    let mut what = Vec::new();
    if a.meta.mode & 0o7777 != b.meta.mode & 0o7777 {
        what.push("mode");
    }
    if (a.meta.uid, a.meta.gid) != (b.meta.uid, b.meta.gid) {
        what.push("owner");
    }
    what
}
