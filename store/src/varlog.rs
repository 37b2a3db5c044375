//! The shared half of the account files whose records vary in length: the presence settings
//! ([`crate::privacy`]) and the groups ([`crate::groups`]).
//!
//! Both keep `DATA/accounts/shard-K.<suffix>` files of checksummed records that each give
//! their own length, and both read them and tell damage apart the same way, so the walk over
//! such a file lives here once and each module brings only its record layout
//! ([`RecordFormat`]). Where a record is not valid its length cannot be trusted either (it may
//! be the damaged part), so [`scan`] searches for the next valid record byte by byte. With
//! nothing valid after it, the rest of the file is a write torn by a crash; with a valid record
//! after it, it is damage, and the module decides what that does (the presence settings can be
//! repaired, the groups cannot), because only the module knows what its records hold and what
//! losing one costs.
//!
//! Files are read through a [`Window`] of [`READ_BYTES`], so memory stays bounded however large
//! a file grows. [`flush_pending`] is the writing side both logs share: since the records vary
//! in length, a log counts its buffered records beside their bytes. Record layouts, parsing,
//! the texts that say what is wrong with a record and how to repair a file stay in the modules;
//! the only texts here say where a record runs past the end of the file.

use std::io;
use std::path::{Path, PathBuf};

use hop_protocol::user::USER_ID_BYTES;
use hop_protocol::UserId;

use crate::io::{self as store_io, Io, IoFile};
use crate::StoreError;

/// Bytes read per read call while scanning or copying a file (256 KiB): memory stays bounded
/// however large the file is. Each format's largest record fits in one read (each module
/// asserts it).
pub(crate) const READ_BYTES: usize = 256 * 1024;

/// The layout of one kind of file's records, as far as walking the file needs it.
pub(crate) trait RecordFormat {
    /// A valid record, decoded; it may borrow the bytes it was read from.
    type Record<'a>;
    /// Bytes at a record's start that hold its length.
    const HEAD_BYTES: usize;
    /// Bytes of the smallest valid record: where fewer are left, no record starts.
    const SMALLEST_BYTES: usize;
    /// What is wrong with a record whose first [`RecordFormat::HEAD_BYTES`] run past the end
    /// of the file.
    const HEAD_PAST_END: &'static str;

    /// The bytes of the whole record that starts with `head` ([`RecordFormat::HEAD_BYTES`]
    /// long), or what is wrong with the length it gives. At most [`READ_BYTES`].
    fn record_bytes(head: &[u8]) -> Result<usize, &'static str>;

    /// Checks a whole record (length and checksum included) and decodes it; the error says
    /// what is wrong.
    fn parse(record: &[u8]) -> Result<Self::Record<'_>, &'static str>;
}

/// A read buffer over one file: byte ranges are served from one [`READ_BYTES`] read at a time,
/// read again from the asked offset when a range is not in memory.
pub(crate) struct Window<'f, F> {
    file: &'f F,
    length: u64,
    start: u64,
    bytes: Vec<u8>,
}

impl<'f, F: IoFile> Window<'f, F> {
    pub(crate) fn new(file: &'f F, length: u64) -> Self {
        Self {
            file,
            length,
            start: 0,
            bytes: Vec::new(),
        }
    }

    /// The `len` bytes at `offset`, which lie within the file; `len` ≤ [`READ_BYTES`].
    pub(crate) fn get(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        assert!(len <= READ_BYTES);
        assert!(offset + len as u64 <= self.length);
        let end = offset + len as u64;
        if offset < self.start || end > self.start + self.bytes.len() as u64 {
            let take = (self.length - offset).min(READ_BYTES as u64) as usize;
            self.bytes.resize(take, 0);
            self.file.read_exact_at(&mut self.bytes, offset)?;
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.bytes[at..at + len])
    }
}

/// What [`scan`] met, in file order.
pub(crate) enum Event<R> {
    Record {
        offset: u64,
        record: R,
    },
    /// A damaged stretch from `offset` up to the next valid record.
    Damaged {
        offset: u64,
        reason: &'static str,
    },
}

/// What [`scan`] found in a file.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Scanned {
    /// Valid records.
    pub(crate) records: u64,
    /// Damaged stretches with a valid record after them.
    pub(crate) damaged: u64,
    pub(crate) damaged_bytes: u64,
    /// Where the torn tail starts: the file's length when there is none.
    pub(crate) valid_end: u64,
    pub(crate) torn_bytes: u64,
}

