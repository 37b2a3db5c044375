use std::collections::VecDeque;

use foldhash::HashMap;

use bytes::Bytes;
use hop_protocol::keys::KEY_BYTES;
use hop_protocol::user::key_fingerprint;
use hop_protocol::wire::{
    ErrorCode, GoAwayReason, Kind, Pong, Presence, Receipt, ReceiptKind, ServerAck, Stanza,
    BODY_BYTES_MAX,
};
use hop_protocol::UserId;

use crate::{ConnRef, ShardId};

/// The home shard of a user: where its connection, presence and queue live.
pub fn home_shard(user: UserId, shards: u16) -> ShardId {
    assert!(shards > 0, "at least one shard");
    // User ids are hash-derived, but a multiplicative mix keeps the spread even for ids that
    // are not (tests, hand-picked ids).
    let mixed = user.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    (mixed % u64::from(shards)) as ShardId
}

/// Bounds on what one shard keeps. Every queue is bounded; nothing grows without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items (messages and receipts) waiting for one user's device.
    pub queue_messages_max: usize,
    /// Body bytes waiting for one user's device.
    pub queue_bytes_max: usize,
    /// Body bytes waiting in all queues of this shard.
    pub shard_queue_bytes_max: usize,
    /// Deliveries pushed to a connection and not yet acked.
    pub inflight_max: usize,
    /// Body bytes of those deliveries (at least one is always pushed): a connection that just
    /// came online to a queue of large messages is not pushed more than it can take at once.
    pub inflight_bytes_max: usize,
    /// Users one user may watch at once.
    pub subscriptions_max: usize,
    /// Watchers one user may have.
    pub subscribers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_messages_max: 10_000,
            queue_bytes_max: 16 * 1024 * 1024,
            shard_queue_bytes_max: 1024 * 1024 * 1024,
            inflight_max: 256,
            inflight_bytes_max: 1024 * 1024,
            subscriptions_max: 1024,
            subscribers_max: 10_000,
        }
    }
}

/// A message on its way from the sender's home shard to the recipient's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from: UserId,
    pub to: UserId,
    /// The sender's sequence number, echoed in its ServerAck.
    pub seq: u32,
    /// Server id, unique per server.
    pub id: u64,
    pub timestamp_ms: u64,
    pub body: Bytes,
}

/// Work one shard's router hands to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMessage {
    /// A message for a user of the receiving shard.
    Route(Envelope),
    /// The recipient's shard took message `seq` of `sender`: send the ServerAck.
    Accepted {
        sender: UserId,
        seq: u32,
        id: u64,
        timestamp_ms: u64,
    },
    /// The recipient's shard refused message `seq` of `sender` (seq 0: a subscription).
    Rejected {
        sender: UserId,
        seq: u32,
        code: ErrorCode,
        reason: &'static str,
    },
    /// A receipt for a message `to` sent.
    Receipt {
        to: UserId,
        id: u64,
        kind: ReceiptKind,
        by: UserId,
        timestamp_ms: u64,
    },
    Subscribe {
        subscriber: UserId,
        target: UserId,
    },
    Unsubscribe {
        subscriber: UserId,
        target: UserId,
    },
    /// `about`'s presence, for its watcher `to`.
    Presence {
        to: UserId,
        about: UserId,
        online: bool,
        last_seen_ms: u64,
    },
}

/// What the shard loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Queue `stanza` on a local connection.
    Send { conn: ConnRef, stanza: Stanza },
    /// Push message `id` of `user`'s queue to a local connection as a `Deliver`. Its body is
    /// on disk only (the router lets go of a body once it is kept): the shard loop reads it
    /// from the store, or, if it cannot be read back, calls [`Router::handle_unreadable`].
    DeliverKept {
        conn: ConnRef,
        user: UserId,
        from: UserId,
        id: u64,
        timestamp_ms: u64,
    },
    /// Send a GoAway and close a local connection.
    Close {
        conn: ConnRef,
        reason: GoAwayReason,
        text: &'static str,
    },
    /// Hand a message to another shard.
    Forward {
        shard: ShardId,
        message: ShardMessage,
    },
    /// A new user-to-key binding, to keep across restarts.
    PersistBinding { user: UserId, key: [u8; KEY_BYTES] },
    /// Keep this item of `user`'s queue on disk. Once it is durable the shard loop calls
    /// [`Router::handle_kept`]; if it cannot be kept, [`Router::handle_keep_failed`].
    Keep { user: UserId, item: Queued },
    /// `user`'s device acked item (`id`, `kind`): it may leave the disk.
    Forget {
        user: UserId,
        id: u64,
        kind: ReceiptKind,
    },
}

