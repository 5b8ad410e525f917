//! The catalog's write path and the one service layer, end to end: concurrent commits
//! through a node (exactly one at a time, nothing lost, the log consistent), the CLI's
//! answers on a data directory and through a node byte for byte the same, and reads
//! that never change anything (recovery is explicit).

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

fn propose(kairos: &Kairos, dir: &Path, replica: &str, name: &str, document: Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec(&document).unwrap()).unwrap();
    let answer = kairos.json([
        "propose",
        replica,
        "--file",
        path.to_str().unwrap(),
        "--json",
    ]);
    answer["proposal"].as_str().unwrap().to_string()
}

fn events(log: &Value) -> Vec<(String, Value)> {
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["event"].as_str().unwrap().to_string(),
                entry["details"].clone(),
            )
        })
        .collect()
}

#[test]
fn concurrent_commits_through_the_node_run_one_at_a_time_and_the_rest_are_refused_busy() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"svc\"\nroot = {:?}\ncapture_interval = \"60s\"\nwatch_window = \"1500ms\"\nprobe_interval = \"200ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"true\"\n",
        root.display().to_string()
    );
    let data = base.path().join("data");
    let _node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("svc");
    const PARTIES: usize = 6;
    let ids: Vec<String> = (0..PARTIES)
        .map(|index| {
            propose(
                &kairos,
                base.path(),
                "svc",
                &format!("p{index}"),
                json!({"title": format!("file {index}"), "author": format!("team{index}"),
                       "ops": [{"op": "put_file", "path": format!("f{index}.txt"), "content": format!("{index}\n")}]}),
            )
        })
        .collect();

    let barrier = Arc::new(Barrier::new(PARTIES));
    let threads: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let data = data.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                Kairos::at(&data).run(["commit", "svc", &id, "--json"])
            })
        })
        .collect();
    let outputs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let mut committed = Vec::new();
    for (index, output) in outputs.iter().enumerate() {
        if output.status.success() {
            let record: Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(record["status"], json!("committed"), "{record}");
            committed.push(index);
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("is busy") && stderr.contains("is in progress"),
                "a refused commit says the replica is busy with which commit: {stderr}"
            );
        }
    }
    assert!(!committed.is_empty(), "at least one commit went through");
    assert!(
        committed.len() < PARTIES,
        "with a 1.5 s watch window, commits fired at the same instant overlap"
    );
    // What was committed is live; what was refused never touched the root.
    for index in 0..PARTIES {
        let file = root.join(format!("f{index}.txt"));
        assert_eq!(
            file.exists(),
            committed.contains(&index),
            "f{index}.txt on disk iff its commit went through"
        );
    }

    // The log is intact, and no commit began while another was in progress.
    let log = kairos.json(["log", "svc", "--json"]);
    assert_eq!(log["intact"], json!(true), "{log}");
    let mut in_progress: Option<String> = None;
    let mut finished = 0;
    for (event, details) in events(&log) {
        if event != "commit" {
            continue;
        }
        let commit = details["commit"].as_str().unwrap().to_string();
        match details["status"].as_str().unwrap() {
            "applying" => {
                assert!(
                    in_progress.is_none(),
                    "commit {commit} began while {in_progress:?} was in progress"
                );
                in_progress = Some(commit);
            }
            "committed" | "rolled_back" => {
                assert_eq!(in_progress.as_deref(), Some(commit.as_str()));
                in_progress = None;
                finished += 1;
            }
            other => panic!("unexpected commit status {other} in the log"),
        }
    }
    assert_eq!(in_progress, None);
    assert_eq!(finished, committed.len());
}

