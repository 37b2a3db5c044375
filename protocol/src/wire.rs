//! Stanzas: the protobuf messages of `proto/hop.proto`, and their codec.
//!
//! A frame's plaintext is one or more stanzas, each a varint length and an encoded `Stanza`.

use bytes::Bytes;
use prost::Message;
use thiserror::Error;

use crate::keys::KEY_BYTES;
use crate::noise::FRAME_PLAINTEXT_BYTES_MAX;
use crate::user::UserId;

#[allow(clippy::all, missing_debug_implementations)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/hop.v2.rs"));
}

pub use generated::stanza::Kind;
pub use generated::{device_change, group_change};
pub use generated::{
    Ack, Deliver, DeviceChange, Devices, Error, ErrorCode, GoAway, GoAwayReason, GroupChange,
    GroupEvent, GroupInfo, NodeAck, NodeMail, Outbox, Ping, Pong, Presence, PresenceSettings, Read,
    Receipt, ReceiptKind, Register, Send, ServerAck, Stanza, Subscribe, Unsubscribe, UserRef,
    Visibility,
};

/// The largest message body a client may send. With the stanza's other fields it still fits in
/// one frame: a stanza never spans frames.
pub const BODY_BYTES_MAX: usize = 64 * 1024 - 1024;
/// Room left in a frame for a Deliver's fields besides the body.
const STANZA_OVERHEAD_BYTES_MAX: usize = 96;
const _: () = assert!(BODY_BYTES_MAX + STANZA_OVERHEAD_BYTES_MAX <= FRAME_PLAINTEXT_BYTES_MAX);
/// Members one group may have (a server's `group_members_max` may be lower).
pub const GROUP_MEMBERS_MAX: usize = 1024;
/// Bytes of UTF-8 in a group's name.
pub const GROUP_NAME_BYTES_MAX: usize = 100;
/// The aliases one connection may bind (`Send.alias` is 1..=this).
pub const ALIASES_MAX: u32 = 256;
/// Contacts one `PresenceSettings` may name.
pub const CONTACTS_MAX: usize = 1024;

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("frame carries no stanza")]
    Empty,
    #[error("stanza does not decode: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// Appends `stanza` with its varint length.
pub fn encode(stanza: &Stanza, out: &mut Vec<u8>) {
    stanza
        .encode_length_delimited(out)
        .expect("a Vec grows to fit any stanza");
}

/// A stanza measured once for encoding: its bytes are known before they are written, and the
/// two stanzas every message brings to a client (Deliver and Receipt) are written by hand.
/// prost computes a nested message's length again at every level; for these two, with their
/// nested `UserRef`, that was a tenth of the server's encoding work. The bytes are exactly
/// prost's (tests compare them field by field).
#[derive(Debug, Clone, Copy)]
pub struct Measured<'a> {
    stanza: &'a Stanza,
    /// The `Stanza` message's length, without the length prefix.
    encoded_len: usize,
}

impl<'a> Measured<'a> {
    pub fn of(stanza: &'a Stanza) -> Self {
        let encoded_len = match &stanza.kind {
            // A group event is rare and nested deeper: prost's own path.
            Some(Kind::Deliver(deliver)) if deliver.event.is_none() => {
                field_len(deliver_len(deliver))
            }
            Some(Kind::Receipt(receipt)) => field_len(receipt_len(receipt)),
            _ => stanza.encoded_len(),
        };
        debug_assert_eq!(encoded_len, stanza.encoded_len());
        Self {
            stanza,
            encoded_len,
        }
    }

    /// The bytes `encode` appends: the varint length and the stanza.
    pub fn bytes(&self) -> usize {
        prost::length_delimiter_len(self.encoded_len) + self.encoded_len
    }

    /// Appends the stanza with its varint length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.bytes());
        varint(self.encoded_len as u64, out);
        match &self.stanza.kind {
            Some(Kind::Deliver(deliver)) if deliver.event.is_none() => {
                out.push(STANZA_DELIVER_TAG);
                varint(deliver_len(deliver) as u64, out);
                encode_deliver(deliver, out);
            }
            Some(Kind::Receipt(receipt)) => {
                out.push(STANZA_RECEIPT_TAG);
                varint(receipt_len(receipt) as u64, out);
                encode_receipt(receipt, out);
            }
            _ => self.stanza.encode_raw(out),
        }
    }
}

