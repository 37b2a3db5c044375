//! Crash, disk-error and damage scenarios for the presence-settings files
//! (`DATA/accounts/shard-K.privacy`). Each test opens with the failure it guards against.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hop_protocol::UserId;
use hop_store::accounts::{self, AccountLog};
use hop_store::io::{Faults, FaultyIo, FsIo, Io};
use hop_store::privacy::{
    self, Compacted, PrivacyLog, COMPACT_SLACK_BYTES, CONTACTS_MAX, PENDING_BYTES_MAX,
    RECORD_BYTES_MAX,
};
use hop_store::StoreError;

/// One change of settings: user, wall_ms, visibility, contacts.
type Change = (UserId, u64, u8, Vec<UserId>);
/// What `load` returns per user.
type Setting = (UserId, u8, Vec<UserId>);

fn user(n: u64) -> UserId {
    UserId::from_halves(0xB000 + n, n).expect("valid id")
}

fn users(range: std::ops::Range<u64>) -> Vec<UserId> {
    range.map(user).collect()
}

fn change(n: u64, wall_ms: u64, visibility: u8, contacts: &[UserId]) -> Change {
    (user(n), wall_ms, visibility, contacts.to_vec())
}

/// The record of `change` exactly as store/DESIGN.md lays it out, written independently of the
/// store's encoder: `crc32c | len | user 16 | wall_ms u64 | visibility u8 | count u16 |
/// contacts`, little-endian, the checksum over `len` and the payload.
fn record(change: &Change) -> Vec<u8> {
    let (user, wall_ms, visibility, contacts) = change;
    let mut payload = Vec::new();
    payload.extend_from_slice(&user.to_bytes());
    payload.extend_from_slice(&wall_ms.to_le_bytes());
    payload.push(*visibility);
    payload.extend_from_slice(&(contacts.len() as u16).to_le_bytes());
    for contact in contacts {
        payload.extend_from_slice(&contact.to_bytes());
    }
    seal(payload)
}

/// Header and checksum around `payload`, whatever it holds.
fn seal(payload: Vec<u8>) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let checksum = crc32c::crc32c(&out[4..]);
    out[..4].copy_from_slice(&checksum.to_le_bytes());
    out
}

fn records(changes: &[Change]) -> Vec<u8> {
    changes.iter().flat_map(record).collect()
}

fn setting(change: &Change) -> Setting {
    (change.0, change.2, change.3.clone())
}

fn faulty() -> (Arc<Faults>, FaultyIo) {
    let faults = Faults::new();
    let io = FaultyIo {
        faults: faults.clone(),
    };
    (faults, io)
}

/// What `load` finds, asserting that it found no torn bytes.
fn loaded(data: &Path) -> Vec<Setting> {
    let loaded = privacy::load(&FsIo, data).expect("load");
    assert_eq!(loaded.torn_bytes, 0, "no torn bytes");
    loaded.settings
}

fn file_bytes(data: &Path, shard: u16) -> Vec<u8> {
    fs::read(privacy::shard_path(data, shard)).expect("file")
}

fn file_length(data: &Path, shard: u16) -> u64 {
    fs::metadata(privacy::shard_path(data, shard))
        .expect("file")
        .len()
}

fn append_all<I: Io>(log: &mut PrivacyLog<I>, changes: &[Change]) {
    for (user, wall_ms, visibility, contacts) in changes {
        log.append(*user, *wall_ms, *visibility, contacts);
    }
}

/// Opens shard `shard`'s log on `io` and makes `changes` durable.
fn log_with<I: Io>(io: &I, data: &Path, shard: u16, changes: &[Change]) -> PrivacyLog<I> {
    let mut log = PrivacyLog::open(io, data, shard).expect("open");
    append_all(&mut log, changes);
    assert_eq!(log.flush().expect("flush"), changes.len());
    log
}

fn expect_corrupt(error: &StoreError) -> (&Path, u64, &str) {
    let StoreError::Corrupt {
        path,
        offset,
        reason,
        ..
    } = error
    else {
        panic!("expected a corrupt-record error, got {error}");
    };
    (path, *offset, reason)
}

