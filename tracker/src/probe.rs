//! Active probes: the tracker asks a node for a chunk it should hold, exactly as a client next to the node
//! would (the scheduler's own answer for such a client, a fresh session key, a ticket, the origin hint and
//! the client's deadlines), so a node cannot tell probes from clients and dodge them: one that answers
//! `NotFound` to a request it could fill fails the probe. It verifies the bytes and times the answer.
//! Failures make a node unhealthy after a few in a row; wrong bytes quarantine it at once. Client reports
//! of wrong bytes are not trusted: they trigger a probe, whose verdict counts. Only chunks the scheduler
//! places on the node first are asked for: a node holds those once clients fetched them, so probes rarely
//! cost a fill.
//!
//! In a cell of replicas (`crate::bus`), each node is probed by one replica, the live one ranking first
//! for it by rendezvous, which publishes every verdict; the others take it as their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::chunk::{self, ChunkError, Deadlines};
use fog_net::{transport, webtransport};
use fog_proto::api::{Families, NodeContact, Signed, WebContact};
use fog_proto::credits::ticket_on_wire;
use fog_proto::placement::top_k;
use fog_proto::wire::{ChunkRequest, OriginHint, Status};
use fog_proto::{ChunkHash, Manifest, NodeId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::app::{App, Reach};
use crate::bus::wire::{self, Message};
use crate::metrics::ResultLabel;
use crate::registry::{NodeState, ProbeOutcome};
use fog_sched::coords::{ClientNet, Measured};
use fog_sched::scheduler::Load;

/// Nodes probed per round (a random sample: rounds stay cheap with many nodes) and at once.
const PER_ROUND: usize = 64;
const AT_ONCE: usize = 16;
/// Recently requested objects tried per probe for a chunk the node is the first candidate for.
const OBJECTS_TRIED: usize = 4;

/// A chunk of recently requested content that the scheduler places first on `node`, for a client next to
/// it, with the ticket that client would get. A node not scheduled now (unhealthy, so probes decide when it
/// comes back) is asked for a chunk rendezvous places on it, with a ticket for it alone.
fn chunk_for(app: &App, node: &NodeId) -> Option<(Manifest, usize, Option<Signed>)> {
    let snapshot = app.registry.snapshot();
    if !snapshot.nodes.iter().any(|n| n.contact.id == *node) {
        let mut ids: Vec<NodeId> = snapshot.nodes.iter().map(|n| n.contact.id).collect();
        ids.push(*node);
        for top in app.dashboard.top_content().into_iter().take(OBJECTS_TRIED) {
            // Recently requested: in memory, no database read.
            let Some(stored) = app.ingest.cache().cached(&top.url) else { continue };
            let m = stored.manifest.clone();
            let here = |c: &ChunkHash| top_k(c, &ids, app.cfg.candidates).into_iter().any(|j| ids[j] == *node);
            let Some(index) = m.chunks.iter().position(here) else { continue };
            let key: NodeId = SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().into();
            let ticket = app.ledger.issue_ticket(None, key, m.content_id(), vec![*node], vec![1], m.chunk_size, m.size);
            return Some((m, index, ticket.ok().flatten()));
        }
        return None;
    }
    let coord = app.registry.coord_of(node)?;
    let next_to_it =
        ClientNet { coord: Some(coord), measured: vec![Measured { node: *node, rtt_ms: 1.0, agrees: true }] };
    for top in app.dashboard.top_content().into_iter().take(OBJECTS_TRIED) {
        let Some(stored) = app.ingest.cache().cached(&top.url) else { continue };
        let m = stored.manifest.clone();
        // A scratch load: a probe is one chunk, not the object the schedule covers.
        let first_here = |key: Option<NodeId>| {
            // The prober dials either family (its endpoint is dual-stack), as a dual-stack client would.
            let both = Reach { families: Families::BOTH, browser: false };
            let (nodes, schedule, ticket) = app.assign(&m, Some(&next_to_it), both, &mut Load::default(), key, None);
            let slot = nodes.iter().position(|n| n.id == *node)? as u32;
            Some((schedule.iter().position(|c| c.first() == Some(&slot))?, ticket))
        };
        // The ticket (a ledger write) only for the object chosen; the same inputs give the same schedule.
        if first_here(None).is_some() {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let (index, ticket) = first_here(Some(key.verifying_key().into()))?;
            return Some((m, index, ticket));
        }
    }
    None
}

async fn probe_one(app: &App, endpoint: &quinn::Endpoint, node: &NodeContact) -> ProbeOutcome {
    let Some((manifest, index, ticket)) = chunk_for(app, &node.id) else { return ProbeOutcome::NoData };
    let hash: ChunkHash = manifest.chunks[index];
    let (offset, len) = manifest.chunk_span(index);
    let deadlines = Deadlines::default();
    let started = Instant::now();
    let conn = match transport::connect_contact(endpoint, node, Duration::from_secs(10), deadlines.first_byte).await {
        Ok(c) => c,
        Err(e) => return ProbeOutcome::Failed(e.to_string()),
    };
    let ticket = ticket.as_ref().and_then(ticket_on_wire);
    let licensed = ticket.is_some();
    let req = ChunkRequest {
        hash,
        range: None,
        origin: Some(OriginHint { url: manifest.url.clone(), offset, length: len }),
        receipt: None,
        ticket,
        groups: manifest.group_hashes(index),
    };
    let outcome = match chunk::request(&conn, &req, len, deadlines, None).await {
        Ok(bytes) if ChunkHash::of(&bytes) == hash => ProbeOutcome::Ok { rtt_ms: started.elapsed().as_millis() as u64 },
        Ok(_) => ProbeOutcome::WrongBytes,
        // The origin's trouble, or the node's fair limits: no verdict on the node.
        Err(ChunkError::Refused { status: Status::OriginFailed | Status::OriginMismatch | Status::Busy, .. }) => {
            ProbeOutcome::NoData
        }
        // `NotFound` to a request with a hint and a ticket is a node refusing to serve what it can; without a
        // ticket (the ledger failed), the node may not fill.
        Err(ChunkError::Refused { status: Status::NotFound, .. }) if !licensed => ProbeOutcome::NoData,
        Err(e) => ProbeOutcome::Failed(e.to_string()),
    };
    conn.close(0u32.into(), b"probe done");
    outcome
}

fn record(app: &App, node: &NodeContact, outcome: &ProbeOutcome) {
    let result = match outcome {
        ProbeOutcome::Ok { .. } => "ok",
        ProbeOutcome::NoData => "no_data",
        ProbeOutcome::Failed(_) => "failed",
        ProbeOutcome::WrongBytes => "wrong_bytes",
    };
    app.metrics.probes.get_or_create(&ResultLabel { result }).inc();
    let short = &node.id.to_hex()[..16];
    if let ProbeOutcome::Failed(e) = outcome {
        tracing::debug!(node = %node.id, error = %e, "probe failed");
    }
    let change = app.registry.record_probe(&node.id, outcome);
    if let (Some(bus), Some((down, quarantined))) = (app.bus.get(), app.registry.health_of(&node.id)) {
        bus.publish(Message::Health(wire::Health { id: node.id, down, quarantined }));
    }
    if let Some((from, to)) = change {
        let why = match outcome {
            ProbeOutcome::Failed(e) => format!(": probes keep failing ({e})"),
            ProbeOutcome::WrongBytes => ": it served bytes that do not match their hash".into(),
            _ => String::new(),
        };
        let kind = if to == NodeState::Quarantined { "quarantine" } else { "probe" };
        tracing::warn!(node = %node.id, from = from.name(), to = to.name(), "node state changed by a probe");
        app.dashboard.event(kind, format!("node {short}: {} → {}{why}", from.name(), to.name()));
    }
}

/// How long a browser endpoint's probe may take to open a session.
const WEB_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a WebTransport session to a node's browser endpoint as a page of a registered site would, pinning
/// the hashes the node advertised: browsers get the endpoint only after this succeeded (see
/// `registry::web`). The bytes it serves are checked by the native probes: one server code path serves both.
async fn probe_web(app: &App, node: NodeId, web: WebContact) {
    let Some(page) = app.cfg.web_origins.as_slice().first() else { return };
    let served = match webtransport::open_as_page(&web, page, WEB_PROBE_TIMEOUT).await {
        Ok((session, served)) => {
            session.close(0, b"probe done");
            app.metrics.web_probes.get_or_create(&ResultLabel { result: "ok" }).inc();
            Some(served)
        }
        Err(e) => {
            app.metrics.web_probes.get_or_create(&ResultLabel { result: "failed" }).inc();
            tracing::info!(%node, url = web.url, error = %e, "probe of a browser endpoint failed");
            None
        }
    };
    app.registry.record_web_probe(&node, served);
    if let Some(bus) = app.bus.get() {
        bus.publish(Message::Web(wire::Web { id: node, served }));
    }
}

/// Whether this tracker probes `node`: always alone; in a cell, if it is the node's prober.
fn mine(app: &App, node: &NodeId) -> bool {
    app.bus.get().is_none_or(|bus| bus.probes(node))
}

/// Probes a sample of nodes every `every`, and at once any node a client reported, until the process ends.
/// (A client's report reaches one replica, which probes the node itself.)
pub async fn probe_forever(app: Arc<App>, every: Duration, mut urgent: mpsc::Receiver<NodeId>) {
    let Some(endpoint) = app.dialer.clone() else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        let mut targets: Vec<NodeContact> = tokio::select! {
            _ = tick.tick() => app.registry.probe_targets().into_iter().filter(|n| mine(&app, &n.id)).collect(),
            Some(id) = urgent.recv() => app.registry.probe_targets().into_iter().filter(|n| n.id == id).collect(),
        };
        // A random sample, so that rounds stay bounded however many nodes there are.
        while targets.len() > PER_ROUND {
            let i = rand::random::<u64>() as usize % targets.len();
            targets.swap_remove(i);
        }
        let mut running = JoinSet::new();
        for node in targets {
            if running.len() >= AT_ONCE {
                running.join_next().await;
            }
            let (app, endpoint) = (app.clone(), endpoint.clone());
            running.spawn(async move {
                let outcome = probe_one(&app, &endpoint, &node).await;
                record(&app, &node, &outcome);
            });
        }
        // Browser endpoints no probe vouched for yet (new, rotated or restarted ones), when pages may come.
        if !app.cfg.web_origins.is_empty() {
            let targets = app.registry.web_probe_targets().into_iter().filter(|(node, _)| mine(&app, node));
            for (node, web) in targets.take(PER_ROUND) {
                if running.len() >= AT_ONCE {
                    running.join_next().await;
                }
                let app = app.clone();
                running.spawn(async move { probe_web(&app, node, web).await });
            }
        }
        while running.join_next().await.is_some() {}
    }
}
