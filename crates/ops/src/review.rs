//! Collaboration: reviews of proposals, the review policy enforced at commit, the list of
//! a replica's proposals with where each stands, and interference between open proposals
//! on one timeline (overlapping entries found when a proposal arrives; a failing check
//! of two proposals applied together found when a sandbox check passes).
//!
//! The decisions are plain functions: [`kairos_core::review::decide`] (the policy),
//! [`entries`] and [`overlap`] (what two proposals both touch), [`proposal_status`].

use std::collections::{BTreeMap, BTreeSet};

use kairos_commit::CommitRecord;
use kairos_core::review::{PolicyDecision, PredictionSeen, decide};
use kairos_core::{CommitStatus, Hash, Instant, ReplicaDefinition, ReviewPolicy, Verdict};
use kairos_sandbox::{Op, Proposal, ProposalSummary, SandboxReport};
use kairos_store::audit::{
    CheckSummary, InterferenceEvent, InterferenceFinding, InterferingProposal, ReviewEvent,
};
use kairos_store::review::{CheckNote, InterferenceNote, ProposalState, Review, ReviewGuard};
use kairos_store::{AuditEvent, Change, Command, RecordFamily};
use serde::{Deserialize, Serialize};

use crate::learn::{PredictionEntry, PredictionJson};
use crate::{OpsError, Result, Service};

/// Open proposals a new one is compared with (the newest).
pub const INTERFERENCE_CANDIDATES_MAX: usize = 64;
/// Other proposals whose passing check is combined with a passing one (the most
/// recently checked): each combination materialises a sandbox and runs the check.
pub const COMBINED_CHECK_PARTNERS_MAX: usize = 2;

/// What a review or a commit cannot do: the caller can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "proposal {proposal}: party {party:?} is its author and the policy of timeline {timeline:?} forbids authors to approve their own proposals (authors_cannot_approve)"
    )]
    OwnProposal {
        proposal: String,
        party: String,
        timeline: String,
    },
    #[error("proposal {proposal}: {decision}")]
    PolicyNotMet {
        proposal: String,
        decision: PolicyDecision,
    },
    #[error("a review comment is at most {max} bytes; this one is {bytes}", max = kairos_store::review::REVIEW_COMMENT_BYTES_MAX)]
    CommentTooLong { bytes: usize },
    #[error(
        "status {0:?} is not one of open, rejected, committing, committed, rolled_back, conflict, failed"
    )]
    BadStatus(String),
}

impl From<ReviewError> for OpsError {
    fn from(error: ReviewError) -> OpsError {
        OpsError::Review(error)
    }
}

/// Where a proposal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProposalStatus {
    /// Not committed, no standing veto.
    Open,
    /// A party whose approval counts rejects it (and it was never committed since).
    Rejected,
    /// A commit of it is in progress.
    Committing,
    Committed,
    RolledBack,
    Conflict,
    Failed,
}

impl ProposalStatus {
    pub const ALL: [ProposalStatus; 7] = [
        ProposalStatus::Open,
        ProposalStatus::Rejected,
        ProposalStatus::Committing,
        ProposalStatus::Committed,
        ProposalStatus::RolledBack,
        ProposalStatus::Conflict,
        ProposalStatus::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProposalStatus::Open => "open",
            ProposalStatus::Rejected => "rejected",
            ProposalStatus::Committing => "committing",
            ProposalStatus::Committed => "committed",
            ProposalStatus::RolledBack => "rolled_back",
            ProposalStatus::Conflict => "conflict",
            ProposalStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Result<ProposalStatus> {
        ProposalStatus::ALL
            .into_iter()
            .find(|status| status.name() == text)
            .ok_or_else(|| ReviewError::BadStatus(text.to_string()).into())
    }
}

/// A proposal's status: its latest commit's, else rejected when a counting party
/// rejects it, else open.
pub fn proposal_status(
    latest_commit: Option<CommitStatus>,
    policy: &ReviewPolicy,
    author: &str,
    verdicts: &[(String, Verdict)],
) -> ProposalStatus {
    match latest_commit {
        Some(CommitStatus::Applying | CommitStatus::Watching | CommitStatus::RollingBack) => {
            ProposalStatus::Committing
        }
        Some(CommitStatus::Committed) => ProposalStatus::Committed,
        Some(CommitStatus::RolledBack) => ProposalStatus::RolledBack,
        Some(CommitStatus::Conflict) => ProposalStatus::Conflict,
        Some(CommitStatus::Failed) => ProposalStatus::Failed,
        None if verdicts.iter().any(|(party, verdict)| {
            *verdict == Verdict::Reject && policy.counts(party, author)
        }) =>
        {
            ProposalStatus::Rejected
        }
        None => ProposalStatus::Open,
    }
}

/// One entry a proposal's ops change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    /// A file or directory, relative to the root.
    Path(String),
    /// One key of a config file.
    Key { file: String, key: String },
}

