//! Features: a pure function from a proposal (ops, base values of the entries it touches,
//! sandbox diff summary) and the history of earlier outcomes to a fixed-size `f32` vector.
//! Tokens of paths, keys and changed lines are hashed into a fixed number of buckets, so an
//! enormous proposal costs a bounded amount of work and never grows the vector. With a
//! `Trace`, every contribution is labelled with the entry it came from, for explanations.

use crate::history::History;
use crate::view::{OpKind, OpView, ProposalView};

/// The length of every feature vector.
pub const FEATURE_DIM: usize = 640;
/// Ops looked at (the counts still count all of them).
pub const OPS_MAX: usize = 256;
/// Changed lines looked at per op.
pub const LINES_PER_OP_MAX: usize = 256;
/// Tokens looked at per line / path / key.
pub const TOKENS_PER_LINE_MAX: usize = 24;
/// Bytes of a token that are hashed; longer tokens are cut.
pub const TOKEN_BYTES_MAX: usize = 64;
/// Config key changes looked at per proposal.
pub const KEY_CHANGES_MAX: usize = 64;
/// Keys of a touched config file that enter the file context.
pub const CONTEXT_KEYS_PER_FILE_MAX: usize = 128;
/// Structural tokens (paths, keys) kept for the novelty measure.
pub const STRUCTURAL_TOKENS_MAX: usize = 64;

// Layout of the vector.
const OP_KIND: usize = 0; // 6 counts
const OP_COUNT: usize = 6;
const FILE_COUNT: usize = 7;
const LINES_ADDED: usize = 8;
const LINES_REMOVED: usize = 9;
const DIFF_BYTES_ADDED: usize = 10;
const DIFF_BYTES_REMOVED: usize = 11;
const DIFF_KEYS_CHANGED: usize = 12;
const DIFF_FILES_CHANGED: usize = 13;
const DEPENDENTS: usize = 14;
const EMPTY_PROPOSAL: usize = 15;
const VALUE_NUMBER: usize = 16;
const VALUE_BOOL: usize = 17;
const VALUE_TEXT: usize = 18;
const VALUE_EMPTY: usize = 19;
const VALUE_REMOVED: usize = 20;
const VALUE_NEW_KEY: usize = 21;
const VALUE_MAGNITUDE: usize = 22;
const VALUE_NEGATIVE: usize = 23;
const VALUE_ZERO: usize = 24;
const VALUE_FRACTION: usize = 25;
const VALUE_ABOVE_U16: usize = 26;
const VALUE_ABOVE_I32: usize = 27;
const VALUE_LOG_RATIO: usize = 28;
const VALUE_LOG_RATIO_ABS: usize = 29;
const VALUE_BOOL_FLIP: usize = 30;
const VALUE_TYPE_CHANGE: usize = 31;
const VALUE_TEXT_WAS_WORD: usize = 32;
const TREND_CPU: usize = 33;
const TREND_RSS: usize = 34;
const TREND_KNOWN: usize = 35;
const HISTORY_OVERALL_RATE: usize = 40;
const HISTORY_ENTRY_RATE_MAX: usize = 41;
const HISTORY_ENTRY_SEEN_MIN: usize = 42;
const HISTORY_ENTRY_UNSEEN: usize = 43;
const HISTORY_PAIR_RATE_MAX: usize = 44;
const HISTORY_PAIR_UNSEEN_TEXT: usize = 45;
const HISTORY_PAIR_UNSEEN_NUMBER: usize = 46;
const HISTORY_KEY_VALUES_DISTINCT: usize = 47;
const HISTORY_TOKEN_RATE_MAX: usize = 48;
const HISTORY_TOKEN_UNSEEN: usize = 49;
const HISTORY_TOKEN_UNSEEN_FRACTION: usize = 50;
const HISTORY_NONE: usize = 51;
/// The dense features (not hashed): the novelty measure's z-scores look at these.
pub const DENSE_END: usize = 64;
const CONTEXT_START: usize = 64;
const CONTEXT_BUCKETS: usize = 96;
const RELATION_START: usize = CONTEXT_START + CONTEXT_BUCKETS;
const RELATION_BUCKETS: usize = 128;
const TOKEN_START: usize = RELATION_START + RELATION_BUCKETS;
const TOKEN_BUCKETS: usize = FEATURE_DIM - TOKEN_START;

// Hash namespaces.
const NS_PATH: u8 = 1;
const NS_KEY: u8 = 2;
const NS_LINE_ADDED: u8 = 3;
const NS_LINE_REMOVED: u8 = 4;
const NS_OP_FILE: u8 = 5;
const NS_CONTEXT: u8 = 6;
const NS_ENTRY: u8 = 7;
const NS_PAIR: u8 = 8;
const NS_VALUE: u8 = 9;
const NS_TOKEN_HISTORY: u8 = 10;
const NS_NEW_VALUE: u8 = 11;
const NS_RELATION: u8 = 12;

