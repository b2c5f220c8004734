//! The scheduler: pure and deterministic, from a registry snapshot, the scheduler's load state and a request
//! to candidate nodes per chunk. It does no I/O, so the tracker and the simulator run the same code.
//!
//! For each request:
//! 1. **Pre-filter** (once per request): the nodes near the client in coordinate space, found through a
//!    grid over the first two coordinate dimensions (cells sized so an occupied one holds ~16 nodes),
//!    searched in rings around the client's cell until
//!    [`Params::prefilter`] nodes are found — O(prefilter), whatever the number of nodes. A client without
//!    a coordinate gets a fixed default pool (rendezvous over a constant key), which keeps cache affinity.
//! 2. The [`Params::reach`] (8) closest of those, by the RTT the client's network measured to a node where
//!    it did (see [`ClientNet`]), else by predicted RTT (full coordinates, heights included). Nodes the
//!    network measured are ranked even when the pre-filter missed them. The **near** ones — no more than
//!    [`Params::near_fraction`] (20 %) and [`Params::near_ms`] (10 ms) farther than the closest — are as
//!    good as the closest for the client, so a chunk may be placed among up to [`Params::close`] (`k` = 3)
//!    of them for cache affinity without a worse pick. The rest of what was ranked (up to `prefilter` more,
//!    by measured RTT where there is one, else predicted) is the close set's **spill**.
//!
//! For each chunk:
//! 3. **Cache affinity**: rank the close set by rendezvous weight of the chunk id, so clients in one area
//!    ask the same nodes for the same chunk and those stay warm.
//! 4. **Hot chunks** get more replicas: the first candidate is the least-loaded of the top `r` near nodes
//!    in rendezvous order that is within its bounds (step 5), where `r` grows with the chunk's recent
//!    request count.
//! 5. **Bounded load**: a node whose recently assigned bytes would exceed (1+ε)× its fair share (its share
//!    of all advertised upload; never less than [`Params::min_load_secs`] (15 s, about the mean life of the
//!    10 s half-life load) of its own upload), or whose backlog of chunks clients fetch now would exceed
//!    [`Params::max_backlog_secs`] (1 s) of its upload, is passed over for
//!    the first place, for the next near node, else the next closest of the `reach`, else the closest of
//!    the spill with room — not the least loaded of nodes that are all over: where nodes are dense, the
//!    same few with short access links are the closest for many networks, and their queues would only
//!    grow. Only if every node ranked is over is the least loaded close node (relative to its upload)
//!    chosen. The chosen node is charged the chunk's bytes, and its backlog drains at all but
//!    [`Params::headroom`] (10 %) of its upload: the rest is for the work the scheduler does not charge.
//!    The other candidates, which take over when the first has left, are nodes with room where there are.
//!
//! Load and popularity decay with a half-life, so they describe the last tens of seconds.
//!
//! Only nodes the client can dial in an IP family it has take part (see [`Families`]), and each is handed out
//! with the addresses of those families only.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

use fog_proto::api::{Families, NodeContact};
use fog_proto::placement::weight;
use fog_proto::{ChunkHash, NodeId};

#[cfg(test)]
use crate::coords::Measured;
use crate::coords::{ClientNet, Coord};

/// Upload assumed for nodes whose owner set no cap (bytes/s): 100 Mbit/s, a good home uplink. Assuming
/// less would make bounded load move chunks off uncapped nodes that are not overloaded, at the cost of cold
/// misses elsewhere.
pub const DEFAULT_UPLOAD: u64 = 12_500_000;
/// Largest and smallest grid cell edge in coordinate units (ms); the snapshot picks the size between them
/// that puts about [`CELL_TARGET`] nodes in an occupied cell, so dense regions do not make the pre-filter
/// rank thousands of nodes.
const CELL_MAX_MS: f32 = 10.0;
const CELL_MIN_MS: f32 = 0.1;
const CELL_TARGET: usize = 16;
/// Rings searched in the fine grid, then in a coarse one (cells of [`CELL_COARSE_MS`]) for clients far
/// from any dense area, before falling back to the default pool.
const FINE_RINGS: i32 = 16;
const COARSE_RINGS: i32 = 64;
const CELL_COARSE_MS: f32 = 50.0;
/// Chunks of one request a client fetches at once (its parallelism): they join nodes' backlogs; later ones
/// of a long object are fetched over its play time.
const IMMEDIATE_CHUNKS: usize = 8;
/// Most chunks whose popularity is tracked.
const MAX_TRACKED_CHUNKS: usize = 100_000;

/// Tunables, with the defaults the tracker uses.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Candidates returned per chunk.
    pub k: usize,
    /// Most near nodes a chunk is placed among by rendezvous (by default `k`).
    pub close: usize,
    /// A node counts as near when its RTT is within `near_fraction` and `near_ms` of the closest node's
    /// (the bounds within which the simulator does not call a pick suboptimal).
    pub near_fraction: f32,
    pub near_ms: f32,
    /// Closest nodes considered at all: beyond the near ones, they take what bounded load moves.
    pub reach: usize,
    /// Nodes gathered by the grid pre-filter before ranking by distance.
    pub prefilter: usize,
    /// Bounded-load slack ε: no node above (1+ε)× its fair share, while any close node is below it.
    pub epsilon: f64,
    /// Recent requests of one chunk per extra replica.
    pub hot_requests: f64,
    /// Half-life of load and popularity, ms.
    pub half_life_ms: u64,
    /// Load below this many seconds of a node's advertised upload is never "over its share": a node whose
    /// recent assignments it can upload in about the load window is not overloaded, and moving chunks away
    /// from it would only cost cache affinity (a cold node must fill them first).
    pub min_load_secs: f64,
    /// Nor may a node's backlog — chunks clients fetch now that it cannot have uploaded yet at the share of
    /// its advertised rate left after [`Params::headroom`] — exceed this many seconds of its upload (a chunk waits behind that queue; about
    /// half a chunk's playback time keeps players from stalling).
    pub max_backlog_secs: f64,
    /// Share of a node's advertised upload the scheduler leaves free: its backlog drains, as the scheduler
    /// counts it, at the rest. Only first candidates are charged, so a node also serves what it is not
    /// charged for — clients failing over to it from a departed first candidate, peers' fills; filled to its
    /// whole upload by what is charged, it would queue that extra work without end.
    pub headroom: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            k: 3,
            close: 3,
            near_fraction: 0.2,
            near_ms: 10.0,
            reach: 8,
            prefilter: 64,
            epsilon: 0.25,
            hot_requests: 8.0,
            half_life_ms: 10_000,
            min_load_secs: 15.0,
            max_backlog_secs: 1.0,
            headroom: 0.1,
        }
    }
}

/// What the scheduler knows about one node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub contact: NodeContact,
    pub coord: Coord,
    /// Advertised upload, bytes/s.
    pub upload: u64,
}

