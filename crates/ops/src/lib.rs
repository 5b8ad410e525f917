//! Kairos operations: one implementation of every command over a store — history, state,
//! cat, diff, restore, verify, timelines, proposals, sandboxes, commits, reverts, the
//! audit log and recovery. The CLI calls it on a data directory, the node's HTTP handlers
//! call it on the node's store: same code, same limits, same answers. Reads never change
//! anything; every write is a catalog command.
//!
//! Captures are the one thing done differently by the two callers (the node's go through
//! the replica's snapshotter actor, the only writer of its frames); commits therefore take
//! a [`Capturer`].

pub mod bisect;
pub mod culprit;
pub mod fuzz;
pub mod gate;
pub mod learn;
pub mod review;
pub mod wire;

use std::io::Write;
use std::path::{Path, PathBuf};

use kairos_capture::{CaptureError, CaptureReport, CaptureRequest};
use kairos_commit::{Capturer, CommitError, CommitRecord, Committer};
use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{
    FrameSpec, Instant, Limits, ReplicaDefinition, RetentionPolicy, SpecError, TimelineSpec,
};
use kairos_replay::{ReplayError, RestoreOptions, RestoreReport, StateDiff, StateListing};
use kairos_sandbox::{Proposal, ProposalDocument, SandboxError, SandboxOptions, load_proposal};
use kairos_store::audit::TimelineEvent;
pub use kairos_store::retention::ForgetReport;
use kairos_store::retention::TimelineRule;
use kairos_store::{
    AuditEvent, AuditLog, CatalogError, Change, Command, GcError, GcOptions, GcReport, Store,
    StoreError, StoreFigures, TimelineInfo, VerifyReport,
};

use wire::{FrameJson, NewPartyJson, PartyJson, ProposalJson, SandboxJson};

/// Input that is wrong before anything is looked up: the caller can fix it.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(
        "timeline name {0:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64 characters"
    )]
    TimelineName(String),
    #[error(
        "party {0:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64 characters"
    )]
    Party(String),
    #[error("replica {replica:?}: root {root:?} must be an absolute path")]
    RelativeRoot { replica: String, root: String },
    #[error("restore target {0:?} must be an absolute path")]
    RelativeTarget(String),
    #[error(transparent)]
    Replica(#[from] kairos_replica::SettingsError),
    #[error("proposal id {id:?}: {problem}")]
    ProposalId { id: String, problem: String },
    #[error("role {0:?} is not one of viewer, proposer, reviewer, committer, admin")]
    Role(String),
    #[error(
        "replica {0:?} has no retention policy: configure [retention] or [replica.retention], or give --keep-last, --keep-hourly, --keep-daily, --keep-weekly or --keep-within"
    )]
    NoRetentionPolicy(String),
    #[error("retention: {0}")]
    Retention(#[from] kairos_core::RetentionError),
    #[error("party {party:?}: replica {replica:?} is not registered")]
    PartyReplica { party: String, replica: String },
    #[error(
        "replica {replica:?}: root {root} overlaps replica {other:?}'s root {other_root} (two replicas would commit to the same files)"
    )]
    SharedRoot {
        replica: String,
        root: String,
        other: String,
        other_root: String,
    },
    #[error("drawing a token from the operating system: {0}")]
    Random(String),
    #[error("gate: {name} {value} is not between 0 and 1")]
    GateThreshold { name: &'static str, value: String },
    #[error("gate: a commit needs a way to capture the live replica (and only a commit does)")]
    GateCommit,
}

/// Everything an operation can answer instead of its result.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Learn(learn::LearnError),
    #[error(transparent)]
    Bisect(#[from] bisect::BisectError),
    #[error(transparent)]
    Revert(#[from] culprit::RevertError),
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error("hashing a NATS password: {0}")]
    Credentials(String),
    #[error(transparent)]
    Review(review::ReviewError),
}

/// The bcrypt cost of NATS passwords (nats-server checks one per connection).
pub const NATS_BCRYPT_COST: u32 = 10;

/// The bcrypt hash nats-server checks a NATS password (a party's token, the node's own
/// password) against.
pub fn nats_password_hash(password: &str) -> Result<String> {
    bcrypt::hash(password, NATS_BCRYPT_COST)
        .map_err(|error| OpsError::Credentials(error.to_string()))
}

