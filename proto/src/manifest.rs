//! A manifest describes one immutable version of an origin object as a list of fixed-size chunks, each named
//! by its BLAKE3 hash. Whoever holds the manifest can verify every chunk from any untrusted source.

use serde::{Deserialize, Serialize};

use crate::groups::{self, GroupError, GroupHashes};
use crate::{ChunkHash, ContentId};

/// Smallest and largest chunk sizes we accept. The upper bound keeps one chunk comfortably in memory on a
/// 1 GB node; the lower bound keeps manifests (32 B per chunk) small.
pub const MIN_CHUNK_SIZE: u32 = 16 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk size: big enough that per-request overhead is small, small enough to spread load.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Where a publisher places a manifest on the origin, next to its object: `<object URL>` + this suffix
/// (see `docs/operations.md`, "Publishing manifests").
pub const SIDECAR_SUFFIX: &str = ".fog-manifest.json";
/// Largest manifest accepted from a publisher or an origin (a 64 GiB object in 1 MiB chunks is ~4.3 MB).
pub const MAX_MANIFEST_JSON: usize = 8 << 20;
/// Most runs of hashed chunks a manifest still being ingested may list (each seek can start one).
pub const MAX_HASHED_RUNS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The origin URL this object was ingested from.
    pub url: String,
    /// Object size in bytes.
    pub size: u64,
    /// Every chunk but the last is exactly this long.
    pub chunk_size: u32,
    /// BLAKE3 hash of each chunk, in order.
    pub chunks: Vec<ChunkHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Set while the tracker is still reading the object: which chunks are hashed so far. A complete
    /// manifest has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Every chunk's group hashes, so chunks verify group by group as they stream ([`crate::groups`]).
    /// Manifests without them (older ones, or ingested with groups off) verify chunks whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Groups>,
}

/// The group hashes of a manifest's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Groups {
    /// Bytes per group: a power of two from 1 KiB up to the chunk size.
    pub size: u32,
    /// Per chunk, its group hashes: none for a chunk of one group, or one not hashed yet.
    pub hashes: Vec<GroupHashes>,
}

/// How far ingest has got with an object it is still reading. Chunks not yet hashed have placeholder
/// (all-zero) entries in [`Manifest::chunks`]: clients read those bytes from the origin, as without fogcdn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Hashed chunks as sorted, disjoint, non-adjacent runs `[start, end)` of chunk indices.
    pub hashed: Vec<(u64, u64)>,
    /// Whether `size` is the object's length (the origin sent it); if not, `size` is where the hashed
    /// prefix ends and the object may go on.
    pub size_known: bool,
}

impl Progress {
    /// Whether chunk `index` is hashed.
    pub fn is_hashed(&self, index: u64) -> bool {
        let i = self.hashed.partition_point(|&(_, end)| end <= index);
        self.hashed.get(i).is_some_and(|&(start, _)| start <= index)
    }

    /// Marks `[start, end)` hashed, merging runs that touch.
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        self.hashed.retain(|&(s, e)| {
            let apart = e < start || s > end;
            if !apart {
                start = start.min(s);
                end = end.max(e);
            }
            apart
        });
        let at = self.hashed.partition_point(|&(s, _)| s < start);
        self.hashed.insert(at, (start, end));
    }

    /// Chunks hashed, in all.
    pub fn hashed_count(&self) -> u64 {
        self.hashed.iter().map(|(s, e)| e - s).sum()
    }
}

/// A manifest whose fields contradict each other (for example from a misbehaving tracker).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    #[error("manifest lists {listed} chunks but size {size} with chunk size {chunk_size} needs {expected}")]
    ChunkCount { listed: usize, expected: u64, size: u64, chunk_size: u32 },
    #[error("manifest's hashed runs are unsorted, overlapping, beyond its chunks or more than {MAX_HASHED_RUNS}")]
    Progress,
    #[error("manifest's group hashes are wrong for chunk {index}: {error}")]
    Groups { index: usize, error: GroupError },
}

