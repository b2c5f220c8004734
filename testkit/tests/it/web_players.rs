//! Web players through the fog in real browsers (issue #14): hls.js with `@fogcdn/hlsjs` and Shaka Player
//! with `@fogcdn/shaka`, on a page of a registered site, play ffmpeg-made HLS and DASH whose segments come
//! from three real nodes over WebTransport, each verified before the player gets it. Every scenario runs in
//! headless Chromium and in Firefox ESR: playback from the nodes, a node lying to pages, every node killed
//! mid-play, and a page of a site nobody registered. Skips (saying why) without ffmpeg, a browser or the
//! built web packages; scripts/test.sh installs the first two and builds the last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_proto::ChunkHash;
use fog_testkit::harness::{test_dir, Cluster, ClusterOptions};
use fog_testkit::origin::{Quirks, TestOrigin};
use reqwest::header::{ACCESS_CONTROL_ALLOW_ORIGIN, ORIGIN};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::dashboard::{Browser, Engine};
use crate::player::{ffmpeg, make_hls, source, FFMPEG};
use crate::web_page::{chunks_of, two_faced_node, wait_page_gets_every_node, web_tracker_args};

/// Seconds of media: ten seconds of playback then needs segments fetched while playing.
const MEDIA_SECONDS: u32 = 30;
/// Seconds the players buffer ahead: few, so that segments keep being fetched throughout a test.
const BUFFER_AHEAD_SECONDS: u32 = 8;
/// The issue's bound on any pause in playback, nodes dying included.
const MAX_STALL_MS: f64 = 2000.0;
/// How long a page may take to play the media it is asked to (generous: two CPUs run browsers and nodes).
const PLAY_LIMIT: Duration = Duration::from_secs(120);

/// What the page loads, by the name the site serves it under: built by `npm run build` in web/, or
/// installed there by `npm ci`.
const SCRIPTS: [(&str, &str); 5] = [
    ("hls.min.js", "node_modules/hls.js/dist/hls.min.js"),
    ("shaka-player.compiled.js", "node_modules/shaka-player/dist/shaka-player.compiled.js"),
    ("fog-core.js", "packages/core/dist/fog-core.js"),
    ("fog-hlsjs.js", "packages/hlsjs/dist/fog-hlsjs.js"),
    ("fog-shaka.js", "packages/shaka/dist/fog-shaka.js"),
];

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>fogcdn web players test</title>
<script src="/hls.min.js"></script><script src="/shaka-player.compiled.js"></script>
<script src="/fog-core.js"></script><script src="/fog-hlsjs.js"></script><script src="/fog-shaka.js"></script>
</head><body><video id="v" muted playsinline width="320" height="240"></video></body></html>
"#;

/// Starts `player` on the page, playing `stream` with segments through a new FogClient. `window.play`
/// collects what the test checks: fatal errors, every segment the player got (with its BLAKE3), and the
/// longest time `currentTime` stood still once playback had started.
const START: &str = r#"
const [player, tracker, stream, ahead] = arguments;
const video = document.getElementById("v");
const fog = new Fog.FogClient({ tracker });
window.fog = fog;
const play = (window.play = { errors: [], warnings: [], segments: [], playerBytes: 0, maxStallMs: 0, waits: 0 });
// The integrations say on the console why a request went to the player's own loader.
const warn = console.warn;
console.warn = (...args) => {
  if (play.warnings.length < 50) play.warnings.push(args.join(" "));
  warn(...args);
};
const record = (url, data) => {
  const view = ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data);
  const copy = view.slice();
  const entry = { url, len: copy.length, blake3: null };
  play.playerBytes += copy.length;
  play.segments.push(entry);
  Fog.blake3Hex(copy).then((h) => { entry.blake3 = h; });
};
let lastTime = 0, lastMove = performance.now();
setInterval(() => {
  const now = performance.now();
  if (video.currentTime !== lastTime || video.paused || video.ended) { lastTime = video.currentTime; lastMove = now; }
  if (video.currentTime > 0) play.maxStallMs = Math.max(play.maxStallMs, now - lastMove);
}, 50);
video.addEventListener("waiting", () => { play.waits++; });
video.addEventListener("error", () => play.errors.push(`video: ${video.error?.code} ${video.error?.message}`));
if (player === "HlsJs") {
  // Records each segment as hls.js receives it, before its transmuxer worker takes the buffer.
  class Recording extends FogHls.fogLoader(fog) {
    load(context, config, callbacks) {
      super.load(context, config, { ...callbacks, onSuccess: (response, stats, ctx, details) => {
        record(ctx.url, response.data);
        callbacks.onSuccess(response, stats, ctx, details);
      } });
    }
  }
  const hls = new Hls({ fLoader: Recording, maxBufferLength: ahead, maxMaxBufferLength: ahead });
  hls.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) play.errors.push(`hls.js: ${d.type} ${d.details}`); });
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch((e) => play.errors.push(`play(): ${e}`)));
  hls.attachMedia(video);
  hls.loadSource(stream);
} else {
  shaka.polyfill.installAll();
  FogShaka.register(shaka, fog);
  const p = new shaka.Player();
  p.configure({ streaming: { bufferingGoal: ahead } });
  p.addEventListener("error", (e) => play.errors.push(`shaka: ${e.detail.code}`));
  p.getNetworkingEngine().registerResponseFilter((type, response) => {
    if (type === shaka.net.NetworkingEngine.RequestType.SEGMENT) record(response.uri, response.data);
  });
  p.attach(video)
    .then(() => p.load(stream))
    .then(() => video.play())
    .catch((e) => play.errors.push(`shaka load or play(): ${e.code ?? e}`));
}
return true;
"#;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web")
}

