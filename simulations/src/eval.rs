//! `kairos-sim eval`: trains the predictor on the first part of a seeded history,
//! calibrates it on the next part and reports on the last (held out, never used for
//! fitting or tuning), next to two baselines: the majority class and the per-key historical
//! failure rate. Also measures abstention on out-of-distribution proposals.

use std::time::Instant;

use kairos_predict::features::entry_failure_rate;
use kairos_predict::metrics::{self, CoverageAtConfidence};
use kairos_predict::predictor::confidence;
use kairos_predict::{History, Predictor, TrainingSettings, examples_from_records, train};
use serde::Serialize;

use crate::outcomes;

/// Shares of the history: training, then calibration, then the held-out test.
pub const TRAIN_SHARE: f64 = 0.6;
pub const CALIBRATION_SHARE: f64 = 0.15;
/// The confidence level the targets are stated at.
pub const CONFIDENCE_LEVEL: f64 = 0.8;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Copy)]
pub struct EvalSettings {
    pub seed: u64,
    pub proposals: usize,
    pub out_of_distribution: usize,
    pub training: TrainingSettings,
}

impl EvalSettings {
    pub fn new(seed: u64) -> EvalSettings {
        EvalSettings {
            seed,
            proposals: 8_000,
            out_of_distribution: 500,
            training: TrainingSettings {
                seed,
                ..TrainingSettings::default()
            },
        }
    }
}

/// Figures of one predictor (or baseline) on the held-out test.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    pub auc: Option<f64>,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
    pub at_confidence: CoverageAtConfidence,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub seed: u64,
    pub train_examples: usize,
    pub calibration_examples: usize,
    pub test_examples: usize,
    pub test_failure_rate: f64,
    pub training_ms: u128,
    pub model: Figures,
    pub majority: Figures,
    pub per_key_rate: Figures,
    /// Share of held-out (in-distribution) proposals the model abstained on.
    pub test_abstention: f64,
    pub out_of_distribution: usize,
    pub out_of_distribution_abstention: f64,
    pub reliability: Vec<metrics::ReliabilityBin>,
    /// Mean absolute error of the resource-delta heads on the held-out proposals that
    /// passed (the ones with a measured delta), next to always predicting the training mean.
    pub cpu_percent_mae: ResourceError,
    pub rss_mib_mae: ResourceError,
    pub command: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResourceError {
    pub model: Option<f64>,
    pub training_mean: Option<f64>,
    pub examples: usize,
}

/// Mean absolute errors of `predicted` and of the constant `mean` against `actual`.
fn resource_error(predicted: &[f64], actual: &[f64], mean: Option<f64>) -> ResourceError {
    let count = predicted.len().min(actual.len());
    let mae = |values: &mut dyn Iterator<Item = f64>| {
        (count > 0).then(|| values.map(f64::abs).sum::<f64>() / count as f64)
    };
    ResourceError {
        model: mae(&mut predicted.iter().zip(actual).map(|(p, a)| p - a)),
        training_mean: mean.and_then(|mean| mae(&mut actual.iter().map(|a| a - mean))),
        examples: count,
    }
}

fn figures(name: &str, p: &[f32], confidence: &[f32], failed: &[bool]) -> Figures {
    let called: Vec<bool> = p.iter().map(|&p| p >= 0.5).collect();
    Figures {
        name: name.to_string(),
        auc: metrics::auc(p, failed),
        brier: metrics::brier(p, failed),
        ece: metrics::ece(p, failed),
        at_confidence: metrics::coverage_at(CONFIDENCE_LEVEL, confidence, &called, failed),
    }
}

/// The baselines' confidence, by the model's own rule for decisiveness.
fn decisiveness(p: f32) -> f32 {
    (2.0 * p.max(1.0 - p) - 1.0).clamp(0.0, 1.0)
}

