//! The predictor through the node and the CLI: predictions beside propose, sandbox and
//! commit; the predictor actor retraining by itself as outcomes arrive; `predict`,
//! `model status|train|report` and `suggest`; and what bad input gets (too few outcomes,
//! a damaged model file, unknown proposals, bad flags).

use std::path::Path;
use std::time::Duration;

use kairos_ops::Service;
use kairos_ops::learn::Learner;
use kairos_store::Store;
use kairos_tests::{Kairos, Node, wait_for};
use serde_json::{Value, json};

fn propose(kairos: &Kairos, dir: &Path, document: &Value) -> Value {
    let path = dir.join("proposal.json");
    std::fs::write(&path, document.to_string()).unwrap();
    kairos.json(["propose", "app", "--file", path.to_str().unwrap(), "--json"])
}

/// A proposal setting `mode` (the check refuses `broken` and `crash`) and `workers`.
fn document(mode: &str, workers: u32) -> Value {
    json!({
        "title": format!("mode {mode}"),
        "ops": [
            {"op": "set_config", "file": "app.toml", "key": "mode", "value": mode},
            {"op": "set_config", "file": "app.toml", "key": "workers", "value": workers}
        ]
    })
}

#[test]
fn the_node_predicts_learns_from_outcomes_and_retrains_by_itself() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("app");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.toml"), "mode = \"safe\"\nworkers = 4\n").unwrap();
    let config = format!(
        "[node]\ncapture_debounce = \"100ms\"\n[predictor]\nretrain_outcomes_min = 24\nretrain_new_outcomes_min = 1000\n[[replica]]\nname = \"app\"\nroot = {root:?}\ncapture_interval = \"60s\"\ncheck = \"! grep -Eq 'broken|crash' {{root}}/app.toml\"\n",
        root = root.display().to_string(),
    );
    let data = base.path().join("data");
    let mut node = Node::start(&config, &data);
    let kairos = Kairos::at(&data);
    kairos.wait_for_first_frame("app");

    // No history: the prediction beside the proposal abstains with confidence 0.
    let first = propose(&kairos, base.path(), &document("fast", 8));
    assert_eq!(first["prediction"]["abstain"], json!(true), "{first}");
    assert_eq!(first["prediction"]["confidence"], json!(0.0));
    let status = kairos.json(["model", "status", "app", "--json"]);
    assert_eq!(status["version"], Value::Null);
    assert_eq!(status["retrain"], json!("wait"));

    // Training by hand with too few outcomes is refused, naming why.
    let refused = kairos.fails(["model", "train", "app"]);
    assert!(
        refused.contains("cannot train a model from 0 outcome(s)"),
        "{refused}"
    );

    // Outcomes: sandbox checks, each shown with the prediction made before it ran.
    let modes = ["safe", "fast", "broken", "eco", "crash", "safe"];
    for index in 0..30 {
        let mode = modes[index % modes.len()];
        let proposal = propose(&kairos, base.path(), &document(mode, 1 + index as u32 % 8));
        let id = proposal["proposal"].as_str().unwrap();
        let output = kairos.run(["sandbox", "app", id, "--run-check", "--json"]);
        let sandbox: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(sandbox["prediction"]["p_error"].is_number(), "{sandbox}");
        assert_eq!(
            sandbox["check"]["passed"],
            json!(!matches!(mode, "broken" | "crash"))
        );
    }

    // The predictor actor trained a model by itself once 24 outcomes were in.
    let status = wait_for(
        "the predictor actor to train",
        Duration::from_secs(60),
        || {
            let status = kairos.json(["model", "status", "app", "--json"]);
            (status["version"] == json!(1)).then_some(status)
        },
    );
    assert!(
        status["trained_examples"].as_u64().unwrap() >= 19,
        "{status}"
    );
    assert!(status["model"].is_string());

    // Now a risky proposal is called risky, a safe one safe.
    let risky = propose(&kairos, base.path(), &document("broken", 3));
    let prediction = kairos.json([
        "predict",
        "app",
        risky["proposal"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(prediction["model"], status["model"]);
    assert!(
        prediction["p_error"].as_f64().unwrap() > 0.5,
        "{prediction}"
    );
    assert!(!prediction["explanation"].as_array().unwrap().is_empty());
    let safe = propose(&kairos, base.path(), &document("safe", 2));
    assert!(
        safe["prediction"]["p_error"].as_f64().unwrap() < 0.5,
        "{safe}"
    );

    // The text forms name the call.
    let text =
        String::from_utf8(kairos.ok(["predict", "app", risky["proposal"].as_str().unwrap()]))
            .unwrap();
    assert!(
        text.contains("P(error)") || text.contains("no call"),
        "{text}"
    );

    // suggest ranks the safe values first.
    let ranked = kairos.json([
        "suggest",
        "app",
        "--key",
        "app.toml:mode",
        "--values",
        "broken,safe",
        "--json",
    ]);
    assert_eq!(ranked[0]["value"], json!("safe"), "{ranked}");
    let bad_key = kairos.fails(["suggest", "app", "--key", "app.toml", "--values", "a"]);
    assert!(bad_key.contains("FILE:KEY"), "{bad_key}");
    let not_config = kairos.fails([
        "suggest",
        "app",
        "--key",
        "missing.toml:mode",
        "--values",
        "a",
    ]);
    assert!(not_config.contains("missing.toml"), "{not_config}");

    // A commit shows the prediction made before it was applied, and its outcome counts.
    let commit = kairos.json([
        "commit",
        "app",
        safe["proposal"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(commit["status"], json!("committed"), "{commit}");
    assert!(commit["prediction"]["p_error"].is_number(), "{commit}");

    // The record: stored predictions scored against their outcomes, beside baselines.
    let report = kairos.json(["model", "report", "app", "--json"]);
    assert_eq!(report["outcomes"], json!(31), "{report}");
    assert!(report["scored"].as_u64().unwrap() >= 31);
    assert_eq!(report["baselines"].as_array().unwrap().len(), 2);
    let text = String::from_utf8(kairos.ok(["model", "report", "app"])).unwrap();
    assert!(text.contains("per-key failure rate"), "{text}");

    // Bad input through the node: an unknown proposal, ops that do not exist.
    let unknown = kairos.fails(["predict", "app", "abcdef12"]);
    assert!(unknown.contains("no proposal id starts with"), "{unknown}");
    let bad_ops = kairos.fails([
        "predict",
        "app",
        risky["proposal"].as_str().unwrap(),
        "--ops",
        "9",
    ]);
    assert!(bad_ops.contains("op 9 does not exist"), "{bad_ops}");

    // The log records predictions, outcomes and the model trained.
    let output = kairos.run(["log", "app", "--json"]);
    let log: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{}", log["problem"]);
    let events: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["event"].as_str().unwrap())
        .collect();
    for event in ["prediction", "outcome", "model"] {
        assert!(events.contains(&event), "no {event} in {events:?}");
    }
    assert!(node.stop());
}

/// A store in a temporary directory with one replica `app` (its `app.toml` and check),
/// for the tests that call the service in-process.
struct Local {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: Store,
    learner: Learner,
}

impl Local {
    fn new(app_toml: &str, check: Option<&str>) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("app.toml"), app_toml).unwrap();
        let local = Local {
            store: Store::open(&dir.path().join("data")).unwrap(),
            learner: Learner::new(),
            root,
            _dir: dir,
        };
        local
            .service()
            .add_replica(kairos_ops::ReplicaRequest {
                name: "app",
                root: &local.root,
                processes: Vec::new(),
                exclude: Vec::new(),
                capture_interval: "60s",
                settings: &kairos_replica::ReplicaSettings {
                    check: check.map(str::to_string),
                    ..Default::default()
                },
            })
            .unwrap();
        local
    }

    fn service(&self) -> Service<'_> {
        Service {
            store: &self.store,
            limits: kairos_core::Limits::default(),
            skip: Vec::new(),
            learner: &self.learner,
        }
    }
}

#[test]
fn a_damaged_model_falls_back_to_abstaining_and_says_why() {
    let local = Local::new("mode = \"safe\"\n", None);
    let (store, learner) = (&local.store, &local.learner);
    let service = local.service();
    for _ in 0..4 {
        service.capture_directly("app").unwrap();
    }
    // A model file that is not one (truncated, flipped, from elsewhere): stored intact,
    // so only the predictor's own checks can refuse it.
    store
        .put_model(
            "app",
            kairos_core::Instant::now(),
            b"not a safetensors file",
            "{}",
        )
        .unwrap();
    let document =
        kairos_sandbox::ProposalDocument::parse(document("fast", 2).to_string().as_bytes())
            .unwrap();
    let proposal = service.propose("app", document, None, "ops").unwrap();
    let prediction = service
        .predict("app", &proposal.proposal.to_hex(), None, "ops")
        .unwrap();
    // The view carries the replica's resource trend over the frames before the base.
    let stored = service
        .proposal("app", &proposal.proposal.to_hex())
        .unwrap();
    let replica = store.replica("app").unwrap();
    let view = learner
        .proposal_view(
            store,
            &replica,
            &stored,
            &[1, 2],
            kairos_core::Instant::now(),
        )
        .unwrap();
    assert!(view.trend.is_some(), "{view:?}");
    assert_eq!(view.ops.len(), 2);
    assert!(prediction.abstain);
    assert_eq!(prediction.confidence, 0.0);
    assert!(
        prediction
            .model_error
            .as_deref()
            .is_some_and(|error| error.contains("model version 1")),
        "{prediction:?}"
    );
    let status = service.model_status("app").unwrap();
    assert_eq!(status.version, Some(1));
    assert!(status.model.is_none());
    assert!(status.model_error.is_some());
    // A damaged model record: the status says so instead of failing.
    let mut batch = kairos_store::kv::WriteBatch::new();
    batch
        .put(kairos_store::keys::model("app", 2), b"{not json".to_vec())
        .unwrap();
    store.kv().commit(batch).unwrap();
    let status = service.model_status("app").unwrap();
    assert!(
        status
            .model_error
            .as_deref()
            .is_some_and(|error| error.contains("model")),
        "{status:?}"
    );

    // An empty proposal cannot exist; an enormous one is predicted in bounded time.
    let ops: Vec<Value> = (0..500)
        .map(|index| json!({"op": "set_config", "file": "app.toml", "key": format!("k{index}"), "value": index}))
        .collect();
    let big = kairos_sandbox::ProposalDocument::parse(
        json!({"title": "many keys", "ops": ops})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let big = service.propose("app", big, None, "ops").unwrap();
    let prediction = big.prediction.expect("a prediction");
    assert!(prediction.abstain);
    assert!(prediction.affected.len() <= kairos_predict::predictor::AFFECTED_ITEMS_MAX);
    let empty = kairos_sandbox::ProposalDocument::parse(br#"{"title": "nothing", "ops": []}"#);
    assert!(empty.is_err());
}

#[test]
fn an_outcome_lost_between_its_record_and_itself_is_recovered() {
    let local = Local::new(
        "mode = \"safe\"\nworkers = 1\n",
        Some("! grep -q broken {root}/app.toml"),
    );
    let (store, root) = (&local.store, &local.root);
    let service = local.service();
    service.capture_directly("app").unwrap();
    let document =
        kairos_sandbox::ProposalDocument::parse(document("broken", 2).to_string().as_bytes())
            .unwrap();
    let proposal = service.propose("app", document, None, "ops").unwrap();
    let sandbox = service
        .sandbox("app", &proposal.proposal.to_hex(), None, true, "ops")
        .unwrap();
    assert!(!sandbox.report.check.as_ref().unwrap().passed);
    let outcomes = kairos_ops::learn::outcomes(store, "app").unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].1.failed);
    assert_eq!(outcomes[0].1.example.proposal.ops.len(), 2);

    // A crash between the sandbox record and its outcome: the outcome is missing.
    let mut batch = kairos_store::kv::WriteBatch::new();
    batch
        .delete(kairos_store::keys::replica_record(
            kairos_store::keys::OUTCOME,
            "app",
            outcomes[0].0.as_bytes(),
        ))
        .unwrap();
    store.kv().commit(batch).unwrap();
    assert!(
        kairos_ops::learn::outcomes(store, "app")
            .unwrap()
            .is_empty()
    );
    // Recovered from the sandbox record, once.
    assert_eq!(service.backfill_outcomes("app").unwrap(), 1);
    assert_eq!(service.backfill_outcomes("app").unwrap(), 0);
    let recovered = kairos_ops::learn::outcomes(store, "app").unwrap();
    assert_eq!(recovered[0].1.source_id, outcomes[0].1.source_id);
    assert!(recovered[0].1.failed);

    // A config file with thousands of keys: the sandbox answers, and its outcome is cut
    // to fit a record rather than refused.
    let many: String = (0..5000)
        .map(|k| format!("key{k:05} = \"{}\"\n", "v".repeat(20)))
        .collect();
    std::fs::write(root.join("many.toml"), many).unwrap();
    service.capture_directly("app").unwrap();
    let document = kairos_sandbox::ProposalDocument::parse(
        json!({"title": "one of many", "ops": [{"op": "set_config", "file": "many.toml", "key": "key00001", "value": "w"}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let proposal = service.propose("app", document, None, "ops").unwrap();
    let sandbox = service
        .sandbox("app", &proposal.proposal.to_hex(), None, true, "ops")
        .unwrap();
    assert!(sandbox.report.check.as_ref().unwrap().passed);
    let outcomes = kairos_ops::learn::outcomes(store, "app").unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(!outcomes[1].1.failed);
    assert!(!outcomes[1].1.example.proposal.base_files.is_empty());

    // suggest refuses what it cannot rank.
    let values: Vec<String> = (0..300).map(|v| v.to_string()).collect();
    let error = service
        .suggest("app", "app.toml", "workers", &values, None)
        .unwrap_err();
    assert!(error.to_string().contains("at most 256"), "{error}");
    let error = service
        .suggest(
            "app",
            "app.toml",
            "workers",
            &["2".into(), " ".into()],
            None,
        )
        .unwrap_err();
    assert!(error.to_string().contains("value 2 is empty"), "{error}");
    let error = service
        .suggest("app", "app.toml", "", &["2".into()], None)
        .unwrap_err();
    assert!(error.to_string().contains("file and a key"), "{error}");
}
