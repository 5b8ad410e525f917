//! Kairos nodes as one cluster, as `deploy/local-cluster` starts it: three `kairos up`
//! processes on 127.0.0.1, .2 and .3 whose catalog is one openraft log. A frame captured
//! through one member restores byte-identical from another (its objects fetched from
//! peers); killing the leader with -9 during a stream of commands loses no acknowledged
//! command, a new leader takes over and the dead member's replica is placed elsewhere;
//! a node with the wrong secret or an id already taken is refused by name.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kairos_tests::proxy::PartitionProxy;
use kairos_tests::{Kairos, Node, kairos_bin, tree_listing, wait_for};
use serde_json::{Value, json};

/// `deploy/local-cluster DIR 3`, stopped (SIGTERM: it stops its nodes) when dropped.
struct LocalCluster {
    script: Child,
    urls: Vec<String>,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    fn start(dir: &Path, replicas: Option<&Path>) -> LocalCluster {
        LocalCluster::start_with(dir, replicas, &[])
    }

    /// [`LocalCluster::start`] with these environment variables set for the script.
    fn start_with(dir: &Path, replicas: Option<&Path>, env: &[(&str, String)]) -> LocalCluster {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster");
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .arg(dir)
            .arg("3")
            .env("KAIROS_BIN", kairos_bin())
            .env_remove("KAIROS_NODE")
            .env_remove("KAIROS_DATA_DIR")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(replicas) = replicas {
            command.env("KAIROS_CLUSTER_REPLICAS", replicas);
        }
        command.envs(env.iter().map(|(name, value)| (*name, value.as_str())));
        let mut script = command.spawn().expect("deploy/local-cluster starts");
        let mut stdout = std::io::BufReader::new(script.stdout.take().unwrap());
        let mut urls = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            assert!(
                line.starts_with("http://127.0.0."),
                "the script printed {line:?}"
            );
            urls.push(line.trim().to_string());
        }
        LocalCluster {
            script,
            urls,
            dir: dir.to_path_buf(),
        }
    }

    fn status(&self, url: &str) -> Option<Value> {
        let mut response = Node::agent()
            .get(format!("{url}/api/cluster"))
            .call()
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.body_mut().read_json().ok()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What each member logged last, to see why.
            for member in 1..=3 {
                let log = std::fs::read_to_string(self.dir.join(format!("node-{member}/log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- node {member}, last lines of its log:");
                for line in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{line}");
                }
            }
        }
        // The script and its nodes are one process group: asked to stop, then, if any of
        // them still runs after 10 s, killed.
        let group = -(self.script.id() as i32);
        // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.script.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.script.wait();
    }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let mut response = Node::agent().post(url).send_json(body).unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

fn get(url: &str) -> (u16, Value) {
    let mut response = Node::agent().get(url).call().unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

#[test]
fn a_frame_captured_through_one_member_restores_byte_identical_from_another() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("service");
    std::fs::create_dir_all(root.join("conf")).unwrap();
    std::fs::write(root.join("conf/app.conf"), "workers = 4\nport = 8080\n").unwrap();
    std::fs::write(root.join("big.bin"), kairos_tests::bytes(7, 3 << 20)).unwrap();
    for i in 0..50 {
        std::fs::write(root.join(format!("file-{i}.txt")), format!("file {i}\n")).unwrap();
    }
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let status = cluster.status(&cluster.urls[0]).expect("a status");
    assert!(status["leader"].is_u64(), "{status}");
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    // Registered through member 2, captured through member 3, read and restored
    // through member 1.
    let (code, body) = post(
        &format!("{}/api/replicas", cluster.urls[1]),
        &json!({"name": "web", "root": root, "capture_interval": "1h"}),
    );
    assert_eq!(code, 201, "{body}");
    // At once: member 3 catches up with what member 2 acknowledged.
    let (code, captured) = post(
        &format!("{}/api/replicas/web/capture", cluster.urls[2]),
        &json!({}),
    );
    assert!(code == 200 || code == 201, "{code} {captured}");
    let frame = captured["frame"].as_str().expect("a frame id").to_string();
    let history = wait_for("the frame on member 1", Duration::from_secs(10), || {
        let (code, body) = get(&format!("{}/api/replicas/web/history", cluster.urls[0]));
        (code == 200 && body.to_string().contains(&frame)).then_some(body)
    });
    assert!(history.to_string().contains(&frame));
    let out = work.path().join("restored");
    let kairos = Kairos::new();
    kairos.ok([
        "--node",
        cluster.urls[0].as_str(),
        "restore",
        "web",
        "--at",
        &frame[..12],
        "--into",
        out.to_str().unwrap(),
    ]);
    assert_eq!(tree_listing(&root), tree_listing(&out));
    // The status names the leader, every member's process, and where `web` is watched.
    let status = wait_for("web placed", Duration::from_secs(10), || {
        let status = cluster.status(&cluster.urls[2])?;
        status["placement"]["web"].is_u64().then_some(status)
    });
    for member in status["members"].as_array().unwrap() {
        assert!(member["pid"].is_u64(), "{status}");
        assert!(
            ["leader", "follower"].contains(&member["state"].as_str().unwrap()),
            "{status}"
        );
    }
    // Captures through every member at the same instant all store or find a frame:
    // one that loses the race to another member's takes it again.
    std::fs::write(root.join("conf/app.conf"), "workers = 8\n").unwrap();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..9)
            .map(|i| {
                let url = format!("{}/api/replicas/web/capture", cluster.urls[i % 3]);
                scope.spawn(move || post(&url, &json!({})))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (code, body) in &answers {
        assert!(*code == 200 || *code == 201, "{code} {body}");
    }
    let text = kairos.ok(["--node", cluster.urls[1].as_str(), "cluster", "status"]);
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("leader") && text.contains("web -> node"),
        "{text}"
    );
}

