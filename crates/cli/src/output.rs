//! Text and JSON output of the `kairos` command.

use std::io::Write;

use anyhow::Result;
use kairos_capture::CaptureReport;
use kairos_core::{Hash, Instant};
use kairos_replay::{StateDiff, StateListing};
use kairos_store::FrameRecord;
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

/// A frame as listed by `history`.
#[derive(Serialize)]
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

#[derive(Serialize)]
pub struct NoteJson {
    pub path: String,
    pub message: String,
}

#[derive(Serialize)]
pub struct CaptureJson {
    #[serde(flatten)]
    pub frame: FrameJson,
    pub files_read: u64,
    pub files_reused: u64,
    pub objects_reused: u64,
    pub bytes_new_raw: u64,
    pub processes: u64,
    pub dictionary_trained: Option<u32>,
    pub notes: Vec<NoteJson>,
}

impl From<&CaptureReport> for CaptureJson {
    fn from(report: &CaptureReport) -> CaptureJson {
        CaptureJson {
            frame: FrameJson::from(&report.frame),
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
        }
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
    for change in &diff.files {
        let mark = match change.change {
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
                line.push_str(&format!("  {} -> {}", bytes(from), bytes(to)))
            }
            _ => {}
        }
        writeln!(out, "{line}")?;
    }
    for change in &diff.config {
        match (&change.from, &change.to) {
            (Some(from), Some(to)) => writeln!(
                out,
                "config {}: {}: {from} -> {to}",
                change.file, change.key
            )?,
            (None, Some(to)) => {
                writeln!(out, "config {}: {} added = {to}", change.file, change.key)?
            }
            (Some(from), None) => writeln!(
                out,
                "config {}: {} removed (was {from})",
                change.file, change.key
            )?,
            (None, None) => {}
        }
    }
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
