//! The messages a shard queued that the disk has not taken yet, by keep number.
//!
//! Every item queued (message or receipt) gets the next number when its `Action::Keep`
//! leaves the router; its queue entry and the keep action carry the number, the shard finds
//! a held item by it, and the store gives it back when the item is durable. A message's
//! number names its record here; a receipt's names an empty place. Items go to the disk in
//! the order they were numbered and leave this list at about that pace, so the records form
//! a ring: found by index, not hashed, written one after another and read again near the
//! front. A record that leaves out of order (its device acked the message first) leaves an
//! empty place until the places before it are empty too.
//!
//! Numbers are 32 bits and wrap. A number is only ever followed up with the user and message
//! id it was given for, so an old number that wrapped around onto another record finds
//! nothing. Number 0 names no record.

use std::collections::VecDeque;

use hop_protocol::UserId;

/// The keep number of no item: that of an item queued before this process started.
pub const NO_KEEP: u32 = 0;

#[derive(Debug)]
pub struct Unkept<T> {
    /// The record of keep number `first + i` at `i`; `None` once it left.
    records: VecDeque<Option<Record<T>>>,
    /// Keep number of `records[0]`.
    first: u32,
    /// Records present.
    live: usize,
}

#[derive(Debug)]
struct Record<T> {
    user: UserId,
    id: u64,
    value: T,
}

impl<T> Default for Unkept<T> {
    fn default() -> Self {
        Self {
            records: VecDeque::new(),
            first: 1,
            live: 0,
        }
    }
}

impl<T> Unkept<T> {
    /// Keeps `value` for message `id` of `user`'s queue; returns its keep number.
    pub fn push(&mut self, user: UserId, id: u64, value: T) -> u32 {
        let number = self.next_number();
        self.records.push_back(Some(Record { user, id, value }));
        self.live += 1;
        self.trim();
        number
    }

    /// Takes the next number for an item with no record (a receipt): an empty place.
    pub fn skip(&mut self) -> u32 {
        let number = self.next_number();
        self.records.push_back(None);
        self.trim();
        number
    }

    /// The record `number` names, if it is still that of message `id` of `user`.
    pub fn get(&self, number: u32, user: UserId, id: u64) -> Option<&T> {
        let index = self.index(number, user, id)?;
        self.records[index].as_ref().map(|record| &record.value)
    }

    pub fn get_mut(&mut self, number: u32, user: UserId, id: u64) -> Option<&mut T> {
        let index = self.index(number, user, id)?;
        self.records[index].as_mut().map(|record| &mut record.value)
    }

    /// Takes out the record `number` names, if it is still that of message `id` of `user`.
    pub fn take(&mut self, number: u32, user: UserId, id: u64) -> Option<T> {
        let index = self.index(number, user, id)?;
        let record = self.records[index].take()?;
        self.live -= 1;
        self.trim();
        Some(record.value)
    }

    /// Lets `settle` change the record `number` names (if it is still that of message `id`
    /// of `user`), and takes it out if `settle` says it is done with.
    pub fn settle(
        &mut self,
        number: u32,
        user: UserId,
        id: u64,
        settle: impl FnOnce(&mut T) -> bool,
    ) -> Option<T> {
        let index = self.index(number, user, id)?;
        let done = settle(&mut self.records[index].as_mut()?.value);
        if !done {
            return None;
        }
        let record = self.records[index].take()?;
        self.live -= 1;
        self.trim();
        Some(record.value)
    }

    /// The oldest record present: its number, user, message id and value.
    pub fn front(&self) -> Option<(u32, UserId, u64, &T)> {
        // Empty places at the front are trimmed: the first place is a record, if any is.
        let record = self.records.front()?.as_ref()?;
        Some((self.first, record.user, record.id, &record.value))
    }

