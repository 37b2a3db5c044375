//! `session::ServerConnection::handle_input` after a real handshake (with
//! `session::ClientConnection`): transport frames from a client that holds the session keys
//! (plaintexts of any content, sealed with `Channel::seal_raw`, so the stanza decoder behind
//! decryption is reached) mixed with raw bytes on the wire (forged or misaligned frames).
//!
//! Input: see `hop_fuzz::server_open_input`.
//!
//! Properties:
//! - the first event is `Authenticated` with the client's key, once;
//! - for the sealed frames before the first raw bytes, the stanzas the server passes on and the
//!   error it stops with are those of `wire::decode_all` on each plaintext in turn;
//! - after raw bytes, no stanza is passed on and any error is a bad frame or a failed
//!   decryption: raw bytes cannot produce or realign a frame that opens;
//! - all this for any split of the stream, with message 3 in the same read or before it;
//! - the server writes nothing after message 2;
//! - after an error the connection is still open if the failing read started on an open
//!   connection (so the caller can send an Error stanza) and `Closed` if that read also carried
//!   message 3 (the gateway then treats it as a handshake failure).
#![no_main]

use hop_fuzz::{
    awaiting_message_3, client_key, split_point, Reader, Seen, MODE_MESSAGE_3_JOINED, SCRATCH_BYTES,
};
use hop_protocol::noise::{NoiseError, FRAME_PLAINTEXT_BYTES_MAX};
use hop_protocol::session::{InputError, PeerError, ServerConnection};
use hop_protocol::wire::{self, DecodeError};
use libfuzzer_sys::fuzz_target;

/// What the server should do with the stream, from the plaintexts alone.
#[derive(Debug)]
struct Expected {
    events: Vec<Seen>,
    /// The stanza error that stops the server, if one of the plaintexts is bad.
    stanza_error: Option<String>,
    /// Raw bytes were put on the wire before any stanza error.
    raw_bytes_follow: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let mode = reader.u8();
    let split = reader.u16();
    let mut setup = awaiting_message_3();

    let mut stream = Vec::new();
    let mut expected = Expected {
        events: vec![Seen::Authenticated(*client_key().public())],
        stanza_error: None,
        raw_bytes_follow: false,
    };
    while !reader.is_empty() {
        let kind = reader.u8();
        let length = usize::from(reader.u16()).min(FRAME_PLAINTEXT_BYTES_MAX);
        let bytes = reader.take(length);
        if kind % 2 == 1 {
            if !bytes.is_empty() && expected.stanza_error.is_none() {
                expected.raw_bytes_follow = true;
            }
            stream.extend_from_slice(bytes);
            continue;
        }
        setup
            .client
            .channel()
            .expect("open after message 2")
            .seal_raw(bytes, &mut stream);
        if expected.raw_bytes_follow || expected.stanza_error.is_some() {
            continue;
        }
        let result = wire::decode_all::<DecodeError>(bytes, &mut |stanza| {
            expected.events.push(Seen::Stanza(stanza));
            Ok(())
        });
        if let Err(error) = result {
            expected.stanza_error = Some(format!("{error:?}"));
        }
    }

    let split = split_point(split, stream.len());
    let joined = mode & MODE_MESSAGE_3_JOINED != 0;
    let mut chunks = Vec::new();
    if joined {
        let mut first = setup.message_3.clone();
        first.extend_from_slice(&stream[..split]);
        chunks.push(first);
    } else {
        chunks.push(setup.message_3.clone());
        chunks.push(stream[..split].to_vec());
    }
    chunks.push(stream[split..].to_vec());

    let mut server = setup.server;
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut error = None;
    for chunk in &chunks {
        let was_open = server.is_open();
        let result = server.handle_input::<()>(chunk, &mut scratch, &mut out, &mut |event| {
            events.push(Seen::from(event));
            Ok(())
        });
        match result {
            Ok(()) => assert!(server.is_open(), "open after message 3"),
            Err(InputError::Peer(peer)) => {
                if was_open {
                    assert!(
                        server.is_open(),
                        "an error on an open connection keeps it open"
                    );
                } else {
                    assert!(matches!(server, ServerConnection::Closed));
                }
                error = Some(peer);
                break;
            }
            Err(InputError::Handler(())) => unreachable!("the handler never fails"),
        }
    }
    assert!(
        out.is_empty(),
        "the server wrote {} bytes after message 2",
        out.len()
    );

    // Stanzas from sealed frames up to the first raw bytes: exactly as decode_all gives them.
    assert_eq!(events, expected.events, "events");
    match (&error, &expected.stanza_error, expected.raw_bytes_follow) {
        (None, None, _) => {}
        (Some(PeerError::Stanza(got)), Some(want), false) => {
            assert_eq!(&format!("{got:?}"), want, "stanza error")
        }
        (Some(PeerError::Frame(_)) | Some(PeerError::Noise(NoiseError::Decrypt)), None, true) => {}
        (got, want, raw) => {
            panic!("server stopped with {got:?}; expected {want:?} (raw bytes follow: {raw})")
        }
    }
});
