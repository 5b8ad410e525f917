//! The predictor's held-out evaluation on the synthetic services meets the targets of
//! issue 10 (AUC, ECE, accuracy and coverage at confidence ≥ 0.8, abstention out of
//! distribution) and beats both baselines, for a fixed seed.

use kairos_simulations::eval::{self, EvalSettings};

#[test]
fn held_out_predictions_meet_the_targets() {
    let settings = EvalSettings::new(7);
    let report = eval::run(&settings).expect("the evaluation runs");
    println!("{}", eval::render(&report));
    if let Err(missed) = eval::check_targets(&report) {
        panic!("{missed}; replay: {}", report.command);
    }
    // The model did not abstain its way to the figures.
    assert!(report.test_abstention < 0.1, "{}", report.test_abstention);
}
