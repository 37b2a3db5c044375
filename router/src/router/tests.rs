//! Router tests: several routers wired together in memory (a deterministic cluster), users
//! picked so that they land on the shards each test wants.

use std::collections::HashMap;

use std::collections::HashSet;

use hop_protocol::wire::{
    device_change, Ack, Deliver, DeviceChange, Outbox, Ping, Read, Subscribe,
};

use super::*;

fn secrets() -> Secrets {
    Secrets {
        message_ids: [7; 16],
        read_proofs: [9; 16],
    }
}

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
    unkept: Vec<(ShardId, UserId, Queued, u32)>,
    forgotten: Vec<(UserId, u64, ReceiptKind)>,
    /// What each shard's store holds: every kept item by (user, id, kind), bodies included.
    disk: HashMap<(UserId, u64, i32), Queued>,
    /// Kept messages whose body the store "cannot read back" (disk damage).
    rotten: Vec<u64>,
    /// Connections that declared their outbox (`outbox_of`).
    declared: HashSet<u64>,
    /// A PersistPrivacy action was seen.
    persisted_privacy: bool,
    /// Devices the server-wide directory says belong to another account.
    taken: Vec<UserId>,
    /// Devices whose unlink the routers asked to keep.
    unlinked: Vec<UserId>,
    /// Group snapshots kept, in order.
    groups_kept: Vec<crate::GroupSnapshot>,
    /// When set, each router is a node of a cluster (of one shard): a user lives on node
    /// `node_of(user)`, and `ToNode` mails are carried to it like a node link would.
    nodes: Option<usize>,
    /// Mails carried between nodes.
    node_mails: usize,
    /// When false, node mails are not carried but refused (`handle_unroutable`): no links.
    links_up: bool,
    /// Copies each node keeps for users of other nodes (as their replica): by (node, user,
    /// id), what that node's store holds.
    replica_disk: HashMap<(usize, UserId, u64), Queued>,
    /// When true, mails to replica nodes wait in `replica_mails` until
    /// `carry_replica_mails`.
    hold_replica_mails: bool,
    /// Held mails to replica nodes: (from node, to node, mail).
    replica_mails: Vec<(usize, usize, ShardMessage)>,
    /// How far on from its home a user's replica node is, in node mode (1 unless moved).
    replica_shift: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bindings the routers ended (expired accounts).
    unbound: Vec<UserId>,
    /// Seen times the routers asked to keep, in order.
    seen: Vec<(UserId, u32)>,
}

/// The node of a cluster of `nodes` that `user` lives on, in node mode.
fn node_of(user: UserId, nodes: usize) -> usize {
    (user.low() % nodes as u64) as usize
}

/// The node that keeps copies of the queues of `user`, whose home is `node_of(user, nodes)`:
/// `shift` nodes on (1 unless a test moved the replicas).
fn replica_of(user: UserId, nodes: usize, shift: usize) -> usize {
    (node_of(user, nodes) + shift) % nodes
}

