//! Following another service's `WatchEvents` with an exactly-once effect.

use std::{fmt::Display, future::Future, marker::PhantomData, time::Duration};

use futures::{FutureExt, Stream, StreamExt};
use prost::{Message, bytes::Buf};
use tokio::sync::watch;
use tonic::{
    Status, Streaming,
    client::{Grpc, GrpcService},
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{Body, Bytes, GrpcMethod, StdError, http::uri::PathAndQuery},
};

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
/// // The cursor commits with the effects; wait (bounded) until both are in.
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

    /// Whether `event` has an effect here. Events that have none are not applied: a batch of
    /// only those opens no transaction, and the cursor passes them in memory, written with
    /// the next applied batch or after [`IDLE_CURSOR_WRITE`] (a restart before that replays
    /// them, harmlessly). By default every event is applied.
    fn wants(&self, event: &Self::Event) -> bool {
        let _ = event;
        true
    }

    /// Applies one event's effect inside `tx`, which also advances the cursor past it (and
    /// may hold other events of the same batch), so the effect and the cursor commit
    /// together or not at all. Events the consumer does not care about: return `Ok(())`
    /// (and say so in [`Consumer::wants`], which saves their transaction).
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;

    /// Applies the wanted events of one batch, in order, inside `tx`; on failure, the index
    /// of the event that failed (or of the first whose effect it cannot tell apart), which
    /// the loop then applies alone. By default [`Consumer::apply`] one after the other; a
    /// consumer that can write a batch in fewer statements overrides it.
    fn apply_all<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: Vec<Self::Event>,
    ) -> impl Future<Output = Result<(), (usize, StoreError)>> + Send + 'a {
        async move {
            for (index, event) in events.into_iter().enumerate() {
                self.apply(tx, event).await.map_err(|err| (index, err))?;
            }
            Ok(())
        }
    }
}

/// How long the cursor may stay behind events that had no effect ([`Consumer::wants`])
/// before it is written on its own. Bounds what a restart replays and how stale the
/// position `tessera cursor` shows may be, at one small write per interval under load.
pub const IDLE_CURSOR_WRITE: Duration = Duration::from_millis(200);

