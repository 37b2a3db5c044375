# Sourced by the benchmark scripts: sets `limit_flags`, the hopd flags that turn its abuse
# limits off (admission, sender rates, queue shares: docs/security.md). The generator opens
# thousands of connections a second from each of its source addresses and sends thousands of
# messages a second per sender, which is what those limits exist to refuse: the runs measure
# capacity, not the limits. ABUSE_LIMITS=on keeps hopd's defaults.
limit_flags=(--shard-handshakes-per-second 0 --address-handshakes-per-second 0 --address-handshakes-max 0 --address-connections-max 0 --sender-messages-per-second 0 --sender-reads-per-second 0 --queue-sender-percent 100 --shard-queue-sender-percent 100)
if [ "${ABUSE_LIMITS:-off}" = on ]; then
    limit_flags=()
fi