pub fn run(settings: &EvalSettings) -> anyhow::Result<EvalReport> {
    let records = outcomes::history(settings.seed, settings.proposals);
    let examples = examples_from_records(&records);
    let train_end = (examples.len() as f64 * TRAIN_SHARE) as usize;
    let calibration_end = (examples.len() as f64 * (TRAIN_SHARE + CALIBRATION_SHARE)) as usize;
    let started = Instant::now();
    let model = train(
        &examples[..train_end],
        &examples[train_end..calibration_end],
        &settings.training,
    )?;
    let training_ms = started.elapsed().as_millis();
    let training_failure_rate = examples[..train_end]
        .iter()
        .filter(|example| example.failed)
        .count() as f32
        / train_end as f32;
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let training = &examples[..train_end];
    let cpu_mean = mean(
        training
            .iter()
            .filter_map(|example| example.cpu_percent_delta.map(f64::from))
            .collect(),
    );
    let rss_mean_mib = mean(
        training
            .iter()
            .filter_map(|example| example.rss_bytes_delta.map(|bytes| bytes / MIB))
            .collect(),
    );
    let predictor = Predictor::new(model);

    // The held-out test, replayed in time order: each proposal sees the outcomes that
    // arrived before it, as in serving.
    let mut by_outcome: Vec<&kairos_predict::OutcomeRecord> = records.iter().collect();
    by_outcome.sort_by_key(|record| record.outcome.time_ns);
    let mut history = History::new();
    let mut next = 0;
    let (mut p, mut confidences, mut failed, mut abstained) =
        (Vec::new(), Vec::new(), Vec::new(), 0usize);
    let (mut baseline_p, mut baseline_confidence) = (Vec::new(), Vec::new());
    let (mut cpu_predicted, mut cpu_actual, mut rss_predicted, mut rss_actual) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for record in &records[calibration_end..] {
        while next < by_outcome.len() && by_outcome[next].outcome.time_ns < record.proposal.time_ns
        {
            history.record(by_outcome[next])?;
            next += 1;
        }
        let scores = predictor
            .scores(&record.proposal, &history)
            .ok_or_else(|| anyhow::anyhow!("the predictor has no model"))?;
        let (confidence, abstain) = confidence(&scores);
        if let (Some(predicted), Some(actual)) =
            (scores.cpu_percent, record.outcome.cpu_percent_delta)
        {
            cpu_predicted.push(f64::from(predicted));
            cpu_actual.push(f64::from(actual));
        }
        if let (Some(predicted), Some(actual)) = (scores.rss_bytes, record.outcome.rss_bytes_delta)
        {
            rss_predicted.push(predicted / MIB);
            rss_actual.push(actual / MIB);
        }
        p.push(scores.p_error);
        confidences.push(confidence);
        abstained += usize::from(abstain);
        failed.push(record.outcome.failed);
        let rate = entry_failure_rate(&record.proposal, &history);
        baseline_p.push(rate);
        baseline_confidence.push(decisiveness(rate));
    }
    let test = failed.len();
    let majority_p = vec![training_failure_rate; test];
    let majority_confidence = vec![decisiveness(training_failure_rate); test];

    while next < by_outcome.len() {
        history.record(by_outcome[next])?;
        next += 1;
    }
    let last_ns = records
        .iter()
        .map(|record| record.outcome.time_ns)
        .max()
        .unwrap_or(0);
    let unusual =
        outcomes::out_of_distribution(settings.seed, settings.out_of_distribution, last_ns);
    let unusual_abstained = unusual
        .iter()
        .filter(|proposal| predictor.predict(proposal, &history).abstain)
        .count();

    Ok(EvalReport {
        seed: settings.seed,
        train_examples: train_end,
        calibration_examples: calibration_end - train_end,
        test_examples: test,
        test_failure_rate: failed.iter().filter(|&&failed| failed).count() as f64
            / test.max(1) as f64,
        training_ms,
        model: figures("model", &p, &confidences, &failed),
        majority: figures("majority class", &majority_p, &majority_confidence, &failed),
        per_key_rate: figures(
            "per-key failure rate",
            &baseline_p,
            &baseline_confidence,
            &failed,
        ),
        test_abstention: abstained as f64 / test.max(1) as f64,
        out_of_distribution: unusual.len(),
        out_of_distribution_abstention: unusual_abstained as f64 / unusual.len().max(1) as f64,
        reliability: metrics::reliability(&p, &failed),
        cpu_percent_mae: resource_error(&cpu_predicted, &cpu_actual, cpu_mean),
        rss_mib_mae: resource_error(&rss_predicted, &rss_actual, rss_mean_mib),
        command: format!(
            "cargo run --release -p kairos-simulations -- eval --seed {} --proposals {}",
            settings.seed, settings.proposals
        ),
    })
}

