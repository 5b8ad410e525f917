//! `kairos-sim`: synthetic service trees and changes, reproducible from a seed. `tree`
//! writes a service-like directory (text configs and logs, binary data files, a few large
//! files); `mutate` changes a given share of its files the way services do (rewrites,
//! appends, in-place edits of large files); `eval` trains the predictor on a seeded history
//! of proposals and outcomes and reports on a held-out part next to baselines.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(
    name = "kairos-sim",
    about = "Synthetic service trees for Kairos benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a service-like tree of about BYTES in FILES files into DIR (which must not exist)
    Tree {
        dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        /// Total size, in MiB
        #[arg(long, default_value_t = 512)]
        mib: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Change PERCENT of the files under DIR (rewrite small files, edit large ones in place)
    Mutate {
        dir: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        percent: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Train the predictor on a seeded history of proposals and outcomes; report on a
    /// held-out part next to the baselines (exits non-zero when a target is missed)
    Eval {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Proposals in the history (60% train, 15% calibration, 25% held out)
        #[arg(long, default_value_t = 8_000)]
        proposals: usize,
        /// Training epochs (default: the predictor's)
        #[arg(long)]
        epochs: Option<usize>,
        /// Training batch size (default: the predictor's)
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

const WORDS: &[&str] = &[
    "server",
    "listen",
    "port",
    "worker",
    "timeout",
    "cache",
    "enabled",
    "replica",
    "upstream",
    "request",
    "latency",
    "error",
    "info",
    "debug",
    "warn",
    "connection",
    "pool",
    "max",
    "min",
    "queue",
    "retry",
    "backoff",
    "user",
    "session",
    "token",
    "the",
    "a",
    "of",
    "to",
    "and",
];

fn text(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut line = 0u64;
    while out.len() < len {
        line += 1;
        out.extend_from_slice(format!("{line:06} ").as_bytes());
        for _ in 0..rng.random_range(4..12) {
            out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            out.push(if rng.random_bool(0.2) { b'=' } else { b' ' });
        }
        out.extend_from_slice(format!("{}\n", rng.random_range(0..100_000)).as_bytes());
    }
    out.truncate(len);
    out
}

fn binary(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    rng.fill_bytes(&mut out);
    out
}

fn tree(dir: &Path, files: usize, mib: u64, seed: u64) -> Result<()> {
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Sizes: mostly small text files, some medium, a few large binaries (log-uniform),
    // scaled to the requested total.
    let mut sizes: Vec<f64> = (0..files)
        .map(|index| {
            let class = index % 100;
            let (low, high): (f64, f64) = if class < 70 {
                (200.0, 16_000.0)
            } else if class < 97 {
                (16_000.0, 400_000.0)
            } else {
                (1_000_000.0, 20_000_000.0)
            };
            (low.ln() + rng.random::<f64>() * (high.ln() - low.ln())).exp()
        })
        .collect();
    let total: f64 = sizes.iter().sum();
    let scale = (mib as f64 * 1024.0 * 1024.0) / total;
    for size in &mut sizes {
        *size *= scale;
    }
    let mut written = 0u64;
    for (index, size) in sizes.iter().enumerate() {
        let size = size.max(1.0) as usize;
        let group = index % 64;
        let sub = (index / 64) % 8;
        let (name, content) = if index % 100 >= 97 || index % 3 == 0 {
            (
                format!("data/g{group:02}/s{sub}/blob-{index:06}.bin"),
                binary(&mut rng, size),
            )
        } else if index % 3 == 1 {
            (
                format!("conf/g{group:02}/s{sub}/svc-{index:06}.conf"),
                text(&mut rng, size),
            )
        } else {
            (
                format!("logs/g{group:02}/s{sub}/app-{index:06}.log"),
                text(&mut rng, size),
            )
        };
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
        written += content.len() as u64;
    }
    println!(
        "wrote {files} files, {written} bytes into {}",
        dir.display()
    );
    Ok(())
}

fn list(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        if item.file_type()?.is_dir() {
            list(&item.path(), out)?;
        } else {
            out.push(item.path());
        }
    }
    Ok(())
}

fn mutate(dir: &Path, percent: f64, seed: u64) -> Result<()> {
    let mut files = Vec::new();
    list(dir, &mut files).with_context(|| format!("listing {}", dir.display()))?;
    files.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count = ((files.len() as f64 * percent / 100.0).round() as usize).max(1);
    let mut changed_bytes = 0u64;
    for _ in 0..count {
        let path = &files[rng.random_range(0..files.len())];
        let mut content = std::fs::read(path)?;
        if content.len() > 1 << 20 {
            // Large file: overwrite a 64 KiB region in place (a database page write).
            let at = rng.random_range(0..content.len() - (64 << 10));
            let patch = binary(&mut rng, 64 << 10);
            content[at..at + patch.len()].copy_from_slice(&patch);
            changed_bytes += patch.len() as u64;
        } else if path.extension().is_some_and(|e| e == "log") {
            let extra = text(&mut rng, 2_000);
            changed_bytes += extra.len() as u64;
            content.extend_from_slice(&extra);
        } else {
            let len = content.len().max(1);
            content = if path.extension().is_some_and(|e| e == "bin") {
                binary(&mut rng, len)
            } else {
                text(&mut rng, len)
            };
            changed_bytes += len as u64;
        }
        std::fs::write(path, &content)?;
    }
    println!(
        "changed {count} of {} files ({changed_bytes} bytes)",
        files.len()
    );
    Ok(())
}

fn eval(settings: &kairos_simulations::eval::EvalSettings, json: bool) -> Result<()> {
    let report = kairos_simulations::eval::run(settings)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", kairos_simulations::eval::render(&report));
    }
    if let Err(missed) = kairos_simulations::eval::check_targets(&report) {
        bail!("target missed: {missed} (replay: {})", report.command);
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any other thread starts.
    unsafe { kairos_predict::train::prepare_process() };
    match Cli::parse().command {
        Command::Tree {
            dir,
            files,
            mib,
            seed,
        } => tree(&dir, files, mib, seed),
        Command::Mutate { dir, percent, seed } => mutate(&dir, percent, seed),
        Command::Eval {
            seed,
            proposals,
            epochs,
            batch_size,
            json,
        } => {
            let mut settings = kairos_simulations::eval::EvalSettings {
                proposals,
                ..kairos_simulations::eval::EvalSettings::new(seed)
            };
            if let Some(epochs) = epochs {
                settings.training.epochs = epochs;
            }
            if let Some(batch_size) = batch_size {
                settings.training.batch_size = batch_size;
            }
            eval(&settings, json)
        }
    }
}
