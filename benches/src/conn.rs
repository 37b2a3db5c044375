//! One client connection's protocol state, sans-IO: bytes in, events and bytes out.
//!
//! [`HopClient`] runs hop's Noise XX handshake through `ClientHandshake` and then an open
//! `Channel`; [`MqttClient`] runs CONNECT/SUBSCRIBE and then PUBLISH. Both ack what the
//! server delivers, as a real client does (hop: `Ack` for a Deliver and for a delivered
//! Receipt; MQTT: PUBACK for a QoS 1 PUBLISH), so the scenarios only count.

use bytes::Bytes;
use hop_protocol::frame::{Deframer, FRAME_BODY_BYTES_MAX};
use hop_protocol::keys::{StaticKey, KEY_BYTES};
use hop_protocol::noise::{ClientHandshake, NoiseError, HANDSHAKE_FRAME_LIMITS};
use hop_protocol::session::{Channel, InputError, PeerError};
use hop_protocol::wire::{Ack, Kind, Ping, ReceiptKind, Stanza};
use hop_protocol::UserId;
use thiserror::Error;

use crate::mqtt::{self, MqttDeframer, MqttError, Packet};

/// What a connection's input produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Authenticated (hop) or connected and subscribed (MQTT): ready for the scenario.
    Opened,
    /// A message for this client, already acked to the server.
    Delivered { body: Bytes },
    /// The server took responsibility for a message this client sent (ServerAck / PUBACK).
    SendAcked,
    /// A delivered receipt for a message this client sent (hop only), already acked.
    Receipt,
    /// The server refused something; the code names what.
    ServerError { code: i32 },
    /// The server announced it closes this connection.
    GoAway { reason: i32 },
}

