//! The ledger's conformance suite, run against both stores (PostgreSQL skips, saying why, where it cannot
//! run), and the fenced sequencer's tests on a real PostgreSQL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use fog_proto::credits::{payment_chain, ticket_id, MAX_BATCH};
use fog_testkit::pg::TestPostgres;

use super::*;

/// An epoch boundary (of both lengths the tests use) well after zero: epoch 0 is never sealed.
const START_MS: u64 = 1000 * 24 * 3600 * 1000;
const MINUTE: Duration = Duration::from_secs(60);

/// Makes a fresh, empty store per call.
type NewStore<'a> = &'a mut dyn FnMut() -> Arc<dyn LedgerStore>;

struct Fixture {
    ledger: Ledger,
    clock: Clock,
    client: SigningKey,
    node: NodeId,
    /// Every ticket issued, as the nodes holding their receipts keep them.
    issued: Mutex<Vec<Signed>>,
}

fn fixture(store: Arc<dyn LedgerStore>, epoch_len: Duration) -> Fixture {
    let clock = Clock::manual(START_MS);
    let ledger = Ledger::with_store(store, SigningKey::from_bytes(&[1; 32]), epoch_len, 100, clock.clone());
    let node = SigningKey::from_bytes(&[3; 32]).verifying_key().into();
    Fixture { ledger, clock, client: SigningKey::from_bytes(&[2; 32]), node, issued: Mutex::new(Vec::new()) }
}

/// The tickets of `known` that `batch`'s commitments name, once each: what a node sends with the batch.
fn tickets_for<'a>(batch: &[Receipt], known: impl IntoIterator<Item = &'a Signed>) -> Vec<Signed> {
    let named: Vec<TicketId> = batch
        .iter()
        .filter_map(|r| serde_json::from_str::<Commitment>(&r.commitment.payload).ok())
        .map(|c| c.ticket_id)
        .collect();
    let mut out: Vec<Signed> = Vec::new();
    for t in known {
        let id = ticket_id(t);
        if named.contains(&id) && !out.iter().any(|o| ticket_id(o) == id) {
            out.push(t.clone());
        }
    }
    out
}

/// A receipt for `node` paying `index` chunks of the ticket, from a chain of `length` seeded by `seed`.
fn receipt(client: &SigningKey, (signed, ticket): &(Signed, Ticket), node: NodeId, seed: u8, index: u32) -> Receipt {
    let length = ticket.assigned_chunks.iter().copied().max().unwrap_or(0).max(4);
    let chain = payment_chain([seed; 32], length);
    let c = Commitment {
        session: ticket.session,
        ticket_id: ticket_id(signed),
        node,
        anchor: chain[0],
        length,
        epoch: ticket.epoch,
    };
    Receipt { commitment: Signed::sign(client, KIND_COMMITMENT, &c), index, preimage: chain[index as usize] }
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
        self.issued.lock().expect("issued").push(signed.clone());
        let ticket = signed.open(KIND_TICKET).expect("ticket");
        (signed, ticket)
    }

    fn receipt(&self, ticket: &(Signed, Ticket), index: u32) -> Receipt {
        receipt(&self.client, ticket, self.node, 9, index)
    }

    /// Redeems `batch` for `node` with the issued tickets it names.
    fn redeem_on(&self, ledger: &Ledger, node: NodeId, batch: &[Receipt]) -> Result<Vec<Redeemed>, LedgerError> {
        let tickets = tickets_for(batch, self.issued.lock().expect("issued").iter());
        ledger.redeem(node, batch, &tickets)
    }

    /// The (only) shard's store.
    fn store(&self) -> &dyn LedgerStore {
        self.ledger.store(0).expect("shard 0")
    }

    fn redeem(&self, receipt: Receipt) -> Redeemed {
        self.redeem_on(&self.ledger, self.node, &[receipt]).expect("redeem").remove(0)
    }
}

fn refused(r: &Redeemed, why: Refusal) {
    assert_eq!((r.outcome, r.reason.as_deref()), (Outcome::Rejected, Some(why.to_string().as_str())), "{r:?}");
}

fn head_of(ledger: &Ledger) -> TreeHead {
    head_in(ledger, 0)
}

/// The signed head of `shard`, checked to be the tracker's and to name the shard.
fn head_in(ledger: &Ledger, shard: u32) -> TreeHead {
    let signed = ledger.head(shard).expect("head");
    assert_eq!(signed.node_id, ledger.public_key());
    let head: TreeHead = signed.open(KIND_TREE_HEAD).expect("signed by the tracker");
    assert_eq!(head.shard, shard);
    head
}

/// Every leaf below `head.size` of the head's shard is there and proves its inclusion; `earlier` heads of
/// the shard are consistent with it.
fn check_log(ledger: &Ledger, head: &TreeHead, earlier: &[TreeHead]) {
    let shard = head.shard;
    for index in 0..head.size {
        let leaf = ledger.leaf(shard, index).expect("read");
        let leaf = leaf.unwrap_or_else(|| panic!("leaf {index} of {} in shard {shard} missing", head.size));
        let proof: Vec<Hash> = ledger.inclusion(shard, index, head.size).expect("proof").iter().map(|d| d.0).collect();
        assert!(merkle::verify_inclusion(&leaf.bytes(), index, head.size, &proof, &head.root.0), "leaf {index}");
    }
    for old in earlier {
        assert_eq!(old.shard, shard, "consistency is between heads of one shard");
        let proof: Vec<Hash> =
            ledger.consistency(shard, old.size, head.size).expect("proof").iter().map(|d| d.0).collect();
        assert!(
            merkle::verify_consistency(old.size, head.size, &proof, &old.root.0, &head.root.0),
            "the head of size {} is not consistent with the one of size {}",
            old.size,
            head.size
        );
    }
}

// The conformance suite: each case gets fresh stores from `new`.

