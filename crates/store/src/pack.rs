//! Packing: stored objects are laid end to end in segments of a fixed size, each one value
//! of the backend, so that no space is lost to the backend's page rounding (redb allocates
//! large values in power-of-two pages; FoundationDB charges per key). An object's index
//! entry lists the (segment, offset, length) parts that hold it. Segment ids are unique
//! names, never reused; the objects inside carry their own content hashes.

use std::sync::atomic::{AtomicU64, Ordering};

use kairos_core::Hash;

use crate::keys;

/// Bytes per segment: one value fills one 64 KiB page of the embedded backend, with room
/// for the page's own header and key.
pub const SEGMENT_BYTES: usize = (64 << 10) - 512;
/// Bytes of a segment id (a prefix of the segment's BLAKE3 hash).
pub const SEGMENT_ID_BYTES: usize = 16;
const INDEX_VERSION: u8 = 1;
const PART_BYTES: usize = SEGMENT_ID_BYTES + 8;
/// An object spans at most this many segments (its value is at most ~1 MiB).
pub const PARTS_MAX: usize = 20;

pub type SegmentId = [u8; SEGMENT_ID_BYTES];

/// Where one piece of an object lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub segment: SegmentId,
    pub offset: u32,
    pub len: u32,
}

/// A new segment id, unique across processes and time: the hash of this process's
/// identity, the clock and a counter (hashing the segment itself would read every stored
/// byte once more; objects carry their own content hashes).
pub fn new_segment_id() -> SegmentId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PROCESS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&PROCESS.get_or_init(std::process::id).to_le_bytes());
    hasher.update(&kairos_core::Instant::now().0.to_le_bytes());
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut id = [0; SEGMENT_ID_BYTES];
    id.copy_from_slice(&hasher.finalize().as_bytes()[..SEGMENT_ID_BYTES]);
    id
}

pub fn encode_index(parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + parts.len() * PART_BYTES);
    out.push(INDEX_VERSION);
    out.push(parts.len() as u8);
    for part in parts {
        out.extend_from_slice(&part.segment);
        out.extend_from_slice(&part.offset.to_le_bytes());
        out.extend_from_slice(&part.len.to_le_bytes());
    }
    out
}

pub fn decode_index(value: &[u8]) -> Result<Vec<Part>, String> {
    if value.len() < 2 || value[0] != INDEX_VERSION {
        return Err("index entry has an unknown format".into());
    }
    let count = value[1] as usize;
    if count == 0 || count > PARTS_MAX || value.len() != 2 + count * PART_BYTES {
        return Err(format!("index entry of {} bytes is malformed", value.len()));
    }
    Ok(value[2..]
        .chunks_exact(PART_BYTES)
        .map(|raw| {
            let mut segment = [0; SEGMENT_ID_BYTES];
            segment.copy_from_slice(&raw[..SEGMENT_ID_BYTES]);
            let number =
                |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap_or([0; 4]));
            Part {
                segment,
                offset: number(SEGMENT_ID_BYTES),
                len: number(SEGMENT_ID_BYTES + 4),
            }
        })
        .collect())
}

/// Objects waiting for the segment that holds their last part.
struct Waiting {
    hash: Hash,
    /// (segment sequence number, offset, length)
    parts: Vec<(u64, u32, u32)>,
}

/// What a packer hands to the backend: whole segments and the index entries of objects
/// that lie entirely in segments handed over so far.
#[derive(Default)]
pub struct Flushed {
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Lays objects into segments. Not thread-safe: callers hold it under a lock.
pub struct Packer {
    segment: Vec<u8>,
    sequence: u64,
    recent: Vec<(u64, SegmentId)>,
    waiting: Vec<Waiting>,
}

impl Default for Packer {
    fn default() -> Self {
        Packer::new()
    }
}

impl Packer {
    pub fn new() -> Packer {
        Packer {
            segment: Vec::with_capacity(SEGMENT_BYTES),
            sequence: 0,
            recent: Vec::new(),
            waiting: Vec::new(),
        }
    }

    /// Appends one encoded object; returns what became complete.
    pub fn append(&mut self, hash: Hash, value: &[u8], out: &mut Flushed) {
        self.append_pieces(hash, &[value], out);
    }

