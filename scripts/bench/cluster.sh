#!/usr/bin/env bash
# Cluster benchmark (issue #15): what replicating the registry costs one tracker replica. ~10 min after the build.
#   scripts/bench/cluster.sh [--nodes 100000] [--rates 1000,10000,100000] [--seconds 15] [--connections 32]
#                            [--apply-nodes 100000,250000,1000000] [--formats v1,v2] [--core 0]
# One fog-tracker at a time, pinned to one core (--core) with taskset; wrk, nats-server and the bus load
# tool share the other core. wrk loads GET /v1/resolve of a 4-chunk and a 64-chunk object (1 MiB chunks,
# stored manifests, no client key: no ticket) for --seconds each. In order:
#   1. the embedded tracker (no --nats, no --postgres), empty registry: the anchor;
#   2. a replica (--nats and --postgres, same flags otherwise), empty registry, nothing on the bus;
#   3. the same replica once `bench_cluster publish` brought --nodes synthetic nodes over the bus, no updates;
#   4. the same, while `bench_cluster publish` sends each rate of --rates node records/s (round-robin over
#      the population, each as the replica that accepted the node's heartbeat publishes it), once in each
#      of --formats (v1: JSON, as replicas publish while an older replica is live; v2: binary);
#   5. the embedded tracker again (the anchor at the end: drift of the machine over the run).
# The replica's PostgreSQL runs on the load's core (resolves of stored objects do not read it); both run with --probe-secs 0 (the synthetic nodes' addresses are not
# dialable; probing them would be a cost of the benchmark, not of replication) and --heartbeat-secs 120 (a
# node timeout of 6 min: every rate keeps the whole population schedulable, so only the rate changes).
# The population arrives in the first of --formats. Then `bench_cluster apply`, alone: µs per merged record
# in each format, snapshot rebuild, load-delta apply (CPU time), and records merged per second by one thread
# per core (the bus's workers; wall time).
# Prints a row per phase and object (resolves/s, p50/p99 latency, the tracker's CPU and its core's, node
# records received and merged per second, CPU per resolve and per merged record) and JSON lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

nodes=100000 rates=1000,10000,100000 seconds=15 connections=32 apply_nodes=100000,250000,1000000 core=0
formats=v1,v2
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --rates) rates=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --apply-nodes) apply_nodes=$2; shift 2 ;;
        --formats) formats=$2; shift 2 ;;
        --core) core=$2; shift 2 ;;
        *) log "unknown argument $1"; exit 2 ;;
    esac
done
cpus=$(nproc)
[ "$cpus" -ge 2 ] || { log "error: needs 2 cores (one for the tracker, one for the load)"; exit 1; }
other=$(( (core + 1) % cpus ))

ensure_build_deps
ensure_packages nats-server postgresql wrk jq
# With the workspace (binaries and examples: dev-dependencies in, as the tests build); a per-package
# selection resolves features differently and rebuilds RocksDB.
log "building (release, workspace)"
nice cargo build --release --locked -q --workspace --bins --examples
tool="$FOG_BIN/examples/bench_cluster"
nats_server=$(command -v nats-server || echo /usr/sbin/nats-server)

