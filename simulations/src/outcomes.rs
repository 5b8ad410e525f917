//! Synthetic services and their histories of proposals and outcomes, reproducible from a
//! seed, for training and evaluating the predictor. Each service has failure rules the
//! features never see directly: a web server fails when workers × memory per worker
//! exceeds its memory limit, a port outside 1–65535 or a typo in an enumerated value
//! fails the check, a database migration fails on a column its table does not have, a
//! cache fails when maxmemory exceeds its limit, and an API's health flaps whatever the
//! change. Proposals that pass change the replica's configuration; failed ones are rolled
//! back.

use kairos_predict::{FileView, OpView, Outcome, OutcomeRecord, ProposalView};
use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;

const MIB: f64 = 1024.0 * 1024.0;
/// Time between two proposals of the fleet (nanoseconds).
const PROPOSAL_INTERVAL_NS: u64 = 60_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Web,
    Database,
    Cache,
    Api,
}

#[derive(Debug, Clone)]
struct Replica {
    kind: ServiceKind,
    file: &'static str,
    keys: Vec<(String, String)>,
    migrations: u32,
}

impl Replica {
    fn get(&self, key: &str) -> &str {
        self.keys
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or("")
    }

    fn number(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap_or(0.0)
    }

    fn set(&mut self, key: &str, value: &str) {
        match self.keys.iter_mut().find(|(name, _)| name == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.keys.push((key.to_string(), value.to_string())),
        }
    }

    fn base(&self) -> FileView {
        FileView {
            path: self.file.to_string(),
            keys: self.keys.clone(),
        }
    }
}

fn keys(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn fleet(rng: &mut ChaCha8Rng) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let limit = ["2048", "4096", "8192"]
            .choose(rng)
            .copied()
            .unwrap_or("4096");
        replicas.push(Replica {
            kind: ServiceKind::Web,
            file: "nginx.conf",
            keys: keys(&[
                ("worker_processes", "4"),
                ("worker_memory_mb", "128"),
                ("memory_limit_mb", limit),
                ("listen", "8080"),
                ("gzip", "on"),
                ("keepalive_timeout", "65"),
                ("log_level", "info"),
                ("server_name", "www.example.com"),
            ]),
            migrations: 0,
        });
    }
    for _ in 0..2 {
        let limit = ["8192", "16384"].choose(rng).copied().unwrap_or("8192");
        replicas.push(Replica {
            kind: ServiceKind::Database,
            file: "postgresql.conf",
            keys: keys(&[
                ("max_connections", "100"),
                ("work_mem_mb", "16"),
                ("memory_limit_mb", limit),
                ("port", "5432"),
                ("log_min_messages", "warning"),
            ]),
            migrations: 0,
        });
    }
    for _ in 0..2 {
        let limit = ["1024", "4096"].choose(rng).copied().unwrap_or("1024");
        replicas.push(Replica {
            kind: ServiceKind::Cache,
            file: "redis.conf",
            keys: keys(&[
                ("maxmemory_mb", "256"),
                ("memory_limit_mb", limit),
                ("port", "6379"),
                ("appendonly", "no"),
                ("maxclients", "10000"),
                ("timeout", "0"),
            ]),
            migrations: 0,
        });
    }
    for _ in 0..2 {
        replicas.push(Replica {
            kind: ServiceKind::Api,
            file: "app.toml",
            keys: keys(&[
                ("server.timeout_ms", "500"),
                ("server.retries", "3"),
                ("pool.size", "20"),
                ("features.new_checkout", "false"),
            ]),
            migrations: 0,
        });
    }
    replicas
}

/// A typo of a word: a letter dropped, doubled or two swapped (never the word itself).
fn typo(rng: &mut ChaCha8Rng, word: &str) -> String {
    let mut letters: Vec<char> = word.chars().collect();
    if letters.len() < 2 {
        return format!("{word}{word}");
    }
    let at = rng.random_range(0..letters.len() - 1);
    match rng.random_range(0..3) {
        0 => {
            letters.remove(at);
        }
        1 => letters.insert(at, letters[at]),
        _ => letters.swap(at, at + 1),
    }
    let typo: String = letters.into_iter().collect();
    if typo == word {
        format!("{word}x")
    } else {
        typo
    }
}