#[test]
fn settings_round_trip_across_shard_files_and_the_latest_change_wins() {
    // Guards against: a restart with another shard count leaving a user's settings in two
    // files and the older one winning (a user who hid its presence showing it again), a tie
    // going to the wrong file, a wall clock that stepped back making an earlier change of the
    // same file win, or a change being readable before its flush.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let first = [
        change(1, 100, 0, &[]),
        change(2, 100, 1, &[user(3)]),
        change(3, 50, 2, &[]),
        change(4, 300, 1, &users(1..3)),
        change(4, 200, 2, &[]), // the clock stepped back: still the later change
    ];
    drop(log_with(&FsIo, data, 2, &first));
    assert_eq!(
        file_bytes(data, 2),
        records(&first),
        "the layout of store/DESIGN.md"
    );
    // Shard 10 comes after shard 2 (by number, not by name).
    let mut second = PrivacyLog::open(&FsIo, data, 10).expect("open");
    let later = [
        change(1, 200, 2, &[]),         // later: wins
        change(2, 100, 2, &[]),         // same time: the later file wins
        change(3, 40, 0, &[]),          // earlier: loses
        change(4, 250, 1, &[user(3)]),  // later than the 200 its first file ends with
        change(5, 10, 1, &users(1..5)), // only here
    ];
    append_all(&mut second, &later);
    assert_eq!(
        loaded(data).len(),
        4,
        "buffered changes are not on file before the flush"
    );
    assert_eq!(second.pending_records(), 5);
    assert_eq!(second.flush().expect("flush"), 5);
    assert_eq!(second.flush().expect("nothing left"), 0);
    assert_eq!(
        loaded(data),
        [
            setting(&later[0]),
            setting(&later[1]),
            setting(&first[2]),
            setting(&later[3]),
            setting(&later[4]),
        ]
    );

    // Back to the old shard count: user 1 changes again in its old file, and wins there.
    drop(second);
    let mut first_again = PrivacyLog::open(&FsIo, data, 2).expect("open");
    assert_eq!(first_again.opened().records, 5);
    assert_eq!(first_again.opened().users, 4);
    let newest = change(1, 400, 1, &users(2..4));
    append_all(&mut first_again, std::slice::from_ref(&newest));
    first_again.flush().expect("flush");
    assert_eq!(loaded(data)[0], setting(&newest));
}

#[test]
fn a_short_write_then_a_retry_loads_every_setting_exactly_once() {
    // Guards against: a disk that fills in the middle of a flush leaving part of the batch on
    // file, and the retry landing after those torn bytes, so that the records behind them are
    // misaligned and read back as damage.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let durable = [change(1, 1, 0, &[]), change(2, 2, 1, &users(1..2))];
    let mut log = log_with(&io, data, 0, &durable);
    let batch = [
        change(3, 3, 1, &users(1..3)),
        change(4, 4, 2, &[]),
        change(5, 5, 1, &users(1..5)),
    ];
    append_all(&mut log, &batch);
    faults.write_bytes_left.store(70, Ordering::Relaxed); // one record and 3 bytes fit
    log.flush().expect_err("the disk is full");
    assert_eq!(log.pending_records(), 3, "kept for the retry");
    assert_eq!(
        file_length(data, 0),
        records(&durable).len() as u64,
        "cut back"
    );
    faults.write_bytes_left.store(-1, Ordering::Relaxed); // space again
    assert_eq!(log.flush().expect("retry"), 3);
    let last = [change(6, 6, 0, &[])];
    append_all(&mut log, &last);
    log.flush().expect("flush");
    let all: Vec<Change> = [&durable[..], &batch, &last].concat();
    assert_eq!(
        file_bytes(data, 0),
        records(&all),
        "each record once, in order"
    );
    assert_eq!(loaded(data), all.iter().map(setting).collect::<Vec<_>>());
}

#[test]
fn a_failed_write_then_a_retry_loads_every_setting_exactly_once() {
    // Guards against: a write that fails outright (ENOSPC, EIO) losing the buffered settings,
    // or the retry writing them twice.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let durable = [change(1, 1, 2, &[])];
    let mut log = log_with(&io, data, 0, &durable);
    let batch = [change(2, 2, 1, &users(1..2)), change(3, 3, 0, &[])];
    append_all(&mut log, &batch);
    faults.fail_next_write.store(true, Ordering::Relaxed);
    log.flush().expect_err("the write fails");
    assert_eq!(log.pending_records(), 2);
    assert_eq!(log.flush().expect("retry"), 2);
    assert_eq!(log.flush().expect("nothing left"), 0);
    let all: Vec<Change> = [&durable[..], &batch].concat();
    assert_eq!(file_bytes(data, 0), records(&all));
    assert_eq!(loaded(data), all.iter().map(setting).collect::<Vec<_>>());
}

