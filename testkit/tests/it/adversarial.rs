//! Attacks from one host on 127.0.0.1, each bounded in count and time, against real processes: the
//! attacked process stays responsive and legitimate clients keep getting verified bytes from the fog.

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::api::Signed;
use fog_proto::credits::{Commitment, Digest, Receipt, SessionId, TicketId, KIND_COMMITMENT, MAX_CHAIN};
use fog_proto::wire::ChunkRequest;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{resolve, resolve_response, MIB};

/// Receipt-only requests whose chains claim a million links, each under a fresh throwaway key: walking
/// one used to cost the node ~110 ms of CPU on an async worker. They are refused before any hashing
/// (the connection was served nothing), and a real client keeps getting fog bytes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_paying_for_undelivered_chunks_cost_nothing() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let content = test_bytes(4 * MIB, 31);
    cluster.origin.put("a.bin", content.clone());
    let r = resolve(&cluster, &cluster.origin.url("a.bin")).await;
    let node = r.nodes[0].clone();

    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, node.id, node.addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connect");
    const FLOOD: usize = 200;
    let flood = tokio::spawn(async move {
        for i in 0..FLOOD {
            let key = SigningKey::from_bytes(&[i as u8 ^ 0x5a; 32]);
            let c = Commitment {
                session: SessionId([i as u8; 16]),
                ticket_id: TicketId([0; 32]),
                node: node.id,
                anchor: Digest([1; 32]),
                length: MAX_CHAIN,
                epoch: 0,
            };
            let receipt = Receipt {
                commitment: Signed::sign(&key, KIND_COMMITMENT, &c),
                index: MAX_CHAIN,
                preimage: Digest([2; 32]),
            };
            let req = ChunkRequest::receipt_only(serde_json::to_vec(&receipt).expect("json"));
            chunk::request(
                &conn,
                &req,
                0,
                Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) },
                None,
            )
            .await
            .expect("the node answers");
        }
    });
    let (bytes, report) = cluster.client().get(&cluster.origin.url("a.bin")).await.expect("fetch under attack");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
    flood.await.expect("flood");

    let status = cluster.node_status(0).await;
    assert!(status["credits"]["receipts_refused"].as_u64() >= Some(FLOOD as u64), "{:#}", status["credits"]);
    assert!(cluster.nodes[0].log_text().contains("its connection delivered at most"), "refusal reason not logged");
}

/// A request body sent one byte a second is cut off after the body deadline with a clear error, and the
/// tracker keeps answering heartbeats and resolves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_are_cut_off_and_the_tracker_keeps_answering() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let content = test_bytes(2 * MIB, 32);
    cluster.origin.put("b.bin", content.clone());

    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut s = tokio::net::TcpStream::connect(&cluster.tracker.addr).await.expect("connect");
        let head = "POST /v1/nodes/heartbeat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n";
        s.write_all(head.as_bytes()).await.expect("headers");
        slow.push(s);
    }
    let started = Instant::now();
    let dribble = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..15 {
            for s in &mut slow {
                let _ = s.write_all(b" ").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for mut s in slow {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.ok().and_then(Result::ok);
            answers.push(String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).to_string());
        }
        answers
    });
    // Meanwhile the node stays healthy (its heartbeats are answered) and clients are served by the fog.
    while started.elapsed() < Duration::from_secs(12) {
        let (bytes, report) = cluster.client().get(&cluster.origin.url("b.bin")).await.expect("fetch");
        assert!(bytes == content);
        assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
        assert_eq!(cluster.stats().await.nodes_healthy, 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let answers = dribble.await.expect("dribble");
    let cut = answers.iter().filter(|a| a.starts_with("HTTP/1.1 400") && a.contains("send it faster")).count();
    assert_eq!(cut, answers.len(), "slow bodies were not all cut off: {:?}", answers.first());
}

/// Spellings of one URL (dot segments, percent-encoded dots, a fragment, an upper-case host) are one
/// object: one ingest, one manifest. Credentials in a URL are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_one_url_share_one_manifest() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    cluster.origin.put("c.bin", test_bytes(3 * MIB, 33));
    let plain = cluster.origin.url("c.bin");
    let base = cluster.origin.base_url();
    let spellings = [
        plain.clone(),
        format!("{base}x/../c.bin"),
        format!("{base}x/%2e%2E/./c.bin"),
        format!("{plain}#t=10"),
        plain.replace("http://", "HTTP://"),
    ];
    let mut ids = Vec::new();
    for url in &spellings {
        ids.push(resolve(&cluster, url).await.content_id);
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(cluster.origin.requests_for("c.bin"), 1, "each spelling was ingested again");

    let with_user = plain.replace("http://", "http://user:pw@");
    assert_eq!(resolve_response(&cluster, &with_user).await.status().as_u16(), 400);
}

/// Query-string variants of one URL are distinct objects to an origin; a source asking for many new ones
/// gets its share of ingests and then `429`, while objects already ingested still resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_ingests_are_shared_per_source() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    cluster.origin.put("q.bin", test_bytes(10_000, 34));
    let url = cluster.origin.url("q.bin");
    let mut statuses = Vec::new();
    for i in 0..80 {
        statuses.push(resolve_response(&cluster, &format!("{url}?v={i}")).await.status().as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 10, "no share enforced: {statuses:?}");
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert_eq!(resolve_response(&cluster, &format!("{url}?v=0")).await.status().as_u16(), 200, "a stored object");
}

/// A registered origin's huge playlists, asked for under many names, cost the player proxy bounded memory:
/// playlists are cached by bytes and the segment index by segments and URL bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_playlists_leave_the_player_proxy_small() {
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let mut list = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:1\n");
    let mut segment = 0;
    while list.len() < (4 << 20) - 64 {
        list.push_str(&format!("#EXTINF:1,\n/media/seg{segment}.ts\n"));
        segment += 1;
    }
    cluster.origin.put("big.m3u8", list.into_bytes());
    let args: Vec<String> =
        vec!["proxy".into(), "--tracker".into(), cluster.tracker_url(), "--listen".into(), "127.0.0.1:0".into()];
    let proxy = fog_testkit::harness::Proc::spawn("fog", &args, cluster.dir.path().join("proxy.log")).await;
    let http = reqwest::Client::new();
    let fetch = |i: usize| {
        let url = fog_client::proxy::proxied_url(&cluster.origin.url(&format!("big.m3u8?v={i}")), &proxy.addr);
        http.get(url.expect("proxied url")).send()
    };
    let first = fetch(0).await.expect("playlist");
    assert_eq!(first.status().as_u16(), 200);
    assert!(first.bytes().await.expect("body").len() > 4 << 20, "rewritten playlist");
    let before = proxy.rss_bytes();
    for i in 1..=32 {
        let r = fetch(i).await.expect("playlist");
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.expect("body");
    }
    let grown = proxy.rss_bytes().saturating_sub(before);
    eprintln!("{segment} segments a playlist; proxy RSS {} MiB, grown {} MiB", proxy.rss_bytes() >> 20, grown >> 20);
    // Measured: 55–95 MiB, most of it allocator arenas holding transient buffers; every playlist kept
    // would be 7.4 MiB (rewritten), 240 MiB for these.
    assert!(grown < 128 << 20, "32 playlists of 4 MiB grew the proxy by {} MiB", grown >> 20);
}

