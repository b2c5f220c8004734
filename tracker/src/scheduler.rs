//! The scheduler: a pure function from a registry snapshot and a request to candidate nodes per chunk.
//! It does no I/O and keeps no state, so the tracker and the simulator run the same code.
//!
//! Today's policy is cache affinity: rendezvous hashing of each chunk id over the healthy nodes, so every
//! client asking for a chunk is sent to the same few nodes and they stay warm.

use std::collections::HashMap;

use fog_proto::api::NodeContact;
use fog_proto::placement::top_k;
use fog_proto::{ChunkHash, NodeId};

/// Healthy nodes at one moment, sorted by id so scheduling does not depend on map iteration order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeContact>,
}

impl Snapshot {
    pub fn new(mut nodes: Vec<NodeContact>) -> Self {
        nodes.sort_unstable_by_key(|n| n.id);
        Self { nodes }
    }
}

/// Per chunk, up to `k` candidates best first, as indices into the returned (compacted) node list.
pub fn schedule(snapshot: &Snapshot, chunks: &[ChunkHash], k: usize) -> (Vec<NodeContact>, Vec<Vec<u32>>) {
    let ids: Vec<NodeId> = snapshot.nodes.iter().map(|n| n.id).collect();
    let mut used: Vec<NodeContact> = Vec::new();
    let mut slot: HashMap<usize, u32> = HashMap::new();
    let per_chunk = chunks
        .iter()
        .map(|chunk| {
            top_k(chunk, &ids, k)
                .into_iter()
                .map(|i| {
                    *slot.entry(i).or_insert_with(|| {
                        used.push(snapshot.nodes[i].clone());
                        (used.len() - 1) as u32
                    })
                })
                .collect()
        })
        .collect();
    (used, per_chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn node(i: u8) -> NodeContact {
        NodeContact {
            id: NodeId(*blake3::hash(&[i]).as_bytes()),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(i))),
            via: None,
        }
    }

    #[test]
    fn deterministic_compact_and_bounded() {
        let chunks: Vec<ChunkHash> = (0..50u32).map(|i| ChunkHash::of(&i.to_be_bytes())).collect();
        let a = Snapshot::new((0..10).map(node).collect());
        let b = Snapshot::new((0..10).rev().map(node).collect());
        let (na, sa) = schedule(&a, &chunks, 3);
        let (nb, sb) = schedule(&b, &chunks, 3);
        assert_eq!((na.clone(), sa.clone()), (nb, sb));
        assert!(sa.iter().all(|c| c.len() == 3));
        let mut seen = std::collections::HashSet::new();
        assert!(na.iter().all(|n| seen.insert(n.id)), "node list has duplicates");
        assert!(sa.iter().flatten().all(|&i| (i as usize) < na.len()));
    }

    #[test]
    fn empty_snapshot_gives_empty_candidates() {
        let (nodes, sched) = schedule(&Snapshot::default(), &[ChunkHash::of(b"x")], 3);
        assert!(nodes.is_empty());
        assert_eq!(sched, vec![Vec::<u32>::new()]);
    }
}
