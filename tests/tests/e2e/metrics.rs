//! `/metrics`: a real node's Prometheus text exposition after a capture is well formed
//! (HELP and TYPE before every family's samples, counters `_total`, histograms with their
//! buckets, sum and count), shows the figures the OTLP exporter sends, and is read only
//! with a viewer's token or `node.metrics_token`.

use std::collections::{BTreeMap, BTreeSet};

use kairos_tests::Node;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;

/// One sample line of the exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition parsed per the text format 0.0.4: the samples, and each family's HELP
/// and TYPE. Panics naming the line that is not well formed.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// `{a="x",b="y\"z"}` → labels and the rest of the line.
fn parse_labels(text: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    assert_eq!(chars.next(), Some('{'), "line {line:?}");
    loop {
        if chars.peek() == Some(&'}') {
            chars.next();
            break;
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            is_metric_name(&name) && !name.contains(':'),
            "label name {name:?} in {line:?}"
        );
        assert_eq!(chars.next(), Some('"'), "label {name} unquoted in {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("escape \\{other:?} in {line:?}"),
                },
                Some('"') => break,
                Some('\n') | None => panic!("unterminated label value in {line:?}"),
                Some(c) => value.push(c),
            }
        }
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} twice in {line:?}"
        );
        match chars.next() {
            Some(',') => {}
            Some('}') => break,
            other => panic!("{other:?} after a label in {line:?}"),
        }
    }
    (labels, chars.collect())
}

fn parse(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the text ends with a line feed"
    );
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(is_metric_name(name), "HELP of {name:?}");
            assert!(
                exposition.help.insert(name.into(), help.into()).is_none(),
                "two HELP lines for {name}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(is_metric_name(name), "TYPE of {name:?}");
            assert!(
                matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "type {kind:?} of {name}"
            );
            assert!(
                exposition
                    .samples
                    .iter()
                    .all(|s| family_of(&s.name, &exposition.types) != name),
                "TYPE of {name} after its samples"
            );
            assert!(
                exposition.types.insert(name.into(), kind.into()).is_none(),
                "two TYPE lines for {name}"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(is_metric_name(name), "sample name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), line[name_end..].to_string())
        };
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let value = fields.next().and_then(parse_value);
        let value = value.unwrap_or_else(|| panic!("value of {line:?}"));
        if let Some(timestamp) = fields.next() {
            assert!(timestamp.parse::<i64>().is_ok(), "timestamp of {line:?}");
        }
        assert!(fields.next().is_none(), "trailing fields in {line:?}");
        let family = family_of(name, &exposition.types);
        assert!(
            exposition.types.contains_key(&family),
            "no TYPE before {line:?}"
        );
        assert!(
            exposition.help.contains_key(&family),
            "no HELP before {line:?}"
        );
        exposition.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    exposition
}

/// The family a sample belongs to: its name, or a histogram's name without the suffix.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|kind| kind == "histogram" || kind == "summary")
        {
            return base.to_string();
        }
    }
    name.to_string()
}

impl Exposition {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|sample| {
                sample.name == name
                    && labels.iter().all(|(key, value)| {
                        sample.labels.get(*key).map(String::as_str) == Some(value)
                    })
            })
            .map(|sample| sample.value)
    }
}

fn scrape(node: &Node, token: Option<&str>) -> (u16, String, String) {
    let mut request = Node::agent().get(format!("{}/metrics", node.url));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), content_type, body)
}

