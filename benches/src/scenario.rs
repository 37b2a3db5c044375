//! The scenarios: `throughput`, `latency`, `ceiling`, `offline`, and `group` (in its own
//! module). Each drives an [`Engine`] and fills a [`Report`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hop_protocol::keys::StaticKey;
use hop_protocol::UserId;
use serde::{Deserialize, Serialize};

use crate::addr::{local_port_range, SourcePlan};
use crate::conn::Event;
use crate::engine::{
    Engine, Failure, Identity, Outcome, Server, ServerSpread, Target, REDIRECTS_MAX,
};
use crate::latency::{LatencyRecorder, LatencySummary};
use crate::procfs::{cpu_seconds_of, cpu_seconds_self, real_time_throttled, RealTimeThrottle};
use crate::report::{CpuUse, Report};
use crate::schedule::{sender_of, Schedule};

mod group;

pub use group::{group, GroupOptions};

/// Bytes of every benchmark message body: the DESIGN's 24-byte message.
pub const BODY_BYTES: usize = 24;
/// Connections handshaking at once while a scenario sets up its clients.
const SETUP_PENDING_MAX: usize = 512;
/// How long setting up the clients may take before the run gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Below this wait the open-loop sender of [`Wait::Sleep`] sleeps with `nanosleep` and then
/// polls without waiting, instead of sleeping in `epoll_wait`, whose timeout has millisecond
/// resolution.
const SLEEP_BELOW: Duration = Duration::from_millis(1);

/// Where and what to benchmark: flags common to every scenario.
#[derive(Debug, Clone)]
pub struct Common {
    /// The servers clients connect to first, spread by client index
    /// ([`crate::engine::first_server`]); at least one.
    pub servers: Vec<Server>,
    pub target: Target,
    /// The pid of one server (the first, in the scripts): its CPU (and for `ceiling` its
    /// memory) is read.
    pub server_pid: Option<u32>,
    /// Source addresses to skip, so that concurrent generator processes use distinct ones.
    pub source_offset: u32,
    /// The run's index of this process's first client, so that the spread over `servers`
    /// goes on from where the previous generator process's clients left it.
    pub client_offset: u64,
}

impl Common {
    fn target_name(&self) -> &'static str {
        match self.target {
            Target::Hop { .. } => "hop",
            Target::Mqtt { .. } => "mqtt",
        }
    }

    /// The QoS that `throughput`, `latency` and `group` publish and subscribe with (MQTT).
    fn qos(&self) -> u8 {
        match self.target {
            Target::Hop { .. } => 0,
            Target::Mqtt { qos, .. } => qos,
        }
    }

    fn engine(&self, connections: u64) -> Result<Engine, String> {
        let range = local_port_range().map_err(|e| format!("ephemeral port range: {e}"))?;
        let plan =
            SourcePlan::new(connections, self.source_offset, range).map_err(|e| e.to_string())?;
        Engine::new(self.target, self.servers.clone(), self.client_offset, plan)
            .map_err(|e| e.to_string())
    }

    /// The servers' addresses, as the report names them: comma-separated, in order.
    pub fn server_names(&self) -> String {
        self.servers
            .iter()
            .map(|server| server.address.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn report(&self, scenario: &str) -> Report {
        let mut report = Report::new(scenario, self.target_name(), &self.server_names());
        if let Target::Mqtt { qos: 1, .. } = self.target {
            report
                .notes
                .push("MQTT QoS 1: every publish and every delivery PUBACKed".into());
        }
        if let (Some(pid), true) = (self.server_pid, self.servers.len() > 1) {
            report.notes.push(format!(
                "--server-pid {pid} is one of the {} servers: server CPU is that process's alone",
                self.servers.len()
            ));
        }
        report
    }
}

/// A benchmark client: how it is addressed and who it is.
#[derive(Debug, Clone)]
struct Client {
    key: Option<StaticKey>,
    user: Option<UserId>,
    client_id: String,
    topic: String,
}

impl Client {
    fn new(target: Target, tag: &str, index: usize) -> Result<Self, String> {
        let client_id = format!("hb{tag}-{index}");
        let topic = format!("u/{client_id}");
        Ok(match target {
            Target::Hop { .. } => {
                let key = StaticKey::generate().map_err(|e| e.to_string())?;
                Self {
                    user: Some(key.user_id()),
                    key: Some(key),
                    client_id,
                    topic,
                }
            }
            Target::Mqtt { .. } => Self {
                key: None,
                user: None,
                client_id,
                topic,
            },
        })
    }

    fn identity(&self, clean_session: bool, subscribe_qos: Option<u8>) -> Identity {
        match &self.key {
            Some(key) => Identity::Hop(key.clone()),
            None => Identity::Mqtt {
                client_id: self.client_id.clone(),
                clean_session,
                subscribe: subscribe_qos.map(|qos| (self.topic.clone(), qos)),
            },
        }
    }
}

/// A tag that keeps this run's MQTT client ids and topics apart from earlier runs'.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:x}", std::process::id(), nanos)
}

/// The body of message `k` of stream `stream`, intended to leave at `intended_ns`.
pub fn encode_body(k: u64, intended_ns: u64, stream: u32) -> Bytes {
    let mut body = [0u8; BODY_BYTES];
    body[..8].copy_from_slice(&k.to_le_bytes());
    body[8..16].copy_from_slice(&intended_ns.to_le_bytes());
    body[16..20].copy_from_slice(&stream.to_le_bytes());
    Bytes::copy_from_slice(&body)
}

/// (k, intended_ns, stream) of a benchmark body.
pub fn decode_body(body: &[u8]) -> Option<(u64, u64, u32)> {
    if body.len() != BODY_BYTES {
        return None;
    }
    let k = u64::from_le_bytes(body[..8].try_into().ok()?);
    let intended = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let stream = u32::from_le_bytes(body[16..20].try_into().ok()?);
    Some((k, intended, stream))
}