/// What each node's router is told about placement in node mode.
#[derive(Debug)]
struct NodeLocality {
    node: usize,
    nodes: usize,
    /// Messages wait for a copy on their recipient's replica node.
    replicas: bool,
    /// Shared with the harness: how far on from its home a user's replica node is.
    shift: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Locality for NodeLocality {
    fn is_here(&self, user: UserId) -> bool {
        node_of(user, self.nodes) == self.node
    }

    fn replica(&self, user: UserId) -> Option<u32> {
        let shift = self.shift.load(std::sync::atomic::Ordering::Relaxed);
        self.replicas
            .then(|| replica_of(user, self.nodes, shift) as u32)
    }
}

/// The outbox the harness declares for connection `conn`.
fn outbox_of(conn: u64) -> u64 {
    1_000 + conn
}

impl Cluster {
    fn new(shards: u16, limits: Limits) -> Self {
        Self {
            routers: (0..shards)
                .map(|shard| Router::new(shard, shards, limits, secrets()))
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
            declared: HashSet::new(),
            persisted_privacy: false,
            taken: Vec::new(),
            unlinked: Vec::new(),
            groups_kept: Vec::new(),
            nodes: None,
            node_mails: 0,
            links_up: true,
            replica_disk: HashMap::new(),
            hold_replica_mails: false,
            replica_mails: Vec::new(),
            replica_shift: std::sync::Arc::new(1.into()),
            unbound: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// `nodes` nodes of one shard each, every router told where each user lives.
    fn new_nodes(nodes: usize, limits: Limits) -> Self {
        Self::new_nodes_replicated(nodes, limits, false)
    }

    /// The same, where every message waits for its copy on the replica node if `replicas`.
    fn new_nodes_replicated(nodes: usize, limits: Limits, replicas: bool) -> Self {
        let mut cluster = Self::new(1, limits);
        let shift = cluster.replica_shift.clone();
        cluster.routers = (0..nodes)
            .map(|node| {
                let mut router = Router::new(0, 1, limits, secrets());
                router.set_locality(Box::new(NodeLocality {
                    node,
                    nodes,
                    replicas,
                    shift: shift.clone(),
                }));
                router
            })
            .collect();
        cluster.nodes = Some(nodes);
        cluster
    }

    /// The router a user's connection and queue are on: its home shard, or in node mode its
    /// node's.
    fn router_of(&self, user: UserId) -> usize {
        match self.nodes {
            Some(nodes) => node_of(user, nodes),
            None => usize::from(home_shard(user, self.shards())),
        }
    }

    /// A user on node `node` (node mode), distinct per `n`.
    fn user_on_node(&self, node: usize, n: u64) -> UserId {
        let nodes = self.nodes.expect("node mode");
        (1..)
            .filter_map(|raw: u64| UserId::from_halves(raw.wrapping_mul(0x9E37_79B9), raw))
            .filter(|user| node_of(*user, nodes) == node)
            .nth(n as usize)
            .unwrap()
    }

    fn shards(&self) -> u16 {
        self.routers.len() as u16
    }

    /// A user id whose home is `shard`, distinct per `n`.
    fn user_on(&self, shard: ShardId, n: u64) -> UserId {
        (1..)
            .filter_map(|raw: u64| UserId::from_halves(raw.wrapping_mul(0x9E37_79B9), raw))
            .filter(|user| home_shard(*user, self.shards()) == shard)
            .nth(n as usize)
            .unwrap()
    }

    fn run(&mut self) {
        loop {
            let mut progressed = false;
            for index in 0..self.routers.len() {
                for action in self.routers[index].take_actions() {
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
                        Action::ToNode { user, message } => {
                            let nodes = self.nodes.expect("only a router of a cluster");
                            let node = node_of(user, nodes);
                            assert_ne!(node, index, "a mail to its own node");
                            let now = self.now_ms;
                            if self.links_up {
                                self.node_mails += 1;
                                self.routers[node].handle_shard_message(*message, now);
                            } else {
                                self.routers[index].handle_unroutable(*message, now);
                            }
                        }
                        Action::ToReplica { user, message } => {
                            let nodes = self.nodes.expect("only a router of a cluster");
                            let shift = self
                                .replica_shift
                                .load(std::sync::atomic::Ordering::Relaxed);
                            let node = replica_of(user, nodes, shift);
                            assert_eq!(node_of(user, nodes), index, "from the user's home");
                            if !self.links_up {
                                let now = self.now_ms;
                                self.routers[index].handle_unroutable(*message, now);
                            } else if self.hold_replica_mails {
                                self.replica_mails.push((index, node, *message));
                            } else {
                                self.node_mails += 1;
                                let now = self.now_ms;
                                self.routers[node].handle_shard_message(*message, now);
                            }
                        }
                        Action::SendKept { user, id, to, .. } => {
                            let nodes = self.nodes.expect("only a router of a cluster");
                            let item = self
                                .replica_disk
                                .get(&(index, user, id))
                                .or_else(|| {
                                    self.disk.get(&(user, id, ReceiptKind::Unspecified as i32))
                                })
                                .cloned()
                                .expect("a kept message is on its node's disk");
                            let replica = Replica {
                                user,
                                keep: NO_KEEP,
                                item,
                            };
                            self.node_mails += 1;
                            let now = self.now_ms;
                            let (node, mail) = match to {
                                SendTo::NewHome => (
                                    node_of(user, nodes),
                                    ShardMessage::HandBack(Box::new(replica)),
                                ),
                                SendTo::Replica => {
                                    let shift = self
                                        .replica_shift
                                        .load(std::sync::atomic::Ordering::Relaxed);
                                    (
                                        replica_of(user, nodes, shift),
                                        ShardMessage::Replica(Box::new(replica)),
                                    )
                                }
                            };
                            self.routers[node].handle_shard_message(mail, now);
                        }
                        Action::DeliverKept {
                            conn,
                            user,
                            from,
                            id,
                            timestamp_ms,
                            proof,
                            sent_to,
                        } => {
                            let key = (user, id, ReceiptKind::Unspecified as i32);
                            let kept = match self.disk.get(&key) {
                                Some(Queued::Group {
                                    group, body, event, ..
                                }) => Some((body.clone(), Some((*group, *event)))),
                                Some(Queued::Message { body, .. } | Queued::Sent { body, .. }) => {
                                    Some((body.clone(), None))
                                }
                                _ => None,
                            };
                            match kept.filter(|_| !self.rotten.contains(&id)) {
                                Some((body, group)) => {
                                    let stanza = match (sent_to, group) {
                                        (_, Some((group, event))) => Stanza::deliver_group(
                                            from,
                                            group,
                                            id,
                                            timestamp_ms,
                                            body,
                                            proof,
                                            event,
                                        ),
                                        (Some(to), None) => {
                                            Stanza::deliver_sent(from, to, id, timestamp_ms, body)
                                        }
                                        (None, None) => {
                                            Stanza::deliver(from, id, timestamp_ms, body, proof)
                                        }
                                    };
                                    self.sent.entry(conn).or_default().push(stanza);
                                }
                                None => {
                                    self.disk.remove(&key);
                                    self.routers[index].handle_unreadable(user, id);
                                }
                            }
                        }
                        Action::PersistBinding { user, .. } => self.persisted.push(user),
                        Action::Unbind { user, .. } => self.unbound.push(user),
                        Action::PersistSeen { device, seconds } => {
                            self.seen.push((device, seconds))
                        }
                        Action::PersistPrivacy { .. } => self.persisted_privacy = true,
                        Action::Keep { user, item, keep } => {
                            if self
                                .nodes
                                .is_some_and(|nodes| node_of(user, nodes) != index)
                            {
                                self.replica_disk
                                    .insert((index, user, item.id()), item.clone());
                            } else {
                                self.disk.insert(
                                    (user, item.ack_id(), item.ack_kind() as i32),
                                    item.clone(),
                                );
                            }
                            if self.keep_at_once {
                                let now = self.now_ms;
                                self.routers[index].handle_kept(
                                    user,
                                    item.id(),
                                    item.ack_kind(),
                                    keep,
                                    now,
                                );
                            } else {
                                self.unkept.push((index as ShardId, user, item, keep));
                            }
                        }
                        Action::LinkDevice {
                            account,
                            device,
                            conn,
                        } => {
                            let free = !self.taken.contains(&device);
                            self.routers[index].handle_link_result(account, device, conn, free);
                        }
                        Action::UnlinkDevice { device, .. } => self.unlinked.push(device),
                        Action::PersistGroup(snapshot) => self.groups_kept.push(*snapshot),
                        Action::Forget { user, id, kind, .. } => {
                            if self
                                .nodes
                                .is_some_and(|nodes| node_of(user, nodes) != index)
                            {
                                self.replica_disk.remove(&(index, user, id));
                            } else {
                                self.disk.remove(&(user, id, kind as i32));
                            }
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

    fn connect(&mut self, user: UserId, conn: u64) {
        let shard = self.router_of(user);
        self.routers[shard].handle_connect(user, &key_of(user), ConnRef(conn), self.now_ms);
        self.run();
    }

    fn disconnect(&mut self, user: UserId, conn: u64) {
        let shard = self.router_of(user);
        self.routers[shard].handle_disconnect(user, ConnRef(conn), self.now_ms);
        self.run();
    }

    fn stanza(&mut self, user: UserId, conn: u64, kind: Kind) -> Result<(), Violation> {
        let shard = self.router_of(user);
        let result =
            self.routers[shard].handle_stanza(user, ConnRef(conn), Stanza::of(kind), self.now_ms);
        self.run();
        result
    }

    /// Message `seq` of connection `conn`'s outbox (declared first if it was not), naming
    /// the recipient in full.
    fn send(&mut self, from: UserId, conn: u64, to: UserId, seq: u64, body: &'static [u8]) {
        self.declare(from, conn, outbox_of(conn));
        self.stanza(from, conn, send_of(to, seq, body, false))
            .unwrap();
    }

    /// Declares outbox `outbox` on the connection, once per connection.
    fn declare(&mut self, user: UserId, conn: u64, outbox: u64) {
        if self.declared.insert(conn) {
            self.stanza(
                user,
                conn,
                Kind::Outbox(Outbox {
                    id: outbox,
                    ..Outbox::default()
                }),
            )
            .unwrap();
        }
    }

    /// Declares connection `conn`'s outbox asking for the second tick in the ServerAck.
    fn declare_delivered_in_ack(&mut self, user: UserId, conn: u64) {
        assert!(self.declared.insert(conn), "declared once");
        let outbox = Outbox {
            id: outbox_of(conn),
            delivered_in_ack: true,
        };
        self.stanza(user, conn, Kind::Outbox(outbox)).unwrap();
    }

    /// The disk refuses the latest waiting Keep (on shard 0).
    fn refuse_last_keep(&mut self) {
        let (_, user, item, keep) = self.unkept.pop().unwrap();
        let now = self.now_ms;
        self.routers[0].handle_keep_failed(
            user,
            item.id(),
            item.ack_kind(),
            keep,
            ErrorCode::Overloaded,
            "disk",
            now,
        );
        self.run();
    }

    /// The disk catches up: every waiting Keep becomes durable.
    fn keep_all(&mut self) {
        for waiting in std::mem::take(&mut self.unkept) {
            self.kept(waiting);
        }
        self.run();
    }

    /// The held mails to replica nodes arrive.
    fn carry_replica_mails(&mut self) {
        for (_, node, message) in std::mem::take(&mut self.replica_mails) {
            self.node_mails += 1;
            let now = self.now_ms;
            self.routers[node].handle_shard_message(message, now);
        }
        self.run();
    }

    /// The waiting Keep at `index` becomes durable, alone.
    fn keep_one(&mut self, index: usize) {
        let waiting = self.unkept.remove(index);
        self.kept(waiting);
        self.run();
    }

    fn kept(&mut self, (shard, user, item, keep): (ShardId, UserId, Queued, u32)) {
        let now = self.now_ms;
        self.routers[usize::from(shard)].handle_kept(user, item.id(), item.ack_kind(), keep, now);
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
        cluster.connect(bob, 2);
        cluster.disconnect(bob, 2);
        cluster.connect(alice, 1);
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

/// A Send naming its recipient in full.
fn send_of(to: UserId, seq: u64, body: &'static [u8], resend: bool) -> Kind {
    Kind::Send(hop_protocol::wire::Send {
        to: Some(to.into()),
        seq,
        body: Bytes::from_static(body),
        alias: 0,
        resend,
    })
}

fn key_of(user: UserId) -> [u8; KEY_BYTES] {
    let mut key = [0u8; KEY_BYTES];
    key[..16].copy_from_slice(&user.to_bytes());
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

fn server_ack(stanza: &Stanza) -> &ServerAck {
    match &stanza.kind {
        Some(Kind::ServerAck(ack)) => ack,
        other => panic!("expected ServerAck, got {other:?}"),
    }
}

/// A Read of `delivered` as its recipient sends it, with the Deliver's proof.
fn read_of(delivered: &Deliver) -> Kind {
    Kind::Read(Read {
        from: delivered.from,
        id: delivered.id,
        proof: delivered.proof,
    })
}

/// Checks that `replies` are `acked` ServerAcks, then an Error `code` for Send `seq`; returns
/// the Error's reason.
fn acked_then_refused(replies: &[Stanza], acked: usize, code: ErrorCode, seq: u64) -> String {
    assert_eq!(replies.len(), acked + 1, "{replies:?}");
    assert!(replies[..acked]
        .iter()
        .all(|reply| matches!(reply.kind, Some(Kind::ServerAck(_)))));
    assert_eq!(error_code(&replies[acked]), (code, seq));
    match &replies[acked].kind {
        Some(Kind::Error(error)) => error.reason.clone(),
        _ => unreachable!("checked above"),
    }
}

fn error_code(stanza: &Stanza) -> (ErrorCode, u64) {
    match &stanza.kind {
        Some(Kind::Error(error)) => (ErrorCode::try_from(error.code).unwrap(), error.seq),
        other => panic!("expected Error, got {other:?}"),
    }
}

/// The three ticks for a pair of users on the given shards.
fn ticks_between(sender_shard: ShardId, recipient_shard: ShardId) {
    let cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(sender_shard, 0);
    let bob = cluster.user_on(recipient_shard, 1);
    three_ticks(cluster, alice, bob);
}

/// Alice sends Bob a message and gets all three ticks.
fn three_ticks(mut cluster: Cluster, alice: UserId, bob: UserId) {
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 7, b"hello");

    let ack = only(cluster.take(1));
    let server_ack = server_ack(&ack);
    assert_eq!((server_ack.outbox, server_ack.seq), (outbox_of(1), 7));
    let delivered = only(cluster.take(2));
    let message = deliver(&delivered);
    assert_eq!(
        (message.from, message.id, &message.body[..]),
        (Some(alice.into()), server_ack.id, &b"hello"[..])
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
    assert_eq!(receipt(&two_ticks).by, Some(bob.into()));
    assert_eq!(receipt(&two_ticks).id, message.id);

    cluster.stanza(bob, 2, read_of(message)).unwrap();
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
fn three_ticks_across_nodes_with_every_mail_between_them_addressed_by_user() {
    let cluster = Cluster::new_nodes(2, Limits::default());
    let alice = cluster.user_on_node(0, 0);
    let bob = cluster.user_on_node(1, 0);
    three_ticks(cluster, alice, bob);
    let mut cluster = Cluster::new_nodes(3, Limits::default());
    let (alice, bob) = (cluster.user_on_node(2, 0), cluster.user_on_node(1, 0));
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"hi");
    // Route there, ServerAck back; nothing is handled on a node the user does not live on.
    assert_eq!(cluster.node_mails, 2);
    assert_eq!(cluster.routers[0].counters().mails_to_nodes, 0);
    assert_eq!(server_ack(&only(cluster.take(1))).seq, 1);
}

#[test]
fn a_message_or_watch_for_an_unreachable_node_is_refused_to_its_sender_only() {
    let mut cluster = Cluster::new_nodes(2, Limits::default());
    cluster.links_up = false;
    let alice = cluster.user_on_node(0, 0);
    let bob = cluster.user_on_node(1, 0);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 5, b"hello");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::Overloaded, 5)
    );
    assert!(cluster.take(2).is_empty(), "nothing reached Bob");
    cluster.stanza(alice, 1, subscribe(bob)).unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::Overloaded);
    let counters = cluster.routers[0].counters();
    assert_eq!((counters.mails_to_nodes, counters.mails_unroutable), (2, 2));
    assert_eq!(counters.messages_accepted, 0);
    // Alice's own node still serves her: a message to a user of her node goes through.
    let carol = cluster.user_on_node(0, 1);
    cluster.connect(carol, 3);
    cluster.send(alice, 1, carol, 6, b"near");
    assert_eq!(server_ack(&only(cluster.take(1))).seq, 6);
    assert_eq!(deliver(&only(cluster.take(3))).body, &b"near"[..]);
}

/// Two nodes whose messages wait for their replica node: Alice on node 0; Bob on node 1
/// (his replica node is 0), known there and offline.
fn replicated_pair() -> (Cluster, UserId, UserId) {
    let mut cluster = Cluster::new_nodes_replicated(2, Limits::default(), true);
    let alice = cluster.user_on_node(0, 0);
    let bob = cluster.user_on_node(1, 0);
    assert_eq!(replica_of(bob, 2, 1), 0);
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    cluster.connect(alice, 1);
    (cluster, alice, bob)
}

#[test]
fn a_message_is_acked_once_its_home_and_its_replica_node_both_keep_it() {
    let (mut cluster, alice, bob) = replicated_pair();
    cluster.hold_replica_mails = true;
    cluster.send(alice, 1, bob, 1, b"one");
    assert!(
        cluster.take(1).is_empty(),
        "no ServerAck while the replica node has no copy"
    );
    cluster.carry_replica_mails();
    assert_eq!(server_ack(&only(cluster.take(1))).seq, 1);
    let copy = only(cluster.replica_disk.keys().copied().collect());
    assert_eq!((copy.0, copy.1), (0, bob), "node 0 keeps Bob's copy");
    assert_eq!(cluster.routers[0].counters().replicas_kept, 1);

    // The replica's disk first, then the home's: the ServerAck waits for the second.
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 2, b"two");
    cluster.carry_replica_mails();
    let waiting: Vec<usize> = cluster.unkept.iter().map(|w| usize::from(w.0)).collect();
    assert_eq!(waiting, [1, 0], "the home's keep, then the replica's");
    cluster.keep_one(1);
    assert!(
        cluster.take(1).is_empty(),
        "the home's disk has not taken it"
    );
    cluster.keep_one(0);
    assert_eq!(server_ack(&only(cluster.take(1))).seq, 2);
    assert_eq!(cluster.replica_disk.len(), 2);

    // Bob takes both at home; his acks let the replica node's copies go too.
    cluster.keep_at_once = true;
    cluster.hold_replica_mails = false;
    cluster.connect(bob, 3);
    for stanza in cluster.take(3) {
        let id = deliver(&stanza).id;
        cluster
            .stanza(bob, 3, Kind::Ack(Ack { id, kind: 0 }))
            .unwrap();
    }
    assert!(
        cluster.replica_disk.is_empty(),
        "{:?}",
        cluster.replica_disk
    );
    assert_eq!(cluster.routers[0].user_report(bob).queued_messages, 0);
    assert_eq!(cluster.routers[0].counters().replicas_missing, 0);
}

#[test]
fn a_message_whose_replica_node_cannot_be_reached_is_refused_and_leaves_the_queue() {
    let (mut cluster, _, bob) = replicated_pair();
    // Carol lives on Bob's node: her message to him needs no link but the replica's.
    let carol = cluster.user_on_node(1, 1);
    cluster.connect(carol, 4);
    cluster.links_up = false;
    cluster.send(carol, 4, bob, 7, b"no second copy");
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::Overloaded, 7)
    );
    assert!(cluster.disk.is_empty(), "forgotten on the home's disk too");
    assert_eq!(cluster.routers[1].counters().replicas_missing, 1);
    cluster.connect(bob, 3);
    assert!(cluster.take(3).is_empty(), "Bob gets nothing");
    // With the link back, the message goes through.
    cluster.links_up = true;
    cluster.send(carol, 4, bob, 8, b"now");
    assert_eq!(server_ack(&only(cluster.take(4))).seq, 8);
    assert_eq!(deliver(&only(cluster.take(3))).body, &b"now"[..]);
}

#[test]
fn a_message_whose_copy_is_not_confirmed_in_time_is_refused_and_its_late_copy_forgotten() {
    let (mut cluster, _, bob) = replicated_pair();
    let carol = cluster.user_on_node(1, 1);
    cluster.connect(carol, 4);
    cluster.hold_replica_mails = true;
    cluster.send(carol, 4, bob, 9, b"slow link");
    cluster.now_ms += REPLICA_PATIENCE_MS - 1;
    let now = cluster.now_ms;
    cluster.routers[1].expire_replicas(now);
    cluster.run();
    assert!(cluster.take(4).is_empty(), "still within the patience");
    cluster.now_ms += 1;
    let now = cluster.now_ms;
    cluster.routers[1].expire_replicas(now);
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::Overloaded, 9)
    );
    assert!(cluster.disk.is_empty());
    // The copy arrives late, and so does the word to forget it.
    assert_eq!(cluster.replica_mails.len(), 2);
    cluster.carry_replica_mails();
    assert!(cluster.replica_disk.is_empty());
    assert_eq!(cluster.routers[0].user_report(bob).queued_messages, 0);
    cluster.connect(bob, 3);
    assert!(cluster.take(3).is_empty());
}

#[test]
fn a_home_copies_its_queue_again_to_a_new_replica_node_which_keeps_what_it_lacks() {
    let mut cluster = Cluster::new_nodes_replicated(3, Limits::default(), true);
    let (bob, carol) = (cluster.user_on_node(1, 0), cluster.user_on_node(1, 1));
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    cluster.connect(carol, 4);
    cluster.send(carol, 4, bob, 1, b"on disk");
    cluster.keep_at_once = false;
    cluster.send(carol, 4, bob, 2, b"in memory");
    let copies_on = |cluster: &Cluster, node: usize| {
        let mut ids: Vec<u64> = cluster
            .replica_disk
            .keys()
            .filter(|key| key.0 == node)
            .map(|key| key.2)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        copies_on(&cluster, 2).len(),
        2,
        "node 2, Bob's replica, has both"
    );
    assert!(copies_on(&cluster, 0).is_empty());
    // Bob's replica node moves to node 0 (say it joined): node 1 copies his queue to it
    // again, one message a turn here. (What still waits for node 2's answer is refused by
    // the change of members, as tested below; here it is copied from memory.)
    cluster
        .replica_shift
        .store(2, std::sync::atomic::Ordering::Relaxed);
    let now = cluster.now_ms;
    assert!(cluster.routers[1].claim_queue(bob, true));
    assert_eq!(cluster.routers[1].copy_again(bob, now, 1), (1, true));
    // A walk for a change that moved no replica still finds the copy left to make.
    assert!(
        cluster.routers[1].claim_queue(bob, false),
        "one left to copy"
    );
    assert_eq!(cluster.routers[1].copy_again(bob, now, 1), (1, false));
    assert!(!cluster.routers[1].claim_queue(bob, false), "none left");
    assert_eq!(cluster.routers[1].copy_again(bob, now, 1), (0, false));
    cluster.run();
    assert_eq!(
        copies_on(&cluster, 0),
        copies_on(&cluster, 2),
        "both copied"
    );
    // Copied again, the replica node keeps nothing twice.
    let kept = cluster.routers[0].counters().replicas_kept;
    cluster.routers[1].claim_queue(bob, true);
    assert_eq!(cluster.routers[1].copy_again(bob, now, 10), (2, false));
    cluster.run();
    assert_eq!(cluster.routers[0].counters().replicas_kept, kept);
    assert_eq!(cluster.routers[0].user_report(bob).queued_messages, 2);
    // A copy its link refused is made at the next change.
    let id = copies_on(&cluster, 0)[0];
    let refused = Replica {
        user: bob,
        keep: NO_KEEP,
        item: Queued::Message {
            from: carol,
            id,
            timestamp_ms: 0,
            body: Bytes::new(),
        },
    };
    cluster.routers[1].handle_unroutable(ShardMessage::Replica(Box::new(refused)), now);
    assert!(cluster.routers[1].claim_queue(bob, false));
    assert_eq!(cluster.routers[1].copy_again(bob, now, 10), (1, false));
    cluster.run();
    // Bob's acks at home let the new replica node's copies go (node 2's stay, orphans).
    cluster.keep_all();
    cluster.keep_at_once = true;
    cluster.connect(bob, 2);
    for stanza in cluster.take(2) {
        let id = deliver(&stanza).id;
        cluster
            .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
            .unwrap();
    }
    assert!(copies_on(&cluster, 0).is_empty());
    assert_eq!(cluster.routers[0].user_report(bob).queued_messages, 0);
    assert_eq!(copies_on(&cluster, 2).len(), 2);
}

#[test]
fn a_replica_node_that_left_and_came_back_between_two_looks_has_its_waiting_copies_refused() {
    let mut cluster = Cluster::new_nodes_replicated(3, Limits::default(), true);
    let bob = cluster.user_on_node(1, 0);
    let carol = cluster.user_on_node(1, 1);
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    cluster.connect(carol, 4);
    cluster.hold_replica_mails = true;
    cluster.send(carol, 4, bob, 1, b"its copy went to the node's last run");
    let now = cluster.now_ms;
    // Another node left: nothing waits for it.
    cluster.routers[1].handle_members_changed(now, Some(&[0]));
    cluster.run();
    assert!(cluster.take(4).is_empty());
    // Bob's replica, node 2, left and is back: the copy it was sent is gone with its run.
    cluster.routers[1].handle_members_changed(now, Some(&[2]));
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::Overloaded, 1)
    );
    // Departures not known: whatever waits is refused.
    cluster.send(carol, 4, bob, 2, b"waiting");
    cluster.routers[1].handle_members_changed(now, None);
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::Overloaded, 2)
    );
}

