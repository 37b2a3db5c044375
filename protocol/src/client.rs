//! A blocking client: one TCP connection, one Noise session, stanzas in and out.
//!
//! Used by the `hop` CLI and the end-to-end tests. The handshake and the session are
//! [`crate::session::ClientConnection`]'s (which hop-bench and the fuzz targets drive too); this
//! module adds the socket, the trust decision and the v2 client's bookkeeping (its outbox,
//! dropping a message delivered twice). It pins the server's key: either a key given by the
//! caller or the one recorded in a known-servers file on first use.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::frame::{FrameError, FRAME_BODY_BYTES_MAX};
use crate::keys::{parse_hex_key, StaticKey, KEY_BYTES};
use crate::noise::{NoiseError, Refusal};
use crate::outbox::{Outbox, Seen};
use crate::session::{Channel, ClientConnection, ClientEvent, ClientInputError, PeerError};
use crate::user::UserId;
use crate::wire::{
    Ack, GoAwayReason, Kind, MessageRef, Ping, PresenceSettings, Read as ReadStanza, Receipt,
    ReceiptKind, Register, Stanza, Subscribe, UserRef, Visibility,
};

/// How the client decides to trust the server's static key.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Only this key is accepted.
    Pinned([u8; KEY_BYTES]),
    /// The key recorded for this server address in the file; the first key seen for a new
    /// address is recorded (trust on first use).
    KnownServers(PathBuf),
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot resolve server address {addr:?}")]
    Resolve { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error(
        "SERVER KEY MISMATCH for {addr}: expected {expected}, the server presented {presented}. \
         The server's key changed or someone is intercepting the connection. If the change is \
         expected, remove the line for {addr} from {file}"
    )]
    ServerKeyMismatch {
        addr: String,
        expected: String,
        presented: String,
        file: String,
    },
    #[error("known-servers file {path}: {reason}")]
    KnownServers { path: String, reason: String },
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("no randomness available for an outbox id")]
    Random,
    #[error(
        "handshake with the server failed: {0} (a server of another hop protocol version \
         fails the handshake like this)"
    )]
    Handshake(PeerError),
    #[error("the server broke the protocol: {0}")]
    Peer(PeerError),
    #[error("{0}")]
    Refused(Refusal),
    #[error("the server closed the connection")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("the server sent a redirect this client cannot follow: {0}")]
    BadRedirect(String),
    #[error(
        "redirected more than {max} times (last to {last}): the cluster's nodes disagree about \
         its members; try again"
    )]
    Redirects { last: String, max: usize },
}

impl From<FrameError> for ClientError {
    fn from(error: FrameError) -> Self {
        Self::Handshake(error.into())
    }
}

impl From<NoiseError> for ClientError {
    fn from(error: NoiseError) -> Self {
        Self::Handshake(error.into())
    }
}

/// A connected, authenticated client.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    /// Open from `connect` on: a `Client` exists only once the handshake finished.
    connection: ClientConnection,
    user: UserId,
    server_key: [u8; KEY_BYTES],
    inbox: VecDeque<Stanza>,
    out: Vec<u8>,
    read_buffer: Vec<u8>,
    scratch: Vec<u8>,
    outbox: Outbox,
    /// Messages received, to drop a copy delivered again.
    seen: Seen,
    duplicates_dropped: u64,
    last_sent: Instant,
    keepalive: Duration,
}

/// Pings are sent when nothing else was sent for this long, well inside the server's default
/// idle timeout.
pub const KEEPALIVE_DEFAULT: Duration = Duration::from_secs(60);
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Redirects [`Client::connect_home`] follows before it gives up. A cluster redirects once, to
/// the user's home; more means its nodes disagree about the members while the list changes.
pub const REDIRECTS_MAX: usize = 3;
/// The nonce of `connect_home`'s Ping, to tell its Pong from a keepalive's.
const HOME_PING_NONCE: u64 = 0x686f_7020_686f_6d65;

