//! The pipeline gate as CI runs it: the `kairos gate` command lines of
//! `deploy/ci/github-actions.yml` and `deploy/ci/gitlab-ci.yml`, extracted from the files
//! and run as they are (through `bash`, with the variables CI would set) against a real
//! node with parties: exit 0 when the change passes (and is committed), 1 when the gate
//! refuses it (a failing check, an untrusted prediction, a rolled-back commit), 2 when it
//! cannot run (a missing, wrong or revoked token, a role too low, an unknown replica, an
//! unreachable node); every format (markdown, junit parsed as XML, json with its
//! documented fields, text) and the `gate` audit events.

use std::path::{Path, PathBuf};
use std::process::Output;

use kairos_tests::{Kairos, Node, free_port, kairos_bin};
use serde_json::{Value, json};

/// The `kairos gate` commands of a CI file: each `run:`/`script:` line that starts with
/// `kairos gate`, up to the shell's redirection or list operator.
fn gate_commands(file: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy/ci")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(str::trim_start)
        .map(|line| line.strip_prefix("- ").unwrap_or(line))
        .map(|line| line.strip_prefix("run: ").unwrap_or(line))
        .filter(|line| line.starts_with("kairos gate "))
        .map(|line| {
            let end = line.find(['>', '|', ';', '&']).unwrap_or(line.len());
            line[..end].trim_end().to_string()
        })
        .collect()
}

/// What CI sets: the node, the token, the replica, the change and the thresholds.
struct Ci<'a> {
    node: &'a str,
    token: Option<&'a str>,
    replica: &'a str,
    change: &'a Path,
    min_confidence: &'a str,
    work: &'a Path,
}

impl Ci<'_> {
    fn run(&self, command: &str) -> Output {
        let bin_dir = kairos_bin().parent().unwrap().to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut shell = std::process::Command::new("bash");
        shell
            .args(["-c", command])
            .current_dir(self.work)
            .env("PATH", path)
            .env("KAIROS_NODE", self.node)
            .env("KAIROS_REPLICA", self.replica)
            .env("KAIROS_CHANGE", self.change)
            .env("KAIROS_MAX_RISK", "0.2")
            .env("KAIROS_MIN_CONFIDENCE", self.min_confidence)
            .env_remove("KAIROS_DATA_DIR")
            .env_remove("KAIROS_PARTY")
            .env_remove("KAIROS_TOKEN");
        if let Some(token) = self.token {
            shell.env("KAIROS_TOKEN", token);
        }
        shell.output().unwrap()
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A JUnit report parsed as XML: the testsuite's attributes and each testcase's name and
/// result (`pass`, `failure`, `skipped`).
/// Name and value pairs, in document order.
type Pairs = Vec<(String, String)>;

fn junit(bytes: &[u8]) -> (Pairs, Pairs) {
    use xml::reader::{EventReader, XmlEvent};
    let mut suite = Vec::new();
    let mut cases: Vec<(String, String)> = Vec::new();
    for event in EventReader::new(bytes) {
        match event.expect("the JUnit report is well-formed XML") {
            XmlEvent::StartElement {
                name, attributes, ..
            } => match name.local_name.as_str() {
                "testsuite" => {
                    suite = attributes
                        .into_iter()
                        .map(|a| (a.name.local_name, a.value))
                        .collect();
                }
                "testcase" => {
                    let name = attributes
                        .iter()
                        .find(|a| a.name.local_name == "name")
                        .map(|a| a.value.clone())
                        .unwrap();
                    cases.push((name, "pass".into()));
                }
                "failure" | "skipped" => {
                    cases.last_mut().unwrap().1 = name.local_name;
                }
                _ => {}
            },
            XmlEvent::EndDocument => break,
            _ => {}
        }
    }
    (suite, cases)
}

fn attribute<'a>(suite: &'a [(String, String)], name: &str) -> &'a str {
    &suite.iter().find(|(n, _)| n == name).unwrap().1
}

