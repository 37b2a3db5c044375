//! Rates: a token bucket, and the per-sender quotas the router keeps with it.
//!
//! A sender (a device: each of an account's devices has its own) may send messages and Read
//! receipts at most at its rates, each with a burst; past one, that Send or Read is refused
//! with `RATE_LIMITED` to the sender alone. A sender's buckets live in a map only while they
//! are below full, so an idle user costs nothing, and closing the connection and opening
//! another does not fill them.

use std::collections::HashMap;

use hop_protocol::UserId;

/// A rate and the burst allowed at once after a quiet while; `per_second` 0: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Self = Self {
        per_second: 0,
        burst: 0,
    };

    pub fn is_off(&self) -> bool {
        self.per_second == 0
    }
}

/// Thousandths of a token: refilling at any rate is exact in whole milliseconds.
const MILLI: u64 = 1000;

/// A token bucket on a millisecond clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    milli_tokens: u64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(burst: u32, now_ms: u64) -> Self {
        Self {
            milli_tokens: u64::from(burst) * MILLI,
            at_ms: now_ms,
        }
    }

    /// Adds what `rate` earned since the last refill, up to its burst. A clock that stepped
    /// back earns nothing for the step, and earns from the new time on (the router's clock is
    /// the wall clock: waiting for it to pass the old time again would refuse for as long).
    pub fn refill(&mut self, rate: Rate, now_ms: u64) {
        let earned = now_ms
            .saturating_sub(self.at_ms)
            .saturating_mul(u64::from(rate.per_second));
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(earned)
            .min(u64::from(rate.burst) * MILLI);
        self.at_ms = now_ms;
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        let taken = self.milli_tokens >= MILLI;
        if taken {
            self.milli_tokens -= MILLI;
        }
        taken
    }

    pub fn has_token(&self) -> bool {
        self.milli_tokens >= MILLI
    }

    pub fn is_full(&self, rate: Rate) -> bool {
        self.milli_tokens >= u64::from(rate.burst) * MILLI
    }

    /// Milliseconds until a token is there, at `rate`.
    pub fn wait_ms(&self, rate: Rate) -> u64 {
        MILLI
            .saturating_sub(self.milli_tokens)
            .div_ceil(u64::from(rate.per_second.max(1)))
    }
}

/// What a sender may do, each at its own rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    Message,
    Read,
}

/// The senders' buckets of one shard: those below full.
#[derive(Debug, Default)]
pub struct SenderQuotas {
    buckets: HashMap<UserId, [Bucket; 2]>,
}

impl SenderQuotas {
    /// Takes a token of `spend` for `sender`, or says how many milliseconds until one.
    pub fn take(
        &mut self,
        sender: UserId,
        spend: Spend,
        rates: [Rate; 2],
        now_ms: u64,
    ) -> Result<(), u64> {
        let index = spend as usize;
        let rate = rates[index];
        if rate.is_off() {
            return Ok(());
        }
        let buckets = self.buckets.entry(sender).or_insert_with(|| {
            [
                Bucket::full(rates[0].burst, now_ms),
                Bucket::full(rates[1].burst, now_ms),
            ]
        });
        let bucket = &mut buckets[index];
        bucket.refill(rate, now_ms);
        if bucket.take() {
            Ok(())
        } else {
            Err(bucket.wait_ms(rate).max(1))
        }
    }

    /// Forgets the senders whose buckets are full again: they tell nothing a new one would
    /// not. Once a tick.
    pub fn sweep(&mut self, rates: [Rate; 2], now_ms: u64) {
        self.buckets.retain(|_, buckets| {
            buckets.iter_mut().zip(rates).any(|(bucket, rate)| {
                bucket.refill(rate, now_ms);
                !rate.is_off() && !bucket.is_full(rate)
            })
        });
    }

    /// Senders with a bucket below full.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Rate = Rate {
        per_second: 10,
        burst: 3,
    };

    fn user(n: u8) -> UserId {
        UserId::from_public_key(&[n; 32])
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let mut bucket = Bucket::full(3, 0);
        assert!(bucket.take() && bucket.take() && bucket.take());
        assert!(!bucket.take());
        assert_eq!(bucket.wait_ms(TEN), 100);
        bucket.refill(TEN, 99);
        assert!(!bucket.has_token());
        assert_eq!(bucket.wait_ms(TEN), 1);
        bucket.refill(TEN, 100);
        assert!(bucket.take());
        // Never above the burst; a clock that steps back earns nothing for the step, then
        // earns from there.
        bucket.refill(TEN, 1_000_000);
        assert!(bucket.is_full(TEN));
        let mut back = Bucket::full(3, 5_000);
        assert!(back.take());
        back.refill(TEN, 1_000);
        assert!(!back.is_full(TEN));
        back.refill(TEN, 1_100);
        assert!(back.is_full(TEN));
    }

    #[test]
    fn each_sender_and_each_kind_has_its_own_bucket() {
        let mut quotas = SenderQuotas::default();
        let rates = [
            TEN,
            Rate {
                per_second: 1,
                burst: 1,
            },
        ];
        for _ in 0..3 {
            assert_eq!(quotas.take(user(1), Spend::Message, rates, 0), Ok(()));
        }
        assert_eq!(quotas.take(user(1), Spend::Message, rates, 0), Err(100));
        assert_eq!(quotas.take(user(2), Spend::Message, rates, 0), Ok(()));
        assert_eq!(quotas.take(user(1), Spend::Read, rates, 0), Ok(()));
        assert_eq!(quotas.take(user(1), Spend::Read, rates, 0), Err(1000));
        // Off: never refused, nothing kept.
        let mut off = SenderQuotas::default();
        for _ in 0..100 {
            assert_eq!(off.take(user(1), Spend::Message, [Rate::OFF; 2], 0), Ok(()));
        }
        assert!(off.is_empty());
    }

    #[test]
    fn senders_are_forgotten_once_their_buckets_are_full_again() {
        let mut quotas = SenderQuotas::default();
        let rates = [TEN, TEN];
        assert_eq!(quotas.take(user(1), Spend::Message, rates, 0), Ok(()));
        assert_eq!(quotas.take(user(2), Spend::Read, rates, 50), Ok(()));
        quotas.sweep(rates, 99);
        assert_eq!(quotas.len(), 2);
        quotas.sweep(rates, 100);
        assert_eq!(quotas.len(), 1);
        quotas.sweep(rates, 150);
        assert!(quotas.is_empty());
    }
}
