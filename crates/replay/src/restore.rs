//! Restore: materialise a frame into a directory (contents, modes, times, symlinks, fifos;
//! owners when run as root). Files are written in parallel, each to a temporary name then
//! renamed, so a reader never sees a half-written file. With `force`, whatever the target
//! holds that the frame does not is removed (except paths matching the excludes).

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{FileTimes, OpenOptions, Permissions};
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as Clock;

use globset::{Glob, GlobSet, GlobSetBuilder};
use kairos_core::Instant;
use kairos_store::Store;
use kairos_store::node::{Body, DirEntry, Meta, SpecialKind};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::sparse::SparseWriter;
use crate::state::{ContentError, ReplayError, StateView, display_path, write_content};

pub struct RestoreOptions<'a> {
    /// Replace the content of a target that is not empty.
    pub force: bool,
    /// Globs (relative to the target) that restore neither writes nor removes.
    pub exclude: Vec<String>,
    /// Called with the bytes written so far.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
    /// Make each written file and its directory durable (fsync) before the restore
    /// returns: for restores into a live replica (rollback, revert).
    pub durable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RestoreReport {
    pub frame: String,
    pub into: String,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub removed: u64,
    /// Entries not restored, with the reason.
    pub skipped: Vec<String>,
    /// Files restored that were torn when captured (they kept changing while read; the
    /// last read is what was restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub torn: Vec<String>,
    pub duration_ms: u64,
}

