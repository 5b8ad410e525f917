//! The Kairos node: a long-running process that captures every replica continuously
//! (a watcher and a snapshotter actor per replica, under a supervisor) and answers
//! everything over an HTTP API. Actors are thin shells: capture scheduling lives in
//! [`schedule`], capture and replay in their crates.

pub mod api;
pub mod auth;
pub mod changes;
pub mod cluster;
pub mod events;
pub mod gc;
pub mod nats;
pub mod predictor;
pub mod schedule;
pub mod serve;
pub mod snapshotter;
pub mod supervisor;
pub mod ui;
pub mod watcher;
pub mod webhook;
pub use kairos_ops::wire;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use kairos_config::Config;
use kairos_store::Store;
use ractor::{Actor, ActorRef};
use tokio::sync::Semaphore;

use crate::api::ApiError;
use crate::snapshotter::SnapshotterMsg;
use crate::supervisor::{SupervisorActor, SupervisorMsg};
use crate::wire::{ReplicaStatusJson, StatusJson};

/// A running node announces itself in its data directory with this file (its URL and
/// pid), so that the CLI pointed at that directory goes through the node.
pub const NODE_MARKER_FILE: &str = "node.json";

/// The URL of the node that owns `data_dir`, if one is running.
pub fn running_node(data_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(NODE_MARKER_FILE)).ok()?;
    let announced: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = i32::try_from(announced["pid"].as_u64()?).ok()?;
    // A marker left by a node killed with -9 names a dead process (or, once its pid is
    // reused, a live process that is not listening there: a zombie or another program).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if state.contains(") Z") || state.contains(") X") {
        return None;
    }
    let url = announced["url"].as_str()?.to_string();
    let address: SocketAddr = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?
        .parse()
        .ok()?;
    std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(1)).ok()?;
    Some(url)
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("opening the store in {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("replica {name:?} from the configuration: {reason}")]
    Replica { name: String, reason: String },
    #[error("listening on {address}: {reason}")]
    Listen { address: SocketAddr, reason: String },
    #[error("{0}")]
    Tls(String),
    #[error("the cluster: {0}")]
    Cluster(String),
    #[error("starting the actors: {0}")]
    Actors(String),
    #[error("serving the API: {0}")]
    Serve(String),
}

/// Runs replay work (show, cat, diff, restore, verify) on the blocking pool, at most
/// `concurrency` at once, with at most `queue_max` waiting.
pub struct ReplayPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_max: usize,
    latency_ms: opentelemetry::metrics::Histogram<f64>,
}

impl ReplayPool {
    pub fn new(
        concurrency: usize,
        queue_max: usize,
        latency_ms: opentelemetry::metrics::Histogram<f64>,
    ) -> ReplayPool {
        ReplayPool {
            permits: Arc::new(Semaphore::new(concurrency)),
            waiting: AtomicUsize::new(0),
            queue_max,
            latency_ms,
        }
    }

    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue_max {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::busy("too many requests are waiting; retry later"));
        }
        let started = std::time::Instant::now();
        let permit = self.permits.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let permit = permit.map_err(|_| ApiError::busy("the node is stopping"))?;
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            span.in_scope(job)
        })
        .await;
        self.latency_ms
            .record(started.elapsed().as_secs_f64() * 1e3, &[]);
        result.unwrap_or_else(|error| Err(ApiError::internal(format!("request failed: {error}"))))
    }
}

