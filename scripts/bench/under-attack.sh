#!/usr/bin/env bash
# Under attack: the same legitimate fetch workload (viewers fetching warm objects through the fog, every byte
# verified) alone, then while `fog-attack` runs a mixed, bounded attack from another loopback address (one
# attacking host) for the same time. Prints the legitimate fetch rate and fog share under attack as ratios of
# the unattacked run (goal ≥ 0.9), the CPU the tracker and nodes used in each run, their RSS before and
# after the attacked run, and the attacker's own summary, then a Markdown table row.
# The two runs alternate --rounds times (default 2, each run --seconds long), so that other work on a shared
# machine weighs on both alike; rates are means over the rounds, CPU is per run. --rate R paces the viewers
# at R fetches/s in all (players at a bitrate; default: as fast as they can). --per-class then runs each
# attack class alone, each from its own address (127.0.0.3…) right after a run without attack, a row each.
#   scripts/bench/under-attack.sh [--seconds 20] [--rounds 2] [--viewers 4] [--rate 0] [--nodes 3]
#       [--attacker 127.0.0.2] [--per-class] [-- FOG-ATTACK-FLAGS...]   e.g. -- --fills 0 --conn-rate 20
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
seconds=20 rounds=2 viewers=4 rate=0 nodes=3 attacker=127.0.0.2 per_class=""
attack_flags=()
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) seconds=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --viewers) viewers=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --per-class) per_class=1; shift ;;
        --nodes) nodes=$2; shift 2 ;;
        --attacker) attacker=$2; shift 2 ;;
        --) shift; attack_flags=("$@"); break ;;
        *) log "usage: $0 [--seconds S] [--rounds N] [--viewers N] [--nodes N] [--rate R] [--attacker IP] [--per-class] [-- fog-attack attack flags]"; exit 2 ;;
    esac
done
ensure_build_deps
ensure_packages jq
build_release

