//! Collaboration through a node and on a data directory: reviews counted by a timeline's
//! policy at commit (what is missing is named, nothing is written), roles (a viewer
//! cannot propose, a proposer cannot review: 403), an author approving its own proposal
//! where the policy forbids it, reviews of unknown or committed proposals, interference
//! between open proposals (overlapping entries; a check that fails on two proposals
//! applied together while each passes alone), and policy values out of range.

use std::path::Path;

use kairos_tests::{Kairos, Node};
use serde_json::{Value, json};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs kairos with a party's token (through the node owning the data directory).
fn as_party(kairos: &Kairos, token: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    kairos.run(&all)
}

fn ok_json(output: std::process::Output) -> Value {
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn add_party(kairos: &Kairos, admin: Option<&str>, name: &str, role: &str) -> String {
    let args = ["party", "add", name, "--role", role, "--json"];
    let party = match admin {
        Some(token) => ok_json(as_party(kairos, token, &args)),
        None => kairos.json(args),
    };
    party["token"].as_str().unwrap().to_string()
}

fn document(dir: &Path, name: &str, ops: Value) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, json!({"title": name, "ops": ops}).to_string()).unwrap();
    path.display().to_string()
}

fn set_port(value: u64) -> Value {
    json!([{"op": "set_config", "file": "app.conf", "key": "port", "value": value}])
}

fn put(path: &str) -> Value {
    json!([{"op": "put_file", "path": path, "content": "on\n"}])
}

/// The replica `web` with a check that fails when both flags exist, and the policy of
/// timeline `shared`: two approvals from team-a, team-b and lead, never the author's.
fn config(root: &Path) -> String {
    format!(
        r#"[node]
capture_debounce = "100ms"

[[replica]]
name = "web"
root = "{}"
check = "test ! -f {{root}}/a.flag || test ! -f {{root}}/b.flag"

[replica.policy.timeline.shared]
required_approvals = 2
reviewers_from = ["team-a", "team-b", "lead"]
authors_cannot_approve = true
"#,
        root.display()
    )
}

fn log_events(kairos: &Kairos, token: &str, event: &str) -> Vec<Value> {
    let log = ok_json(as_party(kairos, token, &["log", "web", "--json"]));
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["event"] == json!(event))
        .cloned()
        .collect()
}

