use std::collections::VecDeque;

use foldhash::{HashMap, HashSet};

use bytes::Bytes;
use hop_protocol::keys::KEY_BYTES;
use hop_protocol::wire::{
    device_change, group_change, receipt_ack_id, DeviceChange, Devices, ErrorCode, GoAwayReason,
    GroupChange, GroupEvent, GroupInfo, Kind, MessageRef, Pong, Presence, PresenceSettings,
    Receipt, ReceiptKind, Send, ServerAck, Stanza, UserRef, Visibility, ALIASES_MAX,
    BODY_BYTES_MAX, CONTACTS_MAX, GROUP_MEMBERS_MAX, GROUP_NAME_BYTES_MAX,
};
use hop_protocol::UserId;
use siphasher::sip::SipHasher13;

use crate::quota::{Rate, SenderQuotas, Spend};
use crate::unkept::{Unkept, NO_KEEP};
use crate::{ConnRef, ShardId};

/// The home shard of a user: where its connection, presence and queue live.
pub fn home_shard(user: UserId, shards: u16) -> ShardId {
    assert!(shards > 0, "at least one shard");
    // User ids are hash-derived, but a multiplicative mix keeps the spread even for ids that
    // are not (tests, hand-picked ids).
    let mixed = user.high().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    (mixed % u64::from(shards)) as ShardId
}

/// Bounds on what one shard keeps. Every queue is bounded; nothing grows without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages waiting for one user's device.
    pub queue_messages_max: usize,
    /// Receipts waiting for one user's device: counted apart from messages, so that receipts
    /// can never fill the room a user's incoming messages need.
    pub queue_receipts_max: usize,
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
    /// Companion devices one account may have besides its primary.
    pub companions_max: usize,
    /// Members one group may have (at most `GROUP_MEMBERS_MAX`).
    pub group_members_max: usize,
    /// Groups one account may be a member of.
    pub groups_max: usize,
    /// Messages one device may send (each Send counts, resends too).
    pub sender_messages: Rate,
    /// Read receipts one device may send.
    pub sender_reads: Rate,
    /// The most of one recipient's queue (of `queue_messages_max` and of `queue_bytes_max`)
    /// one sender's messages may take, in percent: past it, its messages to that recipient
    /// are refused with `QUEUE_FULL` while others' are taken. 100: no share.
    pub queue_sender_percent: u8,
    /// The most of a shard's queue bytes (`shard_queue_bytes_max`) one sender's messages (its
    /// group messages' copies included) may take, in percent. 100: no share.
    pub shard_queue_sender_percent: u8,
    /// Account-clock seconds (`hop_store::seen`: they count while hopd runs) after which an
    /// account none of whose devices was seen expires, with its queue: its binding, devices
    /// and presence setting go. 0: accounts never expire.
    pub account_expiry_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_messages_max: 10_000,
            queue_receipts_max: 10_000,
            queue_bytes_max: 16 * 1024 * 1024,
            shard_queue_bytes_max: 1024 * 1024 * 1024,
            inflight_max: 256,
            inflight_bytes_max: 1024 * 1024,
            subscriptions_max: 1024,
            subscribers_max: 10_000,
            companions_max: 4,
            group_members_max: GROUP_MEMBERS_MAX,
            groups_max: 1024,
            sender_messages: Rate {
                per_second: 100,
                burst: 1_000,
            },
            sender_reads: Rate {
                per_second: 1_000,
                burst: 10_000,
            },
            queue_sender_percent: 25,
            shard_queue_sender_percent: 10,
            account_expiry_s: 0,
        }
    }
}

impl Limits {
    /// Whether a message of `body_bytes` finds no room: its recipient's queue holds `messages`
    /// messages and `queue_bytes` bytes, its shard's queues `shard_bytes`.
    fn queue_full(
        &self,
        messages: usize,
        queue_bytes: usize,
        shard_bytes: usize,
        body_bytes: usize,
    ) -> bool {
        messages >= self.queue_messages_max
            || queue_bytes + body_bytes > self.queue_bytes_max
            || shard_bytes + body_bytes > self.shard_queue_bytes_max
    }
}

/// The server's secret keys for the ids and proofs it makes. Derived from the server's static
/// key, so every shard and every restart makes the same ones.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Keys the server message id: SipHash-1-3 of (sender, recipient, outbox, seq).
    pub message_ids: [u8; 16],
    /// Keys a Deliver's proof: SipHash-1-3 of (recipient, sender, message id).
    pub read_proofs: [u8; 16],
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

impl Secrets {
    /// The secrets of the server whose static private key this is.
    pub fn derive(server_private_key: &[u8; KEY_BYTES]) -> Self {
        Self {
            message_ids: derive_key(b"hop message id key v2", server_private_key),
            read_proofs: derive_key(b"hop read proof key v2", server_private_key),
        }
    }
}

fn derive_key(context: &[u8], secret: &[u8; KEY_BYTES]) -> [u8; 16] {
    use blake2::{Blake2s256, Digest};
    let mut hasher = Blake2s256::new();
    hasher.update(context);
    hasher.update(secret);
    let mut key = [0u8; 16];
    key.copy_from_slice(&hasher.finalize()[..16]);
    key
}

/// Who may see a user's presence. The default, [`Visibility::Everyone`] with no contacts, is
/// what a user who never set it has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Privacy {
    pub visibility: Visibility,
    /// Sorted, without duplicates; at most `CONTACTS_MAX`. Only read under
    /// [`Visibility::Contacts`].
    pub contacts: Vec<UserId>,
}

impl Privacy {
    /// Does this user show its presence to `watcher`?
    pub fn shows_to(&self, watcher: UserId) -> bool {
        match self.visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => self.contacts.binary_search(&watcher).is_ok(),
            Visibility::Nobody => false,
        }
    }

    fn is_default(&self) -> bool {
        self.visibility == Visibility::Everyone && self.contacts.is_empty()
    }
}

/// A message on its way from the sender's home shard to the recipient's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The sending account: what the recipient sees, and where replies are routed.
    pub from: UserId,
    /// The sending device (the account itself, or one of its companions): whose connection
    /// `conn` is.
    pub device: UserId,
    pub to: UserId,
    /// The sender's connection: the only one that hears the ServerAck or the refusal.
    pub conn: ConnRef,
    /// The sender's id of the message.
    pub message: MessageRef,
    /// The client marked it as sent before: look for the original before queueing it.
    pub resend: bool,
    pub timestamp_ms: u64,
    pub body: Bytes,
}

/// What a member's copy of a group message carries besides the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCopy {
    pub group: UserId,
    /// A membership change made by the server (the body is the encoded `GroupEvent`), not a
    /// member's message.
    pub event: bool,
    /// The message's id, as the group's home shard named it: every member's copy has this
    /// one id, whichever shard (or node, whose id keys differ) queues it.
    pub id: u64,
}

/// A second tick that rides with the ServerAck's [`ShardMessage::Accepted`]: the recipient's
/// device `by` acked the message at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub by: UserId,
    pub at_ms: u64,
}

/// A group change a member asked for, on its way to the group's home shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRequest {
    /// The requesting account, and the connection (of one of its devices) that hears the
    /// answer.
    pub account: UserId,
    pub conn: ConnRef,
    pub op: group_change::Op,
    pub group: UserId,
    /// Valid ids, without duplicates.
    pub members: Vec<UserId>,
    pub name: String,
    pub admin: bool,
}

/// A group as kept on disk: a whole snapshot after each change ([`Action::PersistGroup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub group: UserId,
    /// One more at each change.
    pub version: u64,
    pub name: String,
    /// In the order they joined, `true` for an admin. Empty: the group ended.
    pub members: Vec<(UserId, bool)>,
}

/// Work one shard's router hands to another.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardMessage {
    /// A message for a user of the receiving shard.
    Route(Envelope),
    /// A member's copy of a group message or event, made at the group's home shard, for the
    /// member (`to`) of the receiving shard; replies go to the group's home shard. Apart from
    /// `Route` and boxed, so that a 1:1 message's mail does not carry its size.
    RouteCopy(Box<(Envelope, GroupCopy)>),
    /// The recipient's shard took `message` of `sender`: send the ServerAck on `conn`, if it is
    /// still the sender's connection (else drop it: the client sends again, and a resend gets
    /// the same ack).
    Accepted {
        sender: UserId,
        conn: ConnRef,
        message: MessageRef,
        id: u64,
        timestamp_ms: u64,
        /// From a member's shard to a group's (for a member's copy): the device copies queued
        /// there.
        copies: u16,
        /// The recipient's device acked the message before its ServerAck left (a 1:1 message
        /// sent by the account's own device): the sender's home folds this second tick into
        /// the ServerAck, if the connection asked for it, or else queues it as a DELIVERED
        /// receipt. `None`: the Receipt, if any, comes apart.
        delivered: Option<Delivered>,
    },
    /// The recipient's shard refused `message` of `sender` (`None`: a subscription): send the
    /// Error on `conn`, if it is still the sender's connection.
    Rejected {
        sender: UserId,
        conn: ConnRef,
        message: Option<MessageRef>,
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
        conn: ConnRef,
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
    /// A member's shard refused its copy of group message `id` (queue full, not a user here):
    /// for the group's home shard, which names the member in the sender's ServerAck.
    CopyRefused {
        group: UserId,
        id: u64,
        member: UserId,
    },
    /// A group change, for the group's home shard.
    Group(Box<GroupRequest>),
    /// For `member`'s home shard: may it join `group` (is it in fewer than `groups_max`
    /// groups)? If so its place is taken now; answered with `Joined`.
    Join {
        group: UserId,
        member: UserId,
    },
    /// For `group`'s home shard: `member`'s answer to `Join`.
    Joined {
        group: UserId,
        member: UserId,
        admitted: bool,
    },
    /// For `member`'s home shard: it left a group (or did not join it after all).
    Left {
        member: UserId,
    },
    /// The answer to a request of `account`'s connection `conn`: sent if that connection is
    /// still one of the account's devices'.
    Answer {
        account: UserId,
        conn: ConnRef,
        stanza: Box<Stanza>,
    },
    /// For the replica node of `user`'s queue: keep a copy of a message its home node queued,
    /// and answer with `Replicated` once it is durable. Boxed: rarer than `Route`, and larger.
    Replica(Box<Replica>),
    /// For `user`'s home node: the replica node's answer to `Replica`: the copy is durable
    /// there (`kept`), or was refused.
    Replicated {
        user: UserId,
        id: u64,
        /// The home's keep number, from the `Replica`.
        keep: u32,
        kept: bool,
    },
    /// For the replica node of `user`'s queue: message `id` left the queue at its home (acked
    /// or refused), so its copy may go.
    ReplicaForget {
        user: UserId,
        id: u64,
    },
    /// For `user`'s new home node: a message of its queue from the node that served it until
    /// the members changed (`Replica::keep` unused): queued unless one of its id is.
    HandBack(Box<Replica>),
}

/// A copy of a queued message for the replica node of its queue's owner
/// ([`ShardMessage::Replica`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The queue's owner: an account, or a group member for a group's copy.
    pub user: UserId,
    /// The home's keep number for the message, handed back in `Replicated`.
    pub keep: u32,
    /// A [`Queued::Message`] or [`Queued::Group`].
    pub item: Queued,
}

/// What the shard loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Queue `stanza` on a local connection.
    Send { conn: ConnRef, stanza: Stanza },
    /// Push message `id` of `user`'s queue to a local connection as a `Deliver` with this
    /// `proof`. Its body is on disk only (the router lets go of a body once it is kept): the
    /// shard loop reads it from the store, or, if it cannot be read back, calls
    /// [`Router::handle_unreadable`].
    DeliverKept {
        conn: ConnRef,
        user: UserId,
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        proof: u64,
        /// For a sent copy: its recipient (`from` is then the account itself).
        sent_to: Option<UserId>,
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
    /// In a cluster: hand a message to `user`'s home node, which hands it to `user`'s home
    /// shard there. Boxed: a mail to another node is encoded for its link anyway, and an
    /// `Action` stays within its size.
    ToNode {
        user: UserId,
        message: Box<ShardMessage>,
    },
    /// In a cluster: hand a message to the replica node of `user` (the node placement ranks
    /// next after `user`'s home, this node), which hands it to `user`'s home shard there. If
    /// it cannot leave, the shard loop gives it back with [`Router::handle_unroutable`].
    ToReplica {
        user: UserId,
        message: Box<ShardMessage>,
    },
    /// A user connected for the first time: its key, to keep across restarts.
    PersistBinding { user: UserId, key: [u8; KEY_BYTES] },
    /// `user`'s account expired at account-clock time `seconds`: its binding ends, on disk
    /// too.
    Unbind { user: UserId, seconds: u32 },
    /// `device` was seen at this account-clock time: to keep for account expiry.
    PersistSeen { device: UserId, seconds: u32 },
    /// A user changed who may see its presence: to keep across restarts (the latest wins).
    PersistPrivacy { user: UserId, privacy: Privacy },
    /// Send kept message `id` of `user`'s queue, its body and group read from the store, to
    /// `to`: the user's new home node ([`ShardMessage::HandBack`]) or its replica node
    /// ([`ShardMessage::Replica`] numbered [`NO_KEEP`]). One it cannot read is left out.
    SendKept {
        user: UserId,
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        to: SendTo,
    },
    /// Keep this item of `user`'s queue on disk. Once it is durable the shard loop calls
    /// [`Router::handle_kept`] with `keep`; if it cannot be kept,
    /// [`Router::handle_keep_failed`].
    Keep {
        user: UserId,
        item: Queued,
        /// The router's number for the item until it is kept, to give back.
        keep: u32,
    },
    /// The primary's connection `conn` asks to link `device` to `account`: claim the device in
    /// the server-wide directory, keep the link on disk, and answer with
    /// [`Router::handle_link_result`].
    LinkDevice {
        account: UserId,
        device: UserId,
        conn: ConnRef,
    },
    /// `device` no longer belongs to `account`: keep that on disk, and refuse its connections.
    UnlinkDevice { account: UserId, device: UserId },
    /// A group homed here changed: keep its new state on disk.
    PersistGroup(Box<GroupSnapshot>),
    /// `user`'s device acked item (`id`, `kind`), `id` being the item's ack id
    /// ([`Queued::ack_id`]): it may leave the disk.
    Forget {
        user: UserId,
        id: u64,
        kind: ReceiptKind,
        /// The number of the item's [`Action::Keep`].
        keep: u32,
    },
}

// Every mail between shards and every action of the message path is one of these: what a
// rare case (a group's copy, a sent copy) carries more is boxed, not inline.
const _: () = assert!(std::mem::size_of::<ShardMessage>() <= 120);
const _: () = assert!(std::mem::size_of::<Action>() <= 128);

/// A stanza the client may not send; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// Event counts of one router, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages_accepted: u64,
    pub messages_rejected: u64,
    pub messages_acked: u64,
    /// Sends of a message that was still queued (a resend after a lost ServerAck): answered
    /// with the original's ack, not queued twice.
    pub messages_deduplicated: u64,
    /// ServerAcks and refusals whose connection had gone: dropped, not sent to a newer one.
    pub replies_dropped: u64,
    pub receipts_queued: u64,
    /// Receipts dropped at the receipt quota or for a user with no queue here.
    pub receipts_dropped: u64,
    /// Receipts dropped because the same receipt was already queued.
    pub receipts_duplicate: u64,
    /// Reads whose proof did not match: not a message delivered to the reader.
    pub reads_refused: u64,
    /// Sends and Reads refused because their device was over its rate.
    pub rate_limited: u64,
    /// Messages refused because their sender held its share of the recipient's queue or of
    /// the shard's (also counted in `messages_rejected`).
    pub shares_refused: u64,
    /// Watch requests answered "offline" because the target does not show its presence to the
    /// watcher (or does not exist: the two answer alike).
    pub watches_hidden: u64,
    pub acks_unmatched: u64,
    pub presence_sent: u64,
    /// Mails addressed to another node of the cluster ([`Action::ToNode`]).
    pub mails_to_nodes: u64,
    /// Of those, mails that could not reach their node ([`Router::handle_unroutable`]).
    pub mails_unroutable: u64,
    /// Copies of other nodes' messages kept here, as their users' replica node.
    pub replicas_kept: u64,
    /// Of the copies other nodes sent, those refused here (the queue was full).
    pub replicas_refused: u64,
    /// Messages another node handed back to this one, their users' new home, and queued.
    pub handed_back: u64,
    /// Of the messages handed back, those not queued: the user's queue here was full.
    pub handed_back_dropped: u64,
    /// Messages refused to their senders because the replica node did not keep their copy
    /// (refused there, unreachable, or not confirmed within [`REPLICA_PATIENCE_MS`]).
    pub replicas_missing: u64,
    pub items_expired: u64,
    /// Users made from their queued items at start because their binding was not on disk
    /// (written again at their next connection).
    pub users_restored_from_queue: u64,
    /// Kept messages whose body could not be read back from disk (dropped from the queue).
    pub items_unreadable: u64,
    /// Copies of a message for another device of an account (a companion's copy of a message
    /// to the account, or a sent copy) not queued: that device's queue was full.
    pub copies_dropped: u64,
    /// Messages sent to groups homed here, and membership changes made.
    pub group_messages: u64,
    pub group_changes: u64,
    /// Members' copies of group messages and events their shards refused (queue full, not
    /// a user of this server).
    pub group_copies_refused: u64,
    /// Group fan-outs given up after waiting (a member's shard restarted meanwhile).
    pub fanouts_abandoned: u64,
    /// Accounts that expired (`Limits::account_expiry_s`), and their devices.
    pub accounts_expired: u64,
    pub devices_expired: u64,
}

/// One user as an operator sees it. All zero and `known: false` for a user this shard does not
/// know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserReport {
    pub known: bool,
    pub online: bool,
    /// When the user went offline (Unix-epoch milliseconds); 0 while online or never seen.
    pub last_seen_ms: u64,
    pub queued_messages: usize,
    pub queued_receipts: usize,
    /// Body bytes of the queued messages.
    pub queued_bytes: usize,
    /// Queued items pushed to the current connection and not yet acked.
    pub inflight: usize,
    pub watchers: usize,
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
    /// A copy of a message that another device of the queue's account sent to `to`
    /// (sent-sync), so that every device shows the whole conversation.
    Sent {
        to: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
    },
    /// A member's copy of a message `from` another member of `group`, or (`event`) of a
    /// change of the group's membership that member `from` made, its body the encoded
    /// `GroupEvent`.
    Group {
        from: UserId,
        group: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
        event: bool,
    },
}

