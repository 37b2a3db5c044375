//! Several nodes, each in its own network namespace, with etcd for membership: first the
//! tests of the harness itself (`netns`: the namespaces, cutting and healing a node's link,
//! clean-up, a 3-member etcd cluster that survives the loss of one member), then hopd
//! clusters: redirects to the home node, a node killed, a node cut off from etcd.
//!
//! Needs root and `tests/cluster-install`; without them every test prints `SKIPPED:` and
//! passes.

mod netns;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use hop_gateway::cluster::placement;
use hop_protocol::client::{Client, ClientError, ServerTrust};
use hop_protocol::keys::parse_hex_key;
use hop_protocol::wire::{
    group_change, GoAwayReason, GroupChange, Kind, Ping, ReceiptKind, Stanza, UserRef,
};
use hop_protocol::{StaticKey, UserId};
use netns::Proc;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use netns::{netns_list, EtcdCluster, Net, NETNS_DIR, PATIENCE};

/// How long a connect may take before the peer counts as unreachable. Inside one machine a
/// reachable peer answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// The port of the test listeners.
const PORT: u16 = 7000;

/// Where a connection starts.
#[derive(Clone, Copy, Debug)]
enum From {
    Client,
    Node(usize),
}

/// Guards against a harness whose namespaces leak into each other or the host, whose cut
/// leaves a path open, or whose drop leaves namespaces or processes behind.
#[test]
fn a_cut_link_isolates_its_node_until_healed_and_drop_removes_everything() {
    let Some(net) = Net::new(2) else { return };
    let names = net.namespaces().to_vec();
    assert_eq!(names.len(), 4, "hub, two nodes, client: {names:?}");
    let present = netns_list();
    for name in &names {
        assert!(
            present.contains(name),
            "{name} not in `ip netns list`: {present:?}"
        );
    }

    // One listener per namespace, made inside it; never accepted: the kernel completes the
    // handshake on its own, which is all a reachability check needs.
    let node0 = SocketAddrV4::new(net.addr(0), PORT);
    let node1 = SocketAddrV4::new(net.addr(1), PORT);
    let client = SocketAddrV4::new(net.client_addr(), PORT);
    let listeners: Vec<TcpListener> = vec![
        net.in_node(0, move || {
            TcpListener::bind(node0).expect("listener in node 0")
        }),
        net.in_node(1, move || {
            TcpListener::bind(node1).expect("listener in node 1")
        }),
        net.in_client(move || TcpListener::bind(client).expect("listener in the client")),
    ];

    // No route leads out of the namespaces: an address outside the subnet fails at once,
    // before any packet is sent.
    let outside = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), PORT);
    let error = connect(&net, From::Node(0), outside).expect_err("a route out of node 0");
    assert_eq!(error.kind(), io::ErrorKind::NetworkUnreachable, "{error}");

    for (from, to) in [
        (From::Client, node0),
        (From::Node(1), node0),
        (From::Node(0), client),
        (From::Node(1), client),
    ] {
        connect(&net, from, to).unwrap_or_else(|error| panic!("{from:?} -> {to}: {error}"));
    }

    net.cut(0);
    for (from, to) in [
        (From::Client, node0),
        (From::Node(1), node0),
        (From::Node(0), client),
    ] {
        assert!(
            connect(&net, from, to).is_err(),
            "{from:?} reaches {to} while node 0 is cut off"
        );
    }
    for (from, to) in [(From::Client, node1), (From::Node(1), client)] {
        connect(&net, from, to)
            .unwrap_or_else(|error| panic!("{from:?} -> {to} with node 0 cut off: {error}"));
    }

    net.heal(0);
    for (from, to) in [(From::Client, node0), (From::Node(0), client)] {
        eventually(&format!("{from:?} -> {to} after heal"), || {
            connect(&net, from, to)
        });
    }

    // One process started through the harness, one started by the test itself: both run in
    // node 1's namespace, both are gone after the drop.
    let tracked = net.spawn({
        let mut command = net.command(1, "sleep");
        command.arg("600").stdin(Stdio::null());
        command
    });
    let mut untracked = net
        .command(1, "sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep starts");
    for pid in [tracked.pid(), untracked.id()] {
        eventually(&format!("pid {pid} in node 1's namespace"), || {
            let identify = std::process::Command::new("ip")
                .args(["netns", "identify", &pid.to_string()])
                .output()
                .map_err(|error| error.to_string())?;
            let name = String::from_utf8_lossy(&identify.stdout).trim().to_string();
            if name == net.namespace(1) {
                Ok(())
            } else {
                Err(format!("in {name:?}"))
            }
        });
    }

    drop(listeners);
    drop(net);
    let present = netns_list();
    for name in &names {
        assert!(
            !present.contains(name),
            "{name} survived the drop: {present:?}"
        );
    }
    let status = tracked
        .try_wait()
        .expect("the drop waited for the tracked process");
    assert_eq!(
        status.signal(),
        Some(Signal::SIGKILL as i32),
        "tracked: {status:?}"
    );
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = untracked.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the untracked process outlived its namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        status.signal(),
        Some(Signal::SIGKILL as i32),
        "untracked: {status:?}"
    );
}

/// Guards against namespaces that pile up after runs that died without dropping their `Net`
/// (SIGKILL, abort), and against two `Net`s of one process that step on each other.
#[test]
fn leftovers_of_dead_runs_are_removed_and_two_nets_coexist() {
    if Net::new(1).is_none() {
        return;
    }
    // A process that has exited and been reaped: its pid names a run that is gone.
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("true starts");
    let gone_pid = gone.id();
    gone.wait().expect("true exits");
    let leftover = format!("hopnet-{gone_pid}-0-hub");
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &leftover])
        .status()
        .expect("ip runs");
    assert!(made.success(), "ip netns add {leftover}: {made}");

    let first = Net::new(1).expect("first net");
    assert!(
        !std::path::Path::new(NETNS_DIR).join(&leftover).exists(),
        "{leftover} survived Net::new"
    );
    let second = Net::new(1).expect("second net");
    for name in second.namespaces() {
        assert!(!first.namespaces().contains(name), "{name} is in both nets");
    }

    // The same address in both, each reachable only within its own net.
    let addr = SocketAddrV4::new(first.addr(0), PORT);
    assert_eq!(first.addr(0), second.addr(0));
    let _listener = first.in_node(0, move || TcpListener::bind(addr).expect("listener"));
    connect(&first, From::Client, addr).expect("first net's client reaches its node 0");
    assert!(
        connect(&second, From::Client, addr).is_err(),
        "second net's client reaches the first net's node 0"
    );
}

