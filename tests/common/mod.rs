//! A real `hopd` process on loopback, and clients for it.
//!
//! Every server binds 127.0.0.1 port 0 (the kernel picks a free port) with its own temporary
//! data folder; the port and server key are read from the line hopd prints at start.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hop_protocol::client::{Client, ServerTrust};
use hop_protocol::keys::parse_hex_key;
use hop_protocol::noise::FRAME_PLAINTEXT_BYTES_MAX;
use hop_protocol::session::{ClientConnection, ClientEvent};
use hop_protocol::wire::{Kind, Stanza};
use hop_protocol::StaticKey;

/// The longest any single wait in these tests may take before the test gives up. A safety
/// stop for a broken server, not a speed requirement: on a healthy server every wait ends in
/// milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `--backend $HOP_TEST_BACKEND` when that variable is set (CI runs the suite once per
/// backend), and `--uring-receive $HOP_TEST_URING_RECEIVE` likewise.
pub fn backend_flags() -> Vec<String> {
    let mut flags = Vec::new();
    for (variable, flag) in [
        ("HOP_TEST_BACKEND", "--backend"),
        ("HOP_TEST_URING_RECEIVE", "--uring-receive"),
    ] {
        if let Ok(value) = std::env::var(variable) {
            if !value.is_empty() {
                flags.push(flag.to_string());
                flags.push(value);
            }
        }
    }
    flags
}

/// A resource limit hopd starts under.
enum Limit {
    /// `RLIMIT_NOFILE`.
    Descriptors(u32),
    /// `RLIMIT_FSIZE`, soft.
    FileBytes(u64),
    /// The file-creation mask hopd inherits.
    Umask(u32),
}

/// A loopback address with a port free at the time of the call, for a hopd that must keep
/// its address across restarts.
/// The abuse limits (`docs/security.md`), and the value that turns each off, which
/// [`abuse_limit_flags`] sets.
const ABUSE_LIMITS: [(&str, &str); 8] = [
    ("--shard-handshakes-per-second", "0"),
    ("--address-handshakes-per-second", "0"),
    ("--address-handshakes-max", "0"),
    ("--address-connections-max", "0"),
    ("--sender-messages-per-second", "0"),
    ("--sender-reads-per-second", "0"),
    ("--queue-sender-percent", "100"),
    ("--shard-queue-sender-percent", "100"),
];

/// The tests stand in for many users from one address (127.0.0.1), open hundreds of
/// connections at once and send thousands of messages a second, which the abuse limits would
/// refuse as floods: each hopd starts with them off, unless the test names one of them (then
/// hopd's defaults apply to the others: `tests/flood.rs`).
fn abuse_limit_flags(flags: &[&str]) -> Vec<&'static str> {
    if flags
        .iter()
        .any(|flag| ABUSE_LIMITS.iter().any(|(limit, _)| limit == flag))
    {
        return Vec::new();
    }
    ABUSE_LIMITS
        .iter()
        .flat_map(|(flag, off)| [*flag, *off])
        .collect()
}

pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").to_string()
}

