//! One client connection's protocol state, sans-IO: bytes in, events and bytes out.
//!
//! [`HopClient`] drives hop's own client connection (`session::ClientConnection`: the Noise XX
//! handshake, then the open channel) and sends as a v2 client does: it declares a random
//! outbox and numbers and names its messages through `outbox::Outbox`, so a message to a
//! known peer carries an alias, not the peer's 16-byte id. It also creates groups
//! (`GroupChange`) and reports their answer (`GroupInfo`) and their change events apart from
//! messages. [`MqttClient`] runs CONNECT/SUBSCRIBE and then PUBLISH. Both ack what the server
//! delivers, as a real client does (hop: `Ack` for a Deliver, a group event included, and for
//! a Receipt; MQTT: PUBACK for a QoS 1 PUBLISH), so the scenarios only count.
//!
//! A hop client is ready ([`Event::Opened`]) only once it knows it is home: after the
//! handshake it sends a Ping (in the same write as handshake message 3) and opens on its Pong,
//! as `Client::connect_home` does. A node of a cluster that is not the user's home answers
//! with a GoAway REDIRECT instead, which the client keeps for the engine to follow
//! ([`HopClient::into_redirect`]) and does not report as an event.
//!
//! A server's limits are not failures either. A refusal at admission (in place of handshake
//! message 2) is the connection's error, [`ConnError::refusal`], which the engine waits out. A
//! Send refused for the sender's rate (Error `RATE_LIMITED`) is kept with its recipient and
//! body for the engine to send again once the wait it names has passed
//! ([`HopClient::take_rate_limited`]), and is not reported as an event.

use std::collections::VecDeque;

use bytes::Bytes;
use hop_protocol::frame::FRAME_BODY_BYTES_MAX;
use hop_protocol::keys::{StaticKey, KEY_BYTES};
use hop_protocol::noise::{NoiseError, Refusal};
use hop_protocol::outbox::Outbox;
use hop_protocol::session::{ClientConnection, ClientEvent, ClientInputError, PeerError};
use hop_protocol::wire::{
    Ack, ErrorCode, GoAway, GoAwayReason, GroupChange, Kind, MessageRef, Ping, ReceiptKind, Stanza,
    UserRef,
};
use hop_protocol::UserId;
use thiserror::Error;

use crate::mqtt::{self, MqttDeframer, MqttError, Packet};

/// What a connection's input produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// hop: authenticated and home (the Pong of the home check came back); MQTT: connected
    /// and subscribed. Ready for the scenario.
    Opened,
    /// A message for this client, already acked to the server.
    Delivered { body: Bytes },
    /// hop: a change of a group this client's account is a member of (a Deliver carrying a
    /// `GroupEvent`), already acked to the server. Not a message: no receipt follows.
    GroupEvent,
    /// hop: the answer to a `GroupChange`: the group as it is now (`None`: no valid id).
    GroupInfo { group: Option<UserId> },
    /// The server took responsibility for a message this client sent (ServerAck / PUBACK).
    /// hop: counted once per message, by its (outbox, seq).
    SendAcked,
    /// hop: a second answer (ServerAck or Error) for a message that already had one.
    SendAnsweredAgain,
    /// A delivered receipt for a message this client sent (hop only), already acked, or the
    /// same tick folded into the message's ServerAck (`delivered_ms`).
    Receipt,
    /// The server refused something; the code names what. `send_refused`: the Error names a
    /// message this connection sent (by its (outbox, seq)), which gets no ServerAck.
    ServerError { code: i32, send_refused: bool },
    /// The server announced it closes this connection (hop: for any reason but a REDIRECT,
    /// which the engine follows instead).
    GoAway { reason: i32 },
}

/// Why a connection's input was rejected: the server broke the protocol.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("hop: {0}")]
    Hop(#[from] PeerError),
    #[error("server key {presented} differs from the pinned key")]
    ServerKeyMismatch { presented: String },
    #[error(
        "hop: the server answered message {seq} of outbox {outbox:016x}, which this connection \
         did not send"
    )]
    UnknownMessage { outbox: u64, seq: u64 },
    #[error("no randomness available for an outbox id")]
    Random,
    #[error("mqtt: {0}")]
    Mqtt(#[from] MqttError),
    #[error("mqtt broker refused the connection with return code {0}")]
    MqttRefused(u8),
    #[error("hop: the server sent a GoAway REDIRECT this client cannot follow: {0}")]
    BadRedirect(String),
}

impl ConnError {
    /// The server's refusal at admission, if that is what ended the handshake: not the
    /// server's fault, a wait it asks for (`docs/protocol.md`).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Hop(PeerError::Noise(NoiseError::Refused(refusal))) => Some(*refusal),
            _ => None,
        }
    }
}