/// Guards against an etcd harness that does not form a real cluster: values must cross
/// members, writes must go on with one member of three dead, and the dead member must catch
/// up after a restart on its own data.
#[test]
fn etcd_of_three_keeps_quorum_with_one_member_down() {
    let Some(net) = Net::new(3) else { return };
    let Some(mut etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    assert_eq!(
        etcd.endpoints(),
        [
            "http://10.99.0.1:2379",
            "http://10.99.0.2:2379",
            "http://10.99.0.3:2379"
        ]
    );

    etcd.put(0, b"hop/test/first", b"one")
        .expect("put through member 0");
    assert_eq!(
        etcd.get(2, b"hop/test/first")
            .expect("get through member 2"),
        Some(b"one".to_vec())
    );
    assert_eq!(
        etcd.get(2, b"hop/test/never")
            .expect("get through member 2"),
        None
    );

    etcd.kill(0);
    assert!(
        etcd.put(0, b"hop/test/second", b"lost").is_err(),
        "a killed member took a write"
    );
    // Member 0 may have been the leader: the other two elect a new one first.
    eventually("a write with member 0 down", || {
        etcd.put(1, b"hop/test/second", b"two")
    });
    assert_eq!(
        etcd.get(2, b"hop/test/second")
            .expect("get through member 2"),
        Some(b"two".to_vec())
    );

    etcd.restart(0);
    assert_eq!(
        etcd.get(0, b"hop/test/first")
            .expect("get through member 0"),
        Some(b"one".to_vec())
    );
    assert_eq!(
        etcd.get(0, b"hop/test/second")
            .expect("get through member 0"),
        Some(b"two".to_vec()),
        "member 0 did not catch up on the write it missed"
    );
}

/// A TCP connect from `from` to `to`, closed at once.
fn connect(net: &Net, from: From, to: SocketAddrV4) -> io::Result<()> {
    let attempt =
        move || TcpStream::connect_timeout(&SocketAddr::V4(to), CONNECT_TIMEOUT).map(drop);
    match from {
        From::Client => net.in_client(attempt),
        From::Node(node) => net.in_node(node, attempt),
    }
}

/// Retries `attempt` until it succeeds; panics naming `what` and the last error after
/// [`PATIENCE`].
fn eventually<E: std::fmt::Display>(what: &str, mut attempt: impl FnMut() -> Result<(), E>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match attempt() {
            Ok(()) => return,
            Err(error) if Instant::now() >= deadline => {
                panic!("{what}: still failing after {PATIENCE:?}: {error}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---- hopd clusters ----

/// The client port of every node (each on its own address).
const HOP_PORT: u16 = 7788;
/// The admin listener of every node, on the loopback of the node's own namespace.
const ADMIN: &str = "127.0.0.1:7789";
/// A short lease, so that a dead node's users move within seconds.
const LEASE_MS: u64 = 2_000;

/// hopd nodes `n0`, `n1`, ... one per namespace of a [`Net`], members of one etcd cluster.
struct Nodes<'net> {
    net: &'net Net,
    endpoints: String,
    lease_ms: u64,
    /// More flags for every node.
    flags: Vec<&'static str>,
    nodes: Vec<Option<Node>>,
    folder: tempfile::TempDir,
}

struct Node {
    process: Proc,
    key: [u8; 32],
}

/// A failed test shows the end of each node's log.
impl Drop for Nodes<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for index in 0..self.nodes.len() {
            let log = std::fs::read_to_string(self.log(index)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("---- the end of {}'s log ----\n{tail}", node_id(index));
        }
    }
}

fn node_id(index: usize) -> String {
    format!("n{index}")
}

impl<'net> Nodes<'net> {
    /// Starts `count` nodes and waits until each sees all of them as members.
    fn start(net: &'net Net, etcd: &EtcdCluster<'net>, count: usize) -> Self {
        Self::start_with_lease(net, etcd, count, LEASE_MS)
    }

    /// The same with a lease of `lease_ms`.
    fn start_with_lease(
        net: &'net Net,
        etcd: &EtcdCluster<'net>,
        count: usize,
        lease_ms: u64,
    ) -> Self {
        Self::start_with(net, etcd, count, lease_ms, &[])
    }

    /// The same with more flags for every node.
    fn start_with(
        net: &'net Net,
        etcd: &EtcdCluster<'net>,
        count: usize,
        lease_ms: u64,
        flags: &[&'static str],
    ) -> Self {
        let mut nodes = Self {
            net,
            endpoints: etcd.endpoints().join(","),
            lease_ms,
            flags: flags.to_vec(),
            nodes: (0..count).map(|_| None).collect(),
            folder: tempfile::tempdir().expect("a temporary folder"),
        };
        for index in 0..count {
            nodes.start_node(index);
        }
        let all: Vec<usize> = (0..count).collect();
        for index in 0..count {
            nodes.wait_for_members(index, &all);
        }
        nodes
    }

    fn data(&self, index: usize) -> PathBuf {
        self.folder.path().join(node_id(index))
    }

    fn log(&self, index: usize) -> PathBuf {
        self.folder.path().join(format!("{}.log", node_id(index)))
    }

    /// Starts node `index` (again: its data folder is kept) and waits for its status line.
    fn start_node(&mut self, index: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(index))
            .expect("a log file");
        let listen = SocketAddrV4::new(self.net.addr(index), HOP_PORT).to_string();
        let mut command = self.net.command(index, env!("CARGO_BIN_EXE_hopd"));
        command
            .args(["--data", &self.data(index).display().to_string()])
            .args(["--listen", &listen, "--admin", ADMIN, "--shards", "2"])
            .args(["--cluster-etcd", &self.endpoints])
            .args(["--node-id", &node_id(index)])
            .args(["--cluster-lease-ms", &self.lease_ms.to_string()])
            .args(["--drain-ms", "0"])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log again"))
            .stderr(log);
        let process = self.net.spawn(command);
        let key = self.wait_for_key(index, &process);
        self.nodes[index] = Some(Node { process, key });
    }

    /// The server key from the status line node `index` printed last.
    fn wait_for_key(&self, index: usize, process: &Proc) -> [u8; 32] {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(self.log(index)).unwrap_or_default();
            let key = text
                .lines()
                .rev()
                .find_map(|line| line.split("server key ").nth(1))
                .and_then(|rest| parse_hex_key(rest.split(';').next().unwrap_or("")));
            if let Some(key) = key {
                return key;
            }
            assert!(
                process.try_wait().is_none() && Instant::now() < deadline,
                "node {index} printed no status line:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn key(&self, index: usize) -> [u8; 32] {
        self.nodes[index].as_ref().expect("a running node").key
    }

    /// The node whose server key this is.
    fn which(&self, key: &[u8; 32]) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.as_ref().is_some_and(|node| &node.key == key))
    }

    fn addr(&self, index: usize) -> String {
        SocketAddrV4::new(self.net.addr(index), HOP_PORT).to_string()
    }

    /// `kill -9` of node `index`.
    fn kill(&mut self, index: usize) {
        if let Some(node) = self.nodes[index].take() {
            node.process.kill();
        }
    }

    /// Stops node `index` as an operator does: SIGTERM (it leaves the cluster and sends its
    /// connections away), then waits for it to exit.
    fn stop(&mut self, index: usize) {
        if let Some(node) = self.nodes[index].take() {
            assert!(node.process.signal(Signal::SIGTERM));
            let status = node.process.wait(PATIENCE);
            assert!(status.success(), "node {index} stopped with {status:?}");
        }
    }

    /// Waits until node `index`'s counter `name` (summed over its shards) is above 0.
    fn wait_for_metric(&self, index: usize, name: &str) {
        self.wait_for_metric_at_least(index, name, 1.0);
    }

    /// Waits until node `index`'s counter `name` (summed over its shards) is at least `least`.
    fn wait_for_metric_at_least(&self, index: usize, name: &str, least: f64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, metrics) = self.admin(index, "/metrics");
            let total: f64 = metrics
                .lines()
                .filter(|line| line.starts_with(&format!("{name}{{")))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if total >= least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {index} counted {total} {name}, not {least}, within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A GET on node `index`'s admin listener: status and body.
    fn admin(&self, index: usize, path: &str) -> (u16, String) {
        let url = format!("http://{ADMIN}{path}");
        self.net.in_node(index, move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(2)))
                .http_status_as_error(false)
                .proxy(None)
                .build()
                .into();
            match agent.get(&url).call() {
                Ok(mut response) => (
                    response.status().as_u16(),
                    response.body_mut().read_to_string().unwrap_or_default(),
                ),
                Err(error) => (0, error.to_string()),
            }
        })
    }

    /// Waits until node `index` is a member and sees exactly `members`.
    fn wait_for_members(&self, index: usize, members: &[usize]) {
        let wanted: Vec<String> = members.iter().map(|&m| node_id(m)).collect();
        let deadline = Instant::now() + PATIENCE;
        let mut last = String::new();
        while Instant::now() < deadline {
            let (status, body) = self.admin(index, "/cluster");
            if status == 200 {
                let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                let seen: Vec<String> = view["members"]
                    .as_array()
                    .map(|members| {
                        members
                            .iter()
                            .filter_map(|m| m["node_id"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if view["member"] == true && seen == wanted {
                    return;
                }
            }
            last = body;
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node {index} never saw members {wanted:?}; last /cluster: {last}");
    }

    /// Connects `key`'s user through node `via` from the client namespace, following redirects.
    fn connect(&self, via: usize, key: &StaticKey) -> Result<Client, ClientError> {
        let (addr, trust) = (self.addr(via), ServerTrust::Pinned(self.key(via)));
        let key = key.clone();
        self.net
            .in_client(move || Client::connect_home(&addr, &key, &trust, Duration::from_secs(2)))
    }
}

impl Nodes<'_> {
    /// Connects `key`'s user through node `via` until node `home` serves it, and returns how
    /// long that took. Meanwhile a connect may fail (to a node that died or was cut off) or be
    /// sent away `UNAVAILABLE` (a node whose lease etcd has not confirmed in time, as while
    /// etcd elects a leader): a client tries again, and so does this, within [`PATIENCE`].
    fn served_by(&self, via: usize, key: &StaticKey, home: usize) -> Duration {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < PATIENCE {
            match self.connect(via, key) {
                Ok(mut client) => {
                    if self.which(client.server_key()) == Some(home) {
                        return start.elapsed();
                    }
                    last = format!(
                        "served by {:?}, first stanza {:?}",
                        self.which(client.server_key()),
                        client.recv(Duration::from_millis(100))
                    );
                }
                Err(error) => last = error.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the user was never served by n{home} through n{via}; last: {last}\nn{via}: {}",
            self.admin(via, "/cluster").1
        );
    }
}

/// The node of `live` (node indices) that placement makes `user`'s home, and its replica.
fn placed(live: &[usize], user: UserId) -> (usize, usize) {
    let hashes: Vec<u64> = live
        .iter()
        .map(|&index| placement::node_hash(&node_id(index)))
        .collect();
    let mut order = placement::ranked(&hashes, user);
    let home = order.next().expect("a member");
    let replica = order.next().unwrap_or(home);
    (live[home], live[replica])
}

/// A new key whose user's home among `live` is `home`.
fn key_homed_on(live: &[usize], home: usize) -> StaticKey {
    for _ in 0..10_000 {
        let key = StaticKey::generate().expect("a key");
        if placed(live, key.user_id()).0 == home {
            return key;
        }
    }
    panic!("no key homed on node {home} in 10,000 tries");
}

/// Waits for the next stanza of `kind`, failing after [`PATIENCE`].
fn next_of(client: &mut Client, kind: &str) -> Kind {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Some(stanza) = client.recv(Duration::from_millis(200)).expect("connected") {
            if stanza.kind_name() == kind {
                return stanza.kind.expect("a kind");
            }
        }
    }
    panic!("no {kind} within {PATIENCE:?}");
}

/// Every user ends up on its home node whichever node it connects to, and two users sent
/// there from different nodes exchange a message with its ticks.
#[test]
fn a_client_is_served_by_its_home_node_whichever_node_it_connects_to() {
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let nodes = Nodes::start(&net, &etcd, 3);
    let live = [0, 1, 2];
    for home in live {
        let key = key_homed_on(&live, home);
        for via in live {
            nodes.served_by(via, &key, home);
        }
    }

    // Alice and Bob live on n1; Alice comes through n0, Bob through n2.
    let (alice_key, bob_key) = (key_homed_on(&live, 1), key_homed_on(&live, 1));
    let mut alice = nodes.connect(0, &alice_key).expect("alice served");
    let mut bob = nodes.connect(2, &bob_key).expect("bob served");
    assert_eq!(nodes.which(alice.server_key()), Some(1));
    assert_eq!(nodes.which(bob.server_key()), Some(1));
    alice
        .send_message(bob_key.user_id(), b"through the cluster")
        .expect("sent");
    let Kind::ServerAck(ack) = next_of(&mut alice, "ServerAck") else {
        unreachable!()
    };
    let Kind::Deliver(deliver) = next_of(&mut bob, "Deliver") else {
        unreachable!()
    };
    assert_eq!(
        (deliver.id, &deliver.body[..]),
        (ack.id, &b"through the cluster"[..])
    );
    bob.ack_deliver(deliver.id).expect("acked");
    let Kind::Receipt(receipt) = next_of(&mut alice, "Receipt") else {
        unreachable!()
    };
    assert_eq!(
        (receipt.id, receipt.kind),
        (ack.id, ReceiptKind::Delivered as i32)
    );
    // Carol lives on n0: Alice's message to her, and its ticks, cross a node link each way.
    let carol_key = key_homed_on(&live, 0);
    let mut carol = nodes.connect(1, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(0));
    alice
        .send_message(carol_key.user_id(), b"to another node")
        .expect("sent");
    let Kind::ServerAck(ack) = next_of(&mut alice, "ServerAck") else {
        unreachable!()
    };
    let Kind::Deliver(deliver) = next_of(&mut carol, "Deliver") else {
        unreachable!()
    };
    assert_eq!(
        (deliver.id, &deliver.body[..]),
        (ack.id, &b"to another node"[..])
    );
    assert_eq!(
        UserRef::user(deliver.from.as_ref()),
        Some(alice_key.user_id())
    );
    carol.ack_deliver(deliver.id).expect("acked");
    carol
        .read(alice_key.user_id(), deliver.id, deliver.proof)
        .expect("read");
    for tick in [ReceiptKind::Delivered, ReceiptKind::Read] {
        let Kind::Receipt(receipt) = next_of(&mut alice, "Receipt") else {
            unreachable!()
        };
        assert_eq!((receipt.id, receipt.kind), (ack.id, tick as i32));
        assert_eq!(
            UserRef::user(receipt.by.as_ref()),
            Some(carol_key.user_id())
        );
        alice.ack_receipt(&receipt).expect("receipt acked");
    }

    // Alice's node counts the work it sent to Carol's (published once per shard tick).
    nodes.wait_for_metric(1, "hop_mails_to_nodes_total");

    // ... and on its link to n0, by that node's id; the link is up.
    let (_, metrics) = nodes.admin(1, "/metrics");
    let link = |name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(&format!("{name}{{node=\"n0\"}}")))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(
        link("hop_link_mails_sent_total").is_some_and(|sent| sent >= 1.0),
        "{metrics}"
    );
    assert_eq!(link("hop_link_up"), Some(1.0), "{metrics}");
    let (_, cluster) = nodes.admin(1, "/cluster");
    let cluster: serde_json::Value = serde_json::from_str(&cluster).unwrap();
    let links = cluster["links"].as_array().expect("links");
    assert!(
        links
            .iter()
            .any(|link| link["node_id"] == "n0" && link["mails_sent"].as_u64() >= Some(1)),
        "{cluster}"
    );
    // The placement's balance: every sampled user has one home and one replica node.
    let members = cluster["members"].as_array().expect("members");
    let sample = cluster["placement_sample"].as_u64().expect("a sample size");
    for count in ["home_of_sample", "replica_of_sample"] {
        let counts: Vec<u64> = members
            .iter()
            .map(|member| member[count].as_u64().expect("a count"))
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), sample, "{cluster}");
        assert!(counts.iter().all(|n| *n > sample / 6), "{cluster}");
    }

    let (_, metrics) = nodes.admin(0, "/metrics");
    let redirects: u64 = metrics
        .lines()
        .filter(|line| line.starts_with("hop_cluster_redirects_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(redirects >= 3, "n0 redirected {redirects} connections");
}

/// After `kill -9` of a node its users are served by their replicas once its lease has run
/// out; when it comes back (same data, same key) they are sent home to it again.
#[test]
fn a_killed_node_s_users_move_to_their_replicas_and_come_back_with_it() {
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start(&net, &etcd, 3);
    let key = key_homed_on(&[0, 1, 2], 2);
    let (_, replica) = placed(&[0, 1, 2], key.user_id());
    assert_eq!(placed(&[0, 1], key.user_id()).0, replica);
    nodes.served_by(0, &key, 2);
    // Alice, on n0, sends to the user of n2, which takes it.
    let alice_key = key_homed_on(&[0, 1, 2], 0);
    let mut alice = nodes.connect(0, &alice_key).expect("alice served");
    let body = b"queued on n2 before it died";
    let sent = alice.send_message(key.user_id(), body).expect("sent");
    let Kind::ServerAck(first) = next_of(&mut alice, "ServerAck") else {
        unreachable!()
    };

    nodes.kill(2);
    let moved = nodes.served_by(0, &key, replica);
    println!(
        "users of a node killed with kill -9 were served by their replica {moved:?} later \
         (lease {LEASE_MS} ms)"
    );
    nodes.wait_for_members(0, &[0, 1]);
    // Alice sends it again, as a client that never saw the ServerAck would: the replica names
    // it as n2 did (the nodes key message ids with the cluster's secret), so the recipient's
    // app takes it once.
    alice
        .resend_message(key.user_id(), sent.seq, body)
        .expect("sent again");
    let Kind::ServerAck(again) = next_of(&mut alice, "ServerAck") else {
        unreachable!()
    };
    assert_eq!(again.id, first.id, "one id for the message on both nodes");

    nodes.start_node(2);
    nodes.wait_for_members(0, &[0, 1, 2]);
    nodes.wait_for_members(2, &[0, 1, 2]);
    nodes.served_by(0, &key, 2);
}

/// Connects `key`'s user straight to `addr` (no redirect followed) and pings: whether the
/// node served it (a Pong) rather than sending it away (a GoAway); `None` if the connect or
/// the exchange failed.
fn serves(addr: &str, key: &StaticKey, server_key: [u8; 32]) -> Option<bool> {
    let trust = ServerTrust::Pinned(server_key);
    let mut client = Client::connect(addr, key, &trust, Duration::from_secs(2)).ok()?;
    client
        .send(&Stanza::of(Kind::Ping(Ping { nonce: 7 })))
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match client.recv(Duration::from_millis(100)).ok()? {
            Some(Stanza {
                kind: Some(Kind::Pong(_)),
            }) => return Some(true),
            Some(Stanza {
                kind: Some(Kind::GoAway(_)),
            }) => return Some(false),
            _ => {}
        }
    }
    None
}

/// A node cut off from the network (its etcd member with it, in the minority) stops serving
/// once its lease may have run out: its own connections are sent away `UNAVAILABLE`, while
/// the other side serves its users. No user is served on both sides: a client inside the cut
/// node's namespace and one outside try to be served by each side over and over, and the
/// last time the cut node served the user began before the first time its replica did.
/// After the heal the node joins again and its users come home.
#[test]
fn a_node_cut_off_from_etcd_stops_serving_before_its_users_move_and_returns_after_heal() {
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let nodes = Nodes::start(&net, &etcd, 3);
    let key = key_homed_on(&[0, 1, 2], 2);
    let (_, replica) = placed(&[0, 1, 2], key.user_id());
    // Another user of n2, connected from inside n2's own namespace: it stays reachable
    // through the cut.
    let (addr, trust, inner_key) = (
        nodes.addr(2),
        ServerTrust::Pinned(nodes.key(2)),
        key_homed_on(&[0, 1, 2], 2),
    );
    let mut local = net.in_node(2, move || {
        Client::connect_home(&addr, &inner_key, &trust, Duration::from_secs(5))
            .expect("served by n2")
    });

    net.cut(2);
    let cut = Instant::now();
    let moved = AtomicBool::new(false);
    let (n2_addr, n2_key) = (nodes.addr(2), nodes.key(2));
    let (replica_addr, replica_key) = (nodes.addr(replica), nodes.key(replica));
    let (last_served_by_n2, first_served_by_replica) = std::thread::scope(|scope| {
        let inside = scope.spawn(|| {
            net.in_node(2, || {
                // When the last attempt that n2 answered with a Pong began.
                let mut last_served = None;
                while !moved.load(Ordering::Acquire) && cut.elapsed() < PATIENCE {
                    let began = cut.elapsed();
                    if serves(&n2_addr, &key, n2_key) == Some(true) {
                        last_served = Some(began);
                    }
                }
                last_served
            })
        });
        let outside = scope.spawn(|| {
            let served = net.in_client(|| loop {
                if serves(&replica_addr, &key, replica_key) == Some(true) {
                    // When the first attempt the replica answered with a Pong ended.
                    break Some(cut.elapsed());
                }
                if cut.elapsed() >= PATIENCE {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(2));
            });
            moved.store(true, Ordering::Release);
            served
        });
        (
            inside.join().expect("the inside client"),
            outside.join().expect("the outside client"),
        )
    });
    let moved_at = first_served_by_replica.expect("n2's user was never served by its replica");
    println!(
        "after the cut: n2 last served its user in an attempt begun at {last_served_by_n2:?}; \
         n{replica} first served it by {moved_at:?}"
    );
    assert!(
        last_served_by_n2.is_none_or(|at| at < moved_at),
        "the user was served on both sides: by n2 at {last_served_by_n2:?}, by n{replica} at \
         {moved_at:?}"
    );
    // n2 says it is not serving, and its connection was sent away.
    assert_eq!(nodes.admin(2, "/readyz").0, 503);
    let Kind::GoAway(go_away) = next_of(&mut local, "GoAway") else {
        unreachable!()
    };
    assert_eq!(go_away.reason, GoAwayReason::Unavailable as i32);

    net.heal(2);
    nodes.wait_for_members(2, &[0, 1, 2]);
    nodes.wait_for_members(0, &[0, 1, 2]);
    nodes.served_by(0, &key, 2);
}

/// Messages from a user of n0 to a user of n1 cross a node link. n1 is killed (`kill -9`) and
/// started again mid-stream, within its lease, so its users stay placed on it: n0's link
/// connects again and sends every mail n1 had not acked, n1 takes each once, and every message
/// Alice got a ServerAck for reaches Carol (Alice sends again what got no ServerAck, as a
/// client does).
#[test]
fn a_link_sends_its_unacked_mails_again_after_its_peer_restarts() {
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start_with_lease(&net, &etcd, 3, 20_000);
    let live = [0, 1, 2];
    let alice_key = key_homed_on(&live, 0);
    let carol_key = key_homed_on(&live, 1);
    let carol = nodes.connect(1, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(1));
    carol.close();
    let mut alice = nodes.connect(0, &alice_key).expect("alice served");
    assert_eq!(nodes.which(alice.server_key()), Some(0));

    const MESSAGES: u64 = 40;
    let mut acked = Vec::new();
    for n in 1..=MESSAGES {
        if n == MESSAGES / 2 {
            nodes.kill(1);
            nodes.start_node(1);
        }
        let body = format!("message {n}");
        let sent = alice
            .send_message(carol_key.user_id(), body.as_bytes())
            .expect("sent");
        let deadline = Instant::now() + PATIENCE;
        let mut resend_at = Instant::now() + Duration::from_secs(3);
        let id = loop {
            assert!(Instant::now() < deadline, "message {n} was never acked");
            match alice
                .recv(Duration::from_millis(100))
                .expect("alice's connection")
            {
                Some(Stanza {
                    kind: Some(Kind::ServerAck(ack)),
                }) if ack.seq == sent.seq => break ack.id,
                Some(Stanza {
                    kind: Some(Kind::Error(error)),
                }) if error.seq == sent.seq => {
                    // OVERLOADED while the link's queue could not take it: try again.
                    std::thread::sleep(Duration::from_millis(100));
                    resend_at = Instant::now();
                }
                _ => {}
            }
            if Instant::now() >= resend_at {
                alice
                    .resend_message(carol_key.user_id(), sent.seq, body.as_bytes())
                    .expect("sent again");
                resend_at = Instant::now() + Duration::from_secs(3);
            }
        };
        acked.push((id, body));
    }
    nodes.wait_for_members(0, &[0, 1, 2]);

    let mut carol = nodes.connect(0, &carol_key).expect("carol served again");
    assert_eq!(nodes.which(carol.server_key()), Some(1));
    let mut received = Vec::new();
    while received.len() < acked.len() {
        let Kind::Deliver(deliver) = next_of(&mut carol, "Deliver") else {
            unreachable!()
        };
        carol.ack_deliver(deliver.id).expect("acked");
        received.push((
            deliver.id,
            String::from_utf8_lossy(&deliver.body).into_owned(),
        ));
    }
    received.sort();
    let mut expected = acked.clone();
    expected.sort();
    assert_eq!(received, expected);
    let (_, view) = nodes.admin(0, "/cluster");
    println!("after the restart: n0's links: {view}");
}

/// A group whose members live on three nodes (and whose own home is wherever placement puts
/// it): the create's join round, the message's fan-out and its aggregated ServerAck all cross
/// node links.
#[test]
fn a_group_spread_over_three_nodes_is_made_and_reaches_every_member() {
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let nodes = Nodes::start(&net, &etcd, 3);
    let live = [0, 1, 2];
    let keys: Vec<StaticKey> = live.iter().map(|&node| key_homed_on(&live, node)).collect();
    let ids: Vec<UserId> = keys.iter().map(StaticKey::user_id).collect();
    let mut clients: Vec<Client> = keys
        .iter()
        .map(|key| nodes.connect(0, key).expect("served"))
        .collect();
    for (node, client) in clients.iter().enumerate() {
        assert_eq!(nodes.which(client.server_key()), Some(node));
    }
    clients[0]
        .send(&Stanza::of(Kind::GroupChange(GroupChange {
            op: group_change::Op::Create as i32,
            group: None,
            members: ids[1..].iter().map(|id| (*id).into()).collect(),
            name: "across".into(),
            nonce: 11,
            admin: false,
        })))
        .expect("sent");
    let Kind::GroupInfo(info) = next_of(&mut clients[0], "GroupInfo") else {
        unreachable!()
    };
    let group = UserRef::user(info.group.as_ref()).expect("a group id");
    assert_eq!(group, UserId::of_group(ids[0], 11));
    assert_eq!(info.members.len(), 3, "{info:?}");
    println!("the group lives on n{}", placed(&live, group).0);

    clients[0].send_message(group, b"hello, all").expect("sent");
    let Kind::ServerAck(ack) = next_of(&mut clients[0], "ServerAck") else {
        unreachable!()
    };
    assert_eq!((ack.members, ack.copies), (2, 2), "{ack:?}");
    assert!(ack.missed.is_empty(), "{ack:?}");
    for client in &mut clients[1..] {
        // The group's events (its creation) come first; then the message.
        let deliver = loop {
            let Kind::Deliver(deliver) = next_of(client, "Deliver") else {
                unreachable!()
            };
            if deliver.event.is_none() {
                break deliver;
            }
        };
        assert_eq!(&deliver.body[..], b"hello, all");
        assert_eq!(
            deliver.id, ack.id,
            "one id for every copy, whichever node keeps it"
        );
        assert_eq!(UserRef::user(deliver.group.as_deref()), Some(group));
        assert_eq!(UserRef::user(deliver.from.as_ref()), Some(ids[0]));
    }
}

/// A sender whose messages go to another node faster than that node takes them is slowed
/// down, not refused: while the receiving node is stopped (SIGSTOP: its link stays up, it acks
/// nothing), the link's queue fills, the sender's node holds the rest and stops reading the
/// sender; once the node runs again every message is taken.
#[test]
fn a_sender_to_a_slow_node_is_slowed_down_not_refused() {
    const MESSAGES: usize = 40_000;
    let Some(net) = Net::new(2) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1]) else {
        return;
    };
    let unlimited = [
        "--sender-messages-per-second",
        "0",
        "--queue-messages-max",
        "100000",
        "--queue-sender-percent",
        "100",
        "--shard-queue-sender-percent",
        "100",
    ];
    // A long lease: the stopped node must stay a member meanwhile.
    let nodes = Nodes::start_with(&net, &etcd, 2, 20_000, &unlimited);
    let live = [0, 1];
    let bob_key = key_homed_on(&live, 1);
    nodes.served_by(1, &bob_key, 1);
    let alice_key = key_homed_on(&live, 0);
    let mut alice = nodes.connect(0, &alice_key).expect("alice served");
    // The link from n0 to n1 is up before n1 stops.
    alice
        .send_message(bob_key.user_id(), b"first")
        .expect("sent");
    let Kind::ServerAck(_) = next_of(&mut alice, "ServerAck") else {
        unreachable!()
    };

    let n1 = nodes.nodes[1].as_ref().expect("n1 runs");
    assert!(n1.process.signal(nix::sys::signal::Signal::SIGSTOP));
    for _ in 0..MESSAGES {
        alice.queue_message(bob_key.user_id(), b"hi");
    }
    // The queue holds 16,384 mails and the link 16,384 unacked: the rest waits on n0.
    let writer = std::thread::spawn(move || {
        alice.flush().expect("written");
        alice
    });
    nodes.wait_for_metric(0, "hop_link_backpressure_total");
    assert!(n1.process.signal(nix::sys::signal::Signal::SIGCONT));
    let mut alice = writer.join().expect("the writer");
    let deadline = Instant::now() + PATIENCE;
    let (mut acked, mut refused) = (0, 0);
    while acked + refused < MESSAGES && Instant::now() < deadline {
        let stanza = alice.recv(Duration::from_millis(200)).expect("connected");
        match stanza.and_then(|stanza| stanza.kind) {
            Some(Kind::ServerAck(_)) => acked += 1,
            Some(Kind::Error(_)) => refused += 1,
            _ => {}
        }
    }
    assert_eq!((acked, refused), (MESSAGES, 0), "ServerAcks and refusals");
}

