//! Where a command runs: on the store in a data directory, or through a running node's
//! API. Both return the same types, so output is the same either way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kairos_commit::{CommitRecord, DirectCapturer};
use kairos_core::{Limits, ReplicaDefinition, StoreBackend, TimelineSpec};
use kairos_node::wire::{
    AddReplicaRequest, CaptureJson, CommitJson, CommitRequest, ErrorBody, ForkRequest, FrameJson,
    NewPartyJson, PartyJson, PartyRequest, PredictRequest, ProposalJson, ProposeRequest,
    RestoreRequest, RevertRequest, SandboxJson, SandboxRequest, SuggestRequest,
};
use kairos_ops::Service;
use kairos_ops::learn::{ModelReportJson, ModelStatusJson, PredictionJson, SuggestionJson};
use kairos_replay::{RestoreReport, StateDiff, StateListing};
use kairos_sandbox::ProposalDocument;
use kairos_store::redb_backend::CACHE_BYTES_DEFAULT;
use kairos_store::{AuditLog, Store, TimelineInfo, VerifyReport};
use serde::de::DeserializeOwned;

/// Responses larger than this are refused (a listing of a very large state is far smaller).
const RESPONSE_BYTES_MAX: u64 = 1 << 30;

// One backend per process, moved nowhere: the size of the store handle costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Direct {
        store: Store,
        data_dir: PathBuf,
        limits: Limits,
        learner: Box<kairos_ops::learn::Learner>,
        /// The configuration's `[retention]` policy (for replicas without their own).
        retention_default: Option<Box<kairos_core::RetentionPolicy>>,
    },
    Node {
        base: String,
        agent: ureq::Agent,
        /// `Bearer TOKEN`, when the party has a token.
        authorization: Option<String>,
        /// Whether requests name the acting party (with a token and no explicit
        /// `--party`, the node records the token's party).
        name_party: bool,
    },
}

fn spec(text: &str) -> Result<TimelineSpec> {
    Ok(TimelineSpec::parse(text)?)
}

impl Backend {
    /// The store of the configuration (the embedded file in `data_dir`, or FoundationDB),
    /// with the limits of the configuration.
    pub fn direct(data_dir: &Path, store: &StoreBackend, limits: Limits) -> Result<Backend> {
        let store =
            Store::open_configured(data_dir, store, CACHE_BYTES_DEFAULT).with_context(|| {
                match store {
                    StoreBackend::Redb => format!("opening the store in {}", data_dir.display()),
                    StoreBackend::FoundationDb(location) => {
                        format!("opening the FoundationDB store {:?}", location.key_prefix)
                    }
                }
            })?;
        Ok(Backend::Direct {
            store,
            data_dir: data_dir.to_path_buf(),
            limits,
            learner: Box::default(),
            retention_default: None,
        })
    }

    /// Registers (or replaces) the replicas a configuration defines, as a node does when
    /// it starts.
    pub fn adopt(&self, replicas: &[ReplicaDefinition]) -> Result<()> {
        if let Backend::Direct { store, .. } = self {
            for replica in replicas {
                store.put_replica(replica).with_context(|| {
                    format!("replica {:?} from the configuration", replica.name)
                })?;
            }
        }
        Ok(())
    }

