//! The tracker API's JSON bodies, as each side parses them: what the tracker accepts (`Signed`, and inside
//! it `Register`, `Heartbeat`, `RedeemBatch`; `ClientReport`), what a node accepts from clients (a
//! `Receipt` in a request frame) and what nodes and clients accept from the tracker (`RegisterResponse`,
//! `HeartbeatResponse`, `Resolve`, `ApiError`, `TrackerStats`). Every value that passes the receiver's
//! checks survives a JSON round trip unchanged, and signs and opens as itself.
#![no_main]

use ed25519_dalek::SigningKey;
use fog_fuzz::round_trips;
use fog_proto::api::{
    ApiError, ClientReport, Heartbeat, HeartbeatResponse, Register, RegisterResponse, Resolve, Signed, TrackerStats,
    KIND_HEARTBEAT, KIND_REGISTER, MAX_CLIENT_RTTS, MAX_REPORTED_FAILURES,
};
use fog_proto::credits::{Receipt, RedeemBatch, KIND_REDEEM, MAX_BATCH};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn parse<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

/// A message a node signs opens, under its kind, to the same message (and under no other kind).
fn signs_and_opens<T: Serialize + DeserializeOwned>(message: &T, kind: &'static str) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let signed = Signed::sign(&key, kind, message);
    let opened: T = signed.open(kind).expect("a signed message opens");
    assert_eq!(serde_json::to_string(&opened).expect("serialises"), signed.payload);
    assert!(signed.open::<T>("other-kind").is_err());
}

fuzz_target!(|data: &[u8]| {
    // The tracker: every node message is a `Signed` whose payload it opens (verifies, then parses).
    if let Some(signed) = parse::<Signed>(data) {
        round_trips(&signed);
        let _ = signed.open::<Register>(KIND_REGISTER);
        let _ = signed.open::<Heartbeat>(KIND_HEARTBEAT);
        let _ = signed.open::<RedeemBatch>(KIND_REDEEM);
    }
    if let Some(reg) = parse::<Register>(data) {
        round_trips(&reg);
        signs_and_opens(&reg, KIND_REGISTER);
    }
    if let Some(hb) = parse::<Heartbeat>(data) {
        // The tracker refuses a heartbeat whose overlay report fails its bounds; the rest it keeps.
        if hb.overlay.as_ref().is_none_or(|o| o.check_bounds().is_ok()) {
            round_trips(&hb);
            signs_and_opens(&hb, KIND_HEARTBEAT);
        }
    }
    if let Some(batch) = parse::<RedeemBatch>(data) {
        if batch.receipts.len() <= MAX_BATCH {
            round_trips(&batch);
            signs_and_opens(&batch, KIND_REDEEM);
        }
    }
    if let Some(report) = parse::<ClientReport>(data) {
        // Reports are not authenticated; the tracker bounds their lists and ignores unbelievable RTTs.
        let bounded = report.node_failures.len() <= MAX_REPORTED_FAILURES && report.node_rtt.len() <= MAX_CLIENT_RTTS;
        if bounded && report.node_rtt.iter().all(|s| s.rtt_ms.is_finite()) {
            round_trips(&report);
        }
    }
    // A node: receipts arrive in request frames.
    if let Some(receipt) = parse::<Receipt>(data) {
        round_trips(&receipt);
        let _ = receipt.chain_id();
        let _ = receipt.commitment.open::<fog_proto::credits::Commitment>(fog_proto::credits::KIND_COMMITMENT);
    }
    // Nodes and clients: the tracker's answers.
    if let Some(r) = parse::<RegisterResponse>(data) {
        round_trips(&r);
    }
    if let Some(r) = parse::<HeartbeatResponse>(data) {
        round_trips(&r);
    }
    if let Some(r) = parse::<Resolve>(data) {
        round_trips(&r);
        // The client's check before it fetches anything (fetch.rs): after it, every index is in range.
        let consistent = r.manifest.validate().is_ok()
            && r.schedule.len() == r.manifest.chunks.len()
            && r.schedule.iter().flatten().all(|&i| (i as usize) < r.nodes.len());
        if consistent {
            let mut end = 0u64;
            for (i, candidates) in r.schedule.iter().enumerate() {
                let (offset, len) = r.manifest.chunk_span(i);
                assert_eq!(offset, end);
                end += u64::from(len);
                assert!(candidates.iter().all(|&n| r.nodes.get(n as usize).is_some()));
            }
            assert_eq!(end, r.manifest.size);
        }
    }
    if let Some(e) = parse::<ApiError>(data) {
        round_trips(&e);
    }
    if let Some(s) = parse::<TrackerStats>(data) {
        round_trips(&s);
    }
});
