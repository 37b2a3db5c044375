//! Account bindings on disk: which static public key each user id belongs to.
//!
//! `DATA/accounts/shard-K.keys`, written by shard K only and only ever appended to, is a row of
//! 36-byte records. A binding is the client's static public key (32 bytes), then the CRC32C of
//! those 32 bytes (u32 little-endian); the user id is not stored: it is
//! [`UserId::from_public_key`] of the key. An unbinding (an account that expired,
//! [`AccountLog::unbind`]) is the user id (16 bytes), [`UNBIND_MARK`] (12 bytes), the
//! account-clock time of the expiry (u32 little-endian, [`crate::seen`]), then the CRC32C of
//! those 32 bytes with every bit inverted. Every shard file is read at process start by
//! [`load`], so a restart with another shard count still finds every binding. Within a file,
//! records apply in order. Across files (a binding written by the shard that was the user's
//! home before the shard count changed, or by its account's shard for a companion) an
//! unbinding ends another file's binding unless the device was seen at or after the unbinding's
//! time: a device seen since connected since, and so was bound again.
//!
//! Writing ([`AccountLog`]): [`AccountLog::append`] buffers, [`AccountLog::flush`] writes all
//! buffered records with one positioned write at the end of the last good record and fsyncs.
//! A failed write or fsync cuts the file back to that end and keeps the records for the next
//! flush, which writes at the same offset again: a retry never lands behind torn bytes.
//!
//! Damage: a length that is not a whole number of records is a write torn by a crash, cut off
//! when the shard opens its file. A record whose checksum fails is not skipped: [`load`] fails
//! naming the file and the offset, and [`repair`] (`hopd admin repair-accounts --data DIR`)
//! rewrites the file without it (and repairs the presence-settings files of the same folder,
//! [`crate::privacy::repair`]). Why dropping a binding loses nothing acked, and the byte
//! layout, are in `store/DESIGN.md` ("Account bindings").

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::keys::KEY_BYTES;
use hop_protocol::UserId;

use crate::fixedlog::FixedLog;
use crate::io::{self as store_io, Io, IoFile};
use crate::StoreError;

/// The folder under `DATA/` that holds the binding files.
pub const FOLDER: &str = "accounts";
/// Bytes of one record: the public key and its CRC32C.
pub const RECORD_BYTES: usize = KEY_BYTES + 4;
/// The admin command that runs [`repair`], as error messages name it.
pub const REPAIR_COMMAND: &str = "hopd admin repair-accounts --data";

/// Records [`load`] and [`repair`] read per read call (144 KiB): memory stays bounded however
/// many bindings a file holds.
const READ_RECORDS: usize = 4096;
/// `shard-K.keys.damaged`, then `.damaged.2` up to this: copies [`repair`] may keep of one file.
const DAMAGED_COPIES_MAX: u32 = 100;

const _: () = assert!(RECORD_BYTES == 36, "store/DESIGN.md gives 36 bytes");
const _: () = assert!(KEY_BYTES == 32);

/// Bytes 16..28 of an unbinding record.
pub const UNBIND_MARK: [u8; 12] = *b"hop unbound\0";

/// The bindings of every shard file, in file order (shard 0 first), without those an
/// unbinding later in that order undid.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub bindings: Vec<(UserId, [u8; KEY_BYTES])>,
    /// Unbinding records read.
    pub unbindings: u64,
    /// Files read.
    pub files: usize,
    /// Bytes after the last whole record of a file: a write torn by a crash. The file's shard
    /// cuts them off when it opens its [`AccountLog`].
    pub torn_bytes: u64,
}

/// What [`AccountLog::open`] found in the shard's file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Whole records in the file (not checked: [`load`] checks them).
    pub records: u64,
    /// A torn tail cut off (0 when the file ended on a record boundary).
    pub torn_bytes_cut: u64,
    /// The file did not exist and was created.
    pub created: bool,
}

/// One shard's writer of new bindings. Owned by the shard's thread.
#[derive(Debug)]
pub struct AccountLog<I: Io> {
    log: FixedLog<I::File>,
    opened: Opened,
}

