//! Lower-than-best-effort uploads: a delay-based congestion controller after LEDBAT++
//! (draft-irtf-iccrg-ledbat-plus-plus, which builds on LEDBAT, RFC 6817), plugged into quinn.
//!
//! A fog node shares its owner's home uplink. A loss-based controller (quinn's default, CUBIC) fills the
//! uplink's buffer until it overflows, which adds the whole buffer (often 100–500 ms) to every packet of
//! the household's video calls and takes half of the bandwidth of its backups. This one watches round-trip
//! times instead: the smallest RTT seen lately is the path's base delay, anything above it is queueing,
//! and it keeps the queueing delay it adds near [`TARGET_DELAY`]. Loss-based traffic on the same uplink
//! pushes the queue past the target within a round trip, and this controller gives way, down to two
//! packets per RTT; when the household is quiet it uses the uplink.
//!
//! What it takes from LEDBAT++:
//! - RTTs, not one-way delays (QUIC carries no timestamps), minimum-filtered: the base delay is the
//!   minimum over the last [`BASE_HISTORY`] minutes (RFC 6817's history), the current delay the minimum of
//!   the last [`CURRENT_FILTER`] samples, so that a delayed ACK does not read as queueing.
//! - A 60 ms target.
//! - Reduced gain: `GAIN = 1 / min(16, ⌈2·target / base⌉)` packets per RTT, so that on short paths, where
//!   each packet is a larger share of the target, the window does not overshoot.
//! - Slower start: slow start grows by `GAIN` × the bytes acknowledged and ends once the queueing delay
//!   passes 3/4 of the target.
//! - Multiplicative decrease above the target: per RTT, `W += max(GAIN − W·(delay/target − 1), −W/2)`
//!   (packets), a cut proportional to how far over the target the queue is, at most half a window per RTT.
//! - Periodic slowdowns: 2 RTTs after the first slow start ends, the window drops to 2 packets for 2 RTTs
//!   and then slow-starts back to where it was; the next slowdown comes 9 times that whole episode later
//!   (at most ~10 % of the time). With every LEDBAT flow's queue drained, each one sees the real base delay
//!   again, which a flow that started on top of another's queue would otherwise never see.
//! - Loss halves the window, as in Reno, once per round trip.
//!
//! RTT samples are taken here, per acknowledged packet, as the time since it was sent, not from quinn's
//! `RttEstimator`: quinn hands the estimator to `on_ack` before updating it with that ACK's sample, its
//! latest sample is not public, and its smoothed RTT trails the path by about eight samples.
//!
//! One addition: base delays are remembered per remote address ([`PathMemory`]). A connection opened while
//! the owner's upload holds a standing queue in the uplink would otherwise take that queue for its base
//! delay (LEDBAT's latecomer problem): a loss-based flow on a bufferbloated uplink keeps most of the buffer
//! full for as long as it runs, so no slowdown of ours ever shows the real base, and the connection competes
//! with the owner instead of giving way. A connection to an address the node sent to in the last
//! [`BASE_HISTORY`] minutes starts from the base delay measured then, as Linux keeps per-destination RTTs
//! (`tcp_metrics`). A connection to a new address, opened while other connections of the node are sending,
//! borrows their view of the uplink: its first base delay is its first RTT minus the smallest queueing delay
//! they measured in the last [`LEND_SLOT`] or two (the uplink's queue is common to them all; the smallest, so
//! that one connection's mistaken base cannot make a new one give way for nothing). A new address whose
//! first packets meet such a queue while the node sends nothing else is still a latecomer.
//!
//! What the controllers do is counted node-wide in [`LedbatStats`] (the node's status page and `/metrics`
//! show it): back-offs for delay, slowdowns, reductions for loss, connections that started from a remembered
//! or a borrowed base delay, and the latest delays measured.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// The queueing delay the controller aims to add at most (LEDBAT++'s value; RFC 6817 allows up to 100 ms).
pub const TARGET_DELAY: Duration = Duration::from_millis(60);

/// Slow start ends once the queueing delay passes this share of the target (LEDBAT++).
const SLOW_START_EXIT: f64 = 0.75;

/// The gain's divisor is at most this: at least 1/16 packet per RTT on the shortest paths (LEDBAT++).
const MAX_GAIN_DIVISOR: f64 = 16.0;

/// The base delay is the minimum over this many one-minute buckets (RFC 6817's `BASE_HISTORY`): a longer
/// base path (a route change) is believed within ten minutes.
pub const BASE_HISTORY: usize = 10;
const BASE_BUCKET: Duration = Duration::from_secs(60);

/// Remote addresses whose base delays a process remembers; past it, the one measured longest ago is
/// forgotten. Each is ten buckets (~300 bytes), and a connection's handshake costs far more than the scan.
pub const REMEMBERED_PATHS: usize = 4096;

/// Queueing delays are lent to new connections from the current and the previous slot of this length.
pub const LEND_SLOT: Duration = Duration::from_millis(500);
/// The queueing delay field of [`LedbatStats::lendable`] (µs; the slot number above it).
const LEND_VALUE_BITS: u32 = 40;
const LEND_VALUE_MASK: u64 = (1 << LEND_VALUE_BITS) - 1;

/// The current delay is the minimum of this many recent samples (one per batch of ACKs).
pub const CURRENT_FILTER: usize = 4;

/// The smallest window, in packets (RFC 6817's `MIN_CWND`); also the window during a slowdown.
const MIN_WINDOW_PACKETS: u64 = 2;

/// Initial window, in packets: RFC 9002's recommendation, what quinn's own controllers start from.
const INITIAL_WINDOW_PACKETS: u64 = 10;

/// A slowdown holds the minimum window this many RTTs, and the first one comes this many RTTs after the
/// initial slow start ends (LEDBAT++).
const SLOWDOWN_RTTS: u32 = 2;

/// The next slowdown comes this many times the last one's length (slowdown and the slow start back) after
/// it ended: at most 1/(1 + 9) of the time is spent slowed down (LEDBAT++).
const SLOWDOWN_INTERVAL: u32 = 9;

