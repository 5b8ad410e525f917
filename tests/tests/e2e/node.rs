//! End-to-end tests of the node: `kairos up` capturing continuously, the HTTP API, the CLI
//! through `--node`, clean shutdown and kill -9.

use std::path::Path;
use std::time::{Duration, Instant};

use kairos_tests::{Kairos, Node, bytes, frames, wait_for};
use serde_json::Value;

/// A node configuration watching `replica_root` as replica "web".
fn config(replica_root: &Path, node_keys: &str, capture_interval: &str) -> String {
    format!(
        "[node]\ncapture_debounce = \"100ms\"\n{node_keys}\n[telemetry]\nlog = \"info\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = {capture_interval:?}\nexclude = [\"*.log\"]\n",
        replica_root.display().to_string()
    )
}

fn get_json(url: &str) -> (u16, Value) {
    let mut response = Node::agent().get(url).call().expect("request");
    let status = response.status().as_u16();
    (status, response.body_mut().read_json().expect("JSON body"))
}

#[test]
fn node_captures_file_changes_and_the_cli_answers_the_same_through_it() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("web");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("app.toml"), b"port = 8080\n").unwrap();
    let state = tempfile::tempdir().unwrap();
    let data_dir = state.path().join("data");
    let mut node = Node::start(&config(&root, "", "1h"), &data_dir);
    let kairos = Kairos::new();
    let via_node = |args: &[&str]| -> Vec<u8> {
        let mut all = vec!["--node", node.url.as_str()];
        all.extend_from_slice(args);
        kairos.ok(all)
    };

    // The first frame is taken at start.
    let first = wait_for("the first frame", Duration::from_secs(10), || {
        let history: Value =
            serde_json::from_slice(&via_node(&["history", "web", "--json"])).ok()?;
        frames(&history).first().cloned()
    });
    // A file change is captured without asking, within the debounce window.
    let written = Instant::now();
    std::fs::write(root.join("app.toml"), b"port = 9090\n").unwrap();
    std::fs::write(root.join("noise.log"), b"excluded files do not count\n").unwrap();
    let second = wait_for("a frame with the change", Duration::from_secs(5), || {
        let history: Value =
            serde_json::from_slice(&via_node(&["history", "web", "--json"])).ok()?;
        let ids = frames(&history);
        (ids.len() >= 2).then(|| ids.last().cloned()).flatten()
    });
    eprintln!("change captured {:?} after the write", written.elapsed());
    let captured =
        serde_json::from_slice::<Value>(&via_node(&["capture", "web", "--json"])).unwrap();
    assert_eq!(
        captured["files_read"], 0,
        "nothing changed since: {captured}"
    );

    let commands: Vec<Vec<String>> = vec![
        vec!["replica".into(), "list".into(), "--json".into()],
        vec!["history".into(), "web".into(), "--json".into()],
        vec!["history".into(), "web".into()],
        vec![
            "show".into(),
            "web".into(),
            "--at".into(),
            second[..8].into(),
            "--json".into(),
        ],
        vec![
            "show".into(),
            "web".into(),
            "--at".into(),
            first[..8].into(),
        ],
        vec![
            "cat".into(),
            "web".into(),
            "app.toml".into(),
            "--at".into(),
            first.clone(),
        ],
        vec![
            "diff".into(),
            "web".into(),
            "--from".into(),
            first.clone(),
            "--to".into(),
            second.clone(),
            "--json".into(),
        ],
        vec![
            "diff".into(),
            "web".into(),
            "--from".into(),
            first.clone(),
            "--to".into(),
            second.clone(),
        ],
        vec!["verify".into(), "--json".into()],
    ];
    let through_node: Vec<Vec<u8>> = commands
        .iter()
        .map(|args| via_node(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .collect();
    let diff_text = String::from_utf8(through_node[7].clone()).unwrap();
    assert!(
        diff_text.contains("config app.toml: port: 8080 -> 9090"),
        "{diff_text}"
    );
    assert_eq!(through_node[5], b"port = 8080\n");
    let missing = kairos.fails(["--node", &node.url, "show", "nope"]);
    // Pointed at the data directory of a running node, the CLI goes through that node.
    assert_eq!(Kairos::at(&data_dir).ok(&commands[1]), through_node[1]);
    assert_eq!(
        missing,
        "kairos: error: unknown replica \"nope\" (see `kairos replica list`)"
    );

    assert!(node.stop(), "SIGTERM stops the node cleanly");
    let direct = Kairos::at(&data_dir);
    for (args, expected) in commands.iter().zip(&through_node) {
        assert_eq!(
            &direct.ok(args),
            expected,
            "`kairos {}` differs between the node and the store",
            args.join(" ")
        );
    }
    assert_eq!(direct.fails(["show", "nope"]), missing);
}

#[test]
fn the_api_answers_bad_input_with_json_errors_and_documents_itself() {
    let service = tempfile::tempdir().unwrap();
    std::fs::write(service.path().join("a.txt"), b"a").unwrap();
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        &config(service.path(), "request_body_bytes_max = 4096", "1h"),
        &state.path().join("data"),
    );
    let agent = Node::agent();
    let url = |path: &str| format!("{}{path}", node.url);
    // The requests below about paths need the node's first frame.
    kairos_tests::wait_for("the first frame", Duration::from_secs(30), || {
        let (_, history) = get_json(&url("/api/replicas/web/history"));
        history
            .as_array()
            .is_some_and(|frames| !frames.is_empty())
            .then_some(())
    });

    let (status, health) = get_json(&url("/api/health"));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (_, document) = get_json(&url("/api/openapi.json"));
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/health",
        "/api/status",
        "/api/replicas",
        "/api/replicas/{name}/capture",
        "/api/replicas/{name}/history",
        "/api/replicas/{name}/state",
        "/api/replicas/{name}/file",
        "/api/replicas/{name}/diff",
        "/api/replicas/{name}/restore",
        "/api/verify",
    ] {
        assert!(document["paths"][path].is_object(), "{path} is documented");
    }

    let post = |path: &str, body: &str| -> (u16, Value) {
        let mut response = agent
            .post(url(path))
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .expect("request");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_json().unwrap_or(Value::Null),
        )
    };
    let cases = [
        ("/api/replicas", "{\"name\": ", 400, "bad_body"),
        (
            "/api/replicas",
            "{\"name\": 7, \"root\": \"/tmp\"}",
            400,
            "bad_body",
        ),
        (
            "/api/replicas",
            "{\"name\": \"x\", \"root\": \"/tmp\", \"colour\": 1}",
            400,
            "bad_body",
        ),
        (
            "/api/replicas",
            "{\"name\": \"x\", \"root\": \"relative\"}",
            400,
            "bad_root",
        ),
        (
            "/api/replicas",
            "{\"name\": \"../x\", \"root\": \"/tmp\"}",
            400,
            "bad_replica",
        ),
        (
            "/api/replicas",
            "{\"name\": \"web\", \"root\": \"/tmp\"}",
            409,
            "replica_exists",
        ),
        ("/api/replicas/nope/capture", "", 404, "unknown_replica"),
        (
            "/api/replicas/web/restore",
            "{\"at\": \"latest\", \"into\": \"relative\"}",
            400,
            "bad_target",
        ),
        (
            "/api/replicas/web/restore",
            "{\"at\": \"soon\", \"into\": \"/tmp/x\"}",
            400,
            "bad_spec",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, answer) = post(path, body);
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "POST {path} {body}: {answer}"
        );
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, answer) = post(
        "/api/replicas",
        &format!("{{\"name\": \"{}\", \"root\": \"/tmp\"}}", "x".repeat(5000)),
    );
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    for (path, status, code) in [
        ("/api/replicas/nope/history", 404, "unknown_replica"),
        ("/api/replicas/web/state?at=yesterday", 400, "bad_spec"),
        (
            "/api/replicas/web/state?at=2001-01-01T00:00:00Z",
            404,
            "frame_not_found",
        ),
        ("/api/replicas/web/state?colour=blue", 400, "bad_query"),
        (
            "/api/replicas/web/file?path=../../etc/passwd",
            400,
            "path_escapes_root",
        ),
        ("/api/replicas/web/file?path=missing", 404, "path_not_found"),
        ("/api/nope", 404, "no_such_endpoint"),
    ] {
        let (got, answer) = get_json(&url(path));
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "GET {path}: {answer}"
        );
    }

    // Concurrent captures of one replica are serialised and all answered.
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| post("/api/replicas/web/capture", "").1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for answer in &answers {
        assert!(answer["frame"].is_string(), "{answer}");
    }
    let (_, history) = get_json(&url("/api/replicas/web/history"));
    let ids = frames(&history);
    for answer in &answers {
        assert!(ids.contains(&answer["frame"].as_str().unwrap().to_string()));
    }
    let (status, opened) = get_json(&url(&format!(
        "/api/replicas/web/frame?at={}",
        &ids[0][..10]
    )));
    assert_eq!(status, 200, "{opened}");
    assert_eq!(opened["frame"]["frame"].as_str(), Some(ids[0].as_str()));
    assert_eq!(opened["files_entries"], 1);
    let (_, verify) = get_json(&url("/api/verify"));
    assert_eq!(verify["ok"], true);
}

