//! Tiered peer fill between real nodes (libp2p and the nodes' QUIC endpoints on loopback): a miss asks the
//! chunk's home to fill it through — among the node's cell (the tracker's default) or its nearest peers — so
//! a cell or neighbourhood pulls each chunk from the origin once. Fills travel over the nodes' own QUIC
//! endpoints (`fog-peer/1`), which answer registered nodes only, and wrong bytes there are punished.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::api::{
    now_ms, Heartbeat, Membership, NodeStats, OverlayReport, Register, Signed, KIND_HEARTBEAT, KIND_MEMBERSHIP,
    KIND_REGISTER,
};
use fog_proto::placement::top_k;
use fog_proto::wire::{
    ChunkRequest, OriginHint, PeerHello, PeerResponseHead, PEER_ALPN, PEER_EXPORTER_LABEL, PEER_EXPORTER_LEN,
    PEER_REFUSED,
};
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

/// The value of counter `name` (without `_total`) on node `i`'s `/metrics`.
async fn metric(cluster: &Cluster, i: usize, name: &str) -> u64 {
    let url = format!("http://{}/metrics", cluster.status_addr(i));
    let text = reqwest::get(url).await.expect("metrics").text().await.expect("metrics text");
    let line = format!("{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} on node {i}'s metrics:\n{text}"))
}

/// Node `i`'s id and QUIC address.
async fn quic_contact(cluster: &Cluster, i: usize) -> (NodeId, std::net::SocketAddr) {
    let status = cluster.node_status(i).await;
    let id = serde_json::from_value(status["node_id"].clone()).expect("node id");
    (id, serde_json::from_value(status["quic_listen"].clone()).expect("quic addr"))
}

/// A `fog-peer/1` connection to node `i` whose hello `key` signs, showing `membership`; the stream's end (a
/// welcome) or the error that refused it, and the connection.
async fn hello(
    cluster: &Cluster,
    i: usize,
    key: &SigningKey,
    membership: &Signed,
    exporter_of: Option<&quinn::Connection>,
) -> (Result<Vec<u8>, quinn::ReadToEndError>, quinn::Connection) {
    let (id, addr) = quic_contact(cluster, i).await;
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let cfg = transport::client_config_for(id, Duration::from_secs(10), PEER_ALPN);
    let conn = transport::connect_with(&endpoint, cfg, addr, Duration::from_secs(10)).await.expect("handshake");
    let mut exporter = [0u8; PEER_EXPORTER_LEN];
    // Another connection's exporter: a hello replayed from there.
    let signed_on = exporter_of.unwrap_or(&conn);
    signed_on.export_keying_material(&mut exporter, PEER_EXPORTER_LABEL, b"").expect("exporter");
    let frame = PeerHello::sign(key, &exporter, membership).encode_framed().expect("hello fits");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&frame).await.expect("send hello");
    send.finish().expect("finish");
    (recv.read_to_end(0).await, conn)
}

/// Whether `answer` is the node closing the connection as [`PEER_REFUSED`] with a reason containing `why`.
fn refused(answer: &Result<Vec<u8>, quinn::ReadToEndError>, why: &str) -> bool {
    use quinn::{ConnectionError, ReadError, ReadToEndError};
    matches!(answer, Err(ReadToEndError::Read(ReadError::ConnectionLost(ConnectionError::ApplicationClosed(c))))
        if c.error_code == PEER_REFUSED.into() && String::from_utf8_lossy(&c.reason).contains(why))
}

