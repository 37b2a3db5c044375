//! hopd's configuration: embedded defaults, overridden by a TOML file (`--config`), overridden
//! by command-line flags. Every setting has a flag of the same name (`queue_messages_max` is
//! `--queue-messages-max`). `hopd --print-config` prints the effective settings as TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The effective settings. Units are in the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (`SO_REUSEPORT`). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Data folder: server key, account bindings. Created on first start.
    pub data: PathBuf,
    /// Shard threads; 0 means one per CPU this process may use.
    pub shards: usize,
    /// Pin each shard thread to one CPU.
    pub pin_cores: bool,
    /// After a loop turn that had work, a shard looks for more without sleeping for this many
    /// microseconds before it blocks, so that the next message finds it awake instead of
    /// paying the thread's wake-up (about 10 us on a virtual machine). Costs up to this much
    /// CPU per quiet gap between messages. 0: a shard blocks as soon as it has nothing to do.
    pub idle_poll_us: u64,
    /// A connection must finish the Noise handshake within this time.
    pub handshake_timeout_ms: u64,
    /// An authenticated connection that sends nothing for this long is closed (clients ping).
    pub idle_timeout_ms: u64,
    /// Connections the whole server holds; each shard takes an equal share.
    pub connections_max: usize,
    /// Admission (`docs/security.md`), decided at accept before any handshake work; each 0
    /// turns that limit off. Handshakes each shard starts per second (its bucket holds one
    /// second's worth): new connections never take more than this share of a core.
    pub shard_handshakes_per_second: u32,
    /// Handshakes one source address (an IPv4 address, an IPv6 /64) starts per second, over
    /// the whole server.
    pub address_handshakes_per_second: u32,
    /// ... and at once after a quiet while (its bucket's size).
    pub address_handshake_burst: u32,
    /// Handshakes one source address has unfinished at once.
    pub address_handshakes_max: u32,
    /// Connections one source address holds at once.
    pub address_connections_max: u32,
    /// Connections whose handshake messages one loop turn of a shard works on, at most, after
    /// the turn's other input is answered (each costs ~260 us of X25519); the others wait,
    /// in order, for the next turns. Bounds how long a flood of handshakes makes a turn, and
    /// so the wait of the messages behind it. 0: no cap, handshakes are worked on as they
    /// are read.
    pub handshakes_per_turn: usize,
    /// Work on the Noise handshakes on a thread per shard that runs below the shard's loop
    /// (nice 10), so that a flood of them takes the CPU the loops leave, not the time of
    /// connected users' messages. A shard under a real-time policy keeps them on its loop.
    /// false: the loop works on them, `handshakes_per_turn` at most a turn.
    pub handshake_thread: bool,
    /// Bytes waiting to be written to one connection before it counts as not reading and is
    /// closed.
    pub send_buffer_bytes_max: usize,
    /// Bytes waiting to be written to all connections together (each shard takes an equal
    /// share); past it the connections holding the most are closed first. 0: no budget.
    pub send_buffers_bytes_max: usize,
    /// Mails each shard-to-shard mailbox holds before backpressure.
    pub mailbox_depth: usize,
    /// Messages queued for one user.
    pub queue_messages_max: usize,
    /// Receipts queued for one user, counted apart from its messages: receipts never take the
    /// room of messages.
    pub queue_receipts_max: usize,
    /// Message body bytes queued for one user.
    pub queue_bytes_max: usize,
    /// Message body bytes queued on one shard, all users together.
    pub shard_queue_bytes_max: usize,
    /// Deliveries pushed to one connection and not yet acked.
    pub inflight_max: usize,
    /// Body bytes of those deliveries (one is always pushed, however large). At most half of
    /// `send_buffer_bytes_max`, so a reading client is never taken for one that does not read.
    pub inflight_bytes_max: usize,
    /// Users one user may watch.
    pub subscriptions_max: usize,
    /// Watchers one user may have.
    pub subscribers_max: usize,
    /// Companion devices one account may link besides its primary (WhatsApp's limit is 4).
    pub companions_max: usize,
    /// Members one group may have, its creator included (at most 1,024).
    pub group_members_max: usize,
    /// Groups one account may be a member of (at most 65,535).
    pub groups_max: usize,
    /// Messages one device may send per second (every Send counts); past it a Send gets
    /// `RATE_LIMITED`, to that sender alone. 0: no limit.
    pub sender_messages_per_second: u32,
    /// ... and at once after a quiet while.
    pub sender_message_burst: u32,
    /// Read receipts one device may send per second. 0: no limit.
    pub sender_reads_per_second: u32,
    /// ... and at once after a quiet while.
    pub sender_read_burst: u32,
    /// The most of one recipient's queue (of `queue_messages_max` and `queue_bytes_max`) one
    /// sender may take, in percent; past it that sender gets `QUEUE_FULL` while others' messages
    /// are taken. 100: no share.
    pub queue_sender_percent: u8,
    /// The most of a shard's queue bytes (`shard_queue_bytes_max`) one sender may take, group
    /// messages' copies included, in percent. 100: no share.
    pub shard_queue_sender_percent: u8,
    /// Who may make an account: `open` (a key's first connection does), `token` (a new
    /// key's first connection redeems a one-time token from `hop admin token`) or `closed`
    /// (only keys bound before connect; a new key is sent away with `NOT_REGISTERED`).
    pub registration: Registration,
    /// A registration token not redeemed within this long after it was issued is refused.
    pub token_ttl_ms: u64,
    /// An account none of whose devices connected for this long (counted while hopd runs, in
    /// whole seconds) expires: its queue, binding, devices and presence setting are deleted.
    /// 0: accounts never expire.
    pub account_expiry_ms: u64,
    /// When a queued message is durable, and so when its ServerAck leaves: `always` (fsync
    /// every loop turn that queued something), `batch` (group commit, the default) or `none`
    /// (written to the page cache, never fsynced: survives a crash of hopd, not of the machine).
    pub durability: DurabilityPolicy,
    /// Group commit (`batch`, `none`): commit at most this long after a batch's first record.
    pub batch_delay_ms: u64,
    /// Group commit (`batch`, `none`): commit as soon as a batch holds this many records.
    pub batch_records_max: u32,
    /// `batch`, `none`: how long a message or receipt for a connected device waits for the
    /// device's Ack before it is written to the offline queue; one acked in time is never
    /// written. 0: every item goes to the group commit at once.
    pub ack_wait_ms: u64,
    /// Undelivered messages and receipts are deleted this long after they were sent.
    pub offline_ttl_ms: u64,
    /// An offline-queue log segment is sealed once it holds this many bytes.
    pub segment_bytes_max: u32,
    /// A log segment holding records is sealed this long after it was created.
    pub segment_age_max_ms: u64,
    /// A sealed segment holding delivered or expired records is compacted this long after it
    /// was sealed. With `segment_age_max_ms`, the bound on how long a delivered message's bytes
    /// stay in the data folder.
    pub compact_after_ms: u64,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `hop_gateway=debug`.
    pub log: String,
    /// Log lines as `text` (for people) or `json` (one object per line, for log collectors).
    pub log_format: LogFormat,
    /// IO backend: `uring` (Linux; falls back to `mio`, saying why, where the kernel lacks
    /// it) or `mio` (epoll/kqueue).
    pub backend: BackendName,
    /// How the `uring` backend receives: `poll` (a readiness poll armed per connection, a
    /// receive when it fires; the least kernel memory per idle connection) or
    /// `multishot-recv` (a multishot receive armed per connection; one operation less per
    /// read).
    pub uring_receive: UringReceive,
    /// Linux: let the kernel back hopd's memory with transparent huge pages (where THP is
    /// `always` or `madvise`). Off by default: huge pages make a table reserved for the
    /// connection ceiling resident in 2 MiB steps at once, so memory follows the ceiling
    /// instead of the connections held; on suits servers near their ceiling that want fewer
    /// TLB misses.
    pub transparent_huge_pages: bool,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz` and the JSON admin
    /// API that `hop admin` speaks), or `off`. It has no authentication: keep it on a loopback
    /// or private address.
    pub admin: AdminAddress,
    /// Lame-duck drain (SIGTERM, `hop admin drain`): hopd stops accepting and sends GoAway to
    /// its connections spread evenly over this window, so that clients do not reconnect all at
    /// once; it exits when the last connection has gone or the window has passed. 0 closes
    /// every connection at once.
    pub drain_ms: u64,
    /// etcd endpoints (`http://host:2379`) of the cluster this node is a member of; empty: a
    /// single hopd, no cluster (`docs/cluster.md`).
    pub cluster_etcd: Vec<String>,
    /// This node's name in its cluster: unique, and the same across restarts (users are
    /// placed by it). Empty: the host name.
    pub node_id: String,
    /// Where clients reach this node ("host:port"): other nodes redirect its users here.
    /// Empty: the listen address, which must then not be a wildcard.
    pub advertise: String,
    /// A node whose cluster lease etcd has not seen renewed for this long is dropped and its
    /// users move; the node itself stops serving after the same time without etcd.
    pub cluster_lease_ms: u64,
}

