//! Tracker replicas of one cell over NATS (issue #15, the registry's soft state): three nats-servers, three
//! replicas sharing the tracker key and a PostgreSQL, a fleet of synthetic signed nodes heartbeating to them (a tenth with a
//! QUIC endpoint that answers dial-backs, so they are healthy), real nodes and a client.
//!
//! - every replica holds the same nodes, and a node registered at one is counted by all within a heartbeat
//!   interval;
//! - a block made at one replica is enforced by all within 1 s;
//! - a nats-server, then a replica, killed mid-traffic: resolves keep succeeding at the others, no node is
//!   lost, and nodes move to the others without registering again;
//! - the killed replica, restarted, says not-ready until it holds the whole cell, then counts the same.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_proto::api::{now_ms, Heartbeat, NodeStats, Register, Signed, TrackerStats, KIND_HEARTBEAT, KIND_REGISTER};
use fog_proto::NodeId;
use fog_testkit::harness::{handshake_only_endpoint, test_dir, Proc};
use fog_testkit::nats::NatsCluster;
use fog_testkit::origin::{Quirks, TestOrigin};
use fog_testkit::pg::TestPostgres;

const HEARTBEAT: Duration = Duration::from_secs(3);
const SYNTHETIC: usize = 2000;
/// Synthetic nodes with a QUIC endpoint answering dial-backs (the others' fail at once: a wrong key).
const REACHABLE: usize = 200;
/// Synthetic nodes per source address (127.0.0.x): a tracker lets one source register 64 at once.
const PER_SOURCE: usize = 50;
const ADMIN: &str = "cluster-test-admin-token";
const REAL_NODES: usize = 2;

/// The replicas' base URLs (one changes when its replica restarts).
type Urls = Arc<RwLock<Vec<String>>>;

fn tracker_args(dir: &std::path::Path, i: usize, origin: &str, nats: &[String], postgres: &str) -> Vec<String> {
    let data = dir.join(format!("tracker{i}"));
    let (heartbeat, nats) = (HEARTBEAT.as_secs().to_string(), nats.join(","));
    let extra = [
        "--heartbeat-secs",
        &heartbeat,
        "--nats",
        &nats,
        "--postgres",
        postgres,
        "--cell",
        "test",
        "--chunk-size",
        "64KiB",
    ];
    crate::common::tracker_args(&data, "127.0.0.1:0", origin, ADMIN, &extra)
}

