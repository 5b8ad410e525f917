//! The model end to end: training on a small seeded history, predictions with their JSON
//! shape, explanations, abstention, deterministic training, model files (round trip and
//! every kind of damage), and swapping the serving model while predictions run.

use std::sync::Arc;

use kairos_predict::{
    FileView, History, ModelError, OpView, Outcome, OutcomeRecord, Predictor, ProposalView,
    SharedPredictor, TrainingSettings, examples_from_records, train,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SECOND_NS: u64 = 1_000_000_000;

fn nginx(time_ns: u64, op: OpView) -> ProposalView {
    ProposalView {
        time_ns,
        ops: vec![op],
        base_files: vec![FileView {
            path: "nginx.conf".into(),
            keys: vec![
                ("listen".into(), "8080".into()),
                ("gzip".into(), "on".into()),
            ],
        }],
        ..ProposalView::default()
    }
}

/// Ports above 65535 and gzip values other than on/off fail.
fn history(seed: u64, count: usize) -> Vec<OutcomeRecord> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|index| {
            let time_ns = (index as u64 + 1) * 60 * SECOND_NS;
            let (op, failed) = if rng.random_bool(0.6) {
                let port: u32 = if rng.random_bool(0.7) {
                    rng.random_range(1024..65_536)
                } else {
                    rng.random_range(65_536..300_000)
                };
                (
                    OpView::set_config("nginx.conf", "listen", &port.to_string()),
                    port > 65_535,
                )
            } else {
                let value = ["on", "off", "on", "off", "maybe"][rng.random_range(0..5)];
                (
                    OpView::patch_file("nginx.conf", &[&format!("gzip {value};")], &["gzip on;"]),
                    value == "maybe",
                )
            };
            OutcomeRecord {
                proposal: nginx(time_ns, op),
                outcome: Outcome {
                    time_ns: time_ns + 10 * SECOND_NS,
                    failed,
                    cpu_percent_delta: Some(if failed { 0.0 } else { 1.0 }),
                    rss_bytes_delta: Some(1e6),
                },
            }
        })
        .collect()
}

fn settings(seed: u64) -> TrainingSettings {
    TrainingSettings {
        seed,
        members: 3,
        epochs: 40,
        batch_size: 64,
        ..TrainingSettings::default()
    }
}

fn trained(seed: u64) -> (Predictor, History, Vec<u8>) {
    let records = history(seed, 400);
    let examples = examples_from_records(&records);
    let model = train(&examples[..300], &examples[300..], &settings(seed)).expect("trains");
    let bytes = model.to_bytes().expect("serialises");
    (
        Predictor::new(model),
        History::before(&records, u64::MAX),
        bytes,
    )
}

#[test]
fn predicts_learns_the_hidden_rules_and_explains() {
    let (predictor, history, _) = trained(1);
    let later = 1_000_000 * SECOND_NS;
    let bad_port = predictor.predict(
        &nginx(later, OpView::set_config("nginx.conf", "listen", "70000")),
        &history,
    );
    let good_port = predictor.predict(
        &nginx(later, OpView::set_config("nginx.conf", "listen", "9090")),
        &history,
    );
    let typo = predictor.predict(
        &nginx(
            later,
            OpView::patch_file("nginx.conf", &["gzip maybe;"], &["gzip on;"]),
        ),
        &history,
    );
    assert!(bad_port.p_error > 0.8, "{bad_port:?}");
    assert!(good_port.p_error < 0.2, "{good_port:?}");
    assert!(typo.p_error > 0.8, "{typo:?}");
    assert!(
        !bad_port.abstain && bad_port.confidence > 0.5,
        "{bad_port:?}"
    );
    assert!(
        bad_port
            .explanation
            .iter()
            .any(|line| line.contains("key listen 8080→70000")),
        "{:?}",
        bad_port.explanation
    );
    assert!(
        typo.explanation.iter().any(|line| line.contains("maybe")),
        "{:?}",
        typo.explanation
    );
    assert_eq!(bad_port.affected, vec!["nginx.conf:listen".to_string()]);
    assert!(bad_port.resource_deltas.cpu_percent.is_some());

    let json = serde_json::to_value(&bad_port).expect("serialises");
    let keys: Vec<&str> = json
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "p_error",
            "confidence",
            "abstain",
            "resource_deltas",
            "affected",
            "explanation",
            "model"
        ]
    );
    assert!(json["resource_deltas"]["cpu_percent"].is_number());
    assert!(json["resource_deltas"]["rss_bytes"].is_number());
}

