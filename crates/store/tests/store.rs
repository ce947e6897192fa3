//! Storage behaviour, on SQLite always and on PostgreSQL when `TESSERA_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use sqlx::Row;
use tempfile::TempDir;
use tessera_store::{Backend, Consumer, Db, Migration, StoreError, Tx, run_consumer, testing};
use tessera_testing::eventually;
use tokio::sync::watch;

const MIGRATIONS: &[Migration] = &[
    Migration::portable(
        "items",
        "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, n BIGINT NOT NULL);
         CREATE INDEX items_n ON items (n);",
    ),
    Migration::per_backend(
        "blobs",
        "CREATE TABLE blobs (id TEXT PRIMARY KEY, data BLOB NOT NULL, flag BIGINT NOT NULL)",
        "CREATE TABLE blobs (id TEXT PRIMARY KEY, data BYTEA NOT NULL, flag BIGINT NOT NULL)",
    ),
];

/// The databases a test runs against: a fresh SQLite file, and a fresh PostgreSQL schema
/// when configured. The TempDir keeps the SQLite file alive.
async fn databases(label: &str) -> (Vec<Db>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested dir").join("db?#.sqlite");
    let mut dbs = vec![Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap()];
    if let Some(pg) = testing::postgres(label, MIGRATIONS).await.unwrap() {
        dbs.push(pg);
    }
    (dbs, dir)
}

#[tokio::test]
async fn bad_locations_are_config_errors() {
    for target in ["", "sqlite::memory:", "sqlite://x?mode=memory"] {
        let err = Db::open(target, MIGRATIONS).await.unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{target}: {err:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("u.db").display());
    let db = Db::open(&url, MIGRATIONS).await.unwrap();
    assert_eq!(db.backend(), Backend::Sqlite);
}

#[tokio::test]
async fn sqlite_file_uses_wal_and_foreign_keys() {
    let (dbs, _dir) = databases("pragmas").await;
    let db = &dbs[0];
    assert_eq!(db.backend(), Backend::Sqlite);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    // Reads take mapped pages in place rather than a `pread` per page.
    let mapped: i64 = sqlx::query_scalar("PRAGMA mmap_size")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(mapped >= 64 << 20, "mmap_size {mapped}");
}

#[tokio::test]
async fn placeholders_bind_by_number_on_both_backends() {
    let (dbs, _dir) = databases("placeholders").await;
    for db in dbs {
        // $2 before $1, and $2 used twice; the second run of the same text takes the
        // parameter numbers the writer connection kept from the first.
        for (name, id, n) in [("beta", "id-0", 6_i64), ("alpha", "id-1", 7)] {
            let mut tx = db.begin().await.unwrap();
            sqlx::query("INSERT INTO items (id, name, n) VALUES ($2, $1 || '-' || $2, $3)")
                .bind(name)
                .bind(id)
                .bind(n)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let beta: String = sqlx::query_scalar("SELECT name FROM items WHERE id = $1 AND n = $2")
            .bind("id-0")
            .bind(6_i64)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(beta, "beta-id-0");
        let row = sqlx::query("SELECT id, name, n FROM items WHERE n = $1 AND id = $2")
            .bind(7_i64)
            .bind("id-1")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>(0), "id-1");
        assert_eq!(row.get::<String, _>(1), "alpha-id-1");
        assert_eq!(row.get::<i64, _>(2), 7);

        // SQL metacharacters are data, not syntax.
        let nasty = "'; DROP TABLE items; -- \" \\ % _ $1";
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO items (id, name, n) VALUES ($1, $2, 0)")
            .bind("id-2")
            .bind(nasty)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO blobs (id, data, flag) VALUES ($1, $2, $3)")
            .bind("b")
            .bind(&[0_u8, 1, 255][..])
            .bind(1_i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let name: String = sqlx::query_scalar("SELECT name FROM items WHERE id = $1")
            .bind("id-2")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(name, nasty);
        let row = sqlx::query("SELECT data, flag FROM blobs WHERE id = $1")
            .bind("b")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<Vec<u8>, _>(0), vec![0, 1, 255]);
        assert_eq!(row.get::<i64, _>(1), 1);
    }
}

#[tokio::test]
async fn migrations_apply_once_and_detect_edits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let path = path.to_str().unwrap();
    let db = Db::open(path, &MIGRATIONS[..1]).await.unwrap();
    db.close().await;
    // Reopen with one more migration: only the new one runs (the first would fail if re-run).
    let db = Db::open(path, MIGRATIONS).await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM tessera_migrations ORDER BY version")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(versions, vec![1, 2]);
    db.close().await;
    let db = Db::open(path, MIGRATIONS).await.unwrap();
    db.close().await;

    let edited = [Migration::portable("renamed", "SELECT 1"), MIGRATIONS[1]];
    let err = Db::open(path, &edited).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Migration { version: 1, .. }),
        "{err:?}"
    );

    // A failing migration leaves nothing half-applied.
    let broken = [
        MIGRATIONS[0],
        MIGRATIONS[1],
        Migration::portable("bad", "CREATE TABLE x (; nonsense"),
    ];
    assert!(matches!(
        Db::open(path, &broken).await.unwrap_err(),
        StoreError::Migration { version: 3, .. }
    ));

    if let Some(pg) = testing::postgres("migrations", MIGRATIONS).await.unwrap() {
        // Running them again on the same schema is a no-op.
        pg.migrate(MIGRATIONS).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tessera_migrations")
            .fetch_one(pg.pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
    }
}

