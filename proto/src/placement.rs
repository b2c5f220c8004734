//! Rendezvous (highest-random-weight) hashing: every party that knows the same node set ranks the nodes for a
//! chunk identically, and when a node joins or leaves only ~1/n of the chunks move. The tracker uses it to
//! schedule, nodes will use it to find peers holding a chunk, the simulator to model both.

use crate::{ChunkHash, NodeId};

/// The pseudo-random weight of `node` for `chunk`: the first 8 bytes of BLAKE3(chunk ‖ node).
pub fn weight(chunk: &ChunkHash, node: &NodeId) -> u64 {
    // One 64-byte input: `blake3::hash` spares building a Hasher (2 KB) per weight, a quarter of a 10^6-node
    // simulation's time; the digest is the same.
    let mut input = [0u8; 64];
    input[..32].copy_from_slice(chunk.as_bytes());
    input[32..].copy_from_slice(node.as_bytes());
    let digest = blake3::hash(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// Indices into `nodes` of the `k` highest-weight nodes for `chunk`, best first. Ties (practically
/// impossible) break by node id so the order is total and deterministic.
pub fn top_k(chunk: &ChunkHash, nodes: &[NodeId], k: usize) -> Vec<usize> {
    let mut ranked: Vec<(u64, &NodeId, usize)> =
        nodes.iter().enumerate().map(|(i, n)| (weight(chunk, n), n, i)).collect();
    let k = k.min(ranked.len());
    let by_weight = |a: &(u64, &NodeId, usize), b: &(u64, &NodeId, usize)| b.0.cmp(&a.0).then(a.1.cmp(b.1));
    if k < ranked.len() && k > 0 {
        ranked.select_nth_unstable_by(k - 1, by_weight);
    }
    ranked.truncate(k);
    ranked.sort_unstable_by(by_weight);
    ranked.into_iter().map(|(_, _, i)| i).collect()
}

/// Peers a node asks at once for a chunk it misses, before the origin.
pub const PEERS_ASKED: usize = 3;

/// Which of a node's overlay neighbourhood (its nearest direct peers) it asks for a missing `chunk`, best
/// first: the top of rendezvous placement. Nearby nodes' neighbourhoods overlap, so they rank the same peer
/// first for a chunk: that peer is the chunk's *home*, which fills through. The node and the simulator both
/// rank with this.
pub fn peers_to_ask(chunk: &ChunkHash, neighbourhood: &[NodeId]) -> Vec<usize> {
    top_k(chunk, neighbourhood, PEERS_ASKED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u8) -> Vec<NodeId> {
        (0..n).map(|i| NodeId(*blake3::hash(&[i]).as_bytes())).collect()
    }

    /// Placement is shared by nodes and trackers of different versions: the weight must stay BLAKE3 of the
    /// chunk hash followed by the node id.
    #[test]
    fn the_weight_is_blake3_of_chunk_then_node() {
        let (c, n) = (ChunkHash::of(b"chunk"), nodes(1)[0]);
        let mut h = blake3::Hasher::new();
        h.update(c.as_bytes());
        h.update(n.as_bytes());
        let first: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
        assert_eq!(weight(&c, &n), u64::from_be_bytes(first));
    }

    #[test]
    fn deterministic_and_order_independent() {
        let ns = nodes(20);
        let c = ChunkHash::of(b"chunk");
        let a: Vec<NodeId> = top_k(&c, &ns, 3).into_iter().map(|i| ns[i]).collect();
        let mut rev = ns.clone();
        rev.reverse();
        let b: Vec<NodeId> = top_k(&c, &rev, 3).into_iter().map(|i| rev[i]).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn removing_a_node_moves_only_its_chunks() {
        let ns = nodes(10);
        let chunks: Vec<ChunkHash> = (0..2000u32).map(|i| ChunkHash::of(&i.to_be_bytes())).collect();
        let before: Vec<NodeId> = chunks.iter().map(|c| ns[top_k(c, &ns, 1)[0]]).collect();
        let fewer: Vec<NodeId> = ns[1..].to_vec();
        for (c, owner) in chunks.iter().zip(&before) {
            let now = fewer[top_k(c, &fewer, 1)[0]];
            if *owner != ns[0] {
                assert_eq!(now, *owner, "a chunk not on the removed node moved");
            }
        }
        // Each node owns roughly a tenth.
        let owned = before.iter().filter(|n| **n == ns[0]).count();
        assert!((100..=300).contains(&owned), "node 0 owns {owned} of 2000");
    }
}
