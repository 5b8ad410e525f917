//! The catalog's one write path. Everything that changes the catalog — a replica
//! registered, a frame appended, a timeline forked or deleted, a proposal or sandbox
//! stored, a commit begun, advanced or finished, the last good frame moved — is one typed,
//! versioned [`Command`]. [`apply`] turns a command and a read view of the catalog into
//! one write batch guarded by optimistic checks (a pure function: no clock, no
//! randomness, no IO but reads of the view); [`Store::submit`] commits that batch and, when
//! a concurrent writer moved a guarded key, re-applies the command to the new view.
//!
//! Objects (chunks, tree nodes) are never in a command: they are written first,
//! content-addressed, and commands only refer to them. On one node commands are submitted
//! directly; in a cluster they are the entries of the replicated log, and their audit
//! events are what the bus publishes.

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{CommitStatus, Hash, Instant, PartyRecord, ReplicaDefinition};
use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditEntry, AuditEvent};
use crate::catalog::{CatalogError, FrameRecord, parse_frame};
use crate::keys;
use crate::kv::{KvError, KvSnapshot, WriteBatch, printable, scan_prefix};
use crate::store::{Store, StoreError};

/// Who acts when Kairos itself acts (captures, automated rollback, recovery).
pub const SYSTEM_PARTY: &str = "kairos";
/// The version of the command vocabulary this build writes and applies.
pub const COMMAND_VERSION: u16 = 1;
/// Times a command is re-applied when concurrent writers keep moving its guarded keys.
pub const SUBMIT_ATTEMPTS_MAX: u32 = 64;
/// Keys of one timeline's time index deleted by one command (a batch's limit).
pub const TIMELINE_DELETE_FRAMES_MAX: usize = 50_000;

/// One change to the catalog, with who made it, when, and the audit event it records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub version: u16,
    /// Stamped by the caller: applying a command reads no clock.
    pub time: Instant,
    pub replica: String,
    /// The timeline the change is on (`main` for replica-wide changes).
    pub timeline: String,
    pub party: String,
    pub change: Change,
    /// Appended to the replica's audit log, in order, in the same batch as the change.
    pub audit: Vec<AuditEvent>,
    /// The proposal state a commit's policy was decided on: the command is refused if
    /// a review (or any note) changed it since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviews_seen: Option<crate::review::ReviewGuard>,
}

/// Record families kept beside the catalog, each under its own key prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordFamily {
    Proposal,
    Sandbox,
    Commit,
    /// A prediction made for a proposal (kept to be scored when its outcome arrives).
    Prediction,
    /// A real outcome of a proposal (a sandbox check, a commit's end): a labelled example.
    Outcome,
}

impl RecordFamily {
    pub fn prefix(self) -> &'static [u8] {
        match self {
            RecordFamily::Proposal => keys::PROPOSAL,
            RecordFamily::Sandbox => keys::SANDBOX,
            RecordFamily::Commit => keys::COMMIT,
            RecordFamily::Prediction => keys::PREDICTION,
            RecordFamily::Outcome => keys::OUTCOME,
        }
    }
}

/// A record's JSON. Its type belongs to the crate that writes it (`ProposalSummary`,
/// `SandboxReport`, `CommitRecord`); the catalog keys, orders and guards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordBody(pub serde_json::Value);

impl RecordBody {
    pub fn of<T: Serialize>(record: &T) -> Result<RecordBody, StoreError> {
        serde_json::to_value(record)
            .map(RecordBody)
            .map_err(|error| StoreError::BadRecord {
                what: "record",
                key: "(new)".into(),
                problem: error.to_string(),
            })
    }
}

/// The fields of a new frame; its id and (strictly increasing) time are decided on apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameFields {
    pub time: Instant,
    /// The head the capture started from; the frame is refused if the head moved.
    pub parent: Option<Hash>,
    pub root: Hash,
    pub entries: u64,
    pub bytes: u64,
    pub objects_new: u64,
    pub bytes_new_stored: u64,
    pub torn: u64,
    pub unreadable: u64,
    pub capture_ms: u64,
}

