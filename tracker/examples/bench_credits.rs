//! Credits throughput on this machine (run by `scripts/bench/credits.sh`): receipts verified per second
//! (the signature and hash-chain checks alone), ledger redemptions per second (verification, a Merkle
//! append and a synced RocksDB batch per 256 receipts), and the receipts' overhead on the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_proto::api::Signed;
use fog_proto::credits::{
    chain_links, payment_chain, ticket_id, Commitment, Receipt, Ticket, KIND_COMMITMENT, KIND_TICKET, MAX_BATCH,
};
use fog_proto::{ContentId, NodeId};
use fog_tracker::clock::Clock;
use fog_tracker::db::Db;
use fog_tracker::ledger::Ledger;

const CHUNK: u32 = 1 << 20;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = Arc::new(Db::open(&dir.path().join("db"))?);
    let ledger = Ledger::new(db, SigningKey::from_bytes(&[1; 32]), Duration::from_secs(3600), u32::MAX, Clock::System);
    let node = SigningKey::from_bytes(&[2; 32]);
    let node_id: NodeId = node.verifying_key().into();

    // Sessions, each paying the node for 4 chunks.
    let sessions = 20_000;
    let mut receipts = Vec::with_capacity(sessions);
    // Each redeemed with its ticket, as nodes send them (the tracker stores none).
    let mut tickets = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let mut seed = [3u8; 32];
        seed[..8].copy_from_slice(&(s as u64).to_be_bytes());
        let client = SigningKey::from_bytes(&seed);
        let signed = ledger
            .issue_ticket(
                Some([127, 0, 0, 1].into()),
                client.verifying_key().into(),
                ContentId([0; 32]),
                vec![node_id],
                vec![4],
                CHUNK,
                4 * u64::from(CHUNK),
            )?
            .expect("ticket");
        let ticket: Ticket = signed.open(KIND_TICKET)?;
        let chain = payment_chain(seed, 4);
        let c = Commitment {
            session: ticket.session,
            ticket_id: ticket_id(&signed),
            node: node_id,
            anchor: chain[0],
            length: 4,
            epoch: ticket.epoch,
        };
        receipts.push(Receipt { commitment: Signed::sign(&client, KIND_COMMITMENT, &c), index: 4, preimage: chain[4] });
        tickets.push(signed);
    }

    // Verification alone: what a node does per receipt it is handed, and the tracker per redemption.
    let started = Instant::now();
    for r in &receipts {
        let c: Commitment = r.commitment.open(KIND_COMMITMENT)?;
        assert!(chain_links(&c.anchor, 0, &r.preimage, r.index));
    }
    let verify_rate = sessions as f64 / started.elapsed().as_secs_f64();

    // Redemption into the ledger in full batches, each one synced write.
    let started = Instant::now();
    let mut credited = 0u64;
    for (batch, tickets) in receipts.chunks(MAX_BATCH).zip(tickets.chunks(MAX_BATCH)) {
        for r in ledger.redeem(node_id, batch, tickets)? {
            credited += r.credited_bytes;
        }
    }
    let redeem_secs = started.elapsed().as_secs_f64();
    assert_eq!(credited, sessions as u64 * 4 * u64::from(CHUNK));
    let appends_rate = sessions as f64 / redeem_secs;

    // On the wire: one receipt per verified chunk (the client sends the latest; each carries the commitment).
    let receipt_bytes = serde_json::to_vec(&receipts[0])?.len();
    let overhead = receipt_bytes as f64 / f64::from(CHUNK);
    println!(
        "{}",
        serde_json::json!({
            "receipts": sessions,
            "receipts_verified_per_s": verify_rate.round(),
            "ledger_appends_per_s": appends_rate.round(),
            "batch_size": MAX_BATCH,
            "receipt_bytes": receipt_bytes,
            "wire_overhead_per_1MiB_chunk": format!("{:.4} %", overhead * 100.0),
            "ledger_size": ledger.size(0)?,
        })
    );
    Ok(())
}