impl Manifest {
    /// Number of chunks an object of `size` bytes needs (an empty object has none).
    pub fn chunk_count_for(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(u64::from(chunk_size))
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        let expected = Self::chunk_count_for(self.size, self.chunk_size);
        if self.chunks.len() as u64 != expected {
            return Err(ManifestError::ChunkCount {
                listed: self.chunks.len(),
                expected,
                size: self.size,
                chunk_size: self.chunk_size,
            });
        }
        if let Some(p) = &self.progress {
            let in_order = p.hashed.windows(2).all(|w| w[0].1 < w[1].0);
            let in_bounds = p.hashed.iter().all(|&(s, e)| s < e && e <= expected);
            // Without a known size the hashed chunks are exactly the prefix `size` covers.
            let prefix = p.size_known || p.hashed.is_empty() || p.hashed == [(0, expected)];
            if !in_order || !in_bounds || !prefix || p.hashed.len() > MAX_HASHED_RUNS {
                return Err(ManifestError::Progress);
            }
        }
        if let Some(g) = &self.groups {
            let wrong = |index, error| Err(ManifestError::Groups { index, error });
            if let Err(e) = groups::check_size(g.size).and_then(|()| {
                let chunk = self.chunk_size;
                (g.size <= chunk && groups::group_count(chunk, g.size) <= groups::MAX_GROUPS_PER_CHUNK)
                    .then_some(())
                    .ok_or(GroupError::Size(g.size))
            }) {
                return wrong(0, e);
            }
            if g.hashes.len() != self.chunks.len() {
                let error = GroupError::Count {
                    listed: g.hashes.len(),
                    expected: self.chunks.len(),
                    len: 0,
                    group_size: g.size,
                };
                return wrong(g.hashes.len().min(self.chunks.len()), error);
            }
            // Counts only: merging every chunk's hashes would cost a resolve as much as hashing; whoever
            // uses a chunk's group hashes checks them against its chunk hash first (`groups::Verifier`).
            for (index, hashes) in g.hashes.iter().enumerate() {
                let len = self.chunk_span(index).1;
                let expected = if self.hash(index).is_some() { groups::hash_count(len, g.size) } else { 0 };
                if hashes.0.len() != expected {
                    let error = GroupError::Count { listed: hashes.0.len(), expected, len, group_size: g.size };
                    return wrong(index, error);
                }
            }
        }
        Ok(())
    }

    /// Group size and hashes of chunk `index`, when the manifest has them and the chunk has several groups.
    pub fn group_hashes(&self, index: usize) -> Option<(u32, GroupHashes)> {
        let g = self.groups.as_ref()?;
        let hashes = g.hashes.get(index).filter(|h| !h.0.is_empty())?;
        Some((g.size, hashes.clone()))
    }

    /// Whether ingest has read the whole object (every chunk is hashed).
    pub fn is_complete(&self) -> bool {
        self.progress.is_none()
    }

    /// The hash of chunk `index`, if it is hashed yet.
    pub fn hash(&self, index: usize) -> Option<ChunkHash> {
        let hash = self.chunks.get(index)?;
        match &self.progress {
            Some(p) if !p.is_hashed(index as u64) => None,
            _ => Some(*hash),
        }
    }

    /// Whether `size` is the object's real length (always, once complete).
    pub fn size_known(&self) -> bool {
        self.progress.as_ref().is_none_or(|p| p.size_known)
    }

    /// Byte offset and length of chunk `index` within the object. Panics if `index` is out of range.
    pub fn chunk_span(&self, index: usize) -> (u64, u32) {
        assert!(index < self.chunks.len(), "chunk {index} out of range");
        let offset = index as u64 * u64::from(self.chunk_size);
        let len = (self.size - offset).min(u64::from(self.chunk_size)) as u32;
        (offset, len)
    }

