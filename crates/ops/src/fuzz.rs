//! Entry points for fuzzing: each takes arbitrary bytes and must return — an error is
//! fine — without panicking. The cargo-fuzz targets in `fuzz/` call them for long runs,
//! and `tests/tests/e2e/fuzz_corpus.rs` replays the corpus in `fuzz/corpus` through them on
//! every test run.

use kairos_replica::config::{ConfigFormat, parse};
use kairos_store::node::{ChunkList, ConfigNode, DirNode, RootNode, RuntimeNode, from_bytes};
use kairos_store::object::{ObjectKind, decode};

use crate::wire;

/// Keys a fuzzed config may hold.
const FUZZ_CONFIG_KEYS_MAX: usize = 10_000;

/// A proposal document (JSON or TOML), as `kairos propose --file` reads it.
pub fn proposal_document(data: &[u8]) {
    let _ = kairos_sandbox::ProposalDocument::parse(data);
}

/// A config file of the format the first byte picks, parsed; when it parses, a key named
/// by the text after the last NUL is set and unset, and each result parsed again.
pub fn config_parse_and_edit(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let formats = [
        ConfigFormat::Toml,
        ConfigFormat::Yaml,
        ConfigFormat::Json,
        ConfigFormat::Ini,
        ConfigFormat::Env,
        ConfigFormat::KeyValue,
    ];
    let format = formats[usize::from(selector) % formats.len()];
    let (text, key) = match rest.iter().rposition(|&byte| byte == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &b"server.port"[..]),
    };
    let Ok((format, _)) = parse(format, text, FUZZ_CONFIG_KEYS_MAX) else {
        return;
    };
    let (Ok(text), Ok(key)) = (std::str::from_utf8(text), std::str::from_utf8(key)) else {
        return;
    };
    let value = serde_json::Value::from(8080);
    for edit in [Some(&value), None] {
        if let Ok(after) = kairos_sandbox::config_edit::edit_key(format, text, key, edit) {
            let _ = parse(format, after.as_bytes(), FUZZ_CONFIG_KEYS_MAX);
        }
    }
}

/// Bytes read back from the store: an object's stored value of every kind, and every
/// rkyv node type (validated before it is trusted).
pub fn stored_object(data: &[u8]) {
    for byte in 1..=8u8 {
        if let Some(kind) = ObjectKind::from_byte(byte) {
            let _ = decode(kairos_core::Hash::default(), kind, data, None);
        }
    }
    let _ = from_bytes::<RootNode>(data);
    let _ = from_bytes::<DirNode>(data);
    let _ = from_bytes::<ChunkList>(data);
    let _ = from_bytes::<ConfigNode>(data);
    let _ = from_bytes::<RuntimeNode>(data);
}

/// API request bodies, as the node's handlers decode them.
pub fn api_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<wire::ProposeRequest>(data);
    let _ = serde_json::from_slice::<wire::SandboxRequest>(data);
    let _ = serde_json::from_slice::<wire::CommitRequest>(data);
    let _ = serde_json::from_slice::<wire::RevertRequest>(data);
    let _ = serde_json::from_slice::<wire::ForkRequest>(data);
    let _ = serde_json::from_slice::<wire::AddReplicaRequest>(data);
    let _ = serde_json::from_slice::<wire::RestoreRequest>(data);
    let _ = serde_json::from_slice::<wire::PartyRequest>(data);
}

/// The entry point of each corpus directory under `fuzz/corpus`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "proposal" => proposal_document,
        "config" => config_parse_and_edit,
        "stored_object" => stored_object,
        "api_body" => api_bodies,
        _ => return None,
    })
}
