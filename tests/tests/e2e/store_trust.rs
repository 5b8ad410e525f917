//! A damaged store never panics, never verifies ok, refuses writes until `kairos repair`,
//! and `repair` keeps every frame whose objects are intact: the reproductions of issue 9
//! (a flipped page-header byte at offset 4096, two flipped bytes in the middle, a store
//! file truncated to zero) run through the real binary.

use std::path::{Path, PathBuf};

use kairos_tests::{Kairos, Node, frames, tree_listing};
use serde_json::Value;

/// What `tree_listing` returns: path -> (kind, mode, content or link target).
type Listing = std::collections::BTreeMap<Vec<u8>, (char, u32, Vec<u8>)>;

struct Fixture {
    kairos: Kairos,
    _service: tempfile::TempDir,
    root: PathBuf,
    frames: Vec<String>,
    /// Each frame restored before any damage.
    listings: Vec<Listing>,
}

fn write(root: &Path, name: &str, content: &str) {
    let path = root.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn fixture() -> Fixture {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path().to_path_buf();
    for index in 0..20 {
        write(
            &root,
            &format!("conf/f{index}.conf"),
            &format!("key = {index}\n"),
        );
    }
    write(&root, "a.txt", "first\n");
    kairos.ok(["replica", "add", "web", "--root", root.to_str().unwrap()]);
    for round in 0..3 {
        write(&root, "a.txt", &format!("round {round}\n"));
        write(
            &root,
            &format!("data/r{round}.txt"),
            &"x".repeat(5000 + round),
        );
        kairos.ok(["capture", "web"]);
    }
    let frames = frames(&kairos.json(["history", "web", "--json"]));
    assert_eq!(frames.len(), 3);
    let listings = frames
        .iter()
        .map(|frame| {
            let into = tempfile::tempdir().unwrap();
            let target = into.path().join("t");
            kairos.ok([
                "restore",
                "web",
                "--at",
                frame,
                "--into",
                target.to_str().unwrap(),
            ]);
            tree_listing(&target)
        })
        .collect();
    Fixture {
        kairos,
        _service: service,
        root,
        frames,
        listings,
    }
}

impl Fixture {
    fn store_file(&self) -> PathBuf {
        self.kairos.data_dir().join("kairos.redb")
    }

    /// Runs every reading and writing command: none may panic; returns verify's output.
    fn run_everything(&self) -> (bool, String) {
        let into = tempfile::tempdir().unwrap();
        let target = into.path().join("t");
        let commands: Vec<Vec<&str>> = vec![
            vec!["verify"],
            vec!["history", "web"],
            vec!["show", "web"],
            vec!["cat", "web", "a.txt"],
            vec![
                "restore",
                "web",
                "--at",
                "latest",
                "--into",
                target.to_str().unwrap(),
            ],
            vec!["capture", "web"],
        ];
        let mut verify = (false, String::new());
        for command in commands {
            let output = self.kairos.run(&command);
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_ne!(
                output.status.code(),
                Some(101),
                "{command:?} panicked: {stderr}"
            );
            assert!(!stderr.contains("thread '"), "{command:?}: {stderr}");
            if command == ["verify"] {
                verify = (output.status.success(), stderr);
            }
        }
        verify
    }

    /// Repairs, then checks every kept frame restores as before and the store works again.
    fn repair_and_check(&self) -> Value {
        let report = self.kairos.json(["repair", "--json"]);
        assert_eq!(report["needed"], true, "{report}");
        let lost: Vec<String> = report["frames_lost"]
            .as_array()
            .unwrap()
            .iter()
            .map(|lost| lost["frame"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            report["frames_kept"].as_u64().unwrap() as usize + lost.len(),
            self.frames.len(),
            "{report}"
        );
        assert_eq!(self.kairos.json(["verify", "--json"])["ok"], true);
        for (frame, listing) in self.frames.iter().zip(&self.listings) {
            if lost.iter().any(|lost| lost.starts_with(frame.as_str())) {
                continue;
            }
            let into = tempfile::tempdir().unwrap();
            let target = into.path().join("t");
            self.kairos.ok([
                "restore",
                "web",
                "--at",
                frame,
                "--into",
                target.to_str().unwrap(),
            ]);
            assert_eq!(
                &tree_listing(&target),
                listing,
                "frame {frame} after repair"
            );
        }
        write(&self.root, "a.txt", "after repair\n");
        self.kairos.ok(["capture", "web"]);
        report
    }
}

#[test]
fn a_damaged_page_header_is_reported_and_repaired_without_a_panic() {
    let fixture = fixture();
    let path = fixture.store_file();
    let mut bytes = std::fs::read(&path).unwrap();
    // Every page's header but the file's own (which page holds a live tree depends on
    // the commits made so far).
    for page in (4096..bytes.len()).step_by(4096) {
        bytes[page] ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    let (verify_ok, verify_stderr) = fixture.run_everything();
    assert!(!verify_ok, "verify must not call a damaged file ok");
    assert!(verify_stderr.contains("kairos repair"), "{verify_stderr}");
    let refused = fixture.kairos.fails(["capture", "web"]);
    assert!(refused.contains("kairos repair"), "{refused}");
    fixture.repair_and_check();
}

#[test]
fn two_flipped_bytes_in_the_middle_never_lose_every_frame() {
    let fixture = fixture();
    let path = fixture.store_file();
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    bytes[middle + 1] ^= 0xa5;
    std::fs::write(&path, &bytes).unwrap();
    let (verify_ok, _) = fixture.run_everything();
    if verify_ok {
        // The flips fell into free space: everything reads back as before.
        for (frame, listing) in fixture.frames.iter().zip(&fixture.listings) {
            let into = tempfile::tempdir().unwrap();
            let target = into.path().join("t");
            fixture.kairos.ok([
                "restore",
                "web",
                "--at",
                frame,
                "--into",
                target.to_str().unwrap(),
            ]);
            assert_eq!(&tree_listing(&target), listing);
        }
        assert!(frames(&fixture.kairos.json(["history", "web", "--json"])).len() >= 2);
    } else {
        // Frames are lost only through objects of theirs that the flips damaged, each
        // named (and every kept frame restores as before: `repair_and_check`). The first
        // capture's segment holds the files every frame shares (the 20 config files), so
        // a flip there loses every frame; which bytes the middle of the file holds
        // depends on the temporary paths' lengths.
        let report = fixture.repair_and_check();
        let lost = report["frames_lost"].as_array().unwrap();
        for frame in lost {
            let reason = frame["reason"].as_str().unwrap();
            assert!(
                ["object", "missing", "damaged"]
                    .iter()
                    .any(|word| reason.contains(word)),
                "a lost frame names what it lost: {report}"
            );
        }
        let kept = report["frames_kept"].as_u64().unwrap() as usize;
        assert_eq!(
            frames(&fixture.kairos.json(["history", "web", "--json"])).len(),
            kept + 1,
            "the kept frames and the capture after the repair"
        );
    }
}

#[test]
fn a_flipped_byte_in_a_pack_file_is_found_by_verify_and_repaired() {
    let fixture = fixture();
    let packs = fixture.kairos.pack_files();
    assert!(!packs.is_empty(), "segments are kept in pack files");
    let pack = &packs[0];
    let mut bytes = std::fs::read(pack).unwrap();
    // Inside the first object (appends are 4 KiB-aligned: between them lie dead zeros).
    bytes[10] ^= 0x5a;
    std::fs::write(pack, &bytes).unwrap();
    let verify = fixture.kairos.run(["verify"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(!verify.status.success(), "{said}");
    assert!(
        said.contains("object"),
        "the damaged object is named: {said}"
    );
    let (verify_ok, _) = fixture.run_everything();
    assert!(!verify_ok, "verify must not call a damaged pack ok");
    let refused = fixture.kairos.fails(["capture", "web"]);
    assert!(refused.contains("kairos repair"), "{refused}");
    fixture.repair_and_check();
}

#[test]
fn a_missing_pack_file_is_named_by_verify_and_repaired() {
    let fixture = fixture();
    let packs = fixture.kairos.pack_files();
    std::fs::remove_file(&packs[0]).unwrap();
    let verify = fixture.kairos.run(["verify"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(!verify.status.success(), "{said}");
    assert!(said.contains(".pack"), "the missing pack is named: {said}");
    let (verify_ok, _) = fixture.run_everything();
    assert!(!verify_ok, "verify must not call a store missing a pack ok");
    let report = fixture.repair_and_check();
    assert!(
        !report["frames_lost"].as_array().unwrap().is_empty(),
        "{report}"
    );
}

#[test]
fn repair_keeps_every_frame_whose_packs_are_intact_when_one_pack_is_gone() {
    let kairos = Kairos::new();
    let service = tempfile::tempdir().unwrap();
    let root = service.path();
    let run = |args: &[&str]| {
        let output = kairos
            .command(args)
            .env("KAIROS_PACK_BYTES", "4096")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    run(&["replica", "add", "web", "--root", root.to_str().unwrap()]);
    // Each frame adds a file of its own: a pack each (packs of 4 KiB at most).
    for round in 0..4 {
        write(
            root,
            &format!("data/r{round}.bin"),
            &format!("{round}").repeat(20_000),
        );
        run(&["capture", "web"]);
    }
    let frames = frames(&serde_json::from_slice(&run(&["history", "web", "--json"])).unwrap());
    let packs = kairos.pack_files();
    assert!(packs.len() >= 4, "{packs:?}");
    // The newest pack (the last frame's file) is gone.
    std::fs::remove_file(packs.last().unwrap()).unwrap();
    let report: Value = serde_json::from_slice(&run(&["repair", "--json"])).unwrap();
    let kept = report["frames_kept"].as_u64().unwrap();
    assert_eq!(
        kept, 3,
        "every frame but the last keeps its content: {report}"
    );
    let lost = report["frames_lost"].as_array().unwrap();
    assert_eq!(lost.len(), 1, "{report}");
    assert_eq!(lost[0]["frame"].as_str(), frames.last().map(String::as_str));
    assert!(
        report["damaged_packs_kept"]
            .as_array()
            .is_some_and(|kept| !kept.is_empty()),
        "the damaged store's packs are kept beside its file: {report}"
    );
    kairos.ok(["verify"]);
}

#[test]
fn an_empty_store_file_is_damage_not_a_new_store() {
    let fixture = fixture();
    let path = fixture.store_file();
    std::fs::write(&path, b"").unwrap();
    let error = fixture.kairos.fails(["verify"]);
    assert!(error.contains("empty (0 bytes)"), "{error}");
    let refused = fixture.kairos.fails(["capture", "web"]);
    assert!(refused.contains("kairos repair"), "{refused}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        0,
        "never replaced silently"
    );
    let report = fixture.kairos.json(["repair", "--json"]);
    assert_eq!(report["source"], "unreadable", "{report}");
    assert_eq!(report["catalog_source"], "copy", "{report}");
    let lost = report["frames_lost"].as_array().unwrap();
    assert_eq!(
        lost.len(),
        3,
        "every frame's objects were in the emptied file: {report}"
    );
    assert!(lost.iter().all(|frame| frame["replica"] == "web"));
    // The catalog copy kept the replica: capturing works again, the history restarts.
    let replicas = fixture.kairos.json(["replica", "list", "--json"]);
    assert_eq!(replicas[0]["name"], "web");
    fixture.kairos.ok(["capture", "web"]);
    assert_eq!(
        frames(&fixture.kairos.json(["history", "web", "--json"])).len(),
        1
    );
}

/// A restore never writes over the store it reads (a hostile review found `--force` into
/// the directory holding the data directory removing the store and exiting 0): a target
/// that is the data directory is refused by name, and so is `--force` into a directory
/// inside it; into a directory that holds it, the data directory is left out (neither
/// written nor removed). The store keeps every frame.
#[test]
fn a_restore_over_its_own_store_is_refused_and_the_store_keeps_its_frames() {
    let service = tempfile::tempdir().unwrap();
    write(service.path(), "a.txt", "one\n");
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    let kairos = Kairos::at(&data);
    kairos.ok([
        "replica",
        "add",
        "web",
        "--root",
        service.path().to_str().unwrap(),
    ]);
    kairos.ok(["capture", "web"]);
    let inside = data.join("out");
    let through_dots = parent.path().join("missing/../data");
    let cases: [(&Path, bool, &str); 5] = [
        (&data, true, "is the store's data directory"),
        (&data, false, "is the store's data directory"),
        (&through_dots, true, "is the store's data directory"),
        (&through_dots, false, "is the store's data directory"),
        (&inside, true, "is inside the store's data directory"),
    ];
    let restore = |into: &Path, force: bool| {
        let mut args = vec!["restore", "web", "--at", "latest", "--into"];
        args.push(into.to_str().unwrap());
        if force {
            args.push("--force");
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (into, force, named) in cases {
        let error = kairos.fails(restore(into, force));
        assert!(error.contains(named), "{into:?} force={force}: {error}");
    }
    // Into the directory that holds the data directory, with --force: the frame's files
    // are written, what the frame lacks is removed, the data directory is left alone.
    write(parent.path(), "stray.txt", "not in the frame\n");
    kairos.ok(restore(parent.path(), true));
    assert_eq!(
        std::fs::read(parent.path().join("a.txt")).unwrap(),
        b"one\n"
    );
    assert!(!parent.path().join("stray.txt").exists());
    assert!(data.join("kairos.redb").is_file());
    assert_eq!(frames(&kairos.json(["history", "web", "--json"])).len(), 1);
    assert!(kairos.json(["verify", "--json"])["ok"].as_bool().unwrap());
    // Without --force, a new directory inside the data directory only adds files.
    kairos.ok(restore(&inside, false));
    assert_eq!(std::fs::read(inside.join("a.txt")).unwrap(), b"one\n");
}

/// A node killed (-9) at any instant of its start or of a stream of captures and forks
/// leaves a store that verifies clean, its catalog copy matching (the copy is written ahead
/// of each durable commit, never behind it), and the next node starts and takes writes. A
/// node stopped (SIGTERM) the instant it says where it listens stops cleanly.
#[test]
fn a_node_killed_at_any_instant_leaves_a_store_that_verifies_and_its_copy_matches() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("web");
    write(&root, "etc/app.conf", "port = 1\n");
    let kairos = Kairos::new();
    kairos.add_idle_replica("web", &root);
    kairos.ok(["capture", "web"]);
    for round in 0..8u64 {
        let mut node = Node::start("", kairos.data_dir());
        if round == 0 {
            assert!(
                node.stop(),
                "a SIGTERM at once is a clean stop: {:?}",
                node.log
            );
        } else {
            let url = node.url.clone();
            let root = root.clone();
            let writer = std::thread::spawn(move || {
                for i in 0.. {
                    write(&root, "etc/app.conf", &format!("port = {round}{i}\n"));
                    let capture = Node::agent()
                        .post(format!("{url}/api/replicas/web/capture"))
                        .send_json(serde_json::json!({}));
                    let fork = Node::agent()
                        .post(format!("{url}/api/replicas/web/timelines"))
                        .send_json(
                            serde_json::json!({"name": format!("t{round}-{i}"), "at": "latest"}),
                        );
                    if capture.is_err() || fork.is_err() {
                        return;
                    }
                }
            });
            // Killed at a different instant each round: while it starts, or amid writes.
            std::thread::sleep(std::time::Duration::from_millis(round * round * 23 % 400));
            // SAFETY: kill(2) takes only a pid and a signal number.
            unsafe { libc::kill(node.child.id() as i32, libc::SIGKILL) };
            let _ = node.child.wait();
            writer.join().unwrap();
        }
        let out = kairos.run(["verify", "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(report["ok"], true, "round {round}: {report}");
        assert_eq!(report["catalog_copy"], "matches", "round {round}: {report}");
    }
    let node = Node::start("", kairos.data_dir());
    let (code, body) = {
        let mut response = Node::agent()
            .post(format!("{}/api/replicas/web/capture", node.url))
            .send_json(serde_json::json!({}))
            .unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    };
    assert!(code == 200 || code == 201, "{code} {body}");
}

/// Records cut from the end of the catalog copy (the store intact) are named by `verify`
/// as the copy being behind, never refreshed in silence, and `repair` rewrites the copy
/// from the store: every frame and fork stays.
#[test]
fn a_copy_cut_short_is_named_and_repair_keeps_every_frame_the_store_holds() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path().join("web");
    let kairos = Kairos::new();
    write(&root, "a", "0\n");
    kairos.add_idle_replica("web", &root);
    for i in 1..=3 {
        write(&root, "a", &format!("{i}\n"));
        kairos.ok(["capture", "web"]);
        kairos.ok([
            "timeline",
            "fork",
            &format!("f{i}"),
            "--replica",
            "web",
            "--at",
            "latest",
        ]);
    }
    let history = kairos.json(["history", "web", "--json"]);
    let copy = kairos.data_dir().join("kairos.catalog-copy");
    for cut in [1u64, 800] {
        let length = std::fs::metadata(&copy).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        file.set_len(length - cut).unwrap();
        drop(file);
        let out = kairos.run(["verify", "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ok"], false, "cut {cut}: {report}");
        assert!(
            report["problems"][0]
                .as_str()
                .unwrap()
                .starts_with("catalog copy is behind the store"),
            "cut {cut}: {report}"
        );
        let repaired = kairos.json(["repair", "--json"]);
        assert_eq!(repaired["catalog_source"], "store", "cut {cut}: {repaired}");
        assert_eq!(repaired["frames_lost"], serde_json::json!([]), "{repaired}");
        let report = kairos.json(["verify", "--json"]);
        assert_eq!(report["catalog_copy"], "matches", "cut {cut}: {report}");
        assert_eq!(kairos.json(["history", "web", "--json"]), history);
        let timelines = kairos
            .json(["timeline", "list", "web", "--json"])
            .to_string();
        for fork in ["f1", "f2", "f3"] {
            assert!(timelines.contains(fork), "cut {cut}: {timelines}");
        }
    }
}