impl Queued {
    /// A message `from` a user, or with `group` (the group, and whether the body is a
    /// membership event) a member's copy of a group message.
    pub fn received(
        from: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
        group: Option<(UserId, bool)>,
    ) -> Self {
        match group {
            Some((group, event)) => Self::Group {
                from,
                group,
                id,
                timestamp_ms,
                body,
                event,
            },
            None => Self::Message {
                from,
                id,
                timestamp_ms,
                body,
            },
        }
    }

    /// The sender, body and group (for a group copy) of a message or group copy; `None` for
    /// a receipt or a sent copy.
    fn message_parts(&self) -> Option<(UserId, Bytes, Option<UserId>)> {
        match self {
            Self::Message { from, body, .. } => Some((*from, body.clone(), None)),
            Self::Group {
                from, body, group, ..
            } => Some((*from, body.clone(), Some(*group))),
            Self::Receipt { .. } | Self::Sent { .. } => None,
        }
    }

    /// The server id of the message (for a receipt: of the message it is about).
    pub fn id(&self) -> u64 {
        match self {
            Self::Message { id, .. }
            | Self::Receipt { id, .. }
            | Self::Sent { id, .. }
            | Self::Group { id, .. } => *id,
        }
    }

    /// The id a device's Ack names for this item: a message's id, or a receipt's ack id
    /// ([`receipt_ack_id`]), which tells apart the receipts of one message by who made them.
    pub fn ack_id(&self) -> u64 {
        match self {
            Self::Message { id, .. } | Self::Sent { id, .. } | Self::Group { id, .. } => *id,
            Self::Receipt { id, by, .. } => receipt_ack_id(*id, *by),
        }
    }

    /// The kind a device's Ack names for this item.
    pub fn ack_kind(&self) -> ReceiptKind {
        match self {
            Self::Message { .. } | Self::Sent { .. } | Self::Group { .. } => {
                ReceiptKind::Unspecified
            }
            Self::Receipt { kind, .. } => *kind,
        }
    }
}

/// An item of a user's queue as the router keeps it: what acks it, whom it names and how big
/// its body is, never the body itself. A message's body lives in [`Router`]'s `unkept` records
/// only until it is kept on disk; after that the store has it and memory does not grow with
/// the bytes queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// The message's server id (for a receipt: of the message it is about).
    id: u64,
    timestamp_ms: u64,
    /// A message's sender, who sent a receipt, or a sent copy's recipient.
    peer: UserId,
    body_bytes: u16,
    /// A sent copy ([`SENT_COPY`]), a group copy ([`GROUP_COPY`]), a group event
    /// ([`GROUP_EVENT`]).
    flags: u8,
    /// `Unspecified` for a message, else the receipt's kind (its protobuf number): what the
    /// device's Ack names.
    kind: u8,
    /// The number of its [`Action::Keep`] ([`NO_KEEP`] for an item queued before this
    /// process started). For a message the disk has not taken yet it names its record in
    /// [`Router::unkept`], where its body is; once it is kept, nothing.
    keep: u32,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 40);
const _: () = assert!(BODY_BYTES_MAX <= u16::MAX as usize);
/// `Entry::flags` of a sent copy.
const SENT_COPY: u8 = 1;
/// `Entry::flags` of a member's copy of a group message or event.
const GROUP_COPY: u8 = 2;
/// With [`GROUP_COPY`]: a group event.
const GROUP_EVENT: u8 = 4;
/// A copy went to the replica node ([`ShardMessage::Replica`]): when the item leaves, so must
/// that copy ([`ShardMessage::ReplicaForget`]).
const REPLICATED: u8 = 8;
/// Kept here as a copy of another node's item (its user's home was elsewhere when it came) or
/// handed back already: not handed back when the user's home is elsewhere
/// ([`Router::hand_back`]), unless this node claimed the queue as its user's home since
/// ([`Router::claim_queue`]).
const COPY: u8 = 16;

/// One of this home's own messages whose copy on the user's replica node is to be made again
/// (the replica node changed, or this process restarted and cannot tell which copies were
/// made): sent by [`Router::copy_again`].
const UNCOPIED: u8 = 32;

/// Where [`Router::hand_back`] and [`Router::copy_again`] send a user's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendTo {
    /// The user's home node, another node now ([`ShardMessage::HandBack`]).
    NewHome,
    /// The user's replica node, as its home ([`ShardMessage::Replica`]).
    Replica,
}

/// A body's length as an [`Entry`] keeps it. Bodies from clients are at most
/// `BODY_BYTES_MAX`; one read back from disk that is larger counts as the largest.
fn body_length(body: &Bytes) -> u16 {
    debug_assert!(body.len() <= usize::from(u16::MAX), "a body fits its entry");
    u16::try_from(body.len()).unwrap_or(u16::MAX)
}

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
                body_bytes: body_length(body),
                flags: 0,
                kind: ReceiptKind::Unspecified as u8,
                keep: NO_KEEP,
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
                flags: 0,
                kind: *kind as u8,
                keep: NO_KEEP,
            },
            Queued::Sent {
                to,
                id,
                timestamp_ms,
                body,
            } => Self {
                id: *id,
                timestamp_ms: *timestamp_ms,
                peer: *to,
                body_bytes: body_length(body),
                flags: SENT_COPY,
                kind: ReceiptKind::Unspecified as u8,
                keep: NO_KEEP,
            },
            Queued::Group {
                from,
                id,
                timestamp_ms,
                body,
                event,
                ..
            } => Self {
                id: *id,
                timestamp_ms: *timestamp_ms,
                peer: *from,
                body_bytes: body_length(body),
                flags: GROUP_COPY | if *event { GROUP_EVENT } else { 0 },
                kind: ReceiptKind::Unspecified as u8,
                keep: NO_KEEP,
            },
        }
    }

    /// A message some sender put in this queue (a group's copy included), counted in that
    /// sender's share; receipts and the account's own sent copies are not.
    fn counts_for_sender(&self) -> bool {
        self.is_message() && !self.is_sent_copy()
    }

    /// A copy of a message the account sent, not one it received.
    fn is_sent_copy(&self) -> bool {
        self.flags & SENT_COPY != 0
    }

    fn is_message(&self) -> bool {
        self.kind == ReceiptKind::Unspecified as u8
    }

    /// `Unspecified` for a message, else the receipt's kind.
    fn kind(&self) -> ReceiptKind {
        ReceiptKind::try_from(i32::from(self.kind)).unwrap_or(ReceiptKind::Unspecified)
    }

    fn body_bytes(&self) -> usize {
        usize::from(self.body_bytes)
    }

    fn is_group_event(&self) -> bool {
        self.flags & GROUP_EVENT != 0
    }

    /// The id a device's Ack names for this item (see [`Queued::ack_id`]).
    fn ack_id(&self) -> u64 {
        if self.is_message() {
            self.id
        } else {
            receipt_ack_id(self.id, self.peer)
        }
    }

    /// Does an Ack of (`ack_id`, `kind`) name this item?
    fn acked_by(&self, ack_id: u64, ack_kind: ReceiptKind) -> bool {
        self.kind == ack_kind as u8 && self.ack_id() == ack_id
    }
}

/// A device's session as its router holds it, taken out to be carried on by another process
/// (an upgrade that keeps the connections): what was pushed to the connection and not acked,
/// whom it watches, and what it declared for its Sends. Its queue is on disk, so it is not
/// here; neither are its rates, which start again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub user: UserId,
    /// The queued items pushed to the connection and not acked, in the order they went.
    pub pushed: Vec<PushedItem>,
    pub subscriptions: Vec<UserId>,
    /// The connection's `Outbox` (0: none declared).
    pub outbox: u64,
    /// The aliases it bound, index `alias - 1`.
    pub aliases: Vec<Option<UserId>>,
    /// Its `Outbox` asked for the second tick in the ServerAck.
    pub delivered_in_ack: bool,
}

/// A queued item pushed to a connection: what names it in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushedItem {
    /// The message's server id (for a receipt: of the message it is about).
    pub id: u64,
    /// `Unspecified` for a message, else the receipt's kind.
    pub kind: ReceiptKind,
    /// The message's sender, the receipt's author, or a sent copy's recipient.
    pub peer: UserId,
}

/// What a shard knows of one of its users: 32 bytes, most users having nothing queued and no
/// watchers. The queue, the presence lists and the sending state exist only while they hold
/// something (freed by [`Router::release_empty`] at the first tick they stay empty, not at
/// once: a chatting user would otherwise allocate them again for every message).
#[derive(Debug)]
struct User {
    /// The current connection, or `NO_CONN` while offline (a sentinel keeps this 8 bytes).
    conn: ConnRef,
    /// When the user went offline; 0 while online or never seen.
    last_seen_ms: u64,
    extra: Option<Box<Extra>>,
    /// The user's key is on disk (false for a user made from its queued items at start).
    bound: bool,
    /// When the device was last seen, as kept on disk: account-clock seconds, at most one
    /// grain ([`Router::seen_grain_s`]) behind; 0 until known.
    seen_s: u32,
}

/// `User::conn` of a user who is offline. The shard's handles never take this value.
const NO_CONN: ConnRef = ConnRef(u64::MAX);

const _: () = assert!(std::mem::size_of::<User>() <= 32);

/// A user's queue, presence lists and sending state, while any of them holds something.
#[derive(Debug, Default)]
struct Extra {
    queue: Queue,
    watch: Watch,
    sending: Sending,
    /// Who may see this user's presence; `None` for the default (everyone).
    privacy: Option<Box<Privacy>>,
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
    /// Receipts among `items` (the rest are messages): each kind has its own quota.
    receipts: usize,
    /// Messages and body bytes of each sender among `items` (`Entry::counts_for_sender`).
    senders: HashMap<UserId, Share>,
}

/// What one sender's messages take of a queue.
#[derive(Debug, Default, Clone, Copy)]
struct Share {
    messages: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Watch {
    /// Who watches this user (on any shard).
    subscribers: Vec<UserId>,
    /// Whom this user watches; only while online.
    subscriptions: Vec<UserId>,
}

/// What the current connection declared for its Sends: its outbox and the aliases it bound.
/// Reset when the connection ends or is replaced.
#[derive(Debug, Default)]
struct Sending {
    /// 0 until the connection sends an `Outbox`.
    outbox: u64,
    /// Index `alias - 1`; at most `ALIASES_MAX`.
    aliases: Vec<Option<UserId>>,
    /// The `Outbox` asked for the second tick of a 1:1 message in its ServerAck.
    delivered_in_ack: bool,
}

impl Sending {
    fn is_empty(&self) -> bool {
        self.outbox == 0 && self.aliases.is_empty()
    }
}

/// A queued message not yet on disk. One map entry for both, since both come at accept and
/// both go at the commit: half the map work of two maps.
#[derive(Debug)]
struct Pending {
    /// Its body, until the store has it.
    body: Bytes,
    /// Who waits for its ServerAck; `None` once the recipient's device acked it.
    waiter: Option<Waiter>,
    /// A member's copy of a group message: the group, which its Deliver names.
    group: Option<UserId>,
    /// What the record still waits for: [`AWAIT_DISK`], and in a cluster [`AWAIT_REPLICA`];
    /// and [`COPY_FOR_HOME`].
    awaiting: u8,
    /// With [`AWAIT_REPLICA`]: when it was queued, wall-clock seconds modulo 2¹⁶ (a copy
    /// the replica node has not confirmed within [`REPLICA_PATIENCE_MS`] is refused).
    since_s: u16,
    /// With [`AWAIT_REPLICA`]: the replica node its copy went to ([`Locality::replica`]).
    /// With [`COPY_FOR_HOME`], for a copy kept here for another node whose user this is
    /// ([`ShardMessage::Replica`]): that node's keep number, to answer with once the copy is
    /// durable. (One field: a copy kept for another node is not copied again.)
    replica: u32,
}

// A record per message not yet durable: the replica fields fit the padding of the rest.
const _: () = assert!(std::mem::size_of::<Pending>() <= 128);

impl Pending {
    /// The record of a message that waits only for this node's disk.
    fn kept_here(body: Bytes, waiter: Option<Waiter>, group: Option<UserId>) -> Self {
        Self {
            body,
            waiter,
            group,
            awaiting: AWAIT_DISK,
            since_s: 0,
            replica: NO_KEEP,
        }
    }

    /// For a copy kept here for another node's user: that node's keep number for it.
    fn copy_for(&self) -> u32 {
        if self.awaiting & COPY_FOR_HOME != 0 {
            self.replica
        } else {
            NO_KEEP
        }
    }
}

/// Wall-clock seconds modulo 2¹⁶, for [`Pending::since_s`].
fn seconds_u16(now_ms: u64) -> u16 {
    (now_ms / 1_000) as u16
}

/// [`Pending::awaiting`]: this node's disk has not taken the message yet.
const AWAIT_DISK: u8 = 1;
/// [`Pending::awaiting`]: the replica node has not confirmed its copy yet.
const AWAIT_REPLICA: u8 = 2;
/// [`Pending::awaiting`]: not a wait but a mark: a copy kept here for another node, whose keep
/// number [`Pending::replica`] is.
const COPY_FOR_HOME: u8 = 4;
/// How long a message waits for its replica node's confirmation before it is refused to its
/// sender (who sends it again). A backstop: a link delivers every mail while its node is a
/// member, and a change of the members refuses what waits at once
/// ([`Router::handle_members_changed`]); only an answer the replica node had to drop (its
/// outbox for this node at its bound) is waited for this long.
pub const REPLICA_PATIENCE_MS: u64 = 60_000;

/// Who waits for a message's ServerAck: the connection that sent it last.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    /// The sending device.
    sender: UserId,
    /// Whose home the ServerAck goes to: the sending account's (where the device's connection
    /// lives), or for a member's copy of a group message the group's.
    reply_to: UserId,
    conn: ConnRef,
    message: MessageRef,
    timestamp_ms: u64,
    /// For a member's copy of a group message: the device copies queued for the member (its
    /// primary's and its companions'), for the group's count of copies.
    copies: u16,
}

/// A group homed on this shard.
#[derive(Debug, Clone)]
struct Group {
    name: String,
    version: u64,
    /// In the order they joined, `true` for an admin. Never empty: the last member leaving
    /// ends the group.
    members: Vec<(UserId, bool)>,
}

impl Group {
    fn is_member(&self, account: UserId) -> bool {
        self.members.iter().any(|(member, _)| *member == account)
    }

    fn is_admin(&self, account: UserId) -> bool {
        self.members
            .iter()
            .any(|(member, admin)| *member == account && *admin)
    }

    fn accounts(&self) -> Vec<UserId> {
        self.members.iter().map(|(member, _)| *member).collect()
    }

    /// A group keeps an admin while it has members: the oldest member takes the role.
    fn keep_an_admin(&mut self) {
        if !self.members.iter().any(|(_, admin)| *admin) {
            if let Some(first) = self.members.first_mut() {
                first.1 = true;
            }
        }
    }

    fn info(&self, group: UserId) -> Stanza {
        Stanza::of(Kind::GroupInfo(GroupInfo {
            group: Some(group.into()),
            name: self.name.clone(),
            members: self.members.iter().map(|(m, _)| (*m).into()).collect(),
            admins: self
                .members
                .iter()
                .filter(|(_, admin)| *admin)
                .map(|(m, _)| (*m).into())
                .collect(),
        }))
    }
}

/// A group message on its way to the members: its ServerAck waits until every member's shard
/// answered (queued, or refused).
#[derive(Debug)]
struct Fanout {
    waiter: Waiter,
    /// When the copies left (wall clock): a fan-out whose answers never all come (a member's
    /// shard restarted) is given up ([`FANOUT_PATIENCE_MS`]).
    started_ms: u64,
    /// Member shards yet to answer.
    outstanding: u32,
    members: u16,
    copies: u16,
    /// Members whose shard refused their copy.
    missed: Vec<UserId>,
}

/// `ConnRef` of the replies a group's home shard awaits from its members' shards: never a
/// connection's.
const FANOUT_CONN: ConnRef = ConnRef(u64::MAX - 1);
/// A resend of a group message whose fan-out has waited this long starts it again (the
/// members' shards answer a copy they hold at once); a fan-out that waits 12 times as long
/// with no resend is dropped ([`Router::expire_fanouts`]).
const FANOUT_PATIENCE_MS: u64 = 5_000;

/// In a cluster: which accounts and groups live on this node. Everything else is addressed
/// to its home node ([`Action::ToNode`]). A single hopd has none, and every user is here.
pub trait Locality: std::fmt::Debug + std::marker::Send {
    /// `user` (an account or a group) lives on this node now.
    fn is_here(&self, user: UserId) -> bool;

    /// The replica node of `user`, who lives on this node: the node that keeps copies of its
    /// queue, named by a number stable across changes of the members (from its placement
    /// hash; two nodes sharing one is as likely as 2⁻³²);
    /// `None` without one (a cluster of one). Each message queued here for a user with a
    /// replica node waits for its copy there before its ServerAck.
    fn replica(&self, _user: UserId) -> Option<u32> {
        None
    }
}

/// Why a message was refused whose copy the replica node did not keep.
const UNREPLICATED: &str =
    "the message could not be copied to a second node of the cluster; try again";

/// Why a message or watch request for a user of another node was refused.
const UNROUTABLE: &str =
    "the recipient lives on another node of the cluster, which this node cannot reach now; try again later";