fn receipts_are_redeemable_in_their_tickets_epoch_and_the_next_only(new: NewStore) {
    let f = fixture(new(), MINUTE);
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

fn tickets_expire_after_their_lifetime_and_one_epoch_of_grace(new: NewStore) {
    let day = Duration::from_secs(24 * 3600);
    let f = fixture(new(), day);
    let ticket = f.issue();
    f.clock.advance(f.ledger.ticket_ttl + day);
    assert_eq!(f.redeem(f.receipt(&ticket, 1)).outcome, Outcome::Credited, "expired at the last moment of grace");
    f.clock.advance(Duration::from_millis(1));
    refused(&f.redeem(f.receipt(&ticket, 2)), Refusal::Expired);
}

fn each_finished_epoch_is_sealed_by_a_signed_head(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let epoch = f.ledger.epoch();
    f.ledger.seal_epochs().expect("seal");
    let ticket = f.issue();
    assert_eq!(f.redeem(f.receipt(&ticket, 2)).outcome, Outcome::Credited);
    f.ledger.seal_epochs().expect("seal");
    assert!(f.ledger.epoch_head(0, epoch).expect("read").is_none(), "sealed before the epoch ended");
    f.clock.advance(MINUTE);
    f.ledger.seal_epochs().expect("seal");
    let head = f.ledger.epoch_head(0, epoch).expect("read").expect("the finished epoch is sealed");
    let head: TreeHead = head.open(KIND_TREE_HEAD).expect("signed by the tracker");
    assert_eq!((head.size, head.timestamp_ms), (1, f.clock.now_ms()));
    let leaf = f.ledger.leaf(0, 0).expect("read").expect("leaf");
    assert!(merkle::verify_inclusion(&leaf.bytes(), 0, 1, &[], &head.root.0));
}

fn expired_tickets_are_pruned_and_live_ones_kept(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let (a, b) = (f.issue(), f.issue());
    assert_eq!(f.redeem(f.receipt(&a, 1)).outcome, Outcome::Credited);
    assert_eq!(f.ledger.prune_expired(0, f.clock.now_ms()).expect("prune"), 0, "live tickets were dropped");
    f.clock.advance(f.ledger.ticket_ttl + 3 * MINUTE);
    // Only a ticket with receipts redeemed left state behind (issuing stores nothing).
    assert_eq!(f.ledger.prune_expired(0, f.clock.now_ms()).expect("prune"), 1);
    for (_, t) in [&a, &b] {
        assert!(f.store().ticket(&t.session).expect("get").is_none());
        assert_eq!(f.store().ticket_used(&t.session).expect("get"), 0);
        assert!(f.store().chain(&t.session, &f.node).expect("get").is_none());
    }
    assert_eq!(f.ledger.credited(&f.node).expect("credit"), 1, "pruning tickets forgot credit");
}

/// Credits, caps, duplicates and refusals across tickets and nodes; totals, statements and proofs.
fn credits_totals_statements_and_proofs_agree(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let other: NodeId = SigningKey::from_bytes(&[4; 32]).verifying_key().into();
    let client_key: NodeId = f.client.verifying_key().into();
    let issue = |budget: u64| {
        let signed = f
            .ledger
            .issue_ticket(None, client_key, ContentId([0; 32]), vec![f.node, other], vec![3, 3], 100, budget)
            .expect("issue")
            .expect("a ticket");
        let ticket: Ticket = signed.open(KIND_TICKET).expect("ticket");
        (signed, ticket)
    };
    let (t1, t2) = (issue(600), issue(400));
    let mut heads = vec![head_of(&f.ledger)];
    // One batch: t1 pays 2 chunks, then 3 (one more), t2 pays 3 for f.node, and a forged receipt.
    let mut forged = receipt(&f.client, &t1, f.node, 7, 1);
    forged.preimage = Digest([0; 32]);
    let batch = [
        receipt(&f.client, &t1, f.node, 5, 2),
        receipt(&f.client, &t1, f.node, 5, 3),
        receipt(&f.client, &t2, f.node, 6, 3),
        forged,
        receipt(&f.client, &t1, other, 8, 1),
    ];
    let redeem = |node: NodeId, batch: &[Receipt]| f.ledger.redeem(node, batch, &tickets_for(batch, [&t1.0, &t2.0]));
    let results = redeem(f.node, &batch).expect("redeem");
    let outcomes: Vec<_> = results.iter().map(|r| (r.outcome, r.credited_bytes, r.leaf_index)).collect();
    assert_eq!(
        outcomes,
        [
            (Outcome::Credited, 200, Some(0)),
            (Outcome::Credited, 100, Some(1)),
            (Outcome::Credited, 300, Some(2)),
            (Outcome::Rejected, 0, None),
            (Outcome::Rejected, 0, None),
        ]
    );
    refused(&results[3], Refusal::BadChain);
    refused(&results[4], Refusal::NotYours);
    heads.push(head_of(&f.ledger));
    // The other node: t2's budget has 100 bytes left for it, though its assignment allows 300.
    let results = redeem(other, &[receipt(&f.client, &t2, other, 8, 3)]).expect("redeem");
    assert_eq!(
        (results[0].outcome, results[0].credited_bytes, results[0].leaf_index),
        (Outcome::Credited, 100, Some(3))
    );
    assert!(results[0].reason.is_some(), "a capped credit says so");
    let results = redeem(f.node, &[receipt(&f.client, &t1, f.node, 5, 3)]).expect("redeem");
    assert_eq!(results[0].outcome, Outcome::Duplicate);
    let head = head_of(&f.ledger);
    assert_eq!(head.size, 4);
    check_log(&f.ledger, &head, &heads);
    assert_eq!(f.ledger.credited(&f.node).expect("credit"), 600);
    assert_eq!(f.ledger.credited(&other).expect("credit"), 100);
    let epoch = f.ledger.epoch();
    let mut all = f.ledger.all_credits().expect("all");
    all.sort_by_key(|c| c.node_id);
    let mut expected = vec![
        NodeCredits { node_id: f.node, credited_bytes: 600, epochs: vec![EpochLine { epoch, credited_bytes: 600 }] },
        NodeCredits { node_id: other, credited_bytes: 100, epochs: vec![EpochLine { epoch, credited_bytes: 100 }] },
    ];
    expected.sort_by_key(|c| c.node_id);
    assert_eq!(all, expected);
    let statement = f.ledger.statement(&f.node, 2).expect("statement");
    let indices: Vec<u64> = statement.records.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [2, 1], "newest first, at most as many as asked");
    let reasons: Vec<_> = statement.rejected.iter().map(|r| r.reason.clone()).collect();
    assert_eq!(reasons, [Refusal::NotYours.to_string(), Refusal::BadChain.to_string()], "newest first");
    let records = f.ledger.records(0, &[3, 0, 9], head.size).expect("records");
    assert_eq!(records.iter().map(|r| r.index).collect::<Vec<_>>(), [3, 0], "beyond the tree is left out");
    for r in records {
        let proof: Vec<Hash> = r.proof.iter().map(|d| d.0).collect();
        assert!(merkle::verify_inclusion(&r.leaf.bytes(), r.index, head.size, &proof, &head.root.0));
    }
}

/// A node's statement keeps its newest rejections only.
fn rejections_are_kept_bounded(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let mut bad = f.receipt(&f.issue(), 1);
    bad.preimage = Digest([0; 32]);
    let batch: Vec<Receipt> = (0..REJECTIONS_KEPT + 5).map(|_| bad.clone()).collect();
    f.redeem_on(&f.ledger, f.node, &batch).expect("redeem");
    f.redeem_on(&f.ledger, f.node, &batch[..3]).expect("redeem");
    let statement = f.ledger.statement(&f.node, 10).expect("statement");
    assert_eq!(statement.rejected.len() as u64, REJECTIONS_KEPT);
    assert_eq!(f.store().rejected_seq(&f.node).expect("seq"), REJECTIONS_KEPT + 8);
    assert_eq!(f.ledger.size(0).expect("size"), 0);
}

/// A ticket is stored nowhere: the batch carries it, and a receipt credits against it.
fn stateless_tickets_redeem_with_nothing_stored_at_issue(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let ticket = f.issue();
    assert!(f.store().ticket(&ticket.1.session).expect("read").is_none(), "issuing stored the ticket");
    assert_eq!(f.store().ticket_used(&ticket.1.session).expect("read"), 0);
    assert_eq!(f.ledger.size(0).expect("size"), 0);
    let r = f.redeem(f.receipt(&ticket, 2));
    assert_eq!((r.outcome, r.credited_bytes, r.leaf_index), (Outcome::Credited, 2, Some(0)), "{r:?}");
    assert!(f.store().ticket(&ticket.1.session).expect("read").is_none(), "redeeming stored the ticket");
    assert_eq!(f.store().ticket_used(&ticket.1.session).expect("read"), 2);
    // Without its ticket, nothing says the session was issued.
    let r = &f.ledger.redeem(f.node, &[f.receipt(&ticket, 3)], &[]).expect("redeem")[0];
    refused(r, Refusal::NoTicket);
}

