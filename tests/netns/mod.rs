//! Network namespaces for tests of several hopd nodes, and an etcd cluster inside them.
//!
//! [`Net::new`] builds a small private network per call: a hub namespace holding a Linux
//! bridge, one namespace per node and one for the test's clients, each joined to the bridge
//! by a veth pair:
//!
//! ```text
//!   hopnet-PID-N-node0   eth0 10.99.0.1/24   ── veth ── n0 ─┐
//!   hopnet-PID-N-node1   eth0 10.99.0.2/24   ── veth ── n1 ─┼─ br0   (hopnet-PID-N-hub)
//!   hopnet-PID-N-client  eth0 10.99.0.100/24 ── veth ── c  ─┘
//! ```
//!
//! Nothing is added to the host's namespace and no namespace has a route out, so every
//! `Net` is an island: two of them (in one test binary or in two) use the same addresses
//! without seeing each other, and no server in them is reachable from the host's interfaces.
//! Each veth is created inside the hub with its other end placed straight into the node's
//! namespace, so interface names only need to be unique within one namespace and stay short
//! (Linux allows 15 bytes).
//!
//! Processes run in a node's namespace through `ip netns exec` ([`Net::command`]); Rust code
//! runs there on a thread that `setns`'d into it ([`Net::in_client`], [`Net::in_node`]).
//! Dropping the `Net` kills what runs in its namespaces and deletes them; [`Net::new`] also
//! deletes the namespaces of earlier runs whose process is gone (a run killed with SIGKILL
//! cannot clean up after itself).
//!
//! [`EtcdCluster`] runs one etcd member per chosen node.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2) and, for etcd, the Debian
//! package etcd-server: `tests/cluster-install` installs both. Without them the constructors
//! print a line starting `SKIPPED:` and return `None`, and the tests return early.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The longest any single wait of the harness (and of its tests) may take before the test
/// gives up: a process to exit, etcd to become healthy, a healed link to carry traffic. A
/// safety stop, not a speed requirement; on a healthy machine each ends within seconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The longest one `ip` command may run. They take milliseconds.
const IP_COMMAND_PATIENCE: Duration = Duration::from_secs(10);

/// The first three bytes of every address in a `Net`: 10.99.0.0/24, private and never routed.
pub const SUBNET: [u8; 3] = [10, 99, 0];

/// The last byte of the client namespace's address.
pub const CLIENT_HOST: u8 = 100;

/// Node i has host byte i + 1, so nodes must stay below the client's address.
pub const NODES_MAX: usize = CLIENT_HOST as usize - 1;

/// Where `ip netns` keeps a file per named namespace (a bind mount of its nsfs inode).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Every namespace this harness makes is named `hopnet-PID-N-ROLE`: PID the test process,
/// N its count of `Net`s so far, ROLE `hub`, `nodeI` or `client`.
const NAME_PREFIX: &str = "hopnet-";

/// The etcd binary of the Debian package etcd-server.
pub const ETCD_PROGRAM: &str = "/usr/bin/etcd";

/// Client (HTTP and gRPC) and peer ports of every etcd member, on its node's address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

/// The longest one request to an etcd member may take. A write sent just after the leader
/// died goes to the dead leader and is never answered; etcd itself gives up on it only after
/// seconds, so the caller's retry should come sooner. Elections here take about a second.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest one `/health` probe may take: a member that is starting holds the request
/// until it serves clients.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Lines of a member's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 40;

/// Counts the `Net`s of this process, for unique namespace names.
static NETS_MADE: AtomicU32 = AtomicU32::new(0);

/// One `Net` is set up at a time within the process: the first `ip netns add` on a machine
/// also makes /var/run/netns a shared mount, which two at once could do twice.
static SETUP: Mutex<()> = Mutex::new(());

/// A private network of `nodes` node namespaces and one client namespace, joined by a bridge.
/// See the module documentation.
pub struct Net {
    /// `hopnet-PID-N-`, the start of each of this net's namespace names.
    prefix: String,
    nodes: usize,
    /// The namespaces made so far, in the order made; all of them are deleted on drop, also
    /// when setup failed half way.
    namespaces: Vec<String>,
    /// Processes started with [`Net::spawn`], killed on drop.
    processes: Mutex<Vec<Proc>>,
}