impl Client {
    /// Connects, runs the handshake and checks the server's key.
    pub fn connect(
        addr: &str,
        key: &StaticKey,
        trust: &ServerTrust,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        let socket_addr = resolve(addr)?;
        let mut stream = TcpStream::connect_timeout(&socket_addr, timeout).map_err(|source| {
            ClientError::Connect {
                addr: addr.to_string(),
                source,
            }
        })?;
        stream.set_nodelay(true)?;
        // The server's key is checked by `check_trust` (a pin or the known-servers file) when
        // message 2 proves it, before message 3 goes out.
        let mut out = Vec::new();
        let mut connection = ClientConnection::start(key, None, &mut out);
        stream.write_all(&out)?;
        out.clear();
        let mut read_buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        let mut inbox = VecDeque::new();
        let mut server_key = None;
        while !connection.is_open() {
            let bytes = read_before(&mut stream, &mut read_buffer, deadline)?;
            connection
                .handle_input(
                    &read_buffer[..bytes],
                    &mut scratch,
                    &mut out,
                    &mut |event| match event {
                        ClientEvent::Authenticated { server_key: key } => {
                            check_trust(addr, &key, trust)?;
                            server_key = Some(key);
                            Ok(())
                        }
                        ClientEvent::Stanza(stanza) => {
                            inbox.push_back(stanza);
                            Ok(())
                        }
                    },
                )
                .map_err(|error| ClientError::from_input(error, true))?;
        }
        let server_key = server_key.ok_or(ClientError::Handshake(NoiseError::OutOfOrder.into()))?;
        stream.write_all(&out)?;
        out.clear();
        let outbox = Outbox::random().map_err(|_| ClientError::Random)?;
        Ok(Self {
            stream,
            connection,
            user: key.user_id(),
            server_key,
            inbox,
            out,
            read_buffer,
            scratch,
            outbox,
            seen: Seen::default(),
            duplicates_dropped: 0,
            last_sent: Instant::now(),
            keepalive: KEEPALIVE_DEFAULT,
        })
    }

    pub fn user_id(&self) -> UserId {
        self.user
    }

    pub fn server_key(&self) -> &[u8; KEY_BYTES] {
        &self.server_key
    }

    /// Sends a message to `to` from this connection's outbox; returns its client id, which
    /// the ServerAck or Error will carry.
    pub fn send_message(&mut self, to: UserId, body: &[u8]) -> Result<MessageRef, ClientError> {
        let message = self.queue_message(to, body);
        self.flush()?;
        Ok(message)
    }

    /// Queues a message to `to` like [`Client::send_message`] without writing it: many queued
    /// messages leave in one write at the next [`Client::flush`].
    pub fn queue_message(&mut self, to: UserId, body: &[u8]) -> MessageRef {
        let mut stanzas = Vec::with_capacity(2);
        let message = self
            .outbox
            .send(to, Bytes::copy_from_slice(body), &mut stanzas);
        for stanza in &stanzas {
            self.queue(stanza);
        }
        message
    }

    /// Sends message `seq` of this connection's outbox again: the server answers with the
    /// original's ServerAck and delivers it once.
    pub fn resend_message(
        &mut self,
        to: UserId,
        seq: u64,
        body: &[u8],
    ) -> Result<MessageRef, ClientError> {
        let mut stanzas = Vec::with_capacity(2);
        let message = self
            .outbox
            .resend(to, seq, Bytes::copy_from_slice(body), &mut stanzas);
        self.send_all(&stanzas)?;
        Ok(message)
    }

    /// The outbox this connection sends from.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Sends from `outbox` from now on (one kept from an earlier connection, for a resend).
    pub fn set_outbox(&mut self, mut outbox: Outbox) {
        outbox.reconnected();
        self.outbox = outbox;
    }

    /// Asks for the second tick of a message its recipient acks before the server's ack
    /// leaves to come in that ServerAck (`ServerAck.delivered_ms`) instead of a DELIVERED
    /// Receipt: declared with this connection's outbox, before its first Send.
    pub fn set_delivered_in_ack(&mut self, on: bool) {
        self.outbox.set_delivered_in_ack(on);
    }

    /// The outbox, to carry to the next connection.
    pub fn into_outbox(self) -> Outbox {
        self.outbox
    }

