//! Applying ops to a copy of a state. The copy is structural: only the directory nodes on
//! the path of each changed entry are rewritten, everything else is shared with the base.
//! Every op is validated against the state as the ops before it left it; an error names
//! the op.

use globset::GlobSet;
use kairos_capture::config::format_for_name;
use kairos_core::{Hash, Instant, Limits, ReplicaDefinition};
use kairos_replay::{ContentError, write_content};
use kairos_store::node::{self, Body, DirEntry, Meta, RootNode};
use kairos_store::tree::{edit_dir, write_dir};
use kairos_store::{ObjectKind, ObjectWriter, Reader, Store};
use serde::{Deserialize, Serialize};

use crate::SandboxError;
use crate::config_edit::edit_key;
use crate::proposal::{Op, path_components};

/// What an op does to one path of the live root when committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    /// Index of the op in the proposal (1-based).
    pub op: usize,
    pub path: String,
    /// `write` or `delete`.
    pub change: String,
}

/// The result of applying ops: a new state root sharing all it can with the base. Its new
/// nodes are in memory until [`Applied::persist`] stores them (a validation drops them).
pub struct Applied {
    pub root: Hash,
    pub root_node: RootNode,
    pub touched: Vec<Touched>,
    /// Declared actions to run, in op order.
    pub actions: Vec<String>,
    writer: ObjectWriter,
}

impl Applied {
    /// Stores the sandbox state's new objects (not yet durably: the next durable batch,
    /// such as a frame's, makes them durable), so that any reader can read the state.
    pub fn persist(&self) -> Result<kairos_store::WriteStats, SandboxError> {
        Ok(self.writer.finish()?)
    }
}

struct Tree {
    files: Hash,
    entries: u64,
    bytes: u64,
}

fn op_error(index: usize, op: &Op, problem: impl ToString) -> SandboxError {
    SandboxError::Op {
        index,
        op: op.describe(),
        problem: problem.to_string(),
    }
}

/// Entries and bytes an entry accounts for (itself and what is below it).
fn weight(entry: Option<&DirEntry>) -> (i64, i64) {
    match entry {
        None => (0, 0),
        Some(entry) => match &entry.body {
            Body::Dir { entries, bytes, .. } => (1 + *entries as i64, *bytes as i64),
            Body::File { .. } => (1, entry.meta.size as i64),
            _ => (1, 0),
        },
    }
}

/// A directory node and a name in it.
type LookupKey = (Hash, Vec<u8>);

struct Editor<'a, 'r> {
    reader: &'a Reader<'r>,
    /// Entries already looked up, by (directory node, name): nodes are content-addressed,
    /// so an answer never goes stale, and an op's walk down and its rewrite up share it.
    lookups: std::cell::RefCell<std::collections::HashMap<LookupKey, Option<DirEntry>>>,
    writer: &'a ObjectWriter,
    limits: &'a Limits,
    now: Instant,
    owner: (u32, u32),
}

impl Editor<'_, '_> {
    fn lookup(&self, dir: &Hash, name: &[u8]) -> Result<Option<DirEntry>, String> {
        let key = (*dir, name.to_vec());
        if let Some(found) = self.lookups.borrow().get(&key) {
            return Ok(found.clone());
        }
        let found = self
            .reader
            .dir_lookup(dir, name)
            .map_err(|e| e.to_string())?;
        self.lookups.borrow_mut().insert(key, found.clone());
        Ok(found)
    }

    /// The entry at `path`; every component before the last must be a real directory.
    fn get(&self, tree: &Tree, path: &[Vec<u8>]) -> Result<Option<DirEntry>, String> {
        let mut dir = tree.files;
        for (depth, component) in path.iter().enumerate() {
            let entry = self.lookup(&dir, component)?;
            let last = depth + 1 == path.len();
            match entry {
                None => return Ok(None),
                Some(entry) if last => return Ok(Some(entry)),
                Some(entry) => match entry.body {
                    Body::Dir { node, .. } => dir = Hash(node),
                    Body::Symlink { .. } => {
                        return Err(format!(
                            "goes through the symlink {:?} (proposals never write through symlinks)",
                            join(&path[..=depth])
                        ));
                    }
                    _ => {
                        return Err(format!("{:?} is not a directory", join(&path[..=depth])));
                    }
                },
            }
        }
        Ok(None)
    }

