//! When each account's devices were last seen, on disk, for account expiry.
//!
//! Time here is the *account clock*: seconds that count only while hopd runs. At start it
//! resumes from the latest time any file holds ([`LoadedSeen::clock_s`]) and then follows the
//! monotonic clock, so a step of the wall clock expires no one, and time hopd is stopped (when
//! no one could sign in either) does not count against anyone.
//!
//! `DATA/accounts/shard-K.seen`, written by shard K (the home shard of the devices it records),
//! is a row of 24-byte records:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..16 | the device's user id (big-endian halves); all zero: the shard's clock |
//! | 16..20 | account-clock seconds, u32 little-endian |
//! | 20..24 | CRC32C of bytes 0..20, u32 little-endian |
//!
//! A device's latest time is the largest of its records in any shard file, so a restart with
//! another shard count needs no rewrite. Records are appended, a torn tail cut at open (as
//! [`crate::accounts::AccountLog`] does), and the file is rewritten whole when it holds many
//! times the records that are live ([`SeenLog::rewrite`]: a temporary file renamed over it).
//! A record whose checksum fails is skipped and counted, not fatal: losing one can only make an
//! account live longer (a device with no time is given the clock's time at start).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::UserId;

use crate::fixedlog::FixedLog;
use crate::io::{self as store_io, Io, IoFile};
use crate::StoreError;

/// Bytes of one record.
pub const RECORD_BYTES: usize = 24;

const FILE_SUFFIX: &str = ".seen";
/// Records read per read call: memory stays bounded however many a file holds.
const READ_RECORDS: usize = 8192;

/// Every shard file's records, resolved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadedSeen {
    /// Each device's latest time.
    pub seen: HashMap<UserId, u32>,
    /// The latest time of any record (a device's or a clock's): where the clock resumes.
    pub clock_s: u32,
    /// Records read (the live ones and the ones a later record made stale).
    pub records: u64,
    /// Records whose checksum failed, skipped.
    pub damaged: u64,
    /// Bytes after the last whole record of a file (a write torn by a crash).
    pub torn_bytes: u64,
}

/// One shard's writer of seen times. Owned by the shard's thread.
#[derive(Debug)]
pub struct SeenLog<I: Io> {
    log: FixedLog<I::File>,
}

impl<I: Io> SeenLog<I> {
    /// Opens (or creates) `DATA/accounts/shard-K.seen`; a torn tail is cut off, and a
    /// temporary file a crashed rewrite left is removed.
    pub fn open(io: &I, data: &Path, shard: u16) -> Result<Self, StoreError> {
        let (file, path) = store_io::open_shard_log(io, data, shard, FILE_SUFFIX)?;
        let temporary = temporary_path(&path);
        if io.exists(&temporary) {
            io.remove_file(&temporary)
                .map_err(StoreError::io(&temporary))?;
        }
        let (log, _) = FixedLog::new(file, path, RECORD_BYTES)?;
        Ok(Self { log })
    }

    /// Buffers `device`'s time (`None`: the shard's clock); [`SeenLog::flush`] makes it
    /// durable.
    pub fn append(&mut self, device: Option<UserId>, seconds: u32) {
        self.log.push(&encode(device, seconds));
    }

    /// Writes the buffered records at the end of the good ones and fsyncs; on failure they
    /// stay buffered and the file is cut back, for the next flush to write at the same place.
    pub fn flush(&mut self) -> io::Result<usize> {
        self.log.flush()
    }

    /// Takes the buffered records for a write and fsync on another thread
    /// ([`crate::LogWrite::run`]); `None` when none are buffered or a write is under way.
    pub fn start_write(&mut self) -> io::Result<Option<crate::LogWrite<I::File>>> {
        self.log.start_write()
    }

    /// The write [`Self::start_write`] took, back with its result: the records it made
    /// durable, or its error (the records are then buffered again, first in line).
    pub fn end_write(&mut self, write: crate::LogWrite<I::File>) -> io::Result<usize> {
        self.log.end_write(write)
    }

    /// A write [`Self::start_write`] took has not come back.
    pub fn writing(&self) -> bool {
        self.log.writing()
    }

    /// Records on file and buffered.
    pub fn records(&self) -> u64 {
        self.log.records_on_file() + self.log.pending_records() as u64
    }

