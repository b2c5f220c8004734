//! fog-client: fetch objects through fogcdn — the player-facing SDK.
//!
//! [`FogClient::get`] asks the tracker for the object's manifest and a schedule of nodes, fetches chunks
//! from those nodes over QUIC in parallel, verifies every chunk against its BLAKE3 hash, tries the next
//! candidate on any error, timeout or wrong byte, and finally fetches the range from the origin. A caller
//! never receives a byte that did not verify. If the tracker is unreachable it fetches from the origin.
//!
//! Around it: the local player [`proxy`], the C ABI ([`ffi`]) and the `fog` CLI. The I/O underneath
//! (QUIC, origins, the tracker API, the HTTP server) is fog-net's, shared with the node and the tracker.

mod fetch;
pub mod ffi;
pub mod proxy;
pub mod publish;

pub use fetch::{ClientConfig, ClientError, FetchOptions, FetchReport, FogClient, NodeUse, Resolved};
