//! Groups: created by an account, changed by its admins, fanned out on the group's home shard
//! to every member account and every device of each; ticks "by everyone"; membership and
//! queued group messages across kill -9 and a shard-count change; the CLI.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::process::Command;

use common::{expect_kind, key_on, ping, Hopd};
use hop_protocol::client::Client;
use hop_protocol::wire::{
    device_change, group_change::Op, Deliver, DeviceChange, ErrorCode, GroupChange, GroupInfo,
    Kind, ReceiptKind, Stanza, UserRef,
};
use hop_protocol::{StaticKey, UserId};

fn ask(client: &mut Client, op: Op, group: Option<UserId>, members: &[UserId], admin: bool) {
    client
        .send(&Stanza::of(Kind::GroupChange(GroupChange {
            op: op as i32,
            group: group.map(Into::into),
            members: members.iter().map(|m| (*m).into()).collect(),
            name: "friends".into(),
            nonce: 7,
            admin,
        })))
        .unwrap();
}

/// The answer to a GroupChange: the group, or an Error's code.
fn answer(client: &mut Client) -> Result<GroupInfo, ErrorCode> {
    expect_kind(client, "GroupInfo or Error", |kind| match kind {
        Kind::GroupInfo(info) => Some(Ok(info)),
        Kind::Error(error) => Some(Err(ErrorCode::try_from(error.code).unwrap())),
        _ => None,
    })
}

fn ids(list: &[UserRef]) -> Vec<UserId> {
    list.iter()
        .map(|u| UserRef::user(Some(u)).unwrap())
        .collect()
}

fn deliver(client: &mut Client) -> Deliver {
    expect_kind(client, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    })
}

/// The next Deliver, acked.
fn take(client: &mut Client) -> Deliver {
    let got = deliver(client);
    client.ack_deliver(got.id).unwrap();
    got
}

fn group_of(deliver: &Deliver) -> Option<UserId> {
    UserRef::user(deliver.group.as_deref())
}

fn connected(hopd: &Hopd, key: &StaticKey) -> Client {
    let mut client = hopd.connect(key);
    ping(&mut client);
    client
}

