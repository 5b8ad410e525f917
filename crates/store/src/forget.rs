//! Forgetting frames: the primitive retention policies build on. A forgotten frame's record
//! and its time index entries (on its timeline and on every fork that starts at it) are
//! removed in one guarded batch; its objects stay until garbage collection finds nothing
//! else needs them. A timeline's head is never forgotten. Which frames to forget (and what
//! else to protect: proposal bases, last good frames, unfinished commits) is the policy's
//! decision, not this module's.

use kairos_core::Hash;

use crate::catalog::parse_frame;
use crate::keys;
use crate::kv::{KvError, WriteBatch, scan_prefix};
use crate::store::{Store, StoreError};

/// Frames forgotten per batch.
pub const FORGET_BATCH_FRAMES: usize = 1_000;
/// Times a batch is rebuilt when a concurrent writer moved one of its guarded keys.
const FORGET_ATTEMPTS_MAX: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("frame {0} is not stored")]
    UnknownFrame(String),
    #[error(
        "frame {frame} is the head of timeline {timeline:?} of replica {replica:?}; a timeline's head is never forgotten"
    )]
    Head {
        frame: String,
        replica: String,
        timeline: String,
    },
}

impl From<KvError> for ForgetError {
    fn from(error: KvError) -> ForgetError {
        ForgetError::Store(error.into())
    }
}

impl Store {
    /// Removes the records of frames `ids` and their time index entries, in batches of
    /// [`FORGET_BATCH_FRAMES`], each guarded by checks that every frame is still stored and
    /// every head of its replica still names what it named when the batch was made. A batch
    /// holding a head or an unknown frame is refused whole (batches before it stay done).
    /// Returns how many frames were forgotten.
    pub fn forget_frames(&self, ids: &[Hash]) -> Result<u64, ForgetError> {
        let mut forgotten = 0;
        for chunk in ids.chunks(FORGET_BATCH_FRAMES) {
            let mut attempt = 0;
            loop {
                let batch = self.forget_batch(chunk)?;
                match self.kv().commit(batch) {
                    Ok(()) => break,
                    Err(KvError::Conflict { .. }) if attempt + 1 < FORGET_ATTEMPTS_MAX => {
                        attempt += 1;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            forgotten += chunk.len() as u64;
        }
        Ok(forgotten)
    }

    fn forget_batch(&self, ids: &[Hash]) -> Result<WriteBatch, ForgetError> {
        let reader = self.reader()?;
        let mut batch = WriteBatch::new();
        let mut heads_checked: std::collections::HashSet<String> = Default::default();
        for id in ids {
            let key = keys::frame(id);
            let Some(value) = reader.get(&key)? else {
                return Err(ForgetError::UnknownFrame(id.to_hex()));
            };
            let frame = parse_frame(&key, &value)?;
            let heads = scan_prefix(reader.snapshot(), &keys::head_prefix(&frame.replica), 256)?;
            for (head_key, head_value) in &heads {
                let timeline =
                    String::from_utf8_lossy(&head_key[keys::head_prefix(&frame.replica).len()..])
                        .into_owned();
                if Hash::from_slice(head_value) == Some(frame.id) {
                    return Err(ForgetError::Head {
                        frame: frame.id.to_hex(),
                        replica: frame.replica.clone(),
                        timeline,
                    });
                }
                let time_key = keys::time(&frame.replica, &timeline, frame.time, &frame.id);
                if reader.get(&time_key)?.is_some() {
                    batch.delete(time_key)?;
                }
                if heads_checked.insert(String::from_utf8_lossy(head_key).into_owned()) {
                    batch.check(head_key.clone(), Some(head_value.clone()))?;
                }
            }
            batch.check(key.clone(), Some(value))?;
            batch.delete(key)?;
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::FrameDraft;
    use crate::store::WriteStats;
    use kairos_core::{Instant, ReplicaDefinition};

    fn frame(store: &Store, time: i64, parent: Option<Hash>) -> Hash {
        store
            .commit_frame(FrameDraft {
                replica: "web".into(),
                timeline: "main".into(),
                time: Instant(time),
                parent,
                root: Hash([time as u8; 32]),
                entries: 0,
                bytes: 0,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap()
            .id
    }

    #[test]
    fn frames_are_forgotten_with_their_time_keys_and_heads_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", dir.path().to_path_buf()))
            .unwrap();
        let first = frame(&store, 1, None);
        let second = frame(&store, 2, Some(first));
        let head = frame(&store, 3, Some(second));
        let refused = store.forget_frames(&[first, head]).unwrap_err();
        assert!(
            matches!(&refused, ForgetError::Head { timeline, .. } if timeline == "main"),
            "{refused}"
        );
        assert_eq!(
            store.history("web", "main").unwrap().len(),
            3,
            "nothing forgotten"
        );
        assert_eq!(store.forget_frames(&[first, second]).unwrap(), 2);
        let history = store.history("web", "main").unwrap();
        assert_eq!(history.iter().map(|f| f.id).collect::<Vec<_>>(), vec![head]);
        assert!(matches!(
            store.forget_frames(&[first]).unwrap_err(),
            ForgetError::UnknownFrame(_)
        ));
        let report = store.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .all(|problem| !problem.contains("names frame")),
            "{:?}",
            report.problems
        );
    }
}
