//! The HTTP API: everything the CLI does, plus health and status, as JSON; errors are a
//! JSON body with a stable code. The OpenAPI document is generated from the handlers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kairos_capture::CaptureError;
use kairos_core::{Instant, SpecError, TimelineSpec};
use kairos_replay::ReplayError;
use kairos_store::{CatalogError, StoreError};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::Shared;
use crate::snapshotter::SnapshotterMsg;
use crate::supervisor::SupervisorMsg;
use crate::wire::{
    AddReplicaRequest, CaptureJson, ErrorBody, ErrorDetail, FrameJson, FrameStateJson, HealthJson,
    RestoreRequest, StatusJson,
};

/// How long `POST .../capture` waits for its frame.
const CAPTURE_WAIT: Duration = Duration::from_secs(600);

/// An error answer: HTTP status, stable code, message naming the problem.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        if error.is_corruption() {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_corrupt",
                error.to_string(),
            )
        } else {
            ApiError::internal(error.to_string())
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> ApiError {
        let message = error.to_string();
        match error {
            CatalogError::UnknownReplica(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_replica", message)
            }
            CatalogError::ReplicaExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "replica_exists", message)
            }
            CatalogError::NoFrames { .. }
            | CatalogError::NothingBefore { .. }
            | CatalogError::NoSuchFrame { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "frame_not_found", message)
            }
            CatalogError::Ambiguous { .. } => ApiError::bad_request("ambiguous_frame", message),
            CatalogError::HeadMoved { .. } | CatalogError::Contended { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            CatalogError::TimelineExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "timeline_exists", message)
            }
            CatalogError::UnknownTimeline { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_timeline", message)
            }
            CatalogError::MainTimeline { .. } => ApiError::bad_request("main_timeline", message),
            CatalogError::Busy { .. } => {
                ApiError::new(StatusCode::CONFLICT, "commit_in_progress", message)
            }
            CatalogError::NotPending { .. } => {
                ApiError::new(StatusCode::CONFLICT, "commit_not_pending", message)
            }
            CatalogError::UnknownProposal { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_proposal", message)
            }
            CatalogError::ProposalCommitted { .. } => {
                ApiError::new(StatusCode::CONFLICT, "proposal_committed", message)
            }
            CatalogError::ReviewsChanged { .. } => {
                ApiError::new(StatusCode::CONFLICT, "reviews_changed", message)
            }
            CatalogError::PartyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "party_exists", message)
            }
            CatalogError::UnknownParty(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_party", message)
            }
            CatalogError::Version { .. } | CatalogError::Invalid(_) => {
                ApiError::bad_request("bad_command", message)
            }
            CatalogError::AlreadyApplied { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_applied", message)
            }
            CatalogError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                message,
            ),
            CatalogError::Store(error) => error.into(),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(error: ReplayError) -> ApiError {
        let message = error.to_string();
        match error {
            ReplayError::Catalog(error) => error.into(),
            ReplayError::Store(error) => error.into(),
            ReplayError::NoSuchPath { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "path_not_found", message)
            }
            ReplayError::NotAFile { .. } => ApiError::bad_request("not_a_file", message),
            ReplayError::NoContent { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "content_not_captured", message)
            }
            ReplayError::Escapes { .. } => ApiError::bad_request("path_escapes_root", message),
            ReplayError::SymlinkLoop { .. } => ApiError::bad_request("symlink_loop", message),
            ReplayError::Target { .. } => {
                ApiError::new(StatusCode::CONFLICT, "restore_target", message)
            }
            ReplayError::Write { .. } => ApiError::internal(message),
        }
    }
}

impl From<CaptureError> for ApiError {
    fn from(error: CaptureError) -> ApiError {
        let message = error.to_string();
        match error {
            CaptureError::Store(error) => error.into(),
            CaptureError::Catalog(error) => error.into(),
            CaptureError::RootUnreadable { .. } | CaptureError::RootNotDirectory { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "root_unreadable", message)
            }
            _ => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "capture_failed", message),
        }
    }
}

