//! fog-tracker: ingests objects from registered origins into BLAKE3 manifests, keeps the registry of fog
//! nodes and their health, schedules each chunk to candidate nodes, credits nodes from clients' receipts,
//! and reports stats and metrics.
//!
//! `app` is what requests mean, `http` only routes and maps errors to statuses, `run` starts the
//! background tasks; `registry`, `ledger`, `ingest`, `live` and `probe` are the domain's parts; `bus` makes
//! the tracker one replica of a cell (`--nats`).

pub mod app;
pub mod bus;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod live;
pub mod metrics;
pub mod probe;
pub mod registry;
pub mod run;
pub mod store;
