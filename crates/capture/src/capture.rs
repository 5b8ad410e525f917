//! One capture of a replica: walk the root (reusing unchanged files from the previous
//! frame), read changed files in parallel, sample processes and metrics, write the tree
//! bottom-up and commit the frame atomically.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as Clock;

use globset::GlobSet;
use kairos_core::{Hash, Instant, Limits, ReplicaDefinition};
use kairos_store::node::{
    self, Body, CaptureNote, ChunkRef, ConfigKey, ConfigNode, Content, DirEntry, Meta, Metrics,
    ProcessEntry, RootNode, RuntimeNode, SpecialKind,
};
use kairos_store::series::{ProcessCounter, Sample};
use kairos_store::tree::{
    self, BLOB_BYTES_MAX, CHUNK_BYTES_AVERAGE, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN,
};
use kairos_store::{
    CatalogError, FrameDraft, FrameRecord, ObjectKind, ObjectWriter, Store, StoreError, WriteStats,
};
use rayon::prelude::*;

use crate::config::{self, ConfigFormat};
use crate::process::{self, PreviousSample, Selector, SelectorError};

/// A file whose mtime is this close to (or after) the start of the previous capture is read
/// again even if its metadata looks unchanged: the kernel stamps files from a coarse clock
/// (a few milliseconds), so a write just after that capture read the file could carry an
/// earlier mtime (git's "racy clean" problem).
const RACY_MTIME_MARGIN_NS: i64 = 50_000_000;
/// The same margin for file systems with whole-second timestamps (mtime without nanoseconds).
const RACY_MTIME_MARGIN_COARSE_NS: i64 = 2_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("replica {replica:?}: root {root} is not readable: {reason}")]
    RootUnreadable {
        replica: String,
        root: PathBuf,
        reason: String,
    },
    #[error("replica {replica:?}: root {root} is not a directory")]
    RootNotDirectory { replica: String, root: PathBuf },
    #[error("replica {replica:?}: the state has more than {max} entries (limit state_entries_max)")]
    TooManyEntries { replica: String, max: u64 },
    #[error(transparent)]
    BadExclude(#[from] kairos_replica::exclude::ExcludeError),
    #[error("replica {replica:?}: {source}")]
    Selector {
        replica: String,
        source: SelectorError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// What a capture did, for the caller to report.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// The new frame, or the head when the state was unchanged and none was recorded.
    pub frame: FrameRecord,
    /// Whether a new frame was stored (false: `capture_if_changed` found the head's state).
    pub recorded: bool,
    pub stats: WriteStats,
    pub files_read: u64,
    pub files_reused: u64,
    pub processes: u64,
    pub notes: Vec<(String, String)>,
    /// A dictionary version trained after this capture, if one was.
    pub dictionary_trained: Option<u32>,
}

/// Everything a capture needs besides the store.
pub struct CaptureRequest<'a> {
    pub replica: &'a ReplicaDefinition,
    pub timeline: &'a str,
    pub limits: Limits,
    /// Paths never captured (the store's own data directory when it lies inside the root).
    pub skip: Vec<PathBuf>,
}

/// Captures the replica and stores the state as a new frame, changed or not (a capture
/// someone asked for: the API's and the CLI's `capture`, a commit's).
pub fn capture(store: &Store, request: &CaptureRequest<'_>) -> Result<CaptureReport, CaptureError> {
    capture_with(store, request, false)
}

/// Captures the replica but stores a new frame only when its state differs from the
/// timeline head's: the files (content and metadata), the root directory's metadata and
/// the set of processes (pid, start time, command line, listening sockets). CPU, memory,
/// thread counts and process states are metrics: they go to the runtime series either
/// way, so an idle replica's history grows by nothing but series samples. The state at
/// any instant stays exact: it is the last frame at or before it.
pub fn capture_if_changed(
    store: &Store,
    request: &CaptureRequest<'_>,
) -> Result<CaptureReport, CaptureError> {
    capture_with(store, request, true)
}