impl From<kairos_ops::OpsError> for ApiError {
    fn from(error: kairos_ops::OpsError) -> ApiError {
        use kairos_ops::{InputError, OpsError};
        match error {
            OpsError::Input(input) => {
                let message = input.to_string();
                let code = match input {
                    InputError::TimelineName(_) => "bad_timeline",
                    InputError::Party(_) => "bad_party",
                    InputError::RelativeRoot { .. } => "bad_root",
                    InputError::RelativeTarget(_) => "bad_target",
                    InputError::Replica(_) => "bad_replica",
                    InputError::ProposalId { .. } => "bad_proposal",
                    InputError::Role(_) => "bad_role",
                    InputError::NoRetentionPolicy(_) | InputError::Retention(_) => "bad_retention",
                    InputError::SharedRoot { .. } => "shared_root",
                    InputError::PartyReplica { .. } => "unknown_replica",
                    InputError::GateThreshold { .. } => "bad_threshold",
                    InputError::Random(_) | InputError::GateCommit => {
                        return ApiError::internal(message);
                    }
                };
                ApiError::bad_request(code, message)
            }
            OpsError::Spec(error) => error.into(),
            OpsError::Catalog(error) => error.into(),
            OpsError::Replay(error) => error.into(),
            OpsError::Capture(error) => error.into(),
            OpsError::Sandbox(error) => error.into(),
            OpsError::Commit(error) => error.into(),
            OpsError::Store(error) => error.into(),
            OpsError::Learn(error) => {
                let message = error.to_string();
                match error {
                    kairos_ops::learn::LearnError::Training { .. } => {
                        ApiError::new(StatusCode::CONFLICT, "not_enough_outcomes", message)
                    }
                    kairos_ops::learn::LearnError::Suggest(_) => {
                        ApiError::bad_request("bad_suggestion", message)
                    }
                    kairos_ops::learn::LearnError::Store(_) => ApiError::internal(message),
                }
            }
            OpsError::Bisect(error) => {
                let message = error.to_string();
                match error {
                    kairos_ops::bisect::BisectError::CheckTimedOut { .. } => {
                        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "check_timed_out", message)
                    }
                    kairos_ops::bisect::BisectError::Run { .. } => ApiError::internal(message),
                    _ => ApiError::bad_request("bad_bisect", message),
                }
            }
            OpsError::Gc(error) => {
                let message = error.to_string();
                match error {
                    kairos_store::GcError::AlreadyRunning => {
                        ApiError::new(StatusCode::CONFLICT, "gc_running", message)
                    }
                    kairos_store::GcError::SharedBackend => {
                        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "gc_unsupported", message)
                    }
                    kairos_store::GcError::Damaged { .. } => {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt", message)
                    }
                    kairos_store::GcError::Store(error) => error.into(),
                }
            }
            OpsError::Credentials(message) => ApiError::internal(message),
            OpsError::Review(error) => {
                let message = error.to_string();
                match error {
                    kairos_ops::review::ReviewError::OwnProposal { .. } => {
                        ApiError::new(StatusCode::FORBIDDEN, "own_proposal", message)
                    }
                    kairos_ops::review::ReviewError::PolicyNotMet { .. } => {
                        ApiError::new(StatusCode::CONFLICT, "policy_not_met", message)
                    }
                    kairos_ops::review::ReviewError::CommentTooLong { .. } => {
                        ApiError::bad_request("bad_review", message)
                    }
                    kairos_ops::review::ReviewError::BadStatus(_) => {
                        ApiError::bad_request("bad_status", message)
                    }
                }
            }
            OpsError::Revert(error) => {
                let message = error.to_string();
                match error {
                    kairos_ops::culprit::RevertError::AllConflict { .. } => {
                        ApiError::new(StatusCode::CONFLICT, "conflict", message)
                    }
                    kairos_ops::culprit::RevertError::Read { .. } => ApiError::internal(message),
                    _ => ApiError::bad_request("bad_revert", message),
                }
            }
        }
    }
}