/// What a command changes.
// One command per operation, moved once into `submit`: the size of the registration
// variant (a whole replica definition) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Registers a replica; with `replace`, a definition of the same name is replaced
    /// (configuration wins), otherwise it is refused.
    RegisterReplica {
        definition: ReplicaDefinition,
        replace: bool,
    },
    /// Stores a frame and moves the timeline's head to it, if the head is its parent.
    AppendFrame { frame: FrameFields },
    /// Starts a timeline at a frame: three keys, never a copy.
    ForkTimeline { base: Hash },
    /// Removes a fork: its head, time index and fork record (frames stay readable by id).
    DeleteTimeline,
    /// Stores a proposal's or a sandbox's record.
    PutRecord {
        family: RecordFamily,
        id: Hash,
        record: RecordBody,
    },
    /// Records a commit that never touches the live replica (a fork's commit, a conflict);
    /// with `require_idle`, refused as busy while another commit is in progress.
    RecordCommit {
        commit: Hash,
        record: RecordBody,
        #[serde(default)]
        require_idle: bool,
    },
    /// Starts a commit on the live replica: refused while another commit is in progress
    /// (the replica's pending marker), else records it and sets the marker, in one batch.
    BeginCommit {
        commit: Hash,
        status: CommitStatus,
        record: RecordBody,
        /// The frame that becomes the last good one as the commit begins (the head the
        /// commit starts from, when none was known good and its probes pass).
        last_good: Option<Hash>,
    },
    /// Advances the pending commit (its status and record); with a final status the
    /// pending marker is cleared and, with `last_good`, the last good frame moves.
    AdvanceCommit {
        commit: Hash,
        status: CommitStatus,
        record: RecordBody,
        last_good: Option<Hash>,
    },
    /// Clears a pending marker whose commit record was never written (a crash between
    /// the two is impossible now; stores written by earlier versions may hold one).
    ClearPending { marker: Vec<u8> },
    /// Only the audit event (e.g. a recovery found at start-up).
    Event,
    /// Adds a party (refused if one of that name exists). Not about a replica: the
    /// command's `replica` is empty.
    AddParty { party: PartyRecord },
    /// Removes a party and its token.
    RevokeParty { name: String },
    /// Forgets frames of the replica's timelines by retention rules: the plan
    /// ([`crate::retention::plan_forget`]) is made on apply from the view, guarded by the
    /// keys that protect a frame (last good, the pending commit) and by the audit head (a
    /// proposal, commit or fork recorded meanwhile makes it plan again); heads only move
    /// forward onto new frames, so a capture meanwhile does not. The command carries no
    /// audit event: apply records one with what went.
    Forget {
        rules: Vec<crate::retention::TimelineRule>,
        /// Also the frames on no timeline (a deleted fork's), unless something needs them.
        #[serde(default)]
        unlisted: bool,
    },
    /// A party's review of a proposal (it replaces that party's earlier one); refused for
    /// a proposal not stored or already committed.
    Review {
        proposal: Hash,
        review: crate::review::Review,
    },
    /// Interference between proposals, noted on each of them.
    NoteInterference {
        note: crate::review::InterferenceNote,
    },
    /// Forgets the named frames of the replica (their records and every time index entry
    /// naming them); refused whole if one is unknown, another replica's, or something
    /// still needs it (a head, a proposal's base, the last good frame, a commit in
    /// progress). Guarded and audited as `Forget`.
    ForgetFrames { frames: Vec<Hash> },
}

impl Change {
    /// Whether the change is about the node's parties rather than a replica.
    fn is_party_change(&self) -> bool {
        matches!(self, Change::AddParty { .. } | Change::RevokeParty { .. })
    }
}

/// What a submitted command did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    /// The frame an `AppendFrame` stored.
    pub frame: Option<FrameRecord>,
    /// What a `Forget` removed.
    pub forgotten: Option<crate::retention::ForgetPlan>,
    /// The audit entries appended.
    pub audit: Vec<AuditEntry>,
}

/// A command's batch and what it will have done once committed.
pub struct Planned {
    pub batch: WriteBatch,
    pub applied: Applied,
}

impl Command {
    pub fn new(
        time: Instant,
        replica: &str,
        timeline: &str,
        party: &str,
        change: Change,
    ) -> Command {
        Command {
            version: COMMAND_VERSION,
            time,
            replica: replica.to_string(),
            timeline: timeline.to_string(),
            party: party.to_string(),
            change,
            audit: Vec::new(),
            reviews_seen: None,
        }
    }

    /// Guards the command by the proposal state its policy decision read.
    pub fn with_reviews_seen(mut self, guard: Option<crate::review::ReviewGuard>) -> Command {
        self.reviews_seen = guard;
        self
    }

    pub fn with_audit(mut self, event: AuditEvent) -> Command {
        self.audit.push(event);
        self
    }
}

fn encode<T: Serialize>(what: &'static str, key: &[u8], value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::BadRecord {
        what,
        key: printable(key),
        problem: error.to_string(),
    })
}

/// The key of a replica's pending-commit marker and of its last good frame.
pub fn pending_key(replica: &str) -> Vec<u8> {
    [keys::PENDING, replica.as_bytes()].concat()
}

pub fn good_key(replica: &str) -> Vec<u8> {
    [keys::GOOD, replica.as_bytes()].concat()
}