#[test]
fn killing_the_leader_loses_no_acknowledged_command_and_its_replica_moves() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("service");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "x = 1\n").unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let (code, body) = post(
        &format!("{}/api/replicas", cluster.urls[0]),
        &json!({"name": "web", "root": root, "capture_interval": "1h"}),
    );
    assert_eq!(code, 201, "{body}");
    let status = wait_for("a leader and web placed", Duration::from_secs(20), || {
        let status = cluster.status(&cluster.urls[0])?;
        (status["leader"].is_u64() && status["placement"]["web"].is_u64()).then_some(status)
    });
    let leader = status["leader"].as_u64().unwrap();
    let leader_pid = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == leader)
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    let survivors: Vec<&String> = cluster
        .urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, url)| url)
        .collect();
    // Timelines forked through a follower, one after the other; the leader is killed
    // after the tenth. Every fork acknowledged (201) must exist afterwards.
    wait_for(
        "a capture through a follower",
        Duration::from_secs(20),
        || {
            let (code, _) = post(
                &format!("{}/api/replicas/web/capture", survivors[0]),
                &json!({}),
            );
            (code == 200 || code == 201).then_some(())
        },
    );
    // Status asked of every member all along (two nested reads of the log's figures
    // once locked a member up).
    let polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pollers: Vec<_> = cluster
        .urls
        .iter()
        .map(|url| {
            let url = url.clone();
            let polling = polling.clone();
            std::thread::spawn(move || {
                while polling.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Node::agent().get(format!("{url}/api/cluster")).call();
                }
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    let mut killed_at = None;
    for i in 0..40 {
        if i == 10 {
            // SAFETY: kill(2) takes only a pid and a signal number.
            unsafe { libc::kill(leader_pid as i32, libc::SIGKILL) };
            killed_at = Some(Instant::now());
        }
        let name = format!("t{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = post(
                &format!("{}/api/replicas/web/timelines", survivors[0]),
                &json!({"name": name, "at": "latest"}),
            );
            if code == 201 {
                acknowledged.push(name.clone());
                break;
            }
            if code == 409 && body.to_string().contains("already exists") {
                // Taken by an earlier attempt whose answer was lost: it counts.
                acknowledged.push(name.clone());
                break;
            }
            assert!(
                code == 503 && Instant::now() < deadline,
                "fork {name}: {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let failover = killed_at.unwrap().elapsed();
    polling.store(false, std::sync::atomic::Ordering::Relaxed);
    for poller in pollers {
        poller.join().unwrap();
    }
    let status = wait_for("a new leader", Duration::from_secs(10), || {
        let status = cluster.status(survivors[0])?;
        (status["leader"].is_u64() && status["leader"] != leader).then_some(status)
    });
    assert_ne!(status["leader"], leader);
    for url in &survivors {
        let (code, body) = get(&format!("{url}/api/replicas/web/timelines"));
        assert_eq!(code, 200, "{body}");
        for name in &acknowledged {
            assert!(
                body.to_string().contains(&format!("\"{name}\"")),
                "{url} lacks {name}: {body}"
            );
        }
    }
    // The killed member's replicas go to a live member.
    let moved = wait_for("web re-placed", Duration::from_secs(20), || {
        let status = cluster.status(survivors[0])?;
        let node = status["placement"]["web"].as_u64()?;
        (node != leader).then_some(node)
    });
    assert_ne!(moved, leader);
    eprintln!("forks: 40 acknowledged; leader killed, all 40 done {failover:?} later");
}

#[test]
fn a_member_of_another_cluster_or_with_a_taken_id_is_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let secret = std::fs::read_to_string(work.path().join("cluster/secret")).unwrap();
    let start = |id: u64, secret: &str, name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), secret).unwrap();
        let config = format!(
            "[cluster]\nnode_id = {id}\nsecret_file = \"{}\"\n",
            dir.join("secret").display()
        );
        Node::start(&config, &dir.join("data"))
    };
    // An id already taken (2), with the right secret.
    let twin = start(2, &secret, "twin");
    let (code, body) = post(
        &format!("{}/api/cluster/join", twin.url),
        &json!({"address": cluster.urls[0]}),
    );
    assert_eq!(code, 502, "{body}");
    assert!(body.to_string().contains("already a member"), "{body}");
    // An address nobody answers at.
    let dir = work.path().join("elsewhere");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), &secret).unwrap();
    let elsewhere = Node::start(
        &format!(
            "[cluster]\nnode_id = 8\nadvertise = \"http://127.0.0.1:1\"\nsecret_file = \"{}\"\n",
            dir.join("secret").display()
        ),
        &dir.join("data"),
    );
    let (code, body) = post(
        &format!("{}/api/cluster/join", elsewhere.url),
        &json!({"address": cluster.urls[0]}),
    );
    assert_eq!(code, 502, "{body}");
    assert!(
        body.to_string()
            .contains("cannot reach node 8 at http://127.0.0.1:1"),
        "{body}"
    );
    // The wrong secret.
    let stranger = start(7, "a-secret-of-another-cluster-000", "stranger");
    let (code, body) = post(
        &format!("{}/api/cluster/join", stranger.url),
        &json!({"address": cluster.urls[0]}),
    );
    assert_eq!(code, 502, "{body}");
    assert!(body.to_string().contains("secret"), "{body}");
    // A raft request naming another cluster is refused by name.
    let mut response = Node::agent()
        .post(format!("{}/cluster/raft/vote", cluster.urls[0]))
        .header("authorization", format!("Bearer {}", secret.trim()))
        .header("kairos-cluster", "0000another0000")
        .send_json(json!({}))
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);
    let body: Value = response.body_mut().read_json().unwrap();
    assert!(
        body.to_string().contains("not to cluster 0000another0000"),
        "{body}"
    );
    // Without the secret, nothing between members is accepted.
    let (code, body) = post(&format!("{}/cluster/hello", cluster.urls[0]), &json!({}));
    assert_eq!(code, 401, "{body}");
    // Bad bodies are answered as every other error (JSON, named), between members and on
    // the admin API; a batch is made by the leader, never taken from a member.
    let status = cluster.status(&cluster.urls[0]).unwrap();
    let leader_url = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|member| member["id"] == status["leader"])
        .map(|member| member["api"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("a leader: {status}"));
    let cluster_id = status["cluster_id"].as_str().unwrap().to_string();
    for (path, body, code, named) in [
        ("/cluster/submit", "{not json", 400, "bad_body"),
        ("/cluster/submit", "[1, 2]", 400, "bad_body"),
        (
            "/cluster/submit",
            r#"{"kind": "batch", "requests": []}"#,
            400,
            "batch_not_accepted",
        ),
        (
            "/cluster/submit",
            r#"{"kind": "once", "id": "ab", "request": {"kind": "batch", "requests": []}}"#,
            400,
            "batch_not_accepted",
        ),
        (
            "/cluster/submit",
            r#"{"kind": "once", "id": "zz", "request": {"kind": "place", "replica": "web", "node": 1, "reason": "x", "time": "2026-01-01T00:00:00Z"}}"#,
            400,
            "bad_request_id",
        ),
        (
            "/cluster/submit",
            r#"{"kind": "place", "replica": "web", "node": 999, "reason": "x", "time": "2026-01-01T00:00:00Z"}"#,
            400,
            "unknown_member",
        ),
        (
            "/cluster/submit",
            r#"{"kind": "once", "id": "ab", "request": {"kind": "place", "replica": "no-such", "node": 1, "reason": "x", "time": "2026-01-01T00:00:00Z"}}"#,
            400,
            "unknown_replica",
        ),
        ("/cluster/raft/append", "{}", 400, "bad_body"),
    ] {
        let mut response = Node::agent()
            .post(format!("{leader_url}{path}"))
            .header("authorization", format!("Bearer {}", secret.trim()))
            .header("kairos-cluster", cluster_id.as_str())
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        assert_eq!(response.status().as_u16(), code, "{path} {body}");
        let answer: Value = response.body_mut().read_json().unwrap();
        assert_eq!(answer["error"]["code"], named, "{path} {body}: {answer}");
    }
    let mut response = Node::agent()
        .post(format!("{}/api/cluster/join", cluster.urls[0]))
        .header("content-type", "application/json")
        .send("{\"address\": ")
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.body_mut().read_json().unwrap();
    assert_eq!(answer["error"]["code"], "bad_body", "{answer}");
    // The cluster is unharmed.
    let status = cluster.status(&cluster.urls[1]).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
}

