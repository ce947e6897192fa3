//! Helpers for tests that should also run against PostgreSQL.

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
