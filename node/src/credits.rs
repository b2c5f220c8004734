//! The node's side of credits: it checks and keeps the receipts clients hand it (on disk, until the
//! tracker acknowledges them), redeems them in signed batches, and verifies that what the tracker credits
//! really is in its append-only ledger: an inclusion proof for its newest record in a signed tree head,
//! and a consistency proof from the last head it verified (so history was not rewritten). Every credit
//! the tracker answers is written down in the node's books (`earnings.rs`) and its ledger record checked
//! there, and each finished epoch's sealed head is checked against the verified log, so the node's own
//! totals per epoch can be compared with the tracker's to the byte. A ledger split into shards is one log
//! per shard: each answer names its record's shard, and heads, proofs and consistency are checked per
//! shard (a head of one shard is only ever compared with heads of the same shard).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::tracker::{TrackerClient, TrackerError};
use fog_proto::api::{Signed, SignedError};
use fog_proto::credits::{
    chain_links, redeem_body_bound, ticket_id, ChainId, Commitment, Digest, LedgerLeaf, Outcome, Receipt, RedeemBatch,
    TicketId, TreeHead, KIND_COMMITMENT, KIND_REDEEM, KIND_TREE_HEAD, MAX_BATCH, MAX_REDEEM_BODY,
};
use fog_proto::merkle;
use fog_proto::merkle::Hash;
use fog_proto::wire::MAX_TICKET_LEN;
use fog_proto::NodeId;
use serde::{Deserialize, Serialize};

use crate::earnings::{check_record, Earnings, EarningsError, Sealed, Verification, VerifiedHead};
use crate::receipts::{ReceiptDb, ReceiptsError, MAX_HELD};
use crate::tracker_link::SharedLinkState;

const REDEEM_EVERY: Duration = Duration::from_secs(5);
const STATEMENT_EVERY: Duration = Duration::from_secs(30);
/// Ledger records verified per request to the tracker (the answer stays well below its size limit), and
/// per round.
const RECORDS_PER_REQUEST: usize = 64;
const RECORDS_PER_ROUND: usize = 256;
/// Finished epochs whose sealed head is checked per round.
const SEALS_PER_ROUND: usize = 8;

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

impl ReceiptRefused {
    /// The reason in the owner's books: one of a few, whatever the numbers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotAReceipt(_) => "not a receipt",
            Self::Commitment(_) => "forged or malformed commitment",
            Self::OtherNode => "for another node",
            Self::OutsideChain => "payment index outside the chain",
            Self::Full => "too many receipts awaiting redemption",
            Self::BeyondDelivered { .. } => "pays for more than its connection delivered",
            Self::BadChain => "preimage does not extend the committed chain",
            Self::Store(_) => "receipts database failed",
        }
    }
}

