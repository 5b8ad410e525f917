//! Opening a state: one time-index lookup plus one root read, then lazy reads of the
//! subtrees a caller walks. Listing entries, config keys, processes and metrics, and
//! reading one file's content.

use std::io::Write;

use kairos_core::{Hash, Instant, Limits, TimelineSpec};
use kairos_store::node::{
    Body, ConfigNode, Content, DirEntry, Meta, Metrics, ProcessEntry, RootNode, RuntimeNode,
    SpecialKind,
};
use kairos_store::{CatalogError, FrameRecord, ObjectKind, Reader, Store, StoreError};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("frame {frame}: no entry at {path:?}")]
    NoSuchPath { frame: String, path: String },
    #[error("frame {frame}: {path:?} is a {kind}, not a regular file")]
    NotAFile {
        frame: String,
        path: String,
        kind: &'static str,
    },
    #[error("frame {frame}: the content of {path:?} was not captured: {reason}")]
    NoContent {
        frame: String,
        path: String,
        reason: String,
    },
    #[error("frame {frame}: path {path:?} escapes the replica root")]
    Escapes { frame: String, path: String },
    #[error("frame {frame}: more than {max} symlinks followed resolving {path:?} (a loop?)")]
    SymlinkLoop {
        frame: String,
        path: String,
        max: u32,
    },
    #[error("restore target {path}: {reason}")]
    Target { path: String, reason: String },
    #[error("writing {path}: {reason}")]
    Write { path: String, reason: String },
}

/// The state of a replica at one frame.
pub struct StateView {
    pub frame: FrameRecord,
    pub root: RootNode,
}

/// Opens the frame `spec` names: an index lookup and one validated root read.
pub fn open(
    store: &Store,
    replica: &str,
    spec: &TimelineSpec,
    now: Instant,
) -> Result<StateView, ReplayError> {
    let frame = store.resolve(replica, spec, now)?;
    open_frame(store, frame)
}

pub fn open_frame(store: &Store, frame: FrameRecord) -> Result<StateView, ReplayError> {
    let root = store
        .reader()?
        .node::<RootNode>(&frame.root, ObjectKind::Root)?;
    Ok(StateView { frame, root })
}

impl StateView {
    pub fn files_hash(&self) -> Hash {
        Hash(self.root.files)
    }

    pub fn runtime(&self, reader: &Reader<'_>) -> Result<RuntimeNode, ReplayError> {
        Ok(reader.node::<RuntimeNode>(&Hash(self.root.runtime), ObjectKind::Runtime)?)
    }

    fn frame_name(&self) -> String {
        self.frame.id.short()
    }

    /// The entry at `path`, following symlinks inside the state (never out of it).
    pub fn lookup(
        &self,
        reader: &Reader<'_>,
        path: &[u8],
        limits: &Limits,
    ) -> Result<DirEntry, ReplayError> {
        let shown = display_path(path);
        let mut hops = 0u32;
        let mut pending: Vec<Vec<u8>> = components(path).into_iter().rev().collect();
        let mut stack: Vec<(Vec<u8>, Hash)> = Vec::new();
        let mut current = self.root_entry();
        while let Some(component) = pending.pop() {
            if component == b".." {
                match stack.pop() {
                    Some((_, _)) => {
                        current = self.reentry(reader, &stack)?;
                        continue;
                    }
                    None => {
                        return Err(ReplayError::Escapes {
                            frame: self.frame_name(),
                            path: shown,
                        });
                    }
                }
            }
            let Body::Dir { node, .. } = &current.body else {
                return Err(ReplayError::NoSuchPath {
                    frame: self.frame_name(),
                    path: shown,
                });
            };
            let dir = Hash(*node);
            let Some(entry) = reader.dir_lookup(&dir, &component)? else {
                return Err(ReplayError::NoSuchPath {
                    frame: self.frame_name(),
                    path: shown,
                });
            };
            if let Body::Symlink { target } = &entry.body {
                hops += 1;
                if hops > limits.symlink_hops_max {
                    return Err(ReplayError::SymlinkLoop {
                        frame: self.frame_name(),
                        path: shown,
                        max: limits.symlink_hops_max,
                    });
                }
                if target.starts_with(b"/") {
                    return Err(ReplayError::Escapes {
                        frame: self.frame_name(),
                        path: shown,
                    });
                }
                for part in components(target).into_iter().rev() {
                    pending.push(part);
                }
                continue;
            }
            stack.push((component, dir));
            current = entry;
        }
        Ok(current)
    }

