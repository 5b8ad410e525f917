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
    /// Start watching a replica just added to the store (when it is placed here).
    Watch(RpcReplyPort<Result<(), String>>),
    /// The catalog changed: start a snapshotter for each new replica, and run a watcher
    /// exactly for the replicas placed on this node.
    Reconcile,
}

pub struct SupervisorState {
    shared: Arc<Shared>,
    /// The watchers running here, by replica.
    watchers: std::collections::HashMap<String, ActorRef<crate::watcher::WatcherMsg>>,
    snapshotters: std::collections::HashSet<String>,
}

/// Whether this node runs `replica`'s watcher: the replica is placed here, or nothing
/// placed it yet and this node is a cluster of its own.
fn watched_here(shared: &Shared, replica: &str) -> bool {
    let Some(cluster) = shared.cluster.get() else {
        return true;
    };
    let placed = kairos_cluster::placements(&shared.store)
        .ok()
        .and_then(|placements| placements.get(replica).map(|p| p.node));
    match placed {
        Some(node) => node == Some(cluster.id),
        None => cluster.members().len() <= 1,
    }
}

async fn reconcile(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
) -> Result<(), ActorProcessingErr> {
    let replicas = state.shared.store.replicas()?;
    for replica in replicas {
        if state.snapshotters.insert(replica.name.clone()) {
            start_snapshotter(myself, &state.shared, &replica.name).await?;
        }
        let here = watched_here(&state.shared, &replica.name);
        let running = state.watchers.contains_key(&replica.name);
        if here && !running {
            let name = replica.name.clone();
            let watcher = start_watcher(myself, &state.shared, replica).await?;
            state.watchers.insert(name, watcher);
        } else if !here
            && running
            && let Some(watcher) = state.watchers.remove(&replica.name)
        {
            tracing::info!(replica = %replica.name, "the replica is placed on another node: its watcher stops here");
            watcher.stop(Some("placed on another node".into()));
        }
    }
    Ok(())
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
        let mut state = SupervisorState {
            shared,
            watchers: Default::default(),
            snapshotters: Default::default(),
        };
        reconcile(&myself, &mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Watch(reply) => {
                let result = reconcile(&myself, state)
                    .await
                    .map_err(|error: ActorProcessingErr| error.to_string());
                let _ = reply.send(result);
            }
            SupervisorMsg::Reconcile => {
                if let Err(error) = reconcile(&myself, state).await {
                    tracing::warn!(%error, "starting or stopping watchers after a catalog change");
                }
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
                state.watchers.remove(replica);
                if watched_here(&state.shared, replica) {
                    let definition = state.shared.store.replica(replica)?;
                    let watcher = start_watcher(&myself, &state.shared, definition).await?;
                    state.watchers.insert(replica.to_string(), watcher);
                }
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
) -> Result<ActorRef<crate::watcher::WatcherMsg>, ActorProcessingErr> {
    let (watcher, _) = Actor::spawn_linked(
        Some(watcher::name(&replica.name)),
        WatcherActor,
        (shared.clone(), replica),
        myself.get_cell(),
    )
    .await?;
    Ok(watcher)
}
