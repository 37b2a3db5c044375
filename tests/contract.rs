//! The delivery contract, end to end (docs/protocol.md): acks belong to the connection that
//! sent, receipts are proven, old clients are told to upgrade, a full disk is an error and
//! loses nothing.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{before_pong, expect_kind, ping, Hopd, PATIENCE};
use hop_protocol::client::Client;
use hop_protocol::wire::{
    self, ErrorCode, GoAwayReason, Kind, MessageRef, ReceiptKind, ServerAck, Stanza, UserRef,
};
use hop_protocol::StaticKey;

fn server_ack(client: &mut Client) -> ServerAck {
    expect_kind(client, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack),
        _ => None,
    })
}

fn acked(ack: &ServerAck) -> MessageRef {
    MessageRef {
        outbox: ack.outbox,
        seq: ack.seq,
    }
}

fn error_code(client: &mut Client) -> (ErrorCode, MessageRef) {
    expect_kind(client, "Error", |kind| match kind {
        Kind::Error(error) => Some((
            ErrorCode::try_from(error.code).unwrap(),
            MessageRef {
                outbox: error.outbox,
                seq: error.seq,
            },
        )),
        _ => None,
    })
}

/// Guards against the lost-ack bug of the first contract, as it was found: with a 3-second
/// batch, a second connection of the same key (which replaces the first) sent its own message
/// and received the first connection's ServerAck, matched it on the per-connection sequence
/// number 1, and printed `sent` for a message still in its batch. Each connection must hear
/// only the ack of its own message.
#[test]
fn a_replacing_connection_hears_only_its_own_ack() {
    let hopd = Hopd::start(&["--batch-delay-ms", "3000"]);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (key, mut first) = hopd.new_user();
    let one = first
        .send_message(bob_key.user_id(), b"from the first connection")
        .unwrap();
    ping(&mut first); // routed, and waiting in its batch
    let mut second = hopd.connect(&key);
    let two = second
        .send_message(bob_key.user_id(), b"from the second connection")
        .unwrap();
    assert_ne!(
        one, two,
        "every connection of a client numbers in its own outbox"
    );
    let ack = server_ack(&mut second);
    assert_eq!(acked(&ack), two, "the second connection's own message");
    let more: Vec<Stanza> = before_pong(&mut second)
        .into_iter()
        .filter(|stanza| matches!(stanza.kind, Some(Kind::ServerAck(_))))
        .collect();
    assert!(more.is_empty(), "another connection's ack: {more:?}");
    // Both messages were taken, each once.
    let mut bob = hopd.connect(&bob_key);
    let mut bodies = Vec::new();
    while let Some(stanza) = bob.recv(Duration::from_millis(500)).unwrap() {
        if let Some(Kind::Deliver(deliver)) = stanza.kind {
            bodies.push(deliver.body.to_vec());
            bob.ack_deliver(deliver.id).unwrap();
        }
    }
    bodies.sort();
    assert_eq!(
        bodies,
        [
            b"from the first connection".to_vec(),
            b"from the second connection".to_vec()
        ]
    );
}

/// A resend on a new connection, with the same (outbox, seq), gets the original's ack and is
/// delivered once.
#[test]
fn a_resend_on_a_new_connection_is_acked_as_the_original_and_delivered_once() {
    let hopd = Hopd::start(&[]);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (key, mut first) = hopd.new_user();
    let message = first.send_message(bob_key.user_id(), b"only once").unwrap();
    let original = server_ack(&mut first);
    let outbox = first.into_outbox();
    let mut second = hopd.connect(&key);
    second.set_outbox(outbox);
    second
        .resend_message(bob_key.user_id(), message.seq, b"only once")
        .unwrap();
    let again = server_ack(&mut second);
    assert_eq!(again, original, "the same id and time");
    let mut bob = hopd.connect(&bob_key);
    let mut copies = 0;
    while let Some(stanza) = bob.recv(Duration::from_millis(500)).unwrap() {
        if let Some(Kind::Deliver(deliver)) = stanza.kind {
            assert_eq!(deliver.id, original.id);
            copies += 1;
            bob.ack_deliver(deliver.id).unwrap();
        }
    }
    assert_eq!(copies, 1);
}