#[test]
fn two_teams_review_and_commit_on_a_fork_under_its_policy() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let admin = add_party(&kairos, None, "root", "admin");
    let node = Node::start(&config(&root), kairos.data_dir());
    kairos.ok(["--token", &admin, "capture", "web"]);
    let team_a = add_party(&kairos, Some(&admin), "team-a", "reviewer");
    let team_b = add_party(&kairos, Some(&admin), "team-b", "reviewer");
    let lead = add_party(&kairos, Some(&admin), "lead", "committer");
    let intern = add_party(&kairos, Some(&admin), "intern", "proposer");
    let auditor = add_party(&kairos, Some(&admin), "auditor", "viewer");
    let fork = [
        "timeline",
        "fork",
        "shared",
        "--replica",
        "web",
        "--at",
        "latest",
    ];
    assert!(as_party(&kairos, &team_a, &fork).status.success());
    let head = |kairos: &Kairos| {
        let history = ok_json(as_party(
            kairos,
            &auditor,
            &["history", "web", "--timeline", "shared", "--json"],
        ));
        history.as_array().unwrap().len()
    };
    assert_eq!(head(&kairos), 1);

    // A viewer proposing is refused (403) and nothing is written.
    let log_before = log_events(&kairos, &auditor, "proposal").len();
    let response = Node::agent()
        .post(format!("{}/api/replicas/web/proposals", node.url))
        .header("Authorization", format!("Bearer {auditor}"))
        .send_json(json!({"document": {"title": "x", "ops": set_port(9)}, "timeline": "shared"}))
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let listed = ok_json(as_party(&kairos, &auditor, &["proposals", "web", "--json"]));
    assert_eq!(listed, json!([]), "nothing was proposed");
    assert_eq!(log_events(&kairos, &auditor, "proposal").len(), log_before);

    // Team A proposes on the shared fork.
    let port = document(base.path(), "port", set_port(2));
    let proposal = ok_json(as_party(
        &kairos,
        &team_a,
        &[
            "propose",
            "web",
            "--file",
            &port,
            "--timeline",
            "shared",
            "--json",
        ],
    ));
    let id = proposal["proposal"].as_str().unwrap().to_string();

    // Without approvals the commit is refused, naming what is missing; nothing written.
    let output = as_party(&kairos, &lead, &["commit", "web", &id]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!(
            "proposal {}: needs 2 approvals from [team-a, team-b, lead], has 0",
            &id[..12]
        )),
        "{}",
        stderr(&output)
    );
    assert_eq!(head(&kairos), 1);
    let response = Node::agent()
        .post(format!(
            "{}/api/replicas/web/proposals/{id}/commit",
            node.url
        ))
        .header("Authorization", format!("Bearer {lead}"))
        .send_json(json!({}))
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);

    // The author may not approve its own proposal here; a proposer may not review (403).
    let output = as_party(&kairos, &team_a, &["review", "web", &id, "--approve"]);
    assert!(
        stderr(&output).contains("forbids authors to approve their own proposals"),
        "{}",
        stderr(&output)
    );
    let output = as_party(&kairos, &intern, &["review", "web", &id, "--approve"]);
    assert!(
        stderr(&output).contains("needs role reviewer"),
        "{}",
        stderr(&output)
    );
    let response = Node::agent()
        .post(format!(
            "{}/api/replicas/web/proposals/{id}/review",
            node.url
        ))
        .header("Authorization", format!("Bearer {intern}"))
        .send_json(json!({"verdict": "approve"}))
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    // A review of a proposal that does not exist.
    let output = as_party(&kairos, &team_b, &["review", "web", "ffff0000", "--reject"]);
    assert!(
        stderr(&output).contains("no proposal id starts with \"ffff0000\""),
        "{}",
        stderr(&output)
    );

    // Team B approves: one approval is not two.
    let review = ok_json(as_party(
        &kairos,
        &team_b,
        &[
            "review",
            "web",
            &id,
            "--approve",
            "--comment",
            "port 2 is free",
            "--json",
        ],
    ));
    assert_eq!(review["approvals"], json!(["team-b"]));
    assert_eq!(review["policy"]["met"], json!(false));
    let output = as_party(&kairos, &lead, &["commit", "web", &id]);
    assert!(
        stderr(&output).contains("has 1 (team-b)"),
        "{}",
        stderr(&output)
    );
    assert_eq!(head(&kairos), 1);

    // The lead approves too: the commit goes through on the fork.
    ok_json(as_party(
        &kairos,
        &lead,
        &["review", "web", &id, "--approve", "--json"],
    ));
    let commit = ok_json(as_party(&kairos, &lead, &["commit", "web", &id, "--json"]));
    assert_eq!(commit["status"], json!("committed"));
    assert_eq!(head(&kairos), 2);

    // A committed proposal takes no more reviews.
    let output = as_party(&kairos, &team_b, &["review", "web", &id, "--reject"]);
    assert!(
        stderr(&output).contains("is already committed"),
        "{}",
        stderr(&output)
    );

    // The list shows where it stands; the log has every review, addressed to the author.
    let listed = ok_json(as_party(
        &kairos,
        &auditor,
        &["proposals", "web", "--status", "committed", "--json"],
    ));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let parties: Vec<&str> = listed[0]["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|review| review["party"].as_str().unwrap())
        .collect();
    assert_eq!(parties, ["team-b", "lead"]);
    assert!(listed[0]["prediction"]["confidence"].is_number());
    let reviews = log_events(&kairos, &auditor, "review");
    assert_eq!(reviews.len(), 2);
    assert!(
        reviews
            .iter()
            .all(|r| r["details"]["author"] == json!("team-a"))
    );
    assert_eq!(reviews[0]["party"], json!("team-b"));
    assert_eq!(reviews[0]["details"]["comment"], json!("port 2 is free"));
    let open = ok_json(as_party(
        &kairos,
        &auditor,
        &["proposals", "web", "--status", "open", "--json"],
    ));
    assert_eq!(open, json!([]));

    // Both endpoints are in the API document.
    let document: Value = Node::agent()
        .get(format!("{}/api/openapi.json", node.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(document["paths"]["/api/replicas/{name}/proposals/{id}/review"]["post"].is_object());
    assert!(document["paths"]["/api/replicas/{name}/proposals"]["get"].is_object());
}

#[test]
fn overlapping_and_jointly_failing_proposals_are_told_before_either_commits() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let admin = add_party(&kairos, None, "root", "admin");
    let _node = Node::start(&config(&root), kairos.data_dir());
    kairos.ok(["--token", &admin, "capture", "web"]);
    let team_a = add_party(&kairos, Some(&admin), "team-a", "reviewer");
    let team_b = add_party(&kairos, Some(&admin), "team-b", "reviewer");
    let fork = [
        "timeline",
        "fork",
        "shared",
        "--replica",
        "web",
        "--at",
        "latest",
    ];
    assert!(as_party(&kairos, &team_a, &fork).status.success());
    let propose = |token: &str, name: &str, ops: Value| {
        let file = document(base.path(), name, ops);
        ok_json(as_party(
            &kairos,
            token,
            &[
                "propose",
                "web",
                "--file",
                &file,
                "--timeline",
                "shared",
                "--json",
            ],
        ))
    };

    // Two teams change the same key: the second proposal is told at once, and both
    // proposals carry the finding.
    let first = propose(&team_a, "port-a", set_port(2));
    assert!(first.get("interference").is_none());
    let second = propose(&team_b, "port-b", set_port(3));
    let (a, b) = (
        first["proposal"].as_str().unwrap(),
        second["proposal"].as_str().unwrap(),
    );
    let found = &second["interference"][0];
    assert_eq!(found["kind"], json!("overlap"));
    assert_eq!(found["entries"], json!(["app.conf:port"]));
    assert_eq!(
        found["proposals"],
        json!([{"proposal": b, "author": "team-b"}, {"proposal": a, "author": "team-a"}])
    );
    let listed = ok_json(as_party(
        &kairos,
        &team_a,
        &["proposals", "web", "--timeline", "shared", "--json"],
    ));
    for proposal in listed.as_array().unwrap() {
        assert_eq!(
            proposal["interference"][0]["kind"],
            json!("overlap"),
            "{proposal}"
        );
    }
    let events = log_events(&kairos, &team_a, "interference");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["details"]["entries"], json!(["app.conf:port"]));

    // Two proposals whose checks pass alone but fail together.
    let flag_a = propose(&team_a, "flag-a", put("a.flag"));
    let flag_b = propose(&team_b, "flag-b", put("b.flag"));
    assert!(flag_b.get("interference").is_none(), "no entry overlaps");
    let (flag_a, flag_b) = (
        flag_a["proposal"].as_str().unwrap(),
        flag_b["proposal"].as_str().unwrap(),
    );
    let alone = ok_json(as_party(
        &kairos,
        &team_a,
        &["sandbox", "web", flag_a, "--run-check", "--json"],
    ));
    assert_eq!(alone["check"]["passed"], json!(true));
    let together = ok_json(as_party(
        &kairos,
        &team_b,
        &["sandbox", "web", flag_b, "--run-check", "--json"],
    ));
    assert_eq!(together["check"]["passed"], json!(true), "it passes alone");
    let partners: Vec<&str> = together["combined_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["partner"].as_str().unwrap())
        .collect();
    assert_eq!(partners, [flag_a]);
    assert_eq!(together["combined_checks"][0]["passed"], json!(false));
    let found = &together["interference"][0];
    assert_eq!(found["kind"], json!("combined_check"));
    assert_eq!(found["check"]["passed"], json!(false));
    let listed = ok_json(as_party(&kairos, &team_a, &["proposals", "web", "--json"]));
    let of = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proposal"] == json!(id))
            .unwrap()
            .clone()
    };
    for id in [flag_a, flag_b] {
        assert_eq!(of(id)["interference"][0]["kind"], json!("combined_check"));
        assert_eq!(of(id)["check"]["passed"], json!(true));
    }
    assert_eq!(log_events(&kairos, &team_a, "interference").len(), 2);
}

