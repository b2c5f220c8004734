use std::sync::{Arc, RwLock};

use anyhow::Context;
use clap::Parser;
use fog_net::origin::OriginClient;
use fog_tracker::app::App;
use fog_tracker::clock::Clock;
use fog_tracker::config::TrackerArgs;
use fog_tracker::db::Db;
use fog_tracker::ledger::Ledger;
use fog_tracker::run::run;

fn main() -> anyhow::Result<()> {
    fog_net::bin_support::init_logging("info");
    let cfg = TrackerArgs::parse().resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
        let db = Arc::new(Db::open(&cfg.data_dir.join("db"))?);
        let origin = OriginClient::new(Some(Arc::new(RwLock::new(cfg.origins.clone()))));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(origins = ?cfg.origins.prefixes(), chunk_size = cfg.chunk_size, "fog-tracker listening on http://{local}");
        let key = fog_net::identity::load_or_create(&cfg.data_dir.join("tracker.key"))?;
        let ledger = Ledger::new(db.clone(), key, cfg.epoch, cfg.tickets_per_minute, Clock::System);
        tracing::info!(tracker_key = %ledger.public_key(), "signing tickets and ledger heads");
        let app = Arc::new(App::new(cfg, db, origin, ledger)?);
        run(app, listener, fog_net::bin_support::shutdown()).await;
        tracing::info!("fog-tracker stopped");
        anyhow::Ok(())
    })
}
