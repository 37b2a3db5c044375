//! One shard's offline queue: an append log of segments and an in-memory index of positions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hop_protocol::wire::receipt_ack_id;
use hop_protocol::UserId;

use crate::cache::{pieces, BlockCache, BLOCK_BYTES};
use crate::format::{self, GroupTag, Payload, SegmentHeader, SEGMENT_HEADER_BYTES};
use crate::io::{read_at, Io, IoFile, Wait};
use crate::{AppendError, CommitError, Durability, Options, Quota, StoreError};

/// An item for a user's queue, as the shard loop appends it. `timestamp_ms` is the wall
/// clock (milliseconds since the Unix epoch): it is stored, and the offline TTL counts from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    Message {
        /// The sender; for a sent copy (`sent`), the recipient.
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        body: &'a [u8],
        /// A copy of a message the queue's own account sent, for its other devices.
        sent: bool,
        /// A member's copy of a group message or event.
        group: Option<GroupTag>,
    },
    /// A receipt waiting for the original sender; `kind` is the wire `ReceiptKind` value
    /// (never 0, which names a message in [`ShardStore::mark_delivered`]).
    Receipt {
        id: u64,
        kind: u8,
        by: UserId,
        timestamp_ms: u64,
    },
}

/// An item read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredItem {
    Message {
        /// The sender; for a sent copy (`sent`), the recipient.
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
        /// A copy of a message the queue's own account sent, for its other devices.
        sent: bool,
        /// A member's copy of a group message or event.
        group: Option<GroupTag>,
    },
    Receipt {
        id: u64,
        kind: u8,
        by: UserId,
        timestamp_ms: u64,
    },
}

/// A record read back from a user's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The store's sequence number, the one [`ShardStore::append`] returned.
    pub seq: u64,
    pub item: StoredItem,
}

/// What the index keeps per queued record: where it is and what acks it, never its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    /// What the device's Ack names: the server message id of a message, the ack id of a
    /// receipt (`hop_protocol::wire::receipt_ack_id`, which tells apart the receipts of one
    /// message by who made them).
    pub id: u64,
    /// The item's timestamp: wall clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// 0 for a message, the receipt kind for a receipt (what the device's Ack names).
    pub ack_kind: u8,
    segment: u32,
    offset: u32,
    record_bytes: u32,
}

impl Slot {
    /// Body bytes (0 for a receipt): what the byte quota counts.
    pub fn body_bytes(&self) -> usize {
        if self.ack_kind == 0 {
            self.record_bytes as usize - format::message_record_bytes(0)
        } else {
            0
        }
    }
}

/// A record removed by [`ShardStore::expire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub user: UserId,
    pub seq: u64,
    /// What an Ack of it would name ([`Slot::id`]).
    pub id: u64,
    pub ack_kind: u8,
}

/// A successful [`ShardStore::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Every record whose `append` returned a sequence number `<= durable_through` is durable
    /// under the configured policy (except those a [`CommitError`] reported failed): its
    /// ServerAck may leave.
    pub durable_through: u64,
    /// Records (appends and tombstones) this call wrote.
    pub records_written: u32,
    /// Whether this call fsynced.
    pub synced: bool,
}

/// A batch [`ShardStore::write`] took from the buffer, waiting for the [`SyncJob`] that writes
/// it to its segment and fsyncs it. Its bytes stay here until then: reads of its records come
/// from memory, since the job may not have written them yet.
#[derive(Debug)]
struct Unsynced {
    /// Every append up to this sequence number is in this batch or an earlier one.
    through: u64,
    /// Appends in the batch (the rest are tombstones and copies), for the failure counters.
    appends: u32,
    /// The batch holds a compaction step's copies.
    copies: bool,
    segment: u32,
    /// Where the batch starts in `segment`: a failed fsync cuts the segment back to here.
    start: u64,
    /// The batch's bytes, shared with the job that writes them; `None` when `write` wrote them
    /// itself (`always`). Taken back for the next batch once the batch is durable.
    data: Option<Arc<Vec<u8>>>,
    tombstones: Vec<(UserId, u64, bool)>,
    users: Vec<UserId>,
}

/// The records the store holds in memory and not (or not surely) on file: the batches that
/// wait for their [`SyncJob`], then the active segment's buffer. Each segment's part is
/// contiguous and runs to its end.
#[derive(Clone, Copy)]
pub(crate) struct Unwritten<'a> {
    batches: &'a VecDeque<Unsynced>,
    active: u32,
    /// Where the buffer goes in `active`.
    buffer_at: u64,
    buffer: &'a [u8],
}

impl<'a> Unwritten<'a> {
    /// Segment `segment`'s bytes in memory: (offset, bytes), in order.
    fn regions(self, segment: u32) -> impl Iterator<Item = (u64, &'a [u8])> {
        let batches = self
            .batches
            .iter()
            .filter(move |batch| batch.segment == segment)
            .filter_map(|batch| Some((batch.start, &batch.data.as_ref()?[..])));
        let buffer = (segment == self.active && !self.buffer.is_empty())
            .then_some((self.buffer_at, self.buffer));
        batches.chain(buffer)
    }
}

/// A compaction step's copies, buffered or written, not yet durable.
#[derive(Debug)]
struct Copies {
    /// (user, seq, the slot before it moved), to move back if the copies fail.
    moved: Vec<(UserId, u64, Slot)>,
    /// The segment to delete once they are durable (its last step).
    source: Option<u32>,
    /// In an unsynced batch (else in the buffer).
    written: bool,
}

/// The [`SyncJob`] running: the batches at the front of `unsynced` that it covers.
#[derive(Debug, Clone)]
struct Syncing {
    batches: usize,
    through: u64,
    /// The segment headers it writes, written again by the next job if it fails.
    headers: Vec<(u32, Arc<Vec<u8>>)>,
    /// The number of the spare segment it creates.
    spare: Option<u32>,
    /// Whether it removes segments.
    removals: bool,
}

/// The next segment's file, made ahead under `batch` by a [`SyncJob`] so that a roll does not
/// create a file on the caller's thread. It is empty until the roll that takes it: its header
/// (which holds the sequence number reached at that roll) is written by the job after it.
#[derive(Debug)]
enum Spare<F> {
    /// The next job makes one.
    Wanted,
    /// A job is making one.
    Asked,
    Ready(u32, F),
    /// The last try failed: the next roll creates its segment itself, then one is wanted.
    Failed,
}

/// The fsync of the batches [`ShardStore::write`] wrote, made by [`ShardStore::start_sync`]
/// to run on any thread ([`SyncJob::run`]) and be handed back with [`ShardStore::synced`].
/// It holds its own handles on the files, so the store goes on appending and writing while it
/// runs. One runs at a time per store, covering every batch written before it started.
pub struct SyncJob<I: Io> {
    files: Vec<I::File>,
    /// The batches to write first: (index in `files`, offset, bytes).
    writes: Vec<(usize, u64, Arc<Vec<u8>>)>,
    /// The shard's folder, when a segment was created since the last sync of it.
    dir: Option<PathBuf>,
    /// A handle could not be made (the process is out of descriptors): the job fails.
    failed: Option<io::Error>,
    /// The next segment's file to create, empty ([`Spare`]).
    spare: Option<PathBuf>,
    /// Segments compaction is done with, to remove, with their last handles: closing a
    /// removed file frees its blocks and pages, about 16 ms for 64 MiB on ext4 here.
    removals: Vec<(PathBuf, I::File)>,
    /// The file system of the folder's work (its sync, the spare, the removals).
    io: I,
}

impl<I: Io> std::fmt::Debug for SyncJob<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncJob")
            .field("files", &self.files.len())
            .field("writes", &self.writes.len())
            .field("dir", &self.dir)
            .field("failed", &self.failed)
            .field("spare", &self.spare)
            .field("removals", &self.removals.len())
            .finish()
    }
}

impl<I: Io> SyncJob<I> {
    /// Writes the job's batches to their segment files, fsyncs the files, then the folder if it
    /// needs it; stops at the first failure. Then creates the spare segment, if asked, and
    /// removes the segments compaction is done with: their failures fail no batch.
    pub fn run(mut self) -> Synced<I::File> {
        let mut fsyncs = 0;
        let result = (|| {
            if let Some(error) = self.failed {
                return Err(error);
            }
            for (file, offset, bytes) in &self.writes {
                self.files[*file].write_all_at(bytes, *offset)?;
            }
            for mut file in self.files {
                file.sync()?;
                fsyncs += 1;
            }
            if let Some(dir) = &self.dir {
                self.io.sync_dir(dir)?;
                fsyncs += 1;
            }
            Ok(())
        })();
        let spare = self
            .spare
            .map(|path| create_segment_file(&self.io, &path, false));
        let mut removals_failed = 0;
        for (path, file) in self.removals {
            // A file left by a failed removal is found again at the next start: its records
            // are dead or copied, and compaction takes it again.
            if self.io.remove_file(&path).is_err() {
                removals_failed += 1;
            }
            drop(file);
        }
        Synced {
            result,
            fsyncs,
            spare,
            removals_failed,
        }
    }
}

/// What a [`SyncJob`] did, for [`ShardStore::synced`].
#[derive(Debug)]
pub struct Synced<F> {
    result: io::Result<()>,
    fsyncs: u32,
    spare: Option<io::Result<F>>,
    removals_failed: u64,
}

/// What one [`ShardStore::compact`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactProgress {
    pub bytes_read: u64,
    pub records_copied: u64,
    pub segments_deleted: u32,
    /// Nothing to do now: nothing to compact, or the last step's copies are not durable yet.
    pub idle: bool,
}

/// What recovery found, for the log line and the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryStats {
    pub segments: u32,
    pub records_live: u64,
    pub users: u64,
    pub corrupt_records: u64,
    pub corrupt_bytes: u64,
    pub torn_bytes: u64,
    /// Segment numbers missing between the first and the last segment.
    pub missing_segments: u32,
    pub bad_headers: u32,
    /// Records found twice (a compaction interrupted before it deleted its source).
    pub duplicates: u64,
}

/// Event counts, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub appended: u64,
    pub rejected_quota: u64,
    pub delivered: u64,
    pub expired: u64,
    pub commits: u64,
    pub fsyncs: u64,
    pub commit_failures: u64,
    pub failed_records: u64,
    pub segments_created: u64,
    /// Segments begun on a spare a job had made: their file was not created by the roll.
    pub segments_begun_on_spares: u64,
    pub segments_deleted: u64,
    /// Segments a job could not remove (left for the next start's compaction).
    pub segment_removals_failed: u64,
    pub records_compacted: u64,
    pub corrupt_reads: u64,
    /// Read calls [`ShardStore::read`] made to segment files.
    pub read_calls: u64,
}

/// One shard's offline queue. Owned by the shard's thread; no locks.
///
/// Call order in the shard loop: [`ShardStore::append`] / [`ShardStore::mark_delivered`] as
/// events arrive; [`ShardStore::commit`] when [`ShardStore::next_commit_deadline`] has come
/// (then release the ServerAcks up to `durable_through`); [`ShardStore::expire`] and
/// [`ShardStore::compact`] with a budget when the loop has time.
///
/// Every `now_ms` argument is the same monotonic clock (milliseconds since some start, not the
/// Unix epoch): it paces batches, seals and compacts segments, and is never stored. Only
/// [`ShardStore::expire`] also takes the wall clock, for the records' timestamps.
#[derive(Debug)]
pub struct ShardStore<I: Io> {
    io: I,
    dir: PathBuf,
    shard: u16,
    shards: u16,
    options: Options,
    index: Index<I::File>,
    /// The segment new records go to; always present in `index.segments`.
    active: u32,
    /// Encoded records not yet written; they go at `active`'s `bytes` offset.
    buffer: Vec<u8>,
    /// Tombstones in `buffer`, rewritten after a failed commit so a delivery is not forgotten.
    buffer_tombstones: Vec<(UserId, u64, bool)>,
    /// Users with appends in `buffer`, to take them back if the commit fails.
    buffer_users: Vec<UserId>,
    buffer_appends: u32,
    buffer_records: u32,
    buffer_first_ms: Option<u64>,
    /// Batches written and not yet known durable, oldest first.
    unsynced: VecDeque<Unsynced>,
    /// Buffers of batches that became durable, for the next batches (at most
    /// [`SPARE_BUFFERS_MAX`]).
    spare_buffers: Vec<Vec<u8>>,
    /// Bytes of the unsynced batches held in memory for their job (at most
    /// [`UNSYNCED_IN_MEMORY_BUFFERS`] buffers' worth).
    unsynced_in_memory: usize,
    syncing: Option<Syncing>,
    /// A compaction step's copies until they are durable.
    copies: Option<Copies>,
    /// A compacted segment whose copies are durable, deleted by the next `compact`.
    delete_next: Option<u32>,
    dir_sync_needed: bool,
    /// Under `batch`, the next segment's file ([`Spare`]).
    spare: Spare<I::File>,
    /// Headers of segments begun on a spare, for the next job to write. Until they are
    /// durable no segment is deleted: a header carries the sequence number, which recovery
    /// needs when no record is left to tell it.
    headers_unwritten: Vec<(u32, Arc<Vec<u8>>)>,
    /// Segments compaction is done with, out of the index, for the next job to remove.
    removals: Vec<(PathBuf, I::File)>,
    next_seq: u64,
    durable_through: u64,
    compaction: Option<(u32, u64)>,
    /// The compaction chunk (segment, offset) whose read-ahead was asked for: the next step
    /// reads it, waiting if it must.
    compact_prefetched: Option<(u32, u64)>,
    expire_cursor: usize,
    read_cache: BlockCache,
    counters: Counters,
}

