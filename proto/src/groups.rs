//! Verified streaming below the chunk.
//!
//! BLAKE3 hashes a chunk as a binary tree of 1 KiB leaves, so the chunk splits into aligned *groups* of
//! `group size` bytes (a power of two, at least 1 KiB) whose chaining values merge up to the chunk hash
//! ([`blake3::hazmat`]). Whoever knows a chunk's group hashes — checked against its chunk hash first — can
//! verify each group on its own as it arrives, and pass it on (to the next tier, to the player) before the
//! rest of the chunk has arrived. Chunk hashes do not change: a chunk hashed whole and one verified group by
//! group have the same name.
//!
//! A chunk of one group has no group hashes: its chunk hash is the only check, as without groups.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::ChunkHash;

/// Smallest group: one BLAKE3 leaf.
pub const MIN_GROUP_SIZE: u32 = 1024;
/// Default group size: 16 hashes (512 B) per 1 MiB chunk, and a group crosses a 1 MiB/s uplink in 62 ms.
pub const DEFAULT_GROUP_SIZE: u32 = 64 * 1024;
/// Most groups one chunk may have: bounds a request's group hashes (8 KiB) and a manifest's.
pub const MAX_GROUPS_PER_CHUNK: usize = 256;

/// Why group hashes cannot be used for a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("group size {0} is not a power of two of at least {MIN_GROUP_SIZE} bytes")]
    Size(u32),
    #[error("{listed} group hashes for a chunk of {len} bytes in groups of {group_size} (expected {expected})")]
    Count { listed: usize, expected: usize, len: u32, group_size: u32 },
    #[error("group hashes do not merge to the chunk hash")]
    Root,
    #[error("groups of {size} bytes make more than {MAX_GROUPS_PER_CHUNK} groups of a {chunk_size}-byte chunk: use at least {least}")]
    TooMany { size: u32, chunk_size: u32, least: u32 },
}

/// Whether `size` can be a group size.
pub fn check_size(size: u32) -> Result<(), GroupError> {
    if size >= MIN_GROUP_SIZE && size.is_power_of_two() {
        Ok(())
    } else {
        Err(GroupError::Size(size))
    }
}

/// The group size to use for chunks of `chunk_size` given a configured `size` in bytes: `None` for 0 (group
/// hashes off) or a size not below the chunk size (one group a chunk: nothing to gain).
pub fn configured(size: u64, chunk_size: u32) -> Result<Option<u32>, GroupError> {
    if size == 0 {
        return Ok(None);
    }
    let size = u32::try_from(size).map_err(|_| GroupError::Size(u32::MAX))?;
    check_size(size)?;
    if group_count(chunk_size, size) > MAX_GROUPS_PER_CHUNK {
        let least = chunk_size.div_ceil(MAX_GROUPS_PER_CHUNK as u32).next_power_of_two();
        return Err(GroupError::TooMany { size, chunk_size, least });
    }
    Ok((size < chunk_size).then_some(size))
}

/// How many groups a chunk of `len` bytes has (at least one).
pub fn group_count(len: u32, group_size: u32) -> usize {
    len.div_ceil(group_size).max(1) as usize
}

/// How many group hashes a chunk of `len` bytes carries: none for a chunk of one group.
pub fn hash_count(len: u32, group_size: u32) -> usize {
    match group_count(len, group_size) {
        1 => 0,
        n => n,
    }
}

/// The chaining values of one chunk's groups, in order (empty for a chunk of one group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupHashes(pub Vec<ChainingValue>);

impl GroupHashes {
    /// The group hashes of `chunk` in groups of `group_size` (a valid size, see [`check_size`]).
    pub fn of(chunk: &[u8], group_size: u32) -> Self {
        if chunk.len() <= group_size as usize {
            return Self::default();
        }
        let groups = chunk.chunks(group_size as usize).enumerate();
        Self(groups.map(|(i, g)| group_cv(g, i as u64 * u64::from(group_size))).collect())
    }