    fn set(
        &self,
        tree: &mut Tree,
        path: &[Vec<u8>],
        entry: Option<DirEntry>,
    ) -> Result<(), String> {
        let (files, entries, bytes) = self.set_in(&tree.files, path, entry)?;
        tree.files = files;
        tree.entries = (tree.entries as i64 + entries).max(0) as u64;
        tree.bytes = (tree.bytes as i64 + bytes).max(0) as u64;
        Ok(())
    }

    fn set_in(
        &self,
        dir: &Hash,
        path: &[Vec<u8>],
        entry: Option<DirEntry>,
    ) -> Result<(Hash, i64, i64), String> {
        let name = &path[0];
        let old = self.lookup(dir, name)?;
        if path.len() == 1 {
            let (old_entries, old_bytes) = weight(old.as_ref());
            let (new_entries, new_bytes) = weight(entry.as_ref());
            let hash =
                edit_dir(self.reader, self.writer, dir, name, entry).map_err(|e| e.to_string())?;
            return Ok((hash, new_entries - old_entries, new_bytes - old_bytes));
        }
        let (mut child, created) = match old {
            Some(child) if matches!(child.body, Body::Dir { .. }) => (child, false),
            Some(_) => {
                return Err(format!(
                    "{:?} is not a directory",
                    String::from_utf8_lossy(name)
                ));
            }
            None if entry.is_none() => return Ok((*dir, 0, 0)),
            None => {
                let empty = write_dir(self.writer, Vec::new()).map_err(|e| e.to_string())?;
                (
                    DirEntry {
                        name: name.clone(),
                        meta: Meta {
                            mode: libc::S_IFDIR | 0o755,
                            uid: self.owner.0,
                            gid: self.owner.1,
                            mtime_ns: self.now.0,
                            ctime_ns: self.now.0,
                            ..Meta::default()
                        },
                        body: Body::Dir {
                            node: empty.0,
                            entries: 0,
                            bytes: 0,
                        },
                    },
                    true,
                )
            }
        };
        let Body::Dir {
            node,
            entries,
            bytes,
        } = child.body
        else {
            return Err("not a directory".into());
        };
        let (new_node, delta_entries, delta_bytes) = self.set_in(&Hash(node), &path[1..], entry)?;
        child.body = Body::Dir {
            node: new_node.0,
            entries: (entries as i64 + delta_entries).max(0) as u64,
            bytes: (bytes as i64 + delta_bytes).max(0) as u64,
        };
        let hash = edit_dir(self.reader, self.writer, dir, name, Some(child))
            .map_err(|e| e.to_string())?;
        Ok((hash, delta_entries + i64::from(created), delta_bytes))
    }

    fn read_file(&self, entry: &DirEntry) -> Result<Vec<u8>, String> {
        let Body::File { content, .. } = &entry.body else {
            return Err("is not a regular file".into());
        };
        let mut bytes = Vec::new();
        write_content(self.reader, content, &mut bytes).map_err(|error| match error {
            ContentError::Omitted(reason) => format!("its content was not captured: {reason}"),
            ContentError::Replay(error) => error.to_string(),
            ContentError::Io(reason) => reason,
        })?;
        Ok(bytes)
    }

    /// The text of an existing file the op edits.
    fn read_text(&self, existing: Option<&DirEntry>, relative: &str) -> Result<String, String> {
        let existing =
            existing.ok_or_else(|| format!("{relative:?} does not exist in the base"))?;
        String::from_utf8(self.read_file(existing)?)
            .map_err(|_| "the file is not UTF-8 text".to_string())
    }

