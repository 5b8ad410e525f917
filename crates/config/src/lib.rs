//! Kairos configuration, in layers: built-in defaults, then a TOML file, then `KAIROS_`
//! environment variables (`__` separates levels: `KAIROS_NODE__LISTEN`), then flags. The
//! merged layers are parsed into a raw form (unknown keys are errors naming the key) and
//! validated into an immutable [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kairos_core::replica::CAPTURE_INTERVAL_MS_DEFAULT;
use kairos_core::store_backend::{KEY_PREFIX_DEFAULT, STORE_BACKENDS, check_key_prefix};
use kairos_core::{
    FdbLocation, Limits, ReplicaDefinition, ReplicaError, RetentionPolicy, StoreBackend,
};
use serde::Deserialize;

/// The configuration file used when none is given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config/kairos.toml";
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";
pub const DATA_DIR_DEFAULT: &str = ".kairos";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config {source_name}: key {key}: {reason}")]
    Key {
        source_name: String,
        key: String,
        reason: String,
    },
    #[error("environment variable {name}: {reason}")]
    Environment { name: String, reason: String },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("replica {0:?} is declared twice")]
    DuplicateReplica(String),
}

/// The validated configuration of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    /// The key-value backend of the store (`[store]`).
    pub store: StoreBackend,
    pub telemetry: TelemetryConfig,
    pub predictor: PredictorConfig,
    pub retention: RetentionConfig,
    /// NATS (`[nats]`): `None` when no URL is configured (nothing is published).
    pub nats: Option<NatsConfig>,
    pub limits: Limits,
    pub replicas: Vec<ReplicaDefinition>,
    /// Outgoing webhooks (`[[webhook]]`), each delivered on its own.
    pub webhooks: Vec<WebhookConfig>,
    /// Membership of a cluster (`[cluster]`): `None` makes the node a cluster of one of
    /// its own, formed at start.
    pub cluster: Option<ClusterConfig>,
}

/// How the node takes part in a cluster (`[cluster]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This member's id, unique in the cluster (1 and up).
    pub node_id: u64,
    /// The URL other members and the CLI reach this node's API at (default: the address
    /// it listens on).
    pub advertise: Option<String>,
    /// Other members' API URLs, asked in turn by `kairos cluster join` without an address.
    pub peers: Vec<String>,
    /// On how many members a frame's objects must be for the frame to count as durable.
    pub replication: u32,
    /// The members' shared secret (from `secret_file`, or `$KAIROS_CLUSTER_SECRET`):
    /// every request between members carries it. Without one, members accept requests
    /// from other members only on loopback.
    pub secret: Option<String>,
    /// Heartbeat interval and election timeout (the timeout is drawn between it and one
    /// and a half times it; a follower that heard from a leader also waits out the
    /// leader's lease, the top of that range, before it stands: failover takes between
    /// 2.5 and 3 election timeouts).
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    /// A snapshot of the catalog is taken every this many log entries, and the log
    /// entries it covers are dropped (keeping this many).
    pub snapshot_every: u64,
}

/// The shortest cluster secret accepted.
pub const CLUSTER_SECRET_BYTES_MIN: usize = 16;

/// An outgoing webhook: the events it is told of, POSTed to its URL and signed with its
/// secret, retried with exponential backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Names the webhook in the status and its cursor file (`webhook-<name>.json`).
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// Feed event names (`commit`, `rollback`, `gate`, ...).
    pub events: Vec<String>,
    /// The HMAC-SHA256 key of the `Kairos-Signature` header.
    pub secret: String,
    /// The `secret_env` variable when it was not set (then `secret` is empty): an error
    /// for the node ([`Config::webhook_secrets_set`]), not for other commands.
    pub secret_missing: Option<String>,
    /// Only these replicas' events (all when empty).
    pub replicas: Vec<String>,
    /// Attempts per event before giving up on it (said in the status).
    pub attempts_max: u32,
    /// The wait after a first failed attempt; each next one doubles, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long one attempt may take.
    pub timeout: Duration,
}

impl Config {
    /// Every webhook has its secret: the node checks this before it starts (other
    /// commands deliver no webhooks and need no secret).
    pub fn webhook_secrets_set(&self) -> Result<(), ConfigError> {
        match self
            .webhooks
            .iter()
            .position(|webhook| webhook.secret_missing.is_some())
        {
            Some(index) => Err(ConfigError::Environment {
                name: self.webhooks[index]
                    .secret_missing
                    .clone()
                    .unwrap_or_default(),
                reason: format!(
                    "is not set; webhook {:?} (webhook[{index}].secret_env) signs its deliveries with it",
                    self.webhooks[index].name
                ),
            }),
            None => Ok(()),
        }
    }
}

/// Webhooks a configuration may declare.
pub const WEBHOOKS_MAX: usize = 32;
/// Attempts per event at most.
pub const WEBHOOK_ATTEMPTS_MAX: u32 = 20;
/// The shortest secret accepted (an HMAC key guessed is a signature forged).
pub const WEBHOOK_SECRET_BYTES_MIN: usize = 16;

/// Where and how the node publishes its events and answers requests on NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsConfig {
    /// `nats://HOST:PORT`.
    pub url: String,
    /// The node's own NATS user and password (none: connect without credentials).
    pub user: Option<String>,
    pub password: Option<String>,
    /// First token of every subject (`kairos.<replica>.<timeline>.<event>`,
    /// `kairos.api.<verb>`).
    pub subject_prefix: String,
    /// JetStream streams are named `<stream_prefix>_<replica>`, one per replica.
    pub stream_prefix: String,
    /// How long a stream keeps events.
    pub max_age: Duration,
    /// The window in which JetStream drops a message whose id it has seen.
    pub duplicate_window: Duration,
    /// The node writes the parties' NATS users and permissions here (a nats-server
    /// `authorization` block, for `include`) at start and whenever a party changes...
    pub authorization_file: Option<PathBuf>,
    /// ...and then signals the server whose pid this file holds to reload it.
    pub server_pid_file: Option<PathBuf>,
}

/// The longest a stream may keep events or deduplicate.
const NATS_MAX_AGE_MAX: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest request body the API accepts.
    pub request_body_bytes_max: usize,
    /// Replay requests (show, cat, diff, restore) served at once; more wait in line.
    pub replay_concurrency_max: usize,
    /// Replay requests waiting for a slot before the API answers 503.
    pub replay_queue_max: usize,
    /// Sandboxes this node runs at once before, in a cluster, it hands more to a member
    /// with a free slot (default: the host's cores).
    pub sandbox_slots: usize,
    /// File changes within this window are captured together.
    pub capture_debounce: Duration,
    /// Requests queued for one replica's snapshotter before callers are told to retry.
    pub snapshotter_mailbox_max: usize,
    /// Memory the store may use to cache pages.
    pub store_cache_bytes: usize,
    /// Listening beyond loopback without TLS is refused unless this is set.
    pub insecure_listen: bool,
    /// Host header names the API answers (besides the listen address and loopback names);
    /// others are refused, so a browser page cannot reach it by DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Replica roots registered through the API must be under one of these (empty: any).
    pub allowed_roots: Vec<PathBuf>,
    /// Restores through the API write only below this directory (unset: only an admin, or
    /// anyone on a node without parties, may restore, anywhere the node may write).
    pub restore_root: Option<PathBuf>,
    /// A client must send its request headers within this time.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
    /// Requests a party may make per second (with bursts of as many); 0: no limit.
    pub party_requests_per_second: u32,
    /// PEM certificate chain and private key: the API is served over TLS.
    pub tls: Option<TlsFiles>,
    /// A bearer token that opens `GET /metrics` and nothing else, for a scraper that
    /// should not hold a party's token (a viewer's token also reads every frame).
    pub metrics_token: Option<String>,
}

