#!/usr/bin/env bash
# Runs fogcdn's whole test suite: installs missing system packages, builds (release profile, shared
# target dir), then runs unit and integration tests against real RocksDB, QUIC and HTTP on 127.0.0.1.
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_build_deps
build_release
# Integration tests start real processes, each with its own RocksDB; two test threads keep 2 cores busy
# without starving the QUIC timers under test.
cargo test --release --locked --workspace -- --test-threads=2 "$@"
