//! Presence settings on disk: who may see each user's presence.
//!
//! `DATA/accounts/shard-K.privacy`, written by shard K only, holds one record per change of a
//! user's settings: `crc32c u32 | len u32 | payload`, the payload `user 16 | wall_ms u64 |
//! visibility u8 | count u16 | contacts 16·count`. The latest change of a user wins: within a
//! file the later record (one writer appends the changes in the order they happened), across
//! files (a user's home shard moves when the shard count changes) the record with the larger
//! `wall_ms`, and at equal times the later file in shard order. [`load`] reads every shard
//! file at process start and returns each user's winning setting.
//!
//! Writing ([`PrivacyLog`]) follows the account bindings' protocol: [`PrivacyLog::append`]
//! buffers, [`PrivacyLog::flush`] writes every buffered record with one positioned write at the
//! end of the last good record and fsyncs; a failed write or fsync cuts the file back to that
//! end and keeps the records for the next flush. While flushes fail the buffer is bounded: past
//! [`PENDING_BYTES_MAX`] it keeps only each user's latest record (settings replace each other
//! whole, so the older ones carry nothing the latest does not).
//!
//! At open a torn tail is cut off, and a file holding more than twice the bytes of its live
//! records (each user's last one) plus [`COMPACT_SLACK_BYTES`] is rewritten with only those.
//!
//! Damage: a last record that runs past the end of the file, or is damaged with nothing valid
//! after it, is a write torn by a crash. A damaged record with a valid one after it is not
//! skipped: [`load`] fails naming the file and the offset, and [`repair`] (run by
//! [`accounts::repair`], `hopd admin repair-accounts --data DIR`) rewrites the file without it.
//! The byte layout and what each kind of damage does are in `store/DESIGN.md` ("Presence
//! settings").
//!
//! The store does not depend on the router: visibility is its protocol number (0 everyone,
//! 1 contacts, 2 nobody) and the contacts are kept in the order they are given (the router
//! keeps them sorted and without duplicates).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::user::USER_ID_BYTES;
use hop_protocol::wire::Visibility;
use hop_protocol::UserId;

use crate::accounts::{self, RepairReport, RepairedFile, REPAIR_COMMAND};
use crate::format::{le_u32, le_u64};
use crate::io::{self as store_io, Io, IoFile};
use crate::varlog::{self, id_at, Event, RecordFormat, Window, READ_BYTES};
use crate::StoreError;

/// `hop_protocol::wire::Visibility::Everyone`: anyone may watch the user's presence.
pub const VISIBILITY_EVERYONE: u8 = 0;
/// `hop_protocol::wire::Visibility::Contacts`: only the users in its contacts.
pub const VISIBILITY_CONTACTS: u8 = 1;
/// `hop_protocol::wire::Visibility::Nobody`: no one.
pub const VISIBILITY_NOBODY: u8 = 2;
/// The largest valid visibility; a record holding a larger one is damaged.
pub const VISIBILITY_MAX: u8 = VISIBILITY_NOBODY;
/// Contacts one record holds at most: the protocol's limit on a `PresenceSettings`.
pub const CONTACTS_MAX: usize = hop_protocol::wire::CONTACTS_MAX;
/// Bytes before the payload: the CRC32C and the payload length.
pub const RECORD_HEADER_BYTES: usize = 8;
/// Payload bytes besides the contacts: user, `wall_ms`, visibility, count.
pub const PAYLOAD_FIXED_BYTES: usize = USER_ID_BYTES + 8 + 1 + 2;
/// The largest payload: [`CONTACTS_MAX`] contacts.
pub const PAYLOAD_BYTES_MAX: usize = PAYLOAD_FIXED_BYTES + USER_ID_BYTES * CONTACTS_MAX;
/// The largest record (16,419 bytes).
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + PAYLOAD_BYTES_MAX;
/// Buffered bytes (16 MiB) past which [`PrivacyLog::append`] keeps only the latest buffered
/// record of each user, so that a long disk outage cannot grow memory without bound.
pub const PENDING_BYTES_MAX: usize = 16 * 1024 * 1024;
/// [`PrivacyLog::open`] rewrites a file that holds more than twice the bytes of its live
/// records plus this many (1 MiB): a small file is never worth a rewrite.
pub const COMPACT_SLACK_BYTES: u64 = 1024 * 1024;

