//! A shard's helper thread: it takes jobs from the shard's loop in order, works on each, sends
//! the result back and wakes the loop (through the backend's remote waker, as mail does). The
//! syncer ([`crate::syncer`]), the reader ([`crate::reader`]) and the handshaker
//! ([`crate::handshaker`]) are three.
//!
//! Jobs and results pass through a mutex-guarded queue, not a lock-free channel. A lock-free
//! channel's receiver spins (with `sched_yield`) on a slot that a sender has reserved but not
//! yet written. Under a real-time policy, a receiver of higher priority on the sender's CPU
//! then spins forever: a real-time thread never yields to one of lower priority, and a pinned
//! shard cannot move away. That livelock was seen with `std::sync::mpsc` when a handshaker ran
//! one priority below its loop on the loop's CPU: the loop at 100% of its CPU for minutes,
//! `perf` showing it in `try_recv`'s `spin_heavy`. The syncer and the reader run one priority
//! above their shard and take its jobs, the same case the other way round. A mutex's waiter
//! sleeps in the kernel after a short spin, so the holder runs and lets it go; the lock is held
//! only to push or pop. With it, the same experiment ran ten flood tests of ten without a stall
//! (docs/decisions.md, "A shard's helper threads take jobs and give results through a mutex").

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::sys::Wake;

/// What the loop and its helper thread share.
struct Shared<J, D> {
    queues: Mutex<Queues<J, D>>,
    /// Signalled when a job comes or the helper is dropped: the thread waits on it.
    to_thread: Condvar,
    /// Signalled when the thread takes a job, sends a result or ends: a full
    /// [`Helper::start`] and [`Helper::wait`] wait on it.
    to_loop: Condvar,
}

struct Queues<J, D> {
    jobs: VecDeque<J>,
    done: VecDeque<D>,
    /// The [`Helper`] was dropped: the thread works on the jobs left, then ends.
    closed: bool,
    /// The thread ended (after `closed`, or in a panic).
    ended: bool,
}