fn capture_with(
    store: &Store,
    request: &CaptureRequest<'_>,
    only_if_changed: bool,
) -> Result<CaptureReport, CaptureError> {
    let started = Clock::now();
    let replica = request.replica;
    let now = Instant::now();
    let root_meta = root_metadata(replica)?;
    let selectors = selectors(replica)?;
    let head = store.head(&replica.name, request.timeline)?;
    let previous = previous_state(store, &replica.name, head.as_ref())?;
    let writer = store.object_writer(&replica.name)?;
    let reader = store.reader()?;
    let mut walked = walk_root(&reader, request, &previous)?;
    let (files_read, torn, read_notes) =
        read_changed_files(&writer, &mut walked.pending, &request.limits)?;
    let mut notes = walked.notes;
    notes.extend(read_notes);
    let built = build_dir(&writer, walked.pending)?;
    let mut metrics = Metrics {
        directories: walked.directories,
        files: built.files,
        disk_apparent_bytes: built.bytes,
        disk_allocated_bytes: built.allocated,
        ..Metrics::default()
    };
    let processes = process::sample(&selectors, &previous.processes, now);
    let process_count = processes.len() as u64;
    metrics.processes = process_count;
    metrics.memory_rss_bytes = processes.iter().map(|p| p.rss_bytes).sum();
    // `+ 0.0`: the sum of no processes is -0.0, shown as such in JSON.
    metrics.cpu_percent =
        (processes.iter().map(|p| p.cpu_percent).sum::<f64>() * 100.0).round() / 100.0 + 0.0;
    let files_meta = meta_of(&root_meta);
    let sample = |frame: Hash| series_sample(now, frame, &metrics, &processes);
    if only_if_changed
        && let (Some(head), Some((_, previous_root))) = (head.as_ref(), previous.root.as_ref())
        && previous_root.files == built.hash.0
        && previous_root.files_meta == files_meta
        && previous.identities.as_ref() == Some(&process_identities(&processes))
    {
        let stats = writer.finish()?;
        record_sample(store, &replica.name, &sample(head.id), &mut notes);
        return Ok(CaptureReport {
            frame: head.clone(),
            recorded: false,
            stats,
            files_read,
            files_reused: walked.files_reused,
            processes: process_count,
            notes: report_notes(notes),
            dictionary_trained: None,
        });
    }
    let runtime = writer.put(
        ObjectKind::Runtime,
        &node::to_bytes(&RuntimeNode {
            processes: processes.clone(),
            metrics: metrics.clone(),
        }),
    )?;
    let unreadable = notes
        .iter()
        .filter(|n| n.message.starts_with("unreadable"))
        .count() as u64;
    let root = RootNode {
        format: node::ROOT_FORMAT,
        replica: replica.name.clone(),
        captured_at_ns: now.0,
        files: built.hash.0,
        files_meta,
        file_entries: built.entries,
        file_bytes: built.bytes,
        runtime: runtime.0,
        notes: notes.clone(),
    };
    let root_hash = writer.put(ObjectKind::Root, &node::to_bytes(&root))?;
    let stats = writer.finish()?;
    let frame = store.commit_frame(FrameDraft {
        replica: replica.name.clone(),
        timeline: request.timeline.to_string(),
        time: now,
        parent: head.map(|frame| frame.id),
        root: root_hash,
        entries: built.entries,
        bytes: built.bytes,
        stats,
        torn,
        unreadable,
        capture_ms: started.elapsed().as_millis() as u64,
    })?;
    let dictionary_trained = if writer.has_dictionary() {
        None
    } else {
        store.save_dictionary(&replica.name, &writer)?
    };
    record_sample(store, &replica.name, &sample(frame.id), &mut notes);
    Ok(CaptureReport {
        frame,
        recorded: true,
        stats,
        files_read,
        files_reused: walked.files_reused,
        processes: process_count,
        notes: report_notes(notes),
        dictionary_trained,
    })
}

fn report_notes(notes: Vec<CaptureNote>) -> Vec<(String, String)> {
    notes
        .into_iter()
        .map(|n| (String::from_utf8_lossy(&n.path).into_owned(), n.message))
        .collect()
}

/// What of the processes is state (a change makes a frame), as opposed to metrics.
type ProcessIdentity = (
    u32,
    i64,
    String,
    Vec<String>,
    Vec<(String, String, u16)>,
    String,
);

fn process_identities(processes: &[ProcessEntry]) -> Vec<ProcessIdentity> {
    let mut identities: Vec<ProcessIdentity> = processes
        .iter()
        .map(|p| {
            (
                p.pid,
                p.start_time_ns,
                p.name.clone(),
                p.cmdline.clone(),
                p.listening
                    .iter()
                    .map(|l| (l.protocol.clone(), l.address.clone(), l.port))
                    .collect(),
                p.selector.clone(),
            )
        })
        .collect();
    identities.sort();
    identities
}

fn series_sample(
    now: Instant,
    frame: Hash,
    metrics: &Metrics,
    processes: &[ProcessEntry],
) -> Sample {
    // Figures out of range are clamped by `Store::record_sample`, counters cut to its bound.
    let mut sample = Sample::new(now, frame);
    sample.cpu_percent = metrics.cpu_percent;
    sample.cpu_percent_max = metrics.cpu_percent;
    sample.memory_rss_bytes = metrics.memory_rss_bytes;
    sample.memory_rss_bytes_max = metrics.memory_rss_bytes;
    sample.processes = metrics.processes;
    sample.files = metrics.files;
    sample.disk_allocated_bytes = metrics.disk_allocated_bytes;
    sample.counters = processes
        .iter()
        .map(|p| ProcessCounter {
            pid: p.pid,
            start_time_ns: p.start_time_ns,
            cpu_time_ms: p.cpu_time_ms,
        })
        .collect();
    sample
}

