//! Retention: `kairos forget` keeps exactly what its rules name plus what something still
//! needs (heads, proposal bases), says why, refuses bad rules by name, and a node applies
//! the configured policy by itself; only an admin may forget through the API.

use std::path::Path;
use std::time::Duration;

use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

fn ids(history: &Value) -> Vec<String> {
    kairos_tests::frames(history)
}

fn capture_changes(kairos: &Kairos, root: &Path, count: usize) -> Vec<String> {
    for i in 0..count {
        std::fs::write(root.join("app.conf"), format!("generation = {i}\n")).unwrap();
        kairos.ok(["capture", "web", "--json"]);
    }
    ids(&kairos.json(["history", "web", "--json"]))
}

#[test]
fn forget_keeps_what_the_rules_name_and_what_a_proposal_needs() {
    let kairos = Kairos::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    std::fs::create_dir(&root).unwrap();
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    let frames = capture_changes(&kairos, &root, 12);
    assert_eq!(frames.len(), 12);
    // A proposal on the fourth frame keeps that frame.
    let document = dir.path().join("p.json");
    std::fs::write(
        &document,
        json!({"title": "t", "author": "ana", "base": frames[3][..12], "ops": [
            {"op": "put_file", "path": "extra.txt", "content": "x"}]})
        .to_string(),
    )
    .unwrap();
    kairos.ok(["propose", "web", "--file", document.to_str().unwrap()]);

    let dry = kairos.json(["forget", "web", "--keep-last", "3", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], json!(true));
    assert_eq!(dry["entries_removed"], json!(8), "{dry}");
    assert_eq!(ids(&kairos.json(["history", "web", "--json"])).len(), 12);
    let text =
        String::from_utf8(kairos.ok(["forget", "web", "--keep-last", "3", "--dry-run"])).unwrap();
    assert!(text.contains("proposal_base"), "{text}");
    assert!(text.contains("no rule keeps it"), "{text}");

    let report = kairos.json(["forget", "web", "--keep-last", "3", "--json"]);
    assert_eq!(report["entries_removed"], json!(8), "{report}");
    let left = ids(&kairos.json(["history", "web", "--json"]));
    assert_eq!(
        left,
        vec![
            frames[3].clone(),
            frames[9].clone(),
            frames[10].clone(),
            frames[11].clone()
        ]
    );
    let kept = &report["timelines"][0]["kept"];
    assert!(
        kept[0]["kept_by"]
            .as_array()
            .unwrap()
            .contains(&json!("head of main"))
    );
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
    // Kept frames still read; forgotten ones are named as gone.
    kairos.ok(["show", "web", "--at", &frames[3][..12]]);
    let error = kairos.fails(["show", "web", "--at", &frames[5][..12]]);
    assert!(error.contains("no frame id starts with"), "{error}");
    let target = dir.path().join("restored");
    kairos.ok([
        "restore",
        "web",
        "--at",
        &frames[9][..12],
        "--into",
        target.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(target.join("app.conf")).unwrap(),
        "generation = 9\n"
    );
    // The audit log names the forget.
    let log = kairos.json(["log", "web", "--json"]);
    assert!(
        log["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "forget"),
        "{log}"
    );

    // Bad input is refused by name; nothing changes.
    for (args, expected) in [
        (vec!["forget", "web"], "no retention policy"),
        (
            vec!["forget", "web", "--keep-within", "soon"],
            "keep_within",
        ),
        (vec!["forget", "web", "--keep-last", "0"], "keep_last = 0"),
        (
            vec!["forget", "nope", "--keep-last", "1"],
            "unknown replica",
        ),
        (
            vec!["forget", "web", "--keep-last", "1", "--timeline", "nope"],
            "no timeline",
        ),
    ] {
        let error = kairos.fails(&args);
        assert!(error.contains(expected), "{args:?}: {error}");
    }
    assert_eq!(ids(&kairos.json(["history", "web", "--json"])).len(), 4);
}

#[test]
fn a_node_applies_the_configured_policy_and_only_an_admin_forgets_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("app.conf"), "generation = 0\n").unwrap();
    let data_dir = dir.path().join("data");
    let kairos = Kairos::at(&data_dir);
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    let admin: Value = kairos.json(["party", "add", "ops", "--role", "admin", "--json"]);
    let viewer: Value = kairos.json(["party", "add", "eve", "--role", "viewer", "--json"]);
    let config = format!(
        "[node]\ncapture_debounce = \"50ms\"\n[retention]\ninterval = \"1s\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"100ms\"\n[replica.retention]\nkeep_last = 2\n",
        root.display().to_string()
    );
    let node = Node::start(&config, &data_dir);
    let forget = |token: &str, body: Value| -> (u16, Value) {
        let mut response = Node::agent()
            .post(format!("{}/api/replicas/web/forget", node.url))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(body)
            .expect("forget request");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_json().unwrap_or(Value::Null),
        )
    };
    let history = |token: &str| -> usize {
        let mut response = Node::agent()
            .get(format!("{}/api/replicas/web/history", node.url))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .expect("history");
        ids(&response.body_mut().read_json().unwrap()).len()
    };
    let admin_token = admin["token"].as_str().unwrap();
    let viewer_token = viewer["token"].as_str().unwrap();
    for i in 1..=6 {
        std::fs::write(root.join("app.conf"), format!("generation = {i}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    // The node forgets by itself, down to the policy's two frames.
    wait_for("the policy applied", Duration::from_secs(15), || {
        (history(admin_token) == 2).then_some(())
    });
    let (status, body) = forget(viewer_token, json!({"keep_last": 1}));
    assert_eq!(status, 403, "{body}");
    assert_eq!(history(admin_token), 2, "a refused forget removes nothing");
    let (status, body) = forget(admin_token, json!({"keep_last": 1, "dry_run": true}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entries_removed"], json!(1), "{body}");
    let (status, body) = forget(admin_token, json!({"keep_within": "a while"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], json!("bad_retention"), "{body}");
    let (status, body) = forget(admin_token, json!({"keep_forever": true}));
    assert_eq!(status, 400, "{body}");
}
