//! Kairos commits: the chosen ops of a proposal written to the live replica (on `main`) or
//! recorded as a new frame (on a fork), conflicts and rebases against the timeline head,
//! probes over the watch window, automated rollback to the last good frame, revert by
//! hand, and recovery of a commit interrupted by a crash. Every step is recorded (commit
//! records and the replica's audit log) before and after it happens.
//!
//! The decisions are plain: [`conflicts`] and [`watch_step`] are functions, and the
//! commit/rollback/revert/recover state machine is [`engine::CommitEngine`], which takes
//! inputs and returns effects without doing IO. [`Committer`] is the thin driver that
//! performs the effects against the store (through catalog commands), the live root and a
//! [`Capturer`].

pub mod engine;
pub mod live;
pub mod probe;

use std::collections::BTreeSet;
use std::time::{Duration, Instant as Clock};

use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Hash, Instant, Limits, ReplicaDefinition, TimelineSpec};
use kairos_replay::{ReplayError, RestoreOptions};
use kairos_sandbox::command::{self, CommandOutcome};
use kairos_sandbox::{
    Proposal, SandboxError, Touched, apply_ops, base_root, select_ops, state_view,
};
use kairos_store::audit::{CommitEvent, CommitKind};
use kairos_store::{
    AuditEvent, CatalogError, Change, Command, FrameDraft, FrameRecord, RecordBody, RecordFamily,
    Store, StoreError, WriteStats,
};
use serde::{Deserialize, Serialize};

use engine::{Actor, CatalogStep, CommitEngine, Effect, Input, Plan, Watch};

pub use kairos_core::CommitStatus;
pub use kairos_store::SYSTEM_PARTY;
pub use probe::ProbeObservation;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("commit id {id:?}: {problem}")]
    BadId { id: String, problem: String },
    #[error("replica {replica:?}: no commit id starts with {prefix:?}")]
    UnknownCommit { replica: String, prefix: String },
    #[error("capturing replica {replica:?}: {reason}")]
    Capture { replica: String, reason: String },
    #[error("writing the live replica at {path}: {reason}")]
    Live { path: String, reason: String },
    #[error(transparent)]
    Engine(#[from] engine::UnexpectedInput),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rollback: which frame was restored, why, and how fast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// The last good frame restored.
    pub to: Hash,
    /// The frame captured after restoring.
    pub frame: Option<Hash>,
    /// The failed probe observation (or the reason, for a recovery).
    pub evidence: String,
    /// From the failure being observed to the last good state on disk.
    pub restored_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_commit: Option<CommandOutcome>,
    /// The rollback was a crash recovery: the change itself was never judged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

/// One commit (or revert) and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// Unique id (hash of replica, proposal, ops, party and start time).
    pub commit: Hash,
    pub replica: String,
    pub timeline: String,
    pub kind: CommitKind,
    pub party: String,
    pub status: CommitStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<Hash>,
    pub ops: Vec<usize>,
    /// The proposal's base, and the head the commit was applied on.
    pub base: Hash,
    pub applied_on: Hash,
    pub rebased: bool,
    /// Entries the ops touch that also changed between base and head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    pub touched: Vec<Touched>,
    /// The frame recording the committed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<Hash>,
    /// The last good frame when the commit started (the rollback target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<Hash>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<CommandOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_commit: Option<CommandOutcome>,
    /// Probe runs during the watch window, and failures.
    pub probe_runs: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_failures: Vec<ProbeObservation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub started: Instant,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Instant>,
}

/// Captures the live replica into a new frame on `main`. The node goes through its
/// snapshotter (the only writer of a replica's frames); the CLI captures directly.
pub trait Capturer: Send + Sync {
    fn capture(&self, replica: &ReplicaDefinition) -> Result<FrameRecord, String>;
}

/// Captures with the store directly (one process owns the store).
pub struct DirectCapturer<'s> {
    pub store: &'s Store,
    pub limits: Limits,
    /// Paths never captured (the store's own directory).
    pub skip: Vec<std::path::PathBuf>,
}

