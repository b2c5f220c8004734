//! The web benchmark (issue #14; run by scripts/bench/web.sh, which records it in docs/benchmarks.md):
//! one page, in each installed browser, fetching one object through 3 warm nodes over WebTransport with
//! every chunk BLAKE3-verified in the page, against the same page fetching the same bytes over HTTPS from
//! nginx (the site's own server: TLS 1.3, `sendfile`), alternating; and the time to the first video frame
//! of hls.js playing an HLS stream through the fog (`@fogcdn/hlsjs`) against hls.js reading it from nginx.
//! Ignored by the test suite: it measures, it checks nothing but that every run got the right bytes.
//! Besides rates it reports the CPU time the whole machine spent per GiB fetched (every process involved).
//! Settings: FOG_BENCH_SIZE_MIB (64), FOG_BENCH_RUNS (5).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use fog_testkit::harness::{Cluster, ClusterOptions};
use serde_json::{json, Value};

use crate::dashboard::{Browser, Engine};
use crate::player::{make_hls, source};
use crate::web_page::{bundle, wait_page_gets_every_node, web_tracker_args};

const NGINX: &str = "/usr/sbin/nginx";

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../web")
}

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// nginx serving `www` over HTTP (the origin the tracker registers) and HTTPS (the site pages come from).
struct Nginx {
    child: Child,
    http: u16,
    https: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    fn start(work: &Path, www: &Path) -> Nginx {
        let (cert, key) = (work.join("cert.pem"), work.join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
        let (http, https) = (fog_testkit::free_port(), fog_testkit::free_port());
        let user = if running_as_root() { "user root;" } else { "" };
        let conf = format!(
            "{user}\nworker_processes auto;\npid {work}/nginx.pid;\nerror_log {work}/nginx-error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  types {{ text/html html; \
             application/javascript js; application/vnd.apple.mpegurl m3u8; video/mp2t ts; }}\n\
             server {{\n    listen 127.0.0.1:{http};\n    listen 127.0.0.1:{https} ssl;\n    \
             ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.3;\n    \
             root {www};\n  }}\n}}\n",
            work = work.display(),
            cert = cert.display(),
            key = key.display(),
            www = www.display(),
        );
        std::fs::write(work.join("nginx.conf"), conf).expect("nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(work)
            .arg("-c")
            .arg(work.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { child, http, https };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", https)).is_ok() {
                return nginx;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nginx did not start; see {}/nginx-error.log", work.display());
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>fogcdn web benchmark</title>
<script src="/hls.min.js"></script><script src="/fog-core.js"></script><script src="/fog-hlsjs.js"></script>
</head><body><video id="v" muted playsinline></video></body></html>
"#;

/// One fetch of the whole object in the page, over HTTPS from nginx (`direct`) or through the fog.
const FETCH: &str = r#"
    const [way, tracker, fogUrl, directUrl] = ARGS;
    window.result = undefined;
    (async () => {
        const t0 = performance.now();
        let bytes, stats = null;
        if (way === "direct") {
            const resp = await fetch(directUrl, { cache: "no-store" });
            bytes = new Uint8Array(await resp.arrayBuffer());
        } else {
            const client = new Fog.FogClient({ tracker });
            bytes = await client.fetchObject(fogUrl);
            stats = client.stats();
            client.close();
        }
        const ms = performance.now() - t0;
        window.result = { ms, len: bytes.length, fog: stats ? stats.fogBytes : null };
    })().catch((e) => { window.result = { failure: String(e) }; });
    return true;
"#;

/// Time from hls.js starting on a playlist to the first frame shown, reading the segments from nginx
/// (`direct`) or through the fog.
const STARTUP: &str = r#"
    const [way, tracker, fogPlaylist, directPlaylist] = ARGS;
    window.result = undefined;
    const video = document.getElementById("v");
    const t0 = performance.now();
    let config = {};
    if (way !== "direct") config = { fLoader: FogHls.fogLoader(new Fog.FogClient({ tracker })) };
    const hls = new Hls(config);
    hls.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) window.result = { failure: d.details }; });
    const firstFrame = () => { window.result = { ms: performance.now() - t0 }; };
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(firstFrame);
    else video.addEventListener("playing", firstFrame, { once: true });
    hls.loadSource(way === "direct" ? directPlaylist : fogPlaylist);
    hls.attachMedia(video);
    video.play().catch(() => {});
    return true;
"#;

/// Runs `script` with `args` on a fresh load of `page`; returns its result and the machine's busy CPU
/// seconds while it ran (page load excluded).
async fn run_in_page(browser: &Browser, page: &str, script: &str, args: Value) -> (Value, f64) {
    browser.goto(page).await;
    browser.wait_for("the bundles", Duration::from_secs(20), "return typeof FogHls === 'object'").await;
    let busy = machine_busy_seconds();
    browser.eval(&script.replace("ARGS", &args.to_string())).await;
    browser.wait_for("the run", Duration::from_secs(180), "return window.result !== undefined").await;
    let busy = machine_busy_seconds() - busy;
    let result = browser.eval("return window.result").await;
    assert!(result.get("failure").is_none(), "{result}");
    (result, busy)
}

/// CPU time the whole machine has spent busy (every process: browser, nodes, tracker, nginx), in seconds,
/// from /proc/stat (clock ticks of 1/100 s).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: Vec<f64> =
        stat.lines().next().expect("cpu line").split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0.0)).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    (ticks.iter().take(8).sum::<f64>() - ticks[3] - ticks[4]) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench/web.sh"]
