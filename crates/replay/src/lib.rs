//! Kairos replay: open the state of a replica at any frame (one index lookup and one root
//! read), list its entries, config keys, processes and metrics, read a file, diff two
//! states and restore a frame into a directory.

pub mod diff;
pub mod restore;
pub mod sparse;
pub mod state;

pub use diff::{ConfigChange, FileChange, StateDiff, diff, diff_files};
pub use restore::{RestoreOptions, RestoreReport, restore};
pub use state::{
    CatOutcome, ContentError, ReplayError, SampleView, StateListing, StateView, listing, open,
    open_frame, torn_warning, write_content,
};
