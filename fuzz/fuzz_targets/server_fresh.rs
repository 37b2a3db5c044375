//! `session::ServerConnection::handle_input` on a fresh connection: what a hostile client can
//! send before it has a session.
//!
//! Input: `split: u16 BE`, then the bytes from the client.
//!
//! Properties:
//! - no event: the handshake cannot finish without a message 3 made with the server's
//!   ephemeral key, which the input cannot know; so no stanza is ever decoded either;
//! - the server writes nothing or exactly one message 2 frame (2 + 96 bytes);
//! - fed whole or in two chunks (split point from the input), the outcome is the same: the same
//!   error (or none), the same amount written;
//! - after an error the connection is `Closed`, and a closed connection takes further bytes
//!   without output, event or error.
#![no_main]

use hop_fuzz::{server_key, split_point, Reader, SCRATCH_BYTES};
use hop_protocol::session::{InputError, PeerError, ServerConnection};
use hop_protocol::StaticKey;
use libfuzzer_sys::fuzz_target;

const MESSAGE_2_FRAME_BYTES: usize = 2 + 96;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The error, as text: snow's errors do not compare.
    error: Option<String>,
    written_bytes: usize,
    closed: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let split = reader.u16();
    let input = reader.rest();
    let split = split_point(split, input.len());
    let key = server_key();
    let mut scratch = vec![0u8; SCRATCH_BYTES];

    let whole = feed(key, &[input], &mut scratch);
    let parts = feed(key, &[&input[..split], &input[split..]], &mut scratch);
    assert_eq!(whole, parts, "split at {split}");
    assert!(
        whole.written_bytes == 0 || whole.written_bytes == MESSAGE_2_FRAME_BYTES,
        "wrote {} bytes",
        whole.written_bytes
    );
    assert_eq!(whole.closed, whole.error.is_some());
});

fn feed(key: &StaticKey, chunks: &[&[u8]], scratch: &mut [u8]) -> Outcome {
    let mut server = ServerConnection::new(key);
    let mut out = Vec::new();
    let mut error = None;
    for chunk in chunks {
        let result = server.handle_input::<()>(chunk, scratch, &mut out, &mut |event| {
            panic!("event from a client that cannot have finished the handshake: {event:?}")
        });
        match result {
            Ok(()) => {}
            Err(InputError::Peer(PeerError::Stanza(stanza_error))) => {
                panic!("a stanza decoded before any session: {stanza_error}")
            }
            Err(InputError::Peer(peer)) => {
                error = Some(format!("{peer:?}"));
                break;
            }
            Err(InputError::Handler(())) => unreachable!("the handler never fails"),
        }
    }
    let closed = matches!(server, ServerConnection::Closed);
    if closed {
        let written_bytes = out.len();
        let again = server.handle_input::<()>(chunks[0], scratch, &mut out, &mut |event| {
            panic!("event on a closed connection: {event:?}")
        });
        assert!(again.is_ok(), "a closed connection refuses quietly");
        assert_eq!(
            out.len(),
            written_bytes,
            "a closed connection writes nothing"
        );
    }
    Outcome {
        error,
        written_bytes: out.len(),
        closed,
    }
}