/// Alice (shard 0) makes a group of bob (shard 1) and carol (shard 0), whose phone (its own
/// home shard 1) is linked to her account. A message reaches every device of every other
/// member; the ServerAck counts them; each device's ack is a tick; admins alone change the
/// members; who is not a member can neither send nor look.
#[test]
fn a_group_message_reaches_every_device_of_every_member_and_only_admins_change_it() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (alice_key, bob_key, carol_key, phone_key) =
        (key_on(0, 2), key_on(1, 2), key_on(0, 2), key_on(1, 2));
    let (alice_id, bob_id, carol_id) =
        (alice_key.user_id(), bob_key.user_id(), carol_key.user_id());
    let mut carol = connected(&hopd, &carol_key);
    carol
        .send(&Stanza::of(Kind::DeviceChange(DeviceChange {
            op: device_change::Op::Add as i32,
            device: Some(phone_key.user_id().into()),
        })))
        .unwrap();
    expect_kind(&mut carol, "Devices", |kind| match kind {
        Kind::Devices(_) => Some(()),
        _ => None,
    });
    let mut phone = connected(&hopd, &phone_key);
    let mut alice = connected(&hopd, &alice_key);
    let mut bob = connected(&hopd, &bob_key);

    ask(
        &mut alice,
        Op::Create,
        None,
        &[bob_id, carol_id, alice_id],
        false,
    );
    let info = answer(&mut alice).unwrap();
    let group = UserRef::user(info.group.as_ref()).unwrap();
    assert_eq!(
        group,
        UserId::of_group(alice_id, 7),
        "named by creator and nonce"
    );
    assert_eq!(ids(&info.members), [alice_id, bob_id, carol_id]);
    assert_eq!(ids(&info.admins), [alice_id]);
    assert_eq!(info.name, "friends");
    // Every member's every device hears of it, as an event that names the creator.
    for client in [&mut alice, &mut bob, &mut carol, &mut phone] {
        let created = take(client);
        assert_eq!(group_of(&created), Some(group));
        assert_eq!(UserRef::user(created.from.as_ref()), Some(alice_id));
        let event = created.event.expect("an event");
        assert_eq!(event.op, Op::Create as i32);
        assert_eq!(event.name, "friends");
    }
    // A retried create (the same nonce) finds the same group, and changes nothing.
    ask(&mut alice, Op::Create, None, &[bob_id], false);
    assert_eq!(answer(&mut alice).unwrap().members.len(), 3);

    alice.send_message(group, b"hello, all").unwrap();
    let ack = expect_kind(&mut alice, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack),
        _ => None,
    });
    assert_eq!(
        (ack.members, ack.copies),
        (2, 3),
        "bob; carol and her phone"
    );
    let mut proofs = Vec::new();
    for client in [&mut bob, &mut carol, &mut phone] {
        let got = take(client);
        assert_eq!(&got.body[..], b"hello, all");
        assert_eq!(group_of(&got), Some(group));
        assert_eq!(UserRef::user(got.from.as_ref()), Some(alice_id));
        assert_eq!(got.id, ack.id, "one id for every copy");
        proofs.push(got.proof);
    }
    let mut delivered_by = Vec::new();
    while delivered_by.len() < 3 {
        let receipt = expect_kind(&mut alice, "Receipt", |kind| match kind {
            Kind::Receipt(receipt) => Some(receipt),
            _ => None,
        });
        assert_eq!(receipt.id, ack.id);
        assert_eq!(receipt.kind, ReceiptKind::Delivered as i32);
        alice.ack_receipt(&receipt).unwrap();
        delivered_by.push(UserRef::user(receipt.by.as_ref()).unwrap());
    }
    delivered_by.sort();
    let mut devices = vec![bob_id, carol_id, phone_key.user_id()];
    devices.sort();
    assert_eq!(delivered_by, devices, "a tick per device");
    // A read on carol's phone is carol's read.
    phone.read(alice_id, ack.id, proofs[2]).unwrap();
    let read = expect_kind(&mut alice, "Receipt", |kind| match kind {
        Kind::Receipt(receipt) => Some(receipt),
        _ => None,
    });
    assert_eq!(read.kind, ReceiptKind::Read as i32);
    assert_eq!(UserRef::user(read.by.as_ref()), Some(carol_id));

    // Only admins change the members; who is not a member cannot send, nor look.
    ask(
        &mut bob,
        Op::Add,
        Some(group),
        &[key_on(0, 2).user_id()],
        false,
    );
    assert_eq!(answer(&mut bob).unwrap_err(), ErrorCode::NotAdmin);
    let (dave_key, mut dave) = hopd.new_user();
    ask(&mut dave, Op::Info, Some(group), &[], false);
    assert_eq!(answer(&mut dave).unwrap_err(), ErrorCode::UnknownGroup);
    dave.send_message(group, b"let me in").unwrap();
    let refused = expect_kind(&mut dave, "Error", |kind| match kind {
        Kind::Error(error) => Some(error.code),
        _ => None,
    });
    assert_eq!(refused, ErrorCode::UnknownUser as i32);

    // Alice makes bob an admin and adds dave; bob removes carol, who hears of it (both of
    // her devices) and can no longer send.
    ask(&mut alice, Op::Add, Some(group), &[bob_id], true);
    assert_eq!(ids(&answer(&mut alice).unwrap().admins), [alice_id, bob_id]);
    ask(
        &mut alice,
        Op::Add,
        Some(group),
        &[dave_key.user_id()],
        false,
    );
    assert_eq!(answer(&mut alice).unwrap().members.len(), 4);
    ask(&mut bob, Op::Remove, Some(group), &[carol_id], false);
    let after = answer(&mut bob).unwrap();
    assert_eq!(ids(&after.members), [alice_id, bob_id, dave_key.user_id()]);
    for client in [&mut carol, &mut phone] {
        // The promotion and dave's joining came first, in order.
        let events: Vec<i32> = (0..3).map(|_| take(client).event.unwrap().op).collect();
        assert_eq!(events, [Op::Add as i32, Op::Add as i32, Op::Remove as i32]);
    }
    carol.send_message(group, b"still here?").unwrap();
    let refused = expect_kind(&mut carol, "Error", |kind| match kind {
        Kind::Error(error) => Some(error.code),
        _ => None,
    });
    assert_eq!(refused, ErrorCode::UnknownUser as i32);
}

