//! The audit log of a replica: typed events (what happened, on which timeline, by which
//! party), stored append-only and hash-chained. Entries are appended only by catalog
//! commands ([`crate::command`]), in the same batch as the change they record; the JSON
//! view of an entry is the wire format (`event` names the variant, `details` its fields).

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{CommitStatus, Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::kv::printable;
use crate::store::{Result, Store, StoreError};

/// Domain byte of audit entry hashes.
const AUDIT_DOMAIN: u8 = 0x41;

/// One event of a replica's history of changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "details", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A proposal was validated and stored.
    Proposal(ProposalEvent),
    /// A sandbox was made (and its check run).
    Sandbox(SandboxEvent),
    /// A commit started, was refused as a conflict, or finished.
    Commit(CommitEvent),
    /// A revert (any frame restored by hand, as a commit) finished.
    Revert(CommitEvent),
    /// The probes of a commit's watch window passed, or one failed.
    Probe(ProbeEvent),
    /// The last good frame was restored after a failure.
    Rollback(RollbackEvent),
    /// A commit a crash left in progress was found.
    Recovery(RecoveryEvent),
    /// A timeline was forked or deleted.
    Timeline(TimelineEvent),
    /// The predictor estimated a proposal's outcome.
    Prediction(PredictionEvent),
    /// A real outcome of a proposal was recorded as a labelled example.
    Outcome(OutcomeEvent),
    /// A predictor model was trained and became the serving one.
    Model(ModelEvent),
    /// Frames were forgotten by retention rules.
    Forget(ForgetEvent),
    /// A party approved or rejected a proposal.
    Review(ReviewEvent),
    /// Open proposals on one timeline interfere: they touch the same entries, or their
    /// combined sandbox fails its check while each passes alone.
    Interference(InterferenceEvent),
    /// A pipeline gate (`kairos gate`) decided on a proposal: passed, or refused and why.
    Gate(GateEvent),
}

impl AuditEvent {
    /// The event's name, as the JSON view's `event` field says it.
    pub fn name(&self) -> &'static str {
        match self {
            AuditEvent::Proposal(_) => "proposal",
            AuditEvent::Sandbox(_) => "sandbox",
            AuditEvent::Commit(_) => "commit",
            AuditEvent::Revert(_) => "revert",
            AuditEvent::Probe(_) => "probe",
            AuditEvent::Rollback(_) => "rollback",
            AuditEvent::Recovery(_) => "recovery",
            AuditEvent::Timeline(_) => "timeline",
            AuditEvent::Prediction(_) => "prediction",
            AuditEvent::Outcome(_) => "outcome",
            AuditEvent::Model(_) => "model",
            AuditEvent::Forget(_) => "forget",
            AuditEvent::Review(_) => "review",
            AuditEvent::Interference(_) => "interference",
            AuditEvent::Gate(_) => "gate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalEvent {
    pub proposal: Hash,
    pub title: String,
    pub timeline: String,
    pub base: Hash,
    /// Each op, described in one line.
    pub ops: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxEvent {
    pub proposal: Hash,
    pub base: Hash,
    /// The sandbox state's root object.
    pub state: Hash,
    pub ops: Vec<usize>,
    pub files_changed: usize,
    pub check: Option<CheckSummary>,
}

/// The outcome of a sandbox's check, as the log keeps it (the output is in the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSummary {
    pub exit_code: Option<i32>,
    pub passed: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
    pub peak_memory_bytes: u64,
}

/// `commit` or `revert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitKind {
    Commit,
    Revert,
}

