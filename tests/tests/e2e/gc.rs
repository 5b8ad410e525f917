//! Garbage collection and store figures through the binary: forgetting most of a history
//! shrinks the file and every kept frame restores byte-identical; `kairos gc` killed with
//! -9 at random points, while a node captures and commits, loses nothing a kept frame
//! needs; damage stops a collection; roles guard it through a node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kairos_core::Hash;
use kairos_store::Store;
use kairos_tests::{Kairos, Node, bytes, tree_listing};
use rand::{Rng, SeedableRng};

type Listing = BTreeMap<Vec<u8>, (char, u32, Vec<u8>)>;

fn hash(hex: &str) -> Hash {
    let raw: Vec<u8> = (0..32)
        .map(|at| u8::from_str_radix(&hex[at * 2..at * 2 + 2], 16).expect("hex"))
        .collect();
    Hash::from_slice(&raw).expect("32 bytes")
}

/// Writes version `version` of the sample service into `root`: a large file unique to the
/// version, a config file, and a file that never changes.
fn write_version(root: &Path, version: u64) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("data.bin"), bytes(version, 160_000)).unwrap();
    std::fs::write(
        root.join("etc/app.toml"),
        format!("[server]\nport = {}\nworkers = 4\n", 8000 + version),
    )
    .unwrap();
    std::fs::write(root.join("README"), b"the sample service\n").unwrap();
}

/// Captures `count` versions (from `first`); returns each frame with what the root held.
fn capture_versions(
    kairos: &Kairos,
    root: &Path,
    first: u64,
    count: u64,
) -> Vec<(String, Listing)> {
    (first..first + count)
        .map(|version| {
            write_version(root, version);
            let answer = kairos.json(["capture", "web", "--json"]);
            (
                answer["frame"].as_str().expect("frame id").to_string(),
                tree_listing(root),
            )
        })
        .collect()
}

fn forget(data_dir: &Path, ids: &[String]) {
    let store = Store::open(data_dir).expect("store opens");
    let ids: Vec<Hash> = ids.iter().map(|id| hash(id)).collect();
    store.forget_frames(&ids).expect("frames forgotten");
}

fn file_size(data_dir: &Path) -> u64 {
    Kairos::at(data_dir).store_bytes()
}

/// Restores every frame and compares it with what was captured.
fn assert_frames_restore(kairos: &Kairos, kept: &[(String, Listing)], context: &str) {
    for (id, listing) in kept {
        let into = tempfile::tempdir().unwrap();
        let target = into.path().join("restored");
        let output = kairos.run([
            "restore",
            "web",
            "--at",
            id,
            "--into",
            target.to_str().unwrap(),
        ]);
        assert!(
            output.status.success(),
            "{context}: restoring {id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            &tree_listing(&target) == listing,
            "{context}: frame {id} does not restore byte-identical"
        );
    }
}

