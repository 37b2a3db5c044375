//! A node's membership in its cluster, kept in etcd, and the view of the members every shard
//! reads when a handshake finishes.
//!
//! Each node puts one key, `/hop/members/NODE_ID`, under a lease it renews every third of the
//! lease time (`cluster_lease_ms`); the value names its client address (`advertise`), its
//! static key and its shard count. A node that dies stops renewing, etcd drops its key when the
//! lease runs out, and the others see it go. A second thread watches the prefix and publishes
//! each new member list as a [`View`]; placement over the view's members says where each user
//! lives ([`super::placement`]).
//!
//! A node counts itself a member only while its lease is known to be alive: when etcd has not
//! confirmed it for a whole lease time (etcd unreachable, or this node cut off from it), the
//! others may already have taken its users, so it stops serving (`Home::Unavailable`) until it
//! has joined again. This is what keeps two nodes from serving one user at once across a
//! partition: the minority side cannot renew.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hop_protocol::UserId;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::etcd::{Etcd, EtcdError, LeaseId, WatchEvent};
use super::links::Links;
use super::placement;
use crate::shard::monotonic_ms;

/// Where member keys live in etcd.
pub const MEMBERS_PREFIX: &str = "/hop/members/";
/// Where the cluster's shared secret lives in etcd ([`cluster_secret`]).
pub const SECRET_KEY: &str = "/hop/secret";
/// How long a starting node tries to read (or make) the cluster's secret before it gives up.
pub const SECRET_PATIENCE: Duration = Duration::from_secs(30);

/// The cluster's shared secret: 32 random bytes, made by the first node that asks and read by
/// every other, kept in etcd under [`SECRET_KEY`] as 64 hex digits. Message ids and Read
/// proofs are keyed with it instead of a node's own key, so that every node names a message
/// alike (a resend to a user's new home after its node died gets the original's id, and the
/// recipient's app takes it once) and checks a Read for a message another node delivered.
/// Tries every endpoint until `patience` has passed; the error says what failed last.
pub fn cluster_secret(
    endpoints: &[String],
    lease_ms: u64,
    patience: Duration,
) -> Result<[u8; 32], String> {
    let deadline = Instant::now() + patience;
    loop {
        let last = match read_or_make_secret(endpoints, lease_ms) {
            Ok(secret) => return Ok(secret),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "cannot read the cluster's secret ({SECRET_KEY}) from etcd {endpoints:?} within \
                 {patience:?}: {last}"
            ));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

fn read_or_make_secret(endpoints: &[String], lease_ms: u64) -> Result<[u8; 32], String> {
    let etcd = Etcd::new(endpoints, request_timeout(lease_ms)).map_err(|e| e.to_string())?;
    for _ in 0..2 {
        if let Some(found) = etcd.get(SECRET_KEY.as_bytes()).map_err(|e| e.to_string())? {
            let mut secret = [0u8; 32];
            hex::decode_to_slice(&found.value, &mut secret).map_err(|_| {
                format!("{SECRET_KEY} in etcd is not 64 hex digits: delete it to make a new one (every node must restart then)")
            })?;
            return Ok(secret);
        }
        let mut made = [0u8; 32];
        for part in made.chunks_exact_mut(8) {
            let random = hop_protocol::outbox::random_nonzero()
                .map_err(|_| "no randomness for the cluster's secret".to_string())?;
            part.copy_from_slice(&random.to_le_bytes());
        }
        // Another node may make it first: then its secret is read back, never overwritten.
        etcd.create(SECRET_KEY.as_bytes(), hex::encode(made).as_bytes(), None)
            .map_err(|e| e.to_string())?;
    }
    Err(format!("{SECRET_KEY} was made but cannot be read back"))
}

/// The shortest lease etcd grants whole seconds of; shorter settings are refused at start.
pub const LEASE_MS_MIN: u64 = 2_000;
/// Time allowed for one etcd request to one endpoint: a quarter of the lease (at least 200 ms,
/// at most 2 s). A renewal stuck on one endpoint (an etcd member that lost its leader, a
/// partition) must leave time to try the others, and to try again once etcd has elected a
/// leader, before this node's serving deadline passes.
fn request_timeout(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 4).clamp(200, 2_000))
}
/// A watch is ended and made again this often: a partition that drops the watch's connection
/// without closing it is noticed within this time, and the list read again.
const WATCH_LIFETIME: Duration = Duration::from_secs(10);
/// Pause before trying etcd again after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// What a node says of itself in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node_id: String,
    /// Where clients reach it ("host:port").
    pub advertise: String,
    /// Its static key, 64 hex digits: clients redirected to it pin it.
    pub server_key: String,
    pub shards: usize,
}