/// How long a sender waits after a `RATE_LIMITED` whose reason names no wait, in milliseconds:
/// hopd's reason always names it (`try again in N ms`); this is for a server that does not.
pub const RATE_LIMITED_WAIT_UNNAMED_MS: u64 = 100;

/// The wait a `RATE_LIMITED` Error's reason names (`...; try again in N ms`), in milliseconds.
pub fn named_wait_ms(reason: &str) -> Option<u64> {
    let (_, after) = reason.rsplit_once("try again in ")?;
    after.strip_suffix(" ms")?.parse().ok()
}

/// The nonce of the Ping that asks a server whether it is this user's home, to tell its Pong
/// from a heartbeat's (whose nonces count from 0).
pub const HOME_PING_NONCE: u64 = 0x686f_7020_686f_6d65;

/// Where a GoAway REDIRECT sends a client: the user's home node and the key to pin there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// "host:port", as the cluster advertises it.
    pub address: String,
    pub server_key: [u8; KEY_BYTES],
}

impl Redirect {
    /// The redirect a GoAway carries; `Ok(None)` for a GoAway of another reason.
    pub fn of(go_away: &GoAway) -> Result<Option<Self>, ConnError> {
        if go_away.reason != GoAwayReason::Redirect as i32 {
            return Ok(None);
        }
        let server_key = <[u8; KEY_BYTES]>::try_from(&go_away.redirect_key[..]).map_err(|_| {
            ConnError::BadRedirect(format!(
                "its key has {} bytes, not {KEY_BYTES}",
                go_away.redirect_key.len()
            ))
        })?;
        if go_away.redirect_address.is_empty() {
            return Err(ConnError::BadRedirect("it names no address".into()));
        }
        Ok(Some(Self {
            address: go_away.redirect_address.clone(),
            server_key,
        }))
    }
}

impl From<ClientInputError<ConnError>> for ConnError {
    fn from(error: ClientInputError<ConnError>) -> Self {
        match error {
            ClientInputError::Peer(peer) => Self::Hop(peer),
            ClientInputError::ServerKeyMismatch { presented } => Self::ServerKeyMismatch {
                presented: hex::encode(presented),
            },
            ClientInputError::Handler(error) => error,
        }
    }
}

/// Whether a hop connection knows it is at the user's home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// The handshake is under way.
    Handshaking,
    /// Authenticated; the home check's Ping is queued or sent, its Pong not yet back.
    Asked,
    /// The Pong came back: this server keeps the connection.
    Here,
    /// The server sent a REDIRECT; nothing more is read from this connection.
    Redirected,
}

/// The client side of one hop connection.
#[derive(Debug)]
pub struct HopClient {
    /// Kept to connect again where a REDIRECT points; boxed, as it is not used on the way.
    key: Box<StaticKey>,
    connection: ClientConnection,
    home: Home,
    redirect: Option<Redirect>,
    outbox: Outbox,
    /// The outbox's messages the server has not answered yet, to count each answer once and
    /// to send again one refused for the sender's rate.
    unanswered: Unanswered,
    /// Messages the server refused for the sender's rate, in the order sent, and the longest
    /// wait their refusals named; taken by [`HopClient::take_rate_limited`].
    rate_limited: Vec<(UserId, Bytes)>,
    rate_limited_wait_ms: u64,
    /// The stanzas of one message (the outbox declaration first, then the Send); kept so that
    /// sending allocates nothing but the body.
    stanzas: Vec<Stanza>,
    /// The acks of one read, queued once the read is handled; kept for the same reason.
    acks: Vec<Ack>,
}

impl HopClient {
    /// Starts the handshake: message 1 is appended to `out`. With a `pin`, a server with
    /// another key fails the connection.
    pub fn start(
        key: StaticKey,
        pin: Option<[u8; KEY_BYTES]>,
        out: &mut Vec<u8>,
    ) -> Result<Self, ConnError> {
        let outbox = Outbox::random().map_err(|_| ConnError::Random)?;
        Ok(Self {
            connection: ClientConnection::start(&key, pin, out),
            key: Box::new(key),
            home: Home::Handshaking,
            redirect: None,
            outbox,
            unanswered: Unanswered::default(),
            rate_limited: Vec::new(),
            rate_limited_wait_ms: 0,
            stanzas: Vec::new(),
            acks: Vec::new(),
        })
    }

    /// Asks (from the outbox's declaration on) for the second tick in the ServerAck when the
    /// recipient's device acks first; such a ServerAck brings [`Event::Receipt`] too.
    pub fn set_delivered_in_ack(&mut self, on: bool) {
        self.outbox.set_delivered_in_ack(on);
    }

    /// True once the connection is authenticated and home: ready for the scenario.
    pub fn is_open(&self) -> bool {
        self.home == Home::Here
    }