/// Protobuf keys (field number << 3 | wire type) of the hand-written stanzas: wire type 0 is a
/// varint, 1 a fixed64, 2 a length-delimited field.
const STANZA_DELIVER_TAG: u8 = 3 << 3 | 2;
const STANZA_RECEIPT_TAG: u8 = 6 << 3 | 2;
const FIXED64_BYTES: usize = 1 + 8;

fn varint(value: u64, out: &mut Vec<u8>) {
    prost::encoding::encode_varint(value, out);
}

fn varint_len(value: u64) -> usize {
    prost::encoding::encoded_len_varint(value)
}

/// A length-delimited field of `len` bytes, with its one-byte key.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn fixed64_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        FIXED64_BYTES
    }
}

fn fixed64(key: u8, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        out.push(key);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + varint_len(value)
    }
}

fn varint_field(key: u8, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        out.push(key);
        varint(value, out);
    }
}

fn user_ref_len(user: &UserRef) -> usize {
    fixed64_len(user.high) + fixed64_len(user.low)
}

fn user_ref_field_len(user: Option<&UserRef>) -> usize {
    user.map_or(0, |user| field_len(user_ref_len(user)))
}

fn user_ref_field(key: u8, user: Option<&UserRef>, out: &mut Vec<u8>) {
    if let Some(user) = user {
        out.push(key);
        varint(user_ref_len(user) as u64, out);
        fixed64(1 << 3 | 1, user.high, out);
        fixed64(2 << 3 | 1, user.low, out);
    }
}

fn deliver_len(deliver: &Deliver) -> usize {
    user_ref_field_len(deliver.from.as_ref())
        + fixed64_len(deliver.id)
        + varint_field_len(deliver.timestamp_ms)
        + if deliver.body.is_empty() {
            0
        } else {
            field_len(deliver.body.len())
        }
        + fixed64_len(deliver.proof)
        + user_ref_field_len(deliver.to.as_deref())
        + user_ref_field_len(deliver.group.as_deref())
}

fn encode_deliver(deliver: &Deliver, out: &mut Vec<u8>) {
    user_ref_field(1 << 3 | 2, deliver.from.as_ref(), out);
    fixed64(2 << 3 | 1, deliver.id, out);
    varint_field(3 << 3, deliver.timestamp_ms, out);
    if !deliver.body.is_empty() {
        out.push(4 << 3 | 2);
        varint(deliver.body.len() as u64, out);
        out.extend_from_slice(&deliver.body);
    }
    fixed64(5 << 3 | 1, deliver.proof, out);
    user_ref_field(6 << 3 | 2, deliver.to.as_deref(), out);
    user_ref_field(7 << 3 | 2, deliver.group.as_deref(), out);
}

fn receipt_len(receipt: &Receipt) -> usize {
    fixed64_len(receipt.id)
        + varint_field_len(i64::from(receipt.kind) as u64)
        + user_ref_field_len(receipt.by.as_ref())
        + varint_field_len(receipt.timestamp_ms)
}

fn encode_receipt(receipt: &Receipt, out: &mut Vec<u8>) {
    fixed64(1 << 3 | 1, receipt.id, out);
    // An enum is an int32 varint: a negative value takes ten bytes, as prost writes it.
    varint_field(2 << 3, i64::from(receipt.kind) as u64, out);
    user_ref_field(3 << 3 | 2, receipt.by.as_ref(), out);
    varint_field(4 << 3, receipt.timestamp_ms, out);
}

/// The bytes `encode` appends for `stanza`.
pub fn encoded_bytes(stanza: &Stanza) -> usize {
    let length = stanza.encoded_len();
    prost::length_delimiter_len(length) + length
}

