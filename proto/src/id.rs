//! Identifiers: 32-byte BLAKE3 digests for content, ed25519 public keys for nodes.
//!
//! All of them print and parse as lowercase hex, and serialise that way in JSON.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A hex string did not decode to the expected 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hex characters for a {kind}, got {got:?}")]
pub struct ParseIdError {
    kind: &'static str,
    got: String,
}

fn parse_32(kind: &'static str, s: &str) -> Result<[u8; 32], ParseIdError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError { kind, got: s.chars().take(80).collect() })?;
    Ok(out)
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Short form keeps logs readable; Display gives the full id.
                write!(f, concat!($kind, "({})"), &self.to_hex()[..12])
            }
        }
        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_32($kind, s).map(Self)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// BLAKE3 hash of one chunk's bytes: the key under which nodes cache and serve it.
    ChunkHash,
    "chunk"
);
hex_id!(
    /// BLAKE3 hash of a manifest's canonical encoding: names one immutable version of an object.
    ContentId,
    "content"
);
hex_id!(
    /// A node's ed25519 public key. Clients pin it when they connect, so it names the node everywhere.
    NodeId,
    "node"
);

impl ChunkHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl NodeId {
    /// The ed25519 verifying key, if these bytes are a valid curve point.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, ed25519_dalek::SignatureError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0)
    }
}

impl From<ed25519_dalek::VerifyingKey> for NodeId {
    fn from(key: ed25519_dalek::VerifyingKey) -> Self {
        Self(key.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_json() {
        let h = ChunkHash::of(b"hello");
        let parsed: ChunkHash = h.to_string().parse().expect("parse");
        assert_eq!(parsed, h);
        let json = serde_json::to_string(&h).expect("json");
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<ChunkHash>(&json).expect("from json"), h);
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("abc".parse::<NodeId>().is_err());
        assert!("zz".repeat(32).parse::<ContentId>().is_err());
    }
}
