//! An append-only Merkle log in the manner of Certificate Transparency (RFC 9162 §2.1), over BLAKE3 with
//! distinct prefixes for leaves (0x00) and interior nodes (0x01), so a leaf can never pass for a node.
//!
//! Proof generation works on any [`SubtreeSource`] that can give the hash of a complete, aligned subtree
//! (a stored tree or an in-memory list); verification needs only the proof, the leaf and tree heads.

pub type Hash = [u8; 32];

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0x00]);
    h.update(leaf);
    *h.finalize().as_bytes()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0x01]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// Hash of the empty tree.
pub fn empty_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// Gives the hash of the complete subtree of `2^level` leaves starting at leaf `index << level`.
pub trait SubtreeSource {
    fn subtree(&self, level: u32, index: u64) -> Hash;
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH of leaves `[lo, hi)`, built from complete subtrees.
pub fn range_hash(src: &impl SubtreeSource, lo: u64, hi: u64) -> Hash {
    let size = hi - lo;
    if size == 0 {
        return empty_root();
    }
    if size.is_power_of_two() && lo.is_multiple_of(size) {
        return src.subtree(size.trailing_zeros(), lo / size);
    }
    let k = split(size);
    node_hash(&range_hash(src, lo, lo + k), &range_hash(src, lo + k, hi))
}

/// Root of the tree of the first `size` leaves.
pub fn root(src: &impl SubtreeSource, size: u64) -> Hash {
    range_hash(src, 0, size)
}

/// Audit path for leaf `index` in the tree of the first `size` leaves (RFC 9162 PATH).
pub fn inclusion_proof(src: &impl SubtreeSource, index: u64, size: u64) -> Vec<Hash> {
    fn path(src: &impl SubtreeSource, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            path(src, m, lo, lo + k, out);
            out.push(range_hash(src, lo + k, hi));
        } else {
            path(src, m - k, lo + k, hi, out);
            out.push(range_hash(src, lo, lo + k));
        }
    }
    let mut out = Vec::new();
    if index < size {
        path(src, index, 0, size, &mut out);
    }
    out
}

/// Consistency proof between the trees of the first `first` and `second` leaves (RFC 9162 PROOF).
pub fn consistency_proof(src: &impl SubtreeSource, first: u64, second: u64) -> Vec<Hash> {
    fn subproof(src: &impl SubtreeSource, m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push(range_hash(src, lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            subproof(src, m, lo, lo + k, complete, out);
            out.push(range_hash(src, lo + k, hi));
        } else {
            subproof(src, m - k, lo + k, hi, false, out);
            out.push(range_hash(src, lo, lo + k));
        }
    }
    let mut out = Vec::new();
    if 0 < first && first < second {
        subproof(src, first, 0, second, true, &mut out);
    }
    out
}

/// Checks that `leaf` is leaf `index` of the tree with `root` and `size` leaves (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &[u8], index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = leaf_hash(leaf);
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// Checks that the tree (`second`, `second_root`) extends the tree (`first`, `first_root`)
/// (RFC 9162 §2.1.4.2): the log was only appended to.
pub fn verify_consistency(first: u64, second: u64, proof: &[Hash], first_root: &Hash, second_root: &Hash) -> bool {
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        return proof.is_empty();
    }
    if first > second || proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && fr == *first_root && sr == *second_root
}

/// An in-memory log: the reference the RocksDB one is tested against.
#[derive(Debug, Default, Clone)]
pub struct MemoryLog {
    leaves: Vec<Hash>,
}

impl MemoryLog {
    pub fn push(&mut self, leaf: &[u8]) {
        self.leaves.push(leaf_hash(leaf));
    }
    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }
}

impl SubtreeSource for MemoryLog {
    fn subtree(&self, level: u32, index: u64) -> Hash {
        fn build(leaves: &[Hash]) -> Hash {
            if leaves.len() == 1 {
                return leaves[0];
            }
            let mid = leaves.len() / 2;
            node_hash(&build(&leaves[..mid]), &build(&leaves[mid..]))
        }
        let size = 1usize << level;
        let lo = index as usize * size;
        build(&self.leaves[lo..lo + size])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> MemoryLog {
        let mut l = MemoryLog::default();
        for i in 0..n {
            l.push(&i.to_be_bytes());
        }
        l
    }

    #[test]
    fn inclusion_for_every_leaf_and_size() {
        for size in 1..=33u64 {
            let l = log(size);
            let r = root(&l, size);
            for i in 0..size {
                let p = inclusion_proof(&l, i, size);
                assert!(verify_inclusion(&i.to_be_bytes(), i, size, &p, &r), "leaf {i} of {size}");
                assert!(!verify_inclusion(&(i + 1000).to_be_bytes(), i, size, &p, &r));
                if size > 1 {
                    assert!(!verify_inclusion(&i.to_be_bytes(), (i + 1) % size, size, &p, &r));
                }
            }
        }
    }

    #[test]
    fn consistency_between_every_pair_of_sizes() {
        let l = log(40);
        for second in 1..=40u64 {
            for first in 1..=second {
                let p = consistency_proof(&l, first, second);
                let (r1, r2) = (root(&l, first), root(&l, second));
                assert!(verify_consistency(first, second, &p, &r1, &r2), "{first} → {second}");
                if first < second {
                    let mut forked = log(second);
                    forked.leaves[(first - 1) as usize] = leaf_hash(b"rewritten history");
                    assert!(
                        !verify_consistency(first, second, &p, &r1, &root(&forked, second)),
                        "fork {first} → {second}"
                    );
                }
            }
        }
    }
}
