//! End-to-end tests: real fog-tracker and fog-node processes (RocksDB, QUIC, HTTP on 127.0.0.1), a real
//! origin, and the real client library and `fog` CLI.

use std::os::unix::fs::FileTypeExt;
use std::process::Command;
use std::time::{Duration, Instant};

use fog_net::chunk::{self, Deadlines};
use fog_net::transport;
use fog_proto::wire::{ChunkRequest, Status, MAX_REQUEST_LEN};
use fog_proto::ChunkHash;
use fog_testkit::harness::{bin, Cluster, ClusterOptions};
use fog_testkit::origin::Quirks;
use fog_testkit::test_bytes;

use crate::common::{resolve, MIB};

fn opts(nodes: usize) -> ClusterOptions {
    ClusterOptions { nodes, ..Default::default() }
}

/// Nodes under an upload cap, so that transfers last long enough to interfere with.
fn capped(nodes: usize, limit: &str) -> ClusterOptions {
    ClusterOptions { nodes, node_args: vec!["--upload-limit".into(), limit.into()], ..Default::default() }
}

type Fetch = tokio::task::JoinHandle<Result<(Vec<u8>, fog_client::FetchReport), fog_client::ClientError>>;

/// Serves `content` at `path` on the origin and starts fetching it through the fog.
fn fetch_in_background(cluster: &Cluster, path: &str, content: &[u8]) -> Fetch {
    cluster.origin.put(path, content.to_vec());
    let (client, url) = (cluster.client(), cluster.origin.url(path));
    tokio::spawn(async move { client.get(&url).await })
}

