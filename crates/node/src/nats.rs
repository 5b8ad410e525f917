//! NATS: the node publishes the catalog's feed on JetStream, answers requests on
//! `kairos.api.<verb>`, and writes the parties' NATS users and permissions for nats-server.
//!
//! - **Events**: each replica has a stream `<stream_prefix>_<replica>` on the subjects
//!   `kairos.<replica>.>`; every event of the feed goes to
//!   `kairos.<replica>.<timeline>.<event>` with its id as `Nats-Msg-Id`, so JetStream keeps
//!   each once however often it is sent. The publisher reads the catalog after its cursor
//!   (kept in `nats-published.json` in the data directory) and moves the cursor only once
//!   JetStream acknowledged everything read: a NATS outage delays events, never loses them,
//!   and never blocks a commit.
//! - **Requests**: a message on `kairos.api.<verb>` is answered as the HTTP API answers the
//!   same request (it goes through the same router: validation, errors, roles, party
//!   scopes), always with a party's token (`Authorization: Bearer TOKEN` header).
//! - **Credentials**: a party's NATS user is its name and its password is its token
//!   (nats-server keeps only the bcrypt hash); its permissions follow its role and its
//!   replicas. The node rewrites the authorization file whenever a party or replica changes
//!   and signals nats-server to reload it, so a revoked party is disconnected at once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use futures::StreamExt;
use kairos_config::NatsConfig;
use kairos_core::{Instant, PartyRecord, Role};
use kairos_store::{FeedCursor, FeedEvent};
use serde::{Deserialize, Serialize};

use crate::Shared;

/// The publisher's cursor, in the data directory.
pub const CURSOR_FILE: &str = "nats-published.json";
/// Requests over NATS answered at once; more are answered busy.
const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// How long a JetStream acknowledgement may take before the batch is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between attempts while NATS is unreachable.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);
/// The queue group every node's request listener joins (one node answers each request).
const QUEUE_GROUP: &str = "kairos";
/// The header a reply's HTTP status is in.
pub const STATUS_HEADER: &str = "Kairos-Status";

/// The verbs of `kairos.api.<verb>`: the role each needs and the HTTP route it is.
pub const VERBS: &[Verb] = &[
    Verb::new("status", Role::Viewer, "GET", "/api/status"),
    Verb::new(
        "proposals",
        Role::Viewer,
        "GET",
        "/api/replicas/{replica}/proposals",
    ),
    Verb::new(
        "proposal",
        Role::Viewer,
        "GET",
        "/api/replicas/{replica}/proposals/{proposal}",
    ),
    Verb::new(
        "propose",
        Role::Proposer,
        "POST",
        "/api/replicas/{replica}/proposals",
    ),
    Verb::new(
        "validate",
        Role::Proposer,
        "POST",
        "/api/replicas/{replica}/proposals/validate",
    ),
    Verb::new(
        "sandbox",
        Role::Proposer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/sandbox",
    ),
    Verb::new(
        "predict",
        Role::Proposer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/predict",
    ),
    Verb::new(
        "review",
        Role::Reviewer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/review",
    ),
    Verb::new(
        "commit",
        Role::Committer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/commit",
    ),
    Verb::new(
        "gate",
        Role::Proposer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/gate",
    ),
    Verb::new(
        "gate_commit",
        Role::Committer,
        "POST",
        "/api/replicas/{replica}/proposals/{proposal}/gate/commit",
    ),
];

#[derive(Debug, Clone, Copy)]
pub struct Verb {
    pub name: &'static str,
    pub role: Role,
    pub method: &'static str,
    pub path: &'static str,
}

impl Verb {
    const fn new(name: &'static str, role: Role, method: &'static str, path: &'static str) -> Verb {
        Verb {
            name,
            role,
            method,
            path,
        }
    }
}

/// A replica, timeline or party name as one subject token: names may hold `.`, which
/// separates tokens, so it is written `%2E` (`%` is never in a name, so no two names
/// share a token). A replica named `api` would put its events beside the requests: it is
/// written `%api`.
pub fn subject_token(name: &str) -> String {
    if name == "api" {
        return "%api".into();
    }
    name.replace('.', "%2E")
}

pub fn event_subject(prefix: &str, event: &FeedEvent) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        subject_token(&event.replica),
        subject_token(&event.timeline),
        event.event
    )
}

pub fn stream_name(stream_prefix: &str, replica: &str) -> String {
    format!("{stream_prefix}_{}", subject_token(replica))
}

/// The inbox prefix of a party's connection: only it may read its replies.
pub fn inbox_prefix(party: &str) -> String {
    format!("_INBOX_{}", subject_token(party))
}

/// A user's NATS permissions: subjects it may publish and subscribe to, and exceptions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe: Vec<String>,
    pub subscribe_deny: Vec<String>,
}

