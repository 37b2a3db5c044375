//! The Noise layer: `Noise_XX_25519_ChaChaPoly_BLAKE2s` through `snow`.
//!
//! XX: the client sends `e`; the server answers `e, ee, s, es`; the client finishes with
//! `s, se`. After message 2 the client knows the server's static key (and checks its pin);
//! after message 3 the server knows the client's static key, which is the client's identity.
//!
//! Crypto backend: `snow`'s ring resolver for ChaCha20-Poly1305 (about 7x faster than the
//! pure-Rust cipher here), falling back to the default resolver for X25519 and BLAKE2s, which
//! ring does not offer for static keys. See docs/decisions.md.
//!
//! Once the handshake is done hop keeps only the two 32-byte keys of the split and their
//! nonces ([`Transport`], 80 bytes) instead of snow's transport state (two boxed ciphers and
//! the remote key, about a kilobyte): an idle connection's session costs little memory. The
//! frames are the same Noise transport messages; a test checks them against snow's.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::{Builder, HandshakeState};
use thiserror::Error;

use crate::frame::{push_header, FrameLimits, FRAME_BODY_BYTES_MAX};
use crate::keys::{StaticKey, KEY_BYTES};

pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// The protocol version this crate speaks. A client names it in the payload of handshake
/// message 1 (one byte); the prologue binds it into the handshake hash.
pub const VERSION: u8 = 2;
/// Mixed into the handshake hash: both sides must speak this protocol version.
pub const PROLOGUE: &[u8] = b"hop wire protocol v2";
/// The prologue of version 1, whose clients send an empty message 1 payload: the server
/// finishes their handshake only to tell them, in stanzas version 1 can read, to upgrade.
const PROLOGUE_V1: &[u8] = b"hop wire protocol v1";
/// Bytes of `e` in message 1; the payload (the version) follows in the clear.
const MESSAGE_1_KEY_BYTES: usize = 32;

/// Bytes the AEAD adds to every transport message.
pub const TAG_BYTES: usize = 16;
/// The largest plaintext one frame can carry.
pub const FRAME_PLAINTEXT_BYTES_MAX: usize = FRAME_BODY_BYTES_MAX - TAG_BYTES;
/// The largest handshake message hop sends or accepts (message 3 with an empty payload is 64).
pub const HANDSHAKE_MESSAGE_BYTES_MAX: usize = 128;

/// Frame limits while the handshake runs: small, so garbage is refused from its first bytes.
pub const HANDSHAKE_FRAME_LIMITS: FrameLimits = FrameLimits {
    body_bytes_min: 32,
    body_bytes_max: HANDSHAKE_MESSAGE_BYTES_MAX,
};
/// Frame limits once the session is open: at least an AEAD tag.
pub const TRANSPORT_FRAME_LIMITS: FrameLimits = FrameLimits {
    body_bytes_min: TAG_BYTES,
    body_bytes_max: FRAME_BODY_BYTES_MAX,
};

/// The peer sent something the Noise layer rejects.
#[derive(Debug, Error)]
pub enum NoiseError {
    #[error("handshake message rejected: {0}")]
    Handshake(snow::Error),
    #[error("frame failed to decrypt")]
    Decrypt,
    #[error("handshake message carries an unexpected payload")]
    UnexpectedPayload,
    #[error("handshake is not at a stage that takes this message")]
    OutOfOrder,
    #[error("the client speaks hop protocol version {0}, which this server does not")]
    UnknownVersion(u8),
    #[error("{0}")]
    Refused(Refusal),
}

/// Bytes of a refusal frame's body: the smallest handshake frame, and shorter than any message
/// 2 (96 bytes), so neither is taken for the other.
pub const REFUSAL_BYTES: usize = 32;
/// How a refusal's body starts.
const REFUSAL_MAGIC: &[u8; 16] = b"hop refused v1\0\0";

/// Why a server refused a connection at once, before any handshake work (its admission
/// limits: `docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The shard takes no more handshakes this moment: every address is refused alike.
    Busy,
    /// This source address (an IPv4 address, an IPv6 /64) opened handshakes too fast.
    AddressRate,
    /// This source address has too many handshakes unfinished.
    AddressHandshakes,
    /// This source address holds too many connections.
    AddressConnections,
    /// A reason a newer server names.
    Other(u8),
}