/// One shard's routing state. See the crate docs for the call order.
#[derive(Debug)]
pub struct Router {
    shard: ShardId,
    shards: u16,
    limits: Limits,
    /// In a cluster, which users live on this node; `None` for a single hopd.
    locality: Option<Box<dyn Locality>>,
    /// SipHash keyed with `Secrets::message_ids`.
    message_ids: Keyed,
    /// SipHash keyed with `Secrets::read_proofs`.
    read_proofs: Keyed,
    users: HashMap<UserId, User>,
    queued_bytes: usize,
    /// Items in every user's queue here.
    queued_items: usize,
    /// The companion devices of the accounts homed here, by device: its account. A companion
    /// lives on its account's home shard, as a user of its own (connection, queue).
    companions: HashMap<UserId, UserId>,
    /// The same links by account: its companions, in the order they were added.
    devices: HashMap<UserId, Vec<UserId>>,
    /// Actions for the shard loop, oldest first.
    actions: Vec<Action>,
    counters: Counters,
    /// Queued messages the disk has not taken yet, by keep number (their queue entries and
    /// keep actions carry it): the body, so that an online recipient gets it without a read,
    /// and who waits for the ServerAck (until the disk or the recipient's device takes
    /// responsibility). Bounded by what one commit interval brings in: a record leaves when
    /// its message is kept, acked or refused.
    unkept: Unkept<Pending>,
    /// Users whose queue and presence lists became empty since the last
    /// [`Router::release_empty`]; each at most once.
    emptied: Vec<UserId>,
    /// The groups homed here.
    groups: HashMap<UserId, Group>,
    /// Group messages whose members' shards have not all answered, by (group, id).
    fanouts: HashMap<(UserId, u64), Fanout>,
    /// The groups each account homed here is a member of, for `groups_max` (with the places
    /// taken by joins still under way).
    memberships: HashMap<UserId, u16>,
    /// Creates and adds waiting for their new members' shards to admit them, by group: one at
    /// a time per group.
    joins: HashMap<UserId, Joining>,
    /// The shard's mail to other shards is backed up: groups take no new message.
    fanouts_paused: bool,
    /// Only keys already bound may connect: the server takes no new accounts.
    registration_closed: bool,
    /// The buckets of the devices that sent lately (`Limits::sender_messages`, `sender_reads`).
    quotas: SenderQuotas,
    /// What each sender's messages take of this shard's queues.
    shares: ShardShares,
    /// The account clock, seconds (`hop_store::seen`): set by the shard loop.
    clock_s: u32,
}

/// A create or add whose new members' home shards are asked whether each may join.
#[derive(Debug)]
struct Joining {
    request: GroupRequest,
    /// Shards yet to answer.
    waiting: usize,
    /// Members whose place is taken.
    admitted: Vec<UserId>,
    refused: usize,
}

/// Receipts already queued for a user that a new receipt is compared with, newest first: a
/// repeated Read finds its twin among the latest items; an older twin is not worth a scan.
const RECEIPT_TWIN_SCAN_MAX: usize = 64;

impl Router {
    pub fn new(shard: ShardId, shards: u16, limits: Limits, secrets: Secrets) -> Self {
        assert!(shards > 0, "at least one shard");
        assert!(shard < shards, "shard index out of range");
        assert!(limits.inflight_max > 0, "inflight_max must be positive");
        Self {
            shard,
            shards,
            limits,
            locality: None,
            message_ids: Keyed(SipHasher13::new_with_key(&secrets.message_ids)),
            read_proofs: Keyed(SipHasher13::new_with_key(&secrets.read_proofs)),
            users: HashMap::default(),
            queued_bytes: 0,
            queued_items: 0,
            companions: HashMap::default(),
            devices: HashMap::default(),
            actions: Vec::new(),
            counters: Counters::default(),
            unkept: Unkept::default(),
            emptied: Vec::new(),
            groups: HashMap::default(),
            fanouts: HashMap::default(),
            memberships: HashMap::default(),
            joins: HashMap::default(),
            fanouts_paused: false,
            registration_closed: false,
            quotas: SenderQuotas::default(),
            shares: ShardShares::default(),
            clock_s: 0,
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Items (messages and receipts) queued on this shard, and their body bytes.
    pub fn queued(&self) -> (usize, usize) {
        (self.queued_items, self.queued_bytes)
    }

    /// Whether `user` (a device) has a connection on this shard now: what is queued for it
    /// was pushed to it, or will be as its window allows, and its Ack may come soon.
    pub fn is_connected(&self, user: UserId) -> bool {
        self.users
            .get(&user)
            .is_some_and(|state| state.conn().is_some())
    }

    /// Users known on this shard.
    pub fn users_known(&self) -> usize {
        self.users.len()
    }

    /// What an operator may see of one user of this shard (`hop admin user`).
    pub fn user_report(&self, user: UserId) -> UserReport {
        let Some(state) = self.users.get(&user) else {
            return UserReport::default();
        };
        UserReport {
            known: true,
            online: state.conn().is_some(),
            last_seen_ms: state.last_seen_ms,
            queued_messages: state.queue_len() - state.queued_receipts(),
            queued_receipts: state.queued_receipts(),
            queued_bytes: state.queued_bytes(),
            inflight: state.queue().map_or(0, |queue| queue.inflight),
            watchers: state.subscribers().len(),
        }
    }

    /// An operator closes `user`'s connection (`hop admin kick`): a GoAway `KICKED`, then the
    /// disconnect runs as for any other end. False if the user is not online here.
    pub fn handle_kick(&mut self, user: UserId) -> bool {
        let Some(conn) = self.conn_of(user) else {
            return false;
        };
        self.actions.push(Action::Close {
            conn,
            reason: GoAwayReason::Kicked,
            text: "closed by the server's operator",
        });
        true
    }

    /// The account `user` is a device of: its own id for a primary (or an account of one
    /// device), the primary's for a companion linked to an account homed here.
    /// True if `user`'s key is bound here (its account exists, or it is a linked device).
    pub fn is_bound(&self, user: UserId) -> bool {
        self.users.get(&user).is_some_and(|state| state.bound)
    }

    pub fn account_of(&self, user: UserId) -> UserId {
        self.companions.get(&user).copied().unwrap_or(user)
    }

    /// Restores a device link or unlink kept from an earlier run, in the order they were made.
    /// Links of accounts homed on other shards are ignored.
    pub fn restore_device_link(&mut self, account: UserId, device: UserId, linked: bool) {
        if home_shard(account, self.shards) != self.shard {
            return;
        }
        if linked {
            self.link(account, device);
        } else {
            self.unlink(account, device);
        }
    }

    /// The shard loop's answer to [`Action::LinkDevice`]: `linked` if the device was free and
    /// its link is recorded, false if it belongs to another account. The requesting connection
    /// gets the account's devices, or `DEVICE_TAKEN`.
    pub fn handle_link_result(
        &mut self,
        account: UserId,
        device: UserId,
        conn: ConnRef,
        linked: bool,
    ) {
        if !linked {
            return self.error_to(
                conn,
                ErrorCode::DeviceTaken,
                "that device belongs to another account",
                None,
            );
        }
        self.link(account, device);
        self.reply_devices(conn, account);
    }

    /// Restores a binding kept from an earlier run: `user`'s, a device of `account` (itself
    /// for a primary or an account of one device). A device lives on its account's home shard;
    /// bindings of other shards are ignored.
    pub fn restore_binding(&mut self, user: UserId, account: UserId) {
        if home_shard(account, self.shards) == self.shard {
            self.users.entry(user).or_insert_with(User::new).bound = true;
        }
    }

    /// Restores when a device of this shard was last seen, kept from an earlier run. Devices
    /// this shard does not know (another shard's, or unbound since) are ignored.
    pub fn restore_seen(&mut self, device: UserId, seconds: u32) {
        if let Some(state) = self.users.get_mut(&device) {
            state.seen_s = seconds;
        }
    }

    /// The account clock now, in seconds (`hop_store::seen`). Called by the shard loop as its
    /// clocks are read.
    pub fn set_account_clock(&mut self, seconds: u32) {
        self.clock_s = seconds;
    }

    /// `Limits::account_expiry_s`: 0 when accounts never expire.
    pub fn account_expiry_s(&self) -> u32 {
        self.limits.account_expiry_s
    }

    /// How far behind the clock a device's kept time may fall before it is written again:
    /// 1/16 of the expiry, at least a second. An account expires one grain after its expiry,
    /// so that none expires early.
    pub fn seen_grain_s(&self) -> u32 {
        (self.limits.account_expiry_s / 16).max(1)
    }

    /// Every device's kept time, for a rewrite of the shard's seen log.
    pub fn seen_times(&self) -> impl Iterator<Item = (UserId, u32)> + '_ {
        self.users
            .iter()
            .filter(|(_, state)| state.seen_s > 0)
            .map(|(user, state)| (*user, state.seen_s))
    }

    /// `device` is seen now: its time is kept once it is a grain old.
    /// With expiry off, only a device's first time is kept (once per device: it orders a new
    /// binding after an old unbinding at load, and gives expiry, if turned on, a start).
    fn seen_now(&mut self, device: UserId) {
        let expiry_on = self.limits.account_expiry_s > 0;
        let (now, grain) = (self.clock_s, self.seen_grain_s());
        let Some(state) = self.users.get_mut(&device) else {
            return;
        };
        if state.seen_s == 0 || (expiry_on && now.saturating_sub(state.seen_s) >= grain) {
            state.seen_s = now.max(1);
            self.actions.push(Action::PersistSeen {
                device,
                seconds: state.seen_s,
            });
        }
    }

    /// Expires the accounts of this shard none of whose devices was seen for
    /// `account_expiry_s` (and two grains): each device's queue is deleted, its binding and
    /// presence setting end, the account's companions are unlinked. Online devices, and
    /// devices whose time is not known yet (restored from the queue, or kept before expiry was
    /// on), get the clock's time. A walk over every user of the shard: the shard loop calls it
    /// at most every grain, and at least hourly. Returns the accounts expired.
    ///
    /// An expired account stays listed in its groups, as any member without an account is:
    /// its copies are refused, and its group admins see it named in the senders' ServerAcks.
    pub fn expire_accounts(&mut self) -> usize {
        let expiry = self.limits.account_expiry_s;
        if expiry == 0 {
            return 0;
        }
        let (now, grain) = (self.clock_s, self.seen_grain_s());
        // A kept time trails the last activity by less than two grains: a grain before it is
        // written again, and a sweep's interval (a grain) for an online device. A crash loses
        // the write of the time a disconnect would make; so an account goes two grains after
        // its expiry, never before.
        let idle_after = expiry.saturating_add(grain.saturating_mul(2));
        let mut refresh = Vec::new();
        let mut idle = HashSet::default();
        for (user, state) in &self.users {
            let age = now.saturating_sub(state.seen_s);
            if state.seen_s == 0 || (state.conn().is_some() && age >= grain) {
                refresh.push(*user);
            } else if state.conn().is_none() && age > idle_after {
                idle.insert(*user);
            }
        }
        for device in refresh {
            self.seen_now(device);
        }
        // An account goes with all its devices, once every one of them is idle (a companion
        // never seen here counts as idle); a companion never goes alone. In a cluster, only
        // accounts that live on this node: another node serves the rest now. An account with a
        // message not yet on disk waits for the next sweep: its sender waits for the ServerAck.
        let accounts: Vec<UserId> = idle
            .iter()
            .copied()
            .filter(|user| !self.companions.contains_key(user))
            .filter(|account| {
                self.devices.get(account).is_none_or(|list| {
                    list.iter()
                        .all(|device| idle.contains(device) || !self.users.contains_key(device))
                })
            })
            .filter(|account| {
                self.locality
                    .as_ref()
                    .is_none_or(|locality| locality.is_here(*account))
            })
            .filter(|account| !self.holds_unkept(*account))
            .collect();
        for account in &accounts {
            self.expire_account(*account);
        }
        accounts.len()
    }

    /// Does a device of `account` hold a message not yet on disk (one whose sender waits)?
    fn holds_unkept(&self, account: UserId) -> bool {
        let devices = self.devices.get(&account).map_or(&[][..], Vec::as_slice);
        devices.iter().chain([&account]).any(|device| {
            self.users
                .get(device)
                .and_then(User::queue)
                .is_some_and(|queue| {
                    queue
                        .items
                        .iter()
                        .any(|entry| self.unkept.get(entry.keep, *device, entry.id).is_some())
                })
        })
    }

    fn expire_account(&mut self, account: UserId) {
        let companions = self.devices.get(&account).cloned().unwrap_or_default();
        for device in &companions {
            self.unlink(account, *device);
            self.actions.push(Action::UnlinkDevice {
                account,
                device: *device,
            });
        }
        for device in companions.into_iter().chain([account]) {
            self.forget_device(device);
            let Some(state) = self.users.remove(&device) else {
                continue;
            };
            if !state.privacy().is_default() {
                self.actions.push(Action::PersistPrivacy {
                    user: device,
                    privacy: Privacy::default(),
                });
            }
            if state.bound {
                self.actions.push(Action::Unbind {
                    user: device,
                    seconds: self.clock_s,
                });
            }
            self.counters.devices_expired += 1;
        }
        self.counters.accounts_expired += 1;
    }

    /// Restores who may see a user's presence, kept from an earlier run (the latest setting of
    /// each user, in the order they were made). Users of other shards are ignored.
    pub fn restore_privacy(&mut self, user: UserId, mut privacy: Privacy) {
        if home_shard(user, self.shards) != self.shard {
            return;
        }
        privacy.contacts.sort_unstable();
        privacy.contacts.dedup();
        privacy.contacts.truncate(CONTACTS_MAX);
        let state = self.users.entry(user).or_insert_with(User::new);
        state.set_privacy(privacy);
    }

    /// Hands the actions due to the shard loop over in `batch` (which must be empty), oldest
    /// first; the router goes on with `batch`'s old buffer. Actions the loop's calls back
    /// into the router produce come with the next swap, so a loop that swaps until it gets
    /// none carries them out in order. Neither side allocates once both buffers are warm, and
    /// the loop reads each action where the router wrote it.
    #[inline]
    pub fn swap_actions(&mut self, batch: &mut Vec<Action>) {
        debug_assert!(batch.is_empty(), "the last batch is carried out");
        std::mem::swap(&mut self.actions, batch);
    }

    /// The actions due, oldest first: [`Router::swap_actions`] for callers without a buffer.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// The oldest action due, for callers that take one at a time (tests, tools). Each call
    /// moves the rest down: the shard loop uses [`Router::swap_actions`].
    pub fn poll_action(&mut self) -> Option<Action> {
        (!self.actions.is_empty()).then(|| self.actions.remove(0))
    }

    /// A connection authenticated as `user` (whose id the shard derived from `key`) arrived at
    /// its home shard. A connection the user already had is closed: the newer one wins.
    pub fn handle_connect(
        &mut self,
        user: UserId,
        key: &[u8; KEY_BYTES],
        conn: ConnRef,
        now_ms: u64,
    ) {
        assert_eq!(
            home_shard(self.account_of(user), self.shards),
            self.shard,
            "connection at the wrong shard"
        );
        assert_ne!(conn, NO_CONN, "a connection handle the router reserves");
        let account = self.account_of(user);
        let known = self.users.get(&user).is_some_and(|state| state.bound);
        if self.registration_closed && account == user && !known {
            self.actions.push(Action::Close {
                conn,
                reason: GoAwayReason::NotRegistered,
                text: "this server takes no new accounts; ask its operator",
            });
            return;
        }
        let account_was_online = account != user && self.account_online(account);
        let state = self.users.entry(user).or_insert_with(User::new);
        if !state.bound {
            state.bound = true;
            self.actions
                .push(Action::PersistBinding { user, key: *key });
        }
        let subscriptions = self.take_conn(user, conn);
        let subscribers = self.users[&user].subscribers().to_vec();
        self.seen_now(user);
        let state = self.users.get_mut(&user).expect("inserted above");
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.unsubscribe_all(user, subscriptions, now_ms);
        self.push_queued(user);
        for subscriber in subscribers {
            self.presence_to(subscriber, user, true, 0, now_ms);
        }
        // A companion coming online brings its account online, if no other device was.
        if account != user && !account_was_online {
            let watchers = self
                .users
                .get(&account)
                .map(|state| state.subscribers().to_vec())
                .unwrap_or_default();
            for subscriber in watchers {
                self.presence_to(subscriber, account, true, 0, now_ms);
            }
        }
    }

    /// `user`'s session, to carry it on in another process ([`Router::handle_resume`]);
    /// `None` if `user` is not online here. The shard must have stopped reading every
    /// connection, so that the session does not change after this.
    pub fn export_session(&self, user: UserId) -> Option<SessionState> {
        let state = self.users.get(&user)?;
        state.conn()?;
        let mut session = SessionState {
            user,
            pushed: Vec::new(),
            subscriptions: Vec::new(),
            outbox: 0,
            aliases: Vec::new(),
            delivered_in_ack: false,
        };
        if let Some(extra) = state.extra.as_deref() {
            session.pushed = (extra.queue.items.iter().take(extra.queue.inflight))
                .map(|entry| PushedItem {
                    id: entry.id,
                    kind: entry.kind(),
                    peer: entry.peer,
                })
                .collect();
            session.subscriptions = extra.watch.subscriptions.clone();
            session.outbox = extra.sending.outbox;
            session.aliases = extra.sending.aliases.clone();
            session.delivered_in_ack = extra.sending.delivered_in_ack;
        }
        Some(session)
    }

    /// Who watches each user homed here (watchers live in memory only): carried to another
    /// process with the sessions, for [`Router::restore_watchers`].
    pub fn watchers(&self) -> impl Iterator<Item = (UserId, &[UserId])> + '_ {
        self.users
            .iter()
            .map(|(user, state)| (*user, state.subscribers()))
            .filter(|(_, subscribers)| !subscribers.is_empty())
    }

    /// Puts back who watched `user` in the process the sessions came from. A user this shard
    /// does not know is skipped: it had no key on disk, so nobody could watch it.
    pub fn restore_watchers(&mut self, user: UserId, subscribers: Vec<UserId>) {
        let Some(state) = self.users.get_mut(&user) else {
            return;
        };
        let watch = state.watch_mut();
        for subscriber in subscribers {
            if !watch.subscribers.contains(&subscriber) {
                watch.subscribers.push(subscriber);
            }
        }
    }