/// A member started again by hand in its directory under the cluster's (as the script
/// started it), killed when dropped.
struct Restarted(Child);

impl Restarted {
    fn start(cluster_dir: &Path, member: u64) -> Restarted {
        let dir = cluster_dir.join(format!("node-{member}"));
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("log"))
            .unwrap();
        let child = Command::new(kairos_bin())
            .args(["--config", "kairos.toml", "up"])
            .current_dir(&dir)
            .env_remove("KAIROS_NODE")
            .env_remove("KAIROS_DATA_DIR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Restarted(child)
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Forks timeline `name` of `web` through `url`, retrying while the cluster has no
/// leader; whether it was acknowledged.
fn fork(url: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = post(
            &format!("{url}/api/replicas/web/timelines"),
            &json!({"name": name, "at": "latest"}),
        );
        if code == 201 || (code == 409 && body.to_string().contains("already exists")) {
            return;
        }
        assert!(
            code == 503 && Instant::now() < deadline,
            "fork {name}: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The timelines of `web` as a member lists them (`None` while it does not answer).
fn timelines(url: &str) -> Option<String> {
    let mut response = Node::agent()
        .get(format!("{url}/api/replicas/web/timelines"))
        .call()
        .ok()?;
    if response.status().as_u16() != 200 {
        return None;
    }
    response.body_mut().read_to_string().ok()
}

fn pid_of(status: &Value, member: u64) -> i32 {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == member)
        .unwrap()["pid"]
        .as_u64()
        .unwrap() as i32
}

/// A cluster with `web` registered and captured once; its status.
fn with_web(cluster: &LocalCluster, root: &Path) -> Value {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("app.conf"), "x = 1\n").unwrap();
    let (code, body) = post(
        &format!("{}/api/replicas", cluster.urls[0]),
        &json!({"name": "web", "root": root, "capture_interval": "1h"}),
    );
    assert_eq!(code, 201, "{body}");
    wait_for("a first capture", Duration::from_secs(20), || {
        let (code, _) = post(
            &format!("{}/api/replicas/web/capture", cluster.urls[0]),
            &json!({}),
        );
        (code == 200 || code == 201).then_some(())
    });
    wait_for("a leader", Duration::from_secs(10), || {
        let status = cluster.status(&cluster.urls[0])?;
        status["leader"].is_u64().then_some(status)
    })
}

#[test]
fn a_member_that_missed_more_than_the_log_keeps_catches_up_from_a_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let cluster_dir = work.path().join("cluster");
    let cluster = {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster");
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .arg(&cluster_dir)
            .arg("3")
            .env("KAIROS_BIN", kairos_bin())
            .env("KAIROS_CLUSTER_SETTINGS", "snapshot_every = 20")
            .env_remove("KAIROS_NODE")
            .env_remove("KAIROS_DATA_DIR")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut script = command.spawn().unwrap();
        let mut stdout = std::io::BufReader::new(script.stdout.take().unwrap());
        let urls = (0..3)
            .map(|_| {
                let mut line = String::new();
                stdout.read_line(&mut line).unwrap();
                line.trim().to_string()
            })
            .collect();
        LocalCluster {
            script,
            urls,
            dir: cluster_dir.clone(),
        }
    };
    let status = with_web(&cluster, &work.path().join("service"));
    let leader = status["leader"].as_u64().unwrap();
    // A follower stops; 60 commands go by (three snapshots' worth); it starts again.
    let away = (1..=3).find(|id| *id != leader).unwrap();
    let here = (1..=3).find(|id| *id != leader && *id != away).unwrap();
    // SAFETY: kill(2) takes only a pid and a signal number.
    unsafe { libc::kill(pid_of(&status, away), libc::SIGKILL) };
    for i in 0..60 {
        fork(&cluster.urls[here as usize - 1], &format!("s{i}"));
    }
    let _restarted = Restarted::start(&cluster_dir, away);
    let url = cluster.urls[away as usize - 1].clone();
    wait_for("the member to catch up", Duration::from_secs(30), || {
        let listed = timelines(&url)?;
        (0..60)
            .all(|i| listed.contains(&format!("\"s{i}\"")))
            .then_some(())
    });
    let status = wait_for("the status of the member", Duration::from_secs(10), || {
        let status = cluster.status(&url)?;
        let member = status["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == away)?
            .clone();
        (member["state"] == "follower").then_some(member)
    });
    assert!(status["snapshot"].as_u64().is_some(), "{status}");
}

#[test]
fn a_member_removed_and_added_again_catches_up() {
    let work = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    with_web(&cluster, &work.path().join("service"));
    let kairos = Kairos::new();
    let answer = kairos.json([
        "--node",
        cluster.urls[0].as_str(),
        "cluster",
        "leave",
        "3",
        "--json",
    ]);
    assert_eq!(answer["members"].as_array().unwrap().len(), 2, "{answer}");
    for i in 0..10 {
        fork(&cluster.urls[0], &format!("r{i}"));
    }
    // Member 3 no longer takes part: what it shows stops at its removal.
    let answer = kairos.json([
        "--node",
        cluster.urls[2].as_str(),
        "cluster",
        "join",
        cluster.urls[1].as_str(),
        "--json",
    ]);
    assert_eq!(answer["members"].as_array().unwrap().len(), 3, "{answer}");
    wait_for("member 3 to catch up", Duration::from_secs(20), || {
        let listed = timelines(&cluster.urls[2])?;
        (0..10)
            .all(|i| listed.contains(&format!("\"r{i}\"")))
            .then_some(())
    });
    // An unknown member is named.
    let refused = kairos.fails(["--node", cluster.urls[0].as_str(), "cluster", "leave", "9"]);
    assert!(refused.contains("node 9 is not a member"), "{refused}");
    // The leader does not leave: the leadership moves first.
    let status = cluster.status(&cluster.urls[0]).unwrap();
    let leader = status["leader"].as_u64().unwrap();
    let refused = kairos.fails([
        "--node",
        cluster.urls[0].as_str(),
        "cluster",
        "leave",
        &leader.to_string(),
    ]);
    assert!(refused.contains("move the leadership first"), "{refused}");
    let target = (1..=3).find(|id| *id != leader).unwrap();
    let moved = kairos.json([
        "--node",
        cluster.urls[0].as_str(),
        "cluster",
        "transfer-leader",
        &target.to_string(),
        "--json",
    ]);
    assert_eq!(moved["leader"], target, "{moved}");
    wait_for(
        "every member to follow the new leader",
        Duration::from_secs(10),
        || {
            cluster
                .urls
                .iter()
                .all(|url| {
                    cluster
                        .status(url)
                        .is_some_and(|status| status["leader"] == target)
                })
                .then_some(())
        },
    );
    kairos.ok([
        "--node",
        cluster.urls[0].as_str(),
        "cluster",
        "leave",
        &leader.to_string(),
    ]);
    let status = wait_for("two members", Duration::from_secs(10), || {
        let status = cluster.status(&cluster.urls[target as usize - 1])?;
        (status["members"].as_array()?.len() == 2).then_some(status)
    });
    assert_eq!(status["leader"], target, "{status}");
}

#[test]
fn a_paused_leader_yields_one_leader_and_loses_no_acknowledged_command() {
    let work = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let status = with_web(&cluster, &work.path().join("service"));
    let leader = status["leader"].as_u64().unwrap();
    let pid = pid_of(&status, leader);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let url = cluster.urls[follower as usize - 1].clone();
    // The leader stops answering anyone (as if cut off), the others go on, then it
    // comes back and must follow.
    // SAFETY: kill(2) takes only a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for i in 0..15 {
        fork(&url, &format!("p{i}"));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for i in 15..20 {
        fork(&cluster.urls[leader as usize - 1], &format!("p{i}"));
    }
    let agreed = wait_for("one leader seen by all", Duration::from_secs(20), || {
        let views: Vec<Value> = cluster
            .urls
            .iter()
            .map(|url| {
                let (_, hello) = get_hello(url, &work.path().join("cluster/secret"));
                hello
            })
            .collect();
        let leaders: std::collections::BTreeSet<String> =
            views.iter().map(|v| v["leader"].to_string()).collect();
        (leaders.len() == 1 && !leaders.contains("null")).then_some(views)
    });
    assert_ne!(agreed[0]["leader"], leader, "{agreed:?}");
    for url in &cluster.urls {
        wait_for(
            "every fork on every member",
            Duration::from_secs(20),
            || {
                let listed = timelines(url)?;
                (0..20)
                    .all(|i| listed.contains(&format!("\"p{i}\"")))
                    .then_some(())
            },
        );
    }
}

/// Three members that reach each other through [`PartitionProxy`]s, with `web` registered,
/// captured once and its first frame on every member; the status.
fn proxied_cluster(work: &Path) -> (PartitionProxy, LocalCluster, Value) {
    let port = port_free_on_three();
    let targets: Vec<std::net::SocketAddr> = (1..=3)
        .map(|i| format!("127.0.0.{i}:{port}").parse().unwrap())
        .collect();
    let proxy = PartitionProxy::start(&targets);
    let cluster = LocalCluster::start_with(
        &work.join("cluster"),
        None,
        &[
            ("KAIROS_CLUSTER_PORT", port.to_string()),
            ("KAIROS_CLUSTER_ADVERTISE", proxy.urls.join(" ")),
        ],
    );
    let status = with_web(&cluster, &work.join("service"));
    for member in status["members"].as_array().unwrap() {
        assert!(
            proxy
                .urls
                .contains(&member["api"].as_str().unwrap().to_string()),
            "members reach each other through the proxies: {status}"
        );
    }
    // Every member has web and its first frame (what was committed on two members only
    // would be the third's to catch up with, not these tests' subject).
    for url in &cluster.urls {
        wait_for(
            "web's first frame on every member",
            Duration::from_secs(20),
            || {
                let (code, history) = get(&format!("{url}/api/replicas/web/history"));
                (code == 200 && history.as_array().is_some_and(|frames| !frames.is_empty()))
                    .then_some(())
            },
        );
    }
    (proxy, cluster, status)
}

/// A member whose answers are garbage, then one that answers very slowly (a proxy in
/// front of it): the others go on taking commands, the status names the member that
/// answers garbage as unreachable, no member dies, and once it answers properly again it
/// has every command.
#[test]
fn a_member_that_answers_garbage_or_very_slowly_is_named_and_the_others_go_on() {
    let work = tempfile::tempdir().unwrap();
    let (proxy, cluster, status) = proxied_cluster(work.path());
    let leader = status["leader"].as_u64().unwrap();
    let odd = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != odd).unwrap();
    let other_url = cluster.urls[other as usize - 1].clone();
    proxy.garble(odd);
    for i in 0..10 {
        fork(&other_url, &format!("g{i}"));
    }
    wait_for(
        "the member answering garbage named",
        Duration::from_secs(20),
        || {
            let status = cluster.status(&other_url)?;
            let member = status["members"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == odd)?
                .clone();
            (member["state"] == "unreachable").then_some(())
        },
    );
    proxy.heal();
    proxy.slow_down(odd, Duration::from_secs(3));
    let started = Instant::now();
    for i in 0..10 {
        fork(&other_url, &format!("s{i}"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "a slow member does not hold the others up: {:?}",
        started.elapsed()
    );
    proxy.heal();
    for url in &cluster.urls {
        wait_for(
            "every fork on every member",
            Duration::from_secs(30),
            || {
                let listed = timelines(url)?;
                (0..10)
                    .all(|i| {
                        listed.contains(&format!("\"g{i}\""))
                            && listed.contains(&format!("\"s{i}\""))
                    })
                    .then_some(())
            },
        );
    }
    for member in status["members"].as_array().unwrap() {
        let pid = member["pid"].as_u64().unwrap() as i32;
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(alive, "member {} still runs", member["id"]);
    }
}

/// A replica pinned to its host (`host`, by member id or by the host of a member's
/// address) is placed on that member, and left there when that member dies; a host that
/// is no proper name is refused by name.
#[test]
fn a_replica_pinned_to_its_host_is_placed_there_and_stays_when_its_member_dies() {
    let work = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let status = wait_for("a leader", Duration::from_secs(10), || {
        let status = cluster.status(&cluster.urls[0])?;
        status["leader"].is_u64().then_some(status)
    });
    let leader = status["leader"].as_u64().unwrap();
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let asked = &cluster.urls[leader as usize - 1];
    let register = |name: &str, host: &str| {
        let root = work.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.conf"), "x = 1\n").unwrap();
        post(
            &format!("{asked}/api/replicas"),
            &json!({"name": name, "root": root, "capture_interval": "1h", "settings": {"host": host}}),
        )
    };
    let (code, body) = register("by-id", &others[0].to_string());
    assert_eq!(code, 201, "{body}");
    let (code, body) = register("by-name", &format!("127.0.0.{}", others[1]));
    assert_eq!(code, 201, "{body}");
    let (code, body) = register("bad", "not a host!");
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("host"), "{body}");
    wait_for(
        "both placed on their hosts",
        Duration::from_secs(20),
        || {
            let status = cluster.status(asked)?;
            (status["placement"]["by-id"] == others[0]
                && status["placement"]["by-name"] == others[1])
                .then_some(())
        },
    );
    // SAFETY: kill(2) takes only a pid and a signal number.
    unsafe { libc::kill(pid_of(&status, others[0]), libc::SIGKILL) };
    wait_for("the dead member seen", Duration::from_secs(20), || {
        let status = cluster.status(asked)?;
        let member = status["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == others[0])?
            .clone();
        (member["state"] == "unreachable").then_some(())
    });
    // Past the time after which an unpinned replica would have moved.
    std::thread::sleep(PLACEMENT_GRACE_IN_TESTS);
    let status = cluster.status(asked).unwrap();
    assert_eq!(status["placement"]["by-id"], others[0], "{status}");
    assert_eq!(status["placement"]["by-name"], others[1], "{status}");
}

/// A little more than a node's `PLACEMENT_GRACE` (3 s) and one pass of its loop.
const PLACEMENT_GRACE_IN_TESTS: Duration = Duration::from_secs(5);

/// Three members with one sandbox slot each, `web` registered through member 1 with
/// `check`, captured once, and three proposals on it, known to every member; their ids.
fn sandbox_cluster(work: &Path, check: &str) -> (LocalCluster, Vec<String>) {
    let cluster = LocalCluster::start_with(
        &work.join("cluster"),
        None,
        &[("KAIROS_NODE_SETTINGS", "sandbox_slots = 1".into())],
    );
    let root = work.join("service");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "x = 1\n").unwrap();
    let asked = cluster.urls[0].clone();
    let (code, body) = post(
        &format!("{asked}/api/replicas"),
        &json!({"name": "web", "root": root, "capture_interval": "1h", "settings": {"check": check}}),
    );
    assert_eq!(code, 201, "{body}");
    wait_for("a first capture", Duration::from_secs(20), || {
        let (code, _) = post(&format!("{asked}/api/replicas/web/capture"), &json!({}));
        (code == 200 || code == 201).then_some(())
    });
    let proposals: Vec<String> = (2..5)
        .map(|i| {
            let (code, body) = post(
                &format!("{asked}/api/replicas/web/proposals"),
                &json!({"document": {"title": format!("x {i}"),
                        "ops": [{"op": "set_config", "file": "app.conf", "key": "x", "value": i}]}}),
            );
            assert_eq!(code, 201, "{body}");
            body["proposal"].as_str().unwrap().to_string()
        })
        .collect();
    for url in &cluster.urls {
        for proposal in &proposals {
            wait_for(
                "the proposal on every member",
                Duration::from_secs(20),
                || {
                    let (code, _) = get(&format!("{url}/api/replicas/web/proposals/{proposal}"));
                    (code == 200).then_some(())
                },
            );
        }
    }
    (cluster, proposals)
}

/// Asks `url` to sandbox `proposal` of `web` with its check, in a thread (`kept`: as if
/// handed over already, so it runs there); the status, the member the answer names, the
/// time it took and the answer.
fn sandbox_on(
    url: &str,
    proposal: &str,
    kept: bool,
    barrier: Option<std::sync::Arc<std::sync::Barrier>>,
) -> std::thread::JoinHandle<(u16, Option<String>, Duration, Value)> {
    let url = format!("{url}/api/replicas/web/proposals/{proposal}/sandbox");
    std::thread::spawn(move || {
        if let Some(barrier) = barrier {
            barrier.wait();
        }
        let mut request = Node::agent().post(&url);
        if kept {
            request = request.header("kairos-forwarded-by", "0");
        }
        let started = Instant::now();
        let mut response = request.send_json(json!({"run_check": true})).unwrap();
        let member = response
            .headers()
            .get("kairos-sandbox-member")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        (status, member, started.elapsed(), body)
    })
}

/// A member that stops answering while it runs a sandbox handed to it (stopped with
/// SIGSTOP: its connections stay open, nothing comes back) is given up on within seconds,
/// and the sandbox runs on the member asked after all.
#[test]
fn a_sandbox_handed_to_a_member_that_stops_answering_runs_where_it_was_asked() {
    let work = tempfile::tempdir().unwrap();
    let (cluster, ids) = sandbox_cluster(work.path(), "sleep 3");
    let secret = work.path().join("cluster/secret");
    let asked = cluster.urls[0].clone();
    let running = |member: usize| {
        get_hello(&cluster.urls[member - 1], &secret).1["sandboxes"]["running"].as_u64()
    };
    // Members 1 and 2 each run one (their one slot); the next asked of member 1 goes to 3.
    let first = sandbox_on(&asked, &ids[0], true, None);
    let second = sandbox_on(&cluster.urls[1], &ids[1], true, None);
    wait_for("members 1 and 2 busy", Duration::from_secs(10), || {
        (running(1) == Some(1) && running(2) == Some(1)).then_some(())
    });
    let handed = sandbox_on(&asked, &ids[2], false, None);
    wait_for(
        "member 3 running the one handed to it",
        Duration::from_secs(10),
        || (running(3) == Some(1)).then_some(()),
    );
    let status = cluster.status(&asked).unwrap();
    let pid = pid_of(&status, 3);
    // SAFETY: kill(2) takes only a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (code, member, took, _) = handed.join().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(code, 200);
    assert_eq!(
        member.as_deref(),
        Some("1"),
        "run where it was asked after all"
    );
    assert!(
        took < Duration::from_secs(20),
        "given up on within seconds: {took:?}"
    );
    for run in [first, second] {
        assert_eq!(run.join().unwrap().0, 200);
    }
}

/// A port free on 127.0.0.1, .2 and .3 at once.
fn port_free_on_three() -> u16 {
    for _ in 0..200 {
        let port = kairos_tests::free_port();
        let held: Vec<_> = (1..=3)
            .filter_map(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:{port}")).ok())
            .collect();
        if held.len() == 3 {
            return port;
        }
    }
    panic!("no port is free on 127.0.0.1-3");
}

/// The leader cut off by the network (a proxy between the members drops what it sends and
/// what is sent to it, without closing anything): the others elect a leader and go on,
/// no term ever has two leaders, the cut-off leader acknowledges nothing on its own, and
/// once the cut heals it follows and every acknowledged command is on every member.
#[test]
fn a_leader_cut_off_by_the_network_yields_one_leader_and_loses_no_acknowledged_command() {
    let work = tempfile::tempdir().unwrap();
    let (proxy, cluster, status) = proxied_cluster(work.path());
    let leader = status["leader"].as_u64().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let follower_url = cluster.urls[follower as usize - 1].clone();
    let leader_url = cluster.urls[leader as usize - 1].clone();
    // Who leads which term, as each member sees itself, all along.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let secret = work.path().join("cluster/secret");
    let watcher = {
        let (watching, urls, secret) = (watching.clone(), cluster.urls.clone(), secret.clone());
        std::thread::spawn(move || {
            let mut leaders: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
                Default::default();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for url in &urls {
                    let (code, hello) = get_hello(url, &secret);
                    if code == 200 && hello["leader"] == hello["node_id"] {
                        leaders
                            .entry(hello["term"].as_u64().unwrap())
                            .or_default()
                            .insert(hello["node_id"].as_u64().unwrap());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            leaders
        })
    };
    proxy.cut_off(leader);
    // A command sent to the cut-off leader cannot reach a majority.
    let stranded = std::thread::spawn(move || {
        post(
            &format!("{leader_url}/api/replicas/web/timelines"),
            &json!({"name": "stranded", "at": "latest"}),
        )
    });
    for i in 0..15 {
        fork(&follower_url, &format!("p{i}"));
    }
    let majority = wait_for(
        "a leader among the other two",
        Duration::from_secs(20),
        || {
            let status = cluster.status(&follower_url)?;
            status["leader"]
                .as_u64()
                .filter(|id| *id != leader)
                .map(|_| status)
        },
    );
    assert!(
        !timelines(&cluster.urls[leader as usize - 1])
            .unwrap_or_default()
            .contains("\"p0\""),
        "the cut-off member saw nothing of what the others did"
    );
    proxy.heal();
    let (stranded_code, stranded_body) = stranded.join().unwrap();
    for i in 15..20 {
        fork(&cluster.urls[leader as usize - 1], &format!("p{i}"));
    }
    let agreed = wait_for("one leader seen by all", Duration::from_secs(20), || {
        let views: Vec<Value> = cluster
            .urls
            .iter()
            .map(|url| get_hello(url, &secret).1)
            .collect();
        let leaders: std::collections::BTreeSet<String> =
            views.iter().map(|v| v["leader"].to_string()).collect();
        (leaders.len() == 1 && !leaders.contains("null")).then_some(views)
    });
    assert_ne!(
        agreed[0]["leader"], leader,
        "{agreed:?} (before: {majority})"
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let leaders = watcher.join().unwrap();
    for (term, members) in &leaders {
        assert!(members.len() == 1, "term {term} had leaders {members:?}");
    }
    for url in &cluster.urls {
        wait_for(
            "every fork on every member",
            Duration::from_secs(20),
            || {
                let listed = timelines(url)?;
                let stranded_there = listed.contains("\"stranded\"");
                ((0..20).all(|i| listed.contains(&format!("\"p{i}\"")))
                    && (stranded_code != 201 || stranded_there))
                    .then_some(())
            },
        );
    }
    // Answered or not, the command sent to the cut-off leader is applied at most once:
    // a success means the new leader took it (forwarded once the cut healed).
    assert!(
        [201, 503].contains(&stranded_code),
        "{stranded_code} {stranded_body}"
    );
}

/// A node that ran alone holds what never went through a cluster's log (replicas, frames,
/// parties written directly): when it forms a cluster, every member that joins starts from
/// a snapshot of its whole catalog, so all of it is on every member.
#[test]
fn what_a_node_held_before_the_cluster_formed_reaches_every_member_that_joins() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("service");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "x = 1\n").unwrap();
    let first = Kairos::at(&work.path().join("node-1"));
    first.add_idle_replica("web", &root);
    first.ok(["capture", "web"]);
    first.ok(["party", "add", "alice", "--role", "viewer"]);
    let admin: Value = first.json(["party", "add", "ops", "--role", "admin", "--json"]);
    let token = admin["token"].as_str().unwrap().to_string();
    let frames = first.json(["history", "web", "--json"]);
    std::fs::write(
        work.path().join("secret"),
        "a-shared-secret-of-the-members\n",
    )
    .unwrap();
    let ports = [kairos_tests::free_port(), kairos_tests::free_port()];
    let config = |id: usize| {
        format!(
            "[cluster]\nnode_id = {id}\nadvertise = \"http://127.0.0.1:{}\"\nsecret_file = \"{}\"\n",
            ports[id - 1],
            work.path().join("secret").display()
        )
    };
    let listen = |id: usize| format!("127.0.0.1:{}", ports[id - 1]);
    let node_1 = Node::start_on(&config(1), &work.path().join("node-1"), &[], &listen(1));
    let kairos = Kairos::new();
    let with_token = ["--token", token.as_str(), "--node"];
    kairos.ok([&with_token[..], &[node_1.url.as_str(), "cluster", "init"]].concat());
    let node_2 = Node::start_on(&config(2), &work.path().join("node-2"), &[], &listen(2));
    kairos.ok([
        &with_token[..],
        &[node_2.url.as_str(), "cluster", "join", node_1.url.as_str()],
    ]
    .concat());
    let asked = [
        &with_token[..],
        &[node_2.url.as_str(), "history", "web", "--json"],
    ]
    .concat();
    let history = wait_for(
        "web's frames on the member that joined",
        Duration::from_secs(20),
        || {
            let out = kairos.run(&asked);
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
        },
    );
    assert_eq!(history, frames);
    let parties = kairos.json(
        [
            &with_token[..],
            &[node_2.url.as_str(), "party", "list", "--json"],
        ]
        .concat(),
    );
    assert!(parties.to_string().contains("alice"), "{parties}");
    let out = work.path().join("restored");
    kairos.ok([
        &with_token[..],
        &[
            node_2.url.as_str(),
            "restore",
            "web",
            "--at",
            "latest",
            "--into",
            out.to_str().unwrap(),
        ],
    ]
    .concat());
    assert_eq!(tree_listing(&root), tree_listing(&out));
}

/// A member whose sandbox slots are all taken hands the next sandbox to the member with a
/// free one: three sandboxes asked of one member at once, with one slot each, run on
/// three members (each answer names where it ran) and each check passes.
#[test]
fn sandboxes_beyond_a_members_slots_run_on_members_with_free_ones() {
    let work = tempfile::tempdir().unwrap();
    let (cluster, proposals) = sandbox_cluster(work.path(), "sleep 1");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(proposals.len()));
    let runs: Vec<_> = proposals
        .iter()
        .map(|proposal| sandbox_on(&cluster.urls[0], proposal, false, Some(barrier.clone())))
        .collect();
    let mut members = std::collections::BTreeSet::new();
    for run in runs {
        let (status, member, _, body) = run.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["check"]["passed"], true, "{body}");
        members.insert(member.expect("the answer names the member it ran on"));
    }
    assert!(members.len() >= 2, "ran on {members:?}");
    assert!(
        members.contains("1"),
        "one ran on the member asked: {members:?}"
    );
}

/// A capture through a member answers once its frame's objects are on
/// `cluster.replication` members (2 of 3 by default): that member killed (-9) right after
/// the answer, the frame still restores byte-identical from each of the others.
#[test]
fn a_captured_frame_is_held_until_two_members_have_it_and_outlives_its_member() {
    let work = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&work.path().join("cluster"), None);
    let root = work.path().join("service");
    let status = with_web(&cluster, &root);
    std::fs::write(root.join("big.bin"), kairos_tests::bytes(11, 2 << 20)).unwrap();
    for i in 0..30 {
        std::fs::write(root.join(format!("file-{i}.txt")), format!("file {i}\n")).unwrap();
    }
    // Captured through a member that is not the leader (the leader's death would also
    // be a failover; this is about the objects).
    let leader = status["leader"].as_u64().unwrap();
    let member = (1..=3).find(|id| *id != leader).unwrap();
    let (code, captured) = post(
        &format!(
            "{}/api/replicas/web/capture",
            cluster.urls[member as usize - 1]
        ),
        &json!({}),
    );
    assert!(code == 200 || code == 201, "{code} {captured}");
    assert_eq!(
        captured["durable"],
        json!({"copies": 2, "required": 2, "durable": true}),
        "{captured}"
    );
    let frame = captured["frame"].as_str().unwrap().to_string();
    // SAFETY: kill(2) takes only a pid and a signal number.
    unsafe { libc::kill(pid_of(&status, member), libc::SIGKILL) };
    let kairos = Kairos::new();
    for other in (1..=3).filter(|id| *id != member) {
        let url = &cluster.urls[other as usize - 1];
        wait_for("the frame on the member", Duration::from_secs(20), || {
            let (code, body) = get(&format!("{url}/api/replicas/web/history"));
            (code == 200 && body.to_string().contains(&frame)).then_some(())
        });
        let out = work.path().join(format!("restored-{other}"));
        kairos.ok([
            "--node",
            url.as_str(),
            "restore",
            "web",
            "--at",
            &frame[..12],
            "--into",
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            tree_listing(&root),
            tree_listing(&out),
            "restored through {other}"
        );
    }
}

/// A member whose clock is an hour ahead (run under libfaketime): the status gives each
/// member's clock offset and warns of it, the frames that member captures carry its own
/// time, and time specs asked of any member resolve by the frames' recorded times.
#[test]
fn a_member_whose_clock_is_an_hour_ahead_is_named_and_time_specs_follow_recorded_times() {
    let work = tempfile::tempdir().unwrap();
    let faketime = kairos_tests::services::binary("faketime", "faketime");
    let wrapper = work.path().join("kairos-member-3-ahead");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$PWD\" in */node-3) exec '{}' -f +1h '{}' \"$@\";; esac\nexec '{}' \"$@\"\n",
            faketime.display(),
            kairos_bin().display(),
            kairos_bin().display()
        ),
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&wrapper).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&wrapper, permissions).unwrap();
    let cluster = LocalCluster::start_with(
        &work.path().join("cluster"),
        None,
        &[("KAIROS_BIN", wrapper.display().to_string())],
    );
    let root = work.path().join("service");
    with_web(&cluster, &root);
    let status = wait_for("member 3's clock measured", Duration::from_secs(20), || {
        let status = cluster.status(&cluster.urls[0])?;
        let offset = status["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == 3)?["clock_offset_ms"]
            .as_i64()?;
        Some((status, offset))
    });
    let (status, offset) = status;
    assert!(
        (3_590_000..3_610_000).contains(&offset),
        "member 3 is an hour ahead: {status}"
    );
    for member in status["members"].as_array().unwrap() {
        if member["id"] != 3 {
            assert!(
                member["clock_offset_ms"].as_i64().unwrap().abs() < 1000,
                "{status}"
            );
        }
    }
    let warnings = status["clock_warnings"].to_string();
    assert!(
        warnings.contains("member 3's clock is") && warnings.contains("ahead of member 1's"),
        "{status}"
    );
    let text = Kairos::new()
        .command(["--node", cluster.urls[0].as_str(), "cluster", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.contains("warning: member 3's clock"), "{text}");
    // A frame captured through member 3 carries member 3's time (an hour ahead); asked of
    // member 1, `--at` a time between the two frames finds the earlier, `--at` the later
    // frame's own time finds it.
    std::fs::write(root.join("app.conf"), "x = 2\n").unwrap();
    let (code, body) = post(
        &format!("{}/api/replicas/web/capture", cluster.urls[2]),
        &json!({}),
    );
    assert!(code == 200 || code == 201, "{code} {body}");
    let history = wait_for("both frames on member 1", Duration::from_secs(20), || {
        let (_, history) = get(&format!("{}/api/replicas/web/history", cluster.urls[0]));
        (history.as_array()?.len() == 2).then_some(history)
    });
    let time = |frame: &Value| {
        kairos_core::Instant::parse_rfc3339(frame["time"].as_str().unwrap()).unwrap()
    };
    let (first, second) = (&history[0], &history[1]);
    let gap = time(second).0 - time(first).0;
    assert!(
        gap > 3_500 * 1_000_000_000,
        "the frame from member 3 is an hour later: {history}"
    );
    let kairos = Kairos::new();
    let now = kairos_core::Instant::now().to_string();
    for (at, expected) in [
        (now.as_str(), first),
        (second["time"].as_str().unwrap(), second),
    ] {
        let shown = kairos.json([
            "--node",
            cluster.urls[0].as_str(),
            "show",
            "web",
            "--at",
            at,
            "--json",
        ]);
        assert_eq!(
            shown["frame"]["id"], expected["frame"],
            "--at {at}: {shown}"
        );
    }
}

/// A member's own `hello` (its own idea of the leader), asked with the members' secret.
fn get_hello(url: &str, secret: &Path) -> (u16, Value) {
    let secret = std::fs::read_to_string(secret).unwrap();
    let mut response = Node::agent()
        .post(format!("{url}/cluster/hello"))
        .header("authorization", format!("Bearer {}", secret.trim()))
        .send_json(json!({}))
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}