/// A live member, as the view holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub advertise: String,
    pub server_key: [u8; 32],
    pub shards: usize,
}

impl Member {
    fn from_record(record: MemberRecord) -> Option<Self> {
        let mut server_key = [0u8; 32];
        hex::decode_to_slice(&record.server_key, &mut server_key).ok()?;
        Some(Self {
            node_id: record.node_id,
            advertise: record.advertise,
            server_key,
            shards: record.shards,
        })
    }
}

/// The members as one node sees them at one moment.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Live members, in node id order.
    pub members: Vec<Member>,
    hashes: Vec<u64>,
    /// This node's place in `members`, while it is a member.
    pub this_node: Option<usize>,
    /// The etcd revision the list reflects.
    pub revision: i64,
}

/// Where a user's connection belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home<'a> {
    Here,
    There(&'a Member),
    /// This node is not a member now: it serves no one.
    Unavailable,
}

impl View {
    fn new(members: Vec<Member>, this_id: &str, revision: i64) -> Self {
        let mut members = members;
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let hashes = members
            .iter()
            .map(|member| placement::node_hash(&member.node_id))
            .collect();
        let this_node = members.iter().position(|member| member.node_id == this_id);
        Self {
            members,
            hashes,
            this_node,
            revision,
        }
    }

    /// The node `user` (an account, a group) lives on, as this list places it (whether this
    /// node may serve now is [`Cluster::home`]'s question).
    pub fn home(&self, user: UserId) -> Home<'_> {
        let Some(this_node) = self.this_node else {
            return Home::Unavailable;
        };
        match placement::home(&self.hashes, user) {
            Some(index) if index == this_node => Home::Here,
            Some(index) => Home::There(&self.members[index]),
            None => Home::Unavailable,
        }
    }

    /// The replica node of `user`, whose home is this node: the member placement ranks next.
    /// `None` when this node is not `user`'s home or is the only member.
    pub fn replica(&self, user: UserId) -> Option<&Member> {
        Some(&self.members[self.replica_index(user)?])
    }

    /// Of `sample` user ids spread over the id space, how many each member (in `members`
    /// order) is home to and replica node for: the placement's balance, for `hop admin
    /// cluster`.
    pub fn placement_counts(&self, sample: u64) -> Vec<(u64, u64)> {
        let mut counts = vec![(0, 0); self.members.len()];
        for n in 0..sample {
            // Ids are hashes of keys: spread them the same way.
            let Some(user) = UserId::from_halves(
                n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                n.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
            ) else {
                continue;
            };
            let (home, replica) = placement::first_two(&self.hashes, user);
            if let Some(home) = home {
                counts[home].0 += 1;
            }
            if let Some(replica) = replica {
                counts[replica].1 += 1;
            }
        }
        counts
    }

    /// The place in `members` of `user`'s replica node, as [`View::replica`].
    fn replica_index(&self, user: UserId) -> Option<usize> {
        let this_node = self.this_node?;
        let (home, next) = placement::first_two(&self.hashes, user);
        (home == Some(this_node)).then_some(())?;
        next
    }

    /// How many of `users` each member is home to, in member order (for operators).
    pub fn counts(&self, users: impl Iterator<Item = UserId>) -> Vec<usize> {
        let mut counts = vec![0; self.members.len()];
        for user in users {
            if let Some(index) = placement::home(&self.hashes, user) {
                counts[index] += 1;
            }
        }
        counts
    }
}

/// Settings of a node in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub etcd: Vec<String>,
    pub node_id: String,
    pub advertise: String,
    pub lease_ms: u64,
    pub shards: usize,
    pub server_key: [u8; 32],
}

/// Counters of the membership threads.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub joins: AtomicU64,
    pub renewals: AtomicU64,
    pub etcd_failures: AtomicU64,
    pub leases_lost: AtomicU64,
    pub view_changes: AtomicU64,
}

