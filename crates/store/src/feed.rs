//! The catalog as a feed of events: every audit entry and every new frame of every
//! replica, in one stable, versioned JSON shape ([`FeedEvent`]), read after a cursor. The
//! node publishes the feed on NATS and streams it to `kairos watch`; the catalog stays the
//! source of truth: a consumer that fell behind (NATS down, a node restarted) reads again
//! from its cursor and finds the same events with the same ids.

use std::collections::BTreeMap;
use std::ops::Bound;

use kairos_core::{Hash, Instant};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEntry;
use crate::catalog::parse_frame;
use crate::keys;
use crate::kv::{printable, scan_prefix};
use crate::store::{Result, Store, StoreError};

/// The schema every event names; a change that is not backwards compatible gets a new
/// number.
pub const EVENT_SCHEMA: &str = "kairos.event/1";

/// Events read per replica and source (its audit log, each timeline) in one call.
pub const FEED_BATCH_MAX: usize = 1024;

/// Every event name a feed can carry, as the last token of its NATS subject.
pub use kairos_core::event::EVENT_NAMES;

/// One event of the catalog, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEvent {
    /// [`EVENT_SCHEMA`].
    pub schema: String,
    /// Unique within the replica and stable: the audit entry's hash, or `frame-` and the
    /// frame id and its timeline. NATS deduplicates by it; a consumer may too.
    pub id: String,
    pub replica: String,
    pub timeline: String,
    /// One of [`EVENT_NAMES`].
    pub event: String,
    pub time: Instant,
    /// The party that acted (`kairos` for the system itself).
    pub party: String,
    /// The audit entry's sequence number in the replica's log (none for frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The audit entry's details, or the frame's record.
    pub details: serde_json::Value,
}

/// Where a consumer is in the feed: per replica, the next audit entry and the last time
/// index key read of each timeline. A replica or timeline the cursor does not know is read
/// from its start (or from `since`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedCursor {
    pub replicas: BTreeMap<String, ReplicaCursor>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaCursor {
    /// The sequence number of the next audit entry to read.
    pub audit_next: u64,
    /// Per timeline, the last time index entry read (hex of its time and frame id).
    pub frames: BTreeMap<String, String>,
}

/// What one read of the feed found.
#[derive(Debug, Clone, Default)]
pub struct FeedBatch {
    /// Per replica in time order (audit entries and frames merged).
    pub events: Vec<FeedEvent>,
    /// The cursor after these events.
    pub cursor: FeedCursor,
    /// Whether a source had more than [`FEED_BATCH_MAX`] new events (read again).
    pub more: bool,
}

