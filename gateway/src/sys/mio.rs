//! The portable backend: `mio` (epoll on Linux, kqueue on FreeBSD and macOS).
//!
//! Readiness is edge-triggered, so a connection that became readable is read until the socket
//! is drained or its per-turn budget is spent; in the second case it stays on the ready list
//! and the next poll does not wait. All connections read into one shared buffer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tracing::{debug, warn};

use super::{Backend, BackendLimits, ConnId, Event, Exported, Reading, SendOverflow, Wake};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Bytes one read takes at most; one buffer per shard.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Reads per connection per turn, so one busy connection cannot starve the others.
const READS_PER_CONNECTION_PER_TURN: usize = 4;
/// Connections accepted per turn.
const ACCEPTS_PER_TURN: usize = 256;
/// Readiness events taken per poll.
const EVENTS_PER_POLL: usize = 1024;

/// A connection on its way to another shard.
#[derive(Debug)]
pub struct MioHandoff {
    stream: std::net::TcpStream,
    unsent: Vec<u8>,
}

#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// Bytes the socket did not take yet. Empty (and unallocated) almost always.
    unsent: Vec<u8>,
    reading: bool,
    /// On the ready list.
    ready: bool,
    writable_interest: bool,
    /// Set once closing: the write side is shut and reads are discarded until the peer closes.
    closing_deadline: Option<Instant>,
    /// Exported to another process: neither read nor written until thawed.
    frozen: bool,
}

#[derive(Debug)]
pub struct MioBackend {
    poll: Poll,
    events: Events,
    /// `None` once the shard stopped accepting (a drain): the socket is closed.
    listener: Option<TcpListener>,
    waker: Arc<MioWaker>,
    connections: Slab<Connection>,
    /// Connections to read on this turn (readable, or resumed).
    ready: Vec<ConnId>,
    accept_backlog: bool,
    read_buffer: Box<[u8]>,
    limits: BackendLimits,
    closing: usize,
    refused: u64,
    /// Bytes every connection holds for writing, in total.
    unsent: usize,
    /// Held open so that, out of descriptors, one can be freed to refuse a connection cleanly.
    spare_descriptor: Option<std::fs::File>,
    refused_out_of_descriptors: u64,
    /// Moves between shards finish on the next poll, as in a completion backend.
    finished_moves: VecDeque<Move>,
}

#[derive(Debug)]
enum Move {
    Detached(ConnId, MioHandoff),
    Attached { token: u64, conn: ConnId },
    AttachFailed { token: u64 },
    Exported(ConnId, Exported),
    ExportFailed(ConnId, io::Error),
}

/// Wakes a mio shard; also its address for other shards.
#[derive(Debug)]
pub struct MioWaker(Waker);

impl Wake for MioWaker {
    fn wake(&self) {
        if let Err(error) = self.0.wake() {
            warn!(%error, "waking a shard failed");
        }
    }
}

