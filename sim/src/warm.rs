//! Warm caches: what a VOD deployment's caches hold after it has served the same demand for a while, so that
//! a run measures that steady state rather than a cold start (at 10^6 nodes, warming them by simulation
//! would take ~10^9 requests).
//!
//! A node holds a chunk when requests for it reached the node within the horizon `H` (`--warm-hours`):
//! with the rate `λ` at which they do, that has probability `1 − exp(−λ·H)` (requests as a Poisson stream),
//! drawn once per node and chunk. Requests for chunk `c` reach node `h`
//! - from clients, when the scheduler places `c` on `h` for a client network whose near set holds `h` (`h` is
//!   among the chunk's top `replicas` by rendezvous weight in the network's placement set; hot chunks get
//!   more replicas, from their request rate as the scheduler counts it): the network's requests for `c`;
//! - from peers, when `h` is `c`'s home for a node `n` whose overlay neighbourhood holds `h` (`h` outranks
//!   every other member; the neighbourhoods are those the run's `peers_asked` uses, with every node online:
//!   caches outlive offline periods): `n`'s misses, at the rate `n` is asked for `c` — its share of all
//!   clients' placements times the chunk's rate (a node's first request for a chunk is its miss). With cell
//!   homes (`crate::homes`), `h` is the home of every member of its cell when it is first in the cell's
//!   order for `c` (every member online), and then gets all their misses.
//!
//! Who holds what follows the same rendezvous weights the run uses, so the run finds it; churn and changing
//! measurements move placements during the run, and those misses are real. Not modelled: chunks a node got
//! while standing in for a busy or absent better-ranked node, and bounded load moving chunks off the nodes
//! rendezvous picks (both make a real deployment warmer).
//!
//! Writing each node's chunks into its cache index would take up to 10^9 entries, so content is decided
//! lazily: the first time the run asks whether a node holds a chunk, [`WarmCaches::holds`] answers, and the
//! simulator enters a "yes" into the node's real cache index. When what reached a node exceeds its disk
//! (estimated from a sample of nodes, for all alike), the most popular chunks stay, as LRU keeps them; the
//! undecided rest still fills the disk, and the run's fills evict that first, the least popular first.

use std::collections::HashSet;

use fog_proto::placement::weight;
use fog_proto::{ChunkHash, NodeId};
use fog_sched::coords::splitmix;
use rand::rngs::StdRng;
use rand::Rng;

/// Rows of node or client indices, stored flat.
#[derive(Debug, Default)]
pub struct Rows {
    starts: Vec<u32>,
    items: Vec<u32>,
}

impl Rows {
    pub fn push(&mut self, row: impl IntoIterator<Item = u32>) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        self.items.extend(row);
        self.starts.push(self.items.len() as u32);
    }

    pub fn row(&self, i: usize) -> &[u32] {
        match self.starts.get(i..=i + 1) {
            Some(&[from, to]) => &self.items[from as usize..to as usize],
            _ => &[],
        }
    }

    fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    pub fn rows(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.len()).map(|i| self.row(i))
    }

    /// For each of `n` items, the rows it appears in.
    fn transpose(&self, n: usize) -> Rows {
        let mut counts = vec![0u32; n + 1];
        for &i in &self.items {
            counts[i as usize + 1] += 1;
        }
        for i in 0..n {
            counts[i + 1] += counts[i];
        }
        let mut fill = counts.clone();
        let mut items = vec![0u32; self.items.len()];
        for (r, row) in self.rows().enumerate() {
            for &i in row {
                items[fill[i as usize] as usize] = r as u32;
                fill[i as usize] += 1;
            }
        }
        Rows { starts: counts, items }
    }
}

/// What the demand model says about one chunk.
#[derive(Debug, Clone, Copy)]
pub struct ChunkDemand {
    /// Requests per second, over all clients.
    pub rate: f64,
    /// Replicas the scheduler gives it at that rate.
    pub replicas: u8,
}

