//! The writes and fsyncs of a shard's offline queue, off the shard's thread.
//!
//! A group commit's `fdatasync` takes 1–2 ms on a good disk and far longer on a busy one, and a
//! write into the page cache can block too (dirty-page throttling on a slow disk); run on the
//! shard's loop, either stalls every connection of the shard for that long, online users'
//! messages included. So the loop only closes a batch
//! ([`ShardStore::write`](hop_store::ShardStore::write), which keeps its bytes in memory for
//! reads) and hands its write and fsync, as a [`SyncJob`], to this shard's syncer thread; the thread runs it, sends back what it did and
//! wakes the loop, which then releases the ServerAcks of what became durable
//! ([`ShardStore::synced`](hop_store::ShardStore::synced)). One job runs at a time; the batches
//! written meanwhile wait for the next, which covers them all (the pipelined group commit).
//!
//! The account logs (bindings, seen times, device links) go the same way: a job first writes
//! and fsyncs the records they buffered ([`LogWrite`]), then runs the queue's fsync. A
//! message's batch is written after any binding it depends on was buffered, so the job that
//! makes the message durable, or an earlier one, wrote the binding first. A binding whose
//! write fails does not hold the queue up (as when the loop wrote it): it is tried again
//! 100 ms later (`LOG_RETRY_MS` in the shard), and a queued item needs no binding on disk (a user
//! with queued items is made from them at start).
//!
//! If the thread cannot be started, jobs run on the caller's thread, as before the syncer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hop_store::io::{FsIo, Io};
use hop_store::{LogWrite, SyncJob, Synced};
use tracing::warn;

use crate::sys::helper::Helper;
use crate::sys::realtime::{self, RealTime};
use crate::sys::Wake;

/// A write of one of the shard's account logs.
pub type AccountLogWrite = LogWrite<<FsIo as Io>::File>;

/// Which account log a [`LogWrite`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    Seen,
    Bindings,
    Devices,
}

/// What one job does, in order: the account logs' writes, then the queue's fsync.
#[derive(Debug, Default)]
pub struct Job {
    pub logs: Vec<(LogKind, AccountLogWrite)>,
    pub store: Option<SyncJob<FsIo>>,
}

/// A finished [`Job`]: the log writes (each with its result inside) and what the queue's
/// fsync did, and how long it all took.
#[derive(Debug)]
pub struct Finished {
    pub logs: Vec<(LogKind, AccountLogWrite)>,
    pub synced: Option<Synced<std::fs::File>>,
    pub elapsed: Duration,
}

/// One shard's syncer: its thread, or inline when there is none.
#[derive(Debug)]
pub struct Syncer {
    worker: Option<Helper<Job, Finished>>,
}

impl Syncer {
    /// Starts shard `shard`'s syncer thread; it calls `wake` after each job.
    pub fn spawn(shard: usize, wake: Arc<dyn Wake>) -> Self {
        let delay = injected_delay();
        let realtime = RealTime::of_this_thread();
        // Under a real-time policy, one priority above the shard: see `RealTime`.
        let setup = move || realtime::above_shard(realtime, shard, "syncer");
        // One job runs at a time and the queue holds one, so `start` never blocks.
        let work = move |_: &mut (), job| run(job, delay);
        match Helper::spawn(format!("hop-sync-{shard}"), 1, 1, wake, setup, work) {
            Ok(worker) => Self {
                worker: Some(worker),
            },
            Err(error) => {
                warn!(
                    shard,
                    %error,
                    "cannot start the syncer thread; the offline queue's fsyncs run on the shard's loop"
                );
                Self::inline()
            }
        }
    }

    /// A syncer that runs each job on the caller's thread.
    pub fn inline() -> Self {
        Self { worker: None }
    }

    /// Runs `job`. On the thread its result comes later, from [`Syncer::finished`] or
    /// [`Syncer::wait`]; inline it is returned at once. The caller starts one job at a time.
    pub fn start(&mut self, job: Job) -> Option<Finished> {
        match &self.worker {
            Some(worker) => {
                worker.start(job);
                None
            }
            None => Some(run(job, injected_delay())),
        }
    }

    /// The running job's result, if it has finished (never, inline: `start` returned it).
    pub fn finished(&mut self) -> Option<Finished> {
        self.worker.as_ref()?.finished()
    }

    /// Waits for the running job's result (the caller knows one runs on the thread).
    pub fn wait(&mut self) -> Finished {
        self.worker
            .as_ref()
            .expect("inline jobs finish in start")
            .wait()
    }
}

