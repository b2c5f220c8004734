//! Credits: ticket issuance, receipt redemption and the tamper-evident ledger (`docs/credits.md`).
//!
//! Everything a redemption changes — the chain's redeemed index, the ticket's and node's totals, the new
//! ledger leaf and the Merkle subtrees it completes — is written in one synced RocksDB batch, and only
//! then acknowledged. A tracker killed at any point has either applied a receipt completely or not at all;
//! the node retries what was not acknowledged, and a retry of an applied receipt is a `duplicate`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fog_net::per_source::PerSource;
use fog_proto::api::{Membership, Signed, SignedError, KIND_MEMBERSHIP};
use fog_proto::credits::{
    chain_links, ChainId, Commitment, Digest, LedgerLeaf, Outcome, Receipt, Redeemed, SessionId, Ticket, TreeHead,
    KIND_COMMITMENT, KIND_TICKET, KIND_TREE_HEAD, MAX_CHAIN,
};
use fog_proto::merkle::{self, Hash, SubtreeSource};
use fog_proto::{ContentId, NodeId};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::db::Db;

const CF_TICKETS: &str = "credit_tickets";
const CF_CHAINS: &str = "credit_chains";
const CF_TICKET_USED: &str = "credit_ticket_used";
const CF_NODE_EPOCHS: &str = "credit_node_epochs";
const CF_LEAVES: &str = "ledger_leaves";
const CF_TREE: &str = "ledger_tree";
const CF_HEADS: &str = "ledger_heads";
const CF_REJECTED: &str = "credit_rejected";
const CF_META: &str = "ledger_meta";
pub(crate) const COLUMN_FAMILIES: [&str; 9] =
    [CF_TICKETS, CF_CHAINS, CF_TICKET_USED, CF_NODE_EPOCHS, CF_LEAVES, CF_TREE, CF_HEADS, CF_REJECTED, CF_META];

/// Records at most in one answer of [`Ledger::records`].
pub const MAX_RECORDS: usize = 64;
/// Rejections kept per node for its itemised statement.
const REJECTIONS_KEPT: u64 = 200;
/// How long a node's membership lasts; nodes register again once half of it has passed.
const MEMBERSHIP_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("ledger record {cf}/{key} is unreadable: {source}")]
    Corrupt { cf: &'static str, key: String, source: serde_json::Error },
    #[error("ledger key {cf}/{key} is malformed")]
    BadKey { cf: &'static str, key: String },
}

impl LedgerError {
    /// Whether trying again may help: storage trouble may pass, damaged records stay damaged.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Corrupt { .. } | Self::BadKey { .. })
    }
}

/// Why a receipt was refused; the text is what the node's statement shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    #[error("forged: the commitment's signature does not verify")]
    Forged,
    #[error("malformed: the commitment is signed but is not a valid commitment")]
    Malformed,
    #[error("no ticket: the tracker never issued this session")]
    NoTicket,
    #[error("wrong client: the commitment is not signed by the ticket's client key")]
    WrongClient,
    #[error("the commitment names another ticket")]
    OtherTicket,
    #[error("not yours: the receipt was given to another node")]
    NotYours,
    #[error("the ticket did not assign this node")]
    NotAssigned,
    #[error("wrong epoch: receipts are redeemable in their ticket's epoch and the next only")]
    WrongEpoch,
    #[error("the ticket expired")]
    Expired,
    #[error("payment index outside the committed chain")]
    OutsideChain,
    #[error("the receipt pays for more chunks than the whole ticket covers")]
    BeyondTicket,
    #[error("bad chain: the preimage does not hash to the committed anchor")]
    BadChain,
    #[error("nothing left: the ticket's budget or the node's assignment is used up")]
    NothingLeft,
}

/// Per (session, node) chain: how far it has been redeemed and for how much.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ChainState {
    index: u32,
    credited: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTicket {
    signed: Signed,
    ticket: Ticket,
}

