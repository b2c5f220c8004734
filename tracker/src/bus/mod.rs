//! The cell's bus (issue #15): with `--nats`, the tracker is one replica of a cell, and the replicas share
//! their soft state over NATS core pub/sub (no JetStream: nothing here needs to outlive the processes).
//!
//! - A replica that accepts a node's registration or heartbeat (signature, clock and replay checked, the
//!   addresses dialled back) publishes the node's whole soft state ([`wire::NodeRecord`]); every replica
//!   merges it last-writer-wins by the node's signed timestamp ([`merge`]), so each holds the whole cell
//!   and schedules locally. Records go in the binary v2 form ([`record`]) once every live replica
//!   announced it reads it, in v1 JSON before (a cell in a rolling upgrade); both are read. Receivers do
//!   not check the node's signature again (a record carries what the accepting replica verified, not the
//!   signed message): at 10^5 heartbeats/s that would cost every replica several cores; the bus is the
//!   operator's (its servers and credentials), and every field is bounds-checked before it is merged, so
//!   a malformed message cannot do more than one node's own heartbeat could.
//! - The scheduler's load and chunk popularity: each replica publishes what it charged (a delta) every
//!   [`LOAD_EVERY`], or sooner when the delta grows, and adds the others' (so bounded load holds across
//!   replicas).
//! - Operator blocks, enforced by every replica as the message arrives.
//! - Probes: replicas announce themselves every [`ALIVE_EVERY`]; each node is probed by the live replica
//!   ranking first for it by rendezvous, which publishes its verdicts.
//! - Manifest writes: once a replica's write of a manifest is durable it names the URL and the new content,
//!   and the others drop a cached manifest of that URL that differs (`store::cache`). A replica that was
//!   off the bus may have missed some: it drops every cached manifest when it (re)connects.
//! - Node records are decoded and merged by a worker per core; the other kinds in order, as they arrive.
//! - Readiness: a replica holds the whole cell one heartbeat interval after it subscribed (every live node
//!   heartbeated to some replica meanwhile); until then, and again after a lost connection, `/readyz` says
//!   503 and heartbeats of nodes it does not know yet are answered "retry" rather than "register again",
//!   so a restarted replica causes no re-registration storm.

pub mod merge;
pub mod record;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fog_proto::api::now_ms;
use fog_proto::NodeId;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::app::App;
use crate::config::TrackerConfig;
use merge::Replicas;
use wire::{Alive, ManifestWritten, Message, Refused};

/// How often a replica announces itself, and how long one not heard from counts as alive.
pub const ALIVE_EVERY: Duration = Duration::from_millis(500);
const REPLICA_TTL: Duration = Duration::from_secs(2);
/// How often a replica publishes the load it charged.
pub const LOAD_EVERY: Duration = Duration::from_millis(250);
/// Messages waiting to be published; past this they are dropped (and counted): soft state is sent again.
const OUTBOX: usize = 16_384;
/// Messages received and not yet merged, per subscription, before the client drops them (counted by NATS
/// as a slow consumer).
const INBOX: usize = 65_536;
/// Node records queued for each decoding worker.
const WORKER_QUEUE: usize = 1024;

/// Decoding workers: one per core, at most 8 (a merge holds the registry's write lock for part of a record's
/// cost, so more would mostly wait for it).
fn decoders() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS servers {urls}: {source}")]
    Connect { urls: String, source: async_nats::ConnectError },
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe { subject: String, source: async_nats::SubscribeError },
}