/// Sends `body` on connection `from_conn` to client `to`: hop Send (numbered by the
/// connection's outbox), or MQTT PUBLISH to `u/<to>`.
fn send(engine: &mut Engine, from_conn: usize, to: &Client, body: Bytes, qos: u8) {
    match to.user {
        Some(user) => engine.send_hop(from_conn, user, body),
        None => engine.publish(from_conn, &to.topic, &body, qos),
    }
}

/// Opens every client, at most [`SETUP_PENDING_MAX`] handshaking at once. Any failure fails
/// the run: these scenarios need all their clients.
fn open_all(
    engine: &mut Engine,
    clients: &[Client],
    clean_session: bool,
    subscribe_qos: Option<u8>,
) -> Result<Vec<usize>, String> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut conns = vec![usize::MAX; clients.len()];
    let mut by_conn: BTreeMap<usize, usize> = BTreeMap::new();
    let mut next = 0;
    let mut pending = 0;
    let mut opened = 0;
    let mut outcomes = Vec::new();
    while opened < clients.len() {
        while next < clients.len() && pending < SETUP_PENDING_MAX {
            let conn = engine
                .open(clients[next].identity(clean_session, subscribe_qos))
                .map_err(|f| format!("opening client {next}: {}", f.name()))?;
            conns[next] = conn;
            by_conn.insert(conn, next);
            next += 1;
            pending += 1;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {opened} of {} clients opened in {SETUP_TIMEOUT:?}",
                clients.len()
            ));
        }
        engine
            .turn(Some(Duration::from_millis(5)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (conn, outcome) in outcomes.drain(..) {
            match outcome {
                Outcome::Event(Event::Opened) => {
                    opened += 1;
                    pending -= 1;
                }
                Outcome::Failed(failure) => {
                    let why = match (failure, &engine.bad_redirect) {
                        (Failure::BadRedirect, Some(why)) => format!(" ({why})"),
                        (Failure::TooManyRedirects, _) => {
                            format!(" (more than {REDIRECTS_MAX})")
                        }
                        _ => String::new(),
                    };
                    return Err(format!(
                        "client {} failed while opening: {}{why}",
                        by_conn.get(&conn).copied().unwrap_or(usize::MAX),
                        failure.name()
                    ));
                }
                Outcome::Event(_) => {}
            }
        }
    }
    settle(engine, Duration::from_millis(300))?;
    Ok(conns)
}

/// Turns the engine for `duration` so the server finishes what the last handshakes started
/// (a hop client is open once it sent message 3; the server registers it a moment later, and
/// a message sent to it before then is refused as UNKNOWN_USER).
fn settle(engine: &mut Engine, duration: Duration) -> Result<(), String> {
    let mut outcomes = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        if let Some((_, Outcome::Failed(failure))) = outcomes
            .iter()
            .find(|(_, o)| matches!(o, Outcome::Failed(_)))
        {
            return Err(format!(
                "a client failed while settling: {}",
                failure.name()
            ));
        }
        outcomes.clear();
    }
    Ok(())
}

/// What the engine did beside the scenario: where its connections went first (the spread
/// over the servers), the redirects it followed (a cluster's nodes sending clients to their
/// home) and why one could not be followed, if one could not; the server's refusals it waited
/// out (at admission, and for a sender's rate).
fn engine_report(report: &mut Report, engine: &Engine) {
    report.redirects += engine.redirects;
    ServerSpread::add(&mut report.spread, &engine.spread);
    for (reason, count) in &engine.admission_refused {
        *report
            .admission_refused
            .entry(reason.to_string())
            .or_default() += count;
    }
    report.rate_limited += engine.rate_limited;
    if let Some(why) = &engine.bad_redirect {
        report
            .notes
            .push(format!("a redirect could not be followed: {why}"));
    }
}

fn clients(common: &Common, count: usize) -> Result<Vec<Client>, String> {
    let tag = run_tag();
    (0..count)
        .map(|i| Client::new(common.target, &tag, i))
        .collect()
}

/// CPU seconds of the server, if its pid is known.
fn server_cpu(common: &Common) -> Option<f64> {
    common.server_pid.and_then(cpu_seconds_of)
}

