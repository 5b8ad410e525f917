//! Probes: the health checks run after a commit on `main` for the replica's watch window.
//! A failed probe makes the committer roll the replica back to its last good frame.

use serde::{Deserialize, Serialize};

/// Metrics a metric probe can watch (those recorded in every frame's runtime).
pub const PROBE_METRICS: [&str; 7] = [
    "cpu_percent",
    "memory_rss_bytes",
    "disk_allocated_bytes",
    "disk_apparent_bytes",
    "files",
    "directories",
    "processes",
];

pub const PROBE_TIMEOUT_MS_DEFAULT: u64 = 5_000;

fn probe_timeout_ms_default() -> u64 {
    PROBE_TIMEOUT_MS_DEFAULT
}

fn expect_status_default() -> u16 {
    200
}

/// One health check of a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// An HTTP GET answers `expect_status` (and contains `expect_body`, when given).
    Http {
        url: String,
        #[serde(default = "expect_status_default")]
        expect_status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect_body: Option<String>,
        #[serde(default = "probe_timeout_ms_default")]
        timeout_ms: u64,
    },
    /// A shell command exits 0 (`{root}` is replaced by the replica's root).
    Command {
        command: String,
        #[serde(default = "probe_timeout_ms_default")]
        timeout_ms: u64,
    },
    /// At least one process matches the selector (as in the replica's `processes`).
    Process { selector: String },
    /// A metric of the replica's processes and files stays within bounds.
    Metric {
        metric: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
    },
}

impl Probe {
    /// Parses the `--probe KIND:SPEC` flag of `kairos replica add`:
    /// `http:URL`, `http:URL=STATUS`, `command:CMD`, `process:SELECTOR`,
    /// `metric:NAME<=MAX`, `metric:NAME>=MIN`.
    pub fn parse_flag(text: &str) -> Result<Probe, String> {
        let (kind, spec) = text.split_once(':').ok_or_else(|| {
            format!("probe {text:?} is not KIND:SPEC (kinds: http, command, process, metric)")
        })?;
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(format!("probe {text:?} has nothing after {kind:?}:"));
        }
        let probe = match kind {
            "http" => {
                let (url, status) = match spec.rsplit_once('=') {
                    Some((url, status)) if status.parse::<u16>().is_ok() => {
                        (url, status.parse::<u16>().unwrap_or(200))
                    }
                    _ => (spec, 200),
                };
                Probe::Http {
                    url: url.to_string(),
                    expect_status: status,
                    expect_body: None,
                    timeout_ms: PROBE_TIMEOUT_MS_DEFAULT,
                }
            }
            "command" => Probe::Command {
                command: spec.to_string(),
                timeout_ms: PROBE_TIMEOUT_MS_DEFAULT,
            },
            "process" => Probe::Process {
                selector: spec.to_string(),
            },
            "metric" => {
                let bound = |(name, value): (&str, &str)| -> Result<(String, f64), String> {
                    let value = value.trim().parse::<f64>().map_err(|_| {
                        format!("probe {text:?}: {:?} is not a number", value.trim())
                    })?;
                    Ok((name.trim().to_string(), value))
                };
                if let Some(parts) = spec.split_once("<=") {
                    let (metric, max) = bound(parts)?;
                    Probe::Metric {
                        metric,
                        min: None,
                        max: Some(max),
                    }
                } else if let Some(parts) = spec.split_once(">=") {
                    let (metric, min) = bound(parts)?;
                    Probe::Metric {
                        metric,
                        min: Some(min),
                        max: None,
                    }
                } else {
                    return Err(format!(
                        "probe {text:?}: a metric probe is NAME<=MAX or NAME>=MIN"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "probe {text:?}: unknown kind {other:?} (kinds: http, command, process, metric)"
                ));
            }
        };
        probe.validate()?;
        Ok(probe)
    }

    /// A short description for logs and evidence.
    pub fn describe(&self) -> String {
        match self {
            Probe::Http {
                url, expect_status, ..
            } => format!("http {url} expects {expect_status}"),
            Probe::Command { command, .. } => format!("command {command:?}"),
            Probe::Process { selector } => format!("process {selector:?} alive"),
            Probe::Metric { metric, min, max } => match (min, max) {
                (Some(min), Some(max)) => format!("metric {metric} within {min}..={max}"),
                (Some(min), None) => format!("metric {metric} >= {min}"),
                (None, Some(max)) => format!("metric {metric} <= {max}"),
                (None, None) => format!("metric {metric}"),
            },
        }
    }

    /// Checks what needs no IO.
    pub fn validate(&self) -> Result<(), String> {
        let timeout_ok = |timeout_ms: u64| {
            if (1..=600_000).contains(&timeout_ms) {
                Ok(())
            } else {
                Err(format!(
                    "probe {}: timeout_ms {timeout_ms} must be 1 to 600000",
                    self.describe()
                ))
            }
        };
        match self {
            Probe::Http {
                url,
                expect_status,
                timeout_ms,
                ..
            } => {
                if !url.starts_with("http://") {
                    return Err(format!("probe url {url:?} must start with http://"));
                }
                if !(100..=599).contains(expect_status) {
                    return Err(format!(
                        "probe {url:?}: expect_status {expect_status} is not an HTTP status"
                    ));
                }
                timeout_ok(*timeout_ms)
            }
            Probe::Command {
                command,
                timeout_ms,
            } => {
                if command.trim().is_empty() || command.contains('\0') {
                    return Err("probe command is empty".into());
                }
                timeout_ok(*timeout_ms)
            }
            Probe::Process { selector } => {
                if selector.trim().is_empty() {
                    return Err("probe process selector is empty".into());
                }
                Ok(())
            }
            Probe::Metric { metric, min, max } => {
                if !PROBE_METRICS.contains(&metric.as_str()) {
                    return Err(format!(
                        "probe metric {metric:?} is unknown (known: {})",
                        PROBE_METRICS.join(", ")
                    ));
                }
                if min.is_none() && max.is_none() {
                    return Err(format!("probe metric {metric:?} needs min or max"));
                }
                if [min, max]
                    .iter()
                    .any(|bound| bound.is_some_and(|v| !v.is_finite()))
                {
                    return Err(format!("probe metric {metric:?}: bounds must be finite"));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_into_probes_and_bad_ones_are_named() {
        assert_eq!(
            Probe::parse_flag("http:http://127.0.0.1:8080/health=204").unwrap(),
            Probe::Http {
                url: "http://127.0.0.1:8080/health".into(),
                expect_status: 204,
                expect_body: None,
                timeout_ms: PROBE_TIMEOUT_MS_DEFAULT,
            }
        );
        assert_eq!(
            Probe::parse_flag("metric:memory_rss_bytes<=1e9").unwrap(),
            Probe::Metric {
                metric: "memory_rss_bytes".into(),
                min: None,
                max: Some(1e9)
            }
        );
        assert!(
            Probe::parse_flag("metric:load<=3")
                .unwrap_err()
                .contains("\"load\" is unknown")
        );
        assert!(
            Probe::parse_flag("tcp:80")
                .unwrap_err()
                .contains("unknown kind")
        );
        assert!(
            Probe::parse_flag("http:ftp://x")
                .unwrap_err()
                .contains("http://")
        );
        let parsed: Probe =
            serde_json::from_str(r#"{"kind":"process","selector":"nginx"}"#).unwrap();
        assert_eq!(parsed.describe(), "process \"nginx\" alive");
        assert!(
            serde_json::from_str::<Probe>(r#"{"kind":"process","selector":"x","extra":1}"#)
                .is_err()
        );
    }
}
