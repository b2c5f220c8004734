//! fogcdn's integration tests against real processes (RocksDB, QUIC, libp2p, HTTP on 127.0.0.1): one
//! test binary with a module per area, so its heavy dependencies are linked once rather than per area.
//! `cargo test --release --workspace --test it -- e2e::` runs one module; scripts/test.sh runs `netns` alone.

mod common;

mod adversarial;
mod c_abi;
mod cluster;
mod cluster_failover;
mod cluster_store;
mod credits;
mod cut_through;
mod dashboard;
mod disk;
mod e2e;
mod earnings;
mod first_view;
mod health;
mod install;
mod ipv6;
mod live;
mod netns;
mod observability;
mod peer_fill;
mod player;
mod tracker_failover;
mod volunteer_budget;
mod web;
mod web_bench;
mod web_origins;
mod web_page;
mod web_players;
mod web_rotation;
mod web_sw;
