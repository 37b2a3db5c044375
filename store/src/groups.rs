//! Group metadata on disk: each chat group's name, version and members.
//!
//! `DATA/accounts/shard-K.groups`, written by shard K (the home shard of the groups whose
//! changes it records) and only ever appended to, holds one record per change of a group. A
//! record is a whole snapshot of the group after the change, never a difference, so that no
//! record needs an earlier one: after a restart with another shard count a group's later
//! records go to another shard's file, and its older ones stay where they were. Layout, every
//! integer little-endian (`n` = `name_len`, `m` = `member_count`):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | `len`: bytes of the payload (from byte 4 up to the checksum), u32 |
//! | 4..20 | the group's id ([`UserId::to_bytes`]) |
//! | 20..28 | `version`, u64: 1 more at each change of the group |
//! | 28..36 | `wall_ms`: when the change was made, Unix-epoch milliseconds, u64 |
//! | 36 | `name_len`: bytes of the name, u8, at most [`NAME_BYTES_MAX`] |
//! | 37..37+n | the name, UTF-8 |
//! | 37+n..39+n | `member_count`, u16, at most [`MEMBERS_MAX`]; 0: the group ended |
//! | 39+n..39+n+17m | per member, in the order they joined: its id (16 bytes), then 1 if an admin, 0 if not |
//! | 39+n+17m..43+n+17m | CRC32C of bytes 0..39+n+17m (the length and the payload), u32 |
//!
//! A record is 43 bytes (an ended group without a name) to [`RECORD_BYTES_MAX`] (17,551).
//!
//! Every shard file is read at process start by [`load`], which keeps per group the record with
//! the highest version, whichever file holds it (the files of shards that no longer exist are
//! read too), and leaves out the groups whose latest snapshot has no members. Such a snapshot
//! is never dropped from its file: it is what overrides the group's older snapshots in the
//! other files.
//!
//! Writing ([`GroupLog`]) works as [`crate::devices::DeviceLog`] does: a buffered append, one
//! positioned write and an fsync per flush, the file cut back when either fails. Records vary
//! in length, so damage is told apart as [`crate::privacy`] does it: [`GroupLog::open`] and
//! [`load`] walk the records by their lengths, and where a record is not valid they search
//! byte by byte for the next valid one (the length may be the damaged part).
//! - Nothing valid after it (a partial record, zeros, a whole record whose bytes did not all
//!   land): a write torn by a crash. [`load`] ignores it, [`GroupLog::open`] cuts it off and
//!   fsyncs the cut. No caller relied on it: its flush had not returned.
//! - A valid record after it: not skipped. [`load`] and [`GroupLog::open`] fail with
//!   [`StoreError::Corrupt`], naming the file, the byte offset and what is wrong.
//!
//! Nothing compacts a file: it grows by one snapshot per change until the operator moves it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::user::USER_ID_BYTES;
use hop_protocol::UserId;

use crate::format::{le_u32, le_u64};
use crate::io::{self as store_io, Io, IoFile};
use crate::varlog::{self, id_at, Event, RecordFormat, Scanned, READ_BYTES};
use crate::StoreError;

/// Bytes of UTF-8 a group's name holds at most (the protocol's limit).
pub const NAME_BYTES_MAX: usize = hop_protocol::wire::GROUP_NAME_BYTES_MAX;
/// Members a group has at most (the protocol's limit).
pub const MEMBERS_MAX: usize = hop_protocol::wire::GROUP_MEMBERS_MAX;
/// Bytes of the largest record (1,024 members, a 100-byte name): the reader takes a length
/// above it for damage.
pub const RECORD_BYTES_MAX: usize = LEN_BYTES + PAYLOAD_BYTES_MAX + CRC_BYTES;

