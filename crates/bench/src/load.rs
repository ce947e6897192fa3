//! Load drivers: closed loop (N calls in flight, the next sent when one returns) and open
//! loop (a fixed rate, latency measured from each request's due time).
//!
//! Both run on the calling Tokio runtime; the benchmark gives them a current-thread runtime
//! on a core of their own.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    schedule::{Schedule, corrected_latency},
    stats::{Failure, Recorder, Summary},
};

/// One call, identified by its sequence number; resolves to success or why not.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

/// Makes call number `i`.
pub type CallFn = Arc<dyn Fn(u64) -> CallFuture + Send + Sync>;

/// `concurrency` callers, each sending its next call as soon as its last returns, for
/// `duration`. Calls still in flight at the end are waited for and counted.
pub async fn closed_loop(call: CallFn, concurrency: usize, duration: Duration) -> Summary {
    let start = Instant::now();
    let stop = start + duration;
    let seq = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let call = call.clone();
        let seq = seq.clone();
        workers.spawn(async move {
            let mut recorder = Recorder::new();
            loop {
                let sent = Instant::now();
                if sent >= stop {
                    break;
                }
                let outcome = call(seq.fetch_add(1, Ordering::Relaxed)).await;
                recorder.record(outcome, sent.elapsed());
            }
            recorder
        });
    }
    let mut total = Recorder::new();
    while let Some(joined) = workers.join_next().await {
        if let Ok(recorder) = joined {
            total.merge(&recorder);
        }
    }
    total.finish(start.elapsed())
}

/// Most calls an open loop keeps outstanding; past this a due call is counted as failed
/// (`CLIENT_BACKLOG`) instead of piling up without bound behind a dead server.
const MAX_OUTSTANDING: u64 = 20_000;

/// Calls at `rate` per second for `duration`, each due at its scheduled time whatever
/// happened to the calls before it; latency is charged from the due time (see
/// [`crate::schedule`]). Waits for the last answers before returning.
pub async fn open_loop(call: CallFn, rate: f64, duration: Duration) -> Summary {
    let start = Instant::now() + Duration::from_millis(1);
    let mut schedule = Schedule::new(start, rate, duration);
    let shared = Arc::new(Mutex::new(Recorder::new()));
    let outstanding = Arc::new(AtomicU64::new(0));
    let mut calls = tokio::task::JoinSet::new();
    while let Some(next) = schedule.next_due() {
        wait_until(next).await;
        for (i, due) in schedule.take_due(Instant::now()) {
            if outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                lock(&shared).failed(Failure::Backlog);
                continue;
            }
            outstanding.fetch_add(1, Ordering::Relaxed);
            let call = call.clone();
            let shared = shared.clone();
            let outstanding = outstanding.clone();
            calls.spawn(async move {
                let outcome = call(i).await;
                let latency = corrected_latency(due, Instant::now());
                lock(&shared).record(outcome, latency);
                outstanding.fetch_sub(1, Ordering::Relaxed);
            });
        }
        // Reap finished tasks as we go so the set stays small.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    let recorder = std::mem::take(&mut *lock(&shared));
    recorder.finish(start.elapsed())
}

fn lock(m: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `due` with sub-millisecond precision: the timer for the bulk of the wait
/// (it has 1 ms granularity), then yields in a loop for the rest, letting the runtime
/// process answers meanwhile. Spinning costs the load generator's core, not the server's.
async fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now + Duration::from_millis(2) {
        tokio::time::sleep_until((due - Duration::from_millis(1)).into()).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sleeper(delay: Duration, fail_every: u64) -> CallFn {
        Arc::new(move |i| {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if fail_every > 0 && i % fail_every == 0 {
                    Err(Failure::Status(tonic::Code::Unavailable))
                } else {
                    Ok(())
                }
            })
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_sends_at_the_rate_and_counts_failures() {
        let s = open_loop(
            sleeper(Duration::from_millis(2), 10),
            500.0,
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(s.ok + s.error_count(), 100);
        assert_eq!(s.error_count(), 10);
        assert!(s.percentile(50.0) >= Duration::from_millis(2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn closed_loop_keeps_n_in_flight() {
        let s = closed_loop(
            sleeper(Duration::from_millis(10), 0),
            4,
            Duration::from_millis(200),
        )
        .await;
        // 4 callers x ~20 calls of 10 ms each; allow for timer slack.
        assert!(s.ok >= 40 && s.ok <= 84, "{}", s.ok);
        assert_eq!(s.error_count(), 0);
    }
}