/// Who asks whom: the structures a warm start is computed from.
#[derive(Debug, Default)]
pub struct Placement {
    /// Each node's overlay neighbourhood (node indices).
    pub hoods: Rows,
    /// Each client network's near set (node indices, closest first) and its ordinary placement set's size;
    /// empty when the policy places chunks without rendezvous (the baselines: every node alike).
    pub near: Rows,
    pub place: Vec<u8>,
    /// With cell homes (instead of neighbourhood homes): each node's cell.
    pub cells: Option<Vec<u32>>,
}

/// The warm caches' content, decided lazily (see the module docs).
#[derive(Debug)]
pub struct WarmCaches {
    hoods: Rows,
    in_hoods: Rows,
    near: Rows,
    place: Vec<u8>,
    near_of: Rows,
    /// Per node, the share of all clients' requests placed on it (ordinary chunks), and the sum of it over
    /// the nodes whose neighbourhood holds the node (the most their misses can add to what reaches it).
    serves: Vec<f32>,
    hood_reach: Vec<f64>,
    /// With cell homes: each node's cell, and per cell the sum of its members' `serves`.
    cells: Option<(Vec<u32>, Vec<f32>)>,
    demand: Vec<ChunkDemand>,
    /// Per chunk key (`object × chunks_per_object + chunk`): its rank by popularity (0 = most popular).
    rank: Vec<u32>,
    clients: f64,
    horizon_secs: f64,
    seed: u64,
    /// Set when what reaches a node exceeds its disk.
    full: Option<FullDisks>,
    /// Share of the catalogue a node holds (estimated from a sample), before its disk limits it.
    pub share: f64,
    weights: Weights,
    /// (node, chunk) pairs the run's fills evicted from the node's index (at most one per fill).
    evicted: HashSet<(u32, ChunkHash)>,
}

/// Disks that hold less than what reached them.
#[derive(Debug)]
struct FullDisks {
    /// Popularity rank below which what reached a node fits on its disk.
    limit: f64,
    /// Chunks on a node's disk at the start; per node, how many of them are undecided yet and how many the
    /// run's fills evicted.
    initial: u32,
    undecided: Vec<u32>,
    evicted: Vec<u32>,
}

/// (node, chunk key) pairs sampled to estimate what share of the catalogue a node holds.
const SHARE_SAMPLES: usize = 8192;

