//! The model: an ensemble of small MLPs (features → 32 → 16 → P(error) logit and two
//! standardised resource deltas), calibration, what the training data looked like (for the
//! distance measure), and its file format: safetensors with a JSON header in the
//! safetensors metadata. Inference runs on plain `f32` slices (the input is sparse, so the
//! first layer sums only the rows of the active features); training is in `train.rs`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::features::{DENSE_END, FEATURE_DIM, Features};

/// The file format this build writes and reads.
pub const MODEL_FORMAT_VERSION: u32 = 1;
pub const HIDDEN_1: usize = 32;
pub const HIDDEN_2: usize = 16;
/// Outputs per member: the P(error) logit, the CPU and RSS deltas (standardised).
pub const OUTPUTS: usize = 3;
pub const MEMBERS_MAX: usize = 16;
/// Structural tokens remembered from the training data.
pub const SEEN_TOKENS_MAX: usize = 1 << 18;
/// A model file larger than this is refused before it is parsed.
pub const MODEL_BYTES_MAX: usize = 64 << 20;
/// The one safetensors metadata entry (one entry, so the file's bytes do not depend on
/// the order of a map): the header and the checksum of the tensors, as JSON.
const METADATA_KEY: &str = "kairos.model";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetadata {
    header: ModelHeader,
    checksum: String,
}

/// Errors of model files and of training.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file is not a valid safetensors file: {0}")]
    Format(String),
    #[error("model file is {bytes} bytes, more than the {max} allowed")]
    TooLarge { bytes: usize, max: usize },
    #[error("model file has no {METADATA_KEY:?} header: not a kairos model")]
    MissingHeader,
    #[error("model header is not valid: {0}")]
    Header(String),
    #[error("model format version {found} is not supported (this build reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error(
        "model expects {found} features, {hidden_1}×{hidden_2} hidden units and {members} members; this build makes {expected} features, {HIDDEN_1}×{HIDDEN_2} hidden units and at most {MEMBERS_MAX} members"
    )]
    Incompatible {
        found: usize,
        expected: usize,
        hidden_1: usize,
        hidden_2: usize,
        members: usize,
    },
    #[error("model tensor {name:?}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("model checksum does not match its weights: the file is damaged")]
    Checksum,
    #[error("training needs at least {needed} examples with both outcomes among them, got {got}")]
    NotEnoughExamples { needed: usize, got: usize },
    #[error("training setting {name}: {reason}")]
    Setting { name: &'static str, reason: String },
    #[error("training failed: {0}")]
    Training(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(error: candle_core::Error) -> ModelError {
        ModelError::Training(error.to_string())
    }
}

/// Platt scaling of the ensemble's mean logit: p = σ(a·z + b), fitted on held-out outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub a: f32,
    pub b: f32,
}

/// How a regression target is encoded for its head: z = (asinh(y / unit) − mean) / std.
/// asinh keeps the sign and compresses the heavy tails of resource deltas (one change of
/// gigabytes would otherwise dominate the squared error of a hundred of megabytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TargetScale {
    /// Mean absolute value of the raw target in training.
    pub unit: f64,
    pub mean: f64,
    pub std: f64,
    pub examples: usize,
}

impl TargetScale {
    pub fn encode(&self, raw: f64) -> f32 {
        (((raw / self.unit).asinh() - self.mean) / self.std) as f32
    }

    pub fn decode(&self, encoded: f32) -> f64 {
        self.unit * (f64::from(encoded) * self.std + self.mean).sinh()
    }
}

/// Figures of the model on the held-out calibration outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub examples: usize,
    pub auc: Option<f64>,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
}

/// The JSON header of a model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelHeader {
    pub format_version: u32,
    pub feature_dim: usize,
    pub hidden: [usize; 2],
    pub members: usize,
    pub seed: u64,
    pub trained_examples: usize,
    /// Outcome times of the training data (nanoseconds since the epoch).
    pub training_first_ns: u64,
    pub training_last_ns: u64,
    pub calibration: Calibration,
    pub held_out: HeldOut,
    pub cpu_percent: Option<TargetScale>,
    pub rss_bytes: Option<TargetScale>,
}

/// One trained ensemble, ready to score.
#[derive(Debug, Clone)]
pub struct Model {
    pub header: ModelHeader,
    /// Per member, row-major: w1 [FEATURE_DIM][HIDDEN_1] (input scaling folded in), b1,
    /// w2 [HIDDEN_1][HIDDEN_2], b2, w3 [HIDDEN_2][OUTPUTS], b3.
    pub(crate) w1: Vec<f32>,
    pub(crate) b1: Vec<f32>,
    pub(crate) w2: Vec<f32>,
    pub(crate) b2: Vec<f32>,
    pub(crate) w3: Vec<f32>,
    pub(crate) b3: Vec<f32>,
    pub(crate) dense_mean: Vec<f32>,
    pub(crate) dense_std: Vec<f32>,
    pub(crate) seen_structural: HashSet<u64>,
    /// The first 16 hex digits of the weights' checksum: names the model.
    pub id: String,
}

