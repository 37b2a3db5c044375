//! A slow disk must not slow the message path: the offline queue's writes and fsyncs run on each
//! shard's syncer thread, never on the shard's loop. Needs hopd built with the `fault-injection`
//! feature, whose syncer then waits `HOP_FAULT_SYNC_DELAY_MS` before each job (its writes, then
//! its fsyncs):
//! `cargo test --features fault-injection --test slow_disk`, as CI runs it.
#![cfg(feature = "fault-injection")]
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::time::{Duration, Instant};

use common::{before_pong, expect_kind, key_on, ping, timed_delivery, Hopd};
use hop_protocol::client::Client;
use hop_protocol::wire::{GoAwayReason, Kind};

/// Each fsync takes this long at least.
const SYNC_DELAY: Duration = Duration::from_millis(2_000);
/// Messages to the offline user, one every `OFFLINE_EVERY`: each batch is written and synced.
const OFFLINE_MESSAGES: u32 = 40;
const OFFLINE_EVERY: Duration = Duration::from_millis(25);
const ROUNDS: u32 = 30;

/// Guards against an fsync on the shard's loop: while one user's messages to an offline user
/// are being made durable on a disk that takes 2 s per fsync, a pair of online users on the
/// same shard exchanges messages, and no delivery waits for the disk (each well under the
/// fsync's 2 s). The offline messages' ServerAcks do wait for it: they come no sooner than
/// one fsync after the first send, so the delay was in effect.
#[test]
fn a_slow_disk_does_not_delay_deliveries_between_online_users() {
    let delay_ms = SYNC_DELAY.as_millis().to_string();
    let hopd = Hopd::start_with_env(
        &["--shards", "1"],
        &[("HOP_FAULT_SYNC_DELAY_MS", delay_ms.as_str())],
    );
    let dave_key = key_on(0, 1);
    let mut dave = hopd.connect(&dave_key);
    ping(&mut dave); // bound, then offline: carol's messages to it are queued on disk
    dave.close();

    let mut carol = hopd.connect(&key_on(0, 1));
    let dave_id = dave_key.user_id();
    let started = Instant::now();
    let offline = std::thread::spawn(move || {
        for _ in 0..OFFLINE_MESSAGES {
            carol.send_message(dave_id, &[7; 64]).unwrap();
            std::thread::sleep(OFFLINE_EVERY);
        }
        let mut first_ack = None;
        for _ in 0..OFFLINE_MESSAGES {
            expect_kind(&mut carol, "ServerAck", |kind| match kind {
                Kind::ServerAck(ack) => Some(ack),
                _ => None,
            });
            first_ack.get_or_insert_with(|| started.elapsed());
        }
        first_ack.unwrap()
    });

    let bob_key = key_on(0, 1);
    let mut bob = hopd.connect(&bob_key);
    ping(&mut bob);
    let mut alice = hopd.connect(&key_on(0, 1));
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        let took = timed_delivery(&mut alice, &mut bob, bob_key.user_id(), &[round as u8; 24]);
        slowest = slowest.max(took);
        std::thread::sleep(OFFLINE_EVERY);
    }
    let first_ack = offline.join().unwrap();
    assert!(
        first_ack >= SYNC_DELAY,
        "the offline messages' first ServerAck came {first_ack:?} after the first send, \
         sooner than one fsync ({SYNC_DELAY:?}): the injected delay was not in effect"
    );
    assert!(
        slowest < SYNC_DELAY / 2,
        "a delivery between online users took {slowest:?} while fsyncs took {SYNC_DELAY:?}: \
         the shard's loop waited for the disk"
    );
    eprintln!("slowest online delivery {slowest:?}; first offline ServerAck after {first_ack:?}");
}

/// Each read of the offline queue that needs the disk takes this long at least.
const READ_DELAY: Duration = Duration::from_millis(1_500);
/// Messages queued for the user who then comes back.
const QUEUED: u8 = 20;

/// Guards against a read of the offline queue on the shard's loop, and against output that
/// overtakes it: a user comes back to 20 messages queued on disk while each read takes 1.5 s;
/// meanwhile a pair on the same shard exchanges messages without waiting for the disk, and a
/// message sent to the returning user after it connected arrives after the queued ones, every
/// message once and in order.
#[test]
fn a_slow_read_of_the_queue_delays_neither_online_users_nor_the_queue_order() {
    let delay_ms = READ_DELAY.as_millis().to_string();
    let hopd = Hopd::start_with_env(
        &["--shards", "1"],
        &[("HOP_FAULT_READ_DELAY_MS", delay_ms.as_str())],
    );
    let (dave_key, mut carol) = queued_for_one_offline(&hopd, QUEUED);
    let dave_id = dave_key.user_id();

    let back = Instant::now();
    let mut dave = hopd.connect(&dave_key);
    // Sent once dave is online: it must not overtake the queue read from disk.
    carol.send_message(dave_id, &[QUEUED; 16]).unwrap();
    let reading = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        let mut first = None;
        while bodies.len() < usize::from(QUEUED) + 1 {
            let deliver = expect_kind(&mut dave, "Deliver", |kind| match kind {
                Kind::Deliver(deliver) => Some(deliver),
                _ => None,
            });
            first.get_or_insert_with(|| back.elapsed());
            bodies.push(deliver.body[0]);
            dave.ack_deliver(deliver.id).unwrap();
        }
        (first.unwrap(), bodies)
    });

    let bob_key = key_on(0, 1);
    let mut bob = hopd.connect(&bob_key);
    ping(&mut bob);
    let mut alice = hopd.connect(&key_on(0, 1));
    let mut slowest = Duration::ZERO;
    for round in 0..10u8 {
        let took = timed_delivery(&mut alice, &mut bob, bob_key.user_id(), &[round; 24]);
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (first, bodies) = reading.join().unwrap();
    assert!(
        first >= READ_DELAY,
        "the first queued message came {first:?} after the user connected, sooner than one \
         read ({READ_DELAY:?}): the injected delay was not in effect"
    );
    let expected: Vec<u8> = (0..=QUEUED).collect();
    assert_eq!(
        bodies, expected,
        "the queued messages once each and in order, then the one sent while they were read"
    );
    assert!(
        slowest < READ_DELAY / 2,
        "a delivery between online users took {slowest:?} while reads took {READ_DELAY:?}: \
         the shard's loop waited for the disk"
    );
    eprintln!("slowest online delivery {slowest:?}; first queued message after {first:?}");
}