impl Capturer for DirectCapturer<'_> {
    fn capture(&self, replica: &ReplicaDefinition) -> Result<FrameRecord, String> {
        kairos_capture::capture(
            self.store,
            &kairos_capture::CaptureRequest {
                replica,
                timeline: MAIN_TIMELINE,
                limits: self.limits,
                skip: self.skip.clone(),
            },
        )
        .map(|report| report.frame)
        .map_err(|error| error.to_string())
    }
}

/// Whether a path touched by a commit overlaps a path changed since its base: the same
/// path, or one inside the other.
pub fn overlaps(touched: &str, changed: &str) -> bool {
    touched == changed
        || changed.starts_with(&format!("{touched}/"))
        || touched.starts_with(&format!("{changed}/"))
}

/// The touched paths that conflict with what changed between base and head.
pub fn conflicts(touched: &BTreeSet<String>, changed: &BTreeSet<String>) -> Vec<String> {
    touched
        .iter()
        .filter(|path| changed.iter().any(|c| overlaps(path, c)))
        .cloned()
        .collect()
}

/// What to do after one round of probes during the watch window.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchStep {
    /// Keep watching; probe again after the interval.
    Continue,
    /// The window passed with every probe passing.
    Good,
    /// A probe failed: roll back.
    RollBack(ProbeObservation),
}

/// The watch decision: any failed observation rolls back; a window that ends with none
/// makes the commit good.
pub fn watch_step(
    failed: Option<ProbeObservation>,
    elapsed: Duration,
    window: Duration,
) -> WatchStep {
    match failed {
        Some(observation) => WatchStep::RollBack(observation),
        None if elapsed >= window => WatchStep::Good,
        None => WatchStep::Continue,
    }
}

/// The audit event of a commit or revert record.
pub fn audit_event(record: &CommitRecord) -> AuditEvent {
    let event = CommitEvent {
        commit: record.commit,
        kind: record.kind,
        status: record.status,
        timeline: record.timeline.clone(),
        proposal: record.proposal,
        ops: record.ops.clone(),
        base: record.base,
        applied_on: record.applied_on,
        rebased: record.rebased,
        frame: record.frame,
        last_good: record.last_good,
        conflicts: record.conflicts.clone(),
        note: record.note.clone(),
    };
    match record.kind {
        CommitKind::Commit => AuditEvent::Commit(event),
        CommitKind::Revert => AuditEvent::Revert(event),
    }
}

/// Runs commits, reverts and recoveries for one replica: prepares them (head, conflicts,
/// ops applied to a copy of the head) and drives their [`CommitEngine`].
pub struct Committer<'a> {
    pub store: &'a Store,
    pub replica: &'a ReplicaDefinition,
    pub limits: Limits,
    pub capturer: &'a dyn Capturer,
    /// Paths Kairos never writes or removes on the live root (the store's own directory,
    /// when it lies inside the replica's root).
    pub protected: Vec<std::path::PathBuf>,
    /// The proposal state a commit's review policy was decided on: the batch that starts
    /// the commit (on `main`) or appends its frame (on a fork) is refused if it changed.
    pub reviews_seen: Option<kairos_store::review::ReviewGuard>,
}

/// Attempts at a fork commit when other commits move the fork's head meanwhile.
const FORK_COMMIT_ATTEMPTS_MAX: usize = 16;

/// The protected paths that lie inside `root`, relative to it.
pub fn protected_inside(root: &std::path::Path, protected: &[std::path::PathBuf]) -> Vec<String> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    protected
        .iter()
        .filter_map(|path| {
            let path = path.canonicalize().unwrap_or_else(|_| path.clone());
            path.strip_prefix(&root)
                .ok()
                .map(|relative| relative.to_string_lossy().into_owned())
        })
        .collect()
}

/// What the driver needs besides the engine: the applied state to write live.
struct Live {
    view: kairos_replay::StateView,
    touched: Vec<Touched>,
}