/// Alice, a user of n0, streams messages to Carol, a user of n2 who is offline, and n2 is
/// killed with `kill -9` midway. Each message Alice got a ServerAck for was durable on n2 and
/// on Carol's replica node before the ack, so once n2's lease has run out Carol, now served
/// by her replica, receives every one of them; her app gets each once (a message Alice sent
/// again after the kill has its original's id). What got no ServerAck, or an Error, Alice
/// sends again, as a client does.
#[test]
fn no_acked_message_is_lost_when_the_recipient_s_home_is_killed_under_load() {
    const MESSAGES: usize = 600;
    const WINDOW: usize = 32;
    const KILL_AFTER: usize = 200;
    /// A message with no answer for this long is sent again.
    const RESEND_AFTER: Duration = Duration::from_secs(3);
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start(&net, &etcd, 3);
    let (mut alice, carol_key, replica) = alice_and_carol(&nodes);
    let carol_id = carol_key.user_id();

    let body = |n: usize| format!("message {n}");
    let deadline = Instant::now() + 3 * PATIENCE;
    let mut next = 0;
    // By seq: the message's number, and when to send it again.
    let mut waiting: std::collections::HashMap<u64, (usize, Instant)> = Default::default();
    // By number: the id its ServerAck named.
    let mut acked: std::collections::BTreeMap<usize, u64> = Default::default();
    // When n2 was killed, and the number of the first message sent after it.
    let mut killed: Option<(Instant, usize)> = None;
    let (mut flowing_again, mut refused, mut sent_again) = (None, 0, 0);
    while acked.len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "{} of {MESSAGES} messages acked; waiting: {:?}",
            acked.len(),
            waiting.values().map(|w| w.0).collect::<Vec<_>>()
        );
        while waiting.len() < WINDOW && next < MESSAGES {
            let sent = alice
                .send_message(carol_id, body(next).as_bytes())
                .expect("sent");
            waiting.insert(sent.seq, (next, Instant::now() + RESEND_AFTER));
            next += 1;
        }
        if killed.is_none() && acked.len() >= KILL_AFTER {
            nodes.kill(2);
            killed = Some((Instant::now(), next));
        }
        match alice
            .recv(Duration::from_millis(20))
            .expect("alice's connection")
            .and_then(|stanza| stanza.kind)
        {
            Some(Kind::ServerAck(ack)) => {
                if let Some((n, _)) = waiting.remove(&ack.seq) {
                    acked.insert(n, ack.id);
                    if let Some((at, _)) = killed.filter(|killed| n >= killed.1) {
                        flowing_again.get_or_insert_with(|| at.elapsed());
                    }
                }
            }
            Some(Kind::Error(error)) => {
                if let Some(entry) = waiting.get_mut(&error.seq) {
                    refused += 1;
                    entry.1 = Instant::now() + Duration::from_millis(200);
                }
            }
            _ => {}
        }
        let now = Instant::now();
        for (&seq, (n, resend_at)) in &mut waiting {
            if now >= *resend_at {
                alice
                    .resend_message(carol_id, seq, body(*n).as_bytes())
                    .expect("sent again");
                *resend_at = now + RESEND_AFTER;
                sent_again += 1;
            }
        }
    }
    println!(
        "{MESSAGES} messages acked; n2 killed after {KILL_AFTER}; the first ServerAck for a \
         message sent after the kill came {flowing_again:?} after it (lease {LEASE_MS} ms); \
         {refused} refusals, {sent_again} sent again"
    );

    let mut carol = nodes.connect(0, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(replica));
    assert_received_as_acked(&mut carol, &acked);
}

