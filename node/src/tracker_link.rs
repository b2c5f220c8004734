//! Registration and heartbeats. The tracker is not on the data path: while it is unreachable the node keeps
//! serving with the origin list it last received (persisted in `origins.json`).
//!
//! With several tracker URLs (`--tracker A,B,…`: replicas of one cell, sharing the registry) every exchange
//! goes through the client's failover policy ([`fog_net::trackers`]). Moving to another replica is no reason
//! to register again: the node does only when a heartbeat's answer says the tracker does not know it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::backoff::Backoff;
use fog_net::origin::SharedOrigins;
use fog_net::tracker::{CurrentTracker, TrackerClient, TrackerError};
use fog_net::transport;
use fog_proto::api::{
    CellDelta, CellList, ErrorCode, Families, Heartbeat, Membership, OverlayReport, PeerContact, Register, Rendezvous,
    Signed, KIND_HEARTBEAT, KIND_MEMBERSHIP, KIND_REGISTER, MAX_QUIC_ADDRS,
};
use fog_proto::origins::OriginList;
use fog_proto::rtt::RttFilter;
use tokio::sync::watch;

use crate::overlay::Overlay;
use crate::rendezvous::{SharedAttachment, SharedMembership};
use crate::serve::Server;

/// How the conversation with the tracker is going, for the status page.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    pub registered: bool,
    pub last_ok: Option<Instant>,
    /// The latest failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Set when the tracker refuses this node (blocked, bad clock): retrying alone will not help.
    pub refused: Option<String>,
    pub advertised: Option<SocketAddr>,
    /// The key the tracker signs ledger heads with (learned at registration).
    pub tracker_key: Option<fog_proto::NodeId>,
    /// Whether the tracker could dial this node's QUIC address in every family it advertised (learned at
    /// registration, updated by heartbeats).
    pub reachable: Option<bool>,
    /// The other addresses heartbeats advertise, and those of all the tracker's dial-backs reached.
    pub more_addrs: Vec<SocketAddr>,
    pub verified_addrs: Vec<SocketAddr>,
    /// Filtered RTT to the tracker.
    pub rtt_ms: Option<f32>,
    /// The tracker URL exchanges go to now, and how often that changed.
    pub tracker: Option<CurrentTracker>,
}

pub type SharedLinkState = Arc<Mutex<LinkState>>;

/// Where clients may dial this node besides the address it registers at.
#[derive(Debug, Clone)]
pub enum MoreAddrs {
    /// The rest of `--advertise`.
    Named(Vec<SocketAddr>),
    /// This host's global addresses (looked up again for each heartbeat: an IPv6 prefix may change) on the
    /// QUIC port, in the families the QUIC socket serves.
    Discover { port: u16, families: Families },
}

impl MoreAddrs {
    /// For a QUIC socket bound to `local`: discovery when it is bound to an unspecified address (`[::]`
    /// serves both families, `0.0.0.0` IPv4), none when bound to one address.
    pub fn discover(local: SocketAddr) -> Self {
        let families = match local.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => Families::BOTH,
            IpAddr::V4(ip) if ip.is_unspecified() => Families { ipv4: true, ipv6: false },
            _ => Families::default(),
        };
        Self::Discover { port: local.port(), families }
    }

    /// The families clients may dial the QUIC socket in, `registered` being the address it registers at.
    fn serving_families(&self, registered: SocketAddr) -> Families {
        match self {
            Self::Named(addrs) => {
                addrs.iter().fold(Families::of(registered.ip()), |f, a| f.union(Families::of(a.ip())))
            }
            Self::Discover { .. } if registered.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) => Families::BOTH,
            Self::Discover { .. } => Families::of(registered.ip()),
        }
    }

    fn now(&self) -> Vec<SocketAddr> {
        let mut addrs = match self {
            Self::Named(addrs) => addrs.clone(),
            Self::Discover { port, families } => transport::global_addrs()
                .into_iter()
                .map(|ip| SocketAddr::new(ip, *port))
                .filter(|a| families.allows(a))
                .collect(),
        };
        addrs.truncate(MAX_QUIC_ADDRS);
        addrs
    }
}

