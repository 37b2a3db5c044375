//! The generator end to end on loopback, against toy MQTT and hop servers in this test: scenarios
//! open their clients, send, receive, count and report. Nothing here asserts a speed; each
//! run is a few hundred milliseconds.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hop_bench::engine::{Server, Target};
use hop_bench::scenario::{self, Common, GroupOptions, LatencyOptions, ThroughputOptions, Wait};

type Subscribers = Arc<Mutex<HashMap<Vec<u8>, Vec<TcpStream>>>>;

/// QoS 1 deliveries the toy brokers' subscribers PUBACKed, over every test of this file.
static DELIVERIES_ACKED: AtomicU64 = AtomicU64::new(0);

/// A broker that knows just enough MQTT 3.1.1: CONNECT, SUBSCRIBE, PUBLISH (routed to every
/// subscriber of the topic at the QoS it was published with; a QoS 1 publish is PUBACKed),
/// PUBACK (counted in [`DELIVERIES_ACKED`]), PINGREQ, DISCONNECT. One thread per client.
fn toy_broker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let subscribers: Subscribers = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let subscribers = subscribers.clone();
            std::thread::spawn(move || serve(stream, &subscribers));
        }
    });
    addr
}

fn serve(mut stream: TcpStream, subscribers: &Subscribers) {
    stream.set_nodelay(true).unwrap();
    while let Some((first, body)) = read_packet(&mut stream) {
        match first >> 4 {
            1 => stream.write_all(&[0x20, 2, 0, 0]).unwrap(),
            8 => {
                let topic_bytes = usize::from(u16::from_be_bytes([body[2], body[3]]));
                let topic = body[4..4 + topic_bytes].to_vec();
                subscribers
                    .lock()
                    .unwrap()
                    .entry(topic)
                    .or_default()
                    .push(stream.try_clone().unwrap());
                stream.write_all(&[0x90, 3, body[0], body[1], 0]).unwrap();
            }
            3 => {
                let topic_bytes = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let topic = &body[2..2 + topic_bytes];
                if first & 0x06 == 0x02 {
                    let id = &body[2 + topic_bytes..4 + topic_bytes];
                    stream.write_all(&[0x40, 2, id[0], id[1]]).unwrap();
                }
                let mut packet = vec![first & 0xF6, body.len() as u8];
                packet.extend_from_slice(&body);
                for subscriber in subscribers
                    .lock()
                    .unwrap()
                    .get_mut(topic)
                    .into_iter()
                    .flatten()
                {
                    let _ = subscriber.write_all(&packet);
                }
            }
            4 => {
                DELIVERIES_ACKED.fetch_add(1, Ordering::Relaxed);
            }
            12 => stream.write_all(&[0xD0, 0]).unwrap(),
            _ => return,
        }
    }
}

fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).ok()?;
    let first = byte[0];
    let (mut length, mut shift) = (0usize, 0);
    loop {
        stream.read_exact(&mut byte).ok()?;
        length |= usize::from(byte[0] & 0x7F) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some((first, body))
}

fn common(server: SocketAddr) -> Common {
    common_at_qos(server, 0)
}

fn common_at_qos(server: SocketAddr, qos: u8) -> Common {
    Common {
        servers: vec![Server {
            address: server,
            pin: None,
        }],
        target: Target::Mqtt { login: false, qos },
        server_pid: Some(std::process::id()),
        source_offset: 0,
        client_offset: 0,
    }
}

#[test]
fn throughput_moves_messages_both_ways_and_reports_them() {
    let server = toy_broker();
    let options = ThroughputOptions {
        pairs: 3,
        window: 8,
        warmup_ms: 100,
        duration_ms: 300,
    };
    let report = scenario::throughput(&common(server), &options).unwrap();
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(report.value("bytes_to_server_per_second").unwrap() > 0.0);
    assert!(report.value("bytes_from_server_per_second").unwrap() > 0.0);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.server_cpu.is_some(), "--server-pid was given");
    assert!(report.table().contains("messages_per_second"));
}

