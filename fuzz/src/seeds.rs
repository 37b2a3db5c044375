//! Writes the seed inputs in `seeds/<target>/`: a few valid inputs per target, so that the
//! fuzzer starts from real frames and stanzas rather than from nothing. Rewrite them after a
//! change of an input layout or of the wire format with
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`.

use std::fs;
use std::path::PathBuf;

use bytes::Bytes;
use hop_protocol::frame::{push_header, FrameLimits, FRAME_BODY_BYTES_MAX};
use hop_protocol::noise::{ClientHandshake, HANDSHAKE_FRAME_LIMITS};
use hop_protocol::wire::{
    self, Ack, Deliver, ErrorCode, GoAwayReason, Kind, Ping, Presence, Read, Receipt, ReceiptKind,
    Stanza, Subscribe,
};
use hop_protocol::{StaticKey, UserId};

use crate::{
    server_open_input, DeframerCase, CLIENT_PRIVATE_KEY, RECORD_RAW, RECORD_SEALED,
    RESPONSE_CUT_AND_APPEND, RESPONSE_RAW, RESPONSE_XOR,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    fs::create_dir_all(&dir).expect("seed folder");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn framed(bodies: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for body in bodies {
        push_header(&mut out, body.len());
        out.extend_from_slice(body);
    }
    out
}

fn encoded(stanzas: &[Stanza]) -> Vec<u8> {
    let mut out = Vec::new();
    for stanza in stanzas {
        wire::encode(stanza, &mut out);
    }
    out
}

fn every_kind() -> Vec<Stanza> {
    let to = UserId::new(42).expect("a valid user id");
    vec![
        Stanza::send(to, 1, Bytes::from_static(b"hello")),
        Stanza::of(Kind::ServerAck(wire::ServerAck {
            seq: 1,
            id: 7,
            timestamp_ms: 1_700_000_000_000,
        })),
        Stanza::of(Kind::Deliver(Deliver {
            from: 42,
            id: 7,
            timestamp_ms: 1_700_000_000_000,
            body: Bytes::from_static(b"hello"),
        })),
        Stanza::of(Kind::Ack(Ack {
            id: 7,
            kind: ReceiptKind::Delivered as i32,
        })),
        Stanza::of(Kind::Read(Read { from: 42, id: 7 })),
        Stanza::of(Kind::Receipt(Receipt {
            id: 7,
            kind: ReceiptKind::Read as i32,
            by: 42,
            timestamp_ms: 1,
        })),
        Stanza::of(Kind::Presence(Presence {
            user: 42,
            online: true,
            last_seen_ms: 0,
        })),
        Stanza::of(Kind::Subscribe(Subscribe { user: 42 })),
        Stanza::of(Kind::Unsubscribe(wire::Unsubscribe { user: 42 })),
        Stanza::of(Kind::Ping(Ping { nonce: 9 })),
        Stanza::of(Kind::Pong(wire::Pong { nonce: 9 })),
        Stanza::error(ErrorCode::QueueFull, "full", 1),
        Stanza::go_away(GoAwayReason::Shutdown, "bye"),
        Stanza { kind: None },
    ]
}

#[test]
#[ignore = "writes files; run by hand to refresh the seeds"]
fn write_seeds() {
    let any = FrameLimits {
        body_bytes_min: 0,
        body_bytes_max: FRAME_BODY_BYTES_MAX,
    };
    let mut message_1 = Vec::new();
    ClientHandshake::start(&StaticKey::from_private(CLIENT_PRIVATE_KEY), &mut message_1);

    // deframer
    let three = framed(&[b"one", b"", b"three"]);
    let handshake_then_transport = {
        let mut stream = message_1.clone();
        stream.extend_from_slice(&framed(&[&[0xab; 40]]));
        stream
    };
    let cases = [
        ("three_frames", any, 0, None, 3, 9, &three[..]),
        (
            "handshake_then_transport",
            HANDSHAKE_FRAME_LIMITS,
            1,
            None,
            20,
            40,
            &handshake_then_transport[..],
        ),
        (
            "http_request",
            HANDSHAKE_FRAME_LIMITS,
            1,
            None,
            1,
            2,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        ("callback_stops", any, 0, Some(1), 5, 0, &three[..]),
    ];
    for (name, limits, first_stage_frames, fail_at_frame, split_a, split_b, stream) in cases {
        let case = DeframerCase {
            first_stage_limits: limits,
            first_stage_frames,
            fail_at_frame,
            split_a,
            split_b,
            stream,
        };
        write("deframer", name, &case.to_bytes());
    }

    // wire_decode_all
    let stanzas = every_kind();
    for (index, stanza) in stanzas.iter().enumerate() {
        write(
            "wire_decode_all",
            &format!("{index:02}_{}", stanza.kind_name()),
            &encoded(std::slice::from_ref(stanza)),
        );
    }
    write(
        "wire_decode_all",
        "all_kinds_in_one_frame",
        &encoded(&stanzas),
    );

    // server_fresh: split point, then the client's bytes
    let with_split = |split: u16, bytes: &[u8]| {
        let mut out = split.to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    };
    write("server_fresh", "message_1", &with_split(10, &message_1));
    let mut message_1_and_forged_3 = message_1.clone();
    message_1_and_forged_3.extend_from_slice(&framed(&[&[0x33; 64]]));
    write(
        "server_fresh",
        "message_1_then_forged_3",
        &with_split(40, &message_1_and_forged_3),
    );
    write(
        "server_fresh",
        "http_request",
        &with_split(3, b"GET / HTTP/1.1\r\n\r\n"),
    );

    // server_open
    let send = encoded(&stanzas[..1]);
    let two = encoded(&[stanzas[9].clone(), stanzas[3].clone()]);
    let forged = framed(&[&[0xab; 40]]);
    let open_cases: [(&str, u8, u16, Vec<(u8, &[u8])>); 5] = [
        ("send", 0, 5, vec![(RECORD_SEALED, &send)]),
        (
            "message_3_joined_two_frames",
            1,
            30,
            vec![(RECORD_SEALED, &send), (RECORD_SEALED, &two)],
        ),
        ("empty_plaintext", 0, 0, vec![(RECORD_SEALED, &[])]),
        (
            "bad_stanza",
            1,
            7,
            vec![(RECORD_SEALED, &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff])],
        ),
        (
            "forged_frame",
            0,
            11,
            vec![
                (RECORD_SEALED, &two),
                (RECORD_RAW, &forged),
                (RECORD_SEALED, &send),
            ],
        ),
    ];
    for (name, mode, split, records) in open_cases {
        write(
            "server_open",
            name,
            &server_open_input(mode, split, &records),
        );
    }

    // client_response: mode, then bytes
    let with_mode = |mode: u8, bytes: &[u8]| {
        let mut out = vec![mode];
        out.extend_from_slice(bytes);
        out
    };
    write("client_response", "genuine", &with_mode(RESPONSE_XOR, &[]));
    write(
        "client_response",
        "one_bit_flipped",
        &with_mode(RESPONSE_XOR, &[0, 0, 0, 1]),
    );
    write(
        "client_response",
        "raw_zeros",
        &with_mode(RESPONSE_RAW, &[0; 96]),
    );
    write(
        "client_response",
        "genuine_cut",
        &with_mode(RESPONSE_CUT_AND_APPEND, &[96]),
    );
    write(
        "client_response",
        "cut_and_appended",
        &with_mode(RESPONSE_CUT_AND_APPEND, &[80, 1, 2, 3]),
    );
}
