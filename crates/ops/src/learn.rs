//! The predictor wired to the store: a proposal's view as the model sees it (built from
//! its ops and its base frame, never from a sandbox, so a prediction needs nothing run),
//! real outcomes stored as labelled examples (a sandbox check, a commit's end), models
//! trained from them and versioned in the store, predictions stored so that each one is
//! scored when its outcome arrives, and the report of that record.
//!
//! A [`Learner`] keeps, per replica, the serving model and the history of outcomes a
//! prediction may use; the CLI makes one per command, the node keeps one for its life
//! and its predictor actor retrains it as outcomes arrive.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use globset::Glob;
use kairos_commit::CommitRecord;
use kairos_core::{CommitStatus, Hash, Instant, ReplicaDefinition};
use kairos_predict::metrics::{self, Report};
use kairos_predict::{
    DiffSummary, FileView, History, Model, ModelHeader, OpKind, OpView, Outcome, OutcomeRecord,
    Prediction, Predictor, ProposalView, ResourceTrend, RetrainDecision, RetrainPolicy,
    SharedPredictor, TrainingSettings, examples_from_records,
};
use kairos_replay::StateView;
use kairos_sandbox::{Op, Proposal, SandboxReport};
use kairos_store::audit::{ModelEvent, OutcomeEvent, PredictionEvent};
use kairos_store::node::{Body, ConfigNode, DirEntry};
use kairos_store::{
    AuditEvent, Change, Command, ObjectKind, Reader, RecordBody, RecordFamily, Store,
};
use serde::{Deserialize, Serialize};

use crate::{OpsError, Result};

pub use kairos_predict::train::prepare_process;

/// Largest file whose lines a view diffs (larger files count by size only).
pub const VIEW_FILE_BYTES_MAX: u64 = 1 << 20;
/// Changed lines kept per op in a view (the features look at no more).
pub const VIEW_LINES_MAX: usize = kairos_predict::features::LINES_PER_OP_MAX;
/// Bytes kept of one changed line.
pub const VIEW_LINE_BYTES_MAX: usize = 256;
/// Ops kept in a view (the features look at no more).
pub const VIEW_OPS_MAX: usize = kairos_predict::features::OPS_MAX;
/// Base keys kept per touched config file (the features look at no more).
pub const VIEW_BASE_KEYS_MAX: usize = kairos_predict::features::CONTEXT_KEYS_PER_FILE_MAX;
/// Touched config files whose base keys a view keeps, and dependents it lists.
pub const VIEW_FILES_MAX: usize = 16;
/// Largest outcome or prediction record: under the store's 100 000-byte value limit.
pub const RECORD_BYTES_MAX: usize = 90_000;
/// Candidate values `suggest` ranks at once.
pub const SUGGEST_VALUES_MAX: usize = 256;
/// Entries of a base frame looked at for `include` directives between config files.
pub const INCLUDE_SCAN_ENTRIES_MAX: usize = 20_000;
/// Base frames whose dependency index a learner keeps.
const BASE_INDEXES_MAX: usize = 16;
/// Share of a replica's outcomes (the most recent) held out to calibrate a new model.
pub const CALIBRATION_SHARE: f64 = 0.2;

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeSource {
    /// A sandbox whose check ran: the check passed or failed.
    Sandbox,
    /// A commit that ended: committed, or rolled back / failed.
    Commit,
}

/// One real outcome of a proposal, stored as a labelled example (`u/` records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEntry {
    pub proposal: Hash,
    pub ops: Vec<usize>,
    pub source: OutcomeSource,
    /// The sandbox or commit record the outcome comes from.
    pub source_id: Hash,
    pub time: Instant,
    pub failed: bool,
    /// What happened, in a line (`check exited 1 after 23 ms`, `rolled back: probe …`).
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The proposal as the predictor sees it, and the label.
    pub example: OutcomeRecord,
}

/// A stored prediction (`q/` records), scored once the proposal's outcome arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionEntry {
    pub proposal: Hash,
    pub ops: Vec<usize>,
    pub time: Instant,
    pub party: String,
    pub prediction: Prediction,
}

/// A prediction as commands answer it: the prediction and the ops it is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PredictionJson {
    pub proposal: String,
    pub ops: Vec<usize>,
    pub p_error: f32,
    pub confidence: f32,
    pub abstain: bool,
    #[schema(value_type = Object)]
    pub resource_deltas: kairos_predict::ResourceDeltas,
    pub affected: Vec<String>,
    pub explanation: Vec<String>,
    pub model: Option<String>,
    /// Why the serving model could not be loaded, when it could not (the prediction then
    /// abstains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_error: Option<String>,
    /// Microseconds spent on features and inference.
    pub inference_us: u64,
}

/// What `model status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelStatusJson {
    pub replica: String,
    /// The serving model's version and id; absent before the first training.
    pub version: Option<u32>,
    pub model: Option<String>,
    pub created: Option<String>,
    pub trained_examples: Option<usize>,
    pub training_first: Option<String>,
    pub training_last: Option<String>,
    #[schema(value_type = Object)]
    pub held_out: Option<kairos_predict::model::HeldOut>,
    /// Outcomes known now, and the failures among them.
    pub outcomes: usize,
    pub failures: usize,
    /// `train`, `wait` (not enough outcomes) or `keep` (the model is recent enough).
    pub retrain: String,
    pub retrain_detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_error: Option<String>,
    /// Training time, for `model train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_ms: Option<u64>,
}

/// One scored predictor (or baseline) in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScoredJson {
    pub name: String,
    #[schema(value_type = Object)]
    pub report: Report,
}

/// What `model report` answers: the honest record of stored predictions against the
/// outcomes that followed them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelReportJson {
    pub replica: String,
    pub outcomes: usize,
    pub predictions: usize,
    /// Outcomes that had a prediction made before them.
    pub scored: usize,
    pub abstained: usize,
    /// The model's record (abstentions included, at their probability), then the
    /// baselines on the same outcomes.
    pub model: ScoredJson,
    pub baselines: Vec<ScoredJson>,
}

/// What `suggest` answers for one candidate value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SuggestionJson {
    pub value: String,
    pub p_error: f32,
    pub confidence: f32,
    pub abstain: bool,
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<f64>,
    pub explanation: Vec<String>,
}

/// Renders a `set_config` value as the text the model sees.
pub fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn outcome_id(source_id: &Hash) -> Hash {
    Hash::of(0x55, source_id.as_bytes())
}

fn prediction_id(proposal: &Hash, ops: &[usize], time: Instant) -> Hash {
    let mut bytes = proposal.as_bytes().to_vec();
    for op in ops {
        bytes.extend_from_slice(&(*op as u64).to_be_bytes());
    }
    bytes.extend_from_slice(&time.to_sortable_bytes());
    Hash::of(0x51, &bytes)
}

fn nanos(time: Instant) -> u64 {
    u64::try_from(time.0).unwrap_or(0)
}

/// What a base frame says about who depends on which file: the processes' command lines
/// and the `include` directives between its config files.
#[derive(Debug, Default)]
struct BaseIndex {
    root: String,
    processes: Vec<(String, Vec<String>)>,
    /// (including file, included pattern as written).
    includes: Vec<(String, String)>,
    trend: Option<ResourceTrend>,
}

