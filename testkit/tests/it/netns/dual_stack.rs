//! IPv6 across real network boundaries (`Lab::build_dual_stack`, issue #18): a public network (origin,
//! tracker and a node, both families), an IPv6-only home behind a stateful firewall, a dual-stack home behind
//! an IPv4 NAT whose IPv6 address is open, an IPv4-only client and a dual-stack client.
//!
//! Each client gets verified bytes from every node it can reach and is never offered one it cannot: the
//! IPv6-only home is reached by a punch through its rendezvous over IPv6 (the firewall drops the tracker's
//! dial-back, and keeps ports, so a simultaneous open gets through); the dual-stack home directly over IPv6
//! and by a punch over IPv4, although it registered over IPv6 and so has no IPv4 address to advertise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fog_proto::api::{NodeContact, Resolve};
use fog_proto::NodeId;
use fog_testkit::harness::{bin, Proc};
use fog_testkit::netns::{Lab, Site};
use serde_json::Value;

use super::{node_id, served_by, start_origin_and_tracker, Net};

/// Where a process listening on `[::]:PORT` in the public network is reached in each family.
struct PublicAddrs {
    ipv4: String,
    ipv6: String,
}

impl PublicAddrs {
    fn of(proc: &Proc) -> Self {
        let port: u16 = proc.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
        let ipv6 = Site::Public.ipv6().expect("the public network has IPv6");
        Self { ipv4: format!("{}:{port}", Site::Public.addr()), ipv6: format!("[{ipv6}]:{port}") }
    }
}