/// What a group of features came from, for explanations.
#[derive(Debug, Clone, PartialEq)]
pub enum Label {
    OpKind(OpKind),
    Size,
    KeyChange {
        file: String,
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
    LineToken {
        file: String,
        token: String,
        added: bool,
    },
    PathToken {
        file: String,
        token: String,
    },
    Context {
        file: String,
        key: String,
        value: String,
    },
    History,
    Trend,
}

impl Label {
    /// `nginx.conf: line token "maybe"`, `nginx.conf: key listen 8080→70000`.
    pub fn render(&self) -> String {
        match self {
            Label::OpKind(kind) => format!("op kind {}", kind.name()),
            Label::Size => "size of the change".into(),
            Label::KeyChange {
                file,
                key,
                old,
                new,
            } => {
                let old = old.as_deref().unwrap_or("(unset)");
                let new = new.as_deref().unwrap_or("(unset)");
                format!("{file}: key {key} {old}→{new}")
            }
            Label::LineToken { file, token, added } => {
                let which = if *added { "line" } else { "removed line" };
                format!("{file}: {which} token {token:?}")
            }
            Label::PathToken { file, token } => format!("{file}: path token {token:?}"),
            Label::Context { file, key, value } => format!("{file}: key {key} = {value}"),
            Label::History => "past outcomes of the touched entries".into(),
            Label::Trend => "the replica's resource trend before the base".into(),
        }
    }
}

/// The labelled contributions of one featurisation: `x[index] = Σ amount` over its parts.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub labels: Vec<Label>,
    /// (label index, feature index, amount)
    pub parts: Vec<(u32, u32, f32)>,
}

/// A featurised proposal.
#[derive(Debug, Clone)]
pub struct Features {
    pub values: Vec<f32>,
    /// Hashes of the paths' and keys' tokens, for the novelty measure (bounded).
    pub structural: Vec<u64>,
}

/// One config key change, from a `set_config`/`unset_config` or from `key value` lines a
/// patch adds or removes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyChange<'a> {
    pub file: &'a str,
    pub key: &'a str,
    pub old: Option<&'a str>,
    pub new: Option<&'a str>,
}

/// The shape of a config value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueShape {
    Empty,
    Bool(bool),
    Number(f64),
    Text,
}

pub fn value_shape(value: &str) -> ValueShape {
    let value = unquote(value);
    if value.is_empty() {
        return ValueShape::Empty;
    }
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "enabled" => return ValueShape::Bool(true),
        "off" | "false" | "no" | "disabled" => return ValueShape::Bool(false),
        _ => {}
    }
    match value.parse::<f64>() {
        Ok(number) if number.is_finite() => ValueShape::Number(number),
        _ => ValueShape::Text,
    }
}

fn unquote(value: &str) -> &str {
    let value = value.trim();
    let bytes = value.as_bytes();
    if bytes.len() >= 2
        && (bytes[0] == b'"' || bytes[0] == b'\'')
        && bytes[bytes.len() - 1] == bytes[0]
    {
        &value[1..value.len() - 1]
    } else {
        value
    }
}

/// `worker_processes 4;`, `port = 8080`, `level: info` → (key, value). Comments, blank
/// lines and lines that are not one key and one value give `None`.
pub fn parse_key_value_line(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with("//") || line.starts_with(';') {
        return None;
    }
    let line = line.strip_suffix(';').unwrap_or(line).trim_end();
    let split = line.find(['=', ':', ' ', '\t'])?;
    let key = line[..split].trim();
    let value = line[split + 1..]
        .trim_start_matches(['=', ':', ' ', '\t'])
        .trim();
    let key_ok = !key.is_empty()
        && key.len() <= TOKEN_BYTES_MAX
        && key
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
    if !key_ok || value.contains(char::is_whitespace) && !value.starts_with('"') {
        return None;
    }
    Some((key, value))
}

/// Calls `each` for every key change of the proposal (bounded by `KEY_CHANGES_MAX`).
pub fn for_each_key_change<'a>(proposal: &'a ProposalView, mut each: impl FnMut(&KeyChange<'a>)) {
    let mut seen = 0usize;
    for op in proposal.ops.iter().take(OPS_MAX) {
        if seen >= KEY_CHANGES_MAX {
            return;
        }
        match op.kind {
            Some(OpKind::SetConfig | OpKind::UnsetConfig) => {
                let Some(key) = op.key.as_deref() else {
                    continue;
                };
                let change = KeyChange {
                    file: &op.path,
                    key,
                    old: base_value(proposal, &op.path, key),
                    new: if op.kind == Some(OpKind::SetConfig) {
                        op.value.as_deref()
                    } else {
                        None
                    },
                };
                each(&change);
                seen += 1;
            }
            Some(OpKind::PatchFile | OpKind::PutFile) => {
                seen += line_changes(proposal, op, KEY_CHANGES_MAX - seen, &mut each);
            }
            _ => {}
        }
    }
}