/// What the API and the actors share.
pub struct Shared {
    pub store: Store,
    pub config: Config,
    pub listen: SocketAddr,
    pub started: std::time::Instant,
    pub replay: ReplayPool,
    pub metrics: kairos_telemetry::Metrics,
    pub actor_restarts: AtomicU64,
    /// Commits watched in the background (`--no-wait`): a stopping node lets them finish.
    pub watches: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Requests per party per second (`node.party_requests_per_second`), if limited.
    pub party_limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// The predictor's serving models and histories, per replica.
    pub learner: kairos_ops::learn::Learner,
    snapshotters: RwLock<HashMap<String, ActorRef<SnapshotterMsg>>>,
    statuses: Mutex<HashMap<String, ReplicaStatusJson>>,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    predictor: RwLock<Option<ActorRef<predictor::PredictorMsg>>>,
    /// The store's figures as last computed (see `gc.rs`).
    figures: Mutex<Option<crate::wire::StoreFiguresJson>>,
    /// Counts catalog changes: event streams and the NATS publisher wait on it.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Sandboxes running on this node now (see `node.sandbox_slots`).
    pub sandboxes_running: Arc<std::sync::atomic::AtomicUsize>,
    /// Event streams (`GET /api/events`) open at once, and per party.
    pub event_streams: Arc<Semaphore>,
    pub event_streams_by_party: Arc<Mutex<HashMap<String, usize>>>,
    /// The NATS side as the status endpoint shows it (`None` without NATS).
    pub nats_status: Mutex<Option<crate::wire::NatsStatusJson>>,
    /// When the catalog last changed, and the publisher's latencies from a change to
    /// JetStream's acknowledgement (the newest 1 024, in milliseconds).
    pub last_change: Mutex<Option<std::time::Instant>>,
    pub publish_latencies_ms: Mutex<std::collections::VecDeque<f64>>,
    /// Each webhook as the status endpoint shows it, by name.
    webhook_statuses: Mutex<std::collections::BTreeMap<String, crate::wire::WebhookStatusJson>>,
    /// The node's part in its cluster (set once its log started).
    pub cluster: OnceLock<Arc<cluster::Cluster>>,
}

impl Shared {
    /// Changes the NATS status shown by the status endpoint.
    pub fn with_nats_status(&self, change: impl FnOnce(&mut crate::wire::NatsStatusJson)) {
        let mut status = self.nats_status.lock().unwrap_or_else(|p| p.into_inner());
        change(status.get_or_insert_with(Default::default));
    }

    /// Changes a webhook's status shown by the status endpoint.
    pub fn with_webhook_status(
        &self,
        name: &str,
        change: impl FnOnce(&mut crate::wire::WebhookStatusJson),
    ) {
        let mut statuses = self
            .webhook_statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let status =
            statuses
                .entry(name.to_string())
                .or_insert_with(|| crate::wire::WebhookStatusJson {
                    name: name.to_string(),
                    ..Default::default()
                });
        change(status);
    }