/// What a service writes to follow another service's `WatchEvents`: how to apply one event.
///
/// [`follow`] does the rest (subscribing, the cursor, batching, retries, halting). The
/// producer's `WatchEventsResponse` must carry `sequence` as field 1 and `epoch` as field 15,
/// and its request `after_sequence` as field 1, as every Tessera contract does; the loop reads
/// them without knowing the message type.
///
/// A consumer of posts' events that counts the posts it has seen, fed by an in-process
/// PostService (in a service, the channel is `Clients::channel("posts")`):
///
/// ```
/// use tessera::posts::v1::{
///     PostCreated, WatchEventsResponse, post_service_server::{PostServiceServer, SERVICE_NAME},
///     watch_events_response::Event,
/// };
/// use tessera_store::{Apply, Db, Migration, StoreError, Tx};
///
/// struct PostCount;
///
/// impl Apply for PostCount {
///     const PRODUCER: &'static str = SERVICE_NAME;
///     const CURSOR: &'static str = "posts-events";
///     type Event = WatchEventsResponse;
///
///     // Only creations count here: the others cost no transaction.
///     fn wants(&self, event: &WatchEventsResponse) -> bool {
///         matches!(event.event, Some(Event::PostCreated(_)))
///     }
///
///     async fn apply(&self, tx: &mut Tx, _event: WatchEventsResponse) -> Result<(), StoreError> {
///         sqlx::query("UPDATE seen SET n = n + 1").execute(&mut **tx).await?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// const MIGRATIONS: &[Migration] = &[Migration::portable(
///     "seen",
///     "CREATE TABLE seen (n BIGINT NOT NULL); INSERT INTO seen (n) VALUES (0)",
/// )];
/// let dir = tempfile::tempdir()?;
/// let db = Db::open(dir.path().join("c.db").to_str().unwrap(), MIGRATIONS).await?;
///
/// // PostService's WatchEvents serving two creations (tessera-testing's fake).
/// let posts = std::sync::Arc::new(tessera_testing::fakes::FakePosts::default());
/// for sequence in [1, 2] {
///     posts.log.push(WatchEventsResponse {
///         sequence,
///         event: Some(Event::PostCreated(PostCreated::default())),
///         ..Default::default()
///     });
/// }
/// let (stop, shutdown) = tokio::sync::watch::channel(false);
/// let channel = PostServiceServer::from_arc(posts);
/// let consumer = tokio::spawn(tessera_store::follow(db.clone(), channel, PostCount, shutdown));
///
/// // Each event applied once, its effect and the cursor committed together.
/// while db.cursor("posts-events").await? < 2 {
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// let (n,): (i64,) = sqlx::query_as("SELECT n FROM seen").fetch_one(db.pool()).await?;
/// assert_eq!(n, 2);
/// stop.send(true)?;
/// consumer.await?;
/// # Ok(()) }
/// ```
pub trait Apply: Send + Sync + 'static {
    /// The producer's gRPC service (its generated `SERVICE_NAME`, e.g.
    /// `"tessera.posts.v1.PostService"`).
    const PRODUCER: &'static str;
    /// The cursor's name in this service's database (e.g. `"posts-events"`); one per consumer.
    const CURSOR: &'static str;
    /// The producer's `WatchEventsResponse`.
    type Event: Message + Default + Send + 'static;

    /// Whether `event` has an effect here; those that have none cost no transaction (see
    /// [`Consumer::wants`]). By default every event is applied.
    fn wants(&self, event: &Self::Event) -> bool {
        let _ = event;
        true
    }

    /// The kinds of event this consumer applies, one message per kind with that event set:
    /// the producer then sends only those (`WatchEventsRequest.event_fields`), and progress
    /// markers in place of the runs of others, so the events it has no use for are not even
    /// encoded, sent and decoded. An event of another kind is never applied, whatever
    /// [`Apply::wants`] says. Empty (the default): every kind is sent, and `wants` decides.
    fn kinds(&self) -> Vec<Self::Event> {
        Vec::new()
    }

    /// Applies one event's effect inside `tx`, which also advances the cursor past it (and
    /// may hold other events of the same batch), so the effect commits together with the
    /// cursor or not at all. Events the service does not care about: return `Ok(())` (and
    /// say so in [`Apply::wants`]).
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;

    /// Applies a batch's wanted events in order (see [`Consumer::apply_all`]); by default
    /// [`Apply::apply`] one after the other.
    fn apply_all<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: Vec<Self::Event>,
    ) -> impl Future<Output = Result<(), (usize, StoreError)>> + Send + 'a {
        async move {
            for (index, event) in events.into_iter().enumerate() {
                self.apply(tx, event).await.map_err(|err| (index, err))?;
            }
            Ok(())
        }
    }
}

/// Follows `A::PRODUCER`'s `WatchEvents` over `channel` until `shutdown` turns `true`,
/// applying each event with `handler` exactly once (see [`run_consumer`] for the loop; the
/// example on [`Apply`] runs one to the end).
pub async fn follow<A, T>(db: Db, channel: T, handler: A, shutdown: watch::Receiver<bool>)
where
    A: Apply,
    T: WatchChannel,
{
    let event_fields = tessera_mesh::events::event_fields(handler.kinds());
    let producer = Producer {
        channel,
        handler,
        event_fields,
    };
    run_consumer(db, producer, shutdown).await;
}

/// A gRPC channel [`follow`] can call `WatchEvents` over (e.g. `tessera_client::Channel`).
pub trait WatchChannel:
    GrpcService<
        tonic::body::Body,
        Error: Into<StdError>,
        ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> WatchChannel for T where
    T: GrpcService<
            tonic::body::Body,
            Error: Into<StdError>,
            ResponseBody: Body<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// One producer's `WatchEvents` and the service's [`Apply`]: the [`Consumer`] every service's
