//! Kairos sandboxes: proposals (a party's ordered ops against a base frame), applied to a
//! copy of the base state by structural sharing, diffed, and optionally materialised into
//! a scratch directory where the replica's own check runs. Knows nothing about actors,
//! NATS or Raft; the committer (`kairos-commit`) builds on it.

pub mod apply;
pub mod command;
pub mod config_edit;
pub mod proposal;

use std::path::Path;
use std::time::Duration;

use kairos_core::{Hash, Instant, Limits, ReplicaDefinition, TimelineSpec};
use kairos_replay::{ConfigChange, FileChange, ReplayError, RestoreOptions, StateView};
use kairos_store::audit::{CheckSummary, ProposalEvent, SandboxEvent};
use kairos_store::node::RootNode;
use kairos_store::{
    AuditEvent, CatalogError, Change, Command, FrameRecord, ObjectKind, RecordBody, RecordFamily,
    Store, StoreError,
};
use serde::{Deserialize, Serialize};

pub use apply::{Applied, Touched, apply_ops};
pub use command::CommandOutcome;
pub use proposal::{Op, Proposal, ProposalDocument, ProposalSummary};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the proposal is not valid {format}: {reason}")]
    Document {
        format: &'static str,
        reason: String,
    },
    #[error("proposal: {0}")]
    Invalid(String),
    #[error("op {index} ({op}): {problem}")]
    Op {
        index: usize,
        op: String,
        problem: String,
    },
    #[error("replica {replica:?}: no proposal id starts with {prefix:?}")]
    UnknownProposal { replica: String, prefix: String },
    #[error(
        "replica {replica:?}: proposal id prefix {prefix:?} matches {count} proposals; give more digits"
    )]
    AmbiguousProposal {
        replica: String,
        prefix: String,
        count: usize,
    },
    #[error("replica {0:?} declares no check command (set `check` in its configuration)")]
    NoCheck(String),
    #[error("running {what}: {reason}")]
    Command { what: String, reason: String },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The changes a sandbox makes to its base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SandboxDiff {
    pub files: Vec<FileChange>,
    pub config: Vec<ConfigChange>,
}

/// A sandbox: a proposal applied to its base, its diff, and the check's real outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxReport {
    pub proposal: Hash,
    pub replica: String,
    pub base: Hash,
    /// The sandbox state's root object.
    pub state: Hash,
    /// The ops applied (1-based indexes into the proposal).
    pub ops: Vec<usize>,
    pub diff: SandboxDiff,
    pub touched: Vec<Touched>,
    pub actions: Vec<String>,
    /// Time to build the sandbox state (the ops applied, the state readable), in
    /// microseconds; storing its new nodes, the diff and the records come after.
    pub apply_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CommandOutcome>,
    /// When the sandbox was made (absent in records of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Instant>,
}

/// The id of a sandbox's record: one per proposal and sandbox state.
pub fn sandbox_record_id(proposal: &Hash, state: &Hash) -> Hash {
    Hash::of(
        0x58,
        &[proposal.as_bytes().as_slice(), state.as_bytes()].concat(),
    )
}

/// Picks ops by 1-based index (all when `chosen` is `None`).
pub fn select_ops(
    proposal: &Proposal,
    chosen: Option<&[usize]>,
) -> Result<Vec<(usize, Op)>, SandboxError> {
    let all: Vec<(usize, Op)> = proposal
        .ops
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, op)| (index + 1, op))
        .collect();
    let Some(chosen) = chosen else {
        return Ok(all);
    };
    if chosen.is_empty() {
        return Err(SandboxError::Invalid("no ops chosen".into()));
    }
    let mut picked = Vec::new();
    for &index in chosen {
        if index == 0 || index > all.len() {
            return Err(SandboxError::Invalid(format!(
                "op {index} does not exist (the proposal has ops 1 to {})",
                all.len()
            )));
        }
        if picked.iter().any(|(i, _)| *i == index) {
            return Err(SandboxError::Invalid(format!("op {index} is chosen twice")));
        }
        picked.push(all[index - 1].clone());
    }
    picked.sort_by_key(|(index, _)| *index);
    Ok(picked)
}

/// The timeline a proposal targets and the spec of its base.
fn base_spec(
    document: &ProposalDocument,
    timeline: Option<&str>,
) -> Result<TimelineSpec, SandboxError> {
    let text = match (&document.base, timeline) {
        (Some(base), _) => base.clone(),
        (None, Some(timeline)) => format!("{timeline}@latest"),
        (None, None) => "latest".to_string(),
    };
    let spec = TimelineSpec::parse(&text)
        .map_err(|error| SandboxError::Invalid(format!("base {text:?}: {error}")))?;
    if let Some(timeline) = timeline.filter(|timeline| spec.timeline != *timeline) {
        return Err(SandboxError::Invalid(format!(
            "base {text:?} is on timeline {:?}, not on --timeline {timeline:?}",
            spec.timeline
        )));
    }
    Ok(spec)
}