fn log_uniform(rng: &mut ChaCha8Rng, low: f64, high: f64) -> f64 {
    (low.ln() + rng.random::<f64>() * (high.ln() - low.ln())).exp()
}

fn port(rng: &mut ChaCha8Rng) -> (String, bool) {
    if rng.random_bool(0.7) {
        (rng.random_range(1024..=65535u32).to_string(), true)
    } else {
        match rng.random_range(0..3) {
            0 => (rng.random_range(65536..200_000u32).to_string(), false),
            1 => ("0".to_string(), false),
            _ => (format!("-{}", rng.random_range(1..9000u32)), false),
        }
    }
}

/// One change to a replica: the ops, the config it leaves, whether its check fails (the
/// hidden rule) and the resource deltas it causes.
struct Change {
    ops: Vec<OpView>,
    /// Migrations written so far (a migration file stays, whatever its outcome).
    migrations: u32,
    after: Vec<(String, String)>,
    failed: bool,
    cpu_percent_delta: f32,
    rss_mib_delta: f64,
}

fn set(
    replica: &Replica,
    after: &mut Replica,
    ops: &mut Vec<OpView>,
    rng: &mut ChaCha8Rng,
    key: &str,
    value: &str,
) {
    // Half of the value edits come as a patch of the file's line, the rest as set_config.
    if replica.kind == ServiceKind::Web && rng.random_bool(0.5) {
        let old = after.get(key).to_string();
        ops.push(OpView::patch_file(
            replica.file,
            &[&format!("{key} {value};")],
            &[&format!("{key} {old};")],
        ));
    } else {
        ops.push(OpView::set_config(replica.file, key, value));
    }
    after.set(key, value);
}

fn web_change(replica: &Replica, rng: &mut ChaCha8Rng) -> Change {
    let mut after = replica.clone();
    let mut ops = Vec::new();
    let mut broken = false;
    let edits = if rng.random_bool(0.15) { 2 } else { 1 };
    for _ in 0..edits {
        match rng.random_range(0..100) {
            0..35 => {
                if rng.random_bool(0.5) {
                    let workers = log_uniform(rng, 1.0, 48.0).round().max(1.0);
                    set(
                        replica,
                        &mut after,
                        &mut ops,
                        rng,
                        "worker_processes",
                        &workers.to_string(),
                    );
                } else {
                    let memory = (log_uniform(rng, 32.0, 1024.0) / 16.0).round().max(1.0) * 16.0;
                    set(
                        replica,
                        &mut after,
                        &mut ops,
                        rng,
                        "worker_memory_mb",
                        &memory.to_string(),
                    );
                }
            }
            35..50 => {
                let (value, valid) = port(rng);
                broken |= !valid;
                set(replica, &mut after, &mut ops, rng, "listen", &value);
            }
            50..65 => {
                let value = if rng.random_bool(0.75) {
                    ["on", "off"]
                        .choose(rng)
                        .copied()
                        .unwrap_or("on")
                        .to_string()
                } else {
                    broken = true;
                    if rng.random_bool(0.5) {
                        ["maybe", "enable", "true", "1"]
                            .choose(rng)
                            .copied()
                            .unwrap_or("maybe")
                            .to_string()
                    } else {
                        {
                            let word = ["on", "off"].choose(rng).copied().unwrap_or("on");
                            typo(rng, word)
                        }
                    }
                };
                set(replica, &mut after, &mut ops, rng, "gzip", &value);
            }
            65..77 => {
                let levels = ["debug", "info", "warn", "error"];
                let level = levels.choose(rng).copied().unwrap_or("info");
                let value = if rng.random_bool(0.75) {
                    level.to_string()
                } else {
                    broken = true;
                    typo(rng, level)
                };
                set(replica, &mut after, &mut ops, rng, "log_level", &value);
            }
            77..88 => {
                let value = if rng.random_bool(0.85) {
                    rng.random_range(0..300u32).to_string()
                } else {
                    broken = true;
                    format!("-{}", rng.random_range(1..100u32))
                };
                set(
                    replica,
                    &mut after,
                    &mut ops,
                    rng,
                    "keepalive_timeout",
                    &value,
                );
            }
            _ => {
                let name = format!(
                    "{}.{}.example.com",
                    ["www", "api", "shop", "static", "edge"]
                        .choose(rng)
                        .copied()
                        .unwrap_or("www"),
                    ["eu", "us", "ap"].choose(rng).copied().unwrap_or("eu")
                );
                set(replica, &mut after, &mut ops, rng, "server_name", &name);
            }
        }
    }
    let memory = after.number("worker_processes") * after.number("worker_memory_mb");
    let failed = broken || memory > after.number("memory_limit_mb");
    let rss_mib_delta =
        memory - replica.number("worker_processes") * replica.number("worker_memory_mb");
    let gzip_cost = |replica: &Replica| {
        if replica.get("gzip") == "on" {
            6.0
        } else {
            0.0
        }
    };
    let cpu_percent_delta = (gzip_cost(&after) - gzip_cost(replica)) as f32
        + 0.8 * (after.number("worker_processes") - replica.number("worker_processes")) as f32;
    Change {
        ops,
        migrations: replica.migrations,
        after: after.keys,
        failed,
        cpu_percent_delta,
        rss_mib_delta,
    }
}