/// event follower is.
struct Producer<T, A> {
    channel: T,
    handler: A,
    /// The kinds asked for ([`Apply::kinds`]); empty for all.
    event_fields: Vec<i32>,
}

/// An event as it arrives: the envelope fields the loop needs, and the event itself.
struct Watched<E> {
    sequence: i64,
    epoch: String,
    /// The event's field number in the `event` oneof; `None` for a progress marker.
    field: Option<i32>,
    event: E,
}

/// The fields of every `WatchEventsResponse` the loop reads (others are skipped).
#[derive(Clone, PartialEq, Message)]
struct Envelope {
    #[prost(int64, tag = "1")]
    sequence: i64,
    #[prost(string, tag = "15")]
    epoch: String,
}

/// Every `WatchEventsRequest`.
#[derive(Clone, PartialEq, Message)]
struct WatchRequest {
    #[prost(int64, tag = "1")]
    after_sequence: i64,
    #[prost(int32, repeated, tag = "3")]
    event_fields: Vec<i32>,
}

impl<T, A> Consumer for Producer<T, A>
where
    A: Apply,
    T: WatchChannel,
{
    type Event = Watched<A::Event>;
    type Error = Status;
    type Stream = Streaming<Watched<A::Event>>;

    fn name(&self) -> &str {
        A::CURSOR
    }

    async fn open(&self, after_sequence: i64) -> Result<Self::Stream, Status> {
        let mut grpc = Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|err| {
            Status::unavailable(format!("{} is not ready: {}", A::PRODUCER, err.into()))
        })?;
        let path = PathAndQuery::try_from(format!("/{}/WatchEvents", A::PRODUCER))
            .map_err(|err| Status::internal(format!("bad producer name {}: {err}", A::PRODUCER)))?;
        let mut request = tonic::Request::new(WatchRequest {
            after_sequence,
            event_fields: self.event_fields.clone(),
        });
        request
            .extensions_mut()
            .insert(GrpcMethod::new(A::PRODUCER, "WatchEvents"));
        let codec = WatchCodec::<A::Event>(PhantomData);
        Ok(grpc
            .server_streaming(request, path, codec)
            .await?
            .into_inner())
    }

    fn sequence(&self, event: &Self::Event) -> i64 {
        event.sequence
    }

    fn epoch<'e>(&self, event: &'e Self::Event) -> Option<&'e str> {
        Some(&event.epoch)
    }

    fn wants(&self, event: &Self::Event) -> bool {
        // A progress marker only moves the cursor; a producer that does not know
        // `event_fields` (an older version) sends every kind, and they are passed here.
        event
            .field
            .is_some_and(|field| self.event_fields.is_empty() || self.event_fields.contains(&field))
            && self.handler.wants(&event.event)
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a {
        self.handler.apply(tx, event.event)
    }

    fn apply_all<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: Vec<Self::Event>,
    ) -> impl Future<Output = Result<(), (usize, StoreError)>> + Send + 'a {
        let events = events.into_iter().map(|watched| watched.event).collect();
        self.handler.apply_all(tx, events)
    }
}

/// Encodes [`WatchRequest`]; decodes each message twice, as the [`Envelope`] and as `E`
/// (the envelope skips the rest cheaply, and the loop stays free of the message types).
struct WatchCodec<E>(PhantomData<fn() -> E>);

impl<E: Message + Default + Send + 'static> Codec for WatchCodec<E> {
    type Encode = WatchRequest;
    type Decode = Watched<E>;
    type Encoder = WatchCodec<WatchRequest>;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        WatchCodec(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WatchCodec(PhantomData)
    }
}

impl Encoder for WatchCodec<WatchRequest> {
    type Item = WatchRequest;
    type Error = Status;

    fn encode(&mut self, item: WatchRequest, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|err| Status::internal(format!("encoding WatchEventsRequest: {err}")))
    }
}

