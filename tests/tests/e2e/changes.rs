//! End-to-end tests of changes: timelines, proposals, sandboxes with real checks, staged
//! commits, probes and automated rollback, revert, crash recovery and the audit log,
//! against real nginx, Redis and PostgreSQL instances, through the CLI and the node.

use std::path::Path;
use std::time::{Duration, Instant};

use kairos_tests::services::{Nginx, Postgres, Redis, http_get};
use kairos_tests::{Kairos, Node, tree_listing, wait_for};
use serde_json::{Value, json};

fn write_proposal(dir: &Path, name: &str, document: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(document).unwrap()).unwrap();
    path.display().to_string()
}

/// Proposes `document` and returns the proposal id.
fn propose(kairos: &Kairos, dir: &Path, replica: &str, document: Value) -> String {
    let file = write_proposal(dir, "proposal.json", &document);
    let answer = kairos.json(["propose", replica, "--file", &file, "--json"]);
    answer["proposal"]
        .as_str()
        .expect("proposal id")
        .to_string()
}

/// Runs a command that prints JSON and may exit 1 (a failed check, a rolled back commit).
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

/// The live root equals the frame `frame` of `replica` (restored into a scratch directory),
/// byte for byte, for the paths `keep` selects.
fn assert_live_equals_frame(
    kairos: &Kairos,
    replica: &str,
    root: &Path,
    frame: &str,
    keep: impl Fn(&[u8]) -> bool,
) {
    let scratch = tempfile::tempdir().unwrap();
    let into = scratch.path().join("restored");
    kairos.ok([
        "restore",
        replica,
        "--at",
        frame,
        "--into",
        into.to_str().unwrap(),
    ]);
    let filter = |listing: std::collections::BTreeMap<Vec<u8>, (char, u32, Vec<u8>)>| {
        listing
            .into_iter()
            .filter(|(path, _)| keep(path))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        filter(tree_listing(root)),
        filter(tree_listing(&into)),
        "the live root differs from frame {frame}"
    );
}

/// Waits until a node's first capture of `replica` is in its history.
/// The entries of an audit log with `event`, oldest first.
fn entries<'a>(log: &'a Value, event: &str) -> Vec<&'a Value> {
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["event"] == event)
        .collect()
}