/// Schedulable nodes at one moment, sorted by id (so results do not depend on map order), with a grid index.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeInfo>,
    /// The adaptive fine grid, then the coarse one.
    levels: Vec<GridLevel>,
    default_pool: Vec<u32>,
    total_upload: f64,
    /// The first 8 bytes of each node's id, in node order (so sorted too).
    prefixes: Vec<u64>,
    /// Where in `prefixes` each of as many equal slices of their range begins, and one past the end: a
    /// lookup searches one slice (ids are hashes: a node or two each) instead of bisecting all of them,
    /// which at 10^6 nodes is ~20 cache misses for each node a client network measured.
    buckets: Vec<u32>,
}

fn id_prefix(id: &NodeId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Which of `sorted.len()` equal slices of the range of the (non-empty, sorted) `sorted` holds `p`, which
/// lies within that range.
fn bucket(sorted: &[u64], p: u64) -> usize {
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let span = u128::from(hi - lo) + 1;
    (u128::from(p - lo) * sorted.len() as u128 / span) as usize
}

fn cell(c: &Coord, cell_ms: f32) -> (i32, i32) {
    ((c.pos[0] / cell_ms).floor() as i32, (c.pos[1] / cell_ms).floor() as i32)
}

/// A grid over `nodes` with cells of `cell_ms`.
fn grid(nodes: &[NodeInfo], cell_ms: f32) -> Grid {
    let mut by_cell: Vec<((i32, i32), u32)> =
        nodes.iter().enumerate().map(|(i, n)| (cell(&n.coord, cell_ms), i as u32)).collect();
    by_cell.sort_unstable();
    let mut cells = HashMap::with_hasher(CellHashing(RandomState::new().hash_one(cell_ms.to_bits())));
    let mut start = 0;
    for (i, (key, _)) in by_cell.iter().enumerate() {
        if by_cell.get(i + 1).is_none_or(|next| next.0 != *key) {
            cells.insert(*key, (start as u32, i as u32 + 1));
            start = i + 1;
        }
    }
    Grid { cells, nodes: by_cell.into_iter().map(|(_, i)| i).collect() }
}

impl Snapshot {
    pub fn new(mut nodes: Vec<NodeInfo>, params: &Params) -> Self {
        nodes.sort_unstable_by_key(|n| n.contact.id);
        let mut cell_ms = CELL_MAX_MS;
        let mut cells = grid(&nodes, cell_ms);
        // Node-weighted mean occupancy: the cell size a typical client sees.
        let crowding =
            |g: &Grid| g.cells.values().map(|&(a, b)| ((b - a) as usize).pow(2)).sum::<usize>() / nodes.len().max(1);
        while crowding(&cells) > 2 * CELL_TARGET && cell_ms / 2.0 >= CELL_MIN_MS {
            cell_ms /= 2.0;
            cells = grid(&nodes, cell_ms);
        }
        let key = ChunkHash(*blake3::hash(b"fogcdn default pool").as_bytes());
        let mut pool: Vec<(u64, u32)> =
            nodes.iter().enumerate().map(|(i, n)| (weight(&key, &n.contact.id), i as u32)).collect();
        let size = params.prefilter.min(pool.len());
        if size > 0 && size < pool.len() {
            pool.select_nth_unstable_by(size - 1, |a, b| b.cmp(a));
        }
        pool.truncate(size);
        let total_upload = nodes.iter().map(|n| n.upload.max(1) as f64).sum();
        let coarse = grid(&nodes, CELL_COARSE_MS);
        // Between the fine grid and the coarse one, grids 8× coarser each time, so a client just beyond the
        // fine rings finds about `prefilter` nodes rather than the 3 × 3 coarse cells around it (whole
        // regions at 10^6 nodes), which it would rank all of.
        let mut levels = vec![(cell_ms, cells, FINE_RINGS)];
        let mut mid_ms = cell_ms * 8.0;
        while mid_ms < CELL_COARSE_MS / 2.0 {
            levels.push((mid_ms, grid(&nodes, mid_ms), FINE_RINGS));
            mid_ms *= 8.0;
        }
        levels.push((CELL_COARSE_MS, coarse, COARSE_RINGS));
        let prefixes: Vec<u64> = nodes.iter().map(|n| id_prefix(&n.contact.id)).collect();
        // Counted per slice, then summed: the first index of each slice.
        let mut buckets = vec![0u32; prefixes.len() + 1];
        for &p in &prefixes {
            buckets[bucket(&prefixes, p) + 1] += 1;
        }
        for b in 1..buckets.len() {
            buckets[b] += buckets[b - 1];
        }
        let default_pool = pool.into_iter().map(|(_, i)| i).collect();
        Self { nodes, levels, default_pool, total_upload, prefixes, buckets }
    }

    /// Where `id` is in [`Snapshot::nodes`]: a search over the ids' first 8 bytes (integer compares, several
    /// times faster than comparing whole ids) in the slice of their range it falls in, then the full id.
    fn index_of(&self, id: &NodeId) -> Option<usize> {
        let key = id_prefix(id);
        let (&lo, &hi) = (self.prefixes.first()?, self.prefixes.last()?);
        if !(lo..=hi).contains(&key) {
            return None;
        }
        let b = bucket(&self.prefixes, key);
        let (start, end) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        let from = start + self.prefixes[start..end].partition_point(|p| *p < key);
        (from..self.prefixes.len()).take_while(|&i| self.prefixes[i] == key).find(|&i| self.nodes[i].contact.id == *id)
    }

    /// Whether `id` is schedulable in this snapshot (nodes are sorted by id).
    pub fn contains(&self, id: &NodeId) -> bool {
        self.index_of(id).is_some()
    }

    /// The nodes closest to a client network, and how many of them are near (see the module docs); without
    /// a coordinate, the default pool's first `params.reach` in affinity order, all of them "near".
    pub fn close_set(&self, client: Option<&ClientNet>, params: &Params) -> Close {
        self.close_set_for(client, Families::BOTH, params)
    }

    /// [`Snapshot::close_set`] among the nodes a client of `families` can dial.
    pub fn close_set_for(&self, client: Option<&ClientNet>, families: Families, params: &Params) -> Close {
        self.ranked(client, families, params, params.prefilter)
    }

    /// The close set with a spill of up to `spill_len` nodes.
    fn ranked(&self, client: Option<&ClientNet>, families: Families, params: &Params, spill_len: usize) -> Close {
        let usable = |i: &u32| families == Families::BOTH || self.nodes[*i as usize].contact.usable_by(families);
        let wanted = params.close.max(params.reach);
        let (Some(coord), Some(client)) = (client.and_then(|c| c.coord.as_ref()), client) else {
            // There is no "closest": every node of the pool gets its rendezvous share (a joining one too).
            let nodes: Vec<u32> = self.default_pool.iter().filter(|i| usable(i)).take(wanted).copied().collect();
            return Close { near: nodes.len(), place: nodes.len(), nodes, explore: None, spill: Vec::new() };
        };
        let mut found: Vec<u32> = Vec::new();
        for (cell_ms, grid, rings) in &self.levels {
            found = ring_search(grid, cell(coord, *cell_ms), *rings, params.prefilter);
            found.retain(usable);
            if found.len() >= wanted {
                break;
            }
        }
        if found.is_empty() {
            found = self.default_pool.iter().copied().filter(usable).collect();
        }
        let mut ranked: Vec<(f32, u32)> =
            found.into_iter().map(|i| (coord.rtt_to(&self.nodes[i as usize].coord), i)).collect();
        // Measured nodes rank first, by measured RTT; nodes known only by prediction follow. An unmeasured
        // node enters the ranks by being measured (see `explore`), not by a prediction that may be optimistic.
        let mut measured: Vec<(f32, u32)> = Vec::with_capacity(client.measured.len());
        for m in &client.measured {
            let Some(i) = self.index_of(&m.node).filter(|&i| usable(&(i as u32))) else { continue };
            measured.push((m.effective(coord.rtt_to(&self.nodes[i].coord)), i as u32));
        }
        let mut ids: Vec<u32> = measured.iter().map(|m| m.1).collect();
        ids.sort_unstable();
        ranked.retain(|r| ids.binary_search(&r.1).is_err());
        let by_rtt = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        measured.sort_unstable_by(by_rtt);
        let close = wanted.min(measured.len() + ranked.len());
        let predicted = close.saturating_sub(measured.len()).max(1).min(ranked.len());
        // Beyond those, up to `spill_len` more by prediction: candidates for the spill.
        let kept = (predicted + spill_len).min(ranked.len());
        if kept > 0 && kept < ranked.len() {
            ranked.select_nth_unstable_by(kept - 1, by_rtt);
        }
        ranked.truncate(kept);
        ranked.sort_unstable_by(by_rtt);
        // The nearest node by prediction that the network has not measured yet: offered as the last
        // candidate, so that the clients' RTT reports find the truly closest nodes over time.
        let explore = ranked.first().map(|r| r.1);
        let from_measured = close.min(measured.len());
        let mut spill = measured.split_off(from_measured);
        let from_ranked = close - from_measured;
        spill.extend_from_slice(&ranked[from_ranked..]);
        ranked.truncate(from_ranked);
        measured.append(&mut ranked);
        let ranked = measured;
        // The spill mixes measured and predicted RTTs: by distance as best known, not measured first.
        spill.sort_unstable_by(by_rtt);
        spill.truncate(spill_len);
        let best = ranked.first().map_or(0.0, |r| r.0);
        let near_limit = best + (best * params.near_fraction).min(params.near_ms);
        let near = ranked.iter().take_while(|r| r.0 <= near_limit).count().clamp(1, close.max(1));
        Close {
            nodes: ranked.into_iter().map(|(_, i)| i).collect(),
            near,
            place: near.min(params.close),
            explore,
            spill: spill.into_iter().map(|(_, i)| i).collect(),
        }
    }

    /// The `n` nodes nearest to `coord` by prediction (a node's neighbourhood), nearest first.
    pub fn nearest(&self, coord: &Coord, n: usize, params: &Params) -> Vec<u32> {
        let at = ClientNet { coord: Some(*coord), measured: Vec::new() };
        self.ranked(Some(&at), Families::BOTH, &Params { close: 1, reach: n, ..*params }, 0).nodes
    }
}

/// The nodes closest to a client, closest first (indices into [`Snapshot::nodes`]). The first `near` are as
/// good as the closest: ordinary chunks are placed among the first `place` of them, hot ones among more.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Close {
    pub nodes: Vec<u32>,
    pub near: usize,
    pub place: usize,
    /// A node to measure: offered as the last candidate.
    pub explore: Option<u32>,
    /// The rest of what the pre-filter and the network's measurements ranked (at most [`Params::prefilter`]),
    /// closest first: where a chunk goes when every node of `nodes` is over its bounds, rather than onto
    /// a queue that only grows (where nodes are dense, the same few short-access-link nodes are the
    /// closest for many networks).
    pub spill: Vec<u32>,
}

