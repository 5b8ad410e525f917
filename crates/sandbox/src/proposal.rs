//! Proposals: a party's ordered ops against a base frame on a timeline, parsed from JSON
//! or TOML, stored content-addressed (the id is the hash of the stored proposal).

use base64::Engine;
use kairos_core::{Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::SandboxError;

/// One change a proposal makes. Paths are relative to the replica root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Creates or replaces a file (missing parent directories are created).
    PutFile {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_base64: Option<String>,
        /// A local file the CLI reads into `content_base64` before sending.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// Permission bits for a new file (e.g. 0o644 = 420); an existing file keeps its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Applies a unified diff to an existing text file.
    PatchFile { path: String, unified_diff: String },
    /// Removes a file, link or directory (recursively).
    Delete { path: String },
    /// Sets one key of a config file, keeping the file's formatting and comments.
    SetConfig {
        file: String,
        key: String,
        value: serde_json::Value,
    },
    /// Removes one key of a config file.
    UnsetConfig { file: String, key: String },
    /// Runs one of the replica's declared actions after the files are written.
    Action { name: String },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::PutFile { .. } => "put_file",
            Op::PatchFile { .. } => "patch_file",
            Op::Delete { .. } => "delete",
            Op::SetConfig { .. } => "set_config",
            Op::UnsetConfig { .. } => "unset_config",
            Op::Action { .. } => "action",
        }
    }

    /// The path the op changes, if it changes one.
    pub fn path(&self) -> Option<&str> {
        match self {
            Op::PutFile { path, .. } | Op::PatchFile { path, .. } | Op::Delete { path } => {
                Some(path)
            }
            Op::SetConfig { file, .. } | Op::UnsetConfig { file, .. } => Some(file),
            Op::Action { .. } => None,
        }
    }

    /// `put_file "etc/app.toml"`: how errors and the audit log name the op.
    pub fn describe(&self) -> String {
        match self {
            Op::SetConfig { file, key, .. } | Op::UnsetConfig { file, key } => {
                format!("{} {file:?} key {key:?}", self.kind())
            }
            Op::Action { name } => format!("action {name:?}"),
            other => format!("{} {:?}", other.kind(), other.path().unwrap_or_default()),
        }
    }

    /// The new content of a `put_file`, decoded.
    pub fn put_content(&self) -> Result<Vec<u8>, String> {
        let Op::PutFile {
            content,
            content_base64,
            from,
            ..
        } = self
        else {
            return Err("not a put_file".into());
        };
        match (content, content_base64, from) {
            (Some(text), None, None) => Ok(text.as_bytes().to_vec()),
            (None, Some(encoded), None) => base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|error| format!("content_base64 is not base64: {error}")),
            (None, None, Some(_)) => Err(
                "`from` names a local file, which only the CLI reads (send content or content_base64)"
                    .into(),
            ),
            (None, None, None) => Err("needs content or content_base64".into()),
            _ => Err("give exactly one of content, content_base64 and from".into()),
        }
    }
}

/// A proposal as a party writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposalDocument {
    pub title: String,
    /// The party proposing; when absent, the party that submits the document.
    #[serde(default)]
    pub author: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `TIMELINE@SPEC`; defaults to the latest frame of the proposal's timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub ops: Vec<Op>,
}

pub const TITLE_LEN_MAX: usize = 200;
pub const PARTY_LEN_MAX: usize = 64;

impl ProposalDocument {
    /// Parses a JSON document (starting with `{`) or a TOML one.
    pub fn parse(bytes: &[u8]) -> Result<ProposalDocument, SandboxError> {
        let text = std::str::from_utf8(bytes).map_err(|_| SandboxError::Document {
            format: "UTF-8",
            reason: "the document is not UTF-8 text".into(),
        })?;
        let document: ProposalDocument = if text.trim_start().starts_with('{') {
            // The error names where in the document it is (`ops[2].op: unknown variant`).
            let json = |reason: String| SandboxError::Document {
                format: "JSON",
                reason,
            };
            let deserializer = &mut serde_json::Deserializer::from_str(text);
            let document = serde_path_to_error::deserialize(&mut *deserializer)
                .map_err(|error| json(format!("at {}: {}", error.path(), error.inner())))?;
            deserializer
                .end()
                .map_err(|error| json(error.to_string()))?;
            document
        } else {
            toml::from_str(text).map_err(|error| SandboxError::Document {
                format: "TOML",
                reason: error.to_string().trim().replace('\n', " "),
            })?
        };
        document.check_fields()?;
        Ok(document)
    }

