//! The start-up step that keeps every queued record when the shard count changes.
//!
//! Run once by the process, before any shard opens its store. When `DATA/store-shards` names
//! another count than the one starting, every old shard folder is recovered (read only), its
//! live records are written to new shard folders under `DATA/rehome/`, fsynced, and
//! `DATA/rehome/DONE` is written: that file is the commit point. Then the new folders replace
//! the old ones. A crash before `DONE` leaves the old folders untouched (the half-built
//! `rehome/` is deleted at the next start); a crash after it finishes the swap at the next
//! start. So no record is lost, and none ends up twice.

use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::UserId;

use crate::cache::BlockCache;
use crate::io::{Io, IoFile, Wait};
use crate::shard::{refuse_v1_segments, shard_dir, Index, ShardStore};
use crate::{Durability, Item, Options, Quota, StoreError, StoredItem};

/// The file under `DATA/` naming the shard count the queue folders are laid out for.
pub const SHARDS_FILE: &str = "store-shards";
pub(crate) const REHOME_DIR: &str = "rehome";
const DONE_FILE: &str = "DONE";
/// Appends buffered per fsync while copying.
const COPY_BATCH_RECORDS: u32 = 64 * 1024;

/// What [`prepare`] found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The shard count the data folder was laid out for; `None` for a new folder.
    pub previous_shards: Option<u16>,
    /// Records moved to the folders of the new shard count.
    pub rehomed_records: u64,
    /// Damaged records skipped while reading the old folders.
    pub corrupt_records: u64,
}

/// Makes `data` ready for `shards` shards: finishes an interrupted re-homing, and re-homes the
/// queued records to `home(user, shards)` when the folder was laid out for another count.
/// `options` are the segment limits for the new folders; `now_ms` is the monotonic clock of
/// [`ShardStore`]. A folder written by protocol v1 is refused with [`StoreError::Layout`]
/// before anything in it changes.
pub fn prepare<I: Io + Clone>(
    io: &I,
    data: &Path,
    shards: u16,
    home: impl Fn(UserId, u16) -> u16,
    options: Options,
    now_ms: u64,
) -> Result<Layout, StoreError> {
    assert!(shards > 0, "at least one shard");
    io.create_dir_all(data).map_err(StoreError::io(data))?;
    let rehome = data.join(REHOME_DIR);
    for shard in old_shard_dirs(io, data)? {
        refuse_v1_segments(io, &shard_dir(data, shard))?;
    }
    for shard in old_shard_dirs(io, &rehome)? {
        refuse_v1_segments(io, &shard_dir(&rehome, shard))?;
    }
    let done = rehome.join(DONE_FILE);
    if io.exists(&done) {
        let target = read_count(io, &done)?;
        swap_in(io, data, target)?;
    } else if io.exists(&rehome) {
        io.remove_dir_all(&rehome)
            .map_err(StoreError::io(&rehome))?;
    }
    let previous = match read_count(io, &data.join(SHARDS_FILE)) {
        Ok(count) => Some(count),
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            old_shard_dirs(io, data)?
                .into_iter()
                .max()
                .map(|last| last + 1)
        }
        Err(error) => return Err(error),
    };
    let mut layout = Layout {
        previous_shards: previous,
        ..Layout::default()
    };
    match previous {
        Some(count) if count == shards => return Ok(layout),
        Some(_) => {}
        None => {
            write_count(io, data, &data.join(SHARDS_FILE), shards)?;
            return Ok(layout);
        }
    }

    // Copy every live record to its new home under rehome/.
    let copy_options = Options {
        durability: Durability::Batch {
            delay_ms: u64::MAX / 4,
            records_max: COPY_BATCH_RECORDS,
        },
        quota: Quota::UNLIMITED,
        ..options
    };
    let mut targets = Vec::with_capacity(usize::from(shards));
    for shard in 0..shards {
        let (store, _) =
            ShardStore::open(&rehome, shard, shards, copy_options, io.clone(), now_ms)?;
        targets.push(store);
    }
    let mut records = Vec::new();
    for old in old_shard_dirs(io, data)? {
        let dir = shard_dir(data, old);
        let (index, _, stats) = Index::recover(io, &dir, true, now_ms)?;
        // Segment numbers repeat across folders: a cache serves one folder only.
        let mut cache = BlockCache::default();
        layout.corrupt_records += stats.corrupt_records;
        for queue in &index.queues {
            records.clear();
            let bad = index
                .read_user(
                    queue.user,
                    0,
                    usize::MAX,
                    None,
                    &mut cache,
                    Wait::ForDisk,
                    &mut records,
                )
                .expect("a read that may wait never would block");
            layout.corrupt_records += bad.len() as u64;
            let target = &mut targets[usize::from(home(queue.user, shards))];
            for record in &records {
                let item = match &record.item {
                    StoredItem::Message {
                        from,
                        id,
                        timestamp_ms,
                        body,
                        sent,
                        group,
                    } => Item::Message {
                        from: *from,
                        id: *id,
                        timestamp_ms: *timestamp_ms,
                        body,
                        sent: *sent,
                        group: *group,
                    },
                    StoredItem::Receipt {
                        id,
                        kind,
                        by,
                        timestamp_ms,
                    } => Item::Receipt {
                        id: *id,
                        kind: *kind,
                        by: *by,
                        timestamp_ms: *timestamp_ms,
                    },
                };
                target
                    .append(now_ms, queue.user, &item)
                    .map_err(|error| StoreError::Layout {
                        path: dir.clone(),
                        reason: error.to_string(),
                    })?;
                layout.rehomed_records += 1;
                if target
                    .next_commit_deadline()
                    .is_some_and(|due| due <= now_ms)
                {
                    commit(target, now_ms)?;
                }
            }
        }
    }
    for target in &mut targets {
        commit(target, now_ms)?;
    }
    drop(targets);
    io.sync_dir(&rehome).map_err(StoreError::io(&rehome))?;
    write_count(io, &rehome, &done, shards)?;
    swap_in(io, data, shards)?;
    Ok(layout)
}