    /// The content id: BLAKE3 over a canonical binary encoding, so it does not depend on JSON formatting.
    /// Layout: `"fog-manifest-v1"`, then url, content type and etag as (u32 BE length, bytes), then size (u64 BE),
    /// chunk size (u32 BE), chunk count (u64 BE) and the chunk hashes; for a manifest still being ingested,
    /// then `"partial"`, the size-known flag (u8) and each hashed run (start, end as u64 BE); with group
    /// hashes, then `"groups"`, the group size (u32 BE) and per chunk its hash count (u32 BE) and hashes.
    pub fn content_id(&self) -> ContentId {
        let mut h = blake3::Hasher::new();
        h.update(b"fog-manifest-v1");
        for field in [Some(&self.url), self.content_type.as_ref(), self.etag.as_ref()] {
            let bytes = field.map(|s| s.as_bytes()).unwrap_or_default();
            h.update(&(bytes.len() as u32).to_be_bytes());
            h.update(bytes);
        }
        h.update(&self.size.to_be_bytes());
        h.update(&self.chunk_size.to_be_bytes());
        h.update(&(self.chunks.len() as u64).to_be_bytes());
        for c in &self.chunks {
            h.update(c.as_bytes());
        }
        if let Some(p) = &self.progress {
            h.update(b"partial");
            h.update(&[u8::from(p.size_known)]);
            for (start, end) in &p.hashed {
                h.update(&start.to_be_bytes());
                h.update(&end.to_be_bytes());
            }
        }
        if let Some(g) = &self.groups {
            h.update(b"groups");
            h.update(&g.size.to_be_bytes());
            for hashes in &g.hashes {
                h.update(&(hashes.0.len() as u32).to_be_bytes());
                for cv in &hashes.0 {
                    h.update(cv);
                }
            }
        }
        ContentId(*h.finalize().as_bytes())
    }
}

/// Chunks and hashes an object as its bytes arrive, in pieces of any size: the one chunking every manifest
/// is built with. Sans I/O, so the tracker's ingest and offline tools share it. With a group size, it hashes
/// each chunk group by group and keeps the group hashes (the chunk hash is the same either way).
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    chunk_size: u32,
    group_size: Option<u32>,
    chunks: Vec<ChunkHash>,
    /// Each finished chunk's group hashes, when grouping.
    groups: Vec<GroupHashes>,
    /// Hashes the current group (the current chunk without groups).
    hasher: blake3::Hasher,
    /// The current chunk's group hashes before the current group.
    done_groups: Vec<[u8; 32]>,
    in_chunk: u32,
    size: u64,
}

impl ManifestBuilder {
    /// A builder without group hashes: chunks verify whole.
    pub fn new(chunk_size: u32) -> Self {
        Self::with_groups(chunk_size, None)
    }

    /// A builder that keeps group hashes of `group_size` (a valid size at most `chunk_size`) when given.
    pub fn with_groups(chunk_size: u32, group_size: Option<u32>) -> Self {
        Self {
            chunk_size,
            group_size: group_size.filter(|&g| g < chunk_size),
            chunks: Vec::new(),
            groups: Vec::new(),
            hasher: blake3::Hasher::new(),
            done_groups: Vec::new(),
            in_chunk: 0,
            size: 0,
        }
    }

    /// Takes the next `piece` of the object.
    pub fn update(&mut self, mut piece: &[u8]) {
        use blake3::hazmat::HasherExt;
        self.size += piece.len() as u64;
        while !piece.is_empty() {
            let mut end = self.chunk_size;
            if let Some(g) = self.group_size {
                // A group ends where the next begins: its hash is final only once more bytes follow it
                // in this chunk (else it is the chunk's only group, and the chunk hash is a root hash).
                if self.in_chunk > 0 && self.in_chunk.is_multiple_of(g) {
                    self.done_groups.push(self.hasher.finalize_non_root());
                    self.hasher = blake3::Hasher::new();
                    self.hasher.set_input_offset(u64::from(self.in_chunk));
                }
                end = end.min((self.in_chunk / g + 1) * g);
            }
            let take = piece.len().min((end - self.in_chunk) as usize);
            let (head, rest) = piece.split_at(take);
            self.hasher.update(head);
            self.in_chunk += take as u32;
            piece = rest;
            if self.in_chunk == self.chunk_size {
                self.finish_chunk();
            }
        }
    }

    fn finish_chunk(&mut self) {
        use blake3::hazmat::HasherExt;
        let hash = if self.done_groups.is_empty() {
            ChunkHash(*self.hasher.finalize().as_bytes())
        } else {
            let mut hashes = std::mem::take(&mut self.done_groups);
            hashes.push(self.hasher.finalize_non_root());
            let hashes = GroupHashes(hashes);
            let hash = hashes.root(self.in_chunk, self.group_size.expect("groups only when grouping"));
            self.groups.push(hashes);
            hash
        };
        if self.group_size.is_some() && self.groups.len() == self.chunks.len() {
            self.groups.push(GroupHashes::default());
        }
        self.chunks.push(hash);
        self.hasher = blake3::Hasher::new();
        self.in_chunk = 0;
    }

