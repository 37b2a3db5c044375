//! `noise::ClientHandshake::handle_response`: message 2 from a hostile server.
//!
//! Input: see `hop_fuzz::RESPONSE_RAW` and its neighbours: message 2 as given, or the genuine
//! message 2 of a real server with the input XORed over it, or cut and extended by it.
//!
//! Properties:
//! - the client accepts message 2 only if it is byte for byte the genuine one (every byte is
//!   authenticated: the ephemeral key through the handshake hash, the static key and the payload
//!   by their AEAD tags), and then returns the server's static key;
//! - after accepting, a second message 2 is out of order, `finish` writes a message 3 that the
//!   server accepts, and the server learns the client's key.
#![no_main]

use hop_fuzz::{
    awaiting_response, client_key, server_key, Reader, Seen, RESPONSE_CUT_AND_APPEND, RESPONSE_RAW,
    RESPONSE_XOR, SCRATCH_BYTES,
};
use hop_protocol::noise::NoiseError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let mode = reader.u8() % 3;
    let bytes = reader.rest();
    let setup = awaiting_response();
    let genuine = &setup.message_2;

    let message_2: Vec<u8> = match mode {
        RESPONSE_RAW => bytes.to_vec(),
        RESPONSE_XOR => {
            let mut message = genuine.clone();
            for (byte, mask) in message.iter_mut().zip(bytes) {
                *byte ^= mask;
            }
            message
        }
        RESPONSE_CUT_AND_APPEND => {
            let keep = bytes.first().map_or(genuine.len(), |&n| usize::from(n));
            let mut message = genuine[..keep.min(genuine.len())].to_vec();
            message.extend_from_slice(bytes.get(1..).unwrap_or_default());
            message
        }
        _ => unreachable!("mode is taken mod 3"),
    };

    let mut client = setup.client;
    let result = client.handle_response(&message_2);
    if message_2 != *genuine {
        assert!(result.is_err(), "the client accepted a forged message 2");
        return;
    }
    let seen_server_key = result.expect("the client accepts the genuine message 2");
    assert_eq!(&seen_server_key, server_key().public());
    assert!(matches!(
        client.handle_response(genuine),
        Err(NoiseError::OutOfOrder)
    ));
    let mut message_3 = Vec::new();
    client
        .finish(&mut message_3)
        .expect("the client finishes after a genuine message 2");
    let mut server = setup.server;
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut out = Vec::new();
    let mut events = Vec::new();
    server
        .handle_input::<()>(&message_3, &mut scratch, &mut out, &mut |event| {
            events.push(Seen::from(event));
            Ok(())
        })
        .expect("the server takes the client's message 3");
    assert_eq!(events, [Seen::Authenticated(*client_key().public())]);
});
