//! Training: examples from outcome records (features computed with only the outcomes that
//! arrived before each proposal), the ensemble trained with candle-nn's AdamW on bootstrap
//! weights (all members in one batched forward pass), Platt calibration on held-out
//! outcomes. Deterministic from the seed.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::features::{DENSE_END, FEATURE_DIM, Features, features_with};
use crate::history::History;
use crate::metrics;
use crate::model::{
    Calibration, HIDDEN_1, HIDDEN_2, HeldOut, MEMBERS_MAX, MODEL_FORMAT_VERSION, Model, ModelError,
    ModelHeader, OUTPUTS, SEEN_TOKENS_MAX, TargetScale, sigmoid,
};
use crate::view::OutcomeRecord;

/// Fewest training examples (with at least one failure and one success) a model needs.
pub const TRAINING_EXAMPLES_MIN: usize = 20;
/// Most training examples used (the most recent are kept).
pub const TRAINING_EXAMPLES_MAX: usize = 200_000;
/// Floor of the dense features' standard deviation in the distance measure.
pub const DENSE_STD_FLOOR: f32 = 0.1;

/// A labelled, featurised example.
#[derive(Debug, Clone)]
pub struct Example {
    pub features: Features,
    pub failed: bool,
    pub cpu_percent_delta: Option<f32>,
    pub rss_bytes_delta: Option<f64>,
    pub outcome_time_ns: u64,
}

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingSettings {
    pub seed: u64,
    pub members: usize,
    pub epochs: usize,
    /// Bound on epochs × examples: a large history trains for fewer epochs (its epochs
    /// hold more steps), which bounds the training time.
    pub example_passes_max: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Threads the training runs on (its own thread pool). One by default: the steps are
    /// small, so a second thread mostly waits, and the node keeps a core for serving.
    pub threads: usize,
}

impl Default for TrainingSettings {
    fn default() -> TrainingSettings {
        TrainingSettings {
            seed: 0,
            members: 5,
            epochs: 60,
            example_passes_max: 300_000,
            batch_size: 256,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            threads: 1,
        }
    }
}

