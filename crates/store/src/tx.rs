//! Write transactions, and the key locks that order writers of related rows.

use std::ops::{Deref, DerefMut};

use futures::StreamExt;
use sqlx::{Any, AnyConnection, Database, Transaction, TransactionManager};
use tokio::sync::OwnedMutexGuard;

use crate::{
    db::{Backend, Db, Writer},
    error::Result,
    now_micros,
    outbox::{APPEND_COMMIT_BEGIN, Event, PRUNE_EVERY},
    reads::connection_failed,
};

type Manager = <Any as Database>::TransactionManager;

/// A write transaction. Dereferences to the connection, so queries run on it with
/// `.execute(&mut *tx)`. Dropping it without [`Tx::commit`] rolls back.
///
/// ```
/// use tessera_store::{Db, Migration};
///
/// const MIGRATIONS: &[Migration] =
///     &[Migration::portable("names", "CREATE TABLE names (name TEXT PRIMARY KEY)")];
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let db = Db::open(dir.path().join("names.db").to_str().unwrap(), MIGRATIONS).await?;
/// let count = || sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM names").fetch_one(db.pool());
///
/// let mut tx = db.begin().await?;
/// sqlx::query("INSERT INTO names (name) VALUES ('alice')").execute(&mut *tx).await?;
/// drop(tx); // rolled back
/// assert_eq!(count().await?.0, 0);
///
/// let mut tx = db.begin().await?;
/// sqlx::query("INSERT INTO names (name) VALUES ('alice')").execute(&mut *tx).await?;
/// tx.commit().await?;
/// assert_eq!(count().await?.0, 1);
/// # Ok(()) }
/// ```
pub struct Tx {
    conn: Conn,
    pub(crate) db: Db,
    /// The highest outbox sequence appended in this transaction.
    pub(crate) appended: Option<i64>,
    /// The events appended, for the handle's recent events once committed.
    pub(crate) events: Vec<crate::outbox::Event>,
    /// The oldest outbox sequence left after this transaction pruned the outbox.
    pub(crate) pruned_to: Option<i64>,
    /// Events to append when the transaction commits ([`Tx::append_on_commit`]).
    pub(crate) on_commit: Vec<Vec<u8>>,
}

enum Conn {
    /// PostgreSQL: a transaction on a connection from the pool.
    Pooled(Transaction<'static, Any>),
    /// SQLite: a transaction on the handle's writer connection.
    Writer(WriterTx),
}

/// The handle's writer connection, held for one write transaction: holding it is the write
/// turn (SQLite has one writer at a time), and the connection stays out of sqlx's pool between
/// transactions, so no ping follows each one and its page cache stays warm (no other
/// connection of the handle writes).
pub(crate) struct WriterTx {
    slot: OwnedMutexGuard<Writer>,
    /// A transaction was begun and not yet ended: dropping rolls it back.
    open: bool,
    /// Whether the connection stays kept after this transaction (not with a small pool).
    keep: bool,
}

impl WriterTx {
    /// Begins `BEGIN IMMEDIATE` on the writer connection in `slot`, taking one from `db`'s pool
    /// if there is none; or takes the transaction the previous writer began for it.
    pub(crate) async fn begin(
        mut slot: OwnedMutexGuard<Writer>,
        db: &Db,
        keep: bool,
    ) -> Result<Self> {
        if std::mem::take(&mut slot.begun) && slot.conn.is_some() {
            return Ok(WriterTx {
                slot,
                open: true,
                keep,
            });
        }
        if slot.conn.is_none() {
            slot.conn = Some(db.inner.pool.acquire().await?);
        }
        // Open before BEGIN is sent: if this future is dropped part-way, the rollback queued on
        // drop follows the BEGIN on the connection's thread.
        let mut tx = WriterTx {
            slot,
            open: true,
            keep,
        };
        let mut begun = Manager::begin(tx.conn(), Some("BEGIN IMMEDIATE".into())).await;
        if let Err(sqlx::Error::InvalidSavePointStatement) = begun {
            // sqlx counts a transaction SQLite does not have: a commit that was also to open
            // the next transaction ([`WriterTx::commit`]) was cut off between its two
            // statements. The connection is closed; the transaction begins on another.
            tracing::warn!("the writer connection lost count of its transaction; reconnecting");
            if let Some(conn) = tx.slot.conn.take() {
                let _ = conn.close().await;
            }
            tx.slot.conn = Some(db.inner.pool.acquire().await?);
            begun = Manager::begin(tx.conn(), Some("BEGIN IMMEDIATE".into())).await;
        }
        if let Err(err) = begun {
            tx.failed(&err);
            return Err(err.into());
        }
        Ok(tx)
    }

    fn conn(&mut self) -> &mut AnyConnection {
        self.slot
            .conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("the writer slot is filled before a transaction"))
    }

