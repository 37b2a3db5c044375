//! Router tests: several routers wired together in memory (a deterministic cluster), users
//! picked so that they land on the shards each test wants.

use std::collections::HashMap;

use hop_protocol::wire::{Ack, Deliver, Ping, Read, Subscribe};

use super::*;

/// Several routers and the forwarding between them, run to quiescence after every input.
struct Cluster {
    routers: Vec<Router>,
    /// Everything pushed to each connection, in order.
    sent: HashMap<ConnRef, Vec<Stanza>>,
    closed: Vec<(ConnRef, GoAwayReason)>,
    persisted: Vec<UserId>,
    now_ms: u64,
    /// When false, Keep actions wait in `unkept` until the test calls `keep_all`.
    keep_at_once: bool,
    unkept: Vec<(ShardId, UserId, Queued)>,
    forgotten: Vec<(UserId, u64, ReceiptKind)>,
    /// What each shard's store holds: every kept item by (user, id, kind), bodies included.
    disk: HashMap<(UserId, u64, i32), Queued>,
    /// Kept messages whose body the store "cannot read back" (disk damage).
    rotten: Vec<u64>,
}

impl Cluster {
    fn new(shards: u16, limits: Limits) -> Self {
        Self {
            routers: (0..shards)
                .map(|shard| Router::new(shard, shards, limits, 1_000))
                .collect(),
            sent: HashMap::new(),
            closed: Vec::new(),
            persisted: Vec::new(),
            now_ms: 5_000,
            keep_at_once: true,
            unkept: Vec::new(),
            forgotten: Vec::new(),
            disk: HashMap::new(),
            rotten: Vec::new(),
        }
    }

    fn shards(&self) -> u16 {
        self.routers.len() as u16
    }

    /// A user id whose home is `shard`, distinct per `n`.
    fn user_on(&self, shard: ShardId, n: u64) -> UserId {
        (1..)
            .filter_map(UserId::new)
            .filter(|user| home_shard(*user, self.shards()) == shard)
            .nth(n as usize)
            .unwrap()
    }

