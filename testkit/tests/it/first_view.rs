//! No viewer waits for ingest (#19): a resolve answers with the manifest as far as it is hashed, clients
//! read the rest from the origin; one ingest per object; seeks are hashed first; published manifests
//! spare the origin the tracker's read, and a wrong one is caught and replaced.
//!
//! The origin sends each response at 10 MB/s, so reading a 200 MB object takes the tracker 20 s: "the
//! first byte arrived while the tracker was still reading" is how these tests say "no wait for ingest"
//! without timing anything.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use fog_client::proxy::proxied_url;
use fog_client::{FetchOptions, FogClient};
use fog_proto::manifest::{ManifestBuilder, SIDECAR_SUFFIX};
use fog_proto::{ChunkHash, Manifest};
use fog_testkit::harness::{Cluster, ClusterOptions, Proc};
use fog_testkit::origin::Quirks;
use fog_testkit::test_bytes;
use tokio::io::AsyncReadExt;

use crate::common::{resolve, MIB};

const RATE: u64 = 10_000_000;
const ADMIN: &str = "first-view-admin-token";

fn slow(ignore_range: bool) -> Quirks {
    Quirks { ignore_range, rate: NonZeroU64::new(RATE), ..Default::default() }
}

async fn cluster(quirks: Quirks, extra: &[&str]) -> Cluster {
    // The production default wait (the harness otherwise waits for whole ingests).
    let mut tracker_args: Vec<String> =
        vec!["--admin-token".into(), ADMIN.into(), "--resolve-wait-ms".into(), "50".into()];
    tracker_args.extend(extra.iter().map(|s| s.to_string()));
    let cluster = Cluster::start(ClusterOptions { nodes: 2, quirks, tracker_args, ..Default::default() }).await;
    cluster.wait_healthy(2).await;
    cluster
}

/// The first `n` bytes `client` delivers of `url` (the fetch is then dropped, as a player that stops).
async fn first_bytes(client: &FogClient, url: &str, n: usize) -> (Vec<u8>, Duration) {
    let (mut reader, mut writer) = tokio::io::duplex(256 << 10);
    let (client, url) = (client.clone(), url.to_string());
    let started = Instant::now();
    let fetch = tokio::spawn(async move { client.fetch_to(&url, &mut writer).await });
    let mut got = vec![0; n];
    reader.read_exact(&mut got).await.expect("first bytes");
    let took = started.elapsed();
    fetch.abort();
    (got, took)
}

async fn proxy(cluster: &Cluster) -> Proc {
    let args: Vec<String> =
        vec!["proxy".into(), "--tracker".into(), cluster.tracker_url(), "--listen".into(), "127.0.0.1:0".into()];
    Proc::spawn("fog", &args, cluster.dir.path().join("proxy.log")).await
}

