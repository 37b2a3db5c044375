//! Handshakes run on each shard's handshaker thread, never on the shard's loop. Needs hopd built
//! with the `fault-injection` feature, whose handshaker then waits
//! `HOP_FAULT_HANDSHAKE_DELAY_MS` before each job:
//! `cargo test --features fault-injection --test slow_handshakes`, as CI runs it.
#![cfg(feature = "fault-injection")]
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::{expect_kind, frames_of, timed_delivery, Hopd, RawClient};
use hop_protocol::wire::{Kind, Ping, Stanza};

/// Each handshake job takes this long at least.
const JOB_DELAY: Duration = Duration::from_millis(300);

fn start(timeout_ms: &str) -> Hopd {
    start_with(timeout_ms, JOB_DELAY)
}

fn start_with(timeout_ms: &str, delay: Duration) -> Hopd {
    let delay_ms = delay.as_millis().to_string();
    Hopd::start_with_env(
        &[
            "--shards",
            "1",
            "--handshake-thread",
            "true",
            "--handshake-timeout-ms",
            timeout_ms,
        ],
        &[("HOP_FAULT_HANDSHAKE_DELAY_MS", delay_ms.as_str())],
    )
}

/// Guards against handshake work on the shard's loop: while 20 connections' handshakes wait on
/// a handshaker that takes 300 ms per job (six seconds of work queued), a connected pair on the
/// same shard exchanges messages, each delivered well within one job's time. The handshakes
/// all finish after.
#[test]
fn a_slow_handshaker_does_not_delay_connected_users() {
    let hopd = start("30000");
    let (bob_key, mut bob) = hopd.new_user();
    let (_, mut alice) = hopd.new_user();

    let mut waiting: Vec<RawClient> = (0..20).map(|_| RawClient::start(&hopd)).collect();
    for client in &mut waiting {
        client.send(); // message 1: queued for the thread
    }
    let mut slowest = Duration::ZERO;
    for round in 0..20u8 {
        let took = timed_delivery(&mut alice, &mut bob, bob_key.user_id(), &[round; 24]);
        slowest = slowest.max(took);
    }
    assert!(
        slowest < JOB_DELAY / 2,
        "a delivery between connected users took {slowest:?} while each handshake job took \
         {JOB_DELAY:?}: the shard's loop waited for the handshakes"
    );
    for client in &mut waiting {
        client.read_until(|client| client.session.is_open()); // message 2; message 3 in `out`
        client.send();
    }
    eprintln!("slowest delivery {slowest:?} behind 20 handshakes of {JOB_DELAY:?} each");
}

/// Guards against input lost or reordered while the thread has a session: a client sends its
/// message 3 alone, then, while the thread works on it, 40 pings one frame at a time. Every
/// ping is answered, in order, after the handshake.
#[test]
fn input_read_while_the_thread_has_the_session_waits_for_it() {
    const PINGS: u64 = 40;
    let hopd = start("30000");
    let mut client = RawClient::start(&hopd);
    client.send(); // message 1
    client.read_until(|client| client.session.is_open()); // message 2; message 3 in `out`
    let channel = client.session.channel().unwrap();
    for nonce in 0..PINGS {
        channel.queue(&Stanza::of(Kind::Ping(Ping { nonce })), &mut client.out);
        channel.flush(&mut client.out);
    }
    let out = std::mem::take(&mut client.out);
    let frames = frames_of(&out);
    let (message_3, pings) = frames.split_first().unwrap();
    assert_eq!(pings.len() as u64, PINGS, "a frame per ping");
    let sent = Instant::now();
    client.stream.write_all(message_3).unwrap();
    // Within the job's time: these arrive while the thread holds the session.
    std::thread::sleep(JOB_DELAY / 3);
    for ping in pings {
        client.stream.write_all(ping).unwrap();
    }
    client.read_until(|client| client.pongs == PINGS as usize);
    assert!(
        sent.elapsed() >= JOB_DELAY,
        "answered in {:?}, sooner than one job ({JOB_DELAY:?}): the delay was not in effect",
        sent.elapsed()
    );
}

/// A connection that reaches its handshake timeout while the thread has its session is closed
/// at the timeout; the thread's answer, when it comes, finds it gone and is dropped, and the
/// next connection is served.
#[test]
fn a_timeout_while_the_thread_has_the_session_closes_the_connection() {
    // Jobs of 1 s, a timeout of 1.5 s (looked at every 375 ms): message 3's job runs from 1 s to
    // 2 s after the accept, and the timeout closes the connection before it ends.
    let hopd = start_with("1500", Duration::from_secs(1));
    let mut client = RawClient::start(&hopd);
    client.send(); // message 1
    client.read_until(|client| client.session.is_open()); // message 2 after 1 s
    client.send(); // message 3
    let mut byte = [0u8; 1];
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let read = client.stream.read(&mut byte);
    let closed = match &read {
        Ok(0) => true,
        Err(error) => !matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        Ok(_) => false,
    };
    assert!(closed, "closed at the handshake timeout: {read:?}");

    // After the dropped answer, a new connection's message 1 is answered.
    std::thread::sleep(Duration::from_secs(1));
    let mut next = RawClient::start(&hopd);
    next.send();
    next.read_until(|client| client.session.is_open());
}

/// Guards against the loop blocking on a full handshaker: 64 connections' message 1s go to a
/// thread that takes 300 ms a job, and their clients close; 64 more come. The thread still
/// holds the closed ones' jobs, so the loop must not hand it more than it has room for (it
/// would wait, with every connection of the shard, for 19 s of stale jobs): a pair's message
/// is delivered within half a job's time.
#[test]
fn connections_that_close_while_the_thread_has_them_do_not_block_the_loop() {
    let hopd = start("60000");
    let (bob_key, mut bob) = hopd.new_user();
    let (_, mut alice) = hopd.new_user();
    let mut first: Vec<RawClient> = (0..64).map(|_| RawClient::start(&hopd)).collect();
    for client in &mut first {
        client.send(); // message 1
    }
    std::thread::sleep(Duration::from_millis(100));
    drop(first); // closed while their jobs wait for the thread
    std::thread::sleep(Duration::from_millis(100));
    let mut second: Vec<RawClient> = (0..64).map(|_| RawClient::start(&hopd)).collect();
    for client in &mut second {
        client.send();
    }
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    alice.send_message(bob_key.user_id(), &[2; 24]).unwrap();
    let deliver = expect_kind(&mut bob, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    });
    bob.ack_deliver(deliver.id).unwrap();
    let took = sent.elapsed();
    assert!(
        took < JOB_DELAY / 2,
        "a delivery took {took:?} behind the closed connections' handshake jobs: the loop \
         waited for the handshaker"
    );
}
