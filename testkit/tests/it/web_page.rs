//! The web client (`web/packages/core`, issue #14) in a real browser: headless Chromium, driven through
//! chromedriver as the dashboard test does, loads a page of a registered site that fetches an object
//! through real nodes over WebTransport, verifying every chunk and paying the nodes with receipts, and falls
//! back to the origin when the nodes are gone. Skips (saying so) where Chromium or the built bundle is missing; scripts/test.sh installs the
//! one and builds the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use fog_net::frame_io::read_frame;
use fog_net::transport::{self, WebCert, WebCertSlot};
use fog_proto::api::{
    now_ms, CertHash, Heartbeat, NodeStats, Register, Resolve, Signed, WebTransportEndpoint, KIND_HEARTBEAT,
    KIND_REGISTER,
};
use fog_proto::wire::{ChunkRequest, ResponseHead, Status};
use fog_proto::{ChunkHash, Manifest, NodeId};
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::origin::{Quirks, TestOrigin};
use fog_testkit::test_bytes;
use reqwest::header::ORIGIN;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::common::MIB;
use crate::dashboard::{Browser, Engine};

/// The bundle `npm run build` makes in web/ (scripts/test.sh runs it before the tests).
pub(crate) fn bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/packages/core/dist/fog-core.js")
}

pub(crate) const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>fogcdn web client test</title>
<script src="/fog-core.js"></script></head><body></body></html>
"#;

/// Has the page fetch `url` (a `range` of it, if given) with a new client and returns what it saw:
/// `{ok, len, blake3, stats}` or `{ok: false, error}`.
async fn fetch_in_page(browser: &Browser, tracker: &str, url: &str, range: Option<(usize, usize)>) -> Value {
    let options = match range {
        Some((offset, length)) => json!({ "range": { "offset": offset, "length": length } }),
        None => json!({}),
    };
    let script = format!(
        r#"window.outcome = undefined;
        const client = new Fog.FogClient({{ tracker: {tracker} }});
        client.fetchObject({url}, {options}).then(
            async (bytes) => {{
                const blake3 = await Fog.blake3Hex(bytes);
                let reported = "ok";
                await client.report().catch((e) => {{ reported = String(e); }});
                window.outcome = {{ ok: true, len: bytes.length, blake3, stats: client.stats(), reported }};
                client.close();
            }},
            (e) => {{ window.outcome = {{ ok: false, error: String(e), stats: client.stats() }}; }});
        return true;"#,
        tracker = json!(tracker),
        url = json!(url),
    );
    browser.eval(&script).await;
    browser.wait_for("the page's fetch", Duration::from_secs(60), "return window.outcome !== undefined").await;
    browser.eval("return window.outcome").await
}

/// A node run by the test, registered as a real one is: natively (how the tracker probes it) it serves the
/// object's chunks as they are; to pages, over WebTransport, bytes of the right length that are not the
/// chunk. Only the page's own verification can catch it.
pub(crate) struct TwoFacedNode {
    endpoint: quinn::Endpoint,
    heartbeats: tokio::task::JoinHandle<()>,
    pub(crate) id: NodeId,
}

impl Drop for TwoFacedNode {
    fn drop(&mut self) {
        self.heartbeats.abort();
        self.endpoint.close(0u32.into(), b"gone");
    }
}

pub(crate) type Chunks = Arc<HashMap<ChunkHash, Vec<u8>>>;

/// Answers one request: the chunk (or the range of it asked for), every byte flipped if `lie`; NotFound
/// for chunks it does not have.
async fn answer(mut recv: impl AsyncRead + Unpin, mut send: impl AsyncWrite + Unpin, chunks: Chunks, lie: bool) {
    let Ok(req) = read_frame::<ChunkRequest, _>(&mut recv).await else { return };
    let chunk = chunks.get(&req.hash).map(|c| match req.range {
        Some((offset, len)) => &c[offset as usize..(offset + len) as usize],
        None => &c[..],
    });
    let response = match chunk {
        Some(bytes) => {
            let mut out = ResponseHead::Ok { len: bytes.len() as u32 }.encode();
            out.extend(bytes.iter().map(|b| if lie { !b } else { *b }));
            out
        }
        None => ResponseHead::Error { status: Status::NotFound, message: "not here".into() }.encode(),
    };
    let _ = send.write_all(&response).await;
    let _ = send.shutdown().await;
}