    /// Replaces the file with one record per device of `devices` and the clock's time: written
    /// to `shard-K.seen.tmp`, fsynced, renamed over the file, the folder fsynced. The buffered
    /// records are dropped: `devices` is the shard's whole current state. A failure before the
    /// rename leaves the old file in place, the buffered records with it; after it (the folder's
    /// sync), the new file is the log and the error is returned for the caller to report.
    pub fn rewrite(
        &mut self,
        io: &I,
        clock_s: u32,
        devices: impl Iterator<Item = (UserId, u32)>,
    ) -> io::Result<()> {
        if self.log.writing() {
            return Err(io::Error::other(
                "a write of the log is under way; rewrite after it comes back",
            ));
        }
        let path = self.log.path().to_path_buf();
        let temporary = temporary_path(&path);
        if io.exists(&temporary) {
            io.remove_file(&temporary)?;
        }
        let mut bytes = encode(None, clock_s).to_vec();
        for (device, seconds) in devices {
            bytes.extend_from_slice(&encode(Some(device), seconds));
        }
        let mut file = io.create(&temporary)?;
        file.write_all_at(&bytes, 0)?;
        file.sync()?;
        io.rename(&temporary, &path)?;
        // Renamed: the file written is the log now (its handle follows it), whatever the
        // folder's sync says; the next flushes go to it.
        self.log.replaced(file, bytes.len() as u64);
        if let Some(folder) = path.parent() {
            io.sync_dir(folder)?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    path.with_extension("seen.tmp")
}

/// Every shard file's records under `DATA/accounts` (none when the folder does not exist).
pub fn load<I: Io>(io: &I, data: &Path) -> Result<LoadedSeen, StoreError> {
    let mut loaded = LoadedSeen::default();
    let mut chunk = vec![0u8; READ_RECORDS * RECORD_BYTES];
    for (_, path) in store_io::shard_files(io, data, FILE_SUFFIX)? {
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        let length = file.size_bytes().map_err(StoreError::io(&path))?;
        let whole = length - length % RECORD_BYTES as u64;
        loaded.torn_bytes += length - whole;
        let mut offset = 0u64;
        while offset < whole {
            let take = (whole - offset).min(chunk.len() as u64) as usize;
            file.read_exact_at(&mut chunk[..take], offset)
                .map_err(StoreError::io(&path))?;
            for record in chunk[..take].chunks_exact(RECORD_BYTES) {
                loaded.records += 1;
                let Some((device, seconds)) = decode(record) else {
                    loaded.damaged += 1;
                    continue;
                };
                loaded.clock_s = loaded.clock_s.max(seconds);
                if let Some(device) = device {
                    let latest = loaded.seen.entry(device).or_insert(seconds);
                    *latest = (*latest).max(seconds);
                }
            }
            offset += take as u64;
        }
    }
    Ok(loaded)
}

fn encode(device: Option<UserId>, seconds: u32) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    if let Some(device) = device {
        record[..16].copy_from_slice(&device.to_bytes());
    }
    record[16..20].copy_from_slice(&seconds.to_le_bytes());
    let crc = crc32c::crc32c(&record[..20]);
    record[20..].copy_from_slice(&crc.to_le_bytes());
    record
}

/// A record's device (`None`: a clock) and time; `None` when its checksum fails.
fn decode(record: &[u8]) -> Option<(Option<UserId>, u32)> {
    let crc = crate::format::le_u32(record, 20);
    if crc32c::crc32c(record.get(..20)?) != crc {
        return None;
    }
    let id: [u8; 16] = record.get(..16)?.try_into().ok()?;
    let device = (id != [0; 16]).then(|| UserId::from_bytes(&id)).flatten();
    if device.is_none() && id != [0; 16] {
        return None; // an id no device has
    }
    Some((device, crate::format::le_u32(record, 16)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FsIo;

    fn user(n: u64) -> UserId {
        UserId::from_halves(n, n).unwrap()
    }

    #[test]
    fn the_latest_time_of_each_device_wins_across_shard_files() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut zero = SeenLog::open(&FsIo, data, 0).unwrap();
        let mut one = SeenLog::open(&FsIo, data, 1).unwrap();
        zero.append(Some(user(1)), 50);
        zero.append(Some(user(2)), 10);
        one.append(Some(user(1)), 40);
        one.append(None, 70);
        assert_eq!(zero.flush().unwrap(), 2);
        assert_eq!(one.flush().unwrap(), 2);
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(loaded.seen, HashMap::from([(user(1), 50), (user(2), 10)]));
        assert_eq!((loaded.clock_s, loaded.records, loaded.damaged), (70, 4, 0));
    }

    #[test]
    fn a_write_taken_elsewhere_lands_behind_the_good_records_and_new_ones_wait_behind_it() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut log = SeenLog::open(&FsIo, data, 0).unwrap();
        log.append(Some(user(1)), 10);
        log.flush().unwrap();
        log.append(Some(user(2)), 20);
        let mut write = log.start_write().unwrap().expect("a record to write");
        assert!(log.start_write().unwrap().is_none(), "one write at a time");
        log.append(Some(user(3)), 30); // buffered behind the write under way
        assert!(log.flush().is_err(), "no flush while a write is under way");
        assert!(
            log.rewrite(&FsIo, 99, std::iter::empty()).is_err(),
            "no rewrite while a write is under way"
        );
        assert_eq!(log.records(), 3, "on file, under way and buffered");
        write.run();
        assert_eq!(log.end_write(write).unwrap(), 1);
        assert!(!log.writing());
        let mut next = log
            .start_write()
            .unwrap()
            .expect("the record buffered meanwhile");
        next.run();
        assert_eq!(log.end_write(next).unwrap(), 1);
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(
            loaded.seen,
            HashMap::from([(user(1), 10), (user(2), 20), (user(3), 30)])
        );
        assert_eq!((loaded.records, loaded.torn_bytes), (3, 0));
    }

    #[test]
    fn a_failed_write_taken_elsewhere_is_buffered_again_first_in_line() {
        use crate::io::{Faults, FaultyIo};
        use std::sync::atomic::Ordering;
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let io = FaultyIo {
            faults: Faults::new(),
        };
        let mut log = SeenLog::open(&io, data, 0).unwrap();
        log.append(Some(user(1)), 10);
        let mut write = log.start_write().unwrap().expect("a record to write");
        log.append(Some(user(1)), 11); // later, so it must stay later on file
        io.faults.fail_next_sync.store(true, Ordering::Relaxed);
        write.run();
        assert!(log.end_write(write).is_err());
        assert_eq!(log.records(), 2, "both buffered");
        let mut again = log.start_write().unwrap().expect("both, in order");
        again.run();
        assert_eq!(log.end_write(again).unwrap(), 2);
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(
            loaded.seen,
            HashMap::from([(user(1), 11)]),
            "the later time wins"
        );
        assert_eq!(
            (loaded.records, loaded.torn_bytes),
            (2, 0),
            "written once, at the cut"
        );
    }

    #[test]
    fn a_rewrite_keeps_one_record_per_device_and_the_clock() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut log = SeenLog::open(&FsIo, data, 0).unwrap();
        for seconds in 0..100 {
            log.append(Some(user(1)), seconds);
        }
        log.flush().unwrap();
        assert_eq!(log.records(), 100);
        log.append(Some(user(3)), 1); // buffered: the rewrite's state replaces it
        log.rewrite(&FsIo, 120, [(user(1), 99), (user(2), 5)].into_iter())
            .unwrap();
        assert_eq!(log.records(), 3);
        log.append(Some(user(2)), 110);
        log.flush().unwrap();
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(loaded.seen, HashMap::from([(user(1), 99), (user(2), 110)]));
        assert_eq!((loaded.clock_s, loaded.records), (120, 4));
        assert!(!temporary_path(log.path()).exists());
    }