impl WarmCaches {
    /// `demand` per chunk key; `clients` networks; `disk_chunks` fit on a node's disk; `ids` of the nodes;
    /// `hash_of` a chunk key.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        placement: Placement,
        demand: Vec<ChunkDemand>,
        clients: usize,
        horizon_secs: f64,
        disk_chunks: u32,
        ids: &[NodeId],
        hash_of: impl Fn(usize) -> ChunkHash,
        mut is_home: impl FnMut(usize, &ChunkHash) -> bool,
        rng: &mut StdRng,
    ) -> Self {
        let nodes = ids.len();
        let Placement { hoods, near, place, cells } = placement;
        // Without client placement every node serves alike.
        let mut serves = vec![if place.is_empty() { 1.0 / nodes.max(1) as f32 } else { 0.0 }; nodes];
        for (c, &place) in place.iter().enumerate() {
            let set = &near.row(c)[..usize::from(place).min(near.row(c).len())];
            for &n in set {
                serves[n as usize] += 1.0 / (set.len() * clients.max(1)) as f32;
            }
        }
        let cells = cells.map(|cell| {
            let mut share = vec![0f32; cell.iter().map(|&c| c as usize + 1).max().unwrap_or(0)];
            for (&c, &serves) in cell.iter().zip(&serves) {
                share[c as usize] += serves;
            }
            (cell, share)
        });
        let mut by_rate: Vec<usize> = (0..demand.len()).collect();
        by_rate.sort_by(|&a, &b| demand[b].rate.total_cmp(&demand[a].rate).then(a.cmp(&b)));
        let mut rank = vec![0u32; demand.len()];
        for (r, &key) in by_rate.iter().enumerate() {
            rank[key] = r as u32;
        }
        let in_hoods = hoods.transpose(nodes);
        let hood_reach =
            (0..nodes).map(|h| in_hoods.row(h).iter().map(|&n| f64::from(serves[n as usize])).sum()).collect();
        let mut warm = Self {
            in_hoods,
            hood_reach,
            hoods,
            near_of: near.transpose(nodes),
            near,
            place,
            serves,
            cells,
            demand,
            rank,
            clients: clients.max(1) as f64,
            horizon_secs,
            seed: rng.gen(),
            full: None,
            share: 0.0,
            weights: Weights::new(),
            evicted: HashSet::new(),
        };
        if nodes == 0 || warm.demand.is_empty() {
            return warm;
        }
        // What a node holds, by popularity rank: the disk takes the most popular, up to the rank where the
        // expected count of held chunks reaches its size.
        let mut sampled: Vec<(u32, bool)> = Vec::with_capacity(SHARE_SAMPLES);
        for _ in 0..SHARE_SAMPLES {
            let (h, key) = (rng.gen_range(0..nodes), rng.gen_range(0..warm.demand.len()));
            let hash = hash_of(key);
            let reached = warm.reached(h, key, |p| weight(&hash, &ids[p as usize]), || is_home(h, &hash));
            sampled.push((warm.rank[key], reached));
        }
        sampled.sort_unstable();
        let catalogue = warm.demand.len() as f64;
        let held = sampled.iter().filter(|s| s.1).count();
        warm.share = held as f64 / SHARE_SAMPLES as f64;
        if warm.share * catalogue > f64::from(disk_chunks) {
            let mut so_far = 0usize;
            let mut limit = catalogue;
            for (i, &(rank, held)) in sampled.iter().enumerate() {
                so_far += usize::from(held);
                if so_far as f64 / (i + 1) as f64 * f64::from(rank) >= f64::from(disk_chunks) {
                    limit = f64::from(rank);
                    break;
                }
            }
            warm.full = Some(FullDisks {
                limit,
                initial: disk_chunks,
                undecided: vec![disk_chunks; nodes],
                evicted: vec![0; nodes],
            });
        }
        warm
    }

    /// Whether node `h` holds the chunk with `key` at the start of the run, asked the first time the run
    /// needs to know; `w(p)` is node `p`'s rendezvous weight for the chunk. After a yes the caller indexes the
    /// chunk and calls [`WarmCaches::decided`].
    /// `is_home()`: whether `h` is the chunk's home in its cell (asked only with cell homes).
    pub fn holds(
        &mut self,
        h: usize,
        key: usize,
        hash: &ChunkHash,
        w: impl Fn(u32) -> u64,
        is_home: impl FnOnce() -> bool,
    ) -> bool {
        if self.evicted.contains(&(h as u32, *hash)) {
            return false;
        }
        if let Some(full) = &self.full {
            // Fills evicted the least popular undecided chunks: the limit falls by as many held ranks.
            let limit = full.limit * (1.0 - f64::from(full.evicted[h]) / f64::from(full.initial));
            if full.undecided[h] == 0 || f64::from(self.rank[key]) >= limit {
                return false;
            }
        }
        self.reached(h, key, w, is_home)
    }

    /// A chunk node `h` held from the start is now in its cache index.
    pub fn decided(&mut self, h: usize) {
        if let Some(full) = &mut self.full {
            full.undecided[h] = full.undecided[h].saturating_sub(1);
        }
    }

    /// Node `h`'s cache index evicted these chunks: whatever it held at the start, it no longer does.
    pub fn evicted(&mut self, h: usize, hashes: Vec<ChunkHash>) {
        self.evicted.extend(hashes.into_iter().map(|hash| (h as u32, hash)));
    }

    /// Node `h`, with `cached` chunks in its index, is about to index a fill: if its disk is full, the fill
    /// evicts an undecided chunk (older than anything the run touched).
    pub fn make_room(&mut self, h: usize, cached: usize, disk_chunks: u32) {
        if let Some(full) = &mut self.full {
            if full.undecided[h] > 0 && cached as u64 + u64::from(full.undecided[h]) >= u64::from(disk_chunks) {
                full.undecided[h] -= 1;
                full.evicted[h] += 1;
            }
        }
    }

    /// Whether requests for the chunk with `key` reached node `h` within the horizon (see the module docs).
    fn reached(&mut self, h: usize, key: usize, w: impl Fn(u32) -> u64, is_home: impl FnOnce() -> bool) -> bool {
        let demand = self.demand[key];
        let mut state = self.seed ^ ((h as u64) << 32 | key as u64);
        let draw = (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        // Reached if the requests' rate exceeds −ln(1 − draw) / H: stop adding sources once it does.
        let needed = -(1.0 - draw).ln() / self.horizon_secs / demand.rate.max(f64::MIN_POSITIVE);
        let replicas = usize::from(demand.replicas).max(1);
        // The client networks whose placement set holds `h` (each gives a share if `h` ranks in its top)...
        let placements = self.near_of.row(h).iter().filter_map(|&c| {
            let near = self.near.row(c as usize);
            let len = usize::from(self.place[c as usize]).max(replicas.min(near.len())).clamp(1, near.len());
            let set = &near[..len];
            set.contains(&(h as u32)).then(|| (set, replicas.min(len)))
        });
        // ... and the most the nodes whose home `h` may be can add: if even all of it falls short, `h` was not
        // reached, and no weight need be hashed (the margin covers rounding in the order of the sums).
        let from_homes = match &self.cells {
            Some((cell, share)) => f64::from(share[cell[h] as usize] - self.serves[h]),
            None => self.hood_reach[h],
        };
        let most = placements.clone().map(|(_, top)| 1.0 / (top as f64 * self.clients)).sum::<f64>() + from_homes;
        if most * (1.0 + 1e-9) < needed && !self.place.is_empty() {
            return false;
        }
        let weights = &mut self.weights;
        weights.start();
        let mine = weights.get(h as u32, &w);
        // Shares of the chunk's requests reaching `h`: from client networks...
        let mut reach = if self.place.is_empty() { f64::from(self.serves[h]) } else { 0.0 };
        for (set, top) in placements {
            if set.iter().filter(|&&p| p as usize != h && weights.get(p, &w) > mine).count() < top {
                reach += 1.0 / (top as f64 * self.clients);
            }
        }
        if reach >= needed {
            return true;
        }
        // ... and from the nodes whose home it is: with cell homes, every other member of its cell...
        if self.cells.is_some() {
            return reach + from_homes >= needed && is_home();
        }
        // ... else the neighbours whose home it is (most nodes are outranked in a neighbourhood at once).
        for &n in self.in_hoods.row(h) {
            let serves = f64::from(self.serves[n as usize]);
            // A neighbour no client places chunks on has no misses to send.
            if serves == 0.0 {
                continue;
            }
            let hood = self.hoods.row(n as usize);
            // A member whose weight is known already often outranks `h`: look for one before hashing.
            if hood.iter().any(|&p| weights.known(p).is_some_and(|wp| wp > mine)) {
                continue;
            }
            if hood.iter().all(|&p| p as usize == h || weights.get(p, &w) < mine) {
                reach += serves;
                if reach >= needed {
                    return true;
                }
            }
        }
        false
    }
}