#[tokio::test]
async fn unique_violations_are_distinguishable() {
    let (dbs, _dir) = databases("unique").await;
    for db in dbs {
        let insert = |id: &'static str, name: &'static str| {
            let db = db.clone();
            async move {
                let mut tx = db.begin().await?;
                sqlx::query("INSERT INTO items (id, name, n) VALUES ($1, $2, 1)")
                    .bind(id)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
        };
        insert("a", "x").await.unwrap();
        let dup_key = insert("a", "y").await.unwrap_err();
        assert!(dup_key.is_unique_violation(), "{dup_key:?}");
        let dup_name = insert("b", "x").await.unwrap_err();
        assert!(dup_name.is_unique_violation(), "{dup_name:?}");
        if db.backend() == Backend::Postgres {
            assert!(matches!(
                dup_name,
                StoreError::UniqueViolation { constraint: Some(ref c), .. } if c.contains("name")
            ));
        }
        // Other errors are not unique violations.
        let other = sqlx::query("SELECT * FROM no_such_table")
            .execute(db.pool())
            .await
            .map_err(StoreError::from)
            .unwrap_err();
        assert!(!other.is_unique_violation());
    }
}

#[tokio::test]
async fn outbox_appends_with_the_change_or_not_at_all() {
    let (dbs, _dir) = databases("outbox").await;
    for db in dbs {
        assert_eq!(db.last_sequence().await.unwrap(), 0);

        let mut tx = db.begin().await.unwrap();
        let s1 = tx.append_event(b"one").await.unwrap();
        let s2 = tx.append_event(b"two").await.unwrap();
        tx.commit().await.unwrap();
        assert!(s2 > s1);

        // Rolled back: neither the change nor the event.
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO items (id, name, n) VALUES ('r', 'r', 0)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.append_event(b"lost").await.unwrap();
        tx.rollback().await.unwrap();
        // Dropped without commit: same.
        {
            let mut tx = db.begin().await.unwrap();
            tx.append_event(b"dropped").await.unwrap();
        }

        let mut tx = db.begin().await.unwrap();
        let s3 = tx.append_event(b"three").await.unwrap();
        tx.commit().await.unwrap();
        assert!(s3 > s2);

        let all = db.read_events(0, 100).await.unwrap();
        let payloads: Vec<&[u8]> = all.iter().map(|e| e.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"two", b"three"]);
        assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert!(all.iter().all(|e| e.create_time > 0));
        let after = db.read_events(s1, 1).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].sequence, s2);
        assert!(db.read_events(s3, 10).await.unwrap().is_empty());
        assert_eq!(db.last_sequence().await.unwrap(), s3);
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE id = 'r'")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
}