fn capture(node: &Node, token: Option<&str>) {
    let mut request = Node::agent().post(format!("{}/api/replicas/web/capture", node.url));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.send_empty().unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// The last cumulative value OTLP received for a counter of replica `web`.
fn otlp_counter(
    exported: &[opentelemetry_proto::tonic::metrics::v1::Metric],
    name: &str,
) -> Option<f64> {
    exported
        .iter()
        .rev()
        .filter(|m| m.name == name)
        .find_map(|metric| match &metric.data {
            Some(Data::Sum(sum)) => sum.data_points.iter().find_map(|point| {
                let web = point
                    .attributes
                    .iter()
                    .any(|kv| kv.key == "replica" && format!("{:?}", kv.value).contains("\"web\""));
                let value = match point.value {
                    Some(NumberValue::AsInt(value)) => value as f64,
                    Some(NumberValue::AsDouble(value)) => value,
                    None => f64::NAN,
                };
                web.then_some(value)
            }),
            _ => None,
        })
}

#[test]
fn a_scrape_after_a_capture_is_well_formed_and_shows_what_otlp_receives() {
    let (endpoint, received) = crate::telemetry::receiver();
    let service = tempfile::tempdir().unwrap();
    std::fs::write(service.path().join("a.txt"), b"hello").unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "[telemetry]\notlp_endpoint = {endpoint:?}\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"1h\"\n",
        service.path().display().to_string()
    );
    let mut node = Node::start(&config, &state.path().join("data"));
    capture(&node, None);
    let (status, content_type, before) = scrape(&node, None);
    assert_eq!(status, 200, "{before}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let before = parse(&before);
    let frames = |exposition: &Exposition| {
        exposition
            .value("kairos_frames_stored_total", &[("replica", "web")])
            .expect("frames stored of replica web")
    };
    let frames_before = frames(&before);
    assert!(frames_before >= 1.0, "{before:?}");
    assert_eq!(before.types["kairos_frames_stored_total"], "counter");
    assert_eq!(
        before.types["kairos_capture_duration_milliseconds"],
        "histogram"
    );
    assert_eq!(before.types["kairos_store_size_bytes"], "gauge");
    assert!(before.value("kairos_store_size_bytes", &[]).unwrap() > 0.0);
    let bucket_inf = before
        .value(
            "kairos_capture_duration_milliseconds_bucket",
            &[("replica", "web"), ("le", "+Inf")],
        )
        .expect("the +Inf bucket");
    let count = before
        .value(
            "kairos_capture_duration_milliseconds_count",
            &[("replica", "web")],
        )
        .expect("the histogram's count");
    assert_eq!(bucket_inf, count);
    assert!(
        before
            .value(
                "kairos_capture_duration_milliseconds_sum",
                &[("replica", "web")]
            )
            .is_some()
    );

    std::fs::write(service.path().join("b.txt"), b"a second file").unwrap();
    capture(&node, None);
    let after_text = scrape(&node, None).2;
    let after = parse(&after_text);
    assert_eq!(frames(&after), frames_before + 1.0, "{after_text}");
    let bytes_read = |exposition: &Exposition| {
        exposition
            .value(
                "kairos_capture_bytes_read_bytes_total",
                &[("replica", "web")],
            )
            .unwrap_or(0.0)
    };
    assert!(
        bytes_read(&after) >= bytes_read(&before) + 13.0,
        "{after_text}"
    );

    // Stopping flushes the OTLP exporter: its last figures are the scrape's.
    assert!(node.stop());
    let received = received.lock().unwrap();
    assert_eq!(
        otlp_counter(&received.exported, "kairos.frames.stored"),
        Some(frames(&after))
    );
    assert_eq!(
        otlp_counter(&received.exported, "kairos.capture.bytes_read"),
        Some(bytes_read(&after))
    );
}

#[test]
fn metrics_need_a_viewer_or_the_metrics_token_and_scoped_parties_see_their_replicas() {
    let base = tempfile::tempdir().unwrap();
    let kairos = kairos_tests::Kairos::at(&base.path().join("data"));
    for name in ["web", "db"] {
        let root = base.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.txt"), name).unwrap();
        kairos.ok(["replica", "add", name, "--root", root.to_str().unwrap()]);
    }
    let token = |args: &[&str]| {
        let mut all = vec!["party", "add"];
        all.extend_from_slice(args);
        all.push("--json");
        kairos.json(all)["token"].as_str().unwrap().to_string()
    };
    let admin = token(&["root", "--role", "admin"]);
    let web_viewer = token(&["web-team", "--role", "viewer", "--replica", "web"]);
    let metrics_token = "scrape-0123456789abcdef";
    let config = format!("[node]\nmetrics_token = {metrics_token:?}\n");
    let node = Node::start(&config, kairos.data_dir());
    for name in ["web", "db"] {
        let response = Node::agent()
            .post(format!("{}/api/replicas/{name}/capture", node.url))
            .header("Authorization", format!("Bearer {admin}"))
            .send_empty()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }

    assert_eq!(
        scrape(&node, None).0,
        401,
        "a party exists: no token, no metrics"
    );
    assert_eq!(scrape(&node, Some("scrape-0123456789abcdeX")).0, 401);

    let (status, _, text) = scrape(&node, Some(metrics_token));
    assert_eq!(status, 200, "{text}");
    let all = parse(&text);
    let replicas: BTreeSet<&str> = all
        .samples
        .iter()
        .filter_map(|sample| sample.labels.get("replica").map(String::as_str))
        .collect();
    assert_eq!(replicas, BTreeSet::from(["db", "web"]));

    // The metrics token opens /metrics and nothing else.
    let status = Node::agent()
        .get(format!("{}/api/status", node.url))
        .header("Authorization", format!("Bearer {metrics_token}"))
        .call()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 401);

    let (status, _, text) = scrape(&node, Some(&web_viewer));
    assert_eq!(status, 200, "{text}");
    let scoped = parse(&text);
    let replicas: BTreeSet<&str> = scoped
        .samples
        .iter()
        .filter_map(|sample| sample.labels.get("replica").map(String::as_str))
        .collect();
    assert_eq!(replicas, BTreeSet::from(["web"]));
    assert!(
        scoped.value("kairos_store_size_bytes", &[]).is_some(),
        "node-wide figures stay"
    );
}
