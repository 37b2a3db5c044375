# Sourced by the benchmark scripts: `start_idle_clients PROCS PER_PROC` starts PROCS
# `idle_clients` processes one after the other, each holding PER_PROC idle authenticated
# connections to $ADDR (server key $KEY) from its own 127.0.x.y address, until the fifo
# $W/hold closes (`exec 3>&-`). Each prints `ready N` or `stopped N: why` to $W/cP; after each
# is ready, the function `after_idle_clients P` runs if the caller defined it. The processes'
# ids are in CL. Needs T (the release folder) and W (a scratch folder).
start_idle_clients() {
  local procs=$1 per_proc=$2 p i
  mkfifo $W/hold
  exec 3<>$W/hold
  CL=""
  for p in $(seq $procs); do
    $T/examples/idle_clients $ADDR $KEY $per_proc 127.0.$(( (p+1) / 250 )).$(( (p+1) % 250 + 1 )) 4 <$W/hold >$W/c$p 3>&- &
    CL="$CL $!"
    for i in $(seq 900); do grep -q -E "ready|stopped" $W/c$p 2>/dev/null && break; sleep 0.5; done
    if declare -F after_idle_clients >/dev/null; then after_idle_clients $p; fi
  done
}
