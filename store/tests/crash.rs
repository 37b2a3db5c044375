//! Crash and damage scenarios for the per-shard log. Each test opens with the failure it
//! guards against.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hop_protocol::wire::receipt_ack_id;
use hop_protocol::UserId;
use hop_store::io::{Faults, FaultyIo, FsIo};
use hop_store::{
    prepare, report, AppendError, Durability, GroupTag, Item, Options, Quota, Record, ShardStore,
    StoreError, StoredItem, SyncJob,
};

const MINUTE_MS: u64 = 60_000;

/// A test id whose first half is `raw` (`raw_of` gives it back).
fn user(raw: u64) -> UserId {
    UserId::from_halves(raw, !raw).expect("valid id")
}

fn raw_of(user: UserId) -> u64 {
    user.high()
}

/// The home function `prepare` takes (the router's hashes the id the same way).
fn home(user: UserId, shards: u16) -> u16 {
    (user.high() % u64::from(shards)) as u16
}

fn options() -> Options {
    Options {
        durability: Durability::Batch {
            delay_ms: 2,
            records_max: 1024,
        },
        segment_bytes_max: 64 * 1024,
        ..Options::default()
    }
}

fn message(id: u64, body: &[u8]) -> Item<'_> {
    Item::Message {
        from: user(1),
        id,
        timestamp_ms: 1_000 + id,
        body,
        sent: false,
        group: None,
    }
}

fn open(data: &Path, options: Options) -> ShardStore<FsIo> {
    ShardStore::open(data, 0, 1, options, FsIo, 1_000)
        .expect("open")
        .0
}

fn read_all<I: hop_store::io::Io>(store: &mut ShardStore<I>, who: UserId) -> Vec<Record> {
    let mut out = Vec::new();
    store.read(who, 0, usize::MAX, &mut out).expect("read");
    out
}

fn ids(records: &[Record]) -> Vec<u64> {
    records
        .iter()
        .map(|record| match &record.item {
            StoredItem::Message { id, .. } | StoredItem::Receipt { id, .. } => *id,
        })
        .collect()
}

/// The shard's segment files, in order; not the empty spare a store leaves for its next roll.
fn segments(data: &Path, shard: u16) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(data.join(format!("shard-{shard}")))
        .expect("shard dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .filter(|path| fs::metadata(path).is_ok_and(|meta| meta.len() > 0))
        .collect();
    paths.sort();
    paths
}

/// Appends `count` messages with ids `first..` for user 7 and commits them.
fn fill(store: &mut ShardStore<FsIo>, first: u64, count: u64, body: &[u8]) {
    for id in first..first + count {
        store
            .append(1_000, user(7), &message(id, body))
            .expect("append");
    }
    store.commit(1_000).expect("commit");
}

#[test]
fn empty_data_folder_starts_with_no_queues() {
    // Guards against: a first start (no folder at all) failing or inventing records.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path().join("data");
    let layout = prepare(&FsIo, &data, 2, home, options(), 0).expect("prepare");
    assert_eq!(layout.previous_shards, None);
    let (store, stats) = ShardStore::open(&data, 1, 2, options(), FsIo, 0).expect("open");
    assert_eq!(stats.records_live, 0);
    assert_eq!(store.users().count(), 0);
}

#[test]
fn records_survive_a_restart_in_order() {
    // Guards against: committed records lost or reordered across a clean restart.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    fill(&mut store, 1, 500, &[7u8; 100]);
    drop(store);
    let mut store = open(temp.path(), options());
    let records = read_all(&mut store, user(7));
    assert_eq!(ids(&records), (1..=500).collect::<Vec<_>>());
    assert!(segments(temp.path(), 0).len() > 1, "64 KiB segments rolled");
}

#[test]
fn torn_tail_is_truncated_and_the_rest_recovered() {
    // Guards against: a crash in the middle of writing the last batch (a torn record at the end
    // of the last segment) making recovery panic or drop earlier records.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    fill(&mut store, 1, 10, b"body");
    drop(store);
    let last = segments(temp.path(), 0).pop().expect("a segment");
    let mut bytes = fs::read(&last).expect("read");
    let full = bytes.len();
    bytes.truncate(full - 5); // the last record loses its end
    fs::write(&last, &bytes).expect("write");
    let (mut store, stats) =
        ShardStore::open(temp.path(), 0, 1, options(), FsIo, 1_000).expect("open");
    assert!(stats.torn_bytes > 0);
    assert_eq!(
        ids(&read_all(&mut store, user(7))),
        (1..=9).collect::<Vec<_>>()
    );
    assert!(
        fs::metadata(&last).expect("meta").len() < full as u64 - 5,
        "tail cut"
    );
}

#[test]
fn flipped_bits_mid_segment_skip_one_record_only() {
    // Guards against: one rotten record in the middle of a segment hiding the records after it,
    // or crashing recovery.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    fill(&mut store, 1, 20, &[0xAB; 50]);
    drop(store);
    let first = segments(temp.path(), 0).remove(0);
    let mut bytes = fs::read(&first).expect("read");
    let record = 8 + 57 + 50;
    bytes[32 + 5 * record + 70] ^= 0x20; // inside the sixth record's body
    bytes[32 + 9 * record + 5] ^= 0x01; // the tenth record's length
    fs::write(&first, &bytes).expect("write");
    let (mut store, stats) =
        ShardStore::open(temp.path(), 0, 1, options(), FsIo, 1_000).expect("open");
    assert_eq!(stats.corrupt_records, 2);
    let expected: Vec<u64> = (1..=20).filter(|id| *id != 6 && *id != 10).collect();
    assert_eq!(ids(&read_all(&mut store, user(7))), expected);
}

#[test]
fn missing_segment_loses_only_its_records() {
    // Guards against: a deleted or lost segment file stopping recovery of the others.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    for batch in 0..3 {
        fill(&mut store, batch * 1000 + 1, 500, &[1u8; 100]); // > 64 KiB: one segment each
    }
    drop(store);
    let all = segments(temp.path(), 0);
    assert!(all.len() >= 3);
    fs::remove_file(&all[1]).expect("remove");
    let (mut store, stats) =
        ShardStore::open(temp.path(), 0, 1, options(), FsIo, 1_000).expect("open");
    assert_eq!(stats.missing_segments, 1);
    let got = ids(&read_all(&mut store, user(7)));
    assert!(got.contains(&1) && got.contains(&2500));
    assert_eq!(got.len(), 1000);
}

