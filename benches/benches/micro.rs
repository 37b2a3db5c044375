//! Criterion micro-benchmarks of hop's hot-path pieces, each without IO:
//! frame codec, Noise transport seal/open of a small message, one routing cycle through
//! `hop_router::Router`, and a mailbox hop between two threads (`crossbeam_queue::ArrayQueue`).
//!
//! `cargo bench -p hop-bench --bench micro`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use hop_protocol::frame::{push_header, Deframer, FrameError, FRAME_BODY_BYTES_MAX};
use hop_protocol::keys::StaticKey;
use hop_protocol::noise::{
    ClientHandshake, ServerHandshake, ServerStep, Transport, HANDSHAKE_FRAME_LIMITS,
    TRANSPORT_FRAME_LIMITS,
};
use hop_protocol::wire::{self, Ack, Kind, ReceiptKind, Stanza};
use hop_router::quota::Rate;
use hop_router::{Action, ConnRef, Limits, Router, Secrets};

/// The DESIGN's benchmark message body.
const BODY: &[u8; 24] = b"twenty-four byte message";

fn frame_codec(c: &mut Criterion) {
    // A Send to a recipient already bound to an alias: the common case on the wire.
    let stanza = Stanza::send_to_alias(1, 7, Bytes::from_static(BODY));
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_send_stanza_and_header", |b| {
        let mut out = Vec::with_capacity(128);
        b.iter(|| {
            out.clear();
            let mut plaintext = Vec::with_capacity(64);
            wire::encode(black_box(&stanza), &mut plaintext);
            push_header(&mut out, plaintext.len());
            out.extend_from_slice(&plaintext);
            black_box(&out);
        });
    });
    let mut stream = Vec::new();
    for _ in 0..64 {
        let mut plaintext = Vec::new();
        wire::encode(&stanza, &mut plaintext);
        push_header(&mut stream, plaintext.len());
        stream.extend_from_slice(&plaintext);
    }
    group.throughput(Throughput::Elements(64));
    group.bench_function("deframe_and_decode_64_stanzas", |b| {
        let mut deframer = Deframer::new();
        b.iter(|| {
            let mut seen = 0u32;
            deframer
                .handle_input::<FrameError>(
                    black_box(&stream),
                    &mut || TRANSPORT_FRAME_LIMITS,
                    &mut |frame| {
                        wire::decode_all::<wire::DecodeError>(frame, &mut |s| {
                            seen += u32::from(s.kind.is_some());
                            Ok(())
                        })
                        .map_err(|_| FrameError::TooShort {
                            length: 0,
                            minimum: 1,
                        })
                    },
                )
                .expect("well-formed stream");
            black_box(seen);
        });
    });
    group.finish();
}

fn transport_pair() -> (Transport, Transport) {
    let server_key = StaticKey::generate().expect("key");
    let client_key = StaticKey::generate().expect("key");
    let frame_of = |bytes: &[u8]| {
        let mut body = None;
        Deframer::new()
            .handle_input::<FrameError>(bytes, &mut || HANDSHAKE_FRAME_LIMITS, &mut |f| {
                body = Some(f.to_vec());
                Ok(())
            })
            .expect("one frame");
        body.expect("one frame")
    };
    let mut message_1 = Vec::new();
    let mut client = ClientHandshake::start(&client_key, &mut message_1);
    let mut message_2 = Vec::new();
    let ServerStep::Continue(server) = Box::new(ServerHandshake::new(&server_key))
        .handle_frame(&frame_of(&message_1), &mut message_2)
        .expect("message 1")
    else {
        panic!("finished after message 1");
    };
    client
        .handle_response(&frame_of(&message_2))
        .expect("message 2");
    let mut message_3 = Vec::new();
    let client = client.finish(&mut message_3).expect("message 3");
    let ServerStep::Finished {
        transport: server, ..
    } = server
        .handle_frame(&frame_of(&message_3), &mut Vec::new())
        .expect("message 3")
    else {
        panic!("not finished after message 3");
    };
    (client, server)
}