pub type Result<T, E = OpsError> = std::result::Result<T, E>;

/// What `forget` is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct ForgetRequest<'a> {
    /// Only this timeline (else every timeline that has a policy).
    pub timeline: Option<&'a str>,
    /// Rules given on the command line or in the request, over the configured ones.
    pub flags: RetentionPolicy,
    /// The policy of replicas without their own (the configuration's `[retention]`).
    pub default: Option<RetentionPolicy>,
    pub party: &'a str,
    pub dry_run: bool,
}

/// Checks a party name (it is written in the audit log).
pub fn party(name: &str) -> Result<String> {
    if !kairos_core::replica::is_valid_replica_name(name) {
        return Err(InputError::Party(name.to_string()).into());
    }
    Ok(name.to_string())
}

/// Parses a frame spec (`latest`, an id prefix, an instant, an age, `TIMELINE@SPEC`).
pub fn spec(text: &str) -> Result<TimelineSpec> {
    Ok(TimelineSpec::parse(text)?)
}

/// Checks a proposal id prefix without looking it up.
pub fn proposal_id(id: &str) -> Result<()> {
    kairos_core::hash::parse_hex_prefix(id).map_err(|error| InputError::ProposalId {
        id: id.to_string(),
        problem: error.to_string(),
    })?;
    Ok(())
}

/// A new replica, as `replica add` and `POST /api/replicas` describe it.
pub struct ReplicaRequest<'a> {
    pub name: &'a str,
    pub root: &'a Path,
    pub processes: Vec<String>,
    pub exclude: Vec<String>,
    pub capture_interval: &'a str,
    pub settings: &'a kairos_replica::ReplicaSettings,
}

/// The operations on one store, with the limits of its configuration.
pub struct Service<'s> {
    pub store: &'s Store,
    pub limits: Limits,
    /// Paths never captured (the store's own directory).
    pub skip: Vec<PathBuf>,
    /// The predictor's serving state (the node keeps one for its life).
    pub learner: &'s learn::Learner,
}

