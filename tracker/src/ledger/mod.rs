//! Credits: ticket issuance, receipt redemption and the tamper-evident ledger (`docs/credits.md`).
//!
//! This module is the ledger's logic — what a receipt must prove, why it is refused, what it credits, the
//! Merkle log's appends, proofs and signed heads — written once over a [`LedgerStore`]. Two stores keep the
//! state: [`RocksStore`] in the tracker's RocksDB (the default, its on-disk format unchanged) and
//! [`PgStore`] in PostgreSQL for a cell of replicas, where one replica at a time sequences the appends under
//! a lease fenced by a token (`pg.rs`).
//!
//! The ledger is one or more **shards** ([`shard_of`] a receipt's session): each is a Merkle log of its own
//! in its own store, with its own leaves, heads, sealed epochs and sequencer, so the shards of a cell are
//! appended by different replicas at once. A redemption batch is split by shard; each shard's part is one
//! append. The embedded store is one shard.
//!
//! Everything a redemption changes — the chain's redeemed index, the ticket's and node's totals, the new
//! ledger leaves and the Merkle subtrees they complete — is one [`Append`], which a store applies atomically
//! and durably (a synced RocksDB batch; a PostgreSQL transaction with synchronous commit), and only then is
//! it acknowledged. A tracker killed at any point has either applied a receipt completely or not at all;
//! the node retries what was not acknowledged, and a retry of an applied receipt is a `duplicate`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fog_net::per_source::PerSource;
use fog_proto::api::{Membership, Signed, SignedError, KIND_MEMBERSHIP};
use fog_proto::credits::{
    chain_links, check_batch, shard_of, ticket_id, BatchError, ChainId, Commitment, Digest, LedgerLeaf, Outcome,
    Receipt, Redeemed, SessionId, Ticket, TicketId, TreeHead, KIND_COMMITMENT, KIND_TICKET, KIND_TREE_HEAD, MAX_CHAIN,
};
use fog_proto::merkle::{self, Hash, SubtreeSource};
use fog_proto::{ContentId, NodeId};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::db::Db;

mod forward;
mod pg;
mod rocks;
#[cfg(test)]
mod tests;

pub use fog_proto::credits::MAX_SHARDS;
pub use forward::{forward, Forward, ForwardError, FORWARD_PATH, FORWARD_TIMEOUT, KIND_FORWARD};
pub use pg::{export_to_postgres, ExportStats, PgStore, LEASE};
pub use rocks::RocksStore;
pub(crate) use rocks::COLUMN_FAMILIES;

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
    #[error("ledger database: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("ledger database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("ledger database: {0}")]
    Store(#[from] crate::store::pg::PgError),
    #[error("ledger database: {what} took longer than {0:?}", LEDGER_QUERY_TIMEOUT)]
    Timeout { what: &'static str },
    #[error("ledger database client stopped")]
    Stopped,
    #[error("cannot set up the ledger database client: {0}")]
    Setup(String),
    #[error("ledger record {cf}/{key} is unreadable: {source}")]
    Corrupt { cf: &'static str, key: String, source: serde_json::Error },
    #[error("ledger key {cf}/{key} is malformed")]
    BadKey { cf: &'static str, key: String },
    #[error("ledger subtree {level}/{index} is missing: the log is damaged")]
    MissingSubtree { level: u32, index: u64 },
    /// This replica lost the sequencer's lease to another (a newer token): the append was not written.
    #[error("another replica took over the ledger (this one held token {token}); nothing was written")]
    Fenced { token: u64 },
    /// Another replica holds the sequencer's lease: the node keeps its receipts and redeems again.
    #[error("the replica at {holder_url} sequences the ledger now; redeem again shortly")]
    NotSequencer { holder_url: String },
    /// The database's ledger was made with another shard count: sessions would move between logs.
    #[error(
        "the ledger in this database has {database} shard(s), not {configured}: changing the count would move \
         sessions between logs; start every replica with --ledger-shards {database}"
    )]
    ShardCount { database: u32, configured: u32 },
    #[error("no ledger shard {0}")]
    NoShard(u32),
    #[error("cannot export the ledger into a database that already holds one ({size} records)")]
    NotEmpty { size: u64 },
    #[error("the exported ledger differs from the original: {0}")]
    ExportMismatch(String),
    /// The redemption batch is out of bounds as a whole: nothing in it was looked at.
    #[error("redemption batch refused: {0}")]
    Batch(#[from] BatchError),
}

/// How long one ledger database operation may take before it counts as failed (retryable).
pub const LEDGER_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

impl LedgerError {
    /// Whether trying again may help: storage trouble and lost leases pass, damaged records stay damaged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Corrupt { .. }
            | Self::BadKey { .. }
            | Self::MissingSubtree { .. }
            | Self::NotEmpty { .. }
            | Self::Setup(_)
            | Self::ExportMismatch(_)
            | Self::ShardCount { .. }
            | Self::NoShard(_)
            | Self::Batch(_) => false,
            _ => true,
        }
    }
}