impl RefusalReason {
    pub fn code(self) -> u8 {
        match self {
            Self::Busy => 1,
            Self::AddressRate => 2,
            Self::AddressHandshakes => 3,
            Self::AddressConnections => 4,
            Self::Other(code) => code,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Busy,
            2 => Self::AddressRate,
            3 => Self::AddressHandshakes,
            4 => Self::AddressConnections,
            other => Self::Other(other),
        }
    }

    /// The name metrics and logs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::AddressRate => "address_rate",
            Self::AddressHandshakes => "address_handshakes",
            Self::AddressConnections => "address_connections",
            Self::Other(_) => "other",
        }
    }
}

/// The server's answer, in place of message 2, to a connection it will not serve: sent in the
/// clear (nothing is known of the client yet), then the connection is closed. Like a TCP
/// reset, anyone on the path could forge one; it only ever makes a client wait and retry.
///
/// Body: the 16-byte magic, the reason code, the wait in milliseconds (u32, big-endian), then
/// zeros up to [`REFUSAL_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "the server refused the connection ({}); try again in {retry_after_ms} ms",
    reason.name()
)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// How long the client should wait before it connects again (it adds its own jitter).
    pub retry_after_ms: u32,
}

impl Refusal {
    /// How long a refused client waits before it connects again: `retry_after_ms` plus up to a
    /// quarter more, at random, so that the clients refused together do not come back together.
    pub fn wait(&self) -> std::time::Duration {
        let wait_ms = u64::from(self.retry_after_ms);
        let jitter_ms = crate::outbox::random_nonzero().unwrap_or(1) % (wait_ms / 4 + 1);
        std::time::Duration::from_millis(wait_ms + jitter_ms)
    }

    /// Appends the refusal to `out` as a frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        push_header(out, REFUSAL_BYTES);
        let start = out.len();
        out.extend_from_slice(REFUSAL_MAGIC);
        out.push(self.reason.code());
        out.extend_from_slice(&self.retry_after_ms.to_be_bytes());
        out.resize(start + REFUSAL_BYTES, 0);
    }

    /// The refusal a handshake frame's body is, if it is one.
    pub fn decode(frame: &[u8]) -> Option<Self> {
        if frame.len() != REFUSAL_BYTES || !frame.starts_with(REFUSAL_MAGIC) {
            return None;
        }
        let at = REFUSAL_MAGIC.len();
        let wait = frame[at + 1..at + 5].try_into().ok()?;
        Some(Self {
            reason: RefusalReason::from_code(frame[at]),
            retry_after_ms: u32::from_be_bytes(wait),
        })
    }
}

/// A Noise builder with hop's parameters and crypto backend.
pub fn builder() -> Builder<'static> {
    let params = NOISE_PARAMS
        .parse()
        .expect("hop's Noise parameters are valid");
    Builder::with_resolver(params, resolver())
}

fn resolver() -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(RingResolver),
        Box::new(DefaultResolver),
    ))
}

fn build(key: &StaticKey, initiator: bool, prologue: &[u8]) -> HandshakeState {
    let builder = builder()
        .local_private_key(key.private())
        .and_then(|b| b.prologue(prologue))
        .expect("key and prologue have valid sizes");
    let state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    state.expect("hop's Noise parameters build")
}

/// The server side of the handshake. The Noise state (and its X25519 work) is built only when
/// message 1 arrives and names a version this server answers.
pub struct ServerHandshake {
    stage: ServerStage,
}

enum ServerStage {
    /// Waiting for message 1; the server's key, to build the responder with.
    Fresh(StaticKey),
    /// Message 2 sent; waiting for message 3 of a client of `version`. Boxed: a connection
    /// waiting for message 1 holds only the key.
    Replied {
        state: Box<HandshakeState>,
        version: u8,
    },
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake").finish_non_exhaustive()
    }
}

/// What a handshake frame led to.
#[derive(Debug)]
pub enum ServerStep {
    /// Message 2 was appended to `out`; wait for message 3.
    Continue(Box<ServerHandshake>),
    /// Message 3 arrived: the session is open and the client's key known. `version` is the
    /// client's: [`VERSION`], or 1 for a client the server only tells to upgrade.
    Finished {
        transport: Transport,
        client_key: [u8; KEY_BYTES],
        version: u8,
    },
}

impl ServerHandshake {
    pub fn new(key: &StaticKey) -> Self {
        Self {
            stage: ServerStage::Fresh(key.clone()),
        }
    }

