//! Collaboration over NATS, against a real nats-server started here with the
//! authorization file the node writes: parties see each other's events on
//! `kairos.<replica>.<timeline>.<event>`, propose and commit by request on
//! `kairos.api.<verb>`, are held to their role and replicas by nats-server and by the node,
//! lose access at once when revoked; events outlive a NATS outage and arrive once per id;
//! a subscriber that was offline replays what it missed; and `kairos watch` streams the
//! same events from the node's API without NATS.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kairos_tests::services::NatsServer;
use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn replica_root(base: &Path, name: &str) -> String {
    let root = base.join(name);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\nworkers = 2\n").unwrap();
    root.display().to_string()
}

fn add_party(
    kairos: &Kairos,
    token: Option<&str>,
    name: &str,
    role: &str,
    extra: &[&str],
) -> String {
    let mut args = vec![];
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    args.extend(["party", "add", name, "--role", role, "--json"]);
    args.extend_from_slice(extra);
    let party = kairos.json(&args);
    party["token"].as_str().unwrap().to_string()
}

fn proposal_document(title: &str, value: u32) -> Value {
    json!({
        "title": title,
        "ops": [{"op": "set_config", "file": "app.conf", "key": "port", "value": value}]
    })
}

/// A party's connection: its name and token are its NATS user and password; server errors
/// (permission violations) are collected.
struct Party {
    client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
    token: String,
}

async fn connect(url: &str, name: &str, token: &str) -> Result<Party, String> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(name.into(), token.into())
        .custom_inbox_prefix(format!("_INBOX_{name}"))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(Some(1))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(event.to_string());
            }
        })
        .connect(url)
        .await
        .map_err(|error| error.to_string())?;
    Ok(Party {
        client,
        errors,
        token: token.to_string(),
    })
}

/// A request on `kairos.api.<verb>` with the party's token: (status, body), or the error
/// NATS gave (no answer in 3 s).
async fn request(party: &Party, verb: &str, payload: Value) -> Result<(u16, Value), String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", format!("Bearer {}", party.token).as_str());
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(payload.to_string().into())
        .timeout(Some(Duration::from_secs(3)));
    let answer = party
        .client
        .send_request(format!("kairos.api.{verb}"), request)
        .await
        .map_err(|error| error.to_string())?;
    let status = answer
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Kairos-Status"))
        .and_then(|value| value.as_str().parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        serde_json::from_slice(&answer.payload).unwrap_or(Value::Null),
    ))
}

/// The next events on `subscriber` until one is `event` (at most 10 s).
async fn next_event(subscriber: &mut async_nats::Subscriber, event: &str) -> (String, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, subscriber.next())
            .await
            .unwrap_or_else(|_| panic!("no {event} event in time"))
            .expect("subscription open");
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        if body["event"] == event {
            return (message.subject.to_string(), body);
        }
    }
}

/// The events on `subscriber` until each of `names` came (at most 10 s), by name.
async fn events_until(
    subscriber: &mut async_nats::Subscriber,
    names: &[&str],
) -> BTreeMap<String, (String, Value)> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !names.iter().all(|name| seen.contains_key(*name)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, subscriber.next())
            .await
            .unwrap_or_else(|_| panic!("not every one of {names:?} came: {seen:?}"))
            .expect("subscription open");
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        let name = body["event"].as_str().unwrap().to_string();
        seen.insert(name, (message.subject.to_string(), body));
    }
    seen
}

/// Waits until the node answers requests on NATS (its status says so).
fn wait_answering(node: &Node, token: Option<&str>) {
    wait_for(
        "the node to answer on NATS",
        Duration::from_secs(10),
        || {
            let mut request = Node::agent().get(format!("{}/api/status", node.url));
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let status: Value = request.call().ok()?.body_mut().read_json().ok()?;
            (status["nats"]["answering"] == true).then_some(())
        },
    );
}

fn node_config(nats: &NatsServer, authorization: Option<&Path>) -> String {
    let mut config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[nats]\nurl = \"{}\"\nduplicate_window = \"10m\"\n",
        nats.url()
    );
    if let Some(path) = authorization {
        config.push_str(&format!(
            "user = \"kairos-node\"\npassword = \"node-secret\"\nauthorization_file = {:?}\nserver_pid_file = {:?}\n",
            path.display().to_string(),
            nats.pid_file.display().to_string()
        ));
    }
    config
}

