//! The commit state machine without IO, in the style of openraft's `Engine`: inputs
//! (a catalog command accepted, files written, a command run, a capture done, a probe
//! round, the last good frame restored) go in, one effect comes out (submit a catalog
//! command, write the live files, run an action or `after_commit`, capture, probe, sleep,
//! restore a frame, done). A thin driver ([`crate::Committer`]) performs the effects.
//!
//! ```text
//! commit:   begin ─► write ─► actions ─► after_commit ─► capture ─► watching ─► probes ─► committed
//!                      └─ failure ─┴──────────┴─ failing command ─┘            └ failure ┐
//!                                                                      rolling_back ◄─┘
//! revert:   begin ─► restore target ─► after_commit ─► capture ─► one probe round ─► committed
//! recover:  recovery event ─► rolling_back ─► restore last good ─► after_commit ─► capture ─► rolled_back
//! ```
//!
//! Time enters as milliseconds on the driver's monotonic clock, passed with each input.

use std::time::Duration;

use kairos_core::{CommitStatus, Hash};
use kairos_sandbox::CommandOutcome;
use kairos_store::AuditEvent;
use kairos_store::FrameRecord;
use kairos_store::audit::{ProbeEvent, RecoveryEvent, RollbackEvent};

use crate::{CommitRecord, ProbeObservation, Rollback, WatchStep, audit_event, watch_step};

/// Who a catalog command is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The party that asked for the commit.
    Requester,
    /// Kairos itself (a probe failure, a rollback, a recovery).
    System,
}

/// A catalog change the engine asks for; the driver turns it into a command about the
/// engine's record.
#[derive(Debug, Clone, PartialEq)]
pub enum CatalogStep {
    /// `BeginCommit`: guarded by "no commit pending", sets the marker.
    Begin { last_good: Option<Hash> },
    /// `AdvanceCommit` to the record's current status (final ones clear the marker).
    Advance { last_good: Option<Hash> },
    /// Only the audit events.
    Event,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Submit a catalog command for the record as it now is, with these audit events;
    /// answer [`Input::Submitted`].
    Submit {
        step: CatalogStep,
        actor: Actor,
        audit: Vec<AuditEvent>,
    },
    /// Write the proposal's touched files to the live root; answer [`Input::Written`].
    WriteLive,
    /// Run the declared action; answer [`Input::Ran`].
    RunAction(String),
    /// Run the replica's `after_commit`; answer [`Input::Ran`].
    RunAfterCommit,
    /// Capture the live root; answer [`Input::Captured`].
    Capture,
    /// The commit is applied and recorded as watching: a driver may stop here (another
    /// thread watches) or answer [`Input::Watch`] to go on.
    Watching,
    /// Wait, then run one round of probes; answer [`Input::Probed`].
    Probe { after: Duration },
    /// Make the live root equal to `frame`; answer [`Input::Restored`].
    Restore { frame: Hash },
    /// Nothing more: the record is final.
    Done,
}

/// What happened, as the driver saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Begin (or resume, for a recovery or a watch).
    Start,
    Submitted,
    Written(Result<(), String>),
    Ran(CommandOutcome),
    Captured(FrameRecord),
    Watch,
    Probed {
        failed: Option<ProbeObservation>,
    },
    Restored,
}

/// A driver fed an input the engine was not waiting for: a bug in the driver, reported
/// rather than guessed around.
#[derive(Debug, thiserror::Error)]
#[error("commit engine: input {input} does not fit phase {phase}")]
pub struct UnexpectedInput {
    pub input: String,
    pub phase: String,
}

/// What kind of run this is.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A commit of ops: write them, run these actions, then watch.
    Commit {
        actions: Vec<String>,
        /// The last good frame to set as the commit begins (see [`CatalogStep::Begin`]).
        set_last_good: Option<Hash>,
    },
    /// A revert: restore `target` as a commit.
    Revert { target: Hash },
    /// A commit a crash left in progress: roll it back.
    Recover,
}

