//! A small, bounded cache of segment file blocks for reading queues.
//!
//! Records of many users interleave in a segment in append order, so one user's queue is
//! scattered over the log. Reading queue after queue (what a start does when it restores every
//! queue, in [`crate::ShardStore::users`] order, and what re-homing does) would then cost one
//! read call per record: a system call each, which alone is slower than the drain target. The
//! next user's records sit next to the last user's, so keeping recently read blocks turns the
//! drain into about one read call per block.
//!
//! The cache is direct-mapped (a block has one place, picked by hashing its segment and block
//! number), so a lookup is a multiply and a compare and nothing is kept in order. A block holds
//! the bytes of a segment that were valid on file when it was read; those bytes never change,
//! because the store writes only past a segment's valid end and never reuses a segment number
//! within a folder. So one cache serves one shard folder, never two.

use std::io;

use crate::io::{read_at, IoFile, Wait};

/// Bytes of one cached block. A read smaller than this goes through the cache; a larger run
/// (adjacent records of one user, or a big body) is read directly, so the cache never reads
/// more than about one block around what was asked for.
pub(crate) const BLOCK_BYTES: usize = 4 * 1024;
/// Blocks kept at most. With [`BLOCK_BYTES`] this bounds the cache's memory (4 MiB per shard).
/// The next user's read hits the blocks the last one loaded only while one queue spans fewer
/// blocks than this, and fewer in practice: blocks that hash to one place evict each other.
pub(crate) const BLOCKS_MAX: usize = 1024;

/// A loaded block pays off when a later read hits it: a hit saves a read call, which costs more
/// than copying a block. When reads come in an order without locality (queues read in random
/// order), blocks are loaded and never hit; once loads outnumber hits by this much, a miss
/// reads only the bytes asked for, as without a cache...
pub(crate) const WASTE_MAX: u32 = 64;
/// ...except that one miss in this many still loads its block, so that the cache notices when
/// locality comes back.
pub(crate) const PROBE_EVERY_MISSES: u32 = 16;

const _: () = assert!(BLOCKS_MAX.is_power_of_two());
const _: () = assert!(BLOCK_BYTES.is_power_of_two());

#[derive(Debug, Default)]
pub(crate) struct BlockCache {
    /// Empty until the first read, then `BLOCKS_MAX` places.
    blocks: Vec<Block>,
    /// A read used the cache since the last [`BlockCache::release_if_idle`].
    used: bool,
    /// Blocks loaded minus hits, within `0..=WASTE_MAX`.
    waste: u32,
    /// While `waste` is at its maximum: misses read directly before the next one loads a block.
    misses_until_probe: u32,
    /// Read calls made to the files, for [`crate::Counters::read_calls`].
    pub(crate) read_calls: u64,
}

#[derive(Debug, Default)]
struct Block {
    segment: u32,
    number: u32,
    /// The block's bytes that were valid on file when it was read; empty: no block here.
    bytes: Vec<u8>,
}

