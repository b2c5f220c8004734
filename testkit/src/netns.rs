//! A small Internet in network namespaces, for tests of the overlay across real NATs and firewalls. Two
//! topologies share the core router and the delay lines. [`Lab::build`], IPv4 only:
//!
//! ```text
//!                          core (router)
//!        5 ms /        15 ms |         25 ms |        \ 10 ms        (one-way delay of each access link)
//!      public          home1 router    home2 router     client
//!   10.77.1.2          10.77.2.2       10.77.3.2        10.77.4.2
//!                      MASQUERADE      MASQUERADE
//!                      192.168.1.2     192.168.2.2
//!                      home1           home2
//! ```
//!
//! [`Lab::build_dual_stack`], IPv4 and IPv6 (the IPv6 prefix looks global, as `fog_net::transport::is_global`
//! wants: documentation and unique-local addresses count as local):
//!
//! ```text
//!                                  core (router)
//!          5 ms /          20 ms |            15 ms |           10 ms |       \ 10 ms
//!        public           home6 router       home-dual router      client        client6
//!     10.77.1.2           (IPv6 only)        10.77.6.2             10.77.4.2     10.77.7.2
//!     2a0f:77:1::2        2a0f:77:5::2       2a0f:77:6::2          (IPv4 only)   2a0f:77:7::2
//!                         stateful firewall  MASQUERADE (IPv4),
//!                         (ip6tables)        IPv6 routed, open
//!                         2a0f:77:105::2     192.168.6.2, 2a0f:77:106::2
//!                         home6              home-dual
//! ```
//!
//! Home routers masquerade like consumer routers (outbound only; inbound packets pass only for flows the
//! inside started); home6's router does the same for IPv6 without translating (a stateful firewall, which
//! keeps ports: a simultaneous open gets through). Access links are delay lines (`testkit/netns/wire.py`, TUN
//! devices) rather than `tc netem`, which needs a kernel module not every kernel has. The RTT between two
//! sites is twice the sum of their one-way delays. Everything is removed when the [`Lab`] is dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One place a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Public,
    Home1,
    Home2,
    Client,
    /// IPv6 only, behind a stateful firewall (dual-stack lab).
    Home6,
    /// Behind an IPv4 NAT, with a global IPv6 address nothing filters (dual-stack lab).
    HomeDual,
    /// A client with both families (dual-stack lab).
    Client6,
}

/// What stands between a home and the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Router {
    /// Masquerades IPv4; routes IPv6 (if the home has it) without filtering.
    Nat,
    /// Routes IPv6, dropping inbound packets of flows the inside did not start.
    Firewall6,
}

impl Site {
    /// One-way delay of the site's access link.
    pub fn one_way_ms(self) -> f64 {
        match self {
            Site::Public => 5.0,
            Site::Home1 | Site::HomeDual => 15.0,
            Site::Home2 => 25.0,
            Site::Home6 => 20.0,
            Site::Client | Site::Client6 => 10.0,
        }
    }

    /// Round-trip time between two sites (through the core router).
    pub fn rtt_ms(self, other: Site) -> f64 {
        if self == other {
            0.0
        } else {
            2.0 * (self.one_way_ms() + other.one_way_ms())
        }
    }

    /// The address processes at this site have (behind NAT for homes): IPv4 where the site has it.
    pub fn addr(self) -> IpAddr {
        match self.ipv4() {
            Some(v4) => v4.into(),
            None => self.ipv6().expect("a site has an address").into(),
        }
    }

    /// The site's IPv4 address, if it has one (behind NAT for homes).
    pub fn ipv4(self) -> Option<Ipv4Addr> {
        match (self.router(), self.lan()) {
            (Some(Router::Nat), Some(lan)) => Some(Ipv4Addr::new(192, 168, lan, 2)),
            (Some(_), _) => None,
            (None, _) => Some(Ipv4Addr::new(10, 77, self.link(), 2)),
        }
    }

    /// The site's global IPv6 address in the dual-stack lab (in the IPv4 lab no site has one).
    pub fn ipv6(self) -> Option<Ipv6Addr> {
        match self {
            Site::Home1 | Site::Home2 | Site::Client => None,
            Site::Home6 | Site::HomeDual => Some(lan6(self.lan()?, 2)),
            Site::Public | Site::Client6 => Some(link6(self.link(), 2)),
        }
    }