fn cpu_report(
    report: &mut Report,
    common: &Common,
    generator_before: f64,
    server_before: Option<f64>,
    wall: f64,
) {
    report.generator_cpu = CpuUse::new(1, cpu_seconds_self() - generator_before, wall);
    if let (Some(before), Some(after)) = (server_before, server_cpu(common)) {
        report.server_cpu = Some(CpuUse::new(1, after - before, wall));
        if report.generator_cpu.cores_busy > 0.9
            && report.server_cpu.is_some_and(|s| s.cores_busy < 0.9)
        {
            report.notes.push(
                "the generator was busier than the server: these figures may be the generator's limit".into(),
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    pub pairs: usize,
    /// Messages in flight per direction of a pair (sent, not yet delivered).
    pub window: u64,
    pub warmup_ms: u64,
    pub duration_ms: u64,
}

/// P pairs, each client sending to its peer while fewer than `window` of its messages are
/// undelivered. Measures delivered messages per second after a warm-up.
pub fn throughput(common: &Common, options: &ThroughputOptions) -> Result<Report, String> {
    assert!(
        options.pairs > 0 && options.window > 0,
        "pairs and window must be positive"
    );
    let count = options.pairs * 2;
    let clients = clients(common, count)?;
    let mut engine = common.engine(count as u64)?;
    let conns = open_all(&mut engine, &clients, true, Some(common.qos()))?;
    let mut sent = vec![0u64; count];
    let mut delivered = vec![0u64; count];
    // Per stream: messages that left the window (delivered, or lost: a later one arrived
    // first, or nothing arrived for STREAM_STALL_MS). A broker may drop QoS 0 messages; a lost
    // message must not hold its window slot for ever.
    let mut done = vec![0u64; count];
    let mut progress_at = vec![Instant::now(); count];
    let mut lost = 0u64;
    // Per stream: messages counted lost that may still arrive (overtaken by a later one, as a
    // Send refused for its sender's rate and sent again is, or stalled). One that arrives is
    // taken back from `lost` and counted `late`: `lost` is what never arrived.
    let mut missing: Vec<std::collections::HashSet<u64>> = vec![Default::default(); count];
    let mut late = 0u64;
    let mut last_stall_check = Instant::now();
    let mut refill: Vec<usize> = (0..count).collect();
    let mut counters = Counters::default();
    let mut outcomes = Vec::new();
    let start = Instant::now();
    let warmup_end = start + Duration::from_millis(options.warmup_ms);
    let end = warmup_end + Duration::from_millis(options.duration_ms);
    let mut measured: Option<(u64, u64, u64, f64, Option<f64>, Instant)> = None;
    loop {
        let now = Instant::now();
        if measured.is_none() && now >= warmup_end {
            measured = Some((
                delivered.iter().sum(),
                engine.bytes_written,
                engine.bytes_read,
                cpu_seconds_self(),
                server_cpu(common),
                now,
            ));
        }
        if now >= end {
            break;
        }
        if now.duration_since(last_stall_check) >= Duration::from_millis(STREAM_STALL_MS) {
            last_stall_check = now;
            for stream in 0..count {
                if done[stream] < sent[stream]
                    && now.duration_since(progress_at[stream])
                        >= Duration::from_millis(STREAM_STALL_MS)
                {
                    lost += sent[stream] - done[stream];
                    missing[stream].extend(done[stream]..sent[stream]);
                    done[stream] = sent[stream];
                    progress_at[stream] = now;
                    refill.push(stream);
                }
            }
        }
        for stream in refill.drain(..) {
            while sent[stream] - done[stream] < options.window {
                let k = sent[stream];
                let intended = now.duration_since(start).as_nanos() as u64;
                send(
                    &mut engine,
                    conns[stream],
                    &clients[stream ^ 1],
                    encode_body(k, intended, stream as u32),
                    common.qos(),
                );
                sent[stream] += 1;
            }
        }
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (_, outcome) in outcomes.drain(..) {
            if let Some((k, _, stream)) = counters.count(&outcome) {
                let stream = stream as usize;
                if stream < count && k >= done[stream] {
                    lost += k - done[stream];
                    missing[stream].extend(done[stream]..k);
                    done[stream] = k + 1;
                    delivered[stream] += 1;
                    progress_at[stream] = Instant::now();
                    refill.push(stream);
                } else if stream < count && missing[stream].remove(&k) {
                    lost -= 1;
                    late += 1;
                    delivered[stream] += 1;
                }
            }
        }
        refill.sort_unstable();
        refill.dedup();
    }
    let (delivered_before, written_before, read_before, cpu_before, server_before, measured_at) =
        measured.ok_or("the run ended before its warm-up")?;
    let wall = measured_at.elapsed().as_secs_f64();
    let messages = delivered.iter().sum::<u64>() - delivered_before;
    let mut report = common.report("throughput");
    engine_report(&mut report, &engine);
    report.figure("pairs", options.pairs as f64, "pairs");
    report.figure("window", options.window as f64, "messages per direction");
    report.figure("body_bytes", BODY_BYTES as f64, "bytes");
    report.figure("measured_seconds", wall, "s");
    report.figure("messages_per_second", messages as f64 / wall, "msg/s");
    report.figure(
        "bytes_to_server_per_second",
        (engine.bytes_written - written_before) as f64 / wall,
        "B/s",
    );
    report.figure(
        "bytes_from_server_per_second",
        (engine.bytes_read - read_before) as f64 / wall,
        "B/s",
    );
    report.figure("lost", lost as f64, "messages");
    report.figure("late", late as f64, "messages");
    counters.into_report(&mut report);
    cpu_report(&mut report, common, cpu_before, server_before, wall);
    Ok(report)
}

/// A stream with messages in flight and no delivery for this long counts them as lost.
const STREAM_STALL_MS: u64 = 1_000;

/// What came back from the server, counted.
#[derive(Debug, Default)]
struct Counters {
    send_acked: u64,
    receipts: u64,
    server_errors: BTreeMap<i32, u64>,
    failures: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counts `outcome`; returns the decoded body of a delivery.
    fn count(&mut self, outcome: &Outcome) -> Option<(u64, u64, u32)> {
        match outcome {
            Outcome::Event(Event::Delivered { body }) => return decode_body(body),
            Outcome::Event(Event::SendAcked) => self.send_acked += 1,
            Outcome::Event(Event::Receipt) => self.receipts += 1,
            Outcome::Event(Event::ServerError { code, .. }) => {
                *self.server_errors.entry(*code).or_default() += 1
            }
            Outcome::Event(Event::SendAnsweredAgain) => {
                *self.failures.entry("send_answered_again").or_default() += 1
            }
            Outcome::Event(Event::GoAway { .. }) => {
                *self.failures.entry("go_away").or_default() += 1
            }
            Outcome::Event(Event::Opened | Event::GroupEvent | Event::GroupInfo { .. }) => {}
            Outcome::Failed(failure) => *self.failures.entry(failure.name()).or_default() += 1,
        }
        None
    }

    fn into_report(self, report: &mut Report) {
        report.figure("send_acks", self.send_acked as f64, "acks");
        if report.target == "hop" {
            report.figure("receipts", self.receipts as f64, "receipts");
        }
        for (code, count) in self.server_errors {
            report
                .failures
                .insert(format!("server_error_{code}"), count);
        }
        for (kind, count) in self.failures {
            report.failures.insert(kind.to_string(), count);
        }
    }
}

#[derive(Debug, Clone)]
pub struct LatencyOptions {
    pub pairs: usize,
    pub rate_per_second: u64,
    pub duration_ms: u64,
    /// After the last scheduled send, how long to wait for the last deliveries.
    pub drain_ms: u64,
    pub wait: Wait,
}

/// How the open-loop generator waits between its sends (`latency --wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Wait {
    /// Polls without sleeping: a delivery is timestamped when it arrives and a send leaves on
    /// time, at the price of the generator's whole core. Its saturation is then read from
    /// the polls that found work, not from its CPU.
    Spin,
    /// Sleeps until the next send is due, then handles what arrived meanwhile: a delivery is
    /// timestamped when the sleep ends, up to one wake-up late (a 50 µs `nanosleep` takes
    /// about 90 µs on a virtual machine), which lengthens every figure and rounds a server's
    /// latency up to the generator's next wake-up.
    Sleep,
}

impl Wait {
    pub fn name(self) -> &'static str {
        match self {
            Wait::Spin => "spin",
            Wait::Sleep => "sleep",
        }
    }
}

/// Refuses [`Wait::Spin`] where the kernel would stop the spinning generator: under a
/// real-time policy with real-time throttling on, a thread that never sleeps is stopped for
/// the rest of each period once it used its runtime (50 ms of every second by default), and
/// those stops would be counted as latency.
fn spin_allowed(throttle: Option<RealTimeThrottle>) -> Result<(), String> {
    match throttle {
        Some(RealTimeThrottle::Throttled {
            runtime_us,
            period_us,
        }) => Err(format!(
            "--wait spin under a real-time policy (SCHED_FIFO/RR): the kernel lets real-time \
             threads run {runtime_us} µs of every {period_us} µs (kernel.sched_rt_runtime_us) \
             and stops a thread that never sleeps for the rest, which would be counted as \
             latency; run the generator under SCHED_OTHER (e.g. nice -n -10), lift the \
             throttling (sysctl kernel.sched_rt_runtime_us=-1), or use --wait sleep"
        )),
        _ => Ok(()),
    }
}

/// An open-loop schedule at a fixed offered rate, spread round robin over every client;
/// latency from each message's intended send time to its delivery.
pub fn latency(common: &Common, options: &LatencyOptions) -> Result<Report, String> {
    let result = latency_local(common, options)?;
    Ok(latency_report(common, options, &[result]))
}

/// What one generator process measured in `latency`; merged across processes by
/// [`latency_report`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyResult {
    pub scheduled: u64,
    /// Latencies recorded: [`LatencyRecorder::counts`].
    pub histogram: Vec<(u64, u64)>,
    pub clamped: u64,
    /// How late the generator sent its most delayed message (its own saturation).
    pub send_lag_max_ns: u64,
    pub send_acked: u64,
    pub receipts: u64,
    pub failures: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// The server's CPU seconds over this process's measurement, if its pid is known.
    pub server_cpu_seconds: Option<f64>,
    pub redirects: u64,
    pub spread: Vec<ServerSpread>,
    pub bad_redirect: Option<String>,
    pub admission_refused: BTreeMap<String, u64>,
    pub rate_limited: u64,
    /// Under [`Wait::Spin`], the seconds of polls that sent nothing and received nothing.
    #[serde(default)]
    pub idle_seconds: f64,
}

