#!/usr/bin/env bash
# Chunk store benchmark: write and read throughput, write amplification (bytes written to files per byte
# cached) and disk footprint (peak and idle) of today's layout against the layout before it, in the same
# run on the same disk. Four times the quota passes through a 256 MiB cache.
#   scripts/bench/store.sh [DIR]    (DIR: where to put the stores; default $TMPDIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ensure_build_deps
# Built with the workspace (a per-package build resolves features differently and recompiles RocksDB).
cargo build --release --locked --workspace --examples
"$FOG_BIN/examples/bench_store" "$@"