#[test]
fn a_short_write_whose_cleanup_fails_is_overwritten_by_the_retry() {
    // Guards against: the truncate after a failed write failing as well, and the retry then
    // appending behind the torn bytes instead of writing over them.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let durable = [change(1, 1, 0, &[]), change(2, 2, 2, &[])];
    let mut log = log_with(&io, data, 0, &durable);
    let batch = [change(3, 3, 1, &users(1..3)), change(4, 4, 2, &[])];
    append_all(&mut log, &batch);
    faults.fail_truncates.store(true, Ordering::Relaxed);
    faults.write_bytes_left.store(50, Ordering::Relaxed);
    log.flush().expect_err("the disk is full");
    assert_eq!(
        file_length(data, 0),
        records(&durable).len() as u64 + 50,
        "the torn bytes stay: the truncate failed"
    );
    faults.write_bytes_left.store(-1, Ordering::Relaxed);
    assert_eq!(log.flush().expect("retry"), 2);
    let all: Vec<Change> = [&durable[..], &batch].concat();
    assert_eq!(file_bytes(data, 0), records(&all));
    assert_eq!(loaded(data), all.iter().map(setting).collect::<Vec<_>>());
}

#[test]
fn a_failed_fsync_then_a_retry_loads_every_setting_exactly_once() {
    // Guards against: a flush whose fsync failed (EIO) being taken as durable, or its records,
    // already written, being written again behind themselves so that a change appears twice.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let durable = [change(1, 1, 0, &[])];
    let mut log = log_with(&io, data, 0, &durable);
    let second = [change(2, 2, 1, &users(1..2))];
    append_all(&mut log, &second);
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    log.flush().expect_err("the fsync fails");
    assert_eq!(log.pending_records(), 1);
    assert_eq!(
        file_length(data, 0),
        records(&durable).len() as u64,
        "cut back"
    );
    assert_eq!(log.flush().expect("retry"), 1);

    // Again with a failing truncate: the whole unsynced record stays on file, and the retry
    // writes over it at the same offset.
    let third = [change(3, 3, 2, &[])];
    append_all(&mut log, &third);
    faults.fail_truncates.store(true, Ordering::Relaxed);
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    log.flush().expect_err("the fsync fails");
    let all: Vec<Change> = [&durable[..], &second, &third].concat();
    assert_eq!(file_length(data, 0), records(&all).len() as u64);
    assert_eq!(log.flush().expect("retry"), 1);
    assert_eq!(file_bytes(data, 0), records(&all), "each record once");
    assert_eq!(loaded(data), all.iter().map(setting).collect::<Vec<_>>());
}

#[test]
fn a_corrupt_record_fails_load_and_open_naming_the_file_and_the_offset() {
    // Guards against: a setting that rotted on disk being skipped silently (a user who hid
    // its presence showing it to everyone), so that the operator never learns a file is
    // damaged nor how to repair it; and a record whose checksum holds but whose values are
    // out of range (visibility 3, 1,025 contacts) being taken as valid.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let changes = [
        change(1, 1, 0, &[]),
        change(2, 2, 1, &users(1..3)),
        change(3, 3, 2, &[]),
    ];
    drop(log_with(&FsIo, data, 0, &changes));
    let path = privacy::shard_path(data, 0);
    let good = file_bytes(data, 0);
    let second_at = record(&changes[0]).len();

    let second = second_at..second_at + record(&changes[1]).len();
    let mut out_of_range_visibility = change(2, 2, 0, &[]);
    out_of_range_visibility.2 = 3;
    let out_of_range_visibility = record(&out_of_range_visibility);
    let mut too_many_contacts = record(&change(2, 2, 1, &[]))[8..8 + 25].to_vec();
    too_many_contacts.extend_from_slice(&1025u16.to_le_bytes());
    let too_many_contacts = seal(too_many_contacts);
    let mut damages: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = good.clone();
    flipped[second_at + 20] ^= 0x04; // in the user id
    damages.push(("its checksum fails", flipped));
    let mut flipped = good.clone();
    flipped[second_at + 5] ^= 0x40; // in the length
    damages.push(("its length is not that of any record", flipped));
    let mut replaced = good.clone();
    replaced.splice(second.clone(), out_of_range_visibility);
    damages.push(("its visibility is not 0, 1 or 2", replaced));
    let mut replaced = good.clone();
    replaced.splice(second, too_many_contacts);
    damages.push(("it names more than 1,024 contacts", replaced));
    for (expected_reason, bytes) in &damages {
        fs::write(&path, bytes).expect("write");

        let error = privacy::load(&FsIo, data).expect_err("damage is an error");
        let (named, offset, reason) = expect_corrupt(&error);
        assert_eq!((named, offset), (path.as_path(), second_at as u64));
        assert!(reason.contains(expected_reason), "{reason}");
        let text = error.to_string();
        let command = format!("hopd admin repair-accounts --data {}", data.display());
        assert!(text.contains(&command), "{text}");
        assert!(text.contains(&format!("byte {second_at}")), "{text}");

        let error = PrivacyLog::open(&FsIo, data, 0).expect_err("open refuses too");
        assert_eq!(expect_corrupt(&error).1, second_at as u64);
        assert_eq!(
            &fs::read(&path).expect("read"),
            bytes,
            "open changed nothing"
        );
    }
}

