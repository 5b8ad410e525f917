//! The `kairos` command: thin over the library crates. Parses arguments, then runs the
//! command on the store in the data directory or, with `--node`, through a running node's
//! API (same output either way); `kairos up` runs a node.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kairos_core::spec::MAIN_TIMELINE;

mod backend;
mod output;

use backend::Backend;
use output::{bytes, print_json};

/// Kairos records the complete state of service replicas over time, replays any past
/// instant, diffs instants and restores them.
#[derive(Parser)]
#[command(name = "kairos", version, about, long_about = None)]
struct Cli {
    /// Where the store lives [default: $KAIROS_DATA_DIR, else ./.kairos]
    #[arg(long, global = true, env = "KAIROS_DATA_DIR", hide_env_values = true)]
    data_dir: Option<PathBuf>,
    /// Run the command through the node at this URL (e.g. http://127.0.0.1:7700) instead
    /// of on the data directory (a node running on the data directory is used by itself)
    #[arg(long, global = true, env = "KAIROS_NODE", hide_env_values = true)]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: capture every configured replica continuously and serve the HTTP API
    /// (prints "listening on http://ADDR" once ready; Ctrl-C or SIGTERM stops it cleanly)
    Up {
        /// Configuration file [default: config/kairos.toml if it exists, else built-in defaults]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address for the API, e.g. 127.0.0.1:7700 (overrides node.listen)
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
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
        /// Command that checks a sandbox materialised in a scratch directory; `{root}` is
        /// replaced by its path (e.g. `nginx -t -p {root} -c {root}/nginx.conf`)
        #[arg(long, value_name = "COMMAND")]
        check: Option<String>,
        /// How long the check may run before it is killed with its children [default: 60s]
        #[arg(long, value_name = "DURATION")]
        check_timeout: Option<String>,
        /// Command run after a commit, rollback or revert writes the live root (e.g. a reload)
        #[arg(long, value_name = "COMMAND")]
        after_commit: Option<String>,
        /// How long probes watch a commit on main before it counts as good [default: 10s]
        #[arg(long, value_name = "DURATION")]
        watch_window: Option<String>,
        /// How often probes run during the watch window [default: 500ms]
        #[arg(long, value_name = "DURATION")]
        probe_interval: Option<String>,
        /// A named command proposals may ask for, as NAME=COMMAND (repeatable)
        #[arg(long = "action", value_name = "NAME=COMMAND")]
        actions: Vec<String>,
        /// A health check after commits: `http:URL[=STATUS]`, `command:CMD`,
        /// `process:SELECTOR`, `metric:NAME<=MAX` or `metric:NAME>=MIN` (repeatable)
        #[arg(long = "probe", value_name = "KIND:SPEC")]
        probes: Vec<String>,
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

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Up { config, listen } = cli.command {
        return up(config, listen, cli.data_dir);
    }
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(kairos_config::DATA_DIR_DEFAULT));
    // A node that owns the data directory holds the store: go through it.
    let backend = match cli
        .node
        .clone()
        .or_else(|| kairos_node::running_node(&data_dir))
    {
        Some(url) => Backend::node(&url)?,
        None => Backend::direct(&data_dir)?,
    };
    match cli.command {
        Command::Up { .. } => unreachable!("handled above"),
        Command::Replica(ReplicaCommand::Add {
            name,
            root,
            processes,
            exclude,
            capture_interval,
            check,
            check_timeout,
            after_commit,
            watch_window,
            probe_interval,
            actions,
            probes,
        }) => {
            let settings = kairos_capture::ReplicaSettings {
                check,
                check_timeout,
                after_commit,
                watch_window,
                probe_interval,
                actions,
                probes,
            };
            let replica = backend.add_replica(
                &name,
                &root,
                processes,
                exclude,
                &capture_interval,
                settings,
            )?;
            println!(
                "replica {:?} added (root {})",
                replica.name,
                replica.root.display()
            );
        }
        Command::Replica(ReplicaCommand::List { json }) => {
            let replicas = backend.replicas()?;
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
            let report = backend.capture(&name)?;
            if json {
                print_json(&report)?;
            } else {
                let frame = &report.frame;
                println!(
                    "frame {} at {}: {} entries, {}; read {} files, reused {}; stored {} new objects ({}); {} processes; {} ms",
                    frame.frame.short(),
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
                for note in &report.notes {
                    println!("  note {}: {}", note.path, note.message);
                }
            }
        }
        Command::History {
            name,
            timeline,
            json,
        } => {
            let frames = backend.history(&name, &timeline)?;
            if json {
                print_json(&frames)?;
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
                        frame.frame.short(),
                        frame.time.to_string(),
                        frame.entries,
                        bytes(frame.bytes),
                        bytes(frame.bytes_new_stored)
                    );
                }
            }
        }
        Command::Show { name, at, json } => {
            let listing = backend.state(&name, &at.at)?;
            if json {
                print_json(&listing)?;
            } else {
                output::print_listing(&listing)?;
            }
        }
        Command::Cat { name, path, at } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            backend.cat(&name, &path, &at.at, &mut out)?;
            out.flush().context("writing to standard output")?;
        }
        Command::Diff {
            name,
            from,
            to,
            json,
        } => {
            let changes = backend.diff(&name, &from, &to)?;
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
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
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
            let total = |bytes: u64| bar.set_length(bytes);
            let report = backend.restore(&name, &at, &into, force, &progress, &total)?;
            bar.finish_and_clear();
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "restored frame {} into {}: {} files, {} directories, {} symlinks, {}{} in {} ms",
                    &report.frame[..12.min(report.frame.len())],
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
            let report = backend.verify()?;
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

/// `kairos up`: loads the configuration and runs a node until SIGINT or SIGTERM.
fn up(
    config: Option<PathBuf>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let flags = kairos_config::Flags { listen, data_dir };
    let config = kairos_config::load(config.as_deref(), std::env::vars(), &flags)?;
    let mut telemetry = kairos_telemetry::init(&config.telemetry)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown = async {
            let interrupt = tokio::signal::ctrl_c();
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(_) => return,
                };
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("stopping: finishing captures in flight");
        };
        kairos_node::run(
            config,
            |address| {
                println!("listening on http://{address}");
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await
    });
    // Export what is buffered before leaving, even when the node failed.
    telemetry.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