impl MioBackend {
    fn new(listener: std::net::TcpListener, limits: BackendLimits) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(MioWaker(Waker::new(poll.registry(), WAKER)?));
        Ok(Self {
            poll,
            events: Events::with_capacity(EVENTS_PER_POLL),
            listener: Some(listener),
            waker,
            connections: Slab::new(),
            ready: Vec::new(),
            accept_backlog: false,
            read_buffer: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            limits,
            closing: 0,
            refused: 0,
            unsent: 0,
            spare_descriptor: std::fs::File::open("/dev/null").ok(),
            refused_out_of_descriptors: 0,
            finished_moves: VecDeque::new(),
        })
    }

    fn accept(&mut self, on_event: &mut dyn FnMut(Event<'_, MioHandoff>) -> Reading) {
        self.accept_backlog = false;
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = &self.listener else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if is_out_of_descriptors(&error) => {
                    // Out of descriptors: established connections go on. The spare descriptor
                    // is given up for a moment to take the waiting connection and close it
                    // at once, so the client sees a close instead of hanging in the backlog.
                    if self.refuse_with_spare() {
                        continue;
                    }
                    warn!(%error, "accept failed: out of descriptors and no spare to refuse with");
                    return;
                }
                Err(error) => {
                    // ENOBUFS, ENOMEM, ...: established connections go on; the listener is
                    // retried on the next turn.
                    warn!(%error, "accept failed");
                    self.accept_backlog = true;
                    return;
                }
            };
            if self.connections.len() >= self.limits.connections_max {
                self.refused += 1;
                debug!("connection refused: shard holds its maximum");
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let entry = self.connections.vacant_entry();
            let id = entry.key();
            if let Err(error) =
                self.poll
                    .registry()
                    .register(&mut stream, Token(id), Interest::READABLE)
            {
                warn!(%error, "registering a connection failed");
                continue;
            }
            entry.insert(Connection::new(stream));
            on_event(Event::Accepted(id as ConnId, Some(peer.ip())));
            self.mark_ready(id);
        }
        self.accept_backlog = true;
    }

    /// Closes the spare descriptor, accepts one connection with it and closes that, then takes
    /// the spare again. True if a connection was refused.
    fn refuse_with_spare(&mut self) -> bool {
        let Some(spare) = self.spare_descriptor.take() else {
            return false;
        };
        drop(spare);
        let accepted = self.listener.as_ref().map(TcpListener::accept);
        let refused = match accepted {
            Some(Ok((stream, _))) => {
                drop(stream);
                self.refused += 1;
                self.refused_out_of_descriptors += 1;
                if self.refused_out_of_descriptors.is_power_of_two() {
                    warn!(
                        refused = self.refused_out_of_descriptors,
                        "out of file descriptors: new connections are closed at once; see `hop-tune check`"
                    );
                }
                true
            }
            Some(Err(_)) | None => false,
        };
        self.spare_descriptor = std::fs::File::open("/dev/null").ok();
        refused
    }

    fn mark_ready(&mut self, id: usize) {
        if let Some(connection) = self.connections.get_mut(id) {
            if !connection.ready {
                connection.ready = true;
                self.ready.push(id as ConnId);
            }
        }
    }

    /// Reads every ready connection within its budget.
    fn read_ready(&mut self, on_event: &mut dyn FnMut(Event<'_, MioHandoff>) -> Reading) {
        let ready = std::mem::take(&mut self.ready);
        for &id in &ready {
            let index = id as usize;
            let Some(connection) = self.connections.get_mut(index) else {
                continue;
            };
            connection.ready = false;
            if connection.frozen || (!connection.reading && connection.closing_deadline.is_none()) {
                continue;
            }
            let mut outcome = ReadOutcome::Drained;
            for _ in 0..READS_PER_CONNECTION_PER_TURN {
                match connection.stream.read(&mut self.read_buffer) {
                    Ok(0) => {
                        outcome = ReadOutcome::Closed;
                        break;
                    }
                    Ok(bytes) => {
                        if connection.closing_deadline.is_some() {
                            continue; // discard: we are closing
                        }
                        if on_event(Event::Data(id, &self.read_buffer[..bytes])) == Reading::Pause {
                            connection.reading = false;
                            outcome = ReadOutcome::Paused;
                            break;
                        }
                        outcome = ReadOutcome::Budget;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        outcome = ReadOutcome::Drained;
                        break;
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        outcome = ReadOutcome::Closed;
                        break;
                    }
                }
            }
            match outcome {
                ReadOutcome::Closed => {
                    let was_closing = connection.closing_deadline.is_some();
                    self.remove(index);
                    if !was_closing {
                        on_event(Event::Closed(id));
                    }
                }
                ReadOutcome::Budget => {
                    connection.ready = true;
                    self.ready.push(id);
                }
                ReadOutcome::Drained | ReadOutcome::Paused => {}
            }
        }
    }

    fn flush(&mut self, index: usize) -> io::Result<()> {
        let Some(connection) = self.connections.get_mut(index) else {
            return Ok(());
        };
        if connection.frozen {
            return Ok(());
        }
        let mut written = 0;
        while written < connection.unsent.len() {
            match connection.stream.write(&connection.unsent[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(bytes) => written += bytes,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        connection.unsent.drain(..written);
        self.unsent -= written;
        let want_writable = !connection.unsent.is_empty();
        if connection.unsent.is_empty() {
            connection.unsent = Vec::new();
        }
        if want_writable != connection.writable_interest {
            connection.writable_interest = want_writable;
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(&mut connection.stream, Token(index), interest)?;
        }
        Ok(())
    }

    fn remove(&mut self, index: usize) -> Connection {
        let mut connection = self.connections.remove(index);
        self.unsent -= connection.unsent.len();
        let _ = self.poll.registry().deregister(&mut connection.stream);
        if connection.closing_deadline.is_some() {
            self.closing -= 1;
        }
        connection
    }

    /// Drops closing connections whose deadline passed.
    fn reap_closing(&mut self) {
        if self.closing == 0 {
            return;
        }
        let now = Instant::now();
        let expired: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, c)| c.closing_deadline.is_some_and(|deadline| deadline <= now))
            .map(|(index, _)| index)
            .collect();
        for index in expired {
            self.remove(index);
        }
    }
}

fn is_out_of_descriptors(error: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(error.raw_os_error(), Some(code) if code == Errno::EMFILE as i32 || code == Errno::ENFILE as i32)
}

enum ReadOutcome {
    Drained,
    Budget,
    Paused,
    Closed,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            unsent: Vec::new(),
            reading: true,
            ready: false,
            writable_interest: false,
            closing_deadline: None,
            frozen: false,
        }
    }
}

