//! When to retrain: a decision without IO for the node's predictor actor (like the
//! snapshotter's `CaptureQueue`). The actor counts outcomes as they arrive and asks
//! `RetrainPolicy::decide`; it trains off the serving path and swaps the model whole.

use serde::{Deserialize, Serialize};

/// How much history a model needs, and how much new history makes a retraining worth it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrainPolicy {
    /// Outcomes needed before a first model is trained.
    pub outcomes_min: usize,
    /// New outcomes since the last training that trigger the next one...
    pub new_outcomes_min: usize,
    /// ...or this share of the outcomes the serving model was trained on, whichever is
    /// larger (a large history retrains less often).
    pub new_outcomes_share_min: f64,
}

impl Default for RetrainPolicy {
    fn default() -> RetrainPolicy {
        RetrainPolicy {
            outcomes_min: 200,
            new_outcomes_min: 50,
            new_outcomes_share_min: 0.1,
        }
    }
}

/// What the actor should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrainDecision {
    /// Not enough history yet: keep abstaining.
    Wait {
        outcomes_needed: usize,
    },
    /// The serving model is recent enough.
    Keep {
        new_outcomes_needed: usize,
    },
    Train,
}

impl RetrainPolicy {
    /// `outcomes`: labelled outcomes known now; `trained_on`: outcomes the serving model
    /// saw (`None` without a model); `failures`: failed outcomes among `outcomes` (a model
    /// needs both kinds).
    pub fn decide(
        &self,
        outcomes: usize,
        failures: usize,
        trained_on: Option<usize>,
    ) -> RetrainDecision {
        let two_kinds = failures > 0 && failures < outcomes;
        if outcomes < self.outcomes_min || !two_kinds {
            return RetrainDecision::Wait {
                outcomes_needed: self.outcomes_min.saturating_sub(outcomes).max(1),
            };
        }
        let Some(trained_on) = trained_on else {
            return RetrainDecision::Train;
        };
        let needed = self
            .new_outcomes_min
            .max((trained_on as f64 * self.new_outcomes_share_min).ceil() as usize);
        let new = outcomes.saturating_sub(trained_on);
        if new >= needed {
            RetrainDecision::Train
        } else {
            RetrainDecision::Keep {
                new_outcomes_needed: needed - new,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_trains_keeps_and_retrains() {
        let policy = RetrainPolicy::default();
        assert_eq!(
            policy.decide(10, 3, None),
            RetrainDecision::Wait {
                outcomes_needed: 190
            }
        );
        // Enough outcomes but all of one kind: still nothing to learn from.
        assert!(matches!(
            policy.decide(500, 0, None),
            RetrainDecision::Wait { .. }
        ));
        assert_eq!(policy.decide(200, 20, None), RetrainDecision::Train);
        assert_eq!(
            policy.decide(230, 20, Some(200)),
            RetrainDecision::Keep {
                new_outcomes_needed: 20
            }
        );
        assert_eq!(policy.decide(250, 20, Some(200)), RetrainDecision::Train);
        // A large history waits for a tenth more.
        assert_eq!(
            policy.decide(10_500, 900, Some(10_000)),
            RetrainDecision::Keep {
                new_outcomes_needed: 500
            }
        );
        assert_eq!(
            policy.decide(11_000, 900, Some(10_000)),
            RetrainDecision::Train
        );
    }
}
