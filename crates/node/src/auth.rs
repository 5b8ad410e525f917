//! Who is asking, and may they: the Host header is one the node answers to (no DNS
//! rebinding from a browser); once any party exists — and always when the node listens
//! beyond loopback — every request carries a party's bearer token; the route says which
//! role it needs ([`required_role`], a pure function) and a party limited to some
//! replicas acts only on those. The acting party rides in the request's extensions.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kairos_core::{PartyRecord, Role};

use crate::Shared;
use crate::api::ApiError;

/// Marks a request that came over NATS (`kairos.api.<verb>`): it always needs a party's
/// token, whoever can reach the NATS server.
#[derive(Debug, Clone, Copy)]
pub struct ViaNats;

/// Who a request acts as.
#[derive(Debug, Clone)]
pub enum Acting {
    /// No party is required (no parties exist, loopback only): the request may name any
    /// party, as a local user may.
    Anyone,
    /// The party whose token the request carried.
    Party(PartyRecord),
    /// A scraper with `node.metrics_token`: [`check`] lets it through to `GET /metrics`
    /// only, and it acts as nobody.
    Scraper,
}

impl Acting {
    /// The party to record: the authenticated one, or the one the request names.
    pub fn party(&self, named: Option<String>, default: &str) -> Result<String, ApiError> {
        match self {
            Acting::Scraper => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the metrics token reads /metrics only",
            )),
            Acting::Anyone => Ok(kairos_ops::party(named.as_deref().unwrap_or(default))?),
            Acting::Party(party) => match named {
                Some(named) if named != party.name => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "party_mismatch",
                    format!(
                        "the token is party {:?}'s; it cannot act as party {named:?}",
                        party.name
                    ),
                )),
                _ => Ok(party.name.clone()),
            },
        }
    }

    pub fn is_party(&self) -> bool {
        matches!(self, Acting::Party(_))
    }

    /// Whether the request may act with `role` (anyone may, when no party is required).
    pub fn has(&self, role: Role) -> bool {
        match self {
            Acting::Anyone => true,
            Acting::Party(party) => party.role >= role,
            Acting::Scraper => false,
        }
    }
}

/// The role a route needs; `None` for routes open to all (health, the API document).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (_, ["", "api", "health" | "openapi.json" | "asyncapi.json"]) => None,
        // The page itself holds no data: it asks for a token and sends it with every read.
        (_, [""] | ["", "ui", "app.js" | "style.css"]) => None,
        (&Method::GET, ["", "api", "whoami"]) => Some(Role::Viewer),
        (&Method::GET, ["", "api", "status"]) => Some(Role::Viewer),
        // The figures name replicas and the store's size: a viewer's, like the status
        // (or `node.metrics_token`'s, which opens this route and no other: see `check`).
        (&Method::GET, ["", "metrics"]) => Some(Role::Viewer),
        (&Method::GET, ["", "api", "verify"]) => Some(Role::Admin),
        // Removes only what nothing kept needs, store-wide.
        (&Method::POST, ["", "api", "gc"]) => Some(Role::Committer),
        (&Method::GET, ["", "api", "stats"]) => Some(Role::Viewer),
        (&Method::GET, ["", "api", "cluster"]) => Some(Role::Viewer),
        // A party sees the events of its replicas only (the handler filters).
        (&Method::GET, ["", "api", "events"]) => Some(Role::Viewer),
        (_, ["", "api", "parties", ..]) => Some(Role::Admin),
        (&Method::GET, ["", "api", "replicas"]) => Some(Role::Viewer),
        (&Method::POST, ["", "api", "replicas"]) => Some(Role::Admin),
        (&Method::POST, ["", "api", "replicas", _, "restore" | "forget"]) => Some(Role::Admin),
        (&Method::POST, ["", "api", "replicas", _, "revert"]) => Some(Role::Committer),
        (
            &Method::POST,
            ["", "api", "replicas", _, "proposals", _, "commit"]
            | ["", "api", "replicas", _, "proposals", _, "gate", "commit"]
            | ["", "api", "replicas", _, "model", "train"],
        ) => Some(Role::Committer),
        // Approvals and rejections count towards a timeline's review policy.
        (&Method::POST, ["", "api", "replicas", _, "proposals", _, "review"]) => {
            Some(Role::Reviewer)
        }
        // Ranks values without storing anything.
        (&Method::POST, ["", "api", "replicas", _, "suggest"]) => Some(Role::Viewer),
        (
            &Method::POST,
            [
                "",
                "api",
                "replicas",
                _,
                "capture" | "proposals" | "timelines",
            ]
            | [
                "",
                "api",
                "replicas",
                _,
                "proposals",
                _,
                "sandbox" | "predict" | "gate",
            ]
            | ["", "api", "replicas", _, "proposals", "validate"],
        )
        | (&Method::DELETE, ["", "api", "replicas", _, "timelines", _]) => Some(Role::Proposer),
        (&Method::GET, ["", "api", "replicas", ..]) => Some(Role::Viewer),
        // Anything else (unknown routes, other methods) needs the most.
        _ => Some(Role::Admin),
    }
}

