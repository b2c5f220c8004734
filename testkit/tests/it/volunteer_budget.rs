//! Owners' schedules and monthly budgets (issue #16) against real processes: a tracker, two plain nodes, a
//! node whose `off` window starts during the test and one whose monthly budget runs out, and a client
//! fetching all along. The tracker stops handing out each node before its window starts or its budget
//! ends; the budget node never sends more than its budget (by its own count and by what clients
//! received); every fetch completes and verifies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_net::chunk::{self, ChunkError, Deadlines};
use fog_net::transport;
use fog_proto::wire::{ChunkRequest, OriginHint, Status};
use fog_proto::NodeId;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use jiff::{SignedDuration, ZonedDateTime};
use serde_json::Value;

use crate::common::{resolve, MIB};

const CHUNK: u64 = 64 << 10;
const BUDGET: u64 = 3 << 20;
/// How far ahead of the test's start the off window begins: time for the node to join and be handed out
/// before the tracker's lead (a heartbeat and the clients' 10 s) rests it.
const OFF_AFTER: i64 = 40;

fn node_id(status: &Value) -> NodeId {
    serde_json::from_value(status["node_id"].clone()).expect("node id")
}

fn budget_left(status: &Value) -> u64 {
    status["upload"]["budget"]["left"].as_u64().expect("a budget")
}

fn is_off(status: &Value) -> bool {
    status["upload"]["mode"] == "off"
}

