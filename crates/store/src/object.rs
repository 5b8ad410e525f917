//! Stored objects: kinds, the value codec (zstd, optionally with a per-replica dictionary)
//! and the checks made on every read (header, size bound, BLAKE3 of the content).

use std::cell::RefCell;

use kairos_core::Hash;

/// What an object holds. The kind is part of the hash, so kinds never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// A content-defined chunk of a large file.
    Chunk = 1,
    /// The whole content of a small file.
    Blob = 2,
    /// The chunk list of a large file.
    ChunkList = 3,
    /// A directory node (leaf or index page).
    Dir = 4,
    /// The root of a state.
    Root = 5,
    /// Processes and metrics of a state.
    Runtime = 6,
    /// The keys parsed from one config file.
    Config = 7,
}

impl ObjectKind {
    pub fn from_byte(byte: u8) -> Option<ObjectKind> {
        Some(match byte {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Blob,
            3 => ObjectKind::ChunkList,
            4 => ObjectKind::Dir,
            5 => ObjectKind::Root,
            6 => ObjectKind::Runtime,
            7 => ObjectKind::Config,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Blob => "blob",
            ObjectKind::ChunkList => "chunk list",
            ObjectKind::Dir => "directory node",
            ObjectKind::Root => "state root",
            ObjectKind::Runtime => "runtime node",
            ObjectKind::Config => "config node",
        }
    }
}

/// The address of `raw` content of `kind`.
pub fn object_hash(kind: ObjectKind, raw: &[u8]) -> Hash {
    Hash::of(kind as u8, raw)
}

const FORMAT_VERSION: u8 = 1;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_ZSTD_DICT: u8 = 2;
const HEADER_BYTES: usize = 7;
/// No object's content is larger than this (chunks and pages are far smaller).
pub const OBJECT_RAW_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("object {hash}: {problem}")]
    Corrupt { hash: Hash, problem: String },
    #[error("object {hash} is compressed with dictionary {dict_id:016x}, which is not stored")]
    MissingDictionary { hash: Hash, dict_id: u64 },
}

/// A trained dictionary.
pub struct Dictionary {
    pub id: u64,
    pub bytes: Vec<u8>,
}

impl Dictionary {
    pub fn new(bytes: Vec<u8>) -> Dictionary {
        Dictionary {
            id: dictionary_id(&bytes),
            bytes,
        }
    }
}

/// zstd contexts kept per thread: creating one costs more than compressing a small object
/// (it allocates and clears megabytes of tables), and a context keeps a loaded dictionary
/// digested across calls.
const CONTEXTS_PER_THREAD_MAX: usize = 4;

thread_local! {
    static COMPRESSORS: RefCell<Vec<(u64, i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSORS: RefCell<Vec<(u64, zstd::bulk::Decompressor<'static>)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work` with this thread's compressor for (`dictionary`, `level`); id 0 is none.
fn with_compressor<R>(
    dictionary: Option<&Dictionary>,
    level: i32,
    work: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<R>,
) -> Option<R> {
    let id = dictionary.map(|d| d.id).unwrap_or(0);
    COMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let index = match contexts
            .iter()
            .position(|(i, l, _)| *i == id && *l == level)
        {
            Some(index) => index,
            None => {
                let compressor = match dictionary {
                    Some(dictionary) => {
                        zstd::bulk::Compressor::with_dictionary(level, &dictionary.bytes)
                    }
                    None => zstd::bulk::Compressor::new(level),
                }
                .ok()?;
                if contexts.len() >= CONTEXTS_PER_THREAD_MAX {
                    contexts.remove(0);
                }
                contexts.push((id, level, compressor));
                contexts.len() - 1
            }
        };
        work(&mut contexts[index].2).ok()
    })
}

fn with_decompressor<R>(
    dictionary: Option<&Dictionary>,
    work: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    let id = dictionary.map(|d| d.id).unwrap_or(0);
    DECOMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let index = match contexts.iter().position(|(i, _)| *i == id) {
            Some(index) => index,
            None => {
                let decompressor = match dictionary {
                    Some(dictionary) => {
                        zstd::bulk::Decompressor::with_dictionary(&dictionary.bytes)?
                    }
                    None => zstd::bulk::Decompressor::new()?,
                };
                if contexts.len() >= CONTEXTS_PER_THREAD_MAX {
                    contexts.remove(0);
                }
                contexts.push((id, decompressor));
                contexts.len() - 1
            }
        };
        work(&mut contexts[index].1)
    })
}

