//! A throwaway PostgreSQL under pg_auto_failover for failover tests: a monitor, a primary and a synchronous
//! standby on 127.0.0.1 at free ports, in a temporary directory, each `pg_autoctl run` in its own process
//! group, killed on drop. The monitor's timeouts are cut from pg_auto_failover's defaults (a failover in
//! about 51 s) to a few seconds. As root everything runs as the `postgres` OS user, as for
//! [`crate::pg::TestPostgres`].
//!
//! ```no_run
//! use fog_testkit::pg_failover::PgFailover;
//! if let Some(why) = PgFailover::unavailable() {
//!     eprintln!("SKIPPED: {why}");
//!     return;
//! }
//! let mut pg = PgFailover::start();
//! let conn = pg.conn_str(); // "host=127.0.0.1,127.0.0.1 port=P1,P2 … target_session_attrs=read-write"
//! pg.kill_primary(); // SIGKILL to its keeper, postmaster and backends
//! let took = pg.wait_promoted(std::time::Duration::from_secs(60)); // the standby accepts writes
//! ```

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::pg::{self, TestPostgres};

/// The database the nodes create for the tests.
pub const DBNAME: &str = "fogcdn";
/// pg_auto_failover's defaults wait 20 s before calling a node unhealthy and 30 s more for a primary to
/// demote itself; a killed primary reports nothing, so a test would wait out both. Health checks every
/// second, a node unhealthy after 2 s of silence, 2 s for the demotion: a failover in a few seconds.
const MONITOR_SETTINGS: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "1s"),
    ("pgautofailover.health_check_timeout", "1s"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.health_check_retry_delay", "500ms"),
    ("pgautofailover.node_considered_unhealthy_timeout", "2s"),
    ("pgautofailover.primary_demote_timeout", "2s"),
    ("pgautofailover.startup_grace_period", "2s"),
];
/// Every server: loopback only, and small buffers (pg_autoctl sizes them from the machine's memory, and a
/// test runs three servers).
const SERVER_SETTINGS: &str = "listen_addresses = '127.0.0.1'\nshared_buffers = '32MB'\n";
/// The longest setup step (a base backup included) or failover a test waits for.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Where pg_autoctl is (Debian installs it in /usr/bin).
fn autoctl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/bin".into()]).map(|d| d.join("pg_autoctl")).find(|p| p.is_file())
}

/// One `pg_autoctl` service: the monitor or a Postgres node.
#[derive(Debug)]
struct Service {
    name: String,
    pgdata: PathBuf,
    port: u16,
    log: PathBuf,
    /// `pg_autoctl run`, leading its process group; None once killed.
    child: Option<Child>,
}