/// Validates a proposal against its base (every op applied to a sandbox) and stores it.
pub fn propose(
    store: &Store,
    replica: &ReplicaDefinition,
    document: ProposalDocument,
    timeline: Option<&str>,
    limits: &Limits,
    now: Instant,
) -> Result<Proposal, SandboxError> {
    let (mut proposal, bytes) = checked(store, replica, document, timeline, limits, now)?;
    store_proposal(store, replica, &mut proposal, &bytes, now)?;
    Ok(proposal)
}

/// Validates a proposal as `propose` does (fields, limits, base, every op applied to a
/// sandbox of its base) and stores nothing: the proposal has no id yet.
pub fn validate(
    store: &Store,
    replica: &ReplicaDefinition,
    document: ProposalDocument,
    timeline: Option<&str>,
    limits: &Limits,
    now: Instant,
) -> Result<Proposal, SandboxError> {
    Ok(checked(store, replica, document, timeline, limits, now)?.0)
}

/// The proposal a document makes, checked, and its stored bytes.
fn checked(
    store: &Store,
    replica: &ReplicaDefinition,
    document: ProposalDocument,
    timeline: Option<&str>,
    limits: &Limits,
    now: Instant,
) -> Result<(Proposal, Vec<u8>), SandboxError> {
    document.check_fields()?;
    if document.author.is_empty() {
        return Err(SandboxError::Invalid(
            "names no author, and no party submits it".into(),
        ));
    }
    if document.ops.len() > limits.proposal_ops_max {
        return Err(SandboxError::Invalid(format!(
            "has {} ops, over the limit of {}",
            document.ops.len(),
            limits.proposal_ops_max
        )));
    }
    let spec = base_spec(&document, timeline)?;
    let base = store.resolve(&replica.name, &spec, now)?;
    let proposal = Proposal {
        id: Hash::default(),
        replica: replica.name.clone(),
        title: document.title,
        author: document.author,
        description: document.description,
        timeline: spec.timeline.clone(),
        base: base.id,
        base_spec: spec.to_string(),
        created: now,
        ops: document.ops,
    };
    let bytes = serde_json::to_vec(&proposal).map_err(|e| SandboxError::Invalid(e.to_string()))?;
    if bytes.len() as u64 > limits.proposal_bytes_max {
        return Err(SandboxError::Invalid(format!(
            "is {} bytes, over the limit of {}",
            bytes.len(),
            limits.proposal_bytes_max
        )));
    }
    let root = base_root(store, &base)?;
    apply_ops(
        store,
        replica,
        &root,
        &select_ops(&proposal, None)?,
        limits,
        now,
    )?;
    Ok((proposal, bytes))
}

fn store_proposal(
    store: &Store,
    replica: &ReplicaDefinition,
    proposal: &mut Proposal,
    bytes: &[u8],
    now: Instant,
) -> Result<(), SandboxError> {
    // The writer lives until the record naming the document is committed: garbage
    // collection keeps a live writer's objects.
    let (id, _document_writer) = store_document(store, &replica.name, bytes)?;
    proposal.id = id;
    let summary = ProposalSummary {
        id: proposal.id,
        title: proposal.title.clone(),
        author: proposal.author.clone(),
        timeline: proposal.timeline.clone(),
        base: proposal.base,
        created: now,
        ops: proposal.ops.len(),
    };
    let event = AuditEvent::Proposal(ProposalEvent {
        proposal: proposal.id,
        title: proposal.title.clone(),
        timeline: proposal.timeline.clone(),
        base: proposal.base,
        ops: proposal.ops.iter().map(Op::describe).collect(),
    });
    store.submit(
        &Command::new(
            now,
            &replica.name,
            &proposal.timeline,
            &proposal.author,
            Change::PutRecord {
                family: RecordFamily::Proposal,
                id: proposal.id,
                record: RecordBody::of(&summary)?,
            },
        )
        .with_audit(event),
    )?;
    Ok(())
}

/// A proposal's base frame. Once a commit of the proposal is committed its base is no
/// longer kept from `forget`: a base forgotten since is named as such, never as damage.
pub fn proposal_base(store: &Store, proposal: &Proposal) -> Result<FrameRecord, SandboxError> {
    store.frame_if_stored(&proposal.base)?.ok_or_else(|| {
        SandboxError::Invalid(format!(
            "{}: its base frame {} was forgotten (kairos forget); propose it again on the head",
            proposal.id.short(),
            proposal.base.short()
        ))
    })
}

/// Pieces of a proposal document larger than one object.
const DOCUMENT_PIECE_BYTES: usize = 512 << 10;