fn line_changes<'a>(
    proposal: &'a ProposalView,
    op: &'a OpView,
    budget: usize,
    each: &mut impl FnMut(&KeyChange<'a>),
) -> usize {
    let removed = || {
        op.lines_removed
            .iter()
            .take(LINES_PER_OP_MAX)
            .filter_map(|line| parse_key_value_line(line))
    };
    let mut count = 0;
    for (key, new) in op
        .lines_added
        .iter()
        .take(LINES_PER_OP_MAX)
        .filter_map(|line| parse_key_value_line(line))
    {
        if count >= budget {
            return count;
        }
        let old = removed()
            .find(|(old_key, _)| *old_key == key)
            .map(|(_, value)| value)
            .or_else(|| base_value(proposal, &op.path, key));
        if old == Some(new) {
            continue;
        }
        each(&KeyChange {
            file: &op.path,
            key,
            old,
            new: Some(new),
        });
        count += 1;
    }
    for (key, old) in removed() {
        if count >= budget {
            return count;
        }
        let still_there = op
            .lines_added
            .iter()
            .take(LINES_PER_OP_MAX)
            .filter_map(|line| parse_key_value_line(line))
            .any(|(new_key, _)| new_key == key);
        if !still_there {
            each(&KeyChange {
                file: &op.path,
                key,
                old: Some(old),
                new: None,
            });
            count += 1;
        }
    }
    count
}

fn base_value<'a>(proposal: &'a ProposalView, file: &str, key: &str) -> Option<&'a str> {
    proposal
        .base_files
        .iter()
        .find(|base| base.path == file)
        .and_then(|base| base.keys.iter().find(|(name, _)| name == key))
        .map(|(_, value)| value.as_str())
}

/// The history identity of a file: its path, or for generated names (a digit in the file
/// name, like `migrations/0042_add_index.sql`) its directory and extension.
pub fn file_class(path: &str) -> (&str, &str) {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.bytes().any(|byte| byte.is_ascii_digit()) {
        let extension = name.rsplit_once('.').map(|(_, ext)| ext).unwrap_or("");
        (dir, extension)
    } else {
        (path, "")
    }
}

/// Entries a proposal touches, as history identities (file classes and file keys).
pub fn entry_hashes(proposal: &ProposalView) -> Vec<u64> {
    let mut hashes = Vec::new();
    for op in proposal.ops.iter().take(OPS_MAX) {
        let (class, extension) = file_class(&op.path);
        let file = hash_parts(NS_ENTRY, &[class, extension, ""]);
        if !hashes.contains(&file) {
            hashes.push(file);
        }
    }
    for_each_key_change(proposal, |change| {
        let key = key_hash(change);
        if !hashes.contains(&key) {
            hashes.push(key);
        }
    });
    hashes
}

/// The history identity of a config key.
pub fn key_hash(change: &KeyChange<'_>) -> u64 {
    let (class, extension) = file_class(change.file);
    hash_parts(NS_ENTRY, &[class, extension, change.key])
}

/// The history identity of a value set for a key.
pub fn pair_hash(change: &KeyChange<'_>, value: &str) -> u64 {
    let (class, extension) = file_class(change.file);
    hash_parts(NS_PAIR, &[class, extension, change.key, unquote(value)])
}

pub fn value_hash(value: &str) -> u64 {
    hash_parts(NS_VALUE, &[unquote(value)])
}

/// Calls `each` with the history identity of every non-numeric token of added lines.
pub fn for_each_line_token(proposal: &ProposalView, mut each: impl FnMut(u64)) {
    for op in proposal.ops.iter().take(OPS_MAX) {
        let (class, extension) = file_class(&op.path);
        let file = hash_parts(NS_TOKEN_HISTORY, &[class, extension]);
        for line in op.lines_added.iter().take(LINES_PER_OP_MAX) {
            for token in tokens(line).take(TOKENS_PER_LINE_MAX) {
                if !is_number(token) {
                    each(mix(file ^ hash_token(NS_TOKEN_HISTORY, token)));
                }
            }
        }
    }
}

/// Entries the proposal touches, named for people: paths, `file:key`, dependents.
pub fn affected(proposal: &ProposalView) -> Vec<String> {
    let mut affected: Vec<String> = Vec::new();
    for op in proposal.ops.iter().take(OPS_MAX) {
        let name = match (op.kind, &op.key) {
            (Some(OpKind::Action), _) => format!("action {}", op.path),
            (_, Some(key)) => format!("{}:{key}", op.path),
            _ => op.path.clone(),
        };
        if !affected.contains(&name) {
            affected.push(name);
        }
    }
    for_each_key_change(proposal, |change| {
        let name = format!("{}:{}", change.file, change.key);
        if !affected.contains(&name) {
            affected.push(name);
        }
    });
    for dependent in proposal.dependents.iter().take(OPS_MAX) {
        let name = format!("process {dependent}");
        if !affected.contains(&name) {
            affected.push(name);
        }
    }
    affected
}

/// The per-key baseline: the highest smoothed past failure rate among the config keys the
/// proposal changes, or among the files it touches when it changes no key seen before
/// (the fleet-wide rate when none was seen).
pub fn entry_failure_rate(proposal: &ProposalView, history: &History) -> f32 {
    let prior = history.overall_rate();
    let mut keys = Vec::new();
    for_each_key_change(proposal, |change| keys.push(key_hash(change)));
    let highest = |hashes: &[u64]| {
        hashes
            .iter()
            .map(|&hash| history.entry(hash))
            .filter(|counts| counts.outcomes > 0)
            .map(|counts| counts.smoothed_rate(prior))
            .fold(f32::NAN, f32::max)
    };
    let rate = highest(&keys);
    if !rate.is_nan() {
        return rate;
    }
    let rate = highest(&entry_hashes(proposal));
    if rate.is_nan() { prior } else { rate }
}

