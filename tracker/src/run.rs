//! What a running tracker does besides answering requests: its background tasks, started and stopped
//! with the HTTP server.
//!
//! - the sampler: a dashboard sample every [`SAMPLE_EVERY`], forgetting the load of nodes that left;
//! - the snapshot refresher: rebuilds the scheduling snapshot every half [`SNAPSHOT_TTL`], off the workers;
//! - the sealer: keeps the leases of the ledger shards this replica sequences, and signs each one's head
//!   that closes an epoch, once the epoch has ended;
//! - the prober (with `--probe-every`): fetches a chunk from each node as a client would, and at once from
//!   nodes reported to serve wrong bytes;
//! - the live follower: polls the live playlists players report and pushes their new segments (`live`);
//! - the manifest writer: stores the manifest writes held while the database was unavailable (`store`);
//! - the bus (with `--nats`): shares the registry, load and blocks with the cell's other replicas (`bus`).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::App;
use crate::dashboard::SAMPLE_EVERY;
use crate::registry::SNAPSHOT_TTL;

/// How often the sealer looks for an ended epoch; epochs last minutes, so a late seal is seconds late.
const SEAL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping tracker keeps trying to store the manifest writes still held.
const DRAIN_WRITES: Duration = Duration::from_secs(5);

/// Serves HTTP on `listener` and runs the background tasks until `shutdown` resolves.
pub async fn run(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let mut tasks = tokio::task::JoinSet::new();
    if !app.cfg.nats.is_empty() {
        // Connecting never waits for a server (it retries in the background); until the replica is
        // connected and complete, `/readyz` says so.
        match crate::bus::Bus::connect(&app.cfg, app.metrics.bus.clone()).await {
            Ok((bus, subscriber)) => {
                let _ = app.bus.set(bus.clone());
                tasks.spawn(crate::bus::run(app.clone(), bus, subscriber));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot join the cell's bus: this replica stays not ready");
                // Nobody would take what the scheduler records for the other replicas.
                *app.load.lock().expect("load lock") = fog_sched::scheduler::Load::default();
            }
        }
    }
    tasks.spawn(sample_forever(app.clone()));
    tasks.spawn(refresh_snapshots_forever(app.clone()));
    tasks.spawn(seal_forever(app.clone()));
    let manifests = app.ingest.cache().clone();
    tasks.spawn(manifests.clone().write_pending_forever());
    let urgent = app.urgent_rx.lock().expect("probe channel lock").take();
    if let (Some(every), Some(urgent)) = (app.cfg.probe_every, urgent) {
        tasks.spawn(crate::probe::probe_forever(app.clone(), every, urgent));
    }
    if let Some(started) = app.live.start_rx.lock().expect("live channel lock").take() {
        tasks.spawn(crate::live::follow_forever(app.clone(), started));
    }
    crate::http::serve(app, listener, shutdown).await;
    let lost = manifests.drain(DRAIN_WRITES).await;
    if lost > 0 {
        tracing::warn!(
            lost,
            "the database is still unavailable: manifests not stored are ingested again when asked for"
        );
    }
    tasks.abort_all();
}

async fn sample_forever(app: Arc<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        app.sample();
    }
}

/// Keeps the scheduling snapshots fresh off the async workers, so resolves never wait for a rebuild that is
/// due only to the snapshot's age (~80 ms of CPU at 10^5 nodes).
async fn refresh_snapshots_forever(app: Arc<App>) {
    let mut tick = tokio::time::interval(SNAPSHOT_TTL / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let app = app.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || app.registry.refresh_snapshots()).await {
            tracing::error!(error = %e, "the snapshot refresher panicked");
        }
    }
}

async fn seal_forever(app: Arc<App>) {
    let mut tick = tokio::time::interval(SEAL_CHECK_EVERY);
    loop {
        tick.tick().await;
        // A seal is a synced write: off the async workers.
        let app = app.clone();
        match tokio::task::spawn_blocking(move || app.ledger.seal_epochs()).await {
            Ok(Ok(())) => {}
            // A database outage or a lost lease passes: the next tick seals what this one could not.
            Ok(Err(e)) if e.is_retryable() => tracing::warn!(error = %e, "cannot seal the ledger's epoch head yet"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot seal the ledger's epoch head"),
            Err(e) => tracing::error!(error = %e, "the ledger sealer panicked"),
        }
    }
}
