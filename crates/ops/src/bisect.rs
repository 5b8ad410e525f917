//! Bisect: which frame along a timeline first fails a check. The frames between a good
//! and a bad instant (the parent chain from the bad frame back to the good one) are
//! grouped into distinct states (consecutive frames with the same file tree are one
//! state, checked once); [`Bisection`], a decision without IO, says which state to check
//! next; [`Service::bisect`] materialises each one in a scratch directory and runs the
//! check there. A check that is not monotonic over the range (bad, then good again) is
//! reported with its transitions, never as one culprit.

use std::collections::HashMap;
use std::time::Duration;

use kairos_core::{Hash, Instant, TimelineSpec};
use kairos_replay::{ConfigChange, FileChange};
use kairos_sandbox::command;
use kairos_store::FrameRecord;
use serde::{Deserialize, Serialize};

use crate::{Result, Service};

/// The most frames a bisect range may hold (the parent chain is walked to build it).
pub const BISECT_FRAMES_MAX: usize = 1_000_000;

/// Why a bisect cannot start or had to stop: each names the problem.
#[derive(Debug, thiserror::Error)]
pub enum BisectError {
    #[error(
        "--good frame {good} ({good_time}) is after --bad frame {bad} ({bad_time}): give the earlier, passing frame as --good"
    )]
    GoodAfterBad {
        good: String,
        good_time: Instant,
        bad: String,
        bad_time: Instant,
    },
    #[error(
        "--good and --bad both name frame {0}: the range holds no frames to search (name an earlier --good or a later --bad)"
    )]
    EmptyRange(String),
    #[error(
        "--good frame {good} is not an earlier frame of --bad frame {bad}'s history (is it on another timeline? {bad} descends from {root})"
    )]
    NotAncestor {
        good: String,
        bad: String,
        root: String,
    },
    #[error("the range from {good} to {bad} holds more than {max} frames")]
    TooManyFrames {
        good: String,
        bad: String,
        max: usize,
    },
    #[error(
        "replica {0:?} declares no check command and none was given: set `check` in its configuration or pass --check COMMAND"
    )]
    NoCheck(String),
    #[error("--check is empty: give a command (`{{root}}` is replaced by the scratch copy's path)")]
    EmptyCheck,
    #[error("--timeout must be between 1 ms and 1 hour")]
    Timeout,
    #[error(
        "the check timed out after {timeout_ms} ms at frame {frame} (check {step} of the bisect); bisect stopped: make the check faster, or raise the replica's check_timeout or --timeout"
    )]
    CheckTimedOut {
        frame: String,
        timeout_ms: u64,
        step: usize,
    },
    #[error(
        "the check fails at --good frame {frame} already (exit {exit}): nothing to bisect; name a frame where it passes. Output: {output}"
    )]
    GoodFails {
        frame: String,
        exit: String,
        output: String,
    },
    #[error(
        "the check passes at --bad frame {frame}: nothing to bisect; name a frame where it fails"
    )]
    BadPasses { frame: String },
    #[error("running the check {command:?} at frame {frame}: {reason}")]
    Run {
        command: String,
        frame: String,
        reason: String,
    },
}

/// What the bisection wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Check this state (an index into the range's distinct states).
    Check(usize),
    Done,
}

/// A change of the check's result between two known states with nothing known between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub before: usize,
    pub after: usize,
    pub passed_before: bool,
    pub passed_after: bool,
}

/// The search over the distinct states of a range, without IO: states `0` (the good end)
/// and `last` (the bad end) are checked first; then every pair of neighbouring known
/// states with different results and unknown states between is split in the middle until
/// each transition lies between adjacent states. States asked for by [`Bisection::verify`]
/// (or every state, when exhaustive) are checked too, so a non-monotonic check shows up.
#[derive(Debug, Clone)]
pub struct Bisection {
    results: Vec<Option<bool>>,
    exhaustive: bool,
    probes: Vec<usize>,
}