fn noise_transport(c: &mut Criterion) {
    let mut plaintext = Vec::new();
    wire::encode(
        &Stanza::send_to_alias(1, 7, Bytes::from_static(BODY)),
        &mut plaintext,
    );
    let mut group = c.benchmark_group("noise");
    group.throughput(Throughput::Elements(1));
    group.bench_function("seal_open_send_stanza", |b| {
        let (mut client, mut server) = transport_pair();
        let mut wire_bytes = Vec::with_capacity(128);
        let mut scratch = vec![0u8; FRAME_BODY_BYTES_MAX];
        b.iter(|| {
            wire_bytes.clear();
            client.seal_frame(black_box(&plaintext), &mut wire_bytes);
            let opened = server
                .open_frame(&wire_bytes[2..], &mut scratch)
                .expect("opens");
            black_box(opened.len());
        });
    });
    group.bench_function("handshake_both_sides", |b| {
        b.iter(|| black_box(transport_pair()));
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let secrets = Secrets::derive(&[3; 32]);
    // The sender's rate is checked on every Send, as in hopd, at a rate no run reaches (the
    // clock here stands still, so a real rate would refuse all but its burst).
    let unlimited = Rate {
        per_second: u32::MAX,
        burst: u32::MAX,
    };
    let limits = Limits {
        sender_messages: unlimited,
        sender_reads: unlimited,
        ..Limits::default()
    };
    let mut router = Router::new(0, 1, limits, secrets);
    let alice = StaticKey::generate().expect("key");
    let bob = StaticKey::generate().expect("key");
    let (a, b) = (alice.user_id(), bob.user_id());
    router.handle_connect(a, alice.public(), ConnRef(1), 0);
    router.handle_connect(b, bob.public(), ConnRef(2), 0);
    // Alice's connection declares its outbox and binds bob to alias 1, as a client does once.
    router
        .handle_stanza(a, ConnRef(1), Stanza::outbox(77), 1)
        .expect("valid outbox");
    router
        .handle_stanza(a, ConnRef(1), Stanza::send(b, 1, Bytes::new(), 1), 1)
        .expect("valid send");
    let mut batch = Vec::new();
    carry_out(&mut router, &mut batch, |_| {});
    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(1));
    // One message's whole life on one shard: Send -> ServerAck + Deliver, the recipient's Ack
    // -> delivered Receipt, the sender's Ack of the receipt. Acking keeps the queues empty.
    group.bench_function("send_deliver_ack_receipt_cycle", |bench| {
        let mut seq = 1u64;
        bench.iter(|| {
            seq += 1;
            let send = Stanza::send_to_alias(1, seq, Bytes::from_static(BODY));
            router
                .handle_stanza(a, ConnRef(1), send, 1)
                .expect("valid send");
            let mut deliver_id = None;
            carry_out(&mut router, &mut batch, |action| {
                if let Action::Send {
                    stanza:
                        Stanza {
                            kind: Some(Kind::Deliver(d)),
                        },
                    ..
                } = action
                {
                    deliver_id = Some(d.id);
                }
            });
            let id = deliver_id.expect("delivered to an online recipient");
            let ack = Stanza::of(Kind::Ack(Ack {
                id,
                kind: ReceiptKind::Unspecified as i32,
            }));
            router
                .handle_stanza(b, ConnRef(2), ack, 1)
                .expect("valid ack");
            let mut receipt = None;
            carry_out(&mut router, &mut batch, |action| {
                if let Action::Send {
                    stanza:
                        Stanza {
                            kind: Some(Kind::Receipt(r)),
                        },
                    ..
                } = action
                {
                    receipt = Some(r);
                }
            });
            // A receipt is acked by its ack id, which mixes in who made it.
            let ack = Stanza::of(Kind::Ack(Ack {
                id: receipt
                    .and_then(|receipt| receipt.ack_id())
                    .expect("a delivered receipt"),
                kind: ReceiptKind::Delivered as i32,
            }));
            router
                .handle_stanza(a, ConnRef(1), ack, 1)
                .expect("valid ack");
            carry_out(&mut router, &mut batch, |_| {});
        });
    });
    group.finish();
}

/// Carries out the router's actions as the shard loop does (swapping buffers until none are
/// left), with a disk that keeps every item at once; `each` sees every other action.
fn carry_out(router: &mut Router, batch: &mut Vec<Action>, mut each: impl FnMut(Action)) {
    loop {
        router.swap_actions(batch);
        if batch.is_empty() {
            return;
        }
        for action in batch.drain(..) {
            match action {
                Action::Keep { user, item, keep } => {
                    router.handle_kept(user, item.id(), item.ack_kind(), keep, 1);
                }
                action => each(action),
            }
        }
    }
}

fn mailbox(c: &mut Criterion) {
    let mut group = c.benchmark_group("mailbox");
    group.throughput(Throughput::Elements(1));
    // A round trip through two bounded queues between two threads (ping and pong), so each
    // iteration is two hops; the reported time per element is that of one round trip.
    group.bench_function("array_queue_round_trip_two_threads", |b| {
        let to_peer = Arc::new(ArrayQueue::<u64>::new(1024));
        let back = Arc::new(ArrayQueue::<u64>::new(1024));
        let stop = Arc::new(AtomicBool::new(false));
        let peer = {
            let (to_peer, back, stop) = (to_peer.clone(), back.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(value) = to_peer.pop() {
                        while back.push(value).is_err() {
                            std::hint::spin_loop();
                        }
                    } else {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut value = 0u64;
        b.iter(|| {
            value += 1;
            while to_peer.push(value).is_err() {
                std::hint::spin_loop();
            }
            loop {
                if let Some(answer) = back.pop() {
                    black_box(answer);
                    break;
                }
                std::hint::spin_loop();
            }
        });
        stop.store(true, Ordering::Relaxed);
        peer.join().expect("peer thread");
    });
    group.finish();
}

criterion_group!(benches, frame_codec, noise_transport, routing, mailbox);
criterion_main!(benches);
