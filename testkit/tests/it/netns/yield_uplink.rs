//! A node gives way to its owner's uploads (issue #16, `--upload-priority`): a home whose uplink is a
//! 20 Mbit/s token bucket with 150 ms of buffer (`Lab::limit_uplink`, a bufferbloated modem), holding a
//! real fog-node (its QUIC port forwarded, so clients dial it directly) and the owner's own TCP uploads;
//! the origin, the tracker and the far end of the owner's uploads in the public network; clients
//! (`fog-loadgen`, 4 connections pulling warm chunks) in the client network.
//!
//! The owner uploads in two ways: a backup (bulk TCP, CUBIC, as fast as it goes) and a video call (TCP
//! paced at 8 Mbit/s). A UDP probe every 20 ms from the home through the uplink measures its queueing
//! delay (probe RTT − the idle path's RTT). Each is measured alone, then with the node serving at `low`
//! (LEDBAT++) and at `normal` (CUBIC), and the node alone. With `low`: the owner keeps ≥ 90 % of its solo
//! throughput, the median queueing delay stays within the controller's target plus [`DELAY_MARGIN`], and
//! the node alone uses ≥ 80 % of the uplink. `normal` is measured for contrast; only its direction is
//! asserted (the backup gets less, the call waits longer).
//!
//! The latecomer: the backup starts first and fills the buffer, then the clients connect, so that every
//! connection of the node first sees the uplink with the owner's standing queue in it (LEDBAT's known
//! weakness: that queue reads as base delay). Clients from the client network, which the node served in
//! the phases before, start from the base delay the node remembers for their address
//! (`fog_net::ledbat::PathMemory`), and the owner keeps ≥ 90 % again. Clients from an address the node never
//! served (the second home; the public network's address is the tracker's, whose reachability checks the node
//! answers) are the latecomer the memory cannot help: measured, and only asserted to leave
//! the owner more than a `normal` node does (docs/benchmarks.md). Each phase with the node at `low` also
//! reads its `fog_node_ledbat_*` metrics: it backed off for delay while the owner uploaded.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fog_net::ledbat::TARGET_DELAY;
use fog_testkit::harness::{bin, Proc};
use fog_testkit::netns::{Lab, Site};
use serde_json::Value;

use super::{start_origin_and_tracker, tail, Net};

const UPLINK_BITS_PER_SEC: u64 = 20_000_000;
const UPLINK_BUFFER: Duration = Duration::from_millis(150);
/// The owner's video call: 40 % of the uplink.
const CALL_BITS_PER_SEC: u64 = 8_000_000;
/// Where the node listens in the home, forwarded on the router.
const NODE_PORT: u16 = 7701;
const CLIENTS: usize = 4;
/// Seconds the node serves alone before the owner starts, so that it yields rather than arrives late.
const LEAD: u64 = 3;
/// Seconds of the owner's traffic before measuring (TCP's own slow start), then seconds measured.
const WARMUP: u64 = 3;
const MEASURE: u64 = 12;
/// Over the target, what the median queueing delay may show: the controller adds up to a packet a round
/// trip before it sees the queue, its delayed ACKs read as delay, and the delay lines (Python) jitter by
/// a millisecond or two.
const DELAY_MARGIN: Duration = Duration::from_millis(20);

/// The owner's side and its far end: `sink` (a TCP sink and UDP echo on one port, printing the port),
/// `upload HOST PORT WARMUP SECONDS BITS_PER_SEC` (0: as fast as TCP goes; prints the rate the sink
/// measured after the warm-up) and `probe HOST PORT WARMUP SECONDS` (prints RTT percentiles).
const OWNER_PY: &str = r#"
import json, socket, struct, sys, threading, time

def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data

def count(conn):
    warmup, seconds = struct.unpack("!dd", recv_exact(conn, 16))
    start = time.monotonic()
    measured = 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        if warmup <= time.monotonic() - start < warmup + seconds:
            measured += len(data)
    conn.sendall(json.dumps({"bits_per_sec": 8 * measured / seconds}).encode())
    conn.close()

def sink():
    tcp = socket.socket()
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(8)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    def echo():
        while True:
            data, peer = udp.recvfrom(64)
            udp.sendto(data, peer)
    threading.Thread(target=echo, daemon=True).start()
    print(port, flush=True)
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=count, args=(conn,), daemon=True).start()

