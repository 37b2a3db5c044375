//! The Linux backend: io_uring, used the way its authors intend for network servers.
//!
//! - The listener runs one multishot accept that installs each new socket straight into the
//!   ring's fixed file table (a direct descriptor): an accepted socket never enters the
//!   process's descriptor table, so the process limit caps each ring's table, not the server.
//!   A connection's `ConnId` is its slot in that table.
//! - Receiving holds no buffer per connection: either a multishot receive that takes buffers
//!   from the shard's provided buffer ring (`multishot-recv`), or a multishot readiness poll
//!   and, when it fires, one receive with buffer select (`poll`). A buffer goes back to the
//!   ring as soon as the shard has read it.
//! - Sends go on the fixed file, one in flight per connection; its bytes are owned by the
//!   connection until the completion, and what the shard sends meanwhile waits in a second
//!   buffer (bounded). Both live in a box that exists only while the connection writes (or
//!   moves): an idle connection's record is 16 bytes and owns no heap.
//! - Everything a turn produces is submitted by the next turn's single `io_uring_enter`, which
//!   also waits (with a timeout) for completions.
//! - Other shards wake this one with `IORING_OP_MSG_RING`, submitted on their own rings; a
//!   connection moving to another shard goes there as a fixed file (`MSG_RING` send-fd) while
//!   its session goes through the mailbox, and the receiving ring matches the two.
//! - Closing is graceful: queued bytes are written, the write side is shut, reads are drained
//!   until the peer closes or the linger passes, then every op still in flight is cancelled and
//!   the slot is closed once none is left. Completions carry a generation, so a late one from
//!   an earlier connection in a reused slot is recognised (and its buffer returned).
//! - Dropping the backend tears every connection down the same way, in batches that fit the
//!   completion queue, and waits for the last completion within a bound; past it, it leaks
//!   the buffers the kernel may still use rather than free them.
//!
//! All submissions go through [`UringBackend::submit`].

mod buf_ring;
pub mod probe;
mod transfers;
mod user_data;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, DestinationSlot, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use tracing::{debug, info, warn};

use self::buf_ring::BufRing;
use self::probe::TaskRun;
use self::transfers::{Transfers, TRANSFER_WAIT};
use self::user_data::{Kind, UserData, SLOT_MAX};
use super::{Backend, BackendLimits, ConnId, Event, Exported, Reading, SendOverflow, Wake};

/// Submission queue entries; a turn that produces more flushes early.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries (the kernel keeps overflow beyond these, `FEAT_NODROP`).
const CQ_ENTRIES: u32 = 16 * 1024;
/// Provided buffers per shard, and their size: the shard's whole receive memory.
const BUFFERS: u16 = 256;
const BUFFER_BYTES: usize = 8 * 1024;
const BUFFER_GROUP: u16 = 0;
/// Completions handled per turn; the rest wait for the next (zero-timeout) turn.
const CQES_PER_TURN: usize = 8 * 1024;
/// Fixed-file slots kept beyond `connections_max`: connections being refused, closed or handed
/// over still hold a slot for a moment.
pub const SLOT_RESERVE: usize = 64;
/// How long dropping the backend waits for its ops to finish before leaking their buffers: a
/// base, and a share for each connection still held (tearing ~20,000 down took 0.13–0.25 s
/// per ring here, ~10 µs each, two rings at once on two cores: docs/uring.md).
const DRAIN_ON_DROP: Duration = Duration::from_secs(1);
const DRAIN_PER_CONNECTION: Duration = Duration::from_micros(100);
/// The longest one wait of the drain on drop: the deadline is checked between waits.
const DRAIN_WAIT_STEP: Duration = Duration::from_millis(10);
/// Ops a connection's teardown may add: a cancel for each of its armed receive (or poll),
/// single receive and send, then the close.
const TEARDOWN_OPS_MAX: usize = 4;

/// Transfer ids, unique in the process: a handed-over descriptor names its handoff by one.
static NEXT_TRANSFER: AtomicU64 = AtomicU64::new(1);

/// How a connection's bytes are received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    /// A multishot receive from the buffer ring stays armed on every connection.
    MultishotRecv,
    /// A multishot poll stays armed; a receive with buffer select runs when it fires.
    Poll,
}

/// Another shard's ring, as MSG_RING targets it. Holds its own descriptor of the ring, so the
/// ring stays valid for as long as anyone can still post to it.
#[derive(Debug)]
pub struct UringPeer {
    ring: OwnedFd,
}

/// Wakes a shard from a thread without a ring (signal handling): an eventfd the ring polls.
#[derive(Debug)]
pub struct EventfdWaker {
    fd: OwnedFd,
}

impl Wake for EventfdWaker {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor this waker owns.
        let written = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::WouldBlock {
                warn!(%error, "waking a shard failed");
            }
        }
    }
}

/// A connection on its way to another shard: its descriptor travels ring to ring under
/// `transfer`; the bytes not yet written travel here.
#[derive(Debug)]
pub struct UringHandoff {
    transfer: u64,
    unsent: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The shard let go: flush, shut the write side, read to the peer's close or the linger.
    Closing,
    /// Waiting for reads and the send in flight to stop before the descriptor leaves for the
    /// ring in `Outgoing::peer`.
    Detaching,
    /// The descriptor is on its way to the peer ring, as transfer `Outgoing::transfer`.
    SendingFd,
    /// Exported to another process: waiting for the send in flight to finish, then for the
    /// descriptor's install as a regular one; then frozen until thawed.
    Exporting,
    Installing,
    Frozen,
    /// Cancel what is in flight; close the slot once nothing is.
    Dead,
}

/// A connection's record: one per fixed-file slot, allocated with the table, so it is kept to
/// 16 bytes. What only a writing or moving connection needs is boxed in [`Outgoing`].
#[derive(Debug)]
struct Conn {
    generation: u32,
    flags: Flags,
    state: State,
    /// Ops of this connection whose last completion has not arrived.
    ops: u8,
    /// Present while a send is in flight, bytes are queued, or the connection is moving.
    out: Option<Box<Outgoing>>,
}

/// The most ops one connection has in flight: its armed receive (or poll), a single
/// receive, a send, a shutdown, a cancel of each of the first three, and the close or the
/// descriptor's handoff (which wait for the others, but for the cancels' own completions).
const OPS_PER_CONNECTION_MAX: u8 = 8;

/// What a connection holds only while it writes or moves to another ring.
#[derive(Debug, Default)]
struct Outgoing {
    /// Bytes the kernel is sending: never grown, moved out or freed before the completion.
    sending: Vec<u8>,
    /// How much of `sending` the kernel took so far.
    sent: usize,
    /// Bytes waiting for the send in flight.
    queued: Vec<u8>,
    /// While `Detaching`: the ring the connection moves to.
    peer: Option<Arc<UringPeer>>,
    /// While `SendingFd`: the id its descriptor travels under.
    transfer: u64,
}

/// A connection's yes/no state, one bit each.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Flags(u16);

impl Flags {
    /// The multishot receive (or poll) is armed.
    const ARMED: Self = Self(1 << 0);
    /// ... and its cancel was submitted.
    const ARMED_CANCELLED: Self = Self(1 << 1);
    /// Poll mode: a single receive is in flight.
    const RECV_ONCE: Self = Self(1 << 2);
    /// ... and its cancel was submitted.
    const RECV_ONCE_CANCELLED: Self = Self(1 << 3);
    /// A send is in flight (`Outgoing::sending`).
    const SENDING: Self = Self(1 << 4);
    /// ... and its cancel was submitted.
    const SEND_CANCELLED: Self = Self(1 << 5);
    /// Poll mode: the socket may hold bytes not yet received.
    const READABLE: Self = Self(1 << 6);
    /// The shard wants bytes (not paused).
    const READING: Self = Self(1 << 7);
    /// The write side's shutdown was submitted.
    const SHUT: Self = Self(1 << 8);
    /// The slot's close was submitted.
    const CLOSE_SENT: Self = Self(1 << 9);

    const NAMES: [(Self, &'static str); 10] = [
        (Self::ARMED, "ARMED"),
        (Self::ARMED_CANCELLED, "ARMED_CANCELLED"),
        (Self::RECV_ONCE, "RECV_ONCE"),
        (Self::RECV_ONCE_CANCELLED, "RECV_ONCE_CANCELLED"),
        (Self::SENDING, "SENDING"),
        (Self::SEND_CANCELLED, "SEND_CANCELLED"),
        (Self::READABLE, "READABLE"),
        (Self::READING, "READING"),
        (Self::SHUT, "SHUT"),
        (Self::CLOSE_SENT, "CLOSE_SENT"),
    ];

    fn has(self, flag: Self) -> bool {
        self.0 & flag.0 != 0
    }

    fn set(&mut self, flag: Self, on: bool) {
        if on {
            self.0 |= flag.0;
        } else {
            self.0 &= !flag.0;
        }
    }
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = Self::NAMES.iter().filter(|(flag, _)| self.has(*flag));
        f.debug_set().entries(set.map(|(_, name)| name)).finish()
    }
}

impl Conn {
    fn new(generation: u32, state: State) -> Self {
        Self {
            generation,
            flags: Flags::READING,
            state,
            ops: 0,
            out: None,
        }
    }

    fn has(&self, flag: Flags) -> bool {
        self.flags.has(flag)
    }

    fn set(&mut self, flag: Flags, on: bool) {
        self.flags.set(flag, on);
    }

    /// The shard knows this connection (so it must hear `Closed`).
    fn known(&self) -> bool {
        matches!(
            self.state,
            State::Open
                | State::Detaching
                | State::SendingFd
                | State::Exporting
                | State::Installing
                | State::Frozen
        )
    }

    fn unsent_bytes(&self) -> usize {
        self.out
            .as_ref()
            .map_or(0, |out| out.sending.len() - out.sent + out.queued.len())
    }

    /// The boxed part, made if the connection had none.
    fn out(&mut self) -> &mut Outgoing {
        self.out.get_or_insert_with(Box::default)
    }

