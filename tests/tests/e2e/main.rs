//! Kairos's end-to-end tests, linked as one test binary: each module is one area
//! (`cargo nextest run -p kairos-tests --test e2e node::` runs one of them). One binary
//! instead of one per area keeps the workspace's test build to a single link of the
//! whole dependency graph; nextest still runs every test in its own process.

mod bisect;
mod catalog;
mod changes;
mod cluster;
mod corruption;
mod deploy_files;
mod forget;
mod forget_attacks;
mod foundation;
mod fuzz_corpus;
mod gate;
mod gc;
mod habits;
mod idle;
mod metrics;
mod nats;
mod node;
mod predict_node;
mod predict_real;
mod review;
mod store_trust;
mod telemetry;
mod trust;
mod web;
mod webhooks;
