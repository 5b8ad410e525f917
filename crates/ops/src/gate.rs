//! The pipeline gate (`kairos gate`): whether a proposal may go on — and, when asked,
//! be committed — decided from its prediction, its sandbox check and its commit.
//! [`decide`] is the rule, a pure function over plain data; [`Service::gate`] gathers its
//! inputs (the prediction is made before the sandbox and the commit, so that their outcome
//! scores it), commits a passing proposal when given a capturer, and records the verdict
//! as a `gate` audit event, so that webhooks and NATS subscribers see every refusal.

use kairos_commit::{Capturer, CommitError, CommitRecord};
use kairos_core::{CommitStatus, Instant};
use kairos_store::audit::{AuditEvent, GateEvent, GateVerdict};
use kairos_store::{CatalogError, Change, Command};
use serde::{Deserialize, Serialize};

use crate::learn::PredictionJson;
use crate::review::ReviewError;
use crate::{InputError, OpsError, Result, Service};

/// The schema of the gate's JSON answer; a change that is not backwards compatible gets
/// a new number.
pub const GATE_SCHEMA: &str = "kairos.gate/1";
/// Files and config keys listed in a gate's diff (the counts are always whole).
pub const GATE_DIFF_ENTRIES_MAX: usize = 200;
/// Bytes of the check's output kept in a gate's answer (its end: where errors are).
pub const GATE_CHECK_OUTPUT_BYTES_MAX: usize = 4096;
/// The default thresholds (`kairos gate` without flags).
pub const MAX_RISK_DEFAULT: f32 = 0.2;
pub const MIN_CONFIDENCE_DEFAULT: f32 = 0.7;

/// What the gate asks of a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateThresholds {
    /// Refuse when the predicted P(error) is above this (0 to 1).
    pub max_risk: f32,
    /// Refuse when the prediction's confidence is below this, or the model abstains (0
    /// to 1); 0 accepts an abstaining prediction (then only the check decides).
    pub min_confidence: f32,
    /// Run the replica's check in a sandbox; a failing check refuses.
    pub run_check: bool,
    /// Commit a passing proposal (a refused or rolled-back commit refuses).
    #[serde(default)]
    pub commit: bool,
}

impl Default for GateThresholds {
    fn default() -> GateThresholds {
        GateThresholds {
            max_risk: MAX_RISK_DEFAULT,
            min_confidence: MIN_CONFIDENCE_DEFAULT,
            run_check: false,
            commit: false,
        }
    }
}