    /// A session carried on from another process of this server on connection `conn`: the
    /// device is online as it was, silently (its watchers were told when it came online). The
    /// items pushed to it before go to the front of its queue as in flight, so that they are
    /// not pushed twice; what was not pushed yet is pushed now.
    pub fn handle_resume(&mut self, conn: ConnRef, session: SessionState, now_ms: u64) {
        let user = session.user;
        assert_eq!(
            home_shard(self.account_of(user), self.shards),
            self.shard,
            "session resumed at the wrong shard"
        );
        assert_ne!(conn, NO_CONN, "a connection handle the router reserves");
        // A user whose key is not on disk stays so: its binding is written at its next
        // connect, as for a user made from its queued items.
        let replaced_subscriptions = self.take_conn(user, conn);
        let state = self.users.get_mut(&user).expect("taken above");
        if !session.subscriptions.is_empty() {
            state.watch_mut().subscriptions = session.subscriptions;
        }
        if session.outbox != 0 || !session.aliases.is_empty() {
            state.extra_mut().sending = Sending {
                outbox: session.outbox,
                aliases: session.aliases,
                delivered_in_ack: session.delivered_in_ack,
            };
        }
        if let Some(queue) = state.extra.as_mut().map(|extra| &mut extra.queue) {
            let mut front = 0;
            for pushed in &session.pushed {
                let found = queue.items.iter().skip(front).position(|entry| {
                    entry.id == pushed.id
                        && entry.kind() == pushed.kind
                        && entry.peer == pushed.peer
                });
                let Some(at) = found else {
                    continue; // acked or expired meanwhile
                };
                let entry = queue.items.remove(front + at).expect("found above");
                queue.items.insert(front, entry);
                queue.inflight_bytes += entry.body_bytes();
                front += 1;
            }
            queue.inflight = front;
        }
        self.seen_now(user);
        let state = self.users.get_mut(&user).expect("inserted above");
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.unsubscribe_all(user, replaced_subscriptions, now_ms);
        self.push_queued(user);
    }

    /// `conn` becomes `user`'s connection, with nothing pushed to it yet. A connection it
    /// replaces is sent away (GoAway `REPLACED`) and its watches and declarations end with it:
    /// returns whom that one watched, to unsubscribe.
    fn take_conn(&mut self, user: UserId, conn: ConnRef) -> Vec<UserId> {
        let state = self.users.entry(user).or_insert_with(User::new);
        let mut ended = Vec::new();
        if let Some(old) = state.replace_conn(Some(conn)) {
            self.actions.push(Action::Close {
                conn: old,
                reason: GoAwayReason::Replaced,
                text: "the same user connected again",
            });
            ended = state.end_session();
        }
        state.last_seen_ms = 0;
        state.restart_pushes();
        ended
    }

