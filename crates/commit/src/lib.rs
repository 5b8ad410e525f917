//! Kairos commits: the chosen ops of a proposal written to the live replica (on `main`) or
//! recorded as a new frame (on a fork), conflicts and rebases against the timeline head,
//! probes over the watch window, automated rollback to the last good frame, revert by
//! hand, and recovery of a commit interrupted by a crash. Every step is recorded (commit
//! records and the replica's audit log) before and after it happens.
//!
//! The decisions (does a commit conflict, what does a probe failure lead to) are plain
//! functions; [`Committer`] runs them against the store, the live root and a [`Capturer`].

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
use kairos_store::{CatalogError, FrameDraft, FrameRecord, Store, StoreError, WriteStats, keys};
use serde::{Deserialize, Serialize};

pub use probe::ProbeObservation;

/// Who acts when Kairos itself acts (automated rollback, recovery).
pub const SYSTEM_PARTY: &str = "kairos";

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(
        "replica {replica:?}: commit {commit} is in progress ({status}); wait for it to finish"
    )]
    Busy {
        replica: String,
        commit: String,
        status: String,
    },
    #[error("replica {replica:?}: no commit id starts with {prefix:?}")]
    UnknownCommit { replica: String, prefix: String },
    #[error("capturing replica {replica:?}: {reason}")]
    Capture { replica: String, reason: String },
    #[error("writing the live replica at {path}: {reason}")]
    Live { path: String, reason: String },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a commit stands. `applying`, `watching` and `rolling_back` are in progress;
/// the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitStatus {
    Applying,
    Watching,
    RollingBack,
    Committed,
    RolledBack,
    Conflict,
    Failed,
}

impl CommitStatus {
    pub fn name(self) -> &'static str {
        match self {
            CommitStatus::Applying => "applying",
            CommitStatus::Watching => "watching",
            CommitStatus::RollingBack => "rolling_back",
            CommitStatus::Committed => "committed",
            CommitStatus::RolledBack => "rolled_back",
            CommitStatus::Conflict => "conflict",
            CommitStatus::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommitStatus::Applying | CommitStatus::Watching | CommitStatus::RollingBack
        )
    }
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
}

/// One commit (or revert) and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// Unique id (hash of replica, proposal, ops, party and start time).
    pub commit: Hash,
    pub replica: String,
    pub timeline: String,
    /// `commit` or `revert`.
    pub kind: String,
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

/// Runs commits, reverts and recoveries for one replica.
pub struct Committer<'a> {
    pub store: &'a Store,
    pub replica: &'a ReplicaDefinition,
    pub limits: Limits,
    pub capturer: &'a dyn Capturer,
}

fn audit_details(record: &CommitRecord) -> serde_json::Value {
    serde_json::json!({
        "commit": record.commit.to_hex(),
        "kind": record.kind,
        "status": record.status.name(),
        "timeline": record.timeline,
        "proposal": record.proposal.map(|p| p.to_hex()),
        "ops": record.ops,
        "base": record.base.to_hex(),
        "applied_on": record.applied_on.to_hex(),
        "rebased": record.rebased,
        "frame": record.frame.map(|f| f.to_hex()),
        "last_good": record.last_good.map(|f| f.to_hex()),
        "conflicts": record.conflicts,
        "note": record.note,
    })
}