impl GateThresholds {
    pub fn validate(&self) -> std::result::Result<(), InputError> {
        for (name, value) in [
            ("max_risk", self.max_risk),
            ("min_confidence", self.min_confidence),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(InputError::GateThreshold {
                    name,
                    value: value.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A gate criterion, one per question the gate asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CriterionName {
    /// The prediction can be trusted: the model does not abstain and its confidence is
    /// at least `min_confidence`.
    Confidence,
    /// The predicted P(error) is at most `max_risk`.
    Risk,
    /// The replica's check passes in a sandbox (with `run_check`).
    Check,
    /// The commit ends committed (with `commit`).
    Commit,
}

impl CriterionName {
    pub fn name(self) -> &'static str {
        match self {
            CriterionName::Confidence => "confidence",
            CriterionName::Risk => "risk",
            CriterionName::Check => "check",
            CriterionName::Commit => "commit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CriterionStatus {
    Pass,
    Fail,
    /// Not asked (`--run-check`, `--commit` not given), not meaningful (the risk of an
    /// abstaining prediction) or not reached (no commit after a refusal).
    Skipped,
}

/// One criterion's result, with a sentence saying why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Criterion {
    pub name: CriterionName,
    pub status: CriterionStatus,
    pub message: String,
}

impl Criterion {
    fn new(name: CriterionName, status: CriterionStatus, message: String) -> Criterion {
        Criterion {
            name,
            status,
            message,
        }
    }
}

/// The check's result as the gate needs it (plain data: [`decide`] needs no sandbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateCheck {
    pub passed: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The end of the check's output (at most [`GATE_CHECK_OUTPUT_BYTES_MAX`] bytes).
    pub output: String,
}

impl GateCheck {
    fn of(outcome: &kairos_sandbox::CommandOutcome) -> GateCheck {
        let output = &outcome.output;
        let mut start = output.len().saturating_sub(GATE_CHECK_OUTPUT_BYTES_MAX);
        while !output.is_char_boundary(start) {
            start += 1;
        }
        GateCheck {
            passed: outcome.passed,
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            timed_out: outcome.timed_out,
            duration_ms: outcome.duration_ms,
            output: output[start..].to_string(),
        }
    }

    /// `exit 1 in 12 ms`, `killed by signal 9`, `timed out after 5000 ms`.
    pub fn summary(&self) -> String {
        if self.timed_out {
            return format!("timed out after {} ms (killed)", self.duration_ms);
        }
        match (self.exit_code, self.signal) {
            (Some(code), _) => format!("exit {code} in {} ms", self.duration_ms),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => format!("ended in {} ms", self.duration_ms),
        }
    }
}

/// The criteria on the prediction and the check, in order: confidence, risk, check.
pub fn decide(
    thresholds: &GateThresholds,
    prediction: &PredictionJson,
    check: Option<&GateCheck>,
) -> Vec<Criterion> {
    use CriterionName::{Check, Confidence, Risk};
    use CriterionStatus::{Fail, Pass, Skipped};
    let why_abstains = match (&prediction.model, &prediction.model_error) {
        (_, Some(error)) => format!("the model could not be loaded: {error}"),
        (None, None) => "there is no trained model".to_string(),
        (Some(_), None) => "the proposal is unlike what the model was trained on".to_string(),
    };
    let confidence = if thresholds.min_confidence <= 0.0 {
        Criterion::new(
            Confidence,
            Pass,
            if prediction.abstain {
                format!("not required (min confidence 0); the model abstains: {why_abstains}")
            } else {
                format!(
                    "not required (min confidence 0); confidence {:.2}",
                    prediction.confidence
                )
            },
        )
    } else if prediction.abstain {
        Criterion::new(
            Confidence,
            Fail,
            format!(
                "the prediction cannot be trusted: the model abstains ({why_abstains}; confidence {:.2}, at least {:.2} needed)",
                prediction.confidence, thresholds.min_confidence
            ),
        )
    } else if prediction.confidence < thresholds.min_confidence {
        Criterion::new(
            Confidence,
            Fail,
            format!(
                "the prediction cannot be trusted: confidence {:.2} is below {:.2}",
                prediction.confidence, thresholds.min_confidence
            ),
        )
    } else {
        Criterion::new(
            Confidence,
            Pass,
            format!(
                "confidence {:.2} is at least {:.2}",
                prediction.confidence, thresholds.min_confidence
            ),
        )
    };
    let risk = if prediction.abstain {
        Criterion::new(
            Risk,
            Skipped,
            "no call: an abstaining prediction says nothing about the risk".into(),
        )
    } else if prediction.p_error > thresholds.max_risk {
        Criterion::new(
            Risk,
            Fail,
            format!(
                "predicted P(error) {:.2} is above the maximum risk {:.2}",
                prediction.p_error, thresholds.max_risk
            ),
        )
    } else {
        Criterion::new(
            Risk,
            Pass,
            format!(
                "predicted P(error) {:.2} is at most {:.2}",
                prediction.p_error, thresholds.max_risk
            ),
        )
    };
    let check = match (thresholds.run_check, check) {
        (false, _) => Criterion::new(Check, Skipped, "not run (run_check not asked)".into()),
        (true, None) => Criterion::new(Check, Fail, "the check did not run".into()),
        (true, Some(check)) if check.passed => Criterion::new(
            Check,
            Pass,
            format!("the check passed: {}", check.summary()),
        ),
        (true, Some(check)) => Criterion::new(
            Check,
            Fail,
            format!("the check failed: {}", check.summary()),
        ),
    };
    vec![confidence, risk, check]
}

/// The verdict of a list of criteria: refused when any failed.
pub fn verdict(criteria: &[Criterion]) -> GateVerdict {
    if criteria.iter().any(|c| c.status == CriterionStatus::Fail) {
        GateVerdict::Refuse
    } else {
        GateVerdict::Pass
    }
}

/// The sandbox's diff as the gate shows it: counts, and the first entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateDiff {
    pub files_changed: usize,
    pub config_keys_changed: usize,
    #[schema(value_type = Vec<Object>)]
    pub files: Vec<kairos_replay::FileChange>,
    #[schema(value_type = Vec<Object>)]
    pub config: Vec<kairos_replay::ConfigChange>,
    /// Declared actions a commit would run.
    pub actions: Vec<String>,
    /// Whether the lists were cut at [`GATE_DIFF_ENTRIES_MAX`].
    pub truncated: bool,
}

impl GateDiff {
    fn of(report: &kairos_sandbox::SandboxReport) -> GateDiff {
        let diff = &report.diff;
        GateDiff {
            files_changed: diff.files.len(),
            config_keys_changed: diff.config.len(),
            files: diff
                .files
                .iter()
                .take(GATE_DIFF_ENTRIES_MAX)
                .cloned()
                .collect(),
            config: diff
                .config
                .iter()
                .take(GATE_DIFF_ENTRIES_MAX)
                .cloned()
                .collect(),
            actions: report.actions.clone(),
            truncated: diff.files.len() > GATE_DIFF_ENTRIES_MAX
                || diff.config.len() > GATE_DIFF_ENTRIES_MAX,
        }
    }
}

/// The commit a gate made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateCommit {
    pub commit: String,
    pub status: String,
    pub frame: Option<String>,
    /// Why it did not end committed (a rollback's evidence, a conflict, a note).
    pub detail: Option<String>,
}

impl GateCommit {
    fn of(record: &CommitRecord) -> GateCommit {
        let detail = if let Some(rollback) = &record.rollback {
            Some(rollback.evidence.clone())
        } else if !record.conflicts.is_empty() {
            Some(format!(
                "changed since the base: {}",
                record.conflicts.join(", ")
            ))
        } else {
            record.note.clone()
        };
        GateCommit {
            commit: record.commit.to_hex(),
            status: record.status.name().to_string(),
            frame: record.frame.map(|frame| frame.to_hex()),
            detail,
        }
    }
}

/// The gate's answer (schema [`GATE_SCHEMA`]); `kairos gate --format json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GateJson {
    pub schema: String,
    pub replica: String,
    pub proposal: String,
    pub title: String,
    pub author: String,
    pub timeline: String,
    pub base: String,
    pub ops: Vec<usize>,
    /// `pass` or `refuse`.
    #[schema(value_type = String)]
    pub verdict: GateVerdict,
    /// One line per failed criterion (empty when it passed).
    pub reasons: Vec<String>,
    /// Every criterion in order: confidence, risk, check, commit.
    pub criteria: Vec<Criterion>,
    pub thresholds: GateThresholds,
    pub prediction: PredictionJson,
    pub diff: GateDiff,
    pub check: Option<GateCheck>,
    pub commit: Option<GateCommit>,
}

/// A threshold as the flag gave it (0.2, not 0.20000000298023224).
fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// Whether a commit error is the commit being refused (exit 1 for a pipeline) rather than
/// the gate failing to run: the review policy is not met, or another commit is running.
fn refused_commit(error: &OpsError) -> bool {
    matches!(
        error,
        OpsError::Review(ReviewError::PolicyNotMet { .. })
            | OpsError::Catalog(CatalogError::Busy { .. })
            | OpsError::Commit(CommitError::Catalog(CatalogError::Busy { .. }))
    )
}

impl Service<'_> {
    /// Gates a stored proposal: predicts it, makes its sandbox (running the check with
    /// `run_check`), decides, and with `capturer` (given exactly when `thresholds.commit`)
    /// commits it if it passed and waits for the commit's end. Every verdict, pass or
    /// refuse, is a `gate` audit event. Errors are the gate failing to run (unknown
    /// replica or proposal, no check to run, a damaged store), never a refusal.
    pub fn gate(
        &self,
        name: &str,
        id: &str,
        ops: Option<&[usize]>,
        thresholds: &GateThresholds,
        capturer: Option<&dyn Capturer>,
        party: &str,
    ) -> Result<GateJson> {
        thresholds.validate()?;
        if thresholds.commit != capturer.is_some() {
            return Err(InputError::GateCommit.into());
        }
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        // The sandbox predicts before it runs (its outcome then scores the prediction); a
        // prediction that could not be made is asked again to name the error.
        let sandbox = self.sandbox(name, id, ops, thresholds.run_check, party)?;
        let prediction = match sandbox.prediction.clone() {
            Some(prediction) => prediction,
            None => self.predict_proposal(&replica, &proposal, ops, party)?,
        };
        let check = sandbox.report.check.as_ref().map(GateCheck::of);
        let mut criteria = decide(thresholds, &prediction, check.as_ref());
        let mut commit = None;
        if let Some(capturer) = capturer {
            let (criterion, record) = if verdict(&criteria) == GateVerdict::Refuse {
                (
                    Criterion::new(
                        CriterionName::Commit,
                        CriterionStatus::Skipped,
                        "not attempted: the gate refused the proposal".into(),
                    ),
                    None,
                )
            } else {
                self.gate_commit(name, id, ops, party, capturer, &prediction)?
            };
            criteria.push(criterion);
            commit = record.as_ref().map(GateCommit::of);
        } else {
            criteria.push(Criterion::new(
                CriterionName::Commit,
                CriterionStatus::Skipped,
                "not asked (commit not asked)".into(),
            ));
        }
        let verdict = verdict(&criteria);
        let reasons: Vec<String> = criteria
            .iter()
            .filter(|c| c.status == CriterionStatus::Fail)
            .map(|c| format!("{}: {}", c.name.name(), c.message))
            .collect();
        let ops = sandbox.report.ops.clone();
        let event = GateEvent {
            proposal: proposal.id,
            ops: ops.clone(),
            verdict,
            reasons: reasons.clone(),
            max_risk: decimal(thresholds.max_risk),
            min_confidence: decimal(thresholds.min_confidence),
            run_check: thresholds.run_check,
            commit_asked: thresholds.commit,
            commit: commit
                .as_ref()
                .and_then(|c: &GateCommit| c.commit.parse().ok()),
        };
        self.store.submit(
            &Command::new(
                Instant::now(),
                name,
                &proposal.timeline,
                party,
                Change::Event,
            )
            .with_audit(AuditEvent::Gate(event)),
        )?;
        Ok(GateJson {
            schema: GATE_SCHEMA.to_string(),
            replica: name.to_string(),
            proposal: proposal.id.to_hex(),
            title: proposal.title.clone(),
            author: proposal.author.clone(),
            timeline: proposal.timeline.clone(),
            base: proposal.base.to_hex(),
            ops,
            verdict,
            reasons,
            criteria,
            thresholds: *thresholds,
            prediction,
            diff: GateDiff::of(&sandbox.report),
            check,
            commit,
        })
    }

