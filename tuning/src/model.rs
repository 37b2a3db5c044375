//! The tuning model: from a target (connections, memory, role, OS, shards, backend) to every
//! setting that matters, each with its value, where it is set, the order it must be set in,
//! a one-line reason and its source.
//!
//! Everything here is pure arithmetic on the [`Target`]: no IO, no clock, so the same target
//! always yields the same [`Plan`] (the rendered files are pinned by golden tests).

use std::fmt;

use crate::error::InputError;

// ---------------------------------------------------------------------------------------------
// Figures the model rests on. Each says whether it is measured (and how) or an estimate.
// ---------------------------------------------------------------------------------------------

/// Kernel memory one idle, established TCP socket holds, in bytes of slab (socket, inode,
/// `struct file`, TCP control block). Measured by the project on its Linux development machine
/// (2 cores, 24 GiB, kernel 6.18); see `docs/tuning.md`. Used as an estimate on FreeBSD until
/// measured there.
pub const KERNEL_BYTES_PER_IDLE_SOCKET: u64 = 3_600;

/// hop's user-space bytes per idle connection. Measured on Linux (docs/BENCHMARKS.md,
/// `benches/scripts/idle-memory.sh`, 2026-12-01): hopd's RSS grew by 367 B per connection at
/// 19,000 idle connections on `uring` (375 B on `mio`), first-touch fixed memory included, and
/// by 191–227 B per connection added after that; rounded up to cover the growth figure.
pub const HOP_USER_BYTES_PER_CONNECTION: u64 = 384;

/// Kernel bytes hop's backend adds to an idle socket: the armed multishot poll's `io_kiocb`
/// on `uring` (255–258 B measured), the epoll registration on `mio` (128–165 B); the larger.
pub const HOP_KERNEL_BYTES_PER_CONNECTION: u64 = 256;

/// Bytes of one conntrack entry: the `nf_conntrack` slab object size on the project's Linux
/// machine (`grep nf_conntrack /proc/slabinfo`, column objsize: 256).
pub const CONNTRACK_BYTES_PER_ENTRY: u64 = 256;

/// Descriptors kept free beyond the connections, in percent of the connections: after a
/// restart or a network blip clients reconnect before the server has noticed that their old
/// connection is dead, so for a while one client can hold two descriptors.
pub const CHURN_HEADROOM_PERCENT: u64 = 25;

/// Descriptors hopd needs besides connections, per process (stdio, config, metrics listener,
/// server key, accounts) and per shard (listener, ring or kqueue/epoll, wake-up eventfd,
/// open log segments).
pub const FDS_RESERVED_PER_PROCESS: u64 = 64;
/// See [`FDS_RESERVED_PER_PROCESS`].
pub const FDS_RESERVED_PER_SHARD: u64 = 16;

/// Open files the rest of the OS may hold besides hopd (fs.file-max / kern.maxfiles).
pub const SYSTEM_FILES_RESERVE: u64 = 65_536;
/// Sockets the rest of the OS may hold besides hopd (FreeBSD kern.ipc.maxsockets).
pub const SYSTEM_SOCKETS_RESERVE: u64 = 16_384;
// kern.ipc.maxsockets must stay below kern.maxfiles: the kernel refuses it otherwise.
const _: () = assert!(SYSTEM_SOCKETS_RESERVE < SYSTEM_FILES_RESERVE);

/// Percent of RAM left to the OS, the page cache and hop's store; never planned for sockets.
pub const MEMORY_RESERVED_PERCENT: u64 = 15;
/// Percent of RAM that socket buffers (data queued in the kernel) may take in total.
pub const SOCKET_BUFFER_BUDGET_PERCENT: u64 = 20;
const _: () = assert!(MEMORY_RESERVED_PERCENT + SOCKET_BUFFER_BUDGET_PERCENT < 100);

/// At most one connection in this many is assumed to have full buffers at the same moment;
/// sizes the per-socket buffer cap from the buffer budget.
pub const BUFFER_OVERCOMMIT: u64 = 16;
/// Bounds of the per-socket buffer cap, bytes.
pub const SOCKET_BUFFER_CAP_MIN_BYTES: u64 = 16 * 1024;
/// See [`SOCKET_BUFFER_CAP_MIN_BYTES`].
pub const SOCKET_BUFFER_CAP_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Initial (default) socket buffer size, bytes: hop's stanzas are small; autotuning grows
/// buffers of busy connections up to the cap.
pub const SOCKET_BUFFER_DEFAULT_BYTES: u64 = 16 * 1024;
/// Smallest buffer the kernel keeps per socket under memory pressure, bytes.
pub const SOCKET_BUFFER_MIN_BYTES: u64 = 4 * 1024;
const _: () = assert!(SOCKET_BUFFER_MIN_BYTES <= SOCKET_BUFFER_DEFAULT_BYTES);
const _: () = assert!(SOCKET_BUFFER_DEFAULT_BYTES <= SOCKET_BUFFER_CAP_MIN_BYTES);

