//! hop's durable offline queue: one append log per shard, owned by the shard's thread.
//!
//! `DATA/shard-K/NNNNNNNN.log` holds the segments of shard K; the byte layout, the fsync
//! protocol and what recovery does with damage are in `store/DESIGN.md`. The in-memory index
//! holds positions and sizes, never bodies.
//!
//! The shard loop's calls, in order:
//! 1. before any shard starts, once: [`prepare`] (re-homes queued records when the shard count
//!    changed);
//! 2. per shard: [`ShardStore::open`], which recovers the shard's queues;
//! 3. as events arrive: [`ShardStore::append`] (a message or receipt for an offline or not yet
//!    acking device; returns its sequence number) and [`ShardStore::mark_delivered`];
//! 4. when [`ShardStore::next_commit_deadline`] has come: [`ShardStore::commit`]; every append
//!    with a sequence number `<= Commit::durable_through` is durable now and its ServerAck may
//!    leave; a [`CommitError`] names the sequence numbers that failed (an Error to their
//!    senders instead). A loop that must not wait for the disk splits it:
//!    [`ShardStore::write`] (under `batch` it closes the batch, kept in memory; under `always`
//!    and `none` it writes it), [`ShardStore::start_sync`] for a [`SyncJob`] that another
//!    thread runs (it writes the batches still in memory, then fsyncs), and
//!    [`ShardStore::synced`] with its result, which says what is durable, or failed, the same
//!    way; the next batch fills while one syncs;
//! 5. when a user connects: [`ShardStore::read`] its queue in order;
//! 6. with spare time: [`ShardStore::expire`] and [`ShardStore::compact`], each with a budget.
//!
//! `DATA/accounts/shard-K.keys` holds the account bindings (which static key a user id belongs
//! to): [`accounts::load`] at process start, an [`accounts::AccountLog`] per shard.
//! `DATA/accounts/shard-K.privacy` holds the presence settings (who may see a user's
//! presence): [`privacy::load`] at process start, a [`privacy::PrivacyLog`] per shard.
//! `DATA/accounts/shard-K.groups` holds the chat groups (name, version, members; a whole
//! snapshot per change): [`groups::load`] at process start, a [`groups::GroupLog`] per shard.
//! `DATA/accounts/shard-K.seen` holds when each device was last seen, on the account clock
//! that counts only while hopd runs, for account expiry: [`seen::load`] at process start, a
//! [`seen::SeenLog`] per shard.
//!
//! Time is passed in; all IO goes through the [`io::Io`] seam. Two clocks, never mixed:
//! - `now_ms`: a monotonic clock (milliseconds since some start, e.g. the process's). Batch
//!   deadlines, segment ages and compaction ages use it; it is never written to disk nor
//!   compared with anything read from disk (a recovered segment's age starts at `open`).
//! - `wall_ms`: the wall clock, milliseconds since the Unix epoch, the clock of the message
//!   timestamps (`timestamp_ms`) stored in records. Only [`ShardStore::expire`] (the offline
//!   TTL) and [`report`] (message ages) take it.
#![forbid(unsafe_code)]

pub mod accounts;
mod cache;
pub mod devices;
mod fixedlog;
pub mod format;
pub mod groups;
pub mod io;
pub mod privacy;
mod rehome;
mod report;
pub mod seen;
mod shard;
mod varlog;

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

pub use fixedlog::LogWrite;
pub use format::GroupTag;
pub use rehome::{prepare, Layout, SHARDS_FILE};
pub use report::{report, QueueReport, ShardReport, UserReport};
pub use shard::{
    Commit, CompactProgress, Counters, Expired, Item, ReadDone, ReadJob, Record, RecoveryStats,
    ShardStore, Slot, StoredItem, SyncJob, Synced,
};

/// When a queued record is durable, and so when its ServerAck leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync at every commit, and a commit is due as soon as anything is buffered: the loop
    /// commits once per turn, so the records of one turn share an fsync.
    Always,
    /// Group commit: one fsync per batch, due `delay_ms` after the batch's first record or as
    /// soon as it holds `records_max` appends. The default.
    Batch { delay_ms: u64, records_max: u32 },
    /// Write at the same moments but never fsync: a record survives a crash of hopd (it is in
    /// the kernel's page cache) but not a crash of the machine.
    None { delay_ms: u64, records_max: u32 },
}

impl Default for Durability {
    fn default() -> Self {
        Self::Batch {
            delay_ms: 2,
            records_max: 1024,
        }
    }
}

/// Per-user limits on what may wait in a queue. Messages and receipts count separately, so
/// receipts waiting for a user never take the room its incoming messages need, nor the other
/// way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Messages queued for one user.
    pub messages_max: u32,
    /// Receipts queued for one user (receipts for messages it sent, waiting for it).
    pub receipts_max: u32,
    /// Message body bytes queued for one user (receipts have no body).
    pub bytes_max: u64,
}

