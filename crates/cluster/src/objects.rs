//! Objects across members. Objects never enter the log: a frame's command names its root,
//! and a member that lacks an object asks its peers for it by hash (`POST
//! /cluster/objects`), checks what comes back against the hash and keeps a copy. A request
//! may ask for the objects below those named (`closure`), so that a whole frame arrives in
//! a few round trips instead of one per object.
//!
//! The answer is binary: for each object, its hash (32 bytes), its kind (1 byte), the
//! length of its content (u32, little-endian) and the content.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kairos_core::Hash;
use kairos_store::{ObjectKind, ObjectSource, Reader, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::network::PeerClient;

/// Bytes of content in one answer, at most.
pub const ANSWER_BYTES_MAX: u64 = 32 << 20;
/// Objects named in one request, at most.
pub const WANTED_MAX: usize = 100_000;
/// A peer that does not answer a batch within this is skipped for the next one.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A request for objects.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRequest {
    /// Hashes and kinds (the kind byte of `ObjectKind`).
    pub want: Vec<(Hash, u8)>,
    /// Whether to send the objects below those named too (as many as fit).
    #[serde(default)]
    pub closure: bool,
    /// Bytes of content to send at most (capped at [`ANSWER_BYTES_MAX`]).
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// The answer to `request` from `store`: the objects it holds (those it lacks are left
/// out, never fetched in turn), and with `closure` those below them, breadth first,
/// until the byte budget is spent.
pub fn answer(store: &Store, request: &ObjectRequest) -> Result<Vec<u8>, String> {
    if request.want.len() > WANTED_MAX {
        return Err(format!(
            "{} objects asked for; at most {WANTED_MAX} per request",
            request.want.len()
        ));
    }
    let mut queue = std::collections::VecDeque::new();
    for (hash, kind) in &request.want {
        let kind = ObjectKind::from_byte(*kind)
            .ok_or_else(|| format!("object {hash}: unknown kind {kind}"))?;
        queue.push_back((*hash, kind));
    }
    let budget = request
        .max_bytes
        .unwrap_or(ANSWER_BYTES_MAX)
        .min(ANSWER_BYTES_MAX);
    let reader = store.reader().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut sent = HashSet::new();
    let mut content_bytes = 0u64;
    while let Some((hash, kind)) = queue.pop_front() {
        if content_bytes >= budget {
            break;
        }
        if !sent.insert(hash) || !reader.has_object(&hash).map_err(|e| e.to_string())? {
            continue;
        }
        let raw = reader.object(&hash, kind).map_err(|e| e.to_string())?;
        out.extend_from_slice(hash.as_bytes());
        out.push(kind as u8);
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&raw);
        content_bytes += raw.len() as u64;
        if request.closure {
            for (child, child_kind) in reader.children(&hash, kind).map_err(|e| e.to_string())? {
                if let Some(child_kind) = child_kind {
                    queue.push_back((child, child_kind));
                }
            }
        }
    }
    Ok(out)
}

