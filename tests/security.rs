//! What hopd keeps from other users of its machine: the data folder (message bodies, keys,
//! who exists) is its own alone, whatever umask it was started with.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a test failure

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{expect_kind, ping, Hopd};
use hop_protocol::wire::{GoAwayReason, Kind};
use hop_protocol::StaticKey;

/// Every path under `dir`, folders included, with its permission bits.
fn modes_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
        if path.is_dir() {
            found.extend(modes_under(&path));
        }
        found.push((path, mode));
    }
    found
}

/// Guards against message bodies and keys readable by any local user: a service manager or
/// shell with umask 000 used to leave the data folder 0777 and queue segments 0666.
#[test]
fn data_files_are_for_hopd_alone_whatever_the_umask() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_with_umask(&data, 0o000, &["--shards", "2"]);
    let (_, mut alice) = hopd.new_user();
    let (bob_key, bob) = hopd.new_user();
    bob.close();
    alice
        .send_message(bob_key.user_id(), b"for bob, on disk")
        .unwrap();
    ping(&mut alice);
    let mut privacy = hopd.connect(&bob_key);
    privacy
        .set_presence_privacy(hop_protocol::wire::Visibility::Nobody, &[])
        .unwrap();
    ping(&mut privacy);
    assert!(hopd.stop().success());

    let data_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777;
    assert_eq!(data_mode, 0o700, "the data folder");
    let found = modes_under(&data);
    assert!(
        found
            .iter()
            .any(|(path, _)| path.extension().is_some_and(|e| e == "log")),
        "a queue segment was written: {found:?}"
    );
    for (path, mode) in found {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{} is {mode:04o}", path.display());
    }
}

/// A data folder that others may read (as older versions and `mkdir` under umask 022 made
/// it) stops the start with a message saying how to fix it.
#[test]
fn a_data_folder_open_to_others_is_refused_with_the_fix() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hopd"))
        .arg("--data")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--shards", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("open to other users (mode 0755)") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hopd = Hopd::start_in(&data, &["--shards", "1"]);
    assert!(hopd.stop().success(), "starts once fixed");
}

/// `registration = closed`: a key bound before connects as always; a new key is sent away with
/// `NOT_REGISTERED`, and nothing is kept of it (it is refused again after a restart).
#[test]
fn closed_registration_lets_known_keys_in_and_sends_new_ones_away() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let hopd = Hopd::start_in(&data, &[]);
    let (known, client) = hopd.new_user();
    drop(client);
    assert!(hopd.stop().success());

    let closed = ["--registration", "closed"];
    let stranger = StaticKey::generate().unwrap();
    for _ in 0..2 {
        let hopd = Hopd::start_in(&data, &closed);
        let mut client = hopd.connect(&known);
        ping(&mut client);
        let mut refused = hopd.connect(&stranger);
        let reason = expect_kind(&mut refused, "GoAway", |kind| match kind {
            Kind::GoAway(go_away) => Some(go_away.reason),
            _ => None,
        });
        assert_eq!(reason, GoAwayReason::NotRegistered as i32);
        drop((client, refused));
        assert!(hopd.stop().success());
    }
}
