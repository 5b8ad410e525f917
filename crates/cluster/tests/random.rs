//! The replicated catalog under crashes and partitions, driven by a seed: three members
//! (each with its real log file, state machine and store on disk) joined by an in-process
//! network that can cut a member off; a seeded sequence of writes, crashes, restarts,
//! partitions and heals; then everything is healed and restarted and every member must
//! hold every acknowledged entry, the same replicated catalog, and no term may have had
//! two leaders. The operations are the seed's; the timing is the machine's.
//!
//! `KAIROS_RAFT_SEEDS=N` runs N seeds (CI runs a few), `KAIROS_RAFT_SEED=S` one; a
//! failure names its seed.

// openraft's RPC and write errors are what its network trait and `client_write` return.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kairos_cluster::{LogStore, Node, NodeId, Raft, Request, StateMachine, TypeConfig, placements};
use kairos_store::Store;
use kairos_store::kv::WriteBatch;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{ServerState, error::ClientWriteError};
use rand::{Rng, SeedableRng};

/// The members reachable in-process, and those cut off.
#[derive(Default)]
struct Router {
    up: Mutex<BTreeMap<NodeId, Raft>>,
    cut: Mutex<BTreeSet<NodeId>>,
}

impl Router {
    fn route(&self, from: NodeId, to: NodeId) -> Option<Raft> {
        let cut = self.cut.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            return None;
        }
        drop(cut);
        self.up.lock().unwrap().get(&to).cloned()
    }
}

#[derive(Clone)]
struct Net {
    router: Arc<Router>,
    from: NodeId,
}

struct Link {
    router: Arc<Router>,
    from: NodeId,
    to: NodeId,
}

#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cut off or down")
    }
}

impl std::error::Error for Down {}

impl RaftNetworkFactory<TypeConfig> for Net {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> Link {
        Link {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

impl Link {
    fn target<E: std::error::Error>(
        &self,
    ) -> Result<Raft, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        self.router
            .route(self.from, self.to)
            .ok_or_else(|| RPCError::Unreachable(Unreachable::new(&Down)))
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let raft = self.target()?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let raft = self.target()?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let raft = self.target()?;
        raft.vote(rpc).await.map_err(|e| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(e.to_string())))
        })
    }
}

/// One member's directory, and its log and store while it runs.
struct Member {
    dir: PathBuf,
    running: Option<(Raft, Store)>,
}

async fn start(router: &Arc<Router>, id: NodeId, dir: &Path) -> (Raft, Store) {
    let store = {
        let mut tries = 0;
        loop {
            match Store::open(&dir.join("store")) {
                Ok(store) => break store,
                // The previous run's files close as its tasks end.
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("member {id}: {error}"),
            }
        }
    };
    let flushing = store.share();
    let log = {
        let mut tries = 0;
        loop {
            let flushing = flushing.share();
            match LogStore::open(
                &dir.join("raft/log.redb"),
                Arc::new(move || {
                    flushing
                        .kv()
                        .commit(WriteBatch::new())
                        .map_err(|e| e.to_string())
                }),
            ) {
                Ok(log) => break log,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("member {id}: {error}"),
            }
        }
    };
    let machine = StateMachine::open(store.share(), &dir.join("raft")).unwrap();
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(8),
        max_in_snapshot_log_to_keep: 4,
        ..Default::default()
    }
    .validate()
    .unwrap();
    let raft = Raft::new(
        id,
        Arc::new(config),
        Net {
            router: router.clone(),
            from: id,
        },
        log,
        machine,
    )
    .await
    .unwrap();
    router.up.lock().unwrap().insert(id, raft.clone());
    (raft, store)
}

async fn stop(router: &Arc<Router>, id: NodeId, member: &mut Member) {
    router.up.lock().unwrap().remove(&id);
    if let Some((raft, store)) = member.running.take() {
        let _ = raft.shutdown().await;
        drop(store);
    }
}

/// The leader a running, reachable member knows of.
fn leader(members: &BTreeMap<NodeId, Member>, router: &Router) -> Option<Raft> {
    let cut = router.cut.lock().unwrap().clone();
    for (id, member) in members {
        let Some((raft, _)) = &member.running else {
            continue;
        };
        if cut.contains(id) {
            continue;
        }
        let metrics = raft.metrics().borrow().clone();
        if metrics.state == ServerState::Leader {
            return Some(raft.clone());
        }
    }
    None
}