/// What a party may publish and subscribe to, by its role and replicas. JetStream: it
/// reads its replicas' streams through ephemeral consumers (server-named) or one durable
/// consumer per stream named after itself; the durable consumers of the other `parties`
/// are denied to it (a party cannot read, ack or delete another's), and no party deletes
/// consumers or touches streams.
pub fn permissions(
    party: &PartyRecord,
    parties: &[PartyRecord],
    replicas: &[String],
    config: &NatsConfig,
) -> Permissions {
    let prefix = &config.subject_prefix;
    let mut permissions = Permissions {
        publish: VERBS
            .iter()
            .filter(|verb| party.role >= verb.role)
            .map(|verb| format!("{prefix}.api.{}", verb.name))
            .collect(),
        subscribe: vec![format!("{}.>", inbox_prefix(&party.name))],
        subscribe_deny: vec![format!("{prefix}.api.>")],
        ..Permissions::default()
    };
    permissions.publish.push("$JS.API.INFO".into());
    let own = subject_token(&party.name);
    for replica in replicas.iter().filter(|replica| party.covers(replica)) {
        let stream = stream_name(&config.stream_prefix, replica);
        permissions
            .subscribe
            .push(format!("{prefix}.{}.>", subject_token(replica)));
        permissions.publish.extend([
            format!("$JS.API.STREAM.INFO.{stream}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.{own}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.{own}.>"),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{own}"),
            format!("$JS.API.CONSUMER.INFO.{stream}.*"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
            format!("$JS.ACK.{stream}.>"),
            format!("$JS.FC.{stream}.>"),
        ]);
        for other in parties.iter().filter(|other| other.name != party.name) {
            let other = subject_token(&other.name);
            permissions.publish_deny.extend([
                format!("$JS.API.CONSUMER.INFO.{stream}.{other}"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{other}"),
                format!("$JS.ACK.{stream}.{other}.>"),
            ]);
        }
    }
    permissions
}

/// The node's own permissions: publish events and JetStream requests (never purging or
/// deleting a stream, a message or a consumer), answer requests only into inboxes,
/// subscribe to requests and its own inbox.
pub fn node_permissions(parties: &[PartyRecord], config: &NatsConfig) -> Permissions {
    let prefix = &config.subject_prefix;
    let mut publish = vec![
        format!("{prefix}.>"),
        "$JS.API.>".to_string(),
        "_INBOX.>".to_string(),
    ];
    publish.extend(
        parties
            .iter()
            .map(|party| format!("{}.>", inbox_prefix(&party.name))),
    );
    Permissions {
        publish,
        publish_deny: vec![
            format!("{prefix}.api.>"),
            "$JS.API.STREAM.PURGE.>".into(),
            "$JS.API.STREAM.DELETE.>".into(),
            "$JS.API.STREAM.MSG.DELETE.>".into(),
            "$JS.API.CONSUMER.DELETE.>".into(),
        ],
        subscribe: vec![format!("{prefix}.api.*"), "_INBOX.>".into()],
        subscribe_deny: Vec::new(),
    }
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

fn list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|item| quoted(item)).collect();
    format!("[{}]", items.join(", "))
}

fn user_entry(user: &str, password_bcrypt: &str, permissions: &Permissions) -> String {
    format!(
        "    {{ user: {}, password: {}, permissions: {{ publish: {{ allow: {}, deny: {} }}, subscribe: {{ allow: {}, deny: {} }} }} }}\n",
        quoted(user),
        quoted(password_bcrypt),
        list(&permissions.publish),
        list(&permissions.publish_deny),
        list(&permissions.subscribe),
        list(&permissions.subscribe_deny),
    )
}

/// A nats-server `authorization` block (for `include`): the node's own user and one user
/// per party that has NATS credentials, with the names of parties left out (a party named
/// as the node's user would make two users of one name, which nats-server refuses whole).
pub fn authorization_block(
    node_user: Option<(&str, &str)>,
    parties: &[PartyRecord],
    replicas: &[String],
    config: &NatsConfig,
) -> (String, Vec<String>) {
    let mut text = String::from(
        "# Written by the Kairos node from its parties; every change is overwritten.\nauthorization {\n  users = [\n",
    );
    let mut left_out = Vec::new();
    if let Some((user, password_bcrypt)) = node_user {
        text.push_str(&user_entry(
            user,
            password_bcrypt,
            &node_permissions(parties, config),
        ));
    }
    for party in parties {
        let Some(password) = &party.nats_password_bcrypt else {
            continue;
        };
        if node_user.is_some_and(|(user, _)| user == party.name) {
            left_out.push(party.name.clone());
            continue;
        }
        text.push_str(&user_entry(
            &party.name,
            password,
            &permissions(party, parties, replicas, config),
        ));
    }
    text.push_str("  ]\n}\n");
    (text, left_out)
}

/// A request on `kairos.api.<verb>`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEnvelope {
    #[serde(default)]
    pub replica: Option<String>,
    #[serde(default)]
    pub proposal: Option<String>,
    /// Query parameters of a read (e.g. `status`, `timeline`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// The request body, as the HTTP API takes it.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
}

/// An error answered before the request reaches the API.
#[derive(Debug, Serialize)]
struct ErrorReply {
    error: ErrorReplyDetail,
}

#[derive(Debug, Serialize)]
struct ErrorReplyDetail {
    code: &'static str,
    message: String,
}

fn error_reply(status: u16, code: &'static str, message: String) -> (u16, Vec<u8>) {
    let body = ErrorReply {
        error: ErrorReplyDetail { code, message },
    };
    (status, serde_json::to_vec(&body).unwrap_or_default())
}

fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The HTTP request a NATS request stands for, or the error to answer.
pub fn http_request(
    verb_name: &str,
    payload: &[u8],
    headers: &[(String, String)],
    body_bytes_max: usize,
) -> Result<Request<Body>, (u16, Vec<u8>)> {
    let Some(verb) = VERBS.iter().find(|verb| verb.name == verb_name) else {
        let known: Vec<&str> = VERBS.iter().map(|verb| verb.name).collect();
        return Err(error_reply(
            404,
            "unknown_verb",
            format!("no verb {verb_name:?} (known: {})", known.join(", ")),
        ));
    };
    if payload.len() > body_bytes_max {
        return Err(error_reply(
            413,
            "too_large",
            format!(
                "the request is {} bytes; at most {body_bytes_max} are taken",
                payload.len()
            ),
        ));
    }
    let envelope: RequestEnvelope = if payload.iter().all(u8::is_ascii_whitespace) {
        RequestEnvelope::default()
    } else {
        serde_json::from_slice(payload).map_err(|error| {
            error_reply(
                400,
                "bad_request",
                format!(
                    "the request is not a JSON object of replica, proposal, query and body: {error}"
                ),
            )
        })?
    };
    let mut path = verb.path.to_string();
    for (slot, value, valid) in [
        (
            "{replica}",
            &envelope.replica,
            kairos_core::replica::is_valid_replica_name as fn(&str) -> bool,
        ),
        ("{proposal}", &envelope.proposal, |id: &str| {
            kairos_core::hash::parse_hex_prefix(id).is_ok()
        }),
    ] {
        if !path.contains(slot) {
            continue;
        }
        let field = slot.trim_matches(['{', '}']);
        let Some(value) = value else {
            return Err(error_reply(
                400,
                "bad_request",
                format!("verb {verb_name:?} needs {field:?}"),
            ));
        };
        if !valid(value) {
            return Err(error_reply(
                400,
                "bad_request",
                format!("{field} {value:?} is not a valid {field} name or id"),
            ));
        }
        path = path.replace(slot, value);
    }
    if !envelope.query.is_empty() {
        let pairs: Vec<String> = envelope
            .query
            .iter()
            .map(|(key, value)| format!("{}={}", percent_encode(key), percent_encode(value)))
            .collect();
        path = format!("{path}?{}", pairs.join("&"));
    }
    let method = Method::from_bytes(verb.method.as_bytes()).unwrap_or(Method::GET);
    let body = match (&envelope.body, method == Method::GET) {
        (Some(_), true) => {
            return Err(error_reply(
                400,
                "bad_request",
                format!("verb {verb_name:?} takes no body (use query)"),
            ));
        }
        (Some(body), false) => serde_json::to_vec(body).unwrap_or_default(),
        (None, false) => b"{}".to_vec(),
        (None, true) => Vec::new(),
    };
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("authorization")
            || name.eq_ignore_ascii_case("traceparent")
            || name.eq_ignore_ascii_case("tracestate")
        {
            request = request.header(name.as_str(), value.as_str());
        }
    }
    let mut request = request.body(Body::from(body)).map_err(|error| {
        error_reply(
            400,
            "bad_request",
            format!("the request cannot be made: {error}"),
        )
    })?;
    request.extensions_mut().insert(crate::auth::ViaNats);
    Ok(request)
}

/// Whether an answer may go to `reply`: the asking party's own inbox, or, for a request
/// with no valid token (answered 401), any inbox.
pub fn reply_allowed(reply: &str, party: Option<&str>) -> bool {
    if reply.contains(['*', '>', ' ']) {
        return false;
    }
    match party {
        Some(party) => reply.starts_with(&format!("{}.", inbox_prefix(party))),
        None => reply.starts_with("_INBOX.") || reply.starts_with("_INBOX_"),
    }
}

/// Answers one request through the API's router.
async fn answer(
    router: Router,
    verb: &str,
    message: &async_nats::Message,
    body_bytes_max: usize,
) -> (u16, Vec<u8>) {
    let headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|headers| {
            headers.iter().flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |value| (name.to_string(), value.as_str().to_string()))
            })
        })
        .collect();
    let request = match http_request(verb, &message.payload, &headers, body_bytes_max) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let response = match tower::ServiceExt::oneshot(router, request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    };
    let status = response.status().as_u16();
    match axum::body::to_bytes(response.into_body(), 64 << 20).await {
        Ok(bytes) => (status, bytes.to_vec()),
        Err(error) => error_reply(500, "internal", format!("reading the answer: {error}")),
    }
}

