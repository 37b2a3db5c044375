# Sourced by with-hopd.sh and peers.sh: how the servers and the generator are scheduled.
#
# run_as: nice -n $PRIORITY (default -10), so that niced background work on the same cores
# (builds) does not take time slices in the middle of a measurement; with SCHED=fifo,
# SCHED_FIFO instead (root only; the kernel's RT throttling still leaves 5% of each core to
# everything else). An array, not a function: a function would run in a subshell when
# backgrounded, and $! would name the subshell instead of the server.
priority=${PRIORITY:--10}
if [ "${SCHED:-}" = fifo ]; then
    run_as=(chrt -f 1)
else
    run_as=(nice -n "$priority")
fi

# generator_scheduling SCENARIO [FLAGS...]: sets generator_run_as, how hop-bench runs. As
# run_as, except for a latency generator that spins (the default, --wait spin): it never
# sleeps, so under SCHED_FIFO the kernel's RT throttling would stop it for 50 ms of every
# second (hop-bench refuses that); it runs at nice $PRIORITY on its own core instead.
generator_scheduling() {
    local scenario=$1
    shift
    generator_run_as=("${run_as[@]}")
    if [ "$scenario" = latency ] && [[ " $* " != *" --wait sleep "* ]]; then
        generator_run_as=(nice -n "$priority")
    fi
}
