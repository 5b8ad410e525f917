//! The watcher actor of one replica: asks the replica's snapshotter for a capture on the replica's
//! interval and after file changes (debounced). A root that is missing or cannot be
//! watched is reported and tried again on every tick; the node stays up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use globset::GlobSet;
use kairos_core::ReplicaDefinition;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::Shared;

pub struct WatcherActor;

pub enum WatcherMsg {
    /// A file under the root changed (sent at most once until the next flush).
    Changed,
    /// The debounce window ended: capture now.
    Flush,
    /// The capture interval elapsed.
    Tick,
}

pub struct WatcherState {
    shared: Arc<Shared>,
    replica: ReplicaDefinition,
    watcher: Option<RecommendedWatcher>,
    /// Set by the file watcher's thread when it reports a change; cleared on flush.
    change_pending: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

pub fn name(replica: &str) -> String {
    format!("watcher:{replica}")
}

impl Actor for WatcherActor {
    type Msg = WatcherMsg;
    type State = WatcherState;
    type Arguments = (Arc<Shared>, ReplicaDefinition);

    async fn pre_start(
        &self,
        myself: ActorRef<WatcherMsg>,
        (shared, replica): Self::Arguments,
    ) -> Result<WatcherState, ActorProcessingErr> {
        let ticker = myself.send_interval(replica.capture_interval(), || WatcherMsg::Tick);
        let mut state = WatcherState {
            shared,
            replica,
            watcher: None,
            change_pending: Arc::new(AtomicBool::new(false)),
            ticker: Some(ticker),
        };
        watch(&myself, &mut state);
        // A first frame right away.
        state.shared.request_capture(&state.replica.name);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<WatcherMsg>,
        message: WatcherMsg,
        state: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WatcherMsg::Changed => {
                myself.send_after(state.shared.config.node.capture_debounce, || {
                    WatcherMsg::Flush
                });
            }
            WatcherMsg::Flush => {
                state.change_pending.store(false, Ordering::SeqCst);
                state.shared.request_capture(&state.replica.name);
            }
            WatcherMsg::Tick => {
                if state.watcher.is_none() {
                    watch(&myself, state);
                }
                state.shared.request_capture(&state.replica.name);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WatcherMsg>,
        state: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        state.watcher = None;
        Ok(())
    }
}

/// Starts watching the root; on failure, records why and leaves `watcher` empty.
fn watch(myself: &ActorRef<WatcherMsg>, state: &mut WatcherState) {
    let root = state.replica.root.clone();
    let excludes = kairos_capture::capture::build_excludes(&state.replica)
        .unwrap_or_else(|_| GlobSet::empty());
    let data_dir = state.shared.config.node.data_dir.canonicalize().ok();
    let pending = state.change_pending.clone();
    let actor = myself.clone();
    let filter_root = root.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let relevant = event
            .paths
            .iter()
            .any(|path| is_relevant(path, &filter_root, &excludes, data_dir.as_deref()));
        if relevant && !pending.swap(true, Ordering::SeqCst) {
            let _ = actor.cast(WatcherMsg::Changed);
        }
    };
    let result =
        RecommendedWatcher::new(handler, notify::Config::default()).and_then(|mut watcher| {
            watcher
                .watch(&root, RecursiveMode::Recursive)
                .map(|()| watcher)
        });
    let watching = result.is_ok();
    match result {
        Ok(watcher) => state.watcher = Some(watcher),
        Err(error) => {
            tracing::warn!(replica = %state.replica.name, root = %root.display(), %error, "cannot watch the replica root; retrying every capture interval");
        }
    }
    state.shared.set_watching(&state.replica.name, watching);
}

fn is_relevant(path: &Path, root: &Path, excludes: &GlobSet, data_dir: Option<&Path>) -> bool {
    if data_dir.is_some_and(|data_dir| path.starts_with(data_dir)) {
        return false;
    }
    let relative: PathBuf = path
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    relative.as_os_str().is_empty() || !excludes.is_match(&relative)
}
