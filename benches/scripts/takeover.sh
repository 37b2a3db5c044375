#!/usr/bin/env bash
# takeover.sh BACKEND PROCS PER_PROC : how long `hopd --takeover` holds PROCS x PER_PROC idle
# authenticated connections frozen, and whether all of them live on in the new process.
# hopd --shards 2 (SHARDS=N for another count), release build:
#   cargo build --release --bin hopd && cargo build --release -p hop-gateway --example idle_clients
# See docs/operations.md ("Upgrade without dropping connections") and docs/BENCHMARKS.md.
#
# Prints the connections established on hopd's port before and after, each step's log line,
# and the pause the clients see: from the old process's quiesce (it stops reading) to the last
# shard of the new process resuming its connections, from the two logs' timestamps.
set -u
. "$(dirname "$0")/abuse-limits.sh"
. "$(dirname "$0")/idle-clients.sh"
B=$1; P=$2; N=$3
T=${CARGO_TARGET_DIR:-target}/release
W=$(mktemp -d /tmp/hoptakeover.XXXX)
held() { ss -tnH state established "( sport = :${ADDR##*:} )" | wc -l; }
FLAGS=(--data $W/data --shards ${SHARDS:-2} --pin-cores false --admin off --backend $B
  --idle-timeout-ms 900000 --handshake-timeout-ms 120000 --log info "${limit_flags[@]}")
$T/hopd --listen 127.0.0.1:0 "${FLAGS[@]}" >$W/banner 2>$W/log &
H=$!
for i in $(seq 50); do [ -s $W/banner ] && break; sleep 0.1; done
ADDR=$(awk '{print $4}' $W/banner); KEY=$(sed 's/.*server key \([0-9a-f]*\);.*/\1/' $W/banner)
start_idle_clients $P $N
sleep 1
BEFORE=$(held)
$T/hopd --listen $ADDR --takeover "${FLAGS[@]}" >$W/banner2 2>$W/log2 &
H2=$!
# The old process exits once the new one serves; the new one exits if the takeover fails.
for i in $(seq 6000); do kill -0 $H 2>/dev/null && kill -0 $H2 2>/dev/null || break; sleep 0.05; done
if ! kill -0 $H2 2>/dev/null; then
  echo "the takeover failed: $(grep -h "hopd:" $W/log2)"
  grep -h -E "WARN|takeover" $W/log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | tail -4
  exec 3>&-; kill -TERM $H; wait $H 2>/dev/null; rm -rf $W; exit 1
fi
wait $H; OLD_STATUS=$?
for i in $(seq 600); do grep -q "connections resumed" $W/log2 && \
  [ "$(grep -c "connections resumed" $W/log2)" -ge "${SHARDS:-2}" ] && break; sleep 0.05; done
sleep 1
AFTER=$(held)
echo "backend=$B clients: $(cat $W/c* | tr '\n' ' ')"
echo "established before=$BEFORE after=$AFTER; old hopd exit status $OLD_STATUS"
strip() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }
at() { date -d "$(strip "$1" | grep "$2" | $3 -1 | cut -d' ' -f1)" +%s%N; }
echo "pause (quiesce to the last shard resumed): $(( ($(at $W/log2 'connections resumed' tail) - $(at $W/log 'a new process asks' head)) / 1000000 )) ms"
strip $W/log $W/log2 | grep -h "takeover" | cut -c1-160 | sort
grep -E "WARN|ERROR" $W/log $W/log2 | cut -c1-300 | tail -5
exec 3>&-
for c in $CL; do timeout 60 tail --pid=$c -f /dev/null; done
kill -TERM $H2; wait $H2 2>/dev/null
rm -rf $W