#[tokio::test]
async fn a_batch_of_events_appends_in_order_after_single_ones() {
    let (dbs, _dir) = databases("outbox_batch").await;
    for db in dbs {
        let mut tx = db.begin().await.unwrap();
        let first = tx.append_event(b"single").await.unwrap();
        assert!(tx.append_events(&[]).await.unwrap().is_empty());
        // More rows than one INSERT takes, so the chunks must continue each other.
        let batch: Vec<Vec<u8>> = (0..1203).map(|i| format!("b{i}").into_bytes()).collect();
        let sequences = tx.append_events(&batch).await.unwrap();
        let last = tx.append_event(b"after").await.unwrap();
        tx.commit().await.unwrap();
        let expected: Vec<i64> = (first + 1..=first + 1203).collect();
        assert_eq!(sequences, expected);
        assert_eq!(last, first + 1204);

        let all = db.read_events(0, 2000).await.unwrap();
        let payloads: Vec<Vec<u8>> = all.iter().map(|e| e.payload.clone()).collect();
        let mut want = vec![b"single".to_vec()];
        want.extend(batch);
        want.push(b"after".to_vec());
        assert_eq!(payloads, want);
        assert_eq!(db.last_sequence().await.unwrap(), last);

        // A live stream is woken by the batch's commit like by a single append.
        let mut live = Box::pin(db.events(last));
        let mut tx = db.begin().await.unwrap();
        tx.append_events(&[b"x".to_vec(), b"y".to_vec()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .expect("the stream wakes")
            .unwrap()
            .unwrap();
        assert_eq!((next.sequence, next.payload), (last + 1, b"x".to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_increasing_sequences() {
    let (dbs, _dir) = databases("concurrent").await;
    for db in dbs {
        // A follower started before the writers sees every event exactly once, in order.
        let follower = tokio::spawn(
            db.events(0)
                .take(80)
                .map(|e| e.unwrap().sequence)
                .collect::<Vec<_>>(),
        );
        let mut writers = Vec::new();
        for w in 0..8 {
            let db = db.clone();
            writers.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..10 {
                    let id = format!("w{w}-{i}");
                    let mut tx = db.begin().await.unwrap();
                    sqlx::query("INSERT INTO items (id, name, n) VALUES ($1, $1, $2)")
                        .bind(&id)
                        .bind(i64::from(i))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    seqs.push(tx.append_event(id.as_bytes()).await.unwrap());
                    tx.commit().await.unwrap();
                }
                seqs
            }));
        }
        let mut all = HashSet::new();
        for w in writers {
            for s in w.await.unwrap() {
                assert!(all.insert(s), "sequence {s} handed out twice");
            }
        }
        assert_eq!(all.len(), 80);
        let seen = tokio::time::timeout(Duration::from_secs(20), follower)
            .await
            .expect("the follower saw every event")
            .unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.into_iter().collect::<HashSet<_>>(), all);
    }
}

/// SQLite write transactions of one handle queue for their turn: with a busy timeout far
/// shorter than the whole burst, every writer still gets in (each waits only for the ones
/// ahead of it, whose transactions are short), and one that would have to wait longer than
/// the timeout gets a clear `Busy` instead of hanging.
#[tokio::test]
async fn sqlite_writers_take_turns_and_time_out_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let options = tessera_store::DbOptions {
        busy_timeout: Duration::from_millis(500),
        ..tessera_store::DbOptions::default()
    };
    let path = dir.path().join("turns.sqlite");
    let db = Db::open_with(path.to_str().unwrap(), options, MIGRATIONS)
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..32 {
        let db = db.clone();
        writers.push(tokio::spawn(async move {
            let mut tx = db.begin().await?;
            sqlx::query("INSERT INTO items (id, name, n) VALUES ($1, $1, $2)")
                .bind(format!("w{w}"))
                .bind(i64::from(w))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }));
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 32);

    let held = db.begin().await.unwrap();
    let started = std::time::Instant::now();
    let err = match db.begin().await {
        Ok(_) => panic!("a second writer got in while the first held the database"),
        Err(err) => err,
    };
    assert!(err.is_busy(), "{err:?}");
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Reads are not queued behind the writer (WAL).
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 32);
    held.rollback().await.unwrap();
    // The turn is given back: the next writer gets in at once.
    let tx = tokio::time::timeout(Duration::from_millis(400), db.begin())
        .await
        .expect("the turn was released")
        .unwrap();
    tx.commit().await.unwrap();
}

