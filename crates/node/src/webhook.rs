//! Outgoing webhooks (`[[webhook]]`): each one reads the catalog's feed after its own
//! cursor (`webhook-<name>.json` in the data directory, moved only once every event read
//! was delivered or given up on, so none is lost across a restart: delivery is at least
//! once, and `Kairos-Delivery` — the event's id — lets a receiver drop a repeat), POSTs
//! the events it asked for as `kairos.event/1` JSON signed with HMAC-SHA256
//! (`Kairos-Signature: sha256=<hex>`), and retries a failed delivery with exponential
//! backoff up to `attempts_max` times before giving up on that event and saying so in the
//! status. Every webhook is a task of its own: a failing endpoint delays only itself,
//! never another webhook, a capture or a commit. The decisions ([`wanted`],
//! [`after_failure`], [`signature`]) are plain functions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use kairos_config::WebhookConfig;
use kairos_store::{FeedCursor, FeedEvent};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::Shared;
use crate::wire::WebhookFailureJson;

/// The header carrying the body's HMAC-SHA256 under the webhook's secret.
pub const SIGNATURE_HEADER: &str = "Kairos-Signature";
/// The header naming the event (`commit`, `rollback`, `gate`, ...).
pub const EVENT_HEADER: &str = "Kairos-Event";
/// The header carrying the event's id: the same for every attempt and every resend.
pub const DELIVERY_HEADER: &str = "Kairos-Delivery";
/// The header counting attempts at one delivery (1 for the first).
pub const ATTEMPT_HEADER: &str = "Kairos-Attempt";
/// Events given up on that the status keeps (the newest).
pub const FAILURES_SHOWN_MAX: usize = 16;
/// The wait for a catalog change before the feed is read again anyway.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// The wait after the feed could not be read.
const FEED_RETRY_WAIT: Duration = Duration::from_secs(2);

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

/// Whether the webhook asked for this event.
pub fn wanted(config: &WebhookConfig, event: &FeedEvent) -> bool {
    config.events.contains(&event.event)
        && (config.replicas.is_empty() || config.replicas.contains(&event.replica))
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again after this long.
    Retry(Duration),
    /// `attempts_max` attempts failed: give up on the event.
    GiveUp,
}

/// After failed attempt number `attempt` (1 for the first): `backoff_initial`, doubling
/// with each attempt up to `backoff_max`, until `attempts_max` attempts were made.
pub fn after_failure(config: &WebhookConfig, attempt: u32) -> AfterFailure {
    if attempt >= config.attempts_max {
        return AfterFailure::GiveUp;
    }
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    AfterFailure::Retry(
        config
            .backoff_initial
            .saturating_mul(factor)
            .min(config.backoff_max),
    )
}

/// The URL as the status shows it: without its query (which may carry a token).
fn shown_url(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_string()
}

/// The cursor as kept in the data directory, for this URL only (a webhook pointed
/// elsewhere starts at the end of the feed).
#[derive(Debug, Serialize, Deserialize)]
struct SavedCursor {
    url: String,
    cursor: FeedCursor,
}

fn load_cursor(path: &Path, config: &WebhookConfig) -> Option<FeedCursor> {
    let bytes = std::fs::read(path).ok()?;
    let saved: SavedCursor = serde_json::from_slice(&bytes).ok()?;
    (saved.url == config.url).then_some(saved.cursor)
}

fn save_cursor(path: &Path, config: &WebhookConfig, cursor: &FeedCursor) -> std::io::Result<()> {
    let saved = SavedCursor {
        url: config.url.clone(),
        cursor: cursor.clone(),
    };
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec(&saved).unwrap_or_default())?;
    std::fs::rename(&temporary, path)
}

/// Whether a saved cursor is within the catalog (not ahead of it: edited, or another
/// store's).
fn trusted(cursor: &FeedCursor, end: &FeedCursor) -> bool {
    cursor.replicas.iter().all(|(name, at)| {
        end.replicas.get(name).is_some_and(|end| {
            at.audit_next <= end.audit_next
                && at
                    .frames
                    .iter()
                    .all(|(timeline, key)| end.frames.get(timeline).is_some_and(|last| key <= last))
        })
    })
}