/// Receives Alice's numbered messages ("message N") on `carol` until every acked one came or
/// PATIENCE runs out, and asserts each came exactly once, with the id its ServerAck named.
fn assert_received_as_acked(carol: &mut Client, acked: &std::collections::BTreeMap<usize, u64>) {
    let mut received: std::collections::BTreeMap<usize, u64> = Default::default();
    let deadline = Instant::now() + PATIENCE;
    while received.len() < acked.len() && Instant::now() < deadline {
        let Some(Kind::Deliver(deliver)) = carol
            .recv(Duration::from_millis(200))
            .expect("carol's connection")
            .and_then(|stanza| stanza.kind)
        else {
            continue;
        };
        carol.ack_deliver(deliver.id).expect("acked");
        let text = String::from_utf8_lossy(&deliver.body).into_owned();
        let n: usize = text
            .strip_prefix("message ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a body of Alice's: {text:?}"));
        assert!(
            received.insert(n, deliver.id).is_none(),
            "message {n} reached the app twice"
        );
    }
    let lost: Vec<usize> = acked
        .keys()
        .filter(|n| !received.contains_key(n))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost: {lost:?}",
        lost.len()
    );
    assert_eq!(&received, acked, "each with the id its ServerAck named");
}

/// Alice, a user of n0 connected to it from the client namespace, and the key of Carol, an
/// offline user of n2 (n2 serves her), with Carol's replica node.
fn alice_and_carol(nodes: &Nodes) -> (Client, StaticKey, usize) {
    let live = [0, 1, 2];
    let carol_key = key_homed_on(&live, 2);
    let (_, replica) = placed(&live, carol_key.user_id());
    nodes.served_by(0, &carol_key, 2);
    let alice = nodes
        .connect(0, &key_homed_on(&live, 0))
        .expect("alice served");
    assert_eq!(nodes.which(alice.server_key()), Some(0));
    (alice, carol_key, replica)
}

