//! Per-shard counters. Each shard writes only its own (relaxed atomics, no sharing of cache
//! lines between shards' hot counters); anyone may read them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Counters of one shard.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct ShardStats { $( #[doc = $doc] pub $name: AtomicU64, )* }

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
    handshakes_completed: "Noise handshakes completed",
    handshakes_failed: "handshakes that failed (bad message, garbage)",
    handshake_timeouts: "connections closed for not finishing the handshake in time",
    idle_timeouts: "connections closed for silence",
    protocol_errors: "connections closed for breaking the protocol after the handshake",
    clients_outdated: "connections of clients of an older protocol version, told to upgrade",
    handoffs_out: "connections handed to their home shard",
    handoffs_in: "connections adopted from another shard",
    stanzas_in: "stanzas received from clients",
    mail_backpressure: "times a full mailbox paused a connection",
    send_overflows: "connections closed because they did not read what was sent",
    binding_write_errors: "account bindings that could not be written",
    store_refusals: "items the offline queue refused (over quota)",
    store_commit_failures: "offline queue commits that failed (disk full, IO error)",
    store_unreadable: "queued messages dropped because their record could not be read back",
    keeps_skipped: "queued items acked by their device before their batch went to disk (never written)",
}

/// Adds to a counter.
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}