/// Seconds over which all clients are assumed to reconnect after a restart (client back-off
/// with jitter); sizes accept backlogs and the SYN cache.
pub const RECONNECT_SPREAD_SECONDS: u64 = 30;
/// Bounds of the per-listener accept backlog (somaxconn); 65,535 is the largest value every
/// supported kernel stores without truncation.
pub const ACCEPT_BACKLOG_MIN: u64 = 4_096;
/// See [`ACCEPT_BACKLOG_MIN`].
pub const ACCEPT_BACKLOG_MAX: u64 = 65_535;

/// Average TCP control-block hash chain length wanted at the target (FreeBSD tcbhashsize).
pub const TCB_HASH_CHAIN_LENGTH: u64 = 4;
/// One client in this many is assumed to have a FreeBSD host-cache entry (per remote address
/// metrics kept for an hour) at a time.
pub const HOSTCACHE_CLIENTS_PER_ENTRY: u64 = 16;
/// Average host-cache bucket length; the bucket limit allows four times that for skew.
pub const HOSTCACHE_CHAIN_LENGTH: u64 = 32;
/// Average SYN-cache bucket length; the bucket limit allows twice that.
pub const SYNCACHE_CHAIN_LENGTH: u64 = 16;

/// Linux caps one io_uring fixed-file table at 2^20 entries (IORING_MAX_FIXED_FILES), and at
/// the process's RLIMIT_NOFILE when the table is registered.
pub const IORING_MAX_FIXED_FILES: u64 = 1 << 20;
/// Locked memory one uring shard may pin (ring, provided-buffer ring, registered buffers).
/// ESTIMATE until hopd's uring backend is measured. Kernels before 5.12 charge io_uring rings
/// to RLIMIT_MEMLOCK; registered buffers are charged on every kernel.
pub const MEMLOCK_PER_URING_SHARD_BYTES: u64 = 64 * 1024 * 1024;

/// Local ports a load generator can use towards one server address and port (1024..=65535).
pub const LOADGEN_PORTS_PER_SOURCE_ADDRESS: u64 = 64_512;

/// Largest target the model accepts; beyond it the arithmetic stays exact but no kernel
/// supports the resulting tables.
pub const CONNECTIONS_MAX: u64 = 100_000_000;
/// Largest shard count accepted.
pub const SHARDS_MAX: u32 = 1_024;

const PAGE_BYTES: u64 = 4_096;

// ---------------------------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------------------------

/// What the host is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs hopd and holds the connections.
    Server,
    /// Runs hop-bench and opens the connections (needs local ports and source addresses).
    Loadgen,
}

/// Operating system the profile is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    /// Linux: sysctl.d, systemd unit, rlimits.
    Linux,
    /// FreeBSD: loader.conf (boot), sysctl.conf (run time), login.conf class / rc limits.
    FreeBsd,
}

/// hopd's IO backend, which decides what bounds connections per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Readiness (epoll / kqueue): every connection is a descriptor in the process fd table,
    /// so RLIMIT_NOFILE bounds the whole process. hopd's backend on FreeBSD.
    Mio,
    /// Linux io_uring with direct descriptors: connections live in each shard ring's fixed-file
    /// table, each capped by RLIMIT_NOFILE, so S shards hold about S x the limit.
    Uring,
}

impl Backend {
    /// The backend hopd runs on `os` by default: `uring` on Linux (hopd falls back to `mio`,
    /// saying so, where the kernel lacks it), `mio` elsewhere.
    pub fn default_for(os: Os) -> Self {
        match os {
            Os::Linux => Backend::Uring,
            Os::FreeBsd => Backend::Mio,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Loadgen => "loadgen",
        })
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Os::Linux => "linux",
            Os::FreeBsd => "freebsd",
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Mio => "mio",
            Backend::Uring => "uring",
        })
    }
}

/// A checked target: what the profile must make possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    connections: u64,
    memory_bytes: u64,
    role: Role,
    os: Os,
    shards: u32,
    backend: Backend,
}

impl Target {
    /// Checks the inputs; every rejection names the bad input.
    pub fn new(
        connections: u64,
        memory_bytes: u64,
        role: Role,
        os: Os,
        shards: u32,
        backend: Backend,
    ) -> Result<Self, InputError> {
        if connections == 0 {
            return Err(InputError::ConnectionsZero);
        }
        if connections > CONNECTIONS_MAX {
            return Err(InputError::ConnectionsTooMany {
                connections,
                max: CONNECTIONS_MAX,
            });
        }
        if memory_bytes < 64 * 1024 * 1024 {
            return Err(InputError::MemoryTooSmall { memory_bytes });
        }
        if shards == 0 || shards > SHARDS_MAX {
            return Err(InputError::Shards {
                shards,
                max: SHARDS_MAX,
            });
        }
        if backend == Backend::Uring && os != Os::Linux {
            return Err(InputError::UringNeedsLinux { os: os.to_string() });
        }
        let slots_per_ring = with_headroom(connections).div_ceil(u64::from(shards));
        if backend == Backend::Uring && slots_per_ring > IORING_MAX_FIXED_FILES {
            let shards_needed = with_headroom(connections).div_ceil(IORING_MAX_FIXED_FILES);
            return Err(InputError::RingTooSmall {
                connections,
                shards,
                shards_needed,
            });
        }
        Ok(Self {
            connections,
            memory_bytes,
            role,
            os,
            shards,
            backend,
        })
    }

