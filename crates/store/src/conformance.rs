//! The conformance suite every key-value backend must pass: ordering, bounds, limits,
//! atomic batches, optimistic checks and snapshot isolation. Backends call [`run`] from
//! their tests with a factory for fresh, empty instances.

use std::ops::Bound;

use crate::kv::{
    BATCH_BYTES_MAX, KEY_BYTES_MAX, KvBackend, KvError, VALUE_BYTES_MAX, WriteBatch, scan_prefix,
};

/// Runs every case against fresh backends made by `make`; panics on the first failure.
pub fn run(mut make: impl FnMut() -> Box<dyn KvBackend>) {
    type Case = fn(&dyn KvBackend);
    let cases: [(&str, Case); 11] = [
        ("put_get_overwrite_delete", put_get_overwrite_delete),
        ("scan_is_ordered_and_bounded", scan_is_ordered_and_bounded),
        ("prefix_scan_pages", prefix_scan_pages),
        (
            "reverse_scans_keep_both_bounds",
            reverse_scans_keep_both_bounds,
        ),
        ("get_many_reads_in_order", get_many_reads_in_order),
        ("checks_guard_batches", checks_guard_batches),
        ("failed_batch_changes_nothing", failed_batch_changes_nothing),
        ("limits_are_enforced", limits_are_enforced),
        ("snapshots_are_isolated", snapshots_are_isolated),
        ("binary_keys_sort_bytewise", binary_keys_sort_bytewise),
        ("segments_read_like_any_value", segments_read_like_any_value),
    ];
    for (name, case) in cases {
        let backend = make();
        eprintln!("kv conformance: {name}");
        case(backend.as_ref());
    }
}

fn put(backend: &dyn KvBackend, pairs: &[(&[u8], &[u8])]) {
    let mut batch = WriteBatch::new();
    for (key, value) in pairs {
        batch.put(key.to_vec(), value.to_vec()).unwrap();
    }
    backend.commit(batch).unwrap();
}

fn get(backend: &dyn KvBackend, key: &[u8]) -> Option<Vec<u8>> {
    backend.snapshot().unwrap().get(key).unwrap()
}

fn put_get_overwrite_delete(backend: &dyn KvBackend) {
    assert_eq!(get(backend, b"a"), None);
    put(backend, &[(b"a", b"1"), (b"b", b"")]);
    assert_eq!(get(backend, b"a").as_deref(), Some(&b"1"[..]));
    assert_eq!(get(backend, b"b").as_deref(), Some(&b""[..]));
    put(backend, &[(b"a", b"2")]);
    assert_eq!(get(backend, b"a").as_deref(), Some(&b"2"[..]));
    let mut batch = WriteBatch::new();
    batch.delete(b"a".to_vec()).unwrap();
    batch.delete(b"never-there".to_vec()).unwrap();
    backend.commit(batch).unwrap();
    assert_eq!(get(backend, b"a"), None);
}

fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[u8]> {
    pairs.iter().map(|(key, _)| key.as_slice()).collect()
}

fn scan_is_ordered_and_bounded(backend: &dyn KvBackend) {
    put(
        backend,
        &[
            (b"c", b""),
            (b"a", b""),
            (b"d", b""),
            (b"b", b""),
            (b"e", b""),
        ],
    );
    let snapshot = backend.snapshot().unwrap();
    let all = snapshot
        .scan(Bound::Unbounded, Bound::Unbounded, 100, false)
        .unwrap();
    assert_eq!(keys(&all), [b"a", b"b", b"c", b"d", b"e"]);
    let middle = snapshot
        .scan(Bound::Included(b"b"), Bound::Excluded(b"e"), 100, false)
        .unwrap();
    assert_eq!(keys(&middle), [b"b", b"c", b"d"]);
    let after = snapshot
        .scan(Bound::Excluded(b"b"), Bound::Included(b"d"), 100, false)
        .unwrap();
    assert_eq!(keys(&after), [b"c", b"d"]);
    let last_two = snapshot
        .scan(Bound::Unbounded, Bound::Excluded(b"e"), 2, true)
        .unwrap();
    assert_eq!(keys(&last_two), [b"d", b"c"]);
    let limited = snapshot
        .scan(Bound::Unbounded, Bound::Unbounded, 1, false)
        .unwrap();
    assert_eq!(keys(&limited), [b"a"]);
}

