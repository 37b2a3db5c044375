//! Accounts with companion devices: the primary links and removes them, a companion's
//! connection lives on its account's home shard, a removed device is refused; the links
//! survive a restart; a message to an account reaches every device.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::process::Command;

use common::{before_pong, closed_by_server, expect_kind, key_on, ping, Hopd};
use hop_protocol::client::Client;
use hop_protocol::wire::{device_change::Op, DeviceChange, ErrorCode, GoAwayReason, Kind, UserRef};
use hop_protocol::StaticKey;
use hop_protocol::UserId;

fn change(client: &mut Client, op: Op, device: Option<UserId>) {
    client
        .send(&hop_protocol::wire::Stanza::of(Kind::DeviceChange(
            DeviceChange {
                op: op as i32,
                device: device.map(Into::into),
            },
        )))
        .unwrap();
}

/// The answer to a DeviceChange: the account and its companions, or an Error's code.
fn answer(client: &mut Client) -> Result<(UserId, Vec<UserId>), ErrorCode> {
    expect_kind(client, "Devices or Error", |kind| match kind {
        Kind::Devices(devices) => Some(Ok((
            UserRef::user(devices.account.as_ref()).unwrap(),
            devices
                .companions
                .iter()
                .map(|d| UserRef::user(Some(d)).unwrap())
                .collect(),
        ))),
        Kind::Error(error) => Some(Err(ErrorCode::try_from(error.code).unwrap())),
        _ => None,
    })
}

fn go_away_reason(client: &mut Client) -> i32 {
    expect_kind(client, "GoAway", |kind| match kind {
        Kind::GoAway(go_away) => Some(go_away.reason),
        _ => None,
    })
}

#[test]
fn the_primary_links_and_removes_companions_and_a_removed_device_is_refused() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &["--shards", "2", "--companions-max", "2"]);
    let primary_key = key_on(0, 2);
    let primary_id = primary_key.user_id();
    // The companion's own home is the other shard: it must be moved to its account's.
    let phone_key = key_on(1, 2);
    let phone_id = phone_key.user_id();

    // Linked with the CLI, as an operator's user would.
    let key_file = folder.path().join("primary.key");
    primary_key.save_new(&key_file).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_hop"))
        .args(["device", "add", "--server", &hopd.addr, "--server-key"])
        .arg(hex_key(&hopd.server_key))
        .arg("--key")
        .arg(&key_file)
        .arg(phone_id.to_string())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["account"], primary_id.to_string());
    assert_eq!(printed["companions"][0], phone_id.to_string());
    // (One connection per device: the CLI's replaced any other of the primary's.)
    let mut primary = hopd.connect(&primary_key);

    // The companion lands on its account's shard: that shard's router answers for the
    // account (the companion's own home shard would not know the link).
    let mut phone = hopd.connect(&phone_key);
    ping(&mut phone);
    change(&mut phone, Op::List, None);
    assert_eq!(answer(&mut phone), Ok((primary_id, vec![phone_id])));
    // Only the primary changes the devices.
    change(&mut phone, Op::Add, Some(key_on(0, 2).user_id()));
    assert_eq!(answer(&mut phone), Err(ErrorCode::NotPrimary));

    // Another account cannot take a linked device; the limit holds.
    let mut other = hopd.connect(&key_on(1, 2));
    change(&mut other, Op::Add, Some(phone_id));
    assert_eq!(answer(&mut other), Err(ErrorCode::DeviceTaken));
    let tablet_id = key_on(1, 2).user_id();
    change(&mut primary, Op::Add, Some(tablet_id));
    assert_eq!(
        answer(&mut primary),
        Ok((primary_id, vec![phone_id, tablet_id]))
    );
    change(&mut primary, Op::Add, Some(key_on(0, 2).user_id()));
    assert_eq!(answer(&mut primary), Err(ErrorCode::Limit));

    // The links survive a restart.
    assert!(hopd.stop().success());
    let hopd = Hopd::start_in(&data, &["--shards", "2", "--companions-max", "2"]);
    let mut primary = hopd.connect(&primary_key);
    let mut phone = hopd.connect(&phone_key);
    change(&mut phone, Op::List, None);
    assert_eq!(
        answer(&mut phone),
        Ok((primary_id, vec![phone_id, tablet_id]))
    );

    // Removed: its connection goes, and its next one is refused with the reason.
    change(&mut primary, Op::Remove, Some(phone_id));
    assert_eq!(answer(&mut primary), Ok((primary_id, vec![tablet_id])));
    assert_eq!(
        go_away_reason(&mut phone),
        GoAwayReason::DeviceRemoved as i32
    );
    assert!(closed_by_server(&mut phone));
    let mut again = hopd.connect(&phone_key);
    assert_eq!(
        go_away_reason(&mut again),
        GoAwayReason::DeviceRemoved as i32
    );
    change(&mut primary, Op::Remove, Some(phone_id));
    assert_eq!(answer(&mut primary), Err(ErrorCode::UnknownDevice));

    // Still refused after a restart.
    assert!(hopd.stop().success());
    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let mut again = hopd.connect(&phone_key);
    assert_eq!(
        go_away_reason(&mut again),
        GoAwayReason::DeviceRemoved as i32
    );
}

