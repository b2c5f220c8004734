//! Failovers of a cell's durable state (issue #15), all real processes on 127.0.0.1: three nats-servers,
//! PostgreSQL under pg_auto_failover (monitor, primary, synchronous standby), three `fog-tracker` replicas
//! sharing the tracker key, real nodes given every replica, and real clients fetching through them, so the
//! redemptions are the nodes' own. The ledger is split into shards (`--ledger-shards`), which the replicas
//! divide: a node's batch spans shards, and the replica it reaches passes the other shards' receipts on to
//! their sequencers. While the clients fetch, a replica holding some shard's sequencer lease is SIGKILLed
//! (and restarted) three times and the PostgreSQL primary once. Then:
//!
//! - every node's credit in the ledger, summed over the shards, is to the byte the sum of its leaves, what
//!   the tracker answered it (its own books), and what it verified; the cell's total is what the clients
//!   verified;
//! - in every shard the leaves are exactly 0..size (their root is the shard's signed head's), and every
//!   head of the shard fetched before, during and after the failovers is consistent with every later one
//!   (`fog_proto::merkle`);
//! - replicas passed receipts on to the sequencers of shards they did not hold, and those were answered;
//! - every record a node was told "credited" is in the log (the node verified each one);
//! - objects first resolved while the database failed over are served, after every replica restarted with
//!   an empty cache, with the same manifests, from PostgreSQL (the origin is not read again).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fog_client::{ClientConfig, FogClient};
use fog_proto::api::{Resolve, Signed};
use fog_proto::credits::{LedgerLeaf, TreeHead, KIND_TREE_HEAD};
use fog_proto::merkle::{self, Hash, MemoryLog};
use fog_proto::NodeId;
use fog_testkit::harness::{test_dir, Proc};
use fog_testkit::nats::NatsCluster;
use fog_testkit::origin::{Quirks, TestOrigin};
use fog_testkit::pg_failover::PgFailover;
use serde_json::Value;

use crate::common::tracker_args;

const ADMIN: &str = "cluster-failover-admin-token";
const REPLICAS: usize = 3;
const NODES: usize = 3;
/// Objects the clients cycle through (each fetch resolves again: a new ticket, new payment chains).
const OBJECTS: usize = 8;
const OBJECT_LEN: usize = 384 << 10;
/// Objects first resolved while PostgreSQL fails over (two at each replica).
const DURING: usize = 6;
const SEQUENCER_KILLS: usize = 3;
/// Ledger shards: as many as replicas, so that batches span sequencers.
const SHARDS: u32 = 3;
/// The counter of forwards the holders answered.
const FORWARDED_OK: &str = "fog_tracker_ledger_forwarded_total{result=\"ok\"}";
/// Long enough for anything this test waits for (a lease to expire and be taken, a failover, a redemption
/// round); never a bound on how fast things must be.
const LIMIT: Duration = Duration::from_secs(90);

