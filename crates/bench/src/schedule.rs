//! The open-loop schedule: request `i` is due at `start + i / rate`, whether or not the
//! requests before it have been answered.
//!
//! Latency is measured from that due time, not from when the request actually left. When the
//! server (or the load generator) stalls, the requests that should have been sent during the
//! stall are sent late, in a burst, and each is charged the time it waited to be sent: this
//! is the correction for coordinated omission. A closed loop, which sends the next request
//! only after an answer, would instead record one slow sample and silently skip the rest.

use std::time::{Duration, Instant};

/// When each request of an open-loop run is due.
#[derive(Clone, Debug)]
pub struct Schedule {
    start: Instant,
    /// Nanoseconds between requests (fractional, so any rate is kept exactly on average).
    interval_ns: f64,
    total: u64,
    next: u64,
}

impl Schedule {
    /// `rate` requests per second for `duration`, the first due at `start`.
    pub fn new(start: Instant, rate: f64, duration: Duration) -> Self {
        let rate = rate.max(f64::MIN_POSITIVE);
        let total = (duration.as_secs_f64() * rate).floor() as u64;
        Self {
            start,
            interval_ns: 1e9 / rate,
            total,
            next: 0,
        }
    }

    /// How many requests the whole schedule sends.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// When request `i` is due.
    pub fn due_time(&self, i: u64) -> Instant {
        self.start + Duration::from_nanos((i as f64 * self.interval_ns) as u64)
    }

    /// When the next unsent request is due; `None` once every request has been handed out.
    pub fn next_due(&self) -> Option<Instant> {
        (self.next < self.total).then(|| self.due_time(self.next))
    }

    /// Hands out every request due at or before `now`, each with its due time (the instant
    /// its latency is measured from). After a stall this is a burst.
    pub fn take_due(&mut self, now: Instant) -> Vec<(u64, Instant)> {
        let mut due = Vec::new();
        while self.next < self.total {
            let at = self.due_time(self.next);
            if at > now {
                break;
            }
            due.push((self.next, at));
            self.next += 1;
        }
        due
    }
}

/// The latency charged to a request: from when it was due to when its answer arrived.
pub fn corrected_latency(due: Instant, answered: Instant) -> Duration {
    answered.saturating_duration_since(due)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stats::Recorder;

    #[test]
    fn schedule_spaces_requests_at_the_rate() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 1000.0, Duration::from_millis(50));
        assert_eq!(s.total(), 50);
        assert_eq!(s.next_due(), Some(start));
        let first = s.take_due(start);
        assert_eq!(first, vec![(0, start)]);
        assert_eq!(s.next_due(), Some(start + Duration::from_millis(1)));
        // Nothing more is due a hair before the next slot.
        assert!(s.take_due(start + Duration::from_micros(999)).is_empty());
        let all = s.take_due(start + Duration::from_secs(10));
        assert_eq!(all.len(), 49);
        assert_eq!(s.next_due(), None);
    }

    /// A 100 ms stall at 1000 requests/s: the 100 requests that should have gone out during
    /// the stall are sent in a burst afterwards, each charged from its own due time, so the
    /// percentiles show the stall. Measuring from the actual send would show ~1 ms for all.
    #[test]
    fn a_stall_is_charged_to_every_request_it_delayed() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 1000.0, Duration::from_secs(1));
        let stall_end = start + Duration::from_millis(100);
        let burst = s.take_due(stall_end);
        assert_eq!(
            burst.len(),
            101,
            "every request due during the stall is sent"
        );

        let service = Duration::from_millis(1);
        let mut corrected = Recorder::new();
        let mut naive = Recorder::new();
        for (_, due) in &burst {
            // Sent at the end of the stall, answered 1 ms later.
            let answered = stall_end + service;
            corrected.ok(corrected_latency(*due, answered));
            naive.ok(corrected_latency(stall_end, answered));
        }
        // The rest of the second runs smoothly: sent on time, answered in 1 ms.
        while let Some(due) = s.next_due() {
            for (_, due) in s.take_due(due) {
                corrected.ok(corrected_latency(due, due + service));
                naive.ok(corrected_latency(due, due + service));
            }
        }
        let corrected = corrected.finish(Duration::from_secs(1));
        let naive = naive.finish(Duration::from_secs(1));
        assert_eq!(corrected.ok, 1000);
        // ~10% of requests were delayed by the stall: p95 lands in it, p99 near its length.
        assert!(corrected.percentile(99.0) > Duration::from_millis(80));
        assert!(corrected.percentile(95.0) > Duration::from_millis(40));
        assert!(corrected.percentile(50.0) < Duration::from_millis(2));
        assert!(naive.percentile(99.0) < Duration::from_millis(2));
    }
}
