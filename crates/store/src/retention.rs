//! Forgetting frames: the plan of what a retention policy removes from a replica's
//! timelines and why, read from one view of the catalog. The plan is computed inside the
//! `Forget` command's apply (so it is guarded like every catalog change) and, for a dry
//! run, on its own.
//!
//! What is never forgotten, whatever the rules: every timeline head, the base of every
//! proposal not yet committed, the replica's last good frame, and every frame an
//! unfinished commit names (its base, the head it applied on, its last good frame). A
//! frame's record goes when its last time index entry goes; its objects stay until
//! garbage collection finds them unreachable.

use std::collections::{BTreeMap, HashMap, HashSet};

use kairos_core::{Hash, Instant, RetentionPolicy};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogError, parse_frame};
use crate::command::{good_key, pending_key};
use crate::keys;
use crate::kv::{KvSnapshot, scan_prefix};

/// Time index entries one `Forget` command removes at most: each is up to two deleted keys
/// of about 100 bytes, which FoundationDB counts about twice more (conflict ranges, the
/// store's prefix) against its 10 MB transactions; the caller repeats the command while
/// more remain.
pub const FORGET_ENTRIES_PER_COMMAND_MAX: usize = 5_000;
/// The name the plan gives frames on no timeline (a deleted fork's).
pub const UNLISTED: &str = "(no timeline)";
/// Keys read per page of a scan.
const PAGE: usize = 4_096;

/// The policy of one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRule {
    pub timeline: String,
    pub policy: RetentionPolicy,
}

/// One frame of a timeline in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFrame {
    pub id: Hash,
    pub time: Instant,
    /// Why it stays: the rules that keep it (`keep_last`, `keep_daily`, ...) and what
    /// still needs it (`head`, `last_good`, `proposal_base <id>`, `unfinished_commit <id>`).
    /// Empty for a forgotten frame.
    pub kept_by: Vec<String>,
}

/// What the policy does to one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelinePlan {
    pub timeline: String,
    pub policy: String,
    /// Frames kept and forgotten, newest first.
    pub kept: Vec<PlannedFrame>,
    pub forgotten: Vec<PlannedFrame>,
}

/// What one `Forget` command removes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ForgetPlan {
    pub timelines: Vec<TimelinePlan>,
    /// Time index entries removed (`timeline`, time key), oldest first, at most
    /// [`FORGET_ENTRIES_PER_COMMAND_MAX`].
    #[serde(skip)]
    pub entries: Vec<Vec<u8>>,
    /// Frame records removed: frames left on no timeline.
    pub frames_removed: Vec<Hash>,
    /// Whether more entries are to be removed than one command takes.
    pub more: bool,
    /// Keys the plan read, with their values: the command's guards (the last good frame,
    /// the pending commit; the audit head is guarded when the event is appended).
    #[serde(skip)]
    pub guards: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// The frames something still needs, each with the reason.
