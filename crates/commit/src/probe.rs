//! Running probes against the live replica: HTTP, command, process alive, metric bounds.
//! Each run is an observation with its evidence; the committer decides what follows.

use std::collections::HashMap;
use std::time::{Duration, Instant as Clock};

use kairos_capture::process::{Selector, sample};
use kairos_core::{Instant, Limits, Probe, ReplicaDefinition};
use kairos_sandbox::command;
use serde::{Deserialize, Serialize};

/// One run of one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeObservation {
    pub probe: String,
    pub passed: bool,
    /// What was seen: a status and body excerpt, an exit code and output, a value.
    pub evidence: String,
    pub at: Instant,
    pub duration_ms: u64,
}

const BODY_EXCERPT_BYTES: usize = 512;

/// Runs one probe now.
pub fn observe(probe: &Probe, replica: &ReplicaDefinition, limits: &Limits) -> ProbeObservation {
    let started = Clock::now();
    let at = Instant::now();
    let (passed, evidence) = match probe {
        Probe::Http {
            url,
            expect_status,
            expect_body,
            timeout_ms,
        } => http(url, *expect_status, expect_body.as_deref(), *timeout_ms),
        Probe::Command {
            command: template,
            timeout_ms,
        } => {
            let text = command::expand(template, &replica.root);
            match command::run(
                &text,
                &replica.root,
                Duration::from_millis(*timeout_ms),
                limits.command_output_bytes_max.min(4096),
                true,
            ) {
                Ok(outcome) => (
                    outcome.passed,
                    if outcome.timed_out {
                        format!("timed out after {timeout_ms} ms")
                    } else {
                        format!(
                            "exit code {}{}",
                            outcome
                                .exit_code
                                .map(|c| c.to_string())
                                .unwrap_or_else(|| format!("none (signal {:?})", outcome.signal)),
                            if outcome.output.trim().is_empty() {
                                String::new()
                            } else {
                                format!(", output: {}", outcome.output.trim())
                            }
                        )
                    },
                ),
                Err(error) => (false, format!("could not run: {error}")),
            }
        }
        Probe::Process { selector } => match Selector::new(selector) {
            Ok(selector) => {
                let alive: Vec<_> = sample(&[selector], &HashMap::new(), at)
                    .into_iter()
                    .filter(|p| p.state != "Z")
                    .collect();
                if alive.is_empty() {
                    (false, "no live process matches".to_string())
                } else {
                    (
                        true,
                        format!(
                            "{} alive (pids {})",
                            alive.len(),
                            alive
                                .iter()
                                .map(|p| p.pid.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                }
            }
            Err(error) => (false, error.to_string()),
        },
        Probe::Metric { metric, min, max } => match metric_value(metric, replica) {
            Ok(value) => {
                let low = min.is_none_or(|min| value >= min);
                let high = max.is_none_or(|max| value <= max);
                (low && high, format!("{metric} = {value}"))
            }
            Err(error) => (false, error),
        },
    };
    ProbeObservation {
        probe: probe.describe(),
        passed,
        evidence,
        at,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

fn http(
    url: &str,
    expect_status: u16,
    expect_body: Option<&str>,
    timeout_ms: u64,
) -> (bool, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(timeout_ms)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let body = response
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_string()
                .unwrap_or_default();
            let excerpt: String = body.chars().take(BODY_EXCERPT_BYTES).collect();
            let status_ok = status == expect_status;
            let body_ok = expect_body.is_none_or(|wanted| body.contains(wanted));
            let mut evidence = format!("status {status}");
            if !status_ok {
                evidence.push_str(&format!(" (expected {expect_status})"));
            }
            if !body_ok {
                evidence.push_str(&format!(
                    ", body lacks {:?}",
                    expect_body.unwrap_or_default()
                ));
            }
            evidence.push_str(&format!(", body: {}", excerpt.trim()));
            (status_ok && body_ok, evidence)
        }
        Err(error) => (false, format!("request failed: {error}")),
    }
}

/// The current value of a metric: process metrics from fresh samples of the replica's
/// processes, file metrics from a walk of the live root.
fn metric_value(metric: &str, replica: &ReplicaDefinition) -> Result<f64, String> {
    let selectors: Vec<Selector> = replica
        .processes
        .iter()
        .filter_map(|pattern| Selector::new(pattern).ok())
        .collect();
    let now = Instant::now();
    let processes = sample(&selectors, &HashMap::new(), now);
    match metric {
        "memory_rss_bytes" => Ok(processes.iter().map(|p| p.rss_bytes as f64).sum()),
        "processes" => Ok(processes.len() as f64),
        "cpu_percent" => {
            // CPU use over a short interval, from two samples.
            let before: HashMap<(u32, i64), kairos_capture::process::PreviousSample> = processes
                .iter()
                .map(|p| {
                    (
                        (p.pid, p.start_time_ns),
                        kairos_capture::process::PreviousSample {
                            cpu_time_ms: p.cpu_time_ms,
                            at: now,
                        },
                    )
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let after = sample(&selectors, &before, Instant::now());
            Ok(after.iter().map(|p| p.cpu_percent).sum())
        }
        "files" | "directories" | "disk_allocated_bytes" | "disk_apparent_bytes" => {
            let mut files = 0u64;
            let mut directories = 0u64;
            let mut apparent = 0u64;
            let mut allocated = 0u64;
            let mut pending = vec![replica.root.clone()];
            while let Some(dir) = pending.pop() {
                let Ok(listing) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in listing.flatten() {
                    let Ok(metadata) = entry.metadata() else {
                        continue;
                    };
                    if metadata.is_dir() {
                        directories += 1;
                        pending.push(entry.path());
                    } else if metadata.is_file() {
                        use std::os::unix::fs::MetadataExt;
                        files += 1;
                        apparent += metadata.len();
                        allocated += metadata.blocks() * 512;
                    }
                }
            }
            Ok(match metric {
                "files" => files as f64,
                "directories" => directories as f64,
                "disk_allocated_bytes" => allocated as f64,
                _ => apparent as f64,
            })
        }
        other => Err(format!("unknown metric {other:?}")),
    }
}

/// Runs every probe of the replica once; the first failure, if any, is returned too.
pub fn observe_all(
    replica: &ReplicaDefinition,
    limits: &Limits,
) -> (Vec<ProbeObservation>, Option<ProbeObservation>) {
    let observations: Vec<ProbeObservation> = replica
        .probes
        .iter()
        .map(|probe| observe(probe, replica, limits))
        .collect();
    let failed = observations.iter().find(|o| !o.passed).cloned();
    (observations, failed)
}