impl<I: Io> AccountLog<I> {
    /// Opens (or creates) `DATA/accounts/shard-K.keys` for shard `shard`. A torn tail (a
    /// length that is not a multiple of [`RECORD_BYTES`]) is cut off and the cut fsynced, so
    /// that later records stay aligned; [`AccountLog::opened`] tells how many bytes went. A v1
    /// file of this shard (`shard-K.bin`) is refused with [`StoreError::Layout`].
    pub fn open(io: &I, data: &Path, shard: u16) -> Result<Self, StoreError> {
        let folder = folder(data);
        io.create_dir_all(&folder)
            .map_err(StoreError::io(&folder))?;
        let v1 = folder.join(format!("shard-{shard}.bin"));
        if io.exists(&v1) {
            return Err(StoreError::written_by_v1(&v1, data));
        }
        let path = shard_path(data, shard);
        let (file, created) = store_io::open_or_create_log(io, &path, &folder, data)?;
        let (log, torn) = FixedLog::new(file, path, RECORD_BYTES)?;
        let opened = Opened {
            records: log.records_on_file(),
            torn_bytes_cut: torn,
            created,
        };
        Ok(Self { log, opened })
    }

    /// Buffers the binding of `key` (its user id is derived from it); [`AccountLog::flush`]
    /// makes it durable.
    pub fn append(&mut self, key: &[u8; KEY_BYTES]) {
        self.log.push(&encode(key));
    }

    /// Buffers the end of `user`'s binding (its account expired at account-clock time
    /// `seconds`): after the next flush, a restart no longer knows the key, until it binds
    /// again.
    pub fn unbind(&mut self, user: UserId, seconds: u32) {
        self.log.push(&encode_unbind(user, seconds));
    }

    /// Writes every buffered record with one positioned write at the end of the good records,
    /// then fsyncs; returns how many records became durable (0 when none were buffered).
    ///
    /// On failure the records stay buffered and the file is cut back to its good length (best
    /// effort: if that fails too, the next flush still writes at the good length, over the
    /// torn bytes). Call again later to retry.
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

    /// Records appended and not yet durable (they grow while flushes fail).
    pub fn pending_records(&self) -> usize {
        self.log.pending_records()
    }

    /// What opening found.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

/// `DATA/accounts`.
pub fn folder(data: &Path) -> PathBuf {
    data.join(FOLDER)
}

/// `DATA/accounts/shard-K.keys`.
pub fn shard_path(data: &Path, shard: u16) -> PathBuf {
    folder(data).join(format!("shard-{shard}.keys"))
}

/// Reads the bindings of every `shard-K.keys` file under `DATA/accounts` (none when the folder
/// does not exist). Fails with [`StoreError::Corrupt`], naming the file, the byte offset and
/// the repair command, on a record whose checksum fails; with [`StoreError::Layout`] when a
/// v1 file (`shard-K.bin`) is there.
pub fn load<I: Io>(io: &I, data: &Path, seen: &HashMap<UserId, u32>) -> Result<Loaded, StoreError> {
    let mut loaded = Loaded::default();
    // Every binding in load order, with its file; `None` once an unbinding of its own file
    // after it ended it.
    let mut bindings: Vec<Option<(UserId, [u8; KEY_BYTES], usize)>> = Vec::new();
    // Where each user's bindings are in `bindings`, by file: the latest of each file.
    let mut latest: HashMap<(UserId, usize), usize> = HashMap::new();
    // Unbindings: the user, its file, the account-clock time.
    let mut unbindings: Vec<(UserId, usize, u32)> = Vec::new();
    for (file, (shard, path)) in shard_files(io, data)?.into_iter().enumerate() {
        loaded.files += 1;
        let scanned = scan_file(io, &path, |offset, record| match decode(record) {
            Some(Record::Bind(user, key)) => {
                latest.insert((user, file), bindings.len());
                bindings.push(Some((user, key, file)));
                Ok(())
            }
            Some(Record::Unbind(user, seconds)) => {
                loaded.unbindings += 1;
                if let Some(at) = latest.remove(&(user, file)) {
                    bindings[at] = None;
                }
                unbindings.push((user, file, seconds));
                Ok(())
            }
            None => Err(corrupt(data, shard, &path, offset)),
        })?;
        loaded.torn_bytes += scanned.torn_bytes;
    }
    // An unbinding ends the user's bindings in the other files too, unless the device was
    // seen at or after it (then it connected, and was bound, since).
    let mut ended: HashMap<UserId, Vec<usize>> = HashMap::new();
    for (user, file, seconds) in unbindings {
        if seen.get(&user).is_none_or(|seen_s| *seen_s < seconds) {
            ended.entry(user).or_default().push(file);
        }
    }
    let mut kept: HashMap<UserId, usize> = HashMap::new();
    for (at, binding) in bindings.iter().enumerate() {
        let Some((user, _, file)) = binding else {
            continue;
        };
        let ended_elsewhere = ended
            .get(user)
            .is_some_and(|files| files.iter().any(|other| other != file));
        if !ended_elsewhere {
            // A key bound in several files keeps its latest binding.
            kept.insert(*user, at);
        }
    }
    loaded.bindings = bindings
        .into_iter()
        .enumerate()
        .filter_map(|(at, binding)| {
            let (user, key, _) = binding?;
            (kept.get(&user) == Some(&at)).then_some((user, key))
        })
        .collect();
    Ok(loaded)
}

/// What [`repair`] did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairedFile {
    /// The file, rewritten with its valid records only.
    pub path: PathBuf,
    /// The copy of the damaged file, byte for byte.
    pub damaged_copy: PathBuf,
    /// Valid records written back.
    pub kept: u64,
    /// Damaged records left out: for a binding file, records whose checksum failed; for a
    /// presence-settings file, damaged stretches (each one record or more, since a damaged
    /// length hides where the next record starts).
    pub dropped: u64,
    /// Bytes of the damaged records left out.
    pub dropped_bytes: u64,
    /// Bytes after the last whole record, left out.
    pub torn_bytes: u64,
}