#[test]
fn repair_keeps_the_valid_records_and_load_then_succeeds() {
    // Guards against: a repair that loses valid settings along with the damaged ones, that
    // cannot find the records behind a damaged length, that does not keep the damaged file
    // for inspection, that touches healthy files, or that needs a second command besides the
    // one for account bindings.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let mut bindings = AccountLog::open(&FsIo, data, 0).expect("open");
    bindings.append(&[0xA1; 32]);
    bindings.flush().expect("flush");
    drop(bindings);
    let changes = [
        change(1, 1, 0, &[]),
        change(2, 2, 1, &users(1..3)),
        change(3, 3, 2, &[]),
        change(4, 4, 1, &users(5..6)),
    ];
    drop(log_with(&FsIo, data, 0, &changes));
    let healthy = [change(9, 9, 2, &[])];
    drop(log_with(&FsIo, data, 1, &healthy));
    let sizes: Vec<usize> = changes.iter().map(|change| record(change).len()).collect();
    let path = privacy::shard_path(data, 0);
    let mut damaged = file_bytes(data, 0);
    damaged[sizes[0] + 1] ^= 0x80; // the second record's checksum
    damaged[sizes[0] + sizes[1] + 4] ^= 0x10; // the third record's length
    damaged.extend_from_slice(&[7; 5]); // and a torn tail
    fs::write(&path, &damaged).expect("write");
    let healthy_before = file_bytes(data, 1);
    let keys_before = fs::read(accounts::shard_path(data, 0)).expect("read");

    let report = accounts::repair(&FsIo, data).expect("repair");
    assert_eq!(
        report.files_checked, 3,
        "one binding file, two settings files"
    );
    assert_eq!(report.repaired.len(), 1);
    let repaired = &report.repaired[0];
    assert_eq!(repaired.path, path);
    assert_eq!(
        (
            repaired.kept,
            repaired.dropped,
            repaired.dropped_bytes,
            repaired.torn_bytes
        ),
        (2, 1, (sizes[1] + sizes[2]) as u64, 5),
        "one damaged stretch: the second record and the third, whose length is lost"
    );
    assert_eq!(
        repaired.damaged_copy,
        data.join("accounts").join("shard-0.privacy.damaged")
    );
    assert_eq!(
        fs::read(&repaired.damaged_copy).expect("copy"),
        damaged,
        "copied byte for byte"
    );
    assert_eq!(file_bytes(data, 1), healthy_before);
    assert_eq!(
        fs::read(accounts::shard_path(data, 0)).expect("read"),
        keys_before
    );
    let text = report.to_string();
    assert!(text.contains("kept 2 records, dropped 1"), "{text}");
    assert!(text.contains("presence setting"), "{text}");

    assert_eq!(
        loaded(data),
        [
            setting(&changes[0]),
            setting(&changes[3]),
            setting(&healthy[0])
        ]
    );
    let again = accounts::repair(&FsIo, data).expect("repair again");
    assert!(again.repaired.is_empty(), "nothing left to repair");
    // The repaired file takes new records as before.
    let mut log = PrivacyLog::open(&FsIo, data, 0).expect("open");
    assert_eq!(log.opened().torn_bytes_cut, 0, "repair left the tail out");
    log.append(user(2), 20, 2, &[]);
    log.flush().expect("flush");
    assert_eq!(loaded(data)[1], (user(2), 2, vec![]));
}

