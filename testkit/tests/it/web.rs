//! Browsers' side of a real node: a WebTransport client (the `web-transport-quinn` crate, as a page's
//! `WebTransport` would) pins the certificate hash the node announces, sends the `Origin` of a registered
//! site, and fetches a chunk with the native request frame on a session stream; other sites are refused.

use fog_net::frame_io::{read_frame, write_last_frame};
use fog_proto::api::{WebTransportEndpoint, WEB_TRANSPORT_PATH};
use fog_proto::wire::{ChunkRequest, ResponseHead, Status};
use fog_proto::ChunkHash;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use web_transport_quinn::http::{header, HeaderValue, StatusCode};
use web_transport_quinn::proto::ConnectRequest;
use web_transport_quinn::{ClientBuilder, ClientError, ConnectError, Session};

use crate::common::{resolve, MIB};

/// The site the node's operator registered (`--web-origin`).
const PAGE: &str = "https://player.example";

/// A session request as a page on `origin` makes it (`None`: no `Origin` header, not a page).
fn connect_request(url: &url::Url, origin: Option<&'static str>) -> ConnectRequest {
    let request = ConnectRequest::new(url.clone());
    match origin {
        Some(origin) => request.with_header(header::ORIGIN, HeaderValue::from_static(origin)),
        None => request,
    }
}

/// Sends `req` on a new stream of `session` with the native framing; gives the response head and payload.
async fn request(session: &Session, req: &ChunkRequest) -> (ResponseHead, Vec<u8>) {
    let (mut send, mut recv) = session.open_bi().await.expect("stream");
    write_last_frame(&mut send, &req.encode_framed().expect("frame")).await.expect("send request");
    let head: ResponseHead = read_frame(&mut recv).await.expect("response head");
    let payload = recv.read_to_end(2 * MIB).await.expect("payload");
    (head, payload)
}

/// Whether the session was refused with `status` (the crate reports it in either of two ways).
fn refused_with(outcome: &Result<Session, ClientError>, status: StatusCode) -> bool {
    use web_transport_quinn::proto::ConnectError::WrongStatus;
    match outcome {
        Err(ClientError::HttpError(ConnectError::ErrorStatus(s))) => *s == status,
        Err(ClientError::HttpError(ConnectError::ProtoError(WrongStatus(Some(s))))) => *s == status,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_page_fetches_verified_chunks_over_webtransport_and_other_sites_are_refused() {
    let node_args = vec!["--web-origin".into(), PAGE.into()];
    let cluster = Cluster::start(ClusterOptions { nodes: 1, node_args, ..Default::default() }).await;
    let content = test_bytes(2 * MIB + 5, 14);
    cluster.origin.put("web.bin", content.clone());
    let url = cluster.origin.url("web.bin");
    // Warms the node through its native protocol, on the same QUIC port (the identity certificate still
    // serves native clients).
    let (got, _) = cluster.client().get(&url).await.expect("native fetch");
    assert!(got == content, "native fetch differs");
    let manifest = resolve(&cluster, &url).await.manifest;
    let chunks = manifest.chunks.len() as u64;
    let status =
        cluster.wait_node_status(0, "every chunk cached", |s| s["cache"]["chunks"].as_u64() >= Some(chunks)).await;
    let endpoint: WebTransportEndpoint =
        serde_json::from_value(status["web_transport"].clone()).expect("the node announces its endpoint");
    let session_url =
        url::Url::parse(&format!("https://127.0.0.1:{}{WEB_TRANSPORT_PATH}", endpoint.port)).expect("url");
    let pinned = endpoint.cert_hashes.iter().map(|h| h.0.to_vec()).collect();
    let client = ClientBuilder::new().with_server_certificate_hashes(pinned).expect("client");

    let session = client.connect(connect_request(&session_url, Some(PAGE))).await.expect("session from the page");
    for (i, hash) in manifest.chunks.iter().enumerate() {
        let req = ChunkRequest { hash: *hash, range: None, origin: None, receipt: None, ticket: None, groups: None };
        let (head, payload) = request(&session, &req).await;
        assert_eq!(head, ResponseHead::Ok { len: payload.len() as u32 }, "chunk {i}");
        assert_eq!(ChunkHash::of(&payload), *hash, "chunk {i}'s bytes hash to the manifest's hash");
    }
    // Same checks as natively: a miss with no ticket is not filled for a page either.
    let unknown = ChunkHash::of(b"not cached anywhere");
    let req = ChunkRequest { hash: unknown, range: None, origin: None, receipt: None, ticket: None, groups: None };
    let (head, _) = request(&session, &req).await;
    assert!(matches!(head, ResponseHead::Error { status: Status::NotFound, .. }), "{head:?}");

    // A page on another site, and a client that is no page at all, get no session.
    let evil = client.connect(connect_request(&session_url, Some("https://evil.example"))).await;
    assert!(refused_with(&evil, StatusCode::FORBIDDEN), "{:?}", evil.err());
    let no_origin = client.connect(connect_request(&session_url, None)).await;
    assert!(refused_with(&no_origin, StatusCode::FORBIDDEN), "{:?}", no_origin.err());
    // The certificate is the one whose hash the node announced: pinning another hash fails the handshake.
    let wrong = ClientBuilder::new().with_server_certificate_hashes(vec![vec![0; 32]]).expect("client");
    assert!(wrong.connect(connect_request(&session_url, Some(PAGE))).await.is_err(), "an unpinned certificate");

    let metrics = reqwest::get(format!("http://{}/metrics", cluster.status_addr(0)))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(metrics.contains(r#"fog_node_web_sessions_total{result="accepted"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"fog_node_web_sessions_total{result="forbidden_origin"} 2"#), "{metrics}");
    assert!(cluster.nodes[0].log_text().contains("refusing a WebTransport session"), "a log line says why");
}
