//! A manifest describes one immutable version of an origin object as a list of fixed-size chunks, each named
//! by its BLAKE3 hash. Whoever holds the manifest can verify every chunk from any untrusted source.

use serde::{Deserialize, Serialize};

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
        Ok(())
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
    /// then `"partial"`, the size-known flag (u8) and each hashed run (start, end as u64 BE).
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
        ContentId(*h.finalize().as_bytes())
    }
}

/// Chunks and hashes an object as its bytes arrive, in pieces of any size: the one chunking every manifest
/// is built with. Sans I/O, so the tracker's ingest and offline tools share it.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    chunk_size: u32,
    chunks: Vec<ChunkHash>,
    hasher: blake3::Hasher,
    in_chunk: u32,
    size: u64,
}

impl ManifestBuilder {
    pub fn new(chunk_size: u32) -> Self {
        Self { chunk_size, chunks: Vec::new(), hasher: blake3::Hasher::new(), in_chunk: 0, size: 0 }
    }

    /// Takes the next `piece` of the object.
    pub fn update(&mut self, mut piece: &[u8]) {
        self.size += piece.len() as u64;
        while !piece.is_empty() {
            let take = piece.len().min((self.chunk_size - self.in_chunk) as usize);
            let (head, rest) = piece.split_at(take);
            self.hasher.update(head);
            self.in_chunk += take as u32;
            piece = rest;
            if self.in_chunk == self.chunk_size {
                self.chunks.push(ChunkHash(*self.hasher.finalize().as_bytes()));
                self.hasher.reset();
                self.in_chunk = 0;
            }
        }
    }

    /// Bytes taken so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hashes of the whole chunks taken so far.
    pub fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    /// Every chunk's hash, the last one possibly short: for the end of the object.
    pub fn into_chunks(mut self) -> Vec<ChunkHash> {
        if self.in_chunk > 0 {
            self.chunks.push(ChunkHash(*self.hasher.finalize().as_bytes()));
        }
        self.chunks
    }

    /// The manifest of the object whose bytes were all given, as served from `url`.
    pub fn finish(self, url: String, content_type: Option<String>, etag: Option<String>) -> Manifest {
        let (size, chunk_size) = (self.size, self.chunk_size);
        Manifest { url, size, chunk_size, chunks: self.into_chunks(), content_type, etag, progress: None }
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
