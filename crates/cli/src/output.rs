//! Text and JSON output of the `kairos` command.

use std::io::Write;

use anyhow::Result;
use kairos_replay::{StateDiff, StateListing};
use serde::Serialize;

pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn print_listing(listing: &StateListing) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let frame = &listing.frame;
    writeln!(
        out,
        "frame {} at {} ({} entries, {})",
        frame.id.short(),
        frame.time,
        frame.entries,
        bytes(frame.bytes)
    )?;
    writeln!(out, "\nfiles:")?;
    for entry in &listing.entries {
        let mut line = format!(
            "  {} {:<8} {:>10}  {}  {}",
            entry.mode, entry.kind, entry.size, entry.mtime, entry.path
        );
        if let Some(target) = &entry.target {
            line.push_str(&format!(" -> {target}"));
        }
        if entry.torn {
            line.push_str("  (torn)");
        }
        if let Some(error) = &entry.error {
            line.push_str(&format!("  ({error})"));
        }
        writeln!(out, "{line}")?;
    }
    if !listing.config.is_empty() {
        writeln!(out, "\nconfig keys:")?;
        for key in &listing.config {
            writeln!(out, "  {}: {} = {}", key.file, key.key, key.value)?;
        }
    }
    writeln!(out, "\nprocesses:")?;
    if listing.processes.is_empty() {
        writeln!(out, "  (none matched)")?;
    }
    for process in &listing.processes {
        writeln!(
            out,
            "  {} {} [{}] rss {} cpu {:.1}% started {}{}  {}",
            process.pid,
            process.name,
            process.state,
            bytes(process.rss_bytes),
            process.cpu_percent,
            process.start_time,
            if process.listening.is_empty() {
                String::new()
            } else {
                format!(" listening {}", process.listening.join(" "))
            },
            process.cmdline.join(" ")
        )?;
    }
    writeln!(out, "\nmetrics:")?;
    for (name, value) in listing.metrics.pairs() {
        writeln!(out, "  {name} = {value}")?;
    }
    if let Some(sample) = &listing.metrics_nearest {
        writeln!(
            out,
            "\nmetrics nearest {} (runtime series: {} sample(s) in {} ms from {}, state of frame {}):",
            sample.asked,
            sample.samples,
            sample.width_ms,
            sample.at,
            sample.frame.short()
        )?;
        writeln!(
            out,
            "  cpu_percent = {:.2} (max {:.2})\n  memory_rss_bytes = {} (max {})\n  processes = {}",
            sample.cpu_percent,
            sample.cpu_percent_max,
            sample.memory_rss_bytes,
            sample.memory_rss_bytes_max,
            sample.processes
        )?;
    }
    if !listing.notes.is_empty() {
        writeln!(out, "\nnotes:")?;
        for note in &listing.notes {
            writeln!(out, "  {}: {}", note.path, note.message)?;
        }
    }
    Ok(())
}

pub fn print_diff(diff: &StateDiff) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "from frame {} at {}",
        diff.from.id.short(),
        diff.from.time
    )?;
    writeln!(out, "to   frame {} at {}", diff.to.id.short(), diff.to.time)?;
    if diff.is_empty() {
        writeln!(out, "no changes")?;
        return Ok(());
    }
    print_changes(&mut out, &diff.files, &diff.config)?;
    for process in &diff.processes.started {
        writeln!(
            out,
            "process started: {} {} ({})",
            process.pid,
            process.name,
            process.cmdline.join(" ")
        )?;
    }
    for process in &diff.processes.exited {
        writeln!(
            out,
            "process exited: {} {} ({})",
            process.pid,
            process.name,
            process.cmdline.join(" ")
        )?;
    }
    for metric in &diff.metrics {
        writeln!(
            out,
            "metric {}: {} -> {}",
            metric.metric, metric.from, metric.to
        )?;
    }
    Ok(())
}