/// What [`repair`] (or [`crate::privacy::repair`]) did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Binding files and presence-settings files read.
    pub files_checked: usize,
    /// The files that held a damaged record; the others are untouched.
    pub repaired: Vec<RepairedFile>,
}

/// Rewrites every `shard-K.keys` file that holds a record with a bad checksum, keeping its
/// valid records, then repairs the presence-settings files of the same folder
/// ([`crate::privacy::repair`]): `hopd admin repair-accounts` is one command for both. Run it
/// with hopd stopped. Per damaged file: the file is copied byte for byte
/// to `shard-K.keys.damaged` (or `.damaged.2`, ... when that exists), the valid records are
/// written to `shard-K.keys.tmp`, both are fsynced, and the new file is renamed over the old
/// one, then the folder is fsynced. A crash at any point leaves either the old file or the
/// new one in place (and perhaps a `.tmp`, removed by the next run), so the command can simply
/// be run again. A file whose only damage is a torn tail is left to [`AccountLog::open`],
/// which cuts it.
pub fn repair<I: Io>(io: &I, data: &Path) -> Result<RepairReport, StoreError> {
    let mut report = RepairReport::default();
    let folder = folder(data);
    for (shard, path) in shard_files(io, data)? {
        report.files_checked += 1;
        let temporary = folder.join(format!("shard-{shard}.keys.tmp"));
        if io.exists(&temporary) {
            // Left by a repair that crashed before its rename: the old file is still in place.
            io.remove_file(&temporary)
                .map_err(StoreError::io(&temporary))?;
        }
        let scanned = scan_file(io, &path, |_, _| Ok(()))?;
        if scanned.bad_records == 0 {
            continue;
        }
        let damaged_copy = free_damaged_name(io, &path)?;
        copy_file(io, &path, &damaged_copy, Selection::Whole)?;
        let kept = copy_file(io, &path, &temporary, Selection::ValidRecords)?;
        io.rename(&temporary, &path)
            .map_err(StoreError::io(&path))?;
        io.sync_dir(&folder).map_err(StoreError::io(&folder))?;
        debug_assert_eq!(kept, scanned.records - scanned.bad_records);
        report.repaired.push(RepairedFile {
            path,
            damaged_copy,
            kept,
            dropped: scanned.bad_records,
            dropped_bytes: scanned.bad_records * RECORD_BYTES as u64,
            torn_bytes: scanned.torn_bytes,
        });
    }
    // The presence settings live in the same folder; one command repairs both.
    let privacy = crate::privacy::repair(io, data)?;
    report.files_checked += privacy.files_checked;
    report.repaired.extend(privacy.repaired);
    Ok(report)
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "accounts folder (bindings and presence settings): {} files checked, {} repaired",
            self.files_checked,
            self.repaired.len()
        )?;
        for file in &self.repaired {
            writeln!(
                f,
                "{}: kept {} records, dropped {} damaged ({} bytes; {} torn bytes); the damaged file is kept as {}",
                file.path.display(),
                file.kept,
                file.dropped,
                file.dropped_bytes,
                file.torn_bytes,
                file.damaged_copy.display()
            )?;
            if file.path.extension().is_some_and(|ext| ext == "privacy") {
                writeln!(
                    f,
                    "  users whose presence setting was in the dropped bytes fall back to their \
                     setting in another shard's file, if any, or to the default (visible to \
                     everyone) until they send their settings again"
                )?;
            }
        }
        Ok(())
    }
}