    /// Deliveries dropped as copies of messages already received on this client.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates_dropped
    }

    /// Tells the server the device received the Deliver `id`.
    pub fn ack_deliver(&mut self, id: u64) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Ack(Ack {
            id,
            kind: ReceiptKind::Unspecified as i32,
        })))
    }

    /// Tells the server the device received `receipt` (acked by its ack id, which tells the
    /// receipts of one message from several devices or members apart).
    pub fn ack_receipt(&mut self, receipt: &Receipt) -> Result<(), ClientError> {
        let Some(id) = receipt.ack_id() else {
            return Ok(()); // not a receipt the server makes: nothing to ack
        };
        self.send(&Stanza::of(Kind::Ack(Ack {
            id,
            kind: receipt.kind,
        })))
    }

    /// Tells the server the user read message `id` from `from`; `proof` is the Deliver's.
    pub fn read(&mut self, from: UserId, id: u64, proof: u64) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Read(ReadStanza {
            from: Some(from.into()),
            id,
            proof,
        })))
    }

    /// Sets who may see this user's presence (kept by the server across restarts).
    pub fn set_presence_privacy(
        &mut self,
        visibility: Visibility,
        contacts: &[UserId],
    ) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::PresenceSettings(PresenceSettings {
            visibility: visibility as i32,
            contacts: contacts.iter().map(|user| UserRef::from(*user)).collect(),
        })))
    }

    pub fn subscribe(&mut self, user: UserId) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Subscribe(Subscribe {
            user: Some(user.into()),
        })))
    }

    /// Sends one stanza in its own frame.
    pub fn send(&mut self, stanza: &Stanza) -> Result<(), ClientError> {
        self.queue(stanza);
        self.flush()
    }

    /// Sends stanzas in one frame.
    pub fn send_all(&mut self, stanzas: &[Stanza]) -> Result<(), ClientError> {
        for stanza in stanzas {
            self.queue(stanza);
        }
        self.flush()
    }

    /// Queues a stanza; [`Client::flush`] seals everything queued into frames and writes it.
    pub fn queue(&mut self, stanza: &Stanza) {
        let out = &mut self.out;
        channel(&mut self.connection).queue(stanza, out);
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        channel(&mut self.connection).flush(&mut self.out);
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.out.clear();
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Writes raw bytes to the socket, bypassing the session. For tests of the server's
    /// handling of bad input.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(ClientError::from)
    }

    /// Seals arbitrary plaintext as one frame and writes it. For tests of the server's
    /// handling of undecodable stanzas.
    pub fn send_raw_plaintext(&mut self, plaintext: &[u8]) -> Result<(), ClientError> {
        channel(&mut self.connection).seal_raw(plaintext, &mut self.out);
        self.flush()
    }

    /// The next stanza from the server, waiting at most `timeout`; `None` on timeout. A
    /// Deliver of a message this client already received is acked and not returned. A
    /// Deliver's body is the caller's own copy, which it may keep as long as it likes (in the
    /// frame it came in, it shared one buffer with the frame's other bodies).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Stanza>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(mut stanza) = self.inbox.pop_front() {
                if let Some(Kind::Deliver(deliver)) = &mut stanza.kind {
                    if let Some(from) = UserRef::user(deliver.from.as_ref()) {
                        if !self.seen.first_time(from, deliver.id) {
                            self.duplicates_dropped += 1;
                            self.ack_deliver(deliver.id)?;
                            continue;
                        }
                    }
                    deliver.body = Bytes::copy_from_slice(&deliver.body);
                }
                return Ok(Some(stanza));
            }
            if self.last_sent.elapsed() >= self.keepalive {
                self.send(&Stanza::of(Kind::Ping(Ping { nonce: 0 })))?;
            }
            let wait_until = deadline.min(self.last_sent + self.keepalive);
            match self.read_into_inbox(wait_until) {
                Ok(()) => {}
                Err(ClientError::Timeout) if Instant::now() < deadline => continue,
                Err(ClientError::Timeout) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }

    /// One read from the socket, before `deadline`; the stanzas it completes go to the inbox.
    fn read_into_inbox(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let bytes = read_before(&mut self.stream, &mut self.read_buffer, deadline)?;
        let inbox = &mut self.inbox;
        self.connection
            .handle_input::<ClientError>(
                &self.read_buffer[..bytes],
                &mut self.scratch,
                &mut self.out,
                &mut |event| {
                    if let ClientEvent::Stanza(stanza) = event {
                        inbox.push_back(stanza);
                    }
                    Ok(())
                },
            )
            .map_err(|error| ClientError::from_input(error, false))
    }

    /// Connects like [`Client::connect`], then makes sure the server is this user's home. A
    /// node of a cluster that is not answers the first Ping with a GoAway REDIRECT naming the
    /// home node and its key; this follows it, pinning that key (it comes from a server already
    /// trusted, over an authenticated session), at most [`REDIRECTS_MAX`] times. A single hopd
    /// answers with a Pong: one round trip more than `connect`. Stanzas that arrive before the
    /// Pong, and a GoAway of another reason, stay in the inbox for `recv`.
    pub fn connect_home(
        addr: &str,
        key: &StaticKey,
        trust: &ServerTrust,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_home_registering(addr, key, trust, timeout, None)
    }

    /// [`Client::connect_home`], sending `token` (an operator's one-time registration token)
    /// first on each connection: on a server whose `registration` is `token`, it makes this
    /// key's account; where the account exists, it is ignored. Both wait out a server's
    /// refusals within `timeout` (see `connect_admitted`).
    pub fn connect_home_registering(
        addr: &str,
        key: &StaticKey,
        trust: &ServerTrust,
        timeout: Duration,
        token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut addr = addr.to_string();
        let mut trust = trust.clone();
        for _ in 0..=REDIRECTS_MAX {
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or(ClientError::Timeout)?;
            let mut client = Self::connect_admitted(&addr, key, &trust, left)?;
            if let Some(token) = token {
                client.send(&Stanza::of(Kind::Register(Register {
                    token: token.to_string(),
                })))?;
            }
            client.send(&Stanza::of(Kind::Ping(Ping {
                nonce: HOME_PING_NONCE,
            })))?;
            match client.wait_for_home(deadline)? {
                None => return Ok(client),
                Some((home, home_key)) => {
                    addr = home;
                    trust = ServerTrust::Pinned(home_key);
                }
            }
        }
        Err(ClientError::Redirects {
            last: addr,
            max: REDIRECTS_MAX,
        })
    }

    /// [`Client::connect`], waiting out a server's refusals (admission, `docs/security.md`):
    /// each is waited for its `retry_after_ms` plus up to a quarter more, at random, so that
    /// refused clients do not come back together, and tried again; a refusal whose wait would
    /// pass `timeout` is returned.
    fn connect_admitted(
        addr: &str,
        key: &StaticKey,
        trust: &ServerTrust,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match Self::connect(addr, key, trust, left) {
                Err(ClientError::Refused(refusal)) => {
                    let wait = refusal.wait();
                    if Instant::now() + wait >= deadline {
                        return Err(ClientError::Refused(refusal));
                    }
                    std::thread::sleep(wait);
                }
                other => return other,
            }
        }
    }

    /// After `connect_home`'s Ping: `None` when this server keeps the connection (the Pong, or
    /// a GoAway that is not a redirect, arrived), or where it redirects to.
    fn wait_for_home(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(String, [u8; KEY_BYTES])>, ClientError> {
        let mut scanned = 0;
        loop {
            while scanned < self.inbox.len() {
                match &self.inbox[scanned].kind {
                    Some(Kind::Pong(pong)) if pong.nonce == HOME_PING_NONCE => {
                        self.inbox.remove(scanned);
                        return Ok(None);
                    }
                    Some(Kind::GoAway(go_away))
                        if go_away.reason == GoAwayReason::Redirect as i32 =>
                    {
                        let home_key = <[u8; KEY_BYTES]>::try_from(&go_away.redirect_key[..])
                            .map_err(|_| {
                                ClientError::BadRedirect(format!(
                                    "its key has {} bytes, not {KEY_BYTES}",
                                    go_away.redirect_key.len()
                                ))
                            })?;
                        if go_away.redirect_address.is_empty() {
                            return Err(ClientError::BadRedirect("it names no address".into()));
                        }
                        return Ok(Some((go_away.redirect_address.clone(), home_key)));
                    }
                    Some(Kind::GoAway(_)) => return Ok(None),
                    _ => scanned += 1,
                }
            }
            self.read_into_inbox(deadline)?;
        }
    }

    /// Closes gracefully: stops sending, waits briefly for the server to close, so that
    /// everything written reaches the server before the socket goes.
    pub fn close(mut self) {
        let _ = self.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(bytes) = read_before(&mut self.stream, &mut self.read_buffer, deadline) {
            if bytes == 0 {
                break;
            }
        }
    }
}

