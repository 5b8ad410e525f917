//! Real services for the change tests: nginx, Redis and PostgreSQL from Debian's packages,
//! each started on a free loopback port with everything under a temporary directory, and
//! stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::free_port;

/// The path of a service binary: on PATH or in /usr/sbin. Panics with the package to
/// install when missing (`scripts/test` installs them).
pub fn binary(name: &str, package: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(Path::new("/usr/sbin").join(name));
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: install the Debian package {package} (scripts/test does)")
        })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// An HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    match agent.get(format!("http://127.0.0.1:{port}{path}")).call() {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// nginx serving `root/html` on a free port, configured by `root/nginx.conf`.
pub struct Nginx {
    pub root: PathBuf,
    pub port: u16,
    pub binary: PathBuf,
    /// Pid file and temp paths, outside the replica root.
    pub run_dir: PathBuf,
}

impl Nginx {
    /// The nginx.conf for this instance; `health` is the body of `location /health`.
    pub fn config(&self, health: &str) -> String {
        let run = self.run_dir.display();
        let user = if is_root() { "user root;\n" } else { "" };
        format!(
            "{user}worker_processes 1;\npid {run}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 64; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {run}/client_body;\n    proxy_temp_path {run}/proxy;\n    fastcgi_temp_path {run}/fastcgi;\n    uwsgi_temp_path {run}/uwsgi;\n    scgi_temp_path {run}/scgi;\n    server {{\n        listen 127.0.0.1:{port};\n        root html;\n        location /health {{ {health} }}\n    }}\n}}\n",
            port = self.port
        )
    }

    pub fn start(root: &Path, run_dir: &Path) -> Nginx {
        let nginx = Nginx {
            root: root.to_path_buf(),
            port: free_port(),
            binary: binary("nginx", "nginx-light"),
            run_dir: run_dir.to_path_buf(),
        };
        std::fs::create_dir_all(root.join("html")).unwrap();
        std::fs::create_dir_all(run_dir).unwrap();
        std::fs::write(root.join("html/index.html"), "version 1\n").unwrap();
        std::fs::write(root.join("nginx.conf"), nginx.config("return 200 'ok';")).unwrap();
        let status = Command::new(&nginx.binary)
            .arg("-p")
            .arg(root)
            .arg("-c")
            .arg(root.join("nginx.conf"))
            .status()
            .expect("nginx runs");
        assert!(status.success(), "nginx did not start");
        wait_until("nginx", Duration::from_secs(10), || port_open(nginx.port));
        nginx
    }

    /// `nginx -t` on a root, as the sandbox check runs it.
    pub fn check_command(&self) -> String {
        format!(
            "{} -t -p {{root}} -c {{root}}/nginx.conf",
            self.binary.display()
        )
    }