/// Why a connection may not attach to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The user id is bound to another key.
    IdTaken,
}

/// A stanza the client may not send; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// Event counts of one router, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages_accepted: u64,
    pub messages_rejected: u64,
    pub messages_acked: u64,
    pub receipts_queued: u64,
    pub receipts_dropped: u64,
    pub acks_unmatched: u64,
    pub presence_sent: u64,
    pub items_expired: u64,
    /// Items restored from disk for a user with no binding.
    pub items_orphaned: u64,
    /// Kept messages whose body could not be read back from disk (dropped from the queue).
    pub items_unreadable: u64,
}

/// An item of a user's queue: a message for the user, or a receipt for a message the user
/// sent. It stays queued until the user's device acks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    Message {
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
    },
    Receipt {
        id: u64,
        kind: ReceiptKind,
        by: UserId,
        timestamp_ms: u64,
    },
}

impl Queued {
    /// The server id of the message (for a receipt: of the message it is about).
    pub fn id(&self) -> u64 {
        match self {
            Self::Message { id, .. } | Self::Receipt { id, .. } => *id,
        }
    }

    /// The kind a device's Ack names for this item.
    pub fn ack_kind(&self) -> ReceiptKind {
        match self {
            Self::Message { .. } => ReceiptKind::Unspecified,
            Self::Receipt { kind, .. } => *kind,
        }
    }
}

/// An item of a user's queue as the router keeps it: what acks it, whom it names and how big
/// its body is, never the body itself. A message's body lives in [`Router`]'s `fresh` map only
/// until it is kept on disk; after that the store has it and memory does not grow with the
/// bytes queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// The message's server id (for a receipt: of the message it is about).
    id: u64,
    timestamp_ms: u64,
    /// A message's sender, or who sent a receipt.
    peer: UserId,
    body_bytes: u32,
    /// `Unspecified` for a message, else the receipt's kind: what the device's Ack names.
    kind: ReceiptKind,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 32);
const _: () = assert!(BODY_BYTES_MAX <= u32::MAX as usize);

impl Entry {
    fn of(item: &Queued) -> Self {
        match item {
            Queued::Message {
                from,
                id,
                timestamp_ms,
                body,
            } => Self {
                id: *id,
                timestamp_ms: *timestamp_ms,
                peer: *from,
                body_bytes: body.len() as u32,
                kind: ReceiptKind::Unspecified,
            },
            Queued::Receipt {
                id,
                kind,
                by,
                timestamp_ms,
            } => Self {
                id: *id,
                timestamp_ms: *timestamp_ms,
                peer: *by,
                body_bytes: 0,
                kind: *kind,
            },
        }
    }

    fn is_message(&self) -> bool {
        self.kind == ReceiptKind::Unspecified
    }

    fn body_bytes(&self) -> usize {
        self.body_bytes as usize
    }

    /// Does an Ack of (`id`, `kind`) name this item?
    fn acked_by(&self, ack_id: u64, ack_kind: ReceiptKind) -> bool {
        self.id == ack_id && self.kind == ack_kind
    }
}

/// What a shard knows of one of its users: 32 bytes, most users having nothing queued and no
/// watchers. The queue and the presence lists exist only while they hold something (freed by
/// [`Router::release_empty`] at the first tick they stay empty, not at once: a chatting user
/// would otherwise allocate them again for every message).
#[derive(Debug)]
struct User {
    /// `key_fingerprint` of the key the id is bound to (the key itself is on disk, in the
    /// account log): another key must match the id's 48 bits and these 64 to pass for it.
    key_fingerprint: u64,
    /// The current connection, or `NO_CONN` while offline (a sentinel keeps this 8 bytes).
    conn: ConnRef,
    /// When the user went offline; 0 while online or never seen.
    last_seen_ms: u64,
    extra: Option<Box<Extra>>,
}

/// `User::conn` of a user who is offline. The shard's handles never take this value.
const NO_CONN: ConnRef = ConnRef(u64::MAX);

const _: () = assert!(std::mem::size_of::<User>() <= 32);