def upload(host, port, warmup, seconds, rate):
    conn = socket.socket()
    # What the household's devices run (Windows, macOS, Android and Linux default to CUBIC), whatever this
    # host's default is.
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    conn.connect((host, port))
    conn.sendall(struct.pack("!dd", warmup, seconds))
    block = bytes(16384)
    start = time.monotonic()
    sent = 0
    # Past the sink's window, so that it ends while this still sends.
    while (now := time.monotonic()) - start < warmup + seconds + 1:
        if rate > 0 and sent * 8 > rate * (now - start):
            time.sleep(0.002)
            continue
        conn.sendall(block)
        sent += len(block)
    conn.shutdown(socket.SHUT_WR)
    reply = b""
    while more := conn.recv(4096):
        reply += more
    print(reply.decode(), flush=True)

def probe(host, port, warmup, seconds):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect((host, port))
    udp.settimeout(0.5)
    rtts = []
    start = time.monotonic()
    def receive():
        while time.monotonic() - start < warmup + seconds + 1:
            try:
                sent = struct.unpack("!d", udp.recv(64))[0]
            except (socket.timeout, ConnectionRefusedError):
                continue
            if sent - start >= warmup:
                rtts.append((time.monotonic() - sent) * 1000)
    receiver = threading.Thread(target=receive)
    receiver.start()
    while time.monotonic() - start < warmup + seconds:
        udp.send(struct.pack("!d", time.monotonic()))
        time.sleep(0.02)
    receiver.join()
    rtts.sort()
    pct = lambda p: rtts[min(len(rtts) - 1, int(len(rtts) * p))] if rtts else None
    print(json.dumps({"probes": len(rtts), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "min_ms": pct(0)}), flush=True)

mode, args = sys.argv[1], sys.argv[2:]
if mode == "sink":
    sink()
elif mode == "upload":
    upload(args[0], int(args[1]), float(args[2]), float(args[3]), float(args[4]))
else:
    probe(args[0], int(args[1]), float(args[2]), float(args[3]))
"#;

/// What the owner does during a phase.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Idle,
    Backup,
    Call,
}

/// Whether the node serves during a phase, and when its clients connect.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    Absent,
    /// [`LEAD`] seconds before the owner starts.
    First,
    /// [`LEAD`] seconds after the owner started, its clients in `Site`: the owner's queue is there before any
    /// of the node's connections.
    Late(Site),
    /// [`Node::First`], and [`LEAD`] seconds after the owner started more clients in `Site` join: their
    /// connections open onto the owner's queue while the first ones are sending.
    Joined(Site),
}

/// One phase's measurements: rates in bits/s, delays in ms.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    owner: Option<f64>,
    node: Option<f64>,
    /// Of the clients that joined ([`Node::Joined`]).
    joined: Option<f64>,
    rtt_p50: f64,
    rtt_p90: f64,
    /// What the node's LEDBAT++ controllers did during the phase, if it ran at `low`.
    ledbat: Option<Ledbat>,
}

/// The node's `fog_node_ledbat_*` metrics: counters (or their growth over a phase) and the latest delays.
#[derive(Debug, Default, Clone, Copy)]
struct Ledbat {
    backoffs: u64,
    slowdowns: u64,
    loss_reductions: u64,
    remembered_bases: u64,
    borrowed_bases: u64,
    base_ms: u64,
    queueing_ms: u64,
}

impl Ledbat {
    fn parse(metrics: &str) -> Ledbat {
        let get = |name: &str| {
            let line = metrics.lines().find(|l| l.split(' ').next() == Some(name));
            line.and_then(|l| l.split(' ').nth(1)?.parse().ok()).unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
        };
        Ledbat {
            backoffs: get("fog_node_ledbat_delay_backoffs_total"),
            slowdowns: get("fog_node_ledbat_slowdowns_total"),
            loss_reductions: get("fog_node_ledbat_loss_reductions_total"),
            remembered_bases: get("fog_node_ledbat_remembered_bases_total"),
            borrowed_bases: get("fog_node_ledbat_borrowed_bases_total"),
            base_ms: get("fog_node_ledbat_base_delay_ms"),
            queueing_ms: get("fog_node_ledbat_queueing_delay_ms"),
        }
    }

    /// The counters' growth since `before`, with the delays as they are now.
    fn since(self, before: Ledbat) -> Ledbat {
        Ledbat {
            backoffs: self.backoffs - before.backoffs,
            slowdowns: self.slowdowns - before.slowdowns,
            loss_reductions: self.loss_reductions - before.loss_reductions,
            remembered_bases: self.remembered_bases - before.remembered_bases,
            borrowed_bases: self.borrowed_bases - before.borrowed_bases,
            ..self
        }
    }
}

/// The owner's far end, killed with the test.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Home {
    net: Net,
    node: Option<Proc>,
    /// The node's `--upload-priority`.
    priority: &'static str,
    node_data: std::path::PathBuf,
    sink_port: u16,
    _sink: Sink,
}

