//! Connection state machines, sans-IO.
//!
//! [`ServerConnection`] is the server's view of one client: feed it the bytes read from the
//! socket with [`ServerConnection::handle_input`]; it appends the bytes to write to `out` and
//! passes events ([`ServerEvent`]) to a callback, in stream order. [`ClientConnection`] is its
//! twin on the client's side ([`ClientEvent`]), the one handshake that the blocking
//! [`crate::client::Client`], hop-bench and the fuzz targets all drive. [`Channel`] is an open
//! session (either side): frames in, stanzas out; stanzas queued, frames sealed.

use thiserror::Error;

use crate::frame::{Deframer, FrameError};
use crate::keys::{StaticKey, KEY_BYTES};
use crate::noise::{
    ClientHandshake, NoiseError, ServerHandshake, ServerStep, Transport, TransportState,
    FRAME_PLAINTEXT_BYTES_MAX, HANDSHAKE_FRAME_LIMITS, HANDSHAKE_MESSAGE_BYTES_MAX,
    TRANSPORT_FRAME_LIMITS, VERSION,
};
use crate::wire::{self, DecodeError, Stanza};

/// The peer broke the protocol. The connection must be closed.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Noise(#[from] NoiseError),
    #[error("{0}")]
    Stanza(#[from] DecodeError),
}

/// Why input handling stopped: the peer's fault, or the callback's.
#[derive(Debug, Error)]
pub enum InputError<E> {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("{0}")]
    Handler(E),
}

impl<E> From<FrameError> for InputError<E> {
    fn from(error: FrameError) -> Self {
        Self::Peer(error.into())
    }
}

impl<E> From<DecodeError> for InputError<E> {
    fn from(error: DecodeError) -> Self {
        Self::Peer(error.into())
    }
}

/// An open session: the Noise transport, the frame reassembly and the stanzas queued for
/// the next frame. An idle channel is its keys and nonces and one empty pointer (88 bytes):
/// the buffers exist only while a frame is half read or stanzas wait to be sealed.
#[derive(Debug)]
pub struct Channel {
    transport: Transport,
    buffers: Option<Box<Buffers>>,
}

#[derive(Debug, Default)]
struct Buffers {
    /// A frame from the peer that arrived in part.
    deframer: Deframer,
    /// Encoded stanzas waiting to be sealed into one frame.
    pending: Vec<u8>,
}

const _: () = assert!(std::mem::size_of::<Channel>() <= 88);

impl Channel {
    pub fn new(transport: Transport, deframer: Deframer) -> Self {
        let buffers = (!deframer.is_idle()).then(|| {
            Box::new(Buffers {
                deframer,
                pending: Vec::new(),
            })
        });
        Self { transport, buffers }
    }

    /// Feeds bytes from the peer; passes each stanza to `on_stanza` in order. `scratch` must
    /// hold a whole frame's plaintext (`FRAME_PLAINTEXT_BYTES_MAX`). The bodies of a frame of
    /// at most `wire::SHARED_FRAME_BYTES_MAX` share one buffer (`wire::decode_all`): copy one
    /// out to keep it long.
    pub fn handle_input<E>(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        on_stanza: &mut dyn FnMut(Stanza) -> Result<(), E>,
    ) -> Result<(), InputError<E>> {
        assert!(
            scratch.len() >= FRAME_PLAINTEXT_BYTES_MAX,
            "scratch smaller than a frame"
        );
        let transport = &mut self.transport;
        let mut on_frame = |frame: &[u8]| {
            let plaintext = transport
                .open_frame(frame, scratch)
                .map_err(PeerError::from)?;
            wire::decode_all(plaintext, &mut |stanza| {
                on_stanza(stanza).map_err(InputError::Handler)
            })
        };
        let result = match self.buffers.as_mut() {
            Some(buffers) => {
                buffers
                    .deframer
                    .handle_input(input, &mut || TRANSPORT_FRAME_LIMITS, &mut on_frame)
            }
            None => {
                // The common case: whole frames, nothing left over, nothing allocated.
                let mut deframer = Deframer::new();
                let result =
                    deframer.handle_input(input, &mut || TRANSPORT_FRAME_LIMITS, &mut on_frame);
                if !deframer.is_idle() {
                    self.buffers_mut().deframer = deframer;
                }
                result
            }
        };
        self.tidy();
        result
    }

    /// Queues a stanza for the next frame. If it does not fit in the frame being built, that
    /// frame is sealed into `out` first.
    pub fn queue(&mut self, stanza: &Stanza, out: &mut Vec<u8>) {
        let measured = wire::Measured::of(stanza);
        let bytes = measured.bytes();
        assert!(
            bytes <= FRAME_PLAINTEXT_BYTES_MAX,
            "a stanza larger than a frame"
        );
        if self.pending_bytes() + bytes > FRAME_PLAINTEXT_BYTES_MAX {
            self.flush(out);
        }
        measured.encode(&mut self.buffers_mut().pending);
    }