/// Guards against forged blue ticks: a third user made `hop send --wait read` exit 0 by
/// sending `Read{from, id}` for a message it never received.
#[test]
fn a_read_by_someone_the_message_was_not_delivered_to_is_refused() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    let (_, mut mallory) = hopd.new_user();
    alice
        .send_message(bob_key.user_id(), b"for bob only")
        .unwrap();
    server_ack(&mut alice);
    let delivered = expect_kind(&mut bob, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    });
    // Mallory learned the id and even bob's proof: they are not hers to use.
    mallory
        .read(alice_key.user_id(), delivered.id, delivered.proof)
        .unwrap();
    assert_eq!(error_code(&mut mallory).0, ErrorCode::BadReceipt);
    let ticks: Vec<Stanza> = before_pong(&mut alice);
    assert!(ticks.is_empty(), "alice saw a forged tick: {ticks:?}");
    // Bob's own Read, with the proof, is the blue tick.
    bob.read(alice_key.user_id(), delivered.id, delivered.proof)
        .unwrap();
    let receipt = expect_kind(&mut alice, "Receipt", |kind| match kind {
        Kind::Receipt(receipt) => Some(receipt),
        _ => None,
    });
    assert_eq!(receipt.kind, ReceiptKind::Read as i32);
    assert_eq!(UserRef::user(receipt.by.as_ref()), Some(bob_key.user_id()));
}

/// Guards against receipts locking an inbox: receipts used to count against the message
/// quota, so a flood of Reads filled a user's queue and every sender got QUEUE_FULL.
#[test]
fn receipts_for_a_user_never_take_the_room_of_its_messages() {
    let hopd = Hopd::start(&["--queue-messages-max", "3", "--queue-receipts-max", "2"]);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, mut bob) = hopd.new_user();
    let (_, mut carol) = hopd.new_user();
    // Three messages to bob, acked and read: six receipts for alice, who acks none.
    for n in 0..3 {
        alice
            .send_message(bob_key.user_id(), format!("m{n}").as_bytes())
            .unwrap();
        let delivered = expect_kind(&mut bob, "Deliver", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver),
            _ => None,
        });
        bob.ack_deliver(delivered.id).unwrap();
        bob.read(alice_key.user_id(), delivered.id, delivered.proof)
            .unwrap();
    }
    ping(&mut bob);
    // Alice's queue holds two receipts (its receipt quota); messages still fit.
    for n in 0..3 {
        carol
            .send_message(alice_key.user_id(), format!("to alice {n}").as_bytes())
            .unwrap();
        server_ack(&mut carol);
    }
}