/// Bytes `[start, end)` of `url` through the player proxy.
async fn through_proxy(proxy: &Proc, url: &str, start: usize, end: usize) -> Vec<u8> {
    let r = reqwest::Client::new()
        .get(proxied_url(url, &proxy.addr).expect("proxied url"))
        .header("Range", format!("bytes={start}-{}", end - 1))
        .send()
        .await
        .expect("proxy request");
    assert!(r.status().is_success(), "{}", r.status());
    r.bytes().await.expect("proxy body").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_viewers_start_while_the_tracker_is_still_reading() {
    for ignore_range in [false, true] {
        let cluster = cluster(slow(ignore_range), &[]).await;
        let object = test_bytes(200 * MIB, 19);
        cluster.origin.put("movie.mp4", object.clone());
        let url = cluster.origin.url("movie.mp4");
        let client = cluster.client();

        let (head, took) = first_bytes(&client, &url, 64 << 10).await;
        assert_eq!(head, object[..64 << 10], "first bytes (origin ignores Range: {ignore_range})");
        let stats = cluster.stats().await;
        assert_eq!(stats.ingests_running, 1, "the first byte came before the tracker finished reading");
        eprintln!("fog get: first 64 KiB after {took:?} (Range ignored: {ignore_range})");

        let proxy = proxy(&cluster).await;
        assert_eq!(through_proxy(&proxy, &url, 0, 64 << 10).await, object[..64 << 10]);
        if !ignore_range {
            // A seek to the last megabyte: through the client and through the proxy.
            let tail = object.len() - MIB;
            let resolved = client.resolve(&url, None, tail as u64).await.expect("resolve from the tail");
            let mut out = Vec::new();
            let opts = FetchOptions { range: Some((tail as u64, object.len() as u64)), deadline: None };
            client.fetch_resolved(&resolved, opts, &mut out, &mut 0).await.expect("seek");
            assert_eq!(out, object[tail..], "last megabyte");
            assert_eq!(through_proxy(&proxy, &url, tail, object.len()).await, object[tail..]);
        }
        assert_eq!(cluster.stats().await.ingests_running, 1, "all of that while the tracker was reading");
        assert_eq!(cluster.origin.full_gets_for("movie.mp4"), 1, "one ingest read");

        // A second viewer a little later gets the chunks hashed by then from the fog.
        let hashed = wait_hashed(&cluster, &url, 4).await;
        assert!(!hashed.is_complete());
        let resolved = client.resolve(&url, None, 0).await.expect("resolve");
        let mut out = Vec::new();
        let opts = FetchOptions { range: Some((0, 4 * MIB as u64)), deadline: None };
        let report = client.fetch_resolved(&resolved, opts, &mut out, &mut 0).await.expect("second viewer");
        assert_eq!(out, object[..4 * MIB]);
        assert_eq!(report.fog_bytes, 4 * MIB as u64, "hashed chunks come from the fog: {report:?}");
    }
}

/// Polls the tracker until `url`'s manifest lists at least `chunks` hashed chunks from the start.
async fn wait_hashed(cluster: &Cluster, url: &str, chunks: usize) -> Manifest {
    let started = Instant::now();
    loop {
        let m = resolve(cluster, url).await.manifest;
        if (0..chunks).all(|i| m.hash(i).is_some()) {
            return m;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{chunks} chunks not hashed after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_during_ingest_cost_the_origin_one_read() {
    let cluster = cluster(slow(false), &[]).await;
    let object = test_bytes(20 * MIB, 7);
    cluster.origin.put("popular.mp4", object.clone());
    let url = cluster.origin.url("popular.mp4");
    let mut resolves = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (cluster_url, url) = (cluster.tracker_url(), url.clone());
        resolves.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            let r = reqwest::Client::new().get(format!("{cluster_url}/v1/resolve")).query(&[("url", &url)]);
            r.send().await.expect("resolve").json::<fog_proto::api::Resolve>().await.expect("json")
        });
    }
    let truth: Vec<ChunkHash> = object.chunks(MIB).map(ChunkHash::of).collect();
    while let Some(r) = resolves.join_next().await {
        let r = r.expect("task");
        r.manifest.validate().expect("a consistent manifest while ingest runs");
        assert_eq!(r.content_id, r.manifest.content_id());
        for (i, want) in truth.iter().enumerate() {
            if let Some(got) = r.manifest.hash(i) {
                assert_eq!(got, *want, "chunk {i}");
            }
        }
    }
    let done = cluster.wait_stats("ingest done", |s| s.ingests_running == 0).await;
    assert_eq!(done.ingest_errors, 0);
    assert_eq!(cluster.origin.full_gets_for("popular.mp4"), 1, "one origin read by the tracker");
    let complete = resolve(&cluster, &url).await.manifest;
    assert!(complete.is_complete());
    assert_eq!(complete.chunks, truth);
}

/// A seek on an object under ingest makes the tracker hash the chunks there first, with a ranged read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_is_hashed_before_the_rest() {
    let cluster = cluster(slow(false), &[]).await;
    let object = test_bytes(100 * MIB, 3);
    cluster.origin.put("seek.mp4", object.clone());
    let url = cluster.origin.url("seek.mp4");
    let tail = (object.len() - 2 * MIB) as u64;
    let query = [("url", url.clone()), ("from", tail.to_string())];
    let started = Instant::now();
    let manifest = loop {
        let r = reqwest::Client::new().get(format!("{}/v1/resolve", cluster.tracker_url())).query(&query);
        let m = r.send().await.expect("resolve").json::<fog_proto::api::Resolve>().await.expect("json").manifest;
        if m.hash(98).is_some() && m.hash(99).is_some() {
            break m;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the tail was not hashed first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!manifest.is_complete(), "hashed ahead of the sequential read");
    assert_eq!(manifest.hash(99), Some(ChunkHash::of(&object[99 * MIB..])));
    let mut out = Vec::new();
    let client = cluster.client();
    let resolved = client.resolve(&url, None, tail).await.expect("resolve");
    let opts = FetchOptions { range: Some((tail, object.len() as u64)), deadline: None };
    let report = client.fetch_resolved(&resolved, opts, &mut out, &mut 0).await.expect("seek");
    assert_eq!(out, object[tail as usize..]);
    assert_eq!(report.fog_bytes, 2 * MIB as u64, "{report:?}");
}

fn manifest_of(url: &str, bytes: &[u8]) -> Manifest {
    let mut b = ManifestBuilder::new(MIB as u32);
    b.update(bytes);
    b.finish(url.to_string(), None, None)
}

async fn publish(cluster: &Cluster, manifest: &Manifest) -> reqwest::Response {
    reqwest::Client::new()
        .put(format!("{}/v1/admin/manifests", cluster.tracker_url()))
        .bearer_auth(ADMIN)
        .json(manifest)
        .send()
        .await
        .expect("publish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_manifests_spare_the_origin_and_wrong_ones_are_replaced() {
    let cluster = cluster(Quirks::default(), &["--origin-manifests"]).await;
    let client = cluster.client();

    // Published with `fog manifest --publish`: the tracker never reads the object.
    let dir = tempfile::tempdir().expect("tempdir");
    let a = test_bytes(5 * MIB + 77, 1);
    std::fs::write(dir.path().join("a.bin"), &a).expect("write");
    cluster.origin.put("pub/a.bin", a.clone());
    let fog = fog_testkit::harness::bin("fog");
    let out = std::process::Command::new(&fog)
        .args(["manifest", &dir.path().join("a.bin").display().to_string()])
        .args(["--base-url", &cluster.origin.url("pub/a.bin"), "--publish", "--tracker", &cluster.tracker_url()])
        .args(["--admin-token", ADMIN])
        .output()
        .expect("fog manifest");
    assert!(out.status.success(), "fog manifest: {}", String::from_utf8_lossy(&out.stderr));
    let (got, report) = client.get(&cluster.origin.url("pub/a.bin")).await.expect("fetch");
    assert_eq!(got, a);
    assert_eq!(report.fog_bytes, a.len() as u64);
    assert_eq!(cluster.origin.full_gets_for("pub/a.bin"), 0, "the tracker did not read the object");

    // Placed on the origin beside the object: found, used, the object not read by the tracker.
    let b = test_bytes(3 * MIB, 2);
    cluster.origin.put("pub/b.bin", b.clone());
    let b_url = cluster.origin.url("pub/b.bin");
    let sidecar = serde_json::to_vec(&manifest_of(&b_url, &b)).expect("json");
    cluster.origin.put(&format!("pub/b.bin{SIDECAR_SUFFIX}"), sidecar);
    assert_eq!(client.get(&b_url).await.expect("fetch").0, b);
    assert_eq!(cluster.origin.full_gets_for("pub/b.bin"), 0, "the tracker did not read the object");

    // A wrong published manifest (its first chunk's hash): caught by the first fill, never delivered,
    // replaced by ingest, and the dashboard says so.
    let c = test_bytes(4 * MIB, 3);
    cluster.origin.put("pub/c.bin", c.clone());
    let c_url = cluster.origin.url("pub/c.bin");
    let mut wrong = manifest_of(&c_url, &c);
    wrong.chunks[0] = ChunkHash::of(b"not these bytes");
    assert!(publish(&cluster, &wrong).await.status().is_success());
    assert_eq!(resolve(&cluster, &c_url).await.content_id, wrong.content_id());
    let (got, _) = client.get(&c_url).await.expect("fetch despite the wrong manifest");
    assert_eq!(got, c, "no wrong byte");
    let right = manifest_of(&c_url, &c);
    let now = resolve(&cluster, &c_url).await.manifest;
    assert_eq!((&now.chunks, now.size), (&right.chunks, right.size), "replaced by ingest");
    let summary: serde_json::Value = reqwest::get(format!("{}/v1/dashboard/summary", cluster.tracker_url()))
        .await
        .expect("summary")
        .json()
        .await
        .expect("json");
    let events = summary["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "manifest_replaced" && e["message"].as_str().unwrap_or("").contains("c.bin")),
        "{events:?}"
    );

    // Publishing needs the admin token, a registered origin and a consistent manifest.
    let r = reqwest::Client::new()
        .put(format!("{}/v1/admin/manifests", cluster.tracker_url()))
        .json(&right)
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status().as_u16(), 401);
    let mut elsewhere = right.clone();
    elsewhere.url = "http://elsewhere.example/c.bin".into();
    assert_eq!(publish(&cluster, &elsewhere).await.status().as_u16(), 403);
    let mut inconsistent = right;
    inconsistent.chunks.pop();
    assert_eq!(publish(&cluster, &inconsistent).await.status().as_u16(), 400);
}

/// A player reading slower than the origin sends falls behind the tracker's ingest: the client moves from
/// the origin to the fog at the first chunk the tracker has hashed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_player_moves_to_the_fog_as_ingest_overtakes_it() {
    let cluster = cluster(slow(false), &[]).await;
    let object = test_bytes(16 * MIB, 5);
    cluster.origin.put("slowplayer.mp4", object.clone());
    let url = cluster.origin.url("slowplayer.mp4");
    let client = cluster.client();
    let resolved = client.resolve(&url, None, 0).await.expect("resolve");
    assert!(resolved.manifest().hash(0).is_none(), "the first viewer starts before any chunk is hashed");
    let (mut reader, mut writer) = tokio::io::duplex(256 << 10);
    let fetch = tokio::spawn(async move {
        let opts = FetchOptions { range: Some((0, object.len() as u64)), deadline: None };
        let report = client.fetch_resolved(&resolved, opts, &mut writer, &mut 0).await;
        (object, report)
    });
    // Reads at about 2.5 MB/s, a quarter of the origin's pace.
    let mut got = Vec::new();
    let mut piece = vec![0; 256 << 10];
    loop {
        match reader.read(&mut piece).await.expect("read") {
            0 => break,
            n => got.extend_from_slice(&piece[..n]),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (object, report) = fetch.await.expect("join");
    let report = report.expect("fetch");
    assert!(got == object, "byte-exact");
    assert!(report.fog_bytes >= 4 * MIB as u64, "the rest came from the fog once hashed: {report:?}");
    assert!(report.origin_bytes > 0);
}

/// What a first view costs the origin, counted by the origin: one copy of the bytes viewed (whether the
/// viewer or a node filling for it read them) plus the tracker's read, and no tracker read with a
/// published manifest. Slack: a chunk of bytes in flight when a read is cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_view_costs_the_origin_one_copy_plus_the_tracker_read() {
    let cluster = cluster(slow(false), &[]).await;
    let client = cluster.client();
    let size = 24 * MIB;
    for (path, publish_first) in [("egress/ingested.bin", false), ("egress/published.bin", true)] {
        let object = test_bytes(size, 11);
        cluster.origin.put(path, object.clone());
        let url = cluster.origin.url(path);
        if publish_first {
            assert!(publish(&cluster, &manifest_of(&url, &object)).await.status().is_success());
        }
        let (got, report) = client.get(&url).await.expect("first view");
        assert!(got == object);
        let tracker_read = if publish_first { 0 } else { size as u64 };
        let sent = cluster.origin.bytes_sent_for(path);
        eprintln!("{path}: origin sent {sent} bytes for a {size}-byte first view ({report:?})");
        assert!(sent <= tracker_read + size as u64 + MIB as u64, "{path}: origin sent {sent} bytes");
    }
}

/// An object that changes at its origin after a client saw it half-ingested: the client's report names
/// the manifest the ingest became, so the tracker ingests the new version, and no old byte is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_seen_through_a_half_ingested_manifest_is_reingested() {
    // Reports act on manifests of any age here (the default waits 30 s, so clients cannot make the tracker
    // hammer an origin).
    let cluster = cluster(slow(false), &["--min-reingest-secs", "0"]).await;
    let old = test_bytes(8 * MIB, 21);
    cluster.origin.put("changing.mp4", old.clone());
    let url = cluster.origin.url("changing.mp4");
    let client = cluster.client();
    wait_hashed(&cluster, &url, 2).await;
    let seen = client.resolve(&url, None, 0).await.expect("resolve");
    assert!(!seen.manifest().is_complete() && seen.manifest().hash(0).is_some());
    cluster.wait_stats("ingest done", |s| s.ingests_running == 0).await;
    let new = test_bytes(8 * MIB, 22);
    cluster.origin.put("changing.mp4", new.clone());

    let mut out = Vec::new();
    let opts = FetchOptions { range: Some((0, MIB as u64)), deadline: None };
    let err =
        client.fetch_resolved(&seen, opts, &mut out, &mut 0).await.expect_err("the old manifest no longer matches");
    assert!(matches!(err, fog_client::ClientError::ContentChanged { .. }), "{err}");
    assert!(out.is_empty(), "no old byte delivered");
    let fresh = client.resolve_changed(&url, &seen).await.expect("report");
    assert_ne!(fresh.content_id(), seen.content_id());
    let truth: Vec<ChunkHash> = new.chunks(MIB).map(ChunkHash::of).collect();
    let started = Instant::now();
    loop {
        let m = resolve(&cluster, &url).await.manifest;
        if m.is_complete() {
            assert_eq!(m.chunks, truth, "the new version was ingested");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not re-ingested");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (got, _) = client.get(&url).await.expect("fetch the new version");
    assert!(got == new);
}