async fn web_fog_against_https_nginx() {
    let (size_mib, runs) = (setting("FOG_BENCH_SIZE_MIB", 64), setting("FOG_BENCH_RUNS", 5));
    let hls_js = web_dir().join("node_modules/hls.js/dist/hls.min.js");
    let fog_hls = web_dir().join("packages/hlsjs/dist/fog-hlsjs.js");
    for needed in [Path::new(NGINX), &bundle(), &fog_hls, &hls_js, Path::new("/usr/bin/ffmpeg")] {
        assert!(
            needed.exists(),
            "{} is missing: run scripts/bench/web.sh, which installs and builds it",
            needed.display()
        );
    }
    let work = fog_testkit::harness::test_dir("fogcdn-bench-web");
    let www = work.path().join("www");
    std::fs::create_dir_all(www.join("hls")).expect("www");
    std::fs::write(www.join("index.html"), PAGE).expect("page");
    for (from, to) in [(bundle(), "fog-core.js"), (fog_hls, "fog-hlsjs.js"), (hls_js, "hls.min.js")] {
        std::fs::copy(from, www.join(to)).expect("bundle");
    }
    let object = fog_testkit::test_bytes(size_mib << 20, 64);
    std::fs::write(www.join("object.bin"), &object).expect("object");
    make_hls(&source(work.path(), 20), &www.join("hls"), "index.m3u8", None);
    let nginx = Nginx::start(work.path(), &www);
    let origin = format!("http://127.0.0.1:{}", nginx.http);
    // The same playlist, its segments named at the origin the tracker registered (plain HTTP on loopback):
    // the page and its playlists come over HTTPS either way.
    let playlist = std::fs::read_to_string(www.join("hls/index.m3u8")).expect("playlist");
    let at_origin: String = playlist
        .lines()
        .map(|l| if l.starts_with('#') || l.is_empty() { format!("{l}\n") } else { format!("{origin}/hls/{l}\n") })
        .collect();
    std::fs::write(www.join("hls/fog.m3u8"), at_origin).expect("fog playlist");
    let site = format!("https://127.0.0.1:{}", nginx.https);

    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        tracker_args: web_tracker_args(&format!("{origin}/"), &site),
        // Every chunk in RAM, as nginx reads from the page cache.
        node_args: vec!["--memory-cache".into(), format!("{}MiB", size_mib + 64)],
        ..Default::default()
    })
    .await;
    // Warm the nodes (object and segments), then make sure pages are given all three.
    let client = cluster.client();
    let mut warm = vec![format!("{origin}/object.bin")];
    for entry in std::fs::read_dir(www.join("hls")).expect("segments") {
        let name = entry.expect("entry").file_name().into_string().expect("utf8");
        if name.ends_with(".ts") {
            warm.push(format!("{origin}/hls/{name}"));
        }
    }
    for url in &warm {
        for _ in 0..3 {
            let (_, report) = client.get(url).await.expect("warming fetch");
            if report.fog_bytes == report.bytes {
                break;
            }
        }
    }
    wait_page_gets_every_node(&cluster, &site, &warm[0]).await;

    let tracker = cluster.tracker_url();
    let page = format!("{site}/index.html");
    let mut table = vec![
        format!(
            "{size_mib} MiB object, 3 warm nodes, {runs} runs each way, alternating; 127.0.0.1, {} cores.",
            num_cpus()
        ),
        String::new(),
        "| browser | way | MB/s median | min–max | ratio to HTTPS nginx | machine CPU s/GiB | first frame ms median (min–max) |"
            .into(),
        "|---|---|---|---|---|---|---|".into(),
    ];
    for engine in [Engine::Chromium, Engine::Firefox] {
        let Some(browser) = Browser::launch(engine, &work.path().join(format!("{engine:?}"))).await else { continue };
        let (mut rates, mut starts) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        let mut cpu_per_gib = [Vec::new(), Vec::new()];
        for run in 0..runs {
            for (w, way) in ["direct", "fog"].into_iter().enumerate() {
                let args = json!([way, tracker, format!("{origin}/object.bin"), format!("{site}/object.bin")]);
                let (r, busy) = run_in_page(&browser, &page, FETCH, args).await;
                cpu_per_gib[w].push(busy * f64::from(1u32 << 30) / object.len() as f64);
                assert_eq!(r["len"].as_u64(), Some(object.len() as u64), "{engine:?} {way}: {r}");
                if way == "fog" && r["fog"].as_u64() != Some(object.len() as u64) {
                    eprintln!("warning: {engine:?} run {run}: not all from the fog: {r}");
                }
                let ms = r["ms"].as_f64().expect("ms");
                rates[w].push(object.len() as f64 / ms / 1e3);
                let args = json!([way, tracker, format!("{site}/hls/fog.m3u8"), format!("{site}/hls/index.m3u8")]);
                let (r, _) = run_in_page(&browser, &page, STARTUP, args).await;
                starts[w].push(r["ms"].as_f64().expect("ms"));
                eprintln!(
                    "{engine:?} run {run} {way}: {:.1} MB/s, first frame {:.0} ms",
                    rates[w][run], starts[w][run]
                );
            }
        }
        let direct = median(rates[0].clone());
        for (w, way) in ["HTTPS nginx", "fog (3 nodes, BLAKE3 in page)"].into_iter().enumerate() {
            let (lo, hi) =
                (rates[w].iter().copied().fold(f64::MAX, f64::min), rates[w].iter().copied().fold(0.0, f64::max));
            let (slo, shi) =
                (starts[w].iter().copied().fold(f64::MAX, f64::min), starts[w].iter().copied().fold(0.0, f64::max));
            table.push(format!(
                "| {engine:?} | {way} | {:.0} | {lo:.0}–{hi:.0} | {:.2} | {:.1} | {:.0} ({slo:.0}–{shi:.0}) |",
                median(rates[w].clone()),
                median(rates[w].clone()) / direct,
                median(cpu_per_gib[w].clone()),
                median(starts[w].clone()),
            ));
        }
        browser.call("DELETE", &format!("/session/{}", browser.session), Value::Null).await;
    }
    for node in &mut cluster.nodes {
        node.kill();
    }
    println!("\n{}", table.join("\n"));
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
