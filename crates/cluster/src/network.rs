//! Raft RPCs and object fetches between members, over HTTP on each node's API port
//! (`/cluster/...`). Every request carries the cluster's id (a member of another cluster
//! is refused by name), the members' shared secret as a bearer token, and the W3C trace
//! context of the span it is sent from.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Node, NodeId, TypeConfig};

/// The header naming the cluster a request is for.
pub const CLUSTER_HEADER: &str = "kairos-cluster";
/// The header naming the member that sends a request (for the receiver's logs and for
/// anything between members that routes by sender, such as a test's partition proxy).
pub const NODE_HEADER: &str = "kairos-node";
/// Largest answer read from a peer (a snapshot chunk, a batch of objects).
const ANSWER_BYTES_MAX: u64 = 256 << 20;

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("{peer} is unreachable: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("{peer} refused: {message}")]
    Refused {
        peer: String,
        status: u16,
        message: String,
    },
    #[error("{peer} answered something that is not a Kairos answer: {reason}")]
    Garbage { peer: String, reason: String },
}

/// What members send each other requests with.
#[derive(Clone)]
pub struct PeerClient {
    agent: ureq::Agent,
    secret: Option<Arc<str>>,
    cluster_id: Arc<RwLock<Option<String>>>,
    /// The member sending.
    from: NodeId,
}

impl PeerClient {
    pub fn new(
        from: NodeId,
        secret: Option<String>,
        cluster_id: Arc<RwLock<Option<String>>>,
    ) -> PeerClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(Duration::from_secs(30)))
            .max_idle_connections_per_host(8)
            .build()
            .into();
        PeerClient {
            agent,
            secret: secret.map(Into::into),
            cluster_id,
            from,
        }
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Posts `body` as JSON to `base` + `path` and reads a JSON answer (blocking).
    pub fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, PeerError> {
        let body = serde_json::to_vec(body).map_err(|error| PeerError::Garbage {
            peer: base.to_string(),
            reason: error.to_string(),
        })?;
        let bytes = self.post_bytes(base, path, "application/json", &body, timeout)?;
        serde_json::from_slice(&bytes).map_err(|error| PeerError::Garbage {
            peer: base.to_string(),
            reason: error.to_string(),
        })
    }

    /// Posts `body` to `base` + `path` and reads the answer's bytes (blocking).
    pub fn post_bytes(
        &self,
        base: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        let base = base.trim_end_matches('/');
        let mut request = self
            .agent
            .post(format!("{base}{path}"))
            .header("content-type", content_type);
        if let Some(secret) = &self.secret {
            request = request.header("authorization", format!("Bearer {secret}"));
        }
        if let Some(id) = self.cluster_id() {
            request = request.header(CLUSTER_HEADER, id);
        }
        request = request.header(NODE_HEADER, self.from.to_string());
        if let Some(traceparent) = kairos_telemetry::traceparent_of(&tracing::Span::current()) {
            request = request.header("traceparent", traceparent);
        }
        let response = request
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send(body);
        let mut response = response.map_err(|error| PeerError::Unreachable {
            peer: base.to_string(),
            reason: error.to_string(),
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(ANSWER_BYTES_MAX)
            .read_to_vec()
            .map_err(|error| PeerError::Unreachable {
                peer: base.to_string(),
                reason: format!("reading the answer: {error}"),
            })?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|value| value["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(PeerError::Refused {
            peer: base.to_string(),
            status,
            message,
        })
    }

    /// [`PeerClient::post`] off the async runtime's threads.
    pub async fn post_async<B, T>(
        &self,
        base: &str,
        path: &str,
        body: B,
        timeout: Duration,
    ) -> Result<T, PeerError>
    where
        B: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        let client = self.clone();
        let base = base.to_string();
        let path = path.to_string();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| client.post(&base, &path, &body, timeout))
        })
        .await
        .unwrap_or_else(|error| {
            Err(PeerError::Unreachable {
                peer: "(this node)".into(),
                reason: error.to_string(),
            })
        })
    }
}

/// Makes a connection per peer for openraft.
#[derive(Clone)]
pub struct Network {
    pub client: PeerClient,
}

pub struct Connection {
    client: PeerClient,
    target: NodeId,
    address: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Connection {
        Connection {
            client: self.client.clone(),
            target,
            address: node.addr.clone(),
        }
    }
}

impl Connection {
    async fn call<Q, A, E>(
        &self,
        path: &str,
        request: Q,
        timeout: Duration,
    ) -> Result<A, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Q: Serialize + Send + 'static,
        A: DeserializeOwned + Send + 'static,
        E: std::error::Error + DeserializeOwned + Send + 'static,
    {
        let span = tracing::debug_span!("raft.rpc", rpc = path, peer = self.target);
        let answer: Result<Result<A, RaftError<NodeId, E>>, PeerError> = {
            let _entered = span.enter();
            self.client
                .post_async(&self.address, path, request, timeout)
                .await
        };
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(RPCError::RemoteError(RemoteError::new(self.target, error))),
            Err(error @ PeerError::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&error)))
            }
            Err(error) => Err(RPCError::Network(NetworkError::new(&error))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("/cluster/raft/append", rpc, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("/cluster/raft/snapshot", rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("/cluster/raft/vote", rpc, option.hard_ttl())
            .await
    }
}
