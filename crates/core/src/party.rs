//! Parties and roles: who may do what through the API. A party is a team or pipeline with
//! one role (each role may do what the roles below it may) and, optionally, the replicas it
//! is limited to. Its token is shown once and stored only as a hash.

use serde::{Deserialize, Serialize};

use crate::{Hash, Instant};

/// Domain byte of token hashes.
const TOKEN_DOMAIN: u8 = 0x54;
/// Bytes of randomness in a token.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// Every token starts with this, so a leaked one is recognisable in logs and scanners.
pub const TOKEN_PREFIX: &str = "kairos_";

/// What a party may do, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads: history, state, files, diffs, timelines, proposals, commits, the log.
    Viewer,
    /// Proposes changes, forks and deletes timelines, makes sandboxes, captures.
    Proposer,
    /// Reviews others' proposals (approvals come with collaboration).
    Reviewer,
    /// Commits proposals to the live replica and reverts it.
    Committer,
    /// Registers replicas (and so the commands they run), restores into the node's file
    /// system, verifies the store, manages parties.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Proposer,
        Role::Reviewer,
        Role::Committer,
        Role::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Proposer => "proposer",
            Role::Reviewer => "reviewer",
            Role::Committer => "committer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A party as stored: never its token, only the token's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartyRecord {
    pub name: String,
    pub role: Role,
    /// The replicas it may act on; empty: all.
    pub replicas: Vec<String>,
    pub token_hash: Hash,
    pub created: Instant,
    /// The bcrypt hash of the token, for nats-server, which checks a party's NATS password
    /// (its token) against it. Parties added before NATS credentials existed have none and
    /// get no NATS user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_password_bcrypt: Option<String>,
}

impl PartyRecord {
    /// Whether the party may act on `replica`.
    pub fn covers(&self, replica: &str) -> bool {
        self.replicas.is_empty() || self.replicas.iter().any(|name| name == replica)
    }
}

/// The hash a token is stored and looked up by.
pub fn token_hash(token: &str) -> Hash {
    Hash::of(TOKEN_DOMAIN, token.as_bytes())
}

/// A token from `random` bytes (the caller draws them from the operating system).
pub fn token_from(random: &[u8; TOKEN_RANDOM_BYTES]) -> String {
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES);
    token.push_str(TOKEN_PREFIX);
    for byte in random {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Viewer < Role::Proposer && Role::Committer < Role::Admin);
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn tokens_are_prefixed_and_hash_apart() {
        let one = token_from(&[1; TOKEN_RANDOM_BYTES]);
        let two = token_from(&[2; TOKEN_RANDOM_BYTES]);
        assert!(one.starts_with(TOKEN_PREFIX));
        assert_eq!(one.len(), TOKEN_PREFIX.len() + 64);
        assert_ne!(token_hash(&one), token_hash(&two));
    }
}
