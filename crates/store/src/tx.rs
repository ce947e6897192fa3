//! Write transactions, and the key locks that order writers of related rows.

use std::ops::{Deref, DerefMut};

use sqlx::{Any, AnyConnection, Transaction};
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    db::{Backend, Db},
    error::Result,
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
    inner: Transaction<'static, Any>,
    pub(crate) db: Db,
    /// The highest outbox sequence appended in this transaction.
    pub(crate) appended: Option<i64>,
    /// SQLite: this handle's write turn, given back after the transaction (declared after
    /// `inner`, so a rollback on drop is queued before the next writer starts).
    _turn: Option<OwnedSemaphorePermit>,
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.inner
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.inner
    }
}

impl Tx {
    /// Commits, then wakes every [`Db::events`] stream of this handle if events were appended.
    pub async fn commit(self) -> Result<()> {
        self.inner.commit().await?;
        self.db
            .inner
            .dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(seq) = self.appended {
            self.db.inner.committed.send_if_modified(|latest| {
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
        self.inner.rollback().await?;
        Ok(())
    }

    /// The engine behind this transaction.
    pub fn backend(&self) -> Backend {
        self.db.inner.backend
    }

    /// A transaction of `db`, holding (SQLite) its write turn.
    pub(crate) fn new(
        inner: Transaction<'static, Any>,
        db: Db,
        turn: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Tx {
            inner,
            db,
            appended: None,
            _turn: turn,
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
