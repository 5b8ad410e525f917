//! The node's part in its cluster (see `kairos-cluster`): the replicated log started with
//! the node, catalog commands routed through it, objects fetched from peers, the routes
//! members call each other on (`/cluster/...`, authenticated by the members' shared
//! secret) and the admin routes (`/api/cluster...`, a party's token).
//!
//! Without a `[cluster]` section the node forms a cluster of one at start: the same log
//! and state machine, no peers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use kairos_cluster::network::{CLUSTER_HEADER, PeerError};
use kairos_cluster::objects::{ObjectRequest, PeerObjects};
use kairos_cluster::{
    LogStore, Network, Node, NodeId, Outcomes, PeerClient, Raft, Request as LogRequest,
    StateMachine,
};
use kairos_store::kv::WriteBatch;
use kairos_store::{Applied, CatalogError, Command, CommandLog, Store};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::api::ApiError;

/// How long a command waits for the cluster (a leader, a majority) before it fails.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request between members (a batch of log entries, a snapshot chunk).
const PEER_BODY_BYTES_MAX: usize = 64 << 20;
/// How long a joining member has to catch up with the log before it is refused.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a member waits for another's answer to `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_millis(800);

/// What this node keeps of its cluster beside the log: which cluster it belongs to and
/// under which id (a data directory never changes either).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterFile {
    cluster_id: String,
    node_id: NodeId,
}

pub struct Cluster {
    pub raft: Raft,
    pub id: NodeId,
    pub advertise: String,
    pub client: PeerClient,
    cluster_id: Arc<RwLock<Option<String>>>,
    outcomes: Arc<Outcomes>,
    pub log: LogStore,
    secret: Option<String>,
    runtime: tokio::runtime::Handle,
    file: PathBuf,
    /// Whether the configuration has a `[cluster]` section (a cluster of one otherwise).
    pub configured: bool,
    pub replication: u32,
    /// Keeps the catalog's frames whole on this member (objects fetched from peers).
    pub replicator: Arc<kairos_cluster::objects::Replicator>,
    /// Set while this member hands its leadership over: it appends nothing meanwhile
    /// (an entry it replicated would renew the followers' lease and keep them from
    /// voting for the new leader).
    transferring: std::sync::atomic::AtomicBool,
    /// Requests for the log, gathered into batches (see [`batch_writes`]).
    writes: tokio::sync::mpsc::UnboundedSender<PendingWrite>,
}

/// Requests appended as one entry at most.
const BATCH_REQUESTS_MAX: usize = 512;
/// Entries being appended at once: while they are, new requests gather into the next.
const WRITES_IN_FLIGHT: usize = 4;

/// A request waiting to be appended, and where its position in the log goes.
type PendingWrite = (
    LogRequest,
    tokio::sync::oneshot::Sender<Result<(u64, u32), WriteFailure>>,
);

/// Why the leader did not append a request (the part of openraft's error a waiter needs).
#[derive(Debug, Clone)]
enum WriteFailure {
    /// This member does not lead: the leader it knows of, if any.
    NotLeader(Option<(NodeId, String)>),
    Unavailable(String),
}

/// Appends what members ask for, gathered: the requests that arrive while earlier entries
/// are being appended become one entry ([`LogRequest::Batch`]). openraft 0.9 syncs its log
/// once per client write, one write after another; gathered, a burst of commands costs
/// one sync, and each request's outcome is found by the entry's index and its position.
async fn batch_writes(raft: Raft, mut queue: tokio::sync::mpsc::UnboundedReceiver<PendingWrite>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut pending = vec![first];
        while pending.len() < BATCH_REQUESTS_MAX {
            match queue.try_recv() {
                Ok(more) => pending.push(more),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (mut requests, waiters): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let request = if requests.len() == 1 {
                requests.swap_remove(0)
            } else {
                LogRequest::Batch { requests }
            };
            let result = raft
                .client_write(request)
                .await
                .map_err(|error| match error {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                        WriteFailure::NotLeader(
                            forward
                                .leader_id
                                .zip(forward.leader_node.map(|node| node.addr)),
                        )
                    }
                    RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
                        WriteFailure::Unavailable(error.to_string())
                    }
                    RaftError::Fatal(error) => {
                        WriteFailure::Unavailable(format!("this node's log stopped: {error}"))
                    }
                });
            for (position, waiter) in waiters.into_iter().enumerate() {
                let _ = waiter.send(
                    result
                        .as_ref()
                        .map(|response| (response.log_id.index, position as u32))
                        .map_err(Clone::clone),
                );
            }
        });
    }
}

/// Starts the log of the node whose store is `store`.
pub async fn start(
    store: &Store,
    config: &kairos_config::Config,
    reachable: &str,
) -> Result<Arc<Cluster>, String> {
    let section = config.cluster.clone();
    let id = section.as_ref().map_or(1, |c| c.node_id);
    let advertise = section
        .as_ref()
        .and_then(|c| c.advertise.clone())
        .unwrap_or_else(|| reachable.to_string());
    let dir = config.node.data_dir.join("raft");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join("cluster.json");
    let known: Option<ClusterFile> = match std::fs::read(&file) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a cluster file: {e}", file.display()))?,
        ),
        Err(_) => None,
    };
    if let Some(known) = &known
        && known.node_id != id
    {
        return Err(format!(
            "the data directory belongs to node {} of cluster {}, and the configuration says cluster.node_id = {id}",
            known.node_id, known.cluster_id
        ));
    }
    let cluster_id = Arc::new(RwLock::new(known.map(|k| k.cluster_id)));
    let flushing = store.share();
    let log = LogStore::open(
        &dir.join("log.redb"),
        Arc::new(move || {
            flushing
                .kv()
                .commit(WriteBatch::new())
                .map_err(|e| e.to_string())
        }),
    )?;
    let machine = StateMachine::open(store.share(), &dir)?;
    let outcomes = machine.outcomes();
    let (heartbeat, election, snapshot_every) = section.as_ref().map_or(
        (Duration::from_millis(100), Duration::from_millis(400), 5000),
        |c| (c.heartbeat, c.election_timeout, c.snapshot_every),
    );
    // openraft 0.9 makes a follower that heard from a leader wait the leader's lease
    // (`election_timeout_max`) and then its own drawn timeout before it stands: failover
    // is their sum. A range of half the timeout still keeps two followers from standing
    // at the same instant (loopback and LAN round trips are milliseconds).
    let election_ms = election.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: "kairos".into(),
        heartbeat_interval: heartbeat.as_millis() as u64,
        election_timeout_min: election_ms,
        election_timeout_max: election_ms + election_ms / 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: snapshot_every.min(1000),
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| format!("the cluster's timing: {e}"))?;
    let secret = section.as_ref().and_then(|c| c.secret.clone());
    let client = PeerClient::new(id, secret.clone(), cluster_id.clone());
    let raft = Raft::new(
        id,
        Arc::new(raft_config),
        Network {
            client: client.clone(),
        },
        log.clone(),
        machine,
    )
    .await
    .map_err(|e| {
        format!(
            "starting the cluster's log from {} (raft/log.redb, raft/snapshot.*): {e}; if these files are damaged, remove this member from another one (kairos cluster leave {id}), move {} aside and join again",
            dir.display(),
            dir.display()
        )
    })?;
    let (writes, queue) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(batch_writes(raft.clone(), queue));
    let cluster = Arc::new(Cluster {
        writes,
        raft,
        id,
        advertise,
        client,
        cluster_id,
        outcomes,
        log,
        secret,
        runtime: tokio::runtime::Handle::current(),
        file,
        configured: section.is_some(),
        replication: section.as_ref().map_or(1, |c| c.replication),
        replicator: Arc::default(),
        transferring: std::sync::atomic::AtomicBool::new(false),
    });
    if !cluster.configured {
        cluster.become_single().await?;
    } else if cluster.voters() == BTreeSet::from([id]) {
        let _ = cluster.raft.trigger().elect().await;
    }
    Ok(cluster)
}

