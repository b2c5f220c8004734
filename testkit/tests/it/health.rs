//! Node health as the tracker judges it: active probes (fetch a chunk the node should hold, verify it, time
//! it), hysteresis, quarantine for wrong bytes, and client reports that trigger a probe instead of being
//! believed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::transport;
use fog_proto::api::{
    ClientReport, Heartbeat, NodeFailure, NodeStats, Register, Signed, KIND_HEARTBEAT, KIND_REGISTER,
};
use fog_proto::wire::{ChunkRequest, ResponseHead, Status};
use fog_proto::{ChunkHash, NodeId};
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

use crate::common::resolve;

use fog_proto::api::now_ms;

async fn post(cluster: &Cluster, path: &str, body: &impl serde::Serialize) -> u16 {
    let url = format!("{}{path}", cluster.tracker_url());
    reqwest::Client::new().post(url).json(body).send().await.expect("post").status().as_u16()
}

/// A node run by the test: it registers, heartbeats every second, and answers every chunk request with
/// bytes of the right length that are not the chunk, or (`lengths` empty) `NotFound`; chunks put in
/// `honest` it serves as they are.
struct LyingNode {
    _endpoint: Option<quinn::Endpoint>,
    heartbeats: tokio::task::JoinHandle<()>,
    id: NodeId,
    honest: Honest,
}

type Honest = std::sync::Arc<std::sync::Mutex<HashMap<ChunkHash, Vec<u8>>>>;

impl Drop for LyingNode {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

async fn lying_node(cluster: &Cluster, key: SigningKey, lengths: HashMap<ChunkHash, u32>, answer: bool) -> LyingNode {
    let endpoint = quinn::Endpoint::server(transport::server_config(&key, 8).expect("tls"), ([127, 0, 0, 1], 0).into())
        .expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let serving = endpoint.clone();
    let honest = Honest::default();
    let truth = honest.clone();
    tokio::spawn(async move {
        while let Some(incoming) = serving.accept().await {
            let (lengths, truth) = (lengths.clone(), truth.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut len = [0u8; 2];
                    if recv.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if recv.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let req = ChunkRequest::decode(&body).expect("frame");
                    let chunk = truth.lock().expect("lock").get(&req.hash).cloned();
                    if let Some(chunk) = chunk {
                        let _ = send.write_all(&ResponseHead::Ok { len: chunk.len() as u32 }.encode()).await;
                        let _ = send.write_all(&chunk).await;
                        let _ = send.finish();
                        continue;
                    }
                    let Some(n) = lengths.get(&req.hash).copied() else {
                        let head = ResponseHead::Error { status: Status::NotFound, message: "not here".into() };
                        let _ = send.write_all(&head.encode()).await;
                        let _ = send.finish();
                        continue;
                    };
                    let _ = send.write_all(&ResponseHead::Ok { len: n }.encode()).await;
                    let _ = send.write_all(&vec![0x5a; n as usize]).await;
                    let _ = send.finish();
                }
            });
        }
    });
    let reg = Register {
        quic_addr: addr,
        cache_capacity: 1 << 30,
        upload_limit: None,
        version: "liar".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: None,
    };
    assert_eq!(post(cluster, "/v1/nodes/register", &Signed::sign(&key, KIND_REGISTER, &reg)).await, 200);
    let id: NodeId = key.verifying_key().into();
    let tracker = cluster.tracker_url();
    let heartbeats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let hb = Heartbeat {
                timestamp_ms: now_ms(),
                stats: NodeStats::default(),
                draining: false,
                overlay: None,
                web_transport: None,
                upload_plan: None,
            };
            let _ = reqwest::Client::new()
                .post(format!("{tracker}/v1/nodes/heartbeat"))
                .json(&Signed::sign(&key, KIND_HEARTBEAT, &hb))
                .send()
                .await;
        }
    });
    if !answer {
        endpoint.close(0u32.into(), b"gone");
    }
    LyingNode { _endpoint: answer.then_some(endpoint), heartbeats, id, honest }
}

async fn node_state(cluster: &Cluster, id: NodeId) -> String {
    let url = format!("{}/v1/dashboard/nodes?per_page=200", cluster.tracker_url());
    let page: Value = reqwest::get(url).await.expect("nodes").json().await.expect("json");
    let rows = page["nodes"].as_array().expect("rows");
    rows.iter()
        .find(|n| n["id"] == id.to_string())
        .map_or("gone".into(), |n| n["state"].as_str().unwrap_or("").to_string())
}