/// Why a receipt was refused; the text is what the node's statement shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    #[error("forged: the commitment's signature does not verify")]
    Forged,
    #[error("malformed: the commitment is signed but is not a valid commitment")]
    Malformed,
    #[error("no ticket: the batch carries none for this commitment and the tracker stored none")]
    NoTicket,
    #[error("forged ticket: the batch's ticket for this commitment is not signed by this tracker")]
    ForgedTicket,
    #[error("the commitment's session is not its ticket's")]
    WrongSession,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    pub index: u32,
    pub credited: u64,
}

/// A ticket as trackers before stateless tickets stored it at issue. Rows written then are still read, so
/// that receipts under them redeem until they expire; no ticket is stored any more.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTicket {
    pub signed: Signed,
    pub ticket: Ticket,
}

/// What a ticket's receipts have been credited so far, with the ticket's own expiry and epoch: its usage
/// is forgotten by them, with no ticket stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketUse {
    pub used: u64,
    pub expiry_ms: u64,
    pub epoch: u64,
}

/// Whether a ticket that expires at `expiry_ms`, issued in `epoch`, can no longer be redeemed (expired
/// before `horizon_ms`, and past its grace epoch), so its state may be forgotten. `PgStore` says the same
/// in SQL.
fn prunable(expiry_ms: u64, epoch: u64, horizon_ms: u64, current_epoch: u64) -> bool {
    expiry_ms < horizon_ms && current_epoch > epoch + 1
}

/// One rejected receipt in a node's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub at_ms: u64,
    pub chain_id: ChainId,
    pub index: u32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLine {
    pub epoch: u64,
    pub credited_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The node's latest ledger records, newest first, with their leaf indices (in their shard's log).
    pub records: Vec<(u64, LedgerLeaf)>,
    /// The shard of each record, in the same order; left out for a one-shard ledger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<u32>,
    pub rejected: Vec<Rejection>,
}

/// Everything one redemption batch changes, applied by [`LedgerStore::commit`] all at once or not at all.
#[derive(Debug, Clone)]
pub struct Append {
    /// The sequencer's fencing token ([`LedgerStore::sequence`]) when the batch's state was read.
    pub token: u64,
    /// Leaves in the log when the batch's state was read: the first new leaf's index.
    pub base_size: u64,
    /// New leaves (index, the leaf's canonical bytes), contiguous from `base_size`.
    pub leaves: Vec<(u64, Vec<u8>)>,
    /// Complete subtrees the new leaves close: (level, index, hash).
    pub subtrees: Vec<(u32, u64, Hash)>,
    pub chains: Vec<(SessionId, NodeId, ChainState)>,
    /// Bytes credited so far per ticket (its session), with what forgets it.
    pub used: Vec<(SessionId, TicketUse)>,
    /// The redeeming node.
    pub node: NodeId,
    /// The node's new total in an epoch, when it changed.
    pub node_epoch: Option<(u64, u64)>,
    /// New rejections with their sequence numbers, and older ones to forget.
    pub rejections: Vec<(u64, Rejection)>,
    pub forget_rejections: Vec<u64>,
    /// The node's next rejection sequence number.
    pub rejected_seq: u64,
}

impl Append {
    /// Nothing yet, for `node`, read under `token` from a log of `base_size` leaves.
    pub fn new(node: NodeId, token: u64, base_size: u64) -> Self {
        Self {
            token,
            base_size,
            leaves: Vec::new(),
            subtrees: Vec::new(),
            chains: Vec::new(),
            used: Vec::new(),
            node,
            node_epoch: None,
            rejections: Vec::new(),
            forget_rejections: Vec::new(),
            rejected_seq: 0,
        }
    }

    /// The log's size once this is applied.
    pub fn new_size(&self) -> u64 {
        self.base_size + self.leaves.len() as u64
    }
}

