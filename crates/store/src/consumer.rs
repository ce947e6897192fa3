//! Following another service's `WatchEvents` with an exactly-once effect.

use std::{fmt::Display, future::Future, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::{
    db::{Db, Tx},
    error::StoreError,
};

/// What [`run_consumer`] needs to follow one upstream event stream.
///
/// The stream item is usually the upstream's generated `WatchEventsResponse` and the error
/// `tonic::Status`; this crate stays independent of both.
pub trait Consumer: Send + Sync {
    /// One upstream event.
    type Event: Send;
    /// Why opening or reading the upstream stream failed. A `tonic::Status` UNAVAILABLE
    /// while reading is taken as the upstream replica draining: reconnect at once.
    type Error: Display + Send + 'static;
    /// The upstream stream of events.
    type Stream: Stream<Item = Result<Self::Event, Self::Error>> + Send;

    /// The cursor name in this service's database (e.g. `"users-events"`). One per consumer.
    fn name(&self) -> &str;

    /// Opens the upstream stream of events with a sequence greater than `after_sequence`.
    fn open(
        &self,
        after_sequence: i64,
    ) -> impl Future<Output = Result<Self::Stream, Self::Error>> + Send;

    /// The event's sequence in the upstream outbox.
    fn sequence(&self, event: &Self::Event) -> i64;

    /// Applies one event's effect inside `tx` (the cursor has already been advanced in the
    /// same transaction, so the effect and the cursor commit together or not at all).
    /// Events the consumer does not care about: return `Ok(())`.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;
}

/// Reconnect delays: doubling from `FIRST_BACKOFF` up to `MAX_BACKOFF`, reset after an event
/// is applied.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A stream ended by a draining replica is reopened without waiting, at most once per this
/// interval (a replica that keeps ending streams at once gets the backoff).
const IMMEDIATE_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Why one connection to the upstream ended.
enum Ended {
    Shutdown,
    Retry,
    /// The upstream ended the stream with UNAVAILABLE: it is draining, another replica (or
    /// this one after its restart) will serve the stream.
    Drained,
}

/// Whether a stream error is a draining server's "reconnect elsewhere".
fn ended_by_drain<E: 'static>(error: &E) -> bool {
    (error as &dyn std::any::Any)
        .downcast_ref::<tonic::Status>()
        .is_some_and(|status| status.code() == tonic::Code::Unavailable)
}

/// Follows `consumer`'s upstream until `shutdown` turns `true` (or its sender is dropped).
///
/// Reads the cursor, opens the stream after it, and applies each event in its own
/// transaction: [`Tx::advance_cursor`] first (skipping events already applied), then
/// [`Consumer::apply`], then commit. A failure to connect, a stream error or end, or a
/// failed apply is logged, and the loop reconnects from the committed cursor after a
/// backoff. A stream the upstream ends with UNAVAILABLE (a draining replica) is reopened at
/// once. An event whose apply always fails is retried forever (and logged each time); it
/// never gets skipped silently.
pub async fn run_consumer<C: Consumer>(db: Db, consumer: C, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = FIRST_BACKOFF;
    let mut last_immediate: Option<std::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let ended = tokio::select! {
            ended = follow(&db, &consumer, &mut backoff) => ended,
            _ = shutdown.wait_for(|stop| *stop) => Ended::Shutdown,
        };
        match ended {
            Ended::Shutdown => return,
            Ended::Drained
                if last_immediate.is_none_or(|t| t.elapsed() >= IMMEDIATE_RECONNECT_INTERVAL) =>
            {
                last_immediate = Some(std::time::Instant::now());
                continue;
            }
            Ended::Retry | Ended::Drained => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn follow<C: Consumer>(db: &Db, consumer: &C, backoff: &mut Duration) -> Ended {
    let name = consumer.name();
    let after = match db.cursor(name).await {
        Ok(after) => after,
        Err(err) => {
            tracing::warn!(consumer = name, error = %err, "reading the consumer cursor failed");
            return Ended::Retry;
        }
    };
    let stream = match consumer.open(after).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(consumer = name, after, error = %err, "opening the event stream failed");
            return Ended::Retry;
        }
    };
    tracing::debug!(consumer = name, after, "following events");
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(err) if ended_by_drain(&err) => {
                tracing::info!(consumer = name, error = %err, "the upstream ended the event stream; reconnecting at once");
                return Ended::Drained;
            }
            Err(err) => {
                tracing::warn!(consumer = name, error = %err, "the event stream failed");
                return Ended::Retry;
            }
        };
        let sequence = consumer.sequence(&event);
        if let Err(err) = apply_one(db, consumer, sequence, event).await {
            tracing::error!(consumer = name, sequence, error = %err, "applying an event failed");
            return Ended::Retry;
        }
        *backoff = FIRST_BACKOFF;
    }
    tracing::info!(consumer = name, "the event stream ended; reconnecting");
    Ended::Retry
}

async fn apply_one<C: Consumer>(
    db: &Db,
    consumer: &C,
    sequence: i64,
    event: C::Event,
) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    if !tx.advance_cursor(consumer.name(), sequence).await? {
        // Applied before (a replay after reconnecting, or another replica got there first).
        tx.rollback().await?;
        return Ok(());
    }
    consumer.apply(&mut tx, event).await?;
    tx.commit().await
}