pub fn dictionary_id(bytes: &[u8]) -> u64 {
    let hash = blake3::hash(bytes);
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Content larger than this is probed before it is compressed.
const PROBE_CONTENT_BYTES_MIN: usize = 16 << 10;
const PROBE_BYTES: usize = 4 << 10;

/// Byte entropy (bits per byte) under which a sample is taken as compressible without a
/// trial compression (text, most structured data)...
const ENTROPY_COMPRESSIBLE: f64 = 6.5;
/// ...and over which as incompressible (random or already compressed data: a 4 KiB sample
/// of uniformly random bytes measures about 7.95).
const ENTROPY_INCOMPRESSIBLE: f64 = 7.8;

/// Whether compressing the whole object (random or already compressed data) would be
/// wasted work, judged from a sample of its middle as file systems do (btrfs's
/// heuristic): its byte entropy decides clear cases at once, and a fast trial compression
/// of the sample, saving less than 3%, decides the rest.
fn looks_incompressible(raw: &[u8]) -> bool {
    if raw.len() < PROBE_CONTENT_BYTES_MIN {
        return false;
    }
    let middle = raw.len() / 2 - PROBE_BYTES / 2;
    let sample = &raw[middle..middle + PROBE_BYTES];
    let entropy = byte_entropy(sample);
    if entropy < ENTROPY_COMPRESSIBLE {
        return false;
    }
    if entropy > ENTROPY_INCOMPRESSIBLE {
        return true;
    }
    with_compressor(None, 1, |compressor| compressor.compress(sample))
        .is_some_and(|compressed| compressed.len() * 100 >= sample.len() * 97)
}

/// Shannon entropy of the bytes of `sample`, in bits per byte.
fn byte_entropy(sample: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &byte in sample {
        counts[byte as usize] += 1;
    }
    let total = sample.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let p = f64::from(count) / total;
            -p * p.log2()
        })
        .sum()
}

/// An encoded object in two pieces (its header, and the content as stored), so that content
/// stored as it is can be copied once, straight where it is packed.
pub struct Encoded<'a> {
    header: [u8; HEADER_BYTES + 8],
    header_len: usize,
    payload: std::borrow::Cow<'a, [u8]>,
}

impl Encoded<'_> {
    pub fn len(&self) -> usize {
        self.header_len + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored value's pieces, in order.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.header[..self.header_len], &self.payload]
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.len());
        for part in self.parts() {
            value.extend_from_slice(part);
        }
        value
    }
}

/// Encodes `raw` as a stored value (compressed when that saves space), in its two pieces.
pub fn encode<'a>(
    kind: ObjectKind,
    raw: &'a [u8],
    level: i32,
    dictionary: Option<&Dictionary>,
) -> Encoded<'a> {
    assert!(
        raw.len() <= OBJECT_RAW_BYTES_MAX,
        "object content over the limit"
    );
    let codec = if dictionary.is_some() {
        CODEC_ZSTD_DICT
    } else {
        CODEC_ZSTD
    };
    let compressed = if looks_incompressible(raw) {
        None
    } else {
        with_compressor(dictionary, level, |compressor| compressor.compress(raw))
            .map(|payload| (codec, payload))
    };
    let (codec, payload) = match compressed {
        Some((codec, payload)) if payload.len() + 8 < raw.len() => {
            (codec, std::borrow::Cow::Owned(payload))
        }
        _ => (CODEC_RAW, std::borrow::Cow::Borrowed(raw)),
    };
    let mut header = [0; HEADER_BYTES + 8];
    header[0] = FORMAT_VERSION;
    header[1] = kind as u8;
    header[2] = codec;
    header[3..7].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    let mut header_len = 7;
    if codec == CODEC_ZSTD_DICT {
        let id = dictionary.map(|d| d.id).unwrap_or(0);
        header[7..15].copy_from_slice(&id.to_le_bytes());
        header_len = 15;
    }
    Encoded {
        header,
        header_len,
        payload,
    }
}

/// The dictionary an encoded value needs, if any.
pub fn needed_dictionary(value: &[u8]) -> Option<u64> {
    if value.len() >= HEADER_BYTES + 8 && value[2] == CODEC_ZSTD_DICT {
        Some(u64::from_le_bytes(
            value[HEADER_BYTES..HEADER_BYTES + 8].try_into().ok()?,
        ))
    } else {
        None
    }
}