/// Guards against a queue read whose connection went meanwhile losing or repeating messages:
/// a user comes back to 10 messages queued on disk, leaves while they are read (each read
/// takes 500 ms), and comes back again: it gets all 10, once each and in order, and the first
/// read's late answer is dropped with the connection it was for.
#[test]
fn a_user_who_leaves_while_its_queue_is_read_gets_all_of_it_on_return() {
    let hopd = Hopd::start_with_env(&["--shards", "1"], &[("HOP_FAULT_READ_DELAY_MS", "500")]);
    let (dave_key, _carol) = queued_for_one_offline(&hopd, 10);
    // Back, and gone again while its queue is read.
    let dave = hopd.connect(&dave_key);
    std::thread::sleep(Duration::from_millis(100));
    dave.close();
    let mut dave = hopd.connect(&dave_key);
    let bodies = acked_bodies(&mut dave, 10);
    assert_eq!(
        bodies,
        (0..10).collect::<Vec<u8>>(),
        "all of them, in order"
    );
    // Past the first read's answer: nothing more comes.
    std::thread::sleep(Duration::from_millis(600));
    let more = before_pong(&mut dave);
    assert!(
        !more
            .iter()
            .any(|stanza| matches!(stanza.kind, Some(Kind::Deliver(_)))),
        "a message came twice: {more:?}"
    );
    let metrics = ureq::get(format!("http://{}/metrics", hopd.admin))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let reads: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("hop_store_reads_off_loop_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        reads >= 2.0,
        "a read for each connection, the first left behind: {reads}"
    );
}

/// Guards against a connection the server closes while its queue is read losing what waited
/// behind the read: the operator kicks a returning user whose queue read takes 1 s. Its GoAway
/// (queued behind the read, like everything else) still reaches it, with no Deliver before it,
/// and its next connection gets every queued message.
#[test]
fn a_user_kicked_while_its_queue_is_read_gets_its_go_away_and_later_its_queue() {
    let hopd = Hopd::start_with_env(&["--shards", "1"], &[("HOP_FAULT_READ_DELAY_MS", "1000")]);
    let (dave_key, _carol) = queued_for_one_offline(&hopd, 5);
    let mut dave = hopd.connect(&dave_key);
    std::thread::sleep(Duration::from_millis(100));
    let id = dave_key.user_id().to_string();
    let kick = std::process::Command::new(env!("CARGO_BIN_EXE_hop"))
        .args(["admin", "--admin", &hopd.admin, "kick", &id])
        .output()
        .unwrap();
    assert!(
        kick.status.success(),
        "{}",
        String::from_utf8_lossy(&kick.stderr)
    );
    let go_away = expect_kind(&mut dave, "GoAway", |kind| match kind {
        Kind::GoAway(go_away) => Some(go_away),
        Kind::Deliver(_) => panic!("a Deliver on a connection being closed"),
        _ => None,
    });
    assert_eq!(go_away.reason, GoAwayReason::Kicked as i32);
    let mut dave = hopd.connect(&dave_key);
    let bodies = acked_bodies(&mut dave, 5);
    assert_eq!(bodies, [0, 1, 2, 3, 4], "every queued message, in order");
}

/// A user (dave) bound and then offline, and `count` messages from another (carol, returned)
/// queued for it and durable: the router let go of their bodies, which are on disk only.
/// Message `n`'s body is 16 bytes of `n`.
fn queued_for_one_offline(hopd: &Hopd, count: u8) -> (hop_protocol::StaticKey, Client) {
    let dave_key = key_on(0, 1);
    let mut dave = hopd.connect(&dave_key);
    ping(&mut dave);
    dave.close();
    let mut carol = hopd.connect(&key_on(0, 1));
    for n in 0..count {
        carol.send_message(dave_key.user_id(), &[n; 16]).unwrap();
    }
    for _ in 0..count {
        expect_kind(&mut carol, "ServerAck", |kind| match kind {
            Kind::ServerAck(ack) => Some(ack),
            _ => None,
        });
    }
    (dave_key, carol)
}

/// The first byte of each of the next `count` Delivers, each acked.
fn acked_bodies(client: &mut Client, count: usize) -> Vec<u8> {
    (0..count)
        .map(|_| {
            let deliver = expect_kind(client, "Deliver", |kind| match kind {
                Kind::Deliver(deliver) => Some(deliver),
                _ => None,
            });
            client.ack_deliver(deliver.id).unwrap();
            deliver.body[0]
        })
        .collect()
}
