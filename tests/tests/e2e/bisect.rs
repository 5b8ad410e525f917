//! End-to-end tests of bisect and the minimal revert of a culprit frame, through the
//! `kairos` binary: a real nginx replica whose 12th frame adds a directive `nginx -t`
//! rejects, non-monotonic histories, three-way revert conflicts, and bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_tests::services::{Nginx, binary};
use kairos_tests::{Kairos, free_port, tree_listing};
use serde_json::{Value, json};

/// Captures `replica` and returns the new frame's id.
fn capture(kairos: &Kairos, replica: &str) -> String {
    kairos.json(["capture", replica, "--json"])["frame"]
        .as_str()
        .expect("a frame id")
        .to_string()
}

/// Runs a command that prints JSON and may exit 1; fails on a panic or no JSON.
fn json_and_status(kairos: &Kairos, args: &[&str]) -> (Value, bool) {
    let output = kairos.run(args);
    assert_ne!(
        output.status.code(),
        Some(101),
        "kairos panicked: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "kairos {args:?} printed no JSON; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (value, output.status.success())
}

/// An nginx replica (not running: its check is `nginx -t` on a materialised copy) with
/// 20 frames: frame 12 adds a directive nginx rejects, every other frame changes other
/// files. Returns the root, the nginx description and the 20 frame ids.
fn nginx_history(kairos: &Kairos, base: &Path) -> (PathBuf, Nginx, Vec<String>) {
    let root = base.join("web");
    let run_dir = base.join("run");
    std::fs::create_dir_all(root.join("html")).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let nginx = Nginx {
        root: root.clone(),
        port: free_port(),
        binary: binary("nginx", "nginx-light"),
        run_dir,
    };
    std::fs::write(root.join("nginx.conf"), nginx.config("return 200 'ok';")).unwrap();
    std::fs::write(root.join("html/index.html"), "version 1\n").unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.to_str().unwrap(),
        "--check",
        &nginx.check_command(),
        "--check-timeout",
        "20s",
        "--watch-window",
        "0s",
    ]);
    let mut frames = vec![capture(kairos, "web")];
    for frame in 2..=20 {
        if frame == 12 {
            let config = std::fs::read_to_string(root.join("nginx.conf")).unwrap();
            let broken = config.replace("http {\n", "http {\n    kairos_no_such_directive on;\n");
            assert_ne!(config, broken);
            std::fs::write(root.join("nginx.conf"), broken).unwrap();
        } else {
            std::fs::write(
                root.join(format!("html/page{frame}.html")),
                format!("page {frame}\n"),
            )
            .unwrap();
            std::fs::write(
                root.join("html/index.html"),
                format!("version {frame}{}\n", "!".repeat(frame)),
            )
            .unwrap();
        }
        frames.push(capture(kairos, "web"));
    }
    assert_eq!(frames.len(), 20);
    (root, nginx, frames)
}