/// Turns `command` into the batch that performs it on the catalog `view` shows, with
/// every read it depends on guarded by a check. Deterministic: the same command on the
/// same view gives the same batch.
pub fn apply(view: &dyn KvSnapshot, command: &Command) -> Result<Planned, CatalogError> {
    if command.version != COMMAND_VERSION {
        return Err(CatalogError::Version {
            version: command.version,
            supported: COMMAND_VERSION,
        });
    }
    let replica = command.replica.as_str();
    let mut batch = WriteBatch::new();
    let mut applied = Applied::default();
    let replica_key = keys::replica(replica);
    let registered = view.get(&replica_key)?;
    if command.change.is_party_change() {
        return apply_party_change(view, command);
    }
    if !matches!(command.change, Change::RegisterReplica { .. }) {
        // Every other change is about a registered replica (and stays so while it runs).
        if registered.is_none() {
            return Err(CatalogError::UnknownReplica(replica.to_string()));
        }
        batch.check(replica_key.clone(), registered.clone())?;
    }
    if let Some(guard) = &command.reviews_seen {
        guard_reviews(view, &mut batch, replica, guard)?;
    }
    match &command.change {
        Change::RegisterReplica {
            definition,
            replace,
        } => {
            if definition.name != replica {
                return Err(CatalogError::Invalid(format!(
                    "replica {replica:?}: the definition names replica {:?}",
                    definition.name
                )));
            }
            if !replace {
                if registered.is_some() {
                    return Err(CatalogError::ReplicaExists(replica.to_string()));
                }
                batch.check(replica_key.clone(), None)?;
            }
            batch.put(
                replica_key.clone(),
                encode("replica", &replica_key, definition)?,
            )?;
        }
        Change::AppendFrame { frame } => {
            applied.frame = Some(append_frame(view, &mut batch, command, frame)?);
        }
        Change::ForkTimeline { base } => fork_timeline(view, &mut batch, command, base)?,
        Change::DeleteTimeline => delete_timeline(view, &mut batch, command)?,
        Change::PutRecord { family, id, record } => {
            if *family == RecordFamily::Proposal {
                // A proposal's base must still be stored: a forget may have removed it
                // since the proposal resolved it.
                if let Some(base) = frame_field(record, "base") {
                    guard_frame(view, &mut batch, replica, &base)?;
                }
            }
            if *family == RecordFamily::Sandbox
                && let Some((proposal, check)) =
                    crate::review::check_of_sandbox(&record.0, command.time)
            {
                crate::review::edit_state(view, &mut batch, replica, &proposal, |state| {
                    state.check = Some(check);
                })?;
            }
            let key = keys::replica_record(family.prefix(), replica, id.as_bytes());
            batch.put(key.clone(), encode("record", &key, record)?)?;
        }
        Change::RecordCommit {
            commit,
            record,
            require_idle,
        } => {
            if *require_idle {
                let marker_key = pending_key(replica);
                if let Some(marker) = view.get(&marker_key)? {
                    return Err(busy(view, replica, &marker));
                }
                batch.check(marker_key, None)?;
            }
            let key = keys::replica_record(keys::COMMIT, replica, commit.as_bytes());
            batch.put(key.clone(), encode("commit", &key, record)?)?;
            mark_committed(&mut batch, replica, commit, record)?;
        }
        Change::Review { proposal, review } => {
            apply_review(view, &mut batch, replica, proposal, review)?;
        }
        Change::NoteInterference { note } => {
            for involved in &note.event.proposals {
                crate::review::edit_state(
                    view,
                    &mut batch,
                    replica,
                    &involved.proposal,
                    |state| {
                        crate::review::add_interference(state, note);
                    },
                )?;
            }
        }
        Change::BeginCommit {
            commit,
            status,
            record,
            last_good,
        } => begin_commit(
            view, &mut batch, replica, *commit, *status, record, last_good,
        )?,
        Change::AdvanceCommit {
            commit,
            status,
            record,
            last_good,
        } => advance_commit(
            view, &mut batch, replica, *commit, *status, record, last_good,
        )?,
        Change::ClearPending { marker } => {
            let marker_key = pending_key(replica);
            batch.check(marker_key.clone(), Some(marker.clone()))?;
            batch.delete(marker_key)?;
        }
        Change::AddParty { .. } | Change::RevokeParty { .. } => {
            unreachable_party_change()?;
        }
        Change::Forget { rules, unlisted } => {
            if !command.audit.is_empty() {
                return Err(CatalogError::Invalid(
                    "a forget command records its own audit event".into(),
                ));
            }
            let plan = crate::retention::plan_forget(
                view,
                replica,
                rules,
                *unlisted,
                crate::retention::FORGET_ENTRIES_PER_COMMAND_MAX,
            )?;
            if plan.entries.is_empty() && plan.frames_removed.is_empty() {
                applied.forgotten = Some(plan);
                return Ok(Planned {
                    batch: WriteBatch::new(),
                    applied,
                });
            }
            for (key, value) in &plan.guards {
                batch.check(key.clone(), value.clone())?;
            }
            let mut times = Vec::with_capacity(plan.entries.len());
            for key in &plan.entries {
                times.push(Instant::from_sortable_bytes(
                    key.get(key.len() - 40..key.len() - 32)
                        .and_then(|at| at.try_into().ok())
                        .unwrap_or_default(),
                ));
                batch.delete(key.clone())?;
            }
            for id in &plan.frames_removed {
                batch.delete(keys::frame(id))?;
            }
            let event = AuditEvent::Forget(crate::audit::ForgetEvent {
                rules: rules.clone(),
                entries_removed: plan.entries.len() as u64,
                frames_removed: plan.frames_removed.len() as u64,
                oldest: times.iter().min().copied(),
                newest: times.iter().max().copied(),
            });
            let recorded = Command {
                audit: vec![event],
                ..command.clone()
            };
            applied.audit = append_audit(view, &mut batch, &recorded)?;
            applied.forgotten = Some(plan);
            return Ok(Planned { batch, applied });
        }
        Change::ForgetFrames { frames } => {
            if !command.audit.is_empty() {
                return Err(CatalogError::Invalid(
                    "a forget command records its own audit event".into(),
                ));
            }
            let plan = crate::retention::plan_forget_frames(view, replica, frames)?;
            for (key, value) in &plan.guards {
                batch.check(key.clone(), value.clone())?;
            }
            for key in &plan.entries {
                batch.delete(key.clone())?;
            }
            for id in &plan.frames_removed {
                batch.delete(keys::frame(id))?;
            }
            let event = AuditEvent::Forget(crate::audit::ForgetEvent {
                rules: Vec::new(),
                entries_removed: plan.entries.len() as u64,
                frames_removed: plan.frames_removed.len() as u64,
                oldest: None,
                newest: None,
            });
            let recorded = Command {
                audit: vec![event],
                ..command.clone()
            };
            applied.audit = append_audit(view, &mut batch, &recorded)?;
            applied.forgotten = Some(plan);
            return Ok(Planned { batch, applied });
        }
        Change::Event => {
            if command.audit.is_empty() {
                return Err(CatalogError::Invalid(
                    "an event command carries no audit event".into(),
                ));
            }
        }
    }
    if !command.audit.is_empty() {
        applied.audit = append_audit(view, &mut batch, command)?;
    }
    Ok(Planned { batch, applied })
}