    /// True when stanzas are queued but not yet sealed.
    pub fn has_pending(&self) -> bool {
        self.pending_bytes() > 0
    }

    /// Seals the queued stanzas into one frame appended to `out`.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let Some(buffers) = self.buffers.as_mut() else {
            return;
        };
        if buffers.pending.is_empty() {
            return;
        }
        self.transport.seal_frame(&buffers.pending, out);
        // Released, not kept: an idle connection holds no send buffer.
        buffers.pending = Vec::new();
        self.tidy();
    }

    /// True when the channel holds no buffer: no partial frame, nothing queued.
    pub fn is_idle(&self) -> bool {
        self.buffers.is_none()
    }

    fn pending_bytes(&self) -> usize {
        self.buffers
            .as_ref()
            .map_or(0, |buffers| buffers.pending.len())
    }

    fn buffers_mut(&mut self) -> &mut Buffers {
        self.buffers.get_or_insert_with(Box::default)
    }

    fn tidy(&mut self) {
        if self
            .buffers
            .as_ref()
            .is_some_and(|buffers| buffers.deframer.is_idle() && buffers.pending.is_empty())
        {
            self.buffers = None;
        }
    }

    /// What another process needs to carry the session on: the transport's keys and nonces,
    /// and the bytes of a frame that arrived in part. Stanzas queued and not yet sealed are
    /// sealed into `out` first, so that none is lost. This channel must not seal or open
    /// another frame unless the other process does not take the session.
    pub fn export(&mut self, out: &mut Vec<u8>) -> ChannelState {
        self.flush(out);
        let partial = self
            .buffers
            .as_ref()
            .map(|buffers| buffers.deframer.partial().to_vec())
            .unwrap_or_default();
        ChannelState {
            transport: self.transport.state(),
            partial,
        }
    }

    /// The channel [`Channel::export`] took apart.
    pub fn resume(state: ChannelState) -> Self {
        Self::new(
            Transport::resume(&state.transport),
            Deframer::resume(state.partial),
        )
    }

    /// Seals arbitrary plaintext as one frame, bypassing the stanza codec. For tests of a
    /// peer's handling of undecodable stanzas.
    pub fn seal_raw(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        self.flush(out);
        self.transport.seal_frame(plaintext, out);
    }

    /// Queues and seals one stanza at once.
    pub fn send_now(&mut self, stanza: &Stanza, out: &mut Vec<u8>) {
        self.queue(stanza, out);
        self.flush(out);
    }
}

/// An open channel taken apart ([`Channel::export`]): what another process needs to carry
/// the session on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelState {
    pub transport: TransportState,
    /// Bytes of one frame that arrived in part; the rest follows on the socket.
    pub partial: Vec<u8>,
}

/// What the server learns from a client's bytes.
#[derive(Debug)]
pub enum ServerEvent {
    /// The handshake finished; this is the client's static key. Stanzas follow.
    Authenticated {
        client_key: [u8; KEY_BYTES],
    },
    /// The handshake finished with a client of an older protocol version (1). The channel is
    /// open only so that the server can tell it so: an `Error` with `ERROR_CODE_VERSION` and a
    /// `GoAway`, both encoded alike in every version, then close. Its stanzas are dropped.
    Outdated {
        version: u8,
    },
    Stanza(Stanza),
}

/// The server's side of one connection.
#[derive(Debug)]
pub enum ServerConnection {
    Handshaking {
        handshake: Box<ServerHandshake>,
        deframer: Deframer,
    },
    Open(Channel),
    /// The connection failed or was closed; nothing more is accepted.
    Closed,
}

const _: () = assert!(std::mem::size_of::<ServerConnection>() <= 96);