fn nginx_t(nginx: &Nginx, root: &Path) -> bool {
    Command::new(&nginx.binary)
        .arg("-t")
        .arg("-p")
        .arg(root)
        .arg("-c")
        .arg(root.join("nginx.conf"))
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn bisect_names_the_nginx_frame_that_broke_the_check_and_its_minimal_revert_fixes_it() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let (root, nginx, frames) = nginx_history(&kairos, base.path());
    assert!(!nginx_t(&nginx, &root), "frame 20 fails nginx -t");

    let report = kairos.json([
        "bisect",
        "web",
        "--good",
        &frames[0],
        "--bad",
        "latest",
        "--json",
        "--propose-revert",
    ]);
    assert_eq!(report["monotonic"], json!(true), "{report:#}");
    assert_eq!(
        report["first_bad"],
        json!(frames[11]),
        "frame 12 is the culprit"
    );
    assert_eq!(report["last_good"], json!(frames[10]));
    assert_eq!(report["frames"], json!(20));
    let steps = report["steps"].as_u64().unwrap();
    assert!(steps <= 7, "{steps} check runs for 20 frames: {report:#}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len() as u64, steps);
    assert!(
        checks
            .iter()
            .any(|c| c["frame"] == json!(frames[0]) && c["passed"] == json!(true))
    );
    assert!(
        checks
            .iter()
            .any(|c| c["frame"] == json!(frames[19]) && c["passed"] == json!(false))
    );
    let files: Vec<&str> = report["culprit"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["nginx.conf"]);

    // The minimal revert: only nginx.conf goes back; everything later stays.
    let revert = &report["revert"];
    assert_eq!(revert["culprit"], json!(frames[11]));
    assert_eq!(revert["conflicts"], json!([]));
    assert_eq!(
        revert["proposal"]["ops"],
        json!(["put_file \"nginx.conf\""])
    );
    let proposal = revert["proposal"]["proposal"].as_str().unwrap();
    let (sandbox, passed) = json_and_status(
        &kairos,
        &["sandbox", "web", proposal, "--run-check", "--json"],
    );
    assert!(
        passed,
        "the revert passes nginx -t in the sandbox: {sandbox:#}"
    );
    let (commit, committed) = json_and_status(&kairos, &["commit", "web", proposal, "--json"]);
    assert!(committed, "{commit:#}");
    assert_eq!(commit["status"], json!("committed"));
    assert!(nginx_t(&nginx, &root), "nginx -t passes after the revert");

    // nginx.conf equals frame 11's, every other file frame 20's.
    let at = |frame: &str| {
        let into = base.path().join(format!("at-{frame}"));
        kairos.ok([
            "restore",
            "web",
            "--at",
            frame,
            "--into",
            into.to_str().unwrap(),
        ]);
        tree_listing(&into)
    };
    let live = tree_listing(&root);
    let frame11 = at(&frames[10]);
    let frame20 = at(&frames[19]);
    assert_eq!(
        live[b"nginx.conf".as_slice()],
        frame11[b"nginx.conf".as_slice()]
    );
    let others = |listing: &std::collections::BTreeMap<Vec<u8>, (char, u32, Vec<u8>)>| {
        listing
            .iter()
            .filter(|(path, _)| path.as_slice() != b"nginx.conf")
            .map(|(path, entry)| (path.clone(), entry.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&live), others(&frame20));
}

/// A plain replica whose check is a command over `status`; one frame per write.
fn plain(kairos: &Kairos, base: &Path) -> PathBuf {
    let root = base.join("app");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("status"), "ok\n").unwrap();
    std::fs::write(root.join("notes.txt"), "notes 0\n").unwrap();
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 8080 # public\nhost = \"a\"\n",
    )
    .unwrap();
    kairos.ok([
        "replica",
        "add",
        "app",
        "--root",
        root.to_str().unwrap(),
        "--check",
        "grep -qx ok {root}/status",
        "--watch-window",
        "0s",
    ]);
    root
}

/// Writes `path` under `root` and captures a frame.
fn write_and_capture(kairos: &Kairos, root: &Path, path: &str, content: &str) -> String {
    std::fs::write(root.join(path), content).unwrap();
    capture(kairos, "app")
}

#[test]
fn a_check_that_fails_then_passes_again_is_reported_as_not_monotonic() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain(&kairos, base.path());
    let mut frames = vec![capture(&kairos, "app")];
    frames.push(write_and_capture(&kairos, &root, "status", "broken\n")); // 2: fails
    frames.push(write_and_capture(&kairos, &root, "status", "ok\n")); // 3: fixed
    frames.push(write_and_capture(&kairos, &root, "notes.txt", "notes 4\n"));
    frames.push(write_and_capture(
        &kairos,
        &root,
        "status",
        "broken again\n",
    )); // 5: fails
    frames.push(write_and_capture(&kairos, &root, "notes.txt", "notes 6\n"));
    let (report, found) = json_and_status(
        &kairos,
        &[
            "bisect", "app", "--good", &frames[0], "--bad", &frames[5], "--json",
        ],
    );
    assert!(!found, "no single culprit: exit 1");
    assert_eq!(report["monotonic"], json!(false), "{report:#}");
    assert_eq!(report["first_bad"], Value::Null);
    assert_eq!(report["culprit"], Value::Null);
    let transitions: Vec<(String, String, bool)> = report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["before"].as_str().unwrap().to_string(),
                t["after"].as_str().unwrap().to_string(),
                t["passed_after"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            (frames[0].clone(), frames[1].clone(), false),
            (frames[1].clone(), frames[2].clone(), true),
            (frames[3].clone(), frames[4].clone(), false),
        ],
        "{report:#}"
    );
    // --exhaustive checks every distinct state and finds the same transitions.
    let (exhaustive, _) = json_and_status(
        &kairos,
        &[
            "bisect",
            "app",
            "--good",
            &frames[0],
            "--bad",
            &frames[5],
            "--exhaustive",
            "--json",
        ],
    );
    assert_eq!(exhaustive["steps"], json!(6));
    assert_eq!(exhaustive["transitions"], report["transitions"]);
    // The text answer says so too.
    let text = String::from_utf8(
        kairos
            .run(["bisect", "app", "--good", &frames[0], "--bad", &frames[5]])
            .stdout,
    )
    .unwrap();
    assert!(text.contains("not monotonic"), "{text}");
}