/// Fields a stranger sends are bounded: oversized strings and counters no real node or client reaches are
/// refused with 400 and leave the tracker's totals sound; redeems from keys the tracker never registered
/// are refused before they can write anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_fields_and_junk_redeems_are_refused() {
    use fog_proto::api::{ClientReport, Heartbeat, NodeStats, Register, KIND_HEARTBEAT, KIND_REGISTER};
    use fog_proto::credits::{RedeemBatch, KIND_REDEEM};
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    // A refused oversized body may close its connection: no connection is reused.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let post =
        |path: &str, body: serde_json::Value| http.post(format!("{}{path}", cluster.tracker_url())).json(&body).send();
    let status = |r: reqwest::Result<reqwest::Response>| r.expect("tracker answers").status().as_u16();
    let key = SigningKey::from_bytes(&[0x77; 32]);
    let now = fog_proto::api::now_ms();
    let register = |version: String, ts: u64| Register {
        quic_addr: "127.0.0.1:9".parse().expect("addr"),
        cache_capacity: 1 << 30,
        upload_limit: None,
        version,
        timestamp_ms: ts,
        joining: false,
        region: None,
    };

    let long = register("v".repeat(1 << 20), now);
    assert_eq!(status(post("/v1/nodes/register", signed(&key, KIND_REGISTER, &long)).await), 400, "1 MiB version");
    let junk = RedeemBatch { timestamp_ms: now, receipts: Vec::new(), tickets: Vec::new() };
    assert_eq!(
        status(post("/v1/credits/redeem", signed(&key, KIND_REDEEM, &junk)).await),
        401,
        "unregistered redeemer"
    );

    assert_eq!(
        status(post("/v1/nodes/register", signed(&key, KIND_REGISTER, &register("1.0".into(), now + 1))).await),
        200
    );
    let huge = NodeStats { bytes_served: u64::MAX, ..Default::default() };
    let hb = Heartbeat {
        timestamp_ms: now + 2,
        stats: huge,
        draining: false,
        overlay: None,
        web_transport: None,
        upload_plan: None,
    };
    assert_eq!(status(post("/v1/nodes/heartbeat", signed(&key, KIND_HEARTBEAT, &hb)).await), 400, "u64::MAX served");
    let report = ClientReport { fog_bytes: u64::MAX, ..Default::default() };
    assert_eq!(status(post("/v1/reports", serde_json::to_value(&report).expect("json")).await), 400);

    let summary: serde_json::Value = http
        .get(format!("{}/v1/dashboard/summary", cluster.tracker_url()))
        .send()
        .await
        .expect("summary")
        .json()
        .await
        .expect("json");
    let mut numbers = vec![&summary];
    while let Some(v) = numbers.pop() {
        match v {
            serde_json::Value::Array(a) => numbers.extend(a),
            serde_json::Value::Object(o) => numbers.extend(o.values()),
            // Timestamps are the largest honest numbers here (~2^41); a refused report would be ~2^64.
            n => assert!(n.as_f64().is_none_or(|n| n < (1u64 << 50) as f64), "a refused report counted: {summary:#}"),
        }
    }
}