struct Sink<'t> {
    values: Vec<f32>,
    trace: Option<&'t mut Trace>,
    label: u32,
}

impl Sink<'_> {
    fn label(&mut self, make: impl FnOnce() -> Label) {
        if let Some(trace) = self.trace.as_deref_mut() {
            self.label = trace.labels.len() as u32;
            trace.labels.push(make());
        }
    }

    fn add(&mut self, index: usize, amount: f32) {
        if amount == 0.0 || !amount.is_finite() {
            return;
        }
        self.values[index] += amount;
        if let Some(trace) = self.trace.as_deref_mut() {
            trace.parts.push((self.label, index as u32, amount));
        }
    }

    /// Keeps the larger of the current value and `amount`, crediting it to the current label.
    fn max(&mut self, index: usize, amount: f32) {
        if !amount.is_finite() || amount <= self.values[index] {
            return;
        }
        self.values[index] = amount;
        if let Some(trace) = self.trace.as_deref_mut() {
            trace.parts.retain(|part| part.1 as usize != index);
            trace.parts.push((self.label, index as u32, amount));
        }
    }
}

/// Features of `proposal` given the outcomes that arrived strictly before it. Pure: the
/// same inputs give the same vector; outcomes at or after `proposal.time_ns` are ignored.
pub fn features(proposal: &ProposalView, outcomes: &[crate::view::OutcomeRecord]) -> Features {
    features_with(proposal, &History::before(outcomes, proposal.time_ns), None)
}

/// Features with a prepared history (which must hold only outcomes earlier than the
/// proposal; the trainer and the predictor keep it that way) and an optional trace.
pub fn features_with(
    proposal: &ProposalView,
    history: &History,
    trace: Option<&mut Trace>,
) -> Features {
    let mut sink = Sink {
        values: vec![0.0; FEATURE_DIM],
        trace,
        label: 0,
    };
    let mut structural = Vec::new();
    sizes(proposal, &mut sink);
    ops_and_tokens(proposal, &mut sink, &mut structural);
    key_changes(proposal, history, &mut sink, &mut structural);
    context(proposal, &mut sink);
    line_token_history(proposal, history, &mut sink);
    trend(proposal, &mut sink);
    Features {
        values: sink.values,
        structural,
    }
}

fn trend(proposal: &ProposalView, sink: &mut Sink<'_>) {
    let Some(trend) = proposal.trend else { return };
    sink.label(|| Label::Trend);
    let finite = |value: f32| if value.is_finite() { value } else { 0.0 };
    sink.add(
        TREND_CPU,
        (finite(trend.cpu_percent_change) / 10.0).clamp(-5.0, 5.0),
    );
    sink.add(TREND_RSS, finite(trend.rss_log_ratio).clamp(-5.0, 5.0));
    sink.add(TREND_KNOWN, 1.0);
}

fn log1p(value: f64) -> f32 {
    (value.max(0.0)).ln_1p() as f32
}

fn sizes(proposal: &ProposalView, sink: &mut Sink<'_>) {
    sink.label(|| Label::Size);
    let ops = &proposal.ops;
    sink.add(OP_COUNT, log1p(ops.len() as f64));
    let mut files: Vec<&str> = Vec::new();
    let (mut added, mut removed) = (0usize, 0usize);
    for op in ops.iter().take(OPS_MAX) {
        if !files.contains(&op.path.as_str()) {
            files.push(&op.path);
        }
        added += op.lines_added.len();
        removed += op.lines_removed.len();
    }
    sink.add(FILE_COUNT, log1p(files.len() as f64));
    sink.add(LINES_ADDED, log1p(added as f64));
    sink.add(LINES_REMOVED, log1p(removed as f64));
    let diff = proposal.diff;
    sink.add(DIFF_BYTES_ADDED, log1p(diff.bytes_added as f64) / 4.0);
    sink.add(DIFF_BYTES_REMOVED, log1p(diff.bytes_removed as f64) / 4.0);
    sink.add(DIFF_KEYS_CHANGED, log1p(diff.keys_changed as f64));
    sink.add(DIFF_FILES_CHANGED, log1p(diff.files_changed as f64));
    sink.add(DEPENDENTS, log1p(proposal.dependents.len() as f64));
    if ops.is_empty() {
        sink.add(EMPTY_PROPOSAL, 1.0);
    }
}

fn ops_and_tokens(proposal: &ProposalView, sink: &mut Sink<'_>, structural: &mut Vec<u64>) {
    let mut push_structural = |hash: u64| {
        if structural.len() < STRUCTURAL_TOKENS_MAX && !structural.contains(&hash) {
            structural.push(hash);
        }
    };
    for op in proposal.ops.iter().take(OPS_MAX) {
        let Some(kind) = op.kind else { continue };
        sink.label(|| Label::OpKind(kind));
        sink.add(OP_KIND + kind.index(), 1.0);
        let (class, extension) = file_class(&op.path);
        let op_file = hash_parts(NS_OP_FILE, &[kind.name(), class, extension]);
        sink.add(token_index(op_file), 1.0);
        for token in path_tokens(&op.path).take(TOKENS_PER_LINE_MAX) {
            let hash = hash_token(NS_PATH, token);
            push_structural(hash);
            sink.label(|| Label::PathToken {
                file: op.path.clone(),
                token: token.to_string(),
            });
            sink.add(token_index(hash), 1.0);
        }
        line_tokens(op, &op.lines_added, NS_LINE_ADDED, true, sink);
        line_tokens(op, &op.lines_removed, NS_LINE_REMOVED, false, sink);
    }
}

