//! `kairos gate`'s reports of a [`GateJson`]: text for a terminal, JSON (the answer
//! itself, schema `kairos.gate/1`), Markdown as a ready pull-request comment, and JUnit
//! XML (one testsuite, a testcase per criterion) for CI test reports.

use std::fmt::Write;

use kairos_ops::gate::{Criterion, CriterionStatus, GateJson};
use kairos_store::audit::GateVerdict;

/// How a gate's report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GateFormat {
    Text,
    Json,
    Markdown,
    Junit,
}

impl GateFormat {
    fn parse(text: &str) -> Option<GateFormat> {
        <GateFormat as clap::ValueEnum>::from_str(text, true).ok()
    }
}

/// One `--write FORMAT:FILE`.
#[derive(Debug, Clone)]
pub struct WriteTo {
    pub format: GateFormat,
    pub path: std::path::PathBuf,
}

/// Parses `--write FORMAT:FILE`.
pub fn parse_write(text: &str) -> Result<WriteTo, String> {
    let (format, path) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not FORMAT:FILE (e.g. junit:gate.xml)"))?;
    let format = GateFormat::parse(format)
        .ok_or_else(|| format!("{format:?} is not a format: use text, json, markdown or junit"))?;
    if path.is_empty() {
        return Err(format!("{text:?} names no file"));
    }
    Ok(WriteTo {
        format,
        path: path.into(),
    })
}

/// Markdown lines of the diff listed at most (the counts are always whole).
const MARKDOWN_DIFF_LINES_MAX: usize = 30;

pub fn render(gate: &GateJson, format: GateFormat) -> String {
    match format {
        GateFormat::Text => text(gate),
        GateFormat::Json => {
            let mut json = serde_json::to_string_pretty(gate).unwrap_or_default();
            json.push('\n');
            json
        }
        GateFormat::Markdown => markdown(gate),
        GateFormat::Junit => junit(gate),
    }
}

fn short(hex: &str) -> &str {
    hex.get(..8).unwrap_or(hex)
}

fn mark(status: CriterionStatus) -> &'static str {
    match status {
        CriterionStatus::Pass => "pass",
        CriterionStatus::Fail => "FAIL",
        CriterionStatus::Skipped => "skip",
    }
}

/// The prediction in one line, never letting a low-confidence guess read as a verdict.
fn prediction_line(gate: &GateJson, emphasis: &str) -> String {
    let prediction = &gate.prediction;
    let strong = |text: String| format!("{emphasis}{text}{emphasis}");
    if prediction.abstain {
        return format!(
            "{} — the model abstains (confidence {:.2}): this is no verdict on the change",
            strong("no call".into()),
            prediction.confidence
        );
    }
    let call = format!(
        "P(error) {} at confidence {}",
        strong(format!("{:.2}", prediction.p_error)),
        strong(format!("{:.2}", prediction.confidence))
    );
    let minimum = gate.thresholds.min_confidence;
    if minimum <= 0.0 {
        format!("{call} (this gate asks for no minimum confidence)")
    } else if prediction.confidence >= minimum {
        format!("{call} (at least {minimum:.2}: trusted)")
    } else {
        format!("{call} — low confidence: a guess, not a verdict (trusted from {minimum:.2})")
    }
}

fn diff_lines(gate: &GateJson) -> Vec<String> {
    let mut lines = Vec::new();
    for change in &gate.diff.files {
        let mark = match change.change.as_str() {
            "added" => "A",
            "removed" => "D",
            _ => "M",
        };
        lines.push(format!("{mark} {} {}", change.kind, change.path));
    }
    for change in &gate.diff.config {
        lines.push(match (&change.from, &change.to) {
            (Some(from), Some(to)) => {
                format!("config {}: {}: {from} -> {to}", change.file, change.key)
            }
            (None, Some(to)) => format!("config {}: {} added = {to}", change.file, change.key),
            (Some(from), None) => {
                format!(
                    "config {}: {} removed (was {from})",
                    change.file, change.key
                )
            }
            (None, None) => format!("config {}: {}", change.file, change.key),
        });
    }
    for action in &gate.diff.actions {
        lines.push(format!("action on commit: {action}"));
    }
    lines
}

fn diff_counts(gate: &GateJson) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{}, {}",
        plural(gate.diff.files_changed, "file", "files"),
        plural(gate.diff.config_keys_changed, "config key", "config keys")
    )
}

fn text(gate: &GateJson) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gate {}: proposal {} {:?} by {} on {}/{} ({} ops)",
        match gate.verdict {
            GateVerdict::Pass => "passed",
            GateVerdict::Refuse => "REFUSED",
        },
        short(&gate.proposal),
        gate.title,
        gate.author,
        gate.replica,
        gate.timeline,
        gate.ops.len()
    );
    for criterion in &gate.criteria {
        let _ = writeln!(
            out,
            "  {} {:<10} {}",
            mark(criterion.status),
            criterion.name.name(),
            criterion.message
        );
    }
    let _ = writeln!(out, "prediction: {}", prediction_line(gate, ""));
    for line in &gate.prediction.explanation {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(out, "changes: {}", diff_counts(gate));
    for line in diff_lines(gate) {
        let _ = writeln!(out, "  {line}");
    }
    if let Some(check) = &gate.check {
        for line in check.output.lines() {
            let _ = writeln!(out, "  | {line}");
        }
    }
    out
}