/// A batch's tickets must be this tracker's and the ones the commitments name; batches out of bounds are
/// refused whole.
fn batch_tickets_are_checked(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let good = f.issue();
    // Signed by another key, with a valid signature.
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let forged = Signed::sign(&stranger, KIND_TICKET, &good.1);
    let r = receipt(&f.client, &(forged.clone(), good.1.clone()), f.node, 9, 1);
    refused(&f.ledger.redeem(f.node, &[r], &[forged]).expect("redeem")[0], Refusal::ForgedTicket);
    // This tracker's name on a ticket it did not sign.
    let mut tampered = good.0.clone();
    tampered.payload = tampered.payload.replace("\"byte_budget\":4", "\"byte_budget\":4000");
    let r = receipt(&f.client, &(tampered.clone(), good.1.clone()), f.node, 9, 1);
    refused(&f.ledger.redeem(f.node, &[r], &[tampered]).expect("redeem")[0], Refusal::ForgedTicket);
    // A commitment naming another ticket than the one its session's ticket is.
    let other = f.issue();
    let mut c: Commitment = f.receipt(&good, 1).commitment.open(KIND_COMMITMENT).expect("commitment");
    c.ticket_id = ticket_id(&other.0);
    let chain = payment_chain([9; 32], c.length);
    let wrong = Receipt { commitment: Signed::sign(&f.client, KIND_COMMITMENT, &c), index: 1, preimage: chain[1] };
    let r = &f.ledger.redeem(f.node, std::slice::from_ref(&wrong), std::slice::from_ref(&other.0)).expect("redeem")[0];
    refused(r, Refusal::WrongSession);
    c.ticket_id = TicketId([7; 32]);
    let unknown = Receipt { commitment: Signed::sign(&f.client, KIND_COMMITMENT, &c), index: 1, preimage: chain[1] };
    let batch = [unknown, f.receipt(&good, 1)];
    let results = f.ledger.redeem(f.node, &batch, std::slice::from_ref(&good.0)).expect("redeem");
    refused(&results[0], Refusal::OtherTicket);
    assert_eq!(results[1].outcome, Outcome::Credited, "{:?}", results[1]);
    // Past its epochs, though carried (`tickets_expire_after_…` checks the expiry itself).
    f.clock.advance(f.ledger.ticket_ttl + MINUTE * 3);
    refused(&f.redeem(f.receipt(&good, 2)), Refusal::WrongEpoch);

    // Out of bounds: the whole batch is refused, saying why, and nothing is written.
    let size = f.ledger.size(0).expect("size");
    let fresh = f.issue();
    let one = [f.receipt(&fresh, 1)];
    let refusal = |receipts: &[Receipt], tickets: &[Signed]| match f.ledger.redeem(f.node, receipts, tickets) {
        Err(LedgerError::Batch(e)) => {
            assert!(!LedgerError::Batch(e.clone()).is_retryable());
            e
        }
        other => panic!("an out-of-bounds batch was taken: {other:?}"),
    };
    let e = refusal(&one, &[fresh.0.clone(), good.0.clone()]);
    assert!(matches!(e, BatchError::TooManyTickets { tickets: 2, receipts: 1 }), "{e}");
    let two = [f.receipt(&fresh, 1), f.receipt(&fresh, 2)];
    let e = refusal(&two, &[fresh.0.clone(), fresh.0.clone()]);
    assert!(matches!(e, BatchError::DuplicateTicket { index: 1 }), "{e}");
    let e = refusal(&two, std::slice::from_ref(&good.0));
    assert!(matches!(e, BatchError::UnnamedTicket { index: 0 }), "{e}");
    let mut long = fresh.0.clone();
    long.payload.push_str(&" ".repeat(fog_proto::wire::MAX_TICKET_LEN));
    let e = refusal(&one, &[long]);
    assert!(e.to_string().contains("at most 4096"), "{e}");
    let many: Vec<Receipt> = (0..=MAX_BATCH).map(|_| one[0].clone()).collect();
    let e = refusal(&many, std::slice::from_ref(&fresh.0));
    assert_eq!(e, BatchError::TooManyReceipts(MAX_BATCH + 1));
    assert_eq!(f.ledger.size(0).expect("size"), size);
    assert_eq!(f.store().ticket_used(&fresh.1.session).expect("read"), 0);
}

/// A ticket's budget is kept with its spending, across batches and nodes, and across a prune that keeps
/// it; once pruned, its receipts are refused before that state would be read.
fn budget_holds_across_batches_and_a_prune(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let other: NodeId = SigningKey::from_bytes(&[4; 32]).verifying_key().into();
    let client_key: NodeId = f.client.verifying_key().into();
    let signed = f
        .ledger
        .issue_ticket(None, client_key, ContentId([0; 32]), vec![f.node, other], vec![4, 4], 1, 5)
        .expect("issue")
        .expect("a ticket");
    f.issued.lock().expect("issued").push(signed.clone());
    let t = (signed.clone(), signed.open::<Ticket>(KIND_TICKET).expect("ticket"));
    let paid = |node: NodeId, index: u32| {
        let r = f.redeem_on(&f.ledger, node, &[receipt(&f.client, &t, node, 5, index)]).expect("redeem");
        (r[0].outcome, r[0].credited_bytes)
    };
    assert_eq!(paid(f.node, 3), (Outcome::Credited, 3));
    f.clock.advance(MINUTE);
    assert_eq!(f.ledger.prune_expired(0, f.clock.now_ms()).expect("prune"), 0);
    assert_eq!(paid(other, 4), (Outcome::Credited, 2), "the budget's rest, across the prune");
    assert_eq!(paid(f.node, 4).1, 0, "the budget is used up");
    assert_eq!(f.store().ticket_used(&t.1.session).expect("read"), 5);
    f.clock.advance(f.ledger.ticket_ttl + 3 * MINUTE);
    assert_eq!(f.ledger.prune_expired(0, f.clock.now_ms()).expect("prune"), 1);
    assert_eq!(f.store().ticket_used(&t.1.session).expect("read"), 0);
    assert!(f.store().chain(&t.1.session, &f.node).expect("read").is_none());
    assert!(f.store().chain(&t.1.session, &other).expect("read").is_none());
    let r = f.redeem_on(&f.ledger, other, &[receipt(&f.client, &t, other, 6, 4)]).expect("redeem");
    refused(&r[0], Refusal::WrongEpoch);
    assert_eq!(f.ledger.credited(&f.node).expect("credit") + f.ledger.credited(&other).expect("credit"), 5);
}