/// A new id (a cluster's, a request's): 16 random bytes, in hex.
fn random_id() -> String {
    // The thread's generator, seeded from the operating system: no file opened per request.
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_cluster_id(&self, cluster_id: &str) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(&ClusterFile {
            cluster_id: cluster_id.to_string(),
            node_id: self.id,
        })
        .map_err(|e| e.to_string())?;
        let aside = self.file.with_extension("new");
        std::fs::write(&aside, text)
            .and_then(|()| std::fs::File::open(&aside)?.sync_all())
            .and_then(|()| std::fs::rename(&aside, &self.file))
            .map_err(|e| format!("{}: {e}", self.file.display()))?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = Some(cluster_id.to_string());
        Ok(())
    }

    /// Forms a cluster of one (or, if it is one already, makes its address current).
    async fn become_single(&self) -> Result<(), String> {
        if !self
            .raft
            .is_initialized()
            .await
            .map_err(|e| e.to_string())?
        {
            self.init().await?;
        }
        let _ = self.raft.trigger().elect().await;
        self.wait_for_leader(Duration::from_secs(10)).await;
        let members = self.members();
        if members
            .get(&self.id)
            .is_some_and(|node| node.addr != self.advertise)
            && members.len() == 1
        {
            let nodes = BTreeMap::from([(self.id, Node::new(self.advertise.clone()))]);
            self.raft
                .change_membership(ChangeMembers::SetNodes(nodes), false)
                .await
                .map_err(|e| format!("updating this node's address: {e}"))?;
        }
        Ok(())
    }

    /// Makes this node the first member of a new cluster.
    async fn init(&self) -> Result<String, String> {
        let cluster_id = self.cluster_id().unwrap_or_else(random_id);
        self.set_cluster_id(&cluster_id)?;
        let members = BTreeMap::from([(self.id, Node::new(self.advertise.clone()))]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| format!("forming the cluster: {e}"))?;
        Ok(cluster_id)
    }

    /// Waits until some member leads (at most `timeout`); the leader's id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let wait = self.raft.wait(Some(timeout));
        wait.metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Every member (voters and learners) with its address.
    pub fn members(&self) -> BTreeMap<NodeId, Node> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect()
    }

    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The other members' addresses, the leader first.
    pub fn peer_addresses(&self) -> Vec<String> {
        let leader = self.raft.metrics().borrow().current_leader;
        let mut peers: Vec<(bool, String)> = self
            .members()
            .into_iter()
            .filter(|(id, _)| *id != self.id)
            .map(|(id, node)| (Some(id) != leader, node.addr))
            .collect();
        peers.sort();
        peers.into_iter().map(|(_, addr)| addr).collect()
    }

    fn leader_address(&self) -> Option<(NodeId, String)> {
        let leader = self.raft.metrics().borrow().current_leader?;
        let address = self.members().get(&leader)?.addr.clone();
        Some((leader, address))
    }

    /// Waits (at most `timeout`) until this member applied what the leader had applied
    /// when asked: what any member acknowledged before is then visible here.
    pub async fn catch_up(&self, timeout: Duration) {
        let Some((leader, address)) = self.leader_address() else {
            return;
        };
        if leader == self.id {
            let _ = tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await;
            return;
        }
        let Ok(hello) = self
            .client
            .post_async::<_, Hello>(&address, "/cluster/hello", serde_json::json!({}), timeout)
            .await
        else {
            return;
        };
        if let Some(index) = hello.applied {
            let _ = self
                .raft
                .wait(Some(timeout))
                .applied_index_at_least(Some(index), "the leader's commit")
                .await;
        }
    }

    /// Appends `request` here, gathered with others into one entry when several arrive
    /// at once (this member must lead): the entry's index and the request's position.
    async fn write(&self, request: LogRequest) -> Result<(u64, u32), WriteFailure> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        if self.writes.send((request, answer)).is_err() {
            return Err(WriteFailure::Unavailable("the node is stopping".into()));
        }
        answered
            .await
            .unwrap_or_else(|_| Err(WriteFailure::Unavailable("the node is stopping".into())))
    }

    /// Appends `request` to the log (through the leader, wherever it is) and waits until
    /// this node applied it; the entry's index and the request's position in it.
    pub async fn append(&self, request: LogRequest) -> Result<(u64, u32), CatalogError> {
        // One id for every time it is sent: a forward retried after its leader died
        // between appending and answering is applied once.
        let request = LogRequest::Once {
            id: random_id(),
            request: Box::new(request),
        };
        let deadline = tokio::time::Instant::now() + SUBMIT_TIMEOUT;
        self.hold_while_transferring(deadline).await;
        let mut last_problem = String::from(
            "no member leads (an election is under way, or too few members are reachable for a majority)",
        );
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(CatalogError::Unavailable(format!(
                    "{last_problem}; tried for {}s",
                    SUBMIT_TIMEOUT.as_secs()
                )));
            }
            let written = tokio::time::timeout(remaining, self.write(request.clone())).await;
            let at = match written {
                Err(_) => {
                    return Err(CatalogError::Unavailable(
                        "the leader could not reach a majority in time; the command may still take effect".into(),
                    ));
                }
                Ok(Ok(at)) => at,
                Ok(Err(WriteFailure::NotLeader(Some((leader, address))))) if leader != self.id => {
                    match self
                        .client
                        .post_async::<_, Appended>(
                            &address,
                            "/cluster/submit",
                            request.clone(),
                            remaining,
                        )
                        .await
                    {
                        Ok(appended) => (appended.index, appended.position),
                        Err(problem) => {
                            last_problem = problem.to_string();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                Ok(Err(WriteFailure::NotLeader(_))) => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    continue;
                }
                Ok(Err(WriteFailure::Unavailable(problem))) => {
                    return Err(CatalogError::Unavailable(problem));
                }
            };
            let index = at.0;
            let remaining = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_secs(1));
            self.raft
                .wait(Some(remaining))
                .applied_index_at_least(Some(index), "the command applied here")
                .await
                .map_err(|e| {
                    CatalogError::Unavailable(format!(
                        "the command was accepted (entry {index}) but not applied here in time: {e}"
                    ))
                })?;
            return Ok(at);
        }
    }

    /// Submits a catalog command through the log; its outcome as applied here.
    pub async fn submit(&self, command: Command) -> Result<Applied, CatalogError> {
        let (index, position) = self.append(LogRequest::Command(Box::new(command))).await?;
        self.outcomes.take(index, position).unwrap_or_else(|| {
            Err(CatalogError::Unavailable(format!(
                "the outcome of entry {index} (request {position}) was not kept"
            )))
        })
    }
}

