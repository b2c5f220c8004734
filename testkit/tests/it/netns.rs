//! The overlay across real network boundaries (`fog_testkit::netns`): a public network with the origin, the
//! tracker and one reachable node, two homes behind their own masquerading routers with one node each, and
//! a client network. Run alone with `scripts/test.sh --netns`; needs root, skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fog_proto::api::TrackerStats;
use fog_proto::NodeId;
use fog_testkit::harness::{bin, Proc};
use fog_testkit::netns::{Lab, Site};
use fog_testkit::origin::REQUESTS_PATH;
use serde_json::Value;

// The same across a dual-stack lab: a submodule, so that it runs like the rest of `netns` (alone, as root;
// scripts/test.sh skips other modules by name, so the name is none of theirs).
mod dual_stack;
mod yield_uplink;

/// 48 distinct chunks: the chance that placement gives one of four nodes none of them is (3/4)^48 ≈ 1e-6.
const CHUNK: usize = 128 << 10;
const CHUNKS: usize = 48;

struct Net {
    lab: Lab,
    dir: tempfile::TempDir,
    origin: String,
    tracker: String,
    procs: Vec<Proc>,
}

impl Net {
    fn curl(&self, site: Site, url: &str) -> String {
        let out = self.lab.exec(site, "curl", &["-sS", "--max-time", "10", url]);
        assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn stats(&self) -> TrackerStats {
        serde_json::from_str(&self.curl(Site::Public, &format!("http://{}/v1/stats", self.tracker))).expect("stats")
    }

    fn origin_requests(&self) -> u64 {
        self.curl(Site::Public, &format!("http://{}{REQUESTS_PATH}", self.origin)).trim().parse().expect("count")
    }

    async fn wait(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Net) -> bool) {
        let started = Instant::now();
        while !done(self) {
            if started.elapsed() > timeout {
                let logs: Vec<String> =
                    self.procs.iter().map(|p| format!("--- {} ---\n{}", p.name, tail(&p.log_text()))).collect();
                panic!("timed out waiting for {what}; stats: {:?}\n{}", self.stats(), logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn start_node(&mut self, site: Site, name: &str) -> PathBuf {
        let data = self.dir.path().join(name);
        let args: Vec<String> = [
            "--tracker",
            &format!("http://{}", self.tracker),
            "--listen",
            "[::]:0",
            "--status-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.dir.path().join(format!("{name}.log"));
        self.procs.push(Proc::spawn_in(Some(&self.lab.ns(site)), "fog-node", &args, log).await);
        data
    }

    /// A node's `/status` JSON, read inside its namespace.
    fn node_status(&self, site: Site, data: &Path) -> Value {
        let addr = std::fs::read_to_string(data.join("status.addr")).expect("status address");
        serde_json::from_str(&self.curl(site, &format!("http://{addr}/status"))).expect("status JSON")
    }

    /// Fetches the test object from the client network; returns the fetch report.
    fn fetch(&self, round: &str) -> Value {
        self.fetch_object(round, "video.bin")
    }

    /// Fetches `name` (in the origin's content directory) from the client network; returns the fetch report.
    fn fetch_object(&self, round: &str, name: &str) -> Value {
        let out_file = self.dir.path().join(format!("fetched-{round}"));
        let fog = bin("fog");
        let url = format!("http://{}/{name}", self.origin);
        let tracker = format!("http://{}", self.tracker);
        let out = self.lab.exec(
            Site::Client,
            fog.to_str().expect("utf8"),
            &["get", "--tracker", &tracker, &url, "-o", out_file.to_str().expect("utf8"), "--json"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fog get ({round}) failed: {stderr}");
        let expected = std::fs::read(self.dir.path().join("content").join(name)).expect("content");
        assert!(std::fs::read(&out_file).expect("fetched") == expected, "{round}: fetched bytes differ");
        serde_json::from_str(stderr.lines().last().expect("report line")).expect("report JSON")
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn node_id(data: &Path, net: &Net, site: Site) -> NodeId {
    serde_json::from_value(net.node_status(site, data)["node_id"].clone()).expect("node id")
}

/// Bytes the fetch report says `node` served.
fn served_by(report: &Value, node: &NodeId) -> u64 {
    report["nodes"][node.to_hex()]["bytes"].as_u64().unwrap_or(0)
}

/// The content (`video.bin`, `CHUNKS` chunks of bytes seeded by `seed`), an origin serving it and a tracker,
/// both in the public network listening at `listen`; the tracker registers the origin at `origin_at(&origin)`.
/// Where each lab test starts.
async fn start_origin_and_tracker(
    lab: &Lab,
    dir: &tempfile::TempDir,
    seed: u64,
    listen: &str,
    origin_at: impl Fn(&Proc) -> String,
) -> (Proc, Proc) {
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).expect("content dir");
    std::fs::write(content.join("video.bin"), fog_testkit::test_bytes(CHUNK * CHUNKS, seed)).expect("content");
    let public = lab.ns(Site::Public);
    let origin_args: Vec<String> =
        vec!["--dir".into(), content.to_str().expect("utf8").into(), "--listen".into(), listen.into()];
    let origin = Proc::spawn_in(Some(&public), "fog-test-origin", &origin_args, dir.path().join("origin.log")).await;
    let tracker_args: Vec<String> = [
        "--listen",
        listen,
        "--data-dir",
        dir.path().join("tracker").to_str().expect("utf8"),
        "--origin",
        &format!("http://{}/", origin_at(&origin)),
        "--heartbeat-secs",
        "1",
        "--chunk-size",
        "128KiB",
    ]
    .map(String::from)
    .to_vec();
    let tracker = Proc::spawn_in(Some(&public), "fog-tracker", &tracker_args, dir.path().join("tracker.log")).await;
    (origin, tracker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_serves_from_behind_home_nats() {
    if let Some(why) = Lab::unavailable() {
        eprintln!("SKIPPED overlay_serves_from_behind_home_nats: {why}");
        return;
    }
    let lab = Lab::build();
    let dir = fog_testkit::harness::test_dir("fogcdn-netns");
    let listen = format!("{}:0", Site::Public.addr());
    let (origin, tracker) = start_origin_and_tracker(&lab, &dir, 7, &listen, |origin| origin.addr.clone()).await;
    let mut net =
        Net { lab, dir, origin: origin.addr.clone(), tracker: tracker.addr.clone(), procs: vec![origin, tracker] };

    let public_node = net.start_node(Site::Public, "node-public").await;
    let home1 = net.start_node(Site::Home1, "node-home1").await;
    let home2 = net.start_node(Site::Home2, "node-home2").await;
    net.wait("one direct node and two reachable by hole punching", Duration::from_secs(60), |n| {
        let s = n.stats();
        s.nodes_healthy == 3 && s.nodes_by_client_path.get("hole_punch") == Some(&2)
    })
    .await;
    let ids = [
        node_id(&public_node, &net, Site::Public),
        node_id(&home1, &net, Site::Home1),
        node_id(&home2, &net, Site::Home2),
    ];

    // Cold: nodes pull from the origin. Warm: every byte from the fog, much of it from behind the NATs.
    net.fetch("cold");
    let before = net.origin_requests();
    let warm = net.fetch("warm");
    eprintln!("warm fetch: {warm}");
    assert_eq!(warm["origin_bytes"].as_u64(), Some(0), "warm fetch used the origin: {warm}");
    assert_eq!(net.origin_requests(), before, "warm fetch made nodes go to the origin");
    for id in &ids[1..] {
        assert!(served_by(&warm, id) > 0, "node {id} behind NAT served nothing: {warm}");
    }

    // The two homes reach each other directly (relay, then DCUtR hole punching through both NATs), and the
    // RTTs the nodes report match the delay lines (within 20 %).
    let home2_id = ids[2];
    net.wait("a direct connection between the homes, with RTT samples", Duration::from_secs(60), |n| {
        let s = n.node_status(Site::Home1, &home1);
        let peers = s["overlay"]["rtt"].as_array().cloned().unwrap_or_default();
        s["tracker"]["rtt_ms"].is_number() && peers.iter().any(|p| p["peer"] == home2_id.to_hex())
    })
    .await;
    for (site, data) in [(Site::Home1, &home1), (Site::Home2, &home2), (Site::Public, &public_node)] {
        let status = net.node_status(site, data);
        eprintln!(
            "{site:?}: reachability {}; overlay {}; tracker RTT {}; peer RTTs {}",
            status["reachability"],
            status["overlay"]["reachability"],
            status["tracker"]["rtt_ms"],
            status["overlay"]["rtt"]
        );
        if site != Site::Public {
            let measured = status["tracker"]["rtt_ms"].as_f64().expect("tracker RTT");
            let expected = site.rtt_ms(Site::Public);
            assert!(
                (measured - expected).abs() <= 0.2 * expected,
                "{site:?} → tracker: {measured} ms, expected {expected}"
            );
        }
        for sample in status["overlay"]["rtt"].as_array().expect("rtt samples") {
            let peer: NodeId = serde_json::from_value(sample["peer"].clone()).expect("peer");
            let Some(other) = ids.iter().position(|i| *i == peer) else { continue };
            let other = [Site::Public, Site::Home1, Site::Home2][other];
            let (measured, expected) = (sample["rtt_ms"].as_f64().expect("rtt"), site.rtt_ms(other));
            assert!(
                (measured - expected).abs() <= 0.2 * expected,
                "{site:?} → {other:?}: measured {measured} ms, expected {expected} ms"
            );
        }
    }

    // A fourth node joins: the chunks it now owns come from its peers, not the origin.
    let fourth = net.start_node(Site::Public, "node-fourth").await;
    net.wait("the fourth node scheduled and connected to all three", Duration::from_secs(60), |n| {
        n.stats().nodes_healthy == 4
            && n.node_status(Site::Public, &fourth)["overlay"]["direct_peers"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let fourth_id = node_id(&fourth, &net, Site::Public);
    let before = net.origin_requests();
    let after_join = net.fetch("after-join");
    eprintln!("after the fourth node joined: {}", after_join["nodes"]);
    if net.origin_requests() != before {
        let sites =
            [(Site::Public, &public_node), (Site::Home1, &home1), (Site::Home2, &home2), (Site::Public, &fourth)];
        let counters: Vec<String> =
            sites.iter().map(|(site, d)| net.node_status(*site, d)["counters"].to_string()).collect();
        panic!("adding a node caused origin requests: {after_join}\nnode counters: {counters:#?}");
    }
    assert_eq!(after_join["origin_bytes"].as_u64(), Some(0), "{after_join}");
    assert!(served_by(&after_join, &fourth_id) > 0, "the new node was given nothing: {after_join}");
    let counters = &net.node_status(Site::Public, &fourth)["counters"];
    assert!(counters["peer_fills"].as_u64().unwrap_or(0) > 0, "the new node filled nothing from peers: {counters}");
    assert_eq!(counters["origin_fills"].as_u64(), Some(0), "{counters}");

    // Peer fills from the nodes behind NAT go over their own QUIC endpoints (`fog-peer/1`, under their
    // congestion controller), punched through their rendezvous as clients' paths are, not over libp2p, to
    // public nodes and between the homes, behind their two NATs. A new object fetched cold now that every
    // node has been told every other's route: a node scheduled a chunk asks the chunk's home among its
    // peers to fill it through, for each home a home about a third of the time.
    let count = |c: &Value, name: &str| c[name].as_u64().unwrap_or(0);
    let home_counters = |net: &Net| {
        [(Site::Home1, &home1), (Site::Home2, &home2)].map(|(site, d)| net.node_status(site, d)["counters"].clone())
    };
    let before = home_counters(&net);
    let other = fog_testkit::test_bytes(CHUNK * CHUNKS, 8);
    std::fs::write(net.dir.path().join("content/other.bin"), other).expect("content");
    let cold = net.fetch_object("other-cold", "other.bin");
    eprintln!("another object, cold: {}", cold["nodes"]);
    let after = home_counters(&net);
    eprintln!("home counters: {after:#?}");
    let grew: Vec<_> =
        before.iter().zip(&after).map(|(b, a)| move |name: &str| count(a, name) - count(b, name)).collect();
    assert!(
        grew.iter().map(|g| g("peer_fills_punched")).sum::<u64>() > 0,
        "no home filled from the other over a punched QUIC path: {after:#?}"
    );
    for ((home, grew), counters) in ["home1", "home2"].iter().zip(&grew).zip(&after) {
        assert!(grew("peer_served_quic_bytes") > 0, "{home} served no peer over QUIC: {counters}");
        assert_eq!(
            grew("peer_served_quic_bytes"),
            grew("peer_served_bytes"),
            "{home} served peers over libp2p: {counters}"
        );
    }
}
