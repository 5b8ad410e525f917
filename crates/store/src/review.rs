//! Collaboration on proposals: each proposal's reviews (every party's latest verdict),
//! the interference found between it and other open proposals, and its last sandbox
//! check, kept in one small record per proposal (`w/<replica>\0<proposal>`) so that a
//! commit reads — and guards — everything its policy decides on with one key. A
//! proposal committed once is marked (`W/<replica>\0<proposal>` = the commit's id) in
//! the batch that records the commit; a review of it is refused from then on.
//!
//! Every write is a catalog command ([`crate::command`]): `Review`, `NoteInterference`,
//! and the sandbox record's `PutRecord` (which notes the check).

use kairos_core::{Hash, Instant, Verdict};
use serde::{Deserialize, Serialize};

use crate::audit::InterferenceEvent;
use crate::keys;
use crate::kv::{KvSnapshot, WriteBatch, printable};
use crate::store::{Result, Store, StoreError};

/// Domain byte of a proposal state's digest.
const STATE_DOMAIN: u8 = 0x77;
/// Longest review comment, in bytes.
pub const REVIEW_COMMENT_BYTES_MAX: usize = 2_000;
/// Parties that may review one proposal.
pub const REVIEWS_PER_PROPOSAL_MAX: usize = 64;
/// Interference notes kept per proposal (the newest).
pub const INTERFERENCE_NOTES_MAX: usize = 32;

/// One party's verdict on a proposal (its latest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Review {
    pub party: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub time: Instant,
}

/// The last sandbox check run for a proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckNote {
    /// The ops the sandbox applied (1-based).
    pub ops: Vec<usize>,
    pub passed: bool,
    pub time: Instant,
}

/// Interference found with other proposals, as noted on a proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterferenceNote {
    pub time: Instant,
    #[serde(flatten)]
    pub event: InterferenceEvent,
}

/// A proposal's collaboration record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposalState {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reviews: Vec<Review>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interference: Vec<InterferenceNote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckNote>,
}

impl ProposalState {
    /// Every party's standing verdict.
    pub fn verdicts(&self) -> Vec<(String, Verdict)> {
        self.reviews
            .iter()
            .map(|review| (review.party.clone(), review.verdict))
            .collect()
    }
}

/// What a commit decided its policy on: the proposal's state record as it read it
/// (`None`: absent). The commit's batch is refused if the record changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewGuard {
    pub proposal: Hash,
    pub state: Option<Hash>,
}

pub fn state_key(replica: &str, proposal: &Hash) -> Vec<u8> {
    keys::replica_record(keys::PROPOSAL_STATE, replica, proposal.as_bytes())
}

pub fn committed_key(replica: &str, proposal: &Hash) -> Vec<u8> {
    keys::replica_record(keys::PROPOSAL_COMMITTED, replica, proposal.as_bytes())
}

/// The digest a [`ReviewGuard`] holds of a stored state record.
pub fn state_digest(value: &[u8]) -> Hash {
    Hash::of(STATE_DOMAIN, value)
}

fn parse_state(key: &[u8], value: &[u8]) -> Result<ProposalState> {
    serde_json::from_slice(value).map_err(|error| StoreError::BadRecord {
        what: "proposal state",
        key: printable(key),
        problem: error.to_string(),
    })
}

fn encode_state(key: &[u8], state: &ProposalState) -> Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|error| StoreError::BadRecord {
        what: "proposal state",
        key: printable(key),
        problem: error.to_string(),
    })
}

/// Reads a proposal's state record for a change, guards it in `batch`, lets `change`
/// edit it and writes it back.
pub(crate) fn edit_state(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    proposal: &Hash,
    change: impl FnOnce(&mut ProposalState),
) -> Result<()> {
    let key = state_key(replica, proposal);
    let value = view.get(&key)?;
    let mut state = match &value {
        Some(value) => parse_state(&key, value)?,
        None => ProposalState::default(),
    };
    batch.check(key.clone(), value)?;
    change(&mut state);
    let encoded = encode_state(&key, &state)?;
    batch.put(key, encoded)?;
    Ok(())
}

/// Adds or replaces `review` (one per party), keeping at most
/// [`REVIEWS_PER_PROPOSAL_MAX`] parties.
pub(crate) fn upsert_review(state: &mut ProposalState, review: &Review) -> bool {
    if let Some(existing) = state.reviews.iter_mut().find(|r| r.party == review.party) {
        *existing = review.clone();
        return true;
    }
    if state.reviews.len() >= REVIEWS_PER_PROPOSAL_MAX {
        return false;
    }
    state.reviews.push(review.clone());
    true
}

/// Adds an interference note unless the same finding is already noted; keeps the newest
/// [`INTERFERENCE_NOTES_MAX`].
pub(crate) fn add_interference(state: &mut ProposalState, note: &InterferenceNote) {
    if state.interference.iter().any(|n| n.event == note.event) {
        return;
    }
    state.interference.push(note.clone());
    let excess = state
        .interference
        .len()
        .saturating_sub(INTERFERENCE_NOTES_MAX);
    state.interference.drain(..excess);
}

/// The check outcome a sandbox record carries, if its check ran.
pub(crate) fn check_of_sandbox(
    record: &serde_json::Value,
    time: Instant,
) -> Option<(Hash, CheckNote)> {
    let proposal = record.get("proposal")?.as_str()?.parse().ok()?;
    let passed = record.get("check")?.get("passed")?.as_bool()?;
    let ops = record
        .get("ops")?
        .as_array()?
        .iter()
        .filter_map(|op| op.as_u64().and_then(|op| usize::try_from(op).ok()))
        .collect();
    Some((proposal, CheckNote { ops, passed, time }))
}