/// Receipts under a ticket an older tracker stored at issue still redeem without it in the batch, and the
/// stored ticket is forgotten once it expired.
fn tickets_stored_by_older_trackers_still_redeem(new: NewStore) {
    let f = fixture(new(), MINUTE);
    let (signed, ticket) = f.issue();
    f.store().put_ticket(&StoredTicket { signed: signed.clone(), ticket: ticket.clone() }).expect("store");
    let t = (signed, ticket);
    let r = &f.ledger.redeem(f.node, &[f.receipt(&t, 1)], &[]).expect("redeem")[0];
    assert_eq!((r.outcome, r.credited_bytes), (Outcome::Credited, 1), "{r:?}");
    // A newer node sends the ticket too: the same chain goes on.
    assert_eq!(f.redeem(f.receipt(&t, 3)).credited_bytes, 2);
    assert_eq!(f.store().ticket_used(&t.1.session).expect("read"), 3);
    f.clock.advance(f.ledger.ticket_ttl + 3 * MINUTE);
    assert_eq!(f.ledger.prune_expired(0, f.clock.now_ms()).expect("prune"), 1);
    assert!(f.store().ticket(&t.1.session).expect("read").is_none());
    assert_eq!(f.store().ticket_used(&t.1.session).expect("read"), 0);
    assert!(f.store().chain(&t.1.session, &f.node).expect("read").is_none());
}

fn conformance(new: NewStore) {
    stateless_tickets_redeem_with_nothing_stored_at_issue(new);
    batch_tickets_are_checked(new);
    budget_holds_across_batches_and_a_prune(new);
    tickets_stored_by_older_trackers_still_redeem(new);
    receipts_are_redeemable_in_their_tickets_epoch_and_the_next_only(new);
    tickets_expire_after_their_lifetime_and_one_epoch_of_grace(new);
    each_finished_epoch_is_sealed_by_a_signed_head(new);
    expired_tickets_are_pruned_and_live_ones_kept(new);
    credits_totals_statements_and_proofs_agree(new);
    rejections_are_kept_bounded(new);
}

#[test]
fn conformance_rocksdb() {
    let dirs = Mutex::new(Vec::new());
    conformance(&mut || {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Db::open(dir.path()).expect("db"));
        dirs.lock().expect("dirs").push(dir);
        Arc::new(RocksStore::new(db))
    });
}

/// The embedded ledger writes the keys and values every earlier tracker wrote, so existing ledgers stay
/// readable and what a tracker writes now an older one reads; but for a ticket's spending, which carries
/// the ticket's expiry and epoch after the bytes since tickets are not stored (an older tracker, which
/// would need the stored ticket, cannot redeem those receipts anyway).
#[test]
fn rocksdb_format_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(Db::open(dir.path()).expect("db"));
    let f = fixture(Arc::new(RocksStore::new(db.clone())), MINUTE);
    let ticket = f.issue();
    assert_eq!(f.redeem(f.receipt(&ticket, 2)).outcome, Outcome::Credited);
    let get = |cf: &str, key: &[u8]| db.raw().get_cf(db.cf(cf), key).expect("read").expect("written");
    let session = ticket.1.session.to_hex();
    let leaf = LedgerLeaf {
        epoch: f.ledger.epoch(),
        node: f.node,
        session: ticket.1.session,
        chain_index: 2,
        credited_bytes: 2,
    };
    assert_eq!(get("ledger_meta", b"size"), 1u64.to_be_bytes());
    assert_eq!(get("ledger_leaves", &0u64.to_be_bytes()), leaf.bytes());
    assert_eq!(get("ledger_tree", &[0u8; 12]), merkle::leaf_hash(&leaf.bytes()));
    let chain_key = [session.as_bytes(), b"/", f.node.as_bytes()].concat();
    assert_eq!(get("credit_chains", &chain_key), br#"{"index":2,"credited":2}"#);
    let used = [2u64, ticket.1.expiry_ms, ticket.1.epoch].map(u64::to_be_bytes).concat();
    assert_eq!(get("credit_ticket_used", session.as_bytes()), used);
    let node_epoch = [f.node.as_bytes().as_slice(), &f.ledger.epoch().to_be_bytes()].concat();
    assert_eq!(get("credit_node_epochs", &node_epoch), 2u64.to_be_bytes());
    assert!(db.raw().get_cf(db.cf("credit_tickets"), session.as_bytes()).expect("read").is_none());
    assert_eq!(get("ledger_meta", &[b"rejseq/".as_slice(), f.node.as_bytes()].concat()), 0u64.to_be_bytes());
    // A ticket an older tracker stored, and the spending it wrote: read as they were written.
    let old = f.issue();
    f.store().put_ticket(&StoredTicket { signed: old.0.clone(), ticket: old.1.clone() }).expect("store");
    let stored: serde_json::Value =
        serde_json::from_slice(&get("credit_tickets", old.1.session.to_hex().as_bytes())).expect("json");
    assert_eq!(stored["signed"], serde_json::to_value(&old.0).expect("json"));
    db.raw().put_cf(db.cf("credit_ticket_used"), old.1.session.to_hex(), 1u64.to_be_bytes()).expect("put");
    assert_eq!(f.store().ticket_used(&old.1.session).expect("read"), 1);
    let r = &f.ledger.redeem(f.node, &[f.receipt(&old, 3)], &[]).expect("redeem")[0];
    assert_eq!((r.outcome, r.credited_bytes), (Outcome::Credited, 3), "{r:?}");
}

/// A PostgreSQL server for this test, or `None` (the test skips, saying why).
fn postgres() -> Option<TestPostgres> {
    if let Some(why) = TestPostgres::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(TestPostgres::start())
}

/// A store in a fresh database of `pg`.
fn pg_store(pg: &TestPostgres, db: &str, lease: Duration) -> Arc<PgStore> {
    pg.create_database(db);
    Arc::new(PgStore::connect(&pg.conn_str_db(db), &format!("http://{db}.test"), lease).expect("connect"))
}

#[test]
fn conformance_postgres() {
    let Some(pg) = postgres() else { return };
    let mut n = 0;
    conformance(&mut || {
        n += 1;
        pg_store(&pg, &format!("conformance{n}"), LEASE)
    });
}