impl Committer<'_> {
    fn name(&self) -> &str {
        &self.replica.name
    }

    fn save(&self, record: &CommitRecord) -> Result<(), CommitError> {
        Ok(self
            .store
            .put_record(keys::COMMIT, self.name(), &record.commit, record)?)
    }

    fn audit(
        &self,
        party: &str,
        event: &str,
        details: serde_json::Value,
    ) -> Result<(), CommitError> {
        self.store
            .audit_append(self.name(), party, event, details, Instant::now())?;
        Ok(())
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
        let Some(value) = self.store.replica_value(keys::PENDING, self.name())? else {
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
        Ok(self.store.record(keys::COMMIT, self.name(), &id)?)
    }

    fn ensure_idle(&self) -> Result<(), CommitError> {
        if let Some(record) = self.pending()? {
            return Err(CommitError::Busy {
                replica: self.name().to_string(),
                commit: record.commit.short(),
                status: record.status.name().to_string(),
            });
        }
        Ok(())
    }

    /// The last frame known good (probes passed), if any.
    pub fn last_good(&self) -> Result<Option<Hash>, CommitError> {
        Ok(self
            .store
            .replica_value(keys::GOOD, self.name())?
            .and_then(|value| Hash::from_slice(&value)))
    }

    pub fn commit_record(&self, prefix: &str) -> Result<CommitRecord, CommitError> {
        let prefix_hex = kairos_core::hash::parse_hex_prefix(prefix)
            .map_err(|error| SandboxError::Invalid(format!("commit id {prefix:?}: {error}")))?;
        let ids = self
            .store
            .record_ids(keys::COMMIT, self.name(), &prefix_hex)?;
        match ids.as_slice() {
            [id] => Ok(self
                .store
                .record(keys::COMMIT, self.name(), id)?
                .ok_or_else(|| CommitError::UnknownCommit {
                    replica: self.name().to_string(),
                    prefix: prefix_hex.clone(),
                })?),
            _ => Err(CommitError::UnknownCommit {
                replica: self.name().to_string(),
                prefix: prefix_hex,
            }),
        }
    }

    /// Starts a commit of `proposal`'s chosen ops: checks for conflicts, applies the ops
    /// (to the live root on `main`, as a new frame on a fork) and records it. On `main`
    /// the returned record is `watching`: call [`Committer::watch`] to finish it.
    pub fn begin(
        &self,
        proposal: &Proposal,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Result<CommitRecord, CommitError> {
        self.ensure_idle()?;
        let ops = select_ops(proposal, chosen)?;
        let started = Instant::now();
        let live = proposal.timeline == MAIN_TIMELINE;
        let head = if live {
            // The live root may have moved since the last frame: capture it first.
            self.capture()?
        } else {
            let spec = TimelineSpec::parse(&format!("{}@latest", proposal.timeline))
                .map_err(|error| SandboxError::Invalid(error.to_string()))?;
            self.store.resolve(self.name(), &spec, started)?
        };
        let base = self.store.frame(&proposal.base)?;
        let id_bytes = [
            self.name().as_bytes(),
            proposal.id.as_bytes(),
            party.as_bytes(),
            &started.to_sortable_bytes(),
            format!("{:?}", ops.iter().map(|(i, _)| *i).collect::<Vec<_>>()).as_bytes(),
        ]
        .concat();
        let mut record = CommitRecord {
            commit: Hash::of(0x43, &id_bytes),
            replica: self.name().to_string(),
            timeline: proposal.timeline.clone(),
            kind: "commit".into(),
            party: party.to_string(),
            status: CommitStatus::Applying,
            proposal: Some(proposal.id),
            ops: ops.iter().map(|(index, _)| *index).collect(),
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
        };
        let base_files = base_root(self.store, &base)?.files;
        let head_root = base_root(self.store, &head)?;
        // A head with the same files as the base (a capture of an unchanged root) needs
        // no rebase.
        record.rebased = head_root.files != base_files;
        if record.rebased {
            // The paths the ops name (validated when proposed), as the files diff names them.
            let touched: BTreeSet<String> = ops
                .iter()
                .filter_map(|(_, op)| op.path())
                .filter_map(|path| kairos_sandbox::proposal::path_components(path).ok())
                .map(|components| String::from_utf8_lossy(&components.join(&b'/')).into_owned())
                .collect();
            let (changed, _) =
                kairos_replay::diff_files(self.store, &Hash(base_files), &Hash(head_root.files))?;
            let changed: BTreeSet<String> = changed.into_iter().map(|change| change.path).collect();
            let found = conflicts(&touched, &changed);
            if !found.is_empty() {
                record.status = CommitStatus::Conflict;
                record.conflicts = found;
                record.finished = Some(Instant::now());
                record.note = Some(format!(
                    "the head moved from {} to {} and changed entries the ops touch",
                    base.id.short(),
                    head.id.short()
                ));
                self.save(&record)?;
                self.audit(party, "commit", audit_details(&record))?;
                return Ok(record);
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
        if !live {
            let frame = self.store.commit_frame(FrameDraft {
                replica: self.name().to_string(),
                timeline: proposal.timeline.clone(),
                time: started,
                parent: Some(head.id),
                root: applied.root,
                entries: applied.root_node.file_entries,
                bytes: applied.root_node.file_bytes,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })?;
            record.frame = Some(frame.id);
            record.status = CommitStatus::Committed;
            record.finished = Some(Instant::now());
            self.save(&record)?;
            self.audit(party, "commit", audit_details(&record))?;
            return Ok(record);
        }

        // On main: the rollback target is the last good frame; with none yet, the state
        // just captured if the probes pass on it now.
        record.last_good = match self.last_good()? {
            Some(good) => Some(good),
            None => {
                let (_, failed) = probe::observe_all(self.replica, &self.limits);
                match failed {
                    None => {
                        self.store.set_replica_value(
                            keys::GOOD,
                            self.name(),
                            Some(head.id.as_bytes()),
                        )?;
                        Some(head.id)
                    }
                    Some(failure) => {
                        record.note = Some(format!(
                            "no known good frame: probes failed before the commit ({}: {}); a rollback restores the pre-commit frame",
                            failure.probe, failure.evidence
                        ));
                        Some(head.id)
                    }
                }
            }
        };
        // Recorded before the live root is touched: a crash from here on is recovered.
        self.save(&record)?;
        self.store
            .set_replica_value(keys::PENDING, self.name(), Some(record.commit.as_bytes()))?;
        self.audit(party, "commit", audit_details(&record))?;

        let view = state_view(self.name(), &head, applied.root, applied.root_node.clone());
        if let Err(error) = live::write_live(
            self.store,
            &view,
            &self.replica.root,
            &applied.touched,
            &self.limits,
            &record.commit,
        ) {
            let evidence = format!("writing the commit failed: {error}");
            self.roll_back(&mut record, evidence, Clock::now())?;
            return Ok(record);
        }
        for action in &applied.actions {
            let template = self
                .replica
                .actions
                .get(action)
                .cloned()
                .unwrap_or_default();
            record
                .actions
                .push(self.run_declared(&format!("action {action:?}"), &template)?);
        }
        if let Some(template) = self.replica.after_commit.clone() {
            record.after_commit = Some(self.run_declared("after_commit", &template)?);
        }
        let frame = self.capture()?;
        record.frame = Some(frame.id);
        // A declared command that fails (a reload that refuses the config) is a failure
        // observed at once: roll back without waiting for the probes.
        let failed_command = record
            .actions
            .iter()
            .chain(record.after_commit.as_ref())
            .find(|outcome| !outcome.passed)
            .cloned();
        if let Some(outcome) = failed_command {
            let evidence = format!(
                "{:?} failed: {}{}",
                outcome.command,
                outcome
                    .exit_code
                    .map(|code| format!("exit code {code}"))
                    .unwrap_or_else(|| "killed".into()),
                if outcome.output.trim().is_empty() {
                    String::new()
                } else {
                    format!(", output: {}", outcome.output.trim())
                }
            );
            self.roll_back(&mut record, evidence, Clock::now())?;
            return Ok(record);
        }
        record.status = CommitStatus::Watching;
        self.save(&record)?;
        Ok(record)
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

    /// Watches a `watching` commit for the replica's watch window; a failed probe rolls
    /// it back. Returns the final record.
    pub fn watch(&self, mut record: CommitRecord) -> Result<CommitRecord, CommitError> {
        if record.status != CommitStatus::Watching {
            return Ok(record);
        }
        // Without probes there is nothing to watch: the window would only delay.
        let window = if self.replica.probes.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_millis(self.replica.watch_window_ms)
        };
        let interval = Duration::from_millis(self.replica.probe_interval_ms);
        let started = Clock::now();
        loop {
            let round = Clock::now();
            let (_, failed) = probe::observe_all(self.replica, &self.limits);
            record.probe_runs += 1;
            match watch_step(failed, started.elapsed(), window) {
                WatchStep::Continue => {
                    let spent = round.elapsed();
                    let remaining = window.saturating_sub(started.elapsed());
                    std::thread::sleep(interval.saturating_sub(spent).min(remaining));
                }
                WatchStep::Good => {
                    record.status = CommitStatus::Committed;
                    record.finished = Some(Instant::now());
                    if let Some(frame) = record.frame {
                        self.store.set_replica_value(
                            keys::GOOD,
                            self.name(),
                            Some(frame.as_bytes()),
                        )?;
                    }
                    self.save(&record)?;
                    self.store
                        .set_replica_value(keys::PENDING, self.name(), None)?;
                    self.audit(
                        &record.party.clone(),
                        "probe",
                        serde_json::json!({
                            "commit": record.commit.to_hex(),
                            "passed": true,
                            "runs": record.probe_runs,
                            "window_ms": self.replica.watch_window_ms,
                        }),
                    )?;
                    self.audit(&record.party.clone(), "commit", audit_details(&record))?;
                    return Ok(record);
                }
                WatchStep::RollBack(failure) => {
                    let observed = Clock::now();
                    record.probe_failures.push(failure.clone());
                    self.audit(
                        SYSTEM_PARTY,
                        "probe",
                        serde_json::json!({
                            "commit": record.commit.to_hex(),
                            "passed": false,
                            "probe": failure.probe,
                            "evidence": failure.evidence,
                        }),
                    )?;
                    let evidence = format!("{}: {}", failure.probe, failure.evidence);
                    self.roll_back(&mut record, evidence, observed)?;
                    return Ok(record);
                }
            }
        }
    }

    /// Restores the commit's last good frame to the live root, runs after_commit,
    /// captures, and records the commit rolled back.
    fn roll_back(
        &self,
        record: &mut CommitRecord,
        evidence: String,
        since: Clock,
    ) -> Result<(), CommitError> {
        let target = record.last_good.unwrap_or(record.applied_on);
        record.status = CommitStatus::RollingBack;
        self.save(record)?;
        self.store
            .set_replica_value(keys::PENDING, self.name(), Some(record.commit.as_bytes()))?;
        self.restore_live(&target)?;
        let restored_ms = since.elapsed().as_millis() as u64;
        let after_commit = match self.replica.after_commit.clone() {
            Some(template) => Some(self.run_declared("after_commit", &template)?),
            None => None,
        };
        let frame = self.capture()?;
        record.rollback = Some(Rollback {
            to: target,
            frame: Some(frame.id),
            evidence,
            restored_ms,
            after_commit,
        });
        record.status = CommitStatus::RolledBack;
        record.finished = Some(Instant::now());
        self.save(record)?;
        self.store
            .set_replica_value(keys::PENDING, self.name(), None)?;
        self.audit(
            SYSTEM_PARTY,
            "rollback",
            serde_json::json!({
                "commit": record.commit.to_hex(),
                "to": target.to_hex(),
                "frame": frame.id.to_hex(),
                "evidence": record.rollback.as_ref().map(|r| r.evidence.clone()),
                "restored_ms": restored_ms,
            }),
        )?;
        Ok(())
    }

    /// Makes the live root equal to `frame` (paths the replica excludes are left alone).
    fn restore_live(&self, frame: &Hash) -> Result<(), CommitError> {
        let frame = self.store.frame(frame)?;
        let view = kairos_replay::open_frame(self.store, frame)?;
        kairos_replay::restore(
            self.store,
            &view,
            &self.replica.root,
            &RestoreOptions {
                force: true,
                exclude: self.replica.exclude.clone(),
                progress: None,
                // On disk before the record says so.
                durable: true,
            },
        )?;
        Ok(())
    }

    /// `kairos revert R --to SPEC`: restores any frame to the live root, as a commit.
    pub fn revert(&self, spec: &TimelineSpec, party: &str) -> Result<CommitRecord, CommitError> {
        self.ensure_idle()?;
        let started = Instant::now();
        let target = self.store.resolve(self.name(), spec, started)?;
        let head = self.capture()?;
        let mut record = CommitRecord {
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
            kind: "revert".into(),
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
            last_good: Some(head.id),
            actions: Vec::new(),
            after_commit: None,
            probe_runs: 0,
            probe_failures: Vec::new(),
            rollback: None,
            note: Some(format!("revert to frame {} ({})", target.id.short(), spec)),
            started,
            finished: None,
        };
        self.save(&record)?;
        self.store
            .set_replica_value(keys::PENDING, self.name(), Some(record.commit.as_bytes()))?;
        self.restore_live(&target.id)?;
        if let Some(template) = self.replica.after_commit.clone() {
            record.after_commit = Some(self.run_declared("after_commit", &template)?);
        }
        let frame = self.capture()?;
        record.frame = Some(frame.id);
        record.status = CommitStatus::Committed;
        record.finished = Some(Instant::now());
        // A revert chosen by hand becomes the rollback target once the probes pass on it.
        let (observations, failed) = probe::observe_all(self.replica, &self.limits);
        record.probe_runs = u64::from(!observations.is_empty());
        match failed {
            None => {
                self.store
                    .set_replica_value(keys::GOOD, self.name(), Some(frame.id.as_bytes()))?
            }
            Some(failure) => {
                record.note = Some(format!(
                    "{}; probes fail on it ({}: {}), so it is not the last good frame",
                    record.note.clone().unwrap_or_default(),
                    failure.probe,
                    failure.evidence
                ));
                record.probe_failures.push(failure);
            }
        }
        self.save(&record)?;
        self.store
            .set_replica_value(keys::PENDING, self.name(), None)?;
        self.audit(party, "revert", audit_details(&record))?;
        Ok(record)
    }

    /// After a crash: a commit left in progress is rolled back to its last good frame (a
    /// state the audit log names), and recorded so. Returns the recovered record.
    pub fn recover(&self) -> Result<Option<CommitRecord>, CommitError> {
        let Some(mut record) = self.pending()? else {
            if self
                .store
                .replica_value(keys::PENDING, self.name())?
                .is_some()
            {
                // The pending marker was written but its record was not: nothing was
                // written live (the record is saved first).
                self.store
                    .set_replica_value(keys::PENDING, self.name(), None)?;
            }
            return Ok(None);
        };
        if record.status.is_final() {
            self.store
                .set_replica_value(keys::PENDING, self.name(), None)?;
            return Ok(None);
        }
        let was = record.status;
        self.audit(
            SYSTEM_PARTY,
            "recovery",
            serde_json::json!({
                "commit": record.commit.to_hex(),
                "status": was.name(),
                "to": record.last_good.unwrap_or(record.applied_on).to_hex(),
            }),
        )?;
        let evidence = format!(
            "the node stopped while the {} was {}; the last good frame was restored on restart",
            record.kind,
            was.name()
        );
        self.roll_back(&mut record, evidence, Clock::now())?;
        Ok(Some(record))
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
