//! Building proposals on the CLI side: `from: LOCAL_FILE` read into `content_base64`, and
//! `--from-dir DIR`, whose ops are the difference between the base state and DIR.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use kairos_sandbox::{Op, ProposalDocument};

use crate::backend::Backend;

/// Files read for a proposal are at most this large (the proposal limit bounds them too).
const LOCAL_FILE_BYTES_MAX: u64 = 64 << 20;

fn read_local(path: &Path) -> Result<Vec<u8>> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if metadata.len() > LOCAL_FILE_BYTES_MAX {
        bail!(
            "{} is {} bytes, over the {} bytes a proposal may carry",
            path.display(),
            metadata.len(),
            LOCAL_FILE_BYTES_MAX
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Replaces each `put_file`'s `from` (relative to `base_dir`) with the file's content.
pub fn read_from_files(document: &mut ProposalDocument, base_dir: &Path) -> Result<()> {
    for (index, op) in document.ops.iter_mut().enumerate() {
        if let Op::PutFile {
            from: from @ Some(_),
            content_base64,
            content,
            ..
        } = op
        {
            if content.is_some() || content_base64.is_some() {
                bail!(
                    "op {}: give exactly one of content, content_base64 and from",
                    index + 1
                );
            }
            let local = base_dir.join(from.as_deref().unwrap_or_default());
            let bytes = read_local(&local).with_context(|| format!("op {} (from)", index + 1))?;
            *content_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            *from = None;
        }
    }
    Ok(())
}

/// The ops that turn the base state into `dir`: put_file for new or changed files,
/// delete for entries `dir` lacks. Excluded paths are ignored.
pub fn document_from_dir(
    backend: &Backend,
    name: &str,
    dir: &Path,
    timeline: Option<&str>,
    title: Option<String>,
    party: &str,
) -> Result<ProposalDocument> {
    let replica = backend
        .replicas()?
        .into_iter()
        .find(|replica| replica.name == name)
        .ok_or_else(|| anyhow::anyhow!("unknown replica {name:?} (see `kairos replica list`)"))?;
    let excludes = kairos_capture::capture::build_excludes(&replica)?;
    let timeline = timeline.unwrap_or(kairos_core::spec::MAIN_TIMELINE);
    let listing = backend.state(name, &format!("{timeline}@latest"))?;
    let base_spec = format!("{timeline}@{}", listing.frame.id.to_hex());
    let base: BTreeMap<String, (String, u64)> = listing
        .entries
        .iter()
        .map(|entry| (entry.path.clone(), (entry.kind.clone(), entry.size)))
        .collect();
    let mut local: BTreeMap<String, std::fs::Metadata> = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in
            std::fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", current.display()))?;
            let path = entry.path();
            let relative = path.strip_prefix(dir).unwrap_or(&path);
            let Ok(relative_text) = std::str::from_utf8(relative.as_os_str().as_bytes()) else {
                bail!(
                    "{} is not a UTF-8 path; proposals name UTF-8 paths",
                    path.display()
                );
            };
            if excludes.is_match(relative) {
                continue;
            }
            let metadata = entry
                .metadata()
                .with_context(|| format!("reading {}", path.display()))?;
            if metadata.is_dir() {
                pending.push(path.clone());
            }
            local.insert(relative_text.to_string(), metadata);
        }
    }
    let mut ops = Vec::new();
    for (path, metadata) in &local {
        let existing = base.get(path);
        if metadata.is_dir() {
            if existing.is_some_and(|(kind, _)| kind != "dir") {
                bail!(
                    "{path:?} is a directory in {} but not in the base; delete it in a separate proposal first",
                    dir.display()
                );
            }
            continue;
        }
        if metadata.file_type().is_symlink() {
            if existing.is_none_or(|(kind, _)| kind != "symlink") {
                bail!("{path:?} is a new or changed symlink; proposals write regular files only");
            }
            continue;
        }
        if !metadata.is_file() {
            bail!("{path:?} is not a regular file; proposals write regular files only");
        }
        let bytes = read_local(&dir.join(path))?;
        let changed = match existing {
            None => true,
            Some((kind, _)) if kind != "file" => bail!(
                "{path:?} is a {kind} in the base and a file in {}",
                dir.display()
            ),
            Some((_, size)) if *size != bytes.len() as u64 => true,
            Some(_) => {
                let mut before = Vec::new();
                backend.cat(name, Path::new(path), &base_spec, &mut before)?;
                before != bytes
            }
        };
        if changed {
            use std::os::unix::fs::PermissionsExt;
            ops.push(Op::PutFile {
                path: path.clone(),
                content: None,
                content_base64: Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
                from: None,
                mode: existing
                    .is_none()
                    .then_some(metadata.permissions().mode() & 0o7777),
            });
        }
    }
    let mut deleted: Vec<&String> = Vec::new();
    for path in base.keys() {
        if local.contains_key(path) || deleted.iter().any(|d| path.starts_with(&format!("{d}/"))) {
            continue;
        }
        if excludes.is_match(Path::new(path)) {
            continue;
        }
        deleted.push(path);
        ops.push(Op::Delete { path: path.clone() });
    }
    if ops.is_empty() {
        bail!(
            "{} does not differ from {base_spec}: nothing to propose",
            dir.display()
        );
    }
    Ok(ProposalDocument {
        title: title.unwrap_or_else(|| format!("changes from {}", dir.display())),
        author: party.to_string(),
        description: None,
        base: Some(base_spec),
        ops,
    })
}
