//! The open-loop send schedule: message `k` is due at `k / rate` seconds after the start,
//! whatever happened to the messages before it.
//!
//! A closed-loop sender waits for a reply before sending again, so when the server stalls it
//! stops sending and the stall is measured once instead of for every message that should have
//! gone out meanwhile (coordinated omission). Here the send times are fixed in advance; a
//! sender that falls behind sends the overdue messages at once, and each keeps its intended
//! time, from which its latency is measured.

/// A fixed-rate schedule, times in nanoseconds since the run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    rate_per_second: u64,
    messages_total: u64,
}

const NANOS_PER_SECOND: u128 = 1_000_000_000;

impl Schedule {
    /// `messages_total` messages at `rate_per_second`.
    pub fn new(rate_per_second: u64, messages_total: u64) -> Self {
        assert!(rate_per_second > 0, "a schedule needs a positive rate");
        Self {
            rate_per_second,
            messages_total,
        }
    }

    /// A schedule of `rate_per_second` lasting `duration_ms`.
    pub fn for_duration(rate_per_second: u64, duration_ms: u64) -> Self {
        let total = u128::from(rate_per_second) * u128::from(duration_ms) / 1000;
        Self::new(rate_per_second, total.min(u128::from(u64::MAX)) as u64)
    }

    pub fn messages_total(&self) -> u64 {
        self.messages_total
    }

    /// The intended send time of message `k`, exact (no drift from summing intervals).
    pub fn intended_ns(&self, k: u64) -> u64 {
        assert!(k < self.messages_total, "message past the schedule");
        (u128::from(k) * NANOS_PER_SECOND / u128::from(self.rate_per_second)) as u64
    }

    /// How many messages are due at `now_ns` (all `k` with `intended_ns(k) <= now_ns`).
    pub fn due_at(&self, now_ns: u64) -> u64 {
        let due = u128::from(now_ns) * u128::from(self.rate_per_second) / NANOS_PER_SECOND + 1;
        due.min(u128::from(self.messages_total)) as u64
    }

    /// When the message after the first `sent` ones is due, if any is left.
    pub fn next_due_ns(&self, sent: u64) -> Option<u64> {
        (sent < self.messages_total).then(|| self.intended_ns(sent))
    }
}

/// Which sender sends message `k`: round robin, so every sender runs at `rate / senders`.
pub fn sender_of(k: u64, senders: u64) -> u64 {
    assert!(senders > 0, "at least one sender");
    k % senders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_evenly_spaced() {
        let schedule = Schedule::new(1_000, 5);
        let times: Vec<u64> = (0..5).map(|k| schedule.intended_ns(k)).collect();
        assert_eq!(
            times,
            [0, 1_000_000, 2_000_000, 3_000_000, 4_000_000],
            "1 ms apart at 1,000/s"
        );
    }

    #[test]
    fn no_drift_at_rates_that_do_not_divide_a_second() {
        let schedule = Schedule::new(300_000, 300_000);
        // 1e9/3e5 = 3333.33 ns: summing a rounded interval would drift by 100 µs a second.
        assert_eq!(schedule.intended_ns(299_999), 999_996_666);
        assert_eq!(schedule.due_at(1_000_000_000), 300_000);
    }

    #[test]
    fn due_counts_every_overdue_message() {
        let schedule = Schedule::new(1_000, 100);
        assert_eq!(schedule.due_at(0), 1);
        assert_eq!(schedule.due_at(999_999), 1);
        assert_eq!(schedule.due_at(1_000_000), 2);
        // A sender that wakes 50 ms late owes every message of those 50 ms at once.
        assert_eq!(schedule.due_at(50_000_000), 51);
        assert_eq!(schedule.due_at(u64::MAX / 2), 100, "never past the total");
        assert_eq!(schedule.next_due_ns(51), Some(51_000_000));
        assert_eq!(schedule.next_due_ns(100), None);
    }

    #[test]
    fn duration_sets_the_total() {
        assert_eq!(
            Schedule::for_duration(300_000, 10_000).messages_total(),
            3_000_000
        );
        assert_eq!(Schedule::for_duration(7, 500).messages_total(), 3);
    }

    #[test]
    fn senders_take_turns() {
        let senders: Vec<u64> = (0..7).map(|k| sender_of(k, 3)).collect();
        assert_eq!(senders, [0, 1, 2, 0, 1, 2, 0]);
    }
}