    /// Checks that these hashes are exactly the groups of a chunk of `len` bytes named `hash`.
    pub fn check(&self, hash: ChunkHash, len: u32, group_size: u32) -> Result<(), GroupError> {
        check_size(group_size)?;
        let expected = hash_count(len, group_size);
        if self.0.len() != expected {
            return Err(GroupError::Count { listed: self.0.len(), expected, len, group_size });
        }
        if expected == 0 || self.root(len, group_size) == hash {
            Ok(())
        } else {
            Err(GroupError::Root)
        }
    }

    /// The chunk hash these group hashes (at least two, counted for `len` and `group_size`) merge to.
    pub fn root(&self, len: u32, group_size: u32) -> ChunkHash {
        let (left, right) = split(u64::from(len));
        let root = hazmat::merge_subtrees_root(
            &self.merge(0, left, group_size),
            &self.merge(left, right, group_size),
            Mode::Hash,
        );
        ChunkHash(*root.as_bytes())
    }

    /// The chaining value of the subtree of `len` bytes at `offset`, from the group hashes it covers.
    fn merge(&self, offset: u64, len: u64, group_size: u32) -> ChainingValue {
        if len <= u64::from(group_size) {
            return self.0[(offset / u64::from(group_size)) as usize];
        }
        let (left, right) = split(len);
        hazmat::merge_subtrees_non_root(
            &self.merge(offset, left, group_size),
            &self.merge(offset + left, right, group_size),
            Mode::Hash,
        )
    }

    /// The hashes as bytes, 32 per group.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.concat()
    }

    /// Hashes from 32 bytes each; `None` if `bytes` is not a multiple of 32 long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(32) {
            return None;
        }
        Some(Self(bytes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect()))
    }
}

/// How BLAKE3 splits a subtree of `len` (> 1 KiB) bytes: the left part is the largest power of two of
/// leaves that leaves the right part non-empty. For `len` above a group size, both parts are whole groups
/// on the left, so group hashes merge along the same tree.
fn split(len: u64) -> (u64, u64) {
    let left = hazmat::left_subtree_len(len);
    (left, len - left)
}

/// A hasher for the group at byte `offset` of a chunk (a group boundary, or the chunk's end, where no
/// bytes follow and the offset does not matter).
fn hasher_at(offset: u32) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    if offset.is_multiple_of(MIN_GROUP_SIZE) {
        h.set_input_offset(u64::from(offset));
    }
    h
}

fn group_cv(group: &[u8], offset: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(group);
    h.finalize_non_root()
}

impl Serialize for GroupHashes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for GroupHashes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        use serde::de::Error;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() > MAX_GROUPS_PER_CHUNK * 32 * 4 / 3 + 4 {
            return Err(D::Error::custom("too many group hashes"));
        }
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.as_bytes()).map_err(D::Error::custom)?;
        Self::from_bytes(&bytes).ok_or_else(|| D::Error::custom("group hashes are 32 bytes each"))
    }
}

/// A chunk mismatched its hash: in group `group` (its byte offset is `offset`), or as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bytes at offset {offset} of chunk {hash} do not match its hash")]
pub struct Mismatch {
    pub hash: ChunkHash,
    pub offset: u32,
}

/// Verifies a chunk's bytes as they arrive, in pieces of any size, and says how many are verified: with
/// group hashes, every whole group as soon as its last byte arrives; without, the whole chunk at its end.
/// The caller keeps the bytes and passes on only the verified prefix.
#[derive(Debug, Clone)]
pub struct Verifier {
    hash: ChunkHash,
    len: u32,
    /// Group size and hashes, checked against `hash`; `None` verifies the chunk whole.
    groups: Option<(u32, GroupHashes)>,
    hasher: blake3::Hasher,
    /// Bytes taken; `verified` of them are verified.
    taken: u32,
    verified: u32,
}