/// Serves `kairos.api.<verb>` until the connection is dropped.
async fn serve_requests(
    shared: Arc<Shared>,
    client: async_nats::Client,
    config: NatsConfig,
    subscribed: Arc<AtomicBool>,
) {
    let subject = format!("{}.api.*", config.subject_prefix);
    let router = crate::api::router(shared.clone());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let body_bytes_max = shared.config.node.request_body_bytes_max;
    loop {
        let subscription = match client
            .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
            .await
        {
            // Answering once the server has the subscription.
            Ok(requests) => client
                .flush()
                .await
                .map(|()| requests)
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let mut requests = match subscription {
            Ok(requests) => {
                subscribed.store(true, Ordering::SeqCst);
                shared.with_nats_status(|status| status.answering = true);
                requests
            }
            Err(error) => {
                tracing::warn!(%error, "nats: cannot subscribe to requests; retrying");
                shared.with_nats_status(|status| {
                    status.answering = false;
                    status.last_error = Some(format!("subscribing to {subject}: {error}"));
                });
                tokio::time::sleep(RETRY_DELAY_MAX).await;
                continue;
            }
        };
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let verb = message
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string();
            let client = client.clone();
            let router = router.clone();
            let permit = in_flight.clone().try_acquire_owned();
            let shared = shared.clone();
            tokio::spawn(async move {
                // Answers go only into the asking party's inbox: the node's user may
                // publish where parties may not, so a reply subject is never trusted.
                let token = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Authorization"))
                    .and_then(|value| value.as_str().strip_prefix("Bearer "))
                    .map(|token| token.trim().to_string());
                let party = match token {
                    Some(token) => tokio::task::spawn_blocking(move || {
                        shared.service().authenticate(&token).ok().flatten()
                    })
                    .await
                    .ok()
                    .flatten(),
                    None => None,
                };
                if !reply_allowed(&reply, party.as_ref().map(|party| party.name.as_str())) {
                    tracing::warn!(reply = %reply, verb, "nats: a request's reply subject is not the asker's inbox; not answered");
                    return;
                }
                let (status, body) = match permit {
                    Ok(_permit) => answer(router, &verb, &message, body_bytes_max).await,
                    Err(_) => error_reply(
                        503,
                        "busy",
                        "too many requests are being answered; retry later".into(),
                    ),
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(STATUS_HEADER, status.to_string().as_str());
                if let Err(error) = client
                    .publish_with_headers(reply, headers, body.into())
                    .await
                {
                    tracing::warn!(%error, verb, "nats: cannot send an answer");
                }
            });
        }
    }
}

/// The publisher's cursor as kept in the data directory: for this server and streams only.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedCursor {
    url: String,
    stream_prefix: String,
    cursor: FeedCursor,
}

fn load_cursor(path: &Path, config: &NatsConfig) -> FeedCursor {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<SavedCursor>(&bytes).ok())
        .filter(|saved| saved.url == config.url && saved.stream_prefix == config.stream_prefix)
        .map(|saved| saved.cursor)
        .unwrap_or_default()
}

fn save_cursor(path: &Path, config: &NatsConfig, cursor: &FeedCursor) -> std::io::Result<()> {
    let saved = SavedCursor {
        url: config.url.clone(),
        stream_prefix: config.stream_prefix.clone(),
        cursor: cursor.clone(),
    };
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec(&saved).unwrap_or_default())?;
    std::fs::rename(&temporary, path)
}

/// What a replica's stream held when the publisher first looked at it.
enum StreamFound {
    /// Made now, or empty: nothing of this replica was published there.
    Empty,
    /// The time of its newest event.
    Newest(Instant),
}

/// Makes sure the replica's stream exists and says what it holds.
async fn ensure_stream(
    jetstream: &async_nats::jetstream::Context,
    config: &NatsConfig,
    replica: &str,
) -> Result<StreamFound, String> {
    let name = stream_name(&config.stream_prefix, replica);
    let wanted = async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!(
            "{}.{}.>",
            config.subject_prefix,
            subject_token(replica)
        )],
        max_age: config.max_age,
        duplicate_window: config.duplicate_window,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let mut stream = jetstream
        .get_or_create_stream(wanted)
        .await
        .map_err(|error| format!("stream {name}: {error}"))?;
    let info = stream
        .info()
        .await
        .map_err(|error| format!("stream {name}: {error}"))?;
    if info.state.messages == 0 {
        return Ok(StreamFound::Empty);
    }
    let last = info.state.last_sequence;
    let message = stream
        .get_raw_message(last)
        .await
        .map_err(|error| format!("stream {name}, message {last}: {error}"))?;
    // A message that is not an event (nobody but the node may publish here, but a server
    // without authorization lets anyone) says nothing: the stream's age limit is used.
    Ok(serde_json::from_slice::<FeedEvent>(&message.payload)
        .map(|event| StreamFound::Newest(event.time))
        .unwrap_or(StreamFound::Empty))
}

