//! A shard's helper thread: it takes jobs from the shard's loop in order, works on each, sends
//! the result back and wakes the loop (through the backend's remote waker, as mail does). The
//! syncer ([`crate::syncer`]) and the handshaker ([`crate::handshaker`]) are two.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::sys::Wake;

#[derive(Debug)]
pub struct Helper<J, D> {
    jobs: Option<SyncSender<J>>,
    done: Receiver<D>,
    thread: Option<JoinHandle<()>>,
    /// For the panics that say the thread ended.
    name: String,
}

impl<J: Send + 'static, D: Send + 'static> Helper<J, D> {
    /// Starts thread `name`, which runs `setup` once, then `work` on each job, in order. It
    /// calls `wake` when it has no job left, and after every `wake_every` results before that
    /// (at least 1): one wake-up of the loop for a run of quick jobs, not one each. At most
    /// `queued` jobs wait for it.
    pub fn spawn<W>(
        name: String,
        queued: usize,
        wake_every: usize,
        wake: Arc<dyn Wake>,
        setup: impl FnOnce() -> W + Send + 'static,
        work: impl Fn(&mut W, J) -> D + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, job_queue) = mpsc::sync_channel::<J>(queued);
        let (report, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut state = setup();
                let mut unreported = 0;
                let mut next = job_queue.recv().ok();
                while let Some(job) = next {
                    if report.send(work(&mut state, job)).is_err() {
                        return;
                    }
                    unreported += 1;
                    next = match job_queue.try_recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::TryRecvError::Empty) => {
                            wake.wake();
                            unreported = 0;
                            job_queue.recv().ok()
                        }
                        Err(mpsc::TryRecvError::Disconnected) => None,
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
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            name,
        })
    }

    /// Hands `job` to the thread. Blocks while `queued` jobs wait, which a caller that keeps
    /// count never lets happen; a thread that is gone panics the shard, whose supervisor
    /// rebuilds it.
    pub fn start(&self, job: J) {
        let jobs = self
            .jobs
            .as_ref()
            .expect("jobs open while the helper lives");
        if jobs.send(job).is_err() {
            panic!("the {} thread ended", self.name);
        }
    }

    /// A finished job's result, if any.
    pub fn finished(&self) -> Option<D> {
        match self.done.try_recv() {
            Ok(done) => Some(done),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => panic!("the {} thread ended", self.name),
        }
    }

    /// Waits for the next result (the caller knows a job is with the thread).
    pub fn wait(&self) -> D {
        match self.done.recv() {
            Ok(done) => done,
            Err(_) => panic!("the {} thread ended", self.name),
        }
    }
}

impl<J, D> Drop for Helper<J, D> {
    /// Ends the thread once it has worked on the jobs handed to it.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