impl<I: Io> ShardStore<I> {
    /// Opens shard `shard` of `shards` under `data/shard-K/`, rebuilding the index from its
    /// segments: a torn tail is truncated, a corrupt record skipped and counted. Never panics on
    /// damaged files. New records go to a new segment. Run [`crate::prepare`] first, once, before
    /// any shard opens. `now_ms` (monotonic) is the age origin of every segment found, since no
    /// time is stored in the files. A folder written by protocol v1 is refused with
    /// [`StoreError::Layout`], untouched.
    pub fn open(
        data: &Path,
        shard: u16,
        shards: u16,
        options: Options,
        io: I,
        now_ms: u64,
    ) -> Result<(Self, RecoveryStats), StoreError> {
        assert!(shard < shards, "shard {shard} of {shards}");
        options.check();
        let dir = shard_dir(data, shard);
        io.create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let (mut index, next_seq, stats) = Index::recover(&io, &dir, false, now_ms)?;
        // What recovery found counts as durable from here on (a resent message is acked at
        // once), but a run that stopped without its last fsync (kill -9, a shard's panic while
        // a sync job ran) may have left written records in the page cache only: sync them.
        for (number, segment) in &mut index.segments {
            segment
                .file
                .sync()
                .map_err(StoreError::io(&segment_path(&dir, *number)))?;
        }
        let active = index.segments.keys().next_back().map_or(1, |last| last + 1);
        let mut store = Self {
            io,
            dir,
            shard,
            shards,
            options,
            index: Index::default(),
            active,
            buffer: Vec::with_capacity(options.buffer_bytes_max as usize),
            buffer_tombstones: Vec::new(),
            buffer_users: Vec::new(),
            buffer_appends: 0,
            buffer_records: 0,
            buffer_first_ms: None,
            unsynced: VecDeque::new(),
            spare_buffers: Vec::new(),
            unsynced_in_memory: 0,
            syncing: None,
            copies: None,
            delete_next: None,
            dir_sync_needed: true,
            spare: Spare::Wanted,
            headers_unwritten: Vec::new(),
            removals: Vec::new(),
            next_seq,
            durable_through: next_seq - 1,
            compaction: None,
            compact_prefetched: None,
            expire_cursor: 0,
            read_cache: BlockCache::default(),
            counters: Counters::default(),
        };
        let file = store.create_segment(active)?;
        index
            .segments
            .insert(active, Segment::new(file, now_ms, None));
        store.index = index;
        store.commit_directory()?;
        Ok((store, stats))
    }