fn protections(
    view: &dyn KvSnapshot,
    replica: &str,
    guards: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> Result<HashMap<Hash, Vec<String>>, CatalogError> {
    let mut needed: HashMap<Hash, Vec<String>> = HashMap::new();
    let mut need = |id: Hash, why: String| needed.entry(id).or_default().push(why);
    for (key, value) in scan_prefix(view, &keys::head_prefix(replica), PAGE)? {
        if let Some(id) = Hash::from_slice(&value) {
            let timeline = String::from_utf8_lossy(&key[keys::head_prefix(replica).len()..]);
            need(id, format!("head of {timeline}"));
        }
        // Heads are not guarded: a head moves only forward, onto a frame appended after
        // this view, which the plan never names, and the head it leaves stays kept. So a
        // capture meanwhile does not make the forget plan again (a replica that changes
        // at every tick would otherwise starve it). A new head (a fork) comes with an
        // audit entry, and the audit head is guarded.
    }
    let good = view.get(&good_key(replica))?;
    if let Some(id) = good.as_deref().and_then(Hash::from_slice) {
        need(id, "last_good".into());
    }
    guards.push((good_key(replica), good));
    let pending = view.get(&pending_key(replica))?;
    if let Some(commit) = pending.as_deref().and_then(Hash::from_slice) {
        let key = keys::replica_record(keys::COMMIT, replica, commit.as_bytes());
        if let Some(record) = view.get(&key)? {
            for id in frame_ids_in(&record) {
                need(id, format!("unfinished_commit {}", commit.short()));
            }
        }
    }
    guards.push((pending_key(replica), pending));
    let mut committed = HashSet::new();
    for (_, value) in scan_prefix(view, &keys::replica_prefix(keys::COMMIT, replica), PAGE)? {
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&value) else {
            continue;
        };
        if record["status"] == "committed"
            && let Some(proposal) = record["proposal"].as_str()
        {
            committed.insert(proposal.to_string());
        }
    }
    for (_, value) in scan_prefix(view, &keys::replica_prefix(keys::PROPOSAL, replica), PAGE)? {
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&value) else {
            continue;
        };
        let id = record["id"].as_str().unwrap_or_default();
        if committed.contains(id) {
            continue;
        }
        if let Some(base) = record["base"].as_str().and_then(|b| b.parse::<Hash>().ok()) {
            need(base, format!("proposal_base {}", &id[..id.len().min(12)]));
        }
    }
    Ok(needed)
}