/// Builds a data directory with frames, a fork, a proposal, a sandbox and a log, then
/// moves the replica's root away so that a node on it records nothing new.
fn store_to_read(base: &Path) -> (Kairos, Vec<String>) {
    let root = base.join("web");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/app.toml"), "[server]\nport = 8080\n").unwrap();
    std::fs::write(root.join("index.html"), "one\n").unwrap();
    let kairos = Kairos::at(&base.join("data"));
    kairos.add_idle_replica("web", &root);
    kairos.ok(["capture", "web"]);
    std::fs::write(root.join("etc/app.toml"), "[server]\nport = 9090\n").unwrap();
    std::fs::write(root.join("index.html"), "two\n").unwrap();
    kairos.ok(["capture", "web"]);
    let frames: Vec<String> = kairos
        .json(["history", "web", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|frame| frame["frame"].as_str().unwrap().to_string())
        .collect();
    kairos.ok([
        "timeline",
        "fork",
        "try",
        "--replica",
        "web",
        "--at",
        &frames[0],
    ]);
    let proposal = propose(
        &kairos,
        base,
        "web",
        "port",
        json!({"title": "port", "author": "web-team",
               "ops": [{"op": "set_config", "file": "etc/app.toml", "key": "server.port", "value": 7070}]}),
    );
    kairos.ok(["sandbox", "web", &proposal]);
    std::fs::rename(&root, base.join("web-away")).unwrap();
    (kairos, frames)
}

#[test]
fn every_read_command_answers_the_same_bytes_directly_and_through_a_node() {
    let base = tempfile::tempdir().unwrap();
    let (kairos, frames) = store_to_read(base.path());
    let (first, second) = (frames[0].as_str(), frames[1].as_str());
    let reads: Vec<Vec<&str>> = vec![
        vec!["replica", "list"],
        vec!["replica", "list", "--json"],
        vec!["history", "web"],
        vec!["history", "web", "--json"],
        vec!["history", "web", "--timeline", "try", "--json"],
        vec!["show", "web", "--at", first],
        vec!["show", "web", "--at", second, "--json"],
        vec!["show", "web", "--at", "try@latest", "--json"],
        vec!["cat", "web", "etc/app.toml", "--at", first],
        vec!["cat", "web", "index.html"],
        vec!["diff", "web", "--from", first, "--to", second],
        vec!["diff", "web", "--from", first, "--json"],
        vec!["timeline", "list", "web"],
        vec!["timeline", "list", "web", "--json"],
        vec!["log", "web"],
        vec!["log", "web", "--json"],
        vec!["verify"],
        vec!["verify", "--json"],
        // Bad input answers the same too.
        vec!["show", "web", "--at", "ffffffff"],
        vec!["cat", "web", "nope.txt"],
        vec!["history", "nope"],
    ];
    // A node that ran on the directory once has recorded its place in the cluster's log
    // (two keys `verify` counts): the direct reads are of such a store.
    Node::start("", kairos.data_dir()).stop();
    let direct: Vec<_> = reads.iter().map(|args| kairos.run(args)).collect();
    let _node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());
    assert!(
        kairos.data_dir().join("node.json").exists(),
        "the node announces itself, so the same commands now go through it"
    );
    for (args, direct) in reads.iter().zip(&direct) {
        // The data directory now names the running node: the CLI goes through it.
        let through_node = kairos.run(args);
        assert_eq!(
            direct.status.success(),
            through_node.status.success(),
            "kairos {args:?}: exit status"
        );
        assert_eq!(
            String::from_utf8_lossy(&direct.stdout),
            String::from_utf8_lossy(&through_node.stdout),
            "kairos {args:?}: standard output"
        );
        assert_eq!(
            String::from_utf8_lossy(&direct.stderr),
            String::from_utf8_lossy(&through_node.stderr),
            "kairos {args:?}: standard error"
        );
    }
}

#[test]
fn reading_the_log_changes_nothing_and_recovery_is_explicit() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("site");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "good\n").unwrap();
    let marker = base.path().join("action-started");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok([
        "replica",
        "add",
        "site",
        "--root",
        root.to_str().unwrap(),
        "--action",
        &format!("slow=touch {} && sleep 20", marker.display()),
        "--probe",
        "command:true",
    ]);
    kairos.ok(["capture", "site"]);
    let id = propose(
        &kairos,
        base.path(),
        "site",
        "slow",
        json!({"title": "t", "author": "a", "ops": [
            {"op": "put_file", "path": "index.html", "content": "half done\n"},
            {"op": "action", "name": "slow"}
        ]}),
    );
    // A commit on the data directory, killed while its action runs.
    let mut committing = kairos
        .command(["commit", "site", &id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the slow action to start", Duration::from_secs(30), || {
        marker.exists().then_some(())
    });
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(committing.id() as i32, libc::SIGKILL) };
    let _ = committing.wait();

    // Reading the log (twice, in both forms) neither rolls back nor writes an entry.
    let before = kairos.json(["log", "site", "--json"]);
    kairos.ok(["log", "site"]);
    let after = kairos.json(["log", "site", "--json"]);
    assert_eq!(before, after);
    assert!(
        events(&after).iter().all(|(event, _)| event != "recovery"),
        "{after}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "half done\n",
        "a read left the live root alone"
    );

    // Recovery is a command of its own.
    let recovered = kairos.json(["recover", "site", "--json"]);
    assert_eq!(recovered.as_array().unwrap().len(), 1, "{recovered}");
    assert_eq!(recovered[0]["status"], json!("rolled_back"));
    assert_eq!(
        std::fs::read_to_string(root.join("index.html")).unwrap(),
        "good\n"
    );
    let log = kairos.json(["log", "site", "--json"]);
    let names: Vec<String> = events(&log).into_iter().map(|(event, _)| event).collect();
    assert!(names.contains(&"recovery".to_string()), "{names:?}");
    assert!(names.contains(&"rollback".to_string()), "{names:?}");
    assert_eq!(
        kairos.json(["recover", "--json"]),
        json!([]),
        "nothing is left in progress"
    );
}