#[test]
fn a_change_of_members_refuses_what_waits_for_a_copy_on_a_node_no_longer_its_replica() {
    let mut cluster = Cluster::new_nodes_replicated(3, Limits::default(), true);
    let (bob, carol) = (cluster.user_on_node(1, 0), cluster.user_on_node(1, 1));
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    cluster.connect(carol, 4);
    cluster.send(carol, 4, bob, 1, b"copied");
    assert_eq!(server_ack(&only(cluster.take(4))).seq, 1);
    cluster.hold_replica_mails = true;
    cluster.send(carol, 4, bob, 2, b"waiting for its copy");
    // A change that leaves Bob's replica node where it was refuses nothing.
    let now = cluster.now_ms;
    cluster.routers[1].handle_members_changed(now, Some(&[]));
    cluster.run();
    assert!(cluster.take(4).is_empty());
    // Bob's replica moves from node 2 to node 0: what waits for node 2 is refused.
    cluster
        .replica_shift
        .store(2, std::sync::atomic::Ordering::Relaxed);
    cluster.routers[1].handle_members_changed(now, Some(&[]));
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::Overloaded, 2)
    );
    // The first message stays, on node 1 and its copy on node 2; the second's late copy
    // reaches node 2, and the word to forget it node 0 (its replica now), which has none.
    let held: Vec<usize> = cluster.replica_mails.iter().map(|mail| mail.1).collect();
    assert_eq!(held, [2, 0]);
    cluster.hold_replica_mails = false;
    cluster.carry_replica_mails();
    let copies: Vec<u64> = cluster.replica_disk.keys().map(|key| key.2).collect();
    assert_eq!(
        copies.len(),
        2,
        "node 2 holds both: the second is an orphan"
    );
    cluster.connect(bob, 3);
    assert_eq!(deliver(&only(cluster.take(3))).body, &b"copied"[..]);
}

#[test]
fn a_node_hands_back_a_queue_and_its_new_home_takes_what_it_lacks() {
    let (mut cluster, alice, bob) = replicated_pair();
    cluster.send(alice, 1, bob, 1, b"one");
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 2, b"two");
    cluster.keep_all();
    assert_eq!(cluster.take(1).len(), 2, "two ServerAcks");
    cluster.keep_at_once = true;
    // A message node 1 does not have (say it came back from a crash without it, while node
    // 0 served Bob) reaches node 0, which has not kept it yet when it hands Bob's queue back.
    let three = Replica {
        user: bob,
        keep: 77,
        item: Queued::Message {
            from: alice,
            id: 999,
            timestamp_ms: 5_000,
            body: Bytes::from_static(b"three"),
        },
    };
    cluster.keep_at_once = false;
    let now = cluster.now_ms;
    cluster.routers[0].handle_shard_message(ShardMessage::Replica(Box::new(three)), now);
    cluster.run();
    assert_eq!(
        cluster.routers[0].hand_back(bob, now, 10),
        (0, false),
        "copies, not taken as Bob's home"
    );
    // Node 1 died, and node 0 served Bob meanwhile; now node 1 is back.
    cluster.routers[0].claim_queue(bob, false);
    assert_eq!(
        cluster.routers[0].hand_back(bob, now, 2),
        (2, true),
        "two kept, at most two at a time"
    );
    assert_eq!(
        cluster.routers[0].hand_back(bob, now, 2),
        (1, false),
        "and one in memory"
    );
    assert_eq!(
        cluster.routers[0].hand_back(bob, now, 10),
        (0, false),
        "handed back once"
    );
    cluster.run();
    cluster.keep_all();
    assert_eq!(
        cluster.routers[1].counters().handed_back,
        1,
        "node 1 lacked one"
    );
    assert_eq!(cluster.routers[1].user_report(bob).queued_messages, 3);
    cluster.keep_at_once = true;
    cluster.connect(bob, 3);
    let mut bodies: Vec<Bytes> = cluster
        .take(3)
        .iter()
        .map(|stanza| deliver(stanza).body.clone())
        .collect();
    bodies.sort();
    assert_eq!(bodies, [&b"one"[..], &b"three"[..], &b"two"[..]]);
}

#[test]
fn a_message_handed_back_is_copied_to_its_new_home_s_replica_node() {
    let mut cluster = Cluster::new_nodes_replicated(3, Limits::default(), true);
    let (alice, bob) = (cluster.user_on_node(0, 0), cluster.user_on_node(1, 0));
    assert_eq!(replica_of(bob, 3, 1), 2);
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    // Node 0 stood in for Bob (node 1 and node 2 were away) and hands back a message.
    let handed = Replica {
        user: bob,
        keep: NO_KEEP,
        item: Queued::Message {
            from: alice,
            id: 4242,
            timestamp_ms: 5_000,
            body: Bytes::from_static(b"from the stand-in"),
        },
    };
    let now = cluster.now_ms;
    cluster.routers[1].handle_shard_message(ShardMessage::HandBack(Box::new(handed)), now);
    cluster.run();
    assert_eq!(cluster.routers[1].counters().handed_back, 1);
    assert!(
        cluster.replica_disk.contains_key(&(2, bob, 4242)),
        "node 2, Bob's replica node, has its copy: {:?}",
        cluster.replica_disk.keys()
    );
}

#[test]
fn a_hand_back_its_link_refuses_is_handed_back_again_later() {
    let (mut cluster, alice, bob) = replicated_pair();
    // Node 0 stood in for node 1 and took a message for Bob as his home.
    let item = Queued::Message {
        from: alice,
        id: 999,
        timestamp_ms: 5_000,
        body: Bytes::from_static(b"stood in"),
    };
    let now = cluster.now_ms;
    let copy = Replica {
        user: bob,
        keep: 77,
        item: item.clone(),
    };
    cluster.routers[0].handle_shard_message(ShardMessage::Replica(Box::new(copy)), now);
    cluster.run();
    cluster.routers[0].claim_queue(bob, false);
    assert_eq!(cluster.routers[0].hand_back(bob, now, 10), (1, false));
    assert_eq!(cluster.routers[0].hand_back(bob, now, 10), (0, false));
    // The link to node 1 cannot take it: the message is node 0's own again.
    let refused = Replica {
        user: bob,
        keep: NO_KEEP,
        item,
    };
    cluster.routers[0].handle_unroutable(ShardMessage::HandBack(Box::new(refused)), now);
    assert_eq!(cluster.routers[0].hand_back(bob, now, 10), (1, false));
}

#[test]
fn a_message_for_a_user_of_another_node_is_refused_not_queued() {
    let (mut cluster, alice, bob) = replicated_pair();
    // A Route for Bob reaches node 0 (its sender's view was older): node 0 does not queue it.
    let route = ShardMessage::Route(Envelope {
        from: alice,
        device: alice,
        to: bob,
        conn: ConnRef(1),
        message: MessageRef {
            outbox: outbox_of(1),
            seq: 5,
        },
        resend: false,
        timestamp_ms: 5_000,
        body: Bytes::from_static(b"lost its way"),
    });
    let now = cluster.now_ms;
    cluster.routers[0].handle_shard_message(route, now);
    cluster.run();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::Overloaded, 5)
    );
    assert!(cluster.disk.is_empty() && cluster.replica_disk.is_empty());
    assert_eq!(cluster.routers[0].user_report(bob).queued_messages, 0);
}

#[test]
fn a_resend_of_a_message_kept_by_an_earlier_run_is_copied_before_its_ack() {
    let (mut cluster, _, bob) = replicated_pair();
    let carol = cluster.user_on_node(1, 1);
    cluster.connect(carol, 4);
    cluster.declare(carol, 4, outbox_of(4));
    // Carol's message 3 to Bob, kept on node 1's disk by an earlier run, which may have died
    // before its copy reached node 0.
    let message = MessageRef {
        outbox: outbox_of(4),
        seq: 3,
    };
    let id = cluster.routers[1].message_id(carol, bob, message);
    let item = Queued::Message {
        from: carol,
        id,
        timestamp_ms: 5_000,
        body: Bytes::from_static(b"before the restart"),
    };
    cluster.routers[1].restore_item(bob, &item);
    cluster.disk.insert((bob, id, 0), item);
    cluster.hold_replica_mails = true;
    cluster
        .stanza(carol, 4, send_of(bob, 3, b"before the restart", true))
        .unwrap();
    assert!(
        cluster.take(4).is_empty(),
        "no ServerAck until the copy is on node 0"
    );
    cluster.carry_replica_mails();
    let ack = server_ack(&only(cluster.take(4))).clone();
    assert_eq!((ack.seq, ack.id), (3, id));
    assert_eq!(cluster.replica_disk.len(), 1);
}

#[test]
fn offline_recipient_gets_messages_in_order_on_connect() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(bob, 2);
    cluster.disconnect(bob, 2);
    cluster.connect(alice, 1);
    cluster.send(alice, 1, bob, 1, b"one");
    cluster.send(alice, 1, bob, 2, b"two");
    assert_eq!(
        cluster.take(1).len(),
        2,
        "two ServerAcks while bob is offline"
    );
    cluster.connect(bob, 3);
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
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"hi");
    cluster.take(1);
    cluster.disconnect(alice, 1);
    let delivered = deliver(&only(cluster.take(2))).clone();
    let id = delivered.id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    cluster.stanza(bob, 2, read_of(&delivered)).unwrap();
    assert!(cluster.take(1).is_empty());
    cluster.connect(alice, 4);
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
                id: receipt(&receipts[0]).ack_id().unwrap(),
                kind: delivered,
            }),
        )
        .unwrap();
    cluster.disconnect(alice, 4);
    cluster.connect(alice, 5);
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
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"x");
    let first = deliver(&only(cluster.take(2))).id;
    cluster.disconnect(bob, 2);
    cluster.connect(bob, 3);
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
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
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
    cluster.connect(bob, 3);
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
    cluster.connect(alice, 1);
    cluster.send(alice, 1, stranger, 3, b"anyone?");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::UnknownUser, 3)
    );
    for (seq, to, alias, code) in [
        (4, None, 0, ErrorCode::BadUserId),
        (
            5,
            Some(UserRef { high: 0, low: 1 }),
            0,
            ErrorCode::BadUserId,
        ),
        (6, None, 9, ErrorCode::BadAlias),
        (
            7,
            Some(stranger.into()),
            ALIASES_MAX + 1,
            ErrorCode::BadAlias,
        ),
    ] {
        let send = hop_protocol::wire::Send {
            to,
            seq,
            body: Bytes::new(),
            alias,
            resend: false,
        };
        cluster.stanza(alice, 1, Kind::Send(send)).unwrap();
        assert_eq!(error_code(&only(cluster.take(1))), (code, seq));
    }
}

/// A Send is named by (outbox, seq): one before any Outbox, or with seq 0, has no name and
/// is refused, without closing the connection.
#[test]
fn a_send_needs_an_outbox_and_a_seq() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    let send = |seq| send_of(bob, seq, b"x", false);
    cluster.stanza(alice, 1, send(1)).unwrap();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::BadStanza, 1)
    );
    cluster
        .stanza(
            alice,
            1,
            Kind::Outbox(Outbox {
                id: 5,
                ..Outbox::default()
            }),
        )
        .unwrap();
    cluster.stanza(alice, 1, send(0)).unwrap();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::BadStanza, 0)
    );
    assert!(cluster.take(2).is_empty(), "nothing delivered");
    assert!(
        cluster
            .stanza(
                alice,
                1,
                Kind::Outbox(Outbox {
                    id: 0,
                    ..Outbox::default()
                })
            )
            .is_err(),
        "outbox 0 is a violation"
    );
}

#[test]
fn an_alias_names_its_recipient_for_the_rest_of_the_connection_only() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.declare(alice, 1, 42);
    let send = |to: Option<UserId>, seq, alias| {
        Kind::Send(hop_protocol::wire::Send {
            to: to.map(UserRef::from),
            seq,
            body: Bytes::from_static(b"hi"),
            alias,
            resend: false,
        })
    };
    cluster.stanza(alice, 1, send(Some(bob), 1, 3)).unwrap();
    cluster.stanza(alice, 1, send(None, 2, 3)).unwrap();
    let acks = cluster.take(1);
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(server_ack(&acks[1]).seq, 2);
    assert_eq!(cluster.take(2).len(), 2, "both reached bob");
    // A new connection starts with no alias bound.
    cluster.disconnect(alice, 1);
    cluster.connect(alice, 3);
    cluster.declare(alice, 3, 42);
    cluster.stanza(alice, 3, send(None, 3, 3)).unwrap();
    assert_eq!(error_code(&only(cluster.take(3))), (ErrorCode::BadAlias, 3));
}