    /// Connections to hold (server) or open (loadgen).
    pub fn connections(&self) -> u64 {
        self.connections
    }
    /// Physical memory of the host, bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }
    /// What the host is for.
    pub fn role(&self) -> Role {
        self.role
    }
    /// Operating system.
    pub fn os(&self) -> Os {
        self.os
    }
    /// hopd shards (threads, listeners, rings).
    pub fn shards(&self) -> u32 {
        self.shards
    }
    /// IO backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

// ---------------------------------------------------------------------------------------------
// Outputs.
// ---------------------------------------------------------------------------------------------

/// Where a setting is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// Linux `/etc/sysctl.d/90-hop.conf` (run time, persisted).
    SysctlD,
    /// Linux systemd unit drop-in for hopd.
    SystemdUnit,
    /// FreeBSD `/boot/loader.conf`: boot-time tunables (need a reboot).
    LoaderConf,
    /// FreeBSD `/etc/sysctl.conf`: run-time sysctls.
    SysctlConf,
    /// FreeBSD `/etc/login.conf` class `hop` (applied by rc.subr through limits(1)).
    LoginConf,
    /// Only checked, never written (e.g. io_uring availability).
    CheckOnly,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Place::SysctlD => "sysctl.d",
            Place::SystemdUnit => "systemd unit",
            Place::LoaderConf => "loader.conf",
            Place::SysctlConf => "sysctl.conf",
            Place::LoginConf => "login.conf",
            Place::CheckOnly => "check only",
        })
    }
}

/// How a live value is compared with the recommended one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Every element must be at least the recommended one (a limit that must be high enough).
    AtLeast,
    /// The (last) element must be at most the recommended one (a cap, e.g. socket buffers).
    AtMost,
    /// A `low high` range that must cover the recommended range.
    Covers,
    /// Must equal the recommended value.
    Equals,
}

/// A setting's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// One integer.
    Int(u64),
    /// Several integers on one line (tcp_rmem, tcp_mem, ip_local_port_range).
    Ints(Vec<u64>),
    /// Text (e.g. `infinity`).
    Text(&'static str),
}

impl Value {
    /// The integers of the value; empty for text.
    pub fn ints(&self) -> Vec<u64> {
        match self {
            Value::Int(v) => vec![*v],
            Value::Ints(v) => v.clone(),
            Value::Text(_) => Vec::new(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Ints(v) => {
                let parts: Vec<String> = v.iter().map(u64::to_string).collect();
                f.write_str(&parts.join(" "))
            }
            Value::Text(t) => f.write_str(t),
        }
    }
}

/// One setting of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Name as the OS spells it (`fs.nr_open`, `LimitNOFILE`, `kern.maxfiles`, `openfiles`).
    pub key: &'static str,
    /// Recommended value.
    pub value: Value,
    /// Where it is set.
    pub place: Place,
    /// How a live value is judged against it.
    pub rule: Rule,
    /// Settings that must be in place before this one.
    pub after: &'static [&'static str],
    /// Why, in one line; says how the value is derived.
    pub reason: String,
    /// Where the semantics are documented.
    pub source: &'static str,
}

/// The memory budget of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Kernel bytes per idle socket (measured on Linux; see the constant).
    pub kernel_bytes_per_connection: u64,
    /// hop's user-space bytes per connection (estimate; see the constant).
    pub user_bytes_per_connection: u64,
    /// Conntrack bytes per connection (0 when not tracked).
    pub conntrack_bytes_per_connection: u64,
    /// Total socket-buffer budget, bytes.
    pub socket_buffer_budget_bytes: u64,
    /// Per-socket buffer cap, bytes (each direction).
    pub socket_buffer_cap_bytes: u64,
    /// Memory the target's idle connections take, bytes.
    pub connections_bytes: u64,
    /// Memory available for idle connections after the reserve and the buffer budget.
    pub available_bytes: u64,
    /// Idle connections that fit in that memory.
    pub connections_fit: u64,
}

/// Sizes derived from the target, shared by several settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Descriptors hopd needs besides connections.
    pub fds_reserved: u64,
    /// All of hopd's open files: connections + churn headroom + reserve, rounded up to 1024.
    pub hop_files: u64,
    /// RLIMIT_NOFILE hopd needs: all of its files with mio; with uring one ring's share of the
    /// connections (direct descriptors are not in the fd table) + the reserve.
    pub files_per_process: u64,
    /// System-wide open files.
    pub files_system: u64,
    /// System-wide sockets (FreeBSD).
    pub sockets_system: u64,
    /// Per-listener accept backlog.
    pub accept_backlog: u64,
    /// Conntrack table entries, if conntrack is in use.
    pub conntrack_entries: u64,
    /// Locked memory for the uring backend, bytes.
    pub memlock_bytes: u64,
    /// Source addresses a load generator needs.
    pub source_addresses: u64,
}

