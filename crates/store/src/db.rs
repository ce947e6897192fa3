//! The database handle: opening SQLite or PostgreSQL, the pool, and where write
//! transactions begin.

use std::{
    path::Path,
    sync::{Arc, Once, OnceLock},
    time::Duration,
};

use sqlx::{
    AnyConnection, AnyPool, Connection,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use tokio::sync::{Mutex, watch};

use crate::{
    error::{Result, StoreError},
    migrate::Migration,
    options::DbOptions,
    tx::{Tx, WriterTx},
};

/// Which database engine stands behind a [`Db`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (any target that is not a PostgreSQL URL); one writer at a time.
    Sqlite,
    /// A PostgreSQL server, named by a `postgres://` URL.
    Postgres,
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
    /// Reads outside a transaction, on connections kept out of `pool` ([`Db::pool`]).
    pub(crate) reads: crate::reads::Reads,
    pub(crate) backend: Backend,
    /// The highest outbox sequence committed through this handle.
    pub(crate) committed: watch::Sender<i64>,
    /// The events committed through this handle lately, for its event streams.
    pub(crate) recent: std::sync::Mutex<crate::recent::Recent>,
    pub(crate) poll_interval: Duration,
    /// SQLite only: the handle's writer connection. Write transactions of this handle take
    /// turns for it, in arrival order, before `BEGIN IMMEDIATE`. SQLite allows one writer at a
    /// time, and waiting writers inside SQLite poll with growing sleeps (its busy handler),
    /// which put tens of milliseconds on the p99 of concurrent writes; queued here they start
    /// the moment the previous one commits. Another process writing the same file is waited
    /// for with async pauses, up to the busy timeout ([`crate::tx::WriterTx::begin`]).
    pub(crate) writer: Option<Arc<Mutex<Writer>>>,
    /// SQLite only: the file and the settings of the writer connection.
    pub(crate) writer_file: Option<(std::path::PathBuf, Vec<String>)>,
    /// SQLite only: how many write transactions are waiting for their turn.
    pub(crate) queued: std::sync::atomic::AtomicUsize,
    /// How long a write transaction waits for its turn (the busy timeout).
    pub(crate) turn_timeout: Duration,
    pub(crate) outbox_retention: Option<Duration>,
    /// This database's outbox epoch, read (or made) by [`Db::migrate`].
    pub(crate) epoch: OnceLock<String>,
    /// SQLite only: a transaction committed since the last checkpoint ([`checkpoints`]).
    pub(crate) dirty: std::sync::atomic::AtomicBool,
    /// SQLite only: [`DbOptions::wal_restart_bytes`] in WAL frames.
    pub(crate) wal_restart_frames: i64,
    /// SQLite only: write transactions queued for the turn share a COMMIT
    /// ([`DbOptions::group_commit`], off once the schema declares a deferrable constraint).
    pub(crate) group_commit: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Opens the writer connection (SQLite only).
    pub(crate) fn open_writer(&self) -> Result<crate::inline::InlineConn> {
        let (path, pragmas) = self
            .writer_file
            .as_ref()
            .ok_or_else(|| StoreError::Config("no writer connection on PostgreSQL".into()))?;
        Ok(crate::inline::InlineConn::open(path, pragmas)?)
    }
}

/// A pooled connection idle this long is pinged before it is handed out (a server restart or
/// a dropped TCP connection shows then, not in the caller's query).
pub(crate) const IDLE_PING_AFTER: Duration = Duration::from_secs(30);

/// How many times [`Db::close`] looks again for connections that came back late (5 ms apart).
const CLOSE_RETRIES: u32 = 400;

/// How often SQLite's WAL is checkpointed after writes (and every
/// `CHECKPOINT_IDLE_TICKS`-th tick regardless, for writes made outside [`crate::Tx`]). A
/// checkpoint copies every page written since the last one and competes for the CPU with the
/// requests while it runs: at 250 ms apart, CreatePost's slowest 2% at 16 in flight came in
/// bursts exactly 250 ms apart. Shorter, smaller checkpoints spread that cost.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
const CHECKPOINT_IDLE_TICKS: u32 = 100;

/// How much of a SQLite file each connection maps into memory. In WAL mode a connection drops
/// its whole page cache whenever another connection has written since its last read, so every
/// read after a write fetched its pages again with a `pread` each; mapped pages are read in
/// place. Address space only: memory is what the pages touched take, shared by the
/// connections (and counted in RSS).
const SQLITE_MMAP_BYTES: u64 = 256 << 20;