impl From<crate::snapshotter::CaptureFailure> for ApiError {
    fn from(failure: crate::snapshotter::CaptureFailure) -> ApiError {
        use crate::snapshotter::{CaptureFailure, CaptureFailureKind};
        let message = failure.to_string();
        match failure {
            CaptureFailure::Busy(_) => ApiError::busy(message),
            CaptureFailure::Failed { kind, .. } => match kind {
                CaptureFailureKind::UnknownReplica => {
                    ApiError::new(StatusCode::NOT_FOUND, "unknown_replica", message)
                }
                CaptureFailureKind::RootUnreadable => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "root_unreadable", message)
                }
                CaptureFailureKind::Corrupt => {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt", message)
                }
                // As every other command the cluster cannot take now: retry later.
                CaptureFailureKind::Unavailable => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    message,
                ),
                CaptureFailureKind::Other | CaptureFailureKind::HeadMoved => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "capture_failed", message)
                }
            },
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(error: SpecError) -> ApiError {
        ApiError::bad_request("bad_spec", error.to_string())
    }
}

pub(crate) fn json_input<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match payload {
        Ok(Json(value)) => Ok(value),
        Err(JsonRejection::BytesRejection(rejection)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            rejection.body_text(),
        )),
        Err(rejection) => Err(ApiError::bad_request("bad_body", rejection.body_text())),
    }
}

fn query_input<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(value)| value)
        .map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))
}

fn spec(text: &str) -> Result<TimelineSpec, ApiError> {
    Ok(TimelineSpec::parse(text)?)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kairos node API",
        description = "Capture, history, replay, diff, restore and verify of service replicas; timelines, proposals, reviews, sandboxes, commits with automated rollback, reverts and the audit log."
    ),
    paths(
        health,
        status,
        metrics,
        openapi,
        list_replicas,
        frame,
        add_replica,
        capture,
        history,
        state,
        file,
        diff,
        restore,
        verify,
        crate::gc::gc,
        crate::gc::stats,
        crate::changes::list_timelines,
        crate::changes::fork_timeline,
        crate::changes::delete_timeline,
        crate::changes::forget,
        crate::changes::create_proposal,
        crate::changes::list_proposals,
        crate::changes::get_proposal,
        crate::changes::validate_proposal,
        crate::changes::preview_proposal,
        crate::changes::review_proposal,
        crate::changes::sandbox_proposal,
        crate::changes::commit_proposal,
        crate::changes::gate_proposal,
        crate::changes::gate_and_commit_proposal,
        crate::changes::get_commit,
        crate::changes::revert,
        crate::changes::audit_log,
        crate::predictor::predict,
        crate::predictor::model_status,
        crate::predictor::train_model,
        crate::predictor::model_report,
        crate::predictor::suggest,
        list_parties,
        add_party,
        revoke_party
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        HealthJson,
        StatusJson,
        AddReplicaRequest,
        RestoreRequest,
        FrameStateJson,
        crate::wire::ForkRequest,
        crate::wire::ProposeRequest,
        crate::wire::SandboxRequest,
        crate::wire::CommitRequest,
        crate::wire::GateRequest,
        kairos_ops::gate::GateJson,
        crate::wire::ReviewRequest,
        crate::wire::RevertRequest,
        crate::wire::PartyRequest,
        crate::wire::PredictRequest,
        crate::wire::SuggestRequest,
        kairos_ops::learn::PredictionJson,
        kairos_ops::learn::ModelStatusJson,
        kairos_ops::learn::ModelReportJson,
        kairos_ops::learn::SuggestionJson
    ))
)]
pub struct ApiDoc;

/// The largest proposal body: enough for the largest proposal the limits allow (JSON-
/// escaped or base64 content grows by about a third), and never below the API's limit.
pub fn proposal_body_bytes_max(shared: &Shared) -> usize {
    let proposal = usize::try_from(shared.config.limits.proposal_bytes_max).unwrap_or(usize::MAX);
    shared.config.node.request_body_bytes_max.max(
        proposal
            .saturating_add(proposal / 3)
            .saturating_add(64 << 10),
    )
}

pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.node.request_body_bytes_max;
    let proposal_limit = proposal_body_bytes_max(&shared);
    Router::new()
        .route("/api/health", get(health))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/replicas", get(list_replicas).post(add_replica))
        .route("/api/replicas/{name}/capture", post(capture))
        .route("/api/replicas/{name}/history", get(history))
        .route("/api/replicas/{name}/frame", get(frame))
        .route("/api/replicas/{name}/state", get(state))
        .route("/api/replicas/{name}/file", get(file))
        .route("/api/replicas/{name}/diff", get(diff))
        .route("/api/replicas/{name}/restore", post(restore))
        .route("/api/verify", get(verify))
        .route("/api/gc", post(crate::gc::gc))
        .route("/api/stats", get(crate::gc::stats))
        .route("/api/events", get(crate::events::events))
        .route("/", get(crate::ui::index))
        .route("/ui/app.js", get(crate::ui::app_js))
        .route("/ui/style.css", get(crate::ui::style_css))
        .route("/api/whoami", get(crate::ui::whoami))
        .route("/api/replicas/{name}/series", get(crate::ui::series))
        .route(
            "/api/asyncapi.json",
            get(|| async { Json(crate::nats::asyncapi()) }),
        )
        .route("/api/replicas/{name}/forget", post(crate::changes::forget))
        .route(
            "/api/replicas/{name}/timelines",
            get(crate::changes::list_timelines).post(crate::changes::fork_timeline),
        )
        .route(
            "/api/replicas/{name}/timelines/{timeline}",
            axum::routing::delete(crate::changes::delete_timeline),
        )
        .route(
            "/api/replicas/{name}/proposals",
            get(crate::changes::list_proposals)
                .post(crate::changes::create_proposal)
                .layer(DefaultBodyLimit::max(proposal_limit)),
        )
        .route(
            "/api/replicas/{name}/proposals/validate",
            post(crate::changes::validate_proposal).layer(DefaultBodyLimit::max(proposal_limit)),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}",
            get(crate::changes::get_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/preview",
            get(crate::changes::preview_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/sandbox",
            post(crate::changes::sandbox_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/review",
            post(crate::changes::review_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/commit",
            post(crate::changes::commit_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/gate",
            post(crate::changes::gate_proposal),
        )
        .route(
            "/api/replicas/{name}/proposals/{id}/gate/commit",
            post(crate::changes::gate_and_commit_proposal),
        )
        .route(
            "/api/replicas/{name}/commits/{id}",
            get(crate::changes::get_commit),
        )
        .route("/api/replicas/{name}/revert", post(crate::changes::revert))
        .route("/api/replicas/{name}/log", get(crate::changes::audit_log))
        .route(
            "/api/replicas/{name}/proposals/{id}/predict",
            post(crate::predictor::predict),
        )
        .route(
            "/api/replicas/{name}/model",
            get(crate::predictor::model_status),
        )
        .route(
            "/api/replicas/{name}/model/train",
            post(crate::predictor::train_model),
        )
        .route(
            "/api/replicas/{name}/model/report",
            get(crate::predictor::model_report),
        )
        .route(
            "/api/replicas/{name}/suggest",
            post(crate::predictor::suggest),
        )
        .route("/api/parties", get(list_parties).post(add_party))
        .route("/api/cluster", get(crate::cluster::status))
        .route("/api/cluster/init", post(crate::cluster::init))
        .route("/api/cluster/join", post(crate::cluster::join))
        .route("/api/cluster/leave", post(crate::cluster::leave))
        .route(
            "/api/cluster/transfer-leader",
            post(crate::cluster::transfer_leader),
        )
        .route("/api/parties/{party}", axum::routing::delete(revoke_party))
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (see /api/openapi.json)",
            )
        })
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_endpoint",
                "no such endpoint (see /api/openapi.json)",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::auth::authorize,
        ))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(shared)
}

/// A span per request, with its outcome.
async fn trace_request(request: Request, next: Next) -> Response {
    let span = tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), status = tracing::field::Empty);
    {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        kairos_telemetry::continue_trace(&span, header("traceparent"), header("tracestate"));
    }
    let started = std::time::Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("status", response.status().as_u16());
    tracing::debug!(parent: &span, elapsed_us = started.elapsed().as_micros() as u64, "answered");
    response
}