/// Frames before a base whose metrics make its resource trend.
const TREND_FRAMES: usize = 8;

/// How far back the runtime series is read for a base's resource trend.
const TREND_WINDOW_NS: i64 = 30 * 60 * 1_000_000_000;
/// Buckets of the runtime series read for one mean (a bound on the read).
const SERIES_BUCKETS_MAX: usize = 4_096;

/// The replica's mean CPU and RSS over `[from, to]` from its runtime series (weighted by
/// the samples in each bucket), and how many samples it covers.
fn series_mean(store: &Store, replica: &str, from: i64, to: i64) -> Option<(f64, f64, u64)> {
    if to < from {
        return None;
    }
    let buckets = store
        .series(replica, Instant(from), Instant(to), SERIES_BUCKETS_MAX)
        .ok()?;
    let mut sums = (0.0, 0.0, 0u64);
    for bucket in buckets
        .iter()
        .filter(|b| (from..=to).contains(&b.last_at.0))
    {
        let weight = f64::from(bucket.samples);
        sums.0 += bucket.cpu_percent * weight;
        sums.1 += bucket.memory_rss_bytes as f64 * weight;
        sums.2 += u64::from(bucket.samples);
    }
    (sums.2 > 0).then(|| (sums.0 / sums.2 as f64, sums.1 / sums.2 as f64, sums.2))
}

/// CPU and RSS at the base against their mean before it: over the half hour of runtime
/// series before the base (frames are stored only on change, the series on every
/// capture), or, for stores without a series there, over up to `TREND_FRAMES` frames.
fn resource_trend(store: &Store, reader: &Reader<'_>, view: &StateView) -> Option<ResourceTrend> {
    let base = &view.frame;
    let now = view.runtime(reader).ok()?.metrics;
    if let Some((cpu, rss, samples)) = series_mean(
        store,
        &base.replica,
        base.time.0.saturating_sub(TREND_WINDOW_NS),
        base.time.0 - 1,
    ) && samples >= 2
    {
        return Some(ResourceTrend {
            cpu_percent_change: (now.cpu_percent - cpu) as f32,
            rss_log_ratio: ((now.memory_rss_bytes as f64 + 1.0) / (rss + 1.0)).ln() as f32,
        });
    }
    let frames = store
        .frames_before(&base.replica, &base.timeline, base.time, TREND_FRAMES + 1)
        .ok()?;
    let metrics = |frame: &kairos_store::FrameRecord| {
        let view = kairos_replay::open_frame(store, frame.clone()).ok()?;
        let runtime = view.runtime(reader).ok()?;
        Some((
            runtime.metrics.cpu_percent,
            runtime.metrics.memory_rss_bytes as f64,
        ))
    };
    let before: Vec<(f64, f64)> = frames
        .iter()
        .filter(|frame| frame.id != base.id)
        .take(TREND_FRAMES)
        .filter_map(metrics)
        .collect();
    if before.len() < 2 {
        return None;
    }
    let count = before.len() as f64;
    let cpu = before.iter().map(|(cpu, _)| cpu).sum::<f64>() / count;
    let rss = before.iter().map(|(_, rss)| rss).sum::<f64>() / count;
    Some(ResourceTrend {
        cpu_percent_change: (now.cpu_percent - cpu) as f32,
        rss_log_ratio: ((now.memory_rss_bytes as f64 + 1.0) / (rss + 1.0)).ln() as f32,
    })
}

fn is_include_key(key: &str) -> bool {
    let last = key.rsplit(['.', '/']).next().unwrap_or(key);
    let last = last.split('#').next().unwrap_or(last);
    matches!(
        last.trim_start_matches(['$', '!'])
            .to_ascii_lowercase()
            .as_str(),
        "include" | "include_if_exists" | "include_dir" | "import" | "includes"
    )
}