/// Starts one delivery task per configured webhook.
pub fn start(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    shared
        .config
        .webhooks
        .iter()
        .filter_map(|config| {
            shared.with_webhook_status(&config.name, |status| {
                status.url = shown_url(&config.url);
                status.events.clone_from(&config.events);
            });
            if let Some(variable) = &config.secret_missing {
                // `kairos up` refuses to start so; a node run as a library says it here.
                let error = format!("not delivering: {variable} (its secret) is not set");
                tracing::error!(webhook = %config.name, %error, "webhook");
                shared.with_webhook_status(&config.name, |status| status.last_error = Some(error));
                return None;
            }
            Some(tokio::spawn(deliver_feed(shared.clone(), config.clone())))
        })
        .collect()
}

/// The cursor to start from: the saved one, else the end of the feed now (a new webhook
/// is told of what happens from now on).
async fn starting_cursor(shared: &Arc<Shared>, config: &WebhookConfig, path: &Path) -> FeedCursor {
    loop {
        let worker = shared.clone();
        match tokio::task::spawn_blocking(move || worker.store.feed_end()).await {
            Ok(Ok(end)) => {
                return match load_cursor(path, config) {
                    Some(saved) if trusted(&saved, &end) => saved,
                    Some(_) => {
                        tracing::warn!(webhook = %config.name, "webhook: the saved cursor is ahead of the catalog; starting from now");
                        end
                    }
                    None => end,
                };
            }
            Ok(Err(error)) => {
                let error = format!("reading the event feed: {error}");
                shared.with_webhook_status(&config.name, |status| status.last_error = Some(error));
            }
            Err(_) => {}
        }
        tokio::time::sleep(FEED_RETRY_WAIT).await;
    }
}

async fn deliver_feed(shared: Arc<Shared>, config: WebhookConfig) {
    let path = shared
        .config
        .node
        .data_dir
        .join(format!("webhook-{}.json", config.name));
    let mut changes = shared.changes.subscribe();
    let mut cursor = starting_cursor(&shared, &config, &path).await;
    if let Err(error) = save_cursor(&path, &config, &cursor) {
        tracing::warn!(webhook = %config.name, path = %path.display(), %error, "webhook: cannot save the cursor");
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(config.timeout))
        .user_agent(concat!("kairos/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    loop {
        let worker = shared.clone();
        let from = cursor.clone();
        let batch = match tokio::task::spawn_blocking(move || worker.store.feed(&from, None)).await
        {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                let error = format!("reading the event feed: {error}");
                shared.with_webhook_status(&config.name, |status| {
                    status.last_error = Some(error);
                });
                tokio::time::sleep(FEED_RETRY_WAIT).await;
                continue;
            }
            Err(_) => return,
        };
        for event in batch.events.iter().filter(|event| wanted(&config, event)) {
            deliver_event(&shared, &config, &agent, event).await;
        }
        if batch.cursor != cursor {
            cursor = batch.cursor;
            let (path, saved, config) = (path.clone(), cursor.clone(), config.clone());
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(error) = save_cursor(&path, &config, &saved) {
                    tracing::warn!(webhook = %config.name, path = %path.display(), %error, "webhook: cannot save the cursor");
                }
            })
            .await;
        }
        if !batch.more {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(IDLE_WAIT) => {}
            }
        }
    }
}