fn commit<I: Io>(store: &mut ShardStore<I>, now_ms: u64) -> Result<(), StoreError> {
    let dir = store.dir().to_path_buf();
    store
        .commit(now_ms)
        .map(|_| ())
        .map_err(|error| StoreError::Io {
            path: dir,
            source: error.source,
        })
}

/// Replaces the old shard folders with the ones under rehome/; safe to run again after a crash.
fn swap_in<I: Io>(io: &I, data: &Path, shards: u16) -> Result<(), StoreError> {
    let rehome = data.join(REHOME_DIR);
    for shard in 0..shards {
        let built = shard_dir(&rehome, shard);
        if io.exists(&built) {
            let old = shard_dir(data, shard);
            if io.exists(&old) {
                io.remove_dir_all(&old).map_err(StoreError::io(&old))?;
            }
            io.rename(&built, &old).map_err(StoreError::io(&built))?;
        }
    }
    for old in old_shard_dirs(io, data)? {
        if old >= shards {
            let dir = shard_dir(data, old);
            io.remove_dir_all(&dir).map_err(StoreError::io(&dir))?;
        }
    }
    io.sync_dir(data).map_err(StoreError::io(data))?;
    write_count(io, data, &data.join(SHARDS_FILE), shards)?;
    let done = rehome.join(DONE_FILE);
    io.remove_file(&done).map_err(StoreError::io(&done))?;
    io.remove_dir_all(&rehome)
        .map_err(StoreError::io(&rehome))?;
    io.sync_dir(data).map_err(StoreError::io(data))
}

/// Shard numbers of the `shard-K` folders under `data`.
pub(crate) fn old_shard_dirs<I: Io>(io: &I, data: &Path) -> Result<Vec<u16>, StoreError> {
    let names = match io.list_dir(data) {
        Ok(names) => names,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(StoreError::io(data)(error)),
    };
    let mut shards: Vec<u16> = names
        .iter()
        .filter_map(|name| name.strip_prefix("shard-")?.parse().ok())
        .collect();
    shards.sort_unstable();
    Ok(shards)
}

pub(crate) fn read_count<I: Io>(io: &I, path: &Path) -> Result<u16, StoreError> {
    let file = io.open(path, true).map_err(StoreError::io(path))?;
    let length = file.size_bytes().map_err(StoreError::io(path))?.min(64) as usize;
    let mut bytes = vec![0u8; length];
    file.read_exact_at(&mut bytes, 0)
        .map_err(StoreError::io(path))?;
    let text = String::from_utf8_lossy(&bytes);
    match text.trim().parse::<u16>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(StoreError::Layout {
            path: path.to_path_buf(),
            reason: format!("expected a shard count, found {:?}", text.trim()),
        }),
    }
}

/// Writes `count` to `path` atomically: a temporary file, fsync, rename, fsync of the folder.
fn write_count<I: Io>(io: &I, dir: &Path, path: &Path, count: u16) -> Result<(), StoreError> {
    let temporary: PathBuf = path.with_extension("tmp");
    if io.exists(&temporary) {
        io.remove_file(&temporary)
            .map_err(StoreError::io(&temporary))?;
    }
    let mut file = io.create(&temporary).map_err(StoreError::io(&temporary))?;
    file.write_all_at(format!("{count}\n").as_bytes(), 0)
        .map_err(StoreError::io(&temporary))?;
    file.sync().map_err(StoreError::io(&temporary))?;
    io.rename(&temporary, path).map_err(StoreError::io(path))?;
    io.sync_dir(dir).map_err(StoreError::io(dir))
}