const LEN_BYTES: usize = 4;
const CRC_BYTES: usize = 4;
/// A member's id and its admin flag.
const MEMBER_BYTES: usize = USER_ID_BYTES + 1;
/// Payload bytes besides the name and the members: group, version, `wall_ms`, `name_len`,
/// `member_count`.
const PAYLOAD_FIXED_BYTES: usize = USER_ID_BYTES + 8 + 8 + 1 + 2;
const PAYLOAD_BYTES_MAX: usize = PAYLOAD_FIXED_BYTES + NAME_BYTES_MAX + MEMBER_BYTES * MEMBERS_MAX;
/// Payload offsets of the fields after the group id.
const VERSION_AT: usize = USER_ID_BYTES;
const WALL_MS_AT: usize = VERSION_AT + 8;
const NAME_LEN_AT: usize = WALL_MS_AT + 8;
const NAME_AT: usize = NAME_LEN_AT + 1;

const FILE_SUFFIX: &str = ".groups";

const _: () = assert!(
    PAYLOAD_FIXED_BYTES == 35,
    "the module doc gives 43-byte records"
);
const _: () = assert!(
    RECORD_BYTES_MAX == 17_551,
    "the module doc gives 17,551 bytes"
);
const _: () = assert!(NAME_BYTES_MAX <= u8::MAX as usize, "name_len is a u8");
const _: () = assert!(MEMBERS_MAX <= u16::MAX as usize, "member_count is a u16");
const _: () = assert!(READ_BYTES >= RECORD_BYTES_MAX, "a read holds any record");

/// A group as it was after one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub group: UserId,
    pub version: u64,
    /// Unix-epoch milliseconds of the change.
    pub wall_ms: u64,
    pub name: String,
    /// In the order they joined; `true`: an admin. Empty: the group ended.
    pub members: Vec<(UserId, bool)>,
}

/// One shard's writer of group snapshots. Owned by the shard's thread.
#[derive(Debug)]
pub struct GroupLog<I: Io> {
    file: I::File,
    path: PathBuf,
    /// Length of the records on file, whole and fsynced: the next write goes here.
    good_bytes: u64,
    /// Encoded records appended and not yet flushed, in append order.
    pending: Vec<u8>,
    pending_records: usize,
}

impl<I: Io> GroupLog<I> {
    /// Opens (or creates) `DATA/accounts/shard-K.groups`; a torn tail is cut off.
    ///
    /// Reads the whole file to find where its valid records end (they vary in length). A
    /// damaged record with a valid one after it fails the open with [`StoreError::Corrupt`],
    /// as [`load`] does.
    pub fn open(io: &I, data: &Path, shard: u16) -> Result<Self, StoreError> {
        let (mut file, path) = store_io::open_shard_log(io, data, shard, FILE_SUFFIX)?;
        let scanned = scan(&file, &path, |_| {})?;
        if scanned.torn_bytes > 0 {
            file.truncate(scanned.valid_end)
                .map_err(StoreError::io(&path))?;
            file.sync().map_err(StoreError::io(&path))?;
        }
        Ok(Self {
            file,
            path,
            good_bytes: scanned.valid_end,
            pending: Vec::new(),
            pending_records: 0,
        })
    }

    /// Buffers a record; [`GroupLog::flush`] makes it durable.
    ///
    /// The caller keeps the limits: a name of at most [`NAME_BYTES_MAX`] bytes and at most
    /// [`MEMBERS_MAX`] members (it checks what a client sent before it gets here). Nothing is
    /// clamped and only debug builds assert it; a record over them would be written with
    /// lengths that disagree, and read back as damage.
    pub fn append(&mut self, record: &GroupRecord) {
        encode(&mut self.pending, record);
        self.pending_records += 1;
    }