async fn run_seed(seed: u64, steps: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let work = tempfile::tempdir().unwrap();
    let router = Arc::new(Router::default());
    let mut members: BTreeMap<NodeId, Member> = BTreeMap::new();
    for id in 1..=3 {
        let dir = work.path().join(format!("m{id}"));
        let running = start(&router, id, &dir).await;
        members.insert(
            id,
            Member {
                dir,
                running: Some(running),
            },
        );
    }
    let nodes: BTreeMap<NodeId, Node> = (1..=3)
        .map(|id| (id, Node::new(format!("m{id}"))))
        .collect();
    members[&1]
        .running
        .as_ref()
        .unwrap()
        .0
        .initialize(nodes)
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    // Acknowledged placements by id, and where and when each was first placed.
    let mut sent: Vec<(String, String)> = Vec::new();
    let mut first_time: BTreeMap<String, (NodeId, i64)> = BTreeMap::new();
    let mut leaders: BTreeMap<u64, BTreeSet<NodeId>> = BTreeMap::new();
    let mut log = Vec::new();
    for step in 0..steps {
        // Who leads which term, as each running member sees itself.
        for (id, member) in &members {
            if let Some((raft, _)) = &member.running {
                let metrics = raft.metrics().borrow().clone();
                if metrics.state == ServerState::Leader {
                    leaders.entry(metrics.current_term).or_default().insert(*id);
                }
            }
        }
        let roll = rng.random_range(0..100);
        let target: NodeId = rng.random_range(1..=3);
        if roll < 12 && !sent.is_empty() {
            // An acknowledged placement sent again under its id (as a member does when
            // its leader died before answering), elsewhere and later: the log must not
            // apply it again.
            let (id, replica) = sent[rng.random_range(0..sent.len())].clone();
            let request = Request::Once {
                id: id.clone(),
                request: Box::new(Request::Place {
                    replica: replica.clone(),
                    node: Some(target),
                    reason: format!("seed {seed} step {step}, sent again"),
                    time: kairos_core::Instant(step as i64),
                }),
            };
            let Some(raft) = leader(&members, &router) else {
                log.push(format!("{step}: send {replica} again: no leader"));
                continue;
            };
            let answer =
                tokio::time::timeout(Duration::from_secs(2), raft.client_write(request)).await;
            log.push(format!(
                "{step}: send {replica} ({id}) again: {}",
                if matches!(answer, Ok(Ok(_))) {
                    "acknowledged"
                } else {
                    "not answered"
                }
            ));
        } else if roll < 60 {
            // One placement, or a batch of up to three (as the leader gathers them).
            let parts = if rng.random_range(0..3) == 0 {
                rng.random_range(2..=3)
            } else {
                1
            };
            let names: Vec<String> = (0..parts)
                .map(|part| {
                    if parts == 1 {
                        format!("r{step}")
                    } else {
                        format!("r{step}-{part}")
                    }
                })
                .collect();
            let name = names.join("+");
            let mut requests: Vec<Request> = names
                .iter()
                .enumerate()
                .map(|(part, replica)| Request::Once {
                    id: format!("{step:08x}{part:02x}"),
                    request: Box::new(Request::Place {
                        replica: replica.clone(),
                        node: Some(target),
                        reason: format!("seed {seed} step {step}"),
                        time: kairos_core::Instant(step as i64),
                    }),
                })
                .collect();
            let request = if parts == 1 {
                requests.remove(0)
            } else {
                Request::Batch { requests }
            };
            let Some(raft) = leader(&members, &router) else {
                log.push(format!("{step}: write {name}: no leader"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), raft.client_write(request)).await {
                Ok(Ok(_)) => {
                    log.push(format!("{step}: write {name}: acknowledged"));
                    for (part, replica) in names.iter().enumerate() {
                        sent.push((format!("{step:08x}{part:02x}"), replica.clone()));
                        first_time.insert(replica.clone(), (target, step as i64));
                    }
                    acknowledged.extend(names);
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    log.push(format!("{step}: write {name}: not the leader any more"));
                }
                other => log.push(format!(
                    "{step}: write {name}: {:?}",
                    other.map(|r| r.map(|_| ()))
                )),
            }
        } else if roll < 75 {
            let down = members.values().filter(|m| m.running.is_none()).count();
            let member_running = members[&target].running.is_some();
            if member_running && down == 0 {
                log.push(format!("{step}: crash {target}"));
                stop(&router, target, members.get_mut(&target).unwrap()).await;
            } else if !member_running {
                log.push(format!("{step}: restart {target}"));
                let dir = members[&target].dir.clone();
                let running = start(&router, target, &dir).await;
                members.get_mut(&target).unwrap().running = Some(running);
            }
        } else if roll < 90 {
            let mut cut = router.cut.lock().unwrap();
            if cut.is_empty() {
                log.push(format!("{step}: cut {target} off"));
                cut.insert(target);
            } else {
                log.push(format!("{step}: heal"));
                cut.clear();
            }
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Heal everything, start everyone, and let the log settle.
    router.cut.lock().unwrap().clear();
    for id in 1..=3 {
        if members[&id].running.is_none() {
            let dir = members[&id].dir.clone();
            let running = start(&router, id, &dir).await;
            members.get_mut(&id).unwrap().running = Some(running);
        }
    }
    let context = || {
        format!(
            "seed {seed} (KAIROS_RAFT_SEED={seed}); steps:\n{}",
            log.join("\n")
        )
    };
    // A last write through whoever leads, so every member must apply up to it.
    let mut settled = None;
    for _ in 0..100 {
        if let Some(raft) = leader(&members, &router)
            && let Ok(Ok(written)) = tokio::time::timeout(
                Duration::from_secs(2),
                raft.client_write(Request::Place {
                    replica: "last".into(),
                    node: None,
                    reason: "settle".into(),
                    time: kairos_core::Instant(0),
                }),
            )
            .await
        {
            settled = Some(written.log_id.index);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let index = settled.unwrap_or_else(|| panic!("no leader after healing: {}", context()));
    for (id, member) in &members {
        let (raft, _) = member.running.as_ref().unwrap();
        raft.wait(Some(Duration::from_secs(20)))
            .applied_index_at_least(Some(index), "settled")
            .await
            .unwrap_or_else(|e| panic!("member {id} did not apply {index}: {e}; {}", context()));
    }
    let mut catalogs = Vec::new();
    for (id, member) in &members {
        let (_, store) = member.running.as_ref().unwrap();
        let placed = placements(store).unwrap();
        for name in &acknowledged {
            assert!(
                placed.contains_key(name),
                "member {id} lacks acknowledged {name}; {}",
                context()
            );
            let (node, time) = first_time[name];
            assert_eq!(
                (placed[name].node, placed[name].time.0),
                (Some(node), time),
                "member {id}: {name} was applied again when sent again; {}",
                context()
            );
        }
        catalogs.push((*id, placed));
    }
    for (id, placed) in &catalogs[1..] {
        assert_eq!(
            placed,
            &catalogs[0].1,
            "members {} and {id} differ; {}",
            catalogs[0].0,
            context()
        );
    }
    for (term, ids) in &leaders {
        assert!(
            ids.len() <= 1,
            "term {term} had leaders {ids:?}; {}",
            context()
        );
    }
    eprintln!(
        "seed {seed}: {} writes acknowledged, {} crashes, {} cut-offs, {} terms with a leader, last entry {index}",
        acknowledged.len(),
        log.iter().filter(|l| l.contains(": crash")).count(),
        log.iter().filter(|l| l.contains("cut ")).count(),
        leaders.len()
    );
    for id in 1..=3 {
        stop(&router, id, members.get_mut(&id).unwrap()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_survives_seeded_crashes_and_partitions() {
    let seeds: Vec<u64> = match (
        std::env::var("KAIROS_RAFT_SEED").ok(),
        std::env::var("KAIROS_RAFT_SEEDS").ok(),
    ) {
        (Some(seed), _) => vec![seed.parse().expect("KAIROS_RAFT_SEED is a number")],
        (None, Some(count)) => {
            (0..count.parse::<u64>().expect("KAIROS_RAFT_SEEDS is a number")).collect()
        }
        (None, None) => (0..3).collect(),
    };
    for seed in seeds {
        run_seed(seed, 40).await;
    }
}
