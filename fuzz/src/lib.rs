//! Shared pieces of hop's fuzz targets: the input layouts the targets parse (and the seed
//! writer builds), fixed keys and an in-memory handshake between `session::ClientConnection`
//! and `session::ServerConnection`.
//!
//! Each target reads a few header bytes from the fuzz input (a split point, a mode, limits)
//! and treats the rest as bytes from the peer. The layouts are here, next to their encoders,
//! so that the seeds in `seeds/` and the targets cannot drift apart.

use std::sync::OnceLock;

use hop_protocol::frame::{Deframer, FrameError, FrameLimits};
use hop_protocol::keys::KEY_BYTES;
use hop_protocol::noise::{HANDSHAKE_FRAME_LIMITS, TRANSPORT_FRAME_LIMITS};
use hop_protocol::session::{ClientConnection, ClientEvent, ServerConnection, ServerEvent};
use hop_protocol::StaticKey;

/// Fixed static keys, so that a crash reproduces with the same identities. The ephemeral keys
/// come from the OS inside snow and differ per run; no path in hop's code depends on them.
pub const SERVER_PRIVATE_KEY: [u8; KEY_BYTES] = [0x5e; KEY_BYTES];
pub const CLIENT_PRIVATE_KEY: [u8; KEY_BYTES] = [0xc1; KEY_BYTES];

/// The scratch buffer a server connection decrypts into: one whole frame body, as hopd's
/// shards give it.
pub const SCRATCH_BYTES: usize = hop_protocol::frame::FRAME_BODY_BYTES_MAX;