/// One grid over node coordinates: its cell edge (ms), cells, and how many rings a search may visit.
type GridLevel = (f32, Grid, i32);

/// Node indices by grid cell: each occupied cell's are `nodes[start..end]` (in node order), so a search
/// reads one table entry and one run of a flat array per cell. At 10^6 nodes a close set searches hundreds
/// of cells, most of them empty.
#[derive(Debug, Clone)]
struct Grid {
    cells: HashMap<(i32, i32), (u32, u32), CellHashing>,
    nodes: Vec<u32>,
}

impl Grid {
    fn get(&self, cell: (i32, i32)) -> &[u32] {
        self.cells.get(&cell).map_or(&[], |&(start, end)| &self.nodes[start as usize..end as usize])
    }
}

/// A keyed multiply-xorshift hash of a cell, several times cheaper than SipHash: the keys are cells of
/// coordinates the tracker fits from measured RTTs, which no one chooses precisely, and the key is random
/// per grid (lookups only, so the order of the table does not matter).
#[derive(Debug, Clone, Copy)]
struct CellHashing(u64);

impl BuildHasher for CellHashing {
    type Hasher = CellHasher;

    fn build_hasher(&self) -> CellHasher {
        CellHasher(self.0)
    }
}

#[derive(Debug)]
struct CellHasher(u64);

impl Hasher for CellHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }

    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }

    fn write_u32(&mut self, i: u32) {
        self.0 = (self.0.rotate_left(32) ^ u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        let h = self.0 ^ (self.0 >> 29);
        h.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (h >> 32)
    }
}

/// Nodes in rings of cells around `center`, until `enough` are found (plus one ring: a node just across a
/// cell edge may be closer) or `rings` rings were searched.
fn ring_search(grid: &Grid, center: (i32, i32), rings: i32, enough: usize) -> Vec<u32> {
    let (cx, cy) = center;
    let mut found: Vec<u32> = Vec::new();
    for r in 0..=rings {
        for dx in -r..=r {
            // The ring only: whole columns at its edges, top and bottom cells between them.
            let step = if dx.abs() == r { 1 } else { (2 * r).max(1) as usize };
            for dy in (-r..=r).step_by(step) {
                found.extend_from_slice(grid.get((cx + dx, cy + dy)));
            }
        }
        if found.len() >= enough && r > 0 {
            break;
        }
    }
    found
}

/// A value that halves every `half_life_ms`.
#[derive(Debug, Clone, Copy, Default)]
struct Decayed {
    value: f64,
    at_ms: u64,
}

