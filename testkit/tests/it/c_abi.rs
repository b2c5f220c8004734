//! The C ABI from C: `client-lib/examples/player.c` is compiled with the system C compiler against the
//! committed `client-lib/include/fog.h` and the built `libfog_client.so`, then run against a real cluster.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use fog_testkit::harness::{target_dir, Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_program_embeds_the_proxy() {
    let lib_dir = target_dir();
    assert!(
        lib_dir.join("libfog_client.so").exists(),
        "libfog_client.so missing in {}: build with `cargo build --release --workspace` first",
        lib_dir.display()
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root");
    let cluster = Cluster::start(ClusterOptions { nodes: 1, ..Default::default() }).await;
    let exe = cluster.dir.path().join("player");
    let cc = Command::new("cc")
        .arg(repo.join("client-lib/examples/player.c"))
        .arg("-Wall")
        .arg("-Werror")
        .arg(format!("-I{}", repo.join("client-lib/include").display()))
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-lfog_client")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));

    let content = test_bytes(3 << 20, 61);
    cluster.origin.put("c/video.bin", content.clone());
    let mut child = Command::new(&exe)
        .args([cluster.tracker_url(), cluster.origin.url("c/video.bin")])
        .env("LD_LIBRARY_PATH", &lib_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start player");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let url = lines.next().expect("a URL line").expect("read");
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/c/video.bin"), "unexpected URL {url}");
    let body = reqwest::get(&url).await.expect("fetch through the embedded proxy").bytes().await.expect("body");
    assert!(body[..] == content[..], "the embedded proxy delivered different bytes");
    // The proxy accounts a segment when its fetch returns, a moment after the last byte went out: wait for
    // its own /stats to show it before asking the C side.
    let base = url.split("/http").next().expect("proxy base").to_string();
    let started = std::time::Instant::now();
    loop {
        let stats: Value = reqwest::get(format!("{base}/stats")).await.expect("stats").json().await.expect("json");
        if stats["fog_bytes"].as_u64() == Some(content.len() as u64) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the proxy never accounted the fetch: {stats:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    child.stdin.take().expect("stdin").write_all(b"done\n").expect("write");
    let stats: Value = serde_json::from_str(&lines.next().expect("stats line").expect("read")).expect("stats json");
    assert_eq!(stats["fog_bytes"].as_u64(), Some(content.len() as u64), "{stats:#}");
    assert_eq!(stats["playback"]["state"], "playing", "{stats:#}");
    let events = lines.next().expect("events line").expect("read");
    assert!(events.starts_with("events="), "{events}");
    let status = child.wait().expect("wait");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(status.success(), "player exited with {status}: {err}");
}