work=$(mktemp -d -t fogcdn-bench-cluster.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    stop_postgres "$work/pg"
    [ -n "${FOG_BENCH_KEEP:-}" ] && log "logs in $work" || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$work/origin"
head -c $((4 << 20)) /dev/urandom > "$work/origin/c4.bin"
head -c $((64 << 20)) /dev/urandom > "$work/origin/c64.bin"
taskset -c "$other" "$FOG_BIN/fog-test-origin" --dir "$work/origin" --listen 127.0.0.1:0 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")

nats_port=$(free_port) nats_mon=$(free_port)
taskset -c "$other" "$nats_server" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" > "$work/nats.log" 2>&1 & pids+=($!)
nats="nats://127.0.0.1:$nats_port"
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$nats_mon/varz" > /dev/null 2>&1 && break; sleep 0.1; done
# A replica keeps its manifests and ledger in PostgreSQL (--nats needs --postgres); a resolve of a stored
# object reads neither after the first, so the database only idles on the load's core.
chmod 755 "$work"
postgres=$(start_postgres "$work/pg" "$(free_port)")
taskset -p -c "$other" "$(head -n1 "$work/pg/postmaster.pid")" > /dev/null

tracker_pid="" tracker=""
# start_tracker NAME [FLAGS...]: a fog-tracker pinned to $core.
start_tracker() {
    local name=$1; shift
    mkdir -p "$work/$name"
    taskset -c "$core" "$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/$name" \
        --origin "http://$origin/" --probe-secs 0 --heartbeat-secs 120 --max-nodes $((2 * nodes)) "$@" \
        2> "$work/$name.log" & tracker_pid=$!
    pids+=("$tracker_pid")
    tracker="http://$(wait_listening "$work/$name.log")"
    # Ingest both objects (the first resolve reads them from the origin), then wait for stored manifests.
    for obj in c4 c64; do
        for _ in $(seq 1 100); do
            src=$(curl -fsS "$tracker/v1/resolve?url=http://$origin/$obj.bin" | jq -r '.manifest.chunks | length') || true
            [ "$src" = "$([ $obj = c4 ] && echo 4 || echo 64)" ] && break
            sleep 0.1
        done
    done
    sleep 1
}
stop_tracker() { kill "$tracker_pid"; wait "$tracker_pid" 2>/dev/null || true; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Busy and total ticks of the tracker's core: what else ran there (other work on the machine) shows.
core_ticks() { awk -v c="cpu$core" '$1==c{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
# bus_counter PREFIX: the sum of the tracker's metric lines starting with PREFIX.
bus_counter() { curl -fsS "$tracker/metrics" | awk -v m="$1" 'index($1, m) == 1 {s+=$2} END{print s+0}'; }
held() { curl -fsS "$tracker/v1/stats" | jq -r '.nodes_healthy'; }
# Messages into nats-server (the load tool's records, and a few of the replica's own a second).
nats_in() { curl -fsS "http://127.0.0.1:$nats_mon/varz" | jq -r '.in_msgs'; }
hz=$(getconf CLK_TCK)

printf '| tracker | registry | records/s asked | bus msgs/s in | received/s | merged/s | object | resolves/s | p50 / p99 | tracker CPU | core busy | CPU µs per resolve | µs per merged record |\n' > "$work/table"
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|\n' >> "$work/table"
declare -A base_us
# measure TRACKER_LABEL REGISTRY_LABEL SENT_LABEL [BASE]: wrk on both objects, a row each. BASE: remember the
# CPU per resolve as the no-update cost; after it, the rows derive each merged record's CPU from it:
# (tracker CPU − resolves/s × CPU per resolve without updates) / merged records/s.
measure() {
    for obj in c4 c64; do
        local url="$tracker/v1/resolve?url=http%3A%2F%2F$origin%2F$obj.bin"
        local t0 m0 r0 c0 n0 t1 m1 r1 c1 n1 out
        t0=$(cpu_ticks "$tracker_pid") m0=$(bus_counter fog_tracker_bus_merged) c0=$(core_ticks)
        r0=$(bus_counter 'fog_tracker_bus_received_total{kind="node"}') n0=$(nats_in)
        out=$(taskset -c "$other" wrk -t1 -c"$connections" -d"${seconds}s" --latency "$url")
        t1=$(cpu_ticks "$tracker_pid") m1=$(bus_counter fog_tracker_bus_merged) c1=$(core_ticks)
        r1=$(bus_counter 'fog_tracker_bus_received_total{kind="node"}') n1=$(nats_in)
        local rps p50 p99 cpu busy per merged_rate received_rate in_rate update_us="—"
        rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
        p50=$(awk '$1=="50%"{print $2}' <<<"$out") p99=$(awk '$1=="99%"{print $2}' <<<"$out")
        cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$seconds" 'BEGIN{printf "%.2f", (b-a)/hz/s}')
        busy=$(awk -v a="$c0" -v b="$c1" 'BEGIN{split(a,x," "); split(b,y," "); printf "%.2f", (y[1]-x[1])/(y[2]-x[2])}')
        per=$(awk -v c="$cpu" -v r="$rps" 'BEGIN{printf "%.1f", c*1e6/r}')
        merged_rate=$(awk -v a="$m0" -v b="$m1" -v s="$seconds" 'BEGIN{printf "%.0f", (b-a)/s}')
        received_rate=$(awk -v a="$r0" -v b="$r1" -v s="$seconds" 'BEGIN{printf "%.0f", (b-a)/s}')
        in_rate=$(awk -v a="$n0" -v b="$n1" -v s="$seconds" 'BEGIN{printf "%.0f", (b-a)/s}')
        [ "${4:-}" = base ] && base_us[$obj]=$per
        if [ "$merged_rate" -gt 0 ] && [ -n "${base_us[$obj]:-}" ]; then
            update_us=$(awk -v c="$cpu" -v r="$rps" -v b="${base_us[$obj]}" -v m="$merged_rate" \
                'BEGIN{printf "%.1f", (c - r*b/1e6)*1e6/m}')
        fi
        local chunks=${obj#c}
        printf '| %s | %s | %s | %s | %s | %s | %s chunks | %.0f | %s / %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" \
            "$in_rate" "$received_rate" "$merged_rate" "$chunks" "$rps" "$p50" "$p99" "$cpu" "$busy" "$per" "$update_us" \
            | tee -a "$work/table" >&2
        grep -i "non-2xx\|socket errors" <<<"$out" >&2 || true
        jq -nc --arg t "$1" --arg reg "$2" --arg sent "$3" --arg obj "$chunks" --arg rps "$rps" --arg cpu "$cpu" \
            --arg busy "$busy" --arg merged "$merged_rate" --arg received "$received_rate" --arg p50 "$p50" \
            --arg p99 "$p99" --arg update_us "$update_us" --arg in "$in_rate" \
            '{tracker:$t, registry:$reg, sent:$sent, chunks:($obj|tonumber), resolves_per_s:($rps|tonumber),
              tracker_cpu:($cpu|tonumber), core_busy:($busy|tonumber), bus_in_per_s:($in|tonumber), received_per_s:($received|tonumber),
              merged_per_s:($merged|tonumber), p50:$p50, p99:$p99, us_per_merged_record:$update_us}' >> "$work/json"
    done
}

log "1. embedded tracker"
start_tracker embedded1
measure embedded "empty" "—"
stop_tracker

log "2-4. replica"
start_tracker replica --nats "$nats" --postgres "$postgres" --cell bench
measure replica "empty" 0
log "   bringing $nodes nodes over the bus"
for _ in 1 2 3; do
    taskset -c "$other" "$tool" publish --nats "$nats" --cell bench --nodes "$nodes" --rate 20000 \
        --format "${formats%%,*}" >> "$work/publish.json"
    sleep 2
    [ "$(held)" -ge "$nodes" ] && break
done
have=$(held)
[ "$have" -ge "$nodes" ] || log "warning: the replica holds $have of $nodes nodes after three arrivals"
measure replica "$have nodes" 0 base
for rate in ${rates//,/ }; do
    for format in ${formats//,/ }; do
        log "   $rate records/s, $format"
        taskset -c "$other" "$tool" publish --nats "$nats" --cell bench --nodes "$nodes" --rate "$rate" \
            --seconds $((2 * seconds + 6)) --format "$format" >> "$work/publish.json" & pub=$!
        sleep 2
        measure replica "$have nodes" "$rate $format"
        wait "$pub"
    done
done
# What did not arrive was dropped on the way (the NATS client's buffer for the subscription is bounded).
sleep 2
log "   the replica received $(bus_counter 'fog_tracker_bus_received_total{kind="node"}') of $(jq -s 'map(.published) | add' "$work/publish.json") records published"
stop_tracker

log "5. embedded tracker again"
start_tracker embedded2
measure "embedded (again)" "empty" "—"
stop_tracker

log "in-process costs"
# Unpinned, with nothing else running: its CPU-time figures do not depend on the core, and the records merged
# per second by 1, 2, … threads need them all.
"$tool" apply --nodes "$apply_nodes" --formats "$formats" | tee "$work/apply.json"
echo
cat "$work/table"
echo
echo "publisher runs:"; cat "$work/publish.json"
echo "phases:"; cat "$work/json"
echo "nats-server slow consumers: $(curl -fsS "http://127.0.0.1:$nats_mon/varz" | jq -r '.slow_consumers')"