pub struct Hopd {
    child: Option<Child>,
    pub addr: String,
    pub server_key: [u8; 32],
    pub data: PathBuf,
    /// The admin listener's address (each hopd picks a free port).
    pub admin: String,
    /// The status line hopd printed at start.
    pub banner: String,
    _folder: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Hopd {
    /// Starts hopd with a fresh data folder and the given extra flags.
    pub fn start(flags: &[&str]) -> Self {
        let folder = tempfile::tempdir().expect("temporary folder");
        let data = folder.path().join("data");
        let mut hopd = Self::start_in(&data, flags);
        hopd._folder = Some(folder);
        hopd
    }

    /// Starts hopd with a fresh data folder under an open-file limit of `descriptors`.
    pub fn start_with_fd_limit(descriptors: u32, flags: &[&str]) -> Self {
        let folder = tempfile::tempdir().expect("temporary folder");
        let data = folder.path().join("data");
        let limit = Limit::Descriptors(descriptors);
        let mut hopd = Self::launch(&data, "127.0.0.1:0", flags, Some(limit));
        hopd._folder = Some(folder);
        hopd
    }

    /// Starts hopd on an existing data folder (restarts).
    pub fn start_in(data: &Path, flags: &[&str]) -> Self {
        Self::launch(data, "127.0.0.1:0", flags, None)
    }

    /// Starts hopd on an existing data folder at a fixed address, so that clients that lost
    /// their connection to an earlier hopd find the new one.
    pub fn start_at(data: &Path, listen: &str, flags: &[&str]) -> Self {
        Self::launch(data, listen, flags, None)
    }

    /// Starts hopd on `data` with files limited to `bytes` (`RLIMIT_FSIZE`, soft limit only:
    /// [`Hopd::lift_file_size_limit`] raises it again while hopd runs).
    /// Starts hopd in `data` as a shell with file-creation mask `mask` would.
    pub fn start_with_umask(data: &Path, mask: u32, flags: &[&str]) -> Self {
        Self::launch(data, "127.0.0.1:0", flags, Some(Limit::Umask(mask)))
    }

    pub fn start_with_file_size_limit(data: &Path, bytes: u64, flags: &[&str]) -> Self {
        Self::launch(data, "127.0.0.1:0", flags, Some(Limit::FileBytes(bytes)))
    }

    /// Lifts the file-size limit of a hopd started with one.
    pub fn lift_file_size_limit(&self) {
        let status = Command::new("prlimit")
            .arg(format!("--pid={}", self.pid()))
            .arg("--fsize=unlimited:unlimited")
            .status()
            .expect("prlimit runs");
        assert!(status.success(), "prlimit failed: {status:?}");
    }

    /// Starts hopd with a fresh data folder and these variables in its environment.
    pub fn start_with_env(flags: &[&str], env: &[(&str, &str)]) -> Self {
        let folder = tempfile::tempdir().expect("temporary folder");
        let data = folder.path().join("data");
        let mut hopd = Self::launch_with(&data, "127.0.0.1:0", flags, None, env);
        hopd._folder = Some(folder);
        hopd
    }

    fn launch(data: &Path, listen: &str, flags: &[&str], limit: Option<Limit>) -> Self {
        Self::launch_with(data, listen, flags, limit, &[])
    }

    /// Starts a second hopd on this one's data folder with `--takeover`: it takes over this
    /// one's sockets and connections, and this one exits. Its log is a file of its own.
    pub fn take_over(&self, flags: &[&str]) -> Self {
        let mut flags = flags.to_vec();
        flags.push("--takeover");
        Self::launch_logged(
            &self.data,
            &self.addr,
            &flags,
            None,
            &[],
            self.data.with_extension("next.log"),
        )
    }

    fn launch_with(
        data: &Path,
        listen: &str,
        flags: &[&str],
        limit: Option<Limit>,
        env: &[(&str, &str)],
    ) -> Self {
        Self::launch_logged(data, listen, flags, limit, env, data.with_extension("log"))
    }

    fn launch_logged(
        data: &Path,
        listen: &str,
        flags: &[&str],
        limit: Option<Limit>,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Self {
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).expect("log folder");
        }
        let stderr = File::create(&log).expect("log file");
        let copy_log = matches!(limit, Some(Limit::FileBytes(_)));
        let mut command = match limit {
            // The shell lowers the limit, then becomes hopd.
            Some(Limit::Descriptors(limit)) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_hopd"));
                shell
            }
            Some(Limit::Umask(mask)) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_hopd"));
                shell
            }
            // prlimit lowers the soft limit only, so that it can be raised again later.
            Some(Limit::FileBytes(bytes)) => {
                let mut prlimit = Command::new("prlimit");
                prlimit
                    .arg(format!("--fsize={bytes}:unlimited"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_hopd"));
                prlimit
            }
            None => Command::new(env!("CARGO_BIN_EXE_hopd")),
        };
        let mut child = command
            .envs(env.iter().copied())
            .args(["--listen", listen, "--data"])
            .arg(data)
            // Unpinned unless a test asks: a test binary runs many hopds at once.
            .args(if flags.contains(&"--pin-cores") {
                &[][..]
            } else {
                &["--pin-cores", "false"][..]
            })
            .args(["--log", "info"])
            // A free admin port each, and a stop that sends every client away at once, as
            // the tests expect of SIGTERM (the drain tests set their own window).
            .args(["--admin", "127.0.0.1:0"])
            .args(if flags.contains(&"--drain-ms") {
                &[][..]
            } else {
                &["--drain-ms", "0"][..]
            })
            .args(backend_flags())
            .args(abuse_limit_flags(flags))
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(if copy_log {
                Stdio::piped()
            } else {
                Stdio::from(stderr.try_clone().expect("log file"))
            })
            .spawn()
            .expect("hopd starts");
        if copy_log {
            // hopd's file-size limit would apply to a log file it writes itself: the log goes
            // through a pipe, copied here.
            let mut from = child.stderr.take().expect("stderr");
            let mut to = stderr;
            std::thread::spawn(move || std::io::copy(&mut from, &mut to));
        }
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("hopd prints its address");
        let (addr, server_key, admin) = parse_banner(&line).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "hopd did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Self {
            child: Some(child),
            addr,
            server_key,
            admin,
            data: data.to_path_buf(),
            banner: line.trim_end().to_string(),
            _folder: None,
            log,
        }
    }

    pub fn trust(&self) -> ServerTrust {
        ServerTrust::Pinned(self.server_key)
    }

    /// Connects and authenticates as `key`.
    pub fn connect(&self, key: &StaticKey) -> Client {
        Client::connect(&self.addr, key, &self.trust(), PATIENCE).expect("client connects")
    }

    /// A new user that has connected once (so others may send to it), and its open client.
    pub fn new_user(&self) -> (StaticKey, Client) {
        let key = StaticKey::generate().expect("key");
        let mut client = self.connect(&key);
        ping(&mut client); // the server has bound the key when it answers
        (key, client)
    }

    /// The text of hopd's `/metrics` (Prometheus) from its admin listener.
    pub fn metrics(&self) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(PATIENCE))
            .build()
            .into();
        agent
            .get(format!("http://{}/metrics", self.admin))
            .call()
            .expect("hopd answers /metrics")
            .body_mut()
            .read_to_string()
            .expect("a text body")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        wait_with_patience(&mut child)
    }

    /// Sends SIGTERM, waits for the exit, and returns the whole log.
    pub fn stop_with_log(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = wait_with_patience(&mut child);
        (status, self.log())
    }

    /// Waits for hopd to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_with_patience(&mut child)
    }

    /// Kills hopd with SIGKILL (no chance to write or say anything) and waits for it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        wait_with_patience(&mut child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Hopd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn parse_banner(line: &str) -> Option<(String, [u8; 32], String)> {
    // "hopd listening on ADDR with N shard(s); server key HEX; data DIR; ceiling N connections
    // (WHY); admin ADDR"
    let addr = line
        .strip_prefix("hopd listening on ")?
        .split_whitespace()
        .next()?;
    let key = line.split("server key ").nth(1)?.split(';').next()?;
    let admin = line.split("; admin ").nth(1)?.trim();
    Some((
        addr.to_string(),
        parse_hex_key(key.trim())?,
        admin.to_string(),
    ))
}

pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal hopd");
}

pub fn wait_with_patience(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The next stanza, or a panic naming what was awaited.
pub fn expect_stanza(client: &mut Client, what: &str) -> Stanza {
    match client.recv(PATIENCE) {
        Ok(Some(stanza)) => stanza,
        Ok(None) => panic!("no {what} from the server"),
        Err(error) => panic!("waiting for {what}: {error}"),
    }
}

/// The next stanza of the kind `pick` accepts; others are skipped.
pub fn expect_kind<T>(client: &mut Client, what: &str, pick: impl Fn(Kind) -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no {what} from the server");
        let stanza = expect_stanza(client, what);
        if let Some(found) = stanza.kind.and_then(&pick) {
            return found;
        }
    }
}

/// Sends `body` from `from` to `to` (whose id is `to_id`), waits for its Deliver and acks it:
/// how long the delivery took.
pub fn timed_delivery(
    from: &mut Client,
    to: &mut Client,
    to_id: hop_protocol::UserId,
    body: &[u8],
) -> Duration {
    let sent = Instant::now();
    from.send_message(to_id, body).expect("send");
    let deliver = expect_kind(to, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    });
    let took = sent.elapsed();
    to.ack_deliver(deliver.id).expect("ack");
    took
}

/// A round trip through the user's home shard: when the Pong is back, everything sent before
/// the Ping was handled.
pub fn ping(client: &mut Client) {
    client
        .send(&Stanza::of(Kind::Ping(hop_protocol::wire::Ping {
            nonce: 42,
        })))
        .expect("ping");
    expect_kind(client, "Pong", |kind| match kind {
        Kind::Pong(pong) => Some(pong.nonce),
        _ => None,
    });
}