impl CommitKind {
    pub fn name(self) -> &'static str {
        match self {
            CommitKind::Commit => "commit",
            CommitKind::Revert => "revert",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitEvent {
    pub commit: Hash,
    pub kind: CommitKind,
    pub status: CommitStatus,
    pub timeline: String,
    pub proposal: Option<Hash>,
    pub ops: Vec<usize>,
    pub base: Hash,
    pub applied_on: Hash,
    pub rebased: bool,
    pub frame: Option<Hash>,
    pub last_good: Option<Hash>,
    pub conflicts: Vec<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeEvent {
    pub commit: Hash,
    pub passed: bool,
    /// Probe rounds run over the window (when it passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// The probe that failed, and what it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackEvent {
    pub commit: Hash,
    /// The last good frame restored.
    pub to: Hash,
    /// The frame captured after restoring.
    pub frame: Hash,
    pub evidence: String,
    pub restored_ms: u64,
    /// Whether `after_commit` passed after the restore (absent when none is declared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_commit_passed: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryEvent {
    pub commit: Hash,
    /// Where the commit stood when the crash stopped it.
    pub status: CommitStatus,
    /// The frame it is rolled back to.
    pub to: Hash,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionEvent {
    pub proposal: Hash,
    pub ops: Vec<usize>,
    /// An entry's hash is over its stored JSON, so fractions must read back exactly
    /// (serde_json's `float_roundtrip`).
    pub p_error: f64,
    pub confidence: f64,
    pub abstain: bool,
    /// The model's id; absent when there was none (the prediction abstains).
    pub model: Option<String>,
}

/// What a gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateVerdict {
    Pass,
    Refuse,
}

impl GateVerdict {
    pub fn name(self) -> &'static str {
        match self {
            GateVerdict::Pass => "pass",
            GateVerdict::Refuse => "refuse",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateEvent {
    pub proposal: Hash,
    pub ops: Vec<usize>,
    pub verdict: GateVerdict,
    /// Why it was refused, one line per failed criterion (empty when it passed).
    pub reasons: Vec<String>,
    /// The thresholds the gate applied (fractions read back exactly, as a prediction's).
    pub max_risk: f64,
    pub min_confidence: f64,
    pub run_check: bool,
    /// Whether the gate was to commit a passing proposal, and the commit it made.
    pub commit_asked: bool,
    pub commit: Option<Hash>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub proposal: Hash,
    pub ops: Vec<usize>,
    /// `sandbox` (a check ran) or `commit` (a commit ended).
    pub source: String,
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEvent {
    pub version: u32,
    pub model: String,
    pub examples: usize,
    pub held_out_auc: Option<f64>,
}

/// What a `forget` removed: the rules per timeline and how much went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetEvent {
    pub rules: Vec<crate::retention::TimelineRule>,
    /// Time index entries and frame records removed.
    pub entries_removed: u64,
    pub frames_removed: u64,
    /// The oldest and newest instants of the entries removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<Instant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewEvent {
    pub proposal: Hash,
    pub verdict: kairos_core::Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The proposal's author (the party the review is addressed to).
    pub author: String,
}

/// A proposal in an interference, with its author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterferingProposal {
    pub proposal: Hash,
    pub author: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterferenceEvent {
    /// Every proposal involved (the newest first), each told through its record.
    pub proposals: Vec<InterferingProposal>,
    #[serde(flatten)]
    pub finding: InterferenceFinding,
}

/// What interferes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InterferenceFinding {
    /// The proposals touch the same entries: file paths (one inside the other counts) and
    /// config keys (`file:key`).
    Overlap { entries: Vec<String> },
    /// Each proposal's check passes alone; applied together (the ops of each, in the
    /// order listed, on the first one's base) the check fails, or the ops do not apply.
    CombinedCheck {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSummary>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        problem: Option<String>,
    },
}

impl InterferenceFinding {
    pub fn kind(&self) -> &'static str {
        match self {
            InterferenceFinding::Overlap { .. } => "overlap",
            InterferenceFinding::CombinedCheck { .. } => "combined_check",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TimelineEvent {
    Fork { fork: String, at: Hash },
    Delete { delete: String },
}

fn main_timeline() -> String {
    MAIN_TIMELINE.to_string()
}

/// One entry of a replica's audit log. `hash` covers every other field, `prev` is the
/// previous entry's hash: changing or removing an entry breaks the chain after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time: Instant,
    pub replica: String,
    /// The party that acted (`kairos` for the system itself, e.g. an automated rollback).
    pub party: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The timeline the event happened on.
    #[serde(default = "main_timeline")]
    pub timeline: String,
    pub prev: Hash,
    pub hash: Hash,
}

impl AuditEntry {
    /// The hash this entry must carry: of its JSON view with `hash` zeroed.
    pub fn compute_hash(&self) -> Hash {
        match serde_json::to_value(self) {
            Ok(value) => hash_of_value(value),
            Err(_) => Hash::default(),
        }
    }
}

/// The hash of a stored entry's JSON, with its `hash` field zeroed. Checking the stored
/// JSON (not a re-encoding of the typed entry) keeps entries written by earlier versions
/// verifiable.
fn hash_of_value(mut value: serde_json::Value) -> Hash {
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "hash".into(),
            serde_json::Value::String(Hash::default().to_hex()),
        );
    }
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    Hash::of(AUDIT_DOMAIN, &bytes)
}

/// The audit head value: the last entry's sequence number and hash.
pub(crate) fn head_value(seq: u64, hash: &Hash) -> Vec<u8> {
    [&seq.to_be_bytes()[..], hash.as_bytes()].concat()
}

/// The next entry's sequence number and link, from the head value.
pub(crate) fn next_link(head_key: &[u8], head: Option<&[u8]>) -> Result<(u64, Hash)> {
    match head {
        None => Ok((0, Hash::default())),
        Some(value) if value.len() == 40 => {
            let mut seq = [0; 8];
            seq.copy_from_slice(&value[..8]);
            let prev = Hash::from_slice(&value[8..]).unwrap_or_default();
            Ok((u64::from_be_bytes(seq) + 1, prev))
        }
        Some(_) => Err(StoreError::BadRecord {
            what: "audit head",
            key: printable(head_key),
            problem: "is not 40 bytes".into(),
        }),
    }
}

pub(crate) fn head_key(replica: &str) -> Vec<u8> {
    [keys::AUDIT_HEAD, replica.as_bytes()].concat()
}

/// The audit log of a replica, with the result of checking its chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    /// Whether every entry's hash and link is intact.
    pub intact: bool,
    /// What is wrong with the chain, naming the first entry that does not match.
    pub problem: Option<String>,
}

impl Store {
    /// The replica's audit log, oldest first, with its chain checked.
    pub fn audit_log(&self, replica: &str) -> Result<AuditLog> {
        let reader = self.reader()?;
        let mut entries = Vec::new();
        let mut problem = None;
        let mut prev = Hash::default();
        let mut last = None;
        for (index, (key, value)) in reader
            .scan_prefix(&keys::replica_prefix(keys::AUDIT, replica))?
            .into_iter()
            .enumerate()
        {
            let parsed = serde_json::from_slice::<serde_json::Value>(&value)
                .map_err(|error| error.to_string())
                .and_then(|raw| {
                    let entry = AuditEntry::deserialize(&raw).map_err(|e| e.to_string())?;
                    Ok((raw, entry))
                });
            let (raw, entry) = match parsed {
                Ok(parsed) => parsed,
                Err(error) => {
                    problem.get_or_insert(format!(
                        "entry {index} ({}) is not an audit entry: {error}",
                        printable(&key)
                    ));
                    continue;
                }
            };
            if problem.is_none() {
                if entry.seq != index as u64 || keys::audit(replica, entry.seq) != key {
                    problem = Some(format!(
                        "entry {index} is out of sequence (says {})",
                        entry.seq
                    ));
                } else if entry.prev != prev {
                    problem = Some(format!(
                        "entry {} does not link to the entry before it (an entry was removed or replaced)",
                        entry.seq
                    ));
                } else if hash_of_value(raw) != entry.hash {
                    problem = Some(format!(
                        "entry {} does not match its hash (it was altered)",
                        entry.seq
                    ));
                }
            }
            prev = entry.hash;
            last = Some(head_value(entry.seq, &entry.hash));
            entries.push(entry);
        }
        if problem.is_none() && reader.get(&head_key(replica))? != last {
            problem = Some(
                "the log's head does not match its last entry (entries were removed at the end)"
                    .into(),
            );
        }
        Ok(AuditLog {
            entries,
            intact: problem.is_none(),
            problem,
        })
    }
}
