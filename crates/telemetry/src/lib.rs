//! Kairos telemetry: every request, capture and replay is a `tracing` span; key figures
//! are OpenTelemetry metrics. With an OTLP endpoint configured, spans and metrics are
//! exported over OTLP/HTTP (protobuf); the metrics are also read by the SDK's Prometheus
//! reader for the node's `/metrics` ([`Exposition`]), so both show the same figures; logs
//! go to standard error either way.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use kairos_config::TelemetryConfig;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How often metrics are exported.
const METRICS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log {filter:?} is not a log filter: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("the Prometheus reader of the metrics: {0}")]
    Prometheus(String),
    #[error("installing the tracing subscriber: {0}")]
    Install(String),
}

/// The Prometheus side of the one meter provider, once [`init`] has run.
static EXPOSITION: OnceLock<Exposition> = OnceLock::new();
/// The one meter provider, once [`init`] has run (for [`Metrics::flush`]).
static METER_PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// The label that names a replica on every per-replica figure.
pub const REPLICA_LABEL: &str = "replica";

/// The metrics the SDK aggregated, as the Prometheus text exposition format 0.0.4: the
/// SDK's own Prometheus reader (`opentelemetry-prometheus`) collects them at each scrape,
/// beside the OTLP exporter's periodic reader on the same meter provider, so the figures
/// are the ones OTLP sends, never a parallel count. Cumulative, as Prometheus expects.
#[derive(Clone, Debug)]
pub struct Exposition {
    registry: prometheus::Registry,
}

/// The content type of [`Exposition::render`]'s text.
pub const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// The SDK's Prometheus reader (to register on a meter provider) and the exposition
    /// that renders what it reads.
    pub fn reader()
    -> Result<(opentelemetry_prometheus::PrometheusExporter, Exposition), TelemetryError> {
        let registry = prometheus::Registry::new();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // The figures' own attributes (`replica`) are their labels; the scope is
            // always `kairos`, so it is not repeated on every sample.
            .scope_info_enabled(false)
            .build()
            .map_err(|error| TelemetryError::Prometheus(error.to_string()))?;
        Ok((reader, Exposition { registry }))
    }

    /// Every figure; with `replicas`, only the samples of those replicas and the
    /// node-wide ones (samples without a `replica` label). A family left without samples
    /// is left out.
    pub fn render(&self, replicas: Option<&[String]>) -> String {
        let mut families = self.registry.gather();
        if let Some(replicas) = replicas {
            for family in &mut families {
                let kept: Vec<prometheus::proto::Metric> = family
                    .take_metric()
                    .into_iter()
                    .filter(|sample| {
                        sample
                            .get_label()
                            .iter()
                            .find(|label| label.name() == REPLICA_LABEL)
                            .is_none_or(|label| replicas.iter().any(|name| name == label.value()))
                    })
                    .collect();
                family.set_metric(kept);
            }
            families.retain(|family| !family.get_metric().is_empty());
        }
        let mut text = String::new();
        // Encoding into a String fails only on a family without samples or a histogram
        // without its parts, which the reader never gathers; say so in the text if it did.
        if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
            text.push_str(&format!("# kairos: encoding the metrics failed: {error}\n"));
        }
        text
    }
}

/// Keeps exporters alive; flushes and stops them when dropped (or on [`Telemetry::shutdown`]).
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporters.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
        if let Some(provider) = self.meter_provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber and meter provider: metrics are always read for
/// `/metrics` ([`Exposition`]); spans and metrics are exported over OTLP when an endpoint is
/// set.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).map_err(|error| {
        TelemetryError::BadFilter {
            filter: config.log.clone(),
            reason: error.to_string(),
        }
    })?;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let (prometheus_reader, exposition) = Exposition::reader()?;
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(prometheus_reader)
        .with_resource(resource.clone());
    let Some(endpoint) = &config.otlp_endpoint else {
        let meter_provider = meter_provider.build();
        install_meter_provider(&meter_provider, exposition);
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .try_init()
            .map_err(|error| TelemetryError::Install(error.to_string()))?;
        return Ok(Telemetry {
            tracer_provider: None,
            meter_provider: Some(meter_provider),
        });
    };
    let endpoint = endpoint.trim_end_matches('/');
    let exporter_error = |reason: String| TelemetryError::Exporter {
        endpoint: endpoint.to_string(),
        reason,
    };
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_headers(Default::default())
        .build()
        .map_err(|error| exporter_error(error.to_string()))?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource)
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .build()
        .map_err(|error| exporter_error(error.to_string()))?;
    let meter_provider = meter_provider
        .with_reader(
            PeriodicReader::builder(metrics)
                .with_interval(METRICS_INTERVAL)
                .build(),
        )
        .build();
    install_meter_provider(&meter_provider, exposition);
    let tracer = tracer_provider.tracer("kairos");
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .map_err(|error| TelemetryError::Install(error.to_string()))?;
    Ok(Telemetry {
        tracer_provider: Some(tracer_provider),
        meter_provider: Some(meter_provider),
    })
}

/// Makes `meter_provider` the global one ([`Metrics::new`] takes its meter from it) and
/// `exposition` the one `/metrics` renders.
fn install_meter_provider(meter_provider: &SdkMeterProvider, exposition: Exposition) {
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    // A second `init` in one process keeps the first exposition, as the global
    // subscriber keeps the first subscriber.
    let _ = EXPOSITION.set(exposition);
    let _ = METER_PROVIDER.set(meter_provider.clone());
}