impl<E: Message + Default + Send + 'static> Decoder for WatchCodec<E> {
    type Item = Watched<E>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Watched<E>>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        let corrupt =
            |err: prost::DecodeError| Status::internal(format!("undecodable event: {err}"));
        let envelope = Envelope::decode(bytes.clone()).map_err(corrupt)?;
        let field = tessera_mesh::events::event_field(&bytes);
        let event = E::decode(bytes).map_err(corrupt)?;
        Ok(Some(Watched {
            sequence: envelope.sequence,
            epoch: envelope.epoch,
            field,
            event,
        }))
    }
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
/// Reads the cursor, opens the stream after it, and applies the events in batches: one
/// event is awaited, then whatever else has already arrived is taken too (up to
/// [`MAX_BATCH`], never waiting for more), and the batch is applied in one transaction that
/// locks the cursor, skips the events it is already past, calls [`Consumer::apply_all`] for the
/// rest and moves the cursor to the last, then commits. So a lone event is applied as soon
/// as it arrives, a backlog a batch per commit, and a crash mid-batch leaves neither effects
/// nor cursor behind: the whole batch is applied again, once. A failure to connect, a stream
/// error or end, or a failed apply is logged, and the loop reconnects from the committed
/// cursor after a backoff. A stream the upstream ends with UNAVAILABLE (a draining replica)
/// is reopened at once. An event whose apply failed is applied alone afterwards (the events
/// before it commit, the cursor stops right before it); if it always fails it is retried
/// forever (and logged each time); it never gets skipped silently.
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
    let mut poison = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let ended = tokio::select! {
            ended = follow_once(&db, &consumer, &mut backoff, &mut poison) => ended,
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

async fn follow_once<C: Consumer>(
    db: &Db,
    consumer: &C,
    backoff: &mut Duration,
    poison: &mut Option<i64>,
) -> Ended {
    let name = consumer.name();
    let (after, followed, halted) = match db.cursor_state(name).await {
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
    let mut cursor = Cursor {
        after,
        followed,
        halted,
        poison,
        passed: None,
    };
    let mut stream = std::pin::pin!(stream);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // Waits for one event, then takes whatever else has already arrived (up to the cap)
        // without waiting: a lone event is applied as soon as it comes, a backlog in batches.
        let mut next = match cursor.passed {
            // Events were passed without a write: if the stream goes quiet, write the cursor.
            Some((_, since)) => {
                let quiet = IDLE_CURSOR_WRITE.saturating_sub(since.elapsed());
                match tokio::time::timeout(quiet, stream.next()).await {
                    Ok(item) => item,
                    Err(_) => {
                        cursor.write_passed(db, consumer).await;
                        continue;
                    }
                }
            }
            None => stream.next().await,
        };
        let mut failed = None;
        let mut ended = false;
        loop {
            match next {
                Some(Ok(event)) => batch.push(event),
                Some(Err(err)) => failed = Some(err),
                None => ended = true,
            }
            if failed.is_some() || ended || batch.len() == MAX_BATCH {
                break;
            }
            match stream.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if !batch.is_empty() {
            if let Some(ended) = cursor.apply(db, consumer, &mut batch).await {
                return ended;
            }
            *backoff = FIRST_BACKOFF;
        }
        if failed.is_some() || ended {
            // The next connection starts from the written cursor: save it the replay.
            cursor.write_passed(db, consumer).await;
        }
        match failed {
            Some(err) if consumer.diverged(&err) => {
                return halt(db, consumer, cursor.after, describe(&err)).await;
            }
            Some(err) if ended_by_drain(&err) => {
                tracing::info!(consumer = name, error = %err, "the upstream ended the event stream; reconnecting at once");
                return Ended::Drained;
            }
            Some(err) => {
                tracing::warn!(consumer = name, error = %err, "the event stream failed");
                return Ended::Retry;
            }
            None if ended => {
                tracing::info!(consumer = name, "the event stream ended; reconnecting");
                return Ended::Retry;
            }
            None => {}
        }
    }
}

/// The events are applied in batches of at most this many, each in one transaction. A batch
/// is what has already arrived, so it only grows while the consumer is behind.
pub const MAX_BATCH: usize = 256;

/// What one connection knows of the cursor.
struct Cursor<'p> {
    /// The committed position when the stream was opened (named in halts).
    after: i64,
    /// The producer epoch it follows, once known.
    followed: Option<String>,
    /// It was halted when the stream was opened.
    halted: bool,
    /// The sequence of the last event whose apply failed (kept across connections).
    poison: &'p mut Option<i64>,
    /// The last event passed without a transaction (none of its batch was wanted) and not yet
    /// written to the cursor, with when the first such event was passed.
    passed: Option<(i64, std::time::Instant)>,
}

impl Cursor<'_> {
    /// Applies `batch` (emptying it); `Some` when the connection must end.
    async fn apply<C: Consumer>(
        &mut self,
        db: &Db,
        consumer: &C,
        batch: &mut Vec<C::Event>,
    ) -> Option<Ended> {
        let name = consumer.name();
        let mut events: Vec<(i64, C::Event)> = batch
            .drain(..)
            .map(|event| (consumer.sequence(&event), event))
            .collect();
        let epoch_of = |event: &C::Event| {
            consumer
                .epoch(event)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
        };
        // The epoch the batch must carry: the cursor's, or the first event's if it has none.
        let expected = self
            .followed
            .clone()
            .or_else(|| events.first().and_then(|(_, e)| epoch_of(e)));
        // An event from another epoch ends the batch before it; what precedes it is applied,
        // then the consumer halts.
        let mut stray = None;
        if let Some(known) = &expected
            && let Some(at) = events
                .iter()
                .position(|(_, e)| epoch_of(e).is_some_and(|epoch| &epoch != known))
        {
            let (sequence, event) = &events[at];
            let seen = epoch_of(event).unwrap_or_default();
            stray = Some(epoch_changed(consumer, known, &seen, *sequence));
            events.truncate(at);
        }
        // An event that failed before is applied alone, so the events before it commit and the
        // cursor stops right before it, as with one transaction per event.
        let mut chunks = vec![events];
        if let Some(poison) = *self.poison
            && let Some(at) = chunks[0]
                .iter()
                .position(|(sequence, _)| *sequence == poison)
        {
            let mut rest = chunks[0].split_off(at);
            let after_poison = rest.split_off(1);
            chunks.extend([rest, after_poison]);
        }
        for mut chunk in chunks {
            let Some(&(last, _)) = chunk.last() else {
                continue;
            };
            chunk.retain(|(_, event)| consumer.wants(event));
            // A chunk of events without effect needs no transaction once the epoch is known
            // and no halt is to be cleared: the cursor passes it in memory.
            if chunk.is_empty() && self.followed.is_some() && !self.halted {
                let since = self.passed.map_or_else(std::time::Instant::now, |(_, t)| t);
                self.passed = Some((last, since));
                continue;
            }
            // The first epoch seen is recorded with the batch (or, if another replica
            // recorded a different one meanwhile, the batch is refused).
            let record = expected.clone().filter(|_| self.followed.is_none());
            match apply_batch(db, consumer, record.as_deref(), chunk, last).await {
                Ok(Applied::Done) => self.passed = None,
                Ok(Applied::OtherEpoch(known)) => {
                    let seen = record.unwrap_or_default();
                    let reason = epoch_changed(consumer, &known, &seen, last);
                    return Some(halt(db, consumer, self.after, reason).await);
                }
                Err((sequence, err)) => {
                    *self.poison = Some(sequence);
                    tracing::error!(consumer = name, sequence, error = %err, "applying an event failed");
                    return Some(Ended::Retry);
                }
            }
            if record.is_some() {
                self.followed = record;
            }
            if std::mem::take(&mut self.halted) {
                // The producer continues the cursor again (e.g. its database was put back).
                if let Err(err) = db.set_halted(name, None).await {
                    tracing::warn!(consumer = name, error = %err, "clearing the halt failed");
                }
                tracing::info!(
                    consumer = name,
                    sequence = last,
                    "the consumer follows its producer again"
                );
            }
        }
        // Under a steady stream of events without effect the stream never goes quiet.
        if self
            .passed
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_CURSOR_WRITE)
        {
            self.write_passed(db, consumer).await;
        }
        match stray {
            Some(reason) => Some(halt(db, consumer, self.after, reason).await),
            None => None,
        }
    }

    /// Writes the cursor past the events passed without a transaction. A failure is logged
    /// and retried with the next batch: those events only get replayed.
    async fn write_passed<C: Consumer>(&mut self, db: &Db, consumer: &C) {
        let Some((through, _)) = self.passed else {
            return;
        };
        match apply_batch(db, consumer, None, Vec::new(), through).await {
            Ok(_) => self.passed = None,
            Err((_, err)) => {
                tracing::warn!(consumer = consumer.name(), error = %err, "writing the cursor failed");
                self.passed = Some((through, std::time::Instant::now()));
            }
        }
    }
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

