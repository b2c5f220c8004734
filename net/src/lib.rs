//! fog-net: the I/O that fogcdn's processes share, below any one role.
//!
//! QUIC and TLS with key pinning ([`transport`]), one chunk request to a node ([`chunk`]), origins as
//! ordinary web servers ([`origin`]), the tracker's API as its callers see it ([`tracker`]) over one URL
//! or several replicas ([`trackers`]), the client side of hole punching ([`rendezvous`]), a WebTransport
//! session as a browser page opens it ([`webtransport`]), the small bounded HTTP server behind every HTTP
//! surface ([`http_server`]), per-source fairness ([`per_source`]), uploads that yield to the host's own traffic
//! ([`ledbat`]), long-lived keys ([`identity`]), retry delays ([`backoff`]) and what binaries share
//! ([`bin_support`]). The node, the tracker and the player SDK (fog-client) build on it; it knows nothing
//! of any of them.

pub mod backoff;
pub mod bin_support;
pub mod chunk;
pub mod frame_io;
pub mod http_server;
pub mod identity;
pub mod ledbat;
pub mod origin;
pub mod per_source;
pub mod rendezvous;
pub mod tracker;
pub mod trackers;
pub mod transport;
pub mod webtransport;