impl TrainingSettings {
    fn check(&self) -> Result<(), ModelError> {
        let setting = |name, reason: &str| {
            Err(ModelError::Setting {
                name,
                reason: reason.to_string(),
            })
        };
        if self.members == 0 || self.members > MEMBERS_MAX {
            return setting("members", "must be 1 to 16");
        }
        if self.epochs == 0 || self.epochs > 1_000 {
            return setting("epochs", "must be 1 to 1000");
        }
        if self.threads == 0 || self.threads > 64 {
            return setting("threads", "must be 1 to 64");
        }
        if self.example_passes_max == 0 {
            return setting("example_passes_max", "must be positive");
        }
        if self.batch_size == 0 || self.batch_size > 8_192 {
            return setting("batch_size", "must be 1 to 8192");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return setting("learning_rate", "must be in (0, 1)");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay < 1.0) {
            return setting("weight_decay", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Prepares the process for training, once, at the start of `main`:
/// - keeps freed buffers in the heap (glibc `mallopt`): candle allocates a fresh tensor
///   for every operation of every step, and giving them back to the kernel each time
///   costs more than the arithmetic;
/// - unless `RAYON_NUM_THREADS` is set, sets it to 1: candle's matrix products read it on
///   every call, and with more than one thread they take about five times longer for
///   these small matrices on a busy machine (measured: 3.7 s against 20 s for 4 800
///   examples), whatever thread pool they run in;
/// - and then builds rayon's global pool with one thread per core all the same: capture
///   (walk, chunking, hashing, compression) and restore run in that pool, and the
///   variable alone would leave them one thread (restore measured 2.5 s against 1.5 s for
///   520 MiB on 2 cores).
///
/// # Safety
///
/// Changes the process environment: call it before any other thread is started.
pub unsafe fn prepare_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it has no memory-safety
    // preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // An explicit thread count overrides the variable. This fails only when the global
        // pool already exists (a caller that used rayon before), which then keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .thread_name(|index| format!("kairos-work-{index}"))
            .build_global();
    }
}

/// Examples from outcome records, in proposal-time order: each proposal's features see
/// exactly the outcomes that arrived strictly before it (no leakage).
pub fn examples_from_records(records: &[OutcomeRecord]) -> Vec<Example> {
    let mut by_proposal: Vec<&OutcomeRecord> = records.iter().collect();
    by_proposal.sort_by_key(|record| record.proposal.time_ns);
    let mut by_outcome: Vec<&OutcomeRecord> = records.iter().collect();
    by_outcome.sort_by_key(|record| record.outcome.time_ns);
    let mut history = History::new();
    let mut next = 0;
    by_proposal
        .into_iter()
        .map(|record| {
            while next < by_outcome.len()
                && by_outcome[next].outcome.time_ns < record.proposal.time_ns
            {
                // Sorted by outcome time, so never out of order.
                let _ = history.record(by_outcome[next]);
                next += 1;
            }
            example(record, &history)
        })
        .collect()
}

/// One example with a prepared history (holding only outcomes before the proposal).
pub fn example(record: &OutcomeRecord, history: &History) -> Example {
    Example {
        features: features_with(&record.proposal, history, None),
        failed: record.outcome.failed,
        cpu_percent_delta: record.outcome.cpu_percent_delta,
        rss_bytes_delta: record.outcome.rss_bytes_delta,
        outcome_time_ns: record.outcome.time_ns,
    }
}

/// Trains an ensemble on `train` and calibrates it on `calibration` (held out; without
/// it the calibration is the identity and the held-out figures are empty).
pub fn train(
    train: &[Example],
    calibration: &[Example],
    settings: &TrainingSettings,
) -> Result<Model, ModelError> {
    settings.check()?;
    let train = &train[train.len().saturating_sub(TRAINING_EXAMPLES_MAX)..];
    let failures = train.iter().filter(|example| example.failed).count();
    if train.len() < TRAINING_EXAMPLES_MIN || failures == 0 || failures == train.len() {
        return Err(ModelError::NotEnoughExamples {
            needed: TRAINING_EXAMPLES_MIN,
            got: train.len(),
        });
    }
    let scale = feature_scale(train);
    let cpu_scale = target_scale(
        train
            .iter()
            .map(|example| example.cpu_percent_delta.map(f64::from)),
    );
    let rss_scale = target_scale(train.iter().map(|example| example.rss_bytes_delta));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads)
        .thread_name(|index| format!("kairos-train-{index}"))
        .build()
        .map_err(|error| ModelError::Training(format!("no training thread pool: {error}")))?;
    let weights = pool.install(|| fit(train, &scale, cpu_scale, rss_scale, settings))?;
    let (dense_mean, dense_std) = dense_statistics(train);
    let mut seen_structural = HashSet::new();
    for example in train {
        for &token in &example.features.structural {
            if seen_structural.len() < SEEN_TOKENS_MAX {
                seen_structural.insert(token);
            }
        }
    }
    let mut model = Model {
        header: ModelHeader {
            format_version: MODEL_FORMAT_VERSION,
            feature_dim: FEATURE_DIM,
            hidden: [HIDDEN_1, HIDDEN_2],
            members: settings.members,
            seed: settings.seed,
            trained_examples: train.len(),
            training_first_ns: train.iter().map(|e| e.outcome_time_ns).min().unwrap_or(0),
            training_last_ns: train.iter().map(|e| e.outcome_time_ns).max().unwrap_or(0),
            calibration: Calibration { a: 1.0, b: 0.0 },
            held_out: HeldOut {
                examples: 0,
                auc: None,
                brier: None,
                ece: None,
            },
            cpu_percent: cpu_scale,
            rss_bytes: rss_scale,
        },
        w1: weights[0].clone(),
        b1: weights[1].clone(),
        w2: weights[2].clone(),
        b2: weights[3].clone(),
        w3: weights[4].clone(),
        b3: weights[5].clone(),
        dense_mean,
        dense_std,
        seen_structural,
        id: String::new(),
    };
    // Fold the input scaling into the first layer: the model takes raw features.
    for member in 0..settings.members {
        for (index, factor) in scale.iter().enumerate() {
            let start = (member * FEATURE_DIM + index) * HIDDEN_1;
            for weight in &mut model.w1[start..start + HIDDEN_1] {
                *weight /= factor;
            }
        }
    }
    if !calibration.is_empty() {
        let logits: Vec<f32> = calibration
            .iter()
            .map(|example| mean_logit(&model, &example.features))
            .collect();
        let failed: Vec<bool> = calibration.iter().map(|example| example.failed).collect();
        model.header.calibration = fit_platt(&logits, &failed);
        let p: Vec<f32> = calibration
            .iter()
            .map(|example| model.score(&example.features).p_error)
            .collect();
        model.header.held_out = HeldOut {
            examples: calibration.len(),
            auc: metrics::auc(&p, &failed),
            brier: metrics::brier(&p, &failed),
            ece: metrics::ece(&p, &failed),
        };
    }
    model.seal()
}

fn mean_logit(model: &Model, features: &Features) -> f32 {
    let active = crate::model::active_features(&features.values);
    (0..model.members())
        .map(|member| model.forward(member, &active).out[0])
        .sum::<f32>()
        / model.members() as f32
}

fn feature_scale(train: &[Example]) -> Vec<f32> {
    let mut scale = vec![0f32; FEATURE_DIM];
    for example in train {
        for (max, value) in scale.iter_mut().zip(&example.features.values) {
            *max = max.max(value.abs());
        }
    }
    scale
        .into_iter()
        .map(|max| if max > 1e-6 { max } else { 1.0 })
        .collect()
}

fn target_scale(values: impl Iterator<Item = Option<f64>>) -> Option<TargetScale> {
    let values: Vec<f64> = values.flatten().filter(|value| value.is_finite()).collect();
    if values.len() < TRAINING_EXAMPLES_MIN {
        return None;
    }
    let unit =
        (values.iter().map(|value| value.abs()).sum::<f64>() / values.len() as f64).max(1e-9);
    let encoded: Vec<f64> = values.iter().map(|value| (value / unit).asinh()).collect();
    let mean = encoded.iter().sum::<f64>() / encoded.len() as f64;
    let variance = encoded
        .iter()
        .map(|value| (value - mean).powi(2))
        .sum::<f64>()
        / encoded.len() as f64;
    Some(TargetScale {
        unit,
        mean,
        std: variance.sqrt().max(1e-6),
        examples: values.len(),
    })
}

fn dense_statistics(train: &[Example]) -> (Vec<f32>, Vec<f32>) {
    let count = train.len() as f64;
    let mut mean = vec![0f64; DENSE_END];
    let mut square = vec![0f64; DENSE_END];
    for example in train {
        for (index, &value) in example.features.values[..DENSE_END].iter().enumerate() {
            mean[index] += f64::from(value);
            square[index] += f64::from(value) * f64::from(value);
        }
    }
    let mean: Vec<f64> = mean.into_iter().map(|sum| sum / count).collect();
    let std = square
        .iter()
        .zip(&mean)
        .map(|(square, mean)| {
            ((square / count - mean * mean).max(0.0).sqrt() as f32).max(DENSE_STD_FLOOR)
        })
        .collect();
    (mean.into_iter().map(|mean| mean as f32).collect(), std)
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller.
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn init(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Var, ModelError> {
    let std = (2.0 / shape.1 as f32).sqrt();
    let values: Vec<f32> = (0..shape.0 * shape.1 * shape.2)
        .map(|_| normal(rng) * std)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
}

/// Trains all members at once; returns w1, b1, w2, b2, w3, b3 (flattened, row-major).
fn fit(
    train: &[Example],
    scale: &[f32],
    cpu_scale: Option<TargetScale>,
    rss_scale: Option<TargetScale>,
    settings: &TrainingSettings,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let device = Device::Cpu;
    let count = train.len();
    let members = settings.members;
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    // Only the features active in some training example are trained (the others would
    // get no gradient); their rows of the first layer stay zero in the model.
    let columns: Vec<usize> = (0..FEATURE_DIM)
        .filter(|&index| {
            train
                .iter()
                .any(|example| example.features.values[index] != 0.0)
        })
        .collect();
    let width = columns.len().max(1);
    let inputs: Vec<f32> = train
        .iter()
        .flat_map(|example| {
            let mut row = vec![0f32; width];
            for (slot, &index) in columns.iter().enumerate() {
                row[slot] = example.features.values[index] / scale[index];
            }
            row
        })
        .collect();
    let inputs = Tensor::from_vec(inputs, (count, width), &device)?;
    let labels: Vec<f32> = train
        .iter()
        .map(|example| f32::from(u8::from(example.failed)))
        .collect();
    let labels = Tensor::from_vec(labels, count, &device)?;
    let standardised = |value: Option<f64>, scale: Option<TargetScale>| match (value, scale) {
        (Some(value), Some(scale)) if value.is_finite() => scale.encode(value),
        _ => 0.0,
    };
    let present = |value: Option<f64>, scale: Option<TargetScale>| {
        f32::from(u8::from(
            value.is_some_and(f64::is_finite) && scale.is_some(),
        ))
    };
    let cpu: Vec<f32> = train
        .iter()
        .map(|example| standardised(example.cpu_percent_delta.map(f64::from), cpu_scale))
        .collect();
    let cpu_mask: Vec<f32> = train
        .iter()
        .map(|example| present(example.cpu_percent_delta.map(f64::from), cpu_scale))
        .collect();
    let rss: Vec<f32> = train
        .iter()
        .map(|example| standardised(example.rss_bytes_delta, rss_scale))
        .collect();
    let rss_mask: Vec<f32> = train
        .iter()
        .map(|example| present(example.rss_bytes_delta, rss_scale))
        .collect();
    let targets = Tensor::from_vec(
        cpu.into_iter().chain(rss).collect::<Vec<f32>>(),
        (2, count),
        &device,
    )?
    .t()?
    .contiguous()?;
    let masks = Tensor::from_vec(
        cpu_mask.into_iter().chain(rss_mask).collect::<Vec<f32>>(),
        (2, count),
        &device,
    )?
    .t()?
    .contiguous()?;
    // Bootstrap: member m counts how often each example is drawn in `count` draws.
    let mut bootstrap = vec![0f32; members * count];
    for member in 0..members {
        for _ in 0..count {
            bootstrap[member * count + rng.random_range(0..count)] += 1.0;
        }
    }
    let bootstrap = Tensor::from_vec(bootstrap, (members, count), &device)?;

    // The first layer of every member side by side: [FEATURE_DIM, members × HIDDEN_1].
    let w1 = init(&mut rng, (1, width, members * HIDDEN_1), &device)?;
    let b1 = Var::zeros((1, members * HIDDEN_1), DType::F32, &device)?;
    let w2 = init(&mut rng, (members, HIDDEN_1, HIDDEN_2), &device)?;
    let b2 = Var::zeros((members, 1, HIDDEN_2), DType::F32, &device)?;
    let w3 = init(&mut rng, (members, HIDDEN_2, OUTPUTS), &device)?;
    let b3 = Var::zeros((members, 1, OUTPUTS), DType::F32, &device)?;
    let mut optimizer = AdamW::new(
        vec![
            w1.clone(),
            b1.clone(),
            w2.clone(),
            b2.clone(),
            w3.clone(),
            b3.clone(),
        ],
        ParamsAdamW {
            lr: settings.learning_rate,
            weight_decay: settings.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let mut order: Vec<u32> = (0..count as u32).collect();
    let epochs = settings
        .epochs
        .min(settings.example_passes_max.div_ceil(count))
        .max(1);
    let total_steps = epochs * count.div_ceil(settings.batch_size);
    let mut step = 0usize;
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(settings.batch_size) {
            // Cosine decay of the learning rate.
            let progress = step as f64 / total_steps.max(1) as f64;
            optimizer.set_learning_rate(
                settings.learning_rate
                    * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
            );
            step += 1;
            let size = batch.len();
            let index = Tensor::from_slice(batch, size, &device)?;
            let h1 = inputs
                .index_select(&index, 0)?
                .matmul(&w1.as_tensor().squeeze(0)?)?
                .broadcast_add(b1.as_tensor())?
                .reshape((size, members, HIDDEN_1))?
                .transpose(0, 1)?
                .contiguous()?
                .relu()?;
            let y = labels
                .index_select(&index, 0)?
                .unsqueeze(0)?
                .broadcast_as((members, size))?;
            let weight = bootstrap.index_select(&index, 1)?;
            let h2 = h1
                .matmul(w2.as_tensor())?
                .broadcast_add(b2.as_tensor())?
                .relu()?;
            let out = h2.matmul(w3.as_tensor())?.broadcast_add(b3.as_tensor())?;
            let logit = out.narrow(2, 0, 1)?.squeeze(2)?;
            // Binary cross-entropy with logits, stable form.
            let bce = ((logit.relu()? - (&logit * &y)?)?
                + logit.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
            let weight_sum = (weight.sum_all()?.to_scalar::<f32>()?).max(1.0);
            let classification = ((bce * &weight)?.sum_all()? / f64::from(weight_sum))?;
            let target = targets
                .index_select(&index, 0)?
                .unsqueeze(0)?
                .broadcast_as((members, size, 2))?;
            let mask = masks
                .index_select(&index, 0)?
                .unsqueeze(0)?
                .broadcast_as((members, size, 2))?
                .broadcast_mul(&weight.unsqueeze(2)?)?;
            let mask_sum = (mask.sum_all()?.to_scalar::<f32>()?).max(1.0);
            let squared = (out.narrow(2, 1, 2)? - target)?.sqr()?;
            let regression = ((squared * mask)?.sum_all()? / f64::from(mask_sum))?;
            let loss = (classification + (regression * 0.5)?)?;
            optimizer.backward_step(&loss)?;
        }
    }
    // Back to one [FEATURE_DIM][HIDDEN_1] block per member.
    let side_by_side = w1.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let mut first = vec![0f32; members * FEATURE_DIM * HIDDEN_1];
    for (slot, &index) in columns.iter().enumerate() {
        for member in 0..members {
            let from = slot * members * HIDDEN_1 + member * HIDDEN_1;
            let to = (member * FEATURE_DIM + index) * HIDDEN_1;
            first[to..to + HIDDEN_1].copy_from_slice(&side_by_side[from..from + HIDDEN_1]);
        }
    }
    let mut weights = vec![first];
    for var in [b1, w2, b2, w3, b3] {
        weights.push(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(weights)
}

/// Platt scaling: a and b minimising the log loss of σ(a·z + b) on held-out outcomes,
/// with a small pull towards the identity, by Newton's method.
pub fn fit_platt(logits: &[f32], failed: &[bool]) -> Calibration {
    const PULL: f64 = 1e-2;
    let (mut a, mut b) = (1f64, 0f64);
    for _ in 0..100 {
        let (mut g_a, mut g_b) = (2.0 * PULL * (a - 1.0), 2.0 * PULL * b);
        let (mut h_aa, mut h_ab, mut h_bb) = (2.0 * PULL, 0.0, 2.0 * PULL);
        for (&z, &failed) in logits.iter().zip(failed) {
            let z = f64::from(z);
            let p = 1.0 / (1.0 + (-(a * z + b)).exp());
            let residual = p - f64::from(u8::from(failed));
            let curvature = (p * (1.0 - p)).max(1e-9);
            g_a += residual * z;
            g_b += residual;
            h_aa += curvature * z * z;
            h_ab += curvature * z;
            h_bb += curvature;
        }
        let determinant = h_aa * h_bb - h_ab * h_ab;
        if determinant.abs() < 1e-12 {
            break;
        }
        let step_a = (h_bb * g_a - h_ab * g_b) / determinant;
        let step_b = (h_aa * g_b - h_ab * g_a) / determinant;
        a = (a - step_a).clamp(0.01, 50.0);
        b = (b - step_b).clamp(-50.0, 50.0);
        if step_a.abs() < 1e-7 && step_b.abs() < 1e-7 {
            break;
        }
    }
    Calibration {
        a: a as f32,
        b: b as f32,
    }
}

/// P(error) the calibration gives a mean logit (for tests and reports).
pub fn calibrated(calibration: Calibration, logit: f32) -> f32 {
    sigmoid(calibration.a * logit + calibration.b)
}