/// The content of a value stored uncompressed, checked as [`decode`] checks it, without
/// a copy; `None` for a compressed value (decode it).
pub fn stored_raw(hash: Hash, kind: ObjectKind, value: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    if value.len() < HEADER_BYTES || value[2] != CODEC_RAW {
        return Ok(None);
    }
    check_header(hash, kind, value)?;
    let raw = &value[HEADER_BYTES..];
    let raw_len = u32::from_le_bytes(value[3..7].try_into().unwrap_or([0; 4])) as usize;
    if raw.len() != raw_len {
        return Err(CodecError::Corrupt {
            hash,
            problem: format!("holds {} bytes where its header says {raw_len}", raw.len()),
        });
    }
    if object_hash(kind, raw) != hash {
        return Err(CodecError::Corrupt {
            hash,
            problem: "content does not match its hash".into(),
        });
    }
    Ok(Some(raw))
}

/// Checks a value's length, format version and kind.
fn check_header(hash: Hash, kind: ObjectKind, value: &[u8]) -> Result<(), CodecError> {
    let corrupt = |problem: String| CodecError::Corrupt { hash, problem };
    if value.len() < HEADER_BYTES {
        return Err(corrupt(format!(
            "value of {} bytes is truncated",
            value.len()
        )));
    }
    if value[0] != FORMAT_VERSION {
        return Err(corrupt(format!("unknown format version {}", value[0])));
    }
    match ObjectKind::from_byte(value[1]) {
        Some(stored) if stored == kind => {}
        Some(stored) => {
            return Err(corrupt(format!(
                "is a {} where a {} was expected",
                stored.name(),
                kind.name()
            )));
        }
        None => return Err(corrupt(format!("unknown object kind {}", value[1]))),
    }
    Ok(())
}

