//! Latency recording with an HDR histogram, corrected for coordinated omission.
//!
//! Open loop (the `latency` scenario): every message carries its intended send time from the
//! [`crate::schedule::Schedule`], and its latency is `delivered - intended`, so the time a
//! message waited to be sent because the server (or the generator) stalled is counted.
//!
//! Closed loop (the `throughput` scenario, which measures rate, not latency): latencies are
//! recorded with hdrhistogram's `record_correct`, which back-fills the samples a stalled
//! closed-loop sender would have taken at `expected_interval`.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency recorded: longer ones are clamped (and counted in `clamped`).
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Samples above [`LATENCY_NS_MAX`], recorded as that maximum.
    pub clamped: u64,
}

#[derive(Debug, Clone)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
    clamped: u64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    pub fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
                .expect("static histogram bounds are valid"),
            clamped: 0,
        }
    }

    /// Records one message of the open-loop schedule: from its intended send time (not the
    /// time it actually left) to its delivery.
    pub fn record_intended(&mut self, intended_ns: u64, delivered_ns: u64) {
        self.record(delivered_ns.saturating_sub(intended_ns));
    }

    /// Records a closed-loop sample, back-filling what a sender stalled for `latency_ns`
    /// would have measured at one sample per `expected_interval_ns`.
    pub fn record_closed_loop(&mut self, latency_ns: u64, expected_interval_ns: u64) {
        let value = self.clamp(latency_ns);
        self.histogram
            .record_correct(value, expected_interval_ns)
            .expect("value clamped to the histogram's range");
    }

    fn record(&mut self, latency_ns: u64) {
        let value = self.clamp(latency_ns);
        self.histogram
            .record(value)
            .expect("value clamped to the histogram's range");
    }

    fn clamp(&mut self, latency_ns: u64) -> u64 {
        if latency_ns > LATENCY_NS_MAX {
            self.clamped += 1;
        }
        latency_ns.clamp(1, LATENCY_NS_MAX)
    }

    pub fn merge(&mut self, other: &LatencyRecorder) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of the same bounds");
        self.clamped += other.clamped;
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// What was recorded, for another process to merge ([`LatencyRecorder::from_counts`]):
    /// (value in ns, samples) per recorded bucket, and the clamped count.
    pub fn counts(&self) -> (Vec<(u64, u64)>, u64) {
        let counts = self
            .histogram
            .iter_recorded()
            .map(|bucket| (bucket.value_iterated_to(), bucket.count_at_value()))
            .collect();
        (counts, self.clamped)
    }

    /// A recorder holding what [`LatencyRecorder::counts`] gave.
    pub fn from_counts(counts: &[(u64, u64)], clamped: u64) -> Self {
        let mut recorder = Self::new();
        for &(value, samples) in counts {
            recorder
                .histogram
                .record_n(value.clamp(1, LATENCY_NS_MAX), samples)
                .expect("value clamped to the histogram's range");
        }
        recorder.clamped = clamped;
        recorder
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    pub fn summary(&self) -> LatencySummary {
        if self.histogram.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: self.histogram.len(),
            p50_us: us(self.histogram.value_at_quantile(0.50)),
            p90_us: us(self.histogram.value_at_quantile(0.90)),
            p99_us: us(self.histogram.value_at_quantile(0.99)),
            p999_us: us(self.histogram.value_at_quantile(0.999)),
            max_us: us(self.histogram.max()),
            mean_us: self.histogram.mean() / 1000.0,
            clamped: self.clamped,
        }
    }

    /// (percentile, latency in µs) points for a percentile curve, log-spaced toward p99.999.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        if self.histogram.is_empty() {
            return Vec::new();
        }
        let mut points = Vec::new();
        let mut tail = 1.0f64; // 1 - quantile
        while tail >= 1e-5 {
            let quantile = 1.0 - tail;
            let value = self.histogram.value_at_quantile(quantile);
            points.push((quantile * 100.0, value as f64 / 1000.0));
            tail /= 10f64.powf(0.1);
        }
        points.push((100.0, self.histogram.max() as f64 / 1000.0));
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers in 100 µs but stalls for 200 ms once, under a 1 ms schedule.
    /// Open loop, the 200 messages due during the stall wait for its end: 2% of the samples
    /// are slow, so p99 must show the stall.
    #[test]
    fn open_loop_counts_the_messages_a_stall_delayed() {
        let interval_ns = 1_000_000;
        let stall = 5_000_000_000..5_200_000_000u64;
        let mut recorder = LatencyRecorder::new();
        for k in 0..10_000u64 {
            let intended = k * interval_ns;
            let sent = if stall.contains(&intended) {
                stall.end
            } else {
                intended
            };
            recorder.record_intended(intended, sent + 100_000);
        }
        let summary = recorder.summary();
        assert_eq!(summary.count, 10_000);
        assert!((summary.p50_us - 100.0).abs() < 1.0, "{summary:?}");
        assert!(summary.p99_us > 1_000.0, "the stall is in p99: {summary:?}");
        assert!(summary.max_us >= 200_000.0, "{summary:?}");
    }

    /// The same stall seen by a closed-loop sender: it sends nothing during the stall, so its
    /// raw samples hold one slow sample among 9,800 fast ones. The correction back-fills the
    /// 199 samples it should have taken during the 200 ms.
    #[test]
    fn closed_loop_correction_back_fills_a_stall() {
        let interval_ns = 1_000_000;
        let mut raw = LatencyRecorder::new();
        let mut corrected = LatencyRecorder::new();
        for _ in 0..9_800 {
            raw.record(100_000);
            corrected.record_closed_loop(100_000, interval_ns);
        }
        raw.record(200_000_000);
        corrected.record_closed_loop(200_000_000, interval_ns);
        assert!(raw.summary().p99_us < 1_000.0, "raw hides the stall");
        assert_eq!(corrected.len(), 9_800 + 200);
        assert!(corrected.summary().p99_us > 1_000.0, "corrected shows it");
    }

    #[test]
    fn early_deliveries_and_huge_values_are_clamped() {
        let mut recorder = LatencyRecorder::new();
        recorder.record_intended(10, 5); // a clock read before the intended time
        recorder.record_intended(0, LATENCY_NS_MAX * 2);
        let summary = recorder.summary();
        assert_eq!(summary.count, 2);
        assert_eq!(summary.clamped, 1);
    }

    #[test]
    fn counts_carry_a_histogram_to_another_process() {
        let mut recorder = LatencyRecorder::new();
        for k in 1..=1_000u64 {
            recorder.record_intended(0, k * 1_000);
        }
        recorder.record_intended(0, LATENCY_NS_MAX * 2);
        let (counts, clamped) = recorder.counts();
        let json = serde_json::to_string(&counts).expect("json");
        let back: Vec<(u64, u64)> = serde_json::from_str(&json).expect("parse");
        let copy = LatencyRecorder::from_counts(&back, clamped);
        assert_eq!(copy.summary(), recorder.summary());
    }

    #[test]
    fn merge_and_curve() {
        let mut a = LatencyRecorder::new();
        let mut b = LatencyRecorder::new();
        a.record_intended(0, 1_000);
        b.record_intended(0, 2_000_000);
        a.merge(&b);
        assert_eq!(a.len(), 2);
        let curve = a.percentile_curve();
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(curve.last().map(|p| p.0), Some(100.0));
        assert!(LatencyRecorder::new().percentile_curve().is_empty());
    }
}
