//! Restore writes files captured sparse as sparse files (a 64 MiB file with two written
//! blocks takes a few blocks on disk, not 64 MiB) and dense files dense; `cat` and
//! `restore` flag files that were torn when captured.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kairos_core::{Hash, Limits, ReplicaDefinition};
use kairos_store::node::{Body, RootNode};
use kairos_store::{FrameDraft, ObjectKind, Store, WriteStats};

const SPARSE_BYTES: u64 = 64 << 20;

fn capture(store: &Store, replica: &ReplicaDefinition) {
    kairos_capture::capture(
        store,
        &kairos_capture::CaptureRequest {
            replica,
            timeline: "main",
            limits: Limits::default(),
            skip: Vec::new(),
        },
    )
    .unwrap();
}

fn write_sparse(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(SPARSE_BYTES).unwrap();
    file.seek(SeekFrom::Start(1 << 20)).unwrap();
    file.write_all(b"header").unwrap();
    file.seek(SeekFrom::Start(40 << 20)).unwrap();
    file.write_all(b"middle").unwrap();
}

/// Makes the latest frame's `name` torn, as a capture does for a file that kept changing.
fn mark_torn(store: &Store, name: &[u8]) {
    let head = store.head("web", "main").unwrap().unwrap();
    let reader = store.reader().unwrap();
    let root: RootNode = reader.node(&head.root, ObjectKind::Root).unwrap();
    let mut entry = reader.dir_lookup(&Hash(root.files), name).unwrap().unwrap();
    let Body::File { torn, .. } = &mut entry.body else {
        panic!("not a file")
    };
    *torn = true;
    let writer = store.object_writer("web").unwrap();
    let files =
        kairos_store::tree::edit_dir(&reader, &writer, &Hash(root.files), name, Some(entry))
            .unwrap();
    let new_root = RootNode {
        files: files.0,
        ..root
    };
    let root_hash = writer
        .put(ObjectKind::Root, &kairos_store::node::to_bytes(&new_root))
        .unwrap();
    writer.finish().unwrap();
    store
        .commit_frame(FrameDraft {
            replica: "web".into(),
            timeline: "main".into(),
            time: kairos_core::Instant(head.time.0 + 1),
            parent: Some(head.id),
            root: root_hash,
            entries: head.entries,
            bytes: head.bytes,
            stats: WriteStats::default(),
            torn: 1,
            unreadable: 0,
            capture_ms: 0,
        })
        .unwrap();
}

#[test]
fn sparse_files_restore_sparse_and_torn_files_are_flagged() {
    let service = tempfile::tempdir().unwrap();
    let root = service.path();
    write_sparse(&root.join("disk.img"));
    std::fs::write(root.join("zeros.bin"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(root.join("busy.txt"), b"version 1\nversion 2\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let replica = ReplicaDefinition::new("web", root.to_path_buf());
    store.add_replica(&replica).unwrap();
    capture(&store, &replica);
    mark_torn(&store, b"busy.txt");

    let view = kairos_replay::open(
        &store,
        "web",
        &kairos_core::TimelineSpec::parse("latest").unwrap(),
        kairos_core::Instant::now(),
    )
    .unwrap();
    let reader = store.reader().unwrap();
    let mut out = Vec::new();
    let busy = view
        .cat(&reader, b"busy.txt", &Limits::default(), &mut out)
        .unwrap();
    assert!(busy.torn);
    assert_eq!(out, b"version 1\nversion 2\n");
    let zeros = view
        .cat(&reader, b"zeros.bin", &Limits::default(), &mut Vec::new())
        .unwrap();
    assert!(!zeros.torn);
    assert_eq!(zeros.bytes, 1 << 20);

    let into = tempfile::tempdir().unwrap();
    let target = into.path().join("restored");
    let report = kairos_replay::restore(
        &store,
        &view,
        &target,
        &kairos_replay::RestoreOptions {
            force: false,
            exclude: Vec::new(),
            progress: None,
            durable: false,
        },
    )
    .unwrap();
    assert_eq!(report.torn, vec!["busy.txt".to_string()]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["torn"], serde_json::json!(["busy.txt"]));

    let restored = target.join("disk.img");
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        std::fs::read(root.join("disk.img")).unwrap()
    );
    let metadata = std::fs::metadata(&restored).unwrap();
    assert_eq!(metadata.len(), SPARSE_BYTES);
    assert!(
        metadata.blocks() * 512 <= 1 << 20,
        "a 64 MiB file with two written blocks took {} bytes on disk",
        metadata.blocks() * 512
    );
    let dense = std::fs::metadata(target.join("zeros.bin")).unwrap();
    assert!(
        dense.blocks() * 512 >= 1 << 20,
        "a file captured dense stays dense (preallocated files are kept allocated)"
    );
}