/// Reads header fields off the front of a fuzz input. Missing bytes read as zero, so every
/// input is valid.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn u8(&mut self) -> u8 {
        let Some((&first, rest)) = self.bytes.split_first() else {
            return 0;
        };
        self.bytes = rest;
        first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Up to `count` bytes.
    pub fn take(&mut self, count: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(count.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// A split point in `0..=length` taken from a fuzz value.
pub fn split_point(value: u16, length: usize) -> usize {
    usize::from(value) % (length + 1)
}

/// Layout of the `deframer` input:
/// `first_min: u8, first_max: u16 BE, first_stage_frames: u8, fail_at_frame: u8 (0xff = never),
/// split_a: u16 BE, split_b: u16 BE`, then the byte stream. Frames after the first
/// `first_stage_frames` use hop's transport limits, as a connection does after its handshake.
#[derive(Debug, Clone)]
pub struct DeframerCase<'a> {
    pub first_stage_limits: FrameLimits,
    pub first_stage_frames: usize,
    pub fail_at_frame: Option<usize>,
    pub split_a: u16,
    pub split_b: u16,
    pub stream: &'a [u8],
}

impl<'a> DeframerCase<'a> {
    pub fn parse(data: &'a [u8]) -> Self {
        let mut reader = Reader::new(data);
        let body_bytes_min = usize::from(reader.u8());
        let body_bytes_max = usize::from(reader.u16());
        let first_stage_frames = usize::from(reader.u8());
        let fail_at_frame = match reader.u8() {
            0xff => None,
            index => Some(usize::from(index)),
        };
        Self {
            first_stage_limits: FrameLimits {
                body_bytes_min,
                body_bytes_max,
            },
            first_stage_frames,
            fail_at_frame,
            split_a: reader.u16(),
            split_b: reader.u16(),
            stream: reader.rest(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![u8::try_from(self.first_stage_limits.body_bytes_min).unwrap_or(0xff)];
        out.extend_from_slice(
            &u16::try_from(self.first_stage_limits.body_bytes_max)
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.push(u8::try_from(self.first_stage_frames).unwrap_or(0xff));
        out.push(
            self.fail_at_frame
                .map_or(0xff, |i| u8::try_from(i).unwrap_or(0xfe)),
        );
        out.extend_from_slice(&self.split_a.to_be_bytes());
        out.extend_from_slice(&self.split_b.to_be_bytes());
        out.extend_from_slice(self.stream);
        out
    }

    /// The limits for the frame with this index (0-based, counted over delivered frames).
    pub fn limits(&self, frames_delivered: usize) -> FrameLimits {
        if frames_delivered < self.first_stage_frames {
            self.first_stage_limits
        } else {
            TRANSPORT_FRAME_LIMITS
        }
    }
}

/// Layout of the `server_open` input: `mode: u8, split: u16 BE`, then records
/// `kind: u8, length: u16 BE, bytes`. A record of even kind is a plaintext the client seals with
/// `Channel::seal_raw`; of odd kind, raw bytes put on the wire as they are. Mode bit 0: message 3
/// goes in the same read as the first chunk of the stream. The stream is fed in two chunks,
/// split at `split`.
pub const RECORD_SEALED: u8 = 0;
pub const RECORD_RAW: u8 = 1;
pub const MODE_MESSAGE_3_JOINED: u8 = 1;

/// Encodes a `server_open` input.
pub fn server_open_input(mode: u8, split: u16, records: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(&split.to_be_bytes());
    for (kind, bytes) in records {
        out.push(*kind);
        let length = u16::try_from(bytes.len()).expect("a record fits a u16 length");
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Layout of the `client_response` input: `mode: u8, trust: u8, split: u16 BE`, then bytes.
/// The bytes make the stream a hostile server sends after message 1. Mode 0: the bytes are the
/// stream. Mode 1: the bytes XORed over the genuine message 2 frame (header included), from its
/// start; bytes past its end are appended. Mode 2: keep the first `bytes[0]` bytes of the genuine
/// frame and append the rest. The stream reaches the client in two reads, split at `split`.
pub const RESPONSE_RAW: u8 = 0;
pub const RESPONSE_XOR: u8 = 1;
pub const RESPONSE_CUT_AND_APPEND: u8 = 2;
/// `trust` of the `client_response` input: no pin and the callback accepts the key; the
/// server's own key pinned; another key pinned; no pin and the callback refuses the key.
pub const TRUST_ANY: u8 = 0;
pub const TRUST_PINNED: u8 = 1;
pub const TRUST_PINNED_OTHER: u8 = 2;
pub const TRUST_REFUSED: u8 = 3;

/// Encodes a `client_response` input.
pub fn client_response_input(mode: u8, trust: u8, split: u16, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode, trust];
    out.extend_from_slice(&split.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The deframed bodies of a stream that must deframe cleanly under `limits`.
pub fn frames(stream: &[u8], limits: FrameLimits) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    Deframer::new()
        .handle_input::<FrameError>(stream, &mut || limits, &mut |frame| {
            seen.push(frame.to_vec());
            Ok(())
        })
        .expect("a stream made by hop deframes");
    seen
}

/// A server connection that has taken message 1 and the client that sent it, before message 2
/// reaches the client.
#[derive(Debug)]
pub struct AwaitingResponse {
    pub server: ServerConnection,
    pub client: ClientConnection,
    /// Message 2 from the server as a frame, header included: what the client reads.
    pub message_2: Vec<u8>,
}

/// Starts a client (with `pin`, if any) and a server on it; the server has answered message 1.
pub fn awaiting_response(pin: Option<[u8; KEY_BYTES]>) -> AwaitingResponse {
    let mut message_1 = Vec::new();
    let client = ClientConnection::start(client_key(), pin, &mut message_1);
    let mut server = ServerConnection::new(server_key());
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut message_2 = Vec::new();
    server
        .handle_input::<()>(&message_1, &mut scratch, &mut message_2, &mut |_| {
            panic!("an event after message 1")
        })
        .expect("the server takes a real message 1");
    assert_eq!(
        frames(&message_2, HANDSHAKE_FRAME_LIMITS).len(),
        1,
        "one message 2"
    );
    AwaitingResponse {
        server,
        client,
        message_2,
    }
}

/// A server connection waiting for message 3, and the client's open connection.
#[derive(Debug)]
pub struct AwaitingMessage3 {
    pub server: ServerConnection,
    /// Open: its channel seals what the client sends.
    pub client: ClientConnection,
    /// Message 3 as a frame, header included.
    pub message_3: Vec<u8>,
}

pub fn awaiting_message_3() -> AwaitingMessage3 {
    let AwaitingResponse {
        server,
        mut client,
        message_2,
    } = awaiting_response(Some(*server_key().public()));
    let mut scratch = vec![0u8; SCRATCH_BYTES];
    let mut message_3 = Vec::new();
    let mut authenticated = false;
    client
        .handle_input::<()>(&message_2, &mut scratch, &mut message_3, &mut |event| {
            authenticated = matches!(event, ClientEvent::Authenticated { .. });
            Ok(())
        })
        .expect("the client takes a real message 2");
    assert!(authenticated && client.is_open());
    AwaitingMessage3 {
        server,
        client,
        message_3,
    }
}

/// The server's static key, derived once: a base-point multiplication per fuzz run costs as much
/// as the code under test.
pub fn server_key() -> &'static StaticKey {
    static KEY: OnceLock<StaticKey> = OnceLock::new();
    KEY.get_or_init(|| StaticKey::from_private(SERVER_PRIVATE_KEY))
}

pub fn client_key() -> &'static StaticKey {
    static KEY: OnceLock<StaticKey> = OnceLock::new();
    KEY.get_or_init(|| StaticKey::from_private(CLIENT_PRIVATE_KEY))
}

/// An event in a form that compares: the peer's key, an old client's version, or the stanza.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Authenticated([u8; KEY_BYTES]),
    Outdated(u8),
    Stanza(hop_protocol::wire::Stanza),
}

impl From<ServerEvent> for Seen {
    fn from(event: ServerEvent) -> Self {
        match event {
            ServerEvent::Authenticated { client_key } => Self::Authenticated(client_key),
            ServerEvent::Outdated { version } => Self::Outdated(version),
            ServerEvent::Stanza(stanza) => Self::Stanza(stanza),
        }
    }
}

impl From<ClientEvent> for Seen {
    fn from(event: ClientEvent) -> Self {
        match event {
            ClientEvent::Authenticated { server_key } => Self::Authenticated(server_key),
            ClientEvent::Stanza(stanza) => Self::Stanza(stanza),
        }
    }
}

#[cfg(test)]
mod seeds;
