//! The generator's event loop: one mio poll driving many non-blocking client sockets.
//!
//! Call order: [`Engine::open`] connections, queue work on them ([`Engine::send_hop`],
//! [`Engine::publish`], [`Engine::change_group`], [`Engine::ping`]), then call
//! [`Engine::turn`], which writes what was queued, waits for readiness, reads, and returns what
//! happened to each connection. Repeat.
//! Writes are batched: everything queued on a connection in one turn goes out in one frame and
//! one `write` where the socket takes it.
//!
//! Redirects: a hop connection sent away by a node of a cluster (GoAway REDIRECT, before or
//! after it opened) connects again to the address it names, from the same source address,
//! pins the key it names, and runs the handshake and the home check again, under the same
//! index; the scenario sees one [`Event::Opened`] once it is home. At most
//! [`REDIRECTS_MAX`] per client; the next fails it ([`Failure::TooManyRedirects`]).
//!
//! Spread: a run may name several servers (the nodes of a cluster, or hopds holding more
//! connections than one may). The k-th connection an engine opens is client
//! `first_client + k` of the run, and its first connect goes to server
//! `(first_client + k) mod n`, pinned to that server's key ([`first_server`]); redirects
//! are followed from there as above, so where a client ends does not depend on where it
//! started, only how many redirects it takes. [`Engine::spread`] counts, per server, the
//! connections opened to it first and how many of those were redirected.
//!
//! A server's limits are waited out, not failed, and counted for the report (a benchmark
//! against a limiting server measures the limits). A connection refused at admission waits
//! the refusal's `retry_after_ms` plus up to a quarter more at random (so the refused do not
//! come back together) and connects again from the same source address, under the same index,
//! while its connect timeout allows ([`Engine::set_connect_timeout`]; past it,
//! [`Failure::AdmissionRefused`]); counted by reason in [`Engine::admission_refused`]. A Send
//! refused for the sender's rate (`RATE_LIMITED`) is held with that sender's later sends
//! until the wait it names has passed, then sent again first; counted in
//! [`Engine::rate_limited`]. From then on that sender sends one message at a time, the next
//! once the server answered the last: a window sent again whole would be refused but for its
//! first message, and a message sent behind a refused one may overtake it when a token
//! refills in between, which the scenarios count as lost. Its rate is then at most one
//! message per round trip, above hopd's sender rates. Neither costs a turn anything while no
//! limit is hit.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use hop_protocol::client::REDIRECTS_MAX;
use hop_protocol::keys::{StaticKey, KEY_BYTES};
use hop_protocol::noise::Refusal;
use hop_protocol::wire::GroupChange;
use hop_protocol::UserId;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use crate::addr::{self, SourcePlan};
use crate::conn::{frame_scratch, ConnError, Event, HopClient, MqttClient, Redirect};

/// Bytes read from a socket at once.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Readiness events taken from one poll.
const EVENTS_PER_POLL_MAX: usize = 4096;
/// A connection's write buffer is released above this size once drained.
const OUT_CAPACITY_KEPT_BYTES: usize = 16 * 1024;
/// MQTT keep-alive announced to brokers, in seconds; the scenarios ping well inside it.
pub const MQTT_KEEP_ALIVE_S: u16 = 120;
/// Messages a hop client holds while it follows a redirect, sent once it is home again; past
/// this they are dropped (and the scenario finds them lost). The scenarios' windows are far
/// below it.
const HELD_SENDS_MAX: usize = 4096;
/// Redirect addresses resolved once and kept, so that thousands of clients sent to the same
/// node do not each resolve its name; past this many distinct addresses, each is resolved
/// again.
const RESOLVED_ADDRESSES_MAX: usize = 64;
/// How long a connection may take to open, refusals at admission waited out included, unless
/// the scenario sets its own ([`Engine::set_connect_timeout`]): the scenarios' setup timeout.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// Which server protocol the generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// hop: Noise XX handshake, then stanzas. With `delivered_in_ack`, each sender's Outbox
    /// asks for the second tick in the ServerAck when the recipient's Ack comes first.
    Hop { delivered_in_ack: bool },
    /// Any MQTT 3.1.1 broker; with `login`, each client logs in as its client id. `qos` (0 or
    /// 1) is what `throughput`, `latency` and `group` publish and subscribe with.
    Mqtt { login: bool, qos: u8 },
}

