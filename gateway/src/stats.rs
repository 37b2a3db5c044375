//! Per-shard counters. Each shard writes only its own (relaxed atomics, no sharing of cache
//! lines between shards' hot counters); anyone may read them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Counters of one shard.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct ShardStats {
            $( #[doc = $doc] pub $name: AtomicU64, )*
            /// Commits that fsynced, by how long they took ([`COMMIT_BUCKETS_US`]).
            pub commit_times: Times,
            /// The loop's turns, by how long each worked (from its first event to the end of
            /// its work, waiting excluded; [`TURN_BUCKETS_US`]).
            pub turn_times: Times,
        }

        impl ShardStats {
            /// Name and value of every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed)), )*]
            }
        }
    };
}

counters! {
    connections_accepted: "connections accepted by this shard's listener",
    connections_open: "connections held now (gauge)",
    connections_refused: "connections closed at once because the shard was full",
    admission_busy: "connections refused because the shard's handshake bucket was empty",
    admission_address_rate: "connections refused because their address opened handshakes too fast",
    admission_address_handshakes: "connections refused because their address had too many handshakes unfinished",
    admission_address_connections: "connections refused because their address held too many connections",
    handshakes_completed: "Noise handshakes completed",
    handshakes_failed: "handshakes that failed (bad message, garbage)",
    handshake_timeouts: "connections closed for not finishing the handshake in time",
    idle_timeouts: "connections closed for silence",
    protocol_errors: "connections closed for breaking the protocol after the handshake",
    clients_outdated: "connections of clients of an older protocol version, told to upgrade",
    handoffs_out: "connections handed to their home shard",
    handoffs_in: "connections adopted from another shard",
    stanzas_in: "stanzas received from clients",
    mail_backpressure: "times a full mailbox (or a node link's full queue) paused a connection",
    link_backpressure: "mails for another node that waited in the shard because its link's queue was full",
    send_overflows: "connections closed because they did not read what was sent",
    send_budget_closes: "connections closed as the slowest readers when the shard's send budget was over",
    binding_write_errors: "account bindings that could not be written",
    store_refusals: "items the offline queue refused (over quota)",
    store_commit_failures: "offline queue commits that failed (disk full, IO error)",
    store_unreadable: "queued messages dropped because their record could not be read back",
    store_waits: "times the shard's loop waited for its syncer: the disk was behind the traffic",
    store_reads_off_loop: "reads of the offline queue that needed the disk, made on the shard's reader thread",
    keeps_skipped: "queued items acked by their device before their batch went to disk (never written)",
    idle_polls_woken: "polls before sleeping (idle_poll_us) that found work: wake-ups the shard did not pay",
    idle_polls_slept: "polls before sleeping (idle_poll_us) that found nothing, after which the shard blocked",
    handshakes_abandoned: "connections the peer closed before finishing the handshake",
    kicks: "connections an operator closed (`hop admin kick`)",
    accounts_expired: "accounts that expired: no device of theirs was seen within account_expiry_ms",
    registrations_refused: "new keys sent away under registration = token (no Register first, or a token unknown, used or expired)",
    drain_closes: "connections sent away by a lame-duck drain",
    shard_restarts: "times this shard panicked and was restarted by its supervisor",
    cluster_redirects: "connections sent to their home node of the cluster (GoAway REDIRECT)",
    cluster_unavailable: "connections sent away while this node was no member of its cluster",
    links_in: "node links from other members of the cluster accepted",
    link_mails_in: "mails taken from other nodes' links (each once)",
    bytes_in: "bytes read from clients",
    bytes_out: "bytes handed to the backend to write to clients",
    stanzas_out: "stanzas sent to clients",
    // Published by the shard once per tick, from its router and store.
    connections_handshaking: "connections still in their handshake (gauge, per tick)",
    handshakes_waiting: "connections whose handshake input waits for a turn's cap (gauge, per tick)",
    send_buffered_bytes: "bytes the shard's connections hold for writing (gauge, per tick)",
    messages_accepted: "messages taken for delivery (per tick)",
    messages_rejected: "messages refused (quota, unknown user, disk; per tick)",
    messages_acked: "messages the recipient's device acked (per tick)",
    messages_deduplicated: "resent messages answered with the original's ack (per tick)",
    receipts_queued: "receipts queued for senders (per tick)",
    reads_refused: "Read receipts refused for a wrong proof (per tick)",
    rate_limited: "Sends and Reads refused because their device was over its rate (per tick)",
    mails_to_nodes: "mails for users of another node of the cluster (per tick)",
    mails_unroutable: "mails for another node that could not reach it (per tick)",
    replicas_kept: "copies of other nodes' messages kept here as their users' replica (per tick)",
    replicas_refused: "copies of other nodes' messages refused here, the queue full (per tick)",
    replicas_missing: "messages refused to their senders for want of a copy on the replica node (per tick)",
    handed_back: "messages other nodes handed back to this one, their users' new home (per tick)",
    handed_back_dropped: "handed-back messages not queued, the user's queue full (per tick)",
    group_messages: "messages sent to groups homed on this shard (per tick)",
    group_changes: "group membership changes made on this shard (per tick)",
    group_copies_refused: "members' copies of group messages and events refused by their shards (per tick)",
    queue_items: "items queued on this shard (gauge, per tick)",
    queue_bytes: "body bytes queued on this shard (gauge, per tick)",
    store_appends: "records appended to the offline queue (per tick)",
    store_deliveries: "tombstones written for delivered records (per tick)",
    store_commits: "offline-queue commits (per tick)",
    store_fsyncs: "offline-queue fsyncs (per tick)",
    store_segments_created: "offline-queue segments begun (per tick)",
    store_segments_begun_on_spares: "segments begun on a spare the syncer made (per tick)",
    store_segment_removals_failed: "compacted segments the syncer could not remove (per tick)",
    store_disk_bytes: "bytes of the offline queue's segment files (gauge, per tick)",
}

/// Buckets of a [`Times`] histogram, bounded ones (the last bucket is unbounded).
pub const TIME_BUCKETS: usize = 12;

/// Upper bounds, in microseconds, of the buckets of the commit times.
pub const COMMIT_BUCKETS_US: [u64; TIME_BUCKETS] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Upper bounds, in microseconds, of the buckets of the loop's turn times: a turn is the wait
/// of every message it carries.
pub const TURN_BUCKETS_US: [u64; TIME_BUCKETS] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000,
];

/// A histogram of durations over one of the bucket bounds above. Written by the shard alone;
/// read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct Times {
    /// Durations at most the bound of the same index; the last is `+Inf`.
    pub buckets: [AtomicU64; TIME_BUCKETS + 1],
    pub count: AtomicU64,
    pub sum_us: AtomicU64,
}

impl Times {
    pub fn record(&self, bounds: &[u64; TIME_BUCKETS], micros: u64) {
        let index = bounds
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(TIME_BUCKETS);
        bump(&self.buckets[index], 1);
        bump(&self.count, 1);
        bump(&self.sum_us, micros);
    }
}

/// Adds to a counter.
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}