/// The documented fields of `kairos.gate/1`.
fn check_json(gate: &Value, verdict: &str) {
    assert_eq!(gate["schema"], "kairos.gate/1");
    assert_eq!(gate["verdict"], verdict);
    for field in [
        "replica",
        "proposal",
        "title",
        "author",
        "timeline",
        "base",
        "ops",
        "reasons",
        "criteria",
        "thresholds",
        "prediction",
        "diff",
        "check",
        "commit",
    ] {
        assert!(gate.get(field).is_some(), "no {field} in {gate}");
    }
    let names: Vec<&str> = gate["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["confidence", "risk", "check", "commit"]);
    for field in ["p_error", "confidence", "abstain"] {
        assert!(gate["prediction"].get(field).is_some(), "{gate}");
    }
    assert_eq!(
        gate["reasons"].as_array().unwrap().is_empty(),
        verdict == "pass"
    );
}

fn change(dir: &Path, name: &str, ops: Value) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, json!({"title": name, "ops": ops}).to_string()).unwrap();
    path
}

fn set_port(port: &str) -> Value {
    json!([{"op": "set_config", "file": "app.conf", "key": "port", "value": port}])
}

fn config(root: &Path) -> String {
    format!(
        r#"[node]
capture_debounce = "100ms"

[[replica]]
name = "web"
root = "{}"
capture_interval = "60s"
check = "grep -Eq '^port = [0-9]+$' {{root}}/app.conf"
watch_window = "600ms"
probe_interval = "100ms"

[[replica.probe]]
kind = "command"
command = "test ! -f {{root}}/broken"
"#,
        root.display()
    )
}

fn add_party(kairos: &Kairos, admin: Option<&str>, name: &str, role: &str) -> String {
    let mut args = vec!["party", "add", name, "--role", role, "--json"];
    let token;
    if let Some(admin) = admin {
        token = admin.to_string();
        args.splice(0..0, ["--token", token.as_str()]);
    }
    kairos.json(&args)["token"].as_str().unwrap().to_string()
}