/// Refuses a commit whose proposal state moved since its policy was decided.
fn guard_reviews(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    guard: &crate::review::ReviewGuard,
) -> Result<(), CatalogError> {
    let key = crate::review::state_key(replica, &guard.proposal);
    let value = view.get(&key)?;
    if value.as_deref().map(crate::review::state_digest) != guard.state {
        return Err(CatalogError::ReviewsChanged {
            replica: replica.to_string(),
            proposal: guard.proposal.short(),
        });
    }
    batch.check(key, value)?;
    Ok(())
}

/// A review: the proposal must be stored and not yet committed (both guarded).
fn apply_review(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    proposal: &Hash,
    review: &crate::review::Review,
) -> Result<(), CatalogError> {
    let proposal_key = keys::replica_record(keys::PROPOSAL, replica, proposal.as_bytes());
    let Some(summary) = view.get(&proposal_key)? else {
        return Err(CatalogError::UnknownProposal {
            replica: replica.to_string(),
            proposal: proposal.short(),
        });
    };
    batch.check(proposal_key, Some(summary))?;
    let committed_key = crate::review::committed_key(replica, proposal);
    if let Some(commit) = view.get(&committed_key)? {
        return Err(CatalogError::ProposalCommitted {
            replica: replica.to_string(),
            proposal: proposal.short(),
            commit: Hash::from_slice(&commit)
                .map(|id| id.short())
                .unwrap_or_else(|| printable(&commit)),
        });
    }
    batch.check(committed_key, None)?;
    if review
        .comment
        .as_ref()
        .is_some_and(|comment| comment.len() > crate::review::REVIEW_COMMENT_BYTES_MAX)
    {
        return Err(CatalogError::Invalid(format!(
            "a review comment is at most {} bytes",
            crate::review::REVIEW_COMMENT_BYTES_MAX
        )));
    }
    let mut stored = true;
    crate::review::edit_state(view, batch, replica, proposal, |state| {
        stored = crate::review::upsert_review(state, review);
    })?;
    if !stored {
        return Err(CatalogError::Invalid(format!(
            "proposal {}: {} parties have reviewed it already, the most one proposal takes",
            proposal.short(),
            crate::review::REVIEWS_PER_PROPOSAL_MAX
        )));
    }
    Ok(())
}

/// A commit record whose status is `committed` marks its proposal committed.
fn mark_committed(
    batch: &mut WriteBatch,
    replica: &str,
    commit: &Hash,
    record: &RecordBody,
) -> Result<(), CatalogError> {
    let committed = record.0.get("status").and_then(|s| s.as_str()) == Some("committed");
    if let Some(proposal) = frame_field(record, "proposal").filter(|_| committed) {
        batch.put(
            crate::review::committed_key(replica, &proposal),
            commit.as_bytes().to_vec(),
        )?;
    }
    Ok(())
}

/// `main` follows the live replica: it is never forked onto or deleted.
fn refuse_main(replica: &str, timeline: &str) -> Result<(), CatalogError> {
    if timeline == MAIN_TIMELINE {
        return Err(CatalogError::MainTimeline {
            replica: replica.into(),
            timeline: timeline.into(),
        });
    }
    Ok(())
}