/// One process's part of `latency`: `options.pairs` pairs at `options.rate_per_second`.
pub fn latency_local(common: &Common, options: &LatencyOptions) -> Result<LatencyResult, String> {
    assert!(options.pairs > 0, "at least one pair");
    let spin = options.wait == Wait::Spin;
    if spin {
        spin_allowed(real_time_throttled())?;
    }
    let count = options.pairs * 2;
    let clients = clients(common, count)?;
    let mut engine = common.engine(count as u64)?;
    let conns = open_all(&mut engine, &clients, true, Some(common.qos()))?;
    let schedule = Schedule::for_duration(options.rate_per_second, options.duration_ms);
    let mut recorder = LatencyRecorder::new();
    let mut counters = Counters::default();
    let mut outcomes = Vec::new();
    let cpu_before = cpu_seconds_self();
    let server_before = server_cpu(common);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut late_sends_max_ns = 0u64;
    let deadline = start + Duration::from_millis(options.duration_ms + options.drain_ms);
    let mut idle_ns = 0u64;
    while recorder.len() < schedule.messages_total() && Instant::now() < deadline {
        let now_ns = start.elapsed().as_nanos() as u64;
        let sent_before = sent;
        let due = schedule.due_at(now_ns);
        while sent < due {
            let sender = sender_of(sent, count as u64) as usize;
            let intended = schedule.intended_ns(sent);
            late_sends_max_ns = late_sends_max_ns.max(now_ns.saturating_sub(intended));
            send(
                &mut engine,
                conns[sender],
                &clients[sender ^ 1],
                encode_body(sent, intended, sender as u32),
                common.qos(),
            );
            sent += 1;
        }
        let timeout = match schedule.next_due_ns(sent) {
            _ if spin => Duration::ZERO,
            Some(next) => {
                let wait =
                    Duration::from_nanos(next.saturating_sub(start.elapsed().as_nanos() as u64));
                if wait < SLEEP_BELOW {
                    // epoll_wait sleeps in whole milliseconds: sleep the short wait precisely,
                    // then only look at what arrived meanwhile. A delivery that arrived during
                    // the sleep is timestamped at most one send interval late.
                    std::thread::sleep(wait);
                    Duration::ZERO
                } else {
                    wait
                }
            }
            None => Duration::from_millis(5),
        };
        engine
            .turn(Some(timeout), &mut outcomes)
            .map_err(|e| e.to_string())?;
        let received_ns = start.elapsed().as_nanos() as u64;
        if spin && sent == sent_before && outcomes.is_empty() {
            idle_ns += received_ns - now_ns;
        }
        for (_, outcome) in outcomes.drain(..) {
            if let Some((_, intended, _)) = counters.count(&outcome) {
                recorder.record_intended(intended, received_ns);
            }
        }
    }
    let wall_seconds = start.elapsed().as_secs_f64();
    let (histogram, clamped) = recorder.counts();
    let mut failures: BTreeMap<String, u64> = counters
        .server_errors
        .iter()
        .map(|(code, count)| (format!("server_error_{code}"), *count))
        .collect();
    failures.extend(
        counters
            .failures
            .iter()
            .map(|(kind, count)| (kind.to_string(), *count)),
    );
    Ok(LatencyResult {
        scheduled: schedule.messages_total(),
        histogram,
        clamped,
        send_lag_max_ns: late_sends_max_ns,
        send_acked: counters.send_acked,
        receipts: counters.receipts,
        failures,
        cpu_seconds: cpu_seconds_self() - cpu_before,
        wall_seconds,
        server_cpu_seconds: server_before
            .zip(server_cpu(common))
            .map(|(before, after)| after - before),
        redirects: engine.redirects,
        spread: engine.spread.clone(),
        bad_redirect: engine.bad_redirect.clone(),
        admission_refused: engine
            .admission_refused
            .iter()
            .map(|(reason, count)| (reason.to_string(), *count))
            .collect(),
        rate_limited: engine.rate_limited,
        idle_seconds: idle_ns as f64 / 1e9,
    })
}

