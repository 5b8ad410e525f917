//! Shared helpers of the end-to-end tests: run the real `kairos` binary against a
//! temporary data directory, build sample trees, compare directories.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub mod proxy;
/// The `kairos` binary built from this workspace (`KAIROS_BIN` overrides).
pub mod services;

pub fn kairos_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KAIROS_BIN") {
        return PathBuf::from(path);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("..").join("target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = target.join(profile).join("kairos");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p kairos-cli` (the test command does)",
        path.display()
    );
    path
}

/// A store in a temporary data directory, driven through the `kairos` binary.
pub struct Kairos {
    data_dir: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

impl Default for Kairos {
    fn default() -> Self {
        Self::new()
    }
}

impl Kairos {
    pub fn new() -> Kairos {
        let temporary = tempfile::tempdir().expect("temporary data directory");
        Kairos {
            data_dir: temporary.path().to_path_buf(),
            _temporary: Some(temporary),
        }
    }

    /// A runner on an existing data directory.
    pub fn at(data_dir: &Path) -> Kairos {
        Kairos {
            data_dir: data_dir.to_path_buf(),
            _temporary: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The pack files holding the store's segments (beside `kairos.redb`), in name order.
    pub fn pack_files(&self) -> Vec<PathBuf> {
        pack_files(&self.data_dir)
    }

    /// Bytes the embedded store occupies: its file and its pack files.
    pub fn store_bytes(&self) -> u64 {
        let file = std::fs::metadata(self.data_dir.join("kairos.redb")).map_or(0, |m| m.len());
        file + self
            .pack_files()
            .iter()
            .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
            .sum::<u64>()
    }

    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(kairos_bin());
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .env_remove("KAIROS_DATA_DIR");
        command
    }

    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(args).output().expect("running kairos")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.run(&args);
        assert!(
            output.status.success(),
            "kairos {:?} failed: {}",
            args,
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Registers replica `name` at `root` with captures only when asked (an interval of an
    /// hour: no interval capture happens during a test).
    pub fn add_idle_replica(&self, name: &str, root: &Path) {
        self.ok([
            "replica".as_ref(),
            "add".as_ref(),
            OsStr::new(name),
            "--root".as_ref(),
            root.as_os_str(),
            "--capture-interval".as_ref(),
            "1h".as_ref(),
        ]);
    }

    pub fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stdout = self.ok(args);
        serde_json::from_slice(&stdout).expect("kairos printed JSON")
    }

    /// Waits (up to 30 s) until `replica` has a frame on `main` (a node's first capture).
    pub fn wait_for_first_frame(&self, replica: &str) {
        wait_for("a first frame", std::time::Duration::from_secs(30), || {
            let history = self.json(["history", replica, "--json"]);
            (!history.as_array().unwrap().is_empty()).then_some(())
        });
    }

    /// Runs and expects failure; returns the one-line error.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.run(&args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            !output.status.success(),
            "kairos {args:?} succeeded unexpectedly"
        );
        assert_ne!(
            output.status.code(),
            Some(101),
            "kairos {args:?} panicked: {stderr}"
        );
        assert!(
            stderr.starts_with("kairos: error: ") && stderr.trim_end().lines().count() == 1,
            "kairos {args:?} did not print a one-line error: {stderr:?}"
        );
        stderr.trim_end().to_string()
    }
}

/// What a directory tree holds: path -> (kind, mode, content or link target).
pub fn tree_listing(root: &Path) -> BTreeMap<Vec<u8>, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    list_into(root, root, &mut out);
    out
}

fn list_into(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, (char, u32, Vec<u8>)>) {
    for item in std::fs::read_dir(dir).expect("readable directory") {
        let item = item.expect("directory entry");
        let path = item.path();
        let relative = path
            .strip_prefix(root)
            .expect("under root")
            .as_os_str()
            .as_bytes()
            .to_vec();
        let metadata = std::fs::symlink_metadata(&path).expect("metadata");
        let mode = metadata.mode() & 0o7777;
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            out.insert(relative, ('d', mode, Vec::new()));
            list_into(root, &path, out);
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&path).expect("link");
            out.insert(relative, ('l', 0, target.as_os_str().as_bytes().to_vec()));
        } else if file_type.is_file() {
            out.insert(
                relative,
                ('f', mode, std::fs::read(&path).expect("file content")),
            );
        } else {
            out.insert(relative, ('s', mode, Vec::new()));
        }
    }
}

/// Polls `probe` every 20 ms until it answers, failing the test after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Deterministic bytes for test files.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0; len];
    rng.fill_bytes(&mut out);
    out
}

pub fn frames(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|frame| frame["frame"].as_str().expect("frame id").to_string())
        .collect()
}

/// A `kairos up` process on a free port, stopped (SIGTERM) when dropped.
pub struct Node {
    pub child: std::process::Child,
    pub url: String,
    pub data_dir: PathBuf,
    /// Lines the node printed on stderr, collected by a background thread.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Node {
    /// Starts a node with `config` (TOML text, written beside `data_dir`).
    pub fn start(config: &str, data_dir: &Path) -> Node {
        Node::start_with_env(config, data_dir, &[])
    }

    /// [`Node::start`] with these environment variables set for the node.
    pub fn start_with_env(config: &str, data_dir: &Path, env: &[(&str, &str)]) -> Node {
        Node::start_on(config, data_dir, env, "127.0.0.1:0")
    }

    /// [`Node::start_with_env`] listening on `listen` (an address a configuration names).
    pub fn start_on(config: &str, data_dir: &Path, env: &[(&str, &str)], listen: &str) -> Node {
        use std::io::BufRead;
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, config).expect("config written");
        let mut child = Command::new(kairos_bin())
            .args(["up", "--config"])
            .arg(&config_path)
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env_remove("KAIROS_DATA_DIR")
            .env_remove("KAIROS_NODE")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kairos up starts");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let collected = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                collected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line);
            }
        });
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("the node prints its address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; log: {:?}",
                    log.lock().unwrap()
                )
            })
            .to_string();
        Node {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    /// Sends SIGTERM and waits; returns whether the node exited successfully.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child
            .wait()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    pub fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// The pack files of the store in `data_dir` (every `kairos.packs-*` directory), in name
/// order.
pub fn pack_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let is_packs = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("kairos.packs-"));
        if is_packs {
            for pack in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(pack.path());
            }
        }
    }
    out.sort();
    out
}
