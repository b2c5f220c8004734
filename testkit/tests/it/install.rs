//! Installing a node as a service (issue #16): `scripts/install-node.sh` and the fogcdn-node .deb install
//! into a throwaway root on this Debian machine (never the real system): the binary, the hardened unit
//! (checked with `systemd-analyze verify`), the `fogcdn` user, the state directory and a commented
//! /etc/fogcdn/node.toml the binary wrote from its own options. The installed binary then runs with the
//! installed configuration against a real tracker, and uninstalling leaves nothing but the data kept at
//! the owner's choice. Needs root (users and ownership); without it the tests skip, saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fog_testkit::harness::{bin, target_dir, test_dir, Cluster, ClusterOptions};

/// The cargo-deb that scripts/test.sh installs (pinned there, CARGO_DEB_VERSION).
const CARGO_DEB: &str = ".cache/fogcdn/tools/bin/cargo-deb";
const SEEDED: [&str; 4] = ["passwd", "group", "shadow", "gshadow"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Why this machine cannot run the install tests, if it cannot.
fn cannot_install() -> Option<&'static str> {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        return Some("needs root (it adds a user and sets ownership, inside a throwaway root)");
    }
    for tool in ["useradd", "systemctl", "systemd-analyze", "dpkg"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status();
        if !found.is_ok_and(|s| s.success()) {
            return Some("needs useradd, systemctl, systemd-analyze and dpkg (Debian's passwd, systemd and dpkg)");
        }
    }
    None
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A throwaway system root holding copies of this system's user databases (what useradd edits).
fn throwaway_root() -> (tempfile::TempDir, PathBuf) {
    let dir = test_dir("fogcdn-install");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("root/etc");
    for f in SEEDED {
        std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f)).expect("seed user databases");
    }
    (dir, root)
}

/// Every file and link under `root`, relative, leaving out the backups useradd keeps (`etc/passwd-`).
fn files(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root").display().to_string();
                if !rel.ends_with('-') {
                    out.insert(rel);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn user_in(root: &Path) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"fogcdn")).then(|| (f[2].parse().expect("uid"), f[3].parse().expect("gid")))
    })
}

/// What an install must have put in `root`: the user, the state directory it owns, the configuration the
/// binary wrote from its own options, the enabled unit, which `systemd-analyze verify` accepts.
fn check_installed(root: &Path, binary: &str, unit: &str, tracker: Option<&str>) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (uid, gid) = user_in(root).expect("the fogcdn user was added to the root's passwd");
    let state = std::fs::metadata(root.join("var/lib/fogcdn")).expect("state directory");
    assert_eq!((state.uid(), state.gid(), state.permissions().mode() & 0o777), (uid, gid, 0o750));
    let installed = root.join(binary.trim_start_matches('/'));
    assert!(std::fs::metadata(&installed).expect("binary").permissions().mode() & 0o111 != 0);

    // The configuration is the binary's own listing of its options, with the state directory and tracker.
    let config = std::fs::read_to_string(root.join("etc/fogcdn/node.toml")).expect("node.toml");
    let mut print = Command::new(&installed);
    print.env_clear().args(["--print-config", "--commented", "--data-dir", "/var/lib/fogcdn"]);
    if let Some(t) = tracker {
        print.args(["--tracker", t]);
    }
    let expected = run(&mut print).stdout;
    assert_eq!(config, String::from_utf8_lossy(&expected), "node.toml is not what the binary prints");
    for key in ["data_dir = \"/var/lib/fogcdn\"", "# cache_size = ", "# upload_limit = "] {
        assert!(config.contains(key), "{key} missing from node.toml:\n{config}");
    }

    let unit_text = std::fs::read_to_string(root.join(unit.trim_start_matches('/'))).expect("unit");
    assert!(unit_text.contains(&format!("\nExecStart={binary} --config /etc/fogcdn/node.toml\n")), "{unit_text}");
    for directive in [
        "User=fogcdn",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "StateDirectory=fogcdn",
        "Restart=on-failure",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    ] {
        assert!(unit_text.lines().any(|l| l == directive), "{directive} missing from the unit");
    }
    let wants = root.join("etc/systemd/system/multi-user.target.wants/fog-node.service");
    assert!(wants.symlink_metadata().is_ok(), "the unit is not enabled");

    // systemd does not run here: verify the unit file as installed, with its binary at its place in the
    // root (verify checks that ExecStart is executable).
    let dir = tempfile::tempdir().expect("tempdir");
    let check = dir.path().join("fog-node.service");
    std::fs::write(
        &check,
        unit_text.replace(&format!("ExecStart={binary} "), &format!("ExecStart={} ", installed.display())),
    )
    .expect("unit copy");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&check));
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(complaints.trim().is_empty(), "systemd-analyze verify complains:\n{complaints}");
}