impl Bisection {
    pub fn new(states: usize, exhaustive: bool) -> Bisection {
        assert!(states >= 1, "a bisection needs at least one state");
        Bisection {
            results: vec![None; states],
            exhaustive,
            probes: Vec::new(),
        }
    }

    pub fn states(&self) -> usize {
        self.results.len()
    }

    pub fn result(&self, state: usize) -> Option<bool> {
        self.results.get(state).copied().flatten()
    }

    pub fn record(&mut self, state: usize, passed: bool) {
        if let Some(slot) = self.results.get_mut(state) {
            *slot = Some(passed);
        }
    }

    /// Also checks these states (e.g. where the culprit's entries changed again).
    pub fn verify(&mut self, states: impl IntoIterator<Item = usize>) {
        self.probes
            .extend(states.into_iter().filter(|&s| s < self.results.len()));
    }

    /// Whether the ends were checked and are as a bisect needs them (good passes, bad fails).
    pub fn ends_ok(&self) -> bool {
        let last = self.results.len() - 1;
        self.results[0] == Some(true) && self.results[last] == Some(false)
    }

    pub fn next(&self) -> Next {
        let last = self.results.len() - 1;
        for end in [0, last] {
            if self.results[end].is_none() {
                return Next::Check(end);
            }
        }
        if !self.ends_ok() {
            return Next::Done;
        }
        if self.exhaustive
            && let Some(state) = self.results.iter().position(Option::is_none)
        {
            return Next::Check(state);
        }
        if let Some(&state) = self.probes.iter().find(|&&s| self.results[s].is_none()) {
            return Next::Check(state);
        }
        match self
            .transitions()
            .into_iter()
            .find(|t| t.after - t.before > 1)
        {
            Some(t) => Next::Check(t.before + (t.after - t.before) / 2),
            None => Next::Done,
        }
    }

    /// Every change of result between neighbouring known states, in order.
    pub fn transitions(&self) -> Vec<Transition> {
        let known: Vec<(usize, bool)> = self
            .results
            .iter()
            .enumerate()
            .filter_map(|(state, result)| result.map(|passed| (state, passed)))
            .collect();
        known
            .windows(2)
            .filter(|pair| pair[0].1 != pair[1].1)
            .map(|pair| Transition {
                before: pair[0].0,
                after: pair[1].0,
                passed_before: pair[0].1,
                passed_after: pair[1].1,
            })
            .collect()
    }

    /// The one pass→fail transition between adjacent states, when the check is monotonic
    /// over what was seen.
    pub fn culprit(&self) -> Option<Transition> {
        match self.transitions().as_slice() {
            [only] if only.passed_before && !only.passed_after && only.after == only.before + 1 => {
                Some(*only)
            }
            _ => None,
        }
    }
}

/// What to bisect and how.
#[derive(Debug, Clone)]
pub struct BisectRequest<'a> {
    pub good: &'a TimelineSpec,
    pub bad: &'a TimelineSpec,
    /// A command instead of the replica's check (`{root}` is the scratch copy).
    pub check: Option<&'a str>,
    /// How long one check may run [default: the replica's check timeout].
    pub timeout: Option<Duration>,
    /// Check every distinct state, not only those a binary search needs.
    pub exhaustive: bool,
}

/// One check run (or, with `same_state_as`, a result reused from an identical state).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BisectCheck {
    pub frame: Hash,
    pub passed: bool,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Milliseconds spent materialising the frame before the check ran.
    pub materialise_ms: u64,
}

/// What the culprit frame changed relative to the frame before it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CulpritJson {
    pub frame: Hash,
    pub parent: Hash,
    pub time: Instant,
    pub files: Vec<FileChange>,
    pub config: Vec<ConfigChange>,
}

/// A change of the check's result between two frames of the range.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransitionJson {
    /// The last frame checked (or sharing the state checked) before the change.
    pub before: Hash,
    /// The first frame after it.
    pub after: Hash,
    pub passed_before: bool,
    pub passed_after: bool,
    /// Whether `after` directly follows `before` (else frames between were not checked).
    pub adjacent: bool,
}

