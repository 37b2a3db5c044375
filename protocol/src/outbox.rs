//! The client's side of the delivery contract, sans-IO: numbering and naming what it sends
//! ([`Outbox`]) and seeing each message it receives once ([`Seen`]).
//!
//! A message's client id is (outbox, seq): the outbox is a random 64-bit number, the seq counts
//! from 1 within it. A resend after a reconnect carries the same pair, and the server answers it
//! with the original's ServerAck and delivers it once. Recipients are named by aliases bound on
//! the connection, so that a message to a known peer carries no 16-byte id. See
//! `docs/protocol.md`.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;

use crate::user::UserId;
use crate::wire::{MessageRef, Stanza, ALIASES_MAX};

/// One outbox: its id, the next message number, and the per-connection state that names
/// recipients compactly. Call [`Outbox::reconnected`] when a new connection starts: aliases and
/// the outbox declaration live for one connection.
#[derive(Debug)]
pub struct Outbox {
    id: u64,
    next_seq: u64,
    declared: bool,
    /// Declared with the Outbox: the second tick may come in the ServerAck.
    delivered_in_ack: bool,
    aliases: HashMap<UserId, u32>,
    /// Who each alias names, index `alias - 1`; bound round robin once all are used.
    bound: Vec<UserId>,
    next_alias: u32,
}

/// A random 64-bit number, never 0, from the operating system's random source: an outbox id,
/// or the nonce of a group's create.
pub fn random_nonzero() -> Result<u64, ring::error::Unspecified> {
    let random = ring::rand::SystemRandom::new();
    let mut bytes = [0u8; 8];
    loop {
        ring::rand::SecureRandom::fill(&random, &mut bytes)?;
        let value = u64::from_le_bytes(bytes);
        if value != 0 {
            return Ok(value);
        }
    }
}

