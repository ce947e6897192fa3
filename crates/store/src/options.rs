//! How a [`Db`] is opened beyond its location, and the process-wide defaults.

use std::time::Duration;

use crate::outbox::DEFAULT_OUTBOX_RETENTION;
#[cfg(doc)]
use crate::{Db, StoreError, outbox::PRUNE_EVERY};

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
    /// SQLite only: once the WAL holds this many bytes, a checkpoint runs with the write turn
    /// held (writers wait for it, a few milliseconds) so that the next writer starts the WAL
    /// over. Under writes that never pause the WAL is otherwise never started over and grows
    /// by everything written. Its file is cut back to twice this when it starts over.
    pub wal_restart_bytes: u64,
    /// SQLite only: write transactions that queue for the writer connection share one SQLite
    /// transaction (a savepoint each) and one COMMIT, which writes the pages they all
    /// changed once. Each still commits or fails whole and returns only once committed; if
    /// the shared COMMIT fails, all of them fail. Off by itself for a schema that declares
    /// a `DEFERRABLE` constraint (checked at COMMIT, where one member's violation would fail
    /// the others).
    pub group_commit: bool,
}

/// [`DbOptions::wal_restart_bytes`] by default. Each start-over holds every writer of the
/// database for the few milliseconds of its checkpoint, and every call in flight waits it out:
/// at 16 CreatePosts in flight in scenario B, a trace of every call put the slowest ones, all
/// sixteen held at once, on those holds. At 32 MiB the WAL still started over two to three
/// times a second at that load, about 1% of the calls behind a hold: the p99's edge. In
/// alternating runs on a quick VM, 64 MiB gave the mesh's p99 6.4-6.9 ms against 6.5-7.7 at
/// 32 MiB and the monolith's 5.7-6.4 against 6.6-8.0, at the same CPU per request. (Earlier, 32
/// against 8 MiB: 10.9-11.7 against 11.8-13.9 ms on a slow VM; with writes on sqlx's connection
/// threads, whose CPU hid it, 64 MiB had cost more CPU.) The WAL file it leaves on disk is that
/// size, up to twice it after a burst.
pub const DEFAULT_WAL_RESTART_BYTES: u64 = 64 << 20;

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
            wal_restart_bytes: DEFAULT_WAL_RESTART_BYTES,
            group_commit: true,
        }
    }
}