fn line_tokens(op: &OpView, lines: &[String], namespace: u8, added: bool, sink: &mut Sink<'_>) {
    for line in lines.iter().take(LINES_PER_OP_MAX) {
        for token in tokens(line).take(TOKENS_PER_LINE_MAX) {
            let hash = if is_number(token) {
                hash_parts(namespace, &["#number", digits_class(token)])
            } else {
                hash_token(namespace, token)
            };
            sink.label(|| Label::LineToken {
                file: op.path.clone(),
                token: token.to_string(),
                added,
            });
            sink.add(token_index(hash), 1.0);
        }
    }
}

fn key_changes(
    proposal: &ProposalView,
    history: &History,
    sink: &mut Sink<'_>,
    structural: &mut Vec<u64>,
) {
    let prior = history.overall_rate();
    sink.label(|| Label::History);
    sink.add(HISTORY_OVERALL_RATE, prior);
    if history.outcomes() == 0 {
        sink.add(HISTORY_NONE, 1.0);
    }
    let mut entry_seen_min = f32::INFINITY;
    for op in proposal.ops.iter().take(OPS_MAX) {
        let (class, extension) = file_class(&op.path);
        let counts = history.entry(hash_parts(NS_ENTRY, &[class, extension, ""]));
        sink.label(|| Label::History);
        sink.max(HISTORY_ENTRY_RATE_MAX, counts.smoothed_rate(prior));
        entry_seen_min = entry_seen_min.min(log1p(counts.outcomes as f64));
        if counts.outcomes == 0 {
            sink.add(HISTORY_ENTRY_UNSEEN, 1.0);
        }
    }
    let mut distinct_min = f32::INFINITY;
    for_each_key_change(proposal, |change| {
        sink.label(|| Label::KeyChange {
            file: change.file.to_string(),
            key: change.key.to_string(),
            old: change.old.map(str::to_string),
            new: change.new.map(str::to_string),
        });
        let (class, extension) = file_class(change.file);
        let key_token = hash_parts(NS_KEY, &[class, extension, change.key]);
        if structural.len() < STRUCTURAL_TOKENS_MAX && !structural.contains(&key_token) {
            structural.push(key_token);
        }
        sink.add(token_index(key_token), 1.0);
        value_shapes(change, sink);
        let counts = history.entry(key_hash(change));
        sink.max(HISTORY_ENTRY_RATE_MAX, counts.smoothed_rate(prior));
        entry_seen_min = entry_seen_min.min(log1p(counts.outcomes as f64));
        if counts.outcomes == 0 {
            sink.add(HISTORY_ENTRY_UNSEEN, 1.0);
        }
        let Some(new) = change.new else { return };
        let pair = history.pair(pair_hash(change, new));
        sink.max(HISTORY_PAIR_RATE_MAX, pair.smoothed_rate(prior));
        let (distinct, known) = history.key_values(key_hash(change), value_hash(new));
        distinct_min = distinct_min.min(log1p(distinct as f64));
        if !known {
            match value_shape(new) {
                ValueShape::Number(_) => sink.add(HISTORY_PAIR_UNSEEN_NUMBER, 1.0),
                _ => sink.add(HISTORY_PAIR_UNSEEN_TEXT, 1.0),
            }
        }
        let value_token = hash_parts(NS_NEW_VALUE, &[class, extension, change.key, unquote(new)]);
        sink.add(token_index(value_token), 1.0);
    });
    sink.label(|| Label::History);
    if entry_seen_min.is_finite() {
        sink.add(HISTORY_ENTRY_SEEN_MIN, entry_seen_min);
    }
    if distinct_min.is_finite() {
        sink.add(HISTORY_KEY_VALUES_DISTINCT, distinct_min);
    }
}