#[test]
fn different_shard_count_rehomes_every_record_once() {
    // Guards against: a restart with another --shards count losing queued records, duplicating
    // them, or leaving them on a shard that is not their home.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    prepare(&FsIo, data, 3, home, options(), 0).expect("prepare 3");
    let mut expected = Vec::new();
    for shard in 0..3u16 {
        let (mut store, _) = ShardStore::open(data, shard, 3, options(), FsIo, 0).expect("open");
        for raw in (1..=60u64).filter(|raw| home(user(*raw), 3) == shard) {
            for id in 0..5 {
                let id = raw * 100 + id;
                store
                    .append(0, user(raw), &message(id, b"x"))
                    .expect("append");
                expected.push((raw, id));
            }
            // One delivered record per user: must not come back.
            assert!(store.mark_delivered(0, user(raw), raw * 100, 0));
        }
        store.commit(0).expect("commit");
    }
    expected.retain(|(_, id)| id % 100 != 0);
    let layout = prepare(&FsIo, data, 2, home, options(), 0).expect("prepare 2");
    assert_eq!(layout.previous_shards, Some(3));
    assert_eq!(layout.rehomed_records, expected.len() as u64);
    assert!(!data.join("shard-2").exists());
    let mut found = Vec::new();
    for shard in 0..2u16 {
        let (mut store, _) = ShardStore::open(data, shard, 2, options(), FsIo, 0).expect("open");
        let users: Vec<UserId> = store.users().map(|(u, _)| u).collect();
        for who in users {
            assert_eq!(home(who, 2), shard);
            for id in ids(&read_all(&mut store, who)) {
                found.push((raw_of(who), id));
            }
        }
    }
    found.sort_unstable();
    expected.sort_unstable();
    assert_eq!(found, expected);
    // Again with the same count: nothing moves.
    let layout = prepare(&FsIo, data, 2, home, options(), 0).expect("prepare again");
    assert_eq!(layout.rehomed_records, 0);
}

#[test]
fn delete_on_delivery_leaves_no_body_bytes_on_disk() {
    // Guards against: a delivered message's body staying readable in a file under DATA after
    // delivery and compaction (the privacy promise of "forget").
    let temp = tempfile::tempdir().expect("tempdir");
    let marker = b"UNIQUE-MARKER-5f2c9e1d-delivered-body";
    let mut store = open(temp.path(), options());
    store
        .append(1_000, user(7), &message(1, marker))
        .expect("append");
    fill(&mut store, 2, 300, &[3u8; 100]); // fills more segments; keeps some live records
    assert!(store.mark_delivered(1_000, user(7), 1, 0));
    store.commit(1_000).expect("commit");
    // The documented bound: the active segment is sealed at the first commit after it is
    // segment_age_max_ms (5 min) old, and compacted compact_after_ms (5 min) after sealing.
    store.commit(1_000 + 6 * MINUTE_MS).expect("commit seals");
    let later = 1_000 + 11 * MINUTE_MS;
    for _ in 0..100 {
        store.commit(later).expect("commit");
        if store.compact(later, 1 << 20).expect("compact").idle {
            break;
        }
    }
    for entry in fs::read_dir(temp.path().join("shard-0")).expect("dir") {
        let bytes = fs::read(entry.expect("entry").path()).expect("read");
        assert!(
            !bytes.windows(marker.len()).any(|window| window == marker),
            "marker found on disk"
        );
    }
    // The live records are still there, across a restart.
    drop(store);
    let mut store = open(temp.path(), options());
    assert_eq!(
        ids(&read_all(&mut store, user(7))),
        (2..=301).collect::<Vec<_>>()
    );
}

#[test]
fn expiry_with_injected_clock_removes_old_records_only() {
    // Guards against: undelivered messages living past offline_ttl, or young ones expiring.
    let temp = tempfile::tempdir().expect("tempdir");
    let options = Options {
        offline_ttl_ms: 10 * MINUTE_MS,
        ..options()
    };
    let mut store = open(temp.path(), options);
    let item = |id, timestamp_ms| Item::Message {
        from: user(1),
        id,
        timestamp_ms,
        body: b"b",
        sent: false,
        group: None,
    };
    store.append(0, user(7), &item(1, 0)).expect("append");
    store.append(0, user(8), &item(2, 0)).expect("append");
    store
        .append(0, user(8), &item(3, 5 * MINUTE_MS))
        .expect("append");
    store.commit(0).expect("commit");
    assert!(store.expire(0, 10 * MINUTE_MS - 1, 100).is_empty());
    let expired = store.expire(0, 10 * MINUTE_MS, 100);
    let mut expired_ids: Vec<u64> = expired.iter().map(|e| e.id).collect();
    expired_ids.sort_unstable();
    assert_eq!(expired_ids, [1, 2]);
    store.commit(10 * MINUTE_MS).expect("commit");
    drop(store);
    let mut store = open(temp.path(), options);
    assert_eq!(store.queue_len(user(7)), 0);
    assert_eq!(ids(&read_all(&mut store, user(8))), [3]);
}

#[test]
fn quotas_refuse_the_over_quota_user_only() {
    // Guards against: one user's full queue blocking others, or a queue growing past its quota.
    let temp = tempfile::tempdir().expect("tempdir");
    let options = Options {
        quota: Quota {
            messages_max: 3,
            bytes_max: 250,
            ..Quota::default()
        },
        ..options()
    };
    let mut store = open(temp.path(), options);
    for id in 1..=3 {
        store
            .append(0, user(7), &message(id, &[0; 10]))
            .expect("append");
    }
    assert!(matches!(
        store.append(0, user(7), &message(4, &[0; 10])),
        Err(AppendError::QuotaMessages { queued: 3, max: 3 })
    ));
    store
        .append(0, user(8), &message(5, &[0; 200]))
        .expect("other user fine");
    assert!(matches!(
        store.append(0, user(8), &message(6, &[0; 100])),
        Err(AppendError::QuotaBytes { .. })
    ));
    assert!(store.mark_delivered(0, user(7), 1, 0));
    store
        .append(0, user(7), &message(4, &[0; 10]))
        .expect("room again");
    assert_eq!(store.counters().rejected_quota, 2);
}

#[test]
fn receipts_at_their_quota_do_not_stop_messages_and_messages_at_theirs_do_not_stop_receipts() {
    // Guards against: receipts waiting for a user (about messages it sent) filling the quota
    // that its incoming messages need, so that nobody can write to it while it is offline; and
    // the other way round. Also that the per-kind counts are rebuilt right after a restart.
    let temp = tempfile::tempdir().expect("tempdir");
    let options = Options {
        quota: Quota {
            messages_max: 2,
            receipts_max: 3,
            bytes_max: 1 << 20,
        },
        ..options()
    };
    let receipt = |id| Item::Receipt {
        id,
        kind: 1,
        by: user(2),
        timestamp_ms: 1_000,
    };
    let mut store = open(temp.path(), options);
    for id in 1..=3 {
        store.append(1_000, user(7), &receipt(id)).expect("receipt");
    }
    assert_eq!(
        store.append(1_000, user(7), &receipt(4)),
        Err(AppendError::QuotaReceipts { queued: 3, max: 3 })
    );
    for id in 10..=11 {
        store
            .append(1_000, user(7), &message(id, b"m"))
            .expect("a message fits beside a full share of receipts");
    }
    assert_eq!(
        store.append(1_000, user(7), &message(12, b"m")),
        Err(AppendError::QuotaMessages { queued: 2, max: 2 })
    );
    // A delivered receipt makes room for a receipt, not for a message. A receipt is named by
    // its ack id: the message id mixed with who made it.
    assert!(
        !store.mark_delivered(1_000, user(7), 1, 1),
        "not by the message id"
    );
    assert!(store.mark_delivered(1_000, user(7), receipt_ack_id(1, user(2)), 1));
    store
        .append(1_000, user(7), &receipt(4))
        .expect("room for one receipt");
    assert!(store.append(1_000, user(7), &message(12, b"m")).is_err());
    store.commit(1_000).expect("commit");
    drop(store);

    let mut store = open(temp.path(), options);
    assert_eq!(
        store.append(1_000, user(7), &receipt(5)),
        Err(AppendError::QuotaReceipts { queued: 3, max: 3 })
    );
    assert_eq!(
        store.append(1_000, user(7), &message(12, b"m")),
        Err(AppendError::QuotaMessages { queued: 2, max: 2 })
    );
    assert!(store.mark_delivered(1_000, user(7), 10, 0));
    store
        .append(1_000, user(7), &message(12, b"m"))
        .expect("room for one message");
    assert_eq!(store.counters().rejected_quota, 2);
}

