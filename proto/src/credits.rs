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
use crate::id::hex_id;
use crate::wire::MAX_TICKET_LEN;
use crate::{ContentId, NodeId};

pub const KIND_TICKET: &str = "ticket";
pub const KIND_COMMITMENT: &str = "commitment";
pub const KIND_REDEEM: &str = "redeem";
pub const KIND_TREE_HEAD: &str = "tree-head";

/// Longest payment chain: bounds the hashing a verifier does for one receipt.
pub const MAX_CHAIN: u32 = 1 << 20;
/// Most receipts in one redemption batch.
pub const MAX_BATCH: usize = 256;

hex_id!(
    /// A BLAKE3 digest in the credit system: a payment-chain link (anchor or preimage), or a hash of the
    /// ledger's Merkle tree (a root, a proof step).
    Digest,
    "digest",
    32
);
hex_id!(
    /// Names a credit session (one ticket): 16 random bytes the tracker picks.
    SessionId,
    "session",
    16
);
hex_id!(
    /// Names a ticket in the commitments made under it: BLAKE3 of the signed ticket's payload.
    TicketId,
    "ticket",
    32
);
hex_id!(
    /// Names one (session, node) payment chain: the first 16 bytes of BLAKE3 of its commitment's signature.
    ChainId,
    "chain",
    16
);

/// One step of a payment chain: `H(w)`, domain-separated from every other BLAKE3 use.
pub fn chain_step(w: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"fog-payword-v1");
    h.update(&w.0);
    Digest(*h.finalize().as_bytes())
}

/// A payment chain from `seed`: `chain[0]` is the anchor, `chain[i]` pays for the i-th chunk, and
/// `chain_step(chain[i]) == chain[i - 1]`.
pub fn payment_chain(seed: [u8; 32], length: u32) -> Vec<Digest> {
    let mut chain = vec![Digest(seed); length as usize + 1];
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

/// Signed by the tracker (`KIND_TICKET`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub session: SessionId,
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

/// A signed ticket as a chunk request carries it (`ChunkRequest::ticket`): its JSON, or `None` when that is
/// longer than a request may carry ([`MAX_TICKET_LEN`]).
pub fn ticket_on_wire(signed_ticket: &Signed) -> Option<Vec<u8>> {
    serde_json::to_vec(signed_ticket).ok().filter(|t| t.len() <= MAX_TICKET_LEN)
}

/// The id a commitment names its ticket by.
pub fn ticket_id(signed_ticket: &Signed) -> TicketId {
    TicketId(*blake3::hash(signed_ticket.payload.as_bytes()).as_bytes())
}

/// Signed by the client's session key (`KIND_COMMITMENT`), once per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    pub session: SessionId,
    pub ticket_id: TicketId,
    pub node: NodeId,
    /// `chain[0]`.
    pub anchor: Digest,
    pub length: u32,
    pub epoch: u64,
}

/// What a client hands a node after verifying its chunks: the commitment and the latest preimage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub commitment: Signed,
    /// How many chunks this preimage pays for in total.
    pub index: u32,
    /// `chain[index]`.
    pub preimage: Digest,
}

impl Receipt {
    pub fn chain_id(&self) -> ChainId {
        let hash = blake3::hash(self.commitment.signature.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        ChainId(id)
    }
}

/// Largest body of `POST /v1/credits/redeem` a tracker reads: a node keeps its signed batches below it
/// ([`redeem_body_bound`]), taking fewer receipts per batch when their tickets are long.
pub const MAX_REDEEM_BODY: usize = 2 << 20;

/// `POST /v1/credits/redeem`, signed by the node (`KIND_REDEEM`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedeemBatch {
    pub timestamp_ms: u64,
    pub receipts: Vec<Receipt>,
    /// The tracker-signed tickets the receipts' commitments name ([`ticket_id`]): the tracker keeps none
    /// at issue, so a receipt is redeemed with its ticket. At most one per ticket, each named by a receipt
    /// of the batch and at most [`MAX_TICKET_LEN`] long ([`check_batch`]). Older nodes send none: their
    /// receipts redeem only where the tracker stored the ticket.
    #[serde(default)]
    pub tickets: Vec<Signed>,
}

