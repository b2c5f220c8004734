//! A throwaway NATS cluster for the tracker's cluster tests: `n` nats-servers on 127.0.0.1, on free ports,
//! routed to each other, each in its own process group that is killed on drop (or by [`NatsCluster::kill`]).
//! Without `nats-server` installed, [`NatsCluster::start`] says why and the test skips.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where nats-server is, or why the cluster tests skip (Debian's package installs it in /usr/sbin, which
/// is not on every user's PATH).
pub fn nats_server() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| "nats-server is not installed (apt-get install nats-server; scripts/test.sh does)".into())
}

/// One nats-server of the cluster.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    /// `nats://127.0.0.1:PORT`, for clients.
    pub url: String,
    pub log: PathBuf,
    /// Its monitoring port (HTTP).
    monitor: u16,
}

impl NatsServer {
    /// SIGKILL to its whole process group, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Clients connected to it now (its `/varz`).
    pub async fn clients(&self) -> u64 {
        let varz = reqwest::get(format!("http://127.0.0.1:{}/varz", self.monitor)).await;
        let varz = match varz {
            Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        varz["connections"].as_u64().unwrap_or(0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nats-servers routed into one cluster.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

/// A port free on 127.0.0.1 now (the OS does not hand it out again at once).
impl NatsCluster {
    /// Starts `n` routed servers logging into `dir`, and waits (up to 30 s) until each has a route to every
    /// other. `Err`: why they cannot run here (the caller skips).
    pub async fn start(n: usize, dir: &Path) -> Result<NatsCluster, String> {
        let bin = nats_server()?;
        let ports: Vec<(u16, u16, u16)> =
            (0..n).map(|_| (crate::free_port(), crate::free_port(), crate::free_port())).collect();
        let routes = ports.iter().map(|(_, cluster, _)| format!("nats://127.0.0.1:{cluster}")).collect::<Vec<_>>();
        let mut servers = Vec::new();
        for (i, (client, cluster, monitor)) in ports.iter().enumerate() {
            let log = dir.join(format!("nats{i}.log"));
            let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let child = Command::new(&bin)
                .args(["--addr", "127.0.0.1", "--port", &client.to_string()])
                .args(["--http_port", &monitor.to_string(), "--name", &format!("fog-test-{i}")])
                .args(["--cluster_name", "fog-test", "--cluster", &format!("nats://127.0.0.1:{cluster}")])
                .args(["--routes", &routes.join(",")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                // Its own group, so that a kill reaches anything it started.
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            let url = format!("nats://127.0.0.1:{client}");
            servers.push(NatsServer { child: Some(child), url, log, monitor: *monitor });
        }
        let cluster = NatsCluster { servers };
        let started = Instant::now();
        for (i, (_, _, monitor)) in ports.iter().enumerate() {
            loop {
                let routez = reqwest::get(format!("http://127.0.0.1:{monitor}/routez")).await;
                let routes = match routez {
                    Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v["num_routes"].as_u64()),
                    Err(_) => None,
                };
                if routes >= Some(n as u64 - 1) {
                    break;
                }
                let log = std::fs::read_to_string(&cluster.servers[i].log).unwrap_or_default();
                assert!(started.elapsed() < Duration::from_secs(30), "nats-server {i} not routed in 30 s; log:\n{log}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url.clone()).collect()
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }
}
