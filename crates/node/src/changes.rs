//! The change endpoints: timelines, proposals, sandboxes, commits, reverts and the audit
//! log. Commits on a replica are serialised by the store's pending-commit marker; their
//! captures go through the replica's snapshotter, the only writer of its frames.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kairos_commit::{Capturer, CommitError, CommitRecord};
use kairos_core::ReplicaDefinition;
use kairos_sandbox::SandboxError;
use kairos_store::FrameRecord;

use crate::Shared;
use crate::api::{ApiError, json_input};
use crate::auth::Acting;
use crate::snapshotter::SnapshotterMsg;
use crate::wire::{
    CommitJson, CommitRequest, ErrorBody, ForkRequest, PARTY_DEFAULT, ProposalJson, ProposeRequest,
    RevertRequest, SandboxRequest,
};

/// How long a commit's capture may take.
const CAPTURE_WAIT: Duration = Duration::from_secs(600);

impl From<SandboxError> for ApiError {
    fn from(error: SandboxError) -> ApiError {
        let message = error.to_string();
        match error {
            SandboxError::Document { .. } => ApiError::bad_request("bad_proposal", message),
            SandboxError::Invalid(_) => ApiError::bad_request("bad_proposal", message),
            SandboxError::Op { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_op", message)
            }
            SandboxError::UnknownProposal { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_proposal", message)
            }
            SandboxError::AmbiguousProposal { .. } => {
                ApiError::bad_request("ambiguous_proposal", message)
            }
            SandboxError::NoCheck(_) => ApiError::bad_request("no_check", message),
            SandboxError::Command { .. } => ApiError::internal(message),
            SandboxError::Replay(error) => error.into(),
            SandboxError::Catalog(error) => error.into(),
            SandboxError::Store(error) => error.into(),
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(error: CommitError) -> ApiError {
        let message = error.to_string();
        match error {
            CommitError::Sandbox(error) => error.into(),
            CommitError::BadId { .. } => ApiError::bad_request("bad_commit", message),
            CommitError::UnknownCommit { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_commit", message)
            }
            CommitError::Capture { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "capture_failed", message)
            }
            CommitError::Live { .. } | CommitError::Engine(_) => ApiError::internal(message),
            CommitError::Replay(error) => error.into(),
            CommitError::Catalog(error) => error.into(),
            CommitError::Store(error) => error.into(),
        }
    }
}

/// Captures through the replica's snapshotter (called from a blocking thread).
pub struct NodeCapturer {
    pub shared: Arc<Shared>,
    pub runtime: tokio::runtime::Handle,
}

impl Capturer for NodeCapturer {
    fn capture(&self, replica: &ReplicaDefinition) -> Result<FrameRecord, String> {
        let snapshotter = self
            .shared
            .snapshotter(&replica.name)
            .ok_or_else(|| "the replica has no snapshotter".to_string())?;
        let cause = tracing::Span::current();
        let answer = self.runtime.block_on(snapshotter.call(
            |reply| SnapshotterMsg::Capture(Some(reply), cause),
            Some(CAPTURE_WAIT),
        ));
        match answer {
            Ok(ractor::rpc::CallResult::Success(Ok(capture))) => self
                .shared
                .store
                .frame(&capture.frame.frame)
                .map_err(|error| error.to_string()),
            Ok(ractor::rpc::CallResult::Success(Err(error))) => Err(error.to_string()),
            Ok(_) => Err("the capture did not finish in time".into()),
            Err(error) => Err(format!("the snapshotter is restarting: {error}")),
        }
    }
}

fn party(acting: &Acting, given: Option<String>) -> Result<String, ApiError> {
    acting.party(given, PARTY_DEFAULT)
}

/// Runs a short `job` (propose, sandbox, timelines, log) with the replica's definition
/// through the replay pool: bounded concurrency and queue.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    name: String,
    job: impl FnOnce(Arc<Shared>, ReplicaDefinition) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let worker = shared.clone();
    shared
        .replay
        .run(move || {
            let replica = worker.store.replica(&name)?;
            job(worker, replica)
        })
        .await
}