pub(crate) async fn two_faced_node(cluster: &Cluster, chunks: Chunks) -> TwoFacedNode {
    let key = SigningKey::from_bytes(&[51; 32]);
    let web = WebCert::new(SystemTime::now()).expect("web certificate");
    let config = transport::server_config_with_web(&key, 32, Arc::new(WebCertSlot::new(&web))).expect("tls");
    let endpoint = quinn::Endpoint::server(config, ([127, 0, 0, 1], 0).into()).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let serving = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = serving.accept().await {
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let alpn = conn
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol);
                if alpn.as_deref() == Some(b"h3".as_slice()) {
                    let Ok(request) = web_transport_quinn::Request::accept(conn).await else { return };
                    let Ok(session) = request.ok().await else { return };
                    while let Ok((send, recv)) = session.accept_bi().await {
                        tokio::spawn(answer(recv, send, chunks.clone(), true));
                    }
                } else {
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(answer(recv, send, chunks.clone(), false));
                    }
                }
            });
        }
    });
    let http = reqwest::Client::new();
    let tracker = cluster.tracker_url();
    let reg = Register {
        quic_addr: addr,
        cache_capacity: 1 << 30,
        upload_limit: None,
        version: "two-faced".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: None,
    };
    let registered = http
        .post(format!("{tracker}/v1/nodes/register"))
        .json(&Signed::sign(&key, KIND_REGISTER, &reg))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), 200);
    let id: NodeId = key.verifying_key().into();
    let endpoint_for_pages = WebTransportEndpoint { port: addr.port(), cert_hashes: vec![CertHash(web.sha256())] };
    let heartbeats = tokio::spawn(async move {
        loop {
            let hb = Heartbeat {
                timestamp_ms: now_ms(),
                stats: NodeStats::default(),
                draining: false,
                overlay: None,
                web_transport: Some(endpoint_for_pages.clone()),
                upload_plan: None,
            };
            let signed = Signed::sign(&key, KIND_HEARTBEAT, &hb);
            let _ = http.post(format!("{tracker}/v1/nodes/heartbeat")).json(&signed).send().await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });
    TwoFacedNode { endpoint, heartbeats, id }
}

/// `content`'s chunks by hash, as `manifest` cuts it (what a [`TwoFacedNode`] serves).
pub(crate) fn chunks_of<'a>(
    manifest: &'a Manifest,
    content: &'a [u8],
) -> impl Iterator<Item = (ChunkHash, Vec<u8>)> + 'a {
    (0..manifest.chunks.len()).map(|i| {
        let (offset, len) = manifest.chunk_span(i);
        (manifest.chunks[i], content[offset as usize..(offset + u64::from(len)) as usize].to_vec())
    })
}

/// A site serving [`PAGE`] and the core bundle (and whatever a test puts there), with its web origin.
pub(crate) async fn core_page_site() -> (TestOrigin, String) {
    let site = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("site");
    site.put("index.html", PAGE);
    site.put("fog-core.js", std::fs::read(bundle()).expect("bundle"));
    let page_origin = format!("http://{}", site.addr);
    (site, page_origin)
}

/// Tracker flags for a cluster that ingests from `origin` (a URL prefix) and lets pages of `page_origin` use
/// the fog, probing nodes' WebTransport endpoints every second so that pages are given them soon.
pub(crate) fn web_tracker_args(origin: &str, page_origin: &str) -> Vec<String> {
    let args = ["--origin", origin, "--web-origin", page_origin, "--probe-secs", "1"];
    args.into_iter().map(String::from).collect()
}

