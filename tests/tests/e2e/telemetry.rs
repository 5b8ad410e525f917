//! Telemetry reaches a real OTLP receiver: a node exports its spans and metrics over
//! OTLP/HTTP (protobuf) to a receiver that decodes them with the OTLP protocol types.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use kairos_tests::Node;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    metrics: Vec<String>,
    requests: Vec<String>,
}

/// A minimal OTLP/HTTP receiver: answers 200 to every POST and decodes the bodies.
fn receiver() -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Received::default()));
    let shared = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((_, value)) = header
                            .split_once(':')
                            .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    {
                        let mut received = shared.lock().unwrap();
                        received.requests.push(path.clone());
                        if path == "/v1/traces" {
                            let request = ExportTraceServiceRequest::decode(body.as_slice())
                                .expect("OTLP traces decode");
                            for resource in request.resource_spans {
                                for scope in resource.scope_spans {
                                    received.spans.extend(scope.spans);
                                }
                            }
                        } else if path == "/v1/metrics" {
                            let request = ExportMetricsServiceRequest::decode(body.as_slice())
                                .expect("OTLP metrics decode");
                            for resource in request.resource_metrics {
                                for scope in resource.scope_metrics {
                                    received
                                        .metrics
                                        .extend(scope.metrics.into_iter().map(|m| m.name));
                                }
                            }
                        }
                    }
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, received)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(text) => Some(text.clone()),
            other => Some(format!("{other:?}")),
        })
}

#[test]
fn capture_spans_and_metrics_reach_an_otlp_receiver() {
    let (endpoint, received) = receiver();
    let service = tempfile::tempdir().unwrap();
    std::fs::write(service.path().join("a.txt"), b"a").unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "[telemetry]\notlp_endpoint = {endpoint:?}\nservice_name = \"kairos-test\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"1h\"\n",
        service.path().display().to_string()
    );
    let mut node = Node::start(&config, &state.path().join("data"));
    let mut response = Node::agent()
        .post(format!("{}/api/replicas/web/capture", node.url))
        .send_empty()
        .unwrap();
    let answer: serde_json::Value = response.body_mut().read_json().unwrap();
    let frame = answer["frame"].as_str().unwrap().to_string();
    assert!(
        node.stop(),
        "the node stops cleanly and flushes its exporters"
    );

    let received = received.lock().unwrap();
    let captures: Vec<&Span> = received
        .spans
        .iter()
        .filter(|s| s.name == "capture")
        .collect();
    assert!(
        !captures.is_empty(),
        "no capture span among {:?}",
        received.spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let asked = captures
        .iter()
        .find(|span| attribute(span, "frame").as_deref() == Some(&frame[..12]))
        .expect("the span of the capture the API asked for");
    assert_eq!(attribute(asked, "replica").as_deref(), Some("web"));
    let request = received
        .spans
        .iter()
        .find(|span| span.name == "request" && span.span_id == asked.parent_span_id)
        .expect("the capture span is a child of the API request's span, across the actor");
    assert_eq!(request.trace_id, asked.trace_id);
    assert_eq!(
        attribute(request, "path").as_deref(),
        Some("/api/replicas/web/capture")
    );
    for metric in [
        "kairos.capture.duration",
        "kairos.frames.stored",
        "kairos.store.size",
    ] {
        assert!(
            received.metrics.iter().any(|m| m == metric),
            "metric {metric} missing from {:?}",
            received.metrics
        );
    }
}
