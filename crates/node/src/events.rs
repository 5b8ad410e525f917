//! Live events from the node's API: `GET /api/events` streams the catalog's feed
//! ([`kairos_store::feed`]) as server-sent events, from `since` or from now on. Each
//! connection reads the store after its own cursor whenever the catalog changes, so a slow
//! client only delays itself and never misses an event.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kairos_core::Instant;
use kairos_store::{FeedCursor, FeedEvent};

use crate::Shared;
use crate::api::ApiError;
use crate::auth::Acting;

/// Event streams served at once; more are answered 503.
pub const EVENT_STREAMS_MAX: usize = 256;
/// Event streams one party may hold at once (so no party takes them all); more are
/// answered 429.
pub const EVENT_STREAMS_PER_PARTY_MAX: usize = 16;

/// One party's open stream, counted while it lives.
struct PartyStream {
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    party: String,
}

impl PartyStream {
    fn open(
        counts: &Arc<std::sync::Mutex<HashMap<String, usize>>>,
        party: &str,
    ) -> Result<PartyStream, ApiError> {
        let mut open = counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(party.to_string()).or_insert(0);
        if *count >= EVENT_STREAMS_PER_PARTY_MAX {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "party {party:?} has {EVENT_STREAMS_PER_PARTY_MAX} event streams open already; close one"
                ),
            ));
        }
        *count += 1;
        Ok(PartyStream {
            counts: counts.clone(),
            party: party.to_string(),
        })
    }
}

impl Drop for PartyStream {
    fn drop(&mut self) {
        let mut open = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.party) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.party);
            }
        }
    }
}
/// Events buffered per stream before the reader waits for the client.
const STREAM_BUFFER: usize = 64;
/// How often a stream looks at the store when nothing told it of a change.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a stream is limited to.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub replica: Option<String>,
    pub timeline: Option<String>,
    /// The replicas the party may see (empty: all).
    pub covered: Vec<String>,
}

impl EventFilter {
    pub fn admits(&self, event: &FeedEvent) -> bool {
        self.replica
            .as_ref()
            .is_none_or(|replica| *replica == event.replica)
            && self
                .timeline
                .as_ref()
                .is_none_or(|timeline| *timeline == event.timeline)
            && (self.covered.is_empty() || self.covered.contains(&event.replica))
    }
}

/// `since` as the API and `kairos watch` take it: an RFC 3339 instant, a duration ago
/// (`10m`), or `start` for everything kept.
pub fn parse_since(text: &str, now: Instant) -> Result<Option<Instant>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("start") || text.eq_ignore_ascii_case("all") {
        return Ok(Some(Instant(i64::MIN)));
    }
    if let Ok(at) = Instant::parse_rfc3339(text) {
        return Ok(Some(at));
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(Some(now.saturating_sub(ago))),
        Err(_) => Err(format!(
            "since {text:?} is neither an RFC 3339 instant, a duration ago (10m, 2h) nor `start`"
        )),
    }
}

/// Reads the feed after `cursor` (from `since` for what it does not know) until nothing is
/// left, sending what `filter` admits; returns the cursor after it, or `None` once the
/// receiver is gone.
pub async fn drain(
    shared: &Arc<Shared>,
    mut cursor: FeedCursor,
    since: Option<Instant>,
    filter: &EventFilter,
    send: &tokio::sync::mpsc::Sender<FeedEvent>,
) -> Result<Option<FeedCursor>, ApiError> {
    loop {
        let worker = shared.clone();
        let from = cursor.clone();
        let batch = tokio::task::spawn_blocking(move || worker.store.feed(&from, since))
            .await
            .map_err(|error| ApiError::internal(format!("reading events: {error}")))??;
        for event in batch.events {
            if filter.admits(&event) && send.send(event).await.is_err() {
                return Ok(None);
            }
        }
        cursor = batch.cursor;
        if !batch.more {
            return Ok(Some(cursor));
        }
    }
}