async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, String> {
    let resp = reqwest::Client::new().get(url).timeout(Duration::from_secs(10)).send().await;
    let resp = resp.map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    resp.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// Polls `f` (every 200 ms, up to [`LIMIT`]) until it gives a value.
async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < LIMIT, "waited {LIMIT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A metric's value in a replica's `/metrics` (0 when absent).
async fn metric(url: &str, name: &str) -> f64 {
    let text = match reqwest::get(format!("{url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// The replicas, on fixed addresses so that a restarted one is where nodes and clients look for it.
struct Replicas {
    dir: std::path::PathBuf,
    args: Vec<Vec<String>>,
    procs: Vec<Option<Proc>>,
    urls: Vec<String>,
    restarts: usize,
}

impl Replicas {
    async fn start(&mut self, i: usize) {
        self.restarts += 1;
        let log = self.dir.join(format!("tracker{i}.{}.log", self.restarts));
        self.procs[i] = Some(Proc::spawn("fog-tracker", &self.args[i], log).await);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.kill();
        }
    }

    /// Waits until replica `i` says it is ready (it holds the whole cell).
    async fn ready(&self, i: usize) {
        let url = format!("{}/readyz", self.urls[i]);
        poll(&format!("replica {i} ready"), async || {
            let r = reqwest::get(&url).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }
}

/// A shard's head fetched from the cell and checked: signed by the cell's key, for that shard.
async fn head(urls: &[String], key: NodeId, shard: u32) -> (u64, Hash) {
    poll("a signed head", async || {
        for u in urls {
            if let Ok(signed) = get_json::<Signed>(&format!("{u}/v1/ledger/head?shard={shard}")).await {
                assert_eq!(signed.node_id, key, "a head signed by another key");
                let h: TreeHead = signed.open(KIND_TREE_HEAD).expect("the head's signature verifies");
                assert_eq!(h.shard, shard, "asked for a head of shard {shard}");
                return Some((h.size, h.root.0));
            }
        }
        None
    })
    .await
}

/// Every shard's head, in shard order.
async fn heads_now(urls: &[String], key: NodeId) -> Vec<(u64, Hash)> {
    let mut out = Vec::new();
    for shard in 0..SHARDS {
        out.push(head(urls, key, shard).await);
    }
    out
}

/// A shard's lease as the database has it.
#[derive(Debug, Clone)]
struct Lease {
    holder_url: String,
    token: u64,
    size: u64,
    /// Not run out (a killed holder's lease names it until another replica takes it).
    live: bool,
}

/// Every shard's lease, in shard order (`None` while the database cannot be read).
fn leases(pg: &PgFailover) -> Option<Vec<Lease>> {
    let sql = "SELECT coalesce(holder_url, ''), token, size, coalesce(lease_until > clock_timestamp(), false)
               FROM ledger_shards ORDER BY shard";
    let rows = pg.psql(sql).ok()?;
    let leases: Option<Vec<Lease>> = rows
        .lines()
        .map(|row| {
            let mut f = row.split('|');
            Some(Lease {
                holder_url: f.next()?.to_string(),
                token: f.next()?.parse().ok()?,
                size: f.next()?.parse().ok()?,
                live: f.next()? == "t",
            })
        })
        .collect();
    leases.filter(|l| l.len() == SHARDS as usize)
}

/// Records in all shards.
fn total_size(leases: &[Lease]) -> u64 {
    leases.iter().map(|l| l.size).sum()
}

#[derive(Default)]
struct Traffic {
    fetches: AtomicU64,
    fog_bytes: AtomicU64,
    failures: Mutex<Vec<String>>,
}

async fn fetch_loop(
    trackers: String,
    origin: Arc<TestOrigin>,
    objects: Arc<Vec<Vec<u8>>>,
    t: Arc<Traffic>,
    stop: Arc<AtomicBool>,
    seed: usize,
) {
    let client = FogClient::new(ClientConfig { tracker: Some(trackers), ..Default::default() }).expect("client");
    let mut n = seed;
    while !stop.load(Ordering::Relaxed) {
        let i = n % OBJECTS;
        n += 1;
        match client.get(&origin.url(&format!("o{i}.bin"))).await {
            Ok((bytes, report)) => {
                assert!(bytes == objects[i], "a client got other bytes for o{i}.bin");
                t.fetches.fetch_add(1, Ordering::Relaxed);
                t.fog_bytes.fetch_add(report.fog_bytes, Ordering::Relaxed);
            }
            Err(e) => t.failures.lock().expect("failures").push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_and_manifests_survive_sequencer_and_database_failovers() {
    if let Some(why) = PgFailover::unavailable() {
        eprintln!("SKIPPED credits_and_manifests_survive_sequencer_and_database_failovers: {why}");
        return;
    }
    let dir = test_dir("fogcdn-failover");
    let nats = match NatsCluster::start(3, dir.path()).await {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED credits_and_manifests_survive_sequencer_and_database_failovers: {why}");
            return;
        }
    };
    let started = Instant::now();
    let mut pg = tokio::task::spawn_blocking(PgFailover::start).await.expect("pg_auto_failover");
    eprintln!("pg_auto_failover up after {:?}", started.elapsed());
    let origin =
        Arc::new(TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("origin"));
    let objects: Arc<Vec<Vec<u8>>> =
        Arc::new((0..OBJECTS).map(|i| fog_testkit::test_bytes(OBJECT_LEN + i * 1000, 150 + i as u64)).collect());
    for (i, o) in objects.iter().enumerate() {
        origin.put(&format!("o{i}.bin"), o.clone());
    }
    for i in 0..DURING {
        origin.put(&format!("during{i}.bin"), fog_testkit::test_bytes(200 << 10, 300 + i as u64));
    }

    // Replicas sharing the tracker key, on addresses fixed for the test.
    for i in 0..REPLICAS {
        std::fs::create_dir_all(dir.path().join(format!("tracker{i}"))).expect("tracker dir");
    }
    let key = fog_net::identity::load_or_create(&dir.path().join("tracker0/tracker.key")).expect("key");
    let key = NodeId::from(key.verifying_key());
    for i in 1..REPLICAS {
        let to = dir.path().join(format!("tracker{i}/tracker.key"));
        std::fs::copy(dir.path().join("tracker0/tracker.key"), to).expect("share the key");
    }
    let listen: Vec<String> = (0..REPLICAS).map(|_| format!("127.0.0.1:{}", fog_testkit::free_port())).collect();
    let (conn, nats_urls, shards) = (pg.conn_str(), nats.urls().join(","), SHARDS.to_string());
    let extra = [
        "--nats",
        &nats_urls,
        "--postgres",
        &conn,
        "--cell",
        "failover",
        "--heartbeat-secs",
        "2",
        "--chunk-size",
        "64KiB",
        "--epoch-secs",
        "20",
        // Every fetch paid for: the clients resolve more often than a viewer's default allowance.
        "--tickets-per-minute",
        "100000",
        "--ledger-shards",
        &shards,
    ];
    let mut replicas = Replicas {
        dir: dir.path().to_path_buf(),
        args: (0..REPLICAS)
            .map(|i| {
                let data = dir.path().join(format!("tracker{i}"));
                tracker_args(&data, &listen[i], &origin.base_url(), ADMIN, &extra)
            })
            .collect(),
        procs: (0..REPLICAS).map(|_| None).collect(),
        urls: listen.iter().map(|a| format!("http://{a}")).collect(),
        restarts: 0,
    };
    for i in 0..REPLICAS {
        replicas.start(i).await;
    }
    for i in 0..REPLICAS {
        replicas.ready(i).await;
    }
    let urls = replicas.urls.clone();
    let trackers = urls.join(",");

    // Real nodes, each given every replica.
    let mut nodes = Vec::new();
    let mut status_addrs = Vec::new();
    for j in 0..NODES {
        let data = dir.path().join(format!("node{j}"));
        let args: Vec<String> =
            ["--tracker", &trackers, "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0", "--data-dir"]
                .iter()
                .map(|a| a.to_string())
                .chain([data.display().to_string()])
                .collect();
        nodes.push(Proc::spawn("fog-node", &args, dir.path().join(format!("node{j}.log"))).await);
        status_addrs.push(data.join(fog_node::STATUS_ADDR_FILE));
    }
    for u in &urls {
        poll("every replica to count every node healthy", async || {
            let s: Value = get_json(&format!("{u}/v1/stats")).await.ok()?;
            (s["nodes_healthy"].as_u64() == Some(NODES as u64)).then_some(())
        })
        .await;
    }
    let node_status = async |j: usize| -> Value {
        let addr = std::fs::read_to_string(&status_addrs[j]).expect("status.addr");
        get_json(&format!("http://{}/status", addr.trim())).await.expect("node status")
    };

    // Clients fetch through the nodes from here to the end of the failovers.
    let traffic = Arc::new(Traffic::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..2 {
        clients.spawn(fetch_loop(
            trackers.clone(),
            origin.clone(),
            objects.clone(),
            traffic.clone(),
            stop.clone(),
            c * 3,
        ));
    }
    // Each shard's heads, in the order fetched.
    let mut heads: Vec<Vec<(u64, Hash)>> = heads_now(&urls, key).await.into_iter().map(|h| vec![h]).collect();
    let push_heads = |heads: &mut Vec<Vec<(u64, Hash)>>, now: Vec<(u64, Hash)>| {
        for (shard, h) in now.into_iter().enumerate() {
            heads[shard].push(h);
        }
    };
    // The first redemptions: every shard has a sequencer, and every shard's log grows.
    poll("a first credit in every shard", async || leases(&pg).filter(|l| l.iter().all(|l| l.live && l.size > 0)))
        .await;

    // Forwards the holders answered, counted at replicas before they were killed.
    let mut forwarded = 0.0;
    let mut failovers = Vec::new();
    let mut during: BTreeMap<String, (usize, Resolve)> = BTreeMap::new();
    for round in 0..SEQUENCER_KILLS {
        // A sequencer: the replica holding shard `round`'s lease (any shard's, if that one is between holders).
        let (i, held) = poll("a replica holding a lease", async || {
            let l = leases(&pg)?;
            let i = (0..SHARDS as usize)
                .map(|k| &l[(round + k) % SHARDS as usize])
                .filter(|l| l.live)
                .find_map(|l| urls.iter().position(|u| *u == l.holder_url))?;
            let held: Vec<(usize, Lease)> =
                l.into_iter().enumerate().filter(|(_, l)| l.holder_url == urls[i]).collect();
            Some((i, held))
        })
        .await;
        forwarded += metric(&urls[i], FORWARDED_OK).await;
        replicas.kill(i);
        eprintln!("round {round}: killed replica {i}, the sequencer of (shard, lease) {held:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        replicas.start(i).await;
        // Other replicas (or the restarted one) take its shards once their leases expire, and append.
        let taken = poll("the killed sequencer's shards taken over and growing", async || {
            let l = leases(&pg)?;
            held.iter().all(|(s, old)| l[*s].live && l[*s].token > old.token && l[*s].size > old.size).then_some(l)
        })
        .await;
        eprintln!("round {round}: the shards' leases now {taken:?}");
        push_heads(&mut heads, heads_now(&urls, key).await);
        replicas.ready(i).await;

        if round == 0 {
            // The database fails over, with objects first resolved meanwhile (two at each replica).
            let killed = tokio::task::block_in_place(|| pg.kill_primary());
            for d in 0..DURING {
                let (r, path) = (d % REPLICAS, format!("during{d}.bin"));
                let url = origin.url(&path);
                let resp = reqwest::Client::new()
                    .get(format!("{}/v1/resolve", urls[r]))
                    .query(&[("url", &url)])
                    .send()
                    .await
                    .expect("resolve during the failover");
                assert!(resp.status().is_success(), "resolve of {url} during the failover: {}", resp.status());
                during.insert(path, (r, resp.json().await.expect("resolve json")));
            }
            let took = tokio::task::block_in_place(|| pg.wait_promoted(LIMIT));
            eprintln!("PostgreSQL: pg-{} killed, the standby promoted and writable after {took:?}", ["a", "b"][killed]);
            failovers.push(took);
            let promoted = Instant::now();
            let size = total_size(&poll("the leases on the new primary", async || leases(&pg)).await);
            // Credits flow again on the new primary, and the held manifests reach it.
            poll("a credit on the new primary", async || leases(&pg).filter(|l| total_size(l) > size)).await;
            eprintln!("the log grew again {:?} after the promotion", promoted.elapsed());
            push_heads(&mut heads, heads_now(&urls, key).await);
            for u in &urls {
                poll("the manifests held during the failover stored", async || {
                    (metric(u, "fog_tracker_store_pending_writes").await == 0.0).then_some(())
                })
                .await;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = clients.join_next().await {
        done.expect("a client task panicked");
    }
    let fetches = traffic.fetches.load(Ordering::Relaxed);
    let fog_bytes = traffic.fog_bytes.load(Ordering::Relaxed);
    let failures = traffic.failures.lock().expect("failures").clone();
    eprintln!("{fetches} fetches ({fog_bytes} fog bytes), {} failed: {failures:?}", failures.len());
    assert!(fetches >= 10, "too little traffic: {fetches} fetches");

    // Every node redeems what it holds and verifies every record it was told of.
    let mut books = Vec::new();
    for j in 0..NODES {
        // Redeemed, verified, and its last statement read after its last redemption.
        let s = poll(&format!("node {j} to redeem and verify everything"), async || {
            let s = node_status(j).await;
            let statement: Value =
                get_json(&format!("{}/v1/nodes/{}/credits", urls[0], s["node_id"].as_str()?)).await.ok()?;
            let c = &s["credits"];
            let settled = c["receipts_held"] == 0
                && s["earnings"]["pending_records"] == 0
                && c["tracker_credited"] == statement["credited_bytes"];
            settled.then_some(s)
        })
        .await;
        books.push(s);
    }
    push_heads(&mut heads, heads_now(&urls, key).await);

    // Per shard, the log: leaves exactly 0..size, whose root is the shard's signed head's; and every head of
    // the shard consistent with every later one.
    let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
    for (shard, heads) in heads.iter().enumerate() {
        let (size, root) = *heads.last().expect("heads");
        let mut log = MemoryLog::default();
        for index in 0..size {
            let at = &urls[index as usize % REPLICAS];
            let leaf: LedgerLeaf = get_json(&format!("{at}/v1/ledger/leaf?index={index}&shard={shard}"))
                .await
                .unwrap_or_else(|e| panic!("leaf {index} of {size} in shard {shard}: {e}"));
            log.push(&leaf.bytes());
            *per_node.entry(leaf.node).or_default() += leaf.credited_bytes;
        }
        let past = reqwest::get(format!("{}/v1/ledger/leaf?index={size}&shard={shard}", urls[0]));
        let past = past.await.expect("leaf past the end");
        assert_eq!(past.status().as_u16(), 404, "a leaf past the head's size in shard {shard}");
        assert_eq!(
            merkle::root(&log, size),
            root,
            "shard {shard}: the leaves 0..{size} are not the log its head signs"
        );

        for (a, (first, first_root)) in heads.iter().enumerate() {
            for (second, second_root) in &heads[a + 1..] {
                if *first == 0 || first == second {
                    assert!(
                        *first != *second || first_root == second_root,
                        "shard {shard}: two roots for size {first}"
                    );
                    continue;
                }
                let url = format!("{}/v1/ledger/consistency?first={first}&second={second}&shard={shard}", urls[0]);
                let proof: Value = get_json(&url).await.expect("consistency proof");
                let proof: Vec<Hash> =
                    serde_json::from_value::<Vec<fog_proto::credits::Digest>>(proof["proof"].clone())
                        .expect("proof")
                        .into_iter()
                        .map(|d| d.0)
                        .collect();
                assert!(
                    merkle::verify_consistency(*first, *second, &proof, first_root, second_root),
                    "shard {shard}: the head of size {first} is not consistent with the head of size {second}"
                );
            }
        }
        eprintln!(
            "shard {shard}: log of {size} leaves; {} heads checked pairwise: {:?}",
            heads.len(),
            heads.iter().map(|h| h.0).collect::<Vec<_>>()
        );
    }

    // Each node's credit: its leaves, the tracker's statement, its own books, to the byte.
    let mut total = 0;
    for (j, s) in books.iter().enumerate() {
        let id: NodeId = serde_json::from_value(s["node_id"].clone()).expect("node id");
        let statement: Value = get_json(&format!("{}/v1/nodes/{id}/credits", urls[0])).await.expect("statement");
        let ledger = statement["credited_bytes"].as_u64().expect("credited bytes");
        let leaves = per_node.get(&id).copied().unwrap_or(0);
        let e = &s["earnings"];
        let told = e["totals"]["credited_bytes"].as_u64().expect("told credited");
        let duplicates = e["totals"]["receipts_duplicate"].as_u64().unwrap_or(0);
        let verified: u64 = e["epochs"]
            .as_array()
            .expect("epochs")
            .iter()
            .map(|p| {
                assert_eq!(p["records_failed"], 0, "node {j}: a record failed verification: {p:#}");
                assert_ne!(p["consistent"], false, "node {j}: an inconsistent sealed head: {p:#}");
                p["node_bytes"].as_u64().expect("node bytes")
            })
            .sum();
        eprintln!(
            "node {j}: ledger {ledger}, leaves {leaves}, told {told} (duplicates {duplicates}), verified {verified}"
        );
        assert!(s["credits"]["ledger_problem"].is_null(), "node {j}: {:#}", s["credits"]);
        assert_eq!(e["totals"]["receipts_rejected"], 0, "node {j}: receipts rejected: {e:#}");
        assert_eq!(leaves, ledger, "node {j}: the statement is not the sum of its leaves");
        // Every record the node was told of is in the log: it verified each one.
        assert_eq!(verified, told, "node {j}: records it was told of and did not verify");
        // An answer lost with a killed replica makes the retry a duplicate: credited, but not heard of.
        if duplicates == 0 {
            assert_eq!(told, ledger, "node {j}: its books and the ledger differ");
        } else {
            assert!(told <= ledger, "node {j}: told of more than the ledger holds");
        }
        assert_eq!(s["credits"]["tracker_credited"].as_u64(), Some(ledger), "node {j}: its last statement");
        total += ledger;
    }
    assert_eq!(per_node.values().sum::<u64>(), total, "leaves crediting nodes that are not the test's");
    if failures.is_empty() {
        assert_eq!(total, fog_bytes, "the ledger credits other than the bytes clients verified");
    } else {
        assert!(total >= fog_bytes, "the ledger credits less than the bytes clients verified");
    }

    // Batches crossed replicas: some reached one not sequencing all their shards, which passed the rest on.
    for u in &urls {
        forwarded += metric(u, FORWARDED_OK).await;
    }
    eprintln!("{forwarded} redemption batches passed on between replicas and answered");
    assert!(forwarded > 0.0, "no replica passed receipts on to another shard's sequencer");

    // Every replica restarted (empty caches): the manifests ingested during the database failover are
    // served from PostgreSQL as they were, and the origin is not read again.
    for i in 0..REPLICAS {
        replicas.kill(i);
    }
    for i in 0..REPLICAS {
        replicas.start(i).await;
    }
    for (path, (at, first)) in &during {
        let url = origin.url(path);
        for u in &urls {
            let resp = reqwest::Client::new().get(format!("{u}/v1/resolve")).query(&[("url", &url)]).send().await;
            let resp = resp.expect("resolve after the restarts");
            assert!(resp.status().is_success(), "resolve of {url} at {u} after the restarts: {}", resp.status());
            let r: Resolve = resp.json().await.expect("resolve json");
            assert_eq!(r.content_id, first.content_id, "{url} at {u} (first resolved at replica {at})");
            assert_eq!(
                serde_json::to_value(&r.manifest).expect("json"),
                serde_json::to_value(&first.manifest).expect("json"),
                "{url}: another manifest after the restarts"
            );
        }
        assert_eq!(origin.full_gets_for(path), 1, "{url} ingested again");
    }
    eprintln!("failovers: {failovers:?}; whole test {:?}", started.elapsed());
    drop((nodes, replicas.procs, nats));
}