    /// Queues `item` for `user`. The record is buffered, not yet durable: its ServerAck waits
    /// for a [`Commit`] whose `durable_through` reaches the returned sequence number.
    pub fn append(
        &mut self,
        now_ms: u64,
        user: UserId,
        item: &Item<'_>,
    ) -> Result<u64, AppendError> {
        let body_bytes = match item {
            Item::Message { body, .. } => body.len(),
            Item::Receipt { kind, .. } => {
                assert!(*kind != 0, "receipt kind 0 names a message");
                0
            }
        };
        if body_bytes > format::BODY_BYTES_MAX {
            return Err(AppendError::TooLarge {
                body_bytes,
                max: format::BODY_BYTES_MAX,
            });
        }
        if let Some(queue) = self.index.queue(user) {
            if let Err(error) = queue.admits(item, self.options.quota) {
                self.counters.rejected_quota += 1;
                return Err(error);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let offset = self.tail_offset();
        let start = self.buffer.len();
        let (id, timestamp_ms, ack_kind) = match *item {
            Item::Message {
                from,
                id,
                timestamp_ms,
                body,
                sent,
                group,
            } => {
                format::encode_message(
                    &mut self.buffer,
                    user,
                    seq,
                    id,
                    timestamp_ms,
                    from,
                    body,
                    sent,
                    group,
                );
                (id, timestamp_ms, 0)
            }
            Item::Receipt {
                id,
                kind,
                by,
                timestamp_ms,
            } => {
                format::encode_receipt(&mut self.buffer, user, seq, id, timestamp_ms, by, kind);
                (receipt_ack_id(id, by), timestamp_ms, kind)
            }
        };
        let record_bytes = (self.buffer.len() - start) as u32;
        let slot = Slot {
            seq,
            id,
            timestamp_ms,
            ack_kind,
            segment: self.active,
            offset,
            record_bytes,
        };
        self.index.push(user, slot);
        self.buffer_users.push(user);
        self.buffer_appends += 1;
        self.note_buffered(now_ms);
        self.counters.appended += 1;
        Ok(seq)
    }

    /// The device acked `id` (`ack_kind` 0: a message; else a receipt of that kind): the record
    /// leaves the queue and a tombstone is buffered. Returns false when no such record is
    /// queued. The tombstone is durable after the next commit; until then a crash may deliver
    /// the record again (at least once; the server id lets the client drop the duplicate).
    pub fn mark_delivered(&mut self, now_ms: u64, user: UserId, id: u64, ack_kind: u8) -> bool {
        let Some(at) = self.index.queue_index(user) else {
            return false;
        };
        // Devices ack in order, so the record is almost always the first one looked at.
        let Some(position) = self.index.queues[at]
            .slots
            .iter()
            .position(|slot| slot.id == id && slot.ack_kind == ack_kind)
        else {
            return false;
        };
        self.remove(now_ms, at, position, false);
        self.counters.delivered += 1;
        true
    }

    /// When the loop must call [`ShardStore::commit`] next (ms on the monotonic clock of
    /// `now_ms`), or `None` when nothing is buffered.
    pub fn next_commit_deadline(&self) -> Option<u64> {
        let first_ms = self.buffer_first_ms?;
        if self.buffer.len() >= self.options.buffer_bytes_max as usize {
            return Some(first_ms);
        }
        match self.options.durability {
            Durability::Always => Some(first_ms),
            Durability::Batch {
                delay_ms,
                records_max,
            }
            | Durability::None {
                delay_ms,
                records_max,
            } => {
                if self.buffer_appends >= records_max {
                    Some(first_ms)
                } else {
                    Some(first_ms + delay_ms)
                }
            }
        }
    }

    /// Writes the buffered records and, under `always` and `batch`, fsyncs them: [`write`],
    /// then [`start_sync`], [`SyncJob::run`] and [`synced`] on the calling thread. On success
    /// every append up to `durable_through` is durable. On failure the appends not durable yet
    /// are taken back out of the queues and reported (their senders get an Error, not a
    /// ServerAck); records that were durable before stay durable; buffered tombstones are kept
    /// for the next commit. Not while a [`SyncJob`] runs (hand it to [`synced`] first).
    ///
    /// [`write`]: ShardStore::write
    /// [`start_sync`]: ShardStore::start_sync
    /// [`synced`]: ShardStore::synced
    pub fn commit(&mut self, now_ms: u64) -> Result<Commit, CommitError> {
        assert!(
            self.syncing.is_none(),
            "commit while a SyncJob runs: hand it to synced first"
        );
        let written = self.write(now_ms)?;
        let Some(job) = self.start_sync() else {
            return Ok(written);
        };
        let synced = self.synced(now_ms, job.run())?;
        Ok(Commit {
            records_written: written.records_written,
            ..synced
        })
    }

    /// The first half of a commit, for a caller that runs file IO off its own thread: closes
    /// the buffered records as a batch at the end of the active segment, kept in memory (reads
    /// take them from there) for the [`SyncJob`] of [`ShardStore::start_sync`], which writes
    /// and fsyncs them; the next batch fills meanwhile. Its ServerAcks leave when
    /// [`ShardStore::synced`] reports it durable. Under `always` the batch is written here
    /// (into the page cache) and the job only fsyncs it, so that whatever the caller answers
    /// after this survives a kill of the process. Under `none` this is the whole commit,
    /// written here: the records count as durable at once. A write here that fails fails this
    /// batch alone.
    pub fn write(&mut self, now_ms: u64) -> Result<Commit, CommitError> {
        let records_written = self.buffer_records;
        if !self.syncs() {
            if let Err(error) = self.flush_unsynced() {
                return Err(self.fail_buffer(now_ms, error));
            }
            self.durable_through = self.next_seq - 1;
            self.finish_copies();
        } else if !self.buffer.is_empty() {
            let start = self.index.segments[&self.active].bytes;
            let length = self.buffer.len();
            let data = if matches!(self.options.durability, Durability::Always) {
                // Written here, into the page cache: what the caller answers after this (the
                // ServerAck of a message, anything after an ack's tombstone) survives a kill
                // of the process before the job runs, as `always` promises.
                let active = self
                    .index
                    .segments
                    .get_mut(&self.active)
                    .expect("active segment");
                if let Err(error) = active.file.write_all_at(&self.buffer, start) {
                    return Err(self.fail_buffer(now_ms, error));
                }
                None
            } else {
                // The job writes it; a spare buffer (an earlier batch's) takes the next.
                let next = self.spare_buffers.pop().unwrap_or_default();
                self.unsynced_in_memory += length;
                Some(Arc::new(std::mem::replace(&mut self.buffer, next)))
            };
            let appends = self.buffer_appends;
            let (tombstones, users) = self.buffer_written(length);
            let copies = match &mut self.copies {
                Some(copies) if !copies.written => {
                    copies.written = true;
                    true
                }
                _ => false,
            };
            self.unsynced.push_back(Unsynced {
                through: self.next_seq - 1,
                appends,
                copies,
                segment: self.active,
                start,
                data,
                tombstones,
                users,
            });
        }
        self.counters.commits += 1;
        let active = &self.index.segments[&self.active];
        let too_big = active.bytes >= u64::from(self.options.segment_bytes_max);
        let too_old = active.bytes > SEGMENT_HEADER_BYTES as u64
            && now_ms >= active.created_ms + self.options.segment_age_max_ms;
        if too_big || too_old {
            // A failed roll leaves the current segment active; the next commit tries again.
            let _ = self.roll(now_ms, true);
        }
        Ok(Commit {
            durable_through: self.durable_through,
            records_written,
            synced: false,
        })
    }

    /// The fsync of every batch [`ShardStore::write`] wrote since the last one, to run on any
    /// thread and hand back to [`ShardStore::synced`]; `None` when no batch waits or a job is
    /// already running (one at a time: the next covers what was written meanwhile).
    pub fn start_sync(&mut self) -> Option<SyncJob<I>> {
        if self.syncing.is_some()
            || (self.unsynced.is_empty()
                && self.headers_unwritten.is_empty()
                && self.removals.is_empty())
        {
            return None;
        }
        let through = self
            .unsynced
            .back()
            .map_or(self.durable_through, |batch| batch.through);
        // Every batch here is one no job has written: the job before this one covered all the
        // batches of its time, and `synced` took them away.
        let mut files = Vec::new();
        let mut writes = Vec::with_capacity(self.unsynced.len());
        let mut failed = None;
        let mut last: Option<u32> = None;
        for batch in &self.unsynced {
            if last != Some(batch.segment) {
                let Some(segment) = self.index.segments.get(&batch.segment) else {
                    failed = Some(io::Error::new(
                        io::ErrorKind::NotFound,
                        "a segment with unsynced batches is gone",
                    ));
                    break;
                };
                match segment.file.try_clone() {
                    Ok(file) => files.push(file),
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
                last = Some(batch.segment);
            }
            if let Some(data) = &batch.data {
                writes.push((files.len() - 1, batch.start, data.clone()));
            }
        }
        let headers = std::mem::take(&mut self.headers_unwritten);
        for (number, header) in &headers {
            if failed.is_some() {
                break;
            }
            if last != Some(*number) {
                // A segment begun on a spare is the active one or later than every batch's:
                // it is never compacted before its header is durable.
                let Some(segment) = self.index.segments.get(number) else {
                    continue;
                };
                match segment.file.try_clone() {
                    Ok(file) => files.push(file),
                    Err(error) => failed = Some(error),
                }
                last = Some(*number);
            }
            if failed.is_none() {
                writes.push((files.len() - 1, 0, header.clone()));
            }
        }
        let dir = std::mem::take(&mut self.dir_sync_needed).then(|| self.dir.clone());
        let spare_number = self.active + 1;
        let spare = (matches!(self.options.durability, Durability::Batch { .. })
            && matches!(self.spare, Spare::Wanted)
            && spare_number <= SEGMENT_NUMBER_MAX)
            .then(|| {
                self.spare = Spare::Asked;
                segment_path(&self.dir, spare_number)
            });
        self.syncing = Some(Syncing {
            batches: self.unsynced.len(),
            through,
            headers,
            spare: spare.is_some().then_some(spare_number),
            removals: !self.removals.is_empty(),
        });
        Some(SyncJob {
            files,
            writes,
            dir,
            failed,
            spare,
            removals: std::mem::take(&mut self.removals),
            io: self.io.clone(),
        })
    }

    /// Whether the batches waiting in memory for their job reached their bound (two
    /// `buffer_bytes_max`): the disk is slower than the traffic. A caller that runs jobs on
    /// another thread then waits for the running job before its next [`ShardStore::write`], so
    /// that memory stays bounded (as the loop's own writes were, by the kernel's dirty-page
    /// limits, before the job wrote the batches).
    pub fn behind(&self) -> bool {
        self.unsynced_in_memory
            >= UNSYNCED_IN_MEMORY_BUFFERS * self.options.buffer_bytes_max as usize
    }

    /// Whether a [`SyncJob`] is running (started and not yet handed to [`ShardStore::synced`]).
    pub fn sync_running(&self) -> bool {
        self.syncing.is_some()
    }

    /// Takes back the finished [`SyncJob`]. On success its batches are durable
    /// (`durable_through` moves to the last append they hold). On failure every append not
    /// durable is failed, as a failed [`ShardStore::commit`] fails them: the batches the job
    /// covered, those written while it ran (after a failed fsync the page cache may hold bytes
    /// the disk lost, so a later fsync's success proves nothing) and the buffer. Their segments
    /// are cut back to where the first of them starts and a new segment begins.
    pub fn synced(&mut self, now_ms: u64, done: Synced<I::File>) -> Result<Commit, CommitError> {
        let syncing = self
            .syncing
            .take()
            .expect("synced without a running SyncJob");
        self.counters.fsyncs += u64::from(done.fsyncs);
        self.counters.segment_removals_failed += done.removals_failed;
        if let (Some(number), Some(made)) = (syncing.spare, done.spare) {
            // A spare the roll did not wait for (it created that number itself) is stale:
            // dropped, never removed, since the name is the active segment's now.
            self.spare = match made {
                Ok(file) if number == self.active + 1 => Spare::Ready(number, file),
                Err(_) if number == self.active + 1 => Spare::Failed,
                _ => Spare::Wanted,
            };
        }
        if let Err(error) = done.result {
            // The segments whose headers it was to write are given up with its batches: the
            // roll after the failure begins a new one, header and all, on this thread.
            return Err(self.fail_unsynced(now_ms, error));
        }
        let mut copies = false;
        for batch in self.unsynced.drain(..syncing.batches) {
            copies |= batch.copies;
            self.unsynced_in_memory -= batch.data.as_ref().map_or(0, |data| data.len());
            // The job is gone, so the bytes are the batch's alone: kept for later batches, so
            // that each does not fault in fresh memory.
            if let Some(mut data) = batch.data.and_then(|data| Arc::try_unwrap(data).ok()) {
                if self.spare_buffers.len() < SPARE_BUFFERS_MAX {
                    data.clear();
                    // A burst's large buffer is not kept whole: memory held while idle.
                    data.shrink_to(SPARE_BUFFER_BYTES_MAX);
                    self.spare_buffers.push(data);
                }
            }
        }
        if copies {
            self.finish_copies();
        }
        self.durable_through = self.durable_through.max(syncing.through);
        Ok(Commit {
            durable_through: self.durable_through,
            records_written: 0,
            synced: true,
        })
    }

    /// Removes the records of up to `users_budget` users (round robin) whose timestamp is older
    /// than `offline_ttl_ms`, buffering an expiry tombstone for each. `wall_ms` is the wall
    /// clock (ms since the Unix epoch), which the records' timestamps are on; `now_ms` is the
    /// monotonic clock of the other calls (it starts the tombstones' batch).
    pub fn expire(&mut self, now_ms: u64, wall_ms: u64, users_budget: usize) -> Vec<Expired> {
        let mut expired = Vec::new();
        let ttl_ms = self.options.offline_ttl_ms;
        let mut visited = 0;
        while visited < users_budget && !self.index.queues.is_empty() {
            visited += 1;
            let at = self.expire_cursor % self.index.queues.len();
            let user = self.index.queues[at].user;
            // Removing a queue's last record swaps another user's queue into `at`.
            while let Some(queue) = self.index.queues.get(at).filter(|q| q.user == user) {
                let Some(slot) = queue.slots.front().copied() else {
                    break;
                };
                if slot.timestamp_ms.saturating_add(ttl_ms) > wall_ms {
                    break;
                }
                self.remove(now_ms, at, 0, true);
                expired.push(Expired {
                    user,
                    seq: slot.seq,
                    id: slot.id,
                    ack_kind: slot.ack_kind,
                });
            }
            let still_there = self.index.queues.get(at).is_some_and(|q| q.user == user);
            self.expire_cursor = if still_there { at + 1 } else { at };
        }
        self.counters.expired += expired.len() as u64;
        expired
    }

    /// The queued records of `user`, oldest first (positions only, no bodies).
    pub fn queue(&self, user: UserId) -> impl Iterator<Item = &Slot> + '_ {
        self.index
            .queue(user)
            .into_iter()
            .flat_map(|queue| queue.slots.iter())
    }

    pub fn queue_len(&self, user: UserId) -> usize {
        self.index.queue(user).map_or(0, |queue| queue.slots.len())
    }

    /// Users with a queue and its length, in no order (e.g. to tell the router after start).
    pub fn users(&self) -> impl Iterator<Item = (UserId, usize)> + '_ {
        self.index
            .queues
            .iter()
            .map(|queue| (queue.user, queue.slots.len()))
    }

    /// Reads up to `limit` records of `user`'s queue from position `skip`, oldest first, into
    /// `out`. Adjacent records are read with one read call. A record that no longer checks out
    /// (the disk rotted it since recovery) is dropped from the queue and counted. Returns the
    /// number of records read.
    pub fn read(
        &mut self,
        user: UserId,
        skip: usize,
        limit: usize,
        out: &mut Vec<Record>,
    ) -> Result<usize, StoreError> {
        Ok(self
            .read_waiting(user, skip, limit, out, Wait::ForDisk)
            .expect("a read that may wait never would block"))
    }

    /// [`ShardStore::read`], or `None` (with part of the records in `out`) if a read would
    /// have waited for the disk and `wait` says not to.
    fn read_waiting(
        &mut self,
        user: UserId,
        skip: usize,
        limit: usize,
        out: &mut Vec<Record>,
        wait: Wait,
    ) -> Option<usize> {
        let before = out.len();
        let read_calls_before = self.read_cache.read_calls;
        let unwritten = Unwritten {
            batches: &self.unsynced,
            active: self.active,
            buffer_at: self.index.segments[&self.active].bytes,
            buffer: &self.buffer,
        };
        let bad = self.index.read_user(
            user,
            skip,
            limit,
            Some(unwritten),
            &mut self.read_cache,
            wait,
            out,
        );
        self.counters.read_calls += self.read_cache.read_calls - read_calls_before;
        for seq in bad? {
            self.counters.corrupt_reads += 1;
            self.forget(user, seq);
        }
        Some(out.len() - before)
    }

    /// [`ShardStore::read`] when it needs no wait for the disk: every record is in memory, in
    /// the block cache or, with `page_cache`, in the kernel's page cache (a read that does not
    /// wait: `preadv2` with `RWF_NOWAIT` on Linux; elsewhere nothing counts as cached). Then
    /// it reads into `out` and returns `None`. Otherwise it reads nothing and returns a
    /// [`ReadJob`] to run on another thread and hand to [`ShardStore::finish_read`]; the
    /// records it reads are those of the queue now, though some may be acked or expired by
    /// then. If the files cannot be opened again for the job (the process is out of
    /// descriptors), reads at once.
    pub fn read_or_job(
        &mut self,
        user: UserId,
        skip: usize,
        limit: usize,
        out: &mut Vec<Record>,
        page_cache: bool,
    ) -> Result<Option<ReadJob<I>>, StoreError> {
        if page_cache {
            let before = out.len();
            if self
                .read_waiting(user, skip, limit, out, Wait::Never)
                .is_some()
            {
                return Ok(None);
            }
            out.truncate(before);
        }
        let plan = self.index.plan_read(user, skip, limit);
        let segments = &self.index.segments;
        let unwritten = Some(Unwritten {
            batches: &self.unsynced,
            active: self.active,
            buffer_at: segments[&self.active].bytes,
            buffer: &self.buffer,
        });
        let needs_file =
            plan.iter()
                .flat_map(|chunk| &chunk.runs)
                .any(|&(segment, offset, length)| {
                    let on_file = on_file_bytes(segments, unwritten, segment, offset, length);
                    on_file > 0 && !self.read_cache.holds(segment, offset, on_file)
                });
        if !needs_file {
            self.read(user, skip, limit, out)?;
            return Ok(None);
        }
        let mut files: Vec<(u32, I::File)> = Vec::new();
        let mut blocks: Vec<JobBlock> = Vec::new();
        let mut chunks = Vec::with_capacity(plan.len());
        for chunk in plan {
            let mut parts = Vec::with_capacity(chunk.runs.len());
            for &(segment, offset, length) in &chunk.runs {
                let on_file = on_file_bytes(segments, unwritten, segment, offset, length);
                let from_memory = if on_file > 0 && !self.read_cache.holds(segment, offset, on_file)
                {
                    let file = match files.iter().position(|(number, _)| *number == segment) {
                        Some(file) => file,
                        None => {
                            let Some(handle) =
                                segments.get(&segment).and_then(|s| s.file.try_clone().ok())
                            else {
                                self.read(user, skip, limit, out)?;
                                return Ok(None);
                            };
                            files.push((segment, handle));
                            files.len() - 1
                        }
                    };
                    if on_file < BLOCK_BYTES && self.read_cache.loads_blocks() {
                        // Whole blocks, for the block cache: the next user's records are
                        // likely in them (see `cache.rs`).
                        let file_end = on_file_end(segments, unwritten, segment);
                        for piece in pieces(offset, on_file) {
                            let block = blocks
                                .iter()
                                .position(|b| b.segment == segment && b.number == piece.number)
                                .unwrap_or_else(|| {
                                    blocks.push(JobBlock {
                                        file,
                                        segment,
                                        number: piece.number,
                                        bytes: (file_end - piece.start).min(BLOCK_BYTES as u64)
                                            as usize,
                                    });
                                    blocks.len() - 1
                                });
                            parts.push(JobPart::InBlock {
                                block,
                                from: piece.within.start,
                                to: piece.within.end,
                            });
                        }
                    } else {
                        parts.push(JobPart::File {
                            file,
                            offset,
                            length: on_file,
                        });
                    }
                    on_file
                } else {
                    0
                };
                if from_memory < length {
                    let mut ready = Vec::with_capacity(length - from_memory);
                    let at = offset + from_memory as u64;
                    if read_into(
                        segments,
                        unwritten,
                        Some(&mut self.read_cache),
                        Wait::ForDisk,
                        segment,
                        at,
                        length - from_memory,
                        &mut ready,
                    )
                    .is_err()
                    {
                        ready.clear();
                        ready.resize(length - from_memory, 0);
                    }
                    parts.push(JobPart::Ready(ready));
                }
            }
            chunks.push(JobChunk {
                records: chunk.records,
                bytes: chunk.bytes,
                parts,
            });
        }
        Ok(Some(ReadJob {
            user,
            files: files.into_iter().map(|(_, file)| file).collect(),
            blocks,
            chunks,
        }))
    }

    /// Takes what a [`ReadJob`] read: its records into `out`, in queue order. A record that
    /// does not check out is dropped from the queue (if still there) and counted, as by
    /// [`ShardStore::read`]. Returns the number of records read.
    pub fn finish_read(&mut self, done: ReadDone, out: &mut Vec<Record>) -> usize {
        let before = out.len();
        let mut bad = Vec::new();
        for chunk in done.chunks {
            decode_chunk(done.user, &chunk.records, chunk.bytes, out, &mut bad);
        }
        for (segment, number, bytes) in done.blocks {
            // Not the blocks of a segment deleted meanwhile: nothing would read them.
            if self.index.segments.contains_key(&segment) {
                self.read_cache.insert(segment, number, bytes);
            }
        }
        self.counters.read_calls += done.read_calls;
        for seq in bad {
            self.counters.corrupt_reads += 1;
            self.forget(done.user, seq);
        }
        out.len() - before
    }

    /// One step of compaction, reading at most about `budget_bytes` of an old segment: a
    /// sealed segment with no live record is deleted; one that is at least half dead, or that
    /// holds dead bytes and was sealed `compact_after_ms` ago, has its live records copied to
    /// the active segment and, once every copy is durable, is deleted. The copies join the
    /// write buffer and go out with the next commit (or [`ShardStore::write`] and its sync, the
    /// policy's fsync whatever it is); until that returns, further steps wait (`idle`).
    pub fn compact(
        &mut self,
        now_ms: u64,
        budget_bytes: usize,
    ) -> Result<CompactProgress, StoreError> {
        let mut progress = CompactProgress::default();
        self.read_cache.release_if_idle();
        let in_job =
            (self.syncing.as_ref()).is_some_and(|job| !job.headers.is_empty() || job.removals);
        if in_job || !self.headers_unwritten.is_empty() || !self.removals.is_empty() {
            // Nothing is deleted, or copied towards a deletion, until every segment's header
            // is durable (see `headers_unwritten`) and the segments already deleted are gone
            // from the folder: a tombstone is dropped only when no older segment holds a dead
            // record, which a deleted segment's file, still there after a kill, would.
            progress.idle = true;
            return Ok(progress);
        }
        if let Some(number) = self.delete_next.take() {
            self.delete_segment(number)?;
            progress.segments_deleted = 1;
            return Ok(progress);
        }
        // One step's copies at a time: the next waits until they are durable.
        if self.copies.is_some() {
            progress.idle = true;
            return Ok(progress);
        }
        let (number, offset) = match self.compaction {
            Some(cursor) => cursor,
            None => match self.pick_compaction(now_ms) {
                Pick::Delete(number) => {
                    self.delete_segment(number)?;
                    progress.segments_deleted = 1;
                    return Ok(progress);
                }
                Pick::Rewrite(number) => (number, SEGMENT_HEADER_BYTES as u64),
                Pick::Nothing => {
                    progress.idle = true;
                    return Ok(progress);
                }
            },
        };
        // The copies join the buffer, which stays within `buffer_bytes_max` (offsets fit u32).
        let room = (self.options.buffer_bytes_max as usize).saturating_sub(self.buffer.len());
        if room < format::RECORD_BYTES_MAX {
            progress.idle = true;
            return Ok(progress);
        }
        let segment_bytes = self.index.segments[&number].bytes;
        let chunk =
            (budget_bytes.clamp(format::RECORD_BYTES_MAX, room) as u64).min(segment_bytes - offset);
        // Not waiting for the disk on the caller's thread (the shard's loop): a chunk that is
        // not in the page cache is read ahead by the kernel in the background, and read by the
        // next step (from the page cache by then, or waiting for what is still missing).
        let wait = if self.compact_prefetched == Some((number, offset)) {
            Wait::ForDisk
        } else {
            Wait::Never
        };
        let read = match read_run(
            &self.index.segments,
            None,
            number,
            offset,
            chunk as usize,
            wait,
        ) {
            Err(error) if error.kind() == io::ErrorKind::Unsupported => read_run(
                &self.index.segments,
                None,
                number,
                offset,
                chunk as usize,
                Wait::ForDisk,
            ),
            read => read,
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Some(segment) = self.index.segments.get(&number) {
                    segment.file.prefetch(offset, chunk as usize);
                }
                self.compact_prefetched = Some((number, offset));
                self.compaction = Some((number, offset));
                return Ok(progress);
            }
            Err(error) => return Err(StoreError::io(&segment_path(&self.dir, number))(error)),
        };
        self.compact_prefetched = None;
        progress.bytes_read = chunk;
        let mut moved: Vec<(UserId, u64, Slot)> = Vec::new();
        let outcome = format::scan(&bytes, 0, |position, payload, length| {
            let (user, seq) = match payload {
                Payload::Message { user, seq, .. } | Payload::Receipt { user, seq, .. } => {
                    (user, seq)
                }
                Payload::Tombstone { .. } => return,
            };
            let Some(slot) = self.index.find(user, seq) else {
                return;
            };
            if slot.segment != number || u64::from(slot.offset) != offset + position as u64 {
                return;
            }
            let new_offset = self.tail_offset();
            self.buffer
                .extend_from_slice(&bytes[position..position + length]);
            self.note_buffered(now_ms);
            let new_slot = Slot {
                segment: self.active,
                offset: new_offset,
                ..slot
            };
            self.index.relocate(user, seq, new_slot);
            moved.push((user, seq, slot));
        });
        let mut next = offset + outcome.valid_end as u64;
        if outcome.valid_end == 0 || offset + chunk == segment_bytes {
            next = offset + chunk; // damage or the end: skip what did not decode
        }
        progress.records_copied = moved.len() as u64;
        self.counters.records_compacted += moved.len() as u64;
        let done = next >= segment_bytes;
        self.compaction = (!done).then_some((number, next));
        if moved.is_empty() {
            // Nothing of this step waits for a sync (earlier steps' copies are durable).
            if done {
                self.delete_segment(number)?;
                progress.segments_deleted = 1;
            }
        } else {
            // The copies go out with the next batch, like appends; the source goes once the
            // sync that covers them returned (`finish_copies`).
            self.copies = Some(Copies {
                moved,
                source: done.then_some(number),
                written: false,
            });
        }
        Ok(progress)
    }