/// Sends `body` from `client` to `to` until a ServerAck names it: right after a change of
/// members a node may refuse it (`OVERLOADED`) or its link may drop it, and a client sends it
/// again, as this does.
fn send_until_acked(client: &mut Client, to: UserId, body: &[u8]) -> u64 {
    let sent = client.send_message(to, body).expect("sent");
    let deadline = Instant::now() + PATIENCE;
    let mut resend_at = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match client
            .recv(Duration::from_millis(50))
            .expect("the sender's connection")
            .and_then(|stanza| stanza.kind)
        {
            Some(Kind::ServerAck(ack)) if ack.seq == sent.seq => return ack.id,
            Some(Kind::Error(error)) if error.seq == sent.seq => {
                resend_at = Instant::now() + Duration::from_millis(200);
            }
            _ => {}
        }
        if Instant::now() >= resend_at {
            client
                .resend_message(to, sent.seq, body)
                .expect("sent again");
            resend_at = Instant::now() + Duration::from_secs(3);
        }
    }
    panic!("{:?} was never acked", String::from_utf8_lossy(body));
}

/// n2 is killed with `kill -9`; its user Carol is served by her replica node, which queues
/// what she is sent meanwhile (more than a shard hands back in one turn). When n2 comes back
/// (same data, same key) Carol is sent home to it, and the replica node hands her queue back:
/// n2 delivers what it held before it died and what she was sent while it was away, each once.
#[test]
fn a_returning_node_gets_back_what_its_users_were_sent_while_it_was_away() {
    const AWAY: usize = 300;
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start(&net, &etcd, 3);
    let live = [0, 1, 2];
    let (mut alice, carol_key, replica) = alice_and_carol(&nodes);
    let carol_id = carol_key.user_id();
    let before = send_until_acked(&mut alice, carol_id, b"before n2 died");

    nodes.kill(2);
    nodes.served_by(0, &carol_key, replica);
    nodes.wait_for_members(0, &[0, 1]);
    // More than a shard hands back in one turn.
    let away: Vec<(u64, String)> = (0..AWAY)
        .map(|n| {
            let body = format!("while n2 was away {n}");
            (
                send_until_acked(&mut alice, carol_id, body.as_bytes()),
                body,
            )
        })
        .collect();

    nodes.start_node(2);
    nodes.wait_for_members(0, &live);
    nodes.wait_for_members(2, &live);
    nodes.served_by(0, &carol_key, 2);
    let mut carol = nodes.connect(0, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(2));
    let mut received = std::collections::BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    while received.len() < 1 + AWAY && Instant::now() < deadline {
        let Some(Kind::Deliver(deliver)) = carol
            .recv(Duration::from_millis(200))
            .expect("carol's connection")
            .and_then(|stanza| stanza.kind)
        else {
            continue;
        };
        carol.ack_deliver(deliver.id).expect("acked");
        let body = String::from_utf8_lossy(&deliver.body).into_owned();
        assert!(
            received.insert(deliver.id, body).is_none(),
            "a message reached the app twice"
        );
    }
    let mut expected: std::collections::BTreeMap<u64, String> = away.into_iter().collect();
    expected.insert(before, "before n2 died".to_string());
    assert_eq!(received, expected);
    nodes.wait_for_metric(2, "hop_handed_back_total");
}

