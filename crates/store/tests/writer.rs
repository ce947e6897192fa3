//! Write transactions on SQLite run on the handle's one writer connection, which runs their
//! statements on the task holding the write turn: one cancelled at any point (while queued,
//! between statements) leaves nothing half done and the next writer a clean connection; pools
//! of one and two connections still serve reads and checkpoints between writes; `close` closes
//! the writer too; the WAL stays bounded under writes that never pause; events appended at the
//! commit arrive in order, go with a refused commit, and still get the outbox pruned; another
//! handle's write lock is waited for without blocking the thread; statements read as on
//! sqlx's own SQLite driver.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;

use tessera_store::{Db, DbOptions, Event, Migration, StoreError};

const MIGRATIONS: &[Migration] = &[
    Migration::portable(
        "items",
        "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
    ),
    // Checked at COMMIT: a way to make a COMMIT fail.
    Migration::portable(
        "item_tags",
        "CREATE TABLE item_tags (item_id TEXT NOT NULL \
         REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED, tag TEXT NOT NULL)",
    ),
];

async fn count(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM items")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// One transaction inserting `rows` rows, with an event appended at the commit, committed.
async fn write(db: &Db, tag: &str, rows: i64) -> Result<(), tessera_store::StoreError> {
    let mut tx = db.begin().await?;
    for n in 0..rows {
        sqlx::query("INSERT INTO items (id, n) VALUES ($1, $2)")
            .bind(format!("{tag}-{n}"))
            .bind(n)
            .execute(&mut *tx)
            .await?;
    }
    tx.append_on_commit(tag.as_bytes().to_vec());
    tx.commit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writers_leave_nothing_behind_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("w.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap();
    let mut committed = 0;
    // Cut writers off after a growing delay, so the cancellation lands everywhere from the
    // queue for the turn to the COMMIT; another writer runs alongside each.
    for round in 0..200u64 {
        let tag = format!("cut{round}");
        let cut = tokio::time::timeout(Duration::from_micros(round * 20), write(&db, &tag, 20));
        // Two others: one is usually waiting when the cut one commits, so its COMMIT also
        // opens the next transaction, and the cut lands in that too.
        let (ok, ok2) = (format!("ok{round}"), format!("ok{round}b"));
        let (cut, other, other2) = tokio::join!(cut, write(&db, &ok, 1), write(&db, &ok2, 1));
        other.unwrap();
        other2.unwrap();
        committed += 2;
        let cut_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE id LIKE $1")
            .bind(format!("{tag}-%"))
            .fetch_one(db.pool())
            .await
            .unwrap();
        match cut {
            Ok(result) => {
                result.unwrap();
                assert_eq!(cut_rows, 20, "{tag} committed whole");
                committed += 1;
            }
            // Cut off: either nothing of it is there or (cut off after its COMMIT ran) all of
            // it.
            Err(_) => {
                assert!(cut_rows == 0 || cut_rows == 20, "{tag}: {cut_rows} rows");
                if cut_rows == 20 {
                    committed += 1;
                }
            }
        }
    }
    // Every committed transaction appended one event; nothing else did.
    assert_eq!(db.last_sequence().await.unwrap(), committed);
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE id LIKE 'ok%' OR id LIKE 'cut%-0'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(expected, committed);
    db.close().await;
}

#[tokio::test]
async fn small_pools_still_read_and_checkpoint_between_writes() {
    for size in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.db");
        let options = DbOptions {
            max_connections: Some(size),
            acquire_timeout: Duration::from_secs(5),
            ..DbOptions::default()
        };
        let db = Db::open_with(path.to_str().unwrap(), options, MIGRATIONS)
            .await
            .unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for round in 0..5 {
            write(&db, &format!("r{round}"), 200).await.unwrap();
            assert_eq!(count(&db).await, 200 * (round + 1), "pool of {size}");
        }
        // The handle's checkpoint gets a connection too: the rows reach the database file
        // while the handle is open.
        tessera_testing::eventually!(
            std::fs::metadata(&path).unwrap().len() > before,
            "pool of {size}: a checkpoint grows the database file"
        );
        db.close().await;
    }
}

/// SQLite keeps a transaction open when its COMMIT is refused (here by a deferred foreign
/// key): the writer must still roll it back, or every later writer fails.
#[tokio::test]
async fn a_refused_commit_is_rolled_back_and_the_next_writer_works() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("refused.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap();
    for round in 0..3 {
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO item_tags (item_id, tag) VALUES ('missing', 'x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.append_event(b"refused").await.unwrap();
        assert!(
            tx.commit().await.is_err(),
            "round {round}: the COMMIT is refused"
        );
        write(&db, &format!("after{round}"), 2).await.unwrap();
    }
    let orphans: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM item_tags")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(orphans, 0);
    assert_eq!(count(&db).await, 6);
    // Only the three committed transactions' events are in the outbox.
    assert_eq!(db.last_sequence().await.unwrap(), 3);
    db.close().await;
}

#[tokio::test]
async fn close_closes_the_writer_so_the_wal_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("closed.db");
    let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    write(&db, "before-close", 10).await.unwrap();
    db.close().await;
    // SQLite removes the WAL when its last connection closes.
    let wal = dir.path().join("closed.db-wal");
    assert!(!wal.exists(), "{} still exists after close", wal.display());
    // And the data is in the file.
    let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    assert_eq!(count(&db).await, 10);
    db.close().await;
}

/// A refused COMMIT with a writer waiting rolls back, and the waiting writer begins on a clean
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_with_a_writer_waiting_leaves_it_a_clean_turn() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("refused.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap();
    for round in 0..20 {
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO item_tags (item_id, tag) VALUES ('missing', 'x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let db = db.clone();
            async move { write(&db, &format!("after{round}"), 2).await }
        });
        // Until the other writer is queued for the turn (it cannot get further).
        tessera_testing::eventually!(db.writers_waiting() == 1);
        assert!(tx.commit().await.is_err(), "round {round}: refused");
        waiting.await.unwrap().unwrap();
    }
    let orphans: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM item_tags")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!((orphans, count(&db).await), (0, 40));
    db.close().await;
}

