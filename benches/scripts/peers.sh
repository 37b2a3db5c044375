#!/usr/bin/env bash
# Peers for hop-bench: install them from Debian packages, and run one scenario against hop and
# each peer back to back, like for like: the server pinned to core 0, the generator to core 1,
# everything on 127.0.0.1 only. Prints a table of ratios at the end.
#
#   benches/scripts/peers.sh install
#   benches/scripts/peers.sh compare throughput --pairs 50 --duration-ms 10000
#   benches/scripts/peers.sh compare latency --rate 50000 --duration-ms 10000
#   benches/scripts/peers.sh compare group --members 100 --groups 10
#
# PEERS picks the peers (default "mosquitto nats"); ejabberd is installed and run only when
# named (its Erlang runtime is large): PEERS="mosquitto nats ejabberd". RESULTS names the folder for the JSON reports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/../../target}
bench=${HOP_BENCH:-$target_dir/release/hop-bench}
peers=${PEERS:-mosquitto nats}
# run_as and generator_scheduling: as in with-hopd.sh (SCHED=fifo, PRIORITY).
. "$here/scheduling.sh"
mosquitto_port=18830
nats_mqtt_port=18831
nats_port=18832
ejabberd_mqtt_port=18833

install() {
    packages="mosquitto nats-server"
    case " $peers " in *" ejabberd "*) packages="$packages ejabberd" ;; esac
    apt-get update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y $packages
    # Where the packages' own services started (their configs listen on every interface),
    # stop them: the comparison runs its own instances on 127.0.0.1.
    for service in mosquitto nats-server ejabberd; do
        service "$service" stop >/dev/null 2>&1 || true
    done
}

# start_peer NAME DIR: starts the peer on core 0 in the background; sets peer_pid and peer_addr.
start_peer() {
    local name=$1 dir=$2
    mqtt_flags=()
    case $name in
    mosquitto)
        cat >"$dir/mosquitto.conf" <<CONF
listener $mosquitto_port 127.0.0.1
allow_anonymous true
persistence false
# Offline runs queue many QoS 1 messages per client: no cap (0), like hop's bounded queues
# sized above the run.
max_queued_messages 0
set_tcp_nodelay true
log_dest stderr
log_type error
CONF
        "${run_as[@]}" taskset -c 0 mosquitto -c "$dir/mosquitto.conf" 2>"$dir/peer.err" &
        peer_pid=$!
        peer_addr=127.0.0.1:$mosquitto_port
        ;;
    nats)
        cat >"$dir/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
server_name: hop_bench_nats
# MQTT keeps its sessions and QoS 1 messages in JetStream.
jetstream {
  store_dir: "$dir/jetstream"
}
mqtt {
  listen: 127.0.0.1:$nats_mqtt_port
}
CONF
        "${run_as[@]}" taskset -c 0 nats-server -c "$dir/nats.conf" 2>"$dir/peer.err" &
        peer_pid=$!
        peer_addr=127.0.0.1:$nats_mqtt_port
        ;;
    ejabberd)
        # mod_mqtt on 127.0.0.1 only; the Erlang distribution and epmd on loopback too.
        # Anonymous authentication: clients log in with any name (hop-bench --mqtt-login).
        cat >"$dir/ejabberd.yml" <<CONF
hosts:
  - localhost
loglevel: warning
auth_method: [anonymous]
anonymous_protocol: login_anon
listen:
  -
    port: $ejabberd_mqtt_port
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 4096
modules:
  mod_mqtt: {}
CONF
        # Our own ejabberdctl.cfg: the packaged one names /etc/ejabberd/ejabberd.yml, which
        # listens on every interface.
        cat >"$dir/ejabberdctl.cfg" <<CONF
