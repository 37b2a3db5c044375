//! The IO backend contract.
//!
//! A backend owns a shard's sockets: its listener, its connections and their send buffers, and
//! the waker other shards use to rouse it. The shard loop above it speaks only this contract
//! and never names the backend, so that each OS's best mechanism (`mio`: epoll or kqueue;
//! io_uring on Linux: [`uring`]) slots in without touching the connection logic.
//!
//! What every backend provides:
//! - [`Backend::poll`] waits for IO at most `timeout` and reports [`Event`]s in order: a new
//!   connection (with its peer's address, for admission), bytes read from one (borrowed from buffers the backend owns and reuses: a
//!   connection holds no receive buffer of its own), a connection the peer closed, a wake-up, and
//!   the completion of a move between shards.
//! - [`Backend::send`] takes bytes for a connection and owns them until they are written;
//!   what cannot be written at once is kept, up to a per-connection bound.
//! - reading can be paused per connection (backpressure) and resumed. Bytes the backend had
//!   already read when reading paused are still reported.
//! - moving a connection to another shard takes two steps on each side, since a completion
//!   backend learns of them from its ring: [`Backend::detach`] starts it, `Event::Detached`
//!   hands over the [`Backend::Handoff`] (bytes read before that are reported first); the
//!   receiving shard passes it to [`Backend::attach`] with a token, and `Event::Attached`
//!   names the new connection (or `Event::AttachFailed`).
//! - wake-ups between shards go through the waking shard's own backend
//!   ([`Backend::wake_peer`]), so a ring-based backend can batch them with its other
//!   submissions; threads without a backend use [`Backend::remote_waker`].
//! - [`Backend::stop_accepting`] closes the listener for good; held connections go on.
//! - [`Backend::close`] closes gracefully: queued bytes are written, then the write side is
//!   shut, and the socket is dropped when the peer closes or a short deadline passes.

pub mod helper;
pub mod mio;
pub mod realtime;
#[cfg(target_os = "linux")]
pub mod uring;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// A connection, as the backend and the shard loop name it: an index, reused after close.
pub type ConnId = u32;

/// What the backend saw.
#[derive(Debug)]
pub enum Event<'a, H> {
    /// A connection was accepted on this shard's listener, from this peer address (`None`
    /// where the kernel would not say; admission then counts it under no address).
    Accepted(ConnId, Option<IpAddr>),
    /// Bytes read from a connection.
    Data(ConnId, &'a [u8]),
    /// The peer closed the connection or it failed; the backend has already dropped it.
    Closed(ConnId),
    /// Another shard (or the signal thread) woke this one.
    Wake,
    /// A connection passed to [`Backend::detach`] left this backend; send the handoff on.
    Detached(ConnId, H),
    /// A handoff passed to [`Backend::attach`] is now this connection.
    Attached { token: u64, conn: ConnId },
    /// A handoff passed to [`Backend::attach`] could not be adopted; the connection is lost.
    AttachFailed { token: u64 },
    /// A connection passed to [`Backend::export`] is frozen here; this is its socket for
    /// another process.
    Exported(ConnId, Exported),
    /// A connection passed to [`Backend::export`] could not be exported (why); it is not
    /// frozen.
    ExportFailed(ConnId, std::io::Error),
}

/// A connection's socket and unwritten bytes, for another process of this server to carry it
/// on (an upgrade that keeps the connections).
#[derive(Debug)]
pub struct Exported {
    /// A descriptor of the socket of its own: the backend keeps its own while frozen.
    pub socket: std::os::fd::OwnedFd,
    /// Bytes the backend held for writing: the other process writes them first.
    pub unsent: Vec<u8>,
}

/// Whether the backend should go on reading a connection after a `Data` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Continue,
    /// Stop reading until [`Backend::set_reading`] resumes it (backpressure, or a connection
    /// that is about to be closed or handed off).
    Pause,
}

/// A connection's send buffer is over its bound: the peer does not read. The caller closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOverflow;

/// Rouses a shard's loop from another thread.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// Counts its wake-ups: a [`Wake`] for tests of the helper threads.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct WakeCount(pub std::sync::atomic::AtomicU32);

#[cfg(test)]
impl Wake for WakeCount {
    fn wake(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
impl WakeCount {
    /// The wake-ups once they have come: a helper thread wakes the loop just after its result
    /// became visible, so a test that has the result may look a moment too early. Waits for
    /// the first (up to 5 s), then 50 ms for any more.
    pub fn settled(&self) -> u32 {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.0.load(Ordering::Relaxed)
    }
}

/// The pause a fault hook's environment `variable` asks for, in milliseconds, before each job
/// of a helper thread (a slow disk, a slow handshake), in builds with the `fault-injection`
/// feature; zero otherwise, and when the variable is unset.
pub fn injected_delay(variable: &str) -> std::time::Duration {
    if !cfg!(feature = "fault-injection") {
        return std::time::Duration::ZERO;
    }
    std::env::var(variable)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis)
}

/// Per-backend bounds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct BackendLimits {
    /// Connections this shard may hold; past it, new connections are closed at once.
    pub connections_max: usize,
    /// Bytes a connection may have waiting to be written.
    pub send_buffer_bytes_max: usize,
    /// How long a closing connection may take to finish.
    pub close_linger: Duration,
    /// Completion backends: keep a readiness poll armed per connection and receive only when
    /// it fires, instead of keeping a receive armed (less kernel memory per idle connection,
    /// one more operation per read). Readiness backends (`mio`) ignore it.
    pub poll_then_receive: bool,
}