#[test]
fn identical_states_are_checked_once() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain(&kairos, base.path());
    let mut frames = vec![capture(&kairos, "app")];
    // Frames whose files hold what the one before held (rewritten with the same bytes:
    // only their times differ).
    for _ in 0..4 {
        frames.push(write_and_capture(&kairos, &root, "notes.txt", "notes 0\n"));
    }
    frames.push(write_and_capture(&kairos, &root, "status", "broken\n"));
    let report = kairos.json([
        "bisect", "app", "--good", &frames[0], "--bad", "latest", "--json",
    ]);
    assert_eq!(report["first_bad"], json!(frames[5]));
    assert_eq!(report["last_good"], json!(frames[4]));
    assert_eq!(report["frames"], json!(frames.len()));
    assert_eq!(report["distinct_states"], json!(2));
    assert_eq!(report["steps"], json!(2));
}

#[test]
fn the_minimal_revert_keeps_later_changes_and_names_entries_changed_again_as_conflicts() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain(&kairos, base.path());
    let first = capture(&kairos, "app");
    // The culprit: the port key and notes.txt, and a new file.
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 9090 # public\nhost = \"a\"\n",
    )
    .unwrap();
    std::fs::write(root.join("notes.txt"), "notes culprit\n").unwrap();
    std::fs::write(root.join("added.txt"), "added by the culprit\n").unwrap();
    let culprit = capture(&kairos, "app");
    // Later: another key of the same file, and notes.txt again.
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 9090 # public\nhost = \"b\"\n",
    )
    .unwrap();
    let later = write_and_capture(&kairos, &root, "notes.txt", "notes later\n");

    let answer = kairos.json(["revert", "app", "--culprit", &culprit, "--json"]);
    assert_eq!(answer["culprit"], json!(culprit));
    assert_eq!(answer["parent"], json!(first));
    assert_eq!(answer["head"], json!(later));
    let conflicts = answer["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{answer:#}");
    assert_eq!(conflicts[0]["path"], json!("notes.txt"));
    assert_eq!(conflicts[0]["changed_again_at"], json!(later));
    let mut ops: Vec<&str> = answer["proposal"]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op.as_str().unwrap())
        .collect();
    ops.sort_unstable();
    assert_eq!(
        ops,
        vec![
            "delete \"added.txt\"",
            "set_config \"etc/app.toml\" key \"server.port\""
        ]
    );
    let proposal = answer["proposal"]["proposal"].as_str().unwrap();
    let (commit, committed) = json_and_status(&kairos, &["commit", "app", proposal, "--json"]);
    assert!(committed, "{commit:#}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/app.toml")).unwrap(),
        "# app\n[server]\nport = 8080 # public\nhost = \"b\"\n",
        "the port goes back, the later host stays, comments and layout kept"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("notes.txt")).unwrap(),
        "notes later\n",
        "a conflict is never overwritten"
    );
    assert!(!root.join("added.txt").exists());

    // A key changed again is a conflict naming the key; when nothing is left to revert,
    // the answer is an error naming every conflict.
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 7070 # public\nhost = \"b\"\n",
    )
    .unwrap();
    let port_culprit = capture(&kairos, "app");
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 6060 # public\nhost = \"b\"\n",
    )
    .unwrap();
    capture(&kairos, "app");
    let error = kairos.fails(["revert", "app", "--culprit", &port_culprit]);
    assert!(
        error.contains("nothing of frame") && error.contains("key server.port"),
        "{error}"
    );
}

