//! fog-node: a volunteer's node. It caches verified chunks in RocksDB under the owner's disk quota, serves
//! them over QUIC under the owner's upload cap, pulls misses through from registered origins, and reports
//! to the tracker without depending on it.

pub mod budget;
pub mod cell;
pub mod config;
pub mod credits;
pub mod earnings;
pub mod fill;
pub mod grants;
pub mod limits;
pub mod overlay;
pub mod receipts;
pub mod rendezvous;
pub mod schedule;
pub mod serve;
pub mod stats;
pub mod status;
pub mod store;
pub mod tracker_link;
pub mod web;

mod run;
pub use run::{run, NodeError, STATUS_ADDR_FILE};