    #[test]
    fn a_rewrite_that_fails_leaves_the_old_file_and_the_buffered_records() {
        use crate::io::{Faults, FaultyIo};
        use std::sync::atomic::Ordering;
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let io = FaultyIo {
            faults: Faults::new(),
        };
        let mut log = SeenLog::open(&io, data, 0).unwrap();
        log.append(Some(user(1)), 5);
        log.flush().unwrap();
        log.append(Some(user(2)), 6);
        io.faults.fail_next_rename.store(true, Ordering::Relaxed);
        assert!(log
            .rewrite(&io, 9, [(user(1), 5), (user(2), 6)].into_iter())
            .is_err());
        assert_eq!(log.records(), 2, "the old file and the buffered record");
        log.flush().unwrap();
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(loaded.seen, HashMap::from([(user(1), 5), (user(2), 6)]));
        // A stale temporary file is removed at the next rewrite, which then succeeds.
        log.rewrite(&io, 9, [(user(1), 5), (user(2), 6)].into_iter())
            .unwrap();
        log.append(Some(user(3)), 8);
        log.flush().unwrap();
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(
            loaded.records, 4,
            "the clock, two devices, then the one appended"
        );
        assert_eq!(
            loaded.seen.get(&user(3)),
            Some(&8),
            "written to the new file"
        );
    }

    #[test]
    fn damage_is_skipped_and_a_torn_tail_cut() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut log = SeenLog::open(&FsIo, data, 0).unwrap();
        log.append(Some(user(1)), 5);
        log.append(Some(user(2)), 6);
        log.flush().unwrap();
        let path = log.path().to_path_buf();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        bytes.extend_from_slice(&[9, 9]);
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(&FsIo, data).unwrap();
        assert_eq!(loaded.seen, HashMap::from([(user(2), 6)]));
        assert_eq!((loaded.damaged, loaded.torn_bytes), (1, 2));
        drop(SeenLog::open(&FsIo, data, 0).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * RECORD_BYTES as u64
        );
    }
}