#[utoipa::path(get, path = "/api/health", responses((status = 200, description = "The node is up", body = HealthJson)))]
async fn health() -> Json<HealthJson> {
    Json(HealthJson {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[utoipa::path(get, path = "/api/status", responses((status = 200, description = "Node status: replicas, store size, actor restarts", body = StatusJson)))]
async fn status(
    State(shared): State<Arc<Shared>>,
    axum::Extension(acting): axum::Extension<crate::auth::Acting>,
) -> Result<Json<StatusJson>, ApiError> {
    let mut status = shared.status()?;
    // A party limited to some replicas sees only theirs.
    if let crate::auth::Acting::Party(party) = &acting {
        status
            .replicas
            .retain(|replica| party.covers(&replica.name));
    }
    Ok(Json(status))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "The node's metrics in the Prometheus text exposition format 0.0.4 (the figures the OTLP exporter sends); a party limited to some replicas sees theirs and the node-wide ones", content_type = "text/plain")))]
async fn metrics(
    State(shared): State<Arc<Shared>>,
    axum::Extension(acting): axum::Extension<crate::auth::Acting>,
) -> Result<Response, ApiError> {
    let replicas = match acting {
        crate::auth::Acting::Party(party) if !party.replicas.is_empty() => Some(party.replicas),
        _ => None,
    };
    // Collecting runs the observable instruments' callbacks (the store's size): off the
    // async workers.
    let exposition = shared.metrics.exposition().cloned();
    let text = tokio::task::spawn_blocking(move || {
        exposition
            .map(|exposition| exposition.render(replicas.as_deref()))
            .unwrap_or_default()
    })
    .await
    .map_err(|error| ApiError::internal(format!("collecting the metrics: {error}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            kairos_telemetry::EXPOSITION_CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/openapi.json", responses((status = 200, description = "This OpenAPI 3 document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[utoipa::path(get, path = "/api/replicas", responses((status = 200, description = "Registered replicas (name, root, processes, exclude, capture_interval_ms)")))]
async fn list_replicas(
    State(shared): State<Arc<Shared>>,
    axum::Extension(acting): axum::Extension<crate::auth::Acting>,
) -> Result<Response, ApiError> {
    let store = shared.clone();
    let mut replicas = shared
        .replay
        .run(move || Ok(store.service().replicas()?))
        .await?;
    // A party limited to some replicas sees only theirs (their commands and probes too).
    if let crate::auth::Acting::Party(party) = &acting {
        replicas.retain(|replica| party.covers(&replica.name));
    }
    Ok(Json(replicas).into_response())
}

#[utoipa::path(post, path = "/api/replicas", request_body = AddReplicaRequest, responses(
    (status = 201, description = "Registered and watched"),
    (status = 400, description = "Invalid name, root, selector or glob", body = ErrorBody),
    (status = 409, description = "A replica of that name exists", body = ErrorBody)))]
async fn add_replica(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<AddReplicaRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let worker = shared.clone();
    let replica = shared
        .replay
        .run(move || {
            let root = PathBuf::from(&request.root);
            root_allowed(&worker, &request.name, &root)?;
            Ok(worker.service().add_replica(kairos_ops::ReplicaRequest {
                name: &request.name,
                root: &root,
                processes: request.processes,
                exclude: request.exclude,
                capture_interval: &request.capture_interval,
                settings: &request.settings,
            })?)
        })
        .await?;
    let supervisor = shared
        .supervisor()
        .ok_or_else(|| ApiError::busy("the node is starting or stopping"))?;
    let started = supervisor
        .call(SupervisorMsg::Watch, Some(Duration::from_secs(10)))
        .await
        .map_err(|error| ApiError::internal(format!("starting the watcher: {error}")))?;
    match started {
        ractor::rpc::CallResult::Success(Ok(())) => {
            Ok((StatusCode::CREATED, Json(replica)).into_response())
        }
        ractor::rpc::CallResult::Success(Err(message)) => Err(ApiError::internal(message)),
        _ => Err(ApiError::internal("starting the watcher timed out")),
    }
}

#[utoipa::path(post, path = "/api/replicas/{name}/capture", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The new frame: {frame, time, parent, entries, bytes, files_read, ...}"),
    (status = 404, description = "Unknown replica", body = ErrorBody),
    (status = 503, description = "Too many captures waiting", body = ErrorBody)))]
