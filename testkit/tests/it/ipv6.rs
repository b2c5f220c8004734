//! IPv6 (#18): the whole data path on `[::1]` — tracker, origin, nodes (dialled back over IPv6), `fog get`
//! and the player proxy; nodes reachable in both families, clients offered only the families they have,
//! and the Happy Eyeballs race over real QUIC. Skips with a message where the host has no IPv6 loopback.

use std::time::Duration;

use fog_client::proxy::proxied_url;
use fog_net::transport;
use fog_proto::api::{FamilyCounts, NodeContact, Resolve, TrackerStats};
use fog_testkit::harness::{Cluster, ClusterOptions, Proc};
use fog_testkit::test_bytes;

use crate::common::MIB;

fn has_ipv6_loopback() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_data_path_works_on_ipv6_loopback() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
        return;
    }
    let cluster = Cluster::start(ClusterOptions { nodes: 2, ipv6: true, ..Default::default() }).await;
    assert!(cluster.tracker_url().starts_with("http://[::1]:"), "{}", cluster.tracker_url());
    let object = test_bytes(6 * MIB + 3, 61);
    cluster.origin.put("v6.bin", object.clone());
    let url = cluster.origin.url("v6.bin");
    assert!(url.starts_with("http://[::1]:"), "{url}");
    let client = cluster.client();
    let (first, _) = client.get(&url).await.expect("first fetch");
    assert!(first == object);
    let (warm, report) = client.get(&url).await.expect("warm fetch");
    assert!(warm == object);
    assert_eq!(report.fog_bytes, object.len() as u64, "warm fetch all from the fog: {report:?}");
    assert!(!report.nodes.is_empty());

    let args: Vec<String> =
        vec!["proxy".into(), "--tracker".into(), cluster.tracker_url(), "--listen".into(), "127.0.0.1:0".into()];
    let proxy = Proc::spawn("fog", &args, cluster.dir.path().join("proxy.log")).await;
    let via = proxied_url(&url, &proxy.addr).expect("proxied url");
    let body = reqwest::get(via).await.expect("proxy").bytes().await.expect("body");
    assert!(body == object, "byte-exact through the proxy");
}

/// Nodes listening on `[::]` (one dual-stack socket) serve a tracker and clients that use IPv4 and ones
/// that use IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_nodes_serve_either_family() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
        return;
    }
    for ipv6 in [false, true] {
        let node_args = vec!["--listen".to_string(), "[::]:0".to_string()];
        let cluster = Cluster::start(ClusterOptions { nodes: 2, ipv6, node_args, ..Default::default() }).await;
        let object = test_bytes(3 * MIB, 62);
        cluster.origin.put("ds.bin", object.clone());
        let url = cluster.origin.url("ds.bin");
        let client = cluster.client();
        client.get(&url).await.expect("first fetch");
        let (warm, report) = client.get(&url).await.expect("warm fetch");
        assert!(warm == object);
        assert_eq!(report.fog_bytes, object.len() as u64, "all from the fog (tracker on IPv6: {ipv6}): {report:?}");
        let resolved = crate::common::resolve(&cluster, &url).await;
        for node in &resolved.nodes {
            assert_eq!(node.addr.is_ipv6(), ipv6, "nodes are offered in the family they were seen in: {}", node.addr);
        }
    }
}

/// The tracker's resolve of `url` for a client that names `families` (the tracker adds the family it asks
/// from: IPv4 on an IPv4 cluster).
async fn resolve_for(cluster: &Cluster, url: &str, families: &str) -> Resolve {
    let resolve = format!("{}/v1/resolve", cluster.tracker_url());
    let resp = reqwest::Client::new().get(resolve).query(&[("url", url), ("families", families)]).send().await;
    resp.expect("resolve").json().await.expect("resolve json")
}

fn family_counts(stats: &TrackerStats, family: &str) -> FamilyCounts {
    stats.nodes_by_family.get(family).copied().unwrap_or_default()
}