/// Why a connection's input was rejected: the server broke the protocol.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("hop: {0}")]
    Hop(#[from] PeerError),
    #[error("server key {presented} differs from the pinned key")]
    ServerKeyMismatch { presented: String },
    #[error("mqtt: {0}")]
    Mqtt(#[from] MqttError),
    #[error("mqtt broker refused the connection with return code {0}")]
    MqttRefused(u8),
}

impl From<InputError<std::convert::Infallible>> for ConnError {
    fn from(error: InputError<std::convert::Infallible>) -> Self {
        match error {
            InputError::Peer(peer) => Self::Hop(peer),
            InputError::Handler(never) => match never {},
        }
    }
}

/// The client side of one hop connection.
#[derive(Debug)]
pub enum HopClient {
    Handshaking {
        handshake: Option<Box<ClientHandshake>>,
        deframer: Deframer,
        pin: Option<[u8; KEY_BYTES]>,
    },
    Open(Box<Channel>),
}

impl HopClient {
    /// Starts the handshake: message 1 is appended to `out`.
    pub fn start(key: &StaticKey, pin: Option<[u8; KEY_BYTES]>, out: &mut Vec<u8>) -> Self {
        let handshake = ClientHandshake::start(key, out);
        Self::Handshaking {
            handshake: Some(Box::new(handshake)),
            deframer: Deframer::new(),
            pin,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// Feeds bytes from the server. Replies (message 3, acks) are queued or appended to `out`;
    /// call [`HopClient::flush`] after the turn's sends to seal them.
    pub fn handle_input(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ConnError> {
        match self {
            Self::Handshaking {
                handshake,
                deframer,
                pin,
            } => {
                let mut reply: Option<Vec<u8>> = None;
                deframer.handle_input::<PeerError>(
                    input,
                    &mut || HANDSHAKE_FRAME_LIMITS,
                    &mut |frame| {
                        if reply.is_some() {
                            // The server sends nothing after message 2 until it has message 3.
                            return Err(NoiseError::OutOfOrder.into());
                        }
                        reply = Some(frame.to_vec());
                        Ok(())
                    },
                )?;
                let Some(reply) = reply else {
                    return Ok(());
                };
                let mut handshake = handshake
                    .take()
                    .ok_or(PeerError::from(NoiseError::OutOfOrder))?;
                let server_key = handshake.handle_response(&reply).map_err(PeerError::from)?;
                if let Some(pinned) = pin {
                    if *pinned != server_key {
                        return Err(ConnError::ServerKeyMismatch {
                            presented: hex::encode(server_key),
                        });
                    }
                }
                let transport = handshake.finish(out).map_err(PeerError::from)?;
                let deframer = std::mem::take(deframer);
                *self = Self::Open(Box::new(Channel::new(transport, deframer)));
                on_event(Event::Opened);
                Ok(())
            }
            Self::Open(channel) => {
                let mut replies: Vec<Stanza> = Vec::new();
                channel.handle_input::<std::convert::Infallible>(
                    input,
                    scratch,
                    &mut |stanza| {
                        match stanza.kind {
                            Some(Kind::Deliver(deliver)) => {
                                replies.push(Stanza::of(Kind::Ack(Ack {
                                    id: deliver.id,
                                    kind: ReceiptKind::Unspecified as i32,
                                })));
                                on_event(Event::Delivered { body: deliver.body });
                            }
                            Some(Kind::ServerAck(_)) => on_event(Event::SendAcked),
                            Some(Kind::Receipt(receipt)) => {
                                replies.push(Stanza::of(Kind::Ack(Ack {
                                    id: receipt.id,
                                    kind: receipt.kind,
                                })));
                                on_event(Event::Receipt);
                            }
                            Some(Kind::Error(error)) => {
                                on_event(Event::ServerError { code: error.code })
                            }
                            Some(Kind::GoAway(go_away)) => on_event(Event::GoAway {
                                reason: go_away.reason,
                            }),
                            _ => {}
                        }
                        Ok(())
                    },
                )?;
                for reply in &replies {
                    channel.queue(reply, out);
                }
                Ok(())
            }
        }
    }

    /// Queues a message to `to`; sealed at the next flush.
    pub fn send(&mut self, to: UserId, seq: u32, body: Bytes, out: &mut Vec<u8>) {
        if let Self::Open(channel) = self {
            channel.queue(&Stanza::send(to, seq, body), out);
        }
    }

    pub fn ping(&mut self, nonce: u64, out: &mut Vec<u8>) {
        if let Self::Open(channel) = self {
            channel.queue(&Stanza::of(Kind::Ping(Ping { nonce })), out);
        }
    }

    /// Seals everything queued into one frame.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if let Self::Open(channel) = self {
            channel.flush(out);
        }
    }
}

/// Scratch space for opening one frame.
pub fn frame_scratch() -> Vec<u8> {
    vec![0u8; FRAME_BODY_BYTES_MAX]
}

/// The client side of one MQTT connection.
#[derive(Debug)]
pub struct MqttClient {
    deframer: MqttDeframer,
    /// Subscribe to this topic after CONNACK; open after its SUBACK.
    subscribe: Option<(String, u8)>,
    open: bool,
    next_packet_id: u16,
}

const SUBSCRIBE_PACKET_ID: u16 = 1;
/// The password sent with `--mqtt-login` (the username is the client id): for brokers that
/// require a login and accept any, such as ejabberd with anonymous authentication.
const MQTT_PASSWORD: &str = "hop-bench";

impl MqttClient {
    /// Appends CONNECT (and SUBSCRIBE, pipelined) to `out`.
    pub fn start(
        client_id: &str,
        clean_session: bool,
        subscribe: Option<(String, u8)>,
        keep_alive_s: u16,
        login: bool,
        out: &mut Vec<u8>,
    ) -> Self {
        let login = login.then_some((client_id, MQTT_PASSWORD));
        mqtt::connect(out, client_id, clean_session, keep_alive_s, login);
        if let Some((topic, qos)) = &subscribe {
            mqtt::subscribe(out, SUBSCRIBE_PACKET_ID, topic, *qos);
        }
        Self {
            deframer: MqttDeframer::default(),
            subscribe,
            open: false,
            next_packet_id: SUBSCRIBE_PACKET_ID + 1,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn handle_input(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ConnError> {
        let mut refused = None;
        let open = &mut self.open;
        let subscribing = self.subscribe.is_some();
        self.deframer
            .handle_input(input, &mut |packet| match packet {
                Packet::ConnAck { return_code } => {
                    if return_code != 0 {
                        refused = Some(return_code);
                    } else if !subscribing {
                        *open = true;
                        on_event(Event::Opened);
                    }
                }
                Packet::SubAck { .. } => {
                    if !*open {
                        *open = true;
                        on_event(Event::Opened);
                    }
                }
                Packet::Publish {
                    qos,
                    packet_id,
                    payload,
                    ..
                } => {
                    if qos > 0 {
                        mqtt::puback(out, packet_id);
                    }
                    on_event(Event::Delivered {
                        body: Bytes::copy_from_slice(payload),
                    });
                }
                Packet::PubAck { .. } => on_event(Event::SendAcked),
                Packet::PingResp | Packet::Other { .. } => {}
            })?;
        match refused {
            Some(code) => Err(ConnError::MqttRefused(code)),
            None => Ok(()),
        }
    }

    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, out: &mut Vec<u8>) {
        let packet_id = self.next_packet_id;
        self.next_packet_id = self
            .next_packet_id
            .wrapping_add(1)
            .max(SUBSCRIBE_PACKET_ID + 1);
        mqtt::publish(out, topic, payload, qos, packet_id);
    }

    pub fn ping(&mut self, out: &mut Vec<u8>) {
        mqtt::pingreq(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hop_protocol::session::{ServerConnection, ServerEvent};
    use hop_protocol::wire::Deliver;

    /// The generator's client against hop's own server state machine, in memory.
    #[test]
    fn hop_client_handshakes_and_acks_a_delivery() {
        let server_key = StaticKey::generate().unwrap();
        let client_key = StaticKey::generate().unwrap();
        let mut to_server = Vec::new();
        let mut client = HopClient::start(&client_key, Some(*server_key.public()), &mut to_server);
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = frame_scratch();
        let mut to_client = Vec::new();
        server
            .handle_input::<()>(&to_server, &mut scratch, &mut to_client, &mut |_| Ok(()))
            .unwrap();
        to_server.clear();
        let mut events = Vec::new();
        client
            .handle_input(&to_client, &mut scratch, &mut to_server, &mut |e| {
                events.push(e)
            })
            .unwrap();
        assert_eq!(events, [Event::Opened]);
        let mut authenticated = false;
        server
            .handle_input::<()>(&to_server, &mut scratch, &mut Vec::new(), &mut |event| {
                authenticated |= matches!(event, ServerEvent::Authenticated { .. });
                Ok(())
            })
            .unwrap();
        assert!(authenticated);

        to_client.clear();
        server.channel().unwrap().send_now(
            &Stanza::of(Kind::Deliver(Deliver {
                from: 1,
                id: 77,
                timestamp_ms: 0,
                body: Bytes::from_static(b"hello"),
            })),
            &mut to_client,
        );
        to_server.clear();
        events.clear();
        client
            .handle_input(&to_client, &mut scratch, &mut to_server, &mut |e| {
                events.push(e)
            })
            .unwrap();
        client.flush(&mut to_server);
        assert_eq!(
            events,
            [Event::Delivered {
                body: Bytes::from_static(b"hello")
            }]
        );
        let mut acked = Vec::new();
        server
            .handle_input::<()>(&to_server, &mut scratch, &mut Vec::new(), &mut |event| {
                if let ServerEvent::Stanza(Stanza {
                    kind: Some(Kind::Ack(ack)),
                }) = event
                {
                    acked.push(ack.id);
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(acked, [77]);
    }

    #[test]
    fn hop_client_refuses_an_unpinned_server() {
        let server_key = StaticKey::generate().unwrap();
        let mut to_server = Vec::new();
        let mut client = HopClient::start(
            &StaticKey::generate().unwrap(),
            Some([7; 32]),
            &mut to_server,
        );
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = frame_scratch();
        let mut to_client = Vec::new();
        server
            .handle_input::<()>(&to_server, &mut scratch, &mut to_client, &mut |_| Ok(()))
            .unwrap();
        let result = client.handle_input(&to_client, &mut scratch, &mut Vec::new(), &mut |_| {});
        assert!(matches!(result, Err(ConnError::ServerKeyMismatch { .. })));
    }

    #[test]
    fn mqtt_client_opens_after_suback_and_acks_qos1() {
        let mut out = Vec::new();
        let mut client =
            MqttClient::start("c1", false, Some(("u/1".into(), 1)), 60, false, &mut out);
        let mut events = Vec::new();
        let mut from_broker = vec![0x20, 2, 0, 0];
        client
            .handle_input(&from_broker, &mut out, &mut |e| events.push(e))
            .unwrap();
        assert!(!client.is_open(), "not open before SUBACK");
        from_broker = vec![0x90, 3, 0, 1, 1];
        mqtt::publish(&mut from_broker, "u/1", b"x", 1, 5);
        out.clear();
        client
            .handle_input(&from_broker, &mut out, &mut |e| events.push(e))
            .unwrap();
        assert!(client.is_open());
        assert_eq!(
            events,
            [
                Event::Opened,
                Event::Delivered {
                    body: Bytes::from_static(b"x")
                }
            ]
        );
        assert_eq!(out, [0x40, 2, 0, 5], "PUBACK for packet 5");
        let refused = client.handle_input(&[0x20, 2, 0, 5], &mut out, &mut |_| {});
        assert!(matches!(refused, Err(ConnError::MqttRefused(5))));
    }
}
