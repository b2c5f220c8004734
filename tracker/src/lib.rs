//! fog-tracker: ingests objects from registered origins into BLAKE3 manifests, keeps the registry of fog
//! nodes and their health, schedules each chunk to candidate nodes, and reports stats and metrics.

pub mod config;
pub mod dashboard;
pub mod db;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod metrics;
pub mod probe;
pub mod registry;
