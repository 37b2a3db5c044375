//! A blocking client: one TCP connection, one Noise session, stanzas in and out.
//!
//! Used by the `hop` CLI, the end-to-end tests and the benchmarks. It pins the server's key:
//! either a key given by the caller or the one recorded in a known-servers file on first use.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::frame::{Deframer, FrameError, FRAME_BODY_BYTES_MAX};
use crate::keys::{parse_hex_key, StaticKey, KEY_BYTES};
use crate::noise::{ClientHandshake, NoiseError, HANDSHAKE_FRAME_LIMITS};
use crate::session::{Channel, InputError, PeerError};
use crate::user::UserId;
use crate::wire::{Ack, Kind, Ping, Read as ReadStanza, ReceiptKind, Stanza, Subscribe};

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
    #[error("handshake with the server failed: {0}")]
    Handshake(PeerError),
    #[error("the server broke the protocol: {0}")]
    Peer(PeerError),
    #[error("the server closed the connection")]
    Closed,
    #[error("timed out")]
    Timeout,
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
    channel: Channel,
    user: UserId,
    server_key: [u8; KEY_BYTES],
    inbox: VecDeque<Stanza>,
    out: Vec<u8>,
    read_buffer: Vec<u8>,
    scratch: Vec<u8>,
    next_seq: u32,
    last_sent: Instant,
    keepalive: Duration,
}

/// Pings are sent when nothing else was sent for this long, well inside the server's default
/// idle timeout.
pub const KEEPALIVE_DEFAULT: Duration = Duration::from_secs(60);
const READ_BUFFER_BYTES: usize = 64 * 1024;

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
        let mut out = Vec::new();
        let mut handshake = ClientHandshake::start(key, &mut out);
        stream.write_all(&out)?;
        out.clear();

        let mut deframer = Deframer::new();
        let mut read_buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut reply: Option<Vec<u8>> = None;
        while reply.is_none() {
            let bytes = read_before(&mut stream, &mut read_buffer, deadline)?;
            deframer.handle_input::<ClientError>(
                &read_buffer[..bytes],
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
        }
        let server_key = handshake.handle_response(&reply.unwrap_or_default())?;
        check_trust(addr, &server_key, trust)?;
        let transport = handshake.finish(&mut out)?;
        stream.write_all(&out)?;
        out.clear();
        Ok(Self {
            stream,
            channel: Channel::new(transport, deframer),
            user: key.user_id(),
            server_key,
            inbox: VecDeque::new(),
            out,
            read_buffer,
            scratch: vec![0u8; FRAME_BODY_BYTES_MAX],
            next_seq: 1,
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

    /// Sends a message to `to`; returns the sequence number the ServerAck or Error will carry.
    pub fn send_message(&mut self, to: UserId, body: &[u8]) -> Result<u32, ClientError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        self.send(&Stanza::send(to, seq, Bytes::copy_from_slice(body)))?;
        Ok(seq)
    }

    /// Tells the server the device received item `id` (a Deliver, or a Receipt of `kind`).
    pub fn ack(&mut self, id: u64, kind: ReceiptKind) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Ack(Ack {
            id,
            kind: kind as i32,
        })))
    }

    /// Tells the server the user read message `id` from `from`.
    pub fn read(&mut self, from: UserId, id: u64) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Read(ReadStanza {
            from: from.get(),
            id,
        })))
    }

    pub fn subscribe(&mut self, user: UserId) -> Result<(), ClientError> {
        self.send(&Stanza::of(Kind::Subscribe(Subscribe { user: user.get() })))
    }

    /// Sends one stanza in its own frame.
    pub fn send(&mut self, stanza: &Stanza) -> Result<(), ClientError> {
        self.queue(stanza);
        self.flush()
    }

    /// Queues a stanza; [`Client::flush`] seals everything queued into frames and writes it.
    pub fn queue(&mut self, stanza: &Stanza) {
        self.channel.queue(stanza, &mut self.out);
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.channel.flush(&mut self.out);
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
        self.channel.seal_raw(plaintext, &mut self.out);
        self.flush()
    }

    /// The next stanza from the server, waiting at most `timeout`; `None` on timeout.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Stanza>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(stanza) = self.inbox.pop_front() {
                return Ok(Some(stanza));
            }
            if self.last_sent.elapsed() >= self.keepalive {
                self.send(&Stanza::of(Kind::Ping(Ping { nonce: 0 })))?;
            }
            let wait_until = deadline.min(self.last_sent + self.keepalive);
            let bytes = match read_before(&mut self.stream, &mut self.read_buffer, wait_until) {
                Ok(bytes) => bytes,
                Err(ClientError::Timeout) if Instant::now() < deadline => continue,
                Err(ClientError::Timeout) => return Ok(None),
                Err(error) => return Err(error),
            };
            let inbox = &mut self.inbox;
            self.channel
                .handle_input::<()>(
                    &self.read_buffer[..bytes],
                    &mut self.scratch,
                    &mut |stanza| {
                        inbox.push_back(stanza);
                        Ok(())
                    },
                )
                .map_err(|error| match error {
                    InputError::Peer(peer) => ClientError::Peer(peer),
                    InputError::Handler(()) => ClientError::Closed,
                })?;
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
    let now = Instant::now();
    if now >= deadline {
        return Err(ClientError::Timeout);
    }
    stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
    match stream.read(buffer) {
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
}