    /// Commits, and with `next` also begins the next writer's transaction in the same round
    /// trip (see [`Writer::begun`]). With `event` (its create time and payload, and `next`),
    /// first appends it to the outbox in that round trip too, and returns its sequence: a
    /// write that appends one event then costs its statements plus this one round trip.
    async fn commit(
        &mut self,
        next: bool,
        event: Option<(i64, &[u8])>,
    ) -> std::result::Result<Option<i64>, sqlx::Error> {
        if !next {
            debug_assert!(event.is_none(), "an event is folded in only with `next`");
            return Manager::commit(self.conn()).await.map(|()| None);
        }
        // sqlx's count of open transactions stays at one across these statements, as it is
        // for SQLite. Each statement reports as it completes (the worker stops at the first
        // error): how many did says which failed.
        // Several statements in one prepared query, with parameters: SQLite alone does this
        // (sqlx deprecates it for that reason, not for SQLite); `raw_sql` takes no parameters.
        #[allow(deprecated)]
        let (mut results, lead) = match event {
            Some((create_time, payload)) => (
                sqlx::query(APPEND_COMMIT_BEGIN)
                    .bind(create_time)
                    .bind(payload)
                    .fetch_many(self.conn()),
                1,
            ),
            None => (
                sqlx::raw_sql("COMMIT; BEGIN IMMEDIATE").fetch_many(self.conn()),
                0,
            ),
        };
        let mut done = 0;
        let mut sequence = None;
        let failed = loop {
            match results.next().await {
                Some(Ok(sqlx::Either::Left(_))) => done += 1,
                Some(Ok(sqlx::Either::Right(row))) => match sqlx::Row::try_get::<i64, _>(&row, 0) {
                    Ok(seq) => sequence = Some(seq),
                    Err(err) => break Some(err),
                },
                Some(Err(err)) => break Some(err),
                None => break None,
            }
        };
        drop(results);
        match failed {
            None if done == lead + 2 => {
                self.slot.begun = true;
                Ok(sequence)
            }
            // The append or the COMMIT failed: the transaction is still open, as after a
            // plain commit that failed.
            Some(err) if done <= lead => Err(err),
            None if done <= lead => Err(sqlx::Error::Protocol(
                "the statements of a commit ended before the COMMIT".into(),
            )),
            // Committed, but the next transaction is not open while sqlx counts one: this
            // connection is put aside (the next writer takes another from the pool).
            failed => {
                tracing::warn!(error = ?failed, "beginning the next write transaction failed; reconnecting");
                if let Some(conn) = self.slot.conn.take() {
                    let _ = conn.close().await;
                }
                Ok(sequence)
            }
        }
    }

    /// After a failed BEGIN, COMMIT or ROLLBACK. The transaction stays open (a COMMIT refused
    /// by a deferred constraint leaves it active in SQLite), so drop still queues its rollback
    /// (a no-op if nothing was begun); a broken connection gets that rollback now and goes back
    /// to the pool, which pings it and closes it if it is broken.
    fn failed(&mut self, err: &sqlx::Error) {
        if connection_failed(err)
            && let Some(mut conn) = self.slot.conn.take()
        {
            Manager::start_rollback(&mut conn);
        }
    }
}

impl Drop for WriterTx {
    fn drop(&mut self) {
        if self.open
            && let Some(conn) = self.slot.conn.as_deref_mut()
        {
            // Queued on the connection before the next writer can use it (the slot's lock is
            // released after this).
            Manager::start_rollback(conn);
        }
        if !self.keep {
            drop(self.slot.conn.take());
        }
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match &self.conn {
            Conn::Pooled(tx) => tx,
            Conn::Writer(tx) => {
                tx.slot.conn.as_deref().unwrap_or_else(|| {
                    unreachable!("the writer slot is filled during a transaction")
                })
            }
        }
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            Conn::Pooled(tx) => tx,
            Conn::Writer(tx) => tx.conn(),
        }
    }
}