    /// The operations on the data directory's store (direct mode only).
    fn service(&self) -> Option<Service<'_>> {
        match self {
            Backend::Direct {
                store,
                data_dir,
                limits,
                learner,
                ..
            } => Some(Service {
                store,
                limits: *limits,
                skip: vec![data_dir.clone()],
                learner,
            }),
            Backend::Node { .. } => None,
        }
    }

    /// Captures on the data directory's store, for commits run directly.
    fn capturer(&self) -> Result<DirectCapturer<'_>> {
        match self {
            Backend::Direct {
                store,
                data_dir,
                limits,
                ..
            } => Ok(DirectCapturer {
                store,
                limits: *limits,
                skip: vec![data_dir.clone()],
            }),
            Backend::Node { .. } => bail!("not a direct backend"),
        }
    }

    /// A node's API at `url`; `ca_cert` (PEM) is the authority an https:// node's
    /// certificate must chain to (else the WebPKI roots).
    pub fn node(
        url: &str,
        token: Option<&str>,
        party_given: bool,
        ca_cert: Option<&Path>,
    ) -> Result<Backend> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--node {url:?} is not an http:// or https:// URL");
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .with_context(|| format!("--ca-cert {}: reading it", path.display()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                    Ok(_) => None,
                    Err(error) => Some(Err(error)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| anyhow!("--ca-cert {}: {error}", path.display()))?;
            if certs.is_empty() {
                bail!("--ca-cert {} holds no PEM certificate", path.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(900)))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Backend::Node {
            base,
            agent,
            authorization: token.map(|token| format!("Bearer {}", token.trim())),
            name_party: party_given || token.is_none(),
        })
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
            Backend::Node { base, agent, .. } => Ok((base, agent)),
            Backend::Direct { .. } => bail!("this request needs a node (--node URL)"),
        }
    }

    /// `GET path` on the node, its JSON answer (cluster administration).
    pub fn node_get_json(&self, path: &str) -> Result<serde_json::Value> {
        if matches!(self, Backend::Direct { .. }) {
            bail!(
                "kairos cluster talks to a running node: start one (kairos up) or give --node URL"
            );
        }
        self.get(path, &[])
    }

    /// `POST path` with `body` on the node, its JSON answer (cluster administration).
    pub fn node_post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        if matches!(self, Backend::Direct { .. }) {
            bail!(
                "kairos cluster talks to a running node: start one (kairos up) or give --node URL"
            );
        }
        self.post(path, Some(body))
    }

    /// The party a request to the node names, if it names one.
    fn node_party(&self, party: &str) -> Option<String> {
        match self {
            Backend::Node {
                name_party: false, ..
            } => None,
            _ => Some(party.to_string()),
        }
    }

    /// The request with the party's token, if any.
    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match self {
            Backend::Node {
                authorization: Some(authorization),
                ..
            } => request.header("Authorization", authorization),
            _ => request,
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> Result<T> {
        let (base, agent) = self.node_parts()?;
        let mut request = self.authorized(agent.get(format!("{base}{path}")));
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
        let request = self.authorized(agent.post(format!("{base}{path}")));
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

    /// The node's live events (`GET /api/events`) as a byte stream of server-sent events,
    /// open for as long as the node sends them.
    pub fn event_stream(&self, query: &[(&str, &str)]) -> Result<impl std::io::BufRead + use<>> {
        let (base, agent) = match self {
            Backend::Node { base, agent, .. } => (base, agent),
            Backend::Direct { .. } => bail!(
                "kairos watch streams a node's events: start one (kairos up) or give --node URL, or read NATS with --nats URL"
            ),
        };
        let mut request = self
            .authorized(agent.get(format!("{base}/api/events")))
            .config()
            .timeout_global(None)
            .build();
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        let response = Self::answer(base, request.call())?;
        Ok(std::io::BufReader::new(
            response
                .into_body()
                .into_with_config()
                .limit(u64::MAX)
                .reader(),
        ))
    }

    pub fn replicas(&self) -> Result<Vec<ReplicaDefinition>> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.replicas()?),
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
            Backend::Direct { .. } => {
                let root = std::path::absolute(root)
                    .with_context(|| format!("resolving {}", root.display()))?;
                Ok(self
                    .service()
                    .context("direct")?
                    .add_replica(kairos_ops::ReplicaRequest {
                        name,
                        root: &root,
                        processes,
                        exclude,
                        capture_interval: interval,
                        settings: &settings,
                    })?)
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
            Backend::Direct { .. } => {
                let report = self.service().context("direct")?.capture_directly(name)?;
                Ok(CaptureJson::from(&report))
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/capture", segment(name)),
                None::<&()>,
            ),
        }
    }

    pub fn history(&self, name: &str, timeline: &str) -> Result<Vec<FrameJson>> {
        match self {
            Backend::Direct { .. } => {
                Ok(self.service().context("direct")?.history(name, timeline)?)
            }
            Backend::Node { .. } => self.get(
                &format!("/api/replicas/{}/history", segment(name)),
                &[("timeline", timeline)],
            ),
        }
    }

    pub fn state(&self, name: &str, at: &str) -> Result<StateListing> {
        match self {
            Backend::Direct { .. } => {
                Ok(self.service().context("direct")?.state(name, &spec(at)?)?)
            }
            Backend::Node { .. } => {
                spec(at)?;
                self.get(
                    &format!("/api/replicas/{}/state", segment(name)),
                    &[("at", at)],
                )
            }
        }
    }

    /// Writes the file's bytes to `out`; returns whether it was torn when captured.
    pub fn cat(&self, name: &str, path: &Path, at: &str, out: &mut dyn Write) -> Result<bool> {
        use std::os::unix::ffi::OsStrExt;
        match self {
            Backend::Direct { .. } => {
                let service = self.service().context("direct")?;
                Ok(service.cat(name, path.as_os_str().as_bytes(), &spec(at)?, out)?)
            }
            Backend::Node { base, agent, .. } => {
                spec(at)?;
                let path = path.to_str().ok_or_else(|| {
                    anyhow!(
                        "path {} is not UTF-8; read it on the node's store directly",
                        path.display()
                    )
                })?;
                let request = self
                    .authorized(agent.get(format!("{}/api/replicas/{}/file", base, segment(name))))
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
            Backend::Direct { .. } => {
                Ok(self
                    .service()
                    .context("direct")?
                    .diff(name, &spec(from)?, &spec(to)?)?)
            }
            Backend::Node { .. } => {
                spec(from)?;
                spec(to)?;
                self.get(
                    &format!("/api/replicas/{}/diff", segment(name)),
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
            Backend::Direct { .. } => {
                let into = std::path::absolute(into)
                    .with_context(|| format!("resolving {}", into.display()))?;
                let service = self.service().context("direct")?;
                Ok(service.restore(name, &spec(at)?, &into, force, Some(progress), total)?)
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
                self.post(
                    &format!("/api/replicas/{}/restore", segment(name)),
                    Some(&request),
                )
            }
        }
    }

    pub fn verify(&self) -> Result<VerifyReport> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.verify()?),
            Backend::Node { .. } => self.get("/api/verify", &[]),
        }
    }

    /// `kairos gc`: on a data directory the file is compacted afterwards (redb needs the
    /// only handle for that, so the backend is given up); through a node it is not.
    pub fn gc(self, options: &kairos_store::GcOptions) -> Result<kairos_store::GcReport> {
        let mut report = match &self {
            Backend::Direct { .. } => self.service().context("direct")?.gc(options)?,
            Backend::Node { .. } => return self.post("/api/gc", Some(options)),
        };
        if let Backend::Direct {
            store, data_dir, ..
        } = self
            && !options.dry_run
        {
            let started = std::time::Instant::now();
            drop(store);
            let path = data_dir.join(kairos_store::store::STORE_FILE);
            let backend = kairos_store::redb_backend::RedbBackend::open(&path)
                .with_context(|| format!("reopening {} to compact it", path.display()))?;
            report.bytes_on_disk_after = backend
                .compact()
                .with_context(|| format!("compacting {}", path.display()))?;
            report.compacted = true;
            report.compact_ms = started.elapsed().as_millis() as u64;
            report.duration_ms += report.compact_ms;
        }
        Ok(report)
    }

    /// `kairos stats`.
    pub fn stats(&self) -> Result<kairos_store::StoreFigures> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.stats()?),
            Backend::Node { .. } => self.get("/api/stats", &[]),
        }
    }

    /// Before a change on the data directory: a commit a killed process left in progress
    /// is rolled back first (no other process can hold the store meanwhile).
    fn recover_first(&self, name: &str) -> Result<()> {
        let service = self.service().context("direct")?;
        for recovered in service.recover(Some(name), &self.capturer()?)? {
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
        Ok(())
    }

    /// `kairos recover [R]`: rolls back commits a crash left in progress.
    pub fn recover(&self, name: Option<&str>) -> Result<Vec<CommitRecord>> {
        match self {
            Backend::Direct { .. } => {
                let service = self.service().context("direct")?;
                Ok(service.recover(name, &self.capturer()?)?)
            }
            Backend::Node { .. } => {
                if let Some(name) = name {
                    // An unknown replica is named as such, as on the data directory.
                    self.timelines(name)?;
                }
                bail!(
                    "a running node recovers interrupted commits when it starts; stop it and run `kairos recover` on its data directory, or restart it"
                )
            }
        }
    }

    pub fn timelines(&self, name: &str) -> Result<Vec<TimelineInfo>> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.timelines(name)?),
            Backend::Node { .. } => {
                self.get(&format!("/api/replicas/{}/timelines", segment(name)), &[])
            }
        }
    }

    pub fn fork(&self, name: &str, timeline: &str, at: &str, party: &str) -> Result<TimelineInfo> {
        if !kairos_core::spec::is_valid_timeline_name(timeline) {
            bail!(
                "timeline name {timeline:?} is invalid: use letters, digits, '-', '_' or '.', starting with a letter or digit, at most 64 characters"
            );
        }
        match self {
            Backend::Direct { .. } => {
                Ok(self
                    .service()
                    .context("direct")?
                    .fork(name, timeline, &spec(at)?, party)?)
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/timelines", segment(name)),
                Some(&ForkRequest {
                    name: timeline.to_string(),
                    at: at.to_string(),
                    party: self.node_party(party),
                }),
            ),
        }
    }

    pub fn delete_timeline(&self, name: &str, timeline: &str, party: &str) -> Result<()> {
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .delete_timeline(name, timeline, party)?),
            Backend::Node { .. } => {
                let (base, agent) = self.node_parts()?;
                let mut request = self.authorized(agent.delete(format!(
                    "{}/api/replicas/{}/timelines/{}",
                    base,
                    segment(name),
                    segment(timeline)
                )));
                if let Some(party) = self.node_party(party) {
                    request = request.query("party", party);
                }
                let response = request.call();
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
        party: &str,
    ) -> Result<ProposalJson> {
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .propose(name, document, timeline, party)?),
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/proposals", segment(name)),
                Some(&ProposeRequest {
                    document,
                    timeline: timeline.map(str::to_string),
                    party: self.node_party(party),
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
    ) -> Result<SandboxJson> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.sandbox(
                name,
                proposal,
                ops.as_deref(),
                run_check,
                party,
            )?),
            Backend::Node { .. } => self.post(
                &proposal_path(name, proposal, "sandbox")?,
                Some(&SandboxRequest {
                    ops,
                    run_check,
                    party: self.node_party(party),
                }),
            ),
        }
    }

    pub fn commit(
        &self,
        name: &str,
        proposal: &str,
        ops: Option<Vec<usize>>,
        wait: bool,
        party: &str,
    ) -> Result<CommitJson> {
        match self {
            Backend::Direct { .. } => {
                if !wait {
                    bail!(
                        "--no-wait needs a running node to watch the commit (--node URL); without one the command waits for the watch window"
                    );
                }
                self.recover_first(name)?;
                let service = self.service().context("direct")?;
                let capturer = self.capturer()?;
                // Predicted before anything is applied, so that the outcome scores it.
                let prediction =
                    service.prediction_before_commit(name, proposal, ops.as_deref(), party);
                let record = service.begin_commit(
                    name,
                    proposal,
                    ops.as_deref(),
                    party,
                    &capturer,
                    prediction.as_ref(),
                )?;
                let record = if record.status.is_final() {
                    record
                } else {
                    service.watch(record, &capturer)?
                };
                Ok(CommitJson { record, prediction })
            }
            Backend::Node { .. } => self.post(
                &proposal_path(name, proposal, "commit")?,
                Some(&CommitRequest {
                    ops,
                    wait,
                    party: self.node_party(party),
                }),
            ),
        }
    }

    /// Gates a stored proposal (and with `thresholds.commit`, commits it if it passes).
    pub fn gate(
        &self,
        name: &str,
        proposal: &str,
        thresholds: &kairos_ops::gate::GateThresholds,
        party: &str,
    ) -> Result<kairos_ops::gate::GateJson> {
        match self {
            Backend::Direct { .. } => {
                let service = self.service().context("direct")?;
                if !thresholds.commit {
                    return Ok(service.gate(name, proposal, None, thresholds, None, party)?);
                }
                self.recover_first(name)?;
                let capturer = self.capturer()?;
                Ok(service.gate(name, proposal, None, thresholds, Some(&capturer), party)?)
            }
            Backend::Node { .. } => {
                let route = if thresholds.commit {
                    "gate/commit"
                } else {
                    "gate"
                };
                self.post(
                    &proposal_path(name, proposal, route)?,
                    Some(&kairos_ops::wire::GateRequest {
                        ops: None,
                        max_risk: thresholds.max_risk,
                        min_confidence: thresholds.min_confidence,
                        run_check: thresholds.run_check,
                        party: self.node_party(party),
                    }),
                )
            }
        }
    }

    pub fn review(
        &self,
        name: &str,
        proposal: &str,
        verdict: kairos_core::Verdict,
        comment: Option<String>,
        party: &str,
    ) -> Result<kairos_ops::review::ReviewJson> {
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .review(name, proposal, verdict, comment, party)?),
            Backend::Node { .. } => self.post(
                &proposal_path(name, proposal, "review")?,
                Some(&kairos_node::wire::ReviewRequest {
                    verdict,
                    comment,
                    party: self.node_party(party),
                }),
            ),
        }
    }

    pub fn proposals(
        &self,
        name: &str,
        timeline: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<kairos_ops::review::ProposalListJson>> {
        let parsed = status
            .map(kairos_ops::review::ProposalStatus::parse)
            .transpose()?;
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .proposals(name, timeline, parsed)?),
            Backend::Node { .. } => {
                let mut query = Vec::new();
                if let Some(timeline) = timeline {
                    query.push(("timeline", timeline));
                }
                if let Some(status) = status {
                    query.push(("status", status));
                }
                self.get(
                    &format!("/api/replicas/{}/proposals", segment(name)),
                    &query,
                )
            }
        }
    }

    pub fn predict(
        &self,
        name: &str,
        proposal: &str,
        ops: Option<Vec<usize>>,
        party: &str,
    ) -> Result<PredictionJson> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.predict(
                name,
                proposal,
                ops.as_deref(),
                party,
            )?),
            Backend::Node { .. } => self.post(
                &proposal_path(name, proposal, "predict")?,
                Some(&PredictRequest {
                    ops,
                    party: self.node_party(party),
                }),
            ),
        }
    }

    pub fn model_train(&self, name: &str, party: &str) -> Result<ModelStatusJson> {
        match self {
            Backend::Direct { .. } => {
                Ok(self.service().context("direct")?.train_model(name, party)?)
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/model/train", segment(name)),
                None::<&()>,
            ),
        }
    }

    pub fn model_status(&self, name: &str) -> Result<ModelStatusJson> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.model_status(name)?),
            Backend::Node { .. } => {
                self.get(&format!("/api/replicas/{}/model", segment(name)), &[])
            }
        }
    }

    pub fn model_report(&self, name: &str) -> Result<ModelReportJson> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.model_report(name)?),
            Backend::Node { .. } => self.get(
                &format!("/api/replicas/{}/model/report", segment(name)),
                &[],
            ),
        }
    }

    pub fn suggest(&self, name: &str, request: SuggestRequest) -> Result<Vec<SuggestionJson>> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.suggest(
                name,
                &request.file,
                &request.key,
                &request.values,
                request.objective.as_deref(),
            )?),
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/suggest", segment(name)),
                Some(&request),
            ),
        }
    }

    pub fn revert(&self, name: &str, to: &str, party: &str) -> Result<CommitRecord> {
        let to_spec = spec(to)?;
        match self {
            Backend::Direct { .. } => {
                self.recover_first(name)?;
                let service = self.service().context("direct")?;
                Ok(service.revert(name, &to_spec, party, &self.capturer()?)?)
            }
            Backend::Node { .. } => self.post(
                &format!("/api/replicas/{}/revert", segment(name)),
                Some(&RevertRequest {
                    to: to.to_string(),
                    party: self.node_party(party),
                }),
            ),
        }
    }

    /// Sets the policy of replicas without their own (the configuration's `[retention]`).
    pub fn set_retention_default(&mut self, policy: Option<kairos_core::RetentionPolicy>) {
        if let Backend::Direct {
            retention_default, ..
        } = self
        {
            *retention_default = policy.map(Box::new);
        }
    }

    pub fn forget(
        &self,
        name: &str,
        request: &kairos_ops::wire::ForgetRequestJson,
        party: &str,
    ) -> Result<kairos_ops::ForgetReport> {
        match self {
            Backend::Direct {
                retention_default, ..
            } => {
                let flags = request.policy().map_err(|message| anyhow!("{message}"))?;
                Ok(self.service().context("direct")?.forget(
                    name,
                    &kairos_ops::ForgetRequest {
                        timeline: request.timeline.as_deref(),
                        flags,
                        default: retention_default.as_deref().copied(),
                        party,
                        dry_run: request.dry_run,
                    },
                )?)
            }
            Backend::Node { .. } => {
                let mut request = request.clone();
                request.party = self.node_party(party);
                self.post(
                    &format!("/api/replicas/{}/forget", segment(name)),
                    Some(&request),
                )
            }
        }
    }

    pub fn log(&self, name: &str) -> Result<AuditLog> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.log(name)?),
            Backend::Node { .. } => self.get(&format!("/api/replicas/{}/log", segment(name)), &[]),
        }
    }

    pub fn add_party(&self, name: &str, role: &str, replicas: &[String]) -> Result<NewPartyJson> {
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .add_party(name, role, replicas)?),
            Backend::Node { .. } => self.post(
                "/api/parties",
                Some(&PartyRequest {
                    name: name.to_string(),
                    role: role.to_string(),
                    replicas: replicas.to_vec(),
                }),
            ),
        }
    }

    pub fn parties(&self) -> Result<Vec<PartyJson>> {
        match self {
            Backend::Direct { .. } => Ok(self.service().context("direct")?.parties()?),
            Backend::Node { .. } => self.get("/api/parties", &[]),
        }
    }

    pub fn revoke_party(&self, name: &str, by: &str) -> Result<()> {
        match self {
            Backend::Direct { .. } => {
                Ok(self.service().context("direct")?.revoke_party(name, by)?)
            }
            Backend::Node { .. } => {
                let (base, agent) = self.node_parts()?;
                let response = self
                    .authorized(agent.delete(format!("{}/api/parties/{}", base, segment(name))))
                    .call();
                Self::answer(base, response)?;
                Ok(())
            }
        }
    }
}

