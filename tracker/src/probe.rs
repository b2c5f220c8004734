//! Active probes: the tracker asks a node for a chunk it should hold (one the scheduler places on it, with
//! no origin hint, so a probe never costs an origin fetch), verifies the bytes and times the answer. Failures
//! make a node unhealthy after a few in a row; wrong bytes quarantine it at once. Client reports of wrong
//! bytes are not trusted: they trigger a probe, whose verdict counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_client::chunk::{self, ChunkError, Deadlines};
use fog_client::transport;
use fog_proto::api::NodeContact;
use fog_proto::placement::top_k;
use fog_proto::wire::{ChunkRequest, Status};
use fog_proto::{ChunkHash, Manifest, NodeId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::http::App;
use crate::metrics::ResultLabel;
use crate::registry::{NodeState, ProbeOutcome};

/// Nodes probed per round (a random sample: rounds stay cheap with many nodes) and at once.
const PER_ROUND: usize = 64;
const AT_ONCE: usize = 16;
const DEADLINES: Deadlines = Deadlines { first_byte: Duration::from_secs(3), stall: Duration::from_secs(3) };

/// A chunk of recently requested content that the scheduler places on `node`.
fn chunk_for(app: &App, node: &NodeId) -> Option<(Manifest, usize)> {
    let mut ids: Vec<NodeId> = app.registry.snapshot().nodes.iter().map(|n| n.contact.id).collect();
    if !ids.contains(node) {
        ids.push(*node);
    }
    for top in app.dashboard.top_content() {
        let Ok(Some(stored)) = app.db.manifest(&top.url) else { continue };
        let m = stored.manifest;
        for _ in 0..32.min(m.chunks.len()) {
            let i = rand::random::<u64>() as usize % m.chunks.len();
            if top_k(&m.chunks[i], &ids, app.cfg.candidates).into_iter().any(|j| ids[j] == *node) {
                return Some((m, i));
            }
        }
    }
    None
}

async fn probe_one(app: &App, endpoint: &quinn::Endpoint, node: &NodeContact) -> ProbeOutcome {
    let Some((manifest, index)) = chunk_for(app, &node.id) else { return ProbeOutcome::NoData };
    let hash: ChunkHash = manifest.chunks[index];
    let len = manifest.chunk_span(index).1;
    let started = Instant::now();
    let conn = match transport::connect_contact(endpoint, node, Duration::from_secs(10), DEADLINES.first_byte).await {
        Ok(c) => c,
        Err(e) => return ProbeOutcome::Failed(e),
    };
    let req = ChunkRequest { hash, range: None, origin: None, receipt: None, ticket: None };
    let outcome = match chunk::request(&conn, &req, len, DEADLINES, None).await {
        Ok(bytes) if ChunkHash::of(&bytes) == hash => ProbeOutcome::Ok { rtt_ms: started.elapsed().as_millis() as u64 },
        Ok(_) => ProbeOutcome::WrongBytes,
        Err(ChunkError::Refused { status: Status::NotFound, .. }) => ProbeOutcome::NoData,
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
    if let Some((from, to)) = app.registry.record_probe(&node.id, outcome) {
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

/// Probes a sample of nodes every `every`, and at once any node a client reported, until the process ends.
pub async fn probe_forever(app: Arc<App>, every: Duration, mut urgent: mpsc::Receiver<NodeId>) {
    let Some(endpoint) = app.dialer.clone() else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        let mut targets = tokio::select! {
            _ = tick.tick() => app.registry.probe_targets(),
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
        while running.join_next().await.is_some() {}
    }
}
