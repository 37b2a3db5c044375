//! One shard: a thread that owns a backend (its sockets), its connections, its router (its
//! users) and its side of the mailboxes. Nothing here is shared with other shards except the
//! mailboxes and the counters.
//!
//! A turn of the loop:
//! 1. poll the backend and handle its events: stanzas, closes, new connections; the input of
//!    connections in their handshake is kept for step 6;
//! 2. drain the mailboxes from the other shards (bounded per turn);
//! 3. carry out the router's actions as they come: stanzas queued on connections, mail to
//!    other shards (a full mailbox pauses the connection that produced the mail);
//! 4. end the turn: seal each touched connection's stanzas into one frame and hand the bytes to
//!    the backend, move authenticated connections to their home shards, close what must close,
//!    retry blocked mail, wake the shards that got mail (once each);
//! 5. close the offline store's batch when it is due, hand its write and fsync to the shard's
//!    syncer thread ([`crate::syncer`]), and release the ServerAcks of what the syncer
//!    reported durable: the loop neither writes the queue's batches nor waits for their fsync
//!    (what IO stays on it is listed in docs/decisions.md, "The offline queue's fsync runs on
//!    a syncer thread per shard");
//! 6. hand the kept handshake input, oldest first, with each connection's session, to the
//!    shard's handshaker thread ([`crate::handshaker`]), which runs below the loop and wakes
//!    it with the answers; the loop takes them back right after its next poll, before the
//!    turn's other work. Without the thread (`handshake_thread = false`), work on the input
//!    here, at most `handshakes_per_turn` connections' worth (each ~260 us of X25519), and end
//!    the turn again: a flood of handshakes neither delays the answers of this turn nor makes a
//!    turn long, and what the cap leaves is first in line next turn (which then does not
//!    sleep);
//! 7. once per tick, enforce the handshake and idle timeouts, expire old queued items and
//!    compact the store a bounded step.
//!
//! Two clocks: every deadline (batch, handshake, idle, compaction ages) runs on the monotonic
//! [`monotonic_ms`], so a step of the system clock neither stalls the ServerAcks nor idles out
//! every connection at once; the wall clock ([`wall_clock_ms`]) only stamps messages, receipts
//! and last-seen times and decides the offline TTL.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use foldhash::HashMap;
use hop_protocol::keys::KEY_BYTES;
use hop_protocol::noise::{
    Refusal, RefusalReason, FRAME_PLAINTEXT_BYTES_MAX, HANDSHAKE_MESSAGE_BYTES_MAX,
};
use hop_protocol::session::{Channel, InputError, PeerError, ServerConnection, ServerEvent};
use hop_protocol::wire::ReceiptKind;
use hop_protocol::wire::{ErrorCode, GoAwayReason, Kind, NodeAck, Pong, Stanza, UserRef};
use hop_protocol::{StaticKey, UserId};
use hop_router::{
    home_shard, Action, ConnRef, Queued, Router, SendTo, ShardId, ShardMessage, NO_KEEP,
};
use hop_store::accounts::AccountLog;
use hop_store::devices::{DeviceLog, DeviceRecord};
use hop_store::groups::{GroupLog, GroupRecord};
use hop_store::io::FsIo;
use hop_store::privacy::PrivacyLog;
use hop_store::seen::SeenLog;
use hop_store::GroupTag;
use hop_store::ShardStore;
use tracing::{debug, error, info, warn};

use crate::admission::{AddressTable, Admitted, Tally};
use crate::cluster::membership::{Cluster, Home, Member, ShardLocality, View};
use crate::control::{Command, Controls, DrainPlan};
use crate::directory::{Directory, Placement};
use crate::handshaker::{self, Handshaker};
use crate::mailbox::Mailboxes;
use crate::reader::{self, Reader};
use crate::stats::{bump, ShardStats};
use crate::syncer::{Finished, Job, LogKind, Syncer};
use crate::sys::realtime::RealTime;
use crate::sys::{Backend, ConnId, Event, Exported, Reading, Wake};
use crate::takeover::{Ask, ConnExport, Gate, Handover, ShardExport};
use crate::tokens::Tokens;

/// Mail one shard takes from each other shard per turn.
const MAILS_PER_SOURCE_PER_TURN: usize = 4096;
/// Mails waiting in this shard's outboxes (other shards' mailboxes full) past which the
/// groups homed here take no new message: their fan-out would only grow the outboxes. The
/// senders are told to try again (`OVERLOADED`); a message already on its way goes on.
const OUTBOX_MAILS_FANOUT_MAX: usize = 16 * 1024;
/// The longest a shard sleeps between timer checks.
const TICK_MAX: Duration = Duration::from_secs(1);
/// How often a shard looks at a takeover under way, at most.
const HANDOVER_POLL: Duration = Duration::from_millis(10);
/// How long shutdown waits for GoAways to drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);
/// Users whose queues one tick checks for expired items.
const EXPIRE_USERS_PER_TICK: usize = 1024;
/// Bytes one tick's compaction step may read.
const COMPACT_BYTES_PER_TICK: usize = 4 * 1024 * 1024;
/// How often a shard over its send budget looks for the slowest readers, at most (a scan of
/// its connections)...
const SEND_BUDGET_EVERY_MS: u64 = 100;
/// ... and how soon after a look that closed some: a flood keeps filling buffers meanwhile, and
/// 100 ms of it held hopd's memory up by a hundred MiB and more in `tests/flood.rs`.
const SEND_BUDGET_AGAIN_MS: u64 = 10;
/// Connections one enforcement of the send budget closes, at most.
const SEND_BUDGET_CLOSES_MAX: usize = 256;
/// Bad-input log lines per shard per second at `warn`; the rest go to `debug`.
const WARNINGS_PER_SECOND: u32 = 10;
/// Mails one shard holds for other nodes whose links' queues are full; past it new work for
/// them from clients is refused to its senders.
const NODE_OUTBOX_MAX: usize = 16 * 1024;
/// The same bound for mail that other nodes' mail makes (answers, copies for a replica node,
/// receipts): what a link brings in cannot be paused (two nodes would wait on each other), and
/// is bounded by the work in flight between the nodes, which the clients' bound and the links'
/// queues limit; dropping it would leave a sender waiting for an answer that never comes.
const NODE_OUTBOX_ANSWERS_MAX: usize = 4 * NODE_OUTBOX_MAX;
/// Messages one shard sends to their users' new home or replica nodes per turn after a change
/// of members (each may be a read from the store).
const SEND_QUEUES_PER_TURN: usize = 256;
/// How long the loop waits at most while mail for another node waits for its link's queue.
const NODE_OUTBOX_RETRY: Duration = Duration::from_millis(1);
/// The longest between two sweeps for expired accounts (a sweep walks every user of the shard).
const ACCOUNT_SWEEP_MAX_MS: u64 = 60 * 60 * 1000;
/// Records a seen log may hold beyond twice the users it keeps times for before it is
/// rewritten.
const SEEN_REWRITE_SLACK: u64 = 4096;
/// After an account log's write failed, how long the next jobs leave the logs out, so that a
/// failing disk is not retried in a loop of jobs and wake-ups.
const LOG_RETRY_MS: u64 = 100;
/// Records one store read fetches when a kept message must be pushed: the router pushes a
/// user's queue in order, so the next ones are usually asked for right after. At most this many
/// bodies (each at most 64 KiB) are held in the read-ahead.
const READ_AHEAD_RECORDS: usize = 64;

/// Work that crosses shards.
pub enum Mail<H> {
    Router(ShardMessage),
    Handoff(Box<Handoff<H>>),
}

/// An authenticated connection moving to its user's home shard.
pub struct Handoff<H> {
    socket: H,
    session: ServerConnection,
    user: UserId,
    key: [u8; KEY_BYTES],
    /// Stanzas that arrived with the last handshake message, before the move.
    early: Vec<Stanza>,
    /// Its place in the server's count by source address.
    admitted: Admitted,
}

/// The mailboxes of a server whose shards run backend `B`.
pub type ShardMailboxes<B> = Mailboxes<Mail<<B as Backend>::Handoff>, <B as Backend>::Peer>;

/// A handed-over connection waiting for its backend to adopt the socket.
struct Adoption {
    session: ServerConnection,
    user: UserId,
    key: [u8; KEY_BYTES],
    early: Vec<Stanza>,
    admitted: Admitted,
}

/// Settings a shard needs.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub index: ShardId,
    pub shards: u16,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    /// Connection ids the backend may hand out: the connection table is reserved for this
    /// many at start (address space only; a page is touched when an entry in it is used), so
    /// it never grows by copying.
    pub connection_slots: usize,
    /// When items to keep go to the offline queue: the group-commit policy.
    pub keeping: Keeping,
    /// Bytes this shard's connections may hold for writing, all together (its share of
    /// `send_buffers_bytes_max`); past it the slowest readers are closed. 0: no budget.
    pub send_budget_bytes: usize,
    /// The account clock (`hop_store::seen`) at process start, seconds: the clock is this
    /// plus the monotonic clock's seconds.
    pub account_clock_base_s: u32,
    /// Connections whose handshake input one turn works on, at most, after the turn's other
    /// input is answered and written; the rest wait for the next turns, in order. 0: no cap,
    /// handshake input is worked on as it is read.
    pub handshakes_per_turn: usize,
    /// Handshakes go to the shard's handshaker thread ([`crate::handshaker`]); then
    /// `handshakes_per_turn` does not apply.
    pub handshake_thread: bool,
    /// After a turn that had work, the loop looks for more without sleeping for this long
    /// before it blocks. 0: it blocks at once.
    pub idle_poll_us: u64,
}

/// When the shard hands the items it must keep to the store. An item for a device that is
/// connected is held back `ack_wait_ms`, so that one its device acks meanwhile never touches
/// the disk (no record, no checksum, no tombstone, no compaction); what is still held then
/// goes to the store's buffer, which commits it with its group commit. Items leave in the
/// order they came (one for a device that is not connected waits behind an earlier held
/// one), so a queue's records are on disk in the order it was queued. The ServerAck of a
/// held message waits like that of a buffered one: until its device acks it or the disk has
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeping {
    /// `always`: every loop turn that held something commits it.
    pub at_once: bool,
    /// `batch`/`none`: how long an item for a connected device waits for its Ack.
    pub ack_wait_ms: u64,
}

/// Items held at most, whatever their wait: past it the oldest go to the store.
const HELD_ITEMS_MAX: usize = 65_536;
/// Body bytes held at most (they are in memory until they are on disk): a device that is
/// connected but does not ack pins no more than this of large bodies.
const HELD_BYTES_MAX: usize = 8 << 20;

/// Everything a shard thread starts with.
pub struct ShardParts<B: Backend> {
    pub settings: ShardSettings,
    pub backend: B,
    pub router: Router,
    pub key: Arc<StaticKey>,
    pub mailboxes: Arc<ShardMailboxes<B>>,
    pub stats: Arc<ShardStats>,
    pub accounts: AccountLog<FsIo>,
    pub privacy: PrivacyLog<FsIo>,
    pub store: ShardStore<FsIo>,
    pub shutdown: Arc<AtomicBool>,
    /// Operators' requests and the drain.
    pub controls: Arc<Controls>,
    /// Rebuilds the shard's state from disk after a panic.
    pub rebuild: Rebuild,
    pub devices: DeviceLog<FsIo>,
    /// Which account each companion device belongs to, for every shard.
    pub directory: Arc<Directory>,
    pub groups: GroupLog<FsIo>,
    /// When the devices homed here were last seen, on disk.
    pub seen: SeenLog<FsIo>,
    /// This node's view of its cluster; `None` for a single hopd.
    pub cluster: Option<Arc<Cluster>>,
    /// The server's count of connections by source address, for admission.
    pub addresses: Arc<AddressTable>,
    /// Under `registration = token`: the tokens a new key must redeem first.
    pub tokens: Option<Arc<Tokens>>,
    /// A takeover of this process by a new one, when one asks.
    pub handover: Arc<Handover>,
    /// Connections taken over from the process before this one, resumed before serving once
    /// the gate opens (the gate may say to stop instead).
    pub inherited: Option<(ShardExport, Arc<Gate>)>,
}

/// Which node of a user's a mail is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The user's home ([`hop_router::Action::ToNode`]).
    Home,
    /// The node placement ranks next, which keeps copies of the user's queue
    /// ([`hop_router::Action::ToReplica`]).
    Replica,
}

/// What a node link's queue did with a mail offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    Taken,
    /// Its queue is full and the link is up: offer it again soon.
    Full,
    /// No link can take it.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    /// Authenticated as `Conn::user`; handed to its home shard at the end of the turn. Its
    /// key and early stanzas wait in `Core::moving` (brief, so not in every entry).
    Moving,
    /// `Conn::user`'s connection in the router.
    Open,
    /// A new key under `registration = token`, on its home shard: its first stanza must be a
    /// `Register` whose token makes the account; the router has not heard of it yet (its key
    /// waits in `Core::registering`).
    Registering,
    /// Closing at the end of this turn; input is ignored. `Conn::user` is kept only if the
    /// connection was open, so that the router hears of its end.
    Closing,
}

#[derive(Debug)]
struct Moving {
    /// Where it goes: its account's home shard.
    home: ShardId,
    key: [u8; KEY_BYTES],
    /// Stanzas that arrived before the move.
    early: Vec<Stanza>,
}

/// One connection of this shard: its Noise session and what the loop needs to route, time and
/// write it. Bytes to write wait in the shard's `Core::out`, not here, so an idle connection
/// is this entry alone (a test pins its size).
#[derive(Debug)]
struct Conn {
    session: ServerConnection,
    user: Option<UserId>,
    /// When the handshake started or, once open, when input last arrived.
    since_ms: u64,
    generation: u32,
    phase: Phase,
    dirty: bool,
    paused: bool,
}

// 128 since user ids are 16 bytes (120 with the 8-byte ids of protocol version 1).
const _: () = assert!(std::mem::size_of::<Option<Conn>>() <= 128);

impl Conn {
    fn new(generation: u32, session: ServerConnection, now_ms: u64) -> Self {
        Self {
            session,
            user: None,
            since_ms: now_ms,
            generation,
            phase: Phase::Handshaking,
            dirty: false,
            paused: false,
        }
    }
}

/// Bytes the turn produced for one connection: `Core::out[start..end]`, for the connection
/// `id` of this generation (an id can be reused within a turn after the peer closed).
#[derive(Debug, Clone, Copy)]
struct Span {
    id: ConnId,
    generation: u32,
    start: usize,
    end: usize,
}

/// Items to keep, held back until they are due ([`Keeping`]), in the order of their keep
/// numbers (`Action::Keep`: the router numbers every item it queues, one after another). A
/// held item that its device acks is cancelled in place, found by its number
/// (`Action::Forget`): its place is its number less the first's, or, past a gap in the
/// numbers (they skip 0 when they wrap), a binary search away. No hashing: items are held and
/// taken hundreds of thousands of times a second. The first item is never a cancelled one.
#[derive(Debug, Default)]
struct Held {
    items: VecDeque<HeldItem>,
    /// Items not cancelled.
    live: usize,
    /// Their body bytes.
    bytes: usize,
}

#[derive(Debug)]
struct HeldItem {
    keep: u32,
    user: UserId,
    /// `None` once cancelled.
    item: Option<Queued>,
    /// When it goes to the store (monotonic ms).
    due_ms: u64,
}

/// The body bytes a held item keeps in memory.
fn body_bytes(item: &Queued) -> usize {
    match item {
        Queued::Message { body, .. } | Queued::Sent { body, .. } | Queued::Group { body, .. } => {
            body.len()
        }
        Queued::Receipt { .. } => 0,
    }
}

/// An item the store took and has not made durable yet.
#[derive(Debug, Clone, Copy)]
struct Written {
    /// The store's sequence number of its record.
    seq: u64,
    user: UserId,
    /// What its device's Ack names.
    id: u64,
    kind: ReceiptKind,
    /// The router's keep number, for [`Router::handle_kept`].
    keep: u32,
}

impl Held {
    /// Holds `item` until `due_ms`, or until an earlier item leaves if that is later.
    fn hold(&mut self, user: UserId, item: Queued, keep: u32, due_ms: u64) {
        debug_assert!(
            self.items.back().is_none_or(|last| {
                let first = self.items[0].keep;
                keep.wrapping_sub(first) > last.keep.wrapping_sub(first)
            }),
            "keep numbers follow one another"
        );
        self.bytes += body_bytes(&item);
        self.items.push_back(HeldItem {
            keep,
            user,
            item: Some(item),
            due_ms,
        });
        self.live += 1;
    }

    /// Drops the held item `keep` that the device acked, named by its Ack (`user`, `id`,
    /// `kind`); false if it is not held (it went to the store).
    fn cancel(&mut self, user: UserId, id: u64, kind: ReceiptKind, keep: u32) -> bool {
        let (Some(first), Some(last)) = (self.items.front(), self.items.back()) else {
            return false;
        };
        let first = first.keep;
        let offset = keep.wrapping_sub(first);
        // Before the first (the batch it was in went to the store) or after the last.
        if keep == NO_KEEP || offset > last.keep.wrapping_sub(first) {
            return false;
        }
        let place = match self.items.get(offset as usize) {
            Some(held) if held.keep == keep => offset as usize,
            _ => match self
                .items
                .binary_search_by_key(&offset, |held| held.keep.wrapping_sub(first))
            {
                Ok(place) => place,
                Err(_) => return false,
            },
        };
        let held = &mut self.items[place];
        let named = held.user == user
            && held
                .item
                .as_ref()
                .is_some_and(|item| item.ack_kind() == kind && item.ack_id() == id);
        if named {
            if let Some(item) = held.item.take() {
                self.bytes -= body_bytes(&item);
            }
            self.live -= 1;
            while self.items.front().is_some_and(|first| first.item.is_none()) {
                self.items.pop_front();
            }
        }
        named
    }

    /// Nothing held.
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// When the first held item must go to the store: at once under `always` or past the
    /// bounds, else when it is due.
    fn deadline(&self, keeping: &Keeping) -> Option<u64> {
        let first = self.items.front()?;
        if keeping.at_once || self.over_bounds() {
            Some(0)
        } else {
            Some(first.due_ms)
        }
    }

    fn over_bounds(&self) -> bool {
        self.live > HELD_ITEMS_MAX || self.bytes > HELD_BYTES_MAX
    }

