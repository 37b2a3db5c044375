//! `session::ClientConnection::handle_input` before the session opens: the stream a hostile
//! server sends after message 1, read in two parts.
//!
//! Input: see `hop_fuzz::client_response_input`: the stream as given, or the genuine message 2
//! frame of a real server with the input XORed over it, or cut and extended by it; and how the
//! client decides trust (no pin, the server's key pinned, another key pinned, or a callback that
//! refuses the key).
//!
//! Properties:
//! - the client opens exactly when message 2 arrived byte for byte genuine and ended a read
//!   (every byte is authenticated: the ephemeral key through the handshake hash, the static key
//!   and the payload by their AEAD tags; the server sends nothing after message 2 until it has
//!   message 3) and its key is trusted; it names the server's key once and writes message 3,
//!   and nothing else;
//! - a pin on another key refuses the genuine message 2 before the callback hears of it; a
//!   callback that refuses is asked once; either way nothing is written;
//! - after an error before the session the connection is closed, nothing was written, and a
//!   closed connection takes more bytes quietly; bytes after message 2 fail the open session as
//!   a bad frame or a failed decryption and leave its channel for the caller to close; without
//!   error and without a whole frame, it waits;
//! - once open, message 3 is accepted by the server with the client's key, and the session
//!   carries a stanza each way.
#![no_main]

use hop_fuzz::{
    awaiting_response, client_key, server_key, split_point, Reader, Seen, RESPONSE_CUT_AND_APPEND,
    RESPONSE_RAW, RESPONSE_XOR, SCRATCH_BYTES, TRUST_ANY, TRUST_PINNED, TRUST_PINNED_OTHER,
    TRUST_REFUSED,
};
use hop_protocol::noise::{NoiseError, HANDSHAKE_FRAME_LIMITS};
use hop_protocol::session::{ClientInputError, PeerError};
use hop_protocol::wire::{Kind, Ping, Pong, Stanza};
use libfuzzer_sys::fuzz_target;