    /// Bytes of all segment files, as the index accounts them.
    pub fn disk_bytes(&self) -> u64 {
        self.index
            .segments
            .values()
            .map(|segment| segment.bytes)
            .sum::<u64>()
            + self.buffer.len() as u64
    }

    pub fn segment_count(&self) -> usize {
        self.index.segments.len()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Sequence numbers up to this are durable (see [`Commit::durable_through`]).
    pub fn durable_through(&self) -> u64 {
        self.durable_through
    }

    pub fn shard(&self) -> (u16, u16) {
        (self.shard, self.shards)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    // ---- helpers ----

    fn tail_offset(&self) -> u32 {
        let offset = self.index.segments[&self.active].bytes + self.buffer.len() as u64;
        assert!(
            offset < u64::from(u32::MAX),
            "segment offsets fit u32 (see Options::check)"
        );
        offset as u32
    }

    fn note_buffered(&mut self, now_ms: u64) {
        self.buffer_records += 1;
        self.buffer_first_ms.get_or_insert(now_ms);
    }

    /// Removes the record at `position` of queue `at` and buffers its tombstone.
    fn remove(&mut self, now_ms: u64, at: usize, position: usize, expired: bool) {
        let user = self.index.queues[at].user;
        let slot = self.index.remove_at(at, position);
        format::encode_tombstone(&mut self.buffer, slot.seq, expired);
        self.buffer_tombstones.push((user, slot.seq, expired));
        self.note_buffered(now_ms);
    }

    /// Drops a record that cannot be read any more, without a tombstone (its bytes are bad).
    fn forget(&mut self, user: UserId, seq: u64) {
        let Some(at) = self.index.queue_index(user) else {
            return;
        };
        if let Some(position) = self.index.queues[at]
            .slots
            .iter()
            .position(|s| s.seq == seq)
        {
            self.index.remove_at(at, position);
        }
    }

    /// Whether the policy fsyncs (`always`, `batch`) or leaves the records in the page cache.
    fn syncs(&self) -> bool {
        !matches!(self.options.durability, Durability::None { .. })
    }

    /// Writes the buffer without an fsync (`none`), and the folder's entry of a new segment.
    fn flush_unsynced(&mut self) -> io::Result<()> {
        let active = self
            .index
            .segments
            .get_mut(&self.active)
            .expect("active segment");
        if !self.buffer.is_empty() {
            active.file.write_all_at(&self.buffer, active.bytes)?;
        }
        if self.dir_sync_needed {
            self.io.sync_dir(&self.dir)?;
            self.counters.fsyncs += 1;
            self.dir_sync_needed = false;
        }
        self.buffer_written(self.buffer.len());
        Ok(())
    }

    /// The buffer is on file, or with a batch for its job: moves the active segment's end past
    /// it and empties it. Returns its tombstones and the users with appends in it.
    fn buffer_written(&mut self, bytes: usize) -> (Vec<(UserId, u64, bool)>, Vec<UserId>) {
        let active = self
            .index
            .segments
            .get_mut(&self.active)
            .expect("active segment");
        active.bytes += bytes as u64;
        // Counted once they are on file, not when buffered: a failed commit moves them on.
        active.tombstones += self.buffer_tombstones.len() as u32;
        self.buffer.clear();
        self.buffer_appends = 0;
        self.buffer_records = 0;
        self.buffer_first_ms = None;
        (
            std::mem::take(&mut self.buffer_tombstones),
            std::mem::take(&mut self.buffer_users),
        )
    }

    /// A failed write of the buffer: its appends are failed; batches written before it stay
    /// (they are on file, and a running or later [`SyncJob`] makes them durable).
    fn fail_buffer(&mut self, now_ms: u64, error: io::Error) -> CommitError {
        let failed_from = self
            .unsynced
            .back()
            .map_or(self.durable_through, |b| b.through)
            + 1;
        let failed_through = self.next_seq - 1;
        let users = std::mem::take(&mut self.buffer_users);
        self.take_back(users, failed_from);
        if self.copies.as_ref().is_some_and(|copies| !copies.written) {
            self.undo_copies();
        }
        self.counters.commit_failures += 1;
        self.counters.failed_records += u64::from(self.buffer_appends);
        self.reset_buffer_after_failure(now_ms);
        if self.unsynced.is_empty() {
            self.durable_through = self.next_seq - 1;
        }
        CommitError {
            failed_seqs: failed_from..=failed_through,
            source: error,
        }
    }

    /// A failed fsync: every append not durable fails, written or buffered (see
    /// [`ShardStore::synced`]).
    fn fail_unsynced(&mut self, now_ms: u64, error: io::Error) -> CommitError {
        let failed_from = self.durable_through + 1;
        let failed_through = self.next_seq - 1;
        let batches = std::mem::take(&mut self.unsynced);
        self.unsynced_in_memory = 0;
        let mut users = std::mem::take(&mut self.buffer_users);
        let mut tombstones = Vec::new();
        let mut failed_records = u64::from(self.buffer_appends);
        let mut cut: Vec<u32> = Vec::new();
        for batch in batches {
            failed_records += u64::from(batch.appends);
            users.extend(batch.users);
            if let Some(segment) = self.index.segments.get_mut(&batch.segment) {
                // Counted when written; they are buffered (and counted) again below.
                segment.tombstones -= batch.tombstones.len() as u32;
            }
            tombstones.extend(batch.tombstones);
            if cut.contains(&batch.segment) {
                continue;
            }
            cut.push(batch.segment);
            if let Some(segment) = self.index.segments.get_mut(&batch.segment) {
                // Best effort, as after a failed write: the segment is not written again.
                let _ = segment.file.truncate(batch.start);
                segment.bytes = batch.start;
            }
            self.read_cache.forget_segment(batch.segment);
        }
        self.take_back(users, failed_from);
        self.undo_copies();
        // The tombstones of the failed batches go first, then those still buffered.
        tombstones.append(&mut self.buffer_tombstones);
        self.buffer_tombstones = tombstones;
        // The job may have taken the folder's fsync that a new segment owes, and the roll
        // below may fail and leave that segment active: it is owed until a job succeeds.
        self.dir_sync_needed = true;
        self.counters.commit_failures += 1;
        self.counters.failed_records += failed_records;
        self.reset_buffer_after_failure(now_ms);
        self.durable_through = self.next_seq - 1;
        CommitError {
            failed_seqs: failed_from..=failed_through,
            source: error,
        }
    }

    /// A compaction step's copies are durable: its source may go (at the next `compact`, which
    /// can report a failure to delete it).
    fn finish_copies(&mut self) {
        if let Some(copies) = self.copies.take() {
            self.delete_next = copies.source;
        }
    }

    /// A compaction step's copies failed with their batch: their records are where they were,
    /// and the step starts again from the segment's beginning later.
    fn undo_copies(&mut self) {
        if let Some(copies) = self.copies.take() {
            for (user, seq, slot) in copies.moved.iter().rev() {
                self.index.relocate_back(*user, *seq, *slot);
            }
            self.compaction = None;
        }
    }

    /// Takes the appends from `failed_from` on back out of the queues of `users` (they are the
    /// last of each queue).
    fn take_back(&mut self, mut users: Vec<UserId>, failed_from: u64) {
        users.sort_unstable();
        users.dedup();
        for user in users {
            while let Some(at) = self.index.queue_index(user) {
                let slots = &self.index.queues[at].slots;
                if slots.back().is_none_or(|slot| slot.seq < failed_from) {
                    break;
                }
                self.index.remove_unwritten(at, slots.len() - 1);
            }
        }
    }

    /// After a failed write or fsync: the bytes past the last good offset are suspect, so
    /// truncate them and move to a new segment; then buffer the tombstones again.
    fn reset_buffer_after_failure(&mut self, now_ms: u64) {
        let tombstones = std::mem::take(&mut self.buffer_tombstones);
        self.buffer.clear();
        self.buffer_users.clear();
        self.buffer_appends = 0;
        self.buffer_records = 0;
        self.buffer_first_ms = None;
        if let Some(active) = self.index.segments.get_mut(&self.active) {
            let _ = active.file.truncate(active.bytes);
        }
        let _ = self.roll(now_ms, false);
        for (user, seq, expired) in tombstones {
            format::encode_tombstone(&mut self.buffer, seq, expired);
            self.buffer_tombstones.push((user, seq, expired));
            self.note_buffered(now_ms);
        }
    }

    /// Seals the active segment and starts the next. Only with an empty buffer. Under `batch`
    /// the next segment is the spare a job made, when one is ready: its header goes with the
    /// next job, and this thread creates no file.
    /// After a failed job (`spare_ok` false) the roll creates its segment, header and all,
    /// itself: a disk that keeps failing must not leave headers owed to the next job, which
    /// would fail too and roll again.
    fn roll(&mut self, now_ms: u64, spare_ok: bool) -> Result<(), StoreError> {
        assert!(self.buffer.is_empty(), "roll with buffered records");
        let number = self.active + 1;
        let spare = if spare_ok {
            self.take_spare(number)
        } else {
            None
        };
        let file = match spare {
            Some(file) => {
                let header = self.header(number).encode();
                self.headers_unwritten
                    .push((number, Arc::new(header.to_vec())));
                self.counters.segments_created += 1;
                self.counters.segments_begun_on_spares += 1;
                file
            }
            None => self.create_segment(number)?,
        };
        if let Some(old) = self.index.segments.get_mut(&self.active) {
            old.sealed_ms = Some(now_ms);
        }
        self.index
            .segments
            .insert(number, Segment::new(file, now_ms, None));
        self.active = number;
        self.dir_sync_needed = true;
        Ok(())
    }

    /// The spare for segment `number`, if one is ready and still the file of that name: a new
    /// process that opened the store meanwhile (a takeover that then failed) replaced it.
    /// After this a spare is wanted again, unless a job is making one.
    fn take_spare(&mut self, number: u32) -> Option<I::File> {
        if matches!(self.spare, Spare::Asked) {
            return None;
        }
        match std::mem::replace(&mut self.spare, Spare::Wanted) {
            Spare::Ready(ready, file)
                if ready == number && file.unlinked().is_ok_and(|gone| !gone) =>
            {
                Some(file)
            }
            _ => None,
        }
    }

    fn header(&self, number: u32) -> SegmentHeader {
        SegmentHeader {
            segment: number,
            shard: self.shard,
            shards: self.shards,
            next_seq: self.next_seq,
        }
    }

    fn create_segment(&mut self, number: u32) -> Result<I::File, StoreError> {
        assert!(
            number <= SEGMENT_NUMBER_MAX,
            "segment numbers fit eight digits"
        );
        let path = segment_path(&self.dir, number);
        let encoded = self.header(number).encode();
        let mut file = create_segment_file(&self.io, &path, true).map_err(StoreError::io(&path))?;
        file.write_all_at(&encoded, 0)
            .map_err(StoreError::io(&path))?;
        self.counters.segments_created += 1;
        Ok(file)
    }

    fn commit_directory(&mut self) -> Result<(), StoreError> {
        self.io
            .sync_dir(&self.dir)
            .map_err(StoreError::io(&self.dir))?;
        self.dir_sync_needed = false;
        Ok(())
    }

    fn pick_compaction(&self, now_ms: u64) -> Pick {
        // A tombstone may be dropped only when no older segment still holds a dead copy of the
        // record it kills; "no older segment holds any dead record" is the cheap, safe test.
        let mut older_dead = false;
        // A segment whose last batch waits for its sync is not touched: its bytes may yet be
        // cut back, and the job holds it.
        let first_unsynced = self
            .unsynced
            .front()
            .map_or(self.active, |batch| batch.segment);
        for (&number, segment) in &self.index.segments {
            if number == self.active || number >= first_unsynced {
                break;
            }
            let tombstones_droppable = segment.tombstones == 0 || !older_dead;
            if tombstones_droppable {
                if segment.live_records == 0 {
                    return Pick::Delete(number);
                }
                let payload = segment.bytes - SEGMENT_HEADER_BYTES as u64;
                let dead = payload - segment.live_bytes;
                let sealed_ms = segment.sealed_ms.unwrap_or(segment.created_ms);
                if dead * 2 >= payload
                    || (dead > 0 && now_ms >= sealed_ms + self.options.compact_after_ms)
                {
                    return Pick::Rewrite(number);
                }
            }
            older_dead |= segment.dead_records > 0;
        }
        Pick::Nothing
    }

    fn delete_segment(&mut self, number: u32) -> Result<(), StoreError> {
        assert!(number != self.active, "the active segment is never deleted");
        let live = self
            .index
            .segments
            .get(&number)
            .map_or(0, |s| s.live_records);
        if live > 0 {
            // Records that compaction could not read back (damaged since recovery).
            let lost = self.index.slots_in(number);
            for (user, seq) in lost {
                self.counters.corrupt_reads += 1;
                self.forget(user, seq);
            }
        }
        // The next job removes the file and closes it: the close of a removed file frees its
        // blocks and pages, which takes milliseconds.
        if let Some(segment) = self.index.segments.remove(&number) {
            self.removals
                .push((segment_path(&self.dir, number), segment.file));
        }
        self.read_cache.forget_segment(number);
        self.counters.segments_deleted += 1;
        Ok(())
    }
}

/// Reads `length` bytes of segment `segment` from `offset`; the part the store holds in memory
/// (batches waiting for their job, the buffer) comes from `unwritten`, the rest from the file.
fn read_run<F: IoFile>(
    segments: &BTreeMap<u32, Segment<F>>,
    unwritten: Option<Unwritten<'_>>,
    segment: u32,
    offset: u64,
    length: usize,
    wait: Wait,
) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(length);
    read_into(
        segments, unwritten, None, wait, segment, offset, length, &mut bytes,
    )?;
    Ok(bytes)
}

/// [`read_run`] appending to `out`, the file part through `cache` when there is one (waiting
/// for the disk or not). On error `out` may hold part of the bytes.
#[allow(clippy::too_many_arguments)]
fn read_into<F: IoFile>(
    segments: &BTreeMap<u32, Segment<F>>,
    unwritten: Option<Unwritten<'_>>,
    cache: Option<&mut BlockCache>,
    wait: Wait,
    segment: u32,
    offset: u64,
    length: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let Some(file) = segments.get(&segment) else {
        return Err(io::Error::new(io::ErrorKind::NotFound, "segment gone"));
    };
    let mut regions = unwritten.map(|unwritten| unwritten.regions(segment));
    let mut next_region = regions.as_mut().and_then(Iterator::next);
    // The file holds what comes before the first region in memory.
    let on_file_end = next_region.map_or(file.bytes, |(start, _)| start.min(file.bytes));
    let on_file = (on_file_end.saturating_sub(offset) as usize).min(length);
    if on_file > 0 {
        match cache {
            Some(cache) => {
                cache.read_into(segment, &file.file, on_file_end, offset, on_file, out, wait)?
            }
            None => {
                let start = out.len();
                out.resize(start + on_file, 0);
                read_at(&file.file, &mut out[start..], offset, wait)?;
            }
        }
    }
    let end = offset + length as u64;
    let mut at = offset + on_file as u64;
    while at < end {
        let Some((start, bytes)) = next_region else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "past segment end",
            ));
        };
        let region_end = start + bytes.len() as u64;
        if at < start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a gap between the file and the records in memory",
            ));
        }
        if at < region_end {
            let upto = end.min(region_end);
            out.extend_from_slice(&bytes[(at - start) as usize..(upto - start) as usize]);
            at = upto;
        }
        next_region = regions.as_mut().and_then(Iterator::next);
    }
    Ok(())
}

