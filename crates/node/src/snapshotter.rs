//! The snapshotter actor: the one writer of frames for its replica. Captures run on the
//! blocking pool; requests that arrive during a capture share the next one
//! ([`CaptureQueue`]); callers beyond the bound are answered "busy".

use std::sync::Arc;

use kairos_capture::{CaptureRequest, capture};
use kairos_core::spec::MAIN_TIMELINE;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::Shared;
use crate::api::ApiError;
use crate::schedule::{CaptureQueue, Requested};
use crate::wire::CaptureJson;

pub type CaptureReply = RpcReplyPort<Result<CaptureJson, ApiError>>;

pub struct SnapshotterActor;

pub enum SnapshotterMsg {
    /// Capture the replica; the reply port, if any, gets the frame.
    Capture(Option<CaptureReply>),
    /// The running capture finished.
    Finished(Box<Result<CaptureJson, ApiError>>),
}

pub struct SnapshotterState {
    shared: Arc<Shared>,
    replica: String,
    queue: CaptureQueue<CaptureReply>,
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
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SnapshotterMsg>,
        message: SnapshotterMsg,
        state: &mut SnapshotterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SnapshotterMsg::Capture(reply) => on_capture(myself, state, reply),
            SnapshotterMsg::Finished(result) => on_finished(myself, state, *result),
        }
        Ok(())
    }
}

fn on_capture(
    myself: ActorRef<SnapshotterMsg>,
    state: &mut SnapshotterState,
    reply: Option<CaptureReply>,
) {
    match state.queue.request(reply) {
        Requested::Start => start(myself, state),
        Requested::Queued => {}
        Requested::Full(reply) => {
            let _ = reply.send(Err(ApiError::busy(format!(
                "replica {:?}: too many captures are waiting; retry later",
                state.replica
            ))));
        }
    }
}

fn on_finished(
    myself: ActorRef<SnapshotterMsg>,
    state: &mut SnapshotterState,
    result: Result<CaptureJson, ApiError>,
) {
    state.shared.record_capture(&state.replica, &result);
    let (waiters, again) = state.queue.finished();
    for waiter in waiters {
        let _ = waiter.send(result.clone());
    }
    if again {
        start(myself, state);
    }
}

fn start(myself: ActorRef<SnapshotterMsg>, state: &SnapshotterState) {
    let shared = state.shared.clone();
    let replica = state.replica.clone();
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || run_capture(&shared, &replica))
            .await
            .unwrap_or_else(|error| {
                Err(ApiError::internal(format!("capture task failed: {error}")))
            });
        let _ = myself.cast(SnapshotterMsg::Finished(Box::new(result)));
    });
}

/// One capture, on the blocking pool.
fn run_capture(shared: &Shared, replica: &str) -> Result<CaptureJson, ApiError> {
    let span = tracing::info_span!("capture", replica = %replica, frame = tracing::field::Empty);
    let _entered = span.enter();
    let definition = shared.store.replica(replica)?;
    let report = capture(
        &shared.store,
        &CaptureRequest {
            replica: &definition,
            timeline: MAIN_TIMELINE,
            limits: shared.config.limits,
            skip: vec![shared.config.node.data_dir.clone()],
        },
    )?;
    span.record("frame", report.frame.id.short());
    tracing::info!(
        entries = report.frame.entries,
        files_read = report.files_read,
        bytes_new_stored = report.frame.bytes_new_stored,
        capture_ms = report.frame.capture_ms,
        "captured"
    );
    Ok(CaptureJson::from(&report))
}