/// `GET /api/events?replica=R&timeline=T&since=SPEC`: the events as server-sent events
/// (`event:` the event's name, `id:` its id, `data:` its JSON).
pub async fn events(
    State(shared): State<Arc<Shared>>,
    Extension(acting): Extension<Acting>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    for key in query.keys() {
        if !matches!(key.as_str(), "replica" | "timeline" | "since") {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("unknown query parameter {key:?} (replica, timeline, since)"),
            ));
        }
    }
    let mut filter = EventFilter {
        replica: query.get("replica").cloned(),
        timeline: query.get("timeline").cloned(),
        covered: Vec::new(),
    };
    if let Acting::Party(party) = &acting {
        filter.covered = party.replicas.clone();
        if let Some(replica) = filter.replica.as_ref().filter(|r| !party.covers(r)) {
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
    }
    if let Some(replica) = &filter.replica {
        shared.store.replica(replica).map_err(|_| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_replica",
                format!("no replica named {replica:?}"),
            )
        })?;
    }
    let since = match query.get("since") {
        Some(text) => {
            parse_since(text, Instant::now()).map_err(|e| ApiError::bad_request("bad_since", e))?
        }
        None => None,
    };
    let party_stream = match &acting {
        Acting::Party(party) => Some(PartyStream::open(
            &shared.event_streams_by_party,
            &party.name,
        )?),
        Acting::Anyone => None,
        // `auth::check` lets a scraper reach /metrics only.
        Acting::Scraper => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the metrics token reads /metrics only",
            ));
        }
    };
    let permit = shared
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy("too many event streams are open; retry later"))?;
    // Subscribed before the first read: a change meanwhile is seen by the next one.
    let mut changes = shared.changes.subscribe();
    let cursor = match since {
        Some(_) => FeedCursor::default(),
        None => {
            let worker = shared.clone();
            tokio::task::spawn_blocking(move || worker.store.feed_end())
                .await
                .map_err(|error| ApiError::internal(format!("reading events: {error}")))??
        }
    };
    let (send, mut receive) = tokio::sync::mpsc::channel::<FeedEvent>(STREAM_BUFFER);
    let worker = shared.clone();
    let token_hash = match &acting {
        Acting::Party(party) => Some(party.token_hash),
        // A scraper was refused above.
        Acting::Anyone | Acting::Scraper => None,
    };
    tokio::spawn(async move {
        let _permit = permit;
        let _party_stream = party_stream;
        let mut cursor = cursor;
        let mut since = since;
        loop {
            // The token is checked again before every read: a revoked party's stream ends.
            if let Some(hash) = token_hash {
                let store = worker.clone();
                let still = tokio::task::spawn_blocking(move || store.store.party_by_token(&hash))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                if still.is_none() {
                    return;
                }
            }
            match drain(&worker, cursor.clone(), since, &filter, &send).await {
                Ok(Some(next)) => cursor = next,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "event stream: reading the feed failed");
                }
            }
            // Replicas registered later are read from their start.
            since = None;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = send.closed() => return,
            }
        }
    });
    let stream = futures::stream::poll_fn(move |context| receive.poll_recv(context));
    let stream = futures::StreamExt::map(stream, |event: FeedEvent| {
        Ok::<_, Infallible>(
            Event::default()
                .event(event.event.clone())
                .id(event.id.clone())
                .data(serde_json::to_string(&event).unwrap_or_default()),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_instants_ages_and_start() {
        let now = Instant(10_000_000_000);
        assert_eq!(
            parse_since("5s", now).unwrap(),
            Some(Instant(5_000_000_000))
        );
        assert_eq!(parse_since("start", now).unwrap(), Some(Instant(i64::MIN)));
        assert_eq!(
            parse_since("1970-01-01T00:00:01Z", now).unwrap(),
            Some(Instant(1_000_000_000))
        );
        assert!(
            parse_since("yesterday-ish", now)
                .unwrap_err()
                .contains("yesterday-ish")
        );
    }

    #[test]
    fn a_filter_admits_only_what_the_party_may_see() {
        let event = |replica: &str, timeline: &str| FeedEvent {
            schema: kairos_store::feed::EVENT_SCHEMA.into(),
            id: "x".into(),
            replica: replica.into(),
            timeline: timeline.into(),
            event: "frame".into(),
            time: Instant(1),
            party: "kairos".into(),
            seq: None,
            details: serde_json::Value::Null,
        };
        let filter = EventFilter {
            replica: None,
            timeline: Some("exp".into()),
            covered: vec!["web".into()],
        };
        assert!(filter.admits(&event("web", "exp")));
        assert!(!filter.admits(&event("web", "main")));
        assert!(!filter.admits(&event("db", "exp")));
    }
}