/// The admin listener setting: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AdminAddress {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for AdminAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "off" {
            return Ok(Self::Off);
        }
        text.parse().map(Self::At).map_err(|_| {
            format!("{text:?} is neither an address (such as 127.0.0.1:7789) nor \"off\"")
        })
    }
}

impl TryFrom<String> for AdminAddress {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<AdminAddress> for String {
    fn from(address: AdminAddress) -> Self {
        match address {
            AdminAddress::Off => "off".to_string(),
            AdminAddress::At(address) => address.to_string(),
        }
    }
}

/// The log format setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The IO backend setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendName {
    Uring,
    Mio,
}

impl Default for BackendName {
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            Self::Uring
        } else {
            Self::Mio
        }
    }
}

/// The `uring` backend's receive mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UringReceive {
    #[default]
    Poll,
    MultishotRecv,
}

/// See [`Config::registration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// A key's first connection makes its account.
    Open,
    /// Only keys bound before may connect (and companions their primaries link).
    Closed,
    /// A new key's first stanza must be `Register` with a one-time token the operator issued
    /// (`hop admin token`); keys bound before connect as always.
    Token,
}

/// See [`Config::durability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityPolicy {
    Always,
    Batch,
    None,
}

impl Default for Config {
    fn default() -> Self {
        let router = hop_router::Limits::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7788)),
            data: PathBuf::from("hop-data"),
            shards: 0,
            pin_cores: true,
            idle_poll_us: 0,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            connections_max: 1_000_000,
            shard_handshakes_per_second: 1_000,
            address_handshakes_per_second: 50,
            address_handshake_burst: 500,
            address_handshakes_max: 256,
            address_connections_max: 10_000,
            handshakes_per_turn: 2,
            handshake_thread: true,
            send_buffer_bytes_max: 4 * 1024 * 1024,
            send_buffers_bytes_max: 1024 * 1024 * 1024,
            mailbox_depth: 16 * 1024,
            queue_messages_max: router.queue_messages_max,
            queue_receipts_max: router.queue_receipts_max,
            queue_bytes_max: router.queue_bytes_max,
            shard_queue_bytes_max: router.shard_queue_bytes_max,
            inflight_max: router.inflight_max,
            inflight_bytes_max: router.inflight_bytes_max,
            subscriptions_max: router.subscriptions_max,
            subscribers_max: router.subscribers_max,
            companions_max: router.companions_max,
            group_members_max: router.group_members_max,
            groups_max: router.groups_max,
            sender_messages_per_second: router.sender_messages.per_second,
            sender_message_burst: router.sender_messages.burst,
            sender_reads_per_second: router.sender_reads.per_second,
            sender_read_burst: router.sender_reads.burst,
            queue_sender_percent: router.queue_sender_percent,
            shard_queue_sender_percent: router.shard_queue_sender_percent,
            registration: Registration::Open,
            token_ttl_ms: 7 * 24 * 60 * 60 * 1000,
            account_expiry_ms: ACCOUNT_EXPIRY_DEFAULT_MS,
            durability: DurabilityPolicy::Batch,
            batch_delay_ms: 2,
            batch_records_max: 1024,
            ack_wait_ms: ACK_WAIT_DEFAULT_MS,
            offline_ttl_ms: 30 * 24 * 60 * 60 * 1000,
            segment_bytes_max: 64 * 1024 * 1024,
            segment_age_max_ms: 5 * 60 * 1000,
            compact_after_ms: 5 * 60 * 1000,
            log: "info".to_string(),
            log_format: LogFormat::Text,
            backend: BackendName::default(),
            uring_receive: UringReceive::default(),
            transparent_huge_pages: false,
            admin: AdminAddress::At(SocketAddr::from(([127, 0, 0, 1], 7789))),
            drain_ms: 30_000,
            cluster_etcd: Vec::new(),
            node_id: String::new(),
            advertise: String::new(),
            cluster_lease_ms: 5_000,
        }
    }
}