impl Home {
    fn python(&self, site: Site, args: &[String]) -> Value {
        let mut all = vec!["-c".to_string(), OWNER_PY.to_string()];
        all.extend_from_slice(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = self.net.lab.exec(site, "python3", &all);
        assert!(out.status.success(), "python3 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"))
    }

    /// The node's LEDBAT++ metrics, from its status address.
    fn ledbat(&self) -> Ledbat {
        let addr = std::fs::read_to_string(self.node_data.join("status.addr")).expect("the node's status address");
        let url = format!("http://{}/metrics", addr.trim());
        let out = self.net.lab.exec(Site::Home1, "curl", &["-sS", "--max-time", "5", &url]);
        assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        Ledbat::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// (Re)starts the node in the home at `priority`, and waits until the tracker reaches it directly.
    async fn start_node(&mut self, priority: &'static str, forwarded: std::net::SocketAddr) {
        if let Some(mut old) = self.node.take() {
            let _ = old.terminate().await;
        }
        self.priority = priority;
        let args: Vec<String> = [
            "--tracker",
            &format!("http://{}", self.net.tracker),
            "--listen",
            &format!("0.0.0.0:{NODE_PORT}"),
            "--advertise",
            &forwarded.to_string(),
            "--status-listen",
            "127.0.0.1:0",
            "--data-dir",
            self.node_data.to_str().expect("utf8"),
            "--p2p-listen",
            "none",
            "--upload-priority",
            priority,
        ]
        .map(String::from)
        .to_vec();
        let log = self.net.dir.path().join(format!("node-{priority}.log"));
        let _ = std::fs::remove_file(self.node_data.join("status.addr"));
        self.node = Some(Proc::spawn_in(Some(&self.net.lab.ns(Site::Home1)), "fog-node", &args, log).await);
        let data = self.node_data.clone();
        self.net
            .wait("the node connected to the tracker and reached directly", Duration::from_secs(60), |n| {
                let connected = tracker_state(n, &data).is_some_and(|s| s == "connected");
                let s = n.stats();
                connected && s.nodes_healthy == 1 && s.nodes_by_client_path.get("direct") == Some(&1)
            })
            .await;
    }

    /// Runs one phase: the owner (and the probes) and the node's clients as `node` says, the owner
    /// measured for [`MEASURE`] seconds after a warm-up.
    fn phase(&self, owner: Owner, node: Node) -> Measured {
        let sink = (Site::Public.addr().to_string(), self.sink_port.to_string());
        // (clients' site, when they start after the phase does, seconds they pull), when the owner starts,
        // and the owner's warm-up: the node's clients pull until the owner's window ends.
        let (clients, owner_at, owner_warmup) = match node {
            Node::Absent => (vec![], 0, WARMUP),
            Node::First => (vec![(Site::Client, 0, LEAD + WARMUP + MEASURE - 1)], LEAD, WARMUP),
            Node::Late(site) => (vec![(site, LEAD, WARMUP + MEASURE)], 0, LEAD + WARMUP),
            Node::Joined(site) => {
                let first = (Site::Client, 0, 2 * LEAD + WARMUP + MEASURE - 1);
                (vec![first, (site, 2 * LEAD, WARMUP + MEASURE)], LEAD, LEAD + WARMUP)
            }
        };
        let window = [owner_warmup.to_string(), MEASURE.to_string()];
        let ledbat_before = (node != Node::Absent).then(|| self.ledbat());
        let measured = std::thread::scope(|scope| {
            let clients: Vec<_> = clients
                .into_iter()
                .map(|(site, after, seconds)| {
                    scope.spawn(move || {
                        std::thread::sleep(Duration::from_secs(after));
                        self.pull(site, seconds)
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs(owner_at));
            let probe = scope.spawn(|| {
                let args = ["probe".into(), sink.0.clone(), sink.1.clone(), window[0].clone(), window[1].clone()];
                self.python(Site::Home1, &args)
            });
            let rate = match owner {
                Owner::Idle => None,
                Owner::Backup => Some(0),
                Owner::Call => Some(CALL_BITS_PER_SEC),
            };
            let owner = rate.map(|rate| {
                let args = ["upload".into(), sink.0.clone(), sink.1.clone(), window[0].clone(), window[1].clone()];
                let mut args = args.to_vec();
                args.push(rate.to_string());
                self.python(Site::Home1, &args)["bits_per_sec"].as_f64().expect("owner rate")
            });
            let probe = probe.join().expect("probe");
            let mut rates = clients.into_iter().map(|c| c.join().expect("clients"));
            Measured {
                owner,
                node: rates.next(),
                joined: rates.next(),
                rtt_p50: probe["p50_ms"].as_f64().expect("probes answered"),
                rtt_p90: probe["p90_ms"].as_f64().expect("probes answered"),
                ledbat: None,
            }
        });
        // Read within the 10 s the node shows its last connection's delays for.
        let ledbat = ledbat_before.map(|before| self.ledbat().since(before));
        Measured { ledbat: ledbat.filter(|_| self.priority == "low"), ..measured }
    }

    /// [`CLIENTS`] `fog-loadgen` clients in `site` pull the object from the node for `seconds`, without an
    /// error; their goodput in bits/s.
    fn pull(&self, site: Site, seconds: u64) -> f64 {
        let tracker = format!("http://{}", self.net.tracker);
        let url = format!("http://{}/video.bin", self.net.origin);
        let (clients, secs) = (CLIENTS.to_string(), seconds.to_string());
        let loadgen = bin("fog-loadgen");
        let args = ["--clients", &clients, "--seconds", &secs, "quic", "--tracker", &tracker, &url];
        let out = self.net.lab.exec(site, loadgen.to_str().expect("utf8"), &args);
        assert!(out.status.success(), "fog-loadgen: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).expect("loadgen JSON");
        let node_log = self.node.as_ref().map(|n| tail(&n.log_text())).unwrap_or_default();
        assert_eq!(report["errors"].as_u64(), Some(0), "{report}; the node's log:\n{node_log}");
        report["bytes"].as_f64().expect("bytes") * 8.0 / seconds as f64
    }
}

/// The node's view of its tracker link, if its status page answers.
fn tracker_state(net: &Net, data: &Path) -> Option<String> {
    let addr = std::fs::read_to_string(data.join("status.addr")).ok()?;
    let out = net.lab.exec(Site::Home1, "curl", &["-sS", "--max-time", "5", &format!("http://{addr}/status")]);
    let status: Value = serde_json::from_slice(&out.stdout).ok()?;
    status["tracker"]["state"].as_str().map(String::from)
}

fn mbit(bits: Option<f64>) -> String {
    bits.map_or("—".into(), |b| format!("{:.1}", b / 1e6))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_node_gives_way_to_its_owners_uploads() {
    if let Some(why) = Lab::uplink_unavailable() {
        eprintln!("SKIPPED a_low_priority_node_gives_way_to_its_owners_uploads: {why}");
        return;
    }
    let lab = Lab::build();
    lab.limit_uplink(Site::Home1, UPLINK_BITS_PER_SEC, UPLINK_BUFFER);
    let forwarded = lab.forward_port(Site::Home1, NODE_PORT);
    let dir = fog_testkit::harness::test_dir("fogcdn-yield");
    let listen = format!("{}:0", Site::Public.addr());
    let (origin, tracker) = start_origin_and_tracker(&lab, &dir, 16, &listen, |origin| origin.addr.clone()).await;
    let mut sink = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Site::Public), "python3", "-c", OWNER_PY, "sink"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the owner's sink");
    let mut port = String::new();
    BufReader::new(sink.stdout.take().expect("stdout")).read_line(&mut port).expect("sink port");
    let net =
        Net { lab, origin: origin.addr.clone(), tracker: tracker.addr.clone(), procs: vec![origin, tracker], dir };
    let node_data = net.dir.path().join("node");
    let sink_port = port.trim().parse().expect("sink port");
    let mut home = Home { net, node: None, priority: "", node_data, sink_port, _sink: Sink(sink) };

    home.start_node("low", forwarded).await;
    home.net.fetch("cold");
    let warm = home.net.fetch("warm");
    assert_eq!(warm["origin_bytes"].as_u64(), Some(0), "the node did not keep the object: {warm}");

    let idle = home.phase(Owner::Idle, Node::Absent);
    let base = idle.rtt_p50;
    let mut rows = vec![("idle", idle)];
    for (name, owner, node) in [
        ("backup alone", Owner::Backup, Node::Absent),
        ("backup + node low", Owner::Backup, Node::First),
        ("backup, then node low (latecomer, returning clients)", Owner::Backup, Node::Late(Site::Client)),
        ("backup, then node low (latecomer, new clients)", Owner::Backup, Node::Late(Site::Home2)),
        ("call alone", Owner::Call, Node::Absent),
        ("call + node low", Owner::Call, Node::First),
        ("node low alone", Owner::Idle, Node::First),
    ] {
        rows.push((name, home.phase(owner, node)));
    }
    // Restarted, the node remembers no address: the second home's clients are new again, and join while the
    // client network's connections are sending.
    home.start_node("low", forwarded).await;
    let joined = "backup + node low, new clients join";
    rows.push((joined, home.phase(Owner::Backup, Node::Joined(Site::Home2))));
    home.start_node("normal", forwarded).await;
    for (name, owner, node) in [
        ("backup + node normal", Owner::Backup, Node::First),
        ("call + node normal", Owner::Call, Node::First),
        ("node normal alone", Owner::Idle, Node::First),
    ] {
        rows.push((name, home.phase(owner, node)));
    }
    eprintln!("uplink {} Mbit/s, {UPLINK_BUFFER:?} buffer; idle RTT {base:.1} ms", UPLINK_BITS_PER_SEC / 1_000_000);
    eprintln!(
        "| phase | owner Mbit/s | node Mbit/s | queueing p50 / p90 ms | LEDBAT++ back-offs / slowdowns / loss \
         reductions / remembered / borrowed bases; base / queueing delay ms |"
    );
    for (name, m) in &rows {
        let (q50, q90) = (m.rtt_p50 - base, m.rtt_p90 - base);
        let ledbat = m.ledbat.map_or("—".into(), |l| {
            let bases = format!("{} / {}", l.remembered_bases, l.borrowed_bases);
            let counts = format!("{} / {} / {} / {bases}", l.backoffs, l.slowdowns, l.loss_reductions);
            format!("{counts}; {} / {}", l.base_ms, l.queueing_ms)
        });
        let node = match m.joined {
            Some(joined) => format!("{} + {} joined", mbit(m.node), mbit(Some(joined))),
            None => mbit(m.node),
        };
        eprintln!("| {name} | {} | {node} | {q50:.1} / {q90:.1} | {ledbat} |", mbit(m.owner));
    }

    let get = |name: &str| rows.iter().find(|(n, _)| *n == name).map(|(_, m)| *m).expect("phase");
    let queueing = |name: &str| Duration::from_secs_f64((get(name).rtt_p50 - base).max(0.0) / 1000.0);
    let owner = |name: &str| get(name).owner.expect("owner rate");
    let limit = TARGET_DELAY + DELAY_MARGIN;
    let late = "backup, then node low (latecomer, returning clients)";
    let keeps = [("backup + node low", "backup alone"), (late, "backup alone"), (joined, "backup alone")];
    for (with, alone) in keeps.into_iter().chain([("call + node low", "call alone")]) {
        assert!(
            owner(with) >= 0.9 * owner(alone),
            "{with}: {} of {} Mbit/s",
            mbit(Some(owner(with))),
            mbit(Some(owner(alone)))
        );
    }
    for phase in ["call + node low", "node low alone"] {
        assert!(queueing(phase) <= limit, "{phase}: median queueing {:?} over {limit:?}", queueing(phase));
    }
    let node_alone = get("node low alone").node.expect("node rate");
    assert!(
        node_alone >= 0.8 * UPLINK_BITS_PER_SEC as f64,
        "the node alone used {} of {} Mbit/s",
        mbit(Some(node_alone)),
        UPLINK_BITS_PER_SEC / 1_000_000
    );
    // What the metrics show: the node backed off for the owner's queue, and slowed down in every phase.
    let ledbat = |name: &str| get(name).ledbat.expect("the node's LEDBAT++ metrics");
    assert!(ledbat("backup + node low").backoffs > 0, "{:?}", ledbat("backup + node low"));
    // The returning clients' connections started from the base delay measured before the owner's queue.
    assert!(ledbat(late).remembered_bases > 0, "{late}: {:?}", ledbat(late));
    // The joining clients' first connection took its base from the queueing the others measured.
    assert!(ledbat(joined).borrowed_bases > 0, "{joined}: {:?}", ledbat(joined));
    assert!(owner("backup + node normal") < owner("backup + node low"), "normal priority took no more from the backup");
    assert!(queueing("call + node normal") > queueing("call + node low"), "normal priority queued no more");
    // New clients meeting the owner's queue: measured 2026-12-02 at 70–80 % of the backup's solo rate
    // (docs/benchmarks.md), short of the 90 %: nothing the node measured says the queue is not the path's
    // (its first connection remembers the queue as base, and the next ones start from that). What holds: it
    // still gives way where a best-effort flow does not.
    let new = "backup, then node low (latecomer, new clients)";
    assert!(
        owner(new) > owner("backup + node normal"),
        "{new}: {} Mbit/s, no more than with the node at normal ({} Mbit/s)",
        mbit(Some(owner(new))),
        mbit(Some(owner("backup + node normal")))
    );
}