/// Decodes every stanza in one frame's plaintext, in order. A stanza with no kind set (an
/// unknown kind from a newer peer) is passed on as `Stanza { kind: None }`.
///
/// A frame of at most [`SHARED_FRAME_BYTES_MAX`] is copied once into a buffer that the
/// message bodies it carries share (a body is a slice of it, until the last is dropped): one
/// allocation per frame rather than two per message (the body's copy, then the shared header
/// its first clone makes). A larger frame gives each body a copy of its own, so that a small
/// message held until it is on disk never holds a large frame with it.
pub fn decode_all<E: From<DecodeError>>(
    plaintext: &[u8],
    on_stanza: &mut dyn FnMut(Stanza) -> Result<(), E>,
) -> Result<(), E> {
    if plaintext.is_empty() {
        return Err(DecodeError::Empty.into());
    }
    if plaintext.len() <= SHARED_FRAME_BYTES_MAX {
        decode_from(Bytes::copy_from_slice(plaintext), on_stanza)
    } else {
        decode_from(plaintext, on_stanza)
    }
}

/// The largest frame plaintext whose bodies share one buffer ([`decode_all`]).
pub const SHARED_FRAME_BYTES_MAX: usize = 16 * 1024;

fn decode_from<E: From<DecodeError>>(
    mut plaintext: impl bytes::Buf,
    on_stanza: &mut dyn FnMut(Stanza) -> Result<(), E>,
) -> Result<(), E> {
    while plaintext.has_remaining() {
        let stanza = Stanza::decode_length_delimited(&mut plaintext).map_err(DecodeError::from)?;
        on_stanza(stanza)?;
    }
    Ok(())
}

impl From<UserId> for UserRef {
    fn from(user: UserId) -> Self {
        Self {
            high: user.high(),
            low: user.low(),
        }
    }
}

impl UserRef {
    /// The id this names, or `None` when it is missing or not a valid id.
    pub fn user(reference: Option<&UserRef>) -> Option<UserId> {
        reference.and_then(|user| UserId::from_halves(user.high, user.low))
    }
}