impl ServerConnection {
    pub fn new(key: &StaticKey) -> Self {
        Self::Handshaking {
            handshake: Box::new(ServerHandshake::new(key)),
            deframer: Deframer::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// Feeds bytes read from the client. Handshake replies are appended to `out`; events go to
    /// `on_event` in order. After an error the caller must close the connection.
    pub fn handle_input<E>(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(ServerEvent) -> Result<(), E>,
    ) -> Result<(), InputError<E>> {
        // On an error during the handshake the state is already `Closed`. On an error after it
        // the channel stays, so the caller can still seal an Error stanza before it closes.
        self.handle_input_inner(input, scratch, out, on_event)
    }

    fn handle_input_inner<E>(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(ServerEvent) -> Result<(), E>,
    ) -> Result<(), InputError<E>> {
        let Self::Handshaking { deframer, .. } = self else {
            return match self {
                Self::Open(channel) => channel.handle_input(input, scratch, &mut |stanza| {
                    on_event(ServerEvent::Stanza(stanza))
                }),
                _ => Ok(()),
            };
        };
        // The handshake consumes whole frames; the frames after message 3 in the same read
        // are transport frames, so the deframer's limits follow the stage.
        let mut deframer = std::mem::take(deframer);
        let Self::Handshaking { handshake, .. } = std::mem::replace(self, Self::Closed) else {
            unreachable!("matched above");
        };
        let mut stage = Stage::Handshake(handshake);
        let mut opened: Option<Transport> = None;
        let is_open = std::cell::Cell::new(false);
        let outdated = std::cell::Cell::new(false);
        let result = deframer.handle_input(
            input,
            &mut || {
                if is_open.get() {
                    TRANSPORT_FRAME_LIMITS
                } else {
                    HANDSHAKE_FRAME_LIMITS
                }
            },
            &mut |frame| match std::mem::replace(&mut stage, Stage::Open) {
                Stage::Handshake(handshake) => match handshake
                    .handle_frame(frame, out)
                    .map_err(PeerError::from)?
                {
                    ServerStep::Continue(next) => {
                        stage = Stage::Handshake(next);
                        Ok(())
                    }
                    ServerStep::Finished {
                        transport,
                        client_key,
                        version,
                    } => {
                        opened = Some(transport);
                        is_open.set(true);
                        let event = if version == VERSION {
                            ServerEvent::Authenticated { client_key }
                        } else {
                            outdated.set(true);
                            ServerEvent::Outdated { version }
                        };
                        on_event(event).map_err(InputError::Handler)
                    }
                },
                Stage::Open if outdated.get() => Ok(()),
                Stage::Open => {
                    let transport = opened.as_mut().expect("open after the handshake");
                    let plaintext = transport
                        .open_frame(frame, scratch)
                        .map_err(PeerError::from)?;
                    wire::decode_all(plaintext, &mut |stanza| {
                        on_event(ServerEvent::Stanza(stanza)).map_err(InputError::Handler)
                    })
                }
            },
        );
        result?;
        *self = match (stage, opened) {
            (Stage::Handshake(handshake), _) => Self::Handshaking {
                handshake,
                deframer,
            },
            (Stage::Open, Some(transport)) => Self::Open(Channel::new(transport, deframer)),
            (Stage::Open, None) => unreachable!("open without a transport"),
        };
        Ok(())
    }

    /// The open channel, to queue stanzas for the client.
    pub fn channel(&mut self) -> Option<&mut Channel> {
        match self {
            Self::Open(channel) => Some(channel),
            _ => None,
        }
    }
}

/// What the client learns from the server's bytes.
#[derive(Debug)]
pub enum ClientEvent {
    /// Message 2 proved that the server holds this static key (and it is the pinned one, if
    /// a pin was given). The client decides here whether it trusts the key: when the callback
    /// returns `Ok`, message 3 is appended to `out` and the channel opens; when it returns an
    /// error, nothing is written and the connection is closed. Always the first event.
    Authenticated {
        server_key: [u8; KEY_BYTES],
    },
    Stanza(Stanza),
}

/// Why a client connection's input handling stopped: the server's fault, a server that is
/// not the pinned one, or the callback's refusal.
#[derive(Debug, Error)]
pub enum ClientInputError<E> {
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The server proved a static key other than the pinned one: another server, or someone
    /// in between.
    #[error(
        "the server's key {} differs from the pinned key",
        hex::encode(presented)
    )]
    ServerKeyMismatch { presented: [u8; KEY_BYTES] },
    #[error("{0}")]
    Handler(E),
}

impl<E> From<FrameError> for ClientInputError<E> {
    fn from(error: FrameError) -> Self {
        Self::Peer(error.into())
    }
}

impl<E> From<NoiseError> for ClientInputError<E> {
    fn from(error: NoiseError) -> Self {
        Self::Peer(error.into())
    }
}

impl<E> From<InputError<E>> for ClientInputError<E> {
    fn from(error: InputError<E>) -> Self {
        match error {
            InputError::Peer(peer) => Self::Peer(peer),
            InputError::Handler(handler) => Self::Handler(handler),
        }
    }
}

/// The client's side of one connection.
///
/// Call order:
/// 1. [`ClientConnection::start`] appends handshake message 1 to `out`; write it.
/// 2. Feed every byte read from the server to [`ClientConnection::handle_input`] and write
///    what it appended to `out`, in order. Message 2 raises [`ClientEvent::Authenticated`],
///    which the caller answers (trust the key or refuse it); on `Ok`, message 3 is in `out`
///    and the connection is open.
/// 3. Once open, stanzas from the server arrive as [`ClientEvent::Stanza`];
///    [`ClientConnection::channel`] queues stanzas and seals them into `out`. Stanzas queued
///    after a `handle_input` that opened the connection follow message 3 in `out`.
///
/// After an error during the handshake (message 2 bad, the key refused) the connection is
/// closed and takes no more input; after an error on an open connection the channel stays,
/// and the caller closes the socket.
#[derive(Debug)]
pub struct ClientConnection {
    state: ClientState,
}

const _: () = assert!(std::mem::size_of::<ClientConnection>() <= 96);