/// The embedded ledger, copied into PostgreSQL, keeps its leaves, indices and roots: the heads nodes
/// verified still verify, and redemption goes on where it left off.
#[test]
fn export_keeps_indices_and_roots() {
    let Some(pg) = postgres() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(Db::open(dir.path()).expect("db"));
    let f = fixture(Arc::new(RocksStore::new(db.clone())), MINUTE);
    let tickets: Vec<_> = (0..5).map(|_| f.issue()).collect();
    // One of them stored, as an older tracker did.
    let (signed, ticket) = tickets[4].clone();
    f.store().put_ticket(&StoredTicket { signed, ticket }).expect("store");
    for t in &tickets {
        f.redeem(f.receipt(t, 2));
    }
    let mut bad = f.receipt(&tickets[0], 1);
    bad.preimage = Digest([0; 32]);
    f.redeem(bad);
    f.clock.advance(MINUTE);
    f.ledger.seal_epochs().expect("seal");
    let before = head_of(&f.ledger);
    let sealed = f.ledger.epoch_head(0, f.ledger.epoch() - 1).expect("read").expect("sealed");
    pg.create_database("exported");
    let stats = export_to_postgres(db.clone(), &pg.conn_str_db("exported")).expect("export");
    assert_eq!((stats.size, stats.leaves, stats.heads, stats.tickets), (5, 5, 1, 1));
    assert_eq!(stats.root, before.root);
    let again = export_to_postgres(db.clone(), &pg.conn_str_db("exported")).expect("export again");
    assert_eq!((again.copied, again.size, again.root), (false, 5, before.root), "an export run again copies nothing");

    // A replica on the copy: the export released its lease, so the replica appends at once.
    let store = Arc::new(PgStore::connect(&pg.conn_str_db("exported"), "http://replica.test", LEASE).expect("connect"));
    let copy = Ledger::with_store(store, SigningKey::from_bytes(&[1; 32]), MINUTE, 100, f.clock.clone());
    let after = head_of(&copy);
    assert_eq!((after.size, after.root), (before.size, before.root));
    assert_eq!(copy.epoch_head(0, f.ledger.epoch() - 1).expect("read"), Some(sealed));
    assert_eq!(copy.statement(&f.node, 10).expect("statement").rejected.len(), 1);
    check_log(&copy, &after, &[]);
    // Receipts of the same tickets go on: a duplicate stays a duplicate, more chunks credit more, up to the
    // budget kept with the spending; the stored ticket is there too.
    let batch = [f.receipt(&tickets[0], 2), f.receipt(&tickets[1], 3), f.receipt(&tickets[2], 4)];
    let results = f.redeem_on(&copy, f.node, &batch).expect("redeem on the copy");
    let stored = copy.redeem(f.node, &[f.receipt(&tickets[4], 3)], &[]).expect("redeem on the copy");
    assert_eq!(
        results.iter().chain(&stored).map(|r| (r.outcome, r.leaf_index)).collect::<Vec<_>>(),
        [
            (Outcome::Duplicate, None),
            (Outcome::Credited, Some(5)),
            (Outcome::Credited, Some(6)),
            (Outcome::Credited, Some(7))
        ]
    );
    let grown = head_of(&copy);
    check_log(&copy, &grown, &[before]);
    assert_eq!(copy.credited(&f.node).expect("credit"), 14);
    // The copied spending forgets its tickets by their expiry, as the stored ticket forgets its own.
    let later = f.clock.now_ms() + (f.ledger.ticket_ttl + 3 * MINUTE).as_millis() as u64;
    assert_eq!(copy.prune_expired(0, later).expect("prune"), 5);
    // The database's ledger has moved on: exporting the old one over it is refused.
    let refused = export_to_postgres(db, &pg.conn_str_db("exported"));
    assert!(matches!(refused, Err(LedgerError::NotEmpty { size: 8 })), "{refused:?}");
}

/// Two replicas' ledgers on one database, with a short lease.
fn replica(store: &Arc<PgStore>, clock: &Clock) -> Ledger {
    Ledger::with_store(store.clone(), SigningKey::from_bytes(&[1; 32]), Duration::from_secs(3600), 100, clock.clone())
}

#[test]
fn a_stale_sequencer_writes_nothing_and_the_next_continues_the_log() {
    let Some(pg) = postgres() else { return };
    // Long enough for the steps between a takeover and the checks that no other replica took over.
    let lease = Duration::from_secs(2);
    let a = pg_store(&pg, "fenced", lease);
    let b = Arc::new(PgStore::connect(&pg.conn_str_db("fenced"), "http://b.test", lease).expect("connect"));
    let clock = Clock::manual(START_MS);
    let (la, lb) = (replica(&a, &clock), replica(&b, &clock));
    let f = fixture(a.clone(), Duration::from_secs(3600));
    let tickets: Vec<_> = (0..4).map(|_| f.issue()).collect();
    let r = f.redeem_on(&la, f.node, &[f.receipt(&tickets[0], 1), f.receipt(&tickets[1], 2)]).expect("redeem");
    assert_eq!(r.iter().map(|r| r.leaf_index).collect::<Vec<_>>(), [Some(0), Some(1)]);
    let first = head_of(&la);
    let stale = a.sequence().expect("a holds the lease");
    match f.redeem_on(&lb, f.node, &[f.receipt(&tickets[2], 1)]) {
        Err(LedgerError::NotSequencer { holder_url }) => assert_eq!(holder_url, "http://fenced.test"),
        other => panic!("a replica appended while another held the lease: {other:?}"),
    }
    std::thread::sleep(lease * 2);
    let r = f.redeem_on(&lb, f.node, &[f.receipt(&tickets[2], 1)]).expect("b takes the expired lease");
    assert_eq!(r[0].leaf_index, Some(2), "the new sequencer continues the log where it was");
    let token = b.sequence().expect("b holds the lease");
    assert_eq!(token, stale + 1);
    let (ma, mb) = (a.metrics(), b.metrics());
    assert_eq!((ma.sequencer(0).get(), mb.sequencer(0).get()), (0, 1), "a's lease ran out; b's is fresh");
    assert_eq!((ma.takeovers(0).get(), mb.takeovers(0).get()), (0, 1), "the first lease is nobody's takeover");

    // The old sequencer, still believing its lease (a pause), appends what it read before: fenced.
    let leaf = LedgerLeaf { epoch: 0, node: f.node, session: tickets[3].1.session, chain_index: 1, credited_bytes: 1 };
    let forged = Append {
        leaves: vec![(3, leaf.bytes())],
        subtrees: vec![(0, 3, merkle::leaf_hash(&leaf.bytes()))],
        node_epoch: Some((0, 1)),
        ..Append::new(f.node, stale, 3)
    };
    assert!(matches!(a.commit(&forged), Err(LedgerError::Fenced { token }) if token == stale));
    // The current token with a stale view of the log is refused too.
    let behind = Append { token, base_size: 2, ..forged.clone() };
    assert!(matches!(b.commit(&behind), Err(LedgerError::Fenced { .. })));
    assert_eq!(b.size().expect("size"), 3);
    assert!(b.leaf(3).expect("read").is_none());
    assert!(b.subtree(0, 3).expect("read").is_none());
    assert_eq!(b.node_epoch(&f.node, 0).expect("read"), 0);
    // A stale seal is fenced the same way.
    assert!(matches!(a.seal(stale, 7, &la.head(0).expect("head")), Err(LedgerError::Fenced { .. })));
    assert!(b.epoch_head(7).expect("read").is_none());
    assert_eq!(ma.fenced(0).get(), 2, "the stale append and the stale seal");
    // The old sequencer's ledger now defers to the new one, and its reads see the new log.
    let late = f.redeem_on(&la, f.node, &[f.receipt(&tickets[3], 1)]);
    assert!(matches!(late, Err(LedgerError::NotSequencer { .. })), "{late:?}");
    let head = head_of(&la);
    assert_eq!(head.size, 3);
    check_log(&lb, &head, &[first]);
    assert_eq!(lb.credited(&f.node).expect("credit"), 4);
}

/// One client session's receipts, as a node holds them: the newest per chain, until acknowledged.
struct Chain {
    ticket: (Signed, Ticket),
    client: SigningKey,
    node: NodeId,
    seed: u8,
    /// Chunks delivered so far (the newest receipt's index) and acknowledged.
    delivered: u32,
    acknowledged: u32,
}