/// Adds the capture's sample to the runtime series. A sample that cannot be stored never
/// fails the capture (the frame, if any, is committed): it is named in the notes.
fn record_sample(store: &Store, replica: &str, sample: &Sample, notes: &mut Vec<CaptureNote>) {
    if let Err(error) = store.record_sample(replica, sample) {
        notes.push(note(b"", format!("runtime series not updated: {error}")));
    }
}

/// The root's metadata: it must be a readable directory.
fn root_metadata(replica: &ReplicaDefinition) -> Result<Metadata, CaptureError> {
    let root_meta =
        std::fs::metadata(&replica.root).map_err(|error| CaptureError::RootUnreadable {
            replica: replica.name.clone(),
            root: replica.root.clone(),
            reason: error.to_string(),
        })?;
    if !root_meta.is_dir() {
        return Err(CaptureError::RootNotDirectory {
            replica: replica.name.clone(),
            root: replica.root.clone(),
        });
    }
    Ok(root_meta)
}

fn selectors(replica: &ReplicaDefinition) -> Result<Vec<Selector>, CaptureError> {
    replica
        .processes
        .iter()
        .map(|pattern| Selector::new(pattern))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaptureError::Selector {
            replica: replica.name.clone(),
            source,
        })
}

/// What the previous frame of the timeline offers a new capture.
struct Previous {
    /// Its time and root, for reusing unchanged files.
    root: Option<(Instant, RootNode)>,
    /// The processes' CPU time at the last sample (the runtime series' newest, or the
    /// head's), to turn into rates.
    processes: HashMap<(u32, i64), PreviousSample>,
    /// The head's processes as state, to tell a changed state from changed metrics.
    identities: Option<Vec<ProcessIdentity>>,
    notes: Vec<CaptureNote>,
}

fn previous_state(
    store: &Store,
    replica: &str,
    head: Option<&FrameRecord>,
) -> Result<Previous, CaptureError> {
    let mut notes = Vec::new();
    let root = match head {
        Some(frame) => match store
            .reader()?
            .node::<RootNode>(&frame.root, ObjectKind::Root)
        {
            Ok(root) => Some((frame.time, root)),
            Err(error) => {
                notes.push(note(
                    b"",
                    format!("previous frame unreadable, captured without reuse: {error}"),
                ));
                None
            }
        },
        None => None,
    };
    let runtime = root.as_ref().and_then(|(at, root)| {
        let reader = store.reader().ok()?;
        let runtime = reader
            .node::<RuntimeNode>(&Hash(root.runtime), ObjectKind::Runtime)
            .ok()?;
        Some((*at, runtime))
    });
    let identities = runtime
        .as_ref()
        .map(|(_, runtime)| process_identities(&runtime.processes));
    // The series' newest sample is the latest CPU reading when it is newer than the head
    // (captures of an unchanged state store no frame); a damaged sample is not fatal.
    let latest = store.latest_sample(replica).ok().flatten();
    let processes = match (latest, runtime) {
        (Some(sample), runtime) if runtime.as_ref().is_none_or(|(at, _)| sample.last_at > *at) => {
            sample
                .counters
                .iter()
                .map(|c| {
                    (
                        (c.pid, c.start_time_ns),
                        PreviousSample {
                            cpu_time_ms: c.cpu_time_ms,
                            at: sample.last_at,
                        },
                    )
                })
                .collect()
        }
        (_, Some((at, runtime))) => runtime
            .processes
            .iter()
            .map(|p| {
                (
                    (p.pid, p.start_time_ns),
                    PreviousSample {
                        cpu_time_ms: p.cpu_time_ms,
                        at,
                    },
                )
            })
            .collect(),
        _ => HashMap::new(),
    };
    Ok(Previous {
        root,
        processes,
        identities,
        notes,
    })
}

/// The walk's result: the tree to build, with slots for the files to read.
struct Walked {
    pending: Vec<Pending>,
    files_reused: u64,
    directories: u64,
    notes: Vec<CaptureNote>,
}