/// Chunk requests with origin hints for chunks nobody asked the tracker for (made-up hashes, whole-object
/// lengths): without a tracker-signed ticket that assigns chunks to the node, a hint makes it download
/// nothing; with one, only as many chunks as the ticket assigned (and a retry or two). Clients that
/// resolved keep being filled through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_hints_without_a_ticket_download_nothing() {
    use fog_proto::wire::{OriginHint, Status};
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let content = test_bytes(4 * MIB, 32);
    cluster.origin.put("big.bin", content.clone());
    let url = cluster.origin.url("big.bin");
    let status = cluster.node_status(0).await;
    let id: fog_proto::NodeId = serde_json::from_value(status["node_id"].clone()).expect("node id");
    let addr: std::net::SocketAddr = serde_json::from_value(status["quic_listen"].clone()).expect("quic addr");
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = transport::connect(&endpoint, id, addr, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connect");
    let deadlines = Deadlines { first_byte: Duration::from_secs(20), stall: Duration::from_secs(10) };
    let length = content.len() as u32;
    let ask = |i: u64, ticket: Option<Vec<u8>>| {
        let req = ChunkRequest {
            hash: fog_proto::ChunkHash::of(&i.to_be_bytes()),
            range: None,
            origin: Some(OriginHint { url: url.clone(), offset: 0, length }),
            receipt: None,
            ticket,
            groups: None,
        };
        let conn = conn.clone();
        async move { chunk::request(&conn, &req, length, deadlines, None).await }
    };
    let refused = |r: Result<bytes::Bytes, chunk::ChunkError>| {
        assert!(matches!(r, Err(chunk::ChunkError::Refused { status: Status::NotFound, .. })), "{r:?}");
    };
    const FLOOD: u64 = 50;
    let forged = {
        let mut t: Signed = serde_json::from_slice(&cluster.ticket(&[(id, 1000)])).expect("ticket");
        t.payload = t.payload.replace("1000", "1001");
        serde_json::to_vec(&t).expect("json")
    };
    for i in 0..FLOOD {
        refused(ask(i, None).await);
        refused(ask(i, Some(forged.clone())).await);
        refused(ask(i, Some(cluster.ticket(&[(fog_proto::NodeId([7; 32]), 1000)]))).await);
    }
    assert_eq!(cluster.origin.requests_for("big.bin"), 0, "hints without a ticket reached the origin");
    let counters = &cluster.node_status(0).await["counters"];
    assert_eq!(counters["unlicensed_hints"].as_u64(), Some(3 * FLOOD), "{counters:#}");

    // A genuine ticket assigning one chunk licenses that chunk and a retry or two, then no more.
    let ticket = cluster.ticket(&[(id, 1)]);
    for i in 0..FLOOD {
        let r = ask(FLOOD + i, Some(ticket.clone())).await;
        assert!(matches!(r, Err(chunk::ChunkError::Refused { .. })), "{r:?}");
    }
    let pulled = cluster.origin.requests_for("big.bin");
    assert!((1..=3).contains(&pulled), "one ticket for one chunk made the node pull {pulled} times");

    // Clients that resolved are filled through as before.
    let (bytes, report) = cluster.client().get(&url).await.expect("fetch");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
}

/// Live dashboard streams held open from one host: a few per source, then `429`; a closed one frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_holds_a_few_live_dashboards() {
    let cluster = Cluster::start(ClusterOptions { nodes: 0, ..Default::default() }).await;
    let http = reqwest::Client::new();
    let open = || http.get(format!("{}/v1/dashboard/stream", cluster.tracker_url())).send();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = open().await.expect("stream");
        assert_eq!(s.status().as_u16(), 200);
        assert!(s.chunk().await.expect("first summary").is_some());
        streams.push(s);
    }
    let refused = open().await.expect("answer");
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.text().await.expect("body").contains("close one"));
    streams.pop();
    let started = Instant::now();
    loop {
        let s = open().await.expect("answer");
        if s.status().as_u16() == 200 {
            break;
        }
        // The tracker notices a closed stream at its next summary.
        assert!(started.elapsed() < Duration::from_secs(20), "a closed stream kept its slot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signed<T: serde::Serialize>(key: &SigningKey, kind: &str, msg: &T) -> serde_json::Value {
    serde_json::to_value(Signed::sign(key, kind, msg)).expect("json")
}
