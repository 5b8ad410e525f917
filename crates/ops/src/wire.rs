//! The JSON shapes of the API, shared with the CLI so that output is the same whether a
//! command runs on the store directly or through a node.

use kairos_capture::CaptureReport;
use kairos_core::{Hash, Instant};
use kairos_store::FrameRecord;
use serde::{Deserialize, Serialize};

use crate::learn::PredictionJson;

/// A frame as listed by `history`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrameJson {
    pub frame: Hash,
    pub time: Instant,
    pub timeline: String,
    pub parent: Option<Hash>,
    pub entries: u64,
    pub bytes: u64,
    pub objects_new: u64,
    pub bytes_new_stored: u64,
    pub torn: u64,
    pub unreadable: u64,
    pub capture_ms: u64,
}

impl From<&FrameRecord> for FrameJson {
    fn from(frame: &FrameRecord) -> FrameJson {
        FrameJson {
            frame: frame.id,
            time: frame.time,
            timeline: frame.timeline.clone(),
            parent: frame.parent,
            entries: frame.entries,
            bytes: frame.bytes,
            objects_new: frame.objects_new,
            bytes_new_stored: frame.bytes_new_stored,
            torn: frame.torn,
            unreadable: frame.unreadable,
            capture_ms: frame.capture_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NoteJson {
    pub path: String,
    pub message: String,
}

/// What `capture` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureJson {
    #[serde(flatten)]
    pub frame: FrameJson,
    /// Whether a new frame was stored; `false` when an automatic capture found the state
    /// of the head (`frame` is then the head).
    #[serde(default = "recorded_default")]
    pub recorded: bool,
    pub files_read: u64,
    pub files_reused: u64,
    pub objects_reused: u64,
    pub bytes_new_raw: u64,
    pub processes: u64,
    pub dictionary_trained: Option<u32>,
    pub notes: Vec<NoteJson>,
    /// In a cluster that keeps frames on more than one member: on how many members the
    /// frame's objects are when the capture answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<DurableJson>,
}

/// How many members hold a captured frame whole, of the `cluster.replication` it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DurableJson {
    pub copies: u32,
    pub required: u32,
    /// `copies >= required`: the frame outlives the loss of any `required - 1` members.
    pub durable: bool,
}

impl From<&CaptureReport> for CaptureJson {
    fn from(report: &CaptureReport) -> CaptureJson {
        CaptureJson {
            frame: FrameJson::from(&report.frame),
            recorded: report.recorded,
            files_read: report.files_read,
            files_reused: report.files_reused,
            objects_reused: report.stats.objects_reused,
            bytes_new_raw: report.stats.bytes_raw,
            processes: report.processes,
            dictionary_trained: report.dictionary_trained,
            notes: report
                .notes
                .iter()
                .map(|(path, message)| NoteJson {
                    path: path.clone(),
                    message: message.clone(),
                })
                .collect(),
            durable: None,
        }
    }
}

fn recorded_default() -> bool {
    true
}

/// The body of every error answer: a stable code and a message naming the problem.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unknown_replica`, `frame_not_found`, `bad_spec`, ...
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthJson {
    pub status: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct ReplicaStatusJson {
    pub name: String,
    pub watching: bool,
    pub captures: u64,
    /// Captures that found the head's state and stored no frame.
    #[serde(default)]
    pub captures_unchanged: u64,
    pub capture_failures: u64,
    pub last_frame: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusJson {
    pub version: String,
    pub listen: String,
    pub data_dir: String,
    pub uptime_ms: u64,
    pub store_bytes: u64,
    pub actor_restarts: u64,
    pub replicas: Vec<ReplicaStatusJson>,
    /// The store's figures as last computed (at start, by `kairos stats` or after `kairos
    /// gc`): computing them surveys the whole store, so a status request never does.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub store: Option<StoreFiguresJson>,
    /// NATS, when configured: the connection, the request listener, what was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub nats: Option<NatsStatusJson>,
    /// Each configured webhook: what was delivered, retried and given up on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub webhooks: Vec<WebhookStatusJson>,
}

/// One webhook as the status shows it (counts since the node started).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WebhookStatusJson {
    pub name: String,
    /// Its URL without the query.
    pub url: String,
    pub events: Vec<String>,
    /// Events the endpoint accepted (2xx).
    pub delivered: u64,
    /// Failed attempts that were tried again.
    pub retries: u64,
    /// Events given up on after every attempt failed.
    pub gave_up: u64,
    /// The last failure, until the next delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The newest events given up on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<WebhookFailureJson>,
}

/// An event a webhook gave up on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookFailureJson {
    /// The event's id (its `Kairos-Delivery`).
    pub id: String,
    pub event: String,
    pub replica: String,
    pub attempts: u32,
    /// The last attempt's error.
    pub error: String,
    pub time: kairos_core::Instant,
}

/// The node's NATS side.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsStatusJson {
    pub url: String,
    pub connected: bool,
    /// Whether the node answers `kairos.api.<verb>` (subscribed).
    pub answering: bool,
    /// Events JetStream acknowledged since the node started (duplicates included).
    pub events_published: u64,
    /// Events the catalog holds that are not acknowledged yet (as of the last read).
    pub events_pending: u64,
    /// The last failure to publish or subscribe, until the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// From a catalog change to JetStream's acknowledgement of the events it made, over
    /// the last 1 024 published batches: median and 99th percentile, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_latency_ms_p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_latency_ms_p99: Option<f64>,
    /// What is wrong with the parties' NATS users (the authorization file not written, the
    /// server not reloaded, a party left out), until it is right again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_error: Option<String>,
}