/// The open channel of a client's connection.
fn channel(connection: &mut ClientConnection) -> &mut Channel {
    connection
        .channel()
        .expect("a Client exists only once its connection is open, and it stays open")
}

impl ClientError {
    /// The error of a failed `handle_input`, during the handshake or after it.
    fn from_input(error: ClientInputError<ClientError>, handshaking: bool) -> Self {
        match error {
            ClientInputError::Peer(PeerError::Noise(NoiseError::Refused(refusal))) => {
                Self::Refused(refusal)
            }
            ClientInputError::Peer(peer) if handshaking => Self::Handshake(peer),
            ClientInputError::Peer(peer) => Self::Peer(peer),
            ClientInputError::Handler(error) => error,
            ClientInputError::ServerKeyMismatch { .. } => {
                unreachable!("a Client pins no key in its connection: check_trust decides")
            }
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ClientError::Resolve {
            addr: addr.to_string(),
        })
}

/// Reads once, waiting at most until `deadline`. Returns 0 only at end of stream... except
/// that end of stream is reported as `Closed`.
fn read_before(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    deadline: Instant,
) -> Result<usize, ClientError> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Timeout);
        }
        stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
        match stream.read(buffer) {
            // A signal came (the application's, or a stop and continue of the process): the
            // connection is as it was.
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => return read_result(result),
        }
    }
}