/// The name an audit entry is published under: its event, except that timeline changes
/// say which (`fork`, `timeline_deleted`) and a review that approves is an `approval`.
pub fn event_name(entry: &serde_json::Value) -> String {
    let event = entry["event"].as_str().unwrap_or("unknown");
    let details = &entry["details"];
    match event {
        "timeline" if details.get("delete").is_some() => "timeline_deleted".into(),
        "timeline" => "fork".into(),
        "review" if details["verdict"].as_str() == Some("approve") => "approval".into(),
        other => other.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

fn bad(what: &'static str, key: &[u8], problem: impl ToString) -> StoreError {
    StoreError::BadRecord {
        what,
        key: printable(key),
        problem: problem.to_string(),
    }
}

impl Store {
    /// The end of the feed now: a cursor after every event stored.
    pub fn feed_end(&self) -> Result<FeedCursor> {
        let reader = self.reader()?;
        let view = reader.snapshot();
        let mut cursor = FeedCursor::default();
        for replica in self.replicas()? {
            let mut at = ReplicaCursor::default();
            if let Some(value) = view.get(&crate::audit::head_key(&replica.name))? {
                let (next, _) = crate::audit::next_link(&[], Some(value.as_slice()))?;
                at.audit_next = next;
            }
            let prefix = keys::head_prefix(&replica.name);
            for (key, _) in scan_prefix(view, &prefix, 1024)? {
                let timeline = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let time_prefix = keys::time_prefix(&replica.name, &timeline);
                let end = crate::kv::prefix_end(&time_prefix).unwrap_or_default();
                let last = view.scan(
                    Bound::Included(time_prefix.as_slice()),
                    Bound::Excluded(end.as_slice()),
                    1,
                    true,
                )?;
                if let Some((key, _)) = last.first() {
                    at.frames.insert(timeline, hex(&key[time_prefix.len()..]));
                }
            }
            cursor.replicas.insert(replica.name, at);
        }
        Ok(cursor)
    }

    /// A replica's cursor just after `at`: its audit entries and frames stamped at or
    /// before `at` count as read (a publisher that lost its cursor starts there from what
    /// its stream holds).
    pub fn feed_cursor_at(&self, replica: &str, at: Instant) -> Result<ReplicaCursor> {
        let reader = self.reader()?;
        let view = reader.snapshot();
        let mut position = ReplicaCursor::default();
        let prefix = keys::replica_prefix(keys::AUDIT, replica);
        let end = crate::kv::prefix_end(&prefix).unwrap_or_default();
        let mut start = prefix.clone();
        'pages: loop {
            let page = view.scan(
                Bound::Excluded(start.as_slice()),
                Bound::Excluded(end.as_slice()),
                FEED_BATCH_MAX,
                false,
            )?;
            let Some((last, _)) = page.last() else {
                break;
            };
            start.clone_from(last);
            for (key, value) in &page {
                let entry: AuditEntry =
                    serde_json::from_slice(value).map_err(|e| bad("audit entry", key, e))?;
                if entry.time > at {
                    break 'pages;
                }
                position.audit_next = entry.seq + 1;
            }
        }
        let head_prefix = keys::head_prefix(replica);
        for (key, _) in scan_prefix(view, &head_prefix, 1024)? {
            let timeline = String::from_utf8_lossy(&key[head_prefix.len()..]).into_owned();
            let time_prefix = keys::time_prefix(replica, &timeline);
            let upper = keys::time_upper(replica, &timeline, at);
            let last = view.scan(
                Bound::Included(time_prefix.as_slice()),
                Bound::Included(upper.as_slice()),
                1,
                true,
            )?;
            // Nothing at or before `at`: the whole timeline is after it (read from its start).
            let read = last
                .first()
                .map(|(key, _)| hex(&key[time_prefix.len()..]))
                .unwrap_or_default();
            position.frames.insert(timeline, read);
        }
        Ok(position)
    }

    /// The events after `cursor` (those of a replica or timeline it does not know from
    /// `since`, or from the start), at most [`FEED_BATCH_MAX`] per source. A frame appears
    /// once, on the timeline it was captured on: a fork's base is not a new frame.
    pub fn feed(&self, cursor: &FeedCursor, since: Option<Instant>) -> Result<FeedBatch> {
        let reader = self.reader()?;
        let view = reader.snapshot();
        let mut batch = FeedBatch {
            cursor: cursor.clone(),
            ..FeedBatch::default()
        };
        for replica in self.replicas()? {
            let name = replica.name;
            let known = cursor.replicas.get(&name);
            let mut at = known.cloned().unwrap_or_default();
            let mut events = Vec::new();
            // The audit log, from the next entry.
            let start = keys::audit(&name, at.audit_next);
            let end = crate::kv::prefix_end(&keys::replica_prefix(keys::AUDIT, &name))
                .unwrap_or_default();
            let entries = view.scan(
                Bound::Included(start.as_slice()),
                Bound::Excluded(end.as_slice()),
                FEED_BATCH_MAX + 1,
                false,
            )?;
            batch.more |= entries.len() > FEED_BATCH_MAX;
            for (key, value) in entries.into_iter().take(FEED_BATCH_MAX) {
                let raw: serde_json::Value =
                    serde_json::from_slice(&value).map_err(|e| bad("audit entry", &key, e))?;
                let entry =
                    AuditEntry::deserialize(&raw).map_err(|e| bad("audit entry", &key, e))?;
                at.audit_next = entry.seq + 1;
                if since.is_some_and(|since| entry.time < since) && known.is_none() {
                    continue;
                }
                events.push(FeedEvent {
                    schema: EVENT_SCHEMA.into(),
                    id: entry.hash.to_hex(),
                    replica: name.clone(),
                    timeline: entry.timeline.clone(),
                    event: event_name(&raw),
                    time: entry.time,
                    party: entry.party.clone(),
                    seq: Some(entry.seq),
                    details: raw["details"].clone(),
                });
            }
            // Each timeline's time index, after the last entry read.
            let head_prefix = keys::head_prefix(&name);
            let timelines: Vec<String> = scan_prefix(view, &head_prefix, 1024)?
                .into_iter()
                .map(|(key, _)| String::from_utf8_lossy(&key[head_prefix.len()..]).into_owned())
                .collect();
            at.frames.retain(|timeline, _| timelines.contains(timeline));
            for timeline in timelines {
                let prefix = keys::time_prefix(&name, &timeline);
                let start = match at.frames.get(&timeline).and_then(|last| unhex(last)) {
                    Some(last) => Bound::Excluded([prefix.as_slice(), &last].concat()),
                    None => match since {
                        Some(since) => Bound::Included(
                            [prefix.as_slice(), &since.to_sortable_bytes()[..]].concat(),
                        ),
                        None => Bound::Included(prefix.clone()),
                    },
                };
                let end = crate::kv::prefix_end(&prefix).unwrap_or_default();
                let start_ref = match &start {
                    Bound::Included(key) => Bound::Included(key.as_slice()),
                    Bound::Excluded(key) => Bound::Excluded(key.as_slice()),
                    Bound::Unbounded => Bound::Unbounded,
                };
                let index = view.scan(
                    start_ref,
                    Bound::Excluded(end.as_slice()),
                    FEED_BATCH_MAX + 1,
                    false,
                )?;
                batch.more |= index.len() > FEED_BATCH_MAX;
                for (key, _) in index.into_iter().take(FEED_BATCH_MAX) {
                    at.frames
                        .insert(timeline.clone(), hex(&key[prefix.len()..]));
                    let id = keys::id_of_time_key(&key)
                        .ok_or_else(|| bad("time index entry", &key, "has no frame id"))?;
                    let frame_key = keys::frame(&id);
                    // A frame forgotten meanwhile is no event.
                    let Some(value) = view.get(&frame_key)? else {
                        continue;
                    };
                    let frame = parse_frame(&frame_key, &value)?;
                    if frame.timeline != timeline {
                        continue;
                    }
                    events.push(frame_event(&frame));
                }
            }
            events.sort_by_key(|event| event.time);
            batch.events.extend(events);
            batch.cursor.replicas.insert(name, at);
        }
        Ok(batch)
    }
}

/// The event of a new frame.
pub fn frame_event(frame: &crate::FrameRecord) -> FeedEvent {
    FeedEvent {
        schema: EVENT_SCHEMA.into(),
        id: frame_event_id(&frame.timeline, &frame.id),
        replica: frame.replica.clone(),
        timeline: frame.timeline.clone(),
        event: "frame".into(),
        time: frame.time,
        party: crate::SYSTEM_PARTY.into(),
        seq: None,
        details: serde_json::json!({
            "frame": frame.id.to_hex(),
            "parent": frame.parent.map(|parent| parent.to_hex()),
            "root": frame.root.to_hex(),
            "entries": frame.entries,
            "bytes": frame.bytes,
            "objects_new": frame.objects_new,
            "bytes_new_stored": frame.bytes_new_stored,
            "torn": frame.torn,
            "unreadable": frame.unreadable,
            "capture_ms": frame.capture_ms,
        }),
    }
}

/// The id of a frame's event.
pub fn frame_event_id(timeline: &str, frame: &Hash) -> String {
    format!("frame-{}-{timeline}", frame.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SYSTEM_PARTY;
    use crate::command::{Change, Command};
    use kairos_core::ReplicaDefinition;
    use kairos_core::spec::MAIN_TIMELINE;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .put_replica(&ReplicaDefinition::new("web", "/srv".into()))
            .unwrap();
        (dir, store)
    }

    fn frame(store: &Store, timeline: &str, time: i64) -> crate::FrameRecord {
        let parent = store.head("web", timeline).unwrap().map(|head| head.id);
        let fields = crate::command::FrameFields {
            time: Instant(time),
            parent,
            root: Hash([time as u8; 32]),
            entries: 1,
            bytes: 1,
            objects_new: 0,
            bytes_new_stored: 0,
            torn: 0,
            unreadable: 0,
            capture_ms: 0,
        };
        store
            .submit(&Command::new(
                Instant(time),
                "web",
                timeline,
                SYSTEM_PARTY,
                Change::AppendFrame { frame: fields },
            ))
            .unwrap()
            .frame
            .unwrap()
    }

    #[test]
    fn reads_frames_and_audit_entries_once_each_after_the_cursor() {
        let (_dir, store) = store();
        let first = frame(&store, MAIN_TIMELINE, 10);
        let second = frame(&store, MAIN_TIMELINE, 20);
        let batch = store.feed(&FeedCursor::default(), None).unwrap();
        let names: Vec<_> = batch.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["frame", "frame"]);
        assert_eq!(batch.events[0].id, frame_event_id(MAIN_TIMELINE, &first.id));
        assert_eq!(batch.events[1].details["parent"], first.id.to_hex());
        assert_eq!(batch.cursor, store.feed_end().unwrap());
        // Nothing new: nothing read again.
        let again = store.feed(&batch.cursor, None).unwrap();
        assert!(again.events.is_empty() && !again.more);

        // A fork is one event on the fork; its base is no new frame there.
        store
            .submit(
                &Command::new(
                    Instant(30),
                    "web",
                    "exp",
                    "team-a",
                    Change::ForkTimeline { base: second.id },
                )
                .with_audit(crate::AuditEvent::Timeline(
                    crate::audit::TimelineEvent::Fork {
                        fork: "exp".into(),
                        at: second.id,
                    },
                )),
            )
            .unwrap();
        let third = frame(&store, "exp", 40);
        let next = store.feed(&batch.cursor, None).unwrap();
        let seen: Vec<_> = next
            .events
            .iter()
            .map(|e| (e.event.as_str(), e.timeline.as_str(), e.party.as_str()))
            .collect();
        assert_eq!(
            seen,
            [("fork", "exp", "team-a"), ("frame", "exp", SYSTEM_PARTY)]
        );
        assert_eq!(next.events[1].details["frame"], third.id.to_hex());
        assert_eq!(next.events[0].seq, Some(0));

        // A cursor at an instant: what came after it, and nothing before.
        let at = store.feed_cursor_at("web", Instant(25)).unwrap();
        let mut from = FeedCursor::default();
        from.replicas.insert("web".into(), at);
        let after: Vec<_> = store
            .feed(&from, None)
            .unwrap()
            .events
            .iter()
            .map(|e| e.event.clone())
            .collect();
        assert_eq!(after, ["fork", "frame"]);
        let start = store.feed_cursor_at("web", Instant(0)).unwrap();
        assert_eq!(start.audit_next, 0);
        assert_eq!(start.frames["main"], "");

        // From an instant: only what came after it.
        let late = store
            .feed(&FeedCursor::default(), Some(Instant(25)))
            .unwrap();
        let ids: Vec<_> = late.events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(ids, ["fork", "frame"]);
    }

    #[test]
    fn names_say_which_timeline_change_and_which_review() {
        let fork = serde_json::json!({"event": "timeline", "details": {"fork": "x", "at": "00"}});
        let delete = serde_json::json!({"event": "timeline", "details": {"delete": "x"}});
        let approve = serde_json::json!({"event": "review", "details": {"verdict": "approve"}});
        let reject = serde_json::json!({"event": "review", "details": {"verdict": "reject"}});
        assert_eq!(event_name(&fork), "fork");
        assert_eq!(event_name(&delete), "timeline_deleted");
        assert_eq!(event_name(&approve), "approval");
        assert_eq!(event_name(&reject), "review");
        assert!(EVENT_NAMES.contains(&"approval"));
    }
}
