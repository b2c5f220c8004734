use std::sync::{Arc, RwLock};

use anyhow::Context;
use clap::Parser;
use fog_net::origin::OriginClient;
use fog_tracker::app::App;
use fog_tracker::clock::Clock;
use fog_tracker::config::{ExportArgs, TrackerArgs, TrackerCommand};
use fog_tracker::db::Db;
use fog_tracker::ledger::{export_to_postgres, Ledger, LedgerStore, PgStore, LEASE};
use fog_tracker::run::run;
use fog_tracker::store::{StoreError, Stores};

/// How long a starting replica waits for PostgreSQL (failing over, or starting with it) before giving up.
const POSTGRES_START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    // The NATS client logs every event at INFO, a slow consumer once per dropped batch: the bus logs and
    // counts them itself (`fog_tracker_bus_inbox_full_total`).
    fog_net::bin_support::init_logging("info,async_nats=warn");
    let args = TrackerArgs::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(TrackerCommand::Export(export)) = &args.command {
        return runtime.block_on(export_main(export));
    }
    let cfg = args.resolve()?;
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
        let (advertised, guessed) = cfg.advertised_url(local);
        if guessed && (!cfg.nats.is_empty() || cfg.postgres.is_some()) {
            tracing::warn!(
                url = advertised,
                "listening on all addresses: this replica advertises its host's primary address to the cell; give \
                 --advertise-url if other replicas and nodes reach it at another"
            );
        }
        let stores = match &cfg.postgres {
            None => Stores::embedded(db.clone()).await?,
            Some(conn) => postgres_stores(conn).await?,
        };
        // With PostgreSQL (up by now) the ledger lives there too, appended by one replica at a time.
        let (ledger, lease_metrics) = match &cfg.postgres {
            None => (Ledger::new(db.clone(), key, cfg.epoch, cfg.tickets_per_minute, Clock::System), None),
            Some(conn) => {
                let shards = PgStore::connect_shards(conn, &advertised, LEASE, cfg.ledger_shards)?;
                let metrics = shards[0].metrics();
                let stores = shards.into_iter().map(|s| s as Arc<dyn LedgerStore>).collect();
                let ledger = Ledger::with_shards(stores, key, cfg.epoch, cfg.tickets_per_minute, Clock::System);
                (ledger, Some(metrics))
            }
        };
        tracing::info!(tracker_key = %ledger.public_key(), "signing tickets and ledger heads");
        let mut app = App::new(cfg, stores, origin, ledger);
        if let Some(metrics) = &lease_metrics {
            app.metrics.register_ledger(metrics);
        }
        let app = Arc::new(app);
        run(app, listener, fog_net::bin_support::shutdown()).await;
        tracing::info!("fog-tracker stopped");
        anyhow::Ok(())
    })
}

/// The stores in PostgreSQL, waiting (up to [`POSTGRES_START_WAIT`]) while no primary answers.
async fn postgres_stores(conn: &str) -> Result<Stores, StoreError> {
    let started = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(250);
    loop {
        match Stores::postgres(conn).await {
            Err(e) if e.is_retryable() && started.elapsed() < POSTGRES_START_WAIT => {
                tracing::warn!(error = %e, "PostgreSQL unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            stores => return stores,
        }
    }
}

/// `fog-tracker export`: an embedded tracker's state into PostgreSQL.
async fn export_main(args: &ExportArgs) -> anyhow::Result<()> {
    let dir = args.data_dir();
    let path = dir.join("db");
    anyhow::ensure!(path.exists(), "no embedded tracker database at {} (--data-dir)", path.display());
    let db = Arc::new(Db::open(&path)?);
    let from = Stores::embedded(db.clone()).await?;
    let to = Stores::postgres(&args.postgres).await.context("cannot open the PostgreSQL to export into")?;
    let done = fog_tracker::store::export(&from, &to).await.map_err(|e| match e {
        StoreError::Conflict { .. } => anyhow::anyhow!("{e}\nrefusing to overwrite: nothing after it was copied"),
        e => e.into(),
    })?;
    println!(
        "exported {} manifests ({} new, {} already there) and {} blocked nodes from {}",
        done.manifests_new + done.manifests_same,
        done.manifests_new,
        done.manifests_same,
        done.blocked_nodes,
        dir.display()
    );
    export_ledger(&db, &args.postgres).await?;
    Ok(())
}

/// The ledger's part of `fog-tracker export`: entries with their leaf indices, and signed heads, so that
/// heads nodes already verified still verify (checked: the roots must match).
async fn export_ledger(db: &Arc<Db>, postgres: &str) -> anyhow::Result<()> {
    let (db, postgres) = (db.clone(), postgres.to_string());
    let stats = tokio::task::spawn_blocking(move || export_to_postgres(db, &postgres)).await??;
    println!("exported the {stats}");
    Ok(())
}