fn events(log: &Value) -> Vec<String> {
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["event"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn nginx_through_the_node_bad_config_fails_the_check_good_change_stays_broken_probe_rolls_back() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    let nginx = Nginx::start(&root, &base.path().join("run"));
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"web\"\nroot = {root:?}\ncapture_interval = \"60s\"\ncheck = {check:?}\nafter_commit = {reload:?}\nwatch_window = \"1500ms\"\nprobe_interval = \"100ms\"\n[[replica.probe]]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\"\nexpect_status = 200\n",
        root = root.display().to_string(),
        check = nginx.check_command(),
        reload = nginx.reload_command(),
        port = nginx.port,
    );
    let data = base.path().join("data");
    let node = Node::start(&config, &data);
    // The CLI finds the node through the data directory.
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("web");

    // A broken config: the real `nginx -t` fails in the sandbox; nothing live changes.
    let bad = propose(
        &kairos,
        base.path(),
        "web",
        json!({
            "title": "broken config", "author": "web-team",
            "ops": [{"op": "put_file", "path": "nginx.conf", "content": "events {\nthis is not nginx\n"}]
        }),
    );
    let (report, success) = json_and_status(
        &kairos,
        &["sandbox", "web", &bad[..12], "--run-check", "--json"],
    );
    assert!(!success, "a failed check exits 1");
    assert_eq!(report["check"]["passed"], json!(false));
    assert_eq!(report["check"]["exit_code"], json!(1));
    assert!(
        report["check"]["output"]
            .as_str()
            .unwrap()
            .contains("nginx"),
        "{report}"
    );
    assert!(report["check"]["duration_ms"].as_u64().is_some());
    assert_eq!(report["diff"]["files"][0]["path"], json!("nginx.conf"));
    assert_eq!(http_get(nginx.port, "/").1, "version 1\n");

    // A good change, committed without waiting: the node watches it and it stays.
    let good = propose(
        &kairos,
        base.path(),
        "web",
        json!({
            "title": "new page", "author": "web-team",
            "ops": [{"op": "put_file", "path": "html/index.html", "content": "version 2\n"}]
        }),
    );
    let (report, success) =
        json_and_status(&kairos, &["sandbox", "web", &good, "--run-check", "--json"]);
    assert!(
        success && report["check"]["passed"] == json!(true),
        "{report}"
    );
    let (watching, _) = json_and_status(&kairos, &["commit", "web", &good, "--no-wait", "--json"]);
    assert_eq!(watching["status"], json!("watching"), "{watching}");
    assert_eq!(http_get(nginx.port, "/").1, "version 2\n");
    let commit = watching["commit"].as_str().unwrap().to_string();
    let started = Instant::now();
    let committed = loop {
        let mut response = Node::agent()
            .get(format!(
                "{}/api/replicas/web/commits/{}",
                node.url,
                &commit[..12]
            ))
            .call()
            .unwrap();
        let record: Value = response.body_mut().read_json().unwrap();
        if record["status"] != json!("watching") {
            break record;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the watch never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(committed["status"], json!("committed"), "{committed}");
    assert!(committed["probe_runs"].as_u64().unwrap() >= 2);
    assert_eq!(http_get(nginx.port, "/").1, "version 2\n");
    let good_frame = committed["frame"].as_str().unwrap().to_string();

    // A valid config that breaks the health probe: committed, reloaded, probed, rolled back.
    let breaking = propose(
        &kairos,
        base.path(),
        "web",
        json!({
            "title": "health returns 500", "author": "other-team",
            "ops": [{"op": "put_file", "path": "nginx.conf", "content": nginx.config("return 500 'broken';")}]
        }),
    );
    let (record, success) = json_and_status(&kairos, &["commit", "web", &breaking, "--json"]);
    assert!(!success, "a rolled back commit exits 1");
    assert_eq!(record["status"], json!("rolled_back"), "{record}");
    let rollback = &record["rollback"];
    assert_eq!(rollback["to"], json!(good_frame));
    assert!(
        rollback["evidence"]
            .as_str()
            .unwrap()
            .contains("status 500"),
        "{rollback}"
    );
    assert_live_equals_frame(&kairos, "web", &root, &good_frame, |_| true);
    assert_eq!(http_get(nginx.port, "/health"), (200, "ok".to_string()));
    assert_eq!(http_get(nginx.port, "/").1, "version 2\n");

    let log = kairos.json(["log", "web", "--json"]);
    assert_eq!(log["intact"], json!(true));
    let seen = events(&log);
    for event in ["proposal", "sandbox", "commit", "probe", "rollback"] {
        assert!(seen.contains(&event.to_string()), "no {event} in {seen:?}");
    }
    let rollback_entry = entries(&log, "rollback")[0];
    assert_eq!(rollback_entry["party"], json!("kairos"));
}

#[test]
fn redis_config_edits_keep_formatting_staged_ops_commit_and_a_broken_port_rolls_back() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("redis");
    let redis = Redis::start(&root, &base.path().join("run"));
    let kairos = Kairos::new();
    kairos.ok([
        "replica",
        "add",
        "cache",
        "--root",
        root.to_str().unwrap(),
        "--exclude",
        "data/**",
        "--check",
        &redis.check_command(),
        "--after-commit",
        &redis.restart_command(),
        "--watch-window",
        "1s",
        "--probe-interval",
        "100ms",
        "--probe",
        &format!("command:{}", redis.ping_command()),
    ]);
    kairos.ok(["capture", "cache"]);
    let original = std::fs::read_to_string(root.join("redis.conf")).unwrap();

    // A value Redis refuses fails the sandbox check, run by redis-server itself.
    let bad = propose(
        &kairos,
        base.path(),
        "cache",
        json!({"title": "lots of memory", "author": "cache-team",
            "ops": [{"op": "set_config", "file": "redis.conf", "key": "maxmemory", "value": "lots"}]}),
    );
    let (report, success) = json_and_status(
        &kairos,
        &["sandbox", "cache", &bad, "--run-check", "--json"],
    );
    assert!(!success);
    assert_eq!(report["check"]["passed"], json!(false), "{report}");
    assert!(
        report["check"]["output"]
            .as_str()
            .unwrap()
            .contains("CONFIG FILE ERROR"),
        "{report}"
    );

    // Two ops; only the first is committed (a staged commit).
    let id = propose(
        &kairos,
        base.path(),
        "cache",
        json!({
            "title": "more memory, lru", "author": "cache-team",
            "ops": [
                {"op": "set_config", "file": "redis.conf", "key": "maxmemory", "value": "128mb"},
                {"op": "set_config", "file": "redis.conf", "key": "maxmemory-policy", "value": "allkeys-lru"}
            ]
        }),
    );
    let (report, _) = json_and_status(
        &kairos,
        &[
            "sandbox",
            "cache",
            &id,
            "--ops",
            "1",
            "--run-check",
            "--json",
        ],
    );
    assert_eq!(report["check"]["passed"], json!(true), "{report}");
    assert_eq!(report["ops"], json!([1]));
    let record = kairos.json(["commit", "cache", &id, "--ops", "1", "--json"]);
    assert_eq!(record["status"], json!("committed"), "{record}");
    assert_eq!(record["ops"], json!([1]));
    assert_eq!(redis.config_get("maxmemory"), "134217728");
    assert_eq!(redis.config_get("maxmemory-policy"), "noeviction");
    let edited = std::fs::read_to_string(root.join("redis.conf")).unwrap();
    assert_eq!(
        edited,
        original.replace("maxmemory 64mb", "maxmemory 128mb"),
        "formatting and comments are kept"
    );
    let good_frame = record["frame"].as_str().unwrap().to_string();

    // Moving the port breaks the ping probe: the config comes back and Redis with it.
    let other_port = kairos_tests::free_port();
    let id = propose(
        &kairos,
        base.path(),
        "cache",
        json!({
            "title": "move port", "author": "cache-team",
            "ops": [{"op": "set_config", "file": "redis.conf", "key": "port", "value": other_port}]
        }),
    );
    let (record, success) = json_and_status(&kairos, &["commit", "cache", &id, "--json"]);
    assert!(!success);
    assert_eq!(record["status"], json!("rolled_back"), "{record}");
    assert_eq!(record["rollback"]["to"], json!(good_frame));
    assert_eq!(
        std::fs::read_to_string(root.join("redis.conf")).unwrap(),
        edited
    );
    assert_live_equals_frame(&kairos, "cache", &root, &good_frame, |path| {
        !path.starts_with(b"data")
    });
    assert_eq!(redis.config_get("maxmemory"), "134217728");

    // Revert by hand to the first frame: recorded as a commit.
    let first = kairos.json(["history", "cache", "--json"])[0]["frame"]
        .as_str()
        .unwrap()
        .to_string();
    let record = kairos.json(["revert", "cache", "--to", &first[..12], "--json"]);
    assert_eq!(record["kind"], json!("revert"));
    assert_eq!(record["status"], json!("committed"));
    assert_eq!(
        std::fs::read_to_string(root.join("redis.conf")).unwrap(),
        original
    );
    assert_eq!(redis.config_get("maxmemory"), "67108864");
    let log = kairos.json(["log", "cache", "--json"]);
    assert!(events(&log).contains(&"revert".to_string()));
}

#[test]
fn postgres_bad_config_fails_the_check_and_a_good_change_commits_and_stays() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("pgdata");
    let postgres = Postgres::start(&root, &base.path().join("run"));
    let kairos = Kairos::new();
    kairos.ok([
        "replica",
        "add",
        "db",
        "--root",
        root.to_str().unwrap(),
        "--exclude",
        "base/**",
        "--exclude",
        "global/**",
        "--exclude",
        "pg_*/**",
        "--exclude",
        "postmaster.*",
        "--check",
        &postgres.check_command(),
        "--after-commit",
        &postgres.restart_command(),
        "--watch-window",
        "1s",
        "--probe-interval",
        "200ms",
        "--probe",
        &format!("command:{}", postgres.query_command("select 1")),
    ]);
    kairos.ok(["capture", "db"]);

    let bad = propose(
        &kairos,
        base.path(),
        "db",
        json!({
            "title": "lots of connections", "author": "dba",
            "ops": [{"op": "set_config", "file": "postgresql.conf", "key": "max_connections", "value": "lots"}]
        }),
    );
    let (report, success) =
        json_and_status(&kairos, &["sandbox", "db", &bad, "--run-check", "--json"]);
    assert!(!success);
    assert_eq!(report["check"]["passed"], json!(false));
    assert!(
        report["check"]["output"]
            .as_str()
            .unwrap()
            .contains("invalid value for parameter"),
        "{report}"
    );
    assert_eq!(report["diff"]["config"][0]["key"], json!("max_connections"));

    let good = propose(
        &kairos,
        base.path(),
        "db",
        json!({
            "title": "more work memory", "author": "dba",
            "ops": [{"op": "set_config", "file": "postgresql.conf", "key": "work_mem", "value": "8MB"}]
        }),
    );
    let report = kairos.json(["sandbox", "db", &good, "--run-check", "--json"]);
    assert_eq!(report["check"]["passed"], json!(true), "{report}");
    let record = kairos.json(["commit", "db", &good, "--json"]);
    assert_eq!(record["status"], json!("committed"), "{record}");
    assert_eq!(postgres.query("show work_mem").as_deref(), Some("8MB"));
    let conf = std::fs::read_to_string(root.join("postgresql.conf")).unwrap();
    assert!(
        conf.contains("work_mem = 8MB"),
        "the commented default stays and the key is added or set"
    );
    let shown = kairos.json(["show", "db", "--json"]);
    let keys: Vec<&Value> = shown["config"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["key"] == "work_mem")
        .collect();
    assert_eq!(keys[0]["value"], json!("8MB"));
}