fn walk_root(
    reader: &kairos_store::Reader<'_>,
    request: &CaptureRequest<'_>,
    previous: &Previous,
) -> Result<Walked, CaptureError> {
    let replica = request.replica;
    let skip: Vec<PathBuf> = request
        .skip
        .iter()
        .filter_map(|path| path.canonicalize().ok())
        .collect();
    let walker = Walker {
        reader,
        excludes: build_excludes(replica)?,
        skip,
        limits: request.limits,
        replica: &replica.name,
        previous_capture_ns: previous
            .root
            .as_ref()
            .map(|(at, _)| at.0)
            .unwrap_or(i64::MIN),
        entries: AtomicU64::new(0),
        files_reused: AtomicU64::new(0),
        directories: AtomicU64::new(0),
        notes: Mutex::new(previous.notes.clone()),
    };
    let root_canonical = replica
        .root
        .canonicalize()
        .unwrap_or_else(|_| replica.root.clone());
    let previous_files = previous.root.as_ref().map(|(_, root)| Hash(root.files));
    let pending = walker
        .walk_dir(&root_canonical, b"", previous_files)
        .map_err(|error| match error {
            WalkError::Io(reason) => CaptureError::RootUnreadable {
                replica: replica.name.clone(),
                root: replica.root.clone(),
                reason,
            },
            WalkError::Capture(error) => error,
        })?;
    Ok(Walked {
        pending,
        files_reused: walker.files_reused.load(Ordering::Relaxed),
        directories: walker.directories.load(Ordering::Relaxed),
        notes: walker.notes.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

/// Reads every new or changed file, in parallel, into its slot of the pending tree.
/// Returns how many were read, how many were torn, and notes about them.
fn read_changed_files(
    writer: &ObjectWriter,
    pending: &mut [Pending],
    limits: &Limits,
) -> Result<(u64, u64, Vec<CaptureNote>), CaptureError> {
    let mut slots = Vec::new();
    collect_reads(pending, &mut slots);
    let files_read = slots.len() as u64;
    let read_notes = Mutex::new(Vec::new());
    let torn = AtomicU64::new(0);
    slots
        .into_par_iter()
        .try_for_each(|slot| -> Result<(), StoreError> {
            let PendingBody::Read(job) = &*slot else {
                return Ok(());
            };
            let outcome = read_file(writer, job, limits)?;
            if let Some(outcome) = &outcome {
                if let Some(message) = &outcome.note {
                    read_notes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(note(&job.rel, message.clone()));
                }
                if matches!(outcome.body, Body::File { torn: true, .. }) {
                    torn.fetch_add(1, Ordering::Relaxed);
                }
            }
            *slot = PendingBody::Done(outcome);
            Ok(())
        })?;
    let mut read_notes = read_notes.into_inner().unwrap_or_else(|p| p.into_inner());
    read_notes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files_read, torn.into_inner(), read_notes))
}

fn note(path: &[u8], message: String) -> CaptureNote {
    CaptureNote {
        path: path.to_vec(),
        message,
    }
}

/// The replica's exclude globs (see [`kairos_replica::exclude`]).
pub fn build_excludes(replica: &ReplicaDefinition) -> Result<GlobSet, CaptureError> {
    Ok(kairos_replica::exclude::build_excludes(replica)?)
}

pub fn meta_of(metadata: &Metadata) -> Meta {
    Meta {
        mode: metadata.mode(),
        uid: metadata.uid(),
        gid: metadata.gid(),
        size: metadata.size(),
        mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
        ctime_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
        inode: metadata.ino(),
        allocated_bytes: metadata.blocks() * 512,
    }
}

struct Job {
    abs: PathBuf,
    rel: Vec<u8>,
    meta: Meta,
    config: Option<ConfigFormat>,
}

enum PendingBody {
    Ready(Body),
    /// A file to read; replaced by `Done` once read (`None`: it vanished meanwhile).
    Read(Box<Job>),
    Done(Option<FileOutcome>),
    Dir(Vec<Pending>),
}

fn collect_reads<'p>(pending: &'p mut [Pending], out: &mut Vec<&'p mut PendingBody>) {
    for item in pending {
        match &mut item.body {
            PendingBody::Dir(children) => collect_reads(children, out),
            body @ PendingBody::Read(_) => out.push(body),
            _ => {}
        }
    }
}

struct Pending {
    name: Vec<u8>,
    meta: Meta,
    body: PendingBody,
}

enum WalkError {
    Io(String),
    Capture(CaptureError),
}

impl From<StoreError> for WalkError {
    fn from(error: StoreError) -> WalkError {
        WalkError::Capture(error.into())
    }
}

struct Walker<'a, 'r> {
    reader: &'a kairos_store::Reader<'r>,
    excludes: GlobSet,
    skip: Vec<PathBuf>,
    limits: Limits,
    replica: &'a str,
    previous_capture_ns: i64,
    entries: AtomicU64,
    files_reused: AtomicU64,
    directories: AtomicU64,
    notes: Mutex<Vec<CaptureNote>>,
}