/// Everything the model says about a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The target planned for.
    pub target: Target,
    /// Derived sizes.
    pub sizes: Sizes,
    /// Memory budget.
    pub memory: MemoryBudget,
    /// Settings, in the order they must be made.
    pub settings: Vec<Setting>,
}

impl Plan {
    /// The setting named `key`, if the plan has one.
    pub fn setting(&self, key: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.key == key)
    }
}

// ---------------------------------------------------------------------------------------------
// Arithmetic shared with the ceiling computation.
// ---------------------------------------------------------------------------------------------

/// Descriptors hopd needs besides connections, for `shards` shards.
pub fn fds_reserved(shards: u32) -> u64 {
    FDS_RESERVED_PER_PROCESS + FDS_RESERVED_PER_SHARD * u64::from(shards)
}

/// Slots needed to hold `connections` with churn headroom: `n + ceil(n * 25%)`.
pub fn with_headroom(connections: u64) -> u64 {
    connections + (connections * CHURN_HEADROOM_PERCENT).div_ceil(100)
}

/// Connections that `slots` can hold with churn headroom: the inverse of [`with_headroom`]
/// (the largest `n` with `with_headroom(n) <= slots`).
pub fn without_headroom(slots: u64) -> u64 {
    let n = slots.saturating_mul(100) / (100 + CHURN_HEADROOM_PERCENT);
    debug_assert!(with_headroom(n) <= slots);
    n
}

/// User-space plus kernel bytes per idle connection.
pub fn bytes_per_connection(conntrack: bool) -> u64 {
    KERNEL_BYTES_PER_IDLE_SOCKET
        + HOP_KERNEL_BYTES_PER_CONNECTION
        + HOP_USER_BYTES_PER_CONNECTION
        + if conntrack {
            CONNTRACK_BYTES_PER_ENTRY
        } else {
            0
        }
}

/// Memory idle connections may use on a host with `memory_bytes`, after the OS reserve and
/// the socket-buffer budget.
pub fn memory_for_connections(memory_bytes: u64) -> u64 {
    memory_bytes / 100 * (100 - MEMORY_RESERVED_PERCENT - SOCKET_BUFFER_BUDGET_PERCENT)
}

fn round_up(value: u64, multiple: u64) -> u64 {
    value.div_ceil(multiple) * multiple
}

fn previous_power_of_two(value: u64) -> u64 {
    assert!(value > 0);
    1 << (63 - value.leading_zeros())
}

// ---------------------------------------------------------------------------------------------
// The model.
// ---------------------------------------------------------------------------------------------

/// Computes the plan for a target.
pub fn plan(target: Target) -> Plan {
    let n = target.connections;
    let shards = u64::from(target.shards);
    let conntrack = target.os == Os::Linux;

    let fds_reserved = fds_reserved(target.shards);
    let hop_files = round_up(with_headroom(n) + fds_reserved, 1024);
    let files_per_process = match target.backend {
        Backend::Mio => hop_files,
        Backend::Uring => round_up(with_headroom(n).div_ceil(shards) + fds_reserved, 1024),
    };
    let files_system = hop_files + SYSTEM_FILES_RESERVE;
    let sockets_system = hop_files + SYSTEM_SOCKETS_RESERVE;
    let arrivals_per_second_per_listener = n.div_ceil(RECONNECT_SPREAD_SECONDS).div_ceil(shards);
    let accept_backlog = arrivals_per_second_per_listener
        .next_power_of_two()
        .clamp(ACCEPT_BACKLOG_MIN, ACCEPT_BACKLOG_MAX);
    let conntrack_entries = round_up(with_headroom(n), 1024);
    let memlock_bytes = MEMLOCK_PER_URING_SHARD_BYTES * shards;
    let source_addresses = n.div_ceil(LOADGEN_PORTS_PER_SOURCE_ADDRESS);

    let socket_buffer_budget_bytes = target.memory_bytes / 100 * SOCKET_BUFFER_BUDGET_PERCENT;
    // Both directions of one in BUFFER_OVERCOMMIT connections may be full at once.
    let cap_raw = (socket_buffer_budget_bytes / 2 * BUFFER_OVERCOMMIT / n).max(1);
    let socket_buffer_cap_bytes = previous_power_of_two(cap_raw)
        .clamp(SOCKET_BUFFER_CAP_MIN_BYTES, SOCKET_BUFFER_CAP_MAX_BYTES);
    let available_bytes = memory_for_connections(target.memory_bytes);
    let per_connection = bytes_per_connection(conntrack);
    let memory = MemoryBudget {
        kernel_bytes_per_connection: KERNEL_BYTES_PER_IDLE_SOCKET + HOP_KERNEL_BYTES_PER_CONNECTION,
        user_bytes_per_connection: HOP_USER_BYTES_PER_CONNECTION,
        conntrack_bytes_per_connection: if conntrack {
            CONNTRACK_BYTES_PER_ENTRY
        } else {
            0
        },
        socket_buffer_budget_bytes,
        socket_buffer_cap_bytes,
        connections_bytes: n * per_connection,
        available_bytes,
        connections_fit: available_bytes / per_connection,
    };
    let sizes = Sizes {
        fds_reserved,
        hop_files,
        files_per_process,
        files_system,
        sockets_system,
        accept_backlog,
        conntrack_entries,
        memlock_bytes,
        source_addresses,
    };
    let settings = match target.os {
        Os::Linux => linux_settings(&target, &sizes, &memory),
        Os::FreeBsd => freebsd_settings(&target, &sizes, &memory),
    };
    let plan = Plan {
        target,
        sizes,
        memory,
        settings,
    };
    assert_ordering(&plan);
    plan
}