/// Runs a long `job` (a commit that watches for its window, a revert) on a blocking
/// thread of its own: it must not hold a replay permit for seconds. Commits on a replica
/// are one at a time (the store's pending marker), so these are bounded by replicas.
async fn blocking_long<T: Send + 'static>(
    shared: &Arc<Shared>,
    name: String,
    job: impl FnOnce(Arc<Shared>, ReplicaDefinition) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = shared.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            let replica = shared.store.replica(&name)?;
            job(shared, replica)
        })
    })
    .await
    .unwrap_or_else(|error| Err(ApiError::internal(format!("request failed: {error}"))))
}

#[utoipa::path(get, path = "/api/replicas/{name}/timelines", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "Timelines with their heads (and fork points), main first"), (status = 404, description = "Unknown replica", body = ErrorBody)))]
pub async fn list_timelines(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let infos = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().timelines(&name)?)
    })
    .await?;
    Ok(Json(infos).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/timelines", request_body = ForkRequest, params(("name" = String, Path, description = "Replica")), responses(
    (status = 201, description = "Forked: a pointer to the frame"), (status = 409, description = "The timeline exists", body = ErrorBody)))]
pub async fn fork_timeline(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
    payload: Result<Json<ForkRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let at = kairos_ops::spec(&request.at)?;
    let party = party(&acting, request.party)?;
    let info = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().fork(&name, &request.name, &at, &party)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Who deletes a timeline.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PartyQuery {
    /// The party acting
    party: Option<String>,
}

#[utoipa::path(delete, path = "/api/replicas/{name}/timelines/{timeline}", params(("name" = String, Path, description = "Replica"), ("timeline" = String, Path, description = "Timeline"), PartyQuery), responses(
    (status = 204, description = "Deleted (its frames stay readable by id)"), (status = 404, description = "Unknown timeline", body = ErrorBody)))]
pub async fn delete_timeline(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, timeline)): Path<(String, String)>,
    query: Result<axum::extract::Query<PartyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query
        .map(|q| q.0)
        .map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))?;
    let party = party(&acting, query.party)?;
    blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().delete_timeline(&name, &timeline, &party)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/forget", request_body = kairos_ops::wire::ForgetRequestJson, params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "What was forgotten (or, with dry_run, would be) and why the rest stays"),
    (status = 400, description = "No policy, or a bad rule", body = ErrorBody)))]
pub async fn forget(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
    payload: Result<Json<kairos_ops::wire::ForgetRequestJson>, JsonRejection>,
) -> Result<Response, ApiError> {
    let mut request = json_input(payload)?;
    let party = party(&acting, request.party.take())?;
    let flags = request
        .policy()
        .map_err(|message| ApiError::bad_request("bad_retention", message))?;
    let report = blocking(&shared, name.clone(), move |shared, _| {
        let default = shared.config.retention.default;
        Ok(shared.service().forget(
            &name,
            &kairos_ops::ForgetRequest {
                timeline: request.timeline.as_deref(),
                flags,
                default,
                party: &party,
                dry_run: request.dry_run,
            },
        )?)
    })
    .await?;
    Ok(Json(report).into_response())
}

/// The party a proposal request acts as, with the document's author checked: a token's
/// party proposes (or validates) as itself, never as another author.
fn proposing(
    acting: &Acting,
    mut request: ProposeRequest,
) -> Result<(ProposeRequest, String), ApiError> {
    let party = party(acting, request.party.take())?;
    if acting.is_party() {
        if !request.document.author.is_empty() && request.document.author != party {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "party_mismatch",
                format!(
                    "the token is party {party:?}'s; it cannot propose as author {:?}",
                    request.document.author
                ),
            ));
        }
        request.document.author = party.clone();
    }
    Ok((request, party))
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals", request_body = ProposeRequest, params(("name" = String, Path, description = "Replica")), responses(
    (status = 201, description = "Validated against its base and stored"), (status = 400, description = "Not a proposal", body = ErrorBody),
    (status = 422, description = "An op is invalid (the message names it)", body = ErrorBody)))]
