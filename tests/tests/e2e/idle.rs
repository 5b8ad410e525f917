//! Frames only on change: an idle replica's history does not grow with its capture ticks,
//! its resource metrics go to the runtime series (bounded), and a change to the files or to
//! the set of processes still makes a frame at once.

use std::process::{Child, Command};
use std::time::Duration;

use kairos_capture::{CaptureRequest, capture_if_changed};
use kairos_core::{Instant, Limits, ReplicaDefinition};
use kairos_ops::Service;
use kairos_ops::learn::Learner;
use kairos_store::Store;
use kairos_tests::{Node, wait_for};
use serde_json::Value;

struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process the replica's selector matches, by a command line nothing else has.
fn sleeper(tag: &str) -> Sleeper {
    Sleeper(
        Command::new("sleep")
            .arg(format!("1000.{tag}"))
            .spawn()
            .expect("sleep runs"),
    )
}

#[test]
fn an_idle_replica_adds_no_frame_over_a_thousand_ticks_and_its_series_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("svc");
    std::fs::create_dir_all(root.join("conf")).unwrap();
    std::fs::write(root.join("conf/app.toml"), "workers = 4\n").unwrap();
    std::fs::write(root.join("index.html"), "hello\n".repeat(1000)).unwrap();
    let tag = format!("{}", std::process::id());
    let mut worker = Some(sleeper(&tag));
    let store = Store::open(&dir.path().join("data")).unwrap();
    let mut replica = ReplicaDefinition::new("svc", root.clone());
    replica.processes = vec![format!("sleep 1000.{tag}*")];
    store.add_replica(&replica).unwrap();
    let request = CaptureRequest {
        replica: &replica,
        timeline: "main",
        limits: Limits::default(),
        skip: vec![],
    };
    let started = Instant::now();
    let first = capture_if_changed(&store, &request).unwrap();
    assert!(first.recorded, "the first capture makes the first frame");
    assert_eq!(first.processes, 1);
    for tick in 0..1000 {
        let report = capture_if_changed(&store, &request).unwrap();
        assert!(
            !report.recorded,
            "tick {tick}: nothing changed, yet a frame was stored: {:?}",
            report.notes
        );
        assert_eq!(report.frame.id, first.frame.id);
    }
    let elapsed_s = Instant::now().nanos_since(started) / 1_000_000_000;
    assert_eq!(store.history("svc", "main").unwrap().len(), 1);
    let counts = store.series_counts("svc").unwrap();
    assert!(
        counts.seconds <= elapsed_s + 2 && counts.minutes == 0,
        "one bucket per second at most: {counts:?} over {elapsed_s} s"
    );
    let samples: u64 = store
        .series("svc", Instant(0), Instant(i64::MAX), usize::MAX)
        .unwrap()
        .iter()
        .map(|s| u64::from(s.samples))
        .sum();
    assert_eq!(samples, 1001, "every tick left its sample");

    // A file change is state: a frame at once.
    std::fs::write(root.join("conf/app.toml"), "workers = 8\n").unwrap();
    let changed = capture_if_changed(&store, &request).unwrap();
    assert!(changed.recorded && changed.frame.parent == Some(first.frame.id));
    // So is a metadata-only change.
    std::fs::set_permissions(
        root.join("index.html"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let chmod = capture_if_changed(&store, &request).unwrap();
    assert!(chmod.recorded, "a mode change is a change of state");
    // And a process that went away.
    drop(worker.take());
    let gone = capture_if_changed(&store, &request).unwrap();
    assert!(
        gone.recorded && gone.processes == 0,
        "the process set changed"
    );
    assert!(!capture_if_changed(&store, &request).unwrap().recorded);
    assert_eq!(store.history("svc", "main").unwrap().len(), 4);

    // `show --at` still answers with the last frame at or before the instant, and reports
    // the series' sample nearest it.
    let learner = Learner::new();
    let service = Service {
        store: &store,
        limits: Limits::default(),
        skip: Vec::new(),
        learner: &learner,
    };
    let mid = Instant(first.frame.time.0 + 3_000_000_000);
    let spec = kairos_core::TimelineSpec {
        timeline: "main".into(),
        frame: kairos_core::FrameSpec::At(mid),
    };
    let listing = service.state("svc", &spec).unwrap();
    assert_eq!(listing.frame.id, first.frame.id);
    let nearest = listing.metrics_nearest.expect("a series sample");
    assert_eq!(nearest.asked, mid);
    assert!(
        (nearest.at.0 - mid.0).abs() <= 2_000_000_000,
        "the sample nearest the instant is the first second's: {nearest:?}"
    );
    assert_eq!(nearest.frame, first.frame.id);
}

#[test]
fn a_node_stores_frames_only_on_change_and_counts_the_unchanged_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("app.toml"), "port = 1\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"50ms\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"100ms\"\n",
        root.display().to_string()
    );
    let node = Node::start(&config, &dir.path().join("data"));
    let status = |node: &Node| -> Value {
        let mut response = Node::agent()
            .get(format!("{}/api/status", node.url))
            .call()
            .expect("status");
        response.body_mut().read_json().expect("JSON")
    };
    let history = |node: &Node| -> usize {
        let mut response = Node::agent()
            .get(format!("{}/api/replicas/web/history", node.url))
            .call()
            .expect("history");
        let value: Value = response.body_mut().read_json().expect("JSON");
        kairos_tests::frames(&value).len()
    };
    wait_for("twenty idle ticks", Duration::from_secs(20), || {
        (status(&node)["replicas"][0]["captures_unchanged"].as_u64()? >= 20).then_some(())
    });
    assert_eq!(history(&node), 1, "idle ticks store no frame");
    std::fs::write(root.join("app.toml"), "port = 2\n").unwrap();
    wait_for("the change as a frame", Duration::from_secs(10), || {
        (history(&node) == 2).then_some(())
    });
    // A capture someone asks for is always stored.
    let captured: Value = serde_json::from_slice(&kairos_tests::Kairos::new().ok([
        "--node",
        node.url.as_str(),
        "capture",
        "web",
        "--json",
    ]))
    .unwrap();
    assert_eq!(captured["recorded"], true, "{captured}");
    assert_eq!(history(&node), 3);
}
