#!/usr/bin/env bash
# Runs fogcdn's whole test suite: installs missing system packages, builds (release profile, shared
# target dir), checks formatting and lints, then runs unit and integration tests against real RocksDB,
# QUIC, libp2p and HTTP on 127.0.0.1. Ends with one line: "tests: N passed, N failed".
#   scripts/test.sh [extra cargo test args, e.g. a test name filter; e2e:: is one integration test module]
#   scripts/test.sh --netns    only the overlay tests across network namespaces and NATs (needs root)
# As root, the full run includes the network-namespace tests; otherwise they skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
netns_only=false
CARGO_DEB_VERSION=3.8.0
# ensure_cargo_deb: cargo-deb $CARGO_DEB_VERSION in ~/.cache/fogcdn/tools/bin, where the .deb test finds it.
ensure_cargo_deb() {
    local tools="$HOME/.cache/fogcdn/tools"
    [ "$("$tools/bin/cargo-deb" --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ] && return 0
    log "installing cargo-deb $CARGO_DEB_VERSION into $tools"
    env -u CARGO_TARGET_DIR cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --root "$tools" >&2
}
if [ "${1:-}" = "--netns" ]; then netns_only=true; shift; fi
ensure_build_deps
# The network-namespace tests need iptables (home routers' NAT; the package has ip6tables too, for the IPv6
# home's firewall), iproute2 and python3 (delay lines).
if [ "$(id -u)" -eq 0 ]; then
    ensure_packages iptables iproute2 python3 || log "warning: iptables could not be installed; the netns tests will skip"
    # The install tests (install::) add the node's user in a throwaway root, check its unit with
    # systemd-analyze, and build and install the .deb with cargo-deb (pinned, in ~/.cache/fogcdn/tools).
    ensure_packages systemd passwd dpkg || log "warning: systemd or passwd could not be installed; the install tests will skip"
    ensure_cargo_deb || log "warning: cargo-deb could not be installed; the .deb test will skip"
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
# run_tests CARGO_TEST_ARGS... -- TEST_ARGS...: runs the tests, keeping their output for the closing count
# and a failure's exit status in $status.
run_tests() {
    local s=0
    cargo test --release --locked "$@" 2>&1 | tee -a "$out" || s=$?
    [ "$s" -eq 0 ] || status=$s
}
# The integration tests are one binary, `it`, a module per file of testkit/tests/it/. The netns module runs
# alone (it holds the RTTs it measures to its delay lines within 20 %): the others skip it, then it runs.
# run_netns TEST_ARGS...: its tests matching TEST_ARGS, one at a time. Skipping the other modules, rather
# than filtering on netns::, keeps filters in TEST_ARGS narrowing the selection instead of widening it.
run_netns() {
    local skips=() m
    for m in testkit/tests/it/*.rs; do
        m=$(basename "$m" .rs)
        case $m in netns | main) ;; *) skips+=(--skip "$m::") ;; esac
    done
    run_tests --workspace --test it -- --test-threads=1 "$@" "${skips[@]}"
}
# finish: the closing line, counting every run, and exits failed if any run failed.
finish() {
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
         END { printf "tests: %d passed, %d failed\n", p, f }' "$out"
    exit "$status"
}
if $netns_only; then
    build_release
    run_netns "$@"
    finish
fi
# The dashboard test drives a real browser; without one it skips, saying so.
ensure_packages chromium chromium-driver || log "warning: Chromium could not be installed; the browser test will skip"
# The web player tests also run in Firefox ESR, through geckodriver (scripts/lib.sh).
ensure_packages firefox-esr || log "warning: Firefox ESR could not be installed; the Firefox browser tests will skip"
ensure_geckodriver || log "warning: geckodriver could not be installed; the Firefox browser tests will skip"
# The web client's browser test loads the bundle built in web/ (versions pinned by its package-lock.json);
# without npm it skips, saying so.
command -v npm >/dev/null || ensure_packages nodejs npm || log "warning: npm could not be installed; the web client's browser test will skip"
if command -v npm >/dev/null; then (cd web && npm ci --ignore-scripts --no-audit --no-fund && npm run build && npm test); fi
# Cluster mode (issue #15): the tests start their own nats-servers and PostgreSQL (with pg_auto_failover) on
# 127.0.0.1; without the packages they skip, saying so.
ensure_packages nats-server postgresql postgresql-15-auto-failover || log "warning: nats-server or PostgreSQL could not be installed; the cluster tests will skip"
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
# Fuzzing smoke run (docs/security.md, "Fuzzing"): every cargo-fuzz target for a few seconds. Without a
# nightly toolchain or cargo-fuzz (scripts/fuzz.sh exits 3) it is skipped, saying so; a crash fails.
fuzz_status=0
scripts/fuzz.sh 5 || fuzz_status=$?
if [ "$fuzz_status" -eq 3 ]; then
    log "warning: no nightly toolchain or cargo-fuzz: fuzzing smoke run skipped"
elif [ "$fuzz_status" -ne 0 ]; then
    exit "$fuzz_status"
fi
# Integration tests start real processes, each with its own RocksDB; two test threads keep 2 cores busy
# without starving the QUIC timers under test.
run_tests --workspace -- --test-threads=2 --skip netns:: "$@"
run_netns "$@"
finish