    /// Bytes queued for the next send, taken (none if there is no boxed part).
    fn take_queued(&mut self) -> Vec<u8> {
        self.out
            .as_mut()
            .map_or_else(Vec::new, |out| std::mem::take(&mut out.queued))
    }

    /// Frees the boxed part once nothing in it is needed, so an idle connection holds no
    /// send buffer; never while a send is in flight, whose bytes the kernel reads. A peer is
    /// let go once the connection no longer moves to it.
    fn release_out(&mut self) {
        let moving = matches!(
            self.state,
            State::Detaching
                | State::SendingFd
                | State::Exporting
                | State::Installing
                | State::Frozen
        );
        let Some(out) = self.out.as_mut() else {
            return;
        };
        if self.state != State::Detaching {
            out.peer = None;
        }
        if !self.flags.has(Flags::SENDING) && out.queued.is_empty() && !moving {
            self.out = None;
        }
    }

    /// A receive (or poll) or a send is in flight.
    fn ops_in_flight(&self) -> bool {
        self.has(Flags::ARMED) || self.has(Flags::RECV_ONCE) || self.has(Flags::SENDING)
    }

    /// Cancels for the receives in flight not yet asked to stop, and for the send with
    /// `send`. The armed receive (or poll) is of kind `armed_kind`.
    fn cancels(&mut self, slot: u32, armed_kind: Kind, send: bool) -> [Option<Op>; 3] {
        let mut ops = [None; 3];
        let targets = [
            (Flags::ARMED, Flags::ARMED_CANCELLED, armed_kind, true),
            (
                Flags::RECV_ONCE,
                Flags::RECV_ONCE_CANCELLED,
                Kind::RecvOnce,
                true,
            ),
            (Flags::SENDING, Flags::SEND_CANCELLED, Kind::Send, send),
        ];
        for (op, (inflight, cancelled, kind, wanted)) in ops.iter_mut().zip(targets) {
            if wanted && self.has(inflight) && !self.has(cancelled) {
                self.set(cancelled, true);
                *op = Some(Op::Cancel(slot, kind));
            }
        }
        ops
    }
}

/// One submission, described; [`UringBackend::submit`] turns it into an entry.
#[derive(Debug, Clone, Copy)]
enum Op {
    Accept,
    Eventfd,
    /// Asks the kernel for a new connection's peer address (`SO_PEERNAME` through the ring: a
    /// direct descriptor has no number `getpeername(2)` could take).
    PeerName(u32),
    /// Arms the connection's multishot receive or poll, by receive mode.
    Arm(u32),
    RecvOnce(u32),
    Send(u32),
    Shutdown(u32),
    /// Cancels the op of kind `Kind` of the connection in the slot, named by its user_data: the
    /// kernel looks it up in a hash. Cancelling by descriptor (`IORING_ASYNC_CANCEL_FD`) or
    /// `IORING_ASYNC_CANCEL_ANY` instead walks every armed poll of the ring for each op it
    /// finds: O(connections) per close, and O(connections²) for one cancel of everything.
    Cancel(u32, Kind),
    /// Cancels the listener's multishot accept or the eventfd poll (`Kind::Accept`,
    /// `Kind::Eventfd`), when the backend stops.
    CancelShared(Kind),
    Close(u32),
    Wake(RawFd),
    SendFd {
        slot: u32,
        ring: RawFd,
        transfer: u64,
    },
    /// Installs the connection's direct descriptor as a regular one (`IORING_OP_FIXED_FD_INSTALL`).
    InstallFd(u32),
}

/// Finished moves and other events produced outside `poll`, reported by the next one.
#[derive(Debug)]
enum Pending {
    Attached { token: u64, conn: ConnId },
}

pub struct UringBackend {
    ring: IoUring,
    listener: std::net::TcpListener,
    eventfd: Arc<EventfdWaker>,
    peer: Arc<UringPeer>,
    buffers: BufRing,
    mode: ReceiveMode,
    limits: BackendLimits,
    /// Indexed by fixed-file slot.
    conns: Vec<Option<Conn>>,
    /// Records held, closing ones included.
    held: usize,
    generation: u32,
    refused: u64,
    transfers: Transfers<Vec<u8>>,
    pending: VecDeque<Pending>,
    /// Linger deadlines of closing connections, in order.
    closing: VecDeque<(Instant, u32, u32)>,
    /// Peer rings named by entries not yet submitted: kept open until the enter.
    peers_in_sq: Vec<Arc<UringPeer>>,
    /// Ops whose last completion has not arrived (wake-ups excluded).
    inflight: usize,
    /// Completions left in the queue by the per-turn budget.
    cq_backlog: bool,
    cqes: Vec<cqueue::Entry>,
    accept_armed: bool,
    /// False once the shard stopped accepting (a drain): the accept is not armed again.
    accepting: bool,
    /// The ring's completion queue entries.
    cq_entries: u32,
    /// Entries put on the submission queue since the start.
    submitted: u64,
    /// Dropping: nothing is re-armed, and a descriptor that arrives now is closed.
    stopping: bool,
    /// Where the kernel writes the peer address of each new connection whose `PeerName` is in
    /// flight, by slot: the connection is reported as accepted when it completes.
    naming: HashMap<u32, Box<libc::sockaddr_in6>>,
    /// How many bytes of a peer address to ask for: the listener's family's `sockaddr` (the
    /// kernel refuses a buffer longer than the address).
    peer_name_bytes: u32,
    /// The kernel refused `SO_PEERNAME` once (older than 6.7): logged once, then connections
    /// are reported without an address.
    peer_name_failed: bool,
    /// Bytes every connection holds for writing, in total (the sum of `Conn::unsent_bytes`).
    unsent: usize,
}

/// The sizes of a shard's ring.
#[derive(Debug, Clone, Copy)]
struct RingSizes {
    sq_entries: u32,
    cq_entries: u32,
}

const RING_SIZES: RingSizes = RingSizes {
    sq_entries: SQ_ENTRIES,
    cq_entries: CQ_ENTRIES,
};

/// What [`UringBackend::drain`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drained {
    /// Ops whose last completion had not arrived by the deadline.
    inflight: usize,
    /// The kernel held completions beyond the completion queue at some point (`FEAT_NODROP`
    /// keeps them as long as it can allocate for them; one it drops leaves an op counted).
    cq_overflowed: bool,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("held", &self.held)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Fixed-file slots for a shard that may hold `connections_max` connections, within the
/// process's descriptor limit (which caps each ring's table).
pub fn table_slots(connections_max: usize, fd_limit: u64) -> u32 {
    let wanted = connections_max.saturating_add(SLOT_RESERVE);
    let cap = usize::try_from(fd_limit)
        .unwrap_or(usize::MAX)
        .min(SLOT_MAX as usize + 1)
        .min(1 << 20);
    wanted.min(cap) as u32
}

/// The open-file limit a fixed-file table is checked against when it is registered: the soft
/// one (hopd raises it to the hard one before the shards start).
fn table_fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _hard)| soft)
}