impl Tx {
    /// Commits, then wakes every [`Db::events`] stream of this handle if events were appended.
    pub async fn commit(mut self) -> Result<()> {
        // One event, with another writer waiting (the case under load), goes in the commit's
        // own round trip ([`WriterTx::commit`]); otherwise the events are appended here, as
        // [`Tx::append_event`] would have.
        let fold = match &self.conn {
            Conn::Writer(tx) => {
                self.on_commit.len() == 1
                    && tx.keep
                    && self
                        .db
                        .inner
                        .queued
                        .load(std::sync::atomic::Ordering::Relaxed)
                        > 0
            }
            Conn::Pooled(_) => false,
        };
        let on_commit = std::mem::take(&mut self.on_commit);
        if !on_commit.is_empty() {
            // A prune point an earlier folded append reached (it could not prune after its
            // COMMIT); under the outbox lock, as a prune in `append_event` is.
            let due = self
                .db
                .inner
                .prune_due
                .swap(0, std::sync::atomic::Ordering::Relaxed);
            if due > 0 {
                self.prune(due).await?;
            }
        }
        match on_commit.as_slice() {
            _ if fold => {}
            [] => {}
            [payload] => drop(self.append_event(payload).await?),
            payloads => drop(self.append_events(payloads).await?),
        }
        let Tx {
            conn,
            db,
            mut appended,
            mut events,
            pruned_to,
            on_commit: _,
        } = self;
        // SQLite: the write turn is held until the end of this function.
        let _turn = match conn {
            Conn::Pooled(tx) => {
                tx.commit().await?;
                None
            }
            Conn::Writer(mut tx) => {
                let next =
                    tx.keep && db.inner.queued.load(std::sync::atomic::Ordering::Relaxed) > 0;
                let create_time = now_micros();
                let event = on_commit
                    .first()
                    .filter(|_| fold)
                    .map(|payload| (create_time, payload.as_slice()));
                match tx.commit(next || fold, event).await {
                    Err(err) => {
                        tx.failed(&err);
                        return Err(err.into());
                    }
                    Ok(Some(sequence)) => {
                        appended = Some(appended.map_or(sequence, |s| s.max(sequence)));
                        if sequence % PRUNE_EVERY == 0 {
                            db.inner
                                .prune_due
                                .store(sequence, std::sync::atomic::Ordering::Relaxed);
                        }
                        events.extend(on_commit.into_iter().map(|payload| Event {
                            sequence,
                            create_time,
                            payload,
                        }));
                    }
                    Ok(None) => {}
                }
                tx.open = false;
                Some(tx)
            }
        };
        let inner = &db.inner;
        inner
            .dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if !events.is_empty() {
            // Before the wake-up below, and while this transaction still holds the write turn
            // (SQLite), so events arrive in sequence order.
            let mut recent = inner
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            recent.push(events);
            if let Some(oldest) = pruned_to {
                recent.forget_before(oldest);
            }
        }
        if let Some(seq) = appended {
            inner.committed.send_if_modified(|latest| {
                if seq > *latest {
                    *latest = seq;
                    true
                } else {
                    false
                }
            });
        }
        Ok(())
    }

    /// Rolls back explicitly (dropping does the same, without waiting).
    pub async fn rollback(self) -> Result<()> {
        match self.conn {
            Conn::Pooled(tx) => tx.rollback().await?,
            Conn::Writer(mut tx) => {
                if let Err(err) = Manager::rollback(tx.conn()).await {
                    tx.failed(&err);
                    return Err(err.into());
                }
                tx.open = false;
            }
        }
        Ok(())
    }

    /// The engine behind this transaction.
    pub fn backend(&self) -> Backend {
        self.db.inner.backend
    }

    /// A transaction of `db` on a pooled connection.
    pub(crate) fn pooled(inner: Transaction<'static, Any>, db: Db) -> Self {
        Self::new(Conn::Pooled(inner), db)
    }

    /// A transaction of `db` on its writer connection.
    pub(crate) fn writer(inner: WriterTx, db: Db) -> Self {
        Self::new(Conn::Writer(inner), db)
    }

    fn new(conn: Conn, db: Db) -> Self {
        Tx {
            conn,
            db,
            appended: None,
            events: Vec::new(),
            pruned_to: None,
            on_commit: Vec::new(),
        }
    }

    /// Waits for, then holds until this transaction ends, the exclusive lock on `key` in
    /// `space` (e.g. `("post", post_id)`): for the writer of a tombstone, whose cascade must
    /// not miss a child row inserted by a transaction that checked the tombstone before it
    /// existed. Pair it with [`Tx::lock_key_shared`] in the inserting transactions.
    ///
    /// A row lock cannot do this on PostgreSQL: the tombstone row does not exist yet when the
    /// inserter looks, so there is nothing to lock, and READ COMMITTED lets the cascade's
    /// `DELETE` miss the uncommitted child. A transaction-scoped advisory lock on the key is
    /// the row lock of a row that may not exist (keys are hashed: a collision only makes
    /// unrelated writers wait). SQLite needs nothing: write transactions already hold the
    /// database's one write lock from their start.
    pub async fn lock_key(&mut self, space: &str, key: &str) -> Result<()> {
        self.advisory_lock(space, key, "pg_advisory_xact_lock")
            .await
    }

    /// The shared side of [`Tx::lock_key`]: for transactions that check a tombstone and then
    /// insert under it. They do not wait for each other, only for (or hold off) the tombstone
    /// writer. Take it before the check.
    pub async fn lock_key_shared(&mut self, space: &str, key: &str) -> Result<()> {
        self.advisory_lock(space, key, "pg_advisory_xact_lock_shared")
            .await
    }

    async fn advisory_lock(&mut self, space: &str, key: &str, function: &str) -> Result<()> {
        if self.backend() != Backend::Postgres {
            return Ok(());
        }
        // `::text`: the Any driver cannot decode PostgreSQL's `void`.
        sqlx::query(&format!(
            "SELECT {function}(hashtext($1), hashtext($2))::text"
        ))
        .bind(space)
        .bind(key)
        .execute(&mut **self)
        .await?;
        Ok(())
    }
}
