//! Write transactions, and the key locks that order writers of related rows.

use std::ops::{Deref, DerefMut};

use futures::{future::BoxFuture, stream::BoxStream};
use sqlx::{
    Any, Describe, Either, Execute, Executor, Transaction,
    any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo},
};
use tokio::sync::OwnedMutexGuard;

use crate::{
    db::{Backend, Db, Writer},
    error::Result,
    inline::{InlineConn, SqliteFailure},
};

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
    conn: TxConn,
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

/// What a [`Tx`] dereferences to: run queries on it with `.execute(&mut *tx)`, as on a
/// sqlx connection.
pub struct TxConn(Conn);

impl std::fmt::Debug for TxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxConn").finish_non_exhaustive()
    }
}

enum Conn {
    /// PostgreSQL: a transaction on a connection from the pool.
    Pooled(Transaction<'static, Any>),
    /// SQLite: a transaction on the handle's writer connection.
    Writer(WriterTx),
}

/// The handle's writer connection, held for one write transaction: holding it is the write
/// turn (SQLite has one writer at a time). It is the store's own connection, not one of sqlx's
/// pool, and runs its statements on the task that holds the turn ([`crate::inline`]).
pub(crate) struct WriterTx {
    slot: OwnedMutexGuard<Writer>,
    /// A transaction was begun and not yet ended: dropping rolls it back.
    open: bool,
}

/// The longest pause between two tries of a `BEGIN IMMEDIATE` that another process's write
/// lock refused.
const BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(20);

impl WriterTx {
    /// Begins `BEGIN IMMEDIATE` on the writer connection in `slot`, opening it first if there
    /// is none. While another process holds the file's write lock, tries again with growing
    /// async pauses (the task's thread is never put to sleep) for up to the busy timeout.
    pub(crate) async fn begin(mut slot: OwnedMutexGuard<Writer>, db: &Db) -> Result<Self> {
        if slot.conn.is_none() {
            slot.conn = Some(db.inner.open_writer()?);
        }
        let mut tx = WriterTx { slot, open: false };
        let deadline = tokio::time::Instant::now() + db.inner.turn_timeout;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match tx.conn().batch("BEGIN IMMEDIATE") {
                Ok(()) => break,
                Err(err)
                    if SqliteFailure::is_busy(&err) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
                    pause = (pause * 2).min(BUSY_PAUSE_MAX);
                }
                Err(err) => {
                    tx.failed();
                    return Err(err.into());
                }
            }
        }
        tx.open = true;
        Ok(tx)
    }

    fn conn(&mut self) -> &mut InlineConn {
        self.slot
            .conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("the writer slot is filled during a transaction"))
    }

    /// Commits. On failure the transaction stays open (a COMMIT refused by a deferred
    /// constraint leaves it active in SQLite), and dropping this rolls it back.
    fn commit(&mut self) -> std::result::Result<(), sqlx::Error> {
        let committed = self.conn().batch("COMMIT");
        if committed.is_err() {
            self.failed();
        } else {
            self.open = false;
        }
        committed
    }

    /// Rolls back; a transaction still open after that (which should not happen) is left to
    /// drop, which closes the connection.
    fn rollback(&mut self) -> std::result::Result<(), sqlx::Error> {
        let rolled_back = self.conn().batch("ROLLBACK");
        self.failed();
        rolled_back
    }

    /// After a statement of BEGIN, COMMIT or ROLLBACK failed: records whether a transaction is
    /// still open. One still open after a ROLLBACK should be impossible; the connection is then
    /// closed (which rolls back) and the next writer opens another.
    fn failed(&mut self) {
        let Some(conn) = self.slot.conn.as_ref() else {
            self.open = false;
            return;
        };
        self.open = !conn.is_autocommit();
    }
}

impl Drop for WriterTx {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // On this thread, before the next writer gets the connection (the turn is released
        // after this). A rollback cannot wait on anything.
        let rolled_back = self.conn().batch("ROLLBACK");
        if rolled_back.is_err() || !self.conn().is_autocommit() {
            tracing::warn!(error = ?rolled_back.err(), "rolling back a write transaction failed; reconnecting");
            drop(self.slot.conn.take());
        }
    }
}

impl Deref for Tx {
    type Target = TxConn;
    fn deref(&self) -> &TxConn {
        &self.conn
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut TxConn {
        &mut self.conn
    }
}

impl<'c> Executor<'c> for &'c mut TxConn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, std::result::Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match &mut self.0 {
            Conn::Pooled(tx) => (&mut **tx).fetch_many(query),
            Conn::Writer(tx) => tx.conn().fetch_many(query),
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, std::result::Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match &mut self.0 {
            Conn::Pooled(tx) => (&mut **tx).fetch_optional(query),
            Conn::Writer(tx) => tx.conn().fetch_optional(query),
        }
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, std::result::Result<AnyStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        match &mut self.0 {
            Conn::Pooled(tx) => (&mut **tx).prepare_with(sql, parameters),
            Conn::Writer(tx) => tx.conn().prepare_with(sql, parameters),
        }
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, std::result::Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match &mut self.0 {
            Conn::Pooled(tx) => (&mut **tx).describe(sql),
            Conn::Writer(tx) => tx.conn().describe(sql),
        }
    }
}

impl Tx {
    /// Commits, then wakes every [`Db::events`] stream of this handle if events were appended.
    pub async fn commit(mut self) -> Result<()> {
        match std::mem::take(&mut self.on_commit).as_slice() {
            [] => {}
            [payload] => drop(self.append_event(payload).await?),
            payloads => drop(self.append_events(payloads).await?),
        }
        let Tx {
            conn,
            db,
            appended,
            events,
            pruned_to,
            on_commit: _,
        } = self;
        // SQLite: the write turn is held until the end of this function.
        let _turn = match conn.0 {
            Conn::Pooled(tx) => {
                tx.commit().await?;
                None
            }
            Conn::Writer(mut tx) => {
                tx.commit()?;
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
        match self.conn.0 {
            Conn::Pooled(tx) => tx.rollback().await?,
            Conn::Writer(mut tx) => tx.rollback()?,
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
            conn: TxConn(conn),
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