/// A fork: its head, its time index entry at the base, its fork record.
fn fork_timeline(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    command: &Command,
    base: &Hash,
) -> Result<(), CatalogError> {
    let (replica, timeline) = (command.replica.as_str(), command.timeline.as_str());
    refuse_main(replica, timeline)?;
    let head_key = keys::head(replica, timeline);
    if view.get(&head_key)?.is_some() {
        return Err(CatalogError::TimelineExists {
            replica: replica.into(),
            timeline: timeline.into(),
        });
    }
    let base_key = keys::frame(base);
    let base_frame = match view.get(&base_key)? {
        Some(value) => {
            // A forget that removes the base meanwhile makes the fork apply again.
            batch.check(base_key.clone(), Some(value.clone()))?;
            parse_frame(&base_key, &value)?
        }
        None => {
            return Err(CatalogError::NoSuchFrame {
                replica: replica.into(),
                prefix: base.to_hex(),
            });
        }
    };
    let record = crate::changes::ForkRecord {
        replica: replica.to_string(),
        timeline: timeline.to_string(),
        base: *base,
        created: command.time,
    };
    batch.check(head_key.clone(), None)?;
    batch.put(head_key, base.as_bytes().to_vec())?;
    batch.put(
        keys::time(replica, timeline, base_frame.time, base),
        Vec::new(),
    )?;
    let fork_key = keys::replica_record(keys::FORK, replica, timeline.as_bytes());
    batch.put(fork_key.clone(), encode("fork", &fork_key, &record)?)?;
    Ok(())
}

/// Removes a fork's head, time index and fork record.
fn delete_timeline(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    command: &Command,
) -> Result<(), CatalogError> {
    let (replica, timeline) = (command.replica.as_str(), command.timeline.as_str());
    refuse_main(replica, timeline)?;
    let head_key = keys::head(replica, timeline);
    let Some(head) = view.get(&head_key)? else {
        return Err(CatalogError::UnknownTimeline {
            replica: replica.into(),
            timeline: timeline.into(),
        });
    };
    batch.check(head_key.clone(), Some(head))?;
    batch.delete(head_key)?;
    let times = scan_prefix(
        view,
        &keys::time_prefix(replica, timeline),
        TIMELINE_DELETE_FRAMES_MAX,
    )?;
    for (key, _) in times {
        batch.delete(key)?;
    }
    batch.delete(keys::replica_record(
        keys::FORK,
        replica,
        timeline.as_bytes(),
    ))?;
    Ok(())
}

/// Records a commit and sets the pending marker, guarded by "no commit pending".
fn begin_commit(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    commit: Hash,
    status: CommitStatus,
    record: &RecordBody,
    last_good: &Option<Hash>,
) -> Result<(), CatalogError> {
    if status.is_final() {
        return Err(CatalogError::Invalid(format!(
            "commit {}: a commit begins in progress, not {status}",
            commit.short()
        )));
    }
    let marker_key = pending_key(replica);
    if let Some(marker) = view.get(&marker_key)? {
        return Err(busy(view, replica, &marker));
    }
    batch.check(marker_key.clone(), None)?;
    batch.put(marker_key, commit.as_bytes().to_vec())?;
    // The rollback target must still be stored: a forget may have removed the frame the
    // commit read as its head before the commit began.
    for frame in frame_field(record, "last_good").iter().chain(last_good) {
        guard_frame(view, batch, replica, frame)?;
    }
    let key = keys::replica_record(keys::COMMIT, replica, commit.as_bytes());
    batch.put(key.clone(), encode("commit", &key, record)?)?;
    if let Some(frame) = last_good {
        batch.put(good_key(replica), frame.as_bytes().to_vec())?;
    }
    Ok(())
}

/// The frame id a record's field names (64 hex digits), if it names one.
fn frame_field(record: &RecordBody, field: &str) -> Option<Hash> {
    record.0.get(field)?.as_str()?.parse().ok()
}

/// Refuses a command that names a frame no longer stored, and guards the frame's record
/// (a forget that removes it meanwhile makes the command apply again, and be refused).
fn guard_frame(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    frame: &Hash,
) -> Result<(), CatalogError> {
    let key = keys::frame(frame);
    let Some(value) = view.get(&key)? else {
        return Err(CatalogError::NoSuchFrame {
            replica: replica.to_string(),
            prefix: frame.to_hex(),
        });
    };
    batch.check(key, Some(value))?;
    Ok(())
}

/// Moves the pending commit on, guarded by "it is the pending one".
fn advance_commit(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    replica: &str,
    commit: Hash,
    status: CommitStatus,
    record: &RecordBody,
    last_good: &Option<Hash>,
) -> Result<(), CatalogError> {
    let marker_key = pending_key(replica);
    let marker = view.get(&marker_key)?;
    if marker.as_deref() != Some(commit.as_bytes().as_slice()) {
        return Err(CatalogError::NotPending {
            replica: replica.into(),
            commit: commit.short(),
        });
    }
    batch.check(marker_key.clone(), marker)?;
    if status.is_final() {
        batch.delete(marker_key)?;
    }
    let key = keys::replica_record(keys::COMMIT, replica, commit.as_bytes());
    batch.put(key.clone(), encode("commit", &key, record)?)?;
    mark_committed(batch, replica, &commit, record)?;
    if let Some(frame) = last_good {
        guard_frame(view, batch, replica, frame)?;
        batch.put(good_key(replica), frame.as_bytes().to_vec())?;
    }
    Ok(())
}

