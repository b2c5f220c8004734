//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, `postgres` on 127.0.0.1 at a
//! free port, trust authentication for the `postgres` role. fsync stays on, so tests of durability test it.
//! PostgreSQL refuses to run as root: as root the server runs as the `postgres` OS user (which the Debian
//! package creates), owning the directory. The server runs in its own process group, so that stopping it
//! also stops its backends; everything is killed and removed when the [`TestPostgres`] is dropped.
//!
//! ```no_run
//! use fog_testkit::pg::TestPostgres;
//! if let Some(why) = TestPostgres::unavailable() {
//!     eprintln!("SKIPPED: {why}");
//!     return;
//! }
//! let mut pg = TestPostgres::start();
//! let conn = pg.conn_str(); // "host=127.0.0.1 port=… user=postgres dbname=postgres"
//! pg.create_database("fog_a"); // pg.conn_str_db("fog_a") connects to it
//! pg.crash(); // SIGKILL to every server process: the database is down
//! pg.restart(); // the same data directory and port again
//! ```

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where Debian installs the server binaries; FOG_TEST_PG_BIN names another directory.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The OS user the server runs as when the tests run as root.
pub(crate) const OS_USER: &str = "postgres";

/// A PostgreSQL server of one test.
#[derive(Debug)]
pub struct TestPostgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// The postmaster, which leads its process group; None while stopped.
    child: Option<Child>,
    as_root: bool,
}