/// Every node is restarted in turn (SIGTERM, which drains it; 50 more messages acked by the
/// other two; then started again, and all three members again before the next) while Alice
/// streams messages to Carol, who is offline: what Carol is sent while her node is away is
/// queued by her replica node and handed back when her node returns.
/// Alice's client reconnects to a node that runs when its node goes, with its outbox, and
/// sends again what got no answer. Every message Alice got a ServerAck for reaches Carol,
/// once.
#[test]
fn a_rolling_restart_under_load_loses_no_acked_message() {
    const MESSAGES: usize = 450;
    const WINDOW: usize = 16;
    /// A node stops after each of these counts of ServerAcks, and starts again
    /// `AWAY_FOR` ServerAcks later.
    const RESTART_AFTER: [usize; 3] = [100, 200, 300];
    const AWAY_FOR: usize = 50;
    const RESEND_AFTER: Duration = Duration::from_secs(3);
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start(&net, &etcd, 3);
    let live = [0, 1, 2];
    let alice_key = key_homed_on(&live, 0);
    let carol_key = key_homed_on(&live, 1);
    let carol_id = carol_key.user_id();
    nodes.served_by(2, &carol_key, 1);
    let connect_alice = |nodes: &Nodes, mut outbox: Option<hop_protocol::outbox::Outbox>| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            for via in 0..3 {
                if nodes.nodes[via].is_none() {
                    continue;
                }
                if let Ok(mut client) = nodes.connect(via, &alice_key) {
                    if let Some(outbox) = outbox.take() {
                        client.set_outbox(outbox);
                    }
                    return client;
                }
            }
            assert!(Instant::now() < deadline, "alice was never served again");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut alice = connect_alice(&nodes, None);

    let body = |n: usize| format!("message {n}");
    let deadline = Instant::now() + 6 * PATIENCE;
    let mut next = 0;
    let mut waiting: std::collections::HashMap<u64, (usize, Instant)> = Default::default();
    let mut acked: std::collections::BTreeMap<usize, u64> = Default::default();
    let mut restarted = 0;
    // The node stopped, and the count of ServerAcks at which it starts again.
    let mut stopped: Option<(usize, usize)> = None;
    let mut reconnects = 0;
    while acked.len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "{} of {MESSAGES} acked after {restarted} restarts",
            acked.len()
        );
        match stopped {
            Some((node, at)) if acked.len() >= at => {
                nodes.start_node(node);
                for index in live {
                    nodes.wait_for_members(index, &live);
                }
                stopped = None;
                restarted += 1;
            }
            None if restarted < 3 && acked.len() >= RESTART_AFTER[restarted] => {
                nodes.stop(restarted);
                let others: Vec<usize> = live.into_iter().filter(|&i| i != restarted).collect();
                for &index in &others {
                    nodes.wait_for_members(index, &others);
                }
                stopped = Some((restarted, acked.len() + AWAY_FOR));
            }
            _ => {}
        }
        let mut lost = false;
        while waiting.len() < WINDOW && next < MESSAGES && !lost {
            match alice.send_message(carol_id, body(next).as_bytes()) {
                Ok(sent) => {
                    waiting.insert(sent.seq, (next, Instant::now() + RESEND_AFTER));
                    next += 1;
                }
                Err(_) => lost = true,
            }
        }
        match alice.recv(Duration::from_millis(20)) {
            Ok(Some(stanza)) => match stanza.kind {
                Some(Kind::ServerAck(ack)) => {
                    if let Some((n, _)) = waiting.remove(&ack.seq) {
                        acked.insert(n, ack.id);
                    }
                }
                Some(Kind::Error(error)) => {
                    if let Some(entry) = waiting.get_mut(&error.seq) {
                        entry.1 = Instant::now() + Duration::from_millis(200);
                    }
                }
                Some(Kind::GoAway(_)) => lost = true,
                _ => {}
            },
            Ok(None) => {}
            Err(_) => lost = true,
        }
        if lost {
            // Its node is going: the next connection takes the outbox, and everything that
            // got no answer is sent again at once.
            reconnects += 1;
            let outbox = alice.into_outbox();
            alice = connect_alice(&nodes, Some(outbox));
            for entry in waiting.values_mut() {
                entry.1 = Instant::now();
            }
        }
        let now = Instant::now();
        for (&seq, (n, resend_at)) in &mut waiting {
            if now >= *resend_at {
                // A failure shows at the next recv, which reconnects.
                let _ = alice.resend_message(carol_id, seq, body(*n).as_bytes());
                *resend_at = now + RESEND_AFTER;
            }
        }
    }
    println!(
        "{MESSAGES} messages acked over a rolling restart; alice reconnected {reconnects} times"
    );

    let mut carol = nodes.connect(0, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(1));
    assert_received_as_acked(&mut carol, &acked);
}