fn value_shapes(change: &KeyChange<'_>, sink: &mut Sink<'_>) {
    let Some(new) = change.new else {
        sink.add(VALUE_REMOVED, 1.0);
        return;
    };
    if change.old.is_none() {
        sink.add(VALUE_NEW_KEY, 1.0);
    }
    let old = change.old.map(value_shape);
    match value_shape(new) {
        ValueShape::Empty => sink.add(VALUE_EMPTY, 1.0),
        ValueShape::Bool(flag) => {
            sink.add(VALUE_BOOL, 1.0);
            if let Some(ValueShape::Bool(was)) = old
                && was != flag
            {
                sink.add(VALUE_BOOL_FLIP, 1.0);
            }
        }
        ValueShape::Number(number) => {
            sink.add(VALUE_NUMBER, 1.0);
            sink.add(VALUE_MAGNITUDE, (number.abs().ln_1p() / 10f64.ln()) as f32);
            if number < 0.0 {
                sink.add(VALUE_NEGATIVE, 1.0);
            }
            if number == 0.0 {
                sink.add(VALUE_ZERO, 1.0);
            }
            if number.fract() != 0.0 {
                sink.add(VALUE_FRACTION, 1.0);
            }
            if number.abs() > 65_535.0 {
                sink.add(VALUE_ABOVE_U16, 1.0);
            }
            if number.abs() > 2_147_483_647.0 {
                sink.add(VALUE_ABOVE_I32, 1.0);
            }
            if let Some(ValueShape::Number(was)) = old {
                let ratio = (number.abs().ln_1p() - was.abs().ln_1p()) as f32;
                sink.add(VALUE_LOG_RATIO, ratio);
                sink.add(VALUE_LOG_RATIO_ABS, ratio.abs());
            }
        }
        ValueShape::Text => {
            sink.add(VALUE_TEXT, 1.0);
            if matches!(old, Some(ValueShape::Text)) {
                sink.add(VALUE_TEXT_WAS_WORD, 1.0);
            }
        }
    }
    let same_type = matches!(
        (old, value_shape(new)),
        (None, _)
            | (Some(ValueShape::Number(_)), ValueShape::Number(_))
            | (Some(ValueShape::Bool(_)), ValueShape::Bool(_))
            | (Some(ValueShape::Text), ValueShape::Text)
            | (Some(ValueShape::Empty), ValueShape::Empty)
    );
    if !same_type {
        sink.add(VALUE_TYPE_CHANGE, 1.0);
    }
}

/// The numeric keys of every touched config file after the change, each hashed by name
/// into a bucket holding the sign-kept log of its value: the model sees the values that a
/// changed key works with (workers beside memory per worker and the memory limit).
///
/// For every changed key with a numeric value, the log-ratio of its new value to each
/// other numeric key of the same file goes into a bucket of the pair: relations between
/// keys of one file (a cache's maxmemory against its memory limit).
fn context(proposal: &ProposalView, sink: &mut Sink<'_>) {
    let mut changes: Vec<KeyChange<'_>> = Vec::new();
    for_each_key_change(proposal, |change| changes.push(*change));
    let last_change = |file: &str, key: &str| {
        changes
            .iter()
            .rev()
            .find(|change| change.file == file && change.key == key)
    };
    // The effective numeric values of each touched file, after the change.
    let mut numeric: Vec<(&str, &str, f64)> = Vec::new();
    for base in proposal.base_files.iter().take(OPS_MAX) {
        for (key, value) in base.keys.iter().take(CONTEXT_KEYS_PER_FILE_MAX) {
            let value = match last_change(&base.path, key) {
                Some(change) => change.new,
                None => Some(value.as_str()),
            };
            if let Some(value) = value {
                context_value(&base.path, key, value, sink);
                if let ValueShape::Number(number) = value_shape(value) {
                    numeric.push((&base.path, key, number));
                }
            }
        }
    }
    // Keys the proposal adds to a file (not among its base keys).
    for (index, change) in changes.iter().enumerate() {
        let is_last = !changes[index + 1..]
            .iter()
            .any(|later| later.file == change.file && later.key == change.key);
        let in_base = base_value(proposal, change.file, change.key).is_some();
        if let (true, false, Some(new)) = (is_last, in_base, change.new) {
            context_value(change.file, change.key, new, sink);
            if let ValueShape::Number(number) = value_shape(new) {
                numeric.push((change.file, change.key, number));
            }
        }
    }
    for change in &changes {
        let Some(ValueShape::Number(new)) = change.new.map(value_shape) else {
            continue;
        };
        sink.label(|| Label::KeyChange {
            file: change.file.to_string(),
            key: change.key.to_string(),
            old: change.old.map(str::to_string),
            new: change.new.map(str::to_string),
        });
        let (class, extension) = file_class(change.file);
        for &(file, key, other) in numeric.iter().take(CONTEXT_KEYS_PER_FILE_MAX) {
            if file != change.file || key == change.key {
                continue;
            }
            let bucket = hash_parts(NS_RELATION, &[class, extension, change.key, key]) as usize
                % RELATION_BUCKETS;
            let ratio = (new.abs().ln_1p() - other.abs().ln_1p()) as f32 / 4.0;
            sink.add(RELATION_START + bucket, ratio);
        }
    }
}

fn context_value(file: &str, key: &str, value: &str, sink: &mut Sink<'_>) {
    let ValueShape::Number(number) = value_shape(value) else {
        return;
    };
    sink.label(|| Label::Context {
        file: file.to_string(),
        key: key.to_string(),
        value: value.to_string(),
    });
    let (class, extension) = file_class(file);
    let bucket = hash_parts(NS_CONTEXT, &[class, extension, key]) as usize % CONTEXT_BUCKETS;
    let signed_log = (number.abs().ln_1p() as f32).copysign(number as f32) / 4.0;
    sink.add(CONTEXT_START + bucket, signed_log);
}