/// A user's queue and presence lists, while any of them holds something.
#[derive(Debug, Default)]
struct Extra {
    queue: Queue,
    watch: Watch,
    /// In `Router::emptied`, to be freed at the next sweep if it is still empty then.
    listed: bool,
}

/// Items waiting for the device's Ack, oldest first. The first `inflight` were pushed to the
/// current connection.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Entry>,
    inflight: usize,
    /// Body bytes of the first `inflight` items.
    inflight_bytes: usize,
    queued_bytes: usize,
}

#[derive(Debug, Default)]
struct Watch {
    /// Who watches this user (on any shard).
    subscribers: Vec<UserId>,
    /// Whom this user watches; only while online.
    subscriptions: Vec<UserId>,
}

/// One shard's routing state. See the crate docs for the call order.
#[derive(Debug)]
pub struct Router {
    shard: ShardId,
    shards: u16,
    limits: Limits,
    users: HashMap<UserId, User>,
    next_id: u64,
    queued_bytes: usize,
    actions: VecDeque<Action>,
    counters: Counters,
    /// Messages taken into a queue whose sender has no ServerAck yet: they wait for the disk
    /// (or for the recipient's device, whichever comes first). Server id -> (sender, seq, time).
    awaiting_keep: HashMap<u64, (UserId, u32, u64)>,
    /// Bodies of queued messages not yet kept on disk, by server id. Bounded by what one
    /// commit interval brings in: a body leaves when its message is kept, acked or refused.
    fresh: HashMap<u64, Bytes>,
    /// Users whose queue and presence lists became empty since the last
    /// [`Router::release_empty`]; each at most once.
    emptied: Vec<UserId>,
}

/// Server ids: the shard in the top 8 bits, a counter in the low 56. The counter starts at the
/// router's start time in microseconds, so ids stay unique across restarts unless a shard
/// averaged more than a million messages a second since its start.
const ID_COUNTER_BITS: u32 = 56;
const SHARDS_MAX: u16 = 1 << (64 - ID_COUNTER_BITS);

