//! End-to-end tests: a real hopd process, real sockets on loopback, the client library.

// A failed unwrap in a test is a test failure with a backtrace, which is what we want.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{closed_by_server, expect_kind, ping, Hopd, PATIENCE};
use hop_protocol::client::{Client, ClientError, ServerTrust};
use hop_protocol::outbox::Outbox;
use hop_protocol::wire::{
    Ack, Deliver, ErrorCode, GoAwayReason, Kind, MessageRef, Presence, ReceiptKind, ServerAck,
    Stanza, Subscribe, UserRef,
};
use hop_protocol::{StaticKey, UserId};

fn server_ack(client: &mut Client) -> ServerAck {
    expect_kind(client, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack),
        _ => None,
    })
}

fn deliver(client: &mut Client) -> Deliver {
    expect_kind(client, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    })
}

fn receipt(client: &mut Client) -> (u64, ReceiptKind, UserId) {
    expect_kind(client, "Receipt", |kind| match kind {
        Kind::Receipt(receipt) => Some((
            receipt.id,
            ReceiptKind::try_from(receipt.kind).expect("known receipt kind"),
            UserRef::user(receipt.by.as_ref()).expect("a valid user id"),
        )),
        _ => None,
    })
}

/// The next Error: its code and the message it names.
fn error(client: &mut Client) -> (ErrorCode, MessageRef) {
    expect_kind(client, "Error", |kind| match kind {
        Kind::Error(error) => Some((
            ErrorCode::try_from(error.code).expect("known code"),
            MessageRef {
                outbox: error.outbox,
                seq: error.seq,
            },
        )),
        _ => None,
    })
}

/// The message a ServerAck names.
fn acked(ack: &ServerAck) -> MessageRef {
    MessageRef {
        outbox: ack.outbox,
        seq: ack.seq,
    }
}

fn sender(deliver: &Deliver) -> UserId {
    UserRef::user(deliver.from.as_ref()).expect("a valid sender")
}

fn go_away(client: &mut Client) -> GoAwayReason {
    expect_kind(client, "GoAway", |kind| match kind {
        Kind::GoAway(go_away) => {
            Some(GoAwayReason::try_from(go_away.reason).expect("known reason"))
        }
        _ => None,
    })
}

fn presence(client: &mut Client) -> Presence {
    expect_kind(client, "Presence", |kind| match kind {
        Kind::Presence(presence) => Some(presence),
        _ => None,
    })
}