/// Nodes on one dual-stack socket advertising an IPv4 and an IPv6 address: the tracker dials each back in
/// its own family and says so (stats, metrics, the node's status); a client of both families gets both,
/// IPv6 first, and fetches from the fog; an IPv4-only client gets IPv4 addresses only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reachable_in_both_families_is_offered_in_the_clients_families() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
        return;
    }
    let node_args = ["--listen", "[::]:0", "--advertise", "127.0.0.1:0,[::1]:0"].map(String::from).to_vec();
    let cluster = Cluster::start(ClusterOptions { nodes: 2, node_args, ..Default::default() }).await;
    let stats = cluster
        .wait_stats("both nodes verified in both families", |s| {
            family_counts(s, "ipv4").verified == 2 && family_counts(s, "ipv6").verified == 2
        })
        .await;
    assert_eq!(stats.nodes_by_client_path.get("direct"), Some(&2), "{stats:?}");
    let metrics = reqwest::get(format!("{}/metrics", cluster.tracker_url())).await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics text");
    assert!(metrics.contains(r#"fog_tracker_nodes_by_family{family="ipv6",state="verified"} 2"#), "{metrics}");

    let object = test_bytes(3 * MIB, 63);
    cluster.origin.put("both.bin", object.clone());
    let url = cluster.origin.url("both.bin");
    let dual = resolve_for(&cluster, &url, "ipv4,ipv6").await;
    assert_eq!(dual.nodes.len(), 2);
    for node in &dual.nodes {
        assert!(node.addr.is_ipv6() && node.via.is_none(), "IPv6 first: {node:?}");
        assert!(matches!(node.other_addrs[..], [a] if a.is_ipv4() && a.port() == node.addr.port()), "{node:?}");
    }
    let v4_only = resolve_for(&cluster, &url, "ipv4").await;
    assert_eq!(v4_only.nodes.len(), 2);
    for node in &v4_only.nodes {
        assert!(node.addr.is_ipv4() && node.other_addrs.is_empty(), "IPv4 only: {node:?}");
    }

    let client = cluster.client();
    client.get(&url).await.expect("first fetch");
    let (warm, report) = client.get(&url).await.expect("warm fetch");
    assert!(warm == object);
    assert_eq!(report.fog_bytes, object.len() as u64, "all from the fog: {report:?}");

    let status = cluster
        .wait_node_status(0, "both addresses verified", |s| {
            s["addresses"].as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|a| a["verified"] == true))
        })
        .await;
    let families: Vec<&str> = status["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| a["family"].as_str().expect("family"))
        .collect();
    assert_eq!(families, ["ipv4", "ipv6"]);
    let node_metrics = reqwest::get(format!("http://{}/metrics", cluster.status_addr(0))).await.expect("node metrics");
    let node_metrics = node_metrics.text().await.expect("node metrics text");
    assert!(node_metrics.contains("fog_node_ipv6_verified_addresses 1"), "{node_metrics}");
}

/// An IPv6-only node is never handed to a client that has only IPv4, which still gets the IPv4 nodes;
/// a client of both families gets all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_is_never_handed_an_ipv6_only_node() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions { nodes: 2, ..Default::default() }).await;
    let v6_only = ["--listen", "[::1]:0"].map(String::from);
    cluster.add_node(&v6_only).await;
    cluster.wait_healthy(3).await;
    let v6_node = cluster.node_status(2).await["node_id"].as_str().expect("node id").to_string();
    let stats = cluster.stats().await;
    assert_eq!(family_counts(&stats, "ipv6"), FamilyCounts { verified: 1, unverified: 0 }, "{stats:?}");
    assert_eq!(family_counts(&stats, "ipv4"), FamilyCounts { verified: 2, unverified: 0 }, "{stats:?}");

    let object = test_bytes(8 * MIB, 64);
    cluster.origin.put("v4.bin", object.clone());
    let url = cluster.origin.url("v4.bin");
    for families in ["ipv4", ""] {
        let resolved = resolve_for(&cluster, &url, families).await;
        assert!(!resolved.nodes.is_empty());
        for node in &resolved.nodes {
            assert!(node.id.to_string() != v6_node, "the IPv6-only node was offered to an IPv4 client");
            assert!(node.addr.is_ipv4() && node.other_addrs.is_empty(), "{node:?}");
        }
        assert!(resolved.schedule.iter().all(|c| !c.is_empty()), "every chunk has IPv4 candidates");
    }
    let resolved = resolve_for(&cluster, &url, "ipv4,ipv6").await;
    assert_eq!(resolved.nodes.len(), 3, "a dual-stack client gets every node");
    assert!(resolved.nodes.iter().any(|n| n.id.to_string() == v6_node && n.addr.is_ipv6()));
}

/// Happy Eyeballs over real QUIC: an IPv6 address that never answers does not hold a client up longer than
/// the attempt delay; the node's IPv4 address, tried next, completes the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_ipv6_address_loses_the_race_to_ipv4() {
    if !has_ipv6_loopback() {
        eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
        return;
    }
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let object = test_bytes(MIB, 65);
    cluster.origin.put("race.bin", object);
    let resolved = crate::common::resolve(&cluster, &cluster.origin.url("race.bin")).await;
    let node = resolved.nodes[0].clone();
    // A UDP socket that reads nothing: QUIC packets to it vanish, as behind a firewall.
    let silent = std::net::UdpSocket::bind("[::1]:0").expect("silent socket");
    let contact = NodeContact {
        addr: silent.local_addr().expect("addr"),
        other_addrs: vec![node.addr],
        ..NodeContact::direct(node.id, node.addr)
    };
    let endpoint = transport::client_endpoint(transport::any_family()).expect("endpoint");
    let conn = transport::connect_contact(&endpoint, &contact, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connected over IPv4");
    assert_eq!(transport::remote_addr(&conn), node.addr);
}
