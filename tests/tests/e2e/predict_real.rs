//! The predictor on a real service: a few hundred nginx config proposals go through
//! propose + sandbox --run-check (the real `nginx -t`), the model trains on their
//! outcomes, then predicts unseen proposals before their sandbox runs; the predictions are
//! compared with the real check.

use std::path::Path;

use kairos_ops::learn::Learner;
use kairos_ops::{ReplicaRequest, Service};
use kairos_replica::ReplicaSettings;
use kairos_sandbox::ProposalDocument;
use kairos_store::Store;
use kairos_tests::services::Nginx;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Directives a proposal may change: (name, valid values, invalid values). The invalid
/// ones are what `nginx -t` refuses; the model is never told which.
const DIRECTIVES: &[(&str, &[&str], &[&str])] = &[
    (
        "worker_processes",
        &["1", "2", "4", "auto"],
        &["many", "-3"],
    ),
    (
        "worker_connections",
        &["32", "64", "128", "512", "1024"],
        &["lots", "1k2"],
    ),
    ("gzip", &["on", "off"], &["maybe", "yes"]),
    ("sendfile", &["on", "off"], &["enabled", "1"]),
    (
        "keepalive_timeout",
        &["5", "30", "65", "120s"],
        &["forever", "-5"],
    ),
    (
        "client_max_body_size",
        &["1m", "8m", "64m", "512k"],
        &["big", "8q"],
    ),
    ("server_tokens", &["on", "off"], &["maybe", "hidden"]),
];

fn config(run: &Path, port: u16, values: &[String]) -> String {
    let user = if kairos_tests::services::is_root() {
        "user root;\n"
    } else {
        ""
    };
    let run = run.display();
    format!(
        "{user}worker_processes {};\npid {run}/nginx.pid;\nerror_log stderr;\nevents {{\n    worker_connections {};\n}}\nhttp {{\n    access_log off;\n    gzip {};\n    sendfile {};\n    keepalive_timeout {};\n    client_max_body_size {};\n    server_tokens {};\n    client_body_temp_path {run}/client_body;\n    proxy_temp_path {run}/proxy;\n    fastcgi_temp_path {run}/fastcgi;\n    uwsgi_temp_path {run}/uwsgi;\n    scgi_temp_path {run}/scgi;\n    server {{\n        listen 127.0.0.1:{port};\n        root html;\n        location /health {{ return 200 'ok'; }}\n    }}\n}}\n",
        values[0], values[1], values[2], values[3], values[4], values[5], values[6]
    )
}

/// A seeded proposal: one to three directives changed, each to a valid value or (about
/// one time in four) to one nginx refuses. Half are full files, half unified diffs.
fn proposal(rng: &mut StdRng, run: &Path, port: u16, base: &[String]) -> (ProposalDocument, bool) {
    let mut values = base.to_vec();
    let changes = rng.random_range(1..=3);
    let mut broken = false;
    for _ in 0..changes {
        let index = rng.random_range(0..DIRECTIVES.len());
        let (_, valid, invalid) = DIRECTIVES[index];
        values[index] = if rng.random_bool(0.25) {
            broken = true;
            invalid[rng.random_range(0..invalid.len())].to_string()
        } else {
            valid[rng.random_range(0..valid.len())].to_string()
        };
    }
    let old = config(run, port, base);
    let new = config(run, port, &values);
    let op = if rng.random_bool(0.5) {
        json!({"op": "put_file", "path": "nginx.conf", "content": new})
    } else {
        json!({"op": "patch_file", "path": "nginx.conf", "unified_diff": diffy::create_patch(&old, &new).to_string()})
    };
    let document = json!({"title": "tune nginx", "ops": [op]});
    (
        ProposalDocument::parse(document.to_string().as_bytes()).unwrap(),
        broken,
    )
}

