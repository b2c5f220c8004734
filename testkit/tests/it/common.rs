//! What several test modules share.

use std::path::{Path, PathBuf};

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

/// `target/<profile>/`: the test binary runs from its `deps/`, beside the workspace's built libraries.
pub(crate) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}