/// Everything the server sends before the answer to a Ping: what was waiting for the client
/// (a round trip through its home shard pushes whatever is queued for it first).
pub fn before_pong(client: &mut Client) -> Vec<Stanza> {
    client
        .send(&Stanza::of(Kind::Ping(hop_protocol::wire::Ping {
            nonce: 43,
        })))
        .expect("ping");
    let mut before = Vec::new();
    loop {
        let stanza = expect_stanza(client, "Pong");
        if matches!(stanza.kind, Some(Kind::Pong(_))) {
            return before;
        }
        before.push(stanza);
    }
}

/// True once the server closed the connection (end of stream), reading and dropping anything
/// before it.
pub fn closed_by_server(client: &mut Client) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match client.recv(Duration::from_millis(200)) {
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A new key whose user's home is `shard` of `shards`.
pub fn key_on(shard: u16, shards: u16) -> StaticKey {
    loop {
        let key = StaticKey::generate().expect("key");
        if hop_router::home_shard(key.user_id(), shards) == shard {
            return key;
        }
    }
}

/// A client driven by hand, a handshake message or a frame at a time, so that a test decides
/// when each leaves (many clients' message 1s at the same moment, stanzas right behind a last
/// handshake message); counts the Pongs it reads.
pub struct RawClient {
    pub stream: TcpStream,
    pub session: ClientConnection,
    /// Bytes to send next.
    pub out: Vec<u8>,
    pub pongs: usize,
}

impl RawClient {
    pub fn start(hopd: &Hopd) -> Self {
        let stream = TcpStream::connect(&hopd.addr).expect("connect");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        let key = StaticKey::generate().expect("key");
        let mut out = Vec::new();
        let session = ClientConnection::start(&key, Some(hopd.server_key), &mut out);
        Self {
            stream,
            session,
            out,
            pongs: 0,
        }
    }

    pub fn send(&mut self) {
        self.stream.write_all(&self.out).expect("send");
        self.out.clear();
    }

    /// Reads until `done`, counting Pongs.
    pub fn read_until(&mut self, done: impl Fn(&Self) -> bool) {
        let mut scratch = vec![0u8; FRAME_PLAINTEXT_BYTES_MAX];
        let mut buffer = [0u8; 4096];
        while !done(self) {
            let read = self.stream.read(&mut buffer).expect("read");
            assert!(read > 0, "hopd closed the connection");
            let mut pongs = 0;
            self.session
                .handle_input::<()>(&buffer[..read], &mut scratch, &mut self.out, &mut |event| {
                    if let ClientEvent::Stanza(stanza) = event {
                        pongs += usize::from(matches!(stanza.kind, Some(Kind::Pong(_))));
                    }
                    Ok(())
                })
                .expect("hopd's frames decrypt");
            self.pongs += pongs;
        }
    }
}

/// The frames (2-byte length, then the body) that `bytes` holds, each whole.
pub fn frames_of(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        let length = 2 + usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        let (frame, rest) = bytes.split_at(length);
        frames.push(frame);
        bytes = rest;
    }
    frames
}