const TABLES: [(&str, &[&str]); 2] = [
    ("users", &["id", "email", "name", "created_at", "status"]),
    ("orders", &["id", "user_id", "total", "created_at", "state"]),
];
const MISSING_COLUMNS: [&str; 4] = ["phone", "nickname", "deleted_at", "legacy_id"];

fn database_change(replica: &Replica, rng: &mut ChaCha8Rng) -> Change {
    let mut after = replica.clone();
    if rng.random_bool(0.55) {
        let (table, columns) = *TABLES.choose(rng).unwrap_or(&TABLES[0]);
        let (other_table, other_columns) = if table == "users" {
            TABLES[1]
        } else {
            TABLES[0]
        };
        let _ = other_table;
        let column = match rng.random_range(0..100) {
            0..65 => columns.choose(rng).copied().unwrap_or("id").to_string(),
            65..78 => other_columns
                .iter()
                .filter(|column| !columns.contains(column))
                .copied()
                .collect::<Vec<_>>()
                .choose(rng)
                .copied()
                .unwrap_or("total")
                .to_string(),
            78..90 => MISSING_COLUMNS
                .choose(rng)
                .copied()
                .unwrap_or("phone")
                .to_string(),
            _ => {
                let word = columns.choose(rng).copied().unwrap_or("email");
                typo(rng, word)
            }
        };
        let failed = !columns.contains(&column.as_str());
        let (verb, statement) = match rng.random_range(0..3) {
            0 => ("index", format!("CREATE INDEX ON {table} ({column});")),
            1 => (
                "backfill",
                format!("UPDATE {table} SET {column} = DEFAULT WHERE id < 1000;"),
            ),
            _ => ("drop", format!("ALTER TABLE {table} DROP COLUMN {column};")),
        };
        after.migrations += 1;
        let path = format!("migrations/{:04}_{verb}_{table}.sql", after.migrations);
        let migrations = after.migrations;
        let ops = vec![OpView::put_file(&path, &["BEGIN;", &statement, "COMMIT;"])];
        return Change {
            ops,
            migrations,
            after: after.keys,
            failed,
            cpu_percent_delta: if failed {
                0.0
            } else {
                rng.random_range(0.0..2.0)
            },
            rss_mib_delta: 0.0,
        };
    }
    let mut ops = Vec::new();
    let mut broken = false;
    match rng.random_range(0..100) {
        0..70 => {
            if rng.random_bool(0.5) {
                let value = log_uniform(rng, 10.0, 2000.0).round();
                ops.push(OpView::set_config(
                    replica.file,
                    "max_connections",
                    &value.to_string(),
                ));
                after.set("max_connections", &value.to_string());
            } else {
                let value = log_uniform(rng, 1.0, 256.0).round().max(1.0);
                ops.push(OpView::set_config(
                    replica.file,
                    "work_mem_mb",
                    &value.to_string(),
                ));
                after.set("work_mem_mb", &value.to_string());
            }
        }
        70..85 => {
            let (value, valid) = port(rng);
            broken |= !valid;
            ops.push(OpView::set_config(replica.file, "port", &value));
            after.set("port", &value);
        }
        _ => {
            let levels = ["debug1", "info", "notice", "warning", "error"];
            let level = levels.choose(rng).copied().unwrap_or("warning");
            let value = if rng.random_bool(0.75) {
                level.to_string()
            } else {
                broken = true;
                typo(rng, level)
            };
            ops.push(OpView::set_config(replica.file, "log_min_messages", &value));
            after.set("log_min_messages", &value);
        }
    }
    let memory = after.number("max_connections") * after.number("work_mem_mb");
    let failed = broken || memory > after.number("memory_limit_mb");
    Change {
        ops,
        migrations: replica.migrations,
        failed,
        cpu_percent_delta: 0.01
            * (after.number("max_connections") - replica.number("max_connections")) as f32,
        rss_mib_delta: memory - replica.number("max_connections") * replica.number("work_mem_mb"),
        after: after.keys,
    }
}