    /// Writes the buffered records at the end of the good ones and fsyncs; returns how many
    /// records were written (0 when none were buffered). On failure they stay buffered and the
    /// file is cut back, for the next flush to write at the same place.
    pub fn flush(&mut self) -> io::Result<usize> {
        varlog::flush_pending(
            &mut self.file,
            &mut self.good_bytes,
            &mut self.pending,
            &mut self.pending_records,
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The latest snapshot of every group that has not ended, over every shard file (none when
/// `DATA/accounts` does not exist), sorted by group id. The latest is the one with the highest
/// version; at equal versions (which one writer never makes) the later record in file order,
/// files in shard order. Torn tails are ignored (each file's shard cuts its own when it opens
/// its [`GroupLog`]); a damaged record with a valid one after it fails the load with
/// [`StoreError::Corrupt`].
pub fn load<I: Io>(io: &I, data: &Path) -> Result<Vec<GroupRecord>, StoreError> {
    let mut latest: HashMap<UserId, GroupRecord> = HashMap::new();
    for (_, path) in shard_files(io, data)? {
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        scan(&file, &path, |record| match latest.entry(record.group) {
            Entry::Vacant(entry) => {
                entry.insert(record);
            }
            Entry::Occupied(mut entry) => {
                if record.version >= entry.get().version {
                    entry.insert(record);
                }
            }
        })?;
    }
    let mut groups: Vec<GroupRecord> = latest
        .into_values()
        .filter(|record| !record.members.is_empty())
        .collect();
    groups.sort_unstable_by_key(|record| record.group);
    Ok(groups)
}

// ---- helpers ----

/// The `shard-K.groups` files under `DATA/accounts`, by shard number.
fn shard_files<I: Io>(io: &I, data: &Path) -> Result<Vec<(u16, PathBuf)>, StoreError> {
    varlog::shard_files(io, data, FILE_SUFFIX)
}

fn encode(out: &mut Vec<u8>, record: &GroupRecord) {
    debug_assert!(
        record.name.len() <= NAME_BYTES_MAX,
        "a name of {} bytes, at most {NAME_BYTES_MAX}",
        record.name.len()
    );
    debug_assert!(
        record.members.len() <= MEMBERS_MAX,
        "{} members, at most {MEMBERS_MAX}",
        record.members.len()
    );
    let start = out.len();
    let payload_bytes =
        PAYLOAD_FIXED_BYTES + record.name.len() + MEMBER_BYTES * record.members.len();
    out.reserve(LEN_BYTES + payload_bytes + CRC_BYTES);
    out.extend_from_slice(&(payload_bytes as u32).to_le_bytes());
    out.extend_from_slice(&record.group.to_bytes());
    out.extend_from_slice(&record.version.to_le_bytes());
    out.extend_from_slice(&record.wall_ms.to_le_bytes());
    out.push(record.name.len() as u8);
    out.extend_from_slice(record.name.as_bytes());
    out.extend_from_slice(&(record.members.len() as u16).to_le_bytes());
    for &(account, admin) in &record.members {
        out.extend_from_slice(&account.to_bytes());
        out.push(u8::from(admin));
    }
    let checksum = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&checksum.to_le_bytes());
}

/// Checks a whole record (length and checksum included) and decodes it; the error says what
/// is wrong.
fn parse(record: &[u8]) -> Result<GroupRecord, &'static str> {
    if record.len() < LEN_BYTES + PAYLOAD_FIXED_BYTES + CRC_BYTES {
        return Err("it is shorter than any record");
    }
    let payload_bytes = le_u32(record, 0) as usize;
    if record.len() != LEN_BYTES + payload_bytes + CRC_BYTES {
        return Err("its length disagrees with its size");
    }
    let checksum_at = record.len() - CRC_BYTES;
    if crc32c::crc32c(&record[..checksum_at]) != le_u32(record, checksum_at) {
        return Err("its checksum fails");
    }
    let payload = &record[LEN_BYTES..checksum_at];
    let group = id_at(payload).ok_or("its group id is not a valid id")?;
    let name_bytes = usize::from(payload[NAME_LEN_AT]);
    if name_bytes > NAME_BYTES_MAX {
        return Err("its name is longer than 100 bytes");
    }
    if payload_bytes < PAYLOAD_FIXED_BYTES + name_bytes {
        return Err("its name runs past its length");
    }
    let name = std::str::from_utf8(&payload[NAME_AT..NAME_AT + name_bytes])
        .map_err(|_| "its name is not UTF-8")?;
    let count_at = NAME_AT + name_bytes;
    let count = usize::from(u16::from_le_bytes([
        payload[count_at],
        payload[count_at + 1],
    ]));
    if count > MEMBERS_MAX {
        return Err("it names more than 1,024 members");
    }
    if payload_bytes != PAYLOAD_FIXED_BYTES + name_bytes + MEMBER_BYTES * count {
        return Err("its member count disagrees with its length");
    }
    let mut members = Vec::with_capacity(count);
    for member in payload[count_at + 2..].chunks_exact(MEMBER_BYTES) {
        let account = id_at(member).ok_or("one of its member ids is not a valid id")?;
        let admin = match member[USER_ID_BYTES] {
            0 => false,
            1 => true,
            _ => return Err("one of its admin flags is not 0 or 1"),
        };
        members.push((account, admin));
    }
    Ok(GroupRecord {
        group,
        version: le_u64(payload, VERSION_AT),
        wall_ms: le_u64(payload, WALL_MS_AT),
        name: name.to_owned(),
        members,
    })
}

fn corrupt(path: &Path, offset: u64, reason: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: format!(
            "the group record there is damaged ({reason}) and a valid record follows it, so it \
             is not a write torn by a crash"
        ),
        repair: format!(
            "stop hopd, move {} aside and start again: the groups in it are lost (a group that \
             also has snapshots in another shard's file goes back to the latest of those, with \
             its members as they were then)",
            path.display()
        ),
    }
}

/// The layout of a `shard-K.groups` file's records, for [`varlog::scan`].
enum GroupFile {}

impl RecordFormat for GroupFile {
    type Record<'a> = GroupRecord;
    const HEAD_BYTES: usize = LEN_BYTES;
    const SMALLEST_BYTES: usize = LEN_BYTES + PAYLOAD_FIXED_BYTES + CRC_BYTES;
    const HEAD_PAST_END: &'static str = "its length runs past the end of the file";