/// A client of protocol version 1 (its prologue, an empty first handshake payload) gets an
/// Error with ERROR_CODE_VERSION and a GoAway it can read, not a failed handshake.
#[test]
fn a_version_1_client_is_told_to_upgrade() {
    let hopd = Hopd::start(&[]);
    let key = StaticKey::generate().unwrap();
    let mut handshake = hop_protocol::noise::builder()
        .local_private_key(key.private())
        .and_then(|builder| builder.prologue(b"hop wire protocol v1"))
        .and_then(|builder| builder.build_initiator())
        .unwrap();
    let mut stream = TcpStream::connect(&hopd.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut message = [0u8; 256];
    let length = handshake.write_message(&[], &mut message).unwrap();
    write_frame(&mut stream, &message[..length]);
    let reply = read_frame(&mut stream);
    let mut payload = [0u8; 256];
    handshake.read_message(&reply, &mut payload).unwrap();
    let length = handshake.write_message(&[], &mut message).unwrap();
    write_frame(&mut stream, &message[..length]);
    let mut transport = handshake.into_transport_mode().unwrap();
    let mut stanzas = Vec::new();
    while stanzas.len() < 2 {
        let frame = read_frame(&mut stream);
        let mut plaintext = vec![0u8; frame.len()];
        let length = transport.read_message(&frame, &mut plaintext).unwrap();
        wire::decode_all::<wire::DecodeError>(&plaintext[..length], &mut |stanza| {
            stanzas.push(stanza);
            Ok(())
        })
        .unwrap();
    }
    match (&stanzas[0].kind, &stanzas[1].kind) {
        (Some(Kind::Error(error)), Some(Kind::GoAway(go_away))) => {
            assert_eq!(error.code, ErrorCode::Version as i32);
            assert!(error.reason.contains("upgrade"), "{}", error.reason);
            assert_eq!(go_away.reason, GoAwayReason::Protocol as i32);
        }
        other => panic!("expected an Error and a GoAway, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert!(
        stream.read_to_end(&mut rest).is_ok(),
        "closed by the server"
    );
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    let mut frame = (body.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    stream.write_all(&frame).unwrap();
}

fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream.read_exact(&mut body).unwrap();
    body
}

/// Guards against two failures of a full disk, forced with `RLIMIT_FSIZE`: a short write of
/// the account log followed by a retry misaligned every later binding (after a restart, later
/// users were UNKNOWN_USER and a message acked to one of them was dropped at recovery), and
/// every commit of the shard stalled with no answer to its senders. Now a sender gets
/// OVERLOADED, the server goes on serving, and once there is room nothing is lost.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_refuses_with_overloaded_and_loses_no_binding_or_acked_message() {
    // Per file: the server key, a segment header and two small records, five bindings and a
    // half (36 bytes each).
    const FILE_BYTES_MAX: u64 = 200;
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = ["--shards", "1"];
    let hopd = Hopd::start_with_file_size_limit(&data, FILE_BYTES_MAX, &flags);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (_, mut alice) = hopd.new_user();
    // The queue's segment fills up: a sender is refused with OVERLOADED, not left waiting.
    let mut refused = None;
    for n in 0..10 {
        let message = alice
            .send_message(bob_key.user_id(), format!("m{n}").as_bytes())
            .unwrap();
        let reply = expect_kind(&mut alice, "ServerAck or Error", |kind| match kind {
            Kind::ServerAck(ack) => Some(Ok(acked(&ack))),
            Kind::Error(error) => Some(Err((error.code, error.seq))),
            _ => None,
        });
        if let Err((code, seq)) = reply {
            assert_eq!(code, ErrorCode::Overloaded as i32);
            assert_eq!(seq, message.seq);
            refused = Some(message);
            break;
        }
    }
    assert!(refused.is_some(), "a full disk must refuse a message");
    ping(&mut alice); // still serving

    // More users connect: bindings 6 and 7 cross the limit, the first with a short write.
    let late: Vec<StaticKey> = (0..5)
        .map(|_| {
            let (key, client) = hopd.new_user();
            client.close();
            key
        })
        .collect();
    // The bindings are written by the shard's syncer, after the handshake's answer: wait for
    // the refusal before lifting the limit, or the write may come after the lift.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !hopd.log().contains("cannot record account bindings") {
        assert!(
            std::time::Instant::now() < deadline,
            "the full disk never refused a binding: {}",
            hopd.log()
        );
        ping(&mut alice);
        std::thread::sleep(Duration::from_millis(20));
    }
    ping(&mut alice);
    hopd.lift_file_size_limit();
    // Room again: the bindings are written where the good records end, and messages are
    // taken again. One to each late user, acked.
    for key in &late {
        let message = alice
            .send_message(key.user_id(), b"for a late user")
            .unwrap();
        assert_eq!(acked(&server_ack(&mut alice)), message);
    }
    let (status, log) = hopd.stop_with_log();
    assert!(status.success(), "{log}");

    // A restart finds every binding (a damaged one would stop it) and every acked message.
    let hopd = Hopd::start_in(&data, &flags);
    let (_, mut carol) = hopd.new_user();
    let stranger = StaticKey::generate().unwrap();
    carol.send_message(stranger.user_id(), b"unknown").unwrap();
    assert_eq!(error_code(&mut carol).0, ErrorCode::UnknownUser);
    for key in &late {
        carol.send_message(key.user_id(), b"you are known").unwrap();
        server_ack(&mut carol);
        let mut client = hopd.connect(key);
        let bodies: Vec<Vec<u8>> = before_pong(&mut client)
            .into_iter()
            .filter_map(|stanza| match stanza.kind {
                Some(Kind::Deliver(deliver)) => Some(deliver.body.to_vec()),
                _ => None,
            })
            .collect();
        assert!(
            bodies.contains(&b"for a late user".to_vec()),
            "an acked message survived: {bodies:?}"
        );
    }
}

fn presence_of(client: &mut Client, user: hop_protocol::UserId) -> (bool, u64) {
    client.subscribe(user).unwrap();
    expect_kind(client, "Presence", |kind| match kind {
        Kind::Presence(presence) if UserRef::user(presence.user.as_ref()) == Some(user) => {
            Some((presence.online, presence.last_seen_ms))
        }
        _ => None,
    })
}

/// Guards against the presence leaks of the first contract: anyone could watch any id and
/// tell an unknown id from a known one. Settings are kept across a restart; a hidden user and
/// a user that does not exist answer alike.
#[test]
fn presence_settings_survive_a_restart_and_a_hidden_user_looks_unknown() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = ["--shards", "2"];
    let hopd = Hopd::start_in(&data, &flags);
    let (hidden_key, mut hidden) = hopd.new_user();
    let (friend_key, friend) = hopd.new_user();
    friend.close();
    hidden
        .set_presence_privacy(wire::Visibility::Contacts, &[friend_key.user_id()])
        .unwrap();
    ping(&mut hidden);
    hidden.close();
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &flags);
    let _online = hopd.connect(&hidden_key);
    let (_, mut stranger) = hopd.new_user();
    let never_seen = StaticKey::generate().unwrap().user_id();
    let shown_to_stranger = presence_of(&mut stranger, hidden_key.user_id());
    assert_eq!(shown_to_stranger, (false, 0), "hidden: offline, never seen");
    assert_eq!(
        presence_of(&mut stranger, never_seen),
        shown_to_stranger,
        "an unknown user answers the same"
    );
    let mut friend = hopd.connect(&friend_key);
    assert_eq!(presence_of(&mut friend, hidden_key.user_id()), (true, 0));
}