const FILE_SUFFIX: &str = ".privacy";

const _: () = assert!(PAYLOAD_FIXED_BYTES == 27, "store/DESIGN.md gives 27 bytes");
const _: () = assert!(
    RECORD_BYTES_MAX == 16_419,
    "store/DESIGN.md gives 16,419 bytes"
);
const _: () = assert!(CONTACTS_MAX <= u16::MAX as usize, "the count is a u16");
const _: () = assert!(READ_BYTES >= RECORD_BYTES_MAX, "a read holds any record");
const _: () = assert!(PENDING_BYTES_MAX >= 2 * RECORD_BYTES_MAX);
const _: () = assert!(
    Visibility::Everyone as i32 == VISIBILITY_EVERYONE as i32
        && Visibility::Contacts as i32 == VISIBILITY_CONTACTS as i32
        && Visibility::Nobody as i32 == VISIBILITY_NOBODY as i32,
    "the stored numbers are the protocol's"
);

/// Bytes of a record holding `contacts` contacts.
pub const fn record_bytes(contacts: usize) -> usize {
    RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES + USER_ID_BYTES * contacts
}

/// Every user's winning setting, read from all shard files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadedPrivacy {
    /// `(user, visibility, contacts)`, one per user that has a record, sorted by user. A user
    /// whose latest change went back to the default (everyone, no contacts) is listed too.
    pub settings: Vec<(UserId, u8, Vec<UserId>)>,
    /// Bytes of torn tails (writes cut short by a crash) left out; each file's shard cuts its
    /// own when it opens its [`PrivacyLog`].
    pub torn_bytes: u64,
}

/// What [`PrivacyLog::open`] found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Records in the file once open returned (after a compaction: one per user).
    pub records: u64,
    /// Users with a record in the file.
    pub users: u64,
    /// A torn tail cut off (0 when the file ended on a whole, valid record).
    pub torn_bytes_cut: u64,
    /// The file did not exist and was created.
    pub created: bool,
    /// A `shard-K.privacy.tmp` left by an interrupted compaction or repair was removed.
    pub temporary_removed: bool,
    /// The file was rewritten with its live records only.
    pub compacted: Option<Compacted>,
}

/// A compaction at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Records superseded by a later record of the same user in the file.
    pub records_dropped: u64,
}

/// One shard's writer of presence settings. Owned by the shard's thread.
#[derive(Debug)]
pub struct PrivacyLog<I: Io> {
    file: I::File,
    path: PathBuf,
    /// Length of the records known to be on file, whole and fsynced: the next write goes here.
    good_bytes: u64,
    /// Encoded records appended and not yet flushed, in append order.
    pending: Vec<u8>,
    pending_records: usize,
    /// Buffered bytes past which `append` folds the buffer down to each user's latest record:
    /// [`PENDING_BYTES_MAX`], or twice what the last fold left when that is more (so that a
    /// buffer of many users' latest settings is not folded again at every append).
    fold_above_bytes: usize,
    opened: Opened,
}