/// Peer fill goes over the nodes' own QUIC endpoints (`fog-peer/1`), where the uploading node's congestion
/// controller is its own: the metrics of both ends say so, and none of it went over libp2p. On that ALPN a
/// node answers only a registered node proving its key on that very connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_fills_travel_over_the_nodes_quic_endpoints_which_refuse_strangers() {
    let no_cells = vec!["--cell-ms".to_string(), "0".to_string()];
    let cluster = Cluster::start(ClusterOptions { nodes: 3, tracker_args: no_cells, ..Default::default() }).await;
    let content = test_bytes(1 << 20, 7);
    cluster.origin.put("quic-fill.bin", content.clone());
    let hash = ChunkHash::of(&content);
    let hint = OriginHint { url: cluster.origin.url("quic-fill.bin"), offset: 0, length: content.len() as u32 };
    let ids = meshed(&cluster, 3).await;
    let home = [1, 2][top_k(&hash, &[ids[1], ids[2]], 1)[0]];
    assert_eq!(ask(&cluster, 0, hash, &hint).await, content);
    assert_eq!(cluster.origin.requests_for("quic-fill.bin"), 1);
    // The edge filled over the home's QUIC endpoint; every byte the home sent to a peer went that way.
    assert_eq!(
        (metric(&cluster, 0, "fog_node_peer_fills").await, metric(&cluster, 0, "fog_node_peer_fills_quic").await),
        (1, 1)
    );
    let len = content.len() as u64;
    assert_eq!(metric(&cluster, home, "fog_node_peer_served_bytes").await, len);
    assert_eq!(metric(&cluster, home, "fog_node_peer_served_quic_bytes").await, len);

    // Strangers: a key the tracker never registered, showing a membership it signed itself; a registered
    // node's hello replayed from another connection. Both are refused, with the reason.
    let tracker = fog_net::identity::load_or_create(&cluster.dir.path().join("tracker/tracker.key")).expect("key");
    let member = |key: &SigningKey| {
        let m = Membership { node_id: key.verifying_key().into(), issued_ms: now_ms(), expiry_ms: now_ms() + 60_000 };
        Signed::sign(&tracker, KIND_MEMBERSHIP, &m)
    };
    let stranger = SigningKey::from_bytes(&[77; 32]);
    let m = Membership { node_id: stranger.verifying_key().into(), issued_ms: 0, expiry_ms: u64::MAX };
    let (answer, _) = hello(&cluster, 0, &stranger, &Signed::sign(&stranger, KIND_MEMBERSHIP, &m), None).await;
    assert!(refused(&answer, "membership not signed by the tracker"), "{answer:?}");
    let registered = SigningKey::from_bytes(&[78; 32]);
    let (welcome, first) = hello(&cluster, 0, &registered, &member(&registered), None).await;
    assert_eq!(welcome.expect("a registered node is welcomed"), Vec::<u8>::new());
    let (answer, _) = hello(&cluster, 0, &registered, &member(&registered), Some(&first)).await;
    assert!(refused(&answer, "signature"), "{answer:?}");
    // A request without a hello is no hello.
    let (id, addr) = quic_contact(&cluster, 0).await;
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let cfg = transport::client_config_for(id, Duration::from_secs(10), PEER_ALPN);
    let conn = transport::connect_with(&endpoint, cfg, addr, Duration::from_secs(10)).await.expect("handshake");
    let req = ChunkRequest { hash, range: None, origin: None, receipt: None, ticket: None, groups: None };
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&req.encode_framed().expect("fits")).await.expect("send");
    send.finish().expect("finish");
    let answer = recv.read_to_end(1 << 21).await;
    assert!(refused(&answer, "peer hello"), "{answer:?}");

    // The welcomed node is answered from the store, as a peer.
    let (mut send, mut recv) = first.open_bi().await.expect("stream");
    send.write_all(&req.encode_framed().expect("fits")).await.expect("send");
    send.finish().expect("finish");
    let answer = recv.read_to_end(2 << 20).await.expect("answer");
    let mut expected = PeerResponseHead::Ok { len: content.len() as u32 }.encode();
    expected.extend_from_slice(&content);
    assert!(answer == expected, "the chunk, as a peer answers it");
    assert_eq!(metric(&cluster, 0, "fog_node_peer_served_quic_bytes").await, len);
}

/// A scripted peer on the node's QUIC endpoint: registers in the nodes' region (so the tracker lists it in
/// their cell), welcomes every `fog-peer/1` hello and answers each fill request with bytes of the hinted
/// length that are not the chunk. Counts those requests.
struct LyingPeer {
    id: NodeId,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    heartbeats: tokio::task::JoinHandle<()>,
    _endpoint: quinn::Endpoint,
}

