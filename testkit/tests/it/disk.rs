//! A node's disk, with real nodes (RocksDB) on 127.0.0.1: the whole data directory stays within the quota
//! plus the documented allowance whatever passes through it, and damaged store files heal without a
//! wrong byte reaching a client or an unsettled receipt being lost.

use std::path::Path;
use std::time::{Duration, Instant};

use fog_node::store::{disk_usage, BOOKKEEPING, CHUNK_OVERHEAD, OTHER_FILES_BUDGET};
use fog_testkit::disk::DiskSampler;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;

const MIB: u64 = 1 << 20;

/// The bound docs/operations.md gives for 1 MiB chunks.
fn documented_limit(quota: u64) -> u64 {
    quota + BOOKKEEPING + 2 * (4 * MIB).max(quota / 1024) + 2 * (MIB + CHUNK_OVERHEAD) + OTHER_FILES_BUDGET
}

async fn fetch_exact(cluster: &Cluster, path: &str, content: &[u8]) {
    let (bytes, _) = cluster.client().get(&cluster.origin.url(path)).await.expect("fetch");
    assert!(bytes == content, "{path}: the client got wrong bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_stays_within_the_quota_plus_allowance() {
    let mut cluster = Cluster::start(ClusterOptions { nodes: 0, ..Default::default() }).await;
    let quota = 40 * MIB;
    let args = |q: u64| -> Vec<String> {
        vec![
            "--cache-size".into(),
            q.to_string(),
            "--memory-cache".into(),
            "0".into(),
            "--min-free-disk".into(),
            "0".into(),
        ]
    };
    let dir = cluster.node_dir(0);
    std::fs::create_dir_all(&dir).expect("node dir");
    let sampler = DiskSampler::start(dir.clone(), Duration::from_millis(5));
    cluster.add_node(&args(quota)).await;
    cluster.wait_healthy(1).await;

    // 16 distinct objects of 6 MiB: 2.4 times the quota per pass.
    let objects: Vec<(String, Vec<u8>)> =
        (0..16).map(|i| (format!("o{i}.bin"), test_bytes(6 * MIB as usize + 1000 * i, 700 + i as u64))).collect();
    for (path, content) in &objects {
        cluster.origin.put(path, content.clone());
    }
    let check = |phase: &str, peak: u64, limit: u64| {
        eprintln!("{phase}: peak {peak} bytes on disk, limit {limit}");
        assert!(peak > 0, "{phase}: nothing sampled");
        assert!(peak <= limit, "{phase}: the data directory reached {peak} bytes on disk; the limit is {limit}");
    };

    // One pass, then a second (every object evicted before it comes back).
    for _ in 0..2 {
        for (path, content) in &objects {
            fetch_exact(&cluster, path, content).await;
        }
    }
    check("two passes", sampler.take_peak(), documented_limit(quota));

    // A hot object between cold ones, with a restart in the middle.
    let (hot_path, hot) = &objects[0];
    for (i, (path, content)) in objects.iter().enumerate().skip(1) {
        fetch_exact(&cluster, hot_path, hot).await;
        fetch_exact(&cluster, path, content).await;
        if i == 8 {
            cluster.nodes[0].terminate().await;
            cluster.restart_node_with(0, &args(quota)).await;
            cluster.wait_healthy(1).await;
        }
    }
    check("hot and cold with a restart", sampler.take_peak(), documented_limit(quota));

    // The status page, `fog-node status` and /metrics show bytes on disk next to the accounting.
    let status = cluster.wait_node_status(0, "a disk measurement", |s| s["cache"]["disk"].is_object()).await;
    let disk = &status["cache"]["disk"];
    assert_eq!(disk["limit_bytes"].as_u64(), Some(documented_limit(quota)), "{disk:#}");
    assert!(disk["data_dir_bytes"].as_u64() <= Some(documented_limit(quota)), "{disk:#}");
    assert!(disk["warning"].is_null(), "{disk:#}");
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.status_addr(0)))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("fog_node_data_dir_bytes "), "{metrics}");

    // A smaller quota across a restart is applied before the node serves: by the time it listens, the
    // data directory fits the new quota.
    let smaller = 8 * MIB;
    cluster.nodes[0].terminate().await;
    let before = disk_usage(&dir);
    assert!(before > documented_limit(smaller), "the test needs a full cache to shrink ({before} bytes)");
    cluster.restart_node_with(0, &args(smaller)).await;
    sampler.take_peak();
    let after = disk_usage(&dir);
    assert!(after <= documented_limit(smaller), "{after} bytes on disk right after restarting with {smaller}");
    cluster.wait_healthy(1).await;
    for (path, content) in objects.iter().take(6) {
        fetch_exact(&cluster, path, content).await;
    }
    check("after shrinking the quota", sampler.take_peak(), documented_limit(smaller));
    let status = cluster.node_status(0).await;
    assert!(status["cache"]["used"].as_u64() <= Some(smaller), "{:#}", status["cache"]);
}

