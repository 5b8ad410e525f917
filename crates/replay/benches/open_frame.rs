//! Opening the state at a random instant: p50/p99 among 10 000 frames and among 100
//! frames, in one run. `cargo bench -p kairos-replay --bench open_frame [-- FRAMES SAMPLES]`.
//! Each frame is a real capture of a small service directory in which one file changed.

use std::time::Instant as Clock;

use kairos_capture::{CaptureRequest, capture};
use kairos_core::{FrameSpec, Instant, Limits, ReplicaDefinition, TimelineSpec};
use kairos_store::Store;
use rand::{Rng, SeedableRng};

fn build(
    frames: usize,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Store,
    Instant,
    Instant,
) {
    let service = tempfile::tempdir().expect("service dir");
    for index in 0..50 {
        std::fs::write(
            service.path().join(format!("file-{index:02}.conf")),
            format!("key = {index}\n"),
        )
        .expect("write");
    }
    let data = tempfile::tempdir().expect("data dir");
    let store = Store::open(data.path()).expect("store");
    let replica = ReplicaDefinition::new("bench", service.path().to_path_buf());
    store.add_replica(&replica).expect("replica");
    let request = CaptureRequest {
        replica: &replica,
        timeline: "main",
        limits: Limits::default(),
        skip: vec![],
    };
    let mut first = None;
    let mut last = Instant(0);
    for frame in 0..frames {
        std::fs::write(
            service.path().join(format!("file-{:02}.conf", frame % 50)),
            format!("key = {frame}\n"),
        )
        .expect("write");
        let report = capture(&store, &request).expect("capture");
        first.get_or_insert(report.frame.time);
        last = report.frame.time;
    }
    (service, data, store, first.expect("frames"), last)
}

fn measure(store: &Store, first: Instant, last: Instant, samples: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut micros = Vec::with_capacity(samples);
    for _ in 0..samples {
        let at = Instant(rng.random_range(first.0..=last.0));
        let spec = TimelineSpec {
            timeline: "main".into(),
            frame: FrameSpec::At(at),
        };
        let started = Clock::now();
        let view = kairos_replay::open(store, "bench", &spec, Instant::now()).expect("open");
        let elapsed = started.elapsed();
        assert!(view.frame.time <= at);
        micros.push(elapsed.as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    micros
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let frames: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let samples: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let started = Clock::now();
    let small = build(100);
    let large = build(frames);
    eprintln!(
        "built 100 + {frames} frames in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Warm both stores equally, then measure alternately.
    measure(&small.2, small.3, small.4, 1000, 1);
    measure(&large.2, large.3, large.4, 1000, 1);
    let few = measure(&small.2, small.3, small.4, samples, 2);
    let many = measure(&large.2, large.3, large.4, samples, 2);
    println!("| frames in history | samples | p50 (µs) | p99 (µs) | max (µs) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (count, sorted) in [(100, &few), (frames, &many)] {
        println!(
            "| {count} | {samples} | {:.1} | {:.1} | {:.1} |",
            percentile(sorted, 0.5),
            percentile(sorted, 0.99),
            sorted[sorted.len() - 1]
        );
    }
    println!(
        "\np99 among {frames} frames / p99 among 100 frames = {:.2}",
        percentile(&many, 0.99) / percentile(&few, 0.99)
    );
}
