//! The outbox, both halves: a service appends its events in the transaction that makes the
//! change ([`Tx::append_event`], or [`append`] for its `WatchEventsResponse`), and other
//! services read them back in order ([`Db::events`], or [`stream`] as the body of its
//! `WatchEvents` handler).
//!
//! The payload convention lives here, both ways: a service appends its `WatchEventsResponse`
//! with only the `event` oneof set; `WatchEvents` streams those messages back with `sequence`,
//! `create_time` and the outbox's epoch filled in from the stored [`Event`].

use std::{collections::VecDeque, pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use prost::Message as _;
use prost_types::Timestamp;
use sqlx::Row;
use tessera_mesh::errors::{error_chain, internal, invalid_field};
use tokio::sync::watch;
use tonic::Status;

use crate::{
    db::{Backend, Db, script},
    error::{Result, StoreError},
    now_micros, timestamp,
    tx::Tx,
};

/// One outbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Strictly increasing; the cursor a consumer resumes from.
    pub sequence: i64,
    /// When the event was appended, microseconds since the Unix epoch.
    pub create_time: i64,
    /// What the service appended (by convention, its encoded `WatchEventsResponse` with only
    /// the `event` oneof set).
    pub payload: Vec<u8>,
}

/// How many events one outbox read returns at most while a stream catches up.
pub const EVENT_BATCH: i64 = 256;

/// How many appends apart the outbox is pruned (in the appending transaction).
pub const PRUNE_EVERY: i64 = 256;

/// The most outbox rows one prune looks at (and deletes).
const PRUNE_WINDOW: i64 = 4 * PRUNE_EVERY;

/// The first event from `$1` to `$2` still within the retention (appended at `$3` or later).
/// Both bounds on the sequence, and the first match ends it: with two upper bounds and no lower
/// one, SQLite ranged over one of them and read the whole outbox below the newest event on every
/// prune (4 ms of CPU every 256 appends with 28k events kept, holding the write turn).
const FIRST_KEPT: &str = "SELECT sequence FROM tessera_outbox \
     WHERE sequence >= $1 AND sequence <= $2 AND create_time >= $3 ORDER BY sequence LIMIT 1";

/// Deletes the events from `$1` up to, not including, `$2`.
const DELETE_PREFIX: &str = "DELETE FROM tessera_outbox WHERE sequence >= $1 AND sequence < $2";