fn print_changes(
    out: &mut dyn Write,
    files: &[kairos_replay::FileChange],
    config: &[kairos_replay::ConfigChange],
) -> Result<()> {
    for change in files {
        let mark = match change.change.as_str() {
            "added" => "A",
            "removed" => "D",
            _ => "M",
        };
        let mut line = format!("{mark} {:<8} {}", change.kind, change.path);
        if !change.what.is_empty() {
            line.push_str(&format!("  ({})", change.what.join(", ")));
        }
        match (change.size_from, change.size_to) {
            (Some(from), Some(to)) if from != to => {
                line.push_str(&format!("  {} -> {}", bytes(from), bytes(to)));
            }
            _ => {}
        }
        writeln!(out, "{line}")?;
    }
    for change in config {
        match (&change.from, &change.to) {
            (Some(from), Some(to)) => writeln!(
                out,
                "config {}: {}: {from} -> {to}",
                change.file, change.key
            )?,
            (None, Some(to)) => {
                writeln!(out, "config {}: {} added = {to}", change.file, change.key)?;
            }
            (Some(from), None) => writeln!(
                out,
                "config {}: {} removed (was {from})",
                change.file, change.key
            )?,
            (None, None) => {}
        }
    }
    Ok(())
}

pub fn print_sandbox(report: &kairos_sandbox::SandboxReport) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "sandbox of proposal {} (ops {}) on frame {}: state {}, built in {} µs",
        report.proposal.short(),
        report
            .ops
            .iter()
            .map(|op| op.to_string())
            .collect::<Vec<_>>()
            .join(","),
        report.base.short(),
        report.state.short(),
        report.apply_us
    )?;
    if report.diff.files.is_empty() && report.diff.config.is_empty() {
        writeln!(out, "no file changes")?;
    }
    print_changes(&mut out, &report.diff.files, &report.diff.config)?;
    for action in &report.actions {
        writeln!(out, "action on commit: {action}")?;
    }
    if let Some(check) = &report.check {
        writeln!(
            out,
            "check {}: exit {} in {} ms, peak memory {}{}",
            if check.passed { "passed" } else { "FAILED" },
            check
                .exit_code
                .map(|code| code.to_string())
                .unwrap_or_else(|| format!("by signal {}", check.signal.unwrap_or(0))),
            check.duration_ms,
            bytes(check.peak_memory_bytes),
            if check.timed_out {
                " (timed out, killed)"
            } else {
                ""
            }
        )?;
        for line in check.output.lines() {
            writeln!(out, "  | {line}")?;
        }
    }
    Ok(())
}

pub fn print_commit(record: &kairos_commit::CommitRecord) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "{} {} on {}: {}{}",
        record.kind.name(),
        record.commit.short(),
        record.timeline,
        record.status.name(),
        record
            .frame
            .map(|frame| format!(", frame {}", frame.short()))
            .unwrap_or_default()
    )?;
    if record.rebased && record.conflicts.is_empty() {
        writeln!(
            out,
            "  rebased from {} onto {}",
            record.base.short(),
            record.applied_on.short()
        )?;
    }
    for path in &record.conflicts {
        writeln!(out, "  conflict: {path} changed since the proposal's base")?;
    }
    for touched in &record.touched {
        writeln!(
            out,
            "  {} {} (op {})",
            touched.change, touched.path, touched.op
        )?;
    }
    if record.probe_runs > 0 {
        writeln!(out, "  probes ran {} times", record.probe_runs)?;
    }
    if let Some(rollback) = &record.rollback {
        writeln!(
            out,
            "  rolled back to frame {} in {} ms: {}",
            rollback.to.short(),
            rollback.restored_ms,
            rollback.evidence
        )?;
    }
    if let Some(note) = &record.note {
        writeln!(out, "  note: {note}")?;
    }
    Ok(())
}

pub fn print_log(log: &kairos_store::AuditLog) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for entry in &log.entries {
        writeln!(
            out,
            "{:>5}  {}  {:<12}  {:<9}  {}",
            entry.seq,
            entry.time,
            entry.party,
            entry.event.name(),
            serde_json::to_value(&entry.event)
                .map(|event| event["details"].clone())
                .unwrap_or_default()
        )?;
    }
    match &log.problem {
        None => writeln!(out, "{} entries, hash chain intact", log.entries.len())?,
        Some(problem) => writeln!(out, "hash chain BROKEN: {problem}")?,
    }
    Ok(())
}

/// One line for a prediction (and its explanation below), as propose, sandbox, commit
/// and predict print it.
pub fn print_prediction(prediction: &kairos_ops::learn::PredictionJson) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if prediction.abstain {
        writeln!(
            out,
            "prediction: no call (abstains, confidence {:.2}){}",
            prediction.confidence,
            prediction
                .model
                .as_deref()
                .map(|model| format!(", model {model}"))
                .unwrap_or_default()
        )?;
    } else {
        writeln!(
            out,
            "prediction: P(error) {:.2}, confidence {:.2}{}, model {}",
            prediction.p_error,
            prediction.confidence,
            prediction
                .resource_deltas
                .cpu_percent
                .map(|cpu| format!(", CPU {cpu:+.1}%"))
                .unwrap_or_default(),
            prediction.model.as_deref().unwrap_or("none")
        )?;
    }
    if let Some(error) = &prediction.model_error {
        writeln!(out, "  model not loaded: {error}")?;
    }
    for line in &prediction.explanation {
        writeln!(out, "  - {line}")?;
    }
    if !prediction.affected.is_empty() {
        writeln!(out, "  affects: {}", prediction.affected.join(", "))?;
    }
    Ok(())
}