/// Old outbox events are pruned as new ones are appended; the newest is always kept, so
/// sequences go on from it; a reader whose cursor is older than what is kept gets `Pruned`
/// (never a silent gap), and a reader within what is kept reads on.
#[tokio::test]
async fn outbox_prunes_old_events_and_readers_behind_it_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let options = tessera_store::DbOptions {
        outbox_retention: Some(Duration::ZERO),
        ..tessera_store::DbOptions::default()
    };
    let sqlite = dir.path().join("pruned.sqlite");
    let mut dbs = vec![
        Db::open_with(sqlite.to_str().unwrap(), options.clone(), MIGRATIONS)
            .await
            .unwrap(),
    ];
    if let Ok(url) = std::env::var(testing::TEST_DATABASE_URL) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!("t_pruned_{}_{nanos}", std::process::id());
        let pg = tessera_store::DbOptions {
            schema: Some(schema),
            ..options.clone()
        };
        dbs.push(Db::open_with(&url, pg, MIGRATIONS).await.unwrap());
    }
    let every = tessera_store::PRUNE_EVERY;
    for db in dbs {
        let total = every + 10;
        for i in 0..total {
            let mut tx = db.begin().await.unwrap();
            tx.append_event(format!("e{i}").as_bytes()).await.unwrap();
            tx.commit().await.unwrap();
        }
        // Pruned when sequence `every` was appended: everything before it.
        let kept = db.read_events(0, 1000).await.unwrap();
        assert_eq!(kept.first().map(|e| e.sequence), Some(every));
        assert_eq!(kept.len() as i64, total - every + 1);
        assert_eq!(db.last_sequence().await.unwrap(), total);

        let mut behind = Box::pin(db.events(3));
        match behind.next().await {
            Some(Err(StoreError::Pruned { after, oldest })) => {
                assert_eq!((after, oldest), (3, every));
            }
            other => panic!("expected Pruned, got {other:?}"),
        }
        assert!(
            behind.next().await.is_none(),
            "the stream ends after Pruned"
        );

        let mut within = Box::pin(db.events(every - 1));
        let first = within.next().await.unwrap().unwrap();
        assert_eq!(first.sequence, every);
        assert_eq!(first.payload, format!("e{}", every - 1).into_bytes());
    }

    // Without retention nothing is pruned.
    let kept_all = dir.path().join("kept.sqlite");
    let options = tessera_store::DbOptions {
        outbox_retention: None,
        ..tessera_store::DbOptions::default()
    };
    let db = Db::open_with(kept_all.to_str().unwrap(), options, MIGRATIONS)
        .await
        .unwrap();
    for _ in 0..every {
        let mut tx = db.begin().await.unwrap();
        tx.append_event(b"x").await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(db.read_events(0, 1000).await.unwrap().len() as i64, every);
}

/// Pruning removes only a prefix: an old event after a recent one (clocks of replicas that
/// disagree) stays until everything before it has gone, so readers never meet a hole.
#[tokio::test]
async fn outbox_pruning_never_leaves_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let options = tessera_store::DbOptions {
        outbox_retention: Some(Duration::from_secs(3600)),
        ..tessera_store::DbOptions::default()
    };
    let path = dir.path().join("prefix.sqlite");
    let db = Db::open_with(path.to_str().unwrap(), options, MIGRATIONS)
        .await
        .unwrap();
    let every = tessera_store::PRUNE_EVERY;
    for _ in 1..every {
        let mut tx = db.begin().await.unwrap();
        tx.append_event(b"e").await.unwrap();
        tx.commit().await.unwrap();
    }
    // 1..=100 and 150..=200 are older than the retention; 101..=149 are recent.
    sqlx::query(
        "UPDATE tessera_outbox SET create_time = 0 \
         WHERE sequence <= 100 OR (sequence >= 150 AND sequence <= 200)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let mut tx = db.begin().await.unwrap();
    assert_eq!(tx.append_event(b"e").await.unwrap(), every);
    tx.commit().await.unwrap();
    let kept = db.read_events(0, 1000).await.unwrap();
    assert_eq!(kept.first().map(|e| e.sequence), Some(101));
    assert!(
        kept.windows(2).all(|w| w[1].sequence == w[0].sequence + 1),
        "no holes"
    );
    assert_eq!(kept.last().map(|e| e.sequence), Some(every));
}