impl ClientConnection {
    /// Starts the handshake: message 1 is appended to `out`. With a `pin`, a server that
    /// proves another static key is refused before the callback hears of it.
    pub fn start(key: &StaticKey, pin: Option<[u8; KEY_BYTES]>, out: &mut Vec<u8>) -> Self {
        let before = out.len();
        let handshake = ClientHandshake::start(key, out);
        debug_assert!(out.len() > before, "message 1 written");
        Self {
            state: ClientState::Handshaking(Box::new(ClientHandshaking {
                handshake,
                deframer: Deframer::new(),
                pin,
            })),
        }
    }

    /// True once message 3 is written: stanzas may be queued.
    pub fn is_open(&self) -> bool {
        matches!(self.state, ClientState::Open(_))
    }

    /// True after a failed handshake: nothing more is accepted or written.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, ClientState::Closed)
    }

    /// Feeds bytes read from the server. Message 3 is appended to `out` once the server is
    /// trusted; events go to `on_event` in stream order. `scratch` must hold a whole frame's
    /// plaintext (`FRAME_PLAINTEXT_BYTES_MAX`). After an error the caller must close the
    /// connection. A Deliver's body may share its frame's buffer with the frame's other
    /// bodies (`Channel::handle_input`): copy it out to keep it long.
    pub fn handle_input<E>(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(ClientEvent) -> Result<(), E>,
    ) -> Result<(), ClientInputError<E>> {
        match &mut self.state {
            ClientState::Open(channel) => {
                Ok(channel.handle_input(input, scratch, &mut |stanza| {
                    on_event(ClientEvent::Stanza(stanza))
                })?)
            }
            ClientState::Closed => Ok(()),
            ClientState::Handshaking(_) => {
                // Closed until the handshake step succeeds: an error leaves it closed.
                let ClientState::Handshaking(handshaking) =
                    std::mem::replace(&mut self.state, ClientState::Closed)
                else {
                    unreachable!("matched above");
                };
                self.state = handshaking.handle_input(input, out, on_event)?;
                Ok(())
            }
        }
    }

    /// The open channel, to queue stanzas for the server; `None` before message 3 and after a
    /// failed handshake.
    pub fn channel(&mut self) -> Option<&mut Channel> {
        match &mut self.state {
            ClientState::Open(channel) => Some(channel),
            _ => None,
        }
    }
}

enum Stage {
    Handshake(Box<ServerHandshake>),
    Open,
}

#[derive(Debug)]
enum ClientState {
    /// Message 1 sent; waiting for message 2. Boxed: the Noise state is large and lives only
    /// for one round trip.
    Handshaking(Box<ClientHandshaking>),
    Open(Channel),
    /// The handshake failed; nothing more is accepted.
    Closed,
}

#[derive(Debug)]
struct ClientHandshaking {
    handshake: ClientHandshake,
    /// Message 2 when it arrives in parts.
    deframer: Deframer,
    pin: Option<[u8; KEY_BYTES]>,
}