impl Net {
    /// Starts a node at `site` that registers with the tracker at `tracker` (`HOST:PORT`).
    async fn start_node_with(&mut self, site: Site, name: &str, tracker: &str) -> PathBuf {
        let data = self.dir.path().join(name);
        let args: Vec<String> = [
            "--tracker",
            &format!("http://{tracker}"),
            "--listen",
            "[::]:0",
            "--status-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf8"),
        ]
        .map(String::from)
        .to_vec();
        let log = self.dir.path().join(format!("{name}.log"));
        self.procs.push(Proc::spawn_in(Some(&self.lab.ns(site)), "fog-node", &args, log).await);
        data
    }

    /// The tracker's node table: for each node, how clients of each family reach it.
    fn paths(&self) -> Vec<(NodeId, String, String)> {
        let page: Value = serde_json::from_str(
            &self.curl(Site::Public, &format!("http://{}/v1/dashboard/nodes?per_page=200", self.tracker)),
        )
        .expect("node table JSON");
        let rows = page["nodes"].as_array().cloned().unwrap_or_default();
        rows.iter()
            .map(|n| {
                let path = |f: &str| n[f].as_str().unwrap_or("").to_string();
                let id = serde_json::from_value(n["id"].clone()).expect("node id");
                (id, path("client_path_ipv4"), path("client_path_ipv6"))
            })
            .collect()
    }

    /// The tracker's resolve of the test object for a client at `site`, through the tracker at `tracker`.
    fn resolve(&self, site: Site, tracker: &str, families: &str) -> Resolve {
        let url = format!("http://{tracker}/v1/resolve?url=http://{}/video.bin&families={families}", self.origin);
        serde_json::from_str(&self.curl(site, &url)).expect("resolve JSON")
    }

    /// Fetches the test object with `fog get` at `site` through the tracker at `tracker`; returns the report.
    fn fetch_at(&self, site: Site, tracker: &str, round: &str) -> Value {
        let out_file = self.dir.path().join(format!("fetched-{round}"));
        let fog = bin("fog");
        let url = format!("http://{}/video.bin", self.origin);
        let tracker = format!("http://{tracker}");
        let out = self.lab.exec(
            site,
            fog.to_str().expect("utf8"),
            &["get", "--tracker", &tracker, &url, "-o", out_file.to_str().expect("utf8"), "--json"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fog get ({round}) failed: {stderr}");
        let expected = std::fs::read(self.dir.path().join("content/video.bin")).expect("content");
        assert!(std::fs::read(&out_file).expect("fetched") == expected, "{round}: fetched bytes differ");
        serde_json::from_str(stderr.lines().last().expect("report line")).expect("report JSON")
    }
}

/// Every address in `contact`, the rendezvous's included.
fn addresses(contact: &NodeContact) -> Vec<SocketAddr> {
    let mut all = vec![contact.addr];
    all.extend(&contact.other_addrs);
    all.extend(contact.via.as_ref().map(|v| v.addr));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_homes_behind_firewall_and_nat_serve_clients_of_each_family() {
    if let Some(why) = Lab::dual_stack_unavailable() {
        eprintln!("SKIPPED ipv6_homes_behind_firewall_and_nat_serve_clients_of_each_family: {why}");
        return;
    }
    let lab = Lab::build_dual_stack();
    let dir = fog_testkit::harness::test_dir("fogcdn-netns6");
    // Origin and tracker on one dual-stack socket each. The origin is named by its IPv6 address: every node
    // has IPv6, and clients only read from nodes.
    let origin_at = |origin: &Proc| PublicAddrs::of(origin).ipv6;
    let (origin, tracker) = start_origin_and_tracker(&lab, &dir, 8, "[::]:0", origin_at).await;
    let origin_addr = origin_at(&origin);
    let tracker_at = PublicAddrs::of(&tracker);
    let mut net = Net { lab, dir, origin: origin_addr, tracker: tracker_at.ipv4.clone(), procs: vec![origin, tracker] };

    // The public node registers over IPv4 and advertises its IPv6 address; both homes register over IPv6.
    let public_node = net.start_node_with(Site::Public, "node-public", &tracker_at.ipv4).await;
    let home6 = net.start_node_with(Site::Home6, "node-home6", &tracker_at.ipv6).await;
    let home_dual = net.start_node_with(Site::HomeDual, "node-home-dual", &tracker_at.ipv6).await;
    let ids = [
        node_id(&public_node, &net, Site::Public),
        node_id(&home6, &net, Site::Home6),
        node_id(&home_dual, &net, Site::HomeDual),
    ];
    let [public_id, home6_id, dual_id] = ids;
    let path = |id: NodeId, v4: &str, v6: &str| (id, v4.to_string(), v6.to_string());
    let expected = [
        path(public_id, "direct", "direct"),
        path(home6_id, "unreachable", "hole_punch"),
        path(dual_id, "hole_punch", "direct"),
    ];
    let mut seen = Vec::new();
    net.wait("each node reachable as its network allows, per family", Duration::from_secs(90), |n| {
        let mut paths = n.paths();
        paths.sort_by_key(|p| ids.iter().position(|i| *i == p.0));
        if paths != seen {
            eprintln!("paths (IPv4, IPv6) of the public node, the IPv6 home, the dual-stack home: {paths:?}");
            seen = paths.clone();
        }
        n.stats().nodes_healthy == 3 && paths == expected
    })
    .await;

    // Cold, from the dual-stack client: the nodes pull from the origin.
    net.fetch_at(Site::Client6, &tracker_at.ipv6, "cold");
    let before = net.origin_requests();

    // The dual-stack client is offered every node, each at what it can dial: the IPv6-only home through its
    // rendezvous over IPv6, the dual-stack home directly over IPv6.
    let dual = net.resolve(Site::Client6, &tracker_at.ipv6, "ipv4,ipv6");
    let contact = |r: &Resolve, id: NodeId| r.nodes.iter().find(|c| c.id == id).cloned();
    let h6 = contact(&dual, home6_id).expect("the IPv6 home offered to the dual-stack client");
    assert!(h6.via.as_ref().is_some_and(|v| v.addr.is_ipv6()) && h6.addr.is_ipv6(), "{h6:?}");
    let hd = contact(&dual, dual_id).expect("the dual-stack home offered");
    assert!(hd.via.is_none() && hd.addr.is_ipv6(), "directly over IPv6: {hd:?}");
    let warm = net.fetch_at(Site::Client6, &tracker_at.ipv6, "warm-dual");
    eprintln!("dual-stack client, warm: {warm}");
    assert_eq!(warm["origin_bytes"].as_u64(), Some(0), "{warm}");
    assert_eq!(net.origin_requests(), before, "a warm fetch made nodes go to the origin");
    for id in ids {
        assert!(served_by(&warm, &id) > 0, "node {id} served the dual-stack client nothing: {warm}");
    }

    // The IPv4-only client is never offered the IPv6-only home, nor any IPv6 address; it reaches the
    // dual-stack home by a punch through its rendezvous over IPv4.
    let v4 = net.resolve(Site::Client, &tracker_at.ipv4, "ipv4");
    assert!(contact(&v4, home6_id).is_none(), "an IPv6-only node offered to an IPv4-only client: {v4:?}");
    for c in &v4.nodes {
        assert!(addresses(c).iter().all(SocketAddr::is_ipv4), "an IPv6 address for an IPv4-only client: {c:?}");
    }
    let hd = contact(&v4, dual_id).expect("the dual-stack home offered to the IPv4-only client");
    assert!(hd.via.is_some(), "by a punch over IPv4: {hd:?}");
    let v4_fetch = net.fetch_at(Site::Client, &tracker_at.ipv4, "ipv4-only");
    eprintln!("IPv4-only client: {v4_fetch}");
    assert_eq!(v4_fetch["origin_bytes"].as_u64(), Some(0), "{v4_fetch}");
    for id in [public_id, dual_id] {
        assert!(served_by(&v4_fetch, &id) > 0, "node {id} served the IPv4-only client nothing: {v4_fetch}");
    }
    assert!(v4_fetch["nodes"].get(home6_id.to_hex()).is_none(), "the IPv6-only home was tried: {v4_fetch}");
}