    /// The number of its access link (and of the link's subnets).
    fn link(self) -> u8 {
        match self {
            Site::Public => 1,
            Site::Home1 => 2,
            Site::Home2 => 3,
            Site::Client => 4,
            Site::Home6 => 5,
            Site::HomeDual => 6,
            Site::Client6 => 7,
        }
    }

    /// The number of a home's LAN (and of its subnets).
    fn lan(self) -> Option<u8> {
        match self {
            Site::Home1 => Some(1),
            Site::Home2 => Some(2),
            Site::Home6 => Some(5),
            Site::HomeDual => Some(6),
            Site::Public | Site::Client | Site::Client6 => None,
        }
    }

    fn router(self) -> Option<Router> {
        match self {
            Site::Home1 | Site::Home2 | Site::HomeDual => Some(Router::Nat),
            Site::Home6 => Some(Router::Firewall6),
            Site::Public | Site::Client | Site::Client6 => None,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Site::Public => "pub",
            Site::Home1 => "h1",
            Site::Home2 => "h2",
            Site::Client => "cli",
            Site::Home6 => "h6",
            Site::HomeDual => "hd",
            Site::Client6 => "c6",
        }
    }
}

/// Address `host` on access link `link`'s IPv6 subnet (the core is `::1`).
fn link6(link: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2a0f, 0x77, link.into(), 0, 0, 0, 0, host)
}

/// Address `host` on home LAN `lan`'s IPv6 subnet (its router is `::1`).
fn lan6(lan: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2a0f, 0x77, 0x100 + u16::from(lan), 0, 0, 0, 0, host)
}

