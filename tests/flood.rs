//! Floods of new connections against a real hopd, while a legitimate pair goes on exchanging
//! messages: admission (`docs/security.md`) must refuse the flood before any handshake work,
//! say why in each refusal and in its counters, keep hopd's memory bounded and the pair talking
//! (its round trips against its baseline are printed; `--nocapture` shows them). Each flood is
//! bounded in time and stops by itself. hopd and the pair run under a real-time policy where
//! the test may set one, the floods at the normal policy ([`start_for_flood`] says why).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expect_kind, key_on, ping, Hopd, PATIENCE};
use hop_protocol::client::{Client, ClientError};
use hop_protocol::noise::{ClientHandshake, Refusal, RefusalReason, FRAME_PLAINTEXT_BYTES_MAX};
use hop_protocol::session::ClientConnection;
use hop_protocol::wire::Kind;
use hop_protocol::StaticKey;
use socket2::{Domain, SockAddr, Socket, Type};

/// How long each flood runs.
const FLOOD: Duration = Duration::from_secs(3);
/// Connections per second each flood offers.
const FLOOD_RATE: u32 = 10_000;
/// Messages the pair exchanges per measurement: its p99 is the tenth worst.
const SAMPLES: usize = 1000;
/// hopd's sender burst in these tests: the pair sends `SAMPLES` messages per measurement,
/// several measurements in a row, above the default burst.
const PAIR_BURST: &str = "100000";
/// The pair's round trips are printed against its baseline (the figures in docs/security.md
/// come from these prints); the tests fail only if the pair stalls, its p99 over this. A test
/// does not fail because the machine is slow or busy: a pair starved by a flood waits for
/// seconds (the handshake and idle timeouts), not milliseconds.
const STALL: Duration = Duration::from_millis(500);

/// What the flooding clients saw.
#[derive(Debug, Default)]
struct Seen {
    attempts: AtomicU64,
    /// Message 2: the server did the handshake work.
    answered: AtomicU64,
    refused_busy: AtomicU64,
    refused_address: AtomicU64,
    /// Connect failures, resets, timeouts, anything else.
    other: AtomicU64,
}

