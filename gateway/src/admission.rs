//! Admission: whether a new connection is served at all, decided at accept, before any
//! handshake work (a Noise responder costs about five X25519 operations, ~260 µs of a core).
//!
//! Two kinds of limit, each off at 0 (`docs/security.md` has the defaults and why):
//! - **per shard**: a token bucket of handshakes per second, so that new connections can never
//!   take more than a share of a core from the connections a shard already serves;
//! - **per source address** (an IPv4 address, an IPv6 /64): a token bucket of handshakes per
//!   second, and caps on the handshakes unfinished and the connections held at once. These are
//!   counted in one [`AddressTable`] for the whole server, since the kernel spreads one
//!   address's connections over every shard's listener; each connection is counted from its
//!   accept until it closes, on whichever shard it is by then.
//!
//! A refused connection gets a [`Refusal`] in place of handshake message 2 and is closed.
//!
//! The counting cannot leak: a connection's place in the table is held by a [`Tally`] entry of
//! its shard, or by the [`Admitted`] that travels with it to another shard, and both give it
//! back when dropped (a shard that panics drops its tally with its connections).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hop_protocol::noise::{Refusal, RefusalReason};
use hop_router::quota::{Bucket, Rate};

use crate::sys::ConnId;

/// Stripes of the address table: accepts on different shards rarely wait for each other.
const STRIPES: usize = 64;
/// The wait a refusal names when nothing will change soon (too many connections held).
const RETRY_HELD_MS: u32 = 60_000;
/// The wait a refusal names for too many unfinished handshakes: about one handshake's time.
const RETRY_HANDSHAKING_MS: u32 = 1_000;
/// The shortest and longest wait a rate refusal names.
const RETRY_MIN_MS: u32 = 100;
const RETRY_MAX_MS: u32 = 60_000;

/// The admission settings (each 0: that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes each shard starts per second (and at most this many at once after a quiet
    /// second).
    pub shard_handshakes_per_second: u32,
    /// Handshakes one source address starts per second, over the whole server.
    pub address_handshakes_per_second: u32,
    /// ... and at once, after a quiet while.
    pub address_handshake_burst: u32,
    /// Handshakes one source address has unfinished at once.
    pub address_handshakes_max: u32,
    /// Connections one source address holds at once.
    pub address_connections_max: u32,
}

impl AdmissionLimits {
    /// Every limit off.
    pub const OFF: Self = Self {
        shard_handshakes_per_second: 0,
        address_handshakes_per_second: 0,
        address_handshake_burst: 0,
        address_handshakes_max: 0,
        address_connections_max: 0,
    };

    fn address_rate(&self) -> Rate {
        Rate {
            per_second: self.address_handshakes_per_second,
            burst: self.address_handshake_burst.max(1),
        }
    }

    fn shard_rate(&self) -> Rate {
        Rate {
            per_second: self.shard_handshakes_per_second,
            burst: self.shard_handshakes_per_second,
        }
    }

    fn per_address(&self) -> bool {
        self.address_handshakes_per_second > 0
            || self.address_handshakes_max > 0
            || self.address_connections_max > 0
    }
}

/// What the table counts a connection under: an IPv4 address, or the /64 of an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(u64);

