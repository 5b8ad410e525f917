//! NATS benchmark of a release node (run by `bench/nats`): a nats-server started here on a
//! free loopback port, a node publishing to it, and
//!
//! 1. commit → event: `--commits` commits on a fork, each event received by `--subscribers`
//!    subscribers; the latency of each delivery from the commit's catalog time (the
//!    command's time stamp, taken before the store commits it) to its arrival;
//! 2. requests: `--seconds` of `kairos.api.validate` (validation only, nothing stored) and of
//!    `kairos.api.propose` (validated and stored), `--in-flight` at once: answers per second
//!    and the answer latency.
//!
//! Usage: nats_bench KAIROS_BINARY [--commits N] [--subscribers N] [--seconds S]
//! [--in-flight N]. Prints Markdown.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

struct Args {
    kairos: PathBuf,
    commits: usize,
    subscribers: usize,
    seconds: u64,
    in_flight: usize,
}

fn args() -> Args {
    let mut args = Args {
        kairos: PathBuf::from("target/release/kairos"),
        commits: 200,
        subscribers: 10,
        seconds: 5,
        in_flight: 32,
    };
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        let mut value = || given.next().expect("a value after the flag");
        match arg.as_str() {
            "--commits" => args.commits = value().parse().expect("a number"),
            "--subscribers" => args.subscribers = value().parse().expect("a number"),
            "--seconds" => args.seconds = value().parse().expect("a number"),
            "--in-flight" => args.in_flight = value().parse().expect("a number"),
            path => args.kairos = PathBuf::from(path),
        }
    }
    args
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn kairos(binary: &Path, data: &Path, args: &[&str]) -> Value {
    let output = Command::new(binary)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("kairos runs");
    assert!(
        output.status.success(),
        "kairos {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone)]
struct Api {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Api {
    fn post(&self, path: &str, body: Value) -> Value {
        self.agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body)
            .expect("the node answers")
            .body_mut()
            .read_json()
            .expect("JSON")
    }
}

fn percentile(values: &mut [f64], fraction: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * fraction).round() as usize]
}

