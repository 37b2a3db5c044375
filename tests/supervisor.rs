//! "Let it crash", per shard: a panic in one shard closes that shard's connections and
//! restarts it from disk while the other shards serve on. Needs hopd built with the
//! `fault-injection` feature (its admin listener then takes `POST /fault/panic/K`):
//! `cargo test --features fault-injection --test supervisor`, as CI runs it.
#![cfg(feature = "fault-injection")]
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{closed_by_server, expect_kind, key_on, ping, Hopd, PATIENCE};
use hop_protocol::client::Client;
use hop_protocol::wire::Kind;

fn admin(hopd: &Hopd, method: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(PATIENCE))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{}{path}", hopd.admin);
    let mut response = match method {
        "POST" => agent.post(&url).send_empty(),
        _ => agent.get(&url).call(),
    }
    .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// Guards against one shard's bug taking every user down: shard 1 panics while a pair on
/// shard 0 exchanges messages. Shard 1's clients are disconnected and reconnect; a user of
/// shard 1 gets the messages queued for it before the panic; the pair on shard 0 sees no error
/// and loses nothing.
#[test]
fn a_shard_that_panics_restarts_from_disk_while_the_others_serve_on() {
    let hopd = Hopd::start(&["--shards", "2"]);
    // Bob (shard 1) is offline with 20 messages queued, each ServerAcked (so on disk).
    let bob_key = key_on(1, 2);
    let mut bob = hopd.connect(&bob_key);
    ping(&mut bob); // bound on its shard before it goes: alice may send to it
    bob.close();
    let mut alice = hopd.connect(&key_on(0, 2));
    let mut sent = Vec::new();
    for n in 0..20u8 {
        sent.push(alice.send_message(bob_key.user_id(), &[n; 24]).unwrap());
        expect_kind(&mut alice, "ServerAck", |kind| match kind {
            Kind::ServerAck(ack) => Some(ack),
            _ => None,
        });
    }
    // Carol is online on shard 1 when it panics.
    let carol_key = key_on(1, 2);
    let mut carol = hopd.connect(&carol_key);
    ping(&mut carol);

    // A pair on shard 0 exchanges messages throughout; any error fails the test.
    let (dave_key, erin_key) = (key_on(0, 2), key_on(0, 2));
    let mut dave = hopd.connect(&dave_key);
    let mut erin = hopd.connect(&erin_key);
    ping(&mut erin);
    let stop = Arc::new(AtomicBool::new(false));
    let pair = {
        let stop = stop.clone();
        let erin_id = erin_key.user_id();
        std::thread::spawn(move || {
            let mut exchanged = 0u64;
            while !stop.load(Ordering::Relaxed) || exchanged < 50 {
                dave.send_message(erin_id, b"still here").unwrap();
                let deliver = expect_kind(&mut erin, "Deliver", |kind| match kind {
                    Kind::Deliver(deliver) => Some(deliver),
                    _ => None,
                });
                erin.ack_deliver(deliver.id).unwrap();
                expect_kind(&mut dave, "ServerAck", |kind| match kind {
                    Kind::ServerAck(ack) => Some(ack),
                    _ => None,
                });
                exchanged += 1;
            }
            exchanged
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    assert_eq!(admin(&hopd, "POST", "/fault/panic/1").0, 200);
    assert!(closed_by_server(&mut carol), "shard 1's connection closes");
    // The supervisor counts it, logs it and serves again.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = admin(&hopd, "GET", "/metrics");
        let (ready, _) = admin(&hopd, "GET", "/readyz");
        if metrics.contains("hop_shard_restarts_total{shard=\"1\"} 1") && ready == 200 {
            assert!(metrics.contains("hop_shard_restarts_total{shard=\"0\"} 0"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shard 1 did not restart:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(hopd.log().contains("shard panicked"), "{}", hopd.log());

    // Shard 1 serves again: Carol reconnects, Bob gets every queued message.
    let mut carol = hopd.connect(&carol_key);
    ping(&mut carol);
    let mut bob: Client = hopd.connect(&bob_key);
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let deliver = expect_kind(&mut bob, "Deliver", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver),
            _ => None,
        });
        bob.ack_deliver(deliver.id).unwrap();
        received.push(deliver.body[0]);
    }
    assert_eq!(
        received,
        (0..20u8).collect::<Vec<_>>(),
        "in order, none lost"
    );

    stop.store(true, Ordering::Relaxed);
    let exchanged = pair.join().expect("the pair on shard 0 saw no error");
    assert!(exchanged >= 50);
    assert!(hopd.stop().success());
}

/// Guards against a shard that crashes in a loop, restarted forever: past `RESTARTS_MAX`
/// (5) restarts within a minute, the shard gives up and hopd stops with a non-zero status,
/// for the service manager to restart the process.
#[test]
fn a_shard_that_keeps_panicking_stops_hopd_non_zero() {
    let mut hopd = Hopd::start(&["--shards", "2"]);
    for crash in 1..=6 {
        let deadline = Instant::now() + PATIENCE;
        // The shard takes the command only while it serves (between its restarts).
        while admin(&hopd, "POST", "/fault/panic/0").0 != 200 {
            assert!(Instant::now() < deadline, "shard 0 never served again");
            std::thread::sleep(Duration::from_millis(20));
        }
        if crash < 6 {
            let deadline = Instant::now() + PATIENCE;
            while !admin(&hopd, "GET", "/metrics")
                .1
                .contains(&format!("hop_shard_restarts_total{{shard=\"0\"}} {crash}"))
            {
                assert!(Instant::now() < deadline, "restart {crash} not counted");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let status = hopd.wait();
    assert!(!status.success(), "hopd must exit non-zero: {status:?}");
    assert!(hopd.log().contains("giving up"), "{}", hopd.log());
}
