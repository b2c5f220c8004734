//! What several test modules share.

use fog_proto::api::Resolve;
use fog_testkit::harness::Cluster;

pub(crate) const MIB: usize = 1 << 20;

/// The tracker's answer to resolving `url`, whatever its status.
pub(crate) async fn resolve_response(cluster: &Cluster, url: &str) -> reqwest::Response {
    let resolve = format!("{}/v1/resolve", cluster.tracker_url());
    reqwest::Client::new().get(resolve).query(&[("url", url)]).send().await.expect("resolve")
}

pub(crate) async fn resolve(cluster: &Cluster, url: &str) -> Resolve {
    resolve_response(cluster, url).await.json().await.expect("resolve json")
}