fn target_error(path: &Path, reason: impl ToString) -> ReplayError {
    ReplayError::Target {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn write_error(path: &Path, reason: impl ToString) -> ReplayError {
    ReplayError::Write {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

pub fn restore(
    store: &Store,
    view: &StateView,
    into: &Path,
    options: &RestoreOptions<'_>,
) -> Result<RestoreReport, ReplayError> {
    let started = Clock::now();
    let mut exclude = options.exclude.clone();
    if let Some(file) = store.local_file() {
        exclude.extend(keep_store_out(into, &file, options.force)?);
    }
    let excludes = build_globs(&exclude).map_err(|reason| target_error(into, reason))?;
    // Into an empty target (and not --force, which keeps the per-file replacement a live
    // root needs), files are created in place: nobody reads a directory that did not hold
    // them, so the temporary name, the rename and the look at what is there are saved.
    let fresh = match std::fs::symlink_metadata(into) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(target_error(into, "exists and is not a directory"));
        }
        Ok(_) => {
            let mut listing = std::fs::read_dir(into).map_err(|e| target_error(into, e))?;
            let empty = listing.next().is_none();
            if !empty && !options.force {
                return Err(target_error(
                    into,
                    "exists and is not empty (use --force to replace its content)",
                ));
            }
            empty && !options.force
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(into).map_err(|e| target_error(into, e))?;
            !options.force
        }
        Err(error) => return Err(target_error(into, error)),
    };
    let reader = store.reader()?;
    let entries = view.entries(&reader)?;
    for (path, _) in &entries {
        check_relative(path).map_err(|reason| {
            target_error(
                into,
                format!("stored path {:?} {reason}", display_path(path)),
            )
        })?;
    }
    let mut report = RestoreReport {
        frame: view.frame.id.to_hex(),
        into: into.display().to_string(),
        ..RestoreReport::default()
    };
    let wanted: HashMap<&[u8], &'static str> = entries
        .iter()
        .map(|(path, entry)| (path.as_slice(), crate::state::kind_name(&entry.body)))
        .collect();
    if options.force {
        report.removed = remove_extra(into, b"", &wanted, &excludes)?;
    }
    let kept = |path: &[u8]| !excludes.is_match(Path::new(OsStr::from_bytes(path)));
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    let is_root = unsafe { libc::geteuid() } == 0;

    // Directories first, in walk order (parents before children). One thread: made in
    // parallel, they were slower to fill on ext4 (measured), the same in the median at best.
    for (path, _) in entries
        .iter()
        .filter(|(p, e)| matches!(e.body, Body::Dir { .. }) && kept(p))
    {
        let target = into.join(OsStr::from_bytes(path));
        if fresh {
            std::fs::create_dir(&target).map_err(|e| write_error(&target, e))?;
        } else {
            ensure_dir(&target)?;
        }
        report.directories += 1;
    }

    let written = AtomicU64::new(0);
    // In walk order: files of one directory are made one after another (sorted by size
    // instead, so that the threads end together, they took longer: the inode tables and
    // directory blocks are filled out of order).
    let files: Vec<&(Vec<u8>, DirEntry)> = entries
        .iter()
        .filter(|(p, e)| matches!(e.body, Body::File { .. }) && kept(p))
        .collect();
    let results: Vec<Result<RestoredFile, ReplayError>> = files
        .par_iter()
        .map(|(path, entry)| {
            restore_file(
                &reader,
                &into.join(OsStr::from_bytes(path)),
                entry,
                FileWrite {
                    is_root,
                    durable: options.durable,
                    fresh,
                },
            )
            .map(|outcome| {
                if let Some(bytes) = outcome.written {
                    let total = written.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    if let Some(progress) = options.progress {
                        progress(total);
                    }
                }
                RestoredFile {
                    skipped: outcome
                        .skipped
                        .map(|reason| format!("{}: {reason}", display_path(path))),
                    torn: matches!(entry.body, Body::File { torn: true, .. })
                        .then(|| display_path(path)),
                }
            })
        })
        .collect();
    for result in results {
        let RestoredFile { skipped, torn } = result?;
        match skipped {
            Some(skipped) => report.skipped.push(skipped),
            None => {
                report.files += 1;
                report.torn.extend(torn);
            }
        }
    }
    report.bytes = written.load(Ordering::Relaxed);

    for (path, entry) in entries.iter().filter(|(p, _)| kept(p)) {
        let target = into.join(OsStr::from_bytes(path));
        match &entry.body {
            Body::Symlink { target: link } => {
                remove_if_present(&target)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(link), &target)
                    .map_err(|e| write_error(&target, e))?;
                if is_root {
                    let _ = std::os::unix::fs::lchown(
                        &target,
                        Some(entry.meta.uid),
                        Some(entry.meta.gid),
                    );
                }
                report.symlinks += 1;
            }
            Body::Special {
                kind: SpecialKind::Fifo,
            } => {
                remove_if_present(&target)?;
                let name = CString::new(target.as_os_str().as_bytes())
                    .map_err(|e| write_error(&target, e))?;
                // SAFETY: the path is a NUL-terminated CString that lives until the call returns.
                if unsafe {
                    libc::mkfifo(name.as_ptr(), (entry.meta.mode & 0o7777) as libc::mode_t)
                } != 0
                {
                    return Err(write_error(&target, std::io::Error::last_os_error()));
                }
            }
            Body::Special { kind } => report.skipped.push(format!(
                "{}: a {} cannot be restored",
                display_path(path),
                match kind {
                    SpecialKind::Socket => "socket",
                    SpecialKind::CharDevice => "character device",
                    SpecialKind::BlockDevice => "block device",
                    SpecialKind::Fifo => "fifo",
                }
            )),
            Body::Unreadable { error } => report.skipped.push(format!(
                "{}: was unreadable when captured: {error}",
                display_path(path)
            )),
            _ => {}
        }
    }

    // Directory modes and times last, deepest first, so that read-only directories and
    // times changed by writing children end up as captured.
    for (path, entry) in entries
        .iter()
        .rev()
        .filter(|(p, e)| matches!(e.body, Body::Dir { .. }) && kept(p))
    {
        apply_meta(&into.join(OsStr::from_bytes(path)), &entry.meta, is_root)?;
    }
    apply_meta(into, &view.root.files_meta, is_root)?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// A restore never writes over the store it reads: a target that is the store's data
/// directory is refused, and so is a target inside it with `force` (which removes what
/// the frame lacks). A target that holds it (a live root with `./.kairos` in it, or a
/// parent directory) gets it excluded: neither written nor removed. Returns the globs to
/// exclude.
fn keep_store_out(into: &Path, store_file: &Path, force: bool) -> Result<Vec<String>, ReplayError> {
    let Some(data) = store_file
        .parent()
        .and_then(|dir| std::fs::canonicalize(dir).ok())
    else {
        return Ok(Vec::new());
    };
    let target = resolved(into);
    if target == data {
        return Err(target_error(
            into,
            format!(
                "is the store's data directory {} (a restore there would overwrite the store it reads)",
                data.display()
            ),
        ));
    }
    if force && target.starts_with(&data) {
        return Err(target_error(
            into,
            format!(
                "is inside the store's data directory {} (--force would remove the store's files)",
                data.display()
            ),
        ));
    }
    let Ok(inside) = data.strip_prefix(&target) else {
        return Ok(Vec::new());
    };
    let Some(relative) = inside.to_str() else {
        return Err(target_error(
            into,
            format!(
                "holds the store's data directory {} under a name that is not UTF-8",
                data.display()
            ),
        ));
    };
    Ok(directory_globs(relative))
}

/// Exclude globs that leave the directory `relative` (to the target) and everything in it
/// out of a restore.
pub fn directory_globs(relative: &str) -> Vec<String> {
    let escaped = globset::escape(relative);
    vec![format!("{escaped}/**"), escaped]
}

/// `path` with symlinks and `..` resolved as far as it exists; the rest appended as is.
fn resolved(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    for ancestor in absolute.ancestors() {
        if let Ok(real) = std::fs::canonicalize(ancestor) {
            let mut out = real;
            for part in absolute
                .strip_prefix(ancestor)
                .unwrap_or(Path::new(""))
                .components()
            {
                match part {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::Normal(name) => out.push(name),
                    _ => {}
                }
            }
            return out;
        }
    }
    absolute
}

fn build_globs(patterns: &[String]) -> Result<GlobSet, String> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        builder.add(Glob::new(pattern).map_err(|e| format!("exclude glob {pattern:?}: {e}"))?);
    }
    builder.build().map_err(|e| e.to_string())
}