ERLANG_NODE=hopbench@localhost
INET_DIST_INTERFACE=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
POLL=true
ERL_PROCESSES=1000000
ERL_MAX_PORTS=65536
CONF
        chown -R ejabberd: "$dir"
        epmd_before=$(pgrep -x epmd || true)
        # As the ejabberd user through setpriv, not ejabberdctl's own `su`: su applies the
        # login limits (1,024 descriptors), which would cap the connection ceiling at 1,000.
        (cd "$dir" && HOME=/var/lib/ejabberd "${run_as[@]}" taskset -c 0 \
            setpriv --reuid=ejabberd --regid=ejabberd --init-groups \
            ejabberdctl --ctl-config "$dir/ejabberdctl.cfg" \
            --config "$dir/ejabberd.yml" --logs "$dir" --spool "$dir" foreground \
            >"$dir/peer.err" 2>&1 &)
        peer_addr=127.0.0.1:$ejabberd_mqtt_port
        peer_pid=""
        for _ in $(seq 200); do
            peer_pid=$(ss -ltnpH "sport = :$ejabberd_mqtt_port" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
            [ -n "$peer_pid" ] && break
            sleep 0.1
        done
        [ -n "$peer_pid" ] || { echo "ejabberd did not start:" >&2; cat "$dir/peer.err" >&2; return 1; }
        mqtt_flags=(--mqtt-login)
        ;;
    *)
        echo "unknown peer $name" >&2
        return 1
        ;;
    esac
    local port=${peer_addr##*:}
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not start:" >&2
    cat "$dir/peer.err" >&2
    return 1
}

# Stops the running peer (and the epmd that ejabberd started, if none ran before it).
stop_peer() {
    kill "$peer_pid" 2>/dev/null || true
    wait "$peer_pid" 2>/dev/null || true
    if [ "$peer_name" = ejabberd ]; then
        # The Erlang VM stops gracefully on SIGTERM, slowly under load: give it 5 s.
        for _ in $(seq 50); do kill -0 "$peer_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$peer_pid" 2>/dev/null || true
        if [ -z "$epmd_before" ]; then
            epmd_pid=$(pgrep -x epmd || true)
            [ -n "$epmd_pid" ] && kill "$epmd_pid" 2>/dev/null
        fi
    fi
    return 0
}

compare() {
    local scenario=$1
    shift
    local results=${RESULTS:-$(mktemp -d /tmp/hop-bench-peers.XXXXXX)}
    mkdir -p "$results"
    local rows=()
    echo "== hop" >&2
    "$here/with-hopd.sh" "$scenario" "$@" --json "$results/hop.json"
    rows+=("hop=$results/hop.json")
    for peer in $peers; do
        local dir
        dir=$(mktemp -d /tmp/hop-bench-peer.XXXXXX)
        echo "== $peer" >&2
        peer_name=$peer
        if start_peer "$peer" "$dir"; then
            trap stop_peer EXIT
            generator_scheduling "$scenario" "$@"
            "${generator_run_as[@]}" taskset -c 1 "$bench" "$scenario" --target mqtt "${mqtt_flags[@]}" \
                --server "$peer_addr" --server-pid "$peer_pid" "$@" \
                --json "$results/$peer.json" && rows+=("$peer=$results/$peer.json")
            stop_peer
            trap - EXIT
        fi
        rm -rf "$dir"
    done
    local figures
    case $scenario in
    throughput) figures=messages_per_second ;;
    latency) figures=achieved_rate,latency.p50_us,latency.p99_us ;;
    ceiling) figures=held,handshakes_per_second ;;
    offline) figures=enqueue_per_second,drain_per_second ;;
    group) figures=member_messages_per_second,latency.p50_us,latency.p99_us ;;
    *) figures=messages_per_second ;;
    esac
    echo "reports in $results"
    "$bench" ratios --figures "$figures" "${rows[@]}"
}

case ${1:-} in
install) install ;;
compare)
    shift
    compare "$@"
    ;;
*)
    echo "usage: $0 install | compare SCENARIO [hop-bench flags...]" >&2
    exit 2
    ;;
esac
