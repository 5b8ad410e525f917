//! The change records beside the catalog, read side: forks of timelines, proposal,
//! sandbox and commit records, the last good frame and the pending commit of each
//! replica. Every write to them is a catalog command ([`crate::command`]).

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogError, FrameRecord};
use crate::command::{RecordFamily, good_key, pending_key};
use crate::keys;
use crate::kv::printable;
use crate::store::{Result, Store, StoreError};

/// Where a fork timeline starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRecord {
    pub replica: String,
    pub timeline: String,
    /// The frame the fork starts from (on any timeline).
    pub base: Hash,
    pub created: Instant,
}

/// A timeline and its head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineInfo {
    pub name: String,
    pub head: FrameRecord,
    /// For forks: the frame the fork started from.
    pub fork: Option<ForkRecord>,
}

fn bad_record(what: &'static str, key: &[u8], problem: impl ToString) -> StoreError {
    StoreError::BadRecord {
        what,
        key: printable(key),
        problem: problem.to_string(),
    }
}

impl Store {
    /// Every timeline of a replica with its head (and fork point), `main` first.
    pub fn timeline_infos(&self, replica: &str) -> Result<Vec<TimelineInfo>, CatalogError> {
        self.replica(replica)?;
        let mut infos = Vec::new();
        for name in self.timelines(replica)? {
            let Some(head) = self.head(replica, &name)? else {
                continue;
            };
            let fork = self.fork(replica, &name)?;
            infos.push(TimelineInfo { name, head, fork });
        }
        infos.sort_by_key(|info| (info.name != MAIN_TIMELINE, info.name.clone()));
        Ok(infos)
    }

