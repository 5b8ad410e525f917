//! The web UI: a single page (`ui/index.html`, `ui/app.js`, `ui/style.css`) built into the
//! binary and served at `/`, with the two API reads only it needs: who the token is
//! (`GET /api/whoami`) and a replica's runtime series (`GET /api/replicas/{r}/series`).
//!
//! Plain HTML, CSS and one JavaScript module, no build step and nothing fetched from the
//! internet: the page is small enough that a framework would be most of it, and building
//! every element with `textContent` (never `innerHTML` with data) keeps file names, config
//! values and comments from ever becoming markup.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kairos_core::Instant;
use serde::Serialize;

use crate::Shared;
use crate::api::ApiError;
use crate::auth::Acting;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

/// Buckets one series request answers at most.
pub const SERIES_SAMPLES_MAX: usize = 5000;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Only what the page itself brings; no inline script, no other origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// Who a request acts as.
#[derive(Debug, Serialize)]
pub struct WhoAmI {
    /// `None` on a node that needs no token (no parties, loopback).
    pub party: Option<String>,
    pub role: kairos_core::Role,
    /// The replicas it may act on; empty: all.
    pub replicas: Vec<String>,
}

/// `GET /api/whoami`.
pub async fn whoami(Extension(acting): Extension<Acting>) -> Result<Json<WhoAmI>, ApiError> {
    Ok(Json(match acting {
        Acting::Anyone => WhoAmI {
            party: None,
            role: kairos_core::Role::Admin,
            replicas: Vec::new(),
        },
        Acting::Party(party) => WhoAmI {
            party: Some(party.name),
            role: party.role,
            replicas: party.replicas,
        },
        // `auth::check` lets a scraper reach /metrics only.
        Acting::Scraper => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the metrics token reads /metrics only",
            ));
        }
    }))
}

/// `GET /api/replicas/{r}/series?from=SPEC&to=SPEC`: the runtime series' buckets between
/// two instants (RFC 3339 or a duration ago), oldest first, at most 5 000.
pub async fn series(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    for key in query.keys() {
        if !matches!(key.as_str(), "from" | "to") {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("unknown query parameter {key:?} (from, to)"),
            ));
        }
    }
    let now = Instant::now();
    let instant = |key: &str, default: Instant| -> Result<Instant, ApiError> {
        match query.get(key) {
            None => Ok(default),
            Some(text) => crate::events::parse_since(text, now)
                .map(|at| at.unwrap_or(default))
                .map_err(|error| ApiError::bad_request("bad_instant", format!("{key}: {error}"))),
        }
    };
    let from = instant(
        "from",
        now.saturating_sub(std::time::Duration::from_secs(3600)),
    )?;
    let to = instant("to", now)?;
    if from > to {
        return Err(ApiError::bad_request(
            "bad_range",
            format!("from {from} is after to {to}"),
        ));
    }
    let worker = shared.clone();
    let samples = shared
        .replay
        .run(move || {
            worker.store.replica(&name).map_err(|_| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_such_replica",
                    format!("no replica named {name:?}"),
                )
            })?;
            let samples = worker.store.series(&name, from, to, SERIES_SAMPLES_MAX)?;
            Ok(samples
                .iter()
                .map(|sample| kairos_replay::SampleView::new(sample.at, sample))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(samples).into_response())
}