impl AddressKey {
    /// IPv4 keys carry this in their high half: it is the /32 of `ffff:fffe::/32`, multicast
    /// space that is never the source of a TCP connection, so no IPv6 /64 looks like one.
    const V4: u64 = 0xffff_fffe << 32;

    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(Self::V4 | u64::from(u32::from(v4))),
            IpAddr::V6(v6) => Self((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The wait a rate refusal names: until the next token, within bounds.
fn retry_ms(bucket: &Bucket, rate: Rate) -> u32 {
    (bucket.wait_ms(rate).min(u64::from(RETRY_MAX_MS)) as u32).max(RETRY_MIN_MS)
}

#[derive(Debug)]
struct Entry {
    handshaking: u32,
    connections: u32,
    bucket: Bucket,
}

/// The server's count of connections and handshakes by source address.
#[derive(Debug)]
pub struct AddressTable {
    limits: AdmissionLimits,
    stripes: Box<[Mutex<HashMap<AddressKey, Entry>>]>,
}

impl AddressTable {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    fn stripe(&self, key: AddressKey) -> std::sync::MutexGuard<'_, HashMap<AddressKey, Entry>> {
        // The low bits of an IPv4 key differ between neighbours; an IPv6 /64's differ too.
        let index = (key.0 ^ (key.0 >> 32)) as usize % STRIPES;
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `key`, or says why it is refused.
    fn admit(&self, key: AddressKey, now_ms: u64) -> Result<(), Refusal> {
        let limits = &self.limits;
        let mut stripe = self.stripe(key);
        let entry = stripe.entry(key).or_insert_with(|| Entry {
            handshaking: 0,
            connections: 0,
            bucket: Bucket::full(limits.address_handshake_burst, now_ms),
        });
        let refusal = |reason, retry_after_ms| {
            Err(Refusal {
                reason,
                retry_after_ms,
            })
        };
        let verdict = if limits.address_connections_max > 0
            && entry.connections >= limits.address_connections_max
        {
            refusal(RefusalReason::AddressConnections, RETRY_HELD_MS)
        } else if limits.address_handshakes_max > 0
            && entry.handshaking >= limits.address_handshakes_max
        {
            refusal(RefusalReason::AddressHandshakes, RETRY_HANDSHAKING_MS)
        } else if limits.address_handshakes_per_second > 0 {
            let rate = limits.address_rate();
            entry.bucket.refill(rate, now_ms);
            if entry.bucket.take() {
                Ok(())
            } else {
                refusal(RefusalReason::AddressRate, retry_ms(&entry.bucket, rate))
            }
        } else {
            Ok(())
        };
        if verdict.is_ok() {
            entry.handshaking += 1;
            entry.connections += 1;
        }
        verdict
    }

    /// Counts a connection the server already held (taken over from the process before):
    /// no limit applies, it is no new arrival.
    fn count_held(&self, key: AddressKey, now_ms: u64) {
        let burst = self.limits.address_handshake_burst;
        let mut stripe = self.stripe(key);
        let entry = stripe.entry(key).or_insert_with(|| Entry {
            handshaking: 0,
            connections: 0,
            bucket: Bucket::full(burst, now_ms),
        });
        entry.connections += 1;
    }

    /// A counted connection finished (or gave up) its handshake.
    fn handshake_ended(&self, key: AddressKey) {
        if let Some(entry) = self.stripe(key).get_mut(&key) {
            entry.handshaking = entry.handshaking.saturating_sub(1);
        }
    }

    /// A counted connection closed.
    fn left(&self, key: AddressKey, handshaking: bool, now_ms: u64) {
        let mut stripe = self.stripe(key);
        let Some(entry) = stripe.get_mut(&key) else {
            return;
        };
        if handshaking {
            entry.handshaking = entry.handshaking.saturating_sub(1);
        }
        entry.connections = entry.connections.saturating_sub(1);
        if self.forgettable(entry, now_ms) {
            stripe.remove(&key);
        }
    }

    /// An entry that holds nothing and whose bucket is full again tells nothing a new one
    /// would not.
    fn forgettable(&self, entry: &mut Entry, now_ms: u64) -> bool {
        if entry.connections > 0 || entry.handshaking > 0 {
            return false;
        }
        let rate = self.limits.address_rate();
        if rate.is_off() {
            return true;
        }
        entry.bucket.refill(rate, now_ms);
        entry.bucket.is_full(rate)
    }

    /// Drops the forgettable entries of one stripe (`turn` picks which, in rotation).
    pub fn sweep(&self, turn: usize, now_ms: u64) {
        let mut stripe = self.stripes[turn % STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stripe.retain(|_, entry| !self.forgettable(entry, now_ms));
    }

    /// Addresses the table holds.
    pub fn addresses(&self) -> usize {
        self.stripes
            .iter()
            .map(|stripe| stripe.lock().map_or(0, |stripe| stripe.len()))
            .sum()
    }
}

/// A connection's place in the address table, on its way to another shard: given back if it
/// is dropped there unadopted.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<AddressTable>,
    key: Option<AddressKey>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.table.left(key, false, crate::shard::monotonic_ms());
        }
    }
}

/// One shard's part of admission: its handshake bucket, and the address each of its
/// connections is counted under (indexed by connection id, 8 bytes each).
#[derive(Debug)]
pub struct Tally {
    table: Arc<AddressTable>,
    bucket: Bucket,
    /// By connection id: the key the connection is counted under, or [`UNCOUNTED`].
    keys: Vec<u64>,
    /// The counted connections still in their handshake.
    handshaking: HashSet<ConnId>,
    /// Refusals since the last log line, and when that was.
    unlogged: u64,
    logged_ms: Option<u64>,
}

/// A connection counted under no address. It would be the key of `ffff:ffff:ffff:ffff::/64`,
/// multicast, which never opens a TCP connection.
const UNCOUNTED: u64 = u64::MAX;

/// How often a shard that keeps refusing says so.
const LOG_EVERY_MS: u64 = 10_000;

impl Tally {
    /// `slots`: the connection ids the shard may hand out, reserved at once (address space
    /// only, like the shard's connection table).
    pub fn new(table: Arc<AddressTable>, slots: usize, now_ms: u64) -> Self {
        let burst = table.limits.shard_handshakes_per_second;
        Self {
            table,
            bucket: Bucket::full(burst, now_ms),
            keys: Vec::with_capacity(slots),
            handshaking: HashSet::new(),
            unlogged: 0,
            logged_ms: None,
        }
    }

