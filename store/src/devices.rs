//! Device links on disk: which companion devices belong to which account.
//!
//! `DATA/accounts/shard-K.devices`, written by shard K (the home shard of the accounts whose
//! links it records) and only ever appended to, is a row of 45-byte records:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0 | 1: the device was linked to the account, 0: it was removed from it |
//! | 1..17 | the account (its primary device's user id, big-endian halves) |
//! | 17..33 | the device's user id |
//! | 33..41 | when, Unix-epoch milliseconds, u64 little-endian |
//! | 41..45 | CRC32C of bytes 0..41, u32 little-endian |
//!
//! Every shard file is read at process start by [`load`], and the records are replayed in the
//! order they were made (by time, then file order), so a restart with another shard count
//! needs no rewrite. Writing ([`DeviceLog`]) works as [`crate::accounts::AccountLog`] does: a
//! buffered append, one positioned write and an fsync per flush, a torn tail cut at open. A
//! record whose checksum fails stops the start, naming the file and offset.

use std::io;
use std::path::Path;

use hop_protocol::UserId;

use crate::fixedlog::FixedLog;
use crate::io::{self as store_io, Io, IoFile};
use crate::StoreError;

/// Bytes of one record.
pub const RECORD_BYTES: usize = 45;

const FILE_SUFFIX: &str = ".devices";

/// One link or unlink, as made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRecord {
    pub linked: bool,
    pub account: UserId,
    pub device: UserId,
    pub wall_ms: u64,
}

/// One shard's writer of device links. Owned by the shard's thread.
#[derive(Debug)]
pub struct DeviceLog<I: Io> {
    log: FixedLog<I::File>,
}

impl<I: Io> DeviceLog<I> {
    /// Opens (or creates) `DATA/accounts/shard-K.devices`; a torn tail is cut off.
    pub fn open(io: &I, data: &Path, shard: u16) -> Result<Self, StoreError> {
        let (file, path) = store_io::open_shard_log(io, data, shard, FILE_SUFFIX)?;
        let (log, _) = FixedLog::new(file, path, RECORD_BYTES)?;
        Ok(Self { log })
    }

    /// Buffers a record; [`DeviceLog::flush`] makes it durable.
    pub fn append(&mut self, record: &DeviceRecord) {
        self.log.push(&encode(record));
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

    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

/// Every record of every shard file, in the order they were made (by time; a tie keeps file
/// order, shard 0 first). Bytes after the last whole record of a file are ignored (the file's
/// shard cuts them when it opens its log).
pub fn load<I: Io>(io: &I, data: &Path) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut records = Vec::new();
    for (_, path) in store_io::shard_files(io, data, FILE_SUFFIX)? {
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        let length = file.size_bytes().map_err(StoreError::io(&path))?;
        let whole = (length - length % RECORD_BYTES as u64) as usize;
        let mut bytes = vec![0u8; whole];
        file.read_exact_at(&mut bytes, 0)
            .map_err(StoreError::io(&path))?;
        for (index, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let decoded = decode(record).ok_or_else(|| StoreError::Corrupt {
                path: path.clone(),
                offset: (index * RECORD_BYTES) as u64,
                reason: format!(
                    "the device record ({RECORD_BYTES} bytes) there fails its checksum"
                ),
                repair: format!(
                    "stop hopd, move {} aside and start again: the device links in it are lost \
                     (each account's primary links its devices again)",
                    path.display()
                ),
            })?;
            records.push(decoded);
        }
    }
    records.sort_by_key(|record| record.wall_ms);
    Ok(records)
}

fn encode(record: &DeviceRecord) -> [u8; RECORD_BYTES] {
    let mut bytes = [0u8; RECORD_BYTES];
    bytes[0] = u8::from(record.linked);
    bytes[1..17].copy_from_slice(&record.account.to_bytes());
    bytes[17..33].copy_from_slice(&record.device.to_bytes());
    bytes[33..41].copy_from_slice(&record.wall_ms.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..41]);
    bytes[41..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<DeviceRecord> {
    let crc = u32::from_le_bytes(bytes.get(41..45)?.try_into().ok()?);
    if crc32c::crc32c(bytes.get(..41)?) != crc || bytes[0] > 1 {
        return None;
    }
    Some(DeviceRecord {
        linked: bytes[0] == 1,
        account: UserId::from_bytes(bytes.get(1..17)?.try_into().ok()?)?,
        device: UserId::from_bytes(bytes.get(17..33)?.try_into().ok()?)?,
        wall_ms: u64::from_le_bytes(bytes.get(33..41)?.try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FsIo;

    fn user(n: u64) -> UserId {
        UserId::from_halves(n, n).unwrap()
    }

    #[test]
    fn links_come_back_in_the_order_they_were_made_across_shard_files() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut zero = DeviceLog::open(&FsIo, data, 0).unwrap();
        let mut one = DeviceLog::open(&FsIo, data, 1).unwrap();
        let link = |linked, account, device, wall_ms| DeviceRecord {
            linked,
            account: user(account),
            device: user(device),
            wall_ms,
        };
        one.append(&link(true, 1, 2, 10));
        zero.append(&link(false, 1, 2, 20));
        zero.append(&link(true, 3, 4, 5));
        assert_eq!(one.flush().unwrap(), 1);
        assert_eq!(zero.flush().unwrap(), 2);
        assert_eq!(
            load(&FsIo, data).unwrap(),
            vec![
                link(true, 3, 4, 5),
                link(true, 1, 2, 10),
                link(false, 1, 2, 20)
            ]
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_bad_checksum_stops_the_load() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let mut log = DeviceLog::open(&FsIo, data, 0).unwrap();
        log.append(&DeviceRecord {
            linked: true,
            account: user(1),
            device: user(2),
            wall_ms: 7,
        });
        log.flush().unwrap();
        let path = log.path().to_path_buf();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(load(&FsIo, data).unwrap().len(), 1, "torn bytes ignored");
        drop(DeviceLog::open(&FsIo, data, 0).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD_BYTES as u64);
        bytes.truncate(RECORD_BYTES);
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&FsIo, data).unwrap_err().to_string();
        assert!(
            error.contains("checksum") && error.contains("byte 0"),
            "{error}"
        );
    }
}