// ---- helpers ----

fn encode(key: &[u8; KEY_BYTES]) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    record[..KEY_BYTES].copy_from_slice(key);
    record[KEY_BYTES..].copy_from_slice(&crc32c::crc32c(key).to_le_bytes());
    record
}

fn encode_unbind(user: UserId, seconds: u32) -> [u8; RECORD_BYTES] {
    let mut record = [0u8; RECORD_BYTES];
    record[..16].copy_from_slice(&user.to_bytes());
    record[16..28].copy_from_slice(&UNBIND_MARK);
    record[28..KEY_BYTES].copy_from_slice(&seconds.to_le_bytes());
    let crc = !crc32c::crc32c(&record[..KEY_BYTES]);
    record[KEY_BYTES..].copy_from_slice(&crc.to_le_bytes());
    record
}

/// What one record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    Bind(UserId, [u8; KEY_BYTES]),
    /// A user and the account-clock time its binding ended.
    Unbind(UserId, u32),
}

/// The binding or unbinding a record holds; `None` when its checksum fails.
fn decode(record: &[u8]) -> Option<Record> {
    let mut payload = [0u8; KEY_BYTES];
    payload.copy_from_slice(record.get(..KEY_BYTES)?);
    let stored = crate::format::le_u32(record.get(..RECORD_BYTES)?, KEY_BYTES);
    let crc = crc32c::crc32c(&payload);
    if crc == stored {
        return Some(Record::Bind(UserId::from_public_key(&payload), payload));
    }
    if !crc == stored && payload[16..28] == UNBIND_MARK {
        let user = UserId::from_bytes(payload[..16].try_into().ok()?)?;
        let seconds = crate::format::le_u32(&payload, 28);
        return Some(Record::Unbind(user, seconds));
    }
    None
}

fn corrupt(data: &Path, shard: u16, path: &Path, offset: u64) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: format!(
            "the account record ({RECORD_BYTES} bytes) there fails its checksum, so its key and \
             user id are unknown"
        ),
        repair: format!(
            "stop hopd and run `{REPAIR_COMMAND} {data}`: it keeps a copy as \
             shard-{shard}.keys.damaged and rewrites the file with its valid records (a user \
             whose binding is dropped binds again when it next connects)",
            data = data.display()
        ),
    }
}

/// The `shard-K.keys` files under `DATA/accounts`, by shard number. A v1 file is an error.
fn shard_files<I: Io>(io: &I, data: &Path) -> Result<Vec<(u16, PathBuf)>, StoreError> {
    let folder = folder(data);
    let names = match io.list_dir(&folder) {
        Ok(names) => names,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(StoreError::io(&folder)(error)),
    };
    let mut files = Vec::new();
    for name in names {
        let Some(rest) = name.strip_prefix("shard-") else {
            continue;
        };
        if rest.strip_suffix(".bin").is_some_and(is_number) {
            return Err(StoreError::written_by_v1(&folder.join(&name), data));
        }
        if let Some(shard) = rest
            .strip_suffix(".keys")
            .and_then(|n| n.parse::<u16>().ok())
        {
            files.push((shard, folder.join(&name)));
        }
    }
    files.sort_unstable();
    Ok(files)
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit())
}

#[derive(Debug, Default, Clone, Copy)]
struct Scanned {
    records: u64,
    bad_records: u64,
    torn_bytes: u64,
}

