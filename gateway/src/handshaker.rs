//! The Noise handshakes of a shard's connections, off the shard's loop and below it in priority.
//!
//! A handshake costs the server about four X25519 operations (~260 µs here): building the
//! responder's state and answering message 1, then reading message 3. Worked on by the loop,
//! even a few per turn delay every message the turn carries, and a flood of handshakes (which
//! admission bounds, but does not make free) becomes a flood of delays for users already
//! connected. So the loop hands a connection's handshake input, with its session, to this
//! shard's handshaker thread and goes on; the thread works on it and sends back the session,
//! the bytes to write and what it found (the client's key, the first stanzas), and wakes the
//! loop, which carries on with the connection exactly as if it had done the work itself.
//!
//! The thread runs below the loop, at nice [`NICE`]: the kernel's fair scheduler gives it the
//! CPU the loop leaves, so a handshake flood slows handshakes (which admission and the
//! handshake timeout bound) and not the messages of connected users. The thread shares its
//! shard's CPU when shards are pinned (it inherits the affinity). Nice is a share, not a
//! priority: the fair scheduler does not always preempt the thread for a loop that becomes
//! ready, and the loop could wait until the thread's slice or the kernel's next tick ended,
//! milliseconds on a kernel that preempts only at its tick. So the thread yields the
//! CPU after each handshake (~260 µs): behind a burst of 64 handshakes the pair's message in
//! `tests/flood.rs` waited 2.1–2.7 ms (p50) without the yield and 0.41–0.45 ms with it
//! (docs/security.md, "The handshake thread yields").
//!
//! A shard under a real-time policy (`SCHED_FIFO`, `SCHED_RR`) keeps its handshakes on its
//! loop: a normal-policy thread beside a real-time loop measured 0.4–0.5× the handshakes a
//! second of the loop's own (docs/BENCHMARKS.md, "Handshakes"), and a real-time helper would
//! not yield to the loop. If the thread cannot be started, the loop works on handshakes too,
//! as with `handshake_thread = false` (capped by `handshakes_per_turn`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hop_protocol::noise::FRAME_PLAINTEXT_BYTES_MAX;
use hop_protocol::session::{InputError, ServerConnection, ServerEvent};
use tracing::{info, warn};

use crate::sys::helper::Helper;
use crate::sys::realtime::RealTime;
use crate::sys::{ConnId, Wake};

/// The handshaker thread's nice value under the normal scheduling policy (Linux; on other
/// systems the thread keeps its shard's priority): it takes what CPU the loops leave.
pub const NICE: libc::c_int = 10;

/// Jobs the thread works on before it wakes the loop with their answers, when more wait: the
/// loop then takes a run of answers in one turn instead of one turn (and, under a real-time
/// policy, one preemption of the thread) each. About 2 ms of X25519 at most.
pub const WAKE_EVERY: usize = 8;

/// Handshakes one shard hands to its thread at most at a time (queued or being worked on);
/// the rest wait in the shard, in order, as the loop's own do.
pub const AWAY_MAX: usize = 64;

/// One connection's handshake input, with its session, for the thread.
#[derive(Debug)]
pub struct Job {
    pub id: ConnId,
    pub generation: u32,
    pub session: ServerConnection,
    pub input: Vec<u8>,
}

/// A [`Job`] worked on: the session after the input, the bytes to write to the connection,
/// the events in order, and the error that ends the connection, if any.
#[derive(Debug)]
pub struct Done {
    pub id: ConnId,
    pub generation: u32,
    pub session: ServerConnection,
    pub out: Vec<u8>,
    pub events: Vec<ServerEvent>,
    pub result: Result<(), InputError<()>>,
}

