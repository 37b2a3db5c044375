//! Upgrade without dropping connections (`hopd --takeover`, `docs/operations.md`): a new hopd
//! takes over a running one's sockets and sessions while messages flow both ways; a takeover
//! that fails leaves the running hopd serving; one that cannot be done is refused with a
//! clear error.
//!
//! Runs on the backend `HOP_TEST_BACKEND` names (uring by default on Linux); CI runs it on
//! both.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Hopd, PATIENCE};
use hop_protocol::client::Client;
use hop_protocol::wire::{Kind, ReceiptKind, Stanza};

/// Pairs of users talking: 2 × this many connections.
const PAIRS: usize = 1_000;
/// Threads driving the pairs, each its share in turn.
const DRIVERS: usize = 8;
/// Rounds every pair makes after the takeover, at least.
const ROUNDS_AFTER: usize = 3;

struct Pair {
    a: Client,
    b: Client,
    /// Bodies each side received, to find a message delivered twice.
    got_a: HashSet<Vec<u8>>,
    got_b: HashSet<Vec<u8>>,
}

/// The next stanza on `client` that `pick` takes; the others are kept in `rest`. A stanza
/// that does not come within the patience fails the test (a dropped connection fails too).
fn wait_for<T>(
    client: &mut Client,
    what: &str,
    rest: &mut Vec<Stanza>,
    mut pick: impl FnMut(&Stanza) -> Option<T>,
) -> T {
    if let Some(at) = rest.iter().position(|stanza| pick(stanza).is_some()) {
        let stanza = rest.remove(at);
        return pick(&stanza).expect("picked above");
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} within {PATIENCE:?}");
        match client.recv(left) {
            Ok(Some(stanza)) => match pick(&stanza) {
                Some(found) => return found,
                None => rest.push(stanza),
            },
            Ok(None) => {}
            Err(error) => panic!("the connection failed while waiting for {what}: {error}"),
        }
    }
}

/// `from` sends `body` to `to`: the ServerAck comes, `to` gets it once and acks it, and the
/// Delivered receipt reaches `from`, which acks it.
fn exchange(from: &mut Client, to: &mut Client, got: &mut HashSet<Vec<u8>>, body: &[u8]) {
    let mut rest_from = Vec::new();
    let mut rest_to = Vec::new();
    let recipient = to.user_id();
    let message = from.send_message(recipient, body).expect("send");
    let id = wait_for(from, "ServerAck", &mut rest_from, |stanza| {
        match &stanza.kind {
            Some(Kind::ServerAck(ack))
                if ack.seq == message.seq && ack.outbox == message.outbox =>
            {
                Some(ack.id)
            }
            _ => None,
        }
    });
    let delivered = wait_for(to, "Deliver", &mut rest_to, |stanza| match &stanza.kind {
        Some(Kind::Deliver(deliver)) if deliver.id == id => Some(deliver.body.to_vec()),
        _ => None,
    });
    assert_eq!(delivered, body);
    assert!(got.insert(delivered), "a message delivered twice");
    to.ack_deliver(id).expect("ack");
    let receipt = wait_for(
        from,
        "Delivered receipt",
        &mut rest_from,
        |stanza| match &stanza.kind {
            Some(Kind::Receipt(receipt))
                if receipt.id == id && receipt.kind == ReceiptKind::Delivered as i32 =>
            {
                Some(*receipt)
            }
            _ => None,
        },
    );
    from.ack_receipt(&receipt).expect("ack receipt");
    for stanza in rest_from.iter().chain(&rest_to) {
        assert!(
            !matches!(stanza.kind, Some(Kind::GoAway(_))),
            "a client was sent away: {stanza:?}"
        );
    }
}