#[tokio::test]
async fn events_stream_catches_up_then_follows_live() {
    let (dbs, _dir) = databases("stream").await;
    for db in dbs {
        let append = |payload: &'static [u8]| {
            let db = db.clone();
            async move {
                let mut tx = db.begin().await.unwrap();
                let s = tx.append_event(payload).await.unwrap();
                tx.commit().await.unwrap();
                s
            }
        };
        let s1 = append(b"a").await;
        let s2 = append(b"b").await;
        let mut stream = Box::pin(db.events(s1));
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!((first.sequence, first.payload.as_slice()), (s2, &b"b"[..]));

        // Nothing more yet: the stream waits rather than ending.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), stream.next())
                .await
                .is_err()
        );

        // A commit through a clone of the handle wakes it.
        let s3 = append(b"c").await;
        let live = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("live event")
            .unwrap()
            .unwrap();
        assert_eq!((live.sequence, live.payload.as_slice()), (s3, &b"c"[..]));

        // More than one batch of backlog arrives complete and in order.
        let mut tx = db.begin().await.unwrap();
        for _ in 0..300 {
            tx.append_event(b"bulk").await.unwrap();
        }
        tx.commit().await.unwrap();
        let bulk: Vec<i64> = db
            .events(s3)
            .take(300)
            .map(|e| e.unwrap().sequence)
            .collect()
            .await;
        assert_eq!(bulk.len(), 300);
        assert!(bulk.windows(2).all(|w| w[0] < w[1]));
    }
}