fn unreachable_party_change() -> Result<(), CatalogError> {
    Err(CatalogError::Invalid(
        "a party change is applied on its own".into(),
    ))
}

/// Adds or revokes a party: its record and the index from its token's hash.
fn apply_party_change(view: &dyn KvSnapshot, command: &Command) -> Result<Planned, CatalogError> {
    if !command.audit.is_empty() || !command.replica.is_empty() {
        return Err(CatalogError::Invalid(
            "a party change names no replica and carries no audit event".into(),
        ));
    }
    let mut batch = WriteBatch::new();
    match &command.change {
        Change::AddParty { party } => {
            if !kairos_core::replica::is_valid_replica_name(&party.name) {
                return Err(CatalogError::Invalid(format!(
                    "party name {:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64 characters",
                    party.name
                )));
            }
            let key = keys::party(&party.name);
            if view.get(&key)?.is_some() {
                return Err(CatalogError::PartyExists(party.name.clone()));
            }
            let token_key = keys::party_token(&party.token_hash);
            batch.check(key.clone(), None)?;
            batch.check(token_key.clone(), None)?;
            batch.put(key.clone(), encode("party", &key, party)?)?;
            batch.put(token_key, party.name.as_bytes().to_vec())?;
        }
        Change::RevokeParty { name } => {
            let key = keys::party(name);
            let Some(value) = view.get(&key)? else {
                return Err(CatalogError::UnknownParty(name.clone()));
            };
            let party: PartyRecord =
                serde_json::from_slice(&value).map_err(|error| StoreError::BadRecord {
                    what: "party",
                    key: printable(&key),
                    problem: error.to_string(),
                })?;
            batch.check(key.clone(), Some(value))?;
            batch.delete(key)?;
            batch.delete(keys::party_token(&party.token_hash))?;
        }
        _ => return Err(CatalogError::Invalid("not a party change".into())),
    }
    Ok(Planned {
        batch,
        applied: Applied::default(),
    })
}

/// The `busy` refusal, naming the commit in progress.
fn busy(view: &dyn KvSnapshot, replica: &str, marker: &[u8]) -> CatalogError {
    let record = Hash::from_slice(marker)
        .and_then(|id| {
            let key = keys::replica_record(keys::COMMIT, replica, id.as_bytes());
            view.get(&key).ok().flatten()
        })
        .and_then(|value| serde_json::from_slice::<serde_json::Value>(&value).ok());
    let field = |name: &str, default: &str| {
        record
            .as_ref()
            .and_then(|record| record.get(name).and_then(|s| s.as_str()).map(String::from))
            .unwrap_or_else(|| default.into())
    };
    CatalogError::Busy {
        kind: field("kind", "commit"),
        status: field("status", "starting"),
        replica: replica.to_string(),
        commit: Hash::from_slice(marker)
            .map(|id| id.short())
            .unwrap_or_else(|| printable(marker)),
    }
}

fn append_frame(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    command: &Command,
    fields: &FrameFields,
) -> Result<FrameRecord, CatalogError> {
    let head_key = keys::head(&command.replica, &command.timeline);
    let head = view.get(&head_key)?;
    let head_id = head.as_deref().and_then(Hash::from_slice);
    if head_id != fields.parent {
        return Err(CatalogError::HeadMoved {
            replica: command.replica.clone(),
            timeline: command.timeline.clone(),
        });
    }
    // Frame times strictly increase along a timeline, whatever the clock does.
    let mut time = fields.time;
    if let Some(parent) = &fields.parent {
        let parent_key = keys::frame(parent);
        let parent = match view.get(&parent_key)? {
            Some(value) => parse_frame(&parent_key, &value)?,
            None => {
                return Err(StoreError::BadRecord {
                    what: "timeline head",
                    key: printable(&head_key),
                    problem: format!("names frame {} which is not stored", parent.short()),
                }
                .into());
            }
        };
        if time <= parent.time {
            time = Instant(parent.time.0 + 1);
        }
    }
    let mut record = FrameRecord {
        id: Hash::default(),
        replica: command.replica.clone(),
        timeline: command.timeline.clone(),
        time,
        parent: fields.parent,
        root: fields.root,
        entries: fields.entries,
        bytes: fields.bytes,
        objects_new: fields.objects_new,
        bytes_new_stored: fields.bytes_new_stored,
        torn: fields.torn,
        unreadable: fields.unreadable,
        capture_ms: fields.capture_ms,
    };
    record.id = record.compute_id();
    let frame_key = keys::frame(&record.id);
    batch.check(head_key.clone(), head)?;
    batch.put(frame_key.clone(), encode("frame", &frame_key, &record)?)?;
    batch.put(
        keys::time(&record.replica, &record.timeline, record.time, &record.id),
        Vec::new(),
    )?;
    batch.put(head_key, record.id.as_bytes().to_vec())?;
    Ok(record)
}

