//! Real players, real streams: ffmpeg generates HLS (VOD and live), DASH and a progressive MP4, a local
//! origin serves them, and ffmpeg itself plays them through the fog proxy. What it writes must equal what it
//! writes reading straight from the origin. Skips (saying so) only where ffmpeg is not installed;
//! scripts/test.sh installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fog_testkit::harness::{Cluster, ClusterOptions, Proc};
use serde_json::Value;

pub(crate) const FFMPEG: &str = "/usr/bin/ffmpeg";

pub(crate) fn ffmpeg(args: &[&str]) {
    let out = Command::new(FFMPEG)
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("run ffmpeg");
    assert!(out.status.success(), "ffmpeg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Plays `input` (optionally from `seek` seconds for `duration`), remuxing into `out` deterministically.
fn play(input: &str, out: &Path, format: &str, seek: Option<(&str, &str)>) -> Vec<u8> {
    let mut args: Vec<String> = Vec::new();
    if let Some((ss, _)) = seek {
        args.extend(["-ss".into(), ss.into()]);
    }
    args.extend(["-i".into(), input.into()]);
    if let Some((_, t)) = seek {
        args.extend(["-t".into(), t.into()]);
    }
    args.extend(["-map".into(), "0".into(), "-c".into(), "copy".into(), "-fflags".into(), "+bitexact".into()]);
    args.extend(["-map_metadata".into(), "-1".into(), "-f".into(), format.into(), out.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ffmpeg(&refs);
    std::fs::read(out).expect("read ffmpeg output")
}

/// `seconds` of test video (H.264, a keyframe every second) and audio (AAC), encoded once.
pub(crate) fn source(dir: &Path, seconds: u32) -> PathBuf {
    let src = dir.join("source.mp4");
    let (video, audio) =
        (format!("testsrc=duration={seconds}:size=320x240:rate=25"), format!("sine=frequency=440:duration={seconds}"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &video,
        "-f",
        "lavfi",
        "-i",
        &audio,
        "-c:v",
        "libx264",
        // 4:2:0 (Constrained Baseline with ultrafast): testsrc is RGB, which x264 would keep as High 4:4:4,
        // a profile browsers' decoders (Firefox's) refuse.
        "-pix_fmt",
        "yuv420p",
        "-preset",
        "ultrafast",
        "-g",
        "25",
        "-keyint_min",
        "25",
        "-sc_threshold",
        "0",
        "-c:a",
        "aac",
        "-b:a",
        "64k",
        "-movflags",
        "+faststart",
        src.to_str().expect("utf8"),
    ]);
    src
}

/// Cuts `src` into 2-second HLS segments in `dir`, with absolute segment URIs under `base_url` if given.
pub(crate) fn make_hls(src: &Path, dir: &Path, playlist: &str, base_url: Option<&str>) {
    let (src, segments, playlist) = (src.display().to_string(), dir.join("seg_%03d.ts"), dir.join(playlist));
    let (segments, playlist) = (segments.display().to_string(), playlist.display().to_string());
    let mut args = vec!["-i", &src, "-c", "copy", "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod"];
    if let Some(base) = base_url {
        args.extend(["-hls_base_url", base]);
    }
    args.extend(["-hls_segment_filename", &segments, &playlist]);
    ffmpeg(&args);
}

struct Stack {
    cluster: Cluster,
    proxy: Proc,
    work: PathBuf,
}

impl Stack {
    async fn start() -> Option<Stack> {
        if !Path::new(FFMPEG).exists() {
            eprintln!("SKIPPED: ffmpeg is not installed (apt-get install ffmpeg; scripts/test.sh does)");
            return None;
        }
        let work = tempfile::Builder::new().prefix("fogcdn-player").tempdir().expect("tempdir").keep();
        let www = work.join("www");
        std::fs::create_dir_all(&www).expect("www");
        let cluster = Cluster::start(ClusterOptions { nodes: 2, origin_dir: Some(www), ..Default::default() }).await;
        let args: Vec<String> =
            vec!["proxy".into(), "--tracker".into(), cluster.tracker_url(), "--listen".into(), "127.0.0.1:0".into()];
        let proxy = Proc::spawn("fog", &args, work.join("proxy.log")).await;
        Some(Stack { cluster, proxy, work })
    }

    fn www(&self, sub: &str) -> PathBuf {
        let d = self.work.join("www").join(sub);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn direct(&self, path: &str) -> String {
        self.cluster.origin.url(path)
    }

    fn proxied(&self, path: &str) -> String {
        fog_client::proxy::proxied_url(&self.direct(path), &self.proxy.addr).expect("proxied url")
    }

    async fn stats(&self) -> Value {
        let body = reqwest::get(format!("http://{}/stats", self.proxy.addr))
            .await
            .expect("stats")
            .bytes()
            .await
            .expect("body");
        serde_json::from_slice(&body).expect("stats json")
    }

    /// Plays `path` directly, then twice through the proxy; both proxied plays must equal the direct one,
    /// and the warm second play must come from the fog without origin fallback.
    async fn check(&self, path: &str, format: &str, seek: Option<(&str, &str)>) {
        let out = self.work.join("out");
        let direct = play(&self.direct(path), &out, format, seek);
        assert!(direct.len() > 10_000, "direct play of {path} produced only {} bytes", direct.len());
        let first = play(&self.proxied(path), &out, format, seek);
        assert!(first == direct, "first play of {path} through the proxy differs from the origin");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = self.stats().await;
        let second = play(&self.proxied(path), &out, format, seek);
        assert!(second == direct, "second play of {path} through the proxy differs from the origin");
        let after = self.stats().await;
        let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
        assert!(delta("fog_bytes") > 0, "warm play of {path} took nothing from the fog: {after:#}");
        assert_eq!(delta("origin_bytes"), 0, "warm play of {path} needed origin fallback: {after:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_vod_through_the_proxy_equals_the_origin() {
    let Some(stack) = Stack::start().await else { return };
    let src = source(&stack.work, 10);
    let hls = stack.www("hls");
    // Absolute segment URIs in the media playlist, a relative one in the master: both must go through the proxy.
    let base = format!("{}hls/", stack.cluster.origin.base_url());
    make_hls(&src, &hls, "index.m3u8", Some(&base));
    std::fs::write(
        hls.join("master.m3u8"),
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=600000,RESOLUTION=320x240\nindex.m3u8\n",
    )
    .expect("master");
    stack.check("hls/master.m3u8", "mpegts", None).await;
    let stats = stack.stats().await;
    assert!(stats["offload"].as_f64() > Some(0.0), "{stats:#}");
    assert!(stats["requests"]["segment"].as_u64() > Some(0), "{stats:#}");
    assert!(stats["prefetch_hits"].as_u64() > Some(0), "segments after the playhead were not prefetched: {stats:#}");
    assert!(stats["nodes"].as_object().is_some_and(|n| !n.is_empty()), "{stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dash_through_the_proxy_equals_the_origin() {
    let Some(stack) = Stack::start().await else { return };
    let src = source(&stack.work, 10);
    let dash = stack.www("dash");
    ffmpeg(&[
        "-i",
        src.to_str().expect("utf8"),
        "-map",
        "0",
        "-c",
        "copy",
        "-f",
        "dash",
        "-seg_duration",
        "2",
        dash.join("manifest.mpd").to_str().expect("utf8"),
    ]);
    stack.check("dash/manifest.mpd", "matroska", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progressive_mp4_with_seeks_through_the_proxy_equals_the_origin() {
    let Some(stack) = Stack::start().await else { return };
    let src = source(&stack.work, 10);
    // The index (moov) at the end, as many encoders leave it: a player must jump there with a Range
    // request before it can play, and again to seek.
    let movie = stack.www("mp4").join("movie.mp4");
    ffmpeg(&["-i", src.to_str().expect("utf8"), "-c", "copy", movie.to_str().expect("utf8")]);
    stack.check("mp4/movie.mp4", "mpegts", Some(("4", "3"))).await;
    stack.check("mp4/movie.mp4", "mpegts", None).await;
    let stats = stack.stats().await;
    assert!(stats["requests"]["range"].as_u64() > Some(0), "no range requests were served: {stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_hls_that_grows_while_playing() {
    let Some(stack) = Stack::start().await else { return };
    let src = source(&stack.work, 10);
    let staging = stack.work.join("staging");
    std::fs::create_dir_all(&staging).expect("staging");
    make_hls(&src, &staging, "full.m3u8", None);
    let full = std::fs::read_to_string(staging.join("full.m3u8")).expect("playlist");
    let live = stack.www("live");
    for entry in std::fs::read_dir(&staging).expect("staging") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|e| e == "ts") {
            std::fs::copy(&p, live.join(p.file_name().expect("name"))).expect("copy segment");
        }
    }
    // The live playlist: the header and first two segments, then one more every second, then the end.
    let lines: Vec<String> = full
        .lines()
        .filter(|l| !l.starts_with("#EXT-X-ENDLIST") && !l.starts_with("#EXT-X-PLAYLIST-TYPE"))
        .map(str::to_owned)
        .collect();
    let header: Vec<String> = lines.iter().take_while(|l| !l.starts_with("#EXTINF")).cloned().collect();
    let segments: Vec<String> = lines[header.len()..].chunks(2).map(|c| c.join("\n")).collect();
    let total = segments.len();
    let write = move |n: usize, ended: bool| {
        let mut text = header.join("\n") + "\n";
        for s in &segments[..n] {
            text += s;
            text += "\n";
        }
        if ended {
            text += "#EXT-X-ENDLIST\n";
        }
        let tmp = live.join("index.tmp");
        std::fs::write(&tmp, text).expect("write playlist");
        std::fs::rename(&tmp, live.join("index.m3u8")).expect("publish playlist");
    };
    write(2, false);
    let grower = std::thread::spawn(move || {
        for n in 3..=total {
            std::thread::sleep(Duration::from_millis(1000));
            write(n, n == total);
        }
    });
    let out = stack.work.join("live.ts");
    let url = stack.proxied("live/index.m3u8");
    let played = tokio::task::spawn_blocking(move || {
        let mut args = vec!["-live_start_index", "0", "-i", &url, "-map", "0", "-c", "copy", "-fflags", "+bitexact"];
        let out = out.display().to_string();
        args.extend(["-f", "mpegts", &out]);
        ffmpeg(&args);
        std::fs::read(&out).expect("read")
    })
    .await
    .expect("join");
    grower.join().expect("grower");
    let direct = play(&stack.direct("live/index.m3u8"), &stack.work.join("direct.ts"), "mpegts", None);
    assert!(played == direct, "live play through the proxy differs from reading the finished stream directly");
    let stats = stack.stats().await;
    assert!(stats["fog_bytes"].as_u64() > Some(0), "{stats:#}");
}