/// Works on `input` as the loop would: [`ServerConnection::handle_input`], events collected.
pub fn work(job: Job, scratch: &mut [u8]) -> Done {
    let Job {
        id,
        generation,
        mut session,
        input,
    } = job;
    let mut out = Vec::new();
    let mut events = Vec::new();
    let result = session.handle_input::<()>(&input, scratch, &mut out, &mut |event| {
        events.push(event);
        Ok(())
    });
    Done {
        id,
        generation,
        session,
        out,
        events,
        result,
    }
}

/// One shard's handshaker thread.
#[derive(Debug)]
pub struct Handshaker {
    thread: Helper<Job, Done>,
    /// Jobs handed to the thread whose answer has not been taken back, the connections that
    /// went meanwhile included: what bounds the thread's queue.
    in_flight: Cell<usize>,
    /// Set when the shard drops its handshaker: the jobs still queued are not worked on.
    cancelled: Arc<AtomicBool>,
}

impl Handshaker {
    /// Starts shard `shard`'s handshaker thread (called on the shard's thread); it wakes the
    /// loop with its answers. `None` if the shard runs a real-time policy (see the module's
    /// docs) or the thread cannot be started (logged): the loop then works on handshakes
    /// itself.
    pub fn spawn(shard: usize, wake: Arc<dyn Wake>) -> Option<Self> {
        if RealTime::of_this_thread().is_some() {
            info!(
                shard,
                "the shard runs a real-time policy: its loop works on the handshakes itself"
            );
            return None;
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        let skip = cancelled.clone();
        let setup = move || {
            if let Err(error) = lower_this_thread() {
                warn!(shard, %error, "cannot lower the handshaker thread's priority; it competes with the shard's loop");
            }
            (
                vec![0u8; FRAME_PLAINTEXT_BYTES_MAX + 16].into_boxed_slice(),
                injected_delay(),
            )
        };
        let each = move |(scratch, delay): &mut (Box<[u8]>, std::time::Duration), job: Job| {
            if skip.load(Ordering::Relaxed) {
                return unworked(job);
            }
            if !delay.is_zero() {
                std::thread::sleep(*delay);
            }
            let done = work(job, scratch);
            // Leave the CPU to whatever is ready, the shard's loop among them: nice alone does
            // not make the fair scheduler preempt this thread for a loop that became ready
            // while it ran (module docs).
            std::thread::yield_now();
            done
        };
        match Helper::spawn(
            format!("hop-hs-{shard}"),
            AWAY_MAX,
            WAKE_EVERY,
            wake,
            setup,
            each,
        ) {
            Ok(thread) => Some(Self {
                thread,
                in_flight: Cell::new(0),
                cancelled,
            }),
            Err(error) => {
                warn!(
                    shard,
                    %error,
                    "cannot start the handshaker thread; the shard's loop works on handshakes"
                );
                None
            }
        }
    }

    /// Jobs the thread can take now without blocking the caller: [`AWAY_MAX`] less those
    /// whose answer was not taken back.
    pub fn room(&self) -> usize {
        AWAY_MAX - self.in_flight.get()
    }

    /// Hands `job` to the thread; only when [`Handshaker::room`] is not 0, so this never
    /// blocks.
    pub fn start(&self, job: Job) {
        assert!(self.room() > 0, "a handshake job past the thread's room");
        self.in_flight.set(self.in_flight.get() + 1);
        self.thread.start(job);
    }

    /// A finished job, if any (also those of connections that went meanwhile: the caller
    /// drops them).
    pub fn finished(&self) -> Option<Done> {
        let done = self.thread.finished()?;
        self.in_flight.set(self.in_flight.get() - 1);
        Some(done)
    }
}

impl Drop for Handshaker {
    /// The jobs still queued are handed back unworked, so the thread ends at once.
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// A job handed back as it came, once the shard no longer wants the answers.
fn unworked(job: Job) -> Done {
    Done {
        id: job.id,
        generation: job.generation,
        session: job.session,
        out: Vec::new(),
        events: Vec::new(),
        result: Ok(()),
    }
}

/// `HOP_FAULT_HANDSHAKE_DELAY_MS`: a pause before each job, to test that the loop does not wait
/// for handshakes and that the input read meanwhile waits for its session (builds with the
/// `fault-injection` feature only).
fn injected_delay() -> std::time::Duration {
    crate::sys::injected_delay("HOP_FAULT_HANDSHAKE_DELAY_MS")
}

/// Puts the calling thread at nice [`NICE`] (its shard runs the normal policy).
#[cfg(target_os = "linux")]
fn lower_this_thread() -> std::io::Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: on Linux the nice value is per thread; `tid` names the calling thread, and the
    // call reads no memory of ours. (-1 is also a valid value; then the thread goes to NICE.)
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    // SAFETY: as above. Only raised (a process started nicer stays so), which needs no
    // privilege.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, current.max(NICE)) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread() -> std::io::Result<()> {
    Ok(()) // the nice value is per process here: the thread keeps its shard's
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::WakeCount;
    use hop_protocol::noise::ClientHandshake;
    use hop_protocol::StaticKey;
    use std::time::{Duration, Instant};