    /// Commits a proposal that passed the gate and waits for its end: the commit
    /// criterion and the record (none when the commit was refused before it began).
    fn gate_commit(
        &self,
        name: &str,
        id: &str,
        ops: Option<&[usize]>,
        party: &str,
        capturer: &dyn Capturer,
        prediction: &PredictionJson,
    ) -> Result<(Criterion, Option<CommitRecord>)> {
        let record = match self.begin_commit(name, id, ops, party, capturer, Some(prediction)) {
            Ok(record) if record.status.is_final() => record,
            Ok(record) => self.watch(record, capturer)?,
            Err(error) if refused_commit(&error) => {
                return Ok((
                    Criterion::new(
                        CriterionName::Commit,
                        CriterionStatus::Fail,
                        format!("the commit was refused: {error}"),
                    ),
                    None,
                ));
            }
            Err(error) => return Err(error),
        };
        let summary = GateCommit::of(&record);
        let criterion = if record.status == CommitStatus::Committed {
            Criterion::new(
                CriterionName::Commit,
                CriterionStatus::Pass,
                format!(
                    "committed as {}{}",
                    record.commit.short(),
                    record
                        .frame
                        .map(|frame| format!(", frame {}", frame.short()))
                        .unwrap_or_default()
                ),
            )
        } else {
            Criterion::new(
                CriterionName::Commit,
                CriterionStatus::Fail,
                format!(
                    "commit {} ended {}{}",
                    record.commit.short(),
                    record.status.name(),
                    summary
                        .detail
                        .as_deref()
                        .map(|detail| format!(": {detail}"))
                        .unwrap_or_default()
                ),
            )
        };
        Ok((criterion, Some(record)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(p_error: f32, confidence: f32, abstain: bool) -> PredictionJson {
        PredictionJson {
            proposal: "00".into(),
            ops: vec![1],
            p_error,
            confidence,
            abstain,
            resource_deltas: kairos_predict::ResourceDeltas::default(),
            affected: Vec::new(),
            explanation: Vec::new(),
            model: (!abstain).then(|| "m".to_string()),
            model_error: None,
            inference_us: 1,
        }
    }

    fn check(passed: bool) -> GateCheck {
        GateCheck {
            passed,
            exit_code: Some(i32::from(!passed)),
            signal: None,
            timed_out: false,
            duration_ms: 3,
            output: String::new(),
        }
    }

    fn statuses(criteria: &[Criterion]) -> Vec<(&'static str, CriterionStatus)> {
        criteria.iter().map(|c| (c.name.name(), c.status)).collect()
    }

    use CriterionStatus::{Fail, Pass, Skipped};

    #[test]
    fn a_confident_low_risk_prediction_passes_and_a_risky_one_is_refused() {
        let thresholds = GateThresholds::default();
        let passed = decide(&thresholds, &prediction(0.05, 0.9, false), None);
        assert_eq!(
            statuses(&passed),
            [("confidence", Pass), ("risk", Pass), ("check", Skipped)]
        );
        assert_eq!(verdict(&passed), GateVerdict::Pass);
        let risky = decide(&thresholds, &prediction(0.8, 0.95, false), None);
        assert_eq!(verdict(&risky), GateVerdict::Refuse);
        assert!(
            risky[1]
                .message
                .contains("0.80 is above the maximum risk 0.20")
        );
        // Exactly at the bound passes: the bound is the largest risk allowed.
        let at = decide(&thresholds, &prediction(0.2, 0.7, false), None);
        assert_eq!(verdict(&at), GateVerdict::Pass);
    }

    #[test]
    fn an_untrusted_prediction_refuses_unless_min_confidence_is_zero() {
        let thresholds = GateThresholds::default();
        let unsure = decide(&thresholds, &prediction(0.01, 0.3, false), None);
        assert_eq!(unsure[0].status, Fail);
        assert!(
            unsure[0].message.contains("cannot be trusted"),
            "{unsure:?}"
        );
        let abstains = decide(&thresholds, &prediction(0.5, 0.0, true), None);
        assert_eq!(
            statuses(&abstains),
            [("confidence", Fail), ("risk", Skipped), ("check", Skipped)]
        );
        assert!(abstains[0].message.contains("no trained model"));
        // With min confidence 0 an abstention is accepted and the real check decides.
        let lenient = GateThresholds {
            min_confidence: 0.0,
            run_check: true,
            ..GateThresholds::default()
        };
        let by_check = decide(&lenient, &prediction(0.5, 0.0, true), Some(&check(true)));
        assert_eq!(
            statuses(&by_check),
            [("confidence", Pass), ("risk", Skipped), ("check", Pass)]
        );
        let failed = decide(&lenient, &prediction(0.5, 0.0, true), Some(&check(false)));
        assert_eq!(verdict(&failed), GateVerdict::Refuse);
        assert!(failed[2].message.contains("exit 1"));
    }

    #[test]
    fn thresholds_out_of_range_are_refused_by_name() {
        let bad = GateThresholds {
            max_risk: 1.5,
            ..GateThresholds::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("max_risk"));
        let nan = GateThresholds {
            min_confidence: f32::NAN,
            ..GateThresholds::default()
        };
        assert!(nan.validate().is_err());
    }
}