pub fn print_model_status(status: &kairos_ops::learn::ModelStatusJson) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match (status.version, &status.model) {
        (Some(version), Some(model)) => writeln!(
            out,
            "replica {}: model {model} (version {version}), trained on {} outcomes from {} to {}{}",
            status.replica,
            status.trained_examples.unwrap_or(0),
            status.training_first.as_deref().unwrap_or("?"),
            status.training_last.as_deref().unwrap_or("?"),
            status
                .training_ms
                .map(|ms| format!(" in {ms} ms"))
                .unwrap_or_default()
        )?,
        (Some(version), None) => writeln!(
            out,
            "replica {}: model version {version} could not be loaded; predictions abstain",
            status.replica
        )?,
        _ => writeln!(
            out,
            "replica {}: no model yet; predictions abstain",
            status.replica
        )?,
    }
    if let Some(held_out) = &status.held_out {
        let figure = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.3}"));
        writeln!(
            out,
            "  held out: {} outcomes, AUC {}, Brier {}, ECE {}",
            held_out.examples,
            figure(held_out.auc),
            figure(held_out.brier),
            figure(held_out.ece)
        )?;
    }
    if let Some(error) = &status.model_error {
        writeln!(out, "  model error: {error}")?;
    }
    writeln!(
        out,
        "  outcomes: {} ({} failed); retraining: {} ({})",
        status.outcomes, status.failures, status.retrain, status.retrain_detail
    )?;
    Ok(())
}

pub fn print_model_report(report: &kairos_ops::learn::ModelReportJson) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "replica {}: {} outcomes, {} predictions, {} outcomes scored ({} abstained)",
        report.replica, report.outcomes, report.predictions, report.scored, report.abstained
    )?;
    let figure = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.3}"));
    writeln!(
        out,
        "{:<22} {:>7} {:>7} {:>7}  accuracy (coverage) at confidence ≥ 0.5 / 0.7 / 0.9",
        "", "AUC", "Brier", "ECE"
    )?;
    for scored in std::iter::once(&report.model).chain(&report.baselines) {
        let at = |level: f64| {
            scored
                .report
                .coverage
                .iter()
                .find(|c| (c.confidence_min - level).abs() < 1e-9)
                .map_or("-".to_string(), |c| {
                    format!(
                        "{} ({:.0}%)",
                        c.accuracy
                            .map_or("-".into(), |a| format!("{:.0}%", a * 100.0)),
                        c.coverage * 100.0
                    )
                })
        };
        writeln!(
            out,
            "{:<22} {:>7} {:>7} {:>7}  {} / {} / {}",
            scored.name,
            figure(scored.report.auc),
            figure(scored.report.brier),
            figure(scored.report.ece),
            at(0.5),
            at(0.7),
            at(0.9)
        )?;
    }
    writeln!(out, "reliability (predicted → observed failure rate):")?;
    for bin in report
        .model
        .report
        .reliability
        .iter()
        .filter(|b| b.count > 0)
    {
        writeln!(
            out,
            "  {:.1}–{:.1}: {} predictions, mean {:.2}, observed {:.2}",
            bin.p_low, bin.p_high, bin.count, bin.p_mean, bin.failed_fraction
        )?;
    }
    Ok(())
}