/// Applies `events` (in increasing sequence order) in one transaction that also moves the
/// cursor to `through` (the batch's last sequence: events without effect were left out);
/// those the cursor is already past (a replay after reconnecting, or another replica got
/// there first) are skipped, and the cursor never moves back. A failure names the sequence of
/// the event whose apply failed (or the last one, when the transaction itself failed).
async fn apply_batch<C: Consumer>(
    db: &Db,
    consumer: &C,
    record_epoch: Option<&str>,
    events: Vec<(i64, C::Event)>,
    through: i64,
) -> Result<Applied, (i64, StoreError)> {
    let name = consumer.name();
    let last = through;
    let at_last = |err| (last, err);
    let mut tx = db.begin().await.map_err(at_last)?;
    // A batch is many writes in one transaction already; waiting for the writers queued
    // behind it to share its COMMIT would only hold up its consumer's next read.
    tx.hand_over = false;
    let mut position = lock_cursor(&mut tx, name).await.map_err(at_last)?;
    let start = position;
    if let Some(epoch) = record_epoch {
        let followed = tx.follow_epoch(name, epoch).await.map_err(at_last)?;
        if followed != epoch {
            tx.rollback().await.map_err(at_last)?;
            return Ok(Applied::OtherEpoch(followed));
        }
    }
    let (sequences, fresh): (Vec<i64>, Vec<C::Event>) = events
        .into_iter()
        .filter(|(sequence, _)| *sequence > position)
        .unzip();
    if let Some(&newest) = sequences.last() {
        consumer
            .apply_all(&mut tx, fresh)
            .await
            .map_err(|(index, err)| (sequences.get(index).copied().unwrap_or(newest), err))?;
        position = newest;
    }
    position = position.max(through);
    if position == start {
        // All applied before.
        tx.rollback().await.map_err(at_last)?;
        return Ok(Applied::Done);
    }
    tx.set_cursor(name, position).await.map_err(at_last)?;
    tx.commit().await.map_err(at_last)?;
    Ok(Applied::Done)
}