/// Bytes of `segment` from `offset` (at most `length`) that are on file: those before the
/// segment's first region in memory.
fn on_file_bytes<F>(
    segments: &BTreeMap<u32, Segment<F>>,
    unwritten: Option<Unwritten<'_>>,
    segment: u32,
    offset: u64,
    length: usize,
) -> usize {
    (on_file_end(segments, unwritten, segment).saturating_sub(offset) as usize).min(length)
}

/// Where the bytes of `segment` that are on file end: at its first region in memory.
fn on_file_end<F>(
    segments: &BTreeMap<u32, Segment<F>>,
    unwritten: Option<Unwritten<'_>>,
    segment: u32,
) -> u64 {
    let Some(file) = segments.get(&segment) else {
        return 0;
    };
    let first_region = unwritten.and_then(|unwritten| unwritten.regions(segment).next());
    first_region.map_or(file.bytes, |(start, _)| start.min(file.bytes))
}

/// One buffer's worth of a queue read ([`Index::plan_read`]).
#[derive(Debug)]
struct PlannedChunk {
    /// (sequence number, record bytes) of each record, in order.
    records: Vec<(u64, usize)>,
    bytes: usize,
    /// (segment, offset, bytes) of each read, in order.
    runs: Vec<(u32, u64, usize)>,
}

/// Decodes the records of one chunk, read into `bytes`, into `out`; those that do not check out
/// go to `bad`.
fn decode_chunk(
    user: UserId,
    records: &[(u64, usize)],
    bytes: Vec<u8>,
    out: &mut Vec<Record>,
    bad: &mut Vec<u64>,
) {
    let bytes = Bytes::from(bytes);
    let mut position = 0;
    for &(seq, length) in records {
        match decode_item(&bytes, position, length, user, seq) {
            Some(item) => out.push(Record { seq, item }),
            None => bad.push(seq),
        }
        position += length;
    }
}

/// A read of a user's queue that needs the segment files, made by [`ShardStore::read_or_job`]
/// to run on any thread ([`ReadJob::run`]) and be handed back with
/// [`ShardStore::finish_read`]. What was in memory or in the block cache when it was made it
/// holds already; for the rest it holds its own handles on the files, so a segment compacted
/// and deleted meanwhile still reads back.
pub struct ReadJob<I: Io> {
    user: UserId,
    files: Vec<I::File>,
    /// Whole blocks to read, for the parts and then the block cache.
    blocks: Vec<JobBlock>,
    chunks: Vec<JobChunk>,
}

/// A block of a segment a [`ReadJob`] reads whole: `bytes` from its start, those on file.
#[derive(Debug)]
struct JobBlock {
    file: usize,
    segment: u32,
    number: u32,
    bytes: usize,
}

#[derive(Debug)]
struct JobChunk {
    records: Vec<(u64, usize)>,
    bytes: usize,
    parts: Vec<JobPart>,
}

#[derive(Debug)]
enum JobPart {
    Ready(Vec<u8>),
    /// `length` bytes at `offset` of `files[file]`.
    File {
        file: usize,
        offset: u64,
        length: usize,
    },
    /// Bytes `from..to` of `blocks[block]`.
    InBlock {
        block: usize,
        from: usize,
        to: usize,
    },
}

impl<I: Io> std::fmt::Debug for ReadJob<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJob")
            .field("user", &self.user)
            .field("files", &self.files.len())
            .field("chunks", &self.chunks)
            .finish()
    }
}

impl<I: Io> ReadJob<I> {
    /// Whose queue it reads.
    pub fn user(&self) -> UserId {
        self.user
    }

    /// Reads the job's file parts. A part that fails reads as zeros, so its records do not
    /// check out and [`ShardStore::finish_read`] drops them, as a synchronous read does.
    pub fn run(self) -> ReadDone {
        let mut read_calls = 0;
        let blocks: Vec<Option<(u32, u32, Vec<u8>)>> = self
            .blocks
            .iter()
            .map(|block| {
                let mut bytes = vec![0; block.bytes];
                read_calls += 1;
                let at = u64::from(block.number) * BLOCK_BYTES as u64;
                self.files[block.file]
                    .read_exact_at(&mut bytes, at)
                    .ok()
                    .map(|()| (block.segment, block.number, bytes))
            })
            .collect();
        let chunks = self
            .chunks
            .into_iter()
            .map(|chunk| {
                let mut bytes = Vec::with_capacity(chunk.bytes);
                for part in chunk.parts {
                    match part {
                        JobPart::Ready(ready) => bytes.extend_from_slice(&ready),
                        JobPart::InBlock { block, from, to } => match &blocks[block] {
                            Some((_, _, block)) => bytes.extend_from_slice(&block[from..to]),
                            None => bytes.resize(bytes.len() + (to - from), 0),
                        },
                        JobPart::File {
                            file,
                            offset,
                            length,
                        } => {
                            let start = bytes.len();
                            bytes.resize(start + length, 0);
                            read_calls += 1;
                            if self.files[file]
                                .read_exact_at(&mut bytes[start..], offset)
                                .is_err()
                            {
                                bytes[start..].fill(0);
                            }
                        }
                    }
                }
                ReadChunk {
                    records: chunk.records,
                    bytes,
                }
            })
            .collect();
        ReadDone {
            user: self.user,
            chunks,
            blocks: blocks.into_iter().flatten().collect(),
            read_calls,
        }
    }
}

/// What a [`ReadJob`] read, for [`ShardStore::finish_read`].
#[derive(Debug)]
pub struct ReadDone {
    user: UserId,
    chunks: Vec<ReadChunk>,
    /// The whole blocks it read: (segment, number, bytes), for the block cache.
    blocks: Vec<(u32, u32, Vec<u8>)>,
    read_calls: u64,
}

/// One chunk a [`ReadJob`] read: its records' (sequence number, bytes), and their bytes.
#[derive(Debug)]
struct ReadChunk {
    records: Vec<(u64, usize)>,
    bytes: Vec<u8>,
}

impl ReadDone {
    /// Whose queue it read.
    pub fn user(&self) -> UserId {
        self.user
    }
}

/// Bytes of unsynced batches that may wait in memory for their job, in `buffer_bytes_max`s:
/// past it (a disk slower than the traffic) the store is [`ShardStore::behind`], and its
/// caller waits for the running job before it closes another batch.
const UNSYNCED_IN_MEMORY_BUFFERS: usize = 2;
/// Buffers of durable batches kept for the next ones: a job covers every batch written while
/// the one before ran, so a few are in use at a time.
const SPARE_BUFFERS_MAX: usize = 2;
/// The capacity a spare buffer keeps at most: a group commit's batch of a few hundred KB fits.
const SPARE_BUFFER_BYTES_MAX: usize = 1024 * 1024;
/// Bytes of records one buffer of [`ShardStore::read`] holds (and so one read call fetches at
/// most): every body of a buffer keeps all of it alive.
const READ_RUN_BYTES: usize = 1024 * 1024;
/// Segment file names have eight decimal digits.
pub(crate) const SEGMENT_NUMBER_MAX: u32 = 99_999_999;

enum Pick {
    Delete(u32),
    Rewrite(u32),
    Nothing,
}

fn decode_item(
    bytes: &Bytes,
    position: usize,
    length: usize,
    user: UserId,
    seq: u64,
) -> Option<StoredItem> {
    let record = bytes.get(position..position + length)?;
    let (payload, decoded_length) = format::decode(record)?;
    if decoded_length != length {
        return None;
    }
    match payload {
        Payload::Message {
            user: owner,
            seq: stored_seq,
            id,
            timestamp_ms,
            from,
            body,
            sent,
            group,
        } if owner == user && stored_seq == seq => {
            // The body ends the record (a group copy's fixed part is longer).
            let start = position + length - body.len();
            Some(StoredItem::Message {
                from,
                id,
                timestamp_ms,
                body: bytes.slice(start..position + length),
                sent,
                group,
            })
        }
        Payload::Receipt {
            user: owner,
            seq: stored_seq,
            id,
            timestamp_ms,
            by,
            kind,
        } if owner == user && stored_seq == seq => Some(StoredItem::Receipt {
            id,
            kind,
            by,
            timestamp_ms,
        }),
        _ => None,
    }
}

/// Creates the empty segment file `path`. With `replace_header_only`, an existing file that
/// holds no more than a header is replaced: one a new process made while this one was frozen
/// for a takeover that then failed (that process wrote nothing into it), or this process's own
/// spare. Anything more is data, never replaced. A spare made on a job's thread replaces
/// nothing: the name may be the segment a new process just began.
fn create_segment_file<I: Io>(
    io: &I,
    path: &Path,
    replace_header_only: bool,
) -> io::Result<I::File> {
    match io.create(path) {
        Err(error) if replace_header_only && error.kind() == io::ErrorKind::AlreadyExists => {
            let existing = io.open(path, true).and_then(|file| file.size_bytes())?;
            if existing > SEGMENT_HEADER_BYTES as u64 {
                return Err(error);
            }
            io.remove_file(path)?;
            io.create(path)
        }
        created => created,
    }
}

pub(crate) fn shard_dir(data: &Path, shard: u16) -> PathBuf {
    data.join(format!("shard-{shard}"))
}

pub(crate) fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("{number:08}.log"))
}

/// Fails with [`StoreError::written_by_v1`] when a segment of the shard folder `dir` was written
/// by protocol v1. Reads the first bytes of each segment only; a missing folder passes.
pub(crate) fn refuse_v1_segments<I: Io>(io: &I, dir: &Path) -> Result<(), StoreError> {
    let names = match io.list_dir(dir) {
        Ok(names) => names,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(StoreError::io(dir)(error)),
    };
    for number in names.iter().filter_map(|name| parse_segment_name(name)) {
        let path = segment_path(dir, number);
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        let mut magic = [0u8; format::SEGMENT_MAGIC_V1.len()];
        if file.size_bytes().map_err(StoreError::io(&path))? < magic.len() as u64 {
            continue; // too short to tell; recovery counts it as a bad header
        }
        file.read_exact_at(&mut magic, 0)
            .map_err(StoreError::io(&path))?;
        if format::is_v1_segment(&magic) {
            return Err(StoreError::written_by_v1(&path, data_of(dir)));
        }
    }
    Ok(())
}

/// The data folder a shard folder `DATA/shard-K` (or `DATA/rehome/shard-K`) is in, for
/// messages.
fn data_of(dir: &Path) -> &Path {
    let parent = dir.parent().unwrap_or(dir);
    match parent.file_name() {
        Some(name) if name == crate::rehome::REHOME_DIR => parent.parent().unwrap_or(parent),
        _ => parent,
    }
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---- the index ----

/// A multiplicative hasher for word keys (sequence numbers; user ids, which hash as their two
/// halves): the index is rebuilt at every start, so hashing speed is recovery speed.
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0 ^ word)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

pub(crate) type WordMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// An entry's user place before [`place_users`] gave it one.
const UNPLACED: u32 = u32::MAX;
/// Records whose users recovery looks up together.
const PLACE_BATCH: usize = 64;

/// Gives each unplaced record (its place in `entries`, its user) its user's place in `users`,
/// a new one for a user met first, in log order. Done for a batch of records in one tight
/// loop rather than between the decodes of each: the users map is larger than the CPU's
/// nearest caches once the log's bytes have streamed through them, and there the lookups of
/// a batch wait on memory together instead of one after the other.
fn place_users(
    unplaced: &mut Vec<(u32, UserId)>,
    user_at: &mut WordMap<UserId, u32>,
    users: &mut Vec<(UserId, u32)>,
    entries: &mut [(u32, Slot, bool)],
) {
    for (entry, user) in unplaced.drain(..) {
        let at = *user_at.entry(user).or_insert_with(|| {
            users.push((user, 0));
            users.len() as u32 - 1
        });
        users[at as usize].1 += 1;
        entries[entry as usize].0 = at;
    }
}

/// How recovery reads a segment: in chunks of [`RECOVERY_CHUNK_BYTES`] into one reused buffer,
/// decoding the records of each while they are in the CPU's cache, instead of the whole file
/// at once. A record cut by a chunk's end is carried into the next. Where a record does not
/// decode although a whole one would fit (damage), the rest of the file is read whole and
/// [`format::scan`] takes over from there, so damage is handled exactly as in a whole-file
/// scan.
#[derive(Default)]
struct Chunks {
    buffer: Vec<u8>,
}

#[cfg(not(test))]
const RECOVERY_CHUNK_BYTES: usize = 1024 * 1024;
/// Small in unit tests, so that records cross chunk boundaries everywhere.
#[cfg(test)]
const RECOVERY_CHUNK_BYTES: usize = 4096;