/// The targets of issue 10; `Err` names the first one missed.
pub fn check_targets(report: &EvalReport) -> Result<(), String> {
    let model = &report.model;
    let auc = model.auc.unwrap_or(0.0);
    if auc < 0.95 {
        return Err(format!("AUC {auc:.4} < 0.95"));
    }
    let ece = model.ece.unwrap_or(1.0);
    if ece > 0.03 {
        return Err(format!("ECE {ece:.4} > 0.03"));
    }
    let at = model.at_confidence;
    let accuracy = at.accuracy.unwrap_or(0.0);
    if accuracy < 0.97 {
        return Err(format!("accuracy at confidence ≥ 0.8 {accuracy:.4} < 0.97"));
    }
    if at.coverage < 0.6 {
        return Err(format!(
            "coverage at confidence ≥ 0.8 {:.4} < 0.6",
            at.coverage
        ));
    }
    if report.out_of_distribution_abstention < 0.9 {
        return Err(format!(
            "out-of-distribution abstention {:.4} < 0.9",
            report.out_of_distribution_abstention
        ));
    }
    for baseline in [&report.majority, &report.per_key_rate] {
        if baseline.auc.unwrap_or(0.5) >= auc
            || baseline.brier.unwrap_or(1.0) <= model.brier.unwrap_or(1.0)
        {
            return Err(format!("not better than the baseline {:?}", baseline.name));
        }
    }
    Ok(())
}

fn show(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |value| format!("{value:.4}"))
}

/// The report as a table.
pub fn render(report: &EvalReport) -> String {
    let mut out = format!(
        "seed {}: {} train, {} calibration, {} held-out proposals ({:.1}% failed); training {} ms\n\n",
        report.seed,
        report.train_examples,
        report.calibration_examples,
        report.test_examples,
        report.test_failure_rate * 100.0,
        report.training_ms
    );
    out.push_str("| predictor | AUC | Brier | ECE | accuracy @conf≥0.8 | coverage @conf≥0.8 |\n");
    out.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for figures in [&report.model, &report.per_key_rate, &report.majority] {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.4} |\n",
            figures.name,
            show(figures.auc),
            show(figures.brier),
            show(figures.ece),
            show(figures.at_confidence.accuracy),
            figures.at_confidence.coverage
        ));
    }
    out.push_str(&format!(
        "\nabstention: {:.2}% of held-out proposals, {:.2}% of {} out-of-distribution proposals\n",
        report.test_abstention * 100.0,
        report.out_of_distribution_abstention * 100.0,
        report.out_of_distribution
    ));
    for (name, error) in [
        ("CPU delta (percent)", report.cpu_percent_mae),
        ("RSS delta (MiB)", report.rss_mib_mae),
    ] {
        out.push_str(&format!(
            "{name}: mean absolute error {} (always the training mean: {}) over {} passed proposals\n",
            show(error.model),
            show(error.training_mean),
            error.examples
        ));
    }
    out.push_str(&format!(
        "targets: {}\nreplay: {}\n",
        match check_targets(report) {
            Ok(()) => "all met".to_string(),
            Err(missed) => format!("MISSED: {missed}"),
        },
        report.command
    ));
    out
}
