//! Reads of the offline queue, off the shard's thread.
//!
//! A user who comes online is pushed its queue: messages whose bodies the router let go once
//! they were kept, so the shard reads them back from the store. A read the kernel serves from
//! its page cache takes microseconds; one that goes to the disk takes milliseconds on a busy
//! one, and on the shard's loop it would stall every connection of the shard for that long.
//! So the loop reads only what does not wait (memory, the store's block cache, and the page
//! cache through `preadv2` with `RWF_NOWAIT`), and otherwise asks the store for a
//! [`ReadJob`](hop_store::ReadJob) and hands it to this shard's reader thread, which runs it,
//! sends back what it read and wakes the loop. Meanwhile everything queued for that connection
//! waits in order behind the read (the shard's `Hold`), so nothing overtakes the queued
//! messages.
//!
//! At most [`READS_MAX`] jobs are with the thread at once; further reads wait for room, and are
//! planned once earlier jobs brought their blocks into the block cache (a queue's records lie
//! in the same blocks as other users', so jobs planned together would read the same blocks).
//! If the thread cannot be started, the loop reads, as before the reader.

use std::sync::Arc;
use std::time::Duration;

use hop_store::io::FsIo;
use hop_store::{ReadDone, ReadJob};
use tracing::warn;

use crate::sys::helper::Helper;
use crate::sys::realtime::{self, RealTime};
use crate::sys::ConnId;
use crate::sys::Wake;

/// Jobs with the thread at once, per shard: one thread works them in turn anyway, so more
/// would only read the same blocks twice.
pub const READS_MAX: usize = 4;
/// Answers before the thread wakes the loop while more jobs wait: one wake-up for a run of
/// reads, not one each.
const WAKE_EVERY: usize = 8;

/// A read for connection `conn` (of this generation).
#[derive(Debug)]
pub struct Read {
    pub conn: ConnId,
    pub generation: u32,
    pub job: ReadJob<FsIo>,
}

/// What a [`Read`] read.
#[derive(Debug)]
pub struct Answer {
    pub conn: ConnId,
    pub generation: u32,
    pub done: ReadDone,
}

/// One shard's reader thread.
#[derive(Debug)]
pub struct Reader {
    worker: Option<Helper<Read, Answer>>,
    /// Jobs handed to the thread whose answers the loop has not taken.
    in_flight: usize,
    /// A slow disk is simulated (fault injection): nothing counts as in the page cache.
    slow_disk: bool,
}

impl Reader {
    /// Starts shard `shard`'s reader thread; it wakes the loop with its answers. Without a
    /// thread, [`Reader::room`] is always false and the loop reads itself.
    pub fn spawn(shard: usize, wake: Arc<dyn Wake>) -> Self {
        let delay = injected_delay();
        let realtime = RealTime::of_this_thread();
        let setup = move || realtime::above_shard(realtime, shard, "reader");
        let work = move |_: &mut (), read: Read| run(read, delay);
        match Helper::spawn(
            format!("hop-read-{shard}"),
            READS_MAX,
            WAKE_EVERY,
            wake,
            setup,
            work,
        ) {
            Ok(worker) => Self {
                worker: Some(worker),
                in_flight: 0,
                slow_disk: !delay.is_zero(),
            },
            Err(error) => {
                warn!(
                    shard,
                    %error,
                    "cannot start the reader thread; the offline queue's reads run on the shard's loop"
                );
                Self::none()
            }
        }
    }

    /// No thread: the loop reads.
    pub fn none() -> Self {
        Self {
            worker: None,
            in_flight: 0,
            slow_disk: false,
        }
    }

    /// Whether a read the page cache can serve is made on the loop (it does not wait for the
    /// disk): always, unless fault injection simulates a slow disk, where nothing is cached.
    pub fn page_cache_counts(&self) -> bool {
        !self.slow_disk
    }

    /// Whether the thread takes another job now.
    pub fn room(&self) -> bool {
        self.worker.is_some() && self.in_flight < READS_MAX
    }

    /// Whether the thread has as many jobs as it takes: a read waits for an answer.
    pub fn full(&self) -> bool {
        self.worker.is_some() && self.in_flight >= READS_MAX
    }

    /// Hands `read` to the thread; the caller checked [`Reader::room`].
    pub fn start(&mut self, read: Read) {
        let worker = self.worker.as_ref().expect("room() said there is a thread");
        self.in_flight += 1;
        worker.start(read);
    }

    /// A finished read, if any.
    pub fn finished(&mut self) -> Option<Answer> {
        let answer = self.worker.as_ref()?.finished()?;
        self.in_flight -= 1;
        Some(answer)
    }

    /// Jobs with the thread.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

fn run(read: Read, delay: Duration) -> Answer {
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    Answer {
        conn: read.conn,
        generation: read.generation,
        done: read.job.run(),
    }
}

/// `HOP_FAULT_READ_DELAY_MS`: a pause before each read, to test that a slow disk does not
/// slow the message path (builds with the `fault-injection` feature only).
fn injected_delay() -> Duration {
    crate::sys::injected_delay("HOP_FAULT_READ_DELAY_MS")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::WakeCount;
    use hop_protocol::UserId;
    use hop_store::{Durability, Item, Options, ShardStore, StoredItem};
    use std::sync::atomic::Ordering;

    #[test]
    fn the_thread_reads_what_the_store_hands_it_and_wakes_the_loop() {
        let temp = tempfile::tempdir().expect("tempdir");
        let options = Options {
            durability: Durability::Batch {
                delay_ms: 2,
                records_max: 1024,
            },
            ..Options::default()
        };
        let mut store = ShardStore::open(temp.path(), 0, 1, options, FsIo, 0)
            .expect("open")
            .0;
        let user = UserId::from_halves(7, 8).expect("id");
        let from = UserId::from_halves(9, 10).expect("id");
        for id in 1..=3 {
            let item = Item::Message {
                from,
                id,
                timestamp_ms: id,
                body: b"body",
                sent: false,
                group: None,
            };
            store.append(0, user, &item).expect("append");
        }
        store.commit(0).expect("commit");
        let mut out = Vec::new();
        let job = store
            .read_or_job(user, 0, 64, &mut out, false)
            .expect("read")
            .expect("on file: a job");
        let wakes = Arc::new(WakeCount::default());
        let mut reader = Reader::spawn(0, wakes.clone());
        assert!(reader.room());
        reader.start(Read {
            conn: 5,
            generation: 6,
            job,
        });
        assert_eq!(reader.in_flight(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let answer = loop {
            if let Some(answer) = reader.finished() {
                break answer;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no answer from the thread"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!((answer.conn, answer.generation), (5, 6));
        assert_eq!(answer.done.user(), user);
        assert_eq!(store.finish_read(answer.done, &mut out), 3);
        let ids: Vec<u64> = out
            .iter()
            .map(|record| match record.item {
                StoredItem::Message { id, .. } | StoredItem::Receipt { id, .. } => id,
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(reader.in_flight(), 0);
        assert!(wakes.0.load(Ordering::Relaxed) >= 1, "the loop was woken");
        assert!(!Reader::none().room(), "no thread: the loop reads");
    }
}