    fn run(&mut self) {
        loop {
            let mut progressed = false;
            for index in 0..self.routers.len() {
                while let Some(action) = self.routers[index].poll_action() {
                    progressed = true;
                    match action {
                        Action::Send { conn, stanza } => {
                            self.sent.entry(conn).or_default().push(stanza)
                        }
                        Action::Close { conn, reason, .. } => self.closed.push((conn, reason)),
                        Action::Forward { shard, message } => {
                            assert_ne!(shard, index as ShardId, "forward to self");
                            let now = self.now_ms;
                            self.routers[usize::from(shard)].handle_shard_message(message, now);
                        }
                        Action::DeliverKept {
                            conn,
                            user,
                            from,
                            id,
                            timestamp_ms,
                        } => {
                            let key = (user, id, ReceiptKind::Unspecified as i32);
                            match self.disk.get(&key) {
                                Some(Queued::Message { body, .. })
                                    if !self.rotten.contains(&id) =>
                                {
                                    let stanza =
                                        Stanza::deliver(from, id, timestamp_ms, body.clone());
                                    self.sent.entry(conn).or_default().push(stanza);
                                }
                                _ => {
                                    self.disk.remove(&key);
                                    self.routers[index].handle_unreadable(user, id);
                                }
                            }
                        }
                        Action::PersistBinding { user, .. } => self.persisted.push(user),
                        Action::Keep { user, item } => {
                            self.disk
                                .insert((user, item.id(), item.ack_kind() as i32), item.clone());
                            if self.keep_at_once {
                                let now = self.now_ms;
                                self.routers[index].handle_kept(item.id(), item.ack_kind(), now);
                            } else {
                                self.unkept.push((index as ShardId, user, item));
                            }
                        }
                        Action::Forget { user, id, kind } => {
                            self.disk.remove(&(user, id, kind as i32));
                            self.forgotten.push((user, id, kind));
                        }
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn connect(&mut self, user: UserId, conn: u64) -> Result<(), ConnectError> {
        let shard = usize::from(home_shard(user, self.shards()));
        let result =
            self.routers[shard].handle_connect(user, &key_of(user), ConnRef(conn), self.now_ms);
        self.run();
        result
    }

    fn disconnect(&mut self, user: UserId, conn: u64) {
        let shard = usize::from(home_shard(user, self.shards()));
        self.routers[shard].handle_disconnect(user, ConnRef(conn), self.now_ms);
        self.run();
    }

    fn stanza(&mut self, user: UserId, conn: u64, kind: Kind) -> Result<(), Violation> {
        let shard = usize::from(home_shard(user, self.shards()));
        let result =
            self.routers[shard].handle_stanza(user, ConnRef(conn), Stanza::of(kind), self.now_ms);
        self.run();
        result
    }

    fn send(&mut self, from: UserId, conn: u64, to: UserId, seq: u32, body: &'static [u8]) {
        self.stanza(
            from,
            conn,
            Kind::Send(hop_protocol::wire::Send {
                to: to.get(),
                seq,
                body: Bytes::from_static(body),
            }),
        )
        .unwrap();
    }

    /// The disk catches up: every waiting Keep becomes durable.
    fn keep_all(&mut self) {
        for (shard, _, item) in std::mem::take(&mut self.unkept) {
            let now = self.now_ms;
            self.routers[usize::from(shard)].handle_kept(item.id(), item.ack_kind(), now);
        }
        self.run();
    }

    /// One shard, Alice online on connection 1, Bob known but offline (his first connection,
    /// 2, came and went).
    fn with_offline_recipient(limits: Limits) -> (Self, UserId, UserId) {
        Self::with_offline_recipient_on(1, limits)
    }

    /// The same on `shards` shards: Alice on the first, Bob on the last.
    fn with_offline_recipient_on(shards: u16, limits: Limits) -> (Self, UserId, UserId) {
        let mut cluster = Self::new(shards, limits);
        let alice = cluster.user_on(0, 0);
        let bob = cluster.user_on(shards - 1, u64::from(shards == 1));
        cluster.connect(bob, 2).unwrap();
        cluster.disconnect(bob, 2);
        cluster.connect(alice, 1).unwrap();
        (cluster, alice, bob)
    }

    /// An item kept by an earlier run: on the disk of its user's shard, and told to the router.
    fn restore(&mut self, user: UserId, item: Queued) {
        let shard = usize::from(home_shard(user, self.shards()));
        self.routers[shard].restore_item(user, &item);
        self.disk
            .insert((user, item.id(), item.ack_kind() as i32), item);
    }

    fn take(&mut self, conn: u64) -> Vec<Stanza> {
        self.sent.remove(&ConnRef(conn)).unwrap_or_default()
    }
}

fn key_of(user: UserId) -> [u8; KEY_BYTES] {
    let mut key = [0u8; KEY_BYTES];
    key[..8].copy_from_slice(&user.get().to_le_bytes());
    key
}

fn only<T: std::fmt::Debug>(mut items: Vec<T>) -> T {
    assert_eq!(items.len(), 1, "expected one item: {items:?}");
    items.pop().unwrap()
}

fn deliver(stanza: &Stanza) -> &Deliver {
    match &stanza.kind {
        Some(Kind::Deliver(deliver)) => deliver,
        other => panic!("expected Deliver, got {other:?}"),
    }
}

fn receipt(stanza: &Stanza) -> &Receipt {
    match &stanza.kind {
        Some(Kind::Receipt(receipt)) => receipt,
        other => panic!("expected Receipt, got {other:?}"),
    }
}

fn error_code(stanza: &Stanza) -> (ErrorCode, u32) {
    match &stanza.kind {
        Some(Kind::Error(error)) => (ErrorCode::try_from(error.code).unwrap(), error.seq),
        other => panic!("expected Error, got {other:?}"),
    }
}

/// The three ticks for a pair of users on the given shards.
fn ticks_between(sender_shard: ShardId, recipient_shard: ShardId) {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(sender_shard, 0);
    let bob = cluster.user_on(recipient_shard, 1);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    cluster.send(alice, 1, bob, 7, b"hello");

    let ack = only(cluster.take(1));
    let Some(Kind::ServerAck(server_ack)) = ack.kind else {
        panic!("expected ServerAck, got {ack:?}")
    };
    assert_eq!(server_ack.seq, 7);
    let delivered = only(cluster.take(2));
    let message = deliver(&delivered);
    assert_eq!(
        (message.from, message.id, &message.body[..]),
        (alice.get(), server_ack.id, &b"hello"[..])
    );

    cluster
        .stanza(
            bob,
            2,
            Kind::Ack(Ack {
                id: message.id,
                kind: 0,
            }),
        )
        .unwrap();
    let two_ticks = only(cluster.take(1));
    assert_eq!(receipt(&two_ticks).kind, ReceiptKind::Delivered as i32);
    assert_eq!(receipt(&two_ticks).by, bob.get());
    assert_eq!(receipt(&two_ticks).id, message.id);

    cluster
        .stanza(
            bob,
            2,
            Kind::Read(Read {
                from: alice.get(),
                id: message.id,
            }),
        )
        .unwrap();
    let blue = only(cluster.take(1));
    assert_eq!(receipt(&blue).kind, ReceiptKind::Read as i32);
    assert!(cluster.take(2).is_empty());
}

#[test]
fn three_ticks_on_one_shard() {
    ticks_between(0, 0);
}

#[test]
fn three_ticks_across_shards() {
    ticks_between(0, 1);
    ticks_between(1, 0);
}

#[test]
fn offline_recipient_gets_messages_in_order_on_connect() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(bob, 2).unwrap();
    cluster.disconnect(bob, 2);
    cluster.connect(alice, 1).unwrap();
    cluster.send(alice, 1, bob, 1, b"one");
    cluster.send(alice, 1, bob, 2, b"two");
    assert_eq!(
        cluster.take(1).len(),
        2,
        "two ServerAcks while bob is offline"
    );
    cluster.connect(bob, 3).unwrap();
    let bodies: Vec<_> = cluster
        .take(3)
        .iter()
        .map(|s| deliver(s).body.clone())
        .collect();
    assert_eq!(
        bodies,
        [Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
}

#[test]
fn receipts_wait_for_an_offline_sender() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    cluster.send(alice, 1, bob, 1, b"hi");
    cluster.take(1);
    cluster.disconnect(alice, 1);
    let id = deliver(&only(cluster.take(2))).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    cluster
        .stanza(
            bob,
            2,
            Kind::Read(Read {
                from: alice.get(),
                id,
            }),
        )
        .unwrap();
    assert!(cluster.take(1).is_empty());
    cluster.connect(alice, 4).unwrap();
    let receipts = cluster.take(4);
    assert_eq!(receipts.len(), 2);
    assert_eq!(receipt(&receipts[0]).kind, ReceiptKind::Delivered as i32);
    assert_eq!(receipt(&receipts[1]).kind, ReceiptKind::Read as i32);
    // Acked receipts are gone; unacked ones come again on the next connection.
    let delivered = ReceiptKind::Delivered as i32;
    cluster
        .stanza(
            alice,
            4,
            Kind::Ack(Ack {
                id,
                kind: delivered,
            }),
        )
        .unwrap();
    cluster.disconnect(alice, 4);
    cluster.connect(alice, 5).unwrap();
    assert_eq!(
        receipt(&only(cluster.take(5))).kind,
        ReceiptKind::Read as i32
    );
}

#[test]
fn unacked_deliveries_are_sent_again_after_reconnect() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    cluster.send(alice, 1, bob, 1, b"x");
    let first = deliver(&only(cluster.take(2))).id;
    cluster.disconnect(bob, 2);
    cluster.connect(bob, 3).unwrap();
    assert_eq!(
        deliver(&only(cluster.take(3))).id,
        first,
        "same server id, so the client can drop a duplicate"
    );
}

#[test]
fn inflight_is_bounded_and_acks_release_more() {
    let limits = Limits {
        inflight_max: 2,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(1, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    for seq in 1..=5 {
        cluster.send(alice, 1, bob, seq, b"m");
    }
    let pushed = cluster.take(2);
    assert_eq!(pushed.len(), 2);
    let id = deliver(&pushed[0]).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    assert_eq!(cluster.take(2).len(), 1, "one ack frees one slot");
}

#[test]
fn inflight_bytes_are_bounded_but_one_large_item_always_goes() {
    let limits = Limits {
        inflight_bytes_max: 10,
        ..Limits::default()
    };
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(limits);
    cluster.send(alice, 1, bob, 1, b"twelve bytes");
    cluster.send(alice, 1, bob, 2, b"four");
    cluster.send(alice, 1, bob, 3, b"six!!!");
    cluster.connect(bob, 3).unwrap();
    let first = deliver(&only(cluster.take(3))).clone();
    assert_eq!(
        first.body.as_ref(),
        b"twelve bytes",
        "larger than the bound, alone"
    );
    cluster
        .stanza(
            bob,
            3,
            Kind::Ack(Ack {
                id: first.id,
                kind: 0,
            }),
        )
        .unwrap();
    let next: Vec<_> = cluster
        .take(3)
        .iter()
        .map(|stanza| deliver(stanza).body.clone())
        .collect();
    assert_eq!(
        next,
        [&b"four"[..], &b"six!!!"[..]],
        "4 + 6 bytes fit in 10"
    );
}

#[test]
fn unknown_and_invalid_recipients_get_errors_not_acks() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let stranger = cluster.user_on(1, 5);
    cluster.connect(alice, 1).unwrap();
    cluster.send(alice, 1, stranger, 3, b"anyone?");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::UnknownUser, 3)
    );
    cluster
        .stanza(
            alice,
            1,
            Kind::Send(hop_protocol::wire::Send {
                to: 0,
                seq: 4,
                body: Bytes::new(),
            }),
        )
        .unwrap();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::BadUserId, 4)
    );
    cluster
        .stanza(
            alice,
            1,
            Kind::Send(hop_protocol::wire::Send {
                to: u64::MAX,
                seq: 5,
                body: Bytes::new(),
            }),
        )
        .unwrap();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::BadUserId, 5)
    );
}