/// Bob, homed on shard 0 of 2, and his phone, whose own home is shard 1, linked and both
/// connected.
fn account_with_phone(hopd: &Hopd) -> (StaticKey, StaticKey, Client, Client) {
    let bob_key = key_on(0, 2);
    let phone_key = key_on(1, 2);
    let mut bob = hopd.connect(&bob_key);
    change(&mut bob, Op::Add, Some(phone_key.user_id()));
    assert!(answer(&mut bob).is_ok());
    let mut phone = hopd.connect(&phone_key);
    ping(&mut phone);
    (bob_key, phone_key, bob, phone)
}

fn hex_key(key: &[u8; 32]) -> String {
    key.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Two devices of bob on different shards' keys, alice on a third: a message to bob reaches
/// both devices (each acks its own copy, and each ack is a delivered tick naming the device);
/// the phone sends as bob, and bob's other device gets a copy of what it sent.
#[test]
fn a_message_to_an_account_reaches_all_its_devices_and_a_companion_sends_as_the_account() {
    let hopd = Hopd::start(&["--shards", "2"]);
    let (bob_key, phone_key, mut bob, mut phone) = account_with_phone(&hopd);
    let bob_id = bob_key.user_id();
    let alice_key = key_on(1, 2);
    let mut alice = hopd.connect(&alice_key);

    alice
        .send_message(bob_id, b"to both of bob's devices")
        .unwrap();
    let deliver = |client: &mut Client| {
        expect_kind(client, "Deliver", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver),
            _ => None,
        })
    };
    let on_bob = deliver(&mut bob);
    let on_phone = deliver(&mut phone);
    assert_eq!(on_bob.id, on_phone.id);
    assert_eq!(&on_phone.body[..], b"to both of bob's devices");
    phone.ack_deliver(on_phone.id).unwrap();
    let tick = expect_kind(&mut alice, "Receipt", |kind| match kind {
        Kind::Receipt(receipt) => Some(receipt),
        _ => None,
    });
    assert_eq!(tick.id, on_phone.id);
    assert_eq!(UserRef::user(tick.by.as_ref()), Some(phone_key.user_id()));

    phone
        .send_message(alice_key.user_id(), b"from bob's phone")
        .unwrap();
    let got = deliver(&mut alice);
    assert_eq!(UserRef::user(got.from.as_ref()), Some(bob_id));
    let acked = expect_kind(&mut phone, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack.id),
        _ => None,
    });
    assert_eq!(acked, got.id);
    // Sent-sync: bob's other device gets a copy, from bob, naming its recipient.
    let copy = deliver(&mut bob);
    assert_eq!(copy.id, got.id);
    assert_eq!(UserRef::user(copy.from.as_ref()), Some(bob_id));
    assert_eq!(UserRef::user(copy.to.as_deref()), Some(alice_key.user_id()));
    assert_eq!(&copy.body[..], b"from bob's phone");
}