fn append_audit(
    view: &dyn KvSnapshot,
    batch: &mut WriteBatch,
    command: &Command,
) -> Result<Vec<AuditEntry>, CatalogError> {
    let head_key = audit::head_key(&command.replica);
    let head = view.get(&head_key)?;
    let (mut seq, mut prev) = audit::next_link(&head_key, head.as_deref())?;
    batch.check(head_key.clone(), head)?;
    let mut entries = Vec::with_capacity(command.audit.len());
    for event in &command.audit {
        let mut entry = AuditEntry {
            seq,
            time: command.time,
            replica: command.replica.clone(),
            party: command.party.clone(),
            event: event.clone(),
            timeline: command.timeline.clone(),
            prev,
            hash: Hash::default(),
        };
        entry.hash = entry.compute_hash();
        let key = keys::audit(&command.replica, seq);
        batch.check(key.clone(), None)?;
        batch.put(key.clone(), encode("audit entry", &key, &entry)?)?;
        prev = entry.hash;
        seq += 1;
        entries.push(entry);
    }
    if let Some(last) = entries.last() {
        batch.put(head_key, audit::head_value(last.seq, &last.hash))?;
    }
    Ok(entries)
}

impl Store {
    /// Applies `command` to the catalog: the one entry point of every catalog write. A
    /// concurrent writer that moves a key the command read makes it re-apply on the new
    /// view, where its guards decide again (a second commit then finds the first pending).
    pub fn submit(&self, command: &Command) -> Result<Applied, CatalogError> {
        let log = self
            .command_log
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match log {
            Some(log) => {
                // The log outlives this store's commits made without a flush (the objects
                // of the frame this command may record): they are made durable first, so
                // no crash leaves an entry in the log that names objects the store lost.
                self.kv().sync()?;
                log.submit(command)
            }
            None => self.submit_here(command),
        }
    }