impl Default for Quota {
    fn default() -> Self {
        // The router's in-memory limits, so the switch to the store changes no behaviour.
        Self {
            messages_max: 10_000,
            receipts_max: 10_000,
            bytes_max: 16 * 1024 * 1024,
        }
    }
}

impl Quota {
    /// No limit at all: for copies of records that were admitted under a quota already
    /// (re-homing), tests and benchmarks.
    pub const UNLIMITED: Self = Self {
        messages_max: u32::MAX,
        receipts_max: u32::MAX,
        bytes_max: u64::MAX,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub durability: Durability,
    /// A segment is sealed once it holds this many bytes (it may exceed it by one batch).
    pub segment_bytes_max: u32,
    /// A segment holding records is sealed this long after it was created, so that a
    /// delivered record's bytes do not wait in the active segment for ever (monotonic clock).
    pub segment_age_max_ms: u64,
    /// A sealed segment holding dead bytes is compacted this long after it was sealed
    /// (monotonic clock).
    pub compact_after_ms: u64,
    /// Buffered bytes that make a commit due at once.
    pub buffer_bytes_max: u32,
    /// Undelivered records expire this long after their timestamp (wall clock: compared with
    /// the records' `timestamp_ms`).
    pub offline_ttl_ms: u64,
    pub quota: Quota,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            segment_bytes_max: 64 * 1024 * 1024,
            segment_age_max_ms: 5 * 60 * 1000,
            compact_after_ms: 5 * 60 * 1000,
            buffer_bytes_max: 4 * 1024 * 1024,
            offline_ttl_ms: 30 * 24 * 60 * 60 * 1000,
            quota: Quota::default(),
        }
    }
}

impl Options {
    fn check(&self) {
        assert!(self.segment_bytes_max as usize > format::SEGMENT_HEADER_BYTES);
        assert!(self.buffer_bytes_max as usize >= format::RECORD_BYTES_MAX);
        // A segment is at most its limit plus one buffer plus one record: offsets fit u32.
        assert!(
            u64::from(self.segment_bytes_max)
                + u64::from(self.buffer_bytes_max)
                + (format::RECORD_BYTES_MAX as u64)
                < u64::from(u32::MAX)
        );
        if let Durability::Batch { records_max, .. } | Durability::None { records_max, .. } =
            self.durability
        {
            assert!(records_max > 0, "a batch holds at least one record");
        }
    }
}

/// Why an append was refused. Nothing was written; the sender gets an Error stanza.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the recipient's queue is full: {queued} messages queued, at most {max}")]
    QuotaMessages { queued: usize, max: usize },
    /// Too many receipts wait for the original sender (the user the receipt goes to).
    #[error("the original sender's queue is full: {queued} receipts queued, at most {max}")]
    QuotaReceipts { queued: usize, max: usize },
    #[error(
        "the recipient's queue is full: {queued} body bytes queued, {adding} more would pass {max}"
    )]
    QuotaBytes {
        queued: u64,
        adding: usize,
        max: u64,
    },
    #[error("body of {body_bytes} bytes is over the {max}-byte limit")]
    TooLarge { body_bytes: usize, max: usize },
}

/// A commit whose write or fsync failed (disk full, EIO). The appends with these sequence
/// numbers are not queued; their senders get an Error. Records durable before stay durable.
#[derive(Debug, thiserror::Error)]
#[error("commit failed; records {failed_seqs:?} were not stored: {source}")]
pub struct CommitError {
    /// Possibly empty (when only tombstones were buffered).
    pub failed_seqs: RangeInclusive<u64>,
    #[source]
    pub source: std::io::Error,
}

/// A local storage failure outside a commit (open, compaction, re-homing, accounts).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The folder is not laid out as this version expects (e.g. written by protocol v1);
    /// `reason` says what to do.
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    /// A damaged record that cannot be skipped without the operator's consent; `repair` says
    /// the command that fixes it.
    #[error("{path}: damaged record at byte {offset}: {reason}; to repair: {repair}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
        repair: String,
    },
}

impl StoreError {
    /// `path` shows that the data folder `data` was written by hop wire protocol v1.
    pub(crate) fn written_by_v1(path: &Path, data: &Path) -> Self {
        Self::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "the data folder {data} was written by hop wire protocol v1 (48-bit user ids), \
                 as this file shows; this hop speaks protocol v2 (128-bit user ids) and cannot \
                 read it, and nothing converts it. Stop hopd, move the data folder aside (e.g. \
                 `mv {data} {data}.v1`) and start with a new, empty one: the messages queued in \
                 the old folder are not delivered, and clients bind their keys again when they \
                 next connect",
                data = data.display()
            ),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
