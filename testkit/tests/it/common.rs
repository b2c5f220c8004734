//! What several test modules share.

use std::path::Path;

use fog_proto::api::Resolve;
use fog_proto::NodeId;
use fog_testkit::harness::Cluster;

pub(crate) const MIB: usize = 1 << 20;

/// The tracker's answer to resolving `url`, whatever its status.
pub(crate) async fn resolve_response(cluster: &Cluster, url: &str) -> reqwest::Response {
    let resolve = format!("{}/v1/resolve", cluster.tracker_url());
    reqwest::Client::new().get(resolve).query(&[("url", url)]).send().await.expect("resolve")
}

/// Waits until each of the cluster's `n` nodes has direct connections to all the others, with RTTs measured
/// (a node's neighbourhood is by RTT), and returns their ids.
pub(crate) async fn meshed(cluster: &Cluster, n: usize) -> Vec<NodeId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let others = n as u64 - 1;
        let s = cluster
            .wait_node_status(i, "direct connections to all other nodes", |s| {
                s["overlay"]["direct_peers"].as_u64() >= Some(others)
                    && s["overlay"]["rtt"].as_array().map_or(0, Vec::len) as u64 >= others
            })
            .await;
        ids.push(serde_json::from_value::<NodeId>(s["node_id"].clone()).expect("node id"));
    }
    ids
}

pub(crate) async fn resolve(cluster: &Cluster, url: &str) -> Resolve {
    resolve_response(cluster, url).await.json().await.expect("resolve json")
}

/// A `fog-tracker` replica's flags for the cluster tests: its data directory and address, the origin and
/// the admin token, probes off (the synthetic nodes of some tests serve nothing; probe division is
/// unit-tested), a first fetch waiting for the whole ingest; then `extra` (`--nats`, `--postgres`, …).
pub(crate) fn tracker_args(data: &Path, listen: &str, origin: &str, admin: &str, extra: &[&str]) -> Vec<String> {
    let data = data.display().to_string();
    let base = ["--listen", listen, "--data-dir", &data, "--origin", origin, "--admin-token", admin];
    let more = ["--probe-secs", "0", "--resolve-wait-ms", "20000"];
    base.iter().chain(&more).chain(extra).map(|a| a.to_string()).collect()
}
