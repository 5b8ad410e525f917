//! Kairos simulations as a library: the corruption harness ([`corruption`]) shared by the
//! `kairos-corruption` benchmark binary and the CI test that runs a few dozen of its cases.

pub mod corruption;