/// Connects `PAIRS` pairs, in parallel.
fn connect_pairs(hopd: &Hopd) -> Vec<Pair> {
    let per_thread = PAIRS / DRIVERS;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..DRIVERS)
            .map(|_| {
                scope.spawn(|| {
                    (0..per_thread)
                        .map(|_| {
                            let (_, a) = hopd.new_user();
                            let (_, b) = hopd.new_user();
                            Pair {
                                a,
                                b,
                                got_a: HashSet::new(),
                                got_b: HashSet::new(),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("connecting"))
            .collect()
    })
}

#[test]
fn a_takeover_keeps_every_connection_and_loses_or_repeats_no_message() {
    let mut old = Hopd::start(&["--shards", "2"]);
    let mut pairs = connect_pairs(&old);
    let connections = pairs.len() * 2;
    let taken_over = Arc::new(AtomicBool::new(false));
    let after = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Barrier::new(DRIVERS + 1));
    let per_driver = pairs.len().div_ceil(DRIVERS);
    let mut shares: Vec<Vec<Pair>> = Vec::new();
    while !pairs.is_empty() {
        let rest = pairs.split_off(per_driver.min(pairs.len()));
        shares.push(std::mem::replace(&mut pairs, rest));
    }
    let drivers: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(driver, mut share)| {
            let (taken_over, after, started) = (taken_over.clone(), after.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                let mut rounds_after = 0;
                for round in 0.. {
                    for (index, pair) in share.iter_mut().enumerate() {
                        let body = format!("{driver}/{index}/{round}");
                        exchange(&mut pair.a, &mut pair.b, &mut pair.got_b, body.as_bytes());
                        exchange(&mut pair.b, &mut pair.a, &mut pair.got_a, body.as_bytes());
                    }
                    if taken_over.load(Ordering::Acquire) {
                        rounds_after += 1;
                        if rounds_after == ROUNDS_AFTER {
                            break;
                        }
                    }
                }
                after.fetch_add(1, Ordering::AcqRel);
                share
            })
        })
        .collect();
    started.wait();
    // Messages flow; the new process takes over in the middle of them.
    std::thread::sleep(Duration::from_millis(500));
    let new = old.take_over(&["--shards", "2"]);
    assert_eq!(new.addr, old.addr, "the same listening address");
    assert_eq!(new.server_key, old.server_key, "the same server key");
    let status = old.wait();
    assert!(status.success(), "the old hopd exits 0: {status:?}");
    taken_over.store(true, Ordering::Release);
    let shares: Vec<Vec<Pair>> = drivers
        .into_iter()
        .map(|driver| driver.join().expect("a driver failed"))
        .collect();
    let pairs: Vec<Pair> = shares.into_iter().flatten().collect();
    assert_eq!(pairs.len() * 2, connections);
    for pair in &pairs {
        assert_eq!(pair.a.duplicates_dropped(), 0, "a message came twice");
        assert_eq!(pair.b.duplicates_dropped(), 0, "a message came twice");
        assert_eq!(pair.got_a.len(), pair.got_b.len());
    }
    let log = std::fs::read_to_string(old.data.with_extension("next.log")).unwrap_or_default();
    let resumed: usize = (log.lines())
        .filter(|line| line.contains("takeover: connections resumed"))
        .filter_map(|line| {
            line.split("connections=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(
        resumed, connections,
        "the new hopd resumed every connection:\n{log}"
    );
    let old_log = old.log();
    let done = (old_log.lines())
        .find(|line| line.contains("takeover: done"))
        .unwrap_or_else(|| panic!("the old hopd handed over:\n{old_log}"));
    eprintln!("{done}");
    // The new process serves new users too, and stops as any hopd does.
    let (_, mut late) = new.new_user();
    common::ping(&mut late);
    assert!(new.stop().success());
}

/// Stands in for a new hopd that takes everything and then dies before it serves.
#[test]
fn a_takeover_that_fails_midway_leaves_the_running_hopd_serving() {
    let mut hopd = Hopd::start(&["--shards", "2"]);
    let (_, mut alice) = hopd.new_user();
    let (_, mut bob) = hopd.new_user();
    let mut got = HashSet::new();
    exchange(&mut alice, &mut bob, &mut got, b"before");
    let inherited = hop_gateway::takeover::take_over(&hopd.data, 2).expect("the handover");
    let carried: usize = inherited.shards.iter().map(|shard| shard.conns.len()).sum();
    assert_eq!(carried, 2, "both connections were offered");
    drop(inherited); // gone without saying it serves
    exchange(&mut alice, &mut bob, &mut got, b"after");
    exchange(&mut bob, &mut alice, &mut HashSet::new(), b"back");
    // It accepts again, and a later takeover is possible.
    let (_, mut carol) = hopd.new_user();
    common::ping(&mut carol);
    let log = hopd.log();
    assert!(
        log.contains("takeover failed"),
        "the failure is logged:\n{log}"
    );
    // A second attempt takes over all three.
    let new = hopd.take_over(&["--shards", "2"]);
    assert!(hopd.wait().success());
    exchange(&mut alice, &mut bob, &mut got, b"taken over");
    exchange(&mut carol, &mut alice, &mut HashSet::new(), b"carol too");
    assert!(new.stop().success());
}

#[test]
fn a_takeover_with_another_shard_count_is_refused_and_changes_nothing() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (_, mut alice) = hopd.new_user();
    let (_, mut bob) = hopd.new_user();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--data")
        .arg(&hopd.data)
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--shards", "3"])
        .arg("--takeover")
        .output()
        .expect("hopd runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("takeover") && stderr.contains("keeps the shard count"),
        "a clear reason: {stderr}"
    );
    exchange(&mut alice, &mut bob, &mut HashSet::new(), b"still here");
    // Without a running hopd, a takeover says so.
    let folder = tempfile::tempdir().expect("folder");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--data")
        .arg(folder.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--takeover"])
        .output()
        .expect("hopd runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach a running hopd"),
        "a clear reason: {stderr}"
    );
}

/// A client that does not read while the server writes to it: the bytes the old process could
/// not write yet (its send blocked, then cancelled) travel with the connection and arrive
/// first, in order, once.
#[test]
fn a_takeover_carries_the_bytes_a_reader_has_not_taken_yet() {
    const MESSAGES: usize = 240;
    let flags = [
        "--shards",
        "2",
        "--inflight-bytes-max",
        "33554432",
        "--send-buffer-bytes-max",
        "67108864",
        "--send-buffers-bytes-max",
        "268435456",
    ];
    let mut old = Hopd::start(&flags);
    let (_, mut sender) = old.new_user();
    let (_, mut reader) = old.new_user();
    let to = reader.user_id();
    // 240 x 60 kB: more than the loopback socket buffers of both ends hold, less than the
    // recipient's queue quota (16 MiB).
    let body = |n: usize| {
        let mut body = vec![(n % 251) as u8; 60_000];
        body[..8].copy_from_slice(&(n as u64).to_le_bytes());
        body
    };
    for n in 0..MESSAGES {
        sender.queue_message(to, &body(n));
    }
    sender.flush().expect("send");
    let mut rest = Vec::new();
    for _ in 0..MESSAGES {
        wait_for(&mut sender, "ServerAck", &mut rest, |stanza| {
            matches!(stanza.kind, Some(Kind::ServerAck(_))).then_some(())
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let new = old.take_over(&flags);
    assert!(old.wait().success());
    let mut rest = Vec::new();
    for n in 0..MESSAGES {
        let (id, got) = wait_for(&mut reader, "Deliver", &mut rest, |stanza| {
            match &stanza.kind {
                Some(Kind::Deliver(deliver)) => Some((deliver.id, deliver.body.to_vec())),
                _ => None,
            }
        });
        assert!(got == body(n), "message {n} arrives whole, in order");
        reader.ack_deliver(id).expect("ack");
    }
    assert_eq!(reader.duplicates_dropped(), 0);
    assert!(new.stop().success());
}