/// hopd: the hop messaging gateway.
#[derive(Debug, Parser)]
#[command(
    name = "hopd",
    version,
    about = "hopd, the hop messaging gateway: holds encrypted client connections (Noise) on every \
             core, routes messages between them, and keeps offline messages on disk until \
             they are delivered",
    after_help = "Settings: embedded defaults, then --config FILE, then flags. \
                  `hopd --print-config` prints the effective settings. \
                  Signals: SIGTERM drains, SIGINT stops at once, SIGHUP reloads log and drain_ms."
)]
pub struct Args {
    /// TOML file of settings (any of the keys below, snake_case).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Take over a hopd running on the same data folder (same settings): its listening
    /// sockets and every live connection move to this process, and it exits (docs/operations.md,
    /// "Upgrade without dropping connections").
    #[arg(long)]
    pub takeover: bool,
    /// Address every shard listens on (SO_REUSEPORT); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data folder: server key, accounts, offline queues; created on first start.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Shard threads (0: one per CPU this process may use; at most 256).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Pin each shard thread to one CPU.
    #[arg(long, value_name = "BOOL")]
    pub pin_cores: Option<bool>,
    /// After a turn with work, a shard polls without sleeping this long before it blocks (0 to 1000; 0: off).
    #[arg(long, value_name = "US")]
    pub idle_poll_us: Option<u64>,
    /// A connection must finish the Noise handshake within this many milliseconds.
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// An authenticated connection silent this long is closed (clients ping).
    #[arg(long, value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Connections the whole server holds, split evenly over the shards.
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,
    /// Handshakes each shard starts per second; more are refused (busy) before any work. 0: off.
    #[arg(long, value_name = "N")]
    pub shard_handshakes_per_second: Option<u32>,
    /// Handshakes one source address (IPv4 address, IPv6 /64) starts per second. 0: off.
    #[arg(long, value_name = "N")]
    pub address_handshakes_per_second: Option<u32>,
    /// Handshakes one source address may start at once after a quiet while.
    #[arg(long, value_name = "N")]
    pub address_handshake_burst: Option<u32>,
    /// Handshakes one source address may have unfinished at once. 0: off.
    #[arg(long, value_name = "N")]
    pub address_handshakes_max: Option<u32>,
    /// Connections one source address may hold at once. 0: off.
    #[arg(long, value_name = "N")]
    pub address_connections_max: Option<u32>,
    /// Connections whose handshake messages one shard's loop turn works on, after the turn's other input; the rest wait for the next turns. 0: no cap.
    #[arg(long, value_name = "N")]
    pub handshakes_per_turn: Option<usize>,
    /// Work on Noise handshakes on a low-priority thread per shard, not on the shard's loop.
    #[arg(long, value_name = "BOOL")]
    pub handshake_thread: Option<bool>,
    /// Bytes waiting to be written to one connection before it is closed as not reading.
    #[arg(long, value_name = "BYTES")]
    pub send_buffer_bytes_max: Option<usize>,
    /// Bytes waiting to be written to all connections together; past it the slowest readers are closed. 0: none.
    #[arg(long, value_name = "BYTES")]
    pub send_buffers_bytes_max: Option<usize>,
    /// Mails each shard-to-shard mailbox holds before backpressure.
    #[arg(long, value_name = "N")]
    pub mailbox_depth: Option<usize>,
    /// Messages queued for one user.
    #[arg(long, value_name = "N")]
    pub queue_messages_max: Option<usize>,
    /// Receipts queued for one user, apart from its messages.
    #[arg(long, value_name = "N")]
    pub queue_receipts_max: Option<usize>,
    /// Message body bytes queued for one user.
    #[arg(long, value_name = "BYTES")]
    pub queue_bytes_max: Option<usize>,
    /// Message body bytes queued on one shard, all users together.
    #[arg(long, value_name = "BYTES")]
    pub shard_queue_bytes_max: Option<usize>,
    /// Deliveries pushed to one connection and not yet acked.
    #[arg(long, value_name = "N")]
    pub inflight_max: Option<usize>,
    /// Body bytes of those deliveries; at most half of --send-buffer-bytes-max.
    #[arg(long, value_name = "BYTES")]
    pub inflight_bytes_max: Option<usize>,
    /// Users one user may watch.
    #[arg(long, value_name = "N")]
    pub subscriptions_max: Option<usize>,
    /// Watchers one user may have.
    #[arg(long, value_name = "N")]
    pub subscribers_max: Option<usize>,
    /// Companion devices one account may link besides its primary.
    #[arg(long, value_name = "N")]
    pub companions_max: Option<usize>,
    /// Members one group may have, its creator included (at most 1,024).
    #[arg(long, value_name = "N")]
    pub group_members_max: Option<usize>,
    /// Groups one account may be a member of (at most 65,535).
    #[arg(long, value_name = "N")]
    pub groups_max: Option<usize>,
    /// Messages one device may send per second; past it a Send gets RATE_LIMITED. 0: no limit.
    #[arg(long, value_name = "N")]
    pub sender_messages_per_second: Option<u32>,
    /// Messages one device may send at once after a quiet while.
    #[arg(long, value_name = "N")]
    pub sender_message_burst: Option<u32>,
    /// Read receipts one device may send per second. 0: no limit.
    #[arg(long, value_name = "N")]
    pub sender_reads_per_second: Option<u32>,
    /// Read receipts one device may send at once after a quiet while.
    #[arg(long, value_name = "N")]
    pub sender_read_burst: Option<u32>,
    /// The most of one recipient's queue one sender may take, in percent (1-100; 100: no share).
    #[arg(long, value_name = "PERCENT")]
    pub queue_sender_percent: Option<u8>,
    /// The most of a shard's queue bytes one sender may take, in percent (1-100; 100: no share).
    #[arg(long, value_name = "PERCENT")]
    pub shard_queue_sender_percent: Option<u8>,
    /// Who may make an account: open (a key's first connection), token (with a one-time token from `hop admin token`) or closed (only keys bound before).
    #[arg(long, value_enum, value_name = "POLICY")]
    pub registration: Option<Registration>,
    /// A registration token not redeemed within this many milliseconds of its issue is refused.
    #[arg(long, value_name = "MS")]
    pub token_ttl_ms: Option<u64>,
    /// An account none of whose devices connected for this long (while hopd runs) expires with its queue (0: never).
    #[arg(long, value_name = "MS")]
    pub account_expiry_ms: Option<u64>,
    /// When a queued message is durable and its ServerAck leaves: always (fsync every turn), batch (group commit) or none (page cache only).
    #[arg(long, value_enum, value_name = "POLICY")]
    pub durability: Option<DurabilityPolicy>,
    /// Group commit: commit at most this long after a batch's first record.
    #[arg(long, value_name = "MS")]
    pub batch_delay_ms: Option<u64>,
    /// Group commit: commit as soon as a batch holds this many records.
    #[arg(long, value_name = "N")]
    pub batch_records_max: Option<u32>,
    /// How long an item for a connected device waits for its Ack before it is written to the offline queue (0 to 1000; 0: at once).
    #[arg(long, value_name = "MS")]
    pub ack_wait_ms: Option<u64>,
    /// Undelivered messages and receipts are deleted this long after they were sent.
    #[arg(long, value_name = "MS")]
    pub offline_ttl_ms: Option<u64>,
    /// An offline-queue log segment is sealed at this size (1 MiB to 1 GiB).
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes_max: Option<u32>,
    /// A log segment holding records is sealed this long after it was created.
    #[arg(long, value_name = "MS")]
    pub segment_age_max_ms: Option<u64>,
    /// A sealed segment with delivered or expired records is compacted this long after it was sealed.
    #[arg(long, value_name = "MS")]
    pub compact_after_ms: Option<u64>,
    /// Log filter (tracing EnvFilter syntax, e.g. info or hop_gateway=debug); reloaded on SIGHUP.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// Log lines as text (for people) or json (one object per line, for log collectors).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// IO backend: uring (Linux; falls back to mio, saying why) or mio (epoll/kqueue).
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<BackendName>,
    /// uring receive mode: poll (least kernel memory per idle connection) or multishot-recv.
    #[arg(long, value_name = "MODE")]
    pub uring_receive: Option<UringReceive>,
    /// Linux: let the kernel back hopd's memory with transparent huge pages.
    #[arg(long, value_name = "BOOL")]
    pub transparent_huge_pages: Option<bool>,
    /// Admin listener (/metrics, /healthz, /readyz, hop admin) or off; no authentication, keep it private.
    #[arg(long, value_name = "ADDR|off")]
    pub admin: Option<AdminAddress>,
    /// Lame-duck drain on SIGTERM: GoAways spread over this many milliseconds, then exit; reloaded on SIGHUP.
    #[arg(long, value_name = "MS")]
    pub drain_ms: Option<u64>,
    /// etcd endpoints of this node's cluster, comma-separated (http://host:2379); none: a single hopd.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub cluster_etcd: Option<Vec<String>>,
    /// This node's name in its cluster, unique and stable across restarts; empty: the host name.
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Where clients reach this node (host:port), for redirects from the other nodes; empty: the listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Cluster lease: a node not renewed for this long is dropped and its users move.
    #[arg(long, value_name = "MS")]
    pub cluster_lease_ms: Option<u64>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Tools that work on a data folder without starting the server.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Inspect a data folder.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Queue depths per shard, the oldest message's age and the largest queues.
    Queues {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// How many of the largest queues to list.
        #[arg(long, value_name = "N", default_value_t = 10)]
        largest: usize,
    },
    /// Rewrites damaged account files (`DATA/accounts/`) with their valid records only,
    /// keeping a `.damaged` copy of each. Run it when hopd refuses to start over a damaged
    /// account record; a dropped binding is made again at its user's next connection.
    RepairAccounts {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// The largest shard count: server ids carry the shard in 8 bits.
pub const SHARDS_MAX: usize = 256;

/// `account_expiry_ms` by default: 120 days, the period after which WhatsApp documents that an
/// inactive account is deleted.
pub const ACCOUNT_EXPIRY_DEFAULT_MS: u64 = 120 * 24 * 60 * 60 * 1000;
/// How long an item for a connected device waits for its Ack, by default (`ack_wait_ms`).
pub const ACK_WAIT_DEFAULT_MS: u64 = 20;
/// The longest `ack_wait_ms`: a sender's ServerAck may wait this long more.
pub const ACK_WAIT_MAX_MS: u64 = 1_000;
/// The longest `idle_poll_us`.
pub const IDLE_POLL_MAX_US: u64 = 1_000;
/// The shortest expiry: two seconds (tests use a few).
pub const ACCOUNT_EXPIRY_MIN_MS: u64 = 2_000;
/// The longest: 100 years, well inside the account clock's u32 seconds.
pub const ACCOUNT_EXPIRY_MAX_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

impl Args {
    /// Parses the command line; every setting's help ends with its default.
    pub fn parse_with_defaults() -> Self {
        let matches = Self::command_with_defaults().get_matches();
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
            .unwrap_or_else(|error| error.exit())
    }

    /// The command, with each setting's default (from [`Config::default`]) in its help. The
    /// defaults are not given to clap as values: a flag left out must not override the file.
    pub fn command_with_defaults() -> clap::Command {
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        let mut command = <Self as clap::CommandFactory>::command();
        for (name, value) in defaults {
            let shown = match value {
                toml::Value::String(text) => text,
                other => other.to_string(),
            };
            command = command.mut_arg(name, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {shown}]"))
            });
        }
        command
    }
}