/// Text safe inside a Markdown table cell or line: no pipes, no line breaks, no HTML.
fn md(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace(['\n', '\r'], " ")
}

fn markdown(gate: &GateJson) -> String {
    let mut out = String::new();
    let (icon, verdict) = match gate.verdict {
        GateVerdict::Pass => ("✅", "passed"),
        GateVerdict::Refuse => ("❌", "refused"),
    };
    let _ = writeln!(
        out,
        "### {icon} Kairos gate {verdict}: `{}` proposal `{}` — {}\n",
        md(&gate.replica),
        short(&gate.proposal),
        md(&gate.title)
    );
    if !gate.reasons.is_empty() {
        let _ = writeln!(out, "**Refused because**\n");
        for reason in &gate.reasons {
            let _ = writeln!(out, "- {}", md(reason));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "**Prediction:** {}\n",
        md(&prediction_line(gate, "**"))
    );
    if !gate.prediction.explanation.is_empty() {
        let _ = writeln!(
            out,
            "<details><summary>What moved the prediction</summary>\n"
        );
        for line in &gate.prediction.explanation {
            let _ = writeln!(out, "- {}", md(line));
        }
        let _ = writeln!(out, "\n</details>\n");
    }
    let _ = writeln!(out, "**Changes:** {}\n", diff_counts(gate));
    let lines = diff_lines(gate);
    if !lines.is_empty() {
        let _ = writeln!(out, "```");
        for line in lines.iter().take(MARKDOWN_DIFF_LINES_MAX) {
            let _ = writeln!(out, "{}", line.replace("```", "'''"));
        }
        if lines.len() > MARKDOWN_DIFF_LINES_MAX || gate.diff.truncated {
            let _ = writeln!(out, "… and more (kairos diff shows them all)");
        }
        let _ = writeln!(out, "```\n");
    }
    let check = match &gate.check {
        None => "not run (`--run-check` not given)".to_string(),
        Some(check) if check.passed => format!("passed ({})", check.summary()),
        Some(check) => format!("**failed** ({})", check.summary()),
    };
    let _ = writeln!(out, "**Check:** {check}\n");
    if let Some(check) = gate.check.as_ref().filter(|c| !c.output.trim().is_empty()) {
        let _ = writeln!(out, "<details><summary>Check output</summary>\n\n```");
        let _ = writeln!(out, "{}", check.output.trim_end().replace("```", "'''"));
        let _ = writeln!(out, "```\n\n</details>\n");
    }
    if let Some(commit) = &gate.commit {
        let _ = writeln!(
            out,
            "**Commit:** `{}` {}{}\n",
            short(&commit.commit),
            commit.status,
            commit
                .detail
                .as_deref()
                .map(|detail| format!(": {}", md(detail)))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "| criterion | result | why |\n|---|---|---|");
    for criterion in &gate.criteria {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            criterion.name.name(),
            match criterion.status {
                CriterionStatus::Pass => "✅ pass",
                CriterionStatus::Fail => "❌ fail",
                CriterionStatus::Skipped => "➖ skipped",
            },
            md(&criterion.message)
        );
    }
    let _ = writeln!(
        out,
        "\n<sub>kairos gate · max risk {:.2} · min confidence {:.2} · proposal `{}` by {} on timeline `{}`</sub>",
        gate.thresholds.max_risk,
        gate.thresholds.min_confidence,
        gate.proposal,
        md(&gate.author),
        md(&gate.timeline)
    );
    out
}

/// Text safe inside an XML attribute or element.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' => out.push(c),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn testcase(out: &mut String, gate: &GateJson, criterion: &Criterion) {
    let _ = write!(
        out,
        "  <testcase classname=\"kairos.gate.{}\" name=\"{}\"",
        xml(&gate.replica),
        criterion.name.name()
    );
    match criterion.status {
        CriterionStatus::Pass => {
            let _ = writeln!(
                out,
                "><system-out>{}</system-out></testcase>",
                xml(&criterion.message)
            );
        }
        CriterionStatus::Skipped => {
            let _ = writeln!(
                out,
                "><skipped message=\"{}\"/></testcase>",
                xml(&criterion.message)
            );
        }
        CriterionStatus::Fail => {
            let mut detail = criterion.message.clone();
            if criterion.name == kairos_ops::gate::CriterionName::Check
                && let Some(check) = &gate.check
            {
                detail.push('\n');
                detail.push_str(&check.output);
            }
            let _ = writeln!(
                out,
                ">\n    <failure message=\"{}\" type=\"{}\">{}</failure>\n  </testcase>",
                xml(&criterion.message),
                criterion.name.name(),
                xml(&detail)
            );
        }
    }
}

