//! Bad input never panics: any proposal (arbitrary text in paths, keys, values and lines,
//! any number of ops, base files with any values) becomes a finite vector of the fixed
//! size, and a trained predictor gives a probability and confidence in [0, 1] for it.

use std::sync::OnceLock;

use kairos_predict::{
    FEATURE_DIM, FileView, History, OpKind, OpView, Outcome, OutcomeRecord, Predictor,
    ProposalView, TrainingSettings, examples_from_records, features_with, train,
};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Option<OpKind>> {
    prop_oneof![
        Just(None),
        proptest::sample::select(OpKind::ALL.to_vec()).prop_map(Some),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z_.]{1,12}",
        "-?[0-9]{1,25}(\\.[0-9]{1,5})?",
        Just("listen 70000;".to_string()),
        Just("\"quoted\"".to_string()),
        Just("1e400".to_string()),
        Just("NaN".to_string()),
    ]
}

fn op() -> impl Strategy<Value = OpView> {
    (
        kind(),
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::vec(text(), 0..6),
        proptest::collection::vec(text(), 0..6),
    )
        .prop_map(
            |(kind, path, key, value, lines_added, lines_removed)| OpView {
                kind,
                path,
                key,
                value,
                lines_added,
                lines_removed,
            },
        )
}

fn proposal() -> impl Strategy<Value = ProposalView> {
    (
        any::<u64>(),
        proptest::collection::vec(op(), 0..8),
        proptest::collection::vec(
            (text(), proptest::collection::vec((text(), text()), 0..6)),
            0..3,
        ),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(|(time_ns, ops, base_files, dependents)| ProposalView {
            time_ns,
            ops,
            base_files: base_files
                .into_iter()
                .map(|(path, keys)| FileView { path, keys })
                .collect(),
            dependents,
            ..ProposalView::default()
        })
}

/// A small model and a history, trained once for all cases.
fn trained() -> &'static (Predictor, History) {
    static TRAINED: OnceLock<(Predictor, History)> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let records: Vec<OutcomeRecord> = (0..120u64)
            .map(|index| {
                let port = 1_000 + index * 997;
                OutcomeRecord {
                    proposal: ProposalView {
                        time_ns: index * 10,
                        ops: vec![OpView::set_config(
                            "app.toml",
                            "server.port",
                            &port.to_string(),
                        )],
                        ..ProposalView::default()
                    },
                    outcome: Outcome {
                        time_ns: index * 10 + 5,
                        failed: port > 65_535,
                        ..Outcome::default()
                    },
                }
            })
            .collect();
        let examples = examples_from_records(&records);
        let settings = TrainingSettings {
            members: 2,
            epochs: 5,
            ..TrainingSettings::default()
        };
        let model = train(&examples[..100], &examples[100..], &settings).expect("trains");
        (Predictor::new(model), History::before(&records, u64::MAX))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_proposal_gives_a_finite_fixed_size_vector_and_a_bounded_prediction(proposal in proposal()) {
        let (predictor, history) = trained();
        let features = features_with(&proposal, history, None);
        prop_assert_eq!(features.values.len(), FEATURE_DIM);
        prop_assert!(features.values.iter().all(|value| value.is_finite()));
        let prediction = predictor.predict(&proposal, history);
        prop_assert!((0.0..=1.0).contains(&prediction.p_error), "{:?}", prediction);
        prop_assert!((0.0..=1.0).contains(&prediction.confidence), "{:?}", prediction);
        let untrained = Predictor::untrained().predict(&proposal, history);
        prop_assert!(untrained.abstain && untrained.confidence == 0.0);
    }
}
