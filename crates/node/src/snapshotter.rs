//! The snapshotter actor: the one writer of frames for its replica. Captures run on the
//! blocking pool; requests that arrive during a capture share the next one
//! ([`CaptureQueue`]); callers beyond the bound are answered "busy".

use std::sync::Arc;

use kairos_capture::{CaptureRequest, capture, capture_if_changed};
use kairos_core::spec::MAIN_TIMELINE;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::Shared;
use crate::schedule::{CaptureQueue, Requested};
use crate::wire::CaptureJson;

/// Why a capture gave no frame (a domain answer; the API maps it to its codes).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaptureFailure {
    #[error("replica {0:?}: too many captures are waiting; retry later")]
    Busy(String),
    #[error("{message}")]
    Failed {
        kind: CaptureFailureKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFailureKind {
    UnknownReplica,
    RootUnreadable,
    /// The store is damaged.
    Corrupt,
    /// Another capture (on another cluster member) stored a frame first.
    HeadMoved,
    /// The cluster could not take the frame's command (no leader, no majority).
    Unavailable,
    Other,
}

impl From<kairos_capture::CaptureError> for CaptureFailure {
    fn from(error: kairos_capture::CaptureError) -> CaptureFailure {
        use kairos_capture::CaptureError;
        let kind = match &error {
            CaptureError::Catalog(kairos_store::CatalogError::UnknownReplica(_)) => {
                CaptureFailureKind::UnknownReplica
            }
            CaptureError::RootUnreadable { .. } | CaptureError::RootNotDirectory { .. } => {
                CaptureFailureKind::RootUnreadable
            }
            CaptureError::Store(error) if error.is_corruption() => CaptureFailureKind::Corrupt,
            CaptureError::Catalog(kairos_store::CatalogError::HeadMoved { .. }) => {
                CaptureFailureKind::HeadMoved
            }
            CaptureError::Catalog(kairos_store::CatalogError::Unavailable(_)) => {
                CaptureFailureKind::Unavailable
            }
            _ => CaptureFailureKind::Other,
        };
        CaptureFailure::Failed {
            kind,
            message: error.to_string(),
        }
    }
}

impl From<kairos_store::CatalogError> for CaptureFailure {
    fn from(error: kairos_store::CatalogError) -> CaptureFailure {
        kairos_capture::CaptureError::from(error).into()
    }
}

pub type CaptureResult = Result<CaptureJson, CaptureFailure>;
pub type CaptureReply = RpcReplyPort<CaptureResult>;

pub struct SnapshotterActor;

pub enum SnapshotterMsg {
    /// Capture the replica; the reply port, if any, gets the frame. `cause` is the span
    /// of whatever asked (an API request), so the capture's span is its child. A capture
    /// without a reply port (the watcher's ticks and file changes) stores a frame only
    /// when the state changed; one that someone waits for always stores one.
    Capture(Option<CaptureReply>, tracing::Span),
    /// The running capture finished.
    Finished(Box<CaptureResult>),
}

pub struct SnapshotterState {
    shared: Arc<Shared>,
    replica: String,
    queue: CaptureQueue<CaptureReply>,
    /// The span of the first request waiting for the next capture.
    next_cause: Option<tracing::Span>,
    /// Whether someone waiting for the next capture wants a frame even if nothing changed.
    next_always: bool,
}

pub fn name(replica: &str) -> String {
    format!("snapshotter:{replica}")
}

impl Actor for SnapshotterActor {
    type Msg = SnapshotterMsg;
    type State = SnapshotterState;
    type Arguments = (Arc<Shared>, String);

    async fn pre_start(
        &self,
        _myself: ActorRef<SnapshotterMsg>,
        (shared, replica): (Arc<Shared>, String),
    ) -> Result<SnapshotterState, ActorProcessingErr> {
        let waiters_max = shared.config.node.snapshotter_mailbox_max;
        Ok(SnapshotterState {
            shared,
            replica,
            queue: CaptureQueue::new(waiters_max),
            next_cause: None,
            next_always: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SnapshotterMsg>,
        message: SnapshotterMsg,
        state: &mut SnapshotterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SnapshotterMsg::Capture(reply, cause) => on_capture(myself, state, reply, cause),
            SnapshotterMsg::Finished(result) => on_finished(myself, state, *result),
        }
        Ok(())
    }
}

fn on_capture(
    myself: ActorRef<SnapshotterMsg>,
    state: &mut SnapshotterState,
    reply: Option<CaptureReply>,
    cause: tracing::Span,
) {
    let always = reply.is_some();
    match state.queue.request(reply) {
        Requested::Start => start(myself, state, cause, always),
        Requested::Queued => {
            state.next_cause.get_or_insert(cause);
            state.next_always |= always;
        }
        Requested::Full(reply) => {
            let _ = reply.send(Err(CaptureFailure::Busy(state.replica.clone())));
        }
    }
}

fn on_finished(
    myself: ActorRef<SnapshotterMsg>,
    state: &mut SnapshotterState,
    result: CaptureResult,
) {
    state.shared.record_capture(&state.replica, &result);
    let (waiters, again) = state.queue.finished();
    for waiter in waiters {
        let _ = waiter.send(result.clone());
    }
    if again {
        let cause = state.next_cause.take().unwrap_or_else(tracing::Span::none);
        let always = std::mem::take(&mut state.next_always);
        start(myself, state, cause, always);
    }
}

fn start(
    myself: ActorRef<SnapshotterMsg>,
    state: &SnapshotterState,
    cause: tracing::Span,
    always: bool,
) {
    let shared = state.shared.clone();
    let replica = state.replica.clone();
    let span = tracing::info_span!(parent: &cause, "capture", replica = %replica, frame = tracing::field::Empty);
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || {
            span.in_scope(|| run_capture(&shared, &replica, &span, always))
        })
        .await
        .unwrap_or_else(|error| {
            Err(CaptureFailure::Failed {
                kind: CaptureFailureKind::Other,
                message: format!("capture task failed: {error}"),
            })
        });
        let _ = myself.cast(SnapshotterMsg::Finished(Box::new(result)));
    });
}

