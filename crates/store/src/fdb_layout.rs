//! The FoundationDB store's layout and what FoundationDB counts, without the client
//! library: the subspaces under the store's key prefix and the transaction size estimate
//! (the location and the prefix rule are `kairos_core::store_backend`). Built in every build (the backend itself needs `--features foundationdb`), so
//! these rules are tested where FoundationDB's client cannot be installed.

use crate::kv::{Mutation, WriteBatch};

/// FoundationDB refuses a transaction larger than this (keys, values and conflict ranges).
pub const TRANSACTION_BYTES_MAX: usize = 10_000_000;
/// Bytes FoundationDB adds per mutation and per conflict range, as estimated here.
pub const ITEM_OVERHEAD_BYTES: usize = 48;
/// Tag after the prefix of the store's own keys.
pub const DATA_TAG: u8 = 0x01;
/// Tag after the prefix of the backend's keys (damage and commit markers).
pub const META_TAG: u8 = 0x02;

/// `<prefix> <tag>`: the start of one subspace of the store under `prefix`.
pub fn subspace(prefix: &str, tag: u8) -> Vec<u8> {
    let mut key = prefix.as_bytes().to_vec();
    key.push(tag);
    key
}

/// FoundationDB's own size of the transaction that commits `batch` with `prefix_bytes`
/// of prefix on every key: every key and value written, a write conflict range per
/// mutation, a read conflict range per check, and a fixed cost per item. The batch's own
/// count ([`WriteBatch::bytes`]) has keys and values only.
pub fn transaction_bytes(batch: &WriteBatch, prefix_bytes: usize) -> usize {
    let range = |key: &[u8]| 2 * (prefix_bytes + key.len()) + 1 + ITEM_OVERHEAD_BYTES;
    let mutations: usize = batch
        .mutations()
        .iter()
        .map(|mutation| match mutation {
            Mutation::Put { key, value } => {
                prefix_bytes + key.len() + value.len() + ITEM_OVERHEAD_BYTES + range(key)
            }
            // A clear is a range mutation, plus its write conflict range.
            Mutation::Delete { key } => 2 * range(key),
        })
        .sum();
    let checks: usize = batch.checks().iter().map(|(key, _)| range(key)).sum();
    mutations + checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subspaces_of_different_prefixes_never_nest() {
        let a = subspace("ab", DATA_TAG);
        let b = subspace("abc", DATA_TAG);
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
        assert!(subspace("ab", DATA_TAG) < subspace("ab", META_TAG));
    }

    #[test]
    fn transaction_bytes_count_prefixes_and_conflict_ranges() {
        let mut batch = WriteBatch::new();
        batch.put(b"key".to_vec(), vec![0; 100]).unwrap();
        batch.check(b"head".to_vec(), None).unwrap();
        let bytes = transaction_bytes(&batch, 7);
        assert!(bytes > batch.bytes() + 3 * 7, "{bytes}");
        // A batch of small pairs within the batch limit is over FoundationDB's size: such a
        // batch is refused before it is sent.
        let mut small = WriteBatch::new();
        let mut index = 0u64;
        while small.put(index.to_be_bytes().to_vec(), vec![0; 32]).is_ok() {
            index += 1;
        }
        assert!(transaction_bytes(&small, 7) > TRANSACTION_BYTES_MAX);
        // Large values are dominated by their bytes: 99 values of 100 kB fit.
        let mut large = WriteBatch::new();
        for index in 0..99u32 {
            large
                .put(index.to_be_bytes().to_vec(), vec![0; 100_000])
                .unwrap();
        }
        assert!(transaction_bytes(&large, 7) < TRANSACTION_BYTES_MAX);
    }
}