/// Where the ledger's state lives. Reads see committed state only; every change goes through
/// [`commit`](Self::commit) (a redemption), [`seal`](Self::seal) or [`prune_tickets`](Self::prune_tickets):
/// issuing a ticket writes nothing. Blocking: called off the async workers (or briefly on them for reads, as
/// RocksDB reads always were).
pub trait LedgerStore: Send + Sync + std::fmt::Debug {
    /// Called every second or so: whether this process should sequence this shard (a store shared by
    /// replicas divides its shards among the live ones, and gives up the lease of one it no longer
    /// should); a store of its own always should.
    fn tend(&self) -> Result<bool, LedgerError> {
        Ok(true)
    }
    /// Makes this process the log's sequencer if it may be, and returns its fencing token: a store shared by
    /// replicas fails with [`LedgerError::NotSequencer`] while another holds the lease.
    fn sequence(&self) -> Result<u64, LedgerError>;
    /// Applies `append` atomically and durably, or nothing: fails with [`LedgerError::Fenced`] when
    /// `append.token` is no longer the sequencer's token or the log no longer has `append.base_size` leaves.
    fn commit(&self, append: &Append) -> Result<(), LedgerError>;
    /// Keeps `head` as the one that sealed `epoch`, and marks epochs before `epoch + 1` sealed (fenced
    /// like `commit`).
    fn seal(&self, token: u64, epoch: u64, head: &Signed) -> Result<(), LedgerError>;
    /// Stores a ticket as trackers before stateless tickets did: what the tests' older rows are made with.
    #[cfg(test)]
    fn put_ticket(&self, ticket: &StoredTicket) -> Result<(), LedgerError>;
    /// Forgets the redemption state (spending, chains) of tickets that are [`prunable`] by the expiry kept
    /// with their spending, and stored tickets that are, with theirs; returns how many tickets.
    fn prune_tickets(&self, horizon_ms: u64, current_epoch: u64) -> Result<usize, LedgerError>;

    fn size(&self) -> Result<u64, LedgerError>;
    /// The first epoch not sealed yet.
    fn sealed(&self) -> Result<u64, LedgerError>;
    fn subtree(&self, level: u32, index: u64) -> Result<Option<Hash>, LedgerError>;
    fn leaf(&self, index: u64) -> Result<Option<LedgerLeaf>, LedgerError>;
    /// The node's leaves among indices `from..to`, newest first, at most `max`.
    fn node_records(
        &self,
        node: &NodeId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<(u64, LedgerLeaf)>, LedgerError>;
    fn epoch_head(&self, epoch: u64) -> Result<Option<Signed>, LedgerError>;
    /// A ticket an older tracker stored at issue.
    fn ticket(&self, session: &SessionId) -> Result<Option<StoredTicket>, LedgerError>;
    fn chain(&self, session: &SessionId, node: &NodeId) -> Result<Option<ChainState>, LedgerError>;
    fn ticket_used(&self, session: &SessionId) -> Result<u64, LedgerError>;
    fn node_epoch(&self, node: &NodeId, epoch: u64) -> Result<u64, LedgerError>;
    /// The node's credit per epoch, oldest first, summed over every shard of the store's database.
    fn node_epochs(&self, node: &NodeId) -> Result<Vec<EpochLine>, LedgerError>;
    /// Nodes with credit in any shard of the store's database, in id order.
    fn credited_nodes(&self) -> Result<Vec<NodeId>, LedgerError>;
    fn rejected_seq(&self, node: &NodeId) -> Result<u64, LedgerError>;
    /// The node's kept rejections in every shard of the store's database, oldest first per shard.
    fn rejections(&self, node: &NodeId) -> Result<Vec<Rejection>, LedgerError>;
}

/// One shard: its store, and the lock that makes this process's appends to it sequential.
#[derive(Debug)]
struct Shard {
    store: Arc<dyn LedgerStore>,
    /// Serialises this process's redemptions and seals in the shard: its appends are sequential.
    write: Mutex<()>,
}

#[derive(Debug)]
pub struct Ledger {
    shards: Vec<Shard>,
    key: SigningKey,
    epoch_len: Duration,
    ticket_ttl: Duration,
    clock: Clock,
    /// Tickets per client source per minute: self-dealing through fake clients needs many sources.
    tickets: PerSource,
}

/// What [`Ledger::redeem_shards`] did with a batch: an answer per receipt redeemed, and the shards whose
/// receipts it could not redeem here, with why (another replica sequences it, or the database failed).
#[derive(Debug, Default)]
pub struct Redemption {
    /// In the batch's order; `None` for the receipts of the shards in `failed` (and of shards not asked for).
    pub results: Vec<Option<Redeemed>>,
    pub failed: Vec<(u32, LedgerError)>,
}

impl Redemption {
    /// The answers, in the batch's order, leaving out receipts not redeemed.
    pub fn answered(self) -> Vec<Redeemed> {
        self.results.into_iter().flatten().collect()
    }
}

/// Complete subtrees of the committed log, with the batch being built layered on top; the first read error
/// is kept and returned once the proof is built (a proof from a half-read tree must not be served).
struct TreeView<'a> {
    store: &'a dyn LedgerStore,
    pending: Option<&'a HashMap<(u32, u64), Hash>>,
    error: RefCell<Option<LedgerError>>,
}

