//! What past outcomes say about the entries a proposal touches: per-entry, per-value and
//! per-line-token counts of outcomes and failures, bounded, built in outcome-time order.
//! Only outcomes that arrived strictly before an example may be history for it.

use std::collections::HashMap;

use crate::features::{self, KeyChange};
use crate::view::{OutcomeRecord, ProposalView};

/// Distinct keys kept per map; past this, new keys are not counted (old ones still are).
pub const HISTORY_KEYS_MAX: usize = 1 << 20;
/// Distinct values remembered per config key.
pub const VALUES_PER_KEY_MAX: usize = 32;
/// Weight of the fleet-wide failure rate in a smoothed per-entry rate (pseudo-outcomes).
pub const PRIOR_WEIGHT: f32 = 2.0;

/// Outcomes and failures for one thing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub outcomes: u32,
    pub failures: u32,
}

impl Counts {
    fn add(&mut self, failed: bool) {
        self.outcomes = self.outcomes.saturating_add(1);
        self.failures = self.failures.saturating_add(u32::from(failed));
    }

    /// The failure rate pulled towards `prior` by `PRIOR_WEIGHT` pseudo-outcomes.
    pub fn smoothed_rate(&self, prior: f32) -> f32 {
        (self.failures as f32 + PRIOR_WEIGHT * prior) / (self.outcomes as f32 + PRIOR_WEIGHT)
    }
}

/// The history of outcomes a prediction may use.
#[derive(Debug, Clone, Default)]
pub struct History {
    overall: Counts,
    /// Latest outcome time recorded (nanoseconds); `record` refuses older ones.
    last_time_ns: u64,
    entries: HashMap<u64, Counts>,
    pairs: HashMap<u64, Counts>,
    key_values: HashMap<u64, Vec<u64>>,
    tokens: HashMap<u64, Counts>,
}

/// Why an outcome could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "outcome at {time_ns} ns arrives before the last recorded one at {last_time_ns} ns (record outcomes in time order)"
    )]
    OutOfOrder { time_ns: u64, last_time_ns: u64 },
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// The history an example made at `before_ns` may see: the outcomes that arrived
    /// strictly before it, whatever order `records` is in.
    pub fn before(records: &[OutcomeRecord], before_ns: u64) -> History {
        let mut earlier: Vec<&OutcomeRecord> = records
            .iter()
            .filter(|record| record.outcome.time_ns < before_ns)
            .collect();
        earlier.sort_by_key(|record| record.outcome.time_ns);
        let mut history = History::new();
        for record in earlier {
            // Sorted, so never out of order.
            let _ = history.record(record);
        }
        history
    }

    pub fn outcomes(&self) -> u32 {
        self.overall.outcomes
    }

    pub fn last_time_ns(&self) -> u64 {
        self.last_time_ns
    }

    /// The fleet-wide failure rate, smoothed towards one half.
    pub fn overall_rate(&self) -> f32 {
        (self.overall.failures as f32 + 1.0) / (self.overall.outcomes as f32 + 2.0)
    }

    /// Adds one outcome. Outcomes must come in nondecreasing outcome time.
    pub fn record(&mut self, record: &OutcomeRecord) -> Result<(), HistoryError> {
        let time_ns = record.outcome.time_ns;
        if time_ns < self.last_time_ns {
            return Err(HistoryError::OutOfOrder {
                time_ns,
                last_time_ns: self.last_time_ns,
            });
        }
        self.last_time_ns = time_ns;
        let failed = record.outcome.failed;
        self.overall.add(failed);
        let proposal = &record.proposal;
        for entry in features::entry_hashes(proposal) {
            bump(&mut self.entries, entry, failed);
        }
        features::for_each_key_change(proposal, |change: &KeyChange<'_>| {
            if let Some(new) = change.new {
                bump(&mut self.pairs, features::pair_hash(change, new), failed);
                let key = features::key_hash(change);
                let value = features::value_hash(new);
                if self.key_values.len() < HISTORY_KEYS_MAX || self.key_values.contains_key(&key) {
                    let values = self.key_values.entry(key).or_default();
                    if values.len() < VALUES_PER_KEY_MAX && !values.contains(&value) {
                        values.push(value);
                    }
                }
            }
        });
        features::for_each_line_token(proposal, |token| bump(&mut self.tokens, token, failed));
        Ok(())
    }

    pub fn entry(&self, hash: u64) -> Counts {
        self.entries.get(&hash).copied().unwrap_or_default()
    }

    pub fn pair(&self, hash: u64) -> Counts {
        self.pairs.get(&hash).copied().unwrap_or_default()
    }

    pub fn token(&self, hash: u64) -> Counts {
        self.tokens.get(&hash).copied().unwrap_or_default()
    }

    /// (distinct values seen for the key, whether `value` is one of them).
    pub fn key_values(&self, key: u64, value: u64) -> (usize, bool) {
        match self.key_values.get(&key) {
            Some(values) => (values.len(), values.contains(&value)),
            None => (0, false),
        }
    }
}

fn bump(map: &mut HashMap<u64, Counts>, key: u64, failed: bool) {
    if map.len() < HISTORY_KEYS_MAX || map.contains_key(&key) {
        map.entry(key).or_default().add(failed);
    }
}

/// Convenience for callers that hold a proposal and want its history identities.
pub fn touched_entries(proposal: &ProposalView) -> Vec<String> {
    features::affected(proposal)
}
