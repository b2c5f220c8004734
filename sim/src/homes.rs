//! Cell homes (`--homes grid|region`): every node belongs to one cell of a partition of the overlay
//! (`fog_sched::cells`), and a chunk's home for a node is the first member of the node's cell in the chunk's
//! rendezvous order that is online and not busy — the same for every node of the cell, so a chunk is
//! fetched from the origin once per cell.
//!
//! Cells here are fixed for the run: nodes' coordinates are fitted before it, and a node's cell depends only
//! on its own coordinate (or its region). A cell at 10^6 nodes holds tens of thousands of members, so
//! ranking them all for every miss would cost more than the rest of the run: the order of each (cell,
//! chunk) is computed once over every member, online or not, and kept to its first [`KEPT`] entries; a miss
//! filters those, and ranks the whole cell only when fewer than it needs are available — the same answer
//! as ranking the available members each time.

use std::collections::HashMap;

use fog_proto::{ChunkHash, NodeId};
use fog_sched::cells::{cell_of, home_order, part_of, CellKey};
use fog_sched::coords::Coord;

/// How much of a (cell, chunk) home order is kept.
const KEPT: usize = 8;

#[derive(Debug)]
pub struct CellHomes {
    /// Per node, its cell (dense index); per cell, its members' node indices and ids.
    cell: Vec<u32>,
    members: Vec<Vec<u32>>,
    member_ids: Vec<Vec<NodeId>>,
    /// Cell keys (before splitting) to their parts' cells, and how cells are keyed (region labels, or the
    /// grid's edge).
    parts: HashMap<CellKey, Vec<u32>>,
    by_region: bool,
    edge_ms: f32,
    /// (cell, the chunk hash's first 8 bytes) → the first [`KEPT`] members (node indices) in the chunk's home
    /// order.
    orders: HashMap<(u32, u64), Box<[u32]>>,
}

impl CellHomes {
    /// Cells of nodes with these ids and coordinates, and (for region cells) region labels; crowded cells
    /// split into parts as the tracker splits them (`fog_sched::cells::part_of`).
    pub fn new(ids: &[NodeId], coords: &[Coord], regions: Option<&[u16]>, edge_ms: f32) -> Self {
        let mut dense: HashMap<CellKey, u32> = HashMap::new();
        let label = |region: u16| format!("region-{region}");
        let keys: Vec<CellKey> = coords
            .iter()
            .enumerate()
            .map(|(i, coord)| cell_of(coord, regions.map(|r| label(r[i])).as_deref(), edge_ms))
            .collect();
        let mut sizes: HashMap<CellKey, usize> = HashMap::new();
        for key in &keys {
            *sizes.entry(*key).or_default() += 1;
        }
        let (mut cell, mut members, mut member_ids) = (Vec::with_capacity(ids.len()), Vec::new(), Vec::new());
        let mut parts: HashMap<CellKey, Vec<u32>> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let key = part_of(keys[i], id, sizes[&keys[i]]);
            let next = dense.len() as u32;
            let c = *dense.entry(key).or_insert(next);
            if c == next {
                members.push(Vec::new());
                member_ids.push(Vec::new());
                parts.entry(keys[i]).or_default().push(c);
            }
            cell.push(c);
            members[c as usize].push(i as u32);
            member_ids[c as usize].push(*id);
        }
        Self { cell, members, member_ids, parts, by_region: regions.is_some(), edge_ms, orders: HashMap::new() }
    }

    /// The cell a host with this coordinate and region is in, if any node is; in a split cell, the part
    /// `pick` selects (the tracker counts a viewer in the part its first node is in, any of them).
    pub fn cell_at(&self, coord: &Coord, region: u16, pick: usize) -> Option<u32> {
        let label = self.by_region.then(|| format!("region-{region}"));
        let parts = self.parts.get(&cell_of(coord, label.as_deref(), self.edge_ms))?;
        Some(parts[pick % parts.len()])
    }

    pub fn cell(&self, n: usize) -> u32 {
        self.cell[n]
    }

    pub fn cells(&self) -> usize {
        self.members.len()
    }

    /// Node indices of a cell's members.
    pub fn members(&self, cell: u32) -> &[u32] {
        &self.members[cell as usize]
    }

    /// The first `k` members of `cell` that are `available`, in the chunk's home order (node indices).
    pub fn order(&mut self, cell: u32, hash: &ChunkHash, available: impl Fn(usize) -> bool, k: usize) -> Vec<usize> {
        let ids = &self.member_ids[cell as usize];
        let members = &self.members[cell as usize];
        let kept = self
            .orders
            .entry((cell, crate::prefix(hash)))
            .or_insert_with(|| home_order(hash, ids, |_| true, KEPT).into_iter().map(|i| members[i]).collect());
        let found: Vec<usize> = kept.iter().map(|&n| n as usize).filter(|&n| available(n)).take(k).collect();
        if found.len() == k || kept.len() == members.len() {
            return found;
        }
        home_order(hash, ids, |i| available(members[i] as usize), k).into_iter().map(|i| members[i] as usize).collect()
    }

    /// The chunk's home in node `h`'s cell with every member online and idle (as caches, which outlive
    /// offline periods, were filled over a long run).
    pub fn home(&mut self, h: usize, hash: &ChunkHash) -> usize {
        let cell = self.cell[h];
        self.order(cell, hash, |_| true, 1).first().copied().unwrap_or(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_order_gives_the_same_homes_as_ranking_the_whole_cell() {
        let n = 40u32;
        let ids: Vec<NodeId> = (0..n).map(|i| NodeId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect();
        // Two regions of 20 nodes each.
        let regions: Vec<u16> = (0..n).map(|i| (i % 2) as u16).collect();
        let mut homes = CellHomes::new(&ids, &vec![Coord::default(); n as usize], Some(&regions), 50.0);
        assert_eq!(homes.cells(), 2);
        for key in 0..50usize {
            let hash = ChunkHash::of(&key.to_be_bytes());
            for skip in [0usize, 5, 15] {
                // The first `skip` of the full order are busy.
                let members: Vec<u32> = homes.members(0).to_vec();
                let member_ids: Vec<NodeId> = members.iter().map(|&m| ids[m as usize]).collect();
                let full: Vec<usize> = home_order(&hash, &member_ids, |_| true, members.len())
                    .into_iter()
                    .map(|i| members[i] as usize)
                    .collect();
                let busy = &full[..skip];
                let got = homes.order(0, &hash, |m| !busy.contains(&m), 3);
                assert_eq!(got, full[skip..skip + 3], "chunk {key}, {skip} busy");
            }
            assert_eq!(homes.home(members_first(&homes), &hash), homes.order(0, &hash, |_| true, 1)[0]);
        }
    }

    fn members_first(homes: &CellHomes) -> usize {
        homes.members(0)[0] as usize
    }
}
