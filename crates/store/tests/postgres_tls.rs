//! PostgreSQL over TLS with a CA of its own (`DbOptions::ca_file`, the binary's
//! `TESSERA_DATABASE_CA`), statement timeouts and pool bounds. Runs when
//! `TESSERA_TEST_DATABASE_TLS_URL` and `TESSERA_TEST_DATABASE_TLS_CA` are set
//! (scripts/postgres-tls.sh makes such a server; `.ci/run` calls it) and says it was skipped
//! otherwise.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tessera_store::{Db, DbOptions, StoreError};

fn server() -> Option<(String, String)> {
    match (
        std::env::var("TESSERA_TEST_DATABASE_TLS_URL"),
        std::env::var("TESSERA_TEST_DATABASE_TLS_CA"),
    ) {
        (Ok(url), Ok(ca)) if !url.is_empty() && !ca.is_empty() => Some((url, ca)),
        _ => {
            println!(
                "skipped: TESSERA_TEST_DATABASE_TLS_URL / TESSERA_TEST_DATABASE_TLS_CA unset (scripts/postgres-tls.sh)"
            );
            None
        }
    }
}

fn options(ca: Option<&str>) -> DbOptions {
    DbOptions {
        ca_file: ca.map(Into::into),
        acquire_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    }
}

async fn uses_tls(db: &Db) -> bool {
    let row: (bool,) = sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(db.pool())
        .await
        .unwrap();
    row.0
}

#[tokio::test]
async fn verify_full_against_the_database_ca() {
    let Some((url, ca)) = server() else { return };

    // The CA given as a setting: no sslmode in the URL becomes verify-full.
    let db = Db::connect(&url, options(Some(&ca))).await.unwrap();
    assert!(uses_tls(&db).await);
    db.close().await;

    // The standard way, in the URL, works the same.
    let in_url = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let db = Db::connect(&in_url, options(None)).await.unwrap();
    assert!(uses_tls(&db).await);
    db.close().await;

    // Without the CA, verify-full trusts only public roots: refused.
    let err = Db::connect(&format!("{url}?sslmode=verify-full"), options(None))
        .await
        .err()
        .unwrap();
    println!("without the CA: {err}");
    assert!(!matches!(err, StoreError::Config(_)), "{err:?}");

    // The certificate names localhost, not 127.0.0.1: verify-full checks the name.
    let by_address = url.replace("@localhost:", "@127.0.0.1:");
    assert_ne!(by_address, url, "the test URL should name localhost");
    let err = Db::connect(&by_address, options(Some(&ca)))
        .await
        .err()
        .unwrap();
    println!("by address: {err}");

    // Another CA: refused.
    let other = tempfile::tempdir().unwrap();
    let stranger = other.path().join("other-ca.crt");
    let other_ca = tessera_mesh::certs::Ca::generate("another CA").unwrap();
    std::fs::write(&stranger, other_ca.cert_pem()).unwrap();
    assert!(
        Db::connect(&url, options(Some(stranger.to_str().unwrap())))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn statement_timeout_and_pool_size_apply() {
    let Some((url, ca)) = server() else { return };
    let db = Db::connect(
        &url,
        DbOptions {
            statement_timeout: Some(Duration::from_millis(200)),
            max_connections: Some(1),
            acquire_timeout: Duration::from_millis(300),
            ..options(Some(&ca))
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(db.pool())
        .await
        .err()
        .unwrap();
    println!(
        "pg_sleep(5) under a 200 ms statement timeout: {err} after {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("statement timeout"), "{err}");

    // One connection, held by a transaction: a read waits out the acquire timeout and fails.
    let read = || sqlx::query("SELECT 1").fetch_one(db.pool());
    let held = db.begin().await.unwrap();
    let started = Instant::now();
    assert!(read().await.is_err());
    println!(
        "a read beside the held connection failed after {:?}",
        started.elapsed()
    );
    drop(held);
    assert!(read().await.is_ok());
    db.close().await;
}