async fn capture(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<CaptureJson>, ApiError> {
    let snapshotter = match shared.snapshotter(&name) {
        Some(snapshotter) => snapshotter,
        None => {
            // A replica registered through another cluster member: this member catches
            // up with the leader's commit and starts its snapshotter first.
            if let Some(cluster) = shared.cluster.get() {
                cluster.catch_up(Duration::from_secs(5)).await;
            }
            if let Some(supervisor) = shared.supervisor() {
                let _ = supervisor
                    .call(SupervisorMsg::Watch, Some(Duration::from_secs(10)))
                    .await;
            }
            shared
                .snapshotter(&name)
                .ok_or_else(|| ApiError::from(CatalogError::UnknownReplica(name.clone())))?
        }
    };
    let cause = tracing::Span::current();
    // In a cluster another member's watcher may store a frame while this capture reads:
    // the capture is taken again from the new head (a few times at most).
    let mut attempts = 0;
    loop {
        attempts += 1;
        let answer = snapshotter
            .call(
                |reply| SnapshotterMsg::Capture(Some(reply), cause.clone()),
                Some(CAPTURE_WAIT),
            )
            .await;
        if let Ok(ractor::rpc::CallResult::Success(Err(
            crate::snapshotter::CaptureFailure::Failed {
                kind: crate::snapshotter::CaptureFailureKind::HeadMoved,
                ..
            },
        ))) = &answer
            && attempts < 5
        {
            continue;
        }
        let Json(mut captured) = capture_answer(&name, answer)?;
        // In a cluster that keeps frames on several members, the answer waits until the
        // new frame's objects are on enough of them (or says how many hold it).
        if let Some(cluster) = shared.cluster.get()
            && cluster.configured
            && cluster.replication > 1
            && captured.recorded
        {
            let frame = captured.frame.frame;
            let store = shared.store.share();
            let root = tokio::task::spawn_blocking(move || store.frame(&frame).map(|f| f.root))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??;
            let copies = cluster.hold_durable(frame, root, DURABLE_WAIT).await;
            captured.durable = Some(kairos_ops::wire::DurableJson {
                copies,
                required: cluster.replication,
                durable: copies >= cluster.replication,
            });
        }
        return Ok(Json(captured));
    }
}

/// How long a capture in a cluster waits for its frame to be on `cluster.replication`
/// members before it answers with how many hold it.
const DURABLE_WAIT: Duration = Duration::from_secs(10);

fn capture_answer(
    name: &str,
    answer: Result<
        ractor::rpc::CallResult<Result<CaptureJson, crate::snapshotter::CaptureFailure>>,
        ractor::MessagingErr<SnapshotterMsg>,
    >,
) -> Result<Json<CaptureJson>, ApiError> {
    match answer {
        Ok(ractor::rpc::CallResult::Success(result)) => Ok(Json(result?)),
        Ok(_) => Err(ApiError::busy(format!(
            "replica {name:?}: the capture did not finish in time"
        ))),
        Err(error) => Err(ApiError::busy(format!(
            "replica {name:?}: the snapshotter is restarting: {error}"
        ))),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// Timeline (default `main`)
    timeline: Option<String>,
}

#[utoipa::path(get, path = "/api/replicas/{name}/history", params(("name" = String, Path, description = "Replica"), HistoryQuery), responses(
    (status = 200, description = "Frames, oldest first"), (status = 404, description = "Unknown replica", body = ErrorBody)))]
async fn history(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_input(query)?;
    let timeline = query
        .timeline
        .unwrap_or_else(|| kairos_core::spec::MAIN_TIMELINE.to_string());
    let worker = shared.clone();
    let frames = shared
        .replay
        .run(move || Ok(worker.service().history(&name, &timeline)?))
        .await?;
    Ok(Json(frames).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct AtQuery {
    /// Frame spec: latest, id prefix, RFC 3339 instant, age (-10m), TIMELINE@SPEC
    at: Option<String>,
}

#[utoipa::path(get, path = "/api/replicas/{name}/frame", params(("name" = String, Path, description = "Replica"), AtQuery), responses(
    (status = 200, description = "The frame a spec names, opened: its record, root summary and metrics", body = FrameStateJson),
    (status = 400, description = "Bad spec", body = ErrorBody), (status = 404, description = "Unknown replica or no such frame", body = ErrorBody)))]