/// The default outbox retention: a week, far longer than a consumer should be down.
pub const DEFAULT_OUTBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Tx {
    /// Appends an event to the outbox when this transaction commits, after its other
    /// statements: what [`Tx::append_event`] does, without the sequence (known once
    /// committed). The events are appended just before the COMMIT.
    pub fn append_on_commit(&mut self, payload: Vec<u8>) {
        self.on_commit.push(payload);
    }

    /// Appends an event to the outbox in this transaction and returns its sequence.
    ///
    /// Sequences are strictly increasing, and commit in sequence order: the append takes
    /// the outbox's write lock until the transaction ends (PostgreSQL `LOCK TABLE ... IN
    /// EXCLUSIVE MODE`; SQLite's write lock is already held). So append events as the LAST
    /// step of a transaction, after its other writes, to keep the lock short and to avoid
    /// lock-order deadlocks.
    pub async fn append_event(&mut self, payload: &[u8]) -> Result<i64> {
        if self.backend() == Backend::Postgres {
            script(&mut **self, "LOCK TABLE tessera_outbox IN EXCLUSIVE MODE").await?;
        }
        let now = now_micros();
        // The next sequence as a subquery in VALUES, not `INSERT .. SELECT .. FROM` the same
        // table, which SQLite runs through a temporary table: 20 µs of CPU more per append
        // (`cargo run --release -p tessera-posts --example write_cost`, 90-100 against 112-126).
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO tessera_outbox (sequence, create_time, payload) VALUES \
             ((SELECT COALESCE(MAX(sequence), 0) + 1 FROM tessera_outbox), $1, $2) \
             RETURNING sequence",
        )
        .bind(now)
        .bind(payload)
        .fetch_one(&mut **self)
        .await?;
        self.appended = Some(self.appended.map_or(seq, |s| s.max(seq)));
        self.events.push(Event {
            sequence: seq,
            create_time: now,
            payload: payload.to_vec(),
        });
        if seq % PRUNE_EVERY == 0 {
            self.prune(seq).await?;
        }
        Ok(seq)
    }

    /// Appends several events at once, in order, and returns their sequences: what
    /// [`Tx::append_event`] does for each, in two statements however many there are (a
    /// consumer applying a batch of events appends a batch of its own).
    pub async fn append_events(&mut self, payloads: &[Vec<u8>]) -> Result<Vec<i64>> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        if self.backend() == Backend::Postgres {
            script(&mut **self, "LOCK TABLE tessera_outbox IN EXCLUSIVE MODE").await?;
        }
        // Under the outbox lock: nobody else appends between the read and the insert.
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) FROM tessera_outbox")
            .fetch_one(&mut **self)
            .await?;
        let now = now_micros();
        let mut sequences = Vec::with_capacity(payloads.len());
        for (chunk_index, chunk) in payloads.chunks(APPEND_CHUNK).enumerate() {
            let first = last + (chunk_index * APPEND_CHUNK) as i64 + 1;
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
                .collect();
            let sql = format!(
                "INSERT INTO tessera_outbox (sequence, create_time, payload) VALUES {}",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for (i, payload) in chunk.iter().enumerate() {
                let seq = first + i as i64;
                query = query.bind(seq).bind(now).bind(payload.as_slice());
                sequences.push(seq);
            }
            query.execute(&mut **self).await?;
        }
        self.events.extend(
            sequences
                .iter()
                .zip(payloads)
                .map(|(&sequence, payload)| Event {
                    sequence,
                    create_time: now,
                    payload: payload.clone(),
                }),
        );
        let newest = last + payloads.len() as i64;
        self.appended = Some(self.appended.map_or(newest, |s| s.max(newest)));
        if newest / PRUNE_EVERY > last / PRUNE_EVERY {
            self.prune(newest).await?;
        }
        Ok(sequences)
    }

    /// Deletes what the retention no longer keeps, up to `seq` (just appended, so kept).
    pub(crate) async fn prune(&mut self, seq: i64) -> Result<()> {
        let Some(retention) = self.db.inner.outbox_retention else {
            return Ok(());
        };
        // Under the outbox lock this transaction already holds. Only a prefix goes: from
        // the oldest event up to the first one still within the retention (append times
        // follow sequences only as well as the replicas' clocks agree, and a hole in the
        // middle would read as pruned). At most PRUNE_WINDOW rows are looked at, more
        // than are appended between prunes, so the outbox shrinks back when it is over.
        // The row just appended always stays, so the next sequence still follows it.
        let cutoff = now_micros().saturating_sub(retention.as_micros() as i64);
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(sequence) FROM tessera_outbox")
            .fetch_one(&mut **self)
            .await?;
        let Some(oldest) = oldest else {
            return Ok(());
        };
        let Some(last) = prune_window(oldest, seq) else {
            return Ok(());
        };
        let first_kept: Option<i64> = sqlx::query_scalar(FIRST_KEPT)
            .bind(oldest)
            .bind(last)
            .bind(cutoff)
            .fetch_optional(&mut **self)
            .await?;
        let end = first_kept.unwrap_or(last + 1);
        if end <= oldest {
            return Ok(());
        }
        let pruned = sqlx::query(DELETE_PREFIX)
            .bind(oldest)
            .bind(end)
            .execute(&mut **self)
            .await?
            .rows_affected();
        if pruned > 0 {
            tracing::debug!(pruned, before = seq, "pruned the outbox");
            // The handle's recent events must not serve what a read would call pruned.
            let oldest: Option<i64> =
                sqlx::query_scalar("SELECT MIN(sequence) FROM tessera_outbox")
                    .fetch_one(&mut **self)
                    .await?;
            self.pruned_to = oldest;
        }
        Ok(())
    }
}

/// Rows per INSERT of [`Tx::append_events`]. SQLite looks a parameter's name up in a list, so
/// reading all of a statement's names costs the square of their number: the writer connection
/// does it once per statement text and keeps the answer, and each chunk size is one text.
const APPEND_CHUNK: usize = 128;

