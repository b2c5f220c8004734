//! The tracker's durable state in PostgreSQL (issue #15): real `fog-tracker` processes against a PostgreSQL
//! the tests start on 127.0.0.1 (skipped, saying why, where it cannot run).
//!
//! - an embedded tracker's manifests and block list, exported with `fog-tracker export` (twice: the second
//!   changes nothing), serve replicas started with `--postgres` without reading the origin again; an object
//!   one replica ingests, another resolves from the database;
//! - manifests ingested while PostgreSQL is down are served from memory, stored once it is back, and
//!   survive the replica;
//! - with the cell's bus too: an object one replica ingests again after its origin changed is served new by
//!   a replica that had the old manifest cached; the ledger's lease passes to the survivor when its
//!   sequencer is killed, naming the survivor's advertised URL.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fog_proto::api::Resolve;
use fog_testkit::harness::{bin, test_dir, Proc};
use fog_testkit::origin::{Quirks, TestOrigin};
use fog_testkit::pg::TestPostgres;

use crate::common::tracker_args;

const ADMIN: &str = "cluster-store-admin-token";

async fn resolve(tracker: &Proc, url: &str) -> Resolve {
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v1/resolve", tracker.addr))
        .query(&[("url", url)])
        .send()
        .await
        .expect("resolve");
    assert!(resp.status().is_success(), "resolve {url}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    resp.json().await.expect("resolve json")
}

/// A gauge's or counter's value in a tracker's `/metrics`.
async fn metric(tracker: &Proc, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", tracker.addr)).await.expect("metrics").text().await;
    let text = text.expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn export(conn: &str, data: &Path) -> String {
    let out = Command::new(bin("fog-tracker"))
        .args(["export", "--postgres", conn, "--data-dir", &data.display().to_string()])
        .output()
        .expect("run fog-tracker export");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "export failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn postgres(test: &str) -> Option<TestPostgres> {
    if let Some(why) = TestPostgres::unavailable() {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some(TestPostgres::start())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_tracker_serves_its_replicas() {
    let Some(pg) = postgres("an_exported_tracker_serves_its_replicas") else { return };
    let dir = test_dir("fogcdn-store");
    let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("origin");
    origin.put("/a.bin", fog_testkit::test_bytes(300 << 10, 1));
    origin.put("/b.bin", fog_testkit::test_bytes(200 << 10, 2));
    let embedded = dir.path().join("embedded");
    let args = tracker_args(&embedded, "127.0.0.1:0", &origin.base_url(), ADMIN, &[]);
    let mut tracker = Proc::spawn("fog-tracker", &args, dir.path().join("embedded.log")).await;
    let a = resolve(&tracker, &origin.url("/a.bin")).await;
    assert!(a.manifest.is_complete());
    let blocked = "ab".repeat(32);
    let block = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/nodes/{blocked}/block", tracker.addr))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("block");
    assert!(block.status().is_success(), "{}", block.status());
    tracker.terminate().await.expect("the tracker stops");

    let conn = pg.conn_str();
    let first = export(&conn, &embedded);
    assert!(first.contains("exported 1 manifests (1 new, 0 already there) and 1 blocked nodes"), "{first}");
    let again = export(&conn, &embedded);
    assert!(again.contains("exported 1 manifests (0 new, 1 already there) and 1 blocked nodes"), "{again}");
    assert_eq!(pg.psql("SELECT count(*) FROM fog_manifests"), "1");
    assert_eq!(pg.psql(&format!("SELECT count(*) FROM fog_blocked_nodes WHERE node_id = '\\x{blocked}'")), "1");

    // Two replicas on the database: the exported manifest is served as it was, the origin not read again.
    let mut replicas = Vec::new();
    for i in 0..2 {
        let data = dir.path().join(format!("replica{i}"));
        let args = tracker_args(&data, "127.0.0.1:0", &origin.base_url(), ADMIN, &["--postgres", &conn]);
        replicas.push(Proc::spawn("fog-tracker", &args, dir.path().join(format!("replica{i}.log"))).await);
    }
    for replica in &replicas {
        assert_eq!(resolve(replica, &origin.url("/a.bin")).await.content_id, a.content_id);
    }
    assert_eq!(origin.full_gets_for("/a.bin"), 1, "ingested once, by the embedded tracker");
    // One replica ingests; the other finds the manifest in the database.
    let b = resolve(&replicas[0], &origin.url("/b.bin")).await;
    assert_eq!(resolve(&replicas[1], &origin.url("/b.bin")).await.content_id, b.content_id);
    assert_eq!(origin.full_gets_for("/b.bin"), 1);
    assert_eq!(metric(&replicas[0], "fog_tracker_manifests").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_ingested_while_postgres_is_down_survive() {
    let Some(mut pg) = postgres("manifests_ingested_while_postgres_is_down_survive") else { return };
    let dir = test_dir("fogcdn-store");
    let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("origin");
    origin.put("/before.bin", fog_testkit::test_bytes(100 << 10, 3));
    origin.put("/during.bin", fog_testkit::test_bytes(150 << 10, 4));
    let conn = pg.conn_str();
    let args =
        tracker_args(&dir.path().join("replica"), "127.0.0.1:0", &origin.base_url(), ADMIN, &["--postgres", &conn]);
    let mut replica = Proc::spawn("fog-tracker", &args, dir.path().join("replica.log")).await;
    let before = resolve(&replica, &origin.url("/before.bin")).await;

    pg.crash();
    // A cached manifest resolves without the database; a new object is ingested and served from memory.
    assert_eq!(resolve(&replica, &origin.url("/before.bin")).await.content_id, before.content_id);
    let during = resolve(&replica, &origin.url("/during.bin")).await;
    assert!(during.manifest.is_complete());
    assert_eq!(metric(&replica, "fog_tracker_store_pending_writes").await, 1.0);
    assert!(metric(&replica, "fog_tracker_store_errors_total{op=\"put\"}").await >= 1.0);
    assert_eq!(resolve(&replica, &origin.url("/during.bin")).await.content_id, during.content_id);

    pg.restart();
    let started = Instant::now();
    while metric(&replica, "fog_tracker_store_pending_writes").await > 0.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the held write was not stored once PostgreSQL was back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    replica.kill();
    // Another replica finds it in the database: the origin is not read again.
    let args =
        tracker_args(&dir.path().join("replica2"), "127.0.0.1:0", &origin.base_url(), ADMIN, &["--postgres", &conn]);
    let other = Proc::spawn("fog-tracker", &args, dir.path().join("replica2.log")).await;
    assert_eq!(resolve(&other, &origin.url("/during.bin")).await.content_id, during.content_id);
    assert_eq!(origin.full_gets_for("/during.bin"), 1);
    assert_eq!(pg.psql("SELECT count(*) FROM fog_manifests"), "2");
}

/// Polls `check` until it holds, for at most a minute.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}: not within a minute");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A metric's value in a tracker's `/metrics`, 0 while it is not there (a labelled counter not counted yet).
async fn value(tracker: &Proc, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", tracker.addr)).await.expect("metrics").text().await;
    let text = text.expect("metrics text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_object_reaches_every_replica_and_the_lease_moves_to_the_survivor() {
    const TEST: &str = "a_changed_object_reaches_every_replica_and_the_lease_moves_to_the_survivor";
    let Some(pg) = postgres(TEST) else { return };
    let dir = test_dir("fogcdn-store");
    let nats = match fog_testkit::nats::NatsCluster::start(1, dir.path()).await {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: {why}");
            return;
        }
    };
    let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("origin");
    origin.put("/changing.bin", fog_testkit::test_bytes(200 << 10, 5));
    let url = origin.url("/changing.bin");
    let (conn, nats) = (pg.conn_str(), nats.urls().join(","));
    // Replica 1 says where it is reached; replica 0 advertises its listen address. One-second epochs keep
    // the sealer, and so the ledger's lease, busy.
    let cluster = ["--postgres", &conn, "--nats", &nats, "--cell", "store", "--heartbeat-secs", "1"];
    let more = ["--min-reingest-secs", "0", "--epoch-secs", "1"];
    let mut replicas = Vec::new();
    for (i, advertise) in [None, Some("http://replica-1.test:7700")].into_iter().enumerate() {
        let mut extra: Vec<&str> = cluster.iter().chain(&more).copied().collect();
        extra.extend(advertise.map(|a| ["--advertise-url", a]).into_iter().flatten());
        let args = tracker_args(&dir.path().join(format!("r{i}")), "127.0.0.1:0", &origin.base_url(), ADMIN, &extra);
        replicas.push(Proc::spawn("fog-tracker", &args, dir.path().join(format!("r{i}.log"))).await);
    }
    let advertised = [format!("http://{}", replicas[0].addr), "http://replica-1.test:7700".to_string()];
    for r in &replicas {
        let readyz = &format!("http://{}/readyz", r.addr);
        eventually("a replica on the bus", || async move {
            reqwest::get(readyz).await.is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    // Both replicas hold the first version (the second caches it, read from the database).
    let v1 = resolve(&replicas[0], &url).await;
    assert_eq!(resolve(&replicas[1], &url).await.content_id, v1.content_id);
    // The object changes; a client of replica 0 finds out, and replica 0 ingests it again.
    origin.put("/changing.bin", fog_testkit::test_bytes(200 << 10, 6));
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v1/resolve", replicas[0].addr))
        .query(&[("url", url.as_str()), ("stale", &v1.content_id.to_string())])
        .send()
        .await
        .expect("resolve");
    assert!(resp.status().is_success(), "{}", resp.status());
    let v2: Resolve = resp.json().await.expect("resolve json");
    assert!(v2.manifest.is_complete());
    assert_ne!(v2.content_id, v1.content_id, "ingested again");
    assert_eq!(origin.full_gets_for("/changing.bin"), 2);
    let received = "fog_tracker_manifest_invalidations_total{direction=\"received\"}";
    let b = &replicas[1];
    eventually("the rewrite announced to replica 1", || async move { value(b, received).await >= 1.0 }).await;
    // Replica 1 drops its cached first version and serves the second, from the database.
    assert_eq!(resolve(&replicas[1], &url).await.content_id, v2.content_id);
    assert_eq!(metric(&replicas[1], "fog_tracker_manifest_invalidations_applied_total").await, 1.0);
    let sent = "fog_tracker_manifest_invalidations_total{direction=\"sent\"}";
    assert_eq!(metric(&replicas[0], sent).await, 2.0, "the first ingest and the second");
    assert_eq!(origin.full_gets_for("/changing.bin"), 2, "nobody read the origin for it again");

    // The ledger's lease: one replica sequences, naming its advertised URL.
    const SEQUENCER: &str = "fog_tracker_ledger_sequencer{shard=\"0\"}";
    let started = Instant::now();
    let holder = loop {
        let held = [value(&replicas[0], SEQUENCER).await, value(&replicas[1], SEQUENCER).await];
        if held.iter().sum::<f64>() == 1.0 {
            break held.iter().position(|h| *h == 1.0).expect("one holds it");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no single sequencer: {held:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let holder_url = || pg.psql("SELECT holder_url FROM ledger_shards WHERE shard = 0");
    assert_eq!(holder_url(), advertised[holder]);
    // It is killed: the other takes the lease over once it expires.
    replicas[holder].kill();
    let survivor = &replicas[1 - holder];
    eventually("the survivor sequences", || async move { value(survivor, SEQUENCER).await == 1.0 }).await;
    assert_eq!(metric(survivor, "fog_tracker_ledger_takeovers_total{shard=\"0\"}").await, 1.0);
    assert_eq!(metric(survivor, "fog_tracker_ledger_fenced_total{shard=\"0\"}").await, 0.0);
    assert_eq!(holder_url(), advertised[1 - holder]);
}