#[test]
fn a_torn_tail_is_cut_at_open_and_later_appends_load() {
    // Guards against: a crash in the middle of a write leaving part of a record (or a whole
    // one whose bytes never landed, or zeros), and the next records being appended behind it,
    // so that every later setting reads as damage.
    let durable = [change(1, 1, 0, &[]), change(2, 2, 1, &users(1..4))];
    let next = change(3, 3, 2, &users(4..6));
    let mut unsynced = record(&next);
    unsynced[30] ^= 0x01; // whole, but its bytes are not what was written
    let tails: [(&str, Vec<u8>); 4] = [
        ("part of a header", record(&next)[..5].to_vec()),
        ("part of a record", record(&next)[..40].to_vec()),
        ("a whole record failing its checksum", unsynced),
        ("zeros", vec![0; 100]),
    ];
    for (what, tail) in tails {
        let temp = tempfile::tempdir().expect("tempdir");
        let data = temp.path();
        drop(log_with(&FsIo, data, 0, &durable));
        let path = privacy::shard_path(data, 0);
        let mut bytes = file_bytes(data, 0);
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).expect("write");

        let loaded_torn = privacy::load(&FsIo, data).expect("a torn tail is no error");
        assert_eq!(loaded_torn.settings.len(), 2, "{what}");
        assert_eq!(loaded_torn.torn_bytes, tail.len() as u64, "{what}");
        let mut log = PrivacyLog::open(&FsIo, data, 0).expect("open");
        assert_eq!(log.opened().torn_bytes_cut, tail.len() as u64, "{what}");
        assert_eq!(log.opened().records, 2, "{what}");
        assert_eq!(file_bytes(data, 0), records(&durable), "{what}");
        append_all(&mut log, std::slice::from_ref(&next));
        log.flush().expect("flush");
        assert_eq!(
            loaded(data),
            [setting(&durable[0]), setting(&durable[1]), setting(&next)],
            "{what}"
        );
    }
}

/// A shard file where user 1 changed its 1,024 contacts `rewrites` times (the last change
/// with the earliest wall time: within a file the later record wins all the same), users 2
/// and 3 once each. Returns the changes that must survive.
fn file_of_rewrites(data: &Path, rewrites: u64) -> Vec<Change> {
    let contacts = users(100..100 + CONTACTS_MAX as u64);
    let mut log = PrivacyLog::open(&FsIo, data, 0).expect("open");
    log.append(user(2), 5, 2, &[]);
    for n in 0..rewrites {
        log.append(user(1), 1_000 - n, (n % 2) as u8, &contacts);
    }
    log.append(user(3), 6, 1, &users(2..3));
    log.flush().expect("flush");
    vec![
        (
            user(1),
            1_000 - (rewrites - 1),
            ((rewrites - 1) % 2) as u8,
            contacts,
        ),
        change(2, 5, 2, &[]),
        change(3, 6, 1, &users(2..3)),
    ]
}

#[test]
fn compaction_at_open_keeps_exactly_the_live_records() {
    // Guards against: a file that grows with every change for ever (a user toggling its
    // settings), a compaction that keeps a superseded record or drops a live one, or one
    // that picks a user's record by wall time instead of file order.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let live = file_of_rewrites(data, 100);
    let before = loaded(data);
    let bytes_before = file_length(data, 0);
    let live_bytes: u64 = live.iter().map(|change| record(change).len() as u64).sum();
    assert!(bytes_before > 2 * live_bytes + COMPACT_SLACK_BYTES);

    let mut log = PrivacyLog::open(&FsIo, data, 0).expect("open compacts");
    assert_eq!(
        log.opened().compacted,
        Some(Compacted {
            bytes_before,
            bytes_after: live_bytes,
            records_dropped: 99,
        })
    );
    assert_eq!((log.opened().records, log.opened().users), (3, 3));
    // The live records, byte for byte, in their file order (user 2, user 1, user 3).
    assert_eq!(
        file_bytes(data, 0),
        records(&[live[1].clone(), live[0].clone(), live[2].clone()])
    );
    assert_eq!(loaded(data), before);
    assert_eq!(before, live.iter().map(setting).collect::<Vec<_>>());
    assert!(!data.join("accounts/shard-0.privacy.tmp").exists());

    // The compacted file takes appends; below the threshold it is left alone.
    log.append(user(2), 7, 0, &[]);
    log.flush().expect("flush");
    drop(log);
    let log = PrivacyLog::open(&FsIo, data, 0).expect("open");
    assert_eq!(log.opened().compacted, None);
    assert_eq!(log.opened().records, 4);
    assert_eq!(loaded(data)[1], (user(2), 0, vec![]));
}