/// A replica of plain files (no services) for validation, forks and conflicts.
fn plain_replica(
    kairos: &Kairos,
    base: &Path,
    watch_window: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let root = base.join("app");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/app.toml"),
        "# app\n[server]\nport = 8080 # public\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/notes.txt"), "free text\n").unwrap();
    std::fs::write(root.join("index.html"), "hello\n").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("outside")).unwrap();
    let mut args = vec![
        "replica",
        "add",
        "app",
        "--root",
        root.to_str().unwrap(),
        "--watch-window",
        watch_window,
        "--action",
        "touch=touch {root}/touched",
    ];
    args.extend_from_slice(extra);
    kairos.ok(args);
    kairos.ok(["capture", "app"]);
    root
}

#[test]
fn bad_proposals_are_refused_naming_the_op_and_nothing_is_stored() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    plain_replica(
        &kairos,
        base.path(),
        "0s",
        &["--check", "sleep 30", "--check-timeout", "300ms"],
    );
    let refused = |ops: Value| {
        let file = write_proposal(
            base.path(),
            "bad.json",
            &json!({"title": "t", "author": "a", "ops": ops}),
        );
        kairos.fails(["propose", "app", "--file", &file])
    };
    let cases = [
        (
            json!([{"op": "put_file", "path": "../escape", "content": "x"}]),
            "op 1 (put_file \"../escape\"): path \"../escape\" escapes the replica root",
        ),
        (
            json!([{"op": "delete", "path": "index.html"}, {"op": "put_file", "path": "/etc/passwd", "content": "x"}]),
            "op 2 (put_file \"/etc/passwd\"): path \"/etc/passwd\" is absolute",
        ),
        (
            json!([{"op": "put_file", "path": "outside/passwd", "content": "x"}]),
            "goes through the symlink \"outside\"",
        ),
        (
            json!([{"op": "action", "name": "reboot"}]),
            "op 1 (action \"reboot\"): unknown action \"reboot\" (replica \"app\" declares: touch)",
        ),
        (
            json!([{"op": "set_config", "file": "etc/notes.txt", "key": "a", "value": 1}]),
            "is not a config file of a format Kairos edits by key",
        ),
        (
            json!([{"op": "patch_file", "path": "missing.txt", "unified_diff": "--- a\n+++ b\n"}]),
            "\"missing.txt\" does not exist in the base",
        ),
        (
            json!([{"op": "unset_config", "file": "etc/app.toml", "key": "server.nope"}]),
            "key \"server.nope\" does not exist",
        ),
        (
            json!([{"op": "put_file", "path": "x", "content": "a", "content_base64": "YQ=="}]),
            "give exactly one of content, content_base64 and from",
        ),
        (
            json!([{"op": "chmod", "path": "x"}]),
            "unknown variant `chmod`",
        ),
        (json!([]), "has no ops"),
    ];
    for (ops, expected) in cases {
        let error = refused(ops);
        assert!(
            error.contains(expected),
            "{error:?} does not contain {expected:?}"
        );
    }
    std::fs::write(base.path().join("garbage.json"), "{not json").unwrap();
    let error = kairos.fails([
        "propose",
        "app",
        "--file",
        base.path().join("garbage.json").to_str().unwrap(),
    ]);
    assert!(error.contains("is not valid JSON"), "{error}");
    let log = kairos.json(["log", "app", "--json"]);
    assert!(
        log["entries"].as_array().unwrap().is_empty(),
        "refused proposals are not logged as proposals"
    );
    assert!(
        kairos
            .fails(["sandbox", "app", "zz"])
            .contains("proposal id")
    );
    assert!(
        kairos
            .fails(["sandbox", "app", "abcdef12"])
            .contains("no proposal id starts with \"abcdef12\"")
    );

    // A check that hangs is killed at its timeout; the outcome says so.
    let id = propose(
        &kairos,
        base.path(),
        "app",
        json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": "index.html", "content": "hi\n"}]}),
    );
    let (report, success) =
        json_and_status(&kairos, &["sandbox", "app", &id, "--run-check", "--json"]);
    assert!(!success);
    assert_eq!(report["check"]["timed_out"], json!(true));
    assert!(report["check"]["duration_ms"].as_u64().unwrap() < 10_000);
    assert!(
        kairos
            .fails(["commit", "app", &id, "--ops", "2"])
            .contains("op 2 does not exist")
    );
    assert!(
        kairos
            .fails(["commit", "app", &id, "--ops", "x"])
            .contains("is not an op number")
    );
    assert!(
        kairos
            .fails(["commit", "app", &id, "--no-wait"])
            .contains("--no-wait needs a running node")
    );
}