/// Guards against the copies of one message for two devices, and the two delivered ticks
/// their acks make, being taken for one another while their batch is held: each device acks
/// its own copy and the sender acks each tick; after a restart nothing comes back.
#[test]
fn each_device_acks_its_own_copy_and_the_sender_each_tick_across_a_restart() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    // A long batch: every copy and tick is still held when it is acked.
    let flags = ["--shards", "2", "--batch-delay-ms", "60000"];
    let hopd = Hopd::start_in(&data, &flags);
    let (bob_key, phone_key, mut bob, mut phone) = account_with_phone(&hopd);
    let (alice_key, mut alice) = hopd.new_user();

    alice
        .send_message(bob_key.user_id(), b"one for each")
        .unwrap();
    for device in [&mut bob, &mut phone] {
        let id = expect_kind(device, "Deliver", |kind| match kind {
            Kind::Deliver(deliver) => Some(deliver.id),
            _ => None,
        });
        device.ack_deliver(id).unwrap();
        ping(device);
    }
    let mut ticks_by = Vec::new();
    while ticks_by.len() < 2 {
        let receipt = expect_kind(&mut alice, "Receipt", |kind| match kind {
            Kind::Receipt(receipt) => Some(receipt),
            _ => None,
        });
        alice.ack_receipt(&receipt).unwrap();
        ticks_by.push(UserRef::user(receipt.by.as_ref()).unwrap());
    }
    ticks_by.sort();
    let mut devices = vec![bob_key.user_id(), phone_key.user_id()];
    devices.sort();
    assert_eq!(ticks_by, devices, "one delivered tick per device");
    ping(&mut alice);
    drop((bob, phone, alice));
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &flags);
    for key in [&bob_key, &phone_key, &alice_key] {
        let mut client = hopd.connect(key);
        let left = before_pong(&mut client);
        assert!(left.is_empty(), "acked items came back: {left:?}");
    }
}

/// A sent copy waits on disk for a device that is offline, and comes back as a sent copy
/// (from the account, naming its recipient) after a restart.
#[test]
fn a_sent_copy_waits_for_an_offline_device_across_a_restart() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let bob_key = key_on(0, 2);
    let phone_key = key_on(1, 2);
    let mut bob = hopd.connect(&bob_key);
    change(&mut bob, Op::Add, Some(phone_key.user_id()));
    assert!(answer(&mut bob).is_ok());
    bob.close();
    let (alice_key, _alice) = hopd.new_user();
    let mut phone = hopd.connect(&phone_key);
    phone
        .send_message(alice_key.user_id(), b"kept for bob")
        .unwrap();
    expect_kind(&mut phone, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack.id),
        _ => None,
    });
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let mut bob = hopd.connect(&bob_key);
    let copy = expect_kind(&mut bob, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    });
    assert_eq!(UserRef::user(copy.from.as_ref()), Some(bob_key.user_id()));
    assert_eq!(UserRef::user(copy.to.as_deref()), Some(alice_key.user_id()));
    assert_eq!(&copy.body[..], b"kept for bob");
}

/// Guards against a companion's queue stranded by a shard-count change: its items are
/// re-homed with its account's, where the companion's connections go.
#[test]
fn a_companions_queue_follows_its_account_when_the_shard_count_changes() {
    use hop_router::home_shard;
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let bob_key = key_on(0, 2);
    let bob_id = bob_key.user_id();
    // A phone whose own home differs from bob's under two shards and under three.
    let phone_key = loop {
        let key = hop_protocol::StaticKey::generate().unwrap();
        let id = key.user_id();
        if home_shard(id, 2) != home_shard(bob_id, 2) && home_shard(id, 3) != home_shard(bob_id, 3)
        {
            break key;
        }
    };
    let hopd = Hopd::start_in(&data, &["--shards", "2"]);
    let mut bob = hopd.connect(&bob_key);
    change(&mut bob, Op::Add, Some(phone_key.user_id()));
    assert!(answer(&mut bob).is_ok());
    let (_, mut alice) = hopd.new_user();
    alice.send_message(bob_id, b"for every device").unwrap();
    expect_kind(&mut alice, "ServerAck", |kind| match kind {
        Kind::ServerAck(ack) => Some(ack.id),
        _ => None,
    });
    assert!(hopd.stop().success());

    let hopd = Hopd::start_in(&data, &["--shards", "3"]);
    let mut phone = hopd.connect(&phone_key);
    let got = expect_kind(&mut phone, "Deliver", |kind| match kind {
        Kind::Deliver(deliver) => Some(deliver),
        _ => None,
    });
    assert_eq!(&got.body[..], b"for every device");
}
