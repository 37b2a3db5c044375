//! What operators ask of the shards from threads that are not shards (the admin listener, the
//! signal loop): a small bounded queue per shard, taken once per loop turn, and the flags the
//! shards raise for them (serving, drained). Nothing here is on the message path: a shard
//! reads one atomic per turn to learn that its queue is empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;
use hop_protocol::UserId;
use hop_router::{ShardId, UserReport};

use crate::sys::Wake;

/// Commands one shard's queue holds; past it the caller is told the shard is busy.
pub const COMMANDS_PER_SHARD_MAX: usize = 64;

/// A request to one shard.
#[derive(Debug)]
pub enum Command {
    /// What the shard knows of `user` (the user's home shard answers).
    User {
        user: UserId,
        reply: SyncSender<UserReport>,
    },
    /// Close `user`'s connection with GoAway `KICKED`; the reply says whether it was online.
    Kick {
        user: UserId,
        reply: SyncSender<bool>,
    },
    /// Panic, to prove the shard supervisor (builds with the `fault-injection` feature only).
    #[cfg(feature = "fault-injection")]
    Panic,
}

/// The command queues and flags of every shard.
pub struct Controls {
    queues: Vec<ArrayQueue<Command>>,
    wakers: Vec<OnceLock<Arc<dyn Wake>>>,
    /// Raised when the shard's loop runs (recovery done), lowered when it stops.
    serving: Vec<AtomicBool>,
    /// Raised when a draining shard holds no connection any more.
    drained: Vec<AtomicBool>,
    /// A drain has started (by signal or by request): every shard reads it once per turn.
    draining: AtomicBool,
    /// Its window, set before `draining`.
    drain_window_ms: AtomicU64,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls")
            .field("shards", &self.queues.len())
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

/// Why a command did not reach its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The shard's queue is full: try again.
    Busy,
    /// The shard is not running.
    NotServing,
}

impl Controls {
    pub fn new(shards: usize) -> Self {
        Self {
            queues: (0..shards)
                .map(|_| ArrayQueue::new(COMMANDS_PER_SHARD_MAX))
                .collect(),
            wakers: (0..shards).map(|_| OnceLock::new()).collect(),
            serving: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            drained: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            draining: AtomicBool::new(false),
            drain_window_ms: AtomicU64::new(0),
        }
    }

    pub fn shards(&self) -> usize {
        self.queues.len()
    }

    /// Each shard registers how to wake it, once, before it serves.
    pub fn register(&self, shard: ShardId, waker: Arc<dyn Wake>) {
        let registered = self.wakers[usize::from(shard)].set(waker).is_ok();
        assert!(registered, "shard {shard} registered twice");
    }

    /// Queues a command for `shard` and wakes it.
    pub fn send(&self, shard: ShardId, command: Command) -> Result<(), Refused> {
        let index = usize::from(shard);
        if !self.serving[index].load(Ordering::Acquire) {
            return Err(Refused::NotServing);
        }
        self.queues[index]
            .push(command)
            .map_err(|_| Refused::Busy)?;
        if let Some(waker) = self.wakers[index].get() {
            waker.wake();
        }
        Ok(())
    }

    /// Starts a lame-duck drain of `window_ms` on every shard (see [`DrainPlan`]); false if
    /// one had already started.
    pub fn start_drain(&self, window_ms: u64) -> bool {
        if self.draining.load(Ordering::Acquire) {
            return false;
        }
        self.drain_window_ms.store(window_ms, Ordering::Release);
        if self.draining.swap(true, Ordering::AcqRel) {
            return false;
        }
        for waker in self.wakers.iter().filter_map(OnceLock::get) {
            waker.wake();
        }
        true
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The window of the drain that started; `None` before one did.
    pub fn drain_window_ms(&self) -> Option<u64> {
        self.is_draining()
            .then(|| self.drain_window_ms.load(Ordering::Acquire))
    }

    /// Every shard runs its loop and no drain has started.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.serving.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// Every shard has let its last connection go since the drain started.
    pub fn is_drained(&self) -> bool {
        self.drained.iter().all(|d| d.load(Ordering::Acquire))
    }

    /// The shard's side: the next command, if any.
    pub fn take(&self, shard: ShardId) -> Option<Command> {
        self.queues[usize::from(shard)].pop()
    }

    pub fn set_serving(&self, shard: ShardId, serving: bool) {
        self.serving[usize::from(shard)].store(serving, Ordering::Release);
    }

    pub fn set_drained(&self, shard: ShardId) {
        self.drained[usize::from(shard)].store(true, Ordering::Release);
    }
}

/// When a draining shard sends its connections away: the `total` it held when the drain
/// started, evenly over `window_ms`, so that their clients do not all reconnect in the same
/// second (NATS's lame-duck mode). Sans clock: `now_ms` comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    pub started_ms: u64,
    pub window_ms: u64,
    pub total: usize,
    /// Connections sent away so far.
    pub sent: usize,
}