impl BlockCache {
    /// Appends bytes `offset..offset + length` of segment `segment` to `out`. A read of at
    /// least [`BLOCK_BYTES`] is one read call; a smaller one reads the whole blocks around it
    /// (clipped to the file's `file_bytes` valid bytes) where they are not cached, unless
    /// loaded blocks have stopped paying off (see [`WASTE_MAX`]). On error `out` may hold part
    /// of the bytes; the caller drops them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_into<F: IoFile>(
        &mut self,
        segment: u32,
        file: &F,
        file_bytes: u64,
        offset: u64,
        length: usize,
        out: &mut Vec<u8>,
        wait: Wait,
    ) -> io::Result<()> {
        let end = offset + length as u64;
        assert!(end <= file_bytes, "reads stay within the valid bytes");
        if length >= BLOCK_BYTES {
            return self.read_directly(file, offset, length, out, wait);
        }
        if self.blocks.is_empty() {
            self.blocks.resize_with(BLOCKS_MAX, Block::default);
        }
        self.used = true;
        for Piece {
            number,
            start: block_start,
            within,
        } in pieces(offset, length)
        {
            let at = block_start + within.start as u64;
            let block = &mut self.blocks[place(segment, number)];
            // A block read before the segment grew may be too short: read it again.
            let cached = block.segment == segment
                && block.number == number
                && block.bytes.len() >= within.end;
            if cached {
                self.waste = self.waste.saturating_sub(1);
            } else {
                if self.waste == WASTE_MAX {
                    if self.misses_until_probe > 0 {
                        self.misses_until_probe -= 1;
                        return self.read_directly(file, at, (end - at) as usize, out, wait);
                    }
                    self.misses_until_probe = PROBE_EVERY_MISSES - 1;
                }
                self.waste = (self.waste + 1).min(WASTE_MAX);
                // The read overwrites every byte: only a growing block needs zeros.
                let valid = (file_bytes - block_start).min(BLOCK_BYTES as u64) as usize;
                block.bytes.resize(valid, 0);
                self.read_calls += 1;
                if let Err(error) = read_at(file, &mut block.bytes, block_start, wait) {
                    block.bytes.clear();
                    return Err(error);
                }
                block.segment = segment;
                block.number = number;
            }
            out.extend_from_slice(&block.bytes[within]);
        }
        Ok(())
    }

    /// Whether bytes `offset..offset + length` of `segment` are all in cached blocks, so that
    /// [`BlockCache::read_into`] would serve them without a read call.
    pub(crate) fn holds(&self, segment: u32, offset: u64, length: usize) -> bool {
        if length >= BLOCK_BYTES || self.blocks.is_empty() {
            return false;
        }
        pieces(offset, length).all(|piece| {
            let block = &self.blocks[place(segment, piece.number)];
            block.segment == segment
                && block.number == piece.number
                && block.bytes.len() >= piece.within.end
        })
    }

    /// Whether a small read that misses loads whole blocks now (loaded blocks pay off), or
    /// reads only the bytes asked for (see [`WASTE_MAX`]).
    pub(crate) fn loads_blocks(&self) -> bool {
        self.waste < WASTE_MAX
    }

    /// Keeps block `number` of `segment`, read elsewhere (a read job): `bytes` are the
    /// segment's bytes from the block's start that were valid on file when it was read.
    pub(crate) fn insert(&mut self, segment: u32, number: u32, bytes: Vec<u8>) {
        debug_assert!(bytes.len() <= BLOCK_BYTES);
        if self.blocks.is_empty() {
            self.blocks.resize_with(BLOCKS_MAX, Block::default);
        }
        self.used = true;
        let block = &mut self.blocks[place(segment, number)];
        if block.segment == segment && block.number == number && block.bytes.len() >= bytes.len() {
            return;
        }
        self.waste = (self.waste + 1).min(WASTE_MAX);
        *block = Block {
            segment,
            number,
            bytes,
        };
    }

    fn read_directly<F: IoFile>(
        &mut self,
        file: &F,
        offset: u64,
        length: usize,
        out: &mut Vec<u8>,
        wait: Wait,
    ) -> io::Result<()> {
        let start = out.len();
        out.resize(start + length, 0);
        self.read_calls += 1;
        read_at(file, &mut out[start..], offset, wait)
    }

    /// Drops the blocks of a deleted segment, so its bytes do not linger in memory.
    pub(crate) fn forget_segment(&mut self, segment: u32) {
        for block in &mut self.blocks {
            if block.segment == segment {
                block.bytes.clear();
            }
        }
    }

    /// Frees the cache's memory when no read used it since the last call; the shard loop's
    /// idle work calls this, so a burst of reads (a start restoring every queue) keeps its
    /// blocks and a shard that no longer reads gives them back.
    pub(crate) fn release_if_idle(&mut self) {
        if !self.used {
            self.blocks = Vec::new();
        }
        self.used = false;
    }

    /// Bytes of segment files the cache holds.
    #[cfg(test)]
    fn cached_bytes(&self) -> usize {
        self.blocks.iter().map(|block| block.bytes.len()).sum()
    }
}

/// The part of one block that a read of a segment covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) number: u32,
    /// The block's first byte in the segment.
    pub(crate) start: u64,
    /// The bytes wanted, from the block's start.
    pub(crate) within: std::ops::Range<usize>,
}

