#!/usr/bin/env bash
# Runs one hop-bench scenario against a fresh local hopd, like for like with the peers:
# hopd --shards 1 pinned to core 0, the generator pinned to core 1.
#
#   benches/scripts/with-hopd.sh SCENARIO [hop-bench flags...]
#   e.g. benches/scripts/with-hopd.sh throughput --pairs 50 --json /tmp/tp.json
#        HOPDS=2 benches/scripts/with-hopd.sh ceiling --connections 30000 --processes 2
#
# Both run at nice $PRIORITY (default -10) so that niced background work on the same cores
# (builds) does not take time slices in the middle of a measurement. With SCHED=fifo they run
# SCHED_FIFO instead (root only; the kernel's RT throttling still leaves 5% of each core to
# everything else): use it on a shared machine, and say so next to the figures. A latency
# generator that spins (its default) runs at nice $PRIORITY even then (scheduling.sh says why).
# HOPD and HOP_BENCH name the binaries (default: the release builds in $CARGO_TARGET_DIR or
# target/); HOPD_FLAGS adds flags to hopd; SHARDS sets hopd's --shards (default 1: the
# like-for-like row); SERVER_CORE and GENERATOR_CORE pick the cores (a list such as 0,1 too);
# PERF_SYSCALLS=FILE counts hopd's system calls during the run (below).
set -euo pipefail
# The abuse limits are off unless ABUSE_LIMITS=on (abuse-limits.sh says why).
. "$(dirname "$0")/abuse-limits.sh"
# run_as and generator_scheduling (SCHED=fifo, PRIORITY).
. "$(dirname "$0")/scheduling.sh"
target_dir=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}
hopd=${HOPD:-$target_dir/release/hopd}
bench=${HOP_BENCH:-$target_dir/release/hop-bench}
server_core=${SERVER_CORE:-0}
shards=${SHARDS:-1}
log_filter=warn
[ -n "${HOPD_LOG:-}" ] && log_filter=info
generator_core=${GENERATOR_CORE:-1}
scenario=$1
shift

# start_hopd DATA: starts one hopd on the server core; sets started_pid and started_addr.
start_hopd() {
    local data=$1 out=$1/hopd.out
    # shellcheck disable=SC2086
    "${run_as[@]}" taskset -c "$server_core" "$hopd" --listen 127.0.0.1:0 --data "$data" \
        --shards "$shards" --pin-cores false --admin 127.0.0.1:0 --log "$log_filter" "${limit_flags[@]}" ${HOPD_FLAGS:-} >"$out" 2>"$data/hopd.err" &
    started_pid=$!
    pids+=("$started_pid")
    for _ in $(seq 100); do
        grep -q "listening on" "$out" 2>/dev/null && break
        sleep 0.05
    done
    started_addr=$(sed -n 's/^hopd listening on \([^ ]*\) .*/\1/p' "$out")
    [ -n "$started_addr" ] || { echo "hopd did not start:" >&2; cat "$data/hopd.err" >&2; exit 1; }
}

pids=()
dirs=()
# HOPD_LOG=FILE keeps the first hopd's log (its counters at stop: stores' commits, fsyncs).
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; [ -n "${HOPD_LOG:-}" ] && cp "${dirs[0]}/hopd.err" "$HOPD_LOG"; rm -rf "${dirs[@]}"' EXIT
data=$(mktemp -d /tmp/hop-bench-data.XXXXXX)
dirs+=("$data")
start_hopd "$data"
hopd_pid=$started_pid
addr=$started_addr
key=$(sed -n 's/.*server key \([0-9a-f]*\);.*/\1/p' "$data/hopd.out")
echo "hopd pid $hopd_pid at $addr (core $server_core); hop-bench on core $generator_core" >&2

# HOPDS=N (ceiling only: the hopds are not a cluster, so clients on two of them cannot reach
# each other) starts N-1 more hopds with the same server key, for holding more connections than
# one server process's descriptor limit allows; the generator spreads its connections over all
# of them (--server ADDR,ADDR,...; one --server-key pins them all). --server-pid names the first.
servers=$addr
if [ "${HOPDS:-1}" -gt 1 ]; then
    for _ in $(seq 2 "$HOPDS"); do
        more=$(mktemp -d /tmp/hop-bench-data.XXXXXX)
        dirs+=("$more")
        cp -p "$data/server.key" "$more/server.key"
        start_hopd "$more"
        echo "hopd pid $started_pid at $started_addr (core $server_core)" >&2
        servers=$servers,$started_addr
    done
fi
# PERF_SYSCALLS=FILE counts the system calls hopd makes while the scenario runs (perf's
# syscall tracepoints; no hardware counters needed) and writes perf's report to FILE.
perf_pid=
if [ -n "${PERF_SYSCALLS:-}" ]; then
    perf stat -e raw_syscalls:sys_enter -e syscalls:sys_enter_io_uring_enter \
        -e syscalls:sys_enter_epoll_wait -e syscalls:sys_enter_recvfrom \
        -e syscalls:sys_enter_sendto -e syscalls:sys_enter_read -e syscalls:sys_enter_write \
        -p "$hopd_pid" -o "$PERF_SYSCALLS" &
    perf_pid=$!
fi
status=0
generator_scheduling "$scenario" "$@"
"${generator_run_as[@]}" taskset -c "$generator_core" "$bench" "$scenario" --server "$servers" --server-key "$key" \
    --server-pid "$hopd_pid" "$@" || status=$?
if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
fi
exit "$status"