fn assert_verify_clean(kairos: &Kairos, context: &str) {
    let output = kairos.run(["verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert!(
        output.status.success() && report["ok"] == true,
        "{context}: verify: {report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn forgetting_ninety_percent_of_a_history_shrinks_the_file_and_kept_frames_restore() {
    let kairos = Kairos::new();
    let root = tempfile::tempdir().unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.path().to_str().unwrap(),
    ]);
    let captured = capture_versions(&kairos, root.path(), 0, 40);
    // Keep one frame in ten, and the head.
    let (kept, forgotten): (Vec<_>, Vec<_>) = captured
        .iter()
        .enumerate()
        .partition(|(at, _)| at % 10 == 9);
    let kept: Vec<(String, Listing)> = kept.into_iter().map(|(_, frame)| frame.clone()).collect();
    let forgotten: Vec<String> = forgotten
        .into_iter()
        .map(|(_, (id, _))| id.clone())
        .collect();
    forget(kairos.data_dir(), &forgotten);

    let stats = kairos.json(["stats", "--json"]);
    assert_eq!(stats["frames"], 4, "{stats}");
    assert!(
        stats["objects_reclaimable"].as_u64().unwrap() >= 36,
        "{stats}"
    );
    let reclaimable = stats["bytes_reclaimable"].as_u64().unwrap();
    assert!(reclaimable > 30 * 150_000, "{stats}");

    let dry = kairos.json(["gc", "--dry-run", "--json"]);
    let size_before = file_size(kairos.data_dir());
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        dry["bytes_on_disk_after"], dry["bytes_on_disk_before"],
        "{dry}"
    );
    let report = kairos.json(["gc", "--json"]);
    assert_eq!(
        report["objects_deleted"], dry["objects_deleted"],
        "{report} {dry}"
    );
    assert_eq!(report["compacted"], true, "{report}");
    let size_after = file_size(kairos.data_dir());
    assert_eq!(report["bytes_on_disk_after"].as_u64(), Some(size_after));
    // Ninety percent of the frames' unique content is gone: the file falls to well under a
    // third of its size (what is left: the kept frames' content, the catalog, redb's own).
    assert!(
        size_after * 3 < size_before,
        "file {size_before} -> {size_after} bytes: {report}"
    );
    assert_verify_clean(&kairos, "after gc");
    assert_frames_restore(&kairos, &kept, "after gc");
    let after = kairos.json(["stats", "--json"]);
    assert_eq!(after["objects_reclaimable"], 0, "{after}");
    assert_eq!(after["frames"], 4);
    // The pack files kept hold mostly live segments.
    let dead_in_files = after["bytes_dead_in_files"].as_u64().unwrap();
    assert!(
        dead_in_files * 2 <= after["bytes_on_disk"].as_u64().unwrap(),
        "{after}"
    );
    // Nothing left to do: a second run removes nothing.
    let again = kairos.json(["gc", "--json"]);
    assert_eq!(again["objects_deleted"], 0, "{again}");
    assert_eq!(again["segments_deleted"], 0, "{again}");
    // Text output names what happened.
    let text = String::from_utf8(kairos.ok(["stats"])).unwrap();
    assert!(
        text.contains("4 frames") && text.contains("dedup ratio"),
        "{text}"
    );
}

/// A store with most of its history forgotten (garbage to collect), a fork started at a
/// kept frame and a stored proposal; returns the kept frames and the proposal.
fn template(kairos: &Kairos, root: &Path) -> (Vec<(String, Listing)>, String) {
    std::fs::create_dir_all(root).unwrap();
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    let captured = capture_versions(kairos, root, 0, 40);
    let keep = [3, 20, 39];
    kairos.ok([
        "timeline",
        "fork",
        "try",
        "--replica",
        "web",
        "--at",
        &captured[3].0,
    ]);
    let proposal = root.with_extension("proposal.json");
    std::fs::write(
        &proposal,
        r#"{"title": "workers", "author": "web-team",
            "ops": [{"op": "set_config", "file": "etc/app.toml", "key": "server.workers", "value": 8}]}"#,
    )
    .unwrap();
    let proposal = kairos.json([
        "propose",
        "web",
        "--file",
        proposal.to_str().unwrap(),
        "--json",
    ])["proposal"]
        .as_str()
        .expect("proposal id")
        .to_string();
    let forgotten: Vec<String> = captured
        .iter()
        .enumerate()
        .filter(|(at, _)| !keep.contains(at))
        .map(|(_, (id, _))| id.clone())
        .collect();
    forget(kairos.data_dir(), &forgotten);
    (
        keep.iter().map(|&at| captured[at].clone()).collect(),
        proposal,
    )
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(status.success());
}

fn node_config(root: &Path) -> String {
    format!(
        "[node]\ncapture_debounce = \"50ms\"\n[telemetry]\nlog = \"warn\"\n[[replica]]\nname = \"web\"\nroot = {:?}\ncapture_interval = \"1h\"\n",
        root.display().to_string()
    )
}

/// While a node runs, writes new versions and captures them through it (and commits a
/// proposal on the fork now and then); returns the frames acknowledged.
fn capture_stream(
    url: String,
    data_dir: PathBuf,
    root: PathBuf,
    first_version: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, Listing)>> {
    std::thread::spawn(move || {
        let kairos = Kairos::at(&data_dir);
        let mut acknowledged = Vec::new();
        let mut version = first_version;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            write_version(&root, version);
            let listing = tree_listing(&root);
            let output = kairos.run(["--node", &url, "capture", "web", "--json"]);
            if !output.status.success() {
                break;
            }
            let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            acknowledged.push((answer["frame"].as_str().unwrap().to_string(), listing));
            if version.is_multiple_of(3) {
                // A commit on the fork: a proposal document, a sandbox state, a frame.
                let proposal = root.with_extension(format!("p{version}.json"));
                std::fs::write(
                    &proposal,
                    format!(
                        r#"{{"title": "port", "author": "web-team", "ops": [{{"op": "set_config", "file": "etc/app.toml", "key": "server.port", "value": {}}}]}}"#,
                        9000 + version
                    ),
                )
                .unwrap();
                let output = kairos.run([
                    "--node",
                    &url,
                    "propose",
                    "web",
                    "--file",
                    proposal.to_str().unwrap(),
                    "--timeline",
                    "try",
                    "--json",
                ]);
                let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
                    break;
                };
                let id = answer["proposal"].as_str().unwrap_or_default().to_string();
                // Whether it lands or the node is gone, the next capture tells.
                let _ = kairos.run(["--node", &url, "commit", "web", &id, "--json"]);
            }
            version += 1;
        }
        acknowledged
    })
}

