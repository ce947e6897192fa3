//! Migrations: the store's own tables, then a service's embedded migrations, each applied
//! once, in order.

use crate::{
    db::{Backend, Db, script},
    error::{Result, StoreError},
    now_micros,
};

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

impl Db {
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
                script(&mut *tx, "SELECT pg_advisory_xact_lock(7365735)::text").await?;
            }
            script(&mut *tx, store_tables).await?;
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
                script(&mut *tx, "LOCK TABLE tessera_migrations IN EXCLUSIVE MODE").await?;
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
            script(&mut *tx, migration.sql(backend))
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
        if backend == Backend::Sqlite {
            // A deferred constraint is checked at COMMIT: in a group, one transaction's
            // violation would fail the others' (see `DbOptions::group_commit`).
            let deferrable: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM sqlite_master WHERE sql LIKE '%DEFERRABLE%'",
            )
            .fetch_one(self.pool())
            .await?;
            if deferrable > 0 {
                self.inner
                    .group_commit
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
