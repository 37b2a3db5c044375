//! The storage seam: every byte the store reads or writes goes through [`Io`] and [`IoFile`].
//!
//! [`FsIo`] is the real file system. [`FaultyIo`] wraps it and fails writes (all, the next one,
//! or those past a byte budget, which then land in part), fsyncs (all or the next one), reads,
//! truncates or the next rename on purpose (disk full, EIO), so tests can check that nothing
//! already durable is lost and that the failing batch is reported.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// The file system as the store uses it. Methods take `&self`: an `Io` is a handle, and a
/// clone of it (which a [`crate::SyncJob`] carries to another thread) is the same file system.
pub trait Io: Clone {
    type File: IoFile;

    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of `path`; `NotFound` when it does not exist.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Creates a new file for reading and writing; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file, for reading and writing unless `read_only`.
    fn open(&self, path: &Path, read_only: bool) -> io::Result<Self::File>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (created, renamed, removed files) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
}

/// Appends `bytes` to a log file whose known-good bytes end at `end`, and syncs them. On a
/// failed write or sync the file is truncated back to `end` (best effort: whatever part landed
/// is not known to be durable) and the error returned; the caller keeps `end`, so its next try
/// writes at the same place, over any torn bytes, never after them.
pub fn append_durably<F: IoFile>(file: &mut F, bytes: &[u8], end: u64) -> io::Result<()> {
    let written = file.write_all_at(bytes, end).and_then(|()| file.sync());
    if let Err(error) = written {
        let _ = file.truncate(end);
        return Err(error);
    }
    Ok(())
}

/// Opens (or creates) shard `shard`'s log `DATA/accounts/shard-K<suffix>`, with its folder.
pub fn open_shard_log<I: Io>(
    io: &I,
    data: &Path,
    shard: u16,
    suffix: &str,
) -> Result<(I::File, PathBuf), crate::StoreError> {
    let folder = crate::accounts::folder(data);
    io.create_dir_all(&folder)
        .map_err(crate::StoreError::io(&folder))?;
    let path = folder.join(format!("shard-{shard}{suffix}"));
    let (file, _) = open_or_create_log(io, &path, &folder, data)?;
    Ok((file, path))
}

/// The `shard-K<suffix>` files under `DATA/accounts`, by shard number (none when the folder
/// does not exist).
pub fn shard_files<I: Io>(
    io: &I,
    data: &Path,
    suffix: &str,
) -> Result<Vec<(u16, PathBuf)>, crate::StoreError> {
    let folder = crate::accounts::folder(data);
    let names = match io.list_dir(&folder) {
        Ok(names) => names,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(crate::StoreError::io(&folder)(error)),
    };
    let mut files: Vec<(u16, PathBuf)> = names
        .into_iter()
        .filter_map(|name| {
            let shard = name.strip_prefix("shard-")?.strip_suffix(suffix)?;
            Some((shard.parse().ok()?, folder.join(&name)))
        })
        .collect();
    files.sort_unstable();
    Ok(files)
}

/// Opens the log file `path` in `folder` (under `data`) for reading and writing, creating it if
/// it does not exist; a created file's name is made durable (both folders synced) before any
/// record in it is relied on. Returns the file and whether it was created.
pub fn open_or_create_log<I: Io>(
    io: &I,
    path: &Path,
    folder: &Path,
    data: &Path,
) -> Result<(I::File, bool), crate::StoreError> {
    match io.open(path, false) {
        Ok(file) => Ok((file, false)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let file = io.create(path).map_err(crate::StoreError::io(path))?;
            io.sync_dir(folder).map_err(crate::StoreError::io(folder))?;
            io.sync_dir(data).map_err(crate::StoreError::io(data))?;
            Ok((file, true))
        }
        Err(error) => Err(crate::StoreError::io(path)(error)),
    }
}

/// Cuts a torn tail off a log of fixed-size records (`length % record_bytes` bytes left by a
/// write a crash interrupted) and syncs the cut, so that later records stay aligned. Returns the
/// length of the whole records and the bytes cut.
pub fn cut_torn_tail<F: IoFile>(
    file: &mut F,
    record_bytes: usize,
    path: &Path,
) -> Result<(u64, u64), crate::StoreError> {
    let length = file.size_bytes().map_err(crate::StoreError::io(path))?;
    let torn = length % record_bytes as u64;
    let good_bytes = length - torn;
    if torn > 0 {
        file.truncate(good_bytes)
            .map_err(crate::StoreError::io(path))?;
        file.sync().map_err(crate::StoreError::io(path))?;
    }
    Ok((good_bytes, torn))
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    ForDisk,
    /// Only what the page cache holds; otherwise the read fails with `WouldBlock`.
    Never,
}

