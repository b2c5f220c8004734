#!/usr/bin/env bash
# Installs fog-node as a system service from the built binary: /usr/local/bin/fog-node, the hardened unit
# /etc/systemd/system/fog-node.service (packaging/fog-node.service), the `fogcdn` system user, its state
# directory /var/lib/fogcdn, and /etc/fogcdn/node.toml with every option commented (written by the binary
# itself: `fog-node --print-config --commented`; an existing one is kept). Enables and starts the unit when
# systemd runs. Needs root. The .deb (`cargo deb`, see docs/operations.md) installs the same.
#   scripts/install-node.sh [--tracker URL] [--binary PATH] [--root DIR]
#   scripts/install-node.sh --uninstall [--keep-cache | --purge] [--root DIR]
# --uninstall removes the binary, the unit, the configuration and the user. The data directory (cache,
# node identity, unredeemed receipts, earnings) stays with --keep-cache (the default: reinstalling makes
# the same node again) and goes with --purge.
# --root DIR works on another system's tree (an image; the tests' throwaway root) instead of this one:
# DIR/etc/passwd and DIR/etc/group must exist; nothing is started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root="" binary="$FOG_BIN/fog-node" tracker="" uninstall=false purge=false
while [ $# -gt 0 ]; do
    case $1 in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --tracker) tracker=${2:?--tracker needs a URL}; shift 2 ;;
    --uninstall) uninstall=true; shift ;;
    --keep-cache) purge=false; shift ;;
    --purge) purge=true; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) log "error: unknown option $1 (see --help)"; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { log "error: run as root: it adds a system user and a systemd unit"; exit 1; }
root=${root%/}
if [ -n "$root" ]; then
    [ -e "$root/etc/passwd" ] && [ -e "$root/etc/group" ] ||
        { log "error: $root/etc/passwd and $root/etc/group must exist (--root takes a system's tree)"; exit 1; }
elif dpkg-query -W -f='${Status}' fogcdn-node 2>/dev/null | grep -q "install ok installed"; then
    log "error: the fogcdn-node package is installed; use apt (remove, or purge to delete the data)"; exit 1
fi
bindir=/usr/local/bin
unit=/etc/systemd/system/fog-node.service
state=/var/lib/fogcdn
systemd_here() { [ -z "$root" ] && [ -d /run/systemd/system ]; }

if $uninstall; then
    if [ -n "$root" ]; then
        systemctl --root="$root" disable fog-node.service >/dev/null 2>&1 || true
    elif systemd_here; then
        systemctl disable --now fog-node.service 2>/dev/null || true
    fi
    rm -f "$root$unit" "$root$bindir/fog-node"
    if systemd_here; then systemctl daemon-reload; fi
    rm -rf "$root/etc/fogcdn"
    if grep -q '^fogcdn:' "$root/etc/passwd"; then userdel ${root:+--prefix "$root"} fogcdn; fi
    if grep -q '^fogcdn:' "$root/etc/group"; then groupdel ${root:+--prefix "$root"} fogcdn; fi
    if $purge; then
        rm -rf "$root$state"
        log "fog-node uninstalled, its data deleted"
    elif [ -d "$root$state" ]; then
        log "fog-node uninstalled; kept $root$state (cache, node identity, receipts, earnings): --purge deletes it"
    else
        log "fog-node uninstalled"
    fi
    exit 0
fi

[ -x "$binary" ] || { log "error: no fog-node binary at $binary: build it (cargo build --release --workspace) or pass --binary"; exit 1; }
install -D -m 0755 "$binary" "$root$bindir/fog-node"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s#^ExecStart=/usr/bin/fog-node #ExecStart=$bindir/fog-node #" packaging/fog-node.service >"$tmp"
install -D -m 0644 "$tmp" "$root$unit"
sh packaging/node-setup.sh "${root:-/}" "$bindir/fog-node" "$tracker"
log "fog-node installed: $bindir/fog-node, $unit, configuration in /etc/fogcdn/node.toml, data in $state"
if systemd_here; then
    log "running as the fogcdn user; its page: http://127.0.0.1:7702/ (sudo fog-node status --data-dir $state)"
    log "earnings: sudo fog-node earnings (reads $state); logs: journalctl -u fog-node"
fi