impl BusError {
    /// Neither clears by itself: a server list that does not parse, or a client already closed.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// `fog_tracker_bus_*`.
#[derive(Debug, Clone, Default)]
pub struct BusMetrics {
    pub published: Family<KindLabel, Counter>,
    pub received: Family<KindLabel, Counter>,
    /// Node records that changed what this replica holds.
    pub merged: Counter,
    /// Node records older than (or the same as) what this replica holds.
    pub stale: Counter,
    pub malformed: Counter,
    pub unknown_version: Counter,
    /// Messages not published (the outbox was full, or the client failed).
    pub dropped: Counter,
    /// Times the subscription's inbox ([`INBOX`]) was full and the NATS client dropped messages.
    pub inbox_full: Counter,
    pub peers_live: Gauge,
    pub ready: Gauge,
}

impl BusMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("fog_tracker_bus_published", "Bus messages published by kind", self.published.clone());
        registry.register("fog_tracker_bus_received", "Bus messages received by kind", self.received.clone());
        registry.register(
            "fog_tracker_bus_merged",
            "Node records from other replicas merged (newer than the one held)",
            self.merged.clone(),
        );
        registry.register(
            "fog_tracker_bus_stale",
            "Node records from other replicas not newer than the one held (dropped)",
            self.stale.clone(),
        );
        registry.register(
            "fog_tracker_bus_malformed",
            "Bus messages dropped as malformed or out of bounds",
            self.malformed.clone(),
        );
        registry.register(
            "fog_tracker_bus_unknown_version",
            "Bus messages of a version this replica does not speak (dropped)",
            self.unknown_version.clone(),
        );
        registry.register(
            "fog_tracker_bus_dropped",
            "Bus messages not published (outbox full or client failure)",
            self.dropped.clone(),
        );
        registry.register(
            "fog_tracker_bus_inbox_full",
            "Times received messages were dropped because this replica merged slower than they arrived (the \
             NATS client's slow-consumer events)",
            self.inbox_full.clone(),
        );
        registry.register(
            "fog_tracker_bus_peers_live",
            "Other live, ready replicas of this cell",
            self.peers_live.clone(),
        );
        registry.register(
            "fog_tracker_bus_ready",
            "1 when this replica holds the whole cell (subscribed for a heartbeat interval)",
            self.ready.clone(),
        );
    }
}

/// This replica's side of the bus.
#[derive(Debug)]
pub struct Bus {
    client: async_nats::Client,
    cell: String,
    /// This replica's id (random per process): what probes are divided by.
    pub replica: NodeId,
    heartbeat: Duration,
    outbox: mpsc::Sender<Message>,
    outbox_rx: Mutex<Option<mpsc::Receiver<Message>>>,
    /// Since when the client has been connected (and so subscribed) without a break.
    connected_since: Mutex<Option<Instant>>,
    replicas: Mutex<Replicas>,
    /// The live replicas at the last announcement tick, this one included.
    live: Mutex<Vec<NodeId>>,
    /// Node records go out as v2: every replica heard for a whole [`REPLICA_TTL`] reads them.
    node_v2: AtomicBool,
    metrics: BusMetrics,
}