/// Runs `fog get` and returns (exit success, stdout bytes, stderr text).
fn fog_get(tracker: &str, url: &str, out: Option<&std::path::Path>) -> (bool, Vec<u8>, String) {
    let mut cmd = Command::new(bin("fog"));
    cmd.args(["get", "--tracker", tracker, url]);
    if let Some(path) = out {
        cmd.arg("-o").arg(path);
    }
    let output = cmd.output().expect("run fog");
    (output.status.success(), output.stdout, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Reads `key=N` from the CLI's summary line.
fn summary_value(stderr: &str, key: &str) -> u64 {
    let line =
        stderr.lines().rev().find(|l| l.contains("fog_bytes=")).unwrap_or_else(|| panic!("no summary in {stderr}"));
    let field = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).expect("field present");
    field.parse().expect("number")
}

async fn connect(
    endpoint: &quinn::Endpoint,
    node: fog_proto::NodeId,
    addr: std::net::SocketAddr,
) -> Result<quinn::Connection, transport::ConnectError> {
    transport::connect(endpoint, node, addr, Duration::from_secs(10), Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_every_size_arrive_intact_and_second_fetch_is_fog_only() {
    let cluster = Cluster::start(opts(3)).await;
    let sizes = [1, MIB, MIB + 1, 64 * MIB];
    for (i, size) in sizes.into_iter().enumerate() {
        let content = test_bytes(size, i as u64);
        let path = format!("obj{i}.bin");
        cluster.origin.put(&path, content.clone());
        let url = cluster.origin.url(&path);
        let out = cluster.dir.path().join(format!("out{i}"));

        let (ok, _, stderr) = fog_get(&cluster.tracker_url(), &url, Some(&out));
        assert!(ok, "first fetch of {size} bytes failed: {stderr}");
        assert!(std::fs::read(&out).expect("output") == content, "first fetch of {size} bytes differs");
        assert_eq!(summary_value(&stderr, "bytes"), size as u64);

        let origin_before = cluster.origin.requests_for(&path);
        let (ok, _, stderr) = fog_get(&cluster.tracker_url(), &url, Some(&out));
        assert!(ok, "second fetch failed: {stderr}");
        assert!(std::fs::read(&out).expect("output") == content, "second fetch of {size} bytes differs");
        assert_eq!(summary_value(&stderr, "fog_bytes"), size as u64, "second fetch not all from fog: {stderr}");
        assert_eq!(summary_value(&stderr, "origin_bytes"), 0);
        assert_eq!(cluster.origin.requests_for(&path), origin_before, "warm fetch reached the origin");
    }

    // `-o` naming something that is not a regular file (a FIFO here; /dev/null in practice) is written in
    // place, never replaced by renaming a .part file over it.
    let fifo = cluster.dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(&fifo).expect("read the fifo")
    });
    let (ok, _, stderr) = fog_get(&cluster.tracker_url(), &cluster.origin.url("obj2.bin"), Some(&fifo));
    assert!(ok, "fetch into a fifo failed: {stderr}");
    assert!(reader.join().expect("reader") == test_bytes(MIB + 1, 2));
    assert!(std::fs::metadata(&fifo).expect("fifo").file_type().is_fifo(), "the fifo was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_fetch_does_not_break_the_fetch() {
    // Upload caps slow the nodes down so the kill lands mid-transfer.
    let mut cluster = Cluster::start(capped(3, "8MiB")).await;
    let content = test_bytes(48 * MIB, 7);
    let fetch = fetch_in_background(&cluster, "big.bin", &content);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!fetch.is_finished(), "fetch finished before the kill; the test proves nothing");
    cluster.nodes[1].kill();
    let (bytes, report) = fetch.await.expect("join").expect("fetch survives a dead node");
    assert!(bytes == content, "bytes differ after a node died");
    assert_eq!(report.bytes, content.len() as u64);
    assert!(report.node_failures > 0, "the dead node was never noticed: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_stored_chunks_are_detected_and_never_delivered() {
    let mut cluster = Cluster::start(opts(1)).await;
    let content = test_bytes(4 * MIB + 123, 3);
    cluster.origin.put("c.bin", content.clone());
    let url = cluster.origin.url("c.bin");
    let (bytes, _) = cluster.client().get(&url).await.expect("warm-up fetch");
    assert!(bytes == content);
    let origin_before = cluster.origin.requests_for("c.bin");

    // Flip a byte inside every stored chunk while the node is down.
    cluster.nodes[0].terminate().await;
    let store = cluster.node_dir(0).join("store");
    {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &store).expect("list column families");
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &store, cfs).expect("open node store");
        let cf = db.cf_handle(fog_node::store::CF_CHUNKS).expect("chunks cf");
        let entries: Vec<_> = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|r| r.expect("iterate")).collect();
        assert_eq!(entries.len(), 5, "expected 5 stored chunks");
        for (k, v) in entries {
            let mut v = v.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x01;
            db.put_cf(cf, k, v).expect("corrupt");
        }
    }
    cluster.restart_node(0).await;
    cluster.wait_healthy(1).await;

    let (bytes, report) = cluster.client().get(&url).await.expect("fetch after corruption");
    assert!(bytes == content, "corrupted bytes reached the client");
    assert_eq!(report.fog_bytes, content.len() as u64, "node should refill and serve: {report:?}");
    assert_eq!(cluster.origin.requests_for("c.bin"), origin_before + 5, "each corrupt chunk is refilled once");
    assert!(cluster.nodes[0].log_text().contains("does not match its hash"), "corruption not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_quota_is_never_exceeded_by_more_than_one_chunk() {
    let quota = 3 * MIB as u64;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        node_args: vec!["--cache-size".into(), quota.to_string()],
        ..Default::default()
    })
    .await;
    for i in 0..3 {
        let content = test_bytes(5 * MIB + 17, 100 + i);
        let path = format!("q{i}.bin");
        cluster.origin.put(&path, content.clone());
        let (bytes, _) = cluster.client().get(&cluster.origin.url(&path)).await.expect("fetch");
        assert!(bytes == content);
    }
    let served = 3 * (5 * MIB as u64 + 17);
    let stats = cluster.wait_stats("node to report its traffic", |s| s.bytes_served >= served).await;
    assert!(stats.cache_used > 0, "nothing cached: {stats:?}");
    assert!(
        stats.cache_used <= quota + MIB as u64,
        "cache {} exceeds quota {quota} by more than a chunk",
        stats.cache_used
    );
    assert_eq!(stats.cache_capacity, quota);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_processes_keep_running() {
    let mut cluster = Cluster::start(opts(1)).await;
    let content = test_bytes(100_000, 9);
    cluster.origin.put("ok.bin", content.clone());

    // Unknown origin: refused, never fetched.
    let (ok, _, stderr) = fog_get(&cluster.tracker_url(), "http://127.0.0.1:9/elsewhere.bin", None);
    assert!(!ok);
    assert!(stderr.contains("not under an origin registered"), "unclear error: {stderr}");

    // Origin 404.
    let (ok, _, stderr) = fog_get(&cluster.tracker_url(), &cluster.origin.url("missing.bin"), None);
    assert!(!ok);
    assert!(stderr.contains("404"), "unclear error: {stderr}");

    // Malformed QUIC frames straight at the node.
    let resolved = resolve(&cluster, &cluster.origin.url("ok.bin")).await;
    let node = resolved.nodes[0].clone();
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = connect(&endpoint, node.id, node.addr).await.expect("handshake");
    let good = ChunkRequest {
        hash: ChunkHash::of(b"x"),
        range: None,
        origin: None,
        receipt: None,
        ticket: None,
        groups: None,
    }
    .encode();
    let mut bad_version = good.clone();
    bad_version[0] = 99;
    let frames: Vec<Vec<u8>> = vec![
        [&(bad_version.len() as u16).to_be_bytes()[..], &bad_version].concat(),
        ((MAX_REQUEST_LEN + 1) as u16).to_be_bytes().to_vec(),
        [&(good.len() as u16 + 5).to_be_bytes()[..], &good].concat(), // shorter than announced
        vec![0x00],
    ];
    for frame in frames {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&frame).await.expect("write");
        send.finish().expect("finish");
        let resp = recv.read_to_end(4096).await.expect("response");
        assert_eq!(Status::from_u8(resp[0]), Some(Status::BadRequest), "frame {frame:?} got {resp:?}");
        assert!(resp.len() > 3, "error response carries a message");
    }
    // Wrong pinned key: the handshake must fail.
    let impostor = fog_proto::NodeId([1u8; 32]);
    let wrong = connect(&endpoint, impostor, node.addr).await;
    assert!(wrong.is_err(), "connected to a node under the wrong key");

    assert!(cluster.tracker.is_running() && cluster.nodes[0].is_running());
    let (bytes, report) =
        cluster.client().get(&cluster.origin.url("ok.bin")).await.expect("good fetch after bad input");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_origins_are_handled() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        quirks: Quirks { ignore_range: true, omit_length: true, ..Default::default() },
        ..Default::default()
    })
    .await;
    let content = test_bytes(3 * MIB + 5, 11);
    cluster.origin.put("real.bin", content.clone());
    cluster.origin.redirect("moved.bin", &cluster.origin.url("real.bin"));
    let (bytes, report) = cluster.client().get(&cluster.origin.url("moved.bin")).await.expect("fetch via redirect");
    assert!(bytes == content, "wrong bytes from an origin that ignores Range and omits Content-Length");
    assert_eq!(report.fog_bytes, content.len() as u64);

    // A redirect out of the registered origins is refused by the tracker.
    cluster.origin.redirect("escape.bin", "http://127.0.0.2:9/secret");
    let err = cluster.client().get(&cluster.origin.url("escape.bin")).await.expect_err("escape refused");
    assert!(err.to_string().contains("redirect"), "unclear error: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_changed_at_the_origin_is_reingested_not_mixed() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        tracker_args: vec!["--min-reingest-secs".into(), "0".into()],
        ..Default::default()
    })
    .await;
    let v1 = test_bytes(2 * MIB + 1, 1);
    let v2 = test_bytes(2 * MIB + 1, 2);
    cluster.origin.put("v.bin", v1);
    let url = cluster.origin.url("v.bin");
    let first = resolve(&cluster, &url).await;
    cluster.origin.put("v.bin", v2.clone());
    let (bytes, report) = cluster.client().get(&url).await.expect("fetch after change");
    assert!(bytes == v2, "client got bytes of the old version or a mix");
    assert_ne!(report.content_id, Some(first.content_id), "manifest was not refreshed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tracker_the_origin_still_serves_and_total_outage_is_an_error() {
    let cluster = Cluster::start(opts(0)).await;
    let content = test_bytes(300_000, 5);
    cluster.origin.put("t.bin", content.clone());
    let dead_tracker = "http://127.0.0.1:9";
    let (ok, stdout, stderr) = fog_get(dead_tracker, &cluster.origin.url("t.bin"), None);
    assert!(ok, "origin fallback failed: {stderr}");
    assert!(stdout == content);
    assert!(stderr.contains("tracker=unreachable"), "did not say the tracker was unreachable: {stderr}");
    assert_eq!(summary_value(&stderr, "origin_bytes"), content.len() as u64);

    let (ok, _, stderr) = fog_get(dead_tracker, "http://127.0.0.1:9/none.bin", None);
    assert!(!ok);
    assert!(stderr.contains("neither the tracker nor the origin is reachable"), "unclear error: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_cap_is_kept() {
    let cap = 2 * MIB as u64;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        node_args: vec!["--upload-limit".into(), cap.to_string()],
        ..Default::default()
    })
    .await;
    let content = test_bytes(6 * MIB, 21);
    cluster.origin.put("capped.bin", content.clone());
    let started = Instant::now();
    let (bytes, report) = cluster.client().get(&cluster.origin.url("capped.bin")).await.expect("fetch");
    let elapsed = started.elapsed();
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64, "all bytes should come from the capped node");
    // A lower bound only (a slow machine can only make it longer): beyond one burst of cap/20 bytes,
    // every byte waits for the token bucket.
    let burst = cap / 20;
    let floor = Duration::from_secs_f64((content.len() as u64 - burst) as f64 / cap as f64);
    assert!(elapsed >= floor, "served {} bytes in {elapsed:?}, faster than the cap allows ({floor:?})", content.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_keep_serving_without_the_tracker_and_rejoin_when_it_returns() {
    let mut cluster = Cluster::start(opts(1)).await;
    let content = test_bytes(3 * MIB + 77, 31);
    cluster.origin.put("keep.bin", content.clone());
    let url = cluster.origin.url("keep.bin");
    cluster.client().get(&url).await.expect("warm-up fetch");
    let resolved = resolve(&cluster, &url).await;
    let origin_before = cluster.origin.requests();

    cluster.tracker.kill();
    // A client that already holds the manifest keeps fetching from the node.
    let node = resolved.nodes[0].clone();
    let endpoint = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let conn = connect(&endpoint, node.id, node.addr).await.expect("handshake");
    let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
    let mut fetched = Vec::new();
    for (i, hash) in resolved.manifest.chunks.iter().enumerate() {
        let req = ChunkRequest { hash: *hash, range: None, origin: None, receipt: None, ticket: None, groups: None };
        let bytes =
            chunk::request(&conn, &req, resolved.manifest.chunk_span(i).1, deadlines, None).await.expect("chunk");
        assert_eq!(ChunkHash::of(&bytes), *hash);
        fetched.extend_from_slice(&bytes);
    }
    assert!(fetched == content);
    assert_eq!(cluster.origin.requests(), origin_before, "warm chunks must not touch the origin");
    assert!(cluster.nodes[0].is_running());

    // The tracker comes back with an empty registry; the node is told to register again.
    cluster.restart_tracker().await;
    cluster.wait_healthy(1).await;
    let (bytes, report) = cluster.client().get(&url).await.expect("fetch after tracker restart");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64);
}

