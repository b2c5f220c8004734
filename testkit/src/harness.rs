//! Runs fogcdn's real binaries as child processes for integration tests: a tracker, nodes, an origin.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fog_client::{ClientConfig, FogClient};
use fog_proto::api::TrackerStats;
use tempfile::TempDir;

use crate::origin::{Quirks, TestOrigin};

/// `target/<profile>/` of the running test: the test binary runs from its `deps/`, beside the workspace's
/// built binaries and libraries.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of a workspace binary in the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --release --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A QUIC endpoint on 127.0.0.1 holding `key` that completes handshakes and serves nothing: enough for the
/// tracker's dial-back, for tests that register hand-made nodes. Closed when dropped.
pub fn handshake_only_endpoint(key: &ed25519_dalek::SigningKey) -> quinn::Endpoint {
    let config = fog_net::transport::server_config(key, 4).expect("server config");
    let endpoint = quinn::Endpoint::server(config, ([127, 0, 0, 1], 0).into()).expect("bind");
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    conn.closed().await;
                }
            });
        }
    });
    endpoint
}

/// A child process whose stderr goes to a log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// The address the process said it listens on.
    pub addr: String,
}

impl Proc {
    /// Starts `bin(name)` with `args` and waits (up to 60 s) for its "listening on ADDR" log line.
    pub async fn spawn(name: &str, args: &[String], log: PathBuf) -> Proc {
        Self::spawn_in(None, name, args, log).await
    }