/// The blocks that bytes `offset..offset + length` of a segment fall in, in order, each with
/// the part of it wanted.
pub(crate) fn pieces(offset: u64, length: usize) -> impl Iterator<Item = Piece> {
    let block_bytes = BLOCK_BYTES as u64;
    let end = offset + length as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let start = at / block_bytes * block_bytes;
        let piece_end = end.min(start + block_bytes);
        let piece = Piece {
            number: u32::try_from(start / block_bytes).expect("segment offsets fit u32"),
            start,
            within: (at - start) as usize..(piece_end - start) as usize,
        };
        at = piece_end;
        Some(piece)
    })
}

/// The one place block `number` of `segment` may occupy.
fn place(segment: u32, number: u32) -> usize {
    let key = (u64::from(segment) << 32) | u64::from(number);
    let hash = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hash >> (64 - BLOCKS_MAX.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::io::Write;

    use super::*;

    /// A file that counts its read calls and bytes and can be made to fail them.
    struct CountingFile {
        file: std::fs::File,
        reads: Cell<u32>,
        bytes_read: Cell<usize>,
        fail: Cell<bool>,
    }

    impl IoFile for CountingFile {
        fn size_bytes(&self) -> io::Result<u64> {
            self.file.size_bytes()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.set(self.reads.get() + 1);
            self.bytes_read.set(self.bytes_read.get() + buf.len());
            if self.fail.get() {
                return Err(io::Error::from_raw_os_error(5));
            }
            IoFile::read_exact_at(&self.file, buf, offset)
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            IoFile::write_all_at(&mut self.file, buf, offset)
        }
        fn unlinked(&self) -> io::Result<bool> {
            self.file.unlinked()
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.file.truncate(len)
        }
        fn try_clone(&self) -> io::Result<Self> {
            Ok(Self {
                file: self.file.try_clone()?,
                reads: Cell::new(0),
                bytes_read: Cell::new(0),
                fail: Cell::new(self.fail.get()),
            })
        }
    }

    fn pattern(length: usize) -> Vec<u8> {
        (0..length).map(|at| (at * 7 % 251) as u8).collect()
    }

    fn file_with(bytes: &[u8]) -> CountingFile {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(bytes).expect("write");
        CountingFile {
            file,
            reads: Cell::new(0),
            bytes_read: Cell::new(0),
            fail: Cell::new(false),
        }
    }

    fn read(cache: &mut BlockCache, file: &CountingFile, offset: u64, length: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let file_bytes = file.size_bytes().expect("size");
        cache
            .read_into(1, file, file_bytes, offset, length, &mut out, Wait::ForDisk)
            .expect("read");
        out
    }

    #[test]
    fn a_read_falls_in_the_blocks_around_it() {
        let block = BLOCK_BYTES as u64;
        let found: Vec<Piece> = pieces(block - 6, 10).collect();
        assert_eq!(
            found,
            [
                Piece {
                    number: 0,
                    start: 0,
                    within: BLOCK_BYTES - 6..BLOCK_BYTES,
                },
                Piece {
                    number: 1,
                    start: block,
                    within: 0..4,
                },
            ]
        );
        assert_eq!(pieces(0, 0).count(), 0);
    }

    #[test]
    fn reads_return_the_file_bytes_across_block_edges() {
        let bytes = pattern(3 * BLOCK_BYTES + 100);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        for (offset, length) in [
            (0, 1),
            (BLOCK_BYTES - 10, 20),
            (10, 2 * BLOCK_BYTES + 50),
            (3 * BLOCK_BYTES, 100),
            (3 * BLOCK_BYTES + 99, 1),
        ] {
            let got = read(&mut cache, &file, offset as u64, length);
            assert_eq!(got, &bytes[offset..offset + length], "at {offset}+{length}");
        }
    }

    #[test]
    fn neighbouring_records_cost_one_read_call_per_block() {
        let bytes = pattern(2 * BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        for record in 0..(2 * BLOCK_BYTES / 128) {
            let got = read(&mut cache, &file, (record * 128) as u64, 128);
            assert_eq!(got, &bytes[record * 128..(record + 1) * 128]);
        }
        assert_eq!(file.reads.get(), 2);
        assert_eq!(cache.read_calls, 2);
    }

    #[test]
    fn a_read_of_a_block_or_more_is_one_read_call_and_not_cached() {
        let bytes = pattern(4 * BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        let (offset, length) = (BLOCK_BYTES / 2, 2 * BLOCK_BYTES + 1);
        let got = read(&mut cache, &file, offset as u64, length);
        assert_eq!(got, &bytes[offset..offset + length]);
        assert_eq!((file.reads.get(), cache.read_calls), (1, 1));
        assert_eq!(cache.cached_bytes(), 0);
    }

    #[test]
    fn reads_without_locality_stop_loading_blocks_until_locality_returns() {
        let blocks = 2 * BLOCKS_MAX;
        let bytes = pattern(blocks * BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        // Scattered: every block once, 10 bytes of each, in a stride order.
        let scattered = 1000;
        for k in 0..scattered {
            let offset = (k * 7 % blocks) * BLOCK_BYTES + 100;
            assert_eq!(
                read(&mut cache, &file, offset as u64, 10),
                &bytes[offset..offset + 10]
            );
        }
        let loads_max = WASTE_MAX as usize + scattered / PROBE_EVERY_MISSES as usize + 1;
        let bytes_max = loads_max * BLOCK_BYTES + scattered * 10;
        assert!(
            file.bytes_read.get() <= bytes_max,
            "{} bytes read",
            file.bytes_read.get()
        );

        // Then neighbouring records again: the cache earns its keep back.
        let reads_before = file.reads.get();
        let records = 4 * BLOCK_BYTES / 64;
        for record in 0..records {
            let offset = 9 * BLOCK_BYTES + record * 64;
            assert_eq!(
                read(&mut cache, &file, offset as u64, 64),
                &bytes[offset..offset + 64]
            );
        }
        let reads = (file.reads.get() - reads_before) as usize;
        assert!(
            reads < records / 4,
            "{reads} read calls for {records} neighbours"
        );
    }

    #[test]
    fn a_block_read_before_the_file_grew_is_read_again() {
        let mut bytes = pattern(BLOCK_BYTES / 2);
        let mut file = file_with(&bytes);
        let mut cache = BlockCache::default();
        assert_eq!(read(&mut cache, &file, 0, 100), &bytes[..100]);
        let more = pattern(BLOCK_BYTES);
        IoFile::write_all_at(&mut file, &more, bytes.len() as u64).expect("append");
        bytes.extend_from_slice(&more);
        let start = BLOCK_BYTES / 2 - 10;
        assert_eq!(
            read(&mut cache, &file, start as u64, 20),
            &bytes[start..start + 20]
        );
        assert_eq!(file.reads.get(), 2);
    }

    #[test]
    fn nothing_past_the_valid_bytes_is_read_or_kept() {
        // The file holds junk past what the store counts as valid (a failed write's tail).
        let bytes = pattern(BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        let mut out = Vec::new();
        cache
            .read_into(1, &file, 300, 200, 100, &mut out, Wait::ForDisk)
            .expect("read");
        assert_eq!(out, &bytes[200..300]);
        assert_eq!(cache.cached_bytes(), 300);
    }

    #[test]
    fn a_failed_read_caches_nothing_and_the_next_read_tries_again() {
        let bytes = pattern(BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        file.fail.set(true);
        let mut out = Vec::new();
        assert!(cache
            .read_into(1, &file, bytes.len() as u64, 0, 10, &mut out, Wait::ForDisk)
            .is_err());
        file.fail.set(false);
        assert_eq!(read(&mut cache, &file, 0, 10), &bytes[..10]);
        assert_eq!(file.reads.get(), 2);
    }

    #[test]
    fn a_forgotten_segment_is_read_again_and_idle_memory_is_released() {
        let bytes = pattern(BLOCK_BYTES);
        let file = file_with(&bytes);
        let mut cache = BlockCache::default();
        read(&mut cache, &file, 0, 10);
        cache.forget_segment(2);
        read(&mut cache, &file, 0, 10);
        assert_eq!(file.reads.get(), 1, "another segment's blocks stay");
        cache.forget_segment(1);
        read(&mut cache, &file, 0, 10);
        assert_eq!(file.reads.get(), 2);

        cache.release_if_idle();
        assert!(cache.cached_bytes() > 0, "used since the last call: kept");
        cache.release_if_idle();
        assert_eq!(cache.cached_bytes(), 0);
        assert_eq!(read(&mut cache, &file, 5, 10), &bytes[5..15]);
    }
}