    /// Handles one handshake frame body. A reply, if any, is appended to `out` as a frame.
    pub fn handle_frame(
        mut self: Box<Self>,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ServerStep, NoiseError> {
        let mut payload = [0u8; HANDSHAKE_MESSAGE_BYTES_MAX];
        match &mut self.stage {
            ServerStage::Fresh(key) => {
                // Message 1 is `e` and the payload in the clear: the version is read before
                // any Noise state is built.
                let version = match frame.get(MESSAGE_1_KEY_BYTES..) {
                    None => return Err(NoiseError::OutOfOrder),
                    Some([]) => 1,
                    Some([VERSION]) => VERSION,
                    Some([other, ..]) => return Err(NoiseError::UnknownVersion(*other)),
                };
                let prologue = if version == 1 { PROLOGUE_V1 } else { PROLOGUE };
                let mut state = build(key, false, prologue);
                state
                    .read_message(frame, &mut payload)
                    .map_err(NoiseError::Handshake)?;
                write_handshake(&mut state, &[], out)?;
                self.stage = ServerStage::Replied {
                    state: Box::new(state),
                    version,
                };
                Ok(ServerStep::Continue(self))
            }
            ServerStage::Replied { state, version } => {
                if state.is_my_turn() {
                    return Err(NoiseError::OutOfOrder);
                }
                let payload_bytes = state
                    .read_message(frame, &mut payload)
                    .map_err(NoiseError::Handshake)?;
                if payload_bytes != 0 {
                    return Err(NoiseError::UnexpectedPayload);
                }
                if !state.is_handshake_finished() {
                    return Err(NoiseError::OutOfOrder);
                }
                let client_key = remote_static(state).ok_or(NoiseError::OutOfOrder)?;
                let (to_responder, to_initiator) = state.dangerously_get_raw_split();
                Ok(ServerStep::Finished {
                    transport: Transport::new(to_initiator, to_responder),
                    client_key,
                    version: *version,
                })
            }
        }
    }
}

/// The client side of the handshake.
pub struct ClientHandshake {
    state: HandshakeState,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake").finish_non_exhaustive()
    }
}

impl ClientHandshake {
    /// Starts a handshake; message 1 is appended to `out` as a frame.
    pub fn start(key: &StaticKey, out: &mut Vec<u8>) -> Self {
        let mut state = build(key, true, PROLOGUE);
        write_handshake(&mut state, &[VERSION], out).expect("message 1 always fits");
        Self { state }
    }

    /// Handles message 2 and returns the server's static key. The caller checks it against its
    /// pin before calling [`ClientHandshake::finish`].
    pub fn handle_response(&mut self, frame: &[u8]) -> Result<[u8; KEY_BYTES], NoiseError> {
        if self.state.is_my_turn() {
            return Err(NoiseError::OutOfOrder);
        }
        if let Some(refusal) = Refusal::decode(frame) {
            return Err(NoiseError::Refused(refusal));
        }
        let mut payload = [0u8; HANDSHAKE_MESSAGE_BYTES_MAX];
        let payload_bytes = self
            .state
            .read_message(frame, &mut payload)
            .map_err(NoiseError::Handshake)?;
        if payload_bytes != 0 {
            return Err(NoiseError::UnexpectedPayload);
        }
        remote_static(&self.state).ok_or(NoiseError::OutOfOrder)
    }

    /// Appends message 3 to `out` and opens the session.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Transport, NoiseError> {
        if !self.state.is_my_turn() {
            return Err(NoiseError::OutOfOrder);
        }
        write_handshake(&mut self.state, &[], out)?;
        if !self.state.is_handshake_finished() {
            return Err(NoiseError::OutOfOrder);
        }
        let (to_responder, to_initiator) = self.state.dangerously_get_raw_split();
        Ok(Transport::new(to_responder, to_initiator))
    }
}

fn write_handshake(
    state: &mut HandshakeState,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), NoiseError> {
    let mut message = [0u8; HANDSHAKE_MESSAGE_BYTES_MAX];
    let bytes = state
        .write_message(payload, &mut message)
        .map_err(NoiseError::Handshake)?;
    push_header(out, bytes);
    out.extend_from_slice(&message[..bytes]);
    Ok(())
}