/// Walks the file at `path` record by record, calling `on_event` for each valid record and
/// each damaged stretch that has a valid record after it; stops at the first error `on_event`
/// returns. Where a record is damaged, the next record is searched for byte by byte (its length
/// may be the damaged part); when none is found, the rest of the file is a torn tail.
pub(crate) fn scan<R: RecordFormat, F: IoFile>(
    file: &F,
    path: &Path,
    mut on_event: impl FnMut(Event<R::Record<'_>>) -> Result<(), StoreError>,
) -> Result<Scanned, StoreError> {
    let length = file.size_bytes().map_err(StoreError::io(path))?;
    let mut window = Window::new(file, length);
    let mut scanned = Scanned::default();
    let mut offset = 0u64;
    while offset < length {
        let reason = match record_at::<R, F>(&mut window, offset).map_err(StoreError::io(path))? {
            Ok((record, record_bytes)) => {
                scanned.records += 1;
                on_event(Event::Record { offset, record })?;
                offset += record_bytes as u64;
                continue;
            }
            Err(reason) => reason,
        };
        match next_valid::<R, F>(&mut window, offset + 1).map_err(StoreError::io(path))? {
            Some(next) => {
                debug_assert!(next > offset);
                scanned.damaged += 1;
                scanned.damaged_bytes += next - offset;
                on_event(Event::Damaged { offset, reason })?;
                offset = next;
            }
            None => {
                scanned.torn_bytes = length - offset;
                break;
            }
        }
    }
    scanned.valid_end = length - scanned.torn_bytes;
    debug_assert!(offset <= length);
    Ok(scanned)
}

/// The record at `offset` and its bytes, or what is wrong with it.
fn record_at<'w, R: RecordFormat, F: IoFile>(
    window: &'w mut Window<'_, F>,
    offset: u64,
) -> io::Result<Result<(R::Record<'w>, usize), &'static str>> {
    let left = window.length - offset;
    if left < R::HEAD_BYTES as u64 {
        return Ok(Err(R::HEAD_PAST_END));
    }
    let record_bytes = match R::record_bytes(window.get(offset, R::HEAD_BYTES)?) {
        Ok(record_bytes) => record_bytes,
        Err(reason) => return Ok(Err(reason)),
    };
    if record_bytes as u64 > left {
        return Ok(Err("it runs past the end of the file"));
    }
    Ok(R::parse(window.get(offset, record_bytes)?).map(|record| (record, record_bytes)))
}

/// The first offset from `from` on where a valid record starts.
fn next_valid<R: RecordFormat, F: IoFile>(
    window: &mut Window<'_, F>,
    from: u64,
) -> io::Result<Option<u64>> {
    let smallest = R::SMALLEST_BYTES as u64;
    let mut offset = from;
    while offset + smallest <= window.length {
        if record_at::<R, F>(window, offset)?.is_ok() {
            return Ok(Some(offset));
        }
        offset += 1;
    }
    Ok(None)
}

/// Writes the buffered records `pending` (`records` of them) at `*good_bytes` with one
/// positioned write and an fsync, and returns how many records became durable (0 when none
/// were buffered). Records vary in length, so their count is kept beside their bytes and is
/// taken here with them.
///
/// On success `*good_bytes` moves past the records and the buffer and its count are emptied
/// (the buffer keeps its capacity). On failure [`store_io::append_durably`] has cut the file
/// back (best effort) and nothing here changes: the records stay buffered, for the next flush to write at
/// the same place.
pub(crate) fn flush_pending<F: IoFile>(
    file: &mut F,
    good_bytes: &mut u64,
    pending: &mut Vec<u8>,
    records: &mut usize,
) -> io::Result<usize> {
    if pending.is_empty() {
        return Ok(0);
    }
    store_io::append_durably(file, pending, *good_bytes)?;
    *good_bytes += pending.len() as u64;
    pending.clear();
    Ok(std::mem::take(records))
}

/// The `shard-K<suffix>` files under `DATA/accounts` (`suffix` with its dot, e.g.
/// `".groups"`), by shard number; none when the folder does not exist.
pub(crate) fn shard_files<I: Io>(
    io: &I,
    data: &Path,
    suffix: &str,
) -> Result<Vec<(u16, PathBuf)>, StoreError> {
    let folder = crate::accounts::folder(data);
    let names = match io.list_dir(&folder) {
        Ok(names) => names,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(StoreError::io(&folder)(error)),
    };
    let mut files: Vec<(u16, PathBuf)> = names
        .iter()
        .filter_map(|name| {
            let shard = name
                .strip_prefix("shard-")?
                .strip_suffix(suffix)?
                .parse::<u16>()
                .ok()?;
            Some((shard, folder.join(name)))
        })
        .collect();
    files.sort_unstable();
    Ok(files)
}

/// The user id in the first [`USER_ID_BYTES`] of `bytes`; `None` when they are fewer or do
/// not hold a valid id.
pub(crate) fn id_at(bytes: &[u8]) -> Option<UserId> {
    let mut id = [0u8; USER_ID_BYTES];
    id.copy_from_slice(bytes.get(..USER_ID_BYTES)?);
    UserId::from_bytes(&id)
}