/// The latest delays are shown for this long after they were measured: after that no connection of this
/// controller is sending, and a stale value would read as the uplink's state now.
pub const DELAYS_SHOWN_FOR: Duration = Duration::from_secs(10);

/// What the controllers of one process did, summed over their connections; shared by the controllers'
/// handles, as quinn builds one controller per connection.
#[derive(Debug)]
pub struct LedbatStats {
    delay_backoffs: AtomicU64,
    slowdowns: AtomicU64,
    loss_reductions: AtomicU64,
    remembered_bases: AtomicU64,
    borrowed_bases: AtomicU64,
    /// The smallest queueing delay any connection measured in the latest [`LEND_SLOT`]: the slot's number
    /// (plus one: 0 is never) above [`LEND_VALUE_BITS`], the delay in µs below.
    lendable: AtomicU64,
    /// Of the connection that took an RTT sample last: its base delay and queueing delay (µs), and when
    /// (µs since `epoch`, plus one: 0 is never).
    base_delay_us: AtomicU64,
    queueing_delay_us: AtomicU64,
    sampled_at_us: AtomicU64,
    epoch: Instant,
}

/// [`LedbatStats`] read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedbatSnapshot {
    /// Round trips in which a connection shrank its window because the queueing delay was over the target.
    pub delay_backoffs: u64,
    /// Periodic (and initial) slowdowns to two packets.
    pub slowdowns: u64,
    /// Losses that reduced a window (at most one per round trip and connection).
    pub loss_reductions: u64,
    /// Connections that started from the base delay remembered for their remote address.
    pub remembered_bases: u64,
    /// Connections to new addresses that started from their first RTT less the queueing delay other
    /// connections measured at the time.
    pub borrowed_bases: u64,
    /// The base and the queueing delay the connection that measured an RTT last saw, if that was within
    /// [`DELAYS_SHOWN_FOR`].
    pub base_delay: Option<Duration>,
    pub queueing_delay: Option<Duration>,
}

/// The process's stats: a node is one process with one QUIC endpoint, whose status page reads them here.
static PROCESS_STATS: LazyLock<Arc<LedbatStats>> = LazyLock::new(|| Arc::new(LedbatStats::new()));

impl LedbatStats {
    pub fn new() -> Self {
        Self {
            delay_backoffs: AtomicU64::new(0),
            slowdowns: AtomicU64::new(0),
            loss_reductions: AtomicU64::new(0),
            remembered_bases: AtomicU64::new(0),
            borrowed_bases: AtomicU64::new(0),
            lendable: AtomicU64::new(0),
            base_delay_us: AtomicU64::new(0),
            queueing_delay_us: AtomicU64::new(0),
            sampled_at_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// What [`LedbatFactory`]'s controllers count into.
    pub fn process() -> &'static Arc<LedbatStats> {
        &PROCESS_STATS
    }

    fn since_epoch_us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros().try_into().unwrap_or(u64::MAX - 1)
    }

    fn record_delays(&self, now: Instant, base: Duration, queueing: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.base_delay_us.store(us(base), Ordering::Relaxed);
        self.queueing_delay_us.store(us(queueing), Ordering::Relaxed);
        self.sampled_at_us.store(self.since_epoch_us(now) + 1, Ordering::Relaxed);
        let slot = self.lend_slot(now);
        let queueing = us(queueing).min(LEND_VALUE_MASK);
        let _ = self.lendable.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
            let kept =
                if packed >> LEND_VALUE_BITS == slot { (packed & LEND_VALUE_MASK).min(queueing) } else { queueing };
            Some(slot << LEND_VALUE_BITS | kept)
        });
    }

    /// The number of the [`LEND_SLOT`] `now` is in, plus one.
    fn lend_slot(&self, now: Instant) -> u64 {
        (self.since_epoch_us(now) / LEND_SLOT.as_micros() as u64 + 1) & (u64::MAX >> LEND_VALUE_BITS)
    }

    /// The smallest queueing delay a connection measured in the latest slot, if that is this one or the one
    /// before: what a new connection may take away from its first RTT.
    fn lendable_queueing(&self, now: Instant) -> Option<Duration> {
        let packed = self.lendable.load(Ordering::Relaxed);
        let (slot, now_slot) = (packed >> LEND_VALUE_BITS, self.lend_slot(now));
        let fresh = slot != 0 && (slot == now_slot || slot + 1 == now_slot);
        fresh.then(|| Duration::from_micros(packed & LEND_VALUE_MASK))
    }

    /// The counts, and the latest delays if they were measured within [`DELAYS_SHOWN_FOR`] of `now`.
    pub fn snapshot(&self, now: Instant) -> LedbatSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sampled = get(&self.sampled_at_us);
        let fresh =
            sampled > 0 && self.since_epoch_us(now).saturating_sub(sampled - 1) <= DELAYS_SHOWN_FOR.as_micros() as u64;
        LedbatSnapshot {
            delay_backoffs: get(&self.delay_backoffs),
            slowdowns: get(&self.slowdowns),
            loss_reductions: get(&self.loss_reductions),
            remembered_bases: get(&self.remembered_bases),
            borrowed_bases: get(&self.borrowed_bases),
            base_delay: fresh.then(|| Duration::from_micros(get(&self.base_delay_us))),
            queueing_delay: fresh.then(|| Duration::from_micros(get(&self.queueing_delay_us))),
        }
    }
}

impl Default for LedbatStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`Ledbat`] controller for each connection, counting into [`LedbatStats::process`]: give it to
/// `quinn::TransportConfig::congestion_controller_factory`. quinn does not tell a factory whom a connection
/// is with, so a server that knows ([`quinn::Incoming::remote_address`]) builds a factory per connection
/// with [`LedbatFactory::for_remote`], whose controller starts from the [`PathMemory`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LedbatFactory {
    remote: Option<IpAddr>,
}

