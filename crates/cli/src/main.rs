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
mod fromdir;
mod gate;
mod generate;
mod output;
mod repair;
mod watch;

use backend::Backend;
use output::{bytes, print_json};

/// Kairos records the complete state of service replicas over time, replays any past
/// instant, diffs instants and restores them; parties propose changes, try them in
/// sandboxes, commit chosen ops, and bad commits are rolled back automatically.
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
    /// Configuration file: the node's settings for `up`, and the limits every command
    /// applies [default: config/kairos.toml if it exists, else built-in defaults]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A party's token, sent to the node as a bearer token (needed once parties exist,
    /// and whenever the node listens beyond loopback) [default: $KAIROS_TOKEN]
    #[arg(long, global = true, env = "KAIROS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM certificate of the authority that signed an https:// node's certificate
    /// [default: $KAIROS_CA_CERT, else the WebPKI roots]
    #[arg(long, global = true, env = "KAIROS_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// The party acting (recorded in the audit log) [default: $KAIROS_PARTY, else $USER]
    #[arg(long, global = true, env = "KAIROS_PARTY", hide_env_values = true)]
    party: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: capture every configured replica continuously and serve the HTTP API
    /// (prints "listening on http://ADDR", or https:// with TLS, once ready; Ctrl-C or
    /// SIGTERM stops it cleanly)
    Up {
        /// Address for the API, e.g. 127.0.0.1:7700 (overrides node.listen)
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Register or list replicas (the services Kairos watches)
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Manage parties: the teams and pipelines that act through the API, with their roles
    /// and tokens
    #[command(subcommand)]
    Party(PartyCommand),
    /// Run nodes as one cluster (openraft): form it, join and leave it, see its members,
    /// leader and replica placement, move the leadership. Talks to a running node
    /// (--node URL, or the node on the data directory)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Capture the current state of a replica as a new frame (always stored; a node's own
    /// interval and file-change captures store one only when the state changed). Through
    /// a cluster member, it answers once the frame is on `cluster.replication` members
    Capture(CaptureArgs),
    /// List the frames of a replica, oldest first
    History(HistoryArgs),
    /// Show the state at an instant: files, config keys, processes and metrics
    Show(ShowArgs),
    /// Print a file's bytes as they were at an instant
    Cat(CatArgs),
    /// Show what changed between two instants (files, config keys, processes, metrics)
    Diff(DiffArgs),
    /// Materialise the state at an instant into a directory
    Restore(RestoreArgs),
    /// Check the store file's own structure (redb's integrity check: every page's checksum,
    /// the commit slot in use, the allocator state), every key, every stored object and
    /// frame (hashes, compression, tree structure) and the catalog copy; exits non-zero
    /// naming what is damaged (then see `kairos repair`)
    Verify(VerifyArgs),
    /// Recover a damaged store: keeps what still verifies (objects, frames, the catalog
    /// copy kept beside the file), says exactly which frames were lost, and keeps the
    /// damaged file beside the new one. Captures and commits are refused until it has run
    Repair {
        #[arg(long)]
        json: bool,
    },
    /// Fork, list and delete timelines (main follows the live replica)
    #[command(subcommand)]
    Timeline(TimelineCommand),
    /// Propose a change: ops checked against a base frame and stored (prints its id)
    ///
    /// The document (JSON or TOML) has `title`, `author`, an optional `base`
    /// (TIMELINE@SPEC, default the latest frame of --timeline) and ordered `ops`, each with
    /// an `op` of: put_file {path, content | content_base64 | from: LOCAL_FILE, mode},
    /// patch_file {path, unified_diff}, delete {path}, set_config {file, key, value},
    /// unset_config {file, key}, action {name}. Paths are relative to the replica root.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "from_dir"])))]
    Propose(ProposeArgs),
    /// Apply a proposal to a copy of its base and show the diff; --run-check materialises
    /// it in a scratch directory and runs the replica's check there (exit 1 if it fails)
    Sandbox(SandboxArgs),
    /// Commit a proposal (all ops or --ops) to its timeline; on main the live replica is
    /// written, then probes watch it and a failure rolls it back. Exit 1 unless committed.
    /// A timeline with a review policy (`[replica.policy]` in the configuration) refuses
    /// the commit, naming what is missing, until the policy is met
    Commit(CommitArgs),
    /// Gate a change for a pipeline: propose it, predict it, try it in a sandbox, and with
    /// --commit commit it if it passes. Exit 0: passed (and committed, with --commit); 1:
    /// refused (the reasons are printed); 2: the gate could not run (bad input, unknown
    /// replica, node unreachable, a missing or wrong token, a role too low)
    ///
    /// The rule, criterion by criterion (each one is in every format):
    /// `confidence` — the prediction must be trusted: the model does not abstain and its
    /// confidence is at least --min-confidence. A replica without a trained model always
    /// abstains, so a gate without a model refuses unless --min-confidence 0; then an
    /// abstaining prediction is accepted and --run-check makes the real check decide
    /// (with --min-confidence 0 and no --run-check nothing is checked at all; a
    /// prediction that makes a call is still held to --max-risk).
    /// `risk` — the predicted P(error) is at most --max-risk (skipped when the model
    /// abstains). `check` — with --run-check, the replica's check passes in a sandbox.
    /// `commit` — with --commit, a passing proposal is committed and must end committed
    /// (a commit refused by the review policy or a busy replica, a conflict or a rollback
    /// refuse). The prediction is made before the sandbox and the commit, and scored by
    /// their outcome. Every verdict is a `gate` event in the audit log (webhooks, NATS,
    /// `kairos watch`). Formats: text; json (schema `kairos.gate/1`: schema, replica,
    /// proposal, title, author, timeline, base, ops, verdict, reasons, criteria,
    /// thresholds, prediction, diff, check, commit); markdown (a pull-request comment);
    /// junit (one testsuite, one testcase per criterion)
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "from_dir"])))]
    Gate(GateArgs),
    /// Approve or reject a proposal (a reviewer's; each party's latest verdict counts)
    ///
    /// A timeline's review policy (`[replica.policy]`, `[replica.policy.timeline.NAME]`
    /// in the configuration) decides what a commit needs: `required_approvals` standing
    /// approvals, from the parties of `reviewers_from` (any party when empty), the author's
    /// own not counting with `authors_cannot_approve` (the author may then not approve at
    /// all), and, with `require_prediction_below`, a confident prediction with P(error)
    /// below that. A reject by a party whose approval would count is a veto until that
    /// party approves. The review is logged, addressed to the proposal's author
    #[command(group(clap::ArgGroup::new("verdict").required(true).args(["approve", "reject"])))]
    Review(ReviewArgs),
    /// List a replica's proposals, newest first: author, timeline, base, status (open,
    /// rejected, committing, committed, rolled_back, conflict, failed), approvals and
    /// rejections, the latest prediction, the last check, interference with other
    /// proposals and what the review policy still asks
    Proposals(ProposalsArgs),
    /// Restore a frame to the live replica by hand, recorded as a commit; or, with
    /// --culprit, propose the minimal revert of one frame
    Revert(RevertArgs),
    /// Find the first frame between a good and a bad instant at which the check fails
    ///
    /// A binary search over the frames from --good to --bad along --bad's history: each
    /// step materialises a frame in a scratch directory and runs the replica's check there
    /// (or --check). Frames whose files equal a checked frame's are not checked again.
    /// Answers the first bad and last good frames, the steps, what the culprit changed
    /// (files, config keys) and every check run. When the check is not monotonic over the
    /// range (it fails, then passes again) it says so and lists the transitions instead.
    /// With --propose-revert, proposes the minimal revert of the culprit (see `kairos
    /// revert --culprit`). Exit 0 when a culprit is found, 1 otherwise. Runs on the data
    /// directory (it holds the store meanwhile), not through a node
    Bisect(BisectArgs),
    /// Stream events as they happen: new frames, forks, proposals, sandboxes, predictions,
    /// reviews, commits, probes, rollbacks, reverts, models, forgets, gate verdicts
    ///
    /// From the node's API (server-sent events; the node on the data directory, or
    /// --node), or with --nats URL from the replica's JetStream stream as a party (NATS
    /// user: the party's name, password: its token). One line per event, or one JSON
    /// object per line with --json (the schema `kairos.event/1`: schema, id, replica,
    /// timeline, event, time, party, seq, details). Runs until interrupted, or --count
    Watch(WatchArgs),
    /// The replica's audit log: proposals, sandboxes, commits, probes, rollbacks, reverts
    /// (hash-chained; exit 1 if the chain is broken)
    Log(LogArgs),
    /// Predict a proposal's outcome before anything runs: P(error), a confidence, whether
    /// the model abstains (a proposal unlike anything seen), predicted resource change,
    /// affected entries and what moved the prediction most. Stored, to be scored against
    /// the outcome that follows
    Predict(PredictArgs),
    /// The predictor's model of a replica: train it, show it, report its record
    #[command(subcommand)]
    Model(ModelCommand),
    /// Rank candidate values of one config key by predicted risk (then by predicted CPU
    /// or RSS change), with the confidence of each
    Suggest(SuggestArgs),
    /// Forget frames by retention rules, as restic's forget: says what goes and why the
    /// rest stays
    ///
    /// Each timeline's policy comes from the configuration (`[replica.retention]`, its
    /// `timeline.NAME` tables, or the default `[retention]`); the flags override its rules.
    /// `--keep-last N` keeps the N newest frames; `--keep-hourly/--keep-daily/--keep-weekly
    /// N` the newest frame of each of the last N hours, days or ISO weeks (UTC) that have
    /// frames; `--keep-within D` every frame within D of the newest. Never forgotten: a
    /// timeline head, the base of a proposal not yet committed, the last good frame and
    /// the frames of a commit in progress. Without --timeline, the frames of deleted forks
    /// (on no timeline, readable only by id) go too. Objects stay until `kairos gc`
    /// reclaims them.
    /// A running node applies the policies every `[retention] interval` by itself
    Forget(ForgetArgs),
    /// Roll back commits a crash left in progress (of one replica, or of all) to their
    /// last good frame, and log it. A node does this when it starts; commit and revert
    /// on a data directory do it first by themselves
    Recover(RecoverArgs),
    /// Reclaim space: remove the objects no kept frame or record needs and repack segments
    /// that are mostly dead, while captures and commits go on
    ///
    /// Roots are every frame record (all timelines) and every object a proposal, sandbox,
    /// commit, fork or other catalog record names; the audit log keeps nothing alive. A
    /// crash at any point loses nothing a kept frame needs (`kairos verify` stays clean).
    /// Pack files a fifth dead or more have their live segments moved and are removed, on a
    /// data directory and through a node alike; on a data directory the store file is also
    /// compacted, so it shrinks (through a node its freed pages are reused by later writes).
    /// Frames leave the store only when they are forgotten (retention); `gc` never removes
    /// a frame
    Gc(GcArgs),
    /// The store's figures: replicas, frames, objects (reachable and reclaimable), bytes raw
    /// (files over every frame), stored (objects as compressed), in segments and on disk,
    /// the dedup ratio (raw / stored), dictionaries, the bytes `kairos gc` would reclaim, and
    /// the dead bytes it leaves in segments still mostly live
    Stats(StatsArgs),
    /// Print the shell completion script for bash, zsh or fish
    ///
    /// bash: `kairos completions bash > /usr/share/bash-completion/completions/kairos`
    /// (or `source <(kairos completions bash)` in ~/.bashrc); zsh: into a directory of
    /// $fpath as `_kairos`; fish: `kairos completions fish >
    /// ~/.config/fish/completions/kairos.fish`. deploy/install does all three
    Completions {
        #[arg(value_enum)]
        shell: generate::CompletionShell,
    },
    /// Write the man pages: one per command and subcommand (kairos.1, kairos-capture.1,
    /// kairos-replica-add.1, ...) into --dir, or print the top page, kairos.1
    ///
    /// `man -l kairos.1` reads a page in place; deploy/install puts them in
    /// /usr/local/share/man/man1
    Man {
        /// Write every page into this directory (made if missing) and list the files
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PredictArgs {
    name: String,
    /// Proposal id (4+ hex digits)
    proposal: String,
    /// Only these ops, by 1-based index, e.g. `1,3`
    #[arg(long, value_name = "LIST")]
    ops: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Train a model on the replica's outcomes (sandbox checks and commits; the most
    /// recent fifth is held out to calibrate it) and make it the serving one. A node
    /// retrains by itself as outcomes arrive
    Train {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The serving model: version, training range, held-out figures, outcomes known and
    /// when it retrains next
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The honest record: every stored prediction scored against the outcome that
    /// followed it (Brier, AUC, calibration error, reliability bins, accuracy and
    /// coverage by confidence), beside the majority-class and per-key baselines
    Report {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct SuggestArgs {
    name: String,
    /// The key to vary, as FILE:KEY (e.g. `nginx.conf:worker_processes`)
    #[arg(long, value_name = "FILE:KEY")]
    key: String,
    /// Candidate values, comma-separated
    #[arg(long, value_name = "V1,V2,...", value_delimiter = ',', required = true)]
    values: Vec<String>,
    /// Among equally safe values, prefer the smaller predicted change of this resource
    #[arg(long, value_parser = ["cpu", "rss"])]
    objective: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CaptureArgs {
    /// The replica to capture
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HistoryArgs {
    name: String,
    /// The timeline to list
    #[arg(long, default_value = MAIN_TIMELINE)]
    timeline: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ShowArgs {
    name: String,
    #[command(flatten)]
    at: AtArg,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CatArgs {
    name: String,
    /// Path of the file, relative to the replica root
    path: PathBuf,
    #[command(flatten)]
    at: AtArg,
}

#[derive(Args)]
struct DiffArgs {
    name: String,
    /// The earlier instant (a SPEC, see `kairos show --help`)
    #[arg(long, allow_hyphen_values = true)]
    from: String,
    /// The later instant
    #[arg(long, default_value = "latest", allow_hyphen_values = true)]
    to: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestoreArgs {
    name: String,
    /// The instant to restore (a SPEC, see `kairos show --help`)
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// The directory to write; it must be empty or absent unless --force is given.
    /// Never the store's data directory (nor, with --force, a directory inside it); a
    /// directory that holds the data directory is restored around it, which stays untouched
    #[arg(long)]
    into: PathBuf,
    /// Replace what a non-empty target holds: afterwards it equals the frame (paths
    /// matching the replica's excludes, and the store's data directory, are left alone;
    /// files whose size and modification time match the frame are kept, as rsync's quick
    /// check does)
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GcArgs {
    /// Report what would be removed and repacked; write nothing
    #[arg(long)]
    dry_run: bool,
    /// Live bytes copied out of mostly dead segments at most (0: repack nothing; segments
    /// left whole are still removed)
    #[arg(long, value_name = "BYTES", default_value_t = kairos_store::gc::REPACK_BYTES_DEFAULT)]
    max_repack_bytes: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatsArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ProposeArgs {
    name: String,
    /// The proposal document (JSON or TOML)
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Derive the ops from how DIR differs from the base (e.g. a restored, edited copy)
    #[arg(long, value_name = "DIR")]
    from_dir: Option<PathBuf>,
    /// The timeline to propose on [default: main]
    #[arg(long)]
    timeline: Option<String>,
    /// Title for --from-dir proposals
    #[arg(long)]
    title: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SandboxArgs {
    name: String,
    /// Proposal id (4+ hex digits)
    proposal: String,
    /// Only these ops, by 1-based index, e.g. `1,3`
    #[arg(long, value_name = "LIST")]
    ops: Option<String>,
    #[arg(long)]
    run_check: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GateArgs {
    name: String,
    /// The proposal document (JSON or TOML), as for `kairos propose`
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Derive the ops from how DIR differs from the base, as for `kairos propose`
    #[arg(long, value_name = "DIR")]
    from_dir: Option<PathBuf>,
    /// The timeline to propose on [default: main]
    #[arg(long)]
    timeline: Option<String>,
    /// Title for --from-dir proposals
    #[arg(long)]
    title: Option<String>,
    /// Refuse when the predicted P(error) is above this
    #[arg(long, value_name = "P", default_value_t = kairos_ops::gate::MAX_RISK_DEFAULT)]
    max_risk: f32,
    /// Refuse when the prediction's confidence is below this or the model abstains; 0
    /// accepts an abstaining or unsure prediction (then --run-check decides; a call the
    /// model makes is still held to --max-risk)
    #[arg(long, value_name = "C", default_value_t = kairos_ops::gate::MIN_CONFIDENCE_DEFAULT)]
    min_confidence: f32,
    /// Run the replica's check in a sandbox; a failing check refuses
    #[arg(long)]
    run_check: bool,
    /// Commit the proposal if it passes, and wait for the commit's watch window (a
    /// committer's; a refused or rolled-back commit refuses)
    #[arg(long)]
    commit: bool,
    /// How the report is printed
    #[arg(long, value_enum, default_value = "text")]
    format: gate::GateFormat,
    /// Also write the report in another format to a file, e.g. `junit:gate.xml` or
    /// `markdown:comment.md` (repeatable)
    #[arg(long, value_name = "FORMAT:FILE", value_parser = gate::parse_write)]
    write: Vec<gate::WriteTo>,
}

#[derive(Args)]
struct CommitArgs {
    name: String,
    /// Proposal id (4+ hex digits)
    proposal: String,
    /// Only these ops, by 1-based index, e.g. `1,3`
    #[arg(long, value_name = "LIST")]
    ops: Option<String>,
    /// Answer "watching" at once instead of waiting for the watch window (needs a node)
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReviewArgs {
    name: String,
    /// Proposal id (4+ hex digits)
    proposal: String,
    /// Approve the proposal
    #[arg(long)]
    approve: bool,
    /// Reject it (a veto while it stands, when your approval would count)
    #[arg(long)]
    reject: bool,
    /// Why, for the author (at most 2000 bytes)
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ProposalsArgs {
    name: String,
    /// Only proposals on this timeline
    #[arg(long)]
    timeline: Option<String>,
    /// Only proposals with this status: open, rejected, committing, committed,
    /// rolled_back, conflict, failed
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["to", "culprit"])))]
struct RevertArgs {
    name: String,
    /// The frame to restore (a SPEC)
    #[arg(long, allow_hyphen_values = true)]
    to: Option<String>,
    /// Propose (not commit) the minimal revert of this frame (a SPEC, `TIMELINE@SPEC` for
    /// a fork) on its timeline's head: each file and config key it changed goes back to
    /// its value in the frame before it; an entry changed again since is a conflict named
    /// in the answer, never overwritten. Commit the proposal as any other
    #[arg(long, allow_hyphen_values = true, value_name = "FRAME")]
    culprit: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BisectArgs {
    /// The replica
    name: String,
    /// A frame where the check passes (a SPEC, see `kairos show --help`)
    #[arg(long, allow_hyphen_values = true, value_name = "SPEC")]
    good: String,
    /// A later frame where it fails, on a timeline descending from --good
    #[arg(long, allow_hyphen_values = true, value_name = "SPEC")]
    bad: String,
    /// A command to run instead of the replica's check; `{root}` is replaced by the
    /// scratch copy's path (it is also the working directory)
    #[arg(long, value_name = "COMMAND")]
    check: Option<String>,
    /// How long one check may run [default: the replica's check timeout]; a check that
    /// times out stops the bisect
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Check every distinct state of the range, not only those a binary search needs
    /// (proves the check monotonic, or lists every transition)
    #[arg(long)]
    exhaustive: bool,
    /// Also propose the minimal revert of the culprit (prints the proposal's id)
    #[arg(long)]
    propose_revert: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForgetArgs {
    /// The replica
    name: String,
    /// Only this timeline (else every timeline that has a policy)
    #[arg(long)]
    timeline: Option<String>,
    /// Keep the N newest frames
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest frame of each of the last N hours that have frames
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest frame of each of the last N days (UTC) that have frames
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest frame of each of the last N ISO weeks (UTC) that have frames
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep every frame within this duration of the newest (e.g. 2d, 12h)
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Only say what would go; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON (every frame, kept or forgotten, with why)
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct WatchArgs {
    /// Only this replica's events (required with --nats)
    name: Option<String>,
    /// Only this timeline's events
    #[arg(long)]
    timeline: Option<String>,
    /// Start with the events since an instant (RFC 3339), a duration ago (10m, 2h), or
    /// `start` (everything kept); default: only new events
    #[arg(long, value_name = "SPEC")]
    since: Option<String>,
    /// Stop after this many events
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Read NATS JetStream at this URL (nats://HOST:PORT) instead of the node's API
    #[arg(long, value_name = "URL", env = "KAIROS_NATS_URL")]
    nats: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RecoverArgs {
    /// Only this replica
    name: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PartyCommand {
    /// Add a party; its token is printed once (store it: only its hash is kept). The token
    /// is also the party's NATS password (its NATS user is its name; see `[nats]
    /// authorization_file`). On a data directory with no node running this needs no
    /// token: that is how the first admin is made
    Add {
        /// A name: letters, digits, '-', '_' and '.'
        name: String,
        /// viewer (reads), proposer (+ propose, sandbox, fork, capture), reviewer,
        /// committer (+ commit, revert), admin (+ replicas and their commands, restore,
        /// verify, parties)
        #[arg(long)]
        role: String,
        /// Limit the party to this replica (repeatable; default: every replica)
        #[arg(long = "replica", value_name = "NAME")]
        replicas: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List parties (never their tokens)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a party: its token stops working at once
    Revoke { name: String },
}

#[derive(Subcommand)]
enum TimelineCommand {
    /// Make timeline NAME start at a frame (a pointer, not a copy)
    Fork {
        name: String,
        #[arg(long)]
        replica: String,
        /// The frame to fork from (a SPEC, `TIMELINE@SPEC` allowed)
        #[arg(long, allow_hyphen_values = true)]
        at: String,
        #[arg(long)]
        json: bool,
    },
    /// List a replica's timelines with their heads
    List {
        replica: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a fork (its frames stay readable by id)
    Delete { replica: String, name: String },
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

// Parsed once per process: the size of the `add` variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
        /// In a cluster, the member that can reach the root (its node id, or the host of
        /// its advertise URL): the replica is watched there only, never moved elsewhere
        #[arg(long, value_name = "MEMBER")]
        host: Option<String>,
    },
    /// List registered replicas
    List {
        #[arg(long)]
        json: bool,
    },
}

/// mimalloc instead of the C library's allocator: a capture allocates and frees buffers
/// of every size on several threads at once, where glibc's arenas spend a few percent of
/// the capture in their locks and give memory back to the kernel only to fault it in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as for other Unix tools.
    // SAFETY: called at the start of main, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // SAFETY: called at the start of main, before any thread exists.
    unsafe { kairos_ops::learn::prepare_process() };
    let cli = Cli::parse();
    // A pipeline tells a refusal (1) from a gate that could not run (2).
    let failure = if matches!(cli.command, Command::Gate(_)) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    };
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            let message = format!("{error:#}").replace('\n', " ");
            let _ = writeln!(std::io::stderr(), "kairos: error: {message}");
            failure
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(done) = habits_command(&cli.command) {
        return done;
    }
    if let Command::Up { listen } = cli.command {
        return up(cli.config, listen, cli.data_dir);
    }
    let party = cli
        .party
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "cli".to_string());
    if !kairos_core::replica::is_valid_replica_name(&party) {
        bail!(
            "party {party:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64 characters"
        );
    }
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(kairos_config::DATA_DIR_DEFAULT));
    if let Command::Repair { json } = cli.command {
        let node_in_use = cli.node.is_some() || kairos_node::running_node(&data_dir).is_some();
        return repair::run(&data_dir, node_in_use, json);
    }
    if let Command::Watch(args) = &cli.command {
        return watch_command(&cli, args, &party, &data_dir);
    }
    // A node that owns the data directory holds the store: go through it.
    let backend = match cli
        .node
        .clone()
        .or_else(|| kairos_node::running_node(&data_dir))
    {
        Some(url) => Backend::node(
            &url,
            cli.token.as_deref(),
            cli.party.is_some(),
            cli.ca_cert.as_deref(),
        )?,
        None => {
            // The same limits a node on this configuration applies.
            let flags = kairos_config::Flags {
                listen: None,
                data_dir: Some(data_dir.clone()),
            };
            let config = kairos_config::load(cli.config.as_deref(), std::env::vars(), &flags)?;
            // Changes use the replicas as the configuration defines them (checks,
            // actions, probes), as a node on this configuration would: configuration wins.
            let changes = matches!(
                cli.command,
                Command::Capture(_)
                    | Command::Propose(_)
                    | Command::Sandbox(_)
                    | Command::Commit(_)
                    | Command::Gate(_)
                    | Command::Review(_)
                    | Command::Revert(_)
                    | Command::Recover(_)
                    | Command::Bisect(_)
                    | Command::Forget(_)
            );
            let adopts = changes && !config.replicas.is_empty();
            // Only commands that register something make a store; a mistyped --data-dir
            // is reported, not created.
            let creates = adopts
                || matches!(
                    cli.command,
                    Command::Replica(ReplicaCommand::Add { .. })
                        | Command::Party(PartyCommand::Add { .. })
                );
            if !creates && config.store.is_embedded() && !data_dir.exists() {
                bail!(
                    "no store in {}: the directory does not exist (`kairos replica add` makes one; check --data-dir or KAIROS_DATA_DIR)",
                    data_dir.display()
                );
            }
            if config.cluster.is_some()
                && (creates
                    || changes
                    || matches!(
                        cli.command,
                        Command::Party(_) | Command::Replica(_) | Command::Timeline(_)
                    ))
                && data_dir.join("raft").join("cluster.json").exists()
            {
                bail!(
                    "{} belongs to a cluster member: changes go through a running node (kairos up, then this command with --node URL)",
                    data_dir.display()
                );
            }
            let mut backend = Backend::direct(&data_dir, &config.store, config.limits)?;
            backend.set_retention_default(config.retention.default);
            if adopts {
                backend.adopt(&config.replicas)?;
            }
            backend
        }
    };
    match cli.command {
        // Handled before a backend is chosen.
        Command::Up { .. }
        | Command::Repair { .. }
        | Command::Watch(_)
        | Command::Completions { .. }
        | Command::Man { .. } => Ok(ExitCode::SUCCESS),
        Command::Replica(command) => replica(&backend, command),
        Command::Party(command) => party_command(&backend, command, &party),
        Command::Cluster(command) => cluster_command(&backend, command),
        Command::Capture(args) => capture_command(&backend, args),
        Command::History(args) => history_command(&backend, args),
        Command::Show(args) => show_command(&backend, args),
        Command::Cat(args) => cat_command(&backend, args),
        Command::Diff(args) => diff_command(&backend, args),
        Command::Restore(args) => restore_command(&backend, args),
        Command::Verify(args) => verify_command(&backend, args),
        Command::Timeline(command) => timeline(&backend, command, &party),
        Command::Propose(args) => propose_command(&backend, args, &party),
        Command::Sandbox(args) => sandbox_command(&backend, args, &party),
        Command::Commit(args) => commit_command(&backend, args, &party),
        Command::Gate(args) => gate_command(&backend, args, &party),
        Command::Review(args) => review_command(&backend, args, &party),
        Command::Proposals(args) => proposals_command(&backend, args),
        Command::Revert(args) => revert_command(&backend, args, &party),
        Command::Log(args) => log_command(&backend, args),
        Command::Recover(args) => recover_command(&backend, args),
        Command::Gc(args) => gc_command(backend, args),
        Command::Stats(args) => stats_command(&backend, args),
        Command::Forget(args) => forget_command(&backend, args, &party),
        Command::Predict(args) => predict_command(&backend, args, &party),
        Command::Model(command) => model_command(&backend, command, &party),
        Command::Suggest(args) => suggest_command(&backend, args),
        Command::Bisect(args) => bisect_command(&backend, args, &party),
    }
}

/// `kairos completions` and `kairos man`, which need no store, node or party; `None` for
/// every other command.
fn habits_command(command: &Command) -> Option<Result<ExitCode>> {
    let cli = || <Cli as clap::CommandFactory>::command();
    let done = match command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            generate::completions(cli(), *shell, &mut out);
            out.flush().context("writing the completion script")
        }
        Command::Man { dir: Some(dir) } => generate::man_pages(cli(), dir).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
        }),
        Command::Man { dir: None } => {
            let mut out = std::io::stdout().lock();
            generate::man_page(cli(), &mut out)
                .and_then(|()| out.flush())
                .context("writing the man page")
        }
        _ => return None,
    };
    Some(done.map(|()| ExitCode::SUCCESS))
}

fn watch_command(
    cli: &Cli,
    args: &WatchArgs,
    party: &str,
    data_dir: &std::path::Path,
) -> Result<ExitCode> {
    let (subject_prefix, stream_prefix) = match &args.nats {
        Some(_) => {
            let flags = kairos_config::Flags {
                listen: None,
                data_dir: Some(data_dir.to_path_buf()),
            };
            let config = kairos_config::load(cli.config.as_deref(), std::env::vars(), &flags)?;
            config
                .nats
                .map(|nats| (nats.subject_prefix, nats.stream_prefix))
                .unwrap_or_else(|| ("kairos".into(), "KAIROS".into()))
        }
        None => ("kairos".into(), "KAIROS".into()),
    };
    let backend = match (
        &args.nats,
        cli.node
            .clone()
            .or_else(|| kairos_node::running_node(data_dir)),
    ) {
        (None, Some(url)) => Some(Backend::node(
            &url,
            cli.token.as_deref(),
            cli.party.is_some(),
            cli.ca_cert.as_deref(),
        )?),
        (None, None) => bail!(
            "kairos watch streams a node's events: start one (kairos up) or give --node URL, or read NATS with --nats URL"
        ),
        (Some(_), _) => None,
    };
    watch::run(
        backend.as_ref(),
        &watch::WatchOptions {
            replica: args.name.as_deref(),
            timeline: args.timeline.as_deref(),
            since: args.since.as_deref(),
            json: args.json,
            count: args.count,
            nats: args.nats.as_deref(),
            party,
            token: cli.token.as_deref(),
            subject_prefix: &subject_prefix,
            stream_prefix: &stream_prefix,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn replica(backend: &Backend, command: ReplicaCommand) -> Result<ExitCode> {
    match command {
        ReplicaCommand::Add {
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
            host,
        } => {
            let settings = kairos_capture::ReplicaSettings {
                check,
                check_timeout,
                after_commit,
                watch_window,
                probe_interval,
                actions,
                probes,
                host,
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
        ReplicaCommand::List { json } => {
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
    }
    Ok(ExitCode::SUCCESS)
}

fn capture_command(backend: &Backend, CaptureArgs { name, json }: CaptureArgs) -> Result<ExitCode> {
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
        if let Some(durable) = &report.durable {
            println!(
                "  on {} of the {} members it must be on{}",
                durable.copies,
                durable.required,
                if durable.durable {
                    ""
                } else {
                    " (not durable yet: the others did not answer in time)"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn history_command(
    backend: &Backend,
    HistoryArgs {
        name,
        timeline,
        json,
    }: HistoryArgs,
) -> Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}

fn show_command(backend: &Backend, ShowArgs { name, at, json }: ShowArgs) -> Result<ExitCode> {
    let listing = backend.state(&name, &at.at)?;
    if json {
        print_json(&listing)?;
    } else {
        output::print_listing(&listing)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cat_command(backend: &Backend, CatArgs { name, path, at }: CatArgs) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let torn = backend.cat(&name, &path, &at.at, &mut out)?;
    out.flush().context("writing to standard output")?;
    if torn {
        eprintln!(
            "{}",
            kairos_replay::torn_warning(&path.display().to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn diff_command(
    backend: &Backend,
    DiffArgs {
        name,
        from,
        to,
        json,
    }: DiffArgs,
) -> Result<ExitCode> {
    let changes = backend.diff(&name, &from, &to)?;
    if json {
        print_json(&changes)?;
    } else {
        output::print_diff(&changes)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn restore_command(
    backend: &Backend,
    RestoreArgs {
        name,
        at,
        into,
        force,
        json,
    }: RestoreArgs,
) -> Result<ExitCode> {
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
    for torn in &report.torn {
        eprintln!("{}", kairos_replay::torn_warning(torn));
    }
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
    Ok(ExitCode::SUCCESS)
}

fn gc_command(
    backend: Backend,
    GcArgs {
        dry_run,
        max_repack_bytes,
        json,
    }: GcArgs,
) -> Result<ExitCode> {
    let report = backend.gc(&kairos_store::GcOptions {
        dry_run,
        max_repack_bytes,
    })?;
    if json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "{verb} {} objects ({}) and {} segments; {} {} segments ({} copied); {} objects live in {} frames",
        report.objects_deleted,
        bytes(report.bytes_deleted),
        report.segments_deleted,
        if report.dry_run {
            "would repack"
        } else {
            "repacked"
        },
        report.segments_repacked,
        bytes(report.bytes_repacked),
        report.objects_live,
        report.frames
    );
    if report.objects_kept_in_flight > 0 {
        println!(
            "kept {} unreferenced objects a capture or commit in progress uses",
            report.objects_kept_in_flight
        );
    }
    if report.bytes_moved_in_files > 0 {
        println!(
            "moved {} of live segments out of pack files a fifth dead or more, which were removed",
            bytes(report.bytes_moved_in_files)
        );
    }
    if report.segments_repack_deferred > 0 {
        println!(
            "{} mostly dead segments left for a later run (over --max-repack-bytes)",
            report.segments_repack_deferred
        );
    }
    if report.segments_kept_damaged > 0 {
        println!(
            "warning: {} segments hold objects that do not match their hash and were kept; run `kairos verify`",
            report.segments_kept_damaged
        );
    }
    println!(
        "disk: {} -> {}{} in {:.1} s ({} examined)",
        bytes(report.bytes_on_disk_before),
        bytes(report.bytes_on_disk_after),
        if report.compacted { " (compacted)" } else { "" },
        report.duration_ms as f64 / 1000.0,
        bytes(report.bytes_examined)
    );
    Ok(ExitCode::SUCCESS)
}

fn stats_command(backend: &Backend, StatsArgs { json }: StatsArgs) -> Result<ExitCode> {
    let figures = backend.stats()?;
    if json {
        print_json(&figures)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} replicas, {} frames, {} objects ({} reachable) in {} segments",
        figures.replicas,
        figures.frames,
        figures.objects,
        figures.objects_reachable,
        figures.segments
    );
    println!(
        "bytes: raw {}, stored {}, in segments {}, on disk {}; dedup ratio {:.2}",
        bytes(figures.bytes_raw),
        bytes(figures.bytes_stored),
        bytes(figures.bytes_segments),
        bytes(figures.bytes_on_disk),
        figures.dedup_ratio
    );
    println!(
        "reclaimable: {} ({} unreachable objects){}",
        bytes(figures.bytes_reclaimable),
        figures.objects_reclaimable,
        if figures.bytes_reclaimable > 0 {
            "; `kairos gc` frees it"
        } else {
            ""
        }
    );
    if figures.bytes_dead_kept > 0 {
        println!(
            "dead space kept: {} in segments still mostly live (repacking them would copy more than it frees)",
            bytes(figures.bytes_dead_kept)
        );
    }
    if figures.bytes_dead_in_files > 0 {
        println!(
            "dead space in pack files: {} (a collection removes the packs a fifth dead or more)",
            bytes(figures.bytes_dead_in_files)
        );
    }
    for dictionary in &figures.dictionaries {
        println!(
            "dictionary: {} version {} ({})",
            dictionary.replica,
            dictionary.version,
            bytes(dictionary.bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_command(backend: &Backend, VerifyArgs { json }: VerifyArgs) -> Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}

fn propose_command(
    backend: &Backend,
    ProposeArgs {
        name,
        file,
        from_dir,
        timeline,
        title,
        json,
    }: ProposeArgs,
    party: &str,
) -> Result<ExitCode> {
    let document = proposal_document(
        backend,
        &name,
        file,
        from_dir,
        timeline.as_deref(),
        title,
        party,
    )?;
    let proposal = backend.propose(&name, document, timeline.as_deref(), party)?;
    if json {
        print_json(&proposal)?;
    } else {
        println!(
            "proposal {}: {:?} by {} on {}, base {} ({} ops)",
            proposal.proposal.short(),
            proposal.title,
            proposal.author,
            proposal.timeline,
            proposal.base.short(),
            proposal.ops.len()
        );
        for (index, op) in proposal.ops.iter().enumerate() {
            println!("  {}. {op}", index + 1);
        }
        if let Some(prediction) = &proposal.prediction {
            output::print_prediction(prediction)?;
        }
        output::print_interference(&proposal.interference)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The proposal document of `--file` (its `from` files read) or `--from-dir`.
fn proposal_document(
    backend: &Backend,
    name: &str,
    file: Option<PathBuf>,
    from_dir: Option<PathBuf>,
    timeline: Option<&str>,
    title: Option<String>,
    party: &str,
) -> Result<kairos_sandbox::ProposalDocument> {
    Ok(match (file, from_dir) {
        (Some(file), _) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut document = kairos_sandbox::ProposalDocument::parse(&bytes)?;
            let base_dir = file.parent().unwrap_or(std::path::Path::new("."));
            fromdir::read_from_files(&mut document, base_dir)?;
            document
        }
        (None, Some(dir)) => {
            fromdir::document_from_dir(backend, name, &dir, timeline, title, party)?
        }
        (None, None) => bail!("give --file or --from-dir"),
    })
}

fn gate_command(backend: &Backend, args: GateArgs, party: &str) -> Result<ExitCode> {
    let thresholds = kairos_ops::gate::GateThresholds {
        max_risk: args.max_risk,
        min_confidence: args.min_confidence,
        run_check: args.run_check,
        commit: args.commit,
    };
    // Refused before anything is proposed.
    thresholds.validate()?;
    let document = proposal_document(
        backend,
        &args.name,
        args.file,
        args.from_dir,
        args.timeline.as_deref(),
        args.title,
        party,
    )?;
    let proposal = backend.propose(&args.name, document, args.timeline.as_deref(), party)?;
    let gate = backend.gate(&args.name, &proposal.proposal.to_hex(), &thresholds, party)?;
    for to in &args.write {
        std::fs::write(&to.path, gate::render(&gate, to.format))
            .with_context(|| format!("--write {}", to.path.display()))?;
    }
    print!("{}", gate::render(&gate, args.format));
    Ok(match gate.verdict {
        kairos_store::audit::GateVerdict::Pass => ExitCode::SUCCESS,
        kairos_store::audit::GateVerdict::Refuse => {
            if args.format != gate::GateFormat::Text {
                for reason in &gate.reasons {
                    eprintln!("kairos: gate refused: {reason}");
                }
            }
            ExitCode::FAILURE
        }
    })
}

fn predict_command(
    backend: &Backend,
    PredictArgs {
        name,
        proposal,
        ops,
        json,
    }: PredictArgs,
    party: &str,
) -> Result<ExitCode> {
    let ops = ops.as_deref().map(parse_ops).transpose()?;
    let prediction = backend.predict(&name, &proposal, ops, party)?;
    if json {
        print_json(&prediction)?;
    } else {
        output::print_prediction(&prediction)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn model_command(backend: &Backend, command: ModelCommand, party: &str) -> Result<ExitCode> {
    match command {
        ModelCommand::Train { name, json } => {
            let status = backend.model_train(&name, party)?;
            if json {
                print_json(&status)?;
            } else {
                output::print_model_status(&status)?;
            }
        }
        ModelCommand::Status { name, json } => {
            let status = backend.model_status(&name)?;
            if json {
                print_json(&status)?;
            } else {
                output::print_model_status(&status)?;
            }
        }
        ModelCommand::Report { name, json } => {
            let report = backend.model_report(&name)?;
            if json {
                print_json(&report)?;
            } else {
                output::print_model_report(&report)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn suggest_command(
    backend: &Backend,
    SuggestArgs {
        name,
        key,
        values,
        objective,
        json,
    }: SuggestArgs,
) -> Result<ExitCode> {
    let Some((file, key)) = key.rsplit_once(':') else {
        bail!("--key {key:?} must be FILE:KEY (e.g. nginx.conf:worker_processes)");
    };
    if file.is_empty() || key.is_empty() {
        bail!("--key needs both a file and a key, as FILE:KEY");
    }
    let ranked = backend.suggest(
        &name,
        kairos_node::wire::SuggestRequest {
            file: file.to_string(),
            key: key.to_string(),
            values,
            objective,
        },
    )?;
    if json {
        print_json(&ranked)?;
    } else {
        for (rank, suggestion) in ranked.iter().enumerate() {
            println!(
                "{}. {} = {}: {}{}",
                rank + 1,
                key,
                suggestion.value,
                if suggestion.abstain {
                    format!("no call (confidence {:.2})", suggestion.confidence)
                } else {
                    format!(
                        "P(error) {:.2}, confidence {:.2}",
                        suggestion.p_error, suggestion.confidence
                    )
                },
                suggestion
                    .cpu_percent
                    .map(|cpu| format!(", CPU {cpu:+.1}%"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sandbox_command(
    backend: &Backend,
    SandboxArgs {
        name,
        proposal,
        ops,
        run_check,
        json,
    }: SandboxArgs,
    party: &str,
) -> Result<ExitCode> {
    let ops = ops.as_deref().map(parse_ops).transpose()?;
    let sandbox = backend.sandbox(&name, &proposal, ops, run_check, party)?;
    if json {
        print_json(&sandbox)?;
    } else {
        output::print_sandbox(&sandbox.report)?;
        if let Some(prediction) = &sandbox.prediction {
            output::print_prediction(prediction)?;
        }
        for combined in &sandbox.combined_checks {
            println!(
                "checked together with {} (by {}): {}",
                combined.partner.short(),
                combined.partner_author,
                if combined.passed {
                    "passed".to_string()
                } else {
                    combined.problem.clone().unwrap_or_else(|| "failed".into())
                }
            );
        }
        output::print_interference(&sandbox.interference)?;
    }
    if sandbox
        .report
        .check
        .as_ref()
        .is_some_and(|check| !check.passed)
    {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn commit_command(
    backend: &Backend,
    CommitArgs {
        name,
        proposal,
        ops,
        no_wait,
        json,
    }: CommitArgs,
    party: &str,
) -> Result<ExitCode> {
    let ops = ops.as_deref().map(parse_ops).transpose()?;
    let commit = backend.commit(&name, &proposal, ops, !no_wait, party)?;
    if json {
        print_json(&commit)?;
    } else {
        if let Some(prediction) = &commit.prediction {
            output::print_prediction(prediction)?;
        }
        output::print_commit(&commit.record)?;
    }
    let record = commit.record;
    if !matches!(
        record.status,
        kairos_commit::CommitStatus::Committed | kairos_commit::CommitStatus::Watching
    ) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn review_command(backend: &Backend, args: ReviewArgs, party: &str) -> Result<ExitCode> {
    let verdict = if args.approve {
        kairos_core::Verdict::Approve
    } else {
        kairos_core::Verdict::Reject
    };
    let review = backend.review(&args.name, &args.proposal, verdict, args.comment, party)?;
    if args.json {
        print_json(&review)?;
    } else {
        output::print_review(&review)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn proposals_command(backend: &Backend, args: ProposalsArgs) -> Result<ExitCode> {
    let proposals =
        backend.proposals(&args.name, args.timeline.as_deref(), args.status.as_deref())?;
    if args.json {
        print_json(&proposals)?;
    } else {
        output::print_proposals(&proposals)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn revert_command(
    backend: &Backend,
    RevertArgs {
        name,
        to,
        culprit,
        json,
    }: RevertArgs,
    party: &str,
) -> Result<ExitCode> {
    let to = match (to, culprit) {
        (_, Some(culprit)) => {
            let answer = backend.revert_culprit(&name, &culprit, party)?;
            if json {
                print_json(&answer)?;
            } else {
                output::print_culprit_revert(&answer)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        (Some(to), None) => to,
        (None, None) => bail!("give --to SPEC or --culprit FRAME"),
    };
    let record = backend.revert(&name, &to, party)?;
    if json {
        print_json(&record)?;
    } else {
        output::print_commit(&record)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn log_command(backend: &Backend, LogArgs { name, json }: LogArgs) -> Result<ExitCode> {
    let log = backend.log(&name)?;
    if json {
        print_json(&log)?;
    } else {
        output::print_log(&log)?;
    }
    if !log.intact {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn forget_command(backend: &Backend, args: ForgetArgs, party: &str) -> Result<ExitCode> {
    let request = kairos_ops::wire::ForgetRequestJson {
        timeline: args.timeline,
        keep_last: args.keep_last,
        keep_hourly: args.keep_hourly,
        keep_daily: args.keep_daily,
        keep_weekly: args.keep_weekly,
        keep_within: args.keep_within,
        dry_run: args.dry_run,
        party: None,
    };
    let report = backend.forget(&args.name, &request, party)?;
    if args.json {
        print_json(&report)?;
    } else {
        output::print_forget(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn recover_command(backend: &Backend, RecoverArgs { name, json }: RecoverArgs) -> Result<ExitCode> {
    let recovered = backend.recover(name.as_deref())?;
    if json {
        print_json(&recovered)?;
    } else if recovered.is_empty() {
        println!("no commit was left in progress");
    } else {
        for record in &recovered {
            output::print_commit(record)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bisect_command(backend: &Backend, args: BisectArgs, party: &str) -> Result<ExitCode> {
    let good = kairos_core::TimelineSpec::parse(&args.good)
        .with_context(|| format!("--good {:?}", args.good))?;
    let bad = kairos_core::TimelineSpec::parse(&args.bad)
        .with_context(|| format!("--bad {:?}", args.bad))?;
    let timeout = args
        .timeout
        .as_deref()
        .map(|text| {
            humantime::parse_duration(text)
                .map_err(|error| anyhow::anyhow!("--timeout {text:?}: {error} (e.g. 30s, 500ms)"))
        })
        .transpose()?;
    let report = backend.bisect(
        &args.name,
        &kairos_ops::bisect::BisectRequest {
            good: &good,
            bad: &bad,
            check: args.check.as_deref(),
            timeout,
            exhaustive: args.exhaustive,
        },
    )?;
    let revert = match (&report.culprit, args.propose_revert) {
        (Some(culprit), true) => {
            let spec = format!("{}@{}", report.timeline, culprit.frame.to_hex());
            Some(backend.revert_culprit(&args.name, &spec, party)?)
        }
        _ => None,
    };
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(revert) = &revert {
            value["revert"] = serde_json::to_value(revert)?;
        }
        print_json(&value)?;
    } else {
        output::print_bisect(&report)?;
        if let Some(revert) = &revert {
            output::print_culprit_revert(revert)?;
        } else if args.propose_revert {
            println!("no revert proposed: the bisect found no single culprit");
        }
    }
    Ok(if report.monotonic {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `1,3` → [1, 3].
fn parse_ops(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|part| {
            part.trim().parse::<usize>().map_err(|_| {
                anyhow::anyhow!("--ops {text:?}: {part:?} is not an op number (use e.g. 1,3)")
            })
        })
        .collect()
}

fn timeline(backend: &Backend, command: TimelineCommand, party: &str) -> Result<ExitCode> {
    match command {
        TimelineCommand::Fork {
            name,
            replica,
            at,
            json,
        } => {
            let info = backend.fork(&replica, &name, &at, party)?;
            if json {
                print_json(&info)?;
            } else {
                println!(
                    "timeline {:?} of replica {:?} starts at frame {} ({})",
                    info.name,
                    replica,
                    info.head.id.short(),
                    info.head.time
                );
            }
        }
        TimelineCommand::List { replica, json } => {
            let infos = backend.timelines(&replica)?;
            if json {
                print_json(&infos)?;
            } else if infos.is_empty() {
                println!("replica {replica:?} has no timelines yet (no frames)");
            } else {
                println!(
                    "{:<20}  {:<12}  {:<30}  FORKED FROM",
                    "TIMELINE", "HEAD", "TIME"
                );
                for info in infos {
                    println!(
                        "{:<20}  {:<12}  {:<30}  {}",
                        info.name,
                        info.head.id.short(),
                        info.head.time.to_string(),
                        info.fork
                            .map(|fork| fork.base.short())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        TimelineCommand::Delete { replica, name } => {
            backend.delete_timeline(&replica, &name, party)?;
            println!("timeline {name:?} of replica {replica:?} deleted");
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
    config.webhook_secrets_set()?;
    let mut telemetry = kairos_telemetry::init(&config.telemetry)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before the node starts (and says where it listens): a SIGTERM or
        // SIGINT that arrives at once is a clean stop, never the default's abrupt exit.
        let interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let shutdown = async move {
            let (mut interrupt, mut terminate) = (interrupt, terminate);
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("stopping: finishing captures in flight");
        };
        kairos_node::run(
            config,
            |address| {
                println!("listening on {address}");
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await?;
        anyhow::Ok(())
    });
    // Export what is buffered before leaving, even when the node failed.
    telemetry.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make the node the first member of a new cluster (its configuration needs a
    /// [cluster] section; a node without one is a cluster of its own already)
    Init {
        #[arg(long)]
        json: bool,
    },
    /// Make the node (started with an empty data directory and its own cluster.node_id,
    /// or a member that left this cluster) a member of the cluster a member of which
    /// answers at ADDR; the leader first checks it answers at its cluster.advertise
    Join {
        /// Any member's API URL, e.g. http://127.0.0.1:7701 [default: each of
        /// cluster.peers in turn]
        address: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a member from the cluster (the node asked, by default); the leader is
    /// refused until another member leads (transfer-leader)
    Leave {
        /// The member's id
        #[arg(value_name = "NODE")]
        member: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Members, leader, term, commit index, each member's lag, process and clock (how far
    /// it is from this member's, with a warning past a second), where each replica's
    /// watcher runs
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make another member the leader
    TransferLeader {
        /// The member's id
        #[arg(value_name = "NODE")]
        member: u64,
        #[arg(long)]
        json: bool,
    },
}

fn cluster_command(backend: &Backend, command: ClusterCommand) -> Result<ExitCode> {
    let (answer, json) = match command {
        ClusterCommand::Init { json } => (
            backend.node_post_json("/api/cluster/init", &serde_json::json!({}))?,
            json,
        ),
        ClusterCommand::Join { address, json } => (
            backend.node_post_json(
                "/api/cluster/join",
                &serde_json::json!({ "address": address }),
            )?,
            json,
        ),
        ClusterCommand::Leave { member, json } => (
            backend.node_post_json("/api/cluster/leave", &serde_json::json!({ "node": member }))?,
            json,
        ),
        ClusterCommand::Status { json } => (backend.node_get_json("/api/cluster")?, json),
        ClusterCommand::TransferLeader { member, json } => (
            backend.node_post_json(
                "/api/cluster/transfer-leader",
                &serde_json::json!({ "node": member }),
            )?,
            json,
        ),
    };
    if json {
        print_json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", output::cluster_status(&answer));
    Ok(ExitCode::SUCCESS)
}

fn party_command(backend: &Backend, command: PartyCommand, acting: &str) -> Result<ExitCode> {
    match command {
        PartyCommand::Add {
            name,
            role,
            replicas,
            json,
        } => {
            let party = backend.add_party(&name, &role, &replicas)?;
            if json {
                print_json(&party)?;
            } else {
                println!(
                    "party {:?} added with role {}{}; its token (shown once, keep it secret):",
                    party.party,
                    party.role,
                    if party.replicas.is_empty() {
                        String::new()
                    } else {
                        format!(" on replicas {}", party.replicas.join(", "))
                    }
                );
                println!("{}", party.token);
            }
        }
        PartyCommand::List { json } => {
            let parties = backend.parties()?;
            if json {
                print_json(&parties)?;
            } else if parties.is_empty() {
                println!(
                    "no parties: the API needs no token on loopback (add one with `kairos party add NAME --role admin`)"
                );
            } else {
                for party in parties {
                    println!(
                        "{}\t{}\t{}\t{}",
                        party.party,
                        party.role,
                        if party.replicas.is_empty() {
                            "every replica".to_string()
                        } else {
                            party.replicas.join(", ")
                        },
                        party.created
                    );
                }
            }
        }
        PartyCommand::Revoke { name } => {
            backend.revoke_party(&name, acting)?;
            println!("party {name:?} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