/// Every `after` names a setting placed earlier in the plan (or one the plan does not carry).
fn assert_ordering(plan: &Plan) {
    for (index, setting) in plan.settings.iter().enumerate() {
        for before in setting.after {
            if let Some(position) = plan.settings.iter().position(|s| s.key == *before) {
                assert!(
                    position < index,
                    "{} must come after {}",
                    setting.key,
                    before
                );
            }
        }
    }
}

const SRC_LINUX_FS: &str = "Linux Documentation/admin-guide/sysctl/fs.rst";
const SRC_LINUX_NET_CORE: &str = "Linux Documentation/admin-guide/sysctl/net.rst";
const SRC_LINUX_IP: &str = "Linux Documentation/networking/ip-sysctl.rst";
const SRC_LINUX_CONNTRACK: &str = "Linux Documentation/networking/nf_conntrack-sysctl.rst";
const SRC_SYSTEMD: &str = "systemd.exec(5), getrlimit(2)";
const SRC_IO_URING: &str =
    "Linux Documentation/admin-guide/sysctl/kernel.rst, io_uring_register(2)";
const SRC_TUNING7: &str = "FreeBSD tuning(7), loader.conf(5)";
const SRC_TCP4: &str = "FreeBSD tcp(4)";
const SRC_LOGIN_CONF: &str = "FreeBSD login.conf(5), rc.subr(8)";
const SRC_LISTEN2: &str = "FreeBSD listen(2)";
const SRC_IP4: &str = "FreeBSD ip(4)";

