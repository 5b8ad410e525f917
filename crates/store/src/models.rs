//! Predictor model files of each replica, versioned. A model file is opaque bytes here
//! (the predictor's safetensors file) with a caller's JSON summary (training range,
//! held-out figures); it is split into parts that fit the backend's value limit and
//! written in one batch with its record, guarded so two trainers never take the same
//! version. Reading checks the length and BLAKE3 hash of the reassembled file.

use kairos_core::Instant;
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::kv::WriteBatch;
use crate::store::{Store, StoreError};

/// Largest model file stored (one batch holds the whole file, under the 10 MB limit).
pub const MODEL_BYTES_MAX: usize = 8 << 20;
/// Bytes per stored part (under the backend's 100 kB value limit).
pub const MODEL_PART_BYTES: usize = 64 << 10;
/// Largest summary stored beside a model.
pub const MODEL_SUMMARY_BYTES_MAX: usize = 16 << 10;

/// The record of one stored model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// 1 for a replica's first model, then one more for each.
    pub version: u32,
    pub created: Instant,
    pub bytes: u64,
    pub parts: u32,
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
    /// The caller's JSON summary (the model header).
    pub summary: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error(
        "replica {replica:?}: model of {bytes} bytes exceeds the limit of {MODEL_BYTES_MAX} bytes"
    )]
    TooLarge { replica: String, bytes: usize },
    #[error(
        "replica {replica:?}: model summary of {bytes} bytes exceeds the limit of {MODEL_SUMMARY_BYTES_MAX} bytes"
    )]
    SummaryTooLarge { replica: String, bytes: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::kv::KvError> for ModelStoreError {
    fn from(error: crate::kv::KvError) -> ModelStoreError {
        ModelStoreError::Store(error.into())
    }
}

fn corrupt(key: &[u8], problem: impl ToString) -> StoreError {
    StoreError::BadRecord {
        what: "model",
        key: crate::kv::printable(key),
        problem: problem.to_string(),
    }
}

impl Store {
    /// Stores a new model version of `replica` and returns its record. A concurrent
    /// writer that took the same version first makes this fail with a conflict.
    pub fn put_model(
        &self,
        replica: &str,
        created: Instant,
        bytes: &[u8],
        summary: &str,
    ) -> Result<ModelRecord, ModelStoreError> {
        if bytes.len() > MODEL_BYTES_MAX {
            return Err(ModelStoreError::TooLarge {
                replica: replica.to_string(),
                bytes: bytes.len(),
            });
        }
        if summary.len() > MODEL_SUMMARY_BYTES_MAX {
            return Err(ModelStoreError::SummaryTooLarge {
                replica: replica.to_string(),
                bytes: summary.len(),
            });
        }
        let version = self
            .model_records(replica)?
            .last()
            .map_or(1, |record| record.version.saturating_add(1));
        let parts = bytes.chunks(MODEL_PART_BYTES);
        let record = ModelRecord {
            version,
            created,
            bytes: bytes.len() as u64,
            parts: parts.len() as u32,
            blake3: blake3::hash(bytes).to_hex().to_string(),
            summary: summary.to_string(),
        };
        let key = keys::model(replica, version);
        let mut batch = WriteBatch::new();
        batch.check(key.clone(), None)?;
        for (index, part) in bytes.chunks(MODEL_PART_BYTES).enumerate() {
            batch.put(
                keys::model_part(replica, version, index as u32),
                part.to_vec(),
            )?;
        }
        let value = serde_json::to_vec(&record).map_err(|error| corrupt(&key, error))?;
        batch.put(key, value)?;
        self.kv().commit(batch)?;
        Ok(record)
    }

    /// Every stored model version of `replica`, oldest first.
    pub fn model_records(&self, replica: &str) -> Result<Vec<ModelRecord>, StoreError> {
        self.reader()?
            .scan_prefix(&keys::replica_prefix(keys::MODEL, replica))?
            .into_iter()
            .map(|(key, value)| {
                serde_json::from_slice(&value).map_err(|error| corrupt(&key, error))
            })
            .collect()
    }

    /// A model version's record and file, checked against the record's length and hash.
    pub fn model(
        &self,
        replica: &str,
        version: u32,
    ) -> Result<Option<(ModelRecord, Vec<u8>)>, StoreError> {
        let reader = self.reader()?;
        let key = keys::model(replica, version);
        let Some(value) = reader.get(&key)? else {
            return Ok(None);
        };
        let record: ModelRecord =
            serde_json::from_slice(&value).map_err(|error| corrupt(&key, error))?;
        if record.bytes > MODEL_BYTES_MAX as u64 {
            return Err(corrupt(
                &key,
                format!("{} bytes is over the limit", record.bytes),
            ));
        }
        let mut bytes = Vec::with_capacity(record.bytes as usize);
        for index in 0..record.parts {
            let part_key = keys::model_part(replica, version, index);
            let part = reader
                .get(&part_key)?
                .ok_or_else(|| corrupt(&part_key, "part is missing"))?;
            bytes.extend_from_slice(&part);
        }
        if bytes.len() as u64 != record.bytes {
            return Err(corrupt(
                &key,
                format!(
                    "{} bytes stored, the record says {}",
                    bytes.len(),
                    record.bytes
                ),
            ));
        }
        if blake3::hash(&bytes).to_hex().as_str() != record.blake3 {
            return Err(corrupt(&key, "hash does not match the record"));
        }
        Ok(Some((record, bytes)))
    }

    /// The newest model of `replica`, if any.
    pub fn latest_model(
        &self,
        replica: &str,
    ) -> Result<Option<(ModelRecord, Vec<u8>)>, StoreError> {
        match self.model_records(replica)?.last() {
            Some(record) => self.model(replica, record.version),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn models_are_versioned_split_and_checked() {
        let (_dir, store) = store();
        assert!(store.latest_model("web").unwrap().is_none());
        let big: Vec<u8> = (0..300_000u32).map(|index| (index % 251) as u8).collect();
        let first = store
            .put_model("web", Instant::now(), &big, "{\"examples\":10}")
            .unwrap();
        assert_eq!((first.version, first.parts), (1, 5));
        let second = store
            .put_model("web", Instant::now(), b"small", "{}")
            .unwrap();
        assert_eq!(second.version, 2);
        assert_eq!(store.model_records("web").unwrap().len(), 2);
        assert!(store.model_records("db").unwrap().is_empty());
        let (record, bytes) = store.latest_model("web").unwrap().unwrap();
        assert_eq!((record.version, bytes.as_slice()), (2, &b"small"[..]));
        let (_, bytes) = store.model("web", 1).unwrap().unwrap();
        assert_eq!(bytes, big);

        // A damaged part is reported as corruption, never returned.
        let mut batch = WriteBatch::new();
        batch
            .put(keys::model_part("web", 1, 2), vec![0; MODEL_PART_BYTES])
            .unwrap();
        store.kv().commit(batch).unwrap();
        let error = store.model("web", 1).unwrap_err();
        assert!(error.is_corruption(), "{error}");
        // A missing part too.
        let mut batch = WriteBatch::new();
        batch.delete(keys::model_part("web", 1, 4)).unwrap();
        store.kv().commit(batch).unwrap();
        assert!(store.model("web", 1).unwrap_err().is_corruption());

        let huge = vec![0u8; MODEL_BYTES_MAX + 1];
        assert!(matches!(
            store.put_model("web", Instant::now(), &huge, "{}"),
            Err(ModelStoreError::TooLarge { .. })
        ));
    }
}