    /// Appends one encoded object given in pieces (laid end to end); returns what became
    /// complete.
    pub fn append_pieces(&mut self, hash: Hash, pieces: &[&[u8]], out: &mut Flushed) {
        let mut parts = Vec::with_capacity(2);
        let mut pieces = pieces.iter().copied().filter(|piece| !piece.is_empty());
        let mut value = pieces.next().unwrap_or_default();
        while !value.is_empty() {
            let space = SEGMENT_BYTES - self.segment.len();
            let take = space.min(value.len());
            let offset = self.segment.len() as u32;
            match parts.last_mut() {
                // The next piece of the object in the same segment lengthens its part.
                Some((sequence, start, len))
                    if *sequence == self.sequence && *start + *len == offset =>
                {
                    *len += take as u32;
                }
                _ => parts.push((self.sequence, offset, take as u32)),
            }
            self.segment.extend_from_slice(&value[..take]);
            value = &value[take..];
            if value.is_empty() {
                value = pieces.next().unwrap_or_default();
            }
            if self.segment.len() == SEGMENT_BYTES {
                // Objects end before the segment does, except possibly this one.
                if value.is_empty() {
                    self.waiting.push(Waiting {
                        hash,
                        parts: std::mem::take(&mut parts),
                    });
                }
                self.flush_segment(out);
            }
        }
        if !parts.is_empty() {
            self.waiting.push(Waiting { hash, parts });
        }
    }

    /// Hands over the current segment even if it is not full.
    pub fn finish(&mut self, out: &mut Flushed) {
        if !self.segment.is_empty() {
            self.flush_segment(out);
        }
    }

    fn flush_segment(&mut self, out: &mut Flushed) {
        let id = new_segment_id();
        out.puts
            .push((keys::segment(&id), std::mem::take(&mut self.segment)));
        self.segment.reserve(SEGMENT_BYTES);
        self.recent.push((self.sequence, id));
        if self.recent.len() > PARTS_MAX {
            self.recent.remove(0);
        }
        let sequence = self.sequence;
        let recent = &self.recent;
        self.waiting.retain(|waiting| {
            let last = waiting.parts.last().map(|part| part.0).unwrap_or(0);
            if last > sequence {
                return true;
            }
            let parts: Vec<Part> = waiting
                .parts
                .iter()
                .map(|&(seq, offset, len)| Part {
                    segment: recent
                        .iter()
                        .find(|(s, _)| *s == seq)
                        .map(|(_, id)| *id)
                        .expect("an object's segments are recent"),
                    offset,
                    len,
                })
                .collect();
            out.puts
                .push((keys::object(&waiting.hash), encode_index(&parts)));
            false
        });
        self.sequence += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        #[test]
        fn every_object_is_recoverable_from_its_parts(sizes in proptest::collection::vec(1usize..150_000, 1..40)) {
            let mut packer = Packer::new();
            let mut out = Flushed::default();
            let objects: Vec<(Hash, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(index, &size)| {
                    let bytes: Vec<u8> = (0..size).map(|i| (i * 31 + index) as u8).collect();
                    (Hash::of(9, &bytes), bytes)
                })
                .collect();
            for (index, (hash, bytes)) in objects.iter().enumerate() {
                if index % 2 == 0 {
                    packer.append(*hash, bytes, &mut out);
                } else {
                    // In pieces, as a capture appends a header and the content after it.
                    let cut = (index * 7919) % bytes.len();
                    packer.append_pieces(*hash, &[&bytes[..cut], &[], &bytes[cut..]], &mut out);
                }
            }
            packer.finish(&mut out);
            let stored: HashMap<Vec<u8>, Vec<u8>> = out.puts.into_iter().collect();
            for (hash, bytes) in &objects {
                let index = stored.get(&keys::object(hash)).expect("indexed");
                let mut content = Vec::new();
                let parts = decode_index(index).unwrap();
                // A part per segment the object touches, however many pieces it came in.
                prop_assert!(parts.len() <= bytes.len().div_ceil(SEGMENT_BYTES) + 1);
                for part in parts {
                    let segment = stored.get(&keys::segment(&part.segment)).expect("segment stored");
                    prop_assert!(segment.len() <= SEGMENT_BYTES);
                    content.extend_from_slice(&segment[part.offset as usize..(part.offset + part.len) as usize]);
                }
                prop_assert_eq!(&content, bytes);
            }
        }
    }

    #[test]
    fn malformed_index_entries_are_rejected() {
        assert!(decode_index(&[]).is_err());
        assert!(decode_index(&[1, 0]).is_err());
        assert!(decode_index(&[1, 1, 0, 0]).is_err());
        assert!(decode_index(&[2, 1]).is_err());
    }
}
