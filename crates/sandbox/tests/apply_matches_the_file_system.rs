//! Property: applying ops to a structural copy of a captured state gives the state that
//! doing the same ops on the directory and capturing it gives (same paths, kinds and
//! contents, same entry and byte totals), for random trees and random ops.

use std::collections::BTreeMap;
use std::path::Path;

use kairos_capture::{CaptureRequest, capture};
use kairos_core::{Instant, Limits, ReplicaDefinition};
use kairos_sandbox::{Op, apply_ops, base_root, materialise, state_view};
use kairos_store::Store;
use proptest::prelude::*;

fn listing(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                pending.push(path);
                out.insert(relative, None);
            } else {
                out.insert(relative, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "d", "e.toml", "f.txt"]).prop_map(str::to_string)
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(name(), 1..4).prop_map(|parts| parts.join("/"))
}

#[derive(Debug, Clone)]
enum Step {
    Put(String, Vec<u8>),
    Delete(String),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            3 => (path(), prop::collection::vec(any::<u8>(), 0..200)).prop_map(|(p, c)| Step::Put(p, c)),
            1 => path().prop_map(Step::Delete),
        ],
        1..12,
    )
}

/// Applies a step to the directory the way a commit would; returns the op, or None when
/// the step is not applicable there (a parent is a file, the path is a directory, ...).
fn on_disk(root: &Path, step: &Step) -> Option<Op> {
    match step {
        Step::Put(path, content) => {
            let target = root.join(path);
            if target.is_dir() {
                return None;
            }
            let mut parent = target.parent()?.to_path_buf();
            while parent != root {
                if parent.is_file() {
                    return None;
                }
                parent = parent.parent()?.to_path_buf();
            }
            std::fs::create_dir_all(target.parent()?).ok()?;
            std::fs::write(&target, content).ok()?;
            Some(Op::PutFile {
                path: path.clone(),
                content: None,
                content_base64: Some(base64_encode(content)),
                from: None,
                mode: None,
            })
        }
        Step::Delete(path) => {
            let target = root.join(path);
            let mut parent = target.parent()?.to_path_buf();
            while parent != root {
                if parent.is_file() {
                    return None;
                }
                parent = parent.parent()?.to_path_buf();
            }
            if target.is_dir() {
                std::fs::remove_dir_all(&target).ok()?;
            } else if target.is_file() {
                std::fs::remove_file(&target).ok()?;
            } else {
                return None;
            }
            Some(Op::Delete { path: path.clone() })
        }
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn sandbox_state_equals_the_edited_directory(initial in steps(), changes in steps()) {
        let service = tempfile::tempdir().unwrap();
        let root = service.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for step in &initial {
            on_disk(&root, step);
        }
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path()).unwrap();
        let replica = ReplicaDefinition::new("prop", root.clone());
        store.add_replica(&replica).unwrap();
        let request = CaptureRequest { replica: &replica, timeline: "main", limits: Limits::default(), skip: vec![] };
        let base = capture(&store, &request).unwrap().frame;
        let ops: Vec<(usize, Op)> = changes
            .iter()
            .filter_map(|step| on_disk(&root, step))
            .enumerate()
            .map(|(index, op)| (index + 1, op))
            .collect();
        prop_assume!(!ops.is_empty());
        let applied = apply_ops(&store, &replica, &base_root(&store, &base).unwrap(), &ops, &Limits::default(), Instant::now()).unwrap();
        applied.persist().unwrap();
        let materialised = service.path().join("sandbox");
        materialise(&store, &state_view("prop", &base, applied.root, applied.root_node.clone()), &materialised).unwrap();
        prop_assert_eq!(listing(&materialised), listing(&root));
        let recaptured = capture(&store, &request).unwrap().frame;
        prop_assert_eq!(applied.root_node.file_entries, recaptured.entries);
        prop_assert_eq!(applied.root_node.file_bytes, recaptured.bytes);
    }
}