pub async fn create_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
    payload: Result<Json<ProposeRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (request, party) = proposing(&acting, json_input(payload)?)?;
    let proposal: ProposalJson = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().propose(
            &name,
            request.document,
            request.timeline.as_deref(),
            &party,
        )?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(proposal)).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/validate", request_body = ProposeRequest, params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "Valid: the proposal as it would be stored (its id is all zeros: nothing was stored)"), (status = 400, description = "Not a proposal", body = ErrorBody),
    (status = 422, description = "An op is invalid (the message names it)", body = ErrorBody)))]
pub async fn validate_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
    payload: Result<Json<ProposeRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (request, party) = proposing(&acting, json_input(payload)?)?;
    let proposal: ProposalJson = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().validate_proposal(
            &name,
            request.document,
            request.timeline.as_deref(),
            &party,
        )?)
    })
    .await?;
    Ok(Json(proposal).into_response())
}

#[utoipa::path(get, path = "/api/replicas/{name}/proposals/{id}", params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The stored proposal with its ops"), (status = 404, description = "Unknown proposal", body = ErrorBody)))]
pub async fn get_proposal(
    State(shared): State<Arc<Shared>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let proposal = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().proposal(&name, &id)?)
    })
    .await?;
    Ok(Json(proposal).into_response())
}

#[utoipa::path(get, path = "/api/replicas/{name}/proposals", params(("name" = String, Path, description = "Replica"), crate::wire::ProposalsQuery), responses(
    (status = 200, description = "The replica's proposals, newest first: author, base, status, approvals and rejections, latest prediction, last check, interference, what the review policy still asks"),
    (status = 400, description = "Unknown status", body = ErrorBody), (status = 404, description = "Unknown replica", body = ErrorBody)))]
pub async fn list_proposals(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<
        axum::extract::Query<crate::wire::ProposalsQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    let query = query
        .map(|q| q.0)
        .map_err(|rejection| ApiError::bad_request("bad_query", rejection.body_text()))?;
    let status = query
        .status
        .as_deref()
        .map(kairos_ops::review::ProposalStatus::parse)
        .transpose()?;
    let proposals = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared
            .service()
            .proposals(&name, query.timeline.as_deref(), status)?)
    })
    .await?;
    Ok(Json(proposals).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/review", request_body = crate::wire::ReviewRequest, params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The review, with every party's standing verdict and what the policy still asks"),
    (status = 403, description = "Below the reviewer role, or an author approving its own proposal where the policy forbids it", body = ErrorBody),
    (status = 404, description = "Unknown proposal", body = ErrorBody),
    (status = 409, description = "The proposal is already committed", body = ErrorBody)))]
pub async fn review_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    payload: Result<Json<crate::wire::ReviewRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let party = party(&acting, request.party)?;
    let review = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared
            .service()
            .review(&name, &id, request.verdict, request.comment, &party)?)
    })
    .await?;
    Ok(Json(review).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/sandbox", request_body = SandboxRequest, params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The sandbox: diff, touched paths and (with run_check) the check's outcome"), (status = 404, description = "Unknown proposal", body = ErrorBody)))]