/// The namespaces, links and delay lines of one test.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    wire: Option<Child>,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `args` inside namespace `ns`.
fn run_in(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all);
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Labs built by this process so far: two labs of one process (tests run one after another, or not) never
/// share a name.
static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Why the IPv4 lab cannot be built on this machine, if it cannot (tests skip with this message).
    pub fn unavailable() -> Option<String> {
        Self::missing(&["ip", "iptables", "python3"])
    }

    /// Why the dual-stack lab cannot be built on this machine, if it cannot.
    pub fn dual_stack_unavailable() -> Option<String> {
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            return Some("needs a kernel with IPv6".into());
        }
        Self::missing(&["ip", "iptables", "ip6tables", "python3"])
    }

    fn missing(programs: &[&str]) -> Option<String> {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            return Some("needs root (network namespaces); run `sudo scripts/test.sh --netns`".into());
        }
        for program in programs {
            if !have(program) {
                return Some(format!("needs `{program}` (scripts/test.sh installs it)"));
            }
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Some("needs /dev/net/tun for the delay lines".into());
        }
        None
    }

    /// The namespace processes at `site` run in.
    pub fn ns(&self, site: Site) -> String {
        format!("{}{}", self.prefix, site.tag())
    }

    /// Builds the IPv4 topology above. Panics with the failing command if any step fails.
    pub fn build() -> Lab {
        Self::build_sites(&[Site::Public, Site::Home1, Site::Home2, Site::Client], false)
    }

    /// Builds the dual-stack topology above. Panics with the failing command if any step fails.
    pub fn build_dual_stack() -> Lab {
        Self::build_sites(&[Site::Public, Site::Home6, Site::HomeDual, Site::Client, Site::Client6], true)
    }

    /// `ipv6`: the sites that have an IPv6 address get it, and the core routes IPv6.
    fn build_sites(sites: &[Site], ipv6: bool) -> Lab {
        // Interface names are limited to 15 bytes: keep the prefix short and unique per process and lab.
        let prefix = format!("f{}x{}", std::process::id() % 100_000, LABS.fetch_add(1, Ordering::Relaxed));
        let mut lab = Lab { prefix: prefix.clone(), namespaces: Vec::new(), wire: None };
        let has_v6 = |site: Site| ipv6 && site.ipv6().is_some();
        let core = format!("{prefix}core");
        let homes: Vec<Site> = sites.iter().copied().filter(|s| s.router().is_some()).collect();
        let router_ns = |lab: &Lab, site: Site| format!("{}r", lab.ns(site));
        let mut all: Vec<String> = vec![core.clone()];
        all.extend(sites.iter().map(|s| lab.ns(*s)));
        all.extend(homes.iter().map(|s| router_ns(&lab, *s)));
        for ns in &all {
            run(&["ip", "netns", "add", ns]);
            lab.namespaces.push(ns.clone());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            if ipv6 {
                // Static addresses need no duplicate detection, which would hold them back for a second.
                run_in(ns, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]);
            }
        }
        let mut forwarders = vec![core.clone()];
        forwarders.extend(homes.iter().map(|s| router_ns(&lab, *s)));
        for ns in &forwarders {
            run_in(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            if ipv6 {
                run_in(ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            }
        }

        // Access links: a delay line between the site's edge namespace (a home's router) and the core.
        let edge = |lab: &Lab, site: Site| if site.router().is_some() { router_ns(lab, site) } else { lab.ns(site) };
        let mut wire_args: Vec<String> = Vec::new();
        for site in sites {
            let net = site.link();
            wire_args.extend([format!("{prefix}e{net}"), format!("{prefix}c{net}"), site.one_way_ms().to_string()]);
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("netns/wire.py");
        let mut wire = Command::new("python3")
            .arg(&script)
            .args(&wire_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the delay lines");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(wire.stdout.take().expect("stdout")), &mut ready)
            .expect("read from the delay lines");
        lab.wire = Some(wire);
        assert_eq!(ready.trim(), "ready", "delay lines did not start");
        for site in sites {
            let (net, edge) = (site.link(), edge(&lab, *site));
            let (edge_dev, core_dev) = (format!("{prefix}e{net}"), format!("{prefix}c{net}"));
            run(&["ip", "link", "set", &edge_dev, "netns", &edge]);
            run(&["ip", "link", "set", &core_dev, "netns", &core]);
            // Subnet addresses, not `peer` ones: on point-to-point links interface watchers (libp2p's
            // if-watch among them) report the peer's address as the interface's own.
            let has_v4 = site.ipv4().is_some();
            if has_v4 {
                run(&["ip", "-n", &edge, "addr", "add", &format!("10.77.{net}.2/24"), "dev", &edge_dev]);
                run(&["ip", "-n", &core, "addr", "add", &format!("10.77.{net}.1/24"), "dev", &core_dev]);
            }
            if has_v6(*site) {
                let (edge_ip, core_ip) = (format!("{}/64", link6(net, 2)), format!("{}/64", link6(net, 1)));
                run(&["ip", "-n", &edge, "addr", "add", &edge_ip, "dev", &edge_dev, "nodad"]);
                run(&["ip", "-n", &core, "addr", "add", &core_ip, "dev", &core_dev, "nodad"]);
            }
            run(&["ip", "-n", &edge, "link", "set", &edge_dev, "up"]);
            run(&["ip", "-n", &core, "link", "set", &core_dev, "up"]);
            if has_v4 {
                run(&["ip", "-n", &edge, "route", "add", "default", "dev", &edge_dev]);
            }
            if has_v6(*site) {
                run(&["ip", "-n", &edge, "-6", "route", "add", "default", "dev", &edge_dev]);
            }
        }

        // Homes: a LAN behind each router, which masquerades (IPv4) or only filters (IPv6) and drops
        // unsolicited inbound traffic.
        for &site in &homes {
            let (router, home) = (router_ns(&lab, site), lab.ns(site));
            let n = site.lan().expect("a home has a LAN");
            let (lan_r, lan_h) = (format!("{prefix}l{n}"), format!("{prefix}h{n}"));
            let wan = format!("{prefix}e{}", site.link());
            run(&[
                "ip", "link", "add", &lan_r, "netns", &router, "type", "veth", "peer", "name", &lan_h, "netns", &home,
            ]);
            run(&["ip", "-n", &router, "link", "set", &lan_r, "up"]);
            run(&["ip", "-n", &home, "link", "set", &lan_h, "up"]);
            if site.ipv4().is_some() {
                run(&["ip", "-n", &router, "addr", "add", &format!("192.168.{n}.1/24"), "dev", &lan_r]);
                run(&["ip", "-n", &home, "addr", "add", &format!("192.168.{n}.2/24"), "dev", &lan_h]);
                run(&["ip", "-n", &home, "route", "add", "default", "via", &format!("192.168.{n}.1")]);
                run_in(&router, &["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", &wan, "-j", "MASQUERADE"]);
                drop_unsolicited(&router, "iptables", &wan);
            }
            if has_v6(site) {
                run(&["ip", "-n", &router, "addr", "add", &format!("{}/64", lan6(n, 1)), "dev", &lan_r, "nodad"]);
                run(&["ip", "-n", &home, "addr", "add", &format!("{}/64", lan6(n, 2)), "dev", &lan_h, "nodad"]);
                run(&["ip", "-n", &home, "-6", "route", "add", "default", "via", &lan6(n, 1).to_string()]);
                let core_dev = format!("{prefix}c{}", site.link());
                run(&["ip", "-n", &core, "-6", "route", "add", &format!("{}/64", lan6(n, 0)), "dev", &core_dev]);
                if site.router() == Some(Router::Firewall6) {
                    drop_unsolicited(&router, "ip6tables", &wan);
                }
            }
        }
        lab
    }

    /// Runs `program args` in `site`'s namespace and returns its output.
    pub fn exec(&self, site: Site, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(site), program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {site:?}: {e}"))
    }
}

/// Makes `router`'s `table` (`iptables` or `ip6tables`) pass inbound packets from `wan` only for flows the
/// inside started, like a consumer router: to the inside, and to the router itself. The latter matters to
/// hole punching between two homes: a punch packet that reached the router's own stack unasked would be
/// answered (ICMP) and leave a conntrack entry for its flow, which makes the router masquerade the inside's
/// own packets of that flow from another port, which the other home's router then drops.
fn drop_unsolicited(router: &str, table: &str, wan: &str) {
    for chain in ["FORWARD", "INPUT"] {
        let established =
            ["-A", chain, "-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"];
        for rule in [&established[..], &["-A", chain, "-i", wan, "-j", "DROP"]] {
            let mut args = vec![table];
            args.extend_from_slice(rule);
            run_in(router, &args);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut wire) = self.wire.take() {
            let _ = wire.kill();
            let _ = wire.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// A home's uplink as a bottleneck, and a port forwarded to the home (`yield_uplink`, issue #16).
impl Lab {
    /// Why a home's uplink cannot be rate-limited on this machine, if it cannot.
    pub fn uplink_unavailable() -> Option<String> {
        Self::unavailable().or_else(|| (!have("tc")).then(|| "needs `tc` (iproute2)".into()))
    }

    /// Makes `home`'s uplink (its router's egress towards the core) a `rate_bits_per_sec` bottleneck that
    /// queues up to `buffer` of traffic before dropping, like a home modem's: a token bucket (`tc tbf`,
    /// which this kernel has, unlike `netem`) with a FIFO of that many bytes.
    pub fn limit_uplink(&self, home: Site, rate_bits_per_sec: u64, buffer: std::time::Duration) {
        assert!(home.router().is_some(), "{home:?} is not a home");
        let bytes_per_sec = rate_bits_per_sec / 8;
        // One millisecond of tokens, and never less than two full packets.
        let burst = (bytes_per_sec / 1000).max(3000);
        let limit = (bytes_per_sec as f64 * buffer.as_secs_f64()) as u64 + burst;
        let (router, wan) = (format!("{}r", self.ns(home)), format!("{}e{}", self.prefix, home.link()));
        let (rate, burst, limit) = (format!("{rate_bits_per_sec}bit"), burst.to_string(), limit.to_string());
        let tbf = ["root", "tbf", "rate", &rate, "burst", &burst, "limit", &limit];
        run(&[&["tc", "-n", &router, "qdisc", "replace", "dev", &wan][..], &tbf].concat());
    }

    /// Forwards `port` (UDP and TCP) on `home`'s router to the same port of the home's host, as an owner
    /// does for a node; returns the address the rest of the lab reaches it at.
    pub fn forward_port(&self, home: Site, port: u16) -> std::net::SocketAddr {
        assert_eq!(home.router(), Some(Router::Nat), "{home:?} is not behind a NAT");
        let inside = home.ipv4().expect("a NAT home has IPv4").to_string();
        let (router, wan) = (format!("{}r", self.ns(home)), format!("{}e{}", self.prefix, home.link()));
        let port_text = port.to_string();
        let to = format!("{inside}:{port}");
        for proto in ["udp", "tcp"] {
            let matching = ["-i", &wan, "-p", proto, "--dport", &port_text];
            let dnat = [&["iptables", "-t", "nat", "-A", "PREROUTING"][..], &matching, &["-j", "DNAT"]];
            run_in(&router, &[&dnat.concat()[..], &["--to-destination", &to]].concat());
            // Ahead of the rule that drops what the inside did not ask for.
            let accept = [&["iptables", "-I", "FORWARD", "1"][..], &matching, &["-d", &inside, "-j", "ACCEPT"]];
            run_in(&router, &accept.concat());
        }
        (Ipv4Addr::new(10, 77, home.link(), 2), port).into()
    }
}