    /// Bytes taken so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hashes of the whole chunks taken so far.
    pub fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    /// Group hashes of the whole chunks taken so far (none without a group size).
    pub fn groups(&self) -> &[GroupHashes] {
        &self.groups
    }

    /// Every chunk's hash and group hashes (none without a group size), the last chunk possibly short: for
    /// the end of the object.
    pub fn into_parts(mut self) -> (Vec<ChunkHash>, Vec<GroupHashes>) {
        if self.in_chunk > 0 {
            self.finish_chunk();
        }
        (self.chunks, self.groups)
    }

    /// The manifest of the object whose bytes were all given, as served from `url`.
    pub fn finish(self, url: String, content_type: Option<String>, etag: Option<String>) -> Manifest {
        let (size, chunk_size, group_size) = (self.size, self.chunk_size, self.group_size);
        let (chunks, hashes) = self.into_parts();
        let groups = group_size.map(|size| Groups { size, hashes });
        Manifest { url, size, chunk_size, chunks, content_type, etag, progress: None, groups }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_chunks_the_same_however_the_bytes_arrive() {
        let object: Vec<u8> = (0..(3 * MIN_CHUNK_SIZE as usize + 1234)).map(|i| (i % 251) as u8).collect();
        let whole: Vec<ChunkHash> = object.chunks(MIN_CHUNK_SIZE as usize).map(ChunkHash::of).collect();
        for piece in [1, 7, 4096, MIN_CHUNK_SIZE as usize, MIN_CHUNK_SIZE as usize + 1, object.len()] {
            let mut b = ManifestBuilder::new(MIN_CHUNK_SIZE);
            object.chunks(piece).for_each(|p| b.update(p));
            assert_eq!(b.size(), object.len() as u64);
            let m = b.finish("http://o.example/a".into(), None, None);
            assert_eq!((m.chunks.as_slice(), m.size), (whole.as_slice(), object.len() as u64), "pieces of {piece}");
            m.validate().expect("consistent");
        }
        let empty = ManifestBuilder::new(MIN_CHUNK_SIZE).finish("http://o.example/e".into(), None, None);
        assert_eq!((empty.size, empty.chunks.len()), (0, 0));
    }

    #[test]
    fn grouping_keeps_chunk_hashes_and_adds_group_hashes_that_check() {
        let chunk = 64 * 1024;
        for len in [1, 4096, chunk as usize, 2 * chunk as usize + 8192, 3 * chunk as usize + 1000] {
            let object: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let plain = {
                let mut b = ManifestBuilder::new(chunk);
                b.update(&object);
                b.finish("http://o.example/a".into(), None, None)
            };
            for piece in [1000, 8192, object.len()] {
                let mut b = ManifestBuilder::with_groups(chunk, Some(8192));
                object.chunks(piece).for_each(|p| b.update(p));
                let m = b.finish("http://o.example/a".into(), None, None);
                assert_eq!(m.chunks, plain.chunks, "{len} in pieces of {piece}");
                m.validate().expect("consistent");
                for (i, c) in object.chunks(chunk as usize).enumerate() {
                    let hashes = m.groups.as_ref().expect("grouped").hashes[i].clone();
                    assert_eq!(hashes, GroupHashes::of(c, 8192), "chunk {i} of {len}");
                    hashes.check(m.chunks[i], c.len() as u32, 8192).expect("merges to the chunk hash");
                }
                assert_ne!(m.content_id(), plain.content_id(), "group hashes are part of the version");
            }
        }
    }

    #[test]
    fn validate_checks_group_hash_counts() {
        let object = vec![7u8; 3 * MIN_CHUNK_SIZE as usize];
        let mut b = ManifestBuilder::with_groups(MIN_CHUNK_SIZE, Some(4096));
        b.update(&object);
        let good = b.finish("http://o.example/a".into(), None, None);
        good.validate().expect("valid");
        assert_eq!(good.group_hashes(1).map(|(size, h)| (size, h.0.len())), Some((4096, 4)));
        let mut m = good.clone();
        m.groups.as_mut().expect("grouped").hashes[1].0.pop();
        assert!(matches!(m.validate(), Err(ManifestError::Groups { index: 1, .. })));
        let mut m = good.clone();
        m.groups.as_mut().expect("grouped").hashes.pop();
        assert!(matches!(m.validate(), Err(ManifestError::Groups { .. })));
        let mut m = good.clone();
        m.groups.as_mut().expect("grouped").size = 3000;
        assert!(matches!(m.validate(), Err(ManifestError::Groups { index: 0, .. })));
        // Chunks not hashed yet have no group hashes.
        let mut m = good;
        m.progress = Some(Progress { hashed: vec![(0, 1)], size_known: true });
        assert!(matches!(m.validate(), Err(ManifestError::Groups { index: 1, .. })));
        m.groups.as_mut().expect("grouped").hashes[1].0.clear();
        m.groups.as_mut().expect("grouped").hashes[2].0.clear();
        m.validate().expect("placeholders");
        assert!(m.group_hashes(1).is_none());
    }

    fn sample(size: u64) -> Manifest {
        let n = Manifest::chunk_count_for(size, MIN_CHUNK_SIZE);
        Manifest {
            url: "http://o.example/a".into(),
            size,
            chunk_size: MIN_CHUNK_SIZE,
            chunks: (0..n).map(|i| ChunkHash::of(&i.to_be_bytes())).collect(),
            content_type: None,
            etag: Some("\"x\"".into()),
            progress: None,
            groups: None,
        }
    }

    #[test]
    fn progress_runs_merge_and_answer() {
        let mut p = Progress { hashed: vec![], size_known: true };
        p.add(5, 7);
        p.add(0, 2);
        p.add(9, 10);
        assert_eq!(p.hashed, [(0, 2), (5, 7), (9, 10)]);
        p.add(2, 5);
        assert_eq!(p.hashed, [(0, 7), (9, 10)]);
        p.add(7, 9);
        assert_eq!(p.hashed, [(0, 10)]);
        assert!(p.is_hashed(0) && p.is_hashed(9) && !p.is_hashed(10));
        assert_eq!(p.hashed_count(), 10);
    }

    #[test]
    fn partial_manifests_validate_and_have_their_own_id() {
        let mut m = sample(100_000);
        let complete = m.content_id();
        m.progress = Some(Progress { hashed: vec![(0, 2), (5, 7)], size_known: true });
        m.validate().expect("runs within the chunks");
        assert_ne!(m.content_id(), complete);
        assert_eq!((m.hash(1).is_some(), m.hash(2), m.hash(6).is_some()), (true, None, true));
        for bad in [vec![(0, 3), (2, 4)], vec![(5, 7), (0, 2)], vec![(0, 8)], vec![(3, 3)]] {
            m.progress = Some(Progress { hashed: bad.clone(), size_known: true });
            assert!(matches!(m.validate(), Err(ManifestError::Progress)), "{bad:?}");
        }
        // Size unknown: only the hashed prefix is listed.
        m.progress = Some(Progress { hashed: vec![(0, 5)], size_known: false });
        assert!(matches!(m.validate(), Err(ManifestError::Progress)));
        m.progress = Some(Progress { hashed: vec![(0, m.chunks.len() as u64)], size_known: false });
        m.validate().expect("a prefix");
    }

    #[test]
    fn spans_cover_object_exactly() {
        for size in [0, 1, u64::from(MIN_CHUNK_SIZE), u64::from(MIN_CHUNK_SIZE) + 1, 100_000] {
            let m = sample(size);
            m.validate().expect("valid");
            let total: u64 = (0..m.chunks.len()).map(|i| u64::from(m.chunk_span(i).1)).sum();
            assert_eq!(total, size);
        }
    }

    #[test]
    fn content_id_changes_with_any_field() {
        let a = sample(100_000);
        let mut b = a.clone();
        b.etag = None;
        assert_ne!(a.content_id(), b.content_id());
        let mut c = a.clone();
        c.chunks.swap(0, 1);
        assert_ne!(a.content_id(), c.content_id());
        assert_eq!(a.content_id(), a.clone().content_id());
    }

    #[test]
    fn validate_rejects_inconsistent() {
        let mut m = sample(100_000);
        m.chunks.pop();
        assert!(matches!(m.validate(), Err(ManifestError::ChunkCount { .. })));
        m.chunk_size = 1;
        assert!(matches!(m.validate(), Err(ManifestError::ChunkSize(1))));
    }
}
