//! `kairos-corruption`: the corruption harness as a benchmark. Damages stores of several
//! sizes from seeds and checks that nothing panics, `verify` never calls a damaged file ok,
//! and every intact frame restores byte-identical after `repair`. Exits non-zero on any
//! failing case, printing the command that replays it.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use kairos_simulations::corruption::{self, SIZES};

#[derive(Parser)]
#[command(
    name = "kairos-corruption",
    about = "Seeded corruption cases against the Kairos store"
)]
struct Cli {
    /// How many cases to run (spread over the sizes in turn)
    #[arg(long, default_value_t = 1000)]
    cases: u64,
    /// The first case's seed (case i uses seed + i)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only stores of this size: small, medium or large
    #[arg(long)]
    size: Option<String>,
    /// Print every case, not only failing ones
    #[arg(long)]
    verbose: bool,
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let sizes: Vec<_> = SIZES
        .iter()
        .copied()
        .filter(|size| cli.size.as_deref().is_none_or(|name| name == size.name))
        .collect();
    if sizes.is_empty() {
        bail!("--size must be small, medium or large");
    }
    let summary = corruption::run(&sizes, cli.cases, cli.seed, |outcome, replay| {
        let failures = outcome.failures();
        if cli.verbose || !failures.is_empty() {
            println!(
                "{}: damaged={} verify_ok={} frames intact {}/{} recovered {}{}",
                outcome.description,
                outcome.damaged,
                outcome.verify_ok,
                outcome.frames_intact,
                outcome.frames,
                outcome.frames_recovered,
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(" FAILED: {}; replay: {replay}", failures.join(", "))
                }
            );
        }
    })?;
    println!(
        "cases {} ({} damaged, {} undamaged) in {:.1} s",
        summary.cases, summary.damaged, summary.undamaged, summary.seconds
    );
    println!("panics {}", summary.panics);
    println!(
        "verify: not ok on {} of {} damaged (false ok {}); not ok on {} of {} undamaged",
        summary.verify_not_ok_on_damaged,
        summary.damaged,
        summary.false_ok,
        summary.verify_not_ok_on_undamaged,
        summary.undamaged
    );
    println!(
        "captures accepted after damage was found {}",
        summary.captures_accepted_on_damage
    );
    println!(
        "frames {}: intact {}, recovered byte-identical after repair {}, intact but not recovered {}",
        summary.frames,
        summary.frames_intact,
        summary.frames_recovered,
        summary.frames_intact_not_recovered
    );
    println!(
        "repair failures {}, verify not ok after repair {}",
        summary.repair_failures, summary.verify_after_repair_not_ok
    );
    if !summary.passed() {
        println!("FAILED: {} failing cases", summary.failing_cases.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