/// The report of `latency` from its generator processes' results (one, or one each).
pub fn latency_report(
    common: &Common,
    options: &LatencyOptions,
    results: &[LatencyResult],
) -> Report {
    let mut report = common.report("latency");
    let mut recorder = LatencyRecorder::new();
    let mut scheduled = 0;
    let mut send_lag_max_ns = 0;
    let (mut send_acked, mut receipts) = (0, 0);
    let (mut cpu_seconds, mut wall_seconds, mut idle_seconds) = (0.0, 0.0f64, 0.0);
    for result in results {
        idle_seconds += result.idle_seconds;
        recorder.merge(&LatencyRecorder::from_counts(
            &result.histogram,
            result.clamped,
        ));
        scheduled += result.scheduled;
        send_lag_max_ns = send_lag_max_ns.max(result.send_lag_max_ns);
        send_acked += result.send_acked;
        receipts += result.receipts;
        cpu_seconds += result.cpu_seconds;
        wall_seconds = wall_seconds.max(result.wall_seconds);
        for (kind, count) in &result.failures {
            *report.failures.entry(kind.clone()).or_default() += count;
        }
        report.redirects += result.redirects;
        ServerSpread::add(&mut report.spread, &result.spread);
        for (reason, count) in &result.admission_refused {
            *report.admission_refused.entry(reason.clone()).or_default() += count;
        }
        report.rate_limited += result.rate_limited;
        if let Some(why) = &result.bad_redirect {
            report
                .notes
                .push(format!("a redirect could not be followed: {why}"));
        }
    }
    let processes = results.len() as u32;
    report.figure("pairs", options.pairs as f64, "pairs");
    report.figure("offered_rate", options.rate_per_second as f64, "msg/s");
    report.figure("scheduled", scheduled as f64, "messages");
    report.figure("delivered", recorder.len() as f64, "messages");
    report.figure(
        "lost_or_late",
        scheduled.saturating_sub(recorder.len()) as f64,
        "messages",
    );
    report.figure(
        "achieved_rate",
        recorder.len() as f64 / (options.duration_ms as f64 / 1000.0),
        "msg/s",
    );
    report.figure(
        "generator_send_lag_max",
        send_lag_max_ns as f64 / 1000.0,
        "µs",
    );
    report.figure("send_acks", send_acked as f64, "acks");
    if report.target == "hop" {
        report.figure("receipts", receipts as f64, "receipts");
    }
    report.latency = Some(recorder.summary());
    report.latency_curve = recorder.percentile_curve();
    report.generator_cpu = CpuUse::new(processes, cpu_seconds, wall_seconds);
    // The server's CPU over one process's measurement: they overlap but do not coincide.
    let server = results
        .iter()
        .find_map(|result| Some((result.server_cpu_seconds?, result.wall_seconds)));
    if let Some((seconds, wall)) = server {
        report.server_cpu = Some(CpuUse::new(1, seconds, wall));
    }
    // Each process is one thread: it can use one core, and all of them the cores they may run
    // on (taskset), whichever is fewer.
    let allowed = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    let capacity = allowed.min(results.len().max(1)) as f64;
    // A spinning generator uses its cores whatever its load: its polls that found nothing are
    // not work.
    let busy = if options.wait == Wait::Spin {
        CpuUse::new(
            processes,
            (cpu_seconds - idle_seconds).max(0.0),
            wall_seconds,
        )
        .cores_busy
    } else {
        report.generator_cpu.cores_busy
    };
    if options.wait == Wait::Spin {
        report.figure("generator_busy", busy, "cores");
    }
    if busy > 0.9 * capacity {
        report.notes.push(format!(
            "the generator was saturated: {busy:.2} of the {capacity} core(s) its processes can \
             run on, and its sends fell behind the schedule by up to {:.1} ms; these figures \
             may be the generator's limit (more processes, on more cores, offer more)",
            send_lag_max_ns as f64 / 1e6
        ));
    } else if busy > 0.9
        && report
            .server_cpu
            .is_some_and(|server| server.cores_busy < 0.9)
    {
        report.notes.push(
            "the generator was busier than the server: these figures may be the generator's limit"
                .into(),
        );
    }
    if processes > 1 {
        report.notes.push(format!(
            "{processes} generator processes, each with its share of the pairs and of the rate"
        ));
    }
    report.notes.push(
        "latency counts from each message's intended send time (open loop, coordinated omission corrected)".into(),
    );
    report.notes.push(match options.wait {
        Wait::Spin => format!(
            "the generator spun (--wait spin): deliveries timestamped as they arrived; {idle_seconds:.1} s \
             of its {cpu_seconds:.1} s of CPU were polls that found nothing, so it was busy {busy:.2} cores"
        ),
        Wait::Sleep => "the generator slept between sends (--wait sleep): a delivery counts from \
                        the end of the sleep it arrived in, up to one wake-up late"
            .into(),
    });
    report
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeilingOptions {
    pub connections: u64,
    /// New connections per second (full handshake each).
    pub rate_per_second: u64,
    pub pending_max: usize,
    pub handshake_timeout_ms: u64,
    /// How long to hold the connections once the ramp ends.
    pub hold_ms: u64,
    pub heartbeat_ms: u64,
    /// Stop opening after this many failures.
    pub failures_max: u64,
}

/// What one generator process measured in `ceiling`; summed across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CeilingResult {
    pub attempted: u64,
    pub opened: u64,
    /// Open at the end of the hold.
    pub held: u64,
    pub ramp_seconds: f64,
    /// When the last connection opened, from the start: the handshake rate's interval.
    pub last_open_seconds: f64,
    pub failures: BTreeMap<String, u64>,
    /// Connections that opened and were later closed by the server or the network.
    pub dropped: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub over_time: Vec<(f64, u64)>,
    pub handshake_latency: LatencySummary,
    /// Why the ramp stopped before its target, if it did.
    pub stopped_by: Option<String>,
    /// Connections sent to another node of a cluster (GoAway REDIRECT) and followed.
    #[serde(default)]
    pub redirects: u64,
    /// Per server: connections opened to it first, and how many of them were redirected.
    #[serde(default)]
    pub spread: Vec<ServerSpread>,
    #[serde(default)]
    pub bad_redirect: Option<String>,
    /// Refusals at admission waited out, by reason.
    #[serde(default)]
    pub admission_refused: BTreeMap<String, u64>,
}