    fn root_entry(&self) -> DirEntry {
        DirEntry {
            name: Vec::new(),
            meta: self.root.files_meta.clone(),
            body: Body::Dir {
                node: self.root.files,
                entries: self.root.file_entries,
                bytes: self.root.file_bytes,
            },
        }
    }

    /// The entry at the end of `stack` (names with the directory holding each).
    fn reentry(
        &self,
        reader: &Reader<'_>,
        stack: &[(Vec<u8>, Hash)],
    ) -> Result<DirEntry, ReplayError> {
        match stack.last() {
            None => Ok(self.root_entry()),
            Some((name, dir)) => {
                reader
                    .dir_lookup(dir, name)?
                    .ok_or_else(|| ReplayError::NoSuchPath {
                        frame: self.frame_name(),
                        path: display_path(name),
                    })
            }
        }
    }

    /// Writes the content of the file at `path` to `out`, chunk by chunk; says how many
    /// bytes and whether the file was torn when captured.
    pub fn cat(
        &self,
        reader: &Reader<'_>,
        path: &[u8],
        limits: &Limits,
        out: &mut dyn Write,
    ) -> Result<CatOutcome, ReplayError> {
        let entry = self.lookup(reader, path, limits)?;
        let shown = display_path(path);
        match &entry.body {
            Body::File { content, torn, .. } => {
                let torn = *torn;
                write_content(reader, content, out)
                    .map(|bytes| CatOutcome { bytes, torn })
                    .map_err(|error| match error {
                        ContentError::Replay(error) => error,
                        ContentError::Omitted(reason) => ReplayError::NoContent {
                            frame: self.frame_name(),
                            path: shown.clone(),
                            reason,
                        },
                        ContentError::Io(reason) => ReplayError::Write {
                            path: "standard output".into(),
                            reason,
                        },
                    })
            }
            Body::Unreadable { error } => Err(ReplayError::NoContent {
                frame: self.frame_name(),
                path: shown,
                reason: error.clone(),
            }),
            other => Err(ReplayError::NotAFile {
                frame: self.frame_name(),
                path: shown,
                kind: kind_name(other),
            }),
        }
    }

    /// Every entry of the state, depth first in name order.
    pub fn entries(&self, reader: &Reader<'_>) -> Result<Vec<(Vec<u8>, DirEntry)>, ReplayError> {
        let mut out = Vec::with_capacity(self.root.file_entries as usize);
        walk(reader, &self.files_hash(), b"", &mut out)?;
        Ok(out)
    }
}

/// Why file content could not be written out.
#[derive(Debug)]
pub enum ContentError {
    Replay(ReplayError),
    Omitted(String),
    Io(String),
}

impl From<StoreError> for ContentError {
    fn from(error: StoreError) -> ContentError {
        ContentError::Replay(error.into())
    }
}

/// What `cat` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatOutcome {
    pub bytes: u64,
    /// The file kept changing while it was captured: these bytes are its last read, which
    /// may mix two versions.
    pub torn: bool,
}

/// The warning printed (to standard error) when a torn file is read or restored.
pub fn torn_warning(path: &str) -> String {
    format!(
        "warning: {path} was torn when captured (it kept changing while read); its content is the last read and may mix two versions"
    )
}

pub fn write_content(
    reader: &Reader<'_>,
    content: &Content,
    out: &mut dyn Write,
) -> Result<u64, ContentError> {
    let io = |error: std::io::Error| ContentError::Io(error.to_string());
    match content {
        Content::Empty => Ok(0),
        Content::Blob { hash } => reader
            .with_object(&Hash(*hash), ObjectKind::Blob, |bytes| {
                out.write_all(bytes).map(|()| bytes.len() as u64)
            })?
            .map_err(io),
        Content::Chunks { list, .. } => {
            let mut written = 0;
            for chunk in reader.chunks(&Hash(*list))? {
                let length = reader.with_object(&Hash(chunk.hash), ObjectKind::Chunk, |bytes| {
                    if bytes.len() as u64 != chunk.bytes {
                        return Err(bytes.len());
                    }
                    Ok(out.write_all(bytes))
                })?;
                match length {
                    Ok(done) => done.map_err(io)?,
                    Err(length) => {
                        return Err(ContentError::Replay(
                            StoreError::BadNode {
                                hash: Hash(*list),
                                kind: ObjectKind::ChunkList.name(),
                                problem: format!(
                                    "chunk {} has {length} bytes, the list says {}",
                                    Hash(chunk.hash),
                                    chunk.bytes
                                ),
                            }
                            .into(),
                        ));
                    }
                }
                written += chunk.bytes;
            }
            Ok(written)
        }
        Content::Omitted { reason } => Err(ContentError::Omitted(reason.clone())),
    }
}

