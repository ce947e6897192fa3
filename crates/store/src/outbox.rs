//! Reading the outbox: a page after a sequence, or a stream that catches up then follows.

use std::collections::VecDeque;

use futures::Stream;
use sqlx::Row;
use tokio::sync::watch;

use crate::{
    db::{Backend, Db},
    error::{Result, StoreError},
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
        }
        let state = State {
            db: self.clone(),
            after,
            buffer: VecDeque::new(),
            wake: self.inner.committed.subscribe(),
            done: false,
            first: true,
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
                // Mark the notification seen BEFORE reading: a commit after this point
                // either shows up in the read or wakes `changed()` below.
                st.wake.borrow_and_update();
                match st.db.read_events(st.after, EVENT_BATCH).await {
                    // Sequences have no holes (each is the previous maximum plus one, under
                    // the outbox lock), so a jump means the events between were pruned.
                    Ok(events) if events.first().is_some_and(|e| e.sequence > st.after + 1) => {
                        st.done = true;
                        let oldest = events[0].sequence;
                        let after = st.after;
                        return Some((Err(StoreError::Pruned { after, oldest }), st));
                    }
                    Ok(events) if !events.is_empty() => {
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