/// n2, home of Carol, is cut off from everything (etcd, the other nodes, clients) while Alice,
/// a user of n0, sends Carol messages one after another, and Dave, a user of n2 connected from
/// inside n2's namespace, sends her one too. Once n2's lease runs out Carol's replica node
/// serves her, and she reads there what she was sent; she goes offline, is sent more, and the
/// cut heals: n2 returns, gets back what it missed, and serves her again.
///
/// Every message acked to Alice (or Dave) reaches Carol's app, with the id its ServerAck named;
/// a copy delivered again (n2 still holds what Carol read at the stand-in) carries that same
/// id, and the app, which keeps the ids it has seen as a client's store does, drops it. n2
/// acks nothing it cannot copy to Carol's replica node, so Dave's message is either refused or
/// delivered.
#[test]
fn a_partition_and_heal_of_the_recipient_s_home_loses_and_duplicates_nothing() {
    use std::collections::{BTreeMap, BTreeSet};
    /// Messages acked before the cut, while Carol reads at the stand-in, and while she is
    /// offline before the heal.
    const PHASES: [usize; 3] = [40, 40, 40];
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    // The default lease: when n2 holds etcd's leader, the others elect a new one after the
    // cut, and a shorter lease can run out on every node meanwhile (docs/cluster.md, "etcd").
    let nodes = Nodes::start_with_lease(&net, &etcd, 3, 5_000);
    let live = [0, 1, 2];
    let (mut alice, carol_key, replica) = alice_and_carol(&nodes);
    let carol_id = carol_key.user_id();
    let (addr, trust, dave_key) = (
        nodes.addr(2),
        ServerTrust::Pinned(nodes.key(2)),
        key_homed_on(&live, 2),
    );
    let mut dave = net.in_node(2, move || {
        Client::connect_home(&addr, &dave_key, &trust, Duration::from_secs(5))
            .expect("served by n2")
    });

    // By body: the id its ServerAck named.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut next = 0;
    let mut send = |alice: &mut Client, acked: &mut BTreeMap<String, u64>, count: usize| {
        for _ in 0..count {
            let body = format!("message {next}");
            next += 1;
            let id = send_until_acked(alice, carol_id, body.as_bytes());
            acked.insert(body, id);
        }
    };
    // Carol's app: the ids it has seen, and each body it got with its id.
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut dropped = 0;
    // A connection of Carol's may be sent away while the members settle: she connects again,
    // as a client does.
    let mut read = |carol: &mut Client, acked: &BTreeMap<String, u64>, dropped: &mut usize| {
        let deadline = Instant::now() + PATIENCE;
        while acked.keys().any(|body| !got.contains_key(body)) && Instant::now() < deadline {
            let stanza = match carol.recv(Duration::from_millis(200)) {
                Ok(stanza) => stanza,
                Err(error) => {
                    println!("Carol's connection ended ({error}); she connects again");
                    *carol = nodes.connect(0, &carol_key).expect("carol served");
                    continue;
                }
            };
            let Some(Kind::Deliver(deliver)) = stanza.and_then(|stanza| stanza.kind) else {
                continue;
            };
            carol.ack_deliver(deliver.id).expect("acked");
            if !seen.insert(deliver.id) {
                *dropped += 1;
                continue;
            }
            let body = String::from_utf8_lossy(&deliver.body).into_owned();
            assert!(
                got.insert(body.clone(), deliver.id).is_none(),
                "{body:?} reached the app twice, with two ids"
            );
        }
        let lost: Vec<&String> = acked
            .keys()
            .filter(|body| !got.contains_key(*body))
            .collect();
        assert!(lost.is_empty(), "acked messages lost: {lost:?}");
        for (body, id) in acked {
            assert_eq!(got[body], *id, "{body:?} with the id its ServerAck named");
        }
    };

    send(&mut alice, &mut acked, PHASES[0]);
    net.cut(2);
    let cut = Instant::now();
    let dave_sent = dave.send_message(carol_id, b"from dave").expect("sent");
    send(&mut alice, &mut acked, PHASES[1]);
    println!(
        "the {} messages sent after the cut were all acked {:?} after it",
        PHASES[1],
        cut.elapsed()
    );
    // n2 stopped serving (its lease ran out before Carol's replica took her): what it said to
    // Dave is a refusal, or nothing, or (only if the copy was made) a ServerAck.
    let mut dave_acked = None;
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match dave.recv(Duration::from_millis(100)) {
            Ok(Some(Stanza {
                kind: Some(Kind::ServerAck(ack)),
                ..
            })) if ack.seq == dave_sent.seq => dave_acked = Some(ack.id),
            Ok(Some(Stanza {
                kind: Some(Kind::GoAway(_)),
                ..
            }))
            | Err(_) => break,
            Ok(_) => {}
        }
    }
    println!("Dave's message inside the cut: acked as {dave_acked:?}");
    if let Some(id) = dave_acked {
        acked.insert("from dave".to_string(), id);
    }

    let mut carol = nodes.connect(0, &carol_key).expect("carol served");
    assert_eq!(
        nodes.which(carol.server_key()),
        Some(replica),
        "served by her replica node while n2 is cut off"
    );
    read(&mut carol, &acked, &mut dropped);
    drop(carol);
    send(&mut alice, &mut acked, PHASES[2]);

    net.heal(2);
    for node in live {
        nodes.wait_for_members(node, &live);
    }
    nodes.served_by(0, &carol_key, 2);
    let mut carol = nodes.connect(0, &carol_key).expect("carol served");
    assert_eq!(nodes.which(carol.server_key()), Some(2));
    read(&mut carol, &acked, &mut dropped);
    println!(
        "{} acked messages reached Carol once; {dropped} copies delivered again were dropped \
         by their ids",
        acked.len()
    );
}