pub(crate) fn walk(
    reader: &Reader<'_>,
    dir: &Hash,
    prefix: &[u8],
    out: &mut Vec<(Vec<u8>, DirEntry)>,
) -> Result<(), ReplayError> {
    for entry in reader.dir_entries(dir)? {
        let path = join(prefix, &entry.name);
        let child = match &entry.body {
            Body::Dir { node, .. } => Some(Hash(*node)),
            _ => None,
        };
        out.push((path.clone(), entry));
        if let Some(child) = child {
            walk(reader, &child, &path, out)?;
        }
    }
    Ok(())
}

pub fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|part| !part.is_empty() && *part != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// A path for people: UTF-8 as is, other bytes as `\xNN`.
pub fn display_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

pub fn kind_name(body: &Body) -> &'static str {
    match body {
        Body::Dir { .. } => "dir",
        Body::File { .. } => "file",
        Body::Symlink { .. } => "symlink",
        Body::Special {
            kind: SpecialKind::Fifo,
        } => "fifo",
        Body::Special {
            kind: SpecialKind::Socket,
        } => "socket",
        Body::Special {
            kind: SpecialKind::CharDevice,
        } => "char-device",
        Body::Special {
            kind: SpecialKind::BlockDevice,
        } => "block-device",
        Body::Unreadable { .. } => "unreadable",
    }
}

/// One entry of a state as shown to users.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryView {
    pub path: String,
    pub kind: String,
    pub size: u64,
    pub mode: String,
    pub mtime: Instant,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub torn: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EntryView {
    pub fn new(path: &[u8], entry: &DirEntry) -> EntryView {
        let Meta {
            mode,
            size,
            mtime_ns,
            ..
        } = entry.meta;
        let mut view = EntryView {
            path: display_path(path),
            kind: kind_name(&entry.body).to_string(),
            size: if matches!(entry.body, Body::Dir { .. }) {
                0
            } else {
                size
            },
            mode: format!("{:04o}", mode & 0o7777),
            mtime: Instant(mtime_ns),
            target: None,
            content: None,
            torn: false,
            error: None,
        };
        match &entry.body {
            Body::Symlink { target } => view.target = Some(display_path(target)),
            Body::File { content, torn, .. } => {
                view.torn = *torn;
                view.content = match content {
                    Content::Empty => None,
                    Content::Blob { hash } | Content::Chunks { list: hash, .. } => {
                        Some(Hash(*hash).short())
                    }
                    Content::Omitted { reason } => {
                        view.error = Some(reason.clone());
                        None
                    }
                };
            }
            Body::Unreadable { error } => view.error = Some(error.clone()),
            _ => {}
        }
        view
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigKeyView {
    pub file: String,
    pub format: String,
    pub key: String,
    pub value: String,
}

/// Everything `show` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateListing {
    pub frame: FrameRecord,
    pub entries: Vec<EntryView>,
    pub config: Vec<ConfigKeyView>,
    pub processes: Vec<ProcessEntryView>,
    pub metrics: MetricsView,
    pub notes: Vec<NoteView>,
    /// The runtime series' bucket nearest the instant asked for (main timeline only): the
    /// frame's own metrics are those of its capture, which may be long before that instant
    /// when the state did not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_nearest: Option<SampleView>,
}

/// A bucket of the runtime series, as `show` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleView {
    /// The instant asked for.
    pub asked: Instant,
    /// The bucket's start and width, and the instant of its latest sample.
    pub at: Instant,
    pub width_ms: u64,
    pub last_at: Instant,
    pub samples: u32,
    pub cpu_percent: f64,
    pub cpu_percent_max: f64,
    pub memory_rss_bytes: u64,
    pub memory_rss_bytes_max: u64,
    pub processes: u64,
    /// The frame that was the head when the latest sample was taken.
    pub frame: Hash,
}