/// A writer that gives up waiting for its turn leaves no transaction behind: another process
/// can write the file. (One thread: the writer is cut off exactly between the COMMIT before it
/// and taking its turn.)
#[tokio::test]
async fn a_writer_that_gave_up_leaves_the_file_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gave-up.db");
    let db = Db::open(path.to_str().unwrap(), MIGRATIONS).await.unwrap();
    for round in 0..5 {
        let tx = db.begin().await.unwrap();
        let waiting = tokio::spawn({
            let db = db.clone();
            async move { db.begin().await.map(drop) }
        });
        tessera_testing::eventually!(db.writers_waiting() == 1);
        // The turn passes to the waiting writer, which is gone before it runs again to take
        // it.
        tx.commit().await.unwrap();
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // Another process on the same file: its write waits (busy timeout) for the write
        // lock, which the handle gives up without a writer of its own coming.
        let other = Db::open_with(
            path.to_str().unwrap(),
            DbOptions {
                busy_timeout: Duration::from_secs(10),
                ..DbOptions::default()
            },
            MIGRATIONS,
        )
        .await
        .unwrap();
        write(&other, &format!("other{round}"), 1).await.unwrap();
        other.close().await;
    }
    write(&db, "mine", 1).await.unwrap();
    assert_eq!(count(&db).await, 6);
    db.close().await;
}

/// SQLite starts its WAL over only in a write transaction that began after a checkpoint copied
/// all of it. Writers that never pause commit during every checkpoint, so without the handle's
/// checkpoint under the write turn the WAL grew by everything written (here about 140 MiB).
/// How far past `wal_restart_bytes` it gets depends on how much is written between two of the
/// handle's checkpoints, so what is checked is that it stops growing: its largest size over
/// the second half of the writes is about that of the first half, where an unbounded WAL
/// would be twice as large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_while_writes_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let options = DbOptions {
        wal_restart_bytes: 4 << 20,
        ..DbOptions::default()
    };
    let db = Db::open_with(path.to_str().unwrap(), options, MIGRATIONS)
        .await
        .unwrap();
    let wal = dir.path().join("busy.db-wal");
    let body = "x".repeat(12 * 1024);
    const ROUNDS: u64 = 1_500;
    let (mut largest, mut written) = ([0u64; 2], 0u64);
    // Two writers back to back, so there is always one waiting for the turn.
    for round in 0..ROUNDS {
        let one = |n: u64| {
            let (db, body) = (&db, &body);
            async move {
                let mut tx = db.begin().await.unwrap();
                sqlx::query("INSERT INTO items (id, n) VALUES ($1, $2)")
                    .bind(format!("{body}{n}"))
                    .bind(n as i64)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.append_event(b"e").await.unwrap();
                tx.commit().await.unwrap();
            }
        };
        tokio::join!(one(2 * round), one(2 * round + 1));
        written += 2 * body.len() as u64;
        let half = &mut largest[usize::from(round >= ROUNDS / 2)];
        *half = (*half).max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert_eq!(count(&db).await, 3_000);
    // The key is in the table and its index: each row writes its text twice, and more pages.
    assert!(written > 30 << 20, "wrote {written} bytes");
    let [first, second] = largest;
    assert!(
        second * 2 < first * 3,
        "the WAL kept growing: {first} bytes at most in the first half of the writes, \
         {second} in the second ({written} bytes written)"
    );
    db.close().await;
}