/// Why a redemption batch was refused as a whole (the node's fault, not the receipts').
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("at most {MAX_BATCH} receipts per batch, got {0}")]
    TooManyReceipts(usize),
    #[error("at most one ticket per receipt and {MAX_BATCH} per batch, got {tickets} for {receipts} receipts")]
    TooManyTickets { tickets: usize, receipts: usize },
    #[error("ticket {index} is {len} bytes long; at most {MAX_TICKET_LEN}")]
    TicketTooLong { index: usize, len: usize },
    #[error("ticket {index} is in the batch twice")]
    DuplicateTicket { index: usize },
    #[error("ticket {index} is named by no receipt of the batch")]
    UnnamedTicket { index: usize },
}

/// Checks a redemption batch's bounds before anything in it is verified: at most [`MAX_BATCH`] receipts,
/// and at most one ticket per ticket its receipts' commitments name (read unverified: the names only
/// bound the batch), each at most [`MAX_TICKET_LEN`] bytes of JSON.
pub fn check_batch(receipts: &[Receipt], tickets: &[Signed]) -> Result<(), BatchError> {
    if receipts.len() > MAX_BATCH {
        return Err(BatchError::TooManyReceipts(receipts.len()));
    }
    if tickets.len() > receipts.len() {
        return Err(BatchError::TooManyTickets { tickets: tickets.len(), receipts: receipts.len() });
    }
    let named: std::collections::HashSet<TicketId> = receipts
        .iter()
        .filter_map(|r| serde_json::from_str::<Commitment>(&r.commitment.payload).ok())
        .map(|c| c.ticket_id)
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (index, t) in tickets.iter().enumerate() {
        let len = serde_json::to_vec(t).map_or(usize::MAX, |v| v.len());
        if len > MAX_TICKET_LEN {
            return Err(BatchError::TicketTooLong { index, len });
        }
        let id = ticket_id(t);
        if !seen.insert(id) {
            return Err(BatchError::DuplicateTicket { index });
        }
        if !named.contains(&id) {
            return Err(BatchError::UnnamedTicket { index });
        }
    }
    Ok(())
}

/// At most how many bytes `json` (a receipt's or a ticket's JSON) adds to a signed redemption body: the
/// batch is a JSON string in the signed message, where escaping at most doubles it.
pub fn redeem_body_bound(json_len: usize) -> usize {
    2 * json_len + 2
}

/// What the tracker did with one receipt. Every outcome is final: the node drops the receipt either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Credited,
    /// Already credited (a retry of an acknowledged or applied redemption).
    Duplicate,
    Rejected,
}

/// The tracker's answer for one receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redeemed {
    pub chain_id: ChainId,
    pub index: u32,
    pub credited_bytes: u64,
    pub outcome: Outcome,
    /// Why a receipt was rejected, or why it was credited less than it claimed: for people, not programs.
    pub reason: Option<String>,
    /// Ledger leaf holding this credit.
    pub leaf_index: Option<u64>,
    /// The ledger shard (its own Merkle log) `leaf_index` is in: [`shard_of`] the receipt's session. Left out
    /// for shard 0, so one-shard ledgers answer as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shard: u32,
}

/// The tracker's answers, in the batch's order, for the receipts it redeemed now. A receipt without an
/// answer was not looked at (its shard's sequencer could not be reached): the node keeps it and redeems it
/// again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedeemResponse {
    pub results: Vec<Redeemed>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Most shards a ledger has: each is a log with a lease, a sequencer and a sealed head per epoch, and a
/// node keeps a verified head per shard it has records in.
pub const MAX_SHARDS: u32 = 256;

/// The ledger shard of a credit session, among `shards`: the session id's first four bytes (big-endian)
/// modulo the count. Session ids are random bytes the tracker picks, so sessions spread evenly, and a
/// session's receipts always land in the same shard (its chains' state lives there).
pub fn shard_of(session: &SessionId, shards: u32) -> u32 {
    let b = session.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % shards.max(1)
}