pub async fn sandbox_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    payload: Result<Json<SandboxRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let cluster = shared.cluster.get().filter(|c| c.configured).cloned();
    // Counted before deciding, so that requests at the same instant see each other.
    let (mut running, before) = Running::start(&shared.sandboxes_running);
    // In a cluster, a sandbox asked of a member whose slots are all taken runs on the
    // member with the most free ones (never handed on twice).
    if let Some(cluster) = &cluster
        && before >= shared.config.node.sandbox_slots
        && !headers.contains_key(crate::cluster::FORWARDED_BY)
        && let Some((member, address)) = cluster.member_with_a_free_sandbox_slot().await
    {
        // Not run here: not counted here.
        drop(running);
        let forwarded = forward_sandbox(cluster.id, &address, &name, &id, &headers, &request);
        let answer = while_it_answers(cluster, &address, forwarded).await;
        running = Running::start(&shared.sandboxes_running).0;
        match answer {
            Ok((status, body)) => {
                let mut response = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response();
                if let Ok(value) = member.to_string().parse() {
                    response
                        .headers_mut()
                        .insert(crate::cluster::SANDBOX_MEMBER, value);
                }
                return Ok(response);
            }
            // The member could not be reached: the sandbox runs here after all.
            Err(problem) => {
                tracing::warn!(member, %problem, "handing a sandbox to another member");
            }
        }
    }
    let party = party(&acting, request.party)?;
    let report = blocking(&shared, name.clone(), move |shared, _| {
        let report = shared.service().sandbox(
            &name,
            &id,
            request.ops.as_deref(),
            request.run_check,
            &party,
        )?;
        if report.report.check.is_some() {
            crate::predictor::outcome_arrived(&shared, &name);
        }
        Ok(report)
    })
    .await?;
    drop(running);
    let mut response = Json(report).into_response();
    if let Some(cluster) = &cluster
        && let Ok(value) = cluster.id.to_string().parse()
    {
        response
            .headers_mut()
            .insert(crate::cluster::SANDBOX_MEMBER, value);
    }
    Ok(response)
}

/// Counts a sandbox as running while it lives.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    /// Counts one more; with how many ran before it.
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> (Running, usize) {
        let before = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (Running(count.clone()), before)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Asks the member at `address` to run the sandbox, with the caller's own credentials (a
/// party is a party on every member); its status and answer.
async fn forward_sandbox(
    from: kairos_cluster::NodeId,
    address: &str,
    name: &str,
    id: &str,
    headers: &axum::http::HeaderMap,
    request: &SandboxRequest,
) -> Result<(u16, Vec<u8>), String> {
    let url = format!(
        "{}/api/replicas/{name}/proposals/{id}/sandbox",
        address.trim_end_matches('/')
    );
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(SANDBOX_FORWARD_TIMEOUT))
            .build()
            .into();
        let mut sent = agent
            .post(&url)
            .header("content-type", "application/json")
            .header(crate::cluster::FORWARDED_BY, from.to_string());
        if let Some(authorization) = authorization {
            sent = sent.header("authorization", authorization);
        }
        let mut response = sent.send(&body[..]).map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| format!("{url}: reading the answer: {e}"))?;
        Ok((status, bytes))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// How long a member waits for a sandbox it handed to another at most (checks have their
/// own timeouts, well within this; a member that stops answering is given up on sooner).
const SANDBOX_FORWARD_TIMEOUT: Duration = Duration::from_secs(600);
/// While a member runs a sandbox handed to it, it is asked `hello` this often...
const HANDED_LIVENESS_EVERY: Duration = Duration::from_secs(1);
/// ...and given up on after this many unanswered in a row (stopped, cut off, hung).
const HANDED_UNANSWERED_MAX: u32 = 3;

/// Waits for `work` (a sandbox handed to the member at `address`) while that member
/// answers `hello`; gives up once it has not answered several times in a row.
async fn while_it_answers(
    cluster: &crate::cluster::Cluster,
    address: &str,
    work: impl std::future::Future<Output = Result<(u16, Vec<u8>), String>>,
) -> Result<(u16, Vec<u8>), String> {
    tokio::pin!(work);
    let mut unanswered = 0;
    loop {
        tokio::select! {
            answer = &mut work => return answer,
            () = tokio::time::sleep(HANDED_LIVENESS_EVERY) => {
                if cluster.answers(address).await {
                    unanswered = 0;
                } else {
                    unanswered += 1;
                    if unanswered >= HANDED_UNANSWERED_MAX {
                        return Err(format!(
                            "{address} stopped answering while it ran the sandbox"
                        ));
                    }
                }
            }
        }
    }
}

#[utoipa::path(get, path = "/api/replicas/{name}/proposals/{id}/preview", params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix"), ("ops" = Option<String>, Query, description = "1-based op indexes, comma-separated (all when absent)")), responses(
    (status = 200, description = "What the sandbox would hold (diff) and the prediction for it; nothing is stored"), (status = 404, description = "Unknown proposal", body = ErrorBody)))]
