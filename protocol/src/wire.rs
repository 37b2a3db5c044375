//! Stanzas: the protobuf messages of `proto/hop.proto`, and their codec.
//!
//! A frame's plaintext is one or more stanzas, each a varint length and an encoded `Stanza`.

use bytes::Bytes;
use prost::Message;
use thiserror::Error;

use crate::noise::FRAME_PLAINTEXT_BYTES_MAX;
use crate::user::UserId;

#[allow(clippy::all, missing_debug_implementations)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/hop.v2.rs"));
}

pub use generated::stanza::Kind;
pub use generated::{
    Ack, Deliver, Error, ErrorCode, GoAway, GoAwayReason, Outbox, Ping, Pong, Presence,
    PresenceSettings, Read, Receipt, ReceiptKind, Send, ServerAck, Stanza, Subscribe, Unsubscribe,
    UserRef, Visibility,
};

/// The largest message body a client may send. With the stanza's other fields it still fits in
/// one frame: a stanza never spans frames.
pub const BODY_BYTES_MAX: usize = 64 * 1024 - 1024;
/// Room left in a frame for a Deliver's fields besides the body.
const STANZA_OVERHEAD_BYTES_MAX: usize = 96;
const _: () = assert!(BODY_BYTES_MAX + STANZA_OVERHEAD_BYTES_MAX <= FRAME_PLAINTEXT_BYTES_MAX);
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

/// The bytes `encode` appends for `stanza`.
pub fn encoded_bytes(stanza: &Stanza) -> usize {
    let length = stanza.encoded_len();
    prost::length_delimiter_len(length) + length
}

/// Decodes every stanza in one frame's plaintext, in order. A stanza with no kind set (an
/// unknown kind from a newer peer) is passed on as `Stanza { kind: None }`.
pub fn decode_all<E: From<DecodeError>>(
    mut plaintext: &[u8],
    on_stanza: &mut dyn FnMut(Stanza) -> Result<(), E>,
) -> Result<(), E> {
    if plaintext.is_empty() {
        return Err(DecodeError::Empty.into());
    }
    while !plaintext.is_empty() {
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
        }))
    }

    /// A Send to the recipient bound to `alias` on this connection.
    pub fn send_to_alias(alias: u32, seq: u64, body: Bytes) -> Self {
        Self::of(Kind::Send(Send {
            to: None,
            seq,
            body,
            alias,
        }))
    }

    pub fn outbox(id: u64) -> Self {
        Self::of(Kind::Outbox(Outbox { id }))
    }

    /// A message pushed to its recipient; `from` is filled in by the server.
    pub fn deliver(from: UserId, id: u64, timestamp_ms: u64, body: Bytes, proof: u64) -> Self {
        Self::of(Kind::Deliver(Deliver {
            from: Some(from.into()),
            id,
            timestamp_ms,
            body,
            proof,
        }))
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
        Self::of(Kind::GoAway(GoAway {
            reason: reason as i32,
            text: text.into(),
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
        let mut plaintext = Vec::new();
        for stanza in &sent {
            encode(stanza, &mut plaintext);
        }
        let mut seen = Vec::new();
        decode_all::<DecodeError>(&plaintext, &mut |s| {
            seen.push(s);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, sent);
        let Some(Kind::Send(send)) = &seen[1].kind else {
            panic!("a Send");
        };
        assert_eq!(UserRef::user(send.to.as_ref()), Some(user(1)));
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
    }
}