async fn frame(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<Query<AtQuery>, QueryRejection>,
) -> Result<Json<FrameStateJson>, ApiError> {
    let at = spec(query_input(query)?.at.as_deref().unwrap_or("latest"))?;
    // One index lookup and two small reads: answered on this thread, without a hop to the
    // blocking pool.
    let started = std::time::Instant::now();
    let view = kairos_replay::open(&shared.store, &name, &at, Instant::now())?;
    let reader = shared.store.reader()?;
    let runtime = view.runtime(&reader)?;
    shared
        .metrics
        .replay_latency_ms
        .record(started.elapsed().as_secs_f64() * 1e3, &[]);
    Ok(Json(FrameStateJson {
        frame: FrameJson::from(&view.frame),
        files_entries: view.root.file_entries,
        files_bytes: view.root.file_bytes,
        processes: runtime.metrics.processes,
        metrics: serde_json::to_value(kairos_replay::state::MetricsView::from(&runtime.metrics))
            .unwrap_or_default(),
        notes: view.root.notes.len() as u64,
    }))
}

#[utoipa::path(get, path = "/api/replicas/{name}/state", params(("name" = String, Path, description = "Replica"), AtQuery), responses(
    (status = 200, description = "The state: frame, entries, config keys, processes, metrics, notes"),
    (status = 400, description = "Bad spec", body = ErrorBody), (status = 404, description = "Unknown replica or no such frame", body = ErrorBody)))]
async fn state(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<Query<AtQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let at = spec(query_input(query)?.at.as_deref().unwrap_or("latest"))?;
    let worker = shared.clone();
    let listing = shared
        .replay
        .run(move || Ok(worker.service().state(&name, &at)?))
        .await?;
    Ok(Json(listing).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    /// Path relative to the replica root
    path: String,
    /// Frame spec (default latest)
    at: Option<String>,
}

#[utoipa::path(get, path = "/api/replicas/{name}/file", params(("name" = String, Path, description = "Replica"), FileQuery), responses(
    (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
    (status = 404, description = "No such replica, frame or path", body = ErrorBody)))]
async fn file(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_input(query)?;
    let at = spec(query.at.as_deref().unwrap_or("latest"))?;
    let worker = shared.clone();
    let (bytes, torn) = shared
        .replay
        .run(move || {
            let mut out = Vec::new();
            let torn = worker
                .service()
                .cat(&name, query.path.as_bytes(), &at, &mut out)?;
            Ok((out, torn))
        })
        .await?;
    // `x-kairos-torn: true`: the file kept changing while captured (the CLI warns).
    let torn = if torn { "true" } else { "false" };
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream"),
        (header::HeaderName::from_static("x-kairos-torn"), torn),
    ];
    Ok((headers, bytes).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    /// The earlier frame spec
    from: String,
    /// The later frame spec (default latest)
    to: Option<String>,
}

#[utoipa::path(get, path = "/api/replicas/{name}/diff", params(("name" = String, Path, description = "Replica"), DiffQuery), responses(
    (status = 200, description = "Changes: files, config keys, processes, metrics"),
    (status = 404, description = "No such replica or frame", body = ErrorBody)))]
async fn diff(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_input(query)?;
    let from = spec(&query.from)?;
    let to = spec(query.to.as_deref().unwrap_or("latest"))?;
    let worker = shared.clone();
    let changes = shared
        .replay
        .run(move || Ok(worker.service().diff(&name, &from, &to)?))
        .await?;
    Ok(Json(changes).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/restore", params(("name" = String, Path, description = "Replica")), request_body = RestoreRequest, responses(
    (status = 200, description = "What was restored"),
    (status = 409, description = "The target exists and is not empty (without force)", body = ErrorBody)))]
