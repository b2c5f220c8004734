#!/usr/bin/env bash
# Credits benchmark: receipts verified per second, ledger appends per second (real RocksDB, one synced
# batch per 256 receipts), and the receipts' overhead per 1 MiB chunk served.
#   scripts/bench/credits.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ensure_build_deps
cargo run --release --locked -q -p fog-tracker --example bench_credits