/// Starts a node capturing and committing, asks it for a collection, and kills it with -9
/// at a random instant; returns the frames the node acknowledged and whether the
/// collection was cut short.
fn gc_in_a_node_killed(
    data: &Path,
    root: &Path,
    run: u64,
    gc_ms: u64,
    rng: &mut rand::rngs::StdRng,
) -> (Vec<(String, Listing)>, bool) {
    let kairos = Kairos::at(data);
    let mut node = Node::start(&node_config(root), data);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = capture_stream(
        node.url.clone(),
        data.to_path_buf(),
        root.to_path_buf(),
        1000 + run * 100,
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
    let mut gc = kairos
        .command(["--node", &node.url, "gc", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kairos gc starts");
    // The request reaches the node a few milliseconds after the process starts.
    std::thread::sleep(Duration::from_millis(rng.random_range(0..gc_ms + 10)));
    // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
    let _ = node.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = stream.join().expect("the capture stream ends");
    let killed = !gc.wait().is_ok_and(|status| status.success());
    drop(node);
    let _ = std::fs::remove_file(data.join("node.json"));
    (acknowledged, killed)
}

#[test]
fn gc_killed_at_random_points_during_captures_and_commits_loses_nothing() {
    let seed: u64 = std::env::var("KAIROS_GC_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let replay = format!("replay with KAIROS_GC_SEED={seed}");
    let work = tempfile::tempdir().unwrap();
    let template_data = work.path().join("template-data");
    let template_root = work.path().join("template-root");
    let template_kairos = Kairos::at(&template_data);
    let (kept, proposal) = template(&template_kairos, &template_root);
    // How long a whole collection of the template takes here: the kills land within it.
    let measured = work.path().join("measured");
    copy_dir(&template_data, &measured);
    let whole = Kairos::at(&measured).json(["gc", "--json"]);
    // The whole run (with the file's compaction) and the collection alone (what a node does).
    let gc_ms = whole["duration_ms"].as_u64().unwrap_or(100).max(20);
    let collect_ms = gc_ms
        .saturating_sub(whole["compact_ms"].as_u64().unwrap_or(0))
        .max(10);
    let runs = 20;
    let (mut interrupted, mut streamed) = (0, 0);
    for run in 0..runs {
        let context = format!("run {run}: {replay}");
        let data = work.path().join(format!("data-{run}"));
        let root = work.path().join(format!("root-{run}"));
        copy_dir(&template_data, &data);
        copy_dir(&template_root, &root);
        let kairos = Kairos::at(&data);
        let acknowledged = if run % 4 == 3 {
            // Every fourth run kills `kairos gc` on the data directory: the collection and
            // then the file's compaction, no node.
            let mut gc = kairos
                .command(["gc", "--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("kairos gc starts");
            std::thread::sleep(Duration::from_millis(rng.random_range(0..gc_ms + 10)));
            // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared.
            unsafe { libc::kill(gc.id() as i32, libc::SIGKILL) };
            if !gc.wait().is_ok_and(|status| status.success()) {
                interrupted += 1;
            }
            Vec::new()
        } else {
            let (acknowledged, killed) =
                gc_in_a_node_killed(&data, &root, run, collect_ms, &mut rng);
            interrupted += usize::from(killed);
            acknowledged
        };
        streamed += acknowledged.len();
        assert_verify_clean(&kairos, &context);
        assert_frames_restore(&kairos, &kept, &context);
        assert_frames_restore(&kairos, &acknowledged, &context);
        // The stored proposal (its document is an object a record names) still sandboxes.
        let sandbox = kairos.run(["sandbox", "web", &proposal, "--json"]);
        assert!(
            sandbox.status.success(),
            "{context}: {}",
            String::from_utf8_lossy(&sandbox.stderr)
        );
        if run % 5 == 4 {
            // A run after the crash finishes the work and keeps every frame.
            kairos.json(["gc", "--json"]);
            assert_verify_clean(&kairos, &format!("{context}, second gc"));
            assert_frames_restore(&kairos, &kept, &context);
            assert_frames_restore(&kairos, &acknowledged, &context);
        }
        let _ = std::fs::remove_dir_all(&data);
        let _ = std::fs::remove_dir_all(&root);
    }
    eprintln!(
        "{interrupted} of {runs} collections ({gc_ms} ms each) killed before they answered; {streamed} frames captured meanwhile ({replay})"
    );
    assert!(
        interrupted as u64 >= runs / 4,
        "only {interrupted} of {runs} collections were interrupted: the kills miss them ({replay})"
    );
    assert!(
        streamed > 0,
        "no capture ran beside the collections ({replay})"
    );
}

#[test]
fn damage_stops_a_collection_and_nothing_is_removed() {
    let kairos = Kairos::new();
    let root = tempfile::tempdir().unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.path().to_str().unwrap(),
    ]);
    let captured = capture_versions(&kairos, root.path(), 0, 6);
    let ids: Vec<String> = captured[..5].iter().map(|(id, _)| id.clone()).collect();
    forget(kairos.data_dir(), &ids[1..]);
    // The kept first frame's root index entry now points at another object's bytes (what a
    // flipped index would do).
    let objects_before;
    {
        let store = Store::open(kairos.data_dir()).unwrap();
        let frame = store.frame(&hash(&ids[0])).unwrap();
        let reader = store.reader().unwrap();
        let objects = reader.scan_prefix(b"o/").unwrap();
        objects_before = objects.len();
        let other = objects
            .iter()
            .find(|(key, _)| key[2..] != frame.root.as_bytes()[..])
            .unwrap()
            .1
            .clone();
        let mut batch = kairos_store::kv::WriteBatch::new();
        let mut key = b"o/".to_vec();
        key.extend_from_slice(frame.root.as_bytes());
        batch.put(key, other).unwrap();
        store.kv().commit(batch).unwrap();
    }
    let error = kairos.fails(["gc"]);
    assert!(
        error.contains("damaged") && error.contains("kairos verify"),
        "{error}"
    );
    let store = Store::open(kairos.data_dir()).unwrap();
    assert_eq!(
        store.reader().unwrap().scan_prefix(b"o/").unwrap().len(),
        objects_before,
        "a refused collection removes nothing"
    );
    drop(store);
    // verify names the damage; the head still restores.
    assert!(!kairos.run(["verify"]).status.success());
    assert_frames_restore(&kairos, &captured[5..], "damaged store");
}

#[test]
fn through_a_node_gc_needs_a_committer_and_stats_a_viewer() {
    let kairos = Kairos::new();
    let root = tempfile::tempdir().unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.path().to_str().unwrap(),
    ]);
    let captured = capture_versions(&kairos, root.path(), 0, 5);
    let ids: Vec<String> = captured[..4].iter().map(|(id, _)| id.clone()).collect();
    forget(kairos.data_dir(), &ids);
    let token = |name: &str, role: &str| -> String {
        kairos.json(["party", "add", name, "--role", role, "--json"])["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let _admin = token("root", "admin");
    let viewer = token("watcher", "viewer");
    let committer = token("deploy", "committer");
    let mut node = Node::start(&node_config(root.path()), kairos.data_dir());
    let as_party = |token: &str, args: &[&str]| {
        let mut all = vec!["--node", node.url.as_str(), "--token", token];
        all.extend_from_slice(args);
        kairos.run(all)
    };
    let refused = as_party(&viewer, &["gc"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403")
            || String::from_utf8_lossy(&refused.stderr).contains("role"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let stats = as_party(&viewer, &["stats", "--json"]);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    // The kept head, and the frame the node may have captured as it started.
    assert!(
        (1..=2).contains(&stats["frames"].as_u64().unwrap()),
        "{stats}"
    );
    assert!(
        stats["objects_reclaimable"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let report = as_party(&committer, &["gc", "--json"]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert!(report["objects_deleted"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["compacted"], false,
        "a node does not compact the file it holds"
    );
    // The status shows the figures computed after the run.
    let status: serde_json::Value = Node::agent()
        .get(format!("{}/api/status", node.url))
        .header("Authorization", format!("Bearer {viewer}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(status["store"]["objects_reclaimable"], 0, "{status}");
    assert!(status["store"]["frames"].as_u64().unwrap() >= 1, "{status}");
    assert!(node.stop());
    assert_verify_clean(&kairos, "after gc through the node");
    assert_frames_restore(&kairos, &captured[4..], "after gc through the node");
}

/// The frames `history` lists after `repair` (when `verify` finds damage).
fn frames_after_repair(kairos: &Kairos) -> Vec<String> {
    if !kairos.run(["verify"]).status.success() {
        let output = kairos.run(["repair", "--json"]);
        assert_ne!(output.status.code(), Some(101), "repair panicked");
    }
    let output = kairos.run(["history", "web", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .map(|history| kairos_tests::frames(&history))
        .unwrap_or_default()
}

#[test]
fn flipped_bytes_before_gc_lose_no_frame_repair_would_keep() {
    let seed: u64 = std::env::var("KAIROS_GC_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let replay = format!("replay with KAIROS_GC_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let work = tempfile::tempdir().unwrap();
    let template_data = work.path().join("template-data");
    let template_root = work.path().join("template-root");
    let (kept, _) = template(&Kairos::at(&template_data), &template_root);
    let listings: BTreeMap<String, Listing> = kept.into_iter().collect();
    // The store file and its pack files, each flipped in some cases.
    let mut files: Vec<PathBuf> = vec![PathBuf::from("kairos.redb")];
    files.extend(
        kairos_tests::pack_files(&template_data)
            .iter()
            .map(|pack| pack.strip_prefix(&template_data).unwrap().to_path_buf()),
    );
    for case in 0..6 {
        let context = format!("case {case}: {replay}");
        let flips: Vec<(PathBuf, u64, u8)> = (0..8)
            .map(|_| {
                let file = files[rng.random_range(0..files.len())].clone();
                let size = std::fs::metadata(template_data.join(&file)).unwrap().len();
                let start = if file.ends_with("kairos.redb") {
                    4096
                } else {
                    0
                };
                (
                    file,
                    rng.random_range(start..size),
                    rng.random_range(1..=255u8),
                )
            })
            .collect();
        let damaged = |name: &str| {
            let data = work.path().join(format!("{name}-{case}"));
            copy_dir(&template_data, &data);
            for (file, at, mask) in &flips {
                let path = data.join(file);
                let mut content = std::fs::read(&path).unwrap();
                content[*at as usize] ^= mask;
                std::fs::write(&path, content).unwrap();
            }
            Kairos::at(&data)
        };
        // Without a collection: what repair keeps.
        let plain = damaged("plain");
        let kept_plain = frames_after_repair(&plain);
        // With a collection first: it may refuse, never panic, and loses nothing more.
        let collected = damaged("collected");
        let output = collected.run(["gc", "--json"]);
        assert_ne!(output.status.code(), Some(101), "{context}: gc panicked");
        let kept_collected = frames_after_repair(&collected);
        for frame in &kept_plain {
            assert!(
                kept_collected.contains(frame),
                "{context}: frame {frame} survives repair alone but not gc then repair"
            );
        }
        let survivors: Vec<(String, Listing)> = kept_collected
            .iter()
            .filter_map(|id| {
                listings
                    .get(id)
                    .map(|listing| (id.clone(), listing.clone()))
            })
            .collect();
        assert_frames_restore(&collected, &survivors, &context);
    }
}

#[test]
fn kairos_forget_then_gc_reclaims_and_keeps_what_retention_keeps() {
    let kairos = Kairos::new();
    let root = tempfile::tempdir().unwrap();
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        root.path().to_str().unwrap(),
    ]);
    let captured = capture_versions(&kairos, root.path(), 0, 10);
    kairos.ok(["forget", "web", "--keep-last", "2"]);
    let stats = kairos.json(["stats", "--json"]);
    assert_eq!(stats["frames"], 2, "{stats}");
    let report = kairos.json(["gc", "--json"]);
    assert!(report["objects_deleted"].as_u64().unwrap() >= 8, "{report}");
    assert_verify_clean(&kairos, "after forget and gc");
    assert_frames_restore(&kairos, &captured[8..], "after forget and gc");
}