/// One rejected receipt in a node's statement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejection {
    pub at_ms: u64,
    pub chain_id: ChainId,
    pub index: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLine {
    pub epoch: u64,
    pub credited_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeCredits {
    pub node_id: NodeId,
    pub credited_bytes: u64,
    pub epochs: Vec<EpochLine>,
}

/// A ledger leaf with its inclusion proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordProof {
    pub index: u64,
    pub leaf: LedgerLeaf,
    pub proof: Vec<Digest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatement {
    #[serde(flatten)]
    pub totals: NodeCredits,
    /// The node's latest ledger records, newest first, with their leaf indices.
    pub records: Vec<(u64, LedgerLeaf)>,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug)]
pub struct Ledger {
    db: Arc<Db>,
    key: SigningKey,
    epoch_len: Duration,
    ticket_ttl: Duration,
    clock: Clock,
    /// Serialises redemptions: ledger appends are sequential.
    write: Mutex<()>,
    /// Tickets per client source per minute: self-dealing through fake clients needs many sources.
    tickets: PerSource,
}

fn node_epoch_key(node: &NodeId, epoch: u64) -> Vec<u8> {
    [node.as_bytes().as_slice(), &epoch.to_be_bytes()].concat()
}

/// Tickets, their spending and their chains are keyed by the session's hex form, as they always were:
/// existing ledgers stay readable.
fn session_key(session: &SessionId) -> String {
    session.to_hex()
}

fn chain_key(session: &SessionId, node: &NodeId) -> Vec<u8> {
    [session_key(session).as_bytes(), b"/", node.as_bytes().as_slice()].concat()
}

fn tree_key(level: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&level.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Reads complete subtrees from the store, with the batch being written layered on top.
struct TreeView<'a> {
    db: &'a Db,
    pending: &'a HashMap<(u32, u64), Hash>,
}

impl SubtreeSource for TreeView<'_> {
    fn subtree(&self, level: u32, index: u64) -> Hash {
        if let Some(h) = self.pending.get(&(level, index)) {
            return *h;
        }
        let raw = self.db.raw().get_pinned_cf(self.db.cf(CF_TREE), tree_key(level, index)).ok().flatten();
        raw.and_then(|v| <[u8; 32]>::try_from(&*v).ok()).unwrap_or([0u8; 32])
    }
}

impl Ledger {
    /// `clock` dates tickets, receipts' redemption, epochs and tree heads.
    pub fn new(db: Arc<Db>, key: SigningKey, epoch_len: Duration, tickets_per_minute: u32, clock: Clock) -> Self {
        Self {
            db,
            key,
            epoch_len,
            ticket_ttl: Duration::from_secs(6 * 3600),
            clock,
            write: Mutex::new(()),
            tickets: PerSource::new(tickets_per_minute, tickets_per_minute),
        }
    }

    pub fn public_key(&self) -> NodeId {
        self.key.verifying_key().into()
    }

    /// The tracker's signed word that `node` registered (what a rendezvous asks for before attaching it).
    pub fn membership(&self, node: NodeId, now_ms: u64) -> Signed {
        let m = Membership { node_id: node, issued_ms: now_ms, expiry_ms: now_ms + MEMBERSHIP_TTL.as_millis() as u64 };
        Signed::sign(&self.key, KIND_MEMBERSHIP, &m)
    }

    pub fn epoch_at(&self, ms: u64) -> u64 {
        ms / (self.epoch_len.as_millis() as u64).max(1)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch_at(self.clock.now_ms())
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, cf: &'static str, key: &[u8]) -> Result<Option<T>, LedgerError> {
        let Some(v) = self.db.raw().get_pinned_cf(self.db.cf(cf), key)? else { return Ok(None) };
        serde_json::from_slice(&v).map(Some).map_err(|source| LedgerError::Corrupt {
            cf,
            key: hex::encode(key),
            source,
        })
    }

