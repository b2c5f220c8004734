//! The operators' dashboard in a real browser: headless Chromium driven through chromedriver's WebDriver
//! API, against a real tracker and nodes. Skips (saying so) only where Chromium is not installed;
//! scripts/test.sh installs it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::{json, Value};

pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
pub(crate) const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub(crate) struct Browser {
    driver: Child,
    base: String,
    pub(crate) session: String,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    pub(crate) async fn start(profile: &Path) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--disable-component-update", "--no-first-run", "--disable-sync",
                     "--window-size=1400,1200", format!("--user-data-dir={}", profile.display())]
        }}}});
        let mut b = Browser { driver, base, session: String::new(), http };
        let v = b.call("POST", "/session", caps).await;
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        b
    }

    pub(crate) async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp: Value = req.send().await.expect("webdriver call").json().await.expect("webdriver json");
        assert!(resp["value"].get("error").is_none(), "webdriver {path} failed: {resp}");
        resp["value"].clone()
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.call("POST", &format!("/session/{}/url", self.session), json!({ "url": url })).await;
    }

    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.call("POST", &format!("/session/{}/execute/sync", self.session), json!({"script": script, "args": []}))
            .await
    }

    async fn text(&self, id: &str) -> String {
        self.eval(&format!("return document.getElementById('{id}').textContent"))
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &format!("/session/{}/screenshot", self.session), Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("base64")).expect("decode png");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Polls `cond` (up to `limit`) and returns its last value.
    pub(crate) async fn wait_for(&self, what: &str, limit: Duration, cond: &str) -> Value {
        let started = Instant::now();
        loop {
            let v = self.eval(cond).await;
            if v.as_bool() == Some(true) {
                return v;
            }
            assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `target/<profile>/test-output/`, beside the test binaries.
fn output_dir() -> PathBuf {
    let dir = fog_testkit::harness::target_dir().join("test-output");
    std::fs::create_dir_all(&dir).expect("output dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_every_node_and_live_totals_in_a_real_browser() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        eprintln!(
            "SKIPPED: Chromium is not installed (apt-get install chromium chromium-driver; scripts/test.sh does)"
        );
        return;
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        // Slow enough that the fetch spans several dashboard updates.
        node_args: vec!["--upload-limit".into(), "6MiB".into()],
        ..Default::default()
    })
    .await;
    let content = test_bytes(40 << 20, 77);
    cluster.origin.put("show.bin", content.clone());

    let browser = Browser::start(&cluster.dir.path().join("chrome")).await;
    browser.goto(&cluster.tracker_url()).await;
    browser
        .wait_for(
            "two node rows",
            Duration::from_secs(20),
            "return document.querySelectorAll('#nodes tbody tr').length === 2",
        )
        .await;
    let shown =
        browser.eval("return [...document.querySelectorAll('#nodes tbody tr')].map(r => r.dataset.nodeId)").await;
    let body = reqwest::get(format!("{}/v1/dashboard/nodes", cluster.tracker_url()))
        .await
        .expect("nodes")
        .bytes()
        .await
        .expect("body");
    let registered: Value = serde_json::from_slice(&body).expect("json");
    let mut want: Vec<&str> =
        registered["nodes"].as_array().expect("nodes").iter().map(|n| n["id"].as_str().expect("id")).collect();
    let mut got: Vec<&str> = shown.as_array().expect("ids").iter().map(|v| v.as_str().expect("id")).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "the table does not show every registered node");
    browser
        .wait_for(
            "healthy count",
            Duration::from_secs(10),
            "return document.getElementById('nodes-healthy').textContent === '2'",
        )
        .await;

    let before = browser.text("fog-bytes").await;
    let client = cluster.client();
    let url = cluster.origin.url("show.bin");
    let fetch = tokio::spawn(async move { client.get(&url).await });
    let mut changed_while_fetching = false;
    while !fetch.is_finished() {
        if browser.text("fog-bytes").await != before {
            changed_while_fetching = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (bytes, _) = fetch.await.expect("join").expect("fetch");
    assert!(bytes == content);
    assert!(changed_while_fetching, "the 'served by fog' total did not change while a fetch ran (stayed {before:?})");
    browser
        .wait_for(
            "the throughput chart",
            Duration::from_secs(10),
            "return document.querySelectorAll('#chart-throughput canvas').length > 0",
        )
        .await;
    let shot = output_dir().join("dashboard.png");
    browser.screenshot(&shot).await;
    eprintln!("dashboard screenshot: {}", shot.display());
    browser.call("DELETE", &format!("/session/{}", browser.session), Value::Null).await;
}