pub fn print_bisect(report: &kairos_ops::bisect::BisectReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "bisect of {} from {} (good) to {} (bad): {} frames, {} distinct states, {} checks",
        report.replica,
        report.good.short(),
        report.bad.short(),
        report.frames,
        report.distinct_states,
        report.steps
    )?;
    for check in &report.checks {
        writeln!(
            out,
            "  {} {}  check {} ms, materialise {} ms",
            check.frame.short(),
            if check.passed { "pass" } else { "FAIL" },
            check.duration_ms,
            check.materialise_ms
        )?;
    }
    match &report.culprit {
        Some(culprit) => {
            writeln!(
                out,
                "first bad frame {} ({}); last good frame {}; it changed:",
                culprit.frame.short(),
                culprit.time,
                culprit.parent.short()
            )?;
            print_changes(&mut out, &culprit.files, &culprit.config)?;
        }
        None => {
            writeln!(
                out,
                "the check is not monotonic over the range: it changes {} times",
                report.transitions.len()
            )?;
            for transition in &report.transitions {
                let word = |passed: bool| if passed { "passes" } else { "fails" };
                writeln!(
                    out,
                    "  {} {} -> {} {}{}",
                    transition.before.short(),
                    word(transition.passed_before),
                    transition.after.short(),
                    word(transition.passed_after),
                    if transition.adjacent {
                        ""
                    } else {
                        " (frames between not checked)"
                    }
                )?;
            }
        }
    }
    Ok(())
}