    fn record_bytes(head: &[u8]) -> Result<usize, &'static str> {
        let payload_bytes = le_u32(head, 0) as usize;
        if payload_bytes < PAYLOAD_FIXED_BYTES {
            return Err("its length is below the smallest record's");
        }
        if payload_bytes > PAYLOAD_BYTES_MAX {
            return Err("its length is above the largest record's");
        }
        Ok(LEN_BYTES + payload_bytes + CRC_BYTES)
    }

    fn parse(record: &[u8]) -> Result<GroupRecord, &'static str> {
        parse(record)
    }
}

/// Walks the file record by record, calling `on_record` for each valid one in file order.
/// Where a record is not valid, the next valid one is searched for byte by byte: when there is
/// one, the scan fails with [`StoreError::Corrupt`]; when there is none, the rest of the file is
/// a torn tail ([`varlog::scan`]).
fn scan<F: IoFile>(
    file: &F,
    path: &Path,
    mut on_record: impl FnMut(GroupRecord),
) -> Result<Scanned, StoreError> {
    varlog::scan::<GroupFile, F>(file, path, |event| match event {
        Event::Record { record, .. } => {
            on_record(record);
            Ok(())
        }
        Event::Damaged { offset, reason } => Err(corrupt(path, offset, reason)),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::io::{Faults, FaultyIo, FsIo};

    fn user(n: u64) -> UserId {
        UserId::from_halves(0xA0 + n, n).unwrap()
    }

    /// Group `id` at `version`, named after it, with `members` as (user number, admin).
    fn group(id: u64, version: u64, members: &[(u64, bool)]) -> GroupRecord {
        GroupRecord {
            group: user(id),
            version,
            wall_ms: 1_000 + version,
            name: format!("group {id}"),
            members: members
                .iter()
                .map(|&(member, admin)| (user(member), admin))
                .collect(),
        }
    }

    fn encoded(records: &[GroupRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        for record in records {
            encode(&mut out, record);
        }
        out
    }

    fn write(data: &Path, shard: u16, records: &[GroupRecord]) -> PathBuf {
        let mut log = GroupLog::open(&FsIo, data, shard).unwrap();
        for record in records {
            log.append(record);
        }
        assert_eq!(log.flush().unwrap(), records.len());
        log.path().to_path_buf()
    }

    #[test]
    fn the_latest_version_of_each_group_wins_across_shard_files_and_an_ended_group_is_left_out() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        write(
            data,
            0,
            &[
                group(1, 1, &[(10, true), (11, false)]),
                group(3, 1, &[(10, true)]),
                group(4, 5, &[(12, true)]),
            ],
        );
        write(
            data,
            1,
            &[
                group(1, 2, &[(10, true)]),
                group(2, 3, &[(11, true), (10, false)]),
                group(3, 2, &[]),
                group(4, 4, &[(13, true)]),
            ],
        );
        assert_eq!(
            load(&FsIo, data).unwrap(),
            vec![
                group(1, 2, &[(10, true)]),
                group(2, 3, &[(11, true), (10, false)]),
                group(4, 5, &[(12, true)]),
            ],
            "the highest version wins, in whichever file; group 3 ended"
        );
    }

    #[test]
    fn a_torn_tail_is_ignored_by_load_and_cut_by_open() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let durable = [group(1, 1, &[(10, true)]), group(2, 1, &[(11, true)])];
        let path = write(data, 0, &durable);
        let good = encoded(&durable);
        let next = encoded(&[group(1, 2, &[(10, true), (11, false)])]);
        let mut whole_but_damaged = next.clone();
        *whole_but_damaged.last_mut().unwrap() ^= 1;
        for tail in [&next[..3], &next[..20], &whole_but_damaged[..]] {
            let mut bytes = good.clone();
            bytes.extend_from_slice(tail);
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(load(&FsIo, data).unwrap(), durable, "torn bytes ignored");
            drop(GroupLog::open(&FsIo, data, 0).unwrap());
            assert_eq!(std::fs::read(&path).unwrap(), good, "cut by open");
        }
        let mut log = GroupLog::open(&FsIo, data, 0).unwrap();
        log.append(&group(1, 2, &[(10, true), (11, false)]));
        assert_eq!(log.flush().unwrap(), 1);
        assert_eq!(
            load(&FsIo, data).unwrap(),
            vec![
                group(1, 2, &[(10, true), (11, false)]),
                group(2, 1, &[(11, true)])
            ]
        );
    }

    #[test]
    fn a_flipped_byte_in_a_record_with_one_after_it_stops_load_and_open_naming_the_offset() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let records = [
            group(1, 1, &[(10, true)]),
            group(1, 2, &[(10, true), (11, false)]),
            group(1, 3, &[(11, true)]),
        ];
        let path = write(data, 0, &records);
        let second_at = encoded(&records[..1]).len();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[second_at + 30] ^= 1; // in its wall_ms
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&FsIo, data).unwrap_err().to_string();
        assert!(
            error.contains("checksum")
                && error.contains(&format!("byte {second_at}:"))
                && error.contains(&path.display().to_string()),
            "{error}"
        );
        let error = GroupLog::open(&FsIo, data, 0).unwrap_err().to_string();
        assert!(error.contains(&format!("byte {second_at}:")), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "open cut nothing");
    }

    #[test]
    fn the_largest_record_round_trips_and_is_record_bytes_max_long() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let largest = GroupRecord {
            group: user(1),
            version: u64::MAX,
            wall_ms: 1_700_000_000_000,
            name: "é".repeat(NAME_BYTES_MAX / 2),
            members: (0..MEMBERS_MAX as u64)
                .map(|n| (user(100 + n), n % 3 == 0))
                .collect(),
        };
        assert_eq!(largest.name.len(), NAME_BYTES_MAX);
        assert_eq!(
            encoded(std::slice::from_ref(&largest)).len(),
            RECORD_BYTES_MAX
        );
        let path = write(data, 0, std::slice::from_ref(&largest));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            RECORD_BYTES_MAX as u64
        );
        assert_eq!(load(&FsIo, data).unwrap(), vec![largest]);
    }

    #[test]
    fn values_outside_the_limits_are_damage_even_with_a_good_checksum() {
        let reseal = |record: &mut Vec<u8>| {
            let at = record.len() - CRC_BYTES;
            let checksum = crc32c::crc32c(&record[..at]);
            record[at..].copy_from_slice(&checksum.to_le_bytes());
        };
        let one = || group(1, 1, &[(10, true)]); // name "group 1": 7 bytes
        let name_at = LEN_BYTES + NAME_AT;
        let count_at = name_at + 7;

        let mut record = encoded(&[one()]);
        record[count_at + 2 + USER_ID_BYTES] = 2;
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("one of its admin flags is not 0 or 1")
        );

        let mut record = encoded(&[one()]);
        record[name_at] = 0xFF;
        reseal(&mut record);
        assert_eq!(parse(&record).err(), Some("its name is not UTF-8"));

        let mut record = encoded(&[one()]);
        record[count_at..count_at + 2].copy_from_slice(&0u16.to_le_bytes());
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("its member count disagrees with its length")
        );

        let mut record = encoded(&[one()]);
        record[count_at + 2..count_at + 10].fill(0); // a member whose high half is zero
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("one of its member ids is not a valid id")
        );

        let mut record = encoded(&[one()]);
        record[LEN_BYTES..LEN_BYTES + 8].fill(0);
        reseal(&mut record);
        assert_eq!(parse(&record).err(), Some("its group id is not a valid id"));

        let mut record = encoded(&[one()]);
        record[LEN_BYTES + NAME_LEN_AT] = NAME_BYTES_MAX as u8 + 1;
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("its name is longer than 100 bytes")
        );

        // A length above the largest record's, with a valid record after it: damage.
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let path = write(data, 0, &[one(), one()]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..4].copy_from_slice(&(RECORD_BYTES_MAX as u32).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let error = load(&FsIo, data).unwrap_err().to_string();
        assert!(
            error.contains("above the largest record's") && error.contains("byte 0:"),
            "{error}"
        );
    }

    #[test]
    fn a_failed_flush_leaves_the_file_as_it_was_and_the_retry_writes_each_record_once() {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path();
        let faults = Faults::new();
        let io = FaultyIo {
            faults: faults.clone(),
        };
        let records = [
            group(1, 1, &[(10, true)]),
            group(1, 2, &[(10, true), (11, false)]),
            group(1, 3, &[(10, true), (11, true)]),
        ];
        let mut log = GroupLog::open(&io, data, 0).unwrap();
        log.append(&records[0]);
        assert_eq!(log.flush().unwrap(), 1);
        let length = |log: &GroupLog<FaultyIo>| std::fs::metadata(log.path()).unwrap().len();

        // The write fails outright (ENOSPC).
        log.append(&records[1]);
        faults.fail_next_write.store(true, Ordering::Relaxed);
        log.flush().unwrap_err();
        assert_eq!(length(&log), encoded(&records[..1]).len() as u64);
        assert_eq!(log.flush().unwrap(), 1);

        // The write lands but its fsync fails (EIO): the file is cut back.
        log.append(&records[2]);
        faults.fail_next_sync.store(true, Ordering::Relaxed);
        log.flush().unwrap_err();
        assert_eq!(length(&log), encoded(&records[..2]).len() as u64);
        assert_eq!(log.flush().unwrap(), 1);
        assert_eq!(log.flush().unwrap(), 0, "nothing left");

        assert_eq!(std::fs::read(log.path()).unwrap(), encoded(&records));
        assert_eq!(load(&FsIo, data).unwrap(), vec![records[2].clone()]);
    }
}