#[test]
fn full_queue_refuses_with_an_error_and_affects_no_one_else() {
    let limits = Limits {
        queue_messages_max: 2,
        queue_sender_percent: 100,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    let carol = cluster.user_on(1, 1);
    for (user, conn) in [(bob, 2), (carol, 3)] {
        cluster.connect(user, conn);
        cluster.disconnect(user, conn);
    }
    cluster.connect(alice, 1);
    for seq in 1..=3 {
        cluster.send(alice, 1, bob, seq, b"m");
    }
    acked_then_refused(&cluster.take(1), 2, ErrorCode::QueueFull, 3);
    cluster.send(alice, 1, carol, 4, b"m");
    assert!(matches!(
        only(cluster.take(1)).kind,
        Some(Kind::ServerAck(_))
    ));
}

#[test]
fn a_device_over_its_rate_is_refused_alone_and_again_served_once_its_bucket_refills() {
    use crate::quota::Rate;
    let limits = Limits {
        sender_messages: Rate {
            per_second: 10,
            burst: 3,
        },
        sender_reads: Rate {
            per_second: 1,
            burst: 1,
        },
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    let carol = cluster.user_on(0, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.connect(carol, 3);
    for seq in 1..=4 {
        cluster.send(alice, 1, bob, seq, b"m");
    }
    let reason = acked_then_refused(&cluster.take(1), 3, ErrorCode::RateLimited, 4);
    assert!(reason.contains("try again in 100 ms"), "{reason}");
    // Another sender on the same shard is not affected.
    cluster.send(carol, 3, bob, 1, b"c");
    assert!(matches!(
        only(cluster.take(3)).kind,
        Some(Kind::ServerAck(_))
    ));
    // Reconnecting does not fill the bucket; time does.
    cluster.disconnect(alice, 1);
    cluster.connect(alice, 4);
    cluster.send(alice, 4, bob, 5, b"m");
    assert_eq!(
        error_code(&only(cluster.take(4))),
        (ErrorCode::RateLimited, 5)
    );
    cluster.now_ms += 100;
    cluster.send(alice, 4, bob, 5, b"m");
    assert!(matches!(
        only(cluster.take(4)).kind,
        Some(Kind::ServerAck(_))
    ));
    // Reads have their own bucket.
    let delivered: Vec<Deliver> = cluster
        .take(2)
        .iter()
        .filter_map(|stanza| match &stanza.kind {
            Some(Kind::Deliver(deliver)) => Some(deliver.clone()),
            _ => None,
        })
        .collect();
    assert!(delivered.len() >= 2);
    cluster.stanza(bob, 2, read_of(&delivered[0])).unwrap();
    assert!(cluster.take(2).is_empty());
    cluster.stanza(bob, 2, read_of(&delivered[1])).unwrap();
    assert_eq!(error_code(&only(cluster.take(2))).0, ErrorCode::RateLimited);
    assert_eq!(cluster.routers[1].counters().rate_limited, 1);
    assert_eq!(cluster.routers[0].counters().rate_limited, 2);
}

#[test]
fn one_sender_takes_at_most_its_share_of_a_queue_and_of_the_shard() {
    let limits = Limits {
        queue_messages_max: 8,
        queue_sender_percent: 25,
        shard_queue_bytes_max: 100,
        shard_queue_sender_percent: 10,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(1, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    let carol = cluster.user_on(0, 2);
    let dave = cluster.user_on(0, 3);
    cluster.connect(carol, 3);
    cluster.disconnect(carol, 3);
    cluster.connect(dave, 4);
    cluster.connect(bob, 2);
    cluster.connect(alice, 1);
    // Bob reads nothing: Alice's third message to him is past her quarter of his queue.
    for seq in 1..=3 {
        cluster.send(alice, 1, bob, seq, b"m");
    }
    let reason = acked_then_refused(&cluster.take(1), 2, ErrorCode::QueueFull, 3);
    assert_eq!(reason, SHARE_TAKEN);
    assert_eq!(cluster.routers[0].counters().shares_refused, 1);
    // Dave still reaches Bob.
    cluster.send(dave, 4, bob, 1, b"d");
    assert!(matches!(
        only(cluster.take(4)).kind,
        Some(Kind::ServerAck(_))
    ));
    // Once Bob takes one of Alice's, she may send one more.
    let first = cluster
        .take(2)
        .into_iter()
        .find_map(|stanza| match stanza.kind {
            Some(Kind::Deliver(deliver)) if deliver.body.as_ref() == b"m" => Some(deliver.id),
            _ => None,
        })
        .unwrap();
    cluster
        .stanza(
            bob,
            2,
            Kind::Ack(Ack {
                id: first,
                kind: ReceiptKind::Unspecified as i32,
            }),
        )
        .unwrap();
    cluster.send(alice, 1, bob, 4, b"m");
    assert!(cluster
        .take(1)
        .iter()
        .any(|reply| matches!(&reply.kind, Some(Kind::ServerAck(ack)) if ack.seq == 4)));
    // The shard: 10 bytes of Alice's at most, over every queue (Bob holds 2 of hers now).
    cluster.send(alice, 1, carol, 5, b"123456789");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::QueueFull, 5)
    );
    cluster.send(alice, 1, carol, 6, b"12345678");
    assert!(matches!(
        only(cluster.take(1)).kind,
        Some(Kind::ServerAck(_))
    ));
    cluster.send(alice, 1, carol, 7, b"1");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::QueueFull, 7)
    );
    cluster.send(dave, 4, carol, 2, b"12345678");
    assert!(matches!(
        only(cluster.take(4)).kind,
        Some(Kind::ServerAck(_))
    ));
}

#[test]
fn shard_wide_byte_limit_holds() {
    let limits = Limits {
        shard_queue_bytes_max: 10,
        shard_queue_sender_percent: 100,
        ..Limits::default()
    };
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(limits);
    cluster.send(alice, 1, bob, 1, b"123456");
    cluster.send(alice, 1, bob, 2, b"123456");
    acked_then_refused(&cluster.take(1), 1, ErrorCode::QueueFull, 2);
}

fn presence(stanza: Stanza) -> Presence {
    match stanza.kind {
        Some(Kind::Presence(presence)) => presence,
        other => panic!("expected Presence, got {other:?}"),
    }
}

fn subscribe(user: UserId) -> Kind {
    Kind::Subscribe(Subscribe {
        user: Some(user.into()),
    })
}

#[test]
fn presence_is_told_on_subscribe_and_on_every_change() {
    let mut cluster = Cluster::new(2, Limits::default());
    let watcher = cluster.user_on(0, 0);
    let watched = cluster.user_on(1, 0);
    cluster.connect(watched, 2);
    cluster.connect(watcher, 1);
    cluster.stanza(watcher, 1, subscribe(watched)).unwrap();
    let now = presence(only(cluster.take(1)));
    assert!(now.online && now.user == Some(watched.into()));
    cluster.now_ms = 9_000_123;
    cluster.disconnect(watched, 2);
    let gone = presence(only(cluster.take(1)));
    assert!(!gone.online);
    assert_eq!(gone.last_seen_ms, 9_000_000, "rounded down to the minute");
    cluster.connect(watched, 3);
    assert!(presence(only(cluster.take(1))).online);
    // A watcher that disconnects stops watching.
    cluster.disconnect(watcher, 1);
    cluster.connect(watcher, 4);
    cluster.disconnect(watched, 3);
    assert!(cluster.take(4).is_empty());
}

/// Guards against the watcher leak: a connection replaced by a newer one of the same user
/// used to keep its place in its targets' watcher lists for good, so that stale watchers
/// filled `subscribers_max`.
#[test]
fn a_replaced_connection_stops_watching_at_its_targets() {
    let limits = Limits {
        subscribers_max: 1,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let watcher = cluster.user_on(0, 0);
    let other = cluster.user_on(0, 1);
    let watched = cluster.user_on(1, 0);
    cluster.connect(watched, 2);
    cluster.connect(watcher, 1);
    cluster.stanza(watcher, 1, subscribe(watched)).unwrap();
    assert!(presence(only(cluster.take(1))).online);
    cluster.connect(watcher, 3); // replaces connection 1
    assert!(cluster.routers[1].users[&watched].subscribers().is_empty());
    // The slot is free for someone else.
    cluster.connect(other, 4);
    cluster.stanza(other, 4, subscribe(watched)).unwrap();
    assert!(presence(only(cluster.take(4))).online);
    // And the replaced connection hears nothing more.
    cluster.disconnect(watched, 2);
    assert!(cluster.take(1).is_empty() && cluster.take(3).is_empty());
}

#[test]
fn second_connection_replaces_the_first() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1);
    cluster.connect(alice, 2);
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
fn a_user_is_bound_at_its_first_connection_only() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1);
    cluster.disconnect(alice, 1);
    cluster.connect(alice, 2);
    assert_eq!(cluster.persisted, [alice]);
    let mut restored = Router::new(0, 1, Limits::default(), secrets());
    restored.restore_binding(alice, alice);
    restored.handle_connect(alice, &key_of(alice), ConnRef(3), 0);
    assert!(
        !restored
            .take_actions()
            .iter()
            .any(|action| matches!(action, Action::PersistBinding { .. })),
        "a restored binding is not written again"
    );
}

#[test]
fn server_only_stanzas_from_a_client_are_violations() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1);
    let forged = Kind::Deliver(Deliver {
        from: Some(alice.into()),
        id: 1,
        timestamp_ms: 0,
        body: Bytes::new(),
        proof: 0,
        to: None,
        group: None,
        event: None,
    });
    assert!(cluster.stanza(alice, 1, forged).is_err());
    let shard = usize::from(home_shard(alice, 1));
    assert!(cluster.routers[shard]
        .handle_stanza(alice, ConnRef(1), Stanza { kind: None }, 0)
        .is_err());
}

#[test]
fn message_ids_name_one_message_of_one_sender_to_one_recipient() {
    let router = Router::new(0, 1, Limits::default(), secrets());
    let (alice, bob, carol) = (
        UserId::from_public_key(&[1; 32]),
        UserId::from_public_key(&[2; 32]),
        UserId::from_public_key(&[3; 32]),
    );
    let message = MessageRef { outbox: 9, seq: 1 };
    let id = router.message_id(alice, bob, message);
    assert_eq!(id, router.message_id(alice, bob, message), "every copy");
    let others = [
        router.message_id(bob, alice, message),
        router.message_id(alice, carol, message),
        router.message_id(alice, bob, MessageRef { outbox: 9, seq: 2 }),
        router.message_id(alice, bob, MessageRef { outbox: 8, seq: 1 }),
        Router::new(0, 1, Limits::default(), Secrets::derive(&[5; 32]))
            .message_id(alice, bob, message),
    ];
    assert!(others.iter().all(|other| *other != id), "{others:?}");
    // Every shard of a server makes the same id: re-homing keeps resends recognisable.
    assert_eq!(
        Router::new(3, 4, Limits::default(), secrets()).message_id(alice, bob, message),
        id
    );
}

#[test]
fn home_shards_spread_users() {
    let mut counts = [0usize; 4];
    for seed in 0..4_000u32 {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&seed.to_le_bytes());
        counts[usize::from(home_shard(UserId::from_public_key(&key), 4))] += 1;
    }
    assert!(counts.iter().all(|count| *count > 800), "{counts:?}");
}

/// Guards against the lost-ack bug of the first contract: a ServerAck went to whatever
/// connection its sender had when it was released, and clients numbered messages from 1 on
/// every connection, so connection 1's ack arrived on connection 2 and was taken as the ack of
/// connection 2's own message, still in its batch and lost in a crash.
#[test]
fn a_replaced_connection_does_not_hear_the_ack_of_the_connection_before_it() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient_on(2, Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 1, b"from connection 1");
    cluster.connect(alice, 3); // replaces connection 1 before the disk answered
    cluster.send(alice, 3, bob, 1, b"from connection 3");
    cluster.keep_all();
    assert!(cluster.take(1).is_empty(), "connection 1 is gone");
    let ack = only(cluster.take(3));
    assert_eq!(
        (server_ack(&ack).outbox, server_ack(&ack).seq),
        (outbox_of(3), 1),
        "connection 3 hears only its own message's ack"
    );
    let replies_dropped: u64 = cluster
        .routers
        .iter()
        .map(|router| router.counters().replies_dropped)
        .sum();
    assert_eq!(replies_dropped, 1);
    // Both messages were taken; each is delivered once.
    cluster.connect(bob, 4);
    assert_eq!(cluster.take(4).len(), 2);
}

/// A client that lost its connection before the ServerAck sends the message again with the
/// same (outbox, seq): it gets the original's ack (same id, same time) and the recipient
/// gets the message once.
#[test]
fn a_resend_of_a_queued_message_gets_the_original_ack_and_is_queued_once() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient_on(2, Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 1, b"once");
    assert!(cluster.take(1).is_empty(), "not durable yet");
    // Reconnect, same outbox, send again while the original still waits for the disk.
    cluster.connect(alice, 2);
    cluster.declare(alice, 2, outbox_of(1));
    cluster.now_ms += 5;
    let again = |cluster: &mut Cluster, conn| {
        let send = hop_protocol::wire::Send {
            to: Some(bob.into()),
            seq: 1,
            body: Bytes::from_static(b"once"),
            alias: 0,
            resend: true,
        };
        cluster.stanza(alice, conn, Kind::Send(send)).unwrap();
    };
    again(&mut cluster, 2);
    assert!(
        cluster.take(2).is_empty(),
        "the resend waits for the original's disk"
    );
    assert_eq!(cluster.unkept.len(), 1, "queued once");
    cluster.keep_all();
    let first = server_ack(&only(cluster.take(2))).clone();
    assert_eq!((first.outbox, first.seq), (outbox_of(1), 1));
    // Once durable, a resend is answered at once with the same id and time.
    cluster.connect(alice, 3);
    cluster.declare(alice, 3, outbox_of(1));
    again(&mut cluster, 3);
    assert_eq!(server_ack(&only(cluster.take(3))), &first);
    let deduplicated: u64 = cluster
        .routers
        .iter()
        .map(|router| router.counters().messages_deduplicated)
        .sum();
    assert_eq!(deduplicated, 2);
    cluster.connect(bob, 4);
    let delivered = only(cluster.take(4));
    assert_eq!(deliver(&delivered).id, first.id);
}

/// After the recipient acked the original, the server no longer holds it: a resend is
/// delivered again, with the same id, so that the recipient's client drops it.
#[test]
fn a_resend_after_delivery_carries_the_same_id() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"twice?");
    let first = deliver(&only(cluster.take(2))).clone();
    cluster
        .stanza(
            bob,
            2,
            Kind::Ack(Ack {
                id: first.id,
                kind: 0,
            }),
        )
        .unwrap();
    cluster.take(1);
    cluster.connect(alice, 3);
    cluster.declare(alice, 3, outbox_of(1));
    let send = hop_protocol::wire::Send {
        to: Some(bob.into()),
        seq: 1,
        body: Bytes::from_static(b"twice?"),
        alias: 0,
        resend: true,
    };
    cluster.stanza(alice, 3, Kind::Send(send)).unwrap();
    let ack = cluster
        .take(3)
        .into_iter()
        .find(|stanza| matches!(stanza.kind, Some(Kind::ServerAck(_))))
        .expect("a ServerAck for the resend");
    assert_eq!(server_ack(&ack).id, first.id);
    assert_eq!(deliver(&only(cluster.take(2))).id, first.id);
}