async fn restore(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    payload: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let at = spec(&request.at)?;
    let into = PathBuf::from(&request.into);
    if let Some(restore_root) = &shared.config.node.restore_root {
        let inside = into.is_absolute()
            && !into
                .components()
                .any(|part| matches!(part, std::path::Component::ParentDir))
            && into.starts_with(restore_root);
        if !inside {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "restore_target_not_allowed",
                format!(
                    "restore target {} is not below node.restore_root {}",
                    into.display(),
                    restore_root.display()
                ),
            ));
        }
    }
    let worker = shared.clone();
    let report = shared
        .replay
        .run(move || {
            Ok(worker
                .service()
                .restore(&name, &at, &into, request.force, None, &|_| {})?)
        })
        .await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(get, path = "/api/verify", responses((status = 200, description = "Verification report: ok, counts, problems")))]
async fn verify(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let worker = shared.clone();
    let report = shared
        .replay
        .run(move || Ok(worker.service().verify()?))
        .await?;
    Ok(Json(report).into_response())
}

/// A replica root registered through the API must be below one of `node.allowed_roots`
/// (when any is configured), after resolving symlinks.
fn root_allowed(shared: &Shared, name: &str, root: &std::path::Path) -> Result<(), ApiError> {
    let allowed = &shared.config.node.allowed_roots;
    if allowed.is_empty() {
        return Ok(());
    }
    let resolved = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    if allowed.iter().any(|prefix| {
        let prefix = prefix.canonicalize().unwrap_or_else(|_| prefix.clone());
        resolved.starts_with(prefix)
    }) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "root_not_allowed",
        format!(
            "replica {name:?}: root {} is not below any of node.allowed_roots",
            root.display()
        ),
    ))
}

#[utoipa::path(get, path = "/api/parties", responses((status = 200, description = "Parties: name, role, replicas, created (never tokens); admin only")))]
async fn list_parties(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let worker = shared.clone();
    let parties = shared
        .replay
        .run(move || Ok(worker.service().parties()?))
        .await?;
    Ok(Json(parties).into_response())
}

#[utoipa::path(post, path = "/api/parties", request_body = crate::wire::PartyRequest, responses(
    (status = 201, description = "The party with its token, shown this once: {party, role, replicas, token}"),
    (status = 409, description = "A party of that name exists", body = ErrorBody)))]
async fn add_party(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<crate::wire::PartyRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    if let Some(user) = shared
        .config
        .nats
        .as_ref()
        .and_then(|nats| nats.user.as_ref())
        && *user == request.name
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "reserved_name",
            format!(
                "party {user:?} would have the NATS user of the node itself (nats.user); choose another name"
            ),
        ));
    }
    let worker = shared.clone();
    let party = shared
        .replay
        .run(move || {
            Ok(worker
                .service()
                .add_party(&request.name, &request.role, &request.replicas)?)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(party)).into_response())
}

#[utoipa::path(delete, path = "/api/parties/{party}", params(("party" = String, Path, description = "Party")), responses(
    (status = 204, description = "Revoked: its token no longer works"), (status = 404, description = "Unknown party", body = ErrorBody)))]
async fn revoke_party(
    State(shared): State<Arc<Shared>>,
    axum::Extension(acting): axum::Extension<crate::auth::Acting>,
    Path(party): Path<String>,
) -> Result<Response, ApiError> {
    let by = acting.party(None, crate::wire::PARTY_DEFAULT)?;
    let worker = shared.clone();
    shared
        .replay
        .run(move || Ok(worker.service().revoke_party(&party, &by)?))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod capture_failure_tests {
    use super::*;

    /// A capture whose frame the cluster cannot take now is answered as every other such
    /// command: 503 `cluster_unavailable`, not a failed capture.
    #[test]
    fn a_capture_the_cluster_cannot_take_is_cluster_unavailable() {
        let failure = crate::snapshotter::CaptureFailure::from(CatalogError::Unavailable(
            "no member leads".into(),
        ));
        let error = ApiError::from(failure);
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.code, "cluster_unavailable");
        assert!(
            error.message.contains("no member leads"),
            "{}",
            error.message
        );
    }
}