/// The objects of an answer (not yet checked against their hashes: the store does that).
pub fn decode_answer(mut bytes: &[u8]) -> Result<Vec<(Hash, ObjectKind, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (head, rest) = bytes
            .split_at_checked(37)
            .ok_or("an object answer cut short")?;
        let hash = Hash::from_slice(&head[..32]).ok_or("an object answer cut short")?;
        let kind = ObjectKind::from_byte(head[32])
            .ok_or_else(|| format!("object {hash}: unknown kind {}", head[32]))?;
        let len = u32::from_le_bytes([head[33], head[34], head[35], head[36]]) as usize;
        let (raw, rest) = rest
            .split_at_checked(len)
            .ok_or("an object answer cut short")?;
        out.push((hash, kind, raw.to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// The addresses of the peers to ask (every other member), in the order to ask them.
pub type PeerList = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Fetches objects from the cluster's other members.
pub struct PeerObjects {
    pub client: PeerClient,
    pub peers: PeerList,
}

impl PeerObjects {
    fn ask(
        &self,
        peer: &str,
        request: &ObjectRequest,
    ) -> Result<Vec<(Hash, ObjectKind, Vec<u8>)>, String> {
        let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        let bytes = self
            .client
            .post_bytes(
                peer,
                "/cluster/objects",
                "application/json",
                &body,
                FETCH_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
        decode_answer(&bytes).map_err(|e| format!("{peer}: {e}"))
    }
}

impl ObjectSource for PeerObjects {
    fn fetch(
        &self,
        wanted: &[(Hash, ObjectKind)],
        closure: bool,
    ) -> Result<Vec<(Hash, ObjectKind, Vec<u8>)>, String> {
        let mut missing: Vec<(Hash, u8)> = wanted.iter().map(|(h, k)| (*h, *k as u8)).collect();
        let mut found = Vec::new();
        let mut problems = Vec::new();
        for peer in (self.peers)() {
            if missing.is_empty() {
                break;
            }
            let request = ObjectRequest {
                want: missing.clone(),
                closure,
                max_bytes: None,
            };
            match self.ask(&peer, &request) {
                Ok(objects) => {
                    let got: HashSet<Hash> = objects.iter().map(|(h, _, _)| *h).collect();
                    missing.retain(|(hash, _)| !got.contains(hash));
                    found.extend(objects);
                }
                Err(problem) => problems.push(problem),
            }
        }
        if found.is_empty() && !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(found)
    }
}

/// What making a frame whole here did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Completion {
    /// Objects fetched from peers.
    pub fetched: u64,
    pub fetched_bytes: u64,
    /// Requests made.
    pub rounds: u64,
    /// Whether every object of the frame is now here.
    pub complete: bool,
}

/// The objects below `root` that this store lacks (at most `limit`), without fetching.
pub fn missing_below(
    reader: &Reader<'_>,
    root: &Hash,
    limit: usize,
) -> Result<Vec<(Hash, ObjectKind)>, StoreError> {
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(*root, ObjectKind::Root)];
    while let Some((hash, kind)) = stack.pop() {
        if !seen.insert(hash) {
            continue;
        }
        if !reader.has_object(&hash)? {
            missing.push((hash, kind));
            if missing.len() >= limit {
                break;
            }
            continue;
        }
        for (child, child_kind) in reader.children(&hash, kind)? {
            if let Some(child_kind) = child_kind {
                stack.push((child, child_kind));
            }
        }
    }
    Ok(missing)
}

/// Makes every object of the frame with root `root` present here, fetching what is
/// missing from peers in batches (each answer brings the objects below those asked for).
pub fn complete_frame(store: &Store, root: &Hash) -> Result<Completion, StoreError> {
    const ROUNDS_MAX: u64 = 10_000;
    let mut completion = Completion::default();
    loop {
        let reader = store.reader()?;
        let missing = missing_below(&reader, root, 4096)?;
        drop(reader);
        if missing.is_empty() {
            completion.complete = true;
            return Ok(completion);
        }
        if completion.rounds >= ROUNDS_MAX {
            return Ok(completion);
        }
        completion.rounds += 1;
        let fetched = store.fetch_missing(&missing, true)?;
        if fetched.is_empty() {
            // No peer has them (yet).
            return Ok(completion);
        }
        completion.fetched += fetched.len() as u64;
        completion.fetched_bytes += fetched
            .iter()
            .map(|(_, _, raw)| raw.len() as u64)
            .sum::<u64>();
    }
}

/// Which of the catalog's frames are whole on this member (every object below their
/// root here), as the last pass found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObjectHealth {
    /// Frames in the catalog.
    pub frames: u64,
    /// Frames not whole here, and the first of them (at most [`MISSING_LISTED_MAX`]).
    pub missing_count: u64,
    pub missing: Vec<Hash>,
    /// Objects and bytes fetched from peers since the node started.
    pub fetched: u64,
    pub fetched_bytes: u64,
}

/// Frames a health report names, at most.
pub const MISSING_LISTED_MAX: usize = 1000;

/// Keeps every frame of the catalog whole on this member: each pass checks the frames
/// not yet known whole and fetches what they lack from peers.
#[derive(Default)]
pub struct Replicator {
    whole: std::sync::Mutex<HashSet<Hash>>,
    health: std::sync::Mutex<ObjectHealth>,
}

impl Replicator {
    /// One pass over the catalog's frames; with `fetch`, missing objects are fetched.
    pub fn pass(&self, store: &Store, fetch: bool) -> Result<ObjectHealth, StoreError> {
        let reader = store.reader()?;
        let mut frames = Vec::new();
        for (_, value) in reader.scan_prefix(kairos_store::keys::FRAME)? {
            if let Ok(record) = serde_json::from_slice::<kairos_store::FrameRecord>(&value) {
                frames.push((record.id, record.root));
            }
        }
        drop(reader);
        let mut health = ObjectHealth {
            frames: frames.len() as u64,
            ..self.health()
        };
        health.missing.clear();
        health.missing_count = 0;
        let mut whole = self.whole.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let present: HashSet<Hash> = frames.iter().map(|(id, _)| *id).collect();
        whole.retain(|id| present.contains(id));
        for (id, root) in frames {
            if whole.contains(&id) {
                continue;
            }
            let complete = if fetch {
                let completion = complete_frame(store, &root)?;
                health.fetched += completion.fetched;
                health.fetched_bytes += completion.fetched_bytes;
                completion.complete
            } else {
                let reader = store.reader()?;
                missing_below(&reader, &root, 1)?.is_empty()
            };
            if complete {
                whole.insert(id);
            } else {
                health.missing_count += 1;
                if health.missing.len() < MISSING_LISTED_MAX {
                    health.missing.push(id);
                }
            }
        }
        *self.whole.lock().unwrap_or_else(|p| p.into_inner()) = whole;
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = health.clone();
        Ok(health)
    }

    /// Records `frame` as whole here (its objects were just completed).
    pub fn mark_whole(&self, frame: Hash) {
        self.whole
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(frame);
    }

    /// What the last pass found.
    pub fn health(&self) -> ObjectHealth {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_answers_round_trip_and_garbage_is_named() {
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open(store_dir.path()).unwrap();
        let writer = store.object_writer_without_dictionary().unwrap();
        let blob = writer.put(ObjectKind::Blob, b"hello").unwrap();
        writer.finish().unwrap();
        let request = ObjectRequest {
            want: vec![(blob, ObjectKind::Blob as u8), (Hash::of(9, b"absent"), 2)],
            closure: false,
            max_bytes: None,
        };
        let bytes = answer(&store, &request).unwrap();
        let objects = decode_answer(&bytes).unwrap();
        assert_eq!(objects, vec![(blob, ObjectKind::Blob, b"hello".to_vec())]);
        assert!(
            decode_answer(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .contains("cut short")
        );
        let mut wrong_kind = bytes.clone();
        wrong_kind[32] = 99;
        assert!(
            decode_answer(&wrong_kind)
                .unwrap_err()
                .contains("unknown kind 99")
        );
        let too_many = ObjectRequest {
            want: vec![(blob, 2); WANTED_MAX + 1],
            closure: false,
            max_bytes: None,
        };
        assert!(answer(&store, &too_many).unwrap_err().contains("at most"));
    }
}