/// The shared state of a node's membership: written by its two threads, read by the shards
/// once per handshake and once per tick.
#[derive(Debug)]
pub struct Cluster {
    pub settings: ClusterSettings,
    view: RwLock<Arc<View>>,
    /// Bumped at every published view: a shard that sees it change re-checks its users.
    generation: AtomicU64,
    /// The members etcd listed last, and its revision.
    listed: Mutex<(Vec<Member>, i64)>,
    /// Until when (monotonic ms) this node's lease is certainly alive: the time its last
    /// confirmed renewal was *sent* plus the lease time etcd granted. etcd counts from when it
    /// received the renewal, later, so this node stops serving before etcd can drop its key,
    /// however long a request to an unreachable etcd blocks. 0: not a member.
    serving_until_ms: AtomicU64,
    lease: Mutex<Option<LeaseId>>,
    pub stats: ClusterStats,
    /// The links to the other members (`None` in unit tests).
    pub links: Option<Arc<Links>>,
    /// Per peer node key: the incarnation and the last sequence number of the mails taken
    /// from its links, so that mails sent again after a reconnect are taken once.
    taken: Mutex<HashMap<[u8; 32], (u64, u64)>>,
    /// The members that left, as (the generation whose view first lacked it, its placement
    /// hash as [`hop_router::Locality::replica`] names it), the latest [`DEPARTURES_KEPT`].
    departures: Mutex<VecDeque<(u64, u32)>>,
}

/// Departures [`Cluster`] remembers for shards that have not looked yet.
const DEPARTURES_KEPT: usize = 1024;

impl Cluster {
    pub fn new(settings: ClusterSettings, links: Option<Arc<Links>>) -> Self {
        Self {
            links,
            taken: Mutex::new(HashMap::new()),
            departures: Mutex::new(VecDeque::new()),
            settings,
            view: RwLock::new(Arc::new(View::default())),
            generation: AtomicU64::new(0),
            listed: Mutex::new((Vec::new(), 0)),
            serving_until_ms: AtomicU64::new(0),
            lease: Mutex::new(None),
            stats: ClusterStats::default(),
        }
    }

    pub fn view(&self) -> Arc<View> {
        self.view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The members that left the list in the views after generation `seen` (a node that left
    /// and came back between two looks is among them: the mail it held then is gone), by
    /// placement hash. `None` when departures that old are forgotten.
    pub fn departed_since(&self, seen: u64) -> Option<Vec<u32>> {
        let departures = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest kept may share its generation with forgotten ones.
        if departures.len() == DEPARTURES_KEPT && departures.front().is_some_and(|d| d.0 > seen) {
            return None;
        }
        let mut departed: Vec<u32> = departures
            .iter()
            .filter(|(generation, _)| *generation > seen)
            .map(|(_, hash)| *hash)
            .collect();
        departed.sort_unstable();
        departed.dedup();
        Some(departed)
    }

    /// The name of the member whose server key `key` is, if it is another member's: its
    /// connection is a node link.
    pub fn peer_of(&self, key: &[u8; 32]) -> Option<String> {
        self.view()
            .members
            .iter()
            .find(|member| &member.server_key == key && member.node_id != self.settings.node_id)
            .map(|member| member.node_id.clone())
    }

    /// Whether mail `seq` of `incarnation` from the peer with `key` is new (not taken before,
    /// when its link sent unacked mails again after a reconnect); records it as taken.
    pub fn take_link_mail(&self, key: &[u8; 32], incarnation: u64, seq: u64) -> bool {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let last = taken.entry(*key).or_insert((incarnation, 0));
        if last.0 != incarnation {
            *last = (incarnation, 0);
        }
        if seq <= last.1 {
            return false;
        }
        last.1 = seq;
        true
    }

    /// This node's lease is certainly alive now.
    pub fn serving(&self) -> bool {
        monotonic_ms() < self.serving_until_ms.load(Ordering::Acquire)
    }

    /// This node is a member now: its lease is alive and its key listed. It serves.
    pub fn is_member(&self) -> bool {
        self.serving() && self.view().this_node.is_some()
    }

    /// Where `user` lives, by `view` (from [`Cluster::view`]): `Unavailable` whenever this
    /// node's lease may have run out, whatever the list says.
    pub fn home<'v>(&self, view: &'v View, user: UserId) -> Home<'v> {
        if self.serving() {
            view.home(user)
        } else {
            Home::Unavailable
        }
    }