#[test]
fn a_missing_root_is_reported_and_the_node_keeps_going() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("web");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.txt"), b"a").unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut node = Node::start(&config(&root, "", "200ms"), &state.path().join("data"));
    let status_url = format!("{}/api/status", node.url);
    wait_for("a first capture", Duration::from_secs(10), || {
        let (_, status) = get_json(&status_url);
        (status["replicas"][0]["captures"].as_u64()? >= 1).then_some(())
    });
    std::fs::remove_dir_all(&root).unwrap();
    let error = wait_for("a failed capture", Duration::from_secs(10), || {
        let (_, status) = get_json(&status_url);
        status["replicas"][0]["last_error"]
            .as_str()
            .map(str::to_string)
    });
    assert!(error.contains("is not readable"), "{error}");
    assert_eq!(get_json(&format!("{}/api/health", node.url)).0, 200);
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("b.txt"), b"b").unwrap();
    wait_for("captures to resume", Duration::from_secs(10), || {
        let (_, status) = get_json(&status_url);
        status["replicas"][0]["last_error"].is_null().then_some(())
    });
    assert!(node.stop());
}

#[test]
fn kill_9_during_continuous_capture_loses_no_acknowledged_frame() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("web");
    std::fs::create_dir(&root).unwrap();
    for index in 0..20 {
        std::fs::write(root.join(format!("f{index}.bin")), bytes(index, 100_000)).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let data_dir = state.path().join("data");
    let mut node = Node::start(&config(&root, "", "100ms"), &data_dir);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let root = root.clone();
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::write(
                    root.join(format!("f{}.bin", round % 20)),
                    bytes(1000 + round, 100_000),
                );
                round += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let agent = Node::agent();
    let mut acknowledged = Vec::new();
    for _ in 0..15 {
        let mut response = agent
            .post(format!("{}/api/replicas/web/capture", node.url))
            .send_empty()
            .unwrap();
        let answer: Value = response.body_mut().read_json().unwrap();
        acknowledged.push(answer["frame"].as_str().expect("a frame").to_string());
    }
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let _ = node.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();

    let kairos = Kairos::at(&data_dir);
    let history = frames(&kairos.json(["history", "web", "--json"]));
    for frame in &acknowledged {
        assert!(
            history.contains(frame),
            "acknowledged frame {frame} was lost"
        );
    }
    assert_eq!(kairos.json(["verify", "--json"])["ok"], true);
}
