//! Node links: how work for a user of another node ([`hop_router::Action::ToNode`]) gets there.
//!
//! A link is an ordinary hop client connection whose static key is this node's key: the peer
//! recognises a member's key at the handshake and keeps the connection as a link, not a user
//! (`docs/decisions.md`, "node links are client connections of a node's key"). Each peer has
//! a thread of its own here (`hop-link-NODE`), off the shards: it connects, sends each mail as
//! a `NodeMail` stanza numbered from 1 within this node's incarnation, and forgets a mail
//! when the peer's `NodeAck` covers it. After a lost connection it connects again and sends
//! every unacked mail again; the peer drops those it already took. The shards hand mails over
//! through a bounded queue per peer: when it is full (the peer is slow or unreachable), the
//! shard refuses the work to its sender instead of growing ([`Links::send`] returns false).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hop_protocol::client::{Client, ServerTrust};
use hop_protocol::wire::{Kind, NodeMail, Stanza, UserRef};
use hop_protocol::{StaticKey, UserId};
use tracing::{info, warn};

use super::membership::{Cluster, Member};

/// Mails waiting for one peer's thread; past it [`Links::send`] refuses.
pub const LINK_QUEUE_MAX: usize = 16 * 1024;
/// Mails sent to one peer and not acked yet; the thread sends no more until acks come.
const UNACKED_MAX: usize = 16 * 1024;
/// How long one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed connect.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// A link down for less than this is connecting again (its peer restarted, or closed the link
/// while it was idle): mail for it waits, its senders paused, rather than being refused.
/// Longer, the peer is cut off or hung, and its work is refused until its link is back (or its
/// lease runs out and its users move).
const RECONNECT_GRACE: Duration = Duration::from_secs(1);
/// How long the thread waits for an ack or a new mail at a time.
const POLL: Duration = Duration::from_millis(1);

/// This node's links to the other members.
#[derive(Debug)]
pub struct Links {
    key: Arc<StaticKey>,
    /// A random number of this run: a peer that sees it change knows the numbering restarted.
    incarnation: u64,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    stop: Arc<AtomicBool>,
    pub mails_sent: AtomicU64,
    pub mails_resent: AtomicU64,
    pub reconnects: AtomicU64,
}

#[derive(Debug)]
struct Peer {
    queue: ArrayQueue<(UserId, Vec<u8>)>,
    stats: LinkStats,
    /// When its link was last seen down (not connected), as [`Peer::since`] counts; while it
    /// is up, the time it went up.
    changed: AtomicU64,
    /// What [`Peer::changed`] counts from.
    since: Instant,
}

impl Peer {
    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    /// Will the peer take mail soon: its link is connected, or has been down for less than
    /// [`RECONNECT_GRACE`] (connecting again after its peer restarted, or closed an idle link).
    fn taking(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed) == 1
            || self
                .now_ms()
                .saturating_sub(self.changed.load(Ordering::Relaxed))
                < RECONNECT_GRACE.as_millis() as u64
    }

    fn set_up(&self, up: bool) {
        self.stats.up.store(u64::from(up), Ordering::Relaxed);
        self.changed.store(self.now_ms(), Ordering::Relaxed);
    }
}

/// A mail a peer's full queue did not take.
#[derive(Debug)]
pub struct Full {
    pub mail: Vec<u8>,
    /// The link is connected, or went down less than [`RECONNECT_GRACE`] ago (it is
    /// connecting again): the peer will take mail, only slower than it comes.
    pub link_up: bool,
}

/// The counters of one peer's link, for `/metrics` and `hop admin cluster`.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub mails_sent: AtomicU64,
    pub mails_resent: AtomicU64,
    pub connects: AtomicU64,
    /// Mails sent and not acked yet (gauge).
    pub unacked: AtomicU64,
    /// 1 while the link is connected (gauge).
    pub up: AtomicU64,
}

/// One peer's link as the admin listener shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReport {
    pub node_id: String,
    /// Mails waiting for the link's thread.
    pub queued: u64,
    pub unacked: u64,
    pub up: bool,
    pub mails_sent: u64,
    pub mails_resent: u64,
    pub connects: u64,
}