impl Service {
    /// SIGKILL to the keeper's process group and to its PostgreSQL: the postmaster and every child of it
    /// (PostgreSQL puts each backend in a group of its own), collected before the postmaster dies.
    fn kill(&mut self) {
        let postmaster = std::fs::read_to_string(self.pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let mut doomed: Vec<u32> = postmaster.into_iter().collect();
        if let Some(pm) = postmaster {
            doomed.extend(children(pm));
        }
        if let Some(child) = &self.child {
            pg::signal_group(child.id(), "KILL");
        }
        if !doomed.is_empty() {
            let pids: Vec<String> = doomed.iter().map(u32::to_string).collect();
            let _ = Command::new("kill").arg("-KILL").args(&pids).stderr(Stdio::null()).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Processes whose parent is `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // `pid (comm) state ppid …`: the command may hold spaces, the last ')' ends it.
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(pid)
        })
        .collect()
}

/// A monitor and two Postgres nodes (`pg-a`, the first primary, and `pg-b`, its synchronous standby).
#[derive(Debug)]
pub struct PgFailover {
    dir: TempDir,
    bin: PathBuf,
    autoctl: PathBuf,
    as_root: bool,
    monitor: Service,
    nodes: Vec<Service>,
    /// When [`PgFailover::kill_primary`] killed a node, and which.
    killed: Option<(usize, Instant)>,
}

impl PgFailover {
    /// Why no pg_auto_failover can be started here, if none can (tests skip with this message).
    pub fn unavailable() -> Option<String> {
        if let Some(why) = TestPostgres::unavailable() {
            return Some(why);
        }
        if autoctl().is_none() {
            return Some(
                "needs pg_auto_failover (pg_autoctl is missing; scripts/test.sh installs the \
                 `postgresql-15-auto-failover` package)"
                    .into(),
            );
        }
        None
    }

    /// Creates and starts the monitor, the primary and the standby, and waits until the standby is
    /// synchronous (the monitor says primary + secondary). Panics (with the logs) if it cannot; check
    /// [`PgFailover::unavailable`] first. Takes 10 to 20 s.
    pub fn start() -> PgFailover {
        let mut dir = tempfile::Builder::new().prefix("fogcdn-pgaf").tempdir().expect("tempdir");
        if std::env::var_os("FOG_TEST_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let as_root = pg::is_root();
        if as_root {
            let status = Command::new("chown").args([pg::OS_USER, "--"]).arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "cannot chown {} to {}", dir.path().display(), pg::OS_USER);
        }
        let service = |name: &str| Service {
            name: name.to_string(),
            pgdata: dir.path().join(name),
            port: crate::free_port(),
            log: dir.path().join(format!("{name}.log")),
            child: None,
        };
        let (monitor, nodes) = (service("monitor"), vec![service("pg-a"), service("pg-b")]);
        let mut pg = PgFailover {
            bin: pg::bin_dir(),
            autoctl: autoctl().expect("pg_autoctl (see unavailable())"),
            as_root,
            monitor,
            nodes,
            killed: None,
            dir,
        };

        let port = pg.monitor.port.to_string();
        pg.create(None, &["create", "monitor", "--pgport", &port, "--hostname", "127.0.0.1"]);
        pg.run(None);
        let monitor_db = format!("port={} dbname=pg_auto_failover", pg.monitor.port);
        pg.wait("the monitor to accept connections", || pg::psql(&pg.bin, &monitor_db, "SELECT 1").is_ok());
        for (name, value) in MONITOR_SETTINGS {
            pg.monitor_sql(&format!("ALTER SYSTEM SET {name} = '{value}'"));
        }
        pg.monitor_sql("SELECT pg_reload_conf()");
        let uri = format!("postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable", pg.monitor.port);

        for i in 0..2 {
            let (port, name) = (pg.nodes[i].port.to_string(), pg.nodes[i].name.clone());
            pg.create(
                Some(i),
                &[
                    "create",
                    "postgres",
                    "--pgport",
                    &port,
                    "--hostname",
                    "127.0.0.1",
                    "--listen",
                    "127.0.0.1",
                    "--dbname",
                    DBNAME,
                    "--monitor",
                    &uri,
                    "--name",
                    &name,
                ],
            );
            pg.run(Some(i));
            // The first node runs alone ("single") until the standby, made from it, joins.
            let want = if i == 0 { "single" } else { "secondary" };
            pg.wait(&format!("{name} to be {want}"), || pg.states().iter().any(|s| s.0 == name && s.1 == want));
        }
        pg.wait("primary + synchronous secondary", || {
            let s = pg.states();
            s.iter().any(|s| s.1 == "primary" && s.2 == "primary") && s.iter().any(|s| s.1 == "secondary")
        });
        pg
    }

    /// `pg_autoctl` with the server binaries on its PATH and its configuration and state in the test's
    /// directory, as the server's OS user.
    fn autoctl(&self) -> Command {
        let mut c = pg::as_server_user(&self.autoctl, self.as_root, self.dir.path());
        let path = std::env::join_paths(
            std::iter::once(self.bin.clone())
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .expect("PATH");
        let d = self.dir.path();
        c.env("PATH", path)
            .env("HOME", d)
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_DATA_HOME", d.join("share"))
            .env("XDG_RUNTIME_DIR", d.join("run"));
        c
    }

    fn service(&self, node: Option<usize>) -> &Service {
        node.map_or(&self.monitor, |i| &self.nodes[i])
    }

    /// `pg_autoctl create …` for the monitor (`None`) or node `i`, then this test's server settings.
    fn create(&self, node: Option<usize>, args: &[&str]) {
        let s = self.service(node);
        let out = self
            .autoctl()
            .args(args)
            .arg("--pgdata")
            .arg(&s.pgdata)
            .args(["--auth", "trust", "--no-ssl"])
            .output()
            .expect("run pg_autoctl create");
        std::fs::write(&s.log, [&out.stdout[..], &out.stderr[..]].concat()).expect("log");
        assert!(out.status.success(), "pg_autoctl {args:?} failed:\n{}", self.logs());
        // Read last, after pg_autoctl's own file; `create` leaves the server stopped for `run` to start.
        let auto = s.pgdata.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
        conf.push_str(SERVER_SETTINGS);
        std::fs::write(&auto, conf).expect("postgresql.auto.conf");
    }

    /// `pg_autoctl run` for the monitor or node `i`, in a process group of its own.
    fn run(&mut self, node: Option<usize>) {
        let s = self.service(node);
        let log = std::fs::OpenOptions::new().append(true).create(true).open(&s.log).expect("log");
        let child = self
            .autoctl()
            .arg("run")
            .arg("--pgdata")
            .arg(&s.pgdata)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start pg_autoctl run");
        match node {
            None => self.monitor.child = Some(child),
            Some(i) => self.nodes[i].child = Some(child),
        }
    }

    fn monitor_sql(&self, sql: &str) -> String {
        let conn = format!("port={} dbname=pg_auto_failover", self.monitor.port);
        pg::psql(&self.bin, &conn, sql).unwrap_or_else(|e| panic!("monitor: {sql}: {e}"))
    }

    /// Polls `done` (up to [`STEP_LIMIT`]); panics with the monitor's view and the logs.
    fn wait(&self, what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < STEP_LIMIT, "waited {STEP_LIMIT:?} for {what}; {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Each node's (name, reported state, assigned state) as the monitor has them; empty if it does not
    /// answer.
    pub fn states(&self) -> Vec<(String, String, String)> {
        let conn = format!("port={} dbname=pg_auto_failover", self.monitor.port);
        let sql = "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node ORDER BY nodeid";
        let out = pg::psql(&self.bin, &conn, sql).unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let mut f = l.split('|').map(str::to_string);
                Some((f.next()?, f.next()?, f.next()?))
            })
            .collect()
    }

    /// The monitor's view and every service's log, for a failure's message.
    pub fn logs(&self) -> String {
        let mut out = format!("monitor's view (node, reported, assigned): {:?}\n", self.states());
        for s in std::iter::once(&self.monitor).chain(&self.nodes) {
            let text = std::fs::read_to_string(&s.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} (last 40 lines of {}):\n", s.name, s.log.display()));
            out.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
        }
        out
    }

    /// A libpq key=value connection string naming both nodes, asking for the read-write one, as the
    /// `postgres` role (trust on 127.0.0.1): after a failover new connections find the new primary.
    pub fn conn_str(&self) -> String {
        let ports: Vec<String> = self.nodes.iter().map(|n| n.port.to_string()).collect();
        format!(
            "host=127.0.0.1,127.0.0.1 port={} user=postgres dbname={DBNAME} connect_timeout=2 \
             target_session_attrs=read-write",
            ports.join(",")
        )
    }

    /// Runs `sql` at the current primary; its unaligned, tuples-only output, or psql's message.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        pg::psql(&self.bin, &self.conn_str(), sql)
    }

    /// Which node the monitor has as primary (reported and assigned), if one.
    pub fn primary(&self) -> Option<usize> {
        let states = self.states();
        let primary =
            |s: &(String, String, String)| ["primary", "wait_primary", "single"].contains(&s.1.as_str()) && s.1 == s.2;
        let name = states.iter().find(|s| primary(s))?.0.clone();
        self.nodes.iter().position(|n| n.name == name)
    }

    /// SIGKILL to the primary's keeper and PostgreSQL, as a machine crash would; returns its index. Its
    /// clients' connections break at once. The node stays down.
    pub fn kill_primary(&mut self) -> usize {
        let i = self.primary().unwrap_or_else(|| panic!("no primary to kill; {}", self.logs()));
        self.nodes[i].kill();
        self.killed = Some((i, Instant::now()));
        i
    }

    /// Waits (up to `limit`) until the monitor has promoted the standby after [`PgFailover::kill_primary`]
    /// and it accepts writes; returns the time since the kill.
    pub fn wait_promoted(&self, limit: Duration) -> Duration {
        let (dead, at) = self.killed.expect("kill_primary first");
        let other = 1 - dead;
        let conn = format!("port={} dbname={DBNAME}", self.nodes[other].port);
        let started = Instant::now();
        loop {
            let promoted = self.primary() == Some(other)
                && pg::psql(&self.bin, &conn, "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "f");
            if promoted {
                return at.elapsed();
            }
            assert!(started.elapsed() < limit, "the standby was not promoted in {limit:?}; {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgFailover {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        self.monitor.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row committed before the primary is killed is at the promoted standby (the commit waited for it),
    /// which the multi-host connection string finds.
    #[test]
    fn a_committed_row_survives_the_primary() {
        if let Some(why) = PgFailover::unavailable() {
            eprintln!("SKIPPED a_committed_row_survives_the_primary: {why}");
            return;
        }
        let mut pg = PgFailover::start();
        // The primary waits for its standby, on loopback, with this test's small buffers.
        assert_ne!(pg.psql("SHOW synchronous_standby_names").expect("show"), "");
        assert_eq!(pg.psql("SHOW listen_addresses").expect("show"), "127.0.0.1");
        assert_eq!(pg.psql("SHOW shared_buffers").expect("show"), "32MB");
        pg.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (7)").expect("write");
        let first = pg.kill_primary();
        let took = pg.wait_promoted(STEP_LIMIT);
        eprintln!("failover took {took:?}");
        assert_eq!(pg.primary(), Some(1 - first));
        assert_eq!(pg.psql("SELECT v FROM t").expect("read"), "7");
        pg.psql("INSERT INTO t VALUES (8)").expect("the new primary takes writes");
    }
}
