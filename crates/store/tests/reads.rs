//! Reads outside a transaction (`Db::pool`) on the connections the store keeps: right rows
//! after a cancelled read and after a statement error, under concurrency, and a connection
//! the server ended is UNAVAILABLE-class once, then replaced. SQLite always, PostgreSQL when
//! `TESSERA_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tempfile::TempDir;
use tessera_store::{Backend, Db, Migration, StoreError, testing};

const MIGRATIONS: &[Migration] = &[Migration::portable(
    "items",
    "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
)];

const ITEMS: i64 = 50;

async fn databases(label: &str) -> (Vec<Db>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reads.db");
    let mut dbs = vec![Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap()];
    if let Some(pg) = testing::postgres(label, MIGRATIONS).await.unwrap() {
        dbs.push(pg);
    }
    for db in &dbs {
        let mut tx = db.begin().await.unwrap();
        for n in 0..ITEMS {
            sqlx::query("INSERT INTO items (id, n) VALUES ($1, $2)")
                .bind(format!("i{n}"))
                .bind(n)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    (dbs, dir)
}

async fn n_of(db: &Db, n: i64) -> Result<i64, sqlx::Error> {
    let (found,): (i64,) = sqlx::query_as("SELECT n FROM items WHERE id = $1")
        .bind(format!("i{n}"))
        .fetch_one(db.pool())
        .await?;
    Ok(found)
}

/// Every row read back as itself, one after another and many at once.
async fn assert_reads_right(db: &Db, what: &str) {
    for n in 0..ITEMS {
        assert_eq!(n_of(db, n).await.unwrap(), n, "{what}");
    }
    let all = futures::future::join_all((0..ITEMS).map(|n| n_of(db, n))).await;
    for (n, found) in all.into_iter().enumerate() {
        assert_eq!(found.unwrap(), n as i64, "{what}: concurrent read {n}");
    }
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, n FROM items ORDER BY n")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, ITEMS, "{what}");
}

#[tokio::test]
async fn reads_stay_right_after_cancelled_reads_and_statement_errors() {
    let (dbs, _dir) = databases("reads_cancel").await;
    for db in &dbs {
        let backend = format!("{:?}", db.backend());
        assert_reads_right(db, &backend).await;

        // Reads cancelled part-way, several at once: their connections must not serve a
        // later read with a half-read answer.
        let slow = match db.backend() {
            Backend::Postgres => "SELECT pg_sleep(0.3)::text AS s",
            Backend::Sqlite => {
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) \
                 SELECT COUNT(*) AS s FROM c"
            }
        };
        let cancelled = futures::future::join_all((0..3).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(20),
                sqlx::query(slow).fetch_one(db.pool()),
            )
        }))
        .await;
        assert!(
            cancelled.iter().all(Result::is_err),
            "{backend}: a slow read finished within 20 ms"
        );
        assert_reads_right(db, &format!("{backend} after cancelled reads")).await;

        // A statement the database refuses leaves its connection usable.
        for _ in 0..3 {
            let Err(err) = sqlx::query("SELECT no_such_column FROM items")
                .fetch_all(db.pool())
                .await
            else {
                panic!("{backend}: a bad statement ran");
            };
            assert!(
                matches!(err, sqlx::Error::Database(_)),
                "{backend}: {err:?}"
            );
            assert!(!StoreError::from(err).is_transient(), "{backend}");
        }
        assert_reads_right(db, &format!("{backend} after statement errors")).await;

        // A write outside a transaction goes through the same connections.
        sqlx::query("UPDATE items SET n = n + 1000 WHERE id = $1")
            .bind("i0")
            .execute(db.pool())
            .await
            .unwrap();
        assert_eq!(n_of(db, 0).await.unwrap(), 1000, "{backend}");
        db.close().await;
    }
}

#[tokio::test]
async fn a_connection_the_server_ended_fails_one_read_as_unavailable_then_is_replaced() {
    let Some(db) = testing::postgres("reads_terminated", MIGRATIONS)
        .await
        .unwrap()
    else {
        return;
    };
    let pid = || async {
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(db.pool())
            .await?;
        Ok::<i32, sqlx::Error>(pid)
    };
    // Reads one after another reuse the kept connection.
    let kept = pid().await.unwrap();
    assert_eq!(pid().await.unwrap(), kept);

    // The server ends that backend (as a restart would), from another connection.
    let mut tx = db.begin().await.unwrap();
    let (ended,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(kept)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(ended);

    // At most one read fails, with an error callers answer as UNAVAILABLE; then reads get a
    // new connection.
    let mut failures = 0;
    let replaced = loop {
        match pid().await {
            Ok(pid) => break pid,
            Err(err) => {
                failures += 1;
                let err = StoreError::from(err);
                assert!(err.is_transient(), "{err:?}");
                assert!(failures < 2, "a second read failed: {err:?}");
            }
        }
    };
    assert_ne!(replaced, kept);
    println!("reads after the backend was ended: {failures} failed, then pid {replaced}");
    db.close().await;
}

#[tokio::test]
async fn a_kept_connection_sees_what_another_handle_committed() {
    // Two handles on one SQLite file, as the bench and a running service are: the reader's
    // kept connection must not hold on to an old snapshot.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.db");
    let writer = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let reader = Db::open(path.to_str().unwrap(), &[]).await.unwrap();
    for i in 0..200i64 {
        let mut tx = writer.begin().await.unwrap();
        sqlx::query("INSERT INTO items (id, n) VALUES ($1, $2)")
            .bind(format!("x{i}"))
            .bind(i)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM items")
            .fetch_one(reader.pool())
            .await
            .unwrap();
        assert_eq!(count, i + 1, "a stale read after commit {i}");
        assert_eq!(reader.cursor("nobody").await.unwrap(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_closes_every_connection_before_it_returns() {
    // On SQLite the last connection to close removes the WAL file: anything that copies the
    // files after `close` (a backup, the bench's monolith) must find them settled.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("close.db");
    let wal = dir.path().join("close.db-wal");
    let open_handles = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p == &path)
            .count()
    };
    for round in 0..60 {
        let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
        // Kept connections and pooled ones, some still on their way back when close begins.
        let reads = futures::future::join_all((0..8).map(|_| {
            sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM items").fetch_one(db.pool())
        }))
        .await;
        assert!(reads.iter().all(Result::is_ok), "round {round}");
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO items (id, n) VALUES ($1, 1)")
            .bind(format!("r{round}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        db.close().await;
        assert_eq!(open_handles(), 0, "round {round}: connections left open");
        assert!(!wal.exists(), "round {round}: the WAL is still there");
    }
}