fn linux_settings(target: &Target, sizes: &Sizes, memory: &MemoryBudget) -> Vec<Setting> {
    let cap = memory.socket_buffer_cap_bytes;
    let tcp_mem_high = memory.socket_buffer_budget_bytes / PAGE_BYTES;
    let mut settings = vec![
        Setting {
            key: "fs.nr_open",
            value: Value::Int(sizes.files_per_process),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: "ceiling for any process's RLIMIT_NOFILE, so it must be in place before \
                     LimitNOFILE (systemd cannot start a unit above it); equal to LimitNOFILE"
                .to_string(),
            source: SRC_LINUX_FS,
        },
        Setting {
            key: "fs.file-max",
            value: Value::Int(sizes.files_system),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "system-wide open files (every socket is one, io_uring direct descriptors too): \
                 hopd's descriptors + {SYSTEM_FILES_RESERVE} for the rest of the OS"
            ),
            source: SRC_LINUX_FS,
        },
        Setting {
            key: "LimitNOFILE",
            value: Value::Int(sizes.files_per_process),
            place: Place::SystemdUnit,
            rule: Rule::AtLeast,
            after: &["fs.nr_open"],
            reason: nofile_reason(target, sizes),
            source: SRC_SYSTEMD,
        },
    ];
    if target.backend == Backend::Uring {
        settings.push(Setting {
            key: "LimitMEMLOCK",
            value: Value::Int(sizes.memlock_bytes),
            place: Place::SystemdUnit,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "locked memory for io_uring rings and buffers: {} shards x {} MiB (estimate until \
                 measured); kernels before 5.12 charge rings to RLIMIT_MEMLOCK",
                target.shards,
                MEMLOCK_PER_URING_SHARD_BYTES / (1024 * 1024)
            ),
            source: SRC_SYSTEMD,
        });
        settings.push(Setting {
            key: "kernel.io_uring_disabled",
            value: Value::Int(0),
            place: Place::CheckOnly,
            rule: Rule::Equals,
            after: &[],
            reason: "the uring backend needs io_uring enabled (1 allows only io_uring_group, \
                     2 disables it); hopd falls back to mio otherwise"
                .to_string(),
            source: SRC_IO_URING,
        });
    }
    settings.extend([
        Setting {
            key: "net.core.somaxconn",
            value: Value::Int(sizes.accept_backlog),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "accept backlog per listener: all clients reconnecting over \
                 {RECONNECT_SPREAD_SECONDS} s spread over {} shard listener(s), one second's \
                 arrivals, power of two, clamped to {ACCEPT_BACKLOG_MIN}..{ACCEPT_BACKLOG_MAX}",
                target.shards
            ),
            source: SRC_LINUX_NET_CORE,
        },
        Setting {
            key: "net.ipv4.tcp_max_syn_backlog",
            value: Value::Int(sizes.accept_backlog),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: "half-open connections per listener during a reconnect storm; same size as \
                     the accept backlog (syncookies cover overflow)"
                .to_string(),
            source: SRC_LINUX_IP,
        },
        Setting {
            key: "net.ipv4.tcp_rmem",
            value: Value::Ints(vec![
                SOCKET_BUFFER_MIN_BYTES,
                SOCKET_BUFFER_DEFAULT_BYTES,
                cap,
            ]),
            place: Place::SysctlD,
            rule: Rule::AtMost,
            after: &[],
            reason: format!(
                "caps receive buffers (a many-idle-connections server caps, never enlarges, \
                 them): {SOCKET_BUFFER_BUDGET_PERCENT}% of RAM shared by both directions of one in \
                 {BUFFER_OVERCOMMIT} connections, power of two"
            ),
            source: SRC_LINUX_IP,
        },
        Setting {
            key: "net.ipv4.tcp_wmem",
            value: Value::Ints(vec![
                SOCKET_BUFFER_MIN_BYTES,
                SOCKET_BUFFER_DEFAULT_BYTES,
                cap,
            ]),
            place: Place::SysctlD,
            rule: Rule::AtMost,
            after: &[],
            reason: "caps send buffers; same derivation as tcp_rmem".to_string(),
            source: SRC_LINUX_IP,
        },
        Setting {
            key: "net.ipv4.tcp_mem",
            value: Value::Ints(vec![tcp_mem_high / 2, tcp_mem_high / 4 * 3, tcp_mem_high]),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "pages all TCP buffers may use (low, pressure, high): high = \
                 {SOCKET_BUFFER_BUDGET_PERCENT}% of RAM, pressure 3/4, low 1/2"
            ),
            source: SRC_LINUX_IP,
        },
        Setting {
            key: "net.netfilter.nf_conntrack_max",
            value: Value::Int(sizes.conntrack_entries),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "only if conntrack is loaded: one entry per connection + \
                 {CHURN_HEADROOM_PERCENT}% for closing ones ({CONNTRACK_BYTES_PER_ENTRY} bytes \
                 each); better, exempt hop's port with a NOTRACK rule"
            ),
            source: SRC_LINUX_CONNTRACK,
        },
        Setting {
            key: "net.netfilter.nf_conntrack_buckets",
            value: Value::Int(sizes.conntrack_entries.next_power_of_two() / 2),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &["net.netfilter.nf_conntrack_max"],
            reason: "conntrack hash size, power of two: each entry is hashed twice (both \
                     directions), so half the entries keeps chains between 2 and 4"
                .to_string(),
            source: SRC_LINUX_CONNTRACK,
        },
    ]);
    if target.role == Role::Loadgen {
        settings.extend(loadgen_linux(sizes));
    }
    settings
}

fn nofile_reason(target: &Target, sizes: &Sizes) -> String {
    let n = target.connections;
    let share = match target.backend {
        Backend::Mio => format!("{n} connections"),
        Backend::Uring => format!(
            "one ring's share of {n} connections over {} shards (direct descriptors live in each \
             ring's fixed-file table, capped by this limit)",
            target.shards
        ),
    };
    format!(
        "hopd's RLIMIT_NOFILE, soft = hard (for a service this, not limits.conf, counts; hopd \
         raises soft to hard at start): {share} + {CHURN_HEADROOM_PERCENT}% churn headroom + {} \
         reserved, rounded up to 1024",
        sizes.fds_reserved
    )
}

fn loadgen_linux(sizes: &Sizes) -> [Setting; 2] {
    [
        Setting {
            key: "net.ipv4.ip_local_port_range",
            value: Value::Ints(vec![1024, 65535]),
            place: Place::SysctlD,
            rule: Rule::Covers,
            after: &[],
            reason: format!(
                "a load generator needs every local port: {LOADGEN_PORTS_PER_SOURCE_ADDRESS} per \
                 source address and server port, so this target needs {} source address(es)",
                sizes.source_addresses
            ),
            source: SRC_LINUX_IP,
        },
        Setting {
            key: "net.ipv4.tcp_tw_reuse",
            value: Value::Int(1),
            place: Place::SysctlD,
            rule: Rule::AtLeast,
            after: &[],
            reason: "reuse TIME_WAIT ports for new outgoing connections between benchmark runs"
                .to_string(),
            source: SRC_LINUX_IP,
        },
    ]
}

