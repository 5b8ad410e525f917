//! Review policies: what a proposal needs before it may be committed on a timeline — a
//! number of approvals, from which parties, whether its author's own approval counts,
//! and how low its predicted risk must be — and [`decide`], the pure function that says
//! what a proposal still lacks. The store keeps the reviews; the operations enforce the
//! decision at commit.
//!
//! Each party's latest verdict on a proposal is the one that counts. A standing
//! rejection by a party whose approval would count (one of `reviewers_from`, or any party
//! when the list is empty; never the author, when `authors_cannot_approve`) blocks the
//! commit until that party approves instead: a reject is a veto, not a negative vote.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Approvals a policy may ask for at most.
pub const REQUIRED_APPROVALS_MAX: u32 = 32;
/// Parties a policy may name as reviewers at most.
pub const REVIEWERS_MAX: usize = 64;

/// What a proposal needs before a commit on its timeline. The default asks for nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewPolicy {
    /// Approvals that must stand (from `reviewers_from`, when given).
    #[serde(default)]
    pub required_approvals: u32,
    /// The parties whose reviews count; empty: any party.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reviewers_from: Vec<String>,
    /// The author's own approval does not count (and the author may not approve).
    #[serde(default)]
    pub authors_cannot_approve: bool,
    /// The prediction made for the commit must be confident (not abstaining) with
    /// P(error) below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_prediction_below: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReviewPolicyError {
    #[error("required_approvals = {0} is more than {REQUIRED_APPROVALS_MAX}")]
    TooManyApprovals(u32),
    #[error(
        "required_approvals = {required} can never be met: reviewers_from names {parties} parties"
    )]
    Unreachable { required: u32, parties: usize },
    #[error("reviewers_from names more than {REVIEWERS_MAX} parties")]
    TooManyReviewers,
    #[error("reviewers_from: {0:?} is not a party name (letters, digits, '-', '_', '.')")]
    BadReviewer(String),
    #[error("reviewers_from names {0:?} twice")]
    DuplicateReviewer(String),
    #[error("require_prediction_below = {0} is not above 0 and at most 1")]
    PredictionBound(f64),
}

impl ReviewPolicy {
    /// Whether the policy asks for anything.
    pub fn is_empty(&self) -> bool {
        self.required_approvals == 0 && self.require_prediction_below.is_none()
    }

    pub fn validate(&self) -> Result<(), ReviewPolicyError> {
        if self.required_approvals > REQUIRED_APPROVALS_MAX {
            return Err(ReviewPolicyError::TooManyApprovals(self.required_approvals));
        }
        if self.reviewers_from.len() > REVIEWERS_MAX {
            return Err(ReviewPolicyError::TooManyReviewers);
        }
        for (index, party) in self.reviewers_from.iter().enumerate() {
            if !crate::replica::is_valid_replica_name(party) {
                return Err(ReviewPolicyError::BadReviewer(party.clone()));
            }
            if self.reviewers_from[..index].contains(party) {
                return Err(ReviewPolicyError::DuplicateReviewer(party.clone()));
            }
        }
        // More approvals than reviewers: nobody's proposal could ever be committed. (With
        // authors_cannot_approve, a reviewer's own proposal needs the others: when they are
        // too few, its proposals are refused at commit, saying so; everyone else's pass.)
        if !self.reviewers_from.is_empty()
            && self.required_approvals as usize > self.reviewers_from.len()
        {
            return Err(ReviewPolicyError::Unreachable {
                required: self.required_approvals,
                parties: self.reviewers_from.len(),
            });
        }
        if let Some(bound) = self.require_prediction_below
            && !(bound > 0.0 && bound <= 1.0)
        {
            return Err(ReviewPolicyError::PredictionBound(bound));
        }
        Ok(())
    }

    /// Whether `party`'s approval of a proposal by `author` counts.
    pub fn counts(&self, party: &str, author: &str) -> bool {
        (self.reviewers_from.is_empty() || self.reviewers_from.iter().any(|p| p == party))
            && !(self.authors_cannot_approve && party == author)
    }
}

/// A reviewer's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Reject => "reject",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The prediction a decision looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictionSeen {
    pub p_error: f64,
    pub confidence: f64,
    pub abstain: bool,
}

