#!/usr/bin/env bash
# A local fogcdn cell to try cluster mode (docs/operations.md "Running a cluster"), all on 127.0.0.1:
#   3 nats-servers (one NATS cluster, routes between them) for the registry's soft state,
#   PostgreSQL under pg_auto_failover (a monitor, a primary and a synchronous standby) for durable state,
#   3 fog-tracker replicas of one cell sharing one signing key, and a test origin with sample content.
# Prints every address and the connection string, then leaves everything running until Ctrl-C.
#   scripts/cluster.sh [--once]     --once: start, check every replica answers, stop
# Needs nats-server, postgresql and postgresql-15-auto-failover (installed here when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
once=false
[ "${1:-}" = "--once" ] && once=true

ensure_build_deps
ensure_packages nats-server postgresql postgresql-15-auto-failover jq
build_release

pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d -t fogcdn-cluster.XXXXXX)
chmod 755 "$work"
pids=()
# PostgreSQL refuses to run as root: its processes run as the postgres user when this script is root.
as_pg=(env PATH="$pg_bin:$PATH")
[ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres -- "${as_pg[@]}")
cleanup() {
    # pg_autoctl restarts PostgreSQL it supervises: stop each whole process group.
    for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    log "cluster stopped; logs and data were in $work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# NATS: three servers, each routing to the others.
nats_client=() nats_route=()
for i in 1 2 3; do nats_client+=("$(free_port)"); nats_route+=("$(free_port)"); done
routes=$(printf 'nats://127.0.0.1:%s,' "${nats_route[@]}"); routes=${routes%,}
for i in 0 1 2; do
    setsid nats-server -a 127.0.0.1 -p "${nats_client[$i]}" --cluster_name fogcdn \
        --cluster "nats://127.0.0.1:${nats_route[$i]}" --routes "$routes" > "$work/nats$i.log" 2>&1 & pids+=($!)
done
nats=$(printf 'nats://127.0.0.1:%s,' "${nats_client[@]}"); nats=${nats%,}

# PostgreSQL: the pg_auto_failover monitor, then a primary and a standby it pairs (synchronous by default).
mkdir -p "$work/pg" && chown postgres "$work/pg" 2>/dev/null || true
mon_port=$(free_port)
"${as_pg[@]}" pg_autoctl create monitor --pgdata "$work/pg/monitor" --pgport "$mon_port" --hostname 127.0.0.1 \
    --auth trust --no-ssl > "$work/pg-monitor.log" 2>&1
setsid "${as_pg[@]}" pg_autoctl run --pgdata "$work/pg/monitor" >> "$work/pg-monitor.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do "${as_pg[@]}" pg_autoctl show uri --pgdata "$work/pg/monitor" --formation monitor >/dev/null 2>&1 && break; sleep 0.2; done
monitor=$("${as_pg[@]}" pg_autoctl show uri --pgdata "$work/pg/monitor" --formation monitor)
for n in a b; do
    "${as_pg[@]}" pg_autoctl create postgres --pgdata "$work/pg/$n" --pgport "$(free_port)" --hostname 127.0.0.1 \
        --auth trust --no-ssl --dbname fogcdn --monitor "$monitor" --name "pg-$n" > "$work/pg-$n.log" 2>&1
    setsid "${as_pg[@]}" pg_autoctl run --pgdata "$work/pg/$n" >> "$work/pg-$n.log" 2>&1 & pids+=($!)
    # The standby is created from the running primary: wait for this node to reach its assigned state (a
    # lone first node is `single` until the standby joins).
    for _ in $(seq 1 150); do
        "${as_pg[@]}" pg_autoctl show state --pgdata "$work/pg/monitor" 2>/dev/null | grep -q "pg-$n .*\(single\|primary\|secondary\) *| *\(single\|primary\|secondary\)" && break
        sleep 0.2
    done
done
# Writes are acknowledged by both once the pair settles as primary + secondary.
for _ in $(seq 1 300); do
    state=$("${as_pg[@]}" pg_autoctl show state --pgdata "$work/pg/monitor" 2>/dev/null || true)
    grep -q "| *primary *| *primary" <<<"$state" && grep -q "| *secondary *| *secondary" <<<"$state" && break
    sleep 0.2
done
postgres=$("${as_pg[@]}" pg_autoctl show uri --pgdata "$work/pg/monitor" --formation default)
# The trackers connect as the database owner (trust on 127.0.0.1 here; a real cell uses passwords or certificates).
postgres="${postgres/postgres:\/\//postgres://postgres@}"

mkdir -p "$work/origin"
head -c $((8 * 1024 * 1024)) /dev/urandom > "$work/origin/video.bin"
"$FOG_BIN/fog-test-origin" --dir "$work/origin" --listen 127.0.0.1:0 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")

# Tracker replicas: one signing key for the cell (the first replica makes it, the others get a copy).
trackers=()
for i in 1 2 3; do
    mkdir -p "$work/tracker$i"
    [ "$i" -gt 1 ] && cp "$work/tracker1/tracker.key" "$work/tracker$i/tracker.key"
    "$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker$i" --origin "http://$origin/" \
        --nats "$nats" --postgres "$postgres" --cell local 2> "$work/tracker$i.log" & pids+=($!)
    trackers+=("http://$(wait_listening "$work/tracker$i.log")")
done
tracker_list=$(IFS=,; echo "${trackers[*]}")

for t in "${trackers[@]}"; do
    curl -fsS "$t/v1/stats" > /dev/null || { log "error: replica $t does not answer; see $work/tracker*.log"; exit 1; }
done
cat <<EOF
NATS servers:      $nats
PostgreSQL:        $postgres   (monitor: $monitor)
                   state: PATH=$pg_bin:\$PATH pg_autoctl show state --pgdata $work/pg/monitor  (as the postgres user)
tracker replicas:  ${trackers[*]}
origin:            http://$origin/   (sample: http://$origin/video.bin)
try:               $FOG_BIN/fog-node --tracker $tracker_list --listen 127.0.0.1:0 --data-dir $work/node1
                   $FOG_BIN/fog get --tracker $tracker_list http://$origin/video.bin -o /tmp/video.bin
logs and data:     $work
EOF
$once && exit 0
log "running; Ctrl-C stops everything"
wait
