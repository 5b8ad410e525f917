//! Webhooks received by a real HTTP server in the test: it checks each delivery's
//! `Kairos-Signature` (HMAC-SHA256 of the body under the secret, given to the node through
//! a `KAIROS_` variable) and answers 500 to the first attempt of each delivery, so the
//! node's retries are seen; only the events asked for arrive (commit, rollback, gate), a
//! dead endpoint is given up on after its attempts without holding up the other webhook,
//! the status says so, and an event made while the node was down is delivered after it
//! restarts (the cursor file).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use kairos_tests::{Kairos, Node, free_port, wait_for};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "test-secret-of-the-ci-webhook";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    signature_ok: bool,
    status: u16,
}

/// A one-request-per-connection HTTP/1.1 server: verifies the signature (401 when it is
/// wrong), answers 500 to the first attempt of every delivery id and 200 after.
fn receiver(secret: &'static str) -> (u16, Arc<Mutex<Vec<Received>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::<Received>::new()));
    let seen = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || !line.starts_with("POST /hook") {
                continue;
            }
            let mut headers = BTreeMap::new();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
                }
            }
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(&body);
            let signature_ok = headers
                .get("kairos-signature")
                .and_then(|value| value.strip_prefix("sha256="))
                .and_then(|hex| {
                    (0..hex.len())
                        .step_by(2)
                        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .is_some_and(|tag| mac.verify_slice(&tag).is_ok());
            let mut all = seen.lock().unwrap();
            let delivery = headers.get("kairos-delivery").cloned().unwrap_or_default();
            let first = !all
                .iter()
                .any(|r| r.headers.get("kairos-delivery") == Some(&delivery));
            let status = match (signature_ok, first) {
                (false, _) => 401,
                (true, true) => 500,
                (true, false) => 200,
            };
            all.push(Received {
                headers,
                body,
                signature_ok,
                status,
            });
            drop(all);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, received)
}

fn config(root: &Path, port: u16, dead_port: u16) -> String {
    format!(
        r#"[node]
capture_debounce = "100ms"

[[replica]]
name = "web"
root = "{}"
capture_interval = "60s"
check = "grep -Eq '^port = [0-9]+$' {{root}}/app.conf"
watch_window = "500ms"
probe_interval = "100ms"

[[replica.probe]]
kind = "command"
command = "test ! -f {{root}}/broken"

[[webhook]]
name = "ci"
url = "http://127.0.0.1:{port}/hook?token=not-shown"
events = ["commit", "rollback", "gate"]
secret_env = "KAIROS_WEBHOOK_CI_SECRET"
replicas = ["web"]
backoff_initial = "50ms"
backoff_max = "200ms"

[[webhook]]
name = "dead"
url = "http://127.0.0.1:{dead_port}/hook"
events = ["gate"]
secret = "another-secret-of-16-bytes"
attempts_max = 2
backoff_initial = "50ms"
timeout = "1s"
"#,
        root.display()
    )
}

fn change(dir: &Path, name: &str, ops: Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, json!({"title": name, "ops": ops}).to_string()).unwrap();
    path.display().to_string()
}

/// The events delivered (answered 200), in order: (event, body).
fn delivered(received: &Mutex<Vec<Received>>) -> Vec<(String, Value)> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            (
                r.headers["kairos-event"].clone(),
                serde_json::from_slice(&r.body).unwrap(),
            )
        })
        .collect()
}