fn cache_change(replica: &Replica, rng: &mut ChaCha8Rng) -> Change {
    let mut after = replica.clone();
    let mut broken = false;
    let (key, value) = match rng.random_range(0..100) {
        0..40 => (
            "maxmemory_mb",
            ((log_uniform(rng, 64.0, 8192.0) / 64.0).round().max(1.0) * 64.0).to_string(),
        ),
        40..60 => {
            let (value, valid) = port(rng);
            broken |= !valid;
            ("port", value)
        }
        60..80 => {
            let value = if rng.random_bool(0.75) {
                ["yes", "no"]
                    .choose(rng)
                    .copied()
                    .unwrap_or("no")
                    .to_string()
            } else {
                broken = true;
                if rng.random_bool(0.5) {
                    ["true", "on", "maybe"]
                        .choose(rng)
                        .copied()
                        .unwrap_or("on")
                        .to_string()
                } else {
                    {
                        let word = ["yes", "no"].choose(rng).copied().unwrap_or("yes");
                        typo(rng, word)
                    }
                }
            };
            ("appendonly", value)
        }
        80..90 => ("maxclients", rng.random_range(100..50_000u32).to_string()),
        _ => ("timeout", rng.random_range(0..3600u32).to_string()),
    };
    after.set(key, &value);
    let failed = broken || after.number("maxmemory_mb") > after.number("memory_limit_mb");
    Change {
        ops: vec![OpView::set_config(replica.file, key, &value)],
        migrations: replica.migrations,
        failed,
        cpu_percent_delta: if after.get("appendonly") == "yes" && replica.get("appendonly") != "yes"
        {
            3.0
        } else {
            0.0
        },
        rss_mib_delta: (after.number("maxmemory_mb") - replica.number("maxmemory_mb")) * 0.5,
        after: after.keys,
    }
}

fn api_change(replica: &Replica, rng: &mut ChaCha8Rng) -> Change {
    let mut after = replica.clone();
    let (key, value) = match rng.random_range(0..4) {
        0 => (
            "server.timeout_ms",
            rng.random_range(50..5000u32).to_string(),
        ),
        1 => ("server.retries", rng.random_range(0..8u32).to_string()),
        2 => ("pool.size", rng.random_range(5..100u32).to_string()),
        _ => (
            "features.new_checkout",
            ["true", "false"]
                .choose(rng)
                .copied()
                .unwrap_or("false")
                .to_string(),
        ),
    };
    after.set(key, &value);
    // Flapping health: the probe fails a third of the time whatever the change.
    let failed = rng.random_bool(0.33);
    Change {
        ops: vec![OpView::set_config(replica.file, key, &value)],
        migrations: replica.migrations,
        failed,
        cpu_percent_delta: 0.0,
        rss_mib_delta: 0.0,
        after: after.keys,
    }
}

