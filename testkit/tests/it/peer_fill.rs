//! Tiered peer fill between real nodes (libp2p on loopback): a miss asks the chunk's home to fill it through
//! — among the node's cell (the tracker's default) or its nearest peers — so a cell or neighbourhood pulls
//! each chunk from the origin once.

use std::time::Duration;

use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::placement::top_k;
use fog_proto::wire::{ChunkRequest, OriginHint};
use fog_proto::{ChunkHash, NodeId};
use fog_sched::cells::home_order;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

use crate::common::meshed;

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// Asks node `i` directly for the chunk, as a client would, with an origin hint and a ticket that assigns
/// the chunk to it.
async fn ask(cluster: &Cluster, i: usize, hash: ChunkHash, hint: &OriginHint) -> bytes::Bytes {
    let status = cluster.node_status(i).await;
    let id: NodeId = serde_json::from_value(status["node_id"].clone()).expect("node id");
    let ticket = Some(cluster.ticket(&[(id, 1)]));
    let addr: std::net::SocketAddr = serde_json::from_value(status["quic_listen"].clone()).expect("quic addr");
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, id, addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("handshake");
    let req = ChunkRequest { hash, range: None, origin: Some(hint.clone()), receipt: None, ticket, groups: None };
    let deadlines = Deadlines { first_byte: Duration::from_secs(20), stall: Duration::from_secs(10) };
    chunk::request(&conn, &req, hint.length, deadlines, None).await.expect("chunk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_filled_through_the_chunks_home_and_the_origin_is_asked_once() {
    // Homes among the nearest peers (no cells): the node's own neighbourhood, itself left out.
    let no_cells = vec!["--cell-ms".to_string(), "0".to_string()];
    let cluster = Cluster::start(ClusterOptions { nodes: 3, tracker_args: no_cells, ..Default::default() }).await;
    let content = test_bytes(1 << 20, 5);
    cluster.origin.put("tiered.bin", content.clone());
    let hash = ChunkHash::of(&content);
    let hint = OriginHint { url: cluster.origin.url("tiered.bin"), offset: 0, length: content.len() as u32 };
    let ids = meshed(&cluster, 3).await;
    // Node 0 misses; its home for the chunk is the peer rendezvous ranks first among nodes 1 and 2.
    let home = [1, 2][top_k(&hash, &[ids[1], ids[2]], 1)[0]];
    let other = 3 - home;
    assert_eq!(ask(&cluster, 0, hash, &hint).await, content);
    let (edge, home_status) = (cluster.node_status(0).await, cluster.node_status(home).await);
    assert_eq!(cluster.origin.requests_for("tiered.bin"), 1, "edge {edge:#}\nhome {home_status:#}");
    assert_eq!((counter(&edge, "peer_fills"), counter(&edge, "origin_fills")), (1, 0), "{edge:#}");
    assert_eq!((counter(&home_status, "home_fills"), counter(&home_status, "origin_fills")), (1, 1), "{home_status:#}");

    // The third node misses too: whichever of its peers it asks first holds the chunk now.
    assert_eq!(ask(&cluster, other, hash, &hint).await, content);
    let third = cluster.node_status(other).await;
    assert_eq!((counter(&third, "peer_fills"), counter(&third, "origin_fills")), (1, 0), "{third:#}");
    assert_eq!(cluster.origin.requests_for("tiered.bin"), 1, "the neighbourhood pulled the chunk twice");
}

/// With cells (the tracker's default), whichever node of a cell a client asks, the miss goes to the same
/// member: the chunk's home in the cell's order, which fills it from the origin once — itself, when the
/// edge is the home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_cell_finds_the_same_home_and_the_origin_is_asked_once() {
    // One region label: on two loaded cores loopback RTTs can spread coordinates over several grid cells.
    let region = vec!["--region".to_string(), "loopback".to_string()];
    let cluster = Cluster::start(ClusterOptions { nodes: 3, node_args: region, ..Default::default() }).await;
    let ids = meshed(&cluster, 3).await;
    // Wait until every node holds the whole list.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        loop {
            let status = cluster.node_status(i).await;
            if status["overlay"]["cell_members"].as_u64() == Some(3) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "node {i} has no full cell list: {:#}", status["overlay"]);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut homed = [0u64; 3];
    for c in 0..6u64 {
        let name = format!("cell-{c}.bin");
        let content = test_bytes(256 << 10, 40 + c);
        cluster.origin.put(&name, content.clone());
        let hash = ChunkHash::of(&content);
        let hint = OriginHint { url: cluster.origin.url(&name), offset: 0, length: content.len() as u32 };
        homed[home_order(&hash, &ids, |_| true, 1)[0]] += 1;
        for i in 0..3 {
            assert_eq!(ask(&cluster, i, hash, &hint).await, content, "chunk {c} from node {i}");
        }
        assert_eq!(cluster.origin.requests_for(&name), 1, "chunk {c}: the cell pulled it more than once");
    }
    // Each chunk came from the origin through its home, whether the home was asked by a client or a peer.
    for (i, want) in homed.iter().enumerate() {
        let status = cluster.node_status(i).await;
        assert_eq!(counter(&status, "origin_fills"), *want, "node {i}: {status:#}");
    }
}

/// A node joining a warm fog is scheduled only once its overlay neighbourhood is connected; from then on its
/// misses are filled by its peers and viewers get every byte from the fog. (Zero origin requests is checked
/// with real RTTs in `netns.rs`: here, on two loaded cores, a peer late by 2 s is rightly skipped for the
/// origin.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_scheduled_once_connected_and_fills_from_its_peers() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        tracker_args: vec!["--chunk-size".into(), "256KiB".into()],
        ..Default::default()
    })
    .await;
    for i in 0..3 {
        cluster
            .wait_node_status(i, "direct connections to both other nodes", |s| {
                s["overlay"]["direct_peers"].as_u64() >= Some(2)
            })
            .await;
    }
    // 32 chunks: the scheduler places some of them on the newcomer first, whatever its id.
    let content = test_bytes(8 << 20, 6);
    cluster.origin.put("warm.bin", content.clone());
    let url = cluster.origin.url("warm.bin");
    let (bytes, _) = cluster.client().get(&url).await.expect("warm-up fetch");
    assert!(bytes == content);

    // Clients fetch all along, so they meet the newcomer from the moment the tracker first schedules it.
    let fetching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let client = cluster.client();
    let viewers = tokio::spawn({
        let (fetching, url, content) = (fetching.clone(), url.clone(), content.clone());
        async move {
            while fetching.load(std::sync::atomic::Ordering::Relaxed) {
                let (bytes, report) = client.get(&url).await.expect("fetch");
                assert!(bytes == content);
                assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
            }
        }
    });
    let newcomer = cluster.add_node(&[]).await;
    cluster.wait_healthy(4).await;
    cluster.wait_node_status(newcomer, "serving clients", |s| counter(s, "requests") >= 8).await;
    fetching.store(false, std::sync::atomic::Ordering::Relaxed);
    viewers.await.expect("viewers");
    let status = cluster.node_status(newcomer).await;
    assert!(counter(&status, "peer_fills") > 0, "the newcomer filled nothing from its peers: {status:#}");
    assert!(cluster.nodes[newcomer].log_text().contains("overlay neighbourhood connected"));
}