impl<I: Io> PrivacyLog<I> {
    /// Opens (or creates) `DATA/accounts/shard-K.privacy` for shard `shard`.
    ///
    /// Removes a leftover `shard-K.privacy.tmp`, reads the whole file, cuts off a torn tail
    /// (and fsyncs the cut), and compacts the file when it holds more than twice the bytes of
    /// its live records plus [`COMPACT_SLACK_BYTES`]: the live records are written to
    /// `shard-K.privacy.tmp`, fsynced, renamed over the file, and the folder is fsynced. Until
    /// that rename the original file is the authoritative one, so a crash or an error at any
    /// step loses nothing; an error fails the open (it names the file) and the next open
    /// starts over. A damaged record with a valid one after it fails with
    /// [`StoreError::Corrupt`], as [`load`] does.
    pub fn open(io: &I, data: &Path, shard: u16) -> Result<Self, StoreError> {
        let folder = accounts::folder(data);
        io.create_dir_all(&folder)
            .map_err(StoreError::io(&folder))?;
        let path = shard_path(data, shard);
        let temporary = temporary_path(&path);
        let mut opened = Opened::default();
        if io.exists(&temporary) {
            // Left by a compaction or repair that stopped before its rename: the file itself
            // is still the authoritative one. The removal need not be durable; a .tmp that
            // comes back after a crash is removed again.
            io.remove_file(&temporary)
                .map_err(StoreError::io(&temporary))?;
            opened.temporary_removed = true;
        }
        let (mut file, created) = store_io::open_or_create_log(io, &path, &folder, data)?;
        opened.created = created;

        // Each user's last record in the file: (offset, bytes).
        let mut live: HashMap<UserId, (u64, u32)> = HashMap::new();
        let scanned = scan(&file, &path, |event| match event {
            Event::Record {
                offset,
                record: view,
            } => {
                live.insert(view.user, (offset, view.record.len() as u32));
                Ok(())
            }
            Event::Damaged { offset, reason } => Err(corrupt(data, shard, &path, offset, reason)),
        })?;
        if scanned.torn_bytes > 0 {
            file.truncate(scanned.valid_end)
                .map_err(StoreError::io(&path))?;
            file.sync().map_err(StoreError::io(&path))?;
        }
        opened.records = scanned.records;
        opened.users = live.len() as u64;
        opened.torn_bytes_cut = scanned.torn_bytes;

        let mut good_bytes = scanned.valid_end;
        let live_bytes: u64 = live.values().map(|&(_, bytes)| u64::from(bytes)).sum();
        debug_assert!(live_bytes <= good_bytes);
        if good_bytes > 2 * live_bytes + COMPACT_SLACK_BYTES {
            let mut records: Vec<(u64, u32)> = live.into_values().collect();
            records.sort_unstable(); // file order
            file = compact(io, &file, &folder, &path, &temporary, &records)?;
            opened.compacted = Some(Compacted {
                bytes_before: good_bytes,
                bytes_after: live_bytes,
                records_dropped: scanned.records - records.len() as u64,
            });
            opened.records = records.len() as u64;
            good_bytes = live_bytes;
        }
        Ok(Self {
            file,
            path,
            good_bytes,
            pending: Vec::new(),
            pending_records: 0,
            fold_above_bytes: PENDING_BYTES_MAX,
            opened,
        })
    }

    /// Buffers a change of `user`'s settings made at `wall_ms` (the wall clock, milliseconds
    /// since the Unix epoch); [`PrivacyLog::flush`] makes it durable. `contacts` are kept in
    /// the order given.
    ///
    /// # Panics
    ///
    /// When `visibility` is over [`VISIBILITY_MAX`] or `contacts` holds more than
    /// [`CONTACTS_MAX`]: the caller checks what a client sent before it gets here.
    pub fn append(&mut self, user: UserId, wall_ms: u64, visibility: u8, contacts: &[UserId]) {
        assert!(
            visibility <= VISIBILITY_MAX,
            "visibility {visibility} is not 0, 1 or 2"
        );
        assert!(
            contacts.len() <= CONTACTS_MAX,
            "{} contacts, at most {CONTACTS_MAX}",
            contacts.len()
        );
        encode(&mut self.pending, user, wall_ms, visibility, contacts);
        self.pending_records += 1;
        if self.pending.len() > self.fold_above_bytes {
            self.fold_pending();
        }
        debug_assert!(self.pending.len() <= self.fold_above_bytes + RECORD_BYTES_MAX);
    }