impl ClientHandshaking {
    /// Takes message 2 (whole or in parts): checks the server's key, asks the caller, writes
    /// message 3. Returns the next state.
    fn handle_input<E>(
        mut self: Box<Self>,
        input: &[u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(ClientEvent) -> Result<(), E>,
    ) -> Result<ClientState, ClientInputError<E>> {
        // The whole read is framed before any crypto: the server sends nothing after message 2
        // until it has message 3, so a second frame, or part of one, is refused before the
        // caller is asked to trust the key.
        const _: () = assert!(HANDSHAKE_FRAME_LIMITS.body_bytes_max <= HANDSHAKE_MESSAGE_BYTES_MAX);
        let mut message_2 = [0u8; HANDSHAKE_MESSAGE_BYTES_MAX];
        let mut message_2_bytes = None;
        self.deframer.handle_input::<ClientInputError<E>>(
            input,
            &mut || HANDSHAKE_FRAME_LIMITS,
            &mut |frame| {
                if message_2_bytes.is_some() {
                    return Err(NoiseError::OutOfOrder.into());
                }
                // The handshake limits keep a frame within the buffer.
                message_2[..frame.len()].copy_from_slice(frame);
                message_2_bytes = Some(frame.len());
                Ok(())
            },
        )?;
        let Some(message_2_bytes) = message_2_bytes else {
            return Ok(ClientState::Handshaking(self));
        };
        let Self {
            mut handshake,
            deframer,
            pin,
        } = *self;
        if !deframer.is_idle() {
            return Err(NoiseError::OutOfOrder.into());
        }
        let server_key = handshake.handle_response(&message_2[..message_2_bytes])?;
        if pin.is_some_and(|pinned| pinned != server_key) {
            return Err(ClientInputError::ServerKeyMismatch {
                presented: server_key,
            });
        }
        on_event(ClientEvent::Authenticated { server_key }).map_err(ClientInputError::Handler)?;
        let transport = handshake.finish(out)?;
        Ok(ClientState::Open(Channel::new(transport, deframer)))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::FRAME_BODY_BYTES_MAX;
    use crate::user::UserId;
    use crate::wire::{ErrorCode, Kind, Ping};

    struct Pair {
        /// A server that has taken handshake message 1 and replied.
        server: ServerConnection,
        client: Channel,
        client_key: StaticKey,
        /// The rest of the client's byte stream: message 3, then transport frames.
        rest: Vec<u8>,
    }

    const MESSAGE_1_BYTES: usize = 2 + 32 + 1;
    const MESSAGE_3_BYTES: usize = 2 + 64;

    /// Runs message 1 and 2 in memory and returns the rest of the client's stream: message 3
    /// followed by the given stanzas in one frame and a Ping in a second frame.
    fn pair(stanzas_after_handshake: &[Stanza]) -> Pair {
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut message_1 = Vec::new();
        let mut client =
            ClientConnection::start(&client_key, Some(*server_key.public()), &mut message_1);
        assert_eq!(message_1.len(), MESSAGE_1_BYTES);
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut to_client = Vec::new();
        server
            .handle_input::<()>(&message_1, &mut scratch, &mut to_client, &mut |_| Ok(()))
            .unwrap();
        let mut rest = Vec::new();
        client
            .handle_input::<()>(&to_client, &mut scratch, &mut rest, &mut |_| Ok(()))
            .unwrap();
        assert_eq!(rest.len(), MESSAGE_3_BYTES);
        let mut client = match client.state {
            ClientState::Open(channel) => channel,
            other => panic!("not open after message 2: {other:?}"),
        };
        for stanza in stanzas_after_handshake {
            client.queue(stanza, &mut rest);
        }
        client.flush(&mut rest);
        client.send_now(&Stanza::of(Kind::Ping(Ping { nonce: 77 })), &mut rest);
        Pair {
            server,
            client,
            client_key,
            rest,
        }
    }

    #[test]
    fn an_exported_channel_resumes_mid_frame_and_mid_sequence() {
        let ping = |nonce| Stanza::of(Kind::Ping(Ping { nonce }));
        let mut pair = pair(&[ping(1), ping(2)]);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut to_client = Vec::new();
        // Message 3, the first frame whole and the second in part.
        let cut = pair.rest.len() - 5;
        let mut seen = Vec::new();
        let mut collect = |event: ServerEvent| {
            if let ServerEvent::Stanza(stanza) = event {
                seen.push(stanza);
            }
            Ok::<(), ()>(())
        };
        pair.server
            .handle_input(
                &pair.rest[..cut],
                &mut scratch,
                &mut to_client,
                &mut collect,
            )
            .unwrap();
        assert_eq!(seen.len(), 2, "the first frame's two stanzas");
        // A reply queued and not sealed when the session is taken apart.
        let ServerConnection::Open(mut channel) =
            std::mem::replace(&mut pair.server, ServerConnection::Closed)
        else {
            panic!("open after message 3");
        };
        channel.queue(&ping(10), &mut to_client);
        let state = channel.export(&mut to_client);
        assert!(
            !state.partial.is_empty(),
            "the second frame's first bytes travel"
        );
        let mut resumed = Channel::resume(state);
        resumed
            .handle_input(&pair.rest[cut..], &mut scratch, &mut |stanza| {
                seen.push(stanza);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(seen.len(), 3, "the second frame completes after the move");
        assert_eq!(seen[2], ping(77));
        resumed.send_now(&ping(11), &mut to_client);
        // The client opens the reply sealed before the move, then the one after, in order.
        let mut replies = Vec::new();
        pair.client
            .handle_input(&to_client, &mut scratch, &mut |stanza| {
                replies.push(stanza);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(replies, vec![ping(10), ping(11)]);
    }

    fn replay(pair: &mut Pair, chunks: &[&[u8]]) -> Vec<String> {
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut out = Vec::new();
        let mut events = Vec::new();
        for chunk in chunks {
            pair.server
                .handle_input::<()>(chunk, &mut scratch, &mut out, &mut |event| {
                    events.push(match event {
                        ServerEvent::Authenticated { client_key } => {
                            format!("auth {}", hex::encode(client_key))
                        }
                        ServerEvent::Outdated { version } => format!("outdated {version}"),
                        ServerEvent::Stanza(stanza) => stanza.kind_name().to_string(),
                    });
                    Ok(())
                })
                .unwrap();
        }
        events
    }

    #[test]
    fn handshake_message_1_at_every_split() {
        let server_key = StaticKey::generate().unwrap();
        let mut message_1 = Vec::new();
        let _client =
            ClientConnection::start(&StaticKey::generate().unwrap(), None, &mut message_1);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        for split in 0..=message_1.len() {
            let mut server = ServerConnection::new(&server_key);
            let mut out = Vec::new();
            for part in [&message_1[..split], &message_1[split..]] {
                server
                    .handle_input::<()>(part, &mut scratch, &mut out, &mut |_| Ok(()))
                    .unwrap();
            }
            assert_eq!(out.len(), 2 + 96, "message 2 sent after split {split}");
        }
    }

    #[test]
    fn message_3_and_stanzas_at_every_split() {
        let to = UserId::from_public_key(&[5; 32]);
        let stanzas = [
            Stanza::send(to, 1, Bytes::from_static(b"hi"), 1),
            Stanza::send_to_alias(1, 2, Bytes::from_static(b"there")),
        ];
        let length = pair(&stanzas).rest.len();
        for split in 0..=length {
            let mut fresh = pair(&stanzas);
            let rest = fresh.rest.clone();
            let events = replay(&mut fresh, &[&rest[..split], &rest[split..]]);
            let auth = format!("auth {}", hex::encode(fresh.client_key.public()));
            assert_eq!(
                events,
                [auth.as_str(), "Send", "Send", "Ping"],
                "split at {split}"
            );
            assert!(fresh.server.is_open());
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut fresh = pair(&[Stanza::send(
            UserId::from_public_key(&[9; 32]),
            1,
            Bytes::from_static(b"x"),
            0,
        )]);
        let rest = fresh.rest.clone();
        let chunks: Vec<&[u8]> = rest.chunks(1).collect();
        let events = replay(&mut fresh, &chunks);
        assert_eq!(events[1..], ["Send".to_string(), "Ping".to_string()]);
    }

    #[test]
    fn garbage_before_the_handshake_closes() {
        let server_key = StaticKey::generate().unwrap();
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut out = Vec::new();
        let result = server.handle_input::<()>(
            b"GET / HTTP/1.1\r\n\r\n",
            &mut scratch,
            &mut out,
            &mut |_| Ok(()),
        );
        assert!(matches!(
            result,
            Err(InputError::Peer(PeerError::Frame(
                FrameError::TooLarge { .. }
            )))
        ));
        assert!(matches!(server, ServerConnection::Closed));
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_after_the_handshake_closes() {
        let mut fresh = pair(&[]);
        let rest = fresh.rest.clone();
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut out = Vec::new();
        fresh
            .server
            .handle_input::<()>(
                &rest[..MESSAGE_3_BYTES],
                &mut scratch,
                &mut out,
                &mut |_| Ok(()),
            )
            .unwrap();
        assert!(fresh.server.is_open());
        let mut garbage = Vec::new();
        crate::frame::push_header(&mut garbage, 40);
        garbage.extend_from_slice(&[0xAB; 40]);
        let result = fresh
            .server
            .handle_input::<()>(&garbage, &mut scratch, &mut out, &mut |_| Ok(()));
        assert!(matches!(
            result,
            Err(InputError::Peer(PeerError::Noise(NoiseError::Decrypt)))
        ));
        drop(fresh.client);
    }

    #[test]
    fn undecodable_stanza_inside_a_valid_frame_closes() {
        let mut fresh = pair(&[]);
        let rest = fresh.rest.clone();
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut out = Vec::new();
        fresh
            .server
            .handle_input::<()>(&rest, &mut scratch, &mut out, &mut |_| Ok(()))
            .unwrap();
        let mut bad = Vec::new();
        fresh
            .client
            .transport
            .seal_frame(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff], &mut bad);
        let result = fresh
            .server
            .handle_input::<()>(&bad, &mut scratch, &mut out, &mut |_| Ok(()));
        assert!(matches!(
            result,
            Err(InputError::Peer(PeerError::Stanza(_)))
        ));
    }

    #[test]
    fn queued_stanzas_share_one_frame_and_idle_channel_holds_no_buffer() {
        let mut fresh = pair(&[]);
        let mut out = Vec::new();
        for nonce in 0..10 {
            fresh
                .client
                .queue(&Stanza::of(Kind::Ping(Ping { nonce })), &mut out);
        }
        assert!(out.is_empty(), "nothing sealed before flush");
        fresh.client.flush(&mut out);
        let mut frames = 0;
        Deframer::new()
            .handle_input::<FrameError>(&out, &mut || TRANSPORT_FRAME_LIMITS, &mut |_| {
                frames += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(frames, 1);
        assert!(fresh.client.is_idle(), "no buffer kept after the flush");
    }

    const MESSAGE_2_BYTES: usize = 2 + 96;

    fn scratch() -> Vec<u8> {
        vec![0u8; FRAME_BODY_BYTES_MAX]
    }

    /// A server that took message 1 and the client that sent it, before message 2 reaches the
    /// client.
    struct Dialing {
        client: ClientConnection,
        server: ServerConnection,
        server_key: StaticKey,
        client_key: StaticKey,
        /// Message 2 as a frame, header included.
        message_2: Vec<u8>,
    }

    fn dialing(pin: impl FnOnce(&StaticKey) -> Option<[u8; KEY_BYTES]>) -> Dialing {
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut message_1 = Vec::new();
        let client = ClientConnection::start(&client_key, pin(&server_key), &mut message_1);
        assert_eq!(message_1.len(), MESSAGE_1_BYTES);
        assert!(!client.is_open() && !client.is_closed());
        let mut server = ServerConnection::new(&server_key);
        let mut message_2 = Vec::new();
        server
            .handle_input::<()>(&message_1, &mut scratch(), &mut message_2, &mut |event| {
                panic!("an event after message 1: {event:?}")
            })
            .unwrap();
        assert_eq!(message_2.len(), MESSAGE_2_BYTES);
        Dialing {
            client,
            server,
            server_key,
            client_key,
            message_2,
        }
    }

    /// What a client did with some reads: its events as text, the bytes it wrote, and how the
    /// last read ended (the reads stop at the first error).
    struct Fed {
        events: Vec<String>,
        written: Vec<u8>,
        result: Result<(), ClientInputError<()>>,
    }

    fn feed_client(client: &mut ClientConnection, chunks: &[&[u8]]) -> Fed {
        let mut fed = Fed {
            events: Vec::new(),
            written: Vec::new(),
            result: Ok(()),
        };
        let mut scratch = scratch();
        for chunk in chunks {
            fed.result = client.handle_input(chunk, &mut scratch, &mut fed.written, &mut |event| {
                fed.events.push(match event {
                    ClientEvent::Authenticated { server_key } => {
                        format!("auth {}", hex::encode(server_key))
                    }
                    ClientEvent::Stanza(stanza) => stanza.kind_name().to_string(),
                });
                Ok(())
            });
            if fed.result.is_err() {
                break;
            }
        }
        fed
    }

    fn server_events(server: &mut ServerConnection, input: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        server
            .handle_input::<()>(input, &mut scratch(), &mut Vec::new(), &mut |event| {
                events.push(match event {
                    ServerEvent::Authenticated { client_key } => {
                        format!("auth {}", hex::encode(client_key))
                    }
                    ServerEvent::Outdated { version } => format!("outdated {version}"),
                    ServerEvent::Stanza(stanza) => stanza.kind_name().to_string(),
                });
                Ok(())
            })
            .unwrap();
        events
    }

    /// A client and a server with an open session, in memory.
    fn opened() -> (ClientConnection, ServerConnection) {
        let mut dialing = dialing(|server| Some(*server.public()));
        let message_2 = dialing.message_2.clone();
        let fed = feed_client(&mut dialing.client, &[&message_2]);
        fed.result.unwrap();
        server_events(&mut dialing.server, &fed.written);
        assert!(dialing.client.is_open() && dialing.server.is_open());
        (dialing.client, dialing.server)
    }

    #[test]
    fn client_opens_at_every_split_of_message_2() {
        for split in 0..=MESSAGE_2_BYTES {
            let mut dialing = dialing(|server| Some(*server.public()));
            let message_2 = dialing.message_2.clone();
            let mut fed = feed_client(
                &mut dialing.client,
                &[&message_2[..split], &message_2[split..]],
            );
            fed.result.unwrap();
            let server_public = hex::encode(dialing.server_key.public());
            assert_eq!(
                fed.events,
                [format!("auth {server_public}")],
                "split {split}"
            );
            assert!(dialing.client.is_open());
            assert_eq!(fed.written.len(), MESSAGE_3_BYTES, "message 3 only");
            // Stanzas queued after the read that opened the connection follow message 3.
            let channel = dialing.client.channel().unwrap();
            channel.queue(&Stanza::outbox(7), &mut fed.written);
            channel.send_now(
                &Stanza::send(
                    dialing.client_key.user_id(),
                    1,
                    Bytes::from_static(b"hi"),
                    1,
                ),
                &mut fed.written,
            );
            let client_public = hex::encode(dialing.client_key.public());
            assert_eq!(
                server_events(&mut dialing.server, &fed.written),
                [format!("auth {client_public}").as_str(), "Outbox", "Send"]
            );
        }
    }

    #[test]
    fn client_takes_stanzas_at_every_split() {
        let stanzas = [
            Stanza::deliver(
                UserId::from_public_key(&[3; 32]),
                77,
                1_700_000_000_000,
                Bytes::from_static(b"hello"),
                5,
            ),
            Stanza::error(ErrorCode::QueueFull, "full", None),
        ];
        let stream = |server: &mut ServerConnection| {
            let mut stream = Vec::new();
            let channel = server.channel().unwrap();
            for stanza in &stanzas {
                channel.queue(stanza, &mut stream);
            }
            channel.flush(&mut stream);
            channel.send_now(&Stanza::of(Kind::Ping(Ping { nonce: 1 })), &mut stream);
            stream
        };
        let length = stream(&mut opened().1).len();
        for split in 0..=length {
            let (mut client, mut server) = opened();
            let bytes = stream(&mut server);
            let fed = feed_client(&mut client, &[&bytes[..split], &bytes[split..]]);
            fed.result.unwrap();
            assert_eq!(fed.events, ["Deliver", "Error", "Ping"], "split {split}");
            assert!(
                fed.written.is_empty(),
                "the client answers nothing by itself"
            );
            assert!(client.channel().unwrap().is_idle());
        }
    }

    #[test]
    fn a_wrong_pin_is_refused_before_the_callback() {
        let mut dialing = dialing(|_| Some([7; 32]));
        let message_2 = dialing.message_2.clone();
        let fed = feed_client(&mut dialing.client, &[&message_2]);
        assert!(matches!(
            fed.result,
            Err(ClientInputError::ServerKeyMismatch { presented })
                if presented == *dialing.server_key.public()
        ));
        assert!(fed.events.is_empty(), "the callback never heard of it");
        assert!(fed.written.is_empty(), "no message 3");
        assert!(dialing.client.is_closed());
        // A closed connection takes more bytes quietly.
        let again = feed_client(&mut dialing.client, &[&message_2]);
        assert!(again.result.is_ok() && again.events.is_empty() && again.written.is_empty());
    }

    #[test]
    fn the_caller_refuses_the_server_key() {
        let mut dialing = dialing(|_| None);
        let mut written = Vec::new();
        let mut asked = 0;
        let result = dialing.client.handle_input(
            &dialing.message_2,
            &mut scratch(),
            &mut written,
            &mut |event| {
                asked += 1;
                match event {
                    ClientEvent::Authenticated { .. } => Err("not in known_servers"),
                    ClientEvent::Stanza(_) => panic!("a stanza before the session"),
                }
            },
        );
        assert!(matches!(
            result,
            Err(ClientInputError::Handler("not in known_servers"))
        ));
        assert_eq!(asked, 1);
        assert!(written.is_empty(), "no message 3 to a refused server");
        assert!(dialing.client.is_closed());
    }

    #[test]
    fn garbage_instead_of_message_2_is_refused() {
        let mut bogus_frame = Vec::new();
        crate::frame::push_header(&mut bogus_frame, 96);
        bogus_frame.extend_from_slice(&[0xAB; 96]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("http", b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
            ("tiny frame", vec![0, 4, 1, 2, 3, 4]),
            ("random message 2", bogus_frame),
        ];
        for (name, bytes) in cases {
            let mut dialing = dialing(|_| None);
            let fed = feed_client(&mut dialing.client, &[&bytes]);
            assert!(
                matches!(
                    (name, &fed.result),
                    (
                        "http" | "tiny frame",
                        Err(ClientInputError::Peer(PeerError::Frame(_)))
                    ) | (
                        "random message 2",
                        Err(ClientInputError::Peer(PeerError::Noise(
                            NoiseError::Handshake(_)
                        )))
                    )
                ),
                "{name}: {:?}",
                fed.result
            );
            assert!(fed.events.is_empty() && fed.written.is_empty(), "{name}");
            assert!(dialing.client.is_closed(), "{name}");
        }
    }

    #[test]
    fn message_2_with_any_byte_changed_is_refused() {
        let genuine = dialing(|_| None).message_2;
        for index in crate::frame::FRAME_HEADER_BYTES..genuine.len() {
            let mut dialing = dialing(|_| None);
            let mut message_2 = dialing.message_2.clone();
            message_2[index] ^= 0x01;
            let fed = feed_client(&mut dialing.client, &[&message_2]);
            assert!(
                matches!(fed.result, Err(ClientInputError::Peer(PeerError::Noise(_)))),
                "byte {index}"
            );
            assert!(fed.events.is_empty() && fed.written.is_empty());
            assert!(dialing.client.is_closed());
        }
    }

    #[test]
    fn bytes_after_message_2_are_refused_before_the_callback() {
        let mut frame = Vec::new();
        crate::frame::push_header(&mut frame, 40);
        frame.extend_from_slice(&[0xAB; 40]);
        for extra in [&frame[..], &frame[..1], &frame[..3]] {
            let mut dialing = dialing(|_| None);
            let mut bytes = dialing.message_2.clone();
            bytes.extend_from_slice(extra);
            let fed = feed_client(&mut dialing.client, &[&bytes]);
            assert!(
                matches!(
                    fed.result,
                    Err(ClientInputError::Peer(PeerError::Noise(
                        NoiseError::OutOfOrder
                    )))
                ),
                "{} bytes after message 2: {:?}",
                extra.len(),
                fed.result
            );
            assert!(fed.events.is_empty() && fed.written.is_empty());
            assert!(dialing.client.is_closed());
        }
    }

    #[test]
    fn garbage_on_an_open_client_keeps_the_channel() {
        let (mut client, _server) = opened();
        let mut garbage = Vec::new();
        crate::frame::push_header(&mut garbage, 40);
        garbage.extend_from_slice(&[0xAB; 40]);
        let fed = feed_client(&mut client, &[&garbage]);
        assert!(matches!(
            fed.result,
            Err(ClientInputError::Peer(PeerError::Noise(
                NoiseError::Decrypt
            )))
        ));
        assert!(client.is_open(), "the caller closes the socket");
    }
}