impl Db {
    /// Up to `limit` events with a sequence greater than `after`, in order.
    pub async fn read_events(&self, after: i64, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT sequence, create_time, payload FROM tessera_outbox \
             WHERE sequence > $1 ORDER BY sequence LIMIT $2",
        )
        .bind(after)
        .bind(limit.max(0))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Event {
                    sequence: row.try_get(0)?,
                    create_time: row.try_get(1)?,
                    payload: row.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The highest sequence in the outbox (0 when empty).
    pub async fn last_sequence(&self) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(sequence) FROM tessera_outbox")
            .fetch_one(self.pool())
            .await?;
        Ok(seq.unwrap_or(0))
    }

    /// Every event after `after`: first the backlog, in batches, then new events as they
    /// commit, forever. Commits through this `Db` (any clone) wake the stream at once; on
    /// PostgreSQL it also re-reads every [`crate::DbOptions::poll_interval`] to see other
    /// replicas' commits. No busy polling. A database error is yielded once and ends the
    /// stream (the client reconnects from its cursor), and so is [`StoreError::Pruned`] when
    /// the events after `after` are no longer kept, and [`StoreError::Ahead`] when `after` is
    /// beyond the newest event. Dropping the stream stops it.
    pub fn events(&self, after: i64) -> impl Stream<Item = Result<Event>> + Send + 'static {
        struct State {
            db: Db,
            after: i64,
            buffer: VecDeque<Event>,
            wake: watch::Receiver<i64>,
            done: bool,
            /// Whether the first read is still to come (where a cursor ahead is noticed).
            first: bool,
            /// Whether the last read returned fewer events than it could have.
            caught_up: bool,
        }
        let state = State {
            db: self.clone(),
            after,
            buffer: VecDeque::new(),
            wake: self.inner.committed.subscribe(),
            done: false,
            first: true,
            caught_up: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                if let Some(event) = st.buffer.pop_front() {
                    st.after = event.sequence;
                    return Some((Ok(event), st));
                }
                // The last read returned all there was: a commit since shows as a wake-up
                // below, so reading again now would only find nothing.
                if !std::mem::take(&mut st.caught_up) {
                    // Mark the notification seen BEFORE reading: a commit after this point
                    // either shows up in the read or wakes `changed()` below.
                    st.wake.borrow_and_update();
                    let kept = st
                        .db
                        .inner
                        .recent
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .after(st.after, EVENT_BATCH as usize);
                    let read = match kept {
                        Some(events) => Ok(events),
                        None => st.db.read_events(st.after, EVENT_BATCH).await,
                    };
                    match read {
                        // Sequences have no holes (each is the previous maximum plus one,
                        // under the outbox lock), so a jump means the events between were
                        // pruned.
                        Ok(events) if events.first().is_some_and(|e| e.sequence > st.after + 1) => {
                            st.done = true;
                            let oldest = events[0].sequence;
                            let after = st.after;
                            return Some((Err(StoreError::Pruned { after, oldest }), st));
                        }
                        Ok(events) if !events.is_empty() => {
                            st.caught_up = events.len() < EVENT_BATCH as usize;
                            st.buffer.extend(events);
                            continue;
                        }
                        Ok(_) if std::mem::take(&mut st.first) && st.after > 0 => {
                            // Nothing after the cursor: either it is up to date, or the outbox
                            // went back below it (sequences never shrink otherwise: the newest
                            // event is never pruned).
                            match st.db.last_sequence().await {
                                Ok(last) if last < st.after => {
                                    st.done = true;
                                    let after = st.after;
                                    return Some((Err(StoreError::Ahead { after, last }), st));
                                }
                                Ok(_) => {}
                                Err(err) => {
                                    st.done = true;
                                    return Some((Err(err), st));
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(err) => {
                            st.done = true;
                            return Some((Err(err), st));
                        }
                    }
                }
                let poll = st.db.inner.poll_interval;
                match st.db.inner.backend {
                    Backend::Postgres => {
                        // Either a local commit or the poll timer; both mean "read again".
                        let _ = tokio::time::timeout(poll, st.wake.changed()).await;
                    }
                    Backend::Sqlite => {
                        if st.wake.changed().await.is_err() {
                            // Every Db handle is gone: nothing can append any more.
                            return None;
                        }
                    }
                }
            }
        })
    }
}