#[test]
fn full_queue_refuses_with_an_error_and_affects_no_one_else() {
    let limits = Limits {
        queue_messages_max: 2,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    let carol = cluster.user_on(1, 1);
    for (user, conn) in [(bob, 2), (carol, 3)] {
        cluster.connect(user, conn).unwrap();
        cluster.disconnect(user, conn);
    }
    cluster.connect(alice, 1).unwrap();
    for seq in 1..=3 {
        cluster.send(alice, 1, bob, seq, b"m");
    }
    let replies = cluster.take(1);
    assert!(matches!(replies[0].kind, Some(Kind::ServerAck(_))));
    assert!(matches!(replies[1].kind, Some(Kind::ServerAck(_))));
    assert_eq!(error_code(&replies[2]), (ErrorCode::QueueFull, 3));
    cluster.send(alice, 1, carol, 4, b"m");
    assert!(matches!(
        only(cluster.take(1)).kind,
        Some(Kind::ServerAck(_))
    ));
}

#[test]
fn shard_wide_byte_limit_holds() {
    let limits = Limits {
        shard_queue_bytes_max: 10,
        ..Limits::default()
    };
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(limits);
    cluster.send(alice, 1, bob, 1, b"123456");
    cluster.send(alice, 1, bob, 2, b"123456");
    let replies = cluster.take(1);
    assert!(matches!(replies[0].kind, Some(Kind::ServerAck(_))));
    assert_eq!(error_code(&replies[1]), (ErrorCode::QueueFull, 2));
}

#[test]
fn presence_is_told_on_subscribe_and_on_every_change() {
    let mut cluster = Cluster::new(2, Limits::default());
    let watcher = cluster.user_on(0, 0);
    let watched = cluster.user_on(1, 0);
    cluster.connect(watched, 2).unwrap();
    cluster.connect(watcher, 1).unwrap();
    let presence = |stanza: Stanza| match stanza.kind {
        Some(Kind::Presence(presence)) => presence,
        other => panic!("expected Presence, got {other:?}"),
    };
    cluster
        .stanza(
            watcher,
            1,
            Kind::Subscribe(Subscribe {
                user: watched.get(),
            }),
        )
        .unwrap();
    let now = presence(only(cluster.take(1)));
    assert!(now.online && now.user == watched.get());
    cluster.now_ms = 9_000;
    cluster.disconnect(watched, 2);
    let gone = presence(only(cluster.take(1)));
    assert!(!gone.online);
    assert_eq!(gone.last_seen_ms, 9_000);
    cluster.connect(watched, 3).unwrap();
    assert!(presence(only(cluster.take(1))).online);
    // A watcher that disconnects stops watching.
    cluster.disconnect(watcher, 1);
    cluster.connect(watcher, 4).unwrap();
    cluster.disconnect(watched, 3);
    assert!(cluster.take(4).is_empty());
}

#[test]
fn second_connection_replaces_the_first() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(alice, 2).unwrap();
    assert_eq!(cluster.closed, [(ConnRef(1), GoAwayReason::Replaced)]);
    // The old connection's disconnect does not take the user offline.
    cluster.disconnect(alice, 1);
    cluster
        .stanza(alice, 2, Kind::Ping(Ping { nonce: 3 }))
        .unwrap();
    assert!(matches!(
        only(cluster.take(2)).kind,
        Some(Kind::Pong(Pong { nonce: 3 }))
    ));
}

