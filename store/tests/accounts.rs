//! Crash, disk-error and damage scenarios for the account binding files
//! (`DATA/accounts/shard-K.keys`). Each test opens with the failure it guards against.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hop_protocol::UserId;
use hop_store::accounts::{self, AccountLog, RECORD_BYTES};
use hop_store::io::{Faults, FaultyIo, FsIo};
use hop_store::StoreError;

fn key(n: u8) -> [u8; 32] {
    let mut key = [n; 32];
    key[0] = 0xA0;
    key
}

fn faulty() -> (Arc<Faults>, FaultyIo) {
    let faults = Faults::new();
    let io = FaultyIo {
        faults: faults.clone(),
    };
    (faults, io)
}

/// The keys `load` finds, in order, after checking each id is derived from its key.
fn loaded_keys(data: &Path) -> Vec<[u8; 32]> {
    let loaded = accounts::load(&FsIo, data, &Default::default()).expect("load");
    assert_eq!(loaded.torn_bytes, 0, "no torn bytes");
    loaded
        .bindings
        .iter()
        .map(|(user, key)| {
            assert_eq!(*user, UserId::from_public_key(key));
            *key
        })
        .collect()
}

fn file_length(data: &Path, shard: u16) -> u64 {
    fs::metadata(accounts::shard_path(data, shard))
        .expect("file")
        .len()
}

/// Opens shard 0's log on `io` and makes `keys` durable.
fn log_with<I: hop_store::io::Io>(io: &I, data: &Path, keys: &[[u8; 32]]) -> AccountLog<I> {
    let mut log = AccountLog::open(io, data, 0).expect("open");
    for key in keys {
        log.append(key);
    }
    assert_eq!(log.flush().expect("flush"), keys.len());
    log
}

#[test]
fn a_short_write_then_a_retry_loads_every_binding_exactly_once() {
    // Guards against: a disk that fills in the middle of a flush leaving part of the batch on
    // file, and the retry landing after those torn bytes. The old O_APPEND writer did that:
    // every record after a short write was misaligned and read back as damage.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let mut log = log_with(&io, data, &[key(1), key(2)]);
    for n in 3..=5 {
        log.append(&key(n));
    }
    faults.write_bytes_left.store(50, Ordering::Relaxed); // a record and a half fit
    log.flush().expect_err("the disk is full");
    assert_eq!(log.pending_records(), 3, "kept for the retry");
    assert_eq!(file_length(data, 0), 2 * RECORD_BYTES as u64, "cut back");
    faults.write_bytes_left.store(-1, Ordering::Relaxed); // space again
    assert_eq!(log.flush().expect("retry"), 3);
    log.append(&key(6));
    log.flush().expect("flush");
    assert_eq!(loaded_keys(data), (1..=6).map(key).collect::<Vec<_>>());
}

#[test]
fn a_failed_write_then_a_retry_loads_every_binding_exactly_once() {
    // Guards against: a write that fails outright (ENOSPC, EIO) losing the buffered bindings,
    // or the retry writing them twice.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let mut log = log_with(&io, data, &[key(1)]);
    log.append(&key(2));
    log.append(&key(3));
    faults.fail_next_write.store(true, Ordering::Relaxed);
    log.flush().expect_err("the write fails");
    assert_eq!(log.pending_records(), 2);
    assert_eq!(log.flush().expect("retry"), 2);
    assert_eq!(log.flush().expect("nothing left"), 0);
    assert_eq!(loaded_keys(data), [key(1), key(2), key(3)]);
}

#[test]
fn a_short_write_whose_cleanup_fails_is_overwritten_by_the_retry() {
    // Guards against: the truncate after a failed write failing as well, and the retry then
    // appending behind the torn bytes instead of writing over them.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let mut log = log_with(&io, data, &[key(1), key(2)]);
    log.append(&key(3));
    log.append(&key(4));
    faults.fail_truncates.store(true, Ordering::Relaxed);
    faults.write_bytes_left.store(50, Ordering::Relaxed);
    log.flush().expect_err("the disk is full");
    assert_eq!(
        file_length(data, 0),
        2 * RECORD_BYTES as u64 + 50,
        "the torn bytes stay: the truncate failed"
    );
    faults.write_bytes_left.store(-1, Ordering::Relaxed);
    assert_eq!(log.flush().expect("retry"), 2);
    assert_eq!(file_length(data, 0), 4 * RECORD_BYTES as u64);
    assert_eq!(loaded_keys(data), [key(1), key(2), key(3), key(4)]);
}

#[test]
fn a_failed_fsync_then_a_retry_loads_every_binding_exactly_once() {
    // Guards against: a flush whose fsync failed (EIO) being taken as durable, or its records,
    // already written, being written again behind themselves so that bindings appear twice.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let (faults, io) = faulty();
    let mut log = log_with(&io, data, &[key(1)]);
    log.append(&key(2));
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    log.flush().expect_err("the fsync fails");
    assert_eq!(log.pending_records(), 1);
    assert_eq!(file_length(data, 0), RECORD_BYTES as u64, "cut back");
    assert_eq!(log.flush().expect("retry"), 1);

    // Again with a failing truncate: the whole unsynced records stay on file, and the retry
    // writes over them at the same offset.
    log.append(&key(3));
    faults.fail_truncates.store(true, Ordering::Relaxed);
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    log.flush().expect_err("the fsync fails");
    assert_eq!(file_length(data, 0), 3 * RECORD_BYTES as u64);
    assert_eq!(log.flush().expect("retry"), 1);
    assert_eq!(file_length(data, 0), 3 * RECORD_BYTES as u64);
    assert_eq!(loaded_keys(data), [key(1), key(2), key(3)]);
}