/// A segment as hop wire protocol v1 wrote it: magic `HOPQLOG1`, then one message record with
/// 48-bit ids stored as u64 (payload `kind | user u64 | seq | id | timestamp_ms | from u64 |
/// body`), then a few torn bytes.
fn v1_segment() -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"HOPQLOG1");
    bytes.extend_from_slice(&1u32.to_le_bytes()); // segment number
    bytes.extend_from_slice(&0u16.to_le_bytes()); // shard
    bytes.extend_from_slice(&1u16.to_le_bytes()); // shard count
    bytes.extend_from_slice(&1u64.to_le_bytes()); // next_seq
    bytes.extend_from_slice(&[0; 4]);
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    let mut payload = vec![1u8];
    for field in [7u64, 1, 1, 1_000, 8] {
        payload.extend_from_slice(&field.to_le_bytes());
    }
    payload.extend_from_slice(b"hello from v1");
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&payload);
    bytes.extend_from_slice(&crc32c::crc32c(&record).to_le_bytes());
    bytes.extend_from_slice(&record);
    bytes.extend_from_slice(&[0xEE; 5]);
    bytes
}

fn assert_refused_as_v1(error: StoreError) {
    let StoreError::Layout { path, reason } = &error else {
        panic!("expected a layout error, got {error}");
    };
    assert!(path.ends_with("shard-0/00000001.log"), "{}", path.display());
    for needle in [
        "protocol v1",
        "48-bit",
        "cannot read it",
        "move the data folder",
    ] {
        assert!(reason.contains(needle), "{needle:?} missing from: {reason}");
    }
}

#[test]
fn a_folder_written_by_protocol_v1_is_refused_not_scanned_as_damage() {
    // Guards against: a data folder of hop wire protocol v1 (48-bit user ids, `HOPQLOG1`
    // segments) read as v2. Its records carry valid checksums, so a scan would serve them
    // under garbled ids, and its tail would be truncated as a torn write. Open, re-homing and
    // the admin report must refuse it, say what to do, and change nothing.
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    fs::create_dir_all(data.join("shard-0")).expect("mkdir");
    fs::write(data.join("store-shards"), "1\n").expect("count");
    let segment = data.join("shard-0").join("00000001.log");
    fs::write(&segment, v1_segment()).expect("segment");

    let opened = ShardStore::open(data, 0, 1, options(), FsIo, 0);
    assert_refused_as_v1(opened.expect_err("open refuses"));
    for shards in [1, 2] {
        let prepared = prepare(&FsIo, data, shards, home, options(), 0);
        assert_refused_as_v1(prepared.expect_err("prepare refuses"));
    }
    assert_refused_as_v1(report(&FsIo, data, 0, 10).expect_err("report refuses"));

    assert_eq!(fs::read(&segment).expect("read"), v1_segment(), "untouched");
    assert_eq!(segments(data, 0), [segment], "no new segment");
    assert!(!data.join("rehome").exists());
}

#[test]
fn expiry_reads_the_wall_clock_and_batching_the_monotonic_one() {
    // Guards against: the two clocks mixed up. The shard passes a monotonic `now` (ms since
    // it started); compared with the wall-clock timestamps in records nothing would ever
    // expire, and a wall time taken as the batch clock would put the next commit decades away.
    let temp = tempfile::tempdir().expect("tempdir");
    let options = Options {
        offline_ttl_ms: 10 * MINUTE_MS,
        ..options()
    };
    let sent_wall_ms = 1_767_225_600_000; // 2026-01-01, Unix epoch ms
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options, FsIo, 0).expect("open");
    let item = Item::Message {
        from: user(1),
        id: 1,
        timestamp_ms: sent_wall_ms,
        body: b"b",
        sent: false,
        group: None,
    };
    store.append(5, user(7), &item).expect("append");
    assert_eq!(store.next_commit_deadline(), Some(5 + 2), "monotonic batch");
    store.commit(7).expect("commit");
    assert!(store
        .expire(10, sent_wall_ms + 10 * MINUTE_MS - 1, 100)
        .is_empty());
    let expired = store.expire(20, sent_wall_ms + 10 * MINUTE_MS, 100);
    assert_eq!(expired.len(), 1);
    assert_eq!(
        store.next_commit_deadline(),
        Some(20 + 2),
        "the tombstone's batch runs on the monotonic clock"
    );
}

#[test]
fn a_restart_ages_recovered_segments_on_the_new_runs_clock() {
    // Guards against: a segment's age carried across a restart although the monotonic clock
    // starts again: compaction of a recovered segment with dead bytes would wait for a time of
    // the old run (or come at once), instead of `compact_after_ms` after the open.
    let temp = tempfile::tempdir().expect("tempdir");
    let long_uptime_ms = 1_000_000_000;
    let (mut store, _) =
        ShardStore::open(temp.path(), 0, 1, options(), FsIo, long_uptime_ms).expect("open");
    for id in 1..=1_000 {
        store
            .append(long_uptime_ms, user(7), &message(id, &[2u8; 100]))
            .expect("append");
    }
    assert!(store.mark_delivered(long_uptime_ms, user(7), 1, 0));
    store.commit(long_uptime_ms).expect("commit");
    drop(store);

    // The new run opens its store a minute after it started.
    let opened_ms = MINUTE_MS;
    let (mut store, _) =
        ShardStore::open(temp.path(), 0, 1, options(), FsIo, opened_ms).expect("open");
    let compact_after_ms = options().compact_after_ms;
    // Empty segments may go at any time; nothing is rewritten before `compact_after_ms`.
    let early = compact_until_idle(&mut store, opened_ms + compact_after_ms - 1);
    assert_eq!(early, 0, "records copied too early on the new run's clock");
    let due = compact_until_idle(&mut store, opened_ms + compact_after_ms);
    assert!(
        due > 0,
        "the segment with the delivered record is rewritten"
    );
    assert_eq!(
        ids(&read_all(&mut store, user(7))),
        (2..=1_000).collect::<Vec<_>>()
    );
}