    pub fn fork(&self, replica: &str, name: &str) -> Result<Option<ForkRecord>> {
        let key = keys::replica_record(keys::FORK, replica, name.as_bytes());
        match self.reader()?.get(&key)? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|e| bad_record("fork", &key, e)),
        }
    }

    pub fn record<T: serde::de::DeserializeOwned>(
        &self,
        family: RecordFamily,
        replica: &str,
        id: &Hash,
    ) -> Result<Option<T>> {
        let key = keys::replica_record(family.prefix(), replica, id.as_bytes());
        match self.reader()?.get(&key)? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|e| bad_record("record", &key, e)),
        }
    }

    /// Every record of a family of `replica`, in id order. A record that does not parse
    /// as `T` is an error naming its key.
    pub fn records<T: serde::de::DeserializeOwned>(
        &self,
        family: RecordFamily,
        replica: &str,
    ) -> Result<Vec<(Hash, T)>> {
        let scan = keys::replica_prefix(family.prefix(), replica);
        self.reader()?
            .scan_prefix(&scan)?
            .into_iter()
            .filter_map(|(key, value)| {
                let id = Hash::from_slice(&key[scan.len()..])?;
                Some(
                    serde_json::from_slice(&value)
                        .map(|record| (id, record))
                        .map_err(|e| bad_record("record", &key, e)),
                )
            })
            .collect()
    }

    /// Ids of a family's records of `replica` that start with the hex `prefix`.
    pub fn record_ids(
        &self,
        family: RecordFamily,
        replica: &str,
        prefix: &str,
    ) -> Result<Vec<Hash>> {
        let scan = keys::replica_prefix(family.prefix(), replica);
        Ok(self
            .reader()?
            .scan_prefix(&scan)?
            .into_iter()
            .filter_map(|(key, _)| Hash::from_slice(&key[scan.len()..]))
            .filter(|id| id.to_hex().starts_with(prefix))
            .collect())
    }

    /// The raw pending-commit marker of a replica: the id of the commit in progress.
    pub fn pending_marker(&self, replica: &str) -> Result<Option<Vec<u8>>> {
        self.reader()?.get(&pending_key(replica))
    }

    /// Every party, by name.
    pub fn parties(&self) -> Result<Vec<kairos_core::PartyRecord>> {
        self.reader()?
            .scan_prefix(keys::PARTY)?
            .iter()
            .map(|(key, value)| {
                serde_json::from_slice(value).map_err(|e| bad_record("party", key, e))
            })
            .collect()
    }

    /// Whether any party exists (then every API request needs a token).
    pub fn has_parties(&self) -> Result<bool> {
        let reader = self.reader()?;
        Ok(!crate::kv::scan_prefix(reader.snapshot(), keys::PARTY, 1)?.is_empty())
    }

    /// The party whose token hashes to `token_hash`: one key lookup by the hash, so no
    /// secret is ever compared.
    pub fn party_by_token(&self, token_hash: &Hash) -> Result<Option<kairos_core::PartyRecord>> {
        let reader = self.reader()?;
        let Some(name) = reader.get(&keys::party_token(token_hash))? else {
            return Ok(None);
        };
        let key = keys::party(&String::from_utf8_lossy(&name));
        match reader.get(&key)? {
            None => Ok(None),
            Some(value) => serde_json::from_slice(&value)
                .map(Some)
                .map_err(|e| bad_record("party", &key, e)),
        }
    }

    /// The last frame known good (its probes passed), if any.
    pub fn last_good(&self, replica: &str) -> Result<Option<Hash>> {
        Ok(self
            .reader()?
            .get(&good_key(replica))?
            .and_then(|value| Hash::from_slice(&value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, TimelineEvent};
    use crate::catalog::FrameDraft;
    use crate::command::{Change, Command};
    use crate::kv::WriteBatch;
    use crate::store::WriteStats;
    use kairos_core::{ReplicaDefinition, TimelineSpec};

    fn store_with_frame() -> (tempfile::TempDir, Store, FrameRecord) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        let frame = store
            .commit_frame(FrameDraft {
                replica: "web".into(),
                timeline: "main".into(),
                time: Instant(100),
                parent: None,
                root: Hash([1; 32]),
                entries: 0,
                bytes: 0,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap();
        (dir, store, frame)
    }

    fn fork(timeline: &str, base: Hash, time: i64) -> Command {
        Command::new(
            Instant(time),
            "web",
            timeline,
            "ops",
            Change::ForkTimeline { base },
        )
        .with_audit(AuditEvent::Timeline(TimelineEvent::Fork {
            fork: timeline.into(),
            at: base,
        }))
    }

    fn delete(timeline: &str) -> Command {
        Command::new(Instant(400), "web", timeline, "ops", Change::DeleteTimeline).with_audit(
            AuditEvent::Timeline(TimelineEvent::Delete {
                delete: timeline.into(),
            }),
        )
    }

    #[test]
    fn forks_are_pointers_listed_resolved_and_deleted() {
        let (_dir, store, frame) = store_with_frame();
        store.submit(&fork("try", frame.id, 200)).unwrap();
        assert!(matches!(
            store.submit(&fork("try", frame.id, 300)),
            Err(CatalogError::TimelineExists { .. })
        ));
        assert!(matches!(
            store.submit(&fork("main", frame.id, 300)),
            Err(CatalogError::MainTimeline { .. })
        ));
        let spec = TimelineSpec::parse("try@latest").unwrap();
        assert_eq!(store.resolve("web", &spec, Instant(1000)).unwrap(), frame);
        let infos = store.timeline_infos("web").unwrap();
        assert_eq!(
            infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["main", "try"]
        );
        assert_eq!(infos[1].fork.as_ref().unwrap().base, frame.id);
        store.submit(&delete("try")).unwrap();
        assert!(matches!(
            store.submit(&delete("try")),
            Err(CatalogError::UnknownTimeline { .. })
        ));
        assert!(store.resolve("web", &spec, Instant(1000)).is_err());
        assert_eq!(store.frame(&frame.id).unwrap(), frame);
        let log = store.audit_log("web").unwrap();
        assert!(log.intact, "{:?}", log.problem);
        assert_eq!(log.entries.len(), 2, "a refused command logs nothing");
        assert!(log.entries.iter().all(|entry| entry.timeline == "try"));
    }

    #[test]
    fn audit_log_is_chained_and_tampering_is_found() {
        let (_dir, store, frame) = store_with_frame();
        for index in 0..3 {
            store
                .submit(&fork(&format!("t{index}"), frame.id, index))
                .unwrap();
        }
        let log = store.audit_log("web").unwrap();
        assert!(log.intact, "{:?}", log.problem);
        assert_eq!(log.entries.len(), 3);
        assert_eq!(log.entries[2].prev, log.entries[1].hash);
        let json = serde_json::to_value(&log.entries[0]).unwrap();
        assert_eq!(json["event"], "timeline");
        assert_eq!(json["details"]["fork"], "t0");

        let mut altered = log.entries[1].clone();
        altered.party = "mallory".into();
        let mut batch = WriteBatch::new();
        batch
            .put(keys::audit("web", 1), serde_json::to_vec(&altered).unwrap())
            .unwrap();
        store.kv().commit(batch).unwrap();
        let log = store.audit_log("web").unwrap();
        assert!(!log.intact);
        assert!(
            log.problem
                .unwrap()
                .contains("entry 1 does not match its hash")
        );

        let mut batch = WriteBatch::new();
        batch.delete(keys::audit("web", 1)).unwrap();
        store.kv().commit(batch).unwrap();
        let log = store.audit_log("web").unwrap();
        assert!(log.problem.unwrap().contains("out of sequence"));
    }

    #[test]
    fn predictor_events_with_fractions_keep_the_chain_intact() {
        use crate::audit::{ModelEvent, OutcomeEvent, PredictionEvent};
        let (_dir, store, frame) = store_with_frame();
        // Fractions as predictions give them (f32 widened): their shortest forms parse
        // back exactly only with serde_json's `float_roundtrip`, and the hash is over
        // the stored JSON.
        let mut events: Vec<AuditEvent> = (1..200u16)
            .map(|k| {
                AuditEvent::Prediction(PredictionEvent {
                    proposal: frame.id,
                    ops: vec![1, 2],
                    p_error: f64::from(f32::from(k) / 997.0),
                    confidence: f64::from(k) / 7919.0,
                    abstain: false,
                    model: Some("5e0c".into()),
                })
            })
            .collect();
        events.extend([
            AuditEvent::Outcome(OutcomeEvent {
                proposal: frame.id,
                ops: vec![1],
                source: "sandbox".into(),
                failed: true,
            }),
            AuditEvent::Model(ModelEvent {
                version: 1,
                model: "5e0c".into(),
                examples: 200,
                held_out_auc: Some(0.9731),
            }),
        ]);
        for event in events {
            store
                .submit(
                    &Command::new(Instant(500), "web", "main", "ops", Change::Event)
                        .with_audit(event),
                )
                .unwrap();
        }
        let log = store.audit_log("web").unwrap();
        assert!(log.intact, "{:?}", log.problem);
        assert_eq!(log.entries.len(), 201);
    }
}