#[test]
fn forks_take_commits_as_frames_conflicts_are_refused_and_disjoint_changes_rebase() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = plain_replica(&kairos, base.path(), "0s", &[]);
    let first = kairos.json(["history", "app", "--json"])[0]["frame"]
        .as_str()
        .unwrap()
        .to_string();

    let fork = kairos.json([
        "timeline",
        "fork",
        "try",
        "--replica",
        "app",
        "--at",
        &first[..12],
        "--json",
    ]);
    assert_eq!(fork["head"]["id"], json!(first));
    assert!(
        kairos
            .fails([
                "timeline",
                "fork",
                "try",
                "--replica",
                "app",
                "--at",
                "latest"
            ])
            .contains("already exists")
    );
    assert!(
        kairos
            .fails([
                "timeline",
                "fork",
                "bad name",
                "--replica",
                "app",
                "--at",
                "latest"
            ])
            .contains("invalid")
    );
    let file = write_proposal(
        base.path(),
        "fork.json",
        &json!({"title": "try a port", "author": "team-a",
        "ops": [{"op": "set_config", "file": "etc/app.toml", "key": "server.port", "value": 9090}]}),
    );
    let proposal = kairos.json([
        "propose",
        "app",
        "--file",
        &file,
        "--timeline",
        "try",
        "--json",
    ]);
    assert_eq!(proposal["timeline"], json!("try"));
    let id = proposal["proposal"].as_str().unwrap();
    let record = kairos.json(["commit", "app", id, "--json"]);
    assert_eq!(record["status"], json!("committed"));
    assert_eq!(record["timeline"], json!("try"));
    // The fork moved; the live root did not.
    assert!(
        std::fs::read_to_string(root.join("etc/app.toml"))
            .unwrap()
            .contains("port = 8080")
    );
    let shown =
        String::from_utf8(kairos.ok(["cat", "app", "etc/app.toml", "--at", "try@latest"])).unwrap();
    assert_eq!(shown, "# app\n[server]\nport = 9090 # public\n");
    let timelines = kairos.json(["timeline", "list", "app", "--json"]);
    assert_eq!(timelines[1]["name"], json!("try"));
    assert_eq!(timelines[1]["head"]["id"], record["frame"]);

    // Two proposals on the same base: the second one touching the same file conflicts,
    // one touching another file is rebased onto the new head.
    let doc = |title: &str, ops: Value| json!({"title": title, "author": "team-b", "ops": ops});
    let a = propose(
        &kairos,
        base.path(),
        "app",
        doc(
            "a",
            json!([{"op": "put_file", "path": "index.html", "content": "a\n"}]),
        ),
    );
    let b = propose(
        &kairos,
        base.path(),
        "app",
        doc(
            "b",
            json!([{"op": "patch_file", "path": "index.html", "unified_diff": "--- a/index.html\n+++ b/index.html\n@@ -1 +1 @@\n-hello\n+bonjour\n"}]),
        ),
    );
    let c = propose(
        &kairos,
        base.path(),
        "app",
        doc(
            "c",
            json!([{"op": "put_file", "path": "etc/extra.txt", "content": "c\n"}, {"op": "action", "name": "touch"}]),
        ),
    );
    assert_eq!(
        kairos.json(["commit", "app", &a, "--json"])["status"],
        json!("committed")
    );
    let (conflict, success) = json_and_status(&kairos, &["commit", "app", &b, "--json"]);
    assert!(!success);
    assert_eq!(conflict["status"], json!("conflict"));
    assert_eq!(conflict["conflicts"], json!(["index.html"]));
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "a\n"
    );
    let rebased = kairos.json(["commit", "app", &c, "--json"]);
    assert_eq!(rebased["status"], json!("committed"), "{rebased}");
    assert_eq!(rebased["rebased"], json!(true));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/extra.txt")).unwrap(),
        "c\n"
    );
    assert!(root.join("touched").exists(), "the declared action ran");
    assert_eq!(rebased["actions"][0]["passed"], json!(true));

    kairos.ok(["timeline", "delete", "app", "try"]);
    assert!(
        kairos
            .fails(["timeline", "delete", "app", "main"])
            .contains("follows the live replica")
    );
    assert_eq!(
        kairos
            .json(["timeline", "list", "app", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // --from-dir: restore, edit, propose the difference.
    let edit = base.path().join("edit");
    kairos.ok([
        "restore",
        "app",
        "--at",
        "latest",
        "--into",
        edit.to_str().unwrap(),
    ]);
    std::fs::write(edit.join("index.html"), "from a directory\n").unwrap();
    std::fs::remove_file(edit.join("etc/extra.txt")).unwrap();
    std::fs::write(edit.join("new.txt"), "new\n").unwrap();
    let proposal = kairos.json([
        "propose",
        "app",
        "--from-dir",
        edit.to_str().unwrap(),
        "--json",
    ]);
    let mut ops: Vec<String> = proposal["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        [
            "delete \"etc/extra.txt\"",
            "put_file \"index.html\"",
            "put_file \"new.txt\""
        ]
    );
}

#[test]
fn a_flapping_probe_rolls_the_commit_back_with_its_evidence() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let counter = base.path().join("count");
    // Passes twice, then fails once, and so on.
    let probe = format!(
        "command:n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}; [ $((n % 3)) -ne 2 ]",
        c = counter.display()
    );
    let root = plain_replica(
        &kairos,
        base.path(),
        "5s",
        &["--probe", &probe, "--probe-interval", "50ms"],
    );
    let id = propose(
        &kairos,
        base.path(),
        "app",
        json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": "index.html", "content": "changed\n"}]}),
    );
    let (record, _) = json_and_status(&kairos, &["commit", "app", &id, "--json"]);
    assert_eq!(record["status"], json!("rolled_back"), "{record}");
    assert!(
        record["rollback"]["evidence"]
            .as_str()
            .unwrap()
            .contains("exit code 1")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "hello\n"
    );
}