    /// True once the server sent a GoAway REDIRECT; take it with [`HopClient::into_redirect`].
    pub fn is_redirected(&self) -> bool {
        self.home == Home::Redirected
    }

    /// Ends this connection; returns the user's key and where the server sent it, if it did.
    pub fn into_redirect(self) -> (StaticKey, Option<Redirect>) {
        (*self.key, self.redirect)
    }

    /// Messages sent on this connection that the server has not answered yet.
    pub fn unanswered(&self) -> usize {
        self.unanswered.waiting
    }

    /// Messages refused for the sender's rate since the last call, appended to `into` in the
    /// order they were sent, and the longest wait their refusals named (ms); `None` if none.
    /// The caller sends them again once the wait has passed: the server kept nothing of them.
    pub fn take_rate_limited(&mut self, into: &mut VecDeque<(UserId, Bytes)>) -> Option<u64> {
        if self.rate_limited.is_empty() {
            return None;
        }
        into.extend(self.rate_limited.drain(..));
        Some(std::mem::take(&mut self.rate_limited_wait_ms))
    }

    /// Feeds bytes from the server. Replies (message 3, the home check's Ping, acks) are
    /// queued or appended to `out`; call [`HopClient::flush`] after the turn's sends to seal
    /// them. After a REDIRECT the rest of the input is ignored. A refusal at admission is the
    /// error ([`ConnError::refusal`]).
    pub fn handle_input(
        &mut self,
        input: &[u8],
        scratch: &mut [u8],
        out: &mut Vec<u8>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), ConnError> {
        if self.home == Home::Redirected {
            return Ok(());
        }
        let Self {
            connection,
            home,
            redirect,
            outbox,
            unanswered,
            rate_limited,
            rate_limited_wait_ms,
            acks,
            ..
        } = self;
        debug_assert!(acks.is_empty());
        let home_before = *home;
        let result = connection.handle_input::<ConnError>(input, scratch, out, &mut |event| {
            if *home == Home::Redirected {
                return Ok(());
            }
            let stanza = match event {
                // The pin, if any, was checked by the connection. Ready once home.
                ClientEvent::Authenticated { .. } => {
                    *home = Home::Asked;
                    return Ok(());
                }
                ClientEvent::Stanza(stanza) => stanza,
            };
            match stanza.kind {
                Some(Kind::Pong(pong)) if pong.nonce == HOME_PING_NONCE && *home == Home::Asked => {
                    *home = Home::Here;
                    on_event(Event::Opened);
                }
                Some(Kind::Deliver(deliver)) => {
                    acks.push(Ack {
                        id: deliver.id,
                        kind: ReceiptKind::Unspecified as i32,
                    });
                    on_event(if deliver.event.is_some() {
                        Event::GroupEvent
                    } else {
                        Event::Delivered { body: deliver.body }
                    });
                }
                Some(Kind::GroupInfo(info)) => on_event(Event::GroupInfo {
                    group: UserRef::user(info.group.as_ref()),
                }),
                Some(Kind::ServerAck(ack)) => {
                    let message = MessageRef {
                        outbox: ack.outbox,
                        seq: ack.seq,
                    };
                    on_event(if unanswered.answer(outbox, message)?.is_some() {
                        Event::SendAcked
                    } else {
                        Event::SendAnsweredAgain
                    });
                    // The second tick, folded in: no Receipt follows, nothing to ack.
                    if ack.delivered_ms != 0 {
                        on_event(Event::Receipt);
                    }
                }
                Some(Kind::Receipt(receipt)) => {
                    acks.push(Ack {
                        id: receipt.ack_id().unwrap_or(receipt.id),
                        kind: receipt.kind,
                    });
                    on_event(Event::Receipt);
                }
                Some(Kind::Error(error)) => {
                    // seq 0: the Error is not about a Send.
                    let message = MessageRef {
                        outbox: error.outbox,
                        seq: error.seq,
                    };
                    let refused = match error.seq {
                        0 => None,
                        _ => unanswered.answer(outbox, message)?,
                    };
                    match refused {
                        // Not taken, nothing of it kept: sent again after the wait.
                        Some(sent) if error.code == ErrorCode::RateLimited as i32 => {
                            let wait_ms = named_wait_ms(&error.reason)
                                .unwrap_or(RATE_LIMITED_WAIT_UNNAMED_MS);
                            *rate_limited_wait_ms = (*rate_limited_wait_ms).max(wait_ms);
                            rate_limited.push(sent);
                        }
                        refused => on_event(Event::ServerError {
                            code: error.code,
                            send_refused: refused.is_some(),
                        }),
                    }
                }
                Some(Kind::GoAway(go_away)) => match Redirect::of(&go_away)? {
                    Some(to) => {
                        *home = Home::Redirected;
                        *redirect = Some(to);
                    }
                    None => on_event(Event::GoAway {
                        reason: go_away.reason,
                    }),
                },
                _ => {}
            }
            Ok(())
        });
        if let (Ok(()), Some(channel)) = (&result, connection.channel()) {
            if home_before == Home::Handshaking && *home == Home::Asked {
                // Sealed with message 3's flight: no round trip of its own.
                channel.queue(
                    &Stanza::of(Kind::Ping(Ping {
                        nonce: HOME_PING_NONCE,
                    })),
                    out,
                );
            }
            for ack in acks.drain(..) {
                channel.queue(&Stanza::of(Kind::Ack(ack)), out);
            }
        }
        // After an error the connection fails: its acks are moot.
        acks.clear();
        Ok(result?)
    }

