//! Test databases for the tests of Tessera services, on both engines (what else tests share,
//! such as fakes and `eventually`, is in the `tessera-testing` crate).
//!
//! Every test that touches storage should also run on PostgreSQL when
//! `TESSERA_TEST_DATABASE_URL` is set; [`postgres`] (and, with the feature, `databases`)
//! print `skipped: TESSERA_TEST_DATABASE_URL not set` when it is not.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{Db, DbOptions, Migration, Result};

/// The environment variable naming the PostgreSQL server tests may use.
pub const TEST_DATABASE_URL: &str = "TESSERA_TEST_DATABASE_URL";

/// A fresh database on the PostgreSQL server named by `TESSERA_TEST_DATABASE_URL`, in a new
/// schema of its own (named after `label`, the process and a counter), with `migrations`
/// applied. When the variable is unset, prints `skipped: TESSERA_TEST_DATABASE_URL not set`
/// and returns `Ok(None)`. Schemas are left behind: point the variable at a throwaway
/// database.
pub async fn postgres(label: &str, migrations: &[Migration]) -> Result<Option<Db>> {
    let Ok(url) = std::env::var(TEST_DATABASE_URL) else {
        println!("skipped: {TEST_DATABASE_URL} not set");
        return Ok(None);
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let clean: String = label
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .take(24)
        .collect();
    let schema = format!(
        "t_{clean}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let options = DbOptions {
        schema: Some(schema),
        max_connections: Some(4),
        ..DbOptions::default()
    };
    Db::open_with(&url, options, migrations).await.map(Some)
}

/// One database a test runs against, from [`databases`].
#[cfg(feature = "testing")]
pub struct TestDb {
    /// `"sqlite"` or `"postgres"`, for assertion messages.
    pub name: &'static str,
    /// The database itself, migrated and empty.
    pub db: Db,
    /// Keeps the SQLite file's directory until the test is done with the database.
    _dir: Option<tempfile::TempDir>,
}

/// The databases a test runs against, each fresh, with `migrations` applied: SQLite in a new
/// temporary directory, then PostgreSQL when `TESSERA_TEST_DATABASE_URL` is set (see
/// [`postgres`]; `label` names the schema). Keep each [`TestDb`] alive while its database is
/// in use.
///
/// # Panics
///
/// When a database cannot be created: it is for tests only.
#[cfg(feature = "testing")]
pub async fn databases(label: &str, migrations: &[Migration]) -> Vec<TestDb> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("test.db");
    let path = path.to_str().expect("a UTF-8 temporary path");
    let sqlite = Db::open(path, migrations).await.expect("a SQLite database");
    let mut out = vec![TestDb {
        name: "sqlite",
        db: sqlite,
        _dir: Some(dir),
    }];
    if let Some(pg) = postgres(label, migrations)
        .await
        .expect("a PostgreSQL schema")
    {
        out.push(TestDb {
            name: "postgres",
            db: pg,
            _dir: None,
        });
    }
    out
}