#[test]
fn two_teams_collaborate_over_nats_and_roles_hold_on_nats_and_the_api() {
    let base = tempfile::tempdir().unwrap();
    let web = replica_root(base.path(), "web");
    let db = replica_root(base.path(), "db");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &web]);
    kairos.ok(["replica", "add", "db", "--root", &db]);
    kairos.ok(["capture", "web"]);
    kairos.ok(["capture", "db"]);
    let admin = add_party(&kairos, None, "root", "admin", &[]);

    let authorization = base.path().join("nats").join("auth.conf");
    std::fs::create_dir_all(authorization.parent().unwrap()).unwrap();
    let mut nats = NatsServer::prepare(&base.path().join("nats"), Some(&authorization));
    // The fork the teams share needs one approval from team C before a commit.
    let config = format!(
        "{}[[replica]]\nname = \"web\"\nroot = {web:?}\n[replica.policy.timeline.exp]\nrequired_approvals = 1\nreviewers_from = [\"team-c\"]\nauthors_cannot_approve = true\n",
        node_config(&nats, Some(&authorization))
    );
    let node = Node::start(&config, kairos.data_dir());
    wait_for("the authorization file", Duration::from_secs(10), || {
        std::fs::read_to_string(&authorization)
            .ok()
            .filter(|text| text.contains("\"root\""))
    });
    nats.run();

    let team_a = add_party(
        &kairos,
        Some(&admin),
        "team-a",
        "proposer",
        &["--replica", "web"],
    );
    let team_b = add_party(&kairos, Some(&admin), "team-b", "committer", &[]);
    let team_c = add_party(
        &kairos,
        Some(&admin),
        "team-c",
        "reviewer",
        &["--replica", "web"],
    );
    let auditor = add_party(
        &kairos,
        Some(&admin),
        "auditor",
        "viewer",
        &["--replica", "web"],
    );
    wait_answering(&node, Some(&admin));
    let url = nats.url();
    let rt = runtime();
    rt.block_on(async {
        // The node rewrote the file and had the server reload it: the parties connect.
        let mut b = None;
        for _ in 0..100 {
            match connect(&url, "team-b", &team_b).await {
                Ok(party) => {
                    b = Some(party);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let b = b.expect("team-b connects with its token");
        let a = connect(&url, "team-a", &team_a).await.expect("team-a connects");
        let viewer = connect(&url, "auditor", &auditor).await.expect("auditor connects");
        assert!(connect(&url, "team-a", "kairos_wrong").await.is_err(), "a wrong token is refused");

        let mut b_events = b.client.subscribe("kairos.web.>").await.unwrap();
        let mut viewer_events = viewer.client.subscribe("kairos.web.>").await.unwrap();
        b.client.flush().await.unwrap();
        viewer.client.flush().await.unwrap();

        // Team A forks a timeline (through the API) and proposes on it over NATS.
        kairos.ok(["--token", &team_a, "timeline", "fork", "exp", "--replica", "web", "--at", "latest"]);
        let (subject, fork) = next_event(&mut b_events, "fork").await;
        assert_eq!(subject, "kairos.web.exp.fork");
        assert_eq!(fork["party"], "team-a");
        assert_eq!(fork["schema"], "kairos.event/1");
        let (status, proposal) = request(
            &a,
            "propose",
            json!({"replica": "web", "body": {"document": proposal_document("port 2", 2), "timeline": "exp"}}),
        )
        .await
        .unwrap();
        assert_eq!(status, 201, "{proposal}");
        let id = proposal["proposal"].as_str().unwrap().to_string();
        // Team B and the viewer see it happen.
        let (subject, event) = next_event(&mut b_events, "proposal").await;
        assert_eq!(subject, "kairos.web.exp.proposal");
        assert_eq!(event["party"], "team-a");
        assert_eq!(event["details"]["proposal"], id.as_str());
        next_event(&mut viewer_events, "proposal").await;

        // Validation only: answered like a proposal, nothing stored.
        let entries = |kairos: &Kairos| {
            kairos.json(["--token", &admin, "log", "web", "--json"])["entries"]
                .as_array()
                .unwrap()
                .len()
        };
        let before = entries(&kairos);
        let (status, checked) = request(
            &a,
            "validate",
            json!({"replica": "web", "body": {"document": proposal_document("port 3", 3), "timeline": "exp"}}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{checked}");
        assert_eq!(checked["author"], "team-a");
        assert_eq!(entries(&kairos), before, "validation stores nothing");

        // Same validation and errors as the API: a bad op is named.
        let (status, error) = request(
            &a,
            "propose",
            json!({"replica": "web", "body": {"document": {"title": "x", "ops": [{"op": "delete", "path": "../etc"}]}, "timeline": "exp"}}),
        )
        .await
        .unwrap();
        assert!(status >= 400, "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains("../etc"), "{error}");

        // Team A may not commit: nats-server refuses the publish.
        assert!(request(&a, "commit", json!({"replica": "web", "proposal": id})).await.is_err());
        wait_for("a permission violation", Duration::from_secs(5), || {
            a.errors
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.to_lowercase().contains("permissions violation"))
                .then_some(())
        });
        // Team A may propose, but on its replica only: the node refuses db.
        let (status, error) = request(
            &a,
            "propose",
            json!({"replica": "db", "body": {"document": proposal_document("db", 3)}}),
        )
        .await
        .unwrap();
        assert_eq!(status, 403, "{error}");

        // The viewer can neither propose over NATS nor through the API, nor read db.
        let proposals_before = kairos.json(["--token", &admin, "log", "web", "--json"])["entries"]
            .as_array()
            .unwrap()
            .len();
        assert!(
            request(&viewer, "propose", json!({"replica": "web", "body": {"document": proposal_document("v", 9)}}))
                .await
                .is_err()
        );
        let document = base.path().join("viewer.json");
        std::fs::write(&document, proposal_document("v", 9).to_string()).unwrap();
        let output = kairos.run(["--token", &auditor, "propose", "web", "--file", document.to_str().unwrap()]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("needs role proposer"));
        let _db = viewer.client.subscribe("kairos.db.>").await.unwrap();
        viewer.client.flush().await.ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let errors = viewer.errors.lock().unwrap().clone();
            let violations = errors
                .iter()
                .filter(|e| e.to_lowercase().contains("permissions violation"))
                .count();
            if violations >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "the viewer's violations: {errors:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let proposals_after = kairos.json(["--token", &admin, "log", "web", "--json"])["entries"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(proposals_before, proposals_after, "nothing was written");

        // A reply subject is never trusted: a request asking the node to answer into a
        // stream's purge API (or onto an event subject) is not answered at all.
        let db_before = stream_messages(&b.client, "KAIROS_db").await;
        for reply in ["$JS.API.STREAM.PURGE.KAIROS_db", "kairos.db.main.commit", "_INBOX_team-b.stolen"] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Authorization", format!("Bearer {}", viewer.token).as_str());
            viewer
                .client
                .publish_with_reply_and_headers("kairos.api.status", reply, headers, "{}".into())
                .await
                .unwrap();
            viewer
                .client
                .publish_with_reply("kairos.api.status", reply, "{}".into())
                .await
                .unwrap();
        }
        viewer.client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stream_messages(&b.client, "KAIROS_db").await, db_before);
        assert!(db_before > 0);

        // A party cannot take the node's own NATS user name.
        let output = kairos.run(["--token", &admin, "party", "add", "kairos-node", "--role", "viewer"]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("nats.user"));

        // A party limited to web sees only web in the node's status.
        let (status, answer) = request(&viewer, "status", json!({})).await.unwrap();
        assert_eq!(status, 200);
        let names: Vec<&str> = answer["replicas"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["web"]);

        // The policy holds: no commit without team C's approval, and the refusal says so.
        let (status, refused) = request(&b, "commit", json!({"replica": "web", "proposal": id}))
            .await
            .unwrap();
        assert_eq!(status, 409, "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains("team-c"), "{refused}");
        // Team C reviews over NATS; team B sees the approval as it happens.
        let c = connect(&url, "team-c", &team_c).await.expect("team-c connects");
        let (status, review) = request(
            &c,
            "review",
            json!({"replica": "web", "proposal": id, "body": {"verdict": "approve", "comment": "port 2 is fine"}}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{review}");
        let (subject, approval) = next_event(&mut b_events, "approval").await;
        assert_eq!(subject, "kairos.web.exp.approval");
        assert_eq!(approval["party"], "team-c");
        let (status, listed) = request(&b, "proposals", json!({"replica": "web", "query": {"timeline": "exp"}}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{listed}");
        assert!(listed.to_string().contains("team-c"), "{listed}");

        // Team B commits A's proposal over NATS; everyone sees the commit and the frame.
        let (status, commit) = request(&b, "commit", json!({"replica": "web", "proposal": id}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{commit}");
        assert_eq!(commit["status"], "committed", "{commit}");
        let seen = events_until(&mut b_events, &["commit", "frame"]).await;
        assert_eq!(seen["commit"].0, "kairos.web.exp.commit");
        assert_eq!(seen["commit"].1["party"], "team-b");
        assert_eq!(seen["frame"].0, "kairos.web.exp.frame");

        // Revoked: the token stops at once (the node checks it on every request), and
        // nats-server, told to reload, no longer lets team A in.
        kairos.ok(["--token", &admin, "party", "revoke", "team-a"]);
        // Refused either by the node (the token is gone) or by nats-server (reloaded).
        let late = json!({"replica": "web", "body": {"document": proposal_document("late", 4), "timeline": "exp"}});
        if let Ok((status, _)) = request(&a, "propose", late).await {
            assert_eq!(status, 401);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect(&url, "team-a", &team_a).await.is_ok() {
            assert!(Instant::now() < deadline, "nats-server still lets team-a in");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn events_outlive_a_nats_outage_arrive_once_and_wait_for_offline_subscribers() {
    let base = tempfile::tempdir().unwrap();
    let web = replica_root(base.path(), "web");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &web]);
    kairos.ok(["capture", "web"]);
    let mut nats = NatsServer::start(&base.path().join("nats"), None);
    let mut node = Node::start(&node_config(&nats, None), kairos.data_dir());
    kairos.ok([
        "timeline",
        "fork",
        "exp",
        "--replica",
        "web",
        "--at",
        "latest",
    ]);
    let document = base.path().join("p.json");
    std::fs::write(&document, proposal_document("port 5", 5).to_string()).unwrap();
    let proposal = kairos.json([
        "propose",
        "web",
        "--file",
        document.to_str().unwrap(),
        "--timeline",
        "exp",
        "--json",
    ]);
    let id = proposal["proposal"].as_str().unwrap().to_string();
    let url = nats.url();
    let rt = runtime();

    // An offline subscriber: a durable consumer that read what was there, then left.
    let seen_before = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let stream = wait_for_stream(&jetstream).await;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("offline".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let events = fetch_until(&consumer, |events| {
            events.iter().any(|e| e["event"] == "proposal")
        })
        .await;
        events.len()
    });

    // Malformed and unknown requests are answered with what is wrong.
    wait_answering(&node, None);
    rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        for (subject, payload, code) in [
            ("kairos.api.drop", "{}", "unknown_verb"),
            ("kairos.api.propose", "{not json", "bad_request"),
            (
                "kairos.api.propose",
                "{\"replica\": \"web\", \"forged\": 1}",
                "bad_request",
            ),
            (
                "kairos.api.propose",
                "{\"replica\": \"web\"}",
                "unauthenticated",
            ),
        ] {
            let answer = client.request(subject, payload.into()).await.unwrap();
            let body: Value = serde_json::from_slice(&answer.payload).unwrap();
            assert_eq!(body["error"]["code"], code, "{subject} {payload}: {body}");
        }
        let oversized = vec![b' '; 2 << 20];
        assert!(
            client
                .request("kairos.api.propose", oversized.into())
                .await
                .is_err(),
            "nats-server's own limit"
        );
    });

    // NATS dies; the commit and a capture go on, and finish.
    nats.kill();
    let started = Instant::now();
    let commit = kairos.json(["commit", "web", &id, "--json"]);
    assert_eq!(commit["status"], "committed", "{commit}");
    std::fs::write(Path::new(&web).join("new.txt"), "x").unwrap();
    kairos.ok(["capture", "web"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "nothing waited for NATS"
    );
    // The node is killed too; the published cursor is what it is.
    let _ = node.child.kill();
    let _ = node.child.wait();
    nats.restart();
    let _node = Node::start(&node_config(&nats, None), kairos.data_dir());

    rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let stream = wait_for_stream(&jetstream).await;
        // The offline subscriber comes back and finds what it missed.
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("offline").await.unwrap();
        let missed = fetch_until(&consumer, |events| {
            events.iter().any(|e| e["event"] == "commit")
                && events
                    .iter()
                    .filter(|e| e["event"] == "frame" && e["timeline"] == "main")
                    .count()
                    >= 1
        })
        .await;
        assert!(
            missed
                .iter()
                .any(|e| e["event"] == "commit" && e["details"]["status"] == "committed")
        );
        assert!(seen_before > 0);

        // Every event is in the stream exactly once, and every audit entry is there.
        let all = async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let info = stream.get_info().await.unwrap();
        let total = info.state.messages as usize;
        let consumer = stream.create_consumer(all).await.unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut ids = BTreeMap::new();
        for _ in 0..total {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let event: Value = serde_json::from_slice(&message.payload).unwrap();
            *ids.entry(event["id"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        assert!(ids.values().all(|count| *count == 1), "{ids:?}");
        let log = kairos.json(["log", "web", "--json"]);
        let audit: HashSet<String> = log["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["hash"].as_str().unwrap().to_string())
            .collect();
        for hash in &audit {
            assert!(
                ids.contains_key(hash),
                "audit entry {hash} was never published"
            );
        }
    });
}

/// How many messages a stream holds (as `client` sees it).
async fn stream_messages(client: &async_nats::Client, name: &str) -> u64 {
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut stream = jetstream.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn wait_for_stream(
    jetstream: &async_nats::jetstream::Context,
) -> async_nats::jetstream::stream::Stream {
    for _ in 0..200 {
        if let Ok(stream) = jetstream.get_stream("KAIROS_web").await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node never made stream KAIROS_web");
}

/// Fetches (and acknowledges) events from a durable consumer until `done` says so.
async fn fetch_until(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&events) {
        assert!(Instant::now() < deadline, "events never came: {events:?}");
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            events.push(serde_json::from_slice(&message.payload).unwrap());
            message.ack().await.unwrap();
        }
    }
    events
}

#[test]
fn watch_streams_the_nodes_events_without_nats() {
    let base = tempfile::tempdir().unwrap();
    let web = replica_root(base.path(), "web");
    let kairos = Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", &web]);
    kairos.ok(["capture", "web"]);
    let _node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());
    let watcher = kairos
        .command(["watch", "web", "--json", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The watcher is connected once the node counts its stream; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    kairos.ok([
        "timeline",
        "fork",
        "exp",
        "--replica",
        "web",
        "--at",
        "latest",
    ]);
    let document = base.path().join("p.json");
    std::fs::write(&document, proposal_document("port 7", 7).to_string()).unwrap();
    kairos.ok([
        "propose",
        "web",
        "--file",
        document.to_str().unwrap(),
        "--timeline",
        "exp",
    ]);
    let output = watcher.wait_with_output().unwrap();
    assert!(output.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fork", "proposal"]);

    // From the start: the first frame comes first; a timeline filter keeps only exp.
    let history = kairos.ok(["watch", "web", "--since", "start", "--count", "3", "--json"]);
    let history: Vec<Value> = String::from_utf8_lossy(&history)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(history[0]["event"], "frame");
    let text = kairos.ok([
        "watch",
        "web",
        "--timeline",
        "exp",
        "--since",
        "start",
        "--count",
        "2",
    ]);
    let text = String::from_utf8_lossy(&text);
    assert!(text.lines().all(|line| line.contains("web/exp")), "{text}");

    // Another site's page cannot make a browser change anything here, even with no token
    // needed; the node's own page can.
    let cross = Node::agent()
        .post(format!("{}/api/replicas/web/capture", _node.url))
        .header("Origin", "http://evil.example")
        .header("Content-Type", "text/plain")
        .send("x")
        .unwrap();
    assert_eq!(cross.status(), 403);
    let own = Node::agent()
        .post(format!("{}/api/replicas/web/capture", _node.url))
        .header("Origin", _node.url.as_str())
        .send_empty()
        .unwrap();
    assert_eq!(own.status(), 200);

    // The series from the start of time is an answer, not a crash.
    let mut response = Node::agent()
        .get(format!("{}/api/replicas/web/series?from=start", _node.url))
        .call()
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.body_mut().read_to_string().unwrap()
    );

    // Bad input is named.
    let error = kairos.fails(["watch", "web", "--since", "the-other-day"]);
    assert!(error.contains("the-other-day"), "{error}");
    let error = kairos.fails(["watch", "nosuch", "--count", "1"]);
    assert!(error.contains("nosuch"), "{error}");

    // Parties: a scoped party lists only its replicas; a revoked party's open stream ends.
    let db = base.path().join("db");
    std::fs::create_dir_all(&db).unwrap();
    kairos.ok(["replica", "add", "db", "--root", db.to_str().unwrap()]);
    let admin = kairos.json(["party", "add", "root", "--role", "admin", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let scoped = kairos.json([
        "--token",
        &admin,
        "party",
        "add",
        "webber",
        "--role",
        "viewer",
        "--replica",
        "web",
        "--json",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = kairos.json(["--token", &scoped, "replica", "list", "--json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web"]);
    let mut stream = kairos
        .command(["--token", &scoped, "watch", "web", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    kairos.ok(["--token", &admin, "party", "revoke", "webber"]);
    let started = Instant::now();
    let ended = loop {
        if let Some(status) = stream.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the revoked party's stream goes on"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!ended.success());
}
