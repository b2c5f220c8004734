//! The operators' dashboard in a real browser: headless Chromium driven through chromedriver's WebDriver
//! API, against a real tracker and nodes. Skips (saying so) only where Chromium is not installed;
//! scripts/test.sh installs it.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use fog_testkit::harness::{Cluster, ClusterOptions};
use fog_testkit::test_bytes;
use serde_json::{json, Value};

pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
pub(crate) const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub(crate) const FIREFOX: &str = "/usr/bin/firefox-esr";

/// Where scripts/test.sh installs geckodriver (from crates.io: Debian does not package it).
pub(crate) fn geckodriver() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fogcdn/tools/bin/geckodriver")
}

/// The browsers the tests drive, each through its own WebDriver server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    /// Debian's Chromium, through chromedriver.
    Chromium,
    /// Debian's Firefox ESR, through geckodriver.
    Firefox,
}

impl Engine {
    /// Why the engine cannot run here (browser or driver missing), or None when it can.
    pub(crate) fn unavailable(self) -> Option<String> {
        let (browser, driver, install) = match self {
            Engine::Chromium => {
                (PathBuf::from(CHROMIUM), PathBuf::from(CHROMEDRIVER), "apt-get install chromium chromium-driver")
            }
            Engine::Firefox => (
                PathBuf::from(FIREFOX),
                geckodriver(),
                "apt-get install firefox-esr; cargo install geckodriver --locked --root ~/.cache/fogcdn/tools",
            ),
        };
        let missing: Vec<String> =
            [&browser, &driver].into_iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
        (!missing.is_empty()).then(|| {
            format!("{self:?} is not installed ({} missing; {install}; scripts/test.sh does)", missing.join(", "))
        })
    }
}

/// A headless browser, driven through its WebDriver server (chromedriver, geckodriver); both stop when it
/// is dropped.
pub(crate) struct Browser {
    driver: Child,
    base: String,
    pub(crate) session: String,
    pub(crate) engine: Engine,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A killed geckodriver leaves its Firefox running: end the session (the browser quits) first.
        self.quit();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts `engine` headless with its profile in `profile` (the driver's log beside it, `<profile>.log`),
    /// or says why it cannot and returns None.
    pub(crate) async fn launch(engine: Engine, profile: &Path) -> Option<Browser> {
        if let Some(why) = engine.unavailable() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        std::fs::create_dir_all(profile).expect("browser profile dir");
        let log = std::fs::File::create(profile.with_extension("log")).expect("driver log");
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        // geckodriver picks a free Marionette port itself, so several Firefoxes can run at once.
        let mut driver = match engine {
            Engine::Chromium => Command::new(CHROMEDRIVER),
            Engine::Firefox => Command::new(geckodriver()),
        };
        let mut driver = driver
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().expect("driver log"))
            .stderr(log)
            .spawn()
            .expect("start the WebDriver server");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = driver.kill();
                panic!(
                    "the {engine:?} WebDriver server did not start; see {}",
                    profile.with_extension("log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = match engine {
            Engine::Chromium => json!({"browserName": "chrome", "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-dev-shm-usage", "--disable-component-update", "--no-first-run", "--disable-sync",
                         "--window-size=1400,1200", format!("--user-data-dir={}", profile.display())]
            }}),
            Engine::Firefox => json!({"browserName": "firefox", "moz:firefoxOptions": {
                "binary": FIREFOX,
                "args": ["-headless", "-profile", profile.display().to_string(), "-width", "1400", "-height", "1200"],
                "prefs": {
                    // No first-run pages, update checks or telemetry pings mixed into the tests' traffic.
                    "browser.shell.checkDefaultBrowser": false,
                    "app.update.disabledForTesting": true,
                    "datareporting.policy.dataSubmissionEnabled": false,
                    "toolkit.telemetry.reportingpolicy.firstRun": false,
                    "browser.startup.homepage_override.mstone": "ignore",
                },
                "log": {"level": "info"},
            }}),
        };
        let mut b = Browser { driver, base, session: String::new(), engine, http };
        // Sites on 127.0.0.1 over HTTPS (web_bench's nginx) have self-signed certificates.
        let mut caps = caps;
        caps["acceptInsecureCerts"] = json!(true);
        let v = b.call("POST", "/session", json!({"capabilities": {"alwaysMatch": caps}})).await;
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        Some(b)
    }

    /// Deletes the session, blocking (it runs from `drop`, outside any runtime's reach), for at most 20 s.
    fn quit(&self) {
        let Some(addr) = self.base.strip_prefix("http://") else { return };
        if self.session.is_empty() {
            return;
        }
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let _ = stream.read_to_end(&mut Vec::new());
        }
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
    if let Some(why) = Engine::Chromium.unavailable() {
        eprintln!("SKIPPED: {why}");
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

    let Some(browser) = Browser::launch(Engine::Chromium, &cluster.dir.path().join("chrome")).await else { return };
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