    /// Every record present, oldest first: its number, user, message id and value.
    pub fn iter(&self) -> impl Iterator<Item = (u32, UserId, u64, &T)> {
        self.records
            .iter()
            .enumerate()
            .filter_map(move |(index, record)| {
                let record = record.as_ref()?;
                let number = self.first.wrapping_add(index as u32);
                Some((number, record.user, record.id, &record.value))
            })
    }

    /// Records present.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Places held, empty ones between records included.
    #[cfg(test)]
    fn places(&self) -> usize {
        self.records.len()
    }

    /// The number the next place gets. When the numbers wrap, number 0 keeps an empty place.
    fn next_number(&mut self) -> u32 {
        let number = self.first.wrapping_add(self.records.len() as u32);
        debug_assert!(
            self.records.len() < u32::MAX as usize,
            "keep numbers repeat"
        );
        if number != NO_KEEP {
            return number;
        }
        self.records.push_back(None);
        1
    }

    fn index(&self, number: u32, user: UserId, id: u64) -> Option<usize> {
        if number == NO_KEEP {
            return None;
        }
        let index = number.wrapping_sub(self.first) as usize;
        match self.records.get(index)? {
            Some(record) if record.user == user && record.id == id => Some(index),
            _ => None,
        }
    }

    /// Lets go of the empty places at the front.
    fn trim(&mut self) {
        while let Some(None) = self.records.front() {
            self.records.pop_front();
            self.first = self.first.wrapping_add(1);
        }
        if self.records.is_empty() && self.records.capacity() > SHRINK_ABOVE {
            self.records.shrink_to(SHRINK_ABOVE);
        }
    }
}

