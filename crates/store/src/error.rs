use thiserror::Error;

/// Everything that can go wrong in storage. Services map it to a `tonic::Status` in their own
/// error type: [`StoreError::UniqueViolation`] usually becomes ALREADY_EXISTS (or, for a
/// `request_id` race, a re-read of the first result); the rest become an opaque INTERNAL.
///
/// ```
/// use tessera_store::{Db, Migration, StoreError};
///
/// const MIGRATIONS: &[Migration] =
///     &[Migration::portable("names", "CREATE TABLE names (name TEXT PRIMARY KEY)")];
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let db = Db::open(dir.path().join("names.db").to_str().unwrap(), MIGRATIONS).await?;
/// let insert = "INSERT INTO names (name) VALUES ('alice')";
/// sqlx::query(insert).execute(db.pool()).await?;
/// let err = StoreError::from(sqlx::query(insert).execute(db.pool()).await.unwrap_err());
/// assert!(matches!(err, StoreError::UniqueViolation { .. }), "{err}");
/// # Ok(()) }
/// ```
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database location or an option is unusable (bad URL, bad schema name, ...).
    #[error("bad database setting: {0}")]
    Config(String),

    /// An INSERT or UPDATE collided with a UNIQUE or PRIMARY KEY constraint.
    #[error("unique constraint violated ({})", constraint.as_deref().unwrap_or("unnamed"))]
    UniqueViolation {
        /// The constraint's name, when the backend reports it (PostgreSQL does, SQLite does not).
        constraint: Option<String>,
        /// The driver's report of the collision.
        #[source]
        source: sqlx::Error,
    },

    /// The migrations recorded in the database do not match the ones compiled in.
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        /// The migration's place in the list, counting from 1.
        version: i64,
        /// The migration's name, as compiled in.
        name: String,
        /// What went wrong: another name recorded at this version, or the SQL's own error.
        reason: String,
    },

    /// A write transaction waited its whole busy timeout for its turn (SQLite: another write
    /// transaction of this process held the database that long).
    #[error("the database stayed busy for {0:?}; try again")]
    Busy(std::time::Duration),

    /// A consumer asked for events after `after`, but the outbox has pruned them: the oldest
    /// it keeps is `oldest`. Reading on would silently skip events, so the read fails.
    #[error(
        "events {first} to {last} were pruned from the outbox (older than its retention); \
         the consumer at {after} must be resynchronised",
        first = after + 1,
        last = oldest - 1
    )]
    Pruned {
        /// The sequence the consumer asked to read after.
        after: i64,
        /// The oldest sequence the outbox still keeps.
        oldest: i64,
    },

    /// A consumer asked for events after `after`, but the outbox ends at `last`: it went back
    /// (restored from a backup, or recreated) and the events the consumer will wait for are
    /// not the ones it missed. Waiting would silently skip the new events up to `after`.
    #[error(
        "the cursor {after} is ahead of the outbox, which ends at {last}: the outbox went back \
         (restored or recreated); the consumer must be resynchronised"
    )]
    Ahead {
        /// The sequence the consumer asked to read after.
        after: i64,
        /// The newest sequence in the outbox.
        last: i64,
    },

    /// Any other database failure.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether this is a UNIQUE / PRIMARY KEY collision.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::UniqueViolation { .. })
    }

    /// Whether the database was too busy to take the write: worth retrying later
    /// (UNAVAILABLE), unlike the other failures.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tessera_store::StoreError;
    ///
    /// assert!(StoreError::Busy(Duration::from_secs(5)).is_busy());
    /// assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_busy());
    /// ```
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Busy(_))
    }
}

impl StoreError {
    /// Whether the database could not take the call now but may soon: too busy for the write
    /// ([`StoreError::is_busy`]), no connection free in time, or the connection to it was
    /// lost (I/O, a crashed SQLite worker, PostgreSQL ending the backend: a restart; the pool
    /// drops the connection and dials a new one). Callers answer UNAVAILABLE, which clients
    /// retry, rather than INTERNAL.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tessera_store::StoreError;
    ///
    /// assert!(StoreError::Busy(Duration::from_secs(5)).is_transient());
    /// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    /// assert!(StoreError::from(sqlx::Error::Io(reset)).is_transient());
    /// assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_transient());
    /// assert!(!StoreError::from(sqlx::Error::RowNotFound).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Busy(_) => true,
            StoreError::Database(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| crate::reads::server_ended_connection(&code)),
            StoreError::Database(err) => matches!(
                err,
                sqlx::Error::Io(_)
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
            ),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            let constraint = db.constraint().map(str::to_owned);
            return StoreError::UniqueViolation {
                constraint,
                source: err,
            };
        }
        StoreError::Database(err)
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
