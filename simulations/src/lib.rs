//! `kairos-simulations`: synthetic services and histories reproducible from a seed
//! (`outcomes`), the predictor's held-out evaluation against baselines (`eval`), and the
//! corruption harness (`corruption`) shared by the `kairos-corruption` benchmark binary
//! and the CI test that runs a few dozen of its cases.

pub mod corruption;
pub mod eval;
pub mod outcomes;
