//! Attacks on retention and frames-only-on-change: reading, diffing, restoring and
//! bisecting across forgotten frames, bad rules, a forget killed mid-batch, a long
//! history, damaged series values and what makes (or must not make) a frame.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

fn ids(history: &Value) -> Vec<String> {
    kairos_tests::frames(history)
}

fn replica(kairos: &Kairos, root: &Path, extra: &[&str]) {
    std::fs::create_dir_all(root).unwrap();
    let mut args = vec!["replica", "add", "web", "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    kairos.ok(&args);
}

/// Captures `states` in turn (one frame each); returns each frame's id and time.
fn capture_states(kairos: &Kairos, root: &Path, states: &[&str]) -> Vec<(String, String)> {
    states
        .iter()
        .map(|state| {
            std::fs::write(root.join("app.conf"), state).unwrap();
            let frame = kairos.json(["capture", "web", "--json"]);
            (
                frame["frame"].as_str().unwrap().to_string(),
                frame["time"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Appends `count` frames of the same state, through the store's own path (a capture
/// each would take minutes), one millisecond apart; the first is a real capture.
fn append_frames(kairos: &Kairos, count: i64) {
    kairos.ok(["capture", "web"]);
    let store = kairos_store::Store::open(kairos.data_dir()).unwrap();
    let head = store.head("web", "main").unwrap().unwrap();
    let mut parent = head.id;
    for i in 1..count {
        parent = store
            .commit_frame(kairos_store::FrameDraft {
                replica: "web".into(),
                timeline: "main".into(),
                time: kairos_core::Instant(head.time.0 + i * 1_000_000),
                parent: Some(parent),
                root: head.root,
                entries: head.entries,
                bytes: head.bytes,
                stats: kairos_store::WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap()
            .id;
    }
}

#[test]
fn show_diff_restore_bisect_and_revert_across_forgotten_frames() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(
        &kairos,
        &root,
        &["--check", "grep -q '^ok' {root}/app.conf"],
    );
    let states: Vec<String> = (0..10)
        .map(|i| format!("{} {i}\n", if i < 5 { "ok" } else { "broken" }))
        .collect();
    let states: Vec<&str> = states.iter().map(String::as_str).collect();
    let frames = capture_states(&kairos, &root, &states);
    // A fork keeps frame 2; keep_last=2 keeps 8 and 9: frames 0, 1 and 3..=7 go.
    kairos.ok([
        "timeline",
        "fork",
        "try",
        "--replica",
        "web",
        "--at",
        &frames[2].0,
    ]);
    let report = kairos.json([
        "forget",
        "web",
        "--timeline",
        "main",
        "--keep-last",
        "2",
        "--json",
    ]);
    assert_eq!(report["entries_removed"], json!(7), "{report}");
    let left = ids(&kairos.json(["history", "web", "--json"]));
    assert_eq!(
        left,
        vec![
            frames[2].0.clone(),
            frames[8].0.clone(),
            frames[9].0.clone()
        ]
    );

    // An instant inside the forgotten range answers the last kept frame at or before it.
    let shown = kairos.json(["show", "web", "--at", &frames[6].1, "--json"]);
    assert_eq!(shown["frame"]["id"], json!(frames[2].0), "{shown}");
    assert_eq!(
        shown["metrics"]["cpu_percent"].to_string(),
        "0.0",
        "{shown}"
    );
    // Before every kept frame there is none, and the answer says so.
    let error = kairos.fails(["show", "web", "--at", &frames[1].1]);
    assert!(error.contains("no frame at or before"), "{error}");

    // Diff and restore across the gap.
    let diff = kairos.json([
        "diff",
        "web",
        "--from",
        &frames[2].0,
        "--to",
        &frames[9].0,
        "--json",
    ]);
    assert!(diff.to_string().contains("app.conf"), "{diff}");
    let target = dir.path().join("restored");
    kairos.ok([
        "restore",
        "web",
        "--at",
        &frames[8].0,
        "--into",
        target.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(target.join("app.conf")).unwrap(),
        states[8]
    );

    // Bisect walks the kept frames: frame 8's parent (7) is gone, frame 2 is the last good.
    let bisect = kairos.json([
        "bisect",
        "web",
        "--good",
        &frames[2].0,
        "--bad",
        "latest",
        "--json",
    ]);
    assert_eq!(bisect["first_bad"], json!(frames[8].0), "{bisect:#}");
    assert_eq!(bisect["last_good"], json!(frames[2].0), "{bisect:#}");
    // The culprit's revert compares it with the frame kept before it.
    let revert = kairos.json(["revert", "web", "--culprit", &frames[8].0, "--json"]);
    assert_eq!(revert["culprit"], json!(frames[8].0), "{revert:#}");
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
}

#[test]
fn bad_rules_are_refused_by_name_and_change_nothing() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(&kairos, &root, &[]);
    let frames = capture_states(&kairos, &root, &["a\n", "b\n", "c\n"]);
    for (args, expected) in [
        (vec!["--keep-last", "-1"], "'-1'"),
        (vec!["--keep-last", "99999999999"], "--keep-last"),
        (vec!["--keep-last", "2000000"], "more than 1000000"),
        (vec!["--keep-daily", "0"], "keep_daily = 0"),
        (vec!["--keep-within", "0s"], "keep_within = 0"),
        (vec!["--keep-within=-3d"], "keep_within"),
        (vec!["--keep-within", "3 fortnights"], "keep_within"),
        (
            vec!["--keep-last", "1", "--timeline", "../main"],
            "timeline",
        ),
    ] {
        let mut command = vec!["forget", "web"];
        command.extend_from_slice(&args);
        let output = kairos.run(&command);
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} is refused");
        assert!(error.contains(expected), "{args:?}: {error}");
    }
    // A huge but valid rule keeps everything.
    let report = kairos.json(["forget", "web", "--keep-within", "100000y", "--json"]);
    assert_eq!(report["entries_removed"], json!(0), "{report}");
    assert_eq!(
        ids(&kairos.json(["history", "web", "--json"])).len(),
        frames.len()
    );
    // The configuration refuses unknown keys, empty timeline tables and bad durations.
    for (retention, expected) in [
        ("[replica.retention]\nkeep_forever = true\n", "keep_forever"),
        (
            "[replica.retention]\nkeep_within = \"soon\"\n",
            "keep_within",
        ),
        ("[replica.retention]\nkeep_last = 0\n", "keep_last = 0"),
        ("[replica.retention.timeline.exp]\n", "gives no rule"),
        ("[retention]\ninterval = \"0s\"\n", "retention.interval"),
        (
            "[retention]\ninterval = \"500000000000y\"\n",
            "retention.interval",
        ),
    ] {
        let (global, replica) = if retention.starts_with("[retention]") {
            (retention, "")
        } else {
            ("", retention)
        };
        let config = format!(
            "{global}[[replica]]\nname = \"web\"\nroot = {:?}\n{replica}",
            root.display().to_string()
        );
        let file = dir.path().join("kairos.toml");
        std::fs::write(&file, config).unwrap();
        let error = kairos.fails([
            "--config",
            file.to_str().unwrap(),
            "forget",
            "web",
            "--dry-run",
        ]);
        assert!(error.contains(expected), "{retention}: {error}");
    }
}

#[test]
fn a_long_history_is_forgotten_in_bounded_batches_and_the_dry_run_says_so() {
    // Ten thousand and fifty frames, forgotten down to ten.
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(&kairos, &root, &[]);
    append_frames(&kairos, 10_050);
    let started = std::time::Instant::now();
    let dry = kairos.json(["forget", "web", "--keep-last", "10", "--dry-run", "--json"]);
    assert_eq!(
        dry["entries_removed"],
        json!(10_040),
        "{}",
        dry["entries_removed"]
    );
    assert_eq!(dry["frames_removed"], json!(10_040));
    assert_eq!(
        dry["timelines"][0]["forgotten"].as_array().unwrap().len(),
        10_040
    );
    let report = kairos.json(["forget", "web", "--keep-last", "10", "--json"]);
    assert_eq!(report["entries_removed"], json!(10_040));
    assert_eq!(report["frames_removed"], json!(10_040));
    assert_eq!(report["commands"], json!(3), "5 000 entries per command");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ids(&kairos.json(["history", "web", "--json"])).len(), 10);
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
    let log = kairos.json(["log", "web", "--json"]);
    assert_eq!(log["intact"], json!(true), "{log}");
}

#[test]
fn a_damaged_series_value_is_named_by_verify_never_panics_and_captures_go_on_after_repair() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(&kairos, &root, &[]);
    capture_states(&kairos, &root, &["a\n", "b\n"]);
    {
        let store = kairos_store::Store::open(kairos.data_dir()).unwrap();
        let series = store
            .reader()
            .unwrap()
            .scan_prefix(kairos_store::keys::SERIES)
            .unwrap();
        let (key, mut value) = series.into_iter().next().expect("a series sample");
        // A flipped bit in the CPU figure's exponent: a number that is not finite.
        value[1 + 32 + 4 + 8 + 7] ^= 0x7f;
        let mut batch = kairos_store::kv::WriteBatch::new();
        batch.put(key, value).unwrap();
        store.kv().commit(batch).unwrap();
    }
    // Reading the state leaves the damaged sample out; nothing panics.
    let shown = kairos.run(["show", "web", "--at", "latest", "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let verify = kairos.run(["verify", "--json"]);
    assert!(!verify.status.success());
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert!(
        report.to_string().contains("runtime series sample"),
        "verify names the sample: {report}"
    );
    kairos.ok(["repair"]);
    let frame = kairos.json(["capture", "web", "--json"]);
    assert_eq!(frame["recorded"], json!(true));
    assert!(
        frame["notes"].as_array().unwrap().is_empty(),
        "the series takes samples again: {frame}"
    );
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
    assert_eq!(ids(&kairos.json(["history", "web", "--json"])).len(), 3);
}

#[test]
fn a_forget_killed_mid_way_leaves_a_store_that_verifies_and_an_intact_log() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(&kairos, &root, &[]);
    append_frames(&kairos, 3_000);
    for delay_ms in [5, 40, 120] {
        let mut child = kairos
            .command(["forget", "web", "--keep-last", "10", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever the moment, the forget landed whole or not at all.
        let left = ids(&kairos.json(["history", "web", "--json"])).len();
        assert!(left == 3_000 || left == 10, "{delay_ms} ms: {left} frames");
        let verify = kairos.json(["verify", "--json"]);
        assert_eq!(verify["ok"], json!(true), "{delay_ms} ms: {verify}");
        let log = kairos.json(["log", "web", "--json"]);
        assert_eq!(log["intact"], json!(true), "{delay_ms} ms: {log}");
        if left == 10 {
            return;
        }
    }
    kairos.ok(["forget", "web", "--keep-last", "10"]);
    assert_eq!(ids(&kairos.json(["history", "web", "--json"])).len(), 10);
}

struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper(tag: &str) -> Spawned {
    Spawned(
        std::process::Command::new("sleep")
            .arg(format!("1000.{tag}"))
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_restart_and_a_change_undone_between_ticks_are_state_but_a_busy_cpu_is_not() {
    use kairos_capture::{CaptureRequest, capture_if_changed};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "workers = 4\n").unwrap();
    let tag = format!("7{}", std::process::id());
    let mut worker = sleeper(&tag);
    let busy = Spawned(
        std::process::Command::new("sh")
            .args(["-c", "while :; do :; done", &format!("busy{tag}")])
            .spawn()
            .unwrap(),
    );
    let store = kairos_store::Store::open(&dir.path().join("data")).unwrap();
    let mut replica = kairos_core::ReplicaDefinition::new("svc", root.clone());
    replica.processes = vec![format!("sleep 1000.{tag}*"), format!("*busy{tag}")];
    store.add_replica(&replica).unwrap();
    let request = CaptureRequest {
        replica: &replica,
        timeline: "main",
        limits: kairos_core::Limits::default(),
        skip: vec![],
    };
    let first = capture_if_changed(&store, &request).unwrap();
    assert_eq!(first.processes, 2);
    // A process at 100% CPU changes metrics, never the state: no frame in a second of ticks.
    let mut cpu_max: f64 = 0.0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let report = capture_if_changed(&store, &request).unwrap();
        assert!(
            !report.recorded,
            "a busy CPU made a frame: {:?}",
            report.notes
        );
        cpu_max = cpu_max.max(store.latest_sample("svc").unwrap().unwrap().cpu_percent_max);
    }
    assert!(cpu_max > 30.0, "the series saw the busy process: {cpu_max}");
    drop(busy);
    let gone = capture_if_changed(&store, &request).unwrap();
    assert!(gone.recorded && gone.processes == 1);

    // The worker restarts between two ticks (same command line, new pid): a frame.
    drop(std::mem::replace(&mut worker, sleeper(&tag)));
    let restarted = capture_if_changed(&store, &request).unwrap();
    assert!(
        restarted.recorded,
        "a restarted process is a change of state"
    );
    assert!(!capture_if_changed(&store, &request).unwrap().recorded);

    // A file changed and changed back between two ticks: the state read back is the file
    // as it is, whether or not a frame was made for the new times.
    std::fs::write(root.join("app.conf"), "workers = 8\n").unwrap();
    std::fs::write(root.join("app.conf"), "workers = 4\n").unwrap();
    let back = capture_if_changed(&store, &request).unwrap();
    let learner = kairos_ops::learn::Learner::new();
    let service = kairos_ops::Service {
        store: &store,
        limits: kairos_core::Limits::default(),
        skip: Vec::new(),
        learner: &learner,
    };
    let mut bytes = Vec::new();
    service
        .cat(
            "svc",
            b"app.conf",
            &kairos_core::TimelineSpec {
                timeline: "main".into(),
                frame: kairos_core::FrameSpec::Latest,
            },
            &mut bytes,
        )
        .unwrap();
    assert_eq!(bytes, b"workers = 4\n", "recorded: {}", back.recorded);
    assert!(!capture_if_changed(&store, &request).unwrap().recorded);
    let frames = store.history("svc", "main").unwrap();
    assert!(frames.windows(2).all(|w| w[0].time < w[1].time));
}

#[test]
fn a_forget_through_the_node_while_it_commits_and_captures_keeps_the_rollback_target() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("app.conf"), "generation = 0\n").unwrap();
    let data_dir = dir.path().join("data");
    let kairos = Kairos::at(&data_dir);
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    let admin: Value = kairos.json(["party", "add", "ops", "--role", "admin", "--json"]);
    let admin = admin["token"].as_str().unwrap().to_string();
    let mut lesser = Vec::new();
    for (name, role) in [
        ("pia", "proposer"),
        ("rex", "reviewer"),
        ("cam", "committer"),
    ] {
        let party: Value = kairos.json(["party", "add", name, "--role", role, "--json"]);
        lesser.push((role, party["token"].as_str().unwrap().to_string()));
    }
    let config = format!(
        "[node]\ncapture_debounce = \"50ms\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"100ms\"\nwatch_window = \"2s\"\nprobe_interval = \"100ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"true\"\n",
        root.display().to_string()
    );
    let node = Node::start(&config, &data_dir);
    let as_admin = |args: &[&str]| -> Value {
        let output = kairos
            .command(args)
            .env("KAIROS_TOKEN", &admin)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    for i in 1..=4 {
        std::fs::write(root.join("app.conf"), format!("generation = {i}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for("four frames", Duration::from_secs(10), || {
        (ids(&as_admin(&["history", "web", "--json"])).len() >= 4).then_some(())
    });
    let document = dir.path().join("p.json");
    std::fs::write(
        &document,
        json!({"title": "t", "author": "ops", "ops": [
            {"op": "put_file", "path": "app.conf", "content": "generation = 99\n"}]})
        .to_string(),
    )
    .unwrap();
    let proposal = as_admin(&[
        "propose",
        "web",
        "--file",
        document.to_str().unwrap(),
        "--json",
    ]);
    let proposal = proposal["proposal"].as_str().unwrap().to_string();
    let record = as_admin(&["commit", "web", &proposal, "--no-wait", "--json"]);
    assert_eq!(record["status"], json!("watching"), "{record}");
    let last_good = record["last_good"].as_str().unwrap().to_string();

    // Only an admin forgets; a refused forget removes nothing.
    for (role, token) in &lesser {
        let response = Node::agent()
            .post(format!("{}/api/replicas/web/forget", node.url))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(json!({"keep_last": 1}))
            .unwrap();
        assert_eq!(response.status().as_u16(), 403, "{role}");
    }
    // While the commit is watched and the node captures, forget everything it may.
    let report = as_admin(&["forget", "web", "--keep-last", "1", "--json"]);
    let kept = report["timelines"][0]["kept"].to_string();
    assert!(kept.contains(&last_good), "{report}");
    assert!(kept.contains("unfinished_commit"), "{report}");
    let error = kairos
        .command(["forget", "web", "--keep-last", "1", "--timeline", "nope"])
        .env("KAIROS_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(!error.status.success());
    assert!(String::from_utf8_lossy(&error.stderr).contains("nope"));
    // The commit ends; its rollback target is still there to read.
    wait_for("the commit ends", Duration::from_secs(15), || {
        let log = as_admin(&["log", "web", "--json"]);
        log.to_string().contains("\"committed\"").then_some(())
    });
    as_admin(&["show", "web", "--at", &last_good, "--json"]);
    assert_eq!(as_admin(&["verify", "--json"])["ok"], json!(true));
    assert_eq!(as_admin(&["log", "web", "--json"])["intact"], json!(true));
}

#[test]
fn a_committed_proposal_whose_base_was_forgotten_is_named_so_never_as_damage() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    replica(&kairos, &root, &[]);
    capture_states(&kairos, &root, &["a = 1\n", "a = 2\n"]);
    let document = dir.path().join("p.json");
    std::fs::write(
        &document,
        json!({"title": "t", "author": "ana", "ops": [
            {"op": "put_file", "path": "x.txt", "content": "x"},
            {"op": "put_file", "path": "y.txt", "content": "y"}]})
        .to_string(),
    )
    .unwrap();
    let proposal = kairos.json([
        "propose",
        "web",
        "--file",
        document.to_str().unwrap(),
        "--json",
    ]);
    let proposal = proposal["proposal"].as_str().unwrap().to_string();
    // Before its commit, the proposal keeps its base.
    let report = kairos.json(["forget", "web", "--keep-last", "1", "--json"]);
    assert!(report.to_string().contains("proposal_base"), "{report}");
    let committed = kairos.json(["commit", "web", &proposal, "--ops", "1", "--json"]);
    assert_eq!(committed["status"], json!("committed"), "{committed}");
    // Once committed, its base may go; using the proposal again says why it cannot.
    kairos.ok(["forget", "web", "--keep-last", "1"]);
    for args in [
        vec!["commit", "web", &proposal, "--ops", "2"],
        vec!["sandbox", "web", &proposal],
    ] {
        let error = kairos.fails(&args);
        assert!(error.contains("was forgotten"), "{args:?}: {error}");
        assert!(!error.contains("corrupt"), "{args:?}: {error}");
    }
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
}