impl Cluster {
    /// Waits while this member hands its leadership over (at most until `deadline`).
    async fn hold_while_transferring(&self, deadline: tokio::time::Instant) {
        while self.transferring.load(std::sync::atomic::Ordering::SeqCst)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Appended {
    index: u64,
    /// The request's position in the entry (a batch), 0 for an entry of its own.
    #[serde(default)]
    position: u32,
}

/// Routes a store's commands through the cluster's log.
pub struct ThroughLog(pub Arc<Cluster>);

impl CommandLog for ThroughLog {
    fn submit(&self, command: &Command) -> Result<Applied, CatalogError> {
        let cluster = self.0.clone();
        let command = command.clone();
        let (sender, receiver) = std::sync::mpsc::channel();
        self.0.runtime.spawn(async move {
            let _ = sender.send(cluster.submit(command).await);
        });
        let wait = || receiver.recv();
        let received = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        received.unwrap_or_else(|_| Err(CatalogError::Unavailable("the node is stopping".into())))
    }
}

/// What members answer `hello` with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub cluster_id: Option<String>,
    pub node_id: NodeId,
    pub api: String,
    pub pid: u32,
    pub leader: Option<NodeId>,
    /// The term this member is in (with `leader`, read at one instant).
    #[serde(default)]
    pub term: u64,
    /// This member's wall clock when it answered (ms since the Unix epoch): members compare
    /// it with theirs to find a clock that disagrees.
    #[serde(default)]
    pub clock_ms: Option<i64>,
    /// The sandboxes it runs, of its slots (members hand sandboxes to one with a free one).
    #[serde(default)]
    pub sandboxes: Option<SandboxLoad>,
    pub members: BTreeMap<NodeId, String>,
    /// The last entry this member applied, and the last its snapshot covers.
    #[serde(default)]
    pub applied: Option<u64>,
    #[serde(default)]
    pub snapshot: Option<u64>,
    /// Which frames are whole here (see `Replicator`).
    #[serde(default)]
    pub objects: kairos_cluster::objects::ObjectHealth,
}

fn hello_of(cluster: &Cluster) -> Hello {
    // One copy of the figures: a second read of the watch while the first is held would
    // wait behind the log's writer, which waits for the first.
    let metrics = cluster.raft.metrics().borrow().clone();
    Hello {
        cluster_id: cluster.cluster_id(),
        node_id: cluster.id,
        api: cluster.advertise.clone(),
        pid: std::process::id(),
        leader: metrics.current_leader,
        term: metrics.current_term,
        clock_ms: Some(wall_clock_ms()),
        sandboxes: None,
        members: metrics
            .membership_config
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect(),
        applied: metrics.last_applied.map(|id| id.index),
        snapshot: metrics.snapshot.map(|id| id.index),
        objects: cluster.replicator.health(),
    }
}

/// Another member's `hello`: who it is, whom it follows, its load and clock.
async fn ask_hello(client: &PeerClient, address: &str) -> Result<Hello, PeerError> {
    client
        .post_async(
            address,
            "/cluster/hello",
            serde_json::json!({}),
            HELLO_TIMEOUT,
        )
        .await
}

/// This host's wall clock, in ms since the Unix epoch.
fn wall_clock_ms() -> i64 {
    kairos_core::Instant::now().0 / 1_000_000
}

/// A clock further apart than this from the asking member's is reported.
pub const CLOCK_SKEW_WARN_MS: i64 = 1000;
/// The leader logs a member's clock as apart from its own at most this often.
const CLOCK_WARN_EVERY: Duration = Duration::from_secs(60);

/// How far `hello`'s clock is ahead of this one (negative: behind), from a request sent at
/// `sent_ms` and answered at `received_ms` (the answer taken as made half-way, as NTP does).
fn clock_offset_ms(hello: &Hello, sent_ms: i64, received_ms: i64) -> Option<i64> {
    hello
        .clock_ms
        .map(|theirs| theirs - (sent_ms + (received_ms - sent_ms) / 2))
}

/// What to say of a member whose clock is `offset_ms` apart from `asker`'s.
fn clock_warning(member: NodeId, asker: NodeId, offset_ms: i64) -> Option<String> {
    (offset_ms.abs() > CLOCK_SKEW_WARN_MS).then(|| {
        format!(
            "member {member}'s clock is {:.1} s {} member {asker}'s: frames it captures carry its own time (time specs resolve by a frame's recorded time, so they may land out of order); set its clock right (NTP)",
            offset_ms.abs() as f64 / 1000.0,
            if offset_ms > 0 { "ahead of" } else { "behind" }
        )
    })
}

fn cluster_of(shared: &Shared) -> Result<Arc<Cluster>, ApiError> {
    shared
        .cluster
        .get()
        .cloned()
        .ok_or_else(|| ApiError::busy("the node's cluster log is starting"))
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "cluster_unavailable",
        message,
    )
}

fn peer_error(error: PeerError) -> ApiError {
    match error {
        PeerError::Refused {
            status, message, ..
        } => ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            "peer_refused",
            message,
        ),
        other => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "peer_unreachable",
            other.to_string(),
        ),
    }
}

/// The routes members call each other on, behind the members' secret.
pub fn peer_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/cluster/raft/append", post(raft_append))
        .route("/cluster/raft/vote", post(raft_vote))
        .route("/cluster/raft/snapshot", post(raft_snapshot))
        .route("/cluster/submit", post(peer_submit))
        .route("/cluster/objects", post(peer_objects))
        .route("/cluster/hold", post(peer_hold))
        .route("/cluster/hello", post(peer_hello))
        .route("/cluster/add", post(peer_add))
        .route("/cluster/remove", post(peer_remove))
        .route("/cluster/view", post(peer_view))
        .route("/cluster/elect", post(peer_elect))
        .route("/cluster/campaign", post(peer_campaign))
        .layer(axum::extract::DefaultBodyLimit::max(PEER_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            peer_auth,
        ))
        .with_state(shared)
}