/// Runs compaction at `now_ms` until it has nothing to do; returns the records it copied.
fn compact_until_idle(store: &mut ShardStore<FsIo>, now_ms: u64) -> u64 {
    let mut copied = 0;
    for _ in 0..100 {
        let progress = store.compact(now_ms, 1 << 20).expect("compact");
        store.commit(now_ms).expect("the copies' commit");
        copied += progress.records_copied;
        if progress.idle {
            return copied;
        }
    }
    panic!("compaction did not finish in 100 steps");
}

/// A store on `data` whose disk fails when the returned switches say so.
fn faulty_store(data: &Path, options: Options) -> (ShardStore<FaultyIo>, Arc<Faults>, FaultyIo) {
    let faults = Faults::new();
    let io = FaultyIo {
        faults: faults.clone(),
    };
    let (store, _) = ShardStore::open(data, 0, 1, options, io.clone(), 0).expect("open");
    (store, faults, io)
}

#[test]
fn failed_write_reports_the_batch_and_keeps_durable_records() {
    // Guards against: a full disk losing records that were already acked, or an append whose
    // write failed being reported durable (its ServerAck must not leave).
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    for id in 1..=5 {
        store
            .append(0, user(7), &message(id, b"durable"))
            .expect("append");
    }
    let commit = store.commit(0).expect("commit");
    assert_eq!(commit.durable_through, 5);
    faults.write_bytes_left.store(30, Ordering::Relaxed); // the disk fills mid-batch
    let failing = store
        .append(0, user(7), &message(6, b"lost"))
        .expect("append");
    let error = store.commit(0).expect_err("disk full");
    assert_eq!(error.failed_seqs, failing..=failing);
    assert_eq!(store.queue_len(user(7)), 5);
    faults.write_bytes_left.store(-1, Ordering::Relaxed); // space again
    store
        .append(0, user(7), &message(7, b"after"))
        .expect("append");
    store.commit(0).expect("commit");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 2, 3, 4, 5, 7]);
}

#[test]
fn failed_fsync_reports_the_batch_and_keeps_durable_records() {
    // Guards against: an fsync error (EIO) being ignored, so that a ServerAck leaves for a
    // record that may not be on disk; and against it damaging what was durable before.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    store
        .append(0, user(7), &message(1, b"durable"))
        .expect("append");
    store.commit(0).expect("commit");
    assert!(store.mark_delivered(0, user(7), 1, 0));
    store
        .append(0, user(7), &message(2, b"durable too"))
        .expect("append");
    store.commit(0).expect("commit");
    faults.fail_syncs.store(true, Ordering::Relaxed);
    let failing = store
        .append(0, user(7), &message(3, b"unsure"))
        .expect("append");
    assert!(store.mark_delivered(0, user(7), 2, 0));
    let error = store.commit(0).expect_err("fsync fails");
    assert_eq!(error.failed_seqs, failing..=failing);
    assert_eq!(store.queue_len(user(7)), 0);
    faults.fail_syncs.store(false, Ordering::Relaxed);
    store.commit(0).expect("the kept tombstone commits now");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    // 1 and 2 were delivered; 3 failed and its sender was told (it may reappear: at least once).
    let got = ids(&read_all(&mut store, user(7)));
    assert!(got.iter().all(|id| *id == 3), "got {got:?}");
}

#[test]
fn batches_written_while_one_syncs_become_durable_with_the_next_sync() {
    // Guards against: a pipelined commit (write now, fsync on another thread) reporting a
    // batch durable before the fsync that covers it returned, losing a batch written while a
    // sync ran, or hiding written records from a read.
    let temp = tempfile::tempdir().expect("tempdir");
    let small = Options {
        segment_bytes_max: 4 * 1024,
        ..options()
    };
    let (mut store, faults, io) = faulty_store(temp.path(), small);
    let body = [7u8; 1000];
    for id in 1..=3 {
        store
            .append(0, user(7), &message(id, &body))
            .expect("append");
    }
    let written = store.write(0).expect("write");
    assert_eq!(written.durable_through, 0, "written, not synced");
    let first = store.start_sync().expect("a batch waits");
    assert!(store.start_sync().is_none(), "one sync at a time");
    // The segment is full: this batch goes to the next one, written while the first syncs.
    for id in 4..=6 {
        store
            .append(0, user(7), &message(id, &body))
            .expect("append");
    }
    assert_eq!(store.write(0).expect("write").durable_through, 0);
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 2, 3, 4, 5, 6]);
    let syncs_before = faults.syncs.load(Ordering::Relaxed);
    let done = store.synced(0, first.run()).expect("synced");
    assert_eq!(done.durable_through, 3, "only what the job covered");
    assert_eq!(faults.syncs.load(Ordering::Relaxed), syncs_before + 1);
    let second = store.start_sync().expect("the second batch waits");
    let syncs_before = faults.syncs.load(Ordering::Relaxed);
    assert_eq!(
        store
            .synced(0, second.run())
            .expect("synced")
            .durable_through,
        6
    );
    assert_eq!(
        faults.syncs.load(Ordering::Relaxed),
        syncs_before + 2,
        "the new segment and its folder entry"
    );
    assert!(store.start_sync().is_none(), "nothing waits");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, small, io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_failed_sync_fails_every_batch_not_durable_and_keeps_their_tombstones() {
    // Guards against: after a failed fsync (EIO), a later batch's successful fsync being taken
    // as proof that it is on disk (the kernel may have dropped the failed pages), a ServerAck
    // leaving for any of them, or a delivery written in a failed batch coming back.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    store
        .append(0, user(7), &message(1, b"durable"))
        .expect("append");
    store.commit(0).expect("commit");
    let covered = store.append(0, user(7), &message(2, b"b")).expect("append");
    assert!(store.mark_delivered(0, user(7), 1, 0));
    store.write(0).expect("write");
    let job = store.start_sync().expect("job");
    store.append(0, user(7), &message(3, b"c")).expect("append");
    store.write(0).expect("written while the job runs");
    let buffered = store.append(0, user(7), &message(4, b"d")).expect("append");
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    let error = store.synced(0, job.run()).expect_err("the fsync failed");
    assert_eq!(error.failed_seqs, covered..=buffered);
    assert_eq!(store.queue_len(user(7)), 0);
    assert!(!store.sync_running());
    store.commit(0).expect("the kept tombstone commits now");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), Vec::<u64>::new());
}