/// The store's figures and when they were computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreFiguresJson {
    pub computed_at: kairos_core::Instant,
    #[serde(flatten)]
    pub figures: kairos_store::StoreFigures,
}

/// `POST /api/replicas`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddReplicaRequest {
    pub name: String,
    /// An absolute path on the node's machine.
    pub root: String,
    #[serde(default)]
    pub processes: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// For example `5s`.
    #[serde(default = "default_interval")]
    pub capture_interval: String,
    /// Check, after_commit, watch window, actions and probes (see `kairos replica add --help`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub settings: kairos_capture::ReplicaSettings,
}

fn default_interval() -> String {
    "5s".into()
}

/// `POST /api/replicas/{name}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub at: String,
    /// An absolute path on the node's machine.
    pub into: String,
    #[serde(default)]
    pub force: bool,
}

/// `GET /api/replicas/{name}/frame`: the frame a spec names, opened.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FrameStateJson {
    /// The frame record: {frame, time, timeline, parent, entries, bytes, ...}
    #[schema(value_type = Object)]
    pub frame: FrameJson,
    pub files_entries: u64,
    pub files_bytes: u64,
    pub processes: u64,
    /// cpu_percent, memory_rss_bytes, disk_allocated_bytes, disk_apparent_bytes, files, directories, processes
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// Capture notes (torn or unreadable files) in the frame
    pub notes: u64,
}

/// `POST /api/replicas/{name}/timelines`: fork a timeline.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    pub name: String,
    /// The frame to fork from (a SPEC, `TIMELINE@SPEC` allowed).
    pub at: String,
    #[serde(default)]
    pub party: Option<String>,
}

/// `POST /api/replicas/{name}/forget`: forget frames by retention rules. Rules given
/// here are over the configured policy; none given: the configured policy alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetRequestJson {
    /// Only this timeline (else every timeline with a policy).
    #[serde(default)]
    pub timeline: Option<String>,
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    #[serde(default)]
    pub keep_daily: Option<u32>,
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    /// A duration (`2d`, `12h`).
    #[serde(default)]
    pub keep_within: Option<String>,
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub party: Option<String>,
}

impl ForgetRequestJson {
    /// The rules it gives.
    pub fn policy(&self) -> Result<kairos_core::RetentionPolicy, String> {
        let keep_within_ms = match &self.keep_within {
            Some(text) => Some(
                humantime::parse_duration(text)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .map_err(|error| {
                        format!("keep_within {text:?} is not a duration (for example 2d or 12h): {error}")
                    })?,
            ),
            None => None,
        };
        Ok(kairos_core::RetentionPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_within_ms,
        })
    }
}

/// `POST /api/replicas/{name}/proposals`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProposeRequest {
    /// The proposal: title, author, optional base, ops (see `kairos propose --help`).
    #[schema(value_type = Object)]
    pub document: kairos_sandbox::ProposalDocument,
    /// The timeline to propose on when the document gives no base (default `main`).
    #[serde(default)]
    pub timeline: Option<String>,
    /// The party proposing, when the document names no author (with a token: the
    /// token's party)
    #[serde(default)]
    pub party: Option<String>,
}

/// `POST /api/replicas/{name}/proposals/{id}/sandbox`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxRequest {
    /// 1-based op indexes (all when absent).
    #[serde(default)]
    pub ops: Option<Vec<usize>>,
    #[serde(default)]
    pub run_check: bool,
    #[serde(default)]
    pub party: Option<String>,
}

/// `POST /api/replicas/{name}/proposals/{id}/gate` (and `.../gate/commit`, which also
/// commits a passing proposal and needs the committer role).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    /// 1-based op indexes (all when absent).
    #[serde(default)]
    pub ops: Option<Vec<usize>>,
    /// Refuse above this predicted P(error) [default 0.2].
    #[serde(default = "max_risk_default")]
    pub max_risk: f32,
    /// Refuse below this confidence, or when the model abstains; 0 accepts an abstaining
    /// prediction [default 0.7].
    #[serde(default = "min_confidence_default")]
    pub min_confidence: f32,
    /// Run the replica's check in a sandbox; a failing check refuses.
    #[serde(default)]
    pub run_check: bool,
    #[serde(default)]
    pub party: Option<String>,
}

