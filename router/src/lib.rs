//! Per-shard routing, sans-IO.
//!
//! One [`Router`] per shard owns the users whose home shard it is: their key binding, their
//! connection (if online), their queue of items waiting for the device's Ack, their presence
//! and who watches it. It takes events — a user connected, a stanza from a user, a message from
//! another shard — with the current time, and produces [`Action`]s for the shard loop to carry
//! out: push a stanza to a local connection, forward a [`ShardMessage`] to another shard, close
//! a connection, persist a binding. It does no IO and takes no locks.
//!
//! Call order: any `handle_*` method, then carry out [`Router::swap_actions`] until it hands
//! over none.
//!
//! The ticks:
//! - one tick (`ServerAck`): the recipient's home shard took the message into its queue and it
//!   is kept on disk ([`Action::Keep`], confirmed by [`Router::handle_kept`]), or the
//!   recipient's device acked it, whichever comes first;
//! - two ticks (`Receipt` delivered): the recipient's device acked the `Deliver`;
//! - blue (`Receipt` read): the recipient reported it read.
//!
//! Receipts are queued for their sender like messages and removed when the sender's device
//! acks them ([`Action::Forget`] lets the disk drop them). Queues are bounded per user and per
//! shard, messages and receipts each with their own quota, so receipts can never fill the room
//! a user's incoming messages need.
//!
//! Groups: a group lives on its home shard (the hash of its id, like a user's), which keeps
//! its members and fans each message out to every other member through the members' home
//! shards, like 1:1 messages but named by the group. The sender's ServerAck waits until every
//! member's shard answered (each once its copies are durable or acked). Membership changes
//! reach the members the same way, as events queued in order with the messages.
//!
//! The delivery contract (`docs/protocol.md`):
//! - a message's server id is a keyed hash of (sender, recipient, outbox, seq), the client's id
//!   of it: every copy has the same id, so a resend of a message still queued is answered with
//!   the original's ServerAck instead of being queued twice, and a recipient drops a second
//!   Deliver by (from, id);
//! - a ServerAck or a refusal goes only to the connection that sent the message, and is
//!   dropped if that connection has gone (the client sends again);
//! - a Read counts only with the proof its Deliver carried to the reader.
#![forbid(unsafe_code)]

pub mod mail;
pub mod quota;
mod router;
mod unkept;

pub use router::{
    home_shard, Action, Counters, Delivered, Envelope, GroupCopy, GroupRequest, GroupSnapshot,
    Limits, Locality, Privacy, PushedItem, Queued, Replica, Router, Secrets, SendTo, SessionState,
    ShardMessage, UserReport, Violation, LAST_SEEN_GRAIN_MS,
};
pub use unkept::NO_KEEP;

/// A shard's index, `0..shards`.
pub type ShardId = u16;

/// The shard loop's handle for one connection. Opaque to the router, which only hands it back
/// in actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef(pub u64);