#[derive(Clone, Copy, Debug)]
enum Player {
    HlsJs,
    Shaka,
}

impl Player {
    /// The stream it plays, below the site.
    fn stream(self) -> &'static str {
        match self {
            Player::HlsJs => "hls/index.m3u8",
            Player::Shaka => "dash/manifest.mpd",
        }
    }
}

/// A registered site with ffmpeg's media, a tracker and three nodes that have every media file cached
/// (a native client read them first) and that the tracker vouches for to pages.
struct Stage {
    site: TestOrigin,
    cluster: Cluster,
    /// The registered site's web origin, `http://127.0.0.1:PORT`.
    page_origin: String,
    /// Each media file's bytes, by its path below the site.
    media: HashMap<String, Vec<u8>>,
    _www: TempDir,
}

impl Stage {
    /// None, having said why, where ffmpeg, the browser or the web packages are missing.
    async fn start(engine: Engine) -> Option<Stage> {
        if !Path::new(FFMPEG).exists() {
            eprintln!("SKIPPED: ffmpeg is not installed (apt-get install ffmpeg; scripts/test.sh does)");
            return None;
        }
        if let Some(why) = engine.unavailable() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let missing: Vec<String> = SCRIPTS
            .iter()
            .map(|(_, p)| web_dir().join(p))
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED: the web packages are not built ({} missing): cd web && npm ci --ignore-scripts && npm run \
                 build (scripts/test.sh does, where npm is installed)",
                missing.join(", ")
            );
            return None;
        }
        let www = test_dir("fogcdn-web-players");
        let src = source(www.path(), MEDIA_SECONDS);
        let hls = www.path().join("hls");
        std::fs::create_dir_all(&hls).expect("hls dir");
        make_hls(&src, &hls, "index.m3u8", None);
        let dash = www.path().join("dash");
        std::fs::create_dir_all(&dash).expect("dash dir");
        let (src, mpd) = (src.display().to_string(), dash.join("manifest.mpd").display().to_string());
        ffmpeg(&["-i", &src, "-map", "0", "-c", "copy", "-f", "dash", "-seg_duration", "2", &mpd]);
        for (name, path) in SCRIPTS {
            std::fs::copy(web_dir().join(path), www.path().join(name)).expect("copy a script for the page");
        }
        std::fs::write(www.path().join("index.html"), PAGE).expect("page");
        let site = TestOrigin::start(([127, 0, 0, 1], 0).into(), Some(www.path().into()), Quirks::default())
            .await
            .expect("site");
        let page_origin = format!("http://{}", site.addr);
        let cluster = Cluster::start(ClusterOptions {
            nodes: 3,
            tracker_args: web_tracker_args(&site.base_url(), &page_origin),
            ..Default::default()
        })
        .await;
        let mut media = HashMap::new();
        let client = cluster.client();
        for sub in ["hls", "dash"] {
            for entry in std::fs::read_dir(www.path().join(sub)).expect("media dir") {
                let path = entry.expect("entry").path();
                if !path.extension().is_some_and(|e| e == "ts" || e == "m4s") {
                    continue;
                }
                let rel = format!("{sub}/{}", path.file_name().expect("name").to_string_lossy());
                let bytes = std::fs::read(&path).expect("media file");
                let (got, _) = client.get(&site.url(&rel)).await.expect("native read of a media file");
                assert!(got == bytes, "the fog gave a native client other bytes for {rel}");
                media.insert(rel, bytes);
            }
        }
        let any = media.keys().next().expect("media").clone();
        wait_page_gets_every_node(&cluster, &page_origin, &site.url(&any)).await;
        Some(Stage { site, cluster, page_origin, media, _www: www })
    }

    /// `engine` on the page at `page` (the site's index.html unless given), scripts loaded.
    async fn browser(&self, engine: Engine, page: Option<&str>) -> Browser {
        let profile = self.cluster.dir.path().join(format!("{engine:?}").to_lowercase());
        let browser = Browser::launch(engine, &profile).await.expect("checked available");
        browser.goto(page.unwrap_or(&self.site.url("index.html"))).await;
        browser
            .wait_for(
                "the page's scripts",
                Duration::from_secs(30),
                "return typeof Hls === 'function' && typeof shaka === 'object' && typeof Fog === 'object' \
                 && typeof FogHls === 'object' && typeof FogShaka === 'object'",
            )
            .await;
        browser
    }

    /// The tracker's answer to a page of `page_origin` resolving `url` (any status).
    async fn page_resolve(&self, page_origin: &str, url: &str) -> Value {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/resolve", self.cluster.tracker_url()))
            .query(&[("url", url)])
            .header(ORIGIN, page_origin)
            .send()
            .await
            .expect("resolve");
        resp.json().await.expect("resolve json")
    }

    /// Starts `player` on the page, playing the stream at `base` (the site's own address unless given).
    async fn start_play(&self, browser: &Browser, player: Player, base: Option<&str>) {
        let stream = format!("{}/{}", base.unwrap_or(&self.page_origin), player.stream());
        let args = json!([format!("{player:?}"), self.cluster.tracker_url(), stream, BUFFER_AHEAD_SECONDS]);
        browser
            .call("POST", &format!("/session/{}/execute/sync", browser.session), json!({"script": START, "args": args}))
            .await;
    }

    /// Bytes the cluster's nodes have sent to clients, from their own /metrics.
    async fn served_by_nodes(&self) -> u64 {
        let mut served = 0;
        for i in 0..self.cluster.nodes.len() {
            let url = format!("http://{}/metrics", self.cluster.status_addr(i));
            let text = reqwest::get(url).await.expect("node metrics").text().await.expect("metrics text");
            served += metric(&text, "fog_node_served_bytes_total");
        }
        served
    }

    /// Checks every segment the page recorded is byte for byte the site's file (by BLAKE3, computed in
    /// the page): wrong bytes never reached the player.
    fn check_segments(&self, outcome: &Value) {
        let segments = outcome["segments"].as_array().expect("segments");
        assert!(!segments.is_empty(), "the player got no segments: {outcome:#}");
        for s in segments {
            let url = s["url"].as_str().expect("url");
            let path = url.split_once("://").and_then(|(_, rest)| rest.split_once('/')).map_or(url, |(_, p)| p);
            let want = self.media.get(path).unwrap_or_else(|| panic!("the player loaded {url}, not a media file"));
            let got = s["blake3"].as_str().expect("hashed");
            assert_eq!(got, ChunkHash::of(want).to_hex(), "the player got wrong bytes for {url}");
        }
    }
}