/// Starts the installed binary with the installed configuration (the state directory and addresses moved
/// into the test's reach) and waits until the tracker counts it healthy; then stops it.
async fn start_installed(root: &Path, binary: &str, cluster: &Cluster, log: &Path) {
    let data = root.join("var/lib/fogcdn");
    let mut child = Command::new(root.join(binary.trim_start_matches('/')))
        .arg("--config")
        .arg(root.join("etc/fogcdn/node.toml"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0", "--p2p-listen", "none"])
        .env_remove("FOG_NODE_TRACKER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("start the installed fog-node");
    let started = Instant::now();
    while cluster.stats().await.nodes_healthy < 1 {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        assert!(child.try_wait().expect("wait").is_none(), "the installed node exited:\n{log}");
        assert!(started.elapsed() < Duration::from_secs(30), "the installed node never became healthy:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "the installed node did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(data.join("node.key").exists() && data.join("earnings").exists(), "it kept its state elsewhere");
}

/// The seeded user databases are as they were: the user and its group are gone again.
fn check_users_restored(root: &Path) {
    for f in SEEDED {
        let now = std::fs::read(root.join("etc").join(f)).expect("read");
        assert!(now == std::fs::read(Path::new("/etc").join(f)).expect("read"), "etc/{f} differs after uninstall");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_script_installs_runs_and_uninstalls() {
    if let Some(why) = cannot_install() {
        eprintln!("skipped: the install test {why}");
        return;
    }
    let cluster = Cluster::start(ClusterOptions { nodes: 0, ..Default::default() }).await;
    let (dir, root) = throwaway_root();
    let before = files(&root);
    let script = repo().join("scripts/install-node.sh");
    let install = || {
        let mut c = Command::new(&script);
        c.arg("--root").arg(&root).arg("--binary").arg(bin("fog-node")).args(["--tracker", &cluster.tracker_url()]);
        c
    };
    run(&mut install());
    let tracker = cluster.tracker_url();
    check_installed(&root, "/usr/local/bin/fog-node", "/etc/systemd/system/fog-node.service", Some(&tracker));
    start_installed(&root, "/usr/local/bin/fog-node", &cluster, &dir.path().join("node.log")).await;

    // Uninstalled keeping the cache: the data directory is all that is left.
    run(Command::new(&script).arg("--uninstall").arg("--keep-cache").arg("--root").arg(&root));
    check_users_restored(&root);
    let left: Vec<String> = files(&root).difference(&before).cloned().collect();
    assert!(!left.is_empty() && left.iter().all(|f| f.starts_with("var/lib/fogcdn/")), "{left:?}");
    assert!(root.join("var/lib/fogcdn/node.key").exists());

    // Reinstalled, the kept data belongs to the new user; purged, nothing is left.
    run(&mut install());
    let (uid, _) = user_in(&root).expect("user");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(root.join("var/lib/fogcdn/node.key")).expect("key").uid(), uid);
    run(Command::new(&script).arg("--uninstall").arg("--purge").arg("--root").arg(&root));
    check_users_restored(&root);
    let left: Vec<String> = files(&root).difference(&before).cloned().collect();
    assert!(left.is_empty(), "left behind after --purge: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deb_installs_runs_removes_and_purges() {
    if let Some(why) = cannot_install() {
        eprintln!("skipped: the .deb test {why}");
        return;
    }
    let cargo_deb = Path::new(&std::env::var("HOME").unwrap_or_default()).join(CARGO_DEB);
    if !cargo_deb.exists() {
        eprintln!("skipped: the .deb test needs cargo-deb at {} (scripts/test.sh installs it)", cargo_deb.display());
        return;
    }
    let (dir, root) = throwaway_root();
    // The workspace's release binary as it is: no build in another profile. Stripped (debug line tables
    // make it ~500 MB) and lightly compressed: a few seconds.
    let out_dir = dir.path().join("deb");
    run(Command::new(&cargo_deb)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir().parent().expect("target dir"))
        .args(["-p", "fog-node", "--no-build", "--strip", "--fast", "--output"])
        .arg(&out_dir));
    let deb = std::fs::read_dir(&out_dir).expect("deb dir").flatten().map(|e| e.path()).next().expect("a .deb");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).expect("dpkg database");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    let before = files(&root);
    // Maintainer scripts run here with DPKG_ROOT set (they honour it), not chrooted into a root without a
    // shell; the throwaway root has none of the package's dependencies installed.
    let dpkg = |action: &str| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display())).args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            action,
        ]);
        c
    };
    let cluster = Cluster::start(ClusterOptions { nodes: 0, ..Default::default() }).await;
    run(dpkg("-i").arg(&deb));
    // The package's configuration names no tracker (the owner sets one): set the test's, as an owner would.
    check_installed(&root, "/usr/bin/fog-node", "/usr/lib/systemd/system/fog-node.service", None);
    let config = root.join("etc/fogcdn/node.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}tracker = \"{}\"\n", cluster.tracker_url())).expect("set the tracker");
    start_installed(&root, "/usr/bin/fog-node", &cluster, &dir.path().join("node.log")).await;

    // Removed: the program goes; data, configuration and user stay (a reinstall is the same node).
    run(dpkg("-r").arg("fogcdn-node"));
    assert!(!root.join("usr/bin/fog-node").exists() && !root.join("usr/lib/systemd/system/fog-node.service").exists());
    assert!(root.join("var/lib/fogcdn/node.key").exists() && root.join("etc/fogcdn/node.toml").exists());
    assert!(user_in(&root).is_some());
    // Purged: nothing is left.
    run(dpkg("-P").arg("fogcdn-node"));
    check_users_restored(&root);
    let left: Vec<String> =
        files(&root).difference(&before).filter(|f| !f.starts_with("var/lib/dpkg/")).cloned().collect();
    assert!(left.is_empty(), "left behind after purge: {left:?}");
}
