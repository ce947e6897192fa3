//! Reads outside a transaction ([`crate::Db::pool`]) on connections the store keeps checked
//! out of sqlx's pool.
//!
//! sqlx pings a connection each time it goes back to its pool: a round trip to PostgreSQL, or
//! to the SQLite connection's own thread, in a task of its own. So a pooled read cost two round
//! trips where one does the work. [`Reads`] keeps a few connections out of the pool and lends
//! them to one read at a time. A connection whose read completed (rows, or an error from the
//! database itself, such as a bad statement) comes back without a ping. One whose read was
//! cancelled part-way, or failed on the connection (I/O, a crashed worker), goes back to the
//! pool instead, which pings it and closes it if it is broken. A connection kept idle for
//! [`crate::db::IDLE_PING_AFTER`] is pinged before it is lent again.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures::{StreamExt, TryStreamExt, future::BoxFuture, stream::BoxStream};
use sqlx::{
    Any, AnyConnection, AnyPool, Connection, Describe, Either, Execute, Executor,
    pool::PoolConnection,
};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::db::IDLE_PING_AFTER;

/// What [`crate::Db::pool`] hands out: run reads on it as on a sqlx pool
/// (`sqlx::query(..).fetch_all(db.pool())`).
pub struct Reads {
    pool: AnyPool,
    /// Connections kept out of the pool, not lent now, with when they came back.
    idle: Mutex<Vec<(PoolConnection<Any>, Instant)>>,
    /// Set by [`Reads::close`]: a connection coming back then goes to the (closed) pool.
    closed: AtomicBool,
    /// One permit per connection that may be kept; `None` when none may (a pool of one
    /// connection, which writes need too): reads then use the pool itself. Half the pool at
    /// most, so kept connections never starve the writers.
    lendable: Option<Semaphore>,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads")
            .field(
                "kept",
                &self.lendable.as_ref().map(Semaphore::available_permits),
            )
            .finish_non_exhaustive()
    }
}

/// A kept connection lent to one read.
struct Lent<'a> {
    reads: &'a Reads,
    conn: Option<PoolConnection<Any>>,
    /// Set once the read completed on a sound connection: only then does it stay kept.
    sound: bool,
    _permit: SemaphorePermit<'a>,
}

impl Lent<'_> {
    fn conn(&mut self) -> &mut AnyConnection {
        // Present from `lend` until drop.
        self.conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("a lent connection is taken only on drop"))
    }

    /// Records how the read ended: a failure of the connection itself sends it back to the pool.
    fn ended<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.sound = match result {
            Ok(_) => true,
            Err(err) => !connection_failed(err),
        };
        if !self.sound {
            // Most likely the server restarted: the other kept connections go back to the
            // pool too, which pings each and closes the broken ones, so they fail no read.
            self.reads.release();
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.sound && !self.reads.closed.load(Ordering::Acquire) {
            let mut idle = self
                .reads
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            idle.push((conn, Instant::now()));
        }
        // Otherwise dropping it hands it back to the pool, which pings it first.
    }
}

/// A failure that may have left the connection unusable, not one about the statement.
pub(crate) fn connection_failed(err: &sqlx::Error) -> bool {
    if let sqlx::Error::Database(db) = err {
        return db.code().is_some_and(|code| server_ended_connection(&code));
    }
    !matches!(
        err,
        sqlx::Error::RowNotFound
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
    )
}

/// PostgreSQL's SQLSTATE classes 08 (connection exception) and 57P (the server is shutting
/// down, crashed, or terminated this backend): the server ended the connection.
pub(crate) fn server_ended_connection(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || sqlstate.starts_with("57P")
}

impl Reads {
    /// Reads over `pool`, keeping up to `keep` of its connections.
    pub(crate) fn new(pool: AnyPool, keep: usize) -> Self {
        Self {
            pool,
            idle: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            lendable: (keep > 0).then(|| Semaphore::new(keep)),
        }
    }

    /// A kept connection (pinged first if it sat idle long), or a new one from the pool to
    /// keep; `None` when as many as may be kept are lent already (the read then takes one from
    /// the pool for itself, as it would without this) or none may be.
    async fn lend(&self) -> Result<Option<Lent<'_>>, sqlx::Error> {
        let Some(Ok(permit)) = self.lendable.as_ref().map(Semaphore::try_acquire) else {
            return Ok(None);
        };
        loop {
            let kept = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let conn = match kept {
                Some((conn, since)) if since.elapsed() < IDLE_PING_AFTER => conn,
                Some((mut conn, _)) => match conn.ping().await {
                    Ok(()) => conn,
                    // Dropped: the pool closes it. Try the next one.
                    Err(_) => continue,
                },
                None => self.pool.acquire().await?,
            };
            return Ok(Some(Lent {
                reads: self,
                conn: Some(conn),
                sound: false,
                _permit: permit,
            }));
        }
    }

    /// Hands every kept connection not lent now back to the pool, which pings each.
    fn release(&self) {
        drop(self.take_idle());
    }

    /// The kept connections not lent now, taken out of the list.
    fn take_idle(&self) -> Vec<(PoolConnection<Any>, Instant)> {
        std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Closes the kept connections and keeps no more: the pool's own close does not wait for
    /// connections handed back to it during it, so [`crate::Db::close`] closes these first.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for (conn, _) in self.take_idle() {
            // A connection that fails to close cleanly is gone all the same.
            let _ = conn.close().await;
        }
    }
}

impl Drop for Reads {
    fn drop(&mut self) {
        // Handing a connection back to the pool spawns a task, which needs a runtime that may
        // be gone by now; the pool is going away with this anyway, so close them directly.
        let kept = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        for (conn, _) in kept {
            drop(conn.detach());
        }
    }
}

impl<'c> Executor<'c> for &'c Reads {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<sqlx::any::AnyQueryResult, sqlx::any::AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        // The rows are collected while the connection is lent, then streamed: reads here are
        // bounded (pages, batches), and a lent connection must not outlive its stream.
        let rows = async move {
            let Some(mut lent) = self.lend().await? else {
                return self.pool.fetch_many(query).try_collect::<Vec<_>>().await;
            };
            let rows = lent.conn().fetch_many(query).try_collect::<Vec<_>>().await;
            lent.ended(&rows);
            rows
        };
        futures::stream::once(rows)
            .map(|rows| match rows {
                Ok(rows) => futures::stream::iter(rows.into_iter().map(Ok)).left_stream(),
                Err(err) => futures::stream::iter([Err(err)]).right_stream(),
            })
            .flatten()
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<sqlx::any::AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        Box::pin(async move {
            let Some(mut lent) = self.lend().await? else {
                return self.pool.fetch_optional(query).await;
            };
            let row = lent.conn().fetch_optional(query).await;
            lent.ended(&row);
            row
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [sqlx::any::AnyTypeInfo],
    ) -> BoxFuture<'e, Result<sqlx::any::AnyStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move {
            let Some(mut lent) = self.lend().await? else {
                return self.pool.prepare_with(sql, parameters).await;
            };
            let statement = lent.conn().prepare_with(sql, parameters).await;
            lent.ended(&statement);
            statement
        })
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        Box::pin(async move { self.pool.describe(sql).await })
    }
}