impl DrainPlan {
    pub fn new(started_ms: u64, window_ms: u64, total: usize) -> Self {
        Self {
            started_ms,
            window_ms,
            total,
            sent: 0,
        }
    }

    /// How many connections should have been sent away by `now_ms`: the `k`-th (from 1) is
    /// due at `started + window * k / total`, so the last leaves as the window ends.
    pub fn due(&self, now_ms: u64) -> usize {
        let elapsed = now_ms.saturating_sub(self.started_ms);
        if elapsed >= self.window_ms {
            return self.total;
        }
        let due = (self.total as u128 * u128::from(elapsed)) / u128::from(self.window_ms);
        due as usize
    }

    /// How many to send away now (and counts them as sent).
    pub fn take_due(&mut self, now_ms: u64) -> usize {
        let due = self.due(now_ms).max(self.sent);
        let count = due - self.sent;
        self.sent = due;
        count
    }

    /// When the next connection is due; `None` once every one has been sent away.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.sent >= self.total {
            return None;
        }
        let k = self.sent as u128 + 1;
        // Rounded up: `due` at that time counts the k-th.
        let rounded = (u128::from(self.window_ms) * k).div_ceil(self.total as u128);
        Some(self.started_ms + rounded as u64)
    }

    /// The window has passed: whatever is left goes now.
    pub fn is_over(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.started_ms) >= self.window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_spreads_its_connections_evenly_over_the_window() {
        let mut plan = DrainPlan::new(1_000, 10_000, 2_000);
        assert_eq!(plan.take_due(1_000), 0, "nothing at the start");
        assert_eq!(plan.next_deadline_ms(), Some(1_005));
        assert_eq!(plan.take_due(1_005), 1);
        assert_eq!(
            plan.take_due(2_000),
            199,
            "a tenth of the window, a tenth of them"
        );
        assert_eq!(plan.take_due(2_000), 0, "none twice");
        assert_eq!(plan.take_due(6_000), 800);
        assert!(!plan.is_over(10_999));
        assert_eq!(plan.take_due(10_999), 999);
        assert_eq!(plan.take_due(11_000), 1, "the last as the window ends");
        assert!(plan.is_over(11_000));
        assert_eq!(plan.next_deadline_ms(), None);
        assert_eq!(plan.take_due(50_000), 0);
    }

    #[test]
    fn every_deadline_finds_its_connection_due() {
        let mut plan = DrainPlan::new(0, 30_000, 7);
        let mut sent = 0;
        while let Some(deadline) = plan.next_deadline_ms() {
            assert!(deadline <= 30_000);
            let taken = plan.take_due(deadline);
            assert!(taken >= 1, "deadline {deadline} released nothing");
            sent += taken;
        }
        assert_eq!(sent, 7);
    }

    #[test]
    fn a_zero_window_or_no_connection_drains_at_once() {
        let mut plan = DrainPlan::new(500, 0, 40);
        assert_eq!(plan.take_due(500), 40);
        let plan = DrainPlan::new(500, 1_000, 0);
        assert_eq!(plan.next_deadline_ms(), None);
    }

    #[test]
    fn commands_wait_for_a_serving_shard_and_a_full_queue_is_busy() {
        let controls = Controls::new(2);
        let (reply, _answers) = std::sync::mpsc::sync_channel(1);
        let user = UserId::from_halves(1, 2).unwrap();
        let kick = || Command::Kick {
            user,
            reply: reply.clone(),
        };
        assert_eq!(controls.send(1, kick()), Err(Refused::NotServing));
        assert!(!controls.is_ready());
        controls.set_serving(0, true);
        controls.set_serving(1, true);
        assert!(controls.is_ready());
        for _ in 0..COMMANDS_PER_SHARD_MAX {
            controls.send(1, kick()).unwrap();
        }
        assert_eq!(controls.send(1, kick()), Err(Refused::Busy));
        assert!(controls.take(0).is_none());
        assert!(matches!(controls.take(1), Some(Command::Kick { .. })));
        assert_eq!(controls.drain_window_ms(), None);
        assert!(controls.start_drain(5_000));
        assert!(!controls.start_drain(7_000), "one drain");
        assert_eq!(controls.drain_window_ms(), Some(5_000));
        assert!(!controls.is_ready(), "draining is not ready");
    }
}
