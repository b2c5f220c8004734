//! fog-client: fetch objects through fogcdn.
//!
//! [`FogClient::get`] asks the tracker for the object's manifest and a schedule of nodes, fetches chunks
//! from those nodes over QUIC in parallel, verifies every chunk against its BLAKE3 hash, tries the next
//! candidate on any error, timeout or wrong byte, and finally fetches the range from the origin. A caller
//! never receives a byte that did not verify. If the tracker is unreachable it fetches from the origin.
//!
//! The [`origin`], [`tracker`], [`transport`], [`chunk`], [`http_server`] and [`bin_support`] modules are
//! shared with fog-node and fog-tracker.

pub mod bin_support;
pub mod chunk;
mod fetch;
pub mod ffi;
pub mod http_server;
pub mod identity;
pub mod origin;
pub mod per_source;
pub mod proxy;
pub mod rendezvous;
pub mod tracker;
pub mod transport;

pub use fetch::{ClientConfig, ClientError, FetchOptions, FetchReport, FogClient, NodeUse, Resolved};
