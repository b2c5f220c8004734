//! Itemized, verifiable earnings (issue #16) against a real tracker, nodes and clients over several short
//! ledger epochs: each node's books, which count only ledger records whose inclusion it verified and settle
//! an epoch against the head that sealed it, agree with the tracker's ledger to the byte; `fog-node
//! earnings --csv` (reading the books while the node runs) says the same; a receipt the tracker rejects and
//! one the node refuses show up with their reasons.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::api::Signed;
use fog_proto::credits::{payment_chain, Commitment, Receipt, SessionId, TicketId, KIND_COMMITMENT};
use fog_proto::wire::ChunkRequest;
use fog_proto::NodeId;
use fog_testkit::harness::{bin, Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

use crate::common::MIB;

/// Short epochs, so a test run spans several; long enough that receipts are redeemed within their ticket's
/// epoch or the next (nodes redeem every 5 s).
const EPOCH_SECS: u64 = 8;

async fn get_json(url: String) -> Value {
    let resp = reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Hands node `i` a receipt over the chunk protocol, as a client would.
async fn hand_over(cluster: &Cluster, i: usize, receipt: &Receipt) {
    let status = cluster.node_status(i).await;
    let id: NodeId = serde_json::from_value(status["node_id"].clone()).expect("node id");
    let addr = status["quic_listen"].as_str().expect("address").parse().expect("address");
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, id, addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connect");
    let req = ChunkRequest::receipt_only(serde_json::to_vec(receipt).expect("json"));
    let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
    // The node answers either way: it keeps a receipt that checks out, and counts one that does not.
    let _ = chunk::request(&conn, &req, 0, deadlines, None).await;
}

/// A receipt the node can check and keep, for a session the tracker never issued: the tracker rejects it.
fn unissued_receipt(node: NodeId) -> Receipt {
    let chain = payment_chain([77; 32], 4);
    let c = Commitment {
        session: SessionId([0xee; 16]),
        ticket_id: TicketId([0; 32]),
        node,
        anchor: chain[0],
        length: 4,
        epoch: 0,
    };
    Receipt {
        commitment: Signed::sign(&SigningKey::from_bytes(&[78; 32]), KIND_COMMITMENT, &c),
        index: 1,
        preimage: chain[1],
    }
}

/// Fields of one CSV line (quoted fields may hold commas and doubled quotes).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut field, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_tracker_books_agree_to_the_byte_over_several_epochs() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        tracker_args: vec!["--epoch-secs".into(), EPOCH_SECS.to_string()],
        ..Default::default()
    })
    .await;
    let node0: NodeId = serde_json::from_value(cluster.node_status(0).await["node_id"].clone()).expect("node id");

    // Viewers across a few epochs.
    let mut fog_bytes = 0;
    let started = Instant::now();
    for i in 0..6u8 {
        let content = test_bytes(2 * MIB + 1000 * usize::from(i), 60 + u64::from(i));
        cluster.origin.put(&format!("e{i}.bin"), content.clone());
        let (bytes, report) = cluster.client().get(&cluster.origin.url(&format!("e{i}.bin"))).await.expect("fetch");
        assert!(bytes == content);
        fog_bytes += report.fog_bytes;
        tokio::time::sleep(Duration::from_millis(3500)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(2 * EPOCH_SECS), "too short to span several epochs");
    // A receipt the tracker rejects (it never issued the session), and a forged one the node refuses.
    hand_over(&cluster, 0, &unissued_receipt(node0)).await;
    let mut forged = unissued_receipt(node0);
    forged.commitment.signature = Signed::sign(&SigningKey::from_bytes(&[79; 32]), KIND_COMMITMENT, &1).signature;
    hand_over(&cluster, 0, &forged).await;

    // Every node's epochs settle (their records verified, each checked against the head that sealed it).
    let mut books = Vec::new();
    for i in 0..2 {
        let s = cluster
            .wait_node_status(i, "every epoch settled, every record verified", |s| {
                let e = &s["earnings"];
                let epochs = e["epochs"].as_array().map_or(&[][..], Vec::as_slice);
                let rejected = i != 0
                    || (e["totals"]["receipts_rejected"].as_u64() >= Some(1)
                        && e["totals"]["receipts_refused"].as_u64() >= Some(1));
                e["pending_records"] == 0
                    && s["credits"]["receipts_held"] == 0
                    && rejected
                    && epochs.iter().all(|p| p["settled"] == true && p["tracker_bytes"].is_u64())
            })
            .await;
        books.push(s);
    }

    // Node and tracker agree, epoch by epoch, to the byte, and credit exactly what clients verified.
    let mut epochs_seen = std::collections::BTreeSet::new();
    let mut node_total = 0;
    for s in &books {
        let id = s["node_id"].as_str().expect("id");
        let statement = get_json(format!("{}/v1/nodes/{id}/credits", cluster.tracker_url())).await;
        let tracker: BTreeMap<u64, u64> = statement["epochs"]
            .as_array()
            .expect("epochs")
            .iter()
            .map(|e| (e["epoch"].as_u64().expect("epoch"), e["credited_bytes"].as_u64().expect("bytes")))
            .collect();
        let mine: BTreeMap<u64, u64> = s["earnings"]["epochs"]
            .as_array()
            .expect("epochs")
            .iter()
            .map(|e| {
                assert_eq!(e["consistent"], true, "{e:#}");
                assert_eq!(e["records_failed"], 0, "{e:#}");
                (e["epoch"].as_u64().expect("epoch"), e["node_bytes"].as_u64().expect("bytes"))
            })
            .collect();
        assert_eq!(mine, tracker, "node {id}: its verified books and the tracker's ledger differ");
        epochs_seen.extend(mine.keys().copied());
        node_total += mine.values().sum::<u64>();
        let t = &s["earnings"]["totals"];
        assert_eq!(t["epochs_disagreeing"], 0, "{t:#}");
        assert_eq!(t["settled_node_bytes"], t["settled_tracker_bytes"], "{t:#}");
    }
    assert!(epochs_seen.len() >= 2, "credits fell in {} epoch(s) only", epochs_seen.len());
    assert_eq!(node_total, fog_bytes, "the nodes' verified credit differs from the bytes clients verified");

    // `fog-node earnings --csv` reads the running node's books: the same epochs, and the reasons.
    let out = std::process::Command::new(bin("fog-node"))
        .arg("earnings")
        .arg("--data-dir")
        .arg(cluster.node_dir(0))
        .arg("--csv")
        .env_remove("FOG_NODE_CONFIG")
        .output()
        .expect("fog-node earnings");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some(fog_node::earnings::CSV_HEADER));
    let rows: Vec<BTreeMap<&str, String>> = lines
        .map(|l| fog_node::earnings::CSV_HEADER.split(',').zip(csv_fields(l)).collect::<BTreeMap<_, _>>())
        .collect();
    let kind = |k: &'static str| rows.iter().filter(move |r| r["record"] == k);
    let statement = get_json(format!("{}/v1/nodes/{node0}/credits", cluster.tracker_url())).await;
    let csv_epochs: BTreeMap<u64, (u64, u64)> = kind("epoch")
        .map(|r| {
            assert_eq!(r["agreement"], "agree", "{r:?}");
            let n = |c: &str| r[c].parse::<u64>().unwrap_or_else(|_| panic!("{c} in {r:?}"));
            (n("epoch"), (n("node_bytes"), n("tracker_bytes")))
        })
        .collect();
    let tracker: BTreeMap<u64, (u64, u64)> = statement["epochs"]
        .as_array()
        .expect("epochs")
        .iter()
        .map(|e| {
            let b = e["credited_bytes"].as_u64().expect("bytes");
            (e["epoch"].as_u64().expect("epoch"), (b, b))
        })
        .collect();
    assert_eq!(csv_epochs, tracker, "{csv}");
    let served: u64 = kind("day").map(|r| r["client_bytes"].parse::<u64>().expect("bytes")).sum();
    assert!(served > 0, "{csv}");
    assert!(kind("rejected").any(|r| r["reason"].contains("no ticket") && r["count"] == "1"), "{csv}");
    assert!(kind("refused").any(|r| r["reason"] == "forged or malformed commitment"), "{csv}");
    let total = kind("total").next().expect("a total row");
    assert_eq!(total["node_bytes"], total["tracker_bytes"], "{csv}");
}