/// One thing a proposal lacks.
#[derive(Debug, Clone, PartialEq)]
pub enum Unmet {
    /// Fewer approvals stand than required.
    Approvals {
        required: u32,
        from: Vec<String>,
        counted: Vec<String>,
    },
    /// Approvals that do not count: from outside `reviewers_from`.
    OutsideReviewers(Vec<String>),
    /// The author approved its own proposal, which does not count.
    OwnApproval(String),
    /// Parties whose approval would count reject it.
    Rejected(Vec<String>),
    /// No prediction was made.
    NoPrediction { below: f64 },
    /// The prediction abstained (no confident call).
    PredictionAbstains { below: f64, confidence: f64 },
    /// The predicted risk is too high.
    PredictionTooRisky { below: f64, p_error: f64 },
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Approvals {
                required,
                from,
                counted,
            } => {
                write!(f, "needs {required} approvals")?;
                if !from.is_empty() {
                    write!(f, " from [{}]", from.join(", "))?;
                }
                write!(f, ", has {}", counted.len())?;
                if !counted.is_empty() {
                    write!(f, " ({})", counted.join(", "))?;
                }
                Ok(())
            }
            Unmet::OutsideReviewers(parties) => write!(
                f,
                "approvals from [{}] do not count (not in reviewers_from)",
                parties.join(", ")
            ),
            Unmet::OwnApproval(author) => write!(
                f,
                "its author {author}'s own approval does not count (authors_cannot_approve)"
            ),
            Unmet::Rejected(parties) => write!(
                f,
                "rejected by [{}] (a reject stands until that party approves)",
                parties.join(", ")
            ),
            Unmet::NoPrediction { below } => {
                write!(
                    f,
                    "needs a prediction with P(error) below {below}, has none"
                )
            }
            Unmet::PredictionAbstains { below, confidence } => write!(
                f,
                "needs a prediction with P(error) below {below}; the model abstains (confidence {confidence:.2})"
            ),
            Unmet::PredictionTooRisky { below, p_error } => write!(
                f,
                "needs a prediction with P(error) below {below}, predicted {p_error:.2}"
            ),
        }
    }
}

/// What a proposal lacks under a policy; empty: it may be committed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyDecision {
    pub unmet: Vec<Unmet>,
}

impl PolicyDecision {
    pub fn allowed(&self) -> bool {
        self.unmet.is_empty()
    }
}

impl fmt::Display for PolicyDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, unmet) in self.unmet.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{unmet}")?;
        }
        Ok(())
    }
}