/// The node's instruments. Before [`init`] (in-process tests) they record into a no-op
/// meter and [`Metrics::exposition`] is `None`.
#[derive(Clone)]
pub struct Metrics {
    pub capture_duration_ms: Histogram<f64>,
    pub capture_bytes_read: Counter<u64>,
    pub capture_bytes_stored: Counter<u64>,
    pub frames_stored: Counter<u64>,
    pub capture_failures: Counter<u64>,
    pub replay_latency_ms: Histogram<f64>,
    pub actor_restarts: Counter<u64>,
    meter: Meter,
    exposition: Option<Exposition>,
    provider: Option<SdkMeterProvider>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let meter = opentelemetry::global::meter("kairos");
        Metrics {
            capture_duration_ms: meter
                .f64_histogram("kairos.capture.duration")
                .with_unit("ms")
                .with_description("Time to capture one frame")
                .build(),
            capture_bytes_read: meter
                .u64_counter("kairos.capture.bytes_read")
                .with_unit("By")
                .with_description("Bytes of files read by captures (changed files only)")
                .build(),
            capture_bytes_stored: meter
                .u64_counter("kairos.capture.bytes_stored")
                .with_unit("By")
                .with_description("Bytes newly stored by captures, compressed")
                .build(),
            frames_stored: meter
                .u64_counter("kairos.frames.stored")
                .with_description("Frames stored")
                .build(),
            capture_failures: meter
                .u64_counter("kairos.capture.failures")
                .with_description("Captures that failed")
                .build(),
            replay_latency_ms: meter
                .f64_histogram("kairos.replay.latency")
                .with_unit("ms")
                .with_description(
                    "Time to answer a replay request (state, file, diff, restore, verify)",
                )
                .build(),
            actor_restarts: meter
                .u64_counter("kairos.actor.restarts")
                .with_description("Actors restarted by their supervisor")
                .build(),
            meter,
            exposition: EXPOSITION.get().cloned(),
            provider: METER_PROVIDER.get().cloned(),
        }
    }

    /// Exports the figures now (OTLP, when configured): a stopping node calls it while
    /// what its observable instruments measure (the store) is still open. Blocks until the
    /// exporter answers or gives up.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::warn!(%error, "exporting the metrics failed");
        }
    }

    /// The figures these instruments recorded, for `/metrics`.
    pub fn exposition(&self) -> Option<&Exposition> {
        self.exposition.as_ref()
    }

    /// Reports the store's size through `size` whenever metrics are collected. `size` is
    /// kept by the meter provider for the life of the process: it should hold what it
    /// measures weakly.
    pub fn observe_store_size(&self, size: impl Fn() -> Option<u64> + Send + Sync + 'static) {
        let _gauge = self
            .meter
            .u64_observable_gauge("kairos.store.size")
            .with_unit("By")
            .with_description("Bytes the store occupies on disk")
            .with_callback(move |observer| {
                if let Some(bytes) = size() {
                    observer.observe(bytes, &[]);
                }
            })
            .build();
    }

    pub fn replica(name: &str) -> [KeyValue; 1] {
        [KeyValue::new(REPLICA_LABEL, name.to_string())]
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// Makes `span` a child of the W3C trace context a request carried (`traceparent`, and
/// `tracestate` if any): a proposal submitted over NATS or HTTP by a traced client, and its
/// commit later, are spans of the client's one trace. A missing or malformed context
/// leaves the span a root.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(tracestate) = tracestate {
        carrier.insert("tracestate".to_string(), tracestate.to_string());
    }
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// The W3C `traceparent` of `span`'s trace, to send with a request to another node (a
/// Raft RPC, an object fetch) so that its spans join the same trace; `None` when the span
/// is not traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut carrier = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;

    use super::*;

    #[test]
    fn the_exposition_renders_the_sdks_figures_escaped_and_scoped() {
        let (reader, exposition) = Exposition::reader().unwrap();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(Resource::builder().with_service_name("kairos").build())
            .build();
        let meter = provider.meter("kairos");
        let frames = meter
            .u64_counter("kairos.frames.stored")
            .with_description("Frames stored")
            .build();
        frames.add(3, &Metrics::replica("web"));
        frames.add(1, &Metrics::replica("odd \"name\"\\\n"));
        let latency = meter
            .f64_histogram("kairos.replay.latency")
            .with_unit("ms")
            .with_description("Time to answer a replay request")
            .build();
        latency.record(7.5, &[]);

        let text = exposition.render(None);
        assert!(
            text.contains("# HELP kairos_frames_stored_total Frames stored\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kairos_frames_stored_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("kairos_frames_stored_total{replica=\"web\"} 3\n"),
            "{text}"
        );
        // Backslash, double quote and line feed are escaped in label values.
        assert!(
            text.contains("kairos_frames_stored_total{replica=\"odd \\\"name\\\"\\\\\\n\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kairos_replay_latency_milliseconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("kairos_replay_latency_milliseconds_bucket{le=\"10\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kairos_replay_latency_milliseconds_bucket{le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kairos_replay_latency_milliseconds_sum 7.5\n"),
            "{text}"
        );
        assert!(
            text.contains("kairos_replay_latency_milliseconds_count 1\n"),
            "{text}"
        );

        // A party scoped to `web` sees web's samples and the node-wide ones only.
        let scoped = exposition.render(Some(&["web".to_string()]));
        assert!(scoped.contains("replica=\"web\""), "{scoped}");
        assert!(!scoped.contains("odd"), "{scoped}");
        assert!(
            scoped.contains("kairos_replay_latency_milliseconds_count 1\n"),
            "{scoped}"
        );
        let none = exposition.render(Some(&["other".to_string()]));
        assert!(!none.contains("kairos_frames_stored_total"), "{none}");
    }
}
