//! `cargo bench -p kairos-predict --bench predict`: training time on 10 000 examples, and
//! per-prediction latency (features included) on one thread, p50/p99 and predictions per
//! second, for the full prediction (with explanation) and for scores alone.

use std::time::{Duration, Instant};

use kairos_predict::{
    FileView, History, OpView, Outcome, OutcomeRecord, Predictor, ProposalView, TrainingSettings,
    examples_from_records, train,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EXAMPLES: usize = 10_000;
const PREDICTIONS: usize = 50_000;

/// A web server and a cache: workers × memory per worker over the limit, ports out of
/// range, gzip typos and maxmemory over the limit fail.
fn history(seed: u64, count: usize) -> Vec<OutcomeRecord> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|index| {
            let time_ns = (index as u64 + 1) * 60_000_000_000;
            let workers: u32 = rng.random_range(1..32);
            let memory: u32 = rng.random_range(1..32) * 32;
            let limit: u32 = [2048, 4096, 8192][rng.random_range(0..3)];
            let web = FileView {
                path: "nginx.conf".into(),
                keys: vec![
                    ("worker_processes".into(), workers.to_string()),
                    ("worker_memory_mb".into(), memory.to_string()),
                    ("memory_limit_mb".into(), limit.to_string()),
                    ("listen".into(), "8080".into()),
                    ("gzip".into(), "on".into()),
                    ("keepalive_timeout".into(), "65".into()),
                    ("log_level".into(), "info".into()),
                    ("server_name".into(), "www.example.com".into()),
                ],
            };
            let (ops, base, failed) = match rng.random_range(0..4) {
                0 => {
                    let next: u32 = rng.random_range(1..48);
                    (
                        vec![OpView::set_config(
                            "nginx.conf",
                            "worker_processes",
                            &next.to_string(),
                        )],
                        web,
                        next * memory > limit,
                    )
                }
                1 => {
                    let port: i64 = rng.random_range(-100..120_000);
                    (
                        vec![OpView::patch_file(
                            "nginx.conf",
                            &[&format!("listen {port};")],
                            &["listen 8080;"],
                        )],
                        web,
                        !(1..=65_535).contains(&port),
                    )
                }
                2 => {
                    let value = ["on", "off", "maybe", "of"][rng.random_range(0..4)];
                    (
                        vec![OpView::patch_file(
                            "nginx.conf",
                            &[&format!("gzip {value};")],
                            &["gzip on;"],
                        )],
                        web,
                        !matches!(value, "on" | "off"),
                    )
                }
                _ => {
                    let maxmemory: u32 = rng.random_range(1..128) * 64;
                    let limit: u32 = [1024, 4096][rng.random_range(0..2)];
                    (
                        vec![OpView::set_config(
                            "redis.conf",
                            "maxmemory_mb",
                            &maxmemory.to_string(),
                        )],
                        FileView {
                            path: "redis.conf".into(),
                            keys: vec![
                                ("maxmemory_mb".into(), "256".into()),
                                ("memory_limit_mb".into(), limit.to_string()),
                                ("port".into(), "6379".into()),
                                ("appendonly".into(), "no".into()),
                            ],
                        },
                        maxmemory > limit,
                    )
                }
            };
            OutcomeRecord {
                proposal: ProposalView {
                    time_ns,
                    ops,
                    base_files: vec![base],
                    ..ProposalView::default()
                },
                outcome: Outcome {
                    time_ns: time_ns + 30_000_000_000,
                    failed,
                    cpu_percent_delta: Some(rng.random_range(-2.0..2.0)),
                    rss_bytes_delta: Some(rng.random_range(-1e8..1e8)),
                },
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn measure(name: &str, proposals: &[ProposalView], mut predict: impl FnMut(&ProposalView) -> f32) {
    let mut latencies = Vec::with_capacity(PREDICTIONS);
    let mut checksum = 0f32;
    let started = Instant::now();
    for index in 0..PREDICTIONS {
        let proposal = &proposals[index % proposals.len()];
        let start = Instant::now();
        checksum += predict(proposal);
        latencies.push(start.elapsed());
    }
    let total = started.elapsed();
    latencies.sort();
    println!(
        "{name}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs, {:.0} predictions/s on one thread (checksum {checksum:.1})",
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        latencies[latencies.len() - 1].as_secs_f64() * 1e6,
        PREDICTIONS as f64 / total.as_secs_f64(),
    );
}

fn main() {
    // SAFETY: first thing in main, before any other thread starts.
    unsafe { kairos_predict::train::prepare_process() };
    let records = history(1, EXAMPLES + 2_000);
    let started = Instant::now();
    let examples = examples_from_records(&records);
    let featurise = started.elapsed();
    let settings = TrainingSettings {
        seed: 1,
        ..TrainingSettings::default()
    };
    let started = Instant::now();
    let model = train(
        &examples[..EXAMPLES],
        &examples[EXAMPLES..EXAMPLES + 1_000],
        &settings,
    )
    .expect("trains");
    let training = started.elapsed();
    println!(
        "training on {EXAMPLES} examples: {:.2} s ({} members, {} epochs, batch {}); featurising {} examples: {:.0} ms; held-out AUC {:.4}",
        training.as_secs_f64(),
        settings.members,
        settings
            .epochs
            .min(settings.example_passes_max.div_ceil(EXAMPLES)),
        settings.batch_size,
        examples.len(),
        featurise.as_secs_f64() * 1e3,
        model.header.held_out.auc.unwrap_or(0.0),
    );
    let predictor = Predictor::new(model);
    let history = History::before(&records[..EXAMPLES + 1_000], u64::MAX);
    let proposals: Vec<ProposalView> = records[EXAMPLES + 1_000..]
        .iter()
        .map(|record| record.proposal.clone())
        .collect();
    measure(
        "prediction with explanation (features included)",
        &proposals,
        |proposal| predictor.predict(proposal, &history).p_error,
    );
    measure("scores only (features included)", &proposals, |proposal| {
        predictor
            .scores(proposal, &history)
            .map_or(0.0, |scores| scores.p_error)
    });
}