#[test]
fn a_data_directory_enforces_the_policy_of_main_and_of_forks() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let config_path = base.path().join("kairos.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[replica]]\nname = \"web\"\nroot = \"{}\"\n[replica.policy]\nrequired_approvals = 1\n[replica.policy.timeline.risky]\nrequire_prediction_below = 0.5\n",
            root.display()
        ),
    )
    .unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let config = config_path.to_str().unwrap();
    let run = |party: &str, args: &[&str]| {
        let mut all = vec!["--config", config, "--party", party];
        all.extend_from_slice(args);
        kairos.run(&all)
    };
    assert!(run("ops", &["capture", "web"]).status.success());
    let port = document(base.path(), "port", set_port(2));
    let proposal = ok_json(run("dev", &["propose", "web", "--file", &port, "--json"]));
    let id = proposal["proposal"].as_str().unwrap();
    let output = run("ops", &["commit", "web", id]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("needs 1 approvals, has 0"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("app.conf")).unwrap(),
        "port = 1\n",
        "the live replica is untouched"
    );
    ok_json(run("qa", &["review", "web", id, "--approve", "--json"]));
    let commit = ok_json(run("ops", &["commit", "web", id, "--json"]));
    assert_eq!(commit["status"], json!("committed"));
    assert_eq!(
        std::fs::read_to_string(root.join("app.conf")).unwrap(),
        "port = 2\n"
    );

    // The risky fork wants a confident low-risk prediction; with no model the
    // prediction abstains, and the commit is refused saying so.
    assert!(
        run(
            "dev",
            &[
                "timeline",
                "fork",
                "risky",
                "--replica",
                "web",
                "--at",
                "latest"
            ]
        )
        .status
        .success()
    );
    let risky = ok_json(run(
        "dev",
        &[
            "propose",
            "web",
            "--file",
            &port,
            "--timeline",
            "risky",
            "--json",
        ],
    ));
    let output = run(
        "ops",
        &["commit", "web", risky["proposal"].as_str().unwrap()],
    );
    assert!(
        stderr(&output).contains("needs a prediction with P(error) below 0.5; the model abstains"),
        "{}",
        stderr(&output)
    );

    // Policy values out of range are named by their key.
    let bad = base.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[[replica]]\nname = \"web\"\nroot = \"{}\"\n[replica.policy]\nrequired_approvals = 1000\n",
            root.display()
        ),
    )
    .unwrap();
    let error = kairos.fails(["--config", bad.to_str().unwrap(), "proposals", "web"]);
    assert!(
        error.contains("key replica[0].policy.required_approvals: 1000 is not between 0 and 32"),
        "{error}"
    );
}