/// Publishes the feed on JetStream, from the saved cursor, for as long as the node runs:
/// replica by replica, each moving its cursor only once JetStream acknowledged all of its
/// events read, so one replica's trouble neither holds up nor resends another's.
async fn publish_events(shared: Arc<Shared>, client: async_nats::Client, config: NatsConfig) {
    let jetstream = async_nats::jetstream::new(client.clone());
    let cursor_path = shared.config.node.data_dir.join(CURSOR_FILE);
    let mut cursor = load_cursor(&cursor_path, &config);
    // A cursor ahead of the catalog (edited, or another store's) is not trusted: those
    // replicas start again from what their streams hold.
    let worker = shared.clone();
    if let Ok(Ok(end)) = tokio::task::spawn_blocking(move || worker.store.feed_end()).await {
        cursor.replicas.retain(|name, at| {
            let trusted = end.replicas.get(name).is_some_and(|end| {
                at.audit_next <= end.audit_next
                    && at.frames.iter().all(|(timeline, key)| {
                        end.frames.get(timeline).is_some_and(|last| key <= last)
                    })
            });
            if !trusted {
                tracing::warn!(replica = %name, "nats: the saved cursor is ahead of the catalog; starting from the stream");
            }
            trusted
        });
    }
    let mut changes = shared.changes.subscribe();
    let mut ensured: HashSet<String> = HashSet::new();
    let mut delay = Duration::from_millis(50);
    loop {
        // Each replica's stream is looked at once: a replica the cursor does not know
        // starts after the newest event its stream holds (or within the stream's age).
        let worker = shared.clone();
        let Ok(Ok(replicas)) = tokio::task::spawn_blocking(move || worker.store.replicas()).await
        else {
            tokio::time::sleep(RETRY_DELAY_MAX).await;
            continue;
        };
        let mut failure = None;
        for replica in replicas {
            if ensured.contains(&replica.name) {
                continue;
            }
            match ensure_stream(&jetstream, &config, &replica.name).await {
                Ok(found) => {
                    let known = cursor.replicas.contains_key(&replica.name);
                    if matches!(found, StreamFound::Empty) && known {
                        // The stream lost what the cursor says it holds (its server's data
                        // went, or it was purged): everything within its age goes again.
                        tracing::warn!(replica = %replica.name, "nats: the stream is empty; publishing again");
                        cursor.replicas.remove(&replica.name);
                    }
                    if let (StreamFound::Newest(time), false) = (found, known) {
                        let worker = shared.clone();
                        let name = replica.name.clone();
                        // Events at the newest event's instant are sent again (JetStream
                        // drops those it has): better twice than never.
                        let at = Instant(time.0.saturating_sub(1));
                        if let Ok(Ok(position)) = tokio::task::spawn_blocking(move || {
                            worker.store.feed_cursor_at(&name, at)
                        })
                        .await
                        {
                            cursor.replicas.insert(replica.name.clone(), position);
                        }
                    }
                    ensured.insert(replica.name);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let since = Some(Instant::now().saturating_sub(config.max_age));
        let changed_at = *shared.last_change.lock().unwrap_or_else(|p| p.into_inner());
        let batch = match failure {
            Some(error) => Err(error),
            None => {
                let worker = shared.clone();
                let from = cursor.clone();
                match tokio::task::spawn_blocking(move || worker.store.feed(&from, since)).await {
                    Ok(Ok(batch)) => Ok(batch),
                    Ok(Err(error)) => Err(format!("reading the event feed: {error}")),
                    Err(error) => Err(format!("reading the event feed: {error}")),
                }
            }
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "nats: events not published yet; retrying");
                shared.with_nats_status(|status| status.last_error = Some(error));
                ensured.clear();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
                continue;
            }
        };
        let payload_max = client.server_info().max_payload;
        let mut next = cursor.clone();
        let mut published = 0u64;
        let mut pending = 0u64;
        let mut failed = None;
        for (replica, position) in &batch.cursor.replicas {
            let events: Vec<&FeedEvent> = batch
                .events
                .iter()
                .filter(|event| event.replica == *replica)
                .collect();
            match publish_batch(&jetstream, &config, &events, payload_max).await {
                Ok(()) => {
                    published += events.len() as u64;
                    next.replicas.insert(replica.clone(), position.clone());
                }
                Err(error) => {
                    pending += events.len() as u64;
                    failed = Some(format!("replica {replica:?}: {error}"));
                    // The stream may have gone with the server's data: look again.
                    ensured.remove(replica);
                }
            }
        }
        if published > 0
            && failed.is_none()
            && let Some(changed_at) = changed_at
        {
            let mut latencies = shared
                .publish_latencies_ms
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if latencies.len() == 1024 {
                latencies.pop_front();
            }
            latencies.push_back(changed_at.elapsed().as_secs_f64() * 1e3);
        }
        shared.with_nats_status(|status| {
            status.events_published += published;
            status.events_pending = pending;
            status.last_error.clone_from(&failed);
        });
        if next != cursor {
            cursor = next;
            let path = cursor_path.clone();
            let saved = cursor.clone();
            let config = config.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(error) = save_cursor(&path, &config, &saved) {
                    tracing::warn!(path = %path.display(), %error, "nats: cannot save the cursor");
                }
            })
            .await;
        }
        if let Some(error) = failed {
            tracing::warn!(%error, "nats: events not published yet; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_DELAY_MAX);
            continue;
        }
        delay = Duration::from_millis(50);
        if !batch.more {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Room left in a message for its headers.
const HEADER_BYTES_MAX: usize = 1024;

/// The event as sent: whole, or, when it would not fit the server's largest message, with
/// its details replaced by a note of their size (the whole entry stays in the catalog:
/// `kairos log`, `GET /api/replicas/{r}/log`).
fn payload_of(event: &FeedEvent, payload_max: usize) -> Result<Vec<u8>, String> {
    let payload = serde_json::to_vec(event).map_err(|error| error.to_string())?;
    if payload.len() + HEADER_BYTES_MAX <= payload_max {
        return Ok(payload);
    }
    let mut shortened = event.clone();
    shortened.details = serde_json::json!({
        "truncated": true,
        "bytes": payload.len(),
        "note": "larger than the NATS server's max_payload; the whole entry is in the replica's log",
    });
    serde_json::to_vec(&shortened).map_err(|error| error.to_string())
}

/// Sends every event and waits for JetStream to acknowledge each (a duplicate id is
/// acknowledged as such and stored once).
async fn publish_batch(
    jetstream: &async_nats::jetstream::Context,
    config: &NatsConfig,
    events: &[&FeedEvent],
    payload_max: usize,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(events.len());
    for event in events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
        headers.insert("Kairos-Event", event.event.as_str());
        let payload = payload_of(event, payload_max)?;
        let ack = jetstream
            .publish_with_headers(
                event_subject(&config.subject_prefix, event),
                headers,
                payload.into(),
            )
            .await
            .map_err(|error| format!("publishing {}: {error}", event.id))?;
        acks.push(ack);
    }
    for ack in acks {
        tokio::time::timeout(ACK_TIMEOUT, ack.into_future())
            .await
            .map_err(|_| "no acknowledgement in time".to_string())?
            .map_err(|error| format!("acknowledgement: {error}"))?;
    }
    Ok(())
}

/// Writes the authorization file whenever parties or replicas change, and has nats-server
/// reload it.
async fn write_authorization(shared: Arc<Shared>, config: NatsConfig, path: PathBuf) {
    let node_user = match (&config.user, &config.password) {
        (Some(user), Some(password)) => {
            let password = password.clone();
            match tokio::task::spawn_blocking(move || kairos_ops::nats_password_hash(&password))
                .await
            {
                Ok(Ok(hash)) => Some((user.clone(), hash)),
                _ => {
                    tracing::error!("nats: cannot hash the node's password");
                    None
                }
            }
        }
        _ => None,
    };
    let mut changes = shared.changes.subscribe();
    let mut written = String::new();
    loop {
        let worker = shared.clone();
        let block_config = config.clone();
        let node = node_user.clone();
        let block =
            tokio::task::spawn_blocking(move || -> Result<(String, Vec<String>), String> {
                let parties = worker.store.parties().map_err(|e| e.to_string())?;
                let replicas: Vec<String> = worker
                    .store
                    .replicas()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|replica| replica.name)
                    .collect();
                Ok(authorization_block(
                    node.as_ref()
                        .map(|(user, hash)| (user.as_str(), hash.as_str())),
                    &parties,
                    &replicas,
                    &block_config,
                ))
            })
            .await
            .unwrap_or_else(|error| Err(error.to_string()));
        let problem = match block {
            Ok((text, _)) if text == written => None,
            Ok((text, left_out)) => {
                let temporary = path.with_extension("tmp");
                let result = std::fs::write(&temporary, &text)
                    .and_then(|()| std::fs::rename(&temporary, &path));
                match result {
                    Ok(()) => {
                        written = text;
                        let reload = reload_server(&config).err();
                        if reload.is_some() {
                            // Tried again at the next change or in 5 s.
                            written.clear();
                        }
                        let clash = (!left_out.is_empty()).then(|| {
                            format!(
                                "parties {} are named as the node's own NATS user: they have no NATS user (revoke and add them under another name)",
                                left_out.join(", ")
                            )
                        });
                        reload.or(clash)
                    }
                    Err(error) => Some(format!(
                        "cannot write the authorization file {}: {error} (NATS permissions are stale: a revoked party may still connect)",
                        path.display()
                    )),
                }
            }
            Err(error) => Some(format!("cannot read the parties: {error}")),
        };
        if let Some(problem) = &problem {
            tracing::error!(%problem, "nats: authorization");
        }
        shared.with_nats_status(|status| status.authorization_error = problem);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Signals the nats-server whose pid file is configured to reload its configuration,
/// once the pid is seen to be a nats-server's (a stale pid file may name any process).
fn reload_server(config: &NatsConfig) -> Result<(), String> {
    let Some(pid_file) = &config.server_pid_file else {
        return Ok(());
    };
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1)
        .ok_or_else(|| format!("{} holds no server pid", pid_file.display()))?;
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if command.trim() != "nats-server" {
        return Err(format!(
            "pid {pid} from {} is not a nats-server ({:?}): not signalled",
            pid_file.display(),
            command.trim()
        ));
    }
    // SAFETY: kill(2) with a pid just seen to be nats-server's and SIGHUP, which
    // nats-server takes as "reload the configuration"; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(format!(
            "cannot signal nats-server (pid {pid}) to reload: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Connects to NATS (in the background: the node runs and commits while NATS is down)
/// and starts the publisher, the request listener and the authorization writer.
pub async fn start(shared: Arc<Shared>, config: NatsConfig) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(path) = config.authorization_file.clone() {
        tasks.push(tokio::spawn(write_authorization(
            shared.clone(),
            config.clone(),
            path,
        )));
    }
    shared.with_nats_status(|status| status.url = config.url.clone());
    let watcher = shared.clone();
    let subscribed = Arc::new(AtomicBool::new(false));
    let listening = subscribed.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name("kairos-node")
        .event_callback(move |event| {
            let watcher = watcher.clone();
            let subscribed = listening.clone();
            async move {
                watcher.with_nats_status(|status| match event {
                    // Subscriptions are restored with the connection.
                    async_nats::Event::Connected => {
                        status.answering = subscribed.load(Ordering::SeqCst);
                        status.connected = true;
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        status.connected = false;
                        status.answering = false;
                    }
                    _ => {}
                });
            }
        })
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50 * (1u64 << attempts.min(6) as u64)).min(2000))
        });
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    match options.connect(config.url.as_str()).await {
        Ok(client) => {
            tasks.push(tokio::spawn(publish_events(
                shared.clone(),
                client.clone(),
                config.clone(),
            )));
            tasks.push(tokio::spawn(serve_requests(
                shared, client, config, subscribed,
            )));
        }
        Err(error) => tracing::error!(%error, url = %config.url, "nats: cannot connect"),
    }
    tasks
}