impl Links {
    pub fn new(key: Arc<StaticKey>, stop: Arc<AtomicBool>) -> Self {
        let incarnation = hop_protocol::outbox::random_nonzero().unwrap_or(1);
        Self {
            key,
            incarnation,
            peers: Mutex::new(HashMap::new()),
            stop,
            mails_sent: AtomicU64::new(0),
            mails_resent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Queues `mail` (an encoded `hop.node.Mail`) for `user`'s home node `member`, starting
    /// the link to it if there is none. A full queue gives the mail back, saying whether the
    /// link is up (the peer is slow: the caller waits and offers it again) or not (the caller
    /// refuses the work).
    pub fn send(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        member: &Member,
        user: UserId,
        mail: Vec<u8>,
    ) -> Result<(), Full> {
        let peer = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            match peers.get(&member.node_id) {
                Some(peer) => peer.clone(),
                None => {
                    let peer = Arc::new(Peer {
                        queue: ArrayQueue::new(LINK_QUEUE_MAX),
                        stats: LinkStats::default(),
                        changed: AtomicU64::new(0),
                        since: Instant::now(),
                    });
                    let (links, cluster, member_now, thread_peer) =
                        (self.clone(), cluster.clone(), member.clone(), peer.clone());
                    let started = std::thread::Builder::new()
                        .name(format!("hop-link-{}", member.node_id))
                        .spawn(move || links.run(&cluster, &member_now, &thread_peer));
                    if let Err(error) = started {
                        warn!(%error, node = %member.node_id, "cannot start a node link thread");
                        return Err(Full {
                            mail,
                            link_up: false,
                        });
                    }
                    peers.insert(member.node_id.clone(), peer.clone());
                    peer
                }
            }
        };
        peer.queue.push((user, mail)).map_err(|(_, mail)| Full {
            mail,
            // A link connecting again (its peer restarted, or closed an idle link) takes
            // the mail soon: the caller waits rather than refuse it. One down for longer (a
            // partition, a peer that hangs) does not: its work is refused.
            link_up: peer.taking(),
        })
    }

    /// Every peer's link, by node id.
    pub fn reports(&self) -> Vec<LinkReport> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut reports: Vec<LinkReport> = peers
            .iter()
            .map(|(node_id, peer)| LinkReport {
                node_id: node_id.clone(),
                queued: peer.queue.len() as u64,
                unacked: load(&peer.stats.unacked),
                up: load(&peer.stats.up) == 1,
                mails_sent: load(&peer.stats.mails_sent),
                mails_resent: load(&peer.stats.mails_resent),
                connects: load(&peer.stats.connects),
            })
            .collect();
        reports.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        reports
    }

    /// One peer's link, until this node stops or the peer leaves the members (its unsent and
    /// unacked mails are dropped then: their senders' clients send again, and the users they
    /// were for have a new home).
    fn run(&self, cluster: &Cluster, member: &Member, peer: &Peer) {
        let mut unacked: VecDeque<(u64, Stanza)> = VecDeque::new();
        let mut next_seq = 1u64;
        let trust = ServerTrust::Pinned(member.server_key);
        info!(node = %member.node_id, address = %member.advertise, "node link starting");
        while !self.stop.load(Ordering::Acquire) {
            if !cluster.view().members.iter().any(|m| m == member) {
                info!(node = %member.node_id, "node link ends: the node left the members");
                break;
            }
            let mut client =
                match Client::connect(&member.advertise, &self.key, &trust, CONNECT_TIMEOUT) {
                    Ok(client) => client,
                    Err(error) => {
                        warn!(node = %member.node_id, %error, "node link: cannot connect");
                        std::thread::sleep(RECONNECT_PAUSE);
                        continue;
                    }
                };
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            peer.stats.connects.fetch_add(1, Ordering::Relaxed);
            peer.set_up(true);
            for (_, stanza) in &unacked {
                client.queue(stanza);
                self.mails_resent.fetch_add(1, Ordering::Relaxed);
                peer.stats.mails_resent.fetch_add(1, Ordering::Relaxed);
            }
            let served = self.serve_connection(&mut client, peer, &mut unacked, &mut next_seq);
            peer.set_up(false);
            if served.is_err() {
                warn!(node = %member.node_id, unacked = unacked.len(), "node link lost; connecting again");
                std::thread::sleep(RECONNECT_PAUSE);
            }
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.remove(&member.node_id);
    }

    /// Sends queued mails and takes acks on one connection until it fails or the node stops.
    fn serve_connection(
        &self,
        client: &mut Client,
        peer: &Peer,
        unacked: &mut VecDeque<(u64, Stanza)>,
        next_seq: &mut u64,
    ) -> Result<(), ()> {
        while !self.stop.load(Ordering::Acquire) {
            while unacked.len() < UNACKED_MAX {
                let Some((user, mail)) = peer.queue.pop() else {
                    break;
                };
                let stanza = Stanza::of(Kind::NodeMail(NodeMail {
                    incarnation: self.incarnation,
                    seq: *next_seq,
                    user: Some(UserRef::from(user)),
                    mail: mail.into(),
                }));
                client.queue(&stanza);
                unacked.push_back((*next_seq, stanza));
                *next_seq += 1;
                self.mails_sent.fetch_add(1, Ordering::Relaxed);
                peer.stats.mails_sent.fetch_add(1, Ordering::Relaxed);
            }
            peer.stats
                .unacked
                .store(unacked.len() as u64, Ordering::Relaxed);
            client.flush().map_err(|_| ())?;
            // Every answer that has arrived, waiting for the first at most `POLL`.
            let mut wait = POLL;
            while let Some(stanza) = client.recv(wait).map_err(|_| ())? {
                wait = Duration::ZERO;
                match stanza.kind {
                    Some(Kind::NodeAck(ack)) if ack.incarnation == self.incarnation => {
                        while unacked.front().is_some_and(|(seq, _)| *seq <= ack.seq) {
                            unacked.pop_front();
                        }
                        peer.stats
                            .unacked
                            .store(unacked.len() as u64, Ordering::Relaxed);
                    }
                    Some(Kind::GoAway(_)) => return Err(()),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