impl UringBackend {
    fn new(
        listener: std::net::TcpListener,
        limits: BackendLimits,
        sizes: RingSizes,
    ) -> io::Result<Self> {
        let (ring, task_run) = probe::build_ring(sizes.sq_entries, sizes.cq_entries)?;
        if task_run != TaskRun::SingleIssuerDeferred {
            info!(
                ?task_run,
                "io_uring: this kernel lacks SINGLE_ISSUER + DEFER_TASKRUN"
            );
        }
        let slots = table_slots(limits.connections_max, table_fd_limit());
        ring.submitter().register_files_sparse(slots)?;
        let buffers = BufRing::register(&ring, BUFFERS, BUFFER_BYTES, BUFFER_GROUP)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: a direct descriptor takes no
        // setsockopt.
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        // SAFETY: eventfd(2) with valid flags; a non-negative result is a new descriptor we own.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if eventfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `eventfd` was just created and is owned by nothing else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(eventfd) };
        // SAFETY: dup(2) of the ring's descriptor; a non-negative result is a new descriptor.
        let ring_dup = unsafe { libc::fcntl(ring.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if ring_dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ring_dup` was just created and is owned by nothing else.
        let ring_dup = unsafe { OwnedFd::from_raw_fd(ring_dup) };
        let mode = if limits.poll_then_receive {
            ReceiveMode::Poll
        } else {
            ReceiveMode::MultishotRecv
        };
        debug!(slots, ?mode, "io_uring backend ready");
        let cq_entries = ring.params().cq_entries();
        let peer_name_bytes = if listener.local_addr()?.is_ipv4() {
            std::mem::size_of::<libc::sockaddr_in>()
        } else {
            std::mem::size_of::<libc::sockaddr_in6>()
        } as u32;
        let mut backend = Self {
            ring,
            listener,
            eventfd: Arc::new(EventfdWaker { fd: eventfd }),
            peer: Arc::new(UringPeer { ring: ring_dup }),
            buffers,
            mode,
            limits,
            conns: (0..slots).map(|_| None).collect(),
            held: 0,
            generation: 0,
            refused: 0,
            transfers: Transfers::default(),
            pending: VecDeque::new(),
            closing: VecDeque::new(),
            peers_in_sq: Vec::new(),
            inflight: 0,
            cq_backlog: false,
            cqes: Vec::with_capacity(1024),
            accept_armed: false,
            accepting: true,
            cq_entries,
            submitted: 0,
            stopping: false,
            naming: HashMap::new(),
            peer_name_bytes,
            peer_name_failed: false,
            unsent: 0,
        };
        backend.submit(Op::Accept);
        backend.submit(Op::Eventfd);
        Ok(backend)
    }

    /// The only function that puts entries on the ring.
    ///
    /// SAFETY (what keeps every buffer and file alive until its completion):
    /// - Buffers. The only memory the kernel writes is the provided buffer ring, registered in
    ///   `BufRing::register` and freed only after it is unregistered (`Drop` of the backend
    ///   unregisters it after every op completed, else leaks it). The only memory the kernel
    ///   reads is a connection's `Outgoing::sending`: a send is submitted only while no other
    ///   send of that connection is in flight (`Flags::SENDING`), and until its completion
    ///   `sending` is not touched (new bytes go to `queued`) and its box is not freed
    ///   (`Conn::release_out` keeps it while `SENDING`); a connection record is dropped only
    ///   after the slot's `Close` completed, which is submitted only once `ops == 0`; if `Drop`
    ///   cannot drain the ring, the records are leaked. Moving a `Conn` or its box moves the
    ///   `Vec` header, not its heap bytes. The kernel also writes a new connection's peer
    ///   address into its box in `naming`, which is removed only by the `PeerName` completion
    ///   (and leaked with the records if `Drop` cannot drain the ring).
    /// - Files. A connection's fixed slot is closed only by `Op::Close`, submitted once none of
    ///   its ops is in flight, and a late completion of a reused slot is recognised by its
    ///   generation. The listener and the eventfd are owned by the backend and live as long
    ///   as the ring. A peer ring named by a `MSG_RING` entry is kept open by `peers_in_sq`
    ///   (and by the mailboxes) until the entry is submitted, when the kernel takes its own
    ///   reference.
    fn submit(&mut self, op: Op) {
        let ud = |kind: Kind, slot: u32, generation: u32| UserData::new(kind, slot, generation);
        let generation_of = |conns: &[Option<Conn>], slot: u32| {
            conns
                .get(slot as usize)
                .and_then(Option::as_ref)
                .map_or(0, |conn| conn.generation)
        };
        let (entry, slot, counted) = match op {
            Op::Accept => {
                self.accept_armed = true;
                let entry = opcode::AcceptMulti::new(Fd(self.listener.as_raw_fd()))
                    .allocate_file_index(true)
                    .build()
                    .user_data(ud(Kind::Accept, 0, 0).encode());
                (entry, None, true)
            }
            Op::Eventfd => {
                let entry =
                    opcode::PollAdd::new(Fd(self.eventfd.fd.as_raw_fd()), libc::POLLIN as u32)
                        .multi(true)
                        .build()
                        .user_data(ud(Kind::Eventfd, 0, 0).encode());
                (entry, None, true)
            }
            Op::PeerName(slot) => {
                let generation = generation_of(&self.conns, slot);
                let name = self
                    .naming
                    .entry(slot)
                    // SAFETY: `sockaddr_in6` is plain data; all zeroes is a valid value.
                    .or_insert_with(|| Box::new(unsafe { std::mem::zeroed() }));
                let entry = opcode::GetSockOpt::new(
                    Fixed(slot),
                    libc::SOL_SOCKET as u32,
                    libc::SO_PEERNAME as u32,
                    (&mut **name as *mut libc::sockaddr_in6).cast(),
                    self.peer_name_bytes,
                )
                .build()
                .user_data(ud(Kind::PeerName, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::Arm(slot) => {
                let generation = generation_of(&self.conns, slot);
                let entry = match self.mode {
                    ReceiveMode::MultishotRecv => opcode::RecvMulti::new(Fixed(slot), BUFFER_GROUP)
                        .build()
                        .user_data(ud(Kind::Recv, slot, generation).encode()),
                    ReceiveMode::Poll => opcode::PollAdd::new(Fixed(slot), libc::POLLIN as u32)
                        .multi(true)
                        .build()
                        .user_data(ud(Kind::Poll, slot, generation).encode()),
                };
                (entry, Some(slot), true)
            }
            Op::RecvOnce(slot) => {
                let generation = generation_of(&self.conns, slot);
                let entry = opcode::Recv::new(
                    Fixed(slot),
                    std::ptr::null_mut(),
                    self.buffers.buffer_bytes() as u32,
                )
                .buf_group(self.buffers.group())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(ud(Kind::RecvOnce, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::Send(slot) => {
                let Some(conn) = self.conns.get(slot as usize).and_then(Option::as_ref) else {
                    return;
                };
                let Some(out) = conn.out.as_deref() else {
                    debug_assert!(false, "a send without its bytes");
                    return;
                };
                debug_assert!(conn.has(Flags::SENDING) && out.sent < out.sending.len());
                let bytes = &out.sending[out.sent..];
                let entry = opcode::Send::new(Fixed(slot), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(Kind::Send, slot, conn.generation).encode());
                (entry, Some(slot), true)
            }
            Op::Shutdown(slot) => {
                let generation = generation_of(&self.conns, slot);
                let entry = opcode::Shutdown::new(Fixed(slot), libc::SHUT_WR)
                    .build()
                    .user_data(ud(Kind::Shutdown, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::Cancel(slot, kind) => {
                debug_assert!(matches!(
                    kind,
                    Kind::Recv | Kind::Poll | Kind::RecvOnce | Kind::Send
                ));
                let generation = generation_of(&self.conns, slot);
                let target = ud(kind, slot, generation).encode();
                let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                    .build()
                    .user_data(ud(Kind::Cancel, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::CancelShared(kind) => {
                debug_assert!(matches!(kind, Kind::Accept | Kind::Eventfd));
                // Generation 0 is no connection's: the completion is about none.
                let target = ud(kind, 0, 0).encode();
                let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                    .build()
                    .user_data(ud(Kind::Cancel, 0, 0).encode());
                (entry, None, true)
            }
            Op::Close(slot) => {
                let generation = generation_of(&self.conns, slot);
                let entry = opcode::Close::new(Fixed(slot))
                    .build()
                    .user_data(ud(Kind::Close, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::Wake(ring) => {
                let wake = ud(Kind::Wake, 0, 0).encode();
                let entry = opcode::MsgRingData::new(Fd(ring), 0, wake, None)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(wake);
                (entry, None, false)
            }
            Op::SendFd {
                slot,
                ring,
                transfer,
            } => {
                let generation = generation_of(&self.conns, slot);
                let entry = opcode::MsgRingSendFd::new(
                    Fd(ring),
                    Fixed(slot),
                    DestinationSlot::auto_target(),
                    user_data::transfer(transfer),
                )
                .build()
                .user_data(ud(Kind::SendFd, slot, generation).encode());
                (entry, Some(slot), true)
            }
            Op::InstallFd(slot) => {
                let generation = generation_of(&self.conns, slot);
                let entry = opcode::FixedFdInstall::new(Fixed(slot), 0)
                    .build()
                    .user_data(ud(Kind::InstallFd, slot, generation).encode());
                (entry, Some(slot), true)
            }
        };
        // SAFETY: see this function's documentation: every buffer and file the entry names
        // stays valid until its completion arrives.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        let pushed = pushed || {
            // The queue is full: hand it to the kernel now and try again.
            if let Err(error) = self.ring.submit() {
                warn!(%error, "io_uring: flushing a full submission queue failed");
            }
            self.peers_in_sq.clear();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry).is_ok() }
        };
        if !pushed {
            warn!(?op, "io_uring: submission queue full; operation dropped");
            return;
        }
        self.submitted += 1;
        if counted {
            self.inflight += 1;
        }
        if let Some(slot) = slot {
            if let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) {
                debug_assert!(conn.ops < OPS_PER_CONNECTION_MAX, "slot {slot}: {conn:?}");
                conn.ops = conn.ops.checked_add(1).expect("ops in flight fit a u8");
            }
        }
    }

    /// The record of the connection a completion names, if it is still that connection.
    fn conn_of(&mut self, data: UserData) -> Option<&mut Conn> {
        self.conns
            .get_mut(data.slot as usize)
            .and_then(Option::as_mut)
            .filter(|conn| conn.generation == data.generation)
    }

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Starts a record in `slot` (a freshly installed descriptor).
    fn insert(&mut self, slot: u32, state: State) {
        // Generation 0 names no connection (completions of the listener and the eventfd).
        self.generation = self.generation.wrapping_add(1).max(1);
        let generation = self.generation;
        let state = if self.stopping { State::Dead } else { state };
        match self.conns.get_mut(slot as usize) {
            Some(entry) => {
                // A record still here is one whose Close completed without our having seen it
                // yet (the kernel reused the slot): its late completions carry the old
                // generation.
                match entry.replace(Conn::new(generation, state)) {
                    None => self.held += 1,
                    Some(old) => self.unsent -= old.unsent_bytes(),
                }
            }
            None => warn!(slot, "io_uring: descriptor outside the table"),
        }
    }

    /// Moves a connection on after something happened to it: arm or cancel its reads, start
    /// its next send, shut it, hand it over, or tear it down.
    fn progress(&mut self, slot: u32) {
        let mode = self.mode;
        let armed_kind = match mode {
            ReceiveMode::MultishotRecv => Kind::Recv,
            ReceiveMode::Poll => Kind::Poll,
        };
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let mut ops: [Option<Op>; 3] = [None; 3];
        match conn.state {
            State::Open | State::Closing => {
                let closing = conn.state == State::Closing;
                if conn.has(Flags::READING) || closing {
                    if !conn.has(Flags::ARMED) {
                        // A poll armed on a socket that holds bytes fires at once.
                        conn.set(Flags::ARMED, true);
                        conn.set(Flags::ARMED_CANCELLED, false);
                        ops[0] = Some(Op::Arm(slot));
                    }
                    if mode == ReceiveMode::Poll
                        && conn.has(Flags::READABLE)
                        && !conn.has(Flags::RECV_ONCE)
                    {
                        conn.set(Flags::RECV_ONCE, true);
                        conn.set(Flags::RECV_ONCE_CANCELLED, false);
                        ops[1] = Some(Op::RecvOnce(slot));
                    }
                } else if conn.has(Flags::ARMED) && !conn.has(Flags::ARMED_CANCELLED) {
                    conn.set(Flags::ARMED_CANCELLED, true);
                    ops[0] = Some(Op::Cancel(slot, armed_kind));
                }
                let sending = conn.has(Flags::SENDING);
                let queued = conn.out.as_ref().is_some_and(|out| !out.queued.is_empty());
                if !sending && queued {
                    let out = conn.out();
                    out.sending = std::mem::take(&mut out.queued);
                    out.sent = 0;
                    conn.set(Flags::SENDING, true);
                    conn.set(Flags::SEND_CANCELLED, false);
                    ops[2] = Some(Op::Send(slot));
                } else if closing && !sending && !conn.has(Flags::SHUT) {
                    conn.set(Flags::SHUT, true);
                    ops[2] = Some(Op::Shutdown(slot));
                }
            }
            State::Detaching => {
                if conn.has(Flags::ARMED) || conn.has(Flags::RECV_ONCE) {
                    ops = conn.cancels(slot, armed_kind, false);
                } else if !conn.has(Flags::SENDING) {
                    let transfer =
                        user_data::next_transfer_id(NEXT_TRANSFER.fetch_add(1, Ordering::Relaxed));
                    let out = conn.out();
                    let peer = out
                        .peer
                        .take()
                        .expect("a detaching connection names its peer");
                    out.transfer = transfer;
                    conn.state = State::SendingFd;
                    ops[0] = Some(Op::SendFd {
                        slot,
                        ring: peer.ring.as_raw_fd(),
                        transfer,
                    });
                    self.peers_in_sq.push(peer);
                }
            }
            State::Exporting => {
                // A send in flight is cancelled too (a peer that does not read would hold it
                // for good); what it did not send goes back in front of the queue.
                if conn.ops_in_flight() {
                    ops = conn.cancels(slot, armed_kind, true);
                } else {
                    conn.state = State::Installing;
                    ops[0] = Some(Op::InstallFd(slot));
                }
            }
            State::SendingFd | State::Installing | State::Frozen => {}
            State::Dead => {
                // Each op in flight is cancelled by its own user_data (see `Op::Cancel`); a
                // shutdown finishes by itself.
                if conn.ops > 0 {
                    ops = conn.cancels(slot, armed_kind, true);
                } else if !conn.has(Flags::CLOSE_SENT) {
                    conn.set(Flags::CLOSE_SENT, true);
                    ops[0] = Some(Op::Close(slot));
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) {
            conn.release_out();
        }
        for op in ops.into_iter().flatten() {
            self.submit(op);
        }
    }

    /// The connection failed or the peer closed it: tell the shard if it knows it, tear down.
    fn fail(&mut self, slot: u32, on_event: &mut dyn FnMut(Event<'_, UringHandoff>) -> Reading) {
        let Some(conn) = self.conn(slot) else { return };
        let known = conn.known();
        conn.state = State::Dead;
        if known {
            on_event(Event::Closed(slot));
        }
        self.progress(slot);
    }

    /// Moves a connection in state `from` to state `to` and on from there; nothing for a
    /// connection in another state.
    fn shift(&mut self, slot: u32, from: State, to: State) -> bool {
        match self.conn(slot) {
            Some(record) if record.state == from => record.state = to,
            _ => return false,
        }
        self.progress(slot);
        true
    }

    /// Makes a handed-over descriptor in `slot` a connection of this shard.
    fn adopt(&mut self, slot: u32, unsent: Vec<u8>) -> ConnId {
        self.insert(slot, State::Open);
        let added = unsent.len();
        if let Some(conn) = self.conn(slot) {
            if !unsent.is_empty() {
                conn.out().queued = unsent;
            }
            self.unsent += added;
        }
        self.progress(slot);
        slot
    }

    /// Closes a descriptor nobody will use.
    fn discard(&mut self, slot: u32) {
        self.insert(slot, State::Dead);
        self.progress(slot);
    }

    fn complete(
        &mut self,
        cqe: &cqueue::Entry,
        woken: &mut bool,
        on_event: &mut dyn FnMut(Event<'_, UringHandoff>) -> Reading,
    ) {
        let result = cqe.result();
        let flags = cqe.flags();
        let more = cqueue::more(flags);
        let Some(data) = UserData::decode(cqe.user_data()) else {
            warn!(
                user_data = cqe.user_data(),
                "io_uring: completion of unknown origin"
            );
            return;
        };
        let finished_own_op = !more && !matches!(data.kind, Kind::Wake | Kind::Transfer);
        if finished_own_op {
            self.inflight = self.inflight.saturating_sub(1);
        }
        match data.kind {
            Kind::Accept => self.accepted(result, more),
            Kind::PeerName => self.named(data, result, on_event),
            Kind::Eventfd => {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from the eventfd this backend owns.
                unsafe {
                    libc::read(
                        self.eventfd.fd.as_raw_fd(),
                        (&mut count as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                };
                *woken = true;
                if !more && !self.stopping {
                    self.submit(Op::Eventfd);
                }
            }
            Kind::Wake => {
                if result < 0 {
                    // Our own MSG_RING failed (its success posts nothing here).
                    debug!(error = %io::Error::from_raw_os_error(-result), "io_uring: waking a shard failed");
                } else {
                    *woken = true;
                }
            }
            Kind::Transfer => {
                if result < 0 {
                    return;
                }
                let slot = result as u32;
                let id = user_data::transfer_id(cqe.user_data());
                if let Some((token, unsent)) = self.transfers.descriptor(id, slot, Instant::now()) {
                    let conn = self.adopt(slot, unsent);
                    on_event(Event::Attached { token, conn });
                }
            }
            Kind::Recv | Kind::Poll | Kind::RecvOnce => {
                self.received(data, result, flags, more, on_event)
            }
            Kind::Send => {
                let Some(conn) = self.conn_of(data) else {
                    return;
                };
                conn.ops -= 1;
                conn.set(Flags::SENDING, false);
                let dead = conn.state == State::Dead;
                let exporting = conn.state == State::Exporting;
                let out = conn.out();
                let written = result.max(0) as usize;
                out.sent += written;
                if written > 0 && out.sent < out.sending.len() && !dead && !exporting {
                    conn.set(Flags::SENDING, true);
                    self.unsent -= written;
                    self.submit(Op::Send(data.slot));
                    return;
                }
                if exporting && out.sent < out.sending.len() {
                    // Cancelled for an export: the rest travels with the connection.
                    let mut rest = out.sending.split_off(out.sent);
                    rest.append(&mut out.queued);
                    out.queued = rest;
                    out.sending = Vec::new();
                    out.sent = 0;
                    self.unsent -= written;
                    self.progress(data.slot);
                    return;
                }
                // Done, or failed: free the bytes (`progress` frees the box if it is empty).
                let dropped = out.sending.len() - out.sent;
                out.sending = Vec::new();
                out.sent = 0;
                self.unsent -= written + dropped;
                if result <= 0 && result != -libc::ECANCELED {
                    self.fail(data.slot, on_event);
                } else {
                    self.progress(data.slot);
                }
            }
            Kind::Shutdown | Kind::Cancel => {
                if let Some(conn) = self.conn_of(data) {
                    conn.ops -= 1;
                    self.progress(data.slot);
                }
            }
            Kind::Close => {
                let slot = data.slot as usize;
                if let Some(conn) = self.conn_of(data) {
                    self.unsent -= conn.unsent_bytes();
                    self.conns[slot] = None;
                    self.held -= 1;
                }
            }
            Kind::InstallFd => {
                let Some(conn) = self.conn_of(data) else {
                    if result >= 0 {
                        // SAFETY: the kernel installed this descriptor for us; nothing else
                        // owns it. Its connection is gone: close it.
                        drop(unsafe { OwnedFd::from_raw_fd(result) });
                    }
                    return;
                };
                conn.ops -= 1;
                if result < 0 {
                    warn!(error = %io::Error::from_raw_os_error(-result), "io_uring: installing a connection's descriptor for export failed (IORING_OP_FIXED_FD_INSTALL needs Linux 6.8)");
                    conn.state = State::Open;
                    on_event(Event::ExportFailed(
                        data.slot,
                        io::Error::from_raw_os_error(-result),
                    ));
                    self.progress(data.slot);
                    return;
                }
                conn.state = State::Frozen;
                let unsent = conn
                    .out
                    .as_ref()
                    .map(|out| out.queued.clone())
                    .unwrap_or_default();
                // SAFETY: the kernel installed this descriptor for us (O_CLOEXEC); nothing
                // else owns it.
                let socket = unsafe { OwnedFd::from_raw_fd(result) };
                on_event(Event::Exported(data.slot, Exported { socket, unsent }));
            }
            Kind::SendFd => {
                let Some(conn) = self.conn_of(data) else {
                    return;
                };
                conn.ops -= 1;
                if result < 0 {
                    warn!(error = %io::Error::from_raw_os_error(-result), "io_uring: handing a connection to another shard failed");
                    self.fail(data.slot, on_event);
                    return;
                }
                let transfer = conn.out().transfer;
                let unsent = conn.take_queued();
                conn.state = State::Dead;
                self.unsent -= unsent.len();
                on_event(Event::Detached(
                    data.slot,
                    UringHandoff { transfer, unsent },
                ));
                self.progress(data.slot);
            }
        }
    }

    fn accepted(&mut self, result: i32, more: bool) {
        if !more {
            self.accept_armed = false;
        }
        if result < 0 {
            if result == -libc::ENFILE || result == -libc::EMFILE {
                // The table is full: the kernel closed the new socket.
                self.refused += 1;
                debug!("connection refused: the fixed file table is full");
            } else if result != -libc::ECANCELED && self.accepting {
                warn!(error = %io::Error::from_raw_os_error(-result), "accept failed");
            }
        } else {
            let slot = result as u32;
            if self.held >= self.limits.connections_max {
                self.refused += 1;
                debug!("connection refused: shard holds its maximum");
                // Gracefully, like any close: a socket closed with unread bytes (the client's
                // first handshake message) would send a reset instead of the end.
                self.insert(slot, State::Closing);
                let generation = self.generation;
                let deadline = Instant::now() + self.limits.close_linger;
                self.closing.push_back((deadline, slot, generation));
                self.progress(slot);
            } else {
                // Reported as accepted once its peer's address is known; nothing is read
                // before that.
                self.insert(slot, State::Open);
                self.submit(Op::PeerName(slot));
            }
        }
        if !self.accept_armed && !self.stopping && self.accepting {
            self.submit(Op::Accept);
        }
    }

    /// A new connection's peer address arrived (or the kernel would not give it).
    fn named(
        &mut self,
        data: UserData,
        result: i32,
        on_event: &mut dyn FnMut(Event<'_, UringHandoff>) -> Reading,
    ) {
        let name = self.naming.remove(&data.slot);
        let Some(conn) = self.conn_of(data) else {
            return;
        };
        conn.ops -= 1;
        let open = conn.state == State::Open;
        let peer = match (result, name) {
            (bytes, Some(name)) if bytes >= 0 => peer_ip(&name),
            // This connection is gone already (reset before we asked): its close follows.
            (error, _) if error != -libc::EOPNOTSUPP && error != -libc::EINVAL => None,
            (error, _) => {
                if !self.peer_name_failed {
                    self.peer_name_failed = true;
                    warn!(
                        error = %io::Error::from_raw_os_error(-error),
                        "io_uring: this kernel does not give a connection's peer address \
                         (SO_PEERNAME through the ring, Linux 6.7); limits per address are off"
                    );
                }
                None
            }
        };
        if open {
            on_event(Event::Accepted(data.slot, peer));
        }
        self.progress(data.slot);
    }

    fn received(
        &mut self,
        data: UserData,
        result: i32,
        flags: u32,
        more: bool,
        on_event: &mut dyn FnMut(Event<'_, UringHandoff>) -> Reading,
    ) {
        let buffer = cqueue::buffer_select(flags);
        let Some(conn) = self
            .conns
            .get_mut(data.slot as usize)
            .and_then(Option::as_mut)
            .filter(|conn| conn.generation == data.generation)
        else {
            // A late completion of a connection that is gone: give its buffer back.
            if let Some(bid) = buffer {
                let _ = self.buffers.take(bid, 0);
                self.buffers.give_back(bid);
            }
            return;
        };
        match data.kind {
            Kind::Poll => {
                if !more {
                    conn.set(Flags::ARMED, false);
                    conn.ops -= 1;
                }
                if result > 0 {
                    conn.set(Flags::READABLE, true);
                } else if result < 0 && result != -libc::ECANCELED {
                    self.fail(data.slot, on_event);
                    return;
                }
                self.progress(data.slot);
                return;
            }
            Kind::Recv => {
                if !more {
                    conn.set(Flags::ARMED, false);
                    conn.ops -= 1;
                }
            }
            _ => {
                conn.set(Flags::RECV_ONCE, false);
                conn.ops -= 1;
            }
        }
        if result > 0 {
            let len = result as usize;
            if data.kind == Kind::RecvOnce {
                // Completions are posted in time order: a poll completion seen before this one
                // was about bytes this receive took, and one after it sets `READABLE` again.
                let readable = cqueue::sock_nonempty(flags) || len >= BUFFER_BYTES;
                conn.set(Flags::READABLE, readable);
            }
            let deliver = matches!(conn.state, State::Open | State::Detaching);
            if let Some(bid) = buffer {
                if let Some(bytes) = self.buffers.take(bid, len) {
                    if deliver && on_event(Event::Data(data.slot, bytes)) == Reading::Pause {
                        if let Some(conn) = self.conn(data.slot) {
                            conn.set(Flags::READING, false);
                        }
                    }
                }
                self.buffers.give_back(bid);
            }
        } else if result == 0 {
            self.fail(data.slot, on_event);
            return;
        } else if result == -libc::ENOBUFS {
            debug!("io_uring: provided buffers ran out; receiving again next turn");
        } else if result != -libc::ECANCELED {
            self.fail(data.slot, on_event);
            return;
        }
        self.progress(data.slot);
    }
}

impl UringBackend {
    /// Stops the backend: nothing is accepted or re-armed, every connection is torn down (its
    /// ops cancelled, then its slot closed), and completions are reaped until no op is in
    /// flight or `within` passed.
    ///
    /// Bounded in time: each wait lasts at most [`DRAIN_WAIT_STEP`] and every cancel is a
    /// lookup by user_data, so one `io_uring_enter` does a bounded amount of work.
    ///
    /// Bounded in the completion queue, which is empty after each reap. Until the next reap
    /// the kernel posts one completion per entry submitted (cancels and closes complete at
    /// once) and one per deferred completion it runs: with `DEFER_TASKRUN` an enter waiting
    /// for `want` runs at most `max(20, want)` of those per pass, in at most three passes.
    /// Tearing down connections only while fewer than a quarter of the queue were submitted
    /// since the last reap, and waiting for an eighth, keeps that under the queue's size, so
    /// the kernel never has to keep completions beyond it (where one it cannot allocate for
    /// is dropped and its op stays counted).
    fn drain(&mut self, within: Duration) -> Drained {
        let deadline = Instant::now() + within;
        let cq_entries = self.cq_entries as usize;
        let submissions_per_wait = cq_entries / 4;
        let want_max = (cq_entries / 8).max(1);
        assert!(
            submissions_per_wait + 3 * want_max.max(20) < cq_entries
                && submissions_per_wait > TEARDOWN_OPS_MAX,
            "a completion queue of {cq_entries} entries is too small to drain"
        );
        if !self.stopping {
            self.stopping = true;
            if self.accept_armed {
                self.submit(Op::CancelShared(Kind::Accept));
            }
            self.submit(Op::CancelShared(Kind::Eventfd));
        }
        let mut cq_overflowed = false;
        let mut next_slot = 0usize;
        let mut ignore = |_: Event<'_, UringHandoff>| Reading::Pause;
        loop {
            // The queue is empty once reaped; the entries still on the submission queue (and
            // all submitted from here on) complete into it before the next reap.
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.clear();
            cqes.extend(self.ring.completion());
            let reaped_at = self.submitted - self.ring.submission().len() as u64;
            let mut woken = false;
            for cqe in &cqes {
                self.complete(cqe, &mut woken, &mut ignore);
            }
            self.cqes = cqes;
            while next_slot < self.conns.len()
                && (self.submitted - reaped_at) as usize + TEARDOWN_OPS_MAX <= submissions_per_wait
            {
                if let Some(conn) = self.conns[next_slot].as_mut() {
                    conn.state = State::Dead;
                    self.progress(next_slot as u32);
                }
                next_slot += 1;
            }
            let now = Instant::now();
            if (self.inflight == 0 && next_slot == self.conns.len()) || now >= deadline {
                break;
            }
            let wait = deadline.saturating_duration_since(now).min(DRAIN_WAIT_STEP);
            let timespec = Timespec::new().nsec(wait.subsec_nanos());
            let args = SubmitArgs::new().timespec(&timespec);
            // Waiting for many completions lets one enter run as many deferred ones.
            let want = self.inflight.clamp(1, want_max);
            let _ = self.ring.submitter().submit_with_args(want, &args);
            self.peers_in_sq.clear();
            cq_overflowed |= self.ring.submission().cq_overflow();
        }
        Drained {
            inflight: self.inflight,
            cq_overflowed,
        }
    }
}

impl Backend for UringBackend {
    type Handoff = UringHandoff;
    type Peer = Arc<UringPeer>;

    fn open(listener: std::net::TcpListener, limits: BackendLimits) -> io::Result<Self> {
        Self::new(listener, limits, RING_SIZES)
    }

    fn name(&self) -> &'static str {
        match self.mode {
            ReceiveMode::MultishotRecv => "uring",
            ReceiveMode::Poll => "uring (poll)",
        }
    }

    fn peer(&self) -> Arc<UringPeer> {
        self.peer.clone()
    }

    fn wake_peer(&mut self, peer: &Arc<UringPeer>) {
        self.peers_in_sq.push(peer.clone());
        self.submit(Op::Wake(peer.ring.as_raw_fd()));
    }

    fn remote_waker(&self) -> Arc<dyn Wake> {
        self.eventfd.clone()
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_, UringHandoff>) -> Reading,
    ) -> io::Result<()> {
        let now = Instant::now();
        let mut wait = if self.has_backlog() {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        if let Some((deadline, _, _)) = self.closing.front() {
            let until = deadline.saturating_duration_since(now);
            wait = Some(wait.map_or(until, |w| w.min(until)));
        }
        if !self.transfers.is_empty() {
            let check = Duration::from_millis(100);
            wait = Some(wait.map_or(check, |w| w.min(check)));
        }
        // The turn's one io_uring_enter: submit everything queued since the last, and wait.
        let entered = match wait {
            Some(wait) => {
                let timespec = Timespec::new()
                    .sec(wait.as_secs())
                    .nsec(wait.subsec_nanos());
                let args = SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        self.peers_in_sq.clear();
        match entered {
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(error) => return Err(error),
        }
        let mut woken = false;
        while let Some(pending) = self.pending.pop_front() {
            let Pending::Attached { token, conn } = pending;
            on_event(Event::Attached { token, conn });
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        {
            let mut completion = self.ring.completion();
            cqes.extend(completion.by_ref().take(CQES_PER_TURN));
            self.cq_backlog = !completion.is_empty();
        }
        for cqe in &cqes {
            self.complete(cqe, &mut woken, on_event);
        }
        self.cqes = cqes;
        if woken {
            on_event(Event::Wake);
        }
        let now = Instant::now();
        while let Some(&(deadline, slot, generation)) = self.closing.front() {
            if deadline > now {
                break;
            }
            self.closing.pop_front();
            let data = UserData::new(Kind::Close, slot, generation);
            if let Some(conn) = self.conn_of(data) {
                if conn.state == State::Closing {
                    conn.state = State::Dead;
                    self.progress(slot);
                }
            }
        }
        if !self.transfers.is_empty() {
            let expired = self.transfers.expire(now, TRANSFER_WAIT);
            for token in expired.failed_tokens {
                on_event(Event::AttachFailed { token });
            }
            for slot in expired.orphan_slots {
                self.discard(slot);
            }
        }
        Ok(())
    }

    fn export(&mut self, conn: ConnId) {
        self.shift(conn, State::Open, State::Exporting);
    }

    fn stop_reads(&mut self) -> bool {
        let mut stopped = true;
        let mut cancels = Vec::new();
        for (slot, conn) in self.conns.iter_mut().enumerate() {
            let Some(conn) = conn.as_mut() else { continue };
            if conn.state != State::Open || conn.has(Flags::READING) {
                continue;
            }
            // Paused, the armed receive (or poll) is being cancelled already; a single
            // receive after a poll is left to finish, as it may wait for bytes that never
            // come: cancel it.
            if conn.has(Flags::RECV_ONCE) && !conn.has(Flags::RECV_ONCE_CANCELLED) {
                conn.set(Flags::RECV_ONCE_CANCELLED, true);
                cancels.push(Op::Cancel(slot as u32, Kind::RecvOnce));
            }
            stopped &= !(conn.has(Flags::ARMED) || conn.has(Flags::RECV_ONCE));
        }
        for op in cancels {
            self.submit(op);
        }
        stopped
    }

    fn thaw(&mut self, conn: ConnId) {
        // Frozen, or still waiting for its ops to stop. One whose install is in flight
        // becomes frozen when it completes, and the shard thaws it then.
        if !self.shift(conn, State::Frozen, State::Open) {
            self.shift(conn, State::Exporting, State::Open);
        }
    }

    fn import(&mut self, socket: OwnedFd, unsent: Vec<u8>) -> io::Result<ConnId> {
        // No `connections_max` here: the server held this connection already.
        let free = (self.conns.iter().position(Option::is_none))
            .ok_or_else(|| io::Error::other("the fixed file table is full"))?;
        let slot = free as u32;
        // The table's entry takes its own reference to the socket; ours closes after.
        let updated = self
            .ring
            .submitter()
            .register_files_update(slot, &[socket.as_raw_fd()])?;
        if updated != 1 {
            return Err(io::Error::other("the fixed file table took no descriptor"));
        }
        Ok(self.adopt(slot, unsent))
    }

    fn set_accepting(&mut self, accepting: bool) {
        if self.accepting == accepting || self.stopping {
            return;
        }
        self.accepting = accepting;
        if accepting {
            if !self.accept_armed {
                self.submit(Op::Accept);
            }
        } else if self.accept_armed {
            self.submit(Op::CancelShared(Kind::Accept));
        }
    }

    fn stop_accepting(&mut self) {
        if !self.accepting {
            return;
        }
        self.accepting = false;
        if self.accept_armed && !self.stopping {
            self.submit(Op::CancelShared(Kind::Accept));
        }
        // Shutting a listening socket down takes it out of the listening state (Linux):
        // the kernel sends this port's new connections to the other listeners of the
        // `SO_REUSEPORT` group, or refuses them once none is left. The descriptor stays
        // open until the backend drops, since an entry on the submission queue may name it.
        if let Err(error) =
            socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Read)
        {
            warn!(%error, "cannot stop the listener");
        }
    }

    fn has_backlog(&self) -> bool {
        !self.pending.is_empty() || self.cq_backlog
    }

    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), SendOverflow> {
        let max = self.limits.send_buffer_bytes_max;
        let Some(record) = self.conn(conn) else {
            return Ok(()); // already gone; its Closed event was or will be reported
        };
        if !record.known() || bytes.is_empty() {
            return Ok(());
        }
        if record.unsent_bytes() + bytes.len() > max {
            return Err(SendOverflow);
        }
        record.out().queued.extend_from_slice(bytes);
        let open = record.state == State::Open;
        self.unsent += bytes.len();
        if open {
            self.progress(conn);
        }
        Ok(())
    }

    fn unsent_bytes(&self) -> usize {
        self.unsent
    }

    fn heaviest(&self, count: usize) -> Vec<(ConnId, usize)> {
        let open = self.conns.iter().enumerate().filter_map(|(slot, conn)| {
            let conn = conn.as_ref().filter(|conn| conn.state == State::Open)?;
            Some((slot as ConnId, conn.unsent_bytes()))
        });
        super::heaviest_of(open, count)
    }

    fn abort(&mut self, conn: ConnId) {
        let Some(record) = self.conn(conn) else {
            return;
        };
        if !record.known() {
            return;
        }
        // What waits for the next send goes now; a send in flight is cancelled and its bytes
        // go with its completion.
        let dropped = record.take_queued().len();
        record.state = State::Dead;
        self.unsent -= dropped;
        self.progress(conn);
    }

    fn set_reading(&mut self, conn: ConnId, reading: bool) {
        if let Some(record) = self.conn(conn) {
            if record.state == State::Open && record.has(Flags::READING) != reading {
                record.set(Flags::READING, reading);
                self.progress(conn);
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        let deadline = Instant::now() + self.limits.close_linger;
        let Some(record) = self.conn(conn) else {
            return;
        };
        if !record.known() {
            return;
        }
        record.state = State::Closing;
        let generation = record.generation;
        self.closing.push_back((deadline, conn, generation));
        self.progress(conn);
    }

    fn close_all(&mut self) {
        // Moving connections finish their move; the receiving shard knows their session.
        let open: Vec<ConnId> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, record)| {
                record.as_ref().is_some_and(|r| {
                    matches!(r.state, State::Open | State::Exporting | State::Frozen)
                })
            })
            .map(|(slot, _)| slot as ConnId)
            .collect();
        for conn in open {
            self.close(conn);
        }
    }

    fn detach(&mut self, conn: ConnId, to: &Arc<UringPeer>) {
        let Some(record) = self.conn(conn) else {
            return;
        };
        if record.state != State::Open {
            return;
        }
        record.state = State::Detaching;
        record.out().peer = Some(to.clone());
        self.progress(conn);
    }

    fn attach(&mut self, handoff: UringHandoff, token: u64) {
        let UringHandoff { transfer, unsent } = handoff;
        if let Some((slot, unsent)) =
            self.transfers
                .handoff(transfer, token, unsent, Instant::now())
        {
            // The descriptor came first.
            let conn = self.adopt(slot, unsent);
            self.pending.push_back(Pending::Attached { token, conn });
        }
    }

    fn connections(&self) -> usize {
        self.held
    }

    fn refused(&self) -> u64 {
        self.refused
    }
}

/// The IP address in a `sockaddr` the kernel wrote (`sockaddr_in` or `sockaddr_in6`).
fn peer_ip(name: &libc::sockaddr_in6) -> Option<std::net::IpAddr> {
    match i32::from(name.sin6_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a `sockaddr_in`, which is no larger than the
            // `sockaddr_in6` it lies in and needs no stricter alignment.
            let v4 = unsafe { &*(name as *const libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            Some(std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 => Some(std::net::Ipv6Addr::from(name.sin6_addr.s6_addr).to_canonical()),
        _ => None,
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        let held = self.held;
        let within = DRAIN_ON_DROP + DRAIN_PER_CONNECTION * held as u32;
        let start = Instant::now();
        let drained = self.drain(within);
        if drained.inflight == 0 {
            self.buffers.unregister(&self.ring);
            debug!(
                connections = held,
                elapsed_ms = start.elapsed().as_millis() as u64,
                cq_overflowed = drained.cq_overflowed,
                "io_uring: drained"
            );
        } else {
            warn!(
                inflight = drained.inflight,
                held = self.held,
                cq_overflowed = drained.cq_overflowed,
                cq_dropped = self.ring.completion().overflow(),
                "io_uring: ops still in flight at shutdown; their buffers are leaked"
            );
            std::mem::forget(std::mem::take(&mut self.conns));
            std::mem::forget(std::mem::take(&mut self.naming));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A safety stop for a broken backend, not a speed requirement.
    const PATIENCE: Duration = Duration::from_secs(10);

    #[derive(Debug)]
    enum Seen {
        Accepted(ConnId, Option<std::net::IpAddr>),
        Data(ConnId, Vec<u8>),
        Closed(ConnId),
        Wake,
        Detached(ConnId, UringHandoff),
        Attached { token: u64, conn: ConnId },
        AttachFailed { token: u64 },
        Exported(ConnId, Exported),
        ExportFailed(ConnId, io::Error),
    }

    fn backend(connections_max: usize, poll_then_receive: bool) -> (UringBackend, String) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (
            UringBackend::open(listener, limits(connections_max, poll_then_receive)).unwrap(),
            addr,
        )
    }

    fn limits(connections_max: usize, poll_then_receive: bool) -> BackendLimits {
        BackendLimits {
            connections_max,
            send_buffer_bytes_max: 1 << 20,
            close_linger: Duration::from_millis(200),
            poll_then_receive,
        }
    }

    /// Polls once, then until `done` holds for what was seen, or gives up after `PATIENCE`.
    fn pump(
        backend: &mut UringBackend,
        seen: &mut Vec<Seen>,
        mut done: impl FnMut(&[Seen]) -> bool,
    ) {
        let deadline = Instant::now() + PATIENCE;
        let mut first = true;
        while std::mem::take(&mut first) || !done(seen) {
            assert!(Instant::now() < deadline, "gave up waiting; saw {seen:?}");
            backend
                .poll(Some(Duration::from_millis(20)), &mut |event| {
                    seen.push(match event {
                        Event::Accepted(id, peer) => Seen::Accepted(id, peer),
                        Event::Data(id, bytes) => Seen::Data(id, bytes.to_vec()),
                        Event::Closed(id) => Seen::Closed(id),
                        Event::Wake => Seen::Wake,
                        Event::Detached(id, handoff) => Seen::Detached(id, handoff),
                        Event::Attached { token, conn } => Seen::Attached { token, conn },
                        Event::AttachFailed { token } => Seen::AttachFailed { token },
                        Event::Exported(id, exported) => Seen::Exported(id, exported),
                        Event::ExportFailed(id, error) => Seen::ExportFailed(id, error),
                    });
                    Reading::Continue
                })
                .unwrap();
        }
    }

    fn accepted(seen: &[Seen]) -> Vec<ConnId> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Accepted(id, _) => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_accepted_connection_names_its_peer_address() {
        for poll_then_receive in [false, true] {
            let (mut backend, addr) = backend(4, poll_then_receive);
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket
                .bind(
                    &"127.0.0.3:0"
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
            socket
                .connect(&addr.parse::<std::net::SocketAddr>().unwrap().into())
                .unwrap();
            let mut seen = Vec::new();
            pump(&mut backend, &mut seen, |s| accepted(s).len() == 1);
            let peer = seen.iter().find_map(|s| match s {
                Seen::Accepted(_, peer) => Some(*peer),
                _ => None,
            });
            assert_eq!(peer, Some(Some("127.0.0.3".parse().unwrap())));
            // Reading starts once the address is known: bytes sent now arrive.
            let mut stream: TcpStream = socket.into();
            stream.write_all(b"after").unwrap();
            let conn = accepted(&seen)[0];
            pump(&mut backend, &mut seen, |s| data_of(s, conn) == b"after");
        }
    }

    fn data_of(seen: &[Seen], conn: ConnId) -> Vec<u8> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Data(id, bytes) if *id == conn => Some(bytes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Reads `n` bytes from `stream` while the backend keeps turning.
    fn read_while_polling(
        backend: &mut UringBackend,
        seen: &mut Vec<Seen>,
        stream: &TcpStream,
        n: usize,
    ) -> Vec<u8> {
        let mut reader = stream.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            let mut bytes = vec![0u8; n];
            reader.read_exact(&mut bytes).map(|()| bytes)
        });
        pump(backend, seen, |_| thread.is_finished());
        thread.join().unwrap().unwrap()
    }

    fn client(addr: &str) -> TcpStream {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    fn echo_round_trip(mode_poll: bool) {
        let (mut backend, addr) = backend(8, mode_poll);
        let mut seen = Vec::new();
        let mut stream = client(&addr);
        pump(&mut backend, &mut seen, |s| accepted(s).len() == 1);
        let conn = accepted(&seen)[0];
        stream.write_all(b"hello").unwrap();
        pump(&mut backend, &mut seen, |s| data_of(s, conn) == b"hello");
        // More than one provided buffer's worth, in one go.
        let big: Vec<u8> = (0..3 * BUFFER_BYTES).map(|i| i as u8).collect();
        stream.write_all(&big).unwrap();
        pump(&mut backend, &mut seen, |s| {
            data_of(s, conn).len() == 5 + big.len()
        });
        assert_eq!(&data_of(&seen, conn)[5..], &big[..]);
        backend.send(conn, b"world").unwrap();
        backend.send(conn, b"!").unwrap();
        let reply = read_while_polling(&mut backend, &mut seen, &stream, 6);
        assert_eq!(reply, b"world!");
        // A graceful close: the client reads what was sent, then the end.
        backend.send(conn, b"bye").unwrap();
        backend.close(conn);
        let mut rest = Vec::new();
        let reader = std::thread::spawn(move || {
            stream.read_to_end(&mut rest).unwrap();
            rest
        });
        pump(&mut backend, &mut seen, |_| reader.is_finished());
        assert_eq!(reader.join().unwrap(), b"bye");
        let deadline = Instant::now() + PATIENCE;
        while backend.connections() > 0 {
            assert!(Instant::now() < deadline, "the slot was never closed");
            pump(&mut backend, &mut seen, |_| true);
        }
        assert!(
            !seen.iter().any(|s| matches!(s, Seen::Closed(_))),
            "no Closed after close()"
        );
    }

    /// A client connected to `addr` with a small receive buffer: what it does not read soon
    /// stays with the server.
    fn small_reader(addr: std::net::SocketAddr) -> TcpStream {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        TcpStream::from(socket)
    }

    /// The sum of what every record holds for writing, counted the slow way.
    fn recount(backend: &UringBackend) -> usize {
        backend.conns.iter().flatten().map(Conn::unsent_bytes).sum()
    }

    /// The bytes held for writing are counted through sends, partial writes, completions and
    /// an abort; the heaviest reader is found, and an abort drops its bytes at once.
    #[test]
    fn unsent_bytes_are_counted_and_an_abort_drops_them() {
        for poll in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            socket2::SockRef::from(&listener)
                .set_send_buffer_size(4096)
                .unwrap();
            let mut backend = UringBackend::open(listener, limits(8, poll)).unwrap();
            // One at a time, so that conns[i] is clients[i].
            let mut clients = Vec::new();
            let mut seen = Vec::new();
            for count in 1..=3 {
                clients.push(small_reader(addr));
                pump(&mut backend, &mut seen, |s| accepted(s).len() == count);
            }
            let conns = accepted(&seen);
            // conns[0] reads nothing and gets the most, conns[1] less, conns[2] reads.
            for _ in 0..8 {
                backend.send(conns[0], &[1u8; 32 * 1024]).unwrap();
            }
            backend.send(conns[1], &[2u8; 64 * 1024]).unwrap();
            backend.send(conns[2], b"read me").unwrap();
            assert_eq!(backend.unsent_bytes(), recount(&backend));
            // The sends go to the kernel with the next poll; the reader takes its bytes.
            pump(&mut backend, &mut seen, |_| true);
            let mut read = [0u8; 7];
            clients[2].read_exact(&mut read).unwrap();
            pump(&mut backend, &mut seen, |_| true);
            pump(&mut backend, &mut seen, |_| true);
            assert_eq!(backend.unsent_bytes(), recount(&backend));
            let heaviest = backend.heaviest(2);
            assert_eq!(heaviest.len(), 2, "{heaviest:?}");
            assert_eq!(heaviest[0].0, conns[0]);
            assert_eq!(heaviest[1].0, conns[1]);
            assert!(heaviest[0].1 > heaviest[1].1);
            let before = backend.unsent_bytes();
            backend.abort(conns[0]);
            assert!(backend.unsent_bytes() < before);
            assert_eq!(backend.unsent_bytes(), recount(&backend));
            // The send in flight is cancelled and its bytes go with its completion.
            let deadline = Instant::now() + PATIENCE;
            while backend.conns[conns[0] as usize].is_some() {
                assert!(
                    Instant::now() < deadline,
                    "the aborted connection never closed"
                );
                pump(&mut backend, &mut seen, |_| true);
            }
            assert_eq!(backend.unsent_bytes(), recount(&backend));
            assert_eq!(backend.heaviest(8).first().map(|h| h.0), Some(conns[1]));
            let mut rest = Vec::new();
            clients[0]
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let ended = clients[0].read_to_end(&mut rest);
            assert!(
                ended.is_err() || rest.len() < 256 * 1024,
                "an aborted connection does not get what it held"
            );
        }
    }

    #[test]
    fn echo_and_graceful_close_with_multishot_recv() {
        echo_round_trip(false);
    }

    #[test]
    fn echo_and_graceful_close_with_poll_then_recv() {
        echo_round_trip(true);
    }

    #[test]
    fn a_full_shard_refuses_cleanly_and_keeps_its_connections() {
        for poll in [false, true] {
            let (mut backend, addr) = backend(2, poll);
            let mut seen = Vec::new();
            let mut first = client(&addr);
            let _second = client(&addr);
            pump(&mut backend, &mut seen, |s| accepted(s).len() == 2);
            let mut third = client(&addr);
            // Bytes the server never reads must not turn the refusal into a reset.
            third.write_all(b"hello").unwrap();
            let mut end = [0u8; 1];
            let reader = std::thread::spawn(move || third.read(&mut end));
            pump(&mut backend, &mut seen, |_| reader.is_finished());
            assert_eq!(
                reader.join().unwrap().unwrap(),
                0,
                "the refused client reads the end"
            );
            assert_eq!(backend.refused(), 1);
            assert_eq!(accepted(&seen).len(), 2);
            let conn = accepted(&seen)[0];
            first.write_all(b"still here").unwrap();
            pump(&mut backend, &mut seen, |s| {
                accepted(s)
                    .iter()
                    .any(|id| data_of(s, *id) == b"still here")
            });
            let _ = conn;
        }
    }

    #[test]
    fn the_peer_closing_is_reported_once_and_the_slot_is_freed() {
        let (mut backend, addr) = backend(8, false);
        let mut seen = Vec::new();
        let stream = client(&addr);
        pump(&mut backend, &mut seen, |s| accepted(s).len() == 1);
        let conn = accepted(&seen)[0];
        drop(stream);
        pump(&mut backend, &mut seen, |s| {
            s.iter()
                .any(|e| matches!(e, Seen::Closed(id) if *id == conn))
        });
        let deadline = Instant::now() + PATIENCE;
        while backend.connections() > 0 {
            assert!(Instant::now() < deadline);
            pump(&mut backend, &mut seen, |_| true);
        }
        let closed = seen.iter().filter(|e| matches!(e, Seen::Closed(_))).count();
        assert_eq!(closed, 1);
    }

    /// Two rings, and a client of ring A whose first bytes ("before") A reported.
    struct Rings {
        a: UringBackend,
        b: UringBackend,
        seen_a: Vec<Seen>,
        seen_b: Vec<Seen>,
        stream: TcpStream,
        conn: ConnId,
    }

    fn two_rings(poll: bool) -> Rings {
        let (mut a, addr) = backend(8, poll);
        let (b, _) = backend(8, poll);
        let mut seen_a = Vec::new();
        let mut stream = client(&addr);
        pump(&mut a, &mut seen_a, |s| accepted(s).len() == 1);
        let conn = accepted(&seen_a)[0];
        stream.write_all(b"before").unwrap();
        pump(&mut a, &mut seen_a, |s| data_of(s, conn) == b"before");
        Rings {
            a,
            b,
            seen_a,
            seen_b: Vec::new(),
            stream,
            conn,
        }
    }

    /// A connection moves from ring A to ring B, whatever arrives first at B: the descriptor
    /// or the handoff. Bytes written before the move are reported by A, after it by B, and
    /// bytes queued on A are written by B.
    #[test]
    fn a_connection_moves_between_rings_with_its_bytes() {
        for poll in [false, true] {
            let Rings {
                mut a,
                mut b,
                mut seen_a,
                mut seen_b,
                mut stream,
                conn,
            } = two_rings(poll);
            a.detach(conn, &b.peer());
            a.send(conn, b"queued on a").unwrap();
            pump(&mut a, &mut seen_a, |s| {
                s.iter().any(|e| matches!(e, Seen::Detached(..)))
            });
            let Some(Seen::Detached(id, handoff)) = seen_a.pop() else {
                panic!("Detached comes last: {seen_a:?}");
            };
            assert_eq!(id, conn);
            // Let B take the descriptor first half of the time.
            if poll {
                let deadline = Instant::now() + PATIENCE;
                while b.transfers.is_empty() {
                    assert!(Instant::now() < deadline, "the descriptor never came");
                    pump(&mut b, &mut seen_b, |_| true);
                }
            }
            b.attach(handoff, 77);
            pump(&mut b, &mut seen_b, |s| {
                s.iter()
                    .any(|e| matches!(e, Seen::Attached { token: 77, .. }))
            });
            let Some(Seen::Attached { conn: moved, .. }) =
                seen_b.iter().find(|e| matches!(e, Seen::Attached { .. }))
            else {
                unreachable!()
            };
            let moved = *moved;
            let queued = read_while_polling(&mut b, &mut seen_b, &stream, 11);
            assert_eq!(queued, b"queued on a");
            stream.write_all(b"after").unwrap();
            pump(&mut b, &mut seen_b, |s| data_of(s, moved) == b"after");
            b.send(moved, b"from b").unwrap();
            let reply = read_while_polling(&mut b, &mut seen_b, &stream, 6);
            assert_eq!(reply, b"from b");
            // A let go of its slot.
            let deadline = Instant::now() + PATIENCE;
            while a.connections() > 0 {
                assert!(Instant::now() < deadline);
                pump(&mut a, &mut seen_a, |_| true);
            }
        }
    }

    /// Waits for the export of `conn` and takes it out of `seen`.
    fn export_of(backend: &mut UringBackend, seen: &mut Vec<Seen>, conn: ConnId) -> Exported {
        pump(backend, seen, |s| {
            s.iter().any(|e| match e {
                Seen::Exported(id, _) => *id == conn,
                Seen::ExportFailed(id, error) => panic!("the export of {id} failed: {error}"),
                _ => false,
            })
        });
        let at = (seen.iter())
            .position(|e| matches!(e, Seen::Exported(id, _) if *id == conn))
            .expect("found above");
        let Seen::Exported(_, exported) = seen.remove(at) else {
            unreachable!()
        };
        exported
    }

    #[test]
    fn an_exported_connection_freezes_and_thaws_or_goes_on_in_another_ring() {
        for poll in [false, true] {
            let Rings {
                mut a,
                mut b,
                mut seen_a,
                mut seen_b,
                mut stream,
                conn,
            } = two_rings(poll);
            // Paused and stopped, then exported: the socket's next bytes stay in the kernel.
            a.set_reading(conn, false);
            let deadline = Instant::now() + PATIENCE;
            while !a.stop_reads() {
                assert!(Instant::now() < deadline, "reads never stopped");
                pump(&mut a, &mut seen_a, |_| true);
            }
            a.export(conn);
            let exported = export_of(&mut a, &mut seen_a, conn);
            assert!(exported.unsent.is_empty());
            stream.write_all(b"frozen").unwrap();
            a.send(conn, b"held while frozen").unwrap();
            pump(&mut a, &mut seen_a, |_| true);
            assert_eq!(
                data_of(&seen_a, conn),
                b"before",
                "nothing read while frozen"
            );
            // A failed takeover: A thaws and goes on, its held bytes first.
            drop(exported);
            a.thaw(conn);
            a.set_reading(conn, true);
            pump(&mut a, &mut seen_a, |s| data_of(s, conn) == b"beforefrozen");
            let held = read_while_polling(&mut a, &mut seen_a, &stream, 17);
            assert_eq!(held, b"held while frozen");
            // Exported again, with bytes A could not write yet, and adopted by B.
            a.set_reading(conn, false);
            while !a.stop_reads() {
                pump(&mut a, &mut seen_a, |_| true);
            }
            a.export(conn);
            let mut exported = export_of(&mut a, &mut seen_a, conn);
            exported.unsent.extend_from_slice(b"carried");
            let moved = b.import(exported.socket, exported.unsent).unwrap();
            let carried = read_while_polling(&mut b, &mut seen_b, &stream, 7);
            assert_eq!(carried, b"carried");
            stream.write_all(b"after").unwrap();
            pump(&mut b, &mut seen_b, |s| data_of(s, moved) == b"after");
            b.send(moved, b"from b").unwrap();
            let reply = read_while_polling(&mut b, &mut seen_b, &stream, 6);
            assert_eq!(reply, b"from b");
        }
    }

    #[test]
    fn a_handoff_whose_descriptor_never_comes_fails_after_the_bound() {
        let (mut b, _) = backend(8, false);
        b.transfers
            .handoff(999, 5, Vec::new(), Instant::now() - TRANSFER_WAIT);
        let mut seen = Vec::new();
        pump(&mut b, &mut seen, |s| {
            s.iter()
                .any(|e| matches!(e, Seen::AttachFailed { token: 5 }))
        });
    }

    #[test]
    fn wake_ups_arrive_from_another_ring_and_from_the_eventfd() {
        let (mut a, _) = backend(8, false);
        let (mut b, _) = backend(8, false);
        let mut seen_a = Vec::new();
        let mut seen_b = Vec::new();
        a.wake_peer(&b.peer());
        pump(&mut a, &mut seen_a, |_| true); // submits the MSG_RING
        pump(&mut b, &mut seen_b, |s| {
            s.iter().any(|e| matches!(e, Seen::Wake))
        });
        seen_b.clear();
        b.remote_waker().wake();
        pump(&mut b, &mut seen_b, |s| {
            s.iter().any(|e| matches!(e, Seen::Wake))
        });
    }

    /// Dropping a backend that holds many connections with ops in flight (more connections
    /// than its completion queue has entries; each with its receive or poll armed, some also
    /// with a send the client does not read, some with a graceful close under way) cancels
    /// and closes them all: no op is left in flight, every slot is closed, and the kernel never
    /// had to keep completions beyond the queue, though each op gets a cancel of its own
    /// (which completes at once: submitting them all together overflows this queue).
    ///
    /// What the drain avoids, one cancel walking every armed poll of the ring
    /// (`IORING_ASYNC_CANCEL_ANY`, or `_FD` per connection), costs time quadratic in the
    /// connections (seconds in one `io_uring_enter` at ~20,000 per ring) but behaves the same:
    /// no test here can tell it apart without timing it (docs/uring.md has the measurement).
    #[test]
    fn dropping_many_busy_connections_drains_every_op_within_the_completion_queue() {
        const CONNECTIONS: usize = 1_200;
        let small = RingSizes {
            sq_entries: 64,
            cq_entries: 256,
        };
        for poll in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr: std::net::SocketAddr = listener.local_addr().unwrap();
            // Accepted sockets inherit the small send buffer: a send to a client that does
            // not read stays in flight.
            socket2::SockRef::from(&listener)
                .set_send_buffer_size(4096)
                .unwrap();
            let mut backend =
                UringBackend::new(listener, limits(CONNECTIONS, poll), small).unwrap();
            let mut seen = Vec::new();
            let mut clients = Vec::with_capacity(CONNECTIONS);
            while clients.len() < CONNECTIONS {
                // A few at a time, so the listener's backlog never overflows.
                for _ in 0..50 {
                    clients.push(small_reader(addr));
                }
                let want = clients.len();
                pump(&mut backend, &mut seen, |s| accepted(s).len() == want);
            }
            let conns = accepted(&seen);
            let unread = vec![7u8; 64 * 1024];
            for (index, conn) in conns.iter().enumerate() {
                match index % 3 {
                    0 => backend.send(*conn, &unread).unwrap(),
                    1 => backend.close(*conn),
                    _ => {}
                }
            }
            // Submits the sends and shutdowns. So many at once overflow this small queue; the
            // test is about what the drain does, so it starts from a settled ring.
            pump(&mut backend, &mut seen, |_| true);
            let deadline = Instant::now() + PATIENCE;
            while backend.has_backlog() || backend.ring.submission().cq_overflow() {
                assert!(Instant::now() < deadline, "the ring never settled");
                pump(&mut backend, &mut seen, |_| true);
            }
            assert!(backend.inflight > CONNECTIONS, "{}", backend.inflight);
            let sending = backend.conns.iter().flatten();
            assert!(
                sending.filter(|conn| conn.has(Flags::SENDING)).count() > 0,
                "some sends wait for their clients"
            );
            let drained = backend.drain(PATIENCE);
            assert_eq!(
                drained,
                Drained {
                    inflight: 0,
                    cq_overflowed: false
                },
                "poll mode: {poll}"
            );
            assert_eq!(backend.connections(), 0, "every slot is closed");
            drop(backend);
            // An idle client sees the end of its connection.
            let mut idle = &clients[2];
            idle.set_read_timeout(Some(PATIENCE)).unwrap();
            assert_eq!(idle.read(&mut [0u8; 1]).unwrap(), 0);
        }
    }

    /// The record is allocated for every fixed-file slot at start (20,000 per ring here), so
    /// its size is a cost per connection the ring could hold; what only a writing or moving
    /// connection needs lives in its box.
    #[test]
    fn a_connection_record_is_sixteen_bytes_and_an_idle_one_owns_no_heap() {
        assert_eq!(std::mem::size_of::<Option<Conn>>(), 16);
        let (mut backend, addr) = backend(8, true);
        let mut seen = Vec::new();
        let stream = client(&addr);
        pump(&mut backend, &mut seen, |s| accepted(s).len() == 1);
        let conn = accepted(&seen)[0];
        backend.send(conn, b"hello").unwrap();
        read_while_polling(&mut backend, &mut seen, &stream, 5);
        pump(&mut backend, &mut seen, |_| true);
        let record = backend.conns[conn as usize].as_ref().unwrap();
        assert!(record.out.is_none(), "{record:?}");
    }
}