/// The replica a route is about, if any.
fn replica_of(path: &str) -> Option<&str> {
    path.strip_prefix("/api/replicas/")
        .and_then(|rest| rest.split('/').next())
        .filter(|name| !name.is_empty())
}

/// Whether `host` (a Host header's value) names this node.
pub fn host_allowed(host: &str, listen: SocketAddr, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:7700
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1")
        || name == listen.ip().to_string()
        || allowed
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&name))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether a request is `GET /metrics` with the configured metrics token. The tokens are
/// compared by their hashes, as parties' tokens are looked up, never byte by byte.
fn is_metrics_scrape(
    method: &Method,
    path: &str,
    token: &str,
    metrics_token: Option<&str>,
) -> bool {
    let Some(metrics_token) = metrics_token else {
        return false;
    };
    method == Method::GET
        && path.trim_end_matches('/') == "/metrics"
        && kairos_core::party::token_hash(token) == kairos_core::party::token_hash(metrics_token)
}

/// The middleware: Host check, authentication, role and replica scope.
pub async fn authorize(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    match check(&shared, &request) {
        Ok(acting) => {
            request.extensions_mut().insert(acting);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

fn check(shared: &Shared, request: &Request) -> Result<Acting, ApiError> {
    let node = &shared.config.node;
    if let Some(host) = request.headers().get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !host_allowed(host, shared.listen, &node.allowed_hosts) {
            return Err(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!(
                    "this node does not answer to host {host:?} (add it to node.allowed_hosts)"
                ),
            ));
        }
    }
    // A page of another site may make a browser send requests here (no token needed on
    // loopback without parties): a request that changes anything must come from this
    // node's own page, or from no page at all.
    if !matches!(*request.method(), Method::GET | Method::HEAD)
        && let Some(origin) = request.headers().get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or("");
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host));
        if !same {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("a request from the page {origin:?} may not change anything on this node"),
            ));
        }
    }
    let path = request.uri().path();
    let Some(role) = required_role(request.method(), path) else {
        return Ok(Acting::Anyone);
    };
    let required = request.extensions().get::<ViaNats>().is_some()
        || !shared.listen.ip().is_loopback()
        || shared.store.has_parties()?;
    if !required {
        return Ok(Acting::Anyone);
    }
    let Some(token) = bearer(request.headers()) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this node needs a party's token: send `Authorization: Bearer TOKEN` (the CLI: --token or KAIROS_TOKEN)",
        ));
    };
    if is_metrics_scrape(request.method(), path, token, node.metrics_token.as_deref()) {
        return Ok(Acting::Scraper);
    }
    let Some(party) = shared.service().authenticate(token)? else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the token names no party (it was revoked, or mistyped)",
        ));
    };
    if party.role < role {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "party {:?} has role {}; {} {path} needs role {role}",
                party.name,
                party.role,
                request.method()
            ),
        ));
    }
    if let Some(replica) = replica_of(path).filter(|replica| !party.covers(replica)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "party {:?} may act on replicas {} only, not on {replica:?}",
                party.name,
                party.replicas.join(", ")
            ),
        ));
    }
    if let Some(limiter) = &shared.party_limiter
        && let Err(not_until) = limiter.check_key(&party.name)
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "party {:?} is over its {} requests per second; retry in {} ms",
                party.name,
                node.party_requests_per_second,
                wait.as_millis().max(1)
            ),
        ));
    }
    Ok(Acting::Party(party))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_role_their_effect_needs() {
        let cases = [
            (Method::GET, "/api/health", None),
            (Method::GET, "/api/openapi.json", None),
            (Method::GET, "/api/asyncapi.json", None),
            (Method::GET, "/", None),
            (Method::POST, "/", None),
            (Method::GET, "/ui/app.js", None),
            (Method::GET, "/api/whoami", Some(Role::Viewer)),
            (Method::GET, "/api/events", Some(Role::Viewer)),
            (Method::GET, "/api/replicas/web/series", Some(Role::Viewer)),
            (
                Method::GET,
                "/api/replicas/web/proposals/abcd/preview",
                Some(Role::Viewer),
            ),
            (
                Method::POST,
                "/api/replicas/web/proposals/validate",
                Some(Role::Proposer),
            ),
            (Method::GET, "/api/replicas/web/history", Some(Role::Viewer)),
            (Method::GET, "/api/replicas/web/log", Some(Role::Viewer)),
            (
                Method::POST,
                "/api/replicas/web/proposals",
                Some(Role::Proposer),
            ),
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/sandbox",
                Some(Role::Proposer),
            ),
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/commit",
                Some(Role::Committer),
            ),
            (
                Method::POST,
                "/api/replicas/web/revert",
                Some(Role::Committer),
            ),
            // A gate records its verdict (a proposer's); one that commits, a committer's.
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/gate",
                Some(Role::Proposer),
            ),
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/gate/commit",
                Some(Role::Committer),
            ),
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/review",
                Some(Role::Reviewer),
            ),
            (
                Method::GET,
                "/api/replicas/web/proposals",
                Some(Role::Viewer),
            ),
            // Predictions are stored records: proposers; training swaps the serving
            // model: committers; suggest and the model's status and report only read.
            (
                Method::POST,
                "/api/replicas/web/proposals/abcd/predict",
                Some(Role::Proposer),
            ),
            (
                Method::POST,
                "/api/replicas/web/model/train",
                Some(Role::Committer),
            ),
            (Method::GET, "/api/replicas/web/model", Some(Role::Viewer)),
            (
                Method::GET,
                "/api/replicas/web/model/report",
                Some(Role::Viewer),
            ),
            (
                Method::POST,
                "/api/replicas/web/suggest",
                Some(Role::Viewer),
            ),
            (Method::POST, "/api/replicas/web/model", Some(Role::Admin)),
            // Registering a replica defines the commands it runs: admins only.
            (Method::POST, "/api/replicas", Some(Role::Admin)),
            (Method::POST, "/api/replicas/web/restore", Some(Role::Admin)),
            (Method::POST, "/api/parties", Some(Role::Admin)),
            (Method::GET, "/api/verify", Some(Role::Admin)),
            (Method::POST, "/api/gc", Some(Role::Committer)),
            (Method::GET, "/api/stats", Some(Role::Viewer)),
            (Method::GET, "/metrics", Some(Role::Viewer)),
            (Method::POST, "/metrics", Some(Role::Admin)),
            (Method::PUT, "/api/replicas/web/history", Some(Role::Admin)),
            (Method::GET, "/api/nothing", Some(Role::Admin)),
        ];
        for (method, path, role) in cases {
            assert_eq!(required_role(&method, path), role, "{method} {path}");
        }
    }

    #[test]
    fn the_metrics_token_opens_get_metrics_only() {
        let token = "scrape-0123456789abcdef";
        assert!(is_metrics_scrape(
            &Method::GET,
            "/metrics",
            token,
            Some(token)
        ));
        assert!(!is_metrics_scrape(&Method::GET, "/metrics", token, None));
        assert!(!is_metrics_scrape(
            &Method::GET,
            "/metrics",
            "scrape-0123456789abcdeX",
            Some(token)
        ));
        assert!(!is_metrics_scrape(
            &Method::POST,
            "/metrics",
            token,
            Some(token)
        ));
        assert!(!is_metrics_scrape(
            &Method::GET,
            "/api/status",
            token,
            Some(token)
        ));
        assert!(!is_metrics_scrape(
            &Method::GET,
            "/metrics/../api/status",
            token,
            Some(token)
        ));
        assert!(!Acting::Scraper.has(Role::Viewer));
        assert!(Acting::Scraper.party(None, "cli").is_err());
    }

    #[test]
    fn only_this_nodes_names_are_answered() {
        let listen: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        assert!(host_allowed("127.0.0.1:7700", listen, &[]));
        assert!(host_allowed("localhost:7700", listen, &[]));
        assert!(host_allowed("[::1]:7700", listen, &[]));
        assert!(!host_allowed("evil.example:7700", listen, &[]));
        assert!(host_allowed(
            "kairos.internal",
            listen,
            &["kairos.internal".to_string()]
        ));
        assert_eq!(replica_of("/api/replicas/web/log"), Some("web"));
        assert_eq!(replica_of("/api/replicas"), None);
    }
}