/// At QoS 1 every publish is PUBACKed by the broker (counted as `send_acks`) and every
/// delivery by the generator's subscriber; at QoS 0 neither.
#[test]
fn throughput_at_qos_1_acks_both_ways() {
    let options = ThroughputOptions {
        pairs: 2,
        window: 4,
        warmup_ms: 100,
        duration_ms: 300,
    };
    let report = scenario::throughput(&common(toy_broker()), &options).unwrap();
    assert_eq!(report.value("send_acks"), Some(0.0));
    let acked_before = DELIVERIES_ACKED.load(Ordering::Relaxed);
    let report = scenario::throughput(&common_at_qos(toy_broker(), 1), &options).unwrap();
    assert!(
        report.value("send_acks").unwrap() > 0.0,
        "{}",
        report.table()
    );
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(DELIVERIES_ACKED.load(Ordering::Relaxed) > acked_before);
    assert!(report.notes.iter().any(|note| note.contains("QoS 1")));
}

/// Both ways of waiting deliver every message; a spinning generator reports how busy it was
/// apart from its idle polls.
#[test]
fn latency_delivers_every_scheduled_message() {
    for wait in [Wait::Sleep, Wait::Spin] {
        let server = toy_broker();
        let options = LatencyOptions {
            pairs: 2,
            rate_per_second: 1_000,
            duration_ms: 300,
            drain_ms: 2_000,
            wait,
        };
        let report = scenario::latency(&common(server), &options).unwrap();
        assert_eq!(report.value("scheduled"), Some(300.0));
        let notes = report.notes.join("\n");
        match wait {
            Wait::Spin => {
                // 300 sends 3.3 ms apart leave most polls with nothing to do.
                let busy = report
                    .value("generator_busy")
                    .expect("a spinning generator's busy figure");
                assert!(
                    busy < report.generator_cpu.cores_busy,
                    "{busy} {:?}",
                    report.generator_cpu
                );
                assert!(notes.contains("--wait spin"), "{notes}");
            }
            Wait::Sleep => {
                assert_eq!(report.value("generator_busy"), None);
                assert!(notes.contains("--wait sleep"), "{notes}");
            }
        }
        assert_latency_of_every_message(&report);
    }
}

fn assert_latency_of_every_message(report: &hop_bench::report::Report) {
    assert_eq!(report.value("delivered"), Some(300.0));
    let latency = report.latency.as_ref().unwrap();
    assert_eq!(latency.count, 300);
    assert!(latency.p50_us > 0.0 && latency.p50_us <= latency.max_us);
    assert!(!report.latency_curve.is_empty());
}