impl SampleView {
    pub fn new(asked: Instant, sample: &kairos_store::series::Sample) -> SampleView {
        SampleView {
            asked,
            at: sample.at,
            width_ms: sample.width().as_millis() as u64,
            last_at: sample.last_at,
            samples: sample.samples,
            cpu_percent: sample.cpu_percent,
            cpu_percent_max: sample.cpu_percent_max,
            memory_rss_bytes: sample.memory_rss_bytes,
            memory_rss_bytes_max: sample.memory_rss_bytes_max,
            processes: sample.processes,
            frame: sample.frame,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessEntryView {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    pub cmdline: Vec<String>,
    pub state: String,
    pub start_time: Instant,
    pub rss_bytes: u64,
    pub cpu_time_ms: u64,
    pub cpu_percent: f64,
    pub threads: u32,
    pub listening: Vec<String>,
    pub selector: String,
}

impl From<&ProcessEntry> for ProcessEntryView {
    fn from(p: &ProcessEntry) -> ProcessEntryView {
        ProcessEntryView {
            pid: p.pid,
            ppid: p.ppid,
            name: p.name.clone(),
            cmdline: p.cmdline.clone(),
            state: p.state.clone(),
            start_time: Instant(p.start_time_ns),
            rss_bytes: p.rss_bytes,
            cpu_time_ms: p.cpu_time_ms,
            cpu_percent: p.cpu_percent,
            threads: p.threads,
            listening: p
                .listening
                .iter()
                .map(|s| format!("{}/{}:{}", s.protocol, s.address, s.port))
                .collect(),
            selector: p.selector.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct MetricsView {
    pub cpu_percent: f64,
    pub memory_rss_bytes: u64,
    pub disk_allocated_bytes: u64,
    pub disk_apparent_bytes: u64,
    pub files: u64,
    pub directories: u64,
    pub processes: u64,
}

impl From<&Metrics> for MetricsView {
    fn from(m: &Metrics) -> MetricsView {
        MetricsView {
            cpu_percent: m.cpu_percent,
            memory_rss_bytes: m.memory_rss_bytes,
            disk_allocated_bytes: m.disk_allocated_bytes,
            disk_apparent_bytes: m.disk_apparent_bytes,
            files: m.files,
            directories: m.directories,
            processes: m.processes,
        }
    }
}

impl MetricsView {
    pub fn pairs(&self) -> [(&'static str, f64); 7] {
        [
            ("cpu_percent", self.cpu_percent),
            ("memory_rss_bytes", self.memory_rss_bytes as f64),
            ("disk_allocated_bytes", self.disk_allocated_bytes as f64),
            ("disk_apparent_bytes", self.disk_apparent_bytes as f64),
            ("files", self.files as f64),
            ("directories", self.directories as f64),
            ("processes", self.processes as f64),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NoteView {
    pub path: String,
    pub message: String,
}

/// The config keys of every parsed config file among `entries`.
pub fn config_keys(
    reader: &Reader<'_>,
    entries: &[(Vec<u8>, DirEntry)],
) -> Result<Vec<ConfigKeyView>, ReplayError> {
    let mut out = Vec::new();
    for (path, entry) in entries {
        if let Body::File {
            config: Some(config),
            ..
        } = &entry.body
        {
            let node = reader.node::<ConfigNode>(&Hash(*config), ObjectKind::Config)?;
            let file = display_path(path);
            out.extend(node.keys.into_iter().map(|key| ConfigKeyView {
                file: file.clone(),
                format: node.format.clone(),
                key: key.key,
                value: key.value,
            }));
        }
    }
    Ok(out)
}

/// Everything in the state, for `show`.
pub fn listing(store: &Store, view: &StateView) -> Result<StateListing, ReplayError> {
    let reader = store.reader()?;
    let entries = view.entries(&reader)?;
    let config = config_keys(&reader, &entries)?;
    let runtime = view.runtime(&reader)?;
    Ok(StateListing {
        frame: view.frame.clone(),
        entries: entries
            .iter()
            .map(|(path, entry)| EntryView::new(path, entry))
            .collect(),
        config,
        processes: runtime
            .processes
            .iter()
            .map(ProcessEntryView::from)
            .collect(),
        metrics: MetricsView::from(&runtime.metrics),
        notes: view
            .root
            .notes
            .iter()
            .map(|n| NoteView {
                path: display_path(&n.path),
                message: n.message.clone(),
            })
            .collect(),
        metrics_nearest: None,
    })
}