/// The `count` connections holding the most bytes for writing, most first, of `held`
/// (connection, bytes held): [`Backend::heaviest`] for every backend.
fn heaviest_of(held: impl Iterator<Item = (ConnId, usize)>, count: usize) -> Vec<(ConnId, usize)> {
    let mut found: Vec<(ConnId, usize)> = held.filter(|(_, bytes)| *bytes > 0).collect();
    found.sort_unstable_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    found.truncate(count);
    found
}

/// The backends hopd can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Completion-based, Linux only.
    Uring,
    /// Readiness-based, everywhere.
    Mio,
}

/// Checks that this kernel runs the uring backend; the error says why not, in one line.
pub fn probe_uring() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        uring::probe::probe().map(|_| ())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err("io_uring exists only on Linux".into())
    }
}

/// How many connections a server can hold, and what limits it (computed by hopd from
/// `hop_tune::connection_ceiling`, the model `hop-tune check` applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    /// Connections the whole server holds.
    pub total: usize,
    /// Connections each shard holds.
    pub per_shard: usize,
    /// What set the ceiling: a limit's name (`RLIMIT_NOFILE hard limit`, `fs.file-max`,
    /// `memory`, ...) or `connections_max`.
    pub bound_by: &'static str,
}

pub trait Backend: Sized {
    /// A connection on its way to another shard.
    type Handoff: Send + 'static;
    /// How other shards reach this one to wake it (and to hand it connections).
    type Peer: Clone + Send + Sync + 'static;

    /// Creates the backend of one shard around its listener, on the shard's own thread.
    fn open(listener: std::net::TcpListener, limits: BackendLimits) -> io::Result<Self>;

    /// The backend's name, for logs.
    fn name(&self) -> &'static str;

    /// This backend's address for other shards.
    fn peer(&self) -> Self::Peer;

    /// Wakes another shard. Called once per turn per shard that got mail.
    fn wake_peer(&mut self, peer: &Self::Peer);

    /// A waker for threads that have no backend (signal handling).
    fn remote_waker(&self) -> Arc<dyn Wake>;

    /// Waits for IO, at most `timeout` (`None`: until something happens), and reports events.
    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_, Self::Handoff>) -> Reading,
    ) -> io::Result<()>;

    /// Closes every connection it holds, gracefully as [`Backend::close`] does (after a shard
    /// panicked: their sessions went with it). No `Closed` events follow; moves in flight may
    /// still end in `Attached` or `Detached`.
    fn close_all(&mut self);

    /// Stops taking new connections for good (a drain) and closes the listening socket, so
    /// that the kernel stops sending this shard new connections; the connections held go on.
    fn stop_accepting(&mut self);

    /// True when the backend has work it will do on the next poll without waiting (reads or
    /// accepts cut short by the per-turn budget, events queued); the caller then polls with a
    /// zero timeout.
    fn has_backlog(&self) -> bool;

    /// Queues bytes for a connection, writing what the socket takes now.
    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), SendOverflow>;

    fn set_reading(&mut self, conn: ConnId, reading: bool);

    /// Bytes held for writing, all connections together.
    fn unsent_bytes(&self) -> usize;

    /// The open connections that hold the most bytes for writing, most first, at most
    /// `count`: the slowest readers. A scan of every connection; for when a budget is over.
    fn heaviest(&self, count: usize) -> Vec<(ConnId, usize)>;

    /// Closes at once: the bytes held for it are dropped, not written. No `Closed` event
    /// follows.
    fn abort(&mut self, conn: ConnId);

    /// Closes gracefully (see the module docs). No `Closed` event follows.
    fn close(&mut self, conn: ConnId);

    /// Starts moving a connection to the shard behind `to`; `Event::Detached` follows (or
    /// `Closed`, if the peer closed meanwhile).
    fn detach(&mut self, conn: ConnId, to: &Self::Peer);

    /// Adopts a connection detached by another shard; `Event::Attached` or
    /// `Event::AttachFailed` with the same token follows.
    fn attach(&mut self, handoff: Self::Handoff, token: u64);

    /// Starts exporting a connection to another process: it is frozen (neither read nor
    /// written from here on, but held), and `Event::Exported` follows with a descriptor of its
    /// socket and the bytes not written, once nothing of it is in flight (or
    /// `Event::ExportFailed`, or `Closed` if the peer closed first). The shard must have
    /// paused reading it.
    fn export(&mut self, conn: ConnId);

    /// Stops the reads still in flight of the open connections whose reading is paused; true
    /// once none has one: after the shard paused reading every connection, nothing more will
    /// be reported read until it resumes one.
    fn stop_reads(&mut self) -> bool;

    /// Lets a frozen connection go on here (the other process did not take it over): its
    /// bytes are written and reading is as the shard last set it.
    fn thaw(&mut self, conn: ConnId);

    /// Adopts a socket another process of this server exported, with the bytes it had not
    /// written (written first); the connection reads at once.
    fn import(&mut self, socket: std::os::fd::OwnedFd, unsent: Vec<u8>) -> io::Result<ConnId>;

    /// Stops or resumes taking new connections; the listener stays open, so that connections
    /// that arrive meanwhile wait in its backlog (for another process that takes it over).
    fn set_accepting(&mut self, accepting: bool);

    /// Connections held, closing ones included.
    fn connections(&self) -> usize;

    /// Connections refused because the shard was full, since start.
    fn refused(&self) -> u64;
}