    /// The operations on the node's store, with its configured limits.
    pub fn service(&self) -> kairos_ops::Service<'_> {
        kairos_ops::Service {
            store: &self.store,
            limits: self.config.limits,
            skip: vec![self.config.node.data_dir.clone()],
            learner: &self.learner,
        }
    }

    pub fn snapshotter(&self, replica: &str) -> Option<ActorRef<SnapshotterMsg>> {
        self.snapshotters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(replica)
            .cloned()
    }

    fn register_snapshotter(&self, replica: &str, actor: ActorRef<SnapshotterMsg>) {
        self.snapshotters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(replica.to_string(), actor);
    }

    /// Asks the replica's snapshotter for a capture, without waiting for it.
    pub fn request_capture(&self, replica: &str) {
        if let Some(snapshotter) = self.snapshotter(replica) {
            let _ = snapshotter.cast(SnapshotterMsg::Capture(None, tracing::Span::none()));
        }
    }

    pub fn predictor(&self) -> Option<ActorRef<predictor::PredictorMsg>> {
        self.predictor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn register_predictor(&self, actor: ActorRef<predictor::PredictorMsg>) {
        *self.predictor.write().unwrap_or_else(|p| p.into_inner()) = Some(actor);
    }

    pub fn supervisor(&self) -> Option<ActorRef<SupervisorMsg>> {
        self.supervisor.get().cloned()
    }

    fn with_status(&self, replica: &str, change: impl FnOnce(&mut ReplicaStatusJson)) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let status = statuses
            .entry(replica.to_string())
            .or_insert_with(|| ReplicaStatusJson {
                name: replica.to_string(),
                ..ReplicaStatusJson::default()
            });
        change(status);
    }

    fn set_watching(&self, replica: &str, watching: bool) {
        self.with_status(replica, |status| status.watching = watching);
    }

    fn record_capture(&self, replica: &str, result: &snapshotter::CaptureResult) {
        if let Err(error) = result {
            tracing::warn!(replica = %replica, %error, "capture failed");
        }
        self.with_status(replica, |status| match result {
            Ok(capture) => {
                status.captures += 1;
                status.captures_unchanged += u64::from(!capture.recorded);
                status.last_frame = Some(capture.frame.frame.to_hex());
                status.last_error = None;
            }
            Err(error) => {
                status.capture_failures += 1;
                status.last_error = Some(error.to_string());
            }
        });
    }

    pub fn status(&self) -> Result<StatusJson, ApiError> {
        let mut replicas: Vec<ReplicaStatusJson> = self
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        replicas.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(StatusJson {
            version: env!("CARGO_PKG_VERSION").into(),
            listen: self.listen.to_string(),
            data_dir: self.config.node.data_dir.display().to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            store_bytes: self.store.size_bytes()?,
            actor_restarts: self.actor_restarts.load(Ordering::Relaxed),
            replicas,
            store: self
                .figures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            nats: self
                .nats_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .map(|mut nats| {
                    let mut latencies: Vec<f64> = self
                        .publish_latencies_ms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .copied()
                        .collect();
                    latencies.sort_by(f64::total_cmp);
                    let at = |q: f64| {
                        latencies
                            .get(((latencies.len().saturating_sub(1)) as f64 * q).round() as usize)
                            .copied()
                    };
                    nats.publish_latency_ms_p50 = at(0.5);
                    nats.publish_latency_ms_p99 = at(0.99);
                    nats
                }),
            webhooks: self
                .webhook_statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect(),
        })
    }
}

/// Applies every replica's retention policy each `[retention] interval` (the first time
/// one interval after start). A replica without a policy keeps everything; a forget that
/// fails is logged and tried again at the next interval.
async fn apply_retention(shared: Arc<Shared>) {
    let interval = shared.config.retention.interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let worker = shared.clone();
        let _ = tokio::task::spawn_blocking(move || forget_everywhere(&worker)).await;
    }
}

fn forget_everywhere(shared: &Shared) {
    let replicas = match shared.store.replicas() {
        Ok(replicas) => replicas,
        Err(error) => {
            tracing::warn!(%error, "retention: cannot list the replicas");
            return;
        }
    };
    for replica in replicas {
        let request = kairos_ops::ForgetRequest {
            timeline: None,
            flags: kairos_core::RetentionPolicy::default(),
            default: shared.config.retention.default,
            party: kairos_store::SYSTEM_PARTY,
            dry_run: false,
        };
        match shared.service().forget(&replica.name, &request) {
            Ok(report) if report.entries_removed > 0 => tracing::info!(
                replica = %replica.name,
                entries = report.entries_removed,
                frames = report.frames_removed,
                "retention: frames forgotten"
            ),
            Ok(_)
            | Err(kairos_ops::OpsError::Input(kairos_ops::InputError::NoRetentionPolicy(_))) => {}
            Err(error) => {
                tracing::warn!(replica = %replica.name, %error, "retention: forget failed");
            }
        }
    }
}