impl<J, D> Shared<J, D> {
    /// The queues; a panic elsewhere while they were held leaves them whole (each change is a
    /// single push, pop or flag), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Queues<J, D>> {
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Marks the thread ended when it returns or unwinds, so that the loop panics instead of
/// waiting for a thread that is gone.
struct Ending<J, D>(Arc<Shared<J, D>>);

impl<J, D> Drop for Ending<J, D> {
    fn drop(&mut self) {
        self.0.lock().ended = true;
        self.0.to_loop.notify_all();
    }
}

pub struct Helper<J, D> {
    shared: Arc<Shared<J, D>>,
    /// Jobs that may wait for the thread at once.
    queued: usize,
    thread: Option<JoinHandle<()>>,
    /// For the panics that say the thread ended.
    name: String,
}

impl<J, D> std::fmt::Debug for Helper<J, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper")
            .field("name", &self.name)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl<J: Send + 'static, D: Send + 'static> Helper<J, D> {
    /// Starts thread `name`, which runs `setup` once, then `work` on each job, in order. It
    /// calls `wake` when it has no job left, and after every `wake_every` results before that
    /// (at least 1): one wake-up of the loop for a run of quick jobs, not one each. At most
    /// `queued` jobs (at least 1) wait for it.
    pub fn spawn<W>(
        name: String,
        queued: usize,
        wake_every: usize,
        wake: Arc<dyn Wake>,
        setup: impl FnOnce() -> W + Send + 'static,
        work: impl Fn(&mut W, J) -> D + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                jobs: VecDeque::new(),
                done: VecDeque::new(),
                closed: false,
                ended: false,
            }),
            to_thread: Condvar::new(),
            to_loop: Condvar::new(),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let ending = Ending(theirs);
                let shared = &ending.0;
                let mut state = setup();
                let mut unreported = 0;
                let mut next = take(shared, true);
                while let Some(job) = next {
                    let done = work(&mut state, job);
                    shared.lock().done.push_back(done);
                    shared.to_loop.notify_all();
                    unreported += 1;
                    next = match take(shared, false) {
                        Some(job) => Some(job),
                        None => {
                            wake.wake();
                            unreported = 0;
                            take(shared, true)
                        }
                    };
                    if unreported >= wake_every.max(1) {
                        wake.wake();
                        unreported = 0;
                    }
                }
                if unreported > 0 {
                    wake.wake();
                }
            })?;
        Ok(Self {
            shared,
            queued: queued.max(1),
            thread: Some(thread),
            name,
        })
    }

    /// Hands `job` to the thread. Blocks while `queued` jobs wait, which a caller that keeps
    /// count never lets happen; a thread that is gone panics the shard, whose supervisor
    /// rebuilds it.
    pub fn start(&self, job: J) {
        let mut queues = self.shared.lock();
        loop {
            if queues.ended {
                panic!("the {} thread ended", self.name);
            }
            if queues.jobs.len() < self.queued {
                queues.jobs.push_back(job);
                drop(queues);
                self.shared.to_thread.notify_one();
                return;
            }
            queues = self
                .shared
                .to_loop
                .wait(queues)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A finished job's result, if any.
    pub fn finished(&self) -> Option<D> {
        let mut queues = self.shared.lock();
        match queues.done.pop_front() {
            Some(done) => Some(done),
            None if queues.ended => panic!("the {} thread ended", self.name),
            None => None,
        }
    }

    /// Waits for the next result (the caller knows a job is with the thread).
    pub fn wait(&self) -> D {
        let mut queues = self.shared.lock();
        loop {
            if let Some(done) = queues.done.pop_front() {
                return done;
            }
            if queues.ended {
                panic!("the {} thread ended", self.name);
            }
            queues = self
                .shared
                .to_loop
                .wait(queues)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// The thread's next job: at once, or (`block`) once one comes. `None` when there is none and
/// (`block`) the helper was dropped.
fn take<J, D>(shared: &Shared<J, D>, block: bool) -> Option<J> {
    let mut queues = shared.lock();
    loop {
        if let Some(job) = queues.jobs.pop_front() {
            drop(queues);
            shared.to_loop.notify_all(); // room for a full `start`
            return Some(job);
        }
        if !block || queues.closed {
            return None;
        }
        queues = shared
            .to_thread
            .wait(queues)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

impl<J, D> Drop for Helper<J, D> {
    /// Ends the thread once it has worked on the jobs handed to it.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.to_thread.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::WakeCount;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn doubler(queued: usize, wakes: Arc<WakeCount>) -> Helper<u32, u32> {
        Helper::spawn(
            "test-helper".into(),
            queued,
            1,
            wakes,
            || (),
            |(), job: u32| job * 2,
        )
        .expect("thread")
    }

    #[test]
    fn results_come_back_in_order_and_wake_the_loop() {
        let wakes = Arc::new(WakeCount::default());
        let helper = doubler(8, wakes.clone());
        for job in 0..8 {
            helper.start(job);
        }
        let results: Vec<u32> = (0..8).map(|_| helper.wait()).collect();
        assert_eq!(results, vec![0, 2, 4, 6, 8, 10, 12, 14]);
        assert!(helper.finished().is_none());
        assert!(wakes.0.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_full_queue_makes_start_wait_until_the_thread_takes_a_job() {
        // The thread holds each job until the test lets it go.
        let (go, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let helper: Helper<u32, u32> = Helper::spawn(
            "test-gated".into(),
            1,
            1,
            Arc::new(WakeCount::default()),
            || (),
            move |(), job: u32| {
                gate.lock().expect("gate").recv().expect("go");
                job
            },
        )
        .expect("thread");
        helper.start(1); // taken by the thread, which waits at the gate
        let deadline = Instant::now() + Duration::from_secs(5);
        while !helper.shared.lock().jobs.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        helper.start(2); // waits in the queue of one
        let started = std::thread::scope(|scope| {
            let third = scope.spawn(|| {
                helper.start(3); // the queue is full: waits
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(50));
            let let_go = Instant::now();
            go.send(()).expect("go"); // job 1 ends; the thread takes job 2
            (let_go, third.join().expect("third"))
        });
        assert!(
            started.1 >= started.0,
            "start returned before there was room"
        );
        go.send(()).expect("go");
        go.send(()).expect("go");
        assert_eq!((helper.wait(), helper.wait(), helper.wait()), (1, 2, 3));
    }

    #[test]
    fn a_dropped_helper_works_on_the_jobs_it_was_given_then_ends() {
        let worked = Arc::new(AtomicUsize::new(0));
        let counted = worked.clone();
        let helper: Helper<u32, ()> = Helper::spawn(
            "test-drop".into(),
            16,
            4,
            Arc::new(WakeCount::default()),
            || (),
            move |(), _job: u32| {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        )
        .expect("thread");
        for job in 0..16 {
            helper.start(job);
        }
        drop(helper);
        assert_eq!(worked.load(Ordering::SeqCst), 16);
    }

    #[test]
    #[should_panic(expected = "the test-panics thread ended")]
    fn a_thread_that_panicked_panics_the_loop_that_waits_for_it() {
        let helper: Helper<u32, u32> = Helper::spawn(
            "test-panics".into(),
            4,
            1,
            Arc::new(WakeCount::default()),
            || (),
            |(), _job: u32| panic!("a job that fails"),
        )
        .expect("thread");
        helper.start(1);
        let _ = helper.wait();
    }
}
