//! `wire::decode_all` on the plaintext of one frame, of any content.
//!
//! Properties:
//! - an empty plaintext is refused as `Empty`;
//! - the stanzas that decode, re-encoded with `wire::encode`, decode again to the same stanzas
//!   (the input need not come back byte for byte: protobuf allows unknown fields, repeated
//!   fields and long varints, which decoding drops or normalises);
//! - that re-encoding is canonical: encoding the stanzas decoded from it gives it back;
//! - `wire::encoded_bytes` is the length `wire::encode` appends;
//! - a non-empty plaintext that yields no stanza is an error.
//!
//! A re-encoding may be longer than its input (an enum sent as a 5-byte varint decodes to a
//! negative `i32`, which encodes in 10 bytes), so no size relation is checked.
#![no_main]

use hop_protocol::wire::{self, DecodeError, Stanza};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|plaintext: &[u8]| {
    let mut decoded = Vec::new();
    let result = wire::decode_all::<DecodeError>(plaintext, &mut |stanza| {
        decoded.push(stanza);
        Ok(())
    });
    if plaintext.is_empty() {
        assert!(matches!(result, Err(DecodeError::Empty)));
        return;
    }
    // Stanzas before a bad one are passed on; they too must round-trip.
    let encoded = encode_all(&decoded);
    if decoded.is_empty() {
        assert!(
            result.is_err(),
            "a non-empty plaintext decoded to no stanza"
        );
        return;
    }
    let again = decode(&encoded);
    assert_eq!(
        again, decoded,
        "re-encoded stanzas decode to the same stanzas"
    );
    assert_eq!(encode_all(&again), encoded, "re-encoding is canonical");
});

fn encode_all(stanzas: &[Stanza]) -> Vec<u8> {
    let mut out = Vec::new();
    for stanza in stanzas {
        let before = out.len();
        wire::encode(stanza, &mut out);
        assert_eq!(out.len() - before, wire::encoded_bytes(stanza));
    }
    out
}

fn decode(plaintext: &[u8]) -> Vec<Stanza> {
    let mut decoded = Vec::new();
    wire::decode_all::<DecodeError>(plaintext, &mut |stanza| {
        decoded.push(stanza);
        Ok(())
    })
    .expect("stanzas encoded by hop decode");
    decoded
}