#[test]
fn a_node_killed_during_the_watch_window_leaves_the_replica_at_its_last_good_frame() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("site");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "good\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"site\"\nroot = {:?}\ncapture_interval = \"60s\"\nwatch_window = \"60s\"\nprobe_interval = \"100ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"test -f {{root}}/index.html\"\n",
        root.display().to_string()
    );
    let data = base.path().join("data");
    let mut node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("site");
    // Bad input through the API: JSON errors with stable codes naming the problem.
    let post = |path: &str, body: &str| {
        let mut response = Node::agent()
            .post(format!("{}{path}", node.url))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().unwrap();
        (
            status,
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let (status, code, _) = post("/api/replicas/site/proposals", "{not json");
    assert_eq!((status, code.as_str()), (400, "bad_body"));
    let (status, code, message) = post(
        "/api/replicas/site/proposals",
        r#"{"document": {"title": "t", "author": "a", "ops": [{"op": "delete", "path": "../../etc"}]}}"#,
    );
    assert_eq!((status, code.as_str()), (422, "bad_op"));
    assert!(message.contains("escapes the replica root"), "{message}");
    let (status, code, _) = post("/api/replicas/site/proposals/abcd1234/sandbox", "{}");
    assert_eq!((status, code.as_str()), (404, "unknown_proposal"));
    let (status, code, _) = post(
        "/api/replicas/site/timelines",
        r#"{"name": "main", "at": "latest"}"#,
    );
    assert_eq!((status, code.as_str()), (400, "main_timeline"));
    let id = propose(
        &kairos,
        base.path(),
        "site",
        json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": "index.html", "content": "in progress\n"}]}),
    );
    let record = kairos.json(["commit", "site", &id, "--no-wait", "--json"]);
    assert_eq!(record["status"], json!("watching"));
    let last_good = record["last_good"].as_str().unwrap().to_string();
    // A second commit meanwhile is refused: one commit at a time per replica.
    assert!(
        kairos
            .fails(["commit", "site", &id])
            .contains("is in progress (watching)")
    );
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let _ = node.child.wait();
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "in progress\n"
    );

    let _node = Node::start(&config, &data);
    let commit = record["commit"].as_str().unwrap();
    let log = kairos.json(["log", "site", "--json"]);
    assert_eq!(log["intact"], json!(true));
    let seen = events(&log);
    assert!(
        seen.contains(&"recovery".to_string()) && seen.contains(&"rollback".to_string()),
        "{seen:?}"
    );
    let rollback = *entries(&log, "rollback").last().unwrap();
    assert_eq!(rollback["details"]["commit"], json!(commit));
    assert_eq!(rollback["details"]["to"], json!(last_good));
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "good\n"
    );
    assert_live_equals_frame(&kairos, "site", &root, &last_good, |_| true);
}