/// libfaketime, if installed (`.ci/run` installs Debian's `libfaketime`).
fn faketime_library() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|path| std::path::Path::new(path).exists())
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Guards against deadlines on the wall clock: a step of the system clock forwards idled out
/// every connection at once, and a step backwards stalled every ServerAck of a shard (the batch
/// deadline moved into the future). hopd runs under libfaketime, which steps its wall clock
/// (and only that: the monotonic clock is left alone) when the test rewrites the offset file.
#[cfg(target_os = "linux")]
#[test]
fn a_step_of_the_wall_clock_neither_stalls_acks_nor_idles_connections_out() {
    let Some(library) = faketime_library() else {
        eprintln!("SKIPPED: libfaketime is not installed (apt-get install libfaketime)");
        return;
    };
    const HOUR_MS: u64 = 3_600_000;
    let folder = tempfile::tempdir().unwrap();
    let offset = folder.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let env = [
        ("LD_PRELOAD", library),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let hopd = Hopd::start_with_env(&["--shards", "1", "--idle-timeout-ms", "60000"], &env);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (_, mut alice) = hopd.new_user();
    let (_, mut quiet) = hopd.new_user();

    // A day forwards: the quiet connection is not idle (its silence is counted on the
    // monotonic clock). Timeouts are checked at least once a second: wait past two checks.
    std::fs::write(&offset, "+1d\n").unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    let seen = before_pong(&mut quiet);
    assert!(
        !seen
            .iter()
            .any(|stanza| matches!(stanza.kind, Some(Kind::GoAway(_)))),
        "idled out by a clock step: {seen:?}"
    );
    alice.send_message(bob_key.user_id(), b"tomorrow").unwrap();
    let ack = server_ack(&mut alice);
    assert!(
        ack.timestamp_ms > wall_ms() + 23 * HOUR_MS,
        "hopd's wall clock was stepped (timestamp {})",
        ack.timestamp_ms
    );

    // An hour back from the real time (a day and an hour back from hopd's last reading): the
    // next batch still commits at once, so the ServerAck comes.
    std::fs::write(&offset, "-1h\n").unwrap();
    alice
        .send_message(bob_key.user_id(), b"an hour ago")
        .unwrap();
    let ack = server_ack(&mut alice);
    assert!(
        ack.timestamp_ms + HOUR_MS / 2 < wall_ms(),
        "hopd's wall clock was stepped back (timestamp {})",
        ack.timestamp_ms
    );
    ping(&mut quiet);
}

/// Guards against a damaged account record being skipped in silence (its user lost, and with
/// it, at the time, every message acked to that user): hopd refuses to start, naming the file
/// and the offset, and `hopd admin repair-accounts` keeps the valid records so that it starts.
#[test]
fn a_damaged_account_record_stops_the_start_until_it_is_repaired() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &["--shards", "1"]);
    let keys: Vec<StaticKey> = (0..3)
        .map(|_| {
            let (key, client) = hopd.new_user();
            client.close();
            key
        })
        .collect();
    assert!(hopd.stop().success());
    let file = data.join("accounts").join("shard-0.keys");
    let mut bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 3 * 36, "three bindings of 36 bytes");
    bytes[36 + 5] ^= 0x10; // the second record's key
    std::fs::write(&file, &bytes).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .args(["--listen", "127.0.0.1:0", "--pin-cores", "false", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shard-0.keys") && stderr.contains("byte 36"),
        "names the file and the offset: {stderr}"
    );
    assert!(
        stderr.contains("repair-accounts"),
        "says how to repair: {stderr}"
    );

    let repair = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .args(["admin", "repair-accounts", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        repair.status.success(),
        "{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    let hopd = Hopd::start_in(&data, &["--shards", "1"]);
    let (_, mut alice) = hopd.new_user();
    for key in [&keys[0], &keys[2]] {
        alice.send_message(key.user_id(), b"still known").unwrap();
        server_ack(&mut alice);
    }
    // The dropped binding's user binds again when it next connects.
    let mut again = hopd.connect(&keys[1]);
    ping(&mut again);
    alice
        .send_message(keys[1].user_id(), b"known again")
        .unwrap();
    server_ack(&mut alice);
}