/// A server the generator connects clients to first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    pub address: SocketAddr,
    /// hop: the server's static key, checked at the handshake; `None` accepts any key. A
    /// redirect pins the key it names instead.
    pub pin: Option<[u8; KEY_BYTES]>,
}

/// The index, among `servers` servers, of the server that client `client` of the run connects
/// to first: round robin by the client's index. The scenarios open their clients in order, so
/// consecutive clients (a `throughput` pair, a group's members) start on different servers and
/// the servers' shares of the first handshakes differ by at most one. Nothing better is known
/// before the handshake: a client's home is placed by the cluster, and a client that starts
/// away from it is redirected wherever it starts.
pub fn first_server(client: u64, servers: usize) -> usize {
    assert!(servers > 0, "at least one server");
    let server = (client % servers as u64) as usize;
    debug_assert!(server < servers);
    server
}

/// The connections a generator opened to one server first (not the connects that follow a
/// redirect or a refusal at admission), and how many of them were redirected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpread {
    /// The server's address, as given.
    pub server: String,
    /// Connections whose first connect went to this server.
    pub first_connects: u64,
    /// Of those, the ones sent to another node with a GoAway REDIRECT (each once, however
    /// often it was redirected; [`Engine::redirects`] counts every redirect).
    pub redirected: u64,
}

impl ServerSpread {
    /// Adds `from`'s counts into `into`, server by server (a server `into` lacks is added in
    /// `from`'s order): the sum over engines or generator processes.
    pub fn add(into: &mut Vec<ServerSpread>, from: &[ServerSpread]) {
        for spread in from {
            match into.iter_mut().find(|known| known.server == spread.server) {
                Some(known) => {
                    known.first_connects += spread.first_connects;
                    known.redirected += spread.redirected;
                }
                None => into.push(spread.clone()),
            }
        }
    }
}

/// Who a new connection is.
#[derive(Debug)]
pub enum Identity {
    Hop(StaticKey),
    Mqtt {
        client_id: String,
        clean_session: bool,
        subscribe: Option<(String, u8)>,
    },
}

/// Why a connection ended or never opened, as the benchmark reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The server refused the TCP connection (nothing listening, backlog full).
    Refused,
    /// The server reset the connection.
    Reset,
    /// The server closed the connection (EOF).
    Closed,
    /// The connection or handshake took longer than allowed.
    Timeout,
    /// The generator ran out of something: descriptors, ports, memory.
    GeneratorLimit,
    /// The server broke the protocol (bad handshake, bad frame).
    Protocol,
    /// The server refused the connection at admission, and waiting as long as it asked would
    /// pass the connect timeout. (Refusals waited out are counted apart, not as failures.)
    AdmissionRefused,
    /// A GoAway REDIRECT that cannot be followed: a key that is not 32 bytes, no address, or
    /// one that does not resolve to an IPv4 address.
    BadRedirect,
    /// Redirected more than [`REDIRECTS_MAX`] times: the cluster's nodes disagree about
    /// where the user lives.
    TooManyRedirects,
    /// Any other socket error.
    Other,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Closed => "closed",
            Self::Timeout => "timeout",
            Self::GeneratorLimit => "generator_limit",
            Self::Protocol => "protocol",
            Self::AdmissionRefused => "admission_refused",
            Self::BadRedirect => "bad_redirect",
            Self::TooManyRedirects => "too_many_redirects",
            Self::Other => "other",
        }
    }

    pub fn of_io(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED) => Self::Reset,
            Some(libc::ETIMEDOUT) => Self::Timeout,
            Some(
                libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM,
            ) => Self::GeneratorLimit,
            _ => Self::Other,
        }
    }

    /// A connection whose input was rejected.
    pub fn of_conn(error: &ConnError) -> Self {
        match error {
            ConnError::BadRedirect(_) => Self::BadRedirect,
            _ => Self::Protocol,
        }
    }
}

/// What happened to connection `index` in a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Event(Event),
    /// The connection is gone; its index is not used again.
    Failed(Failure),
}

// Nearly every connection spends its life as `Hop` or `Mqtt`; boxing the client would add a
// pointer chase on every send and read to save bytes only while a connection is connecting.
#[allow(clippy::large_enum_variant)]
enum State {
    Connecting(Identity),
    Hop(HopClient),
    Mqtt(MqttClient),
}