#[test]
fn a_user_id_binds_to_its_first_key() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1).unwrap();
    assert_eq!(cluster.persisted, [alice]);
    let result = cluster.routers[0].handle_connect(alice, &[9u8; KEY_BYTES], ConnRef(2), 0);
    assert_eq!(result, Err(ConnectError::IdTaken));
    let mut restored = Router::new(0, 1, Limits::default(), 0);
    restored.restore_binding(alice, key_of(alice));
    assert_eq!(
        restored.handle_connect(alice, &[9u8; KEY_BYTES], ConnRef(3), 0),
        Err(ConnectError::IdTaken)
    );
}

#[test]
fn server_only_stanzas_from_a_client_are_violations() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1).unwrap();
    let forged = Kind::Deliver(Deliver {
        from: 99,
        id: 1,
        timestamp_ms: 0,
        body: Bytes::new(),
    });
    assert!(cluster.stanza(alice, 1, forged).is_err());
    let shard = usize::from(home_shard(alice, 1));
    assert!(cluster.routers[shard]
        .handle_stanza(alice, ConnRef(1), Stanza { kind: None }, 0)
        .is_err());
}

#[test]
fn server_ids_are_unique_and_carry_the_shard() {
    let mut router = Router::new(3, 4, Limits::default(), 1_700_000_000_000);
    let first = router.take_id();
    let second = router.take_id();
    assert_ne!(first, second);
    assert_eq!(first >> ID_COUNTER_BITS, 3);
}