impl LedbatFactory {
    /// For a connection with `remote`: its controller remembers its base delay in [`PathMemory::process`]
    /// and starts from what was remembered.
    pub fn for_remote(remote: IpAddr) -> Self {
        Self { remote: Some(remote) }
    }
}

impl ControllerFactory for LedbatFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let stats = LedbatStats::process().clone();
        Box::new(match self.remote {
            Some(remote) => Ledbat::for_path(now, current_mtu, stats, PathMemory::process().clone(), remote),
            None => Ledbat::new(current_mtu, stats),
        })
    }
}

/// Base delays measured to each remote address over the last [`BASE_HISTORY`] minutes, shared by a
/// process's controllers (see the module documentation). An IPv6 address counts by its /64, where a host's
/// temporary addresses come and go; an IPv4-mapped address as its IPv4 one.
#[derive(Default)]
pub struct PathMemory {
    paths: Mutex<HashMap<IpAddr, BaseDelay>>,
}

impl std::fmt::Debug for PathMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathMemory").field("paths", &self.lock().len()).finish()
    }
}

static PROCESS_PATHS: LazyLock<Arc<PathMemory>> = LazyLock::new(|| Arc::new(PathMemory::default()));

impl PathMemory {
    /// The process's memory, which [`LedbatFactory::for_remote`]'s controllers share.
    pub fn process() -> &'static Arc<PathMemory> {
        &PROCESS_PATHS
    }

    /// The key `remote` is remembered under.
    pub fn path_of(remote: IpAddr) -> IpAddr {
        match remote.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
            v4 => v4,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, BaseDelay>> {
        // A panic elsewhere leaves at worst a stale minimum behind, which ages out like any other.
        self.paths.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was measured to `path` within the last [`BASE_HISTORY`] minutes, if anything.
    fn recall(&self, now: Instant, path: IpAddr) -> Option<BaseDelay> {
        let mut recalled = self.lock().get(&path)?.clone();
        recalled.forget_before(now);
        (!recalled.buckets.is_empty()).then_some(recalled)
    }

    /// A connection to `path` measured `sample` at `now`.
    fn record(&self, now: Instant, path: IpAddr, sample: Duration) {
        let mut paths = self.lock();
        if !paths.contains_key(&path) && paths.len() >= REMEMBERED_PATHS {
            paths.retain(|_, base| {
                base.forget_before(now);
                !base.buckets.is_empty()
            });
            if paths.len() >= REMEMBERED_PATHS {
                let oldest = paths.iter().min_by_key(|(_, base)| base.latest()).map(|(path, _)| *path);
                oldest.map(|oldest| paths.remove(&oldest));
            }
        }
        paths.entry(path).or_default().update(now, sample);
    }

    /// How many paths are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Growing by `GAIN` × bytes acknowledged towards `ssthresh`. `slowdown`: when the slowdown this slow
    /// start recovers from began (none for the connection's first).
    SlowStart {
        slowdown: Option<Instant>,
    },
    CongestionAvoidance,
    /// The minimum window until `until`, so that the queue drains and the base delay shows.
    Slowdown {
        since: Instant,
        until: Instant,
    },
}

/// The minimum RTT per minute over the last [`BASE_HISTORY`] minutes.
#[derive(Debug, Clone, Default)]
struct BaseDelay {
    /// (start of the bucket, minimum in it), oldest first.
    buckets: VecDeque<(Instant, Duration)>,
}

impl BaseDelay {
    /// Takes `sample`, measured at `now`; whether the history changed (a new bucket or a new minimum).
    fn update(&mut self, now: Instant, sample: Duration) -> bool {
        self.forget_before(now);
        match self.buckets.back_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < BASE_BUCKET => {
                let changed = sample < *min;
                *min = (*min).min(sample);
                changed
            }
            _ => {
                self.buckets.push_back((now, sample));
                if self.buckets.len() > BASE_HISTORY {
                    self.buckets.pop_front();
                }
                true
            }
        }
    }

    /// Drops the buckets that began over [`BASE_HISTORY`] minutes before `now`: a connection that sent
    /// nothing for a while, or a remembered path, holds no minimum older than that.
    fn forget_before(&mut self, now: Instant) {
        let horizon = BASE_BUCKET * BASE_HISTORY as u32;
        while self.buckets.front().is_some_and(|(start, _)| now.saturating_duration_since(*start) >= horizon) {
            self.buckets.pop_front();
        }
    }

    fn get(&self) -> Option<Duration> {
        self.buckets.iter().map(|(_, min)| *min).min()
    }

    /// When the newest bucket began.
    fn latest(&self) -> Option<Instant> {
        self.buckets.back().map(|(start, _)| *start)
    }
}

/// LEDBAT++ for one connection (see the module documentation).
#[derive(Debug, Clone)]
pub struct Ledbat {
    mtu: u64,
    /// Bytes that may be in flight; fractional, as growth per ACK is a fraction of a packet.
    window: f64,
    /// Where slow start ends (bytes); during a slowdown, the window to return to.
    ssthresh: f64,
    phase: Phase,
    base: BaseDelay,
    /// The last [`CURRENT_FILTER`] samples, newest last.
    recent: VecDeque<Duration>,
    /// Of the batch of ACKs being processed: the smallest RTT sample (its newest packet's), and the bytes
    /// that may grow the window (sent after the last loss).
    batch_rtt: Option<Duration>,
    batch_bytes: u64,
    /// When the last loss was acted on: losses of packets sent before it belong to the same event.
    recovery_start: Option<Instant>,
    next_slowdown: Option<Instant>,
    /// When a back-off for delay was last counted: one count per round trip, not per ACK.
    counted_backoff: Option<Instant>,
    stats: Arc<LedbatStats>,
    /// Where this connection's base delays are remembered, and under which path.
    memory: Option<(Arc<PathMemory>, IpAddr)>,
}