/// Guards against forged read receipts: any user could send `Read{from, id}` naming any
/// message, make its sender see blue ticks "by" a third user, and fill the sender's queue.
#[test]
fn a_read_without_the_deliver_proof_is_refused() {
    let mut cluster = Cluster::new(2, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    let mallory = cluster.user_on(1, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.connect(mallory, 3);
    cluster.send(alice, 1, bob, 1, b"for bob");
    cluster.take(1);
    let delivered = deliver(&only(cluster.take(2))).clone();
    // Mallory knows the id (say bob showed it) and even bob's proof: neither is hers.
    for proof in [0, delivered.proof, delivered.proof ^ 1] {
        let forged = Kind::Read(Read {
            from: delivered.from,
            id: delivered.id,
            proof,
        });
        cluster.stanza(mallory, 3, forged).unwrap();
        assert_eq!(
            error_code(&only(cluster.take(3))),
            (ErrorCode::BadReceipt, 0)
        );
    }
    // Bob with a wrong proof is refused too; with the Deliver's, it counts.
    let mut wrong = delivered.clone();
    wrong.proof ^= 1;
    cluster.stanza(bob, 2, read_of(&wrong)).unwrap();
    assert_eq!(
        error_code(&only(cluster.take(2))),
        (ErrorCode::BadReceipt, 0)
    );
    assert!(cluster.take(1).is_empty(), "alice saw no forged tick");
    cluster.stanza(bob, 2, read_of(&delivered)).unwrap();
    let blue = only(cluster.take(1));
    assert_eq!(
        (receipt(&blue).kind, receipt(&blue).by),
        (ReceiptKind::Read as i32, Some(bob.into()))
    );
    let refused: u64 = cluster
        .routers
        .iter()
        .map(|router| router.counters().reads_refused)
        .sum();
    assert_eq!(refused, 4);
}

/// Guards against receipts filling a user's queue: receipts counted against the message
/// quota once let 10,000 Reads lock a user's inbox with QUEUE_FULL for up to 30 days.
#[test]
fn receipts_cannot_fill_the_room_of_messages() {
    let limits = Limits {
        queue_messages_max: 2,
        queue_receipts_max: 3,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    let carol = cluster.user_on(1, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    // Five messages, each acked and read twice by bob, while alice acks nothing: fifteen
    // receipts for alice.
    for seq in 1..=5 {
        cluster.send(alice, 1, bob, seq, b"read me");
        let delivered = deliver(&only(cluster.take(2))).clone();
        cluster
            .stanza(
                bob,
                2,
                Kind::Ack(Ack {
                    id: delivered.id,
                    kind: 0,
                }),
            )
            .unwrap();
        cluster.stanza(bob, 2, read_of(&delivered)).unwrap();
        cluster.stanza(bob, 2, read_of(&delivered)).unwrap();
    }
    let alice_shard = &cluster.routers[0];
    assert_eq!(
        alice_shard.users[&alice].queued_receipts(),
        3,
        "at the receipt quota"
    );
    // Queued: delivered 1, read 1, delivered 2. The second read of message 1 is a twin;
    // the other eleven meet the quota.
    assert_eq!(alice_shard.counters().receipts_duplicate, 1);
    assert_eq!(alice_shard.counters().receipts_dropped, 11);
    // Messages for alice still go in, up to their own quota.
    cluster.connect(carol, 3);
    cluster.send(carol, 3, alice, 1, b"still room");
    assert!(matches!(
        only(cluster.take(3)).kind,
        Some(Kind::ServerAck(_))
    ));
}

#[test]
fn a_repeated_read_queues_one_receipt() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"hi");
    cluster.disconnect(alice, 1);
    let delivered = deliver(&only(cluster.take(2))).clone();
    for _ in 0..5 {
        cluster.stanza(bob, 2, read_of(&delivered)).unwrap();
    }
    assert_eq!(cluster.routers[0].counters().receipts_duplicate, 4);
    cluster.connect(alice, 3);
    let pushed = cluster.take(3);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
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
    // Even seeds: the disk is slow (kept only now and then) and every connection asks for the
    // second tick in the ServerAck, so that acks race the disk and ticks are folded.
    let folding = seed.is_multiple_of(2);
    cluster.keep_at_once = !folding;
    let users: Vec<UserId> = (0..USERS)
        .map(|n| cluster.user_on((n % 3) as ShardId, n / 3))
        .collect();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut next_conn = 100u64;
    // Per user: its current connection, if online.
    let mut online: HashMap<UserId, u64> = HashMap::new();
    for user in &users {
        cluster.connect(*user, next_conn);
        cluster.disconnect(*user, next_conn);
        next_conn += 1;
    }
    let mut accepted: HashMap<u64, (UserId, UserId)> = HashMap::new(); // id -> (from, to)
    let mut acked: BTreeSetU64 = BTreeSetU64::default();
    let mut delivered_to: HashMap<u64, usize> = HashMap::new();
    let mut receipts: HashMap<u64, usize> = HashMap::new();
    // ServerAcks that carried the second tick.
    let folded = std::cell::Cell::new(0usize);
    // (id, the Deliver for a message; None for a receipt)
    let mut unacked: HashMap<UserId, Vec<(u64, Option<Deliver>)>> = HashMap::new();
    let mut sent = 0u64;

    let absorb = |cluster: &mut Cluster,
                  online: &HashMap<UserId, u64>,
                  accepted: &mut HashMap<u64, (UserId, UserId)>,
                  acked: &BTreeSetU64,
                  delivered_to: &mut HashMap<u64, usize>,
                  receipts: &mut HashMap<u64, usize>,
                  unacked: &mut HashMap<UserId, Vec<(u64, Option<Deliver>)>>,
                  pending_sends: &mut HashMap<(UserId, u64), UserId>| {
        for (user, conn) in online {
            for stanza in cluster.take(*conn) {
                match stanza.kind {
                    Some(Kind::ServerAck(ack)) => {
                        let to = pending_sends
                            .remove(&(*user, ack.seq))
                            .expect("one reply per Send");
                        accepted.insert(ack.id, (*user, to));
                        if ack.delivered_ms != 0 {
                            *receipts.entry(ack.id).or_default() += 1;
                            folded.set(folded.get() + 1);
                        }
                    }
                    Some(Kind::Error(error)) => {
                        panic!("seed {seed}: unexpected error {error:?}");
                    }
                    Some(Kind::Deliver(deliver)) => {
                        assert!(
                            !acked.0.contains(&deliver.id),
                            "seed {seed}: delivered after ack"
                        );
                        let sender = UserRef::user(deliver.from.as_ref()).unwrap();
                        let (from, to) = accepted
                            .get(&deliver.id)
                            .copied()
                            .unwrap_or((sender, *user));
                        assert_eq!((sender, to), (from, *user), "seed {seed}: wrong from/to");
                        *delivered_to.entry(deliver.id).or_default() += 1;
                        unacked
                            .entry(*user)
                            .or_default()
                            .push((deliver.id, Some(deliver)));
                    }
                    Some(Kind::Receipt(receipt)) => {
                        if receipt.kind == ReceiptKind::Delivered as i32 {
                            let (from, _) = accepted[&receipt.id];
                            assert_eq!(from, *user, "seed {seed}: receipt to the wrong user");
                        }
                        let ack_id = receipt.ack_id().expect("receipts name who made them");
                        unacked.entry(*user).or_default().push((ack_id, None));
                        if receipt.kind == ReceiptKind::Delivered as i32 {
                            *receipts.entry(receipt.id).or_default() += 1;
                        }
                    }
                    other => panic!("seed {seed}: unexpected {other:?}"),
                }
            }
        }
    };
    let mut pending_sends: HashMap<(UserId, u64), UserId> = HashMap::new();

    for _ in 0..STEPS {
        let user = users[rng.below(USERS) as usize];
        match rng.below(10) {
            0 | 1 => {
                // A slow disk: a connection with a Send still unanswered stays (the client
                // would send it again on the next; the unit tests cover that).
                let waits = pending_sends.keys().any(|(sender, _)| *sender == user);
                if let Some(conn) = online.get(&user).copied() {
                    if !waits {
                        online.remove(&user);
                        cluster.disconnect(user, conn);
                        unacked.remove(&user); // the device forgets what it did not ack
                    }
                } else {
                    next_conn += 1;
                    cluster.connect(user, next_conn);
                    online.insert(user, next_conn);
                    if folding {
                        cluster.declare_delivered_in_ack(user, next_conn);
                    }
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
                        let (id, delivered) = items.remove(0);
                        if let Some(delivered) = delivered {
                            acked.0.insert(id);
                            cluster
                                .stanza(user, conn, Kind::Ack(Ack { id, kind: 0 }))
                                .unwrap();
                            cluster.stanza(user, conn, read_of(&delivered)).unwrap();
                        } else {
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
                        }
                    }
                }
            }
        }
        // On a slow disk, Sends are answered by their recipient's Ack or the next keep.
        let kept = !folding || rng.below(16) == 0;
        if folding && kept {
            cluster.keep_all();
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
        if !kept {
            continue;
        }
        assert!(
            pending_sends.is_empty(),
            "seed {seed}: a Send without a reply"
        );
    }
    cluster.keep_all();
    // Drain: everyone online, ack everything until quiet.
    for user in &users {
        if !online.contains_key(user) {
            next_conn += 1;
            cluster.connect(*user, next_conn);
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
        let (id, delivered) = unacked.get_mut(&user).unwrap().remove(0);
        if delivered.is_none() {
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
    assert_eq!(
        folded.get() > 0,
        folding,
        "seed {seed}: folded {}",
        folded.get()
    );
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
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"fast");
    let id = deliver(&only(cluster.take(2))).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    let ticks = cluster.take(1);
    assert_eq!(
        server_ack(&ticks[0]).delivered_ms,
        0,
        "not asked for: {ticks:?}"
    );
    assert_eq!(receipt(&ticks[1]).kind, ReceiptKind::Delivered as i32);
    assert_eq!(cluster.forgotten, [(bob, id, ReceiptKind::Unspecified)]);
    cluster.keep_all();
    assert!(
        cluster.take(1).is_empty(),
        "no second ServerAck when the disk catches up"
    );
}

/// Alice (connection 1, asking for the second tick in the ServerAck) and Bob (connection 2),
/// both online on the given shards of two; the disk keeps only when told (`keep_all`) unless
/// `keep_at_once`.
fn pair_asking_for_delivered_in_ack(
    alice_shard: ShardId,
    bob_shard: ShardId,
    keep_at_once: bool,
) -> (Cluster, UserId, UserId) {
    let mut cluster = Cluster::new(2, Limits::default());
    cluster.keep_at_once = keep_at_once;
    let alice = cluster.user_on(alice_shard, 0);
    let bob = cluster.user_on(bob_shard, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.declare_delivered_in_ack(alice, 1);
    (cluster, alice, bob)
}

#[test]
fn a_device_ack_before_the_disk_brings_both_ticks_in_one_server_ack_when_asked() {
    for (sender_shard, recipient_shard) in [(0, 0), (0, 1), (1, 0)] {
        let (mut cluster, alice, bob) =
            pair_asking_for_delivered_in_ack(sender_shard, recipient_shard, false);
        cluster.send(alice, 1, bob, 1, b"fast");
        let delivered = only(cluster.take(2));
        let message = deliver(&delivered);
        cluster.now_ms += 3;
        let id = message.id;
        cluster
            .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
            .unwrap();
        let ack = only(cluster.take(1));
        let ack = server_ack(&ack);
        assert_eq!((ack.seq, ack.id), (1, message.id));
        assert_eq!(ack.delivered_ms, cluster.now_ms);
        // No receipt is queued for Alice, nor kept: nothing more reaches her.
        let counters = |cluster: &Cluster| {
            (cluster.routers.iter())
                .map(|router| router.counters().receipts_queued)
                .sum::<u64>()
        };
        assert_eq!(counters(&cluster), 0);
        cluster.keep_all();
        assert!(cluster.take(1).is_empty());
        // The blue tick is a Receipt as before.
        cluster.stanza(bob, 2, read_of(message)).unwrap();
        assert_eq!(
            receipt(&only(cluster.take(1))).kind,
            ReceiptKind::Read as i32
        );
    }
}

#[test]
fn a_second_tick_that_cannot_ride_in_the_server_ack_comes_as_a_receipt() {
    use device_change::Op;
    // The message was durable first: its ServerAck has left with one tick.
    let (mut cluster, alice, bob) = pair_asking_for_delivered_in_ack(0, 1, true);
    cluster.send(alice, 1, bob, 1, b"kept first");
    assert_eq!(server_ack(&only(cluster.take(1))).delivered_ms, 0);
    let id = deliver(&only(cluster.take(2))).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    assert_eq!(
        receipt(&only(cluster.take(1))).kind,
        ReceiptKind::Delivered as i32
    );

    // Alice's connection was replaced before Bob's Ack: the ServerAck is dropped (she sends
    // again) but the second tick is queued for her, not lost.
    let (mut cluster, alice, bob) = pair_asking_for_delivered_in_ack(0, 1, false);
    cluster.send(alice, 1, bob, 1, b"then gone");
    let id = deliver(&only(cluster.take(2))).id;
    cluster.connect(alice, 3);
    cluster.take(1);
    cluster.declare_delivered_in_ack(alice, 3);
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    let tick = only(cluster.take(3));
    assert_eq!(receipt(&tick).kind, ReceiptKind::Delivered as i32);
    assert_eq!(receipt(&tick).id, id);
    assert_eq!(cluster.routers[0].counters().replies_dropped, 1);

    // An account with a companion device: the companion needs the Receipt, so the primary
    // gets it too, after a ServerAck of one tick.
    let (mut cluster, alice, bob) = pair_asking_for_delivered_in_ack(0, 1, false);
    let phone = cluster.user_on(0, 2);
    cluster
        .stanza(alice, 1, device_change(Op::Add, Some(phone)))
        .unwrap();
    cluster.take(1);
    cluster.send(alice, 1, bob, 1, b"two devices");
    let id = deliver(&only(cluster.take(2))).id;
    cluster
        .stanza(bob, 2, Kind::Ack(Ack { id, kind: 0 }))
        .unwrap();
    let ticks = cluster.take(1);
    assert_eq!(ticks.len(), 2, "{ticks:?}");
    assert_eq!(server_ack(&ticks[0]).delivered_ms, 0);
    assert_eq!(receipt(&ticks[1]).id, id);
    assert_eq!(cluster.routers[0].counters().receipts_queued, 2);
}

#[test]
fn an_item_that_cannot_be_kept_is_refused_and_leaves_the_queue() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.keep_at_once = false;
    cluster.send(alice, 1, bob, 9, b"disk full");
    cluster.refuse_last_keep();
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::Overloaded, 9)
    );
    cluster.connect(bob, 3);
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
    cluster.routers[0].restore_binding(bob, bob);
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
    // A user whose binding did not reach the disk is made from its items, and bound again
    // when it connects: nothing it was acked is dropped.
    assert_eq!(cluster.routers[0].counters().users_restored_from_queue, 1);
    cluster.connect(bob, 2);
    let pushed = cluster.take(2);
    assert_eq!(deliver(&pushed[0]).id, 77);
    assert_eq!(receipt(&pushed[1]).id, 78);
    cluster.connect(stranger, 3);
    assert_eq!(receipt(&only(cluster.take(3))).id, 1);
    assert_eq!(
        cluster.persisted,
        [stranger],
        "bob's binding was on disk already"
    );
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
    cluster.connect(bob, 3);
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
    cluster.connect(bob, 3);
    let pushed = only(cluster.take(3));
    let delivered = deliver(&pushed);
    assert_eq!(delivered.body.as_ref(), b"on disk");
    assert_eq!(delivered.from, Some(alice.into()));
}

#[test]
fn an_online_delivery_uses_the_body_in_memory_and_a_redelivery_the_disk() {
    let mut cluster = Cluster::new(1, Limits::default());
    cluster.keep_at_once = false;
    let alice = cluster.user_on(0, 0);
    let bob = cluster.user_on(0, 1);
    cluster.connect(alice, 1);
    cluster.connect(bob, 2);
    cluster.send(alice, 1, bob, 1, b"fresh");
    let first = only(cluster.take(2));
    assert_eq!(deliver(&first).body.as_ref(), b"fresh");
    // Bob drops the connection before acking; the message is kept meanwhile.
    cluster.disconnect(bob, 2);
    cluster.keep_all();
    assert_eq!(cluster.routers[0].bodies_in_memory(), 0);
    cluster.connect(bob, 3);
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
    cluster.connect(bob, 3);
    let pushed = only(cluster.take(3));
    assert_eq!(deliver(&pushed).body.as_ref(), b"fine");
    assert_eq!(cluster.routers[0].counters().items_unreadable, 1);
}

#[test]
fn an_emptied_queue_is_freed_at_the_next_sweep_not_at_once() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.connect(bob, 3);
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
    router.release_empty(0);
    assert!(
        router.users[&bob].extra.is_none(),
        "an idle user is its 32 bytes"
    );
    router.release_empty(0); // nothing listed twice
}

fn privacy_settings(visibility: Visibility, contacts: &[UserId]) -> Kind {
    Kind::PresenceSettings(PresenceSettings {
        visibility: visibility as i32,
        contacts: contacts.iter().map(|user| UserRef::from(*user)).collect(),
    })
}

/// Guards against the presence leaks of the first contract: anyone could watch anyone, to the
/// millisecond, and an unknown id answered differently from a hidden one.
#[test]
fn presence_is_shown_only_as_its_user_allows_and_hidden_looks_like_unknown() {
    let mut cluster = Cluster::new(2, Limits::default());
    let watched = cluster.user_on(1, 0);
    let friend = cluster.user_on(0, 0);
    let stranger = cluster.user_on(0, 1);
    let nobody_there = cluster.user_on(1, 9); // never connected
    cluster.connect(watched, 1);
    cluster.connect(friend, 2);
    cluster.connect(stranger, 3);
    cluster
        .stanza(
            watched,
            1,
            privacy_settings(Visibility::Contacts, &[friend]),
        )
        .unwrap();
    assert!(matches!(
        cluster.take(1).as_slice(),
        [] // settings are not answered
    ));
    let persisted = cluster.routers[1]
        .users
        .get(&watched)
        .map(|state| state.privacy().clone());
    assert_eq!(
        persisted,
        Some(Privacy {
            visibility: Visibility::Contacts,
            contacts: vec![friend]
        })
    );
    cluster.stanza(friend, 2, subscribe(watched)).unwrap();
    assert!(presence(only(cluster.take(2))).online, "a contact sees it");
    cluster.stanza(stranger, 3, subscribe(watched)).unwrap();
    let hidden = presence(only(cluster.take(3)));
    cluster
        .stanza(stranger, 3, subscribe(nobody_there))
        .unwrap();
    let unknown = presence(only(cluster.take(3)));
    assert_eq!(
        (hidden.online, hidden.last_seen_ms),
        (unknown.online, unknown.last_seen_ms),
        "hidden and unknown answer alike"
    );
    assert!(!hidden.online && hidden.last_seen_ms == 0);
    // The stranger took no watcher slot and hears nothing of changes.
    assert_eq!(cluster.routers[1].users[&watched].subscribers(), [friend]);
    cluster.now_ms = 7_200_500;
    cluster.disconnect(watched, 1);
    assert!(cluster.take(3).is_empty(), "the stranger hears nothing");
    assert_eq!(presence(only(cluster.take(2))).last_seen_ms, 7_200_000);
    // Hiding from everyone tells the remaining watchers "offline" and drops them.
    cluster.connect(watched, 4);
    assert!(presence(only(cluster.take(2))).online);
    cluster
        .stanza(watched, 4, privacy_settings(Visibility::Nobody, &[]))
        .unwrap();
    let gone = presence(only(cluster.take(2)));
    assert!(!gone.online && gone.last_seen_ms == 0);
    assert!(cluster.routers[1].users[&watched].subscribers().is_empty());
}

/// WhatsApp's reciprocity: who hides its last-seen time from someone does not see theirs.
#[test]
fn a_watcher_that_hides_its_presence_sees_no_last_seen_time() {
    let mut cluster = Cluster::new(1, Limits::default());
    let watched = cluster.user_on(0, 0);
    let watcher = cluster.user_on(0, 1);
    cluster.connect(watched, 1);
    cluster.connect(watcher, 2);
    cluster
        .stanza(watcher, 2, privacy_settings(Visibility::Nobody, &[]))
        .unwrap();
    cluster.stanza(watcher, 2, subscribe(watched)).unwrap();
    assert!(
        presence(only(cluster.take(2))).online,
        "online is still shown"
    );
    cluster.now_ms = 600_000;
    cluster.disconnect(watched, 1);
    let gone = presence(only(cluster.take(2)));
    assert_eq!((gone.online, gone.last_seen_ms), (false, 0));
}

#[test]
fn bad_presence_settings_get_errors() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    cluster.connect(alice, 1);
    let too_many: Vec<UserId> = (1..=CONTACTS_MAX as u64 + 1)
        .map(|n| UserId::from_halves(n, n).unwrap())
        .collect();
    cluster
        .stanza(alice, 1, privacy_settings(Visibility::Contacts, &too_many))
        .unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::Limit);
    let bad = Kind::PresenceSettings(PresenceSettings {
        visibility: 99,
        contacts: Vec::new(),
    });
    cluster.stanza(alice, 1, bad).unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::BadStanza);
    let invalid = Kind::PresenceSettings(PresenceSettings {
        visibility: Visibility::Contacts as i32,
        contacts: vec![UserRef { high: 0, low: 3 }],
    });
    cluster.stanza(alice, 1, invalid).unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::BadUserId);
    assert!(
        !cluster.persisted_privacy,
        "nothing persisted for refused settings"
    );
}

