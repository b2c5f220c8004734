//! Verifiable bandwidth credits (`docs/credits.md`).
//!
//! 1. The tracker issues a **ticket** per client session (signed by the tracker): which nodes may serve
//!    which object, how many bytes at most, until when, in which epoch.
//! 2. Per (session, node) the client signs one **commitment** to the anchor of a PayWord hash chain; after
//!    each verified chunk it reveals the next preimage. A **receipt** is the commitment plus the latest
//!    preimage: one signature per (session, node), one hash per chunk.
//! 3. Nodes redeem receipts in signed batches; accepted credit becomes a **ledger** leaf in a Merkle log.

use serde::{Deserialize, Serialize};

use crate::api::Signed;
use crate::{ContentId, NodeId};

pub const KIND_TICKET: &str = "ticket";
pub const KIND_COMMITMENT: &str = "commitment";
pub const KIND_REDEEM: &str = "redeem";
pub const KIND_TREE_HEAD: &str = "tree-head";

/// Longest payment chain: bounds the hashing a verifier does for one receipt.
pub const MAX_CHAIN: u32 = 1 << 20;
/// Most receipts in one redemption batch.
pub const MAX_BATCH: usize = 256;

pub type Digest = [u8; 32];

/// One step of a payment chain: `H(w)`, domain-separated from every other BLAKE3 use.
pub fn chain_step(w: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"fog-payword-v1");
    h.update(w);
    *h.finalize().as_bytes()
}

/// A payment chain from `seed`: `chain[0]` is the anchor, `chain[i]` pays for the i-th chunk, and
/// `chain_step(chain[i]) == chain[i - 1]`.
pub fn payment_chain(seed: Digest, length: u32) -> Vec<Digest> {
    let mut chain = vec![seed; length as usize + 1];
    for i in (0..length as usize).rev() {
        chain[i] = chain_step(&chain[i + 1]);
    }
    chain
}

/// Whether `newer` at `newer_index` hashes down to `older` at `older_index` (for the anchor: index 0).
pub fn chain_links(older: &Digest, older_index: u32, newer: &Digest, newer_index: u32) -> bool {
    if newer_index < older_index || newer_index > MAX_CHAIN {
        return false;
    }
    let mut w = *newer;
    for _ in older_index..newer_index {
        w = chain_step(&w);
    }
    w == *older
}

/// Hex of 32 bytes, as the JSON forms carry them.
pub fn hex32(d: &Digest) -> String {
    hex::encode(d)
}

pub fn parse_hex32(s: &str) -> Option<Digest> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Signed by the tracker (`KIND_TICKET`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// 16 random bytes, hex.
    pub session: String,
    /// The session's ed25519 public key; the client makes a fresh one per session.
    pub client_key: NodeId,
    pub content_id: ContentId,
    /// The nodes the tracker assigned, and for each how many chunks it may be paid for.
    pub nodes: Vec<NodeId>,
    pub assigned_chunks: Vec<u32>,
    /// Bytes one payment is worth (the chunk size).
    pub unit: u32,
    /// Total credit this session may create (the object's size).
    pub byte_budget: u64,
    pub expiry_ms: u64,
    pub epoch: u64,
}

/// The id a commitment names its ticket by: BLAKE3 of the signed ticket's payload, hex.
pub fn ticket_id(signed_ticket: &Signed) -> String {
    hex::encode(blake3::hash(signed_ticket.payload.as_bytes()).as_bytes())
}

/// Signed by the client's session key (`KIND_COMMITMENT`), once per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    pub session: String,
    /// BLAKE3 of the signed ticket's payload, hex.
    pub ticket_id: String,
    pub node: NodeId,
    /// `chain[0]`, hex.
    pub anchor: String,
    pub length: u32,
    pub epoch: u64,
}

/// What a client hands a node after verifying its chunks: the commitment and the latest preimage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub commitment: Signed,
    /// How many chunks this preimage pays for in total.
    pub index: u32,
    pub preimage: String,
}

impl Receipt {
    /// Identifies the (session, node) chain: BLAKE3 of the commitment's signature.
    pub fn chain_id(&self) -> String {
        hex::encode(&blake3::hash(self.commitment.signature.as_bytes()).as_bytes()[..16])
    }
}

/// `POST /v1/credits/redeem`, signed by the node (`KIND_REDEEM`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedeemBatch {
    pub timestamp_ms: u64,
    pub receipts: Vec<Receipt>,
}

/// The tracker's answer for one receipt. `final_` outcomes can be dropped by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redeemed {
    pub chain_id: String,
    pub index: u32,
    pub credited_bytes: u64,
    /// `credited`, `duplicate` (already credited: fine to drop) or `rejected`.
    pub outcome: String,
    pub reason: Option<String>,
    /// Ledger leaf holding this credit.
    pub leaf_index: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedeemResponse {
    pub results: Vec<Redeemed>,
}

/// One ledger record, the leaf data of the Merkle log (its canonical JSON bytes are hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLeaf {
    pub epoch: u64,
    pub node: NodeId,
    pub session: String,
    pub chain_index: u32,
    pub credited_bytes: u64,
}

impl LedgerLeaf {
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("leaves serialise")
    }
}

/// Signed by the tracker (`KIND_TREE_HEAD`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    pub size: u64,
    pub root: String,
    pub epoch: u64,
    pub timestamp_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_link_forward_only() {
        let chain = payment_chain([7u8; 32], 10);
        assert_eq!(chain.len(), 11);
        assert!(chain_links(&chain[0], 0, &chain[10], 10));
        assert!(chain_links(&chain[3], 3, &chain[7], 7));
        assert!(!chain_links(&chain[7], 7, &chain[3], 3));
        assert!(!chain_links(&chain[0], 0, &chain[5], 6));
        assert!(!chain_links(&chain[0], 0, &[9u8; 32], 4));
    }
}