/// How a service's events travel: its `WatchEventsResponse` (`sequence`, `create_time`,
/// `epoch` and an `event` oneof) and that oneof.
///
/// A service that emits events declares this once, in its own crate, with
/// [`watch_events!`](crate::watch_events) (the orphan rule keeps it from implementing a
/// foreign trait for the generated message itself, so the impl goes on a marker type of its
/// own), and names the marker in [`append`] and [`stream`]. The store knows no service.
pub trait WatchEvents {
    /// The service's `WatchEventsResponse`.
    type Message: prost::Message + Default + Send + 'static;
    /// The message's `event` oneof.
    type Event: Send;

    /// The message with only `event` set: what goes into the outbox.
    fn message(event: Self::Event) -> Self::Message;

    /// Fills in what the outbox assigned.
    fn stamp(message: &mut Self::Message, stamp: Stamp<'_>);
}

/// What the outbox assigns to an event, filled into the message it streams.
#[derive(Clone, Debug)]
pub struct Stamp<'a> {
    /// The event's sequence.
    pub sequence: i64,
    /// When the event was appended.
    pub create_time: Timestamp,
    /// The outbox's epoch ([`Db::epoch`]).
    pub epoch: &'a str,
}

/// Declares the events of a service whose contract has the usual `WatchEventsResponse`
/// (`sequence`, `create_time`, `epoch`, and an `event` oneof): a marker type implementing
/// [`outbox::WatchEvents`](crate::outbox::WatchEvents) for the generated package given.
///
/// ```
/// use tessera::users::v1::{UserDeleted, watch_events_response::Event};
/// use tessera_store::outbox::{Stamp, WatchEvents};
///
/// tessera_store::watch_events!(UserEvents = tessera::users::v1);
///
/// // What `outbox::append::<UserEvents>(&mut tx, event)` stores: only the oneof is set.
/// let deleted = Event::UserDeleted(UserDeleted { user_id: "u1".into() });
/// let mut message = UserEvents::message(deleted.clone());
/// assert_eq!((message.sequence, message.event.as_ref()), (0, Some(&deleted)));
///
/// // What `outbox::stream::<UserEvents>(&db, after)` fills in on the way out.
/// let create_time = tessera_store::timestamp(1_500_000);
/// UserEvents::stamp(&mut message, Stamp { sequence: 7, create_time, epoch: "e1" });
/// assert_eq!((message.sequence, message.epoch.as_str()), (7, "e1"));
/// ```
#[macro_export]
macro_rules! watch_events {
    ($(#[$attr:meta])* $vis:vis $name:ident = $($package:ident)::+) => {
        $(#[$attr])*
        #[derive(Clone, Copy, Debug)]
        $vis struct $name;

        impl $crate::outbox::WatchEvents for $name {
            type Message = $($package)::+::WatchEventsResponse;
            type Event = $($package)::+::watch_events_response::Event;

            fn message(event: Self::Event) -> Self::Message {
                Self::Message {
                    event: Some(event),
                    ..Default::default()
                }
            }

            fn stamp(message: &mut Self::Message, stamp: $crate::outbox::Stamp<'_>) {
                message.sequence = stamp.sequence;
                message.create_time = Some(stamp.create_time);
                message.epoch = stamp.epoch.to_owned();
            }
        }
    };
}

/// What a `WatchEvents` handler returns (its `WatchEventsStream`).
pub type WatchStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Appends `event` to the outbox inside `tx`, encoded as the service's message with only its
/// `event` set; returns the event's sequence. Call it as the last write of the transaction
/// (see [`Tx::append_event`]).
pub async fn append<W: WatchEvents>(tx: &mut Tx, event: W::Event) -> Result<i64> {
    tx.append_event(&W::message(event).encode_to_vec()).await
}

/// [`append`] when the transaction commits ([`Tx::append_on_commit`]): for a service's writes,
/// which need not know the sequence.
pub fn append_on_commit<W: WatchEvents>(tx: &mut Tx, event: W::Event) {
    tx.append_on_commit(W::message(event).encode_to_vec());
}

/// The body of a `WatchEvents` handler: every event after `after_sequence`, decoded as the
/// service's message and stamped with its sequence, append time and the outbox epoch; the
/// backlog first, then new events as they commit (see [`Db::events`]).
///
/// With `event_fields` (the request's, field numbers of the message's `event` oneof), only
/// those kinds are sent, and a run of other events is reported by a progress marker: the
/// message stamped with the run's last sequence and no event, once the stream has nothing
/// else to send and the run is [`MARKER_DELAY`] old, or when it reaches [`MARKER_EVERY`]
/// events. A follower's cursor thus keeps up with an outbox it mostly skips, for one message
/// per many events.
///
/// A negative `after_sequence` is INVALID_ARGUMENT naming the field, and so is a field number
/// that is not an event of the message. A storage failure or a payload that does not decode
/// as the message comes out as an opaque INTERNAL item, the cause logged; tonic ends the
/// response with it and the client reconnects from its cursor.
pub fn stream<W: WatchEvents>(
    db: &Db,
    after_sequence: i64,
    event_fields: &[i32],
) -> Result<WatchStream<W::Message>, Status> {
    if after_sequence < 0 {
        return Err(invalid_field("after_sequence", "must not be negative"));
    }
    if event_fields.len() > MAX_EVENT_FIELDS {
        return Err(invalid_field(
            "event_fields",
            &format!("must list at most {MAX_EVENT_FIELDS} kinds"),
        ));
    }
    let mut violations = tessera_mesh::errors::Violations::new();
    for (i, &field) in event_fields.iter().enumerate() {
        violations.check(
            !tessera_mesh::events::is_event_field::<W::Message>(field),
            &format!("event_fields[{i}]"),
            &format!("{field} is not an event of WatchEventsResponse"),
        );
    }
    violations.into_result()?;
    let wanted: Vec<i32> = event_fields.to_vec();
    let epoch = db.epoch().unwrap_or_default().to_owned();
    let events = db.events(after_sequence);
    let events: Pin<Box<dyn Stream<Item = Result<Event>> + Send>> = if wanted.is_empty() {
        Box::pin(events)
    } else {
        Box::pin(only(events, wanted))
    };
    let events = events.map(move |item| {
        let event = item.map_err(|err| match err {
            // The caller's cursor is not in what is kept (older than the retention, or ahead
            // of an outbox that went back): its own problem, said plainly.
            StoreError::Pruned { .. } | StoreError::Ahead { .. } => {
                Status::out_of_range(err.to_string())
            }
            err => internal(error_chain(&err)),
        })?;
        let mut message = W::Message::decode(event.payload.as_slice()).map_err(|err| {
            internal(format!("outbox event {} is corrupt: {err}", event.sequence))
        })?;
        let stamp = Stamp {
            sequence: event.sequence,
            create_time: timestamp(event.create_time),
            epoch: &epoch,
        };
        W::stamp(&mut message, stamp);
        Ok(message)
    });
    Ok(Box::pin(events))
}

/// The most kinds a `WatchEvents` call may name (more than any service has).
const MAX_EVENT_FIELDS: usize = 32;

/// How old a run of events of other kinds gets before a marker reports it, once the stream
/// has nothing else to send (see [`stream`]).
pub const MARKER_DELAY: Duration = Duration::from_millis(250);

/// How many events of other kinds pass before a marker reports them while more keep coming.
pub const MARKER_EVERY: u32 = 1024;

/// The events of `events` whose kind (the payload's event field) is in `wanted`; a run of
/// others comes out as one event with an empty payload and the run's last sequence, which
/// decodes as a message with no event: the progress marker of [`stream`].
fn only(
    events: impl Stream<Item = Result<Event>> + Send + 'static,
    wanted: Vec<i32>,
) -> impl Stream<Item = Result<Event>> + Send + 'static {
    struct Run {
        last: Event,
        count: u32,
        since: tokio::time::Instant,
    }
    struct State<S> {
        events: Pin<Box<S>>,
        wanted: Vec<i32>,
        skipped: Option<Run>,
    }
    let marker = |run: Run| Event {
        payload: Vec::new(),
        ..run.last
    };
    let state = State {
        events: Box::pin(events),
        wanted,
        skipped: None,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            let next = match &st.skipped {
                Some(run) if run.count >= MARKER_EVERY => {
                    let run = st.skipped.take()?;
                    return Some((Ok(marker(run)), st));
                }
                // Whatever is ready comes first; the marker when nothing has come by the time
                // the run is due.
                Some(run) => {
                    let due = run.since + MARKER_DELAY;
                    match tokio::time::timeout_at(due, st.events.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let run = st.skipped.take()?;
                            return Some((Ok(marker(run)), st));
                        }
                    }
                }
                None => st.events.next().await,
            };
            match next? {
                // A payload without an event field does not parse: passed on, to fail there.
                Ok(event)
                    if tessera_mesh::events::event_field(&event.payload)
                        .is_none_or(|field| st.wanted.contains(&field)) =>
                {
                    // Its sequence moves the follower's cursor past the run too.
                    st.skipped = None;
                    return Some((Ok(event), st));
                }
                Ok(event) => {
                    let (count, since) = match st.skipped.take() {
                        Some(run) => (run.count + 1, run.since),
                        None => (1, tokio::time::Instant::now()),
                    };
                    st.skipped = Some(Run {
                        last: event,
                        count,
                        since,
                    });
                }
                Err(err) => return Some((Err(err), st)),
            }
        }
    })
}