impl Store {
    /// A proposal's collaboration record (empty when none was written) and the guard a
    /// commit deciding on it carries.
    pub fn proposal_state(
        &self,
        replica: &str,
        proposal: &Hash,
    ) -> Result<(ProposalState, ReviewGuard)> {
        let key = state_key(replica, proposal);
        let value = self.reader()?.get(&key)?;
        let guard = ReviewGuard {
            proposal: *proposal,
            state: value.as_deref().map(state_digest),
        };
        let state = match value {
            Some(value) => parse_state(&key, &value)?,
            None => ProposalState::default(),
        };
        Ok((state, guard))
    }

    /// Every proposal state record of a replica, by proposal.
    pub fn proposal_states(&self, replica: &str) -> Result<Vec<(Hash, ProposalState)>> {
        let scan = keys::replica_prefix(keys::PROPOSAL_STATE, replica);
        self.reader()?
            .scan_prefix(&scan)?
            .into_iter()
            .filter_map(|(key, value)| {
                let id = Hash::from_slice(&key[scan.len()..])?;
                Some(parse_state(&key, &value).map(|state| (id, state)))
            })
            .collect()
    }

    /// The proposals of a replica committed at least once, with the commit.
    pub fn committed_proposals(
        &self,
        replica: &str,
    ) -> Result<std::collections::BTreeMap<Hash, Hash>> {
        let scan = keys::replica_prefix(keys::PROPOSAL_COMMITTED, replica);
        Ok(self
            .reader()?
            .scan_prefix(&scan)?
            .into_iter()
            .filter_map(|(key, value)| {
                Some((
                    Hash::from_slice(&key[scan.len()..])?,
                    Hash::from_slice(&value)?,
                ))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, InterferenceFinding, InterferingProposal};
    use crate::catalog::CatalogError;
    use crate::command::{Change, Command, RecordBody, RecordFamily};
    use kairos_core::ReplicaDefinition;

    fn store_with_proposal() -> (tempfile::TempDir, Store, Hash) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        let proposal = Hash([7; 32]);
        store
            .submit(&Command::new(
                Instant(1),
                "web",
                "main",
                "team-a",
                Change::PutRecord {
                    family: RecordFamily::Proposal,
                    id: proposal,
                    record: RecordBody(serde_json::json!({"title": "t"})),
                },
            ))
            .unwrap();
        (dir, store, proposal)
    }

    fn review(proposal: Hash, party: &str, verdict: Verdict) -> Command {
        Command::new(
            Instant(2),
            "web",
            "main",
            party,
            Change::Review {
                proposal,
                review: Review {
                    party: party.into(),
                    verdict,
                    comment: None,
                    time: Instant(2),
                },
            },
        )
    }

    #[test]
    fn reviews_replace_a_partys_earlier_one_and_unknown_or_committed_proposals_refuse_them() {
        let (_dir, store, proposal) = store_with_proposal();
        store
            .submit(&review(proposal, "team-b", Verdict::Reject))
            .unwrap();
        store
            .submit(&review(proposal, "team-b", Verdict::Approve))
            .unwrap();
        let (state, _) = store.proposal_state("web", &proposal).unwrap();
        assert_eq!(state.verdicts(), vec![("team-b".into(), Verdict::Approve)]);
        assert!(matches!(
            store.submit(&review(Hash([9; 32]), "team-b", Verdict::Approve)),
            Err(CatalogError::UnknownProposal { .. })
        ));
        let commit = Hash([3; 32]);
        store
            .submit(&Command::new(
                Instant(3),
                "web",
                "main",
                "lead",
                Change::RecordCommit {
                    commit,
                    record: RecordBody(serde_json::json!({
                        "status": "committed", "proposal": proposal.to_hex()
                    })),
                    require_idle: false,
                },
            ))
            .unwrap();
        assert_eq!(
            store.committed_proposals("web").unwrap().get(&proposal),
            Some(&commit)
        );
        assert!(matches!(
            store.submit(&review(proposal, "lead", Verdict::Reject)),
            Err(CatalogError::ProposalCommitted { .. })
        ));
    }

    #[test]
    fn a_command_guarded_by_reviews_is_refused_when_a_review_landed_meanwhile() {
        let (_dir, store, proposal) = store_with_proposal();
        let (_, guard) = store.proposal_state("web", &proposal).unwrap();
        let note = |guard| {
            Command::new(
                Instant(4),
                "web",
                "main",
                "lead",
                Change::NoteInterference {
                    note: InterferenceNote {
                        time: Instant(4),
                        event: InterferenceEvent {
                            proposals: vec![InterferingProposal {
                                proposal,
                                author: "team-a".into(),
                            }],
                            finding: InterferenceFinding::Overlap {
                                entries: vec!["app.conf:port".into()],
                            },
                        },
                    },
                },
            )
            .with_reviews_seen(Some(guard))
        };
        store
            .submit(&review(proposal, "team-b", Verdict::Reject))
            .unwrap();
        assert!(matches!(
            store.submit(&note(guard)),
            Err(CatalogError::ReviewsChanged { .. })
        ));
        let (state, fresh) = store.proposal_state("web", &proposal).unwrap();
        assert!(state.interference.is_empty(), "nothing was written");
        store.submit(&note(fresh)).unwrap();
        // The same finding twice is noted once.
        let (_, fresh) = store.proposal_state("web", &proposal).unwrap();
        store.submit(&note(fresh)).unwrap();
        let (state, _) = store.proposal_state("web", &proposal).unwrap();
        assert_eq!(state.interference.len(), 1);
        let _ = AuditEvent::Interference(state.interference[0].event.clone());
    }
}