impl Ledbat {
    /// A controller counting into `stats`.
    pub fn new(current_mtu: u16, stats: Arc<LedbatStats>) -> Self {
        let mtu = u64::from(current_mtu);
        Self {
            mtu,
            window: (INITIAL_WINDOW_PACKETS * mtu) as f64,
            ssthresh: f64::INFINITY,
            phase: Phase::SlowStart { slowdown: None },
            base: BaseDelay::default(),
            recent: VecDeque::with_capacity(CURRENT_FILTER),
            batch_rtt: None,
            batch_bytes: 0,
            recovery_start: None,
            next_slowdown: None,
            counted_backoff: None,
            stats,
            memory: None,
        }
    }

    /// A controller for a connection with `remote`, which starts from the base delay `memory` holds for
    /// it and adds what it measures there.
    pub fn for_path(
        now: Instant,
        current_mtu: u16,
        stats: Arc<LedbatStats>,
        memory: Arc<PathMemory>,
        remote: IpAddr,
    ) -> Self {
        let path = PathMemory::path_of(remote);
        let mut cc = Self::new(current_mtu, stats);
        if let Some(recalled) = memory.recall(now, path) {
            cc.base = recalled;
            Self::count(&cc.stats.remembered_bases);
        }
        cc.memory = Some((memory, path));
        cc
    }

    fn min_window(&self) -> f64 {
        (MIN_WINDOW_PACKETS * self.mtu) as f64
    }

    /// The path's base delay: the smallest RTT seen over the last [`BASE_HISTORY`] minutes.
    pub fn base_delay(&self) -> Option<Duration> {
        self.base.get()
    }

    /// The filtered current RTT.
    fn current_rtt(&self) -> Option<Duration> {
        self.recent.iter().min().copied()
    }

    /// How far the current RTT is above the base delay.
    pub fn queueing_delay(&self) -> Option<Duration> {
        Some(self.current_rtt()?.saturating_sub(self.base_delay()?))
    }

    /// Packets per RTT the window grows by in congestion avoidance (and the slow start factor).
    fn gain(&self) -> f64 {
        let base = self.base_delay().unwrap_or(TARGET_DELAY).as_secs_f64().max(1e-6);
        1.0 / (2.0 * TARGET_DELAY.as_secs_f64() / base).ceil().clamp(1.0, MAX_GAIN_DIVISOR)
    }

    /// A packet sent at `sent` was acknowledged at `now` (one of a batch that [`Self::end_acks`] closes).
    fn ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        let rtt = now.saturating_duration_since(sent);
        self.batch_rtt = Some(self.batch_rtt.map_or(rtt, |r| r.min(rtt)));
        if self.recovery_start.is_none_or(|r| sent > r) {
            self.batch_bytes += bytes;
        }
    }

    /// A batch of ACKs ended: takes its RTT sample and moves the window.
    fn end_acks(&mut self, now: Instant, app_limited: bool) {
        let acked = std::mem::take(&mut self.batch_bytes) as f64;
        let Some(sample) = self.batch_rtt.take() else { return };
        let borrowed = self.base_delay().is_none().then(|| self.borrow_base(now, sample)).flatten();
        for sample in borrowed.into_iter().chain([sample]) {
            if self.base.update(now, sample) {
                if let Some((memory, path)) = &self.memory {
                    memory.record(now, *path, sample);
                }
            }
        }
        if self.recent.len() == CURRENT_FILTER {
            self.recent.pop_front();
        }
        self.recent.push_back(sample);
        let (Some(queueing), Some(rtt), Some(base)) = (self.queueing_delay(), self.current_rtt(), self.base_delay())
        else {
            return;
        };
        self.stats.record_delays(now, base, queueing);
        let over = queueing.as_secs_f64() / TARGET_DELAY.as_secs_f64();
        let gain = self.gain();
        match self.phase {
            Phase::Slowdown { since, until } => {
                if now >= until {
                    self.phase = Phase::SlowStart { slowdown: Some(since) };
                }
            }
            Phase::SlowStart { slowdown } => {
                if over > SLOW_START_EXIT {
                    self.ssthresh = self.window;
                    self.end_slow_start(now, slowdown, rtt);
                } else if !app_limited {
                    self.window += gain * acked;
                    if self.window >= self.ssthresh {
                        self.window = self.ssthresh;
                        self.end_slow_start(now, slowdown, rtt);
                    }
                }
            }
            Phase::CongestionAvoidance => {
                if self.next_slowdown.is_some_and(|at| now >= at) {
                    self.ssthresh = self.window;
                    self.window = self.min_window();
                    self.phase = Phase::Slowdown { since: now, until: now + rtt * SLOWDOWN_RTTS };
                    self.next_slowdown = None;
                    Self::count(&self.stats.slowdowns);
                    return;
                }
                let mtu = self.mtu as f64;
                // Change per RTT, spread over the window's worth of ACKs that make one RTT.
                let per_rtt = if over <= 1.0 {
                    if app_limited {
                        0.0
                    } else {
                        gain * mtu
                    }
                } else {
                    (gain * mtu - self.window * (over - 1.0)).max(-self.window / 2.0)
                };
                let before = self.window;
                self.window = (self.window + per_rtt * acked / self.window).max(self.min_window());
                if self.window < before && self.counted_backoff.is_none_or(|t| now.saturating_duration_since(t) >= rtt)
                {
                    self.counted_backoff = Some(now);
                    Self::count(&self.stats.delay_backoffs);
                }
            }
        }
    }

    /// For a connection with no base delay yet, whose first RTT is `first`: that RTT less the queueing delay
    /// other connections measure now, if they do.
    fn borrow_base(&self, now: Instant, first: Duration) -> Option<Duration> {
        let queueing = self.stats.lendable_queueing(now).filter(|q| !q.is_zero() && *q < first)?;
        Self::count(&self.stats.borrowed_bases);
        Some(first - queueing)
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Slow start is over (at `now`, the RTT being `rtt`): schedules the next slowdown.
    fn end_slow_start(&mut self, now: Instant, slowdown: Option<Instant>, rtt: Duration) {
        self.phase = Phase::CongestionAvoidance;
        self.next_slowdown = Some(match slowdown {
            None => now + rtt * SLOWDOWN_RTTS,
            Some(since) => now + now.saturating_duration_since(since) * SLOWDOWN_INTERVAL,
        });
    }

    /// A packet sent at `sent` was lost (or marked congested), noticed at `now`.
    fn congestion(&mut self, now: Instant, sent: Instant, persistent: bool) {
        if self.recovery_start.is_some_and(|r| sent <= r) {
            return;
        }
        self.recovery_start = Some(now);
        Self::count(&self.stats.loss_reductions);
        match self.phase {
            // The window is at its minimum already; halve the one it returns to.
            Phase::Slowdown { .. } => self.ssthresh = (self.ssthresh / 2.0).max(self.min_window()),
            Phase::SlowStart { slowdown } => {
                self.window = (self.window / 2.0).max(self.min_window());
                self.ssthresh = self.window;
                let rtt = self.current_rtt().unwrap_or(TARGET_DELAY);
                self.end_slow_start(now, slowdown, rtt);
            }
            Phase::CongestionAvoidance => {
                self.window = (self.window / 2.0).max(self.min_window());
                self.ssthresh = self.window;
            }
        }
        if persistent {
            self.window = self.min_window();
        }
    }
}