#[test]
fn a_corrupt_record_fails_load_naming_the_file_and_the_offset() {
    // Guards against: a binding that rotted on disk being skipped silently (the old loader
    // counted and went on), so that the operator never learns a file is damaged nor how to
    // repair it.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    drop(log_with(&FsIo, data, &[key(1), key(2), key(3)]));
    let path = accounts::shard_path(data, 0);
    let mut bytes = fs::read(&path).expect("read");
    bytes[RECORD_BYTES + 7] ^= 0x04; // the second record's key
    fs::write(&path, &bytes).expect("write");

    let error = accounts::load(&FsIo, data, &Default::default()).expect_err("damage is an error");
    let StoreError::Corrupt {
        path: named,
        offset,
        ..
    } = &error
    else {
        panic!("expected a corrupt-record error, got {error}");
    };
    assert_eq!((named, *offset), (&path, RECORD_BYTES as u64));
    let text = error.to_string();
    let command = format!("hopd admin repair-accounts --data {}", data.display());
    assert!(text.contains(&command), "{text}");
    assert!(text.contains("byte 36"), "{text}");
}

#[test]
fn repair_keeps_the_valid_records_and_load_then_succeeds() {
    // Guards against: a repair that loses valid bindings along with the damaged ones, that
    // does not keep the damaged file for inspection, or that touches healthy files.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    drop(log_with(&FsIo, data, &[key(1), key(2), key(3), key(4)]));
    let mut healthy = AccountLog::open(&FsIo, data, 1).expect("open");
    healthy.append(&key(9));
    healthy.flush().expect("flush");
    drop(healthy);
    let path = accounts::shard_path(data, 0);
    let mut damaged = fs::read(&path).expect("read");
    damaged[RECORD_BYTES + 33] ^= 0x80; // the second record's checksum
    damaged[3 * RECORD_BYTES] ^= 0x01; // the fourth record's key
    damaged.extend_from_slice(&[7; 5]); // and a torn tail
    fs::write(&path, &damaged).expect("write");
    let healthy_before = fs::read(accounts::shard_path(data, 1)).expect("read");

    let report = accounts::repair(&FsIo, data).expect("repair");
    assert_eq!(report.files_checked, 2);
    assert_eq!(report.repaired.len(), 1);
    let repaired = &report.repaired[0];
    assert_eq!(repaired.path, path);
    assert_eq!(
        (repaired.kept, repaired.dropped, repaired.torn_bytes),
        (2, 2, 5)
    );
    assert_eq!(
        repaired.damaged_copy,
        data.join("accounts").join("shard-0.keys.damaged")
    );
    assert_eq!(
        fs::read(&repaired.damaged_copy).expect("copy"),
        damaged,
        "copied byte for byte"
    );
    assert_eq!(
        fs::read(accounts::shard_path(data, 1)).expect("read"),
        healthy_before
    );
    assert!(report.to_string().contains("kept 2 records, dropped 2"));

    assert_eq!(loaded_keys(data), [key(1), key(3), key(9)]);
    let again = accounts::repair(&FsIo, data).expect("repair again");
    assert!(again.repaired.is_empty(), "nothing left to repair");
    // The repaired file takes new records as before.
    drop(log_with(&FsIo, data, &[key(5)]));
    assert_eq!(loaded_keys(data), [key(1), key(3), key(5), key(9)]);
}

#[test]
fn a_torn_tail_is_cut_at_open_and_later_appends_load() {
    // Guards against: a crash in the middle of a write leaving part of a record, and the next
    // records being appended behind it, misaligned, so that every later binding reads as
    // damage.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    drop(log_with(&FsIo, data, &[key(1), key(2)]));
    let path = accounts::shard_path(data, 0);
    let mut bytes = fs::read(&path).expect("read");
    bytes.extend_from_slice(&key(3)[..20]); // part of a third record
    fs::write(&path, &bytes).expect("write");

    let loaded = accounts::load(&FsIo, data, &Default::default()).expect("a torn tail is no error");
    assert_eq!((loaded.bindings.len(), loaded.torn_bytes), (2, 20));
    let mut log = AccountLog::open(&FsIo, data, 0).expect("open");
    assert_eq!(log.opened().torn_bytes_cut, 20);
    assert_eq!(log.opened().records, 2);
    assert_eq!(file_length(data, 0), 2 * RECORD_BYTES as u64);
    log.append(&key(3));
    log.flush().expect("flush");
    assert_eq!(loaded_keys(data), [key(1), key(2), key(3)]);
}

#[test]
fn account_files_of_protocol_v1_are_refused_with_what_to_do() {
    // Guards against: a v1 folder's account files (44-byte records holding a 48-bit user id)
    // being ignored, so that hopd starts with no bindings and serves a folder it cannot read.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    fs::create_dir_all(data.join("accounts")).expect("mkdir");
    let v1 = data.join("accounts").join("shard-0.bin");
    fs::write(&v1, [0u8; 44]).expect("write");
    let errors = [
        accounts::load(&FsIo, data, &Default::default()).expect_err("load refuses"),
        accounts::repair(&FsIo, data).expect_err("repair refuses"),
        AccountLog::open(&FsIo, data, 0).expect_err("open refuses"),
    ];
    for error in errors {
        let StoreError::Layout { path, reason } = &error else {
            panic!("expected a layout error, got {error}");
        };
        assert_eq!(path, &v1);
        for needle in ["protocol v1", "48-bit", "move the data folder"] {
            assert!(reason.contains(needle), "{needle:?} missing from: {reason}");
        }
    }
    assert_eq!(fs::read(&v1).expect("read"), [0u8; 44], "untouched");
}