#[test]
fn abstains_without_a_model_and_out_of_distribution() {
    let untrained = Predictor::untrained();
    let proposal = nginx(5, OpView::set_config("nginx.conf", "listen", "70000"));
    let prediction = untrained.predict(&proposal, &History::new());
    assert!(prediction.abstain);
    assert_eq!(prediction.confidence, 0.0);
    assert_eq!(prediction.model, None);

    let (predictor, history, _) = trained(2);
    let unknown = ProposalView {
        time_ns: u64::MAX / 2,
        ops: vec![OpView::set_config(
            "postfix/main.cf",
            "message_size_limit",
            "10240000",
        )],
        ..ProposalView::default()
    };
    let prediction = predictor.predict(&unknown, &history);
    assert!(prediction.abstain, "{prediction:?}");
    assert!(prediction.confidence < 0.2, "{prediction:?}");
    let empty = predictor.predict(&ProposalView::default(), &history);
    assert!(empty.abstain, "{empty:?}");
}

#[test]
fn training_is_deterministic_from_the_seed() {
    let (_, _, first) = trained(3);
    let (_, _, second) = trained(3);
    assert!(first == second, "same seed, different model files");
    let (_, _, other) = trained(4);
    assert!(first != other);
}

#[test]
fn refuses_too_little_or_one_sided_history() {
    let records = history(5, 10);
    let examples = examples_from_records(&records);
    assert!(matches!(
        train(&examples, &[], &settings(5)),
        Err(ModelError::NotEnoughExamples { .. })
    ));
    let mut one_sided = examples_from_records(&history(5, 100));
    for example in &mut one_sided {
        example.failed = false;
    }
    assert!(matches!(
        train(&one_sided, &[], &settings(5)),
        Err(ModelError::NotEnoughExamples { .. })
    ));
    let bad = TrainingSettings {
        members: 0,
        ..settings(5)
    };
    assert!(matches!(
        train(&one_sided, &[], &bad),
        Err(ModelError::Setting {
            name: "members",
            ..
        })
    ));
}

fn replace(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|window| window == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} not in the model file"));
    let mut changed = bytes.to_vec();
    changed[at..at + to.len()].copy_from_slice(to.as_bytes());
    changed
}

#[test]
fn model_files_round_trip_and_damage_is_an_error() {
    let (predictor, history, bytes) = trained(6);
    let loaded = Predictor::from_bytes(&bytes).expect("loads");
    let proposal = nginx(
        u64::MAX / 2,
        OpView::set_config("nginx.conf", "listen", "70000"),
    );
    assert_eq!(
        predictor.predict(&proposal, &history),
        loaded.predict(&proposal, &history)
    );

    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header only", bytes[..64].to_vec()),
        ("garbage", vec![0xAB; 4096]),
        ("a flipped weight", {
            let mut flipped = bytes.clone();
            let at = flipped.len() - 5_000;
            flipped[at] ^= 0x40;
            flipped
        }),
        (
            "another feature dimension",
            replace(&bytes, "feature_dim\\\":640", "feature_dim\\\":512"),
        ),
        (
            "a newer format",
            replace(&bytes, "format_version\\\":1", "format_version\\\":9"),
        ),
    ];
    for (what, damaged) in damaged {
        let error = Predictor::from_bytes(&damaged).expect_err(what);
        let message = error.to_string();
        assert!(message.starts_with("model"), "{what}: {message}");
        let (fallback, why) = Predictor::from_bytes_or_abstain(&damaged);
        assert!(why.is_some());
        let prediction = fallback.predict(&proposal, &history);
        assert!(prediction.abstain && prediction.confidence == 0.0, "{what}");
    }
    let incompatible = replace(&bytes, "feature_dim\\\":640", "feature_dim\\\":512");
    assert!(matches!(
        Predictor::from_bytes(&incompatible),
        Err(ModelError::Incompatible { found: 512, .. })
    ));
    let newer = replace(&bytes, "format_version\\\":1", "format_version\\\":9");
    assert!(matches!(
        Predictor::from_bytes(&newer),
        Err(ModelError::Version { found: 9, .. })
    ));
}

#[test]
fn the_serving_model_is_swapped_whole_while_predictions_run() {
    let (first, history, _) = trained(7);
    let (second, _, _) = trained(8);
    let ids = [
        first.model().map(|model| model.id.clone()),
        second.model().map(|model| model.id.clone()),
    ];
    assert_ne!(ids[0], ids[1]);
    let shared = Arc::new(SharedPredictor::new(first.clone()));
    let history = Arc::new(history);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let shared = shared.clone();
            let history = history.clone();
            let ids = ids.clone();
            std::thread::spawn(move || {
                let proposal = nginx(
                    u64::MAX / 2,
                    OpView::set_config("nginx.conf", "listen", "70000"),
                );
                for _ in 0..300 {
                    let prediction = shared.current().predict(&proposal, &history);
                    assert!(ids.contains(&prediction.model));
                    assert!((0.0..=1.0).contains(&prediction.p_error));
                }
            })
        })
        .collect();
    for round in 0..50 {
        shared.replace(if round % 2 == 0 {
            second.clone()
        } else {
            first.clone()
        });
    }
    for reader in readers {
        reader.join().expect("reader");
    }
}