/// Why the tracker does not hand `id` out for now, per its node table.
async fn resting(cluster: &Cluster, id: NodeId) -> Option<String> {
    let url = format!("{}/v1/dashboard/nodes?per_page=200", cluster.tracker_url());
    let page: Value = reqwest::get(url).await.expect("nodes").json().await.expect("nodes json");
    let nodes = page["nodes"].as_array().expect("nodes");
    let row = nodes.iter().find(|n| n["id"] == serde_json::to_value(id).expect("id")).expect("node listed");
    row["resting"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tracker_routes_around_off_windows_and_spent_budgets() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        tracker_args: vec!["--chunk-size".into(), "64KiB".into()],
        ..Default::default()
    })
    .await;
    let budget = cluster
        .add_node(&["--monthly-upload".into(), BUDGET.to_string(), "--upload-limit".into(), "256KiB".into()])
        .await;
    // The node reads its local time as jiff does here (TZ, else /etc/localtime): the window is written in
    // it, to the second, and ends ten minutes later (past midnight if need be: ranges wrap).
    let start = ZonedDateTime::now() + SignedDuration::from_secs(OFF_AFTER);
    let end = start.clone() + SignedDuration::from_mins(10);
    let window = format!("daily {}-{} off", start.strftime("%H:%M:%S"), end.strftime("%H:%M:%S"));
    let off = cluster.add_node(&["--schedule".into(), window]).await;
    cluster.wait_healthy(4).await;
    let budget_id = node_id(&cluster.node_status(budget).await);
    let off_id = node_id(&cluster.node_status(off).await);

    let objects: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let content = test_bytes(MIB, 60 + i);
            cluster.origin.put(&format!("o{i}.bin"), content.clone());
            (cluster.origin.url(&format!("o{i}.bin")), content)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let fetcher = {
        let (client, objects, stop) = (cluster.client(), objects.clone(), stop.clone());
        tokio::spawn(async move {
            let mut from_node: HashMap<NodeId, u64> = HashMap::new();
            let mut fetches = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (url, content) in &objects {
                    let (bytes, report) = client.get(url).await.expect("every fetch completes");
                    assert!(bytes == *content, "verified bytes of {url}");
                    for (id, used) in report.nodes {
                        *from_node.entry(id).or_default() += used.bytes;
                    }
                    fetches += 1;
                }
            }
            (fetches, from_node)
        })
    };

    // Until the off window has started and the tracker rests the budget node: each round reads both
    // nodes' own view, then asks the tracker for a schedule.
    let (mut off_listed, mut off_seen, mut budget_listed) = (0u32, false, 0u32);
    let mut budget_rested_with = None;
    let started = Instant::now();
    while !(off_seen && budget_rested_with.is_some()) {
        assert!(started.elapsed() < Duration::from_secs(180), "neither the window nor the budget ran out");
        let (off_status, budget_status) = (cluster.node_status(off).await, cluster.node_status(budget).await);
        let listed: Vec<NodeId> = resolve(&cluster, &objects[0].0).await.nodes.iter().map(|n| n.id).collect();
        if listed.contains(&off_id) {
            assert!(!off_seen && !is_off(&off_status), "the tracker handed out a node whose off window started");
            off_listed += 1;
        }
        off_seen |= is_off(&off_status);
        if listed.contains(&budget_id) {
            let left = budget_left(&budget_status);
            assert!(left >= CHUNK, "the tracker handed out a node with {left} bytes of budget left");
            budget_listed += 1;
        }
        if budget_rested_with.is_none() && resting(&cluster, budget_id).await.as_deref() == Some("budget") {
            budget_rested_with = Some(budget_left(&cluster.node_status(budget).await));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(off_listed > 0 && budget_listed > 0, "both nodes served before their limits: {off_listed} {budget_listed}");
    let rested_with = budget_rested_with.expect("rested");
    assert!(rested_with >= CHUNK, "the tracker rested the budget node before it ran out ({rested_with} left)");
    // The off node refused nothing: the tracker had stopped sending clients before the window started.
    let off_status = cluster.node_status(off).await;
    assert!(off_status["traffic"]["why"].as_str().is_some_and(|w| w.contains("Paused")), "{:#}", off_status["traffic"]);

    // A client that kept an older schedule asks the budget node for chunks until it refuses: it sends
    // whole chunks while its budget holds one, never more.
    let manifest = resolve(&cluster, &objects[1].0).await.manifest;
    let status = cluster.node_status(budget).await;
    let addr: std::net::SocketAddr = serde_json::from_value(status["quic_listen"].clone()).expect("quic addr");
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, budget_id, addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connect");
    let ticket = cluster.ticket(&[(budget_id, 1000)]);
    let deadlines = Deadlines { first_byte: Duration::from_secs(20), stall: Duration::from_secs(10) };
    let mut direct = 0u64;
    let refusal = 'ask: loop {
        for i in 0..manifest.chunks.len() {
            let (offset, length) = manifest.chunk_span(i);
            let req = ChunkRequest {
                hash: manifest.chunks[i],
                range: None,
                origin: Some(OriginHint { url: objects[1].0.clone(), offset, length }),
                receipt: None,
                ticket: Some(ticket.clone()),
                groups: None,
            };
            match chunk::request(&conn, &req, length, deadlines, None).await {
                Ok(bytes) => direct += bytes.len() as u64,
                Err(e) => break 'ask e,
            }
        }
    };
    assert!(matches!(refusal, ChunkError::Refused { status: Status::Busy, .. }), "{refusal:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.status_addr(budget)))
        .await
        .expect("node metrics")
        .text()
        .await
        .expect("text");
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fog_node_upload_refusals_total{reason=\"budget\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(counted >= Some(1), "the refusal is not in the node's metrics:\n{metrics}");

    stop.store(true, Ordering::Relaxed);
    let (fetches, from_node) = fetcher.await.expect("the client saw no failure");
    let status = cluster.node_status(budget).await;
    let spent = &status["upload"]["budget"];
    let used = spent["used"].as_u64().expect("used") + spent["reserved"].as_u64().expect("reserved");
    let to_clients = from_node.get(&budget_id).copied().unwrap_or(0) + direct;
    assert!(used <= BUDGET && used + CHUNK > BUDGET, "the budget ran out to the chunk: {spent:#}");
    assert!(to_clients <= BUDGET, "clients received {to_clients} bytes of a {BUDGET}-byte budget");
    assert!(fetches > 0);

    // Out of budget, it is not handed out again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (url, _) in &objects {
        let r = resolve(&cluster, url).await;
        assert!(r.nodes.iter().all(|n| n.id != budget_id && n.id != off_id), "a spent or off node handed out");
    }
    assert_eq!(resting(&cluster, budget_id).await.as_deref(), Some("budget"));
    assert_eq!(resting(&cluster, off_id).await.as_deref(), Some("off"));
}