pub async fn preview_proposal(
    State(shared): State<Arc<Shared>>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    for key in query.keys() {
        if key != "ops" {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("unknown query parameter {key:?} (ops)"),
            ));
        }
    }
    let ops = match query.get("ops") {
        Some(text) => Some(
            text.split(',')
                .map(|op| {
                    op.trim().parse::<usize>().map_err(|_| {
                        ApiError::bad_request(
                            "bad_ops",
                            format!("ops {text:?}: {op:?} is not an op number"),
                        )
                    })
                })
                .collect::<Result<Vec<usize>, ApiError>>()?,
        ),
        None => None,
    };
    let report = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().preview(&name, &id, ops.as_deref())?)
    })
    .await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/commit", request_body = CommitRequest, params(("name" = String, Path, description = "Replica")
, ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The commit record: status committed, rolled_back, conflict or (without wait) watching"),
    (status = 409, description = "Another commit is in progress on the replica (code commit_in_progress), or the timeline's review policy is not met (code policy_not_met, naming what is missing)", body = ErrorBody)))]
pub async fn commit_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    payload: Result<Json<CommitRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let party = party(&acting, request.party)?;
    let runtime = tokio::runtime::Handle::current();
    let record = blocking_long(&shared, name.clone(), move |shared, replica| {
        let capturer = NodeCapturer {
            shared: shared.clone(),
            runtime: runtime.clone(),
        };
        let service = shared.service();
        // Predicted before anything is applied, so that the outcome scores it.
        let prediction =
            service.prediction_before_commit(&name, &id, request.ops.as_deref(), &party);
        let record = service.begin_commit(
            &name,
            &id,
            request.ops.as_deref(),
            &party,
            &capturer,
            prediction.as_ref(),
        )?;
        if record.status != kairos_commit::CommitStatus::Watching {
            crate::predictor::outcome_arrived(&shared, &name);
            return Ok(CommitJson { record, prediction });
        }
        if request.wait {
            let record = service.watch(record, &capturer)?;
            crate::predictor::outcome_arrived(&shared, &name);
            return Ok(CommitJson { record, prediction });
        }
        let watching = record.clone();
        let background = shared.clone();
        let watch = std::thread::Builder::new()
            .name(format!("kairos-watch-{}", replica.name))
            .spawn(move || watch_in_background(background, runtime, watching))
            .map_err(|error| ApiError::internal(format!("starting the watch: {error}")))?;
        let mut watches = shared.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.retain(|watch| !watch.is_finished());
        watches.push(watch);
        Ok(CommitJson { record, prediction })
    })
    .await?;
    Ok(Json(record).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/gate", request_body = crate::wire::GateRequest, params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The gate's verdict (pass or refuse, schema kairos.gate/1): every criterion, the prediction, the sandbox's diff and check; recorded as a gate event", body = kairos_ops::gate::GateJson),
    (status = 400, description = "A threshold out of range, or run_check on a replica without a check", body = ErrorBody),
    (status = 404, description = "Unknown replica or proposal", body = ErrorBody)))]
pub async fn gate_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    payload: Result<Json<crate::wire::GateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    gate(shared, acting, name, id, json_input(payload)?, false).await
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/gate/commit", request_body = crate::wire::GateRequest, params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The gate's verdict; a passing proposal is committed and the answer waits for the commit's end (a refused or rolled-back commit makes the verdict refuse)", body = kairos_ops::gate::GateJson),
    (status = 400, description = "A threshold out of range, or run_check on a replica without a check", body = ErrorBody),
    (status = 404, description = "Unknown replica or proposal", body = ErrorBody)))]
pub async fn gate_and_commit_proposal(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    payload: Result<Json<crate::wire::GateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    gate(shared, acting, name, id, json_input(payload)?, true).await
}