/// Members prove membership with the shared secret (without one, only loopback peers
/// are accepted) and name the cluster they belong to; a request for another cluster is
/// refused by name.
async fn peer_auth(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(cluster) = shared.cluster.get().cloned() else {
        return unavailable("the node's cluster log is starting").into_response();
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match (&cluster.secret, bearer) {
        (Some(secret), Some(given)) if constant_time_eq(secret.as_bytes(), given.as_bytes()) => {}
        (Some(_), _) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not_a_member",
                "requests between members need the cluster's secret (cluster.secret_file or $KAIROS_CLUSTER_SECRET)",
            )
            .into_response();
        }
        (None, _) if !shared.listen.ip().is_loopback() => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "not_a_member",
                "this node listens beyond loopback and has no cluster secret: members are not accepted (set cluster.secret_file)",
            )
            .into_response();
        }
        (None, _) => {}
    }
    let theirs = request
        .headers()
        .get(CLUSTER_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let path = request.uri().path().to_string();
    let ours = cluster.cluster_id();
    match (&ours, &theirs) {
        (Some(ours), Some(theirs)) if ours != theirs => {
            return ApiError::new(
                StatusCode::CONFLICT,
                "wrong_cluster",
                format!("this node belongs to cluster {ours}, not to cluster {theirs}"),
            )
            .into_response();
        }
        (None, _) if path.starts_with("/cluster/raft/") => {
            return ApiError::new(
                StatusCode::CONFLICT,
                "not_joined",
                "this node has not joined a cluster (kairos cluster join ADDR)",
            )
            .into_response();
        }
        _ => {}
    }
    let span = tracing::debug_span!("cluster.peer", path = %path);
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    kairos_telemetry::continue_trace(&span, traceparent.as_deref(), None);
    tracing::Instrument::instrument(next.run(request), span).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn raft_append(
    State(shared): State<Arc<Shared>>,
    payload: Result<
        Json<openraft::raft::AppendEntriesRequest<kairos_cluster::TypeConfig>>,
        JsonRejection,
    >,
) -> Result<Response, ApiError> {
    let rpc = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    Ok(Json(cluster.raft.append_entries(rpc).await).into_response())
}

async fn raft_vote(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<openraft::raft::VoteRequest<NodeId>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let rpc = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    Ok(Json(cluster.raft.vote(rpc).await).into_response())
}

async fn raft_snapshot(
    State(shared): State<Arc<Shared>>,
    payload: Result<
        Json<openraft::raft::InstallSnapshotRequest<kairos_cluster::TypeConfig>>,
        JsonRejection,
    >,
) -> Result<Response, ApiError> {
    let rpc = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    Ok(Json(cluster.raft.install_snapshot(rpc).await).into_response())
}

/// A member's entry, appended here because this member leads.
async fn peer_submit(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<LogRequest>, JsonRejection>,
) -> Result<Json<Appended>, ApiError> {
    let request = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    cluster
        .hold_while_transferring(tokio::time::Instant::now() + SUBMIT_TIMEOUT)
        .await;
    let nested = match &request {
        LogRequest::Once { request, .. } => {
            matches!(
                **request,
                LogRequest::Batch { .. } | LogRequest::Once { .. }
            )
        }
        _ => false,
    };
    if matches!(request, LogRequest::Batch { .. }) || nested {
        return Err(ApiError::bad_request(
            "batch_not_accepted",
            "a member sends one request at a time (with an id, one command or placement); the leader gathers them into batches",
        ));
    }
    if let LogRequest::Once { id, .. } = &request
        && (id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::bad_request(
            "bad_request_id",
            format!("a request id is 1 to 64 hexadecimal digits, not {id:?}"),
        ));
    }
    let single = match &request {
        LogRequest::Once { request, .. } => request.as_ref(),
        single => single,
    };
    if let LogRequest::Place { replica, node, .. } = single {
        // A placement names a member (or none) and a replica the catalog knows.
        if let Some(node) = node
            && !cluster.members().contains_key(node)
        {
            return Err(ApiError::bad_request(
                "unknown_member",
                format!("member {node} is not in the cluster; a replica is placed on a member"),
            ));
        }
        let known = shared
            .store
            .reader()
            .and_then(|reader| reader.get(&kairos_store::keys::replica(replica)))
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if known.is_none() {
            return Err(ApiError::bad_request(
                "unknown_replica",
                format!("no replica {replica:?} to place (see `kairos replica list`)"),
            ));
        }
    }
    match tokio::time::timeout(SUBMIT_TIMEOUT, cluster.write(request)).await {
        Ok(Ok((index, position))) => Ok(Json(Appended { index, position })),
        Ok(Err(WriteFailure::NotLeader(_))) => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "not_leader",
            "this member no longer leads; ask again",
        )),
        Ok(Err(WriteFailure::Unavailable(problem))) => Err(unavailable(problem)),
        Err(_) => Err(unavailable(
            "the leader could not reach a majority in time; the command may still take effect",
        )),
    }
}

/// Frames a member asks another to make whole at once, at most.
const HOLD_FRAMES_MAX: usize = 64;

/// Frames (id and root) a member asks another to make whole here now.
#[derive(Debug, Serialize, Deserialize)]
struct HoldRequest {
    frames: Vec<(kairos_core::Hash, kairos_core::Hash)>,
}

/// Whether each frame asked is whole on the member that answers.
#[derive(Debug, Serialize, Deserialize)]
struct HoldAnswer {
    whole: Vec<bool>,
}

/// `POST /cluster/hold`: fetches now what this member lacks of the frames named (from the
/// members that have them) and says which are whole here.
async fn peer_hold(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<HoldRequest>, JsonRejection>,
) -> Result<Json<HoldAnswer>, ApiError> {
    let request = crate::api::json_input(payload)?;
    if request.frames.len() > HOLD_FRAMES_MAX {
        return Err(ApiError::bad_request(
            "too_many_frames",
            format!(
                "{} frames asked at once; at most {HOLD_FRAMES_MAX}",
                request.frames.len()
            ),
        ));
    }
    let cluster = cluster_of(&shared)?;
    let store = shared.store.share();
    let whole = tokio::task::spawn_blocking(move || {
        request
            .frames
            .iter()
            .map(|(frame, root)| {
                let complete = kairos_cluster::objects::complete_frame(&store, root)
                    .is_ok_and(|completion| completion.complete);
                if complete {
                    cluster.replicator.mark_whole(*frame);
                }
                complete
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(HoldAnswer { whole }))
}

impl Cluster {
    /// Makes the frame `frame` (root `root`), captured here, whole on `cluster.replication`
    /// members, this one included: the others are asked to fetch it now, and the answer
    /// comes once enough of them hold it, or at `timeout`. How many members hold it.
    pub async fn hold_durable(
        &self,
        frame: kairos_core::Hash,
        root: kairos_core::Hash,
        timeout: Duration,
    ) -> u32 {
        if self.replication <= 1 {
            return 1;
        }
        let mut asks = tokio::task::JoinSet::new();
        for address in self.peer_addresses() {
            let client = self.client.clone();
            asks.spawn(async move {
                client
                    .post_async::<_, HoldAnswer>(
                        &address,
                        "/cluster/hold",
                        HoldRequest {
                            frames: vec![(frame, root)],
                        },
                        timeout,
                    )
                    .await
                    .is_ok_and(|answer| answer.whole.first() == Some(&true))
            });
        }
        let mut copies = 1;
        let deadline = tokio::time::Instant::now() + timeout;
        while copies < self.replication {
            match tokio::time::timeout_at(deadline, asks.join_next()).await {
                Ok(Some(Ok(true))) => copies += 1,
                Ok(Some(_)) => {}
                // Every member answered, or the time is up.
                Ok(None) | Err(_) => break,
            }
        }
        copies
    }
}

async fn peer_objects(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<ObjectRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = crate::api::json_input(payload)?;
    let store = shared.store.share();
    let bytes =
        tokio::task::spawn_blocking(move || kairos_cluster::objects::answer(&store, &request))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|message| ApiError::bad_request("bad_object_request", message))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn peer_hello(State(shared): State<Arc<Shared>>) -> Result<Json<Hello>, ApiError> {
    let cluster = cluster_of(&shared)?;
    let mut hello = hello_of(&cluster);
    hello.sandboxes = Some(SandboxLoad {
        running: shared
            .sandboxes_running
            .load(std::sync::atomic::Ordering::SeqCst) as u32,
        slots: shared.config.node.sandbox_slots as u32,
    });
    Ok(Json(hello))
}

/// How many sandboxes a member runs, of the slots it has.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SandboxLoad {
    pub running: u32,
    pub slots: u32,
}

impl SandboxLoad {
    /// Its free slots, if it has any (a member may run more than its slots: those it was
    /// asked for when no other member had a free one).
    pub fn free(&self) -> Option<u32> {
        self.slots
            .checked_sub(self.running)
            .filter(|free| *free > 0)
    }
}

impl Cluster {
    /// Whether the member at `address` answers `hello` (it is alive and not stuck).
    pub async fn answers(&self, address: &str) -> bool {
        ask_hello(&self.client, address).await.is_ok()
    }
}

/// The header a member sets on a request it hands to another (which runs it itself).
pub const FORWARDED_BY: &str = "kairos-forwarded-by";
/// The header naming the member a sandbox ran on.
pub const SANDBOX_MEMBER: &str = "kairos-sandbox-member";

impl Cluster {
    /// The member with the most free sandbox slots, if any has one (its id and address).
    pub async fn member_with_a_free_sandbox_slot(&self) -> Option<(NodeId, String)> {
        let mut asks = tokio::task::JoinSet::new();
        for (id, node) in self.members() {
            if id == self.id {
                continue;
            }
            let client = self.client.clone();
            asks.spawn(async move {
                let hello = ask_hello(&client, &node.addr).await.ok()?;
                let free = hello.sandboxes?.free()?;
                Some((free, id, node.addr))
            });
        }
        let mut best: Option<(u32, NodeId, String)> = None;
        while let Some(answer) = asks.join_next().await {
            if let Ok(Some(candidate)) = answer
                && best.as_ref().is_none_or(|best| candidate.0 > best.0)
            {
                best = Some(candidate);
            }
        }
        best.map(|(_, id, address)| (id, address))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    id: NodeId,
    api: String,
}

/// Adds a member (on the leader): as a learner until it caught up, then as a voter.
async fn peer_add(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<AddMember>, JsonRejection>,
) -> Result<Json<Hello>, ApiError> {
    let add = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    if let Some(existing) = cluster.members().get(&add.id)
        && existing.addr != add.api
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_node_id",
            format!(
                "node id {} is already a member, at {}: give the new node another cluster.node_id",
                add.id, existing.addr
            ),
        ));
    }
    if let Some((id, _)) = cluster
        .members()
        .into_iter()
        .find(|(id, node)| node.addr == add.api && *id != add.id)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_address",
            format!("{} is already member {id}", add.api),
        ));
    }
    // The new member must answer at the address it gives, as the node it says it is.
    let hello: Hello = cluster
        .client
        .post_async(
            &add.api,
            "/cluster/hello",
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreachable_member",
                format!(
                    "the leader cannot reach node {} at {}: {e}",
                    add.id, add.api
                ),
            )
        })?;
    if hello.node_id != add.id {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "wrong_member",
            format!(
                "{} answers as node {}, not node {}",
                add.api, hello.node_id, add.id
            ),
        ));
    }
    if !cluster.members().contains_key(&add.id) {
        start_from_a_snapshot(&cluster).await;
    }
    match tokio::time::timeout(
        CATCH_UP_TIMEOUT,
        cluster
            .raft
            .add_learner(add.id, Node::new(add.api.clone()), true),
    )
    .await
    {
        Ok(added) => {
            added.map_err(|e| leader_error(&cluster, e.to_string()))?;
        }
        Err(_) => {
            // Not a voter yet: taken out again, so it never counts towards a majority.
            let _ = cluster
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([add.id])), false)
                .await;
            return Err(unavailable(format!(
                "node {} did not catch up with the log within {} s; it was not added",
                add.id,
                CATCH_UP_TIMEOUT.as_secs()
            )));
        }
    }
    cluster
        .raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([add.id])), false)
        .await
        .map_err(|e| leader_error(&cluster, e.to_string()))?;
    Ok(Json(hello_of(&cluster)))
}

