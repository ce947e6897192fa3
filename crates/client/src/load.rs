//! Peak-EWMA load that also counts refusals.
//!
//! The cost of a replica is its latency estimate times (calls in flight + 1), as in
//! `tower::load::PeakEwma`: a slower response than the estimate replaces it at once (the
//! peak), faster ones pull it down with a time-weighted moving average, and with no responses
//! it decays towards zero so an avoided replica is tried again. The difference: a call that
//! the replica refuses (UNAVAILABLE, RESOURCE_EXHAUSTED) or that fails on the connection counts
//! as a [`FAILURE_PENALTY`]-long response. Otherwise a replica that refuses everything would
//! answer fastest and get the most traffic (tower's estimate only moves when the response
//! handle is dropped, so it cannot be told a fast answer was a bad one).

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tonic::body::Body;
use tower::{Service, load::Load};

use crate::{
    Error,
    endpoint::{Endpoint, EndpointFuture},
};

/// What a refused or failed call counts as, in latency.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// A replica with its load.
pub(crate) struct Weighed {
    endpoint: Endpoint,
    stats: Arc<Stats>,
    /// The endpoint's connect count when last ready.
    connects: u64,
}

struct Stats {
    in_flight: AtomicU32,
    rtt: Mutex<Rtt>,
    decay_ns: f64,
}

struct Rtt {
    estimate_ns: f64,
    at: Instant,
}

impl Rtt {
    /// Folds in an observation (zero to just decay).
    fn observe(&mut self, rtt_ns: f64, now: Instant, decay_ns: f64) -> f64 {
        if rtt_ns > self.estimate_ns {
            self.estimate_ns = rtt_ns;
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let keep = (-elapsed / decay_ns).exp();
            self.estimate_ns = self.estimate_ns * keep + rtt_ns * (1.0 - keep);
        }
        self.at = now;
        self.estimate_ns
    }
}

impl Stats {
    /// Forgets what the old connection earned: the failure penalties of a replica that died
    /// or drained would otherwise keep its restarted process idle for seconds. The new
    /// connection starts at zero, so it is chosen until its first answer sets a real estimate
    /// (the peak is taken at once): a replica that comes back gets calls right away, and only
    /// for about one round trip before it competes on its latency like the others.
    fn reset(&self) {
        let mut estimate = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        estimate.estimate_ns = 0.0;
        estimate.at = Instant::now();
    }

    fn observe(&self, rtt: Duration) {
        // A poisoned lock only means another thread panicked mid-update; the number is
        // still a number.
        let mut estimate = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        estimate.observe(rtt.as_nanos() as f64, Instant::now(), self.decay_ns);
    }
}

impl Weighed {
    pub(crate) fn new(endpoint: Endpoint, default_rtt: Duration, decay: Duration) -> Self {
        Self {
            endpoint,
            stats: Arc::new(Stats {
                in_flight: AtomicU32::new(0),
                rtt: Mutex::new(Rtt {
                    estimate_ns: default_rtt.as_nanos() as f64,
                    at: Instant::now(),
                }),
                decay_ns: (decay.as_nanos() as f64).max(1.0),
            }),
            connects: 0,
        }
    }
}

/// Estimated latency × (calls in flight + 1), in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub(crate) struct Cost(f64);

impl Load for Weighed {
    type Metric = Cost;

    fn load(&self) -> Cost {
        // The balancer polls only the replica it picks, so a replica whose connection dropped
        // would sit among the ready ones, shunned for its failures, and never reconnect (nor
        // get calls once its process is back). Costing nothing, it is picked, polled, and
        // either reconnects at once or waits in backoff with the replicas that are not ready.
        if self.endpoint.is_lost() {
            return Cost(0.0);
        }
        let in_flight = self.stats.in_flight.load(Ordering::Relaxed);
        let mut rtt = self.stats.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let estimate = rtt.observe(0.0, Instant::now(), self.stats.decay_ns);
        Cost(estimate * f64::from(in_flight.saturating_add(1)))
    }
}

impl Service<http::Request<Body>> for Weighed {
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = Tracked;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.endpoint.poll_ready(cx))?;
        let connects = self.endpoint.connects();
        if connects != self.connects {
            // A reconnect (not the first connect): start the new connection's estimate afresh.
            if self.connects != 0 {
                self.stats.reset();
            }
            self.connects = connects;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Tracked {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Tracked {
            response: self.endpoint.call(request),
            in_flight: Some(InFlight {
                stats: self.stats.clone(),
                sent: Instant::now(),
            }),
        }
    }
}

/// A call in flight; counted until dropped.
struct InFlight {
    stats: Arc<Stats>,
    sent: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The response future of a [`Weighed`] replica: records the latency (to the response
/// headers) or the failure penalty when it completes.
pub(crate) struct Tracked {
    response: EndpointFuture,
    in_flight: Option<InFlight>,
}

impl Future for Tracked {
    type Output = Result<http::Response<Body>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.response.as_mut().poll(cx));
        if let Some(in_flight) = self.in_flight.take() {
            let took = in_flight.sent.elapsed();
            let failed = match &result {
                Ok(response) => refused(response),
                Err(_) => true,
            };
            in_flight.stats.observe(if failed {
                took.max(FAILURE_PENALTY)
            } else {
                took
            });
        }
        Poll::Ready(result)
    }
}

/// UNAVAILABLE or RESOURCE_EXHAUSTED as a trailers-only response: "go elsewhere".
fn refused(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| matches!(code.as_bytes(), b"14" | b"8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_with_time() {
        let start = Instant::now();
        let decay = Duration::from_secs(10).as_nanos() as f64;
        let mut rtt = Rtt {
            estimate_ns: 1e6,
            at: start,
        };
        // A slower response is taken as is.
        assert_eq!(rtt.observe(20e6, start, decay), 20e6);
        // A faster one 10 s later moves it by 1 - 1/e.
        let later = start + Duration::from_secs(10);
        let next = rtt.observe(1e6, later, decay);
        assert!(
            (next - (20e6 / std::f64::consts::E + 1e6 * (1.0 - 1.0 / std::f64::consts::E))).abs()
                < 1e3
        );
        // Nothing for a long time: close to zero.
        let much_later = later + Duration::from_secs(100);
        assert!(rtt.observe(0.0, much_later, decay) < 1e3);
    }

    #[test]
    fn a_reconnect_forgets_the_old_connections_penalties() {
        let stats = Stats {
            in_flight: AtomicU32::new(0),
            rtt: Mutex::new(Rtt {
                estimate_ns: 1e6,
                at: Instant::now(),
            }),
            decay_ns: Duration::from_secs(2).as_nanos() as f64,
        };
        // Calls failing as the replica dies: the estimate peaks at the penalty.
        stats.observe(FAILURE_PENALTY);
        let peak = stats
            .rtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .estimate_ns;
        assert!(peak >= FAILURE_PENALTY.as_nanos() as f64, "{peak}");
        // The process at that address is back on a new connection: preferred until it answers.
        stats.reset();
        let estimate = || {
            stats
                .rtt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .estimate_ns
        };
        assert_eq!(estimate(), 0.0);
        // Its first answer is its estimate (the peak).
        stats.observe(Duration::from_micros(300));
        assert_eq!(estimate(), 300e3);
    }
}