fn status(node: &Node) -> Value {
    Node::agent()
        .get(format!("{}/api/status", node.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

fn webhook<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap()
}

#[test]
fn signed_deliveries_are_retried_given_up_on_and_survive_a_restart() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 8080\n").unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let (port, received) = receiver(SECRET);
    let dead_port = free_port();
    let config = config(&root, port, dead_port);
    let env = [("KAIROS_WEBHOOK_CI_SECRET", SECRET)];

    // Without its secret's variable the node does not start, naming it.
    let config_path = kairos.data_dir().with_extension("toml");
    std::fs::write(&config_path, &config).unwrap();
    let refused = std::process::Command::new(kairos_tests::kairos_bin())
        .args(["up", "--config"])
        .arg(&config_path)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(kairos.data_dir())
        .env_remove("KAIROS_WEBHOOK_CI_SECRET")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("KAIROS_WEBHOOK_CI_SECRET"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let mut node = Node::start_with_env(&config, kairos.data_dir(), &env);
    kairos.ok(["capture", "web"]);
    let good = change(
        base.path(),
        "good",
        json!([{"op": "set_config", "file": "app.conf", "key": "port", "value": "9090"}]),
    );
    let breaking = change(
        base.path(),
        "breaking",
        json!([{"op": "put_file", "path": "broken", "content": "yes\n"}]),
    );
    // Refused (no model: the prediction cannot be trusted), committed, rolled back.
    let refused = kairos.run(["gate", "web", "--file", &good]);
    assert_eq!(refused.status.code(), Some(1));
    kairos.ok([
        "gate",
        "web",
        "--file",
        &good,
        "--min-confidence",
        "0",
        "--run-check",
        "--commit",
    ]);
    let rolled_back = kairos.run([
        "gate",
        "web",
        "--file",
        &breaking,
        "--min-confidence",
        "0",
        "--commit",
    ]);
    assert_eq!(rolled_back.status.code(), Some(1));

    let events = wait_for("the deliveries", Duration::from_secs(60), || {
        let events = delivered(&received);
        let gates = events.iter().filter(|(e, _)| e == "gate").count();
        let rollbacks = events.iter().filter(|(e, _)| e == "rollback").count();
        (gates == 3 && rollbacks == 1).then_some(events)
    });
    let all = received.lock().unwrap().clone();
    assert!(all.iter().all(|r| r.signature_ok), "every signature checks");
    for (event, body) in &events {
        assert!(
            ["commit", "rollback", "gate"].contains(&event.as_str()),
            "{event}"
        );
        assert_eq!(body["event"], *event);
        assert_eq!(body["schema"], "kairos.event/1");
        assert_eq!(body["replica"], "web");
        // The first attempt was answered 500, the second delivered it.
        let attempts: Vec<&str> = all
            .iter()
            .filter(|r| r.headers["kairos-delivery"] == body["id"].as_str().unwrap())
            .map(|r| r.headers["kairos-attempt"].as_str())
            .collect();
        assert_eq!(attempts, ["1", "2"], "{event}");
    }
    let verdicts: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "gate")
        .map(|(_, body)| body["details"]["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["refuse", "pass", "refuse"]);
    let commits: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "commit")
        .map(|(_, body)| body["details"]["status"].as_str().unwrap())
        .collect();
    // Each commit is told as it starts applying; the good one as committed, the bad one
    // by its rollback.
    assert_eq!(commits, ["applying", "committed", "applying"]);

    // The dead endpoint was given up on, event by event, and said so; the live one was
    // never held up by it.
    let shown = wait_for(
        "the dead webhook's give-ups",
        Duration::from_secs(30),
        || {
            let shown = status(&node);
            (webhook(&shown, "dead")["gave_up"] == 3).then_some(shown)
        },
    );
    let dead = webhook(&shown, "dead");
    assert_eq!(dead["failures"].as_array().unwrap().len(), 3);
    assert_eq!(dead["failures"][0]["attempts"], 2);
    assert_eq!(dead["failures"][0]["event"], "gate");
    assert!(dead["last_error"].as_str().unwrap().contains("attempt 2"));
    let ci = webhook(&shown, "ci");
    assert_eq!(
        ci["url"],
        format!("http://127.0.0.1:{port}/hook"),
        "no query"
    );
    assert_eq!(ci["gave_up"], 0);
    assert!(ci["delivered"].as_u64().unwrap() >= 5, "{ci}");
    assert!(ci["retries"].as_u64().unwrap() >= 5, "{ci}");

    // An event made while the node is down is delivered once it is back.
    assert!(node.stop());
    let again = change(
        base.path(),
        "again",
        json!([{"op": "set_config", "file": "app.conf", "key": "port", "value": "9091"}]),
    );
    let offline = kairos.run(["gate", "web", "--file", &again]);
    assert_eq!(offline.status.code(), Some(1));
    let before = delivered(&received).len();
    let node = Node::start_with_env(&config, kairos.data_dir(), &env);
    let after = wait_for("the event made offline", Duration::from_secs(60), || {
        let events = delivered(&received);
        (events.len() > before).then_some(events)
    });
    let (event, body) = &after[before];
    assert_eq!(event, "gate");
    assert_eq!(body["details"]["verdict"], "refuse");
    // Nothing delivered before the restart came again.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(delivered(&received).len(), before + 1);
    drop(node);
}