impl Verifier {
    /// A verifier for the chunk `hash` of `len` bytes, by groups when `groups` (size, hashes) is given and
    /// checks out against `hash` (it must: the caller checked it, or this is an error).
    pub fn new(hash: ChunkHash, len: u32, groups: Option<(u32, GroupHashes)>) -> Result<Self, GroupError> {
        let groups = match groups {
            Some((size, hashes)) => {
                hashes.check(hash, len, size)?;
                // One group: nothing to gain over the chunk hash.
                (!hashes.0.is_empty()).then_some((size, hashes))
            }
            None => None,
        };
        Ok(Self { hash, len, groups, hasher: blake3::Hasher::new(), taken: 0, verified: 0 })
    }

    /// A verifier that goes on from the last verified byte, forgetting what was taken after it: where a
    /// source that failed part-way leaves off and the next one starts (from the start of the chunk
    /// without groups).
    pub fn rewound(&self) -> Self {
        Self { hasher: hasher_at(self.verified), taken: self.verified, ..self.clone() }
    }

    /// Bytes of the chunk verified so far (from its start, including those verified elsewhere).
    pub fn verified(&self) -> u32 {
        self.verified
    }

    /// Whether every byte of the chunk is verified.
    pub fn is_done(&self) -> bool {
        self.verified == self.len
    }

    /// Where the group being taken ends (the chunk's end without groups): its bytes verify there.
    fn next_check(&self) -> u32 {
        match &self.groups {
            Some((size, _)) => (self.taken / size + 1).saturating_mul(*size).min(self.len),
            None => self.len,
        }
    }

    /// Takes the next bytes of the chunk and returns how many bytes are verified now. Bytes past the chunk's
    /// end are a mismatch.
    pub fn update(&mut self, mut piece: &[u8]) -> Result<u32, Mismatch> {
        let mismatch = |offset| Mismatch { hash: self.hash, offset };
        if piece.len() > (self.len - self.taken) as usize {
            return Err(mismatch(self.len));
        }
        while !piece.is_empty() {
            let group_end = self.next_check();
            let take = piece.len().min((group_end - self.taken) as usize);
            self.hasher.update(&piece[..take]);
            self.taken += take as u32;
            piece = &piece[take..];
            if self.taken < group_end {
                break;
            }
            let ok = match &self.groups {
                Some((size, hashes)) => hashes.0[(self.verified / size) as usize] == self.hasher.finalize_non_root(),
                None => self.hasher.finalize().as_bytes() == self.hash.as_bytes(),
            };
            if !ok {
                return Err(mismatch(self.verified));
            }
            self.verified = self.taken;
            self.hasher = hasher_at(self.taken);
        }
        Ok(self.verified)
    }
}

/// A [`Verifier`] with the bytes it has not verified yet: bytes go in as they arrive from a source and come
/// out once verified, a group (or the whole chunk) at a time.
#[derive(Debug, Clone)]
pub struct Gate {
    verifier: Verifier,
    /// At most one group (the whole chunk without groups).
    pending: BytesMut,
    /// Bytes at the end of `pending` the verifier has not taken yet.
    unhashed: usize,
}

/// Bytes the verifier takes at once, unless a group or the chunk ends sooner. Pieces arrive ~1 KiB at a time
/// (one QUIC packet each), and BLAKE3 hashes one leaf after another within such small updates; given 64 KiB it
/// hashes 16 leaves side by side (SIMD), 4–5× faster.
const HASH_BATCH: usize = 64 * 1024;

