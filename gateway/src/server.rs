//! Starting and stopping hopd: the data folder and key, the listeners, the shard threads, the
//! signals.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::Duration;

use hop_protocol::StaticKey;
use hop_router::{Router, Secrets, ShardId};
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tracing::{error, info, warn};

use crate::admin::{Admin, AdminState, SetLogFilter, ShardViews};
use crate::admission::AddressTable;
use crate::cluster::links::Links;
use crate::cluster::membership::{self, Cluster, ClusterSettings};
use crate::config::{AdminAddress, BackendName, Config, UringReceive};
use crate::control::Controls;
use crate::directory::Directory;
use crate::mailbox::Mailboxes;
use crate::shard::{self, monotonic_ms, ShardMailboxes, ShardParts, ShardSettings};
use crate::stats::ShardStats;
use crate::sys::mio::MioBackend;
use crate::sys::{self, Backend, BackendLimits};
use crate::takeover::{self, Gate, Handover, Inherited, ShardExport};
use crate::tokens::Tokens;
use hop_store::accounts::{self, AccountLog};
use hop_store::devices::{DeviceLog, DeviceRecord};
use hop_store::groups::{GroupLog, GroupRecord};
use hop_store::io::FsIo;
use hop_store::privacy::{self, PrivacyLog};
use hop_store::seen::SeenLog;
use hop_store::ShardStore;

/// Pending connections the kernel queues per listener.
const LISTEN_BACKLOG: i32 = 4096;
/// How long a closing connection may linger for its peer to close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create data folder {path}: {source}")]
    DataFolder { path: String, source: io::Error },
    #[error("{0}")]
    Key(#[from] hop_protocol::keys::KeyError),
    #[error(
        "data folder {path} is open to other users (mode {mode:04o}); it holds message bodies \
         and keys: `chmod 700 {path}`"
    )]
    DataFolderOpen { path: String, mode: u32 },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start shard {shard}: {source}")]
    Shard { shard: usize, source: io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("offline queue: {0}")]
    Store(#[from] hop_store::StoreError),
    #[error(
        "cannot listen on admin address {addr}: {source} (set admin to another address, or off)"
    )]
    Admin { addr: SocketAddr, source: io::Error },
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("registration tokens: {0}")]
    Tokens(io::Error),
    #[error("takeover: {0}")]
    Takeover(String),
}

/// A running server.
pub struct Server {
    pub local_addr: SocketAddr,
    pub public_key: [u8; 32],
    pub shards: usize,
    /// The connections this server holds before it refuses new ones, and what sets that.
    pub ceiling: sys::Ceiling,
    shutdown: Arc<AtomicBool>,
    wake_all: Arc<dyn Fn() + Send + Sync>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Vec<Arc<ShardStats>>,
    /// Operators' requests to the shards, readiness and the drain.
    pub controls: Arc<Controls>,
    pub mailbox_depth: MailboxDepth,
    /// Which account each companion device belongs to.
    pub directory: Arc<Directory>,
    /// In a cluster: this node's membership, and the flag that stops its threads.
    pub cluster: Option<Membership>,
    /// Registration tokens, issued by the operator and redeemed by new keys.
    pub tokens: Arc<Tokens>,
    /// A takeover of this process by a new one: the shards' side.
    pub handover: Arc<Handover>,
    /// Descriptors of the listening sockets, one per shard, to hand to a new process.
    pub listeners: Vec<std::os::fd::OwnedFd>,
}

/// A node's membership in its cluster, and the flag that stops its threads.
pub type Membership = (Arc<Cluster>, Arc<AtomicBool>);

/// What every shard shares besides its mailboxes.
#[derive(Clone)]
struct Shared {
    controls: Arc<Controls>,
    directory: Arc<Directory>,
    cluster: Option<Arc<Cluster>>,
    /// Connections and handshakes by source address, for admission.
    addresses: Arc<AddressTable>,
    /// Under `registration = token`: the tokens new keys redeem.
    tokens: Option<Arc<Tokens>>,
    /// A takeover of this process by a new one.
    handover: Arc<Handover>,
}

/// Joins the cluster named by `cluster_etcd`, if any: the membership threads start now, and
/// the shards serve no one until this node is a member (`docs/cluster.md`).
fn start_cluster(
    config: &Config,
    local_addr: SocketAddr,
    key: &StaticKey,
) -> Result<Option<(Membership, [u8; 32])>, StartError> {
    if config.cluster_etcd.is_empty() {
        return Ok(None);
    }
    let node_id = if config.node_id.is_empty() {
        nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                StartError::Cluster("node_id is empty and the host has no name: set node_id".into())
            })?
    } else {
        config.node_id.clone()
    };
    let advertise = if config.advertise.is_empty() {
        local_addr.to_string()
    } else {
        config.advertise.clone()
    };
    let secret = membership::cluster_secret(
        &config.cluster_etcd,
        config.cluster_lease_ms,
        membership::SECRET_PATIENCE,
    )
    .map_err(StartError::Cluster)?;
    let stop = Arc::new(AtomicBool::new(false));
    let links = Arc::new(Links::new(Arc::new(key.clone()), stop.clone()));
    let cluster = Arc::new(Cluster::new(
        ClusterSettings {
            etcd: config.cluster_etcd.clone(),
            node_id: node_id.clone(),
            advertise: advertise.clone(),
            lease_ms: config.cluster_lease_ms,
            shards: config.shards,
            server_key: *key.public(),
        },
        Some(links),
    ));
    membership::start(cluster.clone(), stop.clone())
        .map_err(|error| StartError::Cluster(error.to_string()))?;
    info!(node = %node_id, %advertise, etcd = ?config.cluster_etcd, "joining the cluster");
    Ok(Some(((cluster, stop), secret)))
}