    /// Checks what needs no state: title, author, op count.
    pub fn check_fields(&self) -> Result<(), SandboxError> {
        let invalid = |reason: String| SandboxError::Invalid(reason);
        if self.title.trim().is_empty() || self.title.len() > TITLE_LEN_MAX {
            return Err(invalid(format!(
                "title must be 1 to {TITLE_LEN_MAX} characters"
            )));
        }
        // An absent author is the party that submits the document (filled in then).
        if !self.author.is_empty()
            && (!kairos_core::replica::is_valid_replica_name(&self.author)
                || self.author.len() > PARTY_LEN_MAX)
        {
            return Err(invalid(format!(
                "author {:?} is not a party name (letters, digits, '-', '_', '.')",
                self.author
            )));
        }
        if self.ops.is_empty() {
            return Err(invalid("has no ops".into()));
        }
        Ok(())
    }
}

/// A stored proposal: the document, resolved against its base frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    /// The hash of the stored proposal (zero while being stored).
    pub id: Hash,
    pub replica: String,
    pub title: String,
    pub author: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The timeline a commit of this proposal moves.
    pub timeline: String,
    /// The base frame, and the spec the author gave for it.
    pub base: Hash,
    pub base_spec: String,
    pub created: Instant,
    pub ops: Vec<Op>,
}

/// The small index record kept beside the stored proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalSummary {
    pub id: Hash,
    pub title: String,
    pub author: String,
    pub timeline: String,
    pub base: Hash,
    pub created: Instant,
    pub ops: usize,
}

/// The longest file name Linux file systems take (`NAME_MAX`), in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// Splits a proposal path into components, refusing what could leave the root or what no
/// file system would take.
pub fn path_components(path: &str) -> Result<Vec<Vec<u8>>, String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with('/') {
        return Err(format!(
            "path {path:?} is absolute; paths are relative to the replica root"
        ));
    }
    if path.contains('\0') {
        return Err(format!("path {path:?} contains NUL"));
    }
    if path.len() > 4096 {
        return Err("the path is longer than 4096 bytes".into());
    }
    let mut components = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(format!("path {path:?} escapes the replica root (..)")),
            name if name.len() > NAME_BYTES_MAX => {
                return Err(format!(
                    "path {path:?}: the name {:?}… is {} bytes, over the file system's limit of {NAME_BYTES_MAX}",
                    name.chars().take(16).collect::<String>(),
                    name.len()
                ));
            }
            name => components.push(name.as_bytes().to_vec()),
        }
    }
    if components.is_empty() {
        return Err(format!("path {path:?} names the replica root itself"));
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_from_json_and_toml_and_name_bad_fields() {
        let json = br#"{"title":"raise port","author":"web-team","ops":[{"op":"set_config","file":"app.toml","key":"server.port","value":9090},{"op":"action","name":"reload"}]}"#;
        let document = ProposalDocument::parse(json).unwrap();
        assert_eq!(document.ops.len(), 2);
        let toml = b"title = \"index\"\nauthor = \"web\"\n[[ops]]\nop = \"put_file\"\npath = \"index.html\"\ncontent = \"hi\"\n";
        let document = ProposalDocument::parse(toml).unwrap();
        assert_eq!(document.ops[0].put_content().unwrap(), b"hi");
        let error = ProposalDocument::parse(
            br#"{"title":"x","author":"a","ops":[{"op":"chmod","path":"x"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown variant `chmod`"), "{error}");
        let error = ProposalDocument::parse(
            br#"{"title":"x","author":"a b","ops":[{"op":"delete","path":"x"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("author \"a b\""), "{error}");
    }

    #[test]
    fn paths_never_leave_the_root() {
        assert_eq!(
            path_components("a/./b//c").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(
            path_components("../etc/passwd")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            path_components("a/../../b")
                .unwrap_err()
                .contains("escapes")
        );
        assert!(
            path_components("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(path_components(".").is_err());
        // A name the file system refuses is refused when proposed, not at commit.
        let long = format!("dir/{}", "n".repeat(300));
        assert!(
            path_components(&long)
                .unwrap_err()
                .contains("over the file system's limit of 255")
        );
        assert!(path_components(&format!("dir/{}", "n".repeat(255))).is_ok());
    }
}