/// Consumer `name`'s cursor position, created at 0 if missing, its row locked until `tx`
/// ends (on PostgreSQL; SQLite's write transaction already excludes other writers), so
/// replicas applying the same events take turns and the later one skips what is done.
async fn lock_cursor(tx: &mut Tx, name: &str) -> Result<i64, StoreError> {
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO tessera_cursors (name, position) VALUES ($1, 0) \
         ON CONFLICT (name) DO UPDATE SET position = tessera_cursors.position \
         RETURNING position",
    )
    .bind(name)
    .fetch_one(&mut **tx)
    .await?;
    Ok(position)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    };

    use futures::stream::{self, Iter};
    use tokio::sync::Notify;

    use super::*;
    use crate::{Migration, testing};

    const MIGRATIONS: &[Migration] = &[Migration::portable(
        "applied",
        // No key on purpose: an event applied twice shows as two rows.
        "CREATE TABLE applied (sequence BIGINT NOT NULL)",
    )];

    /// A backlog of `events` sequences, all there at once (so they arrive as batches). Event
    /// `stall_at` parks until `release` is notified (a crash is the task being aborted then);
    /// event `fail_at` fails while `failing` is set.
    struct Backlog {
        events: i64,
        stall_at: i64,
        reached: Arc<Notify>,
        release: Arc<Notify>,
        fail_at: i64,
        failing: Arc<AtomicBool>,
        attempts: Arc<AtomicI64>,
    }

    impl Backlog {
        fn new(events: i64) -> Self {
            Self {
                events,
                stall_at: 0,
                reached: Arc::new(Notify::new()),
                release: Arc::new(Notify::new()),
                fail_at: 0,
                failing: Arc::new(AtomicBool::new(false)),
                attempts: Arc::new(AtomicI64::new(0)),
            }
        }
    }

    impl Consumer for Backlog {
        type Event = i64;
        type Error = String;
        type Stream = Iter<std::vec::IntoIter<Result<i64, String>>>;

        fn name(&self) -> &str {
            "backlog-events"
        }

        async fn open(&self, after: i64) -> Result<Self::Stream, String> {
            let rest: Vec<_> = (after + 1..=self.events).map(Ok).collect();
            Ok(stream::iter(rest))
        }

        fn sequence(&self, event: &i64) -> i64 {
            *event
        }

        async fn apply(&self, tx: &mut Tx, event: i64) -> Result<(), StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            sqlx::query("INSERT INTO applied (sequence) VALUES ($1)")
                .bind(event)
                .execute(&mut **tx)
                .await?;
            if event == self.stall_at {
                self.reached.notify_one();
                self.release.notified().await;
            }
            if event == self.fail_at && self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Busy(Duration::ZERO));
            }
            Ok(())
        }
    }

    async fn dbs(label: &str) -> Vec<(String, Db, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.db");
        let sqlite = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
        let mut out = vec![("sqlite".to_owned(), sqlite, Some(dir))];
        if let Some(db) = testing::postgres(label, MIGRATIONS).await.unwrap() {
            out.push(("postgres".to_owned(), db, None));
        }
        out
    }

    /// Each sequence's row count, in order.
    async fn counts(db: &Db) -> Vec<(i64, i64)> {
        sqlx::query_as("SELECT sequence, COUNT(*) FROM applied GROUP BY sequence ORDER BY sequence")
            .fetch_all(db.pool())
            .await
            .unwrap()
    }

    async fn caught_up(db: &Db, position: i64) {
        tessera_testing::eventually!(
            db.cursor("backlog-events").await.unwrap() >= position,
            "the cursor reaches {position}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_mid_batch_replays_the_whole_batch_once() {
        for (name, db, _dir) in dbs("consumer_crash").await {
            // 600 events: batches of MAX_BATCH; the crash is in the middle of the second.
            let mut backlog = Backlog::new(600);
            backlog.stall_at = MAX_BATCH as i64 + 100;
            let (reached, release) = (backlog.reached.clone(), backlog.release.clone());
            let (_stop, shutdown) = watch::channel(false);
            let running = tokio::spawn(run_consumer(db.clone(), backlog, shutdown.clone()));
            tokio::time::timeout(Duration::from_secs(30), reached.notified())
                .await
                .expect("the consumer reaches the stalling event");
            // The process dies with the batch's transaction open.
            running.abort();
            let _ = running.await;
            let committed = db.cursor("backlog-events").await.unwrap();
            assert_eq!(
                committed, MAX_BATCH as i64,
                "{name}: the first batch committed whole"
            );
            let rows = counts(&db).await;
            assert_eq!(
                rows.len(),
                MAX_BATCH,
                "{name}: nothing of the crashed batch is kept"
            );
            assert!(rows.iter().all(|(_, n)| *n == 1), "{name}: {rows:?}");
            drop(release);

            // The restarted consumer applies the rest, each event once.
            let running = tokio::spawn(run_consumer(db.clone(), Backlog::new(600), shutdown));
            caught_up(&db, 600).await;
            running.abort();
            let rows = counts(&db).await;
            let expected: Vec<(i64, i64)> = (1..=600).map(|s| (s, 1)).collect();
            assert_eq!(rows, expected, "{name}: every event applied exactly once");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_event_stops_the_cursor_right_before_it() {
        for (name, db, _dir) in dbs("consumer_poison").await {
            let mut backlog = Backlog::new(300);
            backlog.fail_at = 120;
            backlog.failing.store(true, Ordering::SeqCst);
            let (failing, attempts) = (backlog.failing.clone(), backlog.attempts.clone());
            let (stop, shutdown) = watch::channel(false);
            let running = tokio::spawn(run_consumer(db.clone(), backlog, shutdown));
            // The events before the failing one commit although they were in its batch.
            caught_up(&db, 119).await;
            let before = attempts.load(Ordering::SeqCst);
            tessera_testing::eventually!(
                attempts.load(Ordering::SeqCst) > before,
                "the failing event is retried"
            );
            assert_eq!(db.cursor("backlog-events").await.unwrap(), 119, "{name}");
            // Once it applies, the consumer goes on, each event once.
            failing.store(false, Ordering::SeqCst);
            caught_up(&db, 300).await;
            stop.send_replace(true);
            running.await.unwrap();
            let rows = counts(&db).await;
            let expected: Vec<(i64, i64)> = (1..=300).map(|s| (s, 1)).collect();
            assert_eq!(rows, expected, "{name}");
        }
    }

    /// A stream of `events` sequences that stays open afterwards, of which only every tenth
    /// has an effect.
    struct Sparse {
        events: i64,
        applied: Arc<AtomicI64>,
    }

    impl Consumer for Sparse {
        type Event = i64;
        type Error = String;
        type Stream = stream::Chain<
            Iter<std::vec::IntoIter<Result<i64, String>>>,
            stream::Pending<Result<i64, String>>,
        >;

        fn name(&self) -> &str {
            "backlog-events"
        }

        async fn open(&self, after: i64) -> Result<Self::Stream, String> {
            let rest: Vec<_> = (after + 1..=self.events).map(Ok).collect();
            Ok(stream::iter(rest).chain(stream::pending()))
        }

        fn sequence(&self, event: &i64) -> i64 {
            *event
        }

        fn epoch<'e>(&self, _: &'e i64) -> Option<&'e str> {
            Some("e1")
        }

        fn wants(&self, event: &i64) -> bool {
            event % 10 == 0
        }

        async fn apply(&self, tx: &mut Tx, event: i64) -> Result<(), StoreError> {
            self.applied.fetch_add(1, Ordering::SeqCst);
            sqlx::query("INSERT INTO applied (sequence) VALUES ($1)")
                .bind(event)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_without_effect_are_passed_and_the_cursor_still_gets_there() {
        for (name, db, _dir) in dbs("consumer_sparse").await {
            let applied = Arc::new(AtomicI64::new(0));
            let sparse = Sparse {
                events: 1005,
                applied: applied.clone(),
            };
            let (_stop, shutdown) = watch::channel(false);
            let running = tokio::spawn(run_consumer(db.clone(), sparse, shutdown));
            // 1001..=1005 have no effect and nothing follows them: the idle write moves the
            // cursor past them although the stream stays open.
            caught_up(&db, 1005).await;
            assert_eq!(db.cursor("backlog-events").await.unwrap(), 1005, "{name}");
            running.abort();
            let _ = running.await;
            assert_eq!(
                applied.load(Ordering::SeqCst),
                100,
                "{name}: only the wanted"
            );
            let rows = counts(&db).await;
            let expected: Vec<(i64, i64)> = (1..=100).map(|s| (s * 10, 1)).collect();
            assert_eq!(rows, expected, "{name}");
            assert_eq!(
                db.cursor_state("backlog-events")
                    .await
                    .unwrap()
                    .epoch
                    .as_deref(),
                Some("e1"),
                "{name}: the epoch is recorded with the first batch"
            );
        }
    }
}
