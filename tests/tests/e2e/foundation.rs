//! End-to-end tests of the foundation: capture, history, show, cat, diff, restore and
//! verify through the real `kairos` binary, on real directories and processes.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use kairos_tests::{Kairos, bytes, frames, free_port, tree_listing};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(root: &Path, path: &str, content: &[u8]) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(full, content).unwrap();
}

/// A service directory: config in several formats, many small files, a large binary file.
fn sample_service(root: &Path) {
    write(
        root,
        "etc/app.toml",
        b"# the app\nport = 8080\n[db]\npool = 5\n",
    );
    write(
        root,
        "etc/redis.conf",
        b"port 6379\nsave 900 1\nappendonly no\n",
    );
    write(
        root,
        "etc/settings.json",
        br#"{"feature": {"beta": false}}"#,
    );
    write(root, "data/blob.bin", &bytes(1, 3 << 20));
    for index in 0..300 {
        write(
            root,
            &format!("data/records/r{index:03}.txt"),
            format!(
                "record {index}\nowner = team-{}\nstatus = active\n",
                index % 7
            )
            .as_bytes(),
        );
    }
    std::os::unix::fs::symlink("etc/app.toml", root.join("current.toml")).unwrap();
}

#[test]
fn tour_capture_history_show_cat_diff_restore_verify() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path();
    sample_service(root);
    let port = free_port();
    let marker = format!("kairos-tour-{port}");
    let server = Killed(
        Command::new("python3")
            .args(["-c", &format!("import http.server,sys\nhttp.server.HTTPServer(('127.0.0.1',{port}),http.server.SimpleHTTPRequestHandler).serve_forever()"), &marker])
            .current_dir(root)
            .spawn()
            .expect("python3 runs"),
    );
    let pattern = format!("*{marker}*");
    let added = kairos.run([
        "replica",
        "add",
        "web",
        "--root",
        root.to_str().unwrap(),
        "--process",
        &pattern,
        "--exclude",
        "*.log",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let replicas = kairos.json(["replica", "list", "--json"]);
    assert_eq!(replicas[0]["name"], "web");
    assert_eq!(replicas[0]["processes"][0], pattern.as_str());

    // Wait for the server to listen so the first frame records its port.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = kairos.json(["capture", "web", "--json"]);
    assert_eq!(first["entries"], 308);
    assert!(
        first["time"].as_str().unwrap().contains('.'),
        "sub-second precision"
    );
    let before = tree_listing(root);

    std::thread::sleep(Duration::from_millis(1100));
    write(
        root,
        "etc/app.toml",
        b"# the app\nport = 9090\n[db]\npool = 5\n",
    );
    std::fs::remove_file(root.join("etc/settings.json")).unwrap();
    write(root, "data/new.txt", b"new\n");
    write(root, "debug.log", b"excluded\n");
    let second = kairos.json(["capture", "web", "--json"]);
    assert_eq!(second["parent"], first["frame"]);
    assert_eq!(
        second["files_read"], 2,
        "only the changed files are read again: {second}"
    );

    let history = kairos.json(["history", "web", "--json"]);
    assert_eq!(
        frames(&history),
        [
            first["frame"].as_str().unwrap(),
            second["frame"].as_str().unwrap()
        ]
    );

    let show = kairos.json([
        "show",
        "web",
        "--at",
        &first["frame"].as_str().unwrap()[..10],
        "--json",
    ]);
    let paths: Vec<&str> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"etc/settings.json") && !paths.contains(&"debug.log"));
    let link = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "current.toml")
        .unwrap();
    assert_eq!(link["kind"], "symlink");
    assert_eq!(link["target"], "etc/app.toml");
    let keys: Vec<(String, String)> = show["config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                format!(
                    "{}:{}",
                    k["file"].as_str().unwrap(),
                    k["key"].as_str().unwrap()
                ),
                k["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        keys.contains(&("etc/app.toml:port".into(), "8080".into())),
        "{keys:?}"
    );
    assert!(keys.contains(&("etc/redis.conf:save".into(), "900 1".into())));
    assert!(keys.contains(&("etc/settings.json:feature.beta".into(), "false".into())));
    let process = &show["processes"][0];
    assert_eq!(process["pid"], server.0.id());
    assert!(
        process["listening"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == &format!("tcp/127.0.0.1:{port}")),
        "{process}"
    );
    assert!(show["metrics"]["memory_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(show["metrics"]["files"], 304);

    // cat at an id prefix, an instant and an age.
    let old = kairos.ok([
        "cat",
        "web",
        "etc/app.toml",
        "--at",
        &first["frame"].as_str().unwrap()[..8],
    ]);
    assert_eq!(old, b"# the app\nport = 8080\n[db]\npool = 5\n");
    let at_first = first["time"].as_str().unwrap();
    assert_eq!(
        kairos.ok(["cat", "web", "current.toml", "--at", at_first]),
        old
    );
    assert_eq!(
        kairos.ok(["cat", "web", "data/blob.bin"]),
        bytes(1, 3 << 20)
    );
    assert_eq!(
        kairos.ok(["cat", "web", "etc/app.toml"]),
        b"# the app\nport = 9090\n[db]\npool = 5\n"
    );

    let diff = kairos.json(["diff", "web", "--from", at_first, "--json"]);
    let changes: Vec<(String, String)> = diff["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["change"].as_str().unwrap().into(),
                c["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("added".to_string(), "data/new.txt".to_string()),
            ("modified".into(), "etc/app.toml".into()),
            ("removed".into(), "etc/settings.json".into()),
        ]
    );
    let config = diff["config"].as_array().unwrap();
    assert!(
        config
            .iter()
            .any(|c| c["key"] == "port" && c["from"] == "8080" && c["to"] == "9090"),
        "{config:?}"
    );
    assert!(
        config
            .iter()
            .any(|c| c["key"] == "feature.beta" && c["to"].is_null())
    );
    let text = String::from_utf8(kairos.ok(["diff", "web", "--from", at_first])).unwrap();
    assert!(
        text.contains("config etc/app.toml: port: 8080 -> 9090"),
        "{text}"
    );

    let restored = tempfile::tempdir().unwrap();
    let into = restored.path().join("web");
    kairos.ok([
        "restore",
        "web",
        "--at",
        at_first,
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(
        tree_listing(&into),
        before,
        "the restored tree equals the first frame"
    );

    let verify = kairos.json(["verify", "--json"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["frames"], 2);
}

#[test]
fn odd_entries_are_recorded_and_restored_without_escaping() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path();
    std::fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")),
        b"latin-1 name",
    )
    .unwrap();
    std::os::unix::fs::symlink("../../../../etc/passwd", root.join("escape")).unwrap();
    std::os::unix::fs::symlink("loop-b", root.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", root.join("loop-b")).unwrap();
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: the path is a NUL-terminated CString that lives until the call returns.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::create_dir(root.join("locked")).unwrap();
    std::fs::write(root.join("locked/inside"), b"x").unwrap();
    std::fs::set_permissions(
        root.join("locked"),
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .unwrap();

    kairos.ok(["replica", "add", "odd", "--root", root.to_str().unwrap()]);
    kairos.ok(["capture", "odd"]);
    let show = kairos.json(["show", "odd", "--json"]);
    let kinds: Vec<(String, String)> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("caf\\xe9.txt".into(), "file".into())),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("pipe".into(), "fifo".into())));
    assert!(kinds.contains(&("escape".into(), "symlink".into())));

    assert!(
        kairos
            .fails(["cat", "odd", "escape"])
            .contains("escapes the replica root")
    );
    assert!(
        kairos
            .fails(["cat", "odd", "loop-a"])
            .contains("symlinks followed")
    );
    assert_eq!(
        kairos.ok(["cat", "odd", std::str::from_utf8(b"empty").unwrap()]),
        b""
    );

    let restored = tempfile::tempdir().unwrap();
    let into = restored.path().join("odd");
    kairos.ok([
        "restore",
        "odd",
        "--at",
        "latest",
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(tree_listing(&into), tree_listing(root));
    std::fs::set_permissions(
        root.join("locked"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        into.join("locked"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
}

#[test]
fn bad_input_gets_clear_errors_and_nothing_is_lost() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("svc");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.txt"), b"a").unwrap();
    let root_text = root.to_str().unwrap();

    assert!(
        kairos
            .fails(["capture", "nope"])
            .contains("unknown replica \"nope\"")
    );
    assert!(
        kairos
            .fails(["replica", "add", "web", "--root", "/does/not/exist"])
            .contains("/does/not/exist")
    );
    assert!(
        kairos
            .fails(["replica", "add", "../x", "--root", root_text])
            .contains("replica name \"../x\" is invalid")
    );
    assert!(
        kairos
            .fails([
                "replica",
                "add",
                "web",
                "--root",
                root_text,
                "--capture-interval",
                "soon"
            ])
            .contains("capture interval \"soon\" is not a duration")
    );
    assert!(
        kairos
            .fails([
                "replica",
                "add",
                "web",
                "--root",
                root_text,
                "--exclude",
                "a[b"
            ])
            .contains("exclude glob \"a[b\"")
    );
    kairos.ok(["replica", "add", "web", "--root", root_text]);
    assert!(
        kairos
            .fails(["replica", "add", "web", "--root", root_text])
            .contains("already exists")
    );
    assert!(kairos.fails(["show", "web"]).contains("has no frames"));
    let first = kairos.json(["capture", "web", "--json"]);

    assert!(
        kairos
            .fails(["show", "web", "--at", "yesterday"])
            .contains("\"yesterday\" is not a frame spec")
    );
    assert!(
        kairos
            .fails(["show", "web", "--at", "-3 fortnights"])
            .contains("is not an age")
    );
    assert!(
        kairos
            .fails(["show", "web", "--at", "2001-01-01T00:00:00Z"])
            .contains("no frame at or before")
    );
    assert!(
        kairos
            .fails(["show", "web", "--at", "ffffffffff"])
            .contains("no frame id starts with")
    );
    assert!(
        kairos
            .fails(["cat", "web", "missing.txt"])
            .contains("no entry at \"missing.txt\"")
    );
    assert!(
        kairos
            .fails(["cat", "web", "../../etc/passwd"])
            .contains("escapes the replica root")
    );

    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("keep"), b"precious").unwrap();
    let target_text = target.path().to_str().unwrap();
    assert!(
        kairos
            .fails(["restore", "web", "--at", "latest", "--into", target_text])
            .contains("is not empty (use --force")
    );
    assert_eq!(
        std::fs::read(target.path().join("keep")).unwrap(),
        b"precious"
    );
    kairos.ok([
        "restore",
        "web",
        "--at",
        "latest",
        "--into",
        target_text,
        "--force",
    ]);
    assert_eq!(
        tree_listing(target.path()),
        tree_listing(&root),
        "--force makes the target equal the frame"
    );

    std::fs::remove_dir_all(&root).unwrap();
    assert!(
        kairos
            .fails(["capture", "web"])
            .contains(&format!("root {root_text} is not readable"))
    );
    // The frame captured before the root vanished is intact.
    assert_eq!(
        kairos.ok([
            "cat",
            "web",
            "a.txt",
            "--at",
            first["frame"].as_str().unwrap()
        ]),
        b"a"
    );
    assert_eq!(kairos.json(["verify", "--json"])["ok"], true);
}

#[test]
fn corruption_is_reported_never_trusted() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    std::fs::write(service.path().join("data.txt"), b"the original content").unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        service.path().to_str().unwrap(),
    ]);
    kairos.ok(["capture", "web"]);

    // Damage the stored blob of data.txt where it lies in its segment, through the
    // store's own key-value interface (as a bad disk sector would).
    {
        let store = kairos_store::Store::open(kairos.data_dir()).unwrap();
        let blob = kairos_store::object::object_hash(
            kairos_store::ObjectKind::Blob,
            b"the original content",
        );
        let reader = store.reader().unwrap();
        let index = reader
            .get(&kairos_store::keys::object(&blob))
            .unwrap()
            .expect("the blob is indexed");
        let part = kairos_store::pack::decode_index(&index).unwrap()[0];
        let key = kairos_store::keys::segment(&part.segment);
        let mut segment = reader.get(&key).unwrap().expect("its segment is stored");
        segment[(part.offset + part.len - 1) as usize] ^= 0x01;
        drop(reader);
        let mut batch = kairos_store::kv::WriteBatch::new();
        batch.put(key, segment).unwrap();
        store.kv().commit(batch).unwrap();
    }
    let error = kairos.fails(["cat", "web", "data.txt"]);
    assert!(
        error.contains("object") && error.contains("does not match its hash"),
        "{error}"
    );
    let output = kairos.run(["verify", "--json"]);
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(
        report["problems"][0]
            .as_str()
            .unwrap()
            .contains("does not match its hash"),
        "{report}"
    );

    // A truncated store file is an error naming the store, not a panic.
    let file = kairos.data_dir().join("kairos.redb");
    let length = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(length / 3)
        .unwrap();
    let error = kairos.fails(["history", "web"]);
    assert!(error.contains("kairos.redb"), "{error}");
}

#[test]
fn kill_9_during_capture_leaves_whole_frames_only() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path();
    for index in 0..40 {
        write(
            root,
            &format!("d{}/f{index}.bin", index % 4),
            &bytes(index, 600_000 + index as usize * 997),
        );
    }
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    let mut completed = 0;
    for round in 0..8u64 {
        // Each round changes the tree so the capture has real work to do.
        write(
            root,
            &format!("round{round}.bin"),
            &bytes(100 + round, 4 << 20),
        );
        let mut child = kairos
            .command(["capture", "web"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + round * 37));
        // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
        }
        let verify = kairos.json(["verify", "--json"]);
        assert_eq!(verify["ok"], true, "round {round}: {verify}");
    }
    let history = kairos.json(["history", "web", "--json"]);
    assert!(frames(&history).len() >= completed);
    kairos.ok(["capture", "web"]);
    let restored = tempfile::tempdir().unwrap();
    let into = restored.path().join("r");
    kairos.ok([
        "restore",
        "web",
        "--at",
        "latest",
        "--into",
        into.to_str().unwrap(),
    ]);
    assert_eq!(tree_listing(&into), tree_listing(root));
}