/// One POST: Ok for a 2xx answer.
fn post(
    agent: &ureq::Agent,
    config: &WebhookConfig,
    event: &FeedEvent,
    body: &[u8],
    attempt: u32,
) -> Result<(), String> {
    let response = agent
        .post(&config.url)
        .header("Content-Type", "application/json")
        .header(EVENT_HEADER, &event.event)
        .header(DELIVERY_HEADER, &event.id)
        .header(ATTEMPT_HEADER, attempt.to_string())
        .header(SIGNATURE_HEADER, signature(&config.secret, body))
        .send(body)
        .map_err(|error| error.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Delivers one event, retrying with backoff; gives up after `attempts_max` attempts.
async fn deliver_event(
    shared: &Arc<Shared>,
    config: &WebhookConfig,
    agent: &ureq::Agent,
    event: &FeedEvent,
) {
    let body: Arc<[u8]> = match serde_json::to_vec(event) {
        Ok(body) => body.into(),
        Err(error) => {
            tracing::error!(webhook = %config.name, event = %event.id, %error, "webhook: event not serialisable");
            return;
        }
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (agent, job_config, job_event, job_body) =
            (agent.clone(), config.clone(), event.clone(), body.clone());
        let result = tokio::task::spawn_blocking(move || {
            post(&agent, &job_config, &job_event, &job_body, attempt)
        })
        .await
        .unwrap_or_else(|error| Err(format!("sending: {error}")));
        let error = match result {
            Ok(()) => {
                shared.with_webhook_status(&config.name, |status| {
                    status.delivered += 1;
                    status.last_error = None;
                });
                return;
            }
            Err(error) => error,
        };
        let failure = format!(
            "event {} ({}), attempt {attempt}: {error}",
            event.id, event.event
        );
        match after_failure(config, attempt) {
            AfterFailure::Retry(wait) => {
                tracing::info!(webhook = %config.name, %failure, retry_in_ms = wait.as_millis() as u64, "webhook: delivery failed; retrying");
                shared.with_webhook_status(&config.name, |status| {
                    status.retries += 1;
                    status.last_error = Some(failure);
                });
                tokio::time::sleep(wait).await;
            }
            AfterFailure::GiveUp => {
                tracing::warn!(webhook = %config.name, %failure, "webhook: gave up on the event");
                shared.with_webhook_status(&config.name, |status| {
                    status.gave_up += 1;
                    status.last_error = Some(failure);
                    status.failures.push(WebhookFailureJson {
                        id: event.id.clone(),
                        event: event.event.clone(),
                        replica: event.replica.clone(),
                        attempts: attempt,
                        error,
                        time: kairos_core::Instant::now(),
                    });
                    let over = status.failures.len().saturating_sub(FAILURES_SHOWN_MAX);
                    status.failures.drain(..over);
                });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        WebhookConfig {
            name: "ci".into(),
            url: "http://127.0.0.1:9/hook?token=x".into(),
            events: vec!["commit".into(), "gate".into()],
            secret: "0123456789abcdef".into(),
            secret_missing: None,
            replicas: vec!["web".into()],
            attempts_max: 4,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
        }
    }

    fn event(replica: &str, name: &str) -> FeedEvent {
        FeedEvent {
            schema: kairos_store::feed::EVENT_SCHEMA.into(),
            id: "e1".into(),
            replica: replica.into(),
            timeline: "main".into(),
            event: name.into(),
            time: kairos_core::Instant(1),
            party: "ci".into(),
            seq: Some(1),
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_asked_events_of_asked_replicas_are_delivered() {
        let config = config();
        assert!(wanted(&config, &event("web", "gate")));
        assert!(!wanted(&config, &event("web", "frame")));
        assert!(!wanted(&config, &event("db", "commit")));
        let everywhere = WebhookConfig {
            replicas: Vec::new(),
            ..config
        };
        assert!(wanted(&everywhere, &event("db", "commit")));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_maximum_then_give_up() {
        let config = config();
        let waits: Vec<AfterFailure> = (1..=4).map(|n| after_failure(&config, n)).collect();
        assert_eq!(
            waits,
            [
                AfterFailure::Retry(Duration::from_millis(100)),
                AfterFailure::Retry(Duration::from_millis(200)),
                AfterFailure::Retry(Duration::from_millis(250)),
                AfterFailure::GiveUp,
            ]
        );
        assert_eq!(shown_url(&config.url), "http://127.0.0.1:9/hook");
    }
}
