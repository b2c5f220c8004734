//! Verifiable credits against a real tracker and nodes: what clients verified is credited exactly once,
//! the node checks the ledger's proofs, every kind of fraud is refused with its reason, and killing the
//! tracker mid-redemption loses and doubles nothing.

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_proto::api::{Register, Resolve, Signed, KIND_REGISTER};
use fog_proto::credits::{
    payment_chain, ticket_id, Commitment, Outcome, Receipt, RedeemBatch, RedeemResponse, SessionId, Ticket,
    KIND_COMMITMENT, KIND_REDEEM, KIND_TICKET,
};
use fog_proto::NodeId;
use fog_testkit::harness::{handshake_only_endpoint, Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

use crate::common::MIB;

use fog_proto::api::now_ms;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(k: &SigningKey) -> NodeId {
    k.verifying_key().into()
}

/// A node run by the test itself (so it can misbehave), registered with the tracker.
/// Registers a node that exists only as a key and a QUIC endpoint answering the tracker's dial-back; keep
/// the endpoint for as long as the node should stay scheduled.
async fn register_fake_node(cluster: &Cluster, node: &SigningKey) -> quinn::Endpoint {
    let endpoint = handshake_only_endpoint(node);
    let reg = Register {
        quic_addr: endpoint.local_addr().expect("addr"),
        cache_capacity: 1 << 30,
        upload_limit: None,
        version: "test".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: None,
    };
    let body = Signed::sign(node, KIND_REGISTER, &reg);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/nodes/register", cluster.tracker_url()))
        .json(&body)
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status().as_u16(), 200);
    endpoint
}

async fn resolve_with_ticket(cluster: &Cluster, url: &str, client: &SigningKey) -> (Resolve, Option<(Signed, Ticket)>) {
    let r: Resolve =
        get_json(format!("{}/v1/resolve?url={url}&client_key={}", cluster.tracker_url(), id(client))).await;
    let ticket = r.ticket.clone().map(|s| {
        let t: Ticket = s.open(KIND_TICKET).expect("ticket verifies");
        (s, t)
    });
    (r, ticket)
}

/// A receipt from `client` paying `node` `index` chunks under `ticket`.
fn receipt(client: &SigningKey, signed_ticket: &Signed, ticket: &Ticket, node: NodeId, index: u32) -> Receipt {
    let length = 64;
    let chain = payment_chain([index as u8 ^ node.0[0]; 32], length);
    let c = Commitment {
        session: ticket.session,
        ticket_id: ticket_id(signed_ticket),
        node,
        anchor: chain[0],
        length,
        epoch: ticket.epoch,
    };
    Receipt { commitment: Signed::sign(client, KIND_COMMITMENT, &c), index, preimage: chain[index as usize] }
}

/// Redeems `receipts` for `node` with `tickets` (the tracker keeps none: a batch carries the tickets its
/// receipts were made under).
async fn redeem(
    cluster: &Cluster,
    node: &SigningKey,
    receipts: Vec<Receipt>,
    tickets: &[&Signed],
) -> Result<RedeemResponse, String> {
    let tickets = tickets.iter().map(|t| (*t).clone()).collect();
    let batch = Signed::sign(node, KIND_REDEEM, &RedeemBatch { timestamp_ms: now_ms(), receipts, tickets });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/credits/redeem", cluster.tracker_url()))
        .json(&batch)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    resp.json().await.map_err(|e| e.to_string())
}

/// GET a JSON document (panics with the URL on failure: these are tests).
async fn get_json<T: serde::de::DeserializeOwned>(url: String) -> T {
    let resp = reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.json().await.unwrap_or_else(|e| panic!("GET {url}: not the expected JSON: {e}"))
}

