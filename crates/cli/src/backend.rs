//! Where a command runs: on the store in a data directory, or through a running node's
//! API. Both return the same types, so output is the same either way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kairos_capture::{CaptureRequest, capture};
use kairos_commit::{CommitRecord, Committer, DirectCapturer};
use kairos_core::spec::MAIN_TIMELINE;
use kairos_core::{Instant, Limits, ReplicaDefinition, TimelineSpec};
use kairos_node::wire::{
    AddReplicaRequest, CaptureJson, CommitRequest, ErrorBody, ForkRequest, FrameJson, ProposalJson,
    ProposeRequest, RestoreRequest, RevertRequest, SandboxRequest,
};
use kairos_replay::{RestoreOptions, RestoreReport, StateDiff, StateListing};
use kairos_sandbox::{ProposalDocument, SandboxOptions, SandboxReport};
use kairos_store::{AuditLog, Store, TimelineInfo, VerifyReport};
use serde::de::DeserializeOwned;

/// Responses larger than this are refused (a listing of a very large state is far smaller).
const RESPONSE_BYTES_MAX: u64 = 1 << 30;

pub enum Backend {
    Direct {
        store: Store,
        data_dir: PathBuf,
        limits: Limits,
    },
    Node {
        base: String,
        agent: ureq::Agent,
    },
}

fn spec(text: &str) -> Result<TimelineSpec> {
    Ok(TimelineSpec::parse(text)?)
}

impl Backend {
    pub fn direct(data_dir: &Path) -> Result<Backend> {
        let store = Store::open(data_dir)
            .with_context(|| format!("opening the store in {}", data_dir.display()))?;
        Ok(Backend::Direct {
            store,
            data_dir: data_dir.to_path_buf(),
            limits: Limits::default(),
        })
    }