    /// An account is online while any of its devices is.
    fn account_online(&self, account: UserId) -> bool {
        self.conn_of(account).is_some()
            || self
                .devices
                .get(&account)
                .is_some_and(|devices| devices.iter().any(|d| self.conn_of(*d).is_some()))
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
        self.seen_now(user);
        let state = self.users.get_mut(&user).expect("known above");
        let subscriptions = state.end_session();
        let subscribers = state.subscribers().to_vec();
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.unsubscribe_all(user, subscriptions, now_ms);
        // The account goes offline with its last device.
        let account = self.account_of(user);
        if self.account_online(account) {
            return;
        }
        let subscribers = if account == user {
            subscribers
        } else {
            let Some(state) = self.users.get_mut(&account) else {
                return;
            };
            state.last_seen_ms = now_ms.max(1);
            state.subscribers().to_vec()
        };
        for subscriber in subscribers {
            self.presence_to(subscriber, account, false, now_ms.max(1), now_ms);
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
            // The account exists (the shard redeems a token before the router hears of a
            // connection that needs one).
            Kind::Register(_) => {}
            Kind::Outbox(outbox) => {
                if outbox.id == 0 {
                    return Err(Violation("Outbox 0 is not a valid outbox".into()));
                }
                let state = self.users.get_mut(&user).expect("checked above");
                let sending = &mut state.extra_mut().sending;
                sending.outbox = outbox.id;
                sending.delivered_in_ack = outbox.delivered_in_ack;
            }
            Kind::Send(send) => self.client_send(user, conn, send, now_ms),
            Kind::Ack(ack) => {
                let kind = ReceiptKind::try_from(ack.kind).unwrap_or(ReceiptKind::Unspecified);
                self.client_ack(user, ack.id, kind, now_ms);
            }
            Kind::Read(read) => self.client_read(user, conn, read, now_ms),
            Kind::Subscribe(subscribe) => {
                self.client_subscribe(user, conn, subscribe.user.as_ref(), now_ms)
            }
            Kind::PresenceSettings(settings) => {
                self.client_privacy(user, conn, settings, now_ms);
            }
            Kind::Unsubscribe(unsubscribe) => {
                if let Some(target) = UserRef::user(unsubscribe.user.as_ref()) {
                    let state = self.users.get_mut(&user).expect("checked above");
                    state.unsubscribe_from(target);
                    if state.newly_empty() {
                        self.emptied.push(user);
                    }
                    self.unsubscribe_all(user, vec![target], now_ms);
                }
            }
            Kind::Ping(ping) => self.actions.push(Action::Send {
                conn,
                stanza: Stanza::of(Kind::Pong(Pong { nonce: ping.nonce })),
            }),
            Kind::Pong(_) => {}
            Kind::DeviceChange(change) => self.client_device_change(user, conn, change),
            Kind::GroupChange(change) => self.client_group_change(user, conn, change, now_ms),
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
            ShardMessage::Route(envelope) => self.accept(envelope, None, now_ms),
            ShardMessage::RouteCopy(copy) => {
                let (envelope, copy) = *copy;
                self.accept(envelope, Some(&copy), now_ms);
            }
            ShardMessage::Accepted {
                sender,
                conn,
                message,
                id,
                timestamp_ms,
                copies,
                delivered,
            } => {
                if conn == FANOUT_CONN {
                    return self.fanout_answered(sender, id, copies, None, now_ms);
                }
                let live = self.conn_of(sender) == Some(conn);
                // The second tick rides in the ServerAck only to a connection that asked for
                // it, of an account without companions (they need the Receipt too); else,
                // and if the ServerAck cannot leave, it is queued as a Receipt (after the
                // ServerAck), never lost.
                let folded = delivered.filter(|_| live && self.takes_delivered_in_ack(sender));
                if live {
                    self.actions.push(Action::Send {
                        conn,
                        stanza: Stanza::of(Kind::ServerAck(ServerAck {
                            seq: message.seq,
                            id,
                            timestamp_ms,
                            outbox: message.outbox,
                            delivered_ms: folded.map_or(0, |delivered| delivered.at_ms),
                            ..ServerAck::default()
                        })),
                    });
                } else {
                    self.counters.replies_dropped += 1;
                }
                if let (Some(delivered), None) = (delivered, folded) {
                    let (by, at_ms) = (delivered.by, delivered.at_ms);
                    self.receipt_for(sender, id, ReceiptKind::Delivered, by, at_ms);
                }
            }
            ShardMessage::Rejected {
                sender,
                conn,
                message,
                code,
                reason,
            } => self.reply(sender, conn, Stanza::error(code, reason, message)),
            ShardMessage::Receipt {
                to,
                id,
                kind,
                by,
                timestamp_ms,
            } => {
                self.receipt_for(to, id, kind, by, timestamp_ms);
            }
            ShardMessage::Subscribe {
                subscriber,
                conn,
                target,
            } => self.add_subscriber(subscriber, conn, target, now_ms),
            ShardMessage::Unsubscribe { subscriber, target } => {
                if let Some(state) = self.users.get_mut(&target) {
                    state.remove_subscriber(subscriber);
                    if state.newly_empty() {
                        self.emptied.push(target);
                    }
                }
            }
            ShardMessage::CopyRefused { group, id, member } => {
                self.counters.group_copies_refused += 1;
                self.fanout_answered(group, id, 0, Some(member), now_ms);
            }
            ShardMessage::Group(request) => self.group_request(*request, now_ms),
            ShardMessage::Join { group, member } => {
                let count = self.memberships.entry(member).or_insert(0);
                let admitted = usize::from(*count) < self.limits.groups_max;
                if admitted {
                    *count += 1;
                }
                let answer = ShardMessage::Joined {
                    group,
                    member,
                    admitted,
                };
                self.send_home(group, answer, now_ms);
            }
            ShardMessage::Joined {
                group,
                member,
                admitted,
            } => self.joined(group, member, admitted, now_ms),
            ShardMessage::Left { member } => {
                if let Some(count) = self.memberships.get_mut(&member) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.memberships.remove(&member);
                    }
                }
            }
            ShardMessage::Answer {
                account,
                conn,
                stanza,
            } => self.reply(account, conn, *stanza),
            ShardMessage::Replica(replica) => self.keep_replica(*replica, now_ms),
            ShardMessage::HandBack(replica) => self.take_handed_back(*replica),
            ShardMessage::Replicated {
                user,
                id,
                keep,
                kept,
            } => self.replicated(user, id, keep, kept, now_ms),
            ShardMessage::ReplicaForget { user, id } => {
                if let Some((entry, _)) = self.remove_item(user, id, ReceiptKind::Unspecified, None)
                {
                    self.actions.push(Action::Forget {
                        user,
                        id,
                        kind: ReceiptKind::Unspecified,
                        keep: entry.keep,
                    });
                }
            }
            ShardMessage::Presence {
                to,
                about,
                online,
                last_seen_ms,
            } => {
                // Reciprocity: a watcher that hides its own presence from `about` does not see
                // `about`'s last-seen time either.
                let Some(account) = self.users.get(&to) else {
                    return;
                };
                let last_seen_ms = if account.privacy().shows_to(about) {
                    last_seen_ms
                } else {
                    0
                };
                // Every device of the watching account that watches `about` is told.
                let watching: Vec<ConnRef> = self
                    .devices_of(to)
                    .filter_map(|device| {
                        let state = self.users.get(&device)?;
                        let conn = state.conn()?;
                        state.subscriptions().contains(&about).then_some(conn)
                    })
                    .collect();
                for conn in watching {
                    self.counters.presence_sent += 1;
                    self.actions.push(Action::Send {
                        conn,
                        stanza: Stanza::of(Kind::Presence(Presence {
                            user: Some(about.into()),
                            online,
                            last_seen_ms,
                        })),
                    });
                }
            }
        }
    }

    /// The queued item (`id`, `kind`) of `user`, kept by [`Action::Keep`] with number `keep`,
    /// is durable. For a message, the sender's ServerAck may leave, and the router lets go of
    /// the body: from now on the store has it and deliveries of it are
    /// [`Action::DeliverKept`].
    pub fn handle_kept(
        &mut self,
        user: UserId,
        id: u64,
        kind: ReceiptKind,
        keep: u32,
        now_ms: u64,
    ) {
        if kind != ReceiptKind::Unspecified {
            return;
        }
        let kept = self.unkept.settle(keep, user, id, |pending| {
            pending.awaiting &= !AWAIT_DISK;
            pending.awaiting & (AWAIT_DISK | AWAIT_REPLICA) == 0
        });
        if let Some(pending) = kept {
            self.fully_kept(user, id, pending, now_ms);
        }
    }

    /// Message `id` of `user`'s queue is durable wherever it had to be (here, and on the
    /// replica node), and its record `pending` left the ring: its ServerAck leaves, and a
    /// copy kept here for another node is confirmed to that node.
    fn fully_kept(&mut self, user: UserId, id: u64, pending: Pending, now_ms: u64) {
        self.answer_replica(user, id, pending.copy_for(), true, now_ms);
        if let Some(waiter) = pending.waiter {
            self.accepted(waiter, id, None, now_ms);
        }
    }

    /// For a copy kept here for `user`'s home node under its keep number `replica_of`
    /// ([`NO_KEEP`]: not such a copy): tells the home whether it is durable (`kept`) or was
    /// refused.
    fn answer_replica(&mut self, user: UserId, id: u64, replica_of: u32, kept: bool, now_ms: u64) {
        if replica_of != NO_KEEP {
            let answer = ShardMessage::Replicated {
                user,
                id,
                keep: replica_of,
                kept,
            };
            self.send_home(user, answer, now_ms);
        }
    }

    /// The replica node's answer for message `id` of `user`'s queue, numbered `keep`: its copy
    /// there is durable (`kept`), or was refused, and then so is the message.
    fn replicated(&mut self, user: UserId, id: u64, keep: u32, kept: bool, now_ms: u64) {
        let Some(pending) = self.unkept.get_mut(keep, user, id) else {
            return;
        };
        if pending.awaiting & AWAIT_REPLICA == 0 {
            return;
        }
        if !kept {
            return self.refuse_unreplicated(user, id, keep, false, now_ms);
        }
        pending.awaiting &= !AWAIT_REPLICA;
        if pending.awaiting & AWAIT_DISK == 0 {
            if let Some(pending) = self.unkept.take(keep, user, id) {
                self.fully_kept(user, id, pending, now_ms);
            }
        }
    }

    /// Message `id` of `user`'s queue, numbered `keep`, has no copy on the replica node (it
    /// was refused there, or not confirmed in time): it leaves the queue and this node's disk,
    /// and its sender gets an Error and sends it again. `unconfirmed`: the copy may still
    /// land there, so it is forgotten there too.
    fn refuse_unreplicated(
        &mut self,
        user: UserId,
        id: u64,
        keep: u32,
        unconfirmed: bool,
        now_ms: u64,
    ) {
        self.counters.replicas_missing += 1;
        let removed = self.remove_item(user, id, ReceiptKind::Unspecified, Some(keep));
        // Whatever the queue holds, the record goes: the ring must move past it.
        let pending = self.unkept.take(keep, user, id);
        let mut waiter = pending.and_then(|pending| pending.waiter);
        if let Some((entry, pending)) = removed {
            self.actions.push(Action::Forget {
                user,
                id,
                kind: ReceiptKind::Unspecified,
                keep,
            });
            if unconfirmed {
                self.forget_replica(user, &entry);
            }
            waiter = waiter.or(pending.and_then(|pending| pending.waiter));
            self.push_queued(user);
        }
        if let Some(waiter) = waiter {
            self.refuse_waiter(
                user,
                id,
                waiter,
                ErrorCode::Overloaded,
                UNREPLICATED,
                now_ms,
            );
        }
    }

    /// The replica node of `user`'s queue lets go of its copy of `entry`, if it may have one:
    /// one was sent, or (in a cluster) the item was kept by an earlier run, which may have.
    fn forget_replica(&mut self, user: UserId, entry: &Entry) {
        let restored =
            entry.keep == NO_KEEP && entry.counts_for_sender() && self.locality.is_some();
        if entry.flags & REPLICATED != 0 || restored {
            self.counters.mails_to_nodes += 1;
            self.actions.push(Action::ToReplica {
                user,
                message: Box::new(ShardMessage::ReplicaForget { user, id: entry.id }),
            });
        }
    }

    /// A copy of a message of `replica.user`'s queue, from that user's home node: kept here
    /// as an item of the user's queue (so that, if the home dies and the user moves here, the
    /// queue is here), and confirmed to the home once durable. Never delivered while the user
    /// lives on another node: its connections are sent there.
    fn keep_replica(&mut self, replica: Replica, now_ms: u64) {
        let Replica {
            user,
            keep: home_keep,
            item,
        } = replica;
        let id = item.id();
        // The mail codec makes no other than messages and group copies.
        let Some((from, body, group)) = item.message_parts() else {
            return;
        };
        // A link takes each mail once; a message the home queued twice (sent again unmarked)
        // has a copy here per item there, each forgotten with its own. A copy made again
        // (numbered NO_KEEP) is kept only if this node lacks one.
        let state = self.users.entry(user).or_insert_with(User::new);
        if home_keep == NO_KEEP && state.queued_message(id, from).is_some() {
            return;
        }
        let body_bytes = body.len();
        if self.limits.queue_full(
            state.queue_len() - state.queued_receipts(),
            state.queued_bytes(),
            self.queued_bytes,
            body_bytes,
        ) {
            self.counters.replicas_refused += 1;
            return self.answer_replica(user, id, home_keep, false, now_ms);
        }
        let mut entry = Entry::of(&item);
        entry.flags |= COPY;
        entry.keep = self.unkept.push(
            user,
            id,
            Pending {
                body,
                waiter: None,
                group,
                awaiting: AWAIT_DISK | COPY_FOR_HOME,
                since_s: 0,
                replica: home_keep,
            },
        );
        state.queue_mut().push(entry);
        self.shares.add(&entry);
        self.queued_bytes += body_bytes;
        self.queued_items += 1;
        self.counters.replicas_kept += 1;
        self.actions.push(Action::Keep {
            user,
            item,
            keep: entry.keep,
        });
        // The user is not seen here while its home lives: each copy counts as a sighting, so
        // that account expiry on this node does not take the queue it will serve from if the
        // home dies.
        self.seen_now(user);
    }

    /// The cluster's members changed: a message still waiting for its copy on a node that is
    /// no longer its recipient's replica (it left, and its link drops what it held; or another
    /// node ranks before it now) is refused to its sender, who sends it again, to the replica
    /// node of the new list. Walks the records not yet kept, once per change.
    ///
    /// `departed`: the replica nodes (by placement hash) that left the members since the last
    /// call, even if they are back (what they held for this node when they left is gone);
    /// `None` when unknown, and then every message waiting for its copy is refused.
    pub fn handle_members_changed(&mut self, now_ms: u64, departed: Option<&[u32]>) {
        let Some(locality) = self.locality.take() else {
            return;
        };
        self.refuse_uncopied(now_ms, |user, replica| {
            locality.replica(user) != Some(replica)
                || departed.is_none_or(|departed| departed.contains(&replica))
        });
        self.locality = Some(locality);
    }

    /// Refuses every message still waiting for its copy on the replica node: this process is
    /// handing its connections to another (a takeover), which will not hear the answers.
    pub fn refuse_all_uncopied(&mut self, now_ms: u64) {
        self.refuse_uncopied(now_ms, |_, _| true);
    }

    /// Refuses the messages waiting for their copy on a replica node (named by its number)
    /// that `refuse(user, replica)` picks.
    fn refuse_uncopied(&mut self, now_ms: u64, refuse: impl Fn(UserId, u32) -> bool) {
        let waiting: Vec<(u32, UserId, u64)> = self
            .unkept
            .iter()
            .filter(|(_, user, _, pending)| {
                pending.awaiting & AWAIT_REPLICA != 0 && refuse(*user, pending.replica)
            })
            .map(|(keep, user, id, _)| (keep, user, id))
            .collect();
        for (keep, user, id) in waiting {
            self.refuse_unreplicated(user, id, keep, true, now_ms);
        }
    }

    /// The users with items queued on this shard, for a walk when the members change.
    pub fn queued_users(&self) -> Vec<UserId> {
        self.users
            .iter()
            .filter(|(_, state)| state.queue_len() > 0)
            .map(|(user, _)| *user)
            .collect()
    }

    /// `user` lives on this node now: the copies its queue holds (kept for the node that was
    /// its home) are this node's own, to hand back if its home moves away again. With
    /// `copy_again` (its replica node changed, or this process restarted and cannot tell which
    /// copies were made) each of its messages is to be copied to the replica node again
    /// ([`Router::copy_again`]). Returns whether any of its messages is still to be copied
    /// (marked now, or at an earlier change and not sent yet).
    pub fn claim_queue(&mut self, user: UserId, copy_again: bool) -> bool {
        let mut uncopied = false;
        if let Some(extra) = self
            .users
            .get_mut(&user)
            .and_then(|state| state.extra.as_mut())
        {
            for entry in extra.queue.items.iter_mut() {
                entry.flags &= !COPY;
                if copy_again && entry.counts_for_sender() {
                    entry.flags |= UNCOPIED;
                }
                uncopied |= entry.flags & UNCOPIED != 0;
            }
        }
        uncopied
    }

    /// `user`'s home is another node (a node this one stood in for came back, or a new member
    /// took the user): each message of its queue this node took as the user's home goes to the
    /// new home
    /// ([`ShardMessage::HandBack`]; [`Action::SendKept`] for one whose body is on disk
    /// only), which queues those it lacks. This node keeps its own: if it is the user's
    /// replica node now, they are the copies the new home's messages would have here.
    /// Receipts and sent copies stay. Sends at most `most`; returns the messages sent, and
    /// whether more are left to send.
    pub fn hand_back(&mut self, user: UserId, now_ms: u64, most: usize) -> (usize, bool) {
        self.send_messages(user, now_ms, most, SendTo::NewHome)
    }

    /// Copies messages [`Router::claim_queue`] marked to `user`'s replica node, which keeps
    /// those it lacks ([`ShardMessage::Replica`] numbered [`NO_KEEP`]: no answer; the senders
    /// had their ServerAcks). Sends at most `most`; returns the messages sent, and whether
    /// more are left to send.
    pub fn copy_again(&mut self, user: UserId, now_ms: u64, most: usize) -> (usize, bool) {
        self.send_messages(user, now_ms, most, SendTo::Replica)
    }

    /// [`Router::hand_back`] and [`Router::copy_again`].
    fn send_messages(
        &mut self,
        user: UserId,
        now_ms: u64,
        most: usize,
        to: SendTo,
    ) -> (usize, bool) {
        let Some(queue) = self
            .users
            .get_mut(&user)
            .and_then(|state| state.extra.as_mut())
            .map(|extra| &mut extra.queue)
        else {
            return (0, false);
        };
        let mut entries = Vec::new();
        let mut more = false;
        for entry in queue.items.iter_mut() {
            let picked = entry.counts_for_sender()
                && match to {
                    SendTo::NewHome => entry.flags & COPY == 0,
                    SendTo::Replica => entry.flags & UNCOPIED != 0,
                };
            if !picked {
                continue;
            }
            if entries.len() == most {
                more = true;
                break;
            }
            entry.flags = match to {
                // Handed back once: from now on it is this node's copy of the new home's.
                SendTo::NewHome => entry.flags | COPY,
                // Its copy goes, and must go when the message leaves.
                SendTo::Replica => (entry.flags & !UNCOPIED) | REPLICATED,
            };
            entries.push(*entry);
        }
        for entry in &entries {
            let Some(pending) = self.unkept.get(entry.keep, user, entry.id) else {
                self.actions.push(Action::SendKept {
                    user,
                    from: entry.peer,
                    id: entry.id,
                    timestamp_ms: entry.timestamp_ms,
                    to,
                });
                continue;
            };
            let item = Queued::received(
                entry.peer,
                entry.id,
                entry.timestamp_ms,
                pending.body.clone(),
                pending.group.map(|group| (group, entry.is_group_event())),
            );
            let replica = Box::new(Replica {
                user,
                keep: NO_KEEP,
                item,
            });
            match to {
                SendTo::NewHome => {
                    self.send_home(user, ShardMessage::HandBack(replica), now_ms);
                }
                SendTo::Replica => {
                    self.counters.mails_to_nodes += 1;
                    self.actions.push(Action::ToReplica {
                        user,
                        message: Box::new(ShardMessage::Replica(replica)),
                    });
                }
            }
        }
        (entries.len(), more)
    }

    /// Message `id` of `user`'s queue, sent `to` by [`Router::hand_back`] or
    /// [`Router::copy_again`], did not leave (its link refused it, or the store could not read
    /// its body): it is to be sent again at the next change of members, as if never sent.
    pub fn unsent(&mut self, user: UserId, id: u64, to: SendTo) {
        if let Some(entry) = self
            .users
            .get_mut(&user)
            .and_then(|state| state.extra.as_mut())
            .and_then(|extra| {
                extra
                    .queue
                    .items
                    .iter_mut()
                    .find(|entry| entry.id == id && entry.counts_for_sender())
            })
        {
            match to {
                SendTo::NewHome => entry.flags &= !COPY,
                SendTo::Replica => entry.flags |= UNCOPIED,
            }
        }
    }

    /// A message of `replica.user`'s queue handed back by the node that served the user until
    /// the members changed: queued here, the user's home now, unless one of its id is (this
    /// node kept it before it went, or took it already). Its copy is on the node that handed
    /// it back, which is the user's replica node when this node came back to the members.
    fn take_handed_back(&mut self, replica: Replica) {
        let Replica { user, item, .. } = replica;
        let id = item.id();
        // The mail codec makes no other than messages and group copies.
        let Some((from, body, group)) = item.message_parts() else {
            return;
        };
        let state = self.users.entry(user).or_insert_with(User::new);
        if state.queued_message(id, from).is_some() {
            return;
        }
        let body_bytes = body.len();
        if self.limits.queue_full(
            state.queue_len() - state.queued_receipts(),
            state.queued_bytes(),
            self.queued_bytes,
            body_bytes,
        ) {
            self.counters.handed_back_dropped += 1;
            return;
        }
        let mut entry = Entry::of(&item);
        entry.flags |= REPLICATED;
        entry.keep = self
            .unkept
            .push(user, id, Pending::kept_here(body, None, group));
        state.queue_mut().push(entry);
        self.shares.add(&entry);
        self.queued_bytes += body_bytes;
        self.queued_items += 1;
        self.counters.handed_back += 1;
        // Its copy goes to this home's replica node, which keeps it unless it has it (the node
        // that handed it back is that replica node when placement made it the stand-in).
        let has_replica = self
            .locality
            .as_ref()
            .is_some_and(|locality| locality.replica(user).is_some());
        if has_replica {
            self.counters.mails_to_nodes += 1;
            self.actions.push(Action::ToReplica {
                user,
                message: Box::new(ShardMessage::Replica(Box::new(Replica {
                    user,
                    keep: NO_KEEP,
                    item: item.clone(),
                }))),
            });
        }
        self.actions.push(Action::Keep {
            user,
            item,
            keep: entry.keep,
        });
        self.push_queued(user);
    }

    /// Refuses messages whose copy the replica node has not confirmed within
    /// [`REPLICA_PATIENCE_MS`] (its link is down, or it is leaving): their senders get an
    /// Error and send them again. Called once per tick; looks only at the oldest records.
    pub fn expire_replicas(&mut self, now_ms: u64) {
        while let Some((keep, user, id, pending)) = self.unkept.front() {
            if pending.awaiting & AWAIT_REPLICA == 0
                || u64::from(seconds_u16(now_ms).wrapping_sub(pending.since_s)) * 1_000
                    < REPLICA_PATIENCE_MS
            {
                return;
            }
            self.refuse_unreplicated(user, id, keep, true, now_ms);
        }
    }

    /// A kept message of `user` could not be read back from disk (the store found it
    /// damaged and dropped it): it leaves the queue too, and is counted.
    pub fn handle_unreadable(&mut self, user: UserId, id: u64) {
        if let Some((entry, _)) = self.remove_item(user, id, ReceiptKind::Unspecified, None) {
            self.forget_replica(user, &entry);
            self.counters.items_unreadable += 1;
            self.push_queued(user);
        }
    }

    /// The item (`id`, `kind`) of `user`'s queue, kept by [`Action::Keep`] with number `keep`,
    /// could not be kept (quota, disk): it leaves the queue and, for a message, its sender gets
    /// an Error instead of a ServerAck. Another item with the same id (a resend queued again)
    /// stays.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_keep_failed(
        &mut self,
        user: UserId,
        id: u64,
        kind: ReceiptKind,
        keep: u32,
        code: ErrorCode,
        reason: &'static str,
        now_ms: u64,
    ) {
        let Some((entry, pending)) = self.remove_item(user, id, kind, Some(keep)) else {
            return;
        };
        self.forget_replica(user, &entry);
        let Some(pending) = pending else {
            return;
        };
        if pending.copy_for() != NO_KEEP {
            self.counters.replicas_refused += 1;
        }
        self.answer_replica(user, id, pending.copy_for(), false, now_ms);
        if let Some(waiter) = pending.waiter {
            self.refuse_waiter(user, id, waiter, code, reason, now_ms);
        }
    }

    /// The sender waiting for message `id` of `user`'s queue gets an Error (for a member's
    /// copy of a group message, the group's home hears that the member missed it).
    fn refuse_waiter(
        &mut self,
        user: UserId,
        id: u64,
        waiter: Waiter,
        code: ErrorCode,
        reason: &'static str,
        now_ms: u64,
    ) {
        self.counters.messages_rejected += 1;
        let refusal = if waiter.conn == FANOUT_CONN {
            ShardMessage::CopyRefused {
                group: waiter.sender,
                id,
                member: user,
            }
        } else {
            ShardMessage::Rejected {
                sender: waiter.sender,
                conn: waiter.conn,
                message: Some(waiter.message),
                code,
                reason,
            }
        };
        self.send_home(waiter.reply_to, refusal, now_ms);
    }

    /// The item (`id`, `kind`) of `user`'s queue expired on disk: it leaves the queue.
    pub fn handle_expired(&mut self, user: UserId, id: u64, kind: ReceiptKind) {
        self.remove_item(user, id, kind, None);
        self.counters.items_expired += 1;
    }

    /// Puts back an item kept from an earlier run (already durable). Only what acks and names
    /// it is kept here; a message's body stays on disk. A user whose binding did not reach the
    /// disk is made from its items: its key is written again when it next connects.
    pub fn restore_item(&mut self, user: UserId, item: &Queued) {
        debug_assert_eq!(home_shard(self.account_of(user), self.shards), self.shard);
        let state = self.users.entry(user).or_insert_with(|| {
            self.counters.users_restored_from_queue += 1;
            User::new()
        });
        // Whether it was a copy for another node is not on disk: it counts as this node's
        // own, and if its user lives elsewhere it is handed back there at the first change
        // of members (the home drops it if it has it; a copy of one the home delivered while
        // this node was down comes back to it, and its client drops it by its id).
        let entry = Entry::of(item);
        state.queue_mut().push(entry);
        self.shares.add(&entry);
        self.queued_bytes += entry.body_bytes();
        self.queued_items += 1;
    }

    /// Frees the queue and presence lists of the users whose lists have stayed empty since
    /// they emptied, so that an idle user costs only its 32 bytes. Called once per tick: a
    /// user who gets a message now and then keeps the box between them instead of
    /// allocating it again for every message.
    pub fn release_empty(&mut self, now_ms: u64) {
        self.quotas.sweep(self.sender_rates(), now_ms);
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
        self.unkept.len()
    }

    /// The server id of message `message` from `from` to `to`: the same for every copy, so
    /// that a resend is found in the queue and a recipient drops a second Deliver by
    /// (from, id). Keyed, so that no client can name another's messages.
    pub fn message_id(&self, from: UserId, to: UserId, message: MessageRef) -> u64 {
        let mut input = [0u8; 48];
        input[..16].copy_from_slice(&from.to_bytes());
        input[16..32].copy_from_slice(&to.to_bytes());
        input[32..40].copy_from_slice(&message.outbox.to_le_bytes());
        input[40..].copy_from_slice(&message.seq.to_le_bytes());
        self.message_ids.0.hash(&input).max(1)
    }

    fn client_send(&mut self, from: UserId, conn: ConnRef, send: Send, now_ms: u64) {
        let sending = &mut self
            .users
            .get_mut(&from)
            .expect("the sender is online here")
            .extra_mut()
            .sending;
        let message = MessageRef {
            outbox: sending.outbox,
            seq: send.seq,
        };
        if message.outbox == 0 {
            return self.error_to(
                conn,
                ErrorCode::BadStanza,
                "send an Outbox before the first Send on a connection",
                Some(message),
            );
        }
        if message.seq == 0 {
            return self.error_to(
                conn,
                ErrorCode::BadStanza,
                "a Send's seq starts at 1",
                Some(message),
            );
        }
        let to = match resolve_recipient(sending, &send) {
            Ok(to) => to,
            Err((code, reason)) => return self.error_to(conn, code, reason, Some(message)),
        };
        if send.body.len() > BODY_BYTES_MAX {
            return self.error_to(
                conn,
                ErrorCode::BadStanza,
                "message body exceeds the limit",
                Some(message),
            );
        }
        if let Err(wait_ms) = self.spend(from, Spend::Message, now_ms) {
            let reason = format!(
                "this device sends more than {} messages a second; try again in {wait_ms} ms",
                self.limits.sender_messages.per_second
            );
            return self.error_to(conn, ErrorCode::RateLimited, &reason, Some(message));
        }
        let account = self.account_of(from);
        let envelope = Envelope {
            from: account,
            device: from,
            to,
            conn,
            message,
            resend: send.resend,
            timestamp_ms: now_ms,
            body: send.body,
        };
        if account != from || self.devices.contains_key(&account) {
            self.copy_to_other_devices(&envelope);
        }
        self.send_home(to, ShardMessage::Route(envelope), now_ms);
    }

    /// At the recipient's home shard: take the message into the recipient's queue, answer a
    /// resend of a queued one with the original's ack, or refuse.
    fn accept(&mut self, envelope: Envelope, group: Option<&GroupCopy>, now_ms: u64) {
        // A member's copy of a group message carries the id its group's home gave it, so that
        // every copy has one id.
        let id = match group {
            None => self.message_id(envelope.from, envelope.to, envelope.message),
            Some(copy) => copy.id,
        };
        // Replies go where the sender's connection is, or for a group copy to the group's
        // home shard, which answers the sender once every member's shard answered.
        let reply_to = match group {
            None => envelope.from,
            Some(copy) => copy.group,
        };
        let reject = |code, reason| match group {
            Some(copy) => ShardMessage::CopyRefused {
                group: copy.group,
                id,
                member: envelope.to,
            },
            None => ShardMessage::Rejected {
                sender: envelope.device,
                conn: envelope.conn,
                message: Some(envelope.message),
                code,
                reason,
            },
        };
        // In a cluster, a message for a user another node is home to now (a mail routed by a
        // view older than this node's, or made before the members changed) is not queued
        // here: it would have no copy, nor a reader. Its sender sends it again.
        if self
            .locality
            .as_ref()
            .is_some_and(|locality| !locality.is_here(envelope.to))
        {
            self.counters.messages_rejected += 1;
            let message = reject(ErrorCode::Overloaded, UNROUTABLE);
            return self.send_home(reply_to, message, now_ms);
        }
        let Some(state) = self.users.get_mut(&envelope.to) else {
            if group.is_none() && self.groups.contains_key(&envelope.to) {
                return self.fan_out(envelope, now_ms);
            }
            self.counters.messages_rejected += 1;
            let message = reject(
                ErrorCode::UnknownUser,
                "no such user or group on this server",
            );
            return self.send_home(reply_to, message, now_ms);
        };
        // Only a Send the client marked as a resend is looked for: a first send cannot have
        // an original, and the common path stays free of the lookup. The lookup scans the
        // recipient's queue (at most `queue_messages_max` items), once per resend. A resend
        // not marked as one is queued again under the same id, which the recipient drops.
        if envelope.resend {
            if let Some(original) = state.queued_message(id, envelope.from) {
                // An original kept by an earlier run may never have reached the replica node
                // (its Replica mail was still in the link when that run ended): in a cluster
                // it is queued again and copied, and the recipient drops the twin by its id.
                let unconfirmed = original.keep == NO_KEEP && self.locality.is_some();
                if !unconfirmed {
                    return self.answer_resend(envelope, group, id, original, now_ms);
                }
            }
        }
        let body_bytes = envelope.body.len();
        let messages = state.queue_len() - state.queued_receipts();
        if self.limits.queue_full(
            messages,
            state.queued_bytes(),
            self.queued_bytes,
            body_bytes,
        ) {
            self.counters.messages_rejected += 1;
            let message = reject(
                ErrorCode::QueueFull,
                "the recipient's queue is full; message not taken",
            );
            return self.send_home(reply_to, message, now_ms);
        }
        // One sender may not take more than its share of the recipient's queue, nor of the
        // shard's: others can still reach the recipient, and the shard's other users.
        let limits = &self.limits;
        let share = state
            .queue()
            .map_or_else(Share::default, |queue| queue.share_of(envelope.from));
        if share.messages >= share_of(limits.queue_messages_max, limits.queue_sender_percent)
            || share.bytes + body_bytes
                > share_of(limits.queue_bytes_max, limits.queue_sender_percent)
            || self.shares.of(envelope.from) + body_bytes
                > share_of(
                    limits.shard_queue_bytes_max,
                    limits.shard_queue_sender_percent,
                )
        {
            self.counters.messages_rejected += 1;
            self.counters.shares_refused += 1;
            let message = reject(ErrorCode::QueueFull, SHARE_TAKEN);
            return self.send_home(reply_to, message, now_ms);
        }
        let item = match group {
            None => Queued::Message {
                from: envelope.from,
                id,
                timestamp_ms: envelope.timestamp_ms,
                body: envelope.body.clone(),
            },
            Some(copy) => Queued::Group {
                from: envelope.from,
                group: copy.group,
                id,
                timestamp_ms: envelope.timestamp_ms,
                body: envelope.body.clone(),
                event: copy.event,
            },
        };
        // The ServerAck waits until the message is on disk or acked by the device.
        let waiter = Waiter {
            sender: envelope.device,
            reply_to,
            conn: envelope.conn,
            message: envelope.message,
            timestamp_ms: envelope.timestamp_ms,
            copies: 1,
        };
        // In a cluster the ServerAck also waits for the copy on the replica node, so that
        // the message outlives this node.
        let replica_node = self
            .locality
            .as_ref()
            .and_then(|locality| locality.replica(envelope.to));
        let replicate = replica_node.is_some();
        let mut entry = Entry::of(&item);
        if replicate {
            entry.flags |= REPLICATED;
        }
        entry.keep = self.unkept.push(
            envelope.to,
            id,
            Pending {
                body: envelope.body,
                waiter: Some(waiter),
                group: group.map(|copy| copy.group),
                awaiting: if replicate {
                    AWAIT_DISK | AWAIT_REPLICA
                } else {
                    AWAIT_DISK
                },
                since_s: seconds_u16(now_ms),
                replica: replica_node.unwrap_or(NO_KEEP),
            },
        );
        let keep = entry.keep;
        state.queue_mut().push(entry);
        self.shares.add(&entry);
        self.queued_bytes += body_bytes;
        self.queued_items += 1;
        self.counters.messages_accepted += 1;
        // An account with companions gets a copy per device; one without costs a lookup.
        let copy = self
            .devices
            .contains_key(&envelope.to)
            .then(|| item.clone());
        if replicate {
            self.counters.mails_to_nodes += 1;
            let replica = Replica {
                user: envelope.to,
                keep,
                item: item.clone(),
            };
            self.actions.push(Action::ToReplica {
                user: envelope.to,
                message: Box::new(ShardMessage::Replica(Box::new(replica))),
            });
        }
        self.actions.push(Action::Keep {
            user: envelope.to,
            item,
            keep,
        });
        self.push_queued(envelope.to);
        if let Some(item) = copy {
            let copies = self.copy_to_companions(envelope.to, &item);
            let waiter = self
                .unkept
                .get_mut(keep, envelope.to, id)
                .and_then(|pending| pending.waiter.as_mut());
            if let Some(waiter) = waiter {
                waiter.copies += copies;
            }
        }
    }

    /// Queues a copy of an account's new message for each of its companion devices (on this
    /// shard, the account's home): each device acks its own copy. The ServerAck follows the
    /// primary's copy. A companion whose queue is full misses the copy (counted).
    fn copy_to_companions(&mut self, account: UserId, item: &Queued) -> u16 {
        let (body, group) = match item {
            Queued::Message { body, .. } => (body, None),
            Queued::Group { body, group, .. } => (body, Some(*group)),
            _ => return 0,
        };
        // Taken out and put back: no copy of the list on the message path.
        let Some(companions) = self.devices.get_mut(&account).map(std::mem::take) else {
            return 0;
        };
        let mut copies = 0;
        let id = item.id();
        for &device in &companions {
            let state = self.users.entry(device).or_insert_with(User::new);
            let mut entry = Entry::of(item);
            let full = state.queue_len() - state.queued_receipts()
                >= self.limits.queue_messages_max
                || state.queued_bytes() + body.len() > self.limits.queue_bytes_max;
            if full {
                self.counters.copies_dropped += 1;
                continue;
            }
            entry.keep =
                self.unkept
                    .push(device, id, Pending::kept_here(body.clone(), None, group));
            state.queue_mut().push(entry);
            self.shares.add(&entry);
            self.queued_bytes += body.len();
            self.queued_items += 1;
            self.actions.push(Action::Keep {
                user: device,
                item: item.clone(),
                keep: entry.keep,
            });
            self.push_queued(device);
            copies += 1;
        }
        self.devices.insert(account, companions);
        copies
    }

    /// A message that is still queued was sent again (its sender did not see the ServerAck).
    /// If the original is not durable yet, the resend's connection waits for its ack instead
    /// of the original's (one connection per user: the older one is gone); else the ack goes
    /// now, with the original's id and time.
    fn answer_resend(
        &mut self,
        envelope: Envelope,
        group: Option<&GroupCopy>,
        id: u64,
        original: Entry,
        now_ms: u64,
    ) {
        self.counters.messages_deduplicated += 1;
        let timestamp_ms = original.timestamp_ms;
        let reply_to = match group {
            None => envelope.from,
            Some(copy) => copy.group,
        };
        // Not durable yet: the resend waits for it, on the connection that sent it last. A
        // copy kept here for another node (which has died since: this is the user's home now)
        // has nobody waiting yet.
        if let Some(pending) = self.unkept.get_mut(original.keep, envelope.to, id) {
            match pending.waiter.as_mut() {
                Some(waiter) => {
                    waiter.conn = envelope.conn;
                    waiter.message = envelope.message;
                }
                None => {
                    pending.waiter = Some(Waiter {
                        sender: envelope.device,
                        reply_to,
                        conn: envelope.conn,
                        message: envelope.message,
                        timestamp_ms: original.timestamp_ms,
                        copies: 1,
                    });
                }
            }
            return;
        }
        let copies = 1 + self.devices.get(&envelope.to).map_or(0, Vec::len) as u16;
        let accepted = ShardMessage::Accepted {
            sender: envelope.device,
            conn: envelope.conn,
            message: envelope.message,
            id,
            timestamp_ms,
            copies,
            delivered: None,
        };
        self.send_home(reply_to, accepted, now_ms);
    }

    /// The ServerAck of message `id` goes to the connection that waits for it, with the
    /// second tick when the recipient's device acked it first.
    fn accepted(&mut self, waiter: Waiter, id: u64, delivered: Option<Delivered>, now_ms: u64) {
        let accepted = ShardMessage::Accepted {
            sender: waiter.sender,
            conn: waiter.conn,
            message: waiter.message,
            id,
            timestamp_ms: waiter.timestamp_ms,
            copies: waiter.copies,
            delivered,
        };
        self.send_home(waiter.reply_to, accepted, now_ms);
    }

    /// Takes item (`id`, `kind`) out of `user`'s queue (`id`: its ack id; with `keep`, the one
    /// of that keep number, else of several items with one ack id the oldest); for a message
    /// not yet on disk, also its record (its body, who still waits for its ServerAck).
    fn remove_item(
        &mut self,
        user: UserId,
        id: u64,
        kind: ReceiptKind,
        keep: Option<u32>,
    ) -> Option<(Entry, Option<Pending>)> {
        let state = self.users.get_mut(&user)?;
        let queue = &mut state.extra.as_mut()?.queue;
        let position = queue.items.iter().position(|item| {
            item.acked_by(id, kind) && keep.is_none_or(|keep| item.keep == keep)
        })?;
        let item = queue.items.remove(position)?;
        queue.took(&item);
        self.shares.remove(&item);
        let body_bytes = item.body_bytes();
        if position < queue.inflight {
            queue.inflight -= 1;
            queue.inflight_bytes -= body_bytes;
        }
        queue.queued_bytes -= body_bytes;
        if !item.is_message() {
            queue.receipts -= 1;
        }
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.queued_bytes -= body_bytes;
        self.queued_items -= 1;
        let pending = if item.is_message() {
            self.unkept.take(item.keep, user, item.id)
        } else {
            None
        };
        Some((item, pending))
    }

    fn client_ack(&mut self, user: UserId, id: u64, kind: ReceiptKind, now_ms: u64) {
        // Acks come in delivery order, so the item is almost always at the front. An Ack can
        // only name an item of the acker's own queue: it needs no other check.
        let Some((item, pending)) = self.remove_item(user, id, kind, None) else {
            self.counters.acks_unmatched += 1;
            return;
        };
        let waiter = pending.and_then(|pending| pending.waiter);
        self.actions.push(Action::Forget {
            user,
            id,
            kind,
            keep: item.keep,
        });
        self.forget_replica(user, &item);
        self.push_queued(user);
        if item.is_message() && !item.is_sent_copy() && !item.is_group_event() {
            let from = item.peer;
            self.counters.messages_acked += 1;
            let delivered = Delivered {
                by: user,
                at_ms: now_ms,
            };
            // The device has it: the server's responsibility is met even if the disk is not.
            // The second tick goes with the ServerAck when the account's own device sent the
            // message to a user (not a group: its ServerAck waits for every member); the
            // sender's home decides whether it is folded in or queued as a Receipt.
            match waiter {
                Some(waiter) if waiter.sender == from && waiter.reply_to == from => {
                    return self.accepted(waiter, id, Some(delivered), now_ms);
                }
                Some(waiter) => self.accepted(waiter, id, None, now_ms),
                None => {}
            }
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

    /// A Read is taken only with the proof its Deliver carried to this reader: a user cannot
    /// mark as read a message that was not delivered to it.
    fn client_read(
        &mut self,
        reader: UserId,
        conn: ConnRef,
        read: hop_protocol::wire::Read,
        now_ms: u64,
    ) {
        let Some(from) = UserRef::user(read.from.as_ref()) else {
            return self.error_to(
                conn,
                ErrorCode::BadUserId,
                "Read names an invalid user id",
                None,
            );
        };
        if let Err(wait_ms) = self.spend(reader, Spend::Read, now_ms) {
            let reason = format!(
                "this device sends more than {} Reads a second; try again in {wait_ms} ms",
                self.limits.sender_reads.per_second
            );
            return self.error_to(conn, ErrorCode::RateLimited, &reason, None);
        }
        if read.proof != read_proof(&self.read_proofs, reader, from, read.id) {
            self.counters.reads_refused += 1;
            return self.error_to(
                conn,
                ErrorCode::BadReceipt,
                "Read names no message delivered to you (its proof does not match)",
                None,
            );
        }
        // Read is per account: read on any device is read, and a second device's Read is
        // the same receipt (queued once).
        let receipt = ShardMessage::Receipt {
            to: from,
            id: read.id,
            kind: ReceiptKind::Read,
            by: self.account_of(reader),
            timestamp_ms: now_ms,
        };
        self.send_home(from, receipt, now_ms);
    }

    /// New presence settings: kept, and applied at once to the current watchers (one that may
    /// no longer see the user is told "offline" and dropped; it may watch again if it is
    /// allowed later).
    fn client_privacy(
        &mut self,
        user: UserId,
        conn: ConnRef,
        settings: PresenceSettings,
        now_ms: u64,
    ) {
        let Ok(visibility) = Visibility::try_from(settings.visibility) else {
            return self.error_to(conn, ErrorCode::BadStanza, "unknown visibility", None);
        };
        let named = named_users(
            &settings.contacts,
            CONTACTS_MAX,
            "too many contacts (at most 1,024)",
            "a contact is not a valid user id",
        );
        let mut contacts = match named {
            Ok(contacts) => contacts,
            Err((code, reason)) => return self.error_to(conn, code, reason, None),
        };
        contacts.sort_unstable();
        contacts.dedup();
        let privacy = Privacy {
            visibility,
            contacts,
        };
        let state = self.users.get_mut(&user).expect("the user is online here");
        state.set_privacy(privacy.clone());
        let mut hidden = Vec::new();
        if let Some(extra) = state.extra.as_mut() {
            extra.watch.subscribers.retain(|watcher| {
                let shown = privacy.shows_to(*watcher);
                if !shown {
                    hidden.push(*watcher);
                }
                shown
            });
        }
        if state.newly_empty() {
            self.emptied.push(user);
        }
        self.actions.push(Action::PersistPrivacy { user, privacy });
        for watcher in hidden {
            self.presence_to(watcher, user, false, 0, now_ms);
        }
    }

    fn client_subscribe(
        &mut self,
        user: UserId,
        conn: ConnRef,
        target: Option<&UserRef>,
        now_ms: u64,
    ) {
        let Some(target) = UserRef::user(target) else {
            return self.error_to(
                conn,
                ErrorCode::BadUserId,
                "Subscribe names an invalid user id",
                None,
            );
        };
        let state = self
            .users
            .get_mut(&user)
            .expect("subscribing user is online here");
        if !state.subscriptions().contains(&target) {
            if state.subscriptions().len() >= self.limits.subscriptions_max {
                return self.error_to(
                    conn,
                    ErrorCode::Limit,
                    "too many presence subscriptions",
                    None,
                );
            }
            state.watch_mut().subscriptions.push(target);
        }
        // Watchers are accounts: presence comes back to the account's home shard, where each
        // of its devices that watches `target` is told.
        let subscribe = ShardMessage::Subscribe {
            subscriber: self.account_of(user),
            conn,
            target,
        };
        self.send_home(target, subscribe, now_ms);
    }

    /// At the target's home shard: record the watcher and tell it the current presence. A
    /// target that does not show its presence to the watcher answers exactly as one that does
    /// not exist: offline, never seen, and no watcher slot is taken.
    fn add_subscriber(&mut self, subscriber: UserId, conn: ConnRef, target: UserId, now_ms: u64) {
        let (online, last_seen_ms, visible) = match self.users.get_mut(&target) {
            Some(state) if !state.privacy().shows_to(subscriber) => {
                self.counters.watches_hidden += 1;
                (false, 0, false)
            }
            None => {
                self.counters.watches_hidden += 1;
                (false, 0, false)
            }
            Some(state) => {
                if !state.subscribers().contains(&subscriber) {
                    if state.subscribers().len() >= self.limits.subscribers_max {
                        let refusal = ShardMessage::Rejected {
                            sender: subscriber,
                            conn,
                            message: None,
                            code: ErrorCode::Limit,
                            reason: "that user has too many watchers",
                        };
                        return self.send_home(subscriber, refusal, now_ms);
                    }
                    state.watch_mut().subscribers.push(subscriber);
                }
                (state.conn().is_some(), state.last_seen_ms, true)
            }
        };
        // A companion online makes its account online.
        let (online, last_seen_ms) = if visible && !online && self.account_online(target) {
            (true, 0)
        } else {
            (online, last_seen_ms)
        };
        self.presence_to(subscriber, target, online, last_seen_ms, now_ms);
    }

    /// Unsubscribes `user` from each of `targets` at their home shards.
    /// `user`'s device stopped watching `targets`: its account stops watching those that none
    /// of its other devices watches.
    fn unsubscribe_all(&mut self, user: UserId, targets: Vec<UserId>, now_ms: u64) {
        let account = self.account_of(user);
        for target in targets {
            if self.watched_by_a_device(account, target) {
                continue;
            }
            let unsubscribe = ShardMessage::Unsubscribe {
                subscriber: account,
                target,
            };
            self.send_home(target, unsubscribe, now_ms);
        }
    }

    /// The account's devices that are connected: the account itself and its companions.
    fn devices_of(&self, account: UserId) -> impl Iterator<Item = UserId> + '_ {
        std::iter::once(account).chain(self.devices.get(&account).into_iter().flatten().copied())
    }

    fn watched_by_a_device(&self, account: UserId, target: UserId) -> bool {
        self.devices_of(account).any(|device| {
            self.users
                .get(&device)
                .is_some_and(|state| state.subscriptions().contains(&target))
        })
    }

    /// `conn` is the connection of `account` or of one of its devices.
    fn conn_of_account(&self, account: UserId, conn: ConnRef) -> bool {
        self.devices_of(account)
            .any(|device| self.conn_of(device) == Some(conn))
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
        let item = Queued::Receipt {
            id,
            kind,
            by,
            timestamp_ms,
        };
        let mut entry = Entry::of(&item);
        // A delivered receipt is made once, by the server, at the device's Ack; a read receipt
        // comes from the reader, who may send its Read again.
        if kind == ReceiptKind::Read && state.has_recent_twin(&entry) {
            self.counters.receipts_duplicate += 1;
            return;
        }
        // Receipts have their own quota: past it they are dropped and counted, and the
        // messages waiting for this user are not affected.
        if state.queued_receipts() >= self.limits.queue_receipts_max {
            self.counters.receipts_dropped += 1;
            return;
        }
        entry.keep = self.unkept.skip();
        state.queue_mut().push(entry);
        self.queued_items += 1;
        self.actions.push(Action::Keep {
            user: to,
            item,
            keep: entry.keep,
        });
        self.counters.receipts_queued += 1;
        self.push_queued(to);
    }

    /// A receipt for account `to`'s message: queued for it and for each of its companion
    /// devices, since every device of the sending account shows the ticks. (The list is taken
    /// out and put back: no copy on the message path.)
    fn receipt_for(&mut self, to: UserId, id: u64, kind: ReceiptKind, by: UserId, at_ms: u64) {
        self.queue_receipt(to, id, kind, by, at_ms);
        if let Some(companions) = self.devices.get_mut(&to).map(std::mem::take) {
            for device in &companions {
                self.users.entry(*device).or_insert_with(User::new);
                self.queue_receipt(*device, id, kind, by, at_ms);
            }
            self.devices.insert(to, companions);
        }
    }

    /// Whether `sender`'s connection asked for the second tick in the ServerAck and no
    /// companion device of its account needs the Receipt.
    fn takes_delivered_in_ack(&self, sender: UserId) -> bool {
        let asked = self.users.get(&sender).is_some_and(|state| {
            state
                .extra
                .as_deref()
                .is_some_and(|extra| extra.sending.delivered_in_ack)
        });
        asked && self.devices.get(&sender).is_none_or(Vec::is_empty)
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
                        kind: i32::from(entry.kind),
                        by: Some(entry.peer.into()),
                        timestamp_ms: entry.timestamp_ms,
                    })),
                }
            } else if entry.is_sent_copy() {
                let account = self.companions.get(&user).copied().unwrap_or(user);
                match self.unkept.get(entry.keep, user, entry.id) {
                    Some(Pending { body, .. }) => Action::Send {
                        conn,
                        stanza: Stanza::deliver_sent(
                            account,
                            entry.peer,
                            entry.id,
                            entry.timestamp_ms,
                            body.clone(),
                        ),
                    },
                    None => Action::DeliverKept {
                        conn,
                        user,
                        from: account,
                        id: entry.id,
                        timestamp_ms: entry.timestamp_ms,
                        proof: 0,
                        sent_to: Some(entry.peer),
                    },
                }
            } else {
                let proof = if entry.is_group_event() {
                    0
                } else {
                    read_proof(&self.read_proofs, user, entry.peer, entry.id)
                };
                match self.unkept.get(entry.keep, user, entry.id) {
                    Some(Pending {
                        body,
                        group: Some(group),
                        ..
                    }) => {
                        let stanza = Stanza::deliver_group(
                            entry.peer,
                            *group,
                            entry.id,
                            entry.timestamp_ms,
                            body.clone(),
                            proof,
                            entry.is_group_event(),
                        );
                        Action::Send { conn, stanza }
                    }
                    Some(Pending { body, .. }) => Action::Send {
                        conn,
                        stanza: Stanza::deliver(
                            entry.peer,
                            entry.id,
                            entry.timestamp_ms,
                            body.clone(),
                            proof,
                        ),
                    },
                    None => Action::DeliverKept {
                        conn,
                        user,
                        from: entry.peer,
                        id: entry.id,
                        timestamp_ms: entry.timestamp_ms,
                        proof,
                        sent_to: None,
                    },
                }
            };
            self.actions.push(action);
        }
    }

    /// Tells `subscriber` of `about`'s presence, its last-seen time rounded down to the minute.
    fn presence_to(
        &mut self,
        subscriber: UserId,
        about: UserId,
        online: bool,
        last_seen_ms: u64,
        now_ms: u64,
    ) {
        let message = ShardMessage::Presence {
            to: subscriber,
            about,
            online,
            last_seen_ms: last_seen_ms / LAST_SEEN_GRAIN_MS * LAST_SEEN_GRAIN_MS,
        };
        self.send_home(subscriber, message, now_ms);
    }

    /// Hands `message` to `user`'s home shard: handled here if that is this shard; in a
    /// cluster, to `user`'s home node if that is another node.
    fn send_home(&mut self, user: UserId, message: ShardMessage, now_ms: u64) {
        if let Some(locality) = &self.locality {
            if !locality.is_here(user) {
                self.counters.mails_to_nodes += 1;
                self.actions.push(Action::ToNode {
                    user,
                    message: Box::new(message),
                });
                return;
            }
        }
        self.send_to(home_shard(user, self.shards), message, now_ms);
    }

    fn send_to(&mut self, shard: ShardId, message: ShardMessage, now_ms: u64) {
        if shard == self.shard {
            self.handle_shard_message(message, now_ms);
        } else {
            self.actions.push(Action::Forward { shard, message });
        }
    }

    fn sender_rates(&self) -> [Rate; 2] {
        [self.limits.sender_messages, self.limits.sender_reads]
    }

    /// Takes one of `sender`'s tokens for `spend`, or counts the refusal and says how long
    /// until one is there.
    fn spend(&mut self, sender: UserId, spend: Spend, now_ms: u64) -> Result<(), u64> {
        let rates = self.sender_rates();
        let spent = self.quotas.take(sender, spend, rates, now_ms);
        if spent.is_err() {
            self.counters.rate_limited += 1;
        }
        spent
    }

    fn error_to(
        &mut self,
        conn: ConnRef,
        code: ErrorCode,
        reason: &str,
        message: Option<MessageRef>,
    ) {
        self.actions.push(Action::Send {
            conn,
            stanza: Stanza::error(code, reason, message),
        });
    }

    /// `DeviceChange` from `user`'s connection: any device lists its account's devices; the
    /// primary adds (through the shard loop, which owns the server-wide directory of devices)
    /// and removes companions.
    fn client_device_change(&mut self, user: UserId, conn: ConnRef, change: DeviceChange) {
        let account = self.account_of(user);
        let op = device_change::Op::try_from(change.op).unwrap_or(device_change::Op::Unspecified);
        if op == device_change::Op::List {
            return self.reply_devices(conn, account);
        }
        if op == device_change::Op::Unspecified {
            return self.error_to(conn, ErrorCode::BadStanza, "unknown device operation", None);
        }
        if account != user {
            return self.error_to(
                conn,
                ErrorCode::NotPrimary,
                "only the account's primary device may add or remove devices",
                None,
            );
        }
        let Some(device) = UserRef::user(change.device.as_ref()) else {
            return self.error_to(
                conn,
                ErrorCode::BadUserId,
                "a missing or invalid device id",
                None,
            );
        };
        let companions = self.devices.get(&account).map_or(&[][..], Vec::as_slice);
        if op == device_change::Op::Add {
            if device == account {
                return self.error_to(
                    conn,
                    ErrorCode::DeviceTaken,
                    "that is the account's primary device",
                    None,
                );
            }
            if companions.contains(&device) {
                return self.reply_devices(conn, account);
            }
            if companions.len() >= self.limits.companions_max {
                return self.error_to(
                    conn,
                    ErrorCode::Limit,
                    "the account has as many companion devices as it may",
                    None,
                );
            }
            self.actions.push(Action::LinkDevice {
                account,
                device,
                conn,
            });
            return;
        }
        if !companions.contains(&device) {
            return self.error_to(
                conn,
                ErrorCode::UnknownDevice,
                "that device is not one of this account's",
                None,
            );
        }
        self.unlink(account, device);
        self.forget_device(device);
        self.actions.push(Action::UnlinkDevice { account, device });
        self.reply_devices(conn, account);
    }

    /// Restores a group kept from an earlier run (its latest snapshot). Groups homed on other
    /// shards, and ended ones, are ignored.
    pub fn restore_group(&mut self, snapshot: GroupSnapshot) {
        // Every shard counts the groups of its own accounts.
        for (member, _) in &snapshot.members {
            if home_shard(*member, self.shards) == self.shard {
                *self.memberships.entry(*member).or_insert(0) += 1;
            }
        }
        if home_shard(snapshot.group, self.shards) != self.shard || snapshot.members.is_empty() {
            return;
        }
        self.groups.insert(
            snapshot.group,
            Group {
                name: snapshot.name,
                version: snapshot.version,
                members: snapshot.members,
            },
        );
    }

    /// Groups homed on this shard.
    pub fn groups_homed(&self) -> usize {
        self.groups.len()
    }

    /// The server takes no new accounts: a key not bound yet is sent away (`NOT_REGISTERED`)
    /// when it connects, and no state is made for it. Linked companions still connect.
    pub fn close_registration(&mut self) {
        self.registration_closed = true;
    }

    /// A mail for another node ([`Action::ToNode`]) that cannot reach it. The sender of a
    /// message or of a watch request is told (`OVERLOADED`: try again later); any other mail
    /// (a reply, a receipt, a presence change, a group's work) is dropped, and counted.
    pub fn handle_unroutable(&mut self, message: ShardMessage, now_ms: u64) {
        self.counters.mails_unroutable += 1;
        let (account, refusal) = match message {
            ShardMessage::Route(envelope) => (
                envelope.from,
                ShardMessage::Rejected {
                    sender: envelope.device,
                    conn: envelope.conn,
                    message: Some(envelope.message),
                    code: ErrorCode::Overloaded,
                    reason: UNROUTABLE,
                },
            ),
            ShardMessage::Subscribe {
                subscriber, conn, ..
            } => (
                subscriber,
                ShardMessage::Rejected {
                    sender: subscriber,
                    conn,
                    message: None,
                    code: ErrorCode::Overloaded,
                    reason: UNROUTABLE,
                },
            ),
            // The replica node cannot be reached: the message has no second copy.
            // A copy made again (numbered NO_KEEP): to be made at the next change.
            ShardMessage::Replica(replica) if replica.keep == NO_KEEP => {
                return self.unsent(replica.user, replica.item.id(), SendTo::Replica);
            }
            ShardMessage::Replica(replica) => {
                let id = replica.item.id();
                return self.replicated(replica.user, id, replica.keep, false, now_ms);
            }
            ShardMessage::HandBack(replica) => {
                return self.unsent(replica.user, replica.item.id(), SendTo::NewHome);
            }
            _ => return,
        };
        // The sender's connection is on this node: the refusal does not leave it (and if the
        // members changed meanwhile, it is dropped as unroutable in turn, never looping).
        self.send_home(account, refusal, now_ms);
    }

    /// Makes this router a part of one node of a cluster: work for a user that `locality`
    /// says lives on another node leaves as [`Action::ToNode`].
    pub fn set_locality(&mut self, locality: Box<dyn Locality>) {
        self.locality = Some(locality);
    }

    /// While `paused`, the groups homed here refuse new messages with `OVERLOADED` (the shard
    /// loop's mail to other shards is backed up, and a fan-out would only add to it).
    pub fn pause_fanouts(&mut self, paused: bool) {
        self.fanouts_paused = paused;
    }

    /// Drops the group fan-outs that have waited too long for their members' shards (a shard
    /// restarted meanwhile and lost the copies' answers); their senders' resends start them
    /// again. Called once per tick.
    pub fn expire_fanouts(&mut self, now_ms: u64) {
        if self.fanouts.is_empty() {
            return;
        }
        let before = self.fanouts.len();
        self.fanouts
            .retain(|_, fanout| now_ms.saturating_sub(fanout.started_ms) < FANOUT_PATIENCE_MS * 12);
        self.counters.fanouts_abandoned += (before - self.fanouts.len()) as u64;
    }

    /// `GroupChange` from `user`'s connection: checked here, carried out at the group's home
    /// shard, which answers the connection.
    fn client_group_change(
        &mut self,
        user: UserId,
        conn: ConnRef,
        change: GroupChange,
        now_ms: u64,
    ) {
        use group_change::Op;
        let account = self.account_of(user);
        let op = Op::try_from(change.op).unwrap_or(Op::Unspecified);
        if op == Op::Unspecified {
            return self.error_to(conn, ErrorCode::BadStanza, "unknown group operation", None);
        }
        let named = named_users(
            &change.members,
            GROUP_MEMBERS_MAX,
            "a group has at most 1,024 members",
            "a member is not a valid user id",
        );
        let members = match named {
            Ok(members) => members,
            Err((code, reason)) => return self.error_to(conn, code, reason, None),
        };
        if matches!(op, Op::Add | Op::Remove) && members.is_empty() {
            return self.error_to(
                conn,
                ErrorCode::BadStanza,
                "name the members to add or remove",
                None,
            );
        }
        let group = if op == Op::Create {
            if change.nonce == 0 {
                return self.error_to(
                    conn,
                    ErrorCode::BadStanza,
                    "a group's create needs a random nonce",
                    None,
                );
            }
            if change.name.len() > GROUP_NAME_BYTES_MAX {
                return self.error_to(
                    conn,
                    ErrorCode::BadStanza,
                    "a group's name is at most 100 bytes",
                    None,
                );
            }
            UserId::of_group(account, change.nonce)
        } else {
            let Some(group) = UserRef::user(change.group.as_ref()) else {
                return self.error_to(
                    conn,
                    ErrorCode::BadUserId,
                    "a missing or invalid group id",
                    None,
                );
            };
            group
        };
        let request = GroupRequest {
            account,
            conn,
            op,
            group,
            members,
            name: change.name,
            admin: change.admin,
        };
        self.send_home(group, ShardMessage::Group(Box::new(request)), now_ms);
    }

    /// At a group's home shard: a member's change. A create or an add first asks each new
    /// member's home shard whether it may join (`groups_max`); the change is made when all
    /// answered yes, or refused with `LIMIT` if one did not.
    fn group_request(&mut self, request: GroupRequest, now_ms: u64) {
        use group_change::Op;
        let group = self.groups.get(&request.group);
        let joining: Vec<UserId> = match (request.op, group) {
            (Op::Create, None) => std::iter::once(request.account)
                .chain(request.members.iter().copied())
                .filter({
                    let mut seen = foldhash::HashSet::default();
                    move |member| seen.insert(*member)
                })
                .collect(),
            (Op::Add, Some(group)) if group.is_admin(request.account) => request
                .members
                .iter()
                .copied()
                .filter(|member| !group.is_member(*member))
                .collect(),
            _ => Vec::new(),
        };
        if joining.is_empty() {
            return self.apply_group_request(request, now_ms);
        }
        let size = group.map_or(0, |group| group.members.len()) + joining.len();
        if size > self.limits.group_members_max {
            return self.answer(request.account, request.conn, too_many_members(), now_ms);
        }
        if self.joins.contains_key(&request.group) {
            let busy = Stanza::error(
                ErrorCode::Overloaded,
                "another change of this group is under way; try again",
                None,
            );
            return self.answer(request.account, request.conn, busy, now_ms);
        }
        let id = request.group;
        self.joins.insert(
            id,
            Joining {
                request,
                waiting: joining.len(),
                admitted: Vec::new(),
                refused: 0,
            },
        );
        for member in joining {
            self.send_home(member, ShardMessage::Join { group: id, member }, now_ms);
        }
    }

    /// A new member's home shard answered a join of group `id`. When all have, the change is
    /// made (and the places of members it did not add after all are given back), or refused
    /// and every place taken for it given back.
    fn joined(&mut self, id: UserId, member: UserId, admitted: bool, now_ms: u64) {
        let Some(joining) = self.joins.get_mut(&id) else {
            if admitted {
                self.send_home(member, ShardMessage::Left { member }, now_ms);
            }
            return;
        };
        joining.waiting -= 1;
        if admitted {
            joining.admitted.push(member);
        } else {
            joining.refused += 1;
        }
        if joining.waiting > 0 {
            return;
        }
        let joining = self.joins.remove(&id).expect("just seen");
        let (account, conn) = (joining.request.account, joining.request.conn);
        if joining.refused == 0 {
            self.apply_group_request(joining.request, now_ms);
        }
        for member in joining.admitted {
            let joined = self.groups.get(&id).is_some_and(|g| g.is_member(member));
            if !joined {
                self.send_home(member, ShardMessage::Left { member }, now_ms);
            }
        }
        if joining.refused > 0 {
            let refusal = Stanza::error(
                ErrorCode::Limit,
                "a member is in as many groups as it may be (groups_max)",
                None,
            );
            self.answer(account, conn, refusal, now_ms);
        }
    }

    /// At a group's home shard: a member's change, carried out, kept and told to every member
    /// (and to those it removes), then answered with the group as it is now.
    fn apply_group_request(&mut self, request: GroupRequest, now_ms: u64) {
        use group_change::Op;
        let GroupRequest {
            account,
            conn,
            op,
            group: id,
            members,
            name,
            admin,
        } = request;
        if op == Op::Create {
            if let Some(group) = self.groups.get(&id) {
                // A retried create (the same account and nonce) finds its group.
                let answer = if group.is_member(account) {
                    group.info(id)
                } else {
                    unknown_group()
                };
                return self.answer(account, conn, answer, now_ms);
            }
            let mut list = vec![(account, true)];
            list.extend(
                members
                    .into_iter()
                    .filter(|member| *member != account)
                    .map(|member| (member, false)),
            );
            if list.len() > self.limits.group_members_max {
                return self.answer(account, conn, too_many_members(), now_ms);
            }
            let event = GroupEvent {
                op: Op::Create as i32,
                members: list.iter().map(|(member, _)| (*member).into()).collect(),
                admin: false,
                name: name.clone(),
            };
            self.groups.insert(
                id,
                Group {
                    name,
                    version: 0,
                    members: list,
                },
            );
            return self.group_changed(id, account, conn, event, Vec::new(), now_ms);
        }
        let members_max = self.limits.group_members_max;
        let Some(group) = self.groups.get_mut(&id).filter(|g| g.is_member(account)) else {
            return self.answer(account, conn, unknown_group(), now_ms);
        };
        if op == Op::Info {
            let info = group.info(id);
            return self.answer(account, conn, info, now_ms);
        }
        if matches!(op, Op::Add | Op::Remove) && !group.is_admin(account) {
            let refusal = Stanza::error(
                ErrorCode::NotAdmin,
                "only the group's admins may change its members",
                None,
            );
            return self.answer(account, conn, refusal, now_ms);
        }
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        match op {
            Op::Add => {
                let joining = members.iter().filter(|m| !group.is_member(**m)).count();
                if group.members.len() + joining > members_max {
                    return self.answer(account, conn, too_many_members(), now_ms);
                }
                for member in members {
                    match group.members.iter_mut().find(|(m, _)| *m == member) {
                        Some(entry) if admin && !entry.1 => {
                            entry.1 = true;
                            changed.push(member);
                        }
                        Some(_) => {}
                        None => {
                            group.members.push((member, admin));
                            changed.push(member);
                        }
                    }
                }
            }
            Op::Remove if admin => {
                for entry in &mut group.members {
                    if entry.1 && members.contains(&entry.0) {
                        entry.1 = false;
                        changed.push(entry.0);
                    }
                }
                group.keep_an_admin();
            }
            Op::Remove | Op::Leave => {
                let leaving = if op == Op::Leave {
                    vec![account]
                } else {
                    members
                };
                group.members.retain(|(member, _)| {
                    let stays = !leaving.contains(member);
                    if !stays {
                        changed.push(*member);
                    }
                    stays
                });
                group.keep_an_admin();
                removed.clone_from(&changed);
            }
            Op::Create | Op::Info | Op::Unspecified => unreachable!("handled above"),
        }
        if changed.is_empty() {
            let info = group.info(id);
            return self.answer(account, conn, info, now_ms);
        }
        let event = GroupEvent {
            op: op as i32,
            members: changed.iter().map(|member| (*member).into()).collect(),
            admin,
            name: String::new(),
        };
        self.group_changed(id, account, conn, event, removed, now_ms);
    }

    /// A group homed here changed (`actor` made the change): its new state is kept, `conn` is
    /// answered with the group as it is now, and every member and each of `removed` gets the
    /// event (through the members' home shards, in order with the group's messages). A group
    /// left without members ends.
    fn group_changed(
        &mut self,
        id: UserId,
        actor: UserId,
        conn: ConnRef,
        event: GroupEvent,
        removed: Vec<UserId>,
        now_ms: u64,
    ) {
        let group = self.groups.get_mut(&id).expect("the group that changed");
        group.version += 1;
        let snapshot = GroupSnapshot {
            group: id,
            version: group.version,
            name: group.name.clone(),
            members: group.members.clone(),
        };
        let info = group.info(id);
        let mut recipients = group.accounts();
        for member in &removed {
            self.send_home(*member, ShardMessage::Left { member: *member }, now_ms);
        }
        let group = self.groups.get_mut(&id).expect("the group that changed");
        recipients.extend(removed);
        if group.members.is_empty() {
            self.groups.remove(&id);
        }
        self.counters.group_changes += 1;
        self.actions
            .push(Action::PersistGroup(Box::new(snapshot.clone())));
        // The answer first: the requester's own event follows it on the same path.
        self.answer(actor, conn, info, now_ms);
        // An event is named by the group and its version: no client can name a message so.
        let message = MessageRef {
            outbox: 0,
            seq: snapshot.version,
        };
        let body = event.to_body();
        let event_id = self.message_id(id, id, message);
        for member in recipients {
            let envelope = Envelope {
                from: actor,
                device: id,
                to: member,
                conn: FANOUT_CONN,
                message,
                resend: false,
                timestamp_ms: now_ms,
                body: body.clone(),
            };
            let copy = GroupCopy {
                group: id,
                event: true,
                id: event_id,
            };
            let mail = ShardMessage::RouteCopy(Box::new((envelope, copy)));
            self.send_home(member, mail, now_ms);
        }
    }

    /// At a group's home shard: a member's message, queued for every other member (and so for
    /// all their devices) through the members' home shards. Its ServerAck waits until every
    /// member's shard answered.
    fn fan_out(&mut self, envelope: Envelope, now_ms: u64) {
        let group_id = envelope.to;
        let reply_to = envelope.from;
        let refusal = |code, reason| ShardMessage::Rejected {
            sender: envelope.device,
            conn: envelope.conn,
            message: Some(envelope.message),
            code,
            reason,
        };
        let group = self.groups.get(&group_id).expect("checked by the caller");
        if !group.is_member(envelope.from) {
            // A group one is not in answers as one that does not exist.
            self.counters.messages_rejected += 1;
            let refusal = refusal(
                ErrorCode::UnknownUser,
                "no such user or group on this server",
            );
            return self.send_home(reply_to, refusal, now_ms);
        }
        let others: Vec<UserId> = group
            .members
            .iter()
            .map(|(member, _)| *member)
            .filter(|member| *member != envelope.from)
            .collect();
        let id = self.message_id(envelope.from, group_id, envelope.message);
        let waiter = Waiter {
            sender: envelope.device,
            reply_to,
            conn: envelope.conn,
            message: envelope.message,
            timestamp_ms: envelope.timestamp_ms,
            copies: 0,
        };
        if let Some(fanout) = self.fanouts.get_mut(&(group_id, id)) {
            self.counters.messages_deduplicated += 1;
            if now_ms.saturating_sub(fanout.started_ms) < FANOUT_PATIENCE_MS {
                // A resend while the copies are on their way: the newer connection waits.
                fanout.waiter = Waiter {
                    timestamp_ms: fanout.waiter.timestamp_ms,
                    ..waiter
                };
                return;
            }
            // Waited too long: the copies go again (a member's shard answers a copy it holds
            // at once).
            self.fanouts.remove(&(group_id, id));
        }
        if self.fanouts_paused {
            self.counters.messages_rejected += 1;
            let refusal = refusal(
                ErrorCode::Overloaded,
                "the group's server is busy; try again",
            );
            return self.send_home(reply_to, refusal, now_ms);
        }
        self.counters.group_messages += 1;
        if others.is_empty() {
            return self.accepted(waiter, id, None, now_ms);
        }
        self.fanouts.insert(
            (group_id, id),
            Fanout {
                waiter,
                started_ms: now_ms,
                outstanding: others.len() as u32,
                members: others.len() as u16,
                copies: 0,
                missed: Vec::new(),
            },
        );
        for member in others {
            let copy = Envelope {
                from: envelope.from,
                device: group_id,
                to: member,
                conn: FANOUT_CONN,
                message: envelope.message,
                resend: envelope.resend,
                timestamp_ms: envelope.timestamp_ms,
                body: envelope.body.clone(),
            };
            let tag = GroupCopy {
                group: group_id,
                event: false,
                id,
            };
            let mail = ShardMessage::RouteCopy(Box::new((copy, tag)));
            self.send_home(member, mail, now_ms);
        }
    }

    /// A member's shard answered for its copy of group message `id`: `copies` device copies
    /// queued, or refused (`missed`, the member). When every member's has, the sender's
    /// ServerAck goes, naming the members who missed it.
    fn fanout_answered(
        &mut self,
        group: UserId,
        id: u64,
        copies: u16,
        missed: Option<UserId>,
        now_ms: u64,
    ) {
        let Some(fanout) = self.fanouts.get_mut(&(group, id)) else {
            return; // an event's copy, or a fan-out given up
        };
        fanout.outstanding -= 1;
        fanout.copies = fanout.copies.saturating_add(copies);
        fanout.missed.extend(missed);
        if fanout.outstanding > 0 {
            return;
        }
        let fanout = self.fanouts.remove(&(group, id)).expect("just seen");
        let waiter = fanout.waiter;
        let ack = ServerAck {
            seq: waiter.message.seq,
            id,
            timestamp_ms: waiter.timestamp_ms,
            outbox: waiter.message.outbox,
            delivered_ms: 0,
            members: u32::from(fanout.members),
            copies: u32::from(fanout.copies),
            missed: fanout.missed.into_iter().map(Into::into).collect(),
        };
        // To the sender's account's shard, where its device's connection is.
        let answer = ShardMessage::Answer {
            account: waiter.sender,
            conn: waiter.conn,
            stanza: Box::new(Stanza::of(Kind::ServerAck(ack))),
        };
        self.send_home(waiter.reply_to, answer, now_ms);
    }

    /// At `account`'s home shard: `stanza` for the connection `conn` of one of its devices,
    /// dropped (and counted) if that connection has gone: the client asks again.
    fn reply(&mut self, account: UserId, conn: ConnRef, stanza: Stanza) {
        if !self.conn_of_account(account, conn) {
            self.counters.replies_dropped += 1;
            return;
        }
        self.actions.push(Action::Send { conn, stanza });
    }

    /// Answers `account`'s connection `conn` (on the account's home shard) with `stanza`.
    fn answer(&mut self, account: UserId, conn: ConnRef, stanza: Stanza, now_ms: u64) {
        let answer = ShardMessage::Answer {
            account,
            conn,
            stanza: Box::new(stanza),
        };
        self.send_home(account, answer, now_ms);
    }

    /// Sent-sync: a copy of what one device of an account sends, queued for each of the
    /// account's other devices (all on this shard), under the message's id. A device whose
    /// queue is full misses the copy (counted).
    fn copy_to_other_devices(&mut self, envelope: &Envelope) {
        let account = envelope.from;
        let id = self.message_id(account, envelope.to, envelope.message);
        let item = Queued::Sent {
            to: envelope.to,
            id,
            timestamp_ms: envelope.timestamp_ms,
            body: envelope.body.clone(),
        };
        let companions = self.devices.get(&account).map_or(&[][..], Vec::as_slice);
        let others: Vec<UserId> = std::iter::once(account)
            .chain(companions.iter().copied())
            .filter(|device| *device != envelope.device)
            .collect();
        for device in others {
            let state = self.users.entry(device).or_insert_with(User::new);
            let body_bytes = envelope.body.len();
            if state.queue_len() - state.queued_receipts() >= self.limits.queue_messages_max
                || state.queued_bytes() + body_bytes > self.limits.queue_bytes_max
            {
                self.counters.copies_dropped += 1;
                continue;
            }
            let mut entry = Entry::of(&item);
            entry.keep = self.unkept.push(
                device,
                id,
                Pending::kept_here(envelope.body.clone(), None, None),
            );
            state.queue_mut().push(entry);
            self.shares.add(&entry);
            self.queued_bytes += body_bytes;
            self.queued_items += 1;
            self.actions.push(Action::Keep {
                user: device,
                item: item.clone(),
                keep: entry.keep,
            });
            self.push_queued(device);
        }
    }

    /// Links `device` to `account` (both here).
    fn link(&mut self, account: UserId, device: UserId) {
        if let Some(previous) = self.companions.insert(device, account) {
            if let Some(list) = self.devices.get_mut(&previous) {
                list.retain(|d| *d != device);
            }
        }
        let list = self.devices.entry(account).or_default();
        if !list.contains(&device) {
            list.push(device);
        }
    }

    fn unlink(&mut self, account: UserId, device: UserId) {
        if self.companions.get(&device) == Some(&account) {
            self.companions.remove(&device);
        }
        if let Some(list) = self.devices.get_mut(&account) {
            list.retain(|d| *d != device);
            if list.is_empty() {
                self.devices.remove(&account);
            }
        }
    }

    /// A removed device: its connection is closed and its queue deleted.
    fn forget_device(&mut self, device: UserId) {
        let Some(state) = self.users.get(&device) else {
            return;
        };
        if let Some(conn) = state.conn() {
            self.actions.push(Action::Close {
                conn,
                reason: GoAwayReason::DeviceRemoved,
                text: "this device was removed from its account",
            });
        }
        let items: Vec<(u64, ReceiptKind, u32)> = state
            .queue()
            .map(|queue| {
                queue
                    .items
                    .iter()
                    .map(|e| (e.ack_id(), e.kind(), e.keep))
                    .collect()
            })
            .unwrap_or_default();
        for (id, kind, keep) in items {
            if let Some((item, _)) = self.remove_item(device, id, kind, Some(keep)) {
                self.actions.push(Action::Forget {
                    user: device,
                    id,
                    kind,
                    keep: item.keep,
                });
                self.forget_replica(device, &item);
            }
        }
    }

    fn reply_devices(&mut self, conn: ConnRef, account: UserId) {
        let companions = self
            .devices
            .get(&account)
            .map_or_else(Vec::new, |list| list.iter().map(|d| (*d).into()).collect());
        self.actions.push(Action::Send {
            conn,
            stanza: Stanza::of(Kind::Devices(Devices {
                account: Some(account.into()),
                companions,
            })),
        });
    }

    fn conn_of(&self, user: UserId) -> Option<ConnRef> {
        self.users.get(&user).and_then(User::conn)
    }
}