fn main() {
    let args = args();
    let base = tempfile::tempdir().expect("a temporary directory");
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("app.conf"), "port = 1\n").unwrap();
    let data = base.path().join("data");
    let binary = &args.kairos;
    kairos(
        binary,
        &data,
        &["replica", "add", "web", "--root", root.to_str().unwrap()],
    );
    kairos(binary, &data, &["capture", "web"]);
    let token = kairos(
        binary,
        &data,
        &["party", "add", "bench", "--role", "admin", "--json"],
    )["token"]
        .as_str()
        .unwrap()
        .to_string();

    let port = free_port();
    let nats_dir = base.path().join("nats");
    std::fs::create_dir_all(&nats_dir).unwrap();
    let _nats = Killed(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&nats_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (Debian package nats-server)"),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let config = base.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[node]\nparty_requests_per_second = 0\n[nats]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let mut node = Command::new(binary)
        .args(["up", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kairos up");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(node.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _node = Killed(node);
    let api = line.trim().trim_start_matches("listening on ").to_string();
    let client = Api {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into(),
        base: api,
        token: token.clone(),
    };
    client.post(
        "/api/replicas/web/timelines",
        json!({"name": "exp", "at": "latest"}),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. Commit → event on every subscriber.
    let deliveries = runtime.block_on(async {
        let mut tasks = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.subscribers);
        for _ in 0..args.subscribers {
            let client = async_nats::connect(&url).await.expect("connects");
            let mut subscriber = client.subscribe("kairos.web.exp.commit").await.unwrap();
            client.flush().await.unwrap();
            let ready = ready_tx.clone();
            let commits = args.commits;
            tasks.push(tokio::spawn(async move {
                let _ = ready.send(()).await;
                let mut latencies = Vec::with_capacity(commits);
                while latencies.len() < commits {
                    let Some(message) = subscriber.next().await else {
                        break;
                    };
                    let arrived = kairos_core::Instant::now();
                    let event: Value = serde_json::from_slice(&message.payload).unwrap();
                    if event["details"]["status"] != "committed" {
                        continue;
                    }
                    let time = kairos_core::Instant::parse_rfc3339(event["time"].as_str().unwrap())
                        .unwrap();
                    latencies.push((
                        event["id"].as_str().unwrap_or_default().to_string(),
                        arrived.0,
                        arrived.0.saturating_sub(time.0) as f64 / 1e6,
                    ));
                }
                latencies
            }));
        }
        for _ in 0..args.subscribers {
            ready_rx.recv().await;
        }
        let commits = args.commits;
        let api = client.clone();
        tokio::task::spawn_blocking(move || {
            for index in 0..commits {
                let proposal = api.post(
                    "/api/replicas/web/proposals",
                    json!({"document": {"title": format!("port {index}"), "ops": [{"op": "set_config", "file": "app.conf", "key": "port", "value": index + 2}]}, "timeline": "exp"}),
                );
                let id = proposal["proposal"].as_str().expect("a proposal id").to_string();
                let commit = api.post(
                    &format!("/api/replicas/web/proposals/{id}/commit"),
                    json!({}),
                );
                assert_eq!(commit["status"], "committed", "{commit}");
            }
        })
        .await
        .unwrap();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .expect("every subscriber got every commit")
                    .unwrap(),
            );
        }
        all
    });
    // How far apart the subscribers got each event: the fan-out's own cost.
    let mut arrivals: std::collections::HashMap<String, (i64, i64)> = Default::default();
    for (id, arrived, _) in &deliveries {
        let entry = arrivals.entry(id.clone()).or_insert((*arrived, *arrived));
        entry.0 = entry.0.min(*arrived);
        entry.1 = entry.1.max(*arrived);
    }
    let mut spreads: Vec<f64> = arrivals
        .values()
        .map(|(first, last)| (last - first) as f64 / 1e6)
        .collect();
    let mut deliveries: Vec<f64> = deliveries.iter().map(|(_, _, lag)| *lag).collect();
    println!(
        "| first → last of {} subscribers, per event | p50 {:.3} ms | p99 {:.3} ms | max {:.3} ms |",
        args.subscribers,
        percentile(&mut spreads, 0.5),
        percentile(&mut spreads, 0.99),
        percentile(&mut spreads, 1.0)
    );
    println!(
        "| commit's time stamp → event at a subscriber, {} commits × {} subscribers (includes the commit's own work and fsync) | p50 {:.3} ms | p99 {:.3} ms | max {:.3} ms |",
        args.commits,
        args.subscribers,
        percentile(&mut deliveries, 0.5),
        percentile(&mut deliveries, 0.99),
        percentile(&mut deliveries, 1.0)
    );

    let status: Value = client
        .agent
        .get(format!("{}/api/status", client.base))
        .header("Authorization", format!("Bearer {}", client.token))
        .call()
        .expect("the node answers")
        .body_mut()
        .read_json()
        .expect("JSON");
    println!(
        "| catalog change → JetStream acknowledgement (the node's own figure, last 1 024 batches) | p50 {:.3} ms | p99 {:.3} ms | |",
        status["nats"]["publish_latency_ms_p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        status["nats"]["publish_latency_ms_p99"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );

    // 2. Requests: validation only, then stored proposals.
    for verb in ["validate", "propose"] {
        let (answers, mut latencies) = runtime.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .custom_inbox_prefix("_INBOX_bench")
                .connect(&url)
                .await
                .expect("connects");
            let deadline = Instant::now() + Duration::from_secs(args.seconds);
            let mut tasks = Vec::new();
            for worker in 0..args.in_flight {
                let client = client.clone();
                let token = token.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut index = 0u64;
                    while Instant::now() < deadline {
                        index += 1;
                        let payload = json!({"replica": "web", "body": {"document": {"title": format!("{worker}-{index}"), "ops": [{"op": "set_config", "file": "app.conf", "key": "workers", "value": index}]}, "timeline": "exp"}});
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Authorization", format!("Bearer {token}").as_str());
                        let started = Instant::now();
                        let answer = client
                            .request_with_headers(
                                format!("kairos.api.{verb}"),
                                headers,
                                payload.to_string().into(),
                            )
                            .await
                            .expect("an answer");
                        let status = answer
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Kairos-Status"))
                            .map(|v| v.as_str().to_string())
                            .unwrap_or_default();
                        assert!(
                            status == "200" || status == "201",
                            "{verb}: {status} {}",
                            String::from_utf8_lossy(&answer.payload)
                        );
                        latencies.push(started.elapsed().as_secs_f64() * 1e3);
                    }
                    latencies
                }));
            }
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.unwrap());
            }
            (all.len(), all)
        });
        println!(
            "| kairos.api.{verb}, {} in flight, {} s | {:.0} answers/s | p50 {:.3} ms | p99 {:.3} ms |",
            args.in_flight,
            args.seconds,
            answers as f64 / args.seconds as f64,
            percentile(&mut latencies, 0.5),
            percentile(&mut latencies, 0.99)
        );
    }
}