async fn get_json<T: serde::de::DeserializeOwned>(url: String) -> T {
    let resp = reqwest::Client::new().get(&url).bearer_auth(ADMIN).send().await.expect("request");
    resp.json().await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn stats(url: &str) -> TrackerStats {
    get_json(format!("{url}/v1/stats")).await
}

/// A counter's value in a replica's `/metrics`.
async fn metric(url: &str, name: &str) -> u64 {
    let text = reqwest::get(format!("{url}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics of {url}")) as u64
}

async fn ready(url: &str) -> u16 {
    reqwest::get(format!("{url}/readyz")).await.map_or(0, |r| r.status().as_u16())
}

/// Polls (up to `limit`) until `done` holds for the stats of every replica in `urls`.
async fn wait_all(urls: &[String], what: &str, limit: Duration, done: impl Fn(&TrackerStats) -> bool) {
    let started = Instant::now();
    loop {
        let mut all = Vec::new();
        for u in urls {
            all.push(stats(u).await);
        }
        if all.iter().all(&done) {
            return;
        }
        let seen: Vec<(u64, u64)> = all.iter().map(|s| (s.nodes_total, s.nodes_healthy)).collect();
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}; (total, healthy) per replica: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A synthetic node: a signing key, the address it registers, the source address it speaks from and the
/// replica it prefers.
struct Synthetic {
    key: SigningKey,
    addr: SocketAddr,
    http: reqwest::Client,
    home: usize,
}

/// What the fleet saw.
#[derive(Default)]
struct Tally {
    registrations: AtomicU64,
    heartbeats: AtomicU64,
    failovers: AtomicU64,
}

fn key(i: usize) -> SigningKey {
    let mut seed = [0x5au8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
    SigningKey::from_bytes(&seed)
}

enum Answer {
    Registered(bool),
    Refused,
    Retry,
}

async fn post(http: &reqwest::Client, url: &str, path: &str, body: &Signed) -> Option<reqwest::Response> {
    http.post(format!("{url}{path}")).json(body).timeout(Duration::from_secs(5)).send().await.ok()
}

async fn register(n: &Synthetic, url: &str, tally: &Tally) -> bool {
    let reg = Register {
        quic_addr: n.addr,
        cache_capacity: 1 << 30,
        upload_limit: Some(10 << 20),
        version: "synthetic".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: None,
    };
    let answer = post(&n.http, url, "/v1/nodes/register", &Signed::sign(&n.key, KIND_REGISTER, &reg)).await;
    let ok = answer.is_some_and(|r| r.status().is_success());
    if ok {
        tally.registrations.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

async fn heartbeat(n: &Synthetic, url: &str, ts: u64) -> Answer {
    let hb = Heartbeat {
        timestamp_ms: ts,
        stats: NodeStats::default(),
        draining: false,
        overlay: None,
        web_transport: None,
        upload_plan: None,
    };
    match post(&n.http, url, "/v1/nodes/heartbeat", &Signed::sign(&n.key, KIND_HEARTBEAT, &hb)).await {
        Some(r) if r.status().is_success() => {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            Answer::Registered(body["registered"].as_bool().unwrap_or(false))
        }
        Some(r) if r.status().as_u16() == 401 => Answer::Refused,
        _ => Answer::Retry,
    }
}

/// Heartbeats `n` every interval until refused (blocked) or the test ends: to its home replica, else the
/// next one that answers; registers again only when a replica says it does not know the node.
async fn run_synthetic(n: Arc<Synthetic>, urls: Urls, tally: Arc<Tally>, offset: Duration) {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(HEARTBEAT);
    let (mut at, mut last) = (n.home, 0u64);
    loop {
        tick.tick().await;
        for _ in 0..3 {
            let url = urls.read().expect("urls")[at].clone();
            last = now_ms().max(last + 1);
            match heartbeat(&n, &url, last).await {
                Answer::Registered(true) => {
                    tally.heartbeats.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Answer::Registered(false) => {
                    register(&n, &url, &tally).await;
                    break;
                }
                Answer::Refused => return,
                Answer::Retry => {
                    tally.failovers.fetch_add(1, Ordering::Relaxed);
                    at = (at + 1) % 3;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_registry_blocks_and_survive_losing_a_server_and_a_replica() {
    let dir = test_dir("fogcdn-cluster");
    let mut nats = match NatsCluster::start(3, dir.path()).await {
        Ok(n) => n,
        Err(why) => {
            eprintln!("skipping the cluster test: {why}");
            return;
        }
    };
    if let Some(why) = TestPostgres::unavailable() {
        eprintln!("skipping the cluster test: {why}");
        return;
    }
    let pg = TestPostgres::start();
    let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("origin");
    let object = fog_testkit::test_bytes(256 << 10, 15);
    origin.put("/video.bin", object.clone());
    let url = origin.url("/video.bin");

    // Replicas of a cell share the tracker key.
    for i in 0..3 {
        std::fs::create_dir_all(dir.path().join(format!("tracker{i}"))).expect("tracker dir");
    }
    fog_net::identity::load_or_create(&dir.path().join("tracker0/tracker.key")).expect("key");
    for i in 1..3 {
        let to = dir.path().join(format!("tracker{i}/tracker.key"));
        std::fs::copy(dir.path().join("tracker0/tracker.key"), to).expect("share the key");
    }
    let args: Vec<Vec<String>> =
        (0..3).map(|i| tracker_args(dir.path(), i, &origin.base_url(), &nats.urls(), &pg.conn_str())).collect();
    let mut trackers = Vec::new();
    for (i, a) in args.iter().enumerate() {
        trackers.push(Proc::spawn("fog-tracker", a, dir.path().join(format!("tracker{i}.log"))).await);
    }
    let urls: Urls = Arc::new(RwLock::new(trackers.iter().map(|t| format!("http://{}", t.addr)).collect()));
    let all = || urls.read().expect("urls").clone();
    for u in all() {
        let started = Instant::now();
        while ready(&u).await != 200 {
            assert!(started.elapsed() < Duration::from_secs(30), "{u} not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The fleet: each node registers at its home replica, from its source address.
    let decoy = handshake_only_endpoint(&key(usize::MAX));
    let mut endpoints = Vec::new();
    let mut fleet = Vec::new();
    let mut clients = Vec::new();
    for s in 0..SYNTHETIC.div_ceil(PER_SOURCE) {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 10 + s as u8));
        clients.push(reqwest::Client::builder().local_address(source).build().expect("client"));
    }
    for i in 0..SYNTHETIC {
        let key = key(i);
        let addr = if i < REACHABLE {
            let endpoint = handshake_only_endpoint(&key);
            let addr = endpoint.local_addr().expect("addr");
            endpoints.push(endpoint);
            addr
        } else {
            decoy.local_addr().expect("addr")
        };
        fleet.push(Arc::new(Synthetic { key, addr, http: clients[i / PER_SOURCE].clone(), home: i % 3 }));
    }
    let tally = Arc::new(Tally::default());
    let mut registering = tokio::task::JoinSet::new();
    for n in &fleet {
        let (n, url, tally) = (n.clone(), all()[n.home].clone(), tally.clone());
        registering.spawn(async move { assert!(register(&n, &url, &tally).await, "registration refused") });
        while registering.len() >= 64 {
            registering.join_next().await.expect("task").expect("registered");
        }
    }
    while let Some(done) = registering.join_next().await {
        done.expect("registered");
    }
    let mut beating = tokio::task::JoinSet::new();
    for (i, n) in fleet.iter().enumerate() {
        let offset = HEARTBEAT * i as u32 / SYNTHETIC as u32;
        beating.spawn(run_synthetic(n.clone(), urls.clone(), tally.clone(), offset));
    }

    // Real nodes, each told of one replica (the ones that stay up), and a client of another.
    let mut real = Vec::new();
    for j in 0..REAL_NODES {
        let node_args: Vec<String> = [
            "--tracker",
            &all()[j % 2],
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir.path().join(format!("node{j}")).display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        real.push(Proc::spawn("fog-node", &node_args, dir.path().join(format!("node{j}.log"))).await);
    }
    let (total, healthy) = ((SYNTHETIC + REAL_NODES) as u64, (REACHABLE + REAL_NODES) as u64);
    wait_all(&all(), "every replica to hold every node", Duration::from_secs(120), |s| {
        s.nodes_total == total && s.nodes_healthy == healthy
    })
    .await;
    let client =
        fog_client::FogClient::new(fog_client::ClientConfig { tracker: Some(all()[1].clone()), ..Default::default() })
            .expect("client");
    let (bytes, _) = client.get(&url).await.expect("fetch through replica 1");
    assert!(bytes == object, "the client got other bytes");

    // A node registered at one replica is counted by all within a heartbeat interval.
    let late_key = key(SYNTHETIC);
    let late_endpoint = handshake_only_endpoint(&late_key);
    let late =
        Synthetic { key: late_key, addr: late_endpoint.local_addr().expect("addr"), http: clients[0].clone(), home: 0 };
    let late = Arc::new(late);
    assert!(register(&late, &all()[0], &tally).await);
    beating.spawn(run_synthetic(late.clone(), urls.clone(), tally.clone(), HEARTBEAT));
    tokio::time::sleep(HEARTBEAT).await;
    let counts: Vec<(u64, u64)> = {
        let mut v = Vec::new();
        for u in all() {
            let s = stats(&u).await;
            v.push((s.nodes_total, s.nodes_healthy));
        }
        v
    };
    assert!(counts.iter().all(|c| *c == (total + 1, healthy + 1)), "a heartbeat interval later: {counts:?}");

    // A block at replica 0 is enforced by all within 1 s.
    let blocked_id = NodeId::from(fleet[1].key.verifying_key());
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/admin/nodes/{}/block", all()[0], blocked_id.to_hex()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("block");
    assert_eq!(resp.status().as_u16(), 200);
    let mut enforced_by: HashSet<usize> = HashSet::new();
    while enforced_by.len() < 3 {
        for (i, u) in all().iter().enumerate() {
            let blocked: Vec<NodeId> = get_json(format!("{u}/v1/admin/blocked")).await;
            if blocked.contains(&blocked_id) {
                enforced_by.insert(i);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the block reached only {enforced_by:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    eprintln!("block enforced by every replica after {took:?}");
    assert!(took < Duration::from_secs(1), "the block took {took:?} to reach every replica");
    // One more (the late node), one less (the blocked one).
    wait_all(&all(), "the blocked node to be gone everywhere", HEARTBEAT * 2, |s| {
        s.nodes_total == total && s.nodes_healthy == healthy
    })
    .await;
    // The late node heartbeats to replica 2, which never saw its registration: known there all the same.
    assert!(matches!(heartbeat(&late, &all()[2], now_ms()).await, Answer::Registered(true)));

    // Mid-traffic: a nats-server dies, then replica 2 (the home of a third of the fleet).
    let registrations_before = metric(&all()[0], "fog_tracker_registrations_total").await
        + metric(&all()[1], "fog_tracker_registrations_total").await;
    let fleet_registrations = tally.registrations.load(Ordering::Relaxed);
    // The server most replicas are connected to (they pick theirs at random).
    let mut connected = Vec::new();
    for server in &nats.servers {
        connected.push(server.clients().await);
    }
    let busiest = (0..connected.len()).max_by_key(|&i| connected[i]).expect("servers");
    assert!(connected[busiest] >= 1, "no replica connected to any nats-server: {connected:?}");
    nats.kill(busiest);
    tokio::time::sleep(HEARTBEAT).await;
    trackers[2].kill();
    let survivors = all()[..2].to_vec();
    let resolve = |u: String| {
        let url = url.clone();
        async move {
            let r = reqwest::Client::new().get(format!("{u}/v1/resolve")).query(&[("url", &url)]).send().await;
            r.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    };
    let until = Instant::now() + HEARTBEAT * 4;
    let mut resolves = 0;
    while Instant::now() < until {
        for u in &survivors {
            assert_eq!(resolve(u.clone()).await, 200, "a resolve at {u} failed after the losses");
            resolves += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{resolves} resolves succeeded at the surviving replicas");
    // Replicas that were on the lost server reconnected to another and caught up.
    for u in &survivors {
        let started = Instant::now();
        while ready(u).await != 200 {
            assert!(started.elapsed() < Duration::from_secs(30), "{u} not ready again 30 s after the server loss");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // No node lost.
    wait_all(&survivors, "every node healthy at the surviving replicas", HEARTBEAT * 4, |s| {
        s.nodes_healthy == healthy && s.nodes_total == total
    })
    .await;
    let registrations_after = metric(&survivors[0], "fog_tracker_registrations_total").await
        + metric(&survivors[1], "fog_tracker_registrations_total").await;
    let moved = tally.failovers.load(Ordering::Relaxed);
    eprintln!(
        "after the losses: {moved} heartbeats failed over ({} accepted in all), {} registrations at the survivors, \
         {} by the fleet",
        tally.heartbeats.load(Ordering::Relaxed),
        registrations_after - registrations_before,
        tally.registrations.load(Ordering::Relaxed) - fleet_registrations
    );
    assert!(moved as usize >= SYNTHETIC / 3, "the fleet did not move off the dead replica ({moved} failovers)");
    // Nodes moved without registering again (a few may, whose record a reconnecting replica missed).
    assert!(
        registrations_after - registrations_before <= (SYNTHETIC / 100) as u64,
        "{} registrations after the losses: a re-registration storm",
        registrations_after - registrations_before
    );

    // Replica 2 restarted (same data, new port): not ready until it holds the whole cell, then it counts
    // the same as the others.
    let restarted = Proc::spawn("fog-tracker", &args[2], dir.path().join("tracker2.restart.log")).await;
    let restarted_url = format!("http://{}", restarted.addr);
    assert_eq!(ready(&restarted_url).await, 503, "a replica that just started must not say it is ready");
    let started = Instant::now();
    while ready(&restarted_url).await != 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "the restarted replica never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("restarted replica ready after {:?}", started.elapsed());
    assert!(started.elapsed() + Duration::from_millis(500) >= HEARTBEAT, "ready before a heartbeat interval");
    let expected = stats(&survivors[0]).await;
    let s = stats(&restarted_url).await;
    assert!(
        s.nodes_total + 2 >= expected.nodes_total && s.nodes_healthy + 2 >= expected.nodes_healthy,
        "the ready replica lacks nodes: {} / {} against {} / {}",
        s.nodes_total,
        s.nodes_healthy,
        expected.nodes_total,
        expected.nodes_healthy
    );
    assert!(!get_json::<Vec<NodeId>>(format!("{restarted_url}/v1/admin/blocked")).await.is_empty(), "blocks persisted");
    assert!(metric(&survivors[0], "fog_tracker_bus_malformed_total").await == 0);
    assert!(metric(&survivors[0], "fog_tracker_bus_merged_total").await > 0);
    beating.abort_all();
    drop((trackers, restarted, real, endpoints, late_endpoint, decoy));
}
