//! Quality measures of probabilistic predictions against outcomes: AUC, Brier score,
//! expected calibration error, reliability bins, and accuracy and coverage above a
//! confidence level. Pure functions over slices.

use serde::{Deserialize, Serialize};

/// Bins of the reliability diagram and of the expected calibration error.
pub const CALIBRATION_BINS: usize = 10;

/// Area under the ROC curve: the probability that a random failure scores above a random
/// success (ties count one half). `None` without both classes.
pub fn auc(scores: &[f32], failed: &[bool]) -> Option<f64> {
    let count = scores.len().min(failed.len());
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|&left, &right| scores[left].total_cmp(&scores[right]));
    let positives = failed[..count].iter().filter(|&&failed| failed).count();
    let negatives = count - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Sum of (average) ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    while start < count {
        let mut end = start + 1;
        while end < count && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + end + 1) as f64 / 2.0; // ranks start at 1
        rank_sum += average_rank
            * order[start..end]
                .iter()
                .filter(|&&index| failed[index])
                .count() as f64;
        start = end;
    }
    let positives = positives as f64;
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives as f64))
}

/// Mean squared error of the probability of failure. `None` when empty.
pub fn brier(probabilities: &[f32], failed: &[bool]) -> Option<f64> {
    let count = probabilities.len().min(failed.len());
    if count == 0 {
        return None;
    }
    let sum: f64 = probabilities
        .iter()
        .zip(failed)
        .map(|(&p, &failed)| (f64::from(p) - f64::from(u8::from(failed))).powi(2))
        .sum();
    Some(sum / count as f64)
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub p_low: f64,
    pub p_high: f64,
    pub count: usize,
    pub p_mean: f64,
    pub failed_fraction: f64,
}

/// Equal-width bins of predicted probability with the observed failure fraction.
pub fn reliability(probabilities: &[f32], failed: &[bool]) -> Vec<ReliabilityBin> {
    let mut bins: Vec<ReliabilityBin> = (0..CALIBRATION_BINS)
        .map(|index| ReliabilityBin {
            p_low: index as f64 / CALIBRATION_BINS as f64,
            p_high: (index + 1) as f64 / CALIBRATION_BINS as f64,
            count: 0,
            p_mean: 0.0,
            failed_fraction: 0.0,
        })
        .collect();
    for (&p, &failed) in probabilities.iter().zip(failed) {
        let p = f64::from(p).clamp(0.0, 1.0);
        let index = ((p * CALIBRATION_BINS as f64) as usize).min(CALIBRATION_BINS - 1);
        let bin = &mut bins[index];
        bin.count += 1;
        bin.p_mean += p;
        bin.failed_fraction += f64::from(u8::from(failed));
    }
    for bin in &mut bins {
        if bin.count > 0 {
            bin.p_mean /= bin.count as f64;
            bin.failed_fraction /= bin.count as f64;
        }
    }
    bins
}

/// Expected calibration error: the count-weighted mean gap between predicted probability
/// and observed failure fraction over the reliability bins. `None` when empty.
pub fn ece(probabilities: &[f32], failed: &[bool]) -> Option<f64> {
    let count = probabilities.len().min(failed.len());
    if count == 0 {
        return None;
    }
    let bins = reliability(&probabilities[..count], &failed[..count]);
    Some(
        bins.iter()
            .map(|bin| bin.count as f64 * (bin.p_mean - bin.failed_fraction).abs())
            .sum::<f64>()
            / count as f64,
    )
}

/// Accuracy and coverage of the predictions whose confidence is at least a level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CoverageAtConfidence {
    pub confidence_min: f64,
    /// Fraction of all predictions at or above the level.
    pub coverage: f64,
    /// Fraction of those whose call (p ≥ 0.5 means error) matched the outcome; `None` when
    /// none is covered.
    pub accuracy: Option<f64>,
    pub count: usize,
}