    /// Admits connection `id` from `peer` (counting it), or says why not.
    pub fn admit(&mut self, id: ConnId, peer: Option<IpAddr>, now_ms: u64) -> Result<(), Refusal> {
        let limits = self.table.limits;
        let rate = limits.shard_rate();
        if !rate.is_off() {
            self.bucket.refill(rate, now_ms);
            if !self.bucket.has_token() {
                return Err(Refusal {
                    reason: RefusalReason::Busy,
                    retry_after_ms: retry_ms(&self.bucket, rate),
                });
            }
        }
        let key = match peer {
            Some(ip) if limits.per_address() => {
                let key = AddressKey::of(ip);
                self.table.admit(key, now_ms)?;
                self.handshaking.insert(id);
                Some(key)
            }
            _ => None,
        };
        if !rate.is_off() {
            self.bucket.take();
        }
        self.set(id, key);
        Ok(())
    }

    fn set(&mut self, id: ConnId, key: Option<AddressKey>) {
        let index = id as usize;
        if self.keys.len() <= index {
            self.keys.resize(index + 1, UNCOUNTED);
        }
        debug_assert_eq!(self.keys[index], UNCOUNTED, "connection {id} counted twice");
        self.keys[index] = key.map_or(UNCOUNTED, |key| key.0);
    }

    fn key(&self, id: ConnId) -> Option<AddressKey> {
        match self.keys.get(id as usize) {
            Some(&key) if key != UNCOUNTED => Some(AddressKey(key)),
            _ => None,
        }
    }

    fn take(&mut self, id: ConnId) -> Option<AddressKey> {
        let key = self.key(id)?;
        self.keys[id as usize] = UNCOUNTED;
        Some(key)
    }

    /// Counts connection `id` from `peer`, one the server held before this process took it
    /// over: past its handshake, and under no limit.
    pub fn inherit(&mut self, id: ConnId, peer: Option<IpAddr>, now_ms: u64) {
        let key = match peer {
            Some(ip) if self.table.limits.per_address() => {
                let key = AddressKey::of(ip);
                self.table.count_held(key, now_ms);
                Some(key)
            }
            _ => None,
        };
        self.set(id, key);
    }

    /// Connection `id` finished or gave up its handshake (and stays, or closes next).
    pub fn handshake_ended(&mut self, id: ConnId) {
        if !self.handshaking.remove(&id) {
            return;
        }
        if let Some(key) = self.key(id) {
            self.table.handshake_ended(key);
        }
    }

    /// Connection `id` closed (in its handshake or after it).
    pub fn left(&mut self, id: ConnId, now_ms: u64) {
        let handshaking = self.handshaking.remove(&id);
        if let Some(key) = self.take(id) {
            self.table.left(key, handshaking, now_ms);
        }
    }

    /// Connection `id` leaves for another shard: its place travels with it.
    pub fn depart(&mut self, id: ConnId) -> Admitted {
        self.handshake_ended(id);
        Admitted {
            table: self.table.clone(),
            key: self.take(id),
        }
    }

    /// A connection that arrived from another shard is now `id` here.
    pub fn arrive(&mut self, id: ConnId, mut admitted: Admitted) {
        let key = admitted.key.take();
        self.set(id, key);
    }