#[test]
fn home_shards_spread_users() {
    let mut counts = [0usize; 4];
    for raw in 1..=4_000 {
        counts[usize::from(home_shard(UserId::new(raw).unwrap(), 4))] += 1;
    }
    assert!(counts.iter().all(|count| *count > 800), "{counts:?}");
}

/// A seeded simulation of three shards and a dozen users connecting, disconnecting, sending,
/// acking and reading at random. After every step the cluster runs to quiescence; at the end
/// every user connects and acks until nothing is left. It checks:
/// - every Send gets exactly one reply, a ServerAck or an Error;
/// - every message with a ServerAck reaches its recipient, with the true sender in `from`;
/// - no message is delivered again once its recipient acked it;
/// - every delivered-and-acked message yields exactly one delivered receipt to its sender.
#[test]
fn seeded_simulation_keeps_the_delivery_invariants() {
    for seed in 1..=8u64 {
        simulate(seed);
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*: enough to pick operations reproducibly.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % n
    }
}

fn simulate(seed: u64) {
    const USERS: u64 = 12;
    const STEPS: usize = 2_000;
    // Small inflight windows exercise redelivery; queues are large enough that no receipt
    // overflows (that bound has its own test).
    let limits = Limits {
        queue_messages_max: 1_000,
        inflight_max: 3,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(3, limits);
    let users: Vec<UserId> = (0..USERS)
        .map(|n| cluster.user_on((n % 3) as ShardId, n / 3))
        .collect();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut next_conn = 100u64;
    // Per user: its current connection, if online.
    let mut online: HashMap<UserId, u64> = HashMap::new();
    for user in &users {
        cluster.connect(*user, next_conn).unwrap();
        cluster.disconnect(*user, next_conn);
        next_conn += 1;
    }
    let mut accepted: HashMap<u64, (UserId, UserId)> = HashMap::new(); // id -> (from, to)
    let mut acked: BTreeSetU64 = BTreeSetU64::default();
    let mut delivered_to: HashMap<u64, usize> = HashMap::new();
    let mut receipts: HashMap<u64, usize> = HashMap::new();
    let mut unacked: HashMap<UserId, Vec<(u64, bool)>> = HashMap::new(); // (id, is_receipt)
    let mut sent = 0u32;

    let absorb = |cluster: &mut Cluster,
                  online: &HashMap<UserId, u64>,
                  accepted: &mut HashMap<u64, (UserId, UserId)>,
                  acked: &BTreeSetU64,
                  delivered_to: &mut HashMap<u64, usize>,
                  receipts: &mut HashMap<u64, usize>,
                  unacked: &mut HashMap<UserId, Vec<(u64, bool)>>,
                  pending_sends: &mut HashMap<(UserId, u32), UserId>| {
        for (user, conn) in online {
            for stanza in cluster.take(*conn) {
                match stanza.kind {
                    Some(Kind::ServerAck(ack)) => {
                        let to = pending_sends
                            .remove(&(*user, ack.seq))
                            .expect("one reply per Send");
                        accepted.insert(ack.id, (*user, to));
                    }
                    Some(Kind::Error(error)) => {
                        panic!("seed {seed}: unexpected error {error:?}");
                    }
                    Some(Kind::Deliver(deliver)) => {
                        assert!(
                            !acked.0.contains(&deliver.id),
                            "seed {seed}: delivered after ack"
                        );
                        let (from, to) = accepted
                            .get(&deliver.id)
                            .copied()
                            .unwrap_or((UserId::new(deliver.from).unwrap(), *user));
                        assert_eq!(
                            (deliver.from, to),
                            (from.get(), *user),
                            "seed {seed}: wrong from/to"
                        );
                        *delivered_to.entry(deliver.id).or_default() += 1;
                        unacked.entry(*user).or_default().push((deliver.id, false));
                    }
                    Some(Kind::Receipt(receipt)) => {
                        if receipt.kind == ReceiptKind::Delivered as i32 {
                            let (from, _) = accepted[&receipt.id];
                            assert_eq!(from, *user, "seed {seed}: receipt to the wrong user");
                        }
                        unacked.entry(*user).or_default().push((receipt.id, true));
                        if receipt.kind == ReceiptKind::Delivered as i32 {
                            *receipts.entry(receipt.id).or_default() += 1;
                        }
                    }
                    other => panic!("seed {seed}: unexpected {other:?}"),
                }
            }
        }
    };
    let mut pending_sends: HashMap<(UserId, u32), UserId> = HashMap::new();

    for _ in 0..STEPS {
        let user = users[rng.below(USERS) as usize];
        match rng.below(10) {
            0 | 1 => {
                if let Some(conn) = online.remove(&user) {
                    cluster.disconnect(user, conn);
                    unacked.remove(&user); // the device forgets what it did not ack
                } else {
                    next_conn += 1;
                    cluster.connect(user, next_conn).unwrap();
                    online.insert(user, next_conn);
                }
            }
            2..=5 => {
                if let Some(&conn) = online.get(&user) {
                    let to = users[rng.below(USERS) as usize];
                    sent += 1;
                    pending_sends.insert((user, sent), to);
                    cluster.send(user, conn, to, sent, b"sim");
                }
            }
            _ => {
                if let Some(&conn) = online.get(&user) {
                    let items = unacked.entry(user).or_default();
                    if !items.is_empty() {
                        let (id, is_receipt) = items.remove(0);
                        if is_receipt {
                            // Ack both kinds the receipt could be; an unmatched ack is ignored.
                            for kind in [ReceiptKind::Delivered, ReceiptKind::Read] {
                                cluster
                                    .stanza(
                                        user,
                                        conn,
                                        Kind::Ack(Ack {
                                            id,
                                            kind: kind as i32,
                                        }),
                                    )
                                    .unwrap();
                            }
                        } else {
                            acked.0.insert(id);
                            cluster
                                .stanza(user, conn, Kind::Ack(Ack { id, kind: 0 }))
                                .unwrap();
                            let (from, _) = accepted[&id];
                            cluster
                                .stanza(
                                    user,
                                    conn,
                                    Kind::Read(Read {
                                        from: from.get(),
                                        id,
                                    }),
                                )
                                .unwrap();
                        }
                    }
                }
            }
        }
        absorb(
            &mut cluster,
            &online,
            &mut accepted,
            &acked,
            &mut delivered_to,
            &mut receipts,
            &mut unacked,
            &mut pending_sends,
        );
        assert!(
            pending_sends.is_empty(),
            "seed {seed}: a Send without a reply"
        );
    }
    // Drain: everyone online, ack everything until quiet.
    for user in &users {
        if !online.contains_key(user) {
            next_conn += 1;
            cluster.connect(*user, next_conn).unwrap();
            online.insert(*user, next_conn);
        }
    }
    for _ in 0..10_000 {
        absorb(
            &mut cluster,
            &online,
            &mut accepted,
            &acked,
            &mut delivered_to,
            &mut receipts,
            &mut unacked,
            &mut pending_sends,
        );
        let Some((&user, _)) = unacked.iter().find(|(_, items)| !items.is_empty()) else {
            break;
        };
        let conn = online[&user];
        let (id, is_receipt) = unacked.get_mut(&user).unwrap().remove(0);
        if is_receipt {
            for kind in [ReceiptKind::Delivered, ReceiptKind::Read] {
                cluster
                    .stanza(
                        user,
                        conn,
                        Kind::Ack(Ack {
                            id,
                            kind: kind as i32,
                        }),
                    )
                    .unwrap();
            }
        } else {
            acked.0.insert(id);
            cluster
                .stanza(user, conn, Kind::Ack(Ack { id, kind: 0 }))
                .unwrap();
        }
    }
    for id in accepted.keys() {
        assert!(
            delivered_to.get(id).copied().unwrap_or(0) >= 1,
            "seed {seed}: accepted message {id} never delivered"
        );
        assert!(
            acked.0.contains(id),
            "seed {seed}: message {id} never acked"
        );
        assert!(
            receipts.get(id).copied().unwrap_or(0) >= 1,
            "seed {seed}: no delivered receipt for {id}"
        );
    }
    for router in &cluster.routers {
        let counters = router.counters();
        assert_eq!(counters.receipts_dropped, 0, "seed {seed}");
    }
    let total_acked: u64 = cluster
        .routers
        .iter()
        .map(|r| r.counters().messages_acked)
        .sum();
    assert_eq!(
        total_acked as usize,
        accepted.len(),
        "seed {seed}: each message acked exactly once at the server"
    );
}

#[derive(Default)]
struct BTreeSetU64(std::collections::BTreeSet<u64>);

#[test]
fn server_ack_waits_for_the_disk() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient_on(2, Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 1, b"keep me");
    assert!(
        cluster.take(1).is_empty(),
        "no tick before the message is durable"
    );
    assert_eq!(cluster.unkept.len(), 1);
    assert_eq!(cluster.unkept[0].1, bob);
    cluster.keep_all();
    assert!(matches!(
        only(cluster.take(1)).kind,
        Some(Kind::ServerAck(_))
    ));
}

