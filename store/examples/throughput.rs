//! Sustained store throughput on this machine: enqueue under each durability policy, fsyncs
//! per second, recovery of a million queued records, and their drain (queues read in log
//! order, as a start restores them, then in random order).
//!
//! `cargo run --release -p hop-store --example throughput [records]` (default 1,000,000).

use std::time::Instant;

use hop_protocol::UserId;
use hop_store::io::FsIo;
use hop_store::{Durability, Item, Options, Quota, Record, ShardStore};

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

/// Appends `records` messages, committing whenever the policy says a commit is due.
fn enqueue(store: &mut ShardStore<FsIo>, records: u64) -> (f64, u64) {
    let fsyncs_before = store.counters().fsyncs;
    let started = Instant::now();
    for id in 0..records {
        let item = Item::Message {
            from: user(1),
            id,
            timestamp_ms: 1,
            body: &BODY,
            sent: false,
            group: None,
        };
        store
            .append(1, user(1 + id % USERS), &item)
            .expect("append");
        if store.next_commit_deadline().is_some_and(|due| due <= 1) {
            store.commit(1).expect("commit");
        }
    }
    store.commit(1).expect("commit");
    let seconds = started.elapsed().as_secs_f64();
    (seconds, store.counters().fsyncs - fsyncs_before)
}

fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |arg| arg.parse().expect("count"));
    let root = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
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
        println!(
            "enqueue {name}: {count} records in {seconds:.3} s = {:.0} records/s, {:.0} fsyncs/s",
            count as f64 / seconds,
            fsyncs as f64 / seconds
        );
    }

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
    println!(
        "drain, users in random order: {drained} records in {seconds:.3} s = {:.0} records/s, {} read calls",
        drained as f64 / seconds,
        store.counters().read_calls
    );
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
fn shuffle(users: &mut [UserId]) {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    for last in (1..users.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        users.swap(last, (state % (last as u64 + 1)) as usize);
    }
}