    fn confirm(&self, until_ms: u64) {
        self.serving_until_ms.store(until_ms, Ordering::Release);
    }

    /// Takes the members etcd listed; a new view only if they changed (a watch made again
    /// lists the same members, and must not make every shard walk its connections).
    fn set_listed(&self, mut members: Vec<Member>, revision: i64) {
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        {
            let mut listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
            if listed.0 == members {
                listed.1 = revision;
                return;
            }
            *listed = (members, revision);
        }
        self.publish();
    }

    fn publish(&self) {
        let (members, revision) = self
            .listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let view = View::new(members, &self.settings.node_id, revision);
        {
            let before = self.view();
            let generation = self.generation() + 1;
            let mut departures = self.departures.lock().unwrap_or_else(|p| p.into_inner());
            for (member, hash) in before.members.iter().zip(&before.hashes) {
                if !view.members.iter().any(|now| now.node_id == member.node_id) {
                    if departures.len() == DEPARTURES_KEPT {
                        departures.pop_front();
                    }
                    departures.push_back((generation, *hash as u32));
                }
            }
        }
        let names: Vec<&str> = view.members.iter().map(|m| m.node_id.as_str()).collect();
        info!(
            members = ?names,
            member = view.this_node.is_some(),
            revision,
            "cluster view"
        );
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
        self.stats.view_changes.fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn member_key(&self) -> Vec<u8> {
        format!("{MEMBERS_PREFIX}{}", self.settings.node_id).into_bytes()
    }

    fn record(&self) -> MemberRecord {
        MemberRecord {
            node_id: self.settings.node_id.clone(),
            advertise: self.settings.advertise.clone(),
            server_key: hex::encode(self.settings.server_key),
            shards: self.settings.shards,
        }
    }

    /// Leaves the cluster at once (a drain): the lease is revoked, so the other nodes take
    /// this node's users without waiting for it to run out.
    pub fn leave(&self) {
        self.confirm(0);
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(lease), Ok(etcd)) = (
            lease,
            Etcd::new(&self.settings.etcd, request_timeout(self.settings.lease_ms)),
        ) {
            match etcd.revoke(lease) {
                Ok(()) => info!("left the cluster: lease revoked"),
                Err(error) => {
                    warn!(%error, "leaving the cluster: the lease could not be revoked; it runs out by itself")
                }
            }
        }
    }
}

/// One shard's answer to "does this user live on this node?", for its router: the view is
/// read again only when its generation changed, so the message path shares no lock, and no
/// reference count, with the other shards; only the generation, an atomic that changes when
/// the members do.
#[derive(Debug)]
pub struct ShardLocality {
    cluster: Arc<Cluster>,
    cached: std::cell::RefCell<(u64, Arc<View>)>,
}

impl ShardLocality {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let cached = (cluster.generation(), cluster.view());
        Self {
            cluster,
            cached: std::cell::RefCell::new(cached),
        }
    }
}

impl hop_router::Locality for ShardLocality {
    fn is_here(&self, user: UserId) -> bool {
        let generation = self.cluster.generation();
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, self.cluster.view());
        }
        self.cluster.home(&cached.1, user) == Home::Here
    }

    fn replica(&self, user: UserId) -> Option<u32> {
        let generation = self.cluster.generation();
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, self.cluster.view());
        }
        let view = &cached.1;
        view.replica_index(user)
            .map(|index| view.hashes[index] as u32)
    }
}

/// Starts the lease and watch threads of `cluster`; they stop when `stop` is set (the watch
/// thread at its next event or etcd error).
pub fn start(cluster: Arc<Cluster>, stop: Arc<AtomicBool>) -> Result<Vec<JoinHandle<()>>, String> {
    let etcd = Arc::new(
        Etcd::new(
            &cluster.settings.etcd,
            request_timeout(cluster.settings.lease_ms),
        )
        .map_err(|error| error.to_string())?,
    );
    let mut threads = Vec::new();
    for (name, role) in [
        ("hop-cluster-lease", Role::Lease),
        ("hop-cluster-watch", Role::Watch),
    ] {
        let (cluster, stop, etcd) = (cluster.clone(), stop.clone(), etcd.clone());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || match role {
                Role::Lease => keep_membership(&cluster, &etcd, &stop),
                Role::Watch => watch_members(&cluster, &etcd, &stop),
            })
            .map_err(|error| format!("cannot start {name}: {error}"))?;
        threads.push(thread);
    }
    Ok(threads)
}