/// Both gate routes: the same service call, with a capturer when it commits (a commit
/// watches for its window: a thread of its own, not a replay permit).
async fn gate(
    shared: Arc<Shared>,
    acting: Acting,
    name: String,
    id: String,
    request: crate::wire::GateRequest,
    commit: bool,
) -> Result<Response, ApiError> {
    let party = party(&acting, request.party)?;
    let thresholds = kairos_ops::gate::GateThresholds {
        max_risk: request.max_risk,
        min_confidence: request.min_confidence,
        run_check: request.run_check,
        commit,
    };
    let runtime = tokio::runtime::Handle::current();
    let replica = name.clone();
    let job = move |shared: Arc<Shared>, _: ReplicaDefinition| {
        let capturer = NodeCapturer {
            shared: shared.clone(),
            runtime,
        };
        let gate = shared.service().gate(
            &name,
            &id,
            request.ops.as_deref(),
            &thresholds,
            commit.then_some(&capturer as &dyn Capturer),
            &party,
        )?;
        if gate.check.is_some() || gate.commit.is_some() {
            crate::predictor::outcome_arrived(&shared, &name);
        }
        Ok(gate)
    };
    let gate = if commit {
        blocking_long(&shared, replica, job).await?
    } else {
        blocking(&shared, replica, job).await?
    };
    Ok(Json(gate).into_response())
}

fn watch_in_background(shared: Arc<Shared>, runtime: tokio::runtime::Handle, record: CommitRecord) {
    let replica = record.replica.clone();
    let capturer = NodeCapturer {
        shared: shared.clone(),
        runtime,
    };
    match shared.service().watch(record, &capturer) {
        Ok(record) => {
            crate::predictor::outcome_arrived(&shared, &replica);
            tracing::info!(replica = %replica, commit = %record.commit.short(), status = record.status.name(), "commit finished");
        }
        Err(error) => {
            tracing::error!(replica = %replica, %error, "watching a commit failed; it is recovered on restart");
        }
    }
}

#[utoipa::path(get, path = "/api/replicas/{name}/commits/{id}", params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Commit id prefix")), responses(
    (status = 200, description = "The commit record"), (status = 404, description = "Unknown commit", body = ErrorBody)))]
pub async fn get_commit(
    State(shared): State<Arc<Shared>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let record = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().commit_record(&name, &id)?)
    })
    .await?;
    Ok(Json(record).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/revert", request_body = RevertRequest, params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The revert, recorded as a commit"), (status = 409, description = "A commit is in progress", body = ErrorBody)))]
pub async fn revert(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
    payload: Result<Json<RevertRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let to = kairos_ops::spec(&request.to)?;
    let party = party(&acting, request.party)?;
    let runtime = tokio::runtime::Handle::current();
    let record = blocking_long(&shared, name.clone(), move |shared, _| {
        let capturer = NodeCapturer {
            shared: shared.clone(),
            runtime,
        };
        Ok(shared.service().revert(&name, &to, &party, &capturer)?)
    })
    .await?;
    Ok(Json(record).into_response())
}

#[utoipa::path(get, path = "/api/replicas/{name}/log", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The audit log, oldest first, with the result of checking its hash chain"), (status = 404, description = "Unknown replica", body = ErrorBody)))]
pub async fn audit_log(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let log = blocking(&shared, name.clone(), move |shared, _| {
        Ok(shared.service().log(&name)?)
    })
    .await?;
    Ok(Json(log).into_response())
}

/// At start-up, before the actors run: commits a crash left in progress are rolled back
/// to their last good frame (captured directly: nothing else writes yet).
pub fn recover_commits(shared: &Shared) {
    let service = shared.service();
    let capturer = kairos_commit::DirectCapturer {
        store: &shared.store,
        limits: shared.config.limits,
        skip: vec![shared.config.node.data_dir.clone()],
    };
    match service.recover(None, &capturer) {
        Ok(recovered) => {
            for record in recovered {
                tracing::warn!(replica = %record.replica, commit = %record.commit.short(), "a commit interrupted by a stop was rolled back to the last good frame");
            }
        }
        Err(error) => {
            tracing::error!(%error, "recovering interrupted commits failed");
        }
    }
}