#[test]
fn a_failing_after_commit_command_rolls_back_at_once() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::new();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("state.txt"), "ok\n").unwrap();
    std::fs::write(root.join("data.bin"), kairos_tests::bytes(3, 1 << 20)).unwrap();
    let inode = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    };
    let data_inode = inode(&root.join("data.bin"));
    kairos.ok([
        "replica",
        "add",
        "svc",
        "--root",
        root.to_str().unwrap(),
        "--after-commit",
        "grep -q ok {root}/state.txt",
        "--watch-window",
        "30s",
        "--probe",
        "command:true",
    ]);
    kairos.ok(["capture", "svc"]);
    let id = propose(
        &kairos,
        base.path(),
        "svc",
        json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": "state.txt", "content": "bad\n"}]}),
    );
    let started = Instant::now();
    let (record, success) = json_and_status(&kairos, &["commit", "svc", &id, "--json"]);
    assert!(!success);
    assert_eq!(record["status"], json!("rolled_back"), "{record}");
    assert_eq!(record["after_commit"]["exit_code"], json!(1));
    assert!(
        record["rollback"]["evidence"]
            .as_str()
            .unwrap()
            .contains("exit code 1")
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "it did not wait for the window"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("state.txt")).unwrap(),
        "ok\n"
    );
    // after_commit ran again after the restore, and passed.
    assert_eq!(record["rollback"]["after_commit"]["passed"], json!(true));
    // The rollback rewrote the file that differed, not the others.
    assert_eq!(inode(&root.join("data.bin")), data_inode);
}