#[test]
fn the_ci_examples_gate_commands_pass_refuse_and_fail_with_exit_codes_0_1_2_in_every_format() {
    let github = gate_commands("github-actions.yml");
    let gitlab = gate_commands("gitlab-ci.yml");
    assert_eq!(
        (github.len(), gitlab.len()),
        (2, 2),
        "{github:?} {gitlab:?}"
    );
    let (commits, gates): (Vec<String>, Vec<String>) = github
        .iter()
        .chain(&gitlab)
        .cloned()
        .partition(|command| command.contains("--commit"));
    assert_eq!((gates.len(), commits.len()), (2, 2));

    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 8080\n").unwrap();
    let work = base.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let admin = add_party(&kairos, None, "root", "admin");
    let node = Node::start(&config(&root), kairos.data_dir());
    kairos.ok(["--token", &admin, "capture", "web"]);
    let ci = add_party(&kairos, Some(&admin), "ci", "committer");
    let intern = add_party(&kairos, Some(&admin), "intern", "proposer");
    let auditor = add_party(&kairos, Some(&admin), "auditor", "viewer");

    let good = change(base.path(), "good", set_port("9090"));
    let bad = change(base.path(), "bad", set_port("eighty"));
    let untrusted = Ci {
        node: &node.url,
        token: Some(&ci),
        replica: "web",
        change: &good,
        min_confidence: "0.7",
        work: &work,
    };

    for command in &gates {
        // Passes: no model yet, so only with min confidence 0, and the check decides.
        let output = Ci {
            min_confidence: "0",
            ..untrusted
        }
        .run(command);
        let (stdout, stderr) = text(&output);
        assert_eq!(code(&output), 0, "{command}: {stdout} {stderr}");
        assert!(stdout.starts_with("### ✅ Kairos gate passed"), "{stdout}");
        assert!(stdout.contains("**Prediction:** **no call**"), "{stdout}");
        assert!(
            stdout.contains("**Changes:** 1 file, 1 config key"),
            "{stdout}"
        );
        assert!(
            stdout.contains("config app.conf: port: 8080 -> 9090"),
            "{stdout}"
        );
        assert!(stdout.contains("**Check:** passed"), "{stdout}");
        let (suite, cases) = junit(&std::fs::read(work.join("kairos-gate.xml")).unwrap());
        assert_eq!(
            (attribute(&suite, "tests"), attribute(&suite, "failures")),
            ("4", "0")
        );
        assert_eq!(
            cases,
            [
                ("confidence".to_string(), "pass".to_string()),
                ("risk".into(), "skipped".into()),
                ("check".into(), "pass".into()),
                ("commit".into(), "skipped".into()),
            ]
        );
        let gate: Value =
            serde_json::from_slice(&std::fs::read(work.join("kairos-gate.json")).unwrap()).unwrap();
        check_json(&gate, "pass");
        assert_eq!(gate["author"], "ci", "the token's party proposes");
        assert_eq!(gate["diff"]["files_changed"], 1);
        assert_eq!(gate["check"]["passed"], true);
        assert_eq!(gate["prediction"]["abstain"], true);

        // A failing check refuses (exit 1), naming it in every format.
        let output = Ci {
            change: &bad,
            min_confidence: "0",
            ..untrusted
        }
        .run(command);
        let (stdout, stderr) = text(&output);
        assert_eq!(code(&output), 1, "{command}: {stdout} {stderr}");
        assert!(stdout.starts_with("### ❌ Kairos gate refused"), "{stdout}");
        assert!(
            stdout.contains("- check: the check failed: exit 1"),
            "{stdout}"
        );
        assert!(
            stderr.contains("gate refused: check: the check failed"),
            "{stderr}"
        );
        let (suite, cases) = junit(&std::fs::read(work.join("kairos-gate.xml")).unwrap());
        assert_eq!(attribute(&suite, "failures"), "1");
        assert_eq!(cases[2], ("check".to_string(), "failure".to_string()));
        let gate: Value =
            serde_json::from_slice(&std::fs::read(work.join("kairos-gate.json")).unwrap()).unwrap();
        check_json(&gate, "refuse");
        assert_eq!(gate["check"]["passed"], false);

        // Without a trained model the prediction cannot be trusted: refused, and the
        // comment says the prediction is no verdict.
        let output = untrusted.run(command);
        let (stdout, _) = text(&output);
        assert_eq!(code(&output), 1, "{command}: {stdout}");
        assert!(
            stdout.contains("- confidence: the prediction cannot be trusted: the model abstains (there is no trained model"),
            "{stdout}"
        );
        assert!(
            stdout.contains("this is no verdict on the change"),
            "{stdout}"
        );

        // The gate cannot run: exit 2, whatever the format, with the reason on stderr.
        let unreachable = format!("http://127.0.0.1:{}", free_port());
        for (why, ci, expected) in [
            (
                "a wrong token",
                Ci {
                    token: Some("kairos_wrong"),
                    ..untrusted
                },
                "names no party",
            ),
            (
                "no token",
                Ci {
                    token: None,
                    ..untrusted
                },
                "needs a party's token",
            ),
            (
                "a viewer's token",
                Ci {
                    token: Some(&auditor),
                    ..untrusted
                },
                "needs role proposer",
            ),
            (
                "an unknown replica",
                Ci {
                    replica: "nope",
                    ..untrusted
                },
                "nope",
            ),
            (
                "an unreachable node",
                Ci {
                    node: &unreachable,
                    ..untrusted
                },
                "node",
            ),
        ] {
            let output = ci.run(command);
            let (stdout, stderr) = text(&output);
            assert_eq!(code(&output), 2, "{why}: {command}: {stdout} {stderr}");
            assert!(stderr.contains(expected), "{why}: {stderr}");
        }
    }

    // Committing: above a proposer's role (exit 2, the live file untouched), then a
    // committer's gate commits (exit 0), and a change that breaks the probe is rolled
    // back (exit 1).
    for (index, command) in commits.iter().enumerate() {
        let port = format!("{}", 9100 + index);
        let wanted = change(base.path(), &format!("commit-{index}"), set_port(&port));
        let before = std::fs::read_to_string(root.join("app.conf")).unwrap();
        let output = Ci {
            token: Some(&intern),
            change: &wanted,
            min_confidence: "0",
            ..untrusted
        }
        .run(command);
        let (stdout, stderr) = text(&output);
        assert_eq!(code(&output), 2, "{command}: {stdout} {stderr}");
        assert!(stderr.contains("needs role committer"), "{stderr}");
        assert_eq!(
            std::fs::read_to_string(root.join("app.conf")).unwrap(),
            before
        );

        let output = Ci {
            change: &wanted,
            min_confidence: "0",
            ..untrusted
        }
        .run(command);
        let (stdout, stderr) = text(&output);
        assert_eq!(code(&output), 0, "{command}: {stdout} {stderr}");
        assert_eq!(
            std::fs::read_to_string(root.join("app.conf")).unwrap(),
            format!("port = {port}\n")
        );
        if command.contains("--format junit") {
            let (_, cases) = junit(&output.stdout);
            assert_eq!(cases[3], ("commit".to_string(), "pass".to_string()));
        } else {
            assert!(stdout.starts_with("gate passed"), "{stdout}");
            assert!(stdout.contains("pass commit     committed as"), "{stdout}");
        }

        let breaking = change(
            base.path(),
            &format!("breaking-{index}"),
            json!([{"op": "put_file", "path": "broken", "content": "yes\n"}]),
        );
        let output = Ci {
            change: &breaking,
            min_confidence: "0",
            ..untrusted
        }
        .run(command);
        let (stdout, stderr) = text(&output);
        assert_eq!(code(&output), 1, "{command}: {stdout} {stderr}");
        assert!(!root.join("broken").exists(), "rolled back");
        if command.contains("--format junit") {
            let (_, cases) = junit(&output.stdout);
            assert_eq!(cases[3], ("commit".to_string(), "failure".to_string()));
        } else {
            assert!(stdout.contains("ended rolled_back"), "{stdout}");
        }
    }

    // Every verdict is in the audit log as a gate event, refusals with their reasons.
    let log = kairos.json(["--token", &auditor, "log", "web", "--json"]);
    let gates: Vec<&Value> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["event"] == "gate")
        .collect();
    // Per PR command: pass, refuse (check), refuse (trust); per commit command: pass, refuse.
    assert_eq!(gates.len(), 2 * 3 + 2 * 2, "{gates:?}");
    let refusals: Vec<&&Value> = gates
        .iter()
        .filter(|entry| entry["details"]["verdict"] == "refuse")
        .collect();
    assert_eq!(refusals.len(), 2 * 2 + 2);
    assert!(refusals.iter().all(|entry| {
        entry["party"] == "ci" && !entry["details"]["reasons"].as_array().unwrap().is_empty()
    }));
    assert!(
        gates
            .iter()
            .any(|entry| entry["details"]["commit"].is_string()),
        "a committing gate names its commit"
    );
}

