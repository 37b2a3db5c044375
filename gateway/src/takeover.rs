//! Upgrade without dropping connections: `hopd --takeover` takes over a running hopd's
//! listening sockets and live sessions.
//!
//! The running hopd (the *old* process) listens on `takeover.sock` in its data folder (a
//! `SOCK_SEQPACKET` unix socket, mode 0600: only hopd's own user reaches it). A new hopd
//! started with `--takeover` (same settings, same data folder) connects and says hello. Then:
//!
//! 1. **Quiesce.** Every shard of the old process stops accepting (new connections wait in the
//!    listeners' backlogs) and stops reading; connections still in their handshake are closed
//!    (their clients connect again). What the shards already read is worked on: mail between
//!    shards, commits and their fsyncs, ServerAcks. The coordinator waits until every shard is
//!    quiet and no mail is between shards: every acked message is on disk.
//! 2. **Export.** Each shard freezes its open connections (the backend neither reads nor
//!    writes them any more, but keeps them) and takes out, per connection: a descriptor of the
//!    socket, the bytes not written, the Noise transport's keys and nonces with any half-read
//!    frame, and the router's session (items pushed and not acked, watches, declarations);
//!    and who watches each user. The shard then waits, touching nothing on disk.
//! 3. **Hand over.** The old process sends the listening sockets and every connection's
//!    descriptor (`SCM_RIGHTS`) and state. The new process recovers the store from disk as at
//!    any start and says it is ready. The old process answers that it is gone (from then on it
//!    never thaws) and exits 0 without a word to the clients: their sockets stay open in the
//!    new process. Only then do the new process's shards adopt the sockets (the uring backend
//!    registers them as direct descriptors), resume each session on its home shard and serve:
//!    never do two processes serve one connection.
//!
//! If the new process fails or goes away before it is ready (or is not ready within
//! [`READY_PATIENCE`]), the old one thaws: its connections go on reading and writing, and it
//! accepts again; the new process, told nothing or told no, stops without serving. Not carried over: the
//! per-sender rate buckets and admission buckets (they start full), the counters, and a
//! node's cluster links (a cluster member upgrades by drain; takeover refuses).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hop_protocol::noise::TransportState;
use hop_protocol::session::ChannelState;
use hop_protocol::wire::ReceiptKind;
use hop_protocol::UserId;
use hop_router::{PushedItem, SessionState};
use nix::sys::socket::{
    accept, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::sys::Wake;

/// The socket's name in the data folder.
pub const SOCKET_NAME: &str = "takeover.sock";
/// The version of what travels on the socket; both processes must speak the same.
const WIRE_VERSION: u32 = 1;
/// Bytes of one message at most (`SOCK_SEQPACKET` keeps each whole).
const MESSAGE_BYTES_MAX: usize = 32 * 1024;
/// Descriptors one message carries at most (the kernel's `SCM_MAX_FD` is 253).
const FDS_PER_MESSAGE: usize = 128;
/// How long the old process waits for its shards to become quiet, and then to export.
const QUIESCE_PATIENCE: Duration = Duration::from_secs(20);
/// How long the old process waits, frozen, for the new one to be ready (its store recovered).
pub const READY_PATIENCE: Duration = Duration::from_secs(120);

const PHASE_IDLE: u8 = 0;
const PHASE_QUIESCE: u8 = 1;
const PHASE_EXPORT: u8 = 2;
const PHASE_THAW: u8 = 3;
/// The new process serves: the old one's shards stay frozen until it exits.
const PHASE_GONE: u8 = 4;

/// What the shards of the old process are asked to do, and what they report: shared by the
/// coordinator thread and every shard.
pub struct Handover {
    phase: AtomicU8,
    /// Bumped at every new takeover, so that a shard tells a second attempt from the first.
    attempt: AtomicU64,
    /// Per shard: nothing held, unkept, syncing, moving or waiting in its mailbox or outbox,
    /// and no read in flight (set at the end of each turn while quiescing).
    quiet: Vec<AtomicBool>,
    /// Per shard: turns in which it took mail while quiescing (bumped as it takes it).
    work: Vec<AtomicU64>,
    /// True while any mailbox between shards holds mail (set by the server).
    mail_waiting: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Per shard: its export, once done (`Err`: a connection could not be exported).
    exports: Mutex<Vec<Option<Result<ShardExport, String>>>>,
    /// Per shard: thawed after a failed attempt.
    thawed: Vec<AtomicBool>,
    wakers: Mutex<Vec<Option<Arc<dyn Wake>>>>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// What a shard is asked, as it reads it once per turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Serve,
    Quiesce {
        attempt: u64,
    },
    Export {
        attempt: u64,
    },
    Thaw,
    /// The new process serves: stay frozen.
    Gone,
}

impl Handover {
    pub fn new(shards: usize) -> Arc<Self> {
        Arc::new(Self {
            phase: AtomicU8::new(PHASE_IDLE),
            attempt: AtomicU64::new(0),
            quiet: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            work: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            mail_waiting: std::sync::OnceLock::new(),
            exports: Mutex::new((0..shards).map(|_| None).collect()),
            thawed: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            wakers: Mutex::new((0..shards).map(|_| None).collect()),
        })
    }

    /// Each shard registers how to wake it (again after a restart).
    pub fn register(&self, shard: usize, waker: Arc<dyn Wake>) {
        self.lock_wakers()[shard] = Some(waker);
    }

    fn lock_wakers(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<dyn Wake>>>> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_exports(&self) -> std::sync::MutexGuard<'_, Vec<Option<Result<ShardExport, String>>>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard's side: what it is asked now (one atomic load when nothing is under way).
    pub fn ask(&self) -> Ask {
        match self.phase.load(Ordering::Acquire) {
            PHASE_IDLE => Ask::Serve,
            phase => {
                let attempt = self.attempt.load(Ordering::Acquire);
                match phase {
                    PHASE_QUIESCE => Ask::Quiesce { attempt },
                    PHASE_EXPORT => Ask::Export { attempt },
                    PHASE_THAW => Ask::Thaw,
                    _ => Ask::Gone,
                }
            }
        }
    }

    /// True while a takeover is under way or done: the shard must not start anything new.
    pub fn is_active(&self) -> bool {
        self.phase.load(Ordering::Acquire) != PHASE_IDLE
    }

    pub fn set_quiet(&self, shard: usize, quiet: bool) {
        self.quiet[shard].store(quiet, Ordering::Release);
    }

    /// The shard is working on something (an event, mail, a command) while quiescing: not
    /// quiet until its turn ends. Said before the work, so that a snapshot taken meanwhile
    /// sees it.
    pub fn busy(&self, shard: usize) {
        self.quiet[shard].store(false, Ordering::Release);
        self.work[shard].fetch_add(1, Ordering::AcqRel);
    }

    /// How to tell that mail waits between shards (the server's mailboxes).
    pub fn set_mail_waiting(&self, waiting: Box<dyn Fn() -> bool + Send + Sync>) {
        let _ = self.mail_waiting.set(waiting);
    }

    pub fn exported(&self, shard: usize, export: Result<ShardExport, String>) {
        self.lock_exports()[shard] = Some(export);
    }

    pub fn thawed(&self, shard: usize) {
        self.thawed[shard].store(true, Ordering::Release);
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Release);
        for waker in self.lock_wakers().iter().flatten() {
            waker.wake();
        }
    }

    /// Every shard quiet and no mail between them; and the shards' work counts.
    fn snapshot(&self) -> (bool, u64) {
        let quiet = self.quiet.iter().all(|q| q.load(Ordering::Acquire));
        let work = self.work.iter().map(|w| w.load(Ordering::Acquire)).sum();
        let mail = self.mail_waiting.get().is_some_and(|waiting| waiting());
        (quiet && !mail, work)
    }

    /// Quiesces every shard: true once all are quiet with no mail between them twice in a
    /// row with no work between (a shard that takes mail says so before it works on it), false
    /// if that did not happen in time.
    fn quiesce(&self) -> bool {
        for quiet in &self.quiet {
            quiet.store(false, Ordering::Release);
        }
        for shard in 0..self.quiet.len() {
            self.thawed[shard].store(false, Ordering::Release);
        }
        self.lock_exports().iter_mut().for_each(|slot| *slot = None);
        self.attempt.fetch_add(1, Ordering::AcqRel);
        self.set_phase(PHASE_QUIESCE);
        let deadline = Instant::now() + QUIESCE_PATIENCE;
        let mut last: Option<u64> = None;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            match self.snapshot() {
                (true, work) if last == Some(work) => return true,
                (true, work) => last = Some(work),
                (false, _) => last = None,
            }
        }
        false
    }

    /// Asks every shard to export and waits for all of them.
    fn export(&self) -> Result<Vec<ShardExport>, String> {
        self.set_phase(PHASE_EXPORT);
        let deadline = Instant::now() + QUIESCE_PATIENCE;
        loop {
            {
                let mut exports = self.lock_exports();
                if exports.iter().all(Option::is_some) {
                    return exports
                        .iter_mut()
                        .map(|slot| slot.take().expect("all present"))
                        .collect();
                }
            }
            if Instant::now() >= deadline {
                return Err("the shards did not export their connections in time".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The attempt failed: every shard goes on serving. Waits (bounded) for them to thaw.
    fn thaw(&self) {
        self.set_phase(PHASE_THAW);
        let deadline = Instant::now() + QUIESCE_PATIENCE;
        while Instant::now() < deadline && !self.thawed.iter().all(|t| t.load(Ordering::Acquire)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.phase.store(PHASE_IDLE, Ordering::Release);
    }

    /// The new process serves.
    pub fn is_gone(&self) -> bool {
        self.phase.load(Ordering::Acquire) == PHASE_GONE
    }
}

/// One connection taken out of a shard.
#[derive(Debug)]
pub struct ConnExport {
    pub socket: OwnedFd,
    pub unsent: Vec<u8>,
    pub peer: Option<IpAddr>,
    pub channel: ChannelState,
    pub session: SessionState,
}

/// What one shard hands over.
#[derive(Debug, Default)]
pub struct ShardExport {
    pub conns: Vec<ConnExport>,
    /// Who watches each user homed on the shard.
    pub watchers: Vec<(UserId, Vec<UserId>)>,
}

/// What a new process takes over: the listening sockets (one per shard) and each shard's
/// connections.
#[derive(Debug)]
pub struct Inherited {
    pub listeners: Vec<std::net::TcpListener>,
    pub shards: Vec<ShardExport>,
    socket: OwnedFd,
    gate: Arc<Gate>,
}

impl Inherited {
    /// Tells the old process that this one is ready to serve and waits for its answer: once
    /// it says it is gone (it will never thaw), the shards may serve; if it says anything else
    /// or nothing, it thawed or died, and the connections are not this process's to serve.
    /// Opens the gate either way (to serve, or to stop).
    pub fn commit(&self) -> Result<(), String> {
        let answer = send(&self.socket, Tag::Ready, &[], &[])
            .map_err(|error| format!("telling the running hopd: {error}"))
            .and_then(|()| {
                receive(&self.socket)
                    .map_err(|error| format!("waiting for the running hopd: {error}"))
            });
        let outcome = match answer {
            Ok(Some(Message { tag: Tag::Gone, .. })) => Ok(()),
            Ok(Some(message)) => Err(format!("the running hopd said {:?}", message.tag)),
            Ok(None) => Err("the running hopd gave up the takeover (it serves on)".into()),
            Err(error) => Err(error),
        };
        self.gate.open(outcome.is_ok());
        outcome
    }

    /// What the shards of this process wait on before they resume the connections.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }
}

/// Holds the new process's shards until the old process has let go for good, so that never
/// two processes serve one connection.
#[derive(Debug, Default)]
pub struct Gate {
    go: Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl Gate {
    /// Waits until the gate opens: true to serve, false to stop.
    pub fn wait(&self) -> bool {
        let mut go = self.go.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(go) = *go {
                return go;
            }
            go = self.changed.wait(go).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Opens the gate to serve or to stop; the first word stands.
    fn open(&self, serve: bool) {
        self.go
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(serve);
        self.changed.notify_all();
    }
}

impl Drop for Inherited {
    /// A takeover given up before its commit: the shards stop.
    fn drop(&mut self) {
        self.gate.open(false);
    }
}

/// The record of one connection on the socket; byte fields in hex.
#[derive(Debug, Serialize, Deserialize)]
struct ConnRecord {
    /// Index of its descriptor among those sent.
    fd: usize,
    unsent: String,
    peer: Option<IpAddr>,
    send_key: String,
    receive_key: String,
    send_nonce: u64,
    receive_nonce: u64,
    partial: String,
    user: Id,
    pushed: Vec<(u64, i32, Id)>,
    subscriptions: Vec<Id>,
    outbox: u64,
    aliases: Vec<Option<Id>>,
    /// Absent in a handover from a hop before the second tick could ride in the ServerAck.
    #[serde(default)]
    delivered_in_ack: bool,
}

/// A user id on the socket: its text form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
struct Id(String);

impl Id {
    fn of(user: UserId) -> Self {
        Self(user.to_string())
    }

    fn user(&self) -> Result<UserId, String> {
        self.0
            .parse()
            .map_err(|_| format!("a bad handover: {:?} is no user id", self.0))
    }
}

fn ids(users: &[UserId]) -> Vec<Id> {
    users.iter().copied().map(Id::of).collect()
}

fn users(ids: &[Id]) -> Result<Vec<UserId>, String> {
    ids.iter().map(Id::user).collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardRecord {
    conns: Vec<ConnRecord>,
    watchers: Vec<(Id, Vec<Id>)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    shards: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Document {
    /// Index of each shard's listener among the descriptors sent.
    listeners: Vec<usize>,
    shards: Vec<ShardRecord>,
}

/// The kind of a message on the socket: its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    /// New → old: `Hello` (JSON).
    Hello = b'H',
    /// Old → new: refused, with the reason (text).
    Refused = b'R',
    /// Old → new: a piece of the `Document` (JSON, cut anywhere).
    Data = b'D',
    /// Old → new: descriptors, in order.
    Fds = b'F',
    /// Old → new: the document is whole.
    End = b'E',
    /// New → old: the new process is ready to serve (it recovered the store).
    Ready = b'S',
    /// Old → new: the old process is gone for good; serve.
    Gone = b'G',
}

impl Tag {
    fn of(byte: u8) -> Option<Self> {
        Some(match byte {
            b'H' => Self::Hello,
            b'R' => Self::Refused,
            b'D' => Self::Data,
            b'F' => Self::Fds,
            b'E' => Self::End,
            b'S' => Self::Ready,
            b'G' => Self::Gone,
            _ => return None,
        })
    }
}

fn send(socket: &OwnedFd, tag: Tag, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut message = Vec::with_capacity(1 + payload.len());
    message.push(tag as u8);
    message.extend_from_slice(payload);
    let iov = [io::IoSlice::new(&message)];
    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(socket.as_raw_fd(), &iov, control, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    Ok(())
}

/// One message on the socket.
struct Message {
    tag: Tag,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The next message; `None` when the peer closed.
fn receive(socket: &OwnedFd) -> io::Result<Option<Message>> {
    let mut buffer = vec![0u8; MESSAGE_BYTES_MAX + 1];
    let mut control = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (bytes, fds, truncated) = {
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel installed these descriptors for this process just now;
                // nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let truncated = message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (message.bytes, fds, truncated)
    };
    if truncated {
        return Err(io::Error::other("a takeover message was truncated"));
    }
    if bytes == 0 {
        return Ok(None);
    }
    let tag =
        Tag::of(buffer[0]).ok_or_else(|| io::Error::other("a takeover message of unknown kind"))?;
    buffer.truncate(bytes);
    buffer.remove(0);
    Ok(Some(Message {
        tag,
        payload: buffer,
        fds,
    }))
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// The socket's path in `data`.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join(SOCKET_NAME)
}

/// The old process's side: a thread that waits for a new process on the socket and hands
/// everything over, with the descriptors of the shards' listening sockets it holds. Takes
/// over nothing while `refusal` says why not (a cluster member), nor once withdrawn.
pub struct Offer {
    path: PathBuf,
    listeners: Arc<Mutex<Option<Vec<OwnedFd>>>>,
}

impl Offer {
    /// No more takeovers (a drain started): the copies of the listening sockets close, so that
    /// a listener a draining shard let go stops taking connections.
    pub fn withdraw(&self) {
        *self.listeners.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts offering a takeover on `data`'s socket.
pub fn offer(
    data: &Path,
    shards: usize,
    listeners: Vec<OwnedFd>,
    handover: Arc<Handover>,
    refusal: Option<String>,
) -> io::Result<Offer> {
    let path = socket_path(data);
    // A socket left by a process that died: nobody listens on it any more.
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket()?;
    let address = UnixAddr::new(&path).map_err(io::Error::from)?;
    bind(listener.as_raw_fd(), &address).map_err(io::Error::from)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&listener, Backlog::new(1).map_err(io::Error::from)?).map_err(io::Error::from)?;
    let listeners = Arc::new(Mutex::new(Some(listeners)));
    let offered = listeners.clone();
    std::thread::Builder::new()
        .name("hop-takeover".into())
        .spawn(move || loop {
            let accepted = match accept(listener.as_raw_fd()) {
                // SAFETY: accept(2) returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => {
                    warn!(%error, "takeover socket: accept failed; no takeover is possible");
                    return;
                }
            };
            match hand_over(&accepted, shards, &offered, &handover, refusal.as_deref()) {
                Ok(()) => {
                    info!("takeover: the new process serves every connection; exiting");
                    return;
                }
                Err(error) => {
                    warn!(%error, "takeover failed; this process goes on serving");
                }
            }
        })?;
    info!(path = %path.display(), "takeover socket ready");
    Ok(Offer { path, listeners })
}

/// One attempt, on the old process's side. Ok once the new process serves.
fn hand_over(
    socket: &OwnedFd,
    shards: usize,
    listeners: &Mutex<Option<Vec<OwnedFd>>>,
    handover: &Handover,
    refusal: Option<&str>,
) -> Result<(), String> {
    let refuse = |reason: String| {
        let _ = send(socket, Tag::Refused, reason.as_bytes(), &[]);
        Err(reason)
    };
    let hello: Hello = match receive(socket) {
        Ok(Some(Message {
            tag: Tag::Hello,
            payload,
            ..
        })) => serde_json::from_slice(&payload).map_err(|error| format!("a bad hello: {error}"))?,
        Ok(_) => return Err("the new process said no hello".into()),
        Err(error) => return Err(format!("reading the hello: {error}")),
    };
    if hello.version != WIRE_VERSION {
        return refuse(format!(
            "this hopd speaks takeover version {WIRE_VERSION}, the new one {}",
            hello.version
        ));
    }
    if hello.shards != shards {
        return refuse(format!(
            "this hopd runs {shards} shards and the new one {}: a takeover keeps the shard count \
             (change it with a drain and restart)",
            hello.shards
        ));
    }
    if let Some(reason) = refusal {
        return refuse(reason.to_string());
    }
    let listeners = match listeners.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        None => return refuse("this hopd is draining; it hands nothing over".into()),
        Some(listeners) => listeners
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|error| format!("copying the listening sockets: {error}"))?,
    };
    let started = Instant::now();
    info!("takeover: a new process asks; quiescing the shards");
    if !handover.quiesce() {
        handover.thaw();
        return refuse("the shards did not become quiet in time".into());
    }
    let exports = match handover.export() {
        Ok(exports) => exports,
        Err(reason) => {
            handover.thaw();
            return refuse(reason);
        }
    };
    let connections: usize = exports.iter().map(|e| e.conns.len()).sum();
    info!(
        connections,
        quiesced_ms = started.elapsed().as_millis() as u64,
        "takeover: shards frozen; handing over"
    );
    if let Err(error) = send_everything(socket, &listeners, &exports) {
        handover.thaw();
        return Err(format!("sending to the new process: {error}"));
    }
    drop(exports); // our descriptors of the sockets: the new process holds its own
                   // The new process now recovers the store; it says when it is ready to serve.
    let deadline = Instant::now() + READY_PATIENCE;
    let timeout = nix::sys::time::TimeVal::new(READY_PATIENCE.as_secs() as i64, 0);
    let _ =
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    let answer = receive(socket);
    match answer {
        Ok(Some(Message {
            tag: Tag::Ready, ..
        })) => {
            // Once this is sent the new process serves: this one never thaws again. (If the
            // new process dies after reading it, neither serves: a crash, which the service
            // manager restarts.)
            if let Err(error) = send(socket, Tag::Gone, &[], &[]) {
                handover.thaw();
                return Err(format!("telling the new process to serve: {error}; thawed"));
            }
            // Logged before the phase flips: once it is gone, the main thread exits the
            // process, and a line logged after that may never be written.
            info!(
                connections,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "takeover: done"
            );
            handover.set_phase(PHASE_GONE);
            Ok(())
        }
        other => {
            handover.thaw();
            let why = match other {
                Ok(None) => "the new process went away".to_string(),
                Ok(Some(message)) => format!("the new process said {:?}", message.tag),
                Err(_) if Instant::now() >= deadline => {
                    "the new process did not serve in time".into()
                }
                Err(error) => format!("waiting for the new process: {error}"),
            };
            Err(format!("{why}; thawed"))
        }
    }
}

fn send_everything(
    socket: &OwnedFd,
    listeners: &[OwnedFd],
    exports: &[ShardExport],
) -> io::Result<()> {
    let mut fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let mut document = Document {
        listeners: (0..listeners.len()).collect(),
        shards: Vec::with_capacity(exports.len()),
    };
    for export in exports {
        let mut record = ShardRecord {
            conns: Vec::with_capacity(export.conns.len()),
            watchers: (export.watchers.iter())
                .map(|(user, subscribers)| (Id::of(*user), ids(subscribers)))
                .collect(),
        };
        for conn in &export.conns {
            record.conns.push(ConnRecord {
                fd: fds.len(),
                unsent: hex::encode(&conn.unsent),
                peer: conn.peer,
                send_key: hex::encode(conn.channel.transport.send_key),
                receive_key: hex::encode(conn.channel.transport.receive_key),
                send_nonce: conn.channel.transport.send_nonce,
                receive_nonce: conn.channel.transport.receive_nonce,
                partial: hex::encode(&conn.channel.partial),
                user: Id::of(conn.session.user),
                pushed: (conn.session.pushed.iter())
                    .map(|item| (item.id, item.kind as i32, Id::of(item.peer)))
                    .collect(),
                subscriptions: ids(&conn.session.subscriptions),
                outbox: conn.session.outbox,
                aliases: (conn.session.aliases.iter())
                    .map(|alias| alias.map(Id::of))
                    .collect(),
                delivered_in_ack: conn.session.delivered_in_ack,
            });
            fds.push(conn.socket.as_raw_fd());
        }
        document.shards.push(record);
    }
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        send(socket, Tag::Fds, &[], batch)?;
    }
    let bytes = serde_json::to_vec(&document).map_err(io::Error::other)?;
    for piece in bytes.chunks(MESSAGE_BYTES_MAX) {
        send(socket, Tag::Data, piece, &[])?;
    }
    send(socket, Tag::End, &[], &[])
}

/// The new process's side: connects to the running hopd on `data`'s socket and takes over
/// its listeners and connections. The caller starts its server on them, then calls
/// [`Inherited::commit`].
pub fn take_over(data: &Path, shards: usize) -> Result<Inherited, String> {
    let path = socket_path(data);
    let socket = seqpacket().map_err(|error| error.to_string())?;
    let address = UnixAddr::new(&path).map_err(|error| error.to_string())?;
    connect(socket.as_raw_fd(), &address).map_err(|error| {
        format!(
            "cannot reach a running hopd at {}: {error} (is hopd running on this data folder?)",
            path.display()
        )
    })?;
    let hello = serde_json::to_vec(&Hello {
        version: WIRE_VERSION,
        shards,
    })
    .map_err(|error| error.to_string())?;
    send(&socket, Tag::Hello, &hello, &[]).map_err(|error| error.to_string())?;
    let mut fds: Vec<Option<OwnedFd>> = Vec::new();
    let mut bytes = Vec::new();
    loop {
        let Some(message) = receive(&socket).map_err(|error| error.to_string())? else {
            return Err("the running hopd closed the takeover socket".into());
        };
        match message.tag {
            Tag::Refused => {
                return Err(format!(
                    "the running hopd refused: {}",
                    String::from_utf8_lossy(&message.payload)
                ))
            }
            Tag::Fds => fds.extend(message.fds.into_iter().map(Some)),
            Tag::Data => bytes.extend_from_slice(&message.payload),
            Tag::End => break,
            tag => return Err(format!("unexpected {tag:?} from the running hopd")),
        }
    }
    let document: Document =
        serde_json::from_slice(&bytes).map_err(|error| format!("a bad handover: {error}"))?;
    let mut take = |index: usize| {
        fds.get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor {index} is missing from the handover"))
    };
    let listeners = (document.listeners.iter())
        .map(|index| take(*index).map(std::net::TcpListener::from))
        .collect::<Result<Vec<_>, _>>()?;
    if listeners.len() != shards || document.shards.len() != shards {
        return Err("the handover does not have one listener and one part per shard".into());
    }
    let mut parts = Vec::with_capacity(shards);
    for record in document.shards {
        let mut conns = Vec::with_capacity(record.conns.len());
        for conn in record.conns {
            conns.push(ConnExport {
                socket: take(conn.fd)?,
                unsent: unhex(&conn.unsent)?,
                peer: conn.peer,
                channel: ChannelState {
                    transport: TransportState {
                        send_key: key_of(&conn.send_key)?,
                        receive_key: key_of(&conn.receive_key)?,
                        send_nonce: conn.send_nonce,
                        receive_nonce: conn.receive_nonce,
                    },
                    partial: unhex(&conn.partial)?,
                },
                session: SessionState {
                    user: conn.user.user()?,
                    pushed: (conn.pushed.iter())
                        .map(|(id, kind, peer)| {
                            Ok(PushedItem {
                                id: *id,
                                kind: ReceiptKind::try_from(*kind)
                                    .map_err(|_| format!("a bad handover: receipt kind {kind}"))?,
                                peer: peer.user()?,
                            })
                        })
                        .collect::<Result<_, String>>()?,
                    subscriptions: users(&conn.subscriptions)?,
                    outbox: conn.outbox,
                    aliases: (conn.aliases.iter())
                        .map(|alias| alias.as_ref().map(Id::user).transpose())
                        .collect::<Result<_, String>>()?,
                    delivered_in_ack: conn.delivered_in_ack,
                },
            });
        }
        let watchers = (record.watchers.iter())
            .map(|(user, subscribers)| Ok((user.user()?, users(subscribers)?)))
            .collect::<Result<_, String>>()?;
        parts.push(ShardExport { conns, watchers });
    }
    Ok(Inherited {
        listeners,
        shards: parts,
        socket,
        gate: Arc::new(Gate::default()),
    })
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|error| format!("a bad handover: {error}"))
}

fn key_of(text: &str) -> Result<[u8; 32], String> {
    unhex(text)?
        .try_into()
        .map_err(|_| "a bad handover: a key is not 32 bytes".to_string())
}