impl Server {
    /// Creates the data folder and key, binds the listeners and starts the shards, which
    /// report to `controls` (made beforehand, so that an admin listener started earlier answers
    /// `/readyz` while the queues recover).
    pub fn start(
        config: &Config,
        controls: &Arc<Controls>,
        inherited: Option<&mut Inherited>,
    ) -> Result<Self, StartError> {
        assert_eq!(controls.shards(), config.shards, "one control per shard");
        hop_store::io::Io::create_dir_all(&FsIo, &config.data).map_err(|source| {
            StartError::DataFolder {
                path: config.data.display().to_string(),
                source,
            }
        })?;
        check_data_folder_mode(&config.data)?;
        let (key, created) = StaticKey::load_or_create(&config.data.join("server.key"))?;
        if created {
            info!(path = %config.data.join("server.key").display(), "generated a new server key");
        }
        raise_fd_limit();
        let (listeners, mut inherited_shards) = match inherited {
            Some(inherited) => {
                let gate = inherited.gate();
                (
                    std::mem::take(&mut inherited.listeners),
                    std::mem::take(&mut inherited.shards)
                        .into_iter()
                        .map(|shard| Some((shard, gate.clone())))
                        .collect(),
                )
            }
            None => (bind_listeners(config.listen, config.shards)?, Vec::new()),
        };
        inherited_shards.resize_with(config.shards, || None);
        let listener_fds = listeners
            .iter()
            .map(|listener| std::os::fd::AsFd::as_fd(listener).try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let seen = hop_store::seen::load(&FsIo, &config.data)?;
        if seen.damaged > 0 {
            warn!(
                damaged = seen.damaged,
                "records of when devices were last seen failed their checksum and were skipped: \
                 those devices count as seen now"
            );
        }
        let loaded = accounts::load(&FsIo, &config.data, &seen.seen)?;
        if loaded.torn_bytes > 0 {
            warn!(
                torn_bytes = loaded.torn_bytes,
                "account bindings ended in a torn record (a crash while writing); it was ignored"
            );
        }
        // Companions live on their account's shard: a shard-count change re-homes their
        // queued items by the account, as the directory says.
        let devices = hop_store::devices::load(&FsIo, &config.data)?;
        let directory = Arc::new(Directory::replay(&devices));
        let home_of_queue = |user, shards| {
            let account = match directory.placement(user) {
                crate::directory::Placement::Companion(account) => account,
                _ => user,
            };
            hop_router::home_shard(account, shards)
        };
        let layout = hop_store::prepare(
            &FsIo,
            &config.data,
            config.shards as u16,
            home_of_queue,
            config.store_options(),
            monotonic_ms(),
        )?;
        info!(?layout, "offline queue ready");
        let settings = privacy::load(&FsIo, &config.data)?;
        if settings.torn_bytes > 0 {
            warn!(
                torn_bytes = settings.torn_bytes,
                "presence settings ended in a torn record (a crash while writing); it was ignored"
            );
        }
        let groups = hop_store::groups::load(&FsIo, &config.data)?;
        let tokens =
            Arc::new(Tokens::open(&config.data, config.token_ttl_ms).map_err(StartError::Tokens)?);
        let key = Arc::new(key);
        let kind = choose_backend(config.backend);
        let ceiling = connection_ceiling(config, kind);
        let controls = controls.clone();
        // Shared by the shards and the admin listener: who each companion device belongs to.
        let (cluster, secrets) = match start_cluster(config, local_addr, &key)? {
            Some((membership, secret)) => (Some(membership), Secrets::derive(&secret)),
            None => (None, Secrets::derive(key.private())),
        };
        let bindings = Arc::new(Restored {
            bindings: loaded.bindings,
            privacy: settings.settings,
            devices,
            groups,
            clock_base_s: seen.clock_s.saturating_add(1),
            seen: seen.seen,
            secrets,
        });
        let shared = Shared {
            controls: controls.clone(),
            directory: directory.clone(),
            cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
            addresses: AddressTable::new(config.admission_limits()),
            tokens: (config.registration == crate::config::Registration::Token)
                .then(|| tokens.clone()),
            handover: Handover::new(config.shards),
        };
        let handover = shared.handover.clone();
        let (shutdown, wake_all, threads, stats, mailbox_depth) = match kind {
            sys::Kind::Mio => start_shards::<MioBackend>(
                config,
                listeners,
                &key,
                &bindings,
                ceiling.per_shard,
                &shared,
                inherited_shards,
            )?,
            #[cfg(target_os = "linux")]
            sys::Kind::Uring => start_shards::<sys::uring::UringBackend>(
                config,
                listeners,
                &key,
                &bindings,
                ceiling.per_shard,
                &shared,
                inherited_shards,
            )?,
            #[cfg(not(target_os = "linux"))]
            sys::Kind::Uring => unreachable!("choose_backend picks uring only on Linux"),
        };
        Ok(Self {
            local_addr,
            public_key: *key.public(),
            shards: config.shards,
            ceiling,
            shutdown,
            wake_all,
            threads,
            stats,
            controls,
            mailbox_depth,
            directory,
            cluster,
            tokens,
            handover,
            listeners: listener_fds,
        })
    }

    /// Asks every shard to stop: each sends GoAway to its clients and exits.
    pub fn stop(&self) {
        if let Some((_, stop)) = &self.cluster {
            stop.store(true, Ordering::Release);
        }
        self.shutdown.store(true, Ordering::Release);
        (self.wake_all)();
    }

    /// True while every shard thread runs.
    pub fn is_healthy(&self) -> bool {
        self.threads.iter().all(|thread| !thread.is_finished())
    }

    /// Waits for the shards to stop. Returns false if any shard panicked.
    pub fn join(self) -> bool {
        let mut clean = true;
        for thread in self.threads {
            if thread.join().is_err() {
                clean = false;
            }
        }
        clean
    }
}

/// Runs until stopped, then stops cleanly.
///
/// - SIGTERM (or `hop admin drain`) starts a lame-duck drain: no new connections, the held
///   ones sent away spread over `drain_ms`; hopd exits 0 when the last has gone or the window
///   (plus a grace for the last closes) has passed. A second SIGTERM stops at once.
/// - SIGINT stops at once: every connection gets its GoAway now.
/// - SIGHUP reads the settings again (the `--config` file, then the flags) and applies those
///   that can change live: `log` and `drain_ms`. It never stops hopd.
///
/// A shard that panics is restarted by its own supervisor ([`shard::run`]); one that keeps
/// panicking gives up, which stops the server: the process exits non-zero so that the service
/// manager restarts it.
pub fn serve(
    config: &Config,
    reload: &dyn Fn() -> Result<Config, String>,
    set_log_filter: SetLogFilter,
    take_over: bool,
) -> Result<bool, StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Whatever hopd creates is its own alone (the store asks for 0700 and 0600 as well): a
    // service manager's or a shell's permissive umask must not open message bodies to others.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(StartError::Signals)?;
    // A write past the file-size limit (RLIMIT_FSIZE) must fail with EFBIG, which the store
    // reports to the senders like a full disk, instead of killing hopd with SIGXFSZ.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(StartError::Signals)?;
    #[cfg(target_os = "linux")]
    if !config.transparent_huge_pages {
        // Before the shards allocate their tables: from here on memory is backed 4 KiB at a
        // time, as it is touched.
        if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
            warn!(%error, "cannot turn transparent huge pages off; memory may follow the connection ceiling");
        }
    }
    // The admin listener comes first, so that `/readyz` says "starting" while the queues
    // recover; it learns of the shards once they run.
    let controls = Arc::new(Controls::new(config.shards));
    let views = Arc::new(std::sync::OnceLock::new());
    let drain_ms = Arc::new(AtomicU64::new(config.drain_ms));
    let start_admin = |patience: Duration| -> Result<Option<Admin>, StartError> {
        let AdminAddress::At(addr) = config.admin else {
            return Ok(None);
        };
        let state = AdminState {
            controls: controls.clone(),
            shards: views.clone(),
            set_log_filter: set_log_filter.clone(),
            drain_ms: drain_ms.clone(),
        };
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Admin::start(addr, state.clone()) {
                Ok(admin) => return Ok(Some(admin)),
                // After a takeover the old process lets the address go as it exits.
                Err(error)
                    if error.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(StartError::Admin { addr, source }),
            }
        }
    };
    // A takeover starts the admin listener once the old process has let its address go.
    let mut admin = if take_over {
        None
    } else {
        start_admin(Duration::ZERO)?
    };
    // A takeover: the running hopd's sockets and sessions come first; the store is read
    // from disk below, as at any start, once the old process has committed and frozen.
    let mut inherited = if take_over {
        // The descriptors arrive all at once, before the shards register them.
        raise_fd_limit();
        let inherited =
            takeover::take_over(&config.data, config.shards).map_err(StartError::Takeover)?;
        let connections: usize = inherited.shards.iter().map(|s| s.conns.len()).sum();
        info!(connections, "takeover: received the running hopd's sockets");
        Some(inherited)
    } else {
        None
    };
    let mut server = Server::start(config, &controls, inherited.as_mut())?;
    let _ = views.set(ShardViews {
        stats: server.stats.clone(),
        mailbox_depth: server.mailbox_depth.clone(),
        directory: server.directory.clone(),
        cluster: server.cluster.as_ref().map(|(cluster, _)| cluster.clone()),
        tokens: server.tokens.clone(),
    });
    if let Some(inherited) = inherited.take() {
        // The store is recovered: the old process lets go for good, then the shards resume
        // its connections. If it does not, it serves on and this process stops.
        if let Err(error) = inherited.commit() {
            server.stop();
            server.join();
            return Err(StartError::Takeover(error));
        }
        info!("takeover: the old process let go; serving its connections");
        // Serving matters more than the admin listener now: the old process is gone.
        admin = start_admin(ADMIN_REBIND_PATIENCE).unwrap_or_else(|error| {
            warn!(%error, "takeover: serving without the admin listener");
            None
        });
    }
    // This process offers a takeover to the next one in turn, from before the status line so
    // that whoever read it may ask. A cluster member does not: its links and membership do
    // not travel (it upgrades by drain).
    let refusal = server
        .cluster
        .is_some()
        .then(|| "a cluster member upgrades by drain, not by takeover".to_string());
    let offer = match takeover::offer(
        &config.data,
        config.shards,
        std::mem::take(&mut server.listeners),
        server.handover.clone(),
        refusal,
    ) {
        Ok(offer) => Some(offer),
        Err(error) => {
            warn!(%error, "cannot offer a takeover; upgrades must drain");
            None
        }
    };
    // The status line: scripts read the address (fourth word) and the key.
    println!(
        "hopd listening on {} with {} shard{}; server key {}; data {}; ceiling {} connections ({}); admin {}",
        server.local_addr,
        server.shards,
        if server.shards == 1 { "" } else { "s" },
        hex::encode(server.public_key),
        config.data.display(),
        server.ceiling.total,
        server.ceiling.bound_by,
        admin
            .as_ref()
            .map_or_else(|| "off".to_string(), |admin| admin.local_addr.to_string()),
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_until_serving(&server);
    notify_service_manager(&[sd_notify::NotifyState::Ready]);
    let handle = signals.handle();
    let mut drain_started: Option<(std::time::Instant, u64)> = None;
    let mut stop_deferred = false;
    let clean = loop {
        let mut stop_now = false;
        for signal in signals.pending() {
            match signal {
                SIGHUP => apply_reload(reload(), config, &set_log_filter, &drain_ms),
                SIGTERM if !server.controls.is_draining() => {
                    let window_ms = drain_ms.load(Ordering::Relaxed);
                    info!(window_ms, "SIGTERM: draining");
                    server.controls.start_drain(window_ms);
                }
                _ => {
                    info!(signal, "stopping");
                    stop_now = true;
                }
            }
        }
        if drain_started.is_none() {
            if let Some(window_ms) = server.controls.drain_window_ms() {
                notify_service_manager(&[sd_notify::NotifyState::Stopping]);
                // The other nodes take this node's users now, not a lease time later.
                if let Some((cluster, _)) = &server.cluster {
                    cluster.leave();
                }
                drain_started = Some((std::time::Instant::now(), window_ms));
                // A draining hopd is taken over by nobody, and the listeners its shards let
                // go must close.
                if let Some(offer) = &offer {
                    offer.withdraw();
                }
            }
        }
        if let Some((since, window_ms)) = drain_started {
            if server.controls.is_drained() {
                info!("drained: every connection has gone; stopping");
                stop_now = true;
            } else if since.elapsed() >= Duration::from_millis(window_ms) + DRAIN_GRACE {
                info!("the drain window has passed; stopping");
                stop_now = true;
            }
        }
        if server.handover.is_gone() {
            // Every connection lives on in the new process: no GoAway, no close, nothing
            // more written to disk. The socket file is the new process's now.
            info!("taken over by a new process; exiting");
            std::mem::forget(offer);
            notify_service_manager(&[sd_notify::NotifyState::Stopping]);
            std::process::exit(0);
        }
        if stop_now && server.handover.is_active() {
            // The shards are frozen for a takeover: stopping now would send away connections
            // the new process may hold. The stop waits for the takeover's outcome.
            if !stop_deferred {
                info!("a takeover is under way: stopping once it succeeds or fails");
                stop_deferred = true;
            }
        } else if stop_now || stop_deferred {
            break true;
        }
        if !server.is_healthy() {
            error!("a shard stopped unexpectedly; stopping the server");
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    handle.close();
    drop(admin);
    server.stop();
    let joined = server.join();
    Ok(clean && joined)
}

/// How long a new process waits for the admin address after a takeover (the old process lets
/// it go as it exits).
const ADMIN_REBIND_PATIENCE: Duration = Duration::from_secs(10);

/// How long past the drain window hopd waits for the last connections to close.
const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// Waits (bounded) until every shard runs its loop, for the service manager's READY.
fn wait_until_serving(server: &Server) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.controls.is_ready() && std::time::Instant::now() < deadline {
        if !server.is_healthy() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tells systemd (`Type=notify`) where hopd is; nothing when not run by it.
fn notify_service_manager(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(error) = sd_notify::notify(state) {
            warn!(%error, "cannot notify the service manager");
        }
    }
}

/// SIGHUP: applies what can change while hopd runs, and says what needs a restart.
fn apply_reload(
    reloaded: Result<Config, String>,
    running: &Config,
    set_log_filter: &SetLogFilter,
    drain_ms: &AtomicU64,
) {
    let reloaded = match reloaded {
        Ok(reloaded) => reloaded,
        Err(error) => {
            warn!(%error, "SIGHUP: the settings did not load; nothing changed");
            return;
        }
    };
    match set_log_filter(&reloaded.log) {
        Ok(()) => info!(log = %reloaded.log, "SIGHUP: log filter set"),
        Err(error) => {
            warn!(log = %reloaded.log, %error, "SIGHUP: invalid log filter; kept the old one")
        }
    }
    drain_ms.store(reloaded.drain_ms, Ordering::Relaxed);
    let live = Config {
        log: running.log.clone(),
        drain_ms: running.drain_ms,
        ..reloaded.clone()
    };
    if live != *running {
        warn!("SIGHUP: settings other than log and drain_ms changed; they take effect at the next start");
    }
    info!(drain_ms = reloaded.drain_ms, "SIGHUP: settings reloaded");
}

/// Refuses a data folder that users other than its owner may read, write or enter.
fn check_data_folder_mode(data: &std::path::Path) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(data).map_err(|source| StartError::DataFolder {
            path: data.display().to_string(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(StartError::DataFolderOpen {
                path: data.display().to_string(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = data;
    Ok(())
}

/// What every shard learns at start from the account files: who exists and who hides.
struct Restored {
    bindings: Vec<(hop_protocol::UserId, [u8; 32])>,
    privacy: Vec<(hop_protocol::UserId, u8, Vec<hop_protocol::UserId>)>,
    /// Device links and unlinks, in the order they were made.
    devices: Vec<DeviceRecord>,
    /// The latest state of every group.
    groups: Vec<GroupRecord>,
    /// When each device was last seen, on the account clock.
    seen: HashMap<hop_protocol::UserId, u32>,
    /// The account clock at process start: the latest time on disk, and a second.
    clock_base_s: u32,
    /// What message ids and Read proofs are keyed with: derived from the server's key, or in a
    /// cluster from the cluster's shared secret.
    secrets: Secrets,
}

/// Mails waiting in the `from -> to` mailbox.
pub type MailboxDepth = Arc<dyn Fn(ShardId, ShardId) -> usize + Send + Sync>;

type Started = (
    Arc<AtomicBool>,
    Arc<dyn Fn() + Send + Sync>,
    Vec<JoinHandle<()>>,
    Vec<Arc<ShardStats>>,
    MailboxDepth,
);

/// Starts one thread per listener, each creating its own backend `B` (a ring must be created
/// by the thread that uses it), and waits until every shard has registered its address.
fn start_shards<B: Backend>(
    config: &Config,
    listeners: Vec<TcpListener>,
    key: &Arc<StaticKey>,
    bindings: &Arc<Restored>,
    connections_per_shard: usize,
    shared: &Shared,
    mut inherited: Vec<Option<(ShardExport, Arc<Gate>)>>,
) -> Result<Started, StartError> {
    let shards = config.shards;
    let shutdown = Arc::new(AtomicBool::new(false));
    let mailboxes: Arc<ShardMailboxes<B>> = Arc::new(Mailboxes::new(shards, config.mailbox_depth));
    let cpus = allowed_cpus();
    let limits = BackendLimits {
        connections_max: connections_per_shard.max(1),
        send_buffer_bytes_max: config.send_buffer_bytes_max,
        close_linger: CLOSE_LINGER,
        poll_then_receive: config.uring_receive == UringReceive::Poll,
    };
    // Every shard registers before any starts its loop; a shard that fails to start reports.
    let registered = Arc::new(Barrier::new(shards + 1));
    let (report, reports) = std::sync::mpsc::channel::<(usize, String)>();
    let store_options = config.store_options();
    let data = config.data.clone();
    let mut threads = Vec::with_capacity(shards);
    let mut stats = Vec::with_capacity(shards);
    for (index, listener) in listeners.into_iter().enumerate() {
        let shard_stats = Arc::new(ShardStats::default());
        stats.push(shard_stats.clone());
        let settings = ShardSettings {
            index: index as ShardId,
            shards: shards as u16,
            handshake_timeout_ms: config.handshake_timeout_ms,
            idle_timeout_ms: config.idle_timeout_ms,
            connection_slots: limits.connections_max + CONNECTION_SLOTS_SPARE,
            keeping: config.keeping(),
            send_budget_bytes: config.send_buffers_bytes_max.div_ceil(shards.max(1)),
            account_clock_base_s: bindings.clock_base_s,
            handshakes_per_turn: config.handshakes_per_turn,
            handshake_thread: config.handshake_thread,
            idle_poll_us: config.idle_poll_us,
        };
        let accounts = AccountLog::open(&FsIo, &config.data, index as u16)?;
        if accounts.opened().torn_bytes_cut > 0 {
            warn!(
                shard = index,
                torn_bytes = accounts.opened().torn_bytes_cut,
                path = %accounts.path().display(),
                "cut off a torn account record"
            );
        }
        let mut router = restored_router(config, index, bindings);
        let privacy = PrivacyLog::open(&FsIo, &config.data, index as u16)?;
        let devices = DeviceLog::open(&FsIo, &config.data, index as u16)?;
        let groups = GroupLog::open(&FsIo, &config.data, index as u16)?;
        let seen = SeenLog::open(&FsIo, &config.data, index as u16)?;
        let rebuild = rebuilder(config, index, &bindings.secrets);
        let cpu = (config.pin_cores && !cpus.is_empty()).then(|| cpus[index % cpus.len()]);
        let (key, mailboxes, shutdown, registered, report, data) = (
            key.clone(),
            mailboxes.clone(),
            shutdown.clone(),
            registered.clone(),
            report.clone(),
            data.clone(),
        );
        let Shared {
            controls,
            directory,
            cluster,
            addresses,
            tokens,
            handover,
        } = shared.clone();
        let inherited = inherited.get_mut(index).and_then(Option::take);
        let thread = std::thread::Builder::new()
            .name(format!("hop-shard-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                // A panic here must still reach the barrier, or the start would wait forever.
                let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    B::open(listener, limits)
                        .map_err(|error| error.to_string())
                        .and_then(|backend| {
                            let store = open_store(
                                &data,
                                index as u16,
                                shards as u16,
                                store_options,
                                &mut router,
                            )
                            .map_err(|error| error.to_string())?;
                            Ok((backend, store))
                        })
                }))
                .unwrap_or_else(|_| Err("the shard panicked while it started".to_string()));
                let (backend, store) = match opened {
                    Ok(opened) => opened,
                    Err(error) => {
                        let _ = report.send((index, error));
                        registered.wait();
                        return;
                    }
                };
                mailboxes.register(index as ShardId, backend.peer(), backend.remote_waker());
                controls.register(index as ShardId, backend.remote_waker());
                registered.wait();
                if shutdown.load(Ordering::Acquire) {
                    return; // another shard failed to start
                }
                shard::run(ShardParts {
                    settings,
                    backend,
                    router,
                    key,
                    mailboxes,
                    stats: shard_stats,
                    accounts,
                    privacy,
                    store,
                    shutdown,
                    controls,
                    rebuild,
                    devices,
                    directory,
                    groups,
                    seen,
                    cluster,
                    addresses,
                    tokens,
                    handover,
                    inherited,
                });
            })
            .map_err(|source| StartError::Shard {
                shard: index,
                source,
            })?;
        threads.push(thread);
    }
    drop(report);
    registered.wait();
    if let Ok((shard, reason)) = reports.try_recv() {
        shutdown.store(true, Ordering::Release);
        for thread in threads {
            let _ = thread.join();
        }
        return Err(StartError::Shard {
            shard,
            source: io::Error::other(reason),
        });
    }
    let waiting = mailboxes.clone();
    shared.handover.set_mail_waiting(Box::new(move || {
        (0..shards as ShardId)
            .any(|from| (0..shards as ShardId).any(|to| from != to && waiting.depth(from, to) > 0))
    }));
    let depth_of = mailboxes.clone();
    let depth: MailboxDepth = Arc::new(move |from, to| depth_of.depth(from, to));
    let wake_all: Arc<dyn Fn() + Send + Sync> = Arc::new(move || mailboxes.wake_all_remotely());
    Ok((shutdown, wake_all, threads, stats, depth))
}

/// Shard `index`'s router, with the bindings and presence settings read from disk.
fn restored_router(config: &Config, index: usize, restored: &Restored) -> Router {
    let mut router = Router::new(
        index as ShardId,
        config.shards as u16,
        config.router_limits(),
        restored.secrets.clone(),
    );
    // A companion's binding is restored on its account's home shard, where the device lives.
    let mut account_of = HashMap::new();
    for record in &restored.devices {
        if record.linked {
            account_of.insert(record.device, record.account);
        } else {
            account_of.remove(&record.device);
        }
    }
    for (user, _) in &restored.bindings {
        router.restore_binding(*user, account_of.get(user).copied().unwrap_or(*user));
    }
    for (user, visibility, contacts) in &restored.privacy {
        let privacy = hop_router::Privacy {
            visibility: hop_protocol::wire::Visibility::try_from(i32::from(*visibility))
                .unwrap_or(hop_protocol::wire::Visibility::Nobody),
            contacts: contacts.clone(),
        };
        router.restore_privacy(*user, privacy);
    }
    for record in &restored.devices {
        router.restore_device_link(record.account, record.device, record.linked);
    }
    for (device, seconds) in &restored.seen {
        router.restore_seen(*device, *seconds);
    }
    if config.registration == crate::config::Registration::Closed {
        router.close_registration();
    }
    for record in &restored.groups {
        router.restore_group(hop_router::GroupSnapshot {
            group: record.group,
            version: record.version,
            name: record.name.clone(),
            members: record.members.clone(),
        });
    }
    router
}

/// How shard `index` is rebuilt from disk after a panic: bindings and presence settings read
/// again (the other shards go on appending theirs meanwhile: a torn tail of theirs is
/// skipped), its logs opened again, its queue recovered.
fn rebuilder(config: &Config, index: usize, secrets: &Secrets) -> shard::Rebuild {
    let (config, secrets) = (config.clone(), secrets.clone());
    Box::new(move || {
        let seen = hop_store::seen::load(&FsIo, &config.data).map_err(|error| error.to_string())?;
        let loaded =
            accounts::load(&FsIo, &config.data, &seen.seen).map_err(|error| error.to_string())?;
        let settings = privacy::load(&FsIo, &config.data).map_err(|error| error.to_string())?;
        let devices =
            hop_store::devices::load(&FsIo, &config.data).map_err(|error| error.to_string())?;
        let groups =
            hop_store::groups::load(&FsIo, &config.data).map_err(|error| error.to_string())?;
        let restored = Restored {
            bindings: loaded.bindings,
            privacy: settings.settings,
            devices,
            groups,
            seen: seen.seen,
            // Unused here: the shard's clock carries on from its settings.
            clock_base_s: 0,
            secrets: secrets.clone(),
        };
        let mut router = restored_router(&config, index, &restored);
        let accounts = AccountLog::open(&FsIo, &config.data, index as u16)
            .map_err(|error| error.to_string())?;
        let privacy = PrivacyLog::open(&FsIo, &config.data, index as u16)
            .map_err(|error| error.to_string())?;
        let devices = DeviceLog::open(&FsIo, &config.data, index as u16)
            .map_err(|error| error.to_string())?;
        let groups =
            GroupLog::open(&FsIo, &config.data, index as u16).map_err(|error| error.to_string())?;
        let seen =
            SeenLog::open(&FsIo, &config.data, index as u16).map_err(|error| error.to_string())?;
        let store = open_store(
            &config.data,
            index as u16,
            config.shards as u16,
            config.store_options(),
            &mut router,
        )
        .map_err(|error| error.to_string())?;
        Ok(shard::Fresh {
            router,
            accounts,
            privacy,
            devices,
            groups,
            seen,
            store,
        })
    })
}

/// Opens a shard's offline queue and gives its items back to the router.
fn open_store(
    data: &std::path::Path,
    shard: u16,
    shards: u16,
    options: hop_store::Options,
    router: &mut Router,
) -> Result<ShardStore<FsIo>, hop_store::StoreError> {
    let (mut store, recovery) =
        ShardStore::open(data, shard, shards, options, FsIo, monotonic_ms())?;
    let damaged =
        recovery.corrupt_records + recovery.torn_bytes + u64::from(recovery.missing_segments);
    if damaged > 0 {
        warn!(
            shard,
            ?recovery,
            "offline queue recovered with damage; damaged records were skipped"
        );
    } else {
        info!(
            shard,
            records = recovery.records_live,
            users = recovery.users,
            "offline queue recovered"
        );
    }
    // The router keeps what acks and names each item; the bodies stay on disk. Read a few
    // records at a time so that restoring a large queue does not hold it in memory at once.
    let users: Vec<hop_protocol::UserId> = store.users().map(|(user, _)| user).collect();
    let mut records = Vec::with_capacity(RESTORE_RECORDS_PER_READ);
    for user in users {
        // A record that does not read back leaves the store's queue, so every read either
        // moves `skip` on or shortens the queue.
        let mut skip = 0;
        while skip < store.queue_len(user) {
            records.clear();
            skip += store.read(user, skip, RESTORE_RECORDS_PER_READ, &mut records)?;
            for record in records.drain(..) {
                router.restore_item(user, &queued(record.item));
            }
        }
    }
    Ok(store)
}

/// Connection ids beyond a shard's share that a backend may use for a moment (refusals,
/// closes, handovers in flight): `uring`'s reserved fixed-file slots.
const CONNECTION_SLOTS_SPARE: usize = 64;

/// Records one restore read takes: at most 64 × 64 KiB of bodies in memory at once.
const RESTORE_RECORDS_PER_READ: usize = 64;

fn queued(item: hop_store::StoredItem) -> hop_router::Queued {
    match item {
        hop_store::StoredItem::Message {
            from: to,
            id,
            timestamp_ms,
            body,
            sent: true,
            group: None,
        } => hop_router::Queued::Sent {
            to,
            id,
            timestamp_ms,
            body,
        },
        hop_store::StoredItem::Message {
            from,
            id,
            timestamp_ms,
            body,
            group,
            ..
        } => hop_router::Queued::received(
            from,
            id,
            timestamp_ms,
            body,
            group.map(|tag| (tag.group, tag.event)),
        ),
        hop_store::StoredItem::Receipt {
            id,
            kind,
            by,
            timestamp_ms,
        } => hop_router::Queued::Receipt {
            id,
            kind: hop_protocol::wire::ReceiptKind::try_from(i32::from(kind))
                .unwrap_or(hop_protocol::wire::ReceiptKind::Delivered),
            by,
            timestamp_ms,
        },
    }
}

fn bind_listeners(addr: SocketAddr, shards: usize) -> Result<Vec<TcpListener>, StartError> {
    let error = |source| StartError::Listen { addr, source };
    let mut listeners = Vec::with_capacity(shards);
    let mut bound = addr;
    for _ in 0..shards {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(error)?;
        socket.set_reuse_address(true).map_err(error)?;
        #[cfg(not(target_os = "freebsd"))]
        socket.set_reuse_port(true).map_err(error)?;
        #[cfg(target_os = "freebsd")]
        socket.set_reuse_port_lb(true).map_err(error)?;
        socket.bind(&bound.into()).map_err(error)?;
        socket.listen(LISTEN_BACKLOG).map_err(error)?;
        let listener: TcpListener = socket.into();
        // With port 0 the first bind picks the port; the other shards join it.
        bound = listener.local_addr().map_err(error)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The backend to run: the one configured, or `mio` (saying why) where `uring` cannot run.
fn choose_backend(name: BackendName) -> sys::Kind {
    match name {
        BackendName::Mio => sys::Kind::Mio,
        BackendName::Uring => match sys::probe_uring() {
            Ok(()) => sys::Kind::Uring,
            Err(reason) => {
                warn!("backend uring unavailable: {reason}; running on mio");
                sys::Kind::Mio
            }
        },
    }
}

/// Computes and logs how many connections this server can hold, and what limits it: the
/// model `hop-tune check` applies to a host (`hop_tune::connection_ceiling`: descriptors per
/// process or per ring, system-wide files and sockets, conntrack, memory, each with headroom
/// for closing connections), capped by `connections_max`. One model, one number, logged once.
fn connection_ceiling(config: &Config, kind: sys::Kind) -> sys::Ceiling {
    let backend = match kind {
        sys::Kind::Mio => hop_tune::Backend::Mio,
        sys::Kind::Uring => hop_tune::Backend::Uring,
    };
    let limits = live_limits();
    let model = hop_tune::connection_ceiling(&limits, backend, config.shards as u32);
    let modelled = usize::try_from(model.connections).unwrap_or(usize::MAX);
    let (total, bound_by) = if config.connections_max <= modelled {
        (config.connections_max, "connections_max")
    } else {
        (modelled, model.limiting.name(limits.os))
    };
    let ceiling = sys::Ceiling {
        total,
        per_shard: total / config.shards.max(1),
        bound_by,
    };
    info!(
        backend = ?kind,
        ceiling = ceiling.total,
        per_shard = ceiling.per_shard,
        bound_by = ceiling.bound_by,
        shards = config.shards,
        model = %model,
        "connection ceiling"
    );
    ceiling
}

/// The limits that bound connections, as `hop-tune check` reads them. Where they cannot be
/// read, the process's descriptor limit alone (memory unknown: not a bound).
fn live_limits() -> hop_tune::LiveLimits {
    let keys = [
        "fs.nr_open",
        "fs.file-max",
        "net.netfilter.nf_conntrack_max",
        "kern.maxfilesperproc",
        "kern.maxfiles",
        "kern.ipc.maxsockets",
    ];
    #[cfg(target_os = "linux")]
    let read = hop_tune::live::ProcRoot::new("/proc").read_live(&keys, None);
    #[cfg(target_os = "freebsd")]
    let read = hop_tune::live::read_freebsd(&keys, None);
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    let read: Result<hop_tune::live::LiveHost, String> =
        Err("this OS's limits are not modelled".to_string());
    match read {
        Ok(host) => host.limits,
        Err(error) => {
            warn!(%error, "cannot read the host's limits; the ceiling follows the descriptor limit alone");
            use nix::sys::resource::{getrlimit, Resource};
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
            hop_tune::LiveLimits {
                os: if cfg!(target_os = "freebsd") {
                    hop_tune::Os::FreeBsd
                } else {
                    hop_tune::Os::Linux
                },
                nofile_soft: soft,
                nofile_hard: hard,
                files_per_process_max: None,
                files_system_max: None,
                sockets_system_max: None,
                conntrack_max: None,
                memory_bytes: u64::MAX / 2,
            }
        }
    }
}

/// Raises the soft descriptor limit to the hard limit: each connection is a descriptor.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(error) => warn!(%error, soft, hard, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open-file limit"),
        Err(error) => warn!(%error, "cannot read the open-file limit"),
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        use nix::sched::{sched_getaffinity, CpuSet};
        use nix::unistd::Pid;
        match sched_getaffinity(Pid::from_raw(0)) {
            Ok(set) => (0..CpuSet::count())
                .filter(|cpu| set.is_set(*cpu).unwrap_or(false))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        Vec::new()
    }
}

/// Pins the calling thread to `cpu`: `sched_setaffinity` on Linux, `cpuset_setaffinity` on
/// FreeBSD (both through nix); elsewhere shards are not pinned.
fn pin_to_cpu(cpu: usize) {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        use nix::sched::{sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let mut set = CpuSet::new();
        if set.set(cpu).is_ok() {
            if let Err(error) = sched_setaffinity(Pid::from_raw(0), &set) {
                warn!(cpu, %error, "cannot pin shard to its CPU");
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    let _ = cpu;
}