    /// Writes every buffered record with one positioned write at the end of the good records,
    /// then fsyncs; returns how many records became durable (0 when none were buffered).
    ///
    /// On failure the records stay buffered and the file is cut back to its good length (best
    /// effort: if that fails too, the next flush still writes at the good length, over the
    /// torn bytes). Call again later to retry.
    pub fn flush(&mut self) -> io::Result<usize> {
        let records = varlog::flush_pending(
            &mut self.file,
            &mut self.good_bytes,
            &mut self.pending,
            &mut self.pending_records,
        )?;
        if self.pending.capacity() > PENDING_BYTES_MAX {
            // An outage grew the buffer; give the memory back.
            self.pending = Vec::new();
        }
        // `fold_pending` raises it only while records are buffered: an empty flush finds it
        // at this already.
        self.fold_above_bytes = PENDING_BYTES_MAX;
        Ok(records)
    }

    /// Records appended and not yet durable (they grow while flushes fail, up to the bound).
    pub fn pending_records(&self) -> usize {
        self.pending_records
    }

    /// Bytes of the records appended and not yet durable.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// What opening found and did.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps only the last buffered record of each user, in their order. Settings replace each
    /// other whole, so within one file the last record of a user is all that counts (see
    /// [`load`]), and dropping the earlier ones changes no outcome.
    fn fold_pending(&mut self) {
        let mut last_index: HashMap<[u8; USER_ID_BYTES], usize> = HashMap::new();
        for (index, record) in pending_records(&self.pending).enumerate() {
            last_index.insert(record_user(record), index);
        }
        let mut kept = Vec::with_capacity(self.pending.len().min(PENDING_BYTES_MAX));
        for (index, record) in pending_records(&self.pending).enumerate() {
            if last_index.get(&record_user(record)) == Some(&index) {
                kept.extend_from_slice(record);
            }
        }
        self.pending = kept;
        self.pending_records = last_index.len();
        self.fold_above_bytes = PENDING_BYTES_MAX.max(2 * self.pending.len());
    }
}

/// `DATA/accounts/shard-K.privacy`.
pub fn shard_path(data: &Path, shard: u16) -> PathBuf {
    accounts::folder(data).join(format!("shard-{shard}{FILE_SUFFIX}"))
}

/// Reads every `shard-K.privacy` file under `DATA/accounts` (none when the folder does not
/// exist) and returns each user's winning setting: within a file the user's last record;
/// across files the one with the larger `wall_ms`, and at equal times the later file in shard
/// order. Fails with [`StoreError::Corrupt`], naming the file, the byte offset and the repair
/// command, on a damaged record that has a valid record after it.
pub fn load<I: Io>(io: &I, data: &Path) -> Result<LoadedPrivacy, StoreError> {
    let mut winners: HashMap<UserId, Setting> = HashMap::new();
    let mut torn_bytes = 0;
    for (shard, path) in shard_files(io, data)? {
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        // Within a file the order of the records is the order of the changes, even if the
        // wall clock stepped back between two of them.
        let mut latest_in_file: HashMap<UserId, Setting> = HashMap::new();
        let scanned = scan(&file, &path, |event| match event {
            Event::Record { record: view, .. } => {
                latest_in_file.insert(view.user, Setting::from(view));
                Ok(())
            }
            Event::Damaged { offset, reason } => Err(corrupt(data, shard, &path, offset, reason)),
        })?;
        torn_bytes += scanned.torn_bytes;
        for (user, candidate) in latest_in_file {
            match winners.entry(user) {
                Entry::Vacant(entry) => {
                    entry.insert(candidate);
                }
                // Files come in shard order: `>=` lets the later file win a tie.
                Entry::Occupied(mut entry) => {
                    if candidate.wall_ms >= entry.get().wall_ms {
                        entry.insert(candidate);
                    }
                }
            }
        }
    }
    let mut settings: Vec<(UserId, u8, Vec<UserId>)> = winners
        .into_iter()
        .map(|(user, setting)| (user, setting.visibility, setting.contacts))
        .collect();
    settings.sort_unstable_by_key(|(user, _, _)| *user);
    Ok(LoadedPrivacy {
        settings,
        torn_bytes,
    })
}