/// Rendezvous weights of one chunk, each computed once: a small direct-mapped table (neighbourhoods
/// overlap, so the same nodes come up again and again).
#[derive(Debug)]
struct Weights {
    /// (generation, node, weight); entries of older generations are stale.
    slots: Vec<(u32, u32, u64)>,
    generation: u32,
}

impl Weights {
    const SLOTS: usize = 1024;

    fn new() -> Self {
        Self { slots: vec![(0, 0, 0); Self::SLOTS], generation: 0 }
    }

    /// Forgets the previous chunk's weights.
    fn start(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slots.fill((0, 0, 0));
            self.generation = 1;
        }
    }

    fn slot(p: u32) -> usize {
        (p.wrapping_mul(0x9E37_79B1) >> (32 - Self::SLOTS.trailing_zeros())) as usize
    }

    fn known(&self, p: u32) -> Option<u64> {
        let slot = self.slots[Self::slot(p)];
        (slot.0 == self.generation && slot.1 == p).then_some(slot.2)
    }

    fn get(&mut self, p: u32, w: &impl Fn(u32) -> u64) -> u64 {
        let slot = &mut self.slots[Self::slot(p)];
        if slot.0 != self.generation || slot.1 != p {
            *slot = (self.generation, p, w(p));
        }
        slot.2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rows_transpose_to_the_rows_each_item_is_in() {
        let mut rows = Rows::default();
        rows.push([1, 2]);
        rows.push([]);
        rows.push([2, 0]);
        let t = rows.transpose(3);
        assert_eq!((t.row(0), t.row(1), t.row(2)), (&[2][..], &[0][..], &[0, 2][..]));
        assert!(rows.row(1).is_empty() && rows.row(7).is_empty());
    }

    fn ids(n: u32) -> Vec<NodeId> {
        (0..n).map(|i| NodeId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect()
    }

    fn hash(key: usize) -> ChunkHash {
        ChunkHash(*blake3::hash(&(key as u64).to_be_bytes()).as_bytes())
    }

    fn rows(rows: &[&[u32]]) -> Rows {
        let mut out = Rows::default();
        for row in rows {
            out.push(row.iter().copied());
        }
        out
    }

    /// Chunks whose popularity falls with their key, `hot` of them with 8 replicas.
    fn demand(chunks: usize, hot: usize) -> Vec<ChunkDemand> {
        (0..chunks)
            .map(|key| ChunkDemand { rate: 1.0 / (1.0 + key as f64), replicas: if key < hot { 8 } else { 1 } })
            .collect()
    }

    const DAY: f64 = 86_400.0;

    fn warm(
        placement: Placement,
        demand: Vec<ChunkDemand>,
        horizon_secs: f64,
        disk: u32,
        ids: &[NodeId],
    ) -> WarmCaches {
        WarmCaches::new(
            placement,
            demand,
            1,
            horizon_secs,
            disk,
            ids,
            hash,
            |_, _| false,
            &mut StdRng::seed_from_u64(1),
        )
    }

    fn held(warm: &mut WarmCaches, ids: &[NodeId], h: usize, keys: std::ops::Range<usize>) -> Vec<usize> {
        keys.filter(|&key| warm.holds(h, key, &hash(key), |p| weight(&hash(key), &ids[p as usize]), || false)).collect()
    }

    #[test]
    fn a_node_holds_what_its_clients_asked_for_and_what_it_is_home_for() {
        // One client network places everything on node 0, whose neighbourhood is nodes 1..=4.
        let ids = ids(5);
        let placement = Placement {
            hoods: rows(&[&[1, 2, 3, 4], &[], &[], &[], &[]]),
            near: rows(&[&[0]]),
            place: vec![1],
            cells: None,
        };
        let mut warm = warm(placement, demand(40, 0), DAY, 1000, &ids);
        assert_eq!(held(&mut warm, &ids, 0, 0..40).len(), 40);
        for key in 0..40 {
            let home = (1..5).max_by_key(|&p| weight(&hash(key), &ids[p])).expect("four peers");
            for h in 1..5 {
                assert_eq!(
                    held(&mut warm, &ids, h, key..key + 1).len(),
                    usize::from(h == home),
                    "chunk {key} node {h}"
                );
            }
        }
    }

    #[test]
    fn a_chunk_the_run_evicted_is_not_held_again() {
        let ids = ids(1);
        let placement = Placement { hoods: rows(&[&[]]), near: rows(&[&[0]]), place: vec![1], cells: None };
        let mut warm = warm(placement, demand(4, 0), DAY, 1000, &ids);
        assert_eq!(held(&mut warm, &ids, 0, 0..4), [0, 1, 2, 3]);
        warm.evicted(0, vec![hash(2)]);
        assert_eq!(held(&mut warm, &ids, 0, 0..4), [0, 1, 3]);
    }

    #[test]
    fn with_cell_homes_the_home_holds_what_its_cell_missed() {
        // Nodes 0 and 1 form a cell, and clients place everything on node 0: node 1 holds what node 0
        // asked it for — every chunk whose home it is — and nothing else.
        let ids = ids(2);
        let placement =
            Placement { hoods: Rows::default(), near: rows(&[&[0]]), place: vec![1], cells: Some(vec![0, 0]) };
        let home = |key: usize| (0..2).max_by_key(|&p| weight(&hash(key), &ids[p])).unwrap_or(0);
        let mut warm = WarmCaches::new(
            placement,
            demand(40, 0),
            1,
            DAY,
            1000,
            &ids,
            hash,
            |h, c| (0..40).find(|&k| hash(k) == *c).is_some_and(|k| home(k) == h),
            &mut StdRng::seed_from_u64(1),
        );
        let homed: Vec<usize> = (0..40).filter(|&k| home(k) == 1).collect();
        let held: Vec<usize> = (0..40)
            .filter(|&k| warm.holds(1, k, &hash(k), |p| weight(&hash(k), &ids[p as usize]), || home(k) == 1))
            .collect();
        assert!(!homed.is_empty());
        assert_eq!(held, homed);
    }

    #[test]
    fn within_a_short_horizon_only_some_requests_arrived() {
        // Chunk rates 1/(1 + key) per second over 2 s: held with probability 1 − exp(−2 / (1 + key)).
        let ids = ids(1);
        let placement = Placement { hoods: rows(&[&[]]), near: rows(&[&[0]]), place: vec![1], cells: None };
        let mut warm = warm(placement, demand(4000, 0), 2.0, 10_000, &ids);
        let held = held(&mut warm, &ids, 0, 0..4000);
        let expected: f64 = (0..4000).map(|key| 1.0 - (-2.0 / (1.0 + key as f64)).exp()).sum();
        assert!(
            (held.len() as f64 - expected).abs() < 4.0 * expected.sqrt(),
            "{} held, {expected:.0} expected",
            held.len()
        );
        let share =
            |keys: std::ops::Range<usize>| held.iter().filter(|k| keys.contains(k)).count() as f64 / keys.len() as f64;
        assert!(share(0..20) > 0.2 && share(2000..4000) < 0.01, "popular chunks more often");
    }

    #[test]
    fn hot_chunks_are_held_by_more_of_a_networks_near_nodes() {
        let ids = ids(8);
        let placement = Placement {
            hoods: rows(&[&[] as &[u32]; 8]),
            near: rows(&[&[0, 1, 2, 3, 4, 5, 6, 7]]),
            place: vec![3],
            cells: None,
        };
        let mut warm = warm(placement, demand(400, 1), DAY, 1000, &ids);
        let mut holders =
            |key: usize| (0..8).filter(|&h| !held(&mut warm, &ids, h, key..key + 1).is_empty()).collect::<Vec<_>>();
        assert_eq!(holders(0).len(), 8);
        assert!((1..400).all(|key| matches!(holders(key)[..], [h] if h < 3)), "ordinary chunks: one of the first 3");
        assert!((warm.share - 1.0 / 8.0).abs() < 0.02, "an eighth of the chunks on each node: {}", warm.share);
    }

    #[test]
    fn a_full_disk_keeps_the_most_popular_and_fills_evict_the_least_popular() {
        let ids = ids(3);
        let placement =
            Placement { hoods: rows(&[&[] as &[u32]; 3]), near: rows(&[&[0, 1, 2]]), place: vec![3], cells: None };
        // Each node holds a third of 600 chunks: 200, on a disk of 20.
        let mut warm = warm(placement, demand(600, 0), DAY, 20, &ids);
        let (before, others) = (held(&mut warm, &ids, 0, 0..600), held(&mut warm, &ids, 1, 0..600).len());
        assert!((12..=30).contains(&before.len()), "{} chunks held on a 20-chunk disk", before.len());
        assert!(before.iter().all(|&key| key < 90), "the most popular: {before:?}");
        for _ in 0..10 {
            warm.make_room(0, 0, 20);
        }
        assert!(held(&mut warm, &ids, 0, 0..600).len() < before.len(), "fills evicted the least popular");
        assert_eq!(held(&mut warm, &ids, 1, 0..600).len(), others, "other nodes keep theirs");
    }
}