/// Calls `on_record(offset, record)` for each whole record of the file, in order, reading
/// [`READ_RECORDS`] per call; stops at the first error `on_record` returns.
fn scan_file<I: Io>(
    io: &I,
    path: &Path,
    mut on_record: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<Scanned, StoreError> {
    let file = io.open(path, true).map_err(StoreError::io(path))?;
    let length = file.size_bytes().map_err(StoreError::io(path))?;
    let whole = length - length % RECORD_BYTES as u64;
    let mut scanned = Scanned {
        torn_bytes: length - whole,
        ..Scanned::default()
    };
    let mut chunk = vec![0u8; READ_RECORDS * RECORD_BYTES];
    let mut offset = 0u64;
    while offset < whole {
        let take = (whole - offset).min(chunk.len() as u64) as usize;
        file.read_exact_at(&mut chunk[..take], offset)
            .map_err(StoreError::io(path))?;
        for (at, record) in chunk[..take].chunks_exact(RECORD_BYTES).enumerate() {
            scanned.records += 1;
            if decode(record).is_none() {
                scanned.bad_records += 1;
            }
            on_record(offset + (at * RECORD_BYTES) as u64, record)?;
        }
        offset += take as u64;
    }
    Ok(scanned)
}

/// What [`copy_file`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    /// Every byte, torn tail included.
    Whole,
    /// The records whose checksum holds.
    ValidRecords,
}

/// Writes `what` of `from` to the new file `to`, fsyncs it and returns the records written.
fn copy_file<I: Io>(io: &I, from: &Path, to: &Path, what: Selection) -> Result<u64, StoreError> {
    let mut target = io.create(to).map_err(StoreError::io(to))?;
    let mut out = Vec::with_capacity(READ_RECORDS * RECORD_BYTES);
    let mut written = 0u64;
    let mut kept = 0u64;
    let scanned = scan_file(io, from, |_, record| {
        if what == Selection::Whole || decode(record).is_some() {
            out.extend_from_slice(record);
            kept += 1;
        }
        if out.len() >= READ_RECORDS * RECORD_BYTES {
            target
                .write_all_at(&out, written)
                .map_err(StoreError::io(to))?;
            written += out.len() as u64;
            out.clear();
        }
        Ok(())
    })?;
    if what == Selection::Whole && scanned.torn_bytes > 0 {
        let source = io.open(from, true).map_err(StoreError::io(from))?;
        let mut tail = vec![0u8; scanned.torn_bytes as usize];
        let whole = scanned.records * RECORD_BYTES as u64;
        source
            .read_exact_at(&mut tail, whole)
            .map_err(StoreError::io(from))?;
        out.extend_from_slice(&tail);
    }
    target
        .write_all_at(&out, written)
        .map_err(StoreError::io(to))?;
    target.sync().map_err(StoreError::io(to))?;
    Ok(kept)
}