/// The users a stanza names: at most `max`, each a valid id, a repeated one dropped (the
/// first kept, in order); else the Error's code and reason.
fn named_users(
    refs: &[UserRef],
    max: usize,
    too_many: &'static str,
    invalid: &'static str,
) -> Result<Vec<UserId>, (ErrorCode, &'static str)> {
    if refs.len() > max {
        return Err((ErrorCode::Limit, too_many));
    }
    let mut users = Vec::with_capacity(refs.len());
    let mut seen = foldhash::HashSet::default();
    for user in refs {
        let user = UserRef::user(Some(user)).ok_or((ErrorCode::BadUserId, invalid))?;
        if seen.insert(user) {
            users.push(user);
        }
    }
    Ok(users)
}

fn unknown_group() -> Stanza {
    Stanza::error(
        ErrorCode::UnknownGroup,
        "no such group, or you are not a member of it",
        None,
    )
}

fn too_many_members() -> Stanza {
    Stanza::error(
        ErrorCode::Limit,
        "the group would have more members than it may",
        None,
    )
}

/// Presence tells a last-seen time only to the minute: a watcher cannot time another user's
/// actions to the millisecond.
pub const LAST_SEEN_GRAIN_MS: u64 = 60_000;

/// A keyed SipHash whose `Debug` does not print the key.
struct Keyed(SipHasher13);

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyed(..)")
    }
}