/// The shortest `node.metrics_token` accepted.
pub const METRICS_TOKEN_CHARS_MIN: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When a node forgets frames, and the policy of replicas that have none of their own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetentionConfig {
    /// How often the node applies the policies.
    pub interval: Duration,
    /// The policy of every replica without its own (`None`: such replicas keep everything).
    pub default: Option<RetentionPolicy>,
}

/// How often a node applies retention policies unless configured.
pub const RETENTION_INTERVAL_DEFAULT: Duration = Duration::from_secs(3_600);
/// The longest retention interval (a longer one would overflow the node's timer).
pub const RETENTION_INTERVAL_MAX: Duration = Duration::from_secs(366 * 24 * 3_600);

/// Retention rules as written in the file (`keep_within` is a duration).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_within: Option<String>,
}

/// `[retention]`: the schedule and the default policy.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    interval: Option<String>,
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_within: Option<String>,
}

/// `[replica.retention]`: a replica's policy and its timelines' own.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReplicaRetention {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_within: Option<String>,
    #[serde(default)]
    timeline: std::collections::BTreeMap<String, RawPolicy>,
}

/// A policy from its raw rules; `None` when no rule is given.
fn policy(
    source_name: &str,
    key: &str,
    raw: RawPolicy,
) -> Result<Option<RetentionPolicy>, ConfigError> {
    let keep_within_ms = match &raw.keep_within {
        Some(text) => Some(
            u64::try_from(duration(source_name, &format!("{key}.keep_within"), text)?.as_millis())
                .unwrap_or(u64::MAX),
        ),
        None => None,
    };
    let policy = RetentionPolicy {
        keep_last: raw.keep_last,
        keep_hourly: raw.keep_hourly,
        keep_daily: raw.keep_daily,
        keep_weekly: raw.keep_weekly,
        keep_within_ms,
    };
    if policy.is_empty() {
        return Ok(None);
    }
    policy.validate().map_err(|error| ConfigError::Key {
        source_name: source_name.to_string(),
        key: key.to_string(),
        reason: error.to_string(),
    })?;
    Ok(Some(policy))
}

/// When the node's predictor actor retrains a replica's model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictorConfig {
    /// Outcomes (with failures and successes among them) before a first model.
    pub retrain_outcomes_min: usize,
    /// New outcomes since the last training that trigger the next one...
    pub retrain_new_outcomes_min: usize,
    /// ...or this share of the outcomes the serving model saw, whichever is larger.
    pub retrain_new_outcomes_share: f64,
}

/// Fewest outcomes a model can be trained on.
pub const PREDICTOR_OUTCOMES_MIN: usize = 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPredictor {
    retrain_outcomes_min: usize,
    retrain_new_outcomes_min: usize,
    retrain_new_outcomes_share: f64,
}