fn line_token_history(proposal: &ProposalView, history: &History, sink: &mut Sink<'_>) {
    let prior = history.overall_rate();
    let (mut total, mut unseen) = (0usize, 0usize);
    for op in proposal.ops.iter().take(OPS_MAX) {
        let (class, extension) = file_class(&op.path);
        let file = hash_parts(NS_TOKEN_HISTORY, &[class, extension]);
        for line in op.lines_added.iter().take(LINES_PER_OP_MAX) {
            for token in tokens(line).take(TOKENS_PER_LINE_MAX) {
                if is_number(token) {
                    continue;
                }
                let counts = history.token(mix(file ^ hash_token(NS_TOKEN_HISTORY, token)));
                sink.label(|| Label::LineToken {
                    file: op.path.clone(),
                    token: token.to_string(),
                    added: true,
                });
                sink.max(HISTORY_TOKEN_RATE_MAX, counts.smoothed_rate(prior));
                total += 1;
                if counts.outcomes == 0 {
                    unseen += 1;
                    sink.add(HISTORY_TOKEN_UNSEEN, 1.0);
                }
            }
        }
    }
    if total > 0 {
        sink.label(|| Label::History);
        sink.add(HISTORY_TOKEN_UNSEEN_FRACTION, unseen as f32 / total as f32);
    }
}

/// Words of a line: runs of letters, digits, `_`, `.` and `-`.
pub fn tokens(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .map(|token| token.trim_matches('.'))
        .filter(|token| !token.is_empty())
}

fn path_tokens(path: &str) -> impl Iterator<Item = &str> {
    path.split(['/', '.', '_', '-'])
        .filter(|token| !token.is_empty() && !is_number(token))
}

fn is_number(token: &str) -> bool {
    token.parse::<f64>().is_ok()
}

fn digits_class(token: &str) -> &'static str {
    match token.len() {
        0..=1 => "1",
        2 => "2",
        3 => "3",
        4 => "4",
        5 => "5",
        _ => "6+",
    }
}

