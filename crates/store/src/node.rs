//! The shapes of a state as stored: rkyv-archived nodes of a Merkle tree. A state root
//! points at a directory tree (files, links, specials, with parsed config keys) and a
//! runtime node (processes and metrics).

use rkyv::{Archive, Deserialize, Serialize};

/// File metadata as captured.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission and type bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Length in bytes.
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub allocated_bytes: u64,
}

/// The content of a regular file.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Empty,
    /// A small file stored whole.
    Blob {
        hash: [u8; 32],
    },
    /// A large file split into content-defined chunks.
    Chunks {
        list: [u8; 32],
        chunks: u64,
    },
    /// Content not stored (for example, over the file size limit); the reason says why.
    Omitted {
        reason: String,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialKind {
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Dir {
        node: [u8; 32],
        /// Entries below this directory, recursively.
        entries: u64,
        /// Bytes of regular files below this directory, recursively.
        bytes: u64,
    },
    File {
        content: Content,
        /// The keys parsed from this file when it is a config file.
        config: Option<[u8; 32]>,
        /// The file kept changing while it was read; `content` is the last read.
        torn: bool,
    },
    Symlink {
        target: Vec<u8>,
    },
    Special {
        kind: SpecialKind,
    },
    /// The entry exists but could not be read; `error` says why.
    Unreadable {
        error: String,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The file name, as bytes (names need not be UTF-8).
    pub name: Vec<u8>,
    pub meta: Meta,
    pub body: Body,
}

/// One page of a large directory.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PageRef {
    pub first_name: Vec<u8>,
    pub node: [u8; 32],
    pub entries: u64,
}

/// A directory, stored as one leaf or, when large, as an index of pages split at
/// content-defined boundaries so that an edit rewrites only the pages it touches.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum DirNode {
    Leaf { entries: Vec<DirEntry> },
    Index { pages: Vec<PageRef> },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    /// Bytes of file content under this reference.
    pub bytes: u64,
}

/// The chunks of a large file in order; level 0 lists chunks, higher levels list lists.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    pub level: u8,
    pub items: Vec<ChunkRef>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConfigKey {
    pub key: String,
    pub value: String,
}

/// The keys of one config file, flattened to dotted paths.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConfigNode {
    pub format: String,
    pub keys: Vec<ConfigKey>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListeningSocket {
    pub protocol: String,
    pub address: String,
    pub port: u16,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProcessEntry {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    pub cmdline: Vec<String>,
    /// The kernel's state letter (R, S, D, Z, T, ...).
    pub state: String,
    pub start_time_ns: i64,
    pub rss_bytes: u64,
    pub cpu_time_ms: u64,
    /// CPU use since the previous frame (or since start), in percent of one core.
    pub cpu_percent: f64,
    pub threads: u32,
    pub listening: Vec<ListeningSocket>,
    /// The selector that matched the process.
    pub selector: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    pub cpu_percent: f64,
    pub memory_rss_bytes: u64,
    pub disk_allocated_bytes: u64,
    pub disk_apparent_bytes: u64,
    pub files: u64,
    pub directories: u64,
    pub processes: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RuntimeNode {
    pub processes: Vec<ProcessEntry>,
    pub metrics: Metrics,
}

/// Something the capture wants the reader to know (a torn or unreadable file, a skipped loop).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CaptureNote {
    pub path: Vec<u8>,
    pub message: String,
}

pub const ROOT_FORMAT: u32 = 1;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RootNode {
    pub format: u32,
    pub replica: String,
    pub captured_at_ns: i64,
    /// The root directory's node, and its metadata.
    pub files: [u8; 32],
    pub files_meta: Meta,
    pub file_entries: u64,
    pub file_bytes: u64,
    pub runtime: [u8; 32],
    pub notes: Vec<CaptureNote>,
}

/// Serialises a node into its stored bytes.
pub fn to_bytes<T>(node: &T) -> Vec<u8>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(node)
        .map(|bytes| bytes.to_vec())
        .expect("serialising a node into memory cannot fail")
}

/// Validates `bytes` as an archived `T` and deserialises it.
pub fn from_bytes<T>(bytes: &[u8]) -> Result<T, String>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_round_trip_and_garbage_is_rejected() {
        let node = DirNode::Leaf {
            entries: vec![DirEntry {
                name: b"caf\xe9".to_vec(),
                meta: Meta {
                    mode: 0o100644,
                    size: 3,
                    ..Meta::default()
                },
                body: Body::File {
                    content: Content::Blob { hash: [7; 32] },
                    config: None,
                    torn: false,
                },
            }],
        };
        let bytes = to_bytes(&node);
        assert_eq!(from_bytes::<DirNode>(&bytes).unwrap(), node);
        assert!(from_bytes::<DirNode>(&bytes[..bytes.len() / 2]).is_err());
        assert!(from_bytes::<RootNode>(&[0xff; 64]).is_err());
    }
}
