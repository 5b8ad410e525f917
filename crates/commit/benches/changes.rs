//! Change latencies, p50/p99 over many runs, in one process:
//! - fork a timeline of a 100k-entry state;
//! - sandbox a proposal (set a config key, replace a file, add a file, delete one) against
//!   a 100k-entry state (the ops applied to a structural copy, read back, diffed);
//! - time from a failed probe to the last good state restored on disk (a real commit on a
//!   live directory, a command probe that fails, the committer's rollback).
//!
//! `cargo bench -p kairos-commit --bench changes [-- ENTRIES SAMPLES ROLLBACKS]`

use std::path::Path;
use std::time::Instant as Clock;

use kairos_capture::{CaptureRequest, capture};
use kairos_commit::{CommitStatus, Committer, DirectCapturer};
use kairos_core::{Instant, Limits, Probe, ReplicaDefinition};
use kairos_sandbox::{Op, ProposalDocument, SandboxOptions, propose, sandbox};
use kairos_store::Store;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn row(what: &str, samples: &mut [f64], unit: &str) {
    samples.sort_by(f64::total_cmp);
    println!(
        "| {what} | {} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} |",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1]
    );
}

/// A service tree of `entries` files in directories of 1000, with a config file.
fn write_tree(root: &Path, entries: usize) {
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 8080 # public\nworkers = 4\n",
    )
    .expect("config");
    for index in 0..entries {
        let dir = root.join(format!("data/d{:03}", index / 1000));
        if index % 1000 == 0 {
            std::fs::create_dir_all(&dir).expect("dir");
        }
        std::fs::write(
            dir.join(format!("f{index:06}.txt")),
            format!("entry {index}\n"),
        )
        .expect("file");
    }
}

fn document(title: &str, ops: Vec<Op>) -> ProposalDocument {
    ProposalDocument {
        title: title.into(),
        author: "bench".into(),
        description: None,
        base: None,
        ops,
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let entries = args.first().copied().unwrap_or(100_000);
    let samples = args.get(1).copied().unwrap_or(1_000);
    let rollbacks = args.get(2).copied().unwrap_or(50);
    let limits = Limits::default();

    let service = tempfile::tempdir().expect("service");
    let data = tempfile::tempdir().expect("data");
    let started = Clock::now();
    write_tree(service.path(), entries);
    let store = Store::open(data.path()).expect("store");
    let replica = ReplicaDefinition::new("big", service.path().to_path_buf());
    store.add_replica(&replica).expect("replica");
    let report = capture(
        &store,
        &CaptureRequest {
            replica: &replica,
            timeline: "main",
            limits,
            skip: vec![],
        },
    )
    .expect("capture");
    eprintln!(
        "state of {} entries captured in {:.1} s",
        report.frame.entries,
        started.elapsed().as_secs_f64()
    );

    println!("| operation | runs | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: |");

    let mut fork_us = Vec::with_capacity(samples);
    for index in 0..samples {
        let started = Clock::now();
        let timeline = format!("fork-{index}");
        let fork = kairos_store::Command::new(
            Instant::now(),
            "big",
            &timeline,
            "bench",
            kairos_store::Change::ForkTimeline {
                base: report.frame.id,
            },
        )
        .with_audit(kairos_store::AuditEvent::Timeline(
            kairos_store::audit::TimelineEvent::Fork {
                fork: timeline.clone(),
                at: report.frame.id,
            },
        ));
        store.submit(&fork).expect("fork");
        fork_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    row(
        &format!("fork a timeline ({} entries)", report.frame.entries),
        &mut fork_us,
        "µs",
    );

    // Paths in the middle and at the ends of the tree.
    let dirs = entries.div_ceil(1000).max(1);
    let middle = (dirs / 2) * 1000 + 500.min(entries.saturating_sub(1) % 1000);
    let changed = format!("data/d{:03}/f{middle:06}.txt", middle / 1000);
    let added = format!("data/d{:03}/new.txt", dirs - 1);
    let proposal = propose(
        &store,
        &replica,
        document(
            "bench",
            vec![
                Op::SetConfig {
                    file: "etc/app.toml".into(),
                    key: "server.port".into(),
                    value: serde_json::json!(9090),
                },
                Op::PutFile {
                    path: changed.clone(),
                    content: Some("changed\n".into()),
                    content_base64: None,
                    from: None,
                    mode: None,
                },
                Op::PutFile {
                    path: added.clone(),
                    content: Some("new\n".into()),
                    content_base64: None,
                    from: None,
                    mode: None,
                },
                Op::Delete {
                    path: "data/d000/f000001.txt".into(),
                },
            ],
        ),
        None,
        &limits,
        Instant::now(),
    )
    .expect("propose");
    let mut apply_us = Vec::with_capacity(samples);
    let mut whole_us = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Clock::now();
        let sandboxed = sandbox(
            &store,
            &replica,
            &proposal,
            &SandboxOptions {
                chosen: None,
                run_check: false,
                party: "bench",
                preview: false,
            },
            &limits,
            Instant::now(),
        )
        .expect("sandbox");
        whole_us.push(started.elapsed().as_secs_f64() * 1e6);
        apply_us.push(sandboxed.apply_us as f64);
        assert_eq!(sandboxed.diff.files.len(), 4);
    }
    row(
        "sandbox: apply 4 ops (state built, readable)",
        &mut apply_us,
        "µs",
    );
    row(
        "sandbox: apply + store nodes + diff + record + audit (durable)",
        &mut whole_us,
        "µs",
    );

    // Rollback: a live directory of 1000 files, a probe on one file's content.
    let live = tempfile::tempdir().expect("live");
    write_tree(live.path(), 1_000);
    let mut site = ReplicaDefinition::new("site", live.path().to_path_buf());
    site.watch_window_ms = 60_000;
    site.probe_interval_ms = 10;
    site.probes = vec![Probe::Command {
        command: "grep -q 'entry 5' {root}/data/d000/f000005.txt".into(),
        timeout_ms: 5_000,
    }];
    store.add_replica(&site).expect("site");
    let capturer = DirectCapturer {
        store: &store,
        limits,
        skip: vec![data.path().to_path_buf()],
    };
    capturer_capture(&capturer, &site);
    let committer = Committer {
        protected: Vec::new(),
        store: &store,
        replica: &site,
        limits,
        capturer: &capturer,
        reviews_seen: None,
    };
    let mut restored_ms = Vec::with_capacity(rollbacks);
    for index in 0..rollbacks {
        let breaking = propose(
            &store,
            &site,
            document(
                &format!("break {index}"),
                vec![Op::PutFile {
                    path: "data/d000/f000005.txt".into(),
                    content: Some(format!("broken {index}\n")),
                    content_base64: None,
                    from: None,
                    mode: None,
                }],
            ),
            None,
            &limits,
            Instant::now(),
        )
        .expect("propose");
        let record = committer.begin(&breaking, None, "bench").expect("commit");
        let record = committer.watch(record).expect("watch");
        assert_eq!(record.status, CommitStatus::RolledBack);
        let rollback = record.rollback.expect("rollback");
        restored_ms.push(rollback.restored_ms as f64);
        assert_eq!(
            std::fs::read_to_string(live.path().join("data/d000/f000005.txt")).expect("live"),
            "entry 5\n"
        );
    }
    row(
        "failed probe → last good state on disk (1 001 files)",
        &mut restored_ms,
        "ms",
    );
}

fn capturer_capture(capturer: &DirectCapturer<'_>, replica: &ReplicaDefinition) {
    use kairos_commit::Capturer;
    capturer.capture(replica).expect("capture");
}