impl Controller for Ledbat {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.ack(now, sent, bytes);
    }

    fn on_end_acks(&mut self, now: Instant, _in_flight: u64, app_limited: bool, _largest_acked: Option<u64>) {
        self.end_acks(now, app_limited);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, _lost: u64) {
        self.congestion(now, sent, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window as u64
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.ssthresh = self.ssthresh.is_finite().then_some(self.ssthresh as u64);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW_PACKETS * self.mtu
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;

    const MTU: u16 = 1200;

    /// A sender behind one bottleneck: a FIFO draining at `rate` bytes/s holding at most `buffer` of
    /// queueing, `base` of round trip besides the queue, and `extra(t)` of queueing that other traffic adds
    /// at time `t` (it delays our packets; its own bytes are not modelled). One packet per ACK.
    struct Path {
        rate: f64,
        base: Duration,
        buffer: Duration,
        extra: Box<dyn Fn(Duration) -> Duration>,
    }

    /// What happened to a packet: (when the sender learns it, sent at, acked or lost).
    type Event = Reverse<(Instant, Instant, bool)>;

    struct Sim {
        path: Path,
        cc: Ledbat,
        start: Instant,
        now: Instant,
        link_free: Instant,
        in_flight: u64,
        events: BinaryHeap<Event>,
        /// (when acked, bytes).
        delivered: Vec<(Instant, u64)>,
        /// (when sent, time it waited in the bottleneck's queue).
        queue_waits: Vec<(Instant, Duration)>,
        /// (time, window, phase) after each ACK.
        trace: Vec<(Instant, u64, Phase)>,
        losses: u64,
    }

    impl Sim {
        fn new(path: Path) -> Self {
            Self::with(path, Instant::now(), |_| Ledbat::new(MTU, Arc::new(LedbatStats::new())))
        }

        /// A sender starting at `start` with the controller `cc` builds for that moment.
        fn with(path: Path, start: Instant, cc: impl FnOnce(Instant) -> Ledbat) -> Self {
            let mut sim = Self {
                path,
                cc: cc(start),
                start,
                now: start,
                link_free: start,
                in_flight: 0,
                events: BinaryHeap::new(),
                delivered: Vec::new(),
                queue_waits: Vec::new(),
                trace: Vec::new(),
                losses: 0,
            };
            sim.send();
            sim
        }

        fn send(&mut self) {
            let size = u64::from(MTU);
            while self.in_flight + size <= self.cc.window() {
                let begins = self.link_free.max(self.now);
                let wait = begins - self.now;
                if wait > self.path.buffer {
                    // Tail drop; the sender notices about when the ACK would have come.
                    self.losses += 1;
                    self.events.push(Reverse((self.now + wait + self.path.base, self.now, false)));
                } else {
                    let departs = begins + Duration::from_secs_f64(size as f64 / self.path.rate);
                    self.link_free = departs;
                    self.queue_waits.push((self.now, wait));
                    let acked = departs + self.path.base + (self.path.extra)(self.now - self.start);
                    self.events.push(Reverse((acked, self.now, true)));
                }
                self.in_flight += size;
            }
        }

        /// Runs until `t` after the start.
        fn run_until(&mut self, t: Duration) {
            while let Some(Reverse((at, sent, acked))) = self.events.peek().copied() {
                if at > self.start + t {
                    break;
                }
                self.events.pop();
                self.now = at;
                self.in_flight -= u64::from(MTU);
                if acked {
                    self.cc.ack(at, sent, u64::from(MTU));
                    self.cc.end_acks(at, false);
                    self.delivered.push((at, u64::from(MTU)));
                } else {
                    self.cc.congestion(at, sent, false);
                }
                self.trace.push((at, self.cc.window(), self.cc.phase));
                self.send();
            }
        }

        fn at(&self, t: Duration) -> Instant {
            self.start + t
        }

        fn stats(&self) -> LedbatSnapshot {
            self.cc.stats.snapshot(self.now)
        }

        /// Bytes per second delivered between `from` and `to` after the start.
        fn throughput(&self, from: Duration, to: Duration) -> f64 {
            let (a, b) = (self.at(from), self.at(to));
            let bytes: u64 = self.delivered.iter().filter(|(t, _)| *t >= a && *t < b).map(|(_, n)| n).sum();
            bytes as f64 / (to - from).as_secs_f64()
        }

        /// Mean and largest queueing wait of the packets sent between `from` and `to`.
        fn queueing(&self, from: Duration, to: Duration) -> (Duration, Duration) {
            let (a, b) = (self.at(from), self.at(to));
            let waits: Vec<Duration> =
                self.queue_waits.iter().filter(|(t, _)| *t >= a && *t < b).map(|(_, w)| *w).collect();
            let mean = waits.iter().sum::<Duration>() / waits.len().max(1) as u32;
            (mean, waits.iter().max().copied().unwrap_or_default())
        }

        /// (start, end) of each slowdown so far.
        fn slowdowns(&self) -> Vec<(Instant, Instant)> {
            let mut spans = Vec::new();
            let mut open = None;
            for (t, _, phase) in &self.trace {
                match (phase, open) {
                    (Phase::Slowdown { since, .. }, None) => open = Some(*since),
                    (Phase::Slowdown { .. }, Some(_)) => {}
                    (_, Some(since)) => {
                        spans.push((since, *t));
                        open = None;
                    }
                    (_, None) => {}
                }
            }
            spans
        }
    }

    /// A 20 Mbit/s uplink, 40 ms away, with a deep buffer (1 s): no loss, so only delay can restrain.
    fn home_uplink(extra: impl Fn(Duration) -> Duration + 'static) -> Path {
        Path {
            rate: 20e6 / 8.0,
            base: Duration::from_millis(40),
            buffer: Duration::from_secs(1),
            extra: Box::new(extra),
        }
    }

    /// The controller's base delay is `rtt` and the time a packet takes through the bottleneck.
    fn assert_base(sim: &Sim, rtt: Duration) {
        let base = sim.cc.base_delay().expect("a base delay");
        let one_packet = Duration::from_secs_f64(f64::from(MTU) / sim.path.rate);
        assert!(base >= rtt && base <= rtt + one_packet, "base {base:?}, expected {rtt:?}");
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn fills_an_idle_link_while_keeping_its_queue_near_the_target() {
        let mut sim = Sim::new(home_uplink(|_| Duration::ZERO));
        sim.run_until(secs(60.0));
        assert_eq!(sim.losses, 0);
        let rate = sim.throughput(secs(10.0), secs(60.0));
        assert!(rate >= 0.85 * sim.path.rate, "{:.0} of {:.0} bytes/s", rate, sim.path.rate);
        let (mean, max) = sim.queueing(secs(10.0), secs(60.0));
        assert!(mean <= TARGET_DELAY, "mean queueing {mean:?}");
        assert!(max <= TARGET_DELAY * 3 / 2, "largest queueing {max:?}");
        // Slower start: it ended once the queue passed 3/4 of the target (plus what a round trip of growth
        // adds before the samples show it), not at the end of the 1 s buffer.
        let exit = sim.trace.iter().find(|(_, _, p)| *p == Phase::CongestionAvoidance).expect("slow start ended");
        let (_, worst_in_slow_start) = sim.queueing(Duration::ZERO, exit.0 - sim.start);
        assert!(worst_in_slow_start <= TARGET_DELAY * 3 / 2, "slow start queued {worst_in_slow_start:?}");
        assert_base(&sim, sim.path.base);
        let stats = sim.stats();
        assert_eq!(stats.loss_reductions, 0);
        assert_eq!(stats.base_delay, sim.cc.base_delay(), "the latest sample's delays are shown");
        assert_eq!(stats.queueing_delay, sim.cc.queueing_delay());
    }

    #[test]
    fn gives_way_within_a_few_rtts_when_other_traffic_queues_and_comes_back_after() {
        // From 20 s to 40 s the household's upload keeps 100 ms of queue in the uplink.
        let busy = |t: Duration| Duration::from_millis(if (20.0..40.0).contains(&t.as_secs_f64()) { 100 } else { 0 });
        let mut sim = Sim::new(home_uplink(busy));
        sim.run_until(secs(19.9));
        let before = sim.cc.window();
        assert!(before > 50 * u64::from(MTU), "window before: {before}");
        let backoffs_before = sim.stats().delay_backoffs;
        // Within ten round trips of 140 ms the window is at or near its minimum.
        sim.run_until(secs(21.4));
        let min = MIN_WINDOW_PACKETS * u64::from(MTU);
        assert!(sim.cc.window() <= 2 * min, "window {} after the owner's queue appeared", sim.cc.window());
        // Counted, at most once per round trip (1.5 s holds 11 of 140 ms); here a slowdown comes too.
        let backoffs = sim.stats().delay_backoffs - backoffs_before;
        assert!((1..=11).contains(&backoffs), "{backoffs} back-offs for delay");
        assert!(sim.stats().queueing_delay.is_some_and(|q| q > TARGET_DELAY), "{:?}", sim.stats());
        let yielded = sim.throughput(secs(22.0), secs(40.0));
        assert!(yielded < 0.05 * sim.path.rate, "{yielded:.0} bytes/s while the owner uploads");
        // Once the owner's queue is gone the uplink is used again.
        sim.run_until(secs(70.0));
        let after = sim.throughput(secs(50.0), secs(70.0));
        assert!(after >= 0.85 * sim.path.rate, "{after:.0} bytes/s after the owner stopped");
    }

    #[test]
    fn slowdowns_hold_two_packets_for_two_rtts_about_a_tenth_of_the_time() {
        let mut sim = Sim::new(home_uplink(|_| Duration::ZERO));
        sim.run_until(secs(90.0));
        let spans = sim.slowdowns();
        assert!(spans.len() >= 3, "slowdowns: {}", spans.len());
        let min = MIN_WINDOW_PACKETS * u64::from(MTU);
        for (since, until) in &spans {
            // Two RTTs as they were when it began: the base, and the queue (which drains during the first).
            let length = *until - *since;
            let longest = (sim.path.base + TARGET_DELAY * 3 / 2) * 2 + Duration::from_millis(5);
            assert!((sim.path.base * 2..=longest).contains(&length), "{length:?}");
            let mut during =
                sim.trace.iter().filter(|(t, _, p)| t >= since && t < until && matches!(p, Phase::Slowdown { .. }));
            assert!(during.all(|(_, w, _)| *w == min), "the window left its minimum during a slowdown");
        }
        // From one slowdown to the next, ~9× the episode (slowdown and slow start back) passes.
        let slowed: Duration = spans.iter().map(|(s, u)| *u - *s).sum();
        let between = spans.last().expect("spans").0 - spans[0].0;
        assert!(slowed < between / 10, "{slowed:?} of {between:?} at two packets");
        let open = u64::from(matches!(sim.cc.phase, Phase::Slowdown { .. }));
        assert_eq!(sim.stats().slowdowns, spans.len() as u64 + open, "every slowdown counted once");
    }

    #[test]
    fn a_slowdown_finds_the_base_delay_that_a_standing_queue_hid() {
        // Another flow's 50 ms queue is there from the start and drains at 6 s: this connection took
        // 90 ms for the base, and its own queue then hides the real 40 ms until it slows down.
        let mut sim = Sim::new(home_uplink(|t| Duration::from_millis(if t.as_secs_f64() < 6.0 { 50 } else { 0 })));
        sim.run_until(secs(5.9));
        assert_base(&sim, Duration::from_millis(90));
        sim.run_until(secs(90.0));
        let after = sim.slowdowns().into_iter().find(|(since, _)| *since > sim.at(secs(6.0))).expect("a slowdown");
        assert!(after.1 < sim.at(secs(80.0)), "the slowdown after 6 s came too late: {:?}", after.1 - sim.start);
        assert_base(&sim, sim.path.base);
        let from = after.1 - sim.start + secs(5.0);
        let (mean, _) = sim.queueing(from, from + secs(10.0));
        assert!(mean <= TARGET_DELAY, "mean queueing {mean:?} after the base was found");
    }

    #[test]
    fn a_connection_to_a_remembered_address_gives_way_to_a_queue_that_was_there_before_it() {
        let memory = Arc::new(PathMemory::default());
        let client: IpAddr = [192, 0, 2, 7].into();
        let remembered = |memory: &Arc<PathMemory>, remote: IpAddr| {
            let memory = memory.clone();
            move |now| Ledbat::for_path(now, MTU, Arc::new(LedbatStats::new()), memory, remote)
        };
        // A first connection to the client while the uplink is quiet measures the real base delay.
        let mut first = Sim::with(home_uplink(|_| Duration::ZERO), Instant::now(), remembered(&memory, client));
        first.run_until(secs(5.0));
        assert_eq!(first.stats().remembered_bases, 0, "nothing was remembered yet");
        assert_eq!(memory.len(), 1);
        // A minute later the owner's upload holds 80 ms of queue in the uplink from before the next
        // connection's first packet to the end.
        let standing = |_| Duration::from_millis(80);
        let later = first.now + secs(60.0);
        let mut again = Sim::with(home_uplink(standing), later, remembered(&memory, client));
        assert_eq!(again.stats().remembered_bases, 1);
        again.run_until(secs(30.0));
        assert_base(&again, again.path.base);
        let yielded = again.throughput(secs(2.0), secs(30.0));
        assert!(yielded < 0.05 * again.path.rate, "{yielded:.0} bytes/s on top of the owner's queue");
        // A connection to an address never seen takes the queue for its base and sends on top of it: the
        // latecomer problem that remembering fixes only for addresses the node sent to lately.
        let stranger: IpAddr = [198, 51, 100, 1].into();
        let mut new = Sim::with(home_uplink(standing), later, remembered(&memory, stranger));
        new.run_until(secs(30.0));
        assert_base(&new, again.path.base + Duration::from_millis(80));
        assert!(new.throughput(secs(2.0), secs(30.0)) > 0.5 * new.path.rate);
    }

    #[test]
    fn a_connection_to_a_new_address_borrows_the_queueing_delay_others_measure_now() {
        // A connection that has sent since before the owner's 80 ms queue appeared at 20 s sees it as queueing.
        let owner_from_20s = |t: Duration| Duration::from_millis(if t.as_secs_f64() >= 20.0 { 80 } else { 0 });
        let mut old = Sim::new(home_uplink(owner_from_20s));
        old.run_until(secs(30.0));
        let stats = old.cc.stats.clone();
        assert!(stats.lendable_queueing(old.now).is_some_and(|q| q >= Duration::from_millis(79)), "{stats:?}");
        // A connection opened now, on the same uplink, takes its first RTT less that for its base delay.
        let standing = |_| Duration::from_millis(80);
        let mut new = Sim::with(home_uplink(standing), old.now, |_| Ledbat::new(MTU, stats.clone()));
        new.run_until(secs(30.0));
        assert_eq!(stats.snapshot(new.now).borrowed_bases, 1);
        assert_base(&new, new.path.base);
        let yielded = new.throughput(secs(2.0), secs(30.0));
        assert!(yielded < 0.05 * new.path.rate, "{yielded:.0} bytes/s on top of the owner's queue");
        // Two slots after the last measurement there is nothing to borrow: a latecomer again.
        let stale = new.now + LEND_SLOT * 2;
        let mut late = Sim::with(home_uplink(standing), stale, |_| Ledbat::new(MTU, stats.clone()));
        late.run_until(secs(5.0));
        assert_eq!(stats.snapshot(late.now).borrowed_bases, 1, "borrowed a stale queueing delay");
        assert_base(&late, late.path.base + Duration::from_millis(80));
    }

    #[test]
    fn paths_are_remembered_per_address_for_ten_minutes_and_bounded() {
        let t0 = Instant::now();
        let v6 = |s: &str| -> IpAddr { s.parse().expect("an address") };
        // A host's temporary IPv6 addresses share its /64; an IPv4-mapped address is its IPv4 one.
        assert_eq!(PathMemory::path_of(v6("2001:db8:1:2:aaaa::1")), PathMemory::path_of(v6("2001:db8:1:2:bbbb::9")));
        assert_ne!(PathMemory::path_of(v6("2001:db8:1:2::1")), PathMemory::path_of(v6("2001:db8:1:3::1")));
        assert_eq!(PathMemory::path_of(v6("::ffff:192.0.2.7")), IpAddr::from([192, 0, 2, 7]));

        let memory = PathMemory::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        memory.record(t0, a, Duration::from_millis(50));
        memory.record(t0 + secs(30.0), a, Duration::from_millis(40));
        memory.record(t0 + secs(90.0), a, Duration::from_millis(70));
        let recalled = memory.recall(t0 + secs(120.0), a).expect("remembered");
        assert_eq!(recalled.get(), Some(Duration::from_millis(40)));
        // Ten minutes after the first bucket began it is forgotten; the later one still counts.
        let late = memory.recall(t0 + secs(600.0), a).expect("the later minute");
        assert_eq!(late.get(), Some(Duration::from_millis(70)));
        assert!(memory.recall(t0 + secs(690.0), a).is_none(), "forgotten after ten minutes");

        // Full: the path measured longest ago makes room.
        let memory = PathMemory::default();
        for i in 0..REMEMBERED_PATHS as u32 {
            memory.record(t0 + Duration::from_millis(u64::from(i)), IpAddr::from(i.to_be_bytes()), secs(0.05));
        }
        let newcomer: IpAddr = [203, 0, 113, 9].into();
        memory.record(t0 + secs(10.0), newcomer, secs(0.05));
        assert_eq!(memory.len(), REMEMBERED_PATHS);
        assert!(memory.recall(t0 + secs(10.0), IpAddr::from(0u32.to_be_bytes())).is_none(), "the oldest went");
        assert!(memory.recall(t0 + secs(10.0), IpAddr::from(1u32.to_be_bytes())).is_some());
        assert!(memory.recall(t0 + secs(10.0), newcomer).is_some());
    }

    #[test]
    fn loss_halves_the_window_once_per_round_trip() {
        let t0 = Instant::now();
        let mut cc = Ledbat::new(MTU, Arc::new(LedbatStats::new()));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Slow start on an empty path: 40 ms RTTs, no queue.
        for i in 0..400 {
            cc.ack(at(40 + i), at(i), u64::from(MTU));
            cc.end_acks(at(40 + i), false);
        }
        let w = cc.window();
        assert!(w > INITIAL_WINDOW_PACKETS * u64::from(MTU), "{w}");
        cc.congestion(at(500), at(450), false);
        assert_eq!(cc.window(), w / 2);
        assert_eq!(cc.phase, Phase::CongestionAvoidance, "loss ends slow start");
        // A packet sent before the first loss was noticed belongs to the same event.
        cc.congestion(at(510), at(480), false);
        assert_eq!(cc.window(), w / 2);
        cc.congestion(at(600), at(560), false);
        assert_eq!(cc.window(), w / 4);
        cc.congestion(at(700), at(660), true);
        assert_eq!(cc.window(), MIN_WINDOW_PACKETS * u64::from(MTU), "persistent congestion");
        let stats = cc.stats.snapshot(at(700));
        assert_eq!(stats.loss_reductions, 3, "the second loss of one round trip is not counted");
        assert_eq!((stats.delay_backoffs, stats.slowdowns), (0, 0));
    }

    #[test]
    fn back_offs_for_delay_are_counted_once_per_round_trip() {
        let t0 = Instant::now();
        let mut cc = Ledbat::new(MTU, Arc::new(LedbatStats::new()));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mtu = u64::from(MTU);
        // In congestion avoidance at 100 packets, no slowdown due, the base delay 40 ms.
        cc.window = (100 * mtu) as f64;
        cc.phase = Phase::CongestionAvoidance;
        cc.ack(at(40), at(0), mtu);
        cc.end_acks(at(40), false);
        // Then a 100 ms queue: an ACK a millisecond for a second. The window shrinks by half a packet per
        // ACK (half the window per round trip): ~200 decreases over two round trips of 140 ms, then it holds
        // its minimum.
        for ms in 1000..2000 {
            cc.ack(at(ms), at(ms - 140), mtu);
            cc.end_acks(at(ms), false);
        }
        assert_eq!(cc.window(), MIN_WINDOW_PACKETS * mtu);
        assert_eq!(cc.stats.snapshot(at(2000)).delay_backoffs, 2);
    }

    #[test]
    fn stats_are_shared_by_connections_and_delays_go_stale() {
        let t0 = Instant::now();
        let stats = Arc::new(LedbatStats::new());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (mut a, mut b) = (Ledbat::new(MTU, stats.clone()), Ledbat::new(MTU, stats.clone()));
        a.congestion(at(100), at(50), false);
        b.congestion(at(100), at(50), false);
        assert_eq!(stats.snapshot(at(100)).loss_reductions, 2);
        assert_eq!(stats.snapshot(at(100)).base_delay, None, "nothing measured yet");
        // The latest connection to take a sample is the one shown.
        a.ack(at(200), at(160), u64::from(MTU));
        a.end_acks(at(200), false);
        b.ack(at(210), at(110), u64::from(MTU));
        b.end_acks(at(210), false);
        b.ack(at(300), at(220), u64::from(MTU));
        b.end_acks(at(300), false);
        let shown = stats.snapshot(at(300));
        assert_eq!(shown.base_delay, Some(Duration::from_millis(80)));
        assert_eq!(shown.queueing_delay, Some(Duration::ZERO));
        let later = at(300) + DELAYS_SHOWN_FOR + Duration::from_millis(1);
        assert_eq!(stats.snapshot(later).base_delay, None, "no connection measured in {DELAYS_SHOWN_FOR:?}");
        assert_eq!(stats.snapshot(later).loss_reductions, 2);
    }

    #[test]
    fn gain_shrinks_on_short_paths() {
        let t0 = Instant::now();
        let mut cc = Ledbat::new(MTU, Arc::new(LedbatStats::new()));
        for (base_ms, gain) in [(200, 1.0), (60, 0.5), (40, 1.0 / 3.0), (1, 1.0 / 16.0)] {
            cc.base = BaseDelay::default();
            cc.base.update(t0, Duration::from_millis(base_ms));
            assert!((cc.gain() - gain).abs() < 1e-9, "base {base_ms} ms: {}", cc.gain());
        }
    }
}