    fn wait_for(handshaker: &Handshaker) -> Done {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(done) = handshaker.finished() {
                return done;
            }
            assert!(Instant::now() < deadline, "the handshaker answers");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The thread answers message 1 as the loop would, with the same session handed back,
    /// wakes the loop once per job, and reports a bad input as the error that closes it.
    #[test]
    fn the_thread_answers_a_handshake_and_hands_the_session_back() {
        let server_key = StaticKey::generate().expect("key");
        let wakes = Arc::new(WakeCount::default());
        let handshaker = Handshaker::spawn(0, wakes.clone()).expect("thread");
        let mut message_1 = Vec::new();
        let _client = ClientHandshake::start(&StaticKey::generate().expect("key"), &mut message_1);
        handshaker.start(Job {
            id: 7,
            generation: 3,
            session: ServerConnection::new(&server_key),
            input: message_1,
        });
        let done = wait_for(&handshaker);
        assert_eq!((done.id, done.generation), (7, 3));
        assert!(done.result.is_ok(), "{:?}", done.result);
        assert!(done.events.is_empty(), "no key before message 3");
        assert!(!done.out.is_empty(), "message 2 to write");
        assert!(matches!(done.session, ServerConnection::Handshaking { .. }));
        assert_eq!(wakes.settled(), 1);

        // Garbage where message 3 belongs: the error comes back, the session is closed.
        handshaker.start(Job {
            id: 7,
            generation: 3,
            session: done.session,
            input: vec![0, 4, 1, 2, 3, 4],
        });
        let done = wait_for(&handshaker);
        assert!(
            matches!(done.result, Err(InputError::Peer(_))),
            "{:?}",
            done.result
        );
        assert!(matches!(done.session, ServerConnection::Closed));
    }

    /// A shard under a real-time policy keeps its handshakes on its loop: no thread.
    #[test]
    fn a_real_time_shard_gets_no_handshaker() {
        let spawned = std::thread::spawn(|| {
            // SAFETY: sched_param is plain integers, for which all-zero is a valid value.
            let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
            param.sched_priority = 1;
            // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that lives
            // across the call.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == -1 {
                return None; // not permitted here
            }
            Some(Handshaker::spawn(0, Arc::new(WakeCount::default())).is_none())
        })
        .join()
        .expect("thread");
        match spawned {
            Some(none) => assert!(none, "a real-time shard got a handshaker thread"),
            None => eprintln!("SKIPPED: this process may not take a real-time policy"),
        }
    }

    /// Under the normal policy the thread runs at nice `NICE`, below its shard.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_thread_runs_below_its_shard() {
        let nice = std::thread::spawn(|| {
            lower_this_thread().expect("lower");
            // SAFETY: gettid takes no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            // SAFETY: reads the calling thread's nice value; no memory of ours.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
        })
        .join()
        .expect("thread");
        assert!(nice >= NICE, "nice {nice}");
    }
}