    /// Moves the items due at `now_ms` (every one with `all`) into `batch`, oldest first, up
    /// to the first that is not. The batch keeps its capacity: items are held and taken
    /// hundreds of thousands of times a second.
    fn take_due(&mut self, now_ms: u64, all: bool, batch: &mut Vec<(UserId, Queued, u32)>) {
        while let Some(first) = self.items.front() {
            if !(all || first.due_ms <= now_ms || self.over_bounds()) {
                break;
            }
            let held = self.items.pop_front().expect("a first item");
            if let Some(item) = held.item {
                self.live -= 1;
                self.bytes -= body_bytes(&item);
                batch.push((held.user, item, held.keep));
            }
        }
    }
}

/// Bytes of handshake input a connection may have waiting before its reading pauses: one
/// handshake frame's worth. A client sends one handshake message and waits for the answer, so
/// only one that sends stanzas right behind its last handshake message comes near it, and is
/// paused until the handshake is worked on.
const HANDSHAKE_INPUT_PAUSE_BYTES: usize = 2 + HANDSHAKE_MESSAGE_BYTES_MAX;

/// Handshake input read by the backend and not yet worked on: each connection's bytes, in the
/// order the connections first sent them. The shard keeps every handshaking connection's input
/// here ([`HandshakeInput::keep`]) and works on it after the turn's other input is answered,
/// at most `per_turn` connections a turn ([`HandshakeInput::start_turn`], then
/// [`HandshakeInput::next`] until `None`), so that a flood of handshakes cannot make one turn
/// long. What the cap leaves waits for the next turns, first in line.
#[derive(Debug)]
struct HandshakeInput {
    per_turn: usize,
    /// Connections still to take this turn.
    left: usize,
    /// Connections with input waiting, oldest first, with their generation. An entry whose
    /// connection went (no longer in `waiting`) is skipped.
    order: VecDeque<(ConnId, u32)>,
    waiting: HashMap<ConnId, Waiting>,
}

/// One connection's handshake input waiting to be worked on.
#[derive(Debug, PartialEq, Eq)]
struct Waiting {
    generation: u32,
    bytes: Vec<u8>,
    /// The backend was told to stop reading the connection (its input reached
    /// [`HANDSHAKE_INPUT_PAUSE_BYTES`]).
    paused: bool,
}

impl HandshakeInput {
    fn new(per_turn: usize) -> Self {
        Self {
            per_turn,
            left: 0,
            order: VecDeque::new(),
            waiting: HashMap::default(),
        }
    }

    /// Keeps `bytes` read from connection `id` (of `generation`) behind what it sent before;
    /// `Pause` once it holds [`HANDSHAKE_INPUT_PAUSE_BYTES`] or more, so that what waits stays
    /// bounded by that and what the backend had read already.
    fn keep(&mut self, id: ConnId, generation: u32, bytes: &[u8]) -> Reading {
        let waiting = match self.waiting.entry(id) {
            Entry::Occupied(entry) if entry.get().generation == generation => entry.into_mut(),
            entry => {
                // A connection's first input, or (which `forget` prevents) the id's earlier
                // connection went without its input: that goes with it.
                debug_assert!(
                    matches!(entry, Entry::Vacant(_)),
                    "input of a connection that went"
                );
                self.order.push_back((id, generation));
                let first = Waiting {
                    generation,
                    bytes: Vec::new(),
                    paused: false,
                };
                entry.insert_entry(first).into_mut()
            }
        };
        waiting.bytes.extend_from_slice(bytes);
        if waiting.bytes.len() >= HANDSHAKE_INPUT_PAUSE_BYTES {
            waiting.paused = true;
            Reading::Pause
        } else {
            Reading::Continue
        }
    }

    /// A new turn may take `per_turn` connections' input.
    fn start_turn(&mut self) {
        self.left = self.per_turn;
    }

    /// The next calls to [`HandshakeInput::next`] may take `connections`' input.
    fn allow(&mut self, connections: usize) {
        self.left = connections;
    }

    /// The next connection's input, oldest first; `None` when none waits or this turn took
    /// `per_turn` already.
    fn next(&mut self) -> Option<(ConnId, Waiting)> {
        while self.left > 0 {
            let (id, generation) = self.order.pop_front()?;
            let Some(waiting) = self.waiting.remove(&id) else {
                continue; // forgotten
            };
            if waiting.generation != generation {
                // An earlier connection's entry; the id's current one is further back.
                self.waiting.insert(id, waiting);
                continue;
            }
            self.left -= 1;
            return Some((id, waiting));
        }
        None
    }

    /// Input waits: the loop must not sleep.
    fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Connections whose input waits.
    fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Connection `id` went: its input goes with it.
    fn forget(&mut self, id: ConnId) {
        if self.waiting.remove(&id).is_some() && self.waiting.is_empty() {
            self.order.clear();
        }
    }
}

/// A connection whose session is with the handshaker thread (its entry holds
/// [`ServerConnection::Closed`] meanwhile).
#[derive(Debug)]
struct Away {
    generation: u32,
    /// Input read meanwhile, worked on when the session is back.
    late: Vec<u8>,
    /// The backend was told to stop reading the connection.
    paused: bool,
}

/// Capacity of `Core::out` kept between turns; a busier turn's buffer is released.
const OUT_CAPACITY_KEPT_BYTES: usize = 1024 * 1024;

/// A shard restarts after a panic at most this many times within [`RESTART_WINDOW`]; one
/// more and it gives up, which stops the server (non-zero) for the service manager.
pub const RESTARTS_MAX: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The wait before a restart: doubled for each crash within the window, up to the maximum.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A shard's state as its files on disk give it: what a shard starts with, and what it is
/// rebuilt from after a panic.
pub struct Fresh {
    pub router: Router,
    pub accounts: AccountLog<FsIo>,
    pub privacy: PrivacyLog<FsIo>,
    pub devices: DeviceLog<FsIo>,
    pub groups: GroupLog<FsIo>,
    pub seen: SeenLog<FsIo>,
    pub store: ShardStore<FsIo>,
}

/// Builds a shard's [`Fresh`] state again from disk (bindings, presence settings, its queue).
pub type Rebuild = Box<dyn FnMut() -> Result<Fresh, String> + Send>;

/// Runs a shard until shutdown, under its own supervisor ("let it crash", per shard): a
/// panic closes this shard's connections (their clients reconnect), drops its state, rebuilds
/// it from disk (the queue recovers from its log, as after a crash of the process) and serves
/// again on the same backend and listener, while the other shards go on. Acked messages are
/// on disk, so none is lost; what was held for the next commit was not acked yet.
pub fn run<B: Backend>(parts: ShardParts<B>) {
    let ShardParts {
        settings,
        mut backend,
        router,
        key,
        mailboxes,
        stats,
        accounts,
        privacy,
        store,
        shutdown,
        controls,
        mut rebuild,
        devices,
        directory,
        groups,
        seen,
        cluster,
        addresses,
        tokens,
        handover,
        inherited,
    } = parts;
    let index = settings.index;
    handover.register(usize::from(index), backend.remote_waker());
    let fresh = Fresh {
        router,
        accounts,
        privacy,
        devices,
        groups,
        seen,
        store,
    };
    let handles = Handles {
        settings,
        key,
        mailboxes,
        stats,
        controls,
        directory,
        cluster,
        addresses,
        tokens,
        waker: backend.remote_waker(),
        next_token: 0,
        generation: 0,
        handover,
    };
    let mut core = Core::from_handles(handles, fresh);
    if let Some((inherited, gate)) = inherited {
        if !gate.wait() {
            info!(
                shard = index,
                "takeover given up: this shard stops without serving"
            );
            // Dropped, the backend would submit what it queued at open (the listener's accept)
            // and take connections waiting for the process that serves on. The process ends.
            std::mem::forget(backend);
            return;
        }
        core.resume_inherited(&mut backend, inherited);
    }
    info!(shard = index, backend = backend.name(), "shard running");
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    loop {
        core.controls.set_serving(index, true);
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            core.serve(&mut backend, &shutdown);
        }));
        let Err(panic) = served else {
            break;
        };
        core.controls.set_serving(index, false);
        bump(&core.stats.shard_restarts, 1);
        let now = Instant::now();
        crashes.push_back(now);
        while crashes
            .front()
            .is_some_and(|at| now.duration_since(*at) > RESTART_WINDOW)
        {
            crashes.pop_front();
        }
        error!(
            shard = index,
            reason = panic_text(&panic),
            crashes_in_window = crashes.len(),
            "shard panicked: its connections are closed and its state is rebuilt from disk"
        );
        backend.close_all();
        if crashes.len() > RESTARTS_MAX {
            error!(
                shard = index,
                "shard panicked {} times within {:?}; giving up",
                crashes.len(),
                RESTART_WINDOW
            );
            std::panic::resume_unwind(panic);
        }
        let backoff = RESTART_BACKOFF_FIRST
            .saturating_mul(1 << (crashes.len() - 1).min(16))
            .min(RESTART_BACKOFF_MAX);
        std::thread::sleep(backoff);
        // The crashed state goes before the new one is read from disk: nothing of it may
        // write, or hold a file, while its successor opens them.
        let handles = core.into_handles();
        let fresh = loop {
            match rebuild() {
                Ok(fresh) => break fresh,
                Err(error) if !shutdown.load(Ordering::Acquire) => {
                    error!(shard = index, %error, "cannot rebuild the shard; trying again");
                    std::thread::sleep(RESTART_BACKOFF_MAX);
                }
                Err(_) => return,
            }
        };
        core = Core::from_handles(handles, fresh);
        info!(shard = index, "shard restarted");
    }
    core.controls.set_serving(index, false);
    core.shut_down(&mut backend);
}

/// What a shard keeps across a restart.
struct Handles<B: Backend> {
    settings: ShardSettings,
    key: Arc<StaticKey>,
    mailboxes: Arc<ShardMailboxes<B>>,
    stats: Arc<ShardStats>,
    controls: Arc<Controls>,
    directory: Arc<Directory>,
    cluster: Option<Arc<Cluster>>,
    addresses: Arc<AddressTable>,
    tokens: Option<Arc<Tokens>>,
    /// Wakes the shard's loop from another thread (its syncer's).
    waker: Arc<dyn Wake>,
    next_token: u64,
    generation: u32,
    handover: Arc<Handover>,
}