/// SQLite's page size (the default; the store never changes it), for WAL lengths in frames.
const SQLITE_PAGE_BYTES: u64 = 4096;

/// Copies SQLite's WAL into the database file off the write path, for as long as the handle
/// lives. SQLite's own automatic checkpoint runs inside the commit that crosses 1000 WAL pages
/// and syncs the database file there, so every few hundred writes one of them (and every writer
/// queued behind it) waited for an fsync: the p99 of CreatePost at 16 in flight. A PASSIVE
/// checkpoint here takes no write lock: writers keep appending to the WAL meanwhile.
///
/// That alone let the WAL grow for as long as writes kept coming (to 363 MiB in a minute of
/// scenario B): SQLite starts the WAL over only in a write transaction that began after a
/// checkpoint copied all of it, and with writers appending during every checkpoint none ever
/// did. Each append then went to a new block of a growing file (allocated and zeroed by the
/// filesystem, more page cache). So once the WAL holds [`DbOptions::wal_restart_bytes`], one
/// more checkpoint runs holding this handle's write turn, and the next writer starts the WAL
/// over. Writers wait for that one: 5-7 ms at the median in scenario B on the VM's disk, 0.35
/// ms on tmpfs (it syncs the WAL and the database file), and every call in flight waits with
/// them; hence a threshold large enough to make it rare (see
/// [`crate::DEFAULT_WAL_RESTART_BYTES`]). `journal_size_limit` cuts a WAL that a burst grew
/// back when it starts over.
fn checkpoints(inner: std::sync::Weak<Inner>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = 0u32;
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            // A group whose last writer went away while queued: nobody else holds the turn.
            if let Some(writer) = &inner.writer
                && let Ok(mut turn) = writer.try_lock()
                && turn.group.is_some()
                && let Err(err) = turn.commit_group(&inner)
            {
                tracing::warn!(error = %err, "committing an abandoned write group failed");
            }
            idle += 1;
            let dirty = inner
                .dirty
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if !dirty && idle < CHECKPOINT_IDLE_TICKS {
                continue;
            }
            idle = 0;
            if inner.pool.is_closed() {
                return;
            }
            if let Err(err) = checkpoint_and_restart(&inner).await {
                tracing::debug!(error = %err, "WAL checkpoint failed; the next one retries");
            }
        }
    });
}

/// One round of [`checkpoints`]: a PASSIVE checkpoint, and once the WAL is long, one more
/// with the write turn held, so that the next writer starts the WAL over.
async fn checkpoint_and_restart(inner: &Inner) -> Result<()> {
    // Copied in full or not, the WAL is started over only by a writer that begins after a
    // checkpoint with no commit during it.
    let frames = checkpoint(&mut *inner.pool.acquire().await?).await?;
    if frames < inner.wal_restart_frames {
        return Ok(());
    }
    let Some(writer) = &inner.writer else {
        return Ok(());
    };
    // On the writer connection, idle while the turn is held, but on a blocking thread: it takes
    // milliseconds, and the connection otherwise runs statements on the task that calls it.
    let mut turn = writer.lock().await;
    // Its members wait for a writer that may not come; the checkpoint needs it ended anyway.
    if let Err(err) = turn.commit_group(inner) {
        tracing::warn!(error = %err, "committing a write group failed");
    }
    let mut conn = match turn.conn.take() {
        Some(conn) => conn,
        None => inner.open_writer()?,
    };
    let (conn, checkpointed) = tokio::task::spawn_blocking(move || {
        let checkpointed = conn.checkpoint();
        (conn, checkpointed)
    })
    .await
    // Only a panic in SQLite's code gets here; the connection went with it and the next
    // writer opens another.
    .map_err(|_| StoreError::Database(sqlx::Error::WorkerCrashed))?;
    turn.conn = Some(conn);
    checkpointed?;
    Ok(())
}

/// Counts a write transaction waiting for its turn while it lives (dropped when the turn
/// comes, or when the wait is given up).
struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Queued<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The handle's writer connection, behind its turn (see [`Inner::writer`]).
#[derive(Default)]
pub(crate) struct Writer {
    /// Opened by the first write transaction and kept; closed and opened again only if a
    /// rollback failed.
    pub(crate) conn: Option<crate::inline::InlineConn>,
    /// The write transactions released into the connection's open SQLite transaction and
    /// waiting for its COMMIT ([`crate::group`]); `Some` while a transaction is open.
    pub(crate) group: Option<crate::group::Group>,
}