fn freebsd_settings(target: &Target, sizes: &Sizes, memory: &MemoryBudget) -> Vec<Setting> {
    let n = target.connections;
    let cap = memory.socket_buffer_cap_bytes;
    let tcbhashsize = n.div_ceil(TCB_HASH_CHAIN_LENGTH).next_power_of_two();
    let hostcache_entries = n.div_ceil(HOSTCACHE_CLIENTS_PER_ENTRY).next_power_of_two();
    let hostcache_hashsize = (hostcache_entries / HOSTCACHE_CHAIN_LENGTH).max(512);
    let syncache_entries = (sizes.accept_backlog * u64::from(target.shards)).next_power_of_two();
    let syncache_hashsize = (syncache_entries / SYNCACHE_CHAIN_LENGTH).max(512);
    let mut settings = vec![
        Setting {
            key: "kern.maxfiles",
            value: Value::Int(sizes.files_system),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "system-wide open files; set at boot so that limits sized from it are too: \
                 hopd's descriptors + {SYSTEM_FILES_RESERVE} for the rest of the OS"
            ),
            source: SRC_TUNING7,
        },
        Setting {
            key: "kern.maxfilesperproc",
            value: Value::Int(sizes.files_per_process),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["kern.maxfiles"],
            reason: format!(
                "ceiling for one process's open files (RLIMIT_NOFILE is clamped to it): {n} \
                 connections + {CHURN_HEADROOM_PERCENT}% churn headroom + {} reserved, rounded up \
                 to 1024",
                sizes.fds_reserved
            ),
            source: SRC_TUNING7,
        },
        Setting {
            key: "kern.ipc.maxsockets",
            value: Value::Int(sizes.sockets_system),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["kern.maxfiles"],
            reason: format!(
                "system-wide sockets; may not exceed kern.maxfiles (the kernel refuses it) and can \
                 only be raised at run time: hopd's descriptors + {SYSTEM_SOCKETS_RESERVE}"
            ),
            source: SRC_TUNING7,
        },
        Setting {
            key: "net.inet.tcp.tcbhashsize",
            value: Value::Int(tcbhashsize),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "TCP control-block hash (read-only after boot, power of two): chains of \
                 {TCB_HASH_CHAIN_LENGTH} at {n} connections"
            ),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.hostcache.hashsize",
            value: Value::Int(hostcache_hashsize),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "host cache (per-client-address RTT/MSS, kept an hour) for one client in \
                 {HOSTCACHE_CLIENTS_PER_ENTRY}, chains of {HOSTCACHE_CHAIN_LENGTH}; power of two"
            ),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.hostcache.cachelimit",
            value: Value::Int(hostcache_entries),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["net.inet.tcp.hostcache.hashsize"],
            reason: format!(
                "host-cache entries: one client in {HOSTCACHE_CLIENTS_PER_ENTRY}, power of two"
            ),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.hostcache.bucketlimit",
            value: Value::Int(HOSTCACHE_CHAIN_LENGTH * 4),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["net.inet.tcp.hostcache.hashsize"],
            reason: "host-cache bucket limit: four times the average chain, for skewed address \
                     hashing"
                .to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.syncache.hashsize",
            value: Value::Int(syncache_hashsize),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "SYN cache hash: all listeners' backlogs together, chains of \
                 {SYNCACHE_CHAIN_LENGTH}; power of two"
            ),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.syncache.bucketlimit",
            value: Value::Int(SYNCACHE_CHAIN_LENGTH * 2),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["net.inet.tcp.syncache.hashsize"],
            reason: "SYN cache bucket limit: twice the average chain".to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.syncache.cachelimit",
            value: Value::Int(syncache_hashsize * SYNCACHE_CHAIN_LENGTH * 2),
            place: Place::LoaderConf,
            rule: Rule::AtLeast,
            after: &["net.inet.tcp.syncache.bucketlimit"],
            reason: "SYN cache entries: hashsize x bucketlimit".to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "kern.ipc.soacceptqueue",
            value: Value::Int(sizes.accept_backlog),
            place: Place::SysctlConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: format!(
                "accept backlog per listener (formerly kern.ipc.somaxconn): all clients \
                 reconnecting over {RECONNECT_SPREAD_SECONDS} s spread over {} SO_REUSEPORT_LB \
                 listeners, one second's arrivals, power of two, clamped to \
                 {ACCEPT_BACKLOG_MIN}..{ACCEPT_BACKLOG_MAX}",
                target.shards
            ),
            source: SRC_LISTEN2,
        },
        Setting {
            key: "net.inet.tcp.sendspace",
            value: Value::Int(SOCKET_BUFFER_DEFAULT_BYTES),
            place: Place::SysctlConf,
            rule: Rule::AtMost,
            after: &[],
            reason: "initial send buffer: hop's stanzas are small; auto-sizing grows busy ones"
                .to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.recvspace",
            value: Value::Int(SOCKET_BUFFER_DEFAULT_BYTES),
            place: Place::SysctlConf,
            rule: Rule::AtMost,
            after: &[],
            reason: "initial receive window: small, so an idle client cannot park data in the \
                     kernel"
                .to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.sendbuf_max",
            value: Value::Int(cap),
            place: Place::SysctlConf,
            rule: Rule::AtMost,
            after: &["net.inet.tcp.sendspace"],
            reason: format!(
                "caps auto-sized send buffers: {SOCKET_BUFFER_BUDGET_PERCENT}% of RAM shared by \
                 both directions of one in {BUFFER_OVERCOMMIT} connections, power of two"
            ),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.recvbuf_max",
            value: Value::Int(cap),
            place: Place::SysctlConf,
            rule: Rule::AtMost,
            after: &["net.inet.tcp.recvspace"],
            reason: "caps auto-sized receive buffers; same derivation as sendbuf_max".to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "net.inet.tcp.fast_finwait2_recycle",
            value: Value::Int(1),
            place: Place::SysctlConf,
            rule: Rule::AtLeast,
            after: &[],
            reason: "free FIN_WAIT_2 sockets of vanished mobile clients quickly instead of \
                     holding their memory"
                .to_string(),
            source: SRC_TCP4,
        },
        Setting {
            key: "openfiles",
            value: Value::Int(sizes.files_per_process),
            place: Place::LoginConf,
            rule: Rule::AtLeast,
            after: &["kern.maxfilesperproc"],
            reason: "hopd's RLIMIT_NOFILE via login class `hop` (openfiles-cur and -max); \
                     clamped by kern.maxfilesperproc"
                .to_string(),
            source: SRC_LOGIN_CONF,
        },
    ];
    if target.role == Role::Loadgen {
        settings.extend([
            Setting {
                key: "net.inet.ip.portrange.first",
                value: Value::Int(1024),
                place: Place::SysctlConf,
                rule: Rule::Covers,
                after: &[],
                reason: format!(
                    "a load generator needs every local port: {} source address(es) for this \
                     target",
                    sizes.source_addresses
                ),
                source: SRC_IP4,
            },
            Setting {
                key: "net.inet.ip.portrange.last",
                value: Value::Int(65535),
                place: Place::SysctlConf,
                rule: Rule::AtLeast,
                after: &[],
                reason: "upper end of the local port range".to_string(),
                source: SRC_IP4,
            },
        ]);
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    fn target(connections: u64, os: Os) -> Target {
        Target::new(connections, 64 * GIB, Role::Server, os, 16, Backend::Mio).expect("valid")
    }

    #[test]
    fn headroom_round_trips() {
        for slots in [0, 1, 5, 100, 19_936, 1_048_576, 3_000_000] {
            let n = without_headroom(slots);
            assert!(with_headroom(n) <= slots);
            assert!(with_headroom(n + 1) > slots);
        }
    }

    #[test]
    fn freebsd_two_million_orders_files_before_sockets() {
        let plan = plan(target(2_000_000, Os::FreeBsd));
        let int = |key| plan.setting(key).expect(key).value.ints()[0];
        assert!(int("kern.ipc.maxsockets") <= int("kern.maxfiles"));
        assert!(int("kern.maxfilesperproc") <= int("kern.maxfiles"));
        assert!(int("kern.maxfilesperproc") >= 2_500_000);
        assert_eq!(int("net.inet.tcp.tcbhashsize"), 524_288);
        assert!(int("net.inet.tcp.tcbhashsize").is_power_of_two());
    }

    #[test]
    fn linux_nr_open_comes_before_limit_nofile() {
        let plan = plan(target(1_000_000, Os::Linux));
        let position = |key| plan.settings.iter().position(|s| s.key == key).expect(key);
        assert!(position("fs.nr_open") < position("LimitNOFILE"));
        assert_eq!(
            plan.setting("fs.nr_open").expect("set").value,
            Value::Int(1_251_328)
        );
    }

    #[test]
    fn buffer_cap_shrinks_with_connections() {
        let small = plan(target(10_000, Os::Linux))
            .memory
            .socket_buffer_cap_bytes;
        let large = plan(target(2_000_000, Os::Linux))
            .memory
            .socket_buffer_cap_bytes;
        assert_eq!(small, SOCKET_BUFFER_CAP_MAX_BYTES);
        assert!(large < small);
        assert!(large >= SOCKET_BUFFER_CAP_MIN_BYTES);
    }

    #[test]
    fn rejects_bad_targets() {
        let bad = |c, m, s, b, os| Target::new(c, m, Role::Server, os, s, b).is_err();
        assert!(bad(0, GIB, 1, Backend::Mio, Os::Linux));
        assert!(bad(CONNECTIONS_MAX + 1, GIB, 1, Backend::Mio, Os::Linux));
        assert!(bad(10, 1024, 1, Backend::Mio, Os::Linux));
        assert!(bad(10, GIB, 0, Backend::Mio, Os::Linux));
        assert!(bad(10, GIB, 1, Backend::Uring, Os::FreeBsd));
    }
}