    fn get_u64(&self, cf: &str, key: &[u8]) -> Result<u64, LedgerError> {
        let v = self.db.raw().get_pinned_cf(self.db.cf(cf), key)?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(&*v).ok()).map_or(0, u64::from_be_bytes))
    }

    /// Leaves in the log.
    pub fn size(&self) -> Result<u64, LedgerError> {
        self.get_u64(CF_META, b"size")
    }

    /// Issues a ticket for `client_key`'s session over `nodes` (with their assigned chunk counts), or `None`
    /// when the client's address used up its tickets (its traffic then earns nobody anything). `client`:
    /// `None` for the tracker's own probes, which no share limits.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_ticket(
        &self,
        client: Option<IpAddr>,
        client_key: NodeId,
        content_id: ContentId,
        nodes: Vec<NodeId>,
        assigned_chunks: Vec<u32>,
        unit: u32,
        byte_budget: u64,
    ) -> Result<Option<Signed>, LedgerError> {
        if client.is_some_and(|ip| !self.tickets.check(ip)) {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let ticket = Ticket {
            session: SessionId(rand::random()),
            client_key,
            content_id,
            nodes,
            assigned_chunks,
            unit,
            byte_budget,
            expiry_ms: now + self.ticket_ttl.as_millis() as u64,
            epoch: self.epoch_at(now),
        };
        let signed = Signed::sign(&self.key, KIND_TICKET, &ticket);
        // Nodes fill misses through only for tickets a chunk request can carry.
        let len = serde_json::to_vec(&signed).map_or(usize::MAX, |v| v.len());
        if len > fog_proto::wire::MAX_TICKET_LEN {
            tracing::warn!(len, nodes = ticket.nodes.len(), "ticket too long for a chunk request; issuing none");
            return Ok(None);
        }
        let stored = serde_json::to_vec(&StoredTicket { signed: signed.clone(), ticket: ticket.clone() })
            .expect("tickets serialise");
        self.db.raw().put_cf(self.db.cf(CF_TICKETS), session_key(&ticket.session), stored)?;
        Ok(Some(signed))
    }

    /// Redeems a node's receipts: each is credited, a duplicate, or rejected with a reason.
    /// Blocking (signature checks, hash-chain walks, a synced write): call it off the async workers.
    pub fn redeem(&self, node: NodeId, receipts: &[Receipt]) -> Result<Vec<Redeemed>, LedgerError> {
        let now = self.clock.now_ms();
        let epoch = self.epoch_at(now);
        // Signatures and chain walks need no ledger state: done before taking the lock, so a batch of
        // expensive receipts delays only its own redemption.
        let verified = receipts.iter().map(|r| self.verify(node, r, now)).collect::<Result<Vec<_>, _>>()?;
        let _guard = self.write.lock().expect("ledger write lock");
        let mut size = self.size()?;
        let mut batch = WriteBatch::default();
        let mut pending_tree: HashMap<(u32, u64), Hash> = HashMap::new();
        // State touched earlier in this batch must be seen by later receipts in it.
        let mut chains: HashMap<Vec<u8>, ChainState> = HashMap::new();
        let mut used: HashMap<SessionId, u64> = HashMap::new();
        let mut node_epoch: u64 = self.get_u64(CF_NODE_EPOCHS, &node_epoch_key(&node, epoch))?;
        let node_epoch_before = node_epoch;
        let mut rejected_seq = self.get_u64(CF_META, &[b"rejseq/".as_slice(), node.as_bytes()].concat())?;
        let mut results = Vec::with_capacity(receipts.len());
        for (r, verified) in receipts.iter().zip(verified) {
            let chain_id = r.chain_id();
            let outcome = match verified {
                Ok(v) => self.apply(v, &mut chains, &mut used)?,
                Err(reason) => Check::Reject(reason),
            };
            let result = match outcome {
                Check::Reject(refusal) => {
                    let reason = refusal.to_string();
                    let rej = Rejection { at_ms: now, chain_id, index: r.index, reason: reason.clone() };
                    let key = [node.as_bytes().as_slice(), &rejected_seq.to_be_bytes()].concat();
                    batch.put_cf(self.db.cf(CF_REJECTED), key, serde_json::to_vec(&rej).expect("serialises"));
                    if rejected_seq >= REJECTIONS_KEPT {
                        let old =
                            [node.as_bytes().as_slice(), &(rejected_seq - REJECTIONS_KEPT).to_be_bytes()].concat();
                        batch.delete_cf(self.db.cf(CF_REJECTED), old);
                    }
                    rejected_seq += 1;
                    Redeemed {
                        chain_id,
                        index: r.index,
                        credited_bytes: 0,
                        outcome: Outcome::Rejected,
                        reason: Some(reason),
                        leaf_index: None,
                    }
                }
                Check::Duplicate => Redeemed {
                    chain_id,
                    index: r.index,
                    credited_bytes: 0,
                    outcome: Outcome::Duplicate,
                    reason: None,
                    leaf_index: None,
                },
                Check::Credit { session, bytes, capped } => {
                    let leaf = LedgerLeaf { epoch, node, session, chain_index: r.index, credited_bytes: bytes };
                    let leaf_index = size;
                    self.append(&mut batch, &mut pending_tree, leaf_index, &leaf.bytes());
                    size += 1;
                    node_epoch += bytes;
                    Redeemed {
                        chain_id,
                        index: r.index,
                        credited_bytes: bytes,
                        outcome: Outcome::Credited,
                        reason: capped.then(|| "capped at the ticket's budget or the node's assignment".into()),
                        leaf_index: Some(leaf_index),
                    }
                }
            };
            results.push(result);
        }
        for (key, state) in chains {
            batch.put_cf(self.db.cf(CF_CHAINS), key, serde_json::to_vec(&state).expect("serialises"));
        }
        for (session, total) in used {
            batch.put_cf(self.db.cf(CF_TICKET_USED), session_key(&session), total.to_be_bytes());
        }
        // A batch that credited nothing leaves no zero line in the node's statement.
        if node_epoch != node_epoch_before {
            batch.put_cf(self.db.cf(CF_NODE_EPOCHS), node_epoch_key(&node, epoch), node_epoch.to_be_bytes());
        }
        batch.put_cf(
            self.db.cf(CF_META),
            [b"rejseq/".as_slice(), node.as_bytes()].concat(),
            rejected_seq.to_be_bytes(),
        );
        batch.put_cf(self.db.cf(CF_META), b"size", size.to_be_bytes());
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.raw().write_opt(batch, &opts)?;
        Ok(results)
    }

    /// What can be checked of a receipt without ledger state: the client's signature, the ticket it names,
    /// the node's assignment, and the hash chain. The walk is bounded by the chunks the ticket covers,
    /// which is checked first. `now`: when the redemption is made.
    fn verify(&self, node: NodeId, r: &Receipt, now: u64) -> Result<Result<Verified, Refusal>, LedgerError> {
        let reject = |why| Ok(Err(why));
        let c = match r.commitment.open::<Commitment>(KIND_COMMITMENT) {
            Ok(c) => c,
            Err(SignedError::Payload { .. }) => return reject(Refusal::Malformed),
            Err(SignedError::BadKey | SignedError::BadSignature) => return reject(Refusal::Forged),
        };
        let Some(stored) = self.get::<StoredTicket>(CF_TICKETS, session_key(&c.session).as_bytes())? else {
            return reject(Refusal::NoTicket);
        };
        let t = &stored.ticket;
        if r.commitment.node_id != t.client_key {
            return reject(Refusal::WrongClient);
        }
        if c.ticket_id != fog_proto::credits::ticket_id(&stored.signed) {
            return reject(Refusal::OtherTicket);
        }
        if c.node != node {
            return reject(Refusal::NotYours);
        }
        let Some(slot) = t.nodes.iter().position(|n| *n == node) else {
            return reject(Refusal::NotAssigned);
        };
        if c.epoch != t.epoch || self.epoch_at(now) > t.epoch + 1 {
            return reject(Refusal::WrongEpoch);
        }
        if now > t.expiry_ms + self.epoch_len.as_millis() as u64 {
            return reject(Refusal::Expired);
        }
        let assigned = t.assigned_chunks.get(slot).copied().unwrap_or(0);
        if r.index == 0 || r.index > c.length || c.length > MAX_CHAIN {
            return reject(Refusal::OutsideChain);
        }
        // Claims beyond the assignment are capped below; claims beyond the whole ticket are not walked.
        if u64::from(r.index) > t.byte_budget.div_ceil(u64::from(t.unit.max(1))) {
            return reject(Refusal::BeyondTicket);
        }
        if !chain_links(&c.anchor, 0, &r.preimage, r.index) {
            return reject(Refusal::BadChain);
        }
        Ok(Ok(Verified {
            key: chain_key(&c.session, &node),
            session: c.session,
            index: r.index,
            unit: u64::from(t.unit),
            node_cap: u64::from(assigned) * u64::from(t.unit),
            byte_budget: t.byte_budget,
        }))
    }

    /// Credits a verified receipt against the chain's and the ticket's state (under the write lock).
    fn apply(
        &self,
        v: Verified,
        chains: &mut HashMap<Vec<u8>, ChainState>,
        used: &mut HashMap<SessionId, u64>,
    ) -> Result<Check, LedgerError> {
        let state = match chains.get(&v.key) {
            Some(s) => *s,
            None => self.get::<ChainState>(CF_CHAINS, &v.key)?.unwrap_or_default(),
        };
        if v.index <= state.index {
            return Ok(Check::Duplicate);
        }
        let spent = match used.get(&v.session) {
            Some(u) => *u,
            None => self.get_u64(CF_TICKET_USED, session_key(&v.session).as_bytes())?,
        };
        let claimed = u64::from(v.index - state.index) * v.unit;
        let bytes = claimed.min(v.node_cap.saturating_sub(state.credited)).min(v.byte_budget.saturating_sub(spent));
        chains.insert(v.key, ChainState { index: v.index, credited: state.credited + bytes });
        used.insert(v.session, spent + bytes);
        if bytes == 0 {
            return Ok(Check::Reject(Refusal::NothingLeft));
        }
        Ok(Check::Credit { session: v.session, bytes, capped: bytes < claimed })
    }

    /// Adds leaf `index` and the complete subtrees it closes to `batch`.
    fn append(&self, batch: &mut WriteBatch, pending: &mut HashMap<(u32, u64), Hash>, index: u64, leaf: &[u8]) {
        batch.put_cf(self.db.cf(CF_LEAVES), index.to_be_bytes(), leaf);
        let mut hash = merkle::leaf_hash(leaf);
        let (mut level, mut i) = (0u32, index);
        loop {
            pending.insert((level, i), hash);
            batch.put_cf(self.db.cf(CF_TREE), tree_key(level, i), hash);
            if i % 2 == 0 {
                break;
            }
            let left = TreeView { db: &self.db, pending }.subtree(level, i - 1);
            hash = merkle::node_hash(&left, &hash);
            level += 1;
            i /= 2;
        }
    }

    fn view(&self) -> TreeView<'_> {
        static EMPTY: std::sync::OnceLock<HashMap<(u32, u64), Hash>> = std::sync::OnceLock::new();
        TreeView { db: &self.db, pending: EMPTY.get_or_init(HashMap::new) }
    }

    /// The signed head of the log as it is now.
    pub fn head(&self) -> Result<Signed, LedgerError> {
        self.head_at(self.clock.now_ms())
    }

    fn head_at(&self, now_ms: u64) -> Result<Signed, LedgerError> {
        let size = self.size()?;
        let head = TreeHead {
            size,
            root: Digest(merkle::root(&self.view(), size)),
            epoch: self.epoch_at(now_ms),
            timestamp_ms: now_ms,
        };
        Ok(Signed::sign(&self.key, KIND_TREE_HEAD, &head))
    }

    /// The head signed when `epoch` ended, if it has.
    pub fn epoch_head(&self, epoch: u64) -> Result<Option<Signed>, LedgerError> {
        self.get(CF_HEADS, &epoch.to_be_bytes())
    }

    /// Forgets tickets that can no longer be redeemed (expired, and past the grace epoch), with their
    /// chains' redemption state: receipts for them are refused by the epoch check before that state is
    /// consulted. Keeps the ticket store bounded by the ticket lifetime. Returns how many were dropped.
    fn prune_expired(&self, now_ms: u64) -> Result<usize, LedgerError> {
        let _guard = self.write.lock().expect("ledger write lock");
        let horizon = now_ms.saturating_sub(self.epoch_len.as_millis() as u64 * 2);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for item in self.db.raw().iterator_cf(self.db.cf(CF_TICKETS), rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            let Ok(stored) = serde_json::from_slice::<StoredTicket>(&v) else { continue };
            if stored.ticket.expiry_ms >= horizon || self.epoch_at(now_ms) <= stored.ticket.epoch + 1 {
                continue;
            }
            batch.delete_cf(self.db.cf(CF_TICKETS), &k);
            batch.delete_cf(self.db.cf(CF_TICKET_USED), &k);
            for node in &stored.ticket.nodes {
                batch.delete_cf(self.db.cf(CF_CHAINS), chain_key(&stored.ticket.session, node));
            }
            dropped += 1;
        }
        self.db.raw().write(batch)?;
        Ok(dropped)
    }

    /// Signs and keeps the head for every finished epoch not sealed yet, and prunes dead tickets
    /// (called periodically).
    pub fn seal_epochs(&self) -> Result<(), LedgerError> {
        let now = self.clock.now_ms();
        let current = self.epoch_at(now);
        let last = self.get_u64(CF_META, b"sealed")?;
        if current == 0 || last >= current {
            return Ok(());
        }
        let dropped = self.prune_expired(now)?;
        if dropped > 0 {
            tracing::info!(dropped, "forgot expired credit tickets");
        }
        let head = self.head_at(now)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.db.cf(CF_HEADS), (current - 1).to_be_bytes(), serde_json::to_vec(&head).expect("serialises"));
        batch.put_cf(self.db.cf(CF_META), b"sealed", current.to_be_bytes());
        self.db.raw().write(batch)?;
        Ok(())
    }

    pub fn leaf(&self, index: u64) -> Result<Option<LedgerLeaf>, LedgerError> {
        self.get(CF_LEAVES, &index.to_be_bytes())
    }

    pub fn inclusion(&self, index: u64, size: u64) -> Result<Vec<Digest>, LedgerError> {
        let size = size.min(self.size()?);
        Ok(merkle::inclusion_proof(&self.view(), index, size).into_iter().map(Digest).collect())
    }

    /// Leaves `indices` (at most [`MAX_RECORDS`]) with their inclusion proofs in the tree of `size` leaves,
    /// so a node checks a round of its records in one request; indices beyond the tree are left out.
    pub fn records(&self, indices: &[u64], size: u64) -> Result<Vec<RecordProof>, LedgerError> {
        let size = size.min(self.size()?);
        let mut out = Vec::new();
        for &index in indices.iter().take(MAX_RECORDS).filter(|&&i| i < size) {
            if let Some(leaf) = self.leaf(index)? {
                let proof = merkle::inclusion_proof(&self.view(), index, size).into_iter().map(Digest).collect();
                out.push(RecordProof { index, leaf, proof });
            }
        }
        Ok(out)
    }

    pub fn consistency(&self, first: u64, second: u64) -> Result<Vec<Digest>, LedgerError> {
        let second = second.min(self.size()?);
        Ok(merkle::consistency_proof(&self.view(), first.min(second), second).into_iter().map(Digest).collect())
    }

    /// Bytes credited to `node` over all epochs.
    pub fn credited(&self, node: &NodeId) -> Result<u64, LedgerError> {
        Ok(self.node_totals(node)?.credited_bytes)
    }

    fn node_totals(&self, node: &NodeId) -> Result<NodeCredits, LedgerError> {
        let mut epochs = Vec::new();
        let prefix = node.as_bytes().to_vec();
        let iter = self.db.raw().prefix_iterator_cf(self.db.cf(CF_NODE_EPOCHS), &prefix);
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let epoch = k.get(32..40).and_then(|e| <[u8; 8]>::try_from(e).ok()).map(u64::from_be_bytes);
            let epoch = epoch.ok_or_else(|| LedgerError::BadKey { cf: CF_NODE_EPOCHS, key: hex::encode(&k) })?;
            let bytes = <[u8; 8]>::try_from(&*v).map_or(0, u64::from_be_bytes);
            epochs.push(EpochLine { epoch, credited_bytes: bytes });
        }
        Ok(NodeCredits { node_id: *node, credited_bytes: epochs.iter().map(|e| e.credited_bytes).sum(), epochs })
    }

    /// Every node's credit, per epoch (`GET /v1/credits`).
    pub fn all_credits(&self) -> Result<Vec<NodeCredits>, LedgerError> {
        let mut nodes: Vec<NodeId> = Vec::new();
        for item in self.db.raw().iterator_cf(self.db.cf(CF_NODE_EPOCHS), rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(id) = <[u8; 32]>::try_from(&k[..32]) {
                if nodes.last() != Some(&NodeId(id)) {
                    nodes.push(NodeId(id));
                }
            }
        }
        nodes.iter().map(|n| self.node_totals(n)).collect()
    }

    /// A node's itemised statement: totals, latest records, rejected receipts with reasons.
    pub fn statement(&self, node: &NodeId, max_records: usize) -> Result<NodeStatement, LedgerError> {
        let totals = self.node_totals(node)?;
        let mut records = Vec::new();
        let size = self.size()?;
        // Newest first; the scan is bounded by `max_records` of this node's and 10 000 leaves overall.
        for index in (size.saturating_sub(10_000)..size).rev() {
            if records.len() >= max_records {
                break;
            }
            if let Some(leaf) = self.leaf(index)? {
                if leaf.node == *node {
                    records.push((index, leaf));
                }
            }
        }
        let mut rejected = Vec::new();
        let prefix = node.as_bytes().to_vec();
        for item in self.db.raw().prefix_iterator_cf(self.db.cf(CF_REJECTED), &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Ok(r) = serde_json::from_slice::<Rejection>(&v) {
                rejected.push(r);
            }
        }
        rejected.reverse();
        Ok(NodeStatement { totals, records, rejected })
    }
}