struct Connection {
    stream: TcpStream,
    state: State,
    out: Vec<u8>,
    queued: bool,
    /// Where the plan put this client; a redirected connection keeps it.
    source: Ipv4Addr,
    /// The index of the server this client connected to first, for [`Engine::spread`].
    first_server: usize,
    /// The server key to pin: its first server's, or the one the last REDIRECT named.
    pin: Option<[u8; KEY_BYTES]>,
    /// REDIRECTs followed by this client.
    redirects: usize,
    /// hop sends queued while the client is not home (it follows a redirect) or waits out
    /// its rate; sent once it is home and the wait has passed, at most [`HELD_SENDS_MAX`].
    held: VecDeque<(UserId, Bytes)>,
    /// Where this client connects: the target, or the node the last REDIRECT named.
    server: SocketAddr,
    /// Past this, a refusal at admission is not waited out.
    connect_deadline: Instant,
    /// hop sends the server refused for the sender's rate, in the order sent; sent again,
    /// before `held`, once `rate_wait_until` has passed.
    rate_limited: VecDeque<(UserId, Bytes)>,
    rate_wait_until: Option<Instant>,
    /// Since its first refusal for its rate: sends one message at a time, for good (a message
    /// sent behind one that is refused may overtake it).
    paced: bool,
}

impl Connection {
    /// Takes the hop client out of a connection that is to connect again (refused at
    /// admission, or redirected); its state is `Connecting` until the caller sets the new one.
    fn take_hop_client(&mut self) -> HopClient {
        let placeholder = State::Connecting(Identity::Mqtt {
            client_id: String::new(),
            clean_session: true,
            subscribe: None,
        });
        let State::Hop(client) = std::mem::replace(&mut self.state, placeholder) else {
            unreachable!("only a hop client is refused at admission or redirected");
        };
        client
    }

    /// Sends what a hop client holds once it is home and not waiting out its rate: the
    /// messages refused for its rate first, in the order sent, then those queued meanwhile.
    /// Paced, one and only when every message sent before it was answered.
    fn send_held(&mut self) {
        if self.held.is_empty() && self.rate_limited.is_empty() {
            return;
        }
        let State::Hop(client) = &mut self.state else {
            return;
        };
        if !client.is_open() || self.rate_wait_until.is_some() {
            return;
        }
        if !self.paced {
            for (to, body) in self.rate_limited.drain(..).chain(self.held.drain(..)) {
                client.send(to, body, &mut self.out);
            }
            return;
        }
        if client.unanswered() > 0 {
            return;
        }
        let next = self
            .rate_limited
            .pop_front()
            .or_else(|| self.held.pop_front());
        if let Some((to, body)) = next {
            client.send(to, body, &mut self.out);
        }
    }
}

/// What a connection waits for, to be woken by [`Engine::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Refused at admission: connect again.
    Reconnect,
    /// Past its rate: send what it holds once its wait has passed.
    Resume,
}