fn check_relative(path: &[u8]) -> Result<(), &'static str> {
    if path.is_empty() || path.starts_with(b"/") {
        return Err("is not a relative path");
    }
    if path
        .split(|&b| b == b'/')
        .any(|part| part.is_empty() || part == b"." || part == b"..")
    {
        return Err("has an empty, '.' or '..' component");
    }
    if path.contains(&0) {
        return Err("contains NUL");
    }
    Ok(())
}

/// Removes what the target holds that the frame does not (or holds as another kind).
fn remove_extra(
    into: &Path,
    prefix: &[u8],
    wanted: &HashMap<&[u8], &'static str>,
    excludes: &GlobSet,
) -> Result<u64, ReplayError> {
    let dir = if prefix.is_empty() {
        into.to_path_buf()
    } else {
        into.join(OsStr::from_bytes(prefix))
    };
    let mut removed = 0;
    for item in std::fs::read_dir(&dir).map_err(|e| target_error(&dir, e))? {
        let item = item.map_err(|e| target_error(&dir, e))?;
        let name = item.file_name();
        let path = crate::state::join(prefix, name.as_bytes());
        if excludes.is_match(Path::new(OsStr::from_bytes(&path))) {
            continue;
        }
        let file_type = item
            .file_type()
            .map_err(|e| target_error(&item.path(), e))?;
        let kind = if file_type.is_dir() {
            "dir"
        } else if file_type.is_symlink() {
            "symlink"
        } else if file_type.is_file() {
            "file"
        } else {
            "special"
        };
        match wanted.get(path.as_slice()) {
            Some(&"dir") if kind == "dir" => {
                removed += remove_extra(into, &path, wanted, excludes)?;
            }
            Some(&want) if want == kind || (want == "fifo" && kind == "special") => {}
            _ => {
                let full = item.path();
                if kind == "dir" {
                    std::fs::remove_dir_all(&full).map_err(|e| write_error(&full, e))?;
                } else {
                    std::fs::remove_file(&full).map_err(|e| write_error(&full, e))?;
                }
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn ensure_dir(path: &Path) -> Result<(), ReplayError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => {
            // Writable while restoring; the captured mode is applied at the end.
            let mode = metadata.permissions().mode() | 0o700;
            std::fs::set_permissions(path, Permissions::from_mode(mode))
                .map_err(|e| write_error(path, e))
        }
        Ok(_) => {
            std::fs::remove_file(path).map_err(|e| write_error(path, e))?;
            std::fs::create_dir(path).map_err(|e| write_error(path, e))
        }
        Err(_) => std::fs::create_dir(path).map_err(|e| write_error(path, e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), ReplayError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => {
            std::fs::remove_dir_all(path).map_err(|e| write_error(path, e))
        }
        Ok(_) => std::fs::remove_file(path).map_err(|e| write_error(path, e)),
        Err(_) => Ok(()),
    }
}

/// One file of a restore: why it was skipped, or whether it was torn when captured.
struct RestoredFile {
    skipped: Option<String>,
    torn: Option<String>,
}

struct FileOutcome {
    written: Option<u64>,
    skipped: Option<String>,
}

/// How one file is written.
#[derive(Clone, Copy)]
struct FileWrite {
    is_root: bool,
    /// fsync the file and its directory.
    durable: bool,
    /// The target directory was empty: create the file in place (no temporary name).
    fresh: bool,
}

fn restore_file(
    reader: &kairos_store::Reader<'_>,
    target: &Path,
    entry: &DirEntry,
    how: FileWrite,
) -> Result<FileOutcome, ReplayError> {
    let FileWrite {
        is_root,
        durable,
        fresh,
    } = how;
    let Body::File { content, .. } = &entry.body else {
        return Ok(FileOutcome {
            written: None,
            skipped: Some("not a file".into()),
        });
    };
    if fresh {
        return create_file(reader, target, entry, content, how);
    }
    // The quick check rsync makes: a regular file with the captured size and modification
    // time is that version; only its mode and owner are put right. A rollback of a config
    // change rewrites that file, not every file of the replica.
    if let Ok(existing) = std::fs::symlink_metadata(target) {
        use std::os::unix::fs::MetadataExt;
        let mtime_ns = existing.mtime() * 1_000_000_000 + existing.mtime_nsec();
        if existing.is_file()
            && existing.len() == entry.meta.size
            && mtime_ns == entry.meta.mtime_ns
        {
            if existing.mode() & 0o7777 != entry.meta.mode & 0o7777 {
                std::fs::set_permissions(target, Permissions::from_mode(entry.meta.mode & 0o7777))
                    .map_err(|e| write_error(target, e))?;
            }
            if is_root && (existing.uid() != entry.meta.uid || existing.gid() != entry.meta.gid) {
                let _ =
                    std::os::unix::fs::lchown(target, Some(entry.meta.uid), Some(entry.meta.gid));
            }
            return Ok(FileOutcome {
                written: Some(0),
                skipped: None,
            });
        }
    }
    let name = target
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let temporary: PathBuf = target.with_file_name(OsStr::from_bytes(
        &[
            b".",
            name.as_slice(),
            format!(".kairos-restore-{}", std::process::id()).as_bytes(),
        ]
        .concat(),
    ));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| write_error(&temporary, e))?;
    // A file captured sparse (fewer bytes allocated than its length) is restored sparse.
    let sparse = entry.meta.allocated_bytes < entry.meta.size;
    let mut out = BufWriter::with_capacity(256 << 10, SparseWriter::new(file, sparse));
    let written = match write_content(reader, content, &mut out) {
        Ok(written) => written,
        Err(error) => {
            drop(out);
            let _ = std::fs::remove_file(&temporary);
            return match error {
                ContentError::Omitted(reason) => Ok(FileOutcome {
                    written: None,
                    skipped: Some(format!("content was not captured: {reason}")),
                }),
                ContentError::Replay(error) => Err(error),
                ContentError::Io(reason) => Err(write_error(target, reason)),
            };
        }
    };
    let file = out
        .into_inner()
        .map_err(|e| write_error(target, e.error()))?
        .finish()
        .map_err(|e| write_error(target, e))?;
    file.set_permissions(Permissions::from_mode(entry.meta.mode & 0o7777))
        .map_err(|e| write_error(target, e))?;
    if is_root {
        let _ = std::os::unix::fs::fchown(&file, Some(entry.meta.uid), Some(entry.meta.gid));
    }
    file.set_times(FileTimes::new().set_modified(Instant(entry.meta.mtime_ns).to_system_time()))
        .map_err(|e| write_error(target, e))?;
    if durable {
        file.sync_all().map_err(|e| write_error(target, e))?;
    }
    drop(file);
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(target).map_err(|e| write_error(target, e))?;
    }
    std::fs::rename(&temporary, target).map_err(|e| write_error(target, e))?;
    if let Some(parent) = target.parent().filter(|_| durable) {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| write_error(parent, e))?;
    }
    Ok(FileOutcome {
        written: Some(written),
        skipped: None,
    })
}

