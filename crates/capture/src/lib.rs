//! Kairos capture sources: the directory tree, config files, processes and resource
//! metrics of a replica, written into the store as one frame.

pub mod capture;
pub mod process;

pub use capture::{CaptureError, CaptureReport, CaptureRequest, capture, capture_if_changed};
pub use kairos_replica::settings::{ReplicaSettings, define_replica};
pub use kairos_replica::{config, exclude};