/// A handle's streams take the events it just committed from memory; events another handle
/// committed in between, and a rolled-back append, must not make them skip or invent one.
#[tokio::test]
async fn streams_see_other_handles_events_and_no_rolled_back_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let b = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    let append = |db: &Db, payload: &'static [u8]| {
        let db = db.clone();
        async move {
            let mut tx = db.begin().await.unwrap();
            tx.append_event(payload).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    let stream = a.events(0).take(5).map(|e| {
        let e = e.unwrap();
        (e.sequence, String::from_utf8(e.payload).unwrap())
    });
    let seen = tokio::spawn(stream.collect::<Vec<_>>());
    append(&a, b"a1").await;
    append(&b, b"b2").await;
    append(&a, b"a3").await;
    let mut tx = a.begin().await.unwrap();
    tx.append_event(b"rolled back").await.unwrap();
    tx.rollback().await.unwrap();
    append(&a, b"a4").await;
    append(&a, b"a5").await;
    let seen = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .expect("the stream saw five events")
        .unwrap();
    let expected: Vec<(i64, String)> = ["a1", "b2", "a3", "a4", "a5"]
        .iter()
        .zip(1..)
        .map(|(p, s)| (s, p.to_string()))
        .collect();
    assert_eq!(seen, expected);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn cursors_advance_atomically_with_the_effect() {
    let (dbs, _dir) = databases("cursors").await;
    for db in dbs {
        assert_eq!(db.cursor("c").await.unwrap(), 0);
        let mut tx = db.begin().await.unwrap();
        assert!(tx.advance_cursor("c", 5).await.unwrap());
        assert_eq!(tx.cursor("c").await.unwrap(), 5);
        tx.rollback().await.unwrap();
        assert_eq!(db.cursor("c").await.unwrap(), 0, "rolled back with the tx");

        let mut tx = db.begin().await.unwrap();
        assert!(tx.advance_cursor("c", 5).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(db.cursor("c").await.unwrap(), 5);

        let mut tx = db.begin().await.unwrap();
        assert!(
            !tx.advance_cursor("c", 5).await.unwrap(),
            "same event again"
        );
        assert!(!tx.advance_cursor("c", 3).await.unwrap(), "older event");
        assert!(
            tx.advance_cursor("other", 1).await.unwrap(),
            "cursors are per name"
        );
        tx.set_cursor("c", 2).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(db.cursor("c").await.unwrap(), 2);
        assert_eq!(db.cursor("other").await.unwrap(), 1);
    }
}

/// Follows `source`'s outbox into `items` rows of the target database. It deliberately
/// misbehaves: the first open fails, every stream replays two events before the cursor and
/// ends after three, so exactly-once must come from the cursor check.
struct Mirror {
    source: Db,
    opens: Arc<AtomicUsize>,
}

impl Consumer for Mirror {
    type Event = (i64, Vec<u8>);
    type Error = String;
    type Stream = BoxStream<'static, Result<(i64, Vec<u8>), String>>;

    fn name(&self) -> &str {
        "mirror"
    }

    async fn open(&self, after: i64) -> Result<Self::Stream, String> {
        if self.opens.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err("upstream unavailable".into());
        }
        let source = self.source.events((after - 2).max(0)).map(|e| {
            e.map(|e| (e.sequence, e.payload))
                .map_err(|e| e.to_string())
        });
        // Ends after a few events so the consumer has to reconnect.
        Ok(source.take(3).boxed())
    }

    fn sequence(&self, event: &Self::Event) -> i64 {
        event.0
    }

    async fn apply(&self, tx: &mut Tx, event: Self::Event) -> Result<(), StoreError> {
        let name = String::from_utf8_lossy(&event.1).into_owned();
        sqlx::query("INSERT INTO items (id, name, n) VALUES ($1, $1, $2)")
            .bind(name)
            .bind(event.0)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn consumer_applies_each_event_once_across_reconnects() {
    let (sources, _dir1) = databases("consumer_src").await;
    let (targets, _dir2) = databases("consumer_dst").await;
    for (source, target) in sources.into_iter().zip(targets) {
        for i in 0..5 {
            let mut tx = source.begin().await.unwrap();
            tx.append_event(format!("e{i}").as_bytes()).await.unwrap();
            tx.commit().await.unwrap();
        }
        let (stop, shutdown) = watch::channel(false);
        let opens = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run_consumer(
            target.clone(),
            Mirror {
                source: source.clone(),
                opens: opens.clone(),
            },
            shutdown,
        ));
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM items")
                .fetch_one(target.pool())
                .await
                .unwrap()
        };
        eventually!(count().await == 5, "five events applied");

        // A live event is picked up too.
        let mut tx = source.begin().await.unwrap();
        let last = tx.append_event(b"live").await.unwrap();
        tx.commit().await.unwrap();
        eventually!(
            target.cursor("mirror").await.unwrap() == last,
            "the live event applied"
        );
        assert_eq!(count().await, 6, "no event applied twice");
        assert!(opens.load(Ordering::SeqCst) >= 3, "it reconnected");

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the consumer stops on shutdown")
            .unwrap();
    }
}

/// Fails its first opens so the backoff grows, then serves streams that end at once with
/// `end` (no events): the time of every open is recorded.
struct Ending {
    fail_first: usize,
    end: tonic::Code,
    opens: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl Consumer for Ending {
    type Event = i64;
    type Error = tonic::Status;
    type Stream = BoxStream<'static, Result<i64, tonic::Status>>;

    fn name(&self) -> &str {
        "ending"
    }

    async fn open(&self, _after: i64) -> Result<Self::Stream, tonic::Status> {
        let opened = {
            let mut opens = self.opens.lock().unwrap();
            opens.push(std::time::Instant::now());
            opens.len()
        };
        if opened <= self.fail_first {
            return Err(tonic::Status::unavailable("connection refused"));
        }
        let end = tonic::Status::new(self.end, "ended by the server");
        Ok(futures::stream::iter([Err(end)]).boxed())
    }

    fn sequence(&self, event: &i64) -> i64 {
        *event
    }

    async fn apply(&self, _: &mut Tx, _: i64) -> Result<(), StoreError> {
        Ok(())
    }
}

/// How long the consumer waited between the stream that ended and the open after it, when
/// the stream ends with `end` after four failed opens (a backoff grown to 1.6 s).
async fn reopen_after(end: tonic::Code) -> Duration {
    let (dbs, _dir) = databases("ending").await;
    let db = dbs.into_iter().next().unwrap();
    let opens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(run_consumer(
        db,
        Ending {
            fail_first: 4,
            end,
            opens: opens.clone(),
        },
        shutdown,
    ));
    eventually!(
        opens.lock().unwrap().len() >= 6,
        "the stream to be opened again after it ended"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the consumer stops on shutdown")
        .unwrap();
    let opens = opens.lock().unwrap();
    opens[5].duration_since(opens[4])
}

#[tokio::test]
async fn a_stream_ended_by_a_draining_upstream_is_reopened_at_once() {
    let drained = reopen_after(tonic::Code::Unavailable).await;
    let failed = reopen_after(tonic::Code::Internal).await;
    println!("reopened after {drained:?} (UNAVAILABLE), {failed:?} (INTERNAL)");
    assert!(drained < Duration::from_millis(500), "{drained:?}");
    // Any other failure keeps the backoff it has built up.
    assert!(failed >= Duration::from_millis(1500), "{failed:?}");
}