fn remote_static(state: &HandshakeState) -> Option<[u8; KEY_BYTES]> {
    state.get_remote_static()?.try_into().ok()
}

/// An open Noise session: seals and opens frames with ChaCha20-Poly1305. Nonces are implicit
/// (one counter per direction, Noise's 4 zero bytes and a 64-bit little-endian count), so frames
/// must arrive in order, as TCP guarantees.
pub struct Transport {
    send_key: [u8; KEY_BYTES],
    receive_key: [u8; KEY_BYTES],
    send_nonce: u64,
    receive_nonce: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("send_nonce", &self.send_nonce)
            .field("receive_nonce", &self.receive_nonce)
            .finish_non_exhaustive()
    }
}

/// Noise reserves the last nonce; a session that reaches it must end.
const NONCE_MAX: u64 = u64::MAX - 1;

/// A transport's keys and nonces, taken out of one process to be carried on in another (an
/// upgrade that keeps its sessions). Whoever holds it can read and forge the session: it
/// travels only between two processes of the same server, over a socket only they can open.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportState {
    pub send_key: [u8; KEY_BYTES],
    pub receive_key: [u8; KEY_BYTES],
    pub send_nonce: u64,
    pub receive_nonce: u64,
}

impl std::fmt::Debug for TransportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportState")
            .field("send_nonce", &self.send_nonce)
            .field("receive_nonce", &self.receive_nonce)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Its keys and nonces, to carry the session on elsewhere ([`Transport::resume`]). The
    /// transport that gave them must not seal or open another frame.
    pub fn state(&self) -> TransportState {
        TransportState {
            send_key: self.send_key,
            receive_key: self.receive_key,
            send_nonce: self.send_nonce,
            receive_nonce: self.receive_nonce,
        }
    }

    /// The transport whose [`Transport::state`] this is.
    pub fn resume(state: &TransportState) -> Self {
        Self {
            send_key: state.send_key,
            receive_key: state.receive_key,
            send_nonce: state.send_nonce,
            receive_nonce: state.receive_nonce,
        }
    }

    fn new(send_key: [u8; KEY_BYTES], receive_key: [u8; KEY_BYTES]) -> Self {
        Self {
            send_key,
            receive_key,
            send_nonce: 0,
            receive_nonce: 0,
        }
    }

    /// Seals `plaintext` and appends it to `out` as one frame.
    pub fn seal_frame(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        assert!(
            plaintext.len() <= FRAME_PLAINTEXT_BYTES_MAX,
            "plaintext exceeds one frame"
        );
        assert!(
            self.send_nonce < NONCE_MAX,
            "nonces exhausted: the session must end"
        );
        push_header(out, plaintext.len() + TAG_BYTES);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = key(&self.send_key)
            .seal_in_place_separate_tag(nonce(self.send_nonce), Aad::empty(), &mut out[start..])
            .expect("a frame-sized plaintext seals");
        out.extend_from_slice(tag.as_ref());
        self.send_nonce += 1;
    }

    /// Opens one frame body into `scratch` and returns the plaintext.
    pub fn open_frame<'a>(
        &mut self,
        frame: &[u8],
        scratch: &'a mut [u8],
    ) -> Result<&'a [u8], NoiseError> {
        if frame.len() < TAG_BYTES || frame.len() > scratch.len() || self.receive_nonce >= NONCE_MAX
        {
            return Err(NoiseError::Decrypt);
        }
        let in_out = &mut scratch[..frame.len()];
        in_out.copy_from_slice(frame);
        let plaintext = key(&self.receive_key)
            .open_in_place(nonce(self.receive_nonce), Aad::empty(), in_out)
            .map_err(|_| NoiseError::Decrypt)?;
        self.receive_nonce += 1;
        Ok(plaintext)
    }
}

fn key(bytes: &[u8; KEY_BYTES]) -> LessSafeKey {
    // A ChaCha20-Poly1305 key has no schedule: building it copies 32 bytes.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32-byte key"))
}