pub struct Engine {
    poll: Poll,
    events: Events,
    target: Target,
    servers: Vec<Server>,
    /// The run's index of this engine's first client, for [`first_server`].
    first_client: u64,
    plan: SourcePlan,
    opened_total: u64,
    connections: Vec<Option<Connection>>,
    queued: Vec<usize>,
    read_buffer: Vec<u8>,
    scratch: Vec<u8>,
    pending: Vec<(usize, Outcome)>,
    resolved: BTreeMap<String, SocketAddr>,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Connections a server sent away with a GoAway REDIRECT that were followed (a client
    /// redirected twice counts twice).
    pub redirects: u64,
    /// Per server, in the order given: connections opened to it first, and how many of them
    /// were redirected.
    pub spread: Vec<ServerSpread>,
    /// Why the first redirect that could not be followed could not, for the report.
    pub bad_redirect: Option<String>,
    /// Refusals at admission waited out (each connected again), by reason (`busy`,
    /// `address_rate`, ...); a connection refused twice counts twice.
    pub admission_refused: BTreeMap<&'static str, u64>,
    /// hop Sends the server refused for the sender's rate (`RATE_LIMITED`) and that were sent
    /// again after the wait; a message refused twice counts twice.
    pub rate_limited: u64,
    connect_timeout: Duration,
    /// (when, connection, what for): connections waiting out a limit. Empty while no server
    /// limits the generator, so a turn then only checks that it is empty.
    wakes: Vec<(Instant, usize, Wake)>,
}

impl Engine {
    /// An engine whose k-th connection is client `first_client + k` of the run and connects
    /// first to `servers[first_server(first_client + k, servers.len())]`.
    pub fn new(
        target: Target,
        servers: Vec<Server>,
        first_client: u64,
        plan: SourcePlan,
    ) -> io::Result<Self> {
        assert!(!servers.is_empty(), "at least one server");
        let spread = servers
            .iter()
            .map(|server| ServerSpread {
                server: server.address.to_string(),
                ..ServerSpread::default()
            })
            .collect();
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS_PER_POLL_MAX),
            target,
            servers,
            first_client,
            plan,
            opened_total: 0,
            connections: Vec::new(),
            queued: Vec::new(),
            read_buffer: vec![0u8; READ_BUFFER_BYTES],
            scratch: frame_scratch(),
            pending: Vec::new(),
            resolved: BTreeMap::new(),
            bytes_written: 0,
            bytes_read: 0,
            redirects: 0,
            spread,
            bad_redirect: None,
            admission_refused: BTreeMap::new(),
            rate_limited: 0,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            wakes: Vec::new(),
        })
    }

    /// How long a connection may take to open from [`Engine::open`], refusals at admission
    /// waited out included: a refusal whose wait would pass it fails the connection
    /// ([`Failure::AdmissionRefused`]).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    pub fn target(&self) -> Target {
        self.target
    }

    /// Starts a connection from the next source address of the plan to the next server of the
    /// spread ([`first_server`]). Its index names it in every outcome. A failure to even
    /// create the socket is returned at once (and counts as a first connect to its server).
    pub fn open(&mut self, identity: Identity) -> Result<usize, Failure> {
        if self.opened_total >= self.plan.budget() {
            return Err(Failure::GeneratorLimit);
        }
        let source = self.plan.source(self.opened_total);
        let first = first_server(self.first_client + self.opened_total, self.servers.len());
        self.opened_total += 1;
        self.spread[first].first_connects += 1;
        let index = self.connections.len();
        let Server {
            address: server,
            pin,
        } = self.servers[first];
        let stream = self.connect(index, source, server)?;
        self.connections.push(Some(Connection {
            stream,
            state: State::Connecting(identity),
            out: Vec::new(),
            queued: false,
            source,
            first_server: first,
            pin,
            redirects: 0,
            held: VecDeque::new(),
            server,
            connect_deadline: Instant::now() + self.connect_timeout,
            rate_limited: VecDeque::new(),
            rate_wait_until: None,
            paced: false,
        }));
        Ok(index)
    }

    /// A socket from `source` connecting to `server`, registered as connection `index`.
    fn connect(
        &self,
        index: usize,
        source: Ipv4Addr,
        server: SocketAddr,
    ) -> Result<TcpStream, Failure> {
        let mut stream =
            addr::connect_from(source, server).map_err(|error| Failure::of_io(&error))?;
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|error| Failure::of_io(&error))?;
        Ok(stream)
    }

    /// True while connection `index` is authenticated and usable.
    pub fn is_open(&self, index: usize) -> bool {
        match self.connections.get(index).and_then(Option::as_ref) {
            Some(connection) => match &connection.state {
                State::Hop(client) => client.is_open(),
                State::Mqtt(client) => client.is_open(),
                State::Connecting(_) => false,
            },
            None => false,
        }
    }

    /// Queues a hop message from the connection's outbox; ignored unless `index` is a hop
    /// connection. While it is not home (it follows a redirect, or waits out a refusal at
    /// admission) or waits out its rate, the message is held and sent once it can be.
    pub fn send_hop(&mut self, index: usize, to: UserId, body: Bytes) {
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        match &mut connection.state {
            State::Hop(client) if client.is_open() && !connection.paced => {
                client.send(to, body, &mut connection.out)
            }
            State::Hop(_) | State::Connecting(Identity::Hop(_)) => {
                if connection.held.len() < HELD_SENDS_MAX {
                    connection.held.push_back((to, body));
                }
                if !connection.paced {
                    return;
                }
                connection.send_held();
            }
            _ => return,
        }
        if !connection.queued {
            connection.queued = true;
            self.queued.push(index);
        }
    }

    /// Queues an MQTT PUBLISH; ignored unless `index` is an open MQTT connection.
    pub fn publish(&mut self, index: usize, topic: &str, payload: &[u8], qos: u8) {
        self.with(index, |state, out| {
            if let State::Mqtt(client) = state {
                client.publish(topic, payload, qos, out);
            }
        });
    }

    /// Queues a hop group change; ignored unless `index` is an open hop connection.
    pub fn change_group(&mut self, index: usize, change: GroupChange) {
        self.with(index, |state, out| {
            if let State::Hop(client) = state {
                client.change_group(change, out);
            }
        });
    }

    /// Queues a heartbeat (hop Ping, MQTT PINGREQ).
    pub fn ping(&mut self, index: usize, nonce: u64) {
        self.with(index, |state, out| match state {
            State::Hop(client) => client.ping(nonce, out),
            State::Mqtt(client) => client.ping(out),
            State::Connecting(_) => {}
        });
    }

    /// Closes connection `index` (an MQTT client says DISCONNECT first, so its session is
    /// kept as a persistent one rather than treated as a lost client).
    pub fn close(&mut self, index: usize) {
        if let Some(mut connection) = self.connections.get_mut(index).and_then(Option::take) {
            if let State::Mqtt(_) = connection.state {
                let mut bye = Vec::new();
                crate::mqtt::disconnect(&mut bye);
                connection.out.extend_from_slice(&bye);
                let _ = connection.stream.write(&connection.out);
            }
            let _ = self.poll.registry().deregister(&mut connection.stream);
        }
    }

    fn with(&mut self, index: usize, work: impl FnOnce(&mut State, &mut Vec<u8>)) {
        if let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) {
            work(&mut connection.state, &mut connection.out);
            if !connection.queued {
                connection.queued = true;
                self.queued.push(index);
            }
        }
    }

    /// Writes everything queued, waits up to `timeout` for readiness, handles it, and appends
    /// each connection's outcomes to `outcomes`.
    pub fn turn(
        &mut self,
        timeout: Option<Duration>,
        outcomes: &mut Vec<(usize, Outcome)>,
    ) -> io::Result<()> {
        let mut timeout = timeout;
        if !self.wakes.is_empty() {
            timeout = self.wake_due(timeout);
        }
        self.write_queued();
        outcomes.append(&mut self.pending);
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(error) => return Err(error),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|event| {
                (
                    event.token().0,
                    event.is_readable() || event.is_read_closed() || event.is_error(),
                    event.is_writable(),
                )
            })
            .collect();
        for (index, readable, writable) in ready {
            if let Err(failure) = self.handle_ready(index, readable, writable) {
                self.fail(index, failure);
            }
        }
        self.write_queued();
        outcomes.append(&mut self.pending);
        Ok(())
    }

    fn handle_ready(
        &mut self,
        index: usize,
        readable: bool,
        writable: bool,
    ) -> Result<(), Failure> {
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            return Ok(());
        };
        if let State::Connecting(_) = connection.state {
            if let Some(error) = connection
                .stream
                .take_error()
                .map_err(|e| Failure::of_io(&e))?
            {
                return Err(Failure::of_io(&error));
            }
            match connection.stream.peer_addr() {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(error) => return Err(Failure::of_io(&error)),
            }
            let State::Connecting(identity) = std::mem::replace(
                &mut connection.state,
                State::Mqtt(MqttClient::start("", true, None, 0, false, &mut Vec::new())),
            ) else {
                unreachable!("matched above");
            };
            connection.state = match (identity, self.target) {
                (Identity::Hop(key), Target::Hop { delivered_in_ack }) => {
                    // Only the outbox's random id can fail: the generator's own limit.
                    let mut client = HopClient::start(key, connection.pin, &mut connection.out)
                        .map_err(|_| Failure::GeneratorLimit)?;
                    client.set_delivered_in_ack(delivered_in_ack);
                    State::Hop(client)
                }
                (
                    Identity::Mqtt {
                        client_id,
                        clean_session,
                        subscribe,
                    },
                    Target::Mqtt { login, .. },
                ) => State::Mqtt(MqttClient::start(
                    &client_id,
                    clean_session,
                    subscribe,
                    MQTT_KEEP_ALIVE_S,
                    login,
                    &mut connection.out,
                )),
                _ => panic!("identity does not match the target"),
            };
            if !connection.queued {
                connection.queued = true;
                self.queued.push(index);
            }
        } else if writable && !connection.out.is_empty() && !connection.queued {
            connection.queued = true;
            self.queued.push(index);
        }
        if !readable {
            return Ok(());
        }
        loop {
            let bytes = match connection.stream.read(&mut self.read_buffer) {
                Ok(0) => return Err(Failure::Closed),
                Ok(bytes) => bytes,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(Failure::of_io(&error)),
            };
            self.bytes_read += bytes as u64;
            let input = &self.read_buffer[..bytes];
            let pending = &mut self.pending;
            let mut on_event = |event| pending.push((index, Outcome::Event(event)));
            let result: Result<(), ConnError> = match &mut connection.state {
                State::Hop(client) => client.handle_input(
                    input,
                    &mut self.scratch,
                    &mut connection.out,
                    &mut on_event,
                ),
                State::Mqtt(client) => {
                    client.handle_input(input, &mut connection.out, &mut on_event)
                }
                State::Connecting(_) => Ok(()),
            };
            if let Err(error) = result {
                if let Some(refusal) = error.refusal() {
                    return self.wait_out_refusal(index, refusal);
                }
                if let (ConnError::BadRedirect(why), None) = (&error, &self.bad_redirect) {
                    self.bad_redirect = Some(why.clone());
                }
                return Err(Failure::of_conn(&error));
            }
            if let State::Hop(client) = &mut connection.state {
                if client.is_redirected() {
                    break;
                }
                let mut refused = VecDeque::new();
                if let Some(wait_ms) = client.take_rate_limited(&mut refused) {
                    self.rate_limited += refused.len() as u64;
                    // Sent before all that is still held: they go first, in the order sent.
                    refused.append(&mut connection.rate_limited);
                    connection.rate_limited = refused;
                    connection.paced = true;
                    let until = Instant::now() + Duration::from_millis(wait_ms);
                    match connection.rate_wait_until {
                        Some(waiting) => connection.rate_wait_until = Some(waiting.max(until)),
                        None => {
                            connection.rate_wait_until = Some(until);
                            self.wakes.push((until, index, Wake::Resume));
                        }
                    }
                }
            }
            connection.send_held();
            if !connection.queued {
                connection.queued = true;
                self.queued.push(index);
            }
        }
        self.follow_redirect(index)
    }

    /// Connection `index` was refused at admission: counts the refusal and, if its connect
    /// timeout allows, closes the socket and connects again once the refusal's wait and up to a
    /// quarter more at random have passed (the key, source, server and pin stay).
    fn wait_out_refusal(&mut self, index: usize, refusal: Refusal) -> Result<(), Failure> {
        *self
            .admission_refused
            .entry(refusal.reason.name())
            .or_default() += 1;
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            return Ok(());
        };
        let at = Instant::now() + refusal.wait();
        if at >= connection.connect_deadline {
            return Err(Failure::AdmissionRefused);
        }
        let client = connection.take_hop_client();
        let (key, _) = client.into_redirect();
        connection.state = State::Connecting(Identity::Hop(key));
        connection.out.clear();
        let _ = self.poll.registry().deregister(&mut connection.stream);
        self.wakes.push((at, index, Wake::Reconnect));
        Ok(())
    }

    /// Wakes the connections whose wait has passed; returns `timeout`, shortened to the next
    /// wait's end.
    fn wake_due(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let now = Instant::now();
        let mut wakes = std::mem::take(&mut self.wakes);
        wakes.retain(|&(at, index, wake)| {
            if at > now {
                return true;
            }
            match wake {
                Wake::Reconnect => self.reconnect(index),
                Wake::Resume => self.resume(index, now),
            }
            false
        });
        // Wakes pushed meanwhile (a resume deferred to a later wait) join the others.
        wakes.append(&mut self.wakes);
        self.wakes = wakes;
        let next = self.wakes.iter().map(|&(at, ..)| at).min();
        match (next, timeout) {
            (Some(at), Some(timeout)) => Some(timeout.min(at.saturating_duration_since(now))),
            (Some(at), None) => Some(at.saturating_duration_since(now)),
            (None, timeout) => timeout,
        }
    }

    /// Connection `index` waited out a refusal at admission: connects again (a closed
    /// connection is skipped).
    fn reconnect(&mut self, index: usize) {
        let Some(connection) = self.connections.get(index).and_then(Option::as_ref) else {
            return;
        };
        let (source, server) = (connection.source, connection.server);
        match self.connect(index, source, server) {
            Ok(stream) => {
                if let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) {
                    connection.stream = stream;
                }
            }
            Err(failure) => self.fail(index, failure),
        }
    }

    /// Connection `index` may send again if its rate's wait has passed (a later refusal may
    /// have lengthened it, then it waits on): sends what it holds.
    fn resume(&mut self, index: usize, now: Instant) {
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        match connection.rate_wait_until {
            Some(until) if until > now => {
                self.wakes.push((until, index, Wake::Resume));
                return;
            }
            _ => connection.rate_wait_until = None,
        }
        connection.send_held();
        if !connection.queued {
            connection.queued = true;
            self.queued.push(index);
        }
    }

    /// Connection `index`'s server sent it away: connects again where the REDIRECT points,
    /// from the same source address, with the key it named pinned.
    fn follow_redirect(&mut self, index: usize) -> Result<(), Failure> {
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            return Ok(());
        };
        if connection.redirects >= REDIRECTS_MAX {
            return Err(Failure::TooManyRedirects);
        }
        let client = connection.take_hop_client();
        let (key, redirect) = client.into_redirect();
        let Some(Redirect {
            address,
            server_key,
        }) = redirect
        else {
            unreachable!("a redirected client holds its redirect");
        };
        connection.state = State::Connecting(Identity::Hop(key));
        connection.pin = Some(server_key);
        if connection.redirects == 0 {
            self.spread[connection.first_server].redirected += 1;
        }
        connection.redirects += 1;
        // What was queued for the old server (acks, sends) goes with it.
        connection.out.clear();
        let source = connection.source;
        let server = self.resolve(&address)?;
        let stream = self.connect(index, source, server)?;
        let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
            unreachable!("taken above");
        };
        connection.server = server;
        let mut old = std::mem::replace(&mut connection.stream, stream);
        let _ = self.poll.registry().deregister(&mut old);
        self.redirects += 1;
        Ok(())
    }

    /// The IPv4 address a REDIRECT names ("host:port"); the generator's sources are IPv4.
    fn resolve(&mut self, address: &str) -> Result<SocketAddr, Failure> {
        if let Some(server) = self.resolved.get(address) {
            return Ok(*server);
        }
        let server = address
            .to_socket_addrs()
            .ok()
            .and_then(|mut all| all.find(SocketAddr::is_ipv4));
        let Some(server) = server else {
            if self.bad_redirect.is_none() {
                self.bad_redirect = Some(format!("{address} names no IPv4 address"));
            }
            return Err(Failure::BadRedirect);
        };
        if self.resolved.len() < RESOLVED_ADDRESSES_MAX {
            self.resolved.insert(address.to_string(), server);
        }
        Ok(server)
    }

    fn fail(&mut self, index: usize, failure: Failure) {
        if let Some(mut connection) = self.connections.get_mut(index).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut connection.stream);
            self.pending.push((index, Outcome::Failed(failure)));
        }
    }

    fn write_queued(&mut self) {
        let queued = std::mem::take(&mut self.queued);
        for index in queued {
            let Some(connection) = self.connections.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            connection.queued = false;
            if let State::Hop(client) = &mut connection.state {
                client.flush(&mut connection.out);
            }
            let mut written = 0;
            let mut failure = None;
            while written < connection.out.len() {
                match connection.stream.write(&connection.out[written..]) {
                    Ok(bytes) => written += bytes,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) if error.kind() == io::ErrorKind::NotConnected => break,
                    Err(error) => {
                        failure = Some(Failure::of_io(&error));
                        break;
                    }
                }
            }
            self.bytes_written += written as u64;
            connection.out.drain(..written);
            if connection.out.is_empty() && connection.out.capacity() > OUT_CAPACITY_KEPT_BYTES {
                connection.out = Vec::new();
            }
            if let Some(failure) = failure {
                self.fail(index, failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_are_classified() {
        let of = |code| Failure::of_io(&io::Error::from_raw_os_error(code));
        assert_eq!(of(libc::ECONNREFUSED), Failure::Refused);
        assert_eq!(of(libc::ECONNRESET), Failure::Reset);
        assert_eq!(of(libc::EMFILE), Failure::GeneratorLimit);
        assert_eq!(of(libc::EADDRNOTAVAIL), Failure::GeneratorLimit);
        assert_eq!(of(libc::ETIMEDOUT), Failure::Timeout);
        assert_eq!(of(libc::EINVAL), Failure::Other);
    }

    /// A closed port on loopback: the connection is refused, reported once, by kind.
    #[test]
    fn refused_connection_is_reported() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        drop(listener);
        // One port on one source address: a budget of one connection.
        let plan = SourcePlan::new(1, 0, (40000, 40000)).unwrap();
        let server = Server {
            address: server,
            pin: None,
        };
        let mut engine = Engine::new(
            Target::Mqtt {
                login: false,
                qos: 0,
            },
            vec![server],
            0,
            plan,
        )
        .unwrap();
        let identity = Identity::Mqtt {
            client_id: "c".into(),
            clean_session: true,
            subscribe: None,
        };
        let index = engine.open(identity).unwrap();
        let mut outcomes = Vec::new();
        for _ in 0..50 {
            engine
                .turn(Some(Duration::from_millis(20)), &mut outcomes)
                .unwrap();
            if !outcomes.is_empty() {
                break;
            }
        }
        assert_eq!(outcomes, [(index, Outcome::Failed(Failure::Refused))]);
        assert_eq!(
            engine.open(Identity::Mqtt {
                client_id: "d".into(),
                clean_session: true,
                subscribe: None
            }),
            Err(Failure::GeneratorLimit),
            "the plan's budget is one connection"
        );
    }

    #[test]
    fn clients_start_on_the_servers_in_turn_by_their_index() {
        let firsts: Vec<usize> = (0..7).map(|client| first_server(client, 3)).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2, 0]);
        assert!(
            (0..100).all(|client| first_server(client, 1) == 0),
            "one server takes every client"
        );
        assert!(
            (0..50).all(|pair| first_server(2 * pair, 2) != first_server(2 * pair + 1, 2)),
            "the two clients of a throughput pair start on two servers of two"
        );
    }

    #[test]
    fn generator_processes_carry_the_spread_on_from_one_another() {
        // `ceiling` in 3 processes of 5 clients over 2 servers: process p's clients are the
        // run's 5p to 5p + 4, so the servers take 8 and 7, not 9 and 6.
        let mut first_connects = [0; 2];
        for process in 0..3 {
            for client in 0..5 {
                first_connects[first_server(5 * process + client, 2)] += 1;
            }
        }
        assert_eq!(first_connects, [8, 7]);
    }

    #[test]
    fn spreads_add_up_server_by_server() {
        let spread = |server: &str, first_connects, redirected| ServerSpread {
            server: server.into(),
            first_connects,
            redirected,
        };
        let mut sum = Vec::new();
        ServerSpread::add(&mut sum, &[spread("a", 3, 1), spread("b", 2, 2)]);
        ServerSpread::add(&mut sum, &[spread("b", 5, 0), spread("c", 1, 1)]);
        assert_eq!(
            sum,
            [spread("a", 3, 1), spread("b", 7, 2), spread("c", 1, 1)]
        );
    }

    /// Two servers on loopback: the engine's connections go to them in turn from its first
    /// client's index on, and each is counted as a first connect of its server.
    #[test]
    fn connections_are_spread_over_the_servers() {
        let listeners: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let servers = listeners
            .iter()
            .map(|listener| Server {
                address: listener.local_addr().unwrap(),
                pin: None,
            })
            .collect();
        let plan = SourcePlan::new(5, 0, addr::local_port_range().unwrap()).unwrap();
        // This engine's clients are the run's 1 to 5: servers 1, 0, 1, 0, 1.
        let mut engine = Engine::new(
            Target::Mqtt {
                login: false,
                qos: 0,
            },
            servers,
            1,
            plan,
        )
        .unwrap();
        for client in 0..5 {
            engine
                .open(Identity::Mqtt {
                    client_id: format!("c{client}"),
                    clean_session: true,
                    subscribe: None,
                })
                .unwrap();
        }
        // The kernel completes loopback connects without the engine turning.
        for (listener, expected) in listeners.iter().zip([2, 3]) {
            for _ in 0..expected {
                listener.accept().unwrap();
            }
            listener.set_nonblocking(true).unwrap();
            assert_eq!(
                listener.accept().map(|_| ()).unwrap_err().kind(),
                io::ErrorKind::WouldBlock,
                "no more than {expected} connections"
            );
        }
        let counts: Vec<(u64, u64)> = engine
            .spread
            .iter()
            .map(|spread| (spread.first_connects, spread.redirected))
            .collect();
        assert_eq!(counts, [(2, 0), (3, 0)]);
        assert_eq!(
            engine.spread[0].server,
            listeners[0].local_addr().unwrap().to_string()
        );
    }
}