impl Writer {
    /// The connection, filled while a transaction is open.
    pub(crate) fn connection(&mut self) -> &mut crate::inline::InlineConn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("the writer connection is open during a transaction"))
    }

    /// Commits the open group, if any, and tells its members and the handle's event streams.
    /// On failure the transaction is rolled back and the members get the error too.
    pub(crate) fn commit_group(&mut self, inner: &Inner) -> std::result::Result<(), sqlx::Error> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        match self.connection().batch("COMMIT") {
            Ok(()) => {
                group.committed(inner);
                Ok(())
            }
            Err(err) => {
                // A COMMIT refused (by a deferred constraint) leaves the transaction open.
                group.failed(&err);
                self.roll_back();
                Err(err)
            }
        }
    }

    /// Rolls back the connection's open transaction, if any, with its group (whose members
    /// learn it failed). A transaction still open after that (which should not happen) goes
    /// with the connection, and the next writer opens another.
    pub(crate) fn roll_back(&mut self) {
        self.group = None;
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.is_autocommit() {
            return;
        }
        let rolled_back = conn.batch("ROLLBACK");
        if rolled_back.is_err() || !conn.is_autocommit() {
            tracing::warn!(error = ?rolled_back.err(), "rolling back a write transaction failed; reconnecting");
            self.close();
        }
    }

    /// Closes the connection, which rolls back what is open on it; an open group's members
    /// learn it failed.
    pub(crate) fn close(&mut self) {
        self.group = None;
        drop(self.conn.take());
    }
}

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` on `conn`; returns how many frames the WAL holds
/// (-1 when the file is not in WAL mode).
async fn checkpoint(conn: &mut AnyConnection) -> Result<i64> {
    let (_busy, frames, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(conn)
            .await?;
    Ok(frames)
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

/// The settings of every SQLite connection of a handle: WAL, checkpointed by the handle's own
/// task ([`checkpoints`]), files mapped for reads ([`SQLITE_MMAP_BYTES`]).
fn sqlite_pragmas(busy_ms: u128, wal_keep_bytes: u64) -> Vec<String> {
    vec![
        "PRAGMA journal_mode = WAL".to_owned(),
        "PRAGMA foreign_keys = ON".to_owned(),
        format!("PRAGMA busy_timeout = {busy_ms}"),
        "PRAGMA synchronous = NORMAL".to_owned(),
        "PRAGMA wal_autocheckpoint = 0".to_owned(),
        format!("PRAGMA mmap_size = {SQLITE_MMAP_BYTES}"),
        format!("PRAGMA journal_size_limit = {wal_keep_bytes}"),
    ]
}

/// Runs SQL without parameters, possibly several statements (simple query protocol).
pub(crate) async fn script<'c, E>(conn: E, sql: &str) -> Result<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
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
    /// SQLite connections use WAL (checkpointed by a task of the handle, off the write path),
    /// foreign keys and a busy timeout.
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
        // What a WAL keeps on disk when it starts over (`journal_size_limit`).
        let wal_keep_bytes = options.wal_restart_bytes.saturating_mul(2);
        let wal_restart_frames =
            i64::try_from(options.wal_restart_bytes / (SQLITE_PAGE_BYTES + 24)).unwrap_or(i64::MAX);
        let statement_timeout_ms = options.statement_timeout.map(|t| t.as_millis().max(1));
        let max = options.max_connections.unwrap_or(match backend {
            Backend::Sqlite => 8,
            Backend::Postgres => 10,
        });
        // The writer connection's own settings: those of the pooled connections, but with no
        // busy timeout (it runs on the caller's thread, which must not sleep in SQLite).
        let writer_file = match backend {
            Backend::Sqlite => {
                let options: sqlx::sqlite::SqliteConnectOptions = url
                    .parse()
                    .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;
                Some((
                    options.get_filename().to_owned(),
                    sqlite_pragmas(0, wal_keep_bytes),
                ))
            }
            Backend::Postgres => None,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max.max(1))
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings a connection on every acquire by default: a round trip to
            // PostgreSQL, or to the SQLite connection's thread, before every read and
            // transaction. It also pings on every release, which already catches a connection
            // that broke while in use; one idle for a while is still pinged before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                let setup = match backend {
                    Backend::Sqlite => sqlite_pragmas(busy_ms, wal_keep_bytes).join("; "),
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
        let db = Db {
            inner: Arc::new(Inner {
                // Half the pool may be kept for reads; the rest is for transactions.
                reads: crate::reads::Reads::new(pool.clone(), (max / 2) as usize),
                pool,
                backend,
                committed,
                recent: Default::default(),
                poll_interval: options.poll_interval,
                writer: (backend == Backend::Sqlite)
                    .then(|| Arc::new(Mutex::new(Writer::default()))),
                queued: std::sync::atomic::AtomicUsize::new(0),
                writer_file,
                turn_timeout: options.busy_timeout,
                outbox_retention: options.outbox_retention,
                epoch: OnceLock::new(),
                dirty: std::sync::atomic::AtomicBool::new(false),
                wal_restart_frames,
                group_commit: std::sync::atomic::AtomicBool::new(
                    options.group_commit && backend == Backend::Sqlite,
                ),
            }),
        };
        if backend == Backend::Sqlite {
            // The checkpoints that `wal_autocheckpoint = 0` (above) turned off in commits.
            checkpoints(Arc::downgrade(&db.inner));
        }
        Ok(db)
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

    /// Where reads outside a transaction go: `sqlx::query(..).fetch_all(db.pool())`, as on
    /// a sqlx pool (see [`Reads`](crate::Reads) for how it keeps its connections).
    /// Placeholders are `$1, $2, ...` on both engines.
    pub fn pool(&self) -> &crate::Reads {
        &self.inner.reads
    }

    /// Begins a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`), so a transaction that reads and then writes never fails with a
    /// stale snapshot; on PostgreSQL it is a plain READ COMMITTED transaction.
    ///
    /// On SQLite, write transactions of one handle queue for their turn first (at most the
    /// busy timeout, then [`StoreError::Busy`]); so never begin a second one while holding
    /// one in the same task.
    pub async fn begin(&self) -> Result<Tx> {
        let Some(writer) = &self.inner.writer else {
            return Ok(Tx::pooled(self.inner.pool.begin().await?, self.clone()));
        };
        let queued = Queued::new(&self.inner.queued);
        let turn = tokio::time::timeout(self.inner.turn_timeout, writer.clone().lock_owned())
            .await
            .map_err(|_| StoreError::Busy(self.inner.turn_timeout))?;
        drop(queued);
        let tx = WriterTx::begin(turn, self).await?;
        Ok(Tx::writer(tx, self.clone()))
    }

    /// How many write transactions are waiting for this handle's write turn (SQLite; always
    /// 0 on PostgreSQL, whose transactions do not take turns).
    pub fn writers_waiting(&self) -> usize {
        self.inner.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.inner.reads.close().await;
        if let Some(writer) = &self.inner.writer {
            let mut turn = writer.lock().await;
            if let Err(err) = turn.commit_group(&self.inner) {
                tracing::warn!(error = %err, "committing a write group failed");
            }
            turn.close();
        }
        let pool = &self.inner.pool;
        pool.close().await;
        // sqlx's close can return while a connection is on its way back to the pool (the
        // return pings first, and lands in the idle queue after close emptied it), leaving it
        // open until the last handle drops: close again until none is left, for a bounded time.
        for _ in 0..CLOSE_RETRIES {
            if pool.size() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            pool.close().await;
        }
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

    #[tokio::test]
    async fn sqlite_writes_reach_the_database_file_without_a_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let migrations = &[crate::Migration::portable(
            "blobs",
            "CREATE TABLE blobs (id BIGINT PRIMARY KEY, body TEXT NOT NULL)",
        )];
        let db = Db::open(path.to_str().unwrap(), migrations).await.unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let mut tx = db.begin().await.unwrap();
        for id in 0..64_i64 {
            sqlx::query("INSERT INTO blobs (id, body) VALUES ($1, $2)")
                .bind(id)
                .bind("x".repeat(32 * 1024))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        // The commit leaves its 2 MiB in the WAL (automatic checkpoints are off); the
        // handle's own checkpoint copies them into the file while the pool stays open.
        tessera_testing::eventually!(
            std::fs::metadata(&path).unwrap().len() >= before + 2 * 1024 * 1024,
            "the checkpoint grows the database file"
        );
        db.close().await;
    }

    #[test]
    fn sqlite_urls_escape_url_syntax() {
        let url = sqlite_url(Path::new("/tmp/a b?c#d%e.db")).unwrap_or_default();
        assert_eq!(url, "sqlite:///tmp/a%20b%3Fc%23d%25e.db?mode=rwc");
    }
}
