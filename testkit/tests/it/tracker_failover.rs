//! Nodes and clients given several tracker URLs (`--tracker A,B,…`, the replicas of one cell): they stick to
//! the tracker that answers, skip dead and not-ready ones, and move on when theirs dies. A node re-registers
//! only when the tracker it moved to says it does not know it: here the trackers are independent (no shared
//! registry), so exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_client::{ClientConfig, FogClient};
use fog_net::http_server;
use fog_proto::api::{ApiError, ErrorCode, TrackerStats};
use fog_testkit::harness::{Cluster, ClusterOptions, Proc};
use hyper::StatusCode;

/// A tracker URL nothing listens on: a port bound, then closed.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", listener.local_addr().expect("addr"))
}

/// A server answering every request as a replica that is not ready yet does (503 with a tracker error
/// body), counting the requests.
async fn unready_tracker() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let handler = move |req: hyper::Request<hyper::body::Incoming>, _| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = http_server::read_body(req, 1 << 20).await;
            let body = ApiError { error: ErrorCode::Internal, message: "replica not ready".into(), retryable: true };
            http_server::json(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    };
    tokio::spawn(http_server::serve(listener, 16, handler, std::future::pending()));
    (url, asked)
}

/// Starts a node (as the cluster's node `i`) given the tracker list `trackers`.
async fn add_node(cluster: &mut Cluster, trackers: &str) -> usize {
    let i = cluster.nodes.len();
    let args: Vec<String> = [
        "--tracker",
        trackers,
        "--listen",
        "127.0.0.1:0",
        "--status-listen",
        "127.0.0.1:0",
        "--data-dir",
        cluster.node_dir(i).to_str().expect("utf8"),
    ]
    .map(String::from)
    .to_vec();
    let log = cluster.dir.path().join(format!("node{i}.log"));
    cluster.nodes.push(Proc::spawn("fog-node", &args, log).await);
    i
}

fn client(trackers: &str) -> FogClient {
    FogClient::new(ClientConfig { tracker: Some(trackers.into()), ..Default::default() }).expect("client")
}

/// Reads `name`'s value from a Prometheus text page.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn get_text(url: &str) -> String {
    reqwest::get(url).await.expect("request").text().await.expect("body")
}