impl Entry {
    fn name(&self) -> String {
        match self {
            Entry::Path(path) => path.clone(),
            Entry::Key { file, key } => format!("{file}:{key}"),
        }
    }
}

fn normalised(path: &str) -> Option<String> {
    kairos_sandbox::proposal::path_components(path)
        .ok()
        .map(|components| String::from_utf8_lossy(&components.join(&b'/')).into_owned())
}

/// The entries ops change: paths of file ops, `file:key` of config ops (actions change
/// no entry).
pub fn entries<'a>(ops: impl IntoIterator<Item = &'a Op>) -> BTreeSet<Entry> {
    ops.into_iter()
        .filter_map(|op| match op {
            Op::PutFile { path, .. } | Op::PatchFile { path, .. } | Op::Delete { path } => {
                normalised(path).map(Entry::Path)
            }
            Op::SetConfig { file, key, .. } | Op::UnsetConfig { file, key } => normalised(file)
                .map(|file| Entry::Key {
                    file,
                    key: key.clone(),
                }),
            Op::Action { .. } => None,
        })
        .collect()
}

/// Whether one dotted config key contains the other (`server` and `server.port`).
fn keys_overlap(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."))
}

/// The entries both sets touch, named as `a` names them: the same path or one inside
/// the other, a file and a key of it, or the same (or a nested) key of one file.
pub fn overlap(a: &BTreeSet<Entry>, b: &BTreeSet<Entry>) -> Vec<String> {
    let mut found = BTreeSet::new();
    for left in a {
        for right in b {
            let touches = match (left, right) {
                (Entry::Path(x), Entry::Path(y)) => kairos_commit::overlaps(x, y),
                (Entry::Path(path), Entry::Key { file, .. })
                | (Entry::Key { file, .. }, Entry::Path(path)) => {
                    kairos_commit::overlaps(path, file)
                }
                (
                    Entry::Key {
                        file: file_a,
                        key: key_a,
                    },
                    Entry::Key {
                        file: file_b,
                        key: key_b,
                    },
                ) => file_a == file_b && keys_overlap(key_a, key_b),
            };
            if touches {
                found.insert(left.name());
            }
        }
    }
    found.into_iter().collect()
}

/// A review as answered by `kairos review`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReviewJson {
    pub proposal: Hash,
    pub replica: String,
    pub timeline: String,
    pub author: String,
    pub party: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Every party's standing verdict now.
    pub approvals: Vec<String>,
    pub rejections: Vec<String>,
    /// What the timeline's policy still asks for (absent without a policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyJson>,
}

/// Where a proposal stands against its timeline's policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyJson {
    /// Whether a commit would pass the policy now (predicted risk: the latest
    /// prediction; a commit predicts again).
    pub met: bool,
    pub missing: Vec<String>,
}

/// The latest prediction made for a proposal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatestPredictionJson {
    pub p_error: f32,
    pub confidence: f32,
    pub abstain: bool,
    pub ops: Vec<usize>,
    pub time: Instant,
}

/// A proposal as `kairos proposals` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProposalListJson {
    pub proposal: Hash,
    pub title: String,
    pub author: String,
    pub timeline: String,
    pub base: Hash,
    pub created: Instant,
    pub ops: usize,
    pub status: ProposalStatus,
    pub approvals: Vec<Review>,
    pub rejections: Vec<Review>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<LatestPredictionJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckNote>,
    pub interference: Vec<InterferenceNote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyJson>,
}

