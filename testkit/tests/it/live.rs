//! Live push (#17, item 3): players watch a live HLS playlist through their proxies; the proxies tell the
//! tracker, which follows the playlist, ingests each new segment once and pushes it to its home in the
//! players' cell before they ask. The players then get every new segment from the fog, byte for byte, and
//! the origin serves each one twice in all — the tracker's read and the home's fill — however many watch.

use std::time::{Duration, Instant};

use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::wire::ChunkRequest;
use fog_proto::{ChunkHash, NodeId};
use fog_testkit::harness::{Cluster, ClusterOptions, Proc};
use fog_testkit::test_bytes;

use crate::common::meshed;

/// Each segment is one chunk (the tracker's default chunk is 1 MiB).
const SEGMENT: usize = 300 << 10;
const PLAYLIST: &str = "live/index.m3u8";

/// A live media playlist (no `#EXT-X-ENDLIST`) listing segments `0..=last`, reloaded every second.
fn playlist(last: usize) -> String {
    let mut text = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n".to_string();
    for i in 0..=last {
        text.push_str(&format!("#EXTINF:1.0,\nseg{i}.ts\n"));
    }
    text
}

async fn proxy(cluster: &Cluster, name: &str) -> Proc {
    let args: Vec<String> =
        vec!["proxy".into(), "--tracker".into(), cluster.tracker_url(), "--listen".into(), "127.0.0.1:0".into()];
    Proc::spawn("fog", &args, cluster.dir.path().join(format!("proxy-{name}.log"))).await
}

/// What a player gets for `path` through `proxy`.
async fn through(proxy: &Proc, cluster: &Cluster, path: &str) -> Vec<u8> {
    let url = fog_client::proxy::proxied_url(&cluster.origin.url(path), &proxy.addr).expect("proxied url");
    let r = reqwest::get(url).await.expect("proxy request");
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.bytes().await.expect("proxy body").to_vec()
}

/// The tracker's metric sample `name` (with its labels), 0 if absent.
async fn metric(cluster: &Cluster, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", cluster.tracker_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Waits until the tracker's metric `name` reaches `at_least`.
async fn wait_metric(cluster: &Cluster, name: &str, at_least: f64) {
    let started = Instant::now();
    while metric(cluster, name).await < at_least {
        assert!(started.elapsed() < Duration::from_secs(60), "{name} did not reach {at_least} in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of the nodes hold `chunk`: asked as a stranger would, without an origin hint or a ticket, a
/// node answers only from its store.
async fn holders(cluster: &Cluster, ids: &[NodeId], chunk: &[u8]) -> usize {
    let hash = ChunkHash::of(chunk);
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
    let mut held = 0;
    for (i, id) in ids.iter().enumerate() {
        let status = cluster.node_status(i).await;
        let addr = serde_json::from_value(status["tracker"]["advertised_addr"].clone()).expect("node address");
        let timeout = Duration::from_secs(10);
        let conn = transport::connect(&endpoint, *id, addr, timeout, timeout).await.expect("handshake");
        let req = ChunkRequest { hash, range: None, origin: None, receipt: None, ticket: None, groups: None };
        if let Ok(bytes) = chunk::request(&conn, &req, chunk.len() as u32, deadlines, None).await {
            assert!(bytes == chunk, "node {i} holds wrong bytes");
            held += 1;
        }
        conn.close(0u32.into(), b"done");
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_live_segments_reach_the_viewers_cell_before_they_ask() {
    let cluster = Cluster::start(ClusterOptions { nodes: 3, ..Default::default() }).await;
    let ids = meshed(&cluster, 3).await;
    let segments: Vec<Vec<u8>> = (0..6).map(|i| test_bytes(SEGMENT, 170 + i as u64)).collect();
    for (i, bytes) in segments.iter().enumerate().take(3) {
        cluster.origin.put(&format!("live/seg{i}.ts"), bytes.clone());
    }
    cluster.origin.put(PLAYLIST, playlist(2));

    // Two players, each through its own proxy, load the playlist (the proxies report it) and play it.
    let players = [proxy(&cluster, "a").await, proxy(&cluster, "b").await];
    for player in &players {
        let text = String::from_utf8(through(player, &cluster, PLAYLIST).await).expect("text playlist");
        assert!(text.contains("seg2.ts"), "{text}");
        for (i, bytes) in segments.iter().enumerate().take(3) {
            assert!(through(player, &cluster, &format!("live/seg{i}.ts")).await == *bytes, "segment {i}");
        }
    }
    // The tracker follows the playlist: it has read it once, learning the segments listed so far.
    wait_metric(&cluster, "fog_tracker_live_polls_total{result=\"ok\"}", 1.0).await;
    assert_eq!(metric(&cluster, "fog_tracker_live_playlists").await, 1.0);

    for (i, segment) in segments.iter().enumerate().skip(3) {
        let path = format!("live/seg{i}.ts");
        cluster.origin.put(&path, segment.clone());
        cluster.origin.put(PLAYLIST, playlist(i));
        // Published: the tracker's next poll finds it, ingests it and pushes it to the players' cell.
        wait_metric(&cluster, "fog_tracker_live_pushes_total{result=\"ok\"}", (i - 2) as f64).await;
        assert_eq!(cluster.origin.full_gets_for(&path), 1, "segment {i}: the tracker read it once");
        assert_eq!(cluster.origin.requests_for(&path), 2, "segment {i}: and its home filled it once");
        assert!(holders(&cluster, &ids, segment).await >= 1, "segment {i} is in the fog before anyone asks");

        for player in &players {
            // The player reloads the playlist (the proxy may serve it from its one-second cache), then asks.
            through(player, &cluster, PLAYLIST).await;
            assert!(through(player, &cluster, &path).await == *segment, "segment {i}");
        }
        assert_eq!(cluster.origin.requests_for(&path), 2, "segment {i}: both players got it from the fog");
    }
    assert_eq!(metric(&cluster, "fog_tracker_live_pushes_total{result=\"failed\"}").await, 0.0);
    assert_eq!(metric(&cluster, "fog_tracker_live_segments_total").await, 3.0, "each new segment ingested once");
}