#[test]
fn a_file_rewritten_during_capture_is_stored_whole_or_marked_torn() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path().to_path_buf();
    // Many files so the capture takes a while, and one that keeps changing size in place.
    for index in 0..200 {
        write(&root, &format!("f{index:03}.bin"), &bytes(index, 200_000));
    }
    let version = |n: usize| format!("version {n}\n").repeat(1 + n % 5000);
    write(&root, "busy.txt", version(0).as_bytes());
    kairos.ok(["replica", "add", "busy", "--root", root.to_str().unwrap()]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = root.join("busy.txt");
        std::thread::spawn(move || {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap();
                file.write_all(version(n).as_bytes()).unwrap();
                n += 1;
            }
        })
    };
    let mut saw_torn = false;
    for _ in 0..5 {
        let capture = kairos.json(["capture", "busy", "--json"]);
        let content = kairos.ok([
            "cat",
            "busy",
            "busy.txt",
            "--at",
            capture["frame"].as_str().unwrap(),
        ]);
        let torn = capture["torn"].as_u64().unwrap() > 0;
        if torn {
            saw_torn = true;
            let notes = capture["notes"].as_array().unwrap();
            assert!(
                notes.iter().any(|n| n["path"] == "busy.txt"
                    && n["message"].as_str().unwrap().starts_with("torn")),
                "{capture}"
            );
        } else {
            // Not torn: the stored content is exactly one state the file was in: a whole
            // version, or empty (between the writer's truncate and its write).
            let text = String::from_utf8(content).unwrap();
            if text.is_empty() {
                continue;
            }
            let first = text.lines().next().unwrap_or_default().to_string();
            let n: usize = first.trim_start_matches("version ").parse().unwrap();
            assert_eq!(
                text,
                version(n),
                "a capture not marked torn holds a whole version"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!("torn seen: {saw_torn}");
    assert_eq!(kairos.json(["verify", "--json"])["ok"], true);
}

#[test]
fn the_store_backend_comes_from_the_configuration_and_a_missing_one_is_named() {
    let kairos = Kairos::new();
    let config = kairos.data_dir().join("kairos.toml");
    let config_flag = config.to_str().unwrap();

    // This build has no FoundationDB backend: the error names the feature to build with,
    // and nothing is created in the data directory.
    std::fs::write(&config, "[store]\nbackend = \"foundationdb\"\n").unwrap();
    let error = kairos.fails(["--config", config_flag, "history", "web"]);
    assert!(
        error.contains("not in this build") && error.contains("--features foundationdb"),
        "{error}"
    );
    assert!(!kairos.data_dir().join("kairos.redb").exists());

    std::fs::write(&config, "[store]\nbackend = \"rocksdb\"\n").unwrap();
    let error = kairos.fails(["--config", config_flag, "history", "web"]);
    assert!(
        error.contains("store.backend") && error.contains("choose \"redb\" or \"foundationdb\""),
        "{error}"
    );

    // "redb" is the embedded store in the data directory, as without a [store] table.
    std::fs::write(&config, "[store]\nbackend = \"redb\"\n").unwrap();
    let root = kairos.data_dir().join("srv");
    write(&root, "index.html", b"hello");
    kairos.ok([
        "--config",
        config_flag,
        "replica",
        "add",
        "web",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(kairos.data_dir().join("kairos.redb").exists());
}