#[derive(Debug)]
pub struct TrackerLink {
    pub state: SharedLinkState,
    pub tracker: TrackerClient,
    pub key: SigningKey,
    pub quic_addr: SocketAddr,
    pub more_addrs: MoreAddrs,
    pub server: Arc<Server>,
    pub origins: SharedOrigins,
    pub origins_file: PathBuf,
    pub upload_limit: Option<u64>,
    pub region: Option<String>,
    pub overlay: Option<Overlay>,
    /// `Some(candidates)` while this node needs a rendezvous (see `rendezvous::attach_forever`).
    pub nat_plan: watch::Sender<Option<Vec<Rendezvous>>>,
    pub attachment: SharedAttachment,
    /// The tracker's word that this node registered, for rendezvous; and when to register again for a
    /// fresh one (half its lifetime).
    pub membership: SharedMembership,
    pub renew_membership_ms: Mutex<Option<u64>>,
    /// The tracker last heard that this node is joining (so it is not scheduled until told otherwise).
    pub told_joining: AtomicBool,
    pub tracker_rtt: Mutex<RttFilter>,
}

pub(crate) use fog_proto::api::now_ms;

/// Loads the origin list saved from the last tracker contact, if any.
pub fn load_origins(path: &std::path::Path) -> OriginList {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

impl TrackerLink {
    fn update_origins(&self, list: OriginList) {
        let changed = *self.origins.read().expect("origins lock") != list;
        if !changed {
            return;
        }
        tracing::info!(origins = ?list.prefixes(), "origin list from tracker");
        if let Ok(json) = serde_json::to_vec(&list) {
            let tmp = self.origins_file.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &self.origins_file)) {
                tracing::warn!(error = %e, "cannot save the origin list; it will be fetched again on restart");
            }
        }
        *self.origins.write().expect("origins lock") = list;
    }

    async fn register(&self) -> Result<Duration, fog_net::tracker::TrackerError> {
        let msg = Register {
            quic_addr: self.quic_addr,
            cache_capacity: self.server.store.capacity(),
            upload_limit: self.upload_limit,
            version: env!("CARGO_PKG_VERSION").to_string(),
            timestamp_ms: now_ms(),
            joining: self.overlay.as_ref().is_some_and(Overlay::is_joining),
            region: self.region.clone(),
        };
        self.told_joining.store(msg.joining, Ordering::Relaxed);
        let resp = self.tracker.register(&Signed::sign(&self.key, KIND_REGISTER, &msg)).await?;
        tracing::info!(
            tracker = self.tracker.current().url,
            advertised = %resp.advertised_addr,
            reachable = resp.reachable,
            "registered with tracker"
        );
        if !resp.reachable {
            tracing::warn!(
                "the tracker cannot reach {} over QUIC (NAT or firewall): clients will reach this node by hole \
                 punching through a rendezvous node; forward UDP port {} to serve directly \
                 (docs/operations.md, \"Running a node behind a home router\")",
                resp.advertised_addr,
                resp.advertised_addr.port()
            );
        }
        {
            let mut s = self.state.lock().expect("link state lock");
            s.advertised = Some(resp.advertised_addr);
            s.tracker_key = resp.tracker_key;
            self.server.grants.set_tracker_key(resp.tracker_key);
            self.server.rendezvous.set_tracker_key(resp.tracker_key);
        }
        // An older tracker names no verified addresses: its `reachable` is about the registered one.
        let verified = match (resp.verified_addrs.is_empty(), resp.reachable) {
            (true, true) => vec![resp.advertised_addr],
            _ => resp.verified_addrs.clone(),
        };
        self.set_reachability(resp.reachable, verified);
        let renew = resp
            .membership
            .as_ref()
            .and_then(|m| m.open::<Membership>(KIND_MEMBERSHIP).ok())
            .map(|m| m.issued_ms + (m.expiry_ms.saturating_sub(m.issued_ms)) / 2);
        *self.renew_membership_ms.lock().expect("membership lock") = renew;
        *self.membership.lock().expect("membership lock") = resp.membership;
        self.update_origins(resp.origins);
        self.server.set_web_origins(resp.web_origins);
        self.update_peers(&resp.peers, !resp.reachable);
        self.update_cell(resp.cell, None);
        Ok(Duration::from_secs(resp.heartbeat_interval_secs.clamp(1, 300)))
    }

    /// Notes what the tracker's dial-backs found; the overlay's listen addresses on a reached IP are
    /// public too.
    fn set_reachability(&self, reachable: bool, verified: Vec<SocketAddr>) {
        let newly: Vec<IpAddr> = {
            let mut s = self.state.lock().expect("link state lock");
            let newly = verified.iter().filter(|a| !s.verified_addrs.contains(a)).map(|a| a.ip()).collect();
            s.reachable = Some(reachable);
            s.verified_addrs = verified;
            newly
        };
        if let Some(overlay) = &self.overlay {
            for ip in newly {
                overlay.confirm_public_ip(ip);
            }
        }
    }

    /// `draining`: tell the tracker this node is shutting down, so it schedules nothing new here.
    async fn heartbeat(&self, draining: bool) -> Result<bool, fog_net::tracker::TrackerError> {
        let (used, chunks) = self.server.store.usage();
        let stats = self.server.counters.snapshot(used, chunks, self.server.store.capacity());
        let overlay = self.overlay_report().await;
        self.told_joining.store(overlay.joining, Ordering::Relaxed);
        // Browsers dial the QUIC port clients are told about (the endpoint serves WebTransport too).
        let web_transport = Some(self.server.web.endpoint(self.quic_addr.port()));
        let msg = Heartbeat {
            timestamp_ms: now_ms(),
            stats,
            draining,
            overlay: Some(overlay),
            web_transport,
            upload_plan: self.server.upload.plan(),
        };
        let resp = self.tracker.heartbeat(&Signed::sign(&self.key, KIND_HEARTBEAT, &msg)).await?;
        self.update_origins(resp.origins);
        self.server.set_web_origins(resp.web_origins);
        if let (Some(reachable), Some(verified)) = (resp.reachable, resp.verified_addrs) {
            self.set_reachability(reachable, verified);
        }
        let behind_nat = self.state.lock().expect("link state lock").reachable == Some(false);
        self.update_peers(&resp.peers, behind_nat);
        self.update_cell(resp.cell, resp.cell_delta);
        Ok(resp.registered)
    }

    /// Hands the overlay the members of this node's cell, among which it finds chunks' homes: the whole
    /// list, or its change from the version the node reported.
    fn update_cell(&self, cell: Option<CellList>, change: Option<CellDelta>) {
        let Some(overlay) = &self.overlay else { return };
        if let Some(cell) = cell {
            overlay.set_cell(cell);
        } else if let Some(change) = change {
            overlay.change_cell(change);
        }
    }

    /// Connects the overlay to the peers the tracker suggests and, where clients cannot dial this node in a
    /// family, keeps the rendezvous candidates current (publicly reachable peers, at an address in it).
    fn update_peers(&self, peers: &[PeerContact], behind_nat: bool) {
        if let Some(overlay) = &self.overlay {
            overlay.bootstrap(peers, behind_nat);
        }
        let needed = self.rendezvous_families(behind_nat);
        let plan = (needed != Families::default()).then(|| {
            let candidates = peers.iter().filter_map(|p| Some(Rendezvous { id: p.id, addr: p.rendezvous? }));
            candidates.filter(|r| needed.allows(&r.addr)).collect::<Vec<_>>()
        });
        self.nat_plan.send_if_modified(|current| {
            // A fresh candidate list while attached is no reason to move; an empty one is no plan.
            let changed = current.is_some() != plan.is_some() || current.as_ref().is_some_and(|c| c.is_empty());
            if changed && plan.as_ref().is_none_or(|p| !p.is_empty()) {
                *current = plan.clone();
                return true;
            }
            false
        });
    }

    /// The families clients cannot dial this node in, where it needs a rendezvous: those its QUIC socket
    /// serves and the host has routes in, but no dial-back reached. The tracker cannot know them all: a node
    /// that registered over IPv6 from behind an IPv4 NAT has no IPv4 address to advertise. When the tracker
    /// says an address it was given did not answer (`behind_nat`) and the routes tell nothing more, any.
    fn rendezvous_families(&self, behind_nat: bool) -> Families {
        let verified = self
            .state
            .lock()
            .expect("link state lock")
            .verified_addrs
            .iter()
            .fold(Families::default(), |f, a| f.union(Families::of(a.ip())));
        let routed = transport::local_families();
        let serving = self.more_addrs.serving_families(self.quic_addr);
        let needed = Families {
            ipv4: serving.ipv4 && routed.ipv4 && !verified.ipv4,
            ipv6: serving.ipv6 && routed.ipv6 && !verified.ipv6,
        };
        if behind_nat && needed == Families::default() {
            Families::BOTH
        } else {
            needed
        }
    }

    /// RTTs, reachability and attachment for the heartbeat.
    async fn overlay_report(&self) -> OverlayReport {
        if let Some(rtt) = self.measure_tracker_rtt().await {
            self.tracker_rtt.lock().expect("rtt lock").add(rtt);
        }
        let mut report = self.overlay.as_ref().map(Overlay::report).unwrap_or_default();
        report.tracker_rtt_ms = self.tracker_rtt.lock().expect("rtt lock").estimate();
        self.state.lock().expect("link state lock").rtt_ms = report.tracker_rtt_ms;
        if let Some(a) = *self.attachment.lock().expect("attachment lock") {
            report.rendezvous = Some(a.rendezvous);
            report.external_quic = Some(a.external);
        }
        report.attached = self.server.rendezvous.attached_nodes();
        report.quic_addrs = self.more_addrs.now();
        report.quic_addrs.retain(|a| *a != self.quic_addr);
        self.state.lock().expect("link state lock").more_addrs = report.quic_addrs.clone();
        report
    }

    /// One RTT sample to the tracker: the time a TCP handshake takes (one round trip, no server work). The
    /// filter is not reset on a failover: replicas of one cell sit close together.
    async fn measure_tracker_rtt(&self) -> Option<f32> {
        let url = reqwest::Url::parse(&self.tracker.current().url).ok()?;
        let addr = (url.host_str()?.to_string(), url.port_or_known_default()?);
        let addr = tokio::net::lookup_host(addr).await.ok()?.next()?;
        let started = Instant::now();
        let _conn =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
        Some(started.elapsed().as_secs_f32() * 1000.0)
    }

    /// Notes the outcome of one exchange: `Ok(registered)` or the error.
    fn record(&self, outcome: Result<bool, &TrackerError>) {
        let mut s = self.state.lock().expect("link state lock");
        s.tracker = Some(self.tracker.current());
        match outcome {
            Ok(registered) => {
                s.registered = registered;
                s.last_ok = Some(Instant::now());
                s.last_error = None;
                s.refused = None;
            }
            Err(e) => {
                s.last_error = Some(e.to_string());
                if e.code() == Some(ErrorCode::Unauthorized) {
                    s.registered = false;
                    s.refused = Some(e.to_string());
                }
            }
        }
    }

    /// Registers, then heartbeats until `shutdown` flips; retries with backoff while the tracker is away.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut interval: Option<Duration> = None;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut failures = 0u32;
        self.state.lock().expect("link state lock").tracker = Some(self.tracker.current());
        loop {
            let wait = match interval {
                None => match self.register().await {
                    Ok(i) => {
                        self.record(Ok(true));
                        interval = Some(i);
                        failures = 0;
                        backoff.reset();
                        // Other addresses travel in heartbeats: the first comes soon, so clients of the other
                        // family need not wait an interval.
                        if !self.more_addrs.now().is_empty() {
                            i.min(Duration::from_secs(1))
                        } else {
                            i
                        }
                    }
                    Err(e) => {
                        self.record(Err(&e));
                        failures += 1;
                        // Log the first failure and then every tenth, so an outage does not flood the log.
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(error = %e, failures, "cannot register with the tracker; still serving, will retry");
                        }
                        backoff.next_delay()
                    }
                },
                Some(i) => {
                    let result = self.heartbeat(false).await;
                    self.record(result.as_ref().copied());
                    let renew_at = *self.renew_membership_ms.lock().expect("membership lock");
                    match result {
                        Ok(true) if renew_at.is_some_and(|at| now_ms() >= at) => {
                            tracing::info!("registering again for a fresh membership (rendezvous ask for it)");
                            interval = None;
                            continue;
                        }
                        Ok(true) => failures = 0,
                        Ok(false) => {
                            tracing::info!(tracker = self.tracker.current().url, "tracker does not know this node (restarted, or one not sharing the registry); registering again");
                            interval = None;
                            continue;
                        }
                        Err(e) => {
                            failures += 1;
                            if failures == 1 || failures.is_multiple_of(10) {
                                tracing::warn!(error = %e, failures, "heartbeat failed; still serving");
                            }
                        }
                    }
                    i
                }
            };
            // While the tracker thinks this node is joining, heartbeat every second: it starts scheduling the
            // node as soon as its neighbourhood is connected (at once for a lone node), not an interval later.
            let joining = interval.is_some() && self.told_joining.load(Ordering::Relaxed);
            let wait = if joining { wait.min(Duration::from_secs(1)) } else { wait };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {
                    if interval.is_some() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.heartbeat(true)).await;
                    }
                    return;
                }
            }
        }
    }
}