fn junit(gate: &GateJson) -> String {
    let count =
        |status: CriterionStatus| gate.criteria.iter().filter(|c| c.status == status).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuite name=\"kairos gate {} {}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\">",
        xml(&gate.replica),
        short(&gate.proposal),
        gate.criteria.len(),
        count(CriterionStatus::Fail),
        count(CriterionStatus::Skipped),
        gate.check
            .as_ref()
            .map_or(0.0, |c| c.duration_ms as f64 / 1e3)
    );
    let _ = writeln!(out, "  <properties>");
    for (name, value) in [
        ("verdict", gate.verdict.name().to_string()),
        ("proposal", gate.proposal.clone()),
        ("timeline", gate.timeline.clone()),
        ("p_error", format!("{:.4}", gate.prediction.p_error)),
        ("confidence", format!("{:.4}", gate.prediction.confidence)),
        ("abstain", gate.prediction.abstain.to_string()),
        ("max_risk", format!("{:.4}", gate.thresholds.max_risk)),
        (
            "min_confidence",
            format!("{:.4}", gate.thresholds.min_confidence),
        ),
    ] {
        let _ = writeln!(
            out,
            "    <property name=\"{name}\" value=\"{}\"/>",
            xml(&value)
        );
    }
    let _ = writeln!(out, "  </properties>");
    for criterion in &gate.criteria {
        testcase(&mut out, gate, criterion);
    }
    let _ = writeln!(out, "</testsuite>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_targets_name_a_format_and_a_file() {
        let to = parse_write("junit:out/gate.xml").unwrap();
        assert_eq!(to.format, GateFormat::Junit);
        assert_eq!(to.path, std::path::PathBuf::from("out/gate.xml"));
        assert!(
            parse_write("xml:gate.xml")
                .unwrap_err()
                .contains("not a format")
        );
        assert!(parse_write("gate.xml").unwrap_err().contains("FORMAT:FILE"));
        assert!(parse_write("json:").is_err());
    }

    fn gate(p_error: f32, confidence: f32, verdict: GateVerdict) -> GateJson {
        use kairos_ops::gate::{CriterionName, GateDiff, GateThresholds};
        let failed = verdict == GateVerdict::Refuse;
        GateJson {
            schema: kairos_ops::gate::GATE_SCHEMA.into(),
            replica: "web".into(),
            proposal: "0123456789abcdef".into(),
            title: "raise | the port".into(),
            author: "ci".into(),
            timeline: "main".into(),
            base: "fedc".into(),
            ops: vec![1],
            verdict,
            reasons: if failed {
                vec!["confidence: the prediction cannot be trusted".into()]
            } else {
                Vec::new()
            },
            criteria: vec![Criterion {
                name: CriterionName::Confidence,
                status: if failed {
                    CriterionStatus::Fail
                } else {
                    CriterionStatus::Pass
                },
                message: "why <here>".into(),
            }],
            thresholds: GateThresholds::default(),
            prediction: kairos_ops::learn::PredictionJson {
                proposal: "0123".into(),
                ops: vec![1],
                p_error,
                confidence,
                abstain: false,
                resource_deltas: Default::default(),
                affected: Vec::new(),
                explanation: vec!["app.conf: key port (raises risk, +0.40)".into()],
                model: Some("m".into()),
                model_error: None,
                inference_us: 3,
            },
            diff: GateDiff {
                files_changed: 0,
                config_keys_changed: 0,
                files: Vec::new(),
                config: Vec::new(),
                actions: Vec::new(),
                truncated: false,
            },
            check: None,
            commit: None,
        }
    }

    #[test]
    fn the_markdown_comment_never_lets_a_guess_read_as_a_verdict() {
        let trusted = render(&gate(0.05, 0.93, GateVerdict::Pass), GateFormat::Markdown);
        assert!(trusted.starts_with(
            "### ✅ Kairos gate passed: `web` proposal `01234567` — raise \\| the port"
        ));
        assert!(
            trusted.contains(
                "**Prediction:** P(error) **0.05** at confidence **0.93** (at least 0.70: trusted)"
            ),
            "{trusted}"
        );
        assert!(trusted.contains("**Check:** not run"));
        assert!(trusted.contains("| confidence | ✅ pass | why &lt;here&gt; |"));
        let guess = render(&gate(0.05, 0.41, GateVerdict::Refuse), GateFormat::Markdown);
        assert!(
            guess.contains("at confidence **0.41** — low confidence: a guess, not a verdict (trusted from 0.70)"),
            "{guess}"
        );
        assert!(
            guess.contains("**Refused because**\n\n- confidence: the prediction cannot be trusted")
        );
        let junit = render(&gate(0.05, 0.41, GateVerdict::Refuse), GateFormat::Junit);
        assert!(junit.contains("failures=\"1\""), "{junit}");
        assert!(junit.contains("<failure message=\"why &lt;here&gt;\" type=\"confidence\">"));
    }

    #[test]
    fn xml_and_markdown_escape_what_would_break_them() {
        assert_eq!(
            xml("a<b & \"c\"\u{1}"),
            "a&lt;b &amp; &quot;c&quot;\u{fffd}"
        );
        assert_eq!(md("a | b\n<c>"), "a \\| b &lt;c&gt;");
    }
}