    pub fn reload_command(&self) -> String {
        format!(
            "{} -s reload -p {{root}} -c {{root}}/nginx.conf && sleep 0.3",
            self.binary.display()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new(&self.binary)
            .arg("-p")
            .arg(&self.root)
            .arg("-c")
            .arg(self.root.join("nginx.conf"))
            .args(["-s", "stop"])
            .output();
        if let Some(pid) = std::fs::read_to_string(self.run_dir.join("nginx.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// redis-server configured by `root/redis.conf`, daemonized with a pid file.
pub struct Redis {
    pub root: PathBuf,
    pub port: u16,
    pub pid_file: PathBuf,
    pub server: PathBuf,
    pub cli: PathBuf,
}

impl Redis {
    pub fn start(root: &Path, run_dir: &Path) -> Redis {
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(run_dir).unwrap();
        let redis = Redis {
            root: root.to_path_buf(),
            port: free_port(),
            pid_file: run_dir.join("redis.pid"),
            server: binary("redis-server", "redis-server"),
            cli: binary("redis-cli", "redis-tools"),
        };
        std::fs::write(
            root.join("redis.conf"),
            format!(
                "# Kairos test instance\nbind 127.0.0.1\nport {}\ndir {}\nsave \"\"\nappendonly no\n# memory\nmaxmemory 64mb\nmaxmemory-policy noeviction\n",
                redis.port,
                root.join("data").display()
            ),
        )
        .unwrap();
        let status = Command::new("sh")
            .arg("-c")
            .arg(
                redis
                    .restart_command()
                    .replace("{root}", &root.display().to_string()),
            )
            .status()
            .unwrap();
        assert!(status.success(), "redis did not start");
        wait_until("redis", Duration::from_secs(10), || port_open(redis.port));
        redis
    }

    /// Stops the running instance (by pid file) and starts one with `{root}/redis.conf`.
    pub fn restart_command(&self) -> String {
        let pid = self.pid_file.display();
        format!(
            "if [ -f {pid} ]; then p=$(cat {pid}); kill $p 2>/dev/null; while kill -0 $p 2>/dev/null; do sleep 0.02; done; fi; {} {{root}}/redis.conf --daemonize yes --pidfile {pid}; sleep 0.2",
            self.server.display()
        )
    }

    /// The sandbox check: Redis refuses a bad config at once (FATAL CONFIG FILE ERROR);
    /// one it accepts is still running after a second, on no port, and is stopped there.
    pub fn check_command(&self) -> String {
        format!(
            "timeout 1 {} {{root}}/redis.conf --port 0 --unixsocket {{root}}/check.sock --dir {{root}} --daemonize no --save ''; test $? -eq 124",
            self.server.display()
        )
    }

    pub fn ping_command(&self) -> String {
        format!(
            "{} -p {} ping | grep -q PONG",
            self.cli.display(),
            self.port
        )
    }

    pub fn config_get(&self, key: &str) -> String {
        let output = Command::new(&self.cli)
            .args(["-p", &self.port.to_string(), "config", "get", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A PostgreSQL cluster whose data directory is the replica root (run as the `postgres`
/// user when the tests run as root: PostgreSQL refuses to run as root).
pub struct Postgres {
    pub root: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pub log: PathBuf,
}

impl Postgres {
    fn as_owner(&self) -> String {
        if is_root() {
            "runuser -u postgres -- ".into()
        } else {
            String::new()
        }
    }

    pub fn start(root: &Path, run_dir: &Path) -> Postgres {
        // PostgreSQL's own directory holds every tool of one version.
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                let mut dirs: Vec<PathBuf> =
                    versions.flatten().map(|e| e.path().join("bin")).collect();
                dirs.sort();
                dirs.into_iter()
                    .rev()
                    .find(|dir| dir.join("initdb").is_file())
            })
            .unwrap_or_else(|| {
                binary("initdb", "postgresql")
                    .parent()
                    .unwrap()
                    .to_path_buf()
            });
        std::fs::create_dir_all(run_dir).unwrap();
        let postgres = Postgres {
            root: root.to_path_buf(),
            port: free_port(),
            bin,
            log: run_dir.join("postgres.log"),
        };
        if is_root() {
            // The postgres user must reach the directories.
            let mut dir = run_dir.to_path_buf();
            while dir != Path::new("/") && dir != std::env::temp_dir() {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
                if !dir.pop() {
                    break;
                }
            }
            std::fs::create_dir_all(root).unwrap();
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(run_dir)
                .arg(root)
                .status();
        }
        let owner = postgres.as_owner();
        let run = |command: String| {
            let output = Command::new("sh").arg("-c").arg(&command).output().unwrap();
            assert!(
                output.status.success(),
                "{command}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(format!(
            "{owner}{}/initdb -D {} -A trust -U postgres --no-sync",
            postgres.bin.display(),
            root.display()
        ));
        let mut conf = std::fs::read_to_string(root.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\n# Kairos test instance\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n",
            postgres.port,
            run_dir.display()
        ));
        std::fs::write(root.join("postgresql.conf"), conf).unwrap();
        run(format!(
            "{owner}{}/pg_ctl -D {} -l {} start -w -t 30",
            postgres.bin.display(),
            root.display(),
            postgres.log.display()
        ));
        postgres
    }

    pub fn check_command(&self) -> String {
        format!(
            "{}/postgres -C max_connections -D {{root}}",
            self.bin.display()
        )
    }

    pub fn restart_command(&self) -> String {
        format!(
            "{}{}/pg_ctl -D {{root}} -l {} restart -w -m fast -t 30",
            self.as_owner(),
            self.bin.display(),
            self.log.display()
        )
    }

    pub fn query_command(&self, sql: &str) -> String {
        format!(
            "{}/psql -h 127.0.0.1 -p {} -U postgres -tAc \"{sql}\"",
            self.bin.display(),
            self.port
        )
    }

    pub fn query(&self, sql: &str) -> Option<String> {
        let output = Command::new("sh")
            .arg("-c")
            .arg(self.query_command(sql))
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{}{}/pg_ctl -D {} stop -m immediate",
                self.as_owner(),
                self.bin.display(),
                self.root.display()
            ))
            .output();
    }
}

/// A nats-server (Debian's package) with JetStream on a free loopback port, its data and
/// configuration under `dir`; with `authorization`, the file a Kairos node writes is
/// included (it must exist before the server starts). Killed when dropped.
pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    pub pid_file: PathBuf,
    config: PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    pub fn start(dir: &Path, authorization: Option<&Path>) -> NatsServer {
        let mut server = NatsServer::prepare(dir, authorization);
        server.run();
        server
    }

    /// Chooses the port and writes the configuration without starting the server (a
    /// Kairos node configured with its URL can start first and write the authorization).
    pub fn prepare(dir: &Path, authorization: Option<&Path>) -> NatsServer {
        std::fs::create_dir_all(dir).expect("nats dir");
        let port = free_port();
        let pid_file = dir.join("nats.pid");
        let config = dir.join("nats.conf");
        let mut text = format!(
            "listen: 127.0.0.1:{port}\nserver_name: kairos_test\npid_file: {:?}\njetstream {{\n  store_dir: {:?}\n}}\n",
            pid_file.display().to_string(),
            dir.join("jetstream").display().to_string(),
        );
        if let Some(path) = authorization {
            // nats-server takes includes relative to the configuration file.
            let relative = path
                .strip_prefix(dir)
                .expect("the authorization file is in the server's directory");
            text.push_str(&format!("include {:?}\n", relative.display().to_string()));
        }
        std::fs::write(&config, text).expect("nats config");
        NatsServer {
            port,
            dir: dir.to_path_buf(),
            pid_file,
            config,
            child: None,
        }
    }

    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .expect("nats log");
        let child = Command::new(binary("nats-server", "nats-server"))
            .arg("-c")
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let port = self.port;
        let log_path = self.dir.join("nats.log");
        wait_until(
            &format!("nats-server (its log: {})", log_path.display()),
            Duration::from_secs(20),
            || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "nats-server exited ({status}): {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                port_open(port)
            },
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
