//! What hopd keeps from other users of its machine: the data folder (message bodies, keys,
//! who exists) is its own alone, whatever umask it was started with.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{expect_kind, ping, Hopd, RawClient};
use hop_protocol::noise::HANDSHAKE_MESSAGE_BYTES_MAX;
use hop_protocol::wire::{ErrorCode, GoAwayReason, Kind, Ping, Stanza};
use hop_protocol::StaticKey;

/// Every path under `dir`, folders included, with its permission bits.
fn modes_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
        if path.is_dir() {
            found.extend(modes_under(&path));
        }
        found.push((path, mode));
    }
    found
}

/// Guards against message bodies and keys readable by any local user: a service manager or
/// shell with umask 000 used to leave the data folder 0777 and queue segments 0666.
#[test]
fn data_files_are_for_hopd_alone_whatever_the_umask() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_with_umask(&data, 0o000, &["--shards", "2"]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    alice
        .send_message(bob_key.user_id(), b"for bob, on disk")
        .unwrap();
    ping(&mut alice);
    let mut privacy = hopd.connect(&bob_key);
    privacy
        .set_presence_privacy(hop_protocol::wire::Visibility::Nobody, &[])
        .unwrap();
    ping(&mut privacy);
    assert!(hopd.stop().success());

    let data_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777;
    assert_eq!(data_mode, 0o700, "the data folder");
    let found = modes_under(&data);
    assert!(
        found
            .iter()
            .any(|(path, _)| path.extension().is_some_and(|e| e == "log")),
        "a queue segment was written: {found:?}"
    );
    for (path, mode) in found {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{} is {mode:04o}", path.display());
    }
}

/// A data folder that others may read (as older versions and `mkdir` under umask 022 made
/// it) stops the start with a message saying how to fix it.
#[test]
fn a_data_folder_open_to_others_is_refused_with_the_fix() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--data")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--shards", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("open to other users (mode 0755)") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hopd = Hopd::start_in(&data, &["--shards", "1"]);
    assert!(hopd.stop().success(), "starts once fixed");
}

/// `registration = closed`: a key bound before connects as always; a new key is sent away with
/// `NOT_REGISTERED`, and nothing is kept of it (it is refused again after a restart).
#[test]
fn closed_registration_lets_known_keys_in_and_sends_new_ones_away() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &[]);
    let (known, client) = hopd.new_user();
    drop(client);
    assert!(hopd.stop().success());

    let closed = ["--registration", "closed"];
    let stranger = StaticKey::generate().unwrap();
    for _ in 0..2 {
        let hopd = Hopd::start_in(&data, &closed);
        let mut client = hopd.connect(&known);
        ping(&mut client);
        let mut refused = hopd.connect(&stranger);
        let reason = expect_kind(&mut refused, "GoAway", |kind| match kind {
            Kind::GoAway(go_away) => Some(go_away.reason),
            _ => None,
        });
        assert_eq!(reason, GoAwayReason::NotRegistered as i32);
        drop((client, refused));
        assert!(hopd.stop().success());
    }
}

/// A device that sends faster than `sender_messages_per_second` gets `RATE_LIMITED` for the
/// Sends past its burst, naming them, and is served again once its bucket refills; a second
/// sender is not touched.
#[test]
fn a_sender_over_its_rate_is_refused_alone() {
    let hopd = Hopd::start(&[
        "--shards",
        "2",
        "--sender-messages-per-second",
        "5",
        "--sender-message-burst",
        "3",
    ]);
    let (bob_key, _bob) = hopd.new_user();
    let (_, mut alice) = hopd.new_user();
    let (_, mut carol) = hopd.new_user();
    let sent: Vec<_> = (0..4)
        .map(|n| {
            alice
                .send_message(bob_key.user_id(), format!("{n}").as_bytes())
                .unwrap()
        })
        .collect();
    // The three ServerAcks wait for their batch's commit; the refusal does not: any order.
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    while acked.len() + refused.len() < 4 {
        match expect_kind(&mut alice, "a ServerAck or an Error", |kind| match kind {
            Kind::ServerAck(ack) => Some(Err(ack.seq)),
            Kind::Error(error) => Some(Ok((error.seq, error.code, error.reason))),
            _ => None,
        }) {
            Err(seq) => acked.push(seq),
            Ok(error) => refused.push(error),
        }
    }
    acked.sort();
    assert_eq!(acked, [sent[0].seq, sent[1].seq, sent[2].seq]);
    let (seq, code, reason) = refused.pop().unwrap();
    assert_eq!(code, ErrorCode::RateLimited as i32);
    assert_eq!(seq, sent[3].seq, "the fourth Send is the one refused");
    assert!(reason.contains("5 messages a second"), "{reason}");
    carol.send_message(bob_key.user_id(), b"carol").unwrap();
    expect_kind(&mut carol, "carol's ServerAck", |kind| match kind {
        Kind::ServerAck(_) => Some(()),
        _ => None,
    });
    std::thread::sleep(std::time::Duration::from_millis(250));
    alice
        .resend_message(bob_key.user_id(), sent[3].seq, b"3")
        .unwrap();
    let seq = expect_kind(
        &mut alice,
        "the ServerAck of the resend",
        |kind| match kind {
            Kind::ServerAck(ack) => Some(ack.seq),
            _ => None,
        },
    );
    assert_eq!(seq, sent[3].seq);
    let rate_limited: u64 = hopd_metric(&hopd, "hop_rate_limited_total");
    assert_eq!(rate_limited, 1);
}