#[test]
fn on_a_data_directory_the_gate_answers_the_same_and_bad_thresholds_are_exit_2() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 8080\n").unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let config_path = base.path().join("kairos.toml");
    std::fs::write(&config_path, config(&root)).unwrap();
    let config_arg = config_path.display().to_string();
    kairos.ok(["--config", &config_arg, "capture", "web"]);
    let good = change(base.path(), "good", set_port("9090"));
    let good = good.display().to_string();
    let gate = |extra: &[&str]| {
        let mut args = vec!["--config", &config_arg, "gate", "web", "--file", &good];
        args.extend_from_slice(extra);
        kairos.run(&args)
    };
    let output = gate(&["--min-confidence", "0", "--run-check", "--format", "json"]);
    assert_eq!(code(&output), 0, "{:?}", text(&output));
    check_json(&serde_json::from_slice(&output.stdout).unwrap(), "pass");
    let output = gate(&["--format", "text"]);
    assert_eq!(code(&output), 1);
    assert!(text(&output).0.starts_with("gate REFUSED"));
    for bad in [&["--max-risk", "1.5"][..], &["--min-confidence=-1"]] {
        let output = gate(bad);
        assert_eq!(code(&output), 2, "{bad:?}");
        assert!(text(&output).1.contains("is not between 0 and 1"));
    }
    let output = gate(&["--format", "yaml"]);
    assert_eq!(code(&output), 2, "clap's own usage errors are exit 2 too");
    let output = gate(&["--write", "junit"]);
    assert_eq!(code(&output), 2);
    // Nothing was proposed by the refused invocations above.
    let proposals = kairos.json(["proposals", "web", "--json"]);
    assert_eq!(proposals.as_array().unwrap().len(), 2);
}