#[test]
fn a_device_ack_before_the_disk_releases_the_server_ack_first() {
    let mut cluster = Cluster::new(2, Limits::default());
    cluster.keep_at_once = false;
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    cluster.send(alice, 1, bob, 1, b"fast");
    let id = deliver(&only(cluster.take(2))).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    let ticks = cluster.take(1);
    assert!(
        matches!(ticks[0].kind, Some(Kind::ServerAck(_))),
        "{ticks:?}"
    );
    assert_eq!(receipt(&ticks[1]).kind, ReceiptKind::Delivered as i32);
    assert_eq!(cluster.forgotten, [(bob, id, ReceiptKind::Unspecified)]);
    cluster.keep_all();
    assert!(
        cluster.take(1).is_empty(),
        "no second ServerAck when the disk catches up"
    );
}

#[test]
fn an_item_that_cannot_be_kept_is_refused_and_leaves_the_queue() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 9, b"disk full");
    let (_, user, item) = cluster.unkept.pop().unwrap();
    let now = cluster.now_ms;
    cluster.routers[0].handle_keep_failed(
        user,
        item.id(),
        item.ack_kind(),
        ErrorCode::Overloaded,
        "disk",
        now,
    );
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::Overloaded, 9)
    );
    cluster.connect(bob, 3).unwrap();
    assert!(
        cluster.take(3).is_empty(),
        "the refused message is not delivered"
    );
}

