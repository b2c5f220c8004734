//! What operators and volunteers see: the node's status page, `fog-node status`, Prometheus metrics on
//! tracker and node, and the operator's admin actions.

use std::process::Command;

use fog_testkit::harness::{bin, Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

const TOKEN: &str = "test-admin-token-0123456789";

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

fn fog_node_status_cli(cluster: &Cluster, i: usize) -> String {
    let out = Command::new(bin("fog-node"))
        .args(["status", "--data-dir"])
        .arg(cluster.node_dir(i))
        .output()
        .expect("run fog-node status");
    assert!(out.status.success(), "fog-node status failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_status_explains_traffic_and_tracker_trouble() {
    let mut cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let idle = cluster.wait_node_status(0, "a connected node", |s| s["tracker"]["state"] == "connected").await;
    assert_eq!(idle["traffic"]["getting_traffic"], false);
    assert!(idle["traffic"]["why"].as_str().expect("why").contains("no clients have been sent here"), "{idle:#}");
    let (code, page) = get(&format!("http://{}/", cluster.status_addr(0))).await;
    assert_eq!(code, 200);
    assert!(page.contains("Why am I getting no traffic?"));

    let content = test_bytes(2 << 20, 5);
    cluster.origin.put("s.bin", content.clone());
    cluster.client().get(&cluster.origin.url("s.bin")).await.expect("fetch");
    let busy =
        cluster.wait_node_status(0, "traffic to show", |s| s["served"]["today_bytes"].as_u64() >= Some(2 << 20)).await;
    assert_eq!(busy["traffic"]["getting_traffic"], true);
    assert_eq!(busy["served"]["month_bytes"], busy["served"]["today_bytes"]);
    let text = fog_node_status_cli(&cluster, 0);
    assert!(text.contains("Traffic: yes") && text.contains("connected"), "{text}");
    assert!(text.contains("giving way"), "{text}");

    // `fog-node status` as an installed node's owner runs it: from the node's configuration file, its data
    // directory; and where that cannot be read (the service's is closed to other users), its status_listen.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", cluster.node_dir(0))).expect("config");
    let listen_only = dir.path().join("listen-only.toml");
    let listen = format!("data_dir = {:?}\nstatus_listen = {:?}\n", dir.path(), cluster.status_addr(0));
    std::fs::write(&listen_only, listen).expect("config");
    for (how, file) in [("--config", &config), ("FOG_NODE_CONFIG", &listen_only)] {
        let mut cli = Command::new(bin("fog-node"));
        cli.arg("status").env_remove("FOG_NODE_DATA_DIR").env_remove("FOG_NODE_CONFIG");
        if how == "--config" {
            cli.arg("--config").arg(file);
        } else {
            cli.env(how, file);
        }
        let out = cli.output().expect("run fog-node status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "fog-node status with {how}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("Traffic: yes"), "with {how}: {text}");
    }

    let (code, metrics) = get(&format!("http://{}/metrics", cluster.status_addr(0))).await;
    assert_eq!(code, 200);
    let served_line = metrics.lines().find(|l| l.starts_with("fog_node_served_bytes_total ")).expect("served metric");
    assert!(served_line.ends_with(&(2u64 << 20).to_string()), "{served_line}");
    assert!(metrics.contains("fog_node_tracker_connected 1"));
    for name in
        ["fog_node_ledbat_delay_backoffs_total ", "fog_node_ledbat_slowdowns_total ", "fog_node_ledbat_base_delay_ms "]
    {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    cluster.tracker.kill();
    let lost =
        cluster.wait_node_status(0, "the tracker outage to show", |s| s["tracker"]["state"] == "unreachable").await;
    assert!(lost["traffic"]["why"].as_str().expect("why").contains("cannot be reached"), "{lost:#}");
    let text = fog_node_status_cli(&cluster, 0);
    assert!(text.contains("unreachable"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_metrics_and_admin_actions() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        tracker_args: vec!["--admin-token".into(), TOKEN.into()],
        ..Default::default()
    })
    .await;
    let content = test_bytes(1 << 20, 8);
    cluster.origin.put("m.bin", content);
    cluster.client().get(&cluster.origin.url("m.bin")).await.expect("fetch");
    cluster.wait_stats("reported traffic", |s| s.bytes_served >= 1 << 20).await;
    let (code, metrics) = get(&format!("{}/metrics", cluster.tracker_url())).await;
    assert_eq!(code, 200);
    for name in [
        "fog_tracker_nodes{state=\"healthy\"} 2",
        "fog_tracker_resolves_total{result=\"ingested\"} 1",
        "fog_tracker_fog_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    // Node addresses and admin actions need the token.
    let http = reqwest::Client::new();
    let nodes_url = format!("{}/v1/dashboard/nodes", cluster.tracker_url());
    let public: Value = http.get(&nodes_url).send().await.expect("nodes").json().await.expect("json");
    assert!(
        public["nodes"].as_array().expect("nodes").iter().all(|n| n["addr"].is_null()),
        "addresses leaked: {public}"
    );
    let admin: Value = http.get(&nodes_url).bearer_auth(TOKEN).send().await.expect("nodes").json().await.expect("json");
    assert!(admin["nodes"].as_array().expect("nodes").iter().all(|n| n["addr"].is_string()));
    let victim = admin["nodes"][0]["id"].as_str().expect("id").to_string();
    let block_url = format!("{}/v1/admin/nodes/{victim}/block", cluster.tracker_url());
    assert_eq!(http.post(&block_url).send().await.expect("post").status().as_u16(), 401);
    assert_eq!(
        http.post(&block_url).bearer_auth("wrong-token-wrong-token").send().await.expect("post").status().as_u16(),
        401
    );
    assert_eq!(http.post(&block_url).bearer_auth(TOKEN).send().await.expect("post").status().as_u16(), 200);
    cluster.wait_healthy(1).await;
    // The blocked node hears why at its next heartbeat.
    let idx = (0..2).find(|&i| node_status_id(&cluster, i) == victim).expect("victim index");
    let refused = cluster.wait_node_status(idx, "the refusal to show", |s| s["tracker"]["state"] == "refused").await;
    assert!(refused["traffic"]["why"].as_str().expect("why").contains("blocked"), "{refused:#}");
    let (code, _) = get(&format!("{}/v1/resolve?url={}", cluster.tracker_url(), cluster.origin.url("m.bin"))).await;
    assert_eq!(code, 200);
}

fn node_status_id(cluster: &Cluster, i: usize) -> String {
    let text = fog_node_status_cli(cluster, i);
    text.lines().find_map(|l| l.strip_prefix("node")).expect("node line").trim().to_string()
}