impl Gate {
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier, pending: BytesMut::new(), unhashed: 0 }
    }

    /// Takes the next bytes; returns those that verified with them, if any.
    pub fn push(&mut self, piece: &[u8]) -> Result<Option<Bytes>, Mismatch> {
        if self.pending.capacity() - self.pending.len() < piece.len() {
            self.pending.reserve(piece.len().max(HASH_BATCH));
        }
        self.pending.extend_from_slice(piece);
        self.unhashed += piece.len();
        let arrived = self.verifier.taken as usize + self.unhashed;
        if self.unhashed < HASH_BATCH && arrived < self.verifier.next_check() as usize {
            return Ok(None);
        }
        let before = self.verifier.verified();
        let start = self.pending.len() - std::mem::take(&mut self.unhashed);
        let after = self.verifier.update(&self.pending[start..])?;
        Ok((after > before).then(|| self.pending.split_to((after - before) as usize).freeze()))
    }

    /// Bytes of the chunk verified so far: where the next source must start.
    pub fn verified(&self) -> u32 {
        self.verifier.verified()
    }

    pub fn is_done(&self) -> bool {
        self.verifier.is_done()
    }

    /// After a source failed part-way: drops what it sent past the last verified byte.
    pub fn rewind(&mut self) {
        self.pending.clear();
        self.unhashed = 0;
        self.verifier = self.verifier.rewound();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed).collect()
    }

    #[test]
    fn group_hashes_merge_to_the_chunk_hash_for_every_shape() {
        for group_size in [1024, 4096, 65_536] {
            for len in [1, 1024, 1025, 4095, 4096, 4097, 65_536, 65_537, 100_000, 1 << 20, (1 << 20) - 1, 1_234_567] {
                let chunk = bytes(len, 7);
                let hashes = GroupHashes::of(&chunk, group_size);
                assert_eq!(hashes.0.len(), hash_count(len as u32, group_size), "{len}/{group_size}");
                hashes.check(ChunkHash::of(&chunk), len as u32, group_size).expect("merges to the chunk hash");
            }
        }
    }

    #[test]
    fn wrong_group_hashes_are_refused() {
        let chunk = bytes(300_000, 1);
        let hash = ChunkHash::of(&chunk);
        let mut hashes = GroupHashes::of(&chunk, 65_536);
        assert_eq!(hashes.check(hash, 300_000, 65_536), Ok(()));
        assert!(matches!(hashes.check(hash, 300_000, 32_768), Err(GroupError::Count { .. })));
        assert!(matches!(hashes.check(hash, 300_000, 3000), Err(GroupError::Size(3000))));
        assert_eq!(hashes.check(ChunkHash::of(b"other"), 300_000, 65_536), Err(GroupError::Root));
        hashes.0[2][0] ^= 1;
        assert_eq!(hashes.check(hash, 300_000, 65_536), Err(GroupError::Root));
        hashes.0.swap(0, 1);
        assert_eq!(hashes.check(hash, 300_000, 65_536), Err(GroupError::Root));
    }

    #[test]
    fn the_verifier_releases_each_group_as_it_completes() {
        let chunk = bytes(200_000, 3);
        let hash = ChunkHash::of(&chunk);
        let groups = (65_536, GroupHashes::of(&chunk, 65_536));
        for piece in [1, 1000, 65_536, 70_000, 200_000] {
            let mut v = Verifier::new(hash, 200_000, Some(groups.clone())).expect("valid");
            let mut released = vec![];
            for p in chunk.chunks(piece) {
                released.push(v.update(p).expect("matches"));
            }
            assert!(v.is_done());
            // Verified prefixes are group boundaries, then the end.
            assert!(released.iter().all(|&r| r.is_multiple_of(65_536) || r == 200_000), "{piece}: {released:?}");
            assert!(released.windows(2).all(|w| w[0] <= w[1]));
        }
        // Without groups: nothing until the end.
        let mut whole = Verifier::new(hash, 200_000, None).expect("valid");
        assert_eq!(whole.update(&chunk[..199_999]), Ok(0));
        assert_eq!(whole.update(&chunk[199_999..]), Ok(200_000));
    }

    #[test]
    fn the_verifier_stops_at_the_first_bad_group_and_goes_on_from_the_last_verified_byte() {
        let chunk = bytes(200_000, 5);
        let hash = ChunkHash::of(&chunk);
        let groups = (65_536, GroupHashes::of(&chunk, 65_536));
        let mut bad = chunk.clone();
        bad[140_000] ^= 0x80;
        let mut v = Verifier::new(hash, 200_000, Some(groups.clone())).expect("valid");
        assert_eq!(v.update(&bad[..131_072]), Ok(131_072));
        assert_eq!(v.update(&bad[131_072..]), Err(Mismatch { hash, offset: 131_072 }));
        // The rest from elsewhere, from the first unverified group.
        let mut rewound = v.rewound();
        assert_eq!((rewound.verified(), rewound.update(&chunk[131_072..])), (131_072, Ok(200_000)));
        // Too many bytes, or a wrong chunk without groups.
        let mut over = Verifier::new(hash, 200_000, Some(groups)).expect("valid");
        assert!(over.update(&bytes(200_001, 5)).is_err());
        let mut whole = Verifier::new(hash, 200_000, None).expect("valid");
        assert_eq!(whole.update(&bad), Err(Mismatch { hash, offset: 0 }));
        assert!(Verifier::new(hash, 200_000, Some((65_536, GroupHashes::default()))).is_err());
    }

    #[test]
    fn the_gate_lets_through_verified_bytes_only() {
        let chunk = bytes(150_000, 11);
        let hash = ChunkHash::of(&chunk);
        let mut gate =
            Gate::new(Verifier::new(hash, 150_000, Some((65_536, GroupHashes::of(&chunk, 65_536)))).expect("valid"));
        assert_eq!(gate.push(&chunk[..70_000]), Ok(Some(Bytes::copy_from_slice(&chunk[..65_536]))));
        // A source that fails part-way: the rest comes from another, from the first unverified byte.
        gate.rewind();
        assert_eq!(gate.verified(), 65_536);
        let rest = gate.push(&chunk[65_536..]).expect("matches").expect("the rest verified");
        assert_eq!(&rest[..], &chunk[65_536..]);
        assert!(gate.is_done());
    }

    /// Pieces as QUIC delivers them (~1 KiB) are hashed in batches, but every group still comes out as it
    /// completes, and bytes past the chunk's end are still refused.
    #[test]
    fn the_gate_releases_groups_of_small_pieces_as_they_complete() {
        let chunk = bytes(300_000, 13);
        let hash = ChunkHash::of(&chunk);
        for groups in [Some((65_536, GroupHashes::of(&chunk, 65_536))), None] {
            let mut gate = Gate::new(Verifier::new(hash, 300_000, groups.clone()).expect("valid"));
            let mut out = Vec::new();
            for (i, piece) in chunk.chunks(1_200).enumerate() {
                if let Some(ready) = gate.push(piece).expect("matches") {
                    let end = (i + 1) * 1_200;
                    let boundary = if groups.is_some() { end / 65_536 * 65_536 } else { 0 };
                    assert!(out.len() + ready.len() == boundary || end >= 300_000, "released late at {end}");
                    out.extend_from_slice(&ready);
                }
            }
            assert_eq!(out, chunk);
            assert!(gate.push(b"x").is_err(), "a byte past the end");
        }
    }

    #[test]
    fn configured_sizes_are_checked() {
        assert_eq!(configured(0, 1 << 20), Ok(None));
        assert_eq!(configured(65_536, 1 << 20), Ok(Some(65_536)));
        assert_eq!(configured(1 << 20, 1 << 20), Ok(None));
        assert_eq!(configured(3000, 1 << 20), Err(GroupError::Size(3000)));
        assert_eq!(configured(1 << 40, 1 << 20), Err(GroupError::Size(u32::MAX)));
        assert!(matches!(configured(16_384, 16 << 20), Err(GroupError::TooMany { least: 65_536, .. })));
    }

    #[test]
    fn hashes_round_trip_as_base64() {
        let hashes = GroupHashes::of(&bytes(100_000, 9), 16_384);
        let json = serde_json::to_string(&hashes).expect("json");
        assert_eq!(json.len(), 2 + (7 * 32 * 4_usize).div_ceil(3));
        assert_eq!(serde_json::from_str::<GroupHashes>(&json).expect("parse"), hashes);
        assert!(serde_json::from_str::<GroupHashes>("\"AAAA\"").is_err());
    }
}
