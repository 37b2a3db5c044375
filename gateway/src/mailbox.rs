//! Mailboxes between shards: one bounded lock-free queue per ordered pair of shards.
//!
//! A full mailbox is backpressure: the sender keeps the mail in its own bounded outbox and
//! stops reading the connection that produced it until the mailbox drains. Nothing is dropped.
//! Wake-ups are coalesced: a shard is woken once per batch, however many mails the batch holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;

use crate::sys::Wake;
use hop_router::ShardId;

/// All mailboxes of one server. `P` is how a shard's backend reaches another shard
/// ([`crate::sys::Backend::Peer`]).
pub struct Mailboxes<M, P> {
    shards: usize,
    /// `queues[from * shards + to]`.
    queues: Vec<ArrayQueue<M>>,
    /// Set by a sender that woke the shard; cleared by the shard before it drains.
    wake_pending: Vec<AtomicBool>,
    peers: Vec<OnceLock<P>>,
    /// For threads without a backend.
    remote_wakers: Vec<OnceLock<Arc<dyn Wake>>>,
}

impl<M, P> std::fmt::Debug for Mailboxes<M, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailboxes")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl<M, P> Mailboxes<M, P> {
    /// `depth`: mails each queue holds.
    pub fn new(shards: usize, depth: usize) -> Self {
        assert!(shards > 0 && depth > 0, "mailboxes need shards and depth");
        Self {
            shards,
            queues: (0..shards * shards)
                .map(|_| ArrayQueue::new(depth))
                .collect(),
            wake_pending: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            peers: (0..shards).map(|_| OnceLock::new()).collect(),
            remote_wakers: (0..shards).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Each shard registers its address and remote waker once, before any mail is sent.
    pub fn register(&self, shard: ShardId, peer: P, remote_waker: Arc<dyn Wake>) {
        let index = usize::from(shard);
        assert!(
            self.peers[index].set(peer).is_ok(),
            "shard registered twice"
        );
        assert!(
            self.remote_wakers[index].set(remote_waker).is_ok(),
            "shard registered twice"
        );
    }

    /// The address of `shard`'s backend.
    pub fn peer(&self, shard: ShardId) -> &P {
        self.peers[usize::from(shard)]
            .get()
            .expect("every shard registers before mail flows")
    }

    /// Puts a mail in the `from -> to` queue; gives it back if the queue is full.
    pub fn push(&self, from: ShardId, to: ShardId, mail: M) -> Result<(), M> {
        self.queue(from, to).push(mail)
    }

    /// Takes one mail from the `from -> to` queue.
    pub fn pop(&self, from: ShardId, to: ShardId) -> Option<M> {
        self.queue(from, to).pop()
    }

    /// Mails waiting in the `from -> to` queue now (for metrics; racy by nature).
    pub fn depth(&self, from: ShardId, to: ShardId) -> usize {
        self.queue(from, to).len()
    }

    /// True if `shard` must be woken: no wake-up is pending for it yet (and now one is).
    pub fn needs_wake(&self, shard: ShardId) -> bool {
        !self.wake_pending[usize::from(shard)].swap(true, Ordering::AcqRel)
    }

    /// Wakes every shard from a thread without a backend (shutdown).
    pub fn wake_all_remotely(&self) {
        for index in 0..self.shards {
            if let Some(waker) = self.remote_wakers[index].get() {
                waker.wake();
            }
        }
    }

    /// Called by `shard` before draining its queues: later mail wakes it again.
    pub fn clear_wake(&self, shard: ShardId) {
        self.wake_pending[usize::from(shard)].store(false, Ordering::Release);
    }

    fn queue(&self, from: ShardId, to: ShardId) -> &ArrayQueue<M> {
        &self.queues[usize::from(from) * self.shards + usize::from(to)]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn full_mailbox_gives_the_mail_back() {
        let mailboxes: Mailboxes<u32, ()> = Mailboxes::new(2, 2);
        assert!(mailboxes.push(0, 1, 1).is_ok());
        assert!(mailboxes.push(0, 1, 2).is_ok());
        assert_eq!(mailboxes.push(0, 1, 3), Err(3));
        assert_eq!(mailboxes.pop(0, 1), Some(1));
        assert!(mailboxes.push(0, 1, 3).is_ok());
        assert_eq!(mailboxes.pop(1, 0), None, "queues are per direction");
    }

    #[test]
    fn wake_ups_are_coalesced_until_cleared() {
        let mailboxes: Mailboxes<u8, u8> = Mailboxes::new(2, 4);
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
        mailboxes.register(1, 7, waker.clone());
        assert_eq!(*mailboxes.peer(1), 7);
        assert!(mailboxes.needs_wake(1));
        assert!(!mailboxes.needs_wake(1));
        assert!(!mailboxes.needs_wake(1));
        mailboxes.clear_wake(1);
        assert!(mailboxes.needs_wake(1));
        mailboxes.wake_all_remotely();
        assert_eq!(waker.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn mail_crosses_threads_in_order() {
        let mailboxes: Arc<Mailboxes<u32, ()>> = Arc::new(Mailboxes::new(2, 64));
        let sender = {
            let mailboxes = mailboxes.clone();
            std::thread::spawn(move || {
                for value in 0..10_000u32 {
                    let mut mail = value;
                    while let Err(back) = mailboxes.push(0, 1, mail) {
                        mail = back;
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut expected = 0;
        while expected < 10_000 {
            match mailboxes.pop(0, 1) {
                Some(value) => {
                    assert_eq!(value, expected);
                    expected += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        sender.join().unwrap();
    }
}