/// Puts the calling thread under scheduling `policy` at `priority`; a process it spawns
/// inherits it.
fn set_policy(policy: libc::c_int, priority: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `sched_setscheduler` reads `param` during the call; pid 0 names the calling
    // thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread under `SCHED_FIFO` until dropped, when it can be (it needs root or
/// `CAP_SYS_NICE`); what it spawns meanwhile inherits the policy.
struct RealTime {
    set: bool,
}

impl RealTime {
    fn try_set(priority: libc::c_int) -> Self {
        match set_policy(libc::SCHED_FIFO, priority) {
            Ok(()) => Self { set: true },
            Err(error) => {
                println!(
                    "SCHED_FIFO refused ({error}): hopd and the pair run at the normal policy"
                );
                Self { set: false }
            }
        }
    }

    /// Moves the thread to `priority` (of the same policy), if it is under it.
    fn raise(&self, priority: libc::c_int) {
        if self.set {
            set_policy(libc::SCHED_FIFO, priority).unwrap();
        }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if self.set {
            let _ = set_policy(libc::SCHED_OTHER, 0);
        }
    }
}

/// Starts hopd for a flood test: two shards, pinned (the default outside the tests), under
/// `SCHED_FIFO`, and puts the calling thread (the pair's) under it too, one step above, until
/// the returned guard is dropped; each flood thread returns to the normal policy ([`at_normal_policy`]).
///
/// Why: on this machine's two CPUs the flooding clients, the pair's client and hopd share the
/// cores. At the normal policy the kernel here (`preempt=none`, 250 Hz, EEVDF) let a flooding
/// thread keep a CPU while a shard that was ready to run waited, until the next tick (4.9-8 ms
/// in `perf sched latency` during the throwaway keys' flood); the pair's p99 under that flood
/// went to 0.3-6 ms while every turn of hopd's loops stayed under 1 ms. Unpinned shards
/// and the test's thread also sometimes shared one core at the baseline (a p50 of 17 us
/// instead of 75), against which any flood looked 3-6x worse. That measures where the clients
/// run, not hopd: an attacker's CPU is not the server's, nor is a user's. Under a real-time
/// policy hopd's shards take their CPU whenever they are ready, as on a server of its own.
/// Where the policy cannot be set (it needs root or `CAP_SYS_NICE`) the test says so and runs
/// at the normal one. The default handshake thread, which hopd uses at the normal policy only,
/// is measured by `a_burst_of_handshakes_delays_the_pair_by_at_most_the_caps_worth`.
fn start_for_flood(flags: &[&str]) -> (RealTime, Hopd) {
    let real_time = RealTime::try_set(HOPD_PRIORITY);
    let flags: Vec<&str> = ["--shards", "2", "--pin-cores", "true"]
        .iter()
        .chain(flags)
        .copied()
        .collect();
    let hopd = Hopd::start(&flags);
    real_time.raise(PAIR_PRIORITY);
    (real_time, hopd)
}

/// hopd's real-time priority in the flood tests (its syncers and readers take one above).
const HOPD_PRIORITY: libc::c_int = 10;
/// The pair's, above hopd's: among threads of one priority a ready one waits for the running
/// one to block, and a pinned shard busy with a flood blocks seldom. The pair's client does
/// little per round trip.
const PAIR_PRIORITY: libc::c_int = 20;

/// Puts a flood's thread (spawned from the pair's real-time one) at the normal policy.
fn at_normal_policy() {
    set_policy(libc::SCHED_OTHER, 0).unwrap();
}

/// Opens connections from `sources` (in turn) at `rate` per second for `FLOOD`, over
/// `threads`: each sends one valid handshake message 1 (the same bytes every time: that costs
/// the attacker nothing and the server a responder), reads the answer and resets.
fn flood(server: SocketAddr, sources: Arc<Vec<Ipv4Addr>>, rate: u32, threads: u32) -> Arc<Seen> {
    let mut message_1 = Vec::new();
    let _ = ClientHandshake::start(&StaticKey::generate().unwrap(), &mut message_1);
    let message_1 = Arc::new(message_1);
    let seen = Arc::new(Seen::default());
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let (seen, sources, message_1) = (seen.clone(), sources.clone(), message_1.clone());
            std::thread::spawn(move || {
                at_normal_policy();
                let interval = Duration::from_secs_f64(f64::from(threads) / f64::from(rate));
                let mut next = start + interval * thread / threads;
                let mut turn = thread as usize;
                while start.elapsed() < FLOOD {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    // Behind schedule: go on at the rate from here, do not burst to catch up.
                    next = next.max(Instant::now() - interval) + interval;
                    let source = sources[turn % sources.len()];
                    turn += threads as usize;
                    seen.attempts.fetch_add(1, Ordering::Relaxed);
                    let counter = match knock(server, source, &message_1) {
                        Some(Knock::Answered) => &seen.answered,
                        Some(Knock::Refused(RefusalReason::Busy)) => &seen.refused_busy,
                        Some(Knock::Refused(_)) => &seen.refused_address,
                        None => &seen.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    seen
}

enum Knock {
    Answered,
    Refused(RefusalReason),
}

fn knock(server: SocketAddr, source: Ipv4Addr, message_1: &[u8]) -> Option<Knock> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    // A reset at the end: no TIME_WAIT, so one source address never runs out of ports.
    socket.set_linger(Some(Duration::ZERO)).ok()?;
    socket
        .bind(&SockAddr::from(SocketAddr::from((source, 0))))
        .ok()?;
    socket
        .connect_timeout(&server.into(), Duration::from_secs(1))
        .ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut stream: std::net::TcpStream = socket.into();
    // The server may answer a refusal before this arrives; the write still succeeds.
    let _ = stream.write_all(message_1);
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream.read_exact(&mut body).ok()?;
    match Refusal::decode(&body) {
        Some(refusal) => Some(Knock::Refused(refusal.reason)),
        None if body.len() == 96 => Some(Knock::Answered),
        None => None,
    }
}

/// The pair's round trips: alice sends, bob receives and acks; sorted.
fn round_trips(alice: &mut Client, bob: &mut Client, bob_key: &StaticKey) -> Vec<Duration> {
    let mut times = Vec::with_capacity(SAMPLES);
    for n in 0..SAMPLES {
        let start = Instant::now();
        alice
            .send_message(bob_key.user_id(), format!("message {n}").as_bytes())
            .unwrap();
        let deliver = expect_kind(bob, "the message", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver),
            _ => None,
        });
        times.push(start.elapsed());
        bob.ack_deliver(deliver.id).unwrap();
        // Alice's ServerAck (and later receipts) are read as they come, not waited for.
        while alice.recv(Duration::ZERO).unwrap().is_some() {}
    }
    times.sort();
    times
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

/// The pair's p99 under a flood is within `allowed`, and hopd's RSS grew less than `growth`.
fn assert_bounded(
    baseline: &[Duration],
    times: &[Duration],
    allowed: Duration,
    (rss_before, rss_after): (u64, u64),
    growth: u64,
) {
    assert!(
        p99(times) <= allowed,
        "the pair's p99 went from {:?} to {:?}",
        p99(baseline),
        p99(times)
    );
    assert!(
        rss_after < rss_before + growth,
        "hopd grew from {} MiB to {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
}

/// hopd's resident memory, from /proc.
fn rss_bytes(hopd: &Hopd) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", hopd.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    kib * 1024
}

/// A labelled counter's value for one label value, summed over the shards.
fn metric_by_label(hopd: &Hopd, name: &str, label: &str, value: &str) -> u64 {
    by_label(hopd, name, label).get(value).copied().unwrap_or(0)
}

/// `hop_admission_refused_total` by reason, summed over the shards.
fn refused_by_reason(hopd: &Hopd) -> HashMap<String, u64> {
    by_label(hopd, "hop_admission_refused_total", "reason")
}

/// A labelled counter by the values of `label`, summed over the other labels.
fn by_label(hopd: &Hopd, name: &str, label: &str) -> HashMap<String, u64> {
    let text = hopd.metrics();
    let mut counts = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}{{")) else {
            continue;
        };
        let reason = rest
            .split(&format!("{label}=\""))
            .nth(1)
            .and_then(|tail| tail.split('"').next())
            .unwrap()
            .to_string();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry(reason).or_default() += value as u64;
    }
    counts
}

/// The legitimate pair: alice sends to bob.
struct Pair {
    alice: Client,
    bob: Client,
    bob_key: StaticKey,
}

impl Pair {
    /// A pair on `hopd` (of `shards` shards), its round trips with nothing else going on, and
    /// the p99 allowed under a flood: 3x the baseline's, or `STALL`.
    ///
    /// With two shards or more, alice's home is shard 0 and bob's shard 1. The test's thread
    /// drives both clients; a pair on one shard makes its round trips on the test's core or
    /// wholly across cores, as the scheduler places the thread, and its baseline jumped
    /// between those two (p50 12 or 72 us in release). Across two shards each round trip
    /// meets one shard on each core, wherever the thread runs, as most pairs on a server of
    /// many shards do.
    fn measured(hopd: &Hopd, shards: u16) -> (Self, Vec<Duration>, Duration) {
        let connected = |key: StaticKey| {
            let mut client = hopd.connect(&key);
            ping(&mut client); // bound and at home when the server answers
            (key, client)
        };
        let (bob_key, bob) = connected(key_on(1 % shards, shards));
        let (_, alice) = connected(key_on(0, shards));
        let mut pair = Pair {
            alice,
            bob,
            bob_key,
        };
        let baseline = pair.round_trips();
        let allowed = (p99(&baseline) * 3).max(STALL);
        (pair, baseline, allowed)
    }

    fn round_trips(&mut self) -> Vec<Duration> {
        round_trips(&mut self.alice, &mut self.bob, &self.bob_key)
    }
}

impl Seen {
    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

/// Floods `hopd` from `sources` while the pair exchanges messages; checks the pair's p99
/// against `allowed` and returns what the flood saw and hopd's refusal counters.
fn under_flood(
    name: &str,
    hopd: &Hopd,
    sources: Vec<Ipv4Addr>,
    pair: &mut Pair,
    allowed: Duration,
) -> (Arc<Seen>, HashMap<String, u64>) {
    let server: SocketAddr = hopd.addr.parse().unwrap();
    let sources = Arc::new(sources);
    let flooding = std::thread::spawn(move || flood(server, sources, FLOOD_RATE, 2));
    std::thread::sleep(Duration::from_millis(300));
    let times = pair.round_trips();
    let seen = flooding.join().unwrap();
    let refused = refused_by_reason(hopd);
    println!(
        "{name}: {seen:?}; pair p50 {:?} p99 {:?}; counters {refused:?}; rss {} MiB",
        times[SAMPLES / 2],
        p99(&times),
        rss_bytes(hopd) >> 20
    );
    assert!(
        p99(&times) <= allowed,
        "the pair's p99 went over {allowed:?} to {:?} under a flood from {name}",
        p99(&times)
    );
    (seen, refused)
}

/// The tests of this file run one at a time: each measures latency under its own flood.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A client that finishes its handshake as `key` over a socket with a tiny receive buffer,
/// then never reads: what hopd sends it stays in hopd.
fn non_reader(addr: SocketAddr, key: &StaticKey) -> (std::net::TcpStream, ClientConnection) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    // A small segment size, as over a real network: on loopback (64 KB segments) the kernel
    // sizes hopd's socket buffer for ten of them and would take the whole flood itself, which
    // is bounded by the kernel's own memory limits, not by hopd's budget.
    socket.set_tcp_mss(1200).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    let mut out = Vec::new();
    let mut client = ClientConnection::start(key, None, &mut out);
    stream.write_all(&out).unwrap();
    let mut scratch = vec![0u8; FRAME_PLAINTEXT_BYTES_MAX];
    let mut buffer = [0u8; 512];
    while !client.is_open() {
        out.clear();
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "hopd closed during the handshake");
        client
            .handle_input::<()>(&buffer[..read], &mut scratch, &mut out, &mut |_| Ok(()))
            .unwrap();
        stream.write_all(&out).unwrap();
    }
    (stream, client)
}

/// A thousand peers that never read are sent messages they do not take. What hopd holds for
/// them all stays within `send_buffers_bytes_max`: the ones holding the most are closed
/// (counted as `send_budget`), hopd's memory stays bounded, and a pair that reads goes on.
#[test]
fn peers_that_never_read_are_closed_at_the_send_budget_while_a_pair_keeps_talking() {
    const PEERS: usize = 1000;
    const MESSAGES: usize = 6;
    const BUDGET: usize = 2 << 20;
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let budget = BUDGET.to_string();
    let (_real_time, hopd) = start_for_flood(&[
        "--sender-message-burst",
        PAIR_BURST,
        "--send-buffers-bytes-max",
        &budget,
        "--durability",
        "none",
    ]);
    let (mut pair, baseline, allowed) = Pair::measured(&hopd, 2);
    let rss_before = rss_bytes(&hopd);
    let addr: SocketAddr = hopd.addr.parse().unwrap();
    let keys: Vec<StaticKey> = (0..PEERS).map(|_| StaticKey::generate().unwrap()).collect();
    let peers: Vec<_> = keys.iter().map(|key| non_reader(addr, key)).collect();
    // 32 KB messages, six for each peer: 192 MB that the peers do not take, against a budget of
    // 2 MiB (the kernel's socket buffers take a few tens of KB of each peer's share).
    let (_, mut sender) = hopd.new_user();
    let flooding = std::thread::spawn(move || {
        at_normal_policy();
        let body = vec![7u8; 32 * 1024];
        for key in &keys {
            for _ in 0..MESSAGES {
                sender.queue_message(key.user_id(), &body);
            }
            sender.flush().unwrap();
            while sender.recv(Duration::ZERO).unwrap().is_some() {}
        }
        sender
    });
    // The pair is measured once the flood is sent, while the peers hold what they do not read
    // (sealing 192 MB for them takes both cores of this machine for a moment: that is the
    // flood's cost, not what it leaves behind).
    let sender = flooding.join().unwrap();
    let times = pair.round_trips();
    let deadline = Instant::now() + PATIENCE;
    let closes = loop {
        let closes = metric_by_label(&hopd, "hop_closes_total", "reason", "send_budget");
        if closes > 0 || Instant::now() > deadline {
            break closes;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rss_during = rss_bytes(&hopd);
    // What the peers hold stays held: without the budget it is all still in hopd later. The
    // shards publish what their connections hold once per tick.
    let buffered = loop {
        let by_shard = by_label(&hopd, "hop_send_buffered_bytes", "shard");
        assert_eq!(by_shard.len(), 2, "the gauge of each shard: {by_shard:?}");
        let buffered: u64 = by_shard.values().sum();
        if buffered <= BUDGET as u64 || Instant::now() > deadline {
            break buffered;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rss_settled = rss_bytes(&hopd);
    println!(
        "baseline p99 {:?}; with {PEERS} non-readers: p50 {:?} p99 {:?}; send_budget closes \
         {closes}; held for writing {} KiB; rss {} MiB -> {} MiB, {} MiB later",
        p99(&baseline),
        times[SAMPLES / 2],
        p99(&times),
        buffered >> 10,
        rss_before >> 20,
        rss_during >> 20,
        rss_settled >> 20
    );
    assert!(
        closes > 0,
        "the budget closed the slowest readers: {:?}",
        by_label(&hopd, "hop_closes_total", "reason"),
    );
    assert!(
        buffered <= BUDGET as u64,
        "hopd's connections hold {buffered} bytes for writing, over the budget of {BUDGET}"
    );
    // What the budget bounds is asserted just above. RSS adds the connections, their sessions
    // and what the allocator keeps of the moment's peak of sealing 192 MB: 16-130 MiB in most
    // runs, and 181-324 MiB in a few (the allocator keeps freed pages of a shard that has gone
    // idle), so the RSS bound here only catches a runaway.
    assert_bounded(
        &baseline,
        &times,
        allowed,
        (rss_before, rss_settled),
        512 << 20,
    );
    drop((peers, sender));
}

/// A hundred throwaway keys fill one recipient's queue and go on sending to it. One of them
/// tries to take it all and is stopped at its share (a quarter); the queue's own bounds stop
/// the rest; a pair of other users goes on, and hopd's memory stays bounded (queued bodies
/// are on disk).
///
/// The keys connect first (handshake floods are the test below), then all send at once, round
/// after round, until the pair has finished its round trips: the pair is measured inside the
/// message flood, not between its handshakes.
#[test]
fn throwaway_keys_filling_one_recipient_are_refused_while_a_pair_keeps_talking() {
    const KEYS: usize = 100;
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Naming one limit (at its default) keeps hopd's defaults for all of them.
    let (_real_time, hopd) = start_for_flood(&[
        "--queue-sender-percent",
        "25",
        "--sender-message-burst",
        PAIR_BURST,
    ]);
    let (mut pair, baseline, allowed) = Pair::measured(&hopd, 2);
    let rss_before = rss_bytes(&hopd);
    let (victim, victim_client) = hopd.new_user();
    drop(victim_client);
    let keys: Vec<Client> = (0..KEYS).map(|_| hopd.new_user().1).collect();
    let answered = Arc::new(AtomicU64::new(0));
    let pair_done = Arc::new(AtomicBool::new(false));
    let victim_id = victim.user_id();
    let flooding = std::thread::spawn({
        let answered = answered.clone();
        let pair_done = pair_done.clone();
        move || {
            at_normal_policy();
            let mut keys = keys;
            let mut refused = HashMap::<String, u64>::new();
            let mut acked = 0u64;
            let mut rounds = 0;
            let started = Instant::now();
            // At least the first round (the one that fills the queue); then until the pair is
            // done, or FLOOD at most.
            while rounds == 0 || !pair_done.load(Ordering::Relaxed) && started.elapsed() < FLOOD {
                // Every key sends its round, then every key reads its answers: all of them in
                // flight at once, as from an attacker that does not wait.
                let mut counts = Vec::with_capacity(KEYS);
                for (n, client) in keys.iter_mut().enumerate() {
                    // In the first round the first key sends 8 MB in 8 KB messages, the others
                    // 200 KB in 2 KB ones: 28 MB in all, for a queue of 16 MiB of which one
                    // sender may take 4 MiB. Later rounds send 200 KB from each key.
                    let (count, size) = if rounds == 0 && n == 0 {
                        (1000, 8 * 1024)
                    } else {
                        (100, 2 * 1024)
                    };
                    let body = vec![b'x'; size];
                    for _ in 0..count {
                        client.queue_message(victim_id, &body);
                    }
                    client.flush().unwrap();
                    counts.push(count);
                }
                for (n, (client, count)) in keys.iter_mut().zip(counts).enumerate() {
                    let mut answers = 0;
                    while answers < count {
                        match client.recv(PATIENCE).unwrap() {
                            Some(stanza) => match stanza.kind {
                                Some(Kind::ServerAck(_)) => {
                                    acked += 1;
                                    answers += 1;
                                }
                                Some(Kind::Error(error)) => {
                                    *refused.entry(error.reason).or_default() += 1;
                                    answers += 1;
                                }
                                _ => {}
                            },
                            None => panic!("no answer to message {answers} of key {n}"),
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                rounds += 1;
            }
            (acked, refused, rounds)
        }
    });
    // The pair starts once the flood is under way (or its thread ended: the join below says
    // why).
    while answered.load(Ordering::Relaxed) == 0 && !flooding.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered_before = answered.load(Ordering::Relaxed);
    let started = Instant::now();
    let times = pair.round_trips();
    let took = started.elapsed();
    let answered_during = answered.load(Ordering::Relaxed) - answered_before;
    pair_done.store(true, Ordering::Relaxed);
    let (acked, refused, rounds) = flooding.join().unwrap();
    let rss_after = rss_bytes(&hopd);
    let waits: u64 = by_label(&hopd, "hop_store_waits_total", "shard")
        .values()
        .sum();
    println!(
        "{KEYS} keys to one recipient, {rounds} rounds: {acked} taken, refused {refused:?}; \
         {answered_during} flood messages answered in the pair's {took:?}; pair p50 {:?} p99 \
         {:?} (baseline {:?}); rss {} MiB -> {} MiB; the loops waited for the disk {waits} times",
        times[SAMPLES / 2],
        p99(&times),
        p99(&baseline),
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(
        answered_during > 0,
        "the flood went on during the pair's round trips"
    );
    let share = refused
        .iter()
        .filter(|(reason, _)| reason.contains("your share"))
        .map(|(_, count)| *count)
        .sum::<u64>();
    let full = refused
        .iter()
        .filter(|(reason, _)| reason.contains("queue is full"))
        .map(|(_, count)| *count)
        .sum::<u64>();
    assert!(
        share > 0,
        "the first key was stopped at its share: {refused:?}"
    );
    assert!(
        full > 0,
        "the queue's own bound stopped the rest: {refused:?}"
    );
    // What was taken is within the queue's bound: 16 MiB of 2 KB messages at most, once the
    // first key's 4 MiB are in.
    assert!(acked <= 512 + (16 << 20) / 2048, "{acked} taken");
    // hopd counts every refusal the keys were told of (its shards publish the count once a
    // tick).
    let told: u64 = refused.values().sum();
    let deadline = Instant::now() + PATIENCE;
    let counted = loop {
        let counted: u64 = by_label(&hopd, "hop_messages_rejected_total", "shard")
            .values()
            .sum();
        if counted >= told || Instant::now() > deadline {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        counted >= told,
        "hop_messages_rejected_total {counted}, the keys were refused {told} times"
    );
    assert_bounded(
        &baseline,
        &times,
        allowed,
        (rss_before, rss_after),
        64 << 20,
    );
}

/// One test, so that nothing else runs beside a flood: a quiet baseline, then a flood from one
/// address, then one spread over a thousand addresses.
#[test]
fn floods_of_handshakes_are_refused_while_a_pair_keeps_talking() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Naming one admission setting (at its default) keeps hopd's defaults for all of them.
    let (_real_time, hopd) = start_for_flood(&[
        "--address-handshakes-max",
        "256",
        "--sender-message-burst",
        PAIR_BURST,
    ]);
    let (mut pair, baseline, allowed) = Pair::measured(&hopd, 2);
    let rss_before = rss_bytes(&hopd);
    println!(
        "baseline: p50 {:?}, p99 {:?}; rss {} MiB",
        baseline[SAMPLES / 2],
        p99(&baseline),
        rss_before >> 20
    );

    // One address, 10,000 connections a second. Its bucket lets its burst (500) and then 50 a
    // second through; the rest is refused at accept.
    let one = vec![Ipv4Addr::new(127, 0, 9, 1)];
    let (seen, refused) = under_flood("one address", &hopd, one, &mut pair, allowed);
    let burst_and_rate = 500 + 50 * (FLOOD.as_secs() + 1);
    assert!(
        seen.answered() <= burst_and_rate,
        "{seen:?}: more handshakes answered to one address than its burst and rate"
    );
    let by_address = seen.refused_address.load(Ordering::Relaxed);
    assert!(
        by_address > seen.attempts.load(Ordering::Relaxed) / 2,
        "most of the flood is refused by its address: {seen:?}"
    );
    assert!(
        refused.get("address_rate").copied().unwrap_or(0) >= by_address,
        "the counters show each refusal: {refused:?}, {seen:?}"
    );

    // A thousand addresses, ten connections a second each: no address is over its limits, so
    // the shards' buckets (1,000 handshakes a second each) refuse what is beyond them.
    let many = (0..1000u32)
        .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 10, 0)) + n))
        .collect();
    let (seen, refused) = under_flood("1,000 addresses", &hopd, many, &mut pair, allowed);
    let rss_after = rss_bytes(&hopd);
    let shard_budget = 2 * 1000 * (FLOOD.as_secs() + 1);
    assert!(
        seen.answered() <= shard_budget,
        "{seen:?}: more handshakes answered than the shards' buckets allow"
    );
    let busy = seen.refused_busy.load(Ordering::Relaxed);
    if seen.attempts.load(Ordering::Relaxed) > shard_budget + 1000 {
        assert!(busy > 0, "the flood outran the buckets: {seen:?}");
    }
    assert!(
        refused.get("busy").copied().unwrap_or(0) >= busy,
        "the counters show each busy refusal: {refused:?}"
    );
    // Refused connections cost no handshake state; what was admitted is bounded by the
    // buckets. 64 MiB is far above that and far below a flood held in memory.
    assert!(
        rss_after < rss_before + (64 << 20),
        "hopd grew from {} MiB to {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );

    // A client that is refused is told why. The shards' buckets may still be empty from the
    // flood before: a `busy` refusal is also a refusal with its reason, and the client goes
    // on until its own address's bucket is empty.
    let flood_key = StaticKey::generate().unwrap();
    let started = Instant::now();
    let (mut admitted, mut busy, mut failed) = (0u32, 0u32, Vec::new());
    let refusal = (0..2_000).find_map(|_| {
        match Client::connect(&hopd.addr, &flood_key, &hopd.trust(), PATIENCE) {
            Err(ClientError::Refused(refusal)) if refusal.reason == RefusalReason::Busy => {
                busy += 1;
                None
            }
            Err(ClientError::Refused(refusal)) => Some(refusal),
            Ok(_) => {
                admitted += 1;
                None
            }
            Err(error) => {
                failed.push(error.to_string());
                None
            }
        }
    });
    let refusal = refusal.unwrap_or_else(|| {
        failed.dedup();
        panic!(
            "a client that keeps connecting from one address is refused: in {:?}, {admitted} \
             were admitted, {busy} refused as busy and these failed otherwise: {failed:?}",
            started.elapsed()
        )
    });
    assert_eq!(refusal.reason, RefusalReason::AddressRate);
    assert!(refusal.retry_after_ms >= 100, "{refusal:?}");
}

/// Bursts of handshakes read by a shard in one turn: `BURST` connections send their message 1
/// at the same moment and the pair's message right behind them. Worked on by the loop without
/// a cap, the message waits for every handshake read with it (~260 µs each); with one, for at
/// most the cap's worth; on the handshaker thread (the default), for none of them. The pair's
/// round trips are printed, for each setting; with the default the pair must not stall
/// (`STALL`).
#[test]
fn a_burst_of_handshakes_delays_the_pair_by_at_most_the_caps_worth() {
    const BURST: usize = 64;
    const BURSTS: usize = 30;
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut message_1 = Vec::new();
    let _ = ClientHandshake::start(&StaticKey::generate().unwrap(), &mut message_1);
    // On the loop with no cap, on the loop with the default cap, then hopd's default (the
    // handshaker thread); one shard, where the burst and the pair meet.
    for (setting, flags) in [
        (
            "loop, handshakes_per_turn 0",
            &[
                "--shards",
                "1",
                "--handshake-thread",
                "false",
                "--handshakes-per-turn",
                "0",
                "--sender-message-burst",
                PAIR_BURST,
            ][..],
        ),
        (
            "loop, handshakes_per_turn 2",
            &[
                "--shards",
                "1",
                "--handshake-thread",
                "false",
                "--sender-message-burst",
                PAIR_BURST,
            ][..],
        ),
        (
            "default (handshake_thread)",
            &["--shards", "1", "--sender-message-burst", PAIR_BURST][..],
        ),
    ] {
        let hopd = Hopd::start(flags);
        let server: SocketAddr = hopd.addr.parse().unwrap();
        let (mut pair, baseline, _) = Pair::measured(&hopd, 1);
        let mut times = Vec::with_capacity(BURSTS);
        for _ in 0..BURSTS {
            let mut burst: Vec<std::net::TcpStream> = (0..BURST)
                .map(|_| std::net::TcpStream::connect(server).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(50)); // accepted, idle
            for stream in &mut burst {
                stream.write_all(&message_1).unwrap();
            }
            let start = Instant::now();
            pair.alice
                .send_message(pair.bob_key.user_id(), b"behind a burst")
                .unwrap();
            let deliver = expect_kind(&mut pair.bob, "the message", |kind| match kind {
                Kind::Deliver(deliver) => Some(deliver),
                _ => None,
            });
            times.push(start.elapsed());
            pair.bob.ack_deliver(deliver.id).unwrap();
            while pair.alice.recv(Duration::ZERO).unwrap().is_some() {}
            for stream in &mut burst {
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut header = [0u8; 2];
                stream.read_exact(&mut header).unwrap();
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(header))];
                stream.read_exact(&mut body).unwrap();
                assert_eq!(body.len(), 96, "message 2");
            }
        }
        times.sort();
        println!(
            "{setting}: pair baseline p50 {:?} p99 {:?}; behind a burst of {BURST} message 1s: p50 {:?} max {:?}",
            baseline[SAMPLES / 2],
            p99(&baseline),
            times[BURSTS / 2],
            times[BURSTS - 1]
        );
        // What hop promises is for its default: on the loop without a cap, one burst in thirty
        // once held the pair for 1.2 s on this machine (printed above, not asserted).
        if setting.starts_with("default") {
            assert!(times[BURSTS - 1] < STALL, "the pair stalled: {times:?}");
        }
    }
}