#[test]
fn a_rollback_never_touches_the_store_inside_the_replica_root_and_proposals_cannot_name_it() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a.txt"), "a\n").unwrap();
    // The default data directory, `./.kairos`, run from the service's own directory.
    let kairos = Kairos::at(&root.join(".kairos"));
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.to_str().unwrap(),
        "--watch-window",
        "1s",
        "--probe",
        "command:test ! -f {root}/BREAK",
    ]);
    kairos.ok(["capture", "web"]);
    let breaking = propose(
        &kairos,
        base.path(),
        "web",
        "break",
        json!({"title": "b", "author": "a", "ops": [{"op": "put_file", "path": "BREAK", "content": "x"}]}),
    );
    let output = kairos.run(["commit", "web", &breaking, "--json"]);
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["status"], json!("rolled_back"), "{record}");
    assert!(!root.join("BREAK").exists());
    assert!(
        root.join(".kairos").is_dir(),
        "the store survived the rollback"
    );
    let log = kairos.json(["log", "web", "--json"]);
    assert_eq!(log["intact"], json!(true));
    assert!(events(&log).iter().any(|(event, _)| event == "rollback"));

    let store_file = root.join(".kairos/kairos.redb");
    let size = std::fs::metadata(&store_file).unwrap().len();
    let path = base.path().join("clobber.json");
    std::fs::write(
        &path,
        json!({"title": "s", "author": "a", "ops": [{"op": "put_file", "path": ".kairos/kairos.redb", "content": "x"}]})
            .to_string(),
    )
    .unwrap();
    let error = kairos.fails(["propose", "web", "--file", path.to_str().unwrap()]);
    assert!(error.contains("own data directory"), "{error}");
    assert_eq!(std::fs::metadata(&store_file).unwrap().len(), size);
}

#[test]
fn concurrent_commits_on_a_fork_rebase_onto_each_other() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"svc\"\nroot = {:?}\ncapture_interval = \"60s\"\n",
        root.display().to_string()
    );
    let data = base.path().join("data");
    let _node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("svc");
    kairos.ok([
        "timeline",
        "fork",
        "try",
        "--replica",
        "svc",
        "--at",
        "latest",
    ]);
    const COMMITS: usize = 5;
    let ids: Vec<String> = (0..COMMITS)
        .map(|index| {
            let path = base.path().join(format!("f{index}.json"));
            std::fs::write(
                &path,
                json!({"title": "t", "author": "a", "ops": [{"op": "put_file", "path": format!("f{index}.txt"), "content": "x"}]})
                    .to_string(),
            )
            .unwrap();
            kairos.json(["propose", "svc", "--file", path.to_str().unwrap(), "--timeline", "try", "--json"])
                ["proposal"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let barrier = Arc::new(Barrier::new(COMMITS));
    let threads: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let data = data.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                Kairos::at(&data).run(["commit", "svc", &id, "--json"])
            })
        })
        .collect();
    for thread in threads {
        let output = thread.join().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let record: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(record["status"], json!("committed"), "{record}");
    }
    let history = kairos.json(["history", "svc", "--timeline", "try", "--json"]);
    assert_eq!(history.as_array().unwrap().len(), 1 + COMMITS);
    let latest = kairos
        .json(["show", "svc", "--at", "try@latest", "--json"])
        .to_string();
    for index in 0..COMMITS {
        assert!(
            latest.contains(&format!("f{index}.txt")),
            "every commit is in the fork's head"
        );
    }
}

