//! The node's side of credits: it checks and keeps the receipts clients hand it (on disk, until the
//! tracker acknowledges them), redeems them in signed batches, and verifies that what the tracker credits
//! really is in its append-only ledger: an inclusion proof for its newest record in a signed tree head,
//! and a consistency proof from the last head it verified (so history was not rewritten).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::tracker::{TrackerClient, TrackerError};
use fog_proto::api::{Signed, SignedError};
use fog_proto::credits::{
    chain_links, ChainId, Commitment, Digest, LedgerLeaf, Outcome, Receipt, RedeemBatch, TreeHead, KIND_COMMITMENT,
    KIND_REDEEM, KIND_TREE_HEAD, MAX_BATCH,
};
use fog_proto::merkle;
use fog_proto::NodeId;
use serde::{Deserialize, Serialize};

use crate::receipts::{ReceiptDb, ReceiptsError, MAX_HELD};
use crate::tracker_link::SharedLinkState;

const REDEEM_EVERY: Duration = Duration::from_secs(5);
const STATEMENT_EVERY: Duration = Duration::from_secs(30);

/// Why a receipt a client handed over was not kept.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptRefused {
    #[error("not a receipt: {0}")]
    NotAReceipt(#[source] serde_json::Error),
    #[error("commitment: {0}")]
    Commitment(#[source] SignedError),
    #[error("receipt is for another node")]
    OtherNode,
    #[error("payment index outside the chain")]
    OutsideChain,
    #[error("{MAX_HELD} receipts already await redemption; refusing a new chain until the tracker settles some")]
    Full,
    #[error("receipt pays for {advance} more chunks; its connection delivered at most {max_advance}")]
    BeyondDelivered { advance: u32, max_advance: u32 },
    #[error("preimage does not extend the committed chain")]
    BadChain,
    /// Not the client's fault: the receipt may be handed over again.
    #[error(transparent)]
    Store(#[from] ReceiptsError),
}

/// Why a redemption round failed; the held receipts stay and are redeemed next round.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("redeeming at the tracker: {0}")]
    Tracker(#[from] TrackerError),
    #[error("reading or settling held receipts: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why the tracker's ledger failed verification (or could not be checked).
#[derive(Debug, thiserror::Error)]
pub enum LedgerCheckError {
    #[error("cannot fetch {what} from the tracker: {source}")]
    Fetch { what: &'static str, source: TrackerError },
    #[error("tree head is not signed by the tracker's key")]
    WrongSigner,
    #[error("tree head: {0}")]
    Head(#[source] SignedError),
    #[error("ledger leaf {0} is not this node's record")]
    NotMine(u64),
    #[error("record {index} is not in the signed tree of size {size}")]
    NotIncluded { index: u64, size: u64 },
    #[error("the ledger shrank from {old} to {new} records")]
    Shrank { old: u64, new: u64 },
    #[error("the ledger of size {new} does not extend the one of size {old}")]
    Inconsistent { old: u64, new: u64 },
}

/// A Merkle proof as the tracker serves it.
#[derive(Deserialize)]
struct Proof {
    proof: Vec<Digest>,
}

impl Proof {
    fn hashes(&self) -> Vec<merkle::Hash> {
        self.proof.iter().map(|d| d.0).collect()
    }
}

/// The part of the tracker's statement for this node that the status page shows.
#[derive(Deserialize)]
struct Statement {
    credited_bytes: u64,
}

/// What the status page shows about credits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreditView {
    pub receipts_held: u64,
    /// Bytes the tracker's ledger credits this node with, as of its last statement.
    pub tracker_credited: Option<u64>,
    pub receipts_rejected: u64,
    /// Receipts clients handed over that this node refused (malformed, forged, or paying for more than
    /// their connection delivered).
    pub receipts_refused: u64,
    /// Largest ledger size whose signed head, inclusion and consistency proofs this node verified.
    pub ledger_verified_size: Option<u64>,
    /// Set when verification failed: the tracker's ledger cannot be trusted.
    pub ledger_problem: Option<String>,
    pub last_redeem_error: Option<String>,
    /// Set when the receipts database was damaged at start-up: what was done about it.
    pub receipts_recovered: Option<String>,
}

#[derive(Debug)]
pub struct Credits {
    receipts: Arc<ReceiptDb>,
    me: NodeId,
    held: AtomicU64,
    /// Serialises read-compare-write of held receipts: receipts for one chain arrive on parallel streams,
    /// and an older one must never overwrite a newer one (the client does not send it again).
    write: Mutex<()>,
    bad_receipts: AtomicU64,
    view: Mutex<CreditView>,
    verified: Mutex<Option<(u64, merkle::Hash)>>,
}

impl Credits {
    pub fn new(receipts: Arc<ReceiptDb>, me: NodeId) -> Self {
        let held = receipts.count();
        Self {
            receipts,
            me,
            held: AtomicU64::new(held),
            write: Mutex::new(()),
            bad_receipts: AtomicU64::new(0),
            view: Mutex::new(CreditView::default()),
            verified: Mutex::new(None),
        }
    }

    pub fn view(&self) -> CreditView {
        let mut v = self.view.lock().expect("credits lock").clone();
        v.receipts_held = self.held.load(Ordering::Relaxed);
        v.receipts_refused = self.bad_receipts.load(Ordering::Relaxed);
        v.receipts_recovered = self.receipts.recovered().map(str::to_string);
        v
    }

    /// Checks a receipt a client handed over and keeps it (synced) if it pays more than the one held for its
    /// chain, by at most `max_advance` chunks (what the client's connection delivered: checked before any
    /// hashing). Blocking: call it off the async workers.
    pub fn accept(&self, json: &[u8], max_advance: u32) -> Result<(), ReceiptRefused> {
        let result = self.check_and_store(json, max_advance);
        if result.is_err() {
            self.bad_receipts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn check_and_store(&self, json: &[u8], max_advance: u32) -> Result<(), ReceiptRefused> {
        let r: Receipt = serde_json::from_slice(json).map_err(ReceiptRefused::NotAReceipt)?;
        let c: Commitment = r.commitment.open(KIND_COMMITMENT).map_err(ReceiptRefused::Commitment)?;
        if c.node != self.me {
            return Err(ReceiptRefused::OtherNode);
        }
        if r.index == 0 || r.index > c.length {
            return Err(ReceiptRefused::OutsideChain);
        }
        let id = r.chain_id();
        let _guard = self.write.lock().expect("receipts lock");
        let held: Option<Receipt> = self.receipts.get(&id)?.and_then(|v| serde_json::from_slice(&v).ok());
        if held.is_none() && self.held.load(Ordering::Relaxed) >= MAX_HELD {
            return Err(ReceiptRefused::Full);
        }
        // Check only the new links: one hash per chunk, not the whole chain again.
        let (base, base_index) = match &held {
            Some(h) if h.index >= r.index => return Ok(()),
            Some(h) => (h.preimage, h.index),
            None => (c.anchor, 0),
        };
        let advance = r.index - base_index;
        if advance > max_advance {
            return Err(ReceiptRefused::BeyondDelivered { advance, max_advance });
        }
        if !chain_links(&base, base_index, &r.preimage, r.index) {
            return Err(ReceiptRefused::BadChain);
        }
        self.receipts.put(&id, json)?;
        if held.is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn held_batch(&self) -> Vec<Receipt> {
        self.receipts.first(MAX_BATCH).iter().filter_map(|v| serde_json::from_slice(v).ok()).collect()
    }

    /// Drops held receipts the tracker settled (in one synced write), except chains for which a newer
    /// receipt arrived since. Blocking.
    fn settle(&self, settled: &[(ChainId, u32)]) {
        let _guard = self.write.lock().expect("receipts lock");
        let done: Vec<ChainId> = settled
            .iter()
            .filter(|(id, index)| {
                let held = self.receipts.get(id).ok().flatten();
                held.and_then(|v| serde_json::from_slice::<Receipt>(&v).ok()).is_some_and(|h| h.index == *index)
            })
            .map(|(id, _)| *id)
            .collect();
        match self.receipts.delete_all(&done) {
            Ok(()) => {
                self.held.fetch_sub(done.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot drop settled receipts; they will be redeemed again"),
        }
    }

    /// Redeems held receipts every few seconds and checks the ledger, until the process ends.
    pub async fn redeem_forever(self: Arc<Self>, tracker: TrackerClient, key: SigningKey, link: SharedLinkState) {
        let mut tick = tokio::time::interval(REDEEM_EVERY);
        let mut last_statement: Option<Instant> = None;
        loop {
            tick.tick().await;
            let tracker_key = link.lock().expect("link lock").tracker_key;
            let Some(tracker_key) = tracker_key else { continue };
            let outcome = self.redeem_once(&tracker, &key, tracker_key).await;
            self.view.lock().expect("credits lock").last_redeem_error = outcome.as_ref().err().map(ToString::to_string);
            if last_statement.is_none_or(|t| t.elapsed() > STATEMENT_EVERY)
                || outcome.as_ref().is_ok_and(|credited| *credited)
            {
                if let Ok(s) = tracker.get_json::<Statement>(&format!("/v1/nodes/{}/credits", self.me)).await {
                    self.view.lock().expect("credits lock").tracker_credited = Some(s.credited_bytes);
                    last_statement = Some(Instant::now());
                }
            }
            // A backlog (after the tracker was away, or on a busy node) is redeemed batch after batch, not
            // one batch per tick.
            if outcome.is_ok() && self.held.load(Ordering::Relaxed) >= MAX_BATCH as u64 {
                tick.reset_immediately();
            }
        }
    }

    /// One batch; `Ok(true)` when something was credited.
    pub async fn redeem_once(
        self: &Arc<Self>,
        tracker: &TrackerClient,
        key: &SigningKey,
        tracker_key: NodeId,
    ) -> Result<bool, RedeemError> {
        let me = self.clone();
        let receipts = tokio::task::spawn_blocking(move || me.held_batch()).await?;
        if receipts.is_empty() {
            return Ok(false);
        }
        let now = crate::tracker_link::now_ms();
        let batch = RedeemBatch { timestamp_ms: now, receipts };
        let resp = tracker.redeem(&Signed::sign(key, KIND_REDEEM, &batch)).await?;
        let mut newest_leaf = None;
        let mut rejected = 0;
        let settled = resp.results.iter().map(|r| (r.chain_id, r.index)).collect::<Vec<_>>();
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.settle(&settled)).await?;
        for r in &resp.results {
            if r.outcome == Outcome::Rejected {
                rejected += 1;
                tracing::warn!(chain = %r.chain_id, reason = ?r.reason, "tracker rejected a receipt");
            }
            newest_leaf = newest_leaf.max(r.leaf_index);
        }
        self.view.lock().expect("credits lock").receipts_rejected += rejected;
        if let Some(leaf) = newest_leaf {
            if let Err(problem) = self.verify_ledger(tracker, tracker_key, leaf).await {
                tracing::error!(%problem, "the tracker's ledger failed verification");
                self.view.lock().expect("credits lock").ledger_problem = Some(problem.to_string());
            }
        }
        Ok(newest_leaf.is_some())
    }

    /// Verifies that leaf `index` is this node's record in a head the tracker signed, and that this head
    /// extends the last one verified.
    pub async fn verify_ledger(
        &self,
        tracker: &TrackerClient,
        tracker_key: NodeId,
        index: u64,
    ) -> Result<u64, LedgerCheckError> {
        let fetch = |what: &'static str| move |source: TrackerError| LedgerCheckError::Fetch { what, source };
        let head: Signed = tracker.get_json("/v1/ledger/head").await.map_err(fetch("the tree head"))?;
        if head.node_id != tracker_key {
            return Err(LedgerCheckError::WrongSigner);
        }
        let head: TreeHead = head.open(KIND_TREE_HEAD).map_err(LedgerCheckError::Head)?;
        let root = head.root.0;
        let path = format!("/v1/ledger/leaf?index={index}");
        let leaf: LedgerLeaf = tracker.get_json(&path).await.map_err(fetch("a ledger leaf"))?;
        if leaf.node != self.me {
            return Err(LedgerCheckError::NotMine(index));
        }
        let path = format!("/v1/ledger/inclusion?index={index}&size={}", head.size);
        let inclusion: Proof = tracker.get_json(&path).await.map_err(fetch("an inclusion proof"))?;
        if !merkle::verify_inclusion(&leaf.bytes(), index, head.size, &inclusion.hashes(), &root) {
            return Err(LedgerCheckError::NotIncluded { index, size: head.size });
        }
        let previous = *self.verified.lock().expect("verified lock");
        if let Some((old, old_root)) = previous {
            if old > head.size {
                return Err(LedgerCheckError::Shrank { old, new: head.size });
            }
            let path = format!("/v1/ledger/consistency?first={old}&second={}", head.size);
            let proof: Proof = tracker.get_json(&path).await.map_err(fetch("a consistency proof"))?;
            if !merkle::verify_consistency(old, head.size, &proof.hashes(), &old_root, &root) {
                return Err(LedgerCheckError::Inconsistent { old, new: head.size });
            }
        }
        *self.verified.lock().expect("verified lock") = Some((head.size, root));
        let mut v = self.view.lock().expect("credits lock");
        v.ledger_verified_size = Some(head.size);
        v.ledger_problem = None;
        Ok(head.size)
    }
}
