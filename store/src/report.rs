//! The admin view of a data folder's queues, read without a running server.

use std::fmt;
use std::path::Path;

use hop_protocol::UserId;

use crate::io::Io;
use crate::rehome::{old_shard_dirs, read_count, SHARDS_FILE};
use crate::shard::{shard_dir, Index, RecoveryStats};
use crate::StoreError;

/// One user's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserReport {
    pub user: UserId,
    pub shard: u16,
    pub records: usize,
    pub body_bytes: u64,
    pub oldest_timestamp_ms: u64,
}

/// One shard folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReport {
    pub shard: u16,
    pub segments: u32,
    pub disk_bytes: u64,
    pub users: usize,
    pub records: u64,
    pub body_bytes: u64,
    pub oldest_timestamp_ms: Option<u64>,
    pub recovery: RecoveryStats,
}

/// Queue depths, ages and the largest queues of a data folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueReport {
    /// The wall clock (ms since the Unix epoch) the ages are counted to.
    pub wall_ms: u64,
    /// The count in `DATA/store-shards`, if any.
    pub layout_shards: Option<u16>,
    pub shards: Vec<ShardReport>,
    /// Largest queues by record count, largest first.
    pub largest: Vec<UserReport>,
}

impl QueueReport {
    pub fn records(&self) -> u64 {
        self.shards.iter().map(|shard| shard.records).sum()
    }

    pub fn oldest_timestamp_ms(&self) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|shard| shard.oldest_timestamp_ms)
            .min()
    }
}

/// Reads every `shard-K` folder under `data` (read only: nothing is truncated or written) and
/// reports its queues, with the `largest_max` largest queues. `wall_ms` is the wall clock (ms
/// since the Unix epoch): ages are `wall_ms` minus the records' timestamps. A folder written
/// by protocol v1 is refused with [`StoreError::Layout`].
pub fn report<I: Io>(
    io: &I,
    data: &Path,
    wall_ms: u64,
    largest_max: usize,
) -> Result<QueueReport, StoreError> {
    let layout_shards = read_count(io, &data.join(SHARDS_FILE)).ok();
    let mut shards = Vec::new();
    let mut users = Vec::new();
    for shard in old_shard_dirs(io, data)? {
        // The monotonic open time only ages segments for compaction, which a report never does.
        let opened_ms = 0;
        let (index, _, recovery) = Index::recover(io, &shard_dir(data, shard), true, opened_ms)?;
        let mut report = ShardReport {
            shard,
            segments: recovery.segments,
            disk_bytes: index.segments.values().map(|segment| segment.bytes).sum(),
            users: index.queues.len(),
            records: recovery.records_live,
            body_bytes: 0,
            oldest_timestamp_ms: None,
            recovery,
        };
        for queue in &index.queues {
            let oldest = queue
                .slots
                .iter()
                .map(|slot| slot.timestamp_ms)
                .min()
                .unwrap_or(wall_ms);
            report.body_bytes += queue.body_bytes;
            report.oldest_timestamp_ms =
                Some(report.oldest_timestamp_ms.map_or(oldest, |o| o.min(oldest)));
            users.push(UserReport {
                user: queue.user,
                shard,
                records: queue.slots.len(),
                body_bytes: queue.body_bytes,
                oldest_timestamp_ms: oldest,
            });
        }
        shards.push(report);
    }
    users.sort_unstable_by_key(|u| std::cmp::Reverse((u.records, u.body_bytes)));
    users.truncate(largest_max);
    Ok(QueueReport {
        wall_ms,
        layout_shards,
        shards,
        largest: users,
    })
}

fn age(wall_ms: u64, timestamp_ms: Option<u64>) -> String {
    match timestamp_ms {
        None => "-".to_string(),
        Some(timestamp_ms) => {
            let seconds = wall_ms.saturating_sub(timestamp_ms) / 1000;
            format!(
                "{}d{:02}h{:02}m",
                seconds / 86_400,
                seconds / 3600 % 24,
                seconds / 60 % 60
            )
        }
    }
}

impl fmt::Display for QueueReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layout_shards {
            Some(count) => writeln!(f, "layout: {count} shards")?,
            None => writeln!(f, "layout: none recorded")?,
        }
        writeln!(
            f,
            "{:>5} {:>8} {:>12} {:>9} {:>10} {:>12} {:>10} {:>8}",
            "shard",
            "segments",
            "disk bytes",
            "users",
            "records",
            "body bytes",
            "oldest",
            "corrupt"
        )?;
        for shard in &self.shards {
            writeln!(
                f,
                "{:>5} {:>8} {:>12} {:>9} {:>10} {:>12} {:>10} {:>8}",
                shard.shard,
                shard.segments,
                shard.disk_bytes,
                shard.users,
                shard.records,
                shard.body_bytes,
                age(self.wall_ms, shard.oldest_timestamp_ms),
                shard.recovery.corrupt_records,
            )?;
        }
        writeln!(
            f,
            "total: {} records, oldest {}",
            self.records(),
            age(self.wall_ms, self.oldest_timestamp_ms())
        )?;
        writeln!(f, "largest queues:")?;
        writeln!(
            f,
            "{:>32} {:>5} {:>8} {:>12} {:>10}",
            "user", "shard", "records", "body bytes", "oldest"
        )?;
        for user in &self.largest {
            writeln!(
                f,
                "{:>32} {:>5} {:>8} {:>12} {:>10}",
                user.user,
                user.shard,
                user.records,
                user.body_bytes,
                age(self.wall_ms, Some(user.oldest_timestamp_ms)),
            )?;
        }
        Ok(())
    }
}