/// `--processes 2`: two generator processes, each with its share of the pairs and of the rate
/// (3 and 2 pairs, 600 and 400 msg/s); the report merges their histograms and counts and sums
/// their CPU.
#[test]
fn latency_across_processes_merges_what_each_measured() {
    let server = toy_broker();
    let json =
        std::env::temp_dir().join(format!("hop-bench-processes-{}.json", std::process::id()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hop-bench"))
        .args([
            "latency",
            "--target",
            "mqtt",
            "--server",
            &server.to_string(),
        ])
        .args(["--pairs", "5", "--rate", "1000", "--duration-ms", "300"])
        .args(["--drain-ms", "2000", "--processes", "2"])
        .args(["--server-pid", &std::process::id().to_string()])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let figure = |name: &str| {
        report["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|figure| figure["name"] == name)
            .and_then(|figure| figure["value"].as_f64())
    };
    assert_eq!(figure("scheduled"), Some(300.0), "180 and 120 messages");
    assert_eq!(figure("delivered"), Some(300.0));
    assert_eq!(figure("offered_rate"), Some(1000.0));
    assert_eq!(report["latency"]["count"], 300);
    assert_eq!(report["generator_cpu"]["processes"], 2);
    assert!(report["server_cpu"]["cores_busy"].is_number());
    let notes = report["notes"].to_string();
    assert!(notes.contains("2 generator processes"), "{notes}");
    // The children spun as the parent was told to (the default): their idle polls are left
    // out of how busy the generator was.
    let busy = figure("generator_busy").expect("spinning children's busy figure");
    assert!(
        busy < report["generator_cpu"]["cores_busy"].as_f64().unwrap(),
        "{busy}"
    );
}

#[test]
fn group_fans_each_message_out_to_every_subscriber() {
    let server = toy_broker();
    let report = scenario::group(&common(server), &small_groups()).unwrap();
    assert_group_report(&report);
}

/// 2 groups of 4 (each message reaches 3 members), briefly.
fn small_groups() -> GroupOptions {
    GroupOptions {
        members: 4,
        groups: 2,
        window: 4,
        warmup_ms: 100,
        duration_ms: 300,
    }
}

/// Messages were sent and fanned out, none lost, nothing failed.
fn assert_group_report(report: &hop_bench::report::Report) {
    assert_eq!(report.value("recipients_per_message"), Some(3.0));
    assert!(report.value("sends_per_second").unwrap() > 0.0);
    assert!(report.value("member_messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert_eq!(report.value("late"), Some(0.0));
    assert!(report.latency.unwrap().count > 0, "fan-out times measured");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

#[test]
fn a_server_that_is_not_there_fails_the_run_with_the_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    drop(listener);
    let options = ThroughputOptions {
        pairs: 1,
        window: 1,
        warmup_ms: 0,
        duration_ms: 10,
    };
    let error = scenario::throughput(&common(server), &options).unwrap_err();
    assert!(error.contains("refused"), "{error}");
}

/// A toy hop server: hop's own server state machine (`ServerConnection`) and router
/// (`hop_router::Router`, one shard) behind one lock, one thread per client. Just enough to
/// run the generator's hop path end to end: handshake with a pinned key, Send, ServerAck,
/// Deliver, Ack, Receipt, Ack, and groups (GroupChange, GroupInfo, events, fan-out). With
/// [`start_limited`], the router's sender rates and a refusal at admission for the first
/// connections, as hopd's limits answer.
mod toy_hop {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use hop_protocol::frame::FRAME_BODY_BYTES_MAX;
    use hop_protocol::noise::Refusal;
    use hop_protocol::session::{ServerConnection, ServerEvent};
    use hop_protocol::wire::Stanza;
    use hop_protocol::{StaticKey, UserId};
    use hop_router::quota::Rate;
    use hop_router::{Action, ConnRef, Limits, Queued, Router, Secrets};

    struct Shared {
        router: Router,
        connections: HashMap<ConnRef, (ServerConnection, TcpStream, Option<UserId>)>,
        /// The "disk": kept messages and group copies, by user and server id (the copies of
        /// a group message share its id).
        kept: HashMap<(UserId, u64), Queued>,
        /// The router's clock.
        started: Instant,
    }

    /// Starts the server; returns its address and public key.
    pub fn start() -> (SocketAddr, [u8; 32]) {
        // Like a benchmarked hopd: no sender rates (the generator sends far faster).
        start_limited(Rate::OFF, Vec::new())
    }

    /// Starts the server with `sender_messages` as each device's rate, and answers its first
    /// connections each with a refusal of `refusals` in place of handshake message 2.
    pub fn start_limited(sender_messages: Rate, refusals: Vec<Refusal>) -> (SocketAddr, [u8; 32]) {
        let key = StaticKey::generate().unwrap();
        let public = *key.public();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared {
            // No shares: the generator sends to few recipients.
            router: Router::new(
                0,
                1,
                Limits {
                    sender_messages,
                    sender_reads: Rate::OFF,
                    queue_sender_percent: 100,
                    shard_queue_sender_percent: 100,
                    ..Limits::default()
                },
                Secrets::derive(&[1; 32]),
            ),
            connections: HashMap::new(),
            kept: HashMap::new(),
            started: Instant::now(),
        }));
        let mut refusals = refusals.into_iter();
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { break };
                if let Some(refusal) = refusals.next() {
                    std::thread::spawn(move || refuse(stream, refusal));
                    continue;
                }
                stream.set_nodelay(true).unwrap();
                let conn = ConnRef(id as u64);
                let reader = stream.try_clone().unwrap();
                shared
                    .lock()
                    .unwrap()
                    .connections
                    .insert(conn, (ServerConnection::new(&key), stream, None));
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, reader, &shared));
            }
        });
        (addr, public)
    }

    /// Takes handshake message 1, answers with `refusal` and closes, as hopd's admission does;
    /// reads on until the client closes, so that the close is a FIN, not a reset.
    fn refuse(mut stream: TcpStream, refusal: Refusal) {
        let mut buffer = [0u8; 256];
        if !matches!(stream.read(&mut buffer), Ok(1..)) {
            return;
        }
        let mut frame = Vec::new();
        refusal.encode(&mut frame);
        let _ = stream.write_all(&frame);
        let _ = stream.shutdown(Shutdown::Write);
        while matches!(stream.read(&mut buffer), Ok(1..)) {}
    }

    fn serve(conn: ConnRef, mut reader: TcpStream, shared: &Mutex<Shared>) {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        loop {
            let Ok(bytes) = reader.read(&mut buffer) else {
                return;
            };
            if bytes == 0 {
                return;
            }
            let mut guard = shared.lock().unwrap();
            let state = &mut *guard;
            // One instant for the whole read: the Sends of one flight meet the same bucket.
            let now_ms = state.started.elapsed().as_millis() as u64;
            let Some((connection, stream, user)) = state.connections.get_mut(&conn) else {
                return;
            };
            let mut out = Vec::new();
            let mut events = Vec::new();
            connection
                .handle_input::<()>(&buffer[..bytes], &mut scratch, &mut out, &mut |event| {
                    events.push(event);
                    Ok(())
                })
                .unwrap();
            stream.write_all(&out).unwrap();
            for event in events {
                match event {
                    ServerEvent::Authenticated { client_key } => {
                        let id = UserId::from_public_key(&client_key);
                        *user = Some(id);
                        state.router.handle_connect(id, &client_key, conn, now_ms);
                    }
                    ServerEvent::Outdated { version } => panic!("a client of version {version}"),
                    ServerEvent::Stanza(stanza) => {
                        let id = user.expect("authenticated before stanzas");
                        state
                            .router
                            .handle_stanza(id, conn, stanza, now_ms)
                            .unwrap();
                    }
                }
            }
            let mut touched = Vec::new();
            while let Some(action) = state.router.poll_action() {
                // A disk in memory: an item is kept as soon as it is queued.
                let action = match action {
                    Action::Keep { user, item, keep } => {
                        let (id, kind) = (item.id(), item.ack_kind());
                        if matches!(item, Queued::Message { .. } | Queued::Group { .. }) {
                            state.kept.insert((user, id), item);
                        }
                        state.router.handle_kept(user, id, kind, keep, now_ms);
                        continue;
                    }
                    Action::Forget { user, id, .. } => {
                        state.kept.remove(&(user, id));
                        continue;
                    }
                    Action::DeliverKept {
                        conn,
                        user,
                        from,
                        id,
                        timestamp_ms,
                        proof,
                        ..
                    } => {
                        let stanza = match &state.kept[&(user, id)] {
                            Queued::Message { body, .. } => {
                                Stanza::deliver(from, id, timestamp_ms, body.clone(), proof)
                            }
                            Queued::Group {
                                group, body, event, ..
                            } => Stanza::deliver_group(
                                from,
                                *group,
                                id,
                                timestamp_ms,
                                body.clone(),
                                proof,
                                *event,
                            ),
                            other => panic!("the toy keeps no {other:?}"),
                        };
                        Action::Send { conn, stanza }
                    }
                    other => other,
                };
                if let Action::Send { conn, stanza } = action {
                    let (target, _, _) = state.connections.get_mut(&conn).unwrap();
                    let mut sink = Vec::new();
                    target.channel().unwrap().queue(&stanza, &mut sink);
                    assert!(sink.is_empty(), "small stanzas share a frame");
                    touched.push(conn);
                }
            }
            touched.sort_by_key(|c| c.0);
            touched.dedup();
            for conn in touched {
                let (target, stream, _) = state.connections.get_mut(&conn).unwrap();
                let mut frame = Vec::new();
                target.channel().unwrap().flush(&mut frame);
                stream.write_all(&frame).unwrap();
            }
        }
    }
}

