//! Sustained store throughput on this machine: enqueue under each durability policy, fsyncs
//! per second, recovery of a million queued records, and their drain (queues read in log
//! order, as a start restores them, then in random order).
//!
//! The disk's floor comes first, measured in the same run: batches of 1,024 records of the
//! store's size appended to one file, each followed by an `fdatasync`, nothing else. Each
//! `batch` figure is printed as a ratio of it, once with the fsync inline (`commit`) and once
//! pipelined as hopd runs it (`write`, the fsync on another thread, the next batch written
//! while one syncs).
//!
//! The drain in random order is one read per record (a user's records are spread over the log
//! among everyone else's), so its floor is measured too: `pread`s of one record each, from
//! the floor's file, in the order the random drain reads them.
//!
//! `cargo run --release -p hop-store --example throughput [records]` (default 1,000,000).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Instant;

use hop_protocol::UserId;
use hop_store::io::FsIo;
use hop_store::{Durability, Item, Options, Quota, Record, ShardStore, SyncJob, Synced};

const USERS: u64 = 10_000;
const BODY: [u8; 100] = [0x5A; 100];

fn options(durability: Durability) -> Options {
    Options {
        durability,
        quota: Quota::UNLIMITED,
        ..Options::default()
    }
}

/// A test id: `raw` in its first half (derived ids are hashes; any valid id will do here).
fn user(raw: u64) -> UserId {
    UserId::from_halves(raw, !raw).expect("valid id")
}

/// The bytes of one queued message record with `BODY` (8 framing + 57 fixed + body).
const RECORD_BYTES: usize = 8 + 57 + BODY.len();
const BATCH_RECORDS: u64 = 1024;

fn message(id: u64) -> Item<'static> {
    Item::Message {
        from: user(1),
        id,
        timestamp_ms: 1,
        body: &BODY,
        sent: false,
        group: None,
    }
}

/// Appends `records` messages, committing whenever the policy says a commit is due.
fn enqueue(store: &mut ShardStore<FsIo>, records: u64) -> (f64, u64) {
    let fsyncs_before = store.counters().fsyncs;
    let started = Instant::now();
    for id in 0..records {
        store
            .append(1, user(1 + id % USERS), &message(id))
            .expect("append");
        if store.next_commit_deadline().is_some_and(|due| due <= 1) {
            store.commit(1).expect("commit");
        }
    }
    store.commit(1).expect("commit");
    let seconds = started.elapsed().as_secs_f64();
    (seconds, store.counters().fsyncs - fsyncs_before)
}