    pub fn node(url: &str) -> Result<Backend> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--node {url:?} is not an http:// URL");
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(900)))
            .build()
            .into();
        Ok(Backend::Node { base, agent })
    }

    fn answer(
        base: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut response = response.map_err(|error| anyhow!("node {base}: {error}"))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        match response.body_mut().read_json::<ErrorBody>() {
            Ok(body) => Err(anyhow!("{}", body.error.message)),
            Err(_) => Err(anyhow!("node {base} answered {status}")),
        }
    }

    fn node_parts(&self) -> Result<(&str, &ureq::Agent)> {
        match self {
            Backend::Node { base, agent } => Ok((base, agent)),
            Backend::Direct { .. } => bail!("this request needs a node (--node URL)"),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> Result<T> {
        let (base, agent) = self.node_parts()?;
        let mut request = agent.get(format!("{base}{path}"));
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        Self::json_answer(base, request.call())
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T> {
        let (base, agent) = self.node_parts()?;
        let request = agent.post(format!("{base}{path}"));
        let response = match body {
            Some(body) => request.send_json(body),
            None => request.send_empty(),
        };
        Self::json_answer(base, response)
    }

    /// A successful answer's JSON body (bounded), or the node's error message.
    fn json_answer<T: DeserializeOwned>(
        base: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut response = Self::answer(base, response)?;
        response
            .body_mut()
            .with_config()
            .limit(RESPONSE_BYTES_MAX)
            .read_json()
            .map_err(|error| anyhow!("node {base}: reading the answer: {error}"))
    }

    pub fn replicas(&self) -> Result<Vec<ReplicaDefinition>> {
        match self {
            Backend::Direct { store, .. } => Ok(store.replicas()?),
            Backend::Node { .. } => self.get("/api/replicas", &[]),
        }
    }

    pub fn add_replica(
        &self,
        name: &str,
        root: &Path,
        processes: Vec<String>,
        exclude: Vec<String>,
        interval: &str,
        settings: kairos_capture::ReplicaSettings,
    ) -> Result<ReplicaDefinition> {
        match self {
            Backend::Direct { store, .. } => {
                let replica = kairos_capture::define_replica(
                    name, root, processes, exclude, interval, &settings,
                )
                .map_err(|message| anyhow!(message))?;
                store.add_replica(&replica)?;
                Ok(replica)
            }
            Backend::Node { .. } => {
                let root = std::path::absolute(root)
                    .with_context(|| format!("resolving {}", root.display()))?;
                let request = AddReplicaRequest {
                    name: name.to_string(),
                    root: root.display().to_string(),
                    processes,
                    exclude,
                    capture_interval: interval.to_string(),
                    settings,
                };
                self.post("/api/replicas", Some(&request))
            }
        }
    }

    pub fn capture(&self, name: &str) -> Result<CaptureJson> {
        match self {
            Backend::Direct {
                store,
                data_dir,
                limits,
            } => {
                let replica = store.replica(name)?;
                let report = capture(
                    store,
                    &CaptureRequest {
                        replica: &replica,
                        timeline: MAIN_TIMELINE,
                        limits: *limits,
                        skip: vec![data_dir.clone()],
                    },
                )?;
                Ok(CaptureJson::from(&report))
            }
            Backend::Node { .. } => {
                self.post(&format!("/api/replicas/{name}/capture"), None::<&()>)
            }
        }
    }

    pub fn history(&self, name: &str, timeline: &str) -> Result<Vec<FrameJson>> {
        match self {
            Backend::Direct { store, .. } => {
                store.replica(name)?;
                Ok(store
                    .history(name, timeline)?
                    .iter()
                    .map(FrameJson::from)
                    .collect())
            }
            Backend::Node { .. } => self.get(
                &format!("/api/replicas/{name}/history"),
                &[("timeline", timeline)],
            ),
        }
    }

    pub fn state(&self, name: &str, at: &str) -> Result<StateListing> {
        match self {
            Backend::Direct { store, .. } => {
                let view = kairos_replay::open(store, name, &spec(at)?, Instant::now())?;
                Ok(kairos_replay::listing(store, &view)?)
            }
            Backend::Node { .. } => {
                spec(at)?;
                self.get(&format!("/api/replicas/{name}/state"), &[("at", at)])
            }
        }
    }

    /// Writes the file's bytes to `out`; returns whether it was torn when captured.
    pub fn cat(&self, name: &str, path: &Path, at: &str, out: &mut dyn Write) -> Result<bool> {
        use std::os::unix::ffi::OsStrExt;
        match self {
            Backend::Direct { store, limits, .. } => {
                let view = kairos_replay::open(store, name, &spec(at)?, Instant::now())?;
                let reader = store.reader()?;
                let outcome = view.cat(&reader, path.as_os_str().as_bytes(), limits, out)?;
                Ok(outcome.torn)
            }
            Backend::Node { base, agent } => {
                spec(at)?;
                let path = path.to_str().ok_or_else(|| {
                    anyhow!(
                        "path {} is not UTF-8; read it on the node's store directly",
                        path.display()
                    )
                })?;
                let request = agent
                    .get(format!("{base}/api/replicas/{name}/file"))
                    .query("path", path)
                    .query("at", at);
                let mut response = Self::answer(base, request.call())?;
                let torn = response
                    .headers()
                    .get("x-kairos-torn")
                    .is_some_and(|value| value == "true");
                let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
                std::io::copy(&mut reader, out).context("writing to standard output")?;
                Ok(torn)
            }
        }
    }

    pub fn diff(&self, name: &str, from: &str, to: &str) -> Result<StateDiff> {
        match self {
            Backend::Direct { store, .. } => {
                let now = Instant::now();
                let from = kairos_replay::open(store, name, &spec(from)?, now)?;
                let to = kairos_replay::open(store, name, &spec(to)?, now)?;
                Ok(kairos_replay::diff(store, &from, &to)?)
            }
            Backend::Node { .. } => {
                spec(from)?;
                spec(to)?;
                self.get(
                    &format!("/api/replicas/{name}/diff"),
                    &[("from", from), ("to", to)],
                )
            }
        }
    }

    pub fn restore(
        &self,
        name: &str,
        at: &str,
        into: &Path,
        force: bool,
        progress: &(dyn Fn(u64) + Sync),
        total: &dyn Fn(u64),
    ) -> Result<RestoreReport> {
        match self {
            Backend::Direct { store, .. } => {
                let replica = store.replica(name)?;
                let view = kairos_replay::open(store, name, &spec(at)?, Instant::now())?;
                total(view.frame.bytes);
                let options = RestoreOptions {
                    force,
                    exclude: replica.exclude.clone(),
                    progress: Some(progress),
                    durable: false,
                };
                Ok(kairos_replay::restore(store, &view, into, &options)?)
            }
            Backend::Node { .. } => {
                spec(at)?;
                let into = std::path::absolute(into)
                    .with_context(|| format!("resolving {}", into.display()))?;
                let request = RestoreRequest {
                    at: at.to_string(),
                    into: into.display().to_string(),
                    force,
                };
                self.post(&format!("/api/replicas/{name}/restore"), Some(&request))
            }
        }
    }

    pub fn verify(&self) -> Result<VerifyReport> {
        match self {
            Backend::Direct { store, .. } => Ok(store.verify()?),
            Backend::Node { .. } => self.get("/api/verify", &[]),
        }
    }

    fn committer_parts(&self) -> Result<(&Store, &PathBuf, Limits)> {
        match self {
            Backend::Direct {
                store,
                data_dir,
                limits,
            } => Ok((store, data_dir, *limits)),
            Backend::Node { .. } => bail!("not a direct backend"),
        }
    }

    /// Runs `job` with a committer on the data directory, after recovering a commit that a
    /// killed process left in progress (no other process can hold the store meanwhile).
    fn with_committer<T>(
        &self,
        name: &str,
        job: impl FnOnce(&Committer<'_>) -> Result<T>,
    ) -> Result<T> {
        let (store, data_dir, limits) = self.committer_parts()?;
        let replica = store.replica(name)?;
        let capturer = DirectCapturer {
            store,
            limits,
            skip: vec![data_dir.clone()],
        };
        let committer = Committer {
            store,
            replica: &replica,
            limits,
            capturer: &capturer,
        };
        if let Some(recovered) = committer.recover()? {
            eprintln!(
                "kairos: commit {} was interrupted ({}); the last good frame was restored",
                recovered.commit.short(),
                recovered
                    .rollback
                    .as_ref()
                    .map(|r| r.evidence.as_str())
                    .unwrap_or("")
            );
        }
        job(&committer)
    }

    pub fn timelines(&self, name: &str) -> Result<Vec<TimelineInfo>> {
        match self {
            Backend::Direct { store, .. } => Ok(store.timeline_infos(name)?),
            Backend::Node { .. } => self.get(&format!("/api/replicas/{name}/timelines"), &[]),
        }
    }

    pub fn fork(&self, name: &str, timeline: &str, at: &str, party: &str) -> Result<TimelineInfo> {
        if !kairos_core::spec::is_valid_timeline_name(timeline) {
            bail!("timeline name {timeline:?} is invalid: use letters, digits, '-', '_' or '.'");
        }
        match self {
            Backend::Direct { store, .. } => {
                let now = Instant::now();
                let base = store.resolve(name, &spec(at)?, now)?;
                store.fork_timeline(name, timeline, &base, now)?;
                store.audit_append(
                    name,
                    party,
                    "timeline",
                    serde_json::json!({"fork": timeline, "at": base.id.to_hex()}),
                    now,
                )?;
                store
                    .timeline_infos(name)?
                    .into_iter()
                    .find(|info| info.name == timeline)
                    .ok_or_else(|| anyhow!("the fork vanished"))
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{name}/timelines"),
                Some(&ForkRequest {
                    name: timeline.to_string(),
                    at: at.to_string(),
                    party: Some(party.to_string()),
                }),
            ),
        }
    }

    pub fn delete_timeline(&self, name: &str, timeline: &str, party: &str) -> Result<()> {
        match self {
            Backend::Direct { store, .. } => {
                store.delete_timeline(name, timeline)?;
                store.audit_append(
                    name,
                    party,
                    "timeline",
                    serde_json::json!({"delete": timeline}),
                    Instant::now(),
                )?;
                Ok(())
            }
            Backend::Node { .. } => {
                let (base, agent) = self.node_parts()?;
                let response = agent
                    .delete(format!("{base}/api/replicas/{name}/timelines/{timeline}"))
                    .query("party", party)
                    .call();
                Self::answer(base, response)?;
                Ok(())
            }
        }
    }

    pub fn propose(
        &self,
        name: &str,
        document: ProposalDocument,
        timeline: Option<&str>,
    ) -> Result<ProposalJson> {
        match self {
            Backend::Direct { store, limits, .. } => {
                let replica = store.replica(name)?;
                let proposal = kairos_sandbox::propose(
                    store,
                    &replica,
                    document,
                    timeline,
                    limits,
                    Instant::now(),
                )?;
                Ok(ProposalJson::from(&proposal))
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{name}/proposals"),
                Some(&ProposeRequest {
                    document,
                    timeline: timeline.map(str::to_string),
                }),
            ),
        }
    }

    pub fn sandbox(
        &self,
        name: &str,
        proposal: &str,
        ops: Option<Vec<usize>>,
        run_check: bool,
        party: &str,
    ) -> Result<SandboxReport> {
        match self {
            Backend::Direct { store, limits, .. } => {
                let replica = store.replica(name)?;
                let loaded = kairos_sandbox::load_proposal(store, name, proposal)?;
                Ok(kairos_sandbox::sandbox(
                    store,
                    &replica,
                    &loaded,
                    &SandboxOptions {
                        chosen: ops.as_deref(),
                        run_check,
                        party,
                    },
                    limits,
                    Instant::now(),
                )?)
            }
            Backend::Node { .. } => {
                kairos_core::hash::parse_hex_prefix(proposal)
                    .map_err(|error| anyhow!("proposal id {proposal:?}: {error}"))?;
                self.post(
                    &format!("/api/replicas/{name}/proposals/{proposal}/sandbox"),
                    Some(&SandboxRequest {
                        ops,
                        run_check,
                        party: Some(party.to_string()),
                    }),
                )
            }
        }
    }

    pub fn commit(
        &self,
        name: &str,
        proposal: &str,
        ops: Option<Vec<usize>>,
        wait: bool,
        party: &str,
    ) -> Result<CommitRecord> {
        match self {
            Backend::Direct { store, .. } => {
                if !wait {
                    bail!(
                        "--no-wait needs a running node to watch the commit (--node URL); without one the command waits for the watch window"
                    );
                }
                let loaded = kairos_sandbox::load_proposal(store, name, proposal)?;
                self.with_committer(name, |committer| {
                    let record = committer.begin(&loaded, ops.as_deref(), party)?;
                    Ok(committer.watch(record)?)
                })
            }
            Backend::Node { .. } => {
                kairos_core::hash::parse_hex_prefix(proposal)
                    .map_err(|error| anyhow!("proposal id {proposal:?}: {error}"))?;
                self.post(
                    &format!("/api/replicas/{name}/proposals/{proposal}/commit"),
                    Some(&CommitRequest {
                        ops,
                        wait,
                        party: Some(party.to_string()),
                    }),
                )
            }
        }
    }

    pub fn revert(&self, name: &str, to: &str, party: &str) -> Result<CommitRecord> {
        let to_spec = spec(to)?;
        match self {
            Backend::Direct { .. } => {
                self.with_committer(name, |committer| Ok(committer.revert(&to_spec, party)?))
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{name}/revert"),
                Some(&RevertRequest {
                    to: to.to_string(),
                    party: Some(party.to_string()),
                }),
            ),
        }
    }

    pub fn log(&self, name: &str) -> Result<AuditLog> {
        match self {
            Backend::Direct { store, .. } => {
                store.replica(name)?;
                self.with_committer(name, |_| Ok(()))?;
                Ok(store.audit_log(name)?)
            }
            Backend::Node { .. } => self.get(&format!("/api/replicas/{name}/log"), &[]),
        }
    }
}