/// What `bisect` answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BisectReport {
    pub replica: String,
    /// The timeline of the --bad frame (a revert of the culprit is proposed on its head).
    pub timeline: String,
    pub good: Hash,
    pub bad: Hash,
    /// The check command template that ran.
    pub check: String,
    /// Frames in the range, both ends included.
    pub frames: usize,
    /// Distinct file states among them (frames with identical state are checked once).
    pub distinct_states: usize,
    /// Whether the check changed from passing to failing exactly once over what was
    /// checked. When false, `first_bad`, `last_good` and `culprit` are absent and
    /// `transitions` lists every change seen.
    pub monotonic: bool,
    pub first_bad: Option<Hash>,
    pub last_good: Option<Hash>,
    /// Check runs (materialise + check), both ends included.
    pub steps: usize,
    pub culprit: Option<CulpritJson>,
    pub transitions: Vec<TransitionJson>,
    pub checks: Vec<BisectCheck>,
}

/// The frames from `good` to `bad` along `bad`'s parent chain, oldest first (the kept
/// ones: a frame a forget removed is not in the chain).
pub fn frame_range(
    service: &Service<'_>,
    good: &FrameRecord,
    bad: &FrameRecord,
) -> Result<Vec<FrameRecord>> {
    if good.id == bad.id {
        return Err(BisectError::EmptyRange(good.id.short()).into());
    }
    if good.time > bad.time {
        return Err(BisectError::GoodAfterBad {
            good: good.id.short(),
            good_time: good.time,
            bad: bad.id.short(),
            bad_time: bad.time,
        }
        .into());
    }
    let mut chain = vec![bad.clone()];
    loop {
        let current = chain.last().expect("the chain starts with the bad frame");
        // A parent a forget removed is passed over: the chain holds the frames still kept.
        let Some(record) = service.store.previous_frame(current)? else {
            return Err(BisectError::NotAncestor {
                good: good.id.short(),
                bad: bad.id.short(),
                root: current.id.short(),
            }
            .into());
        };
        if record.id == good.id {
            chain.push(good.clone());
            break;
        }
        // Frame times strictly increase along a timeline: past the good frame's time,
        // it cannot be an ancestor.
        if record.time < good.time {
            return Err(BisectError::NotAncestor {
                good: good.id.short(),
                bad: bad.id.short(),
                root: record.id.short(),
            }
            .into());
        }
        chain.push(record);
        if chain.len() > BISECT_FRAMES_MAX {
            return Err(BisectError::TooManyFrames {
                good: good.id.short(),
                bad: bad.id.short(),
                max: BISECT_FRAMES_MAX,
            }
            .into());
        }
    }
    chain.reverse();
    Ok(chain)
}

/// The distinct states of a range: `(first frame, last frame, file tree of the first)` for
/// each run of consecutive frames whose files hold the same (kind, content, mode, owner;
/// times aside).
fn distinct_states(
    service: &Service<'_>,
    frames: &[FrameRecord],
) -> Result<Vec<(usize, usize, Hash)>> {
    let reader = service.store.reader()?;
    let mut states: Vec<(usize, usize, Hash)> = Vec::new();
    for (index, frame) in frames.iter().enumerate() {
        let root = reader
            .node::<kairos_store::node::RootNode>(&frame.root, kairos_store::ObjectKind::Root)?;
        let files = Hash(root.files);
        if let Some(last) = states.last_mut() {
            // Identical: the same tree, or trees that differ only in times (a file
            // rewritten with the same bytes): the materialised copies check the same.
            let same = last.2 == files || {
                let (changes, keys) = kairos_replay::diff_files(service.store, &last.2, &files)?;
                changes.is_empty() && keys.is_empty()
            };
            if same {
                last.1 = index;
                continue;
            }
        }
        states.push((index, index, files));
    }
    Ok(states)
}