/// The value of `name` (summed over its label sets) in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until the video has played `seconds` of media (or the page saw an error), then returns
/// `window.play` with the video's state and the FogClient's stats, once every segment is hashed.
async fn played(browser: &Browser, seconds: f64) -> Value {
    let cond = format!("return document.getElementById('v').currentTime >= {seconds} || window.play.errors.length > 0");
    browser.wait_for(&format!("{seconds} s of media played"), PLAY_LIMIT, &cond).await;
    browser
        .wait_for("the segments hashed", Duration::from_secs(10), "return window.play.segments.every(s => s.blake3)")
        .await;
    browser
        .eval(
            "const v = document.getElementById('v');
             const buffered = v.buffered.length ? v.buffered.end(v.buffered.length - 1) : 0;
             return { ...window.play, currentTime: v.currentTime, buffered, stats: window.fog.stats() };",
        )
        .await
}

/// Asserts the page played `seconds` of media with no error and no stall over the issue's bound.
fn check_playback(outcome: &Value, seconds: f64) {
    assert_eq!(outcome["errors"], json!([]), "the player failed: {outcome:#}");
    assert!(outcome["currentTime"].as_f64() >= Some(seconds), "{outcome:#}");
    let stall = outcome["maxStallMs"].as_f64().expect("stall");
    assert!(stall <= MAX_STALL_MS, "playback stood still for {stall} ms: {outcome:#}");
}

/// The segments' bytes from nodes, as the page counts them, over the segment bytes the player got.
fn page_offload(outcome: &Value) -> f64 {
    outcome["stats"]["fogBytes"].as_f64().expect("fog bytes") / outcome["playerBytes"].as_f64().expect("player bytes")
}

