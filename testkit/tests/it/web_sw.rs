//! The service worker (`web/packages/sw`, issue #14) in real browsers, headless Chromium and Firefox ESR:
//! a page of a registered site registers it, then a plain `<video>` plays an MP4 (faststart, 8 Mbit/s, more
//! than a browser may read ahead at once) that the worker serves from three real nodes over WebTransport,
//! verified chunk by chunk. Playback advances, seeks resume, the nodes (not the origin) send the media,
//! ranges fetched through the worker are the origin's bytes with the right headers, and a request the page
//! drops stops the worker's fetching. Skips (saying so) per browser where it is missing, and where ffmpeg or
//! the web build is; scripts/test.sh installs them and builds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fog_proto::ChunkHash;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::origin::{Quirks, TestOrigin};
use serde_json::{json, Value};

use crate::dashboard::{Browser, Engine};
use crate::player::{ffmpeg, source, FFMPEG};
use crate::web_page::{wait_page_gets_every_node, web_tracker_args};

/// A file `npm run build` makes in web/ (scripts/test.sh runs it before the tests).
fn built(package: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/packages").join(package).join("dist").join(file)
}

/// The page: the worker's page helper, the core bundle (only for its BLAKE3, to check bytes in the page)
/// and a plain `<video>`, muted so it may play without a gesture.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>fogcdn service worker test</title>
<script src="/fog-sw-page.js"></script><script src="/fog-core.js"></script></head>
<body><video id="player" muted playsinline preload="auto"></video></body></html>
"#;

/// Polls `done` (a JS expression) until true, failing at once if the video reports an error.
async fn wait_playing(browser: &Browser, what: &str, done: &str) {
    let cond = format!("const v = document.getElementById('player'); return v.error !== null || ({done});");
    browser.wait_for(what, Duration::from_secs(60), &cond).await;
    let error =
        browser.eval("const e = document.getElementById('player').error; return e && `${e.code} ${e.message}`").await;
    assert!(error.is_null(), "{:?}: media error while waiting for {what}: {error}", browser.engine);
}

/// Runs `script` (a JS expression for a promise) in the page and returns what it resolved to, or fails with
/// what it rejected with.
async fn in_page(browser: &Browser, what: &str, script: &str) -> Value {
    browser
        .eval(&format!(
            "window.outcome = undefined; ({script}).then((v) => {{ window.outcome = {{ ok: v }}; }}, \
             (e) => {{ window.outcome = {{ error: String(e) }}; }}); return true;"
        ))
        .await;
    browser.wait_for(what, Duration::from_secs(60), "return window.outcome !== undefined").await;
    let outcome = browser.eval("return window.outcome").await;
    assert!(outcome.get("error").is_none(), "{:?}: {what} failed: {outcome}", browser.engine);
    outcome["ok"].clone()
}

/// Bytes the nodes sent since they started, by their own counters.
async fn nodes_served(cluster: &Cluster) -> u64 {
    let mut served = 0;
    for i in 0..cluster.nodes.len() {
        served += cluster.node_status(i).await["served"]["since_start_bytes"].as_u64().expect("served bytes");
    }
    served
}

/// Fetches each range through the worker (from the page) and checks status, headers and bytes (by BLAKE3)
/// against the file.
async fn check_ranges(browser: &Browser, url: &str, movie: &[u8]) {
    let size = movie.len();
    // (Range header or null, expected status, expected first and last byte)
    type Case = (Option<String>, u64, Option<(usize, usize)>);
    let cases: Vec<Case> = vec![
        (None, 200, Some((0, size - 1))),
        (Some("bytes=0-".into()), 206, Some((0, size - 1))),
        (Some("bytes=5000000-".into()), 206, Some((5_000_000, size - 1))),
        (Some("bytes=1234567-1534566".into()), 206, Some((1_234_567, 1_534_566))),
        (Some("bytes=-777".into()), 206, Some((size - 777, size - 1))),
        (Some(format!("bytes={size}-")), 416, None),
    ];
    let headers: Vec<Value> = cases.iter().map(|(h, _, _)| json!(h)).collect();
    let script = format!(
        "Promise.all({headers}.map(async (range) => {{
            const resp = await fetch({url}, {{ headers: range === null ? {{}} : {{ Range: range }} }});
            const bytes = new Uint8Array(await resp.arrayBuffer());
            const h = (name) => resp.headers.get(name);
            return {{ status: resp.status, len: bytes.length, blake3: await Fog.blake3Hex(bytes),
                contentRange: h('content-range'), contentLength: h('content-length'),
                acceptRanges: h('accept-ranges') }};
        }}))",
        headers = Value::from(headers),
        url = json!(url),
    );
    let got = in_page(browser, "ranges through the worker", &script).await;
    for ((range, status, span), got) in cases.iter().zip(got.as_array().expect("answers")) {
        let what = format!("{:?}: {range:?}: {got}", browser.engine);
        assert_eq!(got["status"].as_u64(), Some(*status), "{what}");
        assert_eq!(got["acceptRanges"], "bytes", "{what}");
        match span {
            Some((first, last)) => {
                let want = &movie[*first..=*last];
                assert_eq!(got["len"].as_u64(), Some(want.len() as u64), "{what}");
                assert_eq!(got["contentLength"].as_str(), Some(want.len().to_string().as_str()), "{what}");
                assert_eq!(got["blake3"].as_str(), Some(ChunkHash::of(want).to_hex().as_str()), "other bytes: {what}");
                let content_range = (*status == 206).then(|| format!("bytes {first}-{last}/{size}"));
                assert_eq!(got["contentRange"].as_str(), content_range.as_deref(), "{what}");
            }
            None => assert_eq!(got["contentRange"].as_str(), Some(format!("bytes */{size}").as_str()), "{what}"),
        }
    }
}