impl<'a> TreeView<'a> {
    fn new(store: &'a dyn LedgerStore, pending: Option<&'a HashMap<(u32, u64), Hash>>) -> Self {
        Self { store, pending, error: RefCell::new(None) }
    }

    fn finish<T>(self, value: T) -> Result<T, LedgerError> {
        self.error.into_inner().map_or(Ok(value), Err)
    }
}

impl SubtreeSource for TreeView<'_> {
    fn subtree(&self, level: u32, index: u64) -> Hash {
        if let Some(h) = self.pending.and_then(|p| p.get(&(level, index))) {
            return *h;
        }
        match self.store.subtree(level, index) {
            Ok(Some(h)) => h,
            Ok(None) => {
                self.error.borrow_mut().get_or_insert(LedgerError::MissingSubtree { level, index });
                [0; 32]
            }
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                [0; 32]
            }
        }
    }
}

impl Ledger {
    /// A ledger in the tracker's RocksDB. `clock` dates tickets, receipts' redemption, epochs and tree heads.
    pub fn new(db: Arc<Db>, key: SigningKey, epoch_len: Duration, tickets_per_minute: u32, clock: Clock) -> Self {
        Self::with_store(Arc::new(RocksStore::new(db)), key, epoch_len, tickets_per_minute, clock)
    }

    /// A ledger of one shard kept in `store`.
    pub fn with_store(
        store: Arc<dyn LedgerStore>,
        key: SigningKey,
        epoch_len: Duration,
        tickets_per_minute: u32,
        clock: Clock,
    ) -> Self {
        Self::with_shards(vec![store], key, epoch_len, tickets_per_minute, clock)
    }

    /// A ledger of `stores.len()` shards, shard `i` kept in `stores[i]` ([`PgStore::connect_shards`] for a
    /// cell of replicas).
    pub fn with_shards(
        stores: Vec<Arc<dyn LedgerStore>>,
        key: SigningKey,
        epoch_len: Duration,
        tickets_per_minute: u32,
        clock: Clock,
    ) -> Self {
        assert!(!stores.is_empty(), "a ledger has at least one shard");
        Self {
            shards: stores.into_iter().map(|store| Shard { store, write: Mutex::new(()) }).collect(),
            key,
            epoch_len,
            ticket_ttl: Duration::from_secs(6 * 3600),
            clock,
            tickets: PerSource::new(tickets_per_minute, tickets_per_minute),
        }
    }

    /// How many shards the ledger has.
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn store(&self, shard: u32) -> Result<&dyn LedgerStore, LedgerError> {
        self.shards.get(shard as usize).map(|s| &*s.store).ok_or(LedgerError::NoShard(shard))
    }

    /// The store of the shard `session` is in.
    fn store_of(&self, session: &SessionId) -> &dyn LedgerStore {
        &*self.shards[shard_of(session, self.shard_count()) as usize].store
    }

    /// The store that answers for every shard of its database (a node's totals, rejections): shard 0's.
    fn any_store(&self) -> &dyn LedgerStore {
        &*self.shards[0].store
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

    /// Leaves in a shard's log.
    pub fn size(&self, shard: u32) -> Result<u64, LedgerError> {
        self.store(shard)?.size()
    }

    /// Issues a ticket for `client_key`'s session over `nodes` (with their assigned chunk counts), or `None`
    /// when the client's address used up its tickets (its traffic then earns nobody anything). `client`:
    /// `None` for the tracker's own probes, which no share limits. Writes nothing: the ticket is signed and
    /// self-contained, and comes back with the receipts made under it ([`redeem`](Self::redeem)).
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
        Ok(Some(signed))
    }

    /// Redeems a node's receipts, with the tickets they were made under (`RedeemBatch::tickets`): each is
    /// credited, a duplicate, or rejected with a reason; the answers are in the batch's order. A batch out
    /// of bounds is refused whole ([`LedgerError::Batch`]). The receipts of a shard this process cannot
    /// append to now (another replica sequences it) are left out of the answers; when that is every
    /// receipt, the first shard's error is returned. Blocking (signature checks, hash-chain walks, a
    /// durable write): call it off the async workers.
    pub fn redeem(&self, node: NodeId, receipts: &[Receipt], tickets: &[Signed]) -> Result<Vec<Redeemed>, LedgerError> {
        let mut done = self.redeem_shards(node, receipts, tickets, None)?;
        if !done.failed.is_empty() && done.results.iter().all(Option::is_none) {
            return Err(done.failed.swap_remove(0).1);
        }
        Ok(done.answered())
    }