impl Backend for MioBackend {
    type Handoff = MioHandoff;
    type Peer = Arc<MioWaker>;

    fn open(listener: std::net::TcpListener, limits: BackendLimits) -> io::Result<Self> {
        Self::new(listener, limits)
    }

    fn name(&self) -> &'static str {
        "mio"
    }

    fn peer(&self) -> Arc<MioWaker> {
        self.waker.clone()
    }

    fn wake_peer(&mut self, peer: &Arc<MioWaker>) {
        peer.wake();
    }

    fn remote_waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn poll(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(Event<'_, MioHandoff>) -> Reading,
    ) -> io::Result<()> {
        let timeout = if self.has_backlog() {
            Some(Duration::ZERO)
        } else if self.closing > 0 {
            Some(timeout.map_or(self.limits.close_linger, |t| {
                t.min(self.limits.close_linger)
            }))
        } else {
            timeout
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
        let mut accept = self.accept_backlog;
        let mut woken = false;
        let mut writable = Vec::new();
        for event in &self.events {
            match event.token() {
                LISTENER => accept = true,
                WAKER => woken = true,
                Token(index) => {
                    if event.is_writable() {
                        writable.push(index);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        if let Some(connection) = self.connections.get_mut(index) {
                            if !connection.ready {
                                connection.ready = true;
                                self.ready.push(index as ConnId);
                            }
                        }
                    }
                }
            }
        }
        if woken {
            on_event(Event::Wake);
        }
        while let Some(finished) = self.finished_moves.pop_front() {
            on_event(match finished {
                Move::Detached(conn, handoff) => Event::Detached(conn, handoff),
                Move::Attached { token, conn } => Event::Attached { token, conn },
                Move::AttachFailed { token } => Event::AttachFailed { token },
                Move::Exported(conn, exported) => Event::Exported(conn, exported),
                Move::ExportFailed(conn, error) => Event::ExportFailed(conn, error),
            });
        }
        for index in writable {
            if self.flush(index).is_err() {
                if let Some(connection) = self.connections.get(index) {
                    let was_closing = connection.closing_deadline.is_some();
                    self.remove(index);
                    if !was_closing {
                        on_event(Event::Closed(index as ConnId));
                    }
                }
            }
        }
        if accept {
            self.accept(on_event);
        }
        self.read_ready(on_event);
        self.reap_closing();
        Ok(())
    }

    fn export(&mut self, conn: ConnId) {
        let Some(connection) = self.connections.get_mut(conn as usize) else {
            return;
        };
        if connection.closing_deadline.is_some() || connection.frozen {
            return;
        }
        // A descriptor of its own for the socket: this one stays, frozen, so that the
        // connection goes on here if the other process does not take it.
        let socket = match std::os::fd::AsFd::as_fd(&connection.stream).try_clone_to_owned() {
            Ok(socket) => socket,
            Err(error) => {
                warn!(%error, "duplicating a connection's descriptor for export failed");
                self.finished_moves
                    .push_back(Move::ExportFailed(conn, error));
                return;
            }
        };
        connection.frozen = true;
        let unsent = connection.unsent.clone();
        self.finished_moves
            .push_back(Move::Exported(conn, Exported { socket, unsent }));
    }

    fn stop_reads(&mut self) -> bool {
        true // reads happen inside `poll`, only for connections whose reading is on
    }

    fn thaw(&mut self, conn: ConnId) {
        let index = conn as usize;
        let Some(connection) = self.connections.get_mut(index) else {
            return;
        };
        if !std::mem::take(&mut connection.frozen) {
            return;
        }
        self.mark_ready(index);
        if self.flush(index).is_err() {
            self.mark_ready(index);
        }
    }

    fn import(&mut self, socket: std::os::fd::OwnedFd, unsent: Vec<u8>) -> io::Result<ConnId> {
        // No `connections_max` here: the server held this connection already.
        let stream = std::net::TcpStream::from(socket);
        stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(stream);
        let entry = self.connections.vacant_entry();
        let index = entry.key();
        self.poll
            .registry()
            .register(&mut stream, Token(index), Interest::READABLE)?;
        let mut connection = Connection::new(stream);
        self.unsent += unsent.len();
        connection.unsent = unsent;
        entry.insert(connection);
        // Bytes may wait in the socket already; an edge seen by the other process is gone.
        self.mark_ready(index);
        if self.flush(index).is_err() {
            self.mark_ready(index);
        }
        Ok(index as ConnId)
    }

    fn set_accepting(&mut self, accepting: bool) {
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        let registry = self.poll.registry();
        let result = if accepting {
            self.accept_backlog = true; // edges missed meanwhile
            registry.register(listener, LISTENER, Interest::READABLE)
        } else {
            self.accept_backlog = false;
            registry.deregister(listener)
        };
        if let Err(error) = result {
            warn!(%error, accepting, "changing the listener's registration failed");
        }
    }

    fn stop_accepting(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            if let Err(error) = self.poll.registry().deregister(&mut listener) {
                warn!(%error, "deregistering the listener failed");
            }
        }
        self.accept_backlog = false;
    }

    fn has_backlog(&self) -> bool {
        self.accept_backlog || !self.ready.is_empty() || !self.finished_moves.is_empty()
    }

    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), SendOverflow> {
        let index = conn as usize;
        let Some(connection) = self.connections.get_mut(index) else {
            return Ok(()); // already gone; its Closed event was or will be reported
        };
        if connection.unsent.len() + bytes.len() > self.limits.send_buffer_bytes_max {
            return Err(SendOverflow);
        }
        connection.unsent.extend_from_slice(bytes);
        self.unsent += bytes.len();
        // A write error means the peer is gone; the next read reports the close.
        if self.flush(index).is_err() {
            self.mark_ready(index);
        }
        Ok(())
    }

    fn unsent_bytes(&self) -> usize {
        self.unsent
    }

    fn heaviest(&self, count: usize) -> Vec<(ConnId, usize)> {
        let open = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.closing_deadline.is_none());
        super::heaviest_of(
            open.map(|(index, connection)| (index as ConnId, connection.unsent.len())),
            count,
        )
    }

    fn abort(&mut self, conn: ConnId) {
        let index = conn as usize;
        if !self.connections.contains(index) {
            return;
        }
        let connection = self.remove(index);
        self.ready.retain(|ready| *ready != conn);
        // Closed without a word, at once: a reset, not the bytes it would not read.
        let _ = socket2::SockRef::from(&connection.stream).set_linger(Some(Duration::ZERO));
    }

    fn set_reading(&mut self, conn: ConnId, reading: bool) {
        let index = conn as usize;
        if let Some(connection) = self.connections.get_mut(index) {
            connection.reading = reading;
            if reading {
                // Readiness edges seen while paused were consumed: look again.
                self.mark_ready(index);
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        let index = conn as usize;
        if !self.connections.contains(index) {
            return;
        }
        let _ = self.flush(index);
        let connection = &mut self.connections[index];
        if connection.closing_deadline.is_some() {
            return;
        }
        let _ = connection.stream.shutdown(Shutdown::Write);
        connection.closing_deadline = Some(Instant::now() + self.limits.close_linger);
        self.closing += 1;
        self.mark_ready(index);
    }

    fn close_all(&mut self) {
        let open: Vec<ConnId> = self
            .connections
            .iter()
            .filter(|(_, connection)| connection.closing_deadline.is_none())
            .map(|(index, _)| index as ConnId)
            .collect();
        for conn in open {
            self.close(conn);
        }
    }

    fn detach(&mut self, conn: ConnId, _to: &Arc<MioWaker>) {
        let index = conn as usize;
        if !self.connections.contains(index) {
            return;
        }
        let connection = self.remove(index);
        self.ready.retain(|ready| *ready != conn);
        let handoff = MioHandoff {
            stream: connection.stream.into(),
            unsent: connection.unsent,
        };
        self.finished_moves.push_back(Move::Detached(conn, handoff));
    }

    fn attach(&mut self, handoff: MioHandoff, token: u64) {
        let mut stream = TcpStream::from_std(handoff.stream);
        let entry = self.connections.vacant_entry();
        let index = entry.key();
        if let Err(error) =
            self.poll
                .registry()
                .register(&mut stream, Token(index), Interest::READABLE)
        {
            warn!(%error, "adopting a connection failed");
            self.finished_moves.push_back(Move::AttachFailed { token });
            return;
        }
        let mut connection = Connection::new(stream);
        self.unsent += handoff.unsent.len();
        connection.unsent = handoff.unsent;
        entry.insert(connection);
        let _ = self.flush(index);
        self.finished_moves.push_back(Move::Attached {
            token,
            conn: index as ConnId,
        });
        // Bytes may have arrived between detach and attach: look at once.
        self.mark_ready(index);
    }

    fn connections(&self) -> usize {
        self.connections.len()
    }

    fn refused(&self) -> u64 {
        self.refused
    }
}