/// Unmounts a tmpfs when dropped, even if the test fails.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_shrinks_the_cache_and_the_node_keeps_serving() {
    let mut cluster = Cluster::start(opts(0)).await;
    // The node's data directory is a 12 MiB tmpfs while its quota claims 1 GiB: the disk, not the quota,
    // limits the cache.
    let dir = cluster.node_dir(0);
    std::fs::create_dir_all(&dir).expect("node dir");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"]).arg(&dir).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root) to fill a disk");
        return;
    }
    let _tmpfs = Tmpfs(dir);
    cluster.add_node(&["--cache-size".into(), "1GiB".into(), "--memory-cache".into(), "0".into()]).await;
    cluster.wait_healthy(1).await;
    let content = test_bytes(40 * MIB, 41);
    cluster.origin.put("full.bin", content.clone());
    let (bytes, report) = cluster.client().get(&cluster.origin.url("full.bin")).await.expect("fetch on a full disk");
    assert!(bytes == content);
    assert_eq!(report.fog_bytes, content.len() as u64, "the node should serve what it cannot cache");
    assert!(cluster.nodes[0].is_running(), "node died on a full disk");
    let status = cluster.node_status(0).await;
    let cache = &status["cache"];
    assert!(cache["capacity"].as_u64() < cache["quota"].as_u64(), "{cache:#}");
    let why = cache["disk"]["shrunk_because"].as_str().unwrap_or_default();
    assert!(why.contains("--min-free-disk"), "the status does not say why the cache is small: {cache:#}");
    assert!(cluster.nodes[0].log_text().contains("could not cache chunk"), "uncached chunks not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_node_messages_are_rejected() {
    use fog_proto::api::{Heartbeat, NodeStats, Signed, KIND_HEARTBEAT};
    let cluster = Cluster::start(opts(1)).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: &Signed| http.post(format!("{}{path}", cluster.tracker_url())).json(body).send();
    // A heartbeat in the name of the real node, signed by someone else.
    let node_id: fog_proto::NodeId = resolve_node_id(&cluster).await;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let heartbeat = Heartbeat {
        timestamp_ms: now,
        stats: NodeStats::default(),
        draining: false,
        overlay: None,
        web_transport: None,
        upload_plan: None,
    };
    let mut forged = Signed::sign(&key, KIND_HEARTBEAT, &heartbeat);
    forged.node_id = node_id;
    let resp = post("/v1/nodes/heartbeat", &forged).await.expect("post");
    assert_eq!(resp.status().as_u16(), 401);
    let body: fog_proto::api::ApiError = resp.json().await.expect("error body");
    assert!(body.message.contains("signature"), "{}", body.message);
    // A correctly signed message replayed: the second copy is refused.
    let honest = Signed::sign(&key, KIND_HEARTBEAT, &heartbeat);
    let endpoint = fog_testkit::harness::handshake_only_endpoint(&key);
    let reg = fog_proto::api::Register {
        quic_addr: endpoint.local_addr().expect("addr"),
        cache_capacity: 1,
        upload_limit: None,
        version: "test".into(),
        timestamp_ms: now - 1,
        joining: false,
        region: None,
    };
    let registration = Signed::sign(&key, fog_proto::api::KIND_REGISTER, &reg);
    assert_eq!(post("/v1/nodes/register", &registration).await.expect("post").status().as_u16(), 200);
    assert_eq!(post("/v1/nodes/heartbeat", &honest).await.expect("post").status().as_u16(), 200);
    assert_eq!(post("/v1/nodes/heartbeat", &honest).await.expect("post").status().as_u16(), 401);
    assert_eq!(post("/v1/nodes/register", &registration).await.expect("post").status().as_u16(), 401);
    // Garbage bodies get a clear 400 and the tracker keeps going.
    let resp =
        http.post(format!("{}/v1/nodes/heartbeat", cluster.tracker_url())).body("{nope").send().await.expect("post");
    assert_eq!(resp.status().as_u16(), 400);
    let metrics =
        reqwest::get(format!("{}/metrics", cluster.tracker_url())).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("fog_tracker_bad_node_messages_total 3"), "{metrics}");
    cluster.wait_healthy(2).await;
}

