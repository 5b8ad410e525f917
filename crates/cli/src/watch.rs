//! `kairos watch`: events as they happen, from a node's API (server-sent events) or from
//! NATS JetStream (`--nats URL`, as a party: its name and token are its NATS user and
//! password), printed one per line.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kairos_store::FeedEvent;

use crate::backend::Backend;

pub struct WatchOptions<'a> {
    pub replica: Option<&'a str>,
    pub timeline: Option<&'a str>,
    pub since: Option<&'a str>,
    pub json: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    pub nats: Option<&'a str>,
    pub party: &'a str,
    pub token: Option<&'a str>,
    /// The node's `[nats] subject_prefix` and `stream_prefix`.
    pub subject_prefix: &'a str,
    pub stream_prefix: &'a str,
}

/// One line for a person: when, where, what, who, and the event's main facts.
pub fn line(event: &FeedEvent) -> String {
    let details = &event.details;
    let short = |key: &str| {
        details[key]
            .as_str()
            .map(|id| id.chars().take(12).collect::<String>())
    };
    let mut facts = Vec::new();
    for key in [
        "frame", "proposal", "commit", "status", "verdict", "title", "kind",
    ] {
        if let Some(value) = short(key).or_else(|| details[key].as_u64().map(|n| n.to_string())) {
            facts.push(format!("{key}={value}"));
        }
    }
    format!(
        "{} {}/{} {} by {} {}",
        event.time,
        event.replica,
        event.timeline,
        event.event,
        event.party,
        facts.join(" ")
    )
    .trim_end()
    .to_string()
}

fn print(event: &FeedEvent, json: bool, out: &mut impl Write) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(event)?)?;
    } else {
        writeln!(out, "{}", line(event))?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(backend: Option<&Backend>, options: &WatchOptions) -> Result<()> {
    if let Some(since) = options.since {
        kairos_node::events::parse_since(since, kairos_core::Instant::now())
            .map_err(|error| anyhow!("--since: {error}"))?;
    }
    if let Some(url) = options.nats {
        return watch_nats(url, options);
    }
    let mut query = Vec::new();
    if let Some(replica) = options.replica {
        query.push(("replica", replica));
    }
    if let Some(timeline) = options.timeline {
        query.push(("timeline", timeline));
    }
    if let Some(since) = options.since {
        query.push(("since", since));
    }
    let backend = backend.ok_or_else(|| anyhow!("kairos watch needs a node or --nats URL"))?;
    let stream = backend.event_stream(&query)?;
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    for line in stream.lines() {
        let line = line.context("reading the node's events")?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let event: FeedEvent = serde_json::from_str(data.trim())
            .with_context(|| format!("the node sent an event that is not one: {data}"))?;
        print(&event, options.json, &mut out)?;
        seen += 1;
        if options.count.is_some_and(|count| seen >= count) {
            return Ok(());
        }
    }
    bail!("the node closed the event stream")
}

fn watch_nats(url: &str, options: &WatchOptions) -> Result<()> {
    let Some(replica) = options.replica else {
        bail!("kairos watch --nats needs a replica: each replica's events are in its own stream");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut connect = async_nats::ConnectOptions::new()
            .name("kairos-watch")
            .custom_inbox_prefix(kairos_node::nats::inbox_prefix(options.party))
            .connection_timeout(Duration::from_secs(5));
        if let Some(token) = options.token {
            connect =
                connect.user_and_password(options.party.to_string(), token.trim().to_string());
        }
        let client = connect
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let jetstream = async_nats::jetstream::new(client);
        let stream_name = kairos_node::nats::stream_name(options.stream_prefix, replica);
        let stream = jetstream
            .get_stream(&stream_name)
            .await
            .map_err(|error| anyhow!("stream {stream_name}: {error}"))?;
        let subject = match options.timeline {
            Some(timeline) => format!(
                "{}.{}.{}.>",
                options.subject_prefix,
                kairos_node::nats::subject_token(replica),
                kairos_node::nats::subject_token(timeline)
            ),
            None => format!(
                "{}.{}.>",
                options.subject_prefix,
                kairos_node::nats::subject_token(replica)
            ),
        };
        use async_nats::jetstream::consumer::DeliverPolicy;
        let deliver_policy = match options.since {
            Some(since) => {
                let at = kairos_node::events::parse_since(since, kairos_core::Instant::now())
                    .map_err(|error| anyhow!("--since: {error}"))?
                    .unwrap_or(kairos_core::Instant(0));
                if at.0 <= 0 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartTime {
                        start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                            at.0,
                        ))
                        .map_err(|error| anyhow!("--since: {error}"))?,
                    }
                }
            }
            None => DeliverPolicy::New,
        };
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|error| anyhow!("reading stream {stream_name}: {error}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|error| anyhow!("reading stream {stream_name}: {error}"))?;
        let mut out = std::io::stdout().lock();
        let mut seen = 0u64;
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            let message =
                message.map_err(|error| anyhow!("reading stream {stream_name}: {error}"))?;
            // Only the node publishes here, but a NATS server without authorization lets
            // anyone: what is not an event is said and skipped.
            let event: FeedEvent = match serde_json::from_slice(&message.payload) {
                Ok(event) => event,
                Err(error) => {
                    eprintln!(
                        "kairos: warning: a message on {} is not an event ({error}); skipped",
                        message.subject
                    );
                    continue;
                }
            };
            print(&event, options.json, &mut out)?;
            seen += 1;
            if options.count.is_some_and(|count| seen >= count) {
                return Ok(());
            }
        }
        bail!("the NATS connection closed")
    })
}
