//! Crash tests: a real hopd killed with SIGKILL, then restarted on the same data folder.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{ping, Hopd, PATIENCE};
use hop_protocol::client::Client;
use hop_protocol::wire::{Kind, ReceiptKind, Stanza};
use hop_protocol::StaticKey;

/// Every Deliver that arrives until the server has been quiet for a while (after the queue is
/// drained, nothing more comes): id -> body. With `ack`, each is acked, which lets the server
/// push past its in-flight window.
fn drain(client: &mut Client, ack: bool) -> BTreeMap<u64, Vec<u8>> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match client.recv(Duration::from_millis(500)).unwrap() {
            Some(Stanza {
                kind: Some(Kind::Deliver(deliver)),
            }) => {
                seen.insert(deliver.id, deliver.body.to_vec());
                if ack {
                    client.ack(deliver.id, ReceiptKind::Unspecified).unwrap();
                }
            }
            Some(_) => {}
            None => return seen,
        }
    }
    panic!("the queue did not drain");
}

/// Guards against: losing a message whose ServerAck the sender saw, when hopd dies without
/// warning (SIGKILL) in the middle of a send load under group commit. The batch delay is
/// long, so that at the kill many messages sit in a batch not yet written: a server that
/// acked before the commit would lose them.
#[test]
fn crash_kill9_during_send_load_loses_no_acked_message() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = [
        "--shards",
        "2",
        "--batch-delay-ms",
        "50",
        "--batch-records-max",
        "100000",
    ];
    let mut hopd = Hopd::start_in(&data, &flags);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (_, mut alice) = hopd.new_user();

    // Pipelined sends; the ServerAcks come back while more sends are in flight.
    let mut acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut bodies: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for seq in 1..=3_000u32 {
        let body = format!("load {seq}").into_bytes();
        alice.queue(&Stanza::send(
            bob_key.user_id(),
            seq,
            bytes::Bytes::from(body.clone()),
        ));
        bodies.insert(seq, body);
        if seq % 100 == 0 {
            alice.flush().unwrap();
            while let Ok(Some(stanza)) = alice.recv(Duration::from_millis(1)) {
                if let Some(Kind::ServerAck(ack)) = stanza.kind {
                    acked.insert(ack.id, bodies[&ack.seq].clone());
                }
            }
        }
        if acked.len() >= 1_000 {
            break;
        }
    }
    alice.flush().unwrap();
    while let Ok(Some(stanza)) = alice.recv(Duration::from_millis(1)) {
        if let Some(Kind::ServerAck(ack)) = stanza.kind {
            acked.insert(ack.id, bodies[&ack.seq].clone());
        }
    }
    hopd.kill9();
    assert!(
        !acked.is_empty(),
        "some messages were acked before the kill"
    );

    let hopd = Hopd::start_in(&data, &flags);
    let mut bob = hopd.connect(&bob_key);
    let delivered = drain(&mut bob, true);
    for (id, body) in &acked {
        assert_eq!(
            delivered.get(id),
            Some(body),
            "acked message {id} lost in the crash"
        );
    }
}

/// Guards against: delivering a message again after its recipient's ack was recorded, when
/// hopd dies without warning. Under `--durability always` an ack is on disk before the server
/// answers anything sent after it, so the Pong marks the point after which it must hold.
#[test]
fn crash_kill9_after_recorded_acks_delivers_nothing_twice() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = ["--durability", "always"];
    let mut hopd = Hopd::start_in(&data, &flags);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (_, mut alice) = hopd.new_user();
    for seq in 1..=40u32 {
        alice.queue(&Stanza::send(
            bob_key.user_id(),
            seq,
            bytes::Bytes::from(format!("m{seq}")),
        ));
    }
    alice.flush().unwrap();
    let mut acks = 0;
    while acks < 40 {
        if let Some(Kind::ServerAck(_)) = common::expect_stanza(&mut alice, "ServerAck").kind {
            acks += 1;
        }
    }

    let mut bob = hopd.connect(&bob_key);
    let first: Vec<u64> = drain(&mut bob, false).into_keys().collect();
    assert_eq!(first.len(), 40);
    let (acked, unacked) = first.split_at(25);
    for id in acked {
        bob.ack(*id, ReceiptKind::Unspecified).unwrap();
    }
    ping(&mut bob);
    hopd.kill9();

    let hopd = Hopd::start_in(&data, &flags);
    let mut bob = hopd.connect(&bob_key);
    let again: BTreeSet<u64> = drain(&mut bob, false).into_keys().collect();
    let acked: BTreeSet<u64> = acked.iter().copied().collect();
    assert!(
        again.is_disjoint(&acked),
        "acked messages came back: {:?}",
        again.intersection(&acked)
    );
    assert_eq!(
        again,
        unacked.iter().copied().collect(),
        "the unacked ones all came back"
    );
}

/// Guards against: a restart with another shard count losing or duplicating queued messages.
#[test]
fn restart_with_another_shard_count_rehomes_every_queued_message() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &["--shards", "3"]);
    let recipients: Vec<StaticKey> = (0..6)
        .map(|_| {
            let (key, client) = hopd.new_user();
            client.close();
            key
        })
        .collect();
    let (_, mut alice) = hopd.new_user();
    let mut seq = 0;
    for recipient in &recipients {
        for _ in 0..5 {
            seq += 1;
            alice
                .send_message(recipient.user_id(), format!("to {seq}").as_bytes())
                .unwrap();
        }
    }
    let mut acks = 0;
    while acks < seq {
        if let Some(Kind::ServerAck(_)) = common::expect_stanza(&mut alice, "ServerAck").kind {
            acks += 1;
        }
    }
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    for recipient in &recipients {
        let mut client = hopd.connect(recipient);
        let delivered = drain(&mut client, true);
        assert_eq!(delivered.len(), 5, "every queued message, once");
    }
}

/// The admin view reads a stopped server's queues.
#[test]
fn admin_queues_reports_the_depths() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    let (_, mut alice) = hopd.new_user();
    for _ in 0..7 {
        alice.send_message(bob_key.user_id(), b"waiting").unwrap();
    }
    let mut acks = 0;
    while acks < 7 {
        if let Some(Kind::ServerAck(_)) = common::expect_stanza(&mut alice, "ServerAck").kind {
            acks += 1;
        }
    }
    assert!(hopd.stop().success());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .args(["admin", "queues", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains(&bob_key.user_id().to_string()), "{table}");
    assert!(table.contains('7'), "{table}");
}