#[derive(Clone, Copy)]
enum Role {
    Lease,
    Watch,
}

/// Joins (a lease, then the member key under it) and renews the lease every third of its
/// time. Each confirmed renewal extends [`Cluster::serving`]; when renewals fail, serving ends
/// by itself at the deadline, and the node joins anew once etcd answers.
fn keep_membership(cluster: &Cluster, etcd: &Etcd, stop: &AtomicBool) {
    let renew_every = Duration::from_millis(cluster.settings.lease_ms / 3);
    // Whether the last attempt failed, and whether the loss of the lease was told yet: one
    // warning per outage, not one per retry.
    let (mut failing, mut lapse_told) = (false, false);
    while !stop.load(Ordering::Acquire) {
        let sent_ms = monotonic_ms();
        let lease = *cluster.lease.lock().unwrap_or_else(|p| p.into_inner());
        let result = match lease {
            None => join(cluster, etcd).map(|(lease, ttl_s)| {
                *cluster.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
                cluster.stats.joins.fetch_add(1, Ordering::Relaxed);
                info!(node = %cluster.settings.node_id, lease, "joined the cluster");
                ttl_s
            }),
            Some(lease) => etcd
                .keep_alive(lease)
                .inspect(|_| {
                    cluster.stats.renewals.fetch_add(1, Ordering::Relaxed);
                })
                .map_err(JoinError::from),
        };
        match result {
            Ok(ttl_s) => {
                let ttl_ms = u64::try_from(ttl_s).unwrap_or(0).saturating_mul(1000);
                cluster.confirm(sent_ms.saturating_add(ttl_ms));
                if failing {
                    info!("etcd answers again");
                }
                (failing, lapse_told) = (false, false);
                sleep_unless(stop, renew_every);
                continue;
            }
            Err(JoinError::Etcd(EtcdError::LeaseExpired)) => {
                *cluster.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
                cluster.confirm(0);
            }
            Err(error) => {
                cluster.stats.etcd_failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    warn!(%error, "cluster membership: etcd request failed; retrying");
                }
                failing = true;
            }
        }
        if !cluster.serving() && lease.is_some() && !lapse_told {
            warn!("this node's cluster lease may have run out: it serves no one until it has joined again");
            cluster.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            *cluster.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
            lapse_told = true;
        }
        sleep_unless(stop, RETRY_PAUSE);
    }
}

/// A new lease, and this node's key under it. A key of the same id left by this node's previous
/// run (same static key) is taken over; one of another node is an error until it goes.
fn join(cluster: &Cluster, etcd: &Etcd) -> Result<(LeaseId, i64), JoinError> {
    let ttl_s = i64::try_from(cluster.settings.lease_ms.div_ceil(1000)).unwrap_or(i64::MAX);
    let (lease, granted_s) = etcd.grant(ttl_s)?;
    let key = cluster.member_key();
    let value = serde_json::to_vec(&cluster.record()).map_err(|error| {
        JoinError::Etcd(EtcdError::BadAnswer {
            call: "member record",
            reason: error.to_string(),
        })
    })?;
    if !etcd.create(&key, &value, Some(lease))? {
        let existing = etcd.get(&key)?;
        let ours = existing
            .as_ref()
            .and_then(|kv| serde_json::from_slice::<MemberRecord>(&kv.value).ok())
            .is_some_and(|record| record.server_key == hex::encode(cluster.settings.server_key));
        if !ours && existing.is_some() {
            let _ = etcd.revoke(lease);
            return Err(JoinError::Taken(cluster.settings.node_id.clone()));
        }
        etcd.put(&key, &value, Some(lease))?;
    }
    Ok((lease, granted_s))
}

#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(
        "node id {0:?} is held by another node (another server key): two nodes may not share a \
         node_id; waiting for that key to go"
    )]
    Taken(String),
}