/// Why a redemption round failed; the held receipts stay and are redeemed next round.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("redeeming at the tracker: {0}")]
    Tracker(#[from] TrackerError),
    #[error("reading or settling held receipts: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl RedeemError {
    /// Whether the next round may succeed (the tracker comes back; a failed task will not).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Tracker(_))
    }
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
    #[error("asked for a head of ledger shard {asked}, got one of shard {got}")]
    WrongShard { asked: u32, got: u32 },
    #[error("the ledger shrank from {old} to {new} records")]
    Shrank { old: u64, new: u64 },
    #[error("the ledger of size {new} does not extend the one of size {old}")]
    Inconsistent { old: u64, new: u64 },
    #[error("ledger record {index} of shard {shard}: {why}")]
    BadRecord { shard: u32, index: u64, why: String },
    #[error("the node's books: {0}")]
    Books(#[from] EarningsError),
    #[error("reading or writing the node's books: {0}")]
    Task(#[from] tokio::task::JoinError),
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

/// Ledger records with their inclusion proofs (`GET /v1/ledger/records`).
#[derive(Deserialize)]
struct Records {
    records: Vec<RecordProof>,
}

#[derive(Deserialize)]
struct RecordProof {
    index: u64,
    leaf: LedgerLeaf,
    proof: Vec<Digest>,
}

/// The part of the tracker's statement for this node that the node keeps: its total and per-epoch totals.
#[derive(Deserialize)]
struct Statement {
    credited_bytes: u64,
    #[serde(default)]
    epochs: Vec<EpochLine>,
}

#[derive(Deserialize)]
struct EpochLine {
    epoch: u64,
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
    /// Largest ledger size whose signed head, inclusion and consistency proofs this node verified (with
    /// shards: the sum of the shards' verified sizes).
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
    /// and an older one must never overwrite a newer one (the client does not send it again). Holds how
    /// many held receipts (chains) name each ticket, so a ticket goes with the last of them.
    write: Mutex<HashMap<TicketId, u32>>,
    /// Whether the last redemption batch left receipts behind (it was full): the next one goes at once.
    backlog: AtomicBool,
    bad_receipts: AtomicU64,
    view: Mutex<CreditView>,
    earnings: Arc<Earnings>,
    /// When the ledger is next worth checking for epochs to settle (unix ms): the estimated end of the
    /// tracker's current epoch, or 0 while a finished epoch still awaits its sealed head.
    settle_at_ms: AtomicU64,
}

impl Credits {
    pub fn new(receipts: Arc<ReceiptDb>, me: NodeId, earnings: Arc<Earnings>) -> Self {
        let held = receipts.count();
        let mut named: HashMap<TicketId, u32> = HashMap::new();
        for json in receipts.first(usize::MAX) {
            if let Some(id) = serde_json::from_slice::<Receipt>(&json).ok().as_ref().and_then(named_ticket) {
                *named.entry(id).or_default() += 1;
            }
        }
        // Tickets no held receipt names (held before a crash between two writes cannot happen: each write
        // is one batch; but a damaged database repaired may have lost receipts) are dropped.
        let unnamed: Vec<TicketId> = receipts.ticket_ids().into_iter().filter(|id| !named.contains_key(id)).collect();
        if let Err(e) = receipts.delete_all(&[], &unnamed) {
            tracing::warn!(error = %e, "cannot drop tickets no held receipt names");
        }
        Self {
            receipts,
            me,
            held: AtomicU64::new(held),
            write: Mutex::new(named),
            backlog: AtomicBool::new(false),
            bad_receipts: AtomicU64::new(0),
            view: Mutex::new(CreditView::default()),
            earnings,
            settle_at_ms: AtomicU64::new(0),
        }
    }

    /// The node's books.
    pub fn earnings(&self) -> &Arc<Earnings> {
        &self.earnings
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
    /// hashing), with `ticket` (the request's: the signed ticket the receipt's commitment names, which the
    /// tracker wants with the receipt) unless that is held already. Blocking: call it off the async workers.
    pub fn accept(&self, json: &[u8], ticket: Option<&[u8]>, max_advance: u32) -> Result<(), ReceiptRefused> {
        let result = self.check_and_store(json, ticket, max_advance);
        if let Err(e) = &result {
            self.bad_receipts.fetch_add(1, Ordering::Relaxed);
            self.earnings.note_refusal(e.kind());
        }
        result
    }

    fn check_and_store(&self, json: &[u8], ticket: Option<&[u8]>, max_advance: u32) -> Result<(), ReceiptRefused> {
        let r: Receipt = serde_json::from_slice(json).map_err(ReceiptRefused::NotAReceipt)?;
        let c: Commitment = r.commitment.open(KIND_COMMITMENT).map_err(ReceiptRefused::Commitment)?;
        if c.node != self.me {
            return Err(ReceiptRefused::OtherNode);
        }
        if r.index == 0 || r.index > c.length {
            return Err(ReceiptRefused::OutsideChain);
        }
        let id = r.chain_id();
        let mut named = self.write.lock().expect("receipts lock");
        let held: Option<Receipt> = self.receipts.get(&id)?.and_then(|v| serde_json::from_slice(&v).ok());
        if held.is_none() && self.held.load(Ordering::Relaxed) >= MAX_HELD {
            return Err(ReceiptRefused::Full);
        }
        // The ticket the commitment names, if the request brought it and it is not held yet. One the
        // commitment does not name is not kept (the receipt is: the tracker may have stored its ticket).
        let ticket = match ticket {
            Some(t) if self.receipts.ticket(&c.ticket_id)?.is_none() => {
                let signed = serde_json::from_slice::<Signed>(t).ok().filter(|s| ticket_id(s) == c.ticket_id);
                if signed.is_none() {
                    tracing::debug!(chain = %id, "a receipt came with a ticket its commitment does not name");
                }
                signed.and_then(|s| serde_json::to_vec(&s).ok()).filter(|t| t.len() <= MAX_TICKET_LEN)
            }
            _ => None,
        };
        let ticket = ticket.as_deref().map(|t| (&c.ticket_id, t));
        // Check only the new links: one hash per chunk, not the whole chain again.
        let (base, base_index) = match &held {
            Some(h) if h.index >= r.index => {
                // Nothing new to keep but, perhaps, the ticket of a receipt held without it.
                if ticket.is_some() {
                    self.receipts.put(None, ticket)?;
                }
                return Ok(());
            }
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
        self.receipts.put(Some((&id, json)), ticket)?;
        if held.is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
            *named.entry(c.ticket_id).or_default() += 1;
        }
        Ok(())
    }

    /// Held receipts to redeem, with the tickets they name (those held), at most [`MAX_BATCH`] receipts and
    /// a signed body below [`MAX_REDEEM_BODY`]; notes whether receipts were left for the next batch.
    fn held_batch(&self) -> (Vec<Receipt>, Vec<Signed>) {
        // The signed message around the batch, with room to spare.
        let mut size = 1024;
        let (mut receipts, mut tickets) = (Vec::new(), Vec::new());
        let mut included: Vec<TicketId> = Vec::new();
        let held = self.receipts.first(MAX_BATCH);
        let mut full = held.len() >= MAX_BATCH;
        for json in &held {
            let Ok(r) = serde_json::from_slice::<Receipt>(json) else { continue };
            let id = named_ticket(&r).filter(|id| !included.contains(id));
            let ticket = id.and_then(|id| self.receipts.ticket(&id).ok().flatten().map(|t| (id, t)));
            let ticket = ticket.and_then(|(id, t)| Some((id, serde_json::from_slice::<Signed>(&t).ok()?, t.len())));
            let grows =
                redeem_body_bound(json.len()) + ticket.as_ref().map_or(0, |(_, _, len)| redeem_body_bound(*len));
            if size + grows > MAX_REDEEM_BODY {
                full = true;
                break;
            }
            size += grows;
            receipts.push(r);
            if let Some((id, signed, _)) = ticket {
                included.push(id);
                tickets.push(signed);
            }
        }
        self.backlog.store(full, Ordering::Relaxed);
        (receipts, tickets)
    }

    /// Drops held receipts the tracker settled, and the tickets no held receipt names any more (in one synced
    /// write), except chains for which a newer receipt arrived since. Blocking.
    fn settle(&self, settled: &[(ChainId, u32)]) {
        let mut named = self.write.lock().expect("receipts lock");
        let mut done = Vec::new();
        let mut counts = named.clone();
        let mut unnamed = Vec::new();
        for (id, index) in settled {
            let held = self.receipts.get(id).ok().flatten();
            let Some(h) = held.and_then(|v| serde_json::from_slice::<Receipt>(&v).ok()) else { continue };
            if h.index != *index {
                continue;
            }
            done.push(*id);
            if let Some(ticket) = named_ticket(&h) {
                if let Some(n) = counts.get_mut(&ticket) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&ticket);
                        unnamed.push(ticket);
                    }
                }
            }
        }
        match self.receipts.delete_all(&done, &unnamed) {
            Ok(()) => {
                self.held.fetch_sub(done.len() as u64, Ordering::Relaxed);
                *named = counts;
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
            let outcome = self.redeem_once(&tracker, &key).await;
            self.view.lock().expect("credits lock").last_redeem_error = outcome.as_ref().err().map(ToString::to_string);
            let statement_due = last_statement.is_none_or(|t| t.elapsed() > STATEMENT_EVERY);
            let settle_due =
                crate::tracker_link::now_ms() >= self.settle_at_ms.load(Ordering::Relaxed) && self.earnings.has_open();
            if self.earnings.pending_count() > 0 || statement_due || settle_due {
                match self.check_ledger(&tracker, tracker_key).await {
                    Ok(()) => {}
                    Err(LedgerCheckError::Fetch { what, source }) => {
                        tracing::debug!(what, error = %source, "cannot check the ledger this round")
                    }
                    Err(problem) => {
                        tracing::error!(%problem, "the tracker's ledger failed verification");
                        self.view.lock().expect("credits lock").ledger_problem = Some(problem.to_string());
                    }
                }
            }
            if statement_due || outcome.as_ref().is_ok_and(|credited| *credited) {
                if let Ok(s) = tracker.get_json::<Statement>(&format!("/v1/nodes/{}/credits", self.me)).await {
                    self.view.lock().expect("credits lock").tracker_credited = Some(s.credited_bytes);
                    last_statement = Some(Instant::now());
                    let lines: Vec<(u64, u64)> = s.epochs.iter().map(|e| (e.epoch, e.credited_bytes)).collect();
                    let books = self.earnings.clone();
                    match tokio::task::spawn_blocking(move || books.record_tracker_totals(&lines)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot write down the tracker's statement"),
                        Err(e) => tracing::warn!(error = %e, "cannot write down the tracker's statement"),
                    }
                }
            }
            // A backlog (after the tracker was away, or on a busy node) is redeemed batch after batch, not
            // one batch per tick.
            if outcome.is_ok() && self.backlog.load(Ordering::Relaxed) {
                tick.reset_immediately();
            }
        }
    }

    /// One batch; `Ok(true)` when something was credited. The tracker's answers go into the node's books
    /// before the receipts are dropped.
    pub async fn redeem_once(self: &Arc<Self>, tracker: &TrackerClient, key: &SigningKey) -> Result<bool, RedeemError> {
        let me = self.clone();
        let (receipts, tickets) = tokio::task::spawn_blocking(move || me.held_batch()).await?;
        if receipts.is_empty() {
            return Ok(false);
        }
        let now = crate::tracker_link::now_ms();
        let batch = RedeemBatch { timestamp_ms: now, receipts, tickets };
        let mut resp = tracker.redeem(&Signed::sign(key, KIND_REDEEM, &batch)).await?;
        resp.results.truncate(batch.receipts.len());
        let results = Arc::new(resp.results);
        let (books, answers) = (self.earnings.clone(), results.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || books.record_redemption(&answers)).await? {
            tracing::error!(error = %e, "cannot write the tracker's answers into the node's books");
        }
        let settled = results.iter().map(|r| (r.chain_id, r.index)).collect::<Vec<_>>();
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.settle(&settled)).await?;
        let mut rejected = 0;
        for r in results.iter().filter(|r| r.outcome == Outcome::Rejected) {
            rejected += 1;
            tracing::warn!(chain = %r.chain_id, reason = ?r.reason, "tracker rejected a receipt");
        }
        self.view.lock().expect("credits lock").receipts_rejected += rejected;
        Ok(results.iter().any(|r| r.leaf_index.is_some()))
    }

    /// Checks, in every ledger shard the node has records in, the tracker's signed head against the last
    /// one verified, and the records awaiting verification against it; then the sealed heads of finished
    /// epochs against the verified logs. Writes down what it found in the node's books.
    pub async fn check_ledger(&self, tracker: &TrackerClient, tracker_key: NodeId) -> Result<(), LedgerCheckError> {
        let books = self.earnings.clone();
        let shards = tokio::task::spawn_blocking(move || books.shards()).await??;
        let mut verified = Vec::with_capacity(shards.len());
        let mut first_failure = None;
        let mut current = None;
        for shard in shards {
            let (head, root, failure) = self.check_shard(tracker, tracker_key, shard).await?;
            if first_failure.is_none() {
                first_failure = failure.map(|(index, why)| LedgerCheckError::BadRecord { shard, index, why });
            }
            current = current.max(Some((head.epoch, head.timestamp_ms)));
            verified.push((shard, head.size, root));
        }
        {
            let mut v = self.view.lock().expect("credits lock");
            v.ledger_verified_size = Some(verified.iter().map(|(_, size, _)| size).sum());
            v.ledger_problem = None;
        }
        if let Some(failure) = first_failure {
            return Err(failure);
        }
        let (epoch, timestamp_ms) = current.unwrap_or_default();
        let waiting = self.check_sealed(tracker, tracker_key, epoch, &verified).await?;
        let next = if waiting { 0 } else { epoch_end_ms(epoch, timestamp_ms).unwrap_or(0) };
        self.settle_at_ms.store(next, Ordering::Relaxed);
        Ok(())
    }

    /// One shard: its signed head, consistent with the last one verified, and a round of its records
    /// awaiting verification checked against it; the head with its root, and the first record that failed.
    async fn check_shard(
        &self,
        tracker: &TrackerClient,
        tracker_key: NodeId,
        shard: u32,
    ) -> Result<(TreeHead, Hash, Option<(u64, String)>), LedgerCheckError> {
        let books = self.earnings.clone();
        let previous = tokio::task::spawn_blocking(move || books.verified_head(shard)).await??;
        let (head, root) = self.signed_head(tracker, tracker_key, shard, None).await?;
        if let Some(old) = previous {
            if old.size > head.size {
                return Err(LedgerCheckError::Shrank { old: old.size, new: head.size });
            }
            self.check_consistency(tracker, shard, (old.size, old.root.0), (head.size, root)).await?;
        }
        let books = self.earnings.clone();
        let pending = tokio::task::spawn_blocking(move || books.pending_records(shard, RECORDS_PER_ROUND)).await??;
        let pending: Vec<_> = pending.into_iter().filter(|(index, _)| *index < head.size).collect();
        let mut found = Verification::default();
        for part in pending.chunks(RECORDS_PER_REQUEST) {
            let list = part.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join(",");
            let path = format!("/v1/ledger/records?size={}&index={list}{}", head.size, shard_param("&", shard));
            let got: Records = tracker
                .get_json(&path)
                .await
                .map_err(|source| LedgerCheckError::Fetch { what: "ledger records", source })?;
            for (index, expected) in part {
                match got.records.iter().find(|r| r.index == *index) {
                    Some(r) => {
                        let proof: Vec<Hash> = r.proof.iter().map(|d| d.0).collect();
                        match check_record(&self.me, *index, expected, &r.leaf, &proof, head.size, &root) {
                            Ok(()) => found.included.push((*index, r.leaf.clone())),
                            Err(why) => found.failed.push((*index, Some(r.leaf.epoch), why)),
                        }
                    }
                    None => found.failed.push((*index, None, format!("missing from the tree of size {}", head.size))),
                }
            }
        }
        let first_failure = found.failed.first().map(|(index, _, why)| (*index, why.clone()));
        let verified = VerifiedHead { size: head.size, root: Digest(root) };
        let books = self.earnings.clone();
        tokio::task::spawn_blocking(move || books.record_verification(shard, verified, &found)).await??;
        Ok((head, root, first_failure))
    }

    /// Checks the heads that sealed finished epochs with records in the books, in every shard of
    /// `verified` (shard, size and root of its verified head), against the verified logs; `Ok(true)` while
    /// a finished epoch still waits for a sealed head or its records' verification.
    async fn check_sealed(
        &self,
        tracker: &TrackerClient,
        tracker_key: NodeId,
        current_epoch: u64,
        verified: &[(u32, u64, Hash)],
    ) -> Result<bool, LedgerCheckError> {
        let books = self.earnings.clone();
        let epochs = tokio::task::spawn_blocking(move || books.unsettled(current_epoch, SEALS_PER_ROUND)).await??;
        let mut problem = None;
        let mut waiting = false;
        'epochs: for epoch in epochs {
            let mut seals = Vec::with_capacity(verified.len());
            let mut notes = Vec::new();
            for &(shard, size, root) in verified {
                let (sealed_size, sealed_root) = match self.signed_head(tracker, tracker_key, shard, Some(epoch)).await
                {
                    Ok((head, root)) => (head.size, root),
                    // The tracker seals each epoch within a second or so of its end; one it never sealed (it
                    // was down then) is settled against the verified head, which holds all of its records.
                    Err(LedgerCheckError::Fetch { .. }) if epoch + 2 <= current_epoch => {
                        notes.push(format!(
                            "the tracker never sealed this epoch in shard {shard}: settled against the head of size \
                             {size}"
                        ));
                        (size, root)
                    }
                    Err(LedgerCheckError::Fetch { .. }) => {
                        waiting = true;
                        continue 'epochs;
                    }
                    Err(e) => return Err(e),
                };
                let consistent =
                    match self.check_consistency(tracker, shard, (sealed_size, sealed_root), (size, root)).await {
                        Ok(()) => Ok(()),
                        Err(e @ LedgerCheckError::Fetch { .. }) => return Err(e),
                        Err(e) => {
                            let why = format!("the head that sealed epoch {epoch} in shard {shard}: {e}");
                            problem.get_or_insert(LedgerCheckError::BadRecord {
                                shard,
                                index: sealed_size,
                                why: why.clone(),
                            });
                            Err(why)
                        }
                    };
                seals.push(Sealed { shard, size: sealed_size, consistent });
            }
            let books = self.earnings.clone();
            let settled = tokio::task::spawn_blocking(move || books.record_sealed(epoch, &seals, notes)).await??;
            waiting |= !settled;
        }
        problem.map_or(Ok(waiting), Err)
    }

    /// A tree head of `shard` the tracker signed (now, or the one that sealed `epoch`), with its root.
    async fn signed_head(
        &self,
        tracker: &TrackerClient,
        tracker_key: NodeId,
        shard: u32,
        epoch: Option<u64>,
    ) -> Result<(TreeHead, Hash), LedgerCheckError> {
        // Shard 0 is asked for as before shards, so a tracker from then answers.
        let path = match epoch {
            None => format!("/v1/ledger/head{}", shard_param("?", shard)),
            Some(e) => format!("/v1/ledger/head?epoch={e}{}", shard_param("&", shard)),
        };
        let head: Signed =
            tracker.get_json(&path).await.map_err(|source| LedgerCheckError::Fetch { what: "a tree head", source })?;
        if head.node_id != tracker_key {
            return Err(LedgerCheckError::WrongSigner);
        }
        let head: TreeHead = head.open(KIND_TREE_HEAD).map_err(LedgerCheckError::Head)?;
        if head.shard != shard {
            return Err(LedgerCheckError::WrongShard { asked: shard, got: head.shard });
        }
        let root = head.root.0;
        Ok((head, root))
    }

    /// Checks that the smaller of two verified-signature heads of `shard` is a prefix of the larger.
    async fn check_consistency(
        &self,
        tracker: &TrackerClient,
        shard: u32,
        a: (u64, Hash),
        b: (u64, Hash),
    ) -> Result<(), LedgerCheckError> {
        let ((old, old_root), (new, new_root)) = if a.0 <= b.0 { (a, b) } else { (b, a) };
        if old == new {
            return if old_root == new_root { Ok(()) } else { Err(LedgerCheckError::Inconsistent { old, new }) };
        }
        let path = format!("/v1/ledger/consistency?first={old}&second={new}{}", shard_param("&", shard));
        let proof: Proof = tracker
            .get_json(&path)
            .await
            .map_err(|source| LedgerCheckError::Fetch { what: "a consistency proof", source })?;
        if !merkle::verify_consistency(old, new, &proof.hashes(), &old_root, &new_root) {
            return Err(LedgerCheckError::Inconsistent { old, new });
        }
        Ok(())
    }
}