/// Starts a writer that queues for the turn behind the transaction held now (writing a row
/// and an event named `tag`, or nothing), and returns once it is waiting.
async fn queue_behind(db: &Db, tag: Option<String>) -> tokio::task::JoinHandle<()> {
    let waiting = tokio::spawn({
        let db = db.clone();
        async move {
            match tag {
                Some(tag) => write(&db, &tag, 1).await.unwrap(),
                None => db.begin().await.unwrap().commit().await.unwrap(),
            }
        }
    });
    tessera_testing::eventually!(db.writers_waiting() == 1);
    waiting
}

async fn next_event(
    events: &mut (impl futures::Stream<Item = Result<Event, StoreError>> + Unpin),
) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the event arrives")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_in_the_commit_arrive_in_order_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("fold.db").to_str().unwrap(), MIGRATIONS)
        .await
        .unwrap();
    // Subscribed before the writes.
    let mut events = Box::pin(db.events(0));
    for round in 0..30 {
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO items (id, n) VALUES ($1, 0)")
            .bind(format!("held{round}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.append_on_commit(format!("held{round}").into_bytes());
        let waiting = queue_behind(&db, Some(format!("queued{round}"))).await;
        tx.commit().await.unwrap();
        waiting.await.unwrap();
    }
    let wanted = (0..30).flat_map(|round| [format!("held{round}"), format!("queued{round}")]);
    for (i, want) in wanted.enumerate() {
        let event = next_event(&mut events).await;
        assert_eq!(event.sequence, i as i64 + 1);
        assert_eq!(String::from_utf8(event.payload).unwrap(), want);
    }
    // The stream has caught up and waits. A folded event that no later commit follows must
    // wake it by itself.
    let mut tx = db.begin().await.unwrap();
    tx.append_on_commit(b"last".to_vec());
    let waiting = queue_behind(&db, None).await;
    tx.commit().await.unwrap();
    waiting.await.unwrap();
    let last = next_event(&mut events).await;
    assert_eq!((last.sequence, last.payload.as_slice()), (61, &b"last"[..]));
    assert_eq!(count(&db).await, 60);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_drops_the_event_it_carried() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path().join("refused-event.db").to_str().unwrap(),
        MIGRATIONS,
    )
    .await
    .unwrap();
    for round in 0..10 {
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO item_tags (item_id, tag) VALUES ('missing', 'x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.append_on_commit(b"refused".to_vec());
        let waiting = queue_behind(&db, Some(format!("after{round}"))).await;
        assert!(tx.commit().await.is_err(), "round {round}: refused");
        waiting.await.unwrap();
    }
    let kept = db.read_events(0, 100).await.unwrap();
    let tags: Vec<String> = kept
        .iter()
        .map(|e| String::from_utf8(e.payload.clone()).unwrap())
        .collect();
    let want: Vec<String> = (0..10).map(|round| format!("after{round}")).collect();
    assert_eq!(tags, want);
    assert_eq!(
        kept.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    db.close().await;
}

/// Appends made at the commit, with writers queued behind each, still prune the outbox at its
/// prune points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_in_the_commit_still_get_the_outbox_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let options = DbOptions {
        outbox_retention: Some(Duration::ZERO),
        ..DbOptions::default()
    };
    let db = Db::open_with(
        dir.path().join("pruned.db").to_str().unwrap(),
        options,
        MIGRATIONS,
    )
    .await
    .unwrap();
    let total = 3 * tessera_store::PRUNE_EVERY;
    for _ in 0..total {
        let mut tx = db.begin().await.unwrap();
        tx.append_on_commit(b"e".to_vec());
        // A writer without events waits behind each.
        let waiting = queue_behind(&db, None).await;
        tx.commit().await.unwrap();
        waiting.await.unwrap();
    }
    assert_eq!(db.last_sequence().await.unwrap(), total);
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tessera_outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    // Pruned at each prune point: what is left is at most what came after the last one.
    assert!(
        kept <= tessera_store::PRUNE_EVERY + 1,
        "{kept} of {total} events kept"
    );
    db.close().await;
}