work=$(mktemp -d -t fogcdn-attack.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${FOG_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# Three objects of 8 MiB (8 chunks of 1 MiB each), incompressible.
mkdir -p "$work/origin"
urls=()
for i in 1 2 3; do
    head -c $((8 << 20)) /dev/urandom > "$work/origin/video$i.bin"
done

"$FOG_BIN/fog-test-origin" --dir "$work/origin" 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")
for i in 1 2 3; do urls+=("http://$origin/video$i.bin"); done
"$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker" --origin "http://$origin/" \
    --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
tracker_pid=$!
tracker="http://$(wait_listening "$work/tracker.log")"
node_pids=()
for n in $(seq 1 "$nodes"); do
    "$FOG_BIN/fog-node" --tracker "$tracker" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 \
        --data-dir "$work/node$n" --cache-size 1GiB 2> "$work/node$n.log" & pids+=($!)
    node_pids+=($!)
    wait_listening "$work/node$n.log" >/dev/null
done
for _ in $(seq 1 300); do
    [ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] && break
    sleep 0.2
done
[ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] || { log "error: nodes not healthy"; exit 1; }
# Warm the nodes: the first fetch of each object pulls its chunks into their caches; the second checks.
for u in "${urls[@]}"; do
    for _ in 1 2; do "$FOG_BIN/fog" get --tracker "$tracker" "$u" -o "$work/warm.bin" 2> "$work/warm.log"; done
    cmp -s "$work/warm.bin" "$work/origin/$(basename "$u")"
    grep -q 'fog_share=100.0%' "$work/warm.log" || log "warning: not all from the fog when warm: $(cat "$work/warm.log")"
done

# CPU seconds (user+system) of processes and their children, from /proc/PID/stat (clock ticks of 1/100 s).
cpu_seconds() {
    local total=0 p c
    for p in "$@"; do
        for c in "$p" $(pgrep -P "$p" || true); do
            total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + ($12 + $13) / 100 }' "/proc/$c/stat")
        done
    done
    echo "$total"
}
rss_mib() { awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
rss_all() { local p; for p in "$tracker_pid" "${node_pids[@]}"; do rss_mib "$p"; echo; done | jq -sc .; }
status_addrs=()
for n in $(seq 1 "$nodes"); do status_addrs+=("$(cat "$work/node$n/status.addr")"); done
# Node counters summed over the nodes (their /metrics and /status): what an attack made them do.
node_counters() {
    local a
    {
        for a in "${status_addrs[@]}"; do curl -fsS "http://$a/metrics"; done |
            awk '/^fog_node_[a-z_]+_total / { s[$1] += $2 }
                 END { for (k in s) printf "{\"%s\": %d}\n", substr(k, 10, length(k) - 15), s[k] }'
        for a in "${status_addrs[@]}"; do
            curl -fsS "http://$a/status" | jq -c '{receipts_refused: (.credits.receipts_refused // 0)}'
        done
    } | jq -sc 'reduce (.[] | to_entries[]) as $e ({}; .[$e.key] += $e.value)'
}
legit() {
    "$FOG_BIN/fog-attack" --seconds "$seconds" legit --tracker "$tracker" --viewers "$viewers" --rate "$rate" "${urls[@]}"
}
# run ATTACKER-IP [fog-attack attack flags]: the workload, with an attack from ATTACKER-IP unless it is "-";
# prints one JSON object: the workload's summary, the servers' CPU, RSS and counters, the attacker's summary.
run() {
    local from=$1 attack_pid="" t0 n0 t1 n1 before after rss0 legit_out attack_out='null'
    shift
    rss0=$(rss_all); before=$(node_counters)
    t0=$(cpu_seconds "$tracker_pid"); n0=$(cpu_seconds "${node_pids[@]}")
    if [ "$from" != - ]; then
        "$FOG_BIN/fog-attack" --seconds "$seconds" attack --tracker "$tracker" --url "${urls[0]}" --bind "$from" "$@" \
            > "$work/attack.json" 2> "$work/attack.log" &
        attack_pid=$!
    fi
    legit_out=$(legit)
    # The same window for every run: an attacker's stragglers (≤ 5 s) are not counted against the servers.
    t1=$(cpu_seconds "$tracker_pid"); n1=$(cpu_seconds "${node_pids[@]}")
    if [ -n "$attack_pid" ]; then
        wait "$attack_pid" || { log "fog-attack failed:"; cat "$work/attack.log" >&2; exit 1; }
        attack_out=$(cat "$work/attack.json")
    fi
    after=$(node_counters)
    jq -nc --argjson legit "$legit_out" --argjson attack "$attack_out" --argjson rss0 "$rss0" --argjson rss1 "$(rss_all)" \
        --argjson c0 "$before" --argjson c1 "$after" \
        --argjson cpu_t "$(python3 -c "print(round($t1 - $t0, 2))")" --argjson cpu_n "$(python3 -c "print(round($n1 - $n0, 2))")" \
        --argjson healthy "$(curl -fsS "$tracker/v1/stats" | jq .nodes_healthy)" \
        '{legit: $legit, tracker_cpu_s: $cpu_t, nodes_cpu_s: $cpu_n, rss_mib_before: $rss0, rss_mib_after: $rss1,
          node_counters: ($c1 | with_entries(.value -= ($c0[.key] // 0)) | with_entries(select(.value != 0))),
          nodes_healthy_after: $healthy, attack: $attack}'
    sleep 2
}

# combine RUN-JSON...: the runs of one condition as one: rates averaged, bytes and CPU summed then per run,
# RSS before the first and after the last.
combine() {
    jq -sc '{legit: {mib_per_s: (map(.legit.mib_per_s) | add / length * 100 | round / 100),
                     fetches_per_s: (map(.legit.fetches_per_s) | add / length * 100 | round / 100),
                     fog_share: ((map(.legit.fog_bytes) | add) as $f | (map(.legit.bytes) | add) as $b
                                 | if $b > 0 then $f / $b * 10000 | round / 10000 else 0 end),
                     errors: (map(.legit.errors) | add)},
             tracker_cpu_s: (map(.tracker_cpu_s) | add / length * 100 | round / 100),
             nodes_cpu_s: (map(.nodes_cpu_s) | add / length * 100 | round / 100),
             rss_mib_before: .[0].rss_mib_before, rss_mib_after: .[-1].rss_mib_after,
             attack: (if .[0].attack then {own_cpu_s: (map(.attack.own_cpu_s) | add / length * 100 | round / 100)}
                      else null end)}' <<<"$*"
}

pace=$([ "$rate" = 0 ] && echo "as fast as they can" || echo "$rate fetches/s in all")
runs_base=() runs_attacked=()
for r in $(seq 1 "$rounds"); do
    log "round $r/$rounds: $viewers viewers ($pace) for $seconds s without attack, then the same under attack from $attacker"
    runs_base+=("$(run -)")
    runs_attacked+=("$(run "$attacker" "${attack_flags[@]}")")
    echo "round $r unattacked: ${runs_base[-1]}"
    echo "round $r attacked:   ${runs_attacked[-1]}"
done
base=$(combine "${runs_base[@]}")
attacked=$(combine "${runs_attacked[@]}")

ratio() { python3 -c "print(f'{$2 / $1:.2f}' if $1 > 0 else 'n/a')"; }
f() { jq -r "$2" <<<"$1"; }
legit_cells() { echo "$(f "$1" .legit.mib_per_s) ($(f "$1" .legit.fetches_per_s)) | $(f "$1" .legit.fog_share)"; }
ratios() { # RUN BASELINE
    echo "$(ratio "$(f "$2" .legit.mib_per_s)" "$(f "$1" .legit.mib_per_s)") | $(ratio "$(f "$2" .legit.fog_share)" "$(f "$1" .legit.fog_share)")"
}
cpu_cells() { echo "$(f "$1" .tracker_cpu_s) / $(f "$1" .nodes_cpu_s)"; }
rss_cells() { # tracker, then nodes: before→after
    f "$1" '[.rss_mib_before, .rss_mib_after] | transpose | map("\(.[0])→\(.[1])") | "\(.[0]) | \(.[1:] | join(", "))"'
}
echo
echo "| s × rounds | viewers | unattacked MiB/s (fetch/s) | fog share | attacked MiB/s (fetch/s) | fog share | rate ratio | share ratio | CPU s/run tracker / nodes, unattacked | attacked | attacker CPU s/run | RSS MiB tracker | RSS MiB nodes |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
who=$viewers
[ "$rate" != 0 ] && who="$viewers at $rate fetch/s"
echo "| $seconds × $rounds | $who | $(legit_cells "$base") | $(legit_cells "$attacked") | $(ratios "$attacked" "$base") | $(cpu_cells "$base") | $(cpu_cells "$attacked") | $(f "$attacked" .attack.own_cpu_s) | $(rss_cells "$attacked") |"

[ -z "$per_class" ] && exit 0
classes=(quic_conn_flood forged_receipts anonymous_fills slow_bodies junk_registrations junk_redeems ingest_variants)
rows=()
for i in "${!classes[@]}"; do
    c=${classes[$i]}
    log "class alone: $c"
    before=$(run -)
    out=$(run "127.0.0.$((i + 3))" --only "$c" "${attack_flags[@]}")
    echo "$c: $out (unattacked just before: $(f "$before" .legit.mib_per_s) MiB/s)"
    rows+=("| $c | $(legit_cells "$out") | $(ratios "$out" "$before") | $(cpu_cells "$out") | $(f "$out" .attack.own_cpu_s) | $(rss_cells "$out") | $(f "$out" ".attack.$c | \"\(.sent) sent: \(.outcomes | to_entries | map(\"\(.key) \(.value)\") | join(\", \"))\"") |")
done
echo
echo "| class alone | MiB/s (fetch/s) | fog share | rate ratio (to the run just before) | share ratio | CPU s tracker / nodes | attacker CPU s | RSS MiB tracker | RSS MiB nodes | sent: answers |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