impl Net {
    /// Builds the network, or prints `SKIPPED: why` and returns `None` when this machine
    /// cannot (not root, no `ip`). First deletes namespaces left by earlier runs whose process
    /// no longer exists.
    pub fn new(nodes: usize) -> Option<Net> {
        assert!(
            (1..=NODES_MAX).contains(&nodes),
            "a Net has 1 to {NODES_MAX} nodes, not {nodes}"
        );
        if let Err(why) = privileged() {
            println!("SKIPPED: network namespaces need root: {why}");
            return None;
        }
        if let Err(why) = try_ip(&["-V"]) {
            println!("SKIPPED: no usable `ip` ({why}); run tests/cluster-install");
            return None;
        }

        let _setup = lock(&SETUP);
        remove_stale_namespaces();
        let count = NETS_MADE.fetch_add(1, Ordering::Relaxed);
        let mut net = Net {
            prefix: format!("{NAME_PREFIX}{}-{count}-", std::process::id()),
            nodes,
            namespaces: Vec::new(),
            processes: Mutex::new(Vec::new()),
        };
        net.build();
        Some(net)
    }

    /// How many node namespaces there are.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Node `node`'s address: 10.99.0.(node + 1).
    pub fn addr(&self, node: usize) -> Ipv4Addr {
        self.check_node(node);
        let [a, b, c] = SUBNET;
        Ipv4Addr::new(a, b, c, node as u8 + 1)
    }

    /// The client namespace's address: 10.99.0.100.
    pub fn client_addr(&self) -> Ipv4Addr {
        let [a, b, c] = SUBNET;
        Ipv4Addr::new(a, b, c, CLIENT_HOST)
    }

    /// The name of node `node`'s namespace (as `ip netns` knows it).
    pub fn namespace(&self, node: usize) -> String {
        self.check_node(node);
        format!("{}node{node}", self.prefix)
    }

    /// The name of the client namespace.
    pub fn client_namespace(&self) -> String {
        format!("{}client", self.prefix)
    }

    /// The name of the hub namespace, which holds the bridge.
    pub fn hub_namespace(&self) -> String {
        format!("{}hub", self.prefix)
    }

    /// Every namespace of this net.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A command that runs `program` inside node `node`'s namespace (`ip netns exec`); add
    /// arguments as usual. It is not tracked unless started with [`Net::spawn`], but whatever
    /// still runs in the namespace when the `Net` is dropped is killed then.
    pub fn command(&self, node: usize, program: impl AsRef<OsStr>) -> Command {
        namespace_command(&self.namespace(node), program)
    }

    /// A command that runs `program` inside the client namespace.
    pub fn client_command(&self, program: impl AsRef<OsStr>) -> Command {
        namespace_command(&self.client_namespace(), program)
    }

    /// Starts `command` (from [`Net::command`] or [`Net::client_command`]) and tracks it, so
    /// that dropping the `Net` kills it. Its stdin is empty unless the caller set one.
    pub fn spawn(&self, mut command: Command) -> Proc {
        let what = format!("{command:?}");
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {what}: {error}"));
        let process = Proc {
            pid: child.id(),
            what: what.into(),
            child: Arc::new(Mutex::new(child)),
        };
        lock(&self.processes).push(process.clone());
        process
    }