/// Rewrites every `shard-K.privacy` file that holds a damaged record with a valid one after
/// it, keeping its valid records; [`accounts::repair`] calls it, so the one admin command
/// repairs both kinds of file. Run it with hopd stopped. Per damaged file, as for the binding
/// files: a byte-for-byte copy to `shard-K.privacy.damaged` (or `.damaged.2`, ...), the valid
/// records to `shard-K.privacy.tmp`, both fsynced, the new file renamed over the old one, the
/// folder fsynced. A file whose only damage is a torn tail is left to [`PrivacyLog::open`].
///
/// In the report, `dropped` counts damaged stretches: one or more records each, since a
/// damaged length hides where the next record starts; `dropped_bytes` says how much went.
pub fn repair<I: Io>(io: &I, data: &Path) -> Result<RepairReport, StoreError> {
    let mut report = RepairReport::default();
    let folder = accounts::folder(data);
    for (_, path) in shard_files(io, data)? {
        report.files_checked += 1;
        let temporary = temporary_path(&path);
        if io.exists(&temporary) {
            // Left by a compaction or repair that crashed before its rename.
            io.remove_file(&temporary)
                .map_err(StoreError::io(&temporary))?;
        }
        let file = io.open(&path, true).map_err(StoreError::io(&path))?;
        let scanned = scan(&file, &path, |_| Ok(()))?;
        if scanned.damaged == 0 {
            continue;
        }
        let damaged_copy = accounts::free_damaged_name(io, &path)?;
        copy_whole_file(io, &file, &path, &damaged_copy)?;

        let mut target = io.create(&temporary).map_err(StoreError::io(&temporary))?;
        let mut out = Vec::with_capacity(READ_BYTES);
        let mut written = 0u64;
        let mut kept = 0u64;
        scan(&file, &path, |event| {
            if let Event::Record { record: view, .. } = event {
                if out.len() + view.record.len() > READ_BYTES {
                    target
                        .write_all_at(&out, written)
                        .map_err(StoreError::io(&temporary))?;
                    written += out.len() as u64;
                    out.clear();
                }
                out.extend_from_slice(view.record);
                kept += 1;
            }
            Ok(())
        })?;
        target
            .write_all_at(&out, written)
            .map_err(StoreError::io(&temporary))?;
        target.sync().map_err(StoreError::io(&temporary))?;
        io.rename(&temporary, &path)
            .map_err(StoreError::io(&path))?;
        io.sync_dir(&folder).map_err(StoreError::io(&folder))?;
        debug_assert_eq!(kept, scanned.records);
        report.repaired.push(RepairedFile {
            path,
            damaged_copy,
            kept,
            dropped: scanned.damaged,
            dropped_bytes: scanned.damaged_bytes,
            torn_bytes: scanned.torn_bytes,
        });
    }
    Ok(report)
}

// ---- helpers ----

/// `shard-K.privacy.tmp`, beside the file: where compaction and repair write its replacement.
fn temporary_path(path: &Path) -> PathBuf {
    path.with_extension("privacy.tmp")
}

/// A decoded setting, kept in memory by [`load`].
#[derive(Debug)]
struct Setting {
    wall_ms: u64,
    visibility: u8,
    contacts: Vec<UserId>,
}

impl From<View<'_>> for Setting {
    fn from(view: View<'_>) -> Self {
        Self {
            wall_ms: view.wall_ms,
            visibility: view.visibility,
            contacts: view.contacts(),
        }
    }
}

/// A valid record, checked whole by [`parse`], borrowed from the bytes it was read into.
#[derive(Debug, Clone, Copy)]
struct View<'a> {
    /// The whole record, header included.
    record: &'a [u8],
    user: UserId,
    wall_ms: u64,
    visibility: u8,
    /// `count` ids, 16 bytes each, every one valid.
    contacts: &'a [u8],
}

impl View<'_> {
    fn contacts(&self) -> Vec<UserId> {
        // `parse` checked every id, so none is filtered out.
        let contacts: Vec<UserId> = self
            .contacts
            .chunks_exact(USER_ID_BYTES)
            .filter_map(id_at)
            .collect();
        debug_assert_eq!(contacts.len() * USER_ID_BYTES, self.contacts.len());
        contacts
    }
}