/// As [`enqueue`], pipelined as the shard loop runs it: `write` when due, the fsync on a
/// syncer thread, its result taken back when it is done, the next batch written meanwhile.
fn enqueue_pipelined(store: &mut ShardStore<FsIo>, records: u64) -> (f64, u64) {
    let (jobs, job_queue) = mpsc::sync_channel::<SyncJob<FsIo>>(1);
    let (report, done) = mpsc::channel::<Synced<std::fs::File>>();
    let syncer = std::thread::spawn(move || {
        while let Ok(job) = job_queue.recv() {
            if report.send(job.run()).is_err() {
                return;
            }
        }
    });
    let fsyncs_before = store.counters().fsyncs;
    let started = Instant::now();
    let take_back = |store: &mut ShardStore<FsIo>, wait: bool| {
        let finished = if wait {
            done.recv().ok()
        } else {
            done.try_recv().ok()
        };
        if let Some(synced) = finished {
            store.synced(1, synced).expect("synced");
        }
        if let Some(job) = store.start_sync() {
            jobs.send(job).expect("syncer");
        }
    };
    for id in 0..records {
        store
            .append(1, user(1 + id % USERS), &message(id))
            .expect("append");
        if store.next_commit_deadline().is_some_and(|due| due <= 1) {
            store.write(1).expect("write");
            take_back(store, false);
        }
    }
    store.write(1).expect("write");
    take_back(store, false);
    while store.sync_running() {
        take_back(store, true);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(jobs);
    syncer.join().expect("syncer");
    (seconds, store.counters().fsyncs - fsyncs_before)
}

/// The disk's floor: `records` records of the store's size in batches of 1,024, each batch one
/// append and one `fdatasync`, nothing else. Returns records per second.
fn floor(path: &std::path::Path, records: u64) -> f64 {
    let mut file = std::fs::File::create(path).expect("floor file");
    let batch = vec![0x5Au8; RECORD_BYTES * BATCH_RECORDS as usize];
    let started = Instant::now();
    let mut written = 0;
    while written < records {
        file.write_all(&batch).expect("write");
        file.sync_data().expect("fdatasync");
        written += BATCH_RECORDS;
    }
    written as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |arg| arg.parse().expect("count"));
    let root = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let floor_path = root.path().join("floor");
    let floor_per_second = floor(&floor_path, records);
    println!(
        "floor: {records} records of {RECORD_BYTES} bytes, {BATCH_RECORDS} per append + fdatasync = {floor_per_second:.0} records/s"
    );
    let policies = [
        ("always", Durability::Always, records / 50),
        (
            "batch (1024 records)",
            Durability::Batch {
                delay_ms: 2,
                records_max: 1024,
            },
            records,
        ),
        (
            "none",
            Durability::None {
                delay_ms: 2,
                records_max: 1024,
            },
            records,
        ),
    ];
    for (index, (name, durability, count)) in policies.into_iter().enumerate() {
        let data = root.path().join(format!("run-{index}"));
        let (mut store, _) =
            ShardStore::open(&data, 0, 1, options(durability), FsIo, 1).expect("open");
        let (seconds, fsyncs) = enqueue(&mut store, count);
        let per_second = count as f64 / seconds;
        println!(
            "enqueue {name}: {count} records in {seconds:.3} s = {per_second:.0} records/s ({:.2}x the floor), {:.0} fsyncs/s",
            per_second / floor_per_second,
            fsyncs as f64 / seconds
        );
    }
    let data = root.path().join("run-pipelined");
    let batch = Durability::Batch {
        delay_ms: 2,
        records_max: 1024,
    };
    let (mut store, _) = ShardStore::open(&data, 0, 1, options(batch), FsIo, 1).expect("open");
    let (seconds, fsyncs) = enqueue_pipelined(&mut store, records);
    let per_second = records as f64 / seconds;
    println!(
        "enqueue batch (1024 records), fsync on a thread: {records} records in {seconds:.3} s = {per_second:.0} records/s ({:.2}x the floor), {:.0} fsyncs/s",
        per_second / floor_per_second,
        fsyncs as f64 / seconds
    );
    drop(store);

    // Recovery and drain of the batch run's folder (`records` queued).
    let data = root.path().join("run-1");
    let started = Instant::now();
    let (mut store, stats) =
        ShardStore::open(&data, 0, 1, options(Durability::default()), FsIo, 1).expect("open");
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "recovery: {} records of {} users in {seconds:.3} s = {:.2} s per million",
        stats.records_live,
        stats.users,
        seconds / (stats.records_live as f64 / 1e6)
    );
    let users: Vec<UserId> = store.users().map(|(user, _)| user).collect();
    let (drained, seconds) = drain(&mut store, &users);
    println!(
        "drain (read + mark delivered + commit): {drained} records in {seconds:.3} s = {:.0} records/s, {} read calls",
        drained as f64 / seconds,
        store.counters().read_calls
    );

    // The same drain of the `none` run's folder with the users in a shuffled order: reads
    // without locality, which the read cache cannot help.
    let data = root.path().join("run-2");
    let (mut store, _) =
        ShardStore::open(&data, 0, 1, options(Durability::default()), FsIo, 1).expect("open");
    let mut users: Vec<UserId> = store.users().map(|(user, _)| user).collect();
    shuffle(&mut users);
    let (drained, seconds) = drain(&mut store, &users);
    let per_second = drained as f64 / seconds;
    println!(
        "drain, users in random order: {drained} records in {seconds:.3} s = {per_second:.0} records/s, {} read calls",
        store.counters().read_calls
    );
    let read_floor = read_floor(&floor_path, records);
    println!(
        "read floor: {records} reads of {RECORD_BYTES} bytes in the random drain's order, one pread each = {read_floor:.0} reads/s (the random drain: {:.2}x of it)",
        per_second / read_floor
    );
}

/// The random drain's floor: one `pread` of a record's size per record of the floor's file,
/// where the enqueue put user `u`'s records (every `USERS`-th, from the `u`-th), users in the
/// drain's shuffled order. Returns reads per second.
fn read_floor(path: &std::path::Path, records: u64) -> f64 {
    let file = std::fs::File::open(path).expect("floor file");
    let mut order: Vec<u64> = (0..USERS).collect();
    shuffle(&mut order);
    let mut record = [0u8; RECORD_BYTES];
    let started = Instant::now();
    let mut reads = 0u64;
    for &user in &order {
        for at in (user..records).step_by(USERS as usize) {
            file.read_exact_at(&mut record, at * RECORD_BYTES as u64)
                .expect("read");
            reads += 1;
        }
    }
    reads as f64 / started.elapsed().as_secs_f64()
}

/// Reads each user's whole queue, marks every record delivered and commits when due.
fn drain(store: &mut ShardStore<FsIo>, users: &[UserId]) -> (u64, f64) {
    let started = Instant::now();
    let mut out: Vec<Record> = Vec::with_capacity(1024);
    let mut drained = 0u64;
    for &who in users {
        out.clear();
        store.read(who, 0, usize::MAX, &mut out).expect("read");
        for record in &out {
            let hop_store::StoredItem::Message { id, .. } = record.item else {
                continue;
            };
            assert!(store.mark_delivered(1, who, id, 0));
            drained += 1;
        }
        if store.next_commit_deadline().is_some_and(|due| due <= 1) {
            store.commit(1).expect("commit");
        }
    }
    store.commit(1).expect("commit");
    (drained, started.elapsed().as_secs_f64())
}

/// Fisher-Yates with a fixed xorshift seed, so every run shuffles alike.
fn shuffle<T>(users: &mut [T]) {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    for last in (1..users.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        users.swap(last, (state % (last as u64 + 1)) as usize);
    }
}
