//! Following another service's `WatchEvents` with an exactly-once effect.

use std::{fmt::Display, future::Future, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::{db::Db, error::StoreError, tx::Tx};

/// What [`run_consumer`] needs to follow one upstream event stream.
///
/// The stream item is usually the upstream's generated `WatchEventsResponse` and the error
/// `tonic::Status`; this crate stays independent of both. Here the upstream is a fixed list
/// of `(sequence, post id)` pairs, and each event records its post:
///
/// ```
/// use futures::stream::{self, Iter};
/// use tessera_store::{Consumer, Db, Migration, StoreError, Tx, run_consumer};
///
/// struct Posts(Vec<(i64, String)>);
///
/// impl Consumer for Posts {
///     type Event = (i64, String);
///     type Error = String;
///     type Stream = Iter<std::vec::IntoIter<Result<(i64, String), String>>>;
///
///     fn name(&self) -> &str {
///         "posts-events"
///     }
///
///     async fn open(&self, after: i64) -> Result<Self::Stream, String> {
///         let rest = self.0.iter().filter(|(seq, _)| *seq > after).cloned().map(Ok);
///         Ok(stream::iter(rest.collect::<Vec<_>>()))
///     }
///
///     fn sequence(&self, event: &(i64, String)) -> i64 {
///         event.0
///     }
///
///     async fn apply(&self, tx: &mut Tx, event: (i64, String)) -> Result<(), StoreError> {
///         sqlx::query("INSERT INTO seen (post_id) VALUES ($1)")
///             .bind(event.1)
///             .execute(&mut **tx)
///             .await?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("consumer.db");
/// let migrations = &[Migration::portable("seen", "CREATE TABLE seen (post_id TEXT PRIMARY KEY)")];
/// let db = Db::open(path.to_str().unwrap(), migrations).await?;
///
/// let (stop, shutdown) = tokio::sync::watch::channel(false);
/// let events = vec![(1, "p1".to_owned()), (2, "p2".to_owned())];
/// let running = tokio::spawn(run_consumer(db.clone(), Posts(events), shutdown));
/// // The cursor commits with each effect; wait (bounded) until both are in.
/// for _ in 0..500 {
///     if db.cursor("posts-events").await? == 2 {
///         break;
///     }
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// stop.send(true)?;
/// running.await?;
/// let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM seen").fetch_one(db.pool()).await?;
/// assert_eq!(n, 2);
/// # Ok(()) }
/// ```
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

    /// The upstream outbox's epoch the event carries (`WatchEventsResponse.epoch`). The cursor
    /// follows one epoch: an event from another stops the consumer. `None` or empty (a
    /// producer that sends none) is not checked; Tessera's consumers all return the field.
    fn epoch<'e>(&self, event: &'e Self::Event) -> Option<&'e str> {
        let _ = event;
        None
    }

    /// The service whose events these are, for log lines and halts (by default the cursor
    /// name without its `-events` suffix).
    fn producer(&self) -> &str {
        let name = self.name();
        name.strip_suffix("-events").unwrap_or(name)
    }

    /// Whether `error` says the producer's outbox no longer continues this cursor, so that
    /// only an operator can fix it: by default a `tonic::Status` OUT_OF_RANGE (the events
    /// after the cursor were pruned, or the cursor is ahead of an outbox that went back).
    fn diverged(&self, error: &Self::Error) -> bool {
        (error as &dyn std::any::Any)
            .downcast_ref::<tonic::Status>()
            .is_some_and(|status| status.code() == tonic::Code::OutOfRange)
    }

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

/// How long a halted consumer waits before looking again: it needs an operator, so retrying
/// fast would only fill the log (each look logs the halt once more, at ERROR).
pub const HALTED_RETRY: Duration = Duration::from_secs(30);