impl Bus {
    /// Connects to the cell's NATS servers (retrying in the background until one answers, and reconnecting
    /// to any of them after a loss) and subscribes to the cell's subjects.
    pub async fn connect(
        cfg: &TrackerConfig,
        metrics: BusMetrics,
    ) -> Result<(Arc<Bus>, async_nats::Subscriber), BusError> {
        let replica = NodeId(rand::random());
        let client = async_nats::ConnectOptions::new()
            .name(format!("fog-tracker {} {}", cfg.cell, &replica.to_hex()[..16]))
            // A replica's own messages are already applied where it made them.
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(2000)))
            .subscription_capacity(INBOX)
            .event_callback({
                let inbox_full = metrics.inbox_full.clone();
                move |event| {
                    // One line per event, at most: a replica falling behind gets one per dropped batch.
                    match &event {
                        async_nats::Event::SlowConsumer(_) => {
                            inbox_full.inc();
                        }
                        async_nats::Event::Connected => tracing::info!("bus: {event}"),
                        _ => tracing::warn!("bus: {event}"),
                    }
                    async {}
                }
            })
            .connect(cfg.nats.as_slice())
            .await
            .map_err(|source| BusError::Connect { urls: cfg.nats.join(","), source })?;
        let subject = wire::wildcard(&cfg.cell);
        let subscriber =
            client.subscribe(subject.clone()).await.map_err(|source| BusError::Subscribe { subject, source })?;
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        let bus = Bus {
            client,
            cell: cfg.cell.clone(),
            replica,
            heartbeat: cfg.heartbeat_interval,
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            connected_since: Mutex::new(None),
            replicas: Mutex::new(Replicas::new(replica, REPLICA_TTL)),
            live: Mutex::new(vec![replica]),
            node_v2: AtomicBool::new(false),
            metrics,
        };
        Ok((Arc::new(bus), subscriber))
    }

    /// Queues `message` for the other replicas; never waits (a full outbox drops it: soft state is sent
    /// again with the next heartbeat, tick or probe).
    pub fn publish(&self, message: Message) {
        if self.outbox.try_send(message).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Whether this replica holds the whole cell.
    pub fn ready(&self) -> bool {
        merge::complete(*self.connected_since.lock().expect("bus lock"), Instant::now(), self.heartbeat)
    }

    /// Why it is not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> Option<String> {
        let since = *self.connected_since.lock().expect("bus lock");
        match since {
            None => Some("not connected to any NATS server".into()),
            Some(_) if !merge::complete(since, Instant::now(), self.heartbeat) => {
                Some(format!("subscribed less than a heartbeat interval ({:?}) ago", self.heartbeat))
            }
            Some(_) => None,
        }
    }

    /// Whether this replica probes `node` (the live replica ranking first for it).
    pub fn probes(&self, node: &NodeId) -> bool {
        merge::prober(node, &self.live.lock().expect("bus lock")) == Some(self.replica)
    }

    /// Publishes the load this replica charged since the last time, if any.
    pub fn flush_load(&self, app: &App) {
        let delta = app.load.lock().expect("load lock").take_delta();
        if !delta.is_empty() {
            self.publish(Message::Load(delta));
        }
    }

    /// [`Bus::flush_load`] early, when the delta has grown to the size one message carries.
    pub fn flush_load_if_full(&self, load: &mut fog_sched::scheduler::Load) {
        if load.delta_len() >= wire::FLUSH_LOAD_ENTRIES {
            self.publish(Message::Load(load.take_delta()));
        }
    }

    /// One announcement tick: follows the connection, publishes this replica's liveness, refreshes the
    /// live set. Whether the replica has just (re)connected.
    fn tick(&self) -> bool {
        let now = Instant::now();
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let (joined, connected_for) = {
            let mut since = self.connected_since.lock().expect("bus lock");
            let joined = match (connected, *since) {
                (true, None) => {
                    tracing::info!(cell = self.cell, "connected to the cell's bus");
                    *since = Some(now);
                    true
                }
                (false, Some(_)) => {
                    tracing::warn!(cell = self.cell, "lost the cell's bus: not ready until reconnected");
                    *since = None;
                    false
                }
                _ => false,
            };
            (joined, since.map(|s| now.saturating_duration_since(s)))
        };
        let ready = self.ready();
        self.metrics.ready.set(i64::from(ready));
        self.publish(Message::Alive(Alive { replica: self.replica, ready, level: wire::LEVEL }));
        let mut replicas = self.replicas.lock().expect("bus lock");
        replicas.expire(now);
        // v2 only once connected long enough to have heard every live replica announce itself; a replica
        // of an older build (or one of those joining) turns it back to v1 within an announcement.
        let heard_all = connected_for.is_some_and(|d| d >= REPLICA_TTL);
        let all_read = replicas.all_read(wire::LEVEL, now);
        let node_v2 = heard_all && all_read;
        if self.node_v2.swap(node_v2, Ordering::Relaxed) != node_v2 {
            let form = match (heard_all, all_read) {
                (true, true) => "v2 (every live replica reads it)",
                (false, _) => "v1 (until every live replica has been heard since connecting)",
                (true, false) => "v1 (a live replica reads only v1)",
            };
            tracing::info!(cell = self.cell, "bus: publishing node records as {form}");
        }
        let live = replicas.live(now);
        self.metrics.peers_live.set(live.len() as i64 - 1);
        *self.live.lock().expect("bus lock") = live;
        joined
    }
}