fn encode(out: &mut Vec<u8>, user: UserId, wall_ms: u64, visibility: u8, contacts: &[UserId]) {
    debug_assert!(visibility <= VISIBILITY_MAX && contacts.len() <= CONTACTS_MAX);
    let start = out.len();
    let payload_bytes = PAYLOAD_FIXED_BYTES + USER_ID_BYTES * contacts.len();
    out.extend_from_slice(&[0u8; 4]); // the checksum, below
    out.extend_from_slice(&(payload_bytes as u32).to_le_bytes());
    out.extend_from_slice(&user.to_bytes());
    out.extend_from_slice(&wall_ms.to_le_bytes());
    out.push(visibility);
    out.extend_from_slice(&(contacts.len() as u16).to_le_bytes());
    for contact in contacts {
        out.extend_from_slice(&contact.to_bytes());
    }
    let checksum = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(out.len() - start, record_bytes(contacts.len()));
}

/// Checks a whole record (header included) and decodes it; the error says what is wrong.
fn parse(record: &[u8]) -> Result<View<'_>, &'static str> {
    if record.len() < RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES {
        return Err("it is shorter than any record");
    }
    let payload_bytes = le_u32(record, 4) as usize;
    if record.len() != RECORD_HEADER_BYTES + payload_bytes {
        return Err("its length disagrees with its size");
    }
    if crc32c::crc32c(&record[4..]) != le_u32(record, 0) {
        return Err("its checksum fails");
    }
    let payload = &record[RECORD_HEADER_BYTES..];
    let user = id_at(payload).ok_or("its user id is not a valid id")?;
    let wall_ms = le_u64(payload, USER_ID_BYTES);
    let visibility = payload[USER_ID_BYTES + 8];
    if visibility > VISIBILITY_MAX {
        return Err("its visibility is not 0, 1 or 2");
    }
    let count = usize::from(u16::from_le_bytes([
        payload[USER_ID_BYTES + 9],
        payload[USER_ID_BYTES + 10],
    ]));
    if count > CONTACTS_MAX {
        return Err("it names more than 1,024 contacts");
    }
    if payload_bytes != PAYLOAD_FIXED_BYTES + USER_ID_BYTES * count {
        return Err("its contact count disagrees with its length");
    }
    let contacts = &payload[PAYLOAD_FIXED_BYTES..];
    if contacts
        .chunks_exact(USER_ID_BYTES)
        .any(|id| id_at(id).is_none())
    {
        return Err("one of its contact ids is not a valid id");
    }
    Ok(View {
        record,
        user,
        wall_ms,
        visibility,
        contacts,
    })
}

/// Could `payload_bytes`, read from a record header, be the length of a record at all?
// `usize::is_multiple_of` needs Rust 1.87; the workspace declares rust-version 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn possible_payload_bytes(payload_bytes: usize) -> bool {
    (PAYLOAD_FIXED_BYTES..=PAYLOAD_BYTES_MAX).contains(&payload_bytes)
        && (payload_bytes - PAYLOAD_FIXED_BYTES) % USER_ID_BYTES == 0
}

/// The records of a buffer `encode` wrote (trusted: no checks).
fn pending_records(pending: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = pending;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let bytes = RECORD_HEADER_BYTES + le_u32(rest, 4) as usize;
        let (record, after) = rest.split_at(bytes);
        rest = after;
        Some(record)
    })
}

/// The user id bytes of an encoded record.
fn record_user(record: &[u8]) -> [u8; USER_ID_BYTES] {
    let mut user = [0u8; USER_ID_BYTES];
    user.copy_from_slice(&record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + USER_ID_BYTES]);
    user
}

fn corrupt(data: &Path, shard: u16, path: &Path, offset: u64, reason: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: format!(
            "the presence-settings record there is damaged ({reason}) and a valid record follows \
             it, so it is not a write torn by a crash"
        ),
        repair: format!(
            "stop hopd and run `{REPAIR_COMMAND} {data}`: it keeps a copy as \
             shard-{shard}.privacy.damaged and rewrites the file with its valid records (a user \
             whose setting is dropped falls back to its setting in another shard's file, if \
             any, or to the default, visible to everyone, until it sends its settings again)",
            data = data.display()
        ),
    }
}