/// A receipt whose signature, ticket, assignment and chain checked out.
#[derive(Debug)]
struct Verified {
    key: Vec<u8>,
    session: SessionId,
    index: u32,
    unit: u64,
    node_cap: u64,
    byte_budget: u64,
}

enum Check {
    Credit { session: SessionId, bytes: u64, capped: bool },
    Duplicate,
    Reject(Refusal),
}

#[cfg(test)]
mod tests {
    use fog_proto::credits::{payment_chain, ticket_id};

    use super::*;

    /// An epoch boundary (of both lengths the tests use) well after zero: epoch 0 is never sealed.
    const START_MS: u64 = 1000 * 24 * 3600 * 1000;
    const MINUTE: Duration = Duration::from_secs(60);

    struct Fixture {
        ledger: Ledger,
        clock: Clock,
        client: SigningKey,
        node: NodeId,
        _dir: tempfile::TempDir,
    }

    fn fixture(epoch_len: Duration) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(dir.path()).expect("db"));
        let clock = Clock::manual(START_MS);
        let ledger = Ledger::new(db, SigningKey::from_bytes(&[1; 32]), epoch_len, 100, clock.clone());
        let node = SigningKey::from_bytes(&[3; 32]).verifying_key().into();
        Fixture { ledger, clock, client: SigningKey::from_bytes(&[2; 32]), node, _dir: dir }
    }

    impl Fixture {
        /// A ticket paying `self.node` for up to 4 one-byte chunks.
        fn issue(&self) -> (Signed, Ticket) {
            let client = self.client.verifying_key().into();
            let signed = self
                .ledger
                .issue_ticket(Some([127, 0, 0, 1].into()), client, ContentId([0; 32]), vec![self.node], vec![4], 1, 4)
                .expect("issue")
                .expect("a ticket");
            let ticket = signed.open(KIND_TICKET).expect("ticket");
            (signed, ticket)
        }

        fn receipt(&self, (signed, ticket): &(Signed, Ticket), index: u32) -> Receipt {
            let chain = payment_chain([9; 32], 4);
            let c = Commitment {
                session: ticket.session,
                ticket_id: ticket_id(signed),
                node: self.node,
                anchor: chain[0],
                length: 4,
                epoch: ticket.epoch,
            };
            Receipt {
                commitment: Signed::sign(&self.client, KIND_COMMITMENT, &c),
                index,
                preimage: chain[index as usize],
            }
        }

        fn redeem(&self, receipt: Receipt) -> Redeemed {
            self.ledger.redeem(self.node, &[receipt]).expect("redeem").remove(0)
        }
    }

    fn refused(r: &Redeemed, why: Refusal) {
        assert_eq!((r.outcome, r.reason.as_deref()), (Outcome::Rejected, Some(why.to_string().as_str())), "{r:?}");
    }

    #[test]
    fn receipts_are_redeemable_in_their_tickets_epoch_and_the_next_only() {
        let f = fixture(MINUTE);
        let ticket = f.issue();
        f.clock.advance(MINUTE);
        let r = f.redeem(f.receipt(&ticket, 1));
        assert_eq!((r.outcome, r.credited_bytes), (Outcome::Credited, 1), "{r:?}");
        assert_eq!(f.redeem(f.receipt(&ticket, 1)).outcome, Outcome::Duplicate);
        f.clock.advance(MINUTE);
        refused(&f.redeem(f.receipt(&ticket, 2)), Refusal::WrongEpoch);
        let statement = f.ledger.statement(&f.node, 10).expect("statement");
        assert_eq!(statement.rejected.len(), 1);
        assert_eq!(statement.rejected[0].at_ms, f.clock.now_ms());
    }

    #[test]
    fn tickets_expire_after_their_lifetime_and_one_epoch_of_grace() {
        let day = Duration::from_secs(24 * 3600);
        let f = fixture(day);
        let ticket = f.issue();
        f.clock.advance(f.ledger.ticket_ttl + day);
        assert_eq!(f.redeem(f.receipt(&ticket, 1)).outcome, Outcome::Credited, "expired at the last moment of grace");
        f.clock.advance(Duration::from_millis(1));
        refused(&f.redeem(f.receipt(&ticket, 2)), Refusal::Expired);
    }

    #[test]
    fn each_finished_epoch_is_sealed_by_a_signed_head() {
        let f = fixture(MINUTE);
        let epoch = f.ledger.epoch();
        f.ledger.seal_epochs().expect("seal");
        let ticket = f.issue();
        assert_eq!(f.redeem(f.receipt(&ticket, 2)).outcome, Outcome::Credited);
        f.ledger.seal_epochs().expect("seal");
        assert!(f.ledger.epoch_head(epoch).expect("read").is_none(), "sealed before the epoch ended");
        f.clock.advance(MINUTE);
        f.ledger.seal_epochs().expect("seal");
        let head = f.ledger.epoch_head(epoch).expect("read").expect("the finished epoch is sealed");
        let head: TreeHead = head.open(KIND_TREE_HEAD).expect("signed by the tracker");
        assert_eq!((head.size, head.timestamp_ms), (1, f.clock.now_ms()));
        let leaf = f.ledger.leaf(0).expect("read").expect("leaf");
        assert!(merkle::verify_inclusion(&leaf.bytes(), 0, 1, &[], &head.root.0));
    }

    #[test]
    fn expired_tickets_are_pruned_and_live_ones_kept() {
        let f = fixture(MINUTE);
        let (a, b) = (f.issue(), f.issue());
        assert_eq!(f.ledger.prune_expired(f.clock.now_ms()).expect("prune"), 0, "live tickets were dropped");
        f.clock.advance(f.ledger.ticket_ttl + 3 * MINUTE);
        assert_eq!(f.ledger.prune_expired(f.clock.now_ms()).expect("prune"), 2);
        for (_, t) in [a, b] {
            let key = session_key(&t.session);
            assert!(f.ledger.get::<StoredTicket>(CF_TICKETS, key.as_bytes()).expect("get").is_none());
        }
    }
}