impl Service<'_> {
    pub fn replicas(&self) -> Result<Vec<ReplicaDefinition>> {
        Ok(self.store.replicas()?)
    }

    pub fn add_replica(&self, request: ReplicaRequest<'_>) -> Result<ReplicaDefinition> {
        if !request.root.is_absolute() {
            return Err(InputError::RelativeRoot {
                replica: request.name.to_string(),
                root: request.root.display().to_string(),
            }
            .into());
        }
        let replica = kairos_replica::define_replica(
            request.name,
            request.root,
            request.processes,
            request.exclude,
            request.capture_interval,
            request.settings,
        )
        .map_err(InputError::Replica)?;
        for other in self.store.replicas()? {
            if other.name != replica.name
                && (replica.root.starts_with(&other.root) || other.root.starts_with(&replica.root))
            {
                return Err(InputError::SharedRoot {
                    replica: replica.name.clone(),
                    root: replica.root.display().to_string(),
                    other: other.name,
                    other_root: other.root.display().to_string(),
                }
                .into());
            }
        }
        self.store.add_replica(&replica)?;
        Ok(replica)
    }

    /// One capture of `name` on this thread (the CLI's; a node captures through its
    /// snapshotter).
    pub fn capture_directly(&self, name: &str) -> Result<CaptureReport> {
        let replica = self.store.replica(name)?;
        Ok(kairos_capture::capture(
            self.store,
            &CaptureRequest {
                replica: &replica,
                timeline: MAIN_TIMELINE,
                limits: self.limits,
                skip: self.skip.clone(),
            },
        )?)
    }

    pub fn history(&self, name: &str, timeline: &str) -> Result<Vec<FrameJson>> {
        self.store.replica(name)?;
        Ok(self
            .store
            .history(name, timeline)?
            .iter()
            .map(FrameJson::from)
            .collect())
    }

    /// The state at `at`, with the runtime series' bucket nearest that instant (main
    /// timeline: the series follows the live replica).
    pub fn state(&self, name: &str, at: &TimelineSpec) -> Result<StateListing> {
        let now = Instant::now();
        let view = kairos_replay::open(self.store, name, at, now)?;
        let mut listing = kairos_replay::listing(self.store, &view)?;
        if at.timeline == MAIN_TIMELINE {
            let asked = match &at.frame {
                FrameSpec::At(instant) => *instant,
                FrameSpec::Ago(age) => now.saturating_sub(*age),
                FrameSpec::Latest => now,
                FrameSpec::IdPrefix(_) => view.frame.time,
            };
            // The series is observations: a damaged sample leaves it out, never fails `show`.
            listing.metrics_nearest = self
                .store
                .sample_nearest(name, asked)
                .ok()
                .flatten()
                .map(|sample| kairos_replay::SampleView::new(asked, &sample));
        }
        Ok(listing)
    }

    /// Writes a file's bytes at an instant to `out`; returns whether it was torn (kept
    /// changing while captured).
    pub fn cat(
        &self,
        name: &str,
        path: &[u8],
        at: &TimelineSpec,
        out: &mut dyn Write,
    ) -> Result<bool> {
        let view = kairos_replay::open(self.store, name, at, Instant::now())?;
        let reader = self.store.reader()?;
        Ok(view.cat(&reader, path, &self.limits, out)?.torn)
    }

    pub fn diff(&self, name: &str, from: &TimelineSpec, to: &TimelineSpec) -> Result<StateDiff> {
        let now = Instant::now();
        let from = kairos_replay::open(self.store, name, from, now)?;
        let to = kairos_replay::open(self.store, name, to, now)?;
        Ok(kairos_replay::diff(self.store, &from, &to)?)
    }

    /// Materialises a frame into `into` (absolute), calling `total` with its size first.
    pub fn restore(
        &self,
        name: &str,
        at: &TimelineSpec,
        into: &Path,
        force: bool,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        total: &dyn Fn(u64),
    ) -> Result<RestoreReport> {
        if !into.is_absolute() {
            return Err(InputError::RelativeTarget(into.display().to_string()).into());
        }
        let replica = self.store.replica(name)?;
        let view = kairos_replay::open(self.store, name, at, Instant::now())?;
        total(view.frame.bytes);
        let options = RestoreOptions {
            force,
            exclude: replica.exclude.clone(),
            progress,
            durable: false,
        };
        Ok(kairos_replay::restore(self.store, &view, into, &options)?)
    }

    pub fn verify(&self) -> Result<VerifyReport> {
        Ok(self.store.verify()?)
    }

    /// `kairos gc`: removes what no kept frame or record needs and repacks mostly dead
    /// segments, while captures and commits go on (compaction of the file is the caller's:
    /// it needs the store to itself).
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport> {
        Ok(self.store.gc(options)?)
    }

    /// `kairos stats`: frames, objects, bytes raw, stored and on disk, the dedup ratio,
    /// dictionaries and what a collection would reclaim (a survey and a mark: its cost
    /// grows with the store, nothing is written).
    pub fn stats(&self) -> Result<StoreFigures> {
        Ok(self.store.figures()?)
    }

    pub fn timelines(&self, name: &str) -> Result<Vec<TimelineInfo>> {
        Ok(self.store.timeline_infos(name)?)
    }

    /// Forks `timeline` at the frame `at` names: a pointer, logged.
    pub fn fork(
        &self,
        name: &str,
        timeline: &str,
        at: &TimelineSpec,
        party: &str,
    ) -> Result<TimelineInfo> {
        if !kairos_core::spec::is_valid_timeline_name(timeline) {
            return Err(InputError::TimelineName(timeline.to_string()).into());
        }
        let now = Instant::now();
        let base = self.store.resolve(name, at, now)?;
        self.store.submit(
            &Command::new(
                now,
                name,
                timeline,
                party,
                Change::ForkTimeline { base: base.id },
            )
            .with_audit(AuditEvent::Timeline(TimelineEvent::Fork {
                fork: timeline.to_string(),
                at: base.id,
            })),
        )?;
        self.store
            .timeline_infos(name)?
            .into_iter()
            .find(|info| info.name == timeline)
            .ok_or_else(|| {
                CatalogError::UnknownTimeline {
                    replica: name.to_string(),
                    timeline: timeline.to_string(),
                }
                .into()
            })
    }

    /// Forgets frames of `name`'s timelines by their retention policies (each timeline's
    /// own, the replica's, or `request.default`), with `request.flags` over them; with
    /// `dry_run` only says what would go. Logged as a `forget` audit event per command.
    pub fn forget(&self, name: &str, request: &ForgetRequest<'_>) -> Result<ForgetReport> {
        let definition = self.store.replica(name)?;
        let timelines = self.store.timelines(name)?;
        if let Some(timeline) = request.timeline
            && !timelines.iter().any(|t| t == timeline)
        {
            return Err(CatalogError::UnknownTimeline {
                replica: name.to_string(),
                timeline: timeline.to_string(),
            }
            .into());
        }
        let flags = (!request.flags.is_empty()).then_some(request.flags);
        let mut rules = Vec::new();
        for timeline in timelines
            .iter()
            .filter(|t| request.timeline.is_none_or(|only| only == t.as_str()))
        {
            let configured = definition.retention_of(timeline, request.default);
            let policy = match (configured, flags) {
                (Some(configured), Some(flags)) => configured.overridden_by(flags),
                (configured, flags) => match configured.or(flags) {
                    Some(policy) => policy,
                    None => continue,
                },
            };
            policy.validate().map_err(InputError::from)?;
            rules.push(TimelineRule {
                timeline: timeline.clone(),
                policy,
            });
        }
        if rules.is_empty() {
            return Err(InputError::NoRetentionPolicy(name.to_string()).into());
        }
        // A forget of every timeline also takes the frames of deleted forks (on no
        // timeline, readable only by id) that nothing needs.
        Ok(self.store.forget_with(
            name,
            &rules,
            request.timeline.is_none(),
            &party(request.party)?,
            Instant::now(),
            request.dry_run,
        )?)
    }

    /// Deletes a fork (its frames stay readable by id), logged.
    pub fn delete_timeline(&self, name: &str, timeline: &str, party: &str) -> Result<()> {
        self.store.submit(
            &Command::new(
                Instant::now(),
                name,
                timeline,
                party,
                Change::DeleteTimeline,
            )
            .with_audit(AuditEvent::Timeline(TimelineEvent::Delete {
                delete: timeline.to_string(),
            })),
        )?;
        Ok(())
    }

    /// Validates and stores a proposal; a document without an author is `party`'s.
    pub fn propose(
        &self,
        name: &str,
        mut document: ProposalDocument,
        timeline: Option<&str>,
        party: &str,
    ) -> Result<ProposalJson> {
        if document.author.is_empty() {
            document.author = party.to_string();
        }
        let replica = self.store.replica(name)?;
        self.refuse_protected_paths(&replica, &document)?;
        let proposal = kairos_sandbox::propose(
            self.store,
            &replica,
            document,
            timeline,
            &self.limits,
            Instant::now(),
        )?;
        let mut json = ProposalJson::from(&proposal);
        json.prediction = self.prediction_for(&replica, &proposal, None, party);
        // Every party whose open proposal touches the same entries is told now, before
        // either commits.
        json.interference = self.find_overlaps(&proposal, party)?;
        Ok(json)
    }

    /// Checks a proposal as `propose` does and stores nothing (a pipeline's or a party's
    /// "would this be accepted?").
    pub fn validate_proposal(
        &self,
        name: &str,
        mut document: ProposalDocument,
        timeline: Option<&str>,
        party: &str,
    ) -> Result<ProposalJson> {
        if document.author.is_empty() {
            document.author = party.to_string();
        }
        let replica = self.store.replica(name)?;
        self.refuse_protected_paths(&replica, &document)?;
        let proposal = kairos_sandbox::validate(
            self.store,
            &replica,
            document,
            timeline,
            &self.limits,
            Instant::now(),
        )?;
        Ok(ProposalJson::from(&proposal))
    }

    /// A proposal may not name a path inside Kairos's own data directory.
    fn refuse_protected_paths(
        &self,
        replica: &ReplicaDefinition,
        document: &ProposalDocument,
    ) -> Result<()> {
        let inside = kairos_commit::protected_inside(&replica.root, &self.skip);
        if inside.is_empty() {
            return Ok(());
        }
        for (index, op) in document.ops.iter().enumerate() {
            let Some(path) = op.path() else { continue };
            let Ok(components) = kairos_sandbox::proposal::path_components(path) else {
                continue;
            };
            let path = String::from_utf8_lossy(&components.join(&b'/')).into_owned();
            if let Some(protected) = inside
                .iter()
                .find(|p| path == **p || path.starts_with(&format!("{p}/")))
            {
                return Err(SandboxError::Op {
                    index: index + 1,
                    op: op.describe(),
                    problem: format!(
                        "{path:?} is inside Kairos's own data directory ({protected:?}); it is never written"
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    pub fn proposal(&self, name: &str, id: &str) -> Result<Proposal> {
        proposal_id(id)?;
        Ok(load_proposal(self.store, name, id)?)
    }

    pub fn sandbox(
        &self,
        name: &str,
        id: &str,
        ops: Option<&[usize]>,
        run_check: bool,
        party: &str,
    ) -> Result<SandboxJson> {
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        // Predicted before anything runs, so that the outcome scores it.
        let prediction = self.prediction_for(&replica, &proposal, ops, party);
        let now = Instant::now();
        let report = kairos_sandbox::sandbox(
            self.store,
            &replica,
            &proposal,
            &SandboxOptions {
                chosen: ops,
                run_check,
                party,
                preview: false,
            },
            &self.limits,
            now,
        )?;
        let record_id = kairos_sandbox::sandbox_record_id(&proposal.id, &report.state);
        // The sandbox is stored whatever happens to its outcome record: one that could
        // not be written is recovered from the sandbox record before the next training.
        let _ = self.record_sandbox_outcome(&replica, &proposal, &report, record_id, now, party);
        let (combined_checks, interference) =
            self.combined_checks(&replica, &proposal, &report, party)?;
        Ok(SandboxJson {
            report,
            prediction,
            combined_checks,
            interference,
        })
    }

    /// What the sandbox of a proposal's chosen ops would hold, and the prediction for them,
    /// with nothing stored: the page's what-if on every visit (a sandbox, `sandbox`, is
    /// recorded and audited; a look is not).
    pub fn preview(&self, name: &str, id: &str, ops: Option<&[usize]>) -> Result<SandboxJson> {
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        let chosen: Vec<usize> = kairos_sandbox::select_ops(&proposal, ops)?
            .into_iter()
            .map(|(index, _)| index)
            .collect();
        let prediction = self
            .learner
            .predict(self.store, &replica, &proposal, &chosen, Instant::now())
            .ok();
        let report = kairos_sandbox::sandbox(
            self.store,
            &replica,
            &proposal,
            &SandboxOptions {
                chosen: ops,
                run_check: false,
                party: "",
                preview: true,
            },
            &self.limits,
            Instant::now(),
        )?;
        Ok(SandboxJson {
            report,
            prediction,
            combined_checks: Vec::new(),
            interference: Vec::new(),
        })
    }

    fn committer<'a>(
        &'a self,
        replica: &'a ReplicaDefinition,
        capturer: &'a dyn Capturer,
    ) -> Committer<'a> {
        Committer {
            store: self.store,
            replica,
            limits: self.limits,
            capturer,
            protected: self.skip.clone(),
            reviews_seen: None,
        }
    }

    /// Starts a commit of a proposal's chosen ops: the record is `watching` (call
    /// [`Service::watch`]) or final. While another commit of the replica is in progress
    /// it is refused as busy; a proposal that does not meet its timeline's review policy
    /// (judged with `prediction`, the one made for this commit) is refused, naming what
    /// it lacks, and nothing is written.
    pub fn begin_commit(
        &self,
        name: &str,
        id: &str,
        ops: Option<&[usize]>,
        party: &str,
        capturer: &dyn Capturer,
        prediction: Option<&learn::PredictionJson>,
    ) -> Result<CommitRecord> {
        let replica = self.store.replica(name)?;
        let proposal = self.proposal(name, id)?;
        let reviews_seen = self.check_policy(&replica, &proposal, prediction)?;
        let mut committer = self.committer(&replica, capturer);
        committer.reviews_seen = reviews_seen;
        let record = committer.begin(&proposal, ops, party)?;
        if record.status.is_final() {
            // Recovered from the commit record before the next training if it fails.
            let _ = self.record_commit_outcome(&record);
        }
        Ok(record)
    }

    /// Watches a `watching` commit to its end.
    pub fn watch(&self, record: CommitRecord, capturer: &dyn Capturer) -> Result<CommitRecord> {
        let replica = self.store.replica(&record.replica)?;
        let record = self.committer(&replica, capturer).watch(record)?;
        // Recovered from the commit record before the next training if it fails.
        let _ = self.record_commit_outcome(&record);
        Ok(record)
    }

    pub fn commit_record(&self, name: &str, id: &str) -> Result<CommitRecord> {
        let replica = self.store.replica(name)?;
        let nothing = NoCapture;
        Ok(self.committer(&replica, &nothing).commit_record(id)?)
    }

    pub fn revert(
        &self,
        name: &str,
        to: &TimelineSpec,
        party: &str,
        capturer: &dyn Capturer,
    ) -> Result<CommitRecord> {
        let replica = self.store.replica(name)?;
        Ok(self.committer(&replica, capturer).revert(to, party)?)
    }

    /// The replica's audit log with its chain checked. Reads only.
    pub fn log(&self, name: &str) -> Result<AuditLog> {
        self.store.replica(name)?;
        Ok(self.store.audit_log(name)?)
    }

    /// Adds a party with a fresh token (returned once; stored only as its hash).
    pub fn add_party(&self, name: &str, role: &str, replicas: &[String]) -> Result<NewPartyJson> {
        let role = kairos_core::Role::parse(role).ok_or_else(|| InputError::Role(role.into()))?;
        for replica in replicas {
            if self.store.replica(replica).is_err() {
                return Err(InputError::PartyReplica {
                    party: name.to_string(),
                    replica: replica.clone(),
                }
                .into());
            }
        }
        let token = kairos_core::party::token_from(&random_bytes()?);
        let party = kairos_core::PartyRecord {
            name: name.to_string(),
            role,
            replicas: replicas.to_vec(),
            token_hash: kairos_core::party::token_hash(&token),
            created: Instant::now(),
            nats_password_bcrypt: Some(nats_password_hash(&token)?),
        };
        self.store.submit(&Command::new(
            party.created,
            "",
            MAIN_TIMELINE,
            name,
            Change::AddParty {
                party: party.clone(),
            },
        ))?;
        Ok(NewPartyJson {
            party: party.name,
            role,
            replicas: party.replicas,
            token,
        })
    }

    pub fn parties(&self) -> Result<Vec<PartyJson>> {
        Ok(self.store.parties()?.iter().map(PartyJson::from).collect())
    }

    pub fn revoke_party(&self, name: &str, by: &str) -> Result<()> {
        self.store.submit(&Command::new(
            Instant::now(),
            "",
            MAIN_TIMELINE,
            by,
            Change::RevokeParty {
                name: name.to_string(),
            },
        ))?;
        Ok(())
    }

    /// The party a bearer token names, if any.
    pub fn authenticate(&self, token: &str) -> Result<Option<kairos_core::PartyRecord>> {
        Ok(self
            .store
            .party_by_token(&kairos_core::party::token_hash(token))?)
    }

    /// Rolls back every commit a crash left in progress (of `only`, or of every
    /// replica) to its last good frame; returns the recovered records.
    pub fn recover(
        &self,
        only: Option<&str>,
        capturer: &dyn Capturer,
    ) -> Result<Vec<CommitRecord>> {
        let replicas = match only {
            Some(name) => vec![self.store.replica(name)?],
            None => self.store.replicas()?,
        };
        let mut recovered = Vec::new();
        for replica in &replicas {
            if let Some(record) = self.committer(replica, capturer).recover()? {
                recovered.push(record);
            }
        }
        Ok(recovered)
    }
}

/// For operations that never capture.
struct NoCapture;

impl Capturer for NoCapture {
    fn capture(
        &self,
        replica: &ReplicaDefinition,
    ) -> std::result::Result<kairos_store::FrameRecord, String> {
        Err(format!(
            "replica {:?}: this operation does not capture",
            replica.name
        ))
    }
}

/// Randomness for tokens, from the operating system.
fn random_bytes() -> Result<[u8; kairos_core::party::TOKEN_RANDOM_BYTES]> {
    use std::io::Read;
    let mut bytes = [0; kairos_core::party::TOKEN_RANDOM_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|error| InputError::Random(error.to_string()))?;
    Ok(bytes)
}