/// Why one connection to the upstream ended.
enum Ended {
    Shutdown,
    Retry,
    /// The producer's outbox is not the history the cursor follows (another epoch, pruned past
    /// the cursor, or behind it): recorded in the database and retried slowly.
    Halted,
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
/// [`Consumer`]'s example runs it against an in-process upstream.
///
/// Reads the cursor, opens the stream after it, and applies each event in its own
/// transaction: [`Tx::advance_cursor`] first (skipping events already applied), then
/// [`Consumer::apply`], then commit. A failure to connect, a stream error or end, or a
/// failed apply is logged, and the loop reconnects from the committed cursor after a
/// backoff. A stream the upstream ends with UNAVAILABLE (a draining replica) is reopened at
/// once. An event whose apply always fails is retried forever (and logged each time); it
/// never gets skipped silently.
///
/// The cursor also records the producer's outbox epoch ([`Consumer::epoch`]) with the first
/// event it applies. An event from another epoch, or an OUT_OF_RANGE from the producer (the
/// events after the cursor were pruned, or the outbox ends below the cursor), halts the
/// consumer: nothing of that stream is applied, the reason is logged at ERROR naming the
/// producer and kept in the database ([`Db::cursor_state`]), and the consumer looks again
/// every [`HALTED_RETRY`] until an operator resets the cursor ([`Db::reset_cursor`],
/// `tessera cursor reset`).
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
        let wait = match ended {
            Ended::Shutdown => return,
            Ended::Drained
                if last_immediate.is_none_or(|t| t.elapsed() >= IMMEDIATE_RECONNECT_INTERVAL) =>
            {
                last_immediate = Some(std::time::Instant::now());
                continue;
            }
            Ended::Retry | Ended::Drained => {
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
            Ended::Halted => HALTED_RETRY,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn follow<C: Consumer>(db: &Db, consumer: &C, backoff: &mut Duration) -> Ended {
    let name = consumer.name();
    let (after, mut followed, mut halted) = match db.cursor_state(name).await {
        Ok(state) => (state.position, state.epoch, state.halted.is_some()),
        Err(err) => {
            tracing::warn!(consumer = name, error = %err, "reading the consumer cursor failed");
            return Ended::Retry;
        }
    };
    let stream = match consumer.open(after).await {
        Ok(stream) => stream,
        Err(err) if consumer.diverged(&err) => {
            return halt(db, consumer, after, describe(&err)).await;
        }
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
            Err(err) if consumer.diverged(&err) => {
                return halt(db, consumer, after, describe(&err)).await;
            }
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
        let epoch = consumer
            .epoch(&event)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
        if let (Some(epoch), Some(known)) = (&epoch, &followed)
            && epoch != known
        {
            let reason = epoch_changed(consumer, known, epoch, sequence);
            return halt(db, consumer, after, reason).await;
        }
        // The first epoch seen is recorded with the event (or, if another replica recorded a
        // different one meanwhile, the event is refused).
        let record = epoch.filter(|_| followed.is_none());
        match apply_one(db, consumer, sequence, record.as_deref(), event).await {
            Ok(Applied::Done) => {}
            Ok(Applied::OtherEpoch(known)) => {
                let seen = record.unwrap_or_default();
                let reason = epoch_changed(consumer, &known, &seen, sequence);
                return halt(db, consumer, after, reason).await;
            }
            Err(err) => {
                tracing::error!(consumer = name, sequence, error = %err, "applying an event failed");
                return Ended::Retry;
            }
        }
        if record.is_some() {
            followed = record;
        }
        if std::mem::take(&mut halted) {
            // The producer continues the cursor again (e.g. its database was put back).
            if let Err(err) = db.set_halted(name, None).await {
                tracing::warn!(consumer = name, error = %err, "clearing the halt failed");
            }
            tracing::info!(
                consumer = name,
                sequence,
                "the consumer follows its producer again"
            );
        }
        *backoff = FIRST_BACKOFF;
    }
    tracing::info!(consumer = name, "the event stream ended; reconnecting");
    Ended::Retry
}

/// The error's own words: a status's message without its code and metadata.
fn describe<E: Display + 'static>(err: &E) -> String {
    match (err as &dyn std::any::Any).downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_owned(),
        None => err.to_string(),
    }
}

fn epoch_changed<C: Consumer>(consumer: &C, known: &str, seen: &str, sequence: i64) -> String {
    format!(
        "{} sent event {sequence} from outbox epoch {seen}, but this cursor follows epoch \
         {known}: its outbox was recreated",
        consumer.producer()
    )
}

/// Records and logs why `consumer` stopped; nothing more is applied until a reset.
async fn halt<C: Consumer>(db: &Db, consumer: &C, after: i64, reason: String) -> Ended {
    let name = consumer.name();
    let producer = consumer.producer();
    let reason = format!(
        "halted at {after}: {reason}; check {producer} and reset the cursor \
         (tessera cursor reset --producer {producer} ...)"
    );
    tracing::error!(
        consumer = name,
        producer,
        after,
        reason,
        "the producer's events no longer continue this consumer's cursor; no event is applied \
         until an operator resets it"
    );
    if let Err(err) = db.set_halted(name, Some(&reason)).await {
        tracing::warn!(consumer = name, error = %err, "recording the halt failed");
    }
    Ended::Halted
}

enum Applied {
    /// Applied now, or before (the cursor was already past it).
    Done,
    /// Not applied: the cursor follows this other epoch.
    OtherEpoch(String),
}

async fn apply_one<C: Consumer>(
    db: &Db,
    consumer: &C,
    sequence: i64,
    record_epoch: Option<&str>,
    event: C::Event,
) -> Result<Applied, StoreError> {
    let mut tx = db.begin().await?;
    if !tx.advance_cursor(consumer.name(), sequence).await? {
        // Applied before (a replay after reconnecting, or another replica got there first).
        tx.rollback().await?;
        return Ok(Applied::Done);
    }
    if let Some(epoch) = record_epoch {
        let followed = tx.follow_epoch(consumer.name(), epoch).await?;
        if followed != epoch {
            tx.rollback().await?;
            return Ok(Applied::OtherEpoch(followed));
        }
    }
    consumer.apply(&mut tx, event).await?;
    tx.commit().await?;
    Ok(Applied::Done)
}
