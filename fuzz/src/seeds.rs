//! Writes the seed inputs in `seeds/<target>/`: a few valid inputs per target, so that the
//! fuzzer starts from real frames and stanzas rather than from nothing. Rewrite them after a
//! change of an input layout or of the wire format with
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`.

use std::fs;
use std::path::PathBuf;

use bytes::Bytes;
use hop_protocol::frame::{push_header, FrameLimits, FRAME_BODY_BYTES_MAX};
use hop_protocol::noise::HANDSHAKE_FRAME_LIMITS;
use hop_protocol::session::ClientConnection;
use hop_protocol::wire::{
    self, group_change, Ack, ErrorCode, GoAwayReason, GroupInfo, Kind, MessageRef, Ping, Presence,
    PresenceSettings, Read, Receipt, ReceiptKind, ServerAck, Stanza, Subscribe, UserRef,
    Visibility,
};
use hop_protocol::UserId;
use hop_router::mail;
use hop_router::{ConnRef, Envelope, GroupCopy, GroupRequest, ShardMessage};

use crate::{
    client_key, client_response_input, frames, server_open_input, DeframerCase, RECORD_RAW,
    RECORD_SEALED, RESPONSE_CUT_AND_APPEND, RESPONSE_RAW, RESPONSE_XOR, TRUST_ANY, TRUST_PINNED,
    TRUST_PINNED_OTHER, TRUST_REFUSED,
};

const TARGETS: [&str; 6] = [
    "deframer",
    "wire_decode_all",
    "server_fresh",
    "server_open",
    "client_response",
    "mail_decode",
];

fn seed_folder(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    assert!(TARGETS.contains(&target), "a target of fuzz/Cargo.toml");
    let dir = seed_folder(target);
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
    let user = UserId::from_public_key(&[42; 32]);
    let user_ref = || Some(UserRef::from(user));
    let outbox = 0xDEAD_BEEF;
    vec![
        Stanza::send(user, 1, Bytes::from_static(b"hello"), 1),
        Stanza::of(Kind::ServerAck(ServerAck {
            seq: 1,
            id: 7,
            timestamp_ms: 1_700_000_000_000,
            outbox,
            ..ServerAck::default()
        })),
        Stanza::deliver(
            user,
            7,
            1_700_000_000_000,
            Bytes::from_static(b"hello"),
            0x5EED,
        ),
        Stanza::of(Kind::Ack(Ack {
            id: 7,
            kind: ReceiptKind::Delivered as i32,
        })),
        Stanza::of(Kind::Read(Read {
            from: user_ref(),
            id: 7,
            proof: 0x5EED,
        })),
        Stanza::of(Kind::Receipt(Receipt {
            id: 7,
            kind: ReceiptKind::Read as i32,
            by: user_ref(),
            timestamp_ms: 1,
        })),
        Stanza::of(Kind::Presence(Presence {
            user: user_ref(),
            online: true,
            last_seen_ms: 0,
        })),
        Stanza::of(Kind::Subscribe(Subscribe { user: user_ref() })),
        Stanza::of(Kind::Unsubscribe(wire::Unsubscribe { user: user_ref() })),
        Stanza::of(Kind::Ping(Ping { nonce: 9 })),
        Stanza::of(Kind::Pong(wire::Pong { nonce: 9 })),
        Stanza::error(
            ErrorCode::QueueFull,
            "full",
            Some(MessageRef { outbox, seq: 1 }),
        ),
        Stanza::go_away(GoAwayReason::Shutdown, "bye"),
        Stanza::outbox(outbox),
        Stanza::of(Kind::PresenceSettings(PresenceSettings {
            visibility: Visibility::Contacts as i32,
            contacts: vec![user.into()],
        })),
        Stanza::send_to_alias(1, 2, Bytes::from_static(b"again")),
        Stanza { kind: None },
    ]
}

/// One mail of each kind a node sends another, named for the seed files.
fn every_mail() -> Vec<(&'static str, ShardMessage)> {
    let alice = UserId::from_public_key(&[42; 32]);
    let bob = UserId::from_public_key(&[43; 32]);
    let group = UserId::of_group(alice, 0x5EED);
    let conn = ConnRef((3 << 32) | 17);
    let message = MessageRef {
        outbox: 0xDEAD_BEEF,
        seq: 1,
    };
    let envelope = |device, body: &'static [u8]| Envelope {
        from: alice,
        device,
        to: bob,
        conn,
        message,
        resend: false,
        timestamp_ms: 1_700_000_000_000,
        body: Bytes::from_static(body),
    };
    vec![
        ("Route", ShardMessage::Route(envelope(alice, b"hello"))),
        (
            "Route_from_a_companion",
            ShardMessage::Route(envelope(bob, b"hello")),
        ),
        (
            "RouteCopy",
            ShardMessage::RouteCopy(Box::new((
                envelope(alice, b"to the group"),
                GroupCopy {
                    group,
                    id: 0x5eed_0000_0000_0001,
                    event: false,
                },
            ))),
        ),
        (
            "Accepted",
            ShardMessage::Accepted {
                sender: alice,
                conn,
                message,
                id: 7,
                timestamp_ms: 1_700_000_000_000,
                copies: 2,
                delivered: Some(hop_router::Delivered {
                    by: bob,
                    at_ms: 1_700_000_000_001,
                }),
            },
        ),
        (
            "Rejected",
            ShardMessage::Rejected {
                sender: alice,
                conn,
                message: Some(message),
                code: ErrorCode::QueueFull,
                reason: "the recipient's queue is full; message not taken",
            },
        ),
        (
            "Receipt",
            ShardMessage::Receipt {
                to: alice,
                id: 7,
                kind: ReceiptKind::Read,
                by: bob,
                timestamp_ms: 1_700_000_000_001,
            },
        ),
        (
            "Subscribe",
            ShardMessage::Subscribe {
                subscriber: alice,
                conn,
                target: bob,
            },
        ),
        (
            "Unsubscribe",
            ShardMessage::Unsubscribe {
                subscriber: alice,
                target: bob,
            },
        ),
        (
            "Presence",
            ShardMessage::Presence {
                to: alice,
                about: bob,
                online: false,
                last_seen_ms: 1_699_999_980_000,
            },
        ),
        (
            "CopyRefused",
            ShardMessage::CopyRefused {
                group,
                id: 7,
                member: bob,
            },
        ),
        (
            "Group",
            ShardMessage::Group(Box::new(GroupRequest {
                account: alice,
                conn,
                op: group_change::Op::Create,
                group,
                members: vec![bob],
                name: "club".to_owned(),
                admin: false,
            })),
        ),
        ("Join", ShardMessage::Join { group, member: bob }),
        (
            "Joined",
            ShardMessage::Joined {
                group,
                member: bob,
                admitted: true,
            },
        ),
        ("Left", ShardMessage::Left { member: bob }),
        (
            "Answer",
            ShardMessage::Answer {
                account: alice,
                conn,
                stanza: Box::new(Stanza::of(Kind::GroupInfo(GroupInfo {
                    group: Some(group.into()),
                    name: "club".to_owned(),
                    members: vec![alice.into(), bob.into()],
                    admins: vec![alice.into()],
                }))),
            },
        ),
    ]
}

#[test]
#[ignore = "writes files; run by hand to refresh the seeds"]
fn write_seeds() {
    let any = FrameLimits {
        body_bytes_min: 0,
        body_bytes_max: FRAME_BODY_BYTES_MAX,
    };
    for target in TARGETS {
        match fs::remove_dir_all(seed_folder(target)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("cannot clear the seeds of {target}: {error}"),
        }
    }
    let mut message_1 = Vec::new();
    ClientConnection::start(client_key(), None, &mut message_1);

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
    // Message 1 is `e` and the version in the clear: a version-1 client sends no version (the
    // server answers it, to tell it to upgrade once open), an unknown version is refused.
    let message_1_body = &frames(&message_1, HANDSHAKE_FRAME_LIMITS)[0];
    let (e, _version) = message_1_body.split_at(32);
    write(
        "server_fresh",
        "message_1_version_1",
        &with_split(1, &framed(&[e])),
    );
    write(
        "server_fresh",
        "message_1_unknown_version",
        &with_split(34, &framed(&[&[e, &[9]].concat()])),
    );

    // server_open: what a v2 client sends first (its outbox, a Send naming the recipient and
    // binding an alias, a Send to the alias)
    let send = encoded(&[stanzas[13].clone(), stanzas[0].clone(), stanzas[15].clone()]);
    let two = encoded(&[stanzas[9].clone(), stanzas[3].clone()]);
    let forged = framed(&[&[0xab; 40]]);
    type Records<'a> = Vec<(u8, &'a [u8])>;
    let open_cases: [(&str, u8, u16, Records); 5] = [
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

    // client_response: mode, trust, split, then bytes
    let genuine_then_a_frame = {
        let mut bytes = vec![0; 2 + 96];
        bytes.extend_from_slice(&framed(&[&[0xab; 40]]));
        bytes
    };
    let mut frame_of_zeros = vec![0, 96];
    frame_of_zeros.extend_from_slice(&[0; 96]);
    let response_cases: [(&str, u8, u8, u16, &[u8]); 11] = [
        ("genuine", RESPONSE_XOR, TRUST_ANY, 50, &[]),
        ("genuine_pinned", RESPONSE_XOR, TRUST_PINNED, 0, &[]),
        (
            "genuine_pinned_other",
            RESPONSE_XOR,
            TRUST_PINNED_OTHER,
            98,
            &[],
        ),
        ("genuine_refused", RESPONSE_XOR, TRUST_REFUSED, 1, &[]),
        (
            "one_bit_flipped",
            RESPONSE_XOR,
            TRUST_ANY,
            10,
            &[0, 0, 0, 0, 1],
        ),
        ("raw_zeros", RESPONSE_RAW, TRUST_ANY, 3, &[0; 98]),
        (
            "raw_frame_of_zeros",
            RESPONSE_RAW,
            TRUST_PINNED,
            40,
            &frame_of_zeros,
        ),
        ("genuine_cut", RESPONSE_CUT_AND_APPEND, TRUST_ANY, 7, &[98]),
        (
            "cut_and_appended",
            RESPONSE_CUT_AND_APPEND,
            TRUST_PINNED,
            20,
            &[80, 1, 2, 3],
        ),
        (
            "half_message_2",
            RESPONSE_CUT_AND_APPEND,
            TRUST_ANY,
            30,
            &[60],
        ),
        (
            "genuine_then_a_frame",
            RESPONSE_XOR,
            TRUST_ANY,
            98,
            &genuine_then_a_frame,
        ),
    ];
    for (name, mode, trust, split, bytes) in response_cases {
        write(
            "client_response",
            name,
            &client_response_input(mode, trust, split, bytes),
        );
    }

    // mail_decode: one mail of each kind
    for (index, (name, message)) in every_mail().iter().enumerate() {
        let mut bytes = Vec::new();
        mail::encode(message, &mut bytes);
        write("mail_decode", &format!("{index:02}_{name}"), &bytes);
    }
}