/// Decodes a stored value and checks that it is the object `hash` of `kind`.
pub fn decode(
    hash: Hash,
    kind: ObjectKind,
    value: &[u8],
    dictionary: Option<&Dictionary>,
) -> Result<Vec<u8>, CodecError> {
    let corrupt = |problem: String| CodecError::Corrupt { hash, problem };
    check_header(hash, kind, value)?;
    let raw_len = u32::from_le_bytes(value[3..7].try_into().unwrap_or([0; 4])) as usize;
    if raw_len > OBJECT_RAW_BYTES_MAX {
        return Err(corrupt(format!("claims {raw_len} bytes, over the limit")));
    }
    let raw = match value[2] {
        CODEC_RAW => value[HEADER_BYTES..].to_vec(),
        CODEC_ZSTD => with_decompressor(None, |d| d.decompress(&value[HEADER_BYTES..], raw_len))
            .map_err(|error| corrupt(format!("does not decompress: {error}")))?,
        CODEC_ZSTD_DICT => {
            let Some(dict_id) = needed_dictionary(value) else {
                return Err(corrupt("dictionary id is truncated".into()));
            };
            let dictionary = match dictionary {
                Some(dictionary) if dictionary.id == dict_id => dictionary,
                _ => return Err(CodecError::MissingDictionary { hash, dict_id }),
            };
            with_decompressor(Some(dictionary), |d| {
                d.decompress(&value[HEADER_BYTES + 8..], raw_len)
            })
            .map_err(|error| corrupt(format!("does not decompress: {error}")))?
        }
        other => return Err(corrupt(format!("unknown codec {other}"))),
    };
    if raw.len() != raw_len {
        return Err(corrupt(format!(
            "holds {} bytes where its header says {raw_len}",
            raw.len()
        )));
    }
    if object_hash(kind, &raw) != hash {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compressibility_probe_tells_random_from_text_and_from_mixed_data() {
        let mut random = vec![0u8; 64 << 10];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut random);
        assert!(byte_entropy(&random[..PROBE_BYTES]) > ENTROPY_INCOMPRESSIBLE);
        assert!(looks_incompressible(&random));
        let text: Vec<u8> = (0..4000)
            .flat_map(|line| format!("server{line} listen = 10.0.0.{}\n", line % 250).into_bytes())
            .collect();
        assert!(byte_entropy(&text[..PROBE_BYTES]) < ENTROPY_COMPRESSIBLE);
        assert!(!looks_incompressible(&text));
        // Random 7-bit bytes: between the bounds, the trial compression decides (it
        // compresses, an eighth of every byte is spare).
        let mixed: Vec<u8> = random.iter().map(|&byte| byte & 0x7f).collect();
        let entropy = byte_entropy(&mixed[..PROBE_BYTES]);
        assert!(
            (ENTROPY_COMPRESSIBLE..=ENTROPY_INCOMPRESSIBLE).contains(&entropy),
            "{entropy}"
        );
        assert!(!looks_incompressible(&mixed));
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(raw in proptest::collection::vec(any::<u8>(), 0..4096), repeat in 1usize..8) {
            let raw = raw.repeat(repeat);
            let hash = object_hash(ObjectKind::Blob, &raw);
            let value = encode(ObjectKind::Blob, &raw, 3, None).to_vec();
            prop_assert_eq!(decode(hash, ObjectKind::Blob, &value, None).unwrap(), raw);
        }

        #[test]
        fn any_flipped_byte_is_detected(raw in proptest::collection::vec(any::<u8>(), 1..2048), at in any::<usize>(), bit in 0u8..8) {
            let hash = object_hash(ObjectKind::Chunk, &raw);
            let mut value = encode(ObjectKind::Chunk, &raw, 3, None).to_vec();
            let at = at % value.len();
            value[at] ^= 1 << bit;
            prop_assert!(decode(hash, ObjectKind::Chunk, &value, None).is_err());
        }

        /// The copy-free read of a value stored uncompressed sees what `decode` sees and
        /// refuses what it refuses: a flipped byte anywhere, or the wrong kind.
        #[test]
        fn stored_raw_agrees_with_decode(raw in proptest::collection::vec(any::<u8>(), 1..2048), at in any::<usize>(), bit in 0u8..8) {
            // Random bytes do not compress: stored raw.
            let hash = object_hash(ObjectKind::Chunk, &raw);
            let mut value = encode(ObjectKind::Chunk, &raw, 3, None).to_vec();
            if value[2] == CODEC_RAW {
                prop_assert_eq!(stored_raw(hash, ObjectKind::Chunk, &value).unwrap(), Some(raw.as_slice()));
                prop_assert!(stored_raw(hash, ObjectKind::Blob, &value).is_err());
                let at = at % value.len();
                value[at] ^= 1 << bit;
                let damaged = stored_raw(hash, ObjectKind::Chunk, &value);
                // A flip of the codec byte makes it a compressed value (left to decode).
                prop_assert!(damaged.is_err() || damaged.unwrap().is_none());
                prop_assert!(decode(hash, ObjectKind::Chunk, &value, None).is_err());
            } else {
                prop_assert_eq!(stored_raw(hash, ObjectKind::Chunk, &value).unwrap(), None);
            }
        }
    }

    #[test]
    fn dictionary_round_trip_and_missing_dictionary() {
        let samples: Vec<Vec<u8>> = (0..400)
            .map(|i| {
                format!(
                    "listen = {i}\nmax_connections = {}\nname = \"svc-{i}\"\n",
                    i * 7
                )
                .into_bytes()
            })
            .collect();
        let bytes = zstd::dict::from_samples(&samples, 4096).unwrap();
        let dictionary = Dictionary::new(bytes);
        let raw = b"listen = 42\nmax_connections = 294\nname = \"svc-42\"\n".repeat(2);
        let hash = object_hash(ObjectKind::Blob, &raw);
        let value = encode(ObjectKind::Blob, &raw, 3, Some(&dictionary)).to_vec();
        assert_eq!(needed_dictionary(&value), Some(dictionary.id));
        assert_eq!(
            decode(hash, ObjectKind::Blob, &value, Some(&dictionary)).unwrap(),
            raw
        );
        assert!(matches!(
            decode(hash, ObjectKind::Blob, &value, None),
            Err(CodecError::MissingDictionary { .. })
        ));
    }

    #[test]
    fn wrong_kind_is_named() {
        let raw = b"abc";
        let value = encode(ObjectKind::Blob, raw, 3, None).to_vec();
        let error = decode(
            object_hash(ObjectKind::Blob, raw),
            ObjectKind::Dir,
            &value,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("is a blob where a directory node was expected"),
            "{error}"
        );
    }
}
