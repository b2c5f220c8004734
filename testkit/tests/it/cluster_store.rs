//! The tracker's durable state in PostgreSQL (issue #15): real `fog-tracker` processes against a PostgreSQL
//! the tests start on 127.0.0.1 (skipped, saying why, where it cannot run).
//!
//! - an embedded tracker's manifests and block list, exported with `fog-tracker export` (twice: the second
//!   changes nothing), serve replicas started with `--postgres` without reading the origin again; an object
//!   one replica ingests, another resolves from the database;
//! - manifests ingested while PostgreSQL is down are served from memory, stored once it is back, and
//!   survive the replica.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fog_proto::api::Resolve;
use fog_testkit::harness::{bin, test_dir, Proc};
use fog_testkit::origin::{Quirks, TestOrigin};
use fog_testkit::pg::TestPostgres;

const ADMIN: &str = "cluster-store-admin-token";

fn tracker_args(data: &Path, origin: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
        "--origin",
        origin,
        "--admin-token",
        ADMIN,
        "--probe-secs",
        "0",
        "--resolve-wait-ms",
        "20000",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

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
    let args = tracker_args(&embedded, &origin.base_url(), &[]);
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
        let args = tracker_args(&data, &origin.base_url(), &["--postgres", &conn]);
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
    let args = tracker_args(&dir.path().join("replica"), &origin.base_url(), &["--postgres", &conn]);
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
    let args = tracker_args(&dir.path().join("replica2"), &origin.base_url(), &["--postgres", &conn]);
    let other = Proc::spawn("fog-tracker", &args, dir.path().join("replica2.log")).await;
    assert_eq!(resolve(&other, &origin.url("/during.bin")).await.content_id, during.content_id);
    assert_eq!(origin.full_gets_for("/during.bin"), 1);
    assert_eq!(pg.psql("SELECT count(*) FROM fog_manifests"), "2");
}