    /// Redeems the receipts of `only` these shards (all: `None`), each shard's part in one append, and says
    /// which shards' parts it could not append ([`Redemption`]).
    pub fn redeem_shards(
        &self,
        node: NodeId,
        receipts: &[Receipt],
        tickets: &[Signed],
        only: Option<&[u32]>,
    ) -> Result<Redemption, LedgerError> {
        check_batch(receipts, tickets)?;
        let now = self.clock.now_ms();
        let shards: Vec<u32> = receipts.iter().map(|r| self.receipt_shard(r)).collect();
        let wanted = |shard: u32| only.is_none_or(|o| o.contains(&shard));
        // Signatures and chain walks need no ledger state: done before taking a shard's lock, so a batch of
        // expensive receipts delays only its own redemption.
        let tickets = self.open_tickets(tickets);
        let mut verified = Vec::with_capacity(receipts.len());
        for (r, &shard) in receipts.iter().zip(&shards) {
            verified.push(if wanted(shard) { Some(self.verify(node, r, &tickets, now)?) } else { None });
        }
        let mut todo: Vec<u32> = shards.iter().copied().filter(|&s| wanted(s)).collect();
        todo.sort_unstable();
        todo.dedup();
        let mut done = Redemption { results: vec![None; receipts.len()], failed: Vec::new() };
        for shard in todo {
            let part: Vec<usize> = (0..receipts.len()).filter(|&i| shards[i] == shard).collect();
            let checks: Vec<(&Receipt, Result<Verified, Refusal>)> =
                part.iter().filter_map(|&i| Some((&receipts[i], verified[i].take()?))).collect();
            match self.redeem_part(shard, node, now, checks) {
                Ok(results) => {
                    for (i, r) in part.into_iter().zip(results) {
                        done.results[i] = Some(r);
                    }
                }
                Err(e) => done.failed.push((shard, e)),
            }
        }
        Ok(done)
    }

    /// `batch` (a node's signed redemption) wrapped for the replica sequencing `shards`, signed with the
    /// tracker key the replicas share.
    pub fn sign_forward(&self, shards: Vec<u32>, batch: &Signed) -> Signed {
        Signed::sign(&self.key, KIND_FORWARD, &Forward { shards, batch: batch.clone() })
    }

    /// A forward another replica of this cell signed, or `None` if it is not one.
    pub fn open_forward(&self, signed: &Signed) -> Option<Forward> {
        if signed.node_id != self.public_key() {
            return None;
        }
        signed.open::<Forward>(KIND_FORWARD).ok().filter(|f| f.shards.len() <= MAX_SHARDS as usize)
    }

    /// The shard a receipt is redeemed in: its session's, as the commitment names it (read unverified:
    /// a receipt whose commitment is forged or malformed is refused in whichever shard this says, 0 if none).
    fn receipt_shard(&self, r: &Receipt) -> u32 {
        serde_json::from_str::<Commitment>(&r.commitment.payload)
            .map_or(0, |c| shard_of(&c.session, self.shard_count()))
    }

    /// One shard's part of a batch, as one append to the shard's log.
    fn redeem_part(
        &self,
        shard: u32,
        node: NodeId,
        now: u64,
        checks: Vec<(&Receipt, Result<Verified, Refusal>)>,
    ) -> Result<Vec<Redeemed>, LedgerError> {
        let epoch = self.epoch_at(now);
        let Shard { store, write } = &self.shards[shard as usize];
        let store = &**store;
        let _guard = write.lock().expect("ledger write lock");
        // The token before any state is read: if another replica takes over meanwhile, the commit fails.
        let token = store.sequence()?;
        let base_size = store.size()?;
        let mut out = Append::new(node, token, base_size);
        let mut pending_tree: HashMap<(u32, u64), Hash> = HashMap::new();
        // State touched earlier in this batch must be seen by later receipts in it.
        let mut chains: HashMap<(SessionId, NodeId), ChainState> = HashMap::new();
        let mut used: HashMap<SessionId, TicketUse> = HashMap::new();
        let mut node_epoch = store.node_epoch(&node, epoch)?;
        let node_epoch_before = node_epoch;
        let mut rejected_seq = store.rejected_seq(&node)?;
        let mut results = Vec::with_capacity(checks.len());
        for (r, verified) in checks {
            let chain_id = r.chain_id();
            let outcome = match verified {
                Ok(v) => self.apply(store, v, &mut chains, &mut used)?,
                Err(reason) => Check::Reject(reason),
            };
            let result = match outcome {
                Check::Reject(refusal) => {
                    let reason = refusal.to_string();
                    let rej = Rejection { at_ms: now, chain_id, index: r.index, reason: reason.clone() };
                    out.rejections.push((rejected_seq, rej));
                    if rejected_seq >= REJECTIONS_KEPT {
                        out.forget_rejections.push(rejected_seq - REJECTIONS_KEPT);
                    }
                    rejected_seq += 1;
                    Redeemed {
                        chain_id,
                        index: r.index,
                        credited_bytes: 0,
                        outcome: Outcome::Rejected,
                        reason: Some(reason),
                        leaf_index: None,
                        shard,
                    }
                }
                Check::Duplicate => Redeemed {
                    chain_id,
                    index: r.index,
                    credited_bytes: 0,
                    outcome: Outcome::Duplicate,
                    reason: None,
                    leaf_index: None,
                    shard,
                },
                Check::Credit { session, bytes, capped } => {
                    let leaf = LedgerLeaf { epoch, node, session, chain_index: r.index, credited_bytes: bytes };
                    let leaf_index = out.new_size();
                    append(store, &mut out, &mut pending_tree, leaf_index, leaf.bytes())?;
                    node_epoch += bytes;
                    Redeemed {
                        chain_id,
                        index: r.index,
                        credited_bytes: bytes,
                        outcome: Outcome::Credited,
                        reason: capped.then(|| "capped at the ticket's budget or the node's assignment".into()),
                        leaf_index: Some(leaf_index),
                        shard,
                    }
                }
            };
            results.push(result);
        }
        out.chains = chains.into_iter().map(|((s, n), state)| (s, n, state)).collect();
        out.used = used.into_iter().collect();
        // A batch that credited nothing leaves no zero line in the node's statement.
        if node_epoch != node_epoch_before {
            out.node_epoch = Some((epoch, node_epoch));
        }
        out.rejected_seq = rejected_seq;
        store.commit(&out)?;
        Ok(results)
    }