/// The proof a Deliver of message `id` from `from` carries to `reader`, and that a Read of it
/// must show: only the device the message was delivered to has it.
fn read_proof(keyed: &Keyed, reader: UserId, from: UserId, id: u64) -> u64 {
    let mut input = [0u8; 40];
    input[..16].copy_from_slice(&reader.to_bytes());
    input[16..32].copy_from_slice(&from.to_bytes());
    input[32..].copy_from_slice(&id.to_le_bytes());
    keyed.0.hash(&input)
}

/// The recipient a Send names: in full (binding an alias when it gives one) or by an alias
/// bound earlier on the connection.
fn resolve_recipient(
    sending: &mut Sending,
    send: &Send,
) -> Result<UserId, (ErrorCode, &'static str)> {
    let alias = send.alias;
    if alias > ALIASES_MAX {
        return Err((ErrorCode::BadAlias, "alias out of range (1..=256)"));
    }
    let index = alias as usize;
    match (&send.to, alias) {
        (Some(to), _) => {
            let to = UserRef::user(Some(to))
                .ok_or((ErrorCode::BadUserId, "recipient id is not a valid user id"))?;
            if alias > 0 {
                if sending.aliases.len() < index {
                    sending.aliases.resize(index, None);
                }
                sending.aliases[index - 1] = Some(to);
            }
            Ok(to)
        }
        (None, 0) => Err((ErrorCode::BadUserId, "Send names no recipient")),
        (None, _) => sending
            .aliases
            .get(index - 1)
            .copied()
            .flatten()
            .ok_or((ErrorCode::BadAlias, "alias not bound on this connection")),
    }
}

