//! IPv6 (#18): the whole data path on `[::1]` — tracker, origin, nodes (dialled back over IPv6), `fog get`
//! and the player proxy. Skips with a message where the host has no IPv6 loopback.

use fog_client::proxy::proxied_url;
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