/// Sends a message and checks it arrives, proving the server still serves.
fn assert_serving(hopd: &Hopd) {
    let (_, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    alice
        .send_message(bob_key.user_id(), b"still here")
        .unwrap();
    server_ack(&mut alice);
    assert_eq!(&deliver(&mut bob).body[..], b"still here");
}

#[test]
fn online_delivery_with_sent_delivered_read_ticks() {
    let hopd = Hopd::start(&[]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    let message_ref = alice.send_message(bob_key.user_id(), b"hello bob").unwrap();

    let sent = server_ack(&mut alice);
    assert_eq!(acked(&sent), message_ref);
    let message = deliver(&mut bob);
    assert_eq!(
        sender(&message),
        alice_key.user_id(),
        "the server fills in the sender"
    );
    assert_eq!(message.id, sent.id);
    assert_eq!(&message.body[..], b"hello bob");

    bob.ack_deliver(message.id).unwrap();
    assert_eq!(
        receipt(&mut alice),
        (sent.id, ReceiptKind::Delivered, bob_key.user_id())
    );
    bob.read(alice_key.user_id(), message.id, message.proof)
        .unwrap();
    assert_eq!(
        receipt(&mut alice),
        (sent.id, ReceiptKind::Read, bob_key.user_id())
    );
}

/// CPU time hopd's threads have used, from `/proc` (in the kernel's USER_HZ ticks of 10 ms).
fn cpu_time(hopd: &Hopd) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", hopd.pid())).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A counter's value from hopd's `/metrics`, summed over its shards.
fn counter(hopd: &Hopd, name: &str) -> u64 {
    hopd.metrics()
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// With `idle_poll_us`, a shard polls without sleeping after a turn with work: messages flow
/// as without it, and once they stop the shard blocks again instead of spinning on.
#[test]
fn a_shard_that_polls_when_idle_delivers_and_sleeps_once_the_messages_stop() {
    let hopd = Hopd::start(&["--shards", "1", "--idle-poll-us", "1000"]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    for round in 0..50u32 {
        let body = round.to_le_bytes();
        alice.send_message(bob_key.user_id(), &body).unwrap();
        let message = deliver(&mut bob);
        assert_eq!(&message.body[..], &body[..]);
        bob.ack_deliver(message.id).unwrap();
        server_ack(&mut alice);
    }
    // Bob's Ack comes a round trip after the Deliver left, well within the poll: some turns
    // began while the shard polled instead of sleeping.
    assert!(
        counter(&hopd, "hop_idle_polls_woken_total") > 0,
        "no poll before sleeping found work"
    );
    // Quiet: the connections stay open and send nothing. A shard that kept spinning would use
    // about a second of CPU in this second.
    let quiet = Duration::from_secs(1);
    let before = cpu_time(&hopd);
    std::thread::sleep(quiet);
    let used = cpu_time(&hopd) - before;
    assert!(
        used < quiet / 2,
        "hopd used {used:?} of CPU in {quiet:?} without traffic"
    );
    ping(&mut alice);
}

/// A sender whose Outbox asks for it (`delivered_in_ack`) gets both ticks of a message its
/// recipient acks before the server's ack leaves in one ServerAck, and no DELIVERED receipt;
/// the blue tick still comes as a Receipt.
#[test]
fn a_sender_that_asks_gets_the_second_tick_in_the_server_ack() {
    // The ServerAck waits up to a second for Bob's Ack before the disk releases it. Should Bob
    // be slower than that, the message is acked with one tick and its second comes as a
    // Receipt; the next message is tried.
    let hopd = Hopd::start(&["--ack-wait-ms", "1000"]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    let mut outbox = Outbox::random().unwrap();
    outbox.set_delivered_in_ack(true);
    alice.set_outbox(outbox);
    let mut folded = None;
    for _ in 0..5 {
        let message_ref = alice.send_message(bob_key.user_id(), b"hello bob").unwrap();
        let message = deliver(&mut bob);
        bob.ack_deliver(message.id).unwrap();
        let sent = server_ack(&mut alice);
        assert_eq!((acked(&sent), sent.id), (message_ref, message.id));
        if sent.delivered_ms != 0 {
            folded = Some(message);
            break;
        }
        assert_eq!(
            receipt(&mut alice),
            (sent.id, ReceiptKind::Delivered, bob_key.user_id())
        );
    }
    let message = folded.expect("a ServerAck with both ticks");
    bob.read(alice_key.user_id(), message.id, message.proof)
        .unwrap();
    // The next receipt is the Read: no DELIVERED receipt came for the folded message.
    assert_eq!(
        receipt(&mut alice),
        (message.id, ReceiptKind::Read, bob_key.user_id())
    );
}

#[test]
fn offline_recipient_gets_the_message_on_connect_and_receipts_reach_the_sender() {
    let hopd = Hopd::start(&[]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();

    alice
        .send_message(bob_key.user_id(), b"while you were out")
        .unwrap();
    let sent = server_ack(&mut alice);
    alice.close(); // the sender goes offline too: its receipts must wait for it

    let mut bob = hopd.connect(&bob_key);
    let message = deliver(&mut bob);
    assert_eq!(
        (message.id, &message.body[..]),
        (sent.id, &b"while you were out"[..])
    );
    bob.ack_deliver(message.id).unwrap();
    bob.read(alice_key.user_id(), message.id, message.proof)
        .unwrap();
    ping(&mut bob);

    let mut alice = hopd.connect(&alice_key);
    assert_eq!(receipt(&mut alice).1, ReceiptKind::Delivered);
    assert_eq!(receipt(&mut alice).1, ReceiptKind::Read);
}

#[test]
fn connect_home_to_a_single_hopd_keeps_what_arrived_before_its_pong() {
    let hopd = Hopd::start(&[]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let mut sent = Vec::new();
    for body in [&b"one"[..], b"two", b"three"] {
        alice.send_message(bob_key.user_id(), body).unwrap();
        sent.push(server_ack(&mut alice).id);
    }
    // A single hopd never redirects: the Pong comes after the queued Delivers, which stay in
    // the inbox, in order, for recv.
    let mut bob = Client::connect_home(&hopd.addr, &bob_key, &hopd.trust(), PATIENCE).unwrap();
    let received: Vec<u64> = (0..3).map(|_| deliver(&mut bob).id).collect();
    assert_eq!(received, sent);
    ping(&mut bob);
}

#[test]
fn unacked_message_is_delivered_again_on_the_next_connection() {
    let hopd = Hopd::start(&[]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    alice.send_message(bob_key.user_id(), b"ack me").unwrap();
    let first = deliver(&mut bob);
    bob.close(); // no Ack
    let mut bob = hopd.connect(&bob_key);
    assert_eq!(
        deliver(&mut bob).id,
        first.id,
        "same id: the client can drop a duplicate"
    );
}

#[test]
fn presence_online_and_offline_seen_by_a_subscriber() {
    let hopd = Hopd::start(&[]);
    let (_, mut watcher) = hopd.new_user();
    let (watched_key, watched) = hopd.new_user();
    watcher
        .send(&Stanza::of(Kind::Subscribe(Subscribe {
            user: Some(watched_key.user_id().into()),
        })))
        .unwrap();
    let now = presence(&mut watcher);
    assert!(now.online);
    assert_eq!(
        UserRef::user(now.user.as_ref()),
        Some(watched_key.user_id())
    );

    watched.close();
    let gone = presence(&mut watcher);
    assert!(!gone.online);
    assert!(
        gone.last_seen_ms > 0,
        "last seen is set when the user leaves"
    );

    let _back = hopd.connect(&watched_key);
    assert!(presence(&mut watcher).online);
}

#[test]
fn a_client_cannot_send_as_someone_else() {
    let hopd = Hopd::start(&[]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    // A Send has no sender field: the server stamps the authenticated user.
    alice.send_message(bob_key.user_id(), b"who am i").unwrap();
    assert_eq!(sender(&deliver(&mut bob)), alice_key.user_id());
    // A client that pushes a server-side stanza claiming another sender is cut off.
    let forged = Stanza::deliver(
        bob_key.user_id(),
        1,
        0,
        bytes::Bytes::from_static(b"forged"),
        0,
    );
    alice.send(&forged).unwrap();
    assert_eq!(error(&mut alice).0, ErrorCode::BadStanza);
    assert_eq!(go_away(&mut alice), GoAwayReason::Protocol);
    assert!(closed_by_server(&mut alice));
    assert_serving(&hopd);
}

#[test]
fn garbage_before_the_handshake_closes_that_connection_only() {
    let hopd = Hopd::start(&[]);
    let (_, mut bystander) = hopd.new_user();
    let mut raw = TcpStream::connect(&hopd.addr).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: hop\r\n\r\n")
        .unwrap();
    assert!(
        read_until_closed(&mut raw),
        "server closes a connection that sends garbage"
    );
    ping(&mut bystander);
    assert_serving(&hopd);
    assert!(
        hopd.log().contains("handshake failed"),
        "logged: {}",
        hopd.log()
    );
}

#[test]
fn bad_noise_message_closes_that_connection_only() {
    let hopd = Hopd::start(&[]);
    let mut raw = TcpStream::connect(&hopd.addr).unwrap();
    // A well-framed first message of the right size that is not a valid key share followed by
    // a bogus third message.
    let mut frame = vec![0, 32];
    frame.extend_from_slice(&[0xEE; 32]);
    raw.write_all(&frame).unwrap();
    let mut reply = [0u8; 98];
    raw.read_exact(&mut reply).unwrap();
    let mut bogus = vec![0, 64];
    bogus.extend_from_slice(&[0x55; 64]);
    raw.write_all(&bogus).unwrap();
    assert!(read_until_closed(&mut raw));
    assert_serving(&hopd);
}

#[test]
fn oversized_and_truncated_frames_close_that_connection_only() {
    let hopd = Hopd::start(&[]);
    // Oversized during the handshake: the length alone is refused.
    let mut raw = TcpStream::connect(&hopd.addr).unwrap();
    raw.write_all(&[0xFF, 0xFF, 1, 2, 3]).unwrap();
    assert!(read_until_closed(&mut raw));
    // Truncated: half a frame, then the client goes away.
    let mut raw = TcpStream::connect(&hopd.addr).unwrap();
    raw.write_all(&[0, 32, 1, 2, 3, 4]).unwrap();
    drop(raw);
    // Truncated frame after the handshake: the server waits for the rest, then the client
    // closes; nothing else is affected.
    let (_, mut client) = hopd.new_user();
    client.write_raw(&[0x01, 0x00, 9, 9, 9]).unwrap();
    client.close();
    assert_serving(&hopd);
}

#[test]
fn undecryptable_frame_after_the_handshake_gets_an_error_and_a_close() {
    let hopd = Hopd::start(&[]);
    let (_, mut client) = hopd.new_user();
    let mut frame = vec![0, 40];
    frame.extend_from_slice(&[0xAB; 40]);
    client.write_raw(&frame).unwrap();
    assert_eq!(error(&mut client).0, ErrorCode::BadFrame);
    assert_eq!(go_away(&mut client), GoAwayReason::Protocol);
    assert!(closed_by_server(&mut client));
    assert_serving(&hopd);
}

#[test]
fn undecodable_stanza_gets_an_error_and_a_close() {
    let hopd = Hopd::start(&[]);
    let (_, mut client) = hopd.new_user();
    client
        .send_raw_plaintext(&[0x05, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        .unwrap();
    assert_eq!(error(&mut client).0, ErrorCode::BadStanza);
    assert!(closed_by_server(&mut client));
    assert_serving(&hopd);
}

#[test]
fn sends_to_unknown_or_malformed_user_ids_get_errors_not_acks() {
    let hopd = Hopd::start(&[]);
    let (_, mut alice) = hopd.new_user();
    let stranger = StaticKey::generate().unwrap().user_id();
    let message = alice.send_message(stranger, b"anyone?").unwrap();
    assert_eq!(error(&mut alice), (ErrorCode::UnknownUser, message));
    alice
        .send(&Stanza::of(Kind::Send(hop_protocol::wire::Send {
            to: Some(UserRef { high: 0, low: 7 }),
            seq: 99,
            body: bytes::Bytes::from_static(b"x"),
            alias: 0,
            resend: false,
        })))
        .unwrap();
    assert_eq!(
        error(&mut alice),
        (
            ErrorCode::BadUserId,
            MessageRef {
                outbox: message.outbox,
                seq: 99
            }
        )
    );
    // The connection stays usable after such errors.
    ping(&mut alice);
}

#[test]
fn full_offline_queue_refuses_with_an_error() {
    let hopd = Hopd::start(&["--queue-messages-max", "2"]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    for _ in 0..2 {
        alice.send_message(bob_key.user_id(), b"fits").unwrap();
        server_ack(&mut alice);
    }
    let message = alice.send_message(bob_key.user_id(), b"overflows").unwrap();
    assert_eq!(error(&mut alice), (ErrorCode::QueueFull, message));
}

#[test]
fn the_status_line_names_the_connection_ceiling_and_what_sets_it() {
    let hopd = Hopd::start(&["--shards", "2", "--connections-max", "500"]);
    assert!(
        hopd.banner
            .contains("; ceiling 500 connections (connections_max);"),
        "{}",
        hopd.banner
    );
}

#[test]
fn handshake_timeout_is_enforced() {
    let hopd = Hopd::start(&["--handshake-timeout-ms", "200"]);
    let mut raw = TcpStream::connect(&hopd.addr).unwrap();
    assert!(read_until_closed(&mut raw), "a silent connection is closed");
    assert_serving(&hopd);
}

#[test]
fn idle_timeout_is_enforced_with_a_go_away() {
    let hopd = Hopd::start(&["--idle-timeout-ms", "300"]);
    let (_, mut client) = hopd.new_user();
    assert_eq!(go_away(&mut client), GoAwayReason::Idle);
    assert!(closed_by_server(&mut client));
}

#[test]
fn a_second_connection_of_a_user_replaces_the_first() {
    let hopd = Hopd::start(&[]);
    let (key, mut first) = hopd.new_user();
    let mut second = hopd.connect(&key);
    assert_eq!(go_away(&mut first), GoAwayReason::Replaced);
    ping(&mut second);
}

#[test]
fn a_wrong_server_key_is_a_hard_error() {
    let hopd = Hopd::start(&[]);
    let key = StaticKey::generate().unwrap();
    let wrong = ServerTrust::Pinned([7u8; 32]);
    match Client::connect(&hopd.addr, &key, &wrong, PATIENCE) {
        Err(ClientError::ServerKeyMismatch { .. }) => {}
        other => panic!("expected a key mismatch, got {other:?}"),
    }
}

#[test]
fn users_on_different_shards_exchange_messages() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let key_on = |shard: u16| loop {
        let key = StaticKey::generate().unwrap();
        if hop_router::home_shard(key.user_id(), 2) == shard {
            return key;
        }
    };
    let (alice_key, bob_key) = (key_on(0), key_on(1));
    // Each connects several times so the kernel's listener choice hits both shards and some
    // connections must move to their home shard.
    for _ in 0..4 {
        let mut alice = hopd.connect(&alice_key);
        let mut bob = hopd.connect(&bob_key);
        ping(&mut alice);
        ping(&mut bob);
        alice
            .send_message(bob_key.user_id(), b"to shard 1")
            .unwrap();
        bob.send_message(alice_key.user_id(), b"to shard 0")
            .unwrap();
        let to_bob = deliver(&mut bob);
        let to_alice = deliver(&mut alice);
        assert_eq!(sender(&to_bob), alice_key.user_id());
        assert_eq!(sender(&to_alice), bob_key.user_id());
        bob.ack_deliver(to_bob.id).unwrap();
        alice.ack_deliver(to_alice.id).unwrap();
        assert_eq!(receipt(&mut alice).1, ReceiptKind::Delivered);
        assert_eq!(receipt(&mut bob).1, ReceiptKind::Delivered);
        alice.close();
        bob.close();
    }
}

#[test]
fn bindings_and_server_key_survive_a_restart() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &[]);
    let first_key = hopd.server_key;
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &["--shards", "1"]);
    assert_eq!(
        hopd.server_key, first_key,
        "the server key is kept in the data folder"
    );
    let (_, mut alice) = hopd.new_user();
    alice
        .send_message(bob_key.user_id(), b"you are known")
        .unwrap();
    server_ack(&mut alice);
}

#[test]
fn sigterm_sends_go_away_and_exits_zero() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (_, mut client) = hopd.new_user();
    let status = hopd.stop();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(go_away(&mut client), GoAwayReason::Shutdown);
}

/// 1,000 clients in 500 pairs on two shards; every sender sends a fixed number of messages to
/// its partner. Every message must arrive exactly once, and every sender must see every
/// ServerAck and delivered receipt.
#[test]
fn a_thousand_concurrent_clients_lose_nothing_and_duplicate_nothing() {
    const PAIRS: usize = 500;
    const MESSAGES: usize = 10;
    let hopd = Arc::new(Hopd::start(&["--shards", "2"]));
    let keys: Vec<(StaticKey, StaticKey)> = (0..PAIRS)
        .map(|_| {
            (
                StaticKey::generate().unwrap(),
                StaticKey::generate().unwrap(),
            )
        })
        .collect();
    // Every recipient connects before any sender sends.
    let connected = Arc::new(Barrier::new(2 * PAIRS));
    let mut threads = Vec::new();
    for (pair, (sender_key, recipient_key)) in keys.into_iter().enumerate() {
        let recipient_id = recipient_key.user_id();
        let sender_id = sender_key.user_id();
        {
            let (hopd, connected) = (hopd.clone(), connected.clone());
            threads.push(spawn_small(move || {
                let mut recipient = hopd.connect(&recipient_key);
                ping(&mut recipient);
                connected.wait();
                let mut bodies = BTreeMap::new();
                while bodies.len() < MESSAGES {
                    let message = deliver(&mut recipient);
                    assert_eq!(sender(&message), sender_id);
                    let previous = bodies.insert(message.id, message.body.to_vec());
                    assert!(previous.is_none(), "duplicate delivery of {}", message.id);
                    recipient.ack_deliver(message.id).unwrap();
                }
                ping(&mut recipient);
                let expected: BTreeSet<Vec<u8>> = (0..MESSAGES)
                    .map(|n| format!("pair {pair} message {n}").into_bytes())
                    .collect();
                assert_eq!(bodies.into_values().collect::<BTreeSet<_>>(), expected);
                recipient.close();
            }));
        }
        let (hopd, connected) = (hopd.clone(), connected.clone());
        threads.push(spawn_small(move || {
            let mut sender = hopd.connect(&sender_key);
            ping(&mut sender);
            connected.wait();
            for n in 0..MESSAGES {
                sender.queue_message(recipient_id, format!("pair {pair} message {n}").as_bytes());
            }
            sender.flush().unwrap();
            let (mut acked, mut delivered) = (BTreeSet::new(), BTreeSet::new());
            while acked.len() < MESSAGES || delivered.len() < MESSAGES {
                let stanza = common::expect_stanza(&mut sender, "ticks");
                match stanza.kind {
                    Some(Kind::ServerAck(ack)) => {
                        assert!(acked.insert(ack.id), "duplicate ServerAck")
                    }
                    Some(Kind::Receipt(receipt)) => {
                        assert!(delivered.insert(receipt.id), "duplicate receipt");
                        sender
                            .send(&Stanza::of(Kind::Ack(Ack {
                                id: receipt.ack_id().expect("a receipt names who made it"),
                                kind: receipt.kind,
                            })))
                            .unwrap();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(acked, delivered, "every acked message was delivered");
            sender.close();
        }));
    }
    for thread in threads {
        thread.join().expect("client thread");
    }
    let hopd = Arc::into_inner(hopd).expect("all clients done");
    assert!(hopd.stop().success());
}

fn spawn_small(body: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(body)
        .expect("thread")
}

/// Reads until the server closes; false if it did not within the patience.
fn read_until_closed(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn user_ids_on_the_wire_match_the_cli() {
    // `hop keygen` prints the id the server will use for the key.
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("k");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hop"))
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed: UserId = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(printed, StaticKey::load(&path).unwrap().user_id());
    let _ = Duration::ZERO;
}

/// Mailboxes of depth 2 between two shards: a burst of cross-shard messages must fill them,
/// pause the sender's connection, resume it, and still deliver everything exactly once.
#[test]
fn full_mailboxes_apply_backpressure_without_losing_anything() {
    const MESSAGES: usize = 2_000;
    let hopd = Hopd::start(&["--shards", "2", "--mailbox-depth", "2"]);
    let key_on = |shard: u16| loop {
        let key = StaticKey::generate().unwrap();
        if hop_router::home_shard(key.user_id(), 2) == shard {
            return key;
        }
    };
    let (alice_key, bob_key) = (key_on(0), key_on(1));
    let mut alice = hopd.connect(&alice_key);
    let mut bob = hopd.connect(&bob_key);
    ping(&mut alice);
    ping(&mut bob);
    for n in 0..MESSAGES {
        alice.queue_message(bob_key.user_id(), format!("burst {n}").as_bytes());
    }
    alice.flush().unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < MESSAGES {
        let message = deliver(&mut bob);
        assert!(seen.insert(message.body.to_vec()), "duplicate");
        bob.ack_deliver(message.id).unwrap();
    }
    let mut acks = 0;
    while acks < MESSAGES {
        if let Some(Kind::ServerAck(_)) = common::expect_stanza(&mut alice, "ServerAck").kind {
            acks += 1;
        }
    }
    let (status, log) = hopd.stop_with_log();
    assert!(status.success());
    assert!(
        log.contains("mail_backpressure="),
        "the burst met a full mailbox: {log}"
    );
}

/// With few descriptors, connections past the ceiling are closed at once (never left hanging
/// in the backlog), and the connections already in are not affected.
#[test]
fn connections_past_the_descriptor_limit_are_refused_cleanly() {
    let hopd = Hopd::start_with_fd_limit(96, &["--shards", "1"]);
    let (_, mut first) = hopd.new_user();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        let key = StaticKey::generate().unwrap();
        match Client::connect(&hopd.addr, &key, &hopd.trust(), PATIENCE) {
            Ok(mut client) => {
                // A refused connection may finish the handshake from the client's side only.
                match client.send(&Stanza::of(Kind::Ping(hop_protocol::wire::Ping {
                    nonce: 1,
                }))) {
                    Ok(()) => match client.recv(PATIENCE) {
                        Ok(Some(_)) => held.push(client),
                        _ => refused += 1,
                    },
                    Err(_) => refused += 1,
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "150 connections fit under 96 descriptors?");
    assert!(held.len() > 5, "only {} connections held", held.len());
    ping(&mut first);
    for client in &mut held {
        ping(client);
    }
}

/// Resident memory of a process, from `/proc/PID/status`.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

/// Guards against the offline queue living in memory: a server holding 30 days of messages for
/// millions of offline users cannot keep their bodies in RAM. Once a message is on disk, only
/// its few bytes of bookkeeping may stay in memory; the bodies come back from disk, also after
/// a restart.
#[cfg(target_os = "linux")]
#[test]
fn queued_message_bodies_stay_on_disk_not_in_memory() {
    const MESSAGES: usize = 2400;
    const BODY_BYTES: usize = 60 * 1024;
    let queued_bytes = (MESSAGES * BODY_BYTES) as u64; // 147 MB
    let flags = ["--shards", "1", "--queue-bytes-max", "268435456"];
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &flags);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    // Alice sends once hopd has seen Bob leave (she watches his presence): a message for a
    // connected device waits `ack_wait_ms` in memory for its Ack, which is not this test's
    // subject.
    alice
        .send(&Stanza::of(Kind::Subscribe(Subscribe {
            user: Some(bob_key.user_id().into()),
        })))
        .unwrap();
    assert!(presence(&mut alice).online);
    bob.close();
    assert!(!presence(&mut alice).online);
    let before = resident_bytes(hopd.pid());
    let body_of = |number: usize| -> Vec<u8> {
        let mut body: Vec<u8> = (0..BODY_BYTES).map(|n| (n % 251) as u8).collect();
        body[..8].copy_from_slice(&(number as u64).to_le_bytes());
        body
    };
    for number in 0..MESSAGES {
        alice
            .send_message(bob_key.user_id(), &body_of(number))
            .unwrap();
    }
    for _ in 0..MESSAGES {
        server_ack(&mut alice); // each one on disk
    }
    ping(&mut alice);
    let grown = resident_bytes(hopd.pid()).saturating_sub(before);
    // What may stay whatever is queued: the store's buffer and two more of unsynced batches
    // (4 MiB each), two spare buffers, the reads' and writes' buffers, and what the allocator
    // keeps of the bodies it freed. It measured 17-33 MB here, with 2,400 messages or with
    // 4,800 alike; bodies kept in memory would be all 147 MB.
    println!("hopd grew by {grown} bytes while {queued_bytes} bytes were queued on disk");
    assert!(
        grown < queued_bytes / 3,
        "hopd grew by {grown} bytes while {queued_bytes} bytes were queued on disk"
    );
    alice.close();
    assert!(hopd.stop().success());

    // After a restart the queue is rebuilt from the log and delivered from disk, in order.
    let hopd = Hopd::start_in(&data, &flags);
    let mut bob = hopd.connect(&bob_key);
    for number in 0..MESSAGES {
        let message = deliver(&mut bob);
        assert!(
            message.body[..] == body_of(number)[..],
            "message {number}, in order"
        );
        bob.ack_deliver(message.id).unwrap();
    }
    ping(&mut bob);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Guards against writing every message to disk on the way to an online recipient: one that
/// the device acks before its batch is due never reaches the disk, while a message for an
/// offline user still does (and gets its ServerAck once it is there).
#[test]
fn a_message_acked_before_its_batch_is_due_is_never_written() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = [
        "--shards",
        "1",
        "--batch-delay-ms",
        "60000",
        "--batch-records-max",
        "100000",
    ];
    let hopd = Hopd::start_in(&data, &flags);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    let online_marker = b"ONLINE-MARKER-7d41c2-acked-before-the-batch";
    alice
        .send_message(bob_key.user_id(), online_marker)
        .unwrap();
    let message = deliver(&mut bob);
    bob.ack_deliver(message.id).unwrap();
    assert_eq!(server_ack(&mut alice).id, message.id, "acked by the device");
    ping(&mut bob);
    bob.close();

    // Offline: held until the batch is due (here: at shutdown), then written and acked.
    let offline_marker = b"OFFLINE-MARKER-93be0a-kept-for-later";
    let message = alice
        .send_message(bob_key.user_id(), offline_marker)
        .unwrap();
    ping(&mut alice);
    assert!(hopd.stop().success());
    assert_eq!(
        acked(&server_ack(&mut alice)),
        message,
        "acked once on disk"
    );
    let written = |marker: &[u8]| {
        files_under(&data).iter().any(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(marker.len()).any(|window| window == marker)
        })
    };
    assert!(
        !written(online_marker),
        "the acked message reached the disk"
    );
    assert!(written(offline_marker), "the queued message is on disk");
}

/// A signal that interrupts a client's read (an application's handler installed without
/// SA_RESTART) does not end the connection: the read goes on and the Deliver arrives.
#[test]
fn a_client_read_interrupted_by_a_signal_goes_on() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    extern "C" fn ignore(_: std::ffi::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe; no other test of this
    // binary uses SIGUSR2.
    unsafe { sigaction(Signal::SIGUSR2, &action) }.expect("a handler for SIGUSR2");
    let hopd = Hopd::start(&[]);
    let (_, mut alice) = hopd.new_user();
    let (_, mut bob) = hopd.new_user();
    let bob_id = bob.user_id();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tx.send(nix::sys::pthread::pthread_self()).unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if let Some(Kind::Deliver(deliver)) = bob
                .recv(PATIENCE)
                .expect("bob's connection outlives the signal")
                .and_then(|stanza| stanza.kind)
            {
                return deliver.body;
            }
        }
        panic!("no Deliver within {PATIENCE:?}");
    });
    let thread = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::pthread::pthread_kill(thread, Signal::SIGUSR2).expect("signalled");
    std::thread::sleep(Duration::from_millis(100));
    alice.send_message(bob_id, b"after the signal").unwrap();
    assert_eq!(&reader.join().unwrap()[..], b"after the signal");
}