/// Opens connections at a fixed rate up to a target or until failures pile up, then holds
/// them with heartbeats. `on_ramped` is called once when the ramp ends, while the
/// connections are held (the caller samples memory then).
pub fn ceiling_local(
    common: &Common,
    options: &CeilingOptions,
    on_ramped: &mut dyn FnMut(u64),
) -> Result<CeilingResult, String> {
    let mut engine = common.engine(options.connections)?;
    engine.set_connect_timeout(Duration::from_millis(options.handshake_timeout_ms));
    let tag = run_tag();
    let schedule = Schedule::new(options.rate_per_second, options.connections);
    let mut result = CeilingResult::default();
    let mut pending: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut open: Vec<usize> = Vec::new();
    let mut handshake_latency = LatencyRecorder::new();
    let mut outcomes = Vec::new();
    let mut failures_total = 0u64;
    let cpu_before = cpu_seconds_self();
    let start = Instant::now();
    let mut ramp_end: Option<Instant> = None;
    let mut last_sample = start;
    let mut last_timeout_check = start;
    let mut heartbeat_next = 0usize;
    let mut heartbeat_at = start;
    let mut generator_limit_streak = 0;
    loop {
        let now = Instant::now();
        let elapsed_ns = now.duration_since(start).as_nanos() as u64;
        if ramp_end.is_none() {
            let due = schedule.due_at(elapsed_ns);
            while result.attempted < due
                && pending.len() < options.pending_max
                && result.stopped_by.is_none()
            {
                let client = Client::new(common.target, &tag, result.attempted as usize)?;
                result.attempted += 1;
                match engine.open(client.identity(true, None)) {
                    Ok(conn) => {
                        pending.insert(conn, Instant::now());
                        generator_limit_streak = 0;
                    }
                    Err(failure) => {
                        *result.failures.entry(failure.name().into()).or_default() += 1;
                        failures_total += 1;
                        if failure == Failure::GeneratorLimit {
                            generator_limit_streak += 1;
                            if generator_limit_streak >= 100 {
                                result.stopped_by =
                                    Some("the generator's own limit (descriptors or ports)".into());
                            }
                        }
                    }
                }
            }
            if failures_total >= options.failures_max && result.stopped_by.is_none() {
                result.stopped_by =
                    Some(format!("{failures_total} failures (see failures by kind)"));
            }
            let attempts_done =
                result.attempted >= options.connections || result.stopped_by.is_some();
            if attempts_done && pending.is_empty() {
                ramp_end = Some(now);
                result.ramp_seconds = now.duration_since(start).as_secs_f64();
                heartbeat_at = now;
                on_ramped(open.len() as u64);
            }
        }
        if let Some(ended) = ramp_end {
            if now.duration_since(ended) >= Duration::from_millis(options.hold_ms) {
                break;
            }
            // Heartbeats: every open connection pings once per heartbeat period, spread out.
            if now >= heartbeat_at && !open.is_empty() {
                let per_tick =
                    (open.len() as u64 * 10 / options.heartbeat_ms.max(10)).max(1) as usize;
                for _ in 0..per_tick.min(open.len()) {
                    heartbeat_next %= open.len();
                    engine.ping(open[heartbeat_next], heartbeat_next as u64);
                    heartbeat_next += 1;
                }
                heartbeat_at = now + Duration::from_millis(10);
            }
        }
        if now.duration_since(last_timeout_check) >= Duration::from_millis(100) {
            last_timeout_check = now;
            let limit = Duration::from_millis(options.handshake_timeout_ms);
            let expired: Vec<usize> = pending
                .iter()
                .filter(|(_, since)| now.duration_since(**since) > limit)
                .map(|(conn, _)| *conn)
                .collect();
            for conn in expired {
                pending.remove(&conn);
                engine.close(conn);
                *result.failures.entry("timeout".into()).or_default() += 1;
                failures_total += 1;
            }
        }
        if now.duration_since(last_sample) >= Duration::from_millis(100) {
            last_sample = now;
            result
                .over_time
                .push((now.duration_since(start).as_secs_f64(), open.len() as u64));
        }
        let timeout = if ramp_end.is_none() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        };
        engine
            .turn(Some(timeout), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (conn, outcome) in outcomes.drain(..) {
            match outcome {
                Outcome::Event(Event::Opened) => {
                    if let Some(since) = pending.remove(&conn) {
                        handshake_latency.record_intended(0, since.elapsed().as_nanos() as u64);
                        result.opened += 1;
                        result.last_open_seconds = start.elapsed().as_secs_f64();
                        open.push(conn);
                    }
                }
                Outcome::Failed(failure) => {
                    if pending.remove(&conn).is_some() {
                        *result.failures.entry(failure.name().into()).or_default() += 1;
                        failures_total += 1;
                    } else if let Some(at) = open.iter().position(|c| *c == conn) {
                        open.swap_remove(at);
                        *result.dropped.entry(failure.name().into()).or_default() += 1;
                    }
                }
                Outcome::Event(_) => {}
            }
        }
    }
    result.held = open.len() as u64;
    result.wall_seconds = start.elapsed().as_secs_f64();
    result.cpu_seconds = cpu_seconds_self() - cpu_before;
    result.over_time.push((result.wall_seconds, result.held));
    result.handshake_latency = handshake_latency.summary();
    result.redirects = engine.redirects;
    result.spread = engine.spread.clone();
    result.bad_redirect = engine.bad_redirect.clone();
    result.admission_refused = engine
        .admission_refused
        .iter()
        .map(|(reason, count)| (reason.to_string(), *count))
        .collect();
    Ok(result)
}

