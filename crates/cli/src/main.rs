//! The `kairos` command: thin over the library crates. Parses arguments, opens the store,
//! calls capture or replay, prints text or JSON.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kairos_capture::{CaptureRequest, capture};
use kairos_core::replica::CAPTURE_INTERVAL_MS_DEFAULT;
use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Instant, Limits, ReplicaDefinition, TimelineSpec};
use kairos_replay::{RestoreOptions, diff, listing, open, restore};
use kairos_store::Store;

mod output;

use output::{bytes, print_json};

/// Kairos records the complete state of service replicas over time, replays any past
/// instant, diffs instants and restores them.
#[derive(Parser)]
#[command(name = "kairos", version, about, long_about = None)]
struct Cli {
    /// Where the store lives [default: $KAIROS_DATA_DIR, else ./.kairos]
    #[arg(
        long,
        global = true,
        env = "KAIROS_DATA_DIR",
        default_value = ".kairos",
        hide_env_values = true
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register or list replicas (the services Kairos watches)
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Capture the current state of a replica as a new frame
    Capture {
        /// The replica to capture
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List the frames of a replica, oldest first
    History {
        name: String,
        /// The timeline to list
        #[arg(long, default_value = MAIN_TIMELINE)]
        timeline: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the state at an instant: files, config keys, processes and metrics
    Show {
        name: String,
        #[command(flatten)]
        at: AtArg,
        #[arg(long)]
        json: bool,
    },
    /// Print a file's bytes as they were at an instant
    Cat {
        name: String,
        /// Path of the file, relative to the replica root
        path: PathBuf,
        #[command(flatten)]
        at: AtArg,
    },
    /// Show what changed between two instants (files, config keys, processes, metrics)
    Diff {
        name: String,
        /// The earlier instant (a SPEC, see `kairos show --help`)
        #[arg(long, allow_hyphen_values = true)]
        from: String,
        /// The later instant
        #[arg(long, default_value = "latest", allow_hyphen_values = true)]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Materialise the state at an instant into a directory
    Restore {
        name: String,
        /// The instant to restore (a SPEC, see `kairos show --help`)
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        /// The directory to write; it must be empty or absent unless --force is given
        #[arg(long)]
        into: PathBuf,
        /// Replace what a non-empty target holds: afterwards it equals the frame (paths
        /// matching the replica's excludes are left alone)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check every stored object and frame (hashes, compression, tree structure)
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct AtArg {
    /// Which frame: `latest`, a frame id prefix (4+ hex digits), an RFC 3339 instant (the
    /// last frame at or before it) or an age such as `-10m`; `TIMELINE@SPEC` picks a timeline
    #[arg(
        long,
        default_value = "latest",
        value_name = "SPEC",
        allow_hyphen_values = true
    )]
    at: String,
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Register a replica: a root directory, process selectors and exclude globs
    Add {
        /// A name: letters, digits, '-', '_' and '.'
        name: String,
        /// The replica's root directory
        #[arg(long)]
        root: PathBuf,
        /// Processes to record: a plain word matches a process name exactly; a pattern with
        /// `*`, `?` or `[` is a glob over the whole command line (repeatable)
        #[arg(long = "process", value_name = "PATTERN")]
        processes: Vec<String>,
        /// Paths (relative to the root) to leave out, as globs, e.g. `*.log` or `tmp/**` (repeatable)
        #[arg(long = "exclude", value_name = "GLOB")]
        exclude: Vec<String>,
        /// How often a running node captures it, e.g. `5s` or `1m`
        #[arg(long, value_name = "DURATION", default_value = "5s")]
        capture_interval: String,
    },
    /// List registered replicas
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as for other Unix tools.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            let message = format!("{error:#}").replace('\n', " ");
            let _ = writeln!(std::io::stderr(), "kairos: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn open_store(data_dir: &Path) -> Result<Store> {
    Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let store = open_store(&cli.data_dir)?;
    let limits = Limits::default();
    let now = Instant::now();
    match cli.command {
        Command::Replica(ReplicaCommand::Add {
            name,
            root,
            processes,
            exclude,
            capture_interval,
        }) => {
            let interval = humantime::parse_duration(&capture_interval).with_context(|| {
                format!("--capture-interval {capture_interval:?} is not a duration")
            })?;
            let metadata = std::fs::metadata(&root).with_context(|| {
                format!("replica {name:?}: root {} is not readable", root.display())
            })?;
            if !metadata.is_dir() {
                bail!(
                    "replica {name:?}: root {} is not a directory",
                    root.display()
                );
            }
            let root = root
                .canonicalize()
                .with_context(|| format!("replica {name:?}: resolving root {}", root.display()))?;
            let replica = ReplicaDefinition {
                name,
                root,
                processes,
                exclude,
                capture_interval_ms: u64::try_from(interval.as_millis())
                    .unwrap_or(CAPTURE_INTERVAL_MS_DEFAULT),
            };
            replica.validate()?;
            check_patterns(&replica)?;
            store.add_replica(&replica)?;
            println!(
                "replica {:?} added (root {})",
                replica.name,
                replica.root.display()
            );
        }
        Command::Replica(ReplicaCommand::List { json }) => {
            let replicas = store.replicas()?;
            if json {
                print_json(&replicas)?;
            } else if replicas.is_empty() {
                println!("no replicas (add one with `kairos replica add NAME --root DIR`)");
            } else {
                for replica in replicas {
                    println!(
                        "{}\t{}\tevery {}\tprocesses: {}\texclude: {}",
                        replica.name,
                        replica.root.display(),
                        humantime::format_duration(replica.capture_interval()),
                        if replica.processes.is_empty() {
                            "-".into()
                        } else {
                            replica.processes.join(", ")
                        },
                        if replica.exclude.is_empty() {
                            "-".into()
                        } else {
                            replica.exclude.join(", ")
                        },
                    );
                }
            }
        }
        Command::Capture { name, json } => {
            let replica = store.replica(&name)?;
            let report = capture(
                &store,
                &CaptureRequest {
                    replica: &replica,
                    timeline: MAIN_TIMELINE,
                    limits,
                    skip: vec![cli.data_dir.clone()],
                },
            )?;
            if json {
                print_json(&output::CaptureJson::from(&report))?;
            } else {
                let frame = &report.frame;
                println!(
                    "frame {} at {}: {} entries, {}; read {} files, reused {}; stored {} new objects ({}); {} processes; {} ms",
                    frame.id.short(),
                    frame.time,
                    frame.entries,
                    bytes(frame.bytes),
                    report.files_read,
                    report.files_reused,
                    frame.objects_new,
                    bytes(frame.bytes_new_stored),
                    report.processes,
                    frame.capture_ms,
                );
                for (path, message) in &report.notes {
                    println!("  note {path}: {message}");
                }
            }
        }
        Command::History {
            name,
            timeline,
            json,
        } => {
            store.replica(&name)?;
            let frames = store.history(&name, &timeline)?;
            if json {
                print_json(
                    &frames
                        .iter()
                        .map(output::FrameJson::from)
                        .collect::<Vec<_>>(),
                )?;
            } else if frames.is_empty() {
                println!("replica {name:?} has no frames on timeline {timeline:?} yet");
            } else {
                println!(
                    "{:<12}  {:<30}  {:>9}  {:>10}  {:>10}",
                    "FRAME", "TIME", "ENTRIES", "SIZE", "NEW"
                );
                for frame in &frames {
                    println!(
                        "{:<12}  {:<30}  {:>9}  {:>10}  {:>10}",
                        frame.id.short(),
                        frame.time.to_string(),
                        frame.entries,
                        bytes(frame.bytes),
                        bytes(frame.bytes_new_stored)
                    );
                }
            }
        }
        Command::Show { name, at, json } => {
            let view = open(&store, &name, &parse_spec(&at.at)?, now)?;
            let listing = listing(&store, &view)?;
            if json {
                print_json(&listing)?;
            } else {
                output::print_listing(&listing)?;
            }
        }
        Command::Cat { name, path, at } => {
            let view = open(&store, &name, &parse_spec(&at.at)?, now)?;
            let reader = store.reader()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            use std::os::unix::ffi::OsStrExt;
            view.cat(&reader, path.as_os_str().as_bytes(), &limits, &mut out)?;
            out.flush().context("writing to standard output")?;
        }
        Command::Diff {
            name,
            from,
            to,
            json,
        } => {
            let from_view = open(&store, &name, &parse_spec(&from)?, now)?;
            let to_view = open(&store, &name, &parse_spec(&to)?, now)?;
            let changes = diff(&store, &from_view, &to_view)?;
            if json {
                print_json(&changes)?;
            } else {
                output::print_diff(&changes)?;
            }
        }
        Command::Restore {
            name,
            at,
            into,
            force,
            json,
        } => {
            let replica = store.replica(&name)?;
            let view = open(&store, &name, &parse_spec(&at)?, now)?;
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(view.frame.bytes),
                if std::io::stderr().is_terminal() && !json {
                    indicatif::ProgressDrawTarget::stderr()
                } else {
                    indicatif::ProgressDrawTarget::hidden()
                },
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let progress = |written: u64| bar.set_position(written);
            let report = restore(
                &store,
                &view,
                &into,
                &RestoreOptions {
                    force,
                    exclude: replica.exclude.clone(),
                    progress: Some(&progress),
                },
            )?;
            bar.finish_and_clear();
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "restored frame {} into {}: {} files, {} directories, {} symlinks, {}{} in {} ms",
                    view.frame.id.short(),
                    into.display(),
                    report.files,
                    report.directories,
                    report.symlinks,
                    bytes(report.bytes),
                    if report.removed > 0 {
                        format!(", removed {} entries", report.removed)
                    } else {
                        String::new()
                    },
                    report.duration_ms
                );
                for skipped in &report.skipped {
                    println!("  skipped {skipped}");
                }
            }
        }
        Command::Verify { json } => {
            let report = store.verify()?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "{} replicas, {} frames, {} objects ({} stored), {} reachable, {} orphaned",
                    report.replicas,
                    report.frames,
                    report.objects,
                    bytes(report.bytes_stored),
                    report.objects_reachable,
                    report.objects_orphaned
                );
                for problem in &report.problems {
                    println!("problem: {problem}");
                }
            }
            if !report.ok {
                bail!(
                    "the store has {} problems (listed above)",
                    report.problems_count
                );
            }
            if !json {
                println!("ok");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_spec(text: &str) -> Result<TimelineSpec> {
    Ok(TimelineSpec::parse(text)?)
}

fn check_patterns(replica: &ReplicaDefinition) -> Result<()> {
    for pattern in &replica.processes {
        kairos_capture::process::Selector::new(pattern)?;
    }
    kairos_capture::capture::build_excludes(replica)?;
    Ok(())
}
