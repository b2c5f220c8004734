//! A small Internet in network namespaces, for tests of the overlay across real NATs:
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
//! Home routers masquerade like consumer routers (outbound only; inbound packets pass only for flows the
//! inside started). Access links are delay lines (`testkit/netns/wire.py`, TUN devices) rather than
//! `tc netem`, which needs a kernel module not every kernel has. The RTT between two sites is twice the sum
//! of their one-way delays. Everything is removed when the [`Lab`] is dropped.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One place a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Public,
    Home1,
    Home2,
    Client,
}

impl Site {
    /// One-way delay of the site's access link.
    pub fn one_way_ms(self) -> f64 {
        match self {
            Site::Public => 5.0,
            Site::Home1 => 15.0,
            Site::Home2 => 25.0,
            Site::Client => 10.0,
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

    /// The address processes at this site have (behind NAT for homes).
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Site::Public => Ipv4Addr::new(10, 77, 1, 2),
            Site::Home1 => Ipv4Addr::new(192, 168, 1, 2),
            Site::Home2 => Ipv4Addr::new(192, 168, 2, 2),
            Site::Client => Ipv4Addr::new(10, 77, 4, 2),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Site::Public => "pub",
            Site::Home1 => "h1",
            Site::Home2 => "h2",
            Site::Client => "cli",
        }
    }
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

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Lab {
    /// Why the lab cannot be built on this machine, if it cannot (tests skip with this message).
    pub fn unavailable() -> Option<String> {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            return Some("needs root (network namespaces); run `sudo scripts/test.sh --netns`".into());
        }
        for program in ["ip", "iptables", "python3"] {
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

    /// Builds the topology above. Panics with the failing command if any step fails.
    pub fn build() -> Lab {
        // Interface names are limited to 15 bytes: keep the prefix short and unique per process.
        let prefix = format!("f{}", std::process::id() % 100_000);
        let mut lab = Lab { prefix: prefix.clone(), namespaces: Vec::new(), wire: None };
        let core = format!("{prefix}core");
        let routers = [(Site::Home1, 1u8), (Site::Home2, 2u8)];
        let mut all: Vec<String> = vec![core.clone()];
        for site in [Site::Public, Site::Home1, Site::Home2, Site::Client] {
            all.push(lab.ns(site));
        }
        for (site, _) in routers {
            all.push(format!("{}r", lab.ns(site)));
        }
        for ns in &all {
            run(&["ip", "netns", "add", ns]);
            lab.namespaces.push(ns.clone());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for ns in [core.clone(), format!("{}r", lab.ns(Site::Home1)), format!("{}r", lab.ns(Site::Home2))] {
            run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }

        // Access links: a delay line between the site's edge namespace and the core.
        let links: Vec<(Site, String, u8)> = vec![
            (Site::Public, lab.ns(Site::Public), 1),
            (Site::Home1, format!("{}r", lab.ns(Site::Home1)), 2),
            (Site::Home2, format!("{}r", lab.ns(Site::Home2)), 3),
            (Site::Client, lab.ns(Site::Client), 4),
        ];
        let mut wire_args: Vec<String> = Vec::new();
        for (site, _, net) in &links {
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
        for (_, edge, net) in &links {
            let (edge_dev, core_dev) = (format!("{prefix}e{net}"), format!("{prefix}c{net}"));
            let (edge_ip, core_ip) = (format!("10.77.{net}.2"), format!("10.77.{net}.1"));
            run(&["ip", "link", "set", &edge_dev, "netns", edge]);
            run(&["ip", "link", "set", &core_dev, "netns", &core]);
            // Subnet addresses, not `peer` ones: on point-to-point links interface watchers (libp2p's
            // if-watch among them) report the peer's address as the interface's own.
            run(&["ip", "-n", edge, "addr", "add", &format!("{edge_ip}/24"), "dev", &edge_dev]);
            run(&["ip", "-n", &core, "addr", "add", &format!("{core_ip}/24"), "dev", &core_dev]);
            run(&["ip", "-n", edge, "link", "set", &edge_dev, "up"]);
            run(&["ip", "-n", &core, "link", "set", &core_dev, "up"]);
            run(&["ip", "-n", edge, "route", "add", "default", "dev", &edge_dev]);
        }

        // Homes: a LAN behind each router, which masquerades and drops unsolicited inbound traffic.
        for (site, n) in routers {
            let (router, home) = (format!("{}r", lab.ns(site)), lab.ns(site));
            let (lan_r, lan_h) = (format!("{prefix}l{n}"), format!("{prefix}h{n}"));
            let wan = format!("{prefix}e{}", n + 1);
            run(&[
                "ip", "link", "add", &lan_r, "netns", &router, "type", "veth", "peer", "name", &lan_h, "netns", &home,
            ]);
            run(&["ip", "-n", &router, "addr", "add", &format!("192.168.{n}.1/24"), "dev", &lan_r]);
            run(&["ip", "-n", &home, "addr", "add", &format!("192.168.{n}.2/24"), "dev", &lan_h]);
            run(&["ip", "-n", &router, "link", "set", &lan_r, "up"]);
            run(&["ip", "-n", &home, "link", "set", &lan_h, "up"]);
            run(&["ip", "-n", &home, "route", "add", "default", "via", &format!("192.168.{n}.1")]);
            let ipt = |rule: &[&str]| {
                let mut args = vec!["ip", "netns", "exec", &router, "iptables"];
                args.extend_from_slice(rule);
                run(&args);
            };
            ipt(&["-t", "nat", "-A", "POSTROUTING", "-o", &wan, "-j", "MASQUERADE"]);
            ipt(&["-A", "FORWARD", "-i", &wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]);
            ipt(&["-A", "FORWARD", "-i", &wan, "-j", "DROP"]);
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
