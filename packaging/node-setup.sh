#!/bin/sh
# Sets a fog-node service up after its files are in place: the `fogcdn` system user, its state directory,
# /etc/fogcdn/node.toml (written by the installed binary from its own options, kept if it exists) and the
# enabled unit. Shared by scripts/install-node.sh and the fogcdn-node .deb's postinst (installed there as
# /usr/lib/fogcdn/node-setup.sh).
#   node-setup.sh ROOT BINARY [TRACKER_URL]
# ROOT is / for this system, or a directory holding another system's tree (an image, a test): then users
# are added to ROOT/etc/passwd, the unit is enabled there, and nothing is started.
set -eu
root=${1:?usage: node-setup.sh ROOT BINARY [TRACKER_URL]}
binary=${2:?usage: node-setup.sh ROOT BINARY [TRACKER_URL]}
tracker=${3:-}
root=${root%/}
user=fogcdn
state=/var/lib/fogcdn
config=/etc/fogcdn/node.toml

prefix=""
[ -n "$root" ] && prefix="--prefix $root"
if ! grep -q "^$user:" "$root/etc/passwd"; then
    # shellcheck disable=SC2086 # $prefix is one option and its value, or nothing
    useradd $prefix --system --user-group --home-dir "$state" --no-create-home \
        --shell /usr/sbin/nologin --comment "fogcdn volunteer node" "$user"
fi
# Numeric ids from ROOT's own files: names would resolve against this system's.
uid=$(awk -F: -v u="$user" '$1 == u { print $3 }' "$root/etc/passwd")
gid=$(awk -F: -v u="$user" '$1 == u { print $4 }' "$root/etc/passwd")

mkdir -p "$root$state" "$root/etc/fogcdn"
# A data directory kept from an earlier install belongs to the user as it is now.
chown -R "$uid:$gid" "$root$state"
chmod 0750 "$root$state"
if [ ! -e "$root$config" ]; then
    # A clean environment: the installer's own FOG_NODE_* variables must not leak into the file.
    set -- --print-config --commented --data-dir "$state"
    [ -n "$tracker" ] && set -- "$@" --tracker "$tracker"
    env -i PATH=/usr/bin:/bin "$root$binary" "$@" >"$root$config.tmp"
    chmod 0644 "$root$config.tmp"
    mv "$root$config.tmp" "$root$config"
fi

if [ -n "$root" ]; then
    systemctl --root="$root" enable fog-node.service >/dev/null 2>&1 ||
        echo "node-setup: could not enable fog-node.service under $root" >&2
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable fog-node.service
    systemctl restart fog-node.service
else
    echo "node-setup: systemd is not running here; start the node with: $binary --config $config" >&2
fi