#[test]
fn bad_bisect_and_revert_input_is_refused_with_an_error_naming_the_problem() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain(&kairos, base.path());
    let first = capture(&kairos, "app");
    let second = write_and_capture(&kairos, &root, "notes.txt", "notes 2\n");
    let third = write_and_capture(&kairos, &root, "status", "broken\n");

    let error = kairos.fails(["bisect", "app", "--good", &third, "--bad", &first]);
    assert!(error.contains("is after --bad"), "{error}");
    let error = kairos.fails(["bisect", "app", "--good", &second, "--bad", &second]);
    assert!(error.contains("holds no frames"), "{error}");
    let error = kairos.fails(["bisect", "app", "--good", "ffffffff", "--bad", "latest"]);
    assert!(error.contains("no frame id starts with"), "{error}");
    let error = kairos.fails(["bisect", "nope", "--good", &first, "--bad", "latest"]);
    assert!(error.contains("unknown replica \"nope\""), "{error}");
    let error = kairos.fails(["bisect", "app", "--good", "yesterday", "--bad", "latest"]);
    assert!(error.contains("--good \"yesterday\""), "{error}");
    // The ends must be good and bad.
    let error = kairos.fails([
        "bisect", "app", "--good", &first, "--bad", &third, "--check", "false",
    ]);
    assert!(error.contains("fails at --good frame"), "{error}");
    let error = kairos.fails([
        "bisect", "app", "--good", &first, "--bad", &third, "--check", "true",
    ]);
    assert!(error.contains("passes at --bad frame"), "{error}");
    let error = kairos.fails([
        "bisect", "app", "--good", &first, "--bad", &third, "--check", " ",
    ]);
    assert!(error.contains("--check is empty"), "{error}");
    // A check that hangs is killed at the timeout and stops the bisect, leaving no
    // scratch copy and no process behind.
    let scratch = base.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    let marker = base.path().join("hung.pid");
    let hanging = format!("echo $$ > {}; exec sleep 300", marker.display());
    let started = std::time::Instant::now();
    let output = kairos
        .command([
            "bisect",
            "app",
            "--good",
            &first,
            "--bad",
            &third,
            "--check",
            &hanging,
            "--timeout",
            "300ms",
        ])
        .env("TMPDIR", &scratch)
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{error}");
    assert!(
        error.contains("timed out after 300 ms") && error.contains("bisect stopped"),
        "{error}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    let pid = std::fs::read_to_string(&marker).unwrap();
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z"),
        "the check still runs: {state}"
    );
    let error = kairos.fails([
        "bisect",
        "app",
        "--good",
        &first,
        "--bad",
        &third,
        "--timeout",
        "soon",
    ]);
    assert!(error.contains("--timeout \"soon\""), "{error}");

    // A replica with no check and no --check.
    let bare = base.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("a"), "1").unwrap();
    kairos.ok(["replica", "add", "bare", "--root", bare.to_str().unwrap()]);
    let bare_first = capture(&kairos, "bare");
    std::fs::write(bare.join("a"), "22").unwrap();
    capture(&kairos, "bare");
    let error = kairos.fails(["bisect", "bare", "--good", &bare_first, "--bad", "latest"]);
    assert!(
        error.contains("declares no check command") && error.contains("--check"),
        "{error}"
    );
    // A frame of another replica is not one of this replica's.
    let error = kairos.fails(["bisect", "app", "--good", &bare_first, "--bad", "latest"]);
    assert!(error.contains("no frame id starts with"), "{error}");

    // A frame on another timeline: a fork's frame is not in main's history.
    kairos.ok([
        "timeline",
        "fork",
        "try",
        "--replica",
        "app",
        "--at",
        &second,
    ]);
    let document = base.path().join("fork.json");
    std::fs::write(
        &document,
        serde_json::to_vec(&json!({"title": "fork change", "ops": [
            {"op": "put_file", "path": "notes.txt", "content": "on the fork\n"}]}))
        .unwrap(),
    )
    .unwrap();
    let proposal = kairos.json([
        "propose",
        "app",
        "--file",
        document.to_str().unwrap(),
        "--timeline",
        "try",
        "--json",
    ]);
    kairos.ok(["commit", "app", proposal["proposal"].as_str().unwrap()]);
    let fork_head = kairos.json(["history", "app", "--timeline", "try", "--json"]);
    let fork_frame = kairos_tests::frames(&fork_head).last().unwrap().clone();
    let fourth = write_and_capture(&kairos, &root, "notes.txt", "notes 4, after the fork\n");
    let error = kairos.fails(["bisect", "app", "--good", &fork_frame, "--bad", &fourth]);
    assert!(error.contains("not an earlier frame"), "{error}");
    let error = kairos.fails(["revert", "app", "--culprit", &fork_frame]);
    assert!(
        error.contains("not in the history of timeline \"main\""),
        "{error}"
    );

    // Revert input.
    let error = kairos.fails(["revert", "app", "--culprit", &first]);
    assert!(error.contains("first frame"), "{error}");
    let error = kairos.fails(["revert", "app", "--culprit", "abcdef12"]);
    assert!(error.contains("no frame id starts with"), "{error}");
    let output = kairos.run(["revert", "app"]);
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && error.contains("--to <TO>|--culprit <FRAME>"),
        "{error}"
    );
}

#[test]
fn concurrent_bisects_on_one_store_both_answer() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain(&kairos, base.path());
    let first = capture(&kairos, "app");
    for round in 0..5 {
        write_and_capture(&kairos, &root, "notes.txt", &format!("notes {round}\n"));
    }
    let culprit = write_and_capture(&kairos, &root, "status", "broken\n");
    write_and_capture(&kairos, &root, "notes.txt", "after\n");
    let scratch = base.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    let spawn = || {
        kairos
            .command([
                "bisect", "app", "--good", &first, "--bad", "latest", "--json",
            ])
            .env("TMPDIR", &scratch)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["first_bad"], json!(culprit));
    }
    // No scratch copy is left behind by either.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}