/// Waits (up to 30 s) until a page of `page_origin` resolving `url` is given every node of the cluster.
pub(crate) async fn wait_page_gets_every_node(cluster: &Cluster, page_origin: &str, url: &str) {
    let mut ids = Vec::new();
    for i in 0..cluster.nodes.len() {
        ids.push(serde_json::from_value::<NodeId>(cluster.node_status(i).await["node_id"].clone()).expect("id"));
    }
    ids.sort_unstable();
    wait_page_nodes(cluster, page_origin, url, &ids).await;
}

/// Waits (up to 30 s) until a page's resolve of `url` lists exactly the nodes `want`.
pub(crate) async fn wait_page_nodes(cluster: &Cluster, page_origin: &str, url: &str, want: &[NodeId]) {
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        let resp = http
            .get(format!("{}/v1/resolve", cluster.tracker_url()))
            .query(&[("url", url)])
            .header(ORIGIN, page_origin)
            .send()
            .await
            .expect("resolve");
        let mut got: Vec<NodeId> =
            resp.json::<Resolve>().await.expect("resolve body").nodes.iter().map(|n| n.id).collect();
        got.sort_unstable();
        if got == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "pages are given {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Receipts the cluster's nodes refused, in all.
async fn receipts_refused(cluster: &Cluster) -> u64 {
    let mut refused = 0;
    for i in 0..cluster.nodes.len() {
        refused += cluster.node_status(i).await["credits"]["receipts_refused"].as_u64().expect("receipts refused");
    }
    refused
}

/// Asserts the page got exactly `want` (by BLAKE3, computed in the page) and returns its stats.
fn check_bytes(outcome: &Value, want: &[u8]) -> Value {
    assert_eq!(outcome["ok"], true, "the page's fetch failed: {outcome:#}");
    assert_eq!(outcome["len"].as_u64(), Some(want.len() as u64), "{outcome:#}");
    assert_eq!(outcome["blake3"].as_str(), Some(ChunkHash::of(want).to_hex().as_str()), "the page got other bytes");
    assert_eq!(outcome["reported"], "ok", "the page's report to the tracker failed: {outcome:#}");
    outcome["stats"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_fetches_verified_bytes_from_nodes_over_webtransport_and_falls_back_to_the_origin() {
    if let Some(why) = Engine::Chromium.unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    if !bundle().exists() {
        eprintln!(
            "SKIPPED: the web client is not built ({} is missing): cd web && npm ci --ignore-scripts && npm run build \
             (scripts/test.sh does, where npm is installed)",
            bundle().display()
        );
        return;
    }
    // The site: it serves the page, the bundle and the media, so the page's own origin is the origin of
    // the objects too (the page reads them with `Range`, as players read their site's media).
    let (site, page_origin) = core_page_site().await;
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        tracker_args: web_tracker_args(&site.base_url(), &page_origin),
        ..Default::default()
    })
    .await;
    let content = test_bytes(8 * MIB + 12_345, 141);
    site.put("media/movie.bin", content.clone());
    let url = site.url("media/movie.bin");
    // A native client warms the nodes, so the page finds its chunks cached whether or not it gets a ticket.
    let (got, native) = cluster.client().get(&url).await.expect("native fetch");
    assert!(got == content);
    // The tracker gives pages only nodes it probed over WebTransport: wait until it vouches for all three.
    wait_page_gets_every_node(&cluster, &page_origin, &url).await;
    let http = reqwest::Client::new();
    let tracker = cluster.tracker_url();

    let refused_before = receipts_refused(&cluster).await;
    let Some(browser) = Browser::launch(Engine::Chromium, &cluster.dir.path().join("chrome")).await else { return };
    browser.goto(&site.url("index.html")).await;
    browser.wait_for("the bundle", Duration::from_secs(20), "return typeof Fog === 'object'").await;

    // The whole object, from the nodes, every chunk verified in a worker.
    let outcome = fetch_in_page(&browser, &tracker, &url, None).await;
    let stats = check_bytes(&outcome, &content);
    eprintln!("the page's stats after fetching through the fog: {stats}");
    let fog = stats["fogBytes"].as_u64().expect("fog bytes");
    assert!(fog * 10 >= content.len() as u64 * 8, "under 80 % of the bytes came from nodes: {stats:#}");
    assert_eq!(stats["verifyInWorkers"], true, "{stats:#}");
    assert!(stats["nodes"].as_object().expect("per node").len() >= 2, "one node served everything: {stats:#}");
    let metrics = http.get(format!("{tracker}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let reported = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"fog_tracker_client_bytes_total{source="fog"} "#))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(reported >= fog, "the tracker counted {reported} fog bytes from reports, the page {fog}");
    // The page paid the nodes that served it (PayWord receipts signed in the page): nodes acknowledge every
    // receipt once checked, and count the ones they refuse.
    assert!(stats["receiptsHanded"].as_u64() >= Some(1), "{stats:#}");
    assert_eq!(receipts_refused(&cluster).await, refused_before, "a node refused a receipt from the page");

    // A range across chunk boundaries: only its bytes come back.
    let (offset, length) = (MIB + MIB / 2 + 7, 3 * MIB);
    let outcome = fetch_in_page(&browser, &tracker, &url, Some((offset, length))).await;
    check_bytes(&outcome, &content[offset..offset + length]);

    // The page hands its ticket over with its receipts (the tracker keeps no tickets), so the nodes redeem
    // them: the ledger comes to hold the native client's fog bytes and the page's.
    let wanted = native.fog_bytes + fog;
    let waited = std::time::Instant::now();
    loop {
        let all: Value =
            http.get(format!("{tracker}/v1/credits")).send().await.expect("credits").json().await.expect("json");
        let total: u64 = all.as_array().expect("list").iter().filter_map(|n| n["credited_bytes"].as_u64()).sum();
        if total >= wanted {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the page's receipts were not credited: {total} of {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every node gone: the page still gets the right bytes, from the origin, and turns the fog off for
    // itself after two failed handshakes instead of slowing the browser's later ones.
    for node in &mut cluster.nodes {
        node.kill();
    }
    let outcome = fetch_in_page(&browser, &tracker, &url, None).await;
    let stats = check_bytes(&outcome, &content);
    assert_eq!(stats["fogBytes"], 0, "{stats:#}");
    let origin = stats["originBytes"].as_u64().unwrap_or(0) + stats["passthroughBytes"].as_u64().unwrap_or(0);
    assert_eq!(origin, content.len() as u64, "{stats:#}");
    assert_eq!(stats["fogDisabled"], true, "{stats:#}");

    // A node that passes the tracker's (native) probes but serves pages wrong bytes: a fresh page is given
    // only it, verifies, gets every byte right from the origin instead, and reports the node.
    let manifest = crate::common::resolve(&cluster, &url).await.manifest;
    let liar = two_faced_node(&cluster, Arc::new(chunks_of(&manifest, &content).collect())).await;
    wait_page_nodes(&cluster, &page_origin, &url, &[liar.id]).await;
    browser.goto(&site.url("index.html")).await;
    browser.wait_for("the bundle", Duration::from_secs(20), "return typeof Fog === 'object'").await;
    let outcome = fetch_in_page(&browser, &tracker, &url, None).await;
    let stats = check_bytes(&outcome, &content);
    assert_eq!(stats["fogBytes"], 0, "{stats:#}");
    assert_eq!(stats["originBytes"].as_u64(), Some(content.len() as u64), "{stats:#}");
    let caught = stats["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .any(|f| f["node"] == liar.id.to_hex() && f["reason"] == "hash_mismatch");
    assert!(caught, "the wrong bytes were not noticed: {stats:#}");
    let metrics = http.get(format!("{tracker}/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("fog_tracker_node_failure_reports") && l.contains("hash_mismatch")),
        "the page's report of the node did not reach the tracker:\n{metrics}"
    );
    browser.call("DELETE", &format!("/session/{}", browser.session), Value::Null).await;
}
