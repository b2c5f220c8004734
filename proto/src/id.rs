//! Identifiers: 32-byte BLAKE3 digests for content, ed25519 public keys for nodes.
//!
//! All of them print and parse as lowercase hex, and serialise that way in JSON. `hex_id!` makes such
//! types; the credit types in `credits` are made with it too.

/// A hex string did not decode to the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {hex_len} hex characters for a {kind}, got {got:?}")]
pub struct ParseIdError {
    kind: &'static str,
    hex_len: usize,
    got: String,
}

/// `N` bytes from their hex form; `kind` names what was expected, for the error.
pub(crate) fn parse_hex<const N: usize>(kind: &'static str, s: &str) -> Result<[u8; N], ParseIdError> {
    let mut out = [0u8; N];
    let bad = || ParseIdError { kind, hex_len: 2 * N, got: s.chars().take(80).collect() };
    hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// A fixed-size byte string that prints, parses and serialises as lowercase hex (what every fogcdn JSON
/// form carries), so callers hold bytes and never parse hex at the point of use.
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                ::hex::encode(self.0)
            }
        }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                // Short form keeps logs readable; Display gives the full value.
                write!(f, concat!($kind, "({})"), &self.to_hex()[..12])
            }
        }
        impl ::std::str::FromStr for $name {
            type Err = $crate::id::ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::id::parse_hex($kind, s).map(Self)
            }
        }
        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use hex_id;

hex_id!(
    /// BLAKE3 hash of one chunk's bytes: the key under which nodes cache and serve it.
    ChunkHash,
    "chunk",
    32
);
hex_id!(
    /// BLAKE3 hash of a manifest's canonical encoding: names one immutable version of an object.
    ContentId,
    "content",
    32
);
hex_id!(
    /// A node's ed25519 public key. Clients pin it when they connect, so it names the node everywhere.
    NodeId,
    "node",
    32
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