/// [`read_before`]'s answer for what one read returned.
fn read_result(result: io::Result<usize>) -> Result<usize, ClientError> {
    match result {
        Ok(0) => Err(ClientError::Closed),
        Ok(bytes) => Ok(bytes),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(ClientError::Timeout)
        }
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => Err(ClientError::Closed),
        Err(error) => Err(error.into()),
    }
}

fn check_trust(
    addr: &str,
    presented: &[u8; KEY_BYTES],
    trust: &ServerTrust,
) -> Result<(), ClientError> {
    match trust {
        ServerTrust::Pinned(expected) if expected == presented => Ok(()),
        ServerTrust::Pinned(expected) => Err(ClientError::ServerKeyMismatch {
            addr: addr.to_string(),
            expected: hex::encode(expected),
            presented: hex::encode(presented),
            file: "the --server-key argument".to_string(),
        }),
        ServerTrust::KnownServers(path) => check_known_servers(path, addr, presented),
    }
}

/// A known-servers file has one line per server: the address as the user wrote it, a space,
/// and the server's public key in hex. Lines starting with `#` are comments.
fn check_known_servers(
    path: &Path,
    addr: &str,
    presented: &[u8; KEY_BYTES],
) -> Result<(), ClientError> {
    let shown = path.display().to_string();
    let error = |reason: String| ClientError::KnownServers {
        path: shown.clone(),
        reason,
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(error(e.to_string())),
    };
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(known_addr), Some(known_key), None) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(error(format!("line {} is not `ADDRESS KEY`", number + 1)));
        };
        if known_addr != addr {
            continue;
        }
        let expected = parse_hex_key(known_key)
            .ok_or_else(|| error(format!("line {} has a malformed key", number + 1)))?;
        if &expected == presented {
            return Ok(());
        }
        return Err(ClientError::ServerKeyMismatch {
            addr: addr.to_string(),
            expected: known_key.to_string(),
            presented: hex::encode(presented),
            file: shown,
        });
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| error(e.to_string()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| error(e.to_string()))?;
    writeln!(file, "{addr} {}", hex::encode(presented)).map_err(|e| error(e.to_string()))?;
    eprintln!(
        "hop: trusting server key {} for {addr} on first use (recorded in {shown})",
        hex::encode(presented)
    );
    Ok(())
}