impl User {
    fn new() -> Self {
        Self {
            conn: NO_CONN,
            last_seen_ms: 0,
            extra: None,
            bound: false,
            seen_s: 0,
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

    /// The connection's declarations and watches end; returns whom it watched, to unsubscribe.
    fn end_session(&mut self) -> Vec<UserId> {
        let Some(extra) = self.extra.as_mut() else {
            return Vec::new();
        };
        extra.sending = Sending::default();
        std::mem::take(&mut extra.watch.subscriptions)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Who may see this user's presence.
    fn privacy(&self) -> &Privacy {
        static EVERYONE: Privacy = Privacy {
            visibility: Visibility::Everyone,
            contacts: Vec::new(),
        };
        self.extra
            .as_ref()
            .and_then(|extra| extra.privacy.as_deref())
            .unwrap_or(&EVERYONE)
    }

    fn set_privacy(&mut self, privacy: Privacy) {
        if privacy.is_default() {
            if let Some(extra) = self.extra.as_mut() {
                extra.privacy = None;
            }
        } else {
            self.extra_mut().privacy = Some(Box::new(privacy));
        }
    }

    fn queue(&self) -> Option<&Queue> {
        self.extra.as_ref().map(|extra| &extra.queue)
    }

    fn queue_len(&self) -> usize {
        self.queue().map_or(0, |queue| queue.items.len())
    }

    fn queued_receipts(&self) -> usize {
        self.queue().map_or(0, |queue| queue.receipts)
    }

    fn queued_bytes(&self) -> usize {
        self.queue().map_or(0, |queue| queue.queued_bytes)
    }

    /// The queued message `id` from `from`, if there is one.
    fn queued_message(&self, id: u64, from: UserId) -> Option<Entry> {
        self.queue()?
            .items
            .iter()
            .find(|entry| entry.is_message() && entry.id == id && entry.peer == from)
            .copied()
    }

    /// Is the same receipt among the latest queued items?
    fn has_recent_twin(&self, receipt: &Entry) -> bool {
        self.queue().is_some_and(|queue| {
            queue
                .items
                .iter()
                .rev()
                .take(RECEIPT_TWIN_SCAN_MAX)
                .any(|entry| entry.acked_by(receipt.ack_id(), receipt.kind()))
        })
    }

    fn queue_mut(&mut self) -> &mut Queue {
        &mut self.extra_mut().queue
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
        &mut self.extra_mut().watch
    }

    /// True once, when the queue, the presence lists and the sending state have all become
    /// empty: the caller lists the user for [`Router::release_empty`]. Freeing at once would
    /// allocate the box again with the user's next message.
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
            && self.sending.is_empty()
            && self.privacy.is_none()
    }
}

impl Queue {
    fn push(&mut self, entry: Entry) {
        self.queued_bytes += entry.body_bytes();
        if !entry.is_message() {
            self.receipts += 1;
        }
        if entry.counts_for_sender() {
            let share = self.senders.entry(entry.peer).or_default();
            share.messages += 1;
            share.bytes += entry.body_bytes();
        }
        self.items.push_back(entry);
    }

    /// `entry` left the queue: its sender's share shrinks.
    fn took(&mut self, entry: &Entry) {
        if !entry.counts_for_sender() {
            return;
        }
        if let Some(share) = self.senders.get_mut(&entry.peer) {
            share.messages -= 1;
            share.bytes -= entry.body_bytes();
            if share.messages == 0 {
                self.senders.remove(&entry.peer);
            }
        }
    }

    fn share_of(&self, sender: UserId) -> Share {
        self.senders.get(&sender).copied().unwrap_or_default()
    }
}

/// The bytes each sender's messages take of a shard's queues.
#[derive(Debug, Default)]
struct ShardShares(HashMap<UserId, usize>);

impl ShardShares {
    fn add(&mut self, entry: &Entry) {
        if entry.counts_for_sender() {
            *self.0.entry(entry.peer).or_default() += entry.body_bytes();
        }
    }

    fn remove(&mut self, entry: &Entry) {
        if !entry.counts_for_sender() {
            return;
        }
        if let Some(bytes) = self.0.get_mut(&entry.peer) {
            *bytes -= entry.body_bytes();
            if *bytes == 0 {
                self.0.remove(&entry.peer);
            }
        }
    }

    fn of(&self, sender: UserId) -> usize {
        self.0.get(&sender).copied().unwrap_or(0)
    }
}

/// Why a message past its sender's share is refused.
pub const SHARE_TAKEN: &str =
    "you hold your share of the recipient's queue; message not taken until the recipient takes some";

/// `percent` of `max`, at least 1 (a share never refuses a sender's first item).
fn share_of(max: usize, percent: u8) -> usize {
    (max.saturating_mul(usize::from(percent)) / 100).max(1)
}

#[cfg(test)]
mod tests;