/// The ticket a receipt's commitment names (read unverified: the node checked the commitment when it took
/// the receipt).
fn named_ticket(r: &Receipt) -> Option<TicketId> {
    serde_json::from_str::<Commitment>(&r.commitment.payload).ok().map(|c| c.ticket_id)
}

/// `shard=S` after `sep` for the `/v1/ledger/*` endpoints; nothing for shard 0, as before shards.
fn shard_param(sep: &str, shard: u32) -> String {
    if shard == 0 {
        String::new()
    } else {
        format!("{sep}shard={shard}")
    }
}

/// When `epoch` ends (unix ms), estimated from a head's `timestamp_ms` in it: epochs are equal periods
/// counted from 1970, so the length is at most `timestamp / epoch` and the estimate is never early.
fn epoch_end_ms(epoch: u64, timestamp_ms: u64) -> Option<u64> {
    let len = timestamp_ms.checked_div(epoch)?;
    (epoch + 1).checked_mul(len)
}

#[cfg(test)]
mod tests {
    use fog_proto::credits::{payment_chain, SessionId, Ticket, KIND_TICKET};

    use super::*;

    /// A receipt paying `index` chunks of a chain seeded by `seed`, under `ticket`, for `node`.
    fn receipt(ticket: &Signed, node: NodeId, seed: u8, index: u32) -> Vec<u8> {
        let t: Ticket = serde_json::from_str(&ticket.payload).expect("ticket");
        let chain = payment_chain([seed; 32], 8);
        let c = Commitment {
            session: t.session,
            ticket_id: ticket_id(ticket),
            node,
            anchor: chain[0],
            length: 8,
            epoch: t.epoch,
        };
        let client = SigningKey::from_bytes(&[2; 32]);
        let r =
            Receipt { commitment: Signed::sign(&client, KIND_COMMITMENT, &c), index, preimage: chain[index as usize] };
        serde_json::to_vec(&r).expect("json")
    }