    /// Queues a message to `to` from this connection's outbox; sealed at the next flush.
    /// Ignored until the connection is open and home.
    pub fn send(&mut self, to: UserId, body: Bytes, out: &mut Vec<u8>) {
        if self.home != Home::Here {
            return;
        }
        let Some(channel) = self.connection.channel() else {
            return;
        };
        debug_assert!(self.stanzas.is_empty());
        let message = self.outbox.send(to, body, &mut self.stanzas);
        for stanza in self.stanzas.drain(..) {
            channel.queue(&stanza, out);
            // The body is the Send's own, kept without a copy until the answer.
            if let Some(Kind::Send(send)) = stanza.kind {
                self.unanswered.sent(message.seq, to, send.body);
            }
        }
    }

    /// Queues a group change (create, add, ...); answered with `GroupInfo` or an Error.
    /// Ignored until the connection is open.
    pub fn change_group(&mut self, change: GroupChange, out: &mut Vec<u8>) {
        if let Some(channel) = self.connection.channel() {
            channel.queue(&Stanza::of(Kind::GroupChange(change)), out);
        }
    }

    pub fn ping(&mut self, nonce: u64, out: &mut Vec<u8>) {
        if let Some(channel) = self.connection.channel() {
            channel.queue(&Stanza::of(Kind::Ping(Ping { nonce })), out);
        }
    }

    /// Seals everything queued into one frame.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if let Some(channel) = self.connection.channel() {
            channel.flush(out);
        }
    }
}

/// The messages of one outbox that await their answer (a ServerAck or an Error), each with
/// its recipient and body, so that one refused for the sender's rate can be sent again. Every
/// seq the outbox gives out is pushed in order (they count from 1): message `seq` is at
/// `seq - first_seq`, `None` once answered, and answered ones leave from the front, so answers
/// that arrive in order cost a pop. A server answers every Send: this holds what is in flight,
/// which the scenarios bound (their windows; open loop, the offered rate times the answer time).
#[derive(Debug)]
struct Unanswered {
    first_seq: u64,
    messages: VecDeque<Option<(UserId, Bytes)>>,
    /// The `Some` entries: messages sent and not answered.
    waiting: usize,
}

impl Default for Unanswered {
    fn default() -> Self {
        Self {
            first_seq: 1,
            messages: VecDeque::new(),
            waiting: 0,
        }
    }
}

impl Unanswered {
    /// Message `seq`, the next the outbox gave out, was sent.
    fn sent(&mut self, seq: u64, to: UserId, body: Bytes) {
        debug_assert_eq!(seq, self.first_seq + self.messages.len() as u64);
        self.messages.push_back(Some((to, body)));
        self.waiting += 1;
    }