#[test]
fn restored_items_are_delivered_on_connect() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.routers[0].restore_binding(bob, key_of(bob));
    cluster.restore(
        bob,
        Queued::Message {
            from: alice,
            id: 77,
            timestamp_ms: 1,
            body: Bytes::from_static(b"from before"),
        },
    );
    cluster.restore(
        bob,
        Queued::Receipt {
            id: 78,
            kind: ReceiptKind::Read,
            by: alice,
            timestamp_ms: 2,
        },
    );
    let stranger = cluster.user_on(0, 5);
    cluster.restore(
        stranger,
        Queued::Receipt {
            id: 1,
            kind: ReceiptKind::Read,
            by: alice,
            timestamp_ms: 0,
        },
    );
    assert_eq!(cluster.routers[0].counters().items_orphaned, 1);
    cluster.connect(bob, 2).unwrap();
    let pushed = cluster.take(2);
    assert_eq!(deliver(&pushed[0]).id, 77);
    assert_eq!(receipt(&pushed[1]).id, 78);
}

#[test]
fn expired_items_leave_the_queue() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.send(alice, 1, bob, 1, b"old");
    let ack = only(cluster.take(1));
    let Some(Kind::ServerAck(ack)) = ack.kind else {
        panic!("{ack:?}")
    };
    cluster.routers[0].handle_expired(bob, ack.id, ReceiptKind::Unspecified);
    cluster.connect(bob, 3).unwrap();
    assert!(cluster.take(3).is_empty());
}

