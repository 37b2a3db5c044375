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
//! The thread runs below the loop: at nice [`NICE`] under the normal policy, and under the
//! normal policy when the shard runs a real-time one. It gets the CPU the loops leave, so a
//! handshake flood slows handshakes (which admission and the handshake timeout bound) and not
//! the messages of connected users. The thread shares its shard's CPU when shards are pinned
//! (it inherits the affinity).
//!
//! If the thread cannot be started, the loop works on handshakes itself, as with
//! `handshake_thread = false` (capped by `handshakes_per_turn`).

use std::sync::Arc;

use hop_protocol::noise::FRAME_PLAINTEXT_BYTES_MAX;
use hop_protocol::session::{InputError, ServerConnection, ServerEvent};
use tracing::warn;

use crate::sys::helper::Helper;
use crate::sys::{ConnId, Wake};

/// The handshaker thread's nice value under the normal scheduling policy (Linux; on other
/// systems the thread keeps its shard's priority): it takes what CPU the loops leave.
pub const NICE: libc::c_int = 10;

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
}

impl Handshaker {
    /// Starts shard `shard`'s handshaker thread; it calls `wake` after each job. `None` if the
    /// thread cannot be started (logged): the loop then works on handshakes itself.
    pub fn spawn(shard: usize, wake: Arc<dyn Wake>) -> Option<Self> {
        let setup = move || {
            if let Err(error) = lower_this_thread() {
                warn!(shard, %error, "cannot lower the handshaker thread's priority; it competes with the shard's loop");
            }
            (
                vec![0u8; FRAME_PLAINTEXT_BYTES_MAX + 16].into_boxed_slice(),
                injected_delay(),
            )
        };
        let each = |(scratch, delay): &mut (Box<[u8]>, std::time::Duration), job| {
            if !delay.is_zero() {
                std::thread::sleep(*delay);
            }
            work(job, scratch)
        };
        match Helper::spawn(format!("hop-hs-{shard}"), AWAY_MAX, wake, setup, each) {
            Ok(thread) => Some(Self { thread }),
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

    /// Hands `job` to the thread. The caller keeps at most [`AWAY_MAX`] away, so this never
    /// blocks.
    pub fn start(&self, job: Job) {
        self.thread.start(job);
    }

    /// A finished job, if any.
    pub fn finished(&self) -> Option<Done> {
        self.thread.finished()
    }
}

/// `HOP_FAULT_HANDSHAKE_DELAY_MS`: a pause before each job, to test that the loop does not wait
/// for handshakes and that the input read meanwhile waits for its session (builds with the
/// `fault-injection` feature only).
fn injected_delay() -> std::time::Duration {
    crate::sys::injected_delay("HOP_FAULT_HANDSHAKE_DELAY_MS")
}

/// Puts the calling thread under the normal policy (it inherited its shard's, which may be
/// real-time) at nice [`NICE`].
fn lower_this_thread() -> std::io::Result<()> {
    // SAFETY: sched_param is plain integers, for which all-zero is a valid value.
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param (priority 0, the
    // only one of SCHED_OTHER) that lives across the call. Lowering needs no privilege.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    set_nice()
}

#[cfg(target_os = "linux")]
fn set_nice() -> std::io::Result<()> {
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
fn set_nice() -> std::io::Result<()> {
    Ok(()) // the nice value is per process here: the thread keeps its shard's
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::WakeCount;
    use hop_protocol::noise::ClientHandshake;
    use hop_protocol::StaticKey;
    use std::sync::atomic::Ordering;
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
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);

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
