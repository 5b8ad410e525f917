//! BLAKE3 content hashes: the address of every stored object and the id of every frame.

use std::fmt;
use std::str::FromStr;

/// A 32-byte BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub const LEN: usize = 32;

    /// The hash of `bytes` under `domain`, so that objects of different kinds never collide.
    pub fn of(domain: u8, bytes: &[u8]) -> Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&[domain]);
        hasher.update(bytes);
        Hash(*hasher.finalize().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Hash> {
        <[u8; 32]>::try_from(bytes).ok().map(Hash)
    }

    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(HEX[(byte >> 4) as usize]));
            out.push(char::from(HEX[(byte & 0xf) as usize]));
        }
        out
    }

    /// The first `len` hex digits, as shown to users.
    pub fn short(&self) -> String {
        let mut hex = self.to_hex();
        hex.truncate(12);
        hex
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashParseError {
    #[error("{0:?} is not a hex digit string")]
    NotHex(String),
    #[error("{0:?} has {1} hex digits, a full hash has 64")]
    WrongLength(String, usize),
}

/// Checks that `text` is a (possibly partial) lowercase or uppercase hex string.
pub fn parse_hex_prefix(text: &str) -> Result<String, HashParseError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HashParseError::NotHex(text.to_string()));
    }
    if text.len() > 64 {
        return Err(HashParseError::WrongLength(text.to_string(), text.len()));
    }
    Ok(text.to_ascii_lowercase())
}

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(text: &str) -> Result<Hash, HashParseError> {
        let hex = parse_hex_prefix(text)?;
        if hex.len() != 64 {
            return Err(HashParseError::WrongLength(text.to_string(), hex.len()));
        }
        let mut out = [0u8; 32];
        for (index, pair) in hex.as_bytes().chunks(2).enumerate() {
            let high = (pair[0] as char).to_digit(16).unwrap_or(0) as u8;
            let low = (pair[1] as char).to_digit(16).unwrap_or(0) as u8;
            out[index] = (high << 4) | low;
        }
        Ok(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hex_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let hash = Hash(bytes);
            prop_assert_eq!(hash.to_hex().parse::<Hash>().unwrap(), hash);
        }
    }

    #[test]
    fn domains_separate_equal_bytes() {
        assert_ne!(Hash::of(1, b"abc"), Hash::of(2, b"abc"));
    }

    #[test]
    fn rejects_bad_hex() {
        assert!(matches!(
            "xyz".parse::<Hash>(),
            Err(HashParseError::NotHex(_))
        ));
        assert!(matches!(
            "abcd".parse::<Hash>(),
            Err(HashParseError::WrongLength(_, 4))
        ));
    }
}