/// Makes a member that joins start from a snapshot of the whole catalog rather than from a
/// replay of the log: a store can hold what never went through the log (written while its
/// node ran alone, before the cluster formed), and only a snapshot carries it. A snapshot
/// is built at the applied position and the log is purged up to it; should the purge not
/// happen in time (a replication in flight holds it), the member replays the log instead,
/// and a warning says so.
async fn start_from_a_snapshot(cluster: &Cluster) {
    let Some(applied) = cluster.raft.metrics().borrow().last_applied else {
        return;
    };
    let wait = Duration::from_secs(20);
    let built = async {
        cluster
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| e.to_string())?;
        cluster
            .raft
            .wait(Some(wait))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
                "a snapshot of the catalog",
            )
            .await
            .map_err(|e| e.to_string())?;
        cluster
            .raft
            .trigger()
            .purge_log(applied.index)
            .await
            .map_err(|e| e.to_string())?;
        cluster
            .raft
            .wait(Some(wait))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= applied.index),
                "the log purged up to the snapshot",
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    if let Err(problem) = built.await {
        tracing::warn!(
            %problem,
            "the member that joins replays the log instead of starting from a snapshot: what this store held before the cluster formed may not reach it"
        );
    }
}

fn leader_error(cluster: &Cluster, problem: String) -> ApiError {
    match cluster.leader_address() {
        Some((id, address)) if id != cluster.id => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "not_leader",
            format!("member {id} leads ({address}): {problem}"),
        ),
        _ => unavailable(problem),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveMember {
    id: NodeId,
}

async fn peer_remove(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<RemoveMember>, JsonRejection>,
) -> Result<Json<Hello>, ApiError> {
    let remove = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    remove_here(&cluster, remove.id).await?;
    Ok(Json(hello_of(&cluster)))
}

async fn remove_here(cluster: &Cluster, id: NodeId) -> Result<(), ApiError> {
    if !cluster.members().contains_key(&id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_member",
            format!("node {id} is not a member"),
        ));
    }
    if id == cluster.id {
        // openraft 0.9 cannot take its own leader out of the membership.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "leader_leaving",
            format!(
                "node {id} leads: move the leadership first (kairos cluster transfer-leader NODE), then remove it"
            ),
        ));
    }
    let voters = cluster.voters();
    if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(ApiError::bad_request(
                "last_member",
                format!("node {id} is the cluster's only voter; it cannot leave"),
            ));
        }
        cluster
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| leader_error(cluster, e.to_string()))?;
    }
    cluster
        .raft
        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
        .await
        .map_err(|e| leader_error(cluster, e.to_string()))?;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Elect {
    /// Whether this member may campaign.
    #[serde(default)]
    elect: Option<bool>,
    /// Whether this member, leading, sends heartbeats.
    #[serde(default)]
    heartbeat: Option<bool>,
    /// Both come back on by themselves after this long.
    #[serde(default)]
    for_ms: u64,
}

async fn peer_elect(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<Elect>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let elect = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    set_elect(&cluster, elect.elect, elect.heartbeat, elect.for_ms);
    Ok(Json(serde_json::json!({"ok": true})))
}

