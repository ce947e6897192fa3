//! The database handle, write transactions and migrations.

use std::{
    ops::{Deref, DerefMut},
    path::Path,
    sync::{Arc, Once, OnceLock},
    time::Duration,
};

use sqlx::{
    Any, AnyConnection, AnyPool, Connection, Transaction,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::{
    error::{Result, StoreError},
    now_micros,
};

/// Which database engine stands behind a [`Db`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One embedded migration. A service passes its migrations, in order, to [`Db::open`]; the
/// position in that list (starting at 1) is the version recorded in `tessera_migrations`.
/// Never edit or reorder a released migration: add a new one.
///
/// ```
/// use tessera_store::Migration;
///
/// const MIGRATIONS: &[Migration] = &[
///     Migration::portable("follows", "CREATE TABLE follows (user_id TEXT, author_id TEXT)"),
///     Migration::per_backend("avatars", "ALTER TABLE follows ADD COLUMN avatar BLOB",
///         "ALTER TABLE follows ADD COLUMN avatar BYTEA"),
/// ];
/// assert_eq!(MIGRATIONS[0].sqlite, MIGRATIONS[0].postgres);
/// assert_ne!(MIGRATIONS[1].sqlite, MIGRATIONS[1].postgres);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// A short name, recorded with the version; a different name at the same version on an
    /// existing database is an error.
    pub name: &'static str,
    /// The SQL run on SQLite (may hold several statements).
    pub sqlite: &'static str,
    /// The SQL run on PostgreSQL (may hold several statements).
    pub postgres: &'static str,
}

impl Migration {
    /// A migration whose SQL is the same on both engines (stick to TEXT and BIGINT columns,
    /// and no auto-increment).
    pub const fn portable(name: &'static str, sql: &'static str) -> Self {
        Self {
            name,
            sqlite: sql,
            postgres: sql,
        }
    }

    /// A migration with engine-specific SQL (e.g. BLOB vs BYTEA).
    pub const fn per_backend(
        name: &'static str,
        sqlite: &'static str,
        postgres: &'static str,
    ) -> Self {
        Self {
            name,
            sqlite,
            postgres,
        }
    }

    fn sql(&self, backend: Backend) -> &'static str {
        match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
        }
    }
}

/// How to open a [`Db`] beyond its location.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// PostgreSQL only: keep every table in this schema (created if missing) by setting
    /// `search_path` on each connection. Lets several services, or several tests, share one
    /// PostgreSQL database without colliding. Must match `[a-z_][a-z0-9_]{0,62}`.
    pub schema: Option<String>,
    /// Pool size; `None` picks 8 for SQLite and 10 for PostgreSQL.
    pub max_connections: Option<u32>,
    /// How long SQLite waits on a locked database before failing a statement.
    pub busy_timeout: Duration,
    /// PostgreSQL only: how often an idle [`Db::events`] stream re-reads the outbox even
    /// without a local notification, to see events committed by other replicas.
    pub poll_interval: Duration,
    /// Outbox events older than this are deleted (the newest is always kept), checked every
    /// [`PRUNE_EVERY`] appends; `None` keeps every event forever. A consumer whose cursor
    /// falls behind what is kept gets [`StoreError::Pruned`] instead of a silent gap.
    pub outbox_retention: Option<Duration>,
    /// How long a caller waits for a pooled connection before failing.
    pub acquire_timeout: Duration,
    /// PostgreSQL only: the server cancels a statement running longer than this
    /// (`statement_timeout` on each connection); `None` leaves the server's setting.
    pub statement_timeout: Option<Duration>,
    /// PostgreSQL only: trust this CA (PEM) for the server's certificate, as `sslrootcert`
    /// in the URL does (which wins if both are given); without an `sslmode` in the URL it
    /// also makes the mode `verify-full`.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The pool settings every [`Db`] of this process starts from ([`DbOptions::default`]),
