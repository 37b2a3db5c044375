//! The provided buffer ring: one per shard, shared by all its connections, so that an idle
//! connection holds no receive buffer. The kernel takes a buffer when data arrives and names it
//! in the completion; the backend hands the bytes to the shard and gives the buffer back at
//! once.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// Which buffers the kernel holds, and where the next returned one goes in the ring. Pure
/// bookkeeping, apart from the memory.
#[derive(Debug)]
pub struct Ledger {
    /// Indexed by buffer id: true while the kernel may write it.
    in_kernel: Vec<bool>,
    /// The ring's tail as this side has published it (free-running, wraps at 2^16).
    tail: u16,
    mask: u16,
}

/// A buffer was given back twice, or one the kernel never took was named.
#[derive(Debug, PartialEq, Eq)]
pub struct LedgerError;

impl Ledger {
    /// `entries` is a power of two; all buffers start out given to the kernel.
    pub fn new(entries: u16) -> Self {
        assert!(entries.is_power_of_two());
        Self {
            in_kernel: vec![false; usize::from(entries)],
            tail: 0,
            mask: entries - 1,
        }
    }

    /// The kernel used buffer `bid` (a completion named it).
    pub fn taken(&mut self, bid: u16) -> Result<(), LedgerError> {
        match self.in_kernel.get_mut(usize::from(bid)) {
            Some(slot) if *slot => {
                *slot = false;
                Ok(())
            }
            _ => Err(LedgerError),
        }
    }

    /// Gives `bid` to the kernel: the ring index to write it at. The caller publishes the tail.
    pub fn give(&mut self, bid: u16) -> Result<u16, LedgerError> {
        match self.in_kernel.get_mut(usize::from(bid)) {
            Some(slot) if !*slot => {
                *slot = true;
                let index = self.tail & self.mask;
                self.tail = self.tail.wrapping_add(1);
                Ok(index)
            }
            _ => Err(LedgerError),
        }
    }

    pub fn tail(&self) -> u16 {
        self.tail
    }

    /// Buffers the kernel holds now.
    #[cfg(test)]
    pub fn in_kernel(&self) -> usize {
        self.in_kernel.iter().filter(|held| **held).count()
    }
}

/// The ring's memory and its buffers.
pub struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    buffers: Box<[u8]>,
    buffer_bytes: usize,
    ledger: Ledger,
    group: u16,
    /// Registered with the kernel: the memory must outlive the registration.
    registered: bool,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("group", &self.group)
            .field("buffer_bytes", &self.buffer_bytes)
            .finish_non_exhaustive()
    }
}

impl BufRing {
    /// Allocates `entries` buffers of `buffer_bytes`, registers them as group `group`, and
    /// gives them all to the kernel.
    pub fn register(
        ring: &IoUring,
        entries: u16,
        buffer_bytes: usize,
        group: u16,
    ) -> io::Result<Self> {
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size (entries > 0 is asserted by the ledger).
        let memory = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if memory.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut this = Self {
            ring: memory,
            ring_layout,
            buffers: vec![0u8; usize::from(entries) * buffer_bytes].into_boxed_slice(),
            buffer_bytes,
            ledger: Ledger::new(entries),
            group,
            registered: false,
        };
        // SAFETY: `memory` is page-aligned, zeroed and `entries` entries long; it is freed only
        // in `Drop`, after the group is unregistered (or never, if unregistering fails).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(memory as u64, entries, group, 0)?;
        }
        this.registered = true;
        for bid in 0..entries {
            this.give_back(bid);
        }
        Ok(this)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// The first `len` bytes the kernel wrote into buffer `bid`, which it gave up with the
    /// completion naming it. Call [`BufRing::give_back`] when done.
    pub fn take(&mut self, bid: u16, len: usize) -> Option<&[u8]> {
        self.ledger.taken(bid).ok()?;
        let start = usize::from(bid) * self.buffer_bytes;
        self.buffers.get(start..start + len.min(self.buffer_bytes))
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn give_back(&mut self, bid: u16) {
        let Ok(index) = self.ledger.give(bid) else {
            return;
        };
        let address = self.buffers[usize::from(bid) * self.buffer_bytes..].as_ptr() as u64;
        // SAFETY: `index` is below `entries` (masked by the ledger), so the entry lies in the
        // ring memory allocated in `register`; the kernel reads only entries between its head
        // and the published tail, and this one is past the tail until the store below.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(index));
            entry.set_addr(address);
            entry.set_len(self.buffer_bytes as u32);
            entry.set_bid(bid);
            let tail = BufRingEntry::tail(self.ring).cast::<AtomicU16>();
            (*tail).store(self.ledger.tail(), Ordering::Release);
        }
    }

    /// Unregisters the group; the memory is freed on drop only if this succeeded.
    pub fn unregister(&mut self, ring: &IoUring) {
        if self.registered && ring.submitter().unregister_buf_ring(self.group).is_ok() {
            self.registered = false;
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // The kernel may still know the memory: leak it rather than free it under it.
            let buffers = std::mem::take(&mut self.buffers);
            std::mem::forget(buffers);
            return;
        }
        // SAFETY: allocated in `register` with this layout and no longer registered.
        unsafe { dealloc(self.ring.cast(), self.ring_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_in_any_order_at_the_tail() {
        let mut ledger = Ledger::new(4);
        for bid in 0..4 {
            assert_eq!(ledger.give(bid), Ok(bid));
        }
        assert_eq!(ledger.in_kernel(), 4);
        ledger.taken(2).unwrap();
        ledger.taken(0).unwrap();
        assert_eq!(ledger.in_kernel(), 2);
        assert_eq!(ledger.give(2), Ok(0), "wraps to the ring's first index");
        assert_eq!(ledger.give(0), Ok(1));
        assert_eq!(ledger.tail(), 6);
    }

    #[test]
    fn double_returns_and_unknown_ids_are_refused() {
        let mut ledger = Ledger::new(2);
        ledger.give(0).unwrap();
        assert_eq!(ledger.give(0), Err(LedgerError), "given twice");
        assert_eq!(ledger.taken(1), Err(LedgerError), "never given");
        assert_eq!(ledger.taken(9), Err(LedgerError), "no such buffer");
        ledger.taken(0).unwrap();
        assert_eq!(ledger.taken(0), Err(LedgerError), "taken twice");
    }

    #[test]
    fn the_tail_wraps_at_sixteen_bits() {
        let mut ledger = Ledger::new(1);
        for _ in 0..70_000u32 {
            ledger.give(0).unwrap();
            ledger.taken(0).unwrap();
        }
        assert_eq!(ledger.tail(), (70_000u32 % 65_536) as u16);
    }
}