/// The message a panic carried.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl<B: Backend> Core<B> {
    /// A shard's loop state, around its fresh state. `next_token` and `generation` carry on
    /// from a crashed predecessor, so that nothing it started (a move, a handle) is taken for
    /// one of the new core's.
    fn from_handles(handles: Handles<B>, fresh: Fresh) -> Self {
        let Handles {
            settings,
            key,
            mailboxes,
            stats,
            controls,
            directory,
            cluster,
            addresses,
            tokens,
            waker,
            next_token,
            generation,
            handover,
        } = handles;
        let Fresh {
            mut router,
            accounts,
            privacy,
            devices,
            groups,
            seen,
            store,
        } = fresh;
        if let Some(cluster) = &cluster {
            router.set_locality(Box::new(ShardLocality::new(cluster.clone())));
        }
        let shards = usize::from(settings.shards);
        let connection_slots = settings.connection_slots;
        let settings_index = settings.index;
        let now_ms = monotonic_ms();
        Self {
            admission: Tally::new(addresses, connection_slots, now_ms),
            tokens,
            registering: HashMap::default(),
            handshake_input: HandshakeInput::new(settings.handshakes_per_turn),
            handshaker: if settings.handshake_thread {
                Handshaker::spawn(usize::from(settings.index), waker.clone())
            } else {
                None
            },
            away: HashMap::default(),
            sweep_turn: 0,
            send_budget_next_ms: 0,
            seen,
            account_sweep_next_ms: 0,
            node_outbox: HashMap::default(),
            node_outbox_mails: 0,
            sending_queues: VecDeque::new(),
            walked_view: None,
            paused_for_nodes: Vec::new(),
            settings,
            key,
            router,
            conns: Vec::with_capacity(connection_slots),
            generation,
            mailboxes,
            outbox: (0..shards).map(|_| VecDeque::new()).collect(),
            paused: Vec::new(),
            dirty: Vec::new(),
            to_close: Vec::new(),
            to_move: Vec::new(),
            mail_sent_to: vec![false; shards],
            events: Vec::new(),
            out: Vec::new(),
            spans: Vec::new(),
            moving: HashMap::default(),
            scratch: vec![0u8; FRAME_PLAINTEXT_BYTES_MAX + 16].into_boxed_slice(),
            stats,
            accounts,
            privacy,
            now_ms: monotonic_ms(),
            wall_ms: wall_clock_ms(),
            current: None,
            warnings: RateLimit::default(),
            adoptions: HashMap::default(),
            next_token,
            to_pause: Vec::new(),
            store,
            syncer: Syncer::spawn(usize::from(settings_index), waker.clone()),
            reader: Reader::spawn(usize::from(settings_index), waker.clone()),
            syncing: false,
            log_retry_at_ms: 0,
            waker,
            held: Held::default(),
            held_batch: Vec::new(),
            action_batch: Vec::new(),
            written: VecDeque::new(),
            read_ahead: ReadAhead::default(),
            holds: HashMap::default(),
            holds_waiting: VecDeque::new(),
            handshaking: 0,
            controls,
            draining: None,
            orphans: Vec::new(),
            devices,
            directory,
            groups,
            cluster,
            cluster_state: (0, false),
            links_in: HashMap::default(),
            handover,
            handing: None,
            to_thaw: Vec::new(),
        }
    }

    /// What outlives a panic: the settings and shared handles, and the counters that name
    /// moves and connections. The rest (router, store, logs, connections) is dropped.
    fn into_handles(self) -> Handles<B> {
        Handles {
            settings: self.settings,
            key: self.key,
            mailboxes: self.mailboxes,
            stats: self.stats,
            controls: self.controls,
            directory: self.directory,
            cluster: self.cluster,
            addresses: self.admission.shared(),
            tokens: self.tokens,
            waker: self.waker,
            next_token: self.next_token,
            generation: self.generation,
            handover: self.handover,
        }
    }

    /// The loop: poll, mail, commands, drain, commit, write; timers once a tick. Returns when
    /// `shutdown` is set.
    fn serve(&mut self, backend: &mut B, shutdown: &AtomicBool) {
        let core = self;
        let tick = Duration::from_millis(
            (core
                .settings
                .handshake_timeout_ms
                .min(core.settings.idle_timeout_ms)
                / 4)
            .max(10),
        )
        .min(TICK_MAX);
        let mut next_tick = Instant::now() + tick;
        let index = core.settings.index;
        let idle_poll = core.idle_poll();
        let mut active = false;
        let mut mail_backlog = false;
        while !shutdown.load(Ordering::Acquire) {
            let now = Instant::now();
            let timeout = if mail_backlog || core.has_blocked_mail() || core.handshakes_ready() {
                Duration::ZERO
            } else if core.handing.is_some() {
                HANDOVER_POLL
            } else {
                let until = |deadline: Option<u64>| {
                    deadline.map_or(Duration::MAX, |deadline| {
                        Duration::from_millis(deadline.saturating_sub(monotonic_ms()))
                    })
                };
                let until_commit = until(core.commit_deadline());
                let until_drain = until(core.drain_deadline());
                let until_link = if core.node_outbox.is_empty() && core.sending_queues.is_empty() {
                    Duration::MAX
                } else {
                    NODE_OUTBOX_RETRY
                };
                next_tick
                    .saturating_duration_since(now)
                    .min(until_commit)
                    .min(until_drain)
                    .min(until_link)
            };
            core.mailboxes.clear_wake(index);
            // The turn's work starts with its first event (inside the poll) or when the poll
            // returns, whichever comes first.
            let mut turn_started = None;
            // After a turn that had work, look for more without sleeping for up to
            // `idle_poll_us` (never past the turn's deadline): the next message then finds the
            // thread awake instead of paying its wake-up.
            let spin = if active && !timeout.is_zero() {
                idle_poll.min(timeout)
            } else {
                Duration::ZERO
            };
            let mut result = Ok(());
            if !spin.is_zero() {
                let until = Instant::now() + spin;
                while turn_started.is_none() && result.is_ok() && Instant::now() < until {
                    result = core.poll(backend, Duration::ZERO, &mut turn_started);
                    std::hint::spin_loop();
                }
                let counter = if turn_started.is_some() {
                    &core.stats.idle_polls_woken
                } else {
                    &core.stats.idle_polls_slept
                };
                bump(counter, 1);
            }
            if turn_started.is_none() && result.is_ok() {
                result = core.poll(backend, timeout.saturating_sub(spin), &mut turn_started);
            }
            active = turn_started.is_some();
            let turn_started = turn_started.unwrap_or_else(Instant::now);
            if let Err(error) = result {
                warn!(shard = index, %error, "poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            core.read_clocks();
            // Handshakes the thread finished go on first: their replies leave this turn.
            core.take_back_handshakes(backend);
            // Then the reads of the offline queue, with what waited behind them.
            core.take_back_reads();
            if (core.handing.is_some() || core.handover.is_active()) && core.handover_step(backend)
            {
                // A takeover is under way: it does this turn's work (no drain, no timers).
                continue;
            }
            mail_backlog = core.drain_mail(backend);
            core.take_commands();
            core.drain_step(backend);
            // Commit before writing: the ServerAcks that a finished fsync releases leave in this
            // turn's writes. The fsync itself runs on the syncer, which wakes the loop when done.
            core.commit_if_due();
            // Before the writes: what closing the slowest readers makes (presence, mail to
            // other shards) leaves in this turn.
            core.keep_send_budget(backend);
            core.end_turn(backend);
            // Handshakes last, each ~260 us of X25519, a bounded number: what the turn read
            // for open connections is answered and written before them, and a flood of
            // handshakes makes no turn longer than the cap's worth.
            if core.handshaker.is_some() {
                // To the thread, which wakes the loop with the answers.
                core.hand_handshakes_away();
            } else if core.work_on_handshakes(backend) {
                core.end_turn(backend);
            }
            let worked = u64::try_from(turn_started.elapsed().as_micros()).unwrap_or(u64::MAX);
            core.stats
                .turn_times
                .record(&crate::stats::TURN_BUCKETS_US, worked);
            if Instant::now() >= next_tick {
                core.follow_cluster();
                core.enforce_timeouts();
                core.admission.sweep(core.sweep_turn, core.now_ms);
                core.sweep_turn = core.sweep_turn.wrapping_add(1);
                core.expire_and_compact();
                core.router.release_empty(core.wall_ms);
                core.expire_accounts();
                core.router.expire_fanouts(core.wall_ms);
                core.router.expire_replicas(core.wall_ms);
                core.end_turn(backend);
                core.publish_gauges(backend);
                next_tick = Instant::now() + tick;
            }
        }
    }
}

impl<B: Backend> Core<B> {
    /// Waits for the backend's events at most `timeout` and handles them; the first one's
    /// time goes in `turn_started`.
    fn poll(
        &mut self,
        backend: &mut B,
        timeout: Duration,
        turn_started: &mut Option<Instant>,
    ) -> std::io::Result<()> {
        backend.poll(Some(timeout), &mut |event| {
            self.read_clocks();
            turn_started.get_or_insert_with(Instant::now);
            self.handle_event(event)
        })
    }

    /// How long the loop polls without sleeping after a turn with work: `idle_poll_us`, but
    /// none under a real-time policy, where a spinning thread starves the CPU's other threads
    /// and then stalls whole for the kernel's real-time throttling (about 50 ms a second).
    fn idle_poll(&self) -> Duration {
        let wanted = Duration::from_micros(self.settings.idle_poll_us);
        if !wanted.is_zero() && RealTime::of_this_thread().is_some() {
            warn!(
                shard = self.settings.index,
                "the shard runs a real-time policy: idle_poll_us does not apply, it blocks at once"
            );
            return Duration::ZERO;
        }
        wanted
    }
}

struct Core<B: Backend> {
    settings: ShardSettings,
    key: Arc<StaticKey>,
    router: Router,
    /// Indexed by `ConnId`.
    conns: Vec<Option<Conn>>,
    generation: u32,
    mailboxes: Arc<ShardMailboxes<B>>,
    /// Mail a full mailbox did not take yet, per destination, in order.
    outbox: Vec<VecDeque<Mail<B::Handoff>>>,
    /// Connections paused until the outboxes drain.
    paused: Vec<ConnId>,
    dirty: Vec<ConnId>,
    /// Connections to close or move at the end of the turn, with their generation: an id can
    /// be reused within a turn after the peer closed.
    to_close: Vec<(ConnId, u32)>,
    to_move: Vec<(ConnId, u32)>,
    mail_sent_to: Vec<bool>,
    /// Reused buffer of one read's events.
    events: Vec<ServerEvent>,
    /// Sealed bytes for the backend, produced this turn, and whose they are, in order.
    out: Vec<u8>,
    spans: Vec<Span>,
    /// Connections authenticated here and waiting to move to their home shard.
    moving: HashMap<ConnId, Moving>,
    /// Decrypted plaintext of one frame.
    scratch: Box<[u8]>,
    stats: Arc<ShardStats>,
    accounts: AccountLog<FsIo>,
    /// Users' presence settings on disk.
    privacy: PrivacyLog<FsIo>,
    /// Monotonic milliseconds ([`monotonic_ms`]): every deadline.
    now_ms: u64,
    /// Unix-epoch milliseconds: timestamps, last-seen times, the offline TTL.
    wall_ms: u64,
    /// The connection whose input is being handled: the one a full mailbox pauses.
    current: Option<ConnId>,
    warnings: RateLimit,
    /// Handed-over connections whose sockets the backend is adopting, by token.
    adoptions: HashMap<u64, Adoption>,
    next_token: u64,
    /// Connections to pause once the backend is free (after a poll).
    to_pause: Vec<ConnId>,
    /// This shard's offline queue on disk.
    store: ShardStore<FsIo>,
    /// Runs the store's fsyncs and the account logs' writes off this thread; dropped (its
    /// thread ended) with the store.
    syncer: Syncer,
    /// A job of the syncer's has not come back.
    syncing: bool,
    /// Before this (`now_ms`), jobs leave the account logs out: one failed.
    log_retry_at_ms: u64,
    /// Wakes this loop from other threads; kept for the handles a panic leaves.
    waker: Arc<dyn Wake>,
    /// Items to keep that wait for their batch before they go to the store.
    held: Held,
    /// The held batch on its way to the store; kept for its capacity.
    held_batch: Vec<(UserId, Queued, u32)>,
    /// The router's actions being carried out; kept for its capacity.
    action_batch: Vec<Action>,
    /// Items appended to the store and not yet durable, in sequence order.
    written: VecDeque<Written>,
    /// Records of one user's queue read from the store ahead of their push, oldest first.
    read_ahead: ReadAhead,
    /// Reads the offline queue off this thread when a read needs the disk.
    reader: Reader,
    /// Connections whose output waits behind a read of the offline queue, in order.
    holds: HashMap<ConnId, Hold>,
    /// Connections whose hold waits for room on the reader, oldest first.
    holds_waiting: VecDeque<(ConnId, u32)>,
    /// Connections in their handshake.
    handshaking: usize,
    controls: Arc<Controls>,
    /// Set once a drain reached this shard.
    draining: Option<Draining>,
    /// Connections the backend adopted for no move this core knows of: closed at the end of
    /// the turn.
    orphans: Vec<ConnId>,
    /// Device links of the accounts homed here, on disk.
    devices: DeviceLog<FsIo>,
    directory: Arc<Directory>,
    /// The groups homed here, on disk: a snapshot per change.
    groups: GroupLog<FsIo>,
    /// This node's view of its cluster; `None` for a single hopd.
    cluster: Option<Arc<Cluster>>,
    /// The cluster view's generation, and whether this node served, when this shard last
    /// checked its users.
    cluster_state: (u64, bool),
    /// Links from other nodes held here: their connection's generation and the peer's key.
    links_in: HashMap<ConnId, (u32, [u8; KEY_BYTES])>,
    /// Admission: this shard's handshake bucket, and the address each connection is counted
    /// under.
    admission: Tally,
    /// Which stripe of the address table the next tick sweeps.
    sweep_turn: usize,
    /// When the send budget may next be enforced (a scan of the connections).
    send_budget_next_ms: u64,
    /// Under `registration = token`: the tokens a new key must redeem first.
    tokens: Option<Arc<Tokens>>,
    /// Connections of new keys waiting for their `Register`: their key.
    registering: HashMap<ConnId, [u8; KEY_BYTES]>,
    /// When the devices homed here were last seen, on disk (account expiry).
    seen: SeenLog<FsIo>,
    /// Mail for other nodes that their links' queues did not take yet, by node id, in order.
    node_outbox: HashMap<String, VecDeque<(UserId, Box<ShardMessage>)>>,
    /// Mails in `node_outbox`.
    node_outbox_mails: usize,
    /// Users with messages to send after the members changed: to their new home node
    /// (hand-back) or, for users homed here, to their new replica node
    /// ([`Core::send_queues_some`]).
    sending_queues: VecDeque<UserId>,
    /// The members as the last walk of the queues saw them ([`Core::send_queues`]).
    walked_view: Option<Arc<View>>,
    /// Connections paused because their mail waits for another node (`paused` holds those a
    /// full mailbox paused).
    paused_for_nodes: Vec<ConnId>,
    /// When the router's accounts are next swept for expiry (monotonic milliseconds).
    account_sweep_next_ms: u64,
    /// Handshake input read and not yet worked on (`ShardSettings::handshakes_per_turn`).
    handshake_input: HandshakeInput,
    /// The thread that works on handshakes, if the settings ask for it and it started.
    handshaker: Option<Handshaker>,
    /// Connections whose session is with the handshaker, at most [`handshaker::AWAY_MAX`].
    away: HashMap<ConnId, Away>,
    /// A takeover by a new process: what it asks of this shard.
    handover: Arc<Handover>,
    /// This shard's part in a takeover under way.
    handing: Option<Handing>,
    /// Connections exported for a takeover given up: they go on here (at the end of the turn).
    to_thaw: Vec<ConnId>,
}

/// A shard's part in a takeover (see [`crate::takeover`]).
#[derive(Debug, Default)]
struct Handing {
    attempt: u64,
    /// Connections whose reading the takeover paused (it resumes them if it fails).
    paused: HashMap<ConnId, u32>,
    /// Exporting: the connections asked for, whose backend has not answered.
    waiting: HashMap<ConnId, u32>,
    exported: Vec<ConnExport>,
    /// Connections frozen by their export (thawed if the takeover fails).
    frozen: Vec<ConnId>,
    export_started: bool,
    failed: Option<String>,
    /// The export went to the coordinator: the shard touches nothing from here on.
    reported: bool,
    /// When to say again what keeps the shard from being quiet.
    log_at_ms: u64,
    /// The account clock is on disk for this attempt.
    clock_written: bool,
}

/// A shard's part of a lame-duck drain.
#[derive(Debug)]
struct Draining {
    plan: DrainPlan,
    /// The connections held when the drain started, in the order they leave.
    order: VecDeque<(ConnId, u32)>,
    /// The shard told the server it holds nothing any more.
    reported: bool,
}

/// Kept records of one user, read from the store in one call ahead of their push. A message's
/// body never changes, so a record here is never stale, only perhaps no longer wanted.
#[derive(Debug, Default)]
struct ReadAhead {
    user: Option<UserId>,
    records: VecDeque<hop_store::Record>,
    /// Scratch for the store's read.
    read: Vec<hop_store::Record>,
}

/// A kept message to push as a `Deliver` ([`Action::DeliverKept`] without its connection).
#[derive(Debug, Clone, Copy)]
struct Kept {
    user: UserId,
    from: UserId,
    id: u64,
    timestamp_ms: u64,
    proof: u64,
    sent_to: Option<UserId>,
}

impl Kept {
    fn deliver(&self, body: Bytes, group: Option<GroupTag>) -> Stanza {
        let Self {
            from,
            id,
            timestamp_ms,
            proof,
            sent_to,
            ..
        } = *self;
        match (sent_to, group) {
            (_, Some(tag)) => {
                Stanza::deliver_group(from, tag.group, id, timestamp_ms, body, proof, tag.event)
            }
            (Some(to), None) => Stanza::deliver_sent(from, to, id, timestamp_ms, body),
            (None, None) => Stanza::deliver(from, id, timestamp_ms, body, proof),
        }
    }
}

/// What waits to be queued on a connection while a read of the offline queue for it is with
/// the reader (or waits for room there): everything queued for it since, in order, so that
/// nothing overtakes the queued messages.
#[derive(Debug)]
struct Hold {
    generation: u32,
    /// A read for it is with the reader.
    reading: bool,
    waiting: VecDeque<Outgoing>,
}

#[derive(Debug)]
enum Outgoing {
    Stanza(Stanza),
    Kept(Kept),
}

/// What reading a kept message gave.
enum KeptRead {
    Body(Bytes, Option<GroupTag>),
    /// The store cannot read it back.
    Unreadable,
    /// It needs the disk: a job for the reader.
    Job(hop_store::ReadJob<FsIo>),
}

impl<B: Backend> Core<B> {
    fn handle_event(&mut self, event: Event<'_, B::Handoff>) -> Reading {
        if self.handing.is_some() {
            self.handover.busy(usize::from(self.settings.index));
        }
        match event {
            Event::Accepted(id, peer) => {
                bump(&self.stats.connections_accepted, 1);
                let generation = self.next_generation();
                let conn = Conn::new(generation, ServerConnection::new(&self.key), self.now_ms);
                self.insert(id, conn);
                self.handshaking += 1;
                match self.admission.admit(id, peer, self.now_ms) {
                    Ok(()) => Reading::Continue,
                    Err(refusal) => {
                        self.refuse(id, peer, refusal);
                        Reading::Pause
                    }
                }
            }
            Event::Data(id, bytes) => self.handle_data(id, bytes),
            Event::Closed(id) => {
                if let Some(handing) = self.handing.as_mut() {
                    handing.waiting.remove(&id);
                }
                if let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::take) {
                    if conn.phase == Phase::Handshaking {
                        bump(&self.stats.handshakes_abandoned, 1);
                        self.left_handshake(id);
                    }
                    self.forget(id, conn);
                }
                Reading::Pause
            }
            Event::Wake => Reading::Continue,
            Event::Detached(id, socket) => {
                self.detached(id, socket);
                Reading::Pause
            }
            Event::Attached { token, conn } => {
                self.adopted(token, conn);
                Reading::Continue
            }
            Event::AttachFailed { token } => {
                if let Some(adoption) = self.adoptions.remove(&token) {
                    warn!(user = %adoption.user, "a connection handed to this shard could not be adopted");
                }
                Reading::Continue
            }
            Event::Exported(id, exported) => {
                self.exported(id, Ok(exported));
                Reading::Pause
            }
            Event::ExportFailed(id, error) => {
                self.exported(id, Err(error));
                Reading::Pause
            }
        }
    }

    fn handle_data(&mut self, id: ConnId, bytes: &[u8]) -> Reading {
        bump(&self.stats.bytes_in, bytes.len() as u64);
        self.handle_data_unseen(id, bytes)
    }

    /// [`Core::handle_data`] for bytes already counted.
    fn handle_data_unseen(&mut self, id: ConnId, bytes: &[u8]) -> Reading {
        let Some(conn) = self.conns.get(id as usize).and_then(Option::as_ref) else {
            return Reading::Pause;
        };
        let generation = conn.generation;
        if let Some(away) = self.away.get_mut(&id) {
            if away.generation == generation {
                away.late.extend_from_slice(bytes);
                away.paused |= away.late.len() >= HANDSHAKE_INPUT_PAUSE_BYTES;
                return if away.paused {
                    Reading::Pause
                } else {
                    Reading::Continue
                };
            }
        }
        if conn.phase == Phase::Handshaking
            && (self.handshaker.is_some() || self.settings.handshakes_per_turn > 0)
        {
            return self.handshake_input.keep(id, generation, bytes);
        }
        self.work_on_input(id, bytes)
    }

    /// Whether the loop has handshake input it can work on, or hand to the handshaker, now.
    fn handshakes_ready(&self) -> bool {
        self.handshake_input.is_waiting()
            && self
                .handshaker
                .as_ref()
                .is_none_or(|handshaker| handshaker.room() > 0)
    }

    /// Hands waiting handshake input to the handshaker thread, oldest first, while it has room
    /// ([`handshaker::AWAY_MAX`] jobs whose answers were not taken back).
    fn hand_handshakes_away(&mut self) {
        let Some(handshaker) = &self.handshaker else {
            return;
        };
        self.handshake_input.allow(handshaker.room());
        while let Some((id, waiting)) = self.handshake_input.next() {
            let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
                continue;
            };
            debug_assert_eq!(
                conn.generation, waiting.generation,
                "kept input of a connection that went"
            );
            if conn.generation != waiting.generation || conn.phase == Phase::Closing {
                continue;
            }
            let session = std::mem::replace(&mut conn.session, ServerConnection::Closed);
            self.away.insert(
                id,
                Away {
                    generation: waiting.generation,
                    late: Vec::new(),
                    paused: waiting.paused,
                },
            );
            handshaker.start(handshaker::Job {
                id,
                generation: waiting.generation,
                session,
                input: waiting.bytes,
            });
        }
    }

    /// Takes back what the handshaker finished: each session returns to its connection, which
    /// then goes on as if the loop had worked on its input (its reply written, its key
    /// authenticated, its first stanzas handled), and the input read meanwhile is worked on.
    fn take_back_handshakes(&mut self, backend: &mut B) {
        while let Some(done) = self.handshaker.as_ref().and_then(Handshaker::finished) {
            let id = done.id;
            match self.away.get(&id) {
                Some(away) if away.generation == done.generation => {}
                _ => continue, // the connection went meanwhile: its session goes with it
            }
            let away = self.away.remove(&id).expect("looked up above");
            let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
                continue;
            };
            conn.session = done.session;
            if conn.phase == Phase::Closing {
                continue; // closed meanwhile (a timeout): nothing more to do
            }
            self.read_clocks();
            let start = self.out.len();
            self.out.extend_from_slice(&done.out);
            // Only handshake input goes to the thread: the session was not open before it.
            let mut reading = self.worked_on_input(id, false, start, done.events, done.result);
            if !away.late.is_empty() {
                reading = self.handle_data_unseen(id, &away.late);
            }
            match reading {
                Reading::Continue if away.paused => backend.set_reading(id, true),
                Reading::Pause if !away.paused => backend.set_reading(id, false),
                Reading::Continue | Reading::Pause => {}
            }
        }
    }

    /// Works on the handshake input that waits, oldest first, at most
    /// `handshakes_per_turn` connections' worth; the rest waits for the next turn, which then
    /// does not sleep. True if it worked on any.
    fn work_on_handshakes(&mut self, backend: &mut B) -> bool {
        self.handshake_input.start_turn();
        let mut worked = false;
        while let Some((id, waiting)) = self.handshake_input.next() {
            // `forget` drops the input of a connection that went (closed, timed out).
            let live = self.generation_of(id) == Some(waiting.generation);
            debug_assert!(live, "handshake input kept for a connection that went");
            if !live {
                continue;
            }
            self.read_clocks();
            let reading = self.work_on_input(id, &waiting.bytes);
            worked = true;
            // The backend was told `Continue` when the bytes were kept, unless they filled
            // the connection's share; now it hears what reading them said.
            match reading {
                Reading::Continue if waiting.paused => backend.set_reading(id, true),
                Reading::Pause if !waiting.paused => backend.set_reading(id, false),
                Reading::Continue | Reading::Pause => {}
            }
        }
        worked
    }

    /// Decodes and handles what connection `id` sent.
    fn work_on_input(&mut self, id: ConnId, bytes: &[u8]) -> Reading {
        let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
            return Reading::Pause;
        };
        // A moving connection's last bytes (read before the backend stopped) are decoded here
        // and travel with it.
        if conn.phase == Phase::Closing {
            return Reading::Pause;
        }
        if conn.phase == Phase::Open {
            conn.since_ms = self.now_ms;
        }
        let mut events = std::mem::take(&mut self.events);
        let was_open = conn.session.is_open();
        let start = self.out.len();
        let result = conn.session.handle_input::<()>(
            bytes,
            &mut self.scratch,
            &mut self.out,
            &mut |event| {
                events.push(event);
                Ok(())
            },
        );
        self.worked_on_input(id, was_open, start, events, result)
    }

    /// Goes on with connection `id` after its session worked on input: what the session wrote
    /// from `start` in `Core::out` goes to the connection, then its `events` are handled in
    /// order, then an error closes it. Says whether the backend should go on reading it.
    fn worked_on_input(
        &mut self,
        id: ConnId,
        was_open: bool,
        start: usize,
        mut events: Vec<ServerEvent>,
        result: Result<(), InputError<()>>,
    ) -> Reading {
        let Some(generation) = self.generation_of(id) else {
            return Reading::Pause;
        };
        self.note_out(id, generation, start);
        self.current = Some(id);
        for event in events.drain(..) {
            if !self.is_live(id) {
                break;
            }
            match event {
                ServerEvent::Authenticated { client_key } => self.authenticated(id, client_key),
                ServerEvent::Outdated { version } => self.outdated(id, version),
                ServerEvent::Stanza(stanza) => self.stanza(id, stanza),
            }
        }
        self.current = None;
        if events.capacity() >= self.events.capacity() {
            self.events = events;
        }
        if let Err(InputError::Peer(error)) = result {
            self.peer_error(id, was_open, &error);
        }
        match self.conns.get(id as usize).and_then(Option::as_ref) {
            Some(conn)
                if matches!(
                    conn.phase,
                    Phase::Handshaking | Phase::Registering | Phase::Open
                ) && !conn.paused =>
            {
                Reading::Continue
            }
            _ => Reading::Pause,
        }
    }

    fn authenticated(&mut self, id: ConnId, client_key: [u8; KEY_BYTES]) {
        bump(&self.stats.handshakes_completed, 1);
        if let Some(node) = self.cluster.as_ref().and_then(|c| c.peer_of(&client_key)) {
            return self.attach_link(id, &node, client_key);
        }
        let user = UserId::from_public_key(&client_key);
        let account = match self.directory.placement(user) {
            Placement::Own => user,
            Placement::Companion(account) => account,
            Placement::Removed => {
                // Still in its handshake phase: the close counts it as left.
                self.close_with(
                    id,
                    GoAwayReason::DeviceRemoved,
                    "this device was removed from its account; its primary may link it again",
                );
                return;
            }
        };
        if self.sent_to_home_node(id, account) {
            return;
        }
        self.left_handshake(id);
        // Every device of an account lives on the account's home shard.
        let home = home_shard(account, self.settings.shards);
        if home == self.settings.index {
            self.attach_user(id, user, client_key);
        } else if let Some(conn) = self.conn_mut(id) {
            conn.phase = Phase::Moving;
            conn.user = Some(user);
            let generation = conn.generation;
            self.moving.insert(
                id,
                Moving {
                    home,
                    key: client_key,
                    early: Vec::new(),
                },
            );
            self.to_move.push((id, generation));
        }
    }

    /// Keeps connection `id`, whose key is member `node`'s, as a link from that node: it is
    /// no user, and what it sends is work for users of this node (`link_stanza`).
    fn attach_link(&mut self, id: ConnId, node: &str, key: [u8; KEY_BYTES]) {
        self.left_handshake(id);
        let now_ms = self.now_ms;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.phase = Phase::Open;
        conn.since_ms = now_ms;
        let generation = conn.generation;
        self.links_in.insert(id, (generation, key));
        bump(&self.stats.links_in, 1);
        info!(
            shard = self.settings.index,
            node, "node link from another member"
        );
    }

    /// A stanza on a link from another node: a mail for a user of this node is handed to
    /// the user's home shard (the mailbox's backpressure pauses the link like any connection)
    /// and acked; a mail the link sent before is only acked again.
    fn link_stanza(&mut self, id: ConnId, generation: u32, stanza: Stanza) {
        let Some(&(linked, peer)) = self.links_in.get(&id) else {
            return;
        };
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        if linked != generation {
            return;
        }
        match stanza.kind {
            Some(Kind::NodeMail(mail)) => {
                let user = UserRef::user(mail.user.as_ref());
                let message = hop_router::mail::decode(&mail.mail);
                let (Some(user), Ok(message)) = (user, message) else {
                    bump(&self.stats.protocol_errors, 1);
                    self.warn(format_args!(
                        "connection {id}: a node link sent a mail that does not decode"
                    ));
                    self.close_with(id, GoAwayReason::Protocol, "undecodable node mail");
                    return;
                };
                if cluster.take_link_mail(&peer, mail.incarnation, mail.seq) {
                    bump(&self.stats.link_mails_in, 1);
                    let home = home_shard(user, self.settings.shards);
                    if home == self.settings.index {
                        self.router.handle_shard_message(message, self.wall_ms);
                        self.run_actions();
                    } else {
                        self.post(home, Mail::Router(message));
                    }
                }
                let ack = NodeAck {
                    incarnation: mail.incarnation,
                    seq: mail.seq,
                };
                self.queue_stanza(id, &Stanza::of(Kind::NodeAck(ack)));
            }
            Some(Kind::Ping(ping)) => {
                let pong = Stanza::of(Kind::Pong(Pong { nonce: ping.nonce }));
                self.queue_stanza(id, &pong);
            }
            _ => {
                bump(&self.stats.protocol_errors, 1);
                self.close_with(
                    id,
                    GoAwayReason::Protocol,
                    "a node link sends node mail only",
                );
            }
        }
    }

    /// Hands `message` for `user` to the link to `user`'s home node (or, for `Target::Replica`,
    /// its replica node: placement's next after this one). Where the link's queue
    /// is full while the link is up (the peer takes mail, slower than it comes), the mail waits
    /// in this shard's outbox for that node, in order with the node's later mail, and the
    /// connection being read pauses until the outbox drains: backpressure across the link, as
    /// a full mailbox between shards does. Where there is no link to take it (no such member,
    /// the link down and its queue full, or the outboxes at [`NODE_OUTBOX_MAX`], or
    /// [`NODE_OUTBOX_ANSWERS_MAX`] for mail made by other nodes' mail), the work is
    /// refused to its sender ([`Router::handle_unroutable`]).
    fn mail_to_node(&mut self, user: UserId, message: Box<ShardMessage>, target: Target) {
        let member = self.cluster.as_ref().and_then(|cluster| {
            let view = cluster.view();
            match target {
                Target::Home => match view.home(user) {
                    Home::There(member) => Some(member.clone()),
                    _ => None,
                },
                Target::Replica => view.replica(user).cloned(),
            }
        });
        let Some(member) = member else {
            return self.router.handle_unroutable(*message, self.wall_ms);
        };
        let bound = if self.reading_a_client() {
            NODE_OUTBOX_MAX
        } else {
            NODE_OUTBOX_ANSWERS_MAX
        };
        if let Some(waiting) = self.node_outbox.get_mut(&member.node_id) {
            if self.node_outbox_mails >= bound {
                return self.router.handle_unroutable(*message, self.wall_ms);
            }
            waiting.push_back((user, message));
            self.node_outbox_mails += 1;
            return self.pause_current_client();
        }
        match self.offer_to_link(&member, user, &message) {
            Offered::Taken => {}
            Offered::Full if self.node_outbox_mails < bound => {
                bump(&self.stats.link_backpressure, 1);
                self.node_outbox
                    .entry(member.node_id.clone())
                    .or_default()
                    .push_back((user, message));
                self.node_outbox_mails += 1;
                self.pause_current_client();
            }
            Offered::Full | Offered::Refused => {
                self.router.handle_unroutable(*message, self.wall_ms);
            }
        }
    }

    /// Offers one mail to the link to `member`.
    fn offer_to_link(&self, member: &Member, user: UserId, message: &ShardMessage) -> Offered {
        let Some((cluster, links)) = self
            .cluster
            .as_ref()
            .and_then(|cluster| Some((cluster, cluster.links.as_ref()?)))
        else {
            return Offered::Refused;
        };
        let mut mail = Vec::new();
        hop_router::mail::encode(message, &mut mail);
        match links.send(cluster, member, user, mail) {
            Ok(()) => Offered::Taken,
            Err(full) if full.link_up => Offered::Full,
            Err(_) => Offered::Refused,
        }
    }

    /// Offers the mail waiting for each node to its link again, in order. A node that left the
    /// members, or whose link went down, has its waiting work refused to the senders (their
    /// clients send again; the users have a new home, or will have once the lease runs out).
    fn retry_node_outbox(&mut self, backend: &mut B) {
        if self.node_outbox.is_empty() {
            return;
        }
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let view = cluster.view();
        let nodes: Vec<String> = self.node_outbox.keys().cloned().collect();
        for node in nodes {
            let member = view.members.iter().find(|m| m.node_id == node).cloned();
            let mut waiting = self.node_outbox.remove(&node).unwrap_or_default();
            // Once one mail for the node is refused, so is the rest of what waits for it: a
            // later mail the link took meanwhile would overtake it.
            let mut refusing = member.is_none();
            while let Some((user, message)) = waiting.pop_front() {
                let offered = match &member {
                    Some(member) if !refusing => self.offer_to_link(member, user, &message),
                    _ => Offered::Refused,
                };
                refusing |= offered == Offered::Refused;
                match offered {
                    Offered::Taken => self.node_outbox_mails -= 1,
                    Offered::Full => {
                        waiting.push_front((user, message));
                        break;
                    }
                    Offered::Refused => {
                        self.node_outbox_mails -= 1;
                        self.router.handle_unroutable(*message, self.wall_ms);
                    }
                }
            }
            if !waiting.is_empty() {
                self.node_outbox.insert(node, waiting);
            }
        }
        self.run_actions();
        if self.node_outbox.is_empty() {
            let handing = self.handing.is_some();
            for id in std::mem::take(&mut self.paused_for_nodes) {
                if let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) {
                    conn.paused = false;
                    if !handing {
                        backend.set_reading(id, true);
                    }
                }
            }
        }
    }

    /// The loop is handling a client connection's input: not a node link's, nor mail from
    /// another shard.
    fn reading_a_client(&self) -> bool {
        let Some(current) = self.current else {
            return false;
        };
        let generation = self.generation_of(current);
        self.links_in
            .get(&current)
            .is_none_or(|(linked, _)| Some(*linked) != generation)
    }

    /// Pauses the connection being read for mail that waits for another node, unless it is
    /// a node link: two nodes that each stopped reading the other's link while waiting for
    /// room in their own would wait for ever. What a link's mail makes waits in the outbox
    /// (bounded by [`NODE_OUTBOX_MAX`]) and the link goes on. Such connections read again once
    /// no mail waits for any node; those a full mailbox paused, once the mailboxes take theirs
    /// (`retry_outbox`): one reason does not hold up the other's.
    fn pause_current_client(&mut self) {
        let Some(current) = self.current.filter(|_| self.reading_a_client()) else {
            return;
        };
        if let Some(conn) = self.conn_mut(current) {
            if !conn.paused {
                conn.paused = true;
                self.paused_for_nodes.push(current);
                bump(&self.stats.mail_backpressure, 1);
            }
        }
    }

    /// Pauses the connection being read (its input makes mail that must wait).
    fn pause_current(&mut self) {
        if let Some(current) = self.current {
            if let Some(conn) = self.conn_mut(current) {
                if !conn.paused {
                    conn.paused = true;
                    self.paused.push(current);
                    bump(&self.stats.mail_backpressure, 1);
                }
            }
        }
    }

    /// In a cluster, sends connection `id` of `account` away when this node is not the
    /// account's home: to the home node (GoAway REDIRECT, with its address and key), or, while
    /// this node is no member, away with a hint to come back after a lease time. True if sent.
    fn sent_to_home_node(&mut self, id: ConnId, account: UserId) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        let view = cluster.view();
        let stanza = match cluster.home(&view, account) {
            Home::Here => return false,
            Home::There(member) => {
                bump(&self.stats.cluster_redirects, 1);
                Stanza::go_away_redirect(member.advertise.clone(), &member.server_key)
            }
            Home::Unavailable => {
                bump(&self.stats.cluster_unavailable, 1);
                Stanza::go_away_retry_after(
                    GoAwayReason::Unavailable,
                    "this node is not serving: it is not a member of its cluster now",
                    u32::try_from(cluster.settings.lease_ms).unwrap_or(u32::MAX),
                )
            }
        };
        self.queue_stanza(id, &stanza);
        self.close(id);
        true
    }

    /// When the cluster's members changed, or this node's lease began or ended: every
    /// connection whose account now lives on another node (or, while this node serves no one,
    /// every connection) is sent away as at its handshake. Once per tick; a full walk only
    /// when something changed.
    fn follow_cluster(&mut self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        // A draining node has left its cluster on purpose: the drain sends its users away,
        // spread over the window, not this walk all at once.
        if self.controls.is_draining() {
            return;
        }
        // A new member list, or this node's lease starting or ending.
        let state = (cluster.generation(), cluster.serving());
        if state == self.cluster_state {
            return;
        }
        if state.0 != self.cluster_state.0 {
            let view = cluster.view();
            let departed = cluster.departed_since(self.cluster_state.0);
            self.send_queues(&view);
            self.router
                .handle_members_changed(self.wall_ms, departed.as_deref());
            self.walked_view = Some(view);
        }
        self.cluster_state = state;
        let open: Vec<(ConnId, UserId)> = (0..self.conns.len() as ConnId)
            .filter_map(|id| {
                let conn = self.conns[id as usize].as_ref()?;
                (conn.phase == Phase::Open).then_some((id, conn.user?))
            })
            .collect();
        for (id, user) in open {
            let account = match self.directory.placement(user) {
                Placement::Companion(account) => account,
                _ => user,
            };
            self.sent_to_home_node(id, account);
        }
        self.run_actions();
    }

    /// The members changed to `now`: this node claims the queues of the users it is home to
    /// now and, where their replica node changed since the last walk (or this is the first
    /// since start), copies their messages to it again ([`Router::claim_queue`],
    /// [`Router::copy_again`]); it hands the messages it took as home of users another node
    /// is home to now to that node ([`Router::hand_back`]). Runs at every change of the list, so
    /// that a change this shard saw only the end of (a node back within a tick) still sends
    /// what it must.
    ///
    /// The messages leave [`SEND_QUEUES_PER_TURN`] at a time, at the end of turns in which no
    /// mail waits for a link ([`Core::send_queues_some`]): a node may hold far more than the
    /// links' queues take at once.
    fn send_queues(&mut self, now: &View) {
        self.sending_queues.clear();
        for user in self.router.queued_users() {
            let account = self.router.account_of(user);
            // A companion device's queue lives with its account's and is kept on the home
            // node only (docs/cluster.md): its mail would be routed by the device's id.
            if account != user {
                continue;
            }
            match now.home(account) {
                Home::Here => {
                    let replica = now.replica(account).map(|member| member.node_id.as_str());
                    // None before the first walk since start: every queue is copied then.
                    let before = self
                        .walked_view
                        .as_ref()
                        .map(|view| view.replica(account).map(|member| member.node_id.as_str()));
                    let copy_again = replica.is_some() && before != Some(replica);
                    // Copies an earlier walk marked and did not send yet are sent too.
                    if self.router.claim_queue(user, copy_again) && replica.is_some() {
                        self.sending_queues.push_back(user);
                    }
                }
                Home::There(_) => self.sending_queues.push_back(user),
                Home::Unavailable => {}
            }
        }
        if !self.sending_queues.is_empty() {
            info!(
                shard = self.settings.index,
                users = self.sending_queues.len(),
                "sending queues to their users' new home or replica nodes"
            );
        }
    }

    /// Sends up to [`SEND_QUEUES_PER_TURN`] messages of the users in `sending_queues`, while no
    /// mail waits for a link.
    fn send_queues_some(&mut self) {
        if self.sending_queues.is_empty() || !self.node_outbox.is_empty() {
            return;
        }
        let Some(cluster) = self.cluster.clone() else {
            self.sending_queues.clear();
            return;
        };
        let view = cluster.view();
        let mut budget = SEND_QUEUES_PER_TURN;
        while budget > 0 && self.node_outbox.is_empty() {
            let Some(user) = self.sending_queues.pop_front() else {
                break;
            };
            // A home that moved again since the walk is the next walk's to send to.
            let (sent, more) = match view.home(self.router.account_of(user)) {
                Home::There(_) => self.router.hand_back(user, self.wall_ms, budget),
                Home::Here => self.router.copy_again(user, self.wall_ms, budget),
                Home::Unavailable => continue,
            };
            budget -= sent;
            if more {
                self.sending_queues.push_front(user);
            }
            self.run_actions();
        }
        if self.sending_queues.is_empty() {
            info!(
                shard = self.settings.index,
                "queues sent to their users' new home or replica nodes"
            );
        }
    }

    /// A client of an older protocol version finished its handshake: it is told, in stanzas
    /// every version decodes alike, to upgrade, and closed.
    fn outdated(&mut self, id: ConnId, version: u8) {
        bump(&self.stats.clients_outdated, 1);
        self.warn(format_args!(
            "connection {id}: a client of hop protocol version {version} was told to upgrade"
        ));
        let text = format!(
            "this server speaks hop protocol version {}; the client speaks version {version}: \
             upgrade the client",
            hop_protocol::noise::VERSION
        );
        self.queue_stanza(id, &Stanza::error(ErrorCode::Version, text.clone(), None));
        self.close_with(id, GoAwayReason::Protocol, &text);
    }

    /// A stanza from a new key under `registration = token`: a `Register` whose token is
    /// redeemed makes the account, and the connection goes on as any other; anything else (or a
    /// token refused) sends it away.
    fn register(&mut self, id: ConnId, user: UserId, stanza: Stanza) {
        let Some(key) = self.registering.remove(&id) else {
            return;
        };
        // Another connection of the same key may have made the account meanwhile.
        let redeemed = match (&stanza.kind, &self.tokens) {
            _ if self.router.is_bound(user) => Ok(()),
            (Some(Kind::Register(register)), Some(tokens)) => {
                tokens.redeem(&register.token, self.wall_ms)
            }
            _ => Err(crate::tokens::Refused::Unknown),
        };
        match redeemed {
            Ok(()) => {
                info!(%user, "a registration token made an account");
                if let Some(conn) = self.conn_mut(id) {
                    conn.phase = Phase::Open;
                }
                self.connect_to_router(id, user, key);
                // The token is spent on disk already: the account it made is made durable
                // here too, before the client hears of it, or a power cut could leave a spent
                // token and no account. Redeeming is rare and pays an fsync anyway.
                self.flush_account_logs();
            }
            Err(refused) => {
                bump(&self.stats.registrations_refused, 1);
                let text = if matches!(stanza.kind, Some(Kind::Register(_))) {
                    refused.text()
                } else {
                    "this server makes accounts only with a one-time token from its operator: \
                     send Register first (`hop --token`)"
                };
                self.close_with(id, GoAwayReason::NotRegistered, text);
            }
        }
    }

    /// Makes `id` the connection of `user` on this, its home shard. Under `registration =
    /// token`, a key with no account waits for its `Register` first.
    fn attach_user(&mut self, id: ConnId, user: UserId, key: [u8; KEY_BYTES]) {
        let needs_token = self.tokens.is_some()
            && !self.router.is_bound(user)
            && self.directory.placement(user) == Placement::Own;
        if needs_token {
            let now_ms = self.now_ms;
            if let Some(conn) = self.conn_mut(id) {
                conn.phase = Phase::Registering;
                conn.user = Some(user);
                conn.since_ms = now_ms;
            }
            self.registering.insert(id, key);
            return;
        }
        self.connect_to_router(id, user, key);
    }

    fn connect_to_router(&mut self, id: ConnId, user: UserId, key: [u8; KEY_BYTES]) {
        let conn_ref = self.conn_ref(id);
        self.router
            .handle_connect(user, &key, conn_ref, self.wall_ms);
        let now_ms = self.now_ms;
        if let Some(conn) = self.conn_mut(id) {
            conn.phase = Phase::Open;
            conn.user = Some(user);
            conn.since_ms = now_ms;
        }
        self.run_actions();
    }

    fn stanza(&mut self, id: ConnId, stanza: Stanza) {
        bump(&self.stats.stanzas_in, 1);
        let conn_ref = self.conn_ref(id);
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        match (conn.phase, conn.user) {
            (Phase::Moving, _) => {
                if let Some(moving) = self.moving.get_mut(&id) {
                    moving.early.push(stanza);
                }
            }
            (Phase::Registering, Some(user)) => self.register(id, user, stanza),
            (Phase::Open, None) => {
                let generation = conn.generation;
                self.link_stanza(id, generation, stanza);
            }
            (Phase::Open, Some(user)) => {
                let result = self
                    .router
                    .handle_stanza(user, conn_ref, stanza, self.wall_ms);
                if let Err(violation) = result {
                    bump(&self.stats.protocol_errors, 1);
                    self.warn(format_args!("user {user}: {}", violation.0));
                    self.queue_stanza(id, &Stanza::error(ErrorCode::BadStanza, violation.0, None));
                    self.close_with(id, GoAwayReason::Protocol, "protocol violation");
                }
                self.run_actions();
            }
            _ => {}
        }
    }

    fn peer_error(&mut self, id: ConnId, was_open: bool, error: &PeerError) {
        if !self.is_live(id) {
            return;
        }
        let open = self.conn_mut(id).is_some_and(|conn| conn.session.is_open());
        if was_open || open {
            bump(&self.stats.protocol_errors, 1);
            self.warn(format_args!("connection {id}: {error}"));
            let code = match error {
                PeerError::Stanza(_) => ErrorCode::BadStanza,
                PeerError::Frame(_) | PeerError::Noise(_) => ErrorCode::BadFrame,
            };
            self.queue_stanza(id, &Stanza::error(code, error.to_string(), None));
            self.close_with(id, GoAwayReason::Protocol, "protocol error");
        } else {
            bump(&self.stats.handshakes_failed, 1);
            self.warn(format_args!("connection {id}: handshake failed: {error}"));
            self.close(id);
        }
    }

    /// Carries out the router's actions, and those they lead to, in order. No action calls
    /// back into it: one that calls the router leaves its actions for the next swap.
    fn run_actions(&mut self) {
        let mut batch = std::mem::take(&mut self.action_batch);
        loop {
            self.router.swap_actions(&mut batch);
            if batch.is_empty() {
                break;
            }
            for action in batch.drain(..) {
                self.run_action(action);
            }
        }
        self.action_batch = batch;
    }

    fn run_action(&mut self, action: Action) {
        match action {
            Action::Send { conn, stanza } => {
                if let Some(id) = self.resolve(conn) {
                    self.queue_stanza(id, &stanza);
                }
            }
            Action::Close { conn, reason, text } => {
                if let Some(id) = self.resolve(conn) {
                    self.close_with(id, reason, text);
                }
            }
            Action::DeliverKept {
                conn,
                user,
                from,
                id,
                timestamp_ms,
                proof,
                sent_to,
            } => {
                let Some(conn_id) = self.resolve(conn) else {
                    return; // gone: the router pushes it again on the next connection
                };
                let kept = Kept {
                    user,
                    from,
                    id,
                    timestamp_ms,
                    proof,
                    sent_to,
                };
                self.deliver_kept(conn_id, kept);
            }
            Action::Forward { shard, message } => self.post(shard, Mail::Router(message)),
            // A link that cannot take it: the router refuses what it can to its sender.
            Action::ToNode { user, message } => self.mail_to_node(user, message, Target::Home),
            Action::SendKept {
                user,
                from,
                id,
                timestamp_ms,
                to,
            } => {
                let Some((body, group)) = self.kept_body(user, id) else {
                    bump(&self.stats.store_unreadable, 1);
                    return self.router.unsent(user, id, to);
                };
                let group = group.map(|tag| (tag.group, tag.event));
                let item = Queued::received(from, id, timestamp_ms, body, group);
                let replica = hop_router::Replica {
                    user,
                    keep: NO_KEEP,
                    item,
                };
                match to {
                    SendTo::NewHome => {
                        let message = Box::new(ShardMessage::HandBack(Box::new(replica)));
                        self.mail_to_node(user, message, Target::Home);
                    }
                    SendTo::Replica => {
                        let message = Box::new(ShardMessage::Replica(Box::new(replica)));
                        self.mail_to_node(user, message, Target::Replica);
                    }
                }
            }
            Action::ToReplica { user, message } => {
                self.mail_to_node(user, message, Target::Replica)
            }
            Action::Keep { user, item, keep } => {
                // Only a connected device may ack it soon; anything else waits for nothing.
                let wait_ms = self.settings.keeping.ack_wait_ms;
                let due_ms = if wait_ms > 0 && self.router.is_connected(user) {
                    self.now_ms + wait_ms
                } else {
                    self.now_ms
                };
                self.held.hold(user, item, keep, due_ms);
            }
            Action::Forget {
                user,
                id,
                kind,
                keep,
            } => {
                if self.held.cancel(user, id, kind, keep) {
                    bump(&self.stats.keeps_skipped, 1);
                } else {
                    self.store.mark_delivered(self.now_ms, user, id, kind as u8);
                }
            }
            Action::PersistBinding { key, .. } => self.accounts.append(&key),
            Action::Unbind { user, seconds } => self.accounts.unbind(user, seconds),
            Action::PersistSeen { device, seconds } => self.seen.append(Some(device), seconds),
            Action::LinkDevice {
                account,
                device,
                conn,
            } => {
                let linked = self.directory.claim(account, device);
                if linked {
                    self.record_device(true, account, device);
                }
                self.router
                    .handle_link_result(account, device, conn, linked);
            }
            Action::UnlinkDevice { account, device } => {
                self.directory.remove(device);
                self.record_device(false, account, device);
            }
            Action::PersistGroup(snapshot) => {
                let hop_router::GroupSnapshot {
                    group,
                    version,
                    name,
                    members,
                } = *snapshot;
                self.groups.append(&GroupRecord {
                    group,
                    version,
                    wall_ms: self.wall_ms,
                    name,
                    members,
                });
            }
            Action::PersistPrivacy { user, privacy } => {
                self.privacy.append(
                    user,
                    self.wall_ms,
                    privacy.visibility as u8,
                    &privacy.contacts,
                );
            }
        }
    }

    /// Keeps a device link (or its removal) on disk with the next flush.
    fn record_device(&mut self, linked: bool, account: UserId, device: UserId) {
        self.devices.append(&DeviceRecord {
            linked,
            account,
            device,
            wall_ms: self.wall_ms,
        });
        info!(%account, %device, linked, "device link changed");
    }

    /// Appends an item to the store; its ServerAck (for a message) waits for the commit.
    fn keep(&mut self, user: UserId, item: &Queued, keep: u32) {
        let appended = match item {
            // A sent copy is laid out as a message, its recipient where a sender would be.
            Queued::Message {
                from: peer,
                id,
                timestamp_ms,
                body,
            }
            | Queued::Sent {
                to: peer,
                id,
                timestamp_ms,
                body,
            } => self.store.append(
                self.now_ms,
                user,
                &hop_store::Item::Message {
                    from: *peer,
                    id: *id,
                    timestamp_ms: *timestamp_ms,
                    body,
                    sent: matches!(item, Queued::Sent { .. }),
                    group: None,
                },
            ),
            Queued::Group {
                from,
                group,
                id,
                timestamp_ms,
                body,
                event,
            } => self.store.append(
                self.now_ms,
                user,
                &hop_store::Item::Message {
                    from: *from,
                    id: *id,
                    timestamp_ms: *timestamp_ms,
                    body,
                    sent: false,
                    group: Some(hop_store::GroupTag {
                        group: *group,
                        event: *event,
                    }),
                },
            ),
            Queued::Receipt {
                id,
                kind,
                by,
                timestamp_ms,
            } => self.store.append(
                self.now_ms,
                user,
                &hop_store::Item::Receipt {
                    id: *id,
                    kind: *kind as u8,
                    by: *by,
                    timestamp_ms: *timestamp_ms,
                },
            ),
        };
        match appended {
            Ok(seq) => self.written.push_back(Written {
                seq,
                user,
                id: item.ack_id(),
                kind: item.ack_kind(),
                keep,
            }),
            Err(error) => {
                bump(&self.stats.store_refusals, 1);
                debug!(%user, %error, "offline queue refused an item");
                self.router.handle_keep_failed(
                    user,
                    item.ack_id(),
                    item.ack_kind(),
                    keep,
                    ErrorCode::QueueFull,
                    "the recipient's queue is full; message not taken",
                    self.wall_ms,
                );
            }
        }
    }

    /// The body of kept message `id` of `user` (and its group, for a group copy), from the
    /// read-ahead or from the store (which then reads the next records too), on this thread.
    /// `None` when the store cannot read it back.
    fn kept_body(&mut self, user: UserId, id: u64) -> Option<(Bytes, Option<GroupTag>)> {
        if let Some(found) = self.ahead_take(user, id) {
            return Some(found);
        }
        match self.read_kept(user, id, false) {
            KeptRead::Body(body, group) => Some((body, group)),
            KeptRead::Unreadable | KeptRead::Job(_) => None,
        }
    }

    /// Kept message `id` of `user` from the read-ahead, dropping the records before it (no
    /// longer wanted: the queue is pushed in order).
    fn ahead_take(&mut self, user: UserId, id: u64) -> Option<(Bytes, Option<GroupTag>)> {
        let ahead = &mut self.read_ahead;
        if ahead.user != Some(user) {
            return None;
        }
        while let Some(record) = ahead.records.pop_front() {
            if let hop_store::StoredItem::Message {
                id: read,
                body,
                group,
                ..
            } = record.item
            {
                if read == id {
                    return Some((body, group));
                }
            }
        }
        None
    }

    /// Reads `user`'s queue from kept message `id` on into the read-ahead. With `job`, a read
    /// that needs the disk is not made here but returned as a job for the reader.
    fn read_kept(&mut self, user: UserId, id: u64, job: bool) -> KeptRead {
        let ahead = &mut self.read_ahead;
        ahead.user = Some(user);
        ahead.records.clear();
        let Some(position) = self
            .store
            .queue(user)
            .position(|slot| slot.id == id && slot.ack_kind == 0)
        else {
            return KeptRead::Unreadable;
        };
        ahead.read.clear();
        let read = if job {
            self.store.read_or_job(
                user,
                position,
                READ_AHEAD_RECORDS,
                &mut ahead.read,
                self.reader.page_cache_counts(),
            )
        } else {
            self.store
                .read(user, position, READ_AHEAD_RECORDS, &mut ahead.read)
                .map(|_| None)
        };
        match read {
            Ok(Some(job)) => return KeptRead::Job(job),
            Ok(None) => {}
            Err(error) => {
                warn!(shard = self.settings.index, %user, %error, "reading the offline queue failed");
                return KeptRead::Unreadable;
            }
        }
        self.ahead_filled(user);
        match self.ahead_take(user, id) {
            Some((body, group)) => KeptRead::Body(body, group),
            None => KeptRead::Unreadable, // the store dropped it as damaged
        }
    }

    /// The records in the read-ahead's scratch are `user`'s, from the one to push next.
    fn ahead_filled(&mut self, user: UserId) {
        let ahead = &mut self.read_ahead;
        ahead.user = Some(user);
        ahead.records.clear();
        ahead.records.extend(ahead.read.drain(..));
    }

    /// Pushes kept message `kept` on connection `id`: at once when its body is in the
    /// read-ahead or the store reads it without the disk; otherwise behind a read on the
    /// reader, with everything queued for the connection meanwhile held behind it.
    fn deliver_kept(&mut self, id: ConnId, kept: Kept) {
        if let Some(hold) = self.holds.get_mut(&id) {
            hold.waiting.push_back(Outgoing::Kept(kept));
            return;
        }
        if let Some((body, group)) = self.ahead_take(kept.user, kept.id) {
            self.queue_now(id, &kept.deliver(body, group));
            return;
        }
        let Some(generation) = self.generation_of(id) else {
            return;
        };
        self.holds.insert(
            id,
            Hold {
                generation,
                reading: false,
                waiting: VecDeque::from([Outgoing::Kept(kept)]),
            },
        );
        self.work_on_hold(id);
    }

    /// Queues what connection `id`'s hold has waiting, in order, until a kept message needs a
    /// read from the disk: that read goes to the reader (or waits for room there) and the rest
    /// keeps waiting. A hold with nothing left goes.
    fn work_on_hold(&mut self, id: ConnId) {
        let Some(mut hold) = self.holds.remove(&id) else {
            return;
        };
        debug_assert!(!hold.reading, "a hold waits for its read");
        while let Some(outgoing) = hold.waiting.pop_front() {
            let kept = match outgoing {
                Outgoing::Stanza(stanza) => {
                    self.queue_now(id, &stanza);
                    continue;
                }
                Outgoing::Kept(kept) => kept,
            };
            if let Some((body, group)) = self.ahead_take(kept.user, kept.id) {
                self.queue_now(id, &kept.deliver(body, group));
                continue;
            }
            if self.reader.full() {
                // Its turn comes with the reader's next answer.
                hold.waiting.push_front(Outgoing::Kept(kept));
                self.holds_waiting.push_back((id, hold.generation));
                self.holds.insert(id, hold);
                return;
            }
            let read = self.read_kept(kept.user, kept.id, self.reader.room());
            match read {
                KeptRead::Body(body, group) => self.queue_now(id, &kept.deliver(body, group)),
                KeptRead::Unreadable => self.kept_unreadable(kept.user, kept.id),
                KeptRead::Job(job) => {
                    hold.waiting.push_front(Outgoing::Kept(kept));
                    hold.reading = true;
                    bump(&self.stats.store_reads_off_loop, 1);
                    self.reader.start(reader::Read {
                        conn: id,
                        generation: hold.generation,
                        job,
                    });
                    self.holds.insert(id, hold);
                    return;
                }
            }
        }
    }

    /// Takes back what the reader read: each connection's hold goes on with it.
    fn take_back_reads(&mut self) {
        let mut any = false;
        while let Some(answer) = self.reader.finished() {
            any = true;
            let user = answer.done.user();
            self.read_ahead.read.clear();
            self.store
                .finish_read(answer.done, &mut self.read_ahead.read);
            let live = self.holds.get_mut(&answer.conn).is_some_and(|hold| {
                hold.generation == answer.generation && std::mem::take(&mut hold.reading)
            });
            if live {
                self.ahead_filled(user);
                self.work_on_hold(answer.conn);
            } else {
                // Its connection went: the bodies (and their buffers) go now.
                self.read_ahead.read.clear();
            }
        }
        if !any {
            return;
        }
        // Holds that waited for room on the reader.
        while self.reader.room() {
            let Some((id, generation)) = self.holds_waiting.pop_front() else {
                break;
            };
            if self
                .holds
                .get(&id)
                .is_some_and(|hold| hold.generation == generation && !hold.reading)
            {
                self.work_on_hold(id);
            }
        }
        self.run_actions();
    }

    /// Kept message `id` of `user` cannot be read back: it is dropped, and counted.
    fn kept_unreadable(&mut self, user: UserId, id: u64) {
        bump(&self.stats.store_unreadable, 1);
        self.warn(format_args!(
            "user {user}: queued message {id} cannot be read back from the offline queue; dropped"
        ));
        self.router.handle_unreadable(user, id);
    }

    /// Queues what connection `id`'s hold has waiting, except the kept messages (pushed again
    /// on its next connection), and drops the hold: the connection is closing.
    fn release_hold(&mut self, id: ConnId) {
        let Some(hold) = self.holds.remove(&id) else {
            return;
        };
        for outgoing in hold.waiting {
            if let Outgoing::Stanza(stanza) = outgoing {
                self.queue_now(id, &stanza);
            }
        }
    }

    /// When `commit_if_due` has work next: the held batch's deadline or the store's own (for
    /// tombstones and compaction copies).
    fn commit_deadline(&self) -> Option<u64> {
        let held = self.held.deadline(&self.settings.keeping);
        let store = self.store.next_commit_deadline();
        match (held, store) {
            (Some(held), Some(store)) => Some(held.min(store)),
            (one, other) => one.or(other),
        }
    }

    /// Appends the held items when their batch is due and commits the store when that or its
    /// own batch is due, then releases what became durable. New account bindings go to the
    /// syncer with the queue's fsync, ahead of it; a binding that cannot be written (disk
    /// full) stays buffered and is tried again a moment later ([`LOG_RETRY_MS`]) without
    /// holding up the queue: a queued item needs no binding on disk (at start, a user with
    /// queued items is made from them).
    fn commit_if_due(&mut self) {
        self.commit(false);
    }

    /// [`Core::commit_if_due`], or with `force` whatever is held or buffered, due or not.
    /// The account logs' records (seen times, bindings, device links) go to the syncer with
    /// the queue's fsync ([`Core::start_sync`]); the group and presence logs, written on rarer
    /// changes, are written and fsynced here.
    fn commit(&mut self, force: bool) {
        if let Err(error) = self.groups.flush() {
            bump(&self.stats.binding_write_errors, 1);
            let path = self.groups.path().display().to_string();
            self.warn(format_args!(
                "cannot record group changes in {path}: {error}; trying again next turn"
            ));
        }
        if let Err(error) = self.privacy.flush() {
            bump(&self.stats.binding_write_errors, 1);
            let path = self.privacy.path().display().to_string();
            self.warn(format_args!(
                "cannot record presence settings in {path}: {error}; trying again next turn"
            ));
        }
        let now_ms = self.now_ms;
        let due = |deadline: Option<u64>| deadline.is_some_and(|at| force || at <= now_ms);
        let keeping = self.settings.keeping;
        if due(self.held.deadline(&keeping)) {
            let mut batch = std::mem::take(&mut self.held_batch);
            self.held
                .take_due(now_ms, force || keeping.at_once, &mut batch);
            for (user, item, keep) in batch.drain(..) {
                self.keep(user, &item, keep);
            }
            self.held_batch = batch;
        }
        // What left the hold joined the store's buffer, which its group commit writes when due.
        if due(self.store.next_commit_deadline()) {
            if self.store.behind() && self.syncing {
                // The disk is slower than the traffic: wait for the running job rather than
                // hold more batches in memory.
                bump(&self.stats.store_waits, 1);
                self.wait_for_job();
            }
            // Under `batch` the batch's write and fsync run on the syncer; under `always` and
            // `none` it is written here, into the page cache.
            match self.store.write(self.now_ms) {
                Ok(commit) => self.release_kept(commit.durable_through),
                Err(error) => self.keep_failed(error),
            }
        }
        while let Some(finished) = self.syncer.finished() {
            self.take_synced(finished);
        }
        self.start_sync(true);
        self.run_actions();
    }

    /// Hands the syncer a job, unless one runs (the next covers everything written
    /// meanwhile): the account logs' buffered records, when `logs`, and the fsync of what
    /// the store wrote.
    fn start_sync(&mut self, logs: bool) {
        if self.syncing {
            return;
        }
        let mut job = Job::default();
        let mut logs_taken = true;
        if logs && self.now_ms >= self.log_retry_at_ms {
            // Seen times before bindings: a binding made again after an unbinding is told
            // apart from an old one, at load, by its device's time
            // (`hop_store::accounts::load`). So none after one that cannot be taken.
            for log in [LogKind::Seen, LogKind::Bindings, LogKind::Devices] {
                let write = match log {
                    LogKind::Seen => self.seen.start_write(),
                    LogKind::Bindings => self.accounts.start_write(),
                    LogKind::Devices => self.devices.start_write(),
                };
                match write {
                    Ok(Some(write)) => job.logs.push((log, write)),
                    Ok(None) => {}
                    Err(error) => {
                        self.log_write_failed(log, &error);
                        logs_taken = false;
                        break;
                    }
                }
            }
        }
        // The queue's fsync waits for a job that carries the logs whole.
        if logs_taken {
            job.store = self.store.start_sync();
        }
        if job.logs.is_empty() && job.store.is_none() {
            return;
        }
        self.syncing = true;
        if let Some(finished) = self.syncer.start(job) {
            self.take_synced(finished); // inline: no thread to wait for
        }
    }

    /// A finished job: the account logs' records it wrote are durable (or buffered again);
    /// the ServerAcks of what its fsync made durable leave, or, if it failed, the senders of
    /// everything not durable get an Error.
    fn take_synced(&mut self, finished: Finished) {
        self.syncing = false;
        if finished.synced.is_some() {
            let micros = u64::try_from(finished.elapsed.as_micros()).unwrap_or(u64::MAX);
            self.stats
                .commit_times
                .record(&crate::stats::COMMIT_BUCKETS_US, micros);
        }
        for (log, write) in finished.logs {
            let written = match log {
                LogKind::Seen => self.seen.end_write(write),
                LogKind::Bindings => self.accounts.end_write(write),
                LogKind::Devices => self.devices.end_write(write),
            };
            if let Err(error) = written {
                self.log_write_failed(log, &error);
            }
        }
        if let Some(synced) = finished.synced {
            let removals_failed = self.store.counters().segment_removals_failed;
            match self.store.synced(self.now_ms, synced) {
                Ok(commit) => self.release_kept(commit.durable_through),
                Err(error) => self.keep_failed(error),
            }
            if self.store.counters().segment_removals_failed > removals_failed {
                self.warn(format_args!(
                    "cannot remove a compacted queue segment from the data folder; the next start compacts it again"
                ));
            }
        }
    }

    /// An account log's records could not be written: they stay buffered for the next job.
    fn log_write_failed(&mut self, log: LogKind, error: &std::io::Error) {
        bump(&self.stats.binding_write_errors, 1);
        self.log_retry_at_ms = self.now_ms + LOG_RETRY_MS;
        let (path, what) = match log {
            LogKind::Seen => (self.seen.path(), "when devices were seen"),
            LogKind::Bindings => (self.accounts.path(), "account bindings"),
            LogKind::Devices => (self.devices.path(), "device links"),
        };
        let path = path.display().to_string();
        self.warn(format_args!(
            "cannot record {what} in {path}: {error}; trying again in {LOG_RETRY_MS} ms"
        ));
    }

    /// Waits for the running job, and for those that follow it, until every write is
    /// durable. The account logs are written here, on this thread, after the running job
    /// and before the next fsync of the queue: a disk that keeps failing them cannot keep
    /// this loop going, and a binding is still durable before a message that needs it.
    fn settle_syncs(&mut self) {
        loop {
            self.flush_account_logs();
            self.start_sync(false);
            if !self.syncing {
                break;
            }
        }
        self.run_actions();
    }

    /// Waits for the syncer's job, if one runs, and takes what it did.
    fn wait_for_job(&mut self) {
        while self.syncing {
            let finished = self.syncer.wait();
            self.take_synced(finished);
        }
    }

    /// Waits for the syncer's job, if one runs, then writes and fsyncs the account logs'
    /// buffered records on this thread.
    fn flush_account_logs(&mut self) {
        self.wait_for_job();
        for log in [LogKind::Seen, LogKind::Bindings, LogKind::Devices] {
            let flushed = match log {
                LogKind::Seen => self.seen.flush(),
                LogKind::Bindings => self.accounts.flush(),
                LogKind::Devices => self.devices.flush(),
            };
            if let Err(error) = flushed {
                self.log_write_failed(log, &error);
            }
        }
    }

    /// The items up to `durable_through` are durable: their ServerAcks may leave.
    fn release_kept(&mut self, durable_through: u64) {
        while let Some(&item) = self.written.front() {
            if item.seq > durable_through {
                break;
            }
            self.written.pop_front();
            self.router
                .handle_kept(item.user, item.id, item.kind, item.keep, self.wall_ms);
        }
    }

    /// A write or fsync failed: the senders of the items it names get an Error.
    fn keep_failed(&mut self, error: hop_store::CommitError) {
        bump(&self.stats.store_commit_failures, 1);
        warn!(shard = self.settings.index, %error, "offline queue commit failed; its senders get an error");
        let failed = error.failed_seqs;
        let mut kept = VecDeque::with_capacity(self.written.len());
        for item in std::mem::take(&mut self.written) {
            if failed.contains(&item.seq) {
                self.router.handle_keep_failed(
                    item.user,
                    item.id,
                    item.kind,
                    item.keep,
                    ErrorCode::Overloaded,
                    "the server could not store the message; try again",
                    self.wall_ms,
                );
            } else {
                kept.push_back(item);
            }
        }
        self.written = kept;
    }

    /// Expires old queued items and runs one bounded compaction step.
    fn expire_and_compact(&mut self) {
        for expired in self
            .store
            .expire(self.now_ms, self.wall_ms, EXPIRE_USERS_PER_TICK)
        {
            let kind = ReceiptKind::try_from(i32::from(expired.ack_kind))
                .unwrap_or(ReceiptKind::Unspecified);
            self.router.handle_expired(expired.user, expired.id, kind);
        }
        self.commit_if_due();
        // Its copies go out with the next batch; the step after waits until they are durable.
        if let Err(error) = self.store.compact(self.now_ms, COMPACT_BYTES_PER_TICK) {
            warn!(shard = self.settings.index, %error, "offline queue compaction failed");
        }
        self.run_actions();
    }

    /// Sends mail to another shard; a full mailbox keeps it in the outbox and pauses the
    /// connection being read.
    fn post(&mut self, shard: ShardId, mail: Mail<B::Handoff>) {
        let to = usize::from(shard);
        let blocked = if self.outbox[to].is_empty() {
            self.mailboxes.push(self.settings.index, shard, mail).err()
        } else {
            Some(mail)
        };
        self.mail_sent_to[to] = true;
        if let Some(mail) = blocked {
            self.outbox[to].push_back(mail);
            if self.outbox_mails() >= OUTBOX_MAILS_FANOUT_MAX {
                self.router.pause_fanouts(true);
            }
            self.pause_current();
        }
    }

    /// Takes mail from every other shard. Returns true if some was left for the next turn.
    fn drain_mail(&mut self, backend: &mut B) -> bool {
        let mut backlog = false;
        for from in 0..self.settings.shards {
            if from == self.settings.index {
                continue;
            }
            for taken in 0.. {
                if taken == MAILS_PER_SOURCE_PER_TURN {
                    backlog = true;
                    break;
                }
                let Some(mail) = self.mailboxes.pop(from, self.settings.index) else {
                    break;
                };
                if self.handing.is_some() {
                    self.handover.busy(usize::from(self.settings.index));
                }
                match mail {
                    Mail::Router(message) => {
                        self.router.handle_shard_message(message, self.wall_ms);
                        self.run_actions();
                    }
                    Mail::Handoff(handoff) => self.adopt(backend, *handoff),
                }
            }
        }
        backlog
    }

    /// Starts adopting a connection handed over by another shard: the backend takes the
    /// socket and reports `Attached` with the token.
    fn adopt(&mut self, backend: &mut B, handoff: Handoff<B::Handoff>) {
        let Handoff {
            socket,
            session,
            user,
            key,
            early,
            admitted,
        } = handoff;
        let token = self.next_token;
        self.next_token += 1;
        self.adoptions.insert(
            token,
            Adoption {
                session,
                user,
                key,
                early,
                admitted,
            },
        );
        backend.attach(socket, token);
    }

    /// The backend adopted a handed-over connection as `id`: attach it to its user.
    fn adopted(&mut self, token: u64, id: ConnId) {
        let Some(Adoption {
            session,
            user,
            key,
            early,
            admitted,
        }) = self.adoptions.remove(&token)
        else {
            // A move a crashed predecessor of this core started: nobody here knows its
            // session, so the connection is closed (its client reconnects).
            self.orphans.push(id);
            return;
        };
        bump(&self.stats.handoffs_in, 1);
        let generation = self.next_generation();
        self.insert(id, Conn::new(generation, session, self.now_ms));
        self.admission.arrive(id, admitted);
        self.attach_user(id, user, key);
        self.current = Some(id);
        for stanza in early {
            if !self.is_live(id) {
                break;
            }
            self.stanza(id, stanza);
        }
        self.current = None;
        if self.conn_mut(id).is_some_and(|conn| conn.paused) {
            self.to_pause.push(id);
        }
    }

    /// The backend let go of a moving connection: mail it to its home shard.
    fn detached(&mut self, id: ConnId, socket: B::Handoff) {
        let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        // Dropped (given back) unless the move goes on.
        let admitted = self.admission.depart(id);
        let (Phase::Moving, Some(user), Some(Moving { home, key, early })) =
            (conn.phase, conn.user, self.moving.remove(&id))
        else {
            warn!(
                conn = id,
                "backend detached a connection that was not moving"
            );
            return;
        };
        bump(&self.stats.handoffs_out, 1);
        let handoff = Handoff {
            socket,
            session: conn.session,
            user,
            key,
            early,
            admitted,
        };
        self.post(home, Mail::Handoff(Box::new(handoff)));
    }

    /// Ends a turn: writes, moves, closes, retries blocked mail, wakes shards.
    fn end_turn(&mut self, backend: &mut B) {
        self.retry_node_outbox(backend);
        self.send_queues_some();
        for id in std::mem::take(&mut self.to_pause) {
            backend.set_reading(id, false);
        }
        for id in std::mem::take(&mut self.orphans) {
            backend.close(id);
        }
        for id in std::mem::take(&mut self.to_thaw) {
            backend.thaw(id);
        }
        // Closing a connection can queue stanzas for others (presence), so repeat until calm.
        while !self.dirty.is_empty() || !self.to_close.is_empty() || !self.to_move.is_empty() {
            self.flush_dirty(backend);
            for (id, generation) in std::mem::take(&mut self.to_move) {
                if self.generation_of(id) == Some(generation) {
                    self.hand_off(backend, id);
                }
            }
            for (id, generation) in std::mem::take(&mut self.to_close) {
                if self.generation_of(id) == Some(generation) {
                    let conn = self.conns[id as usize].take().expect("generation matched");
                    backend.close(id);
                    self.forget(id, conn);
                }
            }
        }
        self.retry_outbox(backend);
        for shard in 0..self.mail_sent_to.len() {
            if std::mem::take(&mut self.mail_sent_to[shard])
                && self.mailboxes.needs_wake(shard as ShardId)
            {
                backend.wake_peer(self.mailboxes.peer(shard as ShardId));
            }
        }
    }

    /// Seals what each touched connection has queued and hands everything this turn produced
    /// to the backend, each connection's bytes in the order they were made.
    fn flush_dirty(&mut self, backend: &mut B) {
        for id in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
                continue;
            };
            conn.dirty = false;
            let generation = conn.generation;
            let start = self.out.len();
            if let Some(channel) = conn.session.channel() {
                channel.flush(&mut self.out);
            }
            self.note_out(id, generation, start);
        }
        // Taken and put back, so the list keeps its capacity from turn to turn.
        let mut spans = std::mem::take(&mut self.spans);
        for span in spans.drain(..) {
            if self.generation_of(span.id) != Some(span.generation) {
                continue; // closed meanwhile; its id went to another connection
            }
            // The backend copies the bytes: an idle connection keeps no send buffer.
            if backend
                .send(span.id, &self.out[span.start..span.end])
                .is_err()
            {
                bump(&self.stats.send_overflows, 1);
                let id = span.id;
                self.warn(format_args!("connection {id}: does not read; closed"));
                self.close(id); // writes nothing: no span can appear meanwhile
            }
        }
        debug_assert!(
            self.spans.is_empty(),
            "output made while the turn's output was sent"
        );
        self.spans = spans;
        bump(&self.stats.bytes_out, self.out.len() as u64);
        self.out.clear();
        if self.out.capacity() > OUT_CAPACITY_KEPT_BYTES {
            self.out = Vec::new();
        }
    }

    /// Asks the backend to let go of an authenticated connection; `Event::Detached` follows.
    fn hand_off(&mut self, backend: &mut B, id: ConnId) {
        let Some(Conn {
            phase: Phase::Moving,
            ..
        }) = self.conns.get(id as usize).and_then(Option::as_ref)
        else {
            return;
        };
        let Some(home) = self.moving.get(&id).map(|moving| moving.home) else {
            return;
        };
        backend.detach(id, self.mailboxes.peer(home));
    }

    fn retry_outbox(&mut self, backend: &mut B) {
        for to in 0..self.outbox.len() {
            while let Some(mail) = self.outbox[to].pop_front() {
                match self
                    .mailboxes
                    .push(self.settings.index, to as ShardId, mail)
                {
                    Ok(()) => self.mail_sent_to[to] = true,
                    Err(mail) => {
                        self.outbox[to].push_front(mail);
                        break;
                    }
                }
            }
        }
        self.router
            .pause_fanouts(self.outbox_mails() >= OUTBOX_MAILS_FANOUT_MAX);
        if !self.has_blocked_mail() {
            let handing = self.handing.is_some();
            for id in std::mem::take(&mut self.paused) {
                if let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) {
                    conn.paused = false;
                    // During a takeover reading stays off; a failed one turns it on again.
                    if !handing {
                        backend.set_reading(id, true);
                    }
                }
            }
        }
    }

    fn has_blocked_mail(&self) -> bool {
        self.outbox.iter().any(|queue| !queue.is_empty())
    }

    fn outbox_mails(&self) -> usize {
        self.outbox.iter().map(VecDeque::len).sum()
    }

    fn enforce_timeouts(&mut self) {
        let now = self.now_ms;
        let mut expired = Vec::new();
        for (index, slot) in self.conns.iter().enumerate() {
            let Some(conn) = slot else { continue };
            match conn.phase {
                Phase::Handshaking | Phase::Registering
                    if now.saturating_sub(conn.since_ms) >= self.settings.handshake_timeout_ms =>
                {
                    expired.push((index as ConnId, conn.phase));
                }
                Phase::Open
                    if now.saturating_sub(conn.since_ms) >= self.settings.idle_timeout_ms =>
                {
                    expired.push((index as ConnId, conn.phase));
                }
                _ => {}
            }
        }
        for (id, phase) in expired {
            match phase {
                Phase::Open => {
                    bump(&self.stats.idle_timeouts, 1);
                    debug!(conn = id, "idle timeout");
                    self.close_with(id, GoAwayReason::Idle, "idle timeout");
                }
                Phase::Registering => {
                    bump(&self.stats.handshake_timeouts, 1);
                    self.close_with(
                        id,
                        GoAwayReason::NotRegistered,
                        "no Register arrived in time: a new account needs a one-time token",
                    );
                }
                _ => {
                    bump(&self.stats.handshake_timeouts, 1);
                    debug!(conn = id, "handshake timeout");
                    self.close(id);
                }
            }
        }
    }

    /// Answers the operators' requests that came since the last turn.
    fn take_commands(&mut self) {
        while let Some(command) = self.controls.take(self.settings.index) {
            if self.handing.is_some() {
                self.handover.busy(usize::from(self.settings.index));
            }
            match command {
                Command::User { user, reply } => {
                    let _ = reply.try_send(self.router.user_report(user));
                }
                Command::Kick { user, reply } => {
                    let kicked = self.router.handle_kick(user);
                    if kicked {
                        bump(&self.stats.kicks, 1);
                        info!(%user, "connection closed by the operator");
                    }
                    self.run_actions();
                    let _ = reply.try_send(kicked);
                }
                #[cfg(feature = "fault-injection")]
                Command::Panic => {
                    panic!(
                        "fault injected: shard {} panics on request",
                        self.settings.index
                    )
                }
            }
        }
    }

    /// Once a drain has started: stops accepting, then sends the connections away as the
    /// plan makes them due, each with a GoAway that tells its client to wait for the window
    /// before it connects again (by then a restarted hopd serves). Connections that arrive
    /// meanwhile (moved from a shard that accepted them) leave when the window ends.
    fn drain_step(&mut self, backend: &mut B) {
        if self.draining.is_none() {
            let Some(window_ms) = self.controls.drain_window_ms() else {
                return;
            };
            backend.stop_accepting();
            let order: VecDeque<(ConnId, u32)> = (0..self.conns.len() as ConnId)
                .filter_map(|id| {
                    let conn = self.conns[id as usize].as_ref()?;
                    (conn.phase != Phase::Closing).then_some((id, conn.generation))
                })
                .collect();
            info!(
                shard = self.settings.index,
                connections = order.len(),
                window_ms,
                "draining: accepting no more connections; sending the held ones away over the window"
            );
            self.draining = Some(Draining {
                plan: DrainPlan::new(self.now_ms, window_ms, order.len()),
                order,
                reported: false,
            });
        }
        let Some(draining) = self.draining.as_mut() else {
            return;
        };
        let due = draining.plan.take_due(self.now_ms);
        let over = draining.plan.is_over(self.now_ms);
        let mut away: Vec<(ConnId, u32)> = draining
            .order
            .drain(..due.min(draining.order.len()))
            .collect();
        if over {
            away.extend(draining.order.drain(..));
            away.extend((0..self.conns.len() as ConnId).filter_map(|id| {
                let conn = self.conns[id as usize].as_ref()?;
                (conn.phase != Phase::Closing).then_some((id, conn.generation))
            }));
        }
        let retry_after_ms = u32::try_from(draining.plan.window_ms).unwrap_or(u32::MAX);
        if !away.is_empty() {
            // What was sent before the GoAway is durable, and its ServerAck leaves, first.
            self.commit_now();
        }
        for (id, generation) in away {
            if self.generation_of(id) != Some(generation) || !self.is_live(id) {
                continue; // gone already, or closing
            }
            bump(&self.stats.drain_closes, 1);
            let go_away = Stanza::go_away_retry_after(
                GoAwayReason::Shutdown,
                "the server is draining; connect again later",
                retry_after_ms,
            );
            self.queue_stanza(id, &go_away);
            self.close(id);
        }
        let empty = backend.connections() == 0 && self.adoptions.is_empty();
        if let Some(draining) = self.draining.as_mut() {
            if empty && !draining.reported {
                draining.reported = true;
                self.controls.set_drained(self.settings.index);
                info!(shard = self.settings.index, "drained: no connection left");
            }
        }
    }

    /// This shard's part in a takeover by a new process ([`crate::takeover`]); true while one
    /// is under way, when the rest of the turn is skipped.
    fn handover_step(&mut self, backend: &mut B) -> bool {
        let index = usize::from(self.settings.index);
        match self.handover.ask() {
            Ask::Serve => {
                // A takeover given up while this shard did not look: serve again.
                if self.handing.is_some() {
                    self.thaw(backend);
                }
                return false;
            }
            Ask::Quiesce { attempt } => {
                if self.handing.as_ref().map(|h| h.attempt) != Some(attempt) {
                    self.start_quiescing(backend, attempt);
                }
                // What the shards already read is worked on: mail, commands.
                self.drain_mail(backend);
                self.take_commands();
                self.pause_for_handover(backend);
                let reads_stopped = backend.stop_reads();
                // Whatever is held or buffered (items, the tombstones of acked ones, log
                // records) is written and fsynced: the new process reads the disk.
                self.commit_now();
                self.end_turn(backend);
                let mut quiet = reads_stopped && self.is_quiet();
                if quiet && self.handing.as_ref().is_some_and(|h| !h.clock_written) {
                    // The account clock, for the new process to resume from.
                    self.seen.append(None, self.account_clock_s());
                    self.settle_syncs();
                    self.end_turn(backend);
                    if let Some(handing) = self.handing.as_mut() {
                        handing.clock_written = true;
                    }
                    quiet = self.is_quiet();
                }
                self.handover.set_quiet(index, quiet);
                if !quiet && self.now_ms >= self.handing.as_ref().map_or(0, |h| h.log_at_ms) {
                    info!(
                        shard = index,
                        waiting_for = if reads_stopped {
                            self.unquiet().unwrap_or("mail")
                        } else {
                            "reads in flight"
                        },
                        "takeover: not quiet yet"
                    );
                    if let Some(handing) = self.handing.as_mut() {
                        handing.log_at_ms = self.now_ms + 1_000;
                    }
                }
            }
            Ask::Export { .. } => {
                let Some(handing) = self.handing.as_ref() else {
                    // Joined late (restarted meanwhile): nothing of this shard can travel.
                    self.handover
                        .exported(index, Err("a shard restarted during the takeover".into()));
                    self.handing = Some(Handing {
                        reported: true,
                        ..Handing::default()
                    });
                    return true;
                };
                if !handing.export_started {
                    self.start_export(backend);
                }
                let handing = self.handing.as_mut().expect("set above");
                if handing.waiting.is_empty() && !handing.reported {
                    handing.reported = true;
                    let exported = std::mem::take(&mut handing.exported);
                    let export = match handing.failed.take() {
                        Some(reason) => Err(reason),
                        None => Ok(ShardExport {
                            conns: exported,
                            watchers: (self.router.watchers())
                                .map(|(user, subscribers)| (user, subscribers.to_vec()))
                                .collect(),
                        }),
                    };
                    self.handover.exported(index, export);
                }
            }
            Ask::Thaw => {
                if self.handing.is_some() {
                    self.thaw(backend);
                }
                self.handover.thawed(index);
                return false;
            }
            Ask::Gone => {}
        }
        true
    }

    /// A takeover starts: no new connections; those still in their handshake (or waiting for
    /// a registration token) are sent away to connect again, to the new process
    /// ([`Core::pause_for_handover`]).
    fn start_quiescing(&mut self, backend: &mut B, attempt: u64) {
        info!(shard = self.settings.index, "takeover: quiescing");
        backend.set_accepting(false);
        self.handing = Some(Handing {
            attempt,
            ..Handing::default()
        });
    }

    /// Stops reading every open connection (again each turn: one adopted from another shard
    /// meanwhile too).
    fn pause_for_handover(&mut self, backend: &mut B) {
        // Messages waiting for their copy on a replica node: the answer would come to this
        // process, which is going; their senders hear OVERLOADED now and send them again.
        self.router.refuse_all_uncopied(self.wall_ms);
        self.run_actions();
        // Also those accepted since (an accept the kernel had already completed).
        for id in 0..self.conns.len() as ConnId {
            match self.conns[id as usize].as_ref().map(|conn| conn.phase) {
                Some(Phase::Handshaking) => self.close(id),
                Some(Phase::Registering) => self.close_with(
                    id,
                    GoAwayReason::Shutdown,
                    "the server is restarting; connect again",
                ),
                _ => {}
            }
        }
        let Some(handing) = self.handing.as_mut() else {
            return;
        };
        for (id, conn) in self.conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            let id = id as ConnId;
            if conn.phase == Phase::Open && handing.paused.get(&id) != Some(&conn.generation) {
                handing.paused.insert(id, conn.generation);
                backend.set_reading(id, false);
            }
        }
    }

    /// Nothing of this shard is under way: no item held, unkept or syncing, no mail waiting
    /// in its outboxes, no connection moving or in its handshake (the reads in flight are the
    /// backend's to tell: [`Backend::stop_reads`]).
    fn is_quiet(&self) -> bool {
        self.unquiet().is_none()
    }

    /// What keeps this shard from being quiet, if anything: for [`Core::is_quiet`] and the log.
    fn unquiet(&self) -> Option<&'static str> {
        let busy = [
            (!self.held.is_empty(), "items held for the store"),
            (!self.written.is_empty(), "items not yet durable"),
            (
                self.store.next_commit_deadline().is_some(),
                "store writes not yet committed",
            ),
            (self.syncing, "a sync under way"),
            (
                self.outbox.iter().any(|mails| !mails.is_empty()),
                "mail for other shards",
            ),
            (!self.node_outbox.is_empty(), "mail for other nodes"),
            (
                !self.moving.is_empty() || !self.adoptions.is_empty() || !self.to_move.is_empty(),
                "connections moving between shards",
            ),
            (
                !self.to_close.is_empty() || !self.dirty.is_empty(),
                "bytes not yet handed to the backend",
            ),
            (self.handshake_input.is_waiting(), "handshake input"),
            (!self.away.is_empty(), "handshakes on the handshaker thread"),
            (!self.holds.is_empty(), "reads of the offline queue"),
            (
                !(self.conns.iter().flatten())
                    .all(|conn| matches!(conn.phase, Phase::Open | Phase::Closing)),
                "connections in their handshake",
            ),
        ];
        busy.into_iter()
            .find(|(busy, _)| *busy)
            .map(|(_, what)| what)
    }

    /// Freezes every open connection for export; each answers with `Exported`.
    fn start_export(&mut self, backend: &mut B) {
        // Whatever is queued for the clients is sealed and handed to the backend first: it
        // travels as the connection's unwritten bytes.
        for id in 0..self.conns.len() as ConnId {
            let pending = self.conns[id as usize].as_mut().is_some_and(|conn| {
                conn.phase == Phase::Open
                    && conn
                        .session
                        .channel()
                        .is_some_and(|channel| channel.has_pending())
            });
            if pending {
                self.mark_dirty(id);
            }
        }
        self.end_turn(backend);
        let open: Vec<(ConnId, u32)> = (self.conns.iter().enumerate())
            .filter_map(|(id, conn)| {
                let conn = conn.as_ref()?;
                (conn.phase == Phase::Open && conn.user.is_some())
                    .then_some((id as ConnId, conn.generation))
            })
            .collect();
        let handing = self.handing.as_mut().expect("quiesced first");
        handing.export_started = true;
        handing.waiting = open.iter().copied().collect();
        info!(
            shard = self.settings.index,
            connections = open.len(),
            "takeover: exporting"
        );
        for (id, _) in open {
            backend.export(id);
        }
    }

    /// The backend froze connection `id` (`exported`), or could not (the error).
    fn exported(&mut self, id: ConnId, exported: std::io::Result<Exported>) {
        let wanted = (self.handing.as_mut()).is_some_and(|h| h.waiting.remove(&id).is_some());
        if !wanted {
            // The export of a takeover given up meanwhile: the connection goes on here.
            if exported.is_ok() {
                self.to_thaw.push(id);
            }
            return;
        }
        let handing = self.handing.as_mut().expect("wanted");
        let Exported { socket, mut unsent } = match exported {
            Ok(exported) => exported,
            Err(error) => {
                let hint = if error.raw_os_error() == Some(nix::errno::Errno::EMFILE as i32) {
                    " (the handover needs a descriptor per connection: raise RLIMIT_NOFILE)"
                } else {
                    ""
                };
                handing.failed = Some(format!(
                    "connection {id} could not be exported: {error}{hint}"
                ));
                return;
            }
        };
        handing.frozen.push(id);
        let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        let (Some(user), Some(channel)) = (conn.user, conn.session.channel()) else {
            return;
        };
        // Stanzas queued since the export started are sealed now and written first by the
        // new process, with the nonces they took.
        let channel = channel.export(&mut unsent);
        let Some(session) = self.router.export_session(user) else {
            handing.failed = Some(format!("the router has no session of {user}"));
            return;
        };
        let peer = socket2::SockRef::from(&socket)
            .peer_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .map(|addr| addr.ip().to_canonical());
        handing.exported.push(ConnExport {
            socket,
            unsent,
            peer,
            channel,
            session,
        });
    }

    /// The takeover failed: every connection goes on here as before.
    fn thaw(&mut self, backend: &mut B) {
        let Some(handing) = self.handing.take() else {
            return;
        };
        for id in handing
            .frozen
            .into_iter()
            .chain(handing.waiting.into_keys())
        {
            backend.thaw(id);
        }
        // The frozen time does not count as idle: pings that came meanwhile are read now.
        let now_ms = self.now_ms;
        for conn in self.conns.iter_mut().flatten() {
            conn.since_ms = conn.since_ms.max(now_ms);
        }
        for (id, generation) in handing.paused {
            let paused = match self.conns.get(id as usize).and_then(Option::as_ref) {
                Some(conn) if conn.generation == generation => conn.paused,
                _ => continue,
            };
            if !paused {
                backend.set_reading(id, true);
            }
        }
        backend.set_accepting(true);
        info!(
            shard = self.settings.index,
            "takeover failed: serving again"
        );
    }

    /// Resumes the connections taken over from the process before this one, on this shard
    /// (their home): each session goes on where it stopped.
    fn resume_inherited(&mut self, backend: &mut B, inherited: ShardExport) {
        let ShardExport { conns, watchers } = inherited;
        for (user, subscribers) in watchers {
            self.router.restore_watchers(user, subscribers);
        }
        let count = conns.len();
        let mut lost = 0;
        for ConnExport {
            socket,
            unsent,
            peer,
            channel,
            session,
        } in conns
        {
            let user = session.user;
            let id = match backend.import(socket, unsent) {
                Ok(id) => id,
                Err(error) => {
                    lost += 1;
                    warn!(%user, %error, "takeover: a connection could not be adopted");
                    continue;
                }
            };
            let generation = self.next_generation();
            let mut conn = Conn::new(
                generation,
                ServerConnection::Open(Channel::resume(channel)),
                self.now_ms,
            );
            conn.phase = Phase::Open;
            conn.user = Some(user);
            self.insert(id, conn);
            self.admission.inherit(id, peer, self.now_ms);
            let conn_ref = self.conn_ref(id);
            self.router.handle_resume(conn_ref, session, self.wall_ms);
            self.run_actions();
        }
        self.end_turn(backend);
        info!(
            shard = self.settings.index,
            connections = count - lost,
            lost,
            "takeover: connections resumed"
        );
    }

    /// When the drain sends the next connection away.
    fn drain_deadline(&self) -> Option<u64> {
        let draining = self.draining.as_ref()?;
        if draining.reported {
            return None;
        }
        // Past the plan, the loop still looks at least once a tick for the last closes.
        draining.plan.next_deadline_ms()
    }

    fn publish_gauges(&self, backend: &B) {
        self.stats
            .connections_open
            .store(backend.connections() as u64, Ordering::Relaxed);
        self.stats
            .connections_refused
            .store(backend.refused(), Ordering::Relaxed);
        let router = self.router.counters();
        let store = self.store.counters();
        let (queue_items, queue_bytes) = self.router.queued();
        let stats = &self.stats;
        for (gauge, value) in [
            (&stats.connections_handshaking, self.handshaking as u64),
            (&stats.send_buffered_bytes, backend.unsent_bytes() as u64),
            (
                &stats.handshakes_waiting,
                (self.handshake_input.waiting() + self.away.len()) as u64,
            ),
            (&stats.messages_accepted, router.messages_accepted),
            (&stats.messages_rejected, router.messages_rejected),
            (&stats.messages_acked, router.messages_acked),
            (&stats.messages_deduplicated, router.messages_deduplicated),
            (&stats.receipts_queued, router.receipts_queued),
            (&stats.reads_refused, router.reads_refused),
            (&stats.rate_limited, router.rate_limited),
            (&stats.mails_to_nodes, router.mails_to_nodes),
            (&stats.mails_unroutable, router.mails_unroutable),
            (&stats.replicas_kept, router.replicas_kept),
            (&stats.replicas_refused, router.replicas_refused),
            (&stats.replicas_missing, router.replicas_missing),
            (&stats.handed_back, router.handed_back),
            (&stats.handed_back_dropped, router.handed_back_dropped),
            (&stats.group_messages, router.group_messages),
            (&stats.group_changes, router.group_changes),
            (&stats.group_copies_refused, router.group_copies_refused),
            (&stats.queue_items, queue_items as u64),
            (&stats.queue_bytes, queue_bytes as u64),
            (&stats.store_appends, store.appended),
            (&stats.store_deliveries, store.delivered),
            (&stats.store_commits, store.commits),
            (&stats.store_fsyncs, store.fsyncs),
            (&stats.store_segments_created, store.segments_created),
            (
                &stats.store_segments_begun_on_spares,
                store.segments_begun_on_spares,
            ),
            (
                &stats.store_segment_removals_failed,
                store.segment_removals_failed,
            ),
            (&stats.store_disk_bytes, self.store.disk_bytes()),
        ] {
            gauge.store(value, Ordering::Relaxed);
        }
    }

    /// Commits whatever is held or buffered now, whatever the batch deadlines, and waits
    /// until it is durable.
    fn commit_now(&mut self) {
        // Twice: a failed fsync fails its items and buffers their tombstones again.
        for _ in 0..2 {
            self.commit(true);
            self.settle_syncs();
        }
    }

    fn shut_down(&mut self, backend: &mut B) {
        // What was appended becomes durable (and its ServerAcks leave) before the GoAways.
        self.commit_now();
        let open: Vec<ConnId> = (0..self.conns.len() as ConnId)
            .filter(|id| self.is_live(*id))
            .collect();
        for id in &open {
            self.close_with(*id, GoAwayReason::Shutdown, "server shutting down");
        }
        self.end_turn(backend);
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        while backend.connections() > 0 && Instant::now() < deadline {
            let _ = backend.poll(Some(Duration::from_millis(20)), &mut |_| Reading::Pause);
        }
        // The times of the devices that left, and the clock's, for the next run to resume from.
        self.read_clocks();
        self.run_actions();
        self.seen.append(None, self.account_clock_s());
        if let Err(error) = self.seen.flush() {
            let path = self.seen.path().display().to_string();
            warn!(shard = self.settings.index, %error, "cannot record the account clock in {path}");
        }
        let counters = self.router.counters();
        let stats: Vec<String> = self
            .stats
            .snapshot()
            .into_iter()
            .filter(|(_, value)| *value > 0)
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let store = self.store.counters();
        info!(
            shard = self.settings.index,
            connections_closed = open.len(),
            messages_accepted = counters.messages_accepted,
            messages_acked = counters.messages_acked,
            messages_deduplicated = counters.messages_deduplicated,
            replies_dropped = counters.replies_dropped,
            acks_unmatched = counters.acks_unmatched,
            receipts_dropped = counters.receipts_dropped,
            receipts_duplicate = counters.receipts_duplicate,
            reads_refused = counters.reads_refused,
            store_appended = store.appended,
            store_delivered = store.delivered,
            store_commits = store.commits,
            store_fsyncs = store.fsyncs,
            store_read_calls = store.read_calls,
            store_segments_created = store.segments_created,
            store_segments_begun_on_spares = store.segments_begun_on_spares,
            "shard stopped; {}",
            stats.join(" ")
        );
    }

    /// Queues a GoAway and closes at the end of the turn.
    fn close_with(&mut self, id: ConnId, reason: GoAwayReason, text: &str) {
        self.queue_stanza(id, &Stanza::go_away(reason, text));
        self.close(id);
    }

    /// Closes at the end of the turn, after this turn's bytes are written.
    fn close(&mut self, id: ConnId) {
        if !self.holds.is_empty() {
            self.release_hold(id);
        }
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let was_handshaking = conn.phase == Phase::Handshaking;
        match conn.phase {
            Phase::Closing => return,
            Phase::Open => {}
            // Not attached in the router: nothing to tell it when the connection goes.
            Phase::Handshaking | Phase::Moving | Phase::Registering => conn.user = None,
        }
        conn.phase = Phase::Closing;
        let generation = conn.generation;
        self.to_close.push((id, generation));
        self.mark_dirty(id);
        if was_handshaking {
            self.left_handshake(id);
        }
    }

    /// A connection left its handshake (done, failed, closed).
    fn left_handshake(&mut self, id: ConnId) {
        debug_assert!(self.handshaking > 0, "a handshake ended that never started");
        self.handshaking = self.handshaking.saturating_sub(1);
        self.admission.handshake_ended(id);
    }

    /// Keeps the bytes this shard's open connections hold for writing within its budget: past
    /// it, the connections holding the most (the slowest readers) are closed at once, their
    /// bytes dropped, until it is kept. Connections already closing are not counted: their bytes
    /// go with them within the close linger, and counting them would close readers that are
    /// not slow. At most every `SEND_BUDGET_EVERY_MS`: finding them is a scan.
    fn keep_send_budget(&mut self, backend: &mut B) {
        let budget = self.settings.send_budget_bytes;
        if budget == 0 || backend.unsent_bytes() <= budget || self.now_ms < self.send_budget_next_ms
        {
            return;
        }
        self.send_budget_next_ms = self.now_ms + SEND_BUDGET_EVERY_MS;
        let open = backend.heaviest(usize::MAX);
        let held: usize = open.iter().map(|(_, bytes)| bytes).sum();
        let Some(over) = held.checked_sub(budget).filter(|over| *over > 0) else {
            return;
        };
        let mut freed = 0;
        let mut closed = 0u64;
        for (id, bytes) in open.into_iter().take(SEND_BUDGET_CLOSES_MAX) {
            if freed >= over {
                break;
            }
            let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::take) else {
                continue;
            };
            if conn.phase == Phase::Handshaking {
                self.left_handshake(id);
            }
            backend.abort(id);
            self.forget(id, conn);
            freed += bytes;
            closed += 1;
        }
        if closed == 0 {
            return;
        }
        self.send_budget_next_ms = self.now_ms + SEND_BUDGET_AGAIN_MS;
        bump(&self.stats.send_budget_closes, closed);
        warn!(
            shard = self.settings.index,
            closed,
            freed_bytes = freed,
            budget_bytes = budget,
            "send budget: closed the connections that read slowest (send_buffers_bytes_max)"
        );
        self.run_actions();
    }

    /// Answers a new connection that admission refused with the refusal, and closes it.
    fn refuse(&mut self, id: ConnId, peer: Option<std::net::IpAddr>, refusal: Refusal) {
        let counter = match refusal.reason {
            RefusalReason::Busy => &self.stats.admission_busy,
            RefusalReason::AddressRate => &self.stats.admission_address_rate,
            RefusalReason::AddressHandshakes => &self.stats.admission_address_handshakes,
            RefusalReason::AddressConnections | RefusalReason::Other(_) => {
                &self.stats.admission_address_connections
            }
        };
        bump(counter, 1);
        if let Some(refused) = self.admission.refused(self.now_ms) {
            warn!(
                shard = self.settings.index,
                refused,
                last_reason = refusal.reason.name(),
                last_address = ?peer,
                "admission: refusing new connections (counted in hop_admission_refused_total)"
            );
        }
        let start = self.out.len();
        refusal.encode(&mut self.out);
        if let Some(generation) = self.generation_of(id) {
            self.note_out(id, generation, start);
        }
        self.close(id);
    }

    /// Drops a connection that is gone: the router hears of it.
    fn forget(&mut self, id: ConnId, conn: Conn) {
        self.holds.remove(&id);
        self.admission.left(id, self.now_ms);
        self.registering.remove(&id);
        self.links_in.remove(&id);
        self.handshake_input.forget(id);
        self.away.remove(&id);
        if conn.phase == Phase::Moving {
            self.moving.remove(&id);
            return;
        }
        if let (Phase::Open | Phase::Closing, Some(user)) = (conn.phase, conn.user) {
            let conn_ref = ConnRef((u64::from(conn.generation) << 32) | u64::from(id));
            self.router.handle_disconnect(user, conn_ref, self.wall_ms);
            self.run_actions();
        }
    }

    /// Queues `stanza` on connection `id`, behind what waits for a read of the offline queue.
    fn queue_stanza(&mut self, id: ConnId, stanza: &Stanza) {
        // Almost always no hold at all: no lookup per stanza then.
        if !self.holds.is_empty() {
            if let Some(hold) = self.holds.get_mut(&id) {
                hold.waiting.push_back(Outgoing::Stanza(stanza.clone()));
                return;
            }
        }
        self.queue_now(id, stanza);
    }

    /// Queues `stanza` on connection `id` now.
    fn queue_now(&mut self, id: ConnId, stanza: &Stanza) {
        let Some(conn) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(channel) = conn.session.channel() else {
            return;
        };
        let generation = conn.generation;
        let start = self.out.len();
        channel.queue(stanza, &mut self.out);
        bump(&self.stats.stanzas_out, 1);
        self.note_out(id, generation, start);
        self.mark_dirty(id);
    }

    /// Records the bytes appended to `out` since `start` as connection `id`'s.
    fn note_out(&mut self, id: ConnId, generation: u32, start: usize) {
        let end = self.out.len();
        if end > start {
            self.spans.push(Span {
                id,
                generation,
                start,
                end,
            });
            self.mark_dirty(id);
        }
    }

    /// A generation for a new connection entry; never 0, so no handle is all zeros.
    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.generation
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.conn_mut(id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn insert(&mut self, id: ConnId, conn: Conn) {
        let index = id as usize;
        if self.conns.len() <= index {
            self.conns.resize_with(index + 1, || None);
        }
        debug_assert!(
            self.conns[index].is_none(),
            "connection id reused while in use"
        );
        self.conns[index] = Some(conn);
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Still handshaking, moving or open (not closing, not gone).
    fn is_live(&self, id: ConnId) -> bool {
        matches!(
            self.conns
                .get(id as usize)
                .and_then(Option::as_ref)
                .map(|conn| conn.phase),
            Some(Phase::Handshaking | Phase::Moving | Phase::Registering | Phase::Open)
        )
    }

    fn generation_of(&self, id: ConnId) -> Option<u32> {
        self.conns
            .get(id as usize)
            .and_then(Option::as_ref)
            .map(|conn| conn.generation)
    }

    fn conn_ref(&self, id: ConnId) -> ConnRef {
        let generation = self
            .conns
            .get(id as usize)
            .and_then(Option::as_ref)
            .map_or(0, |conn| conn.generation);
        ConnRef((u64::from(generation) << 32) | u64::from(id))
    }

    /// The connection a router handle names, if it is still that connection.
    fn resolve(&self, conn: ConnRef) -> Option<ConnId> {
        let id = (conn.0 & u64::from(u32::MAX)) as ConnId;
        let generation = (conn.0 >> 32) as u32;
        let current = self.conns.get(id as usize).and_then(Option::as_ref)?;
        (current.generation == generation).then_some(id)
    }

    /// Reads both clocks once for the events that follow, and tells the router the account
    /// clock's time.
    fn read_clocks(&mut self) {
        self.now_ms = monotonic_ms();
        self.wall_ms = wall_clock_ms();
        self.router.set_account_clock(self.account_clock_s());
    }

    /// The account clock (`hop_store::seen`): seconds that count while hopd runs.
    fn account_clock_s(&self) -> u32 {
        let seconds = u64::from(self.settings.account_clock_base_s) + self.now_ms / 1000;
        u32::try_from(seconds).unwrap_or(u32::MAX)
    }

    /// Expires the accounts none of whose devices was seen for `account_expiry_ms` (at most
    /// once a grain, at least hourly: the router walks every user), keeps the clock's time,
    /// and rewrites the seen log when it holds over twice the records that are live.
    fn expire_accounts(&mut self) {
        if self.now_ms < self.account_sweep_next_ms || self.router.account_expiry_s() == 0 {
            return;
        }
        let grain_ms = u64::from(self.router.seen_grain_s()) * 1000;
        self.account_sweep_next_ms = self.now_ms + grain_ms.min(ACCOUNT_SWEEP_MAX_MS);
        let expired = self.router.expire_accounts();
        self.run_actions();
        if expired > 0 {
            bump(&self.stats.accounts_expired, expired as u64);
            info!(
                shard = self.settings.index,
                expired, "accounts expired: no device of theirs was seen within account_expiry_ms"
            );
        }
        let clock_s = self.account_clock_s();
        let live = self.router.users_known() as u64;
        if self.seen.records() > 2 * live + SEEN_REWRITE_SLACK {
            // Not while the syncer writes the log (the file would change under it): its job
            // comes back first. Rare (the log doubled), and the rewrite blocks on an fsync
            // anyway.
            self.wait_for_job();
            let rewritten = self.seen.rewrite(&FsIo, clock_s, self.router.seen_times());
            if let Err(error) = rewritten {
                let path = self.seen.path().display().to_string();
                self.warn(format_args!(
                    "cannot rewrite {path} (it keeps growing until a rewrite succeeds): {error}"
                ));
            }
            self.run_actions(); // the ServerAcks the job released
        } else {
            self.seen.append(None, clock_s);
        }
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        let shard = self.settings.index;
        if self.warnings.allow(self.now_ms) {
            warn!(shard, "{message}");
        } else {
            debug!(shard, "{message}");
        }
    }
}

/// Allows a number of events per second.
#[derive(Debug, Default)]
struct RateLimit {
    second: u64,
    count: u32,
}

impl RateLimit {
    fn allow(&mut self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.count = 0;
        }
        self.count += 1;
        self.count <= WARNINGS_PER_SECOND
    }
}

