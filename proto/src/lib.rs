//! fog-proto: the vocabulary every fogcdn component shares, with no I/O.
//!
//! - [`id`]: BLAKE3 chunk hashes and content ids, ed25519 node ids.
//! - [`manifest`]: how an origin object is split into verified chunks.
//! - [`groups`]: verifying a chunk group by group as it streams (BLAKE3's tree).
//! - [`wire`]: the QUIC chunk protocol frames (the normative spec is `docs/protocol.md`).
//! - [`api`]: the tracker's HTTP API types.
//! - [`hls`]: HLS media playlists (segments, live or ended), read by the player proxy and the tracker.
//! - [`placement`]: rendezvous hashing, the one placement function tracker and nodes share.
//! - [`rendezvous`]: frames of the rendezvous protocol that lets clients reach nodes behind NAT.
//! - [`rtt`]: the moving-percentile RTT filter nodes apply before reporting RTTs.
//! - [`cache`]: the cache eviction policy, pure so the node and the simulator run the same code.
//! - [`origins`]: which URLs belong to operator-registered origins.
//! - [`size`]: human-friendly byte sizes (`64MiB`) for configuration.
//! - [`web`]: the web origins (sites) whose pages may use the fog from a browser.

pub mod api;
pub mod cache;
pub mod credits;
pub mod groups;
pub mod hls;
pub mod id;
pub mod manifest;
pub mod merkle;
pub mod origins;
pub mod placement;
pub mod rendezvous;
pub mod rtt;
pub mod size;
pub mod web;
pub mod wire;

pub use id::{ChunkHash, ContentId, NodeId};
pub use manifest::Manifest;
