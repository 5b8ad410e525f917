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
pub(crate) struct Received {
    pub(crate) spans: Vec<Span>,
    pub(crate) metrics: Vec<String>,
    /// Every metric of every export, in the order they came.
    pub(crate) exported: Vec<opentelemetry_proto::tonic::metrics::v1::Metric>,
    requests: Vec<String>,
}

/// A minimal OTLP/HTTP receiver: answers 200 to every POST and decodes the bodies.
pub(crate) fn receiver() -> (String, Arc<Mutex<Received>>) {
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
                                        .extend(scope.metrics.iter().map(|m| m.name.clone()));
                                    received.exported.extend(scope.metrics);
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

/// A proposal submitted over NATS and its commit, both sent with the client's W3C trace
/// context, are spans of the client's one trace.
#[test]
fn a_proposal_over_nats_and_its_commit_are_one_trace() {
    use futures::StreamExt as _;
    let (endpoint, received) = receiver();
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let kairos = kairos_tests::Kairos::at(&base.path().join("data"));
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    kairos.ok(["capture", "web"]);
    let token = kairos.json(["party", "add", "ci", "--role", "committer", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    kairos.ok([
        "timeline",
        "fork",
        "exp",
        "--replica",
        "web",
        "--at",
        "latest",
    ]);
    let nats = kairos_tests::services::NatsServer::start(&base.path().join("nats"), None);
    let config = format!(
        "[telemetry]\notlp_endpoint = {endpoint:?}\nservice_name = \"kairos-test\"\n[nats]\nurl = \"{}\"\n",
        nats.url()
    );
    let mut node = Node::start(&config, kairos.data_dir());
    kairos_tests::wait_for(
        "the node to answer on NATS",
        std::time::Duration::from_secs(10),
        || {
            let status: serde_json::Value = Node::agent()
                .get(format!("{}/api/status", node.url))
                .header("Authorization", format!("Bearer {token}"))
                .call()
                .ok()?
                .body_mut()
                .read_json()
                .ok()?;
            (status["nats"]["answering"] == true).then_some(())
        },
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Answers go only into the party's own inbox.
        let client = async_nats::ConnectOptions::new()
            .custom_inbox_prefix("_INBOX_ci")
            .connect(nats.url())
            .await
            .unwrap();
        let mut events = client.subscribe("kairos.web.exp.commit").await.unwrap();
        let ask = |verb: &'static str, parent: &'static str, payload: serde_json::Value| {
            let client = client.clone();
            let token = token.clone();
            async move {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Authorization", format!("Bearer {token}").as_str());
                headers.insert("traceparent", format!("00-{trace}-{parent}-01").as_str());
                let answer = client
                    .request_with_headers(format!("kairos.api.{verb}"), headers, payload.to_string().into())
                    .await
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&answer.payload).unwrap()
            }
        };
        let proposal = ask(
            "propose",
            "00f067aa0ba902b7",
            serde_json::json!({"replica": "web", "body": {"document": {"title": "port", "ops": [{"op": "set_config", "file": "app.conf", "key": "port", "value": 2}]}, "timeline": "exp"}}),
        )
        .await;
        let id = proposal["proposal"].as_str().unwrap().to_string();
        let commit = ask(
            "commit",
            "00f067aa0ba902b8",
            serde_json::json!({"replica": "web", "proposal": id}),
        )
        .await;
        assert_eq!(commit["status"], "committed", "{commit}");
        tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
            .await
            .expect("the commit's event");
    });
    assert!(node.stop());
    let received = received.lock().unwrap();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let in_trace: Vec<String> = received
        .spans
        .iter()
        .filter(|span| span.name == "request" && hex(&span.trace_id) == trace)
        .filter_map(|span| attribute(span, "path"))
        .collect();
    assert!(
        in_trace
            .iter()
            .any(|path| path == "/api/replicas/web/proposals"),
        "{in_trace:?}"
    );
    assert!(
        in_trace.iter().any(|path| path.ends_with("/commit")),
        "{in_trace:?}"
    );
}