/// A group's members and the group messages queued for an offline member survive kill -9
/// and a restart with another shard count (the group moves to its new home shard); the
/// member gets the group's events and messages in the order they were made.
#[test]
fn a_group_and_its_queued_messages_survive_kill_9_and_a_shard_count_change() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let mut hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let alice_key = key_on(0, 2);
    let (bob_key, bob) = hopd.new_user();
    drop(bob);
    let mut alice = connected(&hopd, &alice_key);
    ask(&mut alice, Op::Create, None, &[bob_key.user_id()], false);
    let group = UserRef::user(answer(&mut alice).unwrap().group.as_ref()).unwrap();
    take(&mut alice);
    let mut acked = Vec::new();
    for text in ["one", "two", "three"] {
        alice.send_message(group, text.as_bytes()).unwrap();
        acked.push(expect_kind(&mut alice, "ServerAck", |kind| match kind {
            Kind::ServerAck(ack) => Some(ack.id),
            _ => None,
        }));
    }
    hopd.kill9();
    drop(hopd);

    let hopd = Hopd::start_in(&data, &["--shards", "3"]);
    let mut alice = connected(&hopd, &alice_key);
    ask(&mut alice, Op::Info, Some(group), &[], false);
    let info = answer(&mut alice).expect("the group, at its new home shard");
    assert_eq!(ids(&info.members), [alice_key.user_id(), bob_key.user_id()]);
    let mut bob = hopd.connect(&bob_key);
    let created = take(&mut bob);
    assert_eq!(created.event.map(|e| e.op), Some(Op::Create as i32));
    for (text, id) in ["one", "two", "three"].iter().zip(&acked) {
        let got = take(&mut bob);
        assert_eq!(&got.body[..], text.as_bytes());
        assert_eq!(got.id, *id);
        assert_eq!(group_of(&got), Some(group));
    }
}