#[test]
fn the_loop_writes_nothing_and_reads_what_waits_for_its_job_from_memory() {
    // Guards against: a batch written into the segment file on the caller's thread (a slow
    // disk then stalls the shard's loop), and against records that wait for their job being
    // unreadable (a device that comes online then would get nothing, or garbage).
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    store
        .append(0, user(7), &message(1, b"on file"))
        .expect("append");
    store.commit(0).expect("commit");
    faults.fail_writes.store(true, Ordering::Relaxed); // any write to a file now fails
    let waiting = store
        .append(0, user(7), &message(2, b"with its job"))
        .expect("append");
    store.write(0).expect("no file written");
    let job = store.start_sync().expect("job");
    store
        .append(0, user(7), &message(3, b"not yet written"))
        .expect("append");
    store.write(0).expect("no file written");
    store
        .append(0, user(7), &message(4, b"buffered"))
        .expect("append");
    let records = read_all(&mut store, user(7));
    assert_eq!(
        ids(&records),
        [1, 2, 3, 4],
        "the file, two batches, the buffer"
    );
    assert_eq!(store.counters().corrupt_reads, 0);
    // The job meets the full disk: what it and the later batch held fails, nothing else.
    let error = store.synced(0, job.run()).expect_err("disk full");
    assert_eq!(*error.failed_seqs.start(), waiting);
    faults.fail_writes.store(false, Ordering::Relaxed);
    assert_eq!(ids(&read_all(&mut store, user(7))), [1]);
    store.commit(0).expect("commit");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), [1]);
}

#[test]
fn a_read_that_needs_the_files_is_a_job_that_reads_what_a_read_would() {
    // Guards against: a reconnecting user's queue read with a read call on the shard's loop
    // (a slow disk then stalls every connection of the shard), and against a job that reads
    // other records than `read` (lost, reordered or duplicated deliveries), or that keeps a
    // record that rotted on disk.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    fill(&mut store, 1, 3, b"on file");
    store
        .append(1_000, user(7), &message(4, b"buffered"))
        .expect("append");
    let mut out = Vec::new();
    let job = store
        .read_or_job(user(7), 0, 64, &mut out, false)
        .expect("read")
        .expect("records on file and not cached: a job");
    assert!(out.is_empty(), "nothing read on the caller's thread");
    assert_eq!(job.user(), user(7));
    let read_calls = store.counters().read_calls;
    // Written after the job was made, the file part of the job still reads it.
    store
        .append(1_000, user(7), &message(5, b"later"))
        .expect("append");
    store.commit(1_000).expect("commit");
    let done = job.run();
    assert_eq!(store.finish_read(done, &mut out), 4);
    assert_eq!(ids(&out), [1, 2, 3, 4], "the queue as it was, in order");
    assert!(
        store.counters().read_calls > read_calls,
        "the job's reads are counted"
    );
    // The job read whole blocks, which joined the block cache: the same read needs no job.
    let mut again = Vec::new();
    let job = store
        .read_or_job(user(7), 0, 3, &mut again, false)
        .expect("read");
    assert!(job.is_none(), "served from the blocks the job read");
    assert_eq!(ids(&again), [1, 2, 3]);

    // Once a synchronous read has the blocks in its cache, no job is needed.
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 2, 3, 4, 5]);
    let mut out = Vec::new();
    let job = store
        .read_or_job(user(7), 1, 64, &mut out, false)
        .expect("read");
    assert!(job.is_none(), "served from the block cache");
    assert_eq!(ids(&out), [2, 3, 4, 5]);

    // A record that rots on disk while the job waits is dropped and counted, the rest read.
    drop(store);
    let mut store = open(temp.path(), options());
    let mut out = Vec::new();
    let job = store
        .read_or_job(user(7), 0, 64, &mut out, false)
        .expect("read")
        .expect("a job after a restart");
    let path = &segments(temp.path(), 0)[0];
    let mut bytes = fs::read(path).expect("segment");
    let at = bytes
        .windows(7)
        .position(|window| window == b"on file")
        .expect("first body");
    bytes[at] ^= 0xff;
    fs::write(path, bytes).expect("rot it");
    assert_eq!(store.finish_read(job.run(), &mut out), 4);
    assert_eq!(ids(&out), [2, 3, 4, 5]);
    assert_eq!(store.counters().corrupt_reads, 1);
    assert_eq!(
        store.queue_len(user(7)),
        4,
        "the rotten record left the queue"
    );
}

#[test]
#[cfg(target_os = "linux")]
fn a_read_the_page_cache_holds_is_made_at_once_and_one_that_would_wait_is_a_job() {
    // Guards against: every queue read that touches a file going to another thread (a drain
    // from the page cache then pays a thread's round trip per read), and against a read that
    // would wait for the disk being made at once on the caller's thread.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    for id in 1..=3 {
        store
            .append(0, user(7), &message(id, b"in the page cache"))
            .expect("append");
    }
    store.commit(0).expect("commit");
    let mut out = Vec::new();
    let job = store
        .read_or_job(user(7), 0, 64, &mut out, true)
        .expect("read");
    assert!(job.is_none(), "just written: in the page cache");
    assert_eq!(ids(&out), [1, 2, 3]);
    drop(store);
    // A new store has an empty block cache; the disk is cold.
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    faults.uncached.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    let job = store
        .read_or_job(user(7), 0, 64, &mut out, true)
        .expect("read")
        .expect("nothing cached: a job");
    assert!(out.is_empty(), "nothing read on the caller's thread");
    assert_eq!(store.finish_read(job.run(), &mut out), 3);
    assert_eq!(ids(&out), [1, 2, 3]);
}

#[test]
fn under_always_the_batch_is_on_file_when_write_returns() {
    // Guards against: `always` leaving a batch in memory for its job, so that what the server
    // answers after an ack (whose tombstone the batch holds) is lost with a kill of hopd and
    // the acked message delivered again.
    let temp = tempfile::tempdir().expect("tempdir");
    let always = Options {
        durability: Durability::Always,
        ..options()
    };
    let (mut store, faults, _) = faulty_store(temp.path(), always);
    let failing = store
        .append(0, user(7), &message(1, b"refused"))
        .expect("append");
    faults.fail_next_write.store(true, Ordering::Relaxed);
    let error = store.write(0).expect_err("disk full, here and now");
    assert_eq!(error.failed_seqs, failing..=failing);
    store
        .append(0, user(7), &message(2, b"on file now"))
        .expect("append");
    store.write(0).expect("write");
    let segments = std::fs::read_dir(temp.path().join("shard-0")).expect("folder");
    let on_file = segments
        .map(|entry| std::fs::read(entry.expect("entry").path()).expect("segment"))
        .any(|bytes| bytes.windows(11).any(|window| window == b"on file now"));
    assert!(
        on_file,
        "the batch is in the segment file before its job runs"
    );
    let job = store.start_sync().expect("job");
    assert!(store.synced(0, job.run()).expect("synced").durable_through >= 2);
}