/// An empty ring keeps this many places of capacity; a burst's ring is given back.
const SHRINK_ABOVE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u64) -> UserId {
        UserId::from_halves(n + 1, n).expect("a nonzero high half")
    }

    #[test]
    fn records_are_found_by_number_user_and_id_only() {
        let mut unkept = Unkept::default();
        let a = unkept.push(user(1), 10, "a");
        let b = unkept.push(user(2), 10, "b");
        assert_ne!(a, b);
        assert_ne!(a, NO_KEEP);
        assert_eq!(unkept.get(a, user(1), 10), Some(&"a"));
        assert_eq!(unkept.get(b, user(2), 10), Some(&"b"));
        // Another user's or another id's number finds nothing.
        assert_eq!(unkept.get(a, user(2), 10), None);
        assert_eq!(unkept.get(b, user(2), 11), None);
        assert_eq!(unkept.get(NO_KEEP, user(1), 10), None);
        assert_eq!(unkept.get(b.wrapping_add(1), user(2), 10), None);
        assert_eq!(unkept.len(), 2);
    }

    #[test]
    fn a_record_is_settled_in_place_and_taken_once_done() {
        let mut unkept = Unkept::default();
        let a = unkept.push(user(1), 10, 2);
        let settle = |left: &mut i32| {
            *left -= 1;
            *left == 0
        };
        assert_eq!(unkept.settle(a, user(1), 10, settle), None);
        assert_eq!(unkept.get(a, user(1), 10), Some(&1));
        assert_eq!(
            unkept.settle(a, user(2), 10, settle),
            None,
            "another user's"
        );
        assert_eq!(unkept.settle(a, user(1), 10, settle), Some(0));
        assert_eq!(unkept.len(), 0);
        assert_eq!(unkept.settle(a, user(1), 10, settle), None);
    }

    #[test]
    fn the_front_and_the_walk_see_the_records_present_oldest_first() {
        let mut unkept = Unkept::default();
        assert!(unkept.front().is_none());
        let numbers: Vec<u32> = (0..4).map(|n| unkept.push(user(n), n, n)).collect();
        let skipped = unkept.skip();
        let last = unkept.push(user(9), 9, 9);
        assert_eq!(unkept.take(numbers[1], user(1), 1), Some(1));
        let walked: Vec<(u32, u64)> = unkept.iter().map(|(k, _, id, _)| (k, id)).collect();
        assert_eq!(
            walked,
            [(numbers[0], 0), (numbers[2], 2), (numbers[3], 3), (last, 9)]
        );
        assert!(!walked.iter().any(|(k, _)| *k == skipped));
        assert_eq!(unkept.front(), Some((numbers[0], user(0), 0, &0)));
        assert_eq!(unkept.take(numbers[0], user(0), 0), Some(0));
        assert_eq!(unkept.front(), Some((numbers[2], user(2), 2, &2)));
    }

    #[test]
    fn taken_records_are_gone_and_the_front_is_let_go() {
        let mut unkept = Unkept::default();
        let numbers: Vec<u32> = (0..5).map(|n| unkept.push(user(n), n, n)).collect();
        // Out of order: the third leaves first; its place stays until those before leave.
        assert_eq!(unkept.take(numbers[2], user(2), 2), Some(2));
        assert_eq!(unkept.take(numbers[2], user(2), 2), None);
        assert_eq!(unkept.places(), 5);
        assert_eq!(unkept.take(numbers[0], user(0), 0), Some(0));
        assert_eq!(unkept.places(), 4);
        assert_eq!(unkept.take(numbers[1], user(1), 1), Some(1));
        assert_eq!(
            unkept.places(),
            2,
            "the empty place of the third went with them"
        );
        assert_eq!(unkept.len(), 2);
        assert_eq!(unkept.get(numbers[3], user(3), 3), Some(&3));
        assert_eq!(unkept.get_mut(numbers[4], user(4), 4).map(|v| *v), Some(4));
        // A number taken long ago finds nothing, before and after new records.
        assert_eq!(unkept.get(numbers[0], user(0), 0), None);
        unkept.push(user(9), 9, 9);
        assert_eq!(unkept.get(numbers[0], user(0), 0), None);
    }

    #[test]
    fn skipped_numbers_hold_no_record_and_follow_on() {
        let mut unkept = Unkept::default();
        let a = unkept.skip();
        let b = unkept.push(user(1), 1, 'b');
        let c = unkept.skip();
        let d = unkept.push(user(2), 2, 'd');
        assert_eq!((b, c, d), (a + 1, a + 2, a + 3));
        assert_eq!(unkept.len(), 2);
        assert_eq!(
            unkept.places(),
            3,
            "a skipped number at the front goes at once"
        );
        assert_eq!(unkept.take(b, user(1), 1), Some('b'));
        assert_eq!(unkept.places(), 1, "and one behind a record with it");
        unkept.first = u32::MAX;
        unkept.records.clear();
        assert_eq!((unkept.skip(), unkept.skip()), (u32::MAX, 1));
    }

    #[test]
    fn numbers_wrap_around_without_naming_no_record_or_an_old_message() {
        let mut unkept = Unkept {
            first: u32::MAX - 1,
            ..Unkept::default()
        };
        let a = unkept.push(user(1), 1, 'a');
        let b = unkept.push(user(2), 2, 'b');
        let c = unkept.push(user(3), 3, 'c');
        assert_eq!((a, b, c), (u32::MAX - 1, u32::MAX, 1));
        assert_eq!(unkept.get(c, user(3), 3), Some(&'c'));
        assert_eq!(unkept.get(NO_KEEP, user(3), 3), None);
        assert_eq!(unkept.take(a, user(1), 1), Some('a'));
        assert_eq!(unkept.take(b, user(2), 2), Some('b'));
        assert_eq!(unkept.places(), 1, "the empty place of 0 went too");
        assert_eq!(unkept.take(c, user(3), 3), Some('c'));
        assert_eq!(unkept.len(), 0);
        // An old number that lands on a new record does not find it.
        let d = unkept.push(user(4), 4, 'd');
        assert_eq!(d, 2);
        assert_eq!(unkept.get(d, user(1), 1), None);
    }
}