/// Reads a little of a `bytes=N-` answer through the worker and drops it, as a player does on a seek: the
/// worker stops fetching for it (at most a few chunks past what was read, not the rest of the object).
async fn check_dropped_request(browser: &Browser, url: &str, size: usize) {
    let script = format!(
        "(async () => {{
            const fogBytes = async () => (await FogSW.fogStats()).fogBytes;
            const before = await fogBytes();
            const drop = new AbortController();
            const resp = await fetch({url}, {{ headers: {{ Range: 'bytes=1000000-' }}, signal: drop.signal }});
            const reader = resp.body.getReader();
            let read = 0;
            while (read < 500000) {{
                const {{ value, done }} = await reader.read();
                if (done) break;
                read += value.length;
            }}
            drop.abort();
            // Chunks already asked for still arrive: wait until the count stops moving.
            let fetched = (await fogBytes()) - before, last = -1;
            while (fetched !== last) {{
                last = fetched;
                await new Promise((r) => setTimeout(r, 1000));
                fetched = (await fogBytes()) - before;
            }}
            return {{ status: resp.status, read, fetched }};
        }})()",
        url = json!(url),
    );
    let got = in_page(browser, "a dropped request", &script).await;
    eprintln!(
        "{:?}: a request dropped after {} B: the worker fetched {} B for it",
        browser.engine, got["read"], got["fetched"]
    );
    assert_eq!(got["status"], 206, "{got}");
    let fetched = got["fetched"].as_u64().expect("fetched");
    assert!(fetched < (size as u64) / 3, "{:?}: the worker went on fetching a dropped request: {got}", browser.engine);
}