/// A resend the client did not mark as one is not looked for: it is queued again under the
/// same id, and the recipient's client drops the copy by (from, id). Nothing is lost.
#[test]
fn an_unmarked_resend_is_queued_again_under_the_same_id() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.send(alice, 1, bob, 1, b"once?");
    let first = server_ack(&only(cluster.take(1))).clone();
    cluster.connect(alice, 2);
    cluster.declare(alice, 2, outbox_of(1));
    cluster.send(alice, 2, bob, 1, b"once?");
    assert_eq!(server_ack(&only(cluster.take(2))).id, first.id);
    cluster.connect(bob, 3);
    let ids: Vec<u64> = cluster.take(3).iter().map(|s| deliver(s).id).collect();
    assert_eq!(ids, [first.id, first.id]);
}

#[test]
fn an_operator_sees_a_users_queue_and_kicks_its_connection() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.send(alice, 1, bob, 1, b"one");
    cluster.send(alice, 1, bob, 2, b"two");
    let router = &cluster.routers[0];
    let report = router.user_report(bob);
    assert!(report.known && !report.online);
    assert_eq!(report.queued_messages, 2);
    assert_eq!(report.queued_bytes, 6);
    assert!(report.last_seen_ms > 0);
    let report = router.user_report(alice);
    assert!(report.online && report.queued_messages == 0);
    assert_eq!(router.queued(), (2, 6));
    let stranger = cluster.user_on(0, 7);
    assert_eq!(router.user_report(stranger), UserReport::default());

    assert!(!cluster.routers[0].handle_kick(bob), "bob is offline");
    assert!(cluster.routers[0].handle_kick(alice));
    cluster.run();
    assert_eq!(cluster.closed, vec![(ConnRef(1), GoAwayReason::Kicked)]);
    cluster.disconnect(alice, 1);
    assert!(!cluster.routers[0].user_report(alice).online);
}

fn device_change(op: device_change::Op, device: Option<UserId>) -> Kind {
    Kind::DeviceChange(DeviceChange {
        op: op as i32,
        device: device.map(Into::into),
    })
}

fn devices_of(stanza: &Stanza) -> (UserId, Vec<UserId>) {
    match &stanza.kind {
        Some(Kind::Devices(devices)) => (
            UserRef::user(devices.account.as_ref()).unwrap(),
            devices
                .companions
                .iter()
                .map(|d| UserRef::user(Some(d)).unwrap())
                .collect(),
        ),
        other => panic!("not Devices: {other:?}"),
    }
}

#[test]
fn the_primary_links_and_removes_companions_that_live_on_its_shard() {
    use device_change::Op;
    let mut cluster = Cluster::new(2, Limits::default());
    let primary = cluster.user_on(0, 0);
    // A companion whose own home would be the other shard: it lives on its account's.
    let phone = cluster.user_on(1, 0);
    cluster.connect(primary, 1);
    cluster
        .stanza(primary, 1, device_change(Op::Add, Some(phone)))
        .unwrap();
    assert_eq!(devices_of(&only(cluster.take(1))), (primary, vec![phone]));
    assert_eq!(cluster.routers[0].account_of(phone), primary);
    cluster.routers[0].handle_connect(phone, &key_of(phone), ConnRef(2), 0);
    cluster.run();
    let listed = cluster.routers[0].handle_stanza(
        phone,
        ConnRef(2),
        Stanza::of(device_change(Op::List, None)),
        0,
    );
    assert!(listed.is_ok());
    cluster.run();
    assert_eq!(devices_of(&only(cluster.take(2))), (primary, vec![phone]));

    // Only the primary changes the account's devices; bad and taken devices are refused.
    let other = cluster.user_on(0, 5);
    cluster.routers[0]
        .handle_stanza(
            phone,
            ConnRef(2),
            Stanza::of(device_change(Op::Add, Some(other))),
            0,
        )
        .unwrap();
    cluster.run();
    assert_eq!(error_code(&only(cluster.take(2))).0, ErrorCode::NotPrimary);
    cluster
        .stanza(primary, 1, device_change(Op::Add, Some(primary)))
        .unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::DeviceTaken);
    cluster
        .stanza(primary, 1, device_change(Op::Add, None))
        .unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::BadUserId);
    cluster.taken.push(other);
    cluster
        .stanza(primary, 1, device_change(Op::Add, Some(other)))
        .unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::DeviceTaken);

    // At most four companions.
    for n in 1..4 {
        let device = cluster.user_on(1, n);
        cluster
            .stanza(primary, 1, device_change(Op::Add, Some(device)))
            .unwrap();
        assert_eq!(devices_of(&only(cluster.take(1))).1.len(), 1 + n as usize);
    }
    let fifth = cluster.user_on(1, 9);
    cluster
        .stanza(primary, 1, device_change(Op::Add, Some(fifth)))
        .unwrap();
    assert_eq!(error_code(&only(cluster.take(1))).0, ErrorCode::Limit);

    // Removing closes the device's connection and forgets the link.
    cluster
        .stanza(primary, 1, device_change(Op::Remove, Some(phone)))
        .unwrap();
    let (account, companions) = devices_of(&only(cluster.take(1)));
    assert_eq!(account, primary);
    assert!(!companions.contains(&phone));
    assert_eq!(
        cluster.closed,
        vec![(ConnRef(2), GoAwayReason::DeviceRemoved)]
    );
    assert_eq!(cluster.unlinked, vec![phone]);
    assert_eq!(cluster.routers[0].account_of(phone), phone);
    cluster
        .stanza(primary, 1, device_change(Op::Remove, Some(phone)))
        .unwrap();
    assert_eq!(
        error_code(&only(cluster.take(1))).0,
        ErrorCode::UnknownDevice
    );

    // A restart replays the links in order.
    let mut restarted = Router::new(0, 2, Limits::default(), secrets());
    restarted.restore_device_link(primary, phone, true);
    restarted.restore_device_link(primary, fifth, true);
    restarted.restore_device_link(primary, phone, false);
    assert_eq!(restarted.account_of(phone), phone);
    assert_eq!(restarted.account_of(fifth), primary);
}

