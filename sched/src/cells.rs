//! Cells: a partition of the overlay into regions, so that a chunk has one home per region rather than one
//! per overlapping neighbourhood (issue #17, item 2).
//!
//! Homes chosen by rendezvous over each node's nearest peers are not shared: two nodes a few milliseconds
//! apart have different neighbourhoods, so each may rank a different peer first, and a popular chunk is
//! fetched from the origin by several homes in one region. A partition fixes that: every node of a cell
//! ranks the same members, so all of them agree on the chunk's home, which fetches it from the origin once.
//!
//! A node's cell is either the region label its operator gave it, or the grid cell of its Vivaldi
//! coordinate ([`cell_of`]). Grid cells are centred on multiples of the edge in each dimension (the origin
//! is a cell's centre), so dimensions a fit barely uses, whose values stay near zero, do not split a region
//! in two. The height is left out: it is the host's access link, which every
//! path in and out of it pays, not where it is. A cell depends only on the node's own coordinate, so churn
//! elsewhere never moves it; a coordinate that drifts across a border moves it, as any partition must.
//!
//! Pure code: the node's overlay, the tracker and the simulator call it with what they have (ids,
//! coordinates from [`crate::coords`], labels).

use fog_proto::api::MAX_CELL_LISTED;
use fog_proto::placement::weight;
use fog_proto::{ChunkHash, NodeId};

use crate::coords::{Coord, DIMS};

/// Which cell a node is in: nodes with equal keys are in the same cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellKey(pub u64);

/// The grid's default edge, ms of predicted RTT. A cell should hold a metro area's or a small country's
/// nodes, close enough that a fill from the home costs little, many enough that a popular chunk is asked
/// for there often: in the simulator (`docs/simulation.md`) 25 ms cells cut regions apart, 50 ms ones
/// reached 87 % cold VOD and 67 % live offload, 100 ms ones 95 % and 83 %, as region labels do.
pub const DEFAULT_EDGE_MS: f32 = 100.0;

/// The cell of a node with coordinate `coord` and, if its operator set one, region label `region`. A label
/// wins: it is what the operator knows about the network (a label and a grid cell never share a key).
/// `edge_ms` is the grid's edge; below 1 ms it counts as 1 ms.
pub fn cell_of(coord: &Coord, region: Option<&str>, edge_ms: f32) -> CellKey {
    let mut h = blake3::Hasher::new();
    match region {
        Some(label) => {
            h.update(b"fogcdn cell label\0");
            h.update(label.as_bytes());
        }
        None => {
            h.update(b"fogcdn cell grid\0");
            let edge = edge_ms.max(1.0);
            for x in &coord.pos[..DIMS] {
                // Saturating float-to-int: a wild coordinate lands in an edge cell rather than wrapping.
                let i = (x / edge).round() as i32;
                h.update(&i.to_be_bytes());
            }
        }
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    CellKey(u64::from_be_bytes(first))
}

/// The first `k` members of a cell in a chunk's home order that are `available` (online, not overloaded):
/// indices into `members`, best first. The first is the chunk's home in the cell; a home under load hands
/// off to the next in rendezvous order, and only chunks whose home left or is busy move. The order is
/// rendezvous over member ids, so it does not depend on the order of `members`; ties (practically
/// impossible) break by id.
pub fn home_order(chunk: &ChunkHash, members: &[NodeId], available: impl Fn(usize) -> bool, k: usize) -> Vec<usize> {
    let mut ranked: Vec<(u64, &NodeId, usize)> =
        members.iter().enumerate().filter(|&(i, _)| available(i)).map(|(i, id)| (weight(chunk, id), id, i)).collect();
    let by_weight = |a: &(u64, &NodeId, usize), b: &(u64, &NodeId, usize)| b.0.cmp(&a.0).then(a.1.cmp(b.1));
    let k = k.min(ranked.len());
    if k > 0 && k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, by_weight);
    }
    ranked.truncate(k);
    ranked.sort_unstable_by(by_weight);
    ranked.into_iter().map(|(_, _, i)| i).collect()
}

/// Members a part of a split cell holds at most on average: a cell is listed to each of its nodes (ids and
/// addresses, [`MAX_CELL_LISTED`] at most), so a crowded cell is split into parts, each a cell of its own.
pub const PART_SIZE: usize = 1536;