/// One browser: registers the worker, plays, seeks, and checks where the bytes came from and what they were.
async fn play_through_the_worker(engine: Engine, cluster: &Cluster, site: &TestOrigin, movie: &[u8]) {
    let Some(browser) = Browser::launch(engine, &cluster.dir.path().join(format!("{engine:?}"))).await else { return };
    let url = site.url("media/movie.mp4");
    browser.goto(&site.url("index.html")).await;
    browser.wait_for("the page's scripts", Duration::from_secs(20), "return typeof FogSW === 'object'").await;
    let register = format!(
        "FogSW.registerFogServiceWorker({{ tracker: {tracker}, origins: [{media}] }}).then(() => \
         navigator.serviceWorker.controller.scriptURL)",
        tracker = json!(cluster.tracker_url()),
        media = json!(site.url("media/")),
    );
    let worker = in_page(&browser, "the worker to take the page over", &register).await;
    eprintln!("{engine:?}: the page is served by {worker}");
    // Also warms, for this page, the nodes the tracker schedules pages to (a native client's may differ).
    check_ranges(&browser, &url, movie).await;

    let before = in_page(&browser, "the worker's stats", "FogSW.fogStats()").await;
    let origin_before = site.bytes_sent_for("media/movie.mp4");
    let nodes_before = nodes_served(cluster).await;
    let start = format!(
        "const v = document.getElementById('player'); v.src = {url}; \
         v.play().catch((e) => {{ window.playRefused = String(e); }}); return true;",
        url = json!(url)
    );
    browser.eval(&start).await;
    wait_playing(&browser, "10 s of playback", "v.currentTime >= 10").await;
    assert!(browser.eval("return window.playRefused === undefined").await == true, "{engine:?}: play() refused");
    // Forward past what the player read ahead (it asks a new range), then back into what it has.
    browser.eval("document.getElementById('player').currentTime = 15; return true").await;
    wait_playing(&browser, "playback from 15 s", "!v.seeking && v.currentTime >= 17").await;
    browser.eval("document.getElementById('player').currentTime = 3; return true").await;
    wait_playing(&browser, "playback from 3 s", "!v.seeking && v.currentTime >= 5 && v.currentTime < 14").await;

    let stats = in_page(&browser, "the worker's stats", "FogSW.fogStats()").await;
    eprintln!("{engine:?}: the worker's stats after playing and seeking: {stats}");
    let grew = |path: &[&str]| {
        let at = |v: &Value| path.iter().fold(v, |v, k| &v[k]).as_u64().expect("a counter");
        at(&stats) - at(&before)
    };
    let fog = grew(&["fogBytes"]);
    let all = fog + grew(&["originBytes"]) + grew(&["passthroughBytes"]);
    assert!(fog * 10 >= all * 8, "{engine:?}: under 80 % of the media bytes came from nodes: {stats:#}");
    assert_eq!(stats["networkResponses"], 0, "{engine:?}: the worker sent requests to the network: {stats:#}");
    let served = grew(&["served", "bytes"]);
    assert!(served > 0 && grew(&["served", "responses"]) >= 1, "{engine:?}: {stats:#}");
    // The same from the other side: the nodes' counters grew by at least that, the origin sent little.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from_nodes = nodes_served(cluster).await - nodes_before;
    let from_origin = site.bytes_sent_for("media/movie.mp4") - origin_before;
    eprintln!("{engine:?}: the player got {served} B; nodes sent {from_nodes} B, the origin {from_origin} B");
    assert!(from_nodes * 10 >= served * 8, "{engine:?}: nodes sent {from_nodes} B of the {served} B played");
    assert!(from_origin * 5 <= served, "{engine:?}: the origin sent {from_origin} B of the {served} B played");

    check_dropped_request(&browser, &url, movie.len()).await;
    browser.call("DELETE", &format!("/session/{}", browser.session), Value::Null).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_video_plays_and_seeks_through_the_service_worker_in_chromium_and_firefox() {
    if !Path::new(FFMPEG).exists() {
        eprintln!("SKIPPED: ffmpeg is not installed (apt-get install ffmpeg; scripts/test.sh does)");
        return;
    }
    let scripts = [built("sw", "fog-sw.js"), built("sw", "fog-sw-page.js"), built("core", "fog-core.js")];
    if let Some(missing) = scripts.iter().find(|p| !p.exists()) {
        eprintln!(
            "SKIPPED: the web packages are not built ({} is missing): cd web && npm ci --ignore-scripts && npm run \
             build (scripts/test.sh does, where npm is installed)",
            missing.display()
        );
        return;
    }
    // The site serves the page, the scripts and the media (the page reads its own site's media, as players
    // do, so the worker's origin reads need no CORS).
    let site = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("site");
    site.put("index.html", PAGE);
    for script in &scripts {
        let name = script.file_name().expect("name").to_str().expect("utf8");
        site.put(name, std::fs::read(script).expect("built script"));
    }
    let page_origin = format!("http://{}", site.addr);
    let cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        tracker_args: [web_tracker_args(&site.base_url(), &page_origin), vec!["--chunk-size".into(), "256KiB".into()]]
            .concat(),
        ..Default::default()
    })
    .await;

    // 30 s of video at a constant 8 Mbit/s (30 MB), 4:2:0 as web video is: Chromium reads ahead less than
    // that, so playing and seeking take several range requests (Firefox reads it in one).
    let src = source(cluster.dir.path(), 30);
    let movie_path = cluster.dir.path().join("movie.mp4");
    let (src, out) = (src.to_str().expect("utf8"), movie_path.to_str().expect("utf8"));
    let mut args = vec!["-i", src];
    args.extend(
        "-c:v libx264 -preset ultrafast -pix_fmt yuv420p -x264-params nal-hrd=cbr -b:v 8M -minrate 8M -maxrate 8M \
         -bufsize 2M -g 25 -c:a copy -movflags +faststart"
            .split_whitespace(),
    );
    args.push(out);
    ffmpeg(&args);
    let movie = std::fs::read(&movie_path).expect("movie");
    site.put("media/movie.mp4", movie.clone());
    let url = site.url("media/movie.mp4");
    // A native client warms the nodes, so pages find every chunk cached.
    let (got, _) = cluster.client().get(&url).await.expect("native fetch");
    assert!(got == movie);
    wait_page_gets_every_node(&cluster, &page_origin, &url).await;

    for engine in [Engine::Chromium, Engine::Firefox] {
        play_through_the_worker(engine, &cluster, &site, &movie).await;
    }
}