fn prefix_scan_pages(backend: &dyn KvBackend) {
    let mut batch = WriteBatch::new();
    for index in 0..250u32 {
        batch
            .put(
                [b"p/".as_slice(), &index.to_be_bytes()].concat(),
                index.to_le_bytes().to_vec(),
            )
            .unwrap();
    }
    batch.put(b"q".to_vec(), b"outside".to_vec()).unwrap();
    batch.put(b"p".to_vec(), b"outside".to_vec()).unwrap();
    backend.commit(batch).unwrap();
    let snapshot = backend.snapshot().unwrap();
    let pairs = scan_prefix(snapshot.as_ref(), b"p/", 7).unwrap();
    assert_eq!(pairs.len(), 250);
    for (index, (key, value)) in pairs.iter().enumerate() {
        assert_eq!(key[2..], (index as u32).to_be_bytes());
        assert_eq!(value[..], (index as u32).to_le_bytes());
    }
}

fn reverse_scans_keep_both_bounds(backend: &dyn KvBackend) {
    let mut batch = WriteBatch::new();
    for index in 0..300u32 {
        batch
            .put(index.to_be_bytes().to_vec(), vec![1; 64])
            .unwrap();
    }
    backend.commit(batch).unwrap();
    let snapshot = backend.snapshot().unwrap();
    let (low, high) = (10u32.to_be_bytes(), 290u32.to_be_bytes());
    let down = snapshot
        .scan(Bound::Excluded(&low), Bound::Included(&high), 1000, true)
        .unwrap();
    let expected: Vec<Vec<u8>> = (11..=290u32)
        .rev()
        .map(|i| i.to_be_bytes().to_vec())
        .collect();
    assert_eq!(
        keys(&down),
        expected.iter().map(Vec::as_slice).collect::<Vec<_>>()
    );
    let up = snapshot
        .scan(Bound::Included(&low), Bound::Excluded(&high), 5, false)
        .unwrap();
    assert_eq!(up.len(), 5);
    assert_eq!(up[0].0, low);
    assert!(
        snapshot
            .scan(Bound::Unbounded, Bound::Unbounded, 0, false)
            .unwrap()
            .is_empty(),
        "a scan with limit 0 returns nothing"
    );
}

fn get_many_reads_in_order(backend: &dyn KvBackend) {
    put(backend, &[(b"m1", b"one"), (b"m3", b"three")]);
    let snapshot = backend.snapshot().unwrap();
    let values = snapshot
        .get_many(&[b"m3".as_slice(), b"m2", b"m1", b"m3"])
        .unwrap();
    assert_eq!(
        values,
        [
            Some(b"three".to_vec()),
            None,
            Some(b"one".to_vec()),
            Some(b"three".to_vec())
        ]
    );
    assert!(snapshot.get_many(&[]).unwrap().is_empty());
}

fn checks_guard_batches(backend: &dyn KvBackend) {
    let mut create = WriteBatch::new();
    create.check(b"head".to_vec(), None).unwrap();
    create.put(b"head".to_vec(), b"1".to_vec()).unwrap();
    backend.commit(create).unwrap();

    let mut stale = WriteBatch::new();
    stale.check(b"head".to_vec(), None).unwrap();
    stale.put(b"head".to_vec(), b"x".to_vec()).unwrap();
    assert!(matches!(
        backend.commit(stale),
        Err(KvError::Conflict { key }) if key == b"head"
    ));

    let mut fresh = WriteBatch::new();
    fresh.check(b"head".to_vec(), Some(b"1".to_vec())).unwrap();
    fresh.put(b"head".to_vec(), b"2".to_vec()).unwrap();
    backend.commit(fresh).unwrap();
    assert_eq!(get(backend, b"head").as_deref(), Some(&b"2"[..]));
}

fn failed_batch_changes_nothing(backend: &dyn KvBackend) {
    put(backend, &[(b"guard", b"old")]);
    let mut batch = WriteBatch::new();
    batch.put(b"side".to_vec(), b"effect".to_vec()).unwrap();
    batch
        .check(b"guard".to_vec(), Some(b"new".to_vec()))
        .unwrap();
    assert!(backend.commit(batch).is_err());
    assert_eq!(get(backend, b"side"), None);
}

fn limits_are_enforced(backend: &dyn KvBackend) {
    let mut batch = WriteBatch::new();
    assert!(matches!(
        batch.put(vec![0; KEY_BYTES_MAX + 1], vec![]),
        Err(KvError::KeyTooLarge(_))
    ));
    assert!(matches!(
        batch.put(b"k".to_vec(), vec![0; VALUE_BYTES_MAX + 1]),
        Err(KvError::ValueTooLarge(_))
    ));
    batch
        .put(b"max".to_vec(), vec![7; VALUE_BYTES_MAX])
        .unwrap();
    let mut big = WriteBatch::new();
    let mut failed = false;
    for index in 0..(BATCH_BYTES_MAX / VALUE_BYTES_MAX + 1) {
        if let Err(error) = big.put(index.to_be_bytes().to_vec(), vec![0; VALUE_BYTES_MAX]) {
            assert!(matches!(error, KvError::BatchTooLarge(_)));
            failed = true;
        }
    }
    assert!(failed, "a batch over {BATCH_BYTES_MAX} bytes was accepted");
    backend.commit(batch).unwrap();
    assert_eq!(get(backend, b"max").map(|v| v.len()), Some(VALUE_BYTES_MAX));
}