/// `shard-K.keys.damaged` (`shard-K.privacy.damaged` for `shard-K.privacy`), or the first of
/// `.damaged.2`, `.damaged.3`, ... that is free.
pub(crate) fn free_damaged_name<I: Io>(io: &I, path: &Path) -> Result<PathBuf, StoreError> {
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .unwrap_or_default();
    let base = path.with_extension(format!("{extension}.damaged"));
    if !io.exists(&base) {
        return Ok(base);
    }
    for copy in 2..=DAMAGED_COPIES_MAX {
        let name = path.with_extension(format!("{extension}.damaged.{copy}"));
        if !io.exists(&name) {
            return Ok(name);
        }
    }
    Err(StoreError::Layout {
        path: base,
        reason: format!(
            "{DAMAGED_COPIES_MAX} damaged copies of this file are kept already; move them \
             elsewhere and repair again"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::FsIo;

    #[test]
    fn a_record_is_the_key_then_its_checksum() {
        let key = [0x42u8; KEY_BYTES];
        let record = encode(&key);
        assert_eq!(record[..KEY_BYTES], key);
        assert_eq!(
            record[KEY_BYTES..],
            crc32c::crc32c(&key).to_le_bytes(),
            "CRC32C, little-endian"
        );
        assert_eq!(
            decode(&record),
            Some(Record::Bind(UserId::from_public_key(&key), key))
        );
        let mut flipped = record;
        flipped[3] ^= 0x01;
        assert_eq!(decode(&flipped), None);
    }

    #[test]
    fn bindings_of_every_shard_file_are_loaded_in_shard_order() {
        let temp = tempfile::tempdir().expect("tempdir");
        let data = temp.path();
        let mut second = AccountLog::open(&FsIo, data, 10).expect("open");
        second.append(&[2; KEY_BYTES]);
        assert_eq!(second.flush().expect("flush"), 1);
        let mut first = AccountLog::open(&FsIo, data, 2).expect("open");
        first.append(&[1; KEY_BYTES]);
        assert_eq!(
            load(&FsIo, data, &HashMap::new())
                .expect("load")
                .bindings
                .len(),
            1,
            "buffered until flushed"
        );
        assert_eq!(first.flush().expect("flush"), 1);
        assert_eq!(first.flush().expect("nothing left"), 0);
        let loaded = load(&FsIo, data, &HashMap::new()).expect("load");
        let keys: Vec<[u8; KEY_BYTES]> = loaded.bindings.iter().map(|(_, key)| *key).collect();
        assert_eq!(
            keys,
            [[1; KEY_BYTES], [2; KEY_BYTES]],
            "shard 2 before shard 10"
        );
        assert_eq!((loaded.files, loaded.torn_bytes), (2, 0));
    }

    #[test]
    fn an_unbinding_ends_the_bindings_before_it_and_in_other_files_unless_seen_since() {
        let temp = tempfile::tempdir().expect("tempdir");
        let data = temp.path();
        let (a, b) = ([1; KEY_BYTES], [2; KEY_BYTES]);
        let (user_a, user_b) = (UserId::from_public_key(&a), UserId::from_public_key(&b));
        let none = HashMap::new();
        // Shard 1 bound a before a restart with one shard; shard 0 bound b and ended it.
        let mut one = AccountLog::open(&FsIo, data, 1).expect("open");
        one.append(&a);
        one.flush().expect("flush");
        let mut zero = AccountLog::open(&FsIo, data, 0).expect("open");
        zero.append(&b);
        zero.unbind(user_b, 100);
        zero.flush().expect("flush");
        let loaded = load(&FsIo, data, &none).expect("load");
        assert_eq!(loaded.bindings, vec![(user_a, a)], "b bound, then unbound");
        assert_eq!(loaded.unbindings, 1);
        // b binds again after its unbinding, in the same file.
        zero.append(&b);
        // a expires under shard 0: its binding in shard 1's file, read after, ends too.
        zero.unbind(user_a, 200);
        zero.flush().expect("flush");
        let loaded = load(&FsIo, data, &none).expect("load");
        assert_eq!(loaded.bindings, vec![(user_b, b)]);
        // Had a been seen since its unbinding, a binding in another file would be its new one.
        let seen = HashMap::from([(user_a, 200)]);
        assert_eq!(
            load(&FsIo, data, &seen).expect("load").bindings,
            vec![(user_b, b), (user_a, a)]
        );
        let before = HashMap::from([(user_a, 199)]);
        assert_eq!(
            load(&FsIo, data, &before).expect("load").bindings,
            vec![(user_b, b)],
            "seen before the unbinding: it stays unbound"
        );
        // But an unbinding in a file ends only what is before it there: bound again in
        // shard 0 after its unbinding, a is bound whatever was seen.
        zero.append(&a);
        zero.flush().expect("flush");
        assert_eq!(
            load(&FsIo, data, &none).expect("load").bindings,
            vec![(user_b, b), (user_a, a)]
        );

        let record = encode_unbind(user_a, 7);
        assert_eq!(record[16..28], UNBIND_MARK);
        assert_eq!(record[28..32], 7u32.to_le_bytes());
        assert_eq!(decode(&record), Some(Record::Unbind(user_a, 7)));
        let mut flipped = record;
        flipped[20] ^= 1;
        assert_eq!(decode(&flipped), None, "a damaged unbinding is damage");
        assert_eq!(repair(&FsIo, data).expect("repair").repaired, Vec::new());
    }

    #[test]
    fn no_folder_means_no_bindings() {
        let temp = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            load(&FsIo, &temp.path().join("none"), &HashMap::new()).expect("load"),
            Loaded::default()
        );
        assert_eq!(
            repair(&FsIo, &temp.path().join("none")).expect("repair"),
            RepairReport::default()
        );
    }
}