/// The settings of the replica the engine needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watch {
    /// Zero when the replica has no probes: nothing to wait for.
    pub window: Duration,
    pub interval: Duration,
    pub has_after_commit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    Beginning,
    Writing,
    Action(usize),
    AfterCommit,
    Capturing,
    MarkingWatching,
    Watching,
    Probing,
    Finishing,
    Recovering,
    MarkingRollingBack,
    Restoring,
    RollbackAfterCommit,
    RollbackCapturing,
    FinishingRollback,
    Done,
}

/// One commit, revert or recovery as a state machine.
#[derive(Debug, Clone)]
pub struct CommitEngine {
    record: CommitRecord,
    plan: Plan,
    watch: Watch,
    phase: Phase,
    watch_started_ms: u64,
    round_started_ms: u64,
    failure_at_ms: u64,
    evidence: String,
    rollback_after_commit: Option<CommandOutcome>,
}

impl CommitEngine {
    /// A commit about to begin (status `applying`), a revert, or a recovery of `record`.
    pub fn new(record: CommitRecord, plan: Plan, watch: Watch) -> CommitEngine {
        CommitEngine {
            record,
            plan,
            watch,
            phase: Phase::Idle,
            watch_started_ms: 0,
            round_started_ms: 0,
            failure_at_ms: 0,
            evidence: String::new(),
            rollback_after_commit: None,
        }
    }

    /// A commit recorded as watching, to be watched from here (e.g. on another thread).
    pub fn watching(record: CommitRecord, watch: Watch) -> CommitEngine {
        let mut engine = CommitEngine::new(
            record,
            Plan::Commit {
                actions: Vec::new(),
                set_last_good: None,
            },
            watch,
        );
        engine.phase = Phase::Watching;
        engine
    }

    pub fn record(&self) -> &CommitRecord {
        &self.record
    }

    /// Stamps the time a final record finished (the engine reads no clock).
    pub fn stamp_finished(&mut self, at: kairos_core::Instant) {
        self.record.finished.get_or_insert(at);
    }