fn snapshots_are_isolated(backend: &dyn KvBackend) {
    put(backend, &[(b"x", b"before")]);
    let snapshot = backend.snapshot().unwrap();
    put(backend, &[(b"x", b"after"), (b"y", b"new")]);
    assert_eq!(snapshot.get(b"x").unwrap().as_deref(), Some(&b"before"[..]));
    assert_eq!(snapshot.get(b"y").unwrap(), None);
    assert_eq!(get(backend, b"x").as_deref(), Some(&b"after"[..]));
}

fn binary_keys_sort_bytewise(backend: &dyn KvBackend) {
    put(
        backend,
        &[
            (&[0xff, 0x00], b""),
            (&[0x00], b""),
            (&[0x7f, 0xff], b""),
            (&[0xff], b""),
        ],
    );
    let snapshot = backend.snapshot().unwrap();
    let all = snapshot
        .scan(Bound::Unbounded, Bound::Unbounded, 10, false)
        .unwrap();
    assert_eq!(
        keys(&all),
        [&[0x00][..], &[0x7f, 0xff], &[0xff], &[0xff, 0x00]]
    );
    let high = scan_prefix(snapshot.as_ref(), &[0xff], 10).unwrap();
    assert_eq!(keys(&high), [&[0xff][..], &[0xff, 0x00]]);
}

/// Segment values (`s/…`, which the embedded backend keeps in pack files) read, scan, check
/// and delete like every other value, merged in key order with the keys around them.
fn segments_read_like_any_value(backend: &dyn KvBackend) {
    let big: Vec<u8> = (0..60_000u32).map(|i| (i * 7) as u8).collect();
    put(
        backend,
        &[
            (b"r/1", b"before"),
            (b"s/b", &big),
            (b"s/a", b"first segment"),
            (b"s/", b""),
            (b"t/1", b"after"),
        ],
    );
    let snapshot = backend.snapshot().unwrap();
    assert_eq!(snapshot.get(b"s/b").unwrap().as_deref(), Some(&big[..]));
    assert_eq!(
        snapshot.get_slice(b"s/b", 100, 5).unwrap().as_deref(),
        Some(&big[100..105])
    );
    assert_eq!(snapshot.get_slice(b"s/b", 59_999, 2).unwrap(), None);
    assert_eq!(snapshot.get_slice(b"s/zz", 0, 1).unwrap(), None);
    assert!(snapshot.contains(b"s/a").unwrap());
    let all = snapshot
        .scan(Bound::Unbounded, Bound::Unbounded, 100, false)
        .unwrap();
    assert_eq!(keys(&all), vec![&b"r/1"[..], b"s/", b"s/a", b"s/b", b"t/1"]);
    assert_eq!(all[3].1, big);
    let backwards = snapshot
        .scan(Bound::Unbounded, Bound::Excluded(b"t/"), 2, true)
        .unwrap();
    assert_eq!(keys(&backwards), vec![&b"s/b"[..], b"s/a"]);
    let lengths = snapshot
        .scan_key_lengths(Bound::Included(b"s/"), Bound::Unbounded, 3)
        .unwrap();
    assert_eq!(
        lengths,
        vec![
            (b"s/".to_vec(), 0),
            (b"s/a".to_vec(), 13),
            (b"s/b".to_vec(), 60_000)
        ]
    );
    // A check on a segment, a put and a delete in one batch.
    let mut batch = WriteBatch::new();
    batch
        .check(b"s/a".to_vec(), Some(b"first segment".to_vec()))
        .unwrap();
    batch.put(b"s/c".to_vec(), b"third".to_vec()).unwrap();
    batch.delete(b"s/b".to_vec()).unwrap();
    backend.commit(batch).unwrap();
    let mut stale = WriteBatch::new();
    stale.check(b"s/b".to_vec(), Some(big.clone())).unwrap();
    stale.put(b"s/d".to_vec(), b"never".to_vec()).unwrap();
    assert!(matches!(
        backend.commit(stale),
        Err(KvError::Conflict { .. })
    ));
    assert_eq!(get(backend, b"s/b"), None);
    assert_eq!(get(backend, b"s/d"), None);
    assert_eq!(get(backend, b"s/c").as_deref(), Some(&b"third"[..]));
    // The snapshot taken before still reads what it saw.
    assert_eq!(snapshot.get(b"s/b").unwrap().as_deref(), Some(&big[..]));
}
