#!/usr/bin/env bash
# Runs fogcdn's whole test suite: installs missing system packages, builds (release profile, shared
# target dir), checks formatting and lints, then runs unit and integration tests against real RocksDB,
# QUIC and HTTP on 127.0.0.1. Ends with one line: "tests: N passed, N failed".
#   scripts/test.sh [extra cargo test args, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_build_deps
# The dashboard test drives a real browser; without one it skips, saying so.
ensure_packages chromium chromium-driver || log "warning: Chromium could not be installed; the browser test will skip"
# The player tests generate and play real HLS/DASH/MP4 with ffmpeg; without it they skip, saying so.
ensure_packages ffmpeg || log "warning: ffmpeg could not be installed; the player tests will skip"
# rustfmt and clippy come with the toolchain here; where they are missing, say so rather than fail.
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; else log "rustfmt missing: format check skipped"; fi
build_release
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --release --locked --workspace --all-targets -- -D warnings
else
    log "clippy missing: lint check skipped"
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Integration tests start real processes, each with its own RocksDB; two test threads keep 2 cores busy
# without starving the QUIC timers under test.
status=0
cargo test --release --locked --workspace -- --test-threads=2 "$@" 2>&1 | tee "$out" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$out"
exit "$status"