async fn resolve_node_id(cluster: &Cluster) -> fog_proto::NodeId {
    cluster.origin.put("id.bin", test_bytes(10, 1));
    resolve(cluster, &cluster.origin.url("id.bin")).await.nodes[0].id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_too_slow_for_the_deadline_is_finished_from_the_origin() {
    let cluster = Cluster::start(capped(1, "256KiB")).await;
    let content = test_bytes(MIB, 51);
    cluster.origin.put("slow.bin", content.clone());
    let client = cluster.client();
    let resolved = client.resolve(&cluster.origin.url("slow.bin"), None, 0).await.expect("resolve");
    let mut out = Vec::new();
    let mut written = 0;
    let opts = fog_client::FetchOptions { range: None, deadline: Some(Instant::now() + Duration::from_secs(1)) };
    let report = client.fetch_resolved(&resolved, opts, &mut out, &mut written).await.expect("fetch");
    assert!(out == content, "salvaged chunk differs");
    assert!(report.fog_bytes > 0, "the node's partial transfer was thrown away: {report:?}");
    assert!(
        report.origin_bytes > 0 && report.origin_bytes < content.len() as u64,
        "expected only the remainder from the origin: {report:?}"
    );
    assert_eq!(report.fog_bytes + report.origin_bytes, content.len() as u64);
    assert_eq!(report.fallbacks.get("interrupted"), Some(&1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_no_relay_and_never_worse_than_the_origin() {
    let mut cluster = Cluster::start(opts(1)).await;
    // An origin only the proxy's user registered (`--origin`), and one nobody registered.
    let start_origin = || fog_testkit::origin::TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Default::default());
    let own = start_origin().await.expect("origin");
    let stranger = start_origin().await.expect("origin");
    let args: Vec<String> = vec![
        "proxy".into(),
        "--tracker".into(),
        cluster.tracker_url(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--origin".into(),
        own.url("own/"),
    ];
    let proxy = fog_testkit::harness::Proc::spawn("fog", &args, cluster.dir.path().join("proxy.log")).await;
    let content = test_bytes(2 * MIB + 3, 71);
    cluster.origin.put("p/a.bin", content.clone());
    let http = reqwest::Client::new();
    let via = |origin_url: &str| fog_client::proxy::proxied_url(origin_url, &proxy.addr).expect("proxied url");

    // A page elsewhere cannot use the proxy through DNS rebinding, nor anything but GET/HEAD.
    let foreign =
        http.get(via(&cluster.origin.url("p/a.bin"))).header("Host", "evil.example:80").send().await.expect("req");
    assert_eq!(foreign.status().as_u16(), 403);
    assert_eq!(http.post(via(&cluster.origin.url("p/a.bin"))).send().await.expect("req").status().as_u16(), 405);
    let bad = http.get(format!("http://{}/ftp/host/x", proxy.addr)).send().await.expect("req");
    assert_eq!(bad.status().as_u16(), 400);

    // Nor as a relay into loopback or private services nobody registered: not directly, not by climbing out
    // of a registered prefix, not through a registered origin's redirect, not through a playlist.
    stranger.put("secret", test_bytes(1000, 74));
    stranger.put("list.m3u8", &b"#EXTM3U\n#EXTINF:4,\nsecret\n"[..]);
    own.put("own/v.bin", test_bytes(1000, 75));
    cluster.origin.redirect("p/away.bin", &stranger.url("secret"));
    cluster.origin.redirect("p/away.m3u8", &stranger.url("list.m3u8"));
    for url in [
        stranger.url("secret"),
        stranger.url("list.m3u8"),
        "http://192.168.1.1/admin".to_string(),
        format!("{}%2e%2e/secret", own.url("own/")),
    ] {
        let r = http.get(via(&url)).send().await.expect("req");
        assert_eq!(r.status().as_u16(), 403, "{url} was relayed");
    }
    for url in [cluster.origin.url("p/away.bin"), cluster.origin.url("p/away.m3u8")] {
        let r = http.get(via(&url)).send().await.expect("req");
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap_or_default();
        assert!(status >= 400 || body.is_empty(), "{url} followed a redirect out of the origins: {status}");
    }
    assert_eq!(stranger.requests(), 0, "the proxy reached an unregistered origin");

    // Through the fog, with a Range, and HEAD.
    let body = http.get(via(&cluster.origin.url("p/a.bin"))).send().await.expect("get").bytes().await.expect("body");
    assert!(body[..] == content[..]);
    let part = http
        .get(via(&cluster.origin.url("p/a.bin")))
        .header("Range", "bytes=1048570-1048585")
        .send()
        .await
        .expect("range");
    assert_eq!(part.status().as_u16(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 1048570-1048585/{}", content.len()).as_str());
    assert_eq!(&part.bytes().await.expect("body")[..], &content[1_048_570..1_048_586]);
    let head = http.head(via(&cluster.origin.url("p/a.bin"))).send().await.expect("head");
    assert_eq!(head.headers()["content-length"], content.len().to_string().as_str());

    // The user's own origin, which the tracker does not serve, and then no tracker at all (the tracker's
    // origin list stays in force): straight from the origin.
    let body = http.get(via(&own.url("own/v.bin"))).send().await.expect("get").bytes().await.expect("body");
    assert!(body[..] == test_bytes(1000, 75)[..]);
    cluster.tracker.kill();
    cluster.origin.put("p/c.bin", test_bytes(50_000, 73));
    let body = http.get(via(&cluster.origin.url("p/c.bin"))).send().await.expect("get").bytes().await.expect("body");
    assert!(body[..] == test_bytes(50_000, 73)[..]);
    let stats: serde_json::Value =
        http.get(format!("http://{}/stats", proxy.addr)).send().await.expect("stats").json().await.expect("json");
    assert_eq!(stats["passthrough_reasons"]["unknown_origin"], 1, "{stats:#}");
    assert_eq!(stats["passthrough_reasons"]["tracker_unreachable"], 1, "{stats:#}");
    assert_eq!(stats["requests"]["refused"], 4, "{stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let mut cluster = Cluster::start(capped(1, "4MiB")).await;
    // Six chunks at 4 MiB/s: all requests are in flight within the first half second, done after ~1.5 s.
    let content = test_bytes(6 * MIB, 81);
    let fetch = fetch_in_background(&cluster, "drain.bin", &content);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fetch.is_finished(), "fetch finished before the signal; the test proves nothing");
    let status = cluster.nodes[0].terminate().await.expect("node exits by itself on SIGTERM");
    assert!(status.success(), "node exited with {status}");
    let (bytes, report) = fetch.await.expect("join").expect("fetch");
    assert!(bytes == content);
    assert_eq!(
        report.fog_bytes,
        content.len() as u64,
        "in-flight requests were cut off instead of drained: {report:?}"
    );
    let log = cluster.nodes[0].log_text();
    assert!(log.contains("fog-node stopped") && !log.contains("did not finish"), "{log}");
}

/// A client measures the candidates no chunk needed (a handshake each) and its next fetch reports their RTTs,
/// so the tracker learns the client network's distance to nodes it has not been served by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_that_delivered_nothing_are_measured_for_the_next_report() {
    let cluster = Cluster::start(opts(3)).await;
    cluster.origin.put("one.bin", test_bytes(100, 1));
    let (client, url) = (cluster.client(), cluster.origin.url("one.bin"));
    let (_, first) = client.get(&url).await.expect("first fetch");
    let served: Vec<fog_proto::NodeId> = first.nodes.keys().copied().collect();
    assert_eq!(served.len(), 1, "one chunk, one node: {:?}", first.nodes);
    // Probes run in the background: their RTTs come with one of the next reports.
    let started = Instant::now();
    let mut probed = std::collections::BTreeSet::new();
    while probed.len() < 2 && started.elapsed() < Duration::from_secs(20) {
        let (_, report) = client.get(&url).await.expect("next fetch");
        probed.extend(report.probed_rtt.iter().map(|(id, _)| *id));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(probed.len(), 2, "the two unused candidates were not measured: {probed:?}");
    assert!(probed.iter().all(|id| !served.contains(id)), "{probed:?} vs served {served:?}");
}
