//! The node's supervisor: starts the predictor actor, and a snapshotter and a watcher for
//! every replica, linked to itself, and restarts any that fails (logged and counted).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kairos_core::ReplicaDefinition;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::Shared;
use crate::predictor::{self, PredictorActor};
use crate::snapshotter::{self, SnapshotterActor};
use crate::watcher::{self, WatcherActor};

pub struct SupervisorActor;

pub enum SupervisorMsg {
    /// Start watching a replica just added to the store.
    Watch(ReplicaDefinition, RpcReplyPort<Result<(), String>>),
}

pub struct SupervisorState {
    shared: Arc<Shared>,
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        start_predictor(&myself, &shared).await?;
        for replica in shared.store.replicas()? {
            start_snapshotter(&myself, &shared, &replica.name).await?;
            start_watcher(&myself, &shared, replica).await?;
        }
        Ok(SupervisorState { shared })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Watch(replica, reply) => {
                let result = async {
                    start_snapshotter(&myself, &state.shared, &replica.name).await?;
                    start_watcher(&myself, &state.shared, replica).await
                }
                .await
                .map_err(|error: ActorProcessingErr| error.to_string());
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            let name = cell.get_name().unwrap_or_default();
            state.shared.actor_restarts.fetch_add(1, Ordering::Relaxed);
            state.shared.metrics.actor_restarts.add(1, &[]);
            tracing::error!(actor = %name, %error, "actor failed; restarting it");
            if name == predictor::ACTOR_NAME {
                start_predictor(&myself, &state.shared).await?;
            } else if let Some(replica) = name.strip_prefix("snapshotter:") {
                start_snapshotter(&myself, &state.shared, replica).await?;
            } else if let Some(replica) = name.strip_prefix("watcher:") {
                let definition = state.shared.store.replica(replica)?;
                start_watcher(&myself, &state.shared, definition).await?;
            }
        }
        Ok(())
    }
}

async fn start_predictor(
    myself: &ActorRef<SupervisorMsg>,
    shared: &Arc<Shared>,
) -> Result<(), ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        Some(predictor::ACTOR_NAME.to_string()),
        PredictorActor,
        shared.clone(),
        myself.get_cell(),
    )
    .await?;
    shared.register_predictor(actor);
    Ok(())
}

async fn start_snapshotter(
    myself: &ActorRef<SupervisorMsg>,
    shared: &Arc<Shared>,
    replica: &str,
) -> Result<(), ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        Some(snapshotter::name(replica)),
        SnapshotterActor,
        (shared.clone(), replica.to_string()),
        myself.get_cell(),
    )
    .await?;
    shared.register_snapshotter(replica, actor);
    Ok(())
}

async fn start_watcher(
    myself: &ActorRef<SupervisorMsg>,
    shared: &Arc<Shared>,
    replica: ReplicaDefinition,
) -> Result<(), ActorProcessingErr> {
    Actor::spawn_linked(
        Some(watcher::name(&replica.name)),
        WatcherActor,
        (shared.clone(), replica),
        myself.get_cell(),
    )
    .await?;
    Ok(())
}