/// Fills a report from the (summed) ceiling results.
pub fn ceiling_report(
    common: &Common,
    options: &CeilingOptions,
    processes: u32,
    results: &[CeilingResult],
) -> Report {
    let mut report = common.report("ceiling");
    let sum = |f: fn(&CeilingResult) -> u64| results.iter().map(f).sum::<u64>();
    let ramp_seconds = results.iter().map(|r| r.ramp_seconds).fold(0.0, f64::max);
    let opening_seconds = results
        .iter()
        .map(|r| r.last_open_seconds)
        .fold(0.0, f64::max);
    let opened = sum(|r| r.opened);
    report.figure(
        "target_connections",
        options.connections as f64,
        "connections",
    );
    report.figure(
        "offered_connect_rate",
        options.rate_per_second as f64,
        "conn/s",
    );
    report.figure("attempted", sum(|r| r.attempted) as f64, "connections");
    report.figure("opened", opened as f64, "connections");
    report.figure("held", sum(|r| r.held) as f64, "connections");
    report.figure("ramp_seconds", ramp_seconds, "s");
    report.figure("opening_seconds", opening_seconds, "s");
    report.figure(
        "handshakes_per_second",
        if opening_seconds > 0.0 {
            opened as f64 / opening_seconds
        } else {
            0.0
        },
        "handshakes/s",
    );
    for result in results {
        for (kind, count) in &result.failures {
            *report.failures.entry(kind.clone()).or_default() += count;
        }
        for (kind, count) in &result.dropped {
            *report
                .failures
                .entry(format!("dropped_after_open_{kind}"))
                .or_default() += count;
        }
        if let Some(why) = &result.stopped_by {
            report.notes.push(format!("ramp stopped by {why}"));
        }
        report.redirects += result.redirects;
        ServerSpread::add(&mut report.spread, &result.spread);
        for (reason, count) in &result.admission_refused {
            *report.admission_refused.entry(reason.clone()).or_default() += count;
        }
        if let Some(why) = &result.bad_redirect {
            report
                .notes
                .push(format!("a redirect could not be followed: {why}"));
        }
    }
    if let Some(first) = results.first() {
        report.latency = Some(first.handshake_latency);
        report
            .notes
            .push("latency rows: connect + handshake time of process 1's connections".into());
    }
    // Connections over time: sum the processes' samples on a 100 ms grid.
    let mut grid: BTreeMap<u64, u64> = BTreeMap::new();
    for result in results {
        let mut last = 0;
        let mut samples = result.over_time.iter().peekable();
        let end = (result.wall_seconds * 10.0) as u64;
        for tick in 0..=end {
            while let Some((t, n)) = samples.peek() {
                if (*t * 10.0) as u64 <= tick {
                    last = *n;
                    samples.next();
                } else {
                    break;
                }
            }
            *grid.entry(tick).or_default() += last;
        }
    }
    report.connections_over_time = grid
        .into_iter()
        .map(|(tick, n)| (tick as f64 / 10.0, n))
        .collect();
    let cpu: f64 = results.iter().map(|r| r.cpu_seconds).sum();
    let wall = results.iter().map(|r| r.wall_seconds).fold(0.0, f64::max);
    report.generator_cpu = CpuUse::new(processes, cpu, wall);
    report
}

#[derive(Debug, Clone)]
pub struct OfflineOptions {
    pub senders: usize,
    pub recipients: usize,
    pub messages: u64,
    /// Messages per sender not yet acked by the server (ServerAck / PUBACK).
    pub window: u64,
}