impl Outbox {
    /// A new outbox with a random id (never 0) from the operating system's random source.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        Ok(Self::with_id(random_nonzero()?, 1).expect("a nonzero id"))
    }

    /// An outbox whose id and next message number the caller kept (a resend after a restart);
    /// `None` for the id 0 or the seq 0.
    pub fn with_id(id: u64, next_seq: u64) -> Option<Self> {
        (id != 0 && next_seq != 0).then(|| Self {
            id,
            next_seq,
            declared: false,
            delivered_in_ack: false,
            aliases: HashMap::new(),
            bound: Vec::new(),
            next_alias: 1,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Asks, from the next declaration on, for the second tick of a message its recipient
    /// acks before the server's ack leaves to come in that ServerAck (`delivered_ms`) instead
    /// of a Receipt. A client that sets it reads `ServerAck.delivered_ms`.
    pub fn set_delivered_in_ack(&mut self, on: bool) {
        self.delivered_in_ack = on;
    }

    /// The number the next [`Outbox::send`] takes.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A new connection: the outbox is declared again and no alias is bound.
    pub fn reconnected(&mut self) {
        self.declared = false;
        self.aliases.clear();
        self.bound.clear();
        self.next_alias = 1;
    }

    /// The stanzas for a new message to `to`: the Outbox declaration first on a connection,
    /// then the Send. Returns the message's id.
    pub fn send(&mut self, to: UserId, body: Bytes, stanzas: &mut Vec<Stanza>) -> MessageRef {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stanzas_for(to, seq, body, false, stanzas)
    }

    /// The stanzas for message `seq` of this outbox again (the same id, marked as a resend, so
    /// the server looks for the original and takes it once), e.g. on a new connection after
    /// the first did not bring its ServerAck.
    pub fn resend(
        &mut self,
        to: UserId,
        seq: u64,
        body: Bytes,
        stanzas: &mut Vec<Stanza>,
    ) -> MessageRef {
        self.stanzas_for(to, seq, body, true, stanzas)
    }

    fn stanzas_for(
        &mut self,
        to: UserId,
        seq: u64,
        body: Bytes,
        resend: bool,
        stanzas: &mut Vec<Stanza>,
    ) -> MessageRef {
        assert!(
            seq > 0 && seq < self.next_seq,
            "only numbers this outbox gave out"
        );
        if !self.declared {
            stanzas.push(Stanza::declare_outbox(self.id, self.delivered_in_ack));
            self.declared = true;
        }
        let send = match self.aliases.get(&to) {
            Some(&alias) => Stanza::send_to_alias(alias, seq, body),
            None => {
                let alias = self.bind(to);
                Stanza::send(to, seq, body, alias)
            }
        };
        stanzas.push(if resend { send.into_resend() } else { send });
        MessageRef {
            outbox: self.id,
            seq,
        }
    }

    fn bind(&mut self, to: UserId) -> u32 {
        let alias = self.next_alias;
        self.next_alias = self.next_alias % ALIASES_MAX + 1;
        let index = (alias - 1) as usize;
        if let Some(previous) = self.bound.get(index).copied() {
            self.aliases.remove(&previous);
            self.bound[index] = to;
        } else {
            self.bound.push(to);
        }
        self.aliases.insert(to, alias);
        alias
    }
}

/// The (sender, server id) pairs of the messages a client has received, to drop a copy that
/// arrives again (a resend after the sender lost its ServerAck, or a delivery the server pushed
/// again because its ack did not reach the disk before a crash). Bounded: past `capacity` the
/// oldest pairs are forgotten, so an app that must never show a duplicate keeps its own record.
#[derive(Debug)]
pub struct Seen {
    set: HashSet<(UserId, u64)>,
    order: VecDeque<(UserId, u64)>,
    capacity: usize,
}

/// Pairs a [`Seen`] remembers by default: about 5 MB.
pub const SEEN_DEFAULT_CAPACITY: usize = 100_000;

impl Default for Seen {
    fn default() -> Self {
        Self::with_capacity(SEEN_DEFAULT_CAPACITY)
    }
}

impl Seen {
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0, "a Seen remembers at least one message");
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// True the first time (`from`, `id`) is offered, false for a copy.
    pub fn first_time(&mut self, from: UserId, id: u64) -> bool {
        if !self.set.insert((from, id)) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.order.push_back((from, id));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Kind, UserRef};

    fn user(seed: u8) -> UserId {
        UserId::from_public_key(&[seed; 32])
    }

    fn describe(stanzas: &[Stanza]) -> Vec<String> {
        stanzas
            .iter()
            .map(|stanza| match &stanza.kind {
                Some(Kind::Outbox(outbox)) => format!("outbox {}", outbox.id),
                Some(Kind::Send(send)) => match UserRef::user(send.to.as_ref()) {
                    Some(to) if to == user(1) => format!("seq {} to 1 as {}", send.seq, send.alias),
                    Some(_) => format!("seq {} to other as {}", send.seq, send.alias),
                    None => format!("seq {} alias {}", send.seq, send.alias),
                },
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn declares_once_binds_once_and_numbers_from_one() {
        let mut outbox = Outbox::with_id(77, 1).unwrap();
        let mut stanzas = Vec::new();
        let first = outbox.send(user(1), Bytes::from_static(b"a"), &mut stanzas);
        let second = outbox.send(user(1), Bytes::from_static(b"b"), &mut stanzas);
        assert_eq!((first.outbox, first.seq, second.seq), (77, 1, 2));
        assert_eq!(
            describe(&stanzas),
            ["outbox 77", "seq 1 to 1 as 1", "seq 2 alias 1"]
        );
        // A new connection: declared and bound again; a resend keeps its number.
        outbox.reconnected();
        stanzas.clear();
        let again = outbox.resend(user(1), 1, Bytes::from_static(b"a"), &mut stanzas);
        assert_eq!(again, first);
        assert_eq!(describe(&stanzas), ["outbox 77", "seq 1 to 1 as 1"]);
    }

    #[test]
    fn aliases_are_reused_round_robin_past_the_limit() {
        let mut outbox = Outbox::with_id(1, 1).unwrap();
        let mut stanzas = Vec::new();
        for index in 0..ALIASES_MAX {
            let to = UserId::from_halves(1, u64::from(index)).unwrap();
            outbox.send(to, Bytes::new(), &mut stanzas);
        }
        stanzas.clear();
        outbox.send(user(1), Bytes::new(), &mut stanzas);
        assert_eq!(
            describe(&stanzas),
            [format!("seq {} to 1 as 1", ALIASES_MAX + 1)]
        );
        // The user alias 1 named before is named in full again.
        stanzas.clear();
        outbox.send(
            UserId::from_halves(1, 0).unwrap(),
            Bytes::new(),
            &mut stanzas,
        );
        assert_eq!(
            describe(&stanzas),
            [format!("seq {} to other as 2", ALIASES_MAX + 2)]
        );
    }

    #[test]
    fn zero_ids_are_refused_and_random_ones_differ() {
        assert!(Outbox::with_id(0, 1).is_none());
        assert!(Outbox::with_id(1, 0).is_none());
        assert_ne!(
            Outbox::random().unwrap().id(),
            Outbox::random().unwrap().id()
        );
    }

    #[test]
    fn seen_drops_copies_and_forgets_the_oldest() {
        let mut seen = Seen::with_capacity(2);
        assert!(seen.first_time(user(1), 10));
        assert!(!seen.first_time(user(1), 10));
        assert!(seen.first_time(user(2), 10), "another sender's id");
        assert!(seen.first_time(user(1), 11));
        assert!(seen.first_time(user(1), 10), "forgotten past the capacity");
    }
}