/// The id a device's Ack names for a Receipt: the message id mixed with who the receipt is
/// from, so that the receipts of one message from several devices or group members are told
/// apart (each is queued, kept and acked on its own). Public and unkeyed: the client computes
/// it from the Receipt it got (`Receipt::ack_id`).
pub fn receipt_ack_id(id: u64, by: UserId) -> u64 {
    let fold = by.high().rotate_left(23) ^ by.low();
    // An odd multiplier is a bijection: two receipts of one message share an ack id only when
    // their `by` fold alike (2^-64 for ids that are hashes).
    id ^ fold.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl GroupEvent {
    /// The event as a queued item's body: how the server keeps it until the member acks it.
    pub fn to_body(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// The event kept as `body`; `None` if those bytes are not one.
    pub fn from_body(body: &[u8]) -> Option<Self> {
        Self::decode(body).ok()
    }
}

impl Receipt {
    /// What an Ack of this receipt names (`None` when `by` is not a valid id).
    pub fn ack_id(&self) -> Option<u64> {
        UserRef::user(self.by.as_ref()).map(|by| receipt_ack_id(self.id, by))
    }
}

/// A client message id: the outbox the client chose and the message's number in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageRef {
    pub outbox: u64,
    pub seq: u64,
}

impl Stanza {
    pub fn of(kind: Kind) -> Self {
        Self { kind: Some(kind) }
    }

    /// A Send naming its recipient in full (and binding `alias` to it, unless 0).
    pub fn send(to: UserId, seq: u64, body: Bytes, alias: u32) -> Self {
        Self::of(Kind::Send(Send {
            to: Some(to.into()),
            seq,
            body,
            alias,
            resend: false,
        }))
    }

    /// A Send to the recipient bound to `alias` on this connection.
    pub fn send_to_alias(alias: u32, seq: u64, body: Bytes) -> Self {
        Self::of(Kind::Send(Send {
            to: None,
            seq,
            body,
            alias,
            resend: false,
        }))
    }

    /// Marks a Send as a resend (the server looks for the original first); other stanzas are
    /// left as they are.
    pub fn into_resend(mut self) -> Self {
        if let Some(Kind::Send(send)) = &mut self.kind {
            send.resend = true;
        }
        self
    }

    pub fn outbox(id: u64) -> Self {
        Self::declare_outbox(id, false)
    }

    /// `Outbox{id}`, and with `delivered_in_ack` the second tick of a message its recipient
    /// acks before the server's ack leaves comes in that ServerAck (`delivered_ms`).
    pub fn declare_outbox(id: u64, delivered_in_ack: bool) -> Self {
        Self::of(Kind::Outbox(Outbox {
            id,
            delivered_in_ack,
        }))
    }

    /// A message pushed to its recipient; `from` is filled in by the server.
    pub fn deliver(from: UserId, id: u64, timestamp_ms: u64, body: Bytes, proof: u64) -> Self {
        Self::of(Kind::Deliver(Deliver {
            from: Some(from.into()),
            id,
            timestamp_ms,
            body,
            proof,
            to: None,
            group: None,
            event: None,
        }))
    }

    /// A member's copy of a message `from` another member of `group`; or (`event`) of a change
    /// of the group that member `from` made, kept with the encoded `GroupEvent` as its body and
    /// pushed with it as `event` (bytes that do not decode, which a server never keeps, go as
    /// an empty event rather than not at all).
    pub fn deliver_group(
        from: UserId,
        group: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
        proof: u64,
        event: bool,
    ) -> Self {
        let (body, event) = if event {
            let event = GroupEvent::from_body(&body).unwrap_or_default();
            (Bytes::new(), Some(event))
        } else {
            (body, None)
        };
        let mut stanza = Self::deliver(from, id, timestamp_ms, body, proof);
        if let Some(Kind::Deliver(deliver)) = &mut stanza.kind {
            deliver.group = Some(Box::new(group.into()));
            deliver.event = event.map(Box::new);
        }
        stanza
    }

    /// A copy, for another device of `account`, of a message one of its devices sent to `to`.
    pub fn deliver_sent(
        account: UserId,
        to: UserId,
        id: u64,
        timestamp_ms: u64,
        body: Bytes,
    ) -> Self {
        let mut stanza = Self::deliver(account, id, timestamp_ms, body, 0);
        if let Some(Kind::Deliver(deliver)) = &mut stanza.kind {
            deliver.to = Some(Box::new(to.into()));
        }
        stanza
    }

    /// An Error about the Send (`message`), or about nothing in particular (`None`).
    pub fn error(code: ErrorCode, reason: impl Into<String>, message: Option<MessageRef>) -> Self {
        let message = message.unwrap_or(MessageRef { outbox: 0, seq: 0 });
        Self::of(Kind::Error(Error {
            code: code as i32,
            reason: reason.into(),
            seq: message.seq,
            outbox: message.outbox,
        }))
    }

    pub fn go_away(reason: GoAwayReason, text: impl Into<String>) -> Self {
        Self::go_away_retry_after(reason, text, 0)
    }

    /// A GoAway with a hint of how long the client should wait before it connects again.
    pub fn go_away_retry_after(
        reason: GoAwayReason,
        text: impl Into<String>,
        retry_after_ms: u32,
    ) -> Self {
        Self::of(Kind::GoAway(GoAway {
            reason: reason as i32,
            text: text.into(),
            retry_after_ms,
            ..GoAway::default()
        }))
    }

    /// A GoAway sending the client to the node that is its home: `address` ("host:port") and
    /// that node's static key, which the client pins for the new connection.
    pub fn go_away_redirect(address: impl Into<String>, key: &[u8; KEY_BYTES]) -> Self {
        let address = address.into();
        Self::of(Kind::GoAway(GoAway {
            reason: GoAwayReason::Redirect as i32,
            text: format!("this user's home is another node of the cluster: {address}"),
            retry_after_ms: 0,
            redirect_address: address,
            redirect_key: Bytes::copy_from_slice(key),
        }))
    }

    /// A short name of the kind, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            None => "unknown",
            Some(Kind::Send(_)) => "Send",
            Some(Kind::ServerAck(_)) => "ServerAck",
            Some(Kind::Deliver(_)) => "Deliver",
            Some(Kind::Ack(_)) => "Ack",
            Some(Kind::Read(_)) => "Read",
            Some(Kind::Receipt(_)) => "Receipt",
            Some(Kind::Presence(_)) => "Presence",
            Some(Kind::Subscribe(_)) => "Subscribe",
            Some(Kind::Unsubscribe(_)) => "Unsubscribe",
            Some(Kind::Ping(_)) => "Ping",
            Some(Kind::Pong(_)) => "Pong",
            Some(Kind::Error(_)) => "Error",
            Some(Kind::GoAway(_)) => "GoAway",
            Some(Kind::Outbox(_)) => "Outbox",
            Some(Kind::PresenceSettings(_)) => "PresenceSettings",
            Some(Kind::DeviceChange(_)) => "DeviceChange",
            Some(Kind::Devices(_)) => "Devices",
            Some(Kind::GroupChange(_)) => "GroupChange",
            Some(Kind::GroupInfo(_)) => "GroupInfo",
            Some(Kind::NodeMail(_)) => "NodeMail",
            Some(Kind::NodeAck(_)) => "NodeAck",
            Some(Kind::Register(_)) => "Register",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FRAME_HEADER_BYTES;
    use crate::noise::TAG_BYTES;

    fn user(seed: u8) -> UserId {
        UserId::from_public_key(&[seed; 32])
    }

    fn wire_bytes(stanza: &Stanza) -> usize {
        FRAME_HEADER_BYTES + encoded_bytes(stanza) + TAG_BYTES
    }

    #[test]
    fn five_byte_text_budget() {
        // The common case: a recipient already bound to an alias on this connection, a
        // message number under 128.
        let common = Stanza::send_to_alias(1, 5, Bytes::from_static(b"hello"));
        assert_eq!(
            wire_bytes(&common),
            32,
            "a 5-byte text must cost at most 40 bytes on the wire"
        );
        // A connection's 128th message and on: one more varint byte; its 16,384th: two.
        assert_eq!(
            wire_bytes(&Stanza::send_to_alias(
                ALIASES_MAX,
                300,
                Bytes::from_static(b"hello")
            )),
            34
        );
        assert_eq!(
            wire_bytes(&Stanza::send_to_alias(
                1,
                20_000,
                Bytes::from_static(b"hello")
            )),
            34
        );
        // The first message to a recipient names it in full (20 bytes) and binds the alias.
        let first = Stanza::send(user(1), 5, Bytes::from_static(b"hello"), 1);
        assert_eq!(wire_bytes(&first), 52);
        // Once per connection (and per outbox switch): the outbox, 12 bytes of plaintext.
        assert_eq!(encoded_bytes(&Stanza::outbox(u64::MAX)), 12);
        assert_eq!(encoded_bytes(&Stanza::declare_outbox(u64::MAX, true)), 14);
    }

    /// `stanzas` encoded into one plaintext, and what `decode_all` makes of it.
    fn round_trip(stanzas: &[Stanza]) -> (Vec<u8>, Vec<Stanza>) {
        let mut plaintext = Vec::new();
        for stanza in stanzas {
            encode(stanza, &mut plaintext);
        }
        let mut seen = Vec::new();
        decode_all::<DecodeError>(&plaintext, &mut |s| {
            seen.push(s);
            Ok(())
        })
        .unwrap();
        (plaintext, seen)
    }

    #[test]
    fn several_stanzas_round_trip_in_one_plaintext() {
        let sent = [
            Stanza::outbox(0xDEAD_BEEF),
            Stanza::send(user(1), 1, Bytes::from_static(b"a"), 3),
            Stanza::send_to_alias(3, 2, Bytes::from_static(b"b")),
            Stanza::of(Kind::Ping(Ping { nonce: 9 })),
            Stanza::error(
                ErrorCode::QueueFull,
                "full",
                Some(MessageRef { outbox: 7, seq: 1 }),
            ),
        ];
        let seen = round_trip(&sent).1;
        assert_eq!(seen, sent);
        let Some(Kind::Send(send)) = &seen[1].kind else {
            panic!("a Send");
        };
        assert_eq!(UserRef::user(send.to.as_ref()), Some(user(1)));
    }

    #[test]
    fn a_frame_past_the_shared_size_decodes_alike() {
        let big = Bytes::from(vec![7u8; SHARED_FRAME_BYTES_MAX]);
        let sent = [
            Stanza::send(user(1), 1, Bytes::from_static(b"small"), 0),
            Stanza::send(user(2), 2, big, 0),
        ];
        for stanzas in [&sent[..1], &sent[..]] {
            let (plaintext, seen) = round_trip(stanzas);
            assert_eq!(seen, stanzas, "a frame of {} bytes", plaintext.len());
            assert_eq!(plaintext.len() > SHARED_FRAME_BYTES_MAX, stanzas.len() == 2);
        }
        // Garbage after a valid stanza fails the same way on both paths.
        for len in [64, SHARED_FRAME_BYTES_MAX + 64] {
            let mut plaintext = Vec::new();
            encode(&sent[0], &mut plaintext);
            plaintext.resize(len, 0xff);
            assert!(decode_all::<DecodeError>(&plaintext, &mut |_| Ok(())).is_err());
        }
    }

    #[test]
    fn a_missing_or_zero_user_ref_names_no_user() {
        assert_eq!(UserRef::user(None), None);
        assert_eq!(UserRef::user(Some(&UserRef { high: 0, low: 9 })), None);
    }

    #[test]
    fn truncated_or_garbage_plaintext_is_an_error() {
        let mut plaintext = Vec::new();
        encode(
            &Stanza::send(user(7), 1, Bytes::from_static(b"abc"), 0),
            &mut plaintext,
        );
        for cut in 1..plaintext.len() {
            let result = decode_all::<DecodeError>(&plaintext[..cut], &mut |_| Ok(()));
            assert!(result.is_err(), "cut at {cut}");
        }
        assert!(decode_all::<DecodeError>(&[0xff, 0xff, 0xff], &mut |_| Ok(())).is_err());
        assert!(decode_all::<DecodeError>(&[], &mut |_| Ok(())).is_err());
    }

    #[test]
    fn largest_body_fits_one_frame_as_a_deliver() {
        let deliver = Stanza::deliver(
            user(1),
            u64::MAX,
            u64::MAX,
            Bytes::from(vec![0u8; BODY_BYTES_MAX]),
            u64::MAX,
        );
        assert!(encoded_bytes(&deliver) <= FRAME_PLAINTEXT_BYTES_MAX);
        let copy = Stanza::deliver_sent(
            user(1),
            user(2),
            u64::MAX,
            u64::MAX,
            Bytes::from(vec![0u8; BODY_BYTES_MAX]),
        );
        assert!(encoded_bytes(&copy) <= FRAME_PLAINTEXT_BYTES_MAX);
    }

    /// The hand-written Deliver and Receipt bytes are prost's, for every field present or
    /// absent, small and large values, and negative enum values.
    #[test]
    fn hand_written_stanzas_are_the_bytes_prost_writes() {
        let users = [
            None,
            Some(UserRef { high: 0, low: 0 }),
            Some(UserRef { high: 1, low: 0 }),
            Some(user(3).into()),
        ];
        let numbers = [0, 1, 127, 128, u64::MAX];
        let bodies = [
            Bytes::new(),
            Bytes::from_static(b"x"),
            Bytes::from(vec![7u8; 300]),
        ];
        let mut stanzas = Vec::new();
        for from in &users {
            for &number in &numbers {
                for body in &bodies {
                    for to in [None, from.map(Box::new), Some(Box::new(user(5).into()))] {
                        for group in [None, Some(Box::new(user(6).into()))] {
                            stanzas.push(Stanza::of(Kind::Deliver(Deliver {
                                from: *from,
                                id: number,
                                timestamp_ms: number.rotate_left(7),
                                body: body.clone(),
                                proof: number ^ 1,
                                to: to.clone(),
                                group,
                                event: None,
                            })));
                        }
                    }
                }
                for kind in [0, 1, 2, -1, i32::MAX] {
                    stanzas.push(Stanza::of(Kind::Receipt(Receipt {
                        id: number,
                        kind,
                        by: *from,
                        timestamp_ms: number >> 3,
                    })));
                }
            }
        }
        for stanza in &stanzas {
            let mut by_prost = Vec::new();
            encode(stanza, &mut by_prost);
            let measured = Measured::of(stanza);
            let mut by_hand = Vec::new();
            measured.encode(&mut by_hand);
            assert_eq!(by_hand, by_prost, "{stanza:?}");
            assert_eq!(measured.bytes(), by_prost.len());
        }
    }
}