fn hop_common(server: SocketAddr, key: [u8; 32]) -> Common {
    hop_common_spread(&[(server, key)])
}

/// hop clients spread over `servers`, each pinned to its own key.
fn hop_common_spread(servers: &[(SocketAddr, [u8; 32])]) -> Common {
    Common {
        servers: servers
            .iter()
            .map(|&(address, key)| Server {
                address,
                pin: Some(key),
            })
            .collect(),
        target: Target::Hop {
            delivered_in_ack: true,
        },
        server_pid: None,
        source_offset: 0,
        client_offset: 0,
    }
}

#[test]
fn hop_throughput_runs_the_whole_protocol() {
    let (server, key) = toy_hop::start();
    let options = ThroughputOptions {
        pairs: 2,
        window: 4,
        warmup_ms: 300,
        duration_ms: 300,
    };
    let report = scenario::throughput(&hop_common(server, key), &options).unwrap();
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    // Every delivered message earned its sender a ServerAck and a delivered receipt.
    assert!(report.value("send_acks").unwrap() > 0.0);
    assert!(report.value("receipts").unwrap() > 0.0);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

#[test]
fn hop_group_creates_its_groups_and_fans_out() {
    let (server, key) = toy_hop::start();
    let report = scenario::group(&hop_common(server, key), &small_groups()).unwrap();
    assert_group_report(&report);
    // The sender acks a delivered receipt from each member's device.
    assert!(report.value("receipts").unwrap() > 0.0);
}

#[test]
fn hop_refuses_a_server_with_another_key() {
    let (server, _) = toy_hop::start();
    let options = LatencyOptions {
        pairs: 1,
        rate_per_second: 100,
        duration_ms: 10,
        drain_ms: 10,
        wait: Wait::Spin,
    };
    let error = scenario::latency(&hop_common(server, [9; 32]), &options).unwrap_err();
    assert!(error.contains("protocol"), "{error}");
}

/// A toy node of a cluster that is no user's home: it runs the handshake and answers every
/// client with a GoAway REDIRECT to `home` (the address and key a cluster would name), then
/// closes. With `home` `None` it sends clients to itself.
fn redirector(home: Option<(SocketAddr, [u8; 32])>) -> (SocketAddr, [u8; 32]) {
    let (addr, key, _) = counting_redirector(home);
    (addr, key)
}

/// [`redirector`], also counting the handshakes it finished (each one a client it redirected).
fn counting_redirector(
    home: Option<(SocketAddr, [u8; 32])>,
) -> (SocketAddr, [u8; 32], Arc<AtomicU64>) {
    use hop_protocol::frame::FRAME_BODY_BYTES_MAX;
    use hop_protocol::session::{ServerConnection, ServerEvent};
    use hop_protocol::wire::Stanza;
    use hop_protocol::StaticKey;

    let key = StaticKey::generate().unwrap();
    let public = *key.public();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (home, home_key) = home.unwrap_or((addr, public));
    let redirected = Arc::new(AtomicU64::new(0));
    let counted = redirected.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut connection = ServerConnection::new(&key);
            let mut buffer = vec![0u8; 64 * 1024];
            let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
            while !connection.is_open() {
                let Ok(bytes @ 1..) = stream.read(&mut buffer) else {
                    break;
                };
                let mut out = Vec::new();
                connection
                    .handle_input::<()>(&buffer[..bytes], &mut scratch, &mut out, &mut |event| {
                        assert!(!matches!(event, ServerEvent::Outdated { .. }));
                        Ok(())
                    })
                    .unwrap();
                stream.write_all(&out).unwrap();
            }
            if let Some(channel) = connection.channel() {
                counted.fetch_add(1, Ordering::Relaxed);
                let mut out = Vec::new();
                channel.queue(
                    &Stanza::go_away_redirect(home.to_string(), &home_key),
                    &mut out,
                );
                channel.flush(&mut out);
                let _ = stream.write_all(&out);
            }
        }
    });
    (addr, public, redirected)
}

