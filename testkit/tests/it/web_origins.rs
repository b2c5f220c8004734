//! The sites whose pages may use the fog from a browser (issue #14, `--web-origin`), at a real tracker:
//! their resolves and reports are answered with CORS, anything else a page of another site asks is refused,
//! and native clients and the tracker's own dashboard are not affected.

use ed25519_dalek::SigningKey;
use fog_net::frame_io::{read_frame, write_last_frame};
use fog_proto::api::Resolve;
use fog_proto::wire::{ChunkRequest, OriginHint, ResponseHead};
use fog_proto::{ChunkHash, NodeId};
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use reqwest::header::{ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ORIGIN};
use reqwest::Method;
use serde_json::Value;

const PLAYER: &str = "https://player.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_registered_sites_get_answers_and_only_for_resolve_and_reports() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        tracker_args: vec!["--web-origin".into(), "https://Player.example.com/".into()],
        ..Default::default()
    })
    .await;
    cluster.origin.put("w.bin", test_bytes(256 << 10, 3));
    let url = cluster.origin.url("w.bin");
    let tracker = cluster.tracker_url();
    let http = reqwest::Client::new();
    let resolve = |origin: &str| {
        http.get(format!("{tracker}/v1/resolve")).query(&[("url", url.as_str())]).header(ORIGIN, origin).send()
    };

    let page = resolve(PLAYER).await.expect("resolve");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], PLAYER, "the registered site reads the answer");
    assert_eq!(page.headers()[reqwest::header::VARY], "Origin");
    let resolved: Value = page.json().await.expect("resolve body");
    assert!(resolved["manifest"].is_object(), "{resolved}");

    let preflight = http
        .request(Method::OPTIONS, format!("{tracker}/v1/reports"))
        .header(ORIGIN, PLAYER)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 204);
    assert_eq!(preflight.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], PLAYER);
    assert!(preflight.headers()[ACCESS_CONTROL_ALLOW_METHODS].to_str().expect("text").contains("POST"));

    // Another site, or the registered one asking for more than a page needs: refused, unreadable to it.
    for refused in [
        resolve("https://evil.example").await.expect("resolve"),
        resolve("null").await.expect("resolve"),
        http.get(format!("{tracker}/v1/credits")).header(ORIGIN, PLAYER).send().await.expect("credits"),
        http.request(Method::OPTIONS, format!("{tracker}/v1/admin/manifests"))
            .header(ORIGIN, PLAYER)
            .header("Access-Control-Request-Method", "PUT")
            .send()
            .await
            .expect("preflight"),
    ] {
        assert_eq!(refused.status(), 403);
        assert!(refused.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        let body: Value = refused.json().await.expect("error body");
        assert_eq!(body["error"], "unknown_web_origin", "{body}");
        assert!(body["message"].as_str().expect("message").contains("--web-origin"), "{body}");
    }

    // Native clients send no Origin; the dashboard's own requests come from the tracker's own site.
    let native = http.get(format!("{tracker}/v1/stats")).send().await.expect("stats");
    assert_eq!(native.status(), 200);
    let dashboard = http.get(format!("{tracker}/v1/stats")).header(ORIGIN, &tracker).send().await.expect("stats");
    assert_eq!(dashboard.status(), 200);

    let metrics = http.get(format!("{tracker}/metrics")).send().await.expect("metrics").text().await.expect("text");
    for line in [
        r#"fog_tracker_web_requests_total{result="allowed"} 1"#,
        r#"fog_tracker_web_requests_total{result="preflight"} 1"#,
        r#"fog_tracker_web_requests_total{result="refused"} 4"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

/// Browsers get only nodes whose WebTransport endpoint the tracker opened a session to, as a page of a
/// registered site, with the hashes the node advertised; native clients get every node, with no web part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_get_nodes_the_tracker_probed_over_webtransport() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        tracker_args: vec!["--web-origin".into(), PLAYER.into(), "--probe-secs".into(), "1".into()],
        ..Default::default()
    })
    .await;
    let content = test_bytes(3 << 20, 9);
    cluster.origin.put("p.bin", content.clone());
    let url = cluster.origin.url("p.bin");
    let (got, _) = cluster.client().get(&url).await.expect("native fetch warms the nodes");
    assert!(got == content);

    let http = reqwest::Client::new();
    let tracker = cluster.tracker_url();
    // A session key, as the page makes one: the ticket licenses each node to fill what it was given.
    let client_key = NodeId::from(SigningKey::from_bytes(&[0x3c; 32]).verifying_key()).to_hex();
    let resolve_as_page = || async {
        let resp = http
            .get(format!("{tracker}/v1/resolve"))
            .query(&[("url", url.as_str()), ("client_key", client_key.as_str())])
            .header(ORIGIN, PLAYER)
            .send()
            .await
            .expect("resolve");
        assert_eq!(resp.status(), 200);
        resp.json::<Resolve>().await.expect("resolve body")
    };
    // The nodes learn the site from the tracker (they have no --web-origin of their own), and the tracker
    // probes their endpoints within a round or two.
    let started = std::time::Instant::now();
    let resolved = loop {
        let resolved = resolve_as_page().await;
        if resolved.nodes.len() == 2 {
            break resolved;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "probes never vouched for 2 nodes");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let native = crate::common::resolve(&cluster, &url).await;
    assert!(native.nodes.iter().all(|n| n.web.is_none()), "native clients get no web part");

    for node in &resolved.nodes {
        let web = node.web.as_ref().expect("a page gets each node's WebTransport endpoint");
        assert!(web.url.starts_with(&format!("https://{}", node.addr)), "{} at {}", web.url, node.addr);
        let (session, served) = fog_net::webtransport::open_as_page(web, PLAYER, std::time::Duration::from_secs(10))
            .await
            .expect("session");
        assert_eq!(web.cert_hashes[0], served, "the served certificate is listed first");
        let slot = resolved.nodes.iter().position(|n| n.id == node.id).expect("listed") as u32;
        let i = resolved.schedule.iter().position(|c| c.contains(&slot)).expect("a chunk given to it");
        let (hash, m) = (resolved.manifest.chunks[i], &resolved.manifest);
        let (offset, length) = m.chunk_span(i);
        let req = ChunkRequest {
            hash,
            range: None,
            origin: Some(OriginHint { url: m.url.clone(), offset, length }),
            receipt: None,
            ticket: fog_proto::credits::ticket_on_wire(resolved.ticket.as_ref().expect("a ticket")),
            groups: m.group_hashes(i),
        };
        let (mut send, mut recv) = session.open_bi().await.expect("stream");
        write_last_frame(&mut send, &req.encode_framed().expect("frame")).await.expect("request");
        let head: ResponseHead = read_frame(&mut recv).await.expect("head");
        assert!(matches!(head, ResponseHead::Ok { .. }), "{head:?}");
        let bytes = recv.read_to_end(2 << 20).await.expect("payload");
        assert_eq!(ChunkHash::of(&bytes), hash, "chunk {i} from the node the page was given");
    }

    let metrics = http.get(format!("{tracker}/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains(r#"fog_tracker_web_probes_total{result="ok"}"#), "{metrics}");
}