pub(crate) fn bin_dir() -> PathBuf {
    std::env::var_os("FOG_TEST_PG_BIN").map(PathBuf::from).unwrap_or_else(|| DEFAULT_BIN.into())
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl TestPostgres {
    /// Why no server can be started on this machine, if none can (tests skip with this message).
    pub fn unavailable() -> Option<String> {
        let bin = bin_dir();
        for program in ["initdb", "postgres", "pg_isready", "psql"] {
            if !bin.join(program).exists() {
                return Some(format!(
                    "needs PostgreSQL 15 ({} is missing; scripts/test.sh installs the `postgresql` package, \
                     FOG_TEST_PG_BIN names another bin directory)",
                    bin.join(program).display()
                ));
            }
        }
        if is_root() {
            let user = Command::new("id").arg(OS_USER).stdout(Stdio::null()).stderr(Stdio::null()).status();
            if !user.is_ok_and(|s| s.success()) {
                return Some(format!("running as root, PostgreSQL needs the `{OS_USER}` OS user to run as"));
            }
            let setpriv = Command::new("setpriv").arg("--version").stdout(Stdio::null()).status();
            if !setpriv.is_ok_and(|s| s.success()) {
                return Some("running as root, needs `setpriv` (util-linux) to run PostgreSQL as postgres".into());
            }
        }
        None
    }

    /// Creates a cluster and starts the server, waiting until it accepts connections. Panics (with the
    /// server's log) if it cannot; check [`TestPostgres::unavailable`] first.
    pub fn start() -> TestPostgres {
        let dir = tempfile::Builder::new().prefix("fogcdn-pg").tempdir().expect("tempdir");
        let mut pg = TestPostgres { dir, bin: bin_dir(), port: crate::free_port(), child: None, as_root: is_root() };
        if std::env::var_os("FOG_TEST_KEEP").is_some() {
            pg.dir.disable_cleanup(true);
            eprintln!("keeping {}", pg.dir.path().display());
        }
        if pg.as_root {
            let status = Command::new("chown").args([OS_USER, "--"]).arg(pg.dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "cannot chown {} to {OS_USER}", pg.dir.path().display());
        }
        let out = pg
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-instructions"])
            // The new cluster itself need not survive a power cut; the server below syncs as usual.
            .arg("--no-sync")
            .arg("-D")
            .arg(pg.data_dir())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.restart();
        pg
    }

    /// `program` from the server's bin directory, run as the server's OS user (as root) in the test's
    /// directory (a root-only working directory would make PostgreSQL complain).
    fn command(&self, program: &str) -> Command {
        as_server_user(&self.bin.join(program), self.as_root, self.dir.path())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log (stderr), appended to across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq key=value connection string for the `postgres` database (tokio-postgres parses it too).
    pub fn conn_str(&self) -> String {
        self.conn_str_db("postgres")
    }

    /// A connection string for database `db` (see [`TestPostgres::create_database`]).
    pub fn conn_str_db(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=5", self.port)
    }

    /// Runs `sql` with psql in the `postgres` database; returns its unaligned, tuples-only output. Panics
    /// with psql's message if the statement fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// [`TestPostgres::psql`] in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        psql(&self.bin, &format!("port={} dbname={db}", self.port), sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} failed: {e}"))
    }

    /// Creates an empty database, so that several stores can share one server without seeing each other.
    pub fn create_database(&self, db: &str) {
        assert!(db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "plain database names only: {db}");
        self.psql(&format!("CREATE DATABASE {db}"));
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the server (again) on the same data directory and port, and waits (up to 60 s) until it
    /// accepts connections. After [`TestPostgres::crash`] it first recovers from its WAL.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "the test PostgreSQL is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let socket_dir = self.dir.path().to_path_buf();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", &format!("port={}", self.port)])
            .args(["-c", &format!("unix_socket_directories={}", socket_dir.display())])
            // Durability is what the tests are about; small buffers because tests run several servers.
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=100", "-c", "logging_collector=off"])
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            // Its own process group: crash() and Drop signal the backends too.
            .process_group(0)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if self.accepts_connections() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("postgres exited with {status} before accepting connections; log:\n{}", self.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "postgres did not accept connections in 60 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn accepts_connections(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-t", "1"])
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGKILL to the postmaster and all its backends, as a crash would: clients' connections break at once
    /// and the server is down until [`TestPostgres::restart`]. Committed transactions survive (fsync is on).
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), "KILL");
            let _ = child.wait();
        }
    }

    /// A clean ("fast") shutdown: open transactions are rolled back, connections closed, then the server
    /// exits. Waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let _ = child.wait();
            // Backends exit before the postmaster does; anything left over goes with the group.
            signal_group(child.id(), "KILL");
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `sql` with psql as the `postgres` role at 127.0.0.1 and `conn` (libpq key=value pairs: port, dbname,
/// …); its unaligned, tuples-only output, or psql's message.
pub(crate) fn psql(bin: &Path, conn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(bin.join("psql"))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-d", &format!("host=127.0.0.1 user=postgres connect_timeout=5 {conn}"), "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// `program`, run as the server's OS user when `as_root` (PostgreSQL refuses root), in `dir`, stdin closed.
pub(crate) fn as_server_user(program: &Path, as_root: bool, dir: &Path) -> Command {
    let mut c = if as_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", OS_USER, "--regid", OS_USER, "--clear-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.current_dir(dir).stdin(Stdio::null());
    c
}

/// Sends `signal` to the process group `leader` leads.
pub(crate) fn signal_group(leader: u32, signal: &str) {
    let group = format!("-{leader}");
    let _ = Command::new("kill").args([&format!("-{signal}"), "--", &group]).stderr(Stdio::null()).status();
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.crash();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed row survives a crash of every server process, and the restarted server is reachable at the
    /// same connection string.
    #[test]
    fn committed_rows_survive_a_crash_and_restart() {
        if let Some(why) = TestPostgres::unavailable() {
            eprintln!("SKIPPED committed_rows_survive_a_crash_and_restart: {why}");
            return;
        }
        let mut pg = TestPostgres::start();
        pg.create_database("fog_t");
        pg.psql_db("fog_t", "CREATE TABLE t (v int); INSERT INTO t VALUES (7)");
        pg.crash();
        assert!(!pg.is_running());
        assert!(!pg.accepts_connections());
        pg.restart();
        assert_eq!(pg.psql_db("fog_t", "SELECT v FROM t"), "7");
        pg.stop();
        pg.restart();
        assert_eq!(pg.psql_db("fog_t", "SELECT count(*) FROM t"), "1");
        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "the data directory is removed on drop");
    }
}