#[test]
fn hop_clients_follow_a_redirect_to_their_home_node() {
    let home = toy_hop::start();
    let (entry, entry_key) = redirector(Some(home));
    let options = ThroughputOptions {
        pairs: 2,
        window: 4,
        warmup_ms: 300,
        duration_ms: 300,
    };
    let report = scenario::throughput(&hop_common(entry, entry_key), &options).unwrap();
    assert_eq!(report.redirects, 4, "each of the 4 clients once");
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

/// A cluster of two nodes: the home of every client (the toy hop server) and a node that
/// redirects every client there, each with its own key. Spread over both, clients 0 and 2
/// start at home and clients 1 and 3 on the other node, which sends them home: both nodes take
/// first connections, each pinned to its own key, and every client ends at home.
#[test]
fn hop_clients_spread_over_two_nodes_and_end_at_home() {
    let (home, home_key) = toy_hop::start();
    let (other, other_key, redirected) = counting_redirector(Some((home, home_key)));
    let options = ThroughputOptions {
        pairs: 2,
        window: 4,
        warmup_ms: 300,
        duration_ms: 300,
    };
    let common = hop_common_spread(&[(home, home_key), (other, other_key)]);
    let report = scenario::throughput(&common, &options).unwrap();
    assert_eq!(
        redirected.load(Ordering::Relaxed),
        2,
        "the second node took clients 1 and 3 first"
    );
    let spread: Vec<(String, u64, u64)> = report
        .spread
        .iter()
        .map(|s| (s.server.clone(), s.first_connects, s.redirected))
        .collect();
    assert_eq!(
        spread,
        [(home.to_string(), 2, 0), (other.to_string(), 2, 2)],
        "{}",
        report.table()
    );
    assert_eq!(report.redirects, 2);
    assert_eq!(report.server, format!("{home},{other}"));
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

/// The nodes of a cluster have keys of their own: one key given for two of them pins the
/// second node to the first's key, and its handshake fails instead of being trusted.
#[test]
fn hop_one_key_for_two_nodes_with_their_own_keys_fails_at_the_second() {
    let (home, home_key) = toy_hop::start();
    let (other, _) = redirector(Some((home, home_key)));
    let options = ThroughputOptions {
        pairs: 1,
        window: 1,
        warmup_ms: 0,
        duration_ms: 10,
    };
    let common = hop_common_spread(&[(home, home_key), (other, home_key)]);
    let error = scenario::throughput(&common, &options).unwrap_err();
    assert!(
        error.contains("client 1 failed while opening: protocol"),
        "{error}"
    );
}

#[test]
fn hop_clients_give_up_after_three_redirects() {
    let (entry, entry_key) = redirector(None);
    let options = ThroughputOptions {
        pairs: 1,
        window: 1,
        warmup_ms: 0,
        duration_ms: 10,
    };
    let error = scenario::throughput(&hop_common(entry, entry_key), &options).unwrap_err();
    assert!(error.contains("too_many_redirects"), "{error}");
    assert!(error.contains("more than 3"), "{error}");
}

/// A hopd past a sender's rate refuses the Send with `RATE_LIMITED` and keeps nothing of it.
/// The generator must count it apart from failures, wait the time named, and send it again:
/// otherwise the run measures messages lost to the limit, not delivered ones.
#[test]
fn hop_senders_wait_out_their_rate_and_every_message_arrives() {
    use hop_router::quota::Rate;

    // A burst of 2 and a window of 8: each sender's first flight alone has 6 Sends refused,
    // however fast the machine.
    let rate = Rate {
        per_second: 20,
        burst: 2,
    };
    let (server, key) = toy_hop::start_limited(rate, Vec::new());
    let options = ThroughputOptions {
        pairs: 1,
        window: 8,
        warmup_ms: 200,
        duration_ms: 400,
    };
    let report = scenario::throughput(&hop_common(server, key), &options).unwrap();
    assert!(report.rate_limited >= 2 * 6, "{}", report.table());
    assert!(report.is_limited());
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0), "{}", report.table());
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.table().contains("the server was limiting"));
}