#[test]
fn a_stopping_node_lets_a_commit_in_its_watch_window_finish() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[[replica]]\nname = \"svc\"\nroot = {:?}\ncapture_interval = \"60s\"\nwatch_window = \"2s\"\nprobe_interval = \"200ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"true\"\n",
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
        "good",
        json!({"title": "g", "author": "a", "ops": [{"op": "put_file", "path": "good.txt", "content": "g\n"}]}),
    );
    let record = kairos.json(["commit", "svc", &id, "--no-wait", "--json"]);
    assert_eq!(record["status"], json!("watching"));
    assert!(node.stop(), "the node stops cleanly");
    // On the data directory: the commit finished before the node left.
    let log = kairos.json(["log", "svc", "--json"]);
    let names: Vec<String> = events(&log).into_iter().map(|(event, _)| event).collect();
    assert!(!names.contains(&"recovery".to_string()), "{names:?}");
    let last_commit = events(&log)
        .into_iter()
        .rev()
        .find(|(event, _)| event == "commit")
        .unwrap();
    assert_eq!(last_commit.1["status"], json!("committed"));
    assert_eq!(kairos.json(["recover", "--json"]), json!([]));
    assert_eq!(
        std::fs::read_to_string(root.join("good.txt")).unwrap(),
        "g\n"
    );
}

#[test]
fn reverts_are_logged_as_they_begin_and_replicas_cannot_share_a_root() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "svc", "--root", root.to_str().unwrap()]);
    let first = kairos.json(["capture", "svc", "--json"])["frame"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(root.join("app.conf"), "port = 2\n").unwrap();
    kairos.ok(["capture", "svc"]);
    kairos.ok(["revert", "svc", "--to", &first]);
    let log = kairos.json(["log", "svc", "--json"]);
    let statuses: Vec<String> = events(&log)
        .into_iter()
        .filter(|(event, _)| event == "revert")
        .map(|(_, details)| details["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["applying", "committed"]);

    for other in [root.clone(), root.join("sub")] {
        let error = kairos.fails(["replica", "add", "again", "--root", other.to_str().unwrap()]);
        assert!(error.contains("overlaps replica \"svc\""), "{error}");
    }
}

#[test]
fn names_reach_the_node_as_names_and_a_mistyped_data_directory_is_not_created() {
    let base = tempfile::tempdir().unwrap();
    let (kairos, _) = store_to_read(base.path());
    let direct = kairos.fails(["log", "%77eb"]);
    let _node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());
    for name in ["%77eb", "web?x", "web/../web", "we b"] {
        let through_node = kairos.fails(["log", name]);
        assert!(
            through_node.contains(&format!("unknown replica {name:?}")),
            "{name}: {through_node}"
        );
    }
    assert!(direct.contains("unknown replica \"%77eb\""), "{direct}");

    let missing = base.path().join("no/such/dir");
    let error = Kairos::at(&missing).fails(["log", "web"]);
    assert!(error.contains("does not exist"), "{error}");
    assert!(!missing.exists());
}

#[test]
fn a_node_marker_naming_a_live_process_that_does_not_listen_is_ignored() {
    let base = tempfile::tempdir().unwrap();
    let (kairos, _) = store_to_read(base.path());
    // This test's own pid: alive, but no node listens at that address.
    std::fs::write(
        kairos.data_dir().join("node.json"),
        json!({"url": "http://127.0.0.1:1", "pid": std::process::id()}).to_string(),
    )
    .unwrap();
    let history = kairos.json(["history", "web", "--json"]);
    assert_eq!(history.as_array().unwrap().len(), 2);
}

#[test]
fn direct_commands_use_the_replicas_the_configuration_defines() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("svc");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let config = base.path().join("kairos.toml");
    std::fs::write(
        &config,
        format!(
            "[[replica]]\nname = \"svc\"\nroot = {:?}\nwatch_window = \"1s\"\nprobe_interval = \"100ms\"\n[[replica.probe]]\nkind = \"command\"\ncommand = \"test ! -f {{root}}/BREAK\"\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    // Never registered by hand nor by a node: the configuration defines it.
    kairos.ok(["--config", config, "capture", "svc"]);
    let id = propose(
        &kairos,
        base.path(),
        "svc",
        "break",
        json!({"title": "b", "author": "a", "ops": [{"op": "put_file", "path": "BREAK", "content": "x"}]}),
    );
    let output = kairos.run(["--config", config, "commit", "svc", &id, "--json"]);
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        record["status"],
        json!("rolled_back"),
        "the configuration's probe watched the commit: {record}"
    );
    assert!(!root.join("BREAK").exists());
}