/// The sum over the shards of a counter in `/metrics`, once it is published (per tick).
fn hopd_metric(hopd: &Hopd, name: &str) -> u64 {
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let mut response = ureq::get(format!("http://{}/metrics", hopd.admin))
            .call()
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        let total: f64 = text
            .lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if total > 0.0 || std::time::Instant::now() > deadline {
            return total as u64;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `registration = token`: a new key's first connection redeems a one-time token the operator
/// issued (`hop admin token`); without one, or with one used or unknown, it is sent away with
/// `NOT_REGISTERED`; keys bound before connect as always. Tokens and their use survive a
/// restart.
#[test]
fn token_registration_makes_an_account_once_per_token() {
    use hop_protocol::client::{Client, ClientError};

    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let token_mode = ["--registration", "token", "--shards", "2"];
    let issue = |hopd: &Hopd| -> String {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_hop"))
            .args(["admin", "--admin", &hopd.admin, "token"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        answer["token"].as_str().unwrap().to_string()
    };
    let connect = |hopd: &Hopd, key: &StaticKey, token: Option<&str>| {
        Client::connect_home_registering(&hopd.addr, key, &hopd.trust(), common::PATIENCE, token)
    };
    let sent_away = |result: Result<Client, ClientError>| -> String {
        let mut client = result.expect("the handshake finishes; the GoAway follows");
        let go_away = expect_kind(&mut client, "GoAway", |kind| match kind {
            Kind::GoAway(go_away) => Some(go_away),
            _ => None,
        });
        assert_eq!(go_away.reason, GoAwayReason::NotRegistered as i32);
        go_away.text
    };
    let hopd = Hopd::start_in(&data, &token_mode);
    let alice = StaticKey::generate().unwrap();
    let text = sent_away(connect(&hopd, &alice, None));
    assert!(text.contains("one-time token"), "{text}");
    let text = sent_away(connect(&hopd, &alice, Some("not a token")));
    assert!(text.contains("not one of them"), "{text}");
    let token = issue(&hopd);
    let unused = issue(&hopd);
    let mut client = connect(&hopd, &alice, Some(&token)).unwrap();
    ping(&mut client);
    drop(client);
    // Bound now: no token needed, and one passed again is ignored.
    ping(&mut connect(&hopd, &alice, None).unwrap());
    ping(&mut connect(&hopd, &alice, Some(&token)).unwrap());
    let bob = StaticKey::generate().unwrap();
    let text = sent_away(connect(&hopd, &bob, Some(&token)));
    assert!(text.contains("used already"), "{text}");
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &token_mode);
    ping(&mut connect(&hopd, &alice, None).unwrap());
    let text = sent_away(connect(&hopd, &bob, Some(&token)));
    assert!(text.contains("used already"), "{text}");
    let mut client = connect(&hopd, &bob, Some(&unused)).unwrap();
    ping(&mut client);
    assert!(hopd.stop().success());
}

/// A client refused by admission waits the refusal's time and tries again within its timeout
/// (`Client::connect_home`); past the timeout it returns the refusal, reason and wait.
#[test]
fn a_refused_client_waits_and_tries_again_within_its_timeout() {
    use hop_protocol::client::{Client, ClientError};
    use hop_protocol::noise::RefusalReason;
    use std::time::{Duration, Instant};

    // One handshake at once from an address, one more every second.
    let hopd = Hopd::start(&[
        "--shards",
        "1",
        "--address-handshakes-per-second",
        "1",
        "--address-handshake-burst",
        "1",
    ]);
    let key = StaticKey::generate().unwrap();
    let connect = |timeout| Client::connect_home(&hopd.addr, &key, &hopd.trust(), timeout);
    ping(&mut connect(common::PATIENCE).unwrap());
    // The bucket is empty: a timeout shorter than the wait gets the refusal at once.
    match connect(Duration::from_millis(100)) {
        Err(ClientError::Refused(refusal)) => {
            assert_eq!(refusal.reason, RefusalReason::AddressRate);
            assert!(refusal.retry_after_ms >= 100, "{refusal:?}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // A long enough one waits it out and gets in (if it was refused on the way, it waited at
    // least the shortest wait a refusal names).
    let refused = hopd_metric(&hopd, "hop_admission_refused_total");
    let start = Instant::now();
    ping(&mut connect(common::PATIENCE).unwrap());
    if hopd_metric(&hopd, "hop_admission_refused_total") > refused {
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}

/// An account none of whose devices connects within `account_expiry_ms` is deleted with its
/// queue and its binding; an account that stays online is not. Its key is then a stranger:
/// refused under closed registration, a new empty account under open registration.
#[test]
fn an_account_not_seen_within_its_expiry_goes_with_its_queue() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let expiry = ["--account-expiry-ms", "2000", "--shards", "2"];
    let hopd = Hopd::start_in(&data, &expiry);
    let (alice_key, alice) = hopd.new_user();
    drop(alice);
    let (bob_key, mut bob) = hopd.new_user();
    bob.send_message(alice_key.user_id(), b"for alice, who never comes back")
        .unwrap();
    expect_kind(&mut bob, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack),
        _ => None,
    });
    // Bob stays online meanwhile: expiry takes idle accounts only.
    assert_eq!(hopd_metric(&hopd, "hop_accounts_expired_total"), 1);
    ping(&mut bob);
    drop(bob);
    assert!(hopd.stop().success());
    let clock = |data: &Path| {
        hop_store::seen::load(&hop_store::io::FsIo, data)
            .unwrap()
            .clock_s
    };
    let first_run = clock(&data);
    assert!(first_run > 0, "the sweeps kept the account clock");

    let hopd = Hopd::start_in(&data, &["--registration", "closed", "--shards", "2"]);
    let mut bob = hopd.connect(&bob_key);
    ping(&mut bob);
    let mut alice = hopd.connect(&alice_key);
    let reason = expect_kind(&mut alice, "GoAway", |kind| match kind {
        Kind::GoAway(go_away) => Some(go_away.reason),
        _ => None,
    });
    assert_eq!(reason, GoAwayReason::NotRegistered as i32, "unbound");
    drop((alice, bob));
    assert!(hopd.stop().success());
    assert!(
        clock(&data) > first_run,
        "the account clock carries on from where the last run left it"
    );

    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let mut alice = hopd.connect(&alice_key);
    let before = common::before_pong(&mut alice);
    assert!(before.is_empty(), "the old queue is gone: {before:?}");
    assert!(hopd.stop().success());
}

/// Guards against a shard that keeps the handshake input its turn's cap leaves and never comes
/// back to it, loses it, or lets it escape the handshake timeout: with a cap of one handshake a
/// turn, fifty clients that send each handshake message at the same moment all finish, one of
/// them with a burst of stanzas right behind its last message (past what hopd keeps before it
/// stops reading the connection), and a client that stops half-way through its first message
/// is still closed at the handshake timeout.
#[test]
fn handshakes_past_a_turns_cap_all_finish_in_the_turns_after() {
    handshakes_at_once_all_finish(&["--handshake-thread", "false", "--handshakes-per-turn", "1"]);
}

/// The same with the handshakes on the shard's handshaker thread (the default): none is lost
/// between the loop and the thread, the stanzas read behind a last handshake message are all
/// handled in order, and the handshake timeout still closes a half-sent message 1. (The input
/// read while the thread has a session: `tests/slow_handshakes.rs`.)
#[test]
fn handshakes_on_the_handshaker_thread_all_finish() {
    handshakes_at_once_all_finish(&["--handshake-thread", "true"]);
}

fn handshakes_at_once_all_finish(flags: &[&str]) {
    const CLIENTS: usize = 50;
    const BURST_PINGS: u64 = 32;
    let mut args = vec!["--shards", "1", "--handshake-timeout-ms", "1000"];
    args.extend_from_slice(flags);
    let hopd = Hopd::start(&args);
    let mut stalled = RawClient::start(&hopd);
    let half = stalled.out.len() / 2;
    stalled.out.truncate(half);
    stalled.send();

    let mut clients: Vec<RawClient> = (0..CLIENTS).map(|_| RawClient::start(&hopd)).collect();
    for client in &mut clients {
        client.send(); // message 1
    }
    for (n, client) in clients.iter_mut().enumerate() {
        client.read_until(|client| client.session.is_open()); // message 2; message 3 in `out`
        let pings = if n == 0 { BURST_PINGS } else { 1 };
        let channel = client.session.channel().unwrap();
        for nonce in 0..pings {
            let ping = Stanza::of(Kind::Ping(Ping {
                nonce: u64::MAX - nonce,
            }));
            channel.queue(&ping, &mut client.out);
        }
        channel.flush(&mut client.out);
    }
    assert!(
        clients[0].out.len() > 2 + HANDSHAKE_MESSAGE_BYTES_MAX,
        "the first client sends more than a handshake message's worth at once"
    );
    for client in &mut clients {
        client.send(); // message 3 and the pings behind it
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let pings = if n == 0 { BURST_PINGS } else { 1 } as usize;
        client.read_until(|client| client.pongs == pings);
        // hopd reads the connection again after its handshake.
        let channel = client.session.channel().unwrap();
        channel.queue(&Stanza::of(Kind::Ping(Ping { nonce: 1 })), &mut client.out);
        channel.flush(&mut client.out);
        client.send();
        client.read_until(|client| client.pongs == pings + 1);
    }

    // The stalled client is closed at its handshake timeout (the read ends; within PATIENCE).
    let mut byte = [0u8; 1];
    let closed = stalled.stream.read(&mut byte);
    let waited_out = matches!(&closed, Err(error)
        if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    assert!(
        !waited_out && !matches!(closed, Ok(1)),
        "a half-sent handshake is closed at the timeout: {closed:?}"
    );
}
