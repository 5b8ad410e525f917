//! Running the replica's declared commands (checks, after_commit, actions, probe
//! commands): `sh -c` in its own process group, with a timeout that kills the whole group,
//! bounded output, and the peak memory the kernel accounted to the command.

use std::io::{Read, Seek};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant as Clock};

use serde::{Deserialize, Serialize};

/// What a command really did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub command: String,
    /// The exit code; absent when the command was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub passed: bool,
    /// Standard output and error, interleaved, cut at the output limit.
    pub output: String,
    pub output_truncated: bool,
    pub duration_ms: u64,
    /// Peak resident memory of the command (its largest process), in bytes.
    pub peak_memory_bytes: u64,
}

/// How long to wait between polls of a running command.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Replaces `{root}` with `root` (quoted for the shell).
pub fn expand(template: &str, root: &Path) -> String {
    let quoted = format!("'{}'", root.display().to_string().replace('\'', "'\\''"));
    template.replace("{root}", &quoted)
}

/// The environment variable that marks every process a command starts.
const MARKER_VARIABLE: &str = "KAIROS_COMMAND_ID";
/// Sweeps of /proc for marked processes after a command (each may find ones the previous
/// one's victims forked meanwhile).
const SWEEP_ROUNDS_MAX: usize = 8;

/// A marker no other command on this host carries.
fn new_marker() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{count}", std::process::id())
}

/// Kills every process whose environment carries `marker`: what a command started,
/// including what left its process group (`setsid`, double forks). Returns how many.
fn kill_marked(marker: &str) -> usize {
    let needle = format!("{MARKER_VARIABLE}={marker}\0").into_bytes();
    let mut killed = 0;
    for _ in 0..SWEEP_ROUNDS_MAX {
        let mut found = 0;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return killed;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let Ok(environment) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environment
                .windows(needle.len())
                .any(|window| window == needle.as_slice())
            {
                // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                found += 1;
            }
        }
        killed += found;
        if found == 0 {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    killed
}

/// Runs `command` with `sh -c` in `dir`. When `kill_group_after` is set, processes the
/// command left behind are killed when it exits — its process group, and every process
/// carrying its environment marker, so one that called `setsid` does not outlive it
/// (checks must not leave daemons behind; after_commit and actions may start them).
pub fn run(
    command: &str,
    dir: &Path,
    timeout: Duration,
    output_bytes_max: usize,
    kill_group_after: bool,
) -> std::io::Result<CommandOutcome> {
    let started = Clock::now();
    let mut output_file = tempfile::tempfile()?;
    let marker = new_marker();
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env(MARKER_VARIABLE, &marker)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(output_file.try_clone()?)
        .stderr(output_file.try_clone()?)
        .process_group(0)
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers and timevals, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut timed_out = false;
    loop {
        // SAFETY: wait4 on our own child with valid pointers; WNOHANG never blocks.
        let waited = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if waited == pid {
            break;
        }
        if waited < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // SAFETY: signalling the process group we created for the command.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            // SAFETY: status and usage are live, exclusively borrowed locals of the right C types; pid names our own child.
            let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if waited < 0 {
                return Err(std::io::Error::last_os_error());
            }
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    if kill_group_after || timed_out {
        // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        kill_marked(&marker);
    }
    drop(child);
    let duration_ms = started.elapsed().as_millis() as u64;
    let (exit_code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    output_file.rewind()?;
    let mut bytes = Vec::new();
    (&mut output_file)
        .take(output_bytes_max as u64 + 1)
        .read_to_end(&mut bytes)?;
    let output_truncated = bytes.len() > output_bytes_max;
    bytes.truncate(output_bytes_max);
    let mut output = String::from_utf8_lossy(&bytes).into_owned();
    if timed_out {
        output.push_str(&format!(
            "\n[kairos: killed after the timeout of {} ms]",
            timeout.as_millis()
        ));
    }
    Ok(CommandOutcome {
        command: command.to_string(),
        exit_code,
        signal,
        timed_out,
        passed: exit_code == Some(0) && !timed_out,
        output,
        output_truncated,
        duration_ms,
        peak_memory_bytes: (usage.ru_maxrss.max(0) as u64) * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_output_and_memory_are_observed() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = run(
            "echo out; echo err >&2; exit 3",
            dir.path(),
            Duration::from_secs(10),
            1024,
            true,
        )
        .unwrap();
        assert_eq!(outcome.exit_code, Some(3));
        assert!(!outcome.passed);
        assert!(outcome.output.contains("out") && outcome.output.contains("err"));
        assert!(outcome.peak_memory_bytes > 0);
        let outcome = run(
            "head -c 5000 /dev/zero | tr '\\0' x",
            dir.path(),
            Duration::from_secs(10),
            100,
            true,
        )
        .unwrap();
        assert!(outcome.passed);
        assert_eq!(outcome.output.len(), 100);
        assert!(outcome.output_truncated);
    }

    #[test]
    fn a_hanging_command_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child.pid");
        let command = format!("sleep 300 & echo $! > {}; wait", marker.display());
        let outcome = run(
            &command,
            dir.path(),
            Duration::from_millis(300),
            1024,
            false,
        )
        .unwrap();
        assert!(outcome.timed_out);
        assert!(!outcome.passed);
        assert!(outcome.duration_ms < 5_000);
        let child: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // The backgrounded sleep was in the group and is gone (or a zombie of init).
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "child still alive: {state}"
        );
    }

    #[test]
    fn a_process_that_leaves_the_group_does_not_outlive_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("escaped.pid");
        // `setsid` puts the sleep in a session (and group) of its own; the check waits
        // until it has left, then exits.
        let command = format!(
            "setsid sh -c 'echo $$ > {0}; exec sleep 300' & while [ ! -s {0} ]; do sleep 0.01; done; exit 0",
            marker.display()
        );
        let outcome = run(&command, dir.path(), Duration::from_secs(10), 1024, true).unwrap();
        assert!(outcome.passed);
        let escaped: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut state = String::new();
        for _ in 0..50 {
            state = std::fs::read_to_string(format!("/proc/{escaped}/stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            state.is_empty() || state.contains(") Z"),
            "the escaped process is still alive: {state}"
        );
    }

    #[test]
    fn root_is_quoted_for_the_shell() {
        assert_eq!(
            expand("nginx -t -p {root}", Path::new("/tmp/a b")),
            "nginx -t -p '/tmp/a b'"
        );
    }
}
