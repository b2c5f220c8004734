//! A node rolls the certificate browsers pin while pages use it (issue #14): the node announces the next
//! certificate beside the current one, switches to it, and the tracker keeps the node with pages across the
//! switch. A page that keeps its session and pages that open new ones (before, during and after the switch)
//! all get every byte from the node, with no failed handshake. The node rotates every 30 s here
//! (`--web-cert-rotation-secs`; 6 days by default).

use std::time::Duration;

use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::{json, Value};

use crate::common::MIB;
use crate::dashboard::{Browser, Engine};
use crate::web_page::{bundle, core_page_site, wait_page_gets_every_node, web_tracker_args};

const ROTATION_SECS: u64 = 30;

/// The node's count of rotation `step`s (`fog_node_web_cert_rotations_total`).
async fn rotations(cluster: &Cluster, step: &str) -> u64 {
    let url = format!("http://{}/metrics", cluster.status_addr(0));
    let metrics = reqwest::get(url).await.expect("node metrics").text().await.expect("text");
    let line = format!("fog_node_web_cert_rotations_total{{step=\"{step}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The node's WebTransport sessions that failed or were refused (`fog_node_web_sessions_total` lines;
/// connections a browser opened without asking for a session are not failures).
async fn failed_sessions(cluster: &Cluster) -> Vec<String> {
    let url = format!("http://{}/metrics", cluster.status_addr(0));
    let metrics = reqwest::get(url).await.expect("node metrics").text().await.expect("text");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("fog_node_web_sessions_total") && !l.contains("accepted") && !l.contains("no_request")
        })
        .map(str::to_string)
        .collect()
}

/// Starts fetching in the page until `window.stop`: every second one fetch by a client that keeps its
/// session (`kept`) and one by a new client, with new sessions (`fresh`); each outcome is pushed to
/// `window.fetches` with the fog and origin bytes and any failures.
const FETCH_LOOP: &str = r#"
    const [tracker, url] = ARGS;
    window.fetches = [];
    window.stop = false;
    const kept = new Fog.FogClient({ tracker });
    const once = async (client, which) => {
        try {
            const bytes = await client.fetchObject(url);
            const s = client.stats();
            window.fetches.push({ which, ok: true, len: bytes.length, at: Date.now(), s });
        } catch (e) {
            window.fetches.push({ which, ok: false, error: String(e), at: Date.now(), s: client.stats() });
        }
    };
    (async () => {
        while (!window.stop) {
            const fresh = new Fog.FogClient({ tracker });
            await Promise.all([once(kept, "kept"), once(fresh, "fresh")]);
            fresh.close();
            await new Promise((r) => setTimeout(r, 1000));
        }
        kept.close();
        window.stopped = true;
    })();
    return true;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rolls_its_certificate_while_pages_fetch_without_a_failed_session() {
    if !bundle().exists() {
        eprintln!(
            "SKIPPED: the web client is not built ({} is missing); scripts/test.sh builds it",
            bundle().display()
        );
        return;
    }
    let (site, page_origin) = core_page_site().await;
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        tracker_args: web_tracker_args(&site.base_url(), &page_origin),
        node_args: vec!["--web-cert-rotation-secs".into(), ROTATION_SECS.to_string()],
        ..Default::default()
    })
    .await;
    let content = test_bytes(2 * MIB + 4321, 77);
    site.put("media/clip.bin", content.clone());
    let url = site.url("media/clip.bin");
    let (got, _) = cluster.client().get(&url).await.expect("native fetch warms the node");
    assert!(got == content);
    wait_page_gets_every_node(&cluster, &page_origin, &url).await;

    for engine in [Engine::Chromium, Engine::Firefox] {
        let Some(browser) = Browser::launch(engine, &cluster.dir.path().join(format!("{engine:?}"))).await else {
            continue;
        };
        browser.goto(&site.url("index.html")).await;
        browser.wait_for("the bundle", Duration::from_secs(20), "return typeof Fog === 'object'").await;
        let switched_before = rotations(&cluster, "switched").await;
        let failed_before = failed_sessions(&cluster).await;
        browser.eval(&FETCH_LOOP.replace("ARGS", &json!([cluster.tracker_url(), url]).to_string())).await;

        // Through one whole switch (at most a rotation period away), then until new sessions have been
        // opened after it.
        let started = std::time::Instant::now();
        while rotations(&cluster, "switched").await == switched_before {
            assert!(started.elapsed() < Duration::from_secs(3 * ROTATION_SECS), "the node never switched");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let switch_seen: f64 = browser.eval("return Date.now()").await.as_f64().expect("page clock");
        browser
            .wait_for(
                "new sessions after the switch",
                Duration::from_secs(30),
                &format!("return window.fetches.filter(f => f.which === 'fresh' && f.at > {switch_seen}).length >= 3"),
            )
            .await;
        browser.eval("window.stop = true; return true").await;
        browser.wait_for("the page's fetches to end", Duration::from_secs(30), "return window.stopped === true").await;

        let fetches = browser.eval("return window.fetches").await;
        let fetches = fetches.as_array().expect("fetches");
        eprintln!("{engine:?}: {} fetches across the switch", fetches.len());
        for f in fetches {
            assert_eq!(f["ok"], true, "{engine:?}: a fetch failed: {f:#}");
            assert_eq!(f["len"].as_u64(), Some(content.len() as u64), "{f:#}");
            let stats: &Value = &f["s"];
            assert_eq!(stats["failures"].as_array().map(Vec::len), Some(0), "{engine:?}: a node failed: {f:#}");
            assert_eq!(stats["originBytes"], 0, "{engine:?}: bytes came from the origin: {f:#}");
        }
        assert_eq!(failed_sessions(&cluster).await, failed_before, "{engine:?}: the node failed or refused sessions");
        browser.call("DELETE", &format!("/session/{}", browser.session), Value::Null).await;
    }
    let http = reqwest::Client::new();
    let metrics = http
        .get(format!("{}/metrics", cluster.tracker_url()))
        .send()
        .await
        .expect("tracker metrics")
        .text()
        .await
        .expect("text");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("fog_tracker_web_probes_total{result=\"failed\"}") && !l.ends_with(" 0")),
        "the tracker's probe of the rotating node failed:\n{metrics}"
    );
}