#[test]
fn a_store_whose_disk_is_behind_says_so() {
    // Guards against: batches piling up in memory without bound while a slow disk holds their
    // job (the loop no longer writes them, so the kernel's dirty-page limits no longer slow it):
    // past two buffers' worth the store is behind, and its caller waits for the job.
    let temp = tempfile::tempdir().expect("tempdir");
    let small = Options {
        buffer_bytes_max: 128 * 1024,
        ..options()
    };
    let (mut store, _, _) = faulty_store(temp.path(), small);
    store
        .append(0, user(7), &message(1, b"first"))
        .expect("append");
    store.write(0).expect("write");
    let job = store
        .start_sync()
        .expect("job: the disk is slow from here on");
    let mut taken = 1u64;
    while !store.behind() {
        store
            .append(0, user(7), &message(taken + 1, &[7; 4000]))
            .expect("appends are never refused for a slow disk");
        taken += 1;
        store.write(0).expect("write");
        assert!(taken < 1_000, "never behind");
    }
    assert!(
        taken * 4000 >= 2 * 128 * 1024 - 8000,
        "behind early, at {taken}"
    );
    // The job returns; the next covers what waited, and the store catches up.
    store.synced(0, job.run()).expect("synced");
    let job = store.start_sync().expect("job");
    store.synced(0, job.run()).expect("synced");
    assert!(!store.behind());
    assert_eq!(ids(&read_all(&mut store, user(7))).len() as u64, taken);
}

#[test]
fn a_failed_write_fails_its_own_job_alone() {
    // Guards against: a full disk during one job's write failing a batch an earlier job made
    // durable (that sender would get an Error for a message that is on disk, and resend it).
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    store.append(0, user(7), &message(1, b"a")).expect("append");
    store.write(0).expect("write");
    let job = store.start_sync().expect("job");
    let failing = store.append(0, user(7), &message(2, b"b")).expect("append");
    store
        .write(0)
        .expect("the loop writes nothing: the next job does");
    assert_eq!(
        store.synced(0, job.run()).expect("synced").durable_through,
        1
    );
    let job = store.start_sync().expect("job");
    faults.fail_next_write.store(true, Ordering::Relaxed);
    let error = store.synced(0, job.run()).expect_err("disk full");
    assert_eq!(error.failed_seqs, failing..=failing);
    store.append(0, user(7), &message(3, b"c")).expect("append");
    store.commit(0).expect("commit");
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 3]);
}

#[test]
fn a_failed_sync_leaves_the_folder_fsync_owed() {
    // Guards against: a job that took the folder fsync a new segment owes failing, the roll
    // after it failing too (disk full), and later batches in that segment being acked with
    // its folder entry never synced (lost with the file on power loss).
    let temp = tempfile::tempdir().expect("tempdir");
    let small = Options {
        segment_bytes_max: 4 * 1024,
        ..options()
    };
    let (mut store, faults, _) = faulty_store(temp.path(), small);
    for id in 1..=5 {
        store
            .append(0, user(7), &message(id, &[7u8; 1000]))
            .expect("append");
    }
    store.write(0).expect("write"); // fills segment 1: a new one, whose folder entry is owed
    let job = store.start_sync().expect("job");
    faults.fail_syncs.store(true, Ordering::Relaxed);
    faults.fail_writes.store(true, Ordering::Relaxed); // and no new segment can be made
    store.synced(0, job.run()).expect_err("EIO");
    faults.fail_syncs.store(false, Ordering::Relaxed);
    faults.fail_writes.store(false, Ordering::Relaxed);
    let seq = store
        .append(0, user(7), &message(6, b"acked"))
        .expect("append");
    store.write(0).expect("write");
    let job = store.start_sync().expect("job");
    let before = faults.syncs.load(Ordering::Relaxed);
    assert!(store.synced(0, job.run()).expect("synced").durable_through >= seq);
    assert_eq!(
        faults.syncs.load(Ordering::Relaxed) - before,
        2,
        "the segment and the folder entry it owed"
    );
}

#[test]
fn open_syncs_what_a_run_wrote_but_never_synced() {
    // Guards against: a shard that panicked (or a hopd killed) while a batch was written and
    // not yet synced; the next open finds the record in the page cache, counts it durable and
    // acks its resend at once, and a power loss then takes it.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io) = faulty_store(temp.path(), options());
    store.append(0, user(7), &message(1, b"a")).expect("append");
    store.commit(0).expect("commit");
    store.append(0, user(7), &message(2, b"b")).expect("append");
    store.write(0).expect("write");
    let job = store.start_sync().expect("job");
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    let _ = job.run(); // batch 2 written, its fsync failed
    drop(store); // the result never reaches the store; batch 2 was never synced
    let before = faults.syncs.load(Ordering::Relaxed);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(7))), [1, 2]);
    assert!(
        faults.syncs.load(Ordering::Relaxed) - before >= 2,
        "the recovered segment and the folder"
    );
}

/// A store whose first segment (of 4 KiB) holds two delivered records of user 1 and two live
/// ones of user 2 (ids 2 and 4), sealed: half dead, so the next `compact` rewrites it. A batch
/// for user 3 (id 5) is written and its sync job running.
fn half_dead_segment_while_a_job_runs(
    data: &Path,
) -> (
    ShardStore<FaultyIo>,
    Arc<Faults>,
    FaultyIo,
    SyncJob<FaultyIo>,
    Options,
) {
    let small = Options {
        segment_bytes_max: 4 * 1024,
        ..options()
    };
    let (mut store, faults, io) = faulty_store(data, small);
    for id in 1..=4 {
        let owner = if id % 2 == 1 { user(1) } else { user(2) };
        store
            .append(0, owner, &message(id, &[id as u8; 1000]))
            .expect("append");
    }
    store.commit(0).expect("commit"); // fills segment 1: sealed, a new one begins
    assert!(store.mark_delivered(0, user(1), 1, 0));
    assert!(store.mark_delivered(0, user(1), 3, 0));
    store.commit(0).expect("commit the tombstones");
    store.append(0, user(3), &message(5, b"c")).expect("append");
    store.write(0).expect("write");
    let job = store.start_sync().expect("job");
    (store, faults, io, job, small)
}

#[test]
fn compaction_does_not_wait_for_a_chunk_out_of_the_page_cache() {
    // Guards against: compaction reading a cold segment on the caller's thread (the shard's
    // loop then stalls for the disk every tick it compacts), and against compaction that never
    // goes on once it has asked the kernel to read ahead.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, _, job, _) = half_dead_segment_while_a_job_runs(temp.path());
    store.synced(0, job.run()).expect("synced");
    faults.uncached.store(true, Ordering::Relaxed);
    let first = store.compact(0, 1 << 20).expect("compact");
    assert_eq!(
        (first.bytes_read, first.records_copied, first.idle),
        (0, 0, false),
        "nothing read: the chunk is not in the page cache"
    );
    assert_eq!(
        faults.prefetches.load(Ordering::Relaxed),
        1,
        "read-ahead asked"
    );
    let second = store.compact(0, 1 << 20).expect("compact");
    assert_eq!(
        second.records_copied, 2,
        "the next step reads it, waiting if it must"
    );
    assert_eq!(faults.prefetches.load(Ordering::Relaxed), 1);
}

