//! Serving: a `Predictor` turns a proposal and its history into a `Prediction` (P(error),
//! confidence, abstention, resource deltas, affected entries, explanation). Without a
//! model, or with a model that could not be loaded, it abstains with confidence 0.
//! `SharedPredictor` swaps the serving model atomically while predictions are served.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::features::{self, Trace};
use crate::history::History;
use crate::model::{Model, ModelError, Scores, active_features};
use crate::view::ProposalView;

/// Above this novelty (fraction of path and key tokens never seen in training) the
/// predictor abstains.
pub const NOVELTY_ABSTAIN_MIN: f32 = 0.5;
/// Above this z-score of a dense feature against the training data the predictor abstains.
pub const DENSE_Z_ABSTAIN_MIN: f32 = 30.0;
/// A member spread (standard deviation of the members' probabilities) at which agreement
/// reaches 0.
pub const MEMBER_SPREAD_MAX: f32 = 0.5;
/// Explanation lines in a prediction.
pub const EXPLANATION_ITEMS_MAX: usize = 5;
/// Affected entries listed in a prediction.
pub const AFFECTED_ITEMS_MAX: usize = 32;

/// Predicted resource change after a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceDeltas {
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<f64>,
}

/// The model's estimate for a proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub p_error: f32,
    /// 0 (no idea) to 1 (certain): how decisive the calibrated probability is, times the
    /// members' agreement, times how familiar the proposal is.
    pub confidence: f32,
    /// The proposal is unlike the training data, or there is no model: do not trust
    /// `p_error`.
    pub abstain: bool,
    pub resource_deltas: ResourceDeltas,
    pub affected: Vec<String>,
    pub explanation: Vec<String>,
    /// The model's id, `None` without a model.
    pub model: Option<String>,
}

/// Serves predictions from one model (or none).
#[derive(Debug, Clone, Default)]
pub struct Predictor {
    model: Option<Arc<Model>>,
}

impl Predictor {
    /// A predictor without a model: every prediction abstains with confidence 0.
    pub fn untrained() -> Predictor {
        Predictor { model: None }
    }

    pub fn new(model: Model) -> Predictor {
        Predictor {
            model: Some(Arc::new(model)),
        }
    }

    /// Loads a model file; a damaged or incompatible one is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Predictor, ModelError> {
        Ok(Predictor::new(Model::from_bytes(bytes)?))
    }

    /// Loads a model file, or falls back to abstaining (returning why).
    pub fn from_bytes_or_abstain(bytes: &[u8]) -> (Predictor, Option<ModelError>) {
        match Predictor::from_bytes(bytes) {
            Ok(predictor) => (predictor, None),
            Err(error) => (Predictor::untrained(), Some(error)),
        }
    }

    pub fn model(&self) -> Option<&Model> {
        self.model.as_deref()
    }

    /// Scores only (no explanation): the fast path for bulk evaluation.
    pub fn scores(&self, proposal: &ProposalView, history: &History) -> Option<Scores> {
        let model = self.model.as_deref()?;
        Some(model.score(&features::features_with(proposal, history, None)))
    }

    /// The prediction for `proposal`; `history` must hold only outcomes that arrived
    /// before it.
    pub fn predict(&self, proposal: &ProposalView, history: &History) -> Prediction {
        let affected: Vec<String> = features::affected(proposal)
            .into_iter()
            .take(AFFECTED_ITEMS_MAX)
            .collect();
        let Some(model) = self.model.as_deref() else {
            return Prediction {
                p_error: history.overall_rate(),
                confidence: 0.0,
                abstain: true,
                resource_deltas: ResourceDeltas::default(),
                affected,
                explanation: vec!["no model trained yet".into()],
                model: None,
            };
        };
        let mut trace = Trace::default();
        let features = features::features_with(proposal, history, Some(&mut trace));
        let scores = model.score(&features);
        let (confidence, abstain) = confidence(&scores);
        let mut explanation = explain(model, &features.values, &trace);
        if abstain {
            explanation.insert(
                0,
                format!(
                    "unlike the training data: {:.0}% of its paths and keys never seen",
                    scores.novelty * 100.0
                ),
            );
            explanation.truncate(EXPLANATION_ITEMS_MAX);
        }
        Prediction {
            p_error: scores.p_error,
            confidence,
            abstain,
            resource_deltas: ResourceDeltas {
                cpu_percent: scores.cpu_percent,
                rss_bytes: scores.rss_bytes,
            },
            affected,
            explanation,
            model: Some(model.id.clone()),
        }
    }
}

/// Confidence and abstention from raw scores.
pub fn confidence(scores: &Scores) -> (f32, bool) {
    let decisive = (2.0 * scores.p_error.max(1.0 - scores.p_error) - 1.0).clamp(0.0, 1.0);
    let agreement = (1.0 - scores.member_spread / MEMBER_SPREAD_MAX).clamp(0.0, 1.0);
    let abstain = scores.novelty > NOVELTY_ABSTAIN_MIN || scores.dense_z_max > DENSE_Z_ABSTAIN_MIN;
    let familiarity = if abstain { 0.0 } else { 1.0 - scores.novelty };
    (decisive * agreement * familiarity, abstain)
}

/// The labels whose features moved the mean logit most (gradient × input, averaged over
/// the members), strongest first.
fn explain(model: &Model, values: &[f32], trace: &Trace) -> Vec<String> {
    let active = active_features(values);
    let indices: Vec<usize> = active.iter().map(|(index, _)| *index).collect();
    let mut gradient = vec![0f32; indices.len()];
    for member in 0..model.members() {
        let activations = model.forward(member, &active);
        for (sum, value) in
            gradient
                .iter_mut()
                .zip(model.logit_gradient(member, &activations, &indices))
        {
            *sum += value / model.members() as f32;
        }
    }
    let mut by_index = vec![0f32; values.len()];
    for (position, &index) in indices.iter().enumerate() {
        by_index[index] = gradient[position];
    }
    let mut by_label: HashMap<String, f32> = HashMap::new();
    for &(label, index, amount) in &trace.parts {
        let Some(label) = trace.labels.get(label as usize) else {
            continue;
        };
        *by_label.entry(label.render()).or_default() += amount * by_index[index as usize];
    }
    let mut ranked: Vec<(String, f32)> = by_label
        .into_iter()
        .filter(|(_, weight)| weight.abs() > 1e-3)
        .collect();
    ranked.sort_by(|left, right| {
        right
            .1
            .abs()
            .total_cmp(&left.1.abs())
            .then_with(|| left.0.cmp(&right.0))
    });
    ranked
        .into_iter()
        .take(EXPLANATION_ITEMS_MAX)
        .map(|(label, weight)| {
            let direction = if weight > 0.0 { "raises" } else { "lowers" };
            format!("{label} ({direction} risk, {weight:+.2})")
        })
        .collect()
}

/// A predictor that can be replaced while predictions are being served: readers take the
/// current one (an `Arc`), a trainer swaps in the next; no reader ever sees a torn model.
#[derive(Debug, Default)]
pub struct SharedPredictor {
    current: RwLock<Arc<Predictor>>,
}

impl SharedPredictor {
    pub fn new(predictor: Predictor) -> SharedPredictor {
        SharedPredictor {
            current: RwLock::new(Arc::new(predictor)),
        }
    }

    pub fn current(&self) -> Arc<Predictor> {
        // A poisoned lock still holds a whole `Arc` (it is only ever replaced whole).
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, predictor: Predictor) {
        let next = Arc::new(predictor);
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}