/// The AsyncAPI document of the events and requests (served at `/api/asyncapi.json`).
pub fn asyncapi() -> serde_json::Value {
    let event = serde_json::json!({
        "type": "object",
        "required": ["schema", "id", "replica", "timeline", "event", "time", "party", "details"],
        "properties": {
            "schema": {"const": kairos_store::feed::EVENT_SCHEMA},
            "id": {"type": "string", "description": "Unique per replica and stable: the audit entry's hash, or frame-<id>-<timeline>; also the Nats-Msg-Id header"},
            "replica": {"type": "string"},
            "timeline": {"type": "string"},
            "event": {"enum": kairos_store::feed::EVENT_NAMES},
            "time": {"type": "string", "format": "date-time"},
            "party": {"type": "string", "description": "The party that acted (kairos: the node itself)"},
            "seq": {"type": "integer", "description": "The audit entry's place in the replica's log (absent for frames)"},
            "details": {"type": "object", "description": "The audit entry's details, or the frame's record"}
        }
    });
    let verbs: serde_json::Map<String, serde_json::Value> = VERBS
        .iter()
        .map(|verb| {
            (
                format!("kairos.api.{}", verb.name),
                serde_json::json!({
                    "description": format!("{} {} (role {})", verb.method, verb.path, verb.role),
                    "subscribe": {"message": {"$ref": "#/components/messages/request"}}
                }),
            )
        })
        .collect();
    let mut channels = serde_json::Map::new();
    channels.insert(
        "kairos.{replica}.{timeline}.{event}".into(),
        serde_json::json!({
            "description": "Every catalog event, in the replica's JetStream stream KAIROS_{replica}",
            "parameters": {
                "replica": {"schema": {"type": "string"}},
                "timeline": {"schema": {"type": "string"}},
                "event": {"schema": {"enum": kairos_store::feed::EVENT_NAMES}}
            },
            "publish": {"message": {"payload": event}}
        }),
    );
    channels.extend(verbs);
    serde_json::json!({
        "asyncapi": "2.6.0",
        "info": {"title": "Kairos events and requests", "version": kairos_store::feed::EVENT_SCHEMA},
        "channels": channels,
        "components": {"messages": {"request": {
            "headers": {"type": "object", "properties": {
                "Authorization": {"type": "string", "description": "Bearer TOKEN (required)"},
                "traceparent": {"type": "string", "description": "W3C trace context"}
            }},
            "payload": {"type": "object", "additionalProperties": false, "properties": {
                "replica": {"type": "string"},
                "proposal": {"type": "string"},
                "query": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {"description": "The HTTP API's request body"}
            }},
            "description": "Answered with the HTTP API's body; its status in the Kairos-Status header"
        }}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NatsConfig {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            subject_prefix: "kairos".into(),
            stream_prefix: "KAIROS".into(),
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(60),
            authorization_file: None,
            server_pid_file: None,
        }
    }

    fn party(name: &str, role: Role, replicas: &[&str]) -> PartyRecord {
        PartyRecord {
            name: name.into(),
            role,
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            token_hash: kairos_core::Hash::default(),
            created: Instant(0),
            nats_password_bcrypt: Some("$2b$10$x".into()),
        }
    }

    #[test]
    fn names_cannot_reach_other_subjects() {
        assert_eq!(subject_token("web.prod"), "web%2Eprod");
        assert_eq!(subject_token("api"), "%api");
        assert_eq!(subject_token("web"), "web");
        assert_eq!(stream_name("KAIROS", "web.prod"), "KAIROS_web%2Eprod");
    }

    #[test]
    fn a_viewer_reads_its_replicas_and_asks_nothing_that_writes() {
        let replicas = vec!["web".to_string(), "db".to_string()];
        let watch = party("watch", Role::Viewer, &["web"]);
        let ship = party("ship", Role::Committer, &[]);
        let parties = vec![watch.clone(), ship.clone()];
        let viewer = permissions(&watch, &parties, &replicas, &config());
        assert!(viewer.publish.contains(&"kairos.api.proposals".to_string()));
        assert!(
            !viewer
                .publish
                .iter()
                .any(|s| s == "kairos.api.propose" || s == "kairos.api.commit")
        );
        assert!(viewer.subscribe.contains(&"kairos.web.>".to_string()));
        assert!(!viewer.subscribe.iter().any(|s| s.contains("db")));
        assert!(!viewer.publish.iter().any(|s| s.contains("KAIROS_db")));
        // Its own durable consumer only; another party's is denied, and no deletes.
        assert!(
            viewer
                .publish
                .contains(&"$JS.API.CONSUMER.DURABLE.CREATE.KAIROS_web.watch".to_string())
        );
        assert!(
            viewer
                .publish_deny
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.KAIROS_web.ship".to_string())
        );
        assert!(!viewer.publish.iter().any(|s| s.contains("DELETE")));
        assert!(
            !viewer
                .publish
                .iter()
                .any(|s| s.starts_with("kairos.api.gate"))
        );
        let committer = permissions(&ship, &parties, &replicas, &config());
        assert!(committer.publish.contains(&"kairos.api.commit".to_string()));
        assert!(
            committer
                .publish
                .contains(&"kairos.api.gate_commit".to_string())
        );
        assert!(committer.publish.iter().any(|s| s.contains("KAIROS_db")));
        let node = node_permissions(&parties, &config());
        assert!(
            node.publish_deny
                .contains(&"$JS.API.STREAM.PURGE.>".to_string())
        );
        assert!(node.publish.contains(&"_INBOX_watch.>".to_string()));
        let (block, left_out) =
            authorization_block(Some(("node", "$2b$10$y")), &parties, &replicas, &config());
        assert!(block.contains("user: \"watch\"") && block.contains("\"kairos.api.>\""));
        assert!(left_out.is_empty());
        // A party named as the node's user would make nats-server refuse the whole file.
        let (block, left_out) =
            authorization_block(Some(("watch", "$2b$10$y")), &parties, &replicas, &config());
        assert_eq!(left_out, ["watch"]);
        assert_eq!(block.matches("user: \"watch\"").count(), 1);
    }

    #[test]
    fn a_stale_pid_file_signals_nothing_but_nats_server() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("nats.pid");
        std::fs::write(&pid_file, sleeper.id().to_string()).unwrap();
        let mut with_pid = config();
        with_pid.server_pid_file = Some(pid_file);
        let error = reload_server(&with_pid).unwrap_err();
        assert!(error.contains("not a nats-server"), "{error}");
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "the process lives on"
        );
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }

    #[test]
    fn answers_go_only_to_the_askers_inbox() {
        assert!(reply_allowed("_INBOX_team-a.abc.1", Some("team-a")));
        assert!(!reply_allowed("_INBOX_team-b.abc.1", Some("team-a")));
        assert!(!reply_allowed("_INBOX_team-ab.x", Some("team-a")));
        assert!(!reply_allowed(
            "$JS.API.STREAM.PURGE.KAIROS_db",
            Some("team-a")
        ));
        assert!(!reply_allowed("$JS.API.STREAM.PURGE.KAIROS_db", None));
        assert!(!reply_allowed("kairos.db.main.commit", None));
        assert!(reply_allowed("_INBOX.xyz.1", None));
        assert!(!reply_allowed("_INBOX.>", None));
    }

    #[test]
    fn an_event_too_large_for_the_server_goes_with_a_note() {
        let event = FeedEvent {
            schema: kairos_store::feed::EVENT_SCHEMA.into(),
            id: "abc".into(),
            replica: "web".into(),
            timeline: "main".into(),
            event: "proposal".into(),
            time: Instant(1),
            party: "team-a".into(),
            seq: Some(3),
            details: serde_json::json!({"ops": ["x".repeat(100_000)]}),
        };
        let whole = payload_of(&event, 1 << 20).unwrap();
        assert!(whole.len() > 100_000);
        let noted: FeedEvent =
            serde_json::from_slice(&payload_of(&event, 65_536).unwrap()).unwrap();
        assert_eq!(noted.id, "abc");
        assert_eq!(noted.details["truncated"], true);
    }

    #[test]
    fn requests_become_api_requests_or_name_what_is_wrong() {
        let request = http_request(
            "propose",
            br#"{"replica": "web", "body": {"title": "t"}}"#,
            &[("Authorization".into(), "Bearer kairos_x".into())],
            1 << 20,
        )
        .unwrap();
        assert_eq!(request.uri().path(), "/api/replicas/web/proposals");
        assert_eq!(request.method(), Method::POST);
        let error = |verb: &str, payload: &[u8]| {
            let (status, body) = http_request(verb, payload, &[], 64).unwrap_err();
            (status, String::from_utf8(body).unwrap())
        };
        assert_eq!(error("drop_tables", b"{}").0, 404);
        assert!(
            error("propose", b"{\"replica\": \"../etc\"}")
                .1
                .contains("../etc")
        );
        assert!(
            error("propose", b"not json")
                .1
                .contains("not a JSON object")
        );
        assert!(
            error("sandbox", b"{\"replica\": \"web\"}")
                .1
                .contains("proposal")
        );
        assert_eq!(error("propose", &[b' '; 65]).0, 413);
        assert!(
            error("proposals", b"{\"replica\": \"web\", \"body\": {}}")
                .1
                .contains("no body")
        );
        assert!(
            error("propose", b"{\"replica\": \"web\", \"extra\": 1}")
                .1
                .contains("extra")
        );
        let request = http_request(
            "proposals",
            br#"{"replica": "web", "query": {"status": "open&x=1"}}"#,
            &[],
            1 << 20,
        )
        .unwrap();
        assert_eq!(request.uri().query(), Some("status=open%26x%3D1"));
    }
}