/// Stores a proposal document: one blob, or (over the object limit) pieces under a chunk
/// list. Its id is that object's hash. The writer is returned to be kept until the record
/// naming the document is committed.
fn store_document(
    store: &Store,
    replica: &str,
    bytes: &[u8],
) -> Result<(Hash, kairos_store::ObjectWriter), SandboxError> {
    let writer = store.object_writer(replica)?;
    let id = if bytes.len() <= kairos_store::object::OBJECT_RAW_BYTES_MAX {
        writer.put(ObjectKind::Blob, bytes)?
    } else {
        let mut pieces = Vec::with_capacity(bytes.len() / DOCUMENT_PIECE_BYTES + 1);
        for piece in bytes.chunks(DOCUMENT_PIECE_BYTES) {
            pieces.push(kairos_store::node::ChunkRef {
                hash: writer.put(ObjectKind::Chunk, piece)?.0,
                bytes: piece.len() as u64,
            });
        }
        kairos_store::tree::write_chunk_list(&writer, pieces)?
    };
    writer.finish()?;
    Ok((id, writer))
}

/// A stored proposal document's bytes, from its blob or its pieces.
fn read_document(store: &Store, id: &Hash) -> Result<Vec<u8>, SandboxError> {
    let reader = store.reader()?;
    let blob_error = match reader.object(id, ObjectKind::Blob) {
        Ok(bytes) => return Ok(bytes),
        Err(error) => error,
    };
    // Not a blob: a large document's chunk list (any other error is the blob's).
    let Ok(pieces) = reader.chunks(id) else {
        return Err(blob_error.into());
    };
    let mut bytes = Vec::new();
    for piece in pieces {
        bytes.extend(reader.object(&Hash(piece.hash), ObjectKind::Chunk)?);
    }
    Ok(bytes)
}

/// The proposal whose id starts with `prefix` (4+ hex digits).
pub fn load_proposal(store: &Store, replica: &str, prefix: &str) -> Result<Proposal, SandboxError> {
    let prefix = kairos_core::hash::parse_hex_prefix(prefix)
        .map_err(|error| SandboxError::Invalid(format!("proposal id {prefix:?}: {error}")))?;
    store.replica(replica)?;
    let ids = store.record_ids(RecordFamily::Proposal, replica, &prefix)?;
    let id = match ids.as_slice() {
        [] => {
            return Err(SandboxError::UnknownProposal {
                replica: replica.into(),
                prefix,
            });
        }
        [id] => *id,
        _ => {
            return Err(SandboxError::AmbiguousProposal {
                replica: replica.into(),
                prefix,
                count: ids.len(),
            });
        }
    };
    let bytes = read_document(store, &id)?;
    let mut proposal: Proposal = serde_json::from_slice(&bytes).map_err(|error| {
        SandboxError::Store(StoreError::BadRecord {
            what: "proposal",
            key: id.to_hex(),
            problem: error.to_string(),
        })
    })?;
    proposal.id = id;
    if proposal.replica != replica {
        return Err(SandboxError::UnknownProposal {
            replica: replica.into(),
            prefix,
        });
    }
    Ok(proposal)
}

/// The root node of a frame.
pub fn base_root(store: &Store, frame: &FrameRecord) -> Result<RootNode, SandboxError> {
    Ok(store
        .reader()?
        .node::<RootNode>(&frame.root, ObjectKind::Root)?)
}

/// A view of a state that is not a frame (a sandbox), for restore and listing.
pub fn state_view(replica: &str, base: &FrameRecord, root: Hash, root_node: RootNode) -> StateView {
    StateView {
        frame: FrameRecord {
            id: root,
            replica: replica.to_string(),
            timeline: format!("sandbox:{}", base.timeline),
            root,
            ..base.clone()
        },
        root: root_node,
    }
}

/// Materialises a state into `into` (an empty or absent directory).
pub fn materialise(store: &Store, view: &StateView, into: &Path) -> Result<(), SandboxError> {
    kairos_replay::restore(
        store,
        view,
        into,
        &RestoreOptions {
            force: false,
            exclude: Vec::new(),
            progress: None,
            durable: false,
        },
    )?;
    Ok(())
}

/// What to sandbox and who asks.
#[derive(Debug, Clone, Copy)]
pub struct SandboxOptions<'a> {
    /// The ops to apply (1-based); all when `None`.
    pub chosen: Option<&'a [usize]>,
    pub run_check: bool,
    pub party: &'a str,
    /// Only show what the sandbox would hold: no record, no audit event, no check (its
    /// tree's objects are written, named by nothing, for `kairos gc` to reclaim). What a
    /// page shows on every visit.
    pub preview: bool,
}