    /// The batch's tickets by id: each opened if this tracker signed it, or why not.
    fn open_tickets(&self, tickets: &[Signed]) -> BatchTickets {
        let me = self.public_key();
        let mut out = BatchTickets::default();
        for signed in tickets {
            let opened = match signed.open::<Ticket>(KIND_TICKET) {
                Ok(t) if signed.node_id == me => Ok(t),
                _ => Err(Refusal::ForgedTicket),
            };
            if let Ok(t) = &opened {
                out.sessions.insert(t.session);
            }
            out.by_id.insert(ticket_id(signed), opened);
        }
        out
    }

    /// What can be checked of a receipt without redemption state: the client's signature, the ticket it
    /// names (in the batch, or stored by an older tracker), the node's assignment, and the hash chain. The
    /// walk is bounded by the chunks the ticket covers, which is checked first. `now`: when the redemption
    /// is made.
    fn verify(
        &self,
        node: NodeId,
        r: &Receipt,
        tickets: &BatchTickets,
        now: u64,
    ) -> Result<Result<Verified, Refusal>, LedgerError> {
        let reject = |why| Ok(Err(why));
        let c = match r.commitment.open::<Commitment>(KIND_COMMITMENT) {
            Ok(c) => c,
            Err(SignedError::Payload { .. }) => return reject(Refusal::Malformed),
            Err(SignedError::BadKey | SignedError::BadSignature) => return reject(Refusal::Forged),
        };
        let ticket = match tickets.by_id.get(&c.ticket_id) {
            Some(Ok(t)) if t.session != c.session => return reject(Refusal::WrongSession),
            Some(Ok(t)) => t.clone(),
            Some(Err(why)) => return reject(*why),
            // Not in the batch: a ticket an older tracker stored (an older node sends none).
            None => match self.store_of(&c.session).ticket(&c.session)? {
                Some(stored) if c.ticket_id != ticket_id(&stored.signed) => return reject(Refusal::OtherTicket),
                Some(stored) => stored.ticket,
                None if tickets.sessions.contains(&c.session) => return reject(Refusal::OtherTicket),
                None => return reject(Refusal::NoTicket),
            },
        };
        let t = &ticket;
        if r.commitment.node_id != t.client_key {
            return reject(Refusal::WrongClient);
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
            chain: (c.session, node),
            index: r.index,
            unit: u64::from(t.unit),
            node_cap: u64::from(assigned) * u64::from(t.unit),
            byte_budget: t.byte_budget,
            expiry_ms: t.expiry_ms,
            ticket_epoch: t.epoch,
        }))
    }

    /// Credits a verified receipt against the chain's and the ticket's state in `store`, its session's
    /// shard (under the shard's write lock).
    fn apply(
        &self,
        store: &dyn LedgerStore,
        v: Verified,
        chains: &mut HashMap<(SessionId, NodeId), ChainState>,
        used: &mut HashMap<SessionId, TicketUse>,
    ) -> Result<Check, LedgerError> {
        let (session, node) = v.chain;
        let state = match chains.get(&v.chain) {
            Some(s) => *s,
            None => store.chain(&session, &node)?.unwrap_or_default(),
        };
        if v.index <= state.index {
            return Ok(Check::Duplicate);
        }
        let spent = match used.get(&session) {
            Some(u) => u.used,
            None => store.ticket_used(&session)?,
        };
        let claimed = u64::from(v.index - state.index) * v.unit;
        let bytes = claimed.min(v.node_cap.saturating_sub(state.credited)).min(v.byte_budget.saturating_sub(spent));
        chains.insert(v.chain, ChainState { index: v.index, credited: state.credited + bytes });
        let spent = TicketUse { used: spent + bytes, expiry_ms: v.expiry_ms, epoch: v.ticket_epoch };
        used.insert(session, spent);
        if bytes == 0 {
            return Ok(Check::Reject(Refusal::NothingLeft));
        }
        Ok(Check::Credit { session, bytes, capped: bytes < claimed })
    }

    /// The signed head of a shard's log as it is now.
    pub fn head(&self, shard: u32) -> Result<Signed, LedgerError> {
        self.head_at(shard, self.clock.now_ms())
    }

    fn head_at(&self, shard: u32, now_ms: u64) -> Result<Signed, LedgerError> {
        let store = self.store(shard)?;
        // Leaves below `size` and their subtrees are final once committed: the root read after the size is
        // the root of that size, whoever appends meanwhile.
        let size = store.size()?;
        let view = TreeView::new(store, None);
        let root = merkle::root(&view, size);
        let head = TreeHead {
            size,
            root: Digest(view.finish(root)?),
            epoch: self.epoch_at(now_ms),
            timestamp_ms: now_ms,
            shard,
        };
        Ok(Signed::sign(&self.key, KIND_TREE_HEAD, &head))
    }

    /// The head signed when `epoch` ended in a shard, if it has.
    pub fn epoch_head(&self, shard: u32, epoch: u64) -> Result<Option<Signed>, LedgerError> {
        self.store(shard)?.epoch_head(epoch)
    }

    /// Forgets the redemption state of a shard's tickets that can no longer be redeemed (expired, and past
    /// the grace epoch): receipts for them are refused by the epoch check before that state is consulted.
    /// Keeps the state bounded by the ticket lifetime. Returns how many tickets were forgotten.
    fn prune_expired(&self, shard: u32, now_ms: u64) -> Result<usize, LedgerError> {
        let horizon = now_ms.saturating_sub(self.epoch_len.as_millis() as u64 * 2);
        self.store(shard)?.prune_tickets(horizon, self.epoch_at(now_ms))
    }

    /// For every shard this process should sequence ([`LedgerStore::tend`]): keeps its lease, signs and
    /// keeps the head of every finished epoch not sealed yet, and prunes dead tickets (called every second
    /// or so). Shards other replicas sequence are left to them. Returns the first shard's error, after
    /// tending the others.
    pub fn seal_epochs(&self) -> Result<(), LedgerError> {
        let now = self.clock.now_ms();
        let mut first = None;
        for shard in 0..self.shard_count() {
            if let Err(e) = self.tend_shard(shard, now) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn tend_shard(&self, shard: u32, now: u64) -> Result<(), LedgerError> {
        let Shard { store, write } = &self.shards[shard as usize];
        if !store.tend()? {
            return Ok(());
        }
        let sequence = || match store.sequence() {
            Ok(token) => Ok(Some(token)),
            Err(LedgerError::NotSequencer { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        let current = self.epoch_at(now);
        if current == 0 || store.sealed()? >= current {
            // The shard's sequencer keeps its lease while idle, so its receipts find it ready.
            return sequence().map(drop);
        }
        let _guard = write.lock().expect("ledger write lock");
        let Some(token) = sequence()? else { return Ok(()) };
        let dropped = self.prune_expired(shard, now)?;
        if dropped > 0 {
            tracing::info!(dropped, shard, "forgot expired credit tickets");
        }
        let head = self.head_at(shard, now)?;
        store.seal(token, current - 1, &head)
    }

    pub fn leaf(&self, shard: u32, index: u64) -> Result<Option<LedgerLeaf>, LedgerError> {
        self.store(shard)?.leaf(index)
    }

    pub fn inclusion(&self, shard: u32, index: u64, size: u64) -> Result<Vec<Digest>, LedgerError> {
        let store = self.store(shard)?;
        let size = size.min(store.size()?);
        let view = TreeView::new(store, None);
        let proof = merkle::inclusion_proof(&view, index, size);
        Ok(view.finish(proof)?.into_iter().map(Digest).collect())
    }

    /// A shard's leaves `indices` (at most [`MAX_RECORDS`]) with their inclusion proofs in its tree of
    /// `size` leaves, so a node checks a round of its records in one request; indices beyond the tree are
    /// left out.
    pub fn records(&self, shard: u32, indices: &[u64], size: u64) -> Result<Vec<RecordProof>, LedgerError> {
        let store = self.store(shard)?;
        let size = size.min(store.size()?);
        let mut out = Vec::new();
        for &index in indices.iter().take(MAX_RECORDS).filter(|&&i| i < size) {
            if let Some(leaf) = store.leaf(index)? {
                let view = TreeView::new(store, None);
                let proof = merkle::inclusion_proof(&view, index, size);
                let proof = view.finish(proof)?.into_iter().map(Digest).collect();
                out.push(RecordProof { index, leaf, proof });
            }
        }
        Ok(out)
    }

    pub fn consistency(&self, shard: u32, first: u64, second: u64) -> Result<Vec<Digest>, LedgerError> {
        let store = self.store(shard)?;
        let second = second.min(store.size()?);
        let view = TreeView::new(store, None);
        let proof = merkle::consistency_proof(&view, first.min(second), second);
        Ok(view.finish(proof)?.into_iter().map(Digest).collect())
    }

    /// Bytes credited to `node` over all epochs and shards.
    pub fn credited(&self, node: &NodeId) -> Result<u64, LedgerError> {
        Ok(self.node_totals(node)?.credited_bytes)
    }

    fn node_totals(&self, node: &NodeId) -> Result<NodeCredits, LedgerError> {
        let epochs = self.any_store().node_epochs(node)?;
        Ok(NodeCredits { node_id: *node, credited_bytes: epochs.iter().map(|e| e.credited_bytes).sum(), epochs })
    }

    /// Every node's credit, per epoch (`GET /v1/credits`).
    pub fn all_credits(&self) -> Result<Vec<NodeCredits>, LedgerError> {
        self.any_store().credited_nodes()?.iter().map(|n| self.node_totals(n)).collect()
    }

    /// A node's itemised statement: totals, latest records (of every shard), rejected receipts with reasons.
    pub fn statement(&self, node: &NodeId, max_records: usize) -> Result<NodeStatement, LedgerError> {
        let totals = self.node_totals(node)?;
        // Newest first, among each shard's newest 10 000 leaves: the statement's cost stays bounded.
        let mut records = Vec::new();
        for shard in 0..self.shard_count() {
            let store = self.store(shard)?;
            let size = store.size()?;
            let mine = store.node_records(node, size.saturating_sub(10_000), size, max_records)?;
            records.extend(mine.into_iter().map(|(index, leaf)| (shard, index, leaf)));
        }
        // Newest first across shards: by epoch, then by index within a shard.
        records.sort_by_key(|r| std::cmp::Reverse((r.2.epoch, r.1)));
        records.truncate(max_records);
        let shards = if self.shard_count() > 1 { records.iter().map(|r| r.0).collect() } else { Vec::new() };
        let records = records.into_iter().map(|(_, index, leaf)| (index, leaf)).collect();
        let mut rejected = self.any_store().rejections(node)?;
        rejected.reverse();
        Ok(NodeStatement { totals, records, shards, rejected })
    }
}

/// Adds leaf `index` and the complete subtrees it closes to `out`, reading the left siblings not in the
/// batch from `store`, the leaf's shard.
fn append(
    store: &dyn LedgerStore,
    out: &mut Append,
    pending: &mut HashMap<(u32, u64), Hash>,
    index: u64,
    leaf: Vec<u8>,
) -> Result<(), LedgerError> {
    let mut hash = merkle::leaf_hash(&leaf);
    out.leaves.push((index, leaf));
    let (mut level, mut i) = (0u32, index);
    loop {
        pending.insert((level, i), hash);
        out.subtrees.push((level, i, hash));
        if i.is_multiple_of(2) {
            return Ok(());
        }
        let left = match pending.get(&(level, i - 1)) {
            Some(h) => *h,
            None => store.subtree(level, i - 1)?.ok_or(LedgerError::MissingSubtree { level, index: i - 1 })?,
        };
        hash = merkle::node_hash(&left, &hash);
        level += 1;
        i /= 2;
    }
}

/// A receipt whose signature, ticket, assignment and chain checked out.
#[derive(Debug)]
struct Verified {
    /// (session, node)
    chain: (SessionId, NodeId),
    index: u32,
    unit: u64,
    node_cap: u64,
    byte_budget: u64,
    /// The ticket's, kept with its spending so that it is forgotten in time.
    expiry_ms: u64,
    ticket_epoch: u64,
}

/// The tickets a redemption batch carries, by id: opened, or why they are refused; and the sessions of the
/// good ones (a commitment naming another ticket of one of them names the wrong ticket).
#[derive(Default)]
struct BatchTickets {
    by_id: HashMap<TicketId, Result<Ticket, Refusal>>,
    sessions: std::collections::HashSet<SessionId>,
}

enum Check {
    Credit { session: SessionId, bytes: u64, capped: bool },
    Duplicate,
    Reject(Refusal),
}