#[test]
fn a_kept_body_leaves_memory_and_is_delivered_from_disk() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient_on(2, Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 1, b"on disk");
    assert_eq!(cluster.routers[1].bodies_in_memory(), 1, "held until kept");
    cluster.keep_all();
    assert_eq!(cluster.routers[1].bodies_in_memory(), 0, "the store has it");
    cluster.connect(bob, 3).unwrap();
    let pushed = only(cluster.take(3));
    let delivered = deliver(&pushed);
    assert_eq!(delivered.body.as_ref(), b"on disk");
    assert_eq!(delivered.from, alice.get());
}

#[test]
fn an_online_delivery_uses_the_body_in_memory_and_a_redelivery_the_disk() {
    let mut cluster = Cluster::new(1, Limits::default());
    cluster.keep_at_once = false;
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1).unwrap();
    cluster.connect(bob, 2).unwrap();
    cluster.send(alice, 1, bob, 1, b"fresh");
    let first = only(cluster.take(2));
    assert_eq!(deliver(&first).body.as_ref(), b"fresh");
    // Bob drops the connection before acking; the message is kept meanwhile.
    cluster.disconnect(bob, 2);
    cluster.keep_all();
    assert_eq!(cluster.routers[0].bodies_in_memory(), 0);
    cluster.connect(bob, 3).unwrap();
    let again = only(cluster.take(3));
    assert_eq!(deliver(&again).id, deliver(&first).id);
    assert_eq!(deliver(&again).body.as_ref(), b"fresh");
}

#[test]
fn a_kept_message_that_cannot_be_read_back_leaves_the_queue_and_is_counted() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.send(alice, 1, bob, 1, b"rotten");
    cluster.send(alice, 1, bob, 2, b"fine");
    let acks = cluster.take(1);
    let Some(Kind::ServerAck(first)) = &acks[0].kind else {
        panic!("{acks:?}")
    };
    cluster.rotten.push(first.id);
    cluster.connect(bob, 3).unwrap();
    let pushed = only(cluster.take(3));
    assert_eq!(deliver(&pushed).body.as_ref(), b"fine");
    assert_eq!(cluster.routers[0].counters().items_unreadable, 1);
}

#[test]
fn an_emptied_queue_is_freed_at_the_next_sweep_not_at_once() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.connect(bob, 3).unwrap();
    cluster.send(alice, 1, bob, 1, b"hi");
    let id = deliver(&only(cluster.take(3))).id;
    cluster
        .stanza(bob, 3, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    let router = &mut cluster.routers[0];
    assert!(
        router.users[&bob].extra.is_some(),
        "kept for the next message"
    );
    router.release_empty();
    assert!(
        router.users[&bob].extra.is_none(),
        "an idle user is its 32 bytes"
    );
    router.release_empty(); // nothing listed twice
}