    fn file_entry(
        &self,
        name: &[u8],
        old: Option<&DirEntry>,
        bytes: &[u8],
        mode: Option<u32>,
    ) -> Result<DirEntry, String> {
        let (content, config) =
            kairos_capture::capture::store_file_bytes(self.writer, name, bytes, self.limits)
                .map_err(|e| e.to_string())?;
        let meta = match old {
            Some(old) if matches!(old.body, Body::File { .. }) => Meta {
                size: bytes.len() as u64,
                mtime_ns: self.now.0,
                ctime_ns: self.now.0,
                allocated_bytes: (bytes.len() as u64).div_ceil(4096) * 4096,
                ..old.meta.clone()
            },
            _ => Meta {
                mode: libc::S_IFREG | (mode.unwrap_or(0o644) & 0o7777),
                uid: self.owner.0,
                gid: self.owner.1,
                size: bytes.len() as u64,
                mtime_ns: self.now.0,
                ctime_ns: self.now.0,
                inode: 0,
                allocated_bytes: (bytes.len() as u64).div_ceil(4096) * 4096,
            },
        };
        Ok(DirEntry {
            name: name.to_vec(),
            meta,
            body: Body::File {
                content,
                config,
                torn: false,
            },
        })
    }
}

fn join(components: &[Vec<u8>]) -> String {
    components
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Applies `ops` (with their 1-based indexes in the proposal) to the state `base_root`.
pub fn apply_ops(
    store: &Store,
    replica: &ReplicaDefinition,
    base_root: &RootNode,
    ops: &[(usize, Op)],
    limits: &Limits,
    now: Instant,
) -> Result<Applied, SandboxError> {
    let excludes: GlobSet = kairos_capture::capture::build_excludes(replica)
        .map_err(|e| SandboxError::Invalid(e.to_string()))?;
    let writer = store.object_writer(&replica.name)?;
    let overlay = writer.defer_writes();
    let reader = store.reader()?.with_overlay(overlay);
    let editor = Editor {
        reader: &reader,
        lookups: Default::default(),
        writer: &writer,
        limits,
        now,
        owner: (base_root.files_meta.uid, base_root.files_meta.gid),
    };
    let mut tree = Tree {
        files: Hash(base_root.files),
        entries: base_root.file_entries,
        bytes: base_root.file_bytes,
    };
    let mut touched = Vec::new();
    let mut actions = Vec::new();
    let mut content_bytes_total = 0u64;
    for (index, op) in ops {
        let index = *index;
        let fail = |problem: String| op_error(index, op, problem);
        if let Op::Action { name } = op {
            check_action(replica, name).map_err(&fail)?;
            actions.push(name.clone());
            continue;
        }
        let path_text = op.path().unwrap_or_default();
        let path = path_components(path_text).map_err(&fail)?;
        let relative = join(&path);
        if excludes.is_match(&relative) {
            return Err(fail(format!(
                "path {relative:?} is excluded from captures of replica {:?}",
                replica.name
            )));
        }
        let existing = editor.get(&tree, &path).map_err(&fail)?;
        let name = path.last().cloned().unwrap_or_default();
        // The new content of the path (with the mode for a new file), or None to delete it.
        let new_content = new_content(
            &editor,
            (index, op),
            existing.as_ref(),
            (&relative, &name),
            &mut content_bytes_total,
        )?;
        let change = match new_content {
            Some((bytes, mode)) => {
                let entry = editor
                    .file_entry(&name, existing.as_ref(), &bytes, mode)
                    .map_err(&fail)?;
                editor.set(&mut tree, &path, Some(entry)).map_err(&fail)?;
                "write"
            }
            None => {
                editor.set(&mut tree, &path, None).map_err(&fail)?;
                "delete"
            }
        };
        touched.push(Touched {
            op: index,
            path: relative,
            change: change.to_string(),
        });
    }
    if tree.entries > limits.state_entries_max {
        return Err(SandboxError::Invalid(format!(
            "the sandbox state would have {} entries, over the limit of {}",
            tree.entries, limits.state_entries_max
        )));
    }
    let root_node = RootNode {
        files: tree.files.0,
        file_entries: tree.entries,
        file_bytes: tree.bytes,
        notes: Vec::new(),
        ..base_root.clone()
    };
    let root = writer.put(ObjectKind::Root, &node::to_bytes(&root_node))?;
    Ok(Applied {
        root,
        root_node,
        touched,
        actions,
        writer,
    })
}

/// Checks that a proposal's action is one the replica declares.
fn check_action(replica: &ReplicaDefinition, name: &str) -> Result<(), String> {
    if replica.actions.contains_key(name) {
        return Ok(());
    }
    let declared: Vec<&str> = replica.actions.keys().map(String::as_str).collect();
    Err(format!(
        "unknown action {name:?} (replica {:?} declares: {})",
        replica.name,
        if declared.is_empty() {
            "none".to_string()
        } else {
            declared.join(", ")
        }
    ))
}

/// A file's new bytes, and the mode a new file gets (`None`: the default, or kept).
type NewContent = (Vec<u8>, Option<u32>);

/// The new content an op gives its path (with the mode for a new file), or `None` when
/// it deletes it; checked against what is there and the limits.
fn new_content(
    editor: &Editor<'_, '_>,
    (index, op): (usize, &Op),
    existing: Option<&DirEntry>,
    (relative, name): (&str, &[u8]),
    content_bytes_total: &mut u64,
) -> Result<Option<NewContent>, SandboxError> {
    let fail = |problem: String| op_error(index, op, problem);
    let limits = editor.limits;
    let content = match op {
        Op::PutFile { mode, .. } => {
            let bytes = op.put_content().map_err(&fail)?;
            *content_bytes_total += bytes.len() as u64;
            if bytes.len() as u64 > limits.file_bytes_max
                || *content_bytes_total > limits.proposal_bytes_max
            {
                return Err(fail(format!(
                    "content of {} bytes is over the limit ({} bytes per file, {} per proposal)",
                    bytes.len(),
                    limits.file_bytes_max,
                    limits.proposal_bytes_max
                )));
            }
            if existing
                .as_ref()
                .is_some_and(|e| !matches!(e.body, Body::File { .. } | Body::Symlink { .. }))
            {
                return Err(fail(format!(
                    "{relative:?} exists and is not a regular file"
                )));
            }
            Some((bytes, *mode))
        }
        Op::PatchFile { unified_diff, .. } => {
            let text = editor.read_text(existing, relative).map_err(&fail)?;
            let patch = diffy::Patch::from_str(unified_diff)
                .map_err(|error| fail(format!("unified_diff is not a unified diff: {error}")))?;
            let after = diffy::apply(&text, &patch)
                .map_err(|error| fail(format!("the diff does not apply to the base: {error}")))?;
            Some((after.into_bytes(), None))
        }
        Op::Delete { .. } => {
            if existing.is_none() {
                return Err(fail(format!("{relative:?} does not exist in the base")));
            }
            None
        }
        Op::SetConfig { .. } | Op::UnsetConfig { .. } => {
            let (key, value) = match op {
                Op::SetConfig { key, value, .. } => (key, Some(value)),
                Op::UnsetConfig { key, .. } => (key, None),
                _ => unreachable!("matched above"),
            };
            let text = editor.read_text(existing, relative).map_err(&fail)?;
            let format = format_for_name(name).ok_or_else(|| {
                fail(format!(
                    "{relative:?} is not a config file of a format Kairos edits by key (toml, yaml, json, ini, .env, key-value .conf)"
                ))
            })?;
            // Sections in a .conf make it INI, as capture decides.
            let (format, _) =
                kairos_capture::config::parse(format, text.as_bytes(), limits.config_keys_max)
                    .map_err(|error| fail(format!("{relative:?} {error}")))?;
            let after = edit_key(format, &text, key, value).map_err(&fail)?;
            kairos_capture::config::parse(format, after.as_bytes(), limits.config_keys_max)
                .map_err(|error| {
                    fail(format!(
                        "the edit would leave {relative:?} unparseable: {error}"
                    ))
                })?;
            Some((after.into_bytes(), None))
        }
        Op::Action { .. } => unreachable!("handled above"),
    };
    Ok(content)
}