/// The last event one prune may delete, from `oldest`: never the one just appended (`seq`),
/// and at most [`PRUNE_WINDOW`] of them. None when there is nothing before `seq`.
fn prune_window(oldest: i64, seq: i64) -> Option<i64> {
    let last = seq
        .saturating_sub(1)
        .min(oldest.saturating_add(PRUNE_WINDOW - 1));
    (last >= oldest).then_some(last)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rusqlite::{Connection, StatementStatus, params};

    use super::*;

    /// An outbox of `len` events, the first `expired` of them appended long ago.
    fn outbox(len: i64, expired: i64) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE tessera_outbox (sequence INTEGER PRIMARY KEY, \
             create_time BIGINT NOT NULL, payload BLOB NOT NULL)",
        )
        .unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut insert = tx
                .prepare("INSERT INTO tessera_outbox VALUES (?1, ?2, zeroblob(200))")
                .unwrap();
            for seq in 1..=len {
                let time = if seq <= expired { 0 } else { 1_000 };
                insert.execute(params![seq, time]).unwrap();
            }
        }
        tx.commit().unwrap();
        conn
    }

    /// What one prune's two statements return and how many SQLite VM steps they took.
    fn prune_steps(conn: &Connection, seq: i64) -> (usize, i32) {
        let oldest = 1;
        let last = prune_window(oldest, seq).unwrap();
        let mut first = conn.prepare(FIRST_KEPT).unwrap();
        let first_kept: Option<i64> = first
            .query_row(params![oldest, last, 500], |row| row.get(0))
            .ok();
        let end = first_kept.unwrap_or(last + 1);
        let mut delete = conn.prepare(DELETE_PREFIX).unwrap();
        let pruned = delete.execute(params![oldest, end]).unwrap();
        let steps =
            first.get_status(StatementStatus::VmStep) + delete.get_status(StatementStatus::VmStep);
        (pruned, steps)
    }

    /// A prune reads what it may delete and no more, however many events the outbox keeps:
    /// it runs in an appending transaction, holding the write turn.
    #[test]
    fn a_prune_costs_the_same_whatever_the_outbox_keeps() {
        // Nothing expired: nothing goes.
        let (pruned_small, steps_small) = prune_steps(&outbox(2_000, 0), 2_000);
        let (pruned_large, steps_large) = prune_steps(&outbox(40_000, 0), 40_000);
        assert_eq!((pruned_small, pruned_large), (0, 0));
        assert_eq!(steps_small, steps_large, "work grew with the outbox");
        assert!(steps_large < 100, "{steps_large} steps to delete nothing");

        // Everything expired: one window goes, and the work is the window's.
        let (pruned_small, steps_small) = prune_steps(&outbox(2_000, 2_000), 2_000);
        let (pruned_large, steps_large) = prune_steps(&outbox(40_000, 40_000), 40_000);
        assert_eq!(pruned_small, PRUNE_WINDOW as usize);
        assert_eq!(pruned_large, PRUNE_WINDOW as usize);
        assert_eq!(steps_small, steps_large, "work grew with the outbox");

        // Part expired: the prefix up to the first kept event goes.
        let (pruned, _) = prune_steps(&outbox(40_000, 300), 40_000);
        assert_eq!(pruned, 300);
    }
}