/// Starts a node: opens the store, registers the configured replicas, starts the actors
/// and serves the API until `shutdown` completes. `ready` is called with the bound address
/// once the API accepts connections.
pub async fn run(
    config: Config,
    ready: impl FnOnce(&str),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let data_dir = config.node.data_dir.clone();
    let cache_bytes = config.node.store_cache_bytes;
    let backend = config.store.clone();
    let store = tokio::task::spawn_blocking(move || {
        Store::open_configured(&data_dir, &backend, cache_bytes)
    })
    .await
    .map_err(|error| NodeError::Store {
        path: config.node.data_dir.display().to_string(),
        reason: error.to_string(),
    })?
    .map_err(|error| NodeError::Store {
        path: config.node.data_dir.display().to_string(),
        reason: error.to_string(),
    })?;
    let tls = match &config.node.tls {
        Some(files) => {
            Some(serve::tls_config(files).map_err(|error| NodeError::Tls(error.to_string()))?)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .map_err(|error| NodeError::Listen {
            address: config.node.listen,
            reason: error.to_string(),
        })?;
    let listen = listener.local_addr().map_err(|error| NodeError::Listen {
        address: config.node.listen,
        reason: error.to_string(),
    })?;
    let metrics = kairos_telemetry::Metrics::new();
    // The callback lives as long as the global meter provider, past this node: it must
    // not keep the store open (a store closes, making its last writes durable, when its
    // last handle goes).
    let kv = Arc::downgrade(store.kv());
    metrics.observe_store_size(move || kv.upgrade()?.size_bytes().ok());
    let config_party_rate = config.node.party_requests_per_second;
    let retrain = kairos_predict::RetrainPolicy {
        outcomes_min: config.predictor.retrain_outcomes_min,
        new_outcomes_min: config.predictor.retrain_new_outcomes_min,
        new_outcomes_share_min: config.predictor.retrain_new_outcomes_share,
    };
    let shared = Arc::new(Shared {
        store,
        replay: ReplayPool::new(
            config.node.replay_concurrency_max,
            config.node.replay_queue_max,
            metrics.replay_latency_ms.clone(),
        ),
        metrics,
        config,
        listen,
        started: std::time::Instant::now(),
        actor_restarts: AtomicU64::new(0),
        watches: Mutex::new(Vec::new()),
        party_limiter: std::num::NonZeroU32::new(config_party_rate)
            .map(|rate| governor::RateLimiter::keyed(governor::Quota::per_second(rate))),
        learner: kairos_ops::learn::Learner::with_policy(retrain),
        snapshotters: RwLock::new(HashMap::new()),
        statuses: Mutex::new(HashMap::new()),
        supervisor: OnceLock::new(),
        predictor: RwLock::new(None),
        figures: Mutex::new(None),
        changes: tokio::sync::watch::Sender::new(0),
        sandboxes_running: Arc::default(),
        event_streams: Arc::new(Semaphore::new(events::EVENT_STREAMS_MAX)),
        event_streams_by_party: Arc::default(),
        nats_status: Mutex::new(None),
        last_change: Mutex::new(None),
        publish_latencies_ms: Mutex::new(std::collections::VecDeque::new()),
        webhook_statuses: Mutex::default(),
        cluster: OnceLock::new(),
    });
    let reachable_url = {
        let reachable = if listen.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
        } else {
            listen
        };
        format!("{scheme}://{reachable}")
    };
    let cluster = cluster::start(&shared.store, &shared.config, &reachable_url)
        .await
        .map_err(NodeError::Cluster)?;
    let _ = shared.cluster.set(cluster.clone());
    shared
        .store
        .route_commands(Some(Arc::new(cluster::ThroughLog(cluster.clone()))));
    shared
        .store
        .fetch_missing_from(Some(cluster::object_source(&cluster)));
    if cluster.configured {
        // A member registers its replicas once the cluster has a leader (it may have to
        // be initialized or joined first).
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some(cluster) = shared.cluster.get().cloned() else {
                return;
            };
            while cluster
                .wait_for_leader(std::time::Duration::from_secs(3600))
                .await
                .is_none()
            {}
            let registering = shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for replica in &registering.config.replicas {
                    if let Err(error) = registering.store.put_replica(replica) {
                        tracing::error!(replica = %replica.name, %error, "registering a configured replica");
                    }
                }
                changes::recover_commits(&registering);
            })
            .await;
        });
    } else {
        let registering = shared.clone();
        tokio::task::spawn_blocking(move || {
            for replica in &registering.config.replicas {
                registering
                    .store
                    .put_replica(replica)
                    .map_err(|error| NodeError::Replica {
                        name: replica.name.clone(),
                        reason: error.to_string(),
                    })?;
            }
            Ok::<(), NodeError>(())
        })
        .await
        .map_err(|error| NodeError::Actors(error.to_string()))??;
    }
    {
        let changes = shared.changes.clone();
        let watcher = Arc::downgrade(&shared);
        shared.store.on_change(Arc::new(move || {
            if let Some(shared) = watcher.upgrade() {
                *shared.last_change.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::time::Instant::now());
            }
            changes.send_modify(|count| *count = count.wrapping_add(1));
        }));
    }
    let mut nats_tasks = match shared.config.nats.clone() {
        Some(nats) => nats::start(shared.clone(), nats).await,
        None => Vec::new(),
    };
    // Webhooks read the feed as the publisher does, each after its own cursor.
    nats_tasks.extend(webhook::start(&shared));
    {
        // The status endpoint shows the store's figures from the start; computing them
        // surveys the store, off the serving path.
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || shared.refresh_figures());
    }
    if !cluster.configured {
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || changes::recover_commits(&shared)).await;
    }
    let (supervisor, supervisor_done) =
        Actor::spawn(Some("supervisor".into()), SupervisorActor, shared.clone())
            .await
            .map_err(|error| NodeError::Actors(error.to_string()))?;
    let _ = shared.supervisor.set(supervisor.clone());
    let retention = tokio::spawn(apply_retention(shared.clone()));
    if cluster.configured {
        nats_tasks.push(tokio::spawn(cluster::place_replicas(shared.clone())));
        nats_tasks.push(tokio::spawn(cluster::reconcile_on_change(shared.clone())));
        nats_tasks.push(tokio::spawn(cluster::replicate_objects(shared.clone())));
    }
    let app = cluster::peer_router(shared.clone()).merge(api::router(shared.clone()));
    let marker = shared.config.node.data_dir.join(NODE_MARKER_FILE);
    let reachable = if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let announced =
        serde_json::json!({ "url": format!("{scheme}://{reachable}"), "pid": std::process::id() });
    if let Err(error) = std::fs::write(&marker, announced.to_string()) {
        tracing::warn!(path = %marker.display(), %error, "cannot announce the node in its data directory");
    }
    ready(&format!("{scheme}://{listen}"));
    let limits = serve::ServeLimits {
        connections_max: serve::connections_that_fit(shared.config.node.connections_max),
        header_read_timeout: shared.config.node.header_read_timeout,
        tls,
    };
    let served = serve::serve(listener, app, limits, shutdown).await;
    retention.abort();
    for task in nats_tasks {
        task.abort();
    }
    // Commits in their watch window finish (committed or rolled back) before the
    // snapshotters they capture through stop; a restart would otherwise roll them back.
    let watches: Vec<_> =
        std::mem::take(&mut *shared.watches.lock().unwrap_or_else(|p| p.into_inner()));
    if !watches.is_empty() {
        tracing::info!(
            commits = watches.len(),
            "stopping: waiting for commits in their watch window"
        );
        let _ = tokio::task::spawn_blocking(move || {
            for watch in watches {
                let _ = watch.join();
            }
        })
        .await;
    }
    let _ = std::fs::remove_file(&marker);
    // Stop capturing: watchers and snapshotters stop with their supervisor; a capture
    // already running finishes (or is discarded whole) on the blocking pool.
    supervisor.stop(Some("node stopping".into()));
    let _ = supervisor_done.await;
    // The last export carries the figures up to here, the store's size among them, while
    // the store is still open (the size gauge holds it weakly).
    let metrics = shared.metrics.clone();
    let _ = tokio::task::spawn_blocking(move || metrics.flush()).await;
    // The log holds the store (its state machine) and the store the log (its route):
    // both let go, and what the state machine applied is made durable.
    shared.store.route_commands(None);
    shared.store.fetch_missing_from(None);
    let _ = cluster.raft.shutdown().await;
    let _ = shared
        .store
        .kv()
        .commit(kairos_store::kv::WriteBatch::new());
    served.map_err(|error| NodeError::Serve(error.to_string()))
}