impl Decayed {
    fn get(&self, now_ms: u64, half_life_ms: u64) -> f64 {
        let age = now_ms.saturating_sub(self.at_ms) as f64;
        self.value * (-age / half_life_ms as f64 * std::f64::consts::LN_2).exp()
    }

    fn add(&mut self, x: f64, now_ms: u64, half_life_ms: u64) {
        self.value = self.get(now_ms, half_life_ms) + x;
        self.at_ms = now_ms.max(self.at_ms);
    }
}

/// Bytes sent to a node for clients to fetch now that it cannot have uploaded yet at its advertised rate:
/// its queue, as far as the scheduler can tell (a leaky bucket draining at the node's upload).
#[derive(Debug, Clone, Copy, Default)]
struct Backlog {
    bytes: f64,
    at_ms: u64,
}

impl Backlog {
    fn get(&self, now_ms: u64, upload: f64) -> f64 {
        (self.bytes - upload * now_ms.saturating_sub(self.at_ms) as f64 / 1000.0).max(0.0)
    }
}

/// The scheduler's state: recently assigned bytes and backlog per node, recent requests per chunk.
#[derive(Debug, Default)]
pub struct Load {
    assigned: HashMap<NodeId, (Decayed, Backlog)>,
    total: Decayed,
    chunks: HashMap<ChunkHash, Decayed>,
    /// What this load charged since [`Load::take_delta`], when recording ([`Load::recording`]).
    delta: Option<LoadDelta>,
}

/// What one scheduler charged over a short while, for the schedulers of other tracker replicas of the same
/// nodes to add ([`Load::apply`]), so bounded load holds across replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadDelta {
    /// Bytes charged to each node as its first candidate, and those of them clients fetch now (backlog).
    pub nodes: HashMap<NodeId, (f64, f64)>,
    /// Requests per chunk (its popularity).
    pub chunks: HashMap<ChunkHash, f64>,
    /// All bytes charged.
    pub total: f64,
}

impl LoadDelta {
    /// Entries held: what bounds its size on the wire.
    pub fn len(&self) -> usize {
        self.nodes.len() + self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.total == 0.0
    }
}

impl Load {
    /// A load that also records what it charges, for [`Load::take_delta`].
    pub fn recording() -> Self {
        Self { delta: Some(LoadDelta::default()), ..Default::default() }
    }