async fn wait_state(cluster: &Cluster, id: NodeId, want: &str) {
    let started = Instant::now();
    loop {
        let state = node_state(cluster, id).await;
        if state == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "node stayed {state}, expected {want}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn probing_cluster() -> ClusterOptions {
    ClusterOptions { tracker_args: vec!["--probe-secs".into(), "1".into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serving_wrong_bytes_is_quarantined_and_no_longer_scheduled() {
    let cluster = Cluster::start(probing_cluster()).await;
    cluster.origin.put("q.bin", test_bytes(3 << 20, 101));
    let url = cluster.origin.url("q.bin");
    // The manifest (ingested now) tells the liar how long each chunk is, so only the bytes are wrong.
    let manifest = resolve(&cluster, &url).await.manifest;
    let lengths = (0..manifest.chunks.len()).map(|i| (manifest.chunks[i], manifest.chunk_span(i).1)).collect();
    let liar = lying_node(&cluster, SigningKey::from_bytes(&[41; 32]), lengths, true).await;
    cluster.wait_healthy(1).await;
    wait_state(&cluster, liar.id, "quarantined").await;
    assert!(resolve(&cluster, &url).await.nodes.is_empty(), "a quarantined node is still scheduled");
    let stats = cluster.stats().await;
    assert_eq!((stats.nodes_healthy, stats.nodes_quarantined), (0, 1));
    let summary: Value = reqwest::get(format!("{}/v1/dashboard/summary", cluster.tracker_url()))
        .await
        .expect("summary")
        .json()
        .await
        .expect("json");
    assert!(summary["events"].as_array().expect("events").iter().any(|e| e["kind"] == "quarantine"), "{summary:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeating_node_that_does_not_serve_becomes_unhealthy() {
    let cluster = Cluster::start(probing_cluster()).await;
    cluster.origin.put("u.bin", test_bytes(1 << 20, 102));
    let url = cluster.origin.url("u.bin");
    resolve(&cluster, &url).await;
    let silent = lying_node(&cluster, SigningKey::from_bytes(&[42; 32]), HashMap::new(), false).await;
    wait_state(&cluster, silent.id, "unhealthy").await;
    assert!(resolve(&cluster, &url).await.nodes.is_empty());
}

/// Probes look like clients' requests (origin hint, ticket): a node that answers `NotFound` to what it could
/// fill through cannot pass them as "no data", and stops being scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_not_found_to_everything_becomes_unhealthy() {
    let cluster = Cluster::start(probing_cluster()).await;
    cluster.origin.put("n.bin", test_bytes(1 << 20, 104));
    let url = cluster.origin.url("n.bin");
    resolve(&cluster, &url).await;
    let dodger = lying_node(&cluster, SigningKey::from_bytes(&[43; 32]), HashMap::new(), true).await;
    wait_state(&cluster, dodger.id, "unhealthy").await;
    assert!(resolve(&cluster, &url).await.nodes.is_empty());
}

/// A node taken out by failed probes comes back once it serves again: unhealthy nodes are not scheduled,
/// yet probes still find them a chunk to ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_node_comes_back_once_probes_pass() {
    let cluster = Cluster::start(probing_cluster()).await;
    let content = test_bytes(2 << 20, 105);
    cluster.origin.put("b.bin", content.clone());
    let url = cluster.origin.url("b.bin");
    let manifest = resolve(&cluster, &url).await.manifest;
    let node = lying_node(&cluster, SigningKey::from_bytes(&[44; 32]), HashMap::new(), true).await;
    wait_state(&cluster, node.id, "unhealthy").await;
    let chunks = (0..manifest.chunks.len()).map(|i| {
        let (offset, len) = manifest.chunk_span(i);
        (manifest.chunks[i], content[offset as usize..(offset + u64::from(len)) as usize].to_vec())
    });
    node.honest.lock().expect("lock").extend(chunks);
    wait_state(&cluster, node.id, "active").await;
    assert_eq!(resolve(&cluster, &url).await.nodes.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_trigger_a_probe_and_an_honest_node_stays_active() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..probing_cluster() }).await;
    cluster.origin.put("h.bin", test_bytes(2 << 20, 103));
    let url = cluster.origin.url("h.bin");
    let (_, _) = cluster.client().get(&url).await.expect("fetch");
    let node = resolve(&cluster, &url).await.nodes[0].id;
    let report = ClientReport {
        node_failures: vec![NodeFailure { node, reason: "hash_mismatch".into(), count: 5 }],
        ..Default::default()
    };
    assert_eq!(post(&cluster, "/v1/reports", &report).await, 200);
    let started = Instant::now();
    loop {
        let metrics = reqwest::get(format!("{}/metrics", cluster.tracker_url()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.contains("fog_tracker_probes_total{result=\"ok\"}") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no successful probe:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(node_state(&cluster, node).await, "active", "an unverified client report changed the node's state");
}
