//! Writing a sandbox's changes into the live root: each file is written beside its target,
//! fsynced and renamed over it (atomic per file), then the directory is fsynced. Nothing
//! is ever written through a symlink or outside the root.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kairos_core::{Hash, Limits};
use kairos_replay::{ContentError, StateView, write_content};
use kairos_sandbox::Touched;
use kairos_store::Store;
use kairos_store::node::Body;

use crate::CommitError;

fn live_error(path: &Path, reason: impl ToString) -> CommitError {
    CommitError::Live {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Makes sure every directory between `root` and `relative`'s parent is a real directory
/// (creating missing ones), never a symlink. Returns the parent's path.
fn parent_dir(root: &Path, relative: &str) -> Result<PathBuf, CommitError> {
    let mut current = root.to_path_buf();
    let components: Vec<&str> = relative.split('/').filter(|c| !c.is_empty()).collect();
    for component in &components[..components.len().saturating_sub(1)] {
        if *component == ".." || *component == "." {
            return Err(live_error(&current, "path component escapes the root"));
        }
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(metadata) if metadata.file_type().is_symlink() => {
                return Err(live_error(
                    &current,
                    "is a symlink on the live replica; a commit never writes through symlinks",
                ));
            }
            Ok(_) => {
                return Err(live_error(
                    &current,
                    "is not a directory on the live replica",
                ));
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&current).map_err(|e| live_error(&current, e))?;
            }
            Err(error) => return Err(live_error(&current, error)),
        }
    }
    Ok(current)
}

fn fsync_dir(dir: &Path) -> Result<(), CommitError> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(|e| live_error(dir, e))
}

/// Writes the `touched` paths of the sandbox state `view` into the live `root`.
pub fn write_live(
    store: &Store,
    view: &StateView,
    root: &Path,
    touched: &[Touched],
    limits: &Limits,
    commit: &Hash,
) -> Result<(), CommitError> {
    let reader = store.reader()?;
    for change in touched {
        let parent = parent_dir(root, &change.path)?;
        let name = change.path.rsplit('/').next().unwrap_or(&change.path);
        let target = parent.join(name);
        if change.change == "delete" {
            match std::fs::symlink_metadata(&target) {
                Ok(metadata) if metadata.is_dir() => {
                    std::fs::remove_dir_all(&target).map_err(|e| live_error(&target, e))?;
                }
                Ok(_) => std::fs::remove_file(&target).map_err(|e| live_error(&target, e))?,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(live_error(&target, error)),
            }
            fsync_dir(&parent)?;
            continue;
        }
        let entry = view
            .lookup(&reader, change.path.as_bytes(), limits)
            .map_err(|e| live_error(&target, e))?;
        let Body::File { content, .. } = &entry.body else {
            return Err(live_error(
                &target,
                "the sandbox entry is not a regular file",
            ));
        };
        let temporary = parent.join(OsStr::from_bytes(
            format!(".{name}.kairos-{}", &commit.to_hex()[..12]).as_bytes(),
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(entry.meta.mode & 0o7777)
            .open(&temporary)
            .map_err(|e| live_error(&temporary, e))?;
        write_content(&reader, content, &mut file).map_err(|error| match error {
            ContentError::Replay(error) => live_error(&target, error),
            ContentError::Omitted(reason) => live_error(&target, reason),
            ContentError::Io(reason) => live_error(&temporary, reason),
        })?;
        file.flush().map_err(|e| live_error(&temporary, e))?;
        std::fs::set_permissions(
            &temporary,
            std::fs::Permissions::from_mode(entry.meta.mode & 0o7777),
        )
        .map_err(|e| live_error(&temporary, e))?;
        // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::fchown;
            let _ = fchown(&file, Some(entry.meta.uid), Some(entry.meta.gid));
        }
        file.sync_all().map_err(|e| live_error(&temporary, e))?;
        drop(file);
        std::fs::rename(&temporary, &target).map_err(|e| live_error(&target, e))?;
        fsync_dir(&parent)?;
    }
    Ok(())
}