/// Lists the members, then watches for changes, publishing each new list; after any failure it
/// lists again.
fn watch_members(cluster: &Cluster, etcd: &Etcd, stop: &AtomicBool) {
    let prefix = MEMBERS_PREFIX.as_bytes();
    while !stop.load(Ordering::Acquire) {
        let (listed, mut revision) = match etcd.range_prefix(prefix) {
            Ok(answer) => answer,
            Err(error) => {
                cluster.stats.etcd_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "cluster members: etcd list failed");
                sleep_unless(stop, RETRY_PAUSE);
                continue;
            }
        };
        let mut members: Vec<(Vec<u8>, Member)> = listed
            .into_iter()
            .filter_map(|kv| Some((kv.key.clone(), parse_member(&kv.value)?)))
            .collect();
        cluster.set_listed(members.iter().map(|(_, m)| m.clone()).collect(), revision);
        let mut watch = match etcd.watch_prefix(prefix, revision + 1, Some(WATCH_LIFETIME)) {
            Ok(watch) => watch,
            Err(error) => {
                cluster.stats.etcd_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "cluster members: etcd watch failed");
                sleep_unless(stop, RETRY_PAUSE);
                continue;
            }
        };
        while !stop.load(Ordering::Acquire) {
            let events = match watch.next_events() {
                Ok(events) => events,
                Err(error) => {
                    debug!(%error, "cluster members: the watch ended; listing again");
                    break;
                }
            };
            for event in events {
                match event {
                    WatchEvent::Put(kv) => {
                        revision = revision.max(kv.mod_revision);
                        members.retain(|(key, _)| *key != kv.key);
                        if let Some(member) = parse_member(&kv.value) {
                            members.push((kv.key, member));
                        }
                    }
                    WatchEvent::Delete { key, mod_revision } => {
                        revision = revision.max(mod_revision);
                        members.retain(|(k, _)| *k != key);
                    }
                }
            }
            cluster.set_listed(members.iter().map(|(_, m)| m.clone()).collect(), revision);
        }
    }
}

fn parse_member(value: &[u8]) -> Option<Member> {
    let member = serde_json::from_slice::<MemberRecord>(value)
        .ok()
        .and_then(Member::from_record);
    if member.is_none() {
        warn!("cluster members: a member record that is not hop's was skipped");
    }
    member
}

