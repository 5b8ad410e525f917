//! Kairos telemetry: every request, capture and replay is a `tracing` span; key figures
//! are OpenTelemetry metrics. With an OTLP endpoint configured, spans and metrics are
//! exported over OTLP/HTTP (protobuf); logs go to standard error either way.

use std::io::IsTerminal;
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
    #[error("installing the tracing subscriber: {0}")]
    Install(String),
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

/// Installs the global subscriber (and the OTLP exporters when an endpoint is set).
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
    let Some(endpoint) = &config.otlp_endpoint else {
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .try_init()
            .map_err(|error| TelemetryError::Install(error.to_string()))?;
        return Ok(Telemetry {
            tracer_provider: None,
            meter_provider: None,
        });
    };
    let endpoint = endpoint.trim_end_matches('/');
    let exporter_error = |reason: String| TelemetryError::Exporter {
        endpoint: endpoint.to_string(),
        reason,
    };
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_headers(Default::default())
        .build()
        .map_err(|error| exporter_error(error.to_string()))?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .build()
        .map_err(|error| exporter_error(error.to_string()))?;
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(metrics)
                .with_interval(METRICS_INTERVAL)
                .build(),
        )
        .with_resource(resource)
        .build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());
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

/// The node's instruments. Without an exporter they record into a no-op meter.
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
        }
    }

    /// Reports the store's size through `size` whenever metrics are collected.
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
        [KeyValue::new("replica", name.to_string())]
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