/// Every frame id a record names (as 64-digit hex strings), for protecting them.
fn frame_ids_in(record: &[u8]) -> Vec<Hash> {
    fn walk(value: &serde_json::Value, out: &mut Vec<Hash>) {
        match value {
            serde_json::Value::String(text) if text.len() == 64 => {
                if let Ok(id) = text.parse::<Hash>() {
                    out.push(id);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(map) => map.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::from_slice(record) {
        walk(&value, &mut out);
    }
    out
}

/// What `rules` forget from `replica`'s timelines on `view`.
/// With `unlisted`, frames of the replica on no timeline any more (the frames of deleted
/// forks, readable only by id) go too, unless something needs them.
pub fn plan_forget(
    view: &dyn KvSnapshot,
    replica: &str,
    rules: &[TimelineRule],
    unlisted: bool,
    entries_max: usize,
) -> Result<ForgetPlan, CatalogError> {
    let mut plan = ForgetPlan::default();
    let needed = protections(view, replica, &mut plan.guards)?;
    // Every time index entry of the replica, by frame: a frame's record goes only when no
    // timeline lists it any more.
    let prefix = keys::replica_prefix(keys::TIME, replica);
    let mut listed: HashMap<Hash, usize> = HashMap::new();
    let mut by_timeline: BTreeMap<String, Vec<(Vec<u8>, Hash)>> = BTreeMap::new();
    for (key, _) in scan_prefix(view, &prefix, PAGE)? {
        let rest = &key[prefix.len()..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            continue;
        };
        let Some(id) = keys::id_of_time_key(&key) else {
            continue;
        };
        *listed.entry(id).or_default() += 1;
        let timeline = String::from_utf8_lossy(&rest[..nul]).into_owned();
        by_timeline.entry(timeline).or_default().push((key, id));
    }
    let mut removed_entries: Vec<(Instant, Vec<u8>, Hash)> = Vec::new();
    for rule in rules {
        let entries = by_timeline.remove(&rule.timeline).unwrap_or_default();
        let mut frames = Vec::with_capacity(entries.len());
        for (key, id) in entries.into_iter().rev() {
            let time = time_of_key(&key, replica, &rule.timeline).ok_or_else(|| {
                CatalogError::Invalid(format!("time key of frame {} is malformed", id.short()))
            })?;
            frames.push((key, id, time));
        }
        let times: Vec<Instant> = frames.iter().map(|(_, _, time)| *time).collect();
        let by_rules = rule.policy.keep(&times);
        let mut timeline_plan = TimelinePlan {
            timeline: rule.timeline.clone(),
            policy: rule.policy.to_string(),
            kept: Vec::new(),
            forgotten: Vec::new(),
        };
        for ((key, id, time), reasons) in frames.into_iter().zip(by_rules) {
            let mut kept_by: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            if let Some(why) = needed.get(&id) {
                kept_by.extend(why.iter().cloned());
            }
            let planned = PlannedFrame { id, time, kept_by };
            if planned.kept_by.is_empty() {
                removed_entries.push((time, key, id));
                timeline_plan.forgotten.push(planned);
            } else {
                timeline_plan.kept.push(planned);
            }
        }
        plan.timelines.push(timeline_plan);
    }
    removed_entries.sort();
    plan.more = removed_entries.len() > entries_max;
    removed_entries.truncate(entries_max);
    let mut unlisted_removed = Vec::new();
    if unlisted {
        let mut timeline_plan = TimelinePlan {
            timeline: UNLISTED.to_string(),
            policy: "frames of deleted timelines".to_string(),
            kept: Vec::new(),
            forgotten: Vec::new(),
        };
        for (key, value) in scan_prefix(view, keys::FRAME, PAGE)? {
            let frame = parse_frame(&key, &value)?;
            if frame.replica != replica || listed.contains_key(&frame.id) {
                continue;
            }
            let kept_by = needed.get(&frame.id).cloned().unwrap_or_default();
            let planned = PlannedFrame {
                id: frame.id,
                time: frame.time,
                kept_by,
            };
            if !planned.kept_by.is_empty() {
                timeline_plan.kept.push(planned);
            } else if removed_entries.len() + unlisted_removed.len() < entries_max {
                unlisted_removed.push(frame.id);
                timeline_plan.forgotten.push(planned);
            } else {
                plan.more = true;
                timeline_plan.forgotten.push(planned);
            }
        }
        if !timeline_plan.kept.is_empty() || !timeline_plan.forgotten.is_empty() {
            timeline_plan
                .kept
                .sort_by_key(|f| std::cmp::Reverse(f.time));
            timeline_plan
                .forgotten
                .sort_by_key(|f| std::cmp::Reverse(f.time));
            plan.timelines.push(timeline_plan);
        }
    }
    let mut removed_per_frame: HashMap<Hash, usize> = HashMap::new();
    for (_, key, id) in removed_entries {
        *removed_per_frame.entry(id).or_default() += 1;
        plan.entries.push(key);
    }
    let mut frames_removed: Vec<Hash> = removed_per_frame
        .into_iter()
        .filter(|(id, removed)| listed.get(id) == Some(removed))
        .map(|(id, _)| id)
        .collect();
    frames_removed.extend(unlisted_removed);
    frames_removed.sort();
    for id in &frames_removed {
        // Frame records never change (their content is their id): no guard is needed, but
        // a record listed under this replica must be one of its frames.
        let key = keys::frame(id);
        if let Some(value) = view.get(&key)? {
            let frame = parse_frame(&key, &value)?;
            if frame.replica != replica {
                return Err(CatalogError::Invalid(format!(
                    "frame {} is listed on replica {replica:?} but belongs to {:?}",
                    id.short(),
                    frame.replica
                )));
            }
        }
    }
    plan.frames_removed = frames_removed;
    Ok(plan)
}

/// What forgetting exactly `frames` of `replica` removes: refused whole when a frame is
/// unknown, another replica's, or still needed (named with the reason).
pub fn plan_forget_frames(
    view: &dyn KvSnapshot,
    replica: &str,
    frames: &[Hash],
) -> Result<ForgetPlan, CatalogError> {
    let mut plan = ForgetPlan::default();
    let needed = protections(view, replica, &mut plan.guards)?;
    let mut entries: HashMap<Hash, Vec<Vec<u8>>> = HashMap::new();
    for (key, _) in scan_prefix(view, &keys::replica_prefix(keys::TIME, replica), PAGE)? {
        if let Some(id) = keys::id_of_time_key(&key) {
            entries.entry(id).or_default().push(key);
        }
    }
    for id in frames {
        let key = keys::frame(id);
        let Some(value) = view.get(&key)? else {
            return Err(CatalogError::NoSuchFrame {
                replica: replica.to_string(),
                prefix: id.to_hex(),
            });
        };
        let frame = parse_frame(&key, &value)?;
        if frame.replica != replica {
            return Err(CatalogError::NoSuchFrame {
                replica: replica.to_string(),
                prefix: id.to_hex(),
            });
        }
        if let Some(why) = needed.get(id) {
            return Err(CatalogError::Invalid(format!(
                "frame {} of replica {replica:?} is never forgotten: {}",
                id.short(),
                why.join(", ")
            )));
        }
        plan.entries.extend(entries.remove(id).unwrap_or_default());
        plan.frames_removed.push(*id);
    }
    Ok(plan)
}

/// The instant a time key of `replica`'s `timeline` names.
fn time_of_key(key: &[u8], replica: &str, timeline: &str) -> Option<Instant> {
    let prefix = keys::time_prefix(replica, timeline);
    let rest = key.strip_prefix(prefix.as_slice())?;
    Some(Instant::from_sortable_bytes(
        rest.get(..8)?.try_into().ok()?,
    ))
}

/// What `forget` did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ForgetReport {
    pub replica: String,
    pub dry_run: bool,
    pub timelines: Vec<TimelinePlan>,
    pub entries_removed: u64,
    pub frames_removed: u64,
    /// Commands it took (each one batch, each with its audit event).
    pub commands: u64,
}

impl crate::store::Store {
    /// Forgets what `rules` let go from `replica`'s timelines, in commands of at most
    /// [`FORGET_ENTRIES_PER_COMMAND_MAX`] entries; with `dry_run`, only says what would go.
    pub fn forget(
        &self,
        replica: &str,
        rules: &[TimelineRule],
        party: &str,
        now: Instant,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError> {
        self.forget_with(replica, rules, false, party, now, dry_run)
    }

    /// [`Store::forget`], and with `unlisted` also the replica's frames on no timeline
    /// (a deleted fork's) that nothing needs.
    pub fn forget_with(
        &self,
        replica: &str,
        rules: &[TimelineRule],
        unlisted: bool,
        party: &str,
        now: Instant,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError> {
        for rule in rules {
            rule.policy.validate().map_err(|error| {
                CatalogError::Invalid(format!("timeline {:?}: {error}", rule.timeline))
            })?;
        }
        self.replica(replica)?;
        let mut report = ForgetReport {
            replica: replica.to_string(),
            dry_run,
            ..ForgetReport::default()
        };
        if dry_run {
            let reader = self.reader()?;
            let plan = plan_forget(reader.snapshot(), replica, rules, unlisted, usize::MAX)?;
            report.timelines = plan.timelines;
            report.entries_removed = plan.entries.len() as u64;
            report.frames_removed = plan.frames_removed.len() as u64;
            return Ok(report);
        }
        // Each command removes the oldest entries first; the first plan is the whole answer.
        loop {
            let command = crate::command::Command::new(
                now,
                replica,
                kairos_core::spec::MAIN_TIMELINE,
                party,
                crate::command::Change::Forget {
                    rules: rules.to_vec(),
                    unlisted,
                },
            );
            let applied = self.submit(&command)?;
            let Some(plan) = applied.forgotten else {
                return Err(CatalogError::Invalid(
                    "a forget command returned no plan".into(),
                ));
            };
            if report.commands == 0 {
                report.timelines = plan.timelines.clone();
            }
            if plan.entries.is_empty() && plan.frames_removed.is_empty() {
                return Ok(report);
            }
            report.commands += 1;
            report.entries_removed += plan.entries.len() as u64;
            report.frames_removed += plan.frames_removed.len() as u64;
            if !plan.more {
                return Ok(report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kairos_core::{CommitStatus, KeepRule, ReplicaDefinition};

    use super::*;
    use crate::catalog::FrameDraft;
    use crate::command::{Change, Command, RecordBody, RecordFamily};
    use crate::store::{Store, WriteStats};

    const HOUR: i64 = 3_600_000_000_000;
    const DAY: i64 = 24 * HOUR;

    /// The rules, written the plain way: group frames by period, take the newest frame of
    /// each of the N newest periods.
    fn reference(policy: &RetentionPolicy, times: &[i64]) -> BTreeSet<usize> {
        let mut kept = BTreeSet::new();
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((times[i], std::cmp::Reverse(i))));
        if let Some(n) = policy.keep_last {
            kept.extend(order.iter().take(n as usize));
        }
        type Period = fn(i64) -> i64;
        let periods: [(Option<u32>, Period); 3] = [
            (policy.keep_hourly, |t| t.div_euclid(HOUR)),
            (policy.keep_daily, |t| t.div_euclid(DAY)),
            (policy.keep_weekly, |t| {
                (t.div_euclid(DAY) + 3).div_euclid(7)
            }),
        ];
        for (count, period) in periods {
            let Some(count) = count else { continue };
            let mut newest_of: BTreeMap<i64, usize> = BTreeMap::new();
            for &i in order.iter().rev() {
                newest_of.insert(period(times[i]), i);
            }
            kept.extend(newest_of.values().rev().take(count as usize));
        }
        if let (Some(ms), Some(&newest)) = (policy.keep_within_ms, order.first()) {
            let from = times[newest] - ms as i64 * 1_000_000;
            kept.extend(order.iter().filter(|&&i| times[i] >= from));
        }
        kept
    }

    fn kept_by_policy(policy: &RetentionPolicy, times: &[i64]) -> BTreeSet<usize> {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((times[i], std::cmp::Reverse(i))));
        let sorted: Vec<Instant> = order.iter().map(|&i| Instant(times[i])).collect();
        policy
            .keep(&sorted)
            .into_iter()
            .zip(&order)
            .filter(|(reasons, _)| !reasons.is_empty())
            .map(|(_, &i)| i)
            .collect()
    }

    fn policy(spec: &str) -> RetentionPolicy {
        let mut policy = RetentionPolicy::default();
        for part in spec.split_whitespace() {
            let (rule, value) = part.split_once('=').unwrap();
            let value: u64 = value.parse().unwrap();
            match rule {
                "last" => policy.keep_last = Some(value as u32),
                "hourly" => policy.keep_hourly = Some(value as u32),
                "daily" => policy.keep_daily = Some(value as u32),
                "weekly" => policy.keep_weekly = Some(value as u32),
                "within_h" => policy.keep_within_ms = Some(value * 3_600_000),
                _ => panic!("rule {rule}"),
            }
        }
        policy
    }

    #[test]
    fn rules_keep_exactly_the_frames_they_name() {
        // Frames every 20 minutes for 30 days.
        let times: Vec<i64> = (0..30 * 72).map(|i| i * HOUR / 3).collect();
        let newest = *times.last().unwrap();
        let table: &[(&str, usize)] = &[
            ("last=5", 5),
            ("hourly=24", 24),
            ("daily=7", 7),
            ("weekly=3", 3),
            ("within_h=6", 19),
            ("last=2 hourly=3", 4),
            ("daily=2 weekly=2", 3),
            ("last=1000000", times.len()),
        ];
        for (spec, expected) in table {
            let policy = policy(spec);
            let kept = kept_by_policy(&policy, &times);
            assert_eq!(kept, reference(&policy, &times), "{spec}");
            assert_eq!(kept.len(), *expected, "{spec}");
            assert!(kept.contains(&(times.len() - 1)), "{spec} keeps the newest");
        }
        // The newest frame of each of the last 3 days: the day's last frame.
        let daily = kept_by_policy(&policy("daily=3"), &times);
        for i in daily {
            assert!(
                times
                    .get(i + 1)
                    .is_none_or(|next| next.div_euclid(DAY) != times[i].div_euclid(DAY))
            );
            assert!(newest - times[i] < 3 * DAY);
        }
    }

    #[test]
    fn rules_match_the_reference_on_irregular_histories() {
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..300 {
            let count = (next() % 200) as usize;
            let mut at = 0i64;
            let times: Vec<i64> = (0..count)
                .map(|_| {
                    // Bursts and gaps: seconds to days apart, sometimes the same instant.
                    at += match next() % 4 {
                        0 => 0,
                        1 => (next() % 60) as i64 * 1_000_000_000,
                        2 => (next() % 6) as i64 * HOUR,
                        _ => (next() % 10) as i64 * DAY,
                    };
                    at
                })
                .collect();
            let mut spec = String::new();
            for rule in ["last", "hourly", "daily", "weekly", "within_h"] {
                if next() % 3 == 0 {
                    spec.push_str(&format!("{rule}={} ", 1 + next() % 12));
                }
            }
            if spec.is_empty() {
                spec.push_str("last=1");
            }
            let policy = policy(&spec);
            assert_eq!(
                kept_by_policy(&policy, &times),
                reference(&policy, &times),
                "case {case}: {spec} over {times:?}"
            );
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        (dir, store)
    }

    fn append(store: &Store, timeline: &str, time: i64) -> Hash {
        let parent = store.head("web", timeline).unwrap().map(|frame| frame.id);
        store
            .commit_frame(FrameDraft {
                replica: "web".into(),
                timeline: timeline.into(),
                time: Instant(time),
                parent,
                root: Hash([(time / HOUR) as u8; 32]),
                entries: 0,
                bytes: 0,
                stats: WriteStats::default(),
                torn: 0,
                unreadable: 0,
                capture_ms: 0,
            })
            .unwrap()
            .id
    }

    fn rules(spec: &str) -> Vec<TimelineRule> {
        vec![TimelineRule {
            timeline: "main".into(),
            policy: policy(spec),
        }]
    }

    #[test]
    fn forget_never_removes_what_something_needs() {
        let (_dir, store) = store();
        let frames: Vec<Hash> = (1..=20).map(|h| append(&store, "main", h * HOUR)).collect();
        // A fork at frame 3, a proposal on frame 5, a commit in progress from frame 8 with
        // frame 9 as its last good frame.
        store
            .submit(&Command::new(
                Instant(100 * HOUR),
                "web",
                "exp",
                "ana",
                Change::ForkTimeline { base: frames[2] },
            ))
            .unwrap();
        let proposal = Hash([0xab; 32]);
        store
            .submit(&Command::new(
                Instant(100 * HOUR),
                "web",
                "main",
                "ana",
                Change::PutRecord {
                    family: RecordFamily::Proposal,
                    id: proposal,
                    record: RecordBody(
                        serde_json::json!({"id": proposal.to_hex(), "base": frames[4].to_hex()}),
                    ),
                },
            ))
            .unwrap();
        let commit = Hash([0xcd; 32]);
        store
            .submit(&Command::new(
                Instant(100 * HOUR),
                "web",
                "main",
                "ana",
                Change::BeginCommit {
                    commit,
                    status: CommitStatus::Applying,
                    record: RecordBody(serde_json::json!({"commit": commit.to_hex(), "status": "applying", "base": frames[7].to_hex()})),
                    last_good: Some(frames[8]),
                },
            ))
            .unwrap();
        let dry = store
            .forget("web", &rules("last=2"), "ops", Instant(200 * HOUR), true)
            .unwrap();
        assert_eq!(
            store.history("web", "main").unwrap().len(),
            20,
            "a dry run changes nothing"
        );
        let report = store
            .forget("web", &rules("last=2"), "ops", Instant(200 * HOUR), false)
            .unwrap();
        assert_eq!(dry.timelines, report.timelines);
        let left: Vec<Hash> = store
            .history("web", "main")
            .unwrap()
            .iter()
            .map(|f| f.id)
            .collect();
        // Frames 3 (fork base, listed on `exp`), 5 (proposal base), 8 (unfinished commit),
        // 9 (last good) and 19, 20 (keep_last=2, 20 is the head) stay on main.
        let expected: Vec<Hash> = [2, 4, 7, 8, 18, 19].iter().map(|&i| frames[i]).collect();
        assert_eq!(left, expected);
        assert_eq!(report.entries_removed, 14);
        assert_eq!(report.frames_removed, 14);
        let kept = &report.timelines[0].kept;
        let reasons = |id: Hash| kept.iter().find(|f| f.id == id).unwrap().kept_by.join(",");
        assert_eq!(reasons(frames[19]), "keep_last,head of main");
        assert!(reasons(frames[4]).starts_with("proposal_base"));
        assert!(reasons(frames[7]).starts_with("unfinished_commit"));
        assert_eq!(reasons(frames[8]), "last_good");
        assert!(reasons(frames[2]).contains("head of exp"));
        // Forgotten frames are gone by id; kept ones still read.
        assert!(store.frame(&frames[0]).is_err());
        assert!(store.frame(&frames[4]).is_ok());
        // The audit log says what went.
        let log = store.audit_log("web").unwrap();
        let last = log.entries.last().unwrap();
        assert_eq!(last.event.name(), "forget");
        assert!(log.intact, "{:?}", log.problem);
        // Forgetting again removes nothing and records nothing.
        let again = store
            .forget("web", &rules("last=2"), "ops", Instant(201 * HOUR), false)
            .unwrap();
        assert_eq!((again.entries_removed, again.commands), (0, 0));
        assert_eq!(
            store.audit_log("web").unwrap().entries.len(),
            log.entries.len()
        );
        let _ = KeepRule::Last;
    }

    #[test]
    fn a_proposal_or_commit_made_before_a_forget_cannot_name_the_frame_it_removed() {
        let (_dir, store) = store();
        let frames: Vec<Hash> = (1..=5).map(|h| append(&store, "main", h * HOUR)).collect();
        // Both commands are built on a view where frame 2 exists (a proposal resolved
        // `--at` it; a commit read it as the head and its rollback target), then a forget
        // lands first.
        let proposal = Hash([0xab; 32]);
        let propose = Command::new(
            Instant(10 * HOUR),
            "web",
            "main",
            "ana",
            Change::PutRecord {
                family: RecordFamily::Proposal,
                id: proposal,
                record: RecordBody(
                    serde_json::json!({"id": proposal.to_hex(), "base": frames[1].to_hex()}),
                ),
            },
        );
        let commit = Hash([0xcd; 32]);
        let begin = Command::new(
            Instant(10 * HOUR),
            "web",
            "main",
            "ana",
            Change::BeginCommit {
                commit,
                status: CommitStatus::Applying,
                record: RecordBody(serde_json::json!({"commit": commit.to_hex(),
                    "status": "applying", "base": frames[4].to_hex(), "last_good": frames[1].to_hex()})),
                last_good: Some(frames[1]),
            },
        );
        store
            .forget("web", &rules("last=1"), "ops", Instant(20 * HOUR), false)
            .unwrap();
        assert!(store.frame(&frames[1]).is_err());
        let error = store.submit(&propose).unwrap_err();
        assert!(
            matches!(error, CatalogError::NoSuchFrame { .. }),
            "a proposal on a forgotten base is refused: {error}"
        );
        let error = store.submit(&begin).unwrap_err();
        assert!(
            matches!(error, CatalogError::NoSuchFrame { .. }),
            "a commit whose rollback target is forgotten is refused: {error}"
        );
        assert_eq!(store.last_good("web").unwrap(), None);
        assert!(
            store
                .records::<serde_json::Value>(RecordFamily::Proposal, "web")
                .unwrap()
                .is_empty(),
            "no record names a forgotten frame"
        );
    }

    #[test]
    fn a_forget_lands_while_captures_keep_appending_frames() {
        let (_dir, store) = store();
        for i in 1..=5_000 {
            append(&store, "main", i * 1_000_000);
        }
        let store = std::sync::Arc::new(store);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capturing = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut time = 10_000 * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    time += 1_000_000;
                    append(&store, "main", time);
                }
            })
        };
        let started = std::time::Instant::now();
        let forgotten = store.forget("web", &rules("last=10"), "ops", Instant(HOUR), false);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        capturing.join().unwrap();
        let report = forgotten.unwrap();
        assert!(report.entries_removed >= 4_990, "{report:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn a_frame_listed_on_two_timelines_stays_until_both_let_it_go() {
        let (_dir, store) = store();
        let frames: Vec<Hash> = (1..=5).map(|h| append(&store, "main", h * HOUR)).collect();
        store
            .submit(&Command::new(
                Instant(10 * HOUR),
                "web",
                "exp",
                "ana",
                Change::ForkTimeline { base: frames[1] },
            ))
            .unwrap();
        append(&store, "exp", 11 * HOUR);
        let report = store
            .forget("web", &rules("last=1"), "ops", Instant(20 * HOUR), false)
            .unwrap();
        assert_eq!(report.entries_removed, 4);
        assert_eq!(report.frames_removed, 3, "frame 2 is still on exp");
        assert!(store.frame(&frames[1]).is_ok());
        let both = vec![
            TimelineRule {
                timeline: "main".into(),
                policy: policy("last=1"),
            },
            TimelineRule {
                timeline: "exp".into(),
                policy: policy("last=1"),
            },
        ];
        let report = store
            .forget("web", &both, "ops", Instant(21 * HOUR), false)
            .unwrap();
        assert_eq!((report.entries_removed, report.frames_removed), (1, 1));
        assert!(store.frame(&frames[1]).is_err());
    }

    #[test]
    fn frames_of_a_deleted_fork_go_with_a_forget_of_every_timeline() {
        let (_dir, store) = store();
        let main: Vec<Hash> = (1..=3).map(|h| append(&store, "main", h * HOUR)).collect();
        store
            .submit(&Command::new(
                Instant(10 * HOUR),
                "web",
                "exp",
                "ana",
                Change::ForkTimeline { base: main[1] },
            ))
            .unwrap();
        let fork: Vec<Hash> = (11..=13).map(|h| append(&store, "exp", h * HOUR)).collect();
        // A proposal on the fork's second frame keeps that one.
        let proposal = Hash([0x77; 32]);
        store
            .submit(&Command::new(
                Instant(20 * HOUR),
                "web",
                "exp",
                "ana",
                Change::PutRecord {
                    family: RecordFamily::Proposal,
                    id: proposal,
                    record: RecordBody(
                        serde_json::json!({"id": proposal.to_hex(), "base": fork[1].to_hex()}),
                    ),
                },
            ))
            .unwrap();
        store
            .submit(&Command::new(
                Instant(21 * HOUR),
                "web",
                "exp",
                "ana",
                Change::DeleteTimeline,
            ))
            .unwrap();
        let keep_all = rules("last=100");
        let untouched = store
            .forget("web", &keep_all, "ops", Instant(30 * HOUR), false)
            .unwrap();
        assert_eq!(untouched.frames_removed, 0, "only when asked");
        let dry = store
            .forget_with("web", &keep_all, true, "ops", Instant(30 * HOUR), true)
            .unwrap();
        assert_eq!(dry.frames_removed, 2);
        let unlisted = dry
            .timelines
            .iter()
            .find(|t| t.timeline == UNLISTED)
            .unwrap();
        assert_eq!(unlisted.kept[0].id, fork[1]);
        assert!(unlisted.kept[0].kept_by[0].starts_with("proposal_base"));
        let report = store
            .forget_with("web", &keep_all, true, "ops", Instant(30 * HOUR), false)
            .unwrap();
        assert_eq!((report.entries_removed, report.frames_removed), (0, 2));
        assert!(store.frame(&fork[0]).is_err() && store.frame(&fork[2]).is_err());
        assert!(store.frame(&fork[1]).is_ok());
        assert_eq!(store.history("web", "main").unwrap().len(), 3);
        assert!(store.audit_log("web").unwrap().intact);
    }

    #[test]
    fn bad_policies_and_unknown_replicas_are_refused_by_name() {
        let (_dir, store) = store();
        let empty = vec![TimelineRule {
            timeline: "main".into(),
            policy: RetentionPolicy::default(),
        }];
        let error = store
            .forget("web", &empty, "ops", Instant(1), false)
            .unwrap_err();
        assert!(
            error.to_string().contains("keeps nothing by rule"),
            "{error}"
        );
        let error = store
            .forget("db", &rules("last=1"), "ops", Instant(1), false)
            .unwrap_err();
        assert!(error.to_string().contains("unknown replica"), "{error}");
    }
}