impl Chunks {
    /// Reads the segment's first chunk (its header with it); returns it.
    fn first<F: IoFile>(&mut self, file: &F, length: usize) -> io::Result<&[u8]> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; RECOVERY_CHUNK_BYTES + format::RECORD_BYTES_MAX];
        }
        let first = length.min(RECOVERY_CHUNK_BYTES);
        file.read_exact_at(&mut self.buffer[..first], 0)?;
        Ok(&self.buffer[..first])
    }

    /// Scans the segment's records from `start` as `format::scan` does over the whole file,
    /// the first chunk already read by [`Chunks::first`]. Offsets are the file's.
    fn scan<F: IoFile>(
        &mut self,
        file: &F,
        length: usize,
        start: usize,
        on_record: &mut impl FnMut(usize, Payload<'_>, usize),
    ) -> io::Result<format::ScanOutcome> {
        // The buffer holds the file's bytes [base, base + filled); the next record is at
        // `position` in it.
        let mut base = 0usize;
        let mut filled = length.min(RECOVERY_CHUNK_BYTES);
        let mut position = start.min(filled);
        loop {
            while let Some((payload, record)) = format::decode(&self.buffer[position..filled]) {
                on_record(base + position, payload, record);
                position += record;
            }
            let at_end = base + filled == length;
            if at_end && position == filled {
                return Ok(format::ScanOutcome {
                    valid_end: base + position,
                    ..format::ScanOutcome::default()
                });
            }
            if !at_end && filled - position < format::RECORD_BYTES_MAX {
                // A record cut by the chunk's end: carried to the front, the next chunk after.
                self.buffer.copy_within(position..filled, 0);
                base += position;
                filled -= position;
                position = 0;
                let more = (length - base - filled).min(RECOVERY_CHUNK_BYTES);
                file.read_exact_at(
                    &mut self.buffer[filled..filled + more],
                    (base + filled) as u64,
                )?;
                filled += more;
                continue;
            }
            // Damage (or a torn tail): the rest of the file, whole, scanned as before.
            let from = base + position;
            let mut rest = vec![0; length - from];
            file.read_exact_at(&mut rest, from as u64)?;
            let mut outcome = format::scan(&rest, 0, |offset, payload, record| {
                on_record(from + offset, payload, record)
            });
            outcome.valid_end += from;
            return Ok(outcome);
        }
    }
}

/// Recovery's map from a record's sequence number to its entry. Sequence numbers are given out
/// in log order, one apart, so those from the first seen on are kept in a vector indexed by
/// their distance from it: no hashing, and neighbours in the log are neighbours in memory.
/// The rest (compaction copies older than the first record, or numbers so far apart that the
/// vector would be mostly holes) go to a map.
#[derive(Default)]
struct SeqIndex {
    base: u64,
    dense: Vec<u32>,
    /// Entries in `dense`, against which its holes are weighed.
    dense_count: usize,
    sparse: WordMap<u64, u32>,
}

impl SeqIndex {
    const HOLE: u32 = u32::MAX;
    /// `dense` grows only while it stays at least a quarter full (past this many slots).
    const DENSE_SLACK: usize = 1 << 16;

    fn insert(&mut self, seq: u64, entry: u32) {
        debug_assert_ne!(entry, Self::HOLE);
        if self.dense.is_empty() {
            // The first number: the vector starts at it.
            self.base = seq;
        }
        if let Some(at) = seq
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
        {
            if at >= self.dense.len() && at < 4 * self.dense_count + Self::DENSE_SLACK {
                self.dense.resize(at + 1, Self::HOLE);
            }
            if let Some(slot) = self.dense.get_mut(at) {
                if *slot == Self::HOLE {
                    self.dense_count += 1;
                }
                *slot = entry;
                return;
            }
        }
        self.sparse.insert(seq, entry);
    }

    fn get(&self, seq: u64) -> Option<u32> {
        let dense = seq
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.dense.get(at));
        match dense {
            Some(&entry) if entry != Self::HOLE => Some(entry),
            // A number put in the map before the vector grew over it.
            _ => self.sparse.get(&seq).copied(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Segment<F> {
    pub(crate) file: F,
    /// Valid bytes on file (header included); writes go here.
    pub(crate) bytes: u64,
    pub(crate) live_records: u32,
    pub(crate) live_bytes: u64,
    /// Message and receipt records that are no longer live (delivered, expired, stale copies).
    pub(crate) dead_records: u32,
    pub(crate) tombstones: u32,
    pub(crate) created_ms: u64,
    pub(crate) sealed_ms: Option<u64>,
}

impl<F> Segment<F> {
    fn new(file: F, created_ms: u64, sealed_ms: Option<u64>) -> Self {
        Self {
            file,
            bytes: SEGMENT_HEADER_BYTES as u64,
            live_records: 0,
            live_bytes: 0,
            dead_records: 0,
            tombstones: 0,
            created_ms,
            sealed_ms,
        }
    }
}

#[derive(Debug)]
pub(crate) struct UserQueue {
    pub(crate) user: UserId,
    pub(crate) slots: VecDeque<Slot>,
    pub(crate) body_bytes: u64,
    /// Slots with `ack_kind == 0`, kept on push and remove (the quota checks them per append).
    pub(crate) messages: u32,
    /// Slots with `ack_kind != 0`.
    pub(crate) receipts: u32,
}

impl UserQueue {
    /// The queue of `user` holding `slots` (in queue order), counted.
    fn of_slots(user: UserId, slots: Vec<Slot>) -> Self {
        let messages = slots.iter().filter(|slot| slot.ack_kind == 0).count() as u32;
        Self {
            user,
            body_bytes: slots.iter().map(|slot| slot.body_bytes() as u64).sum(),
            messages,
            receipts: slots.len() as u32 - messages,
            slots: VecDeque::from(slots),
        }
    }

    fn new(user: UserId) -> Self {
        Self {
            user,
            slots: VecDeque::new(),
            body_bytes: 0,
            messages: 0,
            receipts: 0,
        }
    }

    /// Whether `item` fits the quota: messages and their bytes, or receipts, each on their own.
    fn admits(&self, item: &Item<'_>, quota: Quota) -> Result<(), AppendError> {
        match item {
            Item::Message { body, .. } => {
                if self.messages >= quota.messages_max {
                    return Err(AppendError::QuotaMessages {
                        queued: self.messages as usize,
                        max: quota.messages_max as usize,
                    });
                }
                if self.body_bytes + body.len() as u64 > quota.bytes_max {
                    return Err(AppendError::QuotaBytes {
                        queued: self.body_bytes,
                        adding: body.len(),
                        max: quota.bytes_max,
                    });
                }
            }
            Item::Receipt { .. } => {
                if self.receipts >= quota.receipts_max {
                    return Err(AppendError::QuotaReceipts {
                        queued: self.receipts as usize,
                        max: quota.receipts_max as usize,
                    });
                }
            }
        }
        Ok(())
    }

    /// Accounts for `slot`, just pushed to (`added`) or removed from `slots`.
    fn count(&mut self, slot: &Slot, added: bool) {
        let counter = if slot.ack_kind == 0 {
            &mut self.messages
        } else {
            &mut self.receipts
        };
        if added {
            *counter += 1;
            self.body_bytes += slot.body_bytes() as u64;
        } else {
            *counter -= 1;
            self.body_bytes -= slot.body_bytes() as u64;
        }
        debug_assert_eq!(
            (self.messages + self.receipts) as usize,
            self.slots.len(),
            "the counters count the slots"
        );
    }
}

#[derive(Debug)]
pub(crate) struct Index<F> {
    pub(crate) segments: BTreeMap<u32, Segment<F>>,
    pub(crate) queues: Vec<UserQueue>,
    positions: WordMap<UserId, u32>,
}

impl<F> Default for Index<F> {
    fn default() -> Self {
        Self {
            segments: BTreeMap::new(),
            queues: Vec::new(),
            positions: WordMap::default(),
        }
    }
}

impl<F: IoFile> Index<F> {
    /// Rebuilds the index of one shard folder. `read_only` neither truncates nor writes.
    /// `opened_ms` (monotonic clock) becomes every segment's created and sealed time: the
    /// files hold no time, and a stored one would be on another run's clock.
    pub(crate) fn recover<I: Io<File = F>>(
        io: &I,
        dir: &Path,
        read_only: bool,
        opened_ms: u64,
    ) -> Result<(Self, u64, RecoveryStats), StoreError> {
        let mut stats = RecoveryStats::default();
        let mut index = Self::default();
        let names = match io.list_dir(dir) {
            Ok(names) => names,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => {
                return Err(StoreError::Io {
                    path: dir.to_path_buf(),
                    source: error,
                })
            }
        };
        let mut numbers: Vec<u32> = names
            .iter()
            .filter_map(|name| parse_segment_name(name))
            .collect();
        numbers.sort_unstable();
        if let (Some(first), Some(last)) = (numbers.first(), numbers.last()) {
            stats.missing_segments = (last - first + 1) - numbers.len() as u32;
        }
        let mut next_seq = 1u64;
        // Records in log order, each with its user's place in `users`; `by_seq` finds a
        // record's entry when its tombstone comes.
        let mut entries: Vec<(u32, Slot, bool)> = Vec::new();
        // Every user met, with how many records it has (live or not): its queue is made once,
        // with room for them.
        let mut users: Vec<(UserId, u32)> = Vec::new();
        let mut user_at: WordMap<UserId, u32> = WordMap::default();
        // Records whose user is not looked up yet: see `place_users`.
        let mut unplaced: Vec<(u32, UserId)> = Vec::with_capacity(PLACE_BATCH);
        let mut by_seq = SeqIndex::default();
        let mut chunks = Chunks::default();
        if let Some(&last) = numbers.last() {
            let path = segment_path(dir, last);
            let file = io.open(&path, true).map_err(StoreError::io(&path))?;
            if file.size_bytes().map_err(StoreError::io(&path))? == 0 {
                // The spare a job made ahead of a roll (or a segment whose creation was cut
                // short before its header): nothing was ever written in it. The store that
                // opens next begins its new segment under this name.
                numbers.pop();
            }
        }
        let last_number = numbers.last().copied();
        for number in numbers {
            let path = segment_path(dir, number);
            let file = io.open(&path, read_only).map_err(StoreError::io(&path))?;
            let length = file.size_bytes().map_err(StoreError::io(&path))? as usize;
            let head = chunks.first(&file, length).map_err(StoreError::io(&path))?;
            if format::is_v1_segment(head) {
                // Checked before anything is scanned or truncated: the folder stays as it was.
                return Err(StoreError::written_by_v1(&path, data_of(dir)));
            }
            match SegmentHeader::decode(head) {
                Some(header) => next_seq = next_seq.max(header.next_seq),
                None => stats.bad_headers += 1,
            }
            let mut segment = Segment::new(file, opened_ms, Some(opened_ms));
            let start = SEGMENT_HEADER_BYTES.min(length);
            let mut dead_elsewhere: Vec<u32> = Vec::new();
            let mut on_record = |offset: usize, payload: Payload<'_>, length: usize| match payload {
                Payload::Message {
                    user,
                    seq,
                    id,
                    timestamp_ms,
                    ..
                }
                | Payload::Receipt {
                    user,
                    seq,
                    id,
                    timestamp_ms,
                    ..
                } => {
                    let (id, ack_kind) = match payload {
                        Payload::Receipt { kind, by, .. } => (receipt_ack_id(id, by), kind),
                        _ => (id, 0),
                    };
                    next_seq = next_seq.max(seq + 1);
                    let slot = Slot {
                        seq,
                        id,
                        timestamp_ms,
                        ack_kind,
                        segment: number,
                        offset: offset as u32,
                        record_bytes: length as u32,
                    };
                    if let Some(previous) = by_seq.get(seq) {
                        // A copy made by compaction: the later one is live.
                        let entry = &mut entries[previous as usize];
                        if entry.2 {
                            entry.2 = false;
                            stats.duplicates += 1;
                            dead_elsewhere.push(entry.1.segment);
                        }
                    }
                    by_seq.insert(seq, entries.len() as u32);
                    unplaced.push((entries.len() as u32, user));
                    entries.push((UNPLACED, slot, true));
                    if unplaced.len() == PLACE_BATCH {
                        place_users(&mut unplaced, &mut user_at, &mut users, &mut entries);
                    }
                }
                Payload::Tombstone { seq, .. } => {
                    segment.tombstones += 1;
                    next_seq = next_seq.max(seq + 1);
                    if let Some(at) = by_seq.get(seq) {
                        let entry = &mut entries[at as usize];
                        if entry.2 {
                            entry.2 = false;
                            dead_elsewhere.push(entry.1.segment);
                        }
                    }
                }
            };
            let outcome = chunks
                .scan(&segment.file, length, start, &mut on_record)
                .map_err(StoreError::io(&path))?;
            place_users(&mut unplaced, &mut user_at, &mut users, &mut entries);
            stats.corrupt_records += outcome.corrupt_records as u64;
            stats.corrupt_bytes += outcome.corrupt_bytes as u64;
            stats.torn_bytes += outcome.torn_bytes as u64;
            segment.bytes = length as u64;
            if outcome.torn_bytes > 0 && !read_only && Some(number) == last_number {
                segment
                    .file
                    .truncate(outcome.valid_end as u64)
                    .map_err(StoreError::io(&path))?;
                segment.bytes = outcome.valid_end as u64;
            }
            index.segments.insert(number, segment);
            for dead in dead_elsewhere {
                if let Some(segment) = index.segments.get_mut(&dead) {
                    segment.dead_records += 1;
                }
            }
            stats.segments += 1;
        }
        drop(by_seq);
        drop(user_at);
        // Each user's live slots, in log order, with room for all its records.
        let mut slots: Vec<Vec<Slot>> = Vec::new();
        slots.resize_with(users.len(), Vec::new);
        // Live records and bytes of the segment the last records were in, counted into it when
        // the log moves on to the next: one lookup per segment, not per record.
        let mut run: Option<(u32, u32, u64)> = None;
        let count_run = |index: &mut Self, run: (u32, u32, u64)| {
            let segment = index.segments.get_mut(&run.0).expect("scanned segment");
            segment.live_records += run.1;
            segment.live_bytes += run.2;
        };
        for (at, slot, live) in entries {
            if !live {
                continue;
            }
            match &mut run {
                Some((segment, records, bytes)) if *segment == slot.segment => {
                    *records += 1;
                    *bytes += u64::from(slot.record_bytes);
                }
                _ => {
                    if let Some(done) = run.take() {
                        count_run(&mut index, done);
                    }
                    run = Some((slot.segment, 1, u64::from(slot.record_bytes)));
                }
            }
            let list = &mut slots[at as usize];
            if list.capacity() == 0 {
                list.reserve_exact(users[at as usize].1 as usize);
            }
            list.push(slot);
        }
        if let Some(done) = run {
            count_run(&mut index, done);
        }
        for ((user, _), mut list) in users.into_iter().zip(slots) {
            if list.is_empty() {
                continue;
            }
            // Compaction copies sit later in the log than their neighbours; order by sequence.
            list.sort_unstable_by_key(|slot| slot.seq);
            index.add_queue(user, list);
        }
        stats.users = index.queues.len() as u64;
        stats.records_live = index.queues.iter().map(|q| q.slots.len() as u64).sum();
        Ok((index, next_seq, stats))
    }

    /// How a read of up to `limit` records of `user` from position `skip` is made: the
    /// records' bytes are gathered into one buffer per [`READ_RUN_BYTES`] (a chunk; each body
    /// is a slice of it), and a run of adjacent records is one read.
    fn plan_read(&self, user: UserId, skip: usize, limit: usize) -> Vec<PlannedChunk> {
        let mut chunks = Vec::new();
        let Some(queue) = self.queue(user) else {
            return chunks;
        };
        let slots = &queue.slots;
        let end = skip.saturating_add(limit).min(slots.len());
        let mut at = skip.min(end);
        while at < end {
            let mut chunk_end = at + 1;
            let mut chunk_bytes = slots[at].record_bytes as usize;
            while chunk_end < end
                && chunk_bytes + slots[chunk_end].record_bytes as usize <= READ_RUN_BYTES
            {
                chunk_bytes += slots[chunk_end].record_bytes as usize;
                chunk_end += 1;
            }
            let mut chunk = PlannedChunk {
                records: slots
                    .range(at..chunk_end)
                    .map(|slot| (slot.seq, slot.record_bytes as usize))
                    .collect(),
                bytes: chunk_bytes,
                runs: Vec::new(),
            };
            let mut run_at = at;
            while run_at < chunk_end {
                let first = slots[run_at];
                let mut run_end = run_at + 1;
                let mut run_bytes = first.record_bytes as usize;
                while run_end < chunk_end
                    && slots[run_end].segment == first.segment
                    && u64::from(slots[run_end].offset)
                        == u64::from(first.offset) + run_bytes as u64
                {
                    run_bytes += slots[run_end].record_bytes as usize;
                    run_end += 1;
                }
                chunk
                    .runs
                    .push((first.segment, u64::from(first.offset), run_bytes));
                run_at = run_end;
            }
            chunks.push(chunk);
            at = chunk_end;
        }
        chunks
    }

    /// Reads up to `limit` records of `user` from position `skip` into `out` (see
    /// [`Index::plan_read`]), small reads through `cache`. Returns the sequence numbers that did
    /// not read back; `None` (with part of the records in `out`) if a read would have waited
    /// for the disk and `wait` says not to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_user(
        &self,
        user: UserId,
        skip: usize,
        limit: usize,
        unwritten: Option<Unwritten<'_>>,
        cache: &mut BlockCache,
        wait: Wait,
        out: &mut Vec<Record>,
    ) -> Option<Vec<u64>> {
        let mut bad = Vec::new();
        for chunk in self.plan_read(user, skip, limit) {
            let mut bytes = Vec::with_capacity(chunk.bytes);
            for &(segment, offset, length) in &chunk.runs {
                let before = bytes.len();
                let read = read_into(
                    &self.segments,
                    unwritten,
                    Some(&mut *cache),
                    wait,
                    segment,
                    offset,
                    length,
                    &mut bytes,
                );
                let would_wait = |error: &io::Error| {
                    matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Unsupported
                    )
                };
                if wait == Wait::Never && read.as_ref().is_err_and(would_wait) {
                    return None;
                }
                if read.is_err() {
                    // Zeros never decode (a zero length is invalid): each record of the run is
                    // reported below like one that rotted on disk.
                    bytes.truncate(before);
                    bytes.resize(before + length, 0);
                }
            }
            decode_chunk(user, &chunk.records, bytes, out, &mut bad);
        }
        Some(bad)
    }