/// Builds the sandbox of `proposal` (the chosen ops on its base), diffs it, and with
/// `run_check` materialises it and runs the replica's check there. The outcome is stored
/// and logged.
pub fn sandbox(
    store: &Store,
    replica: &ReplicaDefinition,
    proposal: &Proposal,
    options: &SandboxOptions<'_>,
    limits: &Limits,
    now: Instant,
) -> Result<SandboxReport, SandboxError> {
    let SandboxOptions {
        chosen,
        run_check,
        party,
        preview,
    } = *options;
    if run_check && preview {
        return Err(SandboxError::Invalid(
            "a preview runs no check (ask for a sandbox)".into(),
        ));
    }
    if run_check && replica.check.is_none() {
        return Err(SandboxError::NoCheck(replica.name.clone()));
    }
    let ops = select_ops(proposal, chosen)?;
    let base = proposal_base(store, proposal)?;
    let root = base_root(store, &base)?;
    let started = std::time::Instant::now();
    let applied = apply_ops(store, replica, &root, &ops, limits, now)?;
    let apply_us = started.elapsed().as_micros() as u64;
    // Written even for a preview: the diff reads the sandbox's tree from the store. No
    // record names these objects; `kairos gc` reclaims them.
    applied.persist()?;
    let (files, config) =
        kairos_replay::diff_files(store, &Hash(root.files), &Hash(applied.root_node.files))?;
    let check = if run_check {
        Some(run_check_on(store, replica, &base, &applied, limits)?)
    } else {
        None
    };
    let report = SandboxReport {
        proposal: proposal.id,
        replica: replica.name.clone(),
        base: base.id,
        state: applied.root,
        ops: ops.iter().map(|(index, _)| *index).collect(),
        diff: SandboxDiff { files, config },
        touched: applied.touched,
        actions: applied.actions,
        apply_us,
        check,
        created: Some(now),
    };
    if preview {
        return Ok(report);
    }
    let record_id = sandbox_record_id(&proposal.id, &applied.root);
    let event = AuditEvent::Sandbox(SandboxEvent {
        proposal: proposal.id,
        base: base.id,
        state: applied.root,
        ops: report.ops.clone(),
        files_changed: report.diff.files.len(),
        check: report.check.as_ref().map(|check| CheckSummary {
            exit_code: check.exit_code,
            passed: check.passed,
            timed_out: check.timed_out,
            duration_ms: check.duration_ms,
            peak_memory_bytes: check.peak_memory_bytes,
        }),
    });
    store.submit(
        &Command::new(
            now,
            &replica.name,
            &proposal.timeline,
            party,
            Change::PutRecord {
                family: RecordFamily::Sandbox,
                id: record_id,
                record: RecordBody::of(&report)?,
            },
        )
        .with_audit(event),
    )?;
    Ok(report)
}

/// Materialises an applied state in a scratch directory and runs the replica's check
/// there (the scratch copy is removed afterwards).
fn run_check_on(
    store: &Store,
    replica: &ReplicaDefinition,
    base: &FrameRecord,
    applied: &Applied,
    limits: &Limits,
) -> Result<CommandOutcome, SandboxError> {
    let Some(template) = replica.check.as_deref() else {
        return Err(SandboxError::NoCheck(replica.name.clone()));
    };
    let scratch = tempfile::Builder::new()
        .prefix("kairos-sandbox-")
        .tempdir()
        .map_err(|e| SandboxError::Command {
            what: "the sandbox check".into(),
            reason: format!("making a scratch directory: {e}"),
        })?;
    let into = scratch.path().join("root");
    let view = state_view(&replica.name, base, applied.root, applied.root_node.clone());
    materialise(store, &view, &into)?;
    command::run(
        &command::expand(template, &into),
        &into,
        Duration::from_millis(replica.check_timeout_ms),
        limits.command_output_bytes_max,
        true,
    )
    .map_err(|e| SandboxError::Command {
        what: format!("the check {template:?}"),
        reason: e.to_string(),
    })
}

/// The check run on several proposals applied together: the chosen ops of each, in the
/// order given, on the first one's base (what the timeline holds once all of them are
/// committed). Nothing is recorded; an op that does not apply on top of the others is
/// an error naming it.
pub fn check_together(
    store: &Store,
    replica: &ReplicaDefinition,
    parts: &[(&Proposal, Option<&[usize]>)],
    limits: &Limits,
    now: Instant,
) -> Result<CommandOutcome, SandboxError> {
    let Some((first, _)) = parts.first() else {
        return Err(SandboxError::Invalid(
            "no proposals to check together".into(),
        ));
    };
    let base = proposal_base(store, first)?;
    let root = base_root(store, &base)?;
    let mut ops = Vec::new();
    for (proposal, chosen) in parts {
        ops.extend(select_ops(proposal, *chosen)?);
    }
    let applied = apply_ops(store, replica, &root, &ops, limits, now)?;
    applied.persist()?;
    run_check_on(store, replica, &base, &applied, limits)
}