impl Walker<'_, '_> {
    /// Walks one directory; its entries (and subdirectories) are examined in parallel.
    fn walk_dir(
        &self,
        abs: &Path,
        rel: &[u8],
        previous: Option<Hash>,
    ) -> Result<Vec<Pending>, WalkError> {
        let read = std::fs::read_dir(abs).map_err(|error| WalkError::Io(error.to_string()))?;
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for item in read {
            match item {
                Ok(item) => names.push(item.file_name()),
                Err(error) => self.note(rel, format!("unreadable directory listing: {error}")),
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let previous_entries = match previous {
            Some(hash) => self.reader.dir_entries(&hash).unwrap_or_default(),
            None => Vec::new(),
        };
        let entries: Vec<Option<Pending>> = names
            .par_iter()
            .map(|name| self.walk_entry(abs, rel, name, &previous_entries))
            .collect::<Result<_, _>>()?;
        Ok(entries.into_iter().flatten().collect())
    }

    fn note(&self, path: &[u8], message: String) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(note(path, message));
    }

    fn walk_entry(
        &self,
        abs: &Path,
        rel: &[u8],
        name: &std::ffi::OsStr,
        previous_entries: &[DirEntry],
    ) -> Result<Option<Pending>, WalkError> {
        let name_bytes = name.as_bytes().to_vec();
        let child_rel = if rel.is_empty() {
            name_bytes.clone()
        } else {
            [rel, b"/", &name_bytes].concat()
        };
        if self
            .excludes
            .is_match(Path::new(OsStr::from_bytes(&child_rel)))
        {
            return Ok(None);
        }
        let child_abs = abs.join(name);
        if self.skip.iter().any(|skip| skip == &child_abs) {
            return Ok(None);
        }
        let metadata = match std::fs::symlink_metadata(&child_abs) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                self.count_entry()?;
                self.note(&child_rel, format!("unreadable: {error}"));
                return Ok(Some(Pending {
                    name: name_bytes,
                    meta: Meta::default(),
                    body: PendingBody::Ready(Body::Unreadable {
                        error: error.to_string(),
                    }),
                }));
            }
        };
        self.count_entry()?;
        let meta = meta_of(&metadata);
        let kind = metadata.file_type();
        let before = previous_entries
            .binary_search_by(|entry| entry.name.as_slice().cmp(&name_bytes))
            .ok()
            .map(|index| &previous_entries[index]);
        let body = if kind.is_dir() {
            self.directories.fetch_add(1, Ordering::Relaxed);
            let previous_dir = match before.map(|entry| &entry.body) {
                Some(Body::Dir { node, .. }) => Some(Hash(*node)),
                _ => None,
            };
            match self.walk_dir(&child_abs, &child_rel, previous_dir) {
                Ok(children) => PendingBody::Dir(children),
                Err(WalkError::Io(reason)) => {
                    self.note(&child_rel, format!("unreadable: {reason}"));
                    PendingBody::Ready(Body::Unreadable { error: reason })
                }
                Err(error) => return Err(error),
            }
        } else if kind.is_file() {
            match before {
                Some(entry) if self.unchanged(entry, &meta) => {
                    self.files_reused.fetch_add(1, Ordering::Relaxed);
                    PendingBody::Ready(entry.body.clone())
                }
                _ => PendingBody::Read(Box::new(Job {
                    config: config::format_for_name(&name_bytes),
                    abs: child_abs,
                    rel: child_rel,
                    meta: meta.clone(),
                })),
            }
        } else if kind.is_symlink() {
            match std::fs::read_link(&child_abs) {
                Ok(target) => PendingBody::Ready(Body::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                }),
                Err(error) => {
                    self.note(&child_rel, format!("unreadable: {error}"));
                    PendingBody::Ready(Body::Unreadable {
                        error: error.to_string(),
                    })
                }
            }
        } else {
            let kind = if kind.is_fifo() {
                SpecialKind::Fifo
            } else if kind.is_socket() {
                SpecialKind::Socket
            } else if kind.is_block_device() {
                SpecialKind::BlockDevice
            } else {
                SpecialKind::CharDevice
            };
            PendingBody::Ready(Body::Special { kind })
        };
        Ok(Some(Pending {
            name: name_bytes,
            meta,
            body,
        }))
    }

    fn count_entry(&self) -> Result<(), WalkError> {
        if self.entries.fetch_add(1, Ordering::Relaxed) >= self.limits.state_entries_max {
            return Err(WalkError::Capture(CaptureError::TooManyEntries {
                replica: self.replica.to_string(),
                max: self.limits.state_entries_max,
            }));
        }
        Ok(())
    }

    /// Whether a file's metadata says its previous capture still holds.
    fn unchanged(&self, before: &DirEntry, now: &Meta) -> bool {
        let reusable = matches!(
            &before.body,
            Body::File { torn: false, content, .. } if !matches!(content, Content::Omitted { .. })
        );
        reusable
            && before.meta.size == now.size
            && before.meta.mtime_ns == now.mtime_ns
            && before.meta.ctime_ns == now.ctime_ns
            && before.meta.inode == now.inode
            && before.meta.mode == now.mode
            && now.mtime_ns.saturating_add(racy_margin_ns(now.mtime_ns)) < self.previous_capture_ns
    }
}

fn racy_margin_ns(mtime_ns: i64) -> i64 {
    if mtime_ns % 1_000_000_000 == 0 {
        RACY_MTIME_MARGIN_COARSE_NS
    } else {
        RACY_MTIME_MARGIN_NS
    }
}

