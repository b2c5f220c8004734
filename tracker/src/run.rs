//! What a running tracker does besides answering requests: its background tasks, started and stopped
//! with the HTTP server.
//!
//! - the sampler: a dashboard sample every [`SAMPLE_EVERY`], forgetting the load of nodes that left;
//! - the sealer: signs the ledger head that closes each epoch, once the epoch has ended;
//! - the prober (with `--probe-every`): fetches a chunk from each node as a client would, and at once from
//!   nodes reported to serve wrong bytes;
//! - the live follower: polls the live playlists players report and pushes their new segments (`live`).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::App;
use crate::dashboard::SAMPLE_EVERY;

/// How often the sealer looks for an ended epoch; epochs last minutes, so a late seal is seconds late.
const SEAL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Serves HTTP on `listener` and runs the background tasks until `shutdown` resolves.
pub async fn run(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sample_forever(app.clone()));
    tasks.spawn(seal_forever(app.clone()));
    let urgent = app.urgent_rx.lock().expect("probe channel lock").take();
    if let (Some(every), Some(urgent)) = (app.cfg.probe_every, urgent) {
        tasks.spawn(crate::probe::probe_forever(app.clone(), every, urgent));
    }
    if let Some(started) = app.live.start_rx.lock().expect("live channel lock").take() {
        tasks.spawn(crate::live::follow_forever(app.clone(), started));
    }
    crate::http::serve(app, listener, shutdown).await;
    tasks.abort_all();
}

async fn sample_forever(app: Arc<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        app.sample();
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
            Ok(Err(e)) => tracing::error!(error = %e, "cannot seal the ledger's epoch head"),
            Err(e) => tracing::error!(error = %e, "the ledger sealer panicked"),
        }
    }
}