/// One capture, on the blocking pool.
fn run_capture(
    shared: &Shared,
    replica: &str,
    span: &tracing::Span,
    always: bool,
) -> CaptureResult {
    let started = std::time::Instant::now();
    let attributes = kairos_telemetry::Metrics::replica(replica);
    let result = capture_once(shared, replica, span, always);
    let metrics = &shared.metrics;
    metrics
        .capture_duration_ms
        .record(started.elapsed().as_secs_f64() * 1e3, &attributes);
    match &result {
        Ok(capture) if !capture.recorded => {}
        Ok(capture) => {
            metrics.frames_stored.add(1, &attributes);
            metrics
                .capture_bytes_read
                .add(capture.bytes_new_raw, &attributes);
            metrics
                .capture_bytes_stored
                .add(capture.frame.bytes_new_stored, &attributes);
        }
        Err(_) => metrics.capture_failures.add(1, &attributes),
    }
    result
}

fn capture_once(
    shared: &Shared,
    replica: &str,
    span: &tracing::Span,
    always: bool,
) -> CaptureResult {
    let definition = shared.store.replica(replica)?;
    let request = CaptureRequest {
        replica: &definition,
        timeline: MAIN_TIMELINE,
        limits: shared.config.limits,
        skip: vec![shared.config.node.data_dir.clone()],
    };
    let report = if always {
        capture(&shared.store, &request)?
    } else {
        capture_if_changed(&shared.store, &request)?
    };
    span.record("frame", report.frame.id.short());
    if !report.recorded {
        tracing::debug!(frame = %report.frame.id.short(), "unchanged: no new frame");
        return Ok(CaptureJson::from(&report));
    }
    tracing::info!(
        entries = report.frame.entries,
        files_read = report.files_read,
        bytes_new_stored = report.frame.bytes_new_stored,
        capture_ms = report.frame.capture_ms,
        "captured"
    );
    Ok(CaptureJson::from(&report))
}