/// `text` as one URL path segment: everything but unreserved characters percent-encoded,
/// so a name is never read as a path, a query or an escape by the node.
fn segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Bisect and the minimal revert of a culprit frame.
impl Backend {
    pub fn bisect(
        &self,
        name: &str,
        request: &kairos_ops::bisect::BisectRequest<'_>,
    ) -> Result<kairos_ops::bisect::BisectReport> {
        match self {
            Backend::Direct { .. } => {
                Ok(self.service().context("direct")?.bisect(name, request)?)
            }
            Backend::Node { .. } => bail!(
                "bisect runs on a data directory, not through a node: stop the node or run it where the store is not held"
            ),
        }
    }

    pub fn revert_culprit(
        &self,
        name: &str,
        culprit: &str,
        party: &str,
    ) -> Result<kairos_ops::culprit::CulpritRevertJson> {
        let culprit = spec(culprit)?;
        match self {
            Backend::Direct { .. } => Ok(self
                .service()
                .context("direct")?
                .revert_culprit(name, &culprit, party)?),
            Backend::Node { .. } => bail!(
                "revert --culprit runs on a data directory, not through a node: stop the node or run it where the store is not held"
            ),
        }
    }
}

/// The API path of an action on a proposal (`…/proposals/ID/sandbox`), its id checked
/// first so that a bad one is named before any request.
fn proposal_path(name: &str, proposal: &str, action: &str) -> Result<String> {
    kairos_core::hash::parse_hex_prefix(proposal)
        .map_err(|error| anyhow!("proposal id {proposal:?}: {error}"))?;
    Ok(format!(
        "/api/replicas/{}/proposals/{}/{action}",
        segment(name),
        segment(proposal)
    ))
}
