//! Latency histograms and error counts of a run.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;

/// Why a call did not count as a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A non-OK gRPC status (transport failures arrive as UNAVAILABLE/UNKNOWN/...).
    Status(tonic::Code),
    /// OK, but the answer was not the one asked for.
    Mismatch,
    /// The open loop could not send: too many requests already outstanding.
    Backlog,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(code) => f.write_str(tessera_mesh::metrics::code_name(*code)),
            Failure::Mismatch => f.write_str("WRONG_ANSWER"),
            Failure::Backlog => f.write_str("CLIENT_BACKLOG"),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Status(status.code())
    }
}

/// 1 ns to 60 s at 3 significant figures.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// Collects one run's (or one worker's) outcomes.
#[derive(Clone, Debug)]
pub struct Recorder {
    latency: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder with nothing recorded yet.
    pub fn new() -> Self {
        Self {
            latency: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    /// A success and its latency. Only successes enter the latency histogram: a fast error
    /// must not make the percentiles look better.
    pub fn ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.latency
            .saturating_record((latency.as_nanos() as u64).clamp(1, 60_000_000_000));
    }

    /// A failed call, counted under its failure's name.
    pub fn failed(&mut self, failure: Failure) {
        *self.errors.entry(failure.to_string()).or_default() += 1;
    }

    /// One call's outcome: [`Self::ok`] or [`Self::failed`].
    pub fn record(&mut self, outcome: Result<(), Failure>, latency: Duration) {
        match outcome {
            Ok(()) => self.ok(latency),
            Err(failure) => self.failed(failure),
        }
    }

    /// Adds another worker's outcomes to these.
    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (failure, n) in &other.errors {
            *self.errors.entry(failure.clone()).or_default() += n;
        }
    }

    /// The summary of a run that lasted `elapsed`.
    pub fn finish(self, elapsed: Duration) -> Summary {
        Summary {
            latency: self.latency,
            ok: self.ok,
            errors: self.errors,
            elapsed,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Summary {
    latency: Histogram<u64>,
    /// Successful calls.
    pub ok: u64,
    /// Failed calls, by failure name (`UNAVAILABLE`, `WRONG_ANSWER`, ...).
    pub errors: BTreeMap<String, u64>,
    /// How long the run lasted (summed over merged runs).
    pub elapsed: Duration,
}

impl Summary {
    /// A summary of nothing, to merge rounds into.
    pub fn empty() -> Self {
        Recorder::new().finish(Duration::ZERO)
    }

    /// Failed calls of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful calls per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at percentile `p` (0-100) of the successful calls.
    pub fn percentile(&self, p: f64) -> Duration {
        Duration::from_nanos(self.latency.value_at_percentile(p))
    }

    /// `"3 UNAVAILABLE, 1 WRONG_ANSWER"`, or `"0"`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Folds another run of the same kind into this one (rounds of a benchmark).
    pub fn merge(&mut self, other: &Summary) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (failure, n) in &other.errors {
            *self.errors.entry(failure.clone()).or_default() += n;
        }
        self.elapsed += other.elapsed;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_are_counted_and_kept_out_of_the_latencies() {
        let mut r = Recorder::new();
        for _ in 0..99 {
            r.record(Ok(()), Duration::from_micros(100));
        }
        r.record(Ok(()), Duration::from_millis(50));
        // A burst of instant failures would pull the percentiles down if they were counted.
        for _ in 0..1000 {
            r.record(
                Err(Failure::Status(tonic::Code::Unavailable)),
                Duration::from_nanos(1),
            );
        }
        r.record(Err(Failure::Mismatch), Duration::ZERO);
        let s = r.finish(Duration::from_secs(2));
        assert_eq!(s.ok, 100);
        assert_eq!(s.error_count(), 1001);
        assert_eq!(s.errors_text(), "1000 UNAVAILABLE, 1 WRONG_ANSWER");
        assert!((s.throughput() - 50.0).abs() < 1e-9);
        let p50 = s.percentile(50.0);
        assert!(p50 >= Duration::from_micros(99) && p50 <= Duration::from_micros(101));
        assert!(s.percentile(100.0) >= Duration::from_millis(49));
    }
}