fn max_risk_default() -> f32 {
    crate::gate::MAX_RISK_DEFAULT
}

fn min_confidence_default() -> f32 {
    crate::gate::MIN_CONFIDENCE_DEFAULT
}

/// `POST /api/replicas/{name}/proposals/{id}/predict`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// 1-based op indexes (all when absent).
    #[serde(default)]
    pub ops: Option<Vec<usize>>,
    #[serde(default)]
    pub party: Option<String>,
}

/// `POST /api/replicas/{name}/suggest`: candidate values of one config key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuggestRequest {
    /// The config file, relative to the replica root.
    pub file: String,
    pub key: String,
    pub values: Vec<String>,
    /// `cpu` or `rss`: among equally safe values, prefer the smaller predicted effect.
    #[serde(default)]
    pub objective: Option<String>,
}

/// `POST /api/replicas/{name}/proposals/{id}/commit`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    #[serde(default)]
    pub ops: Option<Vec<usize>>,
    /// Wait for the watch window and answer the final status (default true).
    #[serde(default = "default_true")]
    pub wait: bool,
    #[serde(default)]
    pub party: Option<String>,
}

fn default_true() -> bool {
    true
}

/// `POST /api/replicas/{name}/proposals/{id}/review`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    /// `approve` or `reject`
    #[schema(value_type = String)]
    pub verdict: kairos_core::Verdict,
    #[serde(default)]
    pub comment: Option<String>,
    /// The party reviewing (with a token: the token's party)
    #[serde(default)]
    pub party: Option<String>,
}

/// `GET /api/replicas/{name}/proposals`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ProposalsQuery {
    /// Only proposals on this timeline
    #[serde(default)]
    pub timeline: Option<String>,
    /// Only proposals with this status: open, rejected, committing, committed,
    /// rolled_back, conflict, failed
    #[serde(default)]
    pub status: Option<String>,
}

/// `POST /api/replicas/{name}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// The frame to restore (a SPEC).
    pub to: String,
    #[serde(default)]
    pub party: Option<String>,
}

/// A stored proposal, as answered by `propose`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProposalJson {
    pub proposal: Hash,
    pub replica: String,
    pub title: String,
    pub author: String,
    pub timeline: String,
    pub base: Hash,
    pub base_spec: String,
    pub created: Instant,
    /// The ops, described (`set_config "app.toml" key "port"`).
    pub ops: Vec<String>,
    /// The predicted outcome of all its ops, made as it was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionJson>,
    /// Open proposals of the same timeline that touch the same entries (each is told).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interference: Vec<kairos_store::audit::InterferenceEvent>,
}

/// A sandbox with the prediction made before it ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxJson {
    #[serde(flatten)]
    pub report: kairos_sandbox::SandboxReport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionJson>,
    /// After a passing check: the check run with other open proposals of the timeline
    /// whose own check passed, applied together (which partners, and the result).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub combined_checks: Vec<crate::review::CombinedCheckJson>,
    /// The interference those combined checks found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interference: Vec<kairos_store::audit::InterferenceEvent>,
}

/// A commit with the prediction made before it was applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitJson {
    #[serde(flatten)]
    pub record: kairos_commit::CommitRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionJson>,
}

impl From<&kairos_sandbox::Proposal> for ProposalJson {
    fn from(proposal: &kairos_sandbox::Proposal) -> ProposalJson {
        ProposalJson {
            proposal: proposal.id,
            replica: proposal.replica.clone(),
            title: proposal.title.clone(),
            author: proposal.author.clone(),
            timeline: proposal.timeline.clone(),
            base: proposal.base,
            base_spec: proposal.base_spec.clone(),
            created: proposal.created,
            ops: proposal.ops.iter().map(|op| op.describe()).collect(),
            prediction: None,
            interference: Vec::new(),
        }
    }
}

/// The party acting when a request names none.
pub const PARTY_DEFAULT: &str = "anonymous";

/// `POST /api/parties`: a new party.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartyRequest {
    pub name: String,
    /// viewer, proposer, reviewer, committer or admin
    pub role: String,
    /// The replicas it may act on (all when empty)
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// A party just made, with its token: shown this once, stored only as a hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewPartyJson {
    pub party: String,
    pub role: kairos_core::Role,
    pub replicas: Vec<String>,
    pub token: String,
}

/// A party as listed (never its token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartyJson {
    pub party: String,
    pub role: kairos_core::Role,
    pub replicas: Vec<String>,
    pub created: Instant,
}

impl From<&kairos_core::PartyRecord> for PartyJson {
    fn from(party: &kairos_core::PartyRecord) -> PartyJson {
        PartyJson {
            party: party.name.clone(),
            role: party.role,
            replicas: party.replicas.clone(),
            created: party.created,
        }
    }
}