/// `called_error[i]` is the prediction's call, `failed[i]` the outcome.
pub fn coverage_at(
    confidence_min: f64,
    confidences: &[f32],
    called_error: &[bool],
    failed: &[bool],
) -> CoverageAtConfidence {
    let total = confidences.len().min(called_error.len()).min(failed.len());
    let mut covered = 0usize;
    let mut correct = 0usize;
    for index in 0..total {
        if f64::from(confidences[index]) >= confidence_min {
            covered += 1;
            correct += usize::from(called_error[index] == failed[index]);
        }
    }
    CoverageAtConfidence {
        confidence_min,
        coverage: if total == 0 {
            0.0
        } else {
            covered as f64 / total as f64
        },
        accuracy: (covered > 0).then(|| correct as f64 / covered as f64),
        count: covered,
    }
}

/// The summary of a set of scored predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scored: usize,
    pub failed: usize,
    pub auc: Option<f64>,
    pub brier: Option<f64>,
    pub ece: Option<f64>,
    pub reliability: Vec<ReliabilityBin>,
    pub coverage: Vec<CoverageAtConfidence>,
}

/// Confidence levels the report lists accuracy and coverage for.
pub const REPORT_CONFIDENCE_LEVELS: [f64; 5] = [0.5, 0.6, 0.7, 0.8, 0.9];

pub fn report(probabilities: &[f32], confidences: &[f32], failed: &[bool]) -> Report {
    let called: Vec<bool> = probabilities.iter().map(|&p| p >= 0.5).collect();
    Report {
        scored: probabilities.len().min(failed.len()),
        failed: failed.iter().filter(|&&failed| failed).count(),
        auc: auc(probabilities, failed),
        brier: brier(probabilities, failed),
        ece: ece(probabilities, failed),
        reliability: reliability(probabilities, failed),
        coverage: REPORT_CONFIDENCE_LEVELS
            .iter()
            .map(|&level| coverage_at(level, confidences, &called, failed))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_scores() {
        let failed = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &failed), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &failed), Some(0.0));
        assert_eq!(auc(&[0.5; 4], &failed), Some(0.5));
        // One positive ranked below one negative: 3 of 4 pairs right.
        assert_eq!(auc(&[0.1, 0.6, 0.5, 0.9], &failed), Some(0.75));
        assert_eq!(auc(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(auc(&[], &[]), None);
    }

    #[test]
    fn brier_and_ece() {
        assert_eq!(brier(&[1.0, 0.0], &[true, false]), Some(0.0));
        assert_eq!(brier(&[0.5, 0.5], &[true, false]), Some(0.25));
        assert_eq!(brier(&[], &[]), None);
        // Ten predictions at 0.3, three of them failed: perfectly calibrated.
        let p = [0.3f32; 10];
        let failed: Vec<bool> = (0..10).map(|index| index < 3).collect();
        assert!(ece(&p, &failed).unwrap() < 1e-6);
        // Always 0.9 and never failed: off by 0.9.
        assert!((ece(&[0.9; 4], &[false; 4]).unwrap() - 0.9).abs() < 1e-6);
        let bins = reliability(&[0.05, 0.95, 1.0], &[false, true, true]);
        assert_eq!(bins.len(), CALIBRATION_BINS);
        assert_eq!(bins[0].count, 1);
        assert_eq!(bins[9].count, 2);
        assert_eq!(bins[9].failed_fraction, 1.0);
    }

    #[test]
    fn accuracy_and_coverage_above_a_confidence() {
        let confidences = [0.9, 0.95, 0.5, 0.85];
        let called = [true, false, true, true];
        let failed = [true, true, false, true];
        let at = coverage_at(0.8, &confidences, &called, &failed);
        assert_eq!(at.count, 3);
        assert_eq!(at.coverage, 0.75);
        assert!((at.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        let none = coverage_at(0.99, &confidences, &called, &failed);
        assert_eq!((none.count, none.accuracy), (0, None));
    }
}