#[test]
fn a_node_killed_while_a_commit_is_applying_is_recovered_to_the_last_good_frame() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("site");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "good\n").unwrap();
    let started_marker = base.path().join("action-started");
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"site\"\nroot = {:?}\ncapture_interval = \"60s\"\nactions = {{ slow = \"touch {} && sleep 30\" }}\n[[replica.probe]]\nkind = \"command\"\ncommand = \"true\"\n",
        root.display().to_string(),
        started_marker.display()
    );
    let data = base.path().join("data");
    let mut node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("site");
    let id = propose(
        &kairos,
        base.path(),
        "site",
        json!({"title": "t", "author": "a", "ops": [
            {"op": "put_file", "path": "index.html", "content": "half done\n"},
            {"op": "action", "name": "slow"}
        ]}),
    );
    // The commit runs its slow action: files are written, the record says "applying".
    let committing = {
        let data = data.clone();
        let id = id.clone();
        std::thread::spawn(move || Kairos::at(&data).run(["commit", "site", &id, "--json"]))
    };
    wait_for("the slow action to start", Duration::from_secs(30), || {
        started_marker.exists().then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "half done\n"
    );
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let _ = node.child.wait();
    let output = committing.join().unwrap();
    assert!(!output.status.success(), "the commit cannot have succeeded");

    let _node = Node::start(&config, &data);
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "good\n"
    );
    let log = kairos.json(["log", "site", "--json"]);
    assert_eq!(log["intact"], json!(true));
    let recovery = entries(&log, "recovery")
        .first()
        .copied()
        .expect("a recovery entry");
    assert_eq!(recovery["details"]["status"], json!("applying"));
    let rollback = entries(&log, "rollback")
        .first()
        .copied()
        .expect("a rollback entry");
    assert!(
        rollback["details"]["evidence"]
            .as_str()
            .unwrap()
            .contains("the node stopped while the commit was applying")
    );
}