/// set once by the binary from its configuration; services open their databases with
/// [`Db::open`] and need not pass them along.
static PROCESS_DEFAULTS: std::sync::OnceLock<DbOptions> = std::sync::OnceLock::new();

impl DbOptions {
    /// Makes `options` what [`DbOptions::default`] returns in this process. Only the first
    /// call counts; false if defaults were already set.
    pub fn set_process_defaults(options: DbOptions) -> bool {
        PROCESS_DEFAULTS.set(options).is_ok()
    }
}

/// How many appends apart the outbox is pruned (in the appending transaction).
pub const PRUNE_EVERY: i64 = 256;

/// The most outbox rows one prune looks at (and deletes).
const PRUNE_WINDOW: i64 = 4 * PRUNE_EVERY;

/// The default outbox retention: a week, far longer than a consumer should be down.
pub const DEFAULT_OUTBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for DbOptions {
    fn default() -> Self {
        if let Some(options) = PROCESS_DEFAULTS.get() {
            return options.clone();
        }
        Self {
            schema: None,
            max_connections: None,
            busy_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            outbox_retention: Some(DEFAULT_OUTBOX_RETENTION),
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: None,
            ca_file: None,
        }
    }
}

/// `url` with `sslrootcert` (and, when it names no `sslmode`, `sslmode=verify-full`) for
/// `ca`, unless it already names a root certificate.
fn with_ca(url: &str, ca: &Path) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let has = |key: &str| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some(key))
    };
    if ["sslrootcert", "ssl-root-cert", "ssl-ca"]
        .iter()
        .any(|k| has(k))
    {
        return url.to_owned();
    }
    // Percent-encode all but unreserved characters and `/`, so any path survives the query.
    let mut path = String::new();
    for b in ca.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    let mut out = url.to_owned();
    out.push(if url.contains('?') { '&' } else { '?' });
    out.push_str("sslrootcert=");
    out.push_str(&path);
    if !has("sslmode") && !has("ssl-mode") {
        out.push_str("&sslmode=verify-full");
    }
    out
}

pub(crate) struct Inner {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// The highest outbox sequence committed through this handle.
    pub(crate) committed: watch::Sender<i64>,
    pub(crate) poll_interval: Duration,
    /// SQLite only: write transactions of this handle take turns here, in arrival order,
    /// before `BEGIN IMMEDIATE`. SQLite allows one writer at a time, and waiting writers
    /// inside SQLite poll with growing sleeps (its busy handler), which put tens of
    /// milliseconds on the p99 of concurrent writes; queued here they start the moment the
    /// previous one commits. Other processes on the same file are still handled by the busy
    /// timeout.
    write_turn: Option<Arc<Semaphore>>,
    /// How long a write transaction waits for its turn (the busy timeout).
    turn_timeout: Duration,
    outbox_retention: Option<Duration>,
    /// This database's outbox epoch, read (or made) by [`Db::migrate`].
    epoch: OnceLock<String>,
}