    /// Runs `body` on a new thread inside the client namespace and returns what it returns
    /// (a panic in `body` is a panic here). Sockets made in `body` stay in that namespace
    /// wherever they are used later. `body` must bound its own waits.
    pub fn in_client<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        run_in_namespace(&self.client_namespace(), body)
    }

    /// Runs `body` on a new thread inside node `node`'s namespace, like [`Net::in_client`].
    pub fn in_node<T: Send>(&self, node: usize, body: impl FnOnce() -> T + Send) -> T {
        run_in_namespace(&self.namespace(node), body)
    }

    /// Takes node `node`'s link down: its veth end on the bridge goes down, so the node
    /// reaches no one and no one reaches it. Its own address and routes stay as they were.
    pub fn cut(&self, node: usize) {
        self.set_port(node, "down");
    }

    /// Brings node `node`'s link up again after [`Net::cut`].
    pub fn heal(&self, node: usize) {
        self.set_port(node, "up");
    }

    fn set_port(&self, node: usize, state: &str) {
        self.check_node(node);
        ip(&[
            "-n",
            &self.hub_namespace(),
            "link",
            "set",
            &hub_port(Some(node)),
            state,
        ]);
    }

    fn check_node(&self, node: usize) {
        assert!(
            node < self.nodes,
            "node {node} of a Net of {} nodes",
            self.nodes
        );
    }

    /// Makes the namespaces, the bridge and the links; panics (and so drops `self`, deleting
    /// what was made) on any failure.
    fn build(&mut self) {
        let hub = self.hub_namespace();
        self.add_namespace(&hub);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);

        let members = (0..self.nodes)
            .map(|node| (Some(node), self.namespace(node), self.addr(node)))
            .chain([(None, self.client_namespace(), self.client_addr())]);
        for (node, namespace, addr) in members.collect::<Vec<_>>() {
            self.add_namespace(&namespace);
            let port = hub_port(node);
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &namespace,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &namespace, "link", "set", "lo", "up"]);
            let cidr = format!("{addr}/24");
            ip(&["-n", &namespace, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
        }
    }

    fn add_namespace(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
    }
}

impl Drop for Net {
    /// Kills the processes started with [`Net::spawn`] (SIGKILL, then waits for each), then
    /// whatever else still runs in the namespaces, then deletes the namespaces, which takes
    /// the veths and the bridge with them. Reports failures without panicking: this also
    /// runs while a failed test unwinds.
    fn drop(&mut self) {
        for process in lock(&self.processes).drain(..) {
            process.kill_quietly();
        }
        for namespace in self.namespaces.iter().rev() {
            remove_namespace(namespace);
        }
    }
}