/// The player plays 10 s of media whose segments came (≥ 80 %) from the nodes, by the page's count and the
/// nodes' own.
async fn plays_from_the_fog(engine: Engine, player: Player) {
    let Some(stage) = Stage::start(engine).await else { return };
    let browser = stage.browser(engine, None).await;
    let served_before = stage.served_by_nodes().await;
    stage.start_play(&browser, player, None).await;
    let outcome = played(&browser, 10.0).await;
    let served = stage.served_by_nodes().await - served_before;
    eprintln!(
        "{engine:?} {player:?}: {} s played, {} segment bytes, page stats {}, nodes served {served} bytes, \
         longest stall {} ms",
        outcome["currentTime"], outcome["playerBytes"], outcome["stats"], outcome["maxStallMs"]
    );
    check_playback(&outcome, 10.0);
    stage.check_segments(&outcome);
    assert!(page_offload(&outcome) >= 0.8, "under 80 % of the segment bytes came from nodes: {outcome:#}");
    let player_bytes = outcome["playerBytes"].as_u64().expect("player bytes");
    assert!(served * 10 >= player_bytes * 8, "the nodes count {served} bytes served, the player got {player_bytes}");
    assert!(outcome["stats"]["nodes"].as_object().expect("per node").len() >= 2, "{outcome:#}");
}