#[test]
fn a_node_killed_during_a_rollback_finishes_it_on_restart() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("state.txt"), "ok\n").unwrap();
    let marker = base.path().join("rollback-started");
    // after_commit is slow the first time it runs on a restored (good) state: the node is
    // killed then, in the middle of the rollback.
    let after_commit = format!(
        "grep -q bad {{root}}/state.txt || [ -f {m} ] || (touch {m}; sleep 30)",
        m = marker.display()
    );
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"svc\"\nroot = {:?}\ncapture_interval = \"60s\"\nafter_commit = {after_commit:?}\nwatch_window = \"30s\"\nprobe_interval = \"50ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"grep -q ok {{root}}/state.txt\"\n",
        root.display().to_string()
    );
    let data = base.path().join("data");
    let mut node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("svc");
    let id = propose(
        &kairos,
        base.path(),
        "svc",
        json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": "state.txt", "content": "bad\n"}]}),
    );
    let committing = {
        let data = data.clone();
        let id = id.clone();
        std::thread::spawn(move || Kairos::at(&data).run(["commit", "svc", &id, "--json"]))
    };
    wait_for(
        "the rollback's after_commit",
        Duration::from_secs(30),
        || marker.exists().then_some(()),
    );
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let _ = node.child.wait();
    assert!(!committing.join().unwrap().status.success());

    let restarted = Node::start(&config, &data);
    assert_eq!(
        std::fs::read_to_string(root.join("state.txt")).unwrap(),
        "ok\n"
    );
    let log = kairos.json(["log", "svc", "--json"]);
    assert_eq!(log["intact"], json!(true));
    let recovery = entries(&log, "recovery")
        .first()
        .copied()
        .expect("a recovery entry");
    assert_eq!(recovery["details"]["status"], json!("rolling_back"));
    let rollbacks = entries(&log, "rollback");
    assert_eq!(
        rollbacks.len(),
        1,
        "the interrupted rollback was never recorded done"
    );
    let commit = recovery["details"]["commit"].as_str().unwrap();
    let record: Value = {
        let mut response = Node::agent()
            .get(format!(
                "{}/api/replicas/svc/commits/{}",
                restarted.url,
                &commit[..12]
            ))
            .call()
            .unwrap();
        response.body_mut().read_json().unwrap()
    };
    assert_eq!(record["status"], json!("rolled_back"));
}