impl Config {
    /// Defaults, then the file named by `--config`, then the flags; validated.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        macro_rules! apply {
            ($($name:ident),*) => { $( if let Some(value) = &args.$name { config.$name = value.clone(); } )* };
        }
        apply!(
            listen,
            data,
            shards,
            pin_cores,
            idle_poll_us,
            handshake_timeout_ms,
            idle_timeout_ms,
            connections_max,
            shard_handshakes_per_second,
            address_handshakes_per_second,
            address_handshake_burst,
            address_handshakes_max,
            address_connections_max,
            handshakes_per_turn,
            handshake_thread,
            send_buffer_bytes_max,
            send_buffers_bytes_max,
            mailbox_depth,
            queue_messages_max,
            queue_receipts_max,
            queue_bytes_max,
            shard_queue_bytes_max,
            inflight_max,
            inflight_bytes_max,
            subscriptions_max,
            subscribers_max,
            companions_max,
            group_members_max,
            groups_max,
            sender_messages_per_second,
            sender_message_burst,
            sender_reads_per_second,
            sender_read_burst,
            queue_sender_percent,
            shard_queue_sender_percent,
            registration,
            token_ttl_ms,
            account_expiry_ms,
            durability,
            batch_delay_ms,
            batch_records_max,
            ack_wait_ms,
            offline_ttl_ms,
            segment_bytes_max,
            segment_age_max_ms,
            compact_after_ms,
            log,
            log_format,
            backend,
            uring_receive,
            transparent_huge_pages,
            admin,
            drain_ms,
            cluster_etcd,
            node_id,
            advertise,
            cluster_lease_ms
        );
        if config.shards == 0 {
            config.shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source,
        })
    }

    /// The admission settings, as the shards apply them.
    pub fn admission_limits(&self) -> crate::admission::AdmissionLimits {
        crate::admission::AdmissionLimits {
            shard_handshakes_per_second: self.shard_handshakes_per_second,
            address_handshakes_per_second: self.address_handshakes_per_second,
            address_handshake_burst: self.address_handshake_burst,
            address_handshakes_max: self.address_handshakes_max,
            address_connections_max: self.address_connections_max,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("handshake_timeout_ms", self.handshake_timeout_ms as usize),
            ("idle_timeout_ms", self.idle_timeout_ms as usize),
            ("connections_max", self.connections_max),
            ("send_buffer_bytes_max", self.send_buffer_bytes_max),
            ("mailbox_depth", self.mailbox_depth),
            ("queue_messages_max", self.queue_messages_max),
            ("queue_receipts_max", self.queue_receipts_max),
            ("queue_bytes_max", self.queue_bytes_max),
            ("shard_queue_bytes_max", self.shard_queue_bytes_max),
            ("inflight_max", self.inflight_max),
            ("inflight_bytes_max", self.inflight_bytes_max),
            ("group_members_max", self.group_members_max),
            ("groups_max", self.groups_max),
            ("batch_delay_ms", self.batch_delay_ms as usize),
            ("batch_records_max", self.batch_records_max as usize),
            ("offline_ttl_ms", self.offline_ttl_ms as usize),
            ("token_ttl_ms", self.token_ttl_ms as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        if self.idle_poll_us > IDLE_POLL_MAX_US {
            return Err(ConfigError::Invalid {
                name: "idle_poll_us",
                reason: format!(
                    "{} is over {IDLE_POLL_MAX_US}: past a millisecond, a thread's wake-up is \
                     no longer worth a core's spin",
                    self.idle_poll_us
                ),
            });
        }
        if self.ack_wait_ms > ACK_WAIT_MAX_MS {
            return Err(ConfigError::Invalid {
                name: "ack_wait_ms",
                reason: format!(
                    "{} is over {ACK_WAIT_MAX_MS}: a sender's ServerAck may wait this long for \
                     its recipient's Ack",
                    self.ack_wait_ms
                ),
            });
        }
        if self.account_expiry_ms != 0
            && !(ACCOUNT_EXPIRY_MIN_MS..=ACCOUNT_EXPIRY_MAX_MS).contains(&self.account_expiry_ms)
        {
            return Err(ConfigError::Invalid {
                name: "account_expiry_ms",
                reason: format!(
                    "{} is outside {ACCOUNT_EXPIRY_MIN_MS}..={ACCOUNT_EXPIRY_MAX_MS} \
                     (2 s to 100 years), or 0 for accounts that never expire",
                    self.account_expiry_ms
                ),
            });
        }
        for (name, percent) in [
            ("queue_sender_percent", self.queue_sender_percent),
            (
                "shard_queue_sender_percent",
                self.shard_queue_sender_percent,
            ),
        ] {
            if !(1..=100).contains(&percent) {
                return Err(ConfigError::Invalid {
                    name,
                    reason: format!("{percent} is not a percentage from 1 to 100"),
                });
            }
        }
        for (name, rate, burst) in [
            (
                "sender_message_burst",
                self.sender_messages_per_second,
                self.sender_message_burst,
            ),
            (
                "sender_read_burst",
                self.sender_reads_per_second,
                self.sender_read_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "must be at least 1 while its rate is on".into(),
                });
            }
        }
        if self.address_handshakes_per_second > 0 && self.address_handshake_burst == 0 {
            return Err(ConfigError::Invalid {
                name: "address_handshake_burst",
                reason: "must be at least 1 while address_handshakes_per_second is on".into(),
            });
        }
        if self.shards > SHARDS_MAX {
            return Err(ConfigError::Invalid {
                name: "shards",
                reason: format!("{} is above the maximum of {SHARDS_MAX}", self.shards),
            });
        }
        if self.group_members_max > hop_protocol::wire::GROUP_MEMBERS_MAX {
            return Err(ConfigError::Invalid {
                name: "group_members_max",
                reason: format!(
                    "{} is above the protocol's maximum of {}",
                    self.group_members_max,
                    hop_protocol::wire::GROUP_MEMBERS_MAX
                ),
            });
        }
        if self.groups_max > usize::from(u16::MAX) {
            return Err(ConfigError::Invalid {
                name: "groups_max",
                reason: format!("{} is above the maximum of 65,535", self.groups_max),
            });
        }
        if self.send_buffer_bytes_max < 64 * 1024 {
            return Err(ConfigError::Invalid {
                name: "send_buffer_bytes_max",
                reason: "must hold at least one whole frame (65,536 bytes)".into(),
            });
        }
        if self.inflight_bytes_max > self.send_buffer_bytes_max / 2 {
            return Err(ConfigError::Invalid {
                name: "inflight_bytes_max",
                reason: format!(
                    "{} is above half of send_buffer_bytes_max ({})",
                    self.inflight_bytes_max, self.send_buffer_bytes_max
                ),
            });
        }
        if !self.cluster_etcd.is_empty() {
            if self.cluster_lease_ms < crate::cluster::membership::LEASE_MS_MIN {
                return Err(ConfigError::Invalid {
                    name: "cluster_lease_ms",
                    reason: format!(
                        "{} is below the minimum of {} (etcd leases are whole seconds)",
                        self.cluster_lease_ms,
                        crate::cluster::membership::LEASE_MS_MIN
                    ),
                });
            }
            if self.advertise.is_empty() && self.listen.ip().is_unspecified() {
                return Err(ConfigError::Invalid {
                    name: "advertise",
                    reason: format!(
                        "listen is {}, which clients cannot be sent to: set advertise to this \
                         node's address (host:port)",
                        self.listen
                    ),
                });
            }
        }
        if self.segment_bytes_max < 1024 * 1024 || self.segment_bytes_max > 1024 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                name: "segment_bytes_max",
                reason: "must be between 1 MiB and 1 GiB".into(),
            });
        }
        Ok(())
    }

    /// The offline store's settings. Its quotas match the router's limits.
    pub fn store_options(&self) -> hop_store::Options {
        let durability = match self.durability {
            DurabilityPolicy::Always => hop_store::Durability::Always,
            DurabilityPolicy::Batch => hop_store::Durability::Batch {
                delay_ms: self.batch_delay_ms,
                records_max: self.batch_records_max,
            },
            DurabilityPolicy::None => hop_store::Durability::None {
                delay_ms: self.batch_delay_ms,
                records_max: self.batch_records_max,
            },
        };
        hop_store::Options {
            durability,
            segment_bytes_max: self.segment_bytes_max,
            segment_age_max_ms: self.segment_age_max_ms,
            compact_after_ms: self.compact_after_ms,
            offline_ttl_ms: self.offline_ttl_ms,
            quota: hop_store::Quota {
                messages_max: u32::try_from(self.queue_messages_max).unwrap_or(u32::MAX),
                receipts_max: u32::try_from(self.queue_receipts_max).unwrap_or(u32::MAX),
                bytes_max: self.queue_bytes_max as u64,
            },
            ..hop_store::Options::default()
        }
    }

    /// When the shards hand items to the store: the same policy as the store's commits.
    pub fn keeping(&self) -> crate::shard::Keeping {
        crate::shard::Keeping {
            at_once: self.durability == DurabilityPolicy::Always,
            ack_wait_ms: self.ack_wait_ms,
        }
    }

    pub fn router_limits(&self) -> hop_router::Limits {
        hop_router::Limits {
            queue_messages_max: self.queue_messages_max,
            queue_receipts_max: self.queue_receipts_max,
            queue_bytes_max: self.queue_bytes_max,
            shard_queue_bytes_max: self.shard_queue_bytes_max,
            inflight_max: self.inflight_max,
            inflight_bytes_max: self.inflight_bytes_max,
            subscriptions_max: self.subscriptions_max,
            subscribers_max: self.subscribers_max,
            companions_max: self.companions_max,
            group_members_max: self.group_members_max,
            groups_max: self.groups_max,
            sender_messages: hop_router::quota::Rate {
                per_second: self.sender_messages_per_second,
                burst: self.sender_message_burst,
            },
            sender_reads: hop_router::quota::Rate {
                per_second: self.sender_reads_per_second,
                burst: self.sender_read_burst,
            },
            queue_sender_percent: self.queue_sender_percent,
            shard_queue_sender_percent: self.shard_queue_sender_percent,
            account_expiry_s: self.account_expiry_s(),
        }
    }

    /// `account_expiry_ms` in whole seconds, rounded up (validated to fit).
    pub fn account_expiry_s(&self) -> u32 {
        u32::try_from(self.account_expiry_ms.div_ceil(1000)).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::parse_from(std::iter::once("hopd").chain(list.iter().copied()))
    }

    #[test]
    fn flags_override_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("hop-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hop.toml");
        std::fs::write(&file, "shards = 3\nidle_timeout_ms = 5000\n").unwrap();
        let config = Config::from_args(&args(&[
            "--config",
            file.to_str().unwrap(),
            "--shards",
            "2",
        ]))
        .unwrap();
        assert_eq!(config.shards, 2);
        assert_eq!(config.idle_timeout_ms, 5000);
        assert_eq!(config.listen, Config::default().listen);
        let config = Config::from_args(&args(&[
            "--backend",
            "mio",
            "--uring-receive",
            "multishot-recv",
        ]))
        .unwrap();
        assert_eq!(config.backend, BackendName::Mio);
        assert_eq!(config.uring_receive, UringReceive::MultishotRecv);
        let text = toml::to_string(&config).unwrap();
        assert!(text.contains("backend = \"mio\""), "{text}");
        assert!(
            text.contains("uring_receive = \"multishot-recv\""),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("hop-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hop.toml");
        std::fs::write(&file, "shard = 3\n").unwrap();
        let error = Config::from_args(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(error.to_string().contains("unknown field"), "{error}");
        let error = Config::from_args(&args(&["--mailbox-depth", "0"])).unwrap_err();
        assert!(error.to_string().contains("mailbox_depth"), "{error}");
        let error = Config::from_args(&args(&["--shards", "300"])).unwrap_err();
        assert!(error.to_string().contains("shards"), "{error}");
        let error = Config::from_args(&args(&[
            "--send-buffer-bytes-max",
            "1048576",
            "--inflight-bytes-max",
            "1048576",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("inflight_bytes_max"), "{error}");
        let error = Config::from_args(&args(&["--idle-poll-us", "1001"])).unwrap_err();
        assert!(error.to_string().contains("idle_poll_us"), "{error}");
        let config = Config::from_args(&args(&["--idle-poll-us", "1000"])).unwrap();
        assert_eq!(config.idle_poll_us, IDLE_POLL_MAX_US);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cluster_settings_are_checked_only_in_a_cluster() {
        let config = Config::from_args(&args(&[
            "--cluster-etcd",
            "http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--node-id",
            "n1",
        ]))
        .unwrap();
        assert_eq!(
            config.cluster_etcd,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(config.node_id, "n1");
        // A single hopd ignores the lease; a cluster refuses one etcd cannot grant.
        Config::from_args(&args(&["--cluster-lease-ms", "100"])).unwrap();
        let error = Config::from_args(&args(&[
            "--cluster-etcd",
            "http://10.0.0.1:2379",
            "--cluster-lease-ms",
            "100",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("cluster_lease_ms"), "{error}");
        // Clients cannot be redirected to a wildcard address.
        let error = Config::from_args(&args(&[
            "--cluster-etcd",
            "http://10.0.0.1:2379",
            "--listen",
            "0.0.0.0:7788",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("advertise"), "{error}");
        Config::from_args(&args(&[
            "--cluster-etcd",
            "http://10.0.0.1:2379",
            "--listen",
            "0.0.0.0:7788",
            "--advertise",
            "10.0.0.7:7788",
        ]))
        .unwrap();
    }

    #[test]
    fn every_setting_has_a_flag_with_help_and_its_default() {
        let command = Args::command_with_defaults();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for name in defaults.keys() {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id().as_str() == name)
                .unwrap_or_else(|| panic!("no flag for setting {name}"));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.len() > 20, "no help for --{name}: {help:?}");
            assert!(
                help.contains("[default: "),
                "no default for --{name}: {help:?}"
            );
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::default());
    }
}
