//! Write transactions, and the key locks that order writers of related rows.

use std::{
    ops::{Deref, DerefMut},
    sync::{Arc, atomic::Ordering},
};

use futures::{future::BoxFuture, stream::BoxStream};
use sqlx::{
    Any, Describe, Either, Execute, Executor, Transaction,
    any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo},
};
use tokio::sync::OwnedMutexGuard;

use crate::{
    db::{Backend, Db, Inner, Writer},
    error::Result,
    group::{self, Group},
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
    /// SQLite: whether the commit may hand the turn to a writer queued behind it and wait for
    /// the shared COMMIT ([`crate::group`]); false commits at once.
    pub(crate) hand_over: bool,
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
/// pool, and runs its statements on the task that holds the turn ([`crate::inline`]). The
/// transaction is a savepoint in the connection's SQLite transaction, which the write
/// transactions queued behind it may share ([`crate::group`]).
pub(crate) struct WriterTx {
    /// The write turn; `None` once handed on to the next member of this one's group.
    slot: Option<OwnedMutexGuard<Writer>>,
    inner: Arc<Inner>,
    /// This transaction's savepoint is open: dropping rolls it back.
    open: bool,
}

/// The longest pause between two tries of a `BEGIN IMMEDIATE` that another process's write
/// lock refused.
const BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(20);

impl WriterTx {
    /// Begins a write transaction on the writer connection in `slot`: joins the group open on
    /// it, or else opens the connection if there is none and runs `BEGIN IMMEDIATE`. While
    /// another process holds the file's write lock, tries again with growing async pauses (the
    /// task's thread is never put to sleep) for up to the busy timeout.
    pub(crate) async fn begin(mut slot: OwnedMutexGuard<Writer>, db: &Db) -> Result<Self> {
        if slot.group.is_none() {
            if slot.conn.is_none() {
                slot.conn = Some(db.inner.open_writer()?);
            }
            let deadline = tokio::time::Instant::now() + db.inner.turn_timeout;
            let mut pause = std::time::Duration::from_millis(1);
            loop {
                match slot.connection().batch("BEGIN IMMEDIATE") {
                    Ok(()) => break,
                    Err(err)
                        if SqliteFailure::is_busy(&err)
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
                        pause = (pause * 2).min(BUSY_PAUSE_MAX);
                    }
                    Err(err) => {
                        slot.roll_back();
                        return Err(err.into());
                    }
                }
            }
            slot.group = Some(Group::new());
        }
        let mut tx = WriterTx {
            slot: Some(slot),
            inner: db.inner.clone(),
            open: false,
        };
        // On failure, dropping `tx` ends the transaction if it holds nothing else.
        tx.conn().batch(group::SAVEPOINT)?;
        tx.open = true;
        Ok(tx)
    }

    fn writer(&mut self) -> &mut Writer {
        self.slot
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("the turn is held until the transaction ends"))
    }

    fn conn(&mut self) -> &mut InlineConn {
        self.writer().connection()
    }

    /// Releases this transaction into its group, then commits the group or, with another
    /// writer waiting for the turn, hands the turn on to it and waits for the group's outcome.
    /// On failure to release, dropping this rolls the savepoint back.
    async fn commit(
        mut self,
        events: Vec<crate::outbox::Event>,
        appended: Option<i64>,
        pruned_to: Option<i64>,
        hand_over: bool,
    ) -> Result<()> {
        self.conn().batch(group::RELEASE)?;
        self.open = false;
        let inner = self.inner.clone();
        self.writer()
            .group
            .as_mut()
            .unwrap_or_else(|| unreachable!("a transaction is open"))
            .join(events, appended, pruned_to);
        if hand_over && inner.group_commit.load(Ordering::Relaxed) {
            // Writers that have a request in hand run now and queue behind this one.
            tokio::task::yield_now().await;
            let group = self
                .writer()
                .group
                .as_ref()
                .unwrap_or_else(|| unreachable!("the turn was held"));
            if inner.queued.load(Ordering::Relaxed) > 0 && group.members < group::MAX_GROUP {
                let done = group.outcome();
                self.slot = None;
                return group::wait(done).await;
            }
        }
        self.writer().commit_group(&inner)?;
        Ok(())
    }

    /// Rolls this transaction's savepoint back; on failure, dropping this tries again and
    /// then closes the connection.
    fn rollback(&mut self) -> std::result::Result<(), sqlx::Error> {
        let rolled_back = self.conn().batch(group::ROLLBACK_SAVEPOINT);
        if rolled_back.is_ok() {
            self.open = false;
        }
        rolled_back
    }
}

impl Drop for WriterTx {
    fn drop(&mut self) {
        let Some(writer) = self.slot.as_deref_mut() else {
            return;
        };
        // On this thread, before the next writer gets the connection (the turn is released
        // after this). A rollback cannot wait on anything.
        if self.open {
            let rolled_back = writer.connection().batch(group::ROLLBACK_SAVEPOINT);
            if let Err(err) = rolled_back {
                tracing::warn!(error = ?err, "rolling back a write transaction failed; reconnecting");
                writer.close();
                return;
            }
        }
        // Left without committing (failed, cancelled, or cancelled after its release): the
        // group it was in ends here, committed if others are in it. Not left open for a writer
        // waiting for the turn: this one may have seen the others' rows (a unique key it
        // collided with, say) and its caller may read them next outside the transaction.
        match writer.group.as_ref().map(|group| group.members) {
            None => {}
            Some(0) => writer.roll_back(),
            Some(_) => {
                if let Err(err) = writer.commit_group(&self.inner) {
                    tracing::warn!(error = ?err, "committing a write group failed");
                }
            }
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
    /// On SQLite the commit may be shared with the write transactions queued behind this one
    /// (see [`DbOptions::group_commit`](crate::DbOptions::group_commit)); either way this
    /// returns once the data is committed, or with the error that stopped it.
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
            hand_over,
        } = self;
        match conn.0 {
            Conn::Pooled(tx) => {
                tx.commit().await?;
                let mut group = Group::new();
                group.join(events, appended, pruned_to);
                group.committed(&db.inner);
                Ok(())
            }
            Conn::Writer(tx) => tx.commit(events, appended, pruned_to, hand_over).await,
        }
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
            hand_over: true,
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