async fn credited(cluster: &Cluster, node: NodeId) -> u64 {
    let s: Value = get_json(format!("{}/v1/nodes/{node}/credits", cluster.tracker_url())).await;
    s["credited_bytes"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_fog_bytes_are_credited_exactly_and_nodes_verify_the_ledger() {
    let cluster = Cluster::start(ClusterOptions { nodes: 2, ..Default::default() }).await;
    let content = test_bytes(5 * MIB + 7, 91);
    cluster.origin.put("paid.bin", content.clone());
    let (bytes, report) = cluster.client().get(&cluster.origin.url("paid.bin")).await.expect("fetch");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64);

    // Nodes redeem every 5 s; wait for the ledger to hold all of it.
    let started = Instant::now();
    let total = loop {
        let all: Value = get_json(format!("{}/v1/credits", cluster.tracker_url())).await;
        let total: u64 = all.as_array().expect("list").iter().map(|n| n["credited_bytes"].as_u64().unwrap_or(0)).sum();
        if total >= report.fog_bytes || started.elapsed() > Duration::from_secs(30) {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The last chunk is shorter than a unit; the ticket's budget (the object's size) makes it exact.
    assert_eq!(total, report.fog_bytes, "credited bytes differ from the fog bytes the client verified");
    for (node, used) in &report.nodes {
        assert!(
            credited(&cluster, *node).await <= used.chunks * MIB as u64,
            "node {node} credited beyond what it served"
        );
    }

    // Each node that served (placement may give one node every chunk) verified its records against a
    // signed head and keeps no receipt back.
    let mut verified = 0;
    for i in 0..2 {
        let addr = std::fs::read_to_string(cluster.node_dir(i).join(fog_node::STATUS_ADDR_FILE)).expect("status addr");
        let status: Value = get_json(format!("http://{}/status", addr.trim())).await;
        let node: NodeId = status["node_id"].as_str().expect("node id").parse().expect("node id");
        if !report.nodes.contains_key(&node) {
            continue;
        }
        verified += 1;
        let started = Instant::now();
        loop {
            let s: Value = get_json(format!("http://{}/status", addr.trim())).await;
            let c = &s["credits"];
            if c["ledger_verified_size"].as_u64() > Some(0) && c["receipts_held"] == 0 && c["tracker_credited"].is_u64()
            {
                assert!(c["ledger_problem"].is_null(), "{c:#}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "node {i} never verified the ledger: {c:#}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(verified, report.nodes.len(), "a node that served is missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_is_rejected_with_reasons() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 0,
        tracker_args: vec!["--tickets-per-minute".into(), "3".into()],
        ..Default::default()
    })
    .await;
    let (node, other) = (key(1), key(2));
    let _node_endpoint = register_fake_node(&cluster, &node).await;
    let _other_endpoint = register_fake_node(&cluster, &other).await;
    cluster.wait_healthy(2).await;
    let content = test_bytes(3 * MIB, 92);
    cluster.origin.put("f.bin", content);
    let url = cluster.origin.url("f.bin");
    let client = key(3);
    let (_, ticket) = resolve_with_ticket(&cluster, &url, &client).await;
    let (signed, ticket) = ticket.expect("a ticket");
    assert_eq!(ticket.byte_budget, 3 * MIB as u64);
    let reason = |r: &RedeemResponse, i: usize| r.results[i].reason.clone().unwrap_or_default();

    // Honest: two chunks to `node`. Then the same receipt again (replay) is a duplicate.
    let honest = receipt(&client, &signed, &ticket, id(&node), 2);
    let r = redeem(&cluster, &node, vec![honest.clone(), honest.clone()], &[&signed]).await.expect("redeem");
    assert_eq!((r.results[0].outcome, r.results[0].credited_bytes), (Outcome::Credited, 2 * MIB as u64));
    assert_eq!(r.results[1].outcome, Outcome::Duplicate);

    // A forged commitment signature.
    let mut forged = receipt(&client, &signed, &ticket, id(&node), 3);
    forged.commitment = Signed {
        signature: receipt(&key(9), &signed, &ticket, id(&node), 3).commitment.signature,
        ..forged.commitment
    };
    // A receipt transferred to another node; a node the ticket did not name; a session the tracker never
    // issued (a node minting its own client keys, and a ticket for them); the right session signed by a key
    // the node made up; a receipt without its ticket (the tracker keeps none).
    let stranger = key(4);
    let mut minted_ticket = ticket.clone();
    minted_ticket.session = SessionId([0; 16]);
    minted_ticket.client_key = id(&key(5));
    let minted_signed = Signed::sign(&node, KIND_TICKET, &minted_ticket);
    let minted = receipt(&key(5), &minted_signed, &minted_ticket, id(&node), 1);
    let hijacked = receipt(&key(5), &signed, &ticket, id(&node), 1);
    let r = redeem(&cluster, &node, vec![forged, minted, hijacked], &[&signed, &minted_signed]).await.expect("redeem");
    assert!(reason(&r, 0).contains("forged"), "{r:?}");
    assert!(reason(&r, 1).contains("forged ticket"), "{r:?}");
    assert!(reason(&r, 2).contains("wrong client"), "{r:?}");
    let r = redeem(&cluster, &node, vec![receipt(&client, &signed, &ticket, id(&node), 3)], &[]).await.expect("redeem");
    assert!(reason(&r, 0).contains("no ticket"), "{r:?}");
    // Tickets beyond the batch's receipts: the whole batch is refused.
    let two = redeem(&cluster, &node, vec![honest.clone()], &[&signed, &minted_signed]).await;
    assert!(two.as_ref().is_err_and(|e| e.contains("400")), "{two:?}");
    let to_other = receipt(&client, &signed, &ticket, id(&node), 1);
    let r = redeem(&cluster, &other, vec![to_other], &[&signed]).await.expect("redeem");
    assert!(reason(&r, 0).contains("not yours"), "{r:?}");
    // A key the tracker never registered writes nothing; registered after the ticket, it was not assigned.
    let unregistered =
        redeem(&cluster, &stranger, vec![receipt(&client, &signed, &ticket, id(&stranger), 1)], &[&signed]).await;
    assert!(unregistered.as_ref().is_err_and(|e| e.contains("401")), "{unregistered:?}");
    let _stranger_endpoint = register_fake_node(&cluster, &stranger).await;
    let r = redeem(&cluster, &stranger, vec![receipt(&client, &signed, &ticket, id(&stranger), 1)], &[&signed])
        .await
        .expect("redeem");
    assert!(reason(&r, 0).contains("did not assign"), "{r:?}");

    // Beyond the budget: `other` claims all three chunks, only the one left in the budget is credited,
    // and nothing more after that.
    let r = redeem(&cluster, &other, vec![receipt(&client, &signed, &ticket, id(&other), 3)], &[&signed])
        .await
        .expect("redeem");
    assert_eq!(r.results[0].credited_bytes, MIB as u64, "{r:?}");
    let r = redeem(&cluster, &node, vec![receipt(&client, &signed, &ticket, id(&node), 3)], &[&signed])
        .await
        .expect("redeem");
    assert!(reason(&r, 0).contains("nothing left"), "{r:?}");
    assert_eq!(credited(&cluster, id(&node)).await + credited(&cluster, id(&other)).await, 3 * MIB as u64);

    // Self-dealing: one address gets only so many tickets a minute.
    let mut tickets = 1;
    for seed in 10..15 {
        if resolve_with_ticket(&cluster, &url, &key(seed)).await.1.is_some() {
            tickets += 1;
        }
    }
    assert_eq!(tickets, 3, "per-address ticket limit not applied");

    // Replays in a later epoch, expired tickets and sealed epoch heads are the ledger's unit tests (they
    // move a manual clock rather than wait out epochs here).

    // Every refusal is itemised in the node's statement: forged, forged ticket, wrong client, no ticket,
    // nothing left.
    let s: Value = get_json(format!("{}/v1/nodes/{}/credits", cluster.tracker_url(), id(&node))).await;
    let reasons: Vec<&str> =
        s["rejected"].as_array().expect("rejected").iter().map(|r| r["reason"].as_str().unwrap_or("")).collect();
    assert_eq!(reasons.len(), 5, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_tracker_mid_redemption_loses_and_doubles_nothing() {
    let mut cluster = Cluster::start(ClusterOptions { nodes: 0, ..Default::default() }).await;
    let node = key(21);
    let mut _endpoint = register_fake_node(&cluster, &node).await;
    cluster.wait_healthy(1).await;
    cluster.origin.put("k.bin", test_bytes(2 * MIB, 93));
    let url = cluster.origin.url("k.bin");
    // 40 sessions, each paying the node both chunks.
    let mut pending = Vec::new();
    for s in 0..40u8 {
        let client = key(100 + s);
        let (_, t) = resolve_with_ticket(&cluster, &url, &client).await;
        let (signed, ticket) = t.expect("ticket");
        pending.push((receipt(&client, &signed, &ticket, id(&node), 2), signed));
    }
    let expected = 40 * 2 * MIB as u64;
    // Redeem in batches of 4 (retrying what was not acknowledged, as fog-node does), killing the tracker
    // every few batches at a random moment.
    let mut kills = 0;
    let mut killed_at = None;
    while !pending.is_empty() {
        let batch: Vec<Receipt> = pending.iter().take(4).map(|(r, _)| r.clone()).collect();
        let tickets: Vec<Signed> = pending.iter().take(4).map(|(_, t)| t.clone()).collect();
        let cluster_ref = &cluster;
        let attempt = tokio::spawn({
            let (url, batch) = (cluster_ref.tracker_url(), batch.clone());
            let node = node.clone();
            async move {
                let batch = RedeemBatch { timestamp_ms: now_ms(), receipts: batch, tickets };
                let body = Signed::sign(&node, KIND_REDEEM, &batch);
                let resp =
                    reqwest::Client::new().post(format!("{url}/v1/credits/redeem")).json(&body).send().await.ok()?;
                resp.json::<RedeemResponse>().await.ok()
            }
        });
        if pending.len() % 8 == 0 && killed_at != Some(pending.len()) {
            killed_at = Some(pending.len());
            tokio::time::sleep(Duration::from_millis(u64::from(now_ms() as u8 % 20))).await;
            cluster.tracker.kill();
            kills += 1;
            let _ = attempt.await;
            cluster.restart_tracker().await;
            _endpoint = register_fake_node(&cluster, &node).await;
            continue;
        }
        if let Ok(Some(resp)) = attempt.await {
            for r in &resp.results {
                assert_ne!(r.outcome, Outcome::Rejected, "{r:?}");
            }
            pending.drain(..batch.len());
        }
    }
    assert!(kills >= 3, "the tracker was killed only {kills} times");
    assert_eq!(credited(&cluster, id(&node)).await, expected, "credit lost or counted twice across {kills} crashes");
}