fn token_index(hash: u64) -> usize {
    TOKEN_START + (hash % TOKEN_BUCKETS as u64) as usize
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes.iter().take(TOKEN_BYTES_MAX) {
        state ^= u64::from(byte.to_ascii_lowercase());
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

fn mix(mut value: u64) -> u64 {
    // splitmix64's finaliser.
    value ^= value >> 30;
    value = value.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value ^= value >> 27;
    value = value.wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

fn hash_token(namespace: u8, token: &str) -> u64 {
    mix(fnv(fnv(FNV_OFFSET, &[namespace]), token.as_bytes()))
}

fn hash_parts(namespace: u8, parts: &[&str]) -> u64 {
    let mut state = fnv(FNV_OFFSET, &[namespace]);
    for part in parts {
        state = fnv(state, part.as_bytes());
        state = fnv(state, &[0xff]);
    }
    mix(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{FileView, OpView, Outcome, OutcomeRecord};

    fn nginx(time_ns: u64, ops: Vec<OpView>) -> ProposalView {
        ProposalView {
            time_ns,
            ops,
            base_files: vec![FileView {
                path: "nginx.conf".into(),
                keys: vec![
                    ("worker_processes".into(), "4".into()),
                    ("gzip".into(), "on".into()),
                    ("listen".into(), "8080".into()),
                ],
            }],
            ..ProposalView::default()
        }
    }

    fn record(proposal: ProposalView, time_ns: u64, failed: bool) -> OutcomeRecord {
        OutcomeRecord {
            proposal,
            outcome: Outcome {
                time_ns,
                failed,
                ..Outcome::default()
            },
        }
    }

    #[test]
    fn line_words_matter() {
        let maybe = nginx(
            10,
            vec![OpView::patch_file(
                "nginx.conf",
                &["gzip maybe;"],
                &["gzip on;"],
            )],
        );
        let on = nginx(
            10,
            vec![OpView::patch_file(
                "nginx.conf",
                &["gzip on;"],
                &["gzip off;"],
            )],
        );
        assert_ne!(features(&maybe, &[]).values, features(&on, &[]).values);
    }

    #[test]
    fn fixed_size_for_empty_and_enormous_proposals() {
        let empty = ProposalView::default();
        let vector = features(&empty, &[]);
        assert_eq!(vector.values.len(), FEATURE_DIM);
        assert_eq!(vector.values[EMPTY_PROPOSAL], 1.0);

        // One op with 100 000 long lines, and 50 000 key edits.
        let line = "word ".repeat(40);
        let lines: Vec<&str> = std::iter::repeat_n(line.as_str(), 100_000).collect();
        let mut ops = vec![OpView::put_file("data/huge.txt", &lines)];
        ops.extend(
            (0..50_000).map(|index| OpView::set_config("app.toml", &format!("key{index}"), "1")),
        );
        let enormous = ProposalView {
            ops,
            ..ProposalView::default()
        };
        let start = std::time::Instant::now();
        let vector = features(&enormous, &[]);
        assert_eq!(vector.values.len(), FEATURE_DIM);
        assert!(vector.values.iter().all(|value| value.is_finite()));
        assert!(vector.structural.len() <= STRUCTURAL_TOKENS_MAX);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_resource_trend_is_bounded_and_labelled() {
        let plain = nginx(5, vec![OpView::set_config("nginx.conf", "gzip", "off")]);
        let mut rising = plain.clone();
        rising.trend = Some(crate::view::ResourceTrend {
            cpu_percent_change: 35.0,
            rss_log_ratio: f32::INFINITY,
        });
        let base = features(&plain, &[]);
        let mut trace = Trace::default();
        let trended = features_with(&rising, &History::new(), Some(&mut trace));
        assert_eq!(base.values[TREND_KNOWN], 0.0);
        assert_eq!(trended.values[TREND_KNOWN], 1.0);
        assert!((trended.values[TREND_CPU] - 3.5).abs() < 1e-6);
        // A value that is not finite counts as no change, never as infinity.
        assert_eq!(trended.values[TREND_RSS], 0.0);
        assert!(trended.values.iter().all(|value| value.is_finite()));
        assert!(
            trace
                .labels
                .iter()
                .any(|label| matches!(label, Label::Trend))
        );
        // Everything else is as without a trend.
        for (index, (left, right)) in base.values.iter().zip(&trended.values).enumerate() {
            if ![TREND_CPU, TREND_RSS, TREND_KNOWN].contains(&index) {
                assert_eq!(left, right, "feature {index}");
            }
        }
    }

    #[test]
    fn value_shapes_of_a_key_change() {
        let port = nginx(5, vec![OpView::set_config("nginx.conf", "listen", "70000")]);
        let vector = features(&port, &[]).values;
        assert_eq!(vector[VALUE_NUMBER], 1.0);
        assert_eq!(vector[VALUE_ABOVE_U16], 1.0);
        assert!(vector[VALUE_LOG_RATIO] > 2.0);
        let flip = nginx(5, vec![OpView::set_config("nginx.conf", "gzip", "off")]);
        assert_eq!(features(&flip, &[]).values[VALUE_BOOL_FLIP], 1.0);
        let typo = nginx(5, vec![OpView::set_config("nginx.conf", "gzip", "maybe")]);
        let vector = features(&typo, &[]).values;
        assert_eq!(vector[VALUE_TEXT], 1.0);
        assert_eq!(vector[VALUE_TYPE_CHANGE], 1.0);
        let unseen = nginx(5, vec![OpView::set_config("other.conf", "never.seen", "")]);
        let vector = features(&unseen, &[]).values;
        assert_eq!(vector[VALUE_EMPTY], 1.0);
        assert_eq!(vector[VALUE_NEW_KEY], 1.0);
    }

    #[test]
    fn patch_lines_are_key_changes() {
        let patch = nginx(
            5,
            vec![OpView::patch_file(
                "nginx.conf",
                &["listen 70000;"],
                &["listen 8080;"],
            )],
        );
        let mut changes = Vec::new();
        for_each_key_change(&patch, |change| {
            changes.push((
                change.key.to_string(),
                change.old.map(str::to_string),
                change.new.map(str::to_string),
            ));
        });
        assert_eq!(
            changes,
            vec![(
                "listen".to_string(),
                Some("8080".to_string()),
                Some("70000".to_string())
            )]
        );
    }

    #[test]
    fn past_failures_raise_the_entry_rate() {
        let proposal = |time| {
            nginx(
                time,
                vec![OpView::set_config("nginx.conf", "gzip", "maybe")],
            )
        };
        let history: Vec<OutcomeRecord> = (0..10)
            .map(|index| record(proposal(index), index + 1, true))
            .collect();
        let vector = features(&proposal(100), &history).values;
        assert!(vector[HISTORY_ENTRY_RATE_MAX] > 0.8);
        assert!(vector[HISTORY_PAIR_RATE_MAX] > 0.8);
        let none = features(&proposal(100), &[]).values;
        assert_eq!(none[HISTORY_NONE], 1.0);
    }

    #[test]
    fn no_leakage() {
        // Features of an example use only outcomes that arrived strictly before it: adding,
        // removing or flipping outcomes at or after its time changes nothing.
        let proposal = |time| {
            nginx(
                time,
                vec![OpView::set_config("nginx.conf", "gzip", "maybe")],
            )
        };
        let earlier: Vec<OutcomeRecord> = (0..5)
            .map(|index| record(proposal(index), index + 1, index % 2 == 0))
            .collect();
        let example = proposal(50);
        let base = features(&example, &earlier).values;
        let mut with_later = earlier.clone();
        with_later.push(record(proposal(40), 50, true)); // arrives at the example's instant
        with_later.push(record(proposal(45), 60, true));
        with_later.insert(0, record(proposal(49), 1_000, false));
        assert_eq!(features(&example, &with_later).values, base);
        let mut flipped = earlier.clone();
        flipped[4].outcome.failed = !flipped[4].outcome.failed;
        assert_ne!(features(&example, &flipped).values, base);
    }

    #[test]
    fn trace_sums_to_the_vector() {
        let proposal = nginx(
            5,
            vec![
                OpView::set_config("nginx.conf", "listen", "70000"),
                OpView::patch_file("nginx.conf", &["gzip maybe;"], &["gzip on;"]),
            ],
        );
        let mut trace = Trace::default();
        let vector = features_with(&proposal, &History::new(), Some(&mut trace));
        let mut summed = vec![0.0f32; FEATURE_DIM];
        for &(_, index, amount) in &trace.parts {
            summed[index as usize] += amount;
        }
        for (left, right) in summed.iter().zip(&vector.values) {
            assert!((left - right).abs() < 1e-4, "{left} vs {right}");
        }
        let rendered: Vec<String> = trace.labels.iter().map(Label::render).collect();
        assert!(rendered.contains(&"nginx.conf: line token \"maybe\"".to_string()));
        assert!(rendered.contains(&"nginx.conf: key listen 8080→70000".to_string()));
    }
}