/// Carol, a user of n2, is sent messages while her replica node is up; then her replica node
/// dies (`kill -9`), and after the members changed so does n2. The messages n2 acked before
/// the change had their copy on the first replica node only; n2 copied them again to Carol's
/// new replica node, the third, which now serves her: she receives every one.
#[test]
fn messages_acked_before_a_replica_node_died_survive_their_home_dying_next() {
    const MESSAGES: usize = 20;
    let Some(net) = Net::new(3) else { return };
    let Some(etcd) = EtcdCluster::start(&net, &[0, 1, 2]) else {
        return;
    };
    let mut nodes = Nodes::start(&net, &etcd, 3);
    let live = [0, 1, 2];
    let carol_key = key_homed_on(&live, 2);
    let carol_id = carol_key.user_id();
    let (_, replica) = placed(&live, carol_id);
    let third = 1 - replica;
    nodes.served_by(third, &carol_key, 2);
    let mut alice = nodes
        .connect(third, &key_homed_on(&live, third))
        .expect("alice served");
    let mut acked = std::collections::BTreeMap::new();
    for n in 0..MESSAGES {
        let body = format!("message {n}");
        acked.insert(n, send_until_acked(&mut alice, carol_id, body.as_bytes()));
    }

    nodes.kill(replica);
    nodes.wait_for_members(2, &[third, 2]);
    nodes.wait_for_members(third, &[third, 2]);
    assert_eq!(placed(&[third, 2], carol_id), (2, third));
    nodes.wait_for_metric_at_least(third, "hop_replicas_kept_total", MESSAGES as f64);

    nodes.kill(2);
    nodes.wait_for_members(third, &[third]);
    nodes.served_by(third, &carol_key, third);
    let mut carol = nodes.connect(third, &carol_key).expect("carol served");
    assert_received_as_acked(&mut carol, &acked);
}