    /// The recipient and body of `message` the first time it is answered; `None` after. A
    /// message this connection did not send (of another outbox, or a seq the outbox has not
    /// given out) is the server's error.
    fn answer(
        &mut self,
        outbox: &Outbox,
        message: MessageRef,
    ) -> Result<Option<(UserId, Bytes)>, ConnError> {
        if message.outbox != outbox.id() || message.seq == 0 || message.seq >= outbox.next_seq() {
            return Err(ConnError::UnknownMessage {
                outbox: message.outbox,
                seq: message.seq,
            });
        }
        let Some(at) = message.seq.checked_sub(self.first_seq) else {
            return Ok(None);
        };
        let answered = usize::try_from(at)
            .ok()
            .and_then(|at| self.messages.get_mut(at))
            .and_then(Option::take);
        if answered.is_some() {
            self.waiting -= 1;
        }
        while let Some(None) = self.messages.front() {
            self.messages.pop_front();
            self.first_seq += 1;
        }
        Ok(answered)
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
    use hop_protocol::wire::{ErrorCode, Pong, Receipt, ServerAck, UserRef};

    /// The generator's client and hop's own server state machine, in memory.
    struct Pair {
        client: HopClient,
        server: ServerConnection,
        scratch: Vec<u8>,
    }

    /// What the client made of a read: its events, and the stanzas its reply (sealed at the
    /// end of the turn, as the engine does) carried to the server.
    #[derive(Debug)]
    struct Turn {
        events: Vec<Event>,
        replies: Vec<Stanza>,
    }

    impl Pair {
        /// Runs the handshake and the home check; the server has authenticated the client.
        fn open() -> Self {
            let mut pair = Self::authenticated();
            let turn = pair.server_sends(&[home_pong()]).unwrap();
            assert_eq!(turn.events, [Event::Opened]);
            assert!(turn.replies.is_empty());
            assert!(pair.client.is_open());
            pair
        }

        /// Runs the handshake: the client sent message 3 and the home check's Ping with it,
        /// and is not open yet.
        fn authenticated() -> Self {
            let server_key = StaticKey::generate().unwrap();
            let client_key = StaticKey::generate().unwrap();
            let mut to_server = Vec::new();
            let client =
                HopClient::start(client_key, Some(*server_key.public()), &mut to_server).unwrap();
            let mut pair = Self {
                client,
                server: ServerConnection::new(&server_key),
                scratch: frame_scratch(),
            };
            let mut to_client = Vec::new();
            pair.server
                .handle_input::<()>(&to_server, &mut pair.scratch, &mut to_client, &mut |_| {
                    Ok(())
                })
                .unwrap();
            let turn = pair.feed_client(&to_client).unwrap();
            assert!(
                turn.events.is_empty(),
                "not open before it knows it is home"
            );
            assert!(
                matches!(&turn.replies[..], [Stanza { kind: Some(Kind::Ping(ping)) }]
                    if ping.nonce == HOME_PING_NONCE),
                "message 3 and the home check: {:?}",
                turn.replies
            );
            assert!(!pair.client.is_open());
            assert!(pair.server.is_open(), "the server took message 3");
            pair
        }

        /// Feeds `bytes` to the client, then its reply to the server.
        fn feed_client(&mut self, bytes: &[u8]) -> Result<Turn, ConnError> {
            let mut events = Vec::new();
            let mut out = Vec::new();
            self.client
                .handle_input(bytes, &mut self.scratch, &mut out, &mut |e| events.push(e))?;
            self.client.flush(&mut out);
            let replies = self.feed_server(&out);
            Ok(Turn { events, replies })
        }

        /// Feeds `bytes` to the server; returns the stanzas it received.
        fn feed_server(&mut self, bytes: &[u8]) -> Vec<Stanza> {
            let mut stanzas = Vec::new();
            self.server
                .handle_input::<()>(bytes, &mut self.scratch, &mut Vec::new(), &mut |event| {
                    match event {
                        ServerEvent::Authenticated { .. } => {}
                        ServerEvent::Stanza(stanza) => stanzas.push(stanza),
                        ServerEvent::Outdated { .. } => panic!("the bench speaks v2"),
                    }
                    Ok(())
                })
                .unwrap();
            stanzas
        }

        /// Seals `stanzas` from the server in one frame and feeds them to the client.
        fn server_sends(&mut self, stanzas: &[Stanza]) -> Result<Turn, ConnError> {
            let mut to_client = Vec::new();
            let channel = self.server.channel().unwrap();
            for stanza in stanzas {
                channel.queue(stanza, &mut to_client);
            }
            channel.flush(&mut to_client);
            self.feed_client(&to_client)
        }

        /// Sends `bodies` to `to` in one turn; returns what the server received.
        fn send(&mut self, to: UserId, bodies: &[&'static [u8]]) -> Vec<Stanza> {
            let mut out = Vec::new();
            for body in bodies {
                self.client.send(to, Bytes::from_static(body), &mut out);
            }
            self.client.flush(&mut out);
            self.feed_server(&out)
        }
    }

    fn home_pong() -> Stanza {
        Stanza::of(Kind::Pong(Pong {
            nonce: HOME_PING_NONCE,
        }))
    }

    fn server_ack(outbox: u64, seq: u64) -> Stanza {
        Stanza::of(Kind::ServerAck(ServerAck {
            seq,
            id: 1000 + seq,
            timestamp_ms: 1,
            outbox,
            ..ServerAck::default()
        }))
    }

    fn refusal(outbox: u64, seq: u64) -> Stanza {
        Stanza::error(
            ErrorCode::QueueFull,
            "full",
            Some(MessageRef { outbox, seq }),
        )
    }

    #[test]
    fn hop_client_acks_deliveries_and_receipts() {
        let mut pair = Pair::open();
        let from = UserId::from_public_key(&[3; 32]);
        let turn = pair
            .server_sends(&[
                Stanza::deliver(from, 77, 1, Bytes::from_static(b"hello"), 5),
                Stanza::of(Kind::Receipt(Receipt {
                    id: 78,
                    kind: ReceiptKind::Read as i32,
                    by: Some(from.into()),
                    timestamp_ms: 2,
                })),
            ])
            .unwrap();
        assert_eq!(
            turn.events,
            [
                Event::Delivered {
                    body: Bytes::from_static(b"hello")
                },
                Event::Receipt
            ]
        );
        let acks: Vec<(u64, i32)> = turn
            .replies
            .iter()
            .map(|stanza| match &stanza.kind {
                Some(Kind::Ack(ack)) => (ack.id, ack.kind),
                _ => panic!("only acks, not {}", stanza.kind_name()),
            })
            .collect();
        assert_eq!(
            acks,
            [
                (77, ReceiptKind::Unspecified as i32),
                (
                    hop_protocol::wire::receipt_ack_id(78, from),
                    ReceiptKind::Read as i32
                )
            ]
        );
    }

    #[test]
    fn hop_client_creates_a_group_and_acks_its_events() {
        let mut pair = Pair::open();
        let member = UserId::from_public_key(&[4; 32]);
        let mut out = Vec::new();
        pair.client.change_group(
            GroupChange {
                op: hop_protocol::wire::group_change::Op::Create as i32,
                members: vec![member.into()],
                nonce: 9,
                ..GroupChange::default()
            },
            &mut out,
        );
        pair.client.flush(&mut out);
        let received = pair.feed_server(&out);
        assert!(
            matches!(&received[..], [Stanza { kind: Some(Kind::GroupChange(change)) }]
                if change.nonce == 9 && change.members == [member.into()]),
            "{received:?}"
        );
        let group = UserId::from_public_key(&[5; 32]);
        let event = hop_protocol::wire::GroupEvent {
            op: hop_protocol::wire::group_change::Op::Create as i32,
            members: vec![member.into()],
            ..Default::default()
        };
        let turn = pair
            .server_sends(&[
                Stanza::of(Kind::GroupInfo(hop_protocol::wire::GroupInfo {
                    group: Some(group.into()),
                    members: vec![member.into()],
                    ..Default::default()
                })),
                Stanza::deliver_group(member, group, 31, 1, event.to_body(), 7, true),
                Stanza::deliver_group(member, group, 32, 1, Bytes::from_static(b"hi"), 8, false),
            ])
            .unwrap();
        assert_eq!(
            turn.events,
            [
                Event::GroupInfo { group: Some(group) },
                Event::GroupEvent,
                Event::Delivered {
                    body: Bytes::from_static(b"hi")
                }
            ]
        );
        let acked: Vec<u64> = turn
            .replies
            .iter()
            .map(|stanza| match &stanza.kind {
                Some(Kind::Ack(ack)) => ack.id,
                _ => panic!("only acks, not {}", stanza.kind_name()),
            })
            .collect();
        assert_eq!(acked, [31, 32], "the event is acked like a message");
    }

    #[test]
    fn hop_client_declares_its_outbox_and_names_a_peer_once() {
        let mut pair = Pair::open();
        let peer = UserId::from_public_key(&[8; 32]);
        let received = pair.send(peer, &[b"one", b"two"]);
        let Some(Kind::Outbox(outbox)) = &received[0].kind else {
            panic!("the outbox first, not {}", received[0].kind_name());
        };
        assert_ne!(outbox.id, 0);
        let sends: Vec<(Option<UserId>, u64, u32)> = received[1..]
            .iter()
            .map(|stanza| match &stanza.kind {
                Some(Kind::Send(send)) => (UserRef::user(send.to.as_ref()), send.seq, send.alias),
                _ => panic!("a Send, not {}", stanza.kind_name()),
            })
            .collect();
        assert_eq!(sends, [(Some(peer), 1, 1), (None, 2, 1)]);
        // Declared once per connection: the next turn carries the Send alone.
        let received = pair.send(peer, &[b"three"]);
        assert_eq!(received.len(), 1);
        assert!(
            matches!(&received[0].kind, Some(Kind::Send(send)) if send.to.is_none() && send.seq == 3)
        );
    }

    #[test]
    fn hop_client_asks_for_the_second_tick_in_the_server_ack_and_counts_it() {
        for asked in [false, true] {
            let mut pair = Pair::open();
            pair.client.set_delivered_in_ack(asked);
            let peer = UserId::from_public_key(&[8; 32]);
            let received = pair.send(peer, &[b"1", b"2"]);
            let Some(Kind::Outbox(outbox)) = &received[0].kind else {
                panic!("the outbox first");
            };
            assert_eq!(outbox.delivered_in_ack, asked);
            let folded = Stanza::of(Kind::ServerAck(ServerAck {
                seq: 2,
                id: 1002,
                timestamp_ms: 1,
                outbox: outbox.id,
                delivered_ms: 2,
                ..ServerAck::default()
            }));
            let turn = pair
                .server_sends(&[server_ack(outbox.id, 1), folded])
                .unwrap();
            assert_eq!(
                turn.events,
                [Event::SendAcked, Event::SendAcked, Event::Receipt]
            );
            assert!(turn.replies.is_empty(), "a folded tick is not acked");
        }
    }

    #[test]
    fn hop_client_counts_each_answer_once_by_outbox_and_seq() {
        let mut pair = Pair::open();
        let peer = UserId::from_public_key(&[8; 32]);
        let received = pair.send(peer, &[b"1", b"2", b"3", b"4"]);
        let Some(Kind::Outbox(outbox)) = &received[0].kind else {
            panic!("the outbox first");
        };
        let outbox = outbox.id;
        let turn = pair
            .server_sends(&[
                server_ack(outbox, 2),
                server_ack(outbox, 1),
                server_ack(outbox, 2),
                refusal(outbox, 3),
                Stanza::error(ErrorCode::Limit, "not about a Send", None),
                server_ack(outbox, 4),
                server_ack(outbox, 3),
            ])
            .unwrap();
        assert_eq!(
            turn.events,
            [
                Event::SendAcked,
                Event::SendAcked,
                Event::SendAnsweredAgain,
                Event::ServerError {
                    code: ErrorCode::QueueFull as i32,
                    send_refused: true
                },
                Event::ServerError {
                    code: ErrorCode::Limit as i32,
                    send_refused: false
                },
                Event::SendAcked,
                Event::SendAnsweredAgain,
            ]
        );
        // A message this connection never sent: another outbox, or a seq not given out.
        for stanza in [
            server_ack(outbox ^ 1, 1),
            server_ack(outbox, 5),
            refusal(outbox, 9),
        ] {
            let mut pair = Pair::open();
            pair.send(peer, &[b"1", b"2", b"3", b"4"]);
            assert!(matches!(
                pair.server_sends(&[stanza]),
                Err(ConnError::UnknownMessage { .. })
            ));
        }
    }

    #[test]
    fn hop_client_keeps_sends_refused_for_its_rate_to_send_again() {
        let mut pair = Pair::open();
        let peer = UserId::from_public_key(&[8; 32]);
        let received = pair.send(peer, &[b"1", b"2", b"3"]);
        let Some(Kind::Outbox(outbox)) = &received[0].kind else {
            panic!("the outbox first");
        };
        let outbox = outbox.id;
        let limited = |seq, wait_ms: u64| {
            Stanza::error(
                ErrorCode::RateLimited,
                format!(
                    "this device sends more than 100 messages a second; try again in {wait_ms} ms"
                ),
                Some(MessageRef { outbox, seq }),
            )
        };
        let turn = pair
            .server_sends(&[
                server_ack(outbox, 1),
                limited(2, 40),
                limited(3, 90),
                limited(2, 10),
                Stanza::error(ErrorCode::RateLimited, "reads; try again in 5 ms", None),
            ])
            .unwrap();
        assert_eq!(
            turn.events,
            [
                Event::SendAcked,
                Event::ServerError {
                    code: ErrorCode::RateLimited as i32,
                    send_refused: false
                },
                Event::ServerError {
                    code: ErrorCode::RateLimited as i32,
                    send_refused: false
                },
            ],
            "a Send refused for its rate is no event; a second answer or a Read's is"
        );
        let mut held = VecDeque::new();
        assert_eq!(
            pair.client.take_rate_limited(&mut held),
            Some(90),
            "the longest wait named"
        );
        assert_eq!(
            held,
            [
                (peer, Bytes::from_static(b"2")),
                (peer, Bytes::from_static(b"3"))
            ],
            "in the order sent"
        );
        assert_eq!(pair.client.take_rate_limited(&mut held), None);
        // Sent again, they are new messages of the outbox.
        let received = pair.send(peer, &[b"2", b"3"]);
        let seqs: Vec<u64> = received
            .iter()
            .map(|stanza| match &stanza.kind {
                Some(Kind::Send(send)) => send.seq,
                _ => panic!("a Send, not {}", stanza.kind_name()),
            })
            .collect();
        assert_eq!(seqs, [4, 5]);
        let turn = pair
            .server_sends(&[server_ack(outbox, 4), server_ack(outbox, 5)])
            .unwrap();
        assert_eq!(turn.events, [Event::SendAcked, Event::SendAcked]);
    }

    #[test]
    fn the_wait_of_a_rate_limited_send_is_read_from_its_reason() {
        assert_eq!(
            named_wait_ms("this device sends more than 100 messages a second; try again in 250 ms"),
            Some(250)
        );
        assert_eq!(named_wait_ms("slow down"), None);
        assert_eq!(named_wait_ms("try again in soon ms"), None);
    }

    #[test]
    fn a_refusal_at_admission_is_told_apart_from_a_broken_handshake() {
        use hop_protocol::noise::RefusalReason;
        let refusal = Refusal {
            reason: RefusalReason::Busy,
            retry_after_ms: 100,
        };
        let mut frame = Vec::new();
        refusal.encode(&mut frame);
        let mut out = Vec::new();
        let mut client = HopClient::start(StaticKey::generate().unwrap(), None, &mut out).unwrap();
        let error = client
            .handle_input(&frame, &mut frame_scratch(), &mut out, &mut |_| {})
            .unwrap_err();
        assert_eq!(error.refusal(), Some(refusal));
        let broken = ConnError::Hop(PeerError::Noise(NoiseError::OutOfOrder));
        assert_eq!(broken.refusal(), None);
    }

    #[test]
    fn hop_client_refuses_an_unpinned_server() {
        let server_key = StaticKey::generate().unwrap();
        let mut to_server = Vec::new();
        let mut client = HopClient::start(
            StaticKey::generate().unwrap(),
            Some([7; 32]),
            &mut to_server,
        )
        .unwrap();
        let mut server = ServerConnection::new(&server_key);
        let mut scratch = frame_scratch();
        let mut to_client = Vec::new();
        server
            .handle_input::<()>(&to_server, &mut scratch, &mut to_client, &mut |_| Ok(()))
            .unwrap();
        let mut events = Vec::new();
        let mut out = Vec::new();
        let result =
            client.handle_input(&to_client, &mut scratch, &mut out, &mut |e| events.push(e));
        assert!(matches!(result, Err(ConnError::ServerKeyMismatch { .. })));
        assert!(
            events.is_empty() && out.is_empty(),
            "no message 3, not opened"
        );
        assert!(!client.is_open());
    }

    #[test]
    fn hop_client_opens_on_the_home_pong_only() {
        let mut pair = Pair::authenticated();
        let peer = UserId::from_public_key(&[8; 32]);
        assert!(
            pair.send(peer, &[b"early"]).is_empty(),
            "no send before home"
        );
        let turn = pair
            .server_sends(&[
                Stanza::of(Kind::Pong(Pong { nonce: 0 })),
                Stanza::go_away(GoAwayReason::Shutdown, "not a redirect"),
            ])
            .unwrap();
        assert_eq!(
            turn.events,
            [Event::GoAway {
                reason: GoAwayReason::Shutdown as i32
            }],
            "a heartbeat's Pong does not open it"
        );
        assert!(!pair.client.is_open());
        let turn = pair.server_sends(&[home_pong()]).unwrap();
        assert_eq!(turn.events, [Event::Opened]);
        assert!(!pair.send(peer, &[b"now"]).is_empty());
    }

    #[test]
    fn hop_client_keeps_a_redirect_before_it_is_home() {
        let mut pair = Pair::authenticated();
        let home_key = [6; KEY_BYTES];
        let turn = pair
            .server_sends(&[
                Stanza::go_away_redirect("127.0.0.3:7788", &home_key),
                home_pong(),
            ])
            .unwrap();
        assert!(turn.events.is_empty(), "a redirect is no event: {turn:?}");
        assert!(pair.client.is_redirected());
        assert!(!pair.client.is_open(), "nothing after the redirect counts");
        let (key, redirect) = pair.client.into_redirect();
        assert_ne!(key.public(), &home_key);
        assert_eq!(
            redirect,
            Some(Redirect {
                address: "127.0.0.3:7788".into(),
                server_key: home_key,
            })
        );
    }

    #[test]
    fn hop_client_keeps_a_redirect_after_it_is_home() {
        let mut pair = Pair::open();
        let turn = pair
            .server_sends(&[Stanza::go_away_redirect("node-b:7788", &[9; KEY_BYTES])])
            .unwrap();
        assert!(turn.events.is_empty());
        assert!(pair.client.is_redirected() && !pair.client.is_open());
        let peer = UserId::from_public_key(&[8; 32]);
        assert!(
            pair.send(peer, &[b"gone"]).is_empty(),
            "no send once sent away"
        );
    }

    #[test]
    fn bad_redirects_are_errors_that_name_the_fault() {
        let mut short_key = Stanza::go_away_redirect("127.0.0.3:7788", &[6; KEY_BYTES]);
        if let Some(Kind::GoAway(go_away)) = &mut short_key.kind {
            go_away.redirect_key = Bytes::from_static(&[6; 31]);
        }
        let error = Pair::authenticated()
            .server_sends(&[short_key])
            .unwrap_err();
        assert!(matches!(error, ConnError::BadRedirect(_)), "{error}");
        assert!(
            error.to_string().contains("its key has 31 bytes, not 32"),
            "{error}"
        );
        let error = Pair::open()
            .server_sends(&[Stanza::go_away_redirect("", &[6; KEY_BYTES])])
            .unwrap_err();
        assert!(error.to_string().contains("names no address"), "{error}");
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