/// Decodes a body as text for display; bodies are opaque bytes to the server.
pub fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_servers_records_then_pins() {
        let dir = std::env::temp_dir().join(format!("hop-known-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("known_servers");
        let first = [1u8; 32];
        check_known_servers(&path, "127.0.0.1:1", &first).unwrap();
        check_known_servers(&path, "127.0.0.1:1", &first).unwrap();
        let mismatch = check_known_servers(&path, "127.0.0.1:1", &[2u8; 32]).unwrap_err();
        assert!(
            mismatch.to_string().contains("SERVER KEY MISMATCH"),
            "{mismatch}"
        );
        // Another address is another server.
        check_known_servers(&path, "127.0.0.1:2", &[2u8; 32]).unwrap();
        fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            check_known_servers(&path, "127.0.0.1:1", &first),
            Err(ClientError::KnownServers { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pinned_key_mismatch_is_refused() {
        assert!(check_trust("a", &[1; 32], &ServerTrust::Pinned([1; 32])).is_ok());
        assert!(matches!(
            check_trust("a", &[1; 32], &ServerTrust::Pinned([2; 32])),
            Err(ClientError::ServerKeyMismatch { .. })
        ));
    }

    /// A one-connection server on loopback, driven by `ServerConnection`: once the client is
    /// authenticated it delivers one message twice, then answers every Send with a ServerAck.
    /// Returns the kinds of the stanzas it received, and whether the client authenticated.
    fn serve_once(
        listener: std::net::TcpListener,
        server_key: StaticKey,
    ) -> std::thread::JoinHandle<(Vec<String>, bool)> {
        use crate::session::{ServerConnection, ServerEvent};
        use crate::wire::ServerAck;
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut server = ServerConnection::new(&server_key);
            let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
            let mut buffer = vec![0u8; 4096];
            let mut kinds = Vec::new();
            let mut authenticated = false;
            let mut outbox = 0;
            loop {
                let bytes = match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => return (kinds, authenticated),
                    Ok(bytes) => bytes,
                };
                let mut out = Vec::new();
                let mut replies = Vec::new();
                let result = server.handle_input::<()>(
                    &buffer[..bytes],
                    &mut scratch,
                    &mut out,
                    &mut |event| {
                        match event {
                            ServerEvent::Authenticated { .. } => {
                                authenticated = true;
                                let from = UserId::from_public_key(&[4; 32]);
                                let deliver =
                                    Stanza::deliver(from, 9, 1, Bytes::from_static(b"once"), 3);
                                replies.push(deliver.clone());
                                replies.push(deliver);
                            }
                            ServerEvent::Stanza(stanza) => {
                                kinds.push(stanza.kind_name().to_string());
                                match &stanza.kind {
                                    Some(Kind::Outbox(declared)) => outbox = declared.id,
                                    Some(Kind::Send(send)) => {
                                        replies.push(Stanza::of(Kind::ServerAck(ServerAck {
                                            seq: send.seq,
                                            id: 100 + send.seq,
                                            timestamp_ms: 1,
                                            outbox,
                                            ..ServerAck::default()
                                        })))
                                    }
                                    _ => {}
                                }
                            }
                            ServerEvent::Outdated { .. } => panic!("a v2 client"),
                        }
                        Ok(())
                    },
                );
                if result.is_err() {
                    return (kinds, authenticated);
                }
                for reply in &replies {
                    if let Some(channel) = server.channel() {
                        channel.send_now(reply, &mut out);
                    }
                }
                if stream.write_all(&out).is_err() {
                    return (kinds, authenticated);
                }
            }
        })
    }

    #[test]
    fn client_pins_the_server_and_drops_a_second_copy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_key = StaticKey::generate().unwrap();
        let trust = ServerTrust::Pinned(*server_key.public());
        let server = serve_once(listener, server_key.clone());
        let key = StaticKey::generate().unwrap();
        let mut client = Client::connect(&addr, &key, &trust, Duration::from_secs(10)).unwrap();
        assert_eq!(client.server_key(), server_key.public());
        assert_eq!(client.user_id(), key.user_id());
        let first = client.recv(Duration::from_secs(10)).unwrap().unwrap();
        let Some(Kind::Deliver(deliver)) = first.kind else {
            panic!("a Deliver first, not {}", first.kind_name());
        };
        client.ack_deliver(deliver.id).unwrap();
        // The copy is acked and dropped, not returned.
        let to = UserId::from_public_key(&[4; 32]);
        let message = client.send_message(to, b"reply").unwrap();
        assert_eq!((message.outbox, message.seq), (client.outbox().id(), 1));
        let next = client.recv(Duration::from_secs(10)).unwrap().unwrap();
        let Some(Kind::ServerAck(ack)) = next.kind else {
            panic!("a ServerAck, not {}", next.kind_name());
        };
        assert_eq!((ack.outbox, ack.seq), (message.outbox, message.seq));
        assert_eq!(client.duplicates_dropped(), 1);
        client.close();
        let (kinds, authenticated) = server.join().unwrap();
        assert!(authenticated);
        assert_eq!(kinds, ["Ack", "Outbox", "Send", "Ack"]);
    }

    #[test]
    fn client_refuses_a_server_that_is_not_pinned_before_message_3() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = serve_once(listener, StaticKey::generate().unwrap());
        let key = StaticKey::generate().unwrap();
        let result = Client::connect(
            &addr,
            &key,
            &ServerTrust::Pinned([7; 32]),
            Duration::from_secs(10),
        );
        assert!(
            matches!(result, Err(ClientError::ServerKeyMismatch { .. })),
            "{result:?}"
        );
        let (kinds, authenticated) = server.join().unwrap();
        assert!(!authenticated, "no message 3 reached the server");
        assert!(kinds.is_empty());
    }
}