    /// What was charged since the last call (empty unless recording).
    pub fn take_delta(&mut self) -> LoadDelta {
        self.delta.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Entries recorded since the last [`Load::take_delta`].
    pub fn delta_len(&self) -> usize {
        self.delta.as_ref().map_or(0, LoadDelta::len)
    }

    /// Adds what another scheduler charged (not recorded again): nodes not in `snapshot` are skipped, chunks
    /// past the tracking bound only count when already tracked.
    pub fn apply(&mut self, delta: &LoadDelta, snapshot: &Snapshot, now_ms: u64, params: &Params) {
        let hl = params.half_life_ms;
        for (id, &(bytes, now_bytes)) in &delta.nodes {
            let Some(i) = snapshot.index_of(id) else { continue };
            let upload = snapshot.nodes[i].upload.max(1) as f64;
            let (recent, backlog) = self.assigned.entry(*id).or_default();
            recent.add(bytes, now_ms, hl);
            if now_bytes > 0.0 {
                let bytes = backlog.get(now_ms, upload * (1.0 - params.headroom)) + now_bytes;
                *backlog = Backlog { bytes, at_ms: now_ms };
            }
        }
        for (chunk, &hits) in &delta.chunks {
            if self.chunks.len() < MAX_TRACKED_CHUNKS || self.chunks.contains_key(chunk) {
                self.chunks.entry(*chunk).or_default().add(hits, now_ms, hl);
            }
        }
        self.total.add(delta.total, now_ms, hl);
    }

    /// Recently assigned bytes of `node`, decayed to `now_ms`.
    pub fn assigned(&self, node: &NodeId, now_ms: u64, params: &Params) -> f64 {
        self.assigned.get(node).map_or(0.0, |d| d.0.get(now_ms, params.half_life_ms))
    }

    /// Forgets nodes no longer in `snapshot` (call after rebuilding it).
    pub fn forget_nodes_not_in(&mut self, snapshot: &Snapshot) {
        self.assigned.retain(|id, _| snapshot.contains(id));
    }

    fn hits(&mut self, chunk: &ChunkHash, now_ms: u64, params: &Params) -> f64 {
        let hl = params.half_life_ms;
        if self.chunks.len() >= MAX_TRACKED_CHUNKS && !self.chunks.contains_key(chunk) {
            self.chunks.retain(|_, d| d.get(now_ms, hl) >= 1.0);
            if self.chunks.len() >= MAX_TRACKED_CHUNKS {
                return 1.0;
            }
        }
        if let Some(delta) = &mut self.delta {
            *delta.chunks.entry(*chunk).or_default() += 1.0;
        }
        let d = self.chunks.entry(*chunk).or_default();
        d.add(1.0, now_ms, hl);
        d.get(now_ms, hl)
    }
}

/// Candidates for each of `chunks` (hash, length) for a client at `client` that can dial `families`: a
/// compacted node list (with the addresses of those families only) and, per chunk, up to `params.k` indices
/// into it, best first. Charges the first candidates in `load`.
pub fn schedule(
    snapshot: &Snapshot,
    load: &mut Load,
    client: Option<&ClientNet>,
    families: Families,
    chunks: &[(ChunkHash, u32)],
    params: &Params,
    now_ms: u64,
) -> (Vec<NodeContact>, Vec<Vec<u32>>) {
    let close = snapshot.close_set_for(client, families, params);
    let mut used: Vec<NodeContact> = Vec::new();
    let mut slot: HashMap<u32, u32> = HashMap::new();
    let per_chunk = chunks
        .iter()
        .enumerate()
        .map(|(index, (chunk, len))| {
            pick(snapshot, load, &close, chunk, u64::from(*len), index < IMMEDIATE_CHUNKS, params, now_ms)
                .into_iter()
                .map(|i| {
                    *slot.entry(i).or_insert_with(|| {
                        let contact = &snapshot.nodes[i as usize].contact;
                        used.push(contact.for_families(families).unwrap_or_else(|| contact.clone()));
                        (used.len() - 1) as u32
                    })
                })
                .collect()
        })
        .collect();
    (used, per_chunk)
}

/// Up to `k` node indices for one chunk, placed by rendezvous among the near nodes of `close` (the first
/// candidate chosen under bounded load, among more of them for hot chunks), then the next closest; charges
/// the first. `immediate`: the client fetches the chunk now (not later in a long object), so it joins the
/// node's backlog.
#[allow(clippy::too_many_arguments)]
pub fn pick(
    snapshot: &Snapshot,
    load: &mut Load,
    close: &Close,
    chunk: &ChunkHash,
    len: u64,
    immediate: bool,
    params: &Params,
    now_ms: u64,
) -> Vec<u32> {
    if close.nodes.is_empty() {
        return Vec::new();
    }
    let hl = params.half_life_ms;
    let replicas = (1.0 + (load.hits(chunk, now_ms, params) - 1.0) / params.hot_requests).floor() as usize;
    let set = &close.nodes[..close.place.max(replicas.min(close.near)).clamp(1, close.nodes.len())];
    let mut ranked: Vec<(u64, u32)> =
        set.iter().map(|&i| (weight(chunk, &snapshot.nodes[i as usize].contact.id), i)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let replicas = replicas.clamp(1, ranked.len());
    let total = load.total.get(now_ms, hl) + len as f64;
    let relative = |load: &Load, i: u32| {
        let n = &snapshot.nodes[i as usize];
        load.assigned(&n.contact.id, now_ms, params) / n.upload.max(1) as f64
    };
    let within_cap = |load: &Load, i: u32| {
        let n = &snapshot.nodes[i as usize];
        let upload = n.upload.max(1) as f64;
        let fair = total * upload / snapshot.total_upload.max(1.0);
        let cap = ((1.0 + params.epsilon) * fair).max(params.min_load_secs * upload);
        let drain = upload * (1.0 - params.headroom);
        let queued =
            if immediate { load.assigned.get(&n.contact.id).map_or(0.0, |u| u.1.get(now_ms, drain)) } else { 0.0 };
        load.assigned(&n.contact.id, now_ms, params) + len as f64 <= cap
            && queued + len as f64 <= (params.max_backlog_secs * upload).max(len as f64)
    };
    // The least loaded of the chunk's replicas within its bounds; else the next in rendezvous order that is;
    // else the closest node beyond the placement set that is, in the close set, then in its spill; else the
    // least loaded close node.
    let by_load = |load: &Load, set: &mut dyn Iterator<Item = u32>| {
        set.min_by(|&a, &b| relative(load, a).total_cmp(&relative(load, b)).then(a.cmp(&b)))
    };
    let first = by_load(load, &mut ranked[..replicas].iter().map(|&(_, i)| i).filter(|&i| within_cap(load, i)))
        .or_else(|| ranked[replicas..].iter().map(|&(_, i)| i).find(|&i| within_cap(load, i)))
        // All of the chunk's placement is over its bound: the next closest node with room.
        .or_else(|| close.nodes[set.len()..].iter().chain(&close.spill).copied().find(|&i| within_cap(load, i)))
        // Every node ranked is (or the spill is empty): the least loaded close node, relative to its upload.
        .or_else(|| by_load(load, &mut close.nodes.iter().copied()))
        .expect("close set is not empty");
    let chosen = &snapshot.nodes[first as usize];
    let (recent, backlog) = load.assigned.entry(chosen.contact.id).or_default();
    recent.add(len as f64, now_ms, hl);
    if immediate {
        let bytes = backlog.get(now_ms, chosen.upload.max(1) as f64 * (1.0 - params.headroom)) + len as f64;
        *backlog = Backlog { bytes, at_ms: now_ms };
    }
    load.total.add(len as f64, now_ms, hl);
    if let Some(delta) = &mut load.delta {
        let (bytes, now_bytes) = delta.nodes.entry(chosen.contact.id).or_default();
        *bytes += len as f64;
        *now_bytes += if immediate { len as f64 } else { 0.0 };
        delta.total += len as f64;
    }
    // The other candidates, which serve when the first has left: nodes within their bounds first — only the
    // first is charged, so a client failing over to a full node adds work the scheduler never sees, and where
    // the same few nodes are everyone's near nodes their queues grow without end. In each group, the chunk's
    // other near nodes (they may hold it), then the next closest; then the spill's nodes with room. The last
    // candidate is a node to measure, if there is one.
    let mut out = vec![first];
    let explore = close.explore.filter(|&e| e != first && params.k > 1);
    let others = params.k.saturating_sub(1 + usize::from(explore.is_some()));
    let unused = |i: &u32| *i != first && Some(*i) != explore;
    let close_rest = ranked.iter().map(|&(_, i)| i).chain(close.nodes[set.len()..].iter().copied()).filter(unused);
    let with_room: Vec<u32> = close_rest
        .clone()
        .chain(close.spill.iter().copied().filter(unused))
        .filter(|&i| within_cap(load, i))
        .take(others)
        .collect();
    let full = close_rest.filter(|i| !with_room.contains(i)).take(others - with_room.len());
    out.extend(with_room.iter().copied().chain(full));
    out.extend(explore);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn node(i: u32, x: f32, y: f32, upload: u64) -> NodeInfo {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        NodeInfo {
            contact: NodeContact::direct(
                NodeId(*blake3::hash(&id).as_bytes()),
                SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
            ),
            coord: Coord { pos: [x, y, 0.0, 0.0], height: 1.0, error: 0.1 },
            upload,
        }
    }

    fn at(x: f32, y: f32) -> ClientNet {
        ClientNet { coord: Some(Coord { pos: [x, y, 0.0, 0.0], height: 1.0, error: 0.1 }), measured: Vec::new() }
    }

    /// Two regions 200 ms apart, 20 nodes each.
    fn two_regions() -> Vec<NodeInfo> {
        (0..40).map(|i| node(i, if i < 20 { 0.0 } else { 200.0 } + (i % 5) as f32, (i % 7) as f32, 1 << 20)).collect()
    }

    #[test]
    fn clients_get_nearby_nodes_and_the_same_chunk_goes_to_the_same_node() {
        let params = Params::default();
        let snap = Snapshot::new(two_regions(), &params);
        let mut load = Load::default();
        let chunk = [(ChunkHash::of(b"c"), 1000)];
        let (a, sa) = schedule(&snap, &mut load, Some(&at(1.0, 1.0)), Families::BOTH, &chunk, &params, 0);
        let (b, sb) = schedule(&snap, &mut load, Some(&at(1.0, 1.0)), Families::BOTH, &chunk, &params, 1);
        let (far, _) = schedule(&snap, &mut load, Some(&at(201.0, 1.0)), Families::BOTH, &chunk, &params, 2);
        assert_eq!(sa[0].len(), 3);
        assert_eq!(a[sa[0][0] as usize].id, b[sb[0][0] as usize].id, "cache affinity for one client network");
        let near: Vec<NodeId> = snap.nodes.iter().filter(|n| n.coord.pos[0] < 100.0).map(|n| n.contact.id).collect();
        assert!(a.iter().all(|n| near.contains(&n.id)), "a client was sent across the world");
        assert!(far.iter().all(|n| !near.contains(&n.id)));
        // Deterministic: the same inputs give the same answer.
        let (again, _) = schedule(&snap, &mut Load::default(), Some(&at(1.0, 1.0)), Families::BOTH, &chunk, &params, 0);
        assert_eq!(again, a);
    }

    #[test]
    fn another_scheduler_s_delta_adds_the_same_load_and_popularity() {
        let params = Params::default();
        let snap = Snapshot::new(two_regions(), &params);
        let (mut here, mut there) = (Load::recording(), Load::default());
        let chunks: Vec<(ChunkHash, u32)> = (0..20u32).map(|c| (ChunkHash::of(&c.to_be_bytes()), 1 << 20)).collect();
        for t in 0..5 {
            schedule(&snap, &mut here, Some(&at(1.0, 1.0)), Families::BOTH, &chunks, &params, t);
        }
        let delta = here.take_delta();
        assert_eq!(delta.total, 100.0 * f64::from(1 << 20));
        assert_eq!(delta.chunks.values().sum::<f64>(), 100.0);
        assert!(here.take_delta().is_empty(), "taken once");
        there.apply(&delta, &snap, 5, &params);
        for n in &snap.nodes {
            let (a, b) = (here.assigned(&n.contact.id, 5, &params), there.assigned(&n.contact.id, 5, &params));
            assert!((a - b).abs() <= 1e-3 * a.max(1.0), "{a} vs {b} (5 ms of decay apart)");
        }
        assert_eq!(there.hits(&chunks[0].0, 5, &params).round(), here.hits(&chunks[0].0, 5, &params).round());
        // Applied, not recorded again; a node the snapshot does not hold is skipped.
        assert!(there.take_delta().is_empty());
        let mut stranger = LoadDelta::default();
        stranger.nodes.insert(NodeId([9; 32]), (1e6, 1e6));
        there.apply(&stranger, &snap, 5, &params);
        assert_eq!(there.assigned(&NodeId([9; 32]), 5, &params), 0.0);
    }

    #[test]
    fn load_stays_within_the_bound_and_hot_chunks_spread() {
        let params = Params::default();
        // Eight nodes in one place, one with four times the upload of the others.
        let nodes: Vec<NodeInfo> = (0..8).map(|i| node(i, 0.0, 0.0, if i == 0 { 4 << 20 } else { 1 << 20 })).collect();
        let snap = Snapshot::new(nodes, &params);
        let mut load = Load::default();
        let client = at(0.0, 0.0);
        // Many distinct 1 MiB chunks (far more than a second of anyone's upload): spread by rendezvous,
        // capped by bounded load.
        for c in 0..4000u32 {
            schedule(
                &snap,
                &mut load,
                Some(&client),
                Families::BOTH,
                &[(ChunkHash::of(&c.to_be_bytes()), 1 << 20)],
                &params,
                0,
            );
        }
        let total: f64 = snap.nodes.iter().map(|n| load.assigned(&n.contact.id, 0, &params)).sum();
        let total_up: f64 = snap.nodes.iter().map(|n| n.upload as f64).sum();
        for n in &snap.nodes {
            let fair = total * n.upload as f64 / total_up;
            let got = load.assigned(&n.contact.id, 0, &params);
            assert!(
                got <= (1.0 + params.epsilon) * fair + (1 << 20) as f64,
                "node over its bound: {got} vs fair {fair}"
            );
        }
        // One hot chunk asked 64 times: served by several first candidates, not one.
        let hot = [(ChunkHash::of(b"hot"), 1 << 20)];
        let mut firsts = std::collections::HashSet::new();
        for t in 0..64u64 {
            let (nodes, s) = schedule(&snap, &mut load, Some(&client), Families::BOTH, &hot, &params, t);
            firsts.insert(nodes[s[0][0] as usize].id);
        }
        assert!(firsts.len() >= 4, "hot chunk stayed on {} nodes", firsts.len());
    }

    #[test]
    fn without_a_coordinate_clients_share_a_default_pool_and_empty_snapshots_schedule_nothing() {
        let params = Params::default();
        let snap = Snapshot::new(two_regions(), &params);
        let chunk = [(ChunkHash::of(b"c"), 1)];
        let (a, _) = schedule(&snap, &mut Load::default(), None, Families::BOTH, &chunk, &params, 0);
        let (b, _) = schedule(&snap, &mut Load::default(), None, Families::BOTH, &chunk, &params, 0);
        assert_eq!(a, b);
        // A client far from every node still gets the nearest ones (through the coarse grid).
        let (far, _) =
            schedule(&snap, &mut Load::default(), Some(&at(1500.0, 0.0)), Families::BOTH, &chunk, &params, 0);
        let east: Vec<NodeId> = snap.nodes.iter().filter(|n| n.coord.pos[0] > 100.0).map(|n| n.contact.id).collect();
        assert!(!far.is_empty() && far.iter().all(|n| east.contains(&n.id)), "{far:?}");
        let (none, s) = schedule(
            &Snapshot::new(Vec::new(), &params),
            &mut Load::default(),
            None,
            Families::BOTH,
            &chunk,
            &params,
            0,
        );
        assert!(none.is_empty() && s[0].is_empty());
    }

    /// A client fetching a 64-chunk object twice gets the same nodes the second time: with load well within
    /// what nodes can upload, bounded load must not move chunks (moving them means cold misses).
    #[test]
    fn repeated_requests_under_light_load_keep_their_nodes() {
        let params = Params::default();
        let snap = Snapshot::new((0..3).map(|i| node(i, 0.0, 0.0, DEFAULT_UPLOAD)).collect(), &params);
        let mut load = Load::default();
        let chunks: Vec<(ChunkHash, u32)> = (0..64u32).map(|c| (ChunkHash::of(&c.to_be_bytes()), 1 << 20)).collect();
        let firsts = |(nodes, s): (Vec<NodeContact>, Vec<Vec<u32>>)| -> Vec<NodeId> {
            s.iter().map(|c| nodes[c[0] as usize].id).collect()
        };
        let a = firsts(schedule(&snap, &mut load, None, Families::BOTH, &chunks, &params, 1000));
        let b = firsts(schedule(&snap, &mut load, None, Families::BOTH, &chunks, &params, 1100));
        assert_eq!(a, b);
    }

    /// What a client network measured beats what coordinates predict, even for a node the pre-filter would
    /// not have found; and chunks go only to nodes near the closest, never to one 20 % farther.
    #[test]
    fn measured_rtts_override_predictions_and_placement_stays_near() {
        let params = Params::default();
        let snap = Snapshot::new(two_regions(), &params);
        let far = snap.nodes.iter().position(|n| n.coord.pos[0] > 100.0).expect("a far node");
        let chunks: Vec<(ChunkHash, u32)> = (0..32u32).map(|c| (ChunkHash::of(&c.to_be_bytes()), 1)).collect();
        // The client's network measured 1 ms to a node its coordinate puts 200 ms away (say, a node whose
        // coordinate has not converged), and the fit agreed.
        let mut client = at(1.0, 1.0);
        client.measured.push(Measured { node: snap.nodes[far].contact.id, rtt_ms: 1.0, agrees: true });
        let close = snap.close_set(Some(&client), &params);
        assert_eq!(close.nodes[0], far as u32);
        assert_eq!(close.near, 1, "nodes predicted at ≥ 2 ms are not near a 1 ms one");
        let (nodes, s) = schedule(&snap, &mut Load::default(), Some(&client), Families::BOTH, &chunks, &params, 0);
        assert!(s.iter().all(|c| nodes[c[0] as usize].id == snap.nodes[far].contact.id));
        // Three nodes at 10, 11 and 13 ms (measured), the rest predicted farther: chunks spread over the two
        // within 20 % of the closest only.
        let mut client = at(1.0, 1.0);
        client.coord = Some(Coord { pos: [100.0, 100.0, 0.0, 0.0], height: 1.0, error: 0.1 });
        client.measured = (0..3)
            .map(|i| Measured { node: snap.nodes[i].contact.id, rtt_ms: [10.0, 11.0, 13.0][i], agrees: true })
            .collect();
        let (nodes, s) = schedule(&snap, &mut Load::default(), Some(&client), Families::BOTH, &chunks, &params, 0);
        let firsts: std::collections::HashSet<NodeId> = s.iter().map(|c| nodes[c[0] as usize].id).collect();
        let near: std::collections::HashSet<NodeId> = (0..2).map(|i| snap.nodes[i].contact.id).collect();
        assert_eq!(firsts, near);
        // The last candidate is a node the network has not measured, so its clients measure it.
        let explore = snap.close_set(Some(&client), &params).explore.expect("a node to measure");
        assert!(
            explore >= 3
                && s.iter().all(|c| c.len() == 3 && nodes[c[2] as usize].id == snap.nodes[explore as usize].contact.id)
        );
    }

    /// A node with a second of upload queued for chunks clients want now is passed over for the next such
    /// chunk, and takes it again once its queue has drained (at 90 % of its upload: until 2026-12-01 at all
    /// of it); later chunks of a long object do not queue.
    #[test]
    fn a_node_with_a_queue_is_passed_over_until_it_drains() {
        let params = Params::default();
        let snap = Snapshot::new((0..2).map(|i| node(i, 0.0, 0.0, 1 << 20)).collect(), &params);
        let client = at(0.0, 0.0);
        let close = snap.close_set(Some(&client), &params);
        assert_eq!(close.place, 2);
        let chunk = |c: u32| ChunkHash::of(&c.to_be_bytes());
        let home = |c: u32| pick(&snap, &mut Load::default(), &close, &chunk(c), 1, true, &params, 0)[0];
        let (a, b) = (0, (1..).find(|&c| home(c) == home(0)).expect("two chunks with one home"));
        let mut load = Load::default();
        let first = |load: &mut Load, c: u32, immediate: bool, at_ms: u64| {
            pick(&snap, load, &close, &chunk(c), 1 << 20, immediate, &params, at_ms)[0]
        };
        assert_eq!(first(&mut load, a, true, 0), home(a));
        assert_ne!(first(&mut load, b, true, 10), home(b), "queued behind a second of upload");
        assert_eq!(first(&mut load, b, true, 2_000), home(b), "the queue drained");
        // The scheduler counts only 90 % of a node's upload as its clients' (the rest takes what it does not
        // charge), so a second's worth takes longer than a second to drain.
        let mut load = Load::default();
        assert_eq!(first(&mut load, a, true, 0), home(a));
        assert_ne!(first(&mut load, b, true, 1_050), home(b), "the queue drains at 90 % of the upload");
        let mut load = Load::default();
        assert_eq!(first(&mut load, a, false, 0), home(a));
        assert_eq!(first(&mut load, b, false, 10), home(b), "a chunk fetched later joined the queue");
    }

    /// When every node of the close set has a full queue, a chunk goes to the closest node of the spill with
    /// room, not onto the shortest of the full queues (which, where the same few nodes are everyone's
    /// closest, only grow); only when the spill is full too does the least loaded close node take it.
    #[test]
    fn when_the_close_set_is_full_the_closest_node_with_room_beyond_it_serves() {
        let params = Params::default();
        // Eight nodes where the client is, one 3 ms away, three 6 ms away; 1 MiB/s each, so one 1 MiB chunk
        // fills a node's one-second queue.
        let xs = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 6.0, 6.0, 6.0];
        let snap =
            Snapshot::new(xs.iter().enumerate().map(|(i, &x)| node(i as u32, x, 0.0, 1 << 20)).collect(), &params);
        let close = snap.close_set(Some(&at(0.0, 0.0)), &params);
        let x = |i: u32| snap.nodes[i as usize].coord.pos[0];
        assert!(close.nodes.len() == params.reach && close.nodes.iter().all(|&i| x(i) == 0.0));
        assert_eq!(close.spill.iter().map(|&i| x(i)).collect::<Vec<_>>(), [3.0, 6.0, 6.0, 6.0]);
        let mut load = Load::default();
        let mut pick_one =
            |c: u32| pick(&snap, &mut load, &close, &ChunkHash::of(&c.to_be_bytes()), 1 << 20, true, &params, 0);
        let picks: Vec<Vec<u32>> = (0..13).map(&mut pick_one).collect();
        let firsts: Vec<u32> = picks.iter().map(|p| p[0]).collect();
        let mut filled = firsts[..8].to_vec();
        filled.sort_unstable();
        filled.dedup();
        assert_eq!(filled.len(), 8, "each close node takes one chunk: {firsts:?}");
        assert_eq!(x(firsts[8]), 3.0, "the closest node with room, not a full close node");
        // A client whose first candidate has left fails over to a node with room too: only the first is
        // charged, and a full node would queue the failover beyond what the scheduler counts.
        assert_eq!(x(picks[8][1]), 6.0, "{:?}", picks[8]);
        assert!(firsts[9..12].iter().all(|&i| x(i) == 6.0), "{firsts:?}");
        assert_eq!(x(firsts[12]), 0.0, "every node ranked is full: the least loaded close node");
    }

    /// A hot chunk's first candidate is the least loaded of its replicas *within its bounds*: a replica with a
    /// lighter recent load but a full queue is passed over for another replica, and the chunk stays on its
    /// replicas (which may hold it). (Until 2026-12-01 only the least loaded replica's bounds were checked:
    /// when it was over, the chunk left the replicas for a farther node, or here, with none, took the full one.)
    #[test]
    fn a_hot_chunk_goes_to_the_least_loaded_replica_with_room() {
        let params = Params::default();
        let snap = Snapshot::new((0..3).map(|i| node(i, 0.0, 0.0, 1 << 20)).collect(), &params);
        let all = Close { nodes: vec![0, 1, 2], near: 3, place: 3, explore: None, spill: Vec::new() };
        let only = |i: u32| Close { nodes: vec![i], near: 1, place: 1, explore: None, spill: Vec::new() };
        let hot = ChunkHash::of(b"hot");
        let mut load = Load::default();
        // Asked for often enough to be on all three nodes (17 requests: 1 + 16 / 8 replicas).
        for _ in 0..17 {
            pick(&snap, &mut load, &only(0), &hot, 1, false, &params, 0);
        }
        // Node 0: 1 MiB queued now (full); nodes 1 and 2: more recent load, none of it queued.
        let other = |c: u32| ChunkHash::of(&c.to_be_bytes());
        pick(&snap, &mut load, &only(0), &other(0), 1 << 20, true, &params, 0);
        pick(&snap, &mut load, &only(1), &other(1), 5 << 20, false, &params, 0);
        pick(&snap, &mut load, &only(2), &other(2), 6 << 20, false, &params, 0);
        assert_eq!(pick(&snap, &mut load, &all, &hot, 1 << 20, true, &params, 0)[0], 1);
    }

    /// Ids are found whatever their spread: hashes, shared first bytes, both ends of the range, a cluster.
    #[test]
    fn every_node_is_found_by_its_id_and_no_other_id_is() {
        let params = Params::default();
        let with_id = |i: u32, id: [u8; 32]| NodeInfo {
            contact: NodeContact { id: NodeId(id), ..node(i, 0.0, 0.0, 1).contact },
            ..node(i, 0.0, 0.0, 1)
        };
        let mut nodes: Vec<NodeInfo> = (0..300).map(|i| node(i, 0.0, 0.0, 1)).collect();
        for (i, first) in [[0u8; 8], [0xff; 8], [7; 8], [7; 8]].into_iter().enumerate() {
            let mut id = [i as u8 + 1; 32];
            id[..8].copy_from_slice(&first);
            nodes.push(with_id(300 + i as u32, id));
        }
        // A cluster: 50 ids a few apart in their first 8 bytes.
        for i in 0..50u32 {
            let mut id = [0x42; 32];
            id[4..8].copy_from_slice(&(i * 3).to_be_bytes());
            nodes.push(with_id(400 + i, id));
        }
        let snap = Snapshot::new(nodes, &params);
        for (i, n) in snap.nodes.iter().enumerate() {
            assert_eq!(snap.index_of(&n.contact.id), Some(i));
        }
        let mut absent = [0x42; 32];
        absent[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(!snap.contains(&NodeId(absent)) && !snap.contains(&NodeId([7; 32])));
        assert!(!Snapshot::default().contains(&NodeId([0; 32])));
    }

    /// Clients without a coordinate spread over the whole default pool, so every node (a new one too) gets
    /// its rendezvous share of the chunks.
    #[test]
    fn without_a_coordinate_every_pool_node_gets_chunks() {
        let params = Params::default();
        let snap = Snapshot::new((0..4).map(|i| node(i, 0.0, 0.0, DEFAULT_UPLOAD)).collect(), &params);
        let chunks: Vec<(ChunkHash, u32)> = (0..48u32).map(|c| (ChunkHash::of(&c.to_be_bytes()), 1)).collect();
        let (nodes, s) = schedule(&snap, &mut Load::default(), None, Families::BOTH, &chunks, &params, 0);
        let firsts: std::collections::HashSet<NodeId> = s.iter().map(|c| nodes[c[0] as usize].id).collect();
        assert_eq!(firsts.len(), 4);
    }

    /// A client is offered only nodes it can dial in its families, with those addresses only; a node it can
    /// reach directly is not sent through a rendezvous.
    #[test]
    fn clients_get_only_nodes_and_addresses_of_their_families() {
        let params = Params::default();
        let v6 = |i: u16| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7000 + i));
        let via = fog_proto::api::Rendezvous { id: NodeId([9; 32]), addr: SocketAddr::from(([192, 0, 2, 9], 7701)) };
        let nodes: Vec<NodeInfo> = (0..12)
            .map(|i| {
                let mut n = node(i, 0.0, 0.0, DEFAULT_UPLOAD);
                let v4 = n.contact.addr;
                match i % 4 {
                    0 => {}                             // IPv4 only
                    1 => n.contact.addr = v6(i as u16), // IPv6 only
                    2 => {
                        n.contact.addr = v6(i as u16); // both, IPv6 first
                        n.contact.other_addrs = vec![v4];
                    }
                    _ => {
                        // IPv6 directly; IPv4 through a rendezvous only
                        n.contact.via = Some(via.clone());
                        n.contact.other_addrs = vec![v6(i as u16)];
                    }
                }
                n
            })
            .collect();
        let snap = Snapshot::new(nodes, &Params { reach: 12, close: 12, ..params });
        let chunks: Vec<(ChunkHash, u32)> = (0..64u32).map(|c| (ChunkHash::of(&c.to_be_bytes()), 1)).collect();
        let wide = Params { reach: 12, close: 12, k: 12, ..params };
        let only_v4 = Families { ipv4: true, ipv6: false };
        let (offered, _) = schedule(&snap, &mut Load::default(), None, only_v4, &chunks, &wide, 0);
        assert_eq!(offered.len(), 9, "IPv6-only nodes are not offered: {offered:?}");
        for c in &offered {
            assert!(c.addr.is_ipv4() && c.other_addrs.iter().all(|a| a.is_ipv4()), "{c:?}");
        }
        assert_eq!(offered.iter().filter(|c| c.via.is_some()).count(), 3, "punched where IPv4 is not direct");
        let only_v6 = Families { ipv4: false, ipv6: true };
        let (offered, _) = schedule(&snap, &mut Load::default(), None, only_v6, &chunks, &wide, 0);
        assert_eq!(offered.len(), 9, "IPv4-only nodes are not offered");
        assert!(offered.iter().all(|c| c.addr.is_ipv6() && c.other_addrs.is_empty() && c.via.is_none()));
        let (offered, _) = schedule(&snap, &mut Load::default(), None, Families::BOTH, &chunks, &wide, 0);
        assert_eq!(offered.len(), 12);
        assert!(offered.iter().all(|c| c.via.is_none()), "a verified direct path beats a punch");
        assert_eq!(offered.iter().filter(|c| c.addr.is_ipv6() && c.other_addrs.len() == 1).count(), 3);
        let (none, _) = schedule(&snap, &mut Load::default(), None, Families::default(), &chunks, &wide, 0);
        assert!(none.is_empty());
    }
}