    /// Applies one entry of the replicated log: the command (if any) with `extra` puts
    /// (the log position applied; `None` deletes the key) in the same batch, committed
    /// without a flush of its own unless `durable` (the log the entry comes from is
    /// durable). A command the catalog refuses is the entry's outcome (every member
    /// refuses it alike), and the extra keys are still written; only a failure to read or
    /// write the store is `Err`.
    #[allow(clippy::type_complexity)]
    pub fn apply_entry(
        &self,
        command: Option<&Command>,
        extra: &[(Vec<u8>, Option<Vec<u8>>)],
        durable: bool,
    ) -> Result<Result<Applied, CatalogError>, StoreError> {
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            let reader = self.reader()?;
            let planned = match command.map(|command| apply(reader.snapshot(), command)) {
                Some(Ok(planned)) => Ok(planned),
                Some(Err(CatalogError::Store(error))) => return Err(error),
                Some(Err(refused)) => Err(refused),
                None => Ok(Planned {
                    batch: WriteBatch::new(),
                    applied: Applied::default(),
                }),
            };
            drop(reader);
            let (mut batch, outcome) = match planned {
                Ok(planned) => (planned.batch, Ok(planned.applied)),
                Err(refused) => (WriteBatch::new(), Err(refused)),
            };
            for (key, value) in extra {
                match value {
                    Some(value) => batch.put(key.clone(), value.clone())?,
                    None => batch.delete(key.clone())?,
                }
            }
            batch.durable = durable;
            match self.kv().commit(batch) {
                Ok(()) => {
                    if outcome.is_ok() {
                        self.changed();
                    }
                    return Ok(outcome);
                }
                Err(KvError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Kv(KvError::Io(
            "a log entry's keys kept changing under it".into(),
        )))
    }

    /// Commits a command on this store, whatever log is configured.
    pub fn submit_here(&self, command: &Command) -> Result<Applied, CatalogError> {
        let mut conflict = None;
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            let reader = self.reader()?;
            let planned = apply(reader.snapshot(), command)?;
            drop(reader);
            match self.kv().commit(planned.batch) {
                Ok(()) => {
                    self.changed();
                    return Ok(planned.applied);
                }
                Err(KvError::Conflict { key }) => conflict = Some(key),
                Err(error) => return Err(error.into()),
            }
        }
        Err(CatalogError::Contended {
            replica: command.replica.clone(),
            key: conflict.map(|key| printable(&key)).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{CommitEvent, CommitKind};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let definition = ReplicaDefinition::new("web", "/srv".into());
        store
            .submit(&Command::new(
                Instant(1),
                "web",
                MAIN_TIMELINE,
                "ops",
                Change::RegisterReplica {
                    definition,
                    replace: false,
                },
            ))
            .unwrap();
        (dir, store)
    }

    fn frame(store: &Store, time: i64, parent: Option<Hash>) -> FrameRecord {
        let fields = FrameFields {
            time: Instant(time),
            parent,
            root: Hash([time as u8; 32]),
            entries: 1,
            bytes: 1,
            objects_new: 0,
            bytes_new_stored: 0,
            torn: 0,
            unreadable: 0,
            capture_ms: 0,
        };
        store
            .submit(&Command::new(
                Instant(time),
                "web",
                MAIN_TIMELINE,
                "kairos",
                Change::AppendFrame { frame: fields },
            ))
            .unwrap()
            .frame
            .unwrap()
    }

    fn begin(commit: u8) -> Command {
        let id = Hash([commit; 32]);
        let event = CommitEvent {
            commit: id,
            kind: CommitKind::Commit,
            status: CommitStatus::Applying,
            timeline: MAIN_TIMELINE.into(),
            proposal: None,
            ops: vec![1],
            base: Hash::default(),
            applied_on: Hash::default(),
            rebased: false,
            frame: None,
            last_good: None,
            conflicts: Vec::new(),
            note: None,
        };
        Command::new(
            Instant(10),
            "web",
            MAIN_TIMELINE,
            "ops",
            Change::BeginCommit {
                commit: id,
                status: CommitStatus::Applying,
                record: RecordBody(serde_json::json!({"status": "applying"})),
                last_good: None,
            },
        )
        .with_audit(AuditEvent::Commit(event))
    }

    #[test]
    fn apply_is_deterministic_and_reads_no_clock() {
        let (_dir, store) = store();
        let reader = store.reader().unwrap();
        let command = begin(1);
        let first = apply(reader.snapshot(), &command).unwrap();
        let second = apply(reader.snapshot(), &command).unwrap();
        assert_eq!(first.batch.mutations(), second.batch.mutations());
        assert_eq!(first.batch.checks(), second.batch.checks());
        assert_eq!(first.applied, second.applied);
        // A command survives its wire form unchanged (the replicated log's entries).
        let wire = serde_json::to_vec(&command).unwrap();
        assert_eq!(serde_json::from_slice::<Command>(&wire).unwrap(), command);
    }

    #[test]
    fn a_second_commit_is_refused_while_one_is_pending() {
        let (_dir, store) = store();
        store.submit(&begin(1)).unwrap();
        match store.submit(&begin(2)) {
            Err(CatalogError::Busy { commit, status, .. }) => {
                assert_eq!(commit, Hash([1; 32]).short());
                assert_eq!(status, "applying");
            }
            other => panic!("expected busy, got {other:?}"),
        }
        // Finishing the first frees the replica.
        let good = frame(&store, 5, None).id;
        store
            .submit(&Command::new(
                Instant(11),
                "web",
                MAIN_TIMELINE,
                "ops",
                Change::AdvanceCommit {
                    commit: Hash([1; 32]),
                    status: CommitStatus::Committed,
                    record: RecordBody(serde_json::json!({"status": "committed"})),
                    last_good: Some(good),
                },
            ))
            .unwrap();
        store.submit(&begin(2)).unwrap();
        let log = store.audit_log("web").unwrap();
        assert!(log.intact, "{:?}", log.problem);
        assert_eq!(log.entries.len(), 2);
    }

    #[test]
    fn commands_racing_on_one_replica_both_land_or_are_refused_by_their_guard() {
        let (_dir, store) = store();
        let store = std::sync::Arc::new(store);
        let threads: Vec<_> = (1..=8u8)
            .map(|n| {
                let store = store.clone();
                std::thread::spawn(move || store.submit(&begin(n)))
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let landed = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(landed, 1, "{results:?}");
        assert!(
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, CatalogError::Busy { .. }))
        );
        let log = store.audit_log("web").unwrap();
        assert!(log.intact);
        assert_eq!(log.entries.len(), 1);
    }

    #[test]
    fn advancing_a_commit_that_is_not_pending_is_refused() {
        let (_dir, store) = store();
        let advance = Command::new(
            Instant(11),
            "web",
            MAIN_TIMELINE,
            "ops",
            Change::AdvanceCommit {
                commit: Hash([3; 32]),
                status: CommitStatus::Committed,
                record: RecordBody(serde_json::json!({})),
                last_good: None,
            },
        );
        assert!(matches!(
            store.submit(&advance),
            Err(CatalogError::NotPending { .. })
        ));
    }

    #[test]
    fn frames_need_their_parent_as_head_and_times_increase() {
        let (_dir, store) = store();
        let first = frame(&store, 100, None);
        let second = frame(&store, 50, Some(first.id));
        assert_eq!(second.time, Instant(101));
        let stale = Command::new(
            Instant(200),
            "web",
            MAIN_TIMELINE,
            "kairos",
            Change::AppendFrame {
                frame: FrameFields {
                    time: Instant(200),
                    parent: Some(first.id),
                    root: Hash([7; 32]),
                    entries: 0,
                    bytes: 0,
                    objects_new: 0,
                    bytes_new_stored: 0,
                    torn: 0,
                    unreadable: 0,
                    capture_ms: 0,
                },
            },
        );
        assert!(matches!(
            store.submit(&stale),
            Err(CatalogError::HeadMoved { .. })
        ));
    }

    #[test]
    fn unknown_replicas_and_versions_are_refused() {
        let (_dir, store) = store();
        let mut command = begin(1);
        command.replica = "nope".into();
        assert!(matches!(
            store.submit(&command),
            Err(CatalogError::UnknownReplica(_))
        ));
        let mut command = begin(1);
        command.version = 99;
        let error = store.submit(&command).unwrap_err();
        assert!(error.to_string().contains("version 99"), "{error}");
    }
}
