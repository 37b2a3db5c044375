#!/usr/bin/env bash
# Runs one hop-bench scenario against a fresh local cluster of hopd nodes on loopback: one etcd
# member, NODES hopd nodes (default 2, one shard each, all pinned to core 0), the generator
# pinned to core 1. The generator spreads its clients over every node (client i connects first
# to node i mod NODES, each node's key pinned) and follows the redirects, so each client ends
# on its home node and, with 2 nodes, about half the pairs talk across a node link; every node
# takes its share of the first handshakes, and about (NODES - 1) / NODES of the clients start
# away from home and are redirected (the report's `first connects` rows and `redirects`).
#
#   benches/scripts/with-cluster.sh SCENARIO [hop-bench flags...]
#   e.g. benches/scripts/with-cluster.sh throughput --pairs 50 --window 64 --duration-ms 8000
#
# HOPD, HOP_BENCH and ETCD name the binaries (defaults: the release builds in
# $CARGO_TARGET_DIR or target/, and /usr/bin/etcd, which `tests/cluster-install` installs);
# HOPD_FLAGS adds flags to every hopd; NODES sets the node count (2 to 8). Servers bind
# 127.0.0.1 (etcd) and 127.0.0.2 ... (the nodes). After the run it prints each node's link
# counters (mails taken from other nodes) and stops everything it started.
set -euo pipefail
# The abuse limits are off unless ABUSE_LIMITS=on (abuse-limits.sh says why).
. "$(dirname "$0")/abuse-limits.sh"
target_dir=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}
hopd=${HOPD:-$target_dir/release/hopd}
bench=${HOP_BENCH:-$target_dir/release/hop-bench}
etcd=${ETCD:-/usr/bin/etcd}
nodes=${NODES:-2}
scenario=$1
shift
if [ ! -x "$etcd" ]; then
    echo "with-cluster: no etcd at $etcd (tests/cluster-install installs it)" >&2
    exit 1
fi
if [ "$nodes" -lt 2 ] || [ "$nodes" -gt 8 ]; then
    echo "with-cluster: NODES must be 2 to 8" >&2
    exit 1
fi
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$etcd" --data-dir "$work/etcd" --name default \
    --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
    --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
    --initial-cluster default=http://127.0.0.1:23801 >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fsS http://127.0.0.1:23791/health 2>/dev/null | grep -q true && break
    sleep 0.1
done

keys=()
servers=()
for n in $(seq 1 "$nodes"); do
    host=127.0.0.$((n + 1))
    mkdir -m 700 -p "$work/n$n"
    # shellcheck disable=SC2086
    taskset -c 0 "$hopd" --data "$work/n$n" --listen "$host:7788" --admin "$host:7789" \
        --shards 1 --log warn --cluster-etcd http://127.0.0.1:23791 --node-id "n$n" \
        "${limit_flags[@]}" ${HOPD_FLAGS:-} >"$work/n$n.out" 2>"$work/n$n.err" &
    pids+=($!)
done
for n in $(seq 1 "$nodes"); do
    host=127.0.0.$((n + 1))
    key=""
    for _ in $(seq 200); do
        key=$(sed -n 's/.*server key \([0-9a-f]\{64\}\).*/\1/p' "$work/n$n.out" | head -1)
        [ -n "$key" ] && curl -fsS "http://$host:7789/readyz" >/dev/null 2>&1 && break
        sleep 0.05
    done
    if [ -z "$key" ]; then
        echo "with-cluster: node n$n did not start:" >&2
        cat "$work/n$n.err" >&2
        exit 1
    fi
    keys+=("$key")
    servers+=("$host:7788")
done
# Every node sees every member before the run starts.
for n in $(seq 1 "$nodes"); do
    for _ in $(seq 200); do
        seen=$(curl -fsS "http://127.0.0.$((n + 1)):7789/cluster" | grep -o '"node_id":"n[0-9]*","server_key"' | wc -l)
        [ "$seen" -eq "$nodes" ] && break
        sleep 0.05
    done
done

server_list=$(IFS=,; echo "${servers[*]}")
key_list=$(IFS=,; echo "${keys[*]}")
echo "with-cluster: hop-bench $scenario --server $server_list --server-key (each node's key) $*" >&2
taskset -c 1 "$bench" "$scenario" --server "$server_list" --server-key "$key_list" "$@"

for n in $(seq 1 "$nodes"); do
    host=127.0.0.$((n + 1))
    taken=$(curl -fsS "http://$host:7789/metrics" | awk '/^hop_link_mails_in_total/ {s += $2} END {print s + 0}')
    sent=$(curl -fsS "http://$host:7789/cluster" | grep -o '"link_[a-z_]*":[0-9]*' | tr '\n' ' ')
    echo "node n$n: mails taken from other nodes' links: $taken; its own links: $sent"
done
