//! The names of the catalog's events, as a feed event's `event` field and the last token
//! of its NATS subject say them. Here, in the vocabulary, so that the configuration can
//! check a webhook's `events` without knowing the store.

/// Every event name a feed can carry.
pub const EVENT_NAMES: &[&str] = &[
    "frame",
    "fork",
    "timeline_deleted",
    "proposal",
    "sandbox",
    "prediction",
    "review",
    "approval",
    "interference",
    "commit",
    "probe",
    "rollback",
    "revert",
    "recovery",
    "outcome",
    "model",
    "forget",
    "gate",
];

/// Whether `name` is one of [`EVENT_NAMES`].
pub fn is_event_name(name: &str) -> bool {
    EVENT_NAMES.contains(&name)
}
