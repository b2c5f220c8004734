#!/usr/bin/env bash
# Credits benchmark: receipts verified per second, ledger appends per second (real RocksDB, one synced
# batch per 256 receipts), and the receipts' overhead per 1 MiB chunk served.
#   scripts/bench/credits.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ensure_build_deps
# Built with the workspace: `cargo run -p fog-tracker` resolves features per package and rebuilds RocksDB's
# dependencies (10 minutes measured).
cargo build --release --locked -q --workspace --examples
"$CARGO_TARGET_DIR/release/examples/bench_credits"