/// A process started through a [`Net`]. Clones share it. Only this handle reaps it, so its
/// pid cannot be reused by another process while the handle says it runs.
#[derive(Clone)]
pub struct Proc {
    pid: u32,
    what: Arc<str>,
    child: Arc<Mutex<Child>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` unless the process has exited; returns whether it was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        let mut child = lock(&self.child);
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        // The process is not reaped (only this handle reaps it), so the pid is still its own.
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal)
            .unwrap_or_else(|error| panic!("cannot signal {}: {error}", self.what));
        true
    }

    /// Kills the process with SIGKILL and waits for it to exit.
    pub fn kill(&self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait(PATIENCE)
    }

    /// Waits up to `patience` for the process to exit; panics naming it if it does not.
    pub fn wait(&self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {}) did not exit within {patience:?}",
                self.what,
                self.pid
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .try_wait()
            .unwrap_or_else(|error| panic!("cannot wait for {}: {error}", self.what))
    }

    /// SIGKILL and a bounded wait, reporting instead of panicking (for drops).
    fn kill_quietly(&self) {
        let mut child = lock(&self.child);
        if let Err(error) = child.kill() {
            eprintln!("netns: cannot kill {}: {error}", self.what);
            return;
        }
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => {
                    eprintln!("netns: cannot wait for {}: {error}", self.what);
                    return;
                }
            }
        }
        eprintln!(
            "netns: {} (pid {}) did not exit within {PATIENCE:?} of SIGKILL",
            self.what, self.pid
        );
    }
}

/// The names `ip netns list` prints.
pub fn netns_list() -> Vec<String> {
    let output = ip(&["netns", "list"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// An etcd cluster of one member per chosen node of a [`Net`], each with its own data folder
/// and log in one temporary folder. Members are numbered by their position in the `nodes`
/// given to [`EtcdCluster::start`]. Dropping the cluster kills every member.
pub struct EtcdCluster<'net> {
    net: &'net Net,
    members: Vec<EtcdMember>,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique per cluster so that members of two clusters never
    /// take each other for peers.
    token: String,
    folder: tempfile::TempDir,
}

struct EtcdMember {
    node: usize,
    name: String,
    data: PathBuf,
    log: PathBuf,
    process: Option<Proc>,
}

impl<'net> EtcdCluster<'net> {
    /// Starts one member in each of `nodes`' namespaces and waits until every one reports
    /// itself healthy, or prints `SKIPPED:` and returns `None` when etcd is not installed.
    /// Panics with the members' log tails if they are not healthy within [`PATIENCE`].
    pub fn start(net: &'net Net, nodes: &[usize]) -> Option<Self> {
        assert!(!nodes.is_empty(), "an etcd cluster has at least one member");
        if !Path::new(ETCD_PROGRAM).exists() {
            println!("SKIPPED: no {ETCD_PROGRAM}; run tests/cluster-install");
            return None;
        }
        let folder = tempfile::tempdir().expect("temporary folder for etcd");
        let members: Vec<EtcdMember> = nodes
            .iter()
            .map(|&node| {
                let name = format!("etcd{node}");
                EtcdMember {
                    node,
                    data: folder.path().join(&name),
                    log: folder.path().join(format!("{name}.log")),
                    name,
                    process: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| {
                format!(
                    "{}=http://{}:{ETCD_PEER_PORT}",
                    member.name,
                    net.addr(member.node)
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            net,
            members,
            initial_cluster,
            token: format!("{}etcd", net.prefix),
            folder,
        };
        for member in 0..cluster.members.len() {
            cluster.launch(member, "new");
        }
        let deadline = Instant::now() + PATIENCE;
        for member in 0..cluster.members.len() {
            cluster.wait_healthy_until(member, deadline);
        }
        Some(cluster)
    }

    /// `http://ADDR:2379` of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|member| self.endpoint(member))
            .collect()
    }

    /// `http://ADDR:2379` of one member.
    pub fn endpoint(&self, member: usize) -> String {
        let node = self.members[member].node;
        format!("http://{}:{ETCD_CLIENT_PORT}", self.net.addr(node))
    }

    /// The node whose namespace member `member` runs in.
    pub fn node(&self, member: usize) -> usize {
        self.members[member].node
    }

    /// Kills member `member` with SIGKILL and waits for it to exit. Its data stays.
    pub fn kill(&mut self, member: usize) {
        let process = self.members[member]
            .process
            .take()
            .unwrap_or_else(|| panic!("etcd member {member} is not running"));
        process.kill();
    }

    /// Starts a killed member again on its data folder and waits until it is healthy.
    pub fn restart(&mut self, member: usize) {
        assert!(
            self.members[member].process.is_none(),
            "etcd member {member} is still running"
        );
        self.launch(member, "existing");
        self.wait_healthy_until(member, Instant::now() + PATIENCE);
    }

    /// Writes `key` = `value` through member `member`'s JSON gateway, from the client
    /// namespace. `Err` says what failed: no connection, no answer within
    /// [`ETCD_REQUEST_TIMEOUT`] (as while a new leader is elected), or etcd's error.
    pub fn put(&self, member: usize, key: &[u8], value: &[u8]) -> Result<(), String> {
        let body = serde_json::json!({ "key": base64(key), "value": base64(value) });
        self.gateway(member, "/v3/kv/put", body).map(drop)
    }

    /// Reads `key` through member `member`'s JSON gateway (a linearizable read), from the
    /// client namespace: `Ok(None)` when it has no value.
    pub fn get(&self, member: usize, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let body = serde_json::json!({ "key": base64(key) });
        let answer = self.gateway(member, "/v3/kv/range", body)?;
        let Some(value) = answer["kvs"].get(0).map(|kv| &kv["value"]) else {
            return Ok(None);
        };
        // etcd leaves out empty fields, an empty value among them.
        let value = value.as_str().unwrap_or("");
        base64::engine::general_purpose::STANDARD
            .decode(value)
            .map(Some)
            .map_err(|error| format!("etcd sent a value that is not base64 ({error}): {answer}"))
    }

    /// Member `member`'s log so far (both runs, after a restart).
    pub fn log(&self, member: usize) -> String {
        std::fs::read_to_string(&self.members[member].log).unwrap_or_default()
    }

    /// One POST of `body` to the gateway at `path`; the answer as JSON if etcd said 200.
    fn gateway(
        &self,
        member: usize,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let url = format!("{}{path}", self.endpoint(member));
        self.net.in_client(move || {
            let (status, text) = http(&url, Some(&body.to_string()), ETCD_REQUEST_TIMEOUT)?;
            if status != 200 {
                return Err(format!("{url} answered {status}: {text}"));
            }
            serde_json::from_str(&text).map_err(|error| format!("{url} sent {text:?}: {error}"))
        })
    }

    fn launch(&mut self, member: usize, state: &str) {
        let net = self.net;
        let EtcdMember {
            node,
            name,
            data,
            log,
            ..
        } = &self.members[member];
        let addr = net.addr(*node);
        let peer_url = format!("http://{addr}:{ETCD_PEER_PORT}");
        let client_url = format!("http://{addr}:{ETCD_CLIENT_PORT}");
        // Appends, so that a restarted member's log follows its first run's.
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|error| panic!("{}: {error}", log.display()));
        let mut command = net.command(*node, ETCD_PROGRAM);
        // etcd reads every flag from ETCD_* variables too; only the flags below count.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(variable);
            }
        }
        command
            .arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(data)
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Milliseconds: a heartbeat every 50, a new election after 500 without one, so
            // that a test which kills the leader waits half a second, not the default 1.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        let process = net.spawn(command);
        self.members[member].process = Some(process);
    }

    /// Waits until member `member` answers `GET /health` with `"health": "true"` (it has a
    /// leader and no alarm), polling from the client namespace.
    fn wait_healthy_until(&self, member: usize, deadline: Instant) {
        let url = format!("{}/health", self.endpoint(member));
        let process = self.members[member]
            .process
            .as_ref()
            .expect("member started");
        let outcome = self.net.in_client(|| {
            let mut last = String::from("no answer yet");
            while Instant::now() < deadline {
                if let Some(status) = process.try_wait() {
                    return Err(format!("exited with {}", describe(status)));
                }
                match http(&url, None, HEALTH_PROBE_TIMEOUT) {
                    Ok((200, text)) if is_healthy(&text) => return Ok(()),
                    Ok((status, text)) => last = format!("{status} {text}"),
                    Err(error) => last = error,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(format!("not healthy in time; last answer: {last}"))
        });
        if let Err(why) = outcome {
            let mut report = format!(
                "etcd member {member} ({}, {url}): {why}\n",
                self.members[member].name
            );
            for other in &self.members {
                report.push_str(&format!(
                    "--- last {LOG_TAIL_LINES} lines of {}\n{}\n",
                    other.log.display(),
                    tail(&other.log, LOG_TAIL_LINES)
                ));
            }
            panic!("{report}");
        }
    }
}

impl Drop for EtcdCluster<'_> {
    /// Kills every member before the temporary folder with their data goes.
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(process) = member.process.take() {
                process.kill_quietly();
            }
        }
    }
}

