#!/usr/bin/env bash
# Group hashes (verified cut-through): manifest size per chunk and verification throughput for each group
# size, against verifying chunks whole, in the same run.
#   scripts/bench/groups.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ensure_build_deps
# Built with the workspace (a per-package build resolves features differently and recompiles RocksDB).
cargo build --release --locked --workspace --examples
"$FOG_BIN/examples/bench_groups" "$@"
