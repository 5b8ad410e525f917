//! The predictor actor and the prediction endpoints. Predictions are served from the
//! node's `Learner` (the serving model of each replica, swapped whole); the actor is told
//! when an outcome arrives, asks the retraining policy, and trains off the serving path
//! (one training at a time, on a blocking thread), so a burst of outcomes costs one
//! training. `model train` goes through the same actor.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kairos_ops::learn::ModelStatusJson;
use kairos_predict::RetrainDecision;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::Shared;
use crate::api::{ApiError, json_input};
use crate::auth::Acting;
use crate::wire::{ErrorBody, PARTY_DEFAULT, PredictRequest, SuggestRequest};

pub const ACTOR_NAME: &str = "predictor";

pub struct PredictorActor;

pub enum PredictorMsg {
    /// An outcome of the replica was stored: retrain if the policy says so.
    Outcome(String),
    /// Train now (`model train`), answering the new model's status.
    Train(
        String,
        String,
        RpcReplyPort<Result<ModelStatusJson, ApiError>>,
    ),
}

impl Actor for PredictorActor {
    type Msg = PredictorMsg;
    type State = Arc<Shared>;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<PredictorMsg>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Shared>, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle(
        &self,
        _myself: ActorRef<PredictorMsg>,
        message: PredictorMsg,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PredictorMsg::Outcome(replica) => {
                let decision = {
                    let shared = shared.clone();
                    let replica = replica.clone();
                    tokio::task::spawn_blocking(move || {
                        shared.learner.decision(&shared.store, &replica)
                    })
                    .await?
                };
                match decision {
                    Ok(RetrainDecision::Train) => {
                        match train(shared, &replica, kairos_store::SYSTEM_PARTY).await {
                            Ok(status) => tracing::info!(
                                replica = %replica,
                                version = status.version,
                                examples = status.trained_examples,
                                training_ms = status.training_ms,
                                "predictor model retrained"
                            ),
                            Err(error) => {
                                tracing::warn!(replica = %replica, error = %error.message, "retraining the predictor failed");
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(replica = %replica, %error, "reading the predictor's outcomes failed");
                    }
                }
            }
            PredictorMsg::Train(replica, party, reply) => {
                let _ = reply.send(train(shared, &replica, &party).await);
            }
        }
        Ok(())
    }
}

async fn train(
    shared: &Arc<Shared>,
    replica: &str,
    party: &str,
) -> Result<ModelStatusJson, ApiError> {
    let shared = shared.clone();
    let replica = replica.to_string();
    let party = party.to_string();
    let span = tracing::info_span!("train_model", replica = %replica);
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| Ok(shared.service().train_model(&replica, &party)?))
    })
    .await
    .unwrap_or_else(|error| Err(ApiError::internal(format!("training failed: {error}"))))
}

/// Tells the predictor actor that `replica` has a new outcome.
pub fn outcome_arrived(shared: &Shared, replica: &str) {
    if let Some(actor) = shared.predictor() {
        let _ = actor.cast(PredictorMsg::Outcome(replica.to_string()));
    }
}

async fn run<T: Send + 'static>(
    shared: &Arc<Shared>,
    name: String,
    job: impl FnOnce(Arc<Shared>) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let worker = shared.clone();
    shared
        .replay
        .run(move || {
            worker.store.replica(&name)?;
            job(worker)
        })
        .await
}

#[utoipa::path(post, path = "/api/replicas/{name}/proposals/{id}/predict", request_body = PredictRequest, params(("name" = String, Path, description = "Replica"), ("id" = String, Path, description = "Proposal id prefix")), responses(
    (status = 200, description = "The predicted outcome: p_error, confidence, abstain, resource_deltas, affected, explanation, model", body = kairos_ops::learn::PredictionJson),
    (status = 404, description = "Unknown replica or proposal", body = ErrorBody)))]
pub async fn predict(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path((name, id)): Path<(String, String)>,
    payload: Result<Json<PredictRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let party = acting.party(request.party, PARTY_DEFAULT)?;
    let prediction = run(&shared, name.clone(), move |shared| {
        Ok(shared
            .service()
            .predict(&name, &id, request.ops.as_deref(), &party)?)
    })
    .await?;
    Ok(Json(prediction).into_response())
}

#[utoipa::path(get, path = "/api/replicas/{name}/model", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The serving model: version, training range, held-out figures, outcomes known and when it retrains", body = kairos_ops::learn::ModelStatusJson),
    (status = 404, description = "Unknown replica", body = ErrorBody)))]
pub async fn model_status(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let status = run(&shared, name.clone(), move |shared| {
        Ok(shared.service().model_status(&name)?)
    })
    .await?;
    Ok(Json(status).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/model/train", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The new model's status", body = kairos_ops::learn::ModelStatusJson),
    (status = 409, description = "Not enough outcomes to train (code not_enough_outcomes)", body = ErrorBody)))]
pub async fn train_model(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let party = acting.party(None, PARTY_DEFAULT)?;
    shared.store.replica(&name).map_err(ApiError::from)?;
    let actor = shared
        .predictor()
        .ok_or_else(|| ApiError::internal("the predictor actor is not running"))?;
    let answer = actor
        .call(
            |reply| PredictorMsg::Train(name, party, reply),
            Some(std::time::Duration::from_secs(3600)),
        )
        .await;
    match answer {
        Ok(ractor::rpc::CallResult::Success(result)) => Ok(Json(result?).into_response()),
        Ok(_) => Err(ApiError::internal("the training did not finish in time")),
        Err(error) => Err(ApiError::internal(format!(
            "the predictor actor is restarting: {error}"
        ))),
    }
}

#[utoipa::path(get, path = "/api/replicas/{name}/model/report", params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "Stored predictions scored against the outcomes that followed: Brier, AUC, ECE, reliability bins, accuracy and coverage by confidence, beside two baselines", body = kairos_ops::learn::ModelReportJson),
    (status = 404, description = "Unknown replica", body = ErrorBody)))]
pub async fn model_report(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let report = run(&shared, name.clone(), move |shared| {
        Ok(shared.service().model_report(&name)?)
    })
    .await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(post, path = "/api/replicas/{name}/suggest", request_body = SuggestRequest, params(("name" = String, Path, description = "Replica")), responses(
    (status = 200, description = "The candidate values, safest first (abstentions last)", body = Vec<kairos_ops::learn::SuggestionJson>),
    (status = 400, description = "No values, an unknown objective, or a file that is not a parsed config file", body = ErrorBody)))]
pub async fn suggest(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    payload: Result<Json<SuggestRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_input(payload)?;
    let ranked = run(&shared, name.clone(), move |shared| {
        Ok(shared.service().suggest(
            &name,
            &request.file,
            &request.key,
            &request.values,
            request.objective.as_deref(),
        )?)
    })
    .await?;
    Ok(Json(ranked).into_response())
}