fn set_elect(cluster: &Arc<Cluster>, elect: Option<bool>, heartbeat: Option<bool>, for_ms: u64) {
    if let Some(elect) = elect {
        cluster.raft.runtime_config().elect(elect);
    }
    if let Some(heartbeat) = heartbeat {
        cluster.raft.runtime_config().heartbeat(heartbeat);
        cluster
            .transferring
            .store(!heartbeat, std::sync::atomic::Ordering::SeqCst);
    }
    if elect == Some(false) || heartbeat == Some(false) {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(for_ms.clamp(1, 30_000))).await;
            cluster.raft.runtime_config().elect(true);
            cluster.raft.runtime_config().heartbeat(true);
            cluster
                .transferring
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// Tells member `id` at `address` (this node when it is `id`) to stop or resume
/// campaigning and heartbeats.
async fn tell_elect(
    cluster: &Arc<Cluster>,
    id: NodeId,
    address: &str,
    elect: Option<bool>,
    heartbeat: Option<bool>,
    for_ms: u64,
) {
    if id == cluster.id {
        set_elect(cluster, elect, heartbeat, for_ms);
        return;
    }
    let body = serde_json::json!({ "elect": elect, "heartbeat": heartbeat, "for_ms": for_ms });
    let _ = cluster
        .client
        .post_async::<_, serde_json::Value>(address, "/cluster/elect", body, HELLO_TIMEOUT)
        .await;
}

/// Campaigns until this member leads (a leadership transfer's target).
async fn peer_campaign(State(shared): State<Arc<Shared>>) -> Result<Json<Hello>, ApiError> {
    let cluster = cluster_of(&shared)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if cluster.raft.metrics().borrow().state == ServerState::Leader {
            return Ok(Json(hello_of(&cluster)));
        }
        let _ = cluster.raft.trigger().elect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(unavailable(
        "this member did not win an election within 10 s",
    ))
}

/// The cluster as `kairos cluster status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatusJson {
    pub cluster_id: Option<String>,
    /// The member that answered.
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The last entry applied by the member that answered (the leader when one is
    /// known: its applied index is the commit index).
    pub commit_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub members: Vec<MemberJson>,
    /// Where each replica's watcher runs (member id), as the catalog records it.
    pub placement: BTreeMap<String, Option<NodeId>>,
    /// On how many members a frame's objects must be to count as durable.
    pub replication: u32,
    /// How many of the catalog's frames are whole on at least `replication` members.
    pub objects: ObjectsJson,
    /// Members whose clock is more than a second apart from the answering member's.
    #[serde(default)]
    pub clock_warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObjectsJson {
    pub frames: u64,
    /// Frames whole on at least `replication` reachable members.
    pub durable: u64,
    /// Frames whole on fewer (the first 20).
    pub under_replicated_count: u64,
    pub under_replicated: Vec<kairos_core::Hash>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberJson {
    pub id: NodeId,
    pub api: String,
    pub pid: Option<u32>,
    /// `leader`, `follower`, `learner` or `unreachable`.
    pub state: String,
    /// Entries behind the leader (known on the leader).
    pub lag: Option<u64>,
    /// Frames of the catalog not whole on this member (its objects still to fetch).
    pub frames_missing: Option<u64>,
    /// The last entry the member applied, and the last its latest snapshot covers.
    pub applied: Option<u64>,
    pub snapshot: Option<u64>,
    /// How far the member's clock is ahead of the answering member's (ms; negative:
    /// behind), measured over one request.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
}

async fn view(shared: &Shared, cluster: &Arc<Cluster>) -> ClusterStatusJson {
    let metrics = cluster.raft.metrics().borrow().clone();
    let voters = cluster.voters();
    let mut members = Vec::new();
    let mut healths = Vec::new();
    let mut clock_warnings = Vec::new();
    for (id, node) in cluster.members() {
        let sent_ms = wall_clock_ms();
        let hello = if id == cluster.id {
            Some(hello_of(cluster))
        } else {
            ask_hello(&cluster.client, &node.addr).await.ok()
        };
        let clock_offset_ms = match &hello {
            Some(_) if id == cluster.id => Some(0),
            Some(hello) => clock_offset_ms(hello, sent_ms, wall_clock_ms()),
            None => None,
        };
        if let Some(warning) =
            clock_offset_ms.and_then(|offset| clock_warning(id, cluster.id, offset))
        {
            clock_warnings.push(warning);
        }
        let frames_missing = hello.as_ref().map(|h| h.objects.missing_count);
        if let Some(hello) = &hello {
            healths.push(hello.objects.clone());
        }
        let lag = metrics.replication.as_ref().and_then(|replication| {
            let matched = replication.get(&id)?.map_or(0, |log_id| log_id.index);
            Some(metrics.last_log_index.unwrap_or(0).saturating_sub(matched))
        });
        let state = if hello.is_none() {
            "unreachable"
        } else if Some(id) == metrics.current_leader {
            "leader"
        } else if voters.contains(&id) {
            "follower"
        } else {
            "learner"
        };
        members.push(MemberJson {
            id,
            api: node.addr,
            pid: hello.as_ref().map(|hello| hello.pid),
            applied: hello.as_ref().and_then(|hello| hello.applied),
            snapshot: hello.as_ref().and_then(|hello| hello.snapshot),
            state: state.into(),
            lag,
            frames_missing,
            clock_offset_ms,
        });
    }
    let objects = durability(cluster, &healths);
    let placement = kairos_cluster::placements(&shared.store)
        .unwrap_or_default()
        .into_iter()
        .map(|(replica, placement)| (replica, placement.node))
        .collect();
    ClusterStatusJson {
        cluster_id: cluster.cluster_id(),
        node_id: cluster.id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        commit_index: metrics.last_applied.map(|log_id| log_id.index),
        last_log_index: metrics.last_log_index,
        members,
        placement,
        replication: cluster.replication,
        objects,
        clock_warnings,
    }
}

/// How many frames are whole on at least `replication` of the members that reported.
fn durability(cluster: &Cluster, healths: &[kairos_cluster::objects::ObjectHealth]) -> ObjectsJson {
    let frames = healths.iter().map(|h| h.frames).max().unwrap_or(0);
    let mut lacking: BTreeMap<kairos_core::Hash, usize> = BTreeMap::new();
    for health in healths {
        for id in &health.missing {
            *lacking.entry(*id).or_default() += 1;
        }
    }
    let required = cluster.replication.min(cluster.members().len() as u32) as usize;
    let under: Vec<kairos_core::Hash> = lacking
        .iter()
        .filter(|(_, lacking)| healths.len().saturating_sub(**lacking) < required)
        .map(|(id, _)| *id)
        .collect();
    let under_count = if healths.len() < required {
        frames
    } else {
        under.len() as u64
    };
    ObjectsJson {
        frames,
        durable: frames.saturating_sub(under_count),
        under_replicated_count: under_count,
        under_replicated: under.into_iter().take(20).collect(),
    }
}

/// Keeps every frame of the catalog whole on this member: a pass after each change of
/// the catalog (at most every 500 ms) and every 5 s.
pub async fn replicate_objects(shared: Arc<Shared>) {
    let mut changes = shared.changes.subscribe();
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        changes.borrow_and_update();
        let Some(cluster) = shared.cluster.get().cloned() else {
            continue;
        };
        let store = shared.store.share();
        let replicator = cluster.replicator.clone();
        let passed = tokio::task::spawn_blocking(move || replicator.pass(&store, true)).await;
        if let Ok(Err(error)) = passed {
            tracing::warn!(%error, "fetching the objects of frames this member lacks");
        }
    }
}

async fn peer_view(State(shared): State<Arc<Shared>>) -> Result<Json<ClusterStatusJson>, ApiError> {
    let cluster = cluster_of(&shared)?;
    Ok(Json(view(&shared, &cluster).await))
}

/// `GET /api/cluster`: the leader's view when a leader answers, this member's otherwise.
pub async fn status(
    State(shared): State<Arc<Shared>>,
) -> Result<Json<ClusterStatusJson>, ApiError> {
    let cluster = cluster_of(&shared)?;
    if let Some((leader, address)) = cluster.leader_address()
        && leader != cluster.id
        && let Ok(view) = cluster
            .client
            .post_async::<_, ClusterStatusJson>(
                &address,
                "/cluster/view",
                serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await
    {
        return Ok(Json(view));
    }
    Ok(Json(view(&shared, &cluster).await))
}

/// `POST /api/cluster/init`: makes this node the first member of a new cluster.
pub async fn init(State(shared): State<Arc<Shared>>) -> Result<Json<ClusterStatusJson>, ApiError> {
    let cluster = cluster_of(&shared)?;
    if cluster
        .raft
        .is_initialized()
        .await
        .map_err(|e| unavailable(e.to_string()))?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_initialized",
            format!(
                "this node is already a member of cluster {}",
                cluster.cluster_id().unwrap_or_default()
            ),
        ));
    }
    cluster.init().await.map_err(unavailable)?;
    cluster.wait_for_leader(Duration::from_secs(5)).await;
    Ok(Json(view(&shared, &cluster).await))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Any member's API URL (default: each of `cluster.peers` in turn).
    #[serde(default)]
    pub address: Option<String>,
}