struct FileOutcome {
    meta: Meta,
    body: Body,
    note: Option<String>,
}

fn read_file(
    writer: &ObjectWriter,
    job: &Job,
    limits: &Limits,
) -> Result<Option<FileOutcome>, StoreError> {
    if job.meta.size > limits.file_bytes_max {
        let reason = format!(
            "file of {} bytes exceeds the file size limit of {} bytes",
            job.meta.size, limits.file_bytes_max
        );
        return Ok(Some(FileOutcome {
            meta: job.meta.clone(),
            body: Body::File {
                content: Content::Omitted {
                    reason: reason.clone(),
                },
                config: None,
                torn: false,
            },
            note: Some(format!("content omitted: {reason}")),
        }));
    }
    let mut last: Option<(Meta, Content, Option<Vec<u8>>)> = None;
    for _ in 0..=limits.torn_file_retries {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&job.abs)
        {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Ok(Some(unreadable(job, error.to_string()))),
        };
        let before = match file.metadata() {
            Ok(metadata) if metadata.is_file() => meta_of(&metadata),
            Ok(_) => {
                return Ok(Some(unreadable(
                    job,
                    "changed type while being captured".into(),
                )));
            }
            Err(error) => return Ok(Some(unreadable(job, error.to_string()))),
        };
        let keep_for_config = job
            .config
            .filter(|_| before.size <= limits.config_file_bytes_max);
        let read = match read_content(writer, file, &before, keep_for_config.is_some(), limits) {
            Ok(read) => read,
            Err(ReadError::Store(error)) => return Err(error),
            Err(ReadError::Io(reason)) => return Ok(Some(unreadable(job, reason))),
        };
        let Some((content, bytes, after)) = read else {
            continue;
        };
        let path_now = std::fs::symlink_metadata(&job.abs)
            .ok()
            .map(|m| meta_of(&m));
        let stable = same_version(&before, &after)
            && path_now
                .as_ref()
                .is_some_and(|now| same_version(&after, now));
        if stable {
            let (config, note) = parse_config(writer, job, bytes.as_deref(), limits)?;
            return Ok(Some(FileOutcome {
                meta: after,
                body: Body::File {
                    content,
                    config,
                    torn: false,
                },
                note,
            }));
        }
        last = Some((after, content, bytes));
    }
    match last {
        Some((meta, content, bytes)) => {
            let (config, _) = parse_config(writer, job, bytes.as_deref(), limits)?;
            Ok(Some(FileOutcome {
                meta,
                body: Body::File {
                    content,
                    config,
                    torn: true,
                },
                note: Some(format!(
                    "torn: the file kept changing while read ({} attempts); the last read is stored",
                    limits.torn_file_retries + 1
                )),
            }))
        }
        None => Ok(Some(unreadable(
            job,
            "kept changing size while being read".into(),
        ))),
    }
}

fn same_version(a: &Meta, b: &Meta) -> bool {
    a.size == b.size && a.mtime_ns == b.mtime_ns && a.ctime_ns == b.ctime_ns && a.inode == b.inode
}

fn unreadable(job: &Job, error: String) -> FileOutcome {
    FileOutcome {
        meta: job.meta.clone(),
        note: Some(format!("unreadable: {error}")),
        body: Body::Unreadable { error },
    }
}

enum ReadError {
    Store(StoreError),
    Io(String),
}

type ReadResult = Option<(Content, Option<Vec<u8>>, Meta)>;

/// Files up to this size are read whole and cut into chunks in place; larger ones are
/// read as a stream (each chunk then costs one more copy).
const WHOLE_READ_BYTES_MAX: usize = 32 << 20;
/// Bytes all threads together may hold in whole reads at once (past it, a file is read as
/// a stream): memory stays bounded on hosts with many cores.
const WHOLE_READ_BUDGET_BYTES: usize = 256 << 20;
static WHOLE_READ_IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A share of [`WHOLE_READ_BUDGET_BYTES`], given back when dropped.
struct WholeRead(usize);

impl WholeRead {
    fn reserve(bytes: usize) -> Option<WholeRead> {
        use std::sync::atomic::Ordering;
        WHOLE_READ_IN_USE
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= WHOLE_READ_BUDGET_BYTES).then_some(used + bytes)
            })
            .ok()
            .map(|_| WholeRead(bytes))
    }
}