/// Polls `url`'s `/v1/stats` (up to 60 s) until `done` holds.
async fn wait_tracker(url: &str, what: &str, done: impl Fn(&TrackerStats) -> bool) {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/v1/stats")).await {
            if let Ok(s) = r.json::<TrackerStats>().await {
                if done(&s) {
                    return;
                }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "waited 60 s for {what} at {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_clients_and_the_proxy_skip_dead_and_unready_trackers_and_stick_to_the_live_one() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let live = cluster.tracker_url();
    let (unready, unready_asked) = unready_tracker().await;
    let trackers = format!("{},{unready},{live}", dead_url());
    let node = add_node(&mut cluster, &trackers).await;
    cluster.wait_healthy(1).await;
    let status = cluster.wait_node_status(node, "connected", |s| s["tracker"]["state"] == "connected").await;
    assert_eq!(status["tracker"]["url"], live.as_str(), "{status:#}");
    assert_eq!(status["tracker"]["index"], 2);
    assert_eq!(status["tracker"]["failovers"], 1);
    let metrics = get_text(&format!("http://{}/metrics", cluster.status_addr(node))).await;
    assert_eq!(metric(&metrics, "fog_node_tracker_failovers_total"), Some(1), "{metrics}");
    assert_eq!(metric(&metrics, "fog_node_tracker_index"), Some(2), "{metrics}");

    let content: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    cluster.origin.put("movie.bin", content.clone());
    let url = cluster.origin.url("movie.bin");
    let fog = client(&trackers);
    let (bytes, report) = fog.get(&url).await.expect("first fetch");
    assert!(bytes == content && report.tracker_unreachable.is_none(), "{report:?}");
    let current = fog.tracker().expect("a tracker");
    assert_eq!((current.url.as_str(), current.index, current.failovers), (live.as_str(), 2, 1));

    // Both now stick to the live tracker: the unready one is asked no more, by the node's heartbeats
    // (every second) nor by the client's resolves.
    let asked = unready_asked.load(Ordering::SeqCst);
    assert!(asked >= 2, "node and client each asked it once on their way to the live one: {asked}");
    let (bytes, report) = fog.get(&url).await.expect("second fetch");
    assert_eq!(bytes, content);
    assert_eq!(report.fog_bytes, content.len() as u64, "served by the node: {report:?}");
    let beats = |s: &serde_json::Value| s["tracker"]["last_contact_secs_ago"].as_u64();
    cluster.wait_node_status(node, "a heartbeat", |s| beats(s) == Some(0)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.wait_node_status(node, "another heartbeat", |s| beats(s) == Some(0)).await;
    assert_eq!(unready_asked.load(Ordering::SeqCst), asked, "a tracker that did not answer is not asked again");
    assert_eq!(cluster.node_status(node).await["tracker"]["failovers"], 1);

    // The player proxy: the same policy, reported on its /stats and /metrics.
    let args: Vec<String> = ["proxy", "--tracker", &trackers, "--listen", "127.0.0.1:0"].map(String::from).to_vec();
    let proxy = Proc::spawn("fog", &args, cluster.dir.path().join("proxy.log")).await;
    let via = fog_client::proxy::proxied_url(&url, &proxy.addr).expect("proxied url");
    let body = reqwest::get(via).await.expect("proxy").bytes().await.expect("body");
    assert_eq!(&body[..], &content[..]);
    let metrics = get_text(&format!("http://{}/metrics", proxy.addr)).await;
    assert_eq!(metric(&metrics, "fog_proxy_tracker_failovers_total"), Some(1), "{metrics}");
    assert_eq!(metric(&metrics, "fog_proxy_tracker_index"), Some(2), "{metrics}");
    let stats: serde_json::Value =
        serde_json::from_str(&get_text(&format!("http://{}/stats", proxy.addr)).await).expect("stats json");
    assert_eq!(stats["tracker"]["url"], live.as_str(), "{stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_tracker_dies_a_node_moves_to_the_next_registering_once_and_clients_keep_resolving() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let first = cluster.tracker_url();
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        cluster.dir.path().join("tracker2").to_str().expect("utf8"),
        "--origin",
        &cluster.origin.base_url(),
        "--heartbeat-secs",
        "1",
        "--resolve-wait-ms",
        "20000",
    ]
    .map(String::from)
    .to_vec();
    let second_tracker = Proc::spawn("fog-tracker", &args, cluster.dir.path().join("tracker2.log")).await;
    let second = format!("http://{}", second_tracker.addr);
    let trackers = format!("{first},{second}");
    let node = add_node(&mut cluster, &trackers).await;
    cluster.wait_healthy(1).await;

    let fog = client(&trackers);
    let put = |name: &str| {
        let content: Vec<u8> = (0..2u32 << 20).map(|i| (i % 241) as u8 ^ name.len() as u8).collect();
        cluster.origin.put(name, content.clone());
        (cluster.origin.url(name), content)
    };
    let (url, content) = put("before.bin");
    let (bytes, report) = fog.get(&url).await.expect("fetch through the first tracker");
    assert!(bytes == content && report.tracker_unreachable.is_none(), "{report:?}");
    assert_eq!(fog.tracker().expect("tracker").index, 0);

    cluster.tracker.kill();
    wait_tracker(&second, "the node registered and healthy", |s| s.nodes_healthy == 1).await;
    let status = cluster.wait_node_status(node, "connected", |s| s["tracker"]["state"] == "connected").await;
    assert_eq!((status["tracker"]["url"].as_str(), status["tracker"]["index"].as_u64()), (Some(&*second), Some(1)));
    assert_eq!(status["tracker"]["failovers"], 1);

    // The client's resolves go on through the second tracker, which schedules the node.
    let (url, content) = put("after.bin");
    let (bytes, report) = fog.get(&url).await.expect("fetch after the first tracker died");
    assert!(bytes == content && report.tracker_unreachable.is_none(), "{report:?}");
    let (_, report) = fog.get(&url).await.expect("fetch again");
    assert_eq!(report.fog_bytes, content.len() as u64, "served by the node: {report:?}");
    let current = fog.tracker().expect("tracker");
    assert_eq!((current.index, current.failovers), (1, 1));

    // A few more heartbeats: the node stays registered with the second tracker, having registered there
    // exactly once (told it was unknown), and with the first once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.wait_node_status(node, "a heartbeat", |s| s["tracker"]["last_contact_secs_ago"] == 0).await;
    let log = cluster.nodes[node].log_text();
    let at_tracker = |line: &str, url: &str| {
        line.split_whitespace().any(|w| w.strip_prefix("tracker=").is_some_and(|t| t.trim_matches('"') == url))
    };
    let registrations =
        |url: &str| log.lines().filter(|l| l.contains("registered with tracker") && at_tracker(l, url)).count();
    assert_eq!(registrations(&second), 1, "{log}");
    assert_eq!(registrations(&first), 1, "{log}");
}
