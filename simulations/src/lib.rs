//! `kairos-simulations`: synthetic services and histories reproducible from a seed
//! (`outcomes`), and the predictor's held-out evaluation against baselines (`eval`).

pub mod eval;
pub mod outcomes;