/// A message to an account reaches every device, each acking its own copy; a companion sends
/// as its account and hears its own ServerAck; the ticks reach every device of the sender; the
/// account is online while any device is.
#[test]
fn an_account_with_a_companion_gets_every_message_on_both_devices() {
    use device_change::Op;
    let mut cluster = Cluster::new(2, Limits::default());
    let bob = cluster.user_on(0, 0);
    let bob_phone = cluster.user_on(1, 0); // lives on bob's shard, 0, once linked
    let alice = cluster.user_on(1, 1);
    cluster.connect(bob, 1);
    cluster
        .stanza(bob, 1, device_change(Op::Add, Some(bob_phone)))
        .unwrap();
    cluster.take(1);
    cluster.connect(alice, 3);
    // Alice watches bob: online while either device is.
    cluster.stanza(alice, 3, subscribe(bob)).unwrap();
    assert!(presence(only(cluster.take(3))).online);
    cluster.routers[0].handle_connect(bob_phone, &key_of(bob_phone), ConnRef(2), 0);
    cluster.run();
    assert!(cluster.take(3).is_empty(), "bob was online already");

    cluster.send(alice, 3, bob, 1, b"to both");
    let on_primary = only(cluster.take(1));
    let on_phone = only(cluster.take(2));
    let (primary_copy, phone_copy) = (deliver(&on_primary), deliver(&on_phone));
    assert_eq!(primary_copy.id, phone_copy.id, "one message, one id");
    assert_eq!(&phone_copy.body[..], b"to both");
    assert_eq!(server_ack(&only(cluster.take(3))).id, primary_copy.id);
    // Each device acks its own copy; each ack is a delivered receipt naming the device.
    cluster.routers[0]
        .handle_stanza(
            bob_phone,
            ConnRef(2),
            Stanza::of(Kind::Ack(Ack {
                id: phone_copy.id,
                kind: 0,
            })),
            0,
        )
        .unwrap();
    cluster.run();
    let tick = only(cluster.take(3));
    assert_eq!(receipt(&tick).kind, ReceiptKind::Delivered as i32);
    assert_eq!(receipt(&tick).by, Some(bob_phone.into()));

    // The phone sends as bob: alice sees bob, the phone gets the ServerAck, and both of bob's
    // devices get alice's delivered tick.
    cluster.routers[0]
        .handle_stanza(
            bob_phone,
            ConnRef(2),
            Stanza::of(Kind::Outbox(Outbox {
                id: 77,
                ..Outbox::default()
            })),
            0,
        )
        .unwrap();
    cluster.routers[0]
        .handle_stanza(
            bob_phone,
            ConnRef(2),
            Stanza::of(Kind::Send(hop_protocol::wire::Send {
                to: Some(alice.into()),
                seq: 1,
                body: Bytes::from_static(b"from the phone"),
                alias: 0,
                resend: false,
            })),
            0,
        )
        .unwrap();
    cluster.run();
    let got = only(cluster.take(3));
    assert_eq!(
        deliver(&got).from,
        Some(bob.into()),
        "the account, not the device"
    );
    let acked = server_ack(&only(cluster.take(2))).id;
    assert_eq!(acked, deliver(&got).id);
    // Sent-sync: bob's primary gets a copy of what the phone sent, marked with its recipient.
    let copy = only(cluster.take(1));
    let copy = deliver(&copy);
    assert_eq!(
        (copy.id, copy.from, copy.to.as_deref().copied()),
        (acked, Some(bob.into()), Some(alice.into()))
    );
    assert_eq!(&copy.body[..], b"from the phone");
    // Its ack is no tick for anyone.
    cluster
        .stanza(bob, 1, Kind::Ack(Ack { id: acked, kind: 0 }))
        .unwrap();
    assert!(cluster.take(3).is_empty());
    cluster
        .stanza(alice, 3, Kind::Ack(Ack { id: acked, kind: 0 }))
        .unwrap();
    for conn in [1, 2] {
        let ticks = cluster.take(conn);
        assert!(
            ticks
                .iter()
                .any(|t| matches!(&t.kind, Some(Kind::Receipt(r)) if r.id == acked)),
            "device {conn} has the tick: {ticks:?}"
        );
    }

    // Offline only once the last device goes.
    cluster.disconnect(bob, 1);
    assert!(cluster.take(3).is_empty(), "the phone is still online");
    cluster.routers[0].handle_disconnect(bob_phone, ConnRef(2), 0);
    cluster.run();
    assert!(!presence(only(cluster.take(3))).online);
}

/// A companion watches presence like any device: its account is the watcher, and each of the
/// account's devices that watches is told; the watch ends when the last device stops.
#[test]
fn a_companion_watches_presence_and_the_account_stops_with_its_last_device() {
    use device_change::Op;
    let mut cluster = Cluster::new(2, Limits::default());
    let bob = cluster.user_on(0, 0);
    let bob_phone = cluster.user_on(1, 0);
    let alice = cluster.user_on(1, 1);
    cluster.connect(alice, 3);
    cluster.connect(bob, 1);
    cluster
        .stanza(bob, 1, device_change(Op::Add, Some(bob_phone)))
        .unwrap();
    cluster.take(1);
    cluster.routers[0].handle_connect(bob_phone, &key_of(bob_phone), ConnRef(2), 0);
    cluster.run();
    let watch = |cluster: &mut Cluster, device: UserId, conn: u64| {
        cluster.routers[0]
            .handle_stanza(device, ConnRef(conn), Stanza::of(subscribe(alice)), 0)
            .unwrap();
        cluster.run();
    };
    watch(&mut cluster, bob_phone, 2);
    assert!(
        presence(only(cluster.take(2))).online,
        "the phone hears alice"
    );
    assert!(cluster.take(1).is_empty(), "bob's primary does not watch");
    watch(&mut cluster, bob, 1);
    assert!(presence(only(cluster.take(1))).online);
    cluster.take(2);
    cluster.now_ms = 120_000;
    cluster.disconnect(alice, 3);
    assert!(!presence(only(cluster.take(1))).online);
    assert!(!presence(only(cluster.take(2))).online);
    // The phone goes; bob still watches, so the account does.
    cluster.routers[0].handle_disconnect(bob_phone, ConnRef(2), 0);
    cluster.run();
    cluster.connect(alice, 4);
    assert!(presence(only(cluster.take(1))).online);
    // Bob goes too: nobody of the account watches any more.
    cluster.disconnect(bob, 1);
    cluster.disconnect(alice, 4);
    cluster.connect(bob, 5);
    assert!(cluster.take(5).is_empty());
}

/// A group change from `user`'s connection `conn`.
fn change_group(
    cluster: &mut Cluster,
    user: UserId,
    conn: u64,
    op: group_change::Op,
    group: Option<UserId>,
    members: &[UserId],
) {
    let change = GroupChange {
        op: op as i32,
        group: group.map(Into::into),
        members: members.iter().map(|m| (*m).into()).collect(),
        name: "g".into(),
        nonce: 1,
        admin: false,
    };
    cluster
        .stanza(user, conn, Kind::GroupChange(change))
        .unwrap();
}

/// Alice makes a group of herself and members on every shard; returns its id. Everyone's
/// stanzas so far are taken.
fn group_of_three(cluster: &mut Cluster) -> (UserId, [UserId; 3]) {
    let people = [
        cluster.user_on(0, 0),
        cluster.user_on(1, 0),
        cluster.user_on(2, 0),
    ];
    for (conn, user) in people.iter().enumerate() {
        cluster.connect(*user, conn as u64 + 1);
    }
    change_group(
        cluster,
        people[0],
        1,
        group_change::Op::Create,
        None,
        &people[1..],
    );
    cluster.keep_all();
    let group = UserId::of_group(people[0], 1);
    for conn in 1..=3 {
        cluster.take(conn);
    }
    (group, people)
}

/// `user`'s connection `conn` leaves `group`.
fn leave(cluster: &mut Cluster, user: UserId, conn: u64, group: UserId) {
    change_group(
        cluster,
        user,
        conn,
        group_change::Op::Leave,
        Some(group),
        &[],
    );
}

/// Three shards with these limits, and [`group_of_three`] on them.
fn grouped(limits: Limits) -> (Cluster, UserId, [UserId; 3]) {
    let mut cluster = Cluster::new(3, limits);
    let (group, people) = group_of_three(&mut cluster);
    (cluster, group, people)
}

#[test]
fn a_group_messages_server_ack_waits_for_every_members_copy_on_disk() {
    let mut cluster = Cluster::new(3, Limits::default());
    cluster.keep_at_once = false;
    let (group, [alice, ..]) = group_of_three(&mut cluster);
    cluster.send(alice, 1, group, 1, b"to all");
    let copies: Vec<Stanza> = [2, 3].iter().flat_map(|conn| cluster.take(*conn)).collect();
    assert_eq!(copies.len(), 2, "one Deliver per other member, at once");
    for copy in &copies {
        let got = deliver(copy);
        assert_eq!(UserRef::user(got.group.as_deref()), Some(group));
        assert_eq!(UserRef::user(got.from.as_ref()), Some(alice));
    }
    assert!(
        cluster.take(1).is_empty(),
        "no ServerAck before the copies are kept"
    );
    // One member's copy on disk is not enough.
    cluster.keep_one(0);
    assert!(cluster.take(1).is_empty());
    cluster.keep_all();
    let ticks = cluster.take(1);
    let Some(Kind::ServerAck(ack)) = &only(ticks).kind else {
        panic!("a ServerAck");
    };
    assert_eq!((ack.members, ack.copies), (2, 2));
    assert_eq!(ack.id, deliver(&copies[0]).id);
}

#[test]
fn a_resend_of_a_group_message_waits_on_or_restarts_its_fan_out_and_is_queued_once() {
    let mut cluster = Cluster::new(3, Limits::default());
    cluster.keep_at_once = false;
    let (group, [alice, bob, carol]) = group_of_three(&mut cluster);
    cluster.disconnect(bob, 2);
    cluster.disconnect(carol, 3);
    cluster.send(alice, 1, group, 1, b"once");
    // Alice reconnects and resends before the copies are kept: the new connection waits.
    cluster.connect(alice, 4);
    cluster.declare(alice, 4, outbox_of(1));
    let resend = |seq| send_of(group, seq, b"once", true);
    cluster.stanza(alice, 4, resend(1)).unwrap();
    cluster.keep_all();
    assert!(cluster
        .take(1)
        .iter()
        .all(|s| !matches!(s.kind, Some(Kind::ServerAck(_)))));
    let server_acks = |stanzas: Vec<Stanza>| {
        stanzas
            .iter()
            .filter(|s| matches!(s.kind, Some(Kind::ServerAck(_))))
            .count()
    };
    assert_eq!(server_acks(cluster.take(4)), 1);
    // Long after (its ack lost again), a resend fans out anew; each member's shard finds its
    // copy still queued and answers at once: no second copy.
    cluster.now_ms += FANOUT_PATIENCE_MS * 2;
    cluster.stanza(alice, 4, resend(1)).unwrap();
    assert_eq!(server_acks(cluster.take(4)), 1);
    assert!(cluster.unkept.is_empty(), "nothing queued twice");
    for member in [bob, carol] {
        let shard = usize::from(home_shard(member, 3));
        assert_eq!(
            cluster.routers[shard].user_report(member).queued_messages,
            2,
            "{member}"
        );
    }
}

#[test]
fn group_changes_are_kept_as_snapshots_and_a_restored_group_serves_its_members() {
    let mut cluster = Cluster::new(3, Limits::default());
    let (group, [alice, bob, carol]) = group_of_three(&mut cluster);
    change_group(
        &mut cluster,
        alice,
        1,
        group_change::Op::Remove,
        Some(group),
        &[carol],
    );
    leave(&mut cluster, bob, 2, group);
    let versions: Vec<(u64, usize)> = cluster
        .groups_kept
        .iter()
        .map(|snapshot| (snapshot.version, snapshot.members.len()))
        .collect();
    assert_eq!(versions, [(1, 3), (2, 2), (3, 1)]);
    // The last member leaving ends the group; it is kept as ended.
    leave(&mut cluster, alice, 1, group);
    let ended = cluster.groups_kept.last().unwrap().clone();
    assert!(ended.members.is_empty());
    cluster.take(1);
    change_group(
        &mut cluster,
        alice,
        1,
        group_change::Op::Info,
        Some(group),
        &[],
    );
    let Some(Kind::Error(error)) = &only(cluster.take(1)).kind else {
        panic!("an Error");
    };
    assert_eq!(error.code, ErrorCode::UnknownGroup as i32);

    // A snapshot restored on a router of another shard count serves from its new home.
    let mut fresh = Cluster::new(2, Limits::default());
    let snapshot = cluster.groups_kept[1].clone();
    for router in &mut fresh.routers {
        router.restore_group(snapshot.clone());
    }
    let homed: usize = fresh.routers.iter().map(Router::groups_homed).sum();
    assert_eq!(homed, 1, "on its home shard only");
    fresh.connect(alice, 1);
    fresh.connect(bob, 2);
    fresh.send(alice, 1, group, 1, b"after the move");
    let got = only(fresh.take(2));
    assert_eq!(UserRef::user(deliver(&got).group.as_deref()), Some(group));
}

#[test]
fn a_member_whose_queue_is_full_is_named_in_the_senders_server_ack() {
    // Each member's queue holds the create event, unacked: full.
    let (mut cluster, group, [alice, bob, carol]) = grouped(Limits {
        queue_messages_max: 1,
        ..Limits::default()
    });
    cluster.send(alice, 1, group, 1, b"for whom?");
    let Some(Kind::ServerAck(ack)) = &only(cluster.take(1)).kind else {
        panic!("a ServerAck");
    };
    let mut missed: Vec<UserId> = ack
        .missed
        .iter()
        .map(|m| UserRef::user(Some(m)).unwrap())
        .collect();
    missed.sort();
    let mut expected = vec![bob, carol];
    expected.sort();
    assert_eq!((ack.members, ack.copies), (2, 0));
    assert_eq!(missed, expected);
    let refused: u64 = cluster
        .routers
        .iter()
        .map(|router| router.counters().group_copies_refused)
        .sum();
    assert_eq!(refused, 2);
}