/// A seeded history of `count` proposals over the fleet, in proposal-time order.
pub fn history(seed: u64, count: usize) -> Vec<OutcomeRecord> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut replicas = fleet(&mut rng);
    let mut records = Vec::with_capacity(count);
    for index in 0..count {
        let which = match rng.random_range(0..100) {
            0..35 => ServiceKind::Web,
            35..65 => ServiceKind::Database,
            65..85 => ServiceKind::Cache,
            _ => ServiceKind::Api,
        };
        let candidates: Vec<usize> = (0..replicas.len())
            .filter(|&at| replicas[at].kind == which)
            .collect();
        let at = candidates[rng.random_range(0..candidates.len())];
        let replica = &replicas[at];
        let change = match replica.kind {
            ServiceKind::Web => web_change(replica, &mut rng),
            ServiceKind::Database => database_change(replica, &mut rng),
            ServiceKind::Cache => cache_change(replica, &mut rng),
            ServiceKind::Api => api_change(replica, &mut rng),
        };
        let time_ns = (index as u64 + 1) * PROPOSAL_INTERVAL_NS;
        // Outcomes take from a few seconds (a failed check) to a few minutes (a watch
        // window), so the next proposals do not always know the last outcome yet.
        let delay_ns = if change.failed {
            rng.random_range(5..60u64)
        } else {
            rng.random_range(30..300u64)
        } * 1_000_000_000;
        let proposal = ProposalView {
            time_ns,
            diff: kairos_predict::DiffSummary {
                files_changed: 1,
                keys_changed: change.ops.iter().filter(|op| op.key.is_some()).count() as u64,
                bytes_added: change
                    .ops
                    .iter()
                    .flat_map(|op| &op.lines_added)
                    .map(|line| line.len() as u64 + 1)
                    .sum(),
                bytes_removed: change
                    .ops
                    .iter()
                    .flat_map(|op| &op.lines_removed)
                    .map(|line| line.len() as u64 + 1)
                    .sum(),
            },
            ops: change.ops,
            base_files: vec![replica.base()],
            dependents: vec![
                match replica.kind {
                    ServiceKind::Web => "nginx",
                    ServiceKind::Database => "postgres",
                    ServiceKind::Cache => "redis-server",
                    ServiceKind::Api => "api",
                }
                .to_string(),
            ],
            trend: None,
        };
        let failed = change.failed;
        records.push(OutcomeRecord {
            proposal,
            outcome: Outcome {
                time_ns: time_ns + delay_ns,
                failed,
                cpu_percent_delta: (!failed)
                    .then_some(change.cpu_percent_delta + rng.random_range(-0.5..0.5)),
                rss_bytes_delta: (!failed).then_some(change.rss_mib_delta * MIB),
            },
        });
        replicas[at].migrations = change.migrations;
        if !failed {
            replicas[at].keys = change.after;
        }
    }
    records
}

/// Proposals for services the fleet never ran (a mail server, a message queue): out of
/// distribution for a model trained on `history`.
pub fn out_of_distribution(seed: u64, count: usize, after_ns: u64) -> Vec<ProposalView> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x00d1_5ea5_e000);
    (0..count)
        .map(|index| {
            let time_ns = after_ns + (index as u64 + 1) * PROPOSAL_INTERVAL_NS;
            let (file, keys): (&str, Vec<(String, String)>) = if rng.random_bool(0.5) {
                (
                    "postfix/main.cf",
                    keys(&[
                        ("message_size_limit", "10240000"),
                        ("smtpd_banner", "$myhostname ESMTP"),
                        ("relayhost", "[smtp.example.com]:587"),
                        ("mailbox_size_limit", "0"),
                    ]),
                )
            } else {
                (
                    "rabbitmq/rabbitmq.conf",
                    keys(&[
                        ("vm_memory_high_watermark.relative", "0.4"),
                        ("listeners.tcp.default", "5672"),
                        ("heartbeat", "60"),
                        ("disk_free_limit.absolute", "2GB"),
                    ]),
                )
            };
            let (key, _) = keys[rng.random_range(0..keys.len())].clone();
            let value = match rng.random_range(0..3) {
                0 => rng.random_range(0..100_000_000u64).to_string(),
                1 => typo(&mut rng, "relative"),
                _ => format!("{}", rng.random::<f32>()),
            };
            let op = if rng.random_bool(0.5) {
                OpView::set_config(file, &key, &value)
            } else {
                OpView::patch_file(file, &[&format!("{key} = {value}")], &[])
            };
            ProposalView {
                time_ns,
                ops: vec![op],
                base_files: vec![FileView {
                    path: file.to_string(),
                    keys,
                }],
                diff: kairos_predict::DiffSummary {
                    files_changed: 1,
                    keys_changed: 1,
                    ..Default::default()
                },
                dependents: vec![
                    if file.starts_with("postfix") {
                        "master"
                    } else {
                        "beam.smp"
                    }
                    .to_string(),
                ],
                trend: None,
            }
        })
        .collect()
}
