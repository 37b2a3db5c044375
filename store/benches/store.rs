//! Criterion micro-benchmarks: append with group commit, delivery acks, drain, recovery.
//! `cargo bench -p hop-store --bench store`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hop_protocol::UserId;
use hop_store::io::FsIo;
use hop_store::{Durability, Item, Options, Quota, Record, ShardStore, StoredItem};

const BATCH: u64 = 1024;
/// Recipients of a batch: record `id` goes to user `1 + id % USERS`.
const USERS: u64 = 1000;
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

/// A store in a new temporary folder (removed when the folder handle drops).
fn open_temp(durability: Durability) -> (tempfile::TempDir, ShardStore<FsIo>) {
    let temp = tempfile::tempdir().expect("tempdir");
    let (store, _) =
        ShardStore::open(temp.path(), 0, 1, options(durability), FsIo, 1).expect("open");
    (temp, store)
}

fn append_batch(store: &mut ShardStore<FsIo>, first: u64) {
    for id in first..first + BATCH {
        let item = Item::Message {
            from: user(1),
            id,
            timestamp_ms: 1,
            body: &BODY,
            sent: false,
            group: None,
        };
        black_box(
            store
                .append(1, user(1 + id % USERS), &item)
                .expect("append"),
        );
    }
    store.commit(1).expect("commit");
}

/// The policies a group commit of 1024 runs under: fsynced, and written only (the code's own
/// cost, without the disk's).
const POLICIES: [(&str, Durability); 2] = [
    (
        "batch",
        Durability::Batch {
            delay_ms: 2,
            records_max: 1024,
        },
    ),
    (
        "none",
        Durability::None {
            delay_ms: 2,
            records_max: 1024,
        },
    ),
];

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_100b_commit_1024");
    group.throughput(Throughput::Elements(BATCH));
    for (name, durability) in POLICIES {
        let (_temp, mut store) = open_temp(durability);
        let mut next = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                append_batch(&mut store, next);
                next += BATCH;
            })
        });
    }
    group.finish();
}

fn ack(c: &mut Criterion) {
    let mut group = c.benchmark_group("mark_delivered_1024");
    group.throughput(Throughput::Elements(BATCH));
    let (_temp, mut store) = open_temp(Durability::default());
    let mut next = 0;
    group.bench_function("batch", |b| {
        b.iter_custom(|iterations| {
            let mut timed = Duration::ZERO;
            for _ in 0..iterations {
                let first = next;
                append_batch(&mut store, first); // not timed
                next += BATCH;
                let started = Instant::now();
                for id in first..first + BATCH {
                    assert!(store.mark_delivered(1, user(1 + id % USERS), id, 0));
                }
                store.commit(1).expect("commit");
                timed += started.elapsed();
            }
            timed
        })
    });
    group.finish();
}

/// Read every queue the batch filled (in log order, as a start restores them), mark each
/// record delivered, commit.
fn drain(c: &mut Criterion) {
    let mut group = c.benchmark_group("drain_1024");
    group.throughput(Throughput::Elements(BATCH));
    for (name, durability) in POLICIES {
        let (_temp, mut store) = open_temp(durability);
        let mut next = 0;
        let mut out: Vec<Record> = Vec::with_capacity(4);
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    append_batch(&mut store, next); // not timed
                    next += BATCH;
                    let started = Instant::now();
                    let mut drained = 0;
                    for raw in 1..=USERS {
                        out.clear();
                        store
                            .read(user(raw), 0, usize::MAX, &mut out)
                            .expect("read");
                        for record in &out {
                            let StoredItem::Message { id, .. } = record.item else {
                                continue;
                            };
                            assert!(store.mark_delivered(1, user(raw), id, 0));
                            drained += 1;
                        }
                    }
                    store.commit(1).expect("commit");
                    timed += started.elapsed();
                    assert_eq!(drained, BATCH);
                }
                timed
            })
        });
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    let records = 100 * BATCH;
    group.throughput(Throughput::Elements(records));
    let temp = tempfile::tempdir().expect("tempdir");
    {
        let (mut store, _) =
            ShardStore::open(temp.path(), 0, 1, options(Durability::default()), FsIo, 1)
                .expect("open");
        for batch in 0..records / BATCH {
            append_batch(&mut store, batch * BATCH);
        }
    }
    group.bench_function("102400_records", |b| {
        b.iter(|| {
            // Each open adds one empty segment; that is part of what a restart does.
            let (store, stats) =
                ShardStore::open(temp.path(), 0, 1, options(Durability::default()), FsIo, 1)
                    .expect("open");
            assert_eq!(stats.records_live, records);
            black_box(store.segment_count())
        })
    });
    group.finish();
}

criterion_group!(benches, append, ack, drain, recovery);
criterion_main!(benches);