#[test]
fn compaction_runs_while_batches_sync_and_deletes_its_source_once_the_copies_are_durable() {
    // Guards against: compaction never running under steady traffic (it used to need an
    // empty buffer), and against a source segment deleted before the copies of its live
    // records are durable (a crash then loses them).
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, _faults, io, first, small) = half_dead_segment_while_a_job_runs(temp.path());
    let source = segments(temp.path(), 0)[0].clone();
    let progress = store.compact(0, 1 << 20).expect("compact");
    assert_eq!(progress.records_copied, 2, "the two live records");
    assert!(
        store.compact(0, 1 << 20).expect("compact").idle,
        "the next step waits"
    );
    assert_eq!(
        ids(&read_all(&mut store, user(2))),
        [2, 4],
        "read from the buffer"
    );
    store.write(0).expect("the copies go out with a batch");
    store.synced(0, first.run()).expect("synced");
    assert!(source.exists(), "its copies are not durable yet");
    let second = store.start_sync().expect("the copies' job");
    store.synced(0, second.run()).expect("synced");
    assert!(source.exists(), "deleted by the next compact");
    assert_eq!(
        store.compact(0, 1 << 20).expect("compact").segments_deleted,
        1
    );
    assert!(
        source.exists(),
        "removed by the next job, off the caller's thread"
    );
    assert!(
        store.compact(0, 1 << 20).expect("compact").idle,
        "nothing more is compacted until it is gone"
    );
    let third = store.start_sync().expect("the removal's job");
    store.synced(0, third.run()).expect("synced");
    assert!(!source.exists());
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, small, io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(2))), [2, 4]);
    assert_eq!(ids(&read_all(&mut store, user(1))), Vec::<u64>::new());
    assert_eq!(ids(&read_all(&mut store, user(3))), [5]);
}

#[test]
fn a_compacted_segment_that_cannot_be_removed_fails_nothing_and_stays_dead_after_a_restart() {
    // Guards against: a failed removal (on the syncer, after compaction took the segment out
    // of the index) failing the batch it rode with, or its records coming back to life.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io, first, small) = half_dead_segment_while_a_job_runs(temp.path());
    let source = segments(temp.path(), 0)[0].clone();
    store.compact(0, 1 << 20).expect("compact");
    store.write(0).expect("the copies go out with a batch");
    store.synced(0, first.run()).expect("synced");
    store.commit(0).expect("the copies are durable");
    assert_eq!(
        store.compact(0, 1 << 20).expect("compact").segments_deleted,
        1
    );
    faults.fail_next_remove.store(true, Ordering::Relaxed);
    store
        .append(0, user(3), &message(6, b"after"))
        .expect("append");
    let commit = store.commit(0).expect("a failed removal fails no batch");
    assert!(commit.durable_through > 0);
    assert!(source.exists());
    assert_eq!(store.counters().segment_removals_failed, 1);
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, small, io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(2))), [2, 4]);
    assert_eq!(ids(&read_all(&mut store, user(1))), Vec::<u64>::new());
    assert_eq!(ids(&read_all(&mut store, user(3))), [5, 6]);
}

#[test]
fn a_failed_sync_of_compaction_copies_leaves_the_records_where_they_were() {
    // Guards against: copies lost with a failed batch while their records already point at
    // them, or the source deleted after all.
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, faults, io, first, small) = half_dead_segment_while_a_job_runs(temp.path());
    let source = segments(temp.path(), 0)[0].clone();
    assert_eq!(
        store.compact(0, 1 << 20).expect("compact").records_copied,
        2
    );
    store.write(0).expect("the copies go out with a batch");
    faults.fail_next_sync.store(true, Ordering::Relaxed);
    store
        .synced(0, first.run())
        .expect_err("EIO fails the copies' batch too");
    assert_eq!(
        ids(&read_all(&mut store, user(2))),
        [2, 4],
        "read from the source"
    );
    assert!(source.exists());
    assert_eq!(
        store.compact(0, 1 << 20).expect("compact").records_copied,
        2,
        "again"
    );
    store.commit(0).expect("commit");
    store.compact(0, 1 << 20).expect("compact");
    store.commit(0).expect("the job that removes it");
    assert!(!source.exists());
    drop(store);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, small, io, 0).expect("reopen");
    assert_eq!(ids(&read_all(&mut store, user(2))), [2, 4]);
}

#[test]
fn a_dead_segment_whose_last_batch_waits_for_its_sync_is_not_deleted_yet() {
    // Guards against: compaction deleting a sealed segment (all its records delivered) while
    // its last batch is written and not yet synced, so that the job for that batch finds no
    // file (the shard's thread panicked).
    let temp = tempfile::tempdir().expect("tempdir");
    let (mut store, _, _) = faulty_store(temp.path(), options());
    store.append(0, user(1), &message(1, b"a")).expect("append");
    store.append(0, user(2), &message(2, b"b")).expect("append");
    store.commit(0).expect("commit");
    assert!(store.mark_delivered(0, user(1), 1, 0));
    store.write(0).expect("write");
    let running = store.start_sync().expect("job");
    assert!(store.mark_delivered(0, user(2), 2, 0));
    let later = options().segment_age_max_ms + 1;
    store.write(later).expect("write"); // a batch in segment 1, which then rolls on age
    assert!(store.start_sync().is_none());
    assert_eq!(
        store
            .compact(later, 1 << 20)
            .expect("compact")
            .segments_deleted,
        0
    );
    store.synced(later, running.run()).expect("the first job");
    let job = store.start_sync().expect("the second batch's job");
    store.synced(later, job.run()).expect("synced");
    assert_eq!(
        store
            .compact(later, 1 << 20)
            .expect("compact")
            .segments_deleted,
        1
    );
}

#[test]
fn undone_copies_leave_no_dead_record_that_would_hold_later_segments() {
    // Guards against: copies undone after a failed write leaving their source counting a dead
    // record it never lost; a segment counted dead keeps every later segment holding
    // tombstones on disk until one of its records dies (up to the offline TTL).
    let temp = tempfile::tempdir().expect("tempdir");
    let small = Options {
        segment_bytes_max: 4 * 1024,
        segment_age_max_ms: 1_000,
        ..options()
    };
    let (mut store, faults, _) = faulty_store(temp.path(), small);
    store
        .append(0, user(1), &message(1, &[1; 1000]))
        .expect("append");
    store
        .append(0, user(2), &message(2, &[2; 3500]))
        .expect("append");
    store.commit(0).expect("commit"); // segment 1 full: 2 begins
    assert!(store.mark_delivered(0, user(2), 2, 0));
    store.commit(1_000).expect("commit"); // the tombstone in 2, which rolls on age: 3
    store
        .append(1_000, user(3), &message(3, b"c"))
        .expect("append");
    store.commit(1_000).expect("commit"); // message 3 in segment 3, live for long
    assert_eq!(
        store
            .compact(1_000, 1 << 20)
            .expect("compact")
            .records_copied,
        1
    );
    faults.fail_next_write.store(true, Ordering::Relaxed);
    store
        .commit(1_000)
        .expect_err("disk full: the copy is undone");
    for _ in 0..20 {
        let idle = store.compact(1_000, 1 << 20).expect("compact").idle;
        store.commit(1_000).expect("commit");
        if idle {
            break;
        }
    }
    let segment = |n: u32| temp.path().join(format!("shard-0/{n:08}.log"));
    assert!(!segment(1).exists() && !segment(2).exists() && segment(3).exists());
    assert!(store.mark_delivered(2_000, user(1), 1, 0));
    store.commit(2_000).expect("commit"); // message 1's copy and its tombstone
    let later = 2_000 + 60 * MINUTE_MS;
    for _ in 0..20 {
        store.compact(later, 1 << 20).expect("compact");
        store.commit(later).expect("commit");
    }
    assert!(
        !segment(4).exists(),
        "segment 4 (a delivered copy and its tombstone) is still on disk"
    );
}

