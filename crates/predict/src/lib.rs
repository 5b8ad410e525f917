//! Kairos predictions: features of a proposal, a small calibrated ensemble trained with
//! candle that gives P(error) and resource deltas, a confidence that combines ensemble
//! agreement, calibration and distance from the training data, abstention out of
//! distribution, and explanations naming the entries that moved the prediction.

pub mod features;
pub mod history;
pub mod metrics;
pub mod model;
pub mod predictor;
pub mod retrain;
pub mod train;
pub mod view;

pub use features::{FEATURE_DIM, Features, Label, Trace, features, features_with};
pub use history::{History, HistoryError};
pub use model::{Model, ModelError, ModelHeader, Scores};
pub use predictor::{Prediction, Predictor, ResourceDeltas, SharedPredictor};
pub use retrain::{RetrainDecision, RetrainPolicy};
pub use train::{Example, TrainingSettings, examples_from_records, train};
pub use view::{
    DiffSummary, FileView, OpKind, OpView, Outcome, OutcomeRecord, ProposalView, ResourceTrend,
};
