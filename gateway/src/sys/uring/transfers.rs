//! Matching handed-over descriptors with their handoffs.
//!
//! A connection moves between shards on two paths that race: its descriptor goes from ring to
//! ring (`MSG_RING`), and its session goes through the mailbox and reaches the backend as
//! `attach(handoff, token)`. Either may come first. Each side waits for the other up to a
//! bound; a handoff whose descriptor never arrives fails its token, and a descriptor nobody
//! claims is closed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long one side of a transfer waits for the other.
pub const TRANSFER_WAIT: Duration = Duration::from_secs(5);

/// Transfers waiting on this ring, by transfer id.
#[derive(Debug)]
pub struct Transfers<U> {
    /// Descriptors that arrived (their slot here) before their handoff.
    arrived: HashMap<u64, (u32, Instant)>,
    /// Handoffs (their token and unsent bytes) that arrived before their descriptor.
    waiting: HashMap<u64, (u64, U, Instant)>,
}

/// What expired.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Tokens of handoffs whose descriptor never came.
    pub failed_tokens: Vec<u64>,
    /// Slots of descriptors whose handoff never came.
    pub orphan_slots: Vec<u32>,
}

impl<U> Default for Transfers<U> {
    fn default() -> Self {
        Self {
            arrived: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<U> Transfers<U> {
    /// A descriptor arrived in `slot`: the waiting handoff's token and payload, if any.
    pub fn descriptor(&mut self, id: u64, slot: u32, now: Instant) -> Option<(u64, U)> {
        if let Some((token, unsent, _)) = self.waiting.remove(&id) {
            return Some((token, unsent));
        }
        self.arrived.insert(id, (slot, now));
        None
    }

    /// A handoff arrived: the slot of its descriptor (and the payload back), if it came
    /// already.
    pub fn handoff(&mut self, id: u64, token: u64, unsent: U, now: Instant) -> Option<(u32, U)> {
        if let Some((slot, _)) = self.arrived.remove(&id) {
            return Some((slot, unsent));
        }
        self.waiting.insert(id, (token, unsent, now));
        None
    }

    /// Gives up on what waited longer than `wait`.
    pub fn expire(&mut self, now: Instant, wait: Duration) -> Expired {
        let mut expired = Expired::default();
        self.arrived.retain(|_, (slot, since)| {
            let keep = now.saturating_duration_since(*since) < wait;
            if !keep {
                expired.orphan_slots.push(*slot);
            }
            keep
        });
        self.waiting.retain(|_, (token, _, since)| {
            let keep = now.saturating_duration_since(*since) < wait;
            if !keep {
                expired.failed_tokens.push(*token);
            }
            keep
        });
        expired
    }

    pub fn is_empty(&self) -> bool {
        self.arrived.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_first_then_handoff() {
        let now = Instant::now();
        let mut transfers = Transfers::<&str>::default();
        assert_eq!(transfers.descriptor(7, 3, now), None);
        assert_eq!(transfers.handoff(7, 100, "bytes", now), Some((3, "bytes")));
        assert!(transfers.is_empty());
    }

    #[test]
    fn handoff_first_then_descriptor() {
        let now = Instant::now();
        let mut transfers = Transfers::<&str>::default();
        assert_eq!(transfers.handoff(7, 100, "bytes", now), None);
        assert_eq!(transfers.descriptor(8, 4, now), None, "another transfer");
        assert_eq!(transfers.descriptor(7, 3, now), Some((100, "bytes")));
        assert!(!transfers.is_empty());
    }

    #[test]
    fn each_side_gives_up_after_the_bound() {
        let start = Instant::now();
        let mut transfers = Transfers::<()>::default();
        assert_eq!(transfers.handoff(1, 100, (), start), None);
        assert_eq!(transfers.descriptor(2, 9, start), None);
        let early = transfers.expire(start + Duration::from_millis(10), TRANSFER_WAIT);
        assert_eq!(early, Expired::default());
        let late = transfers.expire(start + TRANSFER_WAIT, TRANSFER_WAIT);
        assert_eq!(late.failed_tokens, vec![100]);
        assert_eq!(late.orphan_slots, vec![9]);
        assert!(transfers.is_empty());
        // A descriptor arriving after its handoff gave up is an orphan of its own.
        assert_eq!(transfers.descriptor(1, 5, start), None);
        let later = transfers.expire(start + TRANSFER_WAIT, TRANSFER_WAIT);
        assert_eq!(later.orphan_slots, vec![5]);
    }
}