/// Raw scores of one featurised proposal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Calibrated P(error) of the ensemble's mean logit.
    pub p_error: f32,
    /// Standard deviation of the members' calibrated probabilities.
    pub member_spread: f32,
    /// Fraction of the proposal's path and key tokens never seen in training (1 when it
    /// has none).
    pub novelty: f32,
    /// Largest |z-score| of the dense features against the training data.
    pub dense_z_max: f32,
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<f64>,
}

pub(crate) struct Activations {
    pub h1: [f32; HIDDEN_1],
    pub h2: [f32; HIDDEN_2],
    pub out: [f32; OUTPUTS],
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl Model {
    pub fn members(&self) -> usize {
        self.header.members
    }

    /// Forward pass of one member over the active features `(index, value)`.
    pub(crate) fn forward(&self, member: usize, active: &[(usize, f32)]) -> Activations {
        let w1 = &self.w1[member * FEATURE_DIM * HIDDEN_1..(member + 1) * FEATURE_DIM * HIDDEN_1];
        let mut h1 = [0f32; HIDDEN_1];
        h1.copy_from_slice(&self.b1[member * HIDDEN_1..(member + 1) * HIDDEN_1]);
        for &(index, value) in active {
            let row = &w1[index * HIDDEN_1..(index + 1) * HIDDEN_1];
            for (h, w) in h1.iter_mut().zip(row) {
                *h += value * w;
            }
        }
        for h in &mut h1 {
            *h = h.max(0.0);
        }
        let w2 = &self.w2[member * HIDDEN_1 * HIDDEN_2..(member + 1) * HIDDEN_1 * HIDDEN_2];
        let mut h2 = [0f32; HIDDEN_2];
        h2.copy_from_slice(&self.b2[member * HIDDEN_2..(member + 1) * HIDDEN_2]);
        for (i, &a) in h1.iter().enumerate() {
            if a != 0.0 {
                let row = &w2[i * HIDDEN_2..(i + 1) * HIDDEN_2];
                for (h, w) in h2.iter_mut().zip(row) {
                    *h += a * w;
                }
            }
        }
        for h in &mut h2 {
            *h = h.max(0.0);
        }
        let w3 = &self.w3[member * HIDDEN_2 * OUTPUTS..(member + 1) * HIDDEN_2 * OUTPUTS];
        let mut out = [0f32; OUTPUTS];
        out.copy_from_slice(&self.b3[member * OUTPUTS..(member + 1) * OUTPUTS]);
        for (i, &a) in h2.iter().enumerate() {
            for (o, w) in out.iter_mut().zip(&w3[i * OUTPUTS..(i + 1) * OUTPUTS]) {
                *o += a * w;
            }
        }
        Activations { h1, h2, out }
    }

    /// The gradient of one member's logit with respect to the input features listed.
    pub(crate) fn logit_gradient(
        &self,
        member: usize,
        activations: &Activations,
        indices: &[usize],
    ) -> Vec<f32> {
        let w3 = &self.w3[member * HIDDEN_2 * OUTPUTS..(member + 1) * HIDDEN_2 * OUTPUTS];
        let mut d_h2 = [0f32; HIDDEN_2];
        for (j, d) in d_h2.iter_mut().enumerate() {
            if activations.h2[j] > 0.0 {
                *d = w3[j * OUTPUTS];
            }
        }
        let w2 = &self.w2[member * HIDDEN_1 * HIDDEN_2..(member + 1) * HIDDEN_1 * HIDDEN_2];
        let mut d_h1 = [0f32; HIDDEN_1];
        for (i, d) in d_h1.iter_mut().enumerate() {
            if activations.h1[i] > 0.0 {
                *d = w2[i * HIDDEN_2..(i + 1) * HIDDEN_2]
                    .iter()
                    .zip(&d_h2)
                    .map(|(w, g)| w * g)
                    .sum();
            }
        }
        let w1 = &self.w1[member * FEATURE_DIM * HIDDEN_1..(member + 1) * FEATURE_DIM * HIDDEN_1];
        indices
            .iter()
            .map(|&index| {
                w1[index * HIDDEN_1..(index + 1) * HIDDEN_1]
                    .iter()
                    .zip(&d_h1)
                    .map(|(w, g)| w * g)
                    .sum()
            })
            .collect()
    }

    /// Scores a featurised proposal.
    pub fn score(&self, features: &Features) -> Scores {
        let active = active_features(&features.values);
        let calibration = self.header.calibration;
        let members = self.members();
        let (mut logit_sum, mut cpu_sum, mut rss_sum) = (0f32, 0f32, 0f32);
        let mut member_p = [0f32; MEMBERS_MAX];
        for (member, p) in member_p.iter_mut().enumerate().take(members) {
            let out = self.forward(member, &active).out;
            logit_sum += out[0];
            cpu_sum += out[1];
            rss_sum += out[2];
            *p = sigmoid(calibration.a * out[0] + calibration.b);
        }
        let count = members as f32;
        let p_error = sigmoid(calibration.a * logit_sum / count + calibration.b);
        let mean_p = member_p[..members].iter().sum::<f32>() / count;
        let member_spread = (member_p[..members]
            .iter()
            .map(|p| (p - mean_p).powi(2))
            .sum::<f32>()
            / count)
            .sqrt();
        Scores {
            p_error,
            member_spread,
            novelty: self.novelty(&features.structural),
            dense_z_max: self.dense_z_max(&features.values),
            cpu_percent: self
                .header
                .cpu_percent
                .map(|scale| scale.decode(cpu_sum / count) as f32),
            rss_bytes: self
                .header
                .rss_bytes
                .map(|scale| scale.decode(rss_sum / count)),
        }
    }

    /// Fraction of structural tokens never seen in training; 1 for a proposal without any.
    pub fn novelty(&self, structural: &[u64]) -> f32 {
        if structural.is_empty() {
            return 1.0;
        }
        let unseen = structural
            .iter()
            .filter(|token| !self.seen_structural.contains(token))
            .count();
        unseen as f32 / structural.len() as f32
    }

    fn dense_z_max(&self, values: &[f32]) -> f32 {
        values[..DENSE_END]
            .iter()
            .zip(self.dense_mean.iter().zip(&self.dense_std))
            .map(|(x, (mean, std))| (x - mean).abs() / std)
            .fold(0.0, f32::max)
    }

    /// The model file: safetensors whose metadata holds the JSON header and a checksum.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let members = self.members();
        let seen: Vec<u64> = {
            let mut seen: Vec<u64> = self.seen_structural.iter().copied().collect();
            seen.sort_unstable();
            seen
        };
        let seen_bytes: Vec<u8> = seen.iter().flat_map(|token| token.to_le_bytes()).collect();
        let tensors = self.tensor_list();
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = tensors
            .iter()
            .map(|(name, shape, data)| {
                (
                    name.to_string(),
                    shape.clone(),
                    f32_bytes(data),
                    safetensors::Dtype::F32,
                )
            })
            .collect();
        owned.push((
            "seen_structural".into(),
            vec![seen.len()],
            seen_bytes,
            safetensors::Dtype::U64,
        ));
        let checksum = checksum(owned.iter().map(|(_, _, bytes, _)| bytes.as_slice()));
        let metadata = serde_json::to_string(&FileMetadata {
            header: self.header.clone(),
            checksum: format!("{checksum:016x}"),
        })
        .map_err(|error| ModelError::Header(error.to_string()))?;
        let metadata = std::collections::HashMap::from([(METADATA_KEY.to_string(), metadata)]);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(name, shape, bytes, dtype)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(|error| ModelError::Format(error.to_string()))
            })
            .collect::<Result<_, _>>()?;
        debug_assert_eq!(members, self.b1.len() / HIDDEN_1);
        safetensors::tensor::serialize(views, Some(metadata))
            .map_err(|error| ModelError::Format(error.to_string()))
    }

    fn tensor_list(&self) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        let members = self.members();
        vec![
            ("w1", vec![members, FEATURE_DIM, HIDDEN_1], &self.w1[..]),
            ("b1", vec![members, HIDDEN_1], &self.b1[..]),
            ("w2", vec![members, HIDDEN_1, HIDDEN_2], &self.w2[..]),
            ("b2", vec![members, HIDDEN_2], &self.b2[..]),
            ("w3", vec![members, HIDDEN_2, OUTPUTS], &self.w3[..]),
            ("b3", vec![members, OUTPUTS], &self.b3[..]),
            ("dense_mean", vec![DENSE_END], &self.dense_mean[..]),
            ("dense_std", vec![DENSE_END], &self.dense_std[..]),
        ]
    }

    /// Reads a model file, checking everything before trusting it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, ModelError> {
        if bytes.len() > MODEL_BYTES_MAX {
            return Err(ModelError::TooLarge {
                bytes: bytes.len(),
                max: MODEL_BYTES_MAX,
            });
        }
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|error| ModelError::Format(error.to_string()))?;
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|error| ModelError::Format(error.to_string()))?;
        let info = metadata
            .metadata()
            .as_ref()
            .ok_or(ModelError::MissingHeader)?;
        let header_json = info.get(METADATA_KEY).ok_or(ModelError::MissingHeader)?;
        let FileMetadata {
            header,
            checksum: stored_checksum,
        } = serde_json::from_str(header_json)
            .map_err(|error| ModelError::Header(error.to_string()))?;
        check_header(&header)?;
        let members = header.members;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
            let bad = |reason: String| ModelError::Tensor {
                name: name.to_string(),
                reason,
            };
            let view = tensors
                .tensor(name)
                .map_err(|_| bad("missing".to_string()))?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("dtype {:?}, expected F32", view.dtype())));
            }
            if view.shape() != shape {
                return Err(bad(format!("shape {:?}, expected {shape:?}", view.shape())));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect();
            if values.iter().any(|value| !value.is_finite()) {
                return Err(bad("holds a value that is not finite".to_string()));
            }
            Ok(values)
        };
        let mut model = Model {
            w1: read("w1", &[members, FEATURE_DIM, HIDDEN_1])?,
            b1: read("b1", &[members, HIDDEN_1])?,
            w2: read("w2", &[members, HIDDEN_1, HIDDEN_2])?,
            b2: read("b2", &[members, HIDDEN_2])?,
            w3: read("w3", &[members, HIDDEN_2, OUTPUTS])?,
            b3: read("b3", &[members, OUTPUTS])?,
            dense_mean: read("dense_mean", &[DENSE_END])?,
            dense_std: read("dense_std", &[DENSE_END])?,
            seen_structural: HashSet::new(),
            id: String::new(),
            header,
        };
        if model.dense_std.iter().any(|std| *std <= 0.0) {
            return Err(ModelError::Tensor {
                name: "dense_std".into(),
                reason: "holds a value that is not positive".into(),
            });
        }
        let seen = tensors
            .tensor("seen_structural")
            .map_err(|_| ModelError::Tensor {
                name: "seen_structural".into(),
                reason: "missing".into(),
            })?;
        if seen.dtype() != safetensors::Dtype::U64
            || seen.shape().len() != 1
            || seen.shape()[0] > SEEN_TOKENS_MAX
        {
            return Err(ModelError::Tensor {
                name: "seen_structural".into(),
                reason: format!(
                    "dtype {:?} shape {:?}, expected U64 [n ≤ {SEEN_TOKENS_MAX}]",
                    seen.dtype(),
                    seen.shape()
                ),
            });
        }
        model.seen_structural = seen
            .data()
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])))
            .collect();
        let mut all: Vec<Vec<u8>> = model
            .tensor_list()
            .iter()
            .map(|(_, _, data)| f32_bytes(data))
            .collect();
        all.push(seen.data().to_vec());
        let computed = format!("{:016x}", checksum(all.iter().map(Vec::as_slice)));
        if stored_checksum != computed {
            return Err(ModelError::Checksum);
        }
        model.id = computed;
        Ok(model)
    }

    /// Computes the id from the weights (after training).
    pub(crate) fn seal(mut self) -> Result<Model, ModelError> {
        let bytes = self.to_bytes()?;
        let reread = Model::from_bytes(&bytes)?;
        self.id = reread.id;
        Ok(self)
    }
}