/// A hopd under its admission limits answers a new connection with a refusal and its wait.
/// The generator must wait it out and connect again (within its connect timeout), counting
/// the refusal by reason rather than failing the client.
#[test]
fn hop_clients_refused_at_admission_connect_again_after_the_wait() {
    use hop_protocol::noise::{Refusal, RefusalReason};

    let refusal = |reason, retry_after_ms| Refusal {
        reason,
        retry_after_ms,
    };
    let refusals = vec![
        refusal(RefusalReason::Busy, 50),
        refusal(RefusalReason::Busy, 20),
        refusal(RefusalReason::AddressRate, 30),
    ];
    let (server, key) = toy_hop::start_limited(hop_router::quota::Rate::OFF, refusals);
    let options = ThroughputOptions {
        pairs: 2,
        window: 4,
        warmup_ms: 200,
        duration_ms: 300,
    };
    let report = scenario::throughput(&hop_common(server, key), &options).unwrap();
    let expected = [("address_rate".to_string(), 1), ("busy".to_string(), 2)];
    assert_eq!(report.admission_refused, expected.into());
    assert!(report.value("messages_per_second").unwrap() > 0.0);
    assert_eq!(report.value("lost"), Some(0.0));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.table().contains("admission refused: busy"));
}

/// A refusal that asks for a longer wait than the client may take to connect fails it, with
/// the reason, instead of hanging the run.
#[test]
fn hop_clients_refused_for_longer_than_their_timeout_fail_as_refused() {
    use hop_protocol::noise::{Refusal, RefusalReason};

    let refusal = Refusal {
        reason: RefusalReason::AddressConnections,
        retry_after_ms: 3_600_000,
    };
    let (server, key) = toy_hop::start_limited(hop_router::quota::Rate::OFF, vec![refusal]);
    let options = ThroughputOptions {
        pairs: 1,
        window: 1,
        warmup_ms: 0,
        duration_ms: 10,
    };
    let error = scenario::throughput(&hop_common(server, key), &options).unwrap_err();
    assert!(error.contains("admission_refused"), "{error}");
}