/// The entry at `path` (components separated by `/`) in the file tree `tree`, without
/// following symlinks; `None` when there is none.
pub fn entry_at(
    reader: &kairos_store::Reader<'_>,
    tree: &Hash,
    path: &str,
) -> Result<Option<kairos_store::node::DirEntry>> {
    let mut dir = *tree;
    let mut parts = path.split('/').filter(|part| !part.is_empty()).peekable();
    while let Some(part) = parts.next() {
        let Some(entry) = reader.dir_lookup(&dir, part.as_bytes())? else {
            return Ok(None);
        };
        if parts.peek().is_none() {
            return Ok(Some(entry));
        }
        match entry.body {
            kairos_store::node::Body::Dir { node, .. } => dir = Hash(node),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Whether two entries hold the same thing (kind, content, link target, permission bits);
/// times and owners aside.
pub fn same_entry(
    a: Option<&kairos_store::node::DirEntry>,
    b: Option<&kairos_store::node::DirEntry>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            use kairos_store::node::Body;
            let body_same = match (&a.body, &b.body) {
                (Body::File { content: x, .. }, Body::File { content: y, .. }) => x == y,
                (Body::Dir { node: x, .. }, Body::Dir { node: y, .. }) => x == y,
                (x, y) => x == y,
            };
            body_same && a.meta.mode & 0o7777 == b.meta.mode & 0o7777
        }
        _ => false,
    }
}

/// How much of a failing --good check's output its error quotes (the end of it).
const GOOD_OUTPUT_CHARS_MAX: usize = 400;

/// Paths of the culprit followed through the range (the rest are not looked at).
const VERIFY_PATHS_MAX: usize = 256;

impl Service<'_> {
    /// Finds the first frame between `good` and `bad` at which the check fails.
    pub fn bisect(&self, name: &str, request: &BisectRequest<'_>) -> Result<BisectReport> {
        let replica = self.store.replica(name)?;
        let template = match request.check {
            Some(check) if check.trim().is_empty() => return Err(BisectError::EmptyCheck.into()),
            Some(check) => check.to_string(),
            None => replica
                .check
                .clone()
                .ok_or_else(|| BisectError::NoCheck(name.to_string()))?,
        };
        let timeout = match request.timeout {
            Some(timeout) if timeout.is_zero() || timeout > Duration::from_secs(3600) => {
                return Err(BisectError::Timeout.into());
            }
            Some(timeout) => timeout,
            None => Duration::from_millis(replica.check_timeout_ms),
        };
        let now = Instant::now();
        let good = self.store.resolve(name, request.good, now)?;
        let bad = self.store.resolve(name, request.bad, now)?;
        let frames = frame_range(self, &good, &bad)?;
        let states = distinct_states(self, &frames)?;
        let mut bisection = Bisection::new(states.len(), request.exhaustive);
        let mut checks: Vec<BisectCheck> = Vec::new();
        let mut good_output = String::new();
        let mut by_tree: HashMap<Hash, bool> = HashMap::new();
        let mut verified = false;
        loop {
            match bisection.next() {
                Next::Check(state) => {
                    let (first, _, tree) = states[state];
                    if let Some(&passed) = by_tree.get(&tree) {
                        bisection.record(state, passed);
                        continue;
                    }
                    let (check, output) =
                        self.check_frame(&frames[first], &template, timeout, checks.len() + 1)?;
                    if state == 0 {
                        good_output = output;
                    }
                    bisection.record(state, check.passed);
                    by_tree.insert(tree, check.passed);
                    checks.push(check);
                }
                Next::Done => {
                    if verified || !bisection.ends_ok() {
                        break;
                    }
                    verified = true;
                    if let Some(culprit) = bisection.culprit() {
                        let later = self.states_touching_culprit_entries(&states, culprit)?;
                        bisection.verify(later);
                    }
                }
            }
        }
        if bisection.result(0) == Some(false) {
            return Err(BisectError::GoodFails {
                frame: good.id.short(),
                exit: checks
                    .first()
                    .and_then(|check| check.exit_code)
                    .map_or_else(|| "by a signal".to_string(), |code| code.to_string()),
                output: {
                    // The end of the output says why; the message stays one line.
                    let text = good_output.trim().replace('\n', " | ");
                    let skip = text.chars().count().saturating_sub(GOOD_OUTPUT_CHARS_MAX);
                    text.chars().skip(skip).collect()
                },
            }
            .into());
        }
        if bisection.result(states.len() - 1) == Some(true) {
            return Err(BisectError::BadPasses {
                frame: bad.id.short(),
            }
            .into());
        }
        let transitions: Vec<TransitionJson> = bisection
            .transitions()
            .iter()
            .map(|t| TransitionJson {
                before: frames[states[t.before].1].id,
                after: frames[states[t.after].0].id,
                passed_before: t.passed_before,
                passed_after: t.passed_after,
                adjacent: t.after == t.before + 1,
            })
            .collect();
        let culprit = match bisection.culprit() {
            Some(t) => {
                let first_bad = &frames[states[t.after].0];
                let last_good = &frames[states[t.before].1];
                let (files, config) =
                    kairos_replay::diff_files(self.store, &states[t.before].2, &states[t.after].2)?;
                Some(CulpritJson {
                    frame: first_bad.id,
                    parent: last_good.id,
                    time: first_bad.time,
                    files,
                    config,
                })
            }
            None => None,
        };
        Ok(BisectReport {
            replica: name.to_string(),
            timeline: bad.timeline.clone(),
            good: good.id,
            bad: bad.id,
            check: template,
            frames: frames.len(),
            distinct_states: states.len(),
            monotonic: culprit.is_some(),
            first_bad: culprit.as_ref().map(|c| c.frame),
            last_good: culprit.as_ref().map(|c| c.parent),
            steps: checks.len(),
            culprit,
            transitions,
            checks,
        })
    }

    /// Materialises `frame` in a scratch directory and runs the check there.
    fn check_frame(
        &self,
        frame: &FrameRecord,
        template: &str,
        timeout: Duration,
        step: usize,
    ) -> Result<(BisectCheck, String)> {
        let run_error = |reason: String| BisectError::Run {
            command: template.to_string(),
            frame: frame.id.short(),
            reason,
        };
        let scratch = tempfile::Builder::new()
            .prefix("kairos-bisect-")
            .tempdir()
            .map_err(|error| run_error(format!("making a scratch directory: {error}")))?;
        let into = scratch.path().join("root");
        let started = std::time::Instant::now();
        let view = kairos_replay::open_frame(self.store, frame.clone())?;
        kairos_sandbox::materialise(self.store, &view, &into)?;
        let materialise_ms = started.elapsed().as_millis() as u64;
        let outcome = command::run(
            &command::expand(template, &into),
            &into,
            timeout,
            self.limits.command_output_bytes_max,
            true,
        )
        .map_err(|error| run_error(error.to_string()))?;
        if outcome.timed_out {
            return Err(BisectError::CheckTimedOut {
                frame: frame.id.short(),
                timeout_ms: timeout.as_millis() as u64,
                step,
            }
            .into());
        }
        Ok((
            BisectCheck {
                frame: frame.id,
                passed: outcome.passed,
                duration_ms: outcome.duration_ms,
                exit_code: outcome.exit_code,
                materialise_ms,
            },
            outcome.output,
        ))
    }

    /// The states, other than the culprit's, at which an entry the culprit changed
    /// changes too: where a check could turn (fail earlier and be fixed, or pass again
    /// later) without the binary search seeing it.
    fn states_touching_culprit_entries(
        &self,
        states: &[(usize, usize, Hash)],
        culprit: Transition,
    ) -> Result<Vec<usize>> {
        let (files, _) = kairos_replay::diff_files(
            self.store,
            &states[culprit.before].2,
            &states[culprit.after].2,
        )?;
        let paths: Vec<String> = files
            .into_iter()
            .map(|change| change.path)
            .take(VERIFY_PATHS_MAX)
            .collect();
        let reader = self.store.reader()?;
        let entries = |tree: &Hash| -> Result<Vec<Option<kairos_store::node::DirEntry>>> {
            paths
                .iter()
                .map(|path| entry_at(&reader, tree, path))
                .collect()
        };
        let mut previous = entries(&states[0].2)?;
        let mut found = Vec::new();
        for (state, (_, _, tree)) in states.iter().enumerate().skip(1) {
            let current = entries(tree)?;
            let changed = previous
                .iter()
                .zip(&current)
                .any(|(a, b)| !same_entry(a.as_ref(), b.as_ref()));
            if changed && state != culprit.after {
                // The state before the change may be the one that differs.
                found.push(state - 1);
                found.push(state);
            }
            previous = current;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a bisection against known results; returns the states checked, in order.
    fn run(results: &[bool], exhaustive: bool) -> (Bisection, Vec<usize>) {
        let mut bisection = Bisection::new(results.len(), exhaustive);
        let mut checked = Vec::new();
        while let Next::Check(state) = bisection.next() {
            assert!(!checked.contains(&state), "state {state} checked twice");
            checked.push(state);
            bisection.record(state, results[state]);
        }
        (bisection, checked)
    }

    #[test]
    fn a_monotonic_range_is_searched_in_logarithmic_steps() {
        for states in 2..=64usize {
            for culprit in 1..states {
                let results: Vec<bool> = (0..states).map(|s| s < culprit).collect();
                let (bisection, checked) = run(&results, false);
                let t = bisection.culprit().expect("a culprit");
                assert_eq!((t.before, t.after), (culprit - 1, culprit));
                let bound = 2 + (usize::BITS - (states - 2).max(1).leading_zeros()) as usize;
                assert!(
                    checked.len() <= bound,
                    "{states} states, culprit {culprit}: {} checks, bound {bound}",
                    checked.len()
                );
            }
        }
        // 20 frames, all different, the culprit at the 12th: at most 7 checks.
        let results: Vec<bool> = (1..=20).map(|frame| frame < 12).collect();
        let (bisection, checked) = run(&results, false);
        assert_eq!(bisection.culprit().map(|t| t.after), Some(11));
        assert!(checked.len() <= 7, "{checked:?}");
    }

    #[test]
    fn ends_are_checked_first_and_wrong_ends_stop_the_search() {
        let (bisection, checked) = run(&[false, true, false], false);
        assert_eq!(checked, vec![0, 2]);
        assert!(!bisection.ends_ok());
        let (bisection, checked) = run(&[true, false, true], false);
        assert_eq!(checked, vec![0, 2]);
        assert!(!bisection.ends_ok());
        assert!(bisection.culprit().is_none());
    }

    #[test]
    fn non_monotonic_results_are_transitions_not_a_culprit() {
        // pass, fail, pass again, then fail: exhaustive sees all three transitions.
        let results = [true, true, false, false, true, true, false, false];
        let (bisection, checked) = run(&results, true);
        assert_eq!(checked.len(), results.len());
        assert!(bisection.culprit().is_none());
        let found: Vec<(usize, usize, bool)> = bisection
            .transitions()
            .iter()
            .map(|t| (t.before, t.after, t.passed_after))
            .collect();
        assert_eq!(found, vec![(1, 2, false), (3, 4, true), (5, 6, false)]);
        // A binary search alone sees one transition; a verification probe where the
        // culprit's entries changed again reveals the others, each refined to adjacent states.
        let mut bisection = Bisection::new(results.len(), false);
        while let Next::Check(state) = bisection.next() {
            bisection.record(state, results[state]);
        }
        let first = bisection.culprit().expect("binary search alone finds one");
        assert!(first.after == 2 || first.after == 6);
        bisection.verify([4]);
        while let Next::Check(state) = bisection.next() {
            bisection.record(state, results[state]);
        }
        assert!(bisection.culprit().is_none());
        assert!(
            bisection
                .transitions()
                .iter()
                .all(|t| t.after == t.before + 1)
        );
        assert!(bisection.transitions().len() >= 2);
    }

    #[test]
    fn one_state_is_checked_once() {
        let (bisection, checked) = run(&[false], false);
        assert_eq!(checked, vec![0]);
        assert!(!bisection.ends_ok());
    }
}