pub fn print_culprit_revert(answer: &kairos_ops::culprit::CulpritRevertJson) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "proposal {}: revert of frame {} on {} (head {}), {} ops; commit it with `kairos commit {} {}`",
        answer.proposal.proposal.short(),
        answer.culprit.short(),
        answer.timeline,
        answer.head.short(),
        answer.proposal.ops.len(),
        answer.replica,
        answer.proposal.proposal.short()
    )?;
    for entry in &answer.reverted {
        writeln!(out, "  revert {}", entry.op)?;
    }
    for conflict in &answer.conflicts {
        writeln!(
            out,
            "  CONFLICT {}{}: {}{}",
            conflict.path,
            conflict
                .key
                .as_ref()
                .map(|key| format!(" key {key}"))
                .unwrap_or_default(),
            conflict.reason,
            conflict
                .changed_again_at
                .map(|frame| format!(" (at frame {})", frame.short()))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// Frames `forget` lists per timeline and kind in text (JSON lists all).
const FORGET_LISTED_MAX: usize = 50;

/// What `forget` did: per timeline, the policy, what goes and what stays and why.
pub fn print_forget(report: &kairos_ops::ForgetReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for timeline in &report.timelines {
        writeln!(
            out,
            "timeline {} ({}): keep {}, forget {}",
            timeline.timeline,
            timeline.policy,
            timeline.kept.len(),
            timeline.forgotten.len()
        )?;
        for frame in timeline.kept.iter().take(FORGET_LISTED_MAX) {
            writeln!(
                out,
                "  keep    {}  {}  {}",
                frame.id.short(),
                frame.time,
                frame.kept_by.join(", ")
            )?;
        }
        if timeline.kept.len() > FORGET_LISTED_MAX {
            writeln!(
                out,
                "  ... {} more kept (--json lists them all)",
                timeline.kept.len() - FORGET_LISTED_MAX
            )?;
        }
        for frame in timeline.forgotten.iter().take(FORGET_LISTED_MAX) {
            writeln!(
                out,
                "  forget  {}  {}  no rule keeps it",
                frame.id.short(),
                frame.time
            )?;
        }
        if timeline.forgotten.len() > FORGET_LISTED_MAX {
            writeln!(
                out,
                "  ... {} more forgotten (--json lists them all)",
                timeline.forgotten.len() - FORGET_LISTED_MAX
            )?;
        }
    }
    if report.dry_run {
        writeln!(
            out,
            "dry run: {} time index entries and {} frames would be removed; nothing was changed",
            report.entries_removed, report.frames_removed
        )?;
    } else {
        writeln!(
            out,
            "removed {} time index entries and {} frames; their objects are reclaimed by `kairos gc`",
            report.entries_removed, report.frames_removed
        )?;
    }
    Ok(())
}

/// One line per interference found with other proposals.
pub fn print_interference(found: &[kairos_store::audit::InterferenceEvent]) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for event in found {
        writeln!(out, "interference: {}", interference_line(event))?;
    }
    Ok(())
}

fn interference_line(event: &kairos_store::audit::InterferenceEvent) -> String {
    use kairos_store::audit::InterferenceFinding;
    let proposals = event
        .proposals
        .iter()
        .map(|p| format!("{} (by {})", p.proposal.short(), p.author))
        .collect::<Vec<_>>()
        .join(" and ");
    match &event.finding {
        InterferenceFinding::Overlap { entries } => {
            format!("{proposals} both touch {}", entries.join(", "))
        }
        InterferenceFinding::CombinedCheck { check, problem } => {
            let why = match (problem, check) {
                (Some(problem), _) => problem.clone(),
                (None, Some(check)) => match check.exit_code {
                    Some(code) => format!("the check exits {code}"),
                    None => "the check was killed".to_string(),
                },
                (None, None) => "the check fails".to_string(),
            };
            format!("{proposals} pass their checks alone; applied together {why}")
        }
    }
}

fn policy_lines(
    out: &mut impl Write,
    policy: Option<&kairos_ops::review::PolicyJson>,
) -> Result<()> {
    if let Some(policy) = policy {
        if policy.met {
            writeln!(out, "  policy: met")?;
        }
        for missing in &policy.missing {
            writeln!(out, "  policy: {missing}")?;
        }
    }
    Ok(())
}

pub fn print_review(review: &kairos_ops::review::ReviewJson) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "{} {} proposal {} by {} on {}{}",
        review.party,
        match review.verdict {
            kairos_core::Verdict::Approve => "approved",
            kairos_core::Verdict::Reject => "rejected",
        },
        review.proposal.short(),
        review.author,
        review.timeline,
        review
            .comment
            .as_deref()
            .map(|comment| format!(": {comment:?}"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "  approvals: {}; rejections: {}",
        if review.approvals.is_empty() {
            "none".to_string()
        } else {
            review.approvals.join(", ")
        },
        if review.rejections.is_empty() {
            "none".to_string()
        } else {
            review.rejections.join(", ")
        }
    )?;
    policy_lines(&mut out, review.policy.as_ref())
}

pub fn print_proposals(proposals: &[kairos_ops::review::ProposalListJson]) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if proposals.is_empty() {
        writeln!(out, "no proposals")?;
    }
    for proposal in proposals {
        writeln!(
            out,
            "{}  {:<11}  {:?} by {} on {}, base {} ({} ops, {})",
            proposal.proposal.short(),
            proposal.status.name(),
            proposal.title,
            proposal.author,
            proposal.timeline,
            proposal.base.short(),
            proposal.ops,
            proposal.created
        )?;
        let parties = |reviews: &[kairos_store::review::Review]| {
            reviews
                .iter()
                .map(|review| review.party.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !proposal.approvals.is_empty() {
            writeln!(out, "  approved by {}", parties(&proposal.approvals))?;
        }
        if !proposal.rejections.is_empty() {
            writeln!(out, "  rejected by {}", parties(&proposal.rejections))?;
        }
        if let Some(prediction) = &proposal.prediction {
            if prediction.abstain {
                writeln!(
                    out,
                    "  prediction: no call (confidence {:.2})",
                    prediction.confidence
                )?;
            } else {
                writeln!(
                    out,
                    "  prediction: P(error) {:.2}, confidence {:.2}",
                    prediction.p_error, prediction.confidence
                )?;
            }
        }
        if let Some(check) = &proposal.check {
            writeln!(
                out,
                "  check: {} (ops {:?})",
                if check.passed { "passed" } else { "failed" },
                check.ops
            )?;
        }
        for note in &proposal.interference {
            writeln!(out, "  interference: {}", interference_line(&note.event))?;
        }
        policy_lines(&mut out, proposal.policy.as_ref())?;
    }
    Ok(())
}

/// `kairos cluster status` as text: one line for the cluster, one per member, one per
/// placed replica.
pub fn cluster_status(answer: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "cluster {}  leader {}  term {}  commit index {}",
        text(&answer["cluster_id"]),
        text(&answer["leader"]),
        text(&answer["term"]),
        text(&answer["commit_index"]),
    );
    let _ = writeln!(
        out,
        "{:<6} {:<11} {:>6} {:>8} {:>9}  API",
        "NODE", "STATE", "LAG", "PID", "CLOCK"
    );
    for member in answer["members"].as_array().into_iter().flatten() {
        let clock = member["clock_offset_ms"]
            .as_i64()
            .map_or("-".to_string(), |ms| format!("{:+.1}s", ms as f64 / 1000.0));
        let _ = writeln!(
            out,
            "{:<6} {:<11} {:>6} {:>8} {:>9}  {}",
            text(&member["id"]),
            text(&member["state"]),
            text(&member["lag"]),
            text(&member["pid"]),
            clock,
            text(&member["api"]),
        );
    }
    if let Some(placement) = answer["placement"].as_object().filter(|p| !p.is_empty()) {
        let _ = writeln!(out, "placement:");
        for (replica, node) in placement {
            let _ = writeln!(out, "  {replica} -> node {}", text(node));
        }
    }
    for warning in answer["clock_warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "warning: {}", text(warning));
    }
    out
}