/// The writer connection runs its statements on the task that holds the turn, so it must not
/// sleep in SQLite's busy handler while another handle (another process) holds the file's
/// write lock: on a runtime of one thread that would stall the task that is to release it. Its
/// `BEGIN IMMEDIATE` is retried with async pauses instead, and goes through once the other
/// transaction ends.
#[tokio::test(flavor = "current_thread")]
async fn a_writer_waits_for_another_handle_without_blocking_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.db");
    let options = DbOptions {
        busy_timeout: Duration::from_secs(5),
        ..DbOptions::default()
    };
    let first = Db::open_with(path.to_str().unwrap(), options.clone(), MIGRATIONS)
        .await
        .unwrap();
    let second = Db::open_with(path.to_str().unwrap(), options, MIGRATIONS)
        .await
        .unwrap();
    let mut held = first.begin().await.unwrap();
    sqlx::query("INSERT INTO items (id, n) VALUES ('held', 1)")
        .execute(&mut *held)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        held.commit().await.unwrap();
    });
    let started = std::time::Instant::now();
    write(&second, "second", 1).await.unwrap();
    let waited = started.elapsed();
    release.await.unwrap();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(4),
        "the second writer went through after {waited:?}"
    );
    assert_eq!(count(&second).await, 2);
    first.close().await;
    second.close().await;
}

/// What a write transaction's statements return on the writer connection is what sqlx's
/// SQLite driver returns: values by their type, NULL, rows of a RETURNING, none for a miss,
/// `?` parameters in order, SQLite's errors with their codes (a duplicate key is a unique
/// violation), several statements with parameters.
#[tokio::test]
async fn statements_in_a_write_transaction_read_as_on_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.db");
    let migrations = &[Migration::portable(
        "values",
        "CREATE TABLE vals (id BIGINT PRIMARY KEY, t TEXT, b BLOB, r DOUBLE PRECISION, \
         i BIGINT)",
    )];
    let db = Db::open(path.to_str().unwrap(), migrations).await.unwrap();
    let mut tx = db.begin().await.unwrap();
    let row: (i64, String, Vec<u8>, f64, Option<i64>) = sqlx::query_as(
        "INSERT INTO vals (id, t, b, r, i) VALUES ($1, $2, $3, $4, $5) \
         RETURNING id, t, b, r, i",
    )
    .bind(7_i64)
    .bind("héllo")
    .bind(vec![0_u8, 255, 1])
    .bind(2.5_f64)
    .bind(None::<i64>)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(row, (7, "héllo".into(), vec![0, 255, 1], 2.5, None));
    // `?` parameters, in order; a narrower integer binds as SQLite's INTEGER.
    let done = sqlx::query("INSERT INTO vals (id, t) VALUES (?, ?)")
        .bind(8_i32)
        .bind("second")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    let missing: Option<(i64,)> = sqlx::query_as("SELECT id FROM vals WHERE id = $1")
        .bind(99_i64)
        .fetch_optional(&mut *tx)
        .await
        .unwrap();
    assert_eq!(missing, None);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM vals ORDER BY id")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(ids, [7, 8]);
    // The same key again: SQLite's unique violation, as the store reports it.
    let err = sqlx::query("INSERT INTO vals (id) VALUES ($1)")
        .bind(7_i64)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(StoreError::from(err).is_unique_violation());
    // Several statements with a parameter run one by one, as on sqlx's driver: the DELETE
    // sees the row the INSERT made, and the counts add up (1 inserted, 3 deleted).
    let done = sqlx::query("INSERT INTO vals (id) VALUES ($1); DELETE FROM vals")
        .bind(9_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 4);
    tx.rollback().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vals")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    db.close().await;
}