fn nonce(count: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&count.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Deframer, FrameError};

    fn frames(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut seen = Vec::new();
        Deframer::new()
            .handle_input::<FrameError>(stream, &mut || TRANSPORT_FRAME_LIMITS, &mut |f| {
                seen.push(f.to_vec());
                Ok(())
            })
            .unwrap();
        seen
    }

    pub(crate) fn handshake_pair() -> (Transport, Transport, [u8; 32], [u8; 32]) {
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut to_server = Vec::new();
        let mut client = ClientHandshake::start(&client_key, &mut to_server);
        let server = Box::new(ServerHandshake::new(&server_key));
        let mut to_client = Vec::new();
        let server = match server
            .handle_frame(&frames(&to_server)[0], &mut to_client)
            .unwrap()
        {
            ServerStep::Continue(waiting) => waiting,
            ServerStep::Finished { .. } => panic!("finished after message 1"),
        };
        let seen_server_key = client.handle_response(&frames(&to_client)[0]).unwrap();
        assert_eq!(&seen_server_key, server_key.public());
        let mut message3 = Vec::new();
        let client_transport = client.finish(&mut message3).unwrap();
        let (server_transport, seen_client_key) = match server
            .handle_frame(&frames(&message3)[0], &mut to_client)
            .unwrap()
        {
            ServerStep::Finished {
                transport,
                client_key,
                version: VERSION,
            } => (transport, client_key),
            other => panic!("not finished at this version after message 3: {other:?}"),
        };
        assert_eq!(&seen_client_key, client_key.public());
        (
            client_transport,
            server_transport,
            *client_key.public(),
            *server_key.public(),
        )
    }

    #[test]
    fn a_refusal_reaches_the_client_in_place_of_message_2() {
        for reason in [
            RefusalReason::Busy,
            RefusalReason::AddressRate,
            RefusalReason::AddressHandshakes,
            RefusalReason::AddressConnections,
            RefusalReason::Other(200),
        ] {
            let refusal = Refusal {
                reason,
                retry_after_ms: 1_234_567,
            };
            let mut wire = Vec::new();
            refusal.encode(&mut wire);
            let frame = &frames(&wire)[0];
            assert!(frame.len() >= HANDSHAKE_FRAME_LIMITS.body_bytes_min);
            let key = StaticKey::generate().unwrap();
            let mut client = ClientHandshake::start(&key, &mut Vec::new());
            match client.handle_response(frame) {
                Err(NoiseError::Refused(seen)) => assert_eq!(seen, refusal),
                other => panic!("{other:?}"),
            }
        }
        // A genuine message 2 is never read as one, nor is a 32-byte frame of other bytes.
        let mut wire = Vec::new();
        let mut client = ClientHandshake::start(&StaticKey::generate().unwrap(), &mut Vec::new());
        let mut to_server = Vec::new();
        let _ = ClientHandshake::start(&StaticKey::generate().unwrap(), &mut to_server);
        let server = Box::new(ServerHandshake::new(&StaticKey::generate().unwrap()));
        server
            .handle_frame(&frames(&to_server)[0], &mut wire)
            .unwrap();
        assert_eq!(Refusal::decode(&frames(&wire)[0]), None);
        assert!(matches!(
            client.handle_response(&[0u8; REFUSAL_BYTES]),
            Err(NoiseError::Handshake(_))
        ));
    }

    #[test]
    fn handshake_and_transport_both_ways() {
        let (mut client, mut server, _, _) = handshake_pair();
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut wire = Vec::new();
        client.seal_frame(b"hello server", &mut wire);
        let frame = &frames(&wire)[0];
        assert_eq!(
            server.open_frame(frame, &mut scratch).unwrap(),
            b"hello server"
        );
        wire.clear();
        server.seal_frame(b"hello client", &mut wire);
        assert_eq!(
            client.open_frame(&frames(&wire)[0], &mut scratch).unwrap(),
            b"hello client"
        );
    }

    #[test]
    fn frames_match_snow_transport_messages() {
        // Run a handshake with snow on both sides, take the raw split from the client before
        // it becomes snow's transport, and check hop's Transport against snow's both ways.
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut client = build(&client_key, true, PROLOGUE);
        let mut server = build(&server_key, false, PROLOGUE);
        let (mut buffer, mut scratch) = ([0u8; 256], [0u8; 256]);
        let mut step = |from: &mut HandshakeState, to: &mut HandshakeState| {
            let length = from.write_message(&[], &mut buffer).unwrap();
            to.read_message(&buffer[..length], &mut scratch).unwrap();
        };
        step(&mut client, &mut server);
        step(&mut server, &mut client);
        step(&mut client, &mut server);
        let (to_responder, to_initiator) = client.dangerously_get_raw_split();
        let mut hop_client = Transport::new(to_responder, to_initiator);
        let mut snow_server = server.into_transport_mode().unwrap();
        let mut frame_scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        for round in 0..3u8 {
            let mut wire = Vec::new();
            hop_client.seal_frame(&[round; 24], &mut wire);
            let mut opened = [0u8; 64];
            let length = snow_server.read_message(&wire[2..], &mut opened).unwrap();
            assert_eq!(&opened[..length], &[round; 24]);
            let mut sealed = [0u8; 64];
            let length = snow_server
                .write_message(&[round + 10; 5], &mut sealed)
                .unwrap();
            assert_eq!(
                hop_client
                    .open_frame(&sealed[..length], &mut frame_scratch)
                    .unwrap(),
                &[round + 10; 5]
            );
        }
    }

    #[test]
    fn an_open_session_is_small() {
        // Two keys and two nonces: what an idle connection pays for its session.
        assert_eq!(std::mem::size_of::<Transport>(), 80);
    }

    #[test]
    fn tampered_frame_does_not_open() {
        let (mut client, mut server, _, _) = handshake_pair();
        let mut wire = Vec::new();
        client.seal_frame(b"payload", &mut wire);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        assert!(matches!(
            server.open_frame(&frames(&wire)[0], &mut scratch),
            Err(NoiseError::Decrypt)
        ));
    }

    #[test]
    fn garbage_first_message_is_rejected() {
        let server = Box::new(ServerHandshake::new(&StaticKey::generate().unwrap()));
        let mut out = Vec::new();
        // 32 bytes is the size of message 1, but a low-order point is not a valid key share.
        assert!(server.handle_frame(&[0u8; 31], &mut out).is_err());
    }

    /// A snow initiator with `prologue` whose message 1 carries `payload`.
    fn other_client(prologue: &[u8], payload: &[u8]) -> (HandshakeState, Vec<u8>) {
        let client_key = StaticKey::generate().unwrap();
        let mut other = build(&client_key, true, prologue);
        let mut message = [0u8; 128];
        let bytes = other.write_message(payload, &mut message).unwrap();
        (other, message[..bytes].to_vec())
    }

    #[test]
    fn wrong_prologue_fails_the_handshake() {
        let server_key = StaticKey::generate().unwrap();
        let (mut other, message_1) = other_client(b"hop wire protocol v0", &[VERSION]);
        let mut out = Vec::new();
        let server = match Box::new(ServerHandshake::new(&server_key))
            .handle_frame(&message_1, &mut out)
            .unwrap()
        {
            ServerStep::Continue(waiting) => waiting,
            ServerStep::Finished { .. } => panic!("finished early"),
        };
        let reply = &frames(&out)[0];
        // The client cannot authenticate message 2 when the prologues differ.
        let mut scratch = [0u8; 128];
        assert!(other.read_message(reply, &mut scratch).is_err());
        drop(server);
    }

    #[test]
    fn a_version_1_client_finishes_its_handshake_and_is_named_so() {
        // A version-1 client: the version-1 prologue, an empty message 1 payload.
        let server_key = StaticKey::generate().unwrap();
        let (mut old, message_1) = other_client(PROLOGUE_V1, &[]);
        let mut out = Vec::new();
        let ServerStep::Continue(server) = Box::new(ServerHandshake::new(&server_key))
            .handle_frame(&message_1, &mut out)
            .unwrap()
        else {
            panic!("message 2 expected");
        };
        let mut scratch = [0u8; 128];
        old.read_message(&frames(&out)[0], &mut scratch).unwrap();
        let mut message_3 = [0u8; 128];
        let bytes = old.write_message(&[], &mut message_3).unwrap();
        match server.handle_frame(&message_3[..bytes], &mut out).unwrap() {
            ServerStep::Finished { version, .. } => assert_eq!(version, 1),
            ServerStep::Continue(_) => panic!("not finished after message 3"),
        }
    }

    #[test]
    fn an_unknown_version_is_refused_before_any_noise_work() {
        let (_, message_1) = other_client(PROLOGUE, &[9]);
        let server = Box::new(ServerHandshake::new(&StaticKey::generate().unwrap()));
        let mut out = Vec::new();
        assert!(matches!(
            server.handle_frame(&message_1, &mut out),
            Err(NoiseError::UnknownVersion(9))
        ));
        assert!(out.is_empty());
    }
}