#[test]
fn nginx_proposals_are_predicted_before_their_real_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("web");
    let run = dir.path().join("run");
    let nginx = Nginx::start(&root, &run);
    let base: Vec<String> = ["1", "64", "off", "on", "65", "1m", "on"]
        .iter()
        .map(|value| value.to_string())
        .collect();
    std::fs::write(root.join("nginx.conf"), config(&run, nginx.port, &base)).unwrap();

    let store = Store::open(&dir.path().join("data")).unwrap();
    let learner = Learner::new();
    let service = Service {
        store: &store,
        limits: kairos_core::Limits::default(),
        skip: Vec::new(),
        learner: &learner,
    };
    let settings = ReplicaSettings {
        check: Some(nginx.check_command()),
        ..ReplicaSettings::default()
    };
    service
        .add_replica(ReplicaRequest {
            name: "web",
            root: &root,
            processes: vec!["nginx".into()],
            exclude: Vec::new(),
            capture_interval: "60s",
            settings: &settings,
        })
        .unwrap();
    service.capture_directly("web").unwrap();

    // Before any outcome: no model, every prediction abstains with confidence 0.
    let mut rng = StdRng::seed_from_u64(7);
    let (document, _) = proposal(&mut rng, &run, nginx.port, &base);
    let first = service.propose("web", document, None, "ops").unwrap();
    let prediction = first.prediction.expect("a prediction beside the proposal");
    assert!(prediction.abstain);
    assert_eq!(prediction.confidence, 0.0);
    assert!(prediction.model.is_none());

    // History: real outcomes of the real check.
    const HISTORY: usize = 260;
    const UNSEEN: usize = 60;
    let mut agreed_with_generator = 0usize;
    for _ in 0..HISTORY {
        let (document, broken) = proposal(&mut rng, &run, nginx.port, &base);
        let stored = service.propose("web", document, None, "ops").unwrap();
        let sandbox = service
            .sandbox("web", &stored.proposal.to_hex(), None, true, "ops")
            .unwrap();
        let passed = sandbox.report.check.as_ref().unwrap().passed;
        agreed_with_generator += usize::from(passed != broken);
    }
    // The generator's idea of broken is nginx's (a sanity check of the test itself).
    assert!(
        agreed_with_generator >= HISTORY * 95 / 100,
        "nginx -t agreed with the generator on only {agreed_with_generator} of {HISTORY}"
    );

    let status = service.train_model("web", "ops").unwrap();
    assert_eq!(status.version, Some(1));
    assert_eq!(status.outcomes, HISTORY);
    assert!(status.held_out.unwrap().auc.unwrap() > 0.8, "{status:?}");
    // Nothing new: the serving model is kept, not stored again.
    let again = service.train_model("web", "ops").unwrap();
    assert_eq!(again.version, Some(1));
    assert_eq!(again.model, status.model);
    assert_eq!(again.retrain, "keep", "{again:?}");

    // Unseen proposals: predicted as they are proposed, before their sandbox runs.
    let (mut called, mut agreed, mut abstained) = (0usize, 0usize, 0usize);
    let mut last_model = None;
    for _ in 0..UNSEEN {
        let (document, _) = proposal(&mut rng, &run, nginx.port, &base);
        let stored = service.propose("web", document, None, "ops").unwrap();
        let prediction = stored.prediction.expect("a prediction");
        assert!(prediction.model.is_some());
        assert!(prediction.inference_us < 50_000);
        last_model.clone_from(&prediction.model);
        let sandbox = service
            .sandbox("web", &stored.proposal.to_hex(), None, true, "ops")
            .unwrap();
        let failed = !sandbox.report.check.as_ref().unwrap().passed;
        if prediction.abstain {
            abstained += 1;
            continue;
        }
        called += 1;
        agreed += usize::from((prediction.p_error >= 0.5) == failed);
        if failed && prediction.p_error >= 0.5 {
            assert!(
                !prediction.explanation.is_empty(),
                "a risky call is explained: {prediction:?}"
            );
        }
    }
    eprintln!(
        "unseen: {UNSEEN}, abstained {abstained}, called {called}, agreed with nginx -t {agreed}"
    );
    assert!(
        abstained * 100 <= UNSEEN * 40,
        "abstained on {abstained} of {UNSEEN}"
    );
    assert!(
        agreed * 100 >= called * 90,
        "agreed with nginx -t on {agreed} of {called} calls"
    );

    // The honest record: every proposal's stored prediction scored against its outcome.
    let report = service.model_report("web").unwrap();
    assert_eq!(report.outcomes, HISTORY + UNSEEN);
    assert_eq!(report.scored, HISTORY + UNSEEN);
    assert_eq!(report.baselines.len(), 2);
    assert!(report.model.report.auc.is_some());
    let status = service.model_status("web").unwrap();
    assert_eq!(status.outcomes, HISTORY + UNSEEN);
    assert!(status.model.is_some());
    assert_eq!(status.model, last_model);
}