/// Runs `job` after `delay` (a slow disk, in fault-injection builds; zero otherwise).
fn run(job: Job, delay: Duration) -> Finished {
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let started = Instant::now();
    let Job { mut logs, store } = job;
    // In order, and none after one that failed: a binding is never durable before the seen
    // time written ahead of it. Those not run come back unwritten and are buffered again.
    for (_, write) in &mut logs {
        write.run();
        if write.failed() {
            break;
        }
    }
    let synced = store.map(SyncJob::run);
    Finished {
        logs,
        synced,
        elapsed: started.elapsed() + delay,
    }
}

/// `HOP_FAULT_SYNC_DELAY_MS`: a pause before each fsync, to test that a slow disk does not
/// slow the message path (builds with the `fault-injection` feature only).
fn injected_delay() -> Duration {
    crate::sys::injected_delay("HOP_FAULT_SYNC_DELAY_MS")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::WakeCount;
    use hop_protocol::UserId;
    use hop_store::{Durability, Item, Options, ShardStore};

    fn store(data: &std::path::Path) -> ShardStore<FsIo> {
        let options = Options {
            durability: Durability::Batch {
                delay_ms: 2,
                records_max: 1024,
            },
            ..Options::default()
        };
        ShardStore::open(data, 0, 1, options, FsIo, 0)
            .expect("open")
            .0
    }

    fn append(store: &mut ShardStore<FsIo>, id: u64) {
        let user = UserId::from_halves(7, 7).expect("id");
        let item = Item::Message {
            from: user,
            id,
            timestamp_ms: 1,
            body: b"body",
            sent: false,
            group: None,
        };
        store.append(0, user, &item).expect("append");
    }

    fn store_job(store: &mut ShardStore<FsIo>) -> Job {
        Job {
            logs: Vec::new(),
            store: Some(store.start_sync().expect("a job")),
        }
    }

    #[test]
    fn a_job_writes_the_account_logs_before_the_queues_fsync() {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut store = store(temp.path());
        let mut seen = hop_store::seen::SeenLog::open(&FsIo, temp.path(), 0).expect("seen");
        let mut syncer = Syncer::spawn(0, Arc::new(WakeCount::default()));
        let device = UserId::from_halves(8, 8).expect("id");
        seen.append(Some(device), 42);
        append(&mut store, 1);
        store.write(0).expect("write");
        let write = seen.start_write().expect("a handle").expect("a write");
        assert!(seen.writing());
        let job = Job {
            logs: vec![(LogKind::Seen, write)],
            store: Some(store.start_sync().expect("a job")),
        };
        assert!(syncer.start(job).is_none());
        let mut finished = syncer.wait();
        let (log, write) = finished.logs.pop().expect("the log's write, back");
        assert_eq!(log, LogKind::Seen);
        assert_eq!(seen.end_write(write).expect("written"), 1);
        assert!(!seen.writing());
        let durable = store
            .synced(0, finished.synced.expect("the store's part"))
            .expect("synced");
        assert_eq!(durable.durable_through, 1);
        let loaded = hop_store::seen::load(&FsIo, temp.path()).expect("load");
        assert_eq!(loaded.seen.get(&device), Some(&42), "{loaded:?}");
    }

    #[test]
    fn a_job_runs_on_the_thread_and_wakes_the_loop_once() {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut store = store(temp.path());
        let wakes = Arc::new(WakeCount::default());
        let mut syncer = Syncer::spawn(0, wakes.clone());
        append(&mut store, 1);
        store.write(0).expect("write");
        assert!(syncer.start(store_job(&mut store)).is_none());
        let finished = syncer.wait();
        assert_eq!(wakes.settled(), 1);
        let commit = store
            .synced(0, finished.synced.expect("the store's part"))
            .expect("synced");
        assert_eq!(commit.durable_through, 1);
        assert!(syncer.finished().is_none(), "nothing runs");
    }

    #[test]
    fn without_a_thread_the_job_runs_inline() {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut store = store(temp.path());
        let mut syncer = Syncer::inline();
        append(&mut store, 1);
        store.write(0).expect("write");
        let finished = syncer.start(store_job(&mut store)).expect("done at once");
        assert_eq!(
            store
                .synced(0, finished.synced.expect("the store's part"))
                .expect("synced")
                .durable_through,
            1
        );
    }
}