/// Writes a file of a restore into an empty target: created in place, never over
/// anything (`O_EXCL`, `O_NOFOLLOW`), removed again if writing it fails.
fn create_file(
    reader: &kairos_store::Reader<'_>,
    target: &Path,
    entry: &DirEntry,
    content: &kairos_store::node::Content,
    how: FileWrite,
) -> Result<FileOutcome, ReplayError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(target)
        .map_err(|e| write_error(target, e))?;
    let sparse = entry.meta.allocated_bytes < entry.meta.size;
    let finish = |mut file: std::fs::File| -> Result<u64, ContentError> {
        let io = |e: std::io::Error| ContentError::Io(e.to_string());
        let written;
        if sparse {
            let mut out = BufWriter::with_capacity(256 << 10, SparseWriter::new(file, sparse));
            written = write_content(reader, content, &mut out)?;
            file = out
                .into_inner()
                .map_err(|e| io(e.into_error()))?
                .finish()
                .map_err(io)?;
        } else {
            // Each object is one write, straight from the stored value.
            written = write_content(reader, content, &mut file)?;
        }
        file.set_permissions(Permissions::from_mode(entry.meta.mode & 0o7777))
            .map_err(io)?;
        if how.is_root {
            let _ = std::os::unix::fs::fchown(&file, Some(entry.meta.uid), Some(entry.meta.gid));
        }
        file.set_times(
            FileTimes::new().set_modified(Instant(entry.meta.mtime_ns).to_system_time()),
        )
        .map_err(io)?;
        if how.durable {
            file.sync_all().map_err(io)?;
        }
        Ok(written)
    };
    match finish(file) {
        Ok(written) => {
            if let Some(parent) = target.parent().filter(|_| how.durable) {
                std::fs::File::open(parent)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|e| write_error(parent, e))?;
            }
            Ok(FileOutcome {
                written: Some(written),
                skipped: None,
            })
        }
        Err(error) => {
            let _ = std::fs::remove_file(target);
            match error {
                ContentError::Omitted(reason) => Ok(FileOutcome {
                    written: None,
                    skipped: Some(format!("content was not captured: {reason}")),
                }),
                ContentError::Replay(error) => Err(error),
                ContentError::Io(reason) => Err(write_error(target, reason)),
            }
        }
    }
}

fn apply_meta(path: &Path, meta: &Meta, is_root: bool) -> Result<(), ReplayError> {
    if is_root {
        let _ = std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid));
    }
    let dir = std::fs::File::open(path).map_err(|e| write_error(path, e))?;
    dir.set_times(FileTimes::new().set_modified(Instant(meta.mtime_ns).to_system_time()))
        .map_err(|e| write_error(path, e))?;
    if meta.mode != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(meta.mode & 0o7777))
            .map_err(|e| write_error(path, e))?;
    }
    Ok(())
}