impl Default for RawPredictor {
    fn default() -> RawPredictor {
        RawPredictor {
            retrain_outcomes_min: 200,
            retrain_new_outcomes_min: 50,
            retrain_new_outcomes_share: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint (e.g. http://127.0.0.1:4318); `None`: no export.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Log filter (`info`, `kairos=debug`, ...), as for `RUST_LOG`.
    pub log: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    predictor: RawPredictor,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    nats: RawNats,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    replica: Vec<RawReplica>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    cluster: Option<RawCluster>,
    /// `$KAIROS_CLUSTER_SECRET` (the secret when no `cluster.secret_file` is given).
    #[serde(skip)]
    cluster_secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCluster {
    node_id: u64,
    advertise: String,
    peers: Vec<String>,
    replication: u32,
    secret_file: Option<PathBuf>,
    heartbeat: String,
    election_timeout: String,
    snapshot_every: u64,
}

impl Default for RawCluster {
    fn default() -> RawCluster {
        RawCluster {
            node_id: 1,
            advertise: String::new(),
            peers: Vec::new(),
            replication: 2,
            secret_file: None,
            heartbeat: "100ms".into(),
            election_timeout: "400ms".into(),
            snapshot_every: 5000,
        }
    }
}

fn is_http_url(text: &str) -> bool {
    text.strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
}

fn cluster(
    raw: Option<RawCluster>,
    base_dir: &Path,
    source_name: &str,
    secret_env: Option<String>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let key_error = |key: &str, reason: String| ConfigError::Key {
        source_name: source_name.to_string(),
        key: format!("cluster.{key}"),
        reason,
    };
    if raw.node_id == 0 {
        return Err(key_error("node_id", "node ids start at 1".into()));
    }
    if !raw.advertise.is_empty() && !is_http_url(&raw.advertise) {
        return Err(key_error(
            "advertise",
            format!("{:?} is not an http:// or https:// URL", raw.advertise),
        ));
    }
    if let Some(peer) = raw.peers.iter().find(|peer| !is_http_url(peer)) {
        return Err(key_error(
            "peers",
            format!("{peer:?} is not an http:// or https:// URL"),
        ));
    }
    if raw.replication == 0 || raw.replication > 16 {
        return Err(key_error(
            "replication",
            format!("{} is not between 1 and 16", raw.replication),
        ));
    }
    let heartbeat = duration(source_name, "cluster.heartbeat", &raw.heartbeat)?;
    let election_timeout = duration(
        source_name,
        "cluster.election_timeout",
        &raw.election_timeout,
    )?;
    if heartbeat < Duration::from_millis(10) || heartbeat > Duration::from_secs(10) {
        return Err(key_error(
            "heartbeat",
            format!("{heartbeat:?} is not between 10ms and 10s"),
        ));
    }
    if election_timeout < heartbeat * 3 || election_timeout > Duration::from_secs(60) {
        return Err(key_error(
            "election_timeout",
            format!("{election_timeout:?} is not between 3 heartbeats and 60s"),
        ));
    }
    let secret = match (&raw.secret_file, secret_env) {
        (Some(path), _) => {
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path).map_err(|error| {
                key_error("secret_file", format!("{}: {error}", path.display()))
            })?;
            Some(text.trim().to_string())
        }
        (None, Some(secret)) => Some(secret.trim().to_string()),
        (None, None) => None,
    };
    if let Some(secret) = &secret
        && (secret.len() < CLUSTER_SECRET_BYTES_MIN
            || !secret.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(key_error(
            "secret_file",
            format!(
                "the secret must be at least {CLUSTER_SECRET_BYTES_MIN} printable characters without spaces"
            ),
        ));
    }
    if !(10..=10_000_000).contains(&raw.snapshot_every) {
        return Err(key_error(
            "snapshot_every",
            format!(
                "{} is not between 10 and 10000000 entries",
                raw.snapshot_every
            ),
        ));
    }
    Ok(Some(ClusterConfig {
        snapshot_every: raw.snapshot_every,
        node_id: raw.node_id,
        advertise: Some(raw.advertise).filter(|advertise| !advertise.is_empty()),
        peers: raw.peers,
        replication: raw.replication,
        secret,
        heartbeat,
        election_timeout,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: String,
    url: String,
    events: Vec<String>,
    #[serde(default)]
    secret: Option<String>,
    /// A `KAIROS_` environment variable holding the secret (kept out of the file).
    #[serde(default)]
    secret_env: Option<String>,
    /// The `secret_env` variable, when it is not set.
    #[serde(skip)]
    secret_missing: Option<String>,
    #[serde(default)]
    replicas: Vec<String>,
    #[serde(default)]
    attempts_max: Option<u32>,
    #[serde(default)]
    backoff_initial: Option<String>,
    #[serde(default)]
    backoff_max: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNode {
    listen: String,
    data_dir: PathBuf,
    request_body_bytes_max: usize,
    replay_concurrency_max: usize,
    replay_queue_max: usize,
    sandbox_slots: Option<usize>,
    capture_debounce: String,
    snapshotter_mailbox_max: usize,
    store_cache_bytes: usize,
    insecure_listen: bool,
    allowed_hosts: Vec<String>,
    allowed_roots: Vec<PathBuf>,
    restore_root: Option<PathBuf>,
    header_read_timeout: String,
    connections_max: usize,
    party_requests_per_second: u32,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    metrics_token: Option<String>,
}

impl Default for RawNode {
    fn default() -> RawNode {
        RawNode {
            listen: LISTEN_DEFAULT.into(),
            data_dir: DATA_DIR_DEFAULT.into(),
            request_body_bytes_max: 1 << 20,
            replay_concurrency_max: 64,
            replay_queue_max: 1024,
            sandbox_slots: None,
            capture_debounce: "200ms".into(),
            snapshotter_mailbox_max: 64,
            store_cache_bytes: 64 << 20,
            insecure_listen: false,
            allowed_hosts: Vec::new(),
            allowed_roots: Vec::new(),
            restore_root: None,
            header_read_timeout: "10s".into(),
            connections_max: 16384,
            party_requests_per_second: 200,
            tls_cert: None,
            tls_key: None,
            metrics_token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNats {
    url: String,
    user: String,
    password: String,
    subject_prefix: String,
    stream_prefix: String,
    max_age: String,
    duplicate_window: String,
    authorization_file: Option<PathBuf>,
    server_pid_file: Option<PathBuf>,
}

impl Default for RawNats {
    fn default() -> RawNats {
        RawNats {
            url: String::new(),
            user: String::new(),
            password: String::new(),
            subject_prefix: "kairos".into(),
            stream_prefix: "KAIROS".into(),
            max_age: "7d".into(),
            duplicate_window: "10m".into(),
            authorization_file: None,
            server_pid_file: None,
        }
    }
}

/// Whether `token` can be one token of a NATS subject or part of a stream name.
fn is_plain_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn nats(
    raw: RawNats,
    base_dir: &Path,
    source_name: &str,
) -> Result<Option<NatsConfig>, ConfigError> {
    let key_error = |key: &str, reason: String| ConfigError::Key {
        source_name: source_name.to_string(),
        key: format!("nats.{key}"),
        reason,
    };
    if raw.url.is_empty() {
        return Ok(None);
    }
    let address = raw
        .url
        .strip_prefix("nats://")
        .ok_or_else(|| key_error("url", format!("{:?} is not a nats:// URL", raw.url)))?;
    let well_formed = address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(['@', '/', ' ', ',', '?', '#'])
            && port.parse::<u16>().is_ok_and(|port| port > 0)
    });
    if !well_formed {
        return Err(key_error(
            "url",
            format!(
                "{:?} must be nats://HOST:PORT with a port from 1 to 65535 (one server; credentials go in nats.user and nats.password)",
                raw.url
            ),
        ));
    }
    for (key, value) in [
        ("subject_prefix", &raw.subject_prefix),
        ("stream_prefix", &raw.stream_prefix),
    ] {
        if !is_plain_token(value) || !value.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(key_error(
                key,
                format!(
                    "{value:?} must be 1 to 64 letters, digits, - or _, starting with a letter (subjects starting with _ or $ are NATS's own)"
                ),
            ));
        }
    }
    if raw.user.is_empty() != raw.password.is_empty() {
        return Err(key_error(
            if raw.user.is_empty() {
                "user"
            } else {
                "password"
            },
            "nats.user and nats.password go together".into(),
        ));
    }
    if raw
        .user
        .contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
    {
        return Err(key_error(
            "user",
            format!("{:?} has a space, quote or backslash", raw.user),
        ));
    }
    let max_age = duration(source_name, "nats.max_age", &raw.max_age)?;
    let duplicate_window = duration(source_name, "nats.duplicate_window", &raw.duplicate_window)?;
    if max_age < Duration::from_secs(60) || max_age > NATS_MAX_AGE_MAX {
        return Err(key_error(
            "max_age",
            format!("{max_age:?} is not between 1m and 10 years"),
        ));
    }
    if duplicate_window < Duration::from_secs(1) || duplicate_window > max_age {
        return Err(key_error(
            "duplicate_window",
            format!("{duplicate_window:?} is not between 1s and nats.max_age"),
        ));
    }
    let resolve = |path: Option<PathBuf>| path.map(|path| base_dir.join(path));
    Ok(Some(NatsConfig {
        url: raw.url,
        user: Some(raw.user).filter(|user| !user.is_empty()),
        password: Some(raw.password).filter(|password| !password.is_empty()),
        subject_prefix: raw.subject_prefix,
        stream_prefix: raw.stream_prefix,
        max_age,
        duplicate_window,
        authorization_file: resolve(raw.authorization_file),
        server_pid_file: resolve(raw.server_pid_file),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    backend: String,
    cluster_file: Option<PathBuf>,
    key_prefix: Option<String>,
}

impl Default for RawStore {
    fn default() -> RawStore {
        RawStore {
            backend: STORE_BACKENDS[0].into(),
            cluster_file: None,
            key_prefix: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    otlp_endpoint: String,
    service_name: String,
    log: String,
}

impl Default for RawTelemetry {
    fn default() -> RawTelemetry {
        RawTelemetry {
            otlp_endpoint: String::new(),
            service_name: "kairos".into(),
            log: "info,openraft=warn".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    name: String,
    root: PathBuf,
    #[serde(default)]
    processes: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    capture_interval: Option<String>,
    #[serde(default)]
    check: Option<String>,
    #[serde(default)]
    check_timeout: Option<String>,
    #[serde(default)]
    after_commit: Option<String>,
    #[serde(default)]
    watch_window: Option<String>,
    #[serde(default)]
    probe_interval: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    actions: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    probe: Vec<kairos_core::Probe>,
    #[serde(default)]
    retention: Option<RawReplicaRetention>,
    #[serde(default)]
    policy: Option<RawReplicaPolicy>,
}

/// `[replica.policy]`: what a proposal needs before a commit, and `[replica.policy.
/// timeline.NAME]`: a timeline's own policy, in place of the replica's.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReplicaPolicy {
    required_approvals: Option<i64>,
    reviewers_from: Option<Vec<String>>,
    authors_cannot_approve: Option<bool>,
    require_prediction_below: Option<f64>,
    #[serde(default)]
    timeline: BTreeMap<String, RawReviewPolicy>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReviewPolicy {
    required_approvals: Option<i64>,
    reviewers_from: Option<Vec<String>>,
    authors_cannot_approve: Option<bool>,
    require_prediction_below: Option<f64>,
}

/// A review policy from its raw form, every value checked and named by its key.
fn review_policy(
    source_name: &str,
    key: &str,
    raw: RawReviewPolicy,
) -> Result<kairos_core::ReviewPolicy, ConfigError> {
    use kairos_core::review::{REQUIRED_APPROVALS_MAX, ReviewPolicyError};
    let key_error = |field: &str, reason: String| ConfigError::Key {
        source_name: source_name.to_string(),
        key: format!("{key}.{field}"),
        reason,
    };
    let required_approvals = match raw.required_approvals {
        None => 0,
        Some(value) => u32::try_from(value)
            .ok()
            .filter(|value| *value <= REQUIRED_APPROVALS_MAX)
            .ok_or_else(|| {
                key_error(
                    "required_approvals",
                    format!("{value} is not between 0 and {REQUIRED_APPROVALS_MAX}"),
                )
            })?,
    };
    let policy = kairos_core::ReviewPolicy {
        required_approvals,
        reviewers_from: raw.reviewers_from.unwrap_or_default(),
        authors_cannot_approve: raw.authors_cannot_approve.unwrap_or(false),
        require_prediction_below: raw.require_prediction_below,
    };
    policy.validate().map_err(|error| {
        let field = match &error {
            ReviewPolicyError::TooManyApprovals(_) | ReviewPolicyError::Unreachable { .. } => {
                "required_approvals"
            }
            ReviewPolicyError::TooManyReviewers
            | ReviewPolicyError::BadReviewer(_)
            | ReviewPolicyError::DuplicateReviewer(_) => "reviewers_from",
            ReviewPolicyError::PredictionBound(_) => "require_prediction_below",
        };
        key_error(field, error.to_string())
    })?;
    Ok(policy)
}

/// Values given on the command line; they override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// Environment variables that are shorthands for keys.
const ALIASES: [(&str, &str); 2] = [
    ("KAIROS_DATA_DIR", "node.data_dir"),
    ("KAIROS_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// Loads the configuration: `file` (or [`DEFAULT_CONFIG_FILE`] if it exists), then the
/// `KAIROS_` variables among `environment`, then `flags`.
pub fn load(
    file: Option<&Path>,
    environment: impl IntoIterator<Item = (String, String)>,
    flags: &Flags,
) -> Result<Config, ConfigError> {
    let (mut table, base_dir, source_name) = match file {
        Some(path) => (
            read_file(path)?,
            parent_dir(path),
            path.display().to_string(),
        ),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
            let path = Path::new(DEFAULT_CONFIG_FILE);
            (
                read_file(path)?,
                parent_dir(path),
                path.display().to_string(),
            )
        }
        None => (
            toml::Table::new(),
            PathBuf::from("."),
            "defaults".to_string(),
        ),
    };
    let environment: BTreeMap<String, String> = environment
        .into_iter()
        .filter(|(name, _)| name.starts_with("KAIROS_"))
        .collect();
    for (name, value) in &environment {
        let key = match ALIASES.iter().find(|(alias, _)| alias == name) {
            Some((_, key)) => key.to_string(),
            None => match name.strip_prefix("KAIROS_") {
                Some(rest) if rest.contains("__") => rest.to_ascii_lowercase().replace("__", "."),
                // Other KAIROS_ variables (KAIROS_NODE, ...) belong to the command line.
                _ => continue,
            },
        };
        set(&mut table, &key, env_value(value)).map_err(|reason| ConfigError::Environment {
            name: name.clone(),
            reason,
        })?;
    }
    if let Some(listen) = &flags.listen {
        set(
            &mut table,
            "node.listen",
            toml::Value::String(listen.clone()),
        )
        .map_err(|reason| flag_error("--listen", reason))?;
    }
    if let Some(data_dir) = &flags.data_dir {
        set(
            &mut table,
            "node.data_dir",
            toml::Value::String(data_dir.display().to_string()),
        )
        .map_err(|reason| flag_error("--data-dir", reason))?;
    }
    let mut raw: RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
            ConfigError::Key {
                source_name: source_name.clone(),
                key: error.path().to_string(),
                reason: error.inner().to_string(),
            }
        })?;
    webhook_secrets(&mut raw.webhook, &environment, &source_name)?;
    raw.cluster_secret_env = environment.get("KAIROS_CLUSTER_SECRET").cloned();
    validate(raw, &base_dir, &source_name)
}

/// Each webhook's `secret_env` replaced by the variable's value (`KAIROS_` variables only,
/// as every other layer of the configuration).
fn webhook_secrets(
    webhooks: &mut [RawWebhook],
    environment: &BTreeMap<String, String>,
    source_name: &str,
) -> Result<(), ConfigError> {
    for (index, webhook) in webhooks.iter_mut().enumerate() {
        let key_error = |reason: String| ConfigError::Key {
            source_name: source_name.to_string(),
            key: format!("webhook[{index}].secret_env"),
            reason,
        };
        let Some(name) = webhook.secret_env.take() else {
            continue;
        };
        if webhook.secret.is_some() {
            return Err(key_error("give secret or secret_env, not both".to_string()));
        }
        if !name.starts_with("KAIROS_") {
            return Err(key_error(format!(
                "{name:?} must be a KAIROS_ environment variable"
            )));
        }
        // A variable not set is an error only for the node (`Config::webhook_secrets_set`):
        // other commands never deliver webhooks.
        webhook.secret = environment.get(&name).cloned();
        webhook.secret_missing = webhook.secret.is_none().then_some(name);
    }
    Ok(())
}

/// `[[webhook]]`: names unique, URLs http(s), events known, a secret long enough, limits
/// bounded.
fn webhooks(raw: Vec<RawWebhook>, source_name: &str) -> Result<Vec<WebhookConfig>, ConfigError> {
    if raw.len() > WEBHOOKS_MAX {
        return Err(ConfigError::Key {
            source_name: source_name.to_string(),
            key: "webhook".into(),
            reason: format!("{} webhooks; at most {WEBHOOKS_MAX}", raw.len()),
        });
    }
    let mut webhooks: Vec<WebhookConfig> = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let key_error = |key: &str, reason: String| ConfigError::Key {
            source_name: source_name.to_string(),
            key: format!("webhook[{index}].{key}"),
            reason,
        };
        if !is_plain_token(&raw.name) {
            return Err(key_error(
                "name",
                format!("{:?} must be 1 to 64 letters, digits, - or _", raw.name),
            ));
        }
        if webhooks.iter().any(|w| w.name == raw.name) {
            return Err(key_error(
                "name",
                format!("{:?} names two webhooks", raw.name),
            ));
        }
        let host = raw
            .url
            .strip_prefix("http://")
            .or_else(|| raw.url.strip_prefix("https://"))
            .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
        if host.is_none_or(|host| host.is_empty() || host.contains(['@', ' '])) {
            return Err(key_error(
                "url",
                format!(
                    "{:?} is not an http:// or https:// URL with a host (no credentials in it)",
                    raw.url
                ),
            ));
        }
        if raw.events.is_empty() {
            return Err(key_error(
                "events",
                format!(
                    "names no event: use some of {}",
                    kairos_core::event::EVENT_NAMES.join(", ")
                ),
            ));
        }
        if let Some(unknown) = raw
            .events
            .iter()
            .find(|event| !kairos_core::event::is_event_name(event))
        {
            return Err(key_error(
                "events",
                format!(
                    "{unknown:?} is not an event: use {}",
                    kairos_core::event::EVENT_NAMES.join(", ")
                ),
            ));
        }
        let secret = raw.secret.unwrap_or_default();
        if raw.secret_missing.is_none() && secret.len() < WEBHOOK_SECRET_BYTES_MIN {
            return Err(key_error(
                "secret",
                format!(
                    "a webhook needs a secret (or secret_env) of at least {WEBHOOK_SECRET_BYTES_MIN} bytes to sign its deliveries"
                ),
            ));
        }
        if let Some(bad) = raw
            .replicas
            .iter()
            .find(|name| !kairos_core::replica::is_valid_replica_name(name))
        {
            return Err(key_error(
                "replicas",
                format!("{bad:?} is not a replica name"),
            ));
        }
        let attempts_max = raw.attempts_max.unwrap_or(5);
        if !(1..=WEBHOOK_ATTEMPTS_MAX).contains(&attempts_max) {
            return Err(key_error(
                "attempts_max",
                format!("{attempts_max} is not between 1 and {WEBHOOK_ATTEMPTS_MAX}"),
            ));
        }
        let mut times = [Duration::ZERO; 3];
        for ((key, text, default, range), time) in [
            (
                "backoff_initial",
                &raw.backoff_initial,
                "500ms",
                Duration::from_millis(10)..=Duration::from_secs(3600),
            ),
            (
                "backoff_max",
                &raw.backoff_max,
                "1m",
                Duration::from_millis(10)..=Duration::from_secs(24 * 3600),
            ),
            (
                "timeout",
                &raw.timeout,
                "10s",
                Duration::from_millis(100)..=Duration::from_secs(600),
            ),
        ]
        .into_iter()
        .zip(&mut times)
        {
            let value = duration(
                source_name,
                &format!("webhook[{index}].{key}"),
                text.as_deref().unwrap_or(default),
            )?;
            if !range.contains(&value) {
                return Err(key_error(
                    key,
                    format!(
                        "{value:?} is not between {:?} and {:?}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
            *time = value;
        }
        let [backoff_initial, backoff_max, timeout] = times;
        if backoff_max < backoff_initial {
            return Err(key_error(
                "backoff_max",
                format!("{backoff_max:?} is below backoff_initial {backoff_initial:?}"),
            ));
        }
        webhooks.push(WebhookConfig {
            name: raw.name,
            url: raw.url,
            events: raw.events,
            secret,
            secret_missing: raw.secret_missing,
            replicas: raw.replicas,
            attempts_max,
            backoff_initial,
            backoff_max,
            timeout,
        });
    }
    Ok(webhooks)
}

fn flag_error(flag: &str, reason: String) -> ConfigError {
    ConfigError::Key {
        source_name: "command line".into(),
        key: flag.into(),
        reason,
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    text.parse::<toml::Table>()
        .map_err(|error| ConfigError::File {
            path: path.to_path_buf(),
            reason: error.to_string().replace('\n', " "),
        })
}

/// A variable's value as TOML when it parses as a number, boolean or array; else a string.
fn env_value(text: &str) -> toml::Value {
    match format!("value = {text}").parse::<toml::Table>() {
        Ok(mut table) => match table.remove("value") {
            Some(
                value @ (toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Array(_)),
            ) => value,
            _ => toml::Value::String(text.to_string()),
        },
        Err(_) => toml::Value::String(text.to_string()),
    }
}

fn set(table: &mut toml::Table, dotted: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().ok_or("empty key")?;
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("{part} is not a table")),
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

fn duration(source_name: &str, key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|error| ConfigError::Key {
        source_name: source_name.to_string(),
        key: key.to_string(),
        reason: format!("{text:?} is not a duration (for example 5s or 1m): {error}"),
    })
}

fn validate(raw: RawConfig, base_dir: &Path, source_name: &str) -> Result<Config, ConfigError> {
    let key_error = |key: &str, reason: String| ConfigError::Key {
        source_name: source_name.to_string(),
        key: key.to_string(),
        reason,
    };
    let listen: SocketAddr = raw.node.listen.parse().map_err(|_| {
        key_error(
            "node.listen",
            format!(
                "{:?} is not an address such as 127.0.0.1:7700",
                raw.node.listen
            ),
        )
    })?;
    for (key, value) in [
        (
            "node.request_body_bytes_max",
            raw.node.request_body_bytes_max,
        ),
        (
            "node.replay_concurrency_max",
            raw.node.replay_concurrency_max,
        ),
        ("node.replay_queue_max", raw.node.replay_queue_max),
        ("node.sandbox_slots", raw.node.sandbox_slots.unwrap_or(1)),
        (
            "node.snapshotter_mailbox_max",
            raw.node.snapshotter_mailbox_max,
        ),
        ("node.store_cache_bytes", raw.node.store_cache_bytes),
        ("node.connections_max", raw.node.connections_max),
    ] {
        if value == 0 {
            return Err(key_error(key, "must be at least 1".into()));
        }
    }
    let sandbox_slots = raw.node.sandbox_slots.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let capture_debounce = duration(
        source_name,
        "node.capture_debounce",
        &raw.node.capture_debounce,
    )?;
    let header_read_timeout = duration(
        source_name,
        "node.header_read_timeout",
        &raw.node.header_read_timeout,
    )?;
    let tls = match (&raw.node.tls_cert, &raw.node.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: if cert.is_absolute() {
                cert.clone()
            } else {
                base_dir.join(cert)
            },
            key: if key.is_absolute() {
                key.clone()
            } else {
                base_dir.join(key)
            },
        }),
        (Some(_), None) => {
            return Err(key_error(
                "node.tls_key",
                "is needed with node.tls_cert".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(key_error(
                "node.tls_cert",
                "is needed with node.tls_key".into(),
            ));
        }
    };
    if !listen.ip().is_loopback() && !raw.node.insecure_listen && tls.is_none() {
        return Err(key_error(
            "node.listen",
            format!(
                "{listen} is reachable beyond this host without TLS: set node.tls_cert and node.tls_key, or node.insecure_listen = true (behind a TLS proxy), or listen on 127.0.0.1"
            ),
        ));
    }
    let metrics_token = raw.node.metrics_token.filter(|token| !token.is_empty());
    if let Some(token) = &metrics_token
        && (token.chars().count() < METRICS_TOKEN_CHARS_MIN
            || !token.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(key_error(
            "node.metrics_token",
            format!(
                "must be at least {METRICS_TOKEN_CHARS_MIN} printable ASCII characters without spaces (it is sent as `Authorization: Bearer TOKEN`)"
            ),
        ));
    }
    for (index, root) in raw.node.allowed_roots.iter().enumerate() {
        if !root.is_absolute() {
            return Err(key_error(
                &format!("node.allowed_roots[{index}]"),
                format!("{} is not an absolute path", root.display()),
            ));
        }
    }
    if let Some(root) = raw.node.restore_root.as_ref().filter(|r| !r.is_absolute()) {
        return Err(key_error(
            "node.restore_root",
            format!("{} is not an absolute path", root.display()),
        ));
    }
    let store = validate_store(raw.store, base_dir, source_name)?;
    let mut replicas: Vec<ReplicaDefinition> = Vec::new();
    for (index, replica) in raw.replica.into_iter().enumerate() {
        let interval = match &replica.capture_interval {
            Some(text) => duration(
                source_name,
                &format!("replica[{index}].capture_interval"),
                text,
            )?,
            None => Duration::from_millis(CAPTURE_INTERVAL_MS_DEFAULT),
        };
        let root = if replica.root.is_absolute() {
            replica.root
        } else {
            base_dir.join(&replica.root)
        };
        let root = root
            .canonicalize()
            .or_else(|_| std::path::absolute(&root))
            .unwrap_or(root);
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let mut definition = ReplicaDefinition::new(&replica.name, root);
        definition.processes = replica.processes;
        definition.exclude = replica.exclude;
        definition.capture_interval_ms = millis(interval);
        definition.check = replica.check;
        definition.after_commit = replica.after_commit;
        definition.host = replica.host;
        definition.actions = replica.actions;
        definition.probes = replica.probe;
        if let Some(retention) = replica.retention {
            let key = format!("replica[{index}].retention");
            definition.retention = policy(
                source_name,
                &key,
                RawPolicy {
                    keep_last: retention.keep_last,
                    keep_hourly: retention.keep_hourly,
                    keep_daily: retention.keep_daily,
                    keep_weekly: retention.keep_weekly,
                    keep_within: retention.keep_within,
                },
            )?;
            for (timeline, raw) in retention.timeline {
                let key = format!("{key}.timeline.{timeline}");
                if !kairos_core::spec::is_valid_timeline_name(&timeline) {
                    return Err(key_error(
                        &key,
                        format!("{timeline:?} is not a timeline name"),
                    ));
                }
                match policy(source_name, &key, raw)? {
                    Some(policy) => {
                        definition.timeline_retention.insert(timeline, policy);
                    }
                    None => {
                        return Err(key_error(&key, "gives no rule".into()));
                    }
                }
            }
        }
        if let Some(raw) = replica.policy {
            let key = format!("replica[{index}].policy");
            let replica_policy = RawReviewPolicy {
                required_approvals: raw.required_approvals,
                reviewers_from: raw.reviewers_from,
                authors_cannot_approve: raw.authors_cannot_approve,
                require_prediction_below: raw.require_prediction_below,
            };
            definition.review_policy = Some(review_policy(source_name, &key, replica_policy)?);
            for (timeline, raw) in raw.timeline {
                let key = format!("{key}.timeline.{timeline}");
                if !kairos_core::spec::is_valid_timeline_name(&timeline) {
                    return Err(key_error(
                        &key,
                        format!("{timeline:?} is not a timeline name"),
                    ));
                }
                let policy = review_policy(source_name, &key, raw)?;
                definition.timeline_review_policy.insert(timeline, policy);
            }
        }
        for (field, text, target) in [
            (
                "check_timeout",
                &replica.check_timeout,
                &mut definition.check_timeout_ms,
            ),
            (
                "watch_window",
                &replica.watch_window,
                &mut definition.watch_window_ms,
            ),
            (
                "probe_interval",
                &replica.probe_interval,
                &mut definition.probe_interval_ms,
            ),
        ] {
            if let Some(text) = text {
                *target = millis(duration(
                    source_name,
                    &format!("replica[{index}].{field}"),
                    text,
                )?);
            }
        }
        definition.validate()?;
        if replicas.iter().any(|r| r.name == definition.name) {
            return Err(ConfigError::DuplicateReplica(definition.name));
        }
        replicas.push(definition);
    }
    let otlp_endpoint =
        Some(raw.telemetry.otlp_endpoint.trim().to_string()).filter(|e| !e.is_empty());
    if let Some(endpoint) = otlp_endpoint
        .as_ref()
        .filter(|e| !(e.starts_with("http://") || e.starts_with("https://")))
    {
        return Err(key_error(
            "telemetry.otlp_endpoint",
            format!("{endpoint:?} is not an http:// or https:// URL"),
        ));
    }
    if raw.predictor.retrain_outcomes_min < PREDICTOR_OUTCOMES_MIN {
        return Err(key_error(
            "predictor.retrain_outcomes_min",
            format!(
                "{} is below {PREDICTOR_OUTCOMES_MIN}, the fewest outcomes a model trains on",
                raw.predictor.retrain_outcomes_min
            ),
        ));
    }
    if raw.predictor.retrain_new_outcomes_min == 0 {
        return Err(key_error(
            "predictor.retrain_new_outcomes_min",
            "must be at least 1".to_string(),
        ));
    }
    let share = raw.predictor.retrain_new_outcomes_share;
    if !(0.0..=10.0).contains(&share) {
        return Err(key_error(
            "predictor.retrain_new_outcomes_share",
            format!("{share} is not between 0 and 10"),
        ));
    }
    let retention = RetentionConfig {
        interval: match &raw.retention.interval {
            Some(text) => duration(source_name, "retention.interval", text)?,
            None => RETENTION_INTERVAL_DEFAULT,
        },
        default: policy(
            source_name,
            "retention",
            RawPolicy {
                keep_last: raw.retention.keep_last,
                keep_hourly: raw.retention.keep_hourly,
                keep_daily: raw.retention.keep_daily,
                keep_weekly: raw.retention.keep_weekly,
                keep_within: raw.retention.keep_within.clone(),
            },
        )?,
    };
    if retention.interval < Duration::from_secs(1) {
        return Err(key_error(
            "retention.interval",
            format!("{:?} is shorter than 1s", retention.interval),
        ));
    }
    if retention.interval > RETENTION_INTERVAL_MAX {
        return Err(key_error(
            "retention.interval",
            format!("{:?} is longer than 366 days", retention.interval),
        ));
    }
    let nats = nats(raw.nats, base_dir, source_name)?;
    let webhooks = webhooks(raw.webhook, source_name)?;
    let cluster = cluster(raw.cluster, base_dir, source_name, raw.cluster_secret_env)?;
    Ok(Config {
        cluster,
        webhooks,
        store,
        retention,
        nats,
        predictor: PredictorConfig {
            retrain_outcomes_min: raw.predictor.retrain_outcomes_min,
            retrain_new_outcomes_min: raw.predictor.retrain_new_outcomes_min,
            retrain_new_outcomes_share: share,
        },
        node: NodeConfig {
            listen,
            data_dir: raw.node.data_dir,
            request_body_bytes_max: raw.node.request_body_bytes_max,
            replay_concurrency_max: raw.node.replay_concurrency_max,
            replay_queue_max: raw.node.replay_queue_max,
            sandbox_slots,
            capture_debounce,
            snapshotter_mailbox_max: raw.node.snapshotter_mailbox_max,
            store_cache_bytes: raw.node.store_cache_bytes,
            insecure_listen: raw.node.insecure_listen,
            allowed_hosts: raw.node.allowed_hosts,
            allowed_roots: raw.node.allowed_roots,
            restore_root: raw.node.restore_root,
            header_read_timeout,
            connections_max: raw.node.connections_max,
            party_requests_per_second: raw.node.party_requests_per_second,
            tls,
            metrics_token,
        },
        telemetry: TelemetryConfig {
            otlp_endpoint,
            service_name: raw.telemetry.service_name,
            log: raw.telemetry.log,
        },
        limits: raw.limits,
        replicas,
    })
}

/// `[store]`: the backend by name; the FoundationDB keys only with that backend.
fn validate_store(
    raw: RawStore,
    base_dir: &Path,
    source_name: &str,
) -> Result<StoreBackend, ConfigError> {
    let key_error = |key: &str, reason: String| ConfigError::Key {
        source_name: source_name.to_string(),
        key: key.to_string(),
        reason,
    };
    match raw.backend.as_str() {
        "redb" => {
            for (key, given) in [
                ("store.cluster_file", raw.cluster_file.is_some()),
                ("store.key_prefix", raw.key_prefix.is_some()),
            ] {
                if given {
                    return Err(key_error(
                        key,
                        "is a FoundationDB setting: set store.backend = \"foundationdb\" or remove it"
                            .into(),
                    ));
                }
            }
            Ok(StoreBackend::Redb)
        }
        "foundationdb" => {
            let cluster_file = match raw.cluster_file {
                Some(path) if path.as_os_str().is_empty() => None,
                Some(path) => {
                    let path = if path.is_absolute() {
                        path
                    } else {
                        base_dir.join(path)
                    };
                    if !path.is_file() {
                        return Err(key_error(
                            "store.cluster_file",
                            format!("{} is not a file", path.display()),
                        ));
                    }
                    Some(path)
                }
                None => None,
            };
            let key_prefix = raw
                .key_prefix
                .unwrap_or_else(|| KEY_PREFIX_DEFAULT.to_string());
            check_key_prefix(&key_prefix)
                .map_err(|reason| key_error("store.key_prefix", reason))?;
            Ok(StoreBackend::FoundationDb(FdbLocation {
                cluster_file,
                key_prefix,
            }))
        }
        other => Err(key_error(
            "store.backend",
            format!(
                "{other:?} is not a store backend: choose {}",
                STORE_BACKENDS
                    .iter()
                    .map(|name| format!("{name:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kairos.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let (dir, path) = write(
            "[node]\nlisten = \"127.0.0.1:7000\"\n[[replica]]\nname = \"web\"\nroot = \"srv\"\nprocesses = [\"nginx\"]\ncapture_interval = \"2s\"\n",
        );
        let config = load(Some(&path), env(&[]), &Flags::default()).unwrap();
        assert_eq!(config.node.listen.port(), 7000);
        assert_eq!(config.replicas[0].root, dir.path().join("srv"));
        assert_eq!(config.replicas[0].capture_interval_ms, 2000);

        let config = load(
            Some(&path),
            env(&[
                ("KAIROS_NODE__LISTEN", "127.0.0.1:7100"),
                ("KAIROS_NODE__REPLAY_CONCURRENCY_MAX", "8"),
                ("KAIROS_NODE", "http://ignored"),
            ]),
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(config.node.listen.port(), 7100);
        assert_eq!(config.node.replay_concurrency_max, 8);

        let flags = Flags {
            listen: Some("127.0.0.1:7200".into()),
            data_dir: Some("/var/lib/kairos".into()),
        };
        let config = load(
            Some(&path),
            env(&[("KAIROS_NODE__LISTEN", "127.0.0.1:7100")]),
            &flags,
        )
        .unwrap();
        assert_eq!(config.node.listen.port(), 7200);
        assert_eq!(config.node.data_dir, PathBuf::from("/var/lib/kairos"));
    }

    #[test]
    fn the_metrics_token_is_optional_long_and_printable() {
        let config = load(None, env(&[]), &Flags::default()).unwrap();
        assert_eq!(config.node.metrics_token, None);
        let config = load(
            None,
            env(&[("KAIROS_NODE__METRICS_TOKEN", "scrape-0123456789abcdef")]),
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(
            config.node.metrics_token.as_deref(),
            Some("scrape-0123456789abcdef")
        );
        for bad in ["short", "has a space in it, long enough"] {
            let (_dir, path) = write(&format!("[node]\nmetrics_token = {bad:?}\n"));
            let error = load(Some(&path), env(&[]), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("node.metrics_token: must be at least 16"),
                "{error}"
            );
        }
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let (_dir, path) = write("[node]\nlistn = \"x\"\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("node.listn") || error.contains("unknown field `listn`"),
            "{error}"
        );

        let (_dir, path) = write("[node]\nlisten = \"nowhere\"\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("key node.listen: \"nowhere\" is not an address"),
            "{error}"
        );

        let (_dir, path) =
            write("[[replica]]\nname = \"web\"\nroot = \"/srv\"\ncapture_interval = \"often\"\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("replica[0].capture_interval"), "{error}");

        let (_dir, path) = write(
            "[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[[replica.probe]]\nkind = \"tcp\"\n",
        );
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("replica") && error.contains("tcp"),
            "{error}"
        );

        let (_dir, path) =
            write("[[replica]]\nname = \"web\"\nroot = \"/srv\"\nwatch_window = \"soon\"\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("replica[0].watch_window"), "{error}");

        let (_dir, path) = write(
            "[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[[replica.probe]]\nkind = \"metric\"\nmetric = \"load\"\nmax = 1.0\n",
        );
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("probe metric \"load\" is unknown"),
            "{error}"
        );

        let (_dir, path) = write("[limits]\nfile_bytes_max = \"big\"\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("limits.file_bytes_max"), "{error}");

        let error = load(
            None,
            env(&[("KAIROS_TELEMETRY__COLOUR", "blue")]),
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("colour"), "{error}");

        let (_dir, path) = write("[node\n");
        let error = load(Some(&path), env(&[]), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("config file"), "{error}");
    }
}

#[cfg(test)]
mod store_backend {
    use super::*;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kairos.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("fdb.cluster"), "test:abc@127.0.0.1:4500\n").unwrap();
        let config = load(Some(&path), Vec::new(), &Flags::default());
        if let Ok(config) = &config
            && let StoreBackend::FoundationDb(location) = &config.store
            && let Some(file) = &location.cluster_file
        {
            assert!(file.starts_with(dir.path()), "{}", file.display());
        }
        config
    }

    #[test]
    fn review_policies_are_read_per_timeline_and_bad_values_name_their_key() {
        let config = load_text(
            "[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[replica.policy]\nrequired_approvals = 1\n[replica.policy.timeline.shared]\nrequired_approvals = 2\nreviewers_from = [\"team-a\", \"team-b\", \"sre\"]\nauthors_cannot_approve = true\nrequire_prediction_below = 0.3\n",
        );
        let config = match config {
            Err(error) => panic!("{error}"),
            Ok(config) => config,
        };
        let web = &config.replicas[0];
        assert_eq!(web.review_policy_of("main").unwrap().required_approvals, 1);
        let shared = web.review_policy_of("shared").unwrap();
        assert_eq!(shared.required_approvals, 2);
        assert_eq!(shared.reviewers_from, ["team-a", "team-b", "sre"]);
        assert_eq!(shared.require_prediction_below, Some(0.3));
        for (text, expected) in [
            (
                "[replica.policy]\nrequired_approvals = -1\n",
                "replica[0].policy.required_approvals: -1 is not between 0 and 32",
            ),
            (
                "[replica.policy]\nrequired_approvals = 100\n",
                "replica[0].policy.required_approvals: 100 is not between 0 and 32",
            ),
            (
                "[replica.policy.timeline.t]\nrequired_approvals = 3\nreviewers_from = [\"a\", \"b\"]\n",
                "replica[0].policy.timeline.t.required_approvals: required_approvals = 3 can never be met",
            ),
            (
                "[replica.policy]\nrequire_prediction_below = 1.5\n",
                "replica[0].policy.require_prediction_below: require_prediction_below = 1.5 is not above 0",
            ),
            (
                "[replica.policy]\nreviewers_from = [\"a b\"]\n",
                "replica[0].policy.reviewers_from",
            ),
            (
                "[replica.policy]\nrequired_approval = 1\n",
                "required_approval",
            ),
        ] {
            let text = format!("[[replica]]\nname = \"web\"\nroot = \"/srv\"\n{text}");
            let error = load_text(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn redb_is_the_default() {
        assert_eq!(load_text("").unwrap().store, StoreBackend::Redb);
        assert_eq!(
            load_text("[store]\nbackend = \"redb\"\n").unwrap().store,
            StoreBackend::Redb
        );
    }

    #[test]
    fn foundationdb_takes_a_cluster_file_and_a_key_prefix() {
        let config = load_text(
            "[store]\nbackend = \"foundationdb\"\ncluster_file = \"fdb.cluster\"\nkey_prefix = \"team-a\"\n",
        )
        .unwrap();
        let StoreBackend::FoundationDb(location) = config.store else {
            panic!("not foundationdb");
        };
        assert!(location.cluster_file.unwrap().ends_with("fdb.cluster"));
        assert_eq!(location.key_prefix, "team-a");
        let config = load_text("[store]\nbackend = \"foundationdb\"\n").unwrap();
        assert_eq!(
            config.store,
            StoreBackend::FoundationDb(FdbLocation {
                cluster_file: None,
                key_prefix: KEY_PREFIX_DEFAULT.into()
            })
        );
        let config = load(
            None,
            vec![
                (
                    "KAIROS_STORE__BACKEND".to_string(),
                    "foundationdb".to_string(),
                ),
                ("KAIROS_STORE__KEY_PREFIX".to_string(), "b".to_string()),
            ],
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(config.store.name(), "foundationdb");
    }

    #[test]
    fn bad_store_settings_are_named() {
        for (text, expected) in [
            (
                "[store]\nbackend = \"rocksdb\"\n",
                "key store.backend: \"rocksdb\" is not a store backend: choose \"redb\" or \"foundationdb\"",
            ),
            (
                "[store]\nbackend = \"foundationdb\"\ncluster_file = \"missing.cluster\"\n",
                "missing.cluster is not a file",
            ),
            (
                "[store]\nbackend = \"foundationdb\"\nkey_prefix = \"a/b\"\n",
                "key store.key_prefix: key prefix \"a/b\" holds '/'",
            ),
            (
                "[store]\ncluster_file = \"fdb.cluster\"\n",
                "key store.cluster_file: is a FoundationDB setting",
            ),
            ("[store]\nbakend = \"redb\"\n", "bakend"),
        ] {
            let error = load_text(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn retention_policies_are_read_and_bad_rules_are_named() {
        use crate::tests::write;
        let (_dir, path) = write(
            "[retention]\ninterval = \"10m\"\nkeep_daily = 30\n[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[replica.retention]\nkeep_last = 5\nkeep_within = \"2d\"\n[replica.retention.timeline.exp]\nkeep_last = 1\n",
        );
        let config = load(Some(&path), Vec::new(), &Flags::default()).unwrap();
        assert_eq!(config.retention.interval, Duration::from_secs(600));
        assert_eq!(config.retention.default.unwrap().keep_daily, Some(30));
        let web = &config.replicas[0];
        let policy = web.retention.unwrap();
        assert_eq!(
            (policy.keep_last, policy.keep_within_ms),
            (Some(5), Some(2 * 24 * 3_600_000))
        );
        assert_eq!(web.retention_of("exp", None).unwrap().keep_last, Some(1));
        assert_eq!(web.retention_of("main", None), Some(policy));
        let unset = load(Some(&write("").1), Vec::new(), &Flags::default()).unwrap();
        assert_eq!(unset.retention.default, None);
        assert_eq!(unset.retention.interval, RETENTION_INTERVAL_DEFAULT);
        for (text, named) in [
            (
                "[retention]\nkeep_within = \"later\"\n",
                "retention.keep_within",
            ),
            ("[retention]\nkeep_last = 0\n", "keep_last = 0"),
            ("[retention]\nkeep_everything = true\n", "keep_everything"),
            ("[retention]\ninterval = \"10ms\"\n", "retention.interval"),
            (
                "[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[replica.retention.timeline.exp]\n",
                "replica[0].retention.timeline.exp",
            ),
            (
                "[[replica]]\nname = \"web\"\nroot = \"/srv\"\n[replica.retention.timeline.\"../x\"]\nkeep_last = 1\n",
                "is not a timeline name",
            ),
            (
                "[retention]\ninterval = \"500000000000y\"\n",
                "longer than 366 days",
            ),
        ] {
            let (_dir, path) = write(text);
            let error = load(Some(&path), Vec::new(), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{text:?}: {error}");
        }
    }

    #[test]
    fn webhooks_name_known_events_and_carry_a_secret_from_the_file_or_the_environment() {
        let (_dir, path) = super::tests::write(
            "[[webhook]]\nname = \"ci\"\nurl = \"https://hooks.example/kairos\"\nevents = [\"commit\", \"rollback\", \"gate\"]\nsecret_env = \"KAIROS_WEBHOOK_CI_SECRET\"\nreplicas = [\"web\"]\n\n[[webhook]]\nname = \"chat\"\nurl = \"http://127.0.0.1:9/x\"\nevents = [\"gate\"]\nsecret = \"0123456789abcdef\"\nattempts_max = 2\nbackoff_initial = \"50ms\"\n",
        );
        let config = load(
            Some(&path),
            vec![(
                "KAIROS_WEBHOOK_CI_SECRET".to_string(),
                "from-the-environment".to_string(),
            )],
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(config.webhooks.len(), 2);
        let ci = &config.webhooks[0];
        assert_eq!(ci.secret, "from-the-environment");
        assert_eq!(ci.events, ["commit", "rollback", "gate"]);
        assert_eq!(ci.replicas, ["web"]);
        assert_eq!(ci.attempts_max, 5);
        let chat = &config.webhooks[1];
        assert_eq!(chat.attempts_max, 2);
        assert_eq!(chat.backoff_initial, Duration::from_millis(50));
        assert_eq!(chat.timeout, Duration::from_secs(10));
        // Not set: other commands load the configuration; the node refuses to start.
        let unset = load(Some(&path), Vec::new(), &Flags::default()).unwrap();
        let missing = unset.webhook_secrets_set().unwrap_err();
        assert!(
            missing.to_string().contains("KAIROS_WEBHOOK_CI_SECRET"),
            "{missing}"
        );
        assert!(missing.to_string().contains("is not set"), "{missing}");
        config.webhook_secrets_set().unwrap();
        let hook = |rest: &str| {
            format!("[[webhook]]\nname = \"a\"\nurl = \"http://h/\"\nevents = [\"commit\"]\n{rest}")
        };
        for (text, named) in [
            (hook("secret = \"short\"\n"), "webhook[0].secret"),
            (
                hook("secret = \"0123456789abcdef\"\nattempts_max = 0\n"),
                "webhook[0].attempts_max",
            ),
            (
                hook("secret = \"0123456789abcdef\"\nbackoff_initial = \"2m\"\n"),
                "webhook[0].backoff_max",
            ),
            (
                hook("secret_env = \"HOME\"\n"),
                "webhook[0].secret_env",
            ),
            (
                hook("secret = \"0123456789abcdef\"\ncolour = \"red\"\n"),
                "colour",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"ftp://h/\"\nevents = [\"commit\"]\nsecret = \"0123456789abcdef\"\n".to_string(),
                "webhook[0].url",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://h/\"\nevents = [\"comit\"]\nsecret = \"0123456789abcdef\"\n".to_string(),
                "webhook[0].events",
            ),
            (
                "[[webhook]]\nname = \"a b\"\nurl = \"http://h/\"\nevents = [\"commit\"]\nsecret = \"0123456789abcdef\"\n".to_string(),
                "webhook[0].name",
            ),
        ] {
            let (_dir, path) = super::tests::write(&text);
            let error = load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
            assert!(error.to_string().contains(named), "{text}: {error}");
        }
    }

    #[test]
    fn nats_is_off_without_a_url_and_its_keys_are_checked() {
        let (_dir, path) = super::tests::write("[node]\n");
        let config = load(Some(&path), Vec::new(), &Flags::default()).unwrap();
        assert_eq!(config.nats, None);
        let (_dir, path) = super::tests::write(
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\nuser = \"node\"\nauthorization_file = \"auth.conf\"\n",
        );
        let config = load(
            Some(&path),
            vec![("KAIROS_NATS__PASSWORD".to_string(), "secret".to_string())],
            &Flags::default(),
        )
        .unwrap();
        let nats = config.nats.unwrap();
        assert_eq!(nats.password.as_deref(), Some("secret"));
        assert_eq!(nats.stream_prefix, "KAIROS");
        assert!(nats.authorization_file.unwrap().is_absolute());
        for (text, named) in [
            ("[nats]\nurl = \"http://x:1\"\n", "nats.url"),
            ("[nats]\nurl = \"nats://u:p@x:1\"\n", "nats.url"),
            ("[nats]\nurl = \"nats://127.0.0.1:99999\"\n", "nats.url"),
            ("[nats]\nurl = \"nats://127.0.0.1\"\n", "nats.url"),
            ("[nats]\nurl = \"nats://:4222\"\n", "nats.url"),
            ("[nats]\nurl = \"nats://a:1,b:2\"\n", "nats.url"),
            (
                "[nats]\nurl = \"nats://x:1\"\nsubject_prefix = \"_INBOX_root\"\n",
                "nats.subject_prefix",
            ),
            (
                "[nats]\nurl = \"nats://x:1\"\nsubject_prefix = \"a.b\"\n",
                "nats.subject_prefix",
            ),
            (
                "[nats]\nurl = \"nats://x:1\"\nstream_prefix = \"A*\"\n",
                "nats.stream_prefix",
            ),
            (
                "[nats]\nurl = \"nats://x:1\"\nuser = \"n\"\n",
                "nats.password",
            ),
            (
                "[nats]\nurl = \"nats://x:1\"\nmax_age = \"1s\"\n",
                "nats.max_age",
            ),
            (
                "[nats]\nurl = \"nats://x:1\"\nduplicate_window = \"30d\"\n",
                "nats.duplicate_window",
            ),
            ("[nats]\nurl = \"nats://x:1\"\nqueue = \"q\"\n", "queue"),
        ] {
            let (_dir, path) = super::tests::write(text);
            let error = load(Some(&path), Vec::new(), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_shipped_config_loads_and_watches_the_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/kairos.toml");
        let config = load(Some(&path), Vec::new(), &Flags::default()).unwrap();
        assert_eq!(config.node.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.store, StoreBackend::Redb);
        assert_eq!(config.replicas[0].name, "sample");
        assert!(
            config.replicas[0].root.ends_with("config/sample"),
            "{:?}",
            config.replicas[0].root
        );
    }
}
