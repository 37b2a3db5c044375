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
    include!(concat!(env!("OUT_DIR"), "/hop.v1.rs"));
}

pub use generated::stanza::Kind;
pub use generated::{
    Ack, Deliver, Error, ErrorCode, GoAway, GoAwayReason, Ping, Pong, Presence, Read, Receipt,
    ReceiptKind, Send, ServerAck, Stanza, Subscribe, Unsubscribe,
};

/// The largest message body a client may send. With the stanza's other fields it still fits in
/// one frame: a stanza never spans frames.
pub const BODY_BYTES_MAX: usize = 64 * 1024 - 1024;
/// Room left in a frame for a Deliver's fields besides the body.
const STANZA_OVERHEAD_BYTES_MAX: usize = 64;
const _: () = assert!(BODY_BYTES_MAX + STANZA_OVERHEAD_BYTES_MAX <= FRAME_PLAINTEXT_BYTES_MAX);

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

impl Stanza {
    pub fn of(kind: Kind) -> Self {
        Self { kind: Some(kind) }
    }

    pub fn send(to: UserId, seq: u32, body: Bytes) -> Self {
        Self::of(Kind::Send(Send {
            to: to.get(),
            seq,
            body,
        }))
    }

    /// A message pushed to its recipient; `from` is filled in by the server.
    pub fn deliver(from: UserId, id: u64, timestamp_ms: u64, body: Bytes) -> Self {
        Self::of(Kind::Deliver(Deliver {
            from: from.get(),
            id,
            timestamp_ms,
            body,
        }))
    }

    pub fn error(code: ErrorCode, reason: impl Into<String>, seq: u32) -> Self {
        Self::of(Kind::Error(Error {
            code: code as i32,
            reason: reason.into(),
            seq,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FRAME_HEADER_BYTES;
    use crate::noise::TAG_BYTES;
    use crate::user::USER_ID_MAX;

    #[test]
    fn five_byte_text_budget() {
        // The worst case for the recipient id (the largest id, 7 varint bytes) and a sequence
        // number a client reaches after 127 messages on one connection (2 varint bytes).
        let to = UserId::new(USER_ID_MAX).unwrap();
        let stanza = Stanza::send(to, 300, Bytes::from_static(b"hello"));
        let plaintext = encoded_bytes(&stanza);
        let wire = FRAME_HEADER_BYTES + plaintext + TAG_BYTES;
        assert_eq!(plaintext, 21);
        assert_eq!(
            wire, 39,
            "a 5-byte text must cost at most 40 bytes on the wire"
        );
        // The common case: sequence number under 128.
        let small_seq = Stanza::send(to, 5, Bytes::from_static(b"hello"));
        assert_eq!(
            FRAME_HEADER_BYTES + encoded_bytes(&small_seq) + TAG_BYTES,
            38
        );
    }

    #[test]
    fn several_stanzas_round_trip_in_one_plaintext() {
        let to = UserId::new(42).unwrap();
        let sent = [
            Stanza::send(to, 1, Bytes::from_static(b"a")),
            Stanza::of(Kind::Ping(Ping { nonce: 9 })),
            Stanza::error(ErrorCode::QueueFull, "full", 1),
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
    }

    #[test]
    fn truncated_or_garbage_plaintext_is_an_error() {
        let mut plaintext = Vec::new();
        encode(
            &Stanza::send(UserId::new(7).unwrap(), 1, Bytes::from_static(b"abc")),
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
        let deliver = Stanza::of(Kind::Deliver(Deliver {
            from: USER_ID_MAX,
            id: u64::MAX,
            timestamp_ms: u64::MAX,
            body: Bytes::from(vec![0u8; BODY_BYTES_MAX]),
        }));
        assert!(encoded_bytes(&deliver) <= FRAME_PLAINTEXT_BYTES_MAX);
    }
}