    pub fn into_record(self) -> CommitRecord {
        self.record
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn unexpected(&self, input: &Input) -> UnexpectedInput {
        let name = format!("{input:?}");
        UnexpectedInput {
            input: name.split(['(', ' ', '{']).next().unwrap_or("").to_string(),
            phase: format!("{:?}", self.phase),
        }
    }

    /// Feeds one input at `now_ms` and returns the next effect.
    pub fn step(&mut self, input: Input, now_ms: u64) -> Result<Effect, UnexpectedInput> {
        let effect = match (self.phase, input) {
            (Phase::Idle, Input::Start) => match self.plan.clone() {
                Plan::Commit { set_last_good, .. } => {
                    self.record.status = CommitStatus::Applying;
                    self.phase = Phase::Beginning;
                    Effect::Submit {
                        step: CatalogStep::Begin {
                            last_good: set_last_good,
                        },
                        actor: Actor::Requester,
                        audit: vec![audit_event(&self.record)],
                    }
                }
                Plan::Revert { .. } => {
                    self.record.status = CommitStatus::Applying;
                    self.phase = Phase::Beginning;
                    Effect::Submit {
                        step: CatalogStep::Begin { last_good: None },
                        actor: Actor::Requester,
                        audit: vec![audit_event(&self.record)],
                    }
                }
                Plan::Recover => {
                    let was = self.record.status;
                    self.evidence = format!(
                        "the node stopped while the {} was {}; the last good frame was restored on restart",
                        self.record.kind.name(),
                        was.name()
                    );
                    self.failure_at_ms = now_ms;
                    self.phase = Phase::Recovering;
                    Effect::Submit {
                        step: CatalogStep::Event,
                        actor: Actor::System,
                        audit: vec![AuditEvent::Recovery(RecoveryEvent {
                            commit: self.record.commit,
                            status: was,
                            to: self.rollback_target(),
                        })],
                    }
                }
            },
            (Phase::Beginning, Input::Submitted) => match &self.plan {
                Plan::Revert { target } => {
                    self.phase = Phase::Writing;
                    Effect::Restore { frame: *target }
                }
                _ => {
                    self.phase = Phase::Writing;
                    Effect::WriteLive
                }
            },
            (Phase::Writing, Input::Written(Ok(()))) => self.next_action(0),
            (Phase::Writing, Input::Written(Err(reason))) => {
                self.begin_rollback(format!("writing the commit failed: {reason}"), now_ms)
            }
            (Phase::Writing, Input::Restored) if matches!(self.plan, Plan::Revert { .. }) => {
                self.after_actions()
            }
            (Phase::Action(index), Input::Ran(outcome)) => {
                self.record.actions.push(outcome);
                self.next_action(index + 1)
            }
            (Phase::AfterCommit, Input::Ran(outcome)) => {
                self.record.after_commit = Some(outcome);
                self.phase = Phase::Capturing;
                Effect::Capture
            }
            (Phase::Capturing, Input::Captured(frame)) => {
                self.record.frame = Some(frame.id);
                if matches!(self.plan, Plan::Revert { .. }) {
                    // A revert chosen by hand becomes the rollback target once the
                    // probes pass on it: one round, now.
                    self.phase = Phase::Probing;
                    self.round_started_ms = now_ms;
                    return Ok(Effect::Probe {
                        after: Duration::ZERO,
                    });
                }
                // A declared command that fails (a reload that refuses the config) is
                // a failure observed at once: roll back without waiting for probes.
                if let Some(outcome) = self.failed_command() {
                    return Ok(self.begin_rollback(command_evidence(&outcome), now_ms));
                }
                self.record.status = CommitStatus::Watching;
                self.phase = Phase::MarkingWatching;
                Effect::Submit {
                    step: CatalogStep::Advance { last_good: None },
                    actor: Actor::Requester,
                    audit: Vec::new(),
                }
            }
            (Phase::MarkingWatching, Input::Submitted) => {
                self.phase = Phase::Watching;
                Effect::Watching
            }
            (Phase::Watching, Input::Watch | Input::Start) => {
                self.watch_started_ms = now_ms;
                self.round_started_ms = now_ms;
                self.phase = Phase::Probing;
                Effect::Probe {
                    after: Duration::ZERO,
                }
            }
            (Phase::Probing, Input::Probed { failed }) => self.on_probed(failed, now_ms),
            (Phase::Finishing, Input::Submitted) => {
                self.phase = Phase::Done;
                Effect::Done
            }
            (Phase::Recovering, Input::Submitted) => self.mark_rolling_back(),
            (Phase::MarkingRollingBack, Input::Submitted) => {
                self.phase = Phase::Restoring;
                Effect::Restore {
                    frame: self.rollback_target(),
                }
            }
            (Phase::Restoring, Input::Restored) => {
                self.record.rollback = Some(Rollback {
                    to: self.rollback_target(),
                    frame: None,
                    evidence: self.evidence.clone(),
                    restored_ms: now_ms.saturating_sub(self.failure_at_ms),
                    after_commit: None,
                    recovered: matches!(self.plan, Plan::Recover),
                });
                if self.watch.has_after_commit {
                    self.phase = Phase::RollbackAfterCommit;
                    Effect::RunAfterCommit
                } else {
                    self.phase = Phase::RollbackCapturing;
                    Effect::Capture
                }
            }
            (Phase::RollbackAfterCommit, Input::Ran(outcome)) => {
                self.rollback_after_commit = Some(outcome);
                self.phase = Phase::RollbackCapturing;
                Effect::Capture
            }
            (Phase::RollbackCapturing, Input::Captured(frame)) => {
                let target = self.rollback_target();
                let rollback = self.record.rollback.get_or_insert(Rollback {
                    to: target,
                    frame: None,
                    evidence: self.evidence.clone(),
                    restored_ms: 0,
                    after_commit: None,
                    recovered: matches!(self.plan, Plan::Recover),
                });
                rollback.frame = Some(frame.id);
                rollback.after_commit = self.rollback_after_commit.take();
                let event = AuditEvent::Rollback(RollbackEvent {
                    commit: self.record.commit,
                    to: target,
                    frame: frame.id,
                    evidence: rollback.evidence.clone(),
                    restored_ms: rollback.restored_ms,
                    after_commit_passed: rollback
                        .after_commit
                        .as_ref()
                        .map(|outcome| outcome.passed),
                });
                self.record.status = CommitStatus::RolledBack;
                self.phase = Phase::FinishingRollback;
                Effect::Submit {
                    step: CatalogStep::Advance { last_good: None },
                    actor: Actor::System,
                    audit: vec![event],
                }
            }
            (Phase::FinishingRollback, Input::Submitted) => {
                self.phase = Phase::Done;
                Effect::Done
            }
            (_, input) => return Err(self.unexpected(&input)),
        };
        Ok(effect)
    }

    /// Where a rollback goes: the last good frame, else the head the commit started on.
    fn rollback_target(&self) -> Hash {
        self.record.last_good.unwrap_or(self.record.applied_on)
    }

    fn next_action(&mut self, index: usize) -> Effect {
        match &self.plan {
            Plan::Commit { actions, .. } if index < actions.len() => {
                self.phase = Phase::Action(index);
                Effect::RunAction(actions[index].clone())
            }
            _ => self.after_actions(),
        }
    }

    fn after_actions(&mut self) -> Effect {
        if self.watch.has_after_commit {
            self.phase = Phase::AfterCommit;
            Effect::RunAfterCommit
        } else {
            self.phase = Phase::Capturing;
            Effect::Capture
        }
    }

    fn failed_command(&self) -> Option<CommandOutcome> {
        self.record
            .actions
            .iter()
            .chain(self.record.after_commit.as_ref())
            .find(|outcome| !outcome.passed)
            .cloned()
    }

    fn on_probed(&mut self, failed: Option<ProbeObservation>, now_ms: u64) -> Effect {
        self.record.probe_runs += 1;
        if let Plan::Revert { .. } = self.plan {
            let frame = self.record.frame;
            let last_good = match failed {
                None => frame,
                Some(failure) => {
                    self.record.note = Some(format!(
                        "{}; probes fail on it ({}: {}), so it is not the last good frame",
                        self.record.note.clone().unwrap_or_default(),
                        failure.probe,
                        failure.evidence
                    ));
                    self.record.probe_failures.push(failure);
                    None
                }
            };
            self.record.status = CommitStatus::Committed;
            self.phase = Phase::Finishing;
            return Effect::Submit {
                step: CatalogStep::Advance { last_good },
                actor: Actor::Requester,
                audit: vec![audit_event(&self.record)],
            };
        }
        let elapsed = Duration::from_millis(now_ms.saturating_sub(self.watch_started_ms));
        match watch_step(failed, elapsed, self.watch.window) {
            WatchStep::Continue => {
                let spent = Duration::from_millis(now_ms.saturating_sub(self.round_started_ms));
                let remaining = self.watch.window.saturating_sub(elapsed);
                let after = self.watch.interval.saturating_sub(spent).min(remaining);
                self.round_started_ms = now_ms + after.as_millis() as u64;
                Effect::Probe { after }
            }
            WatchStep::Good => {
                self.record.status = CommitStatus::Committed;
                self.phase = Phase::Finishing;
                let probe = AuditEvent::Probe(ProbeEvent {
                    commit: self.record.commit,
                    passed: true,
                    runs: Some(self.record.probe_runs),
                    window_ms: Some(self.watch.window.as_millis() as u64),
                    probe: None,
                    evidence: None,
                });
                Effect::Submit {
                    step: CatalogStep::Advance {
                        last_good: self.record.frame,
                    },
                    actor: Actor::Requester,
                    audit: vec![probe, audit_event(&self.record)],
                }
            }
            WatchStep::RollBack(failure) => {
                self.failure_at_ms = now_ms;
                self.evidence = format!("{}: {}", failure.probe, failure.evidence);
                let probe = AuditEvent::Probe(ProbeEvent {
                    commit: self.record.commit,
                    passed: false,
                    runs: None,
                    window_ms: None,
                    probe: Some(failure.probe.clone()),
                    evidence: Some(failure.evidence.clone()),
                });
                self.record.probe_failures.push(failure);
                self.record.status = CommitStatus::RollingBack;
                self.phase = Phase::MarkingRollingBack;
                Effect::Submit {
                    step: CatalogStep::Advance { last_good: None },
                    actor: Actor::System,
                    audit: vec![probe],
                }
            }
        }
    }

    fn begin_rollback(&mut self, evidence: String, now_ms: u64) -> Effect {
        self.failure_at_ms = now_ms;
        self.evidence = evidence;
        self.mark_rolling_back()
    }

    fn mark_rolling_back(&mut self) -> Effect {
        self.record.status = CommitStatus::RollingBack;
        self.phase = Phase::MarkingRollingBack;
        Effect::Submit {
            step: CatalogStep::Advance { last_good: None },
            actor: Actor::System,
            audit: Vec::new(),
        }
    }
}

/// The evidence of a failing declared command.
fn command_evidence(outcome: &CommandOutcome) -> String {
    format!(
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
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_core::Instant;
    use kairos_core::spec::MAIN_TIMELINE;
    use kairos_store::audit::CommitKind;

    fn record(kind: CommitKind) -> CommitRecord {
        CommitRecord {
            commit: Hash([1; 32]),
            replica: "web".into(),
            timeline: MAIN_TIMELINE.into(),
            kind,
            party: "ops".into(),
            status: CommitStatus::Applying,
            proposal: None,
            ops: vec![1],
            base: Hash([2; 32]),
            applied_on: Hash([3; 32]),
            rebased: false,
            conflicts: Vec::new(),
            touched: Vec::new(),
            frame: None,
            last_good: Some(Hash([4; 32])),
            actions: Vec::new(),
            after_commit: None,
            probe_runs: 0,
            probe_failures: Vec::new(),
            rollback: None,
            note: None,
            started: Instant(0),
            finished: None,
        }
    }

    fn frame(id: u8) -> FrameRecord {
        FrameRecord {
            id: Hash([id; 32]),
            replica: "web".into(),
            timeline: MAIN_TIMELINE.into(),
            time: Instant(i64::from(id)),
            parent: None,
            root: Hash([id; 32]),
            entries: 0,
            bytes: 0,
            objects_new: 0,
            bytes_new_stored: 0,
            torn: 0,
            unreadable: 0,
            capture_ms: 0,
        }
    }

    fn outcome(passed: bool) -> CommandOutcome {
        CommandOutcome {
            command: "reload".into(),
            exit_code: Some(if passed { 0 } else { 1 }),
            signal: None,
            timed_out: false,
            passed,
            output: if passed { String::new() } else { "bad".into() },
            output_truncated: false,
            duration_ms: 1,
            peak_memory_bytes: 0,
        }
    }

    fn failure() -> ProbeObservation {
        ProbeObservation {
            probe: "http".into(),
            passed: false,
            evidence: "status 502".into(),
            at: Instant(0),
            duration_ms: 1,
        }
    }

    fn watch(after_commit: bool) -> Watch {
        Watch {
            window: Duration::from_millis(1000),
            interval: Duration::from_millis(300),
            has_after_commit: after_commit,
        }
    }

    fn commit_engine(actions: &[&str], after_commit: bool) -> CommitEngine {
        CommitEngine::new(
            record(CommitKind::Commit),
            Plan::Commit {
                actions: actions.iter().map(|a| a.to_string()).collect(),
                set_last_good: None,
            },
            watch(after_commit),
        )
    }

    /// Runs a commit to the watching hand-off.
    fn to_watching(engine: &mut CommitEngine) {
        assert!(matches!(
            engine.step(Input::Start, 0).unwrap(),
            Effect::Submit {
                step: CatalogStep::Begin { .. },
                ..
            }
        ));
        assert_eq!(engine.step(Input::Submitted, 1).unwrap(), Effect::WriteLive);
        assert_eq!(
            engine.step(Input::Written(Ok(())), 2).unwrap(),
            Effect::Capture
        );
        assert!(matches!(
            engine.step(Input::Captured(frame(5)), 3).unwrap(),
            Effect::Submit {
                step: CatalogStep::Advance { last_good: None },
                ..
            }
        ));
        assert_eq!(engine.record().status, CommitStatus::Watching);
        assert_eq!(engine.step(Input::Submitted, 4).unwrap(), Effect::Watching);
    }

    #[test]
    fn begin_records_before_writing_and_logs_the_commit() {
        let mut engine = commit_engine(&[], false);
        match engine.step(Input::Start, 0).unwrap() {
            Effect::Submit {
                step: CatalogStep::Begin { last_good },
                actor,
                audit,
            } => {
                assert_eq!(last_good, None);
                assert_eq!(actor, Actor::Requester);
                assert_eq!(audit.len(), 1);
                assert_eq!(audit[0].name(), "commit");
            }
            other => panic!("{other:?}"),
        }
        // Nothing is written live before the catalog accepted the commit.
        assert!(engine.step(Input::Written(Ok(())), 1).is_err());
    }

    #[test]
    fn actions_then_after_commit_run_in_order_before_the_capture() {
        let mut engine = commit_engine(&["restart", "warm"], true);
        engine.step(Input::Start, 0).unwrap();
        engine.step(Input::Submitted, 0).unwrap();
        assert_eq!(
            engine.step(Input::Written(Ok(())), 0).unwrap(),
            Effect::RunAction("restart".into())
        );
        assert_eq!(
            engine.step(Input::Ran(outcome(true)), 0).unwrap(),
            Effect::RunAction("warm".into())
        );
        assert_eq!(
            engine.step(Input::Ran(outcome(true)), 0).unwrap(),
            Effect::RunAfterCommit
        );
        assert_eq!(
            engine.step(Input::Ran(outcome(true)), 0).unwrap(),
            Effect::Capture
        );
        assert_eq!(engine.record().actions.len(), 2);
        assert!(engine.record().after_commit.is_some());
    }

    #[test]
    fn a_failing_after_commit_rolls_back_at_once() {
        let mut engine = commit_engine(&[], true);
        engine.step(Input::Start, 0).unwrap();
        engine.step(Input::Submitted, 0).unwrap();
        engine.step(Input::Written(Ok(())), 0).unwrap();
        engine.step(Input::Ran(outcome(false)), 10).unwrap();
        let effect = engine.step(Input::Captured(frame(5)), 20).unwrap();
        assert!(matches!(
            effect,
            Effect::Submit {
                actor: Actor::System,
                ..
            }
        ));
        assert_eq!(engine.record().status, CommitStatus::RollingBack);
        assert_eq!(
            engine.step(Input::Submitted, 21).unwrap(),
            Effect::Restore {
                frame: Hash([4; 32])
            }
        );
        assert_eq!(
            engine.step(Input::Restored, 25).unwrap(),
            Effect::RunAfterCommit
        );
        let rollback = engine.record().rollback.clone().unwrap();
        assert_eq!(rollback.restored_ms, 5);
        assert!(rollback.evidence.contains("exit code 1"), "{rollback:?}");
    }

    #[test]
    fn a_failed_write_rolls_back_without_running_actions() {
        let mut engine = commit_engine(&["restart"], true);
        engine.step(Input::Start, 0).unwrap();
        engine.step(Input::Submitted, 0).unwrap();
        engine
            .step(Input::Written(Err("disk full".into())), 7)
            .unwrap();
        assert_eq!(engine.record().status, CommitStatus::RollingBack);
        assert!(engine.record().actions.is_empty());
        assert_eq!(
            engine.step(Input::Submitted, 8).unwrap(),
            Effect::Restore {
                frame: Hash([4; 32])
            }
        );
    }

    #[test]
    fn probes_that_pass_for_the_window_commit_and_move_the_last_good_frame() {
        let mut engine = commit_engine(&[], false);
        to_watching(&mut engine);
        assert_eq!(
            engine.step(Input::Watch, 100).unwrap(),
            Effect::Probe {
                after: Duration::ZERO
            }
        );
        // A round that took 50 ms waits the rest of the interval...
        for now_ms in [150, 450, 750] {
            assert_eq!(
                engine.step(Input::Probed { failed: None }, now_ms).unwrap(),
                Effect::Probe {
                    after: Duration::from_millis(250)
                }
            );
        }
        // ...and near the end of the window only what remains of it.
        assert_eq!(
            engine.step(Input::Probed { failed: None }, 1050).unwrap(),
            Effect::Probe {
                after: Duration::from_millis(50)
            }
        );
        match engine.step(Input::Probed { failed: None }, 1100).unwrap() {
            Effect::Submit {
                step: CatalogStep::Advance { last_good },
                audit,
                ..
            } => {
                assert_eq!(last_good, Some(Hash([5; 32])));
                assert_eq!(
                    audit.iter().map(AuditEvent::name).collect::<Vec<_>>(),
                    ["probe", "commit"]
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(engine.record().status, CommitStatus::Committed);
        assert_eq!(engine.record().probe_runs, 5);
        assert_eq!(engine.step(Input::Submitted, 1101).unwrap(), Effect::Done);
        assert!(engine.is_done());
    }

    #[test]
    fn a_failed_probe_rolls_back_to_the_last_good_frame() {
        let mut engine = commit_engine(&[], false);
        to_watching(&mut engine);
        engine.step(Input::Watch, 100).unwrap();
        let effect = engine
            .step(
                Input::Probed {
                    failed: Some(failure()),
                },
                130,
            )
            .unwrap();
        match effect {
            Effect::Submit {
                actor: Actor::System,
                audit,
                ..
            } => assert_eq!(audit[0].name(), "probe"),
            other => panic!("{other:?}"),
        }
        assert_eq!(engine.record().status, CommitStatus::RollingBack);
        assert_eq!(
            engine.step(Input::Submitted, 131).unwrap(),
            Effect::Restore {
                frame: Hash([4; 32])
            }
        );
        assert_eq!(engine.step(Input::Restored, 134).unwrap(), Effect::Capture);
        match engine.step(Input::Captured(frame(6)), 140).unwrap() {
            Effect::Submit { audit, .. } => assert_eq!(audit[0].name(), "rollback"),
            other => panic!("{other:?}"),
        }
        let record = engine.record();
        assert_eq!(record.status, CommitStatus::RolledBack);
        let rollback = record.rollback.as_ref().unwrap();
        assert_eq!(rollback.restored_ms, 4);
        assert_eq!(rollback.frame, Some(Hash([6; 32])));
        assert_eq!(rollback.evidence, "http: status 502");
        assert_eq!(engine.step(Input::Submitted, 141).unwrap(), Effect::Done);
    }

    #[test]
    fn without_a_last_good_frame_a_rollback_restores_the_head_it_started_on() {
        let mut record = record(CommitKind::Commit);
        record.last_good = None;
        let mut engine = CommitEngine::new(
            record,
            Plan::Commit {
                actions: Vec::new(),
                set_last_good: None,
            },
            watch(false),
        );
        engine.step(Input::Start, 0).unwrap();
        engine.step(Input::Submitted, 0).unwrap();
        engine.step(Input::Written(Err("x".into())), 0).unwrap();
        assert_eq!(
            engine.step(Input::Submitted, 0).unwrap(),
            Effect::Restore {
                frame: Hash([3; 32])
            }
        );
    }

    #[test]
    fn a_revert_restores_its_target_and_becomes_good_only_if_probes_pass() {
        for passes in [true, false] {
            let mut engine = CommitEngine::new(
                record(CommitKind::Revert),
                Plan::Revert {
                    target: Hash([8; 32]),
                },
                watch(false),
            );
            assert!(matches!(
                engine.step(Input::Start, 0).unwrap(),
                Effect::Submit {
                    step: CatalogStep::Begin { .. },
                    ..
                }
            ));
            assert_eq!(
                engine.step(Input::Submitted, 0).unwrap(),
                Effect::Restore {
                    frame: Hash([8; 32])
                }
            );
            assert_eq!(engine.step(Input::Restored, 0).unwrap(), Effect::Capture);
            assert_eq!(
                engine.step(Input::Captured(frame(9)), 0).unwrap(),
                Effect::Probe {
                    after: Duration::ZERO
                }
            );
            let failed = (!passes).then(failure);
            match engine.step(Input::Probed { failed }, 0).unwrap() {
                Effect::Submit {
                    step: CatalogStep::Advance { last_good },
                    audit,
                    ..
                } => {
                    assert_eq!(last_good, passes.then_some(Hash([9; 32])));
                    assert_eq!(audit[0].name(), "revert");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(engine.record().status, CommitStatus::Committed);
        }
    }

    #[test]
    fn a_recovery_logs_the_interruption_then_rolls_back() {
        let mut record = record(CommitKind::Commit);
        record.status = CommitStatus::Watching;
        let mut engine = CommitEngine::new(record, Plan::Recover, watch(true));
        match engine.step(Input::Start, 0).unwrap() {
            Effect::Submit {
                step: CatalogStep::Event,
                actor: Actor::System,
                audit,
            } => match &audit[0] {
                AuditEvent::Recovery(event) => {
                    assert_eq!(event.status, CommitStatus::Watching);
                    assert_eq!(event.to, Hash([4; 32]));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            engine.step(Input::Submitted, 0).unwrap(),
            Effect::Submit {
                step: CatalogStep::Advance { .. },
                ..
            }
        ));
        assert_eq!(engine.record().status, CommitStatus::RollingBack);
        assert_eq!(
            engine.step(Input::Submitted, 0).unwrap(),
            Effect::Restore {
                frame: Hash([4; 32])
            }
        );
        assert_eq!(
            engine.step(Input::Restored, 0).unwrap(),
            Effect::RunAfterCommit
        );
        assert_eq!(
            engine.step(Input::Ran(outcome(true)), 0).unwrap(),
            Effect::Capture
        );
        engine.step(Input::Captured(frame(7)), 0).unwrap();
        let rollback = engine.record().rollback.clone().unwrap();
        assert!(
            rollback
                .evidence
                .contains("the node stopped while the commit was watching")
        );
        assert!(rollback.after_commit.is_some());
        // A recovery judged nothing about the change: it is marked so.
        assert!(rollback.recovered);
    }

    #[test]
    fn inputs_out_of_order_are_errors_not_guesses() {
        let mut engine = commit_engine(&[], false);
        assert!(engine.step(Input::Submitted, 0).is_err());
        assert!(engine.step(Input::Probed { failed: None }, 0).is_err());
        let error = engine.step(Input::Restored, 0).unwrap_err();
        assert!(error.to_string().contains("Restored"), "{error}");
    }
}