#[test]
fn an_account_in_as_many_groups_as_it_may_be_is_refused_and_a_leave_frees_its_place() {
    let (mut cluster, group, [alice, bob, carol]) = grouped(Limits {
        groups_max: 1,
        ..Limits::default()
    });
    // Bob is in one group: a second one (created by carol on another shard) is refused whole,
    // and carol's place, taken for it, is given back.
    let create = |cluster: &mut Cluster, nonce| {
        let change = GroupChange {
            op: group_change::Op::Create as i32,
            members: vec![bob.into()],
            nonce,
            ..GroupChange::default()
        };
        cluster.stanza(carol, 3, Kind::GroupChange(change)).unwrap();
        cluster.take(3)
    };
    let refused = create(&mut cluster, 2);
    let Some(Kind::Error(error)) = &only(refused).kind else {
        panic!("an Error");
    };
    assert_eq!(error.code, ErrorCode::Limit as i32);
    assert_eq!(
        cluster
            .routers
            .iter()
            .map(Router::groups_homed)
            .sum::<usize>(),
        1
    );
    // Bob leaves the first group: now he may join another; carol leaving hers too makes room.
    leave(&mut cluster, bob, 2, group);
    leave(&mut cluster, carol, 3, group);
    cluster.take(3);
    let made = create(&mut cluster, 3);
    assert!(
        made.iter()
            .any(|s| matches!(s.kind, Some(Kind::GroupInfo(_)))),
        "{made:?}"
    );
    let _ = alice;
}

#[test]
fn a_group_takes_no_new_message_while_its_shards_mail_is_backed_up() {
    let (mut cluster, group, [alice, ..]) = grouped(Limits::default());
    let home = usize::from(home_shard(group, 3));
    cluster.routers[home].pause_fanouts(true);
    cluster.send(alice, 1, group, 1, b"not now");
    assert_eq!(
        error_code(&only(cluster.take(1))),
        (ErrorCode::Overloaded, 1)
    );
    cluster.routers[home].pause_fanouts(false);
    cluster.send(alice, 1, group, 2, b"now");
    assert!(matches!(
        only(cluster.take(1)).kind,
        Some(Kind::ServerAck(_))
    ));
}

/// Sets every router's account clock.
fn set_clock(cluster: &mut Cluster, seconds: u32) {
    for router in &mut cluster.routers {
        router.set_account_clock(seconds);
    }
}

#[test]
fn an_account_whose_devices_were_not_seen_expires_with_its_queue_binding_and_companions() {
    use device_change::Op;
    let limits = Limits {
        account_expiry_s: 160, // a grain of 10 s
        ..Limits::default()
    };
    let mut cluster = Cluster::new(1, limits);
    let (alice, phone, bob, carol) = (
        cluster.user_on(0, 0),
        cluster.user_on(0, 1),
        cluster.user_on(0, 2),
        cluster.user_on(0, 3),
    );
    set_clock(&mut cluster, 100);
    cluster.connect(alice, 1);
    cluster
        .stanza(alice, 1, device_change(Op::Add, Some(phone)))
        .unwrap();
    cluster.connect(phone, 2);
    cluster.connect(bob, 3);
    cluster.connect(carol, 4);
    assert_eq!(
        cluster.seen,
        vec![(alice, 100), (phone, 100), (bob, 100), (carol, 100)]
    );
    cluster.disconnect(alice, 1);
    cluster.disconnect(phone, 2);
    cluster.disconnect(carol, 4);
    assert_eq!(
        cluster.seen.len(),
        4,
        "seen again within a grain: not kept again"
    );
    cluster.declare(bob, 3, outbox_of(3));
    cluster.send(bob, 3, alice, 1, b"hello");
    cluster.send(bob, 3, phone, 2, b"hi");
    assert_eq!(cluster.disk.len(), 3, "alice, her phone's copy, the phone");

    // The phone shows up later: the account lives while any device is seen.
    set_clock(&mut cluster, 200);
    cluster.connect(phone, 5);
    cluster.disconnect(phone, 5);
    assert_eq!(cluster.seen.last(), Some(&(phone, 200)));
    // Bob stays online: his time is kept again once it is a grain old.
    set_clock(&mut cluster, 280); // alice and carol: 180 s, not past 160 + 2 x 10
    assert_eq!(cluster.routers[0].expire_accounts(), 0);
    set_clock(&mut cluster, 281);
    assert_eq!(cluster.routers[0].expire_accounts(), 1, "carol only");
    cluster.run();
    assert_eq!(cluster.unbound, vec![carol]);
    assert_eq!(cluster.seen.last(), Some(&(bob, 280)));
    assert!(cluster.routers[0].user_report(alice).known);

    set_clock(&mut cluster, 381);
    assert_eq!(
        cluster.routers[0].expire_accounts(),
        1,
        "alice, with her phone"
    );
    cluster.run();
    assert_eq!(cluster.unbound, vec![carol, phone, alice]);
    assert_eq!(cluster.unlinked, vec![phone]);
    assert!(
        cluster.disk.is_empty(),
        "both queues deleted: {:?}",
        cluster.disk
    );
    assert_eq!(cluster.routers[0].queued(), (0, 0));
    for user in [alice, phone, carol] {
        assert!(!cluster.routers[0].user_report(user).known);
        assert!(!cluster.routers[0].is_bound(user));
    }
    assert_eq!(cluster.routers[0].account_of(phone), phone, "unlinked");
    let counters = cluster.routers[0].counters();
    assert_eq!(
        (counters.accounts_expired, counters.devices_expired),
        (2, 3)
    );

    // Alice's key comes back: a new account, with nothing of the old one.
    cluster.connect(alice, 6);
    assert!(cluster.persisted.ends_with(&[alice]), "bound again");
    assert!(cluster.take(6).is_empty(), "no old queue");
}

#[test]
fn devices_of_unknown_age_are_given_the_clock_and_expiry_off_keeps_nothing() {
    let mut cluster = Cluster::new(1, Limits::default());
    let alice = cluster.user_on(0, 0);
    set_clock(&mut cluster, 5);
    cluster.connect(alice, 1);
    cluster.disconnect(alice, 1);
    set_clock(&mut cluster, 500);
    cluster.connect(alice, 2);
    set_clock(&mut cluster, u32::MAX);
    assert_eq!(cluster.routers[0].expire_accounts(), 0);
    cluster.run();
    assert_eq!(
        cluster.seen,
        vec![(alice, 5)],
        "expiry off: a device's first time only"
    );

    let limits = Limits {
        account_expiry_s: 16,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(1, limits);
    let bob = cluster.user_on(0, 1);
    cluster.routers[0].restore_binding(bob, bob);
    set_clock(&mut cluster, 1_000);
    assert_eq!(cluster.routers[0].expire_accounts(), 0, "age unknown");
    cluster.run();
    assert_eq!(cluster.seen, vec![(bob, 1_000)]);
    set_clock(&mut cluster, 1_018);
    assert_eq!(
        cluster.routers[0].expire_accounts(),
        0,
        "18 s: not past the expiry and two grains"
    );
    // A time kept from an earlier run makes the device older.
    let carol = cluster.user_on(0, 2);
    cluster.routers[0].restore_binding(carol, carol);
    cluster.routers[0].restore_seen(carol, 990);
    assert_eq!(cluster.routers[0].expire_accounts(), 1, "carol, 28 s");
    assert!(!cluster.routers[0].is_bound(carol));
    assert!(cluster.routers[0].is_bound(bob));
    set_clock(&mut cluster, 1_019);
    assert_eq!(cluster.routers[0].expire_accounts(), 1, "bob, 19 s");
    assert!(!cluster.routers[0].is_bound(bob), "gone");
}

#[test]
fn an_account_with_a_message_not_yet_on_disk_waits_for_the_next_sweep() {
    let limits = Limits {
        account_expiry_s: 16,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(1, limits);
    let (alice, bob) = (cluster.user_on(0, 0), cluster.user_on(0, 1));
    set_clock(&mut cluster, 100);
    cluster.connect(alice, 1);
    cluster.disconnect(alice, 1);
    cluster.connect(bob, 2);
    cluster.declare(bob, 2, outbox_of(2));
    cluster.keep_at_once = false;
    cluster.send(bob, 2, alice, 1, b"on its way to the disk");
    set_clock(&mut cluster, 200);
    assert_eq!(
        cluster.routers[0].expire_accounts(),
        0,
        "bob waits for the ServerAck"
    );
    cluster.run();
    cluster.keep_all();
    let acks = cluster.take(2);
    assert!(
        acks.iter()
            .any(|stanza| matches!(stanza.kind, Some(Kind::ServerAck(_)))),
        "{acks:?}"
    );
    assert_eq!(cluster.routers[0].expire_accounts(), 1, "then alice goes");
    cluster.run();
    assert!(cluster.disk.is_empty());
}

/// An upgrade that keeps the connections: every session is taken out of the old routers and
/// resumed in new ones built from the disk, as a new process would.
#[test]
fn a_resumed_session_pushes_nothing_twice_and_keeps_its_watches() {
    let limits = Limits {
        inflight_max: 2,
        ..Limits::default()
    };
    let mut cluster = Cluster::new(2, limits);
    let watcher = cluster.user_on(0, 0);
    let bob = cluster.user_on(1, 0);
    cluster.connect(bob, 2);
    cluster.connect(watcher, 1);
    cluster.stanza(watcher, 1, subscribe(bob)).unwrap();
    assert!(presence(only(cluster.take(1))).online);
    for seq in 1..=5 {
        cluster.send(watcher, 1, bob, seq, b"m");
    }
    let pushed: Vec<u64> = cluster.take(2).iter().map(|s| deliver(s).id).collect();
    assert_eq!(pushed.len(), 2, "the window");
    cluster.take(1);
    let sessions: Vec<SessionState> = [(watcher, 0), (bob, 1)]
        .iter()
        .map(|(user, shard)| cluster.routers[*shard].export_session(*user).unwrap())
        .collect();
    assert_eq!(sessions[1].pushed.len(), 2);
    assert_eq!(sessions[0].subscriptions, vec![bob]);
    let watchers: Vec<Vec<(UserId, Vec<UserId>)>> = (cluster.routers.iter())
        .map(|router| {
            (router.watchers())
                .map(|(user, subscribers)| (user, subscribers.to_vec()))
                .collect()
        })
        .collect();
    // The new process: routers from the disk, in the disk's order (not the queue's).
    cluster.routers = (0..2)
        .map(|shard| Router::new(shard, 2, limits, secrets()))
        .collect();
    for user in [watcher, bob] {
        let shard = cluster.router_of(user);
        cluster.routers[shard].restore_binding(user, user);
    }
    let mut kept: Vec<(UserId, Queued)> = (cluster.disk.iter())
        .map(|((user, _, _), item)| (*user, item.clone()))
        .collect();
    kept.sort_by_key(|(_, item)| std::cmp::Reverse(item.id()));
    for (user, item) in &kept {
        let shard = cluster.router_of(*user);
        cluster.routers[shard].restore_item(*user, item);
    }
    for (shard, list) in watchers.into_iter().enumerate() {
        for (user, subscribers) in list {
            cluster.routers[shard].restore_watchers(user, subscribers);
        }
    }
    for (session, conn) in sessions.into_iter().zip([11, 12]) {
        let shard = cluster.router_of(session.user);
        let now = cluster.now_ms;
        cluster.routers[shard].handle_resume(ConnRef(conn), session, now);
    }
    cluster.run();
    assert!(cluster.take(12).is_empty(), "the window is still full");
    assert!(cluster.take(11).is_empty(), "no presence: nothing changed");
    cluster
        .stanza(
            bob,
            12,
            Kind::Ack(Ack {
                id: pushed[0],
                kind: 0,
            }),
        )
        .unwrap();
    let next = deliver(&only(cluster.take(12))).id;
    assert!(
        !pushed.contains(&next),
        "the next one, not one pushed before"
    );
    assert_eq!(
        receipt(&only(cluster.take(11))).id,
        pushed[0],
        "receipts flow"
    );
    // The watch went on: the watcher hears of Bob leaving.
    cluster.disconnect(bob, 12);
    assert!(!presence(only(cluster.take(11))).online);
}

#[test]
fn a_second_copy_of_a_message_that_cannot_be_kept_is_refused_alone() {
    let (mut cluster, alice, bob) = Cluster::with_offline_recipient(Limits::default());
    cluster.send(alice, 1, bob, 1, b"twice");
    assert_eq!(cluster.take(1).len(), 1, "its ServerAck: kept at once");
    // The same message from another connection, not marked as a resend: queued again under
    // the same id, and this copy cannot be kept.
    cluster.keep_at_once = false;
    cluster.connect(alice, 2);
    cluster.declare(alice, 2, outbox_of(1));
    cluster.send(alice, 2, bob, 1, b"twice");
    cluster.refuse_last_keep();
    assert_eq!(
        error_code(&only(cluster.take(2))),
        (ErrorCode::Overloaded, 1),
        "the sender of the copy that was refused hears of it"
    );
    assert_eq!(cluster.routers[0].bodies_in_memory(), 0, "no record left");
    // The copy on disk is still queued.
    cluster.connect(bob, 3);
    assert_eq!(deliver(&only(cluster.take(3))).body.as_ref(), b"twice");
}

#[test]
fn a_group_copy_queued_twice_is_delivered_after_its_twin_is_kept() {
    let mut cluster = Cluster::new(3, Limits::default());
    let (group, [alice, bob, _]) = group_of_three(&mut cluster);
    cluster.keep_at_once = false;
    cluster.disconnect(bob, 2);
    cluster.send(alice, 1, group, 1, b"twice");
    // The disk is slow: the fan-out is given up, and the same Send, not marked as a resend,
    // fans out again: Bob's queue holds two copies under one id, neither kept.
    cluster.now_ms += FANOUT_PATIENCE_MS * 2;
    cluster
        .stanza(alice, 1, send_of(group, 1, b"twice", false))
        .unwrap();
    let first = cluster
        .unkept
        .iter()
        .position(|(_, user, _, _)| *user == bob)
        .expect("a copy for Bob");
    cluster.keep_one(first);
    // The other copy is still in memory, and names its group.
    cluster.connect(bob, 5);
    // Bob never acked the group's creation event: it comes again first.
    let copies: Vec<Stanza> = cluster
        .take(5)
        .into_iter()
        .filter(|stanza| deliver(stanza).event.is_none())
        .collect();
    assert_eq!(copies.len(), 2, "both copies, each once");
    for copy in &copies {
        assert_eq!(UserRef::user(deliver(copy).group.as_deref()), Some(group));
        assert_eq!(deliver(copy).body.as_ref(), b"twice");
    }
}
