//! `kairos repair`: runs on the data directory only (a running node holds the store file),
//! prints what was found and exactly what was lost.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kairos_store::repair::RepairReport;

use crate::output::print_json;

/// Unreadable key ranges listed in the text report (all are in `--json`).
const UNREADABLE_SHOWN_MAX: usize = 5;

pub fn run(data_dir: &Path, node_in_use: bool, json: bool) -> Result<ExitCode> {
    if node_in_use {
        bail!(
            "repair works on the data directory {} directly: stop the node that holds it first",
            data_dir.display()
        );
    }
    let report = kairos_store::repair::repair(data_dir)
        .with_context(|| format!("repairing the store in {}", data_dir.display()))?;
    if json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &RepairReport) {
    if !report.needed {
        println!("the store verifies: nothing to repair");
        return;
    }
    for damage in &report.damage {
        println!("damage: {damage}");
    }
    if let Some(source) = report.source {
        println!("old file read: {}", serde_plain(&source));
    }
    if let Some(catalog) = report.catalog_source {
        println!("catalog from: {}", serde_plain(&catalog));
    }
    println!(
        "objects: {} recovered, {} damaged",
        report.objects_recovered, report.objects_damaged
    );
    for range in report.ranges_unreadable.iter().take(UNREADABLE_SHOWN_MAX) {
        println!("unreadable through redb: {range}");
    }
    if report.ranges_unreadable.len() > UNREADABLE_SHOWN_MAX {
        println!(
            "unreadable through redb: {} more key ranges (see --json); the page scan read what it could",
            report.ranges_unreadable.len() - UNREADABLE_SHOWN_MAX
        );
    }
    println!(
        "frames: {} kept, {} lost",
        report.frames_kept,
        report.frames_lost.len()
    );
    for lost in &report.frames_lost {
        println!(
            "lost frame {} ({} {} at {}): {}",
            &lost.frame[..12.min(lost.frame.len())],
            lost.replica,
            lost.timeline,
            lost.time,
            lost.reason
        );
    }
    for moved in &report.moved {
        println!("moved {moved}");
    }
    if let Some(kept) = &report.damaged_file_kept {
        println!(
            "the damaged file is kept as {} (delete it once satisfied)",
            kept.display()
        );
    }
    for kept in &report.damaged_packs_kept {
        println!(
            "its pack files are kept in {} (delete them with it)",
            kept.display()
        );
    }
    println!("repaired");
}

/// The snake_case name serde gives a unit variant.
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default()
}
