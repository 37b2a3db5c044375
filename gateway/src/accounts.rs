//! Account bindings on disk: which static key owns which user id.
//!
//! `DATA/accounts/shard-K.bin` is an append-only file of 44-byte records, written by shard K
//! only: user id (u64 little-endian), public key (32 bytes), CRC32C of those 40 bytes (u32
//! little-endian). Every shard reads every file at start and keeps the bindings of its own
//! users, so a restart with another shard count finds every binding. A torn last record is
//! cut off when the shard opens its file (so later records stay aligned); a record with a bad
//! checksum is skipped and counted.
//!
//! New bindings are written in groups: [`AccountLog::append`] buffers, [`AccountLog::flush`]
//! writes and fsyncs once for all of them. The shard flushes before every commit of its
//! offline queue, so no item kept on disk outlives its user's binding; a crash can forget only
//! the bindings of the last loop turn, whose users bind again when they next connect.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hop_protocol::keys::KEY_BYTES;
use hop_protocol::UserId;
use tracing::warn;

const RECORD_BYTES: usize = 8 + KEY_BYTES + 4;

/// What loading found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub bindings: Vec<(UserId, [u8; KEY_BYTES])>,
    pub corrupt_records: usize,
    pub torn_bytes: usize,
}

/// One shard's writer of new bindings.
#[derive(Debug)]
pub struct AccountLog {
    file: File,
    path: PathBuf,
    /// Records appended and not yet written.
    pending: Vec<u8>,
}

pub fn folder(data: &Path) -> PathBuf {
    data.join("accounts")
}

impl AccountLog {
    pub fn open(data: &Path, shard: u16) -> io::Result<Self> {
        let folder = folder(data);
        fs::create_dir_all(&folder)?;
        let path = folder.join(format!("shard-{shard}.bin"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A record torn by a crash would shift every later record out of alignment.
        let length = file.metadata()?.len();
        let torn = length % RECORD_BYTES as u64;
        if torn > 0 {
            warn!(path = %path.display(), torn_bytes = torn, "cutting off a torn account record");
            file.set_len(length - torn)?;
            file.sync_data()?;
        }
        Ok(Self {
            file,
            path,
            pending: Vec::new(),
        })
    }

    /// Buffers a binding; [`AccountLog::flush`] makes it durable.
    pub fn append(&mut self, user: UserId, key: &[u8; KEY_BYTES]) {
        self.pending.extend_from_slice(&encode(user, key));
    }

    /// Writes and fsyncs the buffered bindings (nothing to do if none). On failure they stay
    /// buffered for the next call.
    pub fn flush(&mut self) -> io::Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        // Whole records only: a failed write leaves at most a torn record, which the next
        // open cuts off; the buffered records are written again.
        self.file.write_all(&self.pending)?;
        self.file.sync_data()?;
        let records = self.pending.len() / RECORD_BYTES;
        self.pending.clear();
        Ok(records)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the bindings of every shard file under `DATA/accounts`.
pub fn load(data: &Path) -> io::Result<Loaded> {
    let mut loaded = Loaded::default();
    let folder = folder(data);
    let entries = match fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(loaded),
        Err(error) => return Err(error),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    paths.sort();
    for path in paths {
        let bytes = fs::read(&path)?;
        let before = loaded.corrupt_records;
        decode_into(&bytes, &mut loaded);
        if loaded.corrupt_records > before {
            warn!(path = %path.display(), corrupt = loaded.corrupt_records - before, "skipped corrupt account records");
        }
    }
    Ok(loaded)
}

fn encode(user: UserId, key: &[u8; KEY_BYTES]) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    record[..8].copy_from_slice(&user.get().to_le_bytes());
    record[8..8 + KEY_BYTES].copy_from_slice(key);
    let checksum = crc32c::crc32c(&record[..8 + KEY_BYTES]);
    record[8 + KEY_BYTES..].copy_from_slice(&checksum.to_le_bytes());
    record
}

fn decode_into(bytes: &[u8], loaded: &mut Loaded) {
    let mut records = bytes.chunks_exact(RECORD_BYTES);
    for record in &mut records {
        let body = &record[..8 + KEY_BYTES];
        let stored = u32::from_le_bytes(record[8 + KEY_BYTES..].try_into().expect("4 bytes"));
        let raw_user = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        match (crc32c::crc32c(body) == stored, UserId::new(raw_user)) {
            (true, Some(user)) => {
                let key: [u8; KEY_BYTES] = body[8..].try_into().expect("32 bytes");
                loaded.bindings.push((user, key));
            }
            _ => loaded.corrupt_records += 1,
        }
    }
    loaded.torn_bytes += records.remainder().len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hop-accounts-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn bindings_survive_and_are_read_from_every_shard_file() {
        let data = temp("round-trip");
        let alice = UserId::new(11).unwrap();
        let bob = UserId::new(22).unwrap();
        let mut first = AccountLog::open(&data, 0).unwrap();
        first.append(alice, &[1; 32]);
        assert_eq!(load(&data).unwrap().bindings, [], "buffered until flushed");
        assert_eq!(first.flush().unwrap(), 1);
        let mut second = AccountLog::open(&data, 1).unwrap();
        second.append(bob, &[2; 32]);
        second.flush().unwrap();
        let loaded = load(&data).unwrap();
        assert_eq!(loaded.bindings, vec![(alice, [1; 32]), (bob, [2; 32])]);
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn torn_tail_and_flipped_bits_are_survived() {
        let data = temp("damage");
        let mut log = AccountLog::open(&data, 0).unwrap();
        for raw in 1..=3 {
            log.append(UserId::new(raw).unwrap(), &[raw as u8; 32]);
        }
        assert_eq!(log.flush().unwrap(), 3);
        let path = log.path().to_path_buf();
        drop(log);
        let mut bytes = fs::read(&path).unwrap();
        bytes[RECORD_BYTES + 10] ^= 0x40; // the second record's key
        bytes.extend_from_slice(&[9, 9, 9]); // a torn fourth record
        fs::write(&path, &bytes).unwrap();
        let loaded = load(&data).unwrap();
        let users: Vec<u64> = loaded.bindings.iter().map(|(user, _)| user.get()).collect();
        assert_eq!(users, [1, 3]);
        assert_eq!((loaded.corrupt_records, loaded.torn_bytes), (1, 3));
        fs::remove_dir_all(&data).unwrap();
    }

    /// Guards against a torn record shifting the records appended after it out of alignment.
    #[test]
    fn a_torn_tail_is_cut_off_before_new_records_are_appended() {
        let data = temp("torn-then-append");
        let mut log = AccountLog::open(&data, 0).unwrap();
        log.append(UserId::new(1).unwrap(), &[1; 32]);
        log.flush().unwrap();
        let path = log.path().to_path_buf();
        drop(log);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&[7; 20]); // half a record, as a crash may leave
        fs::write(&path, &bytes).unwrap();
        let mut log = AccountLog::open(&data, 0).unwrap();
        log.append(UserId::new(2).unwrap(), &[2; 32]);
        log.flush().unwrap();
        let loaded = load(&data).unwrap();
        let users: Vec<u64> = loaded.bindings.iter().map(|(user, _)| user.get()).collect();
        assert_eq!(users, [1, 2]);
        assert_eq!((loaded.corrupt_records, loaded.torn_bytes), (0, 0));
        fs::remove_dir_all(&data).unwrap();
    }

    #[test]
    fn no_folder_means_no_bindings() {
        assert_eq!(load(&temp("empty")).unwrap(), Loaded::default());
    }
}