impl Drop for LyingPeer {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

async fn lying_peer(cluster: &Cluster, key: SigningKey, region: &str) -> LyingPeer {
    use fog_net::frame_io::read_frame;
    let config = transport::server_config(&key, 8).expect("server config");
    let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), Some(config)).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (serving, counted) = (endpoint.clone(), asked.clone());
    tokio::spawn(async move {
        while let Some(incoming) = serving.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // The tracker's dial-backs speak fog/1: completing the handshake is all they need.
                let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                if read_frame::<PeerHello, _>(&mut recv).await.is_err() {
                    return;
                }
                let _ = send.finish();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(req) = read_frame::<ChunkRequest, _>(&mut recv).await else { continue };
                    let Some(len) = req.origin.map(|o| o.length) else {
                        let _ = send.write_all(&PeerResponseHead::NotFound.encode()).await;
                        continue;
                    };
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = send.write_all(&PeerResponseHead::Ok { len }.encode()).await;
                    let _ = send.write_all(&vec![0x5a; len as usize]).await;
                    let _ = send.finish();
                }
            });
        }
    });
    let post = |path: &str, body: Signed| {
        let url = format!("{}{path}", cluster.tracker_url());
        async move { reqwest::Client::new().post(url).json(&body).send().await.map(|r| r.status().as_u16()) }
    };
    let reg = Register {
        quic_addr: addr,
        cache_capacity: 1 << 30,
        upload_limit: None,
        version: "liar".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: Some(region.into()),
    };
    assert_eq!(post("/v1/nodes/register", Signed::sign(&key, KIND_REGISTER, &reg)).await.ok(), Some(200));
    let id: NodeId = key.verifying_key().into();
    let tracker = cluster.tracker_url();
    let heartbeats = tokio::spawn(async move {
        loop {
            // An overlay address nobody answers on: the cell lists only members with one.
            let overlay = OverlayReport { addrs: vec!["/ip4/127.0.0.1/udp/9/quic-v1".into()], ..Default::default() };
            let hb = Heartbeat {
                timestamp_ms: now_ms(),
                stats: NodeStats::default(),
                draining: false,
                overlay: Some(overlay),
                web_transport: None,
                upload_plan: None,
            };
            let _ = reqwest::Client::new()
                .post(format!("{tracker}/v1/nodes/heartbeat"))
                .json(&Signed::sign(&key, KIND_HEARTBEAT, &hb))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });
    LyingPeer { id, asked, heartbeats, _endpoint: endpoint }
}

/// A cell member that sends wrong bytes over its QUIC endpoint, as the chunk's home, is not believed: the
/// node disconnects and bans it, reports it, and the client still gets the chunk (from the origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_wrong_bytes_over_quic_is_punished() {
    let region = vec!["--region".to_string(), "loopback".to_string()];
    // No probes: the tracker would quarantine the liar (health.rs tests that) and drop it from the cell.
    let no_probes = vec!["--probe-secs".to_string(), "0".to_string()];
    let cluster =
        Cluster::start(ClusterOptions { nodes: 3, node_args: region, tracker_args: no_probes, ..Default::default() })
            .await;
    let liar = lying_peer(&cluster, SigningKey::from_bytes(&[79; 32]), "loopback").await;
    let mut ids = meshed(&cluster, 3).await;
    ids.push(liar.id);
    // The tracker rebuilds cells every 30 s: wait for one that lists the liar.
    cluster
        .wait_node_status(0, "a cell list with the liar", |s| s["overlay"]["cell_members"].as_u64() == Some(4))
        .await;
    // Content whose home in the cell is the liar.
    let (content, name) = (0..200u64)
        .map(|seed| (test_bytes(256 << 10, 900 + seed), format!("lie-{seed}.bin")))
        .find(|(c, _)| home_order(&ChunkHash::of(c), &ids, |_| true, 1)[0] == 3)
        .expect("a chunk the liar is home to");
    cluster.origin.put(&name, content.clone());
    let hash = ChunkHash::of(&content);
    let hint = OriginHint { url: cluster.origin.url(&name), offset: 0, length: content.len() as u32 };
    assert_eq!(ask(&cluster, 0, hash, &hint).await, content, "the client got wrong bytes");
    assert_eq!(liar.asked.load(std::sync::atomic::Ordering::Relaxed), 1, "the liar was not asked over QUIC");
    assert_eq!(metric(&cluster, 0, "fog_node_peer_bad_chunks").await, 1);
    assert_eq!(metric(&cluster, 0, "fog_node_peer_fills").await, 0);
    assert_eq!(cluster.origin.requests_for(&name), 1, "the chunk came from the origin after the lie");
    assert!(cluster.nodes[0].log_text().contains("does not match its hash"));
    // Banned: the liar's hellos are refused from now on.
    let tracker = fog_net::identity::load_or_create(&cluster.dir.path().join("tracker/tracker.key")).expect("key");
    let m = Membership { node_id: liar.id, issued_ms: now_ms(), expiry_ms: now_ms() + 60_000 };
    let liar_key = SigningKey::from_bytes(&[79; 32]);
    let (answer, _) = hello(&cluster, 0, &liar_key, &Signed::sign(&tracker, KIND_MEMBERSHIP, &m), None).await;
    assert!(refused(&answer, "banned"), "{answer:?}");
}