    /// [`Proc::spawn`] inside the network namespace `netns` (see `crate::netns`), if given.
    pub async fn spawn_in(netns: Option<&str>, name: &str, args: &[String], log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("create log");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(name));
                c
            }
            None => Command::new(bin(name)),
        };
        let child = command
            .args(args)
            // FOG_TEST_LOG=debug,libp2p_autonat=trace … turns up the children's logs when debugging a test.
            .env("RUST_LOG", std::env::var("FOG_TEST_LOG").unwrap_or_else(|_| "info".into()))
            // Test machines share their disk: under the node's default floor (10 % of the disk free) a nearly
            // full build machine would leave test nodes no cache. A test's own `--min-free-disk` still wins.
            .env("FOG_NODE_MIN_FREE_DISK", std::env::var("FOG_NODE_MIN_FREE_DISK").unwrap_or_else(|_| "1%".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut p = Proc { name: name.to_string(), child, log, addr: String::new() };
        let started = Instant::now();
        loop {
            let text = p.log_text();
            if let Some(pos) = text.find("listening on ") {
                let rest = &text[pos + "listening on ".len()..];
                let token = rest.split_whitespace().next().unwrap_or("");
                p.addr = token.trim_start_matches("http://").to_string();
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{name} exited with {status} before listening; log:\n{text}");
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{name} did not start in 60 s; log:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        kib.expect("VmRSS in /proc/PID/status") * 1024
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a graceful exit: its status, or `None` if it needed SIGKILL after 20 s.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if started.elapsed() > Duration::from_secs(20) {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An origin, a tracker and some nodes on 127.0.0.1 (or `[::1]`), all in one temporary directory.
#[derive(Debug)]
pub struct Cluster {
    pub dir: TempDir,
    pub origin: TestOrigin,
    pub tracker: Proc,
    pub nodes: Vec<Proc>,
    tracker_args: Vec<String>,
    node_args: Vec<String>,
    /// The loopback address every process listens on.
    loopback: IpAddr,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub quirks: Quirks,
    /// Extra tracker flags, e.g. `--chunk-size 64KiB`.
    pub tracker_args: Vec<String>,
    /// Extra flags for every node, e.g. `--cache-size 4MiB`.
    pub node_args: Vec<String>,
    /// Files the origin serves besides objects put in memory.
    pub origin_dir: Option<PathBuf>,
    /// Everything on `[::1]` instead of 127.0.0.1.
    pub ipv6: bool,
}

/// A temporary directory for a test's processes, named `prefix…`; with FOG_TEST_KEEP=1 it is kept (the path
/// is printed), with the processes' logs and data, for debugging.
pub fn test_dir(prefix: &str) -> TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("tempdir");
    if std::env::var_os("FOG_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let dir = test_dir("fogcdn-test");
        let loopback = if opts.ipv6 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
        let origin = TestOrigin::start((loopback, 0).into(), opts.origin_dir, opts.quirks).await.expect("origin");
        let mut args: Vec<String> = vec![
            "--listen".into(),
            SocketAddr::from((loopback, 0)).to_string(),
            "--data-dir".into(),
            dir.path().join("tracker").display().to_string(),
            "--origin".into(),
            origin.base_url(),
            "--heartbeat-secs".into(),
            "1".into(),
        ];
        // Tests of other things see a first fetch wait for the whole (fast, local) ingest, as they did
        // before ingest streamed; `first_view` tests pass the production default.
        if !opts.tracker_args.iter().any(|a| a == "--resolve-wait-ms") {
            args.extend(["--resolve-wait-ms".into(), "20000".into()]);
        }
        args.extend(opts.tracker_args);
        let tracker = Proc::spawn("fog-tracker", &args, dir.path().join("tracker.log")).await;
        let node_args = opts.node_args;
        let mut cluster = Cluster { dir, origin, tracker, tracker_args: args, nodes: Vec::new(), node_args, loopback };
        for _ in 0..opts.nodes {
            cluster.add_node(&[]).await;
        }
        cluster.wait_healthy(opts.nodes as u64).await;
        cluster
    }

    /// Starts the tracker again on the same address and data directory (after it was stopped).
    pub async fn restart_tracker(&mut self) {
        let mut args = self.tracker_args.clone();
        let listen = args.iter().position(|a| a == "--listen").expect("listen flag") + 1;
        args[listen] = self.tracker.addr.clone();
        let log = self.dir.path().join("tracker.restart.log");
        self.tracker = Proc::spawn("fog-tracker", &args, log).await;
    }

    pub fn tracker_url(&self) -> String {
        format!("http://{}", self.tracker.addr)
    }

    /// A ticket as the tracker would sign it, assigning `nodes` their chunk counts: what a chunk request needs
    /// for a node to fill a miss through (for tests that talk to nodes without resolving).
    pub fn ticket(&self, nodes: &[(fog_proto::NodeId, u32)]) -> Vec<u8> {
        use fog_proto::credits::{SessionId, Ticket, KIND_TICKET};
        let key = fog_net::identity::load_or_create(&self.dir.path().join("tracker/tracker.key")).expect("key");
        let ticket = Ticket {
            session: SessionId([0; 16]),
            client_key: fog_proto::NodeId::from(key.verifying_key()),
            content_id: fog_proto::ContentId([0; 32]),
            nodes: nodes.iter().map(|n| n.0).collect(),
            assigned_chunks: nodes.iter().map(|n| n.1).collect(),
            unit: 1 << 20,
            byte_budget: 1 << 30,
            expiry_ms: fog_proto::api::now_ms() + 3_600_000,
            epoch: 0,
        };
        serde_json::to_vec(&fog_proto::api::Signed::sign(&key, KIND_TICKET, &ticket)).expect("ticket json")
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    fn node_command(&self, i: usize, extra: &[String]) -> Vec<String> {
        let mut args: Vec<String> = vec!["--tracker".into(), self.tracker_url()];
        if !self.node_args.iter().chain(extra).any(|a| a == "--listen") {
            args.extend(["--listen".into(), SocketAddr::from((self.loopback, 0)).to_string()]);
        }
        args.extend([
            "--status-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.node_dir(i).display().to_string(),
        ]);
        args.extend(self.node_args.iter().cloned());
        args.extend(extra.iter().cloned());
        args
    }

    /// Starts one more node (with extra flags); returns its index. Does not wait for it to be healthy.
    pub async fn add_node(&mut self, extra: &[String]) -> usize {
        let i = self.nodes.len();
        let args = self.node_command(i, extra);
        let log = self.dir.path().join(format!("node{i}.log"));
        self.nodes.push(Proc::spawn("fog-node", &args, log).await);
        i
    }

    /// Starts node `i` again on the same data directory (after it was stopped).
    pub async fn restart_node(&mut self, i: usize) {
        self.restart_node_with(i, &[]).await;
    }

    /// [`Cluster::restart_node`] with extra flags (e.g. another `--cache-size`).
    pub async fn restart_node_with(&mut self, i: usize, extra: &[String]) {
        let args = self.node_command(i, extra);
        let log = self.dir.path().join(format!("node{i}.restart.log"));
        self.nodes[i] = Proc::spawn("fog-node", &args, log).await;
    }

    pub async fn stats(&self) -> TrackerStats {
        let url = format!("{}/v1/stats", self.tracker_url());
        let body = reqwest::get(&url).await.expect("stats request").bytes().await.expect("stats body");
        serde_json::from_slice(&body).expect("stats json")
    }

    /// Waits (up to 30 s) until exactly `n` nodes are healthy.
    pub async fn wait_healthy(&self, n: u64) {
        self.wait_stats(&format!("{n} healthy nodes"), |s| s.nodes_healthy == n).await;
    }

    /// Polls `/v1/stats` (up to 30 s) until `done` holds; returns the stats that satisfied it.
    pub async fn wait_stats(&self, what: &str, done: impl Fn(&TrackerStats) -> bool) -> TrackerStats {
        let started = Instant::now();
        loop {
            let s = self.stats().await;
            if done(&s) {
                return s;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "waited 30 s for {what}; last stats: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where node `i`'s status page listens.
    pub fn status_addr(&self, i: usize) -> String {
        std::fs::read_to_string(self.node_dir(i).join(fog_node::STATUS_ADDR_FILE))
            .expect("status.addr")
            .trim()
            .to_string()
    }

    /// Node `i`'s `/status` JSON.
    pub async fn node_status(&self, i: usize) -> serde_json::Value {
        let resp = reqwest::get(format!("http://{}/status", self.status_addr(i))).await.expect("status request");
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.expect("status json")
    }

    /// Polls node `i`'s status (up to 30 s) until `done` holds.
    pub async fn wait_node_status(
        &self,
        i: usize,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let s = self.node_status(i).await;
            if done(&s) {
                return s;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "waited 30 s for {what}; status: {s:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn client(&self) -> FogClient {
        FogClient::new(ClientConfig { tracker: Some(self.tracker_url()), ..Default::default() }).expect("client")
    }
}
