#!/usr/bin/env bash
# idle-memory.sh BACKEND MODE PROCS PER_PROC : memory per idle authenticated connection,
# hopd --shards 2 (SHARDS=N for another count). Run as root (/proc/slabinfo). See
# docs/uring.md and docs/BENCHMARKS.md.
#
# The client processes start one after the other, and hopd's RSS and the kernel's slab are
# read before the first and after each. Two figures per connection come out:
# - growth: (after the last - before the first) / connections held, which also counts the
#   fixed memory that the first connections touch for the first time (the shard's receive
#   buffers, 2 x 2 MiB, are touched by the first few thousand handshakes);
# - marginal: (after the last - after the first) / connections added since, the cost of one
#   more idle connection once that is done.
set -u
# The abuse limits are off unless ABUSE_LIMITS=on (abuse-limits.sh says why).
. "$(dirname "$0")/abuse-limits.sh"
. "$(dirname "$0")/idle-clients.sh"
B=$1; M=$2; P=$3; N=$4
T=${CARGO_TARGET_DIR:-target}/release
W=$(mktemp -d /tmp/hopmeasure.XXXX)
slab() { awk 'NR>2 {s+=$2*$4} END {print s}' /proc/slabinfo; }
slabs() { awk 'NR>2 {print $1, $2*$4}' /proc/slabinfo | sort; }
rss() { awk '/VmRSS/ {print $2 * 1024}' /proc/$H/status; }
held() { ss -tnH state established "( sport = :${ADDR##*:} )" | wc -l; }
$T/hopd --listen 127.0.0.1:0 --data $W/data --shards ${SHARDS:-2} --pin-cores false --admin 127.0.0.1:0 --backend $B --uring-receive $M \
  --idle-timeout-ms 900000 --handshake-timeout-ms 120000 --log warn "${limit_flags[@]}" ${HOPD_FLAGS:-} >$W/banner 2>$W/log &
H=$!
for i in $(seq 50); do [ -s $W/banner ] && break; sleep 0.1; done
ADDR=$(awk '{print $4}' $W/banner); KEY=$(sed 's/.*server key \([0-9a-f]*\);.*/\1/' $W/banner)
sleep 1
R0=$(rss); S0=$(slab); slabs >$W/s0; M0=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
after_idle_clients() {
  sleep 2
  if [ $1 -eq 1 ]; then RA=$(rss); SA=$(slab); HA=$(held); fi
}
start_idle_clients $P $N
R1=$(rss); S1=$(slab); slabs >$W/s1; M1=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
HELD=$(held)
echo "backend=$B mode=$M clients: $(cat $W/c* | tr '\n' ' ')"
echo "server-side established=$HELD (after the first process: $HA)"
echo "rss_bytes $R0 -> $R1 : growth $(( (R1-R0) / (HELD>0?HELD:1) )) B/conn; marginal $(( (R1-RA) / ((HELD-HA)>0?(HELD-HA):1) )) B/conn"
echo "slabinfo_bytes $S0 -> $S1 : growth $(( (S1-S0) / (HELD>0?HELD:1) )) B/conn; marginal $(( (S1-SA) / ((HELD-HA)>0?(HELD-HA):1) )) B/conn (both ends of each loopback connection)"
echo "meminfo_slab_kb $M0 -> $M1 : $(( (M1-M0)*1024 / (HELD>0?HELD:1) )) B/conn"
join $W/s0 $W/s1 | awk -v n=$HELD '{d=$3-$2; if (d>n*16) printf "  %-24s %6d B/conn\n", $1, d/n}' | sort -k2 -nr | head -12
# end: clients first, then hopd
exec 3>&-
for c in $CL; do timeout 60 tail --pid=$c -f /dev/null; done
kill -TERM $H; wait $H 2>/dev/null
grep -E "shard stopped|refused|WARN|ERROR" $W/log | cut -c1-400 | tail -6
rm -rf $W