/// `POST /api/cluster/join`: joins the cluster a member of which answers at `address`.
pub async fn join(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<ClusterStatusJson>, ApiError> {
    let request = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    if !cluster.configured {
        return Err(ApiError::bad_request(
            "not_configured",
            "this node runs as a cluster of its own (no [cluster] section in its configuration): give it cluster.node_id and start it again to join",
        ));
    }
    let addresses: Vec<String> = match request.address {
        Some(address) => vec![address],
        None => shared
            .config
            .cluster
            .as_ref()
            .map(|c| c.peers.clone())
            .unwrap_or_default(),
    };
    if addresses.is_empty() {
        return Err(ApiError::bad_request(
            "no_address",
            "name a member to join (kairos cluster join ADDR) or list them in cluster.peers",
        ));
    }
    if let Some(bad) = addresses
        .iter()
        .find(|a| !(a.starts_with("http://") || a.starts_with("https://")) || a.len() < 10)
    {
        return Err(ApiError::bad_request(
            "bad_address",
            format!("{bad:?} is not a member's API URL (http://HOST:PORT)"),
        ));
    }
    let mut problems = Vec::new();
    for address in addresses {
        match join_at(&cluster, &address).await {
            Ok(()) => return Ok(Json(view(&shared, &cluster).await)),
            Err(error) => problems.push(format!("{address}: {}", error.message)),
        }
    }
    Err(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "join_failed",
        problems.join("; "),
    ))
}

async fn join_at(cluster: &Arc<Cluster>, address: &str) -> Result<(), ApiError> {
    let hello: Hello = cluster
        .client
        .post_async(
            address,
            "/cluster/hello",
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .map_err(peer_error)?;
    let Some(their_id) = hello.cluster_id.clone() else {
        return Err(ApiError::bad_request(
            "not_a_cluster",
            format!("{address} is not in a cluster yet (run kairos cluster init there)"),
        ));
    };
    if let Some(ours) = cluster.cluster_id()
        && ours != their_id
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_cluster",
            format!("this node belongs to cluster {ours}; {address} to cluster {their_id}"),
        ));
    }
    if hello.members.get(&cluster.id) == Some(&cluster.advertise) {
        return Ok(());
    }
    if cluster
        .raft
        .is_initialized()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        && cluster.cluster_id().as_deref() != Some(their_id.as_str())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_initialized",
            "this node already holds another cluster's log; a node joins with an empty data directory",
        ));
    }
    if let Some(existing) = hello.members.get(&cluster.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_node_id",
            format!(
                "node id {} is already a member, at {existing}: give this node another cluster.node_id",
                cluster.id
            ),
        ));
    }
    cluster
        .set_cluster_id(&their_id)
        .map_err(ApiError::internal)?;
    let leader = hello
        .leader
        .and_then(|id| hello.members.get(&id).cloned())
        .unwrap_or_else(|| address.to_string());
    let add = AddMember {
        id: cluster.id,
        api: cluster.advertise.clone(),
    };
    let mut target = leader;
    for _ in 0..3 {
        match cluster
            .client
            .post_async::<_, Hello>(
                &target,
                "/cluster/add",
                add.clone(),
                Duration::from_secs(120),
            )
            .await
        {
            Ok(hello) => {
                // Answered once this member applied what the leader had when it added it
                // (its own membership among it).
                if let Some(index) = hello.applied {
                    let _ = cluster
                        .raft
                        .wait(Some(Duration::from_secs(20)))
                        .applied_index_at_least(Some(index), "the leader's commit")
                        .await;
                }
                return Ok(());
            }
            Err(PeerError::Refused {
                status: 421,
                message,
                ..
            }) => {
                match message
                    .split_once('(')
                    .and_then(|(_, rest)| rest.split_once(')'))
                {
                    Some((address, _)) => target = address.to_string(),
                    None => return Err(unavailable(message)),
                }
            }
            Err(error) => return Err(peer_error(error)),
        }
    }
    Err(unavailable(
        "the leader kept changing while joining; try again",
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    /// The member (default: the node asked).
    #[serde(default)]
    pub node: Option<NodeId>,
}

/// Runs `path` with `body` on the leader (here if this node leads).
async fn on_leader<T: serde::de::DeserializeOwned + Send + 'static>(
    cluster: &Arc<Cluster>,
    path: &str,
    body: serde_json::Value,
) -> Result<Option<T>, ApiError> {
    match cluster.leader_address() {
        Some((leader, _)) if leader == cluster.id => Ok(None),
        Some((_, address)) => cluster
            .client
            .post_async(&address, path, body, Duration::from_secs(60))
            .await
            .map(Some)
            .map_err(peer_error),
        None => Err(unavailable("no member leads right now; try again")),
    }
}

/// `POST /api/cluster/leave`: removes a member (this node by default).
pub async fn leave(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<MemberRequest>, JsonRejection>,
) -> Result<Json<ClusterStatusJson>, ApiError> {
    let request = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    let id = request.node.unwrap_or(cluster.id);
    let body = serde_json::json!({ "id": id });
    if on_leader::<Hello>(&cluster, "/cluster/remove", body)
        .await?
        .is_none()
    {
        remove_here(&cluster, id).await?;
    }
    Ok(Json(view(&shared, &cluster).await))
}

/// `POST /api/cluster/transfer-leader`: makes `node` the leader. The others stop
/// campaigning for a few seconds, the leader stops its heartbeats, and the target
/// campaigns until it wins.
pub async fn transfer_leader(
    State(shared): State<Arc<Shared>>,
    payload: Result<Json<MemberRequest>, JsonRejection>,
) -> Result<Json<ClusterStatusJson>, ApiError> {
    let request = crate::api::json_input(payload)?;
    let cluster = cluster_of(&shared)?;
    let target = request.node.unwrap_or(cluster.id);
    let members = cluster.members();
    let Some(target_node) = members.get(&target) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_member",
            format!("node {target} is not a member"),
        ));
    };
    if !cluster.voters().contains(&target) {
        return Err(ApiError::bad_request(
            "not_a_voter",
            format!("node {target} is a learner; only voters lead"),
        ));
    }
    let Some((leader, _)) = cluster.leader_address() else {
        return Err(unavailable("no member leads right now; try again"));
    };
    if leader == target {
        return Ok(Json(view(&shared, &cluster).await));
    }
    let hold_ms = 12_000u64;
    for (id, node) in &members {
        if *id != target {
            tell_elect(&cluster, *id, &node.addr, Some(false), None, hold_ms).await;
        }
    }
    let leader_address = members
        .get(&leader)
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    tell_elect(
        &cluster,
        leader,
        &leader_address,
        None,
        Some(false),
        hold_ms,
    )
    .await;
    let won = cluster
        .client
        .post_async::<_, Hello>(
            &target_node.addr,
            "/cluster/campaign",
            serde_json::json!({}),
            Duration::from_secs(12),
        )
        .await;
    for (id, node) in &members {
        tell_elect(&cluster, *id, &node.addr, Some(true), Some(true), 0).await;
    }
    won.map_err(peer_error)?;
    Ok(Json(view(&shared, &cluster).await))
}

