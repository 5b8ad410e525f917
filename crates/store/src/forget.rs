//! Forgetting chosen frames: a forgotten frame's record and its time index entries (on its
//! timeline and on every fork that starts at it) are removed by a `ForgetFrames` catalog
//! command (guarded and audited like a retention `forget`); its objects stay until garbage
//! collection finds nothing else needs them. A frame something still needs (a head, a
//! proposal's base, the last good frame, a commit in progress) is never forgotten.

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Hash, Instant};

use crate::catalog::{CatalogError, parse_frame};
use crate::command::{Change, Command, SYSTEM_PARTY};
use crate::keys;
use crate::kv::{KvError, scan_prefix};
use crate::store::{Store, StoreError};

/// Frames forgotten per batch.
pub const FORGET_BATCH_FRAMES: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
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
    /// Forgets exactly the frames `ids` (their records and time index entries) through
    /// `ForgetFrames` catalog commands of at most [`FORGET_BATCH_FRAMES`] frames per
    /// replica, each guarded and audited like a retention `forget`. A batch holding a head,
    /// another needed frame or an unknown frame is refused whole (batches before it stay
    /// done). Returns how many frames were forgotten. Retention policies go through
    /// [`Store::forget`]; this serves tools and tests that pick frames themselves.
    pub fn forget_frames(&self, ids: &[Hash]) -> Result<u64, ForgetError> {
        let mut by_replica: std::collections::BTreeMap<String, Vec<Hash>> = Default::default();
        {
            let reader = self.reader()?;
            for id in ids {
                let key = keys::frame(id);
                let Some(value) = reader.get(&key)? else {
                    return Err(ForgetError::UnknownFrame(id.to_hex()));
                };
                let frame = parse_frame(&key, &value)?;
                let prefix = keys::head_prefix(&frame.replica);
                for (head_key, head_value) in scan_prefix(reader.snapshot(), &prefix, 256)? {
                    if Hash::from_slice(&head_value) == Some(frame.id) {
                        return Err(ForgetError::Head {
                            frame: frame.id.to_hex(),
                            replica: frame.replica.clone(),
                            timeline: String::from_utf8_lossy(&head_key[prefix.len()..])
                                .into_owned(),
                        });
                    }
                }
                by_replica.entry(frame.replica).or_default().push(*id);
            }
        }
        let mut forgotten = 0;
        for (replica, frames) in by_replica {
            for chunk in frames.chunks(FORGET_BATCH_FRAMES) {
                let applied = self.submit(&Command::new(
                    Instant::now(),
                    &replica,
                    MAIN_TIMELINE,
                    SYSTEM_PARTY,
                    Change::ForgetFrames {
                        frames: chunk.to_vec(),
                    },
                ))?;
                forgotten += applied
                    .forgotten
                    .map_or(0, |plan| plan.frames_removed.len() as u64);
            }
        }
        Ok(forgotten)
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