impl BaseIndex {
    fn build(store: &Store, reader: &Reader<'_>, view: &StateView, root: &str) -> BaseIndex {
        let mut index = BaseIndex {
            root: root.trim_end_matches('/').to_string(),
            trend: resource_trend(store, reader, view),
            ..BaseIndex::default()
        };
        if let Ok(runtime) = view.runtime(reader) {
            index.processes = runtime
                .processes
                .iter()
                .map(|process| (process.name.clone(), process.cmdline.clone()))
                .collect();
        }
        // Config files' include directives (bounded walk; a huge tree is scanned in part).
        let mut stack = vec![(Vec::new(), view.files_hash())];
        let mut seen = 0usize;
        while let Some((prefix, hash)) = stack.pop() {
            let Ok(entries) = reader.dir_entries(&hash) else {
                continue;
            };
            for entry in entries {
                seen += 1;
                if seen > INCLUDE_SCAN_ENTRIES_MAX {
                    return index;
                }
                let path = kairos_replay::state::join(&prefix, &entry.name);
                match &entry.body {
                    Body::Dir { node, .. } => stack.push((path, Hash(*node))),
                    Body::File {
                        config: Some(config),
                        ..
                    } => {
                        let Ok(node) =
                            reader.node::<ConfigNode>(&Hash(*config), ObjectKind::Config)
                        else {
                            continue;
                        };
                        let file = kairos_replay::state::display_path(&path);
                        for key in node.keys {
                            if is_include_key(&key.key) {
                                index.includes.push((file.clone(), key.value.clone()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        index
    }

    /// Whether `pattern` (as written in an include or a command line) names `path`.
    fn names(&self, pattern: &str, path: &str, from_file: Option<&str>) -> bool {
        let pattern = pattern
            .trim()
            .trim_matches(['"', '\'', ';'])
            .trim_start_matches("./");
        if pattern.is_empty() {
            return false;
        }
        let relative = pattern
            .strip_prefix(&format!("{}/", self.root))
            .unwrap_or(pattern);
        let mut candidates = vec![relative.to_string()];
        if let Some(dir) = from_file.and_then(|file| file.rsplit_once('/').map(|(dir, _)| dir)) {
            candidates.push(format!("{dir}/{relative}"));
        }
        candidates.iter().any(|candidate| {
            candidate == path
                || path.ends_with(&format!("/{candidate}"))
                || candidate.ends_with(&format!("/{path}"))
                || (candidate.contains(['*', '?', '['])
                    && Glob::new(candidate)
                        .map(|glob| glob.compile_matcher().is_match(path))
                        .unwrap_or(false))
        })
    }

    /// Who depends on `path`: config files that include it, processes whose command line
    /// names it or a file that includes it.
    fn dependents(&self, path: &str) -> Vec<String> {
        let mut files = vec![path.to_string()];
        let mut out = Vec::new();
        for (file, pattern) in &self.includes {
            if file != path && self.names(pattern, path, Some(file)) {
                out.push(format!("{file} (includes {path})"));
                files.push(file.clone());
            }
        }
        for (name, cmdline) in &self.processes {
            if cmdline.iter().skip(1).any(|argument| {
                files.iter().any(|file| {
                    argument
                        .split_once('=')
                        .map_or(argument.as_str(), |(_, value)| value)
                        .trim()
                        .ends_with(file.as_str())
                        && self.names(argument.rsplit('=').next().unwrap_or(argument), file, None)
                })
            }) {
                out.push(format!("process {name}"));
            }
        }
        out
    }
}

/// The serving state of one replica's predictor.
struct ReplicaLearning {
    predictor: SharedPredictor,
    state: Mutex<LearnState>,
}

#[derive(Default)]
struct LearnState {
    history: History,
    outcomes: usize,
    failures: usize,
    /// Outcome ids folded into `history` (an outcome is counted once).
    known: std::collections::HashSet<Hash>,
    version: Option<u32>,
    trained_on: Option<usize>,
    model_error: Option<String>,
    /// The history could not take an outcome in time order: rebuild on next use.
    stale: bool,
}

/// The predictor state of every replica a process serves.
#[derive(Default)]
pub struct Learner {
    replicas: Mutex<HashMap<String, Arc<ReplicaLearning>>>,
    bases: Mutex<Vec<(Hash, Arc<BaseIndex>)>>,
    pub policy: RetrainPolicy,
    pub training: TrainingSettings,
}

impl Learner {
    pub fn new() -> Learner {
        Learner::default()
    }

    /// A learner that retrains by `policy` (the node's `[predictor]` settings).
    pub fn with_policy(policy: RetrainPolicy) -> Learner {
        Learner {
            policy,
            ..Learner::default()
        }
    }

    fn replica(&self, store: &Store, name: &str) -> Result<Arc<ReplicaLearning>> {
        if let Some(existing) = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && !existing
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stale
        {
            return Ok(existing.clone());
        }
        let loaded = Arc::new(load_replica(store, name)?);
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), loaded.clone());
        Ok(loaded)
    }

    /// Forgets what is cached for `name` (the next use reloads from the store).
    pub fn forget(&self, name: &str) {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    fn base_index(
        &self,
        store: &Store,
        reader: &Reader<'_>,
        view: &StateView,
        root: &str,
    ) -> Arc<BaseIndex> {
        let id = view.frame.id;
        if let Some((_, index)) = self
            .bases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(frame, _)| *frame == id)
        {
            return index.clone();
        }
        let index = Arc::new(BaseIndex::build(store, reader, view, root));
        let mut bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        if bases.len() >= BASE_INDEXES_MAX {
            bases.remove(0);
        }
        bases.push((id, index.clone()));
        index
    }

    /// A proposal's view: its chosen ops, the base values of the files they touch, who
    /// depends on those files, sizes, at `time`.
    pub fn proposal_view(
        &self,
        store: &Store,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        ops: &[usize],
        time: Instant,
    ) -> Result<ProposalView> {
        let base = kairos_sandbox::proposal_base(store, proposal)?;
        let view = kairos_replay::open_frame(store, base)?;
        let reader = store.reader()?;
        let index = self.base_index(store, &reader, &view, &replica.root.to_string_lossy());
        let limits = kairos_core::Limits::default();
        let lookup = |path: &str| -> Option<DirEntry> {
            view.lookup(&reader, path.as_bytes(), &limits).ok()
        };
        let old_text = |entry: &DirEntry| -> Option<String> {
            let Body::File { content, .. } = &entry.body else {
                return None;
            };
            if entry.meta.size > VIEW_FILE_BYTES_MAX {
                return None;
            }
            let mut bytes = Vec::new();
            kairos_replay::write_content(&reader, content, &mut bytes).ok()?;
            String::from_utf8(bytes).ok()
        };
        let base_keys = |entry: &DirEntry| -> Option<Vec<(String, String)>> {
            let Body::File {
                config: Some(config),
                ..
            } = &entry.body
            else {
                return None;
            };
            let node = reader
                .node::<ConfigNode>(&Hash(*config), ObjectKind::Config)
                .ok()?;
            Some(
                node.keys
                    .into_iter()
                    .map(|key| (key.key, key.value))
                    .collect(),
            )
        };
        let mut out = ProposalView {
            time_ns: nanos(time),
            ..ProposalView::default()
        };
        let mut files = BTreeSet::new();
        let mut diff = DiffSummary::default();
        for &number in ops {
            let Some(op) = proposal.ops.get(number.wrapping_sub(1)) else {
                return Err(crate::InputError::ProposalId {
                    id: proposal.id.to_hex(),
                    problem: format!(
                        "op {number} does not exist (the proposal has ops 1 to {})",
                        proposal.ops.len()
                    ),
                }
                .into());
            };
            let mut view_op = match op {
                Op::PutFile { path, .. } => {
                    let new = op.put_content().unwrap_or_default();
                    let old = lookup(path);
                    let (added, removed) = match (
                        old.as_ref().map_or(Some(String::new()), &old_text),
                        String::from_utf8(new.clone()),
                    ) {
                        (Some(old), Ok(new)) if new.len() as u64 <= VIEW_FILE_BYTES_MAX => {
                            line_changes(&old, &new)
                        }
                        _ => (Vec::new(), Vec::new()),
                    };
                    diff.bytes_added += new.len() as u64;
                    if let Some(entry) =
                        old.as_ref().filter(|e| matches!(e.body, Body::File { .. }))
                    {
                        diff.bytes_removed += entry.meta.size;
                    }
                    OpView {
                        kind: Some(OpKind::PutFile),
                        path: path.clone(),
                        lines_added: added,
                        lines_removed: removed,
                        ..OpView::default()
                    }
                }
                Op::PatchFile { path, unified_diff } => {
                    let (added, removed) = patch_lines(unified_diff);
                    diff.bytes_added += added.iter().map(|line| line.len() as u64 + 1).sum::<u64>();
                    diff.bytes_removed += removed
                        .iter()
                        .map(|line| line.len() as u64 + 1)
                        .sum::<u64>();
                    OpView {
                        kind: Some(OpKind::PatchFile),
                        path: path.clone(),
                        lines_added: added,
                        lines_removed: removed,
                        ..OpView::default()
                    }
                }
                Op::Delete { path } => {
                    if let Some(entry) =
                        lookup(path).filter(|e| matches!(e.body, Body::File { .. }))
                    {
                        diff.bytes_removed += entry.meta.size;
                    }
                    OpView {
                        kind: Some(OpKind::Delete),
                        path: path.clone(),
                        ..OpView::default()
                    }
                }
                Op::SetConfig { file, key, value } => {
                    diff.keys_changed += 1;
                    OpView::set_config(file, key, &value_text(value))
                }
                Op::UnsetConfig { file, key } => {
                    diff.keys_changed += 1;
                    OpView {
                        kind: Some(OpKind::UnsetConfig),
                        path: file.clone(),
                        key: Some(key.clone()),
                        ..OpView::default()
                    }
                }
                Op::Action { name } => OpView {
                    kind: Some(OpKind::Action),
                    path: name.clone(),
                    ..OpView::default()
                },
            };
            bound_lines(&mut view_op.lines_added);
            bound_lines(&mut view_op.lines_removed);
            if let Some(value) = view_op.value.as_mut() {
                truncate_text(value, VIEW_LINE_BYTES_MAX);
            }
            if out.ops.len() >= VIEW_OPS_MAX {
                continue;
            }
            if let Some(path) = op.path() {
                files.insert(path.to_string());
            }
            out.ops.push(view_op);
        }
        diff.files_changed = files.len() as u64;
        out.diff = diff;
        out.trend = index.trend;
        for path in files.iter().take(VIEW_FILES_MAX) {
            if let Some(mut keys) = lookup(path).as_ref().and_then(base_keys) {
                keys.truncate(VIEW_BASE_KEYS_MAX);
                for (key, value) in &mut keys {
                    truncate_text(key, VIEW_LINE_BYTES_MAX);
                    truncate_text(value, VIEW_LINE_BYTES_MAX);
                }
                out.base_files.push(FileView {
                    path: path.clone(),
                    keys,
                });
            }
            for dependent in index.dependents(path) {
                if !out.dependents.contains(&dependent) && out.dependents.len() < VIEW_FILES_MAX {
                    out.dependents.push(dependent);
                }
            }
        }
        Ok(out)
    }

    /// The prediction for a proposal's chosen ops, from the serving model and the history
    /// of outcomes before now.
    pub fn predict(
        &self,
        store: &Store,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        ops: &[usize],
        time: Instant,
    ) -> Result<PredictionJson> {
        let learning = self.replica(store, &replica.name)?;
        let view = self.proposal_view(store, replica, proposal, ops, time)?;
        let predictor = learning.predictor.current();
        let state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let prediction = predictor.predict(&view, &state.history);
        let inference_us = started.elapsed().as_micros() as u64;
        Ok(prediction_json(
            proposal.id,
            ops,
            prediction,
            state.model_error.clone(),
            inference_us,
        ))
    }

    /// Predictions for several views at once (one lock, one model).
    pub fn predict_views(
        &self,
        store: &Store,
        name: &str,
        views: &[ProposalView],
    ) -> Result<Vec<Prediction>> {
        let learning = self.replica(store, name)?;
        let predictor = learning.predictor.current();
        let state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(views
            .iter()
            .map(|view| predictor.predict(view, &state.history))
            .collect())
    }

    /// Folds a newly stored outcome into the replica's history (if it is loaded).
    pub fn observe(&self, replica: &str, id: Hash, entry: &OutcomeEntry) {
        let Some(learning) = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(replica)
            .cloned()
        else {
            return;
        };
        let mut state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.known.insert(id) {
            return;
        }
        state.outcomes += 1;
        state.failures += usize::from(entry.failed);
        if state.history.record(&entry.example).is_err() {
            state.stale = true;
        }
    }

    /// The header of the replica's serving model, if one is loaded.
    pub fn serving_model(&self, store: &Store, name: &str) -> Result<Option<ModelHeader>> {
        let learning = self.replica(store, name)?;
        let predictor = learning.predictor.current();
        Ok(predictor.model().map(|model| model.header.clone()))
    }

    /// Whether the replica's model should be (re)trained now.
    pub fn decision(&self, store: &Store, name: &str) -> Result<RetrainDecision> {
        let learning = self.replica(store, name)?;
        let state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .policy
            .decide(state.outcomes, state.failures, state.trained_on))
    }

    /// Makes a newly trained model the serving one.
    fn swap(&self, store: &Store, name: &str, model: Model, version: u32) -> Result<()> {
        let learning = self.replica(store, name)?;
        let trained = outcomes_seen(&model.header);
        learning.predictor.replace(Predictor::new(model));
        let mut state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
        state.version = Some(version);
        state.trained_on = Some(trained);
        state.model_error = None;
        Ok(())
    }

    fn status(&self, store: &Store, name: &str) -> Result<ModelStatusJson> {
        let learning = self.replica(store, name)?;
        let (outcomes, failures, trained_on, model_error) = {
            let state = learning.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                state.outcomes,
                state.failures,
                state.trained_on,
                state.model_error.clone(),
            )
        };
        // A damaged model record is reported, not an error of the status itself.
        let (record, model_error) = match store.model_records(name) {
            Ok(mut records) => (records.pop(), model_error),
            Err(error) => (None, Some(error.to_string())),
        };
        let header: Option<ModelHeader> = record
            .as_ref()
            .and_then(|record| serde_json::from_str(&record.summary).ok());
        let model = learning.predictor.current().model().map(|m| m.id.clone());
        let (retrain, retrain_detail) = match self.policy.decide(outcomes, failures, trained_on) {
            RetrainDecision::Wait { outcomes_needed } if model.is_some() => (
                "keep",
                format!(
                    "{outcomes_needed} more outcome(s) before the node retrains by itself (this model was trained by hand)"
                ),
            ),
            RetrainDecision::Wait { outcomes_needed } => (
                "wait",
                format!(
                    "{outcomes_needed} more outcome(s), with failures and successes among them, before a first model"
                ),
            ),
            RetrainDecision::Keep {
                new_outcomes_needed,
            } => (
                "keep",
                format!("{new_outcomes_needed} more new outcome(s) before the next training"),
            ),
            RetrainDecision::Train => ("train", "enough new outcomes to train".to_string()),
        };
        let time = |ns: u64| Instant(i64::try_from(ns).unwrap_or(i64::MAX)).to_string();
        Ok(ModelStatusJson {
            replica: name.to_string(),
            version: record.as_ref().map(|record| record.version),
            model,
            created: record.as_ref().map(|record| record.created.to_string()),
            trained_examples: header.as_ref().map(|h| h.trained_examples),
            training_first: header.as_ref().map(|h| time(h.training_first_ns)),
            training_last: header.as_ref().map(|h| time(h.training_last_ns)),
            held_out: header.as_ref().map(|h| h.held_out),
            outcomes,
            failures,
            retrain: retrain.to_string(),
            retrain_detail,
            model_error,
            training_ms: None,
        })
    }
}

fn prediction_json(
    proposal: Hash,
    ops: &[usize],
    prediction: Prediction,
    model_error: Option<String>,
    inference_us: u64,
) -> PredictionJson {
    PredictionJson {
        proposal: proposal.to_hex(),
        ops: ops.to_vec(),
        p_error: prediction.p_error,
        confidence: prediction.confidence,
        abstain: prediction.abstain,
        resource_deltas: prediction.resource_deltas,
        affected: prediction.affected,
        explanation: prediction.explanation,
        model: prediction.model,
        model_error,
        inference_us,
    }
}

fn truncate_text(text: &mut String, bytes: usize) {
    if text.len() > bytes {
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn bound_lines(lines: &mut Vec<String>) {
    lines.truncate(VIEW_LINES_MAX);
    for line in lines {
        truncate_text(line, VIEW_LINE_BYTES_MAX);
    }
}

/// Makes a view's JSON fit in a record: keeps fewer changed lines per op, then fewer
/// base keys per file, halving each bound in turn, until it does (the label and the ops'
/// kinds, paths and keys stay longest). A bounded number of passes.
pub fn fit_view(view: &mut ProposalView, bytes_max: usize) {
    let fits = |view: &ProposalView| serde_json::to_vec(view).is_ok_and(|v| v.len() <= bytes_max);
    let mut lines = VIEW_LINES_MAX;
    while !fits(view) && lines > 0 {
        lines /= 2;
        for op in &mut view.ops {
            op.lines_added.truncate(lines);
            op.lines_removed.truncate(lines);
        }
    }
    let mut keys = VIEW_BASE_KEYS_MAX;
    while !fits(view) && keys > 0 {
        keys /= 2;
        for file in &mut view.base_files {
            file.keys.truncate(keys);
        }
    }
    if !fits(view) {
        view.dependents.clear();
    }
    while !fits(view) && !view.ops.is_empty() {
        view.ops.truncate(view.ops.len() / 2);
    }
}

/// Lines a unified diff adds and removes.
pub fn patch_lines(unified_diff: &str) -> (Vec<String>, Vec<String>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for line in unified_diff.lines() {
        if line.starts_with("+++") || line.starts_with("---") {
            continue;
        }
        if let Some(rest) = line.strip_prefix('+') {
            added.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix('-') {
            removed.push(rest.to_string());
        }
    }
    (added, removed)
}

/// Lines `new` adds to `old` and lines it removes (a line diff).
pub fn line_changes(old: &str, new: &str) -> (Vec<String>, Vec<String>) {
    if old.is_empty() {
        return (new.lines().map(str::to_string).collect(), Vec::new());
    }
    let patch = diffy::create_patch(old, new);
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for hunk in patch.hunks() {
        for line in hunk.lines() {
            match line {
                diffy::Line::Insert(text) => added.push(text.trim_end_matches('\n').to_string()),
                diffy::Line::Delete(text) => {
                    removed.push(text.trim_end_matches('\n').to_string());
                }
                diffy::Line::Context(_) => {}
            }
        }
    }
    (added, removed)
}

/// Every stored outcome of a replica, oldest first.
pub fn outcomes(store: &Store, name: &str) -> Result<Vec<(Hash, OutcomeEntry)>> {
    let mut entries: Vec<(Hash, OutcomeEntry)> = store.records(RecordFamily::Outcome, name)?;
    entries.sort_by_key(|(id, entry)| (entry.time, *id));
    Ok(entries)
}

/// Outcomes a model saw: those it trained on and those held out to calibrate it (what
/// the retraining policy compares new outcomes against).
fn outcomes_seen(header: &ModelHeader) -> usize {
    header.trained_examples + header.held_out.examples
}

fn load_replica(store: &Store, name: &str) -> Result<ReplicaLearning> {
    store.replica(name)?;
    let mut state = LearnState::default();
    let (predictor, model_error) = match store.latest_model(name) {
        Ok(None) => (Predictor::untrained(), None),
        Ok(Some((record, bytes))) => {
            state.version = Some(record.version);
            let (predictor, error) = Predictor::from_bytes_or_abstain(&bytes);
            let error = error.map(|error| format!("model version {}: {error}", record.version));
            (predictor, error)
        }
        Err(error) => (Predictor::untrained(), Some(error.to_string())),
    };
    state.trained_on = predictor.model().map(|m| outcomes_seen(&m.header));
    state.model_error = model_error;
    for (id, entry) in outcomes(store, name)? {
        state.known.insert(id);
        state.outcomes += 1;
        state.failures += usize::from(entry.failed);
        // Sorted by time, so never out of order.
        let _ = state.history.record(&entry.example);
    }
    Ok(ReplicaLearning {
        predictor: SharedPredictor::new(predictor),
        state: Mutex::new(state),
    })
}

impl crate::Service<'_> {
    /// Predicts the outcome of a proposal's chosen ops (all when `None`) and stores the
    /// prediction, to be scored when the outcome arrives.
    pub fn predict(
        &self,
        name: &str,
        id: &str,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Result<PredictionJson> {
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        self.predict_proposal(&replica, &proposal, chosen, party)
    }

    /// The prediction shown beside `propose`, `sandbox` and `commit`: a failure to predict
    /// never stops them (the prediction is then absent; `kairos predict` names the error).
    pub fn prediction_for(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Option<PredictionJson> {
        self.predict_proposal(replica, proposal, chosen, party).ok()
    }

    /// [`Service::prediction_for`] by names, for a commit about to begin.
    pub fn prediction_before_commit(
        &self,
        name: &str,
        id: &str,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Option<PredictionJson> {
        let replica = self.store.replica(name).ok()?;
        let proposal = self.proposal(name, id).ok()?;
        self.prediction_for(&replica, &proposal, chosen, party)
    }

    pub(crate) fn predict_proposal(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        chosen: Option<&[usize]>,
        party: &str,
    ) -> Result<PredictionJson> {
        let ops: Vec<usize> = kairos_sandbox::select_ops(proposal, chosen)?
            .into_iter()
            .map(|(index, _)| index)
            .collect();
        let now = Instant::now();
        let prediction = self
            .learner
            .predict(self.store, replica, proposal, &ops, now)?;
        let entry = PredictionEntry {
            proposal: proposal.id,
            ops: ops.clone(),
            time: now,
            party: party.to_string(),
            prediction: Prediction {
                p_error: prediction.p_error,
                confidence: prediction.confidence,
                abstain: prediction.abstain,
                resource_deltas: prediction.resource_deltas,
                affected: prediction.affected.clone(),
                explanation: prediction.explanation.clone(),
                model: prediction.model.clone(),
            },
        };
        self.store.submit(
            &Command::new(
                now,
                &replica.name,
                &proposal.timeline,
                party,
                Change::PutRecord {
                    family: RecordFamily::Prediction,
                    id: prediction_id(&proposal.id, &ops, now),
                    record: RecordBody::of(&entry)?,
                },
            )
            .with_audit(AuditEvent::Prediction(PredictionEvent {
                proposal: proposal.id,
                ops,
                p_error: f64::from(prediction.p_error),
                confidence: f64::from(prediction.confidence),
                abstain: prediction.abstain,
                model: prediction.model.clone(),
            })),
        )?;
        Ok(prediction)
    }

    /// Stores the outcome a sandbox's check gave (nothing when no check ran).
    pub(crate) fn record_sandbox_outcome(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        report: &SandboxReport,
        record_id: Hash,
        time: Instant,
        party: &str,
    ) -> Result<()> {
        let Some(check) = &report.check else {
            return Ok(());
        };
        let detail = if check.timed_out {
            format!("check timed out after {} ms", check.duration_ms)
        } else {
            match check.exit_code {
                Some(code) => format!("check exited {code} after {} ms", check.duration_ms),
                None => format!("check was killed after {} ms", check.duration_ms),
            }
        };
        self.store_outcome(
            replica,
            proposal,
            OutcomeDraft {
                ops: report.ops.clone(),
                source: OutcomeSource::Sandbox,
                source_id: record_id,
                time,
                failed: !check.passed,
                detail,
                duration_ms: Some(check.duration_ms),
                peak_memory_bytes: Some(check.peak_memory_bytes),
                cpu_percent_delta: None,
                rss_bytes_delta: None,
            },
            party,
        )
    }

    /// Stores the outcome of a commit that ended (committed, rolled back or failed); a
    /// conflict or a revert is no outcome of a proposal.
    pub(crate) fn record_commit_outcome(&self, record: &CommitRecord) -> Result<()> {
        let Some(proposal_id) = record.proposal else {
            return Ok(());
        };
        // A crash recovery judged nothing about the change.
        if record
            .rollback
            .as_ref()
            .is_some_and(|rollback| rollback.recovered)
        {
            return Ok(());
        }
        let failed = match record.status {
            CommitStatus::Committed => false,
            CommitStatus::RolledBack | CommitStatus::Failed => true,
            _ => return Ok(()),
        };
        let replica = self.store.replica(&record.replica)?;
        let proposal = self.proposal(&record.replica, &proposal_id.to_hex())?;
        let detail = match (&record.rollback, &record.note) {
            (Some(rollback), _) => format!("rolled back: {}", rollback.evidence),
            (None, Some(note)) => format!("{}: {note}", record.status),
            (None, None) => record.status.to_string(),
        };
        let (cpu, rss) = if failed {
            (None, None)
        } else {
            resource_deltas(self.store, record).unwrap_or((None, None))
        };
        let time = record.finished.unwrap_or(record.started);
        self.store_outcome(
            &replica,
            &proposal,
            OutcomeDraft {
                ops: record.ops.clone(),
                source: OutcomeSource::Commit,
                source_id: record.commit,
                time,
                failed,
                detail,
                duration_ms: record
                    .finished
                    .map(|end| u64::try_from((end.0 - record.started.0) / 1_000_000).unwrap_or(0)),
                peak_memory_bytes: None,
                cpu_percent_delta: cpu,
                rss_bytes_delta: rss,
            },
            &record.party,
        )
    }

    fn store_outcome(
        &self,
        replica: &ReplicaDefinition,
        proposal: &Proposal,
        draft: OutcomeDraft,
        party: &str,
    ) -> Result<()> {
        let id = outcome_id(&draft.source_id);
        if self
            .store
            .record::<serde_json::Value>(RecordFamily::Outcome, &replica.name, &id)?
            .is_some()
        {
            return Ok(());
        }
        // The view is as of the proposal's creation: what a prediction before anything
        // ran could see.
        let mut view = self.learner.proposal_view(
            self.store,
            replica,
            proposal,
            &draft.ops,
            proposal.created,
        )?;
        fit_view(&mut view, RECORD_BYTES_MAX);
        let entry = OutcomeEntry {
            proposal: proposal.id,
            ops: draft.ops.clone(),
            source: draft.source,
            source_id: draft.source_id,
            time: draft.time,
            failed: draft.failed,
            detail: draft.detail,
            duration_ms: draft.duration_ms,
            peak_memory_bytes: draft.peak_memory_bytes,
            example: OutcomeRecord {
                proposal: view,
                outcome: Outcome {
                    time_ns: nanos(draft.time),
                    failed: draft.failed,
                    cpu_percent_delta: draft.cpu_percent_delta,
                    rss_bytes_delta: draft.rss_bytes_delta,
                },
            },
        };
        self.store.submit(
            &Command::new(
                draft.time,
                &replica.name,
                &proposal.timeline,
                party,
                Change::PutRecord {
                    family: RecordFamily::Outcome,
                    id,
                    record: RecordBody::of(&entry)?,
                },
            )
            .with_audit(AuditEvent::Outcome(OutcomeEvent {
                proposal: proposal.id,
                ops: draft.ops,
                source: match draft.source {
                    OutcomeSource::Sandbox => "sandbox".into(),
                    OutcomeSource::Commit => "commit".into(),
                },
                failed: draft.failed,
            })),
        )?;
        self.learner.observe(&replica.name, id, &entry);
        Ok(())
    }

    /// Stores the outcomes of sandbox checks and ended commits that have none yet (a
    /// crash between a record and its outcome, or records older than the predictor).
    pub fn backfill_outcomes(&self, name: &str) -> Result<usize> {
        let replica = self.store.replica(name)?;
        let before = outcomes(self.store, name)?.len();
        let mut sandboxes: Vec<(Hash, SandboxReport)> =
            self.store.records(RecordFamily::Sandbox, name)?;
        sandboxes.retain(|(_, report)| report.check.is_some());
        for (id, report) in sandboxes {
            if self
                .store
                .record::<serde_json::Value>(RecordFamily::Outcome, name, &outcome_id(&id))?
                .is_some()
            {
                continue;
            }
            let Ok(proposal) = self.proposal(name, &report.proposal.to_hex()) else {
                continue;
            };
            let time = report.created.unwrap_or(proposal.created);
            // One record that cannot become an example never stops the others.
            let _ = self.record_sandbox_outcome(
                &replica,
                &proposal,
                &report,
                id,
                time,
                kairos_store::SYSTEM_PARTY,
            );
        }
        let commits: Vec<(Hash, serde_json::Value)> =
            self.store.records(RecordFamily::Commit, name)?;
        for (_, value) in commits {
            // Records of every version parse; one that does not is no example.
            let Ok(record) = serde_json::from_value::<CommitRecord>(value) else {
                continue;
            };
            let _ = self.record_commit_outcome(&record);
        }
        self.learner.forget(name);
        Ok(outcomes(self.store, name)?.len() - before)
    }

    /// Trains a model on the replica's outcomes (the most recent fifth held out for
    /// calibration and the held-out figures), stores it as the next version and makes it
    /// the serving one.
    pub fn train_model(&self, name: &str, party: &str) -> Result<ModelStatusJson> {
        party_name(party)?;
        self.backfill_outcomes(name)?;
        let entries = outcomes(self.store, name)?;
        let records: Vec<OutcomeRecord> = entries
            .iter()
            .map(|(_, entry)| entry.example.clone())
            .collect();
        let failures = records.iter().filter(|r| r.outcome.failed).count();
        let refuse = |reason: String| LearnError::Training {
            replica: name.to_string(),
            outcomes: records.len(),
            failures,
            reason,
        };
        if failures == 0 || failures == records.len() {
            return Err(refuse(format!(
                "a model needs failures and successes among them, and all {} {}",
                records.len(),
                if failures == 0 { "passed" } else { "failed" }
            ))
            .into());
        }
        // Nothing new since the serving model (outcomes are never removed, so the same
        // count is the same outcomes): keep it rather than store a copy.
        if let Some(header) = self.learner.serving_model(self.store, name)?
            && outcomes_seen(&header) == records.len()
        {
            let mut status = self.learner.status(self.store, name)?;
            status.retrain_detail = format!(
                "no new outcomes since the serving model was trained; it is kept ({})",
                status.retrain_detail
            );
            return Ok(status);
        }
        let examples = examples_from_records(&records);
        let train_end = examples.len() - (examples.len() as f64 * CALIBRATION_SHARE) as usize;
        let started = std::time::Instant::now();
        let model = kairos_predict::train(
            &examples[..train_end],
            &examples[train_end..],
            &self.learner.training,
        )
        .map_err(|error| LearnError::Training {
            replica: name.to_string(),
            outcomes: records.len(),
            failures,
            reason: error.to_string(),
        })?;
        let training_ms = started.elapsed().as_millis() as u64;
        let bytes = model.to_bytes().map_err(|error| LearnError::Training {
            replica: name.to_string(),
            outcomes: records.len(),
            failures,
            reason: error.to_string(),
        })?;
        let summary = serde_json::to_string(&model.header).unwrap_or_default();
        let now = Instant::now();
        let record = self
            .store
            .put_model(name, now, &bytes, &summary)
            .map_err(|error| LearnError::Store(error.to_string()))?;
        self.store.submit(
            &Command::new(
                now,
                name,
                kairos_core::spec::MAIN_TIMELINE,
                party,
                Change::Event,
            )
            .with_audit(AuditEvent::Model(ModelEvent {
                version: record.version,
                model: model.id.clone(),
                examples: model.header.trained_examples,
                held_out_auc: model.header.held_out.auc,
            })),
        )?;
        self.learner.swap(self.store, name, model, record.version)?;
        let mut status = self.learner.status(self.store, name)?;
        status.training_ms = Some(training_ms);
        Ok(status)
    }

    pub fn model_status(&self, name: &str) -> Result<ModelStatusJson> {
        self.learner.status(self.store, name)
    }

    /// The stored predictions scored against the outcomes that followed them, beside two
    /// baselines on the same outcomes: the majority class of the outcomes before each one,
    /// and the per-key historical failure rate.
    pub fn model_report(&self, name: &str) -> Result<ModelReportJson> {
        self.store.replica(name)?;
        let entries = outcomes(self.store, name)?;
        let predictions: Vec<(Hash, PredictionEntry)> =
            self.store.records(RecordFamily::Prediction, name)?;
        let mut by_proposal: HashMap<(Hash, Vec<usize>), Vec<&PredictionEntry>> = HashMap::new();
        for (_, entry) in &predictions {
            by_proposal
                .entry((entry.proposal, entry.ops.clone()))
                .or_default()
                .push(entry);
        }
        let mut history = History::new();
        let (mut p, mut confidence, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        let (mut majority, mut per_key) = (Vec::new(), Vec::new());
        let mut abstained = 0usize;
        let (mut seen, mut seen_failed) = (0usize, 0usize);
        for (_, entry) in &entries {
            let latest = by_proposal
                .get(&(entry.proposal, entry.ops.clone()))
                .and_then(|list| {
                    list.iter()
                        .filter(|prediction| prediction.time <= entry.time)
                        .max_by_key(|prediction| prediction.time)
                });
            if let Some(prediction) = latest {
                p.push(prediction.prediction.p_error);
                confidence.push(prediction.prediction.confidence);
                failed.push(entry.failed);
                abstained += usize::from(prediction.prediction.abstain);
                let rate = (seen_failed as f32 + 1.0) / (seen as f32 + 2.0);
                majority.push(if rate >= 0.5 { 1.0 - 1e-3 } else { 1e-3 });
                per_key.push(kairos_predict::features::entry_failure_rate(
                    &entry.example.proposal,
                    &history,
                ));
            }
            seen += 1;
            seen_failed += usize::from(entry.failed);
            let _ = history.record(&entry.example);
        }
        let decisive = |p: &[f32]| -> Vec<f32> {
            p.iter()
                .map(|&p| (2.0 * p.max(1.0 - p) - 1.0).clamp(0.0, 1.0))
                .collect()
        };
        Ok(ModelReportJson {
            replica: name.to_string(),
            outcomes: entries.len(),
            predictions: predictions.len(),
            scored: p.len(),
            abstained,
            model: ScoredJson {
                name: "model".into(),
                report: metrics::report(&p, &confidence, &failed),
            },
            baselines: vec![
                ScoredJson {
                    name: "majority class".into(),
                    report: metrics::report(&majority, &decisive(&majority), &failed),
                },
                ScoredJson {
                    name: "per-key failure rate".into(),
                    report: metrics::report(&per_key, &decisive(&per_key), &failed),
                },
            ],
        })
    }

    /// Ranks candidate values of one config key by predicted risk, then by the predicted
    /// effect on `objective` (`cpu` or `rss`, lower first).
    pub fn suggest(
        &self,
        name: &str,
        file: &str,
        key: &str,
        values: &[String],
        objective: Option<&str>,
    ) -> Result<Vec<SuggestionJson>> {
        if values.is_empty() {
            return Err(LearnError::Suggest("give at least one value".into()).into());
        }
        if values.len() > SUGGEST_VALUES_MAX {
            return Err(LearnError::Suggest(format!(
                "{} values given; at most {SUGGEST_VALUES_MAX} are ranked at once",
                values.len()
            ))
            .into());
        }
        if file.trim().is_empty() || key.trim().is_empty() {
            return Err(LearnError::Suggest("give both a file and a key".into()).into());
        }
        if let Some(position) = values.iter().position(|value| value.trim().is_empty()) {
            return Err(LearnError::Suggest(format!(
                "value {} is empty (values are separated by commas)",
                position + 1
            ))
            .into());
        }
        if !matches!(objective, None | Some("cpu" | "rss")) {
            return Err(LearnError::Suggest(format!(
                "objective {:?} is not cpu or rss",
                objective.unwrap_or_default()
            ))
            .into());
        }
        let replica = self.store.replica(name)?;
        let head = self
            .store
            .head(name, kairos_core::spec::MAIN_TIMELINE)?
            .ok_or_else(|| LearnError::Suggest(format!("replica {name:?} has no frame yet")))?;
        let view = kairos_replay::open_frame(self.store, head.clone())?;
        let reader = self.store.reader()?;
        let limits = kairos_core::Limits::default();
        let entry = view
            .lookup(&reader, file.as_bytes(), &limits)
            .map_err(|error| LearnError::Suggest(format!("{file:?}: {error}")))?;
        let Body::File {
            config: Some(config),
            ..
        } = &entry.body
        else {
            return Err(LearnError::Suggest(format!(
                "{file:?} is not a config file Kairos parses"
            ))
            .into());
        };
        let node = reader.node::<ConfigNode>(&Hash(*config), ObjectKind::Config)?;
        let keys: Vec<(String, String)> = node
            .keys
            .into_iter()
            .map(|key| (key.key, key.value))
            .collect();
        drop(reader);
        let now = nanos(Instant::now());
        let index = self.learner.base_index(
            self.store,
            &self.store.reader()?,
            &view,
            &replica.root.to_string_lossy(),
        );
        let views: Vec<ProposalView> = values
            .iter()
            .map(|value| ProposalView {
                time_ns: now,
                ops: vec![OpView::set_config(file, key, value)],
                base_files: vec![FileView {
                    path: file.to_string(),
                    keys: keys.clone(),
                }],
                diff: DiffSummary {
                    files_changed: 1,
                    keys_changed: 1,
                    ..DiffSummary::default()
                },
                dependents: index.dependents(file),
                trend: index.trend,
            })
            .collect();
        let predictions = self.learner.predict_views(self.store, name, &views)?;
        let mut out: Vec<SuggestionJson> = values
            .iter()
            .zip(predictions)
            .map(|(value, prediction)| SuggestionJson {
                value: value.clone(),
                p_error: prediction.p_error,
                confidence: prediction.confidence,
                abstain: prediction.abstain,
                cpu_percent: prediction.resource_deltas.cpu_percent,
                rss_bytes: prediction.resource_deltas.rss_bytes,
                explanation: prediction.explanation,
            })
            .collect();
        let effect = |suggestion: &SuggestionJson| match objective {
            Some("cpu") => suggestion.cpu_percent.map_or(0.0, f64::from),
            Some("rss") => suggestion.rss_bytes.unwrap_or(0.0),
            _ => 0.0,
        };
        // Abstentions last; then lower risk; then the smaller effect.
        out.sort_by(|left, right| {
            left.abstain
                .cmp(&right.abstain)
                .then(left.p_error.total_cmp(&right.p_error))
                .then(effect(left).total_cmp(&effect(right)))
        });
        Ok(out)
    }
}

struct OutcomeDraft {
    ops: Vec<usize>,
    source: OutcomeSource,
    source_id: Hash,
    time: Instant,
    failed: bool,
    detail: String,
    duration_ms: Option<u64>,
    peak_memory_bytes: Option<u64>,
    cpu_percent_delta: Option<f32>,
    rss_bytes_delta: Option<f64>,
}

/// Frames used on each side of a commit to measure its resource change.
const RESOURCE_FRAMES_MAX: usize = 32;

/// The change of the replica's mean CPU and RSS over a commit's watch window against the
/// same length of time before it, from the runtime series (or the frames of its timeline).
fn resource_deltas(store: &Store, record: &CommitRecord) -> Result<(Option<f32>, Option<f64>)> {
    let (Some(finished), Some(frame)) = (record.finished, record.frame) else {
        return Ok((None, None));
    };
    let applied = store.frame(&frame)?.time;
    let window = (finished.0 - applied.0).max(1);
    let windows = [
        (record.started.0 - window, record.started.0 - 1),
        (applied.0, finished.0),
    ];
    // The runtime series when it covers both windows (captures of an unchanged state store
    // no frame), else the frames' own metrics: up to `RESOURCE_FRAMES_MAX` newest frames of
    // each window, one bounded scan of the time index each.
    let series = |(from, to): (i64, i64)| {
        series_mean(store, &record.replica, from, to).map(|(cpu, rss, _)| (cpu, rss))
    };
    let reader = store.reader()?;
    let frames = |(from, to): (i64, i64)| -> Option<(f64, f64)> {
        let mut sums = (0.0, 0.0, 0usize);
        for frame in store
            .frames_before(
                &record.replica,
                &record.timeline,
                Instant(to),
                RESOURCE_FRAMES_MAX,
            )
            .ok()?
            .into_iter()
            .filter(|frame| frame.time.0 >= from)
        {
            let view = kairos_replay::open_frame(store, frame).ok()?;
            let runtime = view.runtime(&reader).ok()?;
            sums.0 += runtime.metrics.cpu_percent;
            sums.1 += runtime.metrics.memory_rss_bytes as f64;
            sums.2 += 1;
        }
        (sums.2 > 0).then(|| (sums.0 / sums.2 as f64, sums.1 / sums.2 as f64))
    };
    let (before, after) = match (series(windows[0]), series(windows[1])) {
        (Some(before), Some(after)) => (Some(before), Some(after)),
        _ => (frames(windows[0]), frames(windows[1])),
    };
    Ok(match (before, after) {
        (Some(before), Some(after)) => {
            (Some((after.0 - before.0) as f32), Some(after.1 - before.1))
        }
        _ => (None, None),
    })
}

fn party_name(party: &str) -> Result<()> {
    crate::party(party).map(|_| ())
}

/// Why a predictor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(
        "replica {replica:?}: cannot train a model from {outcomes} outcome(s) ({failures} failed): {reason}; outcomes come from sandbox checks (`kairos sandbox R P --run-check`) and commits"
    )]
    Training {
        replica: String,
        outcomes: usize,
        failures: usize,
        reason: String,
    },
    #[error("storing the model: {0}")]
    Store(String),
    #[error("suggest: {0}")]
    Suggest(String),
}

impl From<LearnError> for OpsError {
    fn from(error: LearnError) -> OpsError {
        OpsError::Learn(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_and_line_changes_name_the_changed_lines() {
        let (added, removed) =
            patch_lines("--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n keep\n-gzip on;\n+gzip maybe;\n");
        assert_eq!(added, vec!["gzip maybe;"]);
        assert_eq!(removed, vec!["gzip on;"]);
        let (added, removed) = line_changes("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(added, vec!["B", "d"]);
        assert_eq!(removed, vec!["b"]);
        let (added, removed) = line_changes("", "x = 1\n");
        assert_eq!((added, removed), (vec!["x = 1".to_string()], Vec::new()));
    }

    #[test]
    fn an_enormous_view_is_cut_to_fit_a_record() {
        let line = "x".repeat(200);
        let mut view = ProposalView {
            ops: (0..300)
                .map(|index| OpView {
                    kind: Some(OpKind::PutFile),
                    path: format!("conf/{index}.conf"),
                    lines_added: vec![line.clone(); 200],
                    ..OpView::default()
                })
                .collect(),
            base_files: vec![FileView {
                path: "many.toml".into(),
                keys: (0..5000)
                    .map(|k| (format!("key{k}"), line.clone()))
                    .collect(),
            }],
            ..ProposalView::default()
        };
        fit_view(&mut view, RECORD_BYTES_MAX);
        assert!(serde_json::to_vec(&view).unwrap().len() <= RECORD_BYTES_MAX);
        assert!(!view.ops.is_empty());
        let mut text = "ééé".to_string();
        truncate_text(&mut text, 4);
        assert_eq!(text, "éé");
    }

    #[test]
    fn include_keys_and_dependents() {
        assert!(is_include_key("http.include"));
        assert!(is_include_key("include#2"));
        assert!(is_include_key(
            "$IncludeConfig"[1..].trim_end_matches("Config")
        ));
        assert!(!is_include_key("server.listen"));
        let index = BaseIndex {
            root: "/srv/web".into(),
            processes: vec![
                (
                    "nginx".into(),
                    vec!["nginx".into(), "-c".into(), "/srv/web/nginx.conf".into()],
                ),
                (
                    "redis-server".into(),
                    vec!["redis-server".into(), "/etc/redis.conf".into()],
                ),
            ],
            includes: vec![("nginx.conf".into(), "conf.d/*.conf".into())],
            trend: None,
        };
        assert_eq!(
            index.dependents("conf.d/site.conf"),
            vec![
                "nginx.conf (includes conf.d/site.conf)".to_string(),
                "process nginx".to_string()
            ]
        );
        assert_eq!(
            index.dependents("nginx.conf"),
            vec!["process nginx".to_string()]
        );
        assert!(index.dependents("other.txt").is_empty());
    }

    #[test]
    fn the_resource_trend_comes_from_the_runtime_series_before_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("svc");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("app.toml"), "a = 1\n").unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        let replica = kairos_core::ReplicaDefinition::new("svc", root);
        store.add_replica(&replica).unwrap();
        let report = kairos_capture::capture(
            &store,
            &kairos_capture::CaptureRequest {
                replica: &replica,
                timeline: "main",
                limits: kairos_core::Limits::default(),
                skip: vec![],
            },
        )
        .unwrap();
        let base = report.frame;
        let view = kairos_replay::open_frame(&store, base.clone()).unwrap();
        let reader = store.reader().unwrap();
        // No series before the base and a single frame: no trend.
        assert!(resource_trend(&store, &reader, &view).is_none());
        for seconds in 1..=10 {
            let mut sample = kairos_store::series::Sample::new(
                Instant(base.time.0 - seconds * 1_000_000_000),
                base.id,
            );
            sample.cpu_percent = 40.0;
            sample.cpu_percent_max = 40.0;
            sample.memory_rss_bytes = 1 << 20;
            sample.memory_rss_bytes_max = 1 << 20;
            store.record_sample("svc", &sample).unwrap();
        }
        let reader = store.reader().unwrap();
        let trend = resource_trend(&store, &reader, &view).expect("a trend from the series");
        // The replica has no processes: its CPU fell from the series' 40 % to 0.
        assert!((trend.cpu_percent_change + 40.0).abs() < 1e-3, "{trend:?}");
        assert!(trend.rss_log_ratio < -10.0, "{trend:?}");
    }
}
