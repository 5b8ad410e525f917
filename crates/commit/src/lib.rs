//! Kairos commits.