/// A service's database: a connection pool plus the live outbox notification. Cheap to clone;
/// clones share the pool. [`Db::open`] shows opening, writing and reading one.
#[derive(Clone)]
pub struct Db {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

/// The tables the store itself needs, created before a service's migrations.
const STORE_TABLES_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS tessera_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_outbox (
    sequence INTEGER PRIMARY KEY,
    create_time BIGINT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_cursors (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_outbox_epoch (
    id BIGINT PRIMARY KEY,
    epoch TEXT NOT NULL,
    create_time BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_cursor_epochs (
    name TEXT PRIMARY KEY,
    epoch TEXT,
    halted TEXT
);
";

const STORE_TABLES_POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS tessera_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_outbox (
    sequence BIGINT PRIMARY KEY,
    create_time BIGINT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_cursors (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_outbox_epoch (
    id BIGINT PRIMARY KEY,
    epoch TEXT NOT NULL,
    create_time BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tessera_cursor_epochs (
    name TEXT PRIMARY KEY,
    epoch TEXT,
    halted TEXT
);
";

/// Runs SQL without parameters, possibly several statements (simple query protocol).
async fn script(conn: &mut AnyConnection, sql: &str) -> Result<()> {
    sqlx::Executor::execute(conn, sql).await?;
    Ok(())
}

fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// `sqlite://` URL for a file path; characters with a meaning in URLs are percent-encoded
/// (the SQLite driver decodes them again).
fn sqlite_url(path: &Path) -> Result<String> {
    let absolute = std::path::absolute(path)
        .map_err(|e| StoreError::Config(format!("database path {}: {e}", path.display())))?;
    let text = absolute.to_str().ok_or_else(|| {
        StoreError::Config(format!("database path {} is not UTF-8", path.display()))
    })?;
    let mut url = String::from("sqlite://");
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_' | b'~') {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.push_str("?mode=rwc");
    Ok(url)
}

impl Db {
    /// Opens the database at `target` and applies `migrations`.
    ///
    /// `target` is a `postgres://` (or `postgresql://`) URL, or else a SQLite file path
    /// (created if missing, with its parent directory); a `sqlite:` URL is accepted too
    /// (add `?mode=rwc` to create the file). In-memory SQLite is refused: use a file in a
    /// temporary directory.
    /// SQLite connections use WAL, foreign keys and a busy timeout.
    ///
    /// Reads go to [`Db::pool`]; writes through [`Db::begin`] and [`Tx::commit`]:
    ///
    /// ```
    /// use tessera_store::{Db, Migration};
    ///
    /// const MIGRATIONS: &[Migration] = &[Migration::portable(
    ///     "follows",
    ///     "CREATE TABLE follows (user_id TEXT NOT NULL, author_id TEXT NOT NULL, \
    ///      PRIMARY KEY (user_id, author_id))",
    /// )];
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("digest.db");
    /// let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await?;
    ///
    /// let mut tx = db.begin().await?;
    /// sqlx::query("INSERT INTO follows (user_id, author_id) VALUES ($1, $2)")
    ///     .bind("alice")
    ///     .bind("bob")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?;
    ///
    /// let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM follows")
    ///     .fetch_one(db.pool())
    ///     .await?;
    /// assert_eq!(n, 1);
    /// // Reopening finds the migration applied and leaves the data alone.
    /// db.close().await;
    /// let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await?;
    /// let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM follows")
    ///     .fetch_one(db.pool())
    ///     .await?;
    /// assert_eq!(n, 1);
    /// # Ok(()) }
    /// ```
    pub async fn open(target: &str, migrations: &[Migration]) -> Result<Db> {
        Self::open_with(target, DbOptions::default(), migrations).await
    }

    /// [`Db::open`] with options.
    pub async fn open_with(
        target: &str,
        options: DbOptions,
        migrations: &[Migration],
    ) -> Result<Db> {
        let db = Self::connect(target, options).await?;
        db.migrate(migrations).await?;
        Ok(db)
    }

    /// Connects without running any migration (see [`Db::migrate`]).
    pub async fn connect(target: &str, options: DbOptions) -> Result<Db> {
        install_drivers();
        let (backend, url) =
            if target.starts_with("postgres://") || target.starts_with("postgresql://") {
                (Backend::Postgres, target.to_owned())
            } else if target.contains(":memory:") || target.contains("mode=memory") {
                // Through the Any driver every pooled connection would get its own empty
                // in-memory database.
                return Err(StoreError::Config(
                    "in-memory SQLite is not supported; use a file in a temporary directory".into(),
                ));
            } else if target.starts_with("sqlite:") {
                (Backend::Sqlite, target.to_owned())
            } else {
                if target.is_empty() {
                    return Err(StoreError::Config("empty database location".into()));
                }
                let path = Path::new(target);
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    tessera_mesh::private::create_dir(parent).map_err(|e| {
                        StoreError::Config(format!("creating {}: {e}", parent.display()))
                    })?;
                }
                // The database holds secrets (password hashes, keys): owner-only from its
                // creation. SQLite gives its -wal and -shm files the database file's mode.
                tessera_mesh::private::touch(path)
                    .map_err(|e| StoreError::Config(format!("creating {}: {e}", path.display())))?;
                (Backend::Sqlite, sqlite_url(path)?)
            };
        let url = match (&options.ca_file, backend) {
            (Some(ca), Backend::Postgres) => with_ca(&url, ca),
            _ => url,
        };
        let connect_options: AnyConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;

        let schema = match (&options.schema, backend) {
            (Some(s), Backend::Postgres) => {
                if !valid_schema(s) {
                    return Err(StoreError::Config(format!(
                        "schema {s:?} must match [a-z_][a-z0-9_]{{0,62}}"
                    )));
                }
                // Create it once, on a connection of its own, before the pool sets search_path.
                let mut conn = AnyConnection::connect_with(&connect_options).await?;
                match script(&mut conn, &format!("CREATE SCHEMA IF NOT EXISTS \"{s}\"")).await {
                    // Two processes creating the same schema at once: one wins, both are fine.
                    Ok(_) | Err(StoreError::UniqueViolation { .. }) => {}
                    Err(e) => return Err(e),
                }
                conn.close().await?;
                Some(s.clone())
            }
            _ => None,
        };

        let busy_ms = options.busy_timeout.as_millis();
        let statement_timeout_ms = options.statement_timeout.map(|t| t.as_millis().max(1));
        let max = options.max_connections.unwrap_or(match backend {
            Backend::Sqlite => 8,
            Backend::Postgres => 10,
        });
        let pool = AnyPoolOptions::new()
            .max_connections(max.max(1))
            .acquire_timeout(options.acquire_timeout)
            .after_connect(move |conn, _meta| {
                let setup = match backend {
                    Backend::Sqlite => format!(
                        "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
                         PRAGMA busy_timeout = {busy_ms}; PRAGMA synchronous = NORMAL;"
                    ),
                    Backend::Postgres => {
                        let mut setup = match &schema {
                            Some(s) => format!("SET search_path TO \"{s}\";"),
                            None => String::new(),
                        };
                        if let Some(limit) = statement_timeout_ms {
                            setup.push_str(&format!("SET statement_timeout = {limit};"));
                        }
                        setup
                    }
                };
                Box::pin(async move {
                    if !setup.is_empty() {
                        sqlx::Executor::execute(&mut *conn, setup.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect_options)
            .await?;

        let (committed, _) = watch::channel(0);
        Ok(Db {
            inner: Arc::new(Inner {
                pool,
                backend,
                committed,
                poll_interval: options.poll_interval,
                write_turn: (backend == Backend::Sqlite).then(|| Arc::new(Semaphore::new(1))),
                turn_timeout: options.busy_timeout,
                outbox_retention: options.outbox_retention,
                epoch: OnceLock::new(),
            }),
        })
    }

    /// Creates the store's own tables (outbox, cursors, migration log), then applies the
    /// `migrations` not yet applied, each in its own transaction, in order. Safe to call on
    /// every start and from several processes at once (PostgreSQL serializes them with a
    /// table lock, SQLite with its write lock).
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<()> {
        let backend = self.inner.backend;
        let store_tables = match backend {
            Backend::Sqlite => STORE_TABLES_SQLITE,
            Backend::Postgres => STORE_TABLES_POSTGRES,
        };
        {
            let mut tx = self.begin().await?;
            if backend == Backend::Postgres {
                // CREATE TABLE IF NOT EXISTS races with itself on PostgreSQL.
                script(&mut tx, "SELECT pg_advisory_xact_lock(7365735)::text").await?;
            }
            script(&mut tx, store_tables).await?;
            // The outbox's epoch is drawn once, when its tables are created (or, for an
            // outbox older than epochs, on the first start that knows them), and never
            // changes: a recreated database has a new one, which consumers notice.
            sqlx::query(
                "INSERT INTO tessera_outbox_epoch (id, epoch, create_time) VALUES (1, $1, $2) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(uuid::Uuid::now_v7().simple().to_string())
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            let epoch: String =
                sqlx::query_scalar("SELECT epoch FROM tessera_outbox_epoch WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            let _ = self.inner.epoch.set(epoch);
        }

        for (i, migration) in migrations.iter().enumerate() {
            let version = i as i64 + 1;
            let mut tx = self.begin().await?;
            if backend == Backend::Postgres {
                script(&mut tx, "LOCK TABLE tessera_migrations IN EXCLUSIVE MODE").await?;
            }
            let applied: Option<String> =
                sqlx::query_scalar("SELECT name FROM tessera_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            match applied {
                Some(name) if name == migration.name => {
                    tx.rollback().await?;
                    continue;
                }
                Some(name) => {
                    return Err(StoreError::Migration {
                        version,
                        name: migration.name.to_owned(),
                        reason: format!("the database recorded {name:?} at this version"),
                    });
                }
                None => {}
            }
            script(&mut tx, migration.sql(backend))
                .await
                .map_err(|e| StoreError::Migration {
                    version,
                    name: migration.name.to_owned(),
                    reason: match e {
                        StoreError::Database(source)
                        | StoreError::UniqueViolation { source, .. } => source.to_string(),
                        other => other.to_string(),
                    },
                })?;
            sqlx::query(
                "INSERT INTO tessera_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(version)
            .bind(migration.name)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version, name = migration.name, "applied migration");
        }
        Ok(())
    }

    /// The engine behind this handle.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The outbox's epoch: a random id drawn when the outbox was created and carried by every
    /// event it streams, so consumers can tell this outbox from a recreated one whose
    /// sequences start again. `None` before [`Db::migrate`] ran.
    pub fn epoch(&self) -> Option<&str> {
        self.inner.epoch.get().map(String::as_str)
    }

    /// The pool, for reads outside a transaction: `sqlx::query(..).fetch_all(db.pool())`.
    /// Placeholders are `$1, $2, ...` on both engines.
    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Begins a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`), so a transaction that reads and then writes never fails with a
    /// stale snapshot; on PostgreSQL it is a plain READ COMMITTED transaction.
    ///
    /// On SQLite, write transactions of one handle queue for their turn first (at most the
    /// busy timeout, then [`StoreError::Busy`]); so never begin a second one while holding
    /// one in the same task.
    pub async fn begin(&self) -> Result<Tx> {
        let turn = match &self.inner.write_turn {
            Some(turn) => {
                match tokio::time::timeout(self.inner.turn_timeout, turn.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => Some(permit),
                    // The semaphore is never closed; treat it like a timeout if it ever is.
                    Ok(Err(_)) | Err(_) => return Err(StoreError::Busy(self.inner.turn_timeout)),
                }
            }
            None => None,
        };
        let inner = match self.inner.backend {
            Backend::Sqlite => self.inner.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.inner.pool.begin().await?,
        };
        Ok(Tx {
            inner,
            db: self.clone(),
            appended: None,
            _turn: turn,
        })
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    /// The current committed cursor position of consumer `name` (0 if it never ran).
    pub async fn cursor(&self, name: &str) -> Result<i64> {
        let pos: Option<i64> =
            sqlx::query_scalar("SELECT position FROM tessera_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        Ok(pos.unwrap_or(0))
    }

    /// Consumer `name`'s cursor: position, the producer epoch it follows (once it has seen
    /// one), and why it halted, if it did (see [`crate::run_consumer`]).
    pub async fn cursor_state(&self, name: &str) -> Result<CursorState> {
        let position = self.cursor(name).await?;
        let row: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT epoch, halted FROM tessera_cursor_epochs WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        let (epoch, halted) = row.unwrap_or_default();
        Ok(CursorState {
            name: name.to_owned(),
            position,
            epoch,
            halted,
        })
    }

    /// Every consumer cursor in this database, by name.
    pub async fn cursor_states(&self) -> Result<Vec<CursorState>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM tessera_cursors UNION SELECT name FROM tessera_cursor_epochs \
             ORDER BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.cursor_state(&name).await?);
        }
        Ok(out)
    }

    /// Records that consumer `name` halted, and why (kept until its cursor is reset or it
    /// applies an event again); `None` clears it.
    pub async fn set_halted(&self, name: &str, reason: Option<&str>) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO tessera_cursor_epochs (name, epoch, halted) VALUES ($1, NULL, $2) \
             ON CONFLICT (name) DO UPDATE SET halted = excluded.halted",
        )
        .bind(name)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The operator's deliberate resynchronisation: sets consumer `name`'s cursor to
    /// `position` and forgets the producer epoch it followed and any halt, so the consumer
    /// resumes after `position` in whatever outbox the producer has now. Returns the state
    /// before the reset.
    pub async fn reset_cursor(&self, name: &str, position: i64) -> Result<CursorState> {
        let before = self.cursor_state(name).await?;
        let mut tx = self.begin().await?;
        tx.set_cursor(name, position).await?;
        sqlx::query("DELETE FROM tessera_cursor_epochs WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(before)
    }
}

/// Where a consumer stands; see [`Db::cursor_state`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CursorState {
    /// The cursor name (by convention `<producer>-events`).
    pub name: String,
    /// The last applied sequence.
    pub position: i64,
    /// The producer's outbox epoch the position belongs to; `None` until an event with one
    /// was applied (or after a reset).
    pub epoch: Option<String>,
    /// Why the consumer stopped applying events, until an operator resets the cursor.
    pub halted: Option<String>,
}

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
    db: Db,
    /// The highest outbox sequence appended in this transaction.
    appended: Option<i64>,
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

    /// Appends an event to the outbox in this transaction and returns its sequence.
    ///
    /// Sequences are strictly increasing, and commit in sequence order: the append takes
    /// the outbox's write lock until the transaction ends (PostgreSQL `LOCK TABLE ... IN
    /// EXCLUSIVE MODE`; SQLite's write lock is already held). So append events as the LAST
    /// step of a transaction, after its other writes, to keep the lock short and to avoid
    /// lock-order deadlocks.
    pub async fn append_event(&mut self, payload: &[u8]) -> Result<i64> {
        if self.backend() == Backend::Postgres {
            script(self, "LOCK TABLE tessera_outbox IN EXCLUSIVE MODE").await?;
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO tessera_outbox (sequence, create_time, payload) \
             SELECT COALESCE(MAX(sequence), 0) + 1, $1, $2 FROM tessera_outbox \
             RETURNING sequence",
        )
        .bind(now_micros())
        .bind(payload)
        .fetch_one(&mut **self)
        .await?;
        self.appended = Some(self.appended.map_or(seq, |s| s.max(seq)));
        if let Some(retention) = self.db.inner.outbox_retention
            && seq % PRUNE_EVERY == 0
        {
            // Under the outbox lock this transaction already holds. Only a prefix goes: from
            // the oldest event up to the first one still within the retention (append times
            // follow sequences only as well as the replicas' clocks agree, and a hole in the
            // middle would read as pruned). At most PRUNE_WINDOW rows are looked at, more
            // than are appended between prunes, so the outbox shrinks back when it is over.
            // The row just appended always stays, so the next sequence still follows it.
            let cutoff = now_micros().saturating_sub(retention.as_micros() as i64);
            let oldest: Option<i64> =
                sqlx::query_scalar("SELECT MIN(sequence) FROM tessera_outbox")
                    .fetch_one(&mut **self)
                    .await?;
            let window_end = oldest.unwrap_or(seq).saturating_add(PRUNE_WINDOW - 1);
            let pruned = sqlx::query(
                "DELETE FROM tessera_outbox WHERE sequence < $1 AND sequence <= $3 AND sequence < \
                 COALESCE((SELECT MIN(sequence) FROM tessera_outbox \
                           WHERE sequence <= $3 AND create_time >= $2), $1)",
            )
            .bind(seq)
            .bind(cutoff)
            .bind(window_end)
            .execute(&mut **self)
            .await?
            .rows_affected();
            if pruned > 0 {
                tracing::debug!(pruned, before = seq, "pruned the outbox");
            }
        }
        Ok(seq)
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

    /// Consumer `name`'s cursor as seen by this transaction (0 if it never ran).
    pub async fn cursor(&mut self, name: &str) -> Result<i64> {
        let pos: Option<i64> =
            sqlx::query_scalar("SELECT position FROM tessera_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut **self)
                .await?;
        Ok(pos.unwrap_or(0))
    }

    /// Moves consumer `name`'s cursor forward to `position`, returning `false` (and changing
    /// nothing) if it is already there or beyond, i.e. the event was applied before.
    ///
    /// Call it FIRST in the transaction that applies the event: on PostgreSQL the update
    /// locks the cursor row, so two replicas of a consumer applying the same event serialize
    /// here and the second sees `false` once the first commits.
    pub async fn advance_cursor(&mut self, name: &str, position: i64) -> Result<bool> {
        sqlx::query(
            "INSERT INTO tessera_cursors (name, position) VALUES ($1, 0) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut **self)
        .await?;
        let moved = sqlx::query(
            "UPDATE tessera_cursors SET position = $1 WHERE name = $2 AND position < $1",
        )
        .bind(position)
        .bind(name)
        .execute(&mut **self)
        .await?
        .rows_affected();
        Ok(moved == 1)
    }

    /// Records `epoch` as the producer epoch consumer `name` follows, unless it already
    /// follows one; returns the epoch it follows now (so a caller seeing another value than
    /// `epoch` knows the producer changed under it).
    pub async fn follow_epoch(&mut self, name: &str, epoch: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO tessera_cursor_epochs (name, epoch, halted) VALUES ($1, $2, NULL) \
             ON CONFLICT (name) DO UPDATE SET epoch = COALESCE(tessera_cursor_epochs.epoch, \
             excluded.epoch)",
        )
        .bind(name)
        .bind(epoch)
        .execute(&mut **self)
        .await?;
        let followed: Option<String> =
            sqlx::query_scalar("SELECT epoch FROM tessera_cursor_epochs WHERE name = $1")
                .bind(name)
                .fetch_one(&mut **self)
                .await?;
        Ok(followed.unwrap_or_else(|| epoch.to_owned()))
    }

    /// Sets consumer `name`'s cursor to `position` unconditionally (e.g. to rewind).
    pub async fn set_cursor(&mut self, name: &str, position: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO tessera_cursors (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&mut **self)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(valid_schema("posts"));
        assert!(valid_schema("_t1"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema("a\"b"));
        assert!(!valid_schema(""));
        assert!(!valid_schema(&"a".repeat(64)));
    }

    #[test]
    fn a_ca_file_becomes_sslrootcert_and_verify_full() {
        let ca = Path::new("/etc/db ca/ca.crt");
        assert_eq!(
            with_ca("postgres://u:p@db:5432/posts", ca),
            "postgres://u:p@db:5432/posts?sslrootcert=/etc/db%20ca/ca.crt&sslmode=verify-full"
        );
        // An explicit sslmode is kept; a root certificate in the URL wins.
        assert_eq!(
            with_ca("postgres://db/posts?sslmode=verify-ca", ca),
            "postgres://db/posts?sslmode=verify-ca&sslrootcert=/etc/db%20ca/ca.crt"
        );
        let own = "postgres://db/posts?sslrootcert=/mine.crt";
        assert_eq!(with_ca(own, ca), own);
    }

    #[test]
    fn sqlite_urls_escape_url_syntax() {
        let url = sqlite_url(Path::new("/tmp/a b?c#d%e.db")).unwrap_or_default();
        assert_eq!(url, "sqlite:///tmp/a%20b%3Fc%23d%25e.db?mode=rwc");
    }
}