#[test]
fn an_interrupted_compaction_loses_nothing() {
    // Guards against: a crash or an error between writing the compacted copy and renaming it
    // over the file (or while writing it) losing settings, or a half-written copy being taken
    // for the file at the next start.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let live = file_of_rewrites(data, 100);
    let expected: Vec<Setting> = live.iter().map(setting).collect();
    let original = file_bytes(data, 0);
    let temporary = data.join("accounts").join("shard-0.privacy.tmp");
    let (faults, io) = faulty();

    // The rename fails: the open fails, the original is untouched and authoritative.
    faults.fail_next_rename.store(true, Ordering::Relaxed);
    let error = PrivacyLog::open(&io, data, 0).expect_err("the rename fails");
    assert!(matches!(error, StoreError::Io { .. }), "{error}");
    assert_eq!(file_bytes(data, 0), original);
    assert_eq!(loaded(data), expected);

    // The copy's fsync fails: the same.
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    PrivacyLog::open(&io, data, 0).expect_err("the fsync fails");
    assert_eq!(file_bytes(data, 0), original);
    assert_eq!(loaded(data), expected);

    // A crash before the rename left a half-written copy behind: open removes it and
    // compacts again from the original.
    fs::write(&temporary, &original[..5_000]).expect("write");
    assert_eq!(loaded(data), expected, "load ignores the copy");
    let log = PrivacyLog::open(&io, data, 0).expect("open");
    assert!(log.opened().temporary_removed);
    assert!(log.opened().compacted.is_some());
    assert!(!temporary.exists());
    assert_eq!(loaded(data), expected);
}

#[test]
fn pending_settings_stay_bounded_while_flushes_fail() {
    // Guards against: a disk that stays full for hours while users keep changing their
    // settings, the buffer of unflushed changes growing until the process runs out of
    // memory; and the bound dropping anyone's latest change.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let mut log = PrivacyLog::open(&io, data, 0).expect("open");
    faults.fail_writes.store(true, Ordering::Relaxed);
    let contacts = users(100..100 + CONTACTS_MAX as u64);
    let mut appended_bytes = 0usize;
    for n in 0..3_000u64 {
        // 49 MB of changes of two users.
        log.append(user(1), n, (n % 3) as u8, &contacts);
        log.append(user(2), n, 1, &contacts[..(n % 7) as usize]);
        appended_bytes += RECORD_BYTES_MAX + privacy::record_bytes((n % 7) as usize);
        assert!(log.pending_bytes() <= PENDING_BYTES_MAX + RECORD_BYTES_MAX);
        if n % 500 == 0 {
            log.flush().expect_err("the disk is full");
        }
    }
    assert!(appended_bytes > 2 * PENDING_BYTES_MAX);

    // Many users' latest settings are all kept, even past the bound: the buffer never holds
    // more than what the router holds in memory for the same users.
    let many = 1_100u64; // 1,100 × 16,419 bytes: over the bound
    for n in 10..10 + many {
        log.append(user(n), 5, 1, &contacts);
    }
    assert!(log.pending_records() >= many as usize);

    faults.fail_writes.store(false, Ordering::Relaxed);
    let written = log.flush().expect("space again");
    assert!(written >= many as usize + 2, "{written}");
    assert_eq!(log.pending_bytes(), 0);
    let settings = loaded(data);
    assert_eq!(settings.len(), many as usize + 2);
    assert_eq!(settings[0], (user(1), (2_999 % 3) as u8, contacts.clone()));
    assert_eq!(
        settings[1],
        (user(2), 1, contacts[..(2_999 % 7) as usize].to_vec())
    );
    assert!(settings[2..]
        .iter()
        .all(|(_, visibility, kept)| *visibility == 1 && kept == &contacts));
}