    pub(crate) fn queue(&self, user: UserId) -> Option<&UserQueue> {
        self.queue_index(user).map(|at| &self.queues[at])
    }

    /// Where `user`'s queue is in `queues`.
    fn queue_index(&self, user: UserId) -> Option<usize> {
        self.positions.get(&user).map(|&at| at as usize)
    }

    /// Adds the queue of `user`, who has none, holding `slots` (in queue order).
    fn add_queue(&mut self, user: UserId, slots: Vec<Slot>) {
        let at = self.queues.len() as u32;
        let previous = self.positions.insert(user, at);
        debug_assert!(previous.is_none(), "one queue per user");
        self.queues.push(UserQueue::of_slots(user, slots));
    }

    fn queue_mut(&mut self, user: UserId) -> &mut UserQueue {
        let at = match self.positions.get(&user) {
            Some(&at) => at as usize,
            None => {
                self.positions.insert(user, self.queues.len() as u32);
                self.queues.push(UserQueue::new(user));
                self.queues.len() - 1
            }
        };
        &mut self.queues[at]
    }

    fn push(&mut self, user: UserId, slot: Slot) {
        let segment = self
            .segments
            .get_mut(&slot.segment)
            .expect("slot's segment");
        segment.live_records += 1;
        segment.live_bytes += u64::from(slot.record_bytes);
        self.push_recovered(user, slot);
    }

    fn push_recovered(&mut self, user: UserId, slot: Slot) {
        let queue = self.queue_mut(user);
        queue.slots.push_back(slot);
        queue.count(&slot, true);
    }

    /// Removes the slot at `position` of queue `at`; an emptied queue leaves the index (the
    /// last queue moves into `at`).
    fn remove_at(&mut self, at: usize, position: usize) -> Slot {
        self.remove_slot(at, position, true)
    }

    /// Removes a slot whose record never reached the file (or was cut off it): its segment
    /// loses a live record and gains no dead one.
    fn remove_unwritten(&mut self, at: usize, position: usize) -> Slot {
        self.remove_slot(at, position, false)
    }

    fn remove_slot(&mut self, at: usize, position: usize, dead_on_file: bool) -> Slot {
        let queue = &mut self.queues[at];
        let slot = queue.slots.remove(position).expect("position in queue");
        queue.count(&slot, false);
        if queue.slots.is_empty() {
            let user = queue.user;
            self.positions.remove(&user);
            self.queues.swap_remove(at);
            if let Some(moved) = self.queues.get(at) {
                self.positions.insert(moved.user, at as u32);
            }
        }
        if let Some(segment) = self.segments.get_mut(&slot.segment) {
            segment.live_records -= 1;
            segment.live_bytes -= u64::from(slot.record_bytes);
            if dead_on_file {
                segment.dead_records += 1;
            }
        }
        slot
    }

    fn find(&self, user: UserId, seq: u64) -> Option<Slot> {
        let queue = self.queue(user)?;
        let at = queue
            .slots
            .binary_search_by_key(&seq, |slot| slot.seq)
            .ok()?;
        Some(queue.slots[at])
    }

    /// The slot of record `seq` in `user`'s queue, if it is still queued.
    fn slot_mut(&mut self, user: UserId, seq: u64) -> Option<&mut Slot> {
        let &at = self.positions.get(&user)?;
        let slots = &mut self.queues[at as usize].slots;
        let position = slots.binary_search_by_key(&seq, |slot| slot.seq).ok()?;
        Some(&mut slots[position])
    }

    /// Points the record `seq` at a new place and moves its accounting with it.
    fn relocate(&mut self, user: UserId, seq: u64, new_slot: Slot) {
        let Some(slot) = self.slot_mut(user, seq) else {
            return;
        };
        let old = std::mem::replace(slot, new_slot);
        let bytes = u64::from(old.record_bytes);
        if let Some(segment) = self.segments.get_mut(&old.segment) {
            segment.live_records -= 1;
            segment.live_bytes -= bytes;
            segment.dead_records += 1;
        }
        if let Some(segment) = self.segments.get_mut(&new_slot.segment) {
            segment.live_records += 1;
            segment.live_bytes += bytes;
        }
    }

    /// Undoes [`Index::relocate`] of a copy that never became durable: the record is back at
    /// `old_slot`, live there again, and the copy counts nowhere.
    fn relocate_back(&mut self, user: UserId, seq: u64, old_slot: Slot) {
        let Some(slot) = self.slot_mut(user, seq) else {
            return;
        };
        let copy = std::mem::replace(slot, old_slot);
        let bytes = u64::from(copy.record_bytes);
        if let Some(segment) = self.segments.get_mut(&copy.segment) {
            segment.live_records -= 1;
            segment.live_bytes -= bytes;
        }
        if let Some(segment) = self.segments.get_mut(&old_slot.segment) {
            segment.live_records += 1;
            segment.live_bytes += bytes;
            segment.dead_records = segment.dead_records.saturating_sub(1);
        }
    }