/// Message 3 as a frame: a length and `s, se` (64 bytes).
const MESSAGE_3_FRAME_BYTES: usize = 2 + 64;

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let mode = reader.u8() % 3;
    let trust = reader.u8() % 4;
    let split = reader.u16();
    let bytes = reader.rest();
    let pin = match trust {
        TRUST_PINNED => Some(*server_key().public()),
        TRUST_PINNED_OTHER => Some([0x77; 32]),
        TRUST_ANY | TRUST_REFUSED => None,
        _ => unreachable!("trust is taken mod 4"),
    };
    let setup = awaiting_response(pin);
    let genuine = &setup.message_2;

    let stream: Vec<u8> = match mode {
        RESPONSE_RAW => bytes.to_vec(),
        RESPONSE_XOR => {
            let mut stream = genuine.clone();
            for (byte, mask) in stream.iter_mut().zip(bytes) {
                *byte ^= mask;
            }
            stream.extend_from_slice(bytes.get(genuine.len()..).unwrap_or_default());
            stream
        }
        RESPONSE_CUT_AND_APPEND => {
            let keep = bytes.first().map_or(genuine.len(), |&n| usize::from(n));
            let mut stream = genuine[..keep.min(genuine.len())].to_vec();
            stream.extend_from_slice(bytes.get(1..).unwrap_or_default());
            stream
        }
        _ => unreachable!("mode is taken mod 3"),
    };
    let split = split_point(split, stream.len());
    // Message 2 arrived whole and untouched, and ended a read: the server waited for message 3.
    let genuine_read =
        stream.starts_with(genuine) && (stream.len() == genuine.len() || split == genuine.len());
    let trusted = matches!(trust, TRUST_ANY | TRUST_PINNED);

    let mut client = setup.client;
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut written = Vec::new();
    let mut events = Vec::new();
    let mut result = Ok(());
    let mut failed_open = false;
    for chunk in [&stream[..split], &stream[split..]] {
        let was_open = client.is_open();
        result = client.handle_input(chunk, &mut scratch, &mut written, &mut |event| {
            events.push(Seen::from(event));
            if trust == TRUST_REFUSED {
                Err("refused")
            } else {
                Ok(())
            }
        });
        if result.is_err() {
            failed_open = was_open;
            break;
        }
    }

    let server_named = [Seen::Authenticated(*server_key().public())];
    let opened = genuine_read && trusted;
    assert_eq!(
        client.is_open(),
        opened,
        "open exactly on a genuine, trusted message 2"
    );
    if genuine_read && trust != TRUST_PINNED_OTHER {
        assert_eq!(
            events, server_named,
            "the server's key, asked once, and nothing else"
        );
    } else {
        assert!(
            events.is_empty(),
            "events from a forged or refused message 2"
        );
    }
    if opened {
        assert_eq!(written.len(), MESSAGE_3_FRAME_BYTES, "message 3 only");
    } else {
        assert!(
            written.is_empty(),
            "wrote without trusting a genuine message 2"
        );
    }
    match &result {
        Ok(()) if opened => {}
        Ok(()) => {
            assert!(!genuine_read);
            assert!(!client.is_closed());
            // It waits exactly while no whole frame arrived and the header seen is allowed.
            if let [high, low, body @ ..] = stream.as_slice() {
                let length = usize::from(u16::from_be_bytes([*high, *low]));
                let limits = HANDSHAKE_FRAME_LIMITS;
                assert!((limits.body_bytes_min..=limits.body_bytes_max).contains(&length));
                assert!(body.len() < length, "a whole frame left the client waiting");
            }
        }
        Err(error) if failed_open => {
            // Bytes after message 2 on the open session: nothing the server could have sealed.
            assert!(
                opened && client.is_open(),
                "the channel stays for the caller to close"
            );
            assert!(
                matches!(
                    error,
                    ClientInputError::Peer(
                        PeerError::Frame(_) | PeerError::Noise(NoiseError::Decrypt)
                    )
                ),
                "{error:?}"
            );
        }
        Err(error) => {
            assert!(client.is_closed(), "closed after an error: {error:?}");
            match error {
                ClientInputError::Peer(_) => assert!(!genuine_read, "{error:?}"),
                ClientInputError::ServerKeyMismatch { presented } => {
                    assert!(genuine_read && trust == TRUST_PINNED_OTHER);
                    assert_eq!(presented, server_key().public());
                }
                ClientInputError::Handler(_) => assert!(genuine_read && trust == TRUST_REFUSED),
            }
            let mut again = Vec::new();
            let quiet = client.handle_input::<()>(genuine, &mut scratch, &mut again, &mut |e| {
                panic!("event on a closed connection: {e:?}")
            });
            assert!(
                quiet.is_ok() && again.is_empty(),
                "a closed connection is quiet"
            );
        }
    }
    if !(opened && stream.len() == genuine.len()) {
        return;
    }

    // The session works both ways.
    let mut server = setup.server;
    let mut server_events = Vec::new();
    let mut to_client = Vec::new();
    client
        .channel()
        .expect("open")
        .send_now(&Stanza::of(Kind::Ping(Ping { nonce: 7 })), &mut written);
    server
        .handle_input::<()>(&written, &mut scratch, &mut to_client, &mut |event| {
            server_events.push(Seen::from(event));
            Ok(())
        })
        .expect("the server takes the client's message 3 and Ping");
    assert!(
        to_client.is_empty(),
        "the server wrote nothing after message 2"
    );
    let pong = Stanza::of(Kind::Pong(Pong { nonce: 7 }));
    assert_eq!(
        server_events,
        [
            Seen::Authenticated(*client_key().public()),
            Seen::Stanza(Stanza::of(Kind::Ping(Ping { nonce: 7 }))),
        ]
    );
    let channel = server.channel().expect("open after message 3");
    channel.send_now(&pong, &mut to_client);
    events.clear();
    client
        .handle_input::<()>(&to_client, &mut scratch, &mut Vec::new(), &mut |event| {
            events.push(Seen::from(event));
            Ok(())
        })
        .expect("the client takes the server's Pong");
    assert_eq!(events, [Seen::Stanza(pong)]);
});
