//! Process source: the processes a replica's selectors match, read from /proc, with their
//! memory, CPU time and listening sockets.

use std::collections::HashMap;

use kairos_core::Instant;
pub use kairos_replica::selector::{Selector, SelectorError};
use kairos_store::node::{ListeningSocket, ProcessEntry};

/// What the previous frame knew of a process, to turn CPU time into a rate.
#[derive(Debug, Clone, Copy)]
pub struct PreviousSample {
    pub cpu_time_ms: u64,
    pub at: Instant,
}

/// Reads every process matched by `selectors` (never this process itself).
/// `previous` maps (pid, start time) to the last frame's sample.
pub fn sample(
    selectors: &[Selector],
    previous: &HashMap<(u32, i64), PreviousSample>,
    now: Instant,
) -> Vec<ProcessEntry> {
    if selectors.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let ticks = procfs::ticks_per_second().max(1);
    let page_bytes = procfs::page_size();
    let boot_ns = procfs::boot_time_secs().unwrap_or(0) as i64 * 1_000_000_000;
    let own_pid = std::process::id() as i32;
    let mut sockets: Option<HashMap<u64, ListeningSocket>> = None;
    let mut out = Vec::new();
    for process in processes.flatten() {
        if process.pid == own_pid {
            continue;
        }
        let Ok(stat) = process.stat() else { continue };
        let cmdline = process.cmdline().unwrap_or_default();
        let Some(selector) = selectors.iter().find(|s| s.matches(&stat.comm, &cmdline)) else {
            continue;
        };
        let start_time_ns =
            boot_ns + (stat.starttime as i64).saturating_mul(1_000_000_000) / ticks as i64;
        let cpu_time_ms = (stat.utime + stat.stime) * 1000 / ticks;
        let pid = process.pid as u32;
        let cpu_percent = match previous.get(&(pid, start_time_ns)) {
            Some(before) if now > before.at => {
                let elapsed_ms = now.nanos_since(before.at) as f64 / 1e6;
                cpu_time_ms.saturating_sub(before.cpu_time_ms) as f64 / elapsed_ms * 100.0
            }
            _ => {
                let elapsed_ms = now.nanos_since(Instant(start_time_ns)) as f64 / 1e6;
                if elapsed_ms > 0.0 {
                    cpu_time_ms as f64 / elapsed_ms * 100.0
                } else {
                    0.0
                }
            }
        };
        let table = sockets.get_or_insert_with(listening_sockets);
        let mut listening: Vec<ListeningSocket> = process
            .fd()
            .map(|fds| {
                fds.flatten()
                    .filter_map(|fd| match fd.target {
                        procfs::process::FDTarget::Socket(inode) => table.get(&inode).cloned(),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        listening.sort_by(|a, b| {
            (a.port, &a.protocol, &a.address).cmp(&(b.port, &b.protocol, &b.address))
        });
        listening.dedup();
        out.push(ProcessEntry {
            pid,
            ppid: stat.ppid.max(0) as u32,
            name: stat.comm.clone(),
            cmdline,
            state: stat.state.to_string(),
            start_time_ns,
            rss_bytes: stat.rss * page_bytes,
            cpu_time_ms,
            cpu_percent: (cpu_percent * 100.0).round() / 100.0,
            threads: stat.num_threads.max(0) as u32,
            listening,
            selector: selector.pattern().to_string(),
        });
    }
    out.sort_by_key(|process| (process.start_time_ns, process.pid));
    out
}

/// Listening TCP sockets and bound UDP sockets of this network namespace, by inode.
fn listening_sockets() -> HashMap<u64, ListeningSocket> {
    let mut out = HashMap::new();
    let tcp = [("tcp", procfs::net::tcp()), ("tcp6", procfs::net::tcp6())];
    for (protocol, entries) in tcp {
        for entry in entries.into_iter().flatten() {
            if entry.state == procfs::net::TcpState::Listen {
                out.insert(entry.inode, socket(protocol, entry.local_address));
            }
        }
    }
    let udp = [("udp", procfs::net::udp()), ("udp6", procfs::net::udp6())];
    for (protocol, entries) in udp {
        for entry in entries.into_iter().flatten() {
            if entry.remote_address.port() == 0 {
                out.insert(entry.inode, socket(protocol, entry.local_address));
            }
        }
    }
    out
}

fn socket(protocol: &str, address: std::net::SocketAddr) -> ListeningSocket {
    ListeningSocket {
        protocol: protocol.to_string(),
        address: address.ip().to_string(),
        port: address.port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_names_and_globs_match_command_lines() {
        let word = Selector::new("nginx").unwrap();
        assert!(word.matches("nginx", &["nginx: master process".into()]));
        assert!(word.matches("x", &["/usr/sbin/nginx".into(), "-g".into()]));
        assert!(!word.matches(
            "kairos",
            &["kairos".into(), "--process".into(), "nginx".into()]
        ));
        let glob = Selector::new("*http.server 8*").unwrap();
        assert!(glob.matches(
            "python3",
            &[
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                "8080".into()
            ]
        ));
        assert!(Selector::new("[").is_err());
    }

    #[test]
    fn samples_a_real_child_with_its_listening_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut child = std::process::Command::new("python3")
            .args(["-c", &format!("import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\ns.listen()\ntime.sleep(30)"), "kairos-test-marker"])
            .spawn()
            .unwrap();
        let selector = Selector::new("*kairos-test-marker*").unwrap();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = sample(
                std::slice::from_ref(&selector),
                &HashMap::new(),
                Instant::now(),
            );
            if found.iter().any(|p| !p.listening.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let process = found
            .iter()
            .find(|p| p.pid == child.id())
            .expect("the child is sampled");
        assert!(process.rss_bytes > 0);
        assert!(
            process
                .listening
                .iter()
                .any(|s| s.port == port && s.protocol == "tcp")
        );
    }
}