/// Two replicas redeem a stream of receipts on one database while the sequencer is killed again and again
/// (its client cut off mid-transaction, as a SIGKILL would) and restarted: every byte is credited exactly
/// once, leaf indices are contiguous, every acknowledged credit is in the log, and the heads seen before
/// each takeover are consistent with the last.
#[test]
fn killing_the_sequencer_during_redemptions_loses_nothing() {
    let Some(pg) = postgres() else { return };
    kill_sequencers_while_redeeming(&pg, "killed", 1, 2);
}

/// The same with three shards and three replicas dividing them (each tends its shards, as the sealer
/// does): every shard's log is contiguous and consistent across the kills, and the totals exact.
#[test]
fn killing_sequencers_of_a_sharded_ledger_loses_nothing() {
    let Some(pg) = postgres() else { return };
    kill_sequencers_while_redeeming(&pg, "killed_sharded", 3, 3);
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A replica of the kill tests: its shards' stores and its ledger.
type Replica = (Vec<Arc<PgStore>>, Arc<Ledger>);

fn kill_sequencers_while_redeeming(pg: &TestPostgres, db: &str, shards: u32, replica_count: usize) {
    const CHUNKS: u32 = 32;
    const UNIT: u32 = 1000;
    const KILLS: usize = 5;
    let lease = Duration::from_millis(300);
    let clock = Clock::manual(START_MS);
    pg.create_database(db);
    let conn = pg.conn_str_db(db);
    let start = |n: usize| -> Replica {
        let stores =
            PgStore::connect_shards(&conn, &format!("http://replica{n}.test"), lease, shards).expect("connect");
        let dyns = stores.iter().map(|s| s.clone() as Arc<dyn LedgerStore>).collect();
        let key = SigningKey::from_bytes(&[1; 32]);
        (stores, Arc::new(Ledger::with_shards(dyns, key, Duration::from_secs(3600), 100, clock.clone())))
    };
    let replicas = Mutex::new((0..replica_count).map(start).collect::<Vec<_>>());
    let ids: Vec<NodeId> = (0..3u8).map(|n| SigningKey::from_bytes(&[40 + n; 32]).verifying_key().into()).collect();
    let issuer = replicas.lock().expect("replicas")[0].1.clone();
    let mut chains: Vec<Chain> = Vec::new();
    // At least 12 sessions, and at least two in every shard.
    let covered = |chains: &[Chain]| {
        (0..shards).all(|shard| {
            let sessions = chains.iter().filter(|c| shard_of(&c.ticket.1.session, shards) == shard);
            sessions.count() >= 2 * ids.len()
        })
    };
    for s in 0..=u8::MAX {
        if s >= 12 && covered(&chains) {
            break;
        }
        let client = SigningKey::from_bytes(&[s; 32]);
        let signed = issuer
            .issue_ticket(
                None,
                client.verifying_key().into(),
                ContentId([s; 32]),
                ids.clone(),
                vec![CHUNKS; ids.len()],
                UNIT,
                u64::from(CHUNKS * UNIT) * ids.len() as u64,
            )
            .expect("issue")
            .expect("a ticket");
        let ticket: Ticket = signed.open(KIND_TICKET).expect("ticket");
        for (n, node) in ids.iter().enumerate() {
            let seed = s.wrapping_mul(3).wrapping_add(n as u8);
            chains.push(Chain {
                ticket: (signed.clone(), ticket.clone()),
                client: client.clone(),
                node: *node,
                seed,
                delivered: 0,
                acknowledged: 0,
            });
        }
    }
    assert!(covered(&chains), "sessions in every shard");

    let done = AtomicBool::new(false);
    let kills = std::thread::scope(|scope| {
        // The helpers stop however this ends (a failed assertion too: the scope waits for them).
        let _stop = StopOnDrop(&done);
        // With shards, every replica tends its own, as the sealer does: replicas divide the leases.
        if shards > 1 {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let ledgers: Vec<_> = replicas.lock().expect("replicas").iter().map(|r| r.1.clone()).collect();
                    for ledger in ledgers {
                        // A killed replica's client fails: it is replaced meanwhile.
                        let _ = ledger.seal_epochs();
                    }
                    std::thread::sleep(lease / 4);
                }
            });
        }
        // The killer: every so often cuts off a replica holding a lease, and starts a new one.
        let killer = scope.spawn(|| {
            let mut kills = 0;
            let mut next = replica_count;
            while kills < KILLS && !done.load(Ordering::Relaxed) {
                std::thread::sleep(lease * 2);
                let holder = replicas
                    .lock()
                    .expect("replicas")
                    .iter()
                    .position(|(stores, _)| stores.iter().any(|s| s.holds_lease()));
                let Some(slot) = holder else { continue };
                let (stores, ledger) = replicas.lock().expect("replicas")[slot].clone();
                // Preferably while a node's redemption runs on it (the node holds its own reference).
                let busy = Instant::now() + lease;
                while Arc::strong_count(&ledger) < 3 && Instant::now() < busy {
                    std::thread::sleep(Duration::from_millis(1));
                }
                stores[0].kill();
                replicas.lock().expect("replicas")[slot] = start(next);
                next += 1;
                kills += 1;
            }
            kills
        });
        // The nodes: clients deliver a chunk at a time on every chain; each node redeems its newest
        // receipts in batches at the replicas in turn, keeping them until acknowledged (a replica answers
        // for the shards it sequences only).
        let mut acknowledged: HashMap<(u32, u64), LedgerLeaf> = HashMap::new();
        let mut heads: HashMap<u32, Vec<TreeHead>> = HashMap::new();
        let mut pending: VecDeque<usize> = VecDeque::new();
        // Each node goes to the replicas in turn, starting at its own.
        let mut turns: HashMap<NodeId, usize> = ids.iter().enumerate().map(|(n, id)| (*id, n)).collect();
        let mut refusals: HashMap<String, usize> = HashMap::new();
        let stop = Instant::now() + Duration::from_secs(120);
        loop {
            for (i, c) in chains.iter_mut().enumerate() {
                if c.delivered < CHUNKS {
                    c.delivered += 1;
                    if !pending.contains(&i) {
                        pending.push_back(i);
                    }
                }
            }
            for node in &ids {
                let mine: Vec<usize> = pending.iter().copied().filter(|&i| chains[i].node == *node).take(16).collect();
                if mine.is_empty() {
                    continue;
                }
                let batch: Vec<Receipt> = mine
                    .iter()
                    .map(|&i| {
                        let c = &chains[i];
                        receipt(&c.client, &c.ticket, c.node, c.seed, c.delivered)
                    })
                    .collect();
                let turn = turns.get_mut(node).expect("a node of the test");
                *turn += 1;
                let ledger = {
                    let replicas = replicas.lock().expect("replicas");
                    replicas[*turn % replicas.len()].1.clone()
                };
                let tickets = tickets_for(&batch, mine.iter().map(|&i| &chains[i].ticket.0));
                match ledger.redeem(*node, &batch, &tickets) {
                    Ok(results) => {
                        let mut answered = std::collections::BTreeSet::new();
                        for r in &results {
                            assert_ne!(r.outcome, Outcome::Rejected, "{r:?}");
                            let j = batch
                                .iter()
                                .position(|sent| sent.chain_id() == r.chain_id && sent.index == r.index)
                                .expect("an answer for a receipt of the batch");
                            let (i, sent) = (mine[j], &batch[j]);
                            let session = chains[i].ticket.1.session;
                            assert_eq!(r.shard, shard_of(&session, shards), "{r:?}");
                            if let Some(index) = r.leaf_index {
                                let leaf = LedgerLeaf {
                                    epoch: clock.now_ms() / 3_600_000,
                                    node: *node,
                                    session,
                                    chain_index: sent.index,
                                    credited_bytes: r.credited_bytes,
                                };
                                let fresh = acknowledged.insert((r.shard, index), leaf).is_none();
                                assert!(fresh, "leaf {index} of shard {} acknowledged twice", r.shard);
                            }
                            answered.insert(r.shard);
                            chains[i].acknowledged = sent.index;
                            if chains[i].acknowledged == chains[i].delivered {
                                pending.retain(|&p| p != i);
                            }
                        }
                        if results.len() < batch.len() {
                            *refusals.entry("partly answered".into()).or_default() += 1;
                        }
                        for shard in answered {
                            if let Ok(head) = ledger.head(shard) {
                                heads.entry(shard).or_default().push(head.open(KIND_TREE_HEAD).expect("signed head"));
                            }
                        }
                    }
                    // The node keeps its receipts and redeems them again later.
                    Err(e) => {
                        assert!(e.is_retryable(), "{e}");
                        let kind = format!("{e:?}");
                        *refusals.entry(kind.split([' ', '(', '{']).next().unwrap_or("").to_string()).or_default() += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            let all_delivered = chains.iter().all(|c| c.delivered == CHUNKS);
            if all_delivered && pending.is_empty() && killer.is_finished() {
                break;
            }
            // Clients deliver a chunk per chain a few times per lease, so kills land mid-stream.
            std::thread::sleep(lease / 5);
            if Instant::now() >= stop {
                let leases = pg.psql_db(db, "SELECT shard, holder, token, lease_until > now() FROM ledger_shards");
                panic!("redemptions did not finish: {} chains pending; leases:\n{leases}", pending.len());
            }
        }
        done.store(true, Ordering::Relaxed);
        let kills = killer.join().expect("killer");

        // Whatever replica serves it, each shard's log is the same.
        let ledger = replicas.lock().expect("replicas")[0].1.clone();
        let mut per_node: HashMap<NodeId, u64> = HashMap::new();
        let mut per_chain: HashMap<(SessionId, NodeId), u32> = HashMap::new();
        let mut sizes = Vec::new();
        for shard in 0..shards {
            let head = head_in(&ledger, shard);
            check_log(&ledger, &head, heads.get(&shard).map_or(&[][..], Vec::as_slice));
            for index in 0..head.size {
                let leaf = ledger.leaf(shard, index).expect("read").expect("contiguous leaves");
                assert_eq!(shard_of(&leaf.session, shards), shard, "leaf {index} is in its session's shard");
                *per_node.entry(leaf.node).or_default() += leaf.credited_bytes;
                let last = per_chain.entry((leaf.session, leaf.node)).or_default();
                assert!(leaf.chain_index > *last, "a chain's index went backwards at leaf {index}");
                *last = leaf.chain_index;
            }
            assert_eq!(ledger.size(shard).expect("size"), head.size);
            sizes.push(head.size);
        }
        for ((shard, index), leaf) in &acknowledged {
            let found = ledger.leaf(*shard, *index).expect("read");
            assert_eq!(found.as_ref(), Some(leaf), "acknowledged leaf {index} of shard {shard} lost");
        }
        let sessions = chains.len() as u64 / ids.len() as u64;
        for node in &ids {
            let exact = sessions * u64::from(CHUNKS * UNIT);
            assert_eq!(per_node.get(node).copied(), Some(exact), "the log's credit of {node}");
            assert_eq!(ledger.credited(node).expect("credit"), exact, "the totals of {node}");
        }
        let checked: usize = heads.values().map(Vec::len).sum();
        eprintln!("records per shard {sizes:?}, {checked} heads checked, retried redemptions: {refusals:?}");
        kills
    });
    assert_eq!(kills, KILLS, "the sequencer was not killed as often as planned");
}

/// The live replica rendezvous hashing picks for each shard: stable, and spread over the replicas.
#[test]
fn shards_are_divided_among_live_replicas_by_rendezvous() {
    let live: Vec<String> = (0..3).map(|n| format!("replica{n}")).collect();
    let owners: Vec<&str> = (0..300).map(|shard| pg::owner(shard, &live).expect("an owner")).collect();
    for r in &live {
        let n = owners.iter().filter(|o| **o == r.as_str()).count();
        assert!((70..130).contains(&n), "{r} owns {n} of 300 shards");
    }
    // A replica leaving moves only its own shards.
    let fewer = &live[..2];
    for (shard, owner) in owners.iter().enumerate() {
        let now = pg::owner(shard as u32, fewer).expect("an owner");
        if *owner != "replica2" {
            assert_eq!(now, *owner, "shard {shard} moved though its owner stayed");
        }
    }
    assert_eq!(pg::owner(0, &[]), None);
}

/// A ledger of 3 shards: each session's receipts land in its shard's own log, with contiguous leaves,
/// heads naming the shard, inclusion and consistency per shard, an epoch sealed per shard, and one
/// statement over all of them. The count is recorded: a replica with another refuses to start, and a
/// ledger written with one shard stays one.
#[test]
fn a_sharded_ledger_keeps_a_log_per_shard() {
    let Some(pg) = postgres() else { return };
    const SHARDS: u32 = 3;
    pg.create_database("sharded");
    let conn = pg.conn_str_db("sharded");
    let stores = PgStore::connect_shards(&conn, "http://sharded.test", LEASE, SHARDS).expect("connect");
    let dyns: Vec<Arc<dyn LedgerStore>> = stores.iter().map(|s| s.clone() as Arc<dyn LedgerStore>).collect();
    let clock = Clock::manual(START_MS);
    let ledger = Ledger::with_shards(dyns, SigningKey::from_bytes(&[1; 32]), MINUTE, 1000, clock.clone());
    let f = Fixture {
        ledger,
        clock,
        client: SigningKey::from_bytes(&[2; 32]),
        node: SigningKey::from_bytes(&[3; 32]).verifying_key().into(),
        issued: Mutex::new(Vec::new()),
    };
    // Tickets until every shard has two sessions.
    let mut tickets: Vec<(Signed, Ticket)> = Vec::new();
    while (0..SHARDS).any(|s| tickets.iter().filter(|t| shard_of(&t.1.session, SHARDS) == s).count() < 2) {
        tickets.push(f.issue());
    }
    let shard = |t: &(Signed, Ticket)| shard_of(&t.1.session, SHARDS);
    // One batch over every shard: answered in order, each receipt in its session's shard.
    let batch: Vec<Receipt> = tickets.iter().map(|t| f.receipt(t, 2)).collect();
    let results = f.redeem_on(&f.ledger, f.node, &batch).expect("redeem");
    assert_eq!(results.len(), batch.len());
    let mut next = [0u64; SHARDS as usize];
    for (r, t) in results.iter().zip(&tickets) {
        assert_eq!((r.outcome, r.shard), (Outcome::Credited, shard(t)), "{r:?}");
        assert_eq!(r.leaf_index, Some(next[r.shard as usize]), "contiguous leaves in shard {}", r.shard);
        next[r.shard as usize] += 1;
    }
    let first: Vec<TreeHead> = (0..SHARDS).map(|s| head_in(&f.ledger, s)).collect();
    for (s, head) in first.iter().enumerate() {
        assert_eq!(head.size, next[s]);
        check_log(&f.ledger, head, &[]);
    }
    // More receipts: each shard's log grows on, consistent with its earlier head.
    let batch: Vec<Receipt> = tickets.iter().map(|t| f.receipt(t, 4)).collect();
    assert!(f.redeem_on(&f.ledger, f.node, &batch).expect("redeem").iter().all(|r| r.credited_bytes == 2));
    assert_eq!(f.redeem_on(&f.ledger, f.node, &batch).expect("redeem")[0].outcome, Outcome::Duplicate);
    for (s, old) in first.iter().enumerate() {
        let head = head_in(&f.ledger, s as u32);
        assert_eq!(head.size, 2 * next[s]);
        check_log(&f.ledger, &head, std::slice::from_ref(old));
    }
    // A forged receipt is refused in the shard its commitment names.
    let mut bad = f.receipt(&tickets[0], 4);
    bad.preimage = Digest([0; 32]);
    let r = f.redeem_on(&f.ledger, f.node, &[bad]).expect("redeem").remove(0);
    assert_eq!((r.outcome, r.shard), (Outcome::Rejected, shard(&tickets[0])), "{r:?}");
    // Each shard seals the finished epoch with a head naming it.
    f.clock.advance(MINUTE);
    f.ledger.seal_epochs().expect("seal");
    for s in 0..SHARDS {
        let sealed = f.ledger.epoch_head(s, f.ledger.epoch() - 1).expect("read").expect("sealed");
        let sealed: TreeHead = sealed.open(KIND_TREE_HEAD).expect("head");
        assert_eq!((sealed.shard, sealed.size), (s, 2 * next[s as usize]));
    }
    // One statement over the shards: every record, with its shard.
    let total = 4 * tickets.len() as u64;
    assert_eq!(f.ledger.credited(&f.node).expect("credit"), total);
    let statement = f.ledger.statement(&f.node, 100).expect("statement");
    assert_eq!(statement.records.len(), 2 * tickets.len());
    assert_eq!(statement.shards.len(), statement.records.len());
    for ((index, leaf), s) in statement.records.iter().zip(&statement.shards) {
        assert_eq!(shard_of(&leaf.session, SHARDS), *s);
        assert_eq!(f.ledger.leaf(*s, *index).expect("read").as_ref(), Some(leaf));
    }
    assert!(matches!(f.ledger.head(SHARDS), Err(LedgerError::NoShard(SHARDS))));

    // The count is the database's now.
    let other = PgStore::connect_shards(&conn, "http://other.test", LEASE, 2);
    assert!(matches!(other, Err(LedgerError::ShardCount { database: 3, configured: 2 })), "{other:?}");
    assert_eq!(PgStore::connect_shards(&conn, "http://again.test", LEASE, 3).expect("same count").len(), 3);
    // A ledger written with one shard (as an export makes, or before shards were counted) stays one.
    let one = pg_store(&pg, "one_shard", LEASE);
    let g = fixture(one, MINUTE);
    g.redeem(g.receipt(&g.issue(), 1));
    pg.psql_db("one_shard", "DELETE FROM ledger_config");
    let more = PgStore::connect_shards(&pg.conn_str_db("one_shard"), "http://more.test", LEASE, 4);
    assert!(matches!(more, Err(LedgerError::ShardCount { database: 1, configured: 4 })), "{more:?}");
}

/// Three replicas tending a ledger of 4 shards: each shard's lease is held by the replica rendezvous
/// picks among the live ones; when one is cut off, its shards move to the others, and a receipt of any
/// shard is redeemed at the shard's holder (at the others, it is left for it).
#[test]
fn replicas_divide_the_shards_and_take_over_a_dead_ones() {
    let Some(pg) = postgres() else { return };
    const SHARDS: u32 = 4;
    let lease = Duration::from_millis(400);
    pg.create_database("divided");
    let conn = pg.conn_str_db("divided");
    let clock = Clock::manual(START_MS);
    let replicas: Vec<Replica> = (0..3)
        .map(|n| {
            let stores = PgStore::connect_shards(&conn, &format!("http://r{n}.test"), lease, SHARDS).expect("connect");
            let dyns = stores.iter().map(|s| s.clone() as Arc<dyn LedgerStore>).collect();
            let key = SigningKey::from_bytes(&[1; 32]);
            (stores, Arc::new(Ledger::with_shards(dyns, key, Duration::from_secs(3600), 100, clock.clone())))
        })
        .collect();
    let tend = |alive: &[usize], until: &dyn Fn() -> bool| {
        let stop = Instant::now() + Duration::from_secs(30);
        while !until() {
            assert!(Instant::now() < stop, "the leases did not settle");
            for &r in alive {
                let _ = replicas[r].1.seal_epochs();
            }
            std::thread::sleep(lease / 8);
        }
    };
    let ids = |alive: &[usize]| {
        let mut ids: Vec<String> = alive.iter().map(|&r| replicas[r].0[0].replica().to_string()).collect();
        ids.sort();
        ids
    };
    let settled = |alive: &[usize]| {
        let live = ids(alive);
        (0..SHARDS).all(|shard| {
            let owner = pg::owner(shard, &live).expect("an owner");
            alive.iter().all(|&r| {
                let store = &replicas[r].0[shard as usize];
                store.holds_lease() == (store.replica() == owner)
            })
        })
    };
    tend(&[0, 1, 2], &|| settled(&[0, 1, 2]));
    let holder = |shard: u32| (0..3).find(|&r| replicas[r].0[shard as usize].holds_lease()).expect("a holder");
    // Cut off the holder of shard 0; the two others take its shards over.
    let dead = holder(0);
    replicas[dead].0[0].kill();
    let alive: Vec<usize> = (0..3).filter(|&r| r != dead).collect();
    tend(&alive, &|| settled(&alive));
    let f = fixture(replicas[alive[0]].0[0].clone(), Duration::from_secs(3600));
    let ticket = f.issue();
    let s = shard_of(&ticket.1.session, SHARDS);
    let at = holder(s);
    let elsewhere = alive.iter().copied().find(|&r| r != at).expect("another replica");
    let receipt = f.receipt(&ticket, 1);
    let tickets = tickets_for(std::slice::from_ref(&receipt), [&ticket.0]);
    let left = replicas[elsewhere].1.redeem(f.node, std::slice::from_ref(&receipt), &tickets);
    assert!(matches!(left, Err(LedgerError::NotSequencer { .. })), "{left:?}");
    let done = replicas[at].1.redeem(f.node, std::slice::from_ref(&receipt), &tickets).expect("at the holder");
    assert_eq!((done[0].outcome, done[0].shard, done[0].leaf_index), (Outcome::Credited, s, Some(0)));
}