/// The cell a member of cell `key` with `members` members is in once crowded cells are split: `key` itself
/// up to [`PART_SIZE`] members; past that one of 2^k parts (the fewest that keep parts at [`PART_SIZE`] on
/// average), by the top k bits of the member's rendezvous weight. When a growing cell doubles its parts,
/// each part splits in two, so the chunks homed on the half that stays keep their homes.
pub fn part_of(key: CellKey, id: &NodeId, members: usize) -> CellKey {
    if members <= PART_SIZE {
        return key;
    }
    let bits = members.div_ceil(PART_SIZE).next_power_of_two().trailing_zeros();
    let part = weight(&salt(key), id) >> (64 - bits);
    let mut h = blake3::Hasher::new();
    h.update(b"fogcdn cell part\0");
    h.update(&key.0.to_be_bytes());
    h.update(&[bits as u8]);
    h.update(&part.to_be_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    CellKey(u64::from_be_bytes(first))
}

/// The members of cell `key` it lists to its nodes, as indices into `members`: all of them, or the
/// [`MAX_CELL_LISTED`] first in the cell's own rendezvous order when a part came out larger than that (the
/// others use the list but are nobody's home).
pub fn listed(key: CellKey, members: &[NodeId]) -> Vec<usize> {
    if members.len() <= MAX_CELL_LISTED {
        return (0..members.len()).collect();
    }
    home_order(&salt(key), members, |_| true, MAX_CELL_LISTED)
}

/// The pseudo-chunk a cell ranks its own members by.
fn salt(key: CellKey) -> ChunkHash {
    let mut input = *b"fogcdn cell salt\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    input[24..].copy_from_slice(&key.0.to_be_bytes());
    ChunkHash(*blake3::hash(&input).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f32, y: f32) -> Coord {
        Coord { pos: [x, y, 0.3, -0.2], height: 5.0, error: 0.2 }
    }

    fn ids(n: u32) -> Vec<NodeId> {
        (0..n).map(|i| NodeId(*blake3::hash(&i.to_be_bytes()).as_bytes())).collect()
    }

    #[test]
    fn nearby_coordinates_share_a_cell_and_distant_ones_do_not() {
        let here = cell_of(&at(100.0, 40.0), None, 50.0);
        assert_eq!(here, cell_of(&at(110.0, 30.0), None, 50.0));
        // Dimensions near zero and the height do not split it.
        let mut other = at(104.0, 41.0);
        other.pos[2] = -0.4;
        other.height = 40.0;
        assert_eq!(here, cell_of(&other, None, 50.0));
        assert_ne!(here, cell_of(&at(200.0, 40.0), None, 50.0));
        assert_ne!(here, cell_of(&at(100.0, 40.0), None, 20.0), "the edge decides the cells");
    }

    #[test]
    fn a_region_label_decides_the_cell() {
        let (a, b) = (at(0.0, 0.0), at(300.0, 300.0));
        assert_eq!(cell_of(&a, Some("eu-west"), 50.0), cell_of(&b, Some("eu-west"), 50.0));
        assert_ne!(cell_of(&a, Some("eu-west"), 50.0), cell_of(&a, Some("us-east"), 50.0));
        assert_ne!(cell_of(&a, Some(""), 50.0), cell_of(&a, None, 50.0));
        // Non-finite or huge coordinates still land in a cell.
        let wild = Coord { pos: [f32::NAN, f32::INFINITY, -1e30, 0.0], height: 1.0, error: 1.0 };
        assert_eq!(cell_of(&wild, None, 0.0), cell_of(&wild, None, -3.0));
    }

    #[test]
    fn every_member_agrees_on_the_home_and_a_busy_home_hands_off_to_the_next() {
        let members = ids(200);
        let chunk = ChunkHash::of(b"popular");
        let order = home_order(&chunk, &members, |_| true, 3);
        assert_eq!(order.len(), 3);
        // Another node lists the cell in another order: same homes.
        let mut shuffled: Vec<NodeId> = members.clone();
        shuffled.reverse();
        let theirs: Vec<NodeId> = home_order(&chunk, &shuffled, |_| true, 3).into_iter().map(|i| shuffled[i]).collect();
        assert_eq!(theirs, order.iter().map(|&i| members[i]).collect::<Vec<_>>());
        // The home is busy: the next two in order take over, then the fourth.
        let handed = home_order(&chunk, &members, |i| i != order[0], 3);
        assert_eq!(handed[..2], order[1..]);
        assert!(!order.contains(&handed[2]));
        assert!(home_order(&chunk, &members, |_| false, 3).is_empty());
    }

    #[test]
    fn homes_spread_chunks_evenly_over_a_cell() {
        let members = ids(10);
        let mut homed = [0u32; 10];
        for c in 0..5000u32 {
            homed[home_order(&ChunkHash::of(&c.to_be_bytes()), &members, |_| true, 1)[0]] += 1;
        }
        assert!(homed.iter().all(|&n| (350..=650).contains(&n)), "{homed:?}");
    }

    #[test]
    fn a_crowded_cell_splits_into_parts_and_a_doubling_keeps_half_of_each() {
        let key = CellKey(7);
        let n = 2 * PART_SIZE + 1;
        let members = ids(2 * n as u32);
        assert!(members.iter().all(|id| part_of(key, id, PART_SIZE) == key), "small cells stay whole");
        let parts = |n: usize| -> std::collections::HashMap<CellKey, Vec<NodeId>> {
            let mut by: std::collections::HashMap<CellKey, Vec<NodeId>> = Default::default();
            for id in &members[..n] {
                by.entry(part_of(key, id, n)).or_default().push(*id);
            }
            by
        };
        let before = parts(n);
        assert_eq!(before.len(), 4);
        let sizes: Vec<usize> = before.values().map(Vec::len).collect();
        assert!(sizes.iter().all(|m| (PART_SIZE / 4..=MAX_CELL_LISTED).contains(m)), "{sizes:?}");
        // Twice the members, twice the parts: every new part lies inside one old part.
        let after = parts(2 * n);
        assert_eq!(after.len(), 8);
        for m in after.values() {
            let within = |old: &Vec<NodeId>| m.iter().filter(|id| members[..n].contains(id)).all(|id| old.contains(id));
            assert!(before.values().any(within));
        }
        // A part larger than a list lists its first members in its own order, the same whatever the order.
        let crowd = &members[..MAX_CELL_LISTED + 100];
        let chosen = listed(key, crowd);
        assert_eq!(chosen.len(), MAX_CELL_LISTED);
        let mut reversed: Vec<NodeId> = crowd.to_vec();
        reversed.reverse();
        let mut a: Vec<NodeId> = chosen.iter().map(|&i| crowd[i]).collect();
        let mut b: Vec<NodeId> = listed(key, &reversed).iter().map(|&i| reversed[i]).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
}