/// What a combined check found with one partner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CombinedCheckJson {
    pub partner: Hash,
    pub partner_author: String,
    /// Whether the check passed on both applied together.
    pub passed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn seen(prediction: &PredictionJson) -> PredictionSeen {
    PredictionSeen {
        p_error: f64::from(prediction.p_error),
        confidence: f64::from(prediction.confidence),
        abstain: prediction.abstain,
    }
}

fn policy_json(decision: &PolicyDecision) -> PolicyJson {
    PolicyJson {
        met: decision.allowed(),
        missing: decision.unmet.iter().map(ToString::to_string).collect(),
    }
}

fn check_summary(outcome: &kairos_sandbox::CommandOutcome) -> CheckSummary {
    CheckSummary {
        exit_code: outcome.exit_code,
        passed: outcome.passed,
        timed_out: outcome.timed_out,
        duration_ms: outcome.duration_ms,
        peak_memory_bytes: outcome.peak_memory_bytes,
    }
}

impl Service<'_> {
    /// `kairos review`: a party approves or rejects a proposal (its latest verdict
    /// counts), logged as a `review` event addressed to the proposal's author.
    pub fn review(
        &self,
        name: &str,
        id: &str,
        verdict: Verdict,
        comment: Option<String>,
        party: &str,
    ) -> Result<ReviewJson> {
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        let comment = comment.filter(|c| !c.trim().is_empty());
        if let Some(comment) = &comment
            && comment.len() > kairos_store::review::REVIEW_COMMENT_BYTES_MAX
        {
            return Err(ReviewError::CommentTooLong {
                bytes: comment.len(),
            }
            .into());
        }
        let policy = replica.review_policy_of(&proposal.timeline).cloned();
        if verdict == Verdict::Approve
            && party == proposal.author
            && policy.as_ref().is_some_and(|p| p.authors_cannot_approve)
        {
            return Err(ReviewError::OwnProposal {
                proposal: proposal.id.short(),
                party: party.to_string(),
                timeline: proposal.timeline.clone(),
            }
            .into());
        }
        let now = Instant::now();
        self.store.submit(
            &Command::new(
                now,
                name,
                &proposal.timeline,
                party,
                Change::Review {
                    proposal: proposal.id,
                    review: Review {
                        party: party.to_string(),
                        verdict,
                        comment: comment.clone(),
                        time: now,
                    },
                },
            )
            .with_audit(AuditEvent::Review(ReviewEvent {
                proposal: proposal.id,
                verdict,
                comment: comment.clone(),
                author: proposal.author.clone(),
            })),
        )?;
        let (state, _) = self.store.proposal_state(name, &proposal.id)?;
        let parties = |wanted: Verdict| -> Vec<String> {
            state
                .reviews
                .iter()
                .filter(|review| review.verdict == wanted)
                .map(|review| review.party.clone())
                .collect()
        };
        let policy = policy.map(|policy| {
            let latest = self.latest_predictions(name).ok().unwrap_or_default();
            let prediction = latest.get(&proposal.id).map(|p| PredictionSeen {
                p_error: f64::from(p.p_error),
                confidence: f64::from(p.confidence),
                abstain: p.abstain,
            });
            policy_json(&decide(
                &policy,
                &proposal.author,
                &state.verdicts(),
                prediction,
            ))
        });
        Ok(ReviewJson {
            proposal: proposal.id,
            replica: replica.name,
            timeline: proposal.timeline,
            author: proposal.author,
            party: party.to_string(),
            verdict,
            comment,
            approvals: parties(Verdict::Approve),
            rejections: parties(Verdict::Reject),
            policy,
        })
    }

    /// The policy check of a commit: refused, naming what is missing, unless the
    /// proposal's timeline policy is met by its reviews and `prediction` (the one made for
    /// this commit). Returns the guard the commit's batch carries (none without a policy).
    pub fn check_policy(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        prediction: Option<&PredictionJson>,
    ) -> Result<Option<ReviewGuard>> {
        let Some(policy) = replica
            .review_policy_of(&proposal.timeline)
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let (state, guard) = self.store.proposal_state(&replica.name, &proposal.id)?;
        let decision = decide(
            policy,
            &proposal.author,
            &state.verdicts(),
            prediction.map(seen),
        );
        if !decision.allowed() {
            return Err(ReviewError::PolicyNotMet {
                proposal: proposal.id.short(),
                decision,
            }
            .into());
        }
        Ok(Some(guard))
    }

    /// The latest prediction of each proposal of a replica.
    fn latest_predictions(&self, name: &str) -> Result<BTreeMap<Hash, LatestPredictionJson>> {
        let mut latest: BTreeMap<Hash, LatestPredictionJson> = BTreeMap::new();
        for (_, entry) in self
            .store
            .records::<PredictionEntry>(RecordFamily::Prediction, name)?
        {
            if latest
                .get(&entry.proposal)
                .is_some_and(|known| known.time >= entry.time)
            {
                continue;
            }
            latest.insert(
                entry.proposal,
                LatestPredictionJson {
                    p_error: entry.prediction.p_error,
                    confidence: entry.prediction.confidence,
                    abstain: entry.prediction.abstain,
                    ops: entry.ops,
                    time: entry.time,
                },
            );
        }
        Ok(latest)
    }

    /// `kairos proposals`: a replica's proposals, newest first, with their reviews,
    /// latest prediction, last check, interference and what their policy still asks.
    pub fn proposals(
        &self,
        name: &str,
        timeline: Option<&str>,
        status: Option<ProposalStatus>,
    ) -> Result<Vec<ProposalListJson>> {
        let replica = self.store.replica(name)?;
        let summaries = self
            .store
            .records::<ProposalSummary>(RecordFamily::Proposal, name)?;
        let mut states: BTreeMap<Hash, ProposalState> =
            self.store.proposal_states(name)?.into_iter().collect();
        let predictions = self.latest_predictions(name)?;
        let mut commits: BTreeMap<Hash, (Instant, CommitStatus)> = BTreeMap::new();
        for (_, record) in self
            .store
            .records::<CommitRecord>(RecordFamily::Commit, name)?
        {
            let Some(proposal) = record.proposal else {
                continue;
            };
            if commits
                .get(&proposal)
                .is_none_or(|(started, _)| *started <= record.started)
            {
                commits.insert(proposal, (record.started, record.status));
            }
        }
        let mut listed = Vec::new();
        for (id, summary) in summaries {
            if timeline.is_some_and(|timeline| timeline != summary.timeline) {
                continue;
            }
            let state = states.remove(&id).unwrap_or_default();
            let policy = replica
                .review_policy_of(&summary.timeline)
                .cloned()
                .unwrap_or_default();
            let verdicts = state.verdicts();
            let proposal_status = proposal_status(
                commits.get(&id).map(|(_, status)| *status),
                &policy,
                &summary.author,
                &verdicts,
            );
            if status.is_some_and(|wanted| wanted != proposal_status) {
                continue;
            }
            let prediction = predictions.get(&id).cloned();
            let policy = (!policy.is_empty()).then(|| {
                policy_json(&decide(
                    &policy,
                    &summary.author,
                    &verdicts,
                    prediction.as_ref().map(|p| PredictionSeen {
                        p_error: f64::from(p.p_error),
                        confidence: f64::from(p.confidence),
                        abstain: p.abstain,
                    }),
                ))
            });
            let (approvals, rejections) = state
                .reviews
                .iter()
                .cloned()
                .partition(|review| review.verdict == Verdict::Approve);
            listed.push(ProposalListJson {
                proposal: id,
                title: summary.title,
                author: summary.author,
                timeline: summary.timeline,
                base: summary.base,
                created: summary.created,
                ops: summary.ops,
                status: proposal_status,
                approvals,
                rejections,
                prediction,
                check: state.check,
                interference: state.interference,
                policy,
            });
        }
        listed.sort_by_key(|p| std::cmp::Reverse((p.created, p.proposal)));
        Ok(listed)
    }

    /// Open proposals on `timeline` other than `except`, newest first, at most
    /// [`INTERFERENCE_CANDIDATES_MAX`].
    fn open_proposals(
        &self,
        name: &str,
        timeline: &str,
        except: &Hash,
    ) -> Result<Vec<ProposalSummary>> {
        let committed = self.store.committed_proposals(name)?;
        let mut open: Vec<ProposalSummary> = self
            .store
            .records::<ProposalSummary>(RecordFamily::Proposal, name)?
            .into_iter()
            .map(|(_, summary)| summary)
            .filter(|summary| {
                summary.timeline == timeline
                    && summary.id != *except
                    && !committed.contains_key(&summary.id)
            })
            .collect();
        open.sort_by_key(|p| std::cmp::Reverse((p.created, p.id)));
        open.truncate(INTERFERENCE_CANDIDATES_MAX);
        Ok(open)
    }

    /// Notes interference between `proposals` on each of them, with its audit event.
    fn note_interference(
        &self,
        name: &str,
        timeline: &str,
        party: &str,
        event: InterferenceEvent,
    ) -> Result<InterferenceEvent> {
        let now = Instant::now();
        self.store.submit(
            &Command::new(
                now,
                name,
                timeline,
                party,
                Change::NoteInterference {
                    note: InterferenceNote {
                        time: now,
                        event: event.clone(),
                    },
                },
            )
            .with_audit(AuditEvent::Interference(event.clone())),
        )?;
        Ok(event)
    }

    /// A new proposal against the open ones of its timeline: every pair touching the
    /// same entries is an `overlap` interference, noted on both and logged.
    pub(crate) fn find_overlaps(
        &self,
        proposal: &Proposal,
        party: &str,
    ) -> Result<Vec<InterferenceEvent>> {
        let mine = entries(&proposal.ops);
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for other in self.open_proposals(&proposal.replica, &proposal.timeline, &proposal.id)? {
            // A proposal that no longer loads (its document damaged) interferes with
            // nothing that can be said.
            let Ok(theirs) = self.proposal(&proposal.replica, &other.id.to_hex()) else {
                continue;
            };
            let shared = overlap(&mine, &entries(&theirs.ops));
            if shared.is_empty() {
                continue;
            }
            found.push(self.note_interference(
                &proposal.replica,
                &proposal.timeline,
                party,
                InterferenceEvent {
                    proposals: vec![
                        InterferingProposal {
                            proposal: proposal.id,
                            author: proposal.author.clone(),
                        },
                        InterferingProposal {
                            proposal: theirs.id,
                            author: theirs.author.clone(),
                        },
                    ],
                    finding: InterferenceFinding::Overlap { entries: shared },
                },
            )?);
        }
        Ok(found)
    }

    /// After a passing sandbox check: the check of this proposal applied together with
    /// each of the (at most [`COMBINED_CHECK_PARTNERS_MAX`]) open proposals of its
    /// timeline whose own last check passed, the most recently checked first; a failure
    /// is a `combined_check` interference, noted on both and logged.
    pub(crate) fn combined_checks(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        report: &SandboxReport,
        party: &str,
    ) -> Result<(Vec<CombinedCheckJson>, Vec<InterferenceEvent>)> {
        if !report.check.as_ref().is_some_and(|check| check.passed) {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut partners: Vec<(ProposalSummary, CheckNote)> = Vec::new();
        for other in self.open_proposals(&replica.name, &proposal.timeline, &proposal.id)? {
            let (state, _) = self.store.proposal_state(&replica.name, &other.id)?;
            if let Some(check) = state.check.filter(|check| check.passed) {
                partners.push((other, check));
            }
        }
        partners.sort_by_key(|(_, check)| std::cmp::Reverse(check.time));
        partners.truncate(COMBINED_CHECK_PARTNERS_MAX);
        let mut checked = Vec::new();
        let mut found = Vec::new();
        for (other, check) in partners {
            let Ok(theirs) = self.proposal(&replica.name, &other.id.to_hex()) else {
                continue;
            };
            let together = kairos_sandbox::check_together(
                self.store,
                replica,
                &[
                    (proposal, Some(report.ops.as_slice())),
                    (&theirs, Some(check.ops.as_slice())),
                ],
                &self.limits,
                Instant::now(),
            );
            let (passed, finding) = match together {
                Ok(outcome) if outcome.passed => (true, None),
                Ok(outcome) => (
                    false,
                    Some(InterferenceFinding::CombinedCheck {
                        check: Some(check_summary(&outcome)),
                        problem: None,
                    }),
                ),
                // The ops of one do not apply on top of the other's: they interfere.
                Err(error @ kairos_sandbox::SandboxError::Op { .. }) => (
                    false,
                    Some(InterferenceFinding::CombinedCheck {
                        check: None,
                        problem: Some(format!(
                            "the ops do not apply together: {}",
                            error.to_string().replace('\n', " ")
                        )),
                    }),
                ),
                // Anything else (a base forgotten since, a check that cannot start) says
                // nothing about the two together; the sandbox itself stands.
                Err(_) => continue,
            };
            let problem = match &finding {
                Some(InterferenceFinding::CombinedCheck {
                    problem: Some(problem),
                    ..
                }) => Some(problem.clone()),
                Some(InterferenceFinding::CombinedCheck {
                    check: Some(check), ..
                }) => Some(match check.exit_code {
                    Some(code) => format!("the check exited {code} on both applied together"),
                    None => "the check was killed on both applied together".to_string(),
                }),
                _ => None,
            };
            checked.push(CombinedCheckJson {
                partner: theirs.id,
                partner_author: theirs.author.clone(),
                passed,
                problem,
            });
            if let Some(finding) = finding {
                found.push(self.note_interference(
                    &replica.name,
                    &proposal.timeline,
                    party,
                    InterferenceEvent {
                        proposals: vec![
                            InterferingProposal {
                                proposal: proposal.id,
                                author: proposal.author.clone(),
                            },
                            InterferingProposal {
                                proposal: theirs.id,
                                author: theirs.author.clone(),
                            },
                        ],
                        finding,
                    },
                )?);
            }
        }
        Ok((checked, found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(file: &str, key: &str) -> Op {
        Op::SetConfig {
            file: file.into(),
            key: key.into(),
            value: serde_json::json!(1),
        }
    }

    fn put(path: &str) -> Op {
        Op::PutFile {
            path: path.into(),
            content: Some("x".into()),
            content_base64: None,
            from: None,
            mode: None,
        }
    }

    #[test]
    fn overlapping_entries_are_paths_files_and_keys_both_touch() {
        let a = entries(&[set("app.toml", "server.port"), put("www/index.html")]);
        let b = entries(&[set("./app.toml", "server"), put("www/other.html")]);
        assert_eq!(overlap(&a, &b), vec!["app.toml:server.port"]);
        let c = entries(&[put("www"), set("app.toml", "workers")]);
        assert_eq!(overlap(&a, &c), vec!["www/index.html"]);
        let d = entries(&[put("app.toml")]);
        assert_eq!(overlap(&a, &d), vec!["app.toml:server.port"]);
        let e = entries(&[
            set("app.toml", "server_port"),
            Op::Action {
                name: "restart".into(),
            },
        ]);
        assert!(overlap(&a, &e).is_empty());
    }

    #[test]
    fn a_proposals_status_follows_its_latest_commit_then_its_vetoes() {
        let policy = ReviewPolicy {
            required_approvals: 1,
            reviewers_from: vec!["team-b".into()],
            authors_cannot_approve: true,
            require_prediction_below: None,
        };
        let rejects = |party: &str| vec![(party.to_string(), Verdict::Reject)];
        assert_eq!(
            proposal_status(None, &policy, "team-a", &[]),
            ProposalStatus::Open
        );
        assert_eq!(
            proposal_status(None, &policy, "team-a", &rejects("team-b")),
            ProposalStatus::Rejected
        );
        // Not a counting reviewer: no veto.
        assert_eq!(
            proposal_status(None, &policy, "team-a", &rejects("intern")),
            ProposalStatus::Open
        );
        assert_eq!(
            proposal_status(
                Some(CommitStatus::Watching),
                &policy,
                "team-a",
                &rejects("team-b")
            ),
            ProposalStatus::Committing
        );
        assert_eq!(
            proposal_status(Some(CommitStatus::RolledBack), &policy, "team-a", &[]),
            ProposalStatus::RolledBack
        );
        for status in ProposalStatus::ALL {
            assert_eq!(ProposalStatus::parse(status.name()).unwrap(), status);
        }
        assert!(ProposalStatus::parse("merged").is_err());
    }
}