impl Router {
    pub fn new(shard: ShardId, shards: u16, limits: Limits, now_ms: u64) -> Self {
        assert!(
            shards > 0 && shards <= SHARDS_MAX,
            "shards must be in 1..={SHARDS_MAX}"
        );
        assert!(shard < shards, "shard index out of range");
        assert!(limits.inflight_max > 0, "inflight_max must be positive");
        let counter = now_ms.saturating_mul(1000) & ((1 << ID_COUNTER_BITS) - 1);
        Self {
            shard,
            shards,
            limits,
            users: HashMap::default(),
            next_id: (u64::from(shard) << ID_COUNTER_BITS) | counter,
            queued_bytes: 0,
            actions: VecDeque::new(),
            counters: Counters::default(),
            awaiting_keep: HashMap::default(),
            fresh: HashMap::default(),
            emptied: Vec::new(),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Users with a binding on this shard.
    pub fn users_known(&self) -> usize {
        self.users.len()
    }

    /// Restores a binding kept from an earlier run. Bindings of other shards are ignored.
    pub fn restore_binding(&mut self, user: UserId, key: [u8; KEY_BYTES]) {
        if home_shard(user, self.shards) == self.shard {
            self.users.entry(user).or_insert_with(|| User::new(&key));
        }
    }

    /// The next action for the shard loop.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A connection authenticated as `user` with `key` arrived at its home shard.
    pub fn handle_connect(
        &mut self,
        user: UserId,
        key: &[u8; KEY_BYTES],
        conn: ConnRef,
        _now_ms: u64,
    ) -> Result<(), ConnectError> {
        assert_eq!(
            home_shard(user, self.shards),
            self.shard,
            "connection at the wrong shard"
        );
        let entry = self.users.entry(user);
        let user_state = match entry {
            std::collections::hash_map::Entry::Occupied(occupied) => {
                if occupied.get().key_fingerprint != key_fingerprint(key) {
                    return Err(ConnectError::IdTaken);
                }
                occupied.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(vacant) => {
                self.actions
                    .push_back(Action::PersistBinding { user, key: *key });
                vacant.insert(User::new(key))
            }
        };
        assert_ne!(conn, NO_CONN, "a connection handle the router reserves");
        if let Some(old) = user_state.replace_conn(Some(conn)) {
            // One connection per user: the newer one wins.
            self.actions.push_back(Action::Close {
                conn: old,
                reason: GoAwayReason::Replaced,
                text: "the same user connected again",
            });
            if let Some(extra) = user_state.extra.as_mut() {
                extra.watch.subscriptions.clear();
            }
        }
        user_state.last_seen_ms = 0;
        user_state.restart_pushes();
        let subscribers = user_state.subscribers().to_vec();
        if user_state.newly_empty() {
            self.emptied.push(user);
        }
        self.push_queued(user);
        for subscriber in subscribers {
            self.presence_to(subscriber, user, true, 0);
        }
        Ok(())
    }

    /// A connection of `user` closed. Unacked deliveries are sent again on the next connect.
    pub fn handle_disconnect(&mut self, user: UserId, conn: ConnRef, now_ms: u64) {
        let Some(state) = self.users.get_mut(&user) else {
            return;
        };
        if state.conn() != Some(conn) {
            return; // an older connection, already replaced
        }
        state.replace_conn(None);
        state.restart_pushes();
        state.last_seen_ms = now_ms.max(1);
        let subscriptions = state
            .extra
            .as_mut()
            .map(|extra| std::mem::take(&mut extra.watch.subscriptions))
            .unwrap_or_default();
        let subscribers = state.subscribers().to_vec();
        if state.newly_empty() {
            self.emptied.push(user);
        }
        for target in subscriptions {
            self.send_home(
                target,
                ShardMessage::Unsubscribe {
                    subscriber: user,
                    target,
                },
                now_ms,
            );
        }
        for subscriber in subscribers {
            self.presence_to(subscriber, user, false, now_ms.max(1));
        }
    }

    /// A stanza from `user`'s connection `conn`. A `Violation` means: send an Error and close.
    pub fn handle_stanza(
        &mut self,
        user: UserId,
        conn: ConnRef,
        stanza: Stanza,
        now_ms: u64,
    ) -> Result<(), Violation> {
        match self.users.get(&user) {
            Some(state) if state.conn() == Some(conn) => {}
            _ => return Ok(()), // a replaced connection's last words
        }
        let Some(kind) = stanza.kind else {
            return Err(Violation("stanza of unknown kind".into()));
        };
        match kind {
            Kind::Send(send) => self.client_send(user, conn, send.to, send.seq, send.body, now_ms),
            Kind::Ack(ack) => {
                let kind = ReceiptKind::try_from(ack.kind).unwrap_or(ReceiptKind::Unspecified);
                self.client_ack(user, ack.id, kind, now_ms);
            }
            Kind::Read(read) => match UserId::new(read.from) {
                Some(from) => self.send_home(
                    from,
                    ShardMessage::Receipt {
                        to: from,
                        id: read.id,
                        kind: ReceiptKind::Read,
                        by: user,
                        timestamp_ms: now_ms,
                    },
                    now_ms,
                ),
                None => self.error_to(
                    conn,
                    ErrorCode::BadUserId,
                    "Read names an invalid user id",
                    0,
                ),
            },
            Kind::Subscribe(subscribe) => self.client_subscribe(user, conn, subscribe.user, now_ms),
            Kind::Unsubscribe(unsubscribe) => {
                if let Some(target) = UserId::new(unsubscribe.user) {
                    let state = self.users.get_mut(&user).expect("checked above");
                    state.unsubscribe_from(target);
                    if state.newly_empty() {
                        self.emptied.push(user);
                    }
                    self.send_home(
                        target,
                        ShardMessage::Unsubscribe {
                            subscriber: user,
                            target,
                        },
                        now_ms,
                    );
                }
            }
            Kind::Ping(ping) => self.actions.push_back(Action::Send {
                conn,
                stanza: Stanza::of(Kind::Pong(Pong { nonce: ping.nonce })),
            }),
            Kind::Pong(_) => {}
            other => {
                let name = Stanza::of(other).kind_name();
                return Err(Violation(format!("clients may not send {name}")));
            }
        }
        Ok(())
    }

    /// Work from another shard.
    pub fn handle_shard_message(&mut self, message: ShardMessage, now_ms: u64) {
        match message {
            ShardMessage::Route(envelope) => self.accept(envelope, now_ms),
            ShardMessage::Accepted {
                sender,
                seq,
                id,
                timestamp_ms,
            } => {
                if let Some(conn) = self.conn_of(sender) {
                    self.actions.push_back(Action::Send {
                        conn,
                        stanza: Stanza::of(Kind::ServerAck(ServerAck {
                            seq,
                            id,
                            timestamp_ms,
                        })),
                    });
                }
            }
            ShardMessage::Rejected {
                sender,
                seq,
                code,
                reason,
            } => {
                if let Some(conn) = self.conn_of(sender) {
                    self.error_to(conn, code, reason, seq);
                }
            }
            ShardMessage::Receipt {
                to,
                id,
                kind,
                by,
                timestamp_ms,
            } => self.queue_receipt(to, id, kind, by, timestamp_ms),
            ShardMessage::Subscribe { subscriber, target } => {
                self.add_subscriber(subscriber, target, now_ms)
            }
            ShardMessage::Unsubscribe { subscriber, target } => {
                if let Some(state) = self.users.get_mut(&target) {
                    state.remove_subscriber(subscriber);
                    if state.newly_empty() {
                        self.emptied.push(target);
                    }
                }
            }
            ShardMessage::Presence {
                to,
                about,
                online,
                last_seen_ms,
            } => {
                let Some(state) = self.users.get(&to) else {
                    return;
                };
                let Some(conn) = state.conn() else { return };
                if state.subscriptions().contains(&about) {
                    self.counters.presence_sent += 1;
                    self.actions.push_back(Action::Send {
                        conn,
                        stanza: Stanza::of(Kind::Presence(Presence {
                            user: about.get(),
                            online,
                            last_seen_ms,
                        })),
                    });
                }
            }
        }
    }

    fn client_send(
        &mut self,
        from: UserId,
        conn: ConnRef,
        to: u64,
        seq: u32,
        body: Bytes,
        now_ms: u64,
    ) {
        let Some(to) = UserId::new(to) else {
            return self.error_to(
                conn,
                ErrorCode::BadUserId,
                "recipient id is outside the valid range",
                seq,
            );
        };
        if body.len() > BODY_BYTES_MAX {
            return self.error_to(
                conn,
                ErrorCode::BadStanza,
                "message body exceeds the limit",
                seq,
            );
        }
        let envelope = Envelope {
            from,
            to,
            seq,
            id: self.take_id(),
            timestamp_ms: now_ms,
            body,
        };
        self.send_home(to, ShardMessage::Route(envelope), now_ms);
    }

    /// At the recipient's home shard: take the message into the recipient's queue, or refuse.
    fn accept(&mut self, envelope: Envelope, now_ms: u64) {
        let reject = |code, reason| ShardMessage::Rejected {
            sender: envelope.from,
            seq: envelope.seq,
            code,
            reason,
        };
        let Some(state) = self.users.get_mut(&envelope.to) else {
            self.counters.messages_rejected += 1;
            let message = reject(ErrorCode::UnknownUser, "no such user on this server");
            return self.send_home(envelope.from, message, now_ms);
        };
        let body_bytes = envelope.body.len();
        if state.queue_len() >= self.limits.queue_messages_max
            || state.queued_bytes() + body_bytes > self.limits.queue_bytes_max
            || self.queued_bytes + body_bytes > self.limits.shard_queue_bytes_max
        {
            self.counters.messages_rejected += 1;
            let message = reject(
                ErrorCode::QueueFull,
                "the recipient's queue is full; message not taken",
            );
            return self.send_home(envelope.from, message, now_ms);
        }
        let item = Queued::Message {
            from: envelope.from,
            id: envelope.id,
            timestamp_ms: envelope.timestamp_ms,
            body: envelope.body.clone(),
        };
        state.queue_mut().push(Entry::of(&item));
        self.fresh.insert(envelope.id, envelope.body);
        self.queued_bytes += body_bytes;
        self.counters.messages_accepted += 1;
        // The ServerAck waits until the message is on disk or acked by the device.
        self.awaiting_keep.insert(
            envelope.id,
            (envelope.from, envelope.seq, envelope.timestamp_ms),
        );
        self.actions.push_back(Action::Keep {
            user: envelope.to,
            item,
        });
        self.push_queued(envelope.to);
    }

    /// The queued item (`id`, `kind`) is durable. For a message, the sender's
    /// ServerAck may leave, and the router lets go of the body: from now on the store has it
    /// and deliveries of it are [`Action::DeliverKept`].
    pub fn handle_kept(&mut self, id: u64, kind: ReceiptKind, now_ms: u64) {
        if kind != ReceiptKind::Unspecified {
            return;
        }
        // Server ids are unique, so the id alone names the message.
        self.fresh.remove(&id);
        self.release_server_ack(id, now_ms);
    }

    /// A kept message of `user` could not be read back from disk (the store found it
    /// damaged and dropped it): it leaves the queue too, and is counted.
    pub fn handle_unreadable(&mut self, user: UserId, id: u64) {
        if self
            .remove_item(user, id, ReceiptKind::Unspecified)
            .is_some()
        {
            self.counters.items_unreadable += 1;
            self.push_queued(user);
        }
    }

    /// The item (`id`, `kind`) of `user`'s queue could not be kept (quota, disk): it leaves the
    /// queue and, for a message, its sender gets an Error instead of a ServerAck.
    pub fn handle_keep_failed(
        &mut self,
        user: UserId,
        id: u64,
        kind: ReceiptKind,
        code: ErrorCode,
        reason: &'static str,
        now_ms: u64,
    ) {
        self.remove_item(user, id, kind);
        if let Some((sender, seq, _)) = self.awaiting_keep.remove(&id) {
            self.counters.messages_rejected += 1;
            let refusal = ShardMessage::Rejected {
                sender,
                seq,
                code,
                reason,
            };
            self.send_home(sender, refusal, now_ms);
        }
    }

    /// The item (`id`, `kind`) of `user`'s queue expired on disk: it leaves the queue.
    pub fn handle_expired(&mut self, user: UserId, id: u64, kind: ReceiptKind) {
        self.remove_item(user, id, kind);
        self.counters.items_expired += 1;
    }

    /// Puts back an item kept from an earlier run (already durable). Only what acks and names
    /// it is kept here; a message's body stays on disk. Items of users without a binding are
    /// counted and dropped.
    pub fn restore_item(&mut self, user: UserId, item: &Queued) {
        let Some(state) = self.users.get_mut(&user) else {
            self.counters.items_orphaned += 1;
            return;
        };
        let entry = Entry::of(item);
        state.queue_mut().push(entry);
        self.queued_bytes += entry.body_bytes();
    }

    /// Messages waiting for the disk before their ServerAck.
    pub fn awaiting_keep(&self) -> usize {
        self.awaiting_keep.len()
    }

    /// Frees the queue and presence lists of the users whose lists have stayed empty since
    /// they emptied, so that an idle user costs only its 32 bytes. Called once per tick: a
    /// user who gets a message now and then keeps the box between them instead of
    /// allocating it again for every message.
    pub fn release_empty(&mut self) {
        for user in std::mem::take(&mut self.emptied) {
            let Some(state) = self.users.get_mut(&user) else {
                continue;
            };
            if state.extra.as_ref().is_some_and(|extra| extra.is_empty()) {
                state.extra = None;
            } else if let Some(extra) = state.extra.as_mut() {
                extra.listed = false; // in use again: listed when it next empties
            }
        }
    }

    /// Message bodies held in memory: those of queued messages not yet kept on disk.
    pub fn bodies_in_memory(&self) -> usize {
        self.fresh.len()
    }

    fn release_server_ack(&mut self, id: u64, now_ms: u64) {
        if let Some((sender, seq, timestamp_ms)) = self.awaiting_keep.remove(&id) {
            let accepted = ShardMessage::Accepted {
                sender,
                seq,
                id,
                timestamp_ms,
            };
            self.send_home(sender, accepted, now_ms);
        }
    }

    fn remove_item(&mut self, user: UserId, id: u64, kind: ReceiptKind) -> Option<Entry> {
        let state = self.users.get_mut(&user)?;
        let queue = &mut state.extra.as_mut()?.queue;
        let position = queue
            .items
            .iter()
            .position(|item| item.acked_by(id, kind))?;
        let item = queue.items.remove(position)?;
        let body_bytes = item.body_bytes();
        if position < queue.inflight {
            queue.inflight -= 1;
            queue.inflight_bytes -= body_bytes;
        }
        queue.queued_bytes -= body_bytes;
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.queued_bytes -= body_bytes;
        if item.is_message() {
            self.fresh.remove(&id);
        }
        Some(item)
    }

    fn client_ack(&mut self, user: UserId, id: u64, kind: ReceiptKind, now_ms: u64) {
        // Acks come in delivery order, so the item is almost always at the front.
        let Some(item) = self.remove_item(user, id, kind) else {
            self.counters.acks_unmatched += 1;
            return;
        };
        self.actions.push_back(Action::Forget { user, id, kind });
        self.push_queued(user);
        if item.is_message() {
            let from = item.peer;
            self.counters.messages_acked += 1;
            // The device has it: the server's responsibility is met even if the disk is not.
            self.release_server_ack(id, now_ms);
            let receipt = ShardMessage::Receipt {
                to: from,
                id,
                kind: ReceiptKind::Delivered,
                by: user,
                timestamp_ms: now_ms,
            };
            self.send_home(from, receipt, now_ms);
        }
    }

    fn client_subscribe(&mut self, user: UserId, conn: ConnRef, target: u64, now_ms: u64) {
        let Some(target) = UserId::new(target) else {
            return self.error_to(
                conn,
                ErrorCode::BadUserId,
                "Subscribe names an invalid user id",
                0,
            );
        };
        let state = self
            .users
            .get_mut(&user)
            .expect("subscribing user is online here");
        if !state.subscriptions().contains(&target) {
            if state.subscriptions().len() >= self.limits.subscriptions_max {
                return self.error_to(conn, ErrorCode::Limit, "too many presence subscriptions", 0);
            }
            state.watch_mut().subscriptions.push(target);
        }
        self.send_home(
            target,
            ShardMessage::Subscribe {
                subscriber: user,
                target,
            },
            now_ms,
        );
    }

    /// At the target's home shard: record the watcher and tell it the current presence.
    fn add_subscriber(&mut self, subscriber: UserId, target: UserId, now_ms: u64) {
        let (online, last_seen_ms) = match self.users.get_mut(&target) {
            None => (false, 0), // never seen here: offline, no last-seen time
            Some(state) => {
                if !state.subscribers().contains(&subscriber) {
                    if state.subscribers().len() >= self.limits.subscribers_max {
                        let refusal = ShardMessage::Rejected {
                            sender: subscriber,
                            seq: 0,
                            code: ErrorCode::Limit,
                            reason: "that user has too many watchers",
                        };
                        return self.send_home(subscriber, refusal, now_ms);
                    }
                    state.watch_mut().subscribers.push(subscriber);
                }
                (state.conn().is_some(), state.last_seen_ms)
            }
        };
        self.presence_to(subscriber, target, online, last_seen_ms);
    }

    fn queue_receipt(
        &mut self,
        to: UserId,
        id: u64,
        kind: ReceiptKind,
        by: UserId,
        timestamp_ms: u64,
    ) {
        let Some(state) = self.users.get_mut(&to) else {
            self.counters.receipts_dropped += 1;
            return;
        };
        // Receipts carry no body; they are bounded by twice the message limit so a flood of
        // them cannot grow a queue without bound. Past it they are dropped and counted.
        if state.queue_len() >= 2 * self.limits.queue_messages_max {
            self.counters.receipts_dropped += 1;
            return;
        }
        let item = Queued::Receipt {
            id,
            kind,
            by,
            timestamp_ms,
        };
        state.queue_mut().push(Entry::of(&item));
        self.actions.push_back(Action::Keep { user: to, item });
        self.counters.receipts_queued += 1;
        self.push_queued(to);
    }

    /// Pushes queued items to the user's connection, up to the inflight limits.
    fn push_queued(&mut self, user: UserId) {
        let Some(state) = self.users.get_mut(&user) else {
            return;
        };
        let Some(conn) = state.conn() else { return };
        let Some(queue) = state.extra.as_mut().map(|extra| &mut extra.queue) else {
            return;
        };
        while queue.inflight < self.limits.inflight_max && queue.inflight < queue.items.len() {
            let entry = queue.items[queue.inflight];
            if queue.inflight > 0
                && queue.inflight_bytes + entry.body_bytes() > self.limits.inflight_bytes_max
            {
                break;
            }
            queue.inflight += 1;
            queue.inflight_bytes += entry.body_bytes();
            let action = if !entry.is_message() {
                Action::Send {
                    conn,
                    stanza: Stanza::of(Kind::Receipt(Receipt {
                        id: entry.id,
                        kind: entry.kind as i32,
                        by: entry.peer.get(),
                        timestamp_ms: entry.timestamp_ms,
                    })),
                }
            } else if let Some(body) = self.fresh.get(&entry.id) {
                Action::Send {
                    conn,
                    stanza: Stanza::deliver(entry.peer, entry.id, entry.timestamp_ms, body.clone()),
                }
            } else {
                Action::DeliverKept {
                    conn,
                    user,
                    from: entry.peer,
                    id: entry.id,
                    timestamp_ms: entry.timestamp_ms,
                }
            };
            self.actions.push_back(action);
        }
    }

    fn presence_to(&mut self, subscriber: UserId, about: UserId, online: bool, last_seen_ms: u64) {
        let message = ShardMessage::Presence {
            to: subscriber,
            about,
            online,
            last_seen_ms,
        };
        self.send_home(subscriber, message, last_seen_ms);
    }

    /// Hands `message` to `user`'s home shard: handled here if that is this shard.
    fn send_home(&mut self, user: UserId, message: ShardMessage, now_ms: u64) {
        let shard = home_shard(user, self.shards);
        if shard == self.shard {
            self.handle_shard_message(message, now_ms);
        } else {
            self.actions.push_back(Action::Forward { shard, message });
        }
    }

    fn error_to(&mut self, conn: ConnRef, code: ErrorCode, reason: &str, seq: u32) {
        self.actions.push_back(Action::Send {
            conn,
            stanza: Stanza::error(code, reason, seq),
        });
    }

    fn conn_of(&self, user: UserId) -> Option<ConnRef> {
        self.users.get(&user).and_then(User::conn)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        let counter_mask = (1u64 << ID_COUNTER_BITS) - 1;
        let shard_bits = u64::from(self.shard) << ID_COUNTER_BITS;
        self.next_id = shard_bits | ((id + 1) & counter_mask);
        id
    }
}

impl User {
    fn new(key: &[u8; KEY_BYTES]) -> Self {
        Self {
            key_fingerprint: key_fingerprint(key),
            conn: NO_CONN,
            last_seen_ms: 0,
            extra: None,
        }
    }

    fn conn(&self) -> Option<ConnRef> {
        (self.conn != NO_CONN).then_some(self.conn)
    }

    /// Sets the connection; returns the one it replaces.
    fn replace_conn(&mut self, conn: Option<ConnRef>) -> Option<ConnRef> {
        let old = self.conn();
        self.conn = conn.unwrap_or(NO_CONN);
        old
    }

    fn queue(&self) -> Option<&Queue> {
        self.extra.as_ref().map(|extra| &extra.queue)
    }

    fn queue_len(&self) -> usize {
        self.queue().map_or(0, |queue| queue.items.len())
    }

    fn queued_bytes(&self) -> usize {
        self.queue().map_or(0, |queue| queue.queued_bytes)
    }

    fn queue_mut(&mut self) -> &mut Queue {
        &mut self.extra.get_or_insert_with(Box::default).queue
    }

    /// A new connection: nothing is pushed to it yet.
    fn restart_pushes(&mut self) {
        if let Some(extra) = self.extra.as_mut() {
            extra.queue.inflight = 0;
            extra.queue.inflight_bytes = 0;
        }
    }

    fn subscribers(&self) -> &[UserId] {
        self.extra
            .as_ref()
            .map_or(&[][..], |extra| &extra.watch.subscribers)
    }

    fn subscriptions(&self) -> &[UserId] {
        self.extra
            .as_ref()
            .map_or(&[][..], |extra| &extra.watch.subscriptions)
    }

    fn watch_mut(&mut self) -> &mut Watch {
        &mut self.extra.get_or_insert_with(Box::default).watch
    }

    /// True once, when the queue and the presence lists have all become empty: the caller
    /// lists the user for [`Router::release_empty`]. Freeing at once would allocate the box
    /// again with the user's next message.
    fn newly_empty(&mut self) -> bool {
        match self.extra.as_mut() {
            Some(extra) if !extra.listed && extra.is_empty() => {
                extra.listed = true;
                true
            }
            _ => false,
        }
    }

    fn unsubscribe_from(&mut self, target: UserId) {
        if let Some(extra) = self.extra.as_mut() {
            extra
                .watch
                .subscriptions
                .retain(|watched| *watched != target);
        }
    }

    fn remove_subscriber(&mut self, subscriber: UserId) {
        if let Some(extra) = self.extra.as_mut() {
            extra
                .watch
                .subscribers
                .retain(|watcher| *watcher != subscriber);
        }
    }
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.queue.items.is_empty()
            && self.watch.subscribers.is_empty()
            && self.watch.subscriptions.is_empty()
    }
}

impl Queue {
    fn push(&mut self, entry: Entry) {
        self.queued_bytes += entry.body_bytes();
        self.items.push_back(entry);
    }
}

#[cfg(test)]
mod tests;