/// Milliseconds since the Unix epoch: for timestamps and the offline TTL, never deadlines.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Milliseconds on a monotonic clock shared by every shard of this process (it starts at 1 at
/// the first call): for every deadline. Never stored, never compared with a wall-clock time.
pub fn monotonic_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64) -> Queued {
        Queued::Message {
            from: UserId::from_halves(1, 1).expect("valid"),
            id,
            timestamp_ms: 0,
            body: Bytes::from_static(b"x"),
        }
    }

    const BATCH: Keeping = Keeping {
        at_once: false,
        ack_wait_ms: 2,
    };

    #[test]
    fn held_items_leave_in_order_without_the_cancelled_ones() {
        let user = UserId::from_halves(7, 7).expect("valid");
        let mut held = Held::default();
        assert_eq!(held.deadline(&BATCH), None);
        held.hold(user, message(1), 11, 102);
        held.hold(user, message(2), 12, 103);
        assert_eq!(held.deadline(&BATCH), Some(102), "the first item's time");
        assert!(held.cancel(user, 2, ReceiptKind::Unspecified, 12));
        assert!(!held.cancel(user, 2, ReceiptKind::Unspecified, 12), "once");
        assert!(
            !held.cancel(user, 1, ReceiptKind::Read, 11),
            "the kind must match"
        );
        assert!(
            !held.cancel(user, 1, ReceiptKind::Unspecified, 12),
            "the number must match"
        );
        assert!(!held.cancel(user, 1, ReceiptKind::Unspecified, NO_KEEP));
        held.hold(user, message(3), 13, 105);
        let mut batch = Vec::new();
        held.take_due(105, false, &mut batch);
        let ids: Vec<u64> = batch.drain(..).map(|(_, item, _)| item.id()).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(held.deadline(&BATCH), None, "empty again");
        assert!(!held.cancel(user, 3, ReceiptKind::Unspecified, 13), "gone");
        held.hold(user, message(4), 14, 200);
        assert!(held.cancel(user, 4, ReceiptKind::Unspecified, 14));
    }

    #[test]
    fn held_items_are_found_past_a_gap_in_their_numbers() {
        let user = UserId::from_halves(7, 7).expect("valid");
        let mut held = Held::default();
        // The numbers wrap past 0, which names no item, and may jump.
        for (id, keep) in [(1, u32::MAX - 1), (2, u32::MAX), (3, 1), (4, 2), (5, 40)] {
            held.hold(user, message(id), keep, 100);
        }
        assert!(held.cancel(user, 5, ReceiptKind::Unspecified, 40));
        assert!(held.cancel(user, 3, ReceiptKind::Unspecified, 1));
        assert!(held.cancel(user, 1, ReceiptKind::Unspecified, u32::MAX - 1));
        assert!(
            !held.cancel(user, 9, ReceiptKind::Unspecified, 3),
            "no such number"
        );
        let mut batch = Vec::new();
        held.take_due(0, true, &mut batch);
        let kept: Vec<(u64, u32)> = batch
            .iter()
            .map(|(_, item, keep)| (item.id(), *keep))
            .collect();
        assert_eq!(kept, [(2, u32::MAX), (4, 2)]);
    }

    #[test]
    fn copies_of_one_message_and_receipts_of_it_are_held_apart() {
        let phone = UserId::from_halves(7, 7).expect("valid");
        let laptop = UserId::from_halves(8, 8).expect("valid");
        let mut held = Held::default();
        // One message's copies for two devices of an account share its id.
        held.hold(phone, message(1), 1, 100);
        held.hold(laptop, message(1), 2, 100);
        // Two devices' delivered receipts of one message, for its sender.
        let receipt = |by| Queued::Receipt {
            id: 9,
            kind: ReceiptKind::Delivered,
            by,
            timestamp_ms: 0,
        };
        held.hold(phone, receipt(phone), 3, 101);
        held.hold(phone, receipt(laptop), 4, 101);
        assert!(
            !held.cancel(laptop, 1, ReceiptKind::Unspecified, 1),
            "not the laptop's"
        );
        assert!(held.cancel(phone, 1, ReceiptKind::Unspecified, 1));
        let by_laptop = receipt(laptop).ack_id();
        assert!(
            !held.cancel(phone, by_laptop, ReceiptKind::Delivered, 3),
            "not this receipt"
        );
        assert!(held.cancel(phone, by_laptop, ReceiptKind::Delivered, 4));
        let mut left = Vec::new();
        held.take_due(0, true, &mut left);
        assert_eq!(left, [(laptop, message(1), 2), (phone, receipt(phone), 3)]);
    }

    /// The connections a turn takes: their ids, in order.
    fn turn(input: &mut HandshakeInput) -> Vec<ConnId> {
        input.start_turn();
        std::iter::from_fn(|| input.next().map(|(id, _)| id)).collect()
    }

    #[test]
    fn a_turn_works_on_at_most_its_cap_of_handshakes_and_the_rest_come_first_next() {
        let mut input = HandshakeInput::new(2);
        for id in 0..5 {
            assert_eq!(input.keep(id, 1, b"m1"), Reading::Continue);
        }
        assert_eq!(turn(&mut input), [0, 1]);
        assert!(input.is_waiting(), "the rest wait: the loop must not sleep");
        // A connection that sends now is behind those that waited.
        input.keep(9, 1, b"m1");
        assert_eq!(turn(&mut input), [2, 3]);
        assert_eq!(turn(&mut input), [4, 9]);
        assert!(!input.is_waiting());
        assert_eq!(turn(&mut input), [] as [ConnId; 0]);
    }

    #[test]
    fn a_connections_handshake_input_waits_whole_and_pauses_at_one_frame() {
        let mut input = HandshakeInput::new(8);
        let half = HANDSHAKE_INPUT_PAUSE_BYTES / 2;
        assert_eq!(input.keep(3, 7, &vec![1; half]), Reading::Continue);
        assert_eq!(input.keep(4, 1, b"other"), Reading::Continue);
        assert_eq!(
            input.keep(3, 7, &[2; HANDSHAKE_INPUT_PAUSE_BYTES]),
            Reading::Pause,
            "more than a handshake message's worth: reading stops"
        );
        // Bytes the backend had read already still join the rest.
        assert_eq!(input.keep(3, 7, b"late"), Reading::Pause);
        input.start_turn();
        let (id, waiting) = input.next().expect("connection 3 first");
        assert_eq!(id, 3);
        assert_eq!(waiting.generation, 7);
        assert!(waiting.paused);
        assert_eq!(waiting.bytes.len(), half + HANDSHAKE_INPUT_PAUSE_BYTES + 4);
        assert!(
            waiting.bytes.ends_with(b"late"),
            "in the order they were read"
        );
        let (id, waiting) = input.next().expect("then connection 4");
        assert_eq!(
            (id, waiting.bytes.as_slice(), waiting.paused),
            (4, &b"other"[..], false)
        );
    }

    #[test]
    fn the_input_of_a_connection_that_went_is_dropped_and_costs_no_turn() {
        let mut input = HandshakeInput::new(1);
        input.keep(1, 1, b"a");
        input.keep(2, 1, b"b");
        input.forget(1); // closed, or timed out while it waited
        assert_eq!(
            turn(&mut input),
            [2],
            "the cap counts only live connections"
        );
        input.keep(5, 1, b"c");
        input.forget(5);
        assert!(!input.is_waiting());
        assert!(input.order.is_empty(), "nothing is left behind");
        // Its id reused by a new connection.
        input.keep(5, 2, b"d");
        input.start_turn();
        let (id, waiting) = input.next().expect("the new connection's input");
        assert_eq!(
            (id, waiting.generation, waiting.bytes.as_slice()),
            (5, 2, &b"d"[..])
        );
    }

    #[test]
    fn held_items_leave_when_due_in_order_and_at_once_under_always_or_past_the_bounds() {
        let user = UserId::from_halves(7, 7).expect("valid");
        let mut held = Held::default();
        // A connected device's item waits; one for a device that is not waits behind it.
        held.hold(user, message(1), 1, 120);
        held.hold(user, message(2), 2, 101);
        held.hold(user, message(3), 3, 125);
        assert_eq!(held.deadline(&BATCH), Some(120));
        let mut batch = Vec::new();
        held.take_due(119, false, &mut batch);
        assert!(batch.is_empty(), "nothing is due before the first item");
        held.take_due(120, false, &mut batch);
        let ids: Vec<u64> = batch.drain(..).map(|(_, item, _)| item.id()).collect();
        assert_eq!(ids, [1, 2], "in order, up to the first that is not due");
        assert_eq!(held.deadline(&BATCH), Some(125));
        let always = Keeping {
            at_once: true,
            ..BATCH
        };
        assert_eq!(held.deadline(&always), Some(0), "always: at once");
        // Past the bytes bound the oldest leave whatever their wait, until under it again.
        let big = Queued::Message {
            from: user,
            id: 4,
            timestamp_ms: 0,
            body: Bytes::from(vec![0u8; HELD_BYTES_MAX]),
        };
        held.hold(user, big, 4, 10_000);
        held.hold(user, message(5), 5, 10_000);
        assert_eq!(held.deadline(&BATCH), Some(0), "over the bound");
        held.take_due(126, false, &mut batch);
        let ids: Vec<u64> = batch.drain(..).map(|(_, item, _)| item.id()).collect();
        assert_eq!(ids, [3, 4], "the oldest, until the bound holds");
        assert_eq!(held.deadline(&BATCH), Some(10_000));
    }
}