/// Runs the bus until the process ends: publishes what the outbox gets, merges what the subscription
/// brings, announces this replica and its load.
pub async fn run(app: Arc<App>, bus: Arc<Bus>, mut subscriber: async_nats::Subscriber) {
    let mut tasks = tokio::task::JoinSet::new();
    let announcing = bus.clone();
    app.ingest.cache().on_written(move |url, content| {
        announcing.publish(Message::Manifest(ManifestWritten { url: url.to_string(), content }));
    });
    let outbox = bus.outbox_rx.lock().expect("bus lock").take();
    if let Some(mut outbox) = outbox {
        let bus = bus.clone();
        tasks.spawn(async move {
            while let Some(message) = outbox.recv().await {
                let kind = message.kind();
                let (version, payload) = message.encode(bus.node_v2.load(Ordering::Relaxed));
                let subject = wire::subject(&bus.cell, version, kind);
                match bus.client.publish(subject, payload.into()).await {
                    Ok(()) => {
                        bus.metrics.published.get_or_create(&KindLabel { kind: kind.name() }).inc();
                    }
                    Err(e) => {
                        bus.metrics.dropped.inc();
                        tracing::debug!(error = %e, "bus publish failed");
                    }
                }
            }
        });
    }
    let (ticking, cache) = (bus.clone(), app.ingest.cache().clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(ALIVE_EVERY);
        loop {
            tick.tick().await;
            if ticking.tick() {
                // Other replicas' manifest writes announced while this one was off the bus were missed.
                cache.forget_all();
            }
        }
    });
    let (flushing, app_load) = (bus.clone(), app.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(LOAD_EVERY);
        loop {
            tick.tick().await;
            flushing.flush_load(&app_load);
        }
    });
    // Node records are nearly all the traffic (decoding a v1 one costs ~8× merging it, a v2 one about as
    // much as merging): they are decoded and merged by one worker per core. Merges are last-writer-wins by
    // the node's signed timestamp, so records may be merged out of order. The other kinds are few and keep
    // their order here.
    let workers: Vec<mpsc::Sender<async_nats::Message>> = (0..decoders())
        .map(|_| {
            let (tx, mut rx) = mpsc::channel::<async_nats::Message>(WORKER_QUEUE);
            let (app, bus) = (app.clone(), bus.clone());
            tasks.spawn(async move {
                while let Some(message) = rx.recv().await {
                    receive(&app, &bus, &message.subject, &message.payload);
                }
            });
            tx
        })
        .collect();
    let mut next = 0;
    while let Some(message) = subscriber.next().await {
        if matches!(wire::parse_subject(&bus.cell, &message.subject), Ok((_, wire::Kind::Node))) {
            next = (next + 1) % workers.len();
            // A full worker holds the subscription back: the NATS client's inbox fills and drops, counted.
            if workers[next].send(message).await.is_err() {
                break;
            }
        } else {
            receive(&app, &bus, &message.subject, &message.payload);
        }
    }
    tracing::error!("the bus subscription ended");
    tasks.abort_all();
}

/// Decodes one message from the bus and merges it.
fn receive(app: &App, bus: &Bus, subject: &str, payload: &[u8]) {
    let m = &bus.metrics;
    let message = match wire::parse_subject(&bus.cell, subject).and_then(|(version, kind)| {
        m.received.get_or_create(&KindLabel { kind: kind.name() }).inc();
        Message::decode(version, kind, payload)
    }) {
        Ok(message) => message,
        Err(Refused::UnknownVersion(v)) => {
            m.unknown_version.inc();
            tracing::debug!(version = v, "bus message of another version skipped");
            return;
        }
        Err(e @ (Refused::Malformed(_) | Refused::Record(_))) => {
            m.malformed.inc();
            tracing::warn!(error = %e, "bus message dropped");
            return;
        }
    };
    apply(app, bus, message);
}

/// Merges one decoded message into this replica's state.
fn apply(app: &App, bus: &Bus, message: Message) {
    let m = &bus.metrics;
    match message {
        Message::Node(record) => match app.registry.merge(*record, now_ms()) {
            Ok(merge::Merge::Insert | merge::Merge::Replace) => {
                m.merged.inc();
            }
            Ok(merge::Merge::Stale | merge::Merge::Duplicate) => {
                m.stale.inc();
            }
            // Blocked here, too far off this replica's clock, or no room: the node's next message decides.
            Err(e) => tracing::debug!(error = %e, "node record not merged"),
        },
        Message::Health(h) => app.registry.merge_health(&h.id, h.down, h.quarantined),
        Message::Web(w) => app.registry.record_web_probe(&w.id, w.served),
        Message::Block(b) => {
            if let Err(e) = app.apply_block(b.id, b.block) {
                tracing::error!(node = %b.id, error = %e, "cannot apply another replica's block");
            }
        }
        Message::Load(delta) => {
            let snapshot = app.registry.snapshot();
            app.load.lock().expect("load lock").apply(&delta, &snapshot, now_ms(), app.registry.params());
        }
        Message::Alive(a) => {
            bus.replicas.lock().expect("bus lock").heard(a.replica, a.ready, a.level, Instant::now());
        }
        Message::Manifest(m) => app.ingest.cache().invalidate(&m.url, m.content),
    }
}