/// Whether this process may make namespaces: effective uid 0 with CAP_SYS_ADMIN (mounts,
/// setns) and CAP_NET_ADMIN (links, addresses).
fn privileged() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|error| format!("cannot read /proc/self/status: {error}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let effective_uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    if effective_uid != "0" {
        return Err(format!("effective uid is {effective_uid:?}"));
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let capabilities = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
    for (bit, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        if capabilities & (1 << bit) == 0 {
            return Err(format!("root without {name}"));
        }
    }
    Ok(())
}

/// The veth end on the bridge for node `node`, or for the client when `None`.
fn hub_port(node: Option<usize>) -> String {
    match node {
        Some(node) => format!("n{node}"),
        None => "c".to_string(),
    }
}

fn namespace_command(namespace: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

/// Runs `body` on a new thread that first joins `namespace`'s network namespace. Only that
/// thread moves (and the threads it starts); the test's own thread stays where it was.
fn run_in_namespace<T: Send>(namespace: &str, body: impl FnOnce() -> T + Send) -> T {
    let path = Path::new(NETNS_DIR).join(namespace);
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("in {namespace}"))
            .spawn_scoped(scope, || {
                let file =
                    File::open(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|error| panic!("setns into {namespace}: {error}"));
                body()
            })
            .expect("a thread");
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS` and returns its output; panics with its stderr if it fails or takes longer
/// than [`IP_COMMAND_PATIENCE`].
fn ip(args: &[&str]) -> Output {
    match try_ip(args) {
        Ok(output) => output,
        Err(why) => panic!("{why}"),
    }
}

fn try_ip(args: &[&str]) -> Result<Output, String> {
    let what = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("{what}: {error}"))?;
    // The output of these commands is far below a pipe's capacity, so the child never blocks
    // on a full pipe while this polls.
    let deadline = Instant::now() + IP_COMMAND_PATIENCE;
    while child
        .try_wait()
        .map_err(|error| format!("{what}: {error}"))?
        .is_none()
    {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: no exit within {IP_COMMAND_PATIENCE:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let output = child
        .wait_with_output()
        .map_err(|error| format!("{what}: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            describe(output.status),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output)
}

/// Kills whatever still runs in `namespace` and deletes it, reporting failures without
/// panicking (drops call this).
fn remove_namespace(namespace: &str) {
    match try_ip(&["netns", "pids", namespace]) {
        Ok(output) => {
            let ours = std::process::id();
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                match pid.parse::<u32>() {
                    // Never this process (its main thread never enters a namespace; this is a
                    // guard, not a case that happens).
                    Ok(pid) if pid == ours => {}
                    Ok(pid) => {
                        // A process that exited meanwhile is fine: ESRCH is ignored.
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    Err(_) => eprintln!("netns: `ip netns pids {namespace}` printed {pid:?}"),
                }
            }
        }
        Err(why) => eprintln!("netns: {why}"),
    }
    if let Err(why) = try_ip(&["netns", "delete", namespace]) {
        eprintln!("netns: {why}");
    }
}

/// Deletes the namespaces of earlier runs of this harness whose process no longer exists.
/// A process that exists keeps its namespaces even if its pid was reused by an unrelated
/// process: they go once that one exits too.
fn remove_stale_namespaces() {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(error) if error.kind() == ErrorKind::NotFound => return,
        Err(error) => panic!("{NETNS_DIR}: {error}"),
    };
    for entry in entries {
        let name = entry
            .unwrap_or_else(|error| panic!("{NETNS_DIR}: {error}"))
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !alive(pid) {
            eprintln!("netns: deleting {name}, left by process {pid} which is gone");
            remove_namespace(&name);
        }
    }
}

/// Whether process `pid` exists and has not exited. A killed test process can stay a zombie
/// for a while (until its new parent reaps it); its namespaces are stale all the same.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses, so the state follows the
    // last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// One HTTP request from the calling thread's namespace: GET, or POST of a JSON `body`.
/// Returns the status and the body, or why there was none.
fn http(url: &str, body: Option<&str>, timeout: Duration) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Never through a proxy named in the environment: these addresses exist only in the
        // namespaces.
        .proxy(None)
        .build()
        .into();
    let response = match body {
        None => agent.get(url).call(),
        Some(body) => agent
            .post(url)
            .header("content-type", "application/json")
            .send(body),
    };
    let mut response = response.map_err(|error| format!("{url}: {error}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|error| format!("{url}: {error}"))?;
    Ok((status, text))
}

/// Whether a `/health` answer says healthy: `{"health":"true"}` (newer etcd adds a reason).
fn is_healthy(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|answer| answer["health"] == "true")
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB).
fn tail(path: &Path, lines: usize) -> String {
    const TAIL_BYTES_MAX: u64 = 64 * 1024;
    let mut text = String::new();
    let read = File::open(path).and_then(|mut file| {
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(error) = read {
        return format!("({}: {error})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe(status: ExitStatus) -> String {
    match status.signal() {
        Some(signal) => format!("signal {signal}"),
        None => status.to_string(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
