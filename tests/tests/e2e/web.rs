//! The web page in headless Chromium (Debian's `chromium`, driven by `playwright-core`
//! from npm: `tests/web/ui.mjs`) against a real node: sign-in, a timeline of 10 000 frames
//! and its scrubber, the state with binary, huge and markup-looking files, a diff, the
//! proposals, a what-if with both sides and its confidence, a staged commit, a stale page
//! refused, a rollback seen live, a viewer who cannot act. Screenshots of the main pages
//! are kept in `target/web-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use kairos_core::Instant;
use kairos_store::command::{Change, Command as CatalogCommand, FrameFields, apply};
use kairos_store::{SYSTEM_PARTY, Store};
use kairos_tests::{Kairos, Node};
use serde_json::{Value, json};

/// Frames the timeline test draws.
const FRAMES: usize = 10_000;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn propose(kairos: &Kairos, base: &Path, name: &str, document: Value, timeline: &str) -> String {
    let path = base.join(format!("{name}.json"));
    std::fs::write(&path, document.to_string()).unwrap();
    kairos.json([
        "propose",
        "web",
        "--file",
        path.to_str().unwrap(),
        "--timeline",
        timeline,
        "--json",
    ])["proposal"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_page_shows_timelines_states_and_what_ifs_and_acts_by_role() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("web");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("app.conf"),
        "port = 1\nbanner = <script>window.pwned=1</script>\n",
    )
    .unwrap();
    std::fs::write(root.join("<img src=x onerror=window.pwned=1>.txt"), "x").unwrap();
    std::fs::write(
        root.join("blob.bin"),
        (0..=255u8).cycle().take(4096).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(root.join("huge.log"), "a line of the log\n".repeat(40_000)).unwrap();
    let kairos = Kairos::at(&base.path().join("data"));
    let probe = format!(
        "command:grep -q '^port = [0-9]' {}",
        root.join("app.conf").display()
    );
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.to_str().unwrap(),
        "--check",
        "grep -q '^port = [0-9]' {root}/app.conf",
        "--probe",
        &probe,
        "--watch-window",
        "1s",
        "--probe-interval",
        "100ms",
        "--capture-interval",
        "1h",
    ]);
    kairos.ok(["capture", "web"]);
    // 10 000 frames of the same state, each a minute after the one before (a frame is never
    // older than its parent, so these run a week ahead of the clock; written without
    // waiting for the disk, the last one durably), then the change the scrubber finds at
    // the end.
    {
        let store = Store::open(kairos.data_dir()).unwrap();
        let head = store.head("web", "main").unwrap().unwrap();
        let started = std::time::Instant::now();
        for index in 1..FRAMES {
            let parent = store.head("web", "main").unwrap().unwrap().id;
            let command = CatalogCommand::new(
                Instant(head.time.0 + index as i64 * 60_000_000_000),
                "web",
                "main",
                SYSTEM_PARTY,
                Change::AppendFrame {
                    frame: FrameFields {
                        time: Instant(head.time.0 + index as i64 * 60_000_000_000),
                        parent: Some(parent),
                        root: head.root,
                        entries: head.entries,
                        bytes: head.bytes,
                        objects_new: 0,
                        bytes_new_stored: 0,
                        torn: 0,
                        unreadable: 0,
                        capture_ms: 1,
                    },
                },
            );
            let reader = store.reader().unwrap();
            let mut planned = apply(reader.snapshot(), &command).unwrap();
            drop(reader);
            planned.batch.durable = index + 1 == FRAMES;
            store.kv().commit(planned.batch).unwrap();
        }
        eprintln!("{} frames appended in {:?}", FRAMES - 1, started.elapsed());
    }
    std::fs::write(
        root.join("app.conf"),
        "port = 2\nbanner = <script>window.pwned=1</script>\n",
    )
    .unwrap();
    kairos.ok(["capture", "web"]);
    let admin = kairos.json(["party", "add", "root", "--role", "admin", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let viewer = kairos.json(["party", "add", "watcher", "--role", "viewer", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    kairos.ok([
        "timeline",
        "fork",
        "exp",
        "--replica",
        "web",
        "--at",
        "latest",
    ]);
    let proposal = propose(
        &kairos,
        base.path(),
        "both",
        json!({"title": "port 3 and a note", "ops": [
            {"op": "set_config", "file": "app.conf", "key": "port", "value": 3},
            {"op": "put_file", "path": "note.txt", "content": "<b>hello</b>"}
        ]}),
        "exp",
    );
    let bad = propose(
        &kairos,
        base.path(),
        "bad",
        json!({"title": "a port that is not one", "ops": [
            {"op": "set_config", "file": "app.conf", "key": "port", "value": "x"}
        ]}),
        "main",
    );
    let node = Node::start("[node]\ncapture_debounce = \"100ms\"\n", kairos.data_dir());

    let web = workspace().join("tests/web");
    assert!(
        web.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: `npm ci --prefix tests/web` (scripts/test runs it)"
    );
    let screenshots = workspace().join("target/web-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let output = Command::new("node")
        .arg(web.join("ui.mjs"))
        .env("KAIROS_URL", &node.url)
        .env("KAIROS_TOKEN", &admin)
        .env("KAIROS_VIEWER_TOKEN", &viewer)
        .env("KAIROS_PROPOSAL", &proposal)
        .env("KAIROS_BAD_PROPOSAL", &bad)
        .env("KAIROS_OUT", &screenshots)
        .env(
            "CHROMIUM",
            kairos_tests::services::binary("chromium", "chromium"),
        )
        .output()
        .expect("node runs the browser script (Debian's nodejs)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ui.mjs: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|error| panic!("ui.mjs printed no result ({error}): {stdout}"));
    assert!(seen["failure"].is_null(), "{:#}", seen);
    assert_eq!(seen["page_errors"], json!([]), "{seen:#}");

    assert!(
        seen["wrong_token"]
            .as_str()
            .unwrap()
            .contains("names no party"),
        "{seen:#}"
    );
    assert!(seen["replicas"].as_str().unwrap().contains("web"));
    // 10 000 frames and more drawn within 300 ms; scrubbing answers within 50 ms.
    assert!(seen["timeline"]["frames"].as_u64().unwrap() > FRAMES as u64);
    // Drawn across the whole lane, not piled at one end.
    let (first, last) = (
        seen["drawn"]["first"].as_f64().unwrap(),
        seen["drawn"]["last"].as_f64().unwrap(),
    );
    assert!(last - first > 500.0, "{seen:#}");
    assert!(seen["drawn"]["marks"].as_u64().unwrap() > 500);
    let render_ms = seen["timeline"]["render_ms"].as_f64().unwrap();
    assert!(render_ms <= 300.0, "timeline render {render_ms} ms");
    let mut scrubs: Vec<f64> = seen["scrub_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ms| ms.as_f64().unwrap())
        .collect();
    scrubs.sort_by(f64::total_cmp);
    let median = scrubs[scrubs.len() / 2];
    assert!(median <= 50.0, "scrubbing: {scrubs:?} ms");
    assert!(
        seen["first_config"].as_str().unwrap().contains("port1"),
        "{seen:#}"
    );
    assert!(
        seen["last_config"].as_str().unwrap().contains("port2"),
        "{seen:#}"
    );
    // Markup in names and values is shown as text, never run.
    assert!(
        seen["files"]
            .as_str()
            .unwrap()
            .contains("<img src=x onerror=window.pwned=1>.txt")
    );
    assert!(
        seen["last_config"]
            .as_str()
            .unwrap()
            .contains("<script>window.pwned=1</script>")
    );
    assert_eq!(seen["injected"], json!({"pwned": false, "images": 0}));
    assert!(seen["binary"].as_str().unwrap().contains("binary"));
    assert!(seen["truncated"].as_str().unwrap().contains("of"));
    assert!(seen["diff"].as_str().unwrap().contains("port"), "{seen:#}");
    // The what-if: both sides, the change highlighted, and how far to trust the number.
    assert!(
        seen["proposals"]
            .as_str()
            .unwrap()
            .contains("port 3 and a note")
    );
    assert!(
        seen["current"].as_str().unwrap().contains("port2"),
        "{seen:#}"
    );
    assert!(
        seen["predicted"].as_str().unwrap().contains("port3"),
        "{seen:#}"
    );
    assert!(seen["changed_rows"].as_u64().unwrap() >= 2, "{seen:#}");
    let confidence = seen["confidence"].as_str().unwrap();
    assert!(
        confidence.contains("abstains") || confidence.contains("onfidence"),
        "{confidence}"
    );
    assert_eq!(seen["check"], "check passed");
    assert_eq!(seen["log_growth_from_visits"], 0, "{seen:#}");
    // The staged commit: only the first op, a new frame on exp, the event on the page fast.
    let frames = seen["exp_frames"].as_array().unwrap();
    assert!(frames[1].as_u64() > frames[0].as_u64(), "{seen:#}");
    assert_eq!(seen["exp_head_config"], json!(["3"]));
    assert!(
        !seen["exp_head_files"]
            .as_array()
            .unwrap()
            .contains(&json!("note.txt"))
    );
    let lag = seen["commit_event"]["lag_ms"].as_f64().unwrap();
    assert!(lag <= 200.0, "commit → event on the page: {lag} ms");
    assert!(!seen["stale"].as_str().unwrap().is_empty(), "{seen:#}");
    assert_eq!(seen["bad_commit"], "rolled_back", "{seen:#}");
    assert!(
        seen["rollback_toast"]
            .as_str()
            .unwrap()
            .contains("web/main")
    );
    assert_eq!(seen["viewer_buttons"], json!([true, true, true]));
    for page in [
        "replicas",
        "timeline",
        "state-and-diff",
        "proposals",
        "what-if",
        "rollback",
    ] {
        assert!(
            screenshots.join(format!("{page}.png")).exists(),
            "{page}.png"
        );
    }
    eprintln!("browser: {seen:#}");
}