/// What `policy` says of a proposal by `author` with these standing verdicts (each
/// party's latest, by party name) and this prediction.
pub fn decide(
    policy: &ReviewPolicy,
    author: &str,
    verdicts: &[(String, Verdict)],
    prediction: Option<PredictionSeen>,
) -> PolicyDecision {
    let mut unmet = Vec::new();
    let of = |wanted: Verdict, counting: bool| -> Vec<String> {
        let mut parties: Vec<String> = verdicts
            .iter()
            .filter(|(party, verdict)| {
                *verdict == wanted && policy.counts(party, author) == counting
            })
            .map(|(party, _)| party.clone())
            .collect();
        parties.sort();
        parties.dedup();
        parties
    };
    let rejected = of(Verdict::Reject, true);
    if !rejected.is_empty() {
        unmet.push(Unmet::Rejected(rejected));
    }
    let counted = of(Verdict::Approve, true);
    if (counted.len() as u64) < u64::from(policy.required_approvals) {
        unmet.push(Unmet::Approvals {
            required: policy.required_approvals,
            from: policy.reviewers_from.clone(),
            counted,
        });
        // Say why approvals given do not count, when they do not.
        let ignored = of(Verdict::Approve, false);
        if policy.authors_cannot_approve && ignored.iter().any(|party| party == author) {
            unmet.push(Unmet::OwnApproval(author.to_string()));
        }
        let outside: Vec<String> = ignored.into_iter().filter(|p| p != author).collect();
        if !outside.is_empty() {
            unmet.push(Unmet::OutsideReviewers(outside));
        }
    }
    if let Some(below) = policy.require_prediction_below {
        match prediction {
            None => unmet.push(Unmet::NoPrediction { below }),
            Some(seen) if seen.abstain => unmet.push(Unmet::PredictionAbstains {
                below,
                confidence: seen.confidence,
            }),
            Some(seen) if seen.p_error >= below => unmet.push(Unmet::PredictionTooRisky {
                below,
                p_error: seen.p_error,
            }),
            Some(_) => {}
        }
    }
    PolicyDecision { unmet }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(required: u32, from: &[&str], authors_cannot_approve: bool) -> ReviewPolicy {
        ReviewPolicy {
            required_approvals: required,
            reviewers_from: from.iter().map(|p| p.to_string()).collect(),
            authors_cannot_approve,
            require_prediction_below: None,
        }
    }

    fn verdicts(list: &[(&str, Verdict)]) -> Vec<(String, Verdict)> {
        list.iter().map(|(p, v)| (p.to_string(), *v)).collect()
    }

    use Verdict::{Approve, Reject};

    #[test]
    fn no_policy_allows_everything() {
        let decision = decide(&ReviewPolicy::default(), "a", &[], None);
        assert!(decision.allowed());
        assert!(ReviewPolicy::default().is_empty());
    }

    #[test]
    fn missing_approvals_are_named_with_who_approved() {
        let policy = policy(2, &["team-a", "team-b"], false);
        let decision = decide(&policy, "team-c", &verdicts(&[("team-a", Approve)]), None);
        assert_eq!(
            decision.to_string(),
            "needs 2 approvals from [team-a, team-b], has 1 (team-a)"
        );
        let decision = decide(
            &policy,
            "team-c",
            &verdicts(&[("team-a", Approve), ("team-b", Approve)]),
            None,
        );
        assert!(decision.allowed(), "{decision}");
    }

    #[test]
    fn approvals_from_outside_the_reviewers_do_not_count() {
        let policy = policy(1, &["team-a"], false);
        let decision = decide(&policy, "team-c", &verdicts(&[("intern", Approve)]), None);
        assert_eq!(
            decision.to_string(),
            "needs 1 approvals from [team-a], has 0; approvals from [intern] do not count (not in reviewers_from)"
        );
    }

    #[test]
    fn an_authors_own_approval_does_not_count_when_forbidden() {
        let strict = policy(1, &[], true);
        let decision = decide(&strict, "team-a", &verdicts(&[("team-a", Approve)]), None);
        assert!(!decision.allowed());
        assert!(decision.to_string().contains("team-a's own approval"));
        let lenient = policy(1, &[], false);
        assert!(decide(&lenient, "team-a", &verdicts(&[("team-a", Approve)]), None).allowed());
    }

    #[test]
    fn a_reject_by_a_counting_reviewer_is_a_veto() {
        let policy = policy(1, &["team-a", "team-b"], false);
        let decision = decide(
            &policy,
            "team-c",
            &verdicts(&[("team-a", Approve), ("team-b", Reject)]),
            None,
        );
        assert_eq!(decision.unmet, vec![Unmet::Rejected(vec!["team-b".into()])]);
        // A reject from a party whose approval would not count is no veto.
        let decision = decide(
            &policy,
            "team-c",
            &verdicts(&[("team-a", Approve), ("intern", Reject)]),
            None,
        );
        assert!(decision.allowed(), "{decision}");
    }

    #[test]
    fn predictions_must_be_confident_and_below_the_bound() {
        let mut policy = policy(0, &[], false);
        policy.require_prediction_below = Some(0.2);
        let seen = |p_error, abstain| PredictionSeen {
            p_error,
            confidence: 0.9,
            abstain,
        };
        assert!(matches!(
            decide(&policy, "a", &[], None).unmet[..],
            [Unmet::NoPrediction { .. }]
        ));
        assert!(matches!(
            decide(&policy, "a", &[], Some(seen(0.1, true))).unmet[..],
            [Unmet::PredictionAbstains { .. }]
        ));
        let risky = decide(&policy, "a", &[], Some(seen(0.2, false)));
        assert_eq!(
            risky.to_string(),
            "needs a prediction with P(error) below 0.2, predicted 0.20"
        );
        assert!(decide(&policy, "a", &[], Some(seen(0.19, false))).allowed());
    }

    #[test]
    fn policies_out_of_range_are_named() {
        assert!(matches!(
            policy(33, &[], false).validate(),
            Err(ReviewPolicyError::TooManyApprovals(33))
        ));
        assert!(matches!(
            policy(3, &["a", "b"], true).validate(),
            Err(ReviewPolicyError::Unreachable { .. })
        ));
        // A's own proposals would need two approvals besides its own, and only B's is left:
        // those are refused at commit; everyone else's can pass.
        assert!(policy(2, &["a", "b"], true).validate().is_ok());
        assert!(policy(2, &["a", "b"], false).validate().is_ok());
        assert!(matches!(
            policy(1, &["a b"], false).validate(),
            Err(ReviewPolicyError::BadReviewer(_))
        ));
        assert!(matches!(
            policy(1, &["a", "a"], false).validate(),
            Err(ReviewPolicyError::DuplicateReviewer(_))
        ));
        for bound in [0.0, 1.5, f64::NAN] {
            let mut bad = policy(0, &[], false);
            bad.require_prediction_below = Some(bound);
            assert!(bad.validate().is_err(), "{bound}");
        }
    }
}
