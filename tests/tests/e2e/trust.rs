//! Trust at the API: parties with roles and tokens (401 without, 403 above the role or
//! outside the party's replicas, nothing written), the first admin made locally, the
//! acting party recorded, Host headers checked, listening beyond loopback refused without
//! an explicit setting, slow clients bounded, and a body limit that fits the proposal
//! limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

/// Runs kairos with `token` through the node that owns the data directory.
fn as_party(kairos: &Kairos, token: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    kairos.run(&all)
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn add_party(
    kairos: &Kairos,
    name: &str,
    role: &str,
    extra: &[&str],
    token: Option<&str>,
) -> String {
    let mut args = vec!["party", "add", name, "--role", role, "--json"];
    args.extend_from_slice(extra);
    let output = match token {
        Some(token) => as_party(kairos, token, &args),
        None => kairos.run(&args),
    };
    assert!(
        output.status.success(),
        "party add {name}: {}",
        stderr(&output)
    );
    let party: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(party["party"], json!(name));
    assert_eq!(party["role"], json!(role));
    party["token"].as_str().unwrap().to_string()
}

fn replica_root(base: &Path, name: &str) -> String {
    let root = base.join(name);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    root.display().to_string()
}

/// A raw HTTP request; returns the status code.
fn http_status(url: &str, request: &str) -> u16 {
    let address = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn parties_act_only_within_their_role_and_replicas_and_the_log_names_them() {
    let base = tempfile::tempdir().unwrap();
    let web = replica_root(base.path(), "web");
    let db = replica_root(base.path(), "db");
    let kairos = Kairos::at(&base.path().join("data"));
    // Before any party, the local data directory needs no token; the first admin is made
    // here, where whoever can write the directory already has full authority.
    kairos.ok(["replica", "add", "web", "--root", &web]);
    kairos.ok(["replica", "add", "db", "--root", &db]);
    kairos.ok(["capture", "web"]);
    kairos.ok(["capture", "db"]);
    let admin = add_party(&kairos, "root", "admin", &[], None);
    assert!(admin.starts_with("kairos_"));
    let listed = kairos.json(["party", "list", "--json"]);
    assert!(
        !listed.to_string().contains(&admin),
        "tokens are never listed"
    );

    let config = "[node]\ncapture_debounce = \"100ms\"\n";
    let _node = Node::start(config, kairos.data_dir());

    // No token: refused, and the CLI says why.
    let output = kairos.run(["history", "web"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("needs a party's token"),
        "{}",
        stderr(&output)
    );
    let output = as_party(&kairos, "kairos_nonsense", &["history", "web"]);
    assert!(
        stderr(&output).contains("names no party"),
        "{}",
        stderr(&output)
    );

    // The admin makes the others through the node.
    let viewer = add_party(&kairos, "auditor", "viewer", &[], Some(&admin));
    let proposer = add_party(
        &kairos,
        "web-team",
        "proposer",
        &["--replica", "web"],
        Some(&admin),
    );
    let committer = add_party(&kairos, "deployer", "committer", &[], Some(&admin));

    // A viewer reads, and nothing more.
    assert!(
        as_party(&kairos, &viewer, &["history", "web", "--json"])
            .status
            .success()
    );
    let document = base.path().join("port.json");
    std::fs::write(
        &document,
        json!({"title": "port", "ops": [{"op": "set_config", "file": "app.conf", "key": "port", "value": 2}]})
            .to_string(),
    )
    .unwrap();
    let document = document.to_str().unwrap();
    let output = as_party(&kairos, &viewer, &["propose", "web", "--file", document]);
    assert!(
        stderr(&output).contains("needs role proposer"),
        "{}",
        stderr(&output)
    );

    // A proposer limited to web proposes there (as itself: the document has no author),
    // not on db, and cannot commit.
    let output = as_party(
        &kairos,
        &proposer,
        &["propose", "web", "--file", document, "--json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let proposal: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(proposal["author"], json!("web-team"));
    let id = proposal["proposal"].as_str().unwrap().to_string();
    let output = as_party(&kairos, &proposer, &["history", "db"]);
    assert!(
        stderr(&output).contains("may act on replicas web only"),
        "{}",
        stderr(&output)
    );
    let output = as_party(&kairos, &proposer, &["commit", "web", &id]);
    assert!(
        stderr(&output).contains("needs role committer"),
        "{}",
        stderr(&output)
    );
    // It cannot act under another party's name either.
    let output = as_party(
        &kairos,
        &proposer,
        &[
            "--party",
            "root",
            "timeline",
            "fork",
            "try",
            "--replica",
            "web",
            "--at",
            "latest",
        ],
    );
    assert!(
        stderr(&output).contains("cannot act as party"),
        "{}",
        stderr(&output)
    );

    // Commands are configuration: only an admin registers a replica (and its commands).
    let evil = replica_root(base.path(), "evil");
    let output = as_party(
        &kairos,
        &committer,
        &[
            "replica",
            "add",
            "evil",
            "--root",
            &evil,
            "--check",
            "touch /tmp/kairos-owned",
        ],
    );
    assert!(
        stderr(&output).contains("needs role admin"),
        "{}",
        stderr(&output)
    );
    let replicas = as_party(&kairos, &viewer, &["replica", "list", "--json"]);
    let replicas: Value = serde_json::from_slice(&replicas.stdout).unwrap();
    assert_eq!(
        replicas.as_array().unwrap().len(),
        2,
        "nothing was registered"
    );

    // The committer commits; the log names who did what.
    let output = as_party(&kairos, &committer, &["commit", "web", &id, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = serde_json::from_slice::<Value>(
        &as_party(&kairos, &viewer, &["log", "web", "--json"]).stdout,
    )
    .unwrap();
    let parties: Vec<(String, String)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["event"].as_str().unwrap().to_string(),
                entry["party"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        parties.contains(&("proposal".into(), "web-team".into())),
        "{parties:?}"
    );
    assert!(
        parties.contains(&("commit".into(), "deployer".into())),
        "{parties:?}"
    );

    // Revoked: the token stops working at once.
    kairos.ok(["--token", &admin, "party", "revoke", "auditor"]);
    let output = as_party(&kairos, &viewer, &["history", "web"]);
    assert!(
        stderr(&output).contains("names no party"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_api_answers_only_its_own_host_names_and_beyond_loopback_only_when_told() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());
    let port = node.url.rsplit(':').next().unwrap().to_string();
    let good =
        format!("GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    assert_eq!(http_status(&node.url, &good), 200);
    // A page on another origin that rebinds its name to 127.0.0.1 sends its own name.
    let rebound = "GET /api/status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    assert_eq!(http_status(&node.url, rebound), 421);

    // Beyond loopback without TLS: refused unless the configuration says so.
    let output = kairos.run([
        "up",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        base.path().join("other").to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("insecure_listen"),
        "the refusal names the setting: {}",
        stderr(&output)
    );
}

#[test]
fn a_node_on_every_interface_demands_a_token_even_without_parties() {
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    let config = "[node]\ninsecure_listen = true\ncapture_debounce = \"100ms\"\n";
    let config_path = base.path().join("open.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = std::process::Command::new(kairos_tests::kairos_bin())
        .args([
            "up",
            "--config",
            config_path.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line.trim().trim_start_matches("listening on ").to_string();
    let port = url.rsplit(':').next().unwrap();
    let request = format!(
        "GET /api/replicas HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    let status = http_status(&format!("http://127.0.0.1:{port}"), &request);
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(status, 401);
}

#[test]
fn idle_and_slow_connections_do_not_keep_a_client_from_its_answer() {
    let base = tempfile::tempdir().unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let config = "[node]\ncapture_debounce = \"100ms\"\nconnections_max = 64\nheader_read_timeout = \"1s\"\n";
    let node = Node::start(config, kairos.data_dir());
    let address = node.url.trim_start_matches("http://").to_string();
    let port = address.rsplit(':').next().unwrap().to_string();
    // Twice as many connections as the node serves at once: half of them send half a
    // request and stall, half send nothing.
    let stalled: Vec<TcpStream> = (0..128)
        .map(|index| {
            let mut stream = TcpStream::connect(&address).unwrap();
            if index % 2 == 0 {
                stream
                    .write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0")
                    .unwrap();
            }
            stream
        })
        .collect();
    let started = Instant::now();
    let request =
        format!("GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    wait_for(
        "a well-behaved client's answer",
        Duration::from_secs(20),
        || (http_status(&node.url, &request) == 200).then_some(()),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    // The stalled ones were dropped by the header-read timeout.
    let mut closed = 0;
    for mut stream in stalled.into_iter().step_by(2) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = [0; 512];
        if stream.read(&mut buffer).is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 64, "every half-sent request was answered or closed");
}

#[test]
fn a_large_proposal_fits_through_the_node_as_it_does_directly() {
    let base = tempfile::tempdir().unwrap();
    let root = replica_root(base.path(), "web");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &root]);
    kairos.ok(["capture", "web"]);
    let _node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());
    let content = "x".repeat(3 << 20);
    let document = base.path().join("big.json");
    std::fs::write(
        &document,
        json!({"title": "big", "author": "ops", "ops": [{"op": "put_file", "path": "big.txt", "content": content}]})
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
    assert_eq!(proposal["ops"].as_array().unwrap().len(), 1);
}

#[test]
fn a_party_over_its_request_rate_is_told_to_wait_and_others_are_not() {
    let base = tempfile::tempdir().unwrap();
    let root = replica_root(base.path(), "web");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &root]);
    kairos.ok(["capture", "web"]);
    let noisy = add_party(&kairos, "noisy", "viewer", &[], None);
    let quiet = add_party(&kairos, "quiet", "viewer", &[], None);
    let node = Node::start(
        "[node]\ncapture_debounce = \"100ms\"\nparty_requests_per_second = 5\n",
        kairos.data_dir(),
    );
    let agent = Node::agent();
    let get = |token: &str| {
        let mut response = agent
            .get(format!("{}/api/replicas/web/history", node.url))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        (status, body)
    };
    let answers: Vec<(u16, Value)> = (0..30).map(|_| get(&noisy)).collect();
    let limited: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .map(|(_, body)| body)
        .collect();
    assert!(
        !limited.is_empty(),
        "30 requests at once exceed 5 per second"
    );
    assert_eq!(limited[0]["error"]["code"], json!("rate_limited"));
    assert!(
        answers.iter().filter(|(status, _)| *status == 200).count() >= 5,
        "the burst is served"
    );
    // Another party is not held back by the noisy one.
    assert_eq!(get(&quiet).0, 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&noisy).0, 200, "the noisy party is served again later");
}

#[test]
fn a_node_with_a_certificate_serves_tls_and_the_cli_checks_it() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path();
    let openssl = |args: &[&str]| {
        let made = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    // A private authority and a node certificate it signs, as an operator would make.
    let curve = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &curve,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=kairos-test-ca",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &curve,
            &[
                "-keyout",
                "node.key",
                "-out",
                "node.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let (cert, key, authority) = (
        dir.join("node.crt"),
        dir.join("node.key"),
        dir.join("ca.crt"),
    );
    let root = replica_root(base.path(), "web");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &root]);
    kairos.ok(["capture", "web"]);
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let node = Node::start(&config, kairos.data_dir());
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    let history = kairos.json([
        "--node",
        &node.url,
        "--ca-cert",
        authority.to_str().unwrap(),
        "history",
        "web",
        "--json",
    ]);
    assert!(!history.as_array().unwrap().is_empty());
    // Without the certificate's authority the CLI refuses the node.
    let error = kairos.fails(["--node", &node.url, "history", "web"]);
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // Plain HTTP gets no answer from a TLS port.
    let port = node.url.rsplit(':').next().unwrap();
    let plain =
        format!("GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    assert_ne!(
        http_status(&format!("http://127.0.0.1:{port}"), &plain),
        200
    );
}