fn hex_key(key: &[u8; 32]) -> String {
    key.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `hop group create|info|leave`, `hop send --to GROUP --wait delivered` (delivered to every
/// member's device) and `hop listen` (the member sees the group's message with its group).
#[test]
fn the_cli_creates_a_group_sends_to_it_and_leaves_it() {
    let hopd = Hopd::start(&[]);
    let folder = tempfile::tempdir().unwrap();
    let key_file = |name: &str, key: &StaticKey| {
        let path = folder.path().join(name);
        key.save_new(&path).unwrap();
        path
    };
    let (alice_key, alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    drop((alice, bob));
    let (alice_file, bob_file) = (
        key_file("alice.key", &alice_key),
        key_file("bob.key", &bob_key),
    );
    let server_key = hex_key(&hopd.server_key);
    // `hop SUBCOMMAND... --server .. --server-key .. --key KEY ARGS...`; the subcommand is
    // the words before the first flag, or all but the last word.
    let hop = |key: &std::path::Path, args: &[&str]| {
        let words = args
            .iter()
            .position(|arg| arg.starts_with("--"))
            .unwrap_or(args.len() - 1);
        let mut command = Command::new(env!("CARGO_BIN_EXE_hop"));
        command.args(&args[..words]);
        command
            .args(["--server", &hopd.addr, "--server-key", &server_key, "--key"])
            .arg(key)
            .args(&args[words..]);
        command
    };
    let json = |output: std::process::Output| -> Vec<serde_json::Value> {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let bob_id = bob_key.user_id().to_string();
    // `create` prints the group's id alone, as `keygen` prints a user's.
    let created = hop(&alice_file, &["group", "create", "--name", "pals", &bob_id])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let group = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(group.len(), 32, "{group}");
    let info = json(
        hop(&bob_file, &["group", "info", "--group", &group])
            .output()
            .unwrap(),
    );
    assert_eq!(info[0]["name"], "pals");
    assert_eq!(info[0]["admins"][0], alice_key.user_id().to_string());
    assert_eq!(info[0]["members"][1], bob_id);

    let listen = hop(&bob_file, &["listen", "--count", "1", "--timeout", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sent = json(
        hop(
            &alice_file,
            &["send", "--to", &group, "--wait", "delivered", "hi pals"],
        )
        .output()
        .unwrap(),
    );
    // (A group message's receipt may come before its ServerAck: the lines' order varies.)
    let line = |event: &str| sent.iter().find(|line| line["event"] == event).cloned();
    let acked = line("sent").expect("a sent line");
    assert_eq!(
        (acked["members"].as_u64(), acked["copies"].as_u64()),
        (Some(1), Some(1))
    );
    let delivered = line("delivered").expect("a delivered line");
    assert_eq!(delivered["by"], bob_id);
    assert_eq!(delivered["id"], acked["id"]);
    let heard = json(listen.wait_with_output().unwrap());
    let change = heard.iter().find(|e| e["event"] == "group_change").unwrap();
    assert_eq!(
        (change["op"].as_str(), change["name"].as_str()),
        (Some("create"), Some("pals"))
    );
    let message = heard.iter().find(|e| e["event"] == "message").unwrap();
    assert_eq!(message["group"], group.as_str());
    assert_eq!(message["text"], "hi pals");

    let left = json(
        hop(&bob_file, &["group", "leave", "--group", &group])
            .output()
            .unwrap(),
    );
    assert_eq!(left[0]["members"].as_array().unwrap().len(), 1);
    let refused = hop(&bob_file, &["group", "info", "--group", &group])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("UNKNOWN_GROUP"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// Every group limit answers with a clear error and changes nothing: more members than
/// `group_members_max`, a name over 100 bytes, a create with no nonce.
#[test]
fn group_limits_give_clear_errors() {
    let hopd = Hopd::start(&["--group-members-max", "3"]);
    let (_, mut alice) = hopd.new_user();
    let others: Vec<UserId> = (0..3).map(|_| hopd.new_user().0.user_id()).collect();
    ask(&mut alice, Op::Create, None, &others, false);
    assert_eq!(
        answer(&mut alice).unwrap_err(),
        ErrorCode::Limit,
        "4 members"
    );
    ask(&mut alice, Op::Create, None, &others[..2], false);
    let group = UserRef::user(answer(&mut alice).unwrap().group.as_ref()).unwrap();
    ask(&mut alice, Op::Add, Some(group), &others[2..], false);
    assert_eq!(
        answer(&mut alice).unwrap_err(),
        ErrorCode::Limit,
        "a 4th member"
    );
    ask(&mut alice, Op::Info, Some(group), &[], false);
    assert_eq!(answer(&mut alice).unwrap().members.len(), 3, "unchanged");

    let mut change = |name: &str, nonce: u64| {
        alice
            .send(&Stanza::of(Kind::GroupChange(GroupChange {
                op: Op::Create as i32,
                name: name.into(),
                nonce,
                ..GroupChange::default()
            })))
            .unwrap();
        answer(&mut alice).map(|_| ())
    };
    assert_eq!(change(&"x".repeat(101), 9), Err(ErrorCode::BadStanza));
    assert_eq!(change("no nonce", 0), Err(ErrorCode::BadStanza));
    assert_eq!(change(&"x".repeat(100), 9), Ok(()), "100 bytes is allowed");
}

/// `groups_max` holds across a restart: the places are counted again from the groups on disk.
#[test]
fn an_accounts_groups_are_counted_again_after_a_restart() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let flags = ["--shards", "2", "--groups-max", "1"];
    let hopd = Hopd::start_in(&data, &flags);
    let (alice_key, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    drop(bob);
    ask(&mut alice, Op::Create, None, &[bob_key.user_id()], false);
    assert!(answer(&mut alice).is_ok());
    drop(alice);
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &flags);
    let (_, mut carol) = hopd.new_user();
    ask(&mut carol, Op::Create, None, &[bob_key.user_id()], false);
    assert_eq!(
        answer(&mut carol).unwrap_err(),
        ErrorCode::Limit,
        "bob is in one"
    );
    let mut alice = connected(&hopd, &alice_key);
    ask(&mut alice, Op::Create, None, &[], false);
    assert!(
        answer(&mut alice).is_ok(),
        "a retried create finds its group"
    );
}