/// N messages to recipients that are offline (they connected once, so they exist), then the
/// recipients connect and drain. Enqueue rate: messages acked by the server per second;
/// drain rate: messages delivered per second from the recipients' first connect.
pub fn offline(common: &Common, options: &OfflineOptions) -> Result<Report, String> {
    assert!(
        options.senders > 0 && options.recipients > 0,
        "senders and recipients"
    );
    let all = clients(common, options.senders + options.recipients)?;
    let (recipients, senders) = all.split_at(options.recipients);
    let mut engine = common.engine((options.senders + 2 * options.recipients) as u64)?;
    // Phase 1: recipients come online once (persistent QoS 1 sessions on MQTT), then leave.
    let first = open_all(&mut engine, recipients, false, Some(1))?;
    for conn in first {
        engine.close(conn);
    }
    let mut outcomes = Vec::new();
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        engine
            .turn(Some(Duration::from_millis(20)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        outcomes.clear();
    }
    // Phase 2: enqueue.
    let sender_conns = open_all(&mut engine, senders, true, None)?;
    let mut everyone: Vec<Client> = senders.to_vec();
    everyone.extend_from_slice(recipients);
    let mut counters = Counters::default();
    let cpu_before = cpu_seconds_self();
    let server_before = server_cpu(common);
    let start = Instant::now();
    let mut sent = vec![0u64; options.senders];
    let mut acked = vec![0u64; options.senders];
    let by_conn: BTreeMap<usize, usize> = sender_conns
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i))
        .collect();
    let mut total_sent = 0u64;
    let mut rejected = 0u64;
    let deadline = start + SETUP_TIMEOUT;
    while acked.iter().sum::<u64>() + rejected < options.messages {
        if Instant::now() > deadline {
            return Err("enqueue did not finish within 60 s".into());
        }
        for s in 0..options.senders {
            while sent[s] - acked[s] < options.window && total_sent < options.messages {
                let to = options.senders + (total_sent as usize % options.recipients);
                send(
                    &mut engine,
                    sender_conns[s],
                    &everyone[to],
                    encode_body(total_sent, 0, s as u32),
                    1,
                );
                sent[s] += 1;
                total_sent += 1;
            }
        }
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (conn, outcome) in outcomes.drain(..) {
            let sender = by_conn.get(&conn).copied();
            match (&outcome, sender) {
                (Outcome::Event(Event::SendAcked), Some(s)) => acked[s] += 1,
                (
                    Outcome::Event(Event::ServerError {
                        send_refused: true, ..
                    }),
                    Some(s),
                ) => {
                    acked[s] += 1;
                    rejected += 1;
                }
                _ => {}
            }
            counters.count(&outcome);
        }
    }
    let enqueue_seconds = start.elapsed().as_secs_f64();
    // Phase 3: recipients return and drain.
    let drain_start = Instant::now();
    let mut delivered = 0u64;
    let expected = options.messages - rejected;
    let mut pending: Vec<usize> = Vec::new();
    for recipient in recipients {
        let conn = engine
            .open(recipient.identity(false, None))
            .map_err(|f| format!("reconnecting a recipient: {}", f.name()))?;
        pending.push(conn);
    }
    while delivered < expected {
        if drain_start.elapsed() > SETUP_TIMEOUT {
            counters
                .failures
                .insert("drain_timeout", expected - delivered);
            break;
        }
        engine
            .turn(Some(Duration::from_millis(10)), &mut outcomes)
            .map_err(|e| e.to_string())?;
        for (_, outcome) in outcomes.drain(..) {
            if counters.count(&outcome).is_some() {
                delivered += 1;
            }
        }
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    let mut report = common.report("offline");
    engine_report(&mut report, &engine);
    report.figure("messages", options.messages as f64, "messages");
    report.figure("rejected", rejected as f64, "messages");
    report.figure("enqueue_seconds", enqueue_seconds, "s");
    report.figure(
        "enqueue_per_second",
        (options.messages - rejected) as f64 / enqueue_seconds,
        "msg/s",
    );
    report.figure("delivered", delivered as f64, "messages");
    report.figure("drain_seconds", drain_seconds, "s");
    report.figure(
        "drain_per_second",
        delivered as f64 / drain_seconds,
        "msg/s",
    );
    counters.into_report(&mut report);
    cpu_report(
        &mut report,
        common,
        cpu_before,
        server_before,
        enqueue_seconds + drain_seconds,
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_is_refused_only_where_the_kernel_would_stop_it() {
        assert!(spin_allowed(Some(RealTimeThrottle::NotRealTime)).is_ok());
        assert!(spin_allowed(Some(RealTimeThrottle::Lifted)).is_ok());
        assert!(spin_allowed(None).is_ok(), "unknown: not refused");
        let error = spin_allowed(Some(RealTimeThrottle::Throttled {
            runtime_us: 950_000,
            period_us: 1_000_000,
        }))
        .unwrap_err();
        assert!(error.contains("950000 µs of every 1000000 µs"), "{error}");
        assert!(error.contains("--wait sleep"), "{error}");
    }

    #[test]
    fn body_round_trips_and_is_24_bytes() {
        let body = encode_body(7, 123_456_789, 42);
        assert_eq!(body.len(), BODY_BYTES);
        assert_eq!(decode_body(&body), Some((7, 123_456_789, 42)));
        assert_eq!(decode_body(b"short"), None);
    }

    #[test]
    fn ceiling_sums_processes_on_one_time_grid() {
        let common = Common {
            servers: ["127.0.0.1:1", "127.0.0.1:2"]
                .map(|address| Server {
                    address: address.parse().unwrap(),
                    pin: None,
                })
                .to_vec(),
            target: Target::Mqtt {
                login: false,
                qos: 0,
            },
            server_pid: None,
            source_offset: 0,
            client_offset: 0,
        };
        let options = CeilingOptions {
            connections: 30_000,
            rate_per_second: 1_000,
            pending_max: 100,
            handshake_timeout_ms: 1_000,
            hold_ms: 0,
            heartbeat_ms: 1_000,
            failures_max: 10,
        };
        let one = CeilingResult {
            attempted: 15_000,
            opened: 15_000,
            held: 14_000,
            ramp_seconds: 3.0,
            last_open_seconds: 2.0,
            failures: BTreeMap::from([("refused".to_string(), 3)]),
            wall_seconds: 0.25,
            over_time: vec![(0.0, 0), (0.1, 10), (0.2, 20)],
            redirects: 7,
            spread: vec![
                ServerSpread {
                    server: "127.0.0.1:1".into(),
                    first_connects: 7_500,
                    redirected: 3,
                },
                ServerSpread {
                    server: "127.0.0.1:2".into(),
                    first_connects: 7_500,
                    redirected: 4,
                },
            ],
            ..Default::default()
        };
        let report = ceiling_report(&common, &options, 2, &[one.clone(), one]);
        assert_eq!(report.value("held"), Some(28_000.0));
        assert_eq!(report.value("handshakes_per_second"), Some(15_000.0));
        assert_eq!(report.failures.get("refused"), Some(&6));
        assert_eq!(
            report.connections_over_time,
            [(0.0, 0), (0.1, 20), (0.2, 40)]
        );
        assert_eq!(report.generator_cpu.processes, 2);
        assert_eq!(report.redirects, 14);
        assert_eq!(report.server, "127.0.0.1:1,127.0.0.1:2");
        let spread: Vec<(&str, u64, u64)> = report
            .spread
            .iter()
            .map(|s| (s.server.as_str(), s.first_connects, s.redirected))
            .collect();
        assert_eq!(
            spread,
            [("127.0.0.1:1", 15_000, 6), ("127.0.0.1:2", 15_000, 8)]
        );
    }
}