impl Committer<'_> {
    fn name(&self) -> &str {
        &self.replica.name
    }

    fn watch_settings(&self) -> Watch {
        Watch {
            // Without probes there is nothing to watch: the window would only delay.
            window: if self.replica.probes.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_millis(self.replica.watch_window_ms)
            },
            interval: Duration::from_millis(self.replica.probe_interval_ms),
            has_after_commit: self.replica.after_commit.is_some(),
        }
    }

    fn capture(&self) -> Result<FrameRecord, CommitError> {
        self.capturer
            .capture(self.replica)
            .map_err(|reason| CommitError::Capture {
                replica: self.name().to_string(),
                reason,
            })
    }

    /// The commit in progress on this replica, if any.
    pub fn pending(&self) -> Result<Option<CommitRecord>, CommitError> {
        let Some(value) = self.store.pending_marker(self.name())? else {
            return Ok(None);
        };
        let Some(id) = Hash::from_slice(&value) else {
            return Err(StoreError::BadRecord {
                what: "pending commit",
                key: self.name().to_string(),
                problem: "is not a commit id".into(),
            }
            .into());
        };
        Ok(self.store.record(RecordFamily::Commit, self.name(), &id)?)
    }

    /// Refuses early when a commit is in progress. Only a courtesy: the guard that counts
    /// is the `BeginCommit` command's check of the pending marker.
    fn refuse_if_busy(&self) -> Result<(), CommitError> {
        if let Some(record) = self.pending()? {
            return Err(CatalogError::Busy {
                kind: record.kind.name().to_string(),
                replica: self.name().to_string(),
                commit: record.commit.short(),
                status: record.status.name().to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// The last frame known good (probes passed), if any.
    pub fn last_good(&self) -> Result<Option<Hash>, CommitError> {
        Ok(self.store.last_good(self.name())?)
    }

    pub fn commit_record(&self, prefix: &str) -> Result<CommitRecord, CommitError> {
        let prefix_hex =
            kairos_core::hash::parse_hex_prefix(prefix).map_err(|error| CommitError::BadId {
                id: prefix.to_string(),
                problem: error.to_string(),
            })?;
        let ids = self
            .store
            .record_ids(RecordFamily::Commit, self.name(), &prefix_hex)?;
        let unknown = || CommitError::UnknownCommit {
            replica: self.name().to_string(),
            prefix: prefix_hex.clone(),
        };
        match ids.as_slice() {
            [id] => self
                .store
                .record(RecordFamily::Commit, self.name(), id)?
                .ok_or_else(unknown),
            _ => Err(unknown()),
        }
    }

    /// Starts a commit of `proposal`'s chosen ops: checks for conflicts, applies the ops
    /// (to the live root on `main`, as a new frame on a fork) and records it. On `main`
    /// the returned record is `watching` (call [`Committer::watch`] to finish it) or
    /// already final (a failed write or command rolled it back).
    pub fn begin(
        &self,
        proposal: &Proposal,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Result<CommitRecord, CommitError> {
        let mut attempt = 1;
        loop {
            match self.begin_on_head(proposal, chosen, party) {
                // Another commit on the fork landed first: rebase onto its frame.
                Err(CommitError::Catalog(CatalogError::HeadMoved { .. }))
                    if proposal.timeline != MAIN_TIMELINE && attempt < FORK_COMMIT_ATTEMPTS_MAX =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`Committer::begin`] on the timeline's head as it is now.
    fn begin_on_head(
        &self,
        proposal: &Proposal,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Result<CommitRecord, CommitError> {
        self.refuse_if_busy()?;
        let ops = select_ops(proposal, chosen)?;
        let started = Instant::now();
        let head = self.head_for(proposal, started)?;
        let base = kairos_sandbox::proposal_base(self.store, proposal)?;
        let mut record =
            new_commit_record(self.name(), proposal, &ops, party, started, &base, &head);
        let head_root = base_root(self.store, &head)?;
        let base_files = base_root(self.store, &base)?.files;
        // A head with the same files as the base (a capture of an unchanged root) needs
        // no rebase.
        record.rebased = head_root.files != base_files;
        if record.rebased {
            let found = self.conflicts_since_base(&ops, &Hash(base_files), &head_root)?;
            if !found.is_empty() {
                return self.refuse_conflict(record, found, &base, &head);
            }
        }
        let applied = apply_ops(
            self.store,
            self.replica,
            &head_root,
            &ops,
            &self.limits,
            started,
        )?;
        applied.persist()?;
        record.touched = applied.touched.clone();
        if proposal.timeline != MAIN_TIMELINE {
            return self.commit_on_fork(record, &head, &applied);
        }
        self.refuse_protected(&record.touched)?;
        let set_last_good = self.initial_last_good(&mut record, &head)?;
        let live = Live {
            view: state_view(self.name(), &head, applied.root, applied.root_node.clone()),
            touched: applied.touched.clone(),
        };
        let engine = CommitEngine::new(
            record,
            Plan::Commit {
                actions: applied.actions.clone(),
                set_last_good,
            },
            self.watch_settings(),
        );
        self.drive(engine, Input::Start, Some(&live), true)
    }

    /// Refuses ops that would write into a protected path (the store's own directory).
    fn refuse_protected(&self, touched: &[Touched]) -> Result<(), CommitError> {
        let protected = protected_inside(&self.replica.root, &self.protected);
        for touch in touched {
            if let Some(inside) = protected.iter().find(|inside| {
                inside.is_empty()
                    || touch.path == **inside
                    || touch.path.starts_with(&format!("{inside}/"))
            }) {
                return Err(SandboxError::Op {
                    index: touch.op,
                    op: touch.path.clone(),
                    problem: format!(
                        "{:?} is inside Kairos's own data directory ({inside:?}); it is never written",
                        touch.path
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The head a commit applies on: on `main` the live root captured now (it may have
    /// moved since the last frame), on a fork its head frame.
    fn head_for(&self, proposal: &Proposal, now: Instant) -> Result<FrameRecord, CommitError> {
        if proposal.timeline == MAIN_TIMELINE {
            return self.capture();
        }
        let spec = TimelineSpec::parse(&format!("{}@latest", proposal.timeline))
            .map_err(|error| SandboxError::Invalid(error.to_string()))?;
        Ok(self.store.resolve(self.name(), &spec, now)?)
    }

    /// The paths the ops touch that changed between the base and the head.
    fn conflicts_since_base(
        &self,
        ops: &[(usize, kairos_sandbox::Op)],
        base_files: &Hash,
        head_root: &kairos_store::node::RootNode,
    ) -> Result<Vec<String>, CommitError> {
        // The paths the ops name (validated when proposed), as the files diff names them.
        let touched: BTreeSet<String> = ops
            .iter()
            .filter_map(|(_, op)| op.path())
            .filter_map(|path| kairos_sandbox::proposal::path_components(path).ok())
            .map(|components| String::from_utf8_lossy(&components.join(&b'/')).into_owned())
            .collect();
        let (changed, _) =
            kairos_replay::diff_files(self.store, base_files, &Hash(head_root.files))?;
        let changed: BTreeSet<String> = changed.into_iter().map(|change| change.path).collect();
        Ok(conflicts(&touched, &changed))
    }

    fn refuse_conflict(
        &self,
        mut record: CommitRecord,
        found: Vec<String>,
        base: &FrameRecord,
        head: &FrameRecord,
    ) -> Result<CommitRecord, CommitError> {
        record.status = CommitStatus::Conflict;
        record.conflicts = found;
        record.finished = Some(Instant::now());
        record.note = Some(format!(
            "the head moved from {} to {} and changed entries the ops touch",
            base.id.short(),
            head.id.short()
        ));
        self.record_final(&record)?;
        Ok(record)
    }

    /// Stores a commit that never becomes pending, with its audit event.
    fn record_final(&self, record: &CommitRecord) -> Result<(), CommitError> {
        self.store.submit(
            &Command::new(
                record.finished.unwrap_or(record.started),
                self.name(),
                &record.timeline,
                &record.party,
                Change::RecordCommit {
                    commit: record.commit,
                    record: RecordBody::of(record)?,
                    // A conflict on main is judged against a head no commit is changing.
                    require_idle: record.timeline == MAIN_TIMELINE,
                },
            )
            .with_audit(audit_event(record)),
        )?;
        Ok(())
    }

    /// On a fork the applied state becomes the fork's next frame; nothing live changes.
    fn commit_on_fork(
        &self,
        mut record: CommitRecord,
        head: &FrameRecord,
        applied: &kairos_sandbox::Applied,
    ) -> Result<CommitRecord, CommitError> {
        let frame = self.store.commit_frame_guarded(
            FrameDraft {
                replica: self.name().to_string(),
                timeline: record.timeline.clone(),
                time: record.started,
                parent: Some(head.id),
                root: applied.root,
                entries: applied.root_node.file_entries,
                bytes: applied.root_node.file_bytes,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            },
            self.reviews_seen,
        )?;
        record.frame = Some(frame.id);
        record.status = CommitStatus::Committed;
        record.finished = Some(Instant::now());
        self.record_final(&record)?;
        Ok(record)
    }

    /// The rollback target of a commit on `main`: the last good frame; with none yet, the
    /// head just captured, which also becomes the last good frame if the probes pass on
    /// it now (returned, to be set as the commit begins).
    fn initial_last_good(
        &self,
        record: &mut CommitRecord,
        head: &FrameRecord,
    ) -> Result<Option<Hash>, CommitError> {
        if let Some(good) = self.last_good()? {
            record.last_good = Some(good);
            return Ok(None);
        }
        record.last_good = Some(head.id);
        let (_, failed) = probe::observe_all(self.replica, &self.limits);
        match failed {
            None => Ok(Some(head.id)),
            Some(failure) => {
                record.note = Some(format!(
                    "no known good frame: probes failed before the commit ({}: {}); a rollback restores the pre-commit frame",
                    failure.probe, failure.evidence
                ));
                Ok(None)
            }
        }
    }

    fn run_declared(&self, what: &str, template: &str) -> Result<CommandOutcome, CommitError> {
        command::run(
            &command::expand(template, &self.replica.root),
            &self.replica.root,
            Duration::from_millis(self.replica.check_timeout_ms),
            self.limits.command_output_bytes_max,
            false,
        )
        .map_err(|error| {
            SandboxError::Command {
                what: format!("{what} {template:?}"),
                reason: error.to_string(),
            }
            .into()
        })
    }

    /// Performs the engine's effects until it is done (or, with `stop_at_watching`, until
    /// the commit is recorded as watching).
    fn drive(
        &self,
        mut engine: CommitEngine,
        first: Input,
        live: Option<&Live>,
        stop_at_watching: bool,
    ) -> Result<CommitRecord, CommitError> {
        let clock = Clock::now();
        let now_ms = || clock.elapsed().as_millis() as u64;
        let mut effect = engine.step(first, now_ms())?;
        loop {
            let input = match effect {
                Effect::Submit { step, actor, audit } => {
                    self.submit(&mut engine, step, actor, audit)?;
                    Input::Submitted
                }
                Effect::WriteLive => {
                    let written = match live {
                        Some(live) => live::write_live(
                            self.store,
                            &live.view,
                            &self.replica.root,
                            &live.touched,
                            &self.limits,
                            &engine.record().commit,
                        )
                        .map_err(|error| error.to_string()),
                        None => Err("nothing to write (no applied state)".to_string()),
                    };
                    Input::Written(written)
                }
                Effect::RunAction(action) => {
                    let template = self
                        .replica
                        .actions
                        .get(&action)
                        .cloned()
                        .unwrap_or_default();
                    Input::Ran(self.run_declared(&format!("action {action:?}"), &template)?)
                }
                Effect::RunAfterCommit => {
                    let template = self.replica.after_commit.clone().unwrap_or_default();
                    Input::Ran(self.run_declared("after_commit", &template)?)
                }
                Effect::Capture => Input::Captured(self.capture()?),
                Effect::Watching if stop_at_watching => return Ok(engine.into_record()),
                Effect::Watching => Input::Watch,
                Effect::Probe { after } => {
                    std::thread::sleep(after);
                    let (_, failed) = probe::observe_all(self.replica, &self.limits);
                    Input::Probed { failed }
                }
                Effect::Restore { frame } => {
                    self.restore_live(&frame)?;
                    Input::Restored
                }
                Effect::Done => return Ok(engine.into_record()),
            };
            effect = engine.step(input, now_ms())?;
        }
    }

    /// Turns a catalog step of the engine into a command about its record and submits it.
    fn submit(
        &self,
        engine: &mut CommitEngine,
        step: CatalogStep,
        actor: Actor,
        audit: Vec<AuditEvent>,
    ) -> Result<(), CommitError> {
        let now = Instant::now();
        if engine.record().status.is_final() {
            engine.stamp_finished(now);
        }
        let record = engine.record();
        let party = match actor {
            Actor::Requester => record.party.as_str(),
            Actor::System => SYSTEM_PARTY,
        };
        let guard = match step {
            CatalogStep::Begin { .. } => self.reviews_seen,
            _ => None,
        };
        let body = RecordBody::of(record)?;
        let change = match step {
            CatalogStep::Begin { last_good } => Change::BeginCommit {
                commit: record.commit,
                status: record.status,
                record: body,
                last_good,
            },
            CatalogStep::Advance { last_good } => Change::AdvanceCommit {
                commit: record.commit,
                status: record.status,
                record: body,
                last_good,
            },
            CatalogStep::Event => Change::Event,
        };
        let mut command = Command::new(now, self.name(), &record.timeline, party, change)
            .with_reviews_seen(guard);
        command.audit = audit;
        self.store.submit(&command)?;
        Ok(())
    }

    /// Watches a `watching` commit for the replica's watch window; a failed probe rolls
    /// it back. Returns the final record.
    pub fn watch(&self, record: CommitRecord) -> Result<CommitRecord, CommitError> {
        if record.status != CommitStatus::Watching {
            return Ok(record);
        }
        let engine = CommitEngine::watching(record, self.watch_settings());
        self.drive(engine, Input::Watch, None, false)
    }

    /// Makes the live root equal to `frame` (paths the replica excludes are left alone).
    fn restore_live(&self, frame: &Hash) -> Result<(), CommitError> {
        let frame = self.store.frame(frame)?;
        let view = kairos_replay::open_frame(self.store, frame)?;
        // The store's own directory inside the root is neither removed nor rewritten.
        let mut exclude = self.replica.exclude.clone();
        for inside in protected_inside(&self.replica.root, &self.protected) {
            exclude.extend(kairos_replay::restore::directory_globs(&inside));
        }
        kairos_replay::restore(
            self.store,
            &view,
            &self.replica.root,
            &RestoreOptions {
                force: true,
                exclude,
                progress: None,
                // On disk before the record says so.
                durable: true,
            },
        )?;
        Ok(())
    }

    /// `kairos revert R --to SPEC`: restores any frame to the live root, as a commit.
    pub fn revert(&self, spec: &TimelineSpec, party: &str) -> Result<CommitRecord, CommitError> {
        self.refuse_if_busy()?;
        let started = Instant::now();
        let target = self.store.resolve(self.name(), spec, started)?;
        let head = self.capture()?;
        let record = CommitRecord {
            commit: Hash::of(
                0x52,
                &[
                    self.name().as_bytes(),
                    target.id.as_bytes(),
                    party.as_bytes(),
                    &started.to_sortable_bytes(),
                ]
                .concat(),
            ),
            replica: self.name().to_string(),
            timeline: MAIN_TIMELINE.to_string(),
            kind: CommitKind::Revert,
            party: party.to_string(),
            status: CommitStatus::Applying,
            proposal: None,
            ops: Vec::new(),
            base: target.id,
            applied_on: head.id,
            rebased: false,
            conflicts: Vec::new(),
            touched: Vec::new(),
            frame: None,
            // Where an interrupted revert goes back to: the last good frame, else the
            // state it started from.
            last_good: Some(self.last_good()?.unwrap_or(head.id)),
            actions: Vec::new(),
            after_commit: None,
            probe_runs: 0,
            probe_failures: Vec::new(),
            rollback: None,
            note: Some(format!("revert to frame {} ({})", target.id.short(), spec)),
            started,
            finished: None,
        };
        let engine = CommitEngine::new(
            record,
            Plan::Revert { target: target.id },
            self.watch_settings(),
        );
        self.drive(engine, Input::Start, None, false)
    }

    /// After a crash: a commit left in progress is rolled back to its last good frame (a
    /// state the audit log names), and recorded so. Returns the recovered record.
    pub fn recover(&self) -> Result<Option<CommitRecord>, CommitError> {
        let Some(marker) = self.store.pending_marker(self.name())? else {
            return Ok(None);
        };
        let record = match self.pending()? {
            Some(record) if !record.status.is_final() => record,
            // A marker without a record, or naming a finished commit (stores written by
            // earlier versions): nothing was left half-done on the live root.
            _ => {
                self.store.submit(&Command::new(
                    Instant::now(),
                    self.name(),
                    MAIN_TIMELINE,
                    SYSTEM_PARTY,
                    Change::ClearPending { marker },
                ))?;
                return Ok(None);
            }
        };
        let engine = CommitEngine::new(record, Plan::Recover, self.watch_settings());
        self.drive(engine, Input::Start, None, false).map(Some)
    }
}

/// The record of a commit about to start: its id, what it applies, on which head.
fn new_commit_record(
    replica: &str,
    proposal: &Proposal,
    ops: &[(usize, kairos_sandbox::Op)],
    party: &str,
    started: Instant,
    base: &FrameRecord,
    head: &FrameRecord,
) -> CommitRecord {
    let op_indexes: Vec<usize> = ops.iter().map(|(index, _)| *index).collect();
    let id_bytes = [
        replica.as_bytes(),
        proposal.id.as_bytes(),
        party.as_bytes(),
        &started.to_sortable_bytes(),
        format!("{op_indexes:?}").as_bytes(),
    ]
    .concat();
    CommitRecord {
        commit: Hash::of(0x43, &id_bytes),
        replica: replica.to_string(),
        timeline: proposal.timeline.clone(),
        kind: CommitKind::Commit,
        party: party.to_string(),
        status: CommitStatus::Applying,
        proposal: Some(proposal.id),
        ops: op_indexes,
        base: base.id,
        applied_on: head.id,
        rebased: false,
        conflicts: Vec::new(),
        touched: Vec::new(),
        frame: None,
        last_good: None,
        actions: Vec::new(),
        after_commit: None,
        probe_runs: 0,
        probe_failures: Vec::new(),
        rollback: None,
        note: None,
        started,
        finished: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_overlapping_paths() {
        let touched: BTreeSet<String> = ["etc/app.toml", "www"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let changed: BTreeSet<String> = ["etc/other.toml", "www/index.html"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(conflicts(&touched, &changed), vec!["www".to_string()]);
        let changed: BTreeSet<String> = ["etc".to_string()].into();
        assert_eq!(
            conflicts(&touched, &changed),
            vec!["etc/app.toml".to_string()]
        );
        assert!(!overlaps("etc/app", "etc/app.toml"));
    }

    #[test]
    fn a_failure_at_any_point_of_the_window_rolls_back() {
        let window = Duration::from_secs(10);
        assert_eq!(
            watch_step(None, Duration::from_secs(1), window),
            WatchStep::Continue
        );
        assert_eq!(watch_step(None, window, window), WatchStep::Good);
        let failure = ProbeObservation {
            probe: "http".into(),
            passed: false,
            evidence: "status 502".into(),
            at: Instant(0),
            duration_ms: 1,
        };
        assert_eq!(
            watch_step(Some(failure.clone()), window * 2, window),
            WatchStep::RollBack(failure)
        );
    }
}