/// Fills `buf` from `offset` of `file`, waiting for the disk or not: `WouldBlock` when the
/// bytes are not in the page cache, `Unsupported` where that cannot be told.
pub(crate) fn read_at<F: IoFile>(
    file: &F,
    buf: &mut [u8],
    offset: u64,
    wait: Wait,
) -> io::Result<()> {
    match wait {
        Wait::ForDisk => file.read_exact_at(buf, offset),
        Wait::Never if file.read_cached_at(buf, offset)? => Ok(()),
        Wait::Never => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// An open file. Writes are positioned: the store always knows where its bytes go, so a
/// failed, partly written batch is overwritten by the next one instead of hiding before it.
pub trait IoFile {
    fn size_bytes(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` from `offset` only if the kernel has those bytes in memory (the page
    /// cache), never waiting for the disk: `Ok(true)` read, `Ok(false)` the read would have
    /// waited, and `buf` then holds nothing of use; `Unsupported` where the platform or the
    /// file system cannot tell.
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Asks the kernel to read `length` bytes from `offset` into its page cache in the
    /// background (`posix_fadvise(WILLNEED)`), so that a later read does not wait; a hint that
    /// may do nothing.
    fn prefetch(&self, offset: u64, length: usize) {
        let _ = (offset, length);
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Whether the file has no name left (removed since it was opened): what is written to
    /// it is lost with its last handle.
    fn unlinked(&self) -> io::Result<bool>;
    /// `fdatasync`: the written bytes (and the length) are on stable storage.
    fn sync(&mut self) -> io::Result<()>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Another handle on the same open file (`dup`): its `sync` makes this one's writes
    /// durable, so a sync can run on another thread while this handle goes on writing.
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsIo;

/// The mode of every folder the store creates: its owner's alone.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// The mode of every file the store creates: its owner's alone.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

impl Io for FsIo {
    type File = File;

    /// Folders are for hopd alone (0700): they hold message bodies and keys.
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, PRIVATE_DIR_MODE);
        builder.create(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Files are for hopd alone (0600), whatever the umask allows.
    fn create(&self, path: &Path) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, PRIVATE_FILE_MODE);
        options.open(path)
    }

    fn open(&self, path: &Path, read_only: bool) -> io::Result<File> {
        OpenOptions::new().read(true).write(!read_only).open(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

impl IoFile for File {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    /// `preadv2` with `RWF_NOWAIT` (Linux 4.14): `EAGAIN` when a byte asked for is not in the
    /// page cache; a file system that cannot tell fails with `EOPNOTSUPP`.
    #[cfg(target_os = "linux")]
    fn read_cached_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<bool> {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        while !buf.is_empty() {
            let slice = &mut [io::IoSliceMut::new(buf)];
            match preadv2(self, slice, offset, ReadWriteFlags::NOWAIT) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                Ok(read) => {
                    buf = &mut buf[read..];
                    offset += read as u64;
                }
                Err(Errno::AGAIN) => return Ok(false),
                Err(Errno::OPNOTSUPP) => return Err(io::ErrorKind::Unsupported.into()),
                Err(Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(true)
    }

    #[cfg(target_os = "linux")]
    fn prefetch(&self, offset: u64, length: usize) {
        use rustix::fs::{fadvise, Advice};
        // A hint: if the kernel does not take it, the read that follows waits.
        let _ = fadvise(
            self,
            offset,
            std::num::NonZeroU64::new(length as u64),
            Advice::WillNeed,
        );
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn unlinked(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.metadata()?.nlink() == 0)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }

    fn try_clone(&self) -> io::Result<Self> {
        File::try_clone(self)
    }
}

/// Switches a test flips to make [`FaultyIo`] fail.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every write fails with "no space left on device".
    pub fail_writes: AtomicBool,
    /// Every fsync (file or directory) fails with EIO.
    pub fail_syncs: AtomicBool,
    /// Every read fails with EIO.
    pub fail_reads: AtomicBool,
    /// Nothing is in the page cache: every read that must not wait for the disk would.
    pub uncached: AtomicBool,
    /// Read-ahead hints given ([`IoFile::prefetch`]).
    pub prefetches: AtomicU64,
    /// When non-negative: bytes that may still be written before writes fail with ENOSPC; a
    /// write that crosses the limit writes the part that fits, as a full disk does.
    pub write_bytes_left: AtomicI64,
    /// The next write fails with ENOSPC, writing nothing; later ones work (a passing error).
    pub fail_next_write: AtomicBool,
    /// The next fsync (file or directory) fails with EIO; later ones work.
    pub fail_next_sync: AtomicBool,
    /// Every truncate fails with EIO (the cleanup after a failed write fails too).
    pub fail_truncates: AtomicBool,
    /// The next rename fails with EIO, renaming nothing; later ones work (a crash between
    /// writing a replacement file and renaming it over the original).
    pub fail_next_rename: AtomicBool,
    /// The next file removal fails with EIO; later ones work.
    pub fail_next_remove: AtomicBool,
    /// File and directory fsyncs done, for counting.
    pub syncs: AtomicU64,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        let faults = Self::default();
        faults.write_bytes_left.store(-1, Ordering::Relaxed);
        Arc::new(faults)
    }
}

/// [`FsIo`] with injected failures.
#[derive(Debug, Clone)]
pub struct FaultyIo {
    pub faults: Arc<Faults>,
}

#[derive(Debug)]
pub struct FaultyFile {
    file: File,
    faults: Arc<Faults>,
}

fn disk_full() -> io::Error {
    io::Error::from_raw_os_error(28) // ENOSPC
}

fn io_error() -> io::Error {
    io::Error::from_raw_os_error(5) // EIO
}

impl Io for FaultyIo {
    type File = FaultyFile;

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        FsIo.create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        FsIo.list_dir(path)
    }

    fn create(&self, path: &Path) -> io::Result<FaultyFile> {
        if self.faults.fail_writes.load(Ordering::Relaxed) {
            return Err(disk_full());
        }
        Ok(FaultyFile {
            file: FsIo.create(path)?,
            faults: self.faults.clone(),
        })
    }

    fn open(&self, path: &Path, read_only: bool) -> io::Result<FaultyFile> {
        Ok(FaultyFile {
            file: FsIo.open(path, read_only)?,
            faults: self.faults.clone(),
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if self.faults.fail_next_remove.swap(false, Ordering::Relaxed) {
            return Err(io_error());
        }
        FsIo.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        FsIo.remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.faults.fail_next_rename.swap(false, Ordering::Relaxed) {
            return Err(io_error());
        }
        FsIo.rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if self.faults.fail_syncs.load(Ordering::Relaxed)
            || self.faults.fail_next_sync.swap(false, Ordering::Relaxed)
        {
            return Err(io_error());
        }
        self.faults.syncs.fetch_add(1, Ordering::Relaxed);
        FsIo.sync_dir(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

impl IoFile for FaultyFile {
    fn size_bytes(&self) -> io::Result<u64> {
        self.file.size_bytes()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.faults.fail_reads.load(Ordering::Relaxed) {
            return Err(io_error());
        }
        IoFile::read_exact_at(&self.file, buf, offset)
    }

    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.faults.fail_reads.load(Ordering::Relaxed) {
            return Err(io_error());
        }
        if self.faults.uncached.load(Ordering::Relaxed) {
            return Ok(false);
        }
        IoFile::read_cached_at(&self.file, buf, offset)
    }

    fn prefetch(&self, offset: u64, length: usize) {
        self.faults.prefetches.fetch_add(1, Ordering::Relaxed);
        IoFile::prefetch(&self.file, offset, length);
    }

    fn unlinked(&self) -> io::Result<bool> {
        self.file.unlinked()
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.faults.fail_writes.load(Ordering::Relaxed)
            || self.faults.fail_next_write.swap(false, Ordering::Relaxed)
        {
            return Err(disk_full());
        }
        let left = self.faults.write_bytes_left.load(Ordering::Relaxed);
        if left >= 0 {
            let fits = (left as usize).min(buf.len());
            IoFile::write_all_at(&mut self.file, &buf[..fits], offset)?;
            self.faults
                .write_bytes_left
                .store(left - fits as i64, Ordering::Relaxed);
            if fits < buf.len() {
                return Err(disk_full());
            }
            return Ok(());
        }
        IoFile::write_all_at(&mut self.file, buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.faults.fail_syncs.load(Ordering::Relaxed)
            || self.faults.fail_next_sync.swap(false, Ordering::Relaxed)
        {
            return Err(io_error());
        }
        self.faults.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        if self.faults.fail_truncates.load(Ordering::Relaxed) {
            return Err(io_error());
        }
        self.file.truncate(len)
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            faults: self.faults.clone(),
        })
    }
}