/// A node the tracker vouches for that sends pages wrong bytes: the page catches it, the player never sees
/// them and keeps playing, and the tracker hears of the node.
async fn a_lying_node_is_caught(engine: Engine) {
    let Some(stage) = Stage::start(engine).await else { return };
    let mut chunks = HashMap::new();
    for (path, bytes) in &stage.media {
        let manifest = crate::common::resolve(&stage.cluster, &stage.site.url(path)).await.manifest;
        chunks.extend(chunks_of(&manifest, bytes));
    }
    let liar = two_faced_node(&stage.cluster, Arc::new(chunks)).await;
    // Once the tracker vouches for it, it is the first node pages ask for about a quarter of the segments.
    let started = Instant::now();
    loop {
        let mut first = 0;
        for path in stage.media.keys() {
            let r = stage.page_resolve(&stage.page_origin, &stage.site.url(path)).await;
            let slot = r["schedule"][0][0].as_u64().unwrap_or(u64::MAX) as usize;
            first += usize::from(r["nodes"][slot]["id"] == json!(liar.id));
        }
        if first > 0 {
            eprintln!("the lying node is first for {first} of {} media files", stage.media.len());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "pages are never sent to the lying node first");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let browser = stage.browser(engine, None).await;
    stage.start_play(&browser, Player::Shaka, None).await;
    let outcome = played(&browser, 10.0).await;
    eprintln!("{engine:?} with a lying node: page stats {}", outcome["stats"]);
    check_playback(&outcome, 10.0);
    stage.check_segments(&outcome);
    let caught = outcome["stats"]["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .any(|f| f["node"] == liar.id.to_hex() && f["reason"] == "hash_mismatch");
    assert!(caught, "the lying node was never asked or not caught (the tracker schedules it first for about a quarter of the segments): {outcome:#}");
    browser
        .eval(
            "window.reported = undefined;
             window.fog.report().then(() => { window.reported = 'ok'; }, (e) => { window.reported = String(e); });
             return true",
        )
        .await;
    browser.wait_for("the page's report", Duration::from_secs(10), "return window.reported !== undefined").await;
    assert_eq!(browser.eval("return window.reported").await, "ok", "the page's report to the tracker failed");
    let metrics = reqwest::get(format!("{}/metrics", stage.cluster.tracker_url()))
        .await
        .expect("tracker metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("fog_tracker_node_failure_reports") && l.contains("hash_mismatch")),
        "the page's report of the node did not reach the tracker:\n{metrics}"
    );
}

/// Every node killed while the player fetches: the rest comes from the origin, and playback never stands
/// still for more than 2 s.
async fn nodes_killed_mid_play(engine: Engine) {
    let Some(mut stage) = Stage::start(engine).await else { return };
    let browser = stage.browser(engine, None).await;
    stage.start_play(&browser, Player::HlsJs, None).await;
    let before = played(&browser, 3.0).await;
    for node in &mut stage.cluster.nodes {
        node.kill();
    }
    let buffered = before["buffered"].as_f64().expect("buffered");
    // Past what was buffered when the nodes died, and then some: played from segments fetched since.
    let until = (buffered + 4.0).min(f64::from(MEDIA_SECONDS) - 2.0);
    let after = played(&browser, until).await;
    eprintln!(
        "{engine:?}: nodes killed at {} s ({buffered} s buffered), played to {} s; page stats {}; longest stall {} ms, \
         {} waits",
        before["currentTime"], after["currentTime"], after["stats"], after["maxStallMs"], after["waits"]
    );
    check_playback(&after, until);
    stage.check_segments(&after);
    let origin = |o: &Value| {
        o["stats"]["originBytes"].as_u64().expect("origin bytes")
            + o["stats"]["passthroughBytes"].as_u64().expect("passthrough")
    };
    assert!(origin(&after) > origin(&before), "nothing came from the origin after the nodes died: {after:#}");
}

/// A page of a site the operator did not register: the tracker will not answer it (no CORS, 403), a node
/// refuses its WebTransport session (403), and the player still plays, from the origin.
async fn an_unregistered_site_plays_from_the_origin(engine: Engine) {
    let Some(stage) = Stage::start(engine).await else { return };
    // The same server under another name is another web origin, one nobody registered.
    let stranger = format!("http://localhost:{}", stage.site.addr.port());
    let url = stage.site.url(stage.media.keys().next().expect("media"));
    let refused = reqwest::Client::new()
        .get(format!("{}/v1/resolve", stage.cluster.tracker_url()))
        .query(&[("url", url.as_str())])
        .header(ORIGIN, &stranger)
        .send()
        .await
        .expect("resolve");
    assert_eq!(refused.status(), 403);
    assert!(refused.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none(), "the stranger may read the refusal");
    // Where the registered site's pages find a node, for the stranger's page to try.
    let contact = stage.page_resolve(&stage.page_origin, &url).await;
    let node = &contact["nodes"][0];

    let browser = stage.browser(engine, Some(&format!("{stranger}/index.html"))).await;
    stage.start_play(&browser, Player::HlsJs, Some(&stranger)).await;
    let outcome = played(&browser, 4.0).await;
    eprintln!("{engine:?} from an unregistered site: page stats {}", outcome["stats"]);
    check_playback(&outcome, 4.0);
    stage.check_segments(&outcome);
    assert_eq!(outcome["stats"]["fogBytes"], 0, "{outcome:#}");

    let forbidden = |i: usize| {
        let url = format!("http://{}/metrics", stage.cluster.status_addr(i));
        async move {
            let text = reqwest::get(url).await.expect("node metrics").text().await.expect("text");
            metric(&text, r#"fog_node_web_sessions_total{result="forbidden_origin"}"#)
        }
    };
    let mut before = 0;
    for i in 0..3 {
        before += forbidden(i).await;
    }
    let session = browser
        .call(
            "POST",
            &format!("/session/{}/execute/sync", browser.session),
            json!({"script": r#"
                const [url, hashes] = arguments;
                const serverCertificateHashes = hashes.map((h) => ({
                  algorithm: "sha-256", value: Uint8Array.from(h.match(/../g), (b) => parseInt(b, 16)) }));
                window.session = undefined;
                const wt = new WebTransport(url, { serverCertificateHashes });
                wt.ready.then(() => { window.session = "open"; wt.close(); }, (e) => { window.session = `refused: ${e}`; });
                return true;"#,
                "args": [node["web"]["url"], node["web"]["cert_hashes"]]}),
        )
        .await;
    assert_eq!(session, true);
    browser.wait_for("the session's outcome", Duration::from_secs(20), "return window.session !== undefined").await;
    let session = browser.eval("return window.session").await;
    assert!(session.as_str().is_some_and(|s| s.starts_with("refused")), "the node let the stranger in: {session}");
    let mut after = 0;
    for i in 0..3 {
        after += forbidden(i).await;
    }
    assert!(after > before, "no node counted a session refused for its origin");
}

/// One test per browser for each scenario, so a failure names the browser.
macro_rules! in_both_browsers {
    ($($name:ident => $scenario:expr;)*) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn chromium() {
                ($scenario)(Engine::Chromium).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn firefox() {
                ($scenario)(Engine::Firefox).await
            }
        }
    )*};
}

in_both_browsers! {
    hlsjs_plays_hls_from_the_nodes => |engine| plays_from_the_fog(engine, Player::HlsJs);
    shaka_plays_dash_from_the_nodes => |engine| plays_from_the_fog(engine, Player::Shaka);
    a_node_sending_pages_wrong_bytes_is_caught => a_lying_node_is_caught;
    playback_goes_on_from_the_origin_when_the_nodes_die => nodes_killed_mid_play;
    an_unregistered_site_is_refused_and_plays_from_the_origin => an_unregistered_site_plays_from_the_origin;
}