fn check_header(header: &ModelHeader) -> Result<(), ModelError> {
    if header.format_version != MODEL_FORMAT_VERSION {
        return Err(ModelError::Version {
            found: header.format_version,
            supported: MODEL_FORMAT_VERSION,
        });
    }
    if header.feature_dim != FEATURE_DIM
        || header.hidden != [HIDDEN_1, HIDDEN_2]
        || header.members == 0
        || header.members > MEMBERS_MAX
    {
        return Err(ModelError::Incompatible {
            found: header.feature_dim,
            expected: FEATURE_DIM,
            hidden_1: header.hidden[0],
            hidden_2: header.hidden[1],
            members: header.members,
        });
    }
    let calibration = header.calibration;
    if !calibration.a.is_finite() || !calibration.b.is_finite() {
        return Err(ModelError::Header("calibration is not finite".into()));
    }
    for scale in [header.cpu_percent, header.rss_bytes].into_iter().flatten() {
        if !scale.mean.is_finite()
            || !scale.std.is_finite()
            || scale.std <= 0.0
            || !scale.unit.is_finite()
            || scale.unit <= 0.0
        {
            return Err(ModelError::Header("a target scale is not valid".into()));
        }
    }
    Ok(())
}

/// The features that are not zero, with their values.
pub(crate) fn active_features(values: &[f32]) -> Vec<(usize, f32)> {
    values
        .iter()
        .enumerate()
        .filter(|(_, value)| **value != 0.0)
        .map(|(index, value)| (index, *value))
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// FNV-1a over all tensor bytes (catches damage that keeps the file parseable).
fn checksum<'a>(parts: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for chunk in part.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            state ^= u64::from_le_bytes(word);
            state = state.wrapping_mul(0x0000_0100_0000_01b3);
            state ^= state >> 29;
        }
    }
    state
}
