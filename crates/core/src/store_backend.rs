//! Which key-value backend holds a store, as the configuration names it and the store
//! opens it: the embedded redb file, or a FoundationDB cluster under a key prefix.

use std::path::PathBuf;

/// The names `[store] backend` accepts.
pub const STORE_BACKENDS: [&str; 2] = ["redb", "foundationdb"];
/// The longest key prefix of a FoundationDB store.
pub const KEY_PREFIX_BYTES_MAX: usize = 64;
/// The key prefix of a FoundationDB store unless another is configured.
pub const KEY_PREFIX_DEFAULT: &str = "kairos";

/// Which key-value backend holds a store (`[store] backend`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreBackend {
    /// The embedded file `kairos.redb` in the data directory.
    #[default]
    Redb,
    /// A FoundationDB cluster (in a build with `--features foundationdb`).
    FoundationDb(FdbLocation),
}

impl StoreBackend {
    /// Whether the store is the embedded file in the data directory.
    pub fn is_embedded(&self) -> bool {
        matches!(self, StoreBackend::Redb)
    }

    /// The backend's name, as `[store] backend` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            StoreBackend::Redb => STORE_BACKENDS[0],
            StoreBackend::FoundationDb(_) => STORE_BACKENDS[1],
        }
    }
}

/// Where a FoundationDB store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbLocation {
    /// The cluster file; `None`: the client's default (`/etc/foundationdb/fdb.cluster`).
    pub cluster_file: Option<PathBuf>,
    /// The store's keys live under this prefix, so several stores can share a cluster.
    pub key_prefix: String,
}

/// Checks a store's key prefix: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`. Every such byte
/// sorts above the tags the backend puts after the prefix, so no store's keys fall inside
/// another's.
pub fn check_key_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > KEY_PREFIX_BYTES_MAX {
        return Err(format!(
            "key prefix {prefix:?} must be 1 to {KEY_PREFIX_BYTES_MAX} bytes"
        ));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "key prefix {prefix:?} holds {bad:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes_are_checked() {
        check_key_prefix(KEY_PREFIX_DEFAULT).unwrap();
        check_key_prefix("team-a.kairos_2").unwrap();
        let long = "x".repeat(KEY_PREFIX_BYTES_MAX + 1);
        for bad in ["", "a/b", "a\0", "é", &long] {
            let error = check_key_prefix(bad).unwrap_err();
            assert!(error.starts_with("key prefix"), "{error}");
        }
    }
}