/// Flips a byte in every file of 256 KiB or more under `dir`, as a dying SD card might; returns how many.
fn damage_large_files(dir: &Path) -> usize {
    let mut damaged = 0;
    for entry in std::fs::read_dir(dir).expect("read dir").filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            damaged += damage_large_files(&path);
            continue;
        }
        let mut bytes = std::fs::read(&path).expect("read");
        if bytes.len() >= 256 << 10 {
            for at in [bytes.len() / 7, bytes.len() / 2, bytes.len() - 100] {
                bytes[at] ^= 0x5a;
            }
            std::fs::write(&path, bytes).expect("write");
            damaged += 1;
        }
    }
    damaged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_files_heal_and_unsettled_receipts_survive() {
    let mut cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let node_id = cluster.node_status(0).await["node_id"].as_str().expect("node id").to_string();

    // Fetch through the fog, then take the tracker away before the node redeems (every 5 s): the node
    // holds the client's receipts on disk. A redemption that slips in between leaves nothing held; then
    // the tracker comes back and another object is fetched.
    let mut objects = Vec::new();
    for attempt in 0..4u64 {
        let (path, content) = (format!("d{attempt}.bin"), test_bytes(6 * MIB as usize + 77, 900 + attempt));
        cluster.origin.put(&path, content.clone());
        let (bytes, report) = cluster.client().get(&cluster.origin.url(&path)).await.expect("fetch");
        cluster.tracker.kill();
        assert!(bytes == content);
        assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
        objects.push((path, content));
        if cluster.node_status(0).await["credits"]["receipts_held"].as_u64() > Some(0) {
            break;
        }
        cluster.restart_tracker().await;
        cluster.wait_healthy(1).await;
    }
    let held = cluster.node_status(0).await["credits"]["receipts_held"].as_u64().unwrap_or(0);
    assert!(held > 0, "the node never held a receipt while the tracker was down");

    cluster.nodes[0].terminate().await;
    let damaged = damage_large_files(&cluster.node_dir(0));
    assert!(damaged >= 6, "only {damaged} files of 256 KiB or more to damage");
    cluster.restart_tracker().await;
    cluster.restart_node(0).await;
    cluster.wait_healthy(1).await;

    // Clients get exact bytes (damaged chunks are dropped and refilled), from the fog.
    for (path, content) in &objects {
        let (bytes, report) = cluster.client().get(&cluster.origin.url(path)).await.expect("fetch after damage");
        assert!(bytes == *content, "{path}: wrong bytes after store damage");
        assert_eq!(report.fog_bytes, content.len() as u64, "{report:?}");
    }
    let status = cluster.node_status(0).await;
    assert!(status["counters"]["corrupt_chunks"].as_u64() > Some(0), "no damage noticed: {:#}", status["counters"]);

    // The receipts held before the damage are redeemed.
    let started = Instant::now();
    loop {
        let s = cluster.node_status(0).await;
        let credited: serde_json::Value = reqwest::get(format!("{}/v1/nodes/{node_id}/credits", cluster.tracker_url()))
            .await
            .expect("credits")
            .json()
            .await
            .expect("json");
        let c = &s["credits"];
        if c["receipts_held"] == 0 && c["receipts_rejected"] == 0 && credited["credited_bytes"].as_u64() > Some(0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "receipts not redeemed: {:#} {credited:#}", s["credits"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(cluster.nodes[0].is_running());
}
