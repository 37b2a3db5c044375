//! The writing side shared by the account files whose records are all one size: the bindings
//! ([`crate::accounts`]), the device links ([`crate::devices`]) and the seen times
//! ([`crate::seen`]). Each module brings its record layout and its reading; this keeps the
//! file, where its good records end, and what is buffered for the next flush.
//!
//! A torn tail (a length that is not a whole number of records) is cut when the log is made, so
//! later records stay aligned. [`FixedLog::flush`] writes every buffered record with one
//! positioned write at the end of the good records and fsyncs; on failure the file is cut back
//! there and the records stay buffered, so a retry never lands behind torn bytes.
//!
//! The same write can run on another thread: [`FixedLog::start_write`] takes the buffered
//! records into a [`LogWrite`] (with its own handle on the file), [`LogWrite::run`] writes
//! and fsyncs them there, and [`FixedLog::end_write`] takes the result back: the records are
//! on file, or buffered again ahead of those that came meanwhile. One write at a time.

use std::io;
use std::path::{Path, PathBuf};

use crate::io::{self as store_io, IoFile};
use crate::StoreError;

#[derive(Debug)]
pub(crate) struct FixedLog<F> {
    file: F,
    path: PathBuf,
    record_bytes: usize,
    /// Length of the records on file, whole and fsynced: the next write goes here.
    good_bytes: u64,
    /// Encoded records buffered and not yet flushed.
    pending: Vec<u8>,
    /// Bytes of records taken by a [`LogWrite`] that has not come back.
    writing: usize,
}

/// Records of a log on their way to its file, away from the thread that buffered them: see
/// [`FixedLog::start_write`].
#[derive(Debug)]
pub struct LogWrite<F> {
    file: F,
    bytes: Vec<u8>,
    at: u64,
    result: Option<io::Result<()>>,
}

impl<F: IoFile> LogWrite<F> {
    /// Writes the records at the end of the log's good ones and fsyncs; on failure the file
    /// is cut back there (best effort).
    pub fn run(&mut self) {
        self.result = Some(store_io::append_durably(
            &mut self.file,
            &self.bytes,
            self.at,
        ));
    }

    /// It ran and failed.
    pub fn failed(&self) -> bool {
        matches!(self.result, Some(Err(_)))
    }
}

impl<F: IoFile> FixedLog<F> {
    /// The log of the open file `file` at `path`, with a torn tail cut off (and the cut
    /// fsynced); also returns the bytes cut.
    pub(crate) fn new(
        mut file: F,
        path: PathBuf,
        record_bytes: usize,
    ) -> Result<(Self, u64), StoreError> {
        let (good_bytes, torn) = store_io::cut_torn_tail(&mut file, record_bytes, &path)?;
        let log = Self {
            file,
            path,
            record_bytes,
            good_bytes,
            pending: Vec::new(),
            writing: 0,
        };
        Ok((log, torn))
    }

    /// Buffers one encoded record.
    pub(crate) fn push(&mut self, record: &[u8]) {
        debug_assert_eq!(record.len(), self.record_bytes);
        self.pending.extend_from_slice(record);
    }

    /// Writes the buffered records at the end of the good ones and fsyncs; returns how many
    /// became durable (0 when none were buffered). On failure they stay buffered and the file
    /// is cut back (best effort), for the next flush to write at the same place.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        if self.writing > 0 {
            return Err(io::Error::other(
                "a write of this log is under way; flush after it comes back",
            ));
        }
        debug_assert_eq!(self.good_bytes % self.record_bytes as u64, 0);
        store_io::append_durably(&mut self.file, &self.pending, self.good_bytes)?;
        self.good_bytes += self.pending.len() as u64;
        let records = self.pending.len() / self.record_bytes;
        self.pending.clear();
        Ok(records)
    }

    /// Takes the buffered records for [`LogWrite::run`] elsewhere; `None` when none are
    /// buffered or a write is under way. Until [`FixedLog::end_write`] gets it back, new
    /// records are buffered behind it and [`FixedLog::flush`] refuses.
    pub(crate) fn start_write(&mut self) -> io::Result<Option<LogWrite<F>>> {
        if self.pending.is_empty() || self.writing > 0 {
            return Ok(None);
        }
        let file = self.file.try_clone()?;
        let bytes = std::mem::take(&mut self.pending);
        self.writing = bytes.len();
        Ok(Some(LogWrite {
            file,
            bytes,
            at: self.good_bytes,
            result: None,
        }))
    }

    /// The write [`FixedLog::start_write`] took, back: how many records became durable, or
    /// its error, the records then buffered again ahead of those that came meanwhile, for the
    /// next write at the same place.
    pub(crate) fn end_write(&mut self, write: LogWrite<F>) -> io::Result<usize> {
        debug_assert_eq!(
            self.writing,
            write.bytes.len(),
            "the write this log started"
        );
        self.writing = 0;
        let LogWrite {
            mut bytes, result, ..
        } = write;
        let result = result.unwrap_or_else(|| Err(io::Error::other("the log write never ran")));
        match result {
            Ok(()) => {
                self.good_bytes += bytes.len() as u64;
                Ok(bytes.len() / self.record_bytes)
            }
            Err(error) => {
                bytes.extend_from_slice(&self.pending);
                self.pending = bytes;
                Err(error)
            }
        }
    }

    /// A write is under way ([`FixedLog::start_write`]).
    pub(crate) fn writing(&self) -> bool {
        self.writing > 0
    }

    /// Records on file, whole.
    pub(crate) fn records_on_file(&self) -> u64 {
        self.good_bytes / self.record_bytes as u64
    }

    /// Records buffered and not yet durable (they grow while flushes fail).
    pub(crate) fn pending_records(&self) -> usize {
        (self.pending.len() + self.writing) / self.record_bytes
    }

    /// The file was replaced (renamed over) by `file`, whose whole records end at
    /// `good_bytes`; the buffered records are dropped.
    pub(crate) fn replaced(&mut self, file: F, good_bytes: u64) {
        debug_assert_eq!(good_bytes % self.record_bytes as u64, 0);
        debug_assert_eq!(self.writing, 0, "no write under way to the file replaced");
        self.file = file;
        self.good_bytes = good_bytes;
        self.pending.clear();
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
