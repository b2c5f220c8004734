//! Verified cut-through (#17): a miss reaches the client group by group as each group verifies at every
//! tier (origin → the chunk's home → the edge node → the client), not after each tier stored the whole
//! chunk. The origin sends at 1 MB/s, so "the first bytes arrived while the origin was still sending the
//! chunk" says "cut-through" without timing anything; store-and-forward could not pass it.

use std::num::NonZeroU64;
use std::time::Duration;

use bytes::Bytes;
use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::groups::{GroupHashes, DEFAULT_GROUP_SIZE};
use fog_proto::placement::top_k;
use fog_proto::wire::{ChunkRequest, OriginHint};
use fog_proto::ChunkHash;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::origin::Quirks;
use fog_testkit::test_bytes;
use tokio::io::AsyncReadExt;

use crate::common::{meshed, MIB};

const SLOW: Quirks = Quirks { ignore_range: false, omit_length: false, rate: NonZeroU64::new(1_000_000) };

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_passed_on_group_by_group_through_the_home_and_the_edge() {
    let cluster = Cluster::start(ClusterOptions { nodes: 3, ..Default::default() }).await;
    let content = Bytes::from(test_bytes(2 * MIB, 41));
    cluster.origin.put("cut.bin", content.clone());
    let hash = ChunkHash::of(&content);
    let hint = OriginHint { url: cluster.origin.url("cut.bin"), offset: 0, length: content.len() as u32 };
    let ids = meshed(&cluster, 3).await;
    cluster.origin.set_quirks(SLOW);

    // Node 0 misses and asks the chunk's home, which pulls it from the origin.
    let status = cluster.node_status(0).await;
    let addr: std::net::SocketAddr = serde_json::from_value(status["quic_listen"].clone()).expect("quic addr");
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, ids[0], addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("handshake");
    let req = ChunkRequest {
        hash,
        range: None,
        origin: Some(hint.clone()),
        receipt: None,
        ticket: Some(cluster.ticket(&[(ids[0], 1)])),
        groups: Some((DEFAULT_GROUP_SIZE, GroupHashes::of(&content, DEFAULT_GROUP_SIZE))),
    };
    let deadlines = Deadlines { first_byte: Duration::from_secs(20), stall: Duration::from_secs(10) };
    let mut got = Vec::new();
    let mut origin_sent_at_first_piece = None;
    chunk::request_into(&conn, &req, hint.length, deadlines, None, &mut |piece| {
        origin_sent_at_first_piece.get_or_insert_with(|| cluster.origin.bytes_sent_for("cut.bin"));
        got.extend_from_slice(&piece);
        true
    })
    .await
    .expect("chunk");
    assert!(got == content, "the chunk arrived wrong");
    let sent = origin_sent_at_first_piece.expect("some bytes");
    assert!(sent < content.len() as u64, "the first bytes waited for the whole chunk ({sent} bytes from the origin)");

    // Through the home: the edge filled from its peer, the home from the origin, once.
    let home = [1, 2][top_k(&hash, &[ids[1], ids[2]], 1)[0]];
    let (edge, home) = (cluster.node_status(0).await, cluster.node_status(home).await);
    assert_eq!((counter(&edge, "peer_fills"), counter(&edge, "origin_fills")), (1, 0), "{edge:#}");
    assert_eq!((counter(&home, "home_fills"), counter(&home, "origin_fills")), (1, 1), "{home:#}");
    assert_eq!(cluster.origin.requests_for("cut.bin"), 1);
}

/// The client hands verified groups to the player as they arrive: a 2 MiB chunk's first bytes reach the
/// player while the origin is still sending the chunk to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_player_gets_the_first_group_before_the_chunk_is_whole() {
    let tracker_args = vec!["--chunk-size".into(), "2MiB".into()];
    let cluster = Cluster::start(ClusterOptions { nodes: 1, tracker_args, ..Default::default() }).await;
    cluster.wait_healthy(1).await;
    let content = test_bytes(2 * MIB, 42);
    cluster.origin.put("player.bin", content.clone());
    let url = cluster.origin.url("player.bin");
    let client = cluster.client();
    // Ingested at full speed; the node's fill then runs at 1 MB/s.
    let resolved = client.resolve(&url, None, 0).await.expect("resolve");
    assert!(resolved.manifest().is_complete() && resolved.manifest().groups.is_some());
    let ingested = cluster.origin.bytes_sent_for("player.bin");
    cluster.origin.set_quirks(SLOW);

    let (mut reader, mut writer) = tokio::io::duplex(4 * MIB);
    let fetch = tokio::spawn({
        let client = client.clone();
        async move {
            let mut written = 0;
            client.fetch_resolved(&resolved, Default::default(), &mut writer, &mut written).await
        }
    });
    let mut first = vec![0; DEFAULT_GROUP_SIZE as usize];
    reader.read_exact(&mut first).await.expect("first group");
    let sent = cluster.origin.bytes_sent_for("player.bin") - ingested;
    assert!(first[..] == content[..first.len()]);
    assert!(sent < content.len() as u64, "the player waited for the whole chunk ({sent} bytes from the origin)");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).await.expect("the rest");
    let report = fetch.await.expect("task").expect("fetch");
    assert!([first, rest].concat() == content, "the object arrived wrong");
    assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
}