fn sleep_unless(stop: &AtomicBool, duration: Duration) {
    let until = Instant::now() + duration;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            node_id: id.to_string(),
            advertise: format!("{id}:7788"),
            server_key: [1; 32],
            shards: 2,
        }
    }

    fn settings(node_id: &str) -> ClusterSettings {
        ClusterSettings {
            etcd: vec!["http://127.0.0.1:1".into()],
            node_id: node_id.into(),
            advertise: format!("{node_id}:7788"),
            lease_ms: 2_000,
            shards: 2,
            server_key: [1; 32],
        }
    }

    #[test]
    fn placement_counts_show_each_member_home_to_about_its_share() {
        let cluster = Cluster::new(settings("n1"), None);
        cluster.set_listed(vec![member("n1"), member("n2"), member("n3")], 5);
        let counts = cluster.view().placement_counts(3_000);
        assert_eq!(counts.iter().map(|c| c.0).sum::<u64>(), 3_000, "{counts:?}");
        assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 3_000, "{counts:?}");
        for (home, replica) in &counts {
            assert!((800..1_200).contains(home), "{counts:?}");
            assert!((800..1_200).contains(replica), "{counts:?}");
        }
        cluster.set_listed(vec![member("n1")], 6);
        assert_eq!(cluster.view().placement_counts(100), [(100, 0)]);
    }

    #[test]
    fn a_member_that_left_and_came_back_between_two_looks_is_among_the_departed() {
        let cluster = Cluster::new(settings("n1"), None);
        cluster.set_listed(vec![member("n1"), member("n2"), member("n3")], 5);
        let seen = cluster.generation();
        assert_eq!(cluster.departed_since(seen), Some(vec![]));
        cluster.set_listed(vec![member("n1"), member("n2")], 6);
        cluster.set_listed(vec![member("n1"), member("n2"), member("n3")], 7);
        assert_eq!(cluster.view().members.len(), 3, "back as it was");
        let n3 = placement::node_hash("n3") as u32;
        assert_eq!(cluster.departed_since(seen), Some(vec![n3]));
        assert_eq!(cluster.departed_since(cluster.generation()), Some(vec![]));
        // Past what is remembered: not known.
        for revision in 0..2 * DEPARTURES_KEPT as i64 + 2 {
            let members = if revision % 2 == 0 {
                vec![member("n1"), member("n2")]
            } else {
                vec![member("n1"), member("n2"), member("n3")]
            };
            cluster.set_listed(members, 8 + revision);
        }
        assert_eq!(cluster.departed_since(seen), None);
    }

    #[test]
    fn a_node_serves_only_while_its_lease_is_certainly_alive_and_it_is_listed() {
        let user = UserId::from_public_key(&[9; 32]);
        let cluster = Cluster::new(settings("n1"), None);
        cluster.set_listed(vec![member("n2"), member("n1")], 5);
        let view = cluster.view();
        assert_eq!(view.members[0].node_id, "n1", "sorted by id");
        assert_eq!(view.this_node, Some(0));
        // Never confirmed: no one is served.
        assert_eq!(cluster.home(&view, user), Home::Unavailable);
        assert!(!cluster.is_member());
        cluster.confirm(monotonic_ms() + 60_000);
        assert_ne!(cluster.home(&view, user), Home::Unavailable);
        assert!(cluster.is_member());
        // The deadline passed (no renewal confirmed in time): serving ends by itself.
        cluster.confirm(monotonic_ms().saturating_sub(1));
        assert_eq!(cluster.home(&view, user), Home::Unavailable);
        // Alive but not listed (its key was dropped): no one either.
        cluster.confirm(monotonic_ms() + 60_000);
        cluster.set_listed(vec![member("n2")], 6);
        assert_eq!(cluster.home(&cluster.view(), user), Home::Unavailable);
        assert!(!cluster.is_member());
    }

    #[test]
    fn a_link_mail_sent_again_is_taken_once_and_a_new_incarnation_starts_over() {
        let cluster = Cluster::new(settings("n1"), None);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(cluster.take_link_mail(&a, 7, 1));
        assert!(cluster.take_link_mail(&a, 7, 2));
        // After a reconnect the link sends its unacked mails again.
        assert!(!cluster.take_link_mail(&a, 7, 1));
        assert!(!cluster.take_link_mail(&a, 7, 2));
        assert!(cluster.take_link_mail(&a, 7, 3));
        // Another peer counts on its own; a restarted peer (new incarnation) starts at 1.
        assert!(cluster.take_link_mail(&b, 9, 1));
        assert!(cluster.take_link_mail(&a, 8, 1));
    }

    #[test]
    fn the_same_list_again_is_no_new_view() {
        let cluster = Cluster::new(settings("n1"), None);
        cluster.set_listed(vec![member("n1"), member("n2")], 5);
        let generation = cluster.generation();
        // A watch made again lists the same members in another order and a later revision.
        cluster.set_listed(vec![member("n2"), member("n1")], 9);
        assert_eq!(cluster.generation(), generation);
        cluster.set_listed(vec![member("n1")], 10);
        assert_eq!(cluster.generation(), generation + 1);
    }

    #[test]
    fn every_user_is_served_by_exactly_one_of_the_nodes_that_see_one_list() {
        let members = vec![member("n1"), member("n2"), member("n3")];
        let views: Vec<View> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| View::new(members.clone(), id, 5))
            .collect();
        for n in 0..200u8 {
            let user = UserId::from_public_key(&[n; 32]);
            let here = views
                .iter()
                .filter(|view| view.home(user) == Home::Here)
                .count();
            assert_eq!(here, 1);
        }
    }

    #[test]
    fn records_that_are_not_members_are_skipped() {
        assert!(parse_member(b"not json").is_none());
        let record = MemberRecord {
            node_id: "n1".into(),
            advertise: "10.0.0.1:7788".into(),
            server_key: "ab".into(),
            shards: 1,
        };
        assert!(parse_member(&serde_json::to_vec(&record).unwrap()).is_none());
        let record = MemberRecord {
            server_key: hex::encode([7u8; 32]),
            ..record
        };
        let member = parse_member(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(member.server_key, [7; 32]);
    }
}