    fn slots_in(&self, segment: u32) -> Vec<(UserId, u64)> {
        self.queues
            .iter()
            .flat_map(|queue| {
                queue
                    .slots
                    .iter()
                    .filter(move |slot| slot.segment == segment)
                    .map(move |slot| (queue.user, slot.seq))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cache::BLOCK_BYTES;
    use crate::io::{Faults, FaultyIo, FsIo};
    use crate::Quota;

    const USERS: u64 = 50;
    const PER_USER: u64 = 20;

    /// A test id whose first half is `raw` (so `raw_of` gives it back).
    fn user(raw: u64) -> UserId {
        UserId::from_halves(raw, !raw).expect("valid id")
    }

    /// Recovery's chunked scan finds what a scan of the whole file finds, record for record,
    /// with records across chunk boundaries, larger than a chunk, damaged in the middle, cut
    /// at the end, or followed by garbage.
    #[test]
    fn the_chunked_scan_matches_a_scan_of_the_whole_file() {
        let mut clean = vec![0x11; SEGMENT_HEADER_BYTES];
        let mut seq = 0;
        for size in [
            5,
            900,
            3_000,
            4_100,
            20_000,
            1,
            64 * 1024,
            7,
            12_345,
            64 * 1024,
            2,
        ] {
            for _ in 0..3 {
                seq += 1;
                let body = vec![seq as u8; size];
                format::encode_message(
                    &mut clean,
                    user(seq),
                    seq,
                    seq,
                    1,
                    user(7),
                    &body,
                    false,
                    None,
                );
                format::encode_tombstone(&mut clean, seq, false);
            }
        }
        let damaged = {
            let mut bytes = clean.clone();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xFF;
            bytes
        };
        let cut = clean[..clean.len() - 100].to_vec();
        let trailing = [clean.clone(), vec![0xAB; 5_000]].concat();
        let temp = tempfile::tempdir().expect("tempdir");
        for (name, bytes) in [
            ("clean", &clean),
            ("damaged", &damaged),
            ("cut", &cut),
            ("trailing garbage", &trailing),
            ("header only", &clean[..SEGMENT_HEADER_BYTES].to_vec()),
        ] {
            let mut whole = Vec::new();
            let expected = format::scan(bytes, SEGMENT_HEADER_BYTES, |offset, payload, length| {
                whole.push((offset, format!("{payload:?}"), length));
            });
            let path = temp.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            let file = std::fs::File::open(&path).expect("open");
            let mut chunks = Chunks::default();
            let head = chunks.first(&file, bytes.len()).expect("first chunk");
            assert_eq!(
                head,
                &bytes[..bytes.len().min(RECOVERY_CHUNK_BYTES)],
                "{name}"
            );
            let mut chunked = Vec::new();
            let outcome = chunks
                .scan(
                    &file,
                    bytes.len(),
                    SEGMENT_HEADER_BYTES,
                    &mut |offset, payload, length| {
                        chunked.push((offset, format!("{payload:?}"), length));
                    },
                )
                .expect("scan");
            assert_eq!(outcome, expected, "{name}");
            assert_eq!(chunked, whole, "{name}");
            assert!(!whole.is_empty() || name == "header only", "{name}");
        }
        assert_ne!(
            format::scan(&damaged, SEGMENT_HEADER_BYTES, |_, _, _| {}).corrupt_records,
            0,
            "the damage is seen"
        );
    }

    /// Recovery's sequence index: the last entry put for a number wins, wherever it was kept.
    #[test]
    fn the_sequence_index_finds_every_number_dense_or_not() {
        let mut index = SeqIndex::default();
        for seq in 100..1_100u64 {
            index.insert(seq, seq as u32);
        }
        // A compaction copy older than the first record, and one far beyond the vector.
        index.insert(7, 1);
        index.insert(1 << 40, 2);
        assert_eq!(index.sparse.len(), 2, "outside the vector");
        assert_eq!(index.get(100), Some(100));
        assert_eq!(index.get(1_099), Some(1_099));
        assert_eq!(index.get(7), Some(1));
        assert_eq!(index.get(1 << 40), Some(2));
        assert_eq!(index.get(99), None);
        assert_eq!(index.get(1_100), None);
        assert_eq!(index.get(5_000), None);
        // A later copy of a number replaces the earlier one.
        index.insert(500, 9_000);
        assert_eq!(index.get(500), Some(9_000));
        // A number put in the map while the vector was short is still found once the vector
        // has grown over it.
        let mut index = SeqIndex::default();
        index.insert(1, 0);
        let far = 1 + SeqIndex::DENSE_SLACK as u64 + 10;
        index.insert(far, 1);
        assert_eq!(index.sparse.len(), 1);
        for (entry, seq) in (2..far + 20).enumerate() {
            if seq != far {
                index.insert(seq, entry as u32 + 2);
            }
        }
        assert!(index.dense.len() as u64 > far, "the vector grew over it");
        assert_eq!(index.get(far), Some(1));
        assert_eq!(index.get(2), Some(2));
    }

    fn raw_of(user: UserId) -> u64 {
        user.high()
    }

    fn options() -> Options {
        Options {
            quota: Quota::UNLIMITED,
            ..Options::default()
        }
    }

    fn body_bytes(id: u64) -> Vec<u8> {
        (0..100).map(|at| (id as u8).wrapping_add(at)).collect()
    }

    /// Appends `PER_USER` messages to each of `USERS` users, interleaved as a busy shard
    /// appends them (id `n` goes to user `1 + n % USERS`), and commits.
    fn fill<I: Io>(store: &mut ShardStore<I>) {
        for id in 0..USERS * PER_USER {
            append(store, user(1 + id % USERS), id);
        }
        store.commit(1).expect("commit");
    }

    fn append<I: Io>(store: &mut ShardStore<I>, who: UserId, id: u64) {
        let body = body_bytes(id);
        let item = Item::Message {
            from: user(9_999),
            id,
            timestamp_ms: 1,
            body: &body,
            sent: false,
            group: None,
        };
        store.append(1, who, &item).expect("append");
    }

    fn ids_and_bodies_ok(who: UserId, records: &[Record]) -> Vec<u64> {
        records
            .iter()
            .map(|record| match &record.item {
                StoredItem::Message { id, body, .. } => {
                    assert_eq!(1 + id % USERS, raw_of(who), "the record is this user's");
                    assert_eq!(body.as_ref(), body_bytes(*id).as_slice(), "body of {id}");
                    *id
                }
                StoredItem::Receipt { .. } => panic!("only messages were appended"),
            })
            .collect()
    }

    /// Every user's queue reads back whole, in order, as `fill` made it.
    fn assert_every_queue_whole<I: Io>(store: &mut ShardStore<I>) {
        for who in 1..=USERS {
            let mut out = Vec::new();
            store
                .read(user(who), 0, usize::MAX, &mut out)
                .expect("read");
            assert_eq!(ids_and_bodies_ok(user(who), &out), expected_ids(user(who)));
        }
    }

    fn expected_ids(who: UserId) -> Vec<u64> {
        (0..PER_USER).map(|n| raw_of(who) - 1 + n * USERS).collect()
    }

    fn reopen(data: &Path) -> ShardStore<FsIo> {
        ShardStore::open(data, 0, 1, options(), FsIo, 1)
            .expect("open")
            .0
    }

    /// Under `batch` a roll creates no file: it begins the spare the last job made, and the
    /// next job writes its header. The spare left at the end is where the next opener begins.
    #[test]
    fn rolls_under_batch_begin_on_spares_that_the_jobs_made() {
        let temp = tempfile::tempdir().expect("tempdir");
        let small = Options {
            segment_bytes_max: 4096,
            ..options()
        };
        assert!(matches!(small.durability, Durability::Batch { .. }));
        let mut store = ShardStore::open(temp.path(), 0, 1, small, FsIo, 1)
            .expect("open")
            .0;
        for id in 0..USERS * PER_USER {
            append(&mut store, user(1 + id % USERS), id);
            store.commit(1).expect("commit");
        }
        let counters = store.counters();
        assert!(counters.segments_created > 10, "it rolled: {counters:?}");
        assert_eq!(
            counters.segments_begun_on_spares,
            counters.segments_created - 1,
            "every roll after the first job began a spare: {counters:?}"
        );
        let next_seq = store.next_seq;
        let last = store.active;
        drop(store);
        let dir = shard_dir(temp.path(), 0);
        for number in 1..=last {
            let bytes = std::fs::read(segment_path(&dir, number)).expect("segment");
            let header = SegmentHeader::decode(&bytes).expect("every header was written");
            assert_eq!(header.segment, number);
        }
        let spare = segment_path(&dir, last + 1);
        assert_eq!(std::fs::metadata(&spare).expect("the spare").len(), 0);
        let (mut store, stats) =
            ShardStore::open(temp.path(), 0, 1, small, FsIo, 1).expect("reopen");
        assert_eq!(
            stats.bad_headers, 0,
            "the empty spare is no damaged segment"
        );
        assert_eq!(
            store.active,
            last + 1,
            "the next opener begins on the spare's name"
        );
        assert!(store.next_seq >= next_seq);
        assert_every_queue_whole(&mut store);
    }

    /// Until the job after a roll onto a spare has written its header, nothing is deleted: the
    /// header carries the sequence number when no record is left to tell it. A store killed
    /// before that job reopens with everything it had made durable.
    #[test]
    fn a_segment_begun_on_a_spare_holds_its_header_before_anything_is_deleted() {
        let rolled = |data: &Path| {
            let mut store = reopen(data);
            append(&mut store, user(1), 0);
            store.commit(1).expect("commit");
            assert!(
                matches!(store.spare, Spare::Ready(2, _)),
                "the job made a spare"
            );
            store.roll(1, true).expect("roll");
            assert_eq!(store.counters().segments_begun_on_spares, 1);
            store
        };
        let temp = tempfile::tempdir().expect("tempdir");
        let mut store = rolled(temp.path());
        let progress = store.compact(1_000_000, 1 << 20).expect("compact");
        assert!(
            progress.idle,
            "no compaction while a header waits: {progress:?}"
        );
        let begun = segment_path(&shard_dir(temp.path(), 0), 2);
        assert_eq!(std::fs::metadata(&begun).expect("segment").len(), 0);
        // The next job writes the header, with nothing else to write.
        store.commit(1).expect("commit");
        let header = SegmentHeader::decode(&std::fs::read(&begun).expect("segment"))
            .expect("the header is on file");
        assert_eq!((header.segment, header.next_seq), (2, store.next_seq));
        assert!(store.headers_unwritten.is_empty());

        // Killed before that job: the next opener finds segment 1 whole and begins on the
        // name of the empty segment 2.
        let temp = tempfile::tempdir().expect("tempdir");
        drop(rolled(temp.path()));
        let (mut store, stats) =
            ShardStore::open(temp.path(), 0, 1, options(), FsIo, 1).expect("open after a kill");
        assert_eq!((stats.bad_headers, store.active), (0, 2));
        append(&mut store, user(1), 1);
        store.commit(1).expect("commit");
        drop(store);
        let mut store = reopen(temp.path());
        let mut out = Vec::new();
        store.read(user(1), 0, usize::MAX, &mut out).expect("read");
        let ids: Vec<u64> = out
            .iter()
            .map(|record| match &record.item {
                StoredItem::Message { id, .. } => *id,
                StoredItem::Receipt { .. } => panic!("only messages"),
            })
            .collect();
        assert_eq!(ids, vec![0, 1], "nothing acked was lost");
    }

    /// A takeover that failed: the new process opened the store (which makes the next
    /// segment, header only, over the old one's spare) and went away; the old one goes on and
    /// rolls onto that number, not onto its spare, which has no name any more.
    #[test]
    fn a_segment_left_empty_by_another_opener_is_taken_over_at_the_next_roll() {
        let temp = tempfile::tempdir().expect("tempdir");
        let small = Options {
            segment_bytes_max: 4096,
            ..options()
        };
        let open = || {
            ShardStore::open(temp.path(), 0, 1, small, FsIo, 1)
                .expect("open")
                .0
        };
        let mut old = open();
        append(&mut old, user(1), 0);
        old.commit(1).expect("commit");
        drop(open());
        for id in 1..USERS * PER_USER {
            append(&mut old, user(1 + id % USERS), id);
            old.commit(1).expect("every commit goes on, across rolls");
        }
        assert!(old.counters().segments_created > 2, "it rolled");
        drop(old);
        let mut store = open();
        assert_every_queue_whole(&mut store);
    }

    #[test]
    fn reading_every_queue_in_log_order_reads_each_block_about_once() {
        let temp = tempfile::tempdir().expect("tempdir");
        fill(&mut reopen(temp.path()));
        let mut store = reopen(temp.path());
        let users: Vec<UserId> = store.users().map(|(who, _)| who).collect();
        assert_eq!(users.len() as u64, USERS);
        let mut out = Vec::new();
        for who in users {
            out.clear();
            let read = store.read(who, 0, usize::MAX, &mut out).expect("read");
            assert_eq!(read as u64, PER_USER);
            assert_eq!(ids_and_bodies_ok(who, &out), expected_ids(who));
        }
        let log_bytes = USERS * PER_USER * format::message_record_bytes(100) as u64;
        let blocks = log_bytes.div_ceil(BLOCK_BYTES as u64) + 1;
        let read_calls = store.counters().read_calls;
        assert!(
            read_calls <= blocks,
            "{read_calls} read calls for {blocks} blocks"
        );
        assert_eq!(store.counters().corrupt_reads, 0);
    }

    #[test]
    fn reads_with_skip_and_limit_see_the_file_and_the_buffer() {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut store = reopen(temp.path());
        fill(&mut store);
        // Two more for user 1, buffered only.
        for id in [USERS * PER_USER, USERS * PER_USER + USERS] {
            append(&mut store, user(1), id);
        }
        let mut all = expected_ids(user(1));
        all.extend([USERS * PER_USER, USERS * PER_USER + USERS]);
        for (skip, limit) in [(0, usize::MAX), (3, 4), (PER_USER as usize - 1, 2), (21, 9)] {
            let mut out = Vec::new();
            store.read(user(1), skip, limit, &mut out).expect("read");
            let wanted: Vec<u64> = all.iter().copied().skip(skip).take(limit).collect();
            assert_eq!(ids_and_bodies_ok(user(1), &out), wanted, "{skip}+{limit}");
        }
        let mut out = Vec::new();
        assert_eq!(store.read(user(1), 99, 5, &mut out).expect("read"), 0);
        assert_eq!(store.read(user(77), 0, 5, &mut out).expect("read"), 0);
    }

    #[test]
    fn a_record_that_rotted_since_recovery_is_dropped_and_counted() {
        let temp = tempfile::tempdir().expect("tempdir");
        fill(&mut reopen(temp.path()));
        let mut store = reopen(temp.path());
        let victim = store.queue(user(3)).nth(5).copied().expect("sixth record");
        // Flip a body byte on disk after recovery checked it.
        let path = segment_path(store.dir(), victim.segment);
        let mut bytes = std::fs::read(&path).expect("segment");
        bytes[victim.offset as usize + victim.record_bytes as usize - 1] ^= 0x40;
        std::fs::write(&path, bytes).expect("rot");
        let mut out = Vec::new();
        store.read(user(3), 0, usize::MAX, &mut out).expect("read");
        let mut wanted = expected_ids(user(3));
        wanted.remove(5);
        assert_eq!(ids_and_bodies_ok(user(3), &out), wanted);
        assert_eq!(store.counters().corrupt_reads, 1);
        assert_eq!(store.queue_len(user(3)), PER_USER as usize - 1);
    }

    #[test]
    fn a_failed_read_drops_the_records_it_could_not_read_only() {
        let temp = tempfile::tempdir().expect("tempdir");
        let faults = Faults::new();
        let io = FaultyIo {
            faults: faults.clone(),
        };
        let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 1).expect("open");
        fill(&mut store);
        faults.fail_reads.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        assert_eq!(
            store.read(user(2), 0, usize::MAX, &mut out).expect("read"),
            0
        );
        assert_eq!(store.counters().corrupt_reads, PER_USER);
        assert_eq!(store.queue_len(user(2)), 0);
        faults.fail_reads.store(false, Ordering::Relaxed);
        store.read(user(4), 0, usize::MAX, &mut out).expect("read");
        assert_eq!(ids_and_bodies_ok(user(4), &out), expected_ids(user(4)));
    }

    /// A store of 16 KiB segments in `data`, filled ([`fill`]), with the messages `delivered`
    /// picks (by id) marked delivered and committed; and its options.
    fn small_store_delivered(
        data: &Path,
        delivered: impl Fn(u64) -> bool,
    ) -> (ShardStore<FsIo>, Options) {
        let small = Options {
            segment_bytes_max: 16 * 1024,
            ..options()
        };
        let (mut store, _) = ShardStore::open(data, 0, 1, small, FsIo, 1).expect("open");
        fill(&mut store);
        let mut out = Vec::new();
        for raw in 1..=USERS {
            out.clear();
            store
                .read(user(raw), 0, usize::MAX, &mut out)
                .expect("read");
            for id in ids_and_bodies_ok(user(raw), &out) {
                if delivered(id) {
                    assert!(store.mark_delivered(1, user(raw), id, 0));
                }
            }
        }
        store.commit(1).expect("commit");
        (store, small)
    }

    /// What recovery rebuilds matches what the store held, record for record and segment
    /// for segment, when the log holds tombstones and compaction copies whose sources came
    /// back (a compaction cut short before its removals): each live record once, in queue
    /// order, counted live in the segment it is read from and nowhere else.
    #[test]
    fn recovery_rebuilds_the_queues_and_segment_counts_the_store_had() {
        let temp = tempfile::tempdir().expect("tempdir");
        let (mut store, small) = small_store_delivered(temp.path(), |id| id % 3 != 0);
        let dir = store.dir().to_path_buf();
        let sources: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|entry| entry.expect("entry").path())
            .map(|path| (path.clone(), std::fs::read(&path).expect("read")))
            .collect();
        while !store.compact(1, 1 << 20).expect("compact").idle {
            store.commit(1).expect("the copies' commit");
        }
        assert!(store.counters().segments_deleted > 0);
        let queues = |store: &mut ShardStore<FsIo>| -> Vec<Vec<u64>> {
            (1..=USERS)
                .map(|raw| {
                    let mut out = Vec::new();
                    store
                        .read(user(raw), 0, usize::MAX, &mut out)
                        .expect("read");
                    ids_and_bodies_ok(user(raw), &out)
                })
                .collect()
        };
        let held = queues(&mut store);
        let live = |store: &ShardStore<FsIo>| -> BTreeMap<u32, (u32, u64)> {
            store
                .index
                .segments
                .iter()
                .map(|(number, segment)| (*number, (segment.live_records, segment.live_bytes)))
                .collect()
        };
        let live_before = live(&store);
        let counted = |store: &ShardStore<FsIo>| -> BTreeMap<UserId, (u32, u32, u64)> {
            store
                .index
                .queues
                .iter()
                .map(|queue| {
                    let counts = (queue.messages, queue.receipts, queue.body_bytes);
                    (queue.user, counts)
                })
                .collect()
        };
        let counted_before = counted(&store);
        drop(store);
        // The compacted sources come back, as after a kill before their removal.
        let mut restored = 0;
        for (path, bytes) in &sources {
            if !path.exists() {
                std::fs::write(path, bytes).expect("restore");
                restored += 1;
            }
        }
        assert!(restored > 0);

        let (mut store, stats) = ShardStore::open(temp.path(), 0, 1, small, FsIo, 1).expect("open");
        assert!(stats.duplicates > 0, "{stats:?}");
        assert_eq!(queues(&mut store), held);
        assert_eq!(
            stats.records_live,
            held.iter().map(|queue| queue.len() as u64).sum::<u64>()
        );
        assert_eq!(counted(&store), counted_before, "each queue's counts");
        let live_after = live(&store);
        for (number, counts) in &live_after {
            match live_before.get(number) {
                Some(before) => assert_eq!(counts, before, "segment {number}"),
                None => assert_eq!(
                    counts,
                    &(0, 0),
                    "restored segment {number} holds nothing live"
                ),
            }
        }
        // The restored sources are compacted away again, and the queues stay as they were.
        while !store.compact(1, 1 << 20).expect("compact").idle {
            store.commit(1).expect("the copies' commit");
        }
        assert_eq!(queues(&mut store), held);
        assert_eq!(live(&store).len(), live_before.len());
    }

    #[test]
    fn reads_after_compaction_see_the_moved_records() {
        let temp = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = small_store_delivered(temp.path(), |id| id % 2 == 0);
        let mut out = Vec::new();
        while !store.compact(1, 1 << 20).expect("compact").idle {
            store.commit(1).expect("the copies' commit");
        }
        for raw in 1..=USERS {
            out.clear();
            store
                .read(user(raw), 0, usize::MAX, &mut out)
                .expect("read");
            let wanted: Vec<u64> = expected_ids(user(raw))
                .into_iter()
                .filter(|id| id % 2 == 1)
                .collect();
            assert_eq!(ids_and_bodies_ok(user(raw), &out), wanted);
        }
        assert_eq!(store.counters().corrupt_reads, 0);
        assert!(store.counters().segments_deleted > 0);
    }
}