#[test]
fn admin_report_reads_a_folder_without_a_server() {
    // Guards against: the operator having no way to see queue depths and ages offline.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    for id in 1..=4 {
        store
            .append(0, user(7), &message(id, b"abc"))
            .expect("append");
    }
    store
        .append(0, user(9), &message(10, b"abc"))
        .expect("append");
    store.commit(0).expect("commit");
    let seen = report(&FsIo, temp.path(), 2 * 86_400_000, 10).expect("report");
    assert_eq!(seen.records(), 5);
    assert_eq!(seen.largest[0].user, user(7));
    assert_eq!(seen.largest[0].records, 4);
    assert_eq!(seen.oldest_timestamp_ms(), Some(1_001));
    let text = seen.to_string();
    assert!(text.contains("largest queues"), "{text}");
}

#[test]
fn kill_nine_during_appends_loses_no_committed_record() {
    // Guards against: a record reported durable (its ServerAck sent) missing after hopd is
    // killed with SIGKILL in the middle of a write load.
    if let Ok(dir) = std::env::var("HOP_STORE_CRASH_CHILD") {
        child_appends_until_killed(Path::new(&dir));
        return;
    }
    let temp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "kill_nine_during_appends_loses_no_committed_record",
            "--nocapture",
        ])
        .env("HOP_STORE_CRASH_CHILD", temp.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut durable_through = 0u64;
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(seq) = line.strip_prefix("durable ") {
            durable_through = seq.trim().parse().expect("seq");
            if durable_through >= 20_000 {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("wait");
    assert!(durable_through >= 20_000);
    let (mut store, _) = ShardStore::open(temp.path(), 0, 1, options(), FsIo, 0).expect("reopen");
    let got = ids(&read_all(&mut store, user(7)));
    // Ids equal sequence numbers in the child; every reported one must be there, in order.
    assert!(got.len() as u64 >= durable_through);
    assert_eq!(
        got[..durable_through as usize],
        (1..=durable_through).collect::<Vec<_>>()[..]
    );
}

fn child_appends_until_killed(dir: &Path) {
    let options = Options {
        quota: Quota::UNLIMITED,
        ..options()
    };
    let (mut store, _) = ShardStore::open(dir, 0, 1, options, FsIo, 0).expect("open");
    let mut id = 0u64;
    loop {
        for _ in 0..100 {
            id += 1;
            store
                .append(0, user(7), &message(id, &[5u8; 100]))
                .expect("append");
        }
        let commit = store.commit(0).expect("commit");
        println!("durable {}", commit.durable_through);
    }
}

/// Guards against a device's copy of its own account's message coming back, after a restart,
/// as a message *from* its recipient.
#[test]
fn a_sent_copy_comes_back_as_a_sent_copy_after_a_restart() {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut store = open(temp.path(), options());
    let copy = Item::Message {
        from: user(2), // the recipient
        id: 42,
        timestamp_ms: 1_000,
        body: b"what I sent",
        sent: true,
        group: None,
    };
    store.append(1_000, user(1), &copy).expect("append");
    store
        .append(1_000, user(1), &message(43, b"what I got"))
        .expect("append");
    store.commit(1_000).expect("commit");
    drop(store);
    let mut store = open(temp.path(), options());
    let records = read_all(&mut store, user(1));
    let kinds: Vec<(u64, bool)> = records
        .iter()
        .map(|record| match &record.item {
            StoredItem::Message { id, sent, .. } => (*id, *sent),
            other => panic!("not a message: {other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec![(42, true), (43, false)]);
}

#[test]
fn receipts_of_one_message_by_two_devices_are_acked_one_by_one_across_a_restart() {
    // Guards against: the receipts of one message from two devices (or group members) sharing
    // a key, so that acking one removes the other, or a restart names them differently.
    let temp = tempfile::tempdir().expect("tempdir");
    let receipt = |by| Item::Receipt {
        id: 5,
        kind: 1,
        by,
        timestamp_ms: 1_000,
    };
    let mut store = open(temp.path(), options());
    store
        .append(1_000, user(7), &receipt(user(2)))
        .expect("first");
    store
        .append(1_000, user(7), &receipt(user(3)))
        .expect("second");
    store.commit(1_000).expect("commit");
    drop(store);
    let mut store = open(temp.path(), options());
    assert!(store.mark_delivered(1_000, user(7), receipt_ack_id(5, user(3)), 1));
    assert!(
        !store.mark_delivered(1_000, user(7), receipt_ack_id(5, user(3)), 1),
        "once"
    );
    let left = read_all(&mut store, user(7));
    assert_eq!(left.len(), 1);
    assert!(matches!(left[0].item, StoredItem::Receipt { by, .. } if by == user(2)));
}

/// Guards against a member's copy of a group message (or of a group event) losing its group,
/// or its body the group id's bytes, across a restart and a re-homing.
#[test]
fn group_copies_and_events_keep_their_group_across_a_restart_and_a_rehoming() {
    let temp = tempfile::tempdir().expect("tempdir");
    let data = temp.path();
    let member = user(6);
    let tag = |event| {
        Some(GroupTag {
            group: user(77),
            event,
        })
    };
    let mut store = open(data, options());
    for (id, body, event) in [
        (1, &b"to the group"[..], false),
        (2, &b"\x08\x02"[..], true),
    ] {
        let copy = Item::Message {
            from: user(2),
            id,
            timestamp_ms: 1_000,
            body,
            sent: false,
            group: tag(event),
        };
        store.append(1_000, member, &copy).expect("append");
    }
    store.commit(1_000).expect("commit");
    drop(store);
    prepare(&FsIo, data, 3, home, options(), 0).expect("re-home onto 3 shards");
    let shard = home(member, 3);
    let mut store = ShardStore::open(data, shard, 3, options(), FsIo, 1_000)
        .expect("open")
        .0;
    let got: Vec<(u64, Vec<u8>, Option<GroupTag>)> = read_all(&mut store, member)
        .into_iter()
        .map(|record| match record.item {
            StoredItem::Message {
                id, body, group, ..
            } => (id, body.to_vec(), group),
            other => panic!("not a message: {other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, b"to the group".to_vec(), tag(false)),
            (2, b"\x08\x02".to_vec(), tag(true)),
        ]
    );
}