/// The `shard-K.privacy` files under `DATA/accounts`, by shard number.
fn shard_files<I: Io>(io: &I, data: &Path) -> Result<Vec<(u16, PathBuf)>, StoreError> {
    varlog::shard_files(io, data, FILE_SUFFIX)
}

/// The layout of a `shard-K.privacy` file's records, for [`varlog::scan`].
enum PrivacyFile {}

impl RecordFormat for PrivacyFile {
    type Record<'a> = View<'a>;
    const HEAD_BYTES: usize = RECORD_HEADER_BYTES;
    const SMALLEST_BYTES: usize = RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES;
    const HEAD_PAST_END: &'static str = "its header runs past the end of the file";

    fn record_bytes(header: &[u8]) -> Result<usize, &'static str> {
        let payload_bytes = le_u32(header, 4) as usize;
        if !possible_payload_bytes(payload_bytes) {
            return Err("its length is not that of any record");
        }
        Ok(RECORD_HEADER_BYTES + payload_bytes)
    }

    fn parse(record: &[u8]) -> Result<View<'_>, &'static str> {
        parse(record)
    }
}

/// Walks the file's records; see [`varlog::scan`].
fn scan<F: IoFile>(
    file: &F,
    path: &Path,
    on_event: impl FnMut(Event<View<'_>>) -> Result<(), StoreError>,
) -> Result<varlog::Scanned, StoreError> {
    varlog::scan::<PrivacyFile, F>(file, path, on_event)
}

/// Writes the `records` (offset and bytes in `source`, in file order) to a new file at
/// `temporary`, fsyncs it, renames it over `path` and fsyncs the folder; returns the new file,
/// open for writing. Before the rename the original is untouched; on a failure there the
/// temporary file is removed (best effort: the next open removes it too).
fn compact<I: Io>(
    io: &I,
    source: &I::File,
    folder: &Path,
    path: &Path,
    temporary: &Path,
    records: &[(u64, u32)],
) -> Result<I::File, StoreError> {
    let renamed = write_records(io, source, path, temporary, records).and_then(|()| {
        io.rename(temporary, path)
            .map_err(StoreError::io(temporary))
    });
    if let Err(error) = renamed {
        let _ = io.remove_file(temporary);
        return Err(error);
    }
    io.sync_dir(folder).map_err(StoreError::io(folder))?;
    io.open(path, false).map_err(StoreError::io(path))
}

/// The copying half of [`compact`]: `records` of `source` to the new file `temporary`, fsynced.
fn write_records<I: Io>(
    io: &I,
    source: &I::File,
    path: &Path,
    temporary: &Path,
    records: &[(u64, u32)],
) -> Result<(), StoreError> {
    let mut target = io.create(temporary).map_err(StoreError::io(temporary))?;
    let length = source.size_bytes().map_err(StoreError::io(path))?;
    let mut window = Window::new(source, length);
    let mut out = Vec::with_capacity(READ_BYTES);
    let mut written = 0u64;
    for &(offset, bytes) in records {
        if out.len() + bytes as usize > READ_BYTES {
            target
                .write_all_at(&out, written)
                .map_err(StoreError::io(temporary))?;
            written += out.len() as u64;
            out.clear();
        }
        let record = window
            .get(offset, bytes as usize)
            .map_err(StoreError::io(path))?;
        debug_assert!(parse(record).is_ok());
        out.extend_from_slice(record);
    }
    target
        .write_all_at(&out, written)
        .map_err(StoreError::io(temporary))?;
    target.sync().map_err(StoreError::io(temporary))
}

/// Copies every byte of `source` (at `path`) to the new file `to` and fsyncs it.
fn copy_whole_file<I: Io>(
    io: &I,
    source: &I::File,
    path: &Path,
    to: &Path,
) -> Result<(), StoreError> {
    let mut target = io.create(to).map_err(StoreError::io(to))?;
    let length = source.size_bytes().map_err(StoreError::io(path))?;
    let mut chunk = vec![0u8; READ_BYTES];
    let mut offset = 0u64;
    while offset < length {
        let take = (length - offset).min(READ_BYTES as u64) as usize;
        source
            .read_exact_at(&mut chunk[..take], offset)
            .map_err(StoreError::io(path))?;
        target
            .write_all_at(&chunk[..take], offset)
            .map_err(StoreError::io(to))?;
        offset += take as u64;
    }
    target.sync().map_err(StoreError::io(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u64) -> UserId {
        UserId::from_halves(0xA0 + n, n).expect("valid id")
    }

    #[test]
    fn a_record_is_checksum_length_then_the_payload_in_design_order() {
        let mut out = Vec::new();
        encode(
            &mut out,
            user(1),
            0x0102_0304_0506_0708,
            1,
            &[user(2), user(3)],
        );
        assert_eq!(out.len(), record_bytes(2));
        assert_eq!(out.len(), 8 + 27 + 32);
        assert_eq!(le_u32(&out, 4), 27 + 32, "len: payload bytes");
        assert_eq!(le_u32(&out, 0), crc32c::crc32c(&out[4..]), "covers len too");
        assert_eq!(out[8..24], user(1).to_bytes());
        assert_eq!(out[24..32], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(out[32], 1);
        assert_eq!(out[33..35], 2u16.to_le_bytes());
        assert_eq!(out[35..51], user(2).to_bytes());
        assert_eq!(out[51..67], user(3).to_bytes());
        let view = parse(&out).expect("valid");
        assert_eq!(
            (view.user, view.wall_ms, view.visibility),
            (user(1), 0x0102_0304_0506_0708, 1)
        );
        assert_eq!(view.contacts(), [user(2), user(3)]);
    }

    #[test]
    fn values_outside_the_limits_are_damage_even_with_a_good_checksum() {
        let reseal = |record: &mut Vec<u8>| {
            let checksum = crc32c::crc32c(&record[4..]);
            record[..4].copy_from_slice(&checksum.to_le_bytes());
        };
        let mut record = Vec::new();
        encode(&mut record, user(1), 5, 2, &[]);
        record[32] = 3;
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("its visibility is not 0, 1 or 2")
        );

        let mut record = Vec::new();
        encode(&mut record, user(1), 5, 0, &[]);
        record[33..35].copy_from_slice(&1025u16.to_le_bytes());
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("it names more than 1,024 contacts")
        );

        let mut record = Vec::new();
        encode(&mut record, user(1), 5, 0, &[user(2)]);
        record[33..35].copy_from_slice(&0u16.to_le_bytes());
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("its contact count disagrees with its length")
        );

        let mut record = Vec::new();
        encode(&mut record, user(1), 5, 1, &[user(2)]);
        record[35..43].fill(0); // a contact whose high half is zero
        reseal(&mut record);
        assert_eq!(
            parse(&record).err(),
            Some("one of its contact ids is not a valid id")
        );

        assert!(!possible_payload_bytes(26));
        assert!(!possible_payload_bytes(28));
        assert!(possible_payload_bytes(PAYLOAD_BYTES_MAX));
        assert!(!possible_payload_bytes(PAYLOAD_BYTES_MAX + 16));
    }

    #[test]
    fn folding_keeps_the_last_buffered_record_of_each_user_in_order() {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut log = PrivacyLog::open(&crate::io::FsIo, temp.path(), 0).expect("open");
        log.append(user(1), 1, 0, &[]);
        log.append(user(2), 2, 1, &[user(1)]);
        log.append(user(1), 3, 2, &[]);
        log.fold_pending();
        let kept: Vec<(UserId, u64)> = pending_records(&log.pending)
            .map(|record| {
                let view = parse(record).expect("valid");
                (view.user, view.wall_ms)
            })
            .collect();
        assert_eq!(kept, [(user(2), 2), (user(1), 3)]);
        assert_eq!(log.pending_records(), 2);
    }
}
