//! Connection state machines, sans-IO.
//!
//! [`ServerConnection`] is the server's view of one client: feed it the bytes read from the
//! socket with [`ServerConnection::handle_input`]; it appends the bytes to write to `out` and
//! passes events ([`ServerEvent`]) to a callback, in stream order. [`Channel`] is an open
//! session (either side): frames in, stanzas out; stanzas queued, frames sealed.

use thiserror::Error;

use crate::frame::{Deframer, FrameError};
use crate::keys::{StaticKey, KEY_BYTES};
use crate::noise::{
    NoiseError, ServerHandshake, ServerStep, Transport, FRAME_PLAINTEXT_BYTES_MAX,
    HANDSHAKE_FRAME_LIMITS, TRANSPORT_FRAME_LIMITS,
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
    /// hold a whole frame's plaintext (`FRAME_PLAINTEXT_BYTES_MAX`).
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
        let bytes = wire::encoded_bytes(stanza);
        assert!(
            bytes <= FRAME_PLAINTEXT_BYTES_MAX,
            "a stanza larger than a frame"
        );
        if self.pending_bytes() + bytes > FRAME_PLAINTEXT_BYTES_MAX {
            self.flush(out);
        }
        wire::encode(stanza, &mut self.buffers_mut().pending);
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

/// What the server learns from a client's bytes.
#[derive(Debug)]
pub enum ServerEvent {
    /// The handshake finished; this is the client's static key. Stanzas follow.
    Authenticated {
        client_key: [u8; KEY_BYTES],
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
                    ServerStep::Finished(transport, client_key) => {
                        opened = Some(transport);
                        is_open.set(true);
                        on_event(ServerEvent::Authenticated { client_key })
                            .map_err(InputError::Handler)
                    }
                },
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

enum Stage {
    Handshake(Box<ServerHandshake>),
    Open,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::frame::FRAME_BODY_BYTES_MAX;
    use crate::noise::ClientHandshake;
    use crate::user::UserId;
    use crate::wire::{Kind, Ping};

    struct Pair {
        /// A server that has taken handshake message 1 and replied.
        server: ServerConnection,
        client: Channel,
        client_key: StaticKey,
        /// The rest of the client's byte stream: message 3, then transport frames.
        rest: Vec<u8>,
    }

    const MESSAGE_1_BYTES: usize = 2 + 32;
    const MESSAGE_3_BYTES: usize = 2 + 64;

    /// Runs message 1 and 2 in memory and returns the rest of the client's stream: message 3
    /// followed by the given stanzas in one frame and a Ping in a second frame.
    fn pair(stanzas_after_handshake: &[Stanza]) -> Pair {
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut message_1 = Vec::new();
        let mut handshake = ClientHandshake::start(&client_key, &mut message_1);
        assert_eq!(message_1.len(), MESSAGE_1_BYTES);
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut to_client = Vec::new();
        server
            .handle_input::<()>(&message_1, &mut scratch, &mut to_client, &mut |_| Ok(()))
            .unwrap();
        let mut reply = None;
        Deframer::new()
            .handle_input::<FrameError>(&to_client, &mut || HANDSHAKE_FRAME_LIMITS, &mut |f| {
                reply = Some(f.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(
            &handshake.handle_response(&reply.unwrap()).unwrap(),
            server_key.public()
        );
        let mut rest = Vec::new();
        let transport = handshake.finish(&mut rest).unwrap();
        assert_eq!(rest.len(), MESSAGE_3_BYTES);
        let mut client = Channel::new(transport, Deframer::new());
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
        let _client = ClientHandshake::start(&StaticKey::generate().unwrap(), &mut message_1);
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
        let to = UserId::new(5).unwrap();
        let stanzas = [
            Stanza::send(to, 1, Bytes::from_static(b"hi")),
            Stanza::send(to, 2, Bytes::from_static(b"there")),
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
            UserId::new(9).unwrap(),
            1,
            Bytes::from_static(b"x"),
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
}