    fn open(dir: &std::path::Path, me: NodeId) -> Credits {
        let receipts = Arc::new(ReceiptDb::open(&dir.join("receipts"), &dir.join("store")).expect("receipts"));
        Credits::new(receipts, me, Arc::new(Earnings::open(&dir.join("earnings")).expect("earnings")))
    }

    /// A node keeps the ticket its receipts name (once, and only the one their commitment names), across a
    /// restart, sends it with them, and drops it with the last of them.
    #[test]
    fn tickets_are_kept_with_their_receipts_and_go_with_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me: NodeId = SigningKey::from_bytes(&[3; 32]).verifying_key().into();
        let tracker = SigningKey::from_bytes(&[1; 32]);
        let ticket = |session: u8| {
            let t = Ticket {
                session: SessionId([session; 16]),
                client_key: SigningKey::from_bytes(&[2; 32]).verifying_key().into(),
                content_id: fog_proto::ContentId([0; 32]),
                nodes: vec![me],
                assigned_chunks: vec![8],
                unit: 1,
                byte_budget: 8,
                expiry_ms: 1 << 50,
                epoch: 0,
            };
            Signed::sign(&tracker, KIND_TICKET, &t)
        };
        let (t1, t2) = (ticket(1), ticket(2));
        let wire = |t: &Signed| serde_json::to_vec(t).expect("json");
        let ids: Vec<ChainId>;
        {
            let credits = open(dir.path(), me);
            // Two chains under t1 (the first brings the ticket), one under t2 brought with t1's ticket.
            let (a, b, c) = (receipt(&t1, me, 5, 2), receipt(&t1, me, 6, 1), receipt(&t2, me, 7, 1));
            credits.accept(&a, Some(&wire(&t1)), 64).expect("keep");
            credits.accept(&b, None, 64).expect("keep");
            credits.accept(&c, Some(&wire(&t1)), 64).expect("kept without the ticket it does not name");
            assert_eq!(credits.receipts.ticket_ids(), [ticket_id(&t1)]);
            ids = [&a, &b, &c].map(|r| serde_json::from_slice::<Receipt>(r).expect("receipt").chain_id()).to_vec();
        }
        let credits = open(dir.path(), me);
        let (receipts, tickets) = credits.held_batch();
        assert_eq!(receipts.len(), 3);
        assert_eq!(tickets, std::slice::from_ref(&t1), "each held ticket once, after a restart");
        fog_proto::credits::check_batch(&receipts, &tickets).expect("within the tracker's bounds");
        // t2's chain hands over its ticket later, with an older receipt.
        credits.accept(&receipt(&t2, me, 7, 1), Some(&wire(&t2)), 64).expect("keep");
        assert_eq!(credits.held_batch().1.len(), 2);
        let index = |id: &ChainId| receipts.iter().find(|r| r.chain_id() == *id).expect("held").index;
        credits.settle(&[(ids[0], index(&ids[0])), (ids[2], index(&ids[2]))]);
        assert_eq!(credits.receipts.ticket_ids(), [ticket_id(&t1)], "t1 still names a held receipt");
        credits.settle(&[(ids[1], index(&ids[1]))]);
        assert!(credits.receipts.ticket_ids().is_empty());
        assert_eq!(credits.view().receipts_held, 0);
    }
}
