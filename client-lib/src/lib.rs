//! fog-client: fetch objects through fogcdn.
//!
//! [`FogClient::get`] asks the tracker for the object's manifest and a schedule of nodes, fetches chunks
//! from those nodes over QUIC in parallel, verifies every chunk against its BLAKE3 hash, tries the next
//! candidate on any error, timeout or wrong byte, and finally fetches the range from the origin. A caller
//! never receives a byte that did not verify. If the tracker is unreachable it fetches from the origin.
//!
//! The [`origin`], [`tracker`], [`transport`] and [`chunk`] modules are shared with fog-node.

pub mod bin_support;
pub mod chunk;
mod fetch;
pub mod origin;
pub mod tracker;
pub mod transport;

pub use fetch::{ClientConfig, ClientError, FetchReport, FogClient};