/// Fetches objects this node lacks from the other members.
pub fn object_source(cluster: &Arc<Cluster>) -> Arc<PeerObjects> {
    let weak = Arc::downgrade(cluster);
    Arc::new(PeerObjects {
        client: cluster.client.clone(),
        peers: Arc::new(move || {
            weak.upgrade()
                .map(|c| c.peer_addresses())
                .unwrap_or_default()
        }),
    })
}

/// How long a member goes unanswered before the leader moves its replicas elsewhere.
pub const PLACEMENT_GRACE: Duration = Duration::from_secs(3);

/// The member a replica's `host` names: its id, or the host of its advertise URL.
fn host_member(host: &str, members: &BTreeMap<NodeId, Node>) -> Option<NodeId> {
    members.iter().find_map(|(id, node)| {
        let address = node
            .addr
            .split_once("://")
            .map_or(node.addr.as_str(), |(_, rest)| rest);
        let address = address.split('/').next().unwrap_or(address);
        let name = match address.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => address.rsplit_once(':').map_or(address, |(name, _)| name),
        };
        (id.to_string() == host || name.eq_ignore_ascii_case(host)).then_some(*id)
    })
}

/// The leader's placement loop: every replica is placed on a live voter (the one with
/// the fewest replicas), and moved when its member leaves or stops answering for
/// [`PLACEMENT_GRACE`]; each move is an entry of the log, with its reason.
pub async fn place_replicas(shared: Arc<Shared>) {
    let mut last_seen: BTreeMap<NodeId, tokio::time::Instant> = BTreeMap::new();
    // When the leader last logged each member's clock as apart from its own.
    let mut clock_warned: BTreeMap<NodeId, tokio::time::Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = shared.cluster.get().cloned() else {
            continue;
        };
        if cluster.raft.metrics().borrow().state != ServerState::Leader {
            last_seen.clear();
            continue;
        }
        let now = tokio::time::Instant::now();
        let members = cluster.members();
        for (id, node) in &members {
            let sent_ms = wall_clock_ms();
            let answered = *id == cluster.id || {
                let hello = ask_hello(&cluster.client, &node.addr).await;
                if let Ok(hello) = &hello
                    && let Some(warning) = clock_offset_ms(hello, sent_ms, wall_clock_ms())
                        .and_then(|offset| clock_warning(*id, cluster.id, offset))
                    && clock_warned
                        .get(id)
                        .is_none_or(|at| now.duration_since(*at) >= CLOCK_WARN_EVERY)
                {
                    tracing::warn!(member = id, "{warning}");
                    clock_warned.insert(*id, now);
                }
                hello.is_ok()
            };
            if answered {
                last_seen.insert(*id, now);
            } else {
                last_seen.entry(*id).or_insert(now);
            }
        }
        last_seen.retain(|id, _| members.contains_key(id));
        let live: Vec<NodeId> = cluster
            .voters()
            .into_iter()
            .filter(|id| {
                last_seen
                    .get(id)
                    .is_some_and(|seen| now.duration_since(*seen) < PLACEMENT_GRACE)
            })
            .collect();
        if live.is_empty() {
            continue;
        }
        let store = shared.store.share();
        let Ok(Ok((replicas, placements))) = tokio::task::spawn_blocking(move || {
            Ok::<_, String>((
                store.replicas().map_err(|e| e.to_string())?,
                kairos_cluster::placements(&store).map_err(|e| e.to_string())?,
            ))
        })
        .await
        else {
            continue;
        };
        let mut load: BTreeMap<NodeId, usize> = live.iter().map(|id| (*id, 0)).collect();
        for placement in placements.values() {
            if let Some(count) = placement.node.and_then(|node| load.get_mut(&node)) {
                *count += 1;
            }
        }
        for replica in replicas {
            let current = placements.get(&replica.name).and_then(|p| p.node);
            if let Some(host) = &replica.host {
                // Pinned: watched on its host only, alive or not (its root is there).
                let target = host_member(host, &members);
                if target == current {
                    continue;
                }
                let reason = match target {
                    Some(node) => format!("its host {host:?} is member {node}"),
                    None => format!("its host {host:?} is no member: not watched until it joins"),
                };
                tracing::info!(replica = %replica.name, node = ?target, %reason, "placing the replica");
                let placed = cluster
                    .append(LogRequest::Place {
                        replica: replica.name.clone(),
                        node: target,
                        reason,
                        time: kairos_core::Instant::now(),
                    })
                    .await;
                if let Err(error) = placed {
                    tracing::warn!(replica = %replica.name, %error, "placing the replica");
                    break;
                }
                continue;
            }
            let reason = match current {
                None => "not placed yet".to_string(),
                Some(node) if !members.contains_key(&node) => {
                    format!("node {node} left the cluster")
                }
                Some(node) if !live.contains(&node) => format!(
                    "node {node} did not answer for {} s",
                    PLACEMENT_GRACE.as_secs()
                ),
                Some(_) => continue,
            };
            let Some(target) = load
                .iter()
                .min_by_key(|(id, count)| (**count, **id))
                .map(|(id, _)| *id)
            else {
                continue;
            };
            tracing::info!(replica = %replica.name, node = target, %reason, "placing the replica");
            let placed = cluster
                .append(LogRequest::Place {
                    replica: replica.name.clone(),
                    node: Some(target),
                    reason,
                    time: kairos_core::Instant::now(),
                })
                .await;
            match placed {
                Ok(_) => {
                    if let Some(count) = load.get_mut(&target) {
                        *count += 1;
                    }
                }
                Err(error) => {
                    tracing::warn!(replica = %replica.name, %error, "placing the replica");
                    break;
                }
            }
        }
    }
}

/// Tells the supervisor to start or stop watchers whenever the catalog changes (a
/// replica added, a placement moved), at most every 200 ms.
pub async fn reconcile_on_change(shared: Arc<Shared>) {
    let mut changes = shared.changes.subscribe();
    while changes.changed().await.is_ok() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        changes.borrow_and_update();
        if let Some(supervisor) = shared.supervisor() {
            let _ = supervisor.cast(crate::supervisor::SupervisorMsg::Reconcile);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member running more sandboxes than it has slots (asked when no other had a free
    /// one) has no free slot, and counting it never underflows.
    #[test]
    fn free_sandbox_slots_never_underflow() {
        let load = |running, slots| SandboxLoad { running, slots };
        assert_eq!(load(0, 2).free(), Some(2));
        assert_eq!(load(1, 2).free(), Some(1));
        assert_eq!(load(2, 2).free(), None);
        assert_eq!(load(5, 1).free(), None);
        assert_eq!(load(0, 0).free(), None);
    }
}