impl Drop for WholeRead {
    fn drop(&mut self) {
        WHOLE_READ_IN_USE.fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Reads a file's content into objects. `None` means the file grew past what its size
/// announced (read again).
fn read_content(
    writer: &ObjectWriter,
    mut file: File,
    before: &Meta,
    keep_bytes: bool,
    limits: &Limits,
) -> Result<ReadResult, ReadError> {
    let io = |error: std::io::Error| ReadError::Io(error.to_string());
    // Small files are always read whole (a blob is one object); larger ones when the
    // budget allows.
    let size = before.size as usize;
    let whole_read = if size <= BLOB_BYTES_MAX {
        Some((BLOB_BYTES_MAX, None))
    } else if size <= WHOLE_READ_BYTES_MAX {
        WholeRead::reserve(size).map(|reserved| (WHOLE_READ_BYTES_MAX, Some(reserved)))
    } else {
        None
    };
    if let Some((whole, _reserved)) = whole_read {
        let mut bytes = Vec::with_capacity(before.size as usize);
        (&mut file)
            .take(whole as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let after = meta_of(&file.metadata().map_err(io)?);
        if bytes.len() > whole
            || bytes.len() as u64 != after.size
            || bytes.len() as u64 > limits.file_bytes_max
        {
            return Ok(None);
        }
        let content = store_content(writer, &bytes).map_err(ReadError::Store)?;
        return Ok(Some((content, keep_bytes.then_some(bytes), after)));
    }
    let mut chunks = Vec::with_capacity((before.size as usize / CHUNK_BYTES_AVERAGE) + 1);
    let mut kept = keep_bytes.then(Vec::new);
    let mut total = 0u64;
    let chunker = fastcdc::v2020::StreamCDC::new(
        std::io::BufReader::with_capacity(1 << 20, &mut file),
        CHUNK_BYTES_MIN,
        CHUNK_BYTES_AVERAGE,
        CHUNK_BYTES_MAX,
    );
    for chunk in chunker {
        let chunk = chunk.map_err(|error| ReadError::Io(error.to_string()))?;
        total += chunk.length as u64;
        if total > limits.file_bytes_max {
            return Ok(None);
        }
        let hash = writer
            .put(ObjectKind::Chunk, &chunk.data)
            .map_err(ReadError::Store)?;
        if let Some(kept) = kept.as_mut() {
            kept.extend_from_slice(&chunk.data);
        }
        chunks.push(ChunkRef {
            hash: hash.0,
            bytes: chunk.length as u64,
        });
    }
    let after = meta_of(&file.metadata().map_err(io)?);
    if total != after.size {
        return Ok(None);
    }
    let count = chunks.len() as u64;
    let list = tree::write_chunk_list(writer, chunks).map_err(ReadError::Store)?;
    Ok(Some((
        Content::Chunks {
            list: list.0,
            chunks: count,
        },
        kept,
        after,
    )))
}

/// Stores content held in memory: one blob when small, else content-defined chunks (cut
/// where a stream read of the same bytes would cut them) and their list.
fn store_content(writer: &ObjectWriter, bytes: &[u8]) -> Result<Content, StoreError> {
    if bytes.is_empty() {
        return Ok(Content::Empty);
    }
    if bytes.len() <= BLOB_BYTES_MAX {
        return Ok(Content::Blob {
            hash: writer.put(ObjectKind::Blob, bytes)?.0,
        });
    }
    let mut chunks = Vec::with_capacity(bytes.len() / CHUNK_BYTES_AVERAGE + 1);
    for chunk in
        fastcdc::v2020::FastCDC::new(bytes, CHUNK_BYTES_MIN, CHUNK_BYTES_AVERAGE, CHUNK_BYTES_MAX)
    {
        let data = &bytes[chunk.offset..chunk.offset + chunk.length];
        chunks.push(ChunkRef {
            hash: writer.put(ObjectKind::Chunk, data)?.0,
            bytes: chunk.length as u64,
        });
    }
    let count = chunks.len() as u64;
    Ok(Content::Chunks {
        list: tree::write_chunk_list(writer, chunks)?.0,
        chunks: count,
    })
}

fn parse_config(
    writer: &ObjectWriter,
    job: &Job,
    bytes: Option<&[u8]>,
    limits: &Limits,
) -> Result<(Option<[u8; 32]>, Option<String>), StoreError> {
    let (Some(format), Some(bytes)) = (job.config, bytes) else {
        return Ok((None, None));
    };
    match store_config_keys(writer, format, bytes, limits)? {
        Ok(hash) => Ok((Some(hash.0), None)),
        // A `.conf` file that is not key-value (nginx.conf) is simply not parsed.
        Err(_) if format == ConfigFormat::KeyValue => Ok((None, None)),
        Err(error) => Ok((
            None,
            Some(format!("config not parsed: {} {error}", format.name())),
        )),
    }
}

struct Built {
    hash: Hash,
    entries: u64,
    bytes: u64,
    allocated: u64,
    files: u64,
}

fn build_dir(writer: &ObjectWriter, pending: Vec<Pending>) -> Result<Built, StoreError> {
    let mut entries = Vec::with_capacity(pending.len());
    let mut totals = Built {
        hash: Hash::default(),
        entries: 0,
        bytes: 0,
        allocated: 0,
        files: 0,
    };
    for item in pending {
        let (meta, body) = match item.body {
            PendingBody::Ready(body) => (item.meta, body),
            PendingBody::Done(Some(outcome)) => (outcome.meta, outcome.body),
            PendingBody::Done(None) => continue,
            PendingBody::Read(job) => {
                unreachable!("file {:?} was not read", job.abs)
            }
            PendingBody::Dir(children) => {
                let built = build_dir(writer, children)?;
                totals.entries += built.entries;
                totals.bytes += built.bytes;
                totals.allocated += built.allocated;
                totals.files += built.files;
                let body = Body::Dir {
                    node: built.hash.0,
                    entries: built.entries,
                    bytes: built.bytes,
                };
                (item.meta, body)
            }
        };
        totals.entries += 1;
        totals.allocated += meta.allocated_bytes;
        if matches!(body, Body::File { .. }) {
            totals.files += 1;
            totals.bytes += meta.size;
        }
        entries.push(DirEntry {
            name: item.name,
            meta,
            body,
        });
    }
    totals.hash = tree::write_dir(writer, entries)?;
    Ok(totals)
}

/// Stores file content held in memory (a proposal's new content) the way a capture stores
/// a file read from disk: whole or chunked, with its config keys when `name` is a config
/// file. Returns the content and the config node.
pub fn store_file_bytes(
    writer: &ObjectWriter,
    name: &[u8],
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Content, Option<[u8; 32]>), StoreError> {
    let content = store_content(writer, bytes)?;
    let config = match config::format_for_name(name) {
        Some(format) if bytes.len() as u64 <= limits.config_file_bytes_max => {
            store_config_keys(writer, format, bytes, limits)?
                .ok()
                .map(|hash| hash.0)
        }
        _ => None,
    };
    Ok((content, config))
}

/// Parses a config file's keys and stores them as a config node (the outer error is the
/// store's, the inner one the parser's).
fn store_config_keys(
    writer: &ObjectWriter,
    format: ConfigFormat,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Result<Hash, config::ConfigError>, StoreError> {
    match config::parse(format, bytes, limits.config_keys_max) {
        Ok((format, pairs)) => {
            let node = ConfigNode {
                format: format.name().to_string(),
                keys: pairs
                    .into_iter()
                    .map(|(key, value)| ConfigKey { key, value })
                    .collect(),
            };
            let bytes = node::to_bytes(&node);
            if bytes.len() > kairos_store::object::OBJECT_RAW_BYTES_MAX {
                // Too large for one object: the file is stored, its keys are not (a note
                // says why), and the capture goes on.
                return Ok(Err(config::ConfigError::TooLarge(config::PAIRS_BYTES_MAX)));
            }
            Ok(Ok(writer.put(ObjectKind::Config, &bytes)?))
        }
        Err(error) => Ok(Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole reads share one budget: past it a file is read as a stream, and a finished
    /// read gives its share back.
    #[test]
    fn whole_reads_stay_within_their_memory_budget() {
        let all = WholeRead::reserve(WHOLE_READ_BUDGET_BYTES).expect("the budget is free");
        assert!(WholeRead::reserve(1).is_none(), "over the budget");
        drop(all);
        let some = WholeRead::reserve(WHOLE_READ_BYTES_MAX).expect("given back");
        assert!(WholeRead::reserve(WHOLE_READ_BUDGET_BYTES).is_none());
        drop(some);
        assert_eq!(
            WHOLE_READ_IN_USE.load(std::sync::atomic::Ordering::Acquire),
            0
        );
    }

    /// A file read whole is cut where a stream read cuts it, so captures of either kind
    /// share chunks (and a file that crosses the whole-read size keeps its chunks).
    #[test]
    fn whole_reads_and_stream_reads_cut_the_same_chunks() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut bytes = Vec::with_capacity(3 << 20);
        while bytes.len() < 3 << 20 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Runs of repeated bytes as well as noise, as in logs and binaries.
            let run = if state.is_multiple_of(5) {
                (state >> 40) as usize % 3000
            } else {
                1
            };
            bytes.extend(std::iter::repeat_n(state as u8, run));
        }
        let whole: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::new(
            &bytes,
            CHUNK_BYTES_MIN,
            CHUNK_BYTES_AVERAGE,
            CHUNK_BYTES_MAX,
        )
        .map(|chunk| (chunk.offset, chunk.length))
        .collect();
        let streamed: Vec<(usize, usize)> = fastcdc::v2020::StreamCDC::new(
            std::io::BufReader::with_capacity(1 << 20, bytes.as_slice()),
            CHUNK_BYTES_MIN,
            CHUNK_BYTES_AVERAGE,
            CHUNK_BYTES_MAX,
        )
        .map(|chunk| {
            let chunk = chunk.expect("reading memory");
            (chunk.offset as usize, chunk.length)
        })
        .collect();
        assert!(whole.len() > 40, "{} chunks", whole.len());
        assert_eq!(whole, streamed);
    }
}