    /// Counts a refusal; returns the refusals to log, when a line is due (the first after a
    /// quiet while, then one every ten seconds while refusals go on).
    pub fn refused(&mut self, now_ms: u64) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .logged_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= LOG_EVERY_MS);
        due.then(|| {
            self.logged_ms = Some(now_ms);
            std::mem::take(&mut self.unlogged)
        })
    }

    /// The server's table, shared by every shard.
    pub fn shared(&self) -> Arc<AddressTable> {
        self.table.clone()
    }

    /// Sweeps one stripe of the table (see [`AddressTable::sweep`]).
    pub fn sweep(&self, turn: usize, now_ms: u64) {
        self.table.sweep(turn, now_ms);
    }
}

impl Drop for Tally {
    /// A shard that stops (or panicked) gives back the places of the connections it held.
    fn drop(&mut self) {
        let now_ms = crate::shard::monotonic_ms();
        for (id, key) in self.keys.drain(..).enumerate() {
            if key != UNCOUNTED {
                let handshaking = self.handshaking.contains(&(id as ConnId));
                self.table.left(AddressKey(key), handshaking, now_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            shard_handshakes_per_second: 0,
            address_handshakes_per_second: 10,
            address_handshake_burst: 5,
            address_handshakes_max: 0,
            address_connections_max: 0,
        }
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn reason(result: Result<(), Refusal>) -> Option<RefusalReason> {
        result.err().map(|refusal| refusal.reason)
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let table = AddressTable::new(limits());
        let mut tally = Tally::new(table, 0, 0);
        for id in 0..5 {
            assert_eq!(tally.admit(id, ip("10.0.0.1"), 0), Ok(()));
        }
        let refusal = tally.admit(5, ip("10.0.0.1"), 0).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::AddressRate);
        assert_eq!(refusal.retry_after_ms, 100);
        // Another address is not affected; 100 ms later one more token is there.
        assert_eq!(tally.admit(5, ip("10.0.0.2"), 0), Ok(()));
        assert_eq!(
            reason(tally.admit(6, ip("10.0.0.1"), 99)),
            Some(RefusalReason::AddressRate)
        );
        assert_eq!(tally.admit(6, ip("10.0.0.1"), 100), Ok(()));
    }

    #[test]
    fn an_ipv6_64_is_one_address_and_a_mapped_ipv4_is_its_ipv4() {
        let table = AddressTable::new(AdmissionLimits {
            address_connections_max: 2,
            ..AdmissionLimits::OFF
        });
        let mut tally = Tally::new(table, 0, 0);
        assert_eq!(tally.admit(0, ip("2001:db8:1:2::1"), 0), Ok(()));
        assert_eq!(tally.admit(1, ip("2001:db8:1:2:ffff::9"), 0), Ok(()));
        assert_eq!(
            reason(tally.admit(2, ip("2001:db8:1:2::3"), 0)),
            Some(RefusalReason::AddressConnections)
        );
        assert_eq!(tally.admit(2, ip("2001:db8:1:3::1"), 0), Ok(()));
        assert_eq!(tally.admit(3, ip("::ffff:10.0.0.1"), 0), Ok(()));
        assert_eq!(tally.admit(4, ip("10.0.0.1"), 0), Ok(()));
        assert_eq!(
            reason(tally.admit(5, ip("10.0.0.1"), 0)),
            Some(RefusalReason::AddressConnections)
        );
        // No IPv6 /64 is taken for an IPv4 address.
        assert_ne!(
            AddressKey::of("10.0.0.1".parse().unwrap()),
            AddressKey::of("::a00:1".parse().unwrap())
        );
    }

    #[test]
    fn unfinished_handshakes_and_held_connections_are_capped_and_given_back() {
        let table = AddressTable::new(AdmissionLimits {
            address_handshakes_max: 2,
            address_connections_max: 3,
            ..AdmissionLimits::OFF
        });
        let mut tally = Tally::new(table.clone(), 0, 0);
        let a = ip("10.0.0.1");
        assert_eq!(tally.admit(0, a, 0), Ok(()));
        assert_eq!(tally.admit(1, a, 0), Ok(()));
        assert_eq!(
            reason(tally.admit(2, a, 0)),
            Some(RefusalReason::AddressHandshakes)
        );
        tally.handshake_ended(0);
        assert_eq!(tally.admit(2, a, 0), Ok(()));
        tally.handshake_ended(1);
        tally.handshake_ended(2);
        assert_eq!(
            reason(tally.admit(3, a, 0)),
            Some(RefusalReason::AddressConnections)
        );
        // Connection 1 moves to another shard and closes there: its place comes back.
        let admitted = tally.depart(1);
        let mut other = Tally::new(table.clone(), 0, 0);
        other.arrive(7, admitted);
        assert_eq!(
            reason(tally.admit(3, a, 0)),
            Some(RefusalReason::AddressConnections)
        );
        other.left(7, 0);
        assert_eq!(tally.admit(3, a, 0), Ok(()));
        // One in its handshake closes: both counts come back.
        tally.left(3, 0);
        assert_eq!(tally.admit(3, a, 0), Ok(()));
        // A shard that goes (a panic) gives back all it held.
        drop(tally);
        drop(other);
        assert_eq!(table.addresses(), 0);
    }

    #[test]
    fn a_move_dropped_on_the_way_gives_its_place_back() {
        let table = AddressTable::new(AdmissionLimits {
            address_connections_max: 1,
            ..AdmissionLimits::OFF
        });
        let mut tally = Tally::new(table.clone(), 0, 0);
        assert_eq!(tally.admit(0, ip("10.0.0.1"), 0), Ok(()));
        tally.handshake_ended(0);
        drop(tally.depart(0));
        assert_eq!(tally.admit(1, ip("10.0.0.1"), 0), Ok(()));
    }

    #[test]
    fn the_shard_bucket_refuses_everyone_alike_and_refills() {
        let table = AddressTable::new(AdmissionLimits {
            shard_handshakes_per_second: 4,
            ..limits()
        });
        let mut tally = Tally::new(table, 0, 1_000);
        for id in 0..4 {
            assert_eq!(tally.admit(id, ip(&format!("10.0.0.{id}")), 1_000), Ok(()));
        }
        let refusal = tally.admit(4, ip("10.9.9.9"), 1_000).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Busy);
        assert_eq!(refusal.retry_after_ms, 250);
        assert_eq!(tally.admit(4, ip("10.9.9.9"), 1_250), Ok(()));
        // Refused by its address, a connection takes no token of the shard's.
        let table = AddressTable::new(AdmissionLimits {
            shard_handshakes_per_second: 2,
            address_handshakes_max: 1,
            ..AdmissionLimits::OFF
        });
        let mut tally = Tally::new(table, 0, 0);
        assert_eq!(tally.admit(0, ip("10.0.0.1"), 0), Ok(()));
        for id in 1..10 {
            assert_eq!(
                reason(tally.admit(id, ip("10.0.0.1"), 0)),
                Some(RefusalReason::AddressHandshakes)
            );
        }
        assert_eq!(tally.admit(1, ip("10.0.0.2"), 0), Ok(()));
    }

    #[test]
    fn entries_are_forgotten_once_they_hold_nothing_and_their_bucket_is_full() {
        let table = AddressTable::new(limits());
        let mut tally = Tally::new(table.clone(), 0, 0);
        for id in 0..3 {
            assert_eq!(tally.admit(id, ip("10.0.0.1"), 0), Ok(()));
            tally.handshake_ended(id);
            tally.left(id, 0);
        }
        // Closed, but 3 tokens short: kept, so closing and reconnecting earns nothing.
        assert_eq!(table.addresses(), 1);
        for turn in 0..STRIPES {
            table.sweep(turn, 299);
        }
        assert_eq!(table.addresses(), 1);
        for turn in 0..STRIPES {
            table.sweep(turn, 300);
        }
        assert_eq!(table.addresses(), 0);
        // Unknown peers and limits that are off count nothing.
        let off = AddressTable::new(AdmissionLimits::OFF);
        let mut tally = Tally::new(off.clone(), 0, 0);
        for id in 0..100 {
            assert_eq!(tally.admit(id, ip("10.0.0.1"), 0), Ok(()));
        }
        assert_eq!(off.addresses(), 0);
        let mut tally = Tally::new(table.clone(), 0, 0);
        for id in 0..100 {
            assert_eq!(tally.admit(id, None, 0), Ok(()));
        }
        assert_eq!(table.addresses(), 0);
    }

    #[test]
    fn refusals_are_logged_once_then_every_ten_seconds() {
        let mut tally = Tally::new(AddressTable::new(AdmissionLimits::OFF), 0, 0);
        assert_eq!(tally.refused(5), Some(1));
        assert_eq!(tally.refused(6), None);
        assert_eq!(tally.refused(9_000), None);
        assert_eq!(tally.refused(10_005), Some(3));
    }
}