/// One ledger record, the leaf data of the Merkle log (its canonical JSON bytes are hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLeaf {
    pub epoch: u64,
    pub node: NodeId,
    pub session: SessionId,
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
    pub root: Digest,
    pub epoch: u64,
    pub timestamp_ms: u64,
    /// The ledger shard whose log this is the head of. Left out for shard 0: heads of one-shard ledgers,
    /// and those signed before ledgers had shards, read as shard 0 (the signature covers the payload as
    /// signed, so they verify as they did).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shard: u32,
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
        assert!(!chain_links(&chain[0], 0, &Digest([9u8; 32]), 4));
    }

    /// The typed forms must keep the JSON every deployed tracker and node speaks.
    #[test]
    fn json_forms_are_unchanged() {
        let redeemed = Redeemed {
            chain_id: ChainId([0xab; 16]),
            index: 3,
            credited_bytes: 7,
            outcome: Outcome::Duplicate,
            reason: None,
            leaf_index: None,
            shard: 0,
        };
        let json = serde_json::to_string(&redeemed).expect("json");
        assert_eq!(
            json,
            format!(
                r#"{{"chain_id":"{}","index":3,"credited_bytes":7,"outcome":"duplicate","reason":null,"leaf_index":null}}"#,
                "ab".repeat(16)
            )
        );
        assert_eq!(serde_json::from_str::<Redeemed>(&json).expect("parse"), redeemed);
        let leaf = LedgerLeaf {
            epoch: 1,
            node: NodeId([1; 32]),
            session: SessionId([2; 16]),
            chain_index: 4,
            credited_bytes: 5,
        };
        assert_eq!(
            String::from_utf8(leaf.bytes()).expect("utf-8"),
            format!(
                r#"{{"epoch":1,"node":"{}","session":"{}","chain_index":4,"credited_bytes":5}}"#,
                "01".repeat(32),
                "02".repeat(16)
            )
        );
        assert!(serde_json::from_str::<SessionId>(&format!("\"{}\"", "00".repeat(32))).is_err(), "wrong length");
        // Older nodes' batches carry no tickets.
        let batch: RedeemBatch = serde_json::from_str(r#"{"timestamp_ms":1,"receipts":[]}"#).expect("parse");
        assert!(batch.tickets.is_empty());
        // Shard 0 is left out: heads and answers of one-shard ledgers are what they were.
        let head = TreeHead { size: 2, root: Digest([3; 32]), epoch: 4, timestamp_ms: 5, shard: 0 };
        let old = format!(r#"{{"size":2,"root":"{}","epoch":4,"timestamp_ms":5}}"#, "03".repeat(32));
        assert_eq!(serde_json::to_string(&head).expect("json"), old);
        assert_eq!(serde_json::from_str::<TreeHead>(&old).expect("parse"), head);
        let sharded = TreeHead { shard: 2, ..head };
        assert!(serde_json::to_string(&sharded).expect("json").ends_with(r#","shard":2}"#));
        let answer = Redeemed { shard: 3, leaf_index: Some(9), ..redeemed };
        let json = serde_json::to_string(&answer).expect("json");
        assert!(json.ends_with(r#""leaf_index":9,"shard":3}"#), "{json}");
    }

    #[test]
    fn sessions_map_to_stable_shards() {
        let s = SessionId([0, 0, 1, 2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(shard_of(&s, 1), 0);
        assert_eq!(shard_of(&s, 0), 0, "no shards count as one");
        assert_eq!(shard_of(&s, 7), 258 % 7, "the first four bytes, big-endian");
        // Random sessions spread over the shards.
        let mut counts = [0u32; 4];
        for i in 0..4000u32 {
            let id = *blake3::hash(&i.to_le_bytes()).as_bytes();
            counts[shard_of(&SessionId(id[..16].try_into().expect("16 bytes")), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
